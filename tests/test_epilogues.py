"""fuse_epilogues / TuckerConv2dReLUPool: the fx pass against the unfused model, pattern matching, serialization."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tucker_ops
from tucker_ops import epilogues
from tucker_ops.compress import to_sequential_model
from tucker_ops.epilogues import TuckerConv2dReLUPool, fuse_epilogues
from tucker_ops.modules import TuckerConv2d

F64 = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # The fused epilogue may sum a pool window in another order: float64 rounding only.
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _pools(gm: nn.Module) -> dict[str, int]:
    return {name: m.pool for name, m in gm.named_modules() if isinstance(m, TuckerConv2dReLUPool)}


def _conv(c_in: int = 3, c_out: int = 6, k: int = 3, **options) -> TuckerConv2d:
    return TuckerConv2d(c_in, c_out, k, (2, 4), dtype=F64, **options)


def _fused_matches(model: nn.Module, x: torch.Tensor, pools: dict[str, int]) -> fx.GraphModule:
    """Fuse ``model``, check which convs became which pools, and that the output did not change."""
    gm = fuse_epilogues(model)
    assert _pools(gm) == pools
    with torch.no_grad():
        _close(gm(x), model(x))
    return gm


# -- ThesisNet ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def thesis() -> nn.Module:
    pytest.importorskip("tensorly", reason="compress decomposes with tensorly")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*r_out=200 exceeds")
        # One HOOI iteration: the factors' quality does not matter here, and it is ~8x faster.
        model, _ = tucker_ops.compress(
            tucker_ops.ThesisNet(), ranks=tucker_ops.thesis_ranks(), decompose_options={"n_iter_max": 1}
        )
    return model.double().eval()


def test_thesis_fused_output_modules_and_state(thesis) -> None:
    gm = fuse_epilogues(thesis)
    assert isinstance(gm, fx.GraphModule)
    assert _pools(gm) == {"conv1": 2, "conv2": 2}
    assert isinstance(thesis.conv1, TuckerConv2d) and not isinstance(thesis.conv1, TuckerConv2dReLUPool), "model left alone"
    # Both ReLUs after the convs and both pool calls are gone; l1's and l2's ReLUs stay.
    relus = [n for n in gm.graph.nodes if n.target is F.relu]
    assert [n.args[0].target for n in relus] == ["l1", "l2"]
    assert not any(n.op == "call_module" and n.target == "pool" for n in gm.graph.nodes)

    assert list(gm.state_dict()) == list(thesis.state_dict())
    ours, theirs = dict(gm.named_parameters()), dict(thesis.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is theirs[k] for k in ours), "parameters must be shared, not copied"

    torch.manual_seed(1)
    x = torch.randn(5, 1, 28, 28, dtype=F64)
    with torch.no_grad():
        _close(gm(x), thesis(x))


def test_thesis_fused_gradients_match(thesis) -> None:
    gm = fuse_epilogues(thesis)
    torch.manual_seed(2)
    x = torch.randn(3, 1, 28, 28, dtype=F64)
    weights = torch.randn(3, 10, dtype=F64)

    def grads(model: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        thesis.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        (model(inp) * weights).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}, inp.grad

    want, want_x = grads(thesis)
    got, got_x = grads(gm)
    thesis.zero_grad(set_to_none=True)
    assert got.keys() == want.keys() and len(want) == len(list(thesis.parameters()))
    for k in want:
        _close(got[k], want[k])
    _close(got_x, want_x)


def test_thesis_fused_reference_backend_and_round_trip(thesis) -> None:
    gm = fuse_epilogues(thesis)
    x = torch.randn(2, 1, 28, 28, dtype=F64)
    with torch.no_grad():
        want = thesis(x)
        with tucker_ops.use_reference():
            _close(gm(x), want)
        # Fusing again finds nothing new and changes nothing.
        again = fuse_epilogues(gm)
        assert _pools(again) == {"conv1": 2, "conv2": 2}
        _close(again(x), want)
        # Back to plain layers: the fused modules' chains carry the ReLU and the pool.
        _close(to_sequential_model(gm)(x), want)


def test_fused_graph_module_save_load_and_deepcopy(thesis) -> None:
    gm = fuse_epilogues(thesis)
    x = torch.randn(2, 1, 28, 28, dtype=F64)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(gm)
    with torch.no_grad():
        want = gm(x)
        for other in (loaded, clone):
            assert _pools(other) == {"conv1": 2, "conv2": 2}
            assert list(other.state_dict()) == list(gm.state_dict())
            assert other.conv1.core is not gm.conv1.core
            _close(other(x), want)


# -- the module -----------------------------------------------------------------------


def test_from_tucker_shares_parameters_and_calls_the_op_once(monkeypatch) -> None:
    torch.manual_seed(0)
    conv = _conv(padding=1)
    conv.backend = "reference"
    fused = TuckerConv2dReLUPool.from_tucker(conv, 2)
    assert type(conv) is TuckerConv2d and not hasattr(conv, "pool")
    assert fused.pool == 2 and "pool=2" in repr(fused)
    assert list(fused.state_dict()) == list(conv.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), conv.parameters()))
    assert fused._parameters is not conv._parameters
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    with torch.no_grad():
        _close(fused(x), F.avg_pool2d(F.relu(conv(x)), 2))
        _close(fused.to_sequential()(x), fused(x))

    calls = []
    op = epilogues.tucker_conv2d_relu_pool

    def spy(*args, **kwargs):
        calls.append((args[8], kwargs))
        return op(*args, **kwargs)

    monkeypatch.setattr(epilogues, "tucker_conv2d_relu_pool", spy)
    fused(x)
    assert calls == [(2, {"backend": "reference"})], "one op call, with pool and the module's backend"


def test_from_tucker_and_constructor_reject_bad_arguments() -> None:
    conv = _conv()
    for bad in (0, -1, True, 2.0, None):
        with pytest.raises(ValueError, match="pool must be an int >= 1"):
            TuckerConv2dReLUPool.from_tucker(conv, bad)
    with pytest.raises(TypeError, match="must be a TuckerConv2d"):
        TuckerConv2dReLUPool.from_tucker(nn.Conv2d(3, 6, 3), 2)
    with pytest.raises(TypeError, match="not fused already"):
        TuckerConv2dReLUPool.from_tucker(TuckerConv2dReLUPool.from_tucker(conv, 2), 2)
    with pytest.raises(TypeError, match="to_dense"):
        TuckerConv2dReLUPool.from_tucker(conv, 2).to_dense()
    assert TuckerConv2dReLUPool(3, 6, 3, (2, 4), pool=3).pool == 3


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("options", [{"padding": 1, "padding_mode": "reflect"}, {"k": 4, "padding": "same"}])
def test_explicit_padding_and_unbatched_input(options) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_conv(**options), nn.ReLU(), nn.AvgPool2d(2))
    gm = _fused_matches(model, torch.randn(2, 3, 9, 11, dtype=F64), {"0": 2})
    x = torch.randn(3, 9, 11, dtype=F64)
    with torch.no_grad():
        y = gm(x)
        assert y.shape == (6, 4, 5)
        _close(y, model(x))


# -- pattern matching ------------------------------------------------------------------


class _Net(nn.Module):
    """A TuckerConv2d whose output goes through ``self.tail`` (the pattern under test)."""

    def __init__(self, **modules: nn.Module) -> None:
        super().__init__()
        self.conv = _conv(padding=1)
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv(x))


class _ReluModuleFunctionalPool(_Net):
    def __init__(self) -> None:
        super().__init__(act=nn.ReLU())

    def tail(self, y):
        return F.avg_pool2d(self.act(y), 2)


class _MethodRelu(_Net):
    def __init__(self) -> None:
        super().__init__(pool=nn.AvgPool2d(kernel_size=(2, 2), stride=2))

    def tail(self, y):
        return self.pool(y.relu())


class _Pool3(_Net):
    def tail(self, y):
        return F.avg_pool2d(torch.relu(y), (3, 3), stride=3, padding=0, ceil_mode=False)


@pytest.mark.parametrize("cls", [_ReluModuleFunctionalPool, _MethodRelu])
def test_relu_and_pool_forms_fuse(cls) -> None:
    torch.manual_seed(0)
    gm = _fused_matches(cls(), torch.randn(2, 3, 8, 8, dtype=F64), {"conv": 2})
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert set(dict(gm.named_children())) == {"conv"}, "the unused ReLU / pool modules are dropped"


def test_pool_3_floor_mode_drops_last_rows() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 10, dtype=F64)
    gm = _fused_matches(_Pool3(), x, {"conv": 3})
    with torch.no_grad():
        assert gm(x).shape == (2, 6, 3, 3)


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2, padding=1),
        nn.AvgPool2d(2, stride=1),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.AvgPool2d(2, divisor_override=3),
        nn.AvgPool2d((2, 3)),
        nn.MaxPool2d(2),
    ],
)
def test_unsupported_pool_keeps_the_pool_but_fuses_relu(pool) -> None:
    class Net(_Net):
        def __init__(self) -> None:
            super().__init__(pool=pool)

        def tail(self, y):
            return self.pool(F.relu(y))

    torch.manual_seed(0)
    gm = _fused_matches(Net(), torch.randn(2, 3, 9, 9, dtype=F64), {"conv": 1})
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "pool"]


def test_functional_pool_with_other_stride_is_not_fused() -> None:
    class Net(_Net):
        def tail(self, y):
            return F.avg_pool2d(F.relu(y, inplace=True), 2, 1)

    torch.manual_seed(0)
    _fused_matches(Net(), torch.randn(2, 3, 9, 9, dtype=F64), {"conv": 1})


def test_relu_with_two_users_keeps_the_pool() -> None:
    class Net(_Net):
        def __init__(self) -> None:
            super().__init__(pool=nn.AvgPool2d(2))

        def tail(self, y):
            r = F.relu(y)
            return self.pool(r) + r.mean()

    torch.manual_seed(0)
    gm = _fused_matches(Net(), torch.randn(2, 3, 8, 8, dtype=F64), {"conv": 1})
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "pool"]


@pytest.mark.parametrize("case", ["conv_two_users", "called_twice", "hooked"])
def test_conv_left_alone(case) -> None:
    class TwoUsers(_Net):
        def tail(self, y):
            return F.avg_pool2d(F.relu(y), 2) + y.mean()

    class CalledTwice(_Net):
        def tail(self, y):  # the same conv also runs without an epilogue: one module serves both
            return F.avg_pool2d(F.relu(y), 2).sum() + self.conv(y[:, :3]).sum()

    torch.manual_seed(0)
    model = {"conv_two_users": TwoUsers, "called_twice": CalledTwice, "hooked": _ReluModuleFunctionalPool}[case]()
    if case == "hooked":  # the hook would no longer see the conv's own output
        model.conv.register_forward_hook(lambda module, args, out: None)
    gm = _fused_matches(model, torch.randn(2, 3, 8, 8, dtype=F64), {})
    assert type(gm.conv) is TuckerConv2d


def test_untraceable_model_raises_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = _conv()

        def forward(self, x):
            y = self.conv(x)
            return F.relu(y) if y.sum() > 0 else y

    with pytest.raises(TypeError, match=r"torch\.fx cannot trace Branchy .*fuse_epilogues\(model\.features\)"):
        fuse_epilogues(Branchy())
    with pytest.raises(TypeError, match="must be an nn.Module"):
        fuse_epilogues(lambda x: x)
