# Stage 2 of the guest, run by bash as PID 1 after switch_root into the host's root
# (9p, read-only). ci/guest/run.sh copies this file into the run's control share,
# which the initramfs mounted at /run/pytest-isolate-guest together with job.sh
# (the command, its environment, cwd, user, cgroup, shares, hostname).
#
# Sets up the rest of a small Linux system with a cgroup v2 hierarchy, runs the
# command, writes its exit status to the control share and powers off.
# Not meant to be run by hand: as PID 1 of the guest only.

CTL=/run/pytest-isolate-guest
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
OUT=/dev/ttyS1            # run.sh turns this serial port into its stdout

poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 30               # sysrq powers off asynchronously; never return as PID 1
}

say() { printf 'guest: %s\n' "$*" >&2; printf 'guest: %s\n' "$*" >"$OUT" 2>/dev/null; }

die() {
    say "error: $*"
    echo 125 >"$CTL/status"
    poweroff_now
}

exec </dev/null >/dev/console 2>&1
stamp() { read -r up _ </proc/uptime 2>/dev/null; echo "stage2: [$up] $*"; }

# proc, sysfs, cgroup2 (nsdelegate,memory_recursiveprot), /dev (devtmpfs, pts, shm,
# mqueue), tmpfs on /tmp, /var/tmp and /run: mounted by the initramfs already.

# shellcheck source=/dev/null
. "$CTL/job.sh" || die "cannot read job.sh"

# writable shares, each at its host path (mkdir only works under the tmpfs mounts)
for i in "${!JOB_SHARES[@]}"; do
    dir=${JOB_SHARES[$i]}
    mkdir -p "$dir" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "share$i" "$dir" ||
        die "cannot mount the share $dir (9p tag share$i)"
done

echo "$JOB_HOSTNAME" >/proc/sys/kernel/hostname

# -- cgroups -------------------------------------------------------------------------
CG=/sys/fs/cgroup
CONTROLLERS="+cpu +memory +pids"
enable() { echo "$CONTROLLERS" >"$1/cgroup.subtree_control" || die "cannot enable $CONTROLLERS in $1"; }
enable "$CG"

uid=0 gid=0
if [ -n "$JOB_USER" ]; then
    uid=$(id -u "$JOB_USER") && gid=$(id -g "$JOB_USER") || die "no user $JOB_USER"
    # what systemd's user@UID.service (Delegate=cpu memory pids) gives a user
    slice=$CG/user.slice/user-$uid.slice
    service=$slice/user@$uid.service
    mkdir -p "$service" || die "mkdir $service"
    enable "$CG/user.slice"
    enable "$slice"
    chown "$uid:$gid" "$service" "$service/cgroup.procs" "$service/cgroup.subtree_control" \
        "$service/cgroup.threads" || die "cannot delegate $service"
    enable "$service"
    mkdir -p /run/user && mkdir -m 0700 "/run/user/$uid" && chown "$uid:$gid" "/run/user/$uid"
fi

target=$CG/${JOB_CGROUP#/}
target=${target%/}
if [ "$target" != "$CG" ]; then
    mkdir -p "$target" || die "mkdir $target"
    # controllers down the path (not in the leaf itself: it gets the process)
    dir=${target%/*}
    parents=()
    while [ "${#dir}" -gt "${#CG}" ]; do parents=("$dir" "${parents[@]}"); dir=${dir%/*}; done
    for dir in "${parents[@]}"; do enable "$dir"; done
    if [ -n "$JOB_USER" ]; then
        case $target/ in
            "$service"/*)   # inside the delegated subtree: the user's own, as if it made it
                dir=$target
                while [ "$dir" != "$service" ]; do
                    chown "$uid:$gid" "$dir" "$dir/cgroup.procs" "$dir/cgroup.subtree_control" \
                        "$dir/cgroup.threads" || die "chown $dir"
                    dir=${dir%/*}
                done ;;
        esac
    fi
fi

# -- the command ---------------------------------------------------------------------
cd "$JOB_CWD" 2>/dev/null || die "cannot change to the working directory $JOB_CWD (under /tmp or /run it is hidden by the guest's tmpfs)"

stty -F "$OUT" raw -echo 2>/dev/null
if [ "$JOB_TTY" = 1 ]; then
    stty -F "$OUT" rows "${JOB_ROWS:-24}" cols "${JOB_COLS:-80}" 2>/dev/null
    exec 3>"$OUT"
else
    # a pipe, as under CI: the command does not see a terminal
    mkfifo -m 0600 /run/pytest-isolate-guest.out
    cat /run/pytest-isolate-guest.out >"$OUT" &
    copier=$!
    exec 3>/run/pytest-isolate-guest.out
fi

as_user=()
if [ -n "$JOB_USER" ]; then
    as_user=(setpriv "--reuid=$uid" "--regid=$gid" --init-groups --)
fi

stamp "starting the command"
(
    if [ "$target" != "$CG" ]; then
        echo "$BASHPID" >"$target/cgroup.procs" || exit 125
    fi
    exec env -i "${JOB_ENV[@]}" "${as_user[@]}" "${JOB_ARGV[@]}"
) </dev/null >&3 2>&3 &
cmd=$!
exec 3>&-
wait "$cmd"
rc=$?
stamp "command exited $rc"
[ "$rc" -ne 125 ] || [ "$target" = "$CG" ] || say "cannot move the command into $target (or it exited 125)"

if [ -n "${copier:-}" ]; then
    # the copier ends when every writer has closed the pipe; processes the command
    # left behind may keep it open: give them 2 s
    end=$((SECONDS + 2))
    while kill -0 "$copier" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.1; done
    kill "$copier" 2>/dev/null
    wait "$copier" 2>/dev/null
fi
stty -F "$OUT" raw 2>/dev/null   # tcsetattr(TCSADRAIN): waits until the port has sent everything

echo "$rc" >"$CTL/status"
stamp "powering off"
poweroff_now
