#!/usr/bin/env bash
# The compatibility lane: a representative part of the suite on the oldest and the
# newest pytest and Python that pyproject.toml declares (pytest 8.0 on Python 3.9,
# the newest pytest on Python 3.13), in default mode.
#
#   bash ci/compat/lane.sh [--only NAME] [extra pytest args]
#
# Each combination gets a venv in /var/cache/pytest-isolate-compat, keyed by its
# interpreter, its pins and pyproject.toml (rebuilt only when one of them changes);
# the checkout itself is installed editable. Interpreters are found on PATH or in
# pyenv's versions (/root/.pyenv or $PYENV_ROOT). A missing interpreter fails the
# lane: it would otherwise pass without testing anything.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYTEST_PLUGINS PYTEST_ADDOPTS

CACHE=${COMPAT_CACHE:-/var/cache/pytest-isolate-compat}
# name python pytest-requirement
COMBINATIONS=(
    "oldest 3.9 pytest==8.0.2"
    "newest 3.13 pytest"
)
# Reports, modes, fixtures (shared ones too), messages, the link and the units: what
# depends on pytest's internals (report serialisation, fixtures, collection) and on the
# interpreter.
SELECTION=(tests/test_reports.py tests/test_modes.py tests/test_fixtures.py tests/test_messages.py
           tests/test_link.py tests/test_units.py tests/test_seam.py tests/test_shared_fixtures.py
           tests/test_flake.py)

only=
case ${1:-} in
    --only) only=$2; shift 2 ;;
    --only=*) only=${1#*=}; shift ;;
esac

say() { printf '%s\n' "$*" >&2; }

find_python() {   # VERSION -> path
    local v=$1 root=${PYENV_ROOT:-/root/.pyenv} candidate
    for candidate in "$(command -v "python$v" 2>/dev/null || true)" "$root"/versions/"$v".*/bin/python"$v"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        # a pyenv shim that has no such version installed fails here
        "$candidate" -c 'import venv, ensurepip' >/dev/null 2>&1 && { echo "$candidate"; return 0; }
    done
    return 1
}

final=0
summary=()
for combination in "${COMBINATIONS[@]}"; do
    read -r name version requirement <<<"$combination"
    [ -z "$only" ] || [ "$only" = "$name" ] || continue
    printf '\n==> compat %s: Python %s, %s\n' "$name" "$version" "$requirement"
    if ! py=$(find_python "$version"); then
        say "compat $name: no Python $version found (PATH, ${PYENV_ROOT:-/root/.pyenv}/versions)"
        summary+=("$name: FAILED (no Python $version)")
        final=1
        continue
    fi
    key=$( { echo "$requirement"; "$py" -VV; cat pyproject.toml; } | sha256sum | cut -c1-16)
    venv=$CACHE/$name-$key
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.ready" 2>/dev/null)" != "$key" ]; then
        say "building $venv"
        rm -rf "$venv"
        mkdir -p "$CACHE"
        "$py" -m venv "$venv"
        "$venv/bin/python" -m pip install -q -e ".[test]" "$requirement"
        echo "$key" >"$venv/.ready"
    else
        # the checkout may be another clone: point the editable install at this one
        "$venv/bin/python" -m pip install -q --no-deps -e .
    fi
    "$venv/bin/python" -c 'import sys, pytest; print(f"Python {sys.version.split()[0]}, pytest {pytest.__version__}")'
    set +e
    "$venv/bin/python" -m pytest "${SELECTION[@]}" -p no:cacheprovider -ra -m "not rootless_lane" "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then summary+=("$name: ok"); else summary+=("$name: FAILED (exit $rc)"); final=$rc; fi
done
printf '\n==> compat lane: summary\n'
printf '%s\n' "${summary[@]}"
exit "$final"
