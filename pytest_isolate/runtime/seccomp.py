"""Seccomp: compile a profile once with libseccomp, load the BPF in every container.

Profiles use Docker's JSON format (``defaultAction``, ``syscalls[]`` with ``names``,
``action``, ``errnoRet``, ``args``, ``includes``/``excludes`` on ``caps`` and
``arches``), so a user's Docker profile works unchanged.

libseccomp (through ctypes; Debian and Ubuntu always have libseccomp.so.2, which
systemd and apt depend on) knows every architecture's syscall numbers and emits the
arch checks; compiling a Docker-size profile costs a few milliseconds, so the host
does it once per profile and every container then only loads the ready program
with prctl(2) (a few hundred microseconds). ``docs/security.md`` has the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform

from . import syscalls

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_ERRNO = 0x00050000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_CTL_NNP = 3

_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
        "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
# Docker's names for the architectures a profile's includes/excludes may list.
_DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "x86", "armv7l": "arm",
                "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
# 32-bit ABIs the kernel runs on these machines, filtered too (else they are killed).
_SUB_ARCHES = {"x86_64": ("x86",), "aarch64": ("arm",)}

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class SeccompError(Exception):
    """A profile that cannot be compiled, or no libseccomp; the message says why."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise SeccompError(
            "libseccomp is not installed (it compiles the seccomp profile): install it "
            "(Debian/Ubuntu: apt-get install libseccomp2) or use seccomp='unconfined'"
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


def _action(name: str, errno_ret: int | None, default_errno: int) -> int:
    if name == "SCMP_ACT_ERRNO":
        return SCMP_ACT_ERRNO | ((default_errno if errno_ret is None else errno_ret) & 0xFFFF)
    actions = {"SCMP_ACT_ALLOW": SCMP_ACT_ALLOW, "SCMP_ACT_KILL": SCMP_ACT_KILL_THREAD,
               "SCMP_ACT_KILL_THREAD": SCMP_ACT_KILL_THREAD, "SCMP_ACT_KILL_PROCESS": SCMP_ACT_KILL_PROCESS,
               "SCMP_ACT_TRAP": SCMP_ACT_TRAP, "SCMP_ACT_LOG": SCMP_ACT_LOG}
    if name not in actions:
        raise SeccompError(f"unsupported action {name!r}; accepted: SCMP_ACT_ERRNO, "
                           + ", ".join(actions))
    return actions[name]


def _applies(rule: dict, caps: set[str], arch: str) -> bool:
    """Docker's includes/excludes: all listed caps held, this arch listed."""
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if includes.get("caps") and not set(includes["caps"]) <= caps:
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if excludes.get("caps") and set(excludes["caps"]) & caps:
        return False
    if excludes.get("arches") and arch in excludes["arches"]:
        return False
    return True


_ACTIONS = ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP", "SCMP_ACT_LOG")


def validate_profile(profile: object) -> None:
    """Raise SeccompError saying what is wrong with a Docker-format profile."""
    def fail(where: str, what: str) -> None:
        raise SeccompError(f"{where}: {what}")

    def errno_value(where: str, value: object) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4095):
            fail(where, "accepted: an errno from 0 to 4095")

    def string_list(where: str, value: object) -> None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(where, "accepted: a list of strings")

    if not isinstance(profile, dict):
        fail("not a seccomp profile", "accepted: a JSON object with 'defaultAction' and 'syscalls'")
    if profile.get("defaultAction", "SCMP_ACT_ERRNO") not in _ACTIONS:
        fail("defaultAction", "accepted: " + ", ".join(_ACTIONS))
    errno_value("defaultErrnoRet", profile.get("defaultErrnoRet"))
    rules = profile.get("syscalls", [])
    if not isinstance(rules, list):
        fail("syscalls", "accepted: a list of rules")
    for n, rule in enumerate(rules):
        where = f"syscalls[{n}]"
        if not isinstance(rule, dict):
            fail(where, "accepted: an object with 'names' and 'action'")
        string_list(f"{where}.names", rule.get("names", []))
        if rule.get("action", "SCMP_ACT_ALLOW") not in _ACTIONS:
            fail(f"{where}.action", "accepted: " + ", ".join(_ACTIONS))
        errno_value(f"{where}.errnoRet", rule.get("errnoRet"))
        for key in ("includes", "excludes"):
            condition = rule.get(key) or {}
            if not isinstance(condition, dict):
                fail(f"{where}.{key}", "accepted: an object with 'caps' and/or 'arches' lists")
            for field in ("caps", "arches"):
                if condition.get(field) is not None:
                    string_list(f"{where}.{key}.{field}", condition[field])
        args = rule.get("args") or []
        if not isinstance(args, list) or len(args) > 6:
            fail(f"{where}.args", "accepted: a list of at most 6 comparisons")
        for m, arg in enumerate(args):
            at = f"{where}.args[{m}]"
            if not isinstance(arg, dict):
                fail(at, "accepted: an object with 'index', 'value', 'op'")
            index = arg.get("index")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
                fail(f"{at}.index", "accepted: 0 to 5")
            for field in ("value", "valueTwo"):
                value = arg.get(field, 0)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
                    fail(f"{at}.{field}", "accepted: an integer from 0 to 2**64-1")
            if arg.get("op") not in _OPS:
                fail(f"{at}.op", "accepted: " + ", ".join(_OPS))


def compile_profile(profile: dict, caps: set[str] = frozenset()) -> bytes:
    """The BPF program (struct sock_filter[]) of a Docker-format profile."""
    lib = _libseccomp()
    default_errno = profile.get("defaultErrnoRet")
    default_errno = errno.EPERM if default_errno is None else default_errno
    ctx = lib.seccomp_init(_action(profile.get("defaultAction", "SCMP_ACT_ERRNO"), None, default_errno))
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0)  # we set no_new_privs ourselves
        machine = platform.machine()
        for sub in _SUB_ARCHES.get(machine, ()):
            token = lib.seccomp_arch_resolve_name(sub.encode())
            if token:
                lib.seccomp_arch_add(ctx, token)
        arch = _DOCKER_ARCH.get(machine, machine)
        for rule in profile.get("syscalls", []):
            if not _applies(rule, caps, arch):
                continue
            action = _action(rule.get("action", "SCMP_ACT_ALLOW"), rule.get("errnoRet"), default_errno)
            args = rule.get("args") or []
            array = (_ArgCmp * max(len(args), 1))()
            for i, arg in enumerate(args):
                if arg.get("op") not in _OPS:
                    raise SeccompError(f"unsupported comparison {arg.get('op')!r} in {rule.get('names')}")
                array[i] = _ArgCmp(int(arg["index"]), _OPS[arg["op"]], int(arg["value"]),
                                   int(arg.get("valueTwo", 0)))
            for name in rule.get("names", []):
                number = lib.seccomp_syscall_resolve_name(name.encode())
                if number == -1:  # not a syscall of this machine (e.g. a 32-bit-only one)
                    continue
                result = lib.seccomp_rule_add_array(ctx, action, number, len(args), array)
                if result < 0 and -result not in (errno.EEXIST,):
                    raise SeccompError(f"rule for {name} rejected by libseccomp: {os.strerror(-result)}")
        read_fd = os.memfd_create("pytest-isolate-seccomp", 0)
        try:
            result = lib.seccomp_export_bpf(ctx, read_fd)
            if result < 0:
                raise SeccompError(f"seccomp_export_bpf: {os.strerror(-result)}")
            return os.pread(read_fd, os.fstat(read_fd).st_size, 0)
        finally:
            os.close(read_fd)
    finally:
        lib.seccomp_release(ctx)


# -- the argument filter -------------------------------------------------------------
# Two checks libseccomp cannot express, in a small program written by hand and
# stacked on the profile's (seccomp runs every filter; the strictest answer wins):
#
# * ioctl(fd, TIOCSTI, c) types into a terminal. The request is an int, so the
#   kernel ignores the upper 32 bits of the register: the filter compares the low
#   32 bits only, or a request with high bits set slips past (CVE-2019-10063).
#   libseccomp compares all 64 bits and cannot say "ioctl, except these".
# * 32-bit x86 programs create sockets through socketcall(SYS_SOCKET, args), whose
#   arguments sit in memory, out of any filter's reach: the profile's socket-family
#   rule cannot apply, so that path is refused as a whole.

# struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low word first).
_OFFSET_NR, _OFFSET_ARCH = 0, 4
_AUDIT_ARCH = {"x86_64": 0xC000003E, "i386": 0x40000003, "aarch64": 0xC00000B7, "arm": 0x40000028}
# (arch, syscall number, argument index, refused values), per machine. The x32 ABI
# shares x86_64's arch value with bit 30 set in the number.
_ARGUMENT_RULES = {
    "x86_64": [("x86_64", 16, 1, "ioctl"), ("x86_64", 0x40000000 | 514, 1, "ioctl"),
               ("i386", 54, 1, "ioctl"), ("i386", 102, 0, "socketcall")],
    "aarch64": [("aarch64", 29, 1, "ioctl"), ("arm", 54, 1, "ioctl")],
}
SYS_SOCKET = 1  # socketcall(2) operation
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06


def _assemble(lines: list) -> bytes:
    """Classic BPF from ``(code, jump_true, jump_false, k)`` tuples and label strings;
    jumps name a label (or 0 for the next instruction)."""
    import struct

    labels, position = {}, 0
    for line in lines:
        if isinstance(line, str):
            labels[line] = position
        else:
            position += 1
    program, position = [], 0
    for line in lines:
        if isinstance(line, str):
            continue
        code, jt, jf, k = line
        offset = lambda target: 0 if target == 0 else labels[target] - position - 1  # noqa: E731
        program.append(struct.pack("=HBBI", code, offset(jt), offset(jf), k))
        position += 1
    return b"".join(program)


def argument_filter(ioctl_requests: tuple[int, ...]) -> bytes:
    """Fail with EPERM: ioctl(_, R, _) for each R in ``ioctl_requests`` (low 32 bits
    compared), and 32-bit socketcall(SYS_SOCKET, _)."""
    refused = {"ioctl": ioctl_requests, "socketcall": (SYS_SOCKET,)}
    rules = _ARGUMENT_RULES.get(platform.machine(), [])
    arches = sorted({arch for arch, *_ in rules})
    lines: list = [(_BPF_LD_W_ABS, 0, 0, _OFFSET_ARCH)]
    lines += [(_BPF_JEQ_K, f"arch-{arch}", 0, _AUDIT_ARCH[arch]) for arch in arches]
    lines += [(_BPF_RET_K, 0, 0, SCMP_ACT_ALLOW)]
    for arch in arches:
        lines += [f"arch-{arch}", (_BPF_LD_W_ABS, 0, 0, _OFFSET_NR)]
        lines += [(_BPF_JEQ_K, f"rule-{i}", 0, number)
                  for i, (rule_arch, number, _, _) in enumerate(rules) if rule_arch == arch]
        lines += [(_BPF_RET_K, 0, 0, SCMP_ACT_ALLOW)]
    for i, (_, _, index, name) in enumerate(rules):
        lines += [f"rule-{i}", (_BPF_LD_W_ABS, 0, 0, 16 + 8 * index)]  # the argument's low word
        lines += [(_BPF_JEQ_K, "deny", 0, value & 0xFFFFFFFF) for value in refused[name]]
        lines += [(_BPF_RET_K, 0, 0, SCMP_ACT_ALLOW)]
    lines += ["deny", (_BPF_RET_K, 0, 0, SCMP_ACT_ERRNO | errno.EPERM)]
    return _assemble(lines)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load(program: bytes) -> None:
    """Install a compiled program on the calling thread (needs no_new_privs)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    result = syscalls.libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                                  ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0))
    syscalls.check(result, "loading the seccomp filter")
