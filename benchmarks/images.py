"""What an OCI image costs, against image="host" (docs/images.md, docs/performance.md).

    python benchmarks/images.py                # 100 trivial tests, 5 repetitions
    python benchmarks/images.py --tests 200 --repeat 3
    python benchmarks/images.py --debian DIR   # DIR: what ci/images/debian.sh prints

Builds a test image here (tests/imagebuild.py: this machine's system Python, its
libraries and busybox, ≈ 80 MB) as an OCI layout, then measures, interleaved:

- the per-test overhead: the same N trivial isolated tests in image "host" and in the
  OCI image (already in the store), as (wall time - the run's start-up) / N;
- the container host's start-up in each (the "started in" of the summary);
- a cold pull and unpack of the layout into an empty store (python -m pytest_isolate
  pull), against `umoci unpack` of the same layout when umoci is installed.

With the Debian image of ci/images/debian.sh (--debian DIR, else
$PYTEST_ISOLATE_DEBIAN_IMAGE, else its cached build; left out, saying why, when there is
none), also: the per-test overhead and start-up in it, and a cold pull and unpack of it
from a docker-registry on 127.0.0.1 (python -m pytest_isolate pull docker://…) against
`skopeo copy docker://… oci:…` then `umoci unpack` of the same image, in the same run,
alternating which goes first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

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


# -- the Debian image of ci/images/debian.sh, pulled from a loopback registry -------------

DEBIAN_PUBLISHED = "/var/cache/pytest-isolate-images/debian-bookworm"


def debian_missing(folder: str) -> str | None:
    """Why the Debian image cannot be measured, or None."""
    if not os.path.isfile(os.path.join(folder, "complete")):
        return f"no image in {folder}: build it with `bash ci/images/debian.sh` (as root)"
    for tool in ("docker-registry", "skopeo", "umoci"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


@contextlib.contextmanager
def loopback_registry(work: str) -> Iterator[str]:
    """host:port of Debian's docker-registry, listening on 127.0.0.1 only."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = os.path.join(work, "registry.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n")
    process = subprocess.Popen(["docker-registry", "serve", config], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # it logs every HEAD of a blob not yet pushed
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("docker-registry did not start") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def tree_size(root: str) -> int:
    return sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(root) for n in names)


def debian_cold_pulls(folder: str, work: str, repeat: int) -> dict:
    """Seconds of each cold pull and unpack from the registry: ours, skopeo's copy, umoci's unpack."""
    skopeo = ["skopeo", "--insecure-policy", "copy", "--quiet"]
    timings: dict = {"ours": [], "skopeo": [], "umoci": [], "local": []}
    with loopback_registry(work) as address:
        remote = f"docker://{address}/debian:bookworm"
        subprocess.run([*skopeo, "--dest-tls-verify=false", f"oci:{folder}/oci:bookworm", remote], check=True)
        for i in range(repeat):
            cache, layout, bundle = (os.path.join(work, f"debian-{what}{i}") for what in ("cache", "oci", "bundle"))

            def ours() -> None:
                timings["ours"].append(timed([sys.executable, "-m", "pytest_isolate", "pull", "-q", remote],
                                             dict(os.environ, PYTEST_ISOLATE_CACHE=cache)))

            def theirs() -> None:
                timings["skopeo"].append(timed([*skopeo, "--src-tls-verify=false", remote, f"oci:{layout}:bookworm"],
                                               dict(os.environ)))
                timings["umoci"].append(timed(["umoci", "unpack", "--image", f"{layout}:bookworm", bundle],
                                              dict(os.environ)))

            for step in ((ours, theirs) if i % 2 == 0 else (theirs, ours)):  # neither always first
                step()
            # ours again from the layout on disk: what the registry adds
            timings["local"].append(timed([sys.executable, "-m", "pytest_isolate", "pull", "-q",
                                           f"oci:{folder}/oci:bookworm"],
                                          dict(os.environ, PYTEST_ISOLATE_CACHE=cache + "-local")))
            shutil.rmtree(cache + "-local")
            timings["compressed"] = sum(os.path.getsize(os.path.join(layout, "blobs", "sha256", n))
                                        for n in os.listdir(os.path.join(layout, "blobs", "sha256")))
            timings["unpacked"] = tree_size(os.path.join(bundle, "rootfs"))
            for path in (cache, layout, bundle):
                shutil.rmtree(path)
    return timings


def debian_report(timings: dict) -> None:
    ours = statistics.median(timings["ours"])
    skopeo, umoci = statistics.median(timings["skopeo"]), statistics.median(timings["umoci"])
    both = statistics.median(s + u for s, u in zip(timings["skopeo"], timings["umoci"]))
    print(f"Debian bookworm from a loopback docker-registry ({timings['compressed'] / 1e6:.0f} MB compressed, "
          f"{timings['unpacked'] / 1e6:.0f} MB unpacked), cold, median of {len(timings['ours'])}:")
    print("| | pull and unpack |")
    print("|---|---|")
    print(f"| python -m pytest_isolate pull docker://… | {ours:.2f} s |")
    print(f"| skopeo copy docker://… oci:… + umoci unpack | {both:.2f} s ({skopeo:.2f} s + {umoci:.2f} s) |")
    print(f"| python -m pytest_isolate pull oci:… (the layout, no registry) | "
          f"{statistics.median(timings['local']):.2f} s |")
    print(f"all runs: ours {' '.join(f'{t:.2f}' for t in timings['ours'])}; skopeo + umoci "
          + " ".join(f"{s + u:.2f}" for s, u in zip(timings["skopeo"], timings["umoci"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--debian", metavar="DIR",
                        default=os.environ.get("PYTEST_ISOLATE_DEBIAN_IMAGE") or DEBIAN_PUBLISHED,
                        help="the Debian image of ci/images/debian.sh (default: %(default)s)")
    parser.add_argument("--pull-dir", metavar="DIR", default=None,
                        help="where the cold pulls write (registry, stores, bundles); default: a temporary "
                             "directory. /dev/shm leaves the disk, and whatever else writes to it, out")
    options = parser.parse_args()
    debian_why = debian_missing(options.debian)
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
        images = {"host": "host", "oci": image}
        debian = None
        if not debian_why:
            pull_dir = tempfile.mkdtemp(prefix="images-bench-pulls-", dir=options.pull_dir)
            try:
                debian = debian_cold_pulls(os.path.realpath(options.debian), pull_dir, options.repeat)
            finally:
                shutil.rmtree(pull_dir)
            images["debian"] = f"oci:{os.path.realpath(options.debian)}/oci:bookworm"
            subprocess.run([sys.executable, "-m", "pytest_isolate", "pull", "-q", images["debian"]], env=env,
                           check=True)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in images}
        for _ in range(options.repeat):  # interleaved
            for name, reference in images.items():
                results[name].append(run_suite(suite, reference, env))
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
    if debian:
        debian_report(debian)
    else:
        print(f"Debian image: not measured ({debian_why})")


if __name__ == "__main__":
    main()
