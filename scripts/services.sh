# shellcheck shell=bash
# Test services for dicomhub, on loopback only.  Meant to be sourced:
#
#   source scripts/services.sh
#   ensure_packages                      # apt-get only when something is missing
#   ensure_oidc_provider [DIR]           # npm ci of the auth tests' OpenID provider, when missing
#   ensure_azurite                       # npm ci of Azurite (Azure Blob emulator), when missing
#   ensure_ohif                          # OHIF Viewer's dist/ for tests/test_ohif.py, when missing
#   ensure_fhir_server [DIR]             # npm ci of the DICOMcast tests' FHIR server, when missing
#   start_postgres [PORT]                # default 55432; exports DICOMHUB_TEST_POSTGRES_URL
#   start_orthanc NAME HTTP_PORT DICOM_PORT [DICOMWEB_PEER_URL]
#   stop_all                             # stops everything recorded in the state dir
#
# State (pid files, logs, data) lives in ${CI_STATE:-/tmp/dicomhub-services}.  Every background
# process is started as a plain command so that `$!` is the server's own pid, recorded in
# "$SVC_STATE/<name>.pid", and stopped by that pid only.  PostgreSQL is managed by pg_ctl.
#
# The functions return non-zero on failure and never call `exit`, so they are safe to use
# from an interactive shell as well as from `set -e` scripts.

SVC_STATE=${CI_STATE:-/tmp/dicomhub-services}
SVC_PACKAGES=(postgresql orthanc orthanc-dicomweb dcmtk chromium)
ORTHANC_BIN=/usr/sbin/Orthanc
ORTHANC_DICOMWEB_PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

_svc_log() { echo "[services] $*" >&2; }

_svc_state() { mkdir -p "$SVC_STATE" && chmod 755 "$SVC_STATE"; }

# Newest installed PostgreSQL server binaries directory, e.g. /usr/lib/postgresql/15/bin.
_svc_pg_bin() {
  local d
  d=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] && dirname "$d"
}

# _svc_http_ok URL : true when URL answers 200 on GET.
_svc_http_ok() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --noproxy '*' -o /dev/null --max-time 2 "$1" 2>/dev/null
  else
    python3 - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(0 if opener.open(sys.argv[1], timeout=2).status == 200 else 1)
EOF
  fi
}

# _svc_alive NAME : the recorded pid of NAME is running.
_svc_alive() {
  local f="$SVC_STATE/$1.pid"
  [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

# _svc_packages_missing : prints the Debian packages of SVC_PACKAGES that are not installed.
_svc_packages_missing() {
  local p st
  for p in "${SVC_PACKAGES[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$st" = "install ok installed" ] || echo "$p"
  done
}

# ensure_packages : install postgresql, orthanc, orthanc-dicomweb, dcmtk and chromium (for the OHIF
# tests, driven by Playwright) when missing.
ensure_packages() {
  local missing
  missing=$(_svc_packages_missing | tr '\n' ' ')
  if [ -z "${missing// /}" ]; then
    return 0
  fi
  _svc_log "installing missing Debian packages: $missing"
  if [ "$(id -u)" -ne 0 ]; then
    _svc_log "not root: cannot apt-get install $missing"
    return 1
  fi
  # policy-rc.d keeps the packages' own system services from starting (we never use them).
  apt-get -o DPkg::Lock::Timeout=600 update -q || return 1
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends $missing || return 1
}

# ensure_azurite : npm ci of Azurite (the Azure Blob emulator of the storage, export and import tests;
# pinned by tests/support/azurite's lock file), only when node_modules is missing. The tests start it.
ensure_azurite() {
  local dir=tests/support/azurite
  [ -x "$dir/node_modules/.bin/azurite-blob" ] && return 0
  command -v npm >/dev/null 2>&1 || { _svc_log "npm not found: the Azure storage tests need node and npm"; return 1; }
  _svc_log "installing Azurite (npm ci in $dir)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
}

# ensure_oidc_provider [DIR] : npm ci of the OpenID provider the auth tests start (default
# tests/support/oidc: npm oidc-provider, pinned by its lock file), only when node_modules is missing.
ensure_oidc_provider() {
  local dir=${1:-tests/support/oidc}
  [ -d "$dir/node_modules/oidc-provider" ] && return 0
  command -v npm >/dev/null 2>&1 || { _svc_log "npm not found: the auth tests need node and npm"; return 1; }
  _svc_log "installing the OIDC test provider (npm ci in $dir)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
}

# ensure_fhir_server [DIR] : npm ci of the FHIR R4 server the DICOMcast tests start (default
# tests/support/fhir: npm @medplum/fhir-router and jose, pinned by its lock file), only when they are missing.
ensure_fhir_server() {
  local dir=${1:-tests/support/fhir}
  [ -d "$dir/node_modules/@medplum/fhir-router" ] && [ -d "$dir/node_modules/jose" ] && return 0
  command -v npm >/dev/null 2>&1 || { _svc_log "npm not found: the DICOMcast tests need node and npm"; return 1; }
  _svc_log "installing the FHIR test server (npm ci in $dir)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
}

# ensure_ohif : OHIF Viewer's prebuilt dist/ (npm @ohif/app, pinned in tests/support/ohif/package.json)
# for tests/test_ohif.py; install.sh does nothing when the pinned version is there.
ensure_ohif() {
  command -v npm >/dev/null 2>&1 || { _svc_log "npm not found: the OHIF tests need node and npm"; return 1; }
  bash tests/support/ohif/install.sh
}

# start_postgres [PORT] : private throwaway cluster on 127.0.0.1:PORT (default 55432), database
# dicomhub, user postgres, trust auth, fsync off.  Idempotent.
start_postgres() {
  local port=${1:-55432} bin d
  bin=$(_svc_pg_bin) || { _svc_log "PostgreSQL server binaries not found (run ensure_packages)"; return 1; }
  _svc_state || return 1
  d="$SVC_STATE/pg"
  if [ ! -s "$d/PG_VERSION" ]; then
    rm -rf "$d"
    install -d -o postgres -g postgres -m 700 "$d" || return 1
    runuser -u postgres -- "$bin/initdb" -D "$d" -U postgres -A trust -E UTF8 --no-locale >"$SVC_STATE/pg-initdb.log" 2>&1 \
      || { cat "$SVC_STATE/pg-initdb.log" >&2; return 1; }
  fi
  if ! runuser -u postgres -- "$bin/pg_ctl" -D "$d" status >/dev/null 2>&1; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$d" -l "$d/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $d -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      start >/dev/null || { tail -20 "$d/server.log" >&2; return 1; }
  fi
  # The cluster may already be running from an earlier call: use the port it really listens on.
  local running_port
  running_port=$(sed -n 4p "$d/postmaster.pid" 2>/dev/null)
  if [ -n "$running_port" ] && [ "$running_port" != "$port" ]; then
    _svc_log "postgres in $d already runs on port $running_port (asked for $port); using $running_port"
    port=$running_port
  fi
  if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc \
      "select 1 from pg_database where datname='dicomhub'" 2>/dev/null | grep -q 1; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres dicomhub || return 1
  fi
  export DICOMHUB_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/dicomhub"
  _svc_log "postgres ready: $DICOMHUB_TEST_POSTGRES_URL"
}

# stop_postgres : stop the private cluster (if running).
stop_postgres() {
  local bin d="$SVC_STATE/pg"
  [ -s "$d/postmaster.pid" ] || return 0
  bin=$(_svc_pg_bin) || return 0
  runuser -u postgres -- "$bin/pg_ctl" -D "$d" -m fast -w -t 60 stop >/dev/null 2>&1 || true
}

# _svc_orthanc_config HOME HTTP_PORT DICOM_PORT NAME [PEER_URL] : writes HOME/orthanc.json.
# Extra top-level keys may be merged in from the JSON object in $ORTHANC_EXTRA_CONFIG
# (e.g. ORTHANC_EXTRA_CONFIG='{"StorageCompression": true}').  ORTHANC_DICOM_SERVER=1 turns the
# DIMSE listener on (registered AETs only, since Orthanc cannot bind to loopback).
_svc_orthanc_config() {
  python3 - "$@" <<'EOF'
import json, os, sys

home, http_port, dicom_port, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
peer = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
dicomweb = {
    "Enable": True,
    "Root": "/dicom-web/",
    "EnableWado": True,
    "WadoRoot": "/wado",
    "Ssl": False,
}
if peer:
    dicomweb["Servers"] = {"dicomhub": {"Url": peer}}
config = {
    "Name": name,
    "StorageDirectory": os.path.join(home, "storage"),
    "IndexDirectory": os.path.join(home, "storage"),
    "TemporaryDirectory": os.path.join(home, "tmp"),
    "Plugins": [os.environ.get("ORTHANC_DICOMWEB_PLUGIN",
                               "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")],
    "HttpServerEnabled": True,
    "HttpPort": http_port,
    # Orthanc 1.10 cannot bind to loopback only: refuse every non-loopback client instead.
    "RemoteAccessAllowed": False,
    "AuthenticationEnabled": False,
    "SslEnabled": False,
    "HttpCompressionEnabled": False,
    "HttpDescribeErrors": True,
    "DicomServerEnabled": os.environ.get("ORTHANC_DICOM_SERVER", "0") == "1",
    "DicomAet": "ORTHANC",
    "DicomPort": dicom_port,
    "DicomCheckModalityHost": True,
    "DicomCheckCalledAet": False,
    "DicomAlwaysAllowEcho": False,
    "DicomAlwaysAllowStore": False,
    "DicomAlwaysAllowFind": False,
    "DicomAlwaysAllowGet": False,
    "DicomAlwaysAllowMove": False,
    "DicomModalities": {},
    "WebDavEnabled": False,
    "ExecuteLuaEnabled": False,
    "SaveJobs": False,
    "DicomWeb": dicomweb,
}
extra = os.environ.get("ORTHANC_EXTRA_CONFIG", "").strip()
if extra:
    for key, value in json.loads(extra).items():
        if key == "DicomWeb" and isinstance(value, dict):
            config["DicomWeb"].update(value)
        else:
            config[key] = value
with open(os.path.join(home, "orthanc.json"), "w") as fh:
    json.dump(config, fh, indent=2)
EOF
}

# start_orthanc NAME HTTP_PORT DICOM_PORT [DICOMWEB_PEER_URL] : private Orthanc with only the
# DICOMweb plugin, home "$SVC_STATE/orthanc-NAME", pid "$SVC_STATE/orthanc-NAME.pid".  DICOMweb
# answers at http://127.0.0.1:HTTP_PORT/dicom-web/.  Waits until /system answers.  Idempotent
# (an instance already running under NAME is left as it is).
start_orthanc() {
  if [ $# -lt 3 ]; then
    _svc_log "usage: start_orthanc NAME HTTP_PORT DICOM_PORT [DICOMWEB_PEER_URL]"
    return 2
  fi
  local name=$1 http_port=$2 dicom_port=$3 peer=${4:-} home pidf pid
  [ -x "$ORTHANC_BIN" ] || { _svc_log "$ORTHANC_BIN not found (run ensure_packages)"; return 1; }
  _svc_state || return 1
  home="$SVC_STATE/orthanc-$name"
  pidf="$SVC_STATE/orthanc-$name.pid"
  if _svc_alive "orthanc-$name"; then
    _svc_http_ok "http://127.0.0.1:$http_port/system" && return 0
  fi
  if _svc_http_ok "http://127.0.0.1:$http_port/system" || (echo >"/dev/tcp/127.0.0.1/$http_port") 2>/dev/null; then
    _svc_log "port $http_port is already in use by another process"
    return 1
  fi
  mkdir -p "$home/storage" "$home/tmp" || return 1
  ORTHANC_DICOMWEB_PLUGIN=$ORTHANC_DICOMWEB_PLUGIN \
    _svc_orthanc_config "$home" "$http_port" "$dicom_port" "$name" "$peer" || return 1
  # Plain command: setsid execs Orthanc, so $! is Orthanc's own pid.
  setsid "$ORTHANC_BIN" "$home/orthanc.json" >"$home/orthanc.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pidf"
  echo "$home/orthanc.json" >"$SVC_STATE/orthanc-$name.match"
  local _i
  for _i in $(seq 1 300); do
    if _svc_http_ok "http://127.0.0.1:$http_port/system"; then
      _svc_log "orthanc '$name' ready: http://127.0.0.1:$http_port/dicom-web/ (pid $pid)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      _svc_log "orthanc '$name' exited during start-up:"
      tail -30 "$home/orthanc.log" >&2
      rm -f "$pidf"
      return 1
    fi
    sleep 0.2
  done
  _svc_log "orthanc '$name' did not answer on port $http_port within 60 s"
  tail -30 "$home/orthanc.log" >&2
  return 1
}

# svc_record NAME PID [MATCH] : record a process started elsewhere so that stop_all stops it.
# MATCH, when given, must appear in the process's command line at stop time (guards against pid
# reuse).
svc_record() {
  _svc_state || return 1
  echo "$2" >"$SVC_STATE/$1.pid"
  if [ -n "${3:-}" ]; then echo "$3" >"$SVC_STATE/$1.match"; else rm -f "$SVC_STATE/$1.match"; fi
}

# _svc_term PIDFILE : TERM the recorded pid (after checking it is still the recorded process) and
# print the pid that must be waited for.
_svc_term() {
  local f=$1 p m
  p=$(cat "$f" 2>/dev/null)
  m=$(cat "${f%.pid}.match" 2>/dev/null)
  rm -f "$f" "${f%.pid}.match"
  [ -n "$p" ] || return 0
  kill -0 "$p" 2>/dev/null || return 0
  if [ -n "$m" ] && ! tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$m"; then
    _svc_log "pid $p ($f) is no longer the recorded process; not stopping it"
    return 0
  fi
  kill -TERM "$p" 2>/dev/null && echo "$p"
}

# _svc_reap PID... : wait up to 30 s for each pid to exit, then KILL it.
_svc_reap() {
  local p
  for p in "$@"; do
    timeout 30 tail --pid="$p" -f /dev/null 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
  done
}

# stop_service NAME : stop the process recorded as NAME.
stop_service() {
  local p
  p=$(_svc_term "$SVC_STATE/$1.pid")
  [ -z "$p" ] || _svc_reap "$p"
}

# stop_all : stop PostgreSQL (pg_ctl) and every process recorded in "$SVC_STATE"/*.pid (TERM all
# of them first, then wait for each, KILL after 30 s).
stop_all() {
  [ -d "$SVC_STATE" ] || return 0
  local f pids=()
  for f in "$SVC_STATE"/*.pid; do
    [ -e "$f" ] || continue
    pids+=($(_svc_term "$f"))
  done
  stop_postgres
  [ ${#pids[@]} -eq 0 ] || _svc_reap "${pids[@]}"
  return 0
}
