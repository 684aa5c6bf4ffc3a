"""torch.compile, torch.export and ONNX (through to_sequential) of models with Tucker layers.

Most compile tests use the ``aot_eager`` backend: it runs dynamo (graph breaks),
the fake kernels (symbolic shapes) and AOTAutograd (the registered backward ops)
without paying for inductor's C++ code generation; one test runs inductor itself.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn

import tucker_ops
from tucker_ops import TuckerConv2d, TuckerLinear


class Net(nn.Module):
    """Every conv path the op entry point has: Tucker-1 both sides, no bias, dilation, 'same' (symmetric and
    asymmetric, i.e. explicit F.pad), a reflect padding_mode, and a Linear on a 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = TuckerConv2d(3, 8, 3, (None, 4), padding=1, bias=False)
        self.c2 = TuckerConv2d(8, 8, 3, (4, 3), padding="same", dilation=2)
        self.c3 = TuckerConv2d(8, 6, 4, (3, None), padding="same")
        self.c4 = TuckerConv2d(6, 6, 3, (2, 3), stride=2, padding=1, padding_mode="reflect")
        self.l1 = TuckerLinear(6 * 3, 10, (8, 5), bias=False)
        self.l2 = TuckerLinear(10, 4, (None, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.c4(self.c3(x))
        x = nn.functional.adaptive_avg_pool2d(x, (3, 3)).transpose(1, 2).flatten(2)  # (N, 3, 18)
        return self.l2(torch.relu(self.l1(x)))


@pytest.fixture
def model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _grads(model: nn.Module, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in model.parameters())]


def _assert_matches_eager(model: nn.Module, compiled, batches) -> None:
    for n in batches:
        x = torch.randn(n, 3, 13, 11, dtype=torch.float64)
        out, grads = _grads(model, x, compiled)
        want_out, want_grads = _grads(model, x, model)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph_dynamic_forward_backward(model) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    _assert_matches_eager(model, compiled, batches=(2, 3, 5))
    assert counter.frame_count == 1  # one graph for every batch size: the fake kernels are symbolic
    _assert_matches_eager(model, compiled, batches=(1,))  # dynamo specialises size 1: a second graph


def test_compile_mark_dynamic_batch(model) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for n in (4, 6, 9):
        x = torch.randn(n, 3, 13, 11, dtype=torch.float64)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1


def test_no_graph_breaks_and_ops_in_graph(model) -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 13, 11, dtype=torch.float64))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = explanation.graphs[0].code
    assert code.count("tucker_ops.tucker_conv2d") == 4 and code.count("tucker_ops.tucker_linear") == 2


def test_compile_inductor_forward_backward_dynamic_batch() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(
        TuckerConv2d(3, 6, 3, (2, 4), padding="same", dilation=2, bias=False), nn.Flatten(), TuckerLinear(6 * 25, 5, (7, 3))
    ).double()
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for n in (2, 3):
        x = torch.randn(n, 3, 5, 5, dtype=torch.float64)
        out, grads = _grads(net, x, compiled)
        want_out, want_grads = _grads(net, x, net)
        torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_use_reference_under_compile_recompiles(model) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    fused = compiled(x)
    with tucker_ops.use_reference():
        ref = compiled(x)
    assert counter.frame_count == 2  # the flag is guarded on: no stale graph
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


def test_export_save_load_run_equals_eager(model, tmp_path) -> None:
    model.eval()
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    graph = program.graph_module.code
    assert "tucker_ops.tucker_conv2d.default" in graph and "tucker_ops.tucker_linear.default" in graph
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        for n in (2, 1, 7):
            x = torch.randn(n, 3, 13, 11, dtype=torch.float64)
            assert torch.equal(loaded(x), model(x))


def test_onnx_export_through_to_sequential(tmp_path) -> None:
    onnx = pytest.importorskip(
        "onnx", reason="onnx is not installed: ONNX export through to_sequential_model() is documented, not tested here"
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        # Dilation with numeric padding: onnxruntime rejects dilation with auto_pad SAME,
        # which is how the TorchScript exporter writes padding="same" (see docs/export.md).
        TuckerConv2d(3, 8, 3, (None, 4), padding=2, dilation=2, bias=False),
        nn.ReLU(),
        TuckerConv2d(8, 8, 4, (4, 3), padding="same"),  # even kernel: an explicit (asymmetric) Pad
        TuckerConv2d(8, 6, 3, (2, None), stride=2, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        TuckerLinear(6 * 7 * 6, 10, (8, 5)),
    ).eval()
    plain = tucker_ops.to_sequential_model(model).eval()
    assert not any(isinstance(m, (TuckerConv2d, TuckerLinear)) for m in plain.modules())
    x = torch.randn(2, 3, 13, 11)
    path = tmp_path / "net.onnx"
    kwargs = {"input_names": ["x"], "output_names": ["y"], "dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}}
    # The dynamo exporter needs onnxscript; without it, the TorchScript-based one.
    torch.onnx.export(plain, (x,), str(path), dynamo=importlib.util.find_spec("onnxscript") is not None, **kwargs)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert "Conv" in {node.op_type for node in proto.graph.node}
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the exported graph is not run")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for n in (2, 5):
            x = torch.randn(n, 3, 13, 11)
            (got,) = session.run(None, {"x": x.numpy()})
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


def test_compile_fused_epilogue_model_fullgraph_forward_backward() -> None:
    # fuse_epilogues' GraphModule: the relu_pool op traces through its fake kernel and
    # its registered autograd, in one graph for every batch size.
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(
        TuckerConv2d(3, 6, 3, (2, 4), padding=1), nn.ReLU(), nn.AvgPool2d(2),
        TuckerConv2d(6, 4, 3, (3, None)), nn.ReLU(), nn.Flatten(), TuckerLinear(4 * 4 * 3, 5, (7, 3)),
    ).double()  # fmt: skip
    fused = tucker_ops.fuse_epilogues(net)
    assert sum(isinstance(m, tucker_ops.TuckerConv2dReLUPool) for m in fused.modules()) == 2
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, backend=counter, fullgraph=True, dynamic=True)
    for n in (2, 3):
        x = torch.randn(n, 3, 12, 10, dtype=torch.float64)
        out, grads = _grads(fused, x, compiled)
        want_out, want_grads = _grads(net, x, net)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
