"""Run a suite one fresh ``python -m pytest NODEID`` per test inside a sandbox (what
pytest-bwrap and "a container per test" do). bench.py times this whole script.

    python _pertest.py --sandbox bwrap|crun|podman --python PY --dir SUITE [--junit-dir D]

It collects the node ids once (outside any sandbox), runs each in turn, and ends with
the line ``N passed, M failed``; the exit status is 1 if any run failed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp", "LANG": "C.UTF-8"}
HYBRID_CONTROLLERS = "/sys/fs/cgroup/unified/cgroup.controllers"


def collect(python: str, directory: str) -> list[str]:
    out = subprocess.run([python, *PYTEST, "--collect-only"], cwd=directory, env=ENV,
                         capture_output=True, text=True, timeout=120)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode != 0 or not ids:
        sys.exit(f"collection failed ({out.returncode}): {out.stdout[-400:]}{out.stderr[-400:]}")
    return ids


def bwrap(python: str, directory: str, junit: str | None) -> list[str]:
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session",
           "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
           "--ro-bind", directory, directory]
    if junit:
        cmd += ["--bind", junit, junit]
    return cmd + ["--chdir", directory, python]


def podman(python: str, directory: str, junit: str | None) -> list[str]:
    # The flags this host needs (see the notes); --rootfs / runs the host's own tree.
    cmd = ["podman", "--cgroup-manager=cgroupfs", "--runtime", "runc", "run", "--rm",
           "--network", "none", "--read-only", "--ulimit", "nofile=20000:20000",
           "--ulimit", "nproc=32768:32768", "-v", f"{directory}:{directory}:ro"]
    if junit:
        cmd += ["-v", f"{junit}:{junit}"]
    return cmd + ["-w", directory, "--rootfs", "/", python]


class Crun:
    """One OCI bundle whose root is the host's /, bound read-only; one `crun run` a test.

    This host mounts cgroup v1 and cgroup2 side by side ("hybrid"), which crun refuses
    while cgroup2 lists controllers: in a private mount namespace of this script the
    controllers file is hidden under /dev/null, and crun runs with cgroups disabled.
    """

    def __init__(self, bundle: str, directory: str, junit: str | None) -> None:
        self.bundle, self.directory, self.junit = bundle, directory, junit
        self.rootfs = os.path.join(bundle, "rootfs")
        os.makedirs(self.rootfs, exist_ok=True)
        self._private_mounts()
        self.count = 0

    def _private_mounts(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18

        def check(result: int, what: str) -> None:
            if result != 0:
                sys.exit(f"crun setup: {what}: {os.strerror(ctypes.get_errno())}")

        check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
        check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "make / private")
        if os.path.exists(HYBRID_CONTROLLERS):
            with open(HYBRID_CONTROLLERS) as f:
                if f.read().strip():
                    check(libc.mount(b"/dev/null", HYBRID_CONTROLLERS.encode(), None, ms_bind, None),
                          "hide cgroup2's controllers")
        check(libc.mount(b"/", self.rootfs.encode(), None, ms_bind | ms_rec, None), "bind / as rootfs")

    def config(self, args: list[str]) -> dict:
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        ]
        if not self.directory.startswith("/tmp/"):  # a tmpfs there would hide the suite
            mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777"]})
        mounts.append({"destination": self.directory, "type": "bind", "source": self.directory,
                       "options": ["rbind", "ro"]})
        if self.junit:
            mounts.append({"destination": self.junit, "type": "bind", "source": self.junit,
                           "options": ["rbind", "rw"]})
        return {
            "ociVersion": "1.0.0",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                        "env": [f"{k}={v}" for k, v in ENV.items()], "cwd": self.directory,
                        "noNewPrivileges": True},
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "bench",
            "mounts": mounts,
            "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                      "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                      "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
        }

    def command(self, args: list[str]) -> list[str]:
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(self.config(args), f)
        self.count += 1
        return ["crun", "--cgroup-manager=disabled", "run", "--bundle", self.bundle,
                f"bench-{os.getpid()}-{self.count}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandbox", choices=["bwrap", "crun", "podman"], required=True)
    parser.add_argument("--python", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--bundle", help="crun: a scratch directory for the bundle")
    parser.add_argument("--junit-dir")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    directory = os.path.realpath(args.dir)
    ids = collect(args.python, directory)
    crun = Crun(args.bundle, directory, args.junit_dir) if args.sandbox == "crun" else None
    passed = failed = 0
    first_failure = ""
    for i, nodeid in enumerate(ids):
        pytest_args = [*PYTEST, nodeid]
        if args.junit_dir:
            pytest_args.append(f"--junitxml={os.path.join(args.junit_dir, f'{i}.xml')}")
        if crun:
            cmd = crun.command([args.python, *pytest_args])
        elif args.sandbox == "bwrap":
            cmd = bwrap(args.python, directory, args.junit_dir) + pytest_args
        else:
            cmd = podman(args.python, directory, args.junit_dir) + pytest_args
        try:
            run = subprocess.run(cmd, cwd=directory, env=ENV, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=args.timeout)
            ok = run.returncode == 0
        except subprocess.TimeoutExpired:
            run, ok = None, False
        if ok:
            passed += 1
        else:
            failed += 1
            if not first_failure:
                lines = (run.stdout + run.stderr).strip().splitlines() if run else []
                first_failure = f"{nodeid}: " + (lines[-1] if lines else "timed out")
    print(f"{passed} passed, {failed} failed")
    if first_failure:
        print(f"first failure: {first_failure}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
