# shellcheck shell=bash
# Shell shared by the benchmark runners (run.sh, run_extra.sh): start dicomhub and Orthanc on loopback the same way
# in both, and describe the machine and versions the same way in every report.  Meant to be sourced from the
# repository root after CI_STATE is set (scripts/services.sh keeps its pid files, logs and data there):
#
#   source benchmarks/lib.sh
#   bench_start_dicomhub NAME PORT DATA_DIR     # other DICOMHUB_* settings come from the caller's environment
#   bench_start_orthanc NAME HTTP_PORT DICOM_PORT
#   bench_dicomhub_version; bench_orthanc_version PORT; bench_machine
#
# Every process is recorded in the state dir, so scripts/services.sh's stop_all stops it by its own pid.

# shellcheck source=scripts/services.sh
source scripts/services.sh

bench_log() { echo "[${BENCH_LOG_TAG:-bench}] $*" >&2; }

# http_get URL [JSON_KEY] : print the HTTP status (or the value of JSON_KEY in the body); 0 when nothing answers.
http_get() {
  .venv/bin/python - "$@" <<'EOF' 2>/dev/null || echo "?"
import sys, httpx
try:
    r = httpx.get(sys.argv[1], timeout=2, trust_env=False)
except httpx.HTTPError:
    print(0)
    sys.exit(0)
print(r.json()[sys.argv[2]] if len(sys.argv) > 2 else r.status_code)
EOF
}

# bench_start_dicomhub NAME PORT DATA_DIR : `dicomhub serve` on 127.0.0.1:PORT with DICOMHUB_DATA_DIR=DATA_DIR, its
# log in "$SVC_STATE/NAME.log", recorded as NAME; returns once /health/check answers 200.  A port that already
# answers is refused: the benchmark would otherwise measure whatever server holds it.
bench_start_dicomhub() {
  local name=$1 port=$2 data_dir=$3 ok=0
  [ -x .venv/bin/dicomhub ] || { bench_log ".venv/bin/dicomhub not found (pip install -e .)"; return 1; }
  if [ "$(http_get "http://127.0.0.1:$port/health/check")" != 0 ]; then
    bench_log "port $port is already in use by another process"
    return 1
  fi
  bench_log "starting $name on 127.0.0.1:$port (data dir $data_dir)"
  DICOMHUB_DATA_DIR=$data_dir nohup "$PWD/.venv/bin/dicomhub" serve --host 127.0.0.1 --port "$port" \
    >"$SVC_STATE/$name.log" 2>&1 </dev/null &
  svc_record "$name" $! "serve --host 127.0.0.1 --port $port"
  for _ in $(seq 1 300); do
    if [ "$(http_get "http://127.0.0.1:$port/health/check")" = 200 ]; then
      ok=1
      break
    fi
    _svc_alive "$name" || break
    sleep 0.2
  done
  if [ "$ok" != 1 ]; then
    bench_log "$name did not answer 200 on /health/check; its log:"
    tail -40 "$SVC_STATE/$name.log" >&2
    return 1
  fi
}

# bench_start_orthanc NAME HTTP_PORT DICOM_PORT : a fresh private Orthanc with the DICOMweb plugin and the GDCM plugin
# (Orthanc decodes JPEG 2000 only through it: run.sh's transcode phase), installing the Debian packages when missing.
bench_start_orthanc() {
  SVC_PACKAGES+=(orthanc-gdcm)
  ensure_packages || return 1
  ORTHANC_EXTRA_CONFIG=$(printf '{"Plugins": ["%s", "%s"]}' "$ORTHANC_DICOMWEB_PLUGIN" \
    /usr/share/orthanc/plugins/libOrthancGdcm.so) start_orthanc "$1" "$2" "$3"
}

bench_dicomhub_version() {
  .venv/bin/python -c 'import importlib.metadata as m; print(m.version("dicomhub"))' 2>/dev/null || echo "?"
}

# bench_orthanc_version HTTP_PORT : Orthanc's and its DICOMweb plugin's versions (running and Debian package).
bench_orthanc_version() {
  local orthanc dicomweb
  orthanc=$(http_get "http://127.0.0.1:$1/system" Version)
  dicomweb=$(http_get "http://127.0.0.1:$1/plugins/dicom-web" Version)
  echo "$orthanc (Debian $(dpkg-query -W -f='${Version}' orthanc 2>/dev/null)), DICOMweb plugin $dicomweb (Debian $(dpkg-query -W -f='${Version}' orthanc-dicomweb 2>/dev/null)); HttpCompressionEnabled false, other settings default"
}

# bench_machine : cores, CPU model, memory, kernel and distribution, on one line.
bench_machine() {
  local mem cpu
  mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
  cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
  echo "$(nproc) cores ($cpu), $mem memory, $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME")"
}
