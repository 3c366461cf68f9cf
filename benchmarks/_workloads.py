"""The generated test suites the benchmark runs, each in its own directory with a
``pytest.ini`` (so that no outer configuration leaks in)."""

from __future__ import annotations

import dataclasses
import os

HEAVY_IMPORTS = (
    "argparse asyncio bz2 calendar concurrent.futures csv ctypes dataclasses decimal difflib "
    "doctest email.mime.multipart enum fractions ftplib gettext gzip hashlib hmac http.server "
    "imaplib inspect ipaddress json locale logging.handlers lzma mailbox multiprocessing.pool pdb "
    "pickletools pydoc secrets shelve smtplib sqlite3 ssl statistics tarfile typing "
    "unittest.mock urllib.request uuid wave xml.dom.minidom xml.etree.ElementTree xmlrpc.server "
    "zipfile"
).split()
# ≈ 150 MB of small, GC-tracked objects (measured: ≈ 375 bytes an entry on CPython 3.11).
HEAVY_ENTRIES = 400_000
SLEEP = 0.05  # seconds per sleepy test

MEMORY_PROBE = '''
def _memory():
    """This process's resident and unique (private) memory, in KiB."""
    rss = private = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
    return rss, private

'''


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str  # column key, e.g. "n100" or "n100-x2"
    label: str  # column title
    directory: str  # name of the suite's directory
    tests: int
    workers: int = 0  # xdist -n
    kind: str = "trivial"  # trivial | heavy | sleepy | memory | one-id


def _trivial(count: int) -> str:
    return "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(count))


def _sleepy(count: int) -> str:
    """Tests that wait rather than compute: the cores stay free for -n 2 to use."""
    return "import time\n\n\n" + "".join(f"def test_{i}():\n    time.sleep({SLEEP})\n\n\n" for i in range(count))


def _heavy(count: int) -> str:
    imports = "".join(f"import {name}  # noqa: F401\n" for name in HEAVY_IMPORTS)
    data = f'DATA = [(str(i), i * 0.5, {{"k": i}}) for i in range({HEAVY_ENTRIES})]\n\n\n'
    return imports + "\n" + data + _trivial(count)


def _memory(count: int) -> str:
    tests = "".join(
        f"def test_memory_{i}(record_property):\n"
        f"    rss, private = _memory()\n"
        f"    record_property('vmrss_kib', rss)\n"
        f"    record_property('private_kib', private)\n\n\n"
        for i in range(count)
    )
    return MEMORY_PROBE + "\n" + tests


def generate(root: str, workloads: list[Workload]) -> None:
    """Write every workload's suite under ``root``."""
    made = set()
    for w in workloads:
        if w.directory in made:
            continue
        made.add(w.directory)
        path = os.path.join(root, w.directory)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "pytest.ini"), "w") as f:
            f.write("[pytest]\n")
        if w.kind == "heavy":
            source = _heavy(w.tests)
        elif w.kind == "memory":
            source = _memory(w.tests)
        elif w.kind == "sleepy":
            source = _sleepy(w.tests)
        elif w.kind == "one-id":  # a node id picked from a 100-test module
            source = _trivial(100)
        else:
            source = _trivial(w.tests)
        with open(os.path.join(path, module_name(w)), "w") as f:
            f.write(source)


def module_name(w: Workload) -> str:
    return {"heavy": "test_heavy.py", "memory": "test_memory.py",
            "sleepy": "test_sleepy.py"}.get(w.kind, "test_trivial.py")


def all_workloads(max_n: int) -> list[Workload]:
    """Every workload, the trivial sizes up to ``max_n``."""
    sizes = [n for n in (1, 10, 100, 1000) if n <= max_n]
    out = [Workload(f"n{n}", f"N={n}", f"trivial_{n}", n) for n in sizes]
    out += [Workload("heavy10", "heavy N=10", "heavy_10", 10, kind="heavy"),
            Workload("heavy100", "heavy N=100", "heavy_100", 100, kind="heavy")]
    out += [Workload(f"n{n}-x2", f"N={n} -n 2", f"trivial_{n}", n, workers=2)
            for n in sizes if n >= 100]
    # -n 2 where the cores are free: tests that sleep 50 ms each, 20 and 100 of them
    # (the per-test slope leaves xdist's start-up out).
    out += [Workload(f"sleepy{n}{x}", f"sleepy N={n}" + (" -n 2" if x else ""), f"sleepy_{n}", n,
                     workers=2 if x else 0, kind="sleepy") for n in (20, 100) for x in ("", "-x2")]
    out += [Workload("memory", "memory N=10", "memory_10", 10, kind="memory")]
    # One plain `python -m pytest NODEID` in a 100-test module: what each per-process
    # runner pays at the least per test (target 2).
    out += [Workload("one-id", "one NODEID", "trivial_100", 1, kind="one-id")]
    return out
