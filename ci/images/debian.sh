#!/usr/bin/env bash
# A real distribution image for the tests and benchmarks: a minimal Debian bookworm
# with python3 (debootstrap), as an OCI layout (umoci) and a docker-archive (skopeo).
#
#   bash ci/images/debian.sh            # builds it unless cached; prints its directory
#   bash ci/images/debian.sh --cached   # prints it only if it is cached (exit 1 if not)
#
# Kept in /var/cache/pytest-isolate-images/debian-bookworm-<key>/ ($IMAGES_CACHE), where
# <key> hashes this script (it holds every input: suite, variant, packages) and the
# suite and package list, so it is rebuilt only when they change:
#
#   <dir>/oci           an OCI layout, tag "bookworm" (one gzip layer)
#   <dir>/debian.tar    a docker-archive, debian:bookworm
#   <dir>/complete      written last: a directory without it is not trusted
#
# and debian-bookworm (a symlink) names the newest build, for the rootless lane of
# the tests, which runs with an emptied environment. Everything is world-readable, so
# that an unprivileged user can pull from it. The image's /etc/pytest-isolate-image
# holds <key>: a test can tell it runs in this image, not on this (Debian) machine.
#
# The image is built in a temporary directory beside the cache and renamed when
# complete: a failed or interrupted build leaves nothing that a later run trusts.
# Needs root (debootstrap), debootstrap, umoci and skopeo, and Debian's mirror
# ($DEBIAN_MIRROR; default: the mirror of this machine's apt sources).
set -euo pipefail

SUITE=bookworm
VARIANT=minbase
PACKAGES=python3
CACHE=${IMAGES_CACHE:-/var/cache/pytest-isolate-images}
PATH_IN_IMAGE=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

prog=debian.sh
say() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { say "error: $*"; exit 1; }

key=$( { cat "$(readlink -f "${BASH_SOURCE[0]}")"; echo "$SUITE $VARIANT $PACKAGES"; } | sha256sum | cut -c1-16)
name=debian-$SUITE-$key
dir=$CACHE/$name

publish() {   # the newest build, by a fixed name (renamed into place: never half there)
    ln -sfn "$name" "$CACHE/.link-$$" && mv -T "$CACHE/.link-$$" "$CACHE/debian-$SUITE"
}

if [ -f "$dir/complete" ]; then
    [ "$(readlink "$CACHE/debian-$SUITE" 2>/dev/null)" = "$name" ] || publish 2>/dev/null || true
    echo "$dir"
    exit 0
fi
[ "${1:-}" != "--cached" ] || { say "not built yet: run 'bash ci/images/debian.sh' (as root)"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap)"
for tool in debootstrap umoci skopeo; do
    command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install $tool)"
done
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then   # the first Debian archive this machine's apt uses
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
             grep -v '^[[:space:]]*#' | grep -oE '(https?://[^ ]+/debian)/?( |$)' | head -1 | tr -d ' ' || true)
    mirror=${mirror%/}
    mirror=${mirror:-http://deb.debian.org/debian}
fi

umask 022
mkdir -p "$CACHE"
chmod 755 "$CACHE"
tmp=$(mktemp -d "$CACHE/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
started=$SECONDS
say "building $dir: debootstrap --variant=$VARIANT --include=$PACKAGES $SUITE from $mirror"
if ! debootstrap --variant="$VARIANT" --include="$PACKAGES" "$SUITE" "$tmp/rootfs" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1; then
    tail -20 "$tmp/debootstrap.log" >&2
    die "debootstrap of $SUITE from $mirror failed (see above; is the mirror reachable? DEBIAN_MIRROR=URL picks another)"
fi
rootfs=$tmp/rootfs
# What an image does not carry: downloaded packages, package lists, logs, and device
# nodes (a runtime provides /dev; an unprivileged user could not unpack them).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
       "$rootfs"/dev/* "$rootfs"/run/* "$rootfs"/tmp/*
echo "$key" >"$rootfs/etc/pytest-isolate-image"

umoci init --layout "$tmp/oci"
umoci new --image "$tmp/oci:$SUITE"
umoci insert --image "$tmp/oci:$SUITE" "$rootfs" /
umoci config --image "$tmp/oci:$SUITE" --config.env "PATH=$PATH_IN_IMAGE" --config.cmd /bin/bash \
    --config.workingdir / --os linux --architecture "$(dpkg --print-architecture)"
umoci gc --layout "$tmp/oci"
skopeo copy --quiet "oci:$tmp/oci:$SUITE" "docker-archive:$tmp/debian.tar:debian:$SUITE"

rm -rf "$rootfs" "$tmp/debootstrap.log"
touch "$tmp/complete"
chmod -R a+rX "$tmp"
rm -rf "$dir"                    # a directory without "complete" (none is made so, but be sure)
mv -T "$tmp" "$dir" || [ -f "$dir/complete" ] || die "cannot rename $tmp to $dir"   # or a build beside us won
trap - EXIT
rm -rf "$tmp"
publish
# Builds of older keys (other versions of this script) and builds cut off by SIGKILL
# would pile up: a week after they were made, they go.
find "$CACHE" -mindepth 1 -maxdepth 1 \( -name "debian-$SUITE-*" ! -name "$name" ! -name "debian-$SUITE" \
     -o -name '.build-*' \) -mtime +7 -exec rm -rf {} + || true
say "built in $(( SECONDS - started )) s"
echo "$dir"
