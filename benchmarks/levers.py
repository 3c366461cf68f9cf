"""What each performance lever of the container runtime buys, measured one by one, A/B.

    python benchmarks/levers.py              # measure, print, rewrite the section in docs/performance.md
    python benchmarks/levers.py --print      # measure and print only
    python benchmarks/levers.py --scale 0.2  # fewer iterations (smoke test); --only 1,4 picks levers

Each lever is one function below; its docstring says what A (without the lever) and B (with
it) are. A and B are interleaved (A, B, A, B, ...) so that a noisy moment of the machine hits
both; figures are the median and p10-p90 per operation. Every lever runs in a forked child
and every operation in children of that one, so nothing (namespaces, mounts, memory, seccomp
filters) leaks; a lever that cannot run here is reported as "not run: <why>". Run it as root
for the cgroup v1 lever.
"""

from __future__ import annotations

import argparse, gc, json, os, re, resource, select, shutil  # noqa: E401
import signal, socket, statistics, struct, subprocess, sys, time, traceback  # noqa: E401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from pytest_isolate.runtime import (capabilities, hugepages, network, seccomp,  # noqa: E402
                                    seccomp_default, syscalls, tiny_init, user_ns)
from _lever_report import describe, machine, markdown, table, text  # noqa: E402

BEGIN, END = "<!-- levers:begin -->", "<!-- levers:end -->"
SCALE = 1.0
now = time.perf_counter  # CLOCK_MONOTONIC: comparable between processes

class NotRun(Exception):
    """A lever that cannot run on this machine; the message says why."""


# -- helpers ---------------------------------------------------------------------------

def iterations(base: int) -> int:
    return max(3, round(base * SCALE))

def in_child(fn):
    """fn() run in a forked child; its JSON-able result comes back through a memfd."""
    out, _ = os.memfd_create("levers"), sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        signal.alarm(900)
        try:
            result = {"ok": fn()}
        except BaseException as exc:  # noqa: BLE001 - reported across the fork
            result = {"not_run": str(exc) if isinstance(exc, NotRun) else f"{type(exc).__name__}: {exc}"}
        os.write(out, json.dumps(result).encode())
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    result = json.loads(os.pread(out, os.fstat(out).st_size, 0) or b"{}")
    os.close(out)
    if "ok" not in result:
        raise NotRun(result.get("not_run", f"the child died (wait status {status})"))
    return result["ok"]

def fork_wait(child=lambda: None) -> float:
    """Seconds from fork until the child, which runs child() and exits, is reaped."""
    start = now()
    pid = os.fork()
    if pid == 0:
        try:
            child()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    elapsed = now() - start
    if status:
        raise RuntimeError(f"a measured child failed (wait status {status})")
    return elapsed

def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

def interleave(n: int, a, b, warmup: int = 1) -> tuple[list, list]:
    """a() and b() called alternately, n times each, after `warmup` discarded rounds."""
    pairs = [(a(), b()) for _ in range(warmup + n)][warmup:]
    return [x for x, _ in pairs], [y for _, y in pairs]

def row(metric: str, a: list, b: list, unit: str = "time", note: str = "") -> dict:
    return {"metric": metric, "a": a, "b": b, "unit": unit, "note": note}

def rows(a: list, b: list, *specs: tuple) -> list[dict]:
    """One row per field of tuple samples; each spec is (metric, unit, note)."""
    return [row(metric, [x[i] for x in a], [x[i] for x in b], unit, note)
            for i, (metric, unit, note) in enumerate(specs)]

def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def ballast(total_mb: float) -> list:
    """Small GC-tracked objects (tuples holding dicts holding lists) until the RSS is
    total_mb: what a test module's imports and data look like to fork and to the GC."""
    heap: list = []
    gc.disable()
    while rss_mb() < total_mb:
        heap.extend((i, {"n": [i]}) for i in range(20_000))
    return heap

class Forker:
    """A process that runs setup() and then, on each request, times a fork + _exit +
    waitpid: returns [wall, its own CPU, the child's CPU]."""
    ends: list = []  # of every Forker: a later one must not hold them open

    def __init__(self, setup):
        self.sock, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                for sock in Forker.ends + [self.sock]:
                    sock.close()
                keep = setup()  # noqa: F841 - held while forking
                theirs.send(json.dumps(rss_mb()).encode())
                while theirs.recv(1) == b"f":
                    cpu, kids = time.process_time(), children_cpu()
                    wall = fork_wait()
                    theirs.send(json.dumps([wall, time.process_time() - cpu, children_cpu() - kids]).encode())
            finally:
                os._exit(0)
        theirs.close()
        Forker.ends.append(self.sock)
        self.rss = json.loads(self.sock.recv(4096) or b"null")
        if self.rss is None:
            raise RuntimeError("a forking helper failed to start")

    def fork(self) -> list:
        self.sock.send(b"f")
        return json.loads(self.sock.recv(4096))

    def close(self) -> None:
        Forker.ends.remove(self.sock)
        self.sock.close()
        os.waitpid(self.pid, 0)


# -- the levers ------------------------------------------------------------------------

def lever_pid_ns():
    """pid namespace made before the fork
    A: fork a child that unshares CLONE_NEWPID and forks again, so that the grandchild is pid 1.
    B: the parent unshares CLONE_NEWPID, forks (the child is pid 1) and setns()es back to its own pid namespace.
    Both in a user namespace, in a process that is pid 1 of a pid namespace that user namespace owns (setns back needs it); timed until pid 1 has run and been reaped.
    """
    user_ns.enter()
    syscalls.unshare(syscalls.CLONE_NEWPID)

    def bench():  # runs as pid 1 of the new pid namespace
        own = os.open("/proc/self/ns/pid", os.O_RDONLY)

        def b():
            start = now()
            syscalls.unshare(syscalls.CLONE_NEWPID)
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            syscalls.setns(own, syscalls.CLONE_NEWPID)
            os.waitpid(pid, 0)
            return now() - start

        n = iterations(500)
        a = lambda: fork_wait(lambda: (syscalls.unshare(syscalls.CLONE_NEWPID), fork_wait()))  # noqa: E731
        return [row("until pid 1 is reaped", *interleave(n, a, b), note=f"{n} runs each")]
    return in_child(bench)

def lever_gc_freeze():
    """gc.freeze() before forking
    A: a process holding ~100 MB of small Python objects forks children that each run gc.collect() (what their first automatic collection would do) and exit.
    B: the same after gc.freeze() in the parent: the collection skips the frozen objects, whose pages stay shared.
    """
    heap = ballast(rss_mb() + 100)
    gc.collect()

    def run(freeze: bool):
        gc.freeze() if freeze else gc.unfreeze()
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        wall = fork_wait(gc.collect)
        return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults

    n = iterations(40)
    a, b = interleave(n, lambda: run(False), lambda: run(True))
    note = f"{len(heap):,} tuples, RSS {rss_mb():.0f} MB; {n} runs each"
    return rows(a, b, ("child, fork to reaped", "time", note), ("child's minor faults", "count", ""))

def lever_fork_memory():
    """fork from a small process
    A: fork + _exit + waitpid from a process holding 150 MB of small Python objects (a test module's process).
    B: the same from a process holding 30 MB: why containers are built by a small factory and tests forked from a zygote.
    """
    return compare_forkers(lambda: ballast(150), lambda: ballast(30))

def compare_forkers(setup_a, setup_b) -> list[dict]:
    """fork + exit + wait from a Forker set up by setup_a (A) and one by setup_b (B)."""
    fa, fb = Forker(setup_a), Forker(setup_b)
    try:
        n = iterations(150)
        a, b = interleave(n, fa.fork, fb.fork)
    finally:
        fa.close()
        fb.close()
    note = f"RSS {fa.rss:.0f} vs {fb.rss:.0f} MB; {n} runs each"
    return rows(a, b, ("fork + exit + wait, wall", "time", note),
                ("forking process's CPU", "time", ""), ("child's CPU (mostly its exit)", "time", ""))

def lever_seccomp():
    """seccomp profile compiled once
    A: a forked child sets no_new_privs, compiles the default profile with libseccomp (and the argument filter) and loads both.
    B: a forked child sets no_new_privs and loads the two programs compiled once, before forking.
    Per child, minus the median of a plain fork + exit + wait timed in the same rounds.
    """
    program = seccomp.compile_profile(seccomp_default.default_profile())  # loads libseccomp, as a session does
    terminal = seccomp.argument_filter(seccomp_default.TERMINAL_INJECTION)

    def a():
        capabilities.set_no_new_privs()
        seccomp.load(seccomp.compile_profile(seccomp_default.default_profile()))
        seccomp.load(seccomp.argument_filter(seccomp_default.TERMINAL_INJECTION))

    def b():
        capabilities.set_no_new_privs()
        seccomp.load(program)
        seccomp.load(terminal)

    n = iterations(200)
    samples = [(fork_wait(), fork_wait(a), fork_wait(b)) for _ in range(n + 1)][1:]
    floor = statistics.median(s[0] for s in samples)
    note = f"plain fork: {fmt([floor])}; {len(program) // 8} + {len(terminal) // 8} BPF instructions; {n} runs each"
    return [row("per child, minus a plain fork", [s[1] - floor for s in samples],
                [s[2] - floor for s in samples], note=note)]

def lever_cgroup_v1():
    """no per-test cgroup migration (cgroup v1)
    A: a forked child writes its own pid to cgroup.procs of a v1 cgroup, then exits: a migration per test.
    B: a process already in that cgroup forks a child that just exits (no write).
    "Back to back": blocks of 10 A then 10 B; "after a quiet 50 ms": a 50 ms sleep before each, so that a migration cannot reuse the RCU grace period of the previous one.
    """
    if os.geteuid() != 0:
        raise NotRun("needs root (the v1 hierarchies are root's)")
    with open("/proc/self/mounts") as f:
        roots = {opt: m.split()[1] for m in f if m.split()[2] == "cgroup" for opt in m.split()[3].split(",")}
    hierarchy = roots.get("pids") or roots.get("memory")
    if not hierarchy:
        raise NotRun("no cgroup v1 pids or memory hierarchy mounted")
    path = os.path.join(hierarchy, f"pytest-isolate-levers-{os.getpid()}")

    def join():
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    os.mkdir(path)
    inside = None
    try:
        inside = Forker(join)
        a, b = lambda: fork_wait(join), lambda: inside.fork()[0]
        blocks = iterations(20)
        burst = [([a() for _ in range(10)], [b() for _ in range(10)]) for _ in range(blocks + 1)][1:]
        quiet = iterations(60)
        quiet_a, quiet_b = interleave(quiet, lambda: (time.sleep(0.05), a())[1],
                                      lambda: (time.sleep(0.05), b())[1])
    finally:
        if inside:
            inside.close()
        for _ in range(100):  # the last tasks leave the cgroup a little after they are reaped
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.02)
    leftover = f"; could not remove {path}" if os.path.exists(path) else ""
    return [row("fork + exit + wait, back to back", [x for xs, _ in burst for x in xs],
                [y for _, ys in burst for y in ys],
                note=f"{os.path.basename(hierarchy)} hierarchy; {10 * blocks} runs each{leftover}"),
            row("the same, after a quiet 50 ms", quiet_a, quiet_b, note=f"{quiet} runs each")]

def lever_loopback():
    """lo brought up with an ioctl instead of pyroute2
    A: pyroute2's IPRoute().link("set", index=1, state="up"), then close (pyroute2 imported and warmed up beforehand).
    B: pytest_isolate.runtime.network.bring_up_loopback(): SIOCGIFFLAGS + SIOCSIFFLAGS on a throwaway socket.
    Each in a fresh network namespace (a forked child of the user namespace unshares CLONE_NEWNET); only the call is timed.
    """
    probe = [sys.executable, "-c", "import time; t = time.perf_counter(); import pyroute2; print(time.perf_counter() - t)"]
    runs = [subprocess.run(probe, capture_output=True, text=True) for _ in range(5)]
    if any(r.returncode for r in runs):
        raise NotRun("pyroute2 cannot be imported: " + (runs[0].stderr.strip().splitlines() or ["?"])[-1])
    import_s = statistics.median(float(r.stdout) for r in runs)
    import fcntl, pyroute2  # noqa: E401 - before entering the user namespace, which may not read the stdlib
    with pyroute2.IPRoute():  # warmed up: whatever it caches, the children inherit
        pass
    user_ns.enter()

    def pyroute():
        with pyroute2.IPRoute() as ipr:
            ipr.link("set", index=1, state="up")

    def in_netns(call):
        def child():
            syscalls.unshare(syscalls.CLONE_NEWNET)
            start = now()
            call()
            elapsed = now() - start
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                flags = fcntl.ioctl(sock, network.SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
            if not struct.unpack("16sH14x", flags)[1] & network.IFF_UP:
                raise RuntimeError("lo is still down")
            return elapsed
        return lambda: in_child(child)

    n = iterations(200)
    a, b = interleave(n, in_netns(pyroute), in_netns(network.bring_up_loopback))
    return [row("bring lo up", a, b, note=f"`import pyroute2` in a fresh interpreter: {fmt([import_s])} "
                f"(median of 5); {n} runs each")]

def lever_overlay():
    """overlay mounted with mount(2) instead of mount(8)
    A: subprocess `mount -t overlay overlay -o lowerdir=...,upperdir=...,workdir=...,userxattr TARGET`, then subprocess `umount TARGET`.
    B: pytest_isolate.runtime.syscalls.mount() with the same options, then syscalls.umount2().
    In a user and mount namespace, on a tmpfs scratch dir; fresh upper and work dirs each time, made untimed.
    """
    if not (shutil.which("mount") and shutil.which("umount")):
        raise NotRun("mount(8) not installed")
    user_ns.enter()
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    syscalls.mount("tmpfs", "/tmp", "tmpfs", 0, "mode=0755")
    os.makedirs("/tmp/lower/dir")
    os.mkdir("/tmp/target")
    count = iter(range(10**6))

    def timed(mount, umount):
        i = next(count)
        os.mkdir(f"/tmp/upper{i}")
        os.mkdir(f"/tmp/work{i}")
        opts = f"lowerdir=/tmp/lower,upperdir=/tmp/upper{i},workdir=/tmp/work{i},userxattr"
        start = now()
        mount(opts)
        umount()
        return now() - start

    a = lambda: timed(lambda o: subprocess.run(["mount", "-t", "overlay", "overlay", "-o", o, "/tmp/target"], check=True),  # noqa: E731
                      lambda: subprocess.run(["umount", "/tmp/target"], check=True))
    b = lambda: timed(lambda o: syscalls.mount("overlay", "/tmp/target", "overlay", 0, o),  # noqa: E731
                      lambda: syscalls.umount2("/tmp/target"))
    n = iterations(150)
    return [row("mount + umount", *interleave(n, a, b), note=f"{n} runs each")]

def lever_teardown():
    """namespace teardown off the critical path
    A: a forked child (in the user namespace) unshares mount, net, uts and ipc namespaces, mounts a tmpfs and exits; the parent goes on when waitpid() returns.
    B: the same child says "done" through a pipe before it exits; the parent goes on when it reads that (exit and teardown go on in the background; the child is reaped later, untimed).
    """
    user_ns.enter()
    flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWNET | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC

    def run(background: bool, sample_cpu: bool = False):
        r, w = os.pipe()
        cpu, start = children_cpu(), now()
        pid = os.fork()
        if pid == 0:
            syscalls.unshare(flags)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            syscalls.mount("tmpfs", "/tmp", "tmpfs")
            used = time.process_time() if sample_cpu else 0.0
            os.write(w, struct.pack("dd", now(), used))  # done; the teardown is next
            os._exit(0)
        os.close(w)
        if not background:
            os.waitpid(pid, 0)
        done_at, used = struct.unpack("dd", os.read(r, 16))
        critical = now() - start
        if background:
            os.waitpid(pid, 0)
        os.close(r)
        return critical, done_at - start, now() - done_at, children_cpu() - cpu - used

    n = iterations(300)
    a, b = interleave(n, lambda: run(False), lambda: run(True))
    # Reading its own CPU time just before "done" made the woken parent wait for the
    # exiting child here (~0.3 ms), so the CPU is sampled in separate, untimed runs.
    cpu_a, cpu_b = interleave(iterations(100), lambda: run(False, True)[3], lambda: run(True, True)[3])
    return rows(a, b, ("until the parent goes on", "time", f"{n} runs each"),
                ("the child's work: fork to done", "time", ""),
                ("teardown: done to reaped, wall", "time", "still paid, in the background in B")) + [
        row("teardown: the child's CPU after done", cpu_a, cpu_b, note="sampled in separate runs; kernel "
            "workers (net namespace cleanup, RCU callbacks) are not counted")]

def lever_events():
    """events through a memfd instead of a pipe
    A: the forked test writes 5 small frames to a pipe; the parent select()s and reads each as it arrives (a wakeup per frame).
    B: the test writes the frames to a memfd and one byte to a notify pipe at the end; the parent wakes once and reads the memfd.
    The test spins 50 µs before each frame (its phases); timed from fork to reaped; the parent's CPU and context switches (voluntary + involuntary).
    """
    frames = [json.dumps({"event": e, "nodeid": "test_mod.py::test_0"}).encode()
              for e in ("start", "setup", "call", "teardown", "report")]
    total = sum(4 + len(frame) for frame in frames)

    def run(memfd: bool):
        usage, cpu, start = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), now()
        r, w = os.pipe()
        sink = os.memfd_create("events") if memfd else w
        pid = os.fork()
        if pid == 0:
            for frame in frames:
                deadline = now() + 50e-6
                while now() < deadline:
                    pass
                os.write(sink, struct.pack("I", len(frame)) + frame)
            os.write(w, b"!") if memfd else None
            os._exit(0)
        os.close(w)
        data = b""
        while len(data) < total:
            select.select([r], [], [])
            chunk = os.read(r, 65536)
            if not chunk:
                raise RuntimeError("the test exited before sending every frame")
            data = os.pread(sink, os.fstat(sink).st_size, 0) if memfd else data + chunk
        os.close(r)
        os.close(sink) if memfd else None
        os.waitpid(pid, 0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        switches = after.ru_nvcsw + after.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw
        return now() - start, time.process_time() - cpu, switches

    n = iterations(500)
    a, b = interleave(n, lambda: run(False), lambda: run(True))
    return rows(a, b, ("per test, fork to reaped", "time", f"{n} runs each"),
                ("parent's CPU", "time", ""), ("parent's context switches", "count", ""))

def lever_tiny_init():
    """container init: a static program, not a fork
    A: the factory forks init, which names itself, closes its fds and sleeps in Python (the fallback where tiny_init.py has no machine code).
    B: the factory posix_spawn()s the 185-byte static init (tiny_init.py).
    Timed until init sleeps (A: it says so through a pipe; B: its state in /proc), then SIGKILLed and reaped; from a process of the factory's size (this one, which imported the runtime).
    """
    if tiny_init.program() is None:
        raise NotRun("no machine code for this architecture")
    path = f"/tmp/isolate-init-lever-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(tiny_init.program())
    os.chmod(path, 0o755)

    def forked():
        r, w = os.pipe()
        start, cpu, kids = now(), time.process_time(), children_cpu()
        pid = os.fork()
        if pid == 0:
            os.closerange(3, r)
            os.write(w, b"x")
            os.closerange(0, 1 << 20)
            while True:
                signal.pause()
        os.read(r, 1)
        return finish(pid, start, cpu, kids, (r, w))

    def spawned():
        start, cpu, kids = now(), time.process_time(), children_cpu()
        pid = os.posix_spawn(path, [path], {})
        while True:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "S":
                    break
        return finish(pid, start, cpu, kids, ())

    def finish(pid, start, cpu, kids, fds):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
        return now() - start, time.process_time() - cpu, children_cpu() - kids

    try:
        n = iterations(300)
        a, b = interleave(n, forked, spawned)
    finally:
        os.unlink(path)
    return rows(a, b, ("until init sleeps, then reaped", "time", f"RSS {rss_mb():.0f} MB; {n} runs each"),
                ("factory's CPU", "time", ""), ("init's CPU", "time", ""))

def lever_hugepages():
    """huge pages before the zygote forks
    A: fork + _exit + waitpid from a process holding 150 MB of small Python objects (a test module's process).
    B: the same after hugepages.collapse() in that process (MADV_COLLAPSE of its mostly-resident anonymous memory).
    """
    def collapsed():
        heap = ballast(150)
        if not hugepages.collapse(budget=5):
            raise NotRun("MADV_COLLAPSE collapsed nothing (Linux < 6.1, or transparent huge pages off)")
        return heap

    return compare_forkers(lambda: ballast(150), collapsed)

LEVERS = [lever_pid_ns, lever_gc_freeze, lever_fork_memory, lever_seccomp, lever_cgroup_v1,
          lever_loopback, lever_overlay, lever_teardown, lever_events, lever_tiny_init, lever_hugepages]


# -- the report ------------------------------------------------------------------------

def main() -> None:
    global SCALE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "docs"),
                        help="directory holding performance.md, whose levers section is rewritten")
    parser.add_argument("--print", action="store_true", help="print only, write nothing")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every iteration count")
    parser.add_argument("--only", help="comma-separated lever numbers (implies --print)")
    args = parser.parse_args()
    SCALE = args.scale
    only = {int(x) for x in args.only.split(",")} if args.only else None
    started, results = now(), []
    for number, lever in enumerate(LEVERS, 1):
        if only and number not in only:
            continue
        print(f"[{number}/{len(LEVERS)}] {describe(lever)['title']} ...", file=sys.stderr, flush=True)
        try:
            results.append((number, lever, in_child(lever)))
        except NotRun as exc:
            results.append((number, lever, str(exc)))
    took = now() - started
    print(f"{machine()}; took {took:.0f} s; median (p10–p90) per operation\n\n{text(table(results))}")
    if args.print or only:
        return
    path = os.path.join(args.out, "performance.md")
    with open(path) as f:
        doc = f.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        sys.exit(f"{path}: no {BEGIN} ... {END} markers")
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{markdown(results, took)}\n{END}", doc, count=1))
    print(f"\nwrote {path}")

if __name__ == "__main__":
    main()
