#!/bin/busybox sh
# /init of the guest's initramfs (built by ci/guest/run.sh; busybox-static + a few
# modules). Loads the virtio/9p/overlay modules listed in /modules.order, mounts the
# host's root (9p tag "hostroot") read-only at /newroot, a tmpfs on its /run with
# the run's control share (9p tag "pigctl") at /run/pytest-isolate-guest, and
# switch_root's into /run/pytest-isolate-guest/stage2.sh (bash, from the host root).
# Any failure here ends PID 1, the kernel panics (panic=-1), qemu exits
# (-no-reboot) and run.sh reports the console log.
/bin/busybox --install -s /bin
export PATH=/bin

mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc

fail() {
    echo "guest-init: error: $*"
    echo o >/proc/sysrq-trigger
    sleep 10
    exit 1
}

while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "/lib/modules/$ko" || fail "insmod $ko"
done </modules.order

# msize: 9p's default (8 KiB) makes every read a round trip; the virtio transport
# takes up to 512 KiB. cache=loose: the root is read-only and does not change under
# the guest, so dentries, attributes and pages may be cached (much faster imports).
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot ||
    fail "cannot mount the host root (9p tag hostroot)"
# the rest of the system, mounted here by the static busybox: the same with the host's
# (dynamically linked) mount over 9p takes ~0.3 s each under TCG
R=/newroot
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $R/run || fail "tmpfs on /run"
mkdir -p $R/run/pytest-isolate-guest $R/run/lock && chmod 1777 $R/run/lock
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 pigctl $R/run/pytest-isolate-guest ||
    fail "cannot mount the control share (9p tag pigctl)"
[ -f $R/run/pytest-isolate-guest/stage2.sh ] || fail "no stage2.sh in the control share"
[ -x $R/bin/bash ] || fail "the host root has no /bin/bash"

mount --move /dev $R/dev || fail "cannot move /dev"
umount /proc
mount -t proc -o nosuid,nodev,noexec proc $R/proc || fail "mount proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs $R/sys || fail "mount sysfs"
# cgroup v2, mounted as systemd does it on current distributions
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup ||
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 $R/sys/fs/cgroup || fail "mount cgroup2"
mkdir -p $R/dev/pts $R/dev/shm $R/dev/mqueue
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts || fail "mount devpts"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $R/dev/shm || fail "mount /dev/shm"
mount -t mqueue -o nosuid,nodev,noexec mqueue $R/dev/mqueue
ln -sfn /proc/self/fd $R/dev/fd
ln -sfn /proc/self/fd/0 $R/dev/stdin
ln -sfn /proc/self/fd/1 $R/dev/stdout
ln -sfn /proc/self/fd/2 $R/dev/stderr
[ -e $R/dev/ptmx ] || ln -sfn pts/ptmx $R/dev/ptmx
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $R/tmp || fail "mount /tmp"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $R/var/tmp
ip link set lo up

exec switch_root /newroot /bin/bash /run/pytest-isolate-guest/stage2.sh
fail "switch_root failed"
