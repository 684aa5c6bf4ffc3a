"""ONNX Runtime (CPU provider) running a PyTorch module exported to ONNX: an optional column.

``onnxruntime`` and ``onnx`` are an optional benchmark extra (``pip install onnxruntime onnx``);
without them :func:`session` raises :class:`Unavailable`, and the benchmark is skipped with
that reason.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn


class Unavailable(RuntimeError):
    """ONNX Runtime cannot run this benchmark; the message says why."""


def session(module: nn.Module, example: Tensor, threads: int) -> Callable[[Tensor], object]:
    """Exports ``module`` (batch dimension dynamic) and returns ``run(x) -> ndarray`` on ORT.

    ``threads``: ORT intra-op threads, the same count torch uses in the run.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Unavailable(f"onnxruntime is not installed (optional: pip install onnxruntime onnx): {e}") from e
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module.eval(),
                (example,),
                buffer,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
        except Exception as e:  # the exporter needs the onnx package; report what failed
            raise Unavailable(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(x: Tensor):
        return sess.run(None, {"x": x.numpy()})[0]

    return run
