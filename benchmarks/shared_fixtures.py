"""What sharing an expensive session fixture buys (isolate_shared_fixtures).

    python benchmarks/shared_fixtures.py                 # 20 tests, 3 repetitions
    python benchmarks/shared_fixtures.py --tests 50 --repeat 5 --seconds 1

Writes a small suite whose session fixture takes --seconds to set up (a sleep, then a
data set of 200,000 rows built in memory) and that --tests tests use; then runs it, in
turns, plain (no plugin), with --isolate, and with --isolate and the fixture shared.
Prints the median wall time of each and the per-test cost over plain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFTEST = """
import time, pytest

@pytest.fixture(scope="session")
def dataset():
    time.sleep({seconds})                      # e.g. loading a file, building a schema
    return {{i: str(i) for i in range(200_000)}}
"""

TESTS = """
import pytest

@pytest.mark.parametrize("n", range({tests}))
def test_lookup(dataset, n):
    assert dataset[n] == str(n)
"""

RUNS = {
    "plain": ["-p", "no:isolate"],
    "--isolate": ["--isolate"],
    "--isolate, shared": ["--isolate", "-o", "isolate_shared_fixtures=dataset"],
}


def run_once(folder: str, args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shared-bench-") as folder:
        with open(os.path.join(folder, "conftest.py"), "w") as f:
            f.write(CONFTEST.format(seconds=options.seconds))
        with open(os.path.join(folder, "test_lookup.py"), "w") as f:
            f.write(TESTS.format(tests=options.tests))
        with open(os.path.join(folder, "pytest.ini"), "w") as f:
            f.write("[pytest]\n")
        times: dict[str, list[float]] = {name: [] for name in RUNS}
        for _ in range(options.repeat):  # interleaved: a noisy moment hits every variant
            for name, args in RUNS.items():
                times[name].append(run_once(folder, args))
    plain = statistics.median(times["plain"])
    print(f"{options.tests} tests, a session fixture of {options.seconds:g} s, median of {options.repeat}:")
    print("| run | wall time | per test over plain |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} s | {(median - plain) / options.tests * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
