#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine and run it:
#   .venv (editable install with the test extras), Debian packages (PostgreSQL, Orthanc + DICOMweb
#   plugin, dcmtk, Chromium), the OpenID provider of the auth tests, the FHIR server of the DICOMcast
#   tests and OHIF Viewer (npm), a private
#   PostgreSQL on 127.0.0.1:55432, then pytest -n 2.
# Usage: bash scripts/test.sh [pytest args...]
# Environment: PYTHON (interpreter used to create .venv, default python3), CI_STATE (service state
# dir, default /tmp/dicomhub-services), DICOMHUB_TEST_PG_PORT (default 55432).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { echo "[test.sh] $*" >&2; }

# 1. Python environment. Reinstall when pyproject.toml changed since the last install.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "${PYTHON:-python3}" -m venv .venv
  rm -f .venv/.installed
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  log "installing dicomhub with test extras into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch .venv/.installed
fi

# 2. Debian packages (apt only when something is missing) and services.
# shellcheck source=scripts/services.sh
source scripts/services.sh
ensure_packages
ensure_oidc_provider tests/support/oidc
ensure_azurite
ensure_fhir_server tests/support/fhir
ensure_ohif
trap stop_all EXIT
start_postgres "${DICOMHUB_TEST_PG_PORT:-55432}"

# Tests that need Orthanc start their own private instance from Python.
if [ -x /usr/sbin/Orthanc ]; then
  export DICOMHUB_TEST_ORTHANC=1
fi

# 3. Tests. pytest exit code 5 ("no tests collected") counts as a failure.
rc=0
.venv/bin/python -m pytest -n 2 "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  log "pytest collected no tests: failing"
  rc=1
fi

# 4. The storage-relevant tests again with every test server's files on S3 (SeaweedFS) and on Azure Blob
# (Azurite); the tests start both stores themselves. Only when no pytest arguments narrowed the run.
STORAGE_TESTS=(tests/test_stow.py tests/test_wado.py tests/test_frames.py tests/test_bulkdata.py tests/test_delete.py
  tests/test_metadata.py tests/test_rendered.py)
if [ "$#" -eq 0 ]; then
  for backend in s3 azure; do
    log "storage tests on DICOMHUB_TEST_BLOB=$backend"
    DICOMHUB_TEST_BLOB=$backend .venv/bin/python -m pytest -n 2 -q "${STORAGE_TESTS[@]}" || rc=1
  done
fi
# 5. The whole suite again with authentication on (a real OpenID provider; every test client sends an admin token),
# on SQLite: every route behaves the same behind the auth middleware. Only when no pytest arguments narrowed the run.
if [ "$#" -eq 0 ]; then
  log "whole suite with DICOMHUB_TEST_AUTH=1 (SQLite)"
  DICOMHUB_TEST_AUTH=1 .venv/bin/python -m pytest -n 2 -q -k "not postgres" || rc=1
fi
exit "$rc"
