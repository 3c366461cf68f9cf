"""The pytest-isolate benchmark: plain pytest, fork-only isolation, pytest-isolate's two
modes and per-test sandboxes (bwrap, crun, podman), timed in one interleaved run.

    python benchmarks/bench.py [--reps 5] [--quick | --full] [--out docs] [--python PY]
    tox -e bench -- --quick

Prints the tables; writes OUT/performance.md (between its bench markers) and
OUT/img/performance.png. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _measure  # noqa: E402
from _plot import plot  # noqa: E402
from _report import Analysis, Cell, check_output, parse_host_lines  # noqa: E402
from _runners import RUNNERS, applies, command, unavailable  # noqa: E402
from _tables import build, render_markdown, render_text  # noqa: E402
from _workloads import all_workloads, generate  # noqa: E402

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; --quick: 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 reps, N ≤ 100, per-process runners N ≤ 10 (< 3 min)")
    p.add_argument("--full", action="store_true",
                   help="per-process runners at every N and on the heavy module too (long)")
    p.add_argument("--out", default=os.path.join(REPO, "docs"),
                   help="where performance.md and img/performance.png go (default: docs/)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter with pytest-isolate-container installed (default: this one)")
    p.add_argument("--runners", help="comma-separated subset of: " + ",".join(r.key for r in RUNNERS))
    args = p.parse_args()
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    known = {r.key for r in RUNNERS}
    if args.runners and not set(args.runners.split(",")) <= known:
        p.error(f"--runners: unknown {sorted(set(args.runners.split(',')) - known)}; known: {sorted(known)}")
    args.reps = args.reps or (2 if args.quick else 5)
    return args


# -- the machine -----------------------------------------------------------------------

def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine(python: str) -> dict[str, str]:
    probe = subprocess.run(
        [python, "-c", "import sys, pytest\ntry:\n import pytest_isolate as p; v = p.__version__\n"
         "except Exception: v = 'not installed'\nprint(sys.version.split()[0], pytest.__version__, v)"],
        capture_output=True, text=True, timeout=60)
    py, pt, iso = (probe.stdout.split() + ["?"] * 3)[:3]
    ram = _first("/proc/meminfo", "MemTotal")
    ram = f"{int(ram.split()[0]) / 1024 / 1024:.1f} GiB" if ram[0].isdigit() else ram
    rev = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu": _first("/proc/cpuinfo", "model name"), "cores": str(os.cpu_count()),
            "ram": ram, "kernel": platform.release(), "python": py, "pytest": pt,
            "pytest-isolate": f"{iso} (git {rev})", "cgroups": _measure.cgroup_version(),
            "user": "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"}


# -- running ---------------------------------------------------------------------------

def junit_properties(directory: str) -> tuple[list[int], list[int]]:
    rss, private = [], []
    for name in sorted(os.listdir(directory)):
        for case in ET.parse(os.path.join(directory, name)).iter("testcase"):
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            if "vmrss_kib" in props:
                rss.append(int(props["vmrss_kib"]))
                private.append(int(props["private_kib"]))
    return rss, private


def run_cell(cell: Cell, runner, w, python: str, root: str, measure_memory: bool) -> str:
    suite = os.path.join(root, w.directory)
    junit = None
    if w.kind == "memory":
        junit = tempfile.mkdtemp(prefix="junit-", dir=root)
        os.chmod(junit, 0o777)
    cmd, env = command(runner, w, python, suite, root, junit)
    budget = 5.0 if runner.per_process else 0.5
    timeout = 90 + w.tests * budget * (3 if w.kind == "heavy" else 1)
    res = _measure.run(cmd, suite, env, timeout, measure_memory)
    error = res.error or check_output(res.output, w.tests)
    if error:
        cell.errors.append(error)
        status = f"FAILED: {error}"
    else:
        cell.walls.append(res.wall)
        if res.peak_memory:
            cell.peaks.append(res.peak_memory)
        starts, rss = parse_host_lines(res.output)
        cell.host_starts += starts
        cell.host_rss += rss
        status = f"{res.wall:.2f} s"
    if junit:
        try:
            rss, private = junit_properties(junit)
            cell.test_rss += rss
            cell.test_private += private
        except (OSError, ET.ParseError) as exc:
            cell.errors.append(f"junit xml unreadable: {exc}")
        _safe_rmtree(junit)
    return status


def _safe_rmtree(path: str) -> None:
    """rmtree that refuses to run if the tree holds a mount point (a crun bundle's rootfs
    is a bind of / while its runner lives, in the runner's own mount namespace)."""
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            if os.path.ismount(os.path.join(dirpath, name)):
                print(f"bench: left {path}: {dirpath}/{name} is a mount point", file=sys.stderr)
                return
    shutil.rmtree(path, ignore_errors=True)


def warm_up(runners, workloads, python, root, skipped: dict[str, str]) -> None:
    """Compile the suites (write __pycache__) and check each runner once on N=1."""
    for w in workloads:
        subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only"],
                       cwd=os.path.join(root, w.directory), capture_output=True, timeout=300)
    n1 = next(w for w in workloads if w.key == "n1")
    for r in runners:
        if r.key in skipped:
            continue
        for attempt in range(2):
            cell = Cell(r.key, "n1")
            status = run_cell(cell, r, n1, python, root, False)
            if cell.walls:
                break
            time.sleep(2)
        if not cell.walls:
            skipped[r.key] = f"failed: {cell.errors[0]}"
        print(f"bench: warm-up {r.key}: {status}", file=sys.stderr)


def main() -> int:
    args = parse_args()
    python = os.path.abspath(args.python) if os.sep in args.python else args.python
    cap = 1000 if args.full else (10 if args.quick else 100)
    workloads = all_workloads(100 if args.quick else 1000)
    runners = [r for r in RUNNERS if not args.runners or r.key in args.runners.split(",")]
    skipped = {r.key: why for r in runners if (why := unavailable(r, python))}
    measure_memory, memory_why = _measure.memory_cgroups_usable()
    if measure_memory:
        _measure.remove_leftovers()
    info = machine(python)
    print("bench: " + ", ".join(f"{k} {v}" for k, v in info.items()), file=sys.stderr)
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None  # see _pertest.Crun
    root = tempfile.mkdtemp(prefix="pytest-isolate-bench-", dir=base)
    os.chmod(root, 0o755)
    started = time.perf_counter()
    try:
        generate(root, workloads)
        warm_up(runners, workloads, python, root, skipped)
        cells = {}
        for r in runners:
            for w in workloads:
                why = applies(r, w, cap, args.full)
                cells[(r.key, w.key)] = Cell(r.key, w.key, skipped=why)
        for rep in range(args.reps):
            for r in runners:
                if r.key in skipped:
                    continue
                for w in workloads:
                    cell = cells[(r.key, w.key)]
                    if cell.skipped is None:
                        status = run_cell(cell, r, w, python, root, measure_memory)
                        print(f"bench: rep {rep + 1}/{args.reps} {r.key:9} {w.label:12} {status}",
                              file=sys.stderr, flush=True)
    finally:
        _safe_rmtree(root)
        if measure_memory:
            _measure.remove_leftovers()
            try:
                os.rmdir(_measure.CGROUP_PARENT)
            except OSError:
                pass
    elapsed = time.perf_counter() - started

    a = Analysis(cells, runners, args.reps)
    cap_note = (f"per-process runners (fresh, bwrap, crun, podman) are capped at N ≤ {cap}"
                + ("" if args.full else " and skip the heavy and sleepy modules") + "; --full runs them all")
    tables, notes = build(a, workloads, skipped, None if measure_memory else memory_why, cap_note)
    text = render_text(tables, notes)
    targets = a.targets()
    print(text)
    print("\nTargets")
    for verdict, line in targets:
        print(f"  {verdict:4}  {line}")
    noise = noise_line(a)
    one = a.m("plain", "one-id")
    if one is not None:
        print(f"\nOne plain `python -m pytest NODEID` (100-test module): {one * 1000:.0f} ms")
    if not measure_memory:
        print(f"Peak memory of whole runs: n/a ({memory_why})")
    print(f"{noise}\nRun took {elapsed:.0f} s.")

    md = markdown(a, info, args, tables, notes, targets, noise, memory_why if not measure_memory else None,
                  elapsed)
    os.makedirs(os.path.join(args.out, "img"), exist_ok=True)
    write_page(os.path.join(args.out, "performance.md"), md)
    why = plot(a, skipped, os.path.join(args.out, "img", "performance.png"))
    print(f"bench: {why}" if why else f"bench: wrote {args.out}/performance.md and img/performance.png",
          file=sys.stderr)
    return 0


def noise_line(a: Analysis) -> str:
    mid, worst, plain = a.noise()
    if mid is None:
        return "Noise: one run per cell, no spread to report."
    return (f"Noise: (max − min) / median over the {a.reps} runs of a cell: median {mid:.0%}, "
            f"worst {worst:.0%}; plain pytest's cells: median {plain:.0%}.")


def markdown(a, info, args, tables, notes, targets, noise, memory_why, elapsed) -> str:
    mode = "--quick" if args.quick else ("--full" if args.full else "default")
    one = a.m("plain", "one-id")
    lines = [
        f"Run on {info['date']} with `python benchmarks/bench.py` ({mode}, {args.reps} runs "
        f"per cell, took {elapsed:.0f} s).",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, kernel {info['kernel']}, "
        f"cgroups {info['cgroups']}, as {info['user']}",
        f"- python {info['python']}, pytest {info['pytest']}, pytest-isolate {info['pytest-isolate']}",
        f"- {noise}",
    ]
    if one is not None:
        lines.append(f"- one plain `python -m pytest NODEID` (in a 100-test module): {one * 1000:.0f} ms")
    if memory_why:
        lines.append(f"- peak memory of whole runs: n/a ({memory_why})")
    lines += ["", "**Targets** (checked by the script)", ""]
    lines += [f"- **{v}** {t}" for v, t in targets]
    lines += ["", render_markdown(tables, notes), "",
              "![Per-test overhead and wall time vs N](img/performance.png)"]
    return "\n".join(lines)


def write_page(path: str, generated: str) -> None:
    block = f"{BEGIN}\n{generated}\n{END}"
    if os.path.exists(path):
        with open(path) as f:
            page = f.read()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if pattern.search(page):
            page = pattern.sub(lambda _: block, page)
        else:
            page = page.rstrip() + "\n\n" + block + "\n"
    else:
        page = f"# Performance\n\n{block}\n"
    with open(path, "w") as f:
        f.write(page)


if __name__ == "__main__":
    sys.exit(main())
