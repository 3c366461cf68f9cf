"""What private networks, services and allow= cost.

    python benchmarks/networks.py                      # 200 tests, 5 repetitions
    python benchmarks/networks.py --tests 500 --repeat 3

Runs, interleaved, suites of --tests trivial isolated tests:

- network="none" (the default) and network="backend": the per-test difference is
  what a private network costs (its veth is made by the factory ahead of the test);
- allow=["127.0.0.1:PORT"] against a local server;
- a Redis service (if redis-server is installed): the wall time of a run of one test
  that uses it over one that does not (the time to a ready Redis), against starting
  redis-server on this machine and waiting for its port (as pytest-redis does);
- the round trip from a test to its Redis service (PING, median of 2,000), against
  the same round trip on this machine's loopback.

Prints medians, as Markdown tables (docs/performance.md "Networks and services").
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PLAIN = """
import pytest

@pytest.mark.isolated({marker})
@pytest.mark.parametrize("n", range({tests}))
def test_trivial(n):
    pass
"""

REDIS = """
import socket, statistics, time, pytest
import pytest_isolate as isolate

redis = isolate.service("redis", ["redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                        ready=isolate.tcp(6379))

@pytest.mark.isolated{uses}
def test_one({argument}):
    pass

@pytest.mark.isolated
def test_round_trip(redis, record_property):
    with socket.create_connection((redis.host, redis.port)) as conn:
        times = []
        for _ in range(2000):
            started = time.perf_counter()
            conn.sendall(b"PING\\r\\n")
            conn.recv(16)
            times.append(time.perf_counter() - started)
    with open("/out/round_trip", "w") as f:
        f.write(str(statistics.median(times)))
"""


def run(folder: str, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def write(folder: str, name: str, text: str) -> None:
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def server() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def per_test(options) -> None:
    port = server()
    variants = {"network=none": "", "network=backend": "network='backend'",
                "allow=[127.0.0.1:PORT]": f"allow=['127.0.0.1:{port}']"}
    times: dict[str, list[float]] = {name: [] for name in variants}
    small: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="net-bench-") as folder:
        write(folder, "pytest.ini", "[pytest]\n")
        for _ in range(options.repeat):
            for name, marker in variants.items():
                write(folder, "test_many.py", PLAIN.format(marker=marker, tests=options.tests))
                times[name].append(run(folder, "test_many.py"))
                write(folder, "test_many.py", PLAIN.format(marker=marker, tests=1))
                small[name].append(run(folder, "test_many.py"))
    print(f"\nPer test ({options.tests} trivial tests; slope over a 1-test run, median of {options.repeat}):")
    print("| network | per test | over network=none |")
    print("|---|---|---|")
    base = None
    for name in variants:
        slope = (statistics.median(times[name]) - statistics.median(small[name])) / (options.tests - 1) * 1000
        base = slope if base is None else base
        print(f"| {name} | {slope:.2f} ms | {slope - base:+.2f} ms |")


def redis_times(options) -> None:
    if shutil.which("redis-server") is None:
        print("\n(redis-server not installed: no service numbers)")
        return
    with tempfile.TemporaryDirectory(prefix="net-bench-") as folder:
        out = os.path.join(folder, "out")
        os.mkdir(out)
        os.chmod(out, 0o777)
        write(folder, "pytest.ini", f"[pytest]\nisolate_mounts = {out}:/out:rw\n")
        without, with_redis, trips, host_start = [], [], [], []
        for _ in range(options.repeat):
            write(folder, "test_redis.py", REDIS.format(uses="", argument=""))
            without.append(run(folder, "test_redis.py::test_one"))
            write(folder, "test_redis.py", REDIS.format(uses="", argument="redis"))
            with_redis.append(run(folder, "test_redis.py::test_one"))
            run(folder, "test_redis.py::test_round_trip")
            with open(os.path.join(out, "round_trip")) as f:
                trips.append(float(f.read()))
            host_start.append(start_host_redis())
        loopback = host_round_trip()
    print(f"\nA Redis service (median of {options.repeat}):")
    print("| what | time |")
    print("|---|---|")
    print(f"| run with 1 test using the service, over one without (time to a ready Redis) | "
          f"{(statistics.median(with_redis) - statistics.median(without)) * 1000:.0f} ms |")
    print(f"| redis-server started on this machine, until its port accepts (pytest-redis's way) | "
          f"{statistics.median(host_start) * 1000:.0f} ms |")
    print(f"| round trip test -> service (PING, median of 2,000) | {statistics.median(trips) * 1e6:.0f} µs |")
    print(f"| round trip on this machine's loopback (PING) | {loopback * 1e6:.0f} µs |")


def start_host_redis() -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return time.perf_counter() - started
            except OSError:
                time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()


def host_round_trip() -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    try:
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                time.sleep(0.005)
        times = []
        with conn:
            for _ in range(2000):
                started = time.perf_counter()
                conn.sendall(b"PING\r\n")
                conn.recv(16)
                times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    per_test(options)
    redis_times(options)


if __name__ == "__main__":
    main()
