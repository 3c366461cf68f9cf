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
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

section() { printf '\n==> %s\n' "$*"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $* (install sudo, or run this as root)"
    fi
}

install_venv_support() {
    command -v apt-get >/dev/null 2>&1 ||
        die "$PY cannot create virtual environments and apt-get is not available: install the venv module (and ensurepip) for $PY"
    local ver pkgs=(python3-venv)
    ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    section "installing python3-venv with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    # python3-venv pulls the default python3's venv; name the exact version as
    # well, in case python3 is not the distribution's default version.
    if [[ "$(dpkg-query -W -f='${Status}' "python${ver}-venv" 2>/dev/null || true)" != *"ok installed" ]] &&
        apt-cache show "python${ver}-venv" >/dev/null 2>&1; then
        pkgs+=("python${ver}-venv")
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}"
}

venv_usable() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" -c 'import sys, pip; sys.exit(sys.prefix == sys.base_prefix)' >/dev/null 2>&1
}

ensure_venv() {
    command -v "$PY" >/dev/null 2>&1 || die "$PY not found: install python3 (>= 3.9) first"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
        die "$("$PY" --version 2>&1) is too old: pytest-isolate needs Python >= 3.9"
    if venv_usable; then
        echo "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
        return
    fi
    rm -rf "$VENV"
    local installed=no
    if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        install_venv_support
        installed=yes
    fi
    if ! "$PY" -m venv "$VENV"; then
        rm -rf "$VENV"
        [ "$installed" = no ] || die "$PY -m venv still fails after installing python3-venv"
        install_venv_support
        "$PY" -m venv "$VENV" || die "$PY -m venv fails"
    fi
    venv_usable || die "$VENV was created but has no working pip"
}

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
