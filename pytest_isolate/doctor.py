"""``python -m pytest_isolate doctor``: what this host offers pytest-isolate.

Each check is a small function returning a ``Result``. Whatever needs namespaces runs
in a forked, single-threaded child: the calling process never unshares anything.
Standard library and ``pytest_isolate.runtime`` only (no pytest import).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import stat
import struct
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import __version__
from .runtime import mountinfo, process, seccomp, seccomp_default, subids, syscalls, user_ns

OK, WARN, MISSING = "ok", "warn", "missing"
TAGS = {OK: "[ ok ]", WARN: "[warn]", MISSING: "[miss]"}
# Without these two there is no container at all; the rest adds protection or limits.
REQUIRED = ("user namespaces", "overlayfs")

PR_GET_SECCOMP = 21
SYS_LANDLOCK_CREATE_RULESET = 444  # the same on x86_64 and aarch64 (asm-generic table)
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0


@dataclass
class Result:
    name: str
    status: str  # OK, WARN or MISSING
    finding: str  # one line: what was found
    meaning: str = ""  # when not ok: what it means for the user
    fix: str = ""  # when not ok: how to get it
    details: dict = field(default_factory=dict)


# -- helpers --------------------------------------------------------------------------

def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _words(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def _in_child(step: Callable[[], None]) -> tuple[int, str] | None:
    """Run ``step`` in a forked child: None on success, else (errno, message)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            step()
        except BaseException as exc:  # noqa: BLE001 - report everything, never return
            code = 1
            message = process.describe_error(exc, symbolic=True)
            os.write(write_end, f"{getattr(exc, 'errno', 0) or 0}\n{message}".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        report = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None
    err, _, message = report.partition("\n")
    return (int(err), message) if report else (0, f"probe died ({status:#x})")


# -- 1. user namespaces ---------------------------------------------------------------

# (sysctl file, the value that blocks unprivileged user namespaces, why, the fix)
KNOBS = (
    ("/proc/sys/user/max_user_namespaces", 0, "user.max_user_namespaces is 0",
     "sudo sysctl -w user.max_user_namespaces=15000"),
    ("/proc/sys/kernel/unprivileged_userns_clone", 0,
     "kernel.unprivileged_userns_clone is 0 (Debian's switch)",
     "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", 1,
     "kernel.apparmor_restrict_unprivileged_userns is 1 (Ubuntu 23.10+): AppArmor "
     "denies unconfined unprivileged programs every capability in a new user namespace, "
     "so writing its uid map or mounting fails (EPERM)",
     "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (persist it in "
     "/etc/sysctl.d/), or an AppArmor profile with a 'userns,' rule for this Python"),
)


def _blockers() -> tuple[str, str]:
    """(what blocks user namespaces for unprivileged users, the fix); empty if nothing."""
    found = [(why, fix) for path, bad, why, fix in KNOBS if _read_int(path) == bad]
    return "; ".join(why for why, _ in found), "; ".join(fix for _, fix in found)


def check_user_namespaces() -> Result:
    root = os.geteuid() == 0
    blocked, unblock = _blockers()
    details: dict = {"knobs": {os.path.basename(k[0]): _read_int(k[0]) for k in KNOBS},
                     "root": root, "rootless": not root}
    if root:
        (uid0, count), (gid0, _) = user_ns.root_mapping()
        origin = "/etc/subuid" if user_ns.subordinate_range("/etc/subuid") else "default range"
        details["root_mapping"] = {"uid": uid0, "gid": gid0, "count": count, "from": origin}
        who = f"as root, container root is host uid {uid0}+{count} ({origin})"
    else:
        mapping = subids.rootless_mapping()
        details["subordinate"] = {"uids": mapping.uids, "gids": mapping.gids, "why_not": mapping.why_not}
        who = f"rootless, container root is your uid {os.geteuid()}" + (
            f", container ids 1..{mapping.uids[1]} your subordinate range {mapping.uids[0]}+{mapping.uids[1]}"
            if mapping.ranged else f", nothing else is mapped ({mapping.why_not})")
    # The runtime's own entry: a self map rootless, a helper-written uid range as root.
    failure = _in_child(user_ns.enter)
    if failure is None and not blocked:
        return Result("user namespaces", OK, f"usable; {who}", details=details)
    if failure is None:
        return Result("user namespaces", WARN, f"usable; {who}; unprivileged use is blocked",
                      ("runs as root work; rootless runs by other users fail: " if root else
                       "rootless containers will fail: ") + blocked, unblock, details)
    details["error"] = message = failure[1]
    meaning = "pytest-isolate cannot create any container on this host"
    if root and _in_child(lambda: syscalls.unshare(syscalls.CLONE_NEWUSER)) is None:
        fix = (f"the uid/gid range {uid0}+{count} cannot be mapped here (a nested user "
               "namespace?): give root a range that exists here in /etc/subuid and /etc/subgid")
    elif blocked and (not root or "max_user" in blocked):
        meaning, fix = f"{meaning}: {blocked}", unblock
    else:
        fix = ("in Docker/Kubernetes the default seccomp profile blocks unshare: run with "
               "--security-opt seccomp=unconfined (or a profile allowing it); otherwise "
               "use a kernel with CONFIG_USER_NS=y")
    return Result("user namespaces", MISSING, message, meaning + ".", fix, details)


# -- 2. overlayfs inside a user namespace ---------------------------------------------

def _probe_overlay() -> None:
    user_ns.enter_self_mapped()  # a throwaway child: the one-line map is fine even as root
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    syscalls.mount("tmpfs", "/tmp", "tmpfs", 0, "mode=755")  # private to this namespace
    for d in ("lower", "upper", "work", "merged"):
        os.mkdir(f"/tmp/{d}")
    with open("/tmp/lower/old", "w") as f:
        f.write("lower")
    syscalls.mount("overlay", "/tmp/merged", "overlay", 0,
                   "lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work,userxattr")
    for path in ("/tmp/merged/new", "/tmp/merged/old"):  # a new file, then a copy-up
        with open(path, "w") as f:
            f.write("upper")
    with open("/tmp/upper/old") as f, open("/tmp/lower/old") as g:
        if (f.read(), g.read()) != ("upper", "lower"):
            raise OSError(errno.EIO, "overlay copy-up wrote to the wrong layer")


def check_overlay() -> Result:
    failure = _in_child(_probe_overlay)
    if failure is None:
        return Result("overlayfs", OK, "overlay (userxattr) mounts and copies up in a user "
                                       "namespace")
    err, message = failure
    meaning = "no copy-on-write root per test, so no container can start"
    blocked, unblock = _blockers()
    if message.startswith("unshare"):
        fix = "make user namespaces work first (see that check)"
    elif err == errno.EPERM and blocked and os.geteuid() != 0:
        meaning, fix = f"{meaning}: {blocked}", unblock
    else:
        fix = ("unprivileged overlayfs with userxattr needs Linux 5.11+ and the overlay "
               "module (sudo modprobe overlay)")
    return Result("overlayfs", MISSING, message, meaning + ".", fix, {"error": message})


# -- 3. cgroups -----------------------------------------------------------------------

WANTED = ("memory", "cpu", "pids")


def _cgroup_mounts() -> tuple[dict, str | None]:
    """({v1 controller: its mount point}, the cgroup2 mount point or None)."""
    v1 = mountinfo.cgroup_mounts(WANTED)
    return v1, v1.pop("", None)


def _delegated_v2(v2: str) -> str | None:
    """systemd's delegated subtree for the caller (user@UID.service), if the caller owns it."""
    uid = os.geteuid()
    service = f"{v2}/user.slice/user-{uid}.slice/user@{uid}.service"
    return service if os.path.isdir(service) and os.stat(service).st_uid == uid else None


def check_cgroups() -> Result:
    meaning = ("resource limits (memory, cpus, pids) cannot be enforced: limited tests error at "
               "setup unless --isolate-limits=best-effort (rlimits instead); other tests still "
               "run isolated.")
    v1, v2 = _cgroup_mounts()
    if not v1 and not v2:
        return Result("cgroups", MISSING, "no cgroup filesystem mounted", meaning,
                      "mount cgroup2 on /sys/fs/cgroup (or boot with systemd)")
    v2_all = _words(f"{v2}/cgroup.controllers") if v2 else []
    controllers = sorted(v1) if v1 else [c for c in WANTED if c in v2_all]
    layout = "v2" if not v1 else "v1" if not v2 else \
        f"v1 (hybrid: cgroup2 at {v2} with controllers: {' '.join(v2_all) or 'none'})"
    details = {"version": "v1" if v1 else "v2", "hybrid": bool(v1 and v2),
               "controllers": controllers, "mounts": v1 or {"cgroup2": v2}}
    finding = f"{layout}; {', '.join(controllers) or 'none'} available"
    absent = [c for c in WANTED if c not in controllers]
    problem = fix = ""
    if os.geteuid() == 0:
        if not all(os.access(p, os.W_OK) for p in (v1 or {"": v2}).values()):
            problem, fix = "cgroupfs is read-only here", ("inside a container, give it a "
                                                         "writable, delegated cgroup")
        elif absent:
            problem, fix = f"no {', '.join(absent)}", ("enable the controllers on the kernel "
                                                        "command line (e.g. cgroup_enable=memory)")
        else:
            finding += "; root can create cgroups"
    elif v1:
        problem, fix = "rootless: v1 has no safe delegation", (
            "run as root, or use a cgroup v2 host (systemd.unified_cgroup_hierarchy=1) where "
            "systemd delegates a subtree to your user")
    else:
        delegated = _delegated_v2(v2)
        usable = _words(f"{delegated}/cgroup.subtree_control") if delegated else []
        details.update(delegated=delegated, delegated_controllers=usable)
        lacking = [c for c in ("memory", "pids") if c not in usable]
        if delegated and os.access(delegated, os.W_OK) and not lacking:
            finding += f"; delegated to you: {delegated} ({' '.join(usable)})"
        else:
            problem = f"{delegated} lacks {', '.join(lacking)}" if delegated else \
                "no subtree delegated to you"
            fix = ("log in through systemd (user@UID.service) and delegate controllers: "
                   "/etc/systemd/system/user@.service.d/delegate.conf with [Service] "
                   "Delegate=cpu memory pids")
    if not problem:
        return Result("cgroups", OK, finding, details=details)
    return Result("cgroups", WARN, f"{finding}; {problem}", meaning, fix, details)


# -- 4. seccomp -----------------------------------------------------------------------

def _load_allow_all_filter() -> None:
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    seccomp.load(struct.pack("HBBI", 0x06, 0, 0, seccomp.SCMP_ACT_ALLOW))  # BPF_RET|BPF_K


def check_seccomp() -> Result:
    meaning = ("the default seccomp profile (keyctl, bpf, kexec, the mount API … blocked) "
               "cannot be applied: isolated tests error at setup unless seccomp='unconfined'.")
    fix = "use a kernel built with CONFIG_SECCOMP and CONFIG_SECCOMP_FILTER"
    with open("/proc/self/status") as f:
        status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
    if "Seccomp" not in status:
        return Result("seccomp", MISSING, "no Seccomp field in /proc/self/status", meaning, fix)
    try:
        mode = syscalls.prctl(PR_GET_SECCOMP)
    except OSError as exc:
        return Result("seccomp", MISSING, f"prctl(PR_GET_SECCOMP): {exc}", meaning, fix)
    details = {"mode": mode, "filters": int(status.get("Seccomp_filters", "0"))}
    failure = _in_child(_load_allow_all_filter)
    if failure:
        return Result("seccomp", MISSING, f"loading a filter failed: {failure[1]}", meaning,
                      fix, details)
    try:
        program = seccomp.compile_profile(seccomp_default.default_profile())
    except seccomp.SeccompError as exc:
        return Result("seccomp", MISSING, f"the default profile does not compile: {exc}", meaning,
                      "install libseccomp (Debian/Ubuntu: apt-get install libseccomp2)", details)
    details["default_profile_instructions"] = len(program) // 8
    note = " (already filtered, e.g. in a container: ours stacks on it)" if mode == 2 else ""
    return Result("seccomp", OK, f"filters load; default profile compiles ({len(program) // 8} "
                                 f"BPF instructions); this process: mode {mode}, "
                                 f"{details['filters']} filters{note}", details=details)


# -- 5. Landlock ----------------------------------------------------------------------

def check_landlock() -> Result:
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi >= 1:
        return Result("landlock", OK, f"ABI {abi}", details={"abi": abi})
    err = ctypes.get_errno()
    if err == errno.EOPNOTSUPP:
        finding, fix = "built in but disabled at boot", \
            "add landlock to the lsm= kernel parameter (current list: /sys/kernel/security/lsm)"
    elif err == errno.ENOSYS:
        finding, fix = "not in this kernel (or hidden by a seccomp filter)", \
            "use Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK=y"
    else:
        finding, fix = f"landlock_create_ruleset: {os.strerror(err)}", "see the error"
    return Result("landlock", MISSING, finding,
                  "no Landlock layer (kernel-enforced file access rules) on top of the "
                  "namespaces; containers still work, but tests asking for landlock= error at setup.",
                  fix, {"abi": None, "errno": err})


# -- 6. Python ------------------------------------------------------------------------

def _not_traversable(path: str) -> str | None:
    """The first directory from / down to ``path`` that other users cannot search."""
    parts = path.strip("/").split("/")
    for d in ("/" + "/".join(parts[:i]) for i in range(len(parts) + 1)):
        try:
            mode = os.stat(d).st_mode
        except OSError:
            return d
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return f"{d} (mode {stat.S_IMODE(mode):o})"
    return None


def check_python() -> Result:
    real, prefix = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    venv = sys.prefix if sys.prefix != sys.base_prefix else None
    shown = sys.executable + (f" -> {real}" if real != sys.executable else "")
    blocked = next(filter(None, map(_not_traversable, [real, prefix] + [venv] * bool(venv))),
                   None)
    if blocked is None and not os.stat(real).st_mode & stat.S_IXOTH:
        blocked = f"{real} (not executable by others)"
    details = {"executable": sys.executable, "realpath": real, "prefix": prefix,
               "venv": venv, "world_traversable": blocked is None}
    if blocked is None:
        return Result("python", OK, f"{shown}, prefix {prefix}: usable by any user",
                      details=details)
    return Result("python", WARN, f"{shown}, prefix {prefix}: {blocked} blocks other users",
                  "only matters for rootless runs by another user: they cannot start this "
                  "interpreter (runs as root bind the prefix into the container).",
                  "use a Python under a world-readable prefix (e.g. /usr/bin/python3, "
                  f"/usr/local, /opt) or chmod o+x {blocked.split(' (')[0]}", details)


# Installed distributions that get in this plugin's way (normalised names).
CONFLICTS = {"pytest-isolated": "defines its own @pytest.mark.isolated",
             "pytest-isolate": "ships another package named pytest_isolate"}


def check_plugins(distributions=None) -> Result:
    from importlib import metadata

    names = {re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "")).lower()
             for d in (metadata.distributions() if distributions is None else distributions)}
    found = sorted(names & CONFLICTS.keys())
    if not found:
        return Result("plugins", OK, "no other plugin claims @pytest.mark.isolated or pytest_isolate")
    return Result("plugins", WARN, "; ".join(f"{name} is installed: it {CONFLICTS[name]}" for name in found),
                  "tests marked isolated may be run by the other plugin, or not isolated at all",
                  f"pip uninstall {' '.join(found)}", {"conflicting": found})


# -- running and reporting ------------------------------------------------------------

def check_images() -> Result:
    from .doctor_images import check_images as check

    return check(_in_child, Result, OK, WARN, MISSING)


def check_networks() -> Result:
    from .doctor_networks import check_networks as check

    return check(_in_child, Result, OK, WARN, MISSING)


CHECKS = (check_user_namespaces, check_overlay, check_cgroups, check_seccomp,
          check_landlock, check_python, check_plugins, check_images, check_networks)
NAMES = ("user namespaces", "overlayfs", "cgroups", "seccomp", "landlock", "python", "plugins", "images",
         "networks")


def run_checks() -> list[Result]:
    results = []
    for check, name in zip(CHECKS, NAMES):
        try:
            results.append(check())
        except Exception as exc:  # a broken probe is a finding, not a crash
            failed = process.describe_error(exc, symbolic=True)
            results.append(Result(name, MISSING, f"the check failed: {failed}",
                                  "unknown", "please report this as a pytest-isolate bug"))
    return results


def basic_isolation(results: list[Result]) -> bool:
    return all(r.status != MISSING for r in results if r.name in REQUIRED)


def render(results: list[Result]) -> str:
    uname = os.uname()
    lines = [f"pytest-isolate {__version__} doctor: Linux {uname.release} {uname.machine}, "
             f"uid {os.geteuid()}, Python {sys.version.split()[0]}", ""]
    width = max(len(r.name) for r in results)
    for r in results:
        lines.append(f"{TAGS[r.status]} {r.name:<{width}}  {r.finding}")
        for label, text in (("means: ", r.meaning), ("fix:   ", r.fix)):
            if r.status != OK and text:
                lines.append(textwrap.fill(label + text, width=92, initial_indent=" " * 7,
                                           subsequent_indent=" " * 14,
                                           break_long_words=False, break_on_hyphens=False))
    verdict = "available" if basic_isolation(results) else "NOT available"
    lines += ["", f"basic isolation ({' + '.join(REQUIRED)}): {verdict}"]
    return "\n".join(lines)


def run(as_json: bool = False) -> int:
    """The doctor subcommand: print the report; 0 when basic isolation works, else 1."""
    results = run_checks()
    ok = basic_isolation(results)
    if as_json:
        uname = os.uname()
        print(json.dumps({"version": __version__, "kernel": uname.release,
                          "machine": uname.machine, "uid": os.geteuid(),
                          "basic_isolation": ok, "checks": [asdict(r) for r in results]},
                         indent=2))
    else:
        print(render(results))
    return 0 if ok else 1
