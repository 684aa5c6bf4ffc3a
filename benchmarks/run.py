"""`make bench`: runs the benchmark suite with bounded rounds, then the summary.

    python benchmarks/run.py [extra pytest args]

Raw pytest-benchmark JSON goes to build/bench/results_raw.json; summarize.py
writes RESULTS.md, results_summary.json and results.png into benchmarks/.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    raw = HERE.parent / "build" / "bench" / "results_raw.json"  # per-round data, MBs: not committed
    raw.parent.mkdir(parents=True, exist_ok=True)
    code = pytest.main(
        [
            str(HERE),
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "--benchmark-min-rounds=3",
            "--benchmark-max-time=0.25",
            "--benchmark-warmup=on",
            "--benchmark-warmup-iterations=1",
            "--benchmark-columns=min,median,rounds",
            f"--benchmark-json={raw}",
            *sys.argv[1:],
        ]
    )
    if code not in (0, 5) or not raw.exists():
        return int(code)
    from summarize import main as summarize_main

    summarize_main([str(raw), "--command", "make bench  (python benchmarks/run.py)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
