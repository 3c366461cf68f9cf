# Shared by demo.sh and test.sh (sourced, not run): a virtual environment from
# nothing but python3, installing python3-venv with apt-get when python3 lacks it.
# The caller sets PY (the interpreter), VENV (the directory) and SCRIPT (its name).
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

section() { printf '\n==> %s\n' "$*"; }
die() { printf '%s: error: %s\n' "$SCRIPT" "$*" >&2; exit 1; }

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

