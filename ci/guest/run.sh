#!/usr/bin/env bash
# Run a command inside a cgroup-v2 Linux guest (qemu, TCG) whose root is this
# host's root, shared read-only; print its output and exit with its status.
#
#   bash ci/guest/run.sh [OPTIONS] -- COMMAND [ARG...]
#
# Options:
#   --user USER       run COMMAND as USER (setpriv), in a subtree delegated to USER as
#                     systemd's user@UID.service would be (see ci/guest/README.md)
#   --timeout SECONDS kill the guest after SECONDS (default 1200): exit 124
#   --env NAME[=VAL]  pass NAME from this environment (or set it to VAL); repeatable
#   --share DIR       share the host directory DIR writable, at the same path; repeatable
#   --cgroup PATH     cgroup of COMMAND, relative to the cgroup2 root (default: / as root,
#                     user.slice/user-UID.slice/user@UID.service/app.slice/ci.scope with --user)
#   --hostname NAME   the guest's hostname (default: pytest-isolate-guest)
#   --mem MB          guest memory (default 2048)
#   --smp N           guest CPUs (default 2)
#   --kernel KVER     kernel version from /boot (default: the newest with modules)
#
# Must run as root. Installs qemu-system-x86, linux-image-amd64, busybox-static, kmod
# (and cpio, xz-utils) with apt-get when missing; caches the initramfs under
# /var/cache/pytest-isolate-guest/KVER/. Exit status: COMMAND's; 124 after --timeout;
# 125 when the guest could not run COMMAND (the reason and console log are printed
# on stderr); 2 for a usage error.
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
CACHE_ROOT=/var/cache/pytest-isolate-guest
# veth bridge sch_netem sch_tbf: private networks and netem= (tests/test_networks.py);
# a user namespace cannot have them loaded on demand.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         9pnet 9pnet_virtio netfs fscache 9p overlay veth bridge sch_netem sch_tbf)
ESSENTIAL_MODULES=" virtio_pci 9pnet_virtio 9p "

prog=run.sh
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 125; }
usage() { printf '%s: %s\nusage: bash ci/guest/run.sh [--user USER] [--timeout SECONDS] [--env NAME[=VAL]] [--share DIR] [--cgroup PATH] [--hostname NAME] [--mem MB] [--smp N] [--kernel KVER] -- COMMAND [ARG...]\n' "$prog" "$*" >&2; exit 2; }
log() { [ -n "${GUEST_VERBOSE:-}" ] || return 0; printf '%s: %s\n' "$prog" "$*" >&2; }

# -- arguments ----------------------------------------------------------------------
user="" timeout=1200 cgroup="" hostname=pytest-isolate-guest mem=2048 smp=2 kver=""
env_args=() shares=()
while [ $# -gt 0 ]; do
    case $1 in
        --user) [ $# -ge 2 ] || usage "--user needs a value"; user=$2; shift 2 ;;
        --user=*) user=${1#*=}; shift ;;
        --timeout) [ $# -ge 2 ] || usage "--timeout needs a value"; timeout=$2; shift 2 ;;
        --timeout=*) timeout=${1#*=}; shift ;;
        --env) [ $# -ge 2 ] || usage "--env needs a value"; env_args+=("$2"); shift 2 ;;
        --env=*) env_args+=("${1#*=}"); shift ;;
        --share) [ $# -ge 2 ] || usage "--share needs a value"; shares+=("$2"); shift 2 ;;
        --share=*) shares+=("${1#*=}"); shift ;;
        --cgroup) [ $# -ge 2 ] || usage "--cgroup needs a value"; cgroup=$2; shift 2 ;;
        --cgroup=*) cgroup=${1#*=}; shift ;;
        --hostname) [ $# -ge 2 ] || usage "--hostname needs a value"; hostname=$2; shift 2 ;;
        --hostname=*) hostname=${1#*=}; shift ;;
        --mem) [ $# -ge 2 ] || usage "--mem needs a value"; mem=$2; shift 2 ;;
        --mem=*) mem=${1#*=}; shift ;;
        --smp) [ $# -ge 2 ] || usage "--smp needs a value"; smp=$2; shift 2 ;;
        --smp=*) smp=${1#*=}; shift ;;
        --kernel) [ $# -ge 2 ] || usage "--kernel needs a value"; kver=$2; shift 2 ;;
        --kernel=*) kver=${1#*=}; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) usage "unknown option or missing '--' before the command: $1" ;;
    esac
done
[ $# -gt 0 ] || usage "no command given (after --)"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || usage "--timeout: a whole number of seconds > 0, got '$timeout'"
[[ $mem =~ ^[1-9][0-9]*$ ]] || usage "--mem: a number of MiB, got '$mem'"
[[ $smp =~ ^[1-9][0-9]*$ ]] || usage "--smp: a number of CPUs, got '$smp'"
[[ $hostname =~ ^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$ ]] || usage "--hostname: not a host name: '$hostname'"
[ "$(id -u)" -eq 0 ] || die "must run as root (it boots qemu with the host root shared through virtfs)"
if [ -n "$user" ]; then
    getent passwd "$user" >/dev/null || die "no user '$user' on this host (the guest shares its /etc/passwd)"
    uid=$(id -u "$user")
    [ "$uid" -ne 0 ] || user=""   # --user root: plain root run
fi
if [ -n "$user" ] && [ -z "$cgroup" ]; then
    cgroup="user.slice/user-$uid.slice/user@$uid.service/app.slice/ci.scope"
fi
cgroup=${cgroup#/}
[[ $cgroup != *..* ]] || usage "--cgroup: no '..' please: '$cgroup'"

# -- packages -----------------------------------------------------------------------
need=()
for p in qemu-system-x86 linux-image-amd64 busybox-static kmod cpio xz-utils; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    printf '%s: installing %s\n' "$prog" "${need[*]}" >&2
    {
        DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 update &&
        DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y \
            --no-install-recommends "${need[@]}"
    } >&2 || die "apt-get install ${need[*]} failed"
fi

# -- kernel -------------------------------------------------------------------------
if [ -z "$kver" ]; then
    kver=$(for k in /boot/vmlinuz-*; do k=${k#/boot/vmlinuz-}; [ -d "/lib/modules/$k" ] && echo "$k"; done |
           sort -V | tail -n 1)
fi
[ -n "$kver" ] && [ -r "/boot/vmlinuz-$kver" ] && [ -d "/lib/modules/$kver" ] ||
    die "no kernel in /boot with modules in /lib/modules${kver:+ (asked: $kver)}"

# -- initramfs (cached per kernel version) ------------------------------------------
build_initramfs() {   # $1: output file
    local out=$1 stage m line ko rel seen=" "
    stage=$(mktemp -d /tmp/pytest-isolate-guest-initramfs.XXXXXX)
    mkdir -p "$stage"/{bin,dev,proc,newroot,lib/modules}
    cp /bin/busybox "$stage/bin/busybox"
    mknod -m 600 "$stage/dev/console" c 5 1
    mknod -m 666 "$stage/dev/null" c 1 3
    install -m 0755 "$HERE/initramfs-init.sh" "$stage/init"
    : >"$stage/modules.order"
    for m in "${MODULES[@]}"; do
        local deps
        if ! deps=$(modprobe -S "$kver" --show-depends "$m" 2>&1); then
            if [[ $ESSENTIAL_MODULES == *" $m "* ]]; then
                rm -rf "$stage"; die "module $m of kernel $kver: $deps"
            fi
            printf '%s: note: module %s not in kernel %s, skipped\n' "$prog" "$m" "$kver" >&2
            continue
        fi
        while read -r line; do
            case $line in
                builtin\ *) continue ;;       # built into the kernel: nothing to load
                insmod\ *) ko=${line#insmod }; ko=${ko%% *} ;;
                *) continue ;;
            esac
            [[ $seen == *" $ko "* ]] && continue
            seen+="$ko "
            rel=${ko#*/lib/modules/"$kver"/}
            mkdir -p "$stage/lib/modules/$(dirname "$rel")"
            case $ko in   # busybox insmod takes plain .ko files
                *.ko.xz) xz -dc "$ko" >"$stage/lib/modules/${rel%.xz}"; rel=${rel%.xz} ;;
                *.ko.zst) zstd -qdc "$ko" >"$stage/lib/modules/${rel%.zst}"; rel=${rel%.zst} ;;
                *.ko.gz) gzip -dc "$ko" >"$stage/lib/modules/${rel%.gz}"; rel=${rel%.gz} ;;
                *) cp "$ko" "$stage/lib/modules/$rel" ;;
            esac
            echo "$rel" >>"$stage/modules.order"
        done <<<"$deps"
    done
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet | gzip -1) >"$out.tmp.$$" ||
        { rm -rf "$stage" "$out.tmp.$$"; die "cannot build the initramfs"; }
    mv "$out.tmp.$$" "$out"
    rm -rf "$stage"
}

# The kernel as an uncompressed ELF (vmlinux), booted through PVH: under TCG the
# bzImage's own decompressor takes ~4 s of every boot. Falls back to the bzImage
# when the kernel has no PVH entry or the image cannot be unpacked.
extract_vmlinux() {   # $1: bzImage, $2: output
    local img=$1 out=$2 magic pos tool
    for magic in '\xfd7zXZ\x00:xz -dc' '\x28\xb5\x2f\xfd:zstd -qdc' '\x1f\x8b\x08:gzip -dc'; do
        tool=${magic#*:}
        command -v "${tool%% *}" >/dev/null || continue
        for pos in $(LC_ALL=C grep -obUaP "${magic%%:*}" "$img" 2>/dev/null | head -n 3 | cut -d: -f1); do
            tail -c +$((pos + 1)) "$img" | $tool >"$out.tmp.$$" 2>/dev/null || true
            if [ "$(head -c 4 "$out.tmp.$$" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                mv "$out.tmp.$$" "$out"
                return 0
            fi
        done
    done
    rm -f "$out.tmp.$$"
    return 1
}

key=$( { cat "$HERE/initramfs-init.sh"; printf '%s\n' "${MODULES[@]}"; cat /lib/modules/"$kver"/modules.dep;
         dpkg-query -W -f='${Version}' busybox-static; } | sha256sum | cut -c1-16)
cache=$CACHE_ROOT/$kver
initrd=$cache/initramfs-$key.cpio.gz
kernel=/boot/vmlinuz-$kver
pvh=no
grep -qx 'CONFIG_PVH=y' "/boot/config-$kver" 2>/dev/null && pvh=yes
vmlinux_stale() {   # no usable cached vmlinux (nor a record that there can be none)
    [ $pvh = yes ] || return 1
    if [ -s "$cache/vmlinux" ]; then [ "$cache/vmlinux" -ot "$kernel" ]; else [ ! -e "$cache/vmlinux.none" ]; fi
}
if [ ! -s "$initrd" ] || vmlinux_stale; then
    mkdir -p "$cache"
    exec 8>"$cache/.lock"
    flock 8
    if [ ! -s "$initrd" ]; then
        printf '%s: building the initramfs for kernel %s\n' "$prog" "$kver" >&2
        find "$cache" -maxdepth 1 -name 'initramfs-*.cpio.gz*' -delete
        build_initramfs "$initrd"
    fi
    if vmlinux_stale; then
        rm -f "$cache/vmlinux" "$cache/vmlinux.none"
        extract_vmlinux "$kernel" "$cache/vmlinux" || : >"$cache/vmlinux.none"
    fi
    exec 8>&-
fi
[ $pvh = yes ] && [ -s "$cache/vmlinux" ] && kernel=$cache/vmlinux

# -- the job ------------------------------------------------------------------------
cwd=$(pwd -P)
ctl=$(mktemp -d "${TMPDIR:-/tmp}/pytest-isolate-guest.XXXXXX")
qpid=""
cleanup() {
    trap '' PIPE   # our reader may be gone (killed by a timeout): still clean up
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then kill -TERM "$qpid" 2>/dev/null || true; fi
    [ -z "${catpid:-}" ] || kill "$catpid" 2>/dev/null || true
    rm -rf "$ctl"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cp "$HERE/stage2.sh" "$ctl/stage2.sh"

# the environment: a fixed set of names from here, then --env
declare -A envmap=()
while IFS= read -r -d '' kv; do
    name=${kv%%=*}
    case $name in
        PATH|HOME|USER|LOGNAME|CI|LANG|LANGUAGE|LC_*|TZ|PYTEST_*|PYTHON*|PIP_*|VIRTUAL_ENV|\
        NO_COLOR|FORCE_COLOR|PY_COLORS|COLUMNS|SOURCE_DATE_EPOCH|GITHUB_*|RUNNER_*)
            envmap[$name]=${kv#*=} ;;
    esac
done < <(env -0)
tty=0
if [ -t 1 ]; then
    tty=1
    envmap[TERM]=${TERM:-xterm}
    read -r rows cols < <(stty size </dev/tty 2>/dev/null || echo "24 80")
else
    envmap[TERM]=dumb
    rows=24 cols=80
fi
if [ -n "$user" ]; then   # as a login would set them; --env overrides
    IFS=: read -r _ _ _ _ _ uhome _ < <(getent passwd "$user")
    envmap[HOME]=$uhome envmap[USER]=$user envmap[LOGNAME]=$user
    envmap[XDG_RUNTIME_DIR]=/run/user/$uid
fi
for a in ${env_args[@]+"${env_args[@]}"}; do
    name=${a%%=*}
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || usage "--env: not a variable name: '$name'"
    if [[ $a == *=* ]]; then
        envmap[$name]=${a#*=}
    elif [ -n "${!name+x}" ]; then
        envmap[$name]=${!name}
    else
        unset "envmap[$name]"
    fi
done
job_env=()
for name in "${!envmap[@]}"; do job_env+=("$name=${envmap[$name]}"); done

share_paths=() virtfs=()
for i in "${!shares[@]}"; do
    d=$(cd "${shares[$i]}" 2>/dev/null && pwd -P) || die "--share: no directory ${shares[$i]}"
    share_paths+=("$d")
    virtfs+=(-virtfs "local,path=$d,mount_tag=share$i,security_model=passthrough,multidevs=remap")
done
# The guest mounts tmpfs on /tmp and /run: a working directory there must lie in a share.
case $cwd/ in
    /tmp/*|/run/*)
        shared=no
        for d in ${share_paths[@]+"${share_paths[@]}"}; do
            case $cwd/ in "$d"/*) shared=yes ;; esac
        done
        [ $shared = yes ] || die "the working directory $cwd is hidden in the guest (tmpfs on /tmp and /run): run from elsewhere, or --share it" ;;
esac

{
    printf 'JOB_ARGV=('; printf '%q ' "$@"; printf ')\n'
    printf 'JOB_ENV=('; for e in ${job_env[@]+"${job_env[@]}"}; do printf '%q ' "$e"; done; printf ')\n'
    printf 'JOB_SHARES=('; for d in ${share_paths[@]+"${share_paths[@]}"}; do printf '%q ' "$d"; done; printf ')\n'
    printf 'JOB_CWD=%q\nJOB_USER=%q\nJOB_CGROUP=%q\nJOB_HOSTNAME=%q\n' "$cwd" "$user" "$cgroup" "$hostname"
    printf 'JOB_TTY=%q\nJOB_ROWS=%q\nJOB_COLS=%q\n' "$tty" "$rows" "$cols"
} >"$ctl/job.sh"

# -- boot -----------------------------------------------------------------------------
# ttyS0: the kernel's console, into console.log (shown when something goes wrong);
# ttyS1: the command's output, through a FIFO to our stdout.
mkfifo "$ctl/out"
cat "$ctl/out" &
catpid=$!
log "kernel $kernel, initramfs $initrd, control dir $ctl"
start=$EPOCHREALTIME
qemu-system-x86_64 -name pytest-isolate-guest \
    -accel tcg -cpu max -m "$mem" -smp "$smp" -nographic -monitor none -no-reboot \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 ${GUEST_DEBUG:+printk.time=1 ignore_loglevel }quiet" \
    -serial "file:$ctl/console.log" -serial "file:$ctl/out" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
    -virtfs "local,path=$ctl,mount_tag=pigctl,security_model=passthrough,multidevs=remap" \
    ${virtfs[@]+"${virtfs[@]}"} \
    -nic none </dev/null >"$ctl/qemu.log" 2>&1 &
qpid=$!

# the watchdog: poll, so that a signal to us is handled at once
timed_out=0
deadline=$(( $(date +%s) + timeout ))
while kill -0 "$qpid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        timed_out=1
        kill -TERM "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$qpid" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
qrc=0
wait "$qpid" || qrc=$?
qpid=""
wait "$catpid" 2>/dev/null || true
catpid=""
log "qemu ran $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"

show_console() {
    printf '%s: --- guest console (last 40 lines) ---\n' "$prog" >&2
    tr -d '\r' <"$ctl/console.log" 2>/dev/null | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' | tail -n 40 >&2 || true
    if [ -s "$ctl/qemu.log" ]; then
        printf '%s: --- qemu ---\n' "$prog" >&2
        tail -n 20 "$ctl/qemu.log" >&2
    fi
}
[ -z "${GUEST_DEBUG:-}" ] || tr -d '\r' <"$ctl/console.log" >&2
if [ "$timed_out" = 1 ]; then
    printf '%s: error: timeout: the command did not finish within %s s (--timeout); qemu was killed\n' "$prog" "$timeout" >&2
    show_console
    exit 124
fi
if [ ! -s "$ctl/status" ]; then
    printf '%s: error: the guest stopped without reporting an exit status (qemu exit %s)\n' "$prog" "$qrc" >&2
    show_console
    exit 125
fi
rc=$(cat "$ctl/status")
[[ $rc =~ ^[0-9]+$ ]] || { printf '%s: error: bad status from the guest: %s\n' "$prog" "$rc" >&2; exit 125; }
if [ "$rc" = 125 ] && grep -q '^guest: error:' "$ctl/console.log" 2>/dev/null; then
    show_console
fi
exit "$rc"
