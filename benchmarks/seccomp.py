"""What the default seccomp profile costs: compiling it with libseccomp, versus
loading the precompiled program in each container.

    python benchmarks/seccomp.py [--repeat 50]

Each load runs in a fresh forked child (a filter cannot be removed once loaded).
Prints medians and min-max in microseconds; docs/security.md quotes a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pytest_isolate.runtime import capabilities, seccomp, seccomp_default  # noqa: E402


def timed_in_child(action) -> float:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        capabilities.set_no_new_privs()
        start = time.perf_counter()
        action()
        os.write(write, repr(time.perf_counter() - start).encode())
        os._exit(0)
    os.close(write)
    result = float(os.read(read, 100))
    os.close(read)
    os.waitpid(pid, 0)
    return result * 1e6


def row(name: str, samples: list[float]) -> str:
    return f"| {name} | {statistics.median(samples):,.0f} | {min(samples):,.0f}–{max(samples):,.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    repeat = parser.parse_args().repeat
    profile = seccomp_default.default_profile()
    seccomp.compile_profile(profile)  # load libseccomp once, as a session does

    compile_us = []
    for _ in range(repeat):
        start = time.perf_counter()
        program = seccomp.compile_profile(profile)
        compile_us.append((time.perf_counter() - start) * 1e6)
    terminal = seccomp.argument_filter(seccomp_default.TERMINAL_INJECTION)
    load_us = [timed_in_child(lambda: (seccomp.load(program), seccomp.load(terminal))) for _ in range(repeat)]
    both_us = [timed_in_child(lambda: seccomp.load(seccomp.compile_profile(profile))) for _ in range(repeat)]

    print(f"default profile: {len(program) // 8} BPF instructions "
          f"(+{len(terminal) // 8} for the argument filter); {repeat} runs; microseconds")
    print("| step | median | min–max |")
    print("|---|---|---|")
    print(row("compile with libseccomp (once per session)", compile_us))
    print(row("load the precompiled programs (each container)", load_us))
    print(row("compile and load in each container (not done)", both_us))


if __name__ == "__main__":
    main()
