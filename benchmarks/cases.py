"""The benchmark layers: shapes, ranks, and every implementation of each.

Each case builds one Tucker layer's factors (random, seeded) and returns the
callables compared side by side: the dense layer, the factors as an
``nn.Sequential`` of PyTorch layers, the fused op, and the reference chain.
``onnx_runtime.py`` adds ONNX Runtime running the same Sequential.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tucker_ops import _ops, reference


@dataclass(frozen=True)
class ConvCase:
    name: str
    c_in: int
    c_out: int
    kernel: int
    size: int  # input H = W
    ranks: tuple[int | None, int | None]
    stride: int = 1
    padding: int = 0

    @property
    def kind(self) -> str:
        return "conv"


@dataclass(frozen=True)
class LinearCase:
    name: str
    in_features: int
    out_features: int
    ranks: tuple[int | None, int | None]

    @property
    def kind(self) -> str:
        return "linear"


CASES: dict[str, ConvCase | LinearCase] = {
    c.name: c
    for c in (
        ConvCase("thesis_conv1", 1, 16, 5, 28, (None, 2), padding=2),
        ConvCase("thesis_conv2", 16, 32, 5, 14, (8, 4)),
        LinearCase("thesis_l1", 800, 120, (40, 200)),
        LinearCase("thesis_l2", 120, 84, (None, 30)),
        ConvCase("resnet50_3x3", 256, 256, 3, 14, (64, 64), padding=1),
        ConvCase("vgg_128", 128, 128, 3, 56, (32, 32), padding=1),
        ConvCase("downsample_s2", 64, 128, 3, 56, (16, 32), stride=2, padding=1),
        LinearCase("linear_4096", 4096, 4096, (512, 512)),
    )
}


@dataclass
class Layer:
    """One case's factors and modules, all with the same numbers."""

    case: ConvCase | LinearCase
    first: Tensor | None
    core: Tensor
    last: Tensor | None
    bias: Tensor
    dense: nn.Module
    sequential: nn.Sequential

    def input(self, batch: int) -> Tensor:
        c = self.case
        g = torch.Generator().manual_seed(1)
        if isinstance(c, ConvCase):
            return torch.randn(batch, c.c_in, c.size, c.size, generator=g)
        return torch.randn(batch, c.in_features, generator=g)

    def params(self) -> list[Tensor]:
        return [t for t in (self.first, self.core, self.last, self.bias) if t is not None]

    def impls(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """name -> forward callable; the fused and reference ones read the factor tensors."""
        c = self.case
        f, g, l, b = self.first, self.core, self.last, self.bias
        if isinstance(c, ConvCase):
            conv = (c.stride, c.stride), (c.padding, c.padding), (1, 1)
            return {
                "dense": self.dense,
                "sequential": self.sequential,
                "fused": lambda x: _ops.tucker_conv2d(x, f, g, l, b, *conv, backend="fused"),
                "reference": lambda x: reference.tucker_conv2d(x, f, g, l, b, *conv),
            }
        return {
            "dense": self.dense,
            "sequential": self.sequential,
            "fused": lambda x: _ops.tucker_linear(x, f, g, l, b, backend="fused"),
            "reference": lambda x: reference.tucker_linear(x, f, g, l, b),
        }


def build(name: str) -> Layer:
    c = CASES[name]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=gen) / max(1, shape[-1]) ** 0.5).requires_grad_()

    r_in, r_out = c.ranks
    if isinstance(c, ConvCase):
        k = c.kernel
        c_in, c_out = c.c_in, c.c_out
        ri = r_in if r_in is not None else c_in
        ro = r_out if r_out is not None else c_out
        first = rand(ri, c_in) if r_in is not None else None
        core = rand(ro, ri, k, k)
        last = rand(c_out, ro) if r_out is not None else None
        bias = rand(c_out)
        layers: list[nn.Module] = []
        if first is not None:
            layers.append(nn.Conv2d(c_in, ri, 1, bias=False))
        layers.append(nn.Conv2d(ri, ro, k, stride=c.stride, padding=c.padding, bias=last is None))
        if last is not None:
            layers.append(nn.Conv2d(ro, c_out, 1))
        dense = nn.Conv2d(c_in, c_out, k, stride=c.stride, padding=c.padding)
        with torch.no_grad():
            dense.weight.copy_(_dense_conv(first, core, last))
            dense.bias.copy_(bias)
    else:
        i, o = c.in_features, c.out_features
        ri = r_in if r_in is not None else i
        ro = r_out if r_out is not None else o
        first = rand(ri, i) if r_in is not None else None
        core = rand(ro, ri)
        last = rand(o, ro) if r_out is not None else None
        bias = rand(o)
        layers = []
        if first is not None:
            layers.append(nn.Linear(i, ri, bias=False))
        layers.append(nn.Linear(ri, ro, bias=last is None))
        if last is not None:
            layers.append(nn.Linear(ro, o))
        dense = nn.Linear(i, o)
        with torch.no_grad():
            w = core
            if first is not None:
                w = w @ first
            if last is not None:
                w = last @ w
            dense.weight.copy_(w)
            dense.bias.copy_(bias)
    seq = nn.Sequential(*layers)
    with torch.no_grad():
        weights = [t for t in (first, core, last) if t is not None]
        for layer, w in zip(layers, weights):
            layer.weight.copy_(w.reshape(layer.weight.shape))
        layers[-1].bias.copy_(bias)
    return Layer(c, first, core, last, bias, dense, seq)


def _dense_conv(first: Tensor | None, core: Tensor, last: Tensor | None) -> Tensor:
    w = core.detach()
    if first is not None:
        w = torch.einsum("orhw,ri->oihw", w, first.detach())
    if last is not None:
        w = torch.einsum("co,oihw->cihw", last.detach(), w)
    return w


def macs(case: ConvCase | LinearCase, batch: int) -> dict[str, int]:
    """Multiply-adds of the dense layer and of the Tucker chain for one batch."""
    if isinstance(case, LinearCase):
        i, o = case.in_features, case.out_features
        ri = case.ranks[0] or i
        ro = case.ranks[1] or o
        chain = (i * ri if case.ranks[0] else 0) + ri * ro + (ro * o if case.ranks[1] else 0)
        return {"dense": batch * i * o, "chain": batch * chain}
    k, s = case.kernel, case.size
    out = (s + 2 * case.padding - k) // case.stride + 1
    ri = case.ranks[0] or case.c_in
    ro = case.ranks[1] or case.c_out
    chain = (case.c_in * ri * s * s if case.ranks[0] else 0) + out * out * (ri * ro * k * k + (ro * case.c_out if case.ranks[1] else 0))
    return {"dense": batch * out * out * case.c_in * case.c_out * k * k, "chain": batch * chain}
