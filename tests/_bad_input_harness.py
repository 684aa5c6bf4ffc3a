"""Runs bad-input cases in a child process, so a crash fails a case instead of pytest.

A test file defines ``CASES = {name: (call(device), expected_type, message_fragments, devices)}``
and wires the harness in::

    @pytest.fixture(scope="module")
    def outcomes():
        return collect_outcomes(__file__)

    if __name__ == "__main__" and sys.argv[1:] == ["--run-cases"]:
        run_cases(CASES)

The child prints one JSON line before and after each case; a case with a start line and no
outcome line is the one a signal or crash stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

Case = tuple[Callable[[str], Any], type, tuple[str, ...], tuple[str, ...]]
Outcomes = tuple[dict, int, str]


def T(device: str, *shape: int, dtype: Any = None) -> Any:
    """A tensor of this shape on ``device``: random for floating and complex dtypes
    (float32 by default), zeros otherwise."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def conv_backward_call(device: str, **overrides: Any) -> Any:
    """tucker_conv2d_backward on a small valid Tucker-2 call, with arguments replaced by ``overrides``."""
    import torch

    args = {
        "grad_output": T(device, 2, 7, 7, 6),
        "input": T(device, 2, 5, 9, 8),
        "first": T(device, 4, 5),
        "core": T(device, 6, 4, 3, 3),
        "last": T(device, 7, 6),
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
        "output_mask": [True] * 5,
    }
    args.update(overrides)
    return torch.ops.tucker_ops.tucker_conv2d_backward(**args)


def run_cases(cases: Mapping[str, Case]) -> None:
    """Child process: run every case on each of its devices, one JSON line per outcome."""
    import tucker_ops  # noqa: F401  (registers the fake kernels and autograd)

    for name, (call, _, _, devices) in cases.items():
        for device in devices:
            print(json.dumps({"case": name, "device": device, "started": True}), flush=True)
            try:
                call(device)
            except Exception as e:  # noqa: BLE001  (the type is what is being checked)
                outcome = {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "message": str(e)}
            else:
                outcome = {"type": None}
            print(json.dumps({"case": name, "device": device, **outcome}), flush=True)


def collect_outcomes(test_file: str) -> Outcomes:
    """Run ``test_file --run-cases`` in a child; return (results by (case, device), exit code, status text)."""
    import tucker_ops

    # The child must import the same tucker_ops as this process (in-place build or installed).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tucker_ops.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH")))))
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, test_file, "--run-cases"], capture_output=True, text=True, timeout=300, env=env)
    results, last_started = {}, None
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        key = (record["case"], record["device"])
        if record.get("started"):
            last_started = key
        else:
            results[key] = record
    status = f"child exited with {proc.returncode}; last case started: {last_started}; stderr:\n{proc.stderr[-3000:]}"
    return results, proc.returncode, status


def case_ids(cases: Mapping[str, Case]) -> list[tuple[str, str]]:
    return [(name, device) for name, case in cases.items() for device in case[3]]


def assert_clear_error(cases: Mapping[str, Case], outcomes: Outcomes, name: str, device: str) -> None:
    """The case raised its expected exception type with every expected fragment in the message."""
    results, _, status = outcomes
    _, expected_type, fragments, _ = cases[name]
    assert (name, device) in results, f"case did not finish (crash or signal?): {status}"
    got = results[(name, device)]
    assert got["type"] is not None, f"{name} on {device}: no exception raised"
    assert expected_type.__name__ in got["mro"], (
        f"{name} on {device}: expected {expected_type.__name__}, got {got['type']}: {got['message']}"
    )
    for fragment in fragments:
        assert fragment in got["message"], f"{name} on {device}: {fragment!r} not in message {got['message']!r}"


def assert_child_exited_cleanly(outcomes: Outcomes) -> None:
    _, returncode, status = outcomes
    assert returncode == 0, status
