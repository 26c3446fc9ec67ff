#!/usr/bin/env bash
# Install qkdissect with its test extras (and Debian's chromium for the browser tests), run ruff, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_metrics.py`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv || exit 1
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[text,test]' || exit 1

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "installing Debian chromium for the browser tests"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || echo "WARNING: could not install chromium; browser tests will be skipped"
fi

echo "ruff check (pyflakes, bugbear, import rules; config in pyproject.toml)"
python -m ruff check src tests bench scripts || { echo "ruff check failed"; exit 1; }

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests (exit code 5): nothing was run; treating as success, but the suite should never be empty."
  exit 0
fi
exit "$status"
