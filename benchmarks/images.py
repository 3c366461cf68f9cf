"""What an OCI image costs, against image="host" (docs/images.md, docs/performance.md).

    python benchmarks/images.py                # 100 trivial tests, 5 repetitions
    python benchmarks/images.py --tests 200 --repeat 3

Builds a test image here (tests/imagebuild.py: this machine's system Python, its
libraries and busybox, ≈ 80 MB) as an OCI layout, then measures, interleaved:

- the per-test overhead: the same N trivial isolated tests in image "host" and in the
  OCI image (already in the store), as (wall time - the run's start-up) / N;
- the container host's start-up in each (the "started in" of the summary);
- a cold pull and unpack of the layout into an empty store (python -m pytest_isolate
  pull), against `umoci unpack` of the same layout when umoci is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import imagebuild  # noqa: E402

TESTS = """
import pytest

@pytest.mark.parametrize("n", range({tests}))
def test_trivial(n):
    pass
"""


def run_suite(folder: str, image: str, env: dict) -> tuple[float, float]:
    """(wall seconds, the host's start-up seconds) of one run."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--isolate",
                          f"--isolate-image={image}"], cwd=folder, env=env, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    start = float(re.search(r"started in ([0-9.]+)s", out).group(1))
    return wall, start


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    why = imagebuild.can_build()
    if why:
        sys.exit(f"cannot build the test image: {why}")
    with tempfile.TemporaryDirectory(prefix="images-bench-") as work:
        rootfs = imagebuild.python_rootfs(os.path.join(work, "rootfs"))
        layout = imagebuild.oci_layout(os.path.join(work, "layout"), "bench",
                                       [imagebuild.layer_of_directory(rootfs)])
        image = f"oci:{layout}:bench"
        size = sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(rootfs) for n in names)
        suite = os.path.join(work, "suite")
        os.mkdir(suite)
        with open(os.path.join(suite, "test_trivial.py"), "w") as f:
            f.write(TESTS.format(tests=options.tests))
        with open(os.path.join(suite, "pytest.ini"), "w") as f:
            f.write("[pytest]\n")
        env = dict(os.environ, PYTEST_ISOLATE_CACHE=os.path.join(work, "cache"))
        pulls, unpacks = [], []
        for i in range(options.repeat):
            cold = dict(env, PYTEST_ISOLATE_CACHE=os.path.join(work, f"cold{i}"))
            pulls.append(timed([sys.executable, "-m", "pytest_isolate", "pull", "-q", image], cold))
            shutil.rmtree(cold["PYTEST_ISOLATE_CACHE"], ignore_errors=True)
            if shutil.which("umoci"):
                bundle = os.path.join(work, f"bundle{i}")
                unpacks.append(timed(["umoci", "unpack", "--image", f"{layout}:bench", bundle], env))
                shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pytest_isolate", "pull", "-q", image], env=env, check=True)
        results: dict[str, list[tuple[float, float]]] = {"host": [], "oci": []}
        for _ in range(options.repeat):  # interleaved
            results["host"].append(run_suite(suite, "host", env))
            results["oci"].append(run_suite(suite, image, env))
    print(f"{options.tests} trivial tests, median of {options.repeat}:")
    print("| image | wall time | container host start-up | per test |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        start = statistics.median(s for _, s in runs)
        per_test = statistics.median((w - s) / options.tests for w, s in runs)
        print(f"| {name} | {wall:.2f} s | {start * 1000:.0f} ms | {per_test * 1000:.2f} ms |")
    print(f"cold pull and unpack ({size / 1e6:.0f} MB): {statistics.median(pulls):.2f} s"
          + (f"; umoci unpack of the same layout: {statistics.median(unpacks):.2f} s" if unpacks else ""))


if __name__ == "__main__":
    main()
