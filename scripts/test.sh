#!/usr/bin/env bash
# Set up and run the test suite, from nothing but python3 (and git) on a
# Debian/Ubuntu machine:
#
#   ./scripts/test.sh [extra pytest args]
#
# 1. creates (or reuses) the virtual environment .venv at the repository root,
#    installing python3-venv with apt-get first if python3 cannot make one;
# 2. installs this package editable with its test and docs extras;
# 3. runs `pytest tests -p no:cacheprovider -ra [extra args]` twice: in the default
#    mode, then with mode "fresh" as every inner run's default (with the Debian image
#    of ci/images/debian.sh when it is cached: PYTEST_ISOLATE_DEBIAN_IMAGE);
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

# tests/test_debian_image.py runs in the Debian image of ci/images/debian.sh (built as
# root; .ci/run does): the cached one is used when there is one, else those tests skip.
if [ -z "${PYTEST_ISOLATE_DEBIAN_IMAGE:-}" ] && debian_image=$(bash ci/images/debian.sh --cached 2>/dev/null); then
    export PYTEST_ISOLATE_DEBIAN_IMAGE=$debian_image
fi
echo "Debian image: ${PYTEST_ISOLATE_DEBIAN_IMAGE:-none cached (tests/test_debian_image.py skips; bash ci/images/debian.sh builds it)}"

log=$(mktemp)
trap 'rm -f "$log"' EXIT

color=()
[ -t 1 ] && color=(--color=yes)   # tee below would otherwise turn colours off

# The whole suite runs twice: in the default mode, then with "fresh" as the
# default mode of every inner run (PYTEST_ISOLATE_SUITE_MODE, see tests/conftest.py).
# The rootless lane (the suite again as an unprivileged user) runs in the first pass.
run_pass() {   # NAME ENV-ASSIGNMENT... -- PYTEST-ARGS...
    local name=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    section "pytest tests -p no:cacheprovider -ra $* ($name)"
    set +e
    env ${envs[@]+"${envs[@]}"} "$VPY" -m pytest tests -p no:cacheprovider -ra ${color[@]+"${color[@]}"} "$@" 2>&1 |
        tee -a "$log"
    local rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "test.sh: pytest collected no tests (exit 5): counted as a failure" >&2
    fi
    return "$rc"
}
pytest_rc=0
run_pass "default mode" -- "$@" || pytest_rc=$?
fresh_rc=0
run_pass "fresh mode" PYTEST_ISOLATE_SUITE_MODE=fresh PYTEST_ISOLATE_NO_ROOTLESS_LANE=1 -- "$@" || fresh_rc=$?

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
for pass_rc in "default mode:$pytest_rc" "fresh mode:$fresh_rc"; do
    if [ "${pass_rc##*:}" -eq 0 ]; then
        echo "pytest, ${pass_rc%%:*}: ok"
    else
        echo "pytest, ${pass_rc%%:*}: FAILED (exit ${pass_rc##*:})"
    fi
done
# pytest's own closing line last, so that it is the last thing printed.
sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^=+ .* in [0-9.]+s( \([0-9:]+\))? =+$' || true

if [ "$pytest_rc" -ne 0 ]; then
    exit "$pytest_rc"
fi
if [ "$fresh_rc" -ne 0 ]; then
    exit "$fresh_rc"
fi
exit "$docs_rc"
