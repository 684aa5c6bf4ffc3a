"""``TuckerConv2d`` and ``TuckerLinear``: Tucker-decomposed layers run by one fused op.

Each module holds the factors of one decomposed layer in the op layout (see
ARCHITECTURE.md): ``first`` is the input-side projection, ``core`` the (spatial)
core and ``last`` the output-side expansion, each stored the way the weight of the
equivalent chain layer is stored, so :meth:`from_sequential` and
:meth:`to_sequential` copy weights without transposes. ``first`` or ``last`` is
``None`` for Tucker-1 (that side not decomposed).

Ranks are always given in chain order, ``(r_in, r_out)``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import _ops

__all__ = ["TuckerConv2d", "TuckerLinear"]

Ranks = tuple[int | None, int | None]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_DECOMPOSE_DTYPES = (torch.float32, torch.float64)


def _check_ranks(ranks: int | Sequence[int | None], name: str = "ranks") -> Ranks:
    """Normalise ``ranks`` to ``(r_in, r_out)``; an int ``r`` means ``(r, r)``."""
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = (ranks, ranks)
    if not isinstance(ranks, Sequence) or isinstance(ranks, str) or len(ranks) != 2:
        raise ValueError(f"{name} must be an int or a pair (r_in, r_out) of ints or None, got {ranks!r}")
    out = []
    for side, r in zip(("r_in", "r_out"), ranks):
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"{name}: {side} must be None or an int >= 1, got {r!r}")
        out.append(r)
    return out[0], out[1]


def _uniform_var(tensor: Tensor, fan_in: int) -> None:
    """Fill ``tensor`` from U(-a, a) with variance ``1 / fan_in``."""
    bound = math.sqrt(3.0 / fan_in)
    nn.init.uniform_(tensor, -bound, bound)


def _init_factors(first: Tensor | None, core: Tensor, last: Tensor | None, bias: Tensor | None, dense_fan_in: int) -> None:
    """Initialise so the composed weight has ``nn.Conv2d`` / ``nn.Linear`` default scale.

    ``core`` gets the default init of a layer with its own fan-in (variance
    ``1/(3·fan_in_core)``); ``first`` and ``last`` get variance ``1/fan_in`` of their
    own input size. Each entry of the composed weight is then a sum of products of
    independent zero-mean terms with variance ``1/(3·dense_fan_in)``, the default
    of the dense layer, whichever sides are decomposed. The bias follows the dense
    layer's rule.
    """
    if first is not None:
        _uniform_var(first, first.shape[1])
    nn.init.kaiming_uniform_(core, a=math.sqrt(5))
    if last is not None:
        _uniform_var(last, last.shape[1])
    if bias is not None:
        bound = 1.0 / math.sqrt(dense_fan_in) if dense_fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


def _same_dtype_device(stages: Sequence[nn.Module], what: str) -> None:
    ref = stages[0].weight
    for i, stage in enumerate(stages[1:], start=1):
        w = stage.weight
        if w.dtype != ref.dtype or w.device != ref.device:
            raise ValueError(
                f"{what}: every layer must share dtype and device; layer 0 has {ref.dtype} on {ref.device}, "
                f"layer {i} has {w.dtype} on {w.device}"
            )


def _as_stages(seq: nn.Sequential | Iterable[nn.Module], what: str) -> list[nn.Module]:
    if isinstance(seq, nn.Module) and not isinstance(seq, nn.Sequential):
        raise TypeError(f"{what}: seq must be an nn.Sequential or a list of modules, got {type(seq).__name__}")
    stages = list(seq)
    if len(stages) not in (2, 3):
        raise ValueError(f"{what}: seq must hold 2 or 3 layers (a Tucker-1 or Tucker-2 chain), got {len(stages)}")
    return stages


class _TuckerBase(nn.Module, metaclass=abc.ABCMeta):
    """What both modules share: parameter bookkeeping, ranks, ratio, backend."""

    first: Tensor | None
    core: Tensor
    last: Tensor | None
    bias: Tensor | None
    backend: str | None
    reconstruction_error: float | None

    @property
    def ranks(self) -> Ranks:
        """``(r_in, r_out)`` read from the factor shapes; ``None`` where a side is not decomposed."""
        r_in = self.first.shape[0] if self.first is not None else None
        r_out = self.last.shape[1] if self.last is not None else None
        return r_in, r_out

    def num_params(self) -> int:
        """Parameters held by this module (factors and bias)."""
        return sum(p.numel() for p in (self.first, self.core, self.last, self.bias) if p is not None)

    @abc.abstractmethod
    def dense_num_params(self) -> int:
        """Parameters of the dense layer this module replaces (weight and bias)."""

    @property
    def compression_ratio(self) -> float:
        """Dense parameters / Tucker parameters (> 1 means smaller)."""
        return self.dense_num_params() / self.num_params()

    def _register_factors(self, first: Tensor | None, core: Tensor, last: Tensor | None, bias: Tensor | None) -> None:
        """(Re-)register the four parameters; an absent one is registered as None."""
        for name, value in (("first", first), ("core", core), ("last", last), ("bias", bias)):
            self.register_parameter(name, None if value is None else nn.Parameter(value))

    def _load(self, first: Tensor | None, core: Tensor, last: Tensor | None, bias: Tensor | None) -> None:
        """Replace the parameters with contiguous copies of the given tensors (no grad history)."""

        def own(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone(memory_format=torch.contiguous_format)

        self._register_factors(own(first), own(core), own(last), own(bias))

    def _ratio_repr(self) -> str:
        text = f"ranks={self.ranks}, compression={self.compression_ratio:.2f}x"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text


class TuckerConv2d(_TuckerBase):
    """Conv2d whose weight is a Tucker-2 / Tucker-1 decomposition, run as one fused op.

    Computes the chain ``1×1 conv (R_in ← C_in) → kh×kw conv (R_out ← R_in, with
    stride/padding/dilation) → 1×1 conv (C_out ← R_out) + bias``; a side whose rank
    is ``None`` is left out (Tucker-1).

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv2d``.
        ranks: ``(r_in, r_out)``; ``None`` on a side means that side is not decomposed.
            An int ``r`` means ``(r, r)``. A rank may exceed its mode size (the thesis
            does this; it only costs parameters).
        stride, dilation: int or pair, as ``nn.Conv2d``.
        padding: int, pair, ``'same'`` (stride must be 1; for even kernels the extra
            row/column goes bottom/right, like ``nn.Conv2d``) or ``'valid'``.
        groups: must be 1; grouped convolutions are not supported.
        bias: whether to add a learnable bias of shape ``(C_out,)``.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
            Non-zero modes (and asymmetric ``'same'``) pad the input explicitly and
            run the op without padding; because the 1×1 projection acts per pixel,
            padding before it equals padding after it.

    Parameters:
        first: ``(R_in, C_in)`` or None. core: ``(R_out, R_in | C_in, kh, kw)``.
        last: ``(C_out, R_out)`` or None. bias: ``(C_out,)`` or None.

    Attributes:
        backend: ``None`` (follow ``tucker_ops.use_reference()``), ``"fused"`` or
            ``"reference"``; passed to the op on every call.
        reconstruction_error: relative error of the decomposition when built by
            :meth:`from_conv`, else None.

    Shapes: input ``(N, C_in, H, W)`` or ``(C_in, H, W)`` -> output ``(N, C_out, H_out, W_out)``
    (or ``(C_out, H_out, W_out)``), with ``H_out``, ``W_out`` as ``nn.Conv2d``; channels_last
    input gives channels_last output (and input gradient), as ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: int | tuple[int | None, int | None],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"TuckerConv2d: groups must be 1 (grouped convolutions are not supported), got groups={groups}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TuckerConv2d: {name} must be an int >= 1, got {value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair_of_positive(kernel_size, "kernel_size")
        self.stride = _pair_of_positive(stride, "stride")
        self.dilation = _pair_of_positive(dilation, "dilation")
        self.groups = 1
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"TuckerConv2d: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.padding = _normalise_padding(padding, self.stride)
        self._explicit_pad, self._op_padding = self._resolve_padding()
        if self._explicit_pad is None:
            problem = padding_extent_error(self.kernel_size, self._op_padding, self.dilation)
            if problem is not None:
                raise ValueError(f"TuckerConv2d: {problem}")
        r_in, r_out = _check_ranks(ranks)
        self.backend: str | None = None
        self.reconstruction_error: float | None = None

        kw = {"device": device, "dtype": dtype}
        kh, kw_ = self.kernel_size
        core_in = r_in if r_in is not None else in_channels
        core_out = r_out if r_out is not None else out_channels
        self._register_factors(
            None if r_in is None else torch.empty(r_in, in_channels, **kw),
            torch.empty(core_out, core_in, kh, kw_, **kw),
            None if r_out is None else torch.empty(out_channels, r_out, **kw),
            torch.empty(out_channels, **kw) if bias else None,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose composed weight matches ``nn.Conv2d``'s default scale."""
        kh, kw = self.kernel_size
        with torch.no_grad():
            _init_factors(self.first, self.core, self.last, self.bias, self.in_channels * kh * kw)

    def _resolve_padding(self) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
        """Split the padding into an explicit ``F.pad`` (left, right, top, bottom) and the op's padding."""
        if self.padding == "same":
            pads = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
        else:
            (top, bottom), (left, right) = [(p, p) for p in self.padding]
        if self.padding_mode == "zeros" and top == bottom and left == right:
            return None, (top, left)
        return (left, right, top, bottom), (0, 0)

    def forward(self, input: Tensor) -> Tensor:
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if self._explicit_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._explicit_pad, mode=mode)
        out = self._run_op(x)
        return out.squeeze(0) if unbatched else out

    def _run_op(self, x: Tensor) -> Tensor:
        # The op call on the padded batch; subclasses with an epilogue override it.
        return _ops.tucker_conv2d(
            x, self.first, self.core, self.last, self.bias,
            self.stride, self._op_padding, self.dilation, backend=self.backend,
        )  # fmt: skip

    # -- cost model ---------------------------------------------------------------

    def dense_num_params(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw + (self.out_channels if self.bias is not None else 0)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output ``(H_out, W_out)`` for an input of ``height × width`` pixels."""
        h, w = self._padded_size(height, width)
        kh, kw = self.kernel_size
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        if self._explicit_pad is not None:
            left, right, top, bottom = self._explicit_pad
            return height + top + bottom, width + left + right
        ph, pw = self._op_padding
        return height + 2 * ph, width + 2 * pw

    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one forward on an input of ``input_shape``, as the chain runs it.

        The input projection runs at the input resolution (the padded one where the
        padding is explicit), the core and the output expansion at the output one.
        """
        n, (h, w) = _batch_and_hw(input_shape)
        ho, wo = self.output_size(h, w)
        kh, kw = self.kernel_size
        r_in, r_out = self.ranks
        total = 0
        if r_in is not None:
            if self._explicit_pad is not None:
                h, w = self._padded_size(h, w)
            total += h * w * self.in_channels * r_in
        total += ho * wo * self.core.shape[0] * self.core.shape[1] * kh * kw
        if r_out is not None:
            total += ho * wo * r_out * self.out_channels
        return n * total

    # -- conversions --------------------------------------------------------------

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: Any = None,
        method: str = "vbmf",
        *,
        decompose_options: dict[str, Any] | None = None,
        **rank_options: Any,
    ) -> TuckerConv2d:
        """Decompose ``conv`` (Tucker-2 or Tucker-1) into a ``TuckerConv2d``.

        Args:
            conv: the dense layer; must have ``groups == 1``.
            ranks: a RankSpec for ``tucker_ops.ranks.select_ranks``: ``(r_in, r_out)``
                or an int (explicit), a float in (0, 1] (fraction of parameters kept),
                or None (choose with ``method``).
            method: rank selection method when ``ranks`` is None (``"vbmf"``, ``"energy"``).
            decompose_options: passed to ``decompose_conv2d`` (``n_iter_max``, ``tol``,
                ``random_state``).
            **rank_options: passed to ``select_ranks`` (``energy``, ``weakening``,
                ``min_rank``, ``rank_multiple``).

        Stride, padding, dilation, padding_mode, bias, dtype, device, training mode and
        ``requires_grad`` are copied. ``reconstruction_error`` records the relative
        error of the weight approximation. Half-precision weights are decomposed in
        float32 and the factors cast back.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"TuckerConv2d.from_conv: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"TuckerConv2d.from_conv: groups must be 1 (grouped convolutions are not supported), got groups={conv.groups}")
        problem = conv_padding_error(conv)
        if problem is not None:  # say so before spending time on the decomposition
            raise ValueError(f"TuckerConv2d.from_conv: {problem}")
        from . import decompose, ranks as rank_selection

        weight = conv.weight.detach()
        work = weight if weight.dtype in _DECOMPOSE_DTYPES else weight.float()
        chosen = rank_selection.select_ranks(work, ranks, method=method, **rank_options)
        _require_decomposition(chosen, weight, "TuckerConv2d.from_conv")
        factors = decompose.decompose_conv2d(work, chosen, **(decompose_options or {}))
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, chosen,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
        )  # fmt: skip
        cast = (lambda t: None if t is None else t.to(weight.dtype))
        bias = None if conv.bias is None else conv.bias.detach()
        module._load(cast(factors.first), cast(factors.core), cast(factors.last), bias)
        module.reconstruction_error = float(factors.relative_error)
        module.requires_grad_(conv.weight.requires_grad)
        module.train(conv.training)
        return module

    @classmethod
    def from_sequential(cls, seq: nn.Sequential | Iterable[nn.Module]) -> TuckerConv2d:
        """Fuse a decomposed chain of ``nn.Conv2d`` layers into one ``TuckerConv2d``.

        Recognised chains (the 1×1 stages need stride 1, padding 0, dilation 1):
            - ``[1×1, k×k, 1×1]``: Tucker-2 (ranks ``(R_in, R_out)``);
            - ``[k×k, 1×1]``: Tucker-1, output side (ranks ``(None, R_out)``), as the
              thesis's conv1 ``Conv2d(1,2,5,padding=2,bias=False), Conv2d(2,16,1)``;
            - ``[1×1, k×k]``: Tucker-1, input side (ranks ``(R_in, None)``).
        A ``[1×1, 1×1]`` chain is read as output side. The middle layers normally
        have no bias; a bias there is folded into the output bias when that is exact:
        always for the core's bias, and for the input projection's bias only when the
        core adds no zero padding (a zero pad would not carry that bias).

        Raises:
            ValueError naming the layer and what is wrong, when ``seq`` is not such a chain.
        """
        what = "TuckerConv2d.from_sequential"
        stages = _as_stages(seq, what)
        for i, stage in enumerate(stages):
            if not isinstance(stage, nn.Conv2d):
                raise ValueError(f"{what}: layer {i} must be an nn.Conv2d, got {type(stage).__name__}")
            if stage.groups != 1:
                raise ValueError(f"{what}: layer {i} has groups={stage.groups}; grouped convolutions are not supported")
        _same_dtype_device(stages, what)
        if len(stages) == 3:
            first, core, last = stages
            _check_pointwise(first, 0, what)
            _check_pointwise(last, 2, what)
        else:
            problems = []
            try:
                _check_pointwise(stages[1], 1, what)
                first, core, last = None, stages[0], stages[1]
            except ValueError as out_side:
                try:
                    _check_pointwise(stages[0], 0, what)
                    first, core, last = stages[0], stages[1], None
                except ValueError as in_side:
                    problems = [str(out_side), str(in_side)]
            if problems:
                raise ValueError(
                    f"{what}: a 2-layer chain must be [k×k, 1×1] (Tucker-1, output side) or [1×1, k×k] "
                    f"(Tucker-1, input side); as the first: {problems[0]}; as the second: {problems[1]}"
                )
        chain = [s for s in (first, core, last) if s is not None]
        for i in range(len(chain) - 1):
            if chain[i].out_channels != chain[i + 1].in_channels:
                raise ValueError(
                    f"{what}: layer {i} gives {chain[i].out_channels} channels but layer {i + 1} expects "
                    f"in_channels={chain[i + 1].in_channels}"
                )
        bias = _fold_conv_biases(first, core, last, what)
        module = cls(
            chain[0].in_channels, chain[-1].out_channels, core.kernel_size,
            (first.out_channels if first is not None else None, last.in_channels if last is not None else None),
            stride=core.stride, padding=core.padding, dilation=core.dilation, bias=bias is not None,
            padding_mode=core.padding_mode, device="meta",
        )  # fmt: skip
        module._load(
            None if first is None else first.weight[:, :, 0, 0],
            core.weight,
            None if last is None else last.weight[:, :, 0, 0],
            bias,
        )
        module.train(core.training)
        return module

    def to_sequential(self) -> nn.Sequential:
        """The unfused chain of ``nn.Conv2d`` layers that computes the same thing.

        Only the last layer has a bias; stride, padding, dilation and padding_mode sit
        on the spatial (core) layer.
        """
        ref = self.core
        kw = {"device": ref.device, "dtype": ref.dtype}
        layers: list[nn.Conv2d] = []
        has_bias = self.bias is not None
        if self.first is not None:
            layers.append(nn.Conv2d(self.in_channels, self.first.shape[0], 1, bias=False, **kw))
        layers.append(
            nn.Conv2d(
                self.core.shape[1], self.core.shape[0], self.kernel_size, stride=self.stride, padding=self.padding,
                dilation=self.dilation, bias=has_bias and self.last is None, padding_mode=self.padding_mode, **kw,
            )
        )  # fmt: skip
        if self.last is not None:
            layers.append(nn.Conv2d(self.last.shape[1], self.out_channels, 1, bias=has_bias, **kw))
        weights = [w for w in (self.first, self.core, self.last) if w is not None]
        with torch.no_grad():
            for layer, w in zip(layers, weights):
                layer.weight.copy_(w.reshape(layer.weight.shape))
            if has_bias:
                layers[-1].bias.copy_(self.bias)
        seq = nn.Sequential(*layers)
        seq.train(self.training)
        return seq

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` whose weight is the reconstructed (composed) Tucker weight."""
        from .decompose import reconstruct_conv2d

        ref = self.core
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=ref.device, dtype=ref.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(reconstruct_conv2d(self.first, self.core, self.last))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ", " + self._ratio_repr()


class TuckerLinear(_TuckerBase):
    """Linear layer whose weight is a Tucker-2 (``A·G·Bᵀ``) or Tucker-1 (``A·G``) product.

    Computes ``((x @ first.T) @ core.T) @ last.T + bias`` as one fused op; a side
    whose rank is ``None`` is left out.

    Args:
        in_features, out_features: as ``nn.Linear``.
        ranks: ``(r_in, r_out)``; ``None`` on a side means that side is not decomposed;
            an int ``r`` means ``(r, r)``. A rank may exceed its mode size.
        bias: whether to add a learnable bias ``(out_features,)``.

    Parameters:
        first: ``(R_in, in)`` or None. core: ``(R_out, R_in | in)``.
        last: ``(out, R_out)`` or None. bias: ``(out,)`` or None.

    Attributes: ``backend`` and ``reconstruction_error`` as in :class:`TuckerConv2d`.

    Shapes: input ``(..., in)`` -> output ``(..., out)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: int | tuple[int | None, int | None],
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TuckerLinear: {name} must be an int >= 1, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        r_in, r_out = _check_ranks(ranks)
        self.backend: str | None = None
        self.reconstruction_error: float | None = None
        kw = {"device": device, "dtype": dtype}
        core_in = r_in if r_in is not None else in_features
        core_out = r_out if r_out is not None else out_features
        self._register_factors(
            None if r_in is None else torch.empty(r_in, in_features, **kw),
            torch.empty(core_out, core_in, **kw),
            None if r_out is None else torch.empty(out_features, r_out, **kw),
            torch.empty(out_features, **kw) if bias else None,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose composed weight matches ``nn.Linear``'s default scale."""
        with torch.no_grad():
            _init_factors(self.first, self.core, self.last, self.bias, self.in_features)

    def forward(self, input: Tensor) -> Tensor:
        return _ops.tucker_linear(input, self.first, self.core, self.last, self.bias, backend=self.backend)

    def dense_num_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one forward on ``input_shape`` ``(..., in)``, as the chain runs it."""
        rows = math.prod(input_shape[:-1])
        r_in, r_out = self.ranks
        per_row = self.core.shape[0] * self.core.shape[1]
        if r_in is not None:
            per_row += self.in_features * r_in
        if r_out is not None:
            per_row += r_out * self.out_features
        return rows * per_row

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        ranks: Any = None,
        method: str = "vbmf",
        *,
        decompose_options: dict[str, Any] | None = None,
        **rank_options: Any,
    ) -> TuckerLinear:
        """Decompose ``linear`` into a ``TuckerLinear``; arguments as :meth:`TuckerConv2d.from_conv`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"TuckerLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        from . import decompose, ranks as rank_selection

        weight = linear.weight.detach()
        work = weight if weight.dtype in _DECOMPOSE_DTYPES else weight.float()
        chosen = rank_selection.select_ranks(work, ranks, method=method, **rank_options)
        _require_decomposition(chosen, weight, "TuckerLinear.from_linear")
        factors = decompose.decompose_linear(work, chosen, **(decompose_options or {}))
        module = cls(linear.in_features, linear.out_features, chosen, bias=linear.bias is not None, device="meta")
        cast = (lambda t: None if t is None else t.to(weight.dtype))
        bias = None if linear.bias is None else linear.bias.detach()
        module._load(cast(factors.first), cast(factors.core), cast(factors.last), bias)
        module.reconstruction_error = float(factors.relative_error)
        module.requires_grad_(linear.weight.requires_grad)
        module.train(linear.training)
        return module

    @classmethod
    def from_sequential(cls, seq: nn.Sequential | Iterable[nn.Module]) -> TuckerLinear:
        """Fuse ``[Linear, Linear, Linear]`` (Tucker-2) or ``[Linear, Linear]`` (Tucker-1) into one module.

        The 2-layer chain ``Linear(in, r, bias=False), Linear(r, out)`` is read as
        Tucker-1 with ranks ``(None, r)`` (the thesis's l2); the input-side form
        ``(r, None)`` has the same chain, so it comes back as ``(None, r)``. Biases of the middle
        layers are folded exactly into the output bias (``last @ b_mid + b_last``).

        Raises:
            ValueError when a layer is not ``nn.Linear`` or the feature sizes do not chain.
        """
        what = "TuckerLinear.from_sequential"
        stages = _as_stages(seq, what)
        for i, stage in enumerate(stages):
            if not isinstance(stage, nn.Linear):
                raise ValueError(f"{what}: layer {i} must be an nn.Linear, got {type(stage).__name__}")
        _same_dtype_device(stages, what)
        for i in range(len(stages) - 1):
            if stages[i].out_features != stages[i + 1].in_features:
                raise ValueError(
                    f"{what}: layer {i} gives {stages[i].out_features} features but layer {i + 1} expects "
                    f"in_features={stages[i + 1].in_features}"
                )
        first, core, last = stages if len(stages) == 3 else (None, *stages)
        bias = _fold_biases([s.bias for s in stages], [s.weight for s in stages])
        module = cls(
            stages[0].in_features, stages[-1].out_features,
            (None if first is None else first.out_features, last.in_features), bias=bias is not None, device="meta",
        )  # fmt: skip
        module._load(None if first is None else first.weight, core.weight, last.weight, bias)
        module.train(core.training)
        return module

    def to_sequential(self) -> nn.Sequential:
        """The unfused chain of ``nn.Linear`` layers; only the last has a bias."""
        ref = self.core
        kw = {"device": ref.device, "dtype": ref.dtype}
        weights = [w for w in (self.first, self.core, self.last) if w is not None]
        has_bias = self.bias is not None
        layers = [
            nn.Linear(w.shape[1], w.shape[0], bias=has_bias and i == len(weights) - 1, **kw) for i, w in enumerate(weights)
        ]
        with torch.no_grad():
            for layer, w in zip(layers, weights):
                layer.weight.copy_(w)
            if has_bias:
                layers[-1].bias.copy_(self.bias)
        seq = nn.Sequential(*layers)
        seq.train(self.training)
        return seq

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` whose weight is the reconstructed (composed) Tucker weight."""
        from .decompose import reconstruct_linear

        ref = self.core
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            linear.weight.copy_(reconstruct_linear(self.first, self.core, self.last))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        return s + ", " + self._ratio_repr()


# -- helpers for argument normalisation and chain recognition ----------------------


def padding_extent_error(
    kernel_size: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> str | None:
    """Why the ops would reject this zero padding as suspicious, or None when they accept it.

    The one Python statement of ``check_padding_extent`` in csrc/checks.cpp (the
    fake kernels in ``_ops`` state it for tracing): per dimension, padding may be
    at most the dilated kernel extent ``dilation * (k - 1) + 1``; more only adds
    outputs that see nothing but zeros. A 1×1 kernel with padding 1 is allowed.
    """
    for dim, k, pad, dil in zip(("H", "W"), kernel_size, padding, dilation):
        extent = dil * (k - 1) + 1
        if pad > extent:
            return (
                f"padding along {dim} must be at most the dilated kernel extent dilation * (k - 1) + 1 = {extent}, "
                f"but got padding {pad} with kernel size {k} and dilation {dil} (the tucker_conv2d op rejects more: "
                f"it only adds outputs that see nothing but zeros)"
            )
    return None


def conv_padding_error(conv: nn.Conv2d) -> str | None:
    """:func:`padding_extent_error` for the zero padding a ``TuckerConv2d`` built from ``conv`` hands the op.

    ``'same'`` / ``'valid'`` and non-zero padding modes (padded explicitly, the op
    then gets padding 0) always pass.
    """
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return None
    return padding_extent_error(conv.kernel_size, conv.padding, conv.dilation)


def _require_decomposition(chosen: Ranks, weight: Tensor, what: str) -> None:
    if chosen == (None, None):
        raise ValueError(
            f"{what}: rank selection chose (None, None), i.e. no decomposition, for weight of shape "
            f"{tuple(weight.shape)}; pass explicit ranks (r_in, r_out) to decompose it anyway"
        )


def _pair_of_positive(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"TuckerConv2d: {name} must be an int >= 1 or a pair of them, got {value!r}")
    return tuple(pair)


def _normalise_padding(padding: int | Sequence[int] | str, stride: tuple[int, int]) -> tuple[int, int] | str:
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"TuckerConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"TuckerConv2d: padding='same' needs stride 1 (as nn.Conv2d), got stride={stride}")
        return (0, 0) if padding == "valid" else padding
    pair = _pair(padding)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pair):
        raise ValueError(f"TuckerConv2d: padding must be an int >= 0, a pair of them, 'same' or 'valid', got {padding!r}")
    return tuple(pair)


def _batch_and_hw(input_shape: Sequence[int]) -> tuple[int, tuple[int, int]]:
    shape = tuple(input_shape)
    if len(shape) == 3:
        return 1, (shape[1], shape[2])
    if len(shape) == 4:
        return shape[0], (shape[2], shape[3])
    raise ValueError(f"TuckerConv2d.macs: input_shape must be (N, C, H, W) or (C, H, W), got {shape}")


def _zero_padding(conv: nn.Conv2d) -> bool:
    """Whether the conv adds no padding at all (so its input never sees padded pixels)."""
    if conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding) == (0, 0)


def _check_pointwise(conv: nn.Conv2d, index: int, what: str) -> None:
    """A 1×1 stage of a chain must be a plain per-pixel projection."""
    problems = []
    if tuple(conv.kernel_size) != (1, 1):
        problems.append(f"kernel_size={tuple(conv.kernel_size)} (expected (1, 1))")
    if tuple(conv.stride) != (1, 1):
        problems.append(f"stride={tuple(conv.stride)} (expected (1, 1))")
    if not _zero_padding(conv):
        problems.append(f"padding={conv.padding} (expected 0)")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation={tuple(conv.dilation)} (expected (1, 1))")
    if problems:
        raise ValueError(f"{what}: layer {index} must be a 1×1 projection but has " + ", ".join(problems))


def _fold_biases(biases: Sequence[Tensor | None], weights: Sequence[Tensor]) -> Tensor | None:
    """Bias of a linear chain: ``b = W_k(...(W_2 b_1 + b_2)...) + b_k``, computed in float64."""
    if all(b is None for b in biases):
        return None
    acc = None
    for b, w in zip(biases, weights):
        if acc is not None:
            acc = w.detach().double() @ acc
        if b is not None:
            acc = b.detach().double() if acc is None else acc + b.detach().double()
    if acc is None:  # only possible with no biases at all, handled above
        return None
    return acc.to(weights[-1].dtype)


def _fold_conv_biases(first: nn.Conv2d | None, core: nn.Conv2d, last: nn.Conv2d | None, what: str) -> Tensor | None:
    """Output bias equal to the chain's biases, or a ValueError when folding would not be exact.

    A bias on the input projection reaches the core as a constant image; the core
    maps a constant to ``sum_{h,w} core[:, :, h, w] @ b`` everywhere except where
    zero padding replaces it, so it folds only when the core sees no zero padding.
    """
    if first is not None and first.bias is not None and core.padding_mode == "zeros" and not _zero_padding(core):
        raise ValueError(
            f"{what}: layer 0 (the 1×1 input projection) has a bias, which cannot be folded exactly because the "
            f"next layer zero-pads (padding={core.padding}); remove that bias or the padding"
        )
    stages = [s for s in (first, core, last) if s is not None]
    # The core as a linear map on constant images: its kernel summed over space.
    weights = [s.weight.detach().sum(dim=(2, 3)) for s in stages]
    return _fold_biases([s.bias for s in stages], weights)
