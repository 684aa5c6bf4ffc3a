"""TuckerConv2d / TuckerLinear: forward against their own chains and dense layers, conversions, training."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from tucker_ops import _ops
from tucker_ops.modules import TuckerConv2d, TuckerLinear

BACKENDS = ("fused", "reference")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(a, b, **tol)


CONV_CASES = [
    # (C_in, C_out, kernel, ranks, options)
    (6, 10, 3, (3, 4), {}),
    (6, 10, 3, (None, 4), {"padding": 1}),
    (6, 10, 3, (3, None), {"padding": (0, 2), "bias": False}),
    (5, 7, (3, 2), (2, 3), {"stride": 2, "padding": 1, "dilation": (1, 2)}),
    (4, 8, 1, (2, 2), {"stride": (2, 1)}),
    (4, 8, 5, (3, 6), {"padding": "same", "dilation": 2}),
    (4, 8, 4, (3, 6), {"padding": "same"}),  # even kernel: asymmetric padding
    (4, 8, (2, 3), (3, None), {"padding": "same", "bias": False}),
    (4, 8, 3, (3, 6), {"padding": "valid"}),
    (4, 8, 3, (3, 6), {"padding": 1, "padding_mode": "reflect"}),
    (4, 8, 3, (None, 6), {"padding": (2, 1), "padding_mode": "replicate", "stride": 2}),
    (4, 8, 3, (3, 6), {"padding": 1, "padding_mode": "circular"}),
    (4, 8, 4, (3, 6), {"padding": "same", "padding_mode": "reflect"}),
    (3, 4, 3, (5, 9), {"padding": 1}),  # ranks above the mode sizes
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c_in, c_out, k, ranks, options", CONV_CASES)
def test_conv_matches_sequential_and_dense(backend, c_in, c_out, k, ranks, options):
    torch.manual_seed(0)
    m = TuckerConv2d(c_in, c_out, k, ranks, dtype=torch.float64, **options)
    m.backend = backend
    x = torch.randn(2, c_in, 11, 9, dtype=torch.float64)
    y = m(x)
    seq = m.to_sequential()
    dense = m.to_dense()
    # nn.Conv2d applies padding='same' / padding_mode itself: an independent check of our padding.
    assert isinstance(dense, nn.Conv2d) and dense.padding_mode == m.padding_mode
    _close(y, seq(x))
    _close(y, dense(x))
    assert y.is_contiguous()


@pytest.mark.parametrize("c_in, c_out, k, ranks, options", CONV_CASES[:6])
def test_conv_fused_and_reference_agree_float32(c_in, c_out, k, ranks, options):
    torch.manual_seed(1)
    m = TuckerConv2d(c_in, c_out, k, ranks, **options)
    x = torch.randn(3, c_in, 12, 10)
    m.backend = "fused"
    y_fused = m(x)
    m.backend = "reference"
    _close(y_fused, m(x), torch.float32)
    m.backend = None
    with _ops.use_reference():
        _close(y_fused, m(x), torch.float32)


def test_conv_unbatched_input():
    torch.manual_seed(0)
    m = TuckerConv2d(3, 5, 3, (2, 2), padding=1, padding_mode="reflect", dtype=torch.float64)
    x = torch.randn(3, 7, 7, dtype=torch.float64)
    _close(m(x), m(x[None])[0])
    assert m(x).shape == (5, 7, 7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 2}, "groups must be 1"),
        ({"padding": "same", "stride": 2}, "padding='same' needs stride 1"),
        ({"padding": "full"}, "padding must be"),
        ({"padding": -1}, "padding must be"),
        ({"padding_mode": "mirror"}, "padding_mode must be one of"),
        ({"stride": 0}, "stride must be"),
        ({"ranks": (0, 2)}, "r_in must be None or an int >= 1"),
        ({"ranks": (2, 2, 2)}, "ranks must be an int or a pair"),
        ({"kernel_size": 1, "padding": 2}, "padding along H must be at most the dilated kernel extent .* = 1"),
        ({"kernel_size": (3, 2), "padding": (1, 3)}, "padding along W .* = 2, but got padding 3"),
        ({"padding": 4, "dilation": (1, 2)}, "padding along H .* = 3, but got padding 4 with kernel size 3 and dilation 1"),
    ],
)
def test_conv_bad_arguments(kwargs, match):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "ranks": (2, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        TuckerConv2d(**args)


def test_int_ranks_mean_both_sides():
    assert TuckerConv2d(8, 8, 3, 4).ranks == (4, 4)
    assert TuckerLinear(8, 8, 3).ranks == (3, 3)


def test_parameter_shapes_and_none_registration():
    m = TuckerConv2d(6, 10, (3, 5), (None, 4), bias=False)
    assert m.first is None and m.bias is None
    assert "first" in m._parameters and m._parameters["first"] is None
    assert m.core.shape == (4, 6, 3, 5) and m.last.shape == (10, 4)
    assert set(m.state_dict()) == {"core", "last"}
    lin = TuckerLinear(12, 7, (5, None))
    assert lin.first.shape == (5, 12) and lin.core.shape == (7, 5) and lin.last is None
    assert set(lin.state_dict()) == {"first", "core", "bias"}


def test_init_scale_matches_dense_default():
    # The composed weight should have nn.Conv2d's default variance 1 / (3 * fan_in).
    torch.manual_seed(0)
    for ranks in [(32, 32), (None, 16), (16, None), (80, 100)]:
        m = TuckerConv2d(64, 64, 3, ranks)
        w = m.to_dense().weight
        expected = (1.0 / (3 * 64 * 9)) ** 0.5
        assert 0.8 < w.std().item() / expected < 1.25, ranks
    lin = TuckerLinear(256, 128, (64, 32))
    assert 0.8 < lin.to_dense().weight.std().item() / (1.0 / (3 * 256)) ** 0.5 < 1.25


def test_extra_repr_shows_ranks_and_ratio():
    m = TuckerConv2d(16, 32, 5, (8, 4))
    text = repr(m)
    assert "ranks=(8, 4)" in text
    assert f"compression={(32 * 16 * 25 + 32) / (16 * 8 + 8 * 4 * 25 + 4 * 32 + 32):.2f}x" in text
    assert m.compression_ratio == pytest.approx(12832 / 1088)
    lin = TuckerLinear(120, 84, (None, 30))
    assert "ranks=(None, 30)" in repr(lin) and "compression=" in repr(lin)
    m.backend = "reference"
    assert "backend='reference'" in repr(m)


def test_macs_count_each_stage():
    # Thesis conv2 at its input (1, 16, 14, 14): 14·14·16·8 + 10·10·4·8·25 + 10·10·4·32.
    m = TuckerConv2d(16, 32, 5, (8, 4))
    assert m.macs((1, 16, 14, 14)) == 25088 + 80000 + 12800
    assert m.macs((3, 16, 14, 14)) == 3 * (25088 + 80000 + 12800)
    lin = TuckerLinear(800, 120, (40, 200))
    assert lin.macs((2, 800)) == 2 * (800 * 40 + 40 * 200 + 200 * 120)
    assert TuckerLinear(120, 84, (None, 30)).macs((5, 7, 120)) == 35 * (120 * 30 + 30 * 84)


# -- from_conv / from_linear --------------------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 8, 3, padding=1),
        nn.Conv2d(6, 8, 3, stride=2, dilation=2, bias=False),
        nn.Conv2d(6, 8, (3, 2), padding="same", padding_mode="circular"),
    ],
)
@pytest.mark.parametrize("ranks", [(6, 8), (None, 8), (6, None)])
def test_from_conv_full_rank_reproduces_conv(conv, ranks):
    torch.manual_seed(0)
    conv.reset_parameters()
    m = TuckerConv2d.from_conv(conv, ranks=ranks)
    assert m.ranks == ranks
    assert (m.stride, m.dilation, m.padding_mode) == (conv.stride, conv.dilation, conv.padding_mode)
    assert (m.bias is None) == (conv.bias is None)
    assert m.reconstruction_error < 1e-5
    x = torch.randn(2, 6, 9, 10)
    y = conv(x)
    for backend in BACKENDS:
        m.backend = backend
        err = (m(x) - y).norm() / y.norm()
        assert err < 1e-5, (backend, err)


def test_from_conv_keeps_dtype_device_mode_and_grad_flags():
    conv = nn.Conv2d(5, 7, 3, dtype=torch.float64).eval().requires_grad_(False)
    m = TuckerConv2d.from_conv(conv, ranks=(2, 3))
    assert m.core.dtype == torch.float64 and m.core.device == conv.weight.device
    assert not m.training and not m.core.requires_grad
    assert 0 < m.reconstruction_error < 1


def test_from_conv_rejects_groups_and_other_types():
    with pytest.raises(ValueError, match="groups must be 1"):
        TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), ranks=(2, 2))
    with pytest.raises(TypeError, match="must be an nn.Conv2d"):
        TuckerConv2d.from_conv(nn.ConvTranspose2d(4, 4, 3), ranks=(2, 2))
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        TuckerLinear.from_linear(nn.Conv2d(4, 4, 1), ranks=(2, 2))


def test_from_conv_error_falls_as_rank_grows():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3)
    errors = [TuckerConv2d.from_conv(conv, ranks=(r, r)).reconstruction_error for r in (2, 6, 12)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("ranks", [(10, 7), (None, 7), (10, None), 3])
def test_from_linear_full_and_low_rank(ranks):
    torch.manual_seed(0)
    linear = nn.Linear(10, 7)
    m = TuckerLinear.from_linear(linear, ranks=ranks)
    x = torch.randn(4, 3, 10)
    y = linear(x)
    err = ((m(x) - y).norm() / y.norm()).item()
    if ranks == 3:
        assert 0 < m.reconstruction_error < 1 and err < 1
    else:
        assert m.reconstruction_error < 1e-5 and err < 1e-5
    _close(m(x), m.to_sequential()(x), torch.float32)


def test_from_conv_with_automatic_ranks():
    # A weight of exact Tucker ranks (3, 2) plus nothing else: energy at 0.999 finds them.
    torch.manual_seed(0)
    core = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    w = torch.einsum("oa,abhw,bi->oihw", torch.randn(16, 2, dtype=torch.float64), core, torch.randn(3, 12, dtype=torch.float64))
    conv = nn.Conv2d(12, 16, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(w)
    m = TuckerConv2d.from_conv(conv, method="energy", energy=0.999)
    assert m.ranks == (3, 2)
    assert m.reconstruction_error < 1e-8


# -- from_sequential / to_sequential ---------------------------------------------------


THESIS_CHAINS = [
    nn.Sequential(nn.Conv2d(1, 2, 5, padding=2, bias=False), nn.Conv2d(2, 16, 1)),
    nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.Conv2d(8, 4, 5, bias=False), nn.Conv2d(4, 32, 1)),
    nn.Sequential(nn.Linear(800, 40, bias=False), nn.Linear(40, 200, bias=False), nn.Linear(200, 120)),
    nn.Sequential(nn.Linear(120, 30, bias=False), nn.Linear(30, 84)),
]
THESIS_RANKS = [(None, 2), (8, 4), (40, 200), (None, 30)]


@pytest.mark.parametrize("chain, ranks", list(zip(THESIS_CHAINS, THESIS_RANKS)))
def test_from_sequential_thesis_net_after_chains(chain, ranks):
    torch.manual_seed(0)
    chain = copy.deepcopy(chain)
    cls = TuckerConv2d if isinstance(chain[0], nn.Conv2d) else TuckerLinear
    m = cls.from_sequential(chain)
    assert m.ranks == ranks
    back = m.to_sequential()
    assert repr(back) == repr(chain)
    for a, b in zip(chain.parameters(), back.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(2, 1, 28, 28) if ranks == (None, 2) else torch.randn(2, 16, 14, 14) if ranks == (8, 4) else None
    if x is None:
        x = torch.randn(3, chain[0].in_features)
    for backend in BACKENDS:
        m.backend = backend
        _close(m(x), chain(x), torch.float32)


@pytest.mark.parametrize(
    "chain, ranks",
    [
        (nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(3, 8, 3, stride=2, padding=1)), (3, None)),
        (nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(3, 4, 1, bias=False)), (None, 3)),  # read as output side
        (
            nn.Sequential(
                nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect", bias=False), nn.Conv2d(4, 8, 1)
            ),
            (3, 4),
        ),
    ],
)
def test_from_sequential_other_conv_chains(chain, ranks):
    torch.manual_seed(0)
    m = TuckerConv2d.from_sequential(chain)
    assert m.ranks == ranks
    x = torch.randn(2, 6, 9, 8)
    _close(m(x), chain(x), torch.float32)
    _close(m.to_sequential()(x), chain(x), torch.float32)


def test_round_trip_module_sequential_module():
    torch.manual_seed(0)
    for m in [
        TuckerConv2d(6, 10, 3, (3, 4), stride=2, padding=1, dilation=(1, 2), padding_mode="replicate"),
        TuckerConv2d(6, 10, 3, (None, 4), bias=False),
        TuckerConv2d(6, 10, 3, (3, None)),
        TuckerLinear(9, 5, (4, 3)),
        TuckerLinear(9, 5, (None, 3), bias=False),
        TuckerLinear(9, 5, (4, None)),
    ]:
        again = type(m).from_sequential(m.to_sequential())
        if m.ranks == (4, None) and isinstance(m, TuckerLinear):
            # Linear(9, 4, bias=False), Linear(4, 5) is the same chain either way; it reads as (None, 4).
            assert again.ranks == (None, 4)
        else:
            assert again.ranks == m.ranks
            assert repr(again) == repr(m)
        params = list(m.parameters())
        assert len(params) == len(list(again.parameters()))
        for a, b in zip(params, again.parameters()):
            assert torch.equal(a, b)


def test_from_sequential_folds_middle_biases_exactly():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(6, 3, 1), nn.Conv2d(3, 4, 3, padding=0), nn.Conv2d(4, 8, 1))
    chain = chain.double()
    m = TuckerConv2d.from_sequential(chain)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    _close(m(x), chain(x))
    # The core's own bias folds through any padding; a reflect pad carries the input bias too.
    chain = nn.Sequential(nn.Conv2d(6, 3, 1), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 8, 1, bias=False))
    chain = chain.double()
    m = TuckerConv2d.from_sequential(chain)
    _close(m(x), chain(x))
    lin = nn.Sequential(nn.Linear(9, 4), nn.Linear(4, 3), nn.Linear(3, 5, bias=False)).double()
    m = TuckerLinear.from_sequential(lin)
    xl = torch.randn(4, 9, dtype=torch.float64)
    _close(m(xl), lin(xl))


@pytest.mark.parametrize(
    "chain, match",
    [
        (nn.Sequential(nn.Conv2d(6, 3, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 1)), "cannot be folded exactly"),
        (nn.Sequential(nn.Conv2d(6, 3, 1, stride=2, bias=False), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1)), r"layer 0 must be a 1×1 projection.*stride"),
        (nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1, padding=1)), r"layer 2 .*padding"),
        (nn.Sequential(nn.Conv2d(6, 3, 3, bias=False), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1)), r"layer 0 .*kernel_size"),
        (nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 8, 1, dilation=2)), "dilation"),
        (nn.Sequential(nn.Conv2d(6, 4, 1, bias=False), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 8, 1)), "groups=2"),
        (nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(5, 4, 3), nn.Conv2d(4, 8, 1)), "gives 3 channels but layer 1 expects in_channels=5"),
        (nn.Sequential(nn.Conv2d(6, 3, 3, bias=False), nn.Conv2d(3, 4, 3)), "2-layer chain must be"),
        (nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.ReLU()), "layer 1 must be an nn.Conv2d"),
        (nn.Sequential(nn.Conv2d(6, 3, 1)), "2 or 3 layers"),
        (nn.Sequential(*[nn.Conv2d(6, 6, 1) for _ in range(4)]), "2 or 3 layers"),
        (nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(3, 8, 1, dtype=torch.float64)), "share dtype and device"),
    ],
)
def test_from_sequential_rejects_non_chains(chain, match):
    with pytest.raises(ValueError, match=match):
        TuckerConv2d.from_sequential(chain)


def test_linear_from_sequential_rejects_non_chains():
    with pytest.raises(ValueError, match="gives 4 features but layer 1 expects in_features=5"):
        TuckerLinear.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match="layer 0 must be an nn.Linear"):
        TuckerLinear.from_sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match="nn.Sequential or a list"):
        TuckerLinear.from_sequential(nn.Linear(3, 4))


# -- state, copies, dtypes, training ------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: TuckerConv2d(6, 10, 3, (3, 4), padding="same"),
        lambda: TuckerConv2d(6, 10, 3, (None, 4), bias=False),
        lambda: TuckerLinear(9, 5, (4, 3)),
        lambda: TuckerLinear(9, 5, (4, None)),
    ],
)
def test_state_dict_round_trip(make):
    torch.manual_seed(0)
    a = make()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    b = make()
    b.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 6, 8, 8) if isinstance(a, TuckerConv2d) else torch.randn(2, 9)
    assert torch.equal(a(x), b(x))
    c = copy.deepcopy(a)
    assert torch.equal(a(x), c(x)) and c.core is not a.core


def test_state_dict_rejects_other_ranks():
    with pytest.raises(RuntimeError, match="size mismatch"):
        TuckerLinear(9, 5, (4, 3)).load_state_dict(TuckerLinear(9, 5, (4, 2)).state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        TuckerLinear(9, 5, (None, 3)).load_state_dict(TuckerLinear(9, 5, (4, 3)).state_dict())


def test_to_dtype():
    m = TuckerConv2d(4, 6, 3, (2, 3)).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.randn(1, 4, 5, 5, dtype=torch.float64)).dtype == torch.float64
    assert m.to_sequential()[0].weight.dtype == torch.float64
    assert m.to_dense().weight.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_reduces_loss_and_reaches_every_parameter(backend):
    torch.manual_seed(0)
    model = nn.Sequential(
        TuckerConv2d(3, 8, 3, (2, 4), padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        TuckerLinear(8 * 6 * 6, 4, (16, 3)),
    )
    for m in model:
        if isinstance(m, (TuckerConv2d, TuckerLinear)):
            m.backend = backend
    x = torch.randn(16, 3, 6, 6)
    target = torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        if not losses:
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_gradients_match_between_backends():
    torch.manual_seed(0)
    m = TuckerConv2d(4, 6, 3, (2, 3), stride=2, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    grads = {}
    for backend in BACKENDS:
        m.backend = backend
        m.zero_grad()
        x.grad = None
        m(x).square().sum().backward()
        grads[backend] = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    for a, b in zip(*grads.values()):
        _close(a, b)


def test_bad_backend_is_rejected():
    m = TuckerLinear(4, 3, (2, 2))
    m.backend = "cuda-please"
    with pytest.raises(ValueError):
        m(torch.randn(2, 4))


@pytest.mark.parametrize(
    "kernel_size, padding, dilation, ok",
    [
        (1, 1, 1, True),  # one all-padding border: tolerated, real models have it
        (1, 2, 1, False),
        (3, 3, 1, True),  # exactly the extent
        (3, 4, 1, False),
        (3, 5, 2, True),  # dilated extent 2 * 2 + 1 = 5
        (3, 6, 2, False),
        ((1, 3), (1, 4), 1, False),
    ],
)
def test_padding_rule_matches_the_op(kernel_size, padding, dilation, ok):
    """The constructor's rule is the op's: it accepts exactly what the op runs."""
    from tucker_ops.modules import padding_extent_error

    kernel, pad, dil = (tuple(torch.nn.modules.utils._pair(v)) for v in (kernel_size, padding, dilation))
    assert (padding_extent_error(kernel, pad, dil) is None) == ok
    x = torch.randn(1, 2, 12, 12)
    core = torch.randn(3, 2, *kernel)
    for backend in ("fused", "reference"):
        if ok:
            _ops.tucker_conv2d(x, None, core, None, None, 1, pad, dil, backend=backend)
        elif backend == "fused":
            with pytest.raises(ValueError, match="dilated kernel extent"):
                _ops.tucker_conv2d(x, None, core, None, None, 1, pad, dil, backend=backend)
    if ok:
        TuckerConv2d(2, 3, kernel_size, (None, 3), padding=padding, dilation=dilation)
    else:
        with pytest.raises(ValueError, match="dilated kernel extent"):
            TuckerConv2d(2, 3, kernel_size, (None, 3), padding=padding, dilation=dilation)
        with pytest.raises(ValueError, match="from_conv: padding along"):
            TuckerConv2d.from_conv(nn.Conv2d(2, 3, kernel_size, padding=padding, dilation=dilation), ranks=(None, 2))


def test_padding_rule_ignores_explicit_padding_modes():
    # Non-zero padding modes pad before the op, which then gets padding 0.
    m = TuckerConv2d(2, 3, 1, (None, 3), padding=2, padding_mode="replicate")
    assert m(torch.randn(1, 2, 4, 4)).shape == (1, 3, 8, 8)
