"""docs/img/performance.png: per-test overhead by runner, and wall time against N."""

from __future__ import annotations

from _report import Analysis


def plot(a: Analysis, unavailable: dict[str, str], path: str) -> str | None:
    """Write the figure; return why not, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'pytest-isolate-container[bench]'): no PNG"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    runners = [r for r in a.runners if r.key not in unavailable]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))

    bars = [(r.label, a.per_test(r.key)) for r in runners if r.key != "plain"]
    bars = [(label, raw, over, pair) for label, (raw, over, pair) in bars if over is not None]
    if bars:
        names = [b[0].replace(", ", "\n", 1) for b in bars]
        values = [max(b[2] * 1000, 0.01) for b in bars]
        left.barh(names, values, color="tab:blue")
        left.set_xscale("log")
        left.invert_yaxis()
        for y, (value, b) in enumerate(zip(values, bars)):
            left.text(value, y, f" {value:.1f} ms ({b[3]})", va="center", fontsize=8)
        left.set_xlim(right=max(values) * 8)
    left.set_xlabel("per-test overhead vs plain pytest, ms (log)")
    left.set_title("Per-test overhead (trivial tests)")
    left.tick_params(axis="y", labelsize=8)

    for r in runners:
        points = [(n, a.m(r.key, f"n{n}")) for n in (1, 10, 100, 1000)]
        points = [(n, m) for n, m in points if m is not None]
        if points:
            right.plot(*zip(*points), marker="o", label=r.label)
    right.set_xscale("log")
    right.set_yscale("log")
    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    right.xaxis.set_major_formatter(plain_numbers)
    right.yaxis.set_major_formatter(plain_numbers)
    right.yaxis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:e}"[0] in "235" else ""))
    right.set_xlabel("tests (N)")
    right.set_ylabel("wall time, s (median)")
    right.set_title("Wall time of a run vs N")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
