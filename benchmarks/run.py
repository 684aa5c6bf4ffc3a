"""`make bench`: runs the benchmark suite with bounded rounds, then the summary.

    python benchmarks/run.py [--passes N] [extra pytest args]

The suite runs N times (default 2); raw pytest-benchmark JSON goes to
build/bench/results_raw_<pass>.json, and summarize.py takes each benchmark's
minimum over all passes (so a burst of contention on the shared machine, which
can last seconds, has to hit the same benchmark in every pass to move it) and
writes RESULTS.md, results_summary.json and results.png into benchmarks/.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--passes", type=int, default=2)
    args, pytest_args = parser.parse_known_args()
    out = HERE.parent / "build" / "bench"  # per-round data, MBs: not committed
    out.mkdir(parents=True, exist_ok=True)
    raws = []
    for p in range(args.passes):
        raw = out / f"results_raw_{p}.json"
        raw.unlink(missing_ok=True)
        code = pytest.main(
            [
                str(HERE),
                "-q",
                "-p",
                "no:cacheprovider",
                "--benchmark-only",
                # Each benchmark spans at least half a second and five rounds (its minimum
                # is reported).
                "--benchmark-min-rounds=5",
                "--benchmark-max-time=0.5",
                "--benchmark-warmup=on",
                "--benchmark-warmup-iterations=1",
                "--benchmark-columns=min,median,rounds",
                f"--benchmark-json={raw}",
                *pytest_args,
            ]
        )
        if code not in (0, 5) or not raw.exists():
            return int(code)
        raws.append(str(raw))
    from summarize import main as summarize_main

    command = "make bench  (python benchmarks/run.py" + (f" --passes {args.passes}" if args.passes != 2 else "") + ")"
    summarize_main([*raws, "--command", command])
    return 0


if __name__ == "__main__":
    sys.exit(main())
