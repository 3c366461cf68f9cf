"""What a fresh PostgreSQL per test costs: from a snapshot, or with initdb every time.

    python benchmarks/services.py                  # 10 tests, 5 repetitions
    python benchmarks/services.py --tests 20 --repeat 3

Runs, interleaved, suites of 1 and --tests isolated tests that each get a PostgreSQL
of their own (scope="function") and create a table in it with psql:

- snapshot=True: initdb runs once, in the template; each test's server starts from a
  copy of the initialised cluster;
- without a snapshot: each test's server runs initdb first.

The per-test cost is the slope between the two suite sizes; the fixed cost is the
suite of one test (collection, the container host, the snapshot's template).
Needs PostgreSQL (Debian: postgresql) and root (PostgreSQL runs as its own user,
which a rootless container has only with a subordinate range). Prints medians, as
a Markdown table (docs/performance.md "Networks and services").
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"))), None)
SCRIPT = """
set -e
if [ ! -d /tmp/pg ]; then
    initdb -D /tmp/pg -A trust -U postgres > /dev/null
    printf "host all all 0.0.0.0/0 trust\\nhost all all ::/0 trust\\n" >> /tmp/pg/pg_hba.conf
fi
exec postgres -D /tmp/pg -k /tmp -c listen_addresses='*'
"""
SUITE = """
import subprocess, pytest
import pytest_isolate as isolate

pg = isolate.service("pg", ["sh", "-c", {script!r}], user="postgres", ready=isolate.tcp(5432),
                     env={{"PATH": "{bin}:/usr/bin:/bin"}}, scope="function", snapshot={snapshot})

@pytest.mark.isolated
@pytest.mark.parametrize("n", range({tests}))
def test_table(pg, n):
    subprocess.run(["{bin}/psql", "-h", "pg", "-U", "postgres", "-qc", "create table t (x int)"], check=True)
"""
MODES = {"snapshot=True (initdb once)": True, "no snapshot (initdb per test)": False}


def run_suite(directory: str, snapshot: bool, tests: int) -> float:
    path = os.path.join(directory, f"test_pg_{int(snapshot)}_{tests}.py")
    with open(path, "w") as file:
        file.write(SUITE.format(script=SCRIPT, bin=PG_BIN, snapshot=snapshot, tests=tests))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", path],
                          cwd=directory, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    if f"{tests} passed" not in done.stdout:
        sys.exit(f"the suite failed:\n{done.stdout}{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if PG_BIN is None or os.geteuid() != 0:
        sys.exit("needs PostgreSQL (Debian: postgresql) and root")
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-services-") as directory:
        os.chmod(directory, 0o755)
        for _ in range(args.repeat):
            for name, snapshot in MODES.items():
                for tests in (1, args.tests):
                    times.setdefault((name, tests), []).append(run_suite(directory, snapshot, tests))
    print(f"| a fresh PostgreSQL per test | per test | a run of 1 test | a run of {args.tests} |")
    print("|---|---|---|---|")
    for name in MODES:
        one, many = (statistics.median(times[name, n]) for n in (1, args.tests))
        print(f"| {name} | **{(many - one) / (args.tests - 1) * 1000:.0f} ms** | {one:.2f} s | {many:.2f} s |")


if __name__ == "__main__":
    main()
