"""The launcher: builds the container host's namespaces and stage, then forks the
host (and, from it, the factory). ``python -c <bootstrap> --spec JSON --exec CMD...``

execnet starts the host with ``popen//python=<launcher>``: it appends the
interpreter's own arguments (``-u -c <bootstrap>``) to our command line. Once this
single-threaded process has built the host's namespaces (``enter_host``), it forks
the host, pid 1 of the new pid namespace, which forks the init factory (factory.py)
while it is still small, then execs those arguments. The launcher stays, waits, and
passes the host's exit status on (execnet talks to the host through the launcher's
pipes).

What the host must know arrives in one environment variable, a "launched" message:
the fd of its channel to the factory, the stage's notes, whether the mounts could be
locked, or why the container could not be built at all -- then the interpreter is
still exec'd and only reports that error over execnet, so the user gets a message
instead of a dead gateway.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys

from . import factory, link, namespaces, network, process, relay, stage, subids, syscalls, user_ns

LAUNCHED_ENV = "PYTEST_ISOLATE_LAUNCHED"


PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launcher_command(python: str, host_python: str | None = None, **spec) -> str:
    """The ``python=`` value for an execnet popen spec (it is shell-split). The
    launcher runs ``python`` here; the host execs ``host_python`` in the stage (an
    image's own interpreter), by default the same."""
    bootstrap = (
        f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); "
        "from pytest_isolate.runtime.launch import main; main()"
    )
    spec.setdefault("env", None)
    if os.geteuid() != 0:
        subids.rootless_mapping()  # tried once here, not in every launcher (see subids)
    spec.setdefault("allow", [])
    spec.setdefault("networks", [])
    spec.setdefault("outbound", None)
    spec["library_path"] = _pyroute2_parent()
    spec["python_path"] = [PACKAGE_PARENT] + spec.get("python_path", []) if spec["env"] is not None else []
    parts = [python, "-S", "-c", bootstrap, "--spec", link.to_text("spec", **spec), "--exec", host_python or python]
    return " ".join(shlex.quote(p) for p in parts)


def _pyroute2_parent() -> str | None:
    """Where pyroute2 lies (found, not imported): the factory imports it from there
    for private networks (the launcher runs without site-packages, -S)."""
    import importlib.util

    found = importlib.util.find_spec("pyroute2")
    if found is None or not found.submodule_search_locations:
        return None
    return os.path.dirname(os.path.realpath(list(found.submodule_search_locations)[0]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = link.from_text(argv[argv.index("--spec") + 1], "spec")
    command = argv[argv.index("--exec") + 1:]
    launched = {"error": None, "notes": [], "factory_fd": None, "mounts_unlocked": None}
    relay_channel = None
    try:
        relay_channel = enter_host(spec, launched)
    except Exception as exc:  # reported by the host, see the module doc
        launched["error"] = process.describe_error(exc)
    launcher = os.getpid()
    host_end = factory_end = None
    if launched["error"] is None:
        host_end, factory_end = link.Channel.pair()
        os.set_inheritable(host_end.fileno(), True)
        launched["factory_fd"] = host_end.fileno()
    os.environ[LAUNCHED_ENV] = link.to_text("launched", **launched)
    host = os.fork()
    if host == 0:
        # Parent-death signals do not survive fork. Pid 1 of the new namespace sees
        # no parent (getppid() is 0), so that is the parent to expect.
        process.die_with_parent(0 if os.getpid() == 1 else launcher)
        if factory_end is not None:
            # The factory is the host's child: when the host (pid 1) ends, the kernel
            # kills and reaps it at once, instead of waiting for another reaper.
            _fork_factory(host_end, factory_end, spec, relay_channel)
        os.execv(command[0], command)
    for end in (host_end, factory_end, relay_channel):
        if end is not None:
            end.close()
    # ^C reaches the whole process group: the host handles it; the launcher only
    # follows the host (and the host dies with the launcher).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host_status = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == host:
            host_status = status
    os._exit(os.waitstatus_to_exitcode(host_status) & 0xFF if os.WIFEXITED(host_status)
             else 128 + os.WTERMSIG(host_status))


def enter_host(spec: dict, launched: dict) -> link.Channel | None:
    """Build the container host's namespaces and stage around the calling,
    single-threaded launcher (``spec``: a "spec" message). Adds to ``launched``;
    returns the channel to the allow-list relay, if the run has one."""
    controller = os.getppid()
    process.die_with_parent(controller)
    if spec["env"] is not None and (spec["networks"] or spec["allow"]):  # an image's root lacks our stdlib
        try:
            network.preload(spec["library_path"])
        except OSError:
            pass  # the first container that needs a network says why
    if os.geteuid() == 0:
        # Real root builds the stage *before* joining the user namespace: only real
        # root can open host paths such as an interpreter under /root (mode 700) and
        # idmap the project's binds. Container root is an unprivileged host uid after.
        owner = (user_ns.host_uid_of_container_root(), user_ns.host_gid_of_container_root())
        userns_fd = user_ns.create_for_root()
        relay_channel = _fork_relay(spec, userns_fd)
        syscalls.unshare(syscalls.CLONE_NEWNS)
        launched["notes"] += stage.build_stage(spec["entries"], spec["sources"], owner, userns_fd)
        user_ns.join(userns_fd)
    else:
        # Rootless, the user namespace is what grants the right to mount: first.
        user_ns.enter_rootless()
        os.environ.pop(subids.TRIED_ENV, None)  # the controller's note to launchers, not the tests'
        relay_channel = _fork_relay(spec, None)
        syscalls.unshare(syscalls.CLONE_NEWNS)
        launched["notes"] += stage.build_stage(spec["entries"], spec["sources"], (0, 0))
        _lock_stage_mounts(launched)
    # Changing uids (root's join above) clears the parent-death signal: set it again.
    process.die_with_parent(controller)
    # Module-level code of test files runs in the host during collection: give it no
    # network, no host hostname or SysV IPC, and no host process to signal. The pid
    # namespace, owned by our user namespace, is also what lets the factory make one
    # per container before forking its init (factory.py).
    syscalls.unshare(namespaces.HOST_LATE_FLAGS)
    network.bring_up_loopback()
    socket.sethostname(spec["hostname"])
    if spec["env"] is not None:
        # An image's interpreter: the image's environment, not the controller's (its
        # PYTHONHOME or venv would point it at another Python); it imports pytest and
        # this plugin from the controller's packages, bound at their own paths.
        for name in [n for n in os.environ if n.startswith("PYTHON") or n == "VIRTUAL_ENV"]:
            del os.environ[name]
        os.environ.update(spec["env"])
        os.environ["PYTHONPATH"] = ":".join(spec["python_path"])
    # Temporary files go to the containers' own /tmp, not to a host path they lack.
    os.environ["TMPDIR"] = "/tmp"
    os.environ.pop("PYTEST_DEBUG_TEMPROOT", None)
    try:
        os.chdir(spec["cwd"])
    except OSError:
        os.chdir("/")
    return relay_channel


def _lock_stage_mounts(launched: dict) -> None:
    """Rootless: move into a second user namespace, made after the stage, and a mount
    namespace of its own. A mount namespace made in a less privileged user namespace
    than its source's gets every inherited mount locked (MNT_LOCK_*): container root,
    even with cap_add=SYS_ADMIN, cannot make the read-only image writable or unmount
    what hides the stage. (As root the stage's mount namespace belongs to the initial
    user namespace: they are locked already.) It maps every id of the first one onto
    itself (``0 0 1``, or ``0 0 N+1`` with a subordinate range): nothing else changes."""
    try:
        user_ns.enter_nested_rootless()
        syscalls.unshare(syscalls.CLONE_NEWNS)
    except OSError as exc:
        launched["mounts_unlocked"] = process.describe_error(exc)
        launched["notes"].append(f"the image's mounts could not be locked (a nested user namespace: "
                                 f"{exc.strerror}): tests with cap_add=SYS_ADMIN are refused")


def _fork_relay(spec: dict, userns_fd: int | None) -> link.Channel | None:
    """The relay (relay.py) of allow= and outbound=, if the run has any: in the
    machine's network and mount namespaces (it connects out, and runs slirp4netns
    from this machine, whatever the image), in the containers' user namespace (as
    root: joined first, so it is no real root). The factory's end of its channel."""
    if not spec["allow"] and not spec["outbound"]:
        return None
    launcher = os.getpid()
    factory_end, relay_end = link.Channel.pair()
    if os.fork() == 0:
        try:
            relay.preload()
            if userns_fd is not None:
                user_ns.join(userns_fd)
            process.die_with_parent(launcher)
            factory_end.close()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # execnet's pipes belong to the host alone
                os.dup2(null, fd)
            process.close_fds_except({0, 1, 2, relay_end.fileno()})
            relay.serve(relay_end, {(host, port, proto) for host, port, proto in spec["allow"]}, spec["outbound"])
        finally:
            os._exit(0)
    relay_end.close()
    return factory_end


def _fork_factory(host_end: link.Channel, factory_end: link.Channel, spec: dict,
                  relay_channel: link.Channel | None = None) -> None:
    """The init factory (see factory.py): forked now, while this process is small."""
    host = os.getpid()
    if os.fork() == 0:
        try:
            process.die_with_parent(host)
            host_end.close()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)  # execnet's pipes belong to the host alone
            os.dup2(null, 1)
            os.close(null)
            factory.serve(factory_end, spec["entries"], spec["library_path"], relay_channel, spec["networks"])
        finally:
            os._exit(0)
    factory_end.close()
