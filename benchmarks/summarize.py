"""Turns pytest-benchmark JSON into ratio tables (markdown), a summary JSON and a bar chart.

    python benchmarks/summarize.py RAW_JSON [RAW_JSON ...] [--out-dir benchmarks] [--command "make bench"]

Writes RESULTS.md, results_summary.json and results.png into --out-dir. Every
ratio is ``time(other) / time(fused)`` within one group (> 1: fused is faster),
from each benchmark's minimum time (the least disturbed round on a shared
machine) over all the JSON files given: passes of the same suite on the same
machine and code.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections import defaultdict


def _impl(bench: dict) -> str:
    params = bench.get("params") or {}
    if "impl" in params:
        return params["impl"]
    if "threads" in params:
        return f"{params['threads']} thread" + ("s" if params["threads"] != 1 else "")
    return bench["name"]


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def summarize(raws: list[dict]) -> dict:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for raw in raws:
        for bench in raw["benchmarks"]:
            times = groups[bench["group"]]
            impl = _impl(bench)
            times[impl] = min(times.get(impl, math.inf), bench["stats"]["min"])
    ratios: dict[str, dict[str, float]] = {}
    for group, times in groups.items():
        base = times.get("fused")
        if base is None and "2 threads" in times:
            base = times["2 threads"]
        if base:
            ratios[group] = {impl: t / base for impl, t in times.items()}
    return {
        "machine": raws[0].get("machine_info", {}),
        "passes": len(raws),
        "times_s": dict(groups),
        "ratios_vs_fused": ratios,
        "large_conv_efficiency": _large_conv_efficiency(groups),
    }


LARGE_CONVS = ("resnet50_3x3", "vgg_128", "downsample_s2")


def _large_conv_efficiency(groups: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per large-conv forward group: GFLOP/s of the fused op (chain FLOPs) and of dense Conv2d (dense FLOPs)."""
    from cases import CASES, macs  # benchmarks/ is the script's directory

    out = {}
    for group, times in groups.items():
        name, batch, mode = group.split(" / ")
        if name not in LARGE_CONVS or mode != "forward" or "fused" not in times or "dense" not in times:
            continue
        m = macs(CASES[name], int(batch.removeprefix("batch ")))
        fused = 2 * m["chain"] / times["fused"] / 1e9
        dense = 2 * m["dense"] / times["dense"] / 1e9
        out[group] = {"fused_gflops": fused, "dense_gflops": dense, "fraction": fused / dense}
    return out


def _targets(summary: dict) -> list[tuple[str, str, str]]:
    ratios = summary["ratios_vs_fused"]
    layer = {g: r for g, r in ratios.items() if not g.startswith(("ThesisNet", "threads", "overhead"))}
    rows = []
    seq = [r["sequential"] for r in layer.values() if "sequential" in r]
    if seq:
        rows.append(("fused / Sequential, every layer group >= 1.0x", f"min {min(seq):.2f}x", "met" if min(seq) >= 1 else "missed"))
        rows.append(("fused / Sequential geometric mean >= 1.5x", f"{_geomean(seq):.2f}x", "met" if _geomean(seq) >= 1.5 else "missed"))
    ort = [r["onnxruntime"] for g, r in layer.items() if g.endswith("forward") and "onnxruntime" in r]
    if ort:
        rows.append(("fused / ONNX Runtime, forward geometric mean >= 1.0x", f"{_geomean(ort):.2f}x", "met" if _geomean(ort) >= 1 else "missed"))
    thesis_b1 = [r["sequential"] for g, r in layer.items() if g.startswith("thesis_") and "/ batch 1 / forward" in g]
    if thesis_b1:
        rows.append(("ThesisNet layers at batch 1, fused / Sequential >= 3x", f"min {min(thesis_b1):.2f}x", "met" if min(thesis_b1) >= 3 else "missed"))
    for batch in (1, 10_000):
        r = ratios.get(f"ThesisNet / batch {batch} / forward")
        if r and "dense" in r:
            rows.append((f"whole ThesisNet batch {batch}: fused / dense >= 2x", f"{r['dense']:.2f}x", "met" if r["dense"] >= 2 else "missed"))
        if batch == 10_000 and r and "onnxruntime_dense" in r:
            rows.append(("whole ThesisNet batch 10000: fused faster than ORT dense", f"{r['onnxruntime_dense']:.2f}x", "met" if r["onnxruntime_dense"] >= 1 else "missed"))
    train32 = [r["sequential"] for g, r in layer.items() if g.endswith("/ batch 32 / train") and "sequential" in r]
    if train32:
        rows.append(("train step batch 32, fused / Sequential >= 1.3x (geomean; min)", f"{_geomean(train32):.2f}x; min {min(train32):.2f}x", "met" if min(train32) >= 1.3 else "missed"))
    efficiency = summary.get("large_conv_efficiency", {})
    if efficiency:
        worst = min(efficiency, key=lambda g: efficiency[g]["fraction"])
        frac = efficiency[worst]["fraction"]
        rows.append(("large convs: fused GFLOP/s >= 50% of dense Conv2d's (same run)",
                     f"min {frac:.0%} ({worst})", "met" if frac >= 0.5 else "missed"))
    overhead = {g: t["fused"] for g, t in summary["times_s"].items() if g.startswith("overhead") and "fused" in t}
    if overhead:
        worst = max(overhead, key=overhead.get)
        rows.append(("per-call overhead at batch 1 <= ~10 µs (tiny layers: the whole call)",
                     f"max {_fmt_time(overhead[worst])} ({worst.removeprefix('overhead: ')})",
                     "met" if overhead[worst] <= 10e-6 else "missed"))
    threads = [r.get("1 thread") for g, r in ratios.items() if g.startswith("threads")]
    threads = [t for t in threads if t]
    if threads:
        rows.append(("2 threads / 1 thread >= 1.6x at batch >= 8", f"min {min(threads):.2f}x", "met" if min(threads) >= 1.6 else "missed"))
    return rows


def write_markdown(summary: dict, command: str) -> str:
    m = summary["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m.get('cpu_model', '?')}"
        + (f" ({m['cpu_isa']})" if m.get("cpu_isa") else " (vector ISA not recorded)")
        + f", {m.get('logical_cpus', '?')} logical CPUs, "
        f"torch {m.get('torch', '?')} with {m.get('torch_threads', '?')} threads; "
        f"ONNX Runtime {m.get('onnxruntime') or 'not installed'} with the same thread count.",
        "",
        "Ratios are time(column) / time(fused) within one group (> 1: fused is faster), "
        f"from each benchmark's minimum time over {summary.get('passes', 1)} pass(es) of the suite in one run.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _targets(summary)]
    efficiency = summary.get("large_conv_efficiency", {})
    if efficiency:
        lines += ["", "## Large convs: throughput (2 x multiply-adds / time; fused counts the chain's, dense the dense layer's)",
                  "", "| group | fused GFLOP/s | dense Conv2d GFLOP/s | fused / dense |", "|---|---|---|---|"]
        for group in sorted(efficiency):
            e = efficiency[group]
            lines.append(f"| {group} | {e['fused_gflops']:.1f} | {e['dense_gflops']:.1f} | {e['fraction']:.0%} |")
    impls = ["dense", "sequential", "reference", "fused_no_epilogue", "fused_grad", "onnxruntime", "onnxruntime_dense",
             "onnxruntime_sequential", "1 thread"]
    lines += ["", "## Per group", "", "| group | fused | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    for group in sorted(summary["ratios_vs_fused"]):
        times = summary["times_s"][group]
        r = summary["ratios_vs_fused"][group]
        base = times.get("fused", times.get("2 threads"))
        cells = [f"{r[i]:.2f}x" if i in r else "" for i in impls]
        lines.append(f"| {group} | {_fmt_time(base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_chart(summary: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(g for g in summary["ratios_vs_fused"] if not g.startswith(("threads", "overhead")))
    series = ["dense", "sequential", "onnxruntime", "onnxruntime_dense"]
    fig, ax = plt.subplots(figsize=(max(10, len(groups) * 0.45), 6))
    width = 0.8 / len(series)
    for k, name in enumerate(series):
        xs = [i + k * width for i, g in enumerate(groups) if name in summary["ratios_vs_fused"][g]]
        ys = [summary["ratios_vs_fused"][g][name] for g in groups if name in summary["ratios_vs_fused"][g]]
        if xs:
            ax.bar(xs, ys, width, label=f"{name} / fused")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("time ratio (> 1: fused faster)")
    ax.set_xticks([i + 0.4 for i in range(len(groups))])
    ax.set_xticklabels(groups, rotation=80, fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_json", type=pathlib.Path, nargs="+")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent)
    parser.add_argument("--command", default="make bench")
    args = parser.parse_args(argv)
    summary = summarize([json.loads(p.read_text()) for p in args.raw_json])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    markdown = write_markdown(summary, args.command)
    notes = args.out_dir / "notes.md"  # hand-written analysis, appended verbatim
    if notes.exists():
        markdown += "\n" + notes.read_text()
    (args.out_dir / "RESULTS.md").write_text(markdown)
    write_chart(summary, args.out_dir / "results.png")
    print(f"wrote {args.out_dir / 'RESULTS.md'}, results_summary.json, results.png")


if __name__ == "__main__":
    main()
