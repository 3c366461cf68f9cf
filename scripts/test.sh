#!/usr/bin/env bash
# Set up and run the test suite, from nothing but python3 (and git) on a
# Debian/Ubuntu machine:
#
#   ./scripts/test.sh [extra pytest args]
#
# 1. creates (or reuses) the virtual environment .venv at the repository root,
#    installing python3-venv with apt-get first if python3 cannot make one;
# 2. installs this package editable with its test and docs extras;
# 3. runs `pytest tests -p no:cacheprovider -ra [extra args]`;
# 4. builds the docs with `mkdocs build --strict` (when mkdocs.yml exists).
# Exits non-zero if any step fails; pytest collecting no tests (exit 5) is a
# failure too. Set PYTHON to use another interpreter than `python3` on PATH.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

PY=${PYTHON:-python3}
VENV=.venv
SCRIPT=test.sh
# shellcheck source=scripts/venv.sh
source scripts/venv.sh

section "virtual environment $VENV"
ensure_venv
VPY=$VENV/bin/python

section "installing pytest-isolate (editable) with extras test,docs"
"$VPY" -m pip install -e ".[test,docs]"

log=$(mktemp)
trap 'rm -f "$log"' EXIT

color=()
[ -t 1 ] && color=(--color=yes)   # tee below would otherwise turn colours off

section "pytest tests -p no:cacheprovider -ra $*"
set +e
"$VPY" -m pytest tests -p no:cacheprovider -ra ${color[@]+"${color[@]}"} "$@" 2>&1 | tee "$log"
pytest_rc=${PIPESTATUS[0]}
set -e
if [ "$pytest_rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests (exit 5): counted as a failure" >&2
fi

docs_rc=0
docs_state="skipped (no mkdocs.yml)"
if [ -f mkdocs.yml ]; then
    section "mkdocs build --strict"
    set +e
    "$VPY" -m mkdocs build --strict
    docs_rc=$?
    set -e
    if [ "$docs_rc" -eq 0 ]; then docs_state="ok"; else docs_state="FAILED (exit $docs_rc)"; fi
fi

section "summary"
echo "docs:   $docs_state"
if [ "$pytest_rc" -eq 0 ]; then
    echo "pytest: ok"
else
    echo "pytest: FAILED (exit $pytest_rc)"
fi
# pytest's own closing line last, so that it is the last thing printed.
closing=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^=+ .* in [0-9.]+s( \([0-9:]+\))? =+$' | tail -n 1 || true)
[ -z "$closing" ] || echo "$closing"

if [ "$pytest_rc" -ne 0 ]; then
    exit "$pytest_rc"
fi
exit "$docs_rc"
