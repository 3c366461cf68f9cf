"""Escape probes: each known way out of a container, tried from inside ours.

Inner tests run in real containers and assert that the escape fails; each probe file
runs in both modes, as root and rootless (tests/test_rootless.py). A probe that got
through harms nothing: files are only opened, never written, and a clone() child exits
at once. Controls (seccomp="unconfined", no Landlock, no cap_add) show that the layer
under test is what refuses.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import platform
import pty
import select
import subprocess
import sys
import termios
import time
import tty

import pytest

from pytest_isolate.runtime.landlock import abi_version

MODES = ("fork", "fresh")
IP = next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip") if os.path.exists(p)), None)
LEGACY_TIOCSTI = "/proc/sys/dev/tty/legacy_tiocsti"  # absent before Linux 6.2: always allowed then


INT80 = """
import ctypes, struct
def int80(nr, *args):
    \"\"\"A system call through the i386 ABI (int 0x80) from this 64-bit process; bytes
    arguments are copied below 4 GiB and passed by address. Returns -errno on failure.\"\"\"
    libc = ctypes.CDLL(None)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    page = libc.mmap(None, 4096, 7, 0x62, -1, 0)  # rwx, private, anonymous, MAP_32BIT
    for arg in (a for a in args if isinstance(a, bytes)):
        ctypes.memmove(page + 2048, arg, len(arg))
    values = [page + 2048 if isinstance(a, bytes) else a for a in args]
    movs = b"".join(op + struct.pack("<I", v) for op, v in zip((b"\\xbb", b"\\xb9", b"\\xba"), values))
    code = b"\\x53\\xb8" + struct.pack("<I", nr) + movs + b"\\xcd\\x80\\x5b\\xc3"  # push rbx; mov eax..edx; int 0x80; pop rbx; ret
    ctypes.memmove(page, code, len(code))
    return ctypes.CFUNCTYPE(ctypes.c_int)(page)()
"""


def _ia32() -> bool:  # int 0x80 getpid works, or SIGSEGV without the i386 ABI
    probe = INT80 + "import os, sys; sys.exit(int80(20) != os.getpid())"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


FACTS = {"HOST_PIDS": (os.getpid(), os.getppid()), "X86_64": platform.machine() == "x86_64",
         "IP": IP, "LANDLOCK": abi_version() > 0, "IA32": platform.machine() == "x86_64" and _ia32(),
         "LEGACY_TIOCSTI": not os.path.exists(LEGACY_TIOCSTI) or open(LEGACY_TIOCSTI).read().strip() != "0"}

COMMON = """
import ctypes, errno, os, shutil, socket, stat, subprocess, sys
import pytest

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
x86_only = pytest.mark.skipif(not X86_64, reason="x86_64 system call numbers")
REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ETXTBSY)

def sc(nr, *args):
    \"\"\"A raw system call: (result, errno).\"\"\"
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    return result, ctypes.get_errno()

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()

def open_errno(path, flags=os.O_WRONLY):
    \"\"\"None if open() succeeds (nothing is written), else its errno.\"\"\"
    try:
        os.close(os.open(path, flags))
    except OSError as exc:
        return exc.errno
    if flags & os.O_CREAT:
        os.unlink(path)

def ro(path):
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
"""

FILESYSTEM = """
@pytest.mark.isolated
def test_interpreter_binary_cannot_be_opened_for_writing():  # CVE-2019-5736
    real = os.path.realpath(sys.executable)
    for path in (sys.executable, real, "/proc/self/exe", "/proc/1/exe"):
        for flags in (os.O_WRONLY, os.O_RDWR):
            assert open_errno(path, flags) in REFUSED, (path, flags)
        with pytest.raises(OSError):
            open(path, "r+b")
    fd = os.open("/proc/self/exe", os.O_PATH)  # reopening through an O_PATH fd
    assert open_errno(f"/proc/self/fd/{fd}") in REFUSED
    os.close(fd)
    with pytest.raises(OSError):  # same mode: harmless if it went through
        os.chmod(real, stat.S_IMODE(os.stat(real).st_mode))

@pytest.mark.isolated
def test_plugin_and_site_packages_are_read_only():
    import pytest_isolate, site
    package = os.path.dirname(pytest_isolate.__file__)
    files = [os.path.join(d, f) for d, _, fs in os.walk(package) for f in fs]
    assert len(files) > 10
    for path in files + [pytest.__file__]:
        assert open_errno(path, os.O_WRONLY) in REFUSED, path
    for directory in filter(os.path.isdir, [package, os.path.dirname(pytest.__file__), *site.getsitepackages()]):
        probe = os.path.join(directory, "escape-probe")
        assert open_errno(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL) in REFUSED, directory

@pytest.mark.isolated
def test_no_fd_leads_out_and_cwd_is_inside():  # CVE-2024-21626
    for fd in map(int, os.listdir("/proc/self/fd")):
        if not os.path.exists(f"/proc/self/fd/{fd}"):  # listdir's own fd
            continue
        target = os.readlink(f"/proc/self/fd/{fd}")
        with pytest.raises(NotADirectoryError):
            os.fchdir(fd)
        if target.startswith(("pipe:", "socket:", "anon_inode:")) or target.endswith(" (deleted)"):
            continue
        # any path fd names an object reachable at that path inside the container
        assert os.path.samestat(os.fstat(fd), os.stat(target)), (fd, target)
    cwd = os.getcwd()
    assert cwd.startswith("/") and os.path.samestat(os.stat("."), os.stat(cwd))
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(64):  # walk '..' up to where it stops
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        same = os.path.samestat(os.fstat(parent), os.fstat(fd))
        os.close(fd)
        fd = parent
        if same: break
    assert os.path.samestat(os.fstat(fd), os.stat("/"))
    os.fchdir(fd)
    assert os.getcwd() == "/" and "proc" in os.listdir(".")

@pytest.mark.isolated
def test_masked_paths_show_nothing():
    files = [p for p in ("/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/kcore", "/proc/interrupts",
                         "/proc/latency_stats", "/proc/timer_stats") if os.path.exists(p)]
    for path in files:  # /dev/null bound over each
        assert stat.S_ISCHR(os.stat(path).st_mode) and open(path, "rb").read(4096) == b"", path
    dirs = [p for p in ("/proc/acpi", "/proc/scsi", "/proc/asound", "/sys/firmware",
                        "/sys/devices/virtual/powercap") if os.path.exists(p)]
    for path in dirs:  # an empty read-only tmpfs over each
        assert ro(path) and (not os.access(path, os.R_OK) or os.listdir(path) == []), path
    assert "/proc/keys" in files and len(files + dirs) >= 3

@pytest.mark.isolated
def test_kernel_knobs_sysrq_sys_and_cgroups_are_not_writable():
    assert os.path.exists("/proc/sys/kernel/core_pattern")
    for path in ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger", "/proc/sys/kernel/modprobe",
                 "/sys/kernel/uevent_helper", "/sys/class/net/lo/mtu", "/sys/kernel/mm/transparent_hugepage/enabled"):
        if os.path.exists(path):  # opened only, never written
            assert open_errno(path) in REFUSED, path
    for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq", "/sys"):
        if os.path.exists(path):
            assert ro(path), path
    if os.path.isdir("/sys/fs/cgroup"):
        with pytest.raises(OSError):  # on a cgroupfs this would make a cgroup
            os.mkdir("/sys/fs/cgroup/escape")
        assert os.listdir("/sys/fs/cgroup") == []
    types = [line.split(" - ")[1].split()[0] for line in open("/proc/self/mountinfo")]
    assert not {"cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf", "configfs"} & set(types)

@pytest.mark.isolated
def test_writable_mounts_are_all_the_containers_own():
    for line in open("/proc/self/mountinfo"):
        fields, _, rest = line.partition(" - ")
        point, options, fstype = fields.split()[4], fields.split()[5].split(","), rest.split()[0]
        if "ro" in options or fstype in ("overlay", "tmpfs", "devpts", "proc"):
            continue
        # host devices bound one by one: null zero full random urandom tty (and masks)
        assert stat.S_ISCHR(os.stat(point).st_mode), line

@pytest.mark.isolated
def test_only_default_devices_and_no_mknod():
    assert sorted(os.listdir("/dev")) == ["fd", "full", "null", "ptmx", "pts", "random", "shm",
                                          "stderr", "stdin", "stdout", "tty", "urandom", "zero"]
    assert os.listdir("/dev/pts") == ["ptmx"]  # a new devpts instance: no host terminal
    for kind, dev in ((stat.S_IFBLK, os.makedev(8, 0)), (stat.S_IFCHR, os.makedev(1, 1))):
        with pytest.raises(PermissionError):
            os.mknod("/tmp/device", kind | 0o600, dev)
    os.mkfifo("/tmp/fifo")
    assert stat.S_ISFIFO(os.stat("/tmp/fifo").st_mode)
    assert all(os.statvfs(p).f_flag & os.ST_NODEV for p in ("/tmp", "/dev/shm"))
"""

KERNEL = """
EPERM = (-1, errno.EPERM)

@x86_only
@pytest.mark.isolated
def test_keyring_calls_are_refused():
    session = -3  # KEY_SPEC_SESSION_KEYRING
    assert sc(250, 0, session, 0) == EPERM  # keyctl(KEYCTL_GET_KEYRING_ID)
    assert sc(248, b"user", b"escape-probe", b"x", 1, session) == EPERM  # add_key
    assert sc(249, b"user", b"escape-probe", None, session) == EPERM  # request_key

@pytest.mark.isolated
def test_no_nested_user_namespace():
    assert libc.unshare(0x10000000) == -1 and ctypes.get_errno() == errno.EPERM
    result = subprocess.run([shutil.which("unshare") or "/usr/bin/unshare", "-U", "true"], capture_output=True)
    assert result.returncode != 0, result

@x86_only
@pytest.mark.isolated
def test_clone_with_namespace_flags_is_refused():
    for flags in (0x10000000, 0x10000000 | 0x40000000, 0x10000000 | 0x20000000 | 0x00020000):
        ctypes.set_errno(0)  # raw clone(flags | SIGCHLD): a child that got through leaves at once
        pid = libc.syscall(ctypes.c_long(56), ctypes.c_long(flags | 17), *[ctypes.c_long(0)] * 4)
        if pid == 0:
            os._exit(0)
        assert pid < 0 or not os.waitpid(pid, 0), f"clone({hex(flags)}) went through"
        assert ctypes.get_errno() == errno.EPERM, hex(flags)

@pytest.mark.skipif(not IA32, reason="no 32-bit (i386) system call ABI")
@pytest.mark.isolated
def test_32bit_socketcall_cannot_open_blocked_families():
    assert int80(359, 40, 1, 0) == -errno.EPERM  # direct i386 socket(AF_VSOCK): refused
    assert int80(102, 1, struct.pack("<3I", 40, 1, 0)) == -errno.EPERM  # socketcall(SYS_SOCKET, ...)

@pytest.mark.isolated
def test_mount_unshare_and_setns_are_refused():
    os.mkdir("/tmp/mnt")
    assert libc.mount(b"tmpfs", b"/tmp/mnt", b"tmpfs", ctypes.c_ulong(0), None) == -1
    assert ctypes.get_errno() == errno.EPERM
    for flags in (0x00020000 | 0x40000000, 0x00020000, 0x40000000, 0x20000000, 0x04000000, 0x08000000, 0x02000000):
        assert libc.unshare(flags) == -1 and ctypes.get_errno() == errno.EPERM, hex(flags)
    for ns in ("1/ns/net", "1/ns/mnt", "self/ns/net", "self/ns/mnt", "self/ns/user"):
        if open_errno(f"/proc/{ns}", os.O_RDONLY) != errno.EACCES:  # pid 1's are out of reach
            fd = os.open(f"/proc/{ns}", os.O_RDONLY)
            assert libc.setns(fd, 0) == -1 and ctypes.get_errno() == errno.EPERM, ns
    assert libc.umount2(b"/proc/keys", 2) == -1  # unmasking
    if X86_64:
        assert sc(428, -100, b"/", 1) == EPERM  # open_tree(OPEN_TREE_CLONE)
        assert sc(430, b"tmpfs", 0) == EPERM  # fsopen
        assert sc(433, -100, b"/", 0) == EPERM  # fspick
        assert sc(429, -100, b"/tmp", -100, b"/tmp/mnt", 0) == EPERM  # move_mount
        assert sc(442, -100, b"/tmp", 0, None, 0) == EPERM  # mount_setattr
        assert sc(155, b"/tmp", b"/tmp") == EPERM  # pivot_root

@x86_only
@pytest.mark.isolated
def test_kernel_attack_surface_is_refused():
    handle = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint32.from_buffer(handle).value = 128
    mount_id = ctypes.c_int()
    assert sc(303, -100, b"/etc", handle, ctypes.byref(mount_id), 0) == (0, 0)  # name_to_handle_at: allowed
    params = ctypes.create_string_buffer(120)
    calls = {
        "bpf": (321, 5, None, 0), "perf_event_open": (298, None, 0, -1, -1, 0),
        "userfaultfd": (323, os.O_CLOEXEC | 1),  # UFFD_USER_MODE_ONLY: no sysctl stands in the way
        "io_uring_setup": (425, 1, params), "io_uring_enter": (426, 0, 1, 0, 0, None, 0),
        "io_uring_register": (427, 0, 0, None, 0), "kexec_load": (246, 0, 0, None, 0),
        "kexec_file_load": (320, -1, -1, 0, None, 0), "open_by_handle_at": (304, -100, handle, os.O_RDONLY),
        "syslog": (103, 10, None, 0), "finit_module": (313, -1, b"", 0), "init_module": (175, None, 0, b""),
        "delete_module": (176, b"escape_probe", 0), "acct": (163, None), "swapoff": (168, b"/tmp/swap"),
        "iopl": (172, 3), "ioperm": (173, 0x80, 1, 1), "personality": (135, 0x0040000),
        "setdomainname": (171, b"x", 1), "settimeofday": (164, None, None),
    }
    got = {name: sc(*call) for name, call in calls.items()}
    assert {name: r for name, r in got.items() if r != EPERM} == {}
    for family, kind in ((40, socket.SOCK_STREAM), (38, socket.SOCK_SEQPACKET), (44, socket.SOCK_RAW)):
        with pytest.raises(PermissionError):  # AF_VSOCK, AF_ALG, AF_XDP
            socket.socket(family, kind)

@pytest.mark.isolated
def test_chroot_and_hostname_are_refused():
    for call in (lambda: os.chroot("/tmp"), lambda: socket.sethostname("escaped")):
        with pytest.raises(PermissionError):
            call()
    assert socket.gethostname() == "isolated"
    if X86_64:
        assert sc(435, None, 0) == (-1, errno.ENOSYS)  # clone3: libc falls back to clone

@pytest.mark.isolated
def test_no_host_process_is_reachable():
    assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2]
    libc.ptrace.restype = ctypes.c_long
    for pid in HOST_PIDS:
        for call in (lambda: os.kill(pid, 0), lambda: os.pidfd_open(pid)):
            with pytest.raises(ProcessLookupError):
                call()
        assert libc.ptrace(ctypes.c_long(16), ctypes.c_long(pid), None, None) == -1  # PTRACE_ATTACH
        assert ctypes.get_errno() == errno.ESRCH
    # pid 1 still holds the container's capabilities: the test may not take it over
    if libc.ptrace(ctypes.c_long(16), ctypes.c_long(1), None, None) == 0:
        libc.ptrace(ctypes.c_long(17), ctypes.c_long(1), None, None)
        pytest.fail("attached to pid 1")
    assert ctypes.get_errno() == errno.EPERM
    for path in ("/proc/1/mem", "/proc/1/environ", "/proc/1/root/etc/passwd"):
        assert open_errno(path, os.O_RDONLY) == errno.EACCES, path

@pytest.mark.isolated
def test_terminal_injection_into_an_own_terminal_is_refused():  # CVE-2019-10063
    import fcntl, termios
    assert os.getsid(0) == os.getpid()
    with pytest.raises(OSError):
        os.open("/dev/tty", os.O_RDWR)  # no controlling terminal
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # now one, so only seccomp stands in the way
    char = ctypes.c_char(b"x")
    for request in (0x5412, 0x1_00005412, 0x541C, 0x1_0000541C):  # TIOCSTI, TIOCLINUX, high bits set
        assert libc.ioctl(slave, ctypes.c_ulong(request), ctypes.byref(char)) == -1, hex(request)
        assert ctypes.get_errno() == errno.EPERM, hex(request)
"""

OPTIONS = """
NET_ADMIN = 1 << 12
needs_ip = pytest.mark.skipif(not IP, reason="iproute2 is not installed")
needs_landlock = pytest.mark.skipif(not LANDLOCK, reason="no Landlock in this kernel")

def ip(*args):
    return subprocess.run([IP, *args], capture_output=True, text=True)

def writes(path):
    try:
        open(path, "w").close()
    except OSError as exc:
        return exc.errno
    return 0

@pytest.mark.isolated(cap_add=["CAP_NET_ADMIN"])
def test_cap_add_grants_net_admin_and_nothing_else():
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status(field), 16) == NET_ADMIN, field
    assert status("Seccomp") == "2"
    assert libc.mount(b"tmpfs", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None) == -1
    assert libc.unshare(0x40000000) == -1
    if IP:
        assert ip("link", "set", "lo", "mtu", "1234").returncode == 0
        assert open("/sys/class/net/lo/mtu").read().strip() == "1234"
        assert ip("netns", "add", "escape-probe").returncode != 0  # needs SYS_ADMIN
        assert [name for _, name in socket.if_nameindex()] == ["lo"]

@needs_ip
@pytest.mark.isolated
def test_without_cap_add_the_network_cannot_be_configured():
    result = ip("link", "set", "lo", "mtu", "1234")
    assert result.returncode != 0 and "not permitted" in result.stderr
    assert open("/sys/class/net/lo/mtu").read().strip() != "1234"

@needs_landlock
@pytest.mark.isolated(landlock=True, mounts=["shared:/srv/shared:rw"])
def test_landlock_allows_writes_only_in_scratch_places():
    for path in ("/tmp/x", "/dev/shm/x", "/dev/null", "/srv/shared/from-landlock"):
        assert writes(path) == 0, path
    for path in ("/x", "/srv/x", os.path.join(os.path.dirname(sys.executable), "x")):
        assert writes(path) in (errno.EACCES, errno.EPERM, errno.EROFS), path
    with pytest.raises(PermissionError):
        os.mkdir("/srv/d")
    assert open("/etc/passwd").read() and os.listdir("/etc")

@needs_landlock
@pytest.mark.isolated(landlock=["/srv"], mounts=["shared:/srv/shared:rw"])
def test_landlock_extra_paths_are_writable():
    assert writes("/srv/x") == 0
    os.mkdir("/srv/d")
    assert writes("/x") in (errno.EACCES, errno.EPERM)

@pytest.mark.isolated
def test_control_without_landlock_the_overlay_is_writable():
    assert writes("/x") == 0
    assert status("Seccomp") == "2"

@pytest.mark.isolated(seccomp="unconfined")
def test_control_seccomp_unconfined_allows_what_the_default_refuses():
    import fcntl, termios, tty
    assert status("Seccomp") == "0"
    if X86_64:  # keyctl(KEYCTL_GET_KEYRING_ID, session): the fresh keyring
        result, err = sc(250, 0, -3, 0)
        assert result > 0, os.strerror(err)
    master, slave = os.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    if LEGACY_TIOCSTI:  # the kernel alone lets a session inject into its own terminal
        char = ctypes.c_char(b"x")
        assert libc.ioctl(slave, ctypes.c_ulong(0x1_00005412), ctypes.byref(char)) == 0
        assert os.read(slave, 1) == b"x"

@pytest.mark.isolated(seccomp="mkdir-eperm.json")
def test_seccomp_profile_from_a_file_replaces_the_default():
    assert status("Seccomp") == "2"
    with pytest.raises(OSError) as exc:
        os.mkdir("/tmp/d")
    assert exc.value.errno == 1
    assert writes("/tmp/f") == 0
    if X86_64:
        assert sc(250, 0, -3, 0)[0] > 0  # keyctl: the profile allows everything else
"""

PROBES = {
    "filesystem": (FILESYSTEM, lambda f: {"passed": 7}),
    "kernel": (KERNEL, lambda f: {"passed": 8 + f["IA32"], "skipped": 1 - f["IA32"]}
               if f["X86_64"] else {"passed": 5, "skipped": 4}),
    "options": (OPTIONS, lambda f: {"passed": 7 - (not f["IP"]) - 2 * (not f["LANDLOCK"]),
                                    "skipped": (not f["IP"]) + 2 * (not f["LANDLOCK"])}),
}
MKDIR_EPERM = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}


def source(probe: str) -> str:
    header = "".join(f"{name} = {value!r}\n" for name, value in FACTS.items())
    return header + COMMON + (INT80 if probe == "kernel" else "") + PROBES[probe][0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_escape_probes_fail(pytester: pytest.Pytester, run, probe: str, mode: str) -> None:
    shared = pytester.mkdir("shared")
    os.chmod(shared, 0o777)  # container root is another host uid when pytest runs as root
    pytester.path.joinpath("mkdir-eperm.json").write_text(json.dumps(MKDIR_EPERM))
    pytester.makepyfile(**{f"test_{probe}_escapes": source(probe)})
    result = run(f"--isolate-mode={mode}", "-rA")
    result.assert_outcomes(**PROBES[probe][1](FACTS))
    if probe == "options" and FACTS["LANDLOCK"]:  # the :rw mount reached the host, nothing else did
        assert sorted(p.name for p in shared.iterdir()) == ["from-landlock"]


TERMINAL = """
import ctypes, fcntl, os, termios
import pytest

libc = ctypes.CDLL(None, use_errno=True)

def assert_no_injection():
    assert os.isatty(1), "the probe needs the outer terminal on stdout"
    for fd in (0, 1, 2):
        with pytest.raises(OSError):
            fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        assert libc.ioctl(fd, ctypes.c_ulong(0x1_00005412), ctypes.c_char_p(b"x")) == -1
    with pytest.raises(OSError):
        os.open("/dev/tty", os.O_RDWR)

@pytest.mark.isolated
def test_no_injection_into_the_outer_terminal():
    assert_no_injection()

@pytest.mark.isolated(seccomp="unconfined")
def test_no_injection_even_without_seccomp():  # setsid alone: not our controlling terminal
    assert_no_injection()
"""


@pytest.mark.parametrize("mode", MODES)
def test_terminal_injection_into_the_outer_terminal_fails(pytester: pytest.Pytester, mode: str) -> None:
    """CVE-2017-5226: the inner pytest runs on a pseudo-terminal that is its controlling
    terminal; its containers must not push input into it."""
    pytester.makepyfile(test_terminal=TERMINAL)
    master, slave = pty.openpty()
    tty.setraw(slave)  # non-canonical: any injected byte counts as pending input
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider",
             f"--isolate-mode={mode}", "-rA", "test_terminal.py"],
            stdin=slave, stdout=slave, stderr=slave, cwd=pytester.path, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        output, deadline = b"", time.monotonic() + 180
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                output += os.read(master, 1 << 16)
            elif process.poll() is not None:
                break
        else:
            process.kill()
        pending = array.array("i", [0])
        fcntl.ioctl(slave, termios.FIONREAD, pending)
    finally:
        os.close(master)
        os.close(slave)
    text = output.decode(errors="replace")
    assert process.wait() == 0 and "2 passed" in text, text
    assert pending[0] == 0, "a container pushed input into the outer terminal"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["cli", "marker"])
def test_unusable_seccomp_profile_is_a_usage_error(pytester: pytest.Pytester, run, mode: str, where: str) -> None:
    pytester.path.joinpath("not-a-profile.json").write_text("[1, 2]")
    marker = "(seccomp='not-a-profile.json')" if where == "marker" else ""
    pytester.makepyfile(f"import pytest\n\n@pytest.mark.isolated{marker}\ndef test_x():\n    pass\n")
    result = run(f"--isolate-mode={mode}", *(["--isolate-seccomp=missing/profile.json"] if where == "cli" else []))
    text = "\n".join(result.errlines + result.outlines)
    assert result.ret == 4, text
    assert "invalid 'seccomp'" in text and "Traceback" not in text, text
    assert ("missing/profile.json" if where == "cli" else "not a seccomp profile") in text, text
