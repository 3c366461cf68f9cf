#!/usr/bin/env bash
# Run the demo suite in real containers, from nothing but python3 (and git) on a
# Debian/Ubuntu machine:
#
#   ./scripts/demo.sh [extra pytest args]
#
# Creates (or reuses) the virtual environment .venv-demo at the repository root,
# installs this package into it (a normal, non-editable install: what a user gets),
# then runs `pytest --isolate -v demo/` and exits with pytest's status.
# If python3 cannot create a virtual environment (Debian/Ubuntu without
# python3-venv), python3-venv is installed with apt-get first (through sudo when
# not root). Set PYTHON to use another interpreter than `python3` on PATH.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

PY=${PYTHON:-python3}
VENV=.venv-demo
SCRIPT=demo.sh
# shellcheck source=scripts/venv.sh
source scripts/venv.sh

section "virtual environment $VENV"
ensure_venv

section "installing pytest-isolate into $VENV"
"$VENV/bin/python" -m pip install .

# The venv's pytest script rather than `python -m pytest`: `-m` would put the
# current directory (the repository) first on sys.path and import the package
# from the source tree instead of the installed copy.
section "pytest --isolate -v demo/"
set +e
"$VENV/bin/pytest" --isolate -v demo/ "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "demo.sh: pytest collected no tests" >&2
fi
exit "$rc"
