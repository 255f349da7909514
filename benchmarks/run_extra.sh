#!/usr/bin/env bash
# The benchmark phases of issue 13 beyond run.sh, each on freshly started servers on loopback, appended to
# benchmarks/RESULTS-extra.md:
#   stow    bench.py's STOW configurations: dicomhub on PostgreSQL, dicomhub on SQLite, Orthanc (growth.py stow)
#   growth  QIDO medians at 2,000 / 20,000 / 200,000 instances, dicomhub on SQLite and on PostgreSQL (growth.py qido)
#   large   STOW and WADO of one ~2 GB instance, dicomhub (SQLite) and Orthanc, with peak RSS (large.py)
#
#   bash benchmarks/run_extra.sh [--phases stow,growth,large] [--sizes 2000,20000,200000] [--size-mb 2000]
#
# Environment:
#   BENCH_EXTRA_STATE     state dir: pid files, logs, PostgreSQL cluster, Orthanc storage (default
#                         /tmp/dicomhub-bench-extra; wiped at start)
#   BENCH_EXTRA_RESULTS   report file, appended to (default benchmarks/RESULTS-extra.md)
#   BENCH_EXTRA_PORT      first of four ports: dicomhub SQLite, dicomhub PostgreSQL, Orthanc HTTP, Orthanc DICOM
#                         (default 18180, so 18180-18183)
#   BENCH_EXTRA_PG_PORT   the private PostgreSQL cluster (default 55440)
# dicomhub runs with its default settings (DICOMHUB_WORKERS: CPU count up to 4), except in the growth phase, where
# DICOMHUB_FSYNC=false loads the 200,000 instances faster (the phase measures queries, not stores).  The PostgreSQL
# cluster is scripts/services.sh's throwaway one (fsync, synchronous_commit and full_page_writes off).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

command="bash benchmarks/run_extra.sh${*:+ $*}"
phases=stow,growth,large
sizes=2000,20000,200000
size_mb=2000
while [ $# -gt 0 ]; do
  case $1 in
    --phases) phases=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --size-mb) size_mb=$2; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

export CI_STATE=${BENCH_EXTRA_STATE:-/tmp/dicomhub-bench-extra}
RESULTS=${BENCH_EXTRA_RESULTS:-benchmarks/RESULTS-extra.md}
PORT=${BENCH_EXTRA_PORT:-18180}
SQLITE_PORT=$PORT
PG_DICOMHUB_PORT=$((PORT + 1))
ORTHANC_PORT=$((PORT + 2))
ORTHANC_DICOM_PORT=$((PORT + 3))
PG_PORT=${BENCH_EXTRA_PG_PORT:-55440}
PY=.venv/bin/python

# shellcheck source=benchmarks/lib.sh
source benchmarks/lib.sh
BENCH_LOG_TAG=run_extra.sh

[ -x $PY ] || { bench_log ".venv missing: run 'make venv' first"; exit 1; }
unset DICOMHUB_DATABASE_URL # the SQLite servers must be SQLite

stop_all
rm -rf "$CI_STATE"
mkdir -p "$CI_STATE"
WORK=$(mktemp -d /tmp/dicomhub-bench-extra-data.XXXXXX)
cleanup() {
  stop_all
  rm -rf "$WORK" "$CI_STATE/pg" "$CI_STATE"/orthanc-*/storage # the logs stay
}
trap cleanup EXIT

has_phase() { [[ ",$phases," == *",$1,"* ]]; }

# tree_state PHASE : note the commit the servers of PHASE run (they run from the working tree, which others may
# change during a long run), and whether dicomhub/ differs from it.
tree_state() {
  local c
  c=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
  [ -z "$(git status --porcelain -- dicomhub pyproject.toml 2>/dev/null)" ] || c="$c + uncommitted changes in dicomhub/"
  trees+=("$1 $c")
}

# fresh_dicomhub NAME PORT [DATABASE_URL] : a new dicomhub with an empty data dir (and the given index database).
fresh_dicomhub() {
  local dir
  dir=$(mktemp -d "$WORK/$1.XXXXXX")
  if [ -n "${3:-}" ]; then
    DICOMHUB_DATABASE_URL=$3 bench_start_dicomhub "$1" "$2" "$dir"
  else
    bench_start_dicomhub "$1" "$2" "$dir"
  fi
}

# fresh_orthanc : a new Orthanc with empty storage, recorded as orthanc-extra.
fresh_orthanc() {
  stop_service orthanc-extra
  rm -rf "$CI_STATE/orthanc-extra"
  bench_start_orthanc extra "$ORTHANC_PORT" "$ORTHANC_DICOM_PORT" || return 1
  orthanc_version=$(bench_orthanc_version "$ORTHANC_PORT")
}

# new_database : the SQLAlchemy URL of a new, empty database in the private cluster.
new_database() {
  $PY -c 'import sys; from tests.servers import new_postgres_database as n; print(n(sys.argv[1]))' \
    "$DICOMHUB_TEST_POSTGRES_URL"
}

# stop_dicomhubs : stop the dicomhub servers of the last phase and remove their data.
stop_dicomhubs() {
  stop_service dicomhub-sqlite
  stop_service dicomhub-postgresql
  rm -rf "${WORK:?}"/dicomhub-*
}

SVC_PACKAGES+=(orthanc-gdcm)
ensure_packages
if has_phase stow || has_phase growth; then
  start_postgres "$PG_PORT"
fi

SECTIONS=$WORK/sections.md
: >"$SECTIONS"
failed=()
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u '+%Y-%m-%d %H:%M UTC')
t_start=$SECONDS
trees=()

if has_phase stow; then
  tree_state stow
  bench_log "phase stow"
  fresh_dicomhub dicomhub-postgresql "$PG_DICOMHUB_PORT" "$(new_database)"
  fresh_dicomhub dicomhub-sqlite "$SQLITE_PORT"
  fresh_orthanc
  $PY benchmarks/growth.py stow --output "$SECTIONS" \
    --target "dicomhub-postgresql=http://127.0.0.1:$PG_DICOMHUB_PORT/v2" \
    --target "dicomhub-sqlite=http://127.0.0.1:$SQLITE_PORT/v2" \
    --target "orthanc=http://127.0.0.1:$ORTHANC_PORT/dicom-web" || failed+=(stow)
  stop_dicomhubs
  stop_service orthanc-extra
fi

if has_phase growth; then
  tree_state growth
  bench_log "phase growth ($sizes)"
  export DICOMHUB_FSYNC=false
  fresh_dicomhub dicomhub-sqlite "$SQLITE_PORT"
  fresh_dicomhub dicomhub-postgresql "$PG_DICOMHUB_PORT" "$(new_database)"
  unset DICOMHUB_FSYNC
  $PY benchmarks/growth.py qido --sizes "$sizes" --output "$SECTIONS" \
    --target "sqlite=http://127.0.0.1:$SQLITE_PORT/v2" \
    --target "postgresql=http://127.0.0.1:$PG_DICOMHUB_PORT/v2" || failed+=(growth)
  stop_dicomhubs
fi

if has_phase large; then
  tree_state large
  bench_log "phase large (${size_mb} MB)"
  stop_postgres # not needed here: its memory and disk I/O out of the way
  fresh_dicomhub dicomhub-sqlite "$SQLITE_PORT"
  fresh_orthanc
  $PY benchmarks/large.py --size-mb "$size_mb" --data-dir "$WORK" --output "$SECTIONS" \
    --target "dicomhub=http://127.0.0.1:$SQLITE_PORT/v2" --pid "dicomhub=$(cat "$CI_STATE/dicomhub-sqlite.pid")" \
    --log "dicomhub=$CI_STATE/dicomhub-sqlite.log" \
    --target "orthanc=http://127.0.0.1:$ORTHANC_PORT/dicom-web" --pid "orthanc=$(cat "$CI_STATE/orthanc-extra.pid")" \
    --log "orthanc=$CI_STATE/orthanc-extra/orthanc.log" || failed+=(large)
  stop_dicomhubs
  stop_service orthanc-extra
fi

pg_version=$("$(_svc_pg_bin)/postgres" --version 2>/dev/null || echo "?")
{
  echo
  echo "## Extra phases (issue 13): \`$command\`"
  echo
  echo "- started: $started; took $(((SECONDS - t_start) / 60)) min"
  echo "- machine: $(bench_machine)"
  echo "- dicomhub: $(bench_dicomhub_version) (commit per phase: $(IFS=,; echo "${trees[*]}" | sed 's/,/; /g')), \`dicomhub serve --host 127.0.0.1\`, fresh data dir and database per phase, default settings except \`DICOMHUB_FSYNC=false\` in the growth phase"
  echo "- PostgreSQL: $pg_version, scripts/services.sh's private cluster (fsync, synchronous_commit and full_page_writes off), a new database per phase"
  echo "- Orthanc: ${orthanc_version:-as in RESULTS.md (DICOMweb and GDCM plugins, HttpCompressionEnabled false)}"
  echo "- load average (1/5/15 min) before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg) (the machine is shared)"
  [ ${#failed[@]} -eq 0 ] || echo "- **phases that failed (exit status non-zero)**: ${failed[*]}"
  echo
  cat "$SECTIONS"
} >>"$RESULTS"
bench_log "appended to $RESULTS"
[ ${#failed[@]} -eq 0 ]
