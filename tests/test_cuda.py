"""The fused ops on every device against reference.py, with the GPU in mind.

Parametrised over device: "cuda" runs where ``torch.cuda.is_available()`` and is
skipped with that reason elsewhere; "cpu" runs the same checks (float32/float64)
so the test logic itself is exercised on every machine. The oracle is
reference.py in float64 on the same device; errors are norm-wise relative:
at most 1e-4 in float32 and 1e-2 in float16/bfloat16.

On CUDA, even seeds of the sweeps set TUCKER_OPS_CUDA_FUSED=1 (the fused forward
kernel on every shape it takes) and odd seeds TUCKER_OPS_CUDA_FUSED=0 (the
unfused chain), so both are checked on the same kind of shapes; the even seeds
also cycle TUCKER_OPS_CUDA_CLUSTER through 2, 4, 8 and 0 (the thread-block
cluster kernels of sm_90+ at every cluster size, then the single-block ones,
with TUCKER_OPS_CUDA_TC=0: float16/bfloat16 Tucker-2 shapes otherwise go to
the tensor-core kernel), and every fourth seed (2, 6, ...) sets
TUCKER_OPS_CUDA_LINEAR_GRID=1 and TUCKER_OPS_CUDA_CONV_GRID=1 (the whole-GPU
kernels).
Tests named after a path force that path; the others leave the op to choose.
TUCKER_OPS_TEST_DEVICES=cuda (comma-separated) restricts the device parameter, as
benchmarks/gpu_check.sh does to spend GPU time on the GPU.
"""

from __future__ import annotations

import os
import random
import re

import pytest
import torch
from torch.library import opcheck

from test_ops_fused_paths import conv_output_format

from tucker_ops import _ops, reference

OPS = torch.ops.tucker_ops
HAS_CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False)"
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
_WANTED = os.environ.get("TUCKER_OPS_TEST_DEVICES", "cpu,cuda").split(",")
DEVICES = [
    p
    for p in (pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_ONLY))
    if p.values[0] in _WANTED
]
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DEVICE_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": ALL_DTYPES}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
NAMES = ("input", "first", "core", "last", "bias")


def _require(device: str, dtype: torch.dtype) -> None:
    if dtype not in DEVICE_DTYPES[device]:
        pytest.skip(f"the {device} backend does not implement {dtype}")


CLUSTER_SIZES = ("2", "4", "8", "0")


def _select_path(device: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if device == "cuda":
        monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1" if seed % 2 == 0 else "0")
        cluster = CLUSTER_SIZES[(seed // 2) % len(CLUSTER_SIZES)]
        monkeypatch.setenv("TUCKER_OPS_CUDA_CLUSTER", cluster)
        # The tensor-core kernel forced where it applies (float16/bfloat16
        # Tucker-2 shapes); with clusters off it is off too, so the CUDA-core
        # kernels see those shapes.
        monkeypatch.setenv("TUCKER_OPS_CUDA_TC", "0" if cluster == "0" else "1")
        # Where the tensor-core kernel runs, every other pair of those seeds takes
        # its resident variant (first, core and last kept in shared memory).
        monkeypatch.setenv("TUCKER_OPS_CUDA_TC_RESIDENT", "1" if (seed // 8) % 2 else "0")
        if seed % 4 == 2:
            monkeypatch.setenv("TUCKER_OPS_CUDA_LINEAR_GRID", "1")
            monkeypatch.setenv("TUCKER_OPS_CUDA_CONV_GRID", "1")


@pytest.fixture(autouse=True)
def _no_tf32():
    # The unfused CUDA chain runs cuDNN/cuBLAS under torch's global precision
    # settings, as nn.Conv2d does; cuDNN's TF32 default would miss float32's 1e-4
    # (cuBLAS's default is full float32 already).
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.double() - want.double()).norm().item()
    scale = want.double().norm().item()
    return diff / scale if scale > 0 else diff


def _randn(shape, dtype, device, gen):
    # Drawn on the CPU from a seeded generator: the same numbers on every device.
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)


def _conv_input(shape, layout: str, dtype, device, gen) -> torch.Tensor:
    n, c, h, w = shape
    if layout == "contiguous":
        return _randn((n, c, h, w), dtype, device, gen)
    if layout == "channels_last":
        return _randn((n, c, h, w), dtype, device, gen).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return _randn((n, 2 * c, h + 1, 2 * w), dtype, device, gen)[:, ::2, 1:, ::2]
    if layout == "permuted":
        return _randn((w, c, n, h), dtype, device, gen).permute(2, 1, 3, 0)
    if layout == "offset":  # channels_last, but one element into its storage: not 16-byte aligned
        return _randn((n * h * w * c + 1,), dtype, device, gen)[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    raise AssertionError(layout)


def _check_against_reference(fused_fn, reference_fn, tensors, dtype, grad_seed: int) -> None:
    """Forward and every gradient of fused_fn against reference_fn in float64."""
    # detach() keeps strides, so channels_last / sliced / permuted inputs reach the op as they are.
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    leaves_ref = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    y = fused_fn(*leaves)
    y_ref = reference_fn(*leaves_ref)
    assert y.dtype == dtype and y.device == tensors[0].device
    assert y.is_contiguous(memory_format=conv_output_format(tensors[0]))
    assert y.shape == y_ref.shape
    err = _rel_err(y, y_ref)
    assert err <= TOL[dtype], f"forward: relative error {err:.2e} > {TOL[dtype]:.0e}"

    g = _randn(tuple(y.shape), dtype, y.device, torch.Generator().manual_seed(grad_seed))
    y.backward(g)
    y_ref.backward(g.double())
    for name, a, b in zip(NAMES, leaves, leaves_ref):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient for {name}"
        assert a.grad.dtype == dtype and a.grad.shape == a.shape
        err = _rel_err(a.grad, b.grad)
        assert err <= TOL[dtype], f"grad of {name}: relative error {err:.2e} > {TOL[dtype]:.0e}"


# -- conv2d ---------------------------------------------------------------------------


def _random_conv(seed: int, device: str):
    """A random valid configuration; about a third are large enough for several
    tiles, input-channel chunks, R_out > 32 (and > 128: the GEMM fallback)."""
    rng = random.Random(seed)
    big = rng.random() < 0.35
    while True:
        h, w = rng.randint(1, 20 if big else 9), rng.randint(1, 20 if big else 9)
        k = (rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        padding = (rng.randint(0, 2), rng.randint(0, 2))
        fits = all(s + 2 * p - d * (kk - 1) - 1 >= 0 for s, p, d, kk in zip((h, w), padding, dilation, k))
        if fits and all(p <= d * (kk - 1) + 1 for p, d, kk in zip(padding, dilation, k)):
            break
    side = rng.choice(("tucker2", "tucker2", "no_first", "no_last"))
    c_in = rng.randint(1, 40 if big else 6)
    r_in = None if side == "no_first" else rng.randint(1, 48 if big else 5)
    r_out = rng.randint(1, 140 if big else 5)
    c_out = None if side == "no_last" else rng.randint(1, 40 if big else 6)
    n = rng.choice((0, 1, 2, 3))
    dtype = rng.choice(DEVICE_DTYPES[device])
    layout = rng.choice(("contiguous", "channels_last", "sliced", "permuted"))
    bias = rng.random() < 0.6

    gen = torch.Generator().manual_seed(seed)
    x = _conv_input((n, c_in, h, w), layout, dtype, device, gen)
    first = _randn((r_in, c_in), dtype, device, gen) if r_in is not None else None
    core = _randn((r_out, r_in if r_in is not None else c_in, *k), dtype, device, gen)
    last = _randn((c_out, r_out), dtype, device, gen) if c_out is not None else None
    b = _randn((c_out if c_out is not None else r_out,), dtype, device, gen) if bias else None
    return (x, first, core, last, b), (stride, padding, dilation), dtype


@pytest.mark.parametrize("seed", range(32))
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_random_configurations(device: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors, conv, dtype = _random_conv(seed, device)
    _select_path(device, seed, monkeypatch)
    _check_against_reference(
        lambda *t: _ops.tucker_conv2d(*t, *conv, backend="fused"),
        lambda *t: reference.tucker_conv2d(*t, *conv),
        tensors,
        dtype,
        seed + 1000,
    )


# Realistic layers: (N, C_in, H, W), r_in, r_out, C_out, k, stride, padding, dilation.
CONV_SHAPES = {
    "thesis_conv2": ((2, 6, 12, 12), 4, 8, 16, 5, 1, 0, 1),
    "resnet_256_14": ((2, 256, 14, 14), 64, 64, 256, 3, 1, 1, 1),
    "stride2_64_128": ((2, 64, 28, 28), 16, 32, 128, 3, 2, 1, 1),
    "tucker1_out_side": ((2, 3, 17, 19), None, 24, 64, 3, 1, 1, 1),
    "tucker1_in_side": ((2, 48, 9, 9), 12, 20, None, 3, 1, 1, 1),
    "r_out_over_128": ((1, 32, 10, 10), 16, 160, 48, 3, 1, 1, 1),
    "r_in_chunked": ((1, 96, 9, 9), 300, 8, 16, 3, 1, 1, 1),
    "dilated_strided": ((2, 8, 23, 21), 6, 10, 12, (3, 2), (2, 3), (2, 1), (3, 2)),
    "huge_patch": ((1, 4, 90, 90), 2, 3, 5, 7, 3, 0, 8),
}


def _layer_operands(spec, layout: str, dtype: torch.dtype, device: str, seed: int):
    """(input, first, core, last, bias) and (stride, padding, dilation) of a CONV_SHAPES-style spec."""
    shape, r_in, r_out, c_out, k, stride, padding, dilation = spec
    gen = torch.Generator().manual_seed(seed)
    c_in = shape[1]
    k, stride, padding, dilation = (v if isinstance(v, tuple) else (v, v) for v in (k, stride, padding, dilation))
    x = _conv_input(shape, layout, dtype, device, gen)
    first = _randn((r_in, c_in), dtype, device, gen) if r_in else None
    core = _randn((r_out, r_in or c_in, *k), dtype, device, gen)
    last = _randn((c_out, r_out), dtype, device, gen) if c_out else None
    bias = _randn((c_out or r_out,), dtype, device, gen)
    return (x, first, core, last, bias), (stride, padding, dilation)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", CONV_SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_realistic_layers(device: str, name: str, dtype: torch.dtype, layout: str) -> None:
    # The op chooses its path (on sm_90+ the cluster kernel for R_out >= 32).
    _require(device, dtype)
    if device == "cpu" and dtype == torch.float64:
        pytest.skip("float64 on CPU: tests/test_ops.py covers it")
    tensors, conv = _layer_operands(CONV_SHAPES[name], layout, dtype, device, 5)
    _check_against_reference(
        lambda *t: _ops.tucker_conv2d(*t, *conv, backend="fused"),
        lambda *t: reference.tucker_conv2d(*t, *conv),
        tensors,
        dtype,
        11,
    )


@CUDA_ONLY
@pytest.mark.parametrize("cluster", CLUSTER_SIZES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", ["resnet_256_14", "stride2_64_128", "tucker1_out_side", "tucker1_in_side",
                                  "r_out_over_128", "r_in_chunked", "dilated_strided"])
def test_conv2d_fused_kernel_at_every_cluster_size(
    name: str, dtype: torch.dtype, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fused forward forced, at each cluster size (sm_90+; elsewhere, and where
    # the projected patch does not fit a cluster block, the single-block kernel).
    if "cuda" not in _WANTED:
        pytest.skip("TUCKER_OPS_TEST_DEVICES excludes cuda")
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1")
    monkeypatch.setenv("TUCKER_OPS_CUDA_CLUSTER", cluster)
    monkeypatch.setenv("TUCKER_OPS_CUDA_TC", "0")  # bfloat16 would go to the tensor-core kernel
    tensors, conv = _layer_operands(CONV_SHAPES[name], "contiguous", dtype, "cuda", 7)
    _check_against_reference(
        lambda *t: _ops.tucker_conv2d(*t, *conv, backend="fused"),
        lambda *t: reference.tucker_conv2d(*t, *conv),
        tensors,
        dtype,
        13,
    )


TC_SHAPES = {
    **{k: CONV_SHAPES[k] for k in ("thesis_conv2", "resnet_256_14", "stride2_64_128", "dilated_strided")},
    # Ranks and channels off the 16-multiples, a width off the 16-pixel tile rows.
    "odd_sizes": ((3, 37, 11, 19), 21, 45, 50, 3, 1, 1, 1),
    "ranks_128": ((1, 130, 9, 7), 128, 128, 70, (1, 3), 1, (0, 1), 1),
    # More tiles (336) than a GPU's resident blocks (2 per multiprocessor), two C_in
    # chunks each: the resident variant's blocks loop over items and prefetch across them.
    "many_tiles": ((24, 80, 28, 28), 32, 24, 72, 3, 1, 1, 1),
    # W_out a multiple of 8 (40: the last tile's second half past the image), so
    # step 3 writes 8-pixel vectors; H_out 18 (a tile's last rows past the image)
    # and C_out 40 (a 16-channel group partly past C_out) mask whole vectors.
    "rows_of_eight": ((3, 24, 18, 40), 16, 24, 40, 3, 1, 1, 1),
    # R_out <= 16: two warps per output tile in step 2, on alternate taps; here
    # the core is staged in chunks of taps (49 taps of 128 x 16 do not fit at
    # once), so each chunk's taps alternate too. (thesis_conv2 and
    # dilated_strided take the split with the core staged whole.)
    "taps_in_chunks": ((2, 32, 12, 12), 128, 16, 24, 7, 1, 3, 1),
}


@CUDA_ONLY
@pytest.mark.parametrize("variant", ["streaming", "resident"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("bias", ["bias", "no_bias"])
@pytest.mark.parametrize("name", TC_SHAPES)
def test_conv2d_tensor_core_kernel(
    name: str, bias: str, dtype: torch.dtype, layout: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tensor-core kernel forced (sm_80+): float16/bfloat16, and float32 with
    # cuDNN's TF32 switch on, as nn.Conv2d would then run: TF32 rounds operands
    # to 10 mantissa bits, so 5e-3, not 1e-4. (ranks_128 in float32 does not
    # fit its shared memory: the CUDA-core kernels take it.) "resident": its
    # variant with the factors in shared memory, where they fit (else the
    # streaming kernel runs).
    if "cuda" not in _WANTED:
        pytest.skip("TUCKER_OPS_TEST_DEVICES excludes cuda")
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1")
    monkeypatch.setenv("TUCKER_OPS_CUDA_TC", "1")
    monkeypatch.setenv("TUCKER_OPS_CUDA_TC_RESIDENT", "1" if variant == "resident" else "0")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dtype == torch.float32)
    tensors, conv = _layer_operands(TC_SHAPES[name], layout, dtype, "cuda", 17)
    if bias == "no_bias":
        tensors = (*tensors[:4], None)
    x = tensors[0]
    y = _ops.tucker_conv2d(*tensors, *conv, backend="fused")
    want = reference.tucker_conv2d(*(t.double() if t is not None else None for t in tensors), *conv)
    tol = 5e-3 if dtype == torch.float32 else TOL[dtype]
    err = _rel_err(y, want)
    assert y.dtype == dtype and y.shape == want.shape
    assert y.is_contiguous(memory_format=conv_output_format(x))
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_weight_gradients_over_many_pixels(device: str) -> None:
    # N * H_out * W_out = 4 * 48 * 48: weight-gradient GEMMs split K and sum the splits.
    gen = torch.Generator().manual_seed(8)
    t = (
        _randn((4, 12, 48, 48), torch.float32, device, gen),
        _randn((5, 12), torch.float32, device, gen),
        _randn((6, 5, 3, 3), torch.float32, device, gen),
        _randn((7, 6), torch.float32, device, gen),
        _randn((7,), torch.float32, device, gen),
    )
    conv = ((1, 1), (1, 1), (1, 1))
    _check_against_reference(
        lambda *a: _ops.tucker_conv2d(*a, *conv), lambda *a: reference.tucker_conv2d(*a, *conv), t, torch.float32, 3
    )


# -- linear ---------------------------------------------------------------------------


def _random_linear(seed: int, device: str):
    rng = random.Random(seed)
    big = rng.random() < 0.35
    lead = rng.choice(((), (0,), (1,), (5,), (2, 7), (3, 0, 2), (130,) if big else (4,)))
    if big and rng.random() < 0.3:
        lead = (2100,)  # rows >= 2048: weight gradients split their K loop
    side = rng.choice(("tucker2", "tucker2", "no_first", "no_last"))
    n_in = rng.randint(1, 300 if big else 8)
    r_in = None if side == "no_first" else rng.randint(1, 80 if big else 5)
    r_out = rng.randint(1, 80 if big else 5)
    n_out = None if side == "no_last" else rng.randint(1, 200 if big else 8)
    dtype = rng.choice(DEVICE_DTYPES[device])
    gen = torch.Generator().manual_seed(seed)
    x = _randn((*lead, n_in), dtype, device, gen)
    if rng.random() < 0.25 and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous input
    first = _randn((r_in, n_in), dtype, device, gen) if r_in is not None else None
    core = _randn((r_out, r_in if r_in is not None else n_in), dtype, device, gen)
    last = _randn((n_out, r_out), dtype, device, gen) if n_out is not None else None
    bias = _randn((n_out if n_out is not None else r_out,), dtype, device, gen) if rng.random() < 0.6 else None
    return (x, first, core, last, bias), dtype


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("device", DEVICES)
def test_linear_random_configurations(device: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _select_path(device, seed, monkeypatch)
    tensors, dtype = _random_linear(seed, device)
    _check_against_reference(
        lambda *t: _ops.tucker_linear(*t, backend="fused"), reference.tucker_linear, tensors, dtype, seed + 2000
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_thesis_and_large_layers(device: str, dtype: torch.dtype) -> None:
    _require(device, dtype)
    gen = torch.Generator().manual_seed(9)
    for rows, n_in, r_in, r_out, n_out in ((64, 800, 40, 200, 500), (3, 1024, 256, 256, 1024), (1, 800, 40, 200, 120)):
        t = (
            _randn((rows, n_in), dtype, device, gen),
            _randn((r_in, n_in), dtype, device, gen),
            _randn((r_out, r_in), dtype, device, gen),
            _randn((n_out, r_out), dtype, device, gen),
            _randn((n_out,), dtype, device, gen),
        )
        _check_against_reference(_ops.tucker_linear, reference.tucker_linear, t, dtype, rows)


@pytest.mark.parametrize("path", ["fused", "fused_cluster_2", "fused_no_cluster", "chain"])
@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last", "core_only"])
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 511, 512, 513])
@pytest.mark.parametrize("device", DEVICES)
def test_linear_row_blocks_and_output_splits(
    device: str, rows: int, sides: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows around the fused kernel's 8-row blocks and its 512-row limit; a wide
    # last factor after small early stages, so few row blocks split the outputs
    # (or, on sm_90+, share them in a cluster: auto picks 8 ranks, more than
    # r_in / r_out have features, so some ranks' slices are empty).
    if device == "cuda":
        monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "0" if path == "chain" else "1")
        cluster = {"fused_cluster_2": "2", "fused_no_cluster": "0"}.get(path)
        if cluster is not None:
            monkeypatch.setenv("TUCKER_OPS_CUDA_CLUSTER", cluster)
    elif path != "fused":
        pytest.skip("the CUDA paths only differ on CUDA")
    gen = torch.Generator().manual_seed(rows)
    n_in, r_in, r_out, n_out = 24, 6, 5, 300
    has_first, has_last = sides in ("tucker2", "no_last"), sides in ("tucker2", "no_first")
    t = (
        _randn((rows, n_in), torch.float32, device, gen),
        _randn((r_in, n_in), torch.float32, device, gen) if has_first else None,
        _randn((r_out, r_in if has_first else n_in), torch.float32, device, gen),
        _randn((n_out, r_out), torch.float32, device, gen) if has_last else None,
        _randn((n_out if has_last else r_out,), torch.float32, device, gen),
    )
    _check_against_reference(_ops.tucker_linear, reference.tucker_linear, t, torch.float32, rows + 1)


# The whole-GPU kernel (linear_grid.cu): 16-byte loads where K is a multiple of
# the vector and the rows are aligned ("aligned", "wide"), element loads where
# not ("odd" sizes; "offset": aligned sizes, but the input starts one element
# into its storage); "wide" has a long first stage over few outputs, which
# splits K over several warps of a block.
GRID_LAYERS = {
    "aligned": (520, 72, 48, 300, 0),
    "odd": (301, 37, 29, 203, 0),
    "offset": (520, 72, 48, 300, 1),
    "wide": (4096, 24, 40, 1024, 0),
}


@pytest.mark.parametrize("rows", [1, 9, 40])
@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last", "core_only"])
@pytest.mark.parametrize("layer", list(GRID_LAYERS))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_whole_gpu_kernel(
    device: str, dtype: torch.dtype, layer: str, sides: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the CPU the switch means nothing: the same checks run against the CPU kernels.
    _require(device, dtype)
    monkeypatch.setenv("TUCKER_OPS_CUDA_LINEAR_GRID", "1")
    n_in, r_in, r_out, n_out, offset = GRID_LAYERS[layer]
    has_first, has_last = sides in ("tucker2", "no_last"), sides in ("tucker2", "no_first")
    gen = torch.Generator().manual_seed(rows)
    x = _randn((rows * n_in + offset,), dtype, device, gen)[offset:].view(rows, n_in)
    t = (
        x,
        _randn((r_in, n_in), dtype, device, gen) if has_first else None,
        _randn((r_out, r_in if has_first else n_in), dtype, device, gen),
        _randn((n_out, r_out), dtype, device, gen) if has_last else None,
        _randn((n_out if has_last else r_out,), dtype, device, gen) if rows != 9 else None,
    )
    _check_against_reference(_ops.tucker_linear, reference.tucker_linear, t, dtype, rows + 3)
    with torch.no_grad():
        assert torch.equal(_ops.tucker_linear(*t), _ops.tucker_linear(*t)), "repeated calls differ"


@pytest.mark.parametrize("device", DEVICES)
def test_linear_whole_gpu_kernel_gradcheck_and_opcheck(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUCKER_OPS_CUDA_LINEAR_GRID", "1")
    lin = _leaves(device, 4, (3, 2, 9), (4, 9), (5, 4), (7, 5), (7,))
    assert torch.autograd.gradcheck(_ops.tucker_linear, lin)
    if device == "cuda":  # on CPU tests/test_ops.py covers it
        opcheck(OPS.tucker_linear.default, tuple(lin))


# The whole-GPU conv kernel (conv_grid.cu): (N, C_in, H, W, R_in, R_out, C_out,
# kernel, stride, padding, dilation); the "offset" layout (NHWC, not 16-byte
# aligned) takes its element-wise loads, in the first stage and in the core's
# gather. It takes R_in (C_in without `first`) in
# multiples of the dtype's 16-byte run: "odd" (R_in 6, C_in 10) only in float64,
# so the other dtypes check that the switch falls back. "wide" has a long first
# stage over few pixels, which splits K over several warps of a block.
GRID_CONVS = {
    "resnet": (1, 32, 7, 7, 16, 16, 40, (3, 3), (1, 1), (1, 1), (1, 1)),
    "strided": (3, 24, 9, 11, 8, 24, 20, (3, 2), (2, 1), (1, 0), (1, 2)),
    "pointwise_core": (2, 16, 5, 6, 8, 8, 12, (1, 1), (1, 1), (0, 0), (1, 1)),
    "odd": (2, 10, 6, 5, 6, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    "wide": (1, 256, 3, 3, 16, 8, 24, (3, 3), (1, 1), (1, 1), (1, 1)),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "offset"])
@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last", "core_only"])
@pytest.mark.parametrize("layer", list(GRID_CONVS))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_conv_whole_gpu_kernel(
    device: str, dtype: torch.dtype, layer: str, sides: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the CPU the switch means nothing: the same checks run against the CPU kernels.
    _require(device, dtype)
    monkeypatch.setenv("TUCKER_OPS_CUDA_CONV_GRID", "1")
    n, c_in, h, w, r_in, r_out, c_out, kernel, stride, padding, dilation = GRID_CONVS[layer]
    has_first, has_last = sides in ("tucker2", "no_last"), sides in ("tucker2", "no_first")
    gen = torch.Generator().manual_seed(len(layer) + len(sides))
    core_in = r_in if has_first else c_in
    t = (
        _conv_input((n, c_in, h, w), layout, dtype, device, gen),
        _randn((r_in, c_in), dtype, device, gen) if has_first else None,
        _randn((r_out, core_in, *kernel), dtype, device, gen),
        _randn((c_out, r_out), dtype, device, gen) if has_last else None,
        _randn((c_out if has_last else r_out,), dtype, device, gen) if layer != "strided" else None,
    )

    def fused(*a):
        return _ops.tucker_conv2d(*a, stride, padding, dilation)

    def ref(*a):
        return reference.tucker_conv2d(*a, stride, padding, dilation)

    _check_against_reference(fused, ref, t, dtype, len(layer))
    with torch.no_grad():
        y = fused(*t)
        assert torch.equal(y, fused(*t)), "repeated calls differ"
        assert y.is_contiguous(memory_format=conv_output_format(t[0])), "output layout"


@pytest.mark.parametrize("device", DEVICES)
def test_conv_whole_gpu_kernel_gradcheck_and_opcheck(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUCKER_OPS_CUDA_CONV_GRID", "1")
    # R_in 4 and C_in 6: float64's 16-byte run is 2 elements, so the kernel takes both sides.
    for f in ((4, 6), None):
        conv = _leaves(device, 5, (2, 6, 5, 4), f, (3, 4 if f else 6, 2, 3), (5, 3), (5,))
        assert torch.autograd.gradcheck(lambda *t: _ops.tucker_conv2d(*t, (2, 1), (1, 1), (1, 2)), conv)
        if device == "cuda":  # on CPU tests/test_ops.py covers it
            opcheck(OPS.tucker_conv2d.default, (*conv, (2, 1), (1, 1), (1, 2)))


@CUDA_ONLY
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layer", list(GRID_CONVS))
def test_conv_whole_gpu_kernel_tf32(layer: str, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 stages past 8 rows on TF32 tensor cores, as nn.Conv2d runs with cuDNN's TF32
    # switch on (the core's gather needs R_in % 8 == 0; "odd" keeps CUDA cores there):
    # TF32 rounds operands to 10 mantissa bits, so 5e-3, not 1e-4.
    if "cuda" not in _WANTED:
        pytest.skip("TUCKER_OPS_TEST_DEVICES excludes cuda")
    monkeypatch.setenv("TUCKER_OPS_CUDA_CONV_GRID", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    n, c_in, h, w, r_in, r_out, c_out, kernel, stride, padding, dilation = GRID_CONVS[layer]
    gen = torch.Generator().manual_seed(len(layer))
    t = (
        _conv_input((n, c_in, h, w), layout, torch.float32, "cuda", gen),
        _randn((r_in, c_in), torch.float32, "cuda", gen),
        _randn((r_out, r_in, *kernel), torch.float32, "cuda", gen),
        _randn((c_out, r_out), torch.float32, "cuda", gen),
        _randn((c_out,), torch.float32, "cuda", gen),
    )
    with torch.no_grad():
        y = _ops.tucker_conv2d(*t, stride, padding, dilation)
    want = reference.tucker_conv2d(*(a.double() for a in t), stride, padding, dilation)
    err = _rel_err(y, want)
    assert err <= 5e-3, f"relative error {err:.2e} > 5e-3"


@CUDA_ONLY
@pytest.mark.parametrize("rows", [9, 40])
@pytest.mark.parametrize("layer", list(GRID_LAYERS))
def test_linear_whole_gpu_kernel_tf32(layer: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same for the linear, under cuBLAS's TF32 switch (nn.Linear's; off by default).
    if "cuda" not in _WANTED:
        pytest.skip("TUCKER_OPS_TEST_DEVICES excludes cuda")
    monkeypatch.setenv("TUCKER_OPS_CUDA_LINEAR_GRID", "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    n_in, r_in, r_out, n_out, offset = GRID_LAYERS[layer]
    gen = torch.Generator().manual_seed(rows)
    x = _randn((rows * n_in + offset,), torch.float32, "cuda", gen)[offset:].view(rows, n_in)
    t = (
        x,
        _randn((r_in, n_in), torch.float32, "cuda", gen),
        _randn((r_out, r_in), torch.float32, "cuda", gen),
        _randn((n_out, r_out), torch.float32, "cuda", gen),
        _randn((n_out,), torch.float32, "cuda", gen),
    )
    with torch.no_grad():
        y = _ops.tucker_linear(*t)
    err = _rel_err(y, reference.tucker_linear(*(a.double() for a in t)))
    assert err <= 5e-3, f"relative error {err:.2e} > 5e-3"


def _cuda_kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@CUDA_ONLY
def test_path_choice_follows_settings_changed_between_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # The op remembers its path choice per shape (ShapeMemo in common.cuh); what
    # the choice reads besides the shape must be in that memory's key. One float32
    # shape, called again and again while the tensor-core switch and cuDNN's TF32
    # flag change: the tensor-core kernel runs exactly when both allow it.
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1")
    tensors, conv = _layer_operands(TC_SHAPES["many_tiles"], "contiguous", torch.float32, "cuda", 23)

    def runs_tensor_cores() -> bool:
        names = _cuda_kernel_names(lambda: _ops.tucker_conv2d(*tensors, *conv, backend="fused"))
        return any("fused_conv_tc_kernel" in n for n in names)

    with torch.no_grad():
        for tc, tf32 in (("1", True), ("1", False), ("0", True), ("1", True), ("0", False), ("1", True)):
            monkeypatch.setenv("TUCKER_OPS_CUDA_TC", tc)
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
            assert runs_tensor_cores() == (tc == "1" and tf32), (tc, tf32)


@CUDA_ONLY
def test_tensor_core_kernel_variant_follows_its_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    # TUCKER_OPS_CUDA_TC_RESIDENT must really select the variant (the tests above
    # would pass on a switch that was ignored): the resident one where it fits,
    # unset or "1", the streaming one on "0" and where it does not fit (ranks of
    # 128: no room for the core).
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1")
    monkeypatch.setenv("TUCKER_OPS_CUDA_TC", "1")

    def resident_flags(name):
        # The kernel's second template argument, from the profiler's kernel names:
        # demangled ("fused_conv_tc_kernel<c10::BFloat16, true>") or mangled ("...ELb1E").
        tensors, conv = _layer_operands(TC_SHAPES[name], "contiguous", torch.bfloat16, "cuda", 19)
        names = _cuda_kernel_names(lambda: _ops.tucker_conv2d(*tensors, *conv, backend="fused"))
        flags = set()
        for n in names:
            if m := re.search(r"fused_conv_tc_kernel<[^<>]*,\s*(true|false)>", n):
                flags.add(m.group(1))
            elif m := re.search(r"fused_conv_tc_kernelI\w*?ELb([01])E", n):
                flags.add("true" if m.group(1) == "1" else "false")
        return flags

    with torch.no_grad():
        monkeypatch.delenv("TUCKER_OPS_CUDA_TC_RESIDENT", raising=False)
        assert resident_flags("many_tiles") == {"true"}, "unset"
        for value, want in (("1", {"true"}), ("0", {"false"})):
            monkeypatch.setenv("TUCKER_OPS_CUDA_TC_RESIDENT", value)
            assert resident_flags("many_tiles") == want, value
        monkeypatch.setenv("TUCKER_OPS_CUDA_TC_RESIDENT", "1")
        assert resident_flags("ranks_128") == {"false"}


@CUDA_ONLY
@pytest.mark.parametrize("switch", ["TUCKER_OPS_CUDA_TC_TILED_PACK", "TUCKER_OPS_CUDA_TC_NARROW_RUNS"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("name", TC_SHAPES)
def test_trial_switches_give_the_same_bits(
    name: str, dtype: torch.dtype, switch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tensor-core kernel's trial variants (conv_fused_tc.cu) compute the same
    # values and store them differently: TILED_PACK packs NCHW input through
    # shared-memory tiles (the same workspace, zeros included), NARROW_RUNS stores
    # 4, 2 or 1 output pixels per lane where W_out is not a multiple of 8 (the
    # same conversions). So the output is the same bits with the switch on or off.
    if "cuda" not in _WANTED:
        pytest.skip("TUCKER_OPS_TEST_DEVICES excludes cuda")
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1")
    monkeypatch.setenv("TUCKER_OPS_CUDA_TC", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dtype == torch.float32)
    tensors, conv = _layer_operands(TC_SHAPES[name], "contiguous", dtype, "cuda", 29)
    outs = {}
    for variant in ("streaming", "resident"):
        monkeypatch.setenv("TUCKER_OPS_CUDA_TC_RESIDENT", "1" if variant == "resident" else "0")
        for on in ("0", "1"):
            monkeypatch.setenv(switch, on)
            outs[variant, on] = _ops.tucker_conv2d(*tensors, *conv, backend="fused")
        assert torch.equal(outs[variant, "0"], outs[variant, "1"]), variant


@CUDA_ONLY
def test_tiled_pack_follows_its_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test above would pass on a switch that was ignored: the tiled packing
    # kernel runs for NCHW input with the switch on, and only then.
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1")
    monkeypatch.setenv("TUCKER_OPS_CUDA_TC", "1")

    def runs_tiled_pack(layout: str) -> bool:
        tensors, conv = _layer_operands(TC_SHAPES["many_tiles"], layout, torch.bfloat16, "cuda", 31)
        names = _cuda_kernel_names(lambda: _ops.tucker_conv2d(*tensors, *conv, backend="fused"))
        assert any("fused_conv_tc_kernel" in n for n in names), names
        return any("pack_tc_operands_tiled_kernel" in n for n in names)

    with torch.no_grad():
        monkeypatch.delenv("TUCKER_OPS_CUDA_TC_TILED_PACK", raising=False)
        assert not runs_tiled_pack("contiguous"), "unset"
        for value, want in (("1", True), ("0", False)):
            monkeypatch.setenv("TUCKER_OPS_CUDA_TC_TILED_PACK", value)
            assert runs_tiled_pack("contiguous") == want, value
        monkeypatch.setenv("TUCKER_OPS_CUDA_TC_TILED_PACK", "1")
        assert not runs_tiled_pack("channels_last")


@CUDA_ONLY
def test_whole_gpu_kernels_run_where_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    # The switches must really select the kernels: the tests above would also pass
    # on a path that silently ignored them.
    gen = torch.Generator().manual_seed(31)
    x = _randn((2, 16, 6, 6), torch.float32, "cuda", gen)
    conv = [_randn(s, torch.float32, "cuda", gen) for s in ((8, 16), (12, 8, 3, 3), (20, 12), (20,))]
    odd = [_randn(s, torch.float32, "cuda", gen) for s in ((6, 16), (12, 6, 3, 3), (20, 12), (20,))]
    xl = _randn((3, 40), torch.float32, "cuda", gen)
    lin = [_randn(s, torch.float32, "cuda", gen) for s in ((12, 40), (10, 12), (30, 10), (30,))]
    monkeypatch.setenv("TUCKER_OPS_CUDA_CONV_GRID", "1")
    monkeypatch.setenv("TUCKER_OPS_CUDA_LINEAR_GRID", "1")
    with torch.no_grad():
        assert any("grid_conv_kernel" in k for k in _cuda_kernel_names(lambda: _ops.tucker_conv2d(x, *conv, 1, 1, 1)))
        # R_in 6 is not a multiple of float32's 4-element run: another path runs.
        assert not any("grid_conv_kernel" in k for k in _cuda_kernel_names(lambda: _ops.tucker_conv2d(x, *odd, 1, 1, 1)))
        assert any("grid_linear_kernel" in k for k in _cuda_kernel_names(lambda: _ops.tucker_linear(xl, *lin)))
        monkeypatch.setenv("TUCKER_OPS_CUDA_CONV_GRID", "0")
        assert not any("grid_conv_kernel" in k for k in _cuda_kernel_names(lambda: _ops.tucker_conv2d(x, *conv, 1, 1, 1)))


@CUDA_ONLY
def test_float32_chain_runs_its_1x1_stages_as_nn_conv2d_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under cuDNN's TF32 switch (torch's default for convolutions) the op's unfused
    # chain runs its 1x1 stages on cuDNN, as the Sequential chain of nn.Conv2d does,
    # so the two agree to float32 rounding. Until stop 24 stages below 2^27
    # multiply-adds ran on cuBLAS in full float32: off from the Sequential chain
    # by its TF32 rounding (checked below to exceed 1e-4), and slower on the GPU
    # (RESULTS_GPU.md).
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "0")
    gen = torch.Generator().manual_seed(41)
    x = _randn((8, 256, 14, 14), torch.float32, "cuda", gen)
    f, g, l, b = (_randn(s, torch.float32, "cuda", gen) for s in ((64, 256), (64, 64, 3, 3), (256, 64), (256,)))
    torch.backends.cudnn.allow_tf32 = True  # the autouse _no_tf32 fixture restores the setting
    conv = torch.nn.functional.conv2d
    with torch.no_grad():
        got = _ops.tucker_conv2d(x, f, g, l, b, 1, 1, 1)
        sequential = conv(conv(conv(x, f[:, :, None, None]), g, None, 1, 1), l[:, :, None, None], b)
    exact = reference.tucker_conv2d(*(t.double() for t in (x, f, g, l, b)), (1, 1), (1, 1), (1, 1))
    assert _rel_err(got, sequential) < 5e-5
    # TF32 did run in the Sequential chain, so the check above tells the two ways apart.
    assert _rel_err(sequential, exact) > 1e-4


@CUDA_ONLY
def test_whole_gpu_kernels_chosen_where_host_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unset switches: the op picks the whole-GPU kernels for eager calls of layers
    # small enough that the chain's three calls are host-bound (ResNet-50's last
    # 3x3 stage and linear_4096 at batch 1: RESULTS_GPU.md), and keeps the other
    # paths where they are faster, where a path is forced, and in unmeasured dtypes.
    monkeypatch.delenv("TUCKER_OPS_CUDA_CONV_GRID", raising=False)
    monkeypatch.delenv("TUCKER_OPS_CUDA_LINEAR_GRID", raising=False)
    monkeypatch.delenv("TUCKER_OPS_CUDA_FUSED", raising=False)
    gen = torch.Generator().manual_seed(37)

    def conv_layer(dtype, batch):
        shapes = ((batch, 512, 7, 7), (128, 512), (128, 128, 3, 3), (512, 128), (512,))
        return [_randn(s, dtype, "cuda", gen) for s in shapes]

    def runs_grid(fn, name):
        return any(name in k for k in _cuda_kernel_names(fn))

    with torch.no_grad():
        small = conv_layer(torch.bfloat16, 1)
        assert runs_grid(lambda: _ops.tucker_conv2d(*small, 1, 1, 1), "grid_conv_kernel")
        big = conv_layer(torch.bfloat16, 128)  # GPU-bound: the chain's kernels are faster
        assert not runs_grid(lambda: _ops.tucker_conv2d(*big, 1, 1, 1), "grid_conv_kernel")
        double = conv_layer(torch.float64, 1)  # not measured: not chosen
        assert not runs_grid(lambda: _ops.tucker_conv2d(*double, 1, 1, 1), "grid_conv_kernel")
        lin = [_randn(s, torch.bfloat16, "cuda", gen) for s in ((1, 4096), (512, 4096), (512, 512), (4096, 512))]
        lin.append(None)
        assert runs_grid(lambda: _ops.tucker_linear(*lin), "grid_linear_kernel")
        x, core, last = (_randn(s, torch.bfloat16, "cuda", gen) for s in ((1, 120), (30, 120), (84, 30)))
        # Small factors: linear_fused.cu's kernel runs.
        assert not runs_grid(lambda: _ops.tucker_linear(x, None, core, last, None), "grid_linear_kernel")
        for env in ({"TUCKER_OPS_CUDA_FUSED": "0"}, {"TUCKER_OPS_CUDA_FUSED": "1"},
                    {"TUCKER_OPS_CUDA_CONV_GRID": "0", "TUCKER_OPS_CUDA_LINEAR_GRID": "0"}):
            with monkeypatch.context() as m:
                for k, v in env.items():
                    m.setenv(k, v)
                assert not runs_grid(lambda: _ops.tucker_conv2d(*small, 1, 1, 1), "grid_conv_kernel"), env
                assert not runs_grid(lambda: _ops.tucker_linear(*lin), "grid_linear_kernel"), env


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_transforms(device: str) -> None:
    # tests/test_functorch.py covers the transforms on the CPU; here the same route runs
    # the device's kernels: per-sample gradients and a Hessian against the reference.
    gen = torch.Generator().manual_seed(11)
    x = _randn((3, 3, 7, 6), torch.float64, device, gen)
    f, c, l, b = (_randn(s, torch.float64, device, gen) for s in ((2, 3), (3, 2, 3, 2), (4, 3), (4,)))
    xl = _randn((3, 5), torch.float64, device, gen)
    lf, lc, ll = (_randn(s, torch.float64, device, gen) for s in ((2, 5), (3, 2), (4, 3)))

    def loss(backend):
        def of(core, lcore, xi, xli):
            y = _ops.tucker_conv2d(xi[None], f, core, l, b, (2, 1), (1, 0), (1, 2), backend=backend)
            return y.square().sum() + _ops.tucker_linear(xli[None], lf, lcore, ll, None, backend=backend).square().sum()

        return of

    for backend_result in (
        lambda be: torch.func.vmap(torch.func.grad(loss(be), argnums=(0, 1)), in_dims=(None, None, 0, 0))(c, lc, x, xl),
        lambda be: torch.func.hessian(loss(be), argnums=1)(c, lc, x[0], xl[0]),
    ):
        got, want = backend_result("fused"), backend_result("reference")
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


# -- gradcheck and opcheck (float64) --------------------------------------------------


def _leaves(device: str, seed: int, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [_randn(s, torch.float64, device, gen).requires_grad_() if s is not None else None for s in shapes]


@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device: str, sides: str) -> None:
    f = None if sides == "no_first" else (2, 3)
    last = None if sides == "no_last" else (4, 3)
    conv = _leaves(device, 1, (2, 3, 5, 4), f, (3, 3 if f is None else 2, 2, 3), last, (3 if last is None else 4,))
    assert torch.autograd.gradcheck(lambda *t: _ops.tucker_conv2d(*t, (2, 1), (1, 1), (1, 2)), conv)
    f = None if sides == "no_first" else (2, 5)
    lin = _leaves(device, 2, (2, 3, 5), f, (3, 5 if f is None else 2), last, (3 if last is None else 4,))
    assert torch.autograd.gradcheck(_ops.tucker_linear, lin)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    if device == "cpu":
        pytest.skip("opcheck on CPU: tests/test_ops.py covers it")
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return _randn(shape, dtype, device, gen).requires_grad_()

    conv = (t(2, 5, 7, 6), t(3, 5), t(4, 3, 3, 2), t(6, 4), t(6), [2, 1], [1, 0], [1, 2])
    opcheck(OPS.tucker_conv2d.default, conv)
    lin = (t(2, 3, 5), t(3, 5), t(4, 3), t(6, 4), t(6))
    opcheck(OPS.tucker_linear.default, lin)
    with torch.no_grad():
        gy = OPS.tucker_conv2d(*conv)
        gl = OPS.tucker_linear(*lin)
    for mask in ([True] * 5, [True, False, True, False, False], [False] * 5):
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in conv]
        opcheck(OPS.tucker_conv2d_backward.default, (torch.randn_like(gy), *plain[:4], *plain[5:], mask))
        plain = [a.detach() for a in lin]
        opcheck(OPS.tucker_linear_backward.default, (torch.randn_like(gl), *plain[:4], mask))


# -- determinism, validation ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_calls_are_bitwise_identical(device: str) -> None:
    x = _conv_input((4, 16, 30, 30), "contiguous", torch.float32, device, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    params = [_randn(s, torch.float32, device, gen).requires_grad_() for s in ((8, 16), (8, 8, 3, 3), (16, 8), (16,))]

    def run():
        y = _ops.tucker_conv2d(x, *params, 1, 1, 1)
        return [y, *torch.autograd.grad(y.square().sum(), params)]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def _error(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value).split("\n")[0]


BAD_CONV = {
    "first_shape": lambda d: (torch.randn(1, 4, 5, 5, device=d), torch.randn(2, 3, device=d),
                              torch.randn(2, 2, 3, 3, device=d), None, None),
    "core_dims": lambda d: (torch.randn(1, 4, 5, 5, device=d), None, torch.randn(2, 4, 3, device=d), None, None),
    "bias_shape": lambda d: (torch.randn(1, 4, 5, 5, device=d), None, torch.randn(2, 4, 3, 3, device=d),
                             torch.randn(3, 2, device=d), torch.randn(2, device=d)),
    "kernel_too_big": lambda d: (torch.randn(1, 4, 2, 2, device=d), None, torch.randn(2, 4, 3, 3, device=d), None,
                                 None),
}


@CUDA_ONLY
@pytest.mark.parametrize("case", BAD_CONV)
def test_errors_are_identical_on_cpu_and_cuda(case: str) -> None:
    errors = [
        _error(lambda d=d: OPS.tucker_conv2d(*BAD_CONV[case](d), [1, 1], [0, 0], [1, 1])) for d in ("cpu", "cuda")
    ]
    assert errors[0] == errors[1]


@CUDA_ONLY
def test_cuda_errors_name_the_cuda_dtypes_and_devices() -> None:
    x = torch.randn(1, 4, 5, 5, device="cuda")
    with pytest.raises(TypeError, match=r"torch\.float32, torch\.float64, torch\.float16, torch\.bfloat16"):
        OPS.tucker_conv2d(x.int(), None, torch.randn(2, 4, 3, 3, device="cuda").int(), None, None, [1, 1], [0, 0],
                          [1, 1])
    with pytest.raises(RuntimeError, match="same device"):
        OPS.tucker_conv2d(x, torch.randn(2, 4), torch.randn(2, 2, 3, 3, device="cuda"), None, None, [1, 1], [0, 0],
                          [1, 1])


@CUDA_ONLY
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "gemm"])
def test_conv2d_beyond_32_bit_indexing(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 * 16384 * 16400 > 2^31 elements: the last rows are only reachable with 64-bit offsets.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with at least 40 GiB of memory")
    monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1" if fused else "0")  # "0": beyond cuDNN's 32 bits, the GEMMs
    x = torch.empty(1, 8, 16384, 16400, device="cuda", dtype=torch.bfloat16).normal_()
    assert x.numel() > 2**31
    first = torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)
    core = torch.randn(3, 2, 1, 1, device="cuda", dtype=torch.bfloat16)
    last = torch.randn(4, 3, device="cuda", dtype=torch.bfloat16)
    y = OPS.tucker_conv2d(x, first, core, last, None, [1, 1], [0, 0], [1, 1])
    tail = x[:, :, -4:, :]  # a 1x1 chain: output rows are input rows
    want = reference.tucker_conv2d(tail.double(), first.double(), core.double(), last.double(), None)
    assert _rel_err(y[:, :, -4:, :], want) <= TOL[torch.bfloat16]
    del x, y


# -- CUDA graphs and torch.compile ----------------------------------------------------


def _graph_operands(device: str):
    gen = torch.Generator().manual_seed(21)
    conv = [_randn(s, torch.float32, device, gen).requires_grad_() for s in ((8, 16), (8, 8, 3, 3), (16, 8), (16,))]
    lin = [_randn(s, torch.float32, device, gen).requires_grad_() for s in ((12, 40), (10, 12), (30, 10), (30,))]
    return conv, lin


def _graph_step(x, xl, conv, lin):
    y = _ops.tucker_conv2d(x, *conv, 1, 1, 1)
    z = _ops.tucker_linear(xl, *lin)
    loss = y.square().sum() + z.square().sum()
    return [y, z, *torch.autograd.grad(loss, [*conv, *lin])]


@CUDA_ONLY
@pytest.mark.parametrize("path", ["auto", "fused", "chain", "grid"])
def test_cuda_graph_capture_forward_and_backward(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # "auto" lets the op choose, which it does differently while a graph is captured.
    # "grid": the whole-GPU kernels of both ops, cooperative launches, captured.
    if path == "grid":
        monkeypatch.setenv("TUCKER_OPS_CUDA_LINEAR_GRID", "1")
        monkeypatch.setenv("TUCKER_OPS_CUDA_CONV_GRID", "1")
        monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1")  # one path, eager and captured
    elif path != "auto":
        monkeypatch.setenv("TUCKER_OPS_CUDA_FUSED", "1" if path == "fused" else "0")
    conv, lin = _graph_operands("cuda")
    gen = torch.Generator().manual_seed(22)
    x = _randn((4, 16, 12, 12), torch.float32, "cuda", gen)
    xl = _randn((5, 40), torch.float32, "cuda", gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        for _ in range(2):
            _graph_step(x, xl, conv, lin)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _graph_step(x, xl, conv, lin)
    x.copy_(_randn((4, 16, 12, 12), torch.float32, "cuda", gen))
    xl.copy_(_randn((5, 40), torch.float32, "cuda", gen))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, _graph_step(x, xl, conv, lin)):
        if path == "auto":
            # Capture may pick another forward path than the eager call (only GPU
            # time counts there): the same float32 math, rounded in another order.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        else:
            assert torch.equal(got, want)


@CUDA_ONLY
def test_torch_compile_reduce_overhead() -> None:
    conv, lin = _graph_operands("cuda")

    def step(x, xl):
        return _ops.tucker_conv2d(x, *conv, 1, 1, 1).square().sum() + _ops.tucker_linear(xl, *lin).square().sum()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator().manual_seed(23)
    for _ in range(3):  # the third call replays the recorded CUDA graph
        x = _randn((4, 16, 12, 12), torch.float32, "cuda", gen)
        xl = _randn((5, 40), torch.float32, "cuda", gen)
        loss = compiled(x, xl)
        grads = torch.autograd.grad(loss, [*conv, *lin])
        loss_ref = step(x, xl)
        grads_ref = torch.autograd.grad(loss_ref, [*conv, *lin])
        assert _rel_err(loss.detach(), loss_ref.detach()) <= 1e-5
        for g, r in zip(grads, grads_ref):
            assert _rel_err(g, r) <= 1e-5
