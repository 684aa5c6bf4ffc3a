"""Whole-model compression and its report, and conversions between fused modules and chains.

``compress`` swaps every eligible ``nn.Conv2d`` / ``nn.Linear`` of a model for a
``TuckerConv2d`` / ``TuckerLinear`` and says, per layer, what it did or why it left
the layer dense. ``fuse_sequential_chains`` turns decomposed ``nn.Sequential``
chains that a model already has (from other tools, or the thesis) into the fused
modules; ``to_sequential_model`` goes the other way.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from tqdm import tqdm

from .modules import TuckerConv2d, TuckerLinear, conv_padding_error

__all__ = [
    "CompressionReport",
    "LayerReport",
    "compress",
    "fuse_sequential_chains",
    "to_sequential_model",
]

RankSpec = int | float | tuple[int | None, int | None] | None
_TUCKER = (TuckerConv2d, TuckerLinear)


@dataclass
class LayerReport:
    """What ``compress`` did to one layer.

    Attributes:
        name: qualified module name (as ``model.named_modules()`` gives it).
        type: class name of the original layer.
        weight_shape: shape of the original weight.
        in_shape, out_shape: input/output shape in the first call at ``example_input``
            (None without ``example_input``, or when the layer did not run).
        ranks: chosen ``(r_in, r_out)``; None for a skipped layer.
        method: how the ranks were chosen (``"explicit"``, ``"ratio"``, ``"vbmf"``,
            ``"energy"``); None for a skipped layer.
        params_before, params_after: parameters of this layer (weight and bias).
        macs_before, macs_after: multiply-accumulates of this layer over all its
            calls at ``example_input`` (None when not measured).
        reconstruction_error: relative Frobenius error of the weight approximation.
        skipped: why the layer was left as it is, or None when it was compressed.
    """

    name: str
    type: str
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    ranks: tuple[int | None, int | None] | None = None
    method: str | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    reconstruction_error: float | None = None
    skipped: str | None = None

    @property
    def compressed(self) -> bool:
        return self.skipped is None


@dataclass
class CompressionReport:
    """Per-layer outcome of :func:`compress` and whole-model totals.

    ``params_before`` / ``params_after`` count every parameter of the whole model.
    ``macs_before`` / ``macs_after`` sum the multiply-accumulates of the convolution,
    Linear and Tucker layers at ``example_input`` (other layers are not counted);
    they are None when no example input was given.
    """

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    example_input_shape: tuple[int, ...] | None = None

    @property
    def compression_ratio(self) -> float:
        """Whole-model parameters before / after (> 1 means smaller)."""
        return self.params_before / self.params_after if self.params_after else math.inf

    @property
    def macs_ratio(self) -> float | None:
        """MACs before / after at the example input, or None when not measured."""
        if self.macs_before is None or self.macs_after is None:
            return None
        return self.macs_before / self.macs_after if self.macs_after else math.inf

    @property
    def compressed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.compressed]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.compressed]

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this report; layers: {[layer.name for layer in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: ``json.dumps(report.to_dict())`` works."""
        return {
            "layers": [{**asdict(layer), "compressed": layer.compressed} for layer in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "compression_ratio": self.compression_ratio,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "example_input_shape": self.example_input_shape,
        }

    def __str__(self) -> str:
        header = ("layer", "type", "weight", "ranks", "method", "params", "MACs", "rel. err", "note")
        rows = [header]
        for layer in self.layers:
            macs = "-" if layer.macs_before is None else f"{layer.macs_before:,} -> {layer.macs_after:,}"
            err = layer.reconstruction_error
            rows.append((
                layer.name,
                layer.type,
                "x".join(str(d) for d in layer.weight_shape),
                "-" if layer.ranks is None else f"({layer.ranks[0]}, {layer.ranks[1]})",
                layer.method or "-",
                f"{layer.params_before:,} -> {layer.params_after:,}",
                macs,
                "-" if err is None else f"{err:.3f}" if err >= 1e-3 or err == 0 else f"{err:.1e}",
                layer.skipped or "compressed",
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        numeric = {5, 6, 7}
        lines = []
        for k, row in enumerate(rows):
            cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        n_done = len(self.compressed)
        lines.append("")
        lines.append(f"layers compressed: {n_done} of {len(self.layers)}")
        lines.append(
            f"parameters (whole model): {self.params_before:,} -> {self.params_after:,} "
            f"({_ratio_text(self.compression_ratio)})"
        )
        if self.macs_ratio is not None:
            lines.append(
                f"MACs (conv/linear layers, input {self.example_input_shape}): "
                f"{self.macs_before:,} -> {self.macs_after:,} ({_ratio_text(self.macs_ratio)})"
            )
        else:
            lines.append("MACs: not measured (pass example_input)")
        return "\n".join(lines)


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x more"


# -- compress ---------------------------------------------------------------------


def compress(
    model: nn.Module,
    ranks: RankSpec | Mapping[str, RankSpec] = None,
    method: str = "vbmf",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_rank: int = 1,
    rank_multiple: int = 1,
    inplace: bool = False,
    example_input: Any = None,
    *,
    progress: bool | None = None,
    decompose_options: Mapping[str, Any] | None = None,
    **rank_options: Any,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the model's Conv2d and Linear layers by Tucker-decomposed fused modules.

    Args:
        model: any ``nn.Module``; layers at any depth are found by ``named_modules``.
        ranks: a RankSpec applied to every layer (an int or ``(r_in, r_out)``:
            explicit; a float in (0, 1]: fraction of parameters to keep; None: pick with
            ``method``), or a dict ``{qualified layer name: RankSpec}``: explicit
            per-layer choice, layers missing from it stay dense ("no ranks given").
        method: rank selection when a layer's spec is None: ``"vbmf"`` or ``"energy"``.
        include: names or fnmatch patterns; when given, only matching layers are
            considered. A pattern matches a layer when it matches its name or the name
            of a module containing it (``"layer1"`` covers ``"layer1.0.conv1"``).
        exclude: names or patterns (matched the same way) of layers to leave dense.
        min_rank, rank_multiple, **rank_options: passed to ``tucker_ops.ranks.select_ranks``
            (e.g. ``energy=0.9``, ``weakening=0.5``).
        inplace: modify ``model`` itself instead of a deep copy. (A model that is
            itself a single Conv2d/Linear cannot change class in place: the returned
            module is new either way.)
        example_input: a tensor (or tuple of positional inputs, or dict of keyword
            inputs) to measure per-layer shapes and MACs on the original model, run in
            eval mode under ``no_grad`` (training flags restored afterwards).
        progress: show a tqdm bar over the layers: None = only on a terminal and for
            two or more layers.
        decompose_options: passed to ``decompose_conv2d`` / ``decompose_linear``.

    Returns:
        ``(compressed model, CompressionReport)``.

    Layers left dense, with the reason in the report: grouped convolutions, layers
    excluded or not included, layers missing from a ``ranks`` dict, layers where the
    chosen ranks do not reduce anything, and layers too small to gain (Tucker
    parameters >= dense parameters) when the ranks were chosen automatically.
    Explicit ranks are always honoured, even when they add parameters.
    """
    per_layer = isinstance(ranks, Mapping)
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")
    rows = _inventory(model)
    if per_layer:
        known = {name for name, m in rows if isinstance(m, (nn.Conv2d, nn.Linear))}
        unknown = sorted(set(ranks) - known)
        if unknown:
            raise ValueError(
                f"compress: ranks names layers that are not Conv2d/Linear layers of the model: {unknown}; "
                f"Conv2d/Linear layers are: {sorted(known)}"
            )
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(_matches(name, [pattern]) for name, _ in rows):
                warnings.warn(f"compress: {label} pattern {pattern!r} matches no layer", UserWarning, stacklevel=2)

    calls, input_shape = _measure(model, rows, example_input) if example_input is not None else ({}, None)
    params_before = _count_params(model)

    target = model if inplace else copy.deepcopy(model)
    # Same traversal order on the copy, so names line up with the original's rows.
    target_rows = dict(_inventory(target))
    parents = _parent_slots(target)

    reports: list[LayerReport] = []
    todo: deque[tuple[LayerReport, nn.Module, RankSpec]] = deque()
    for name, _ in rows:
        layer = target_rows[name]
        report = _describe(name, layer, calls.get(name))
        reports.append(report)
        reason = _skip_reason(name, layer, parents, include, exclude)
        if reason is None and per_layer and name not in ranks:
            reason = "no ranks given"
        if reason is not None:
            report.skipped = reason
            continue
        todo.append((report, layer, ranks[name] if per_layer else ranks))
    # From here on only `todo` and `parents` refer to the layers, so each dense
    # layer of the copy is freed as soon as its replacement is in place: peak
    # memory stays near model + copy, not model + copy + all factors.
    layer = None
    del target_rows, rows

    # The bar counts weight elements, so its position and ETA follow the work
    # (a VGG-16's fc6 is 74% of its weights), and names the layer being done.
    total = sum(report.params_before for report, _, _ in todo)
    bar = tqdm(
        total=total, desc="compress", unit="param", unit_scale=True,
        disable=_progress_disabled(progress, len(todo)),
    )  # fmt: skip
    with bar:
        while todo:
            report, layer, spec = todo.popleft()
            dims = "x".join(str(d) for d in report.weight_shape)
            bar.set_postfix_str(f"{report.name or type(layer).__name__} ({dims})", refresh=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                replacement = _compress_layer(
                    report, layer, spec, method, min_rank, rank_multiple, decompose_options, rank_options
                )
            # Say which layer a rank-selection or decomposition warning is about.
            for w in caught:
                warnings.warn(f"compress: layer {report.name!r}: {w.message}", w.category, stacklevel=2)
            bar.update(report.params_before)
            if replacement is None:
                continue
            if report.name == "":  # the model is itself one layer
                target = replacement
            for parent, attr in parents.get(id(layer), []):
                setattr(parent, attr, replacement)
            report.params_after = replacement.num_params()
            if report.macs_before is not None:
                report.macs_after = sum(replacement.macs(shape) for shape, _ in calls[report.name])
            del layer, replacement
    del parents

    result = CompressionReport(
        layers=reports,
        params_before=params_before,
        params_after=_count_params(target),
        example_input_shape=input_shape,
    )
    if example_input is not None:
        result.macs_before = sum(r.macs_before or 0 for r in reports)
        result.macs_after = sum((r.macs_after if r.compressed else r.macs_before) or 0 for r in reports)
    return target, result


def _compress_layer(
    report: LayerReport,
    layer: nn.Module,
    spec: RankSpec,
    method: str,
    min_rank: int,
    rank_multiple: int,
    decompose_options: Mapping[str, Any] | None,
    rank_options: Mapping[str, Any],
) -> nn.Module | None:
    """Choose ranks and decompose one layer; fill ``report``. None means left dense."""
    from .ranks import select_ranks

    weight = layer.weight.detach()
    work = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    chosen = select_ranks(work, spec, method=method, min_rank=min_rank, rank_multiple=rank_multiple, **rank_options)
    chosen = tuple(chosen)
    explicit = isinstance(spec, (int, tuple, list)) and not isinstance(spec, bool)
    report.method = "explicit" if explicit else "ratio" if isinstance(spec, float) else method
    if chosen == (None, None):
        report.skipped = "no rank reduction (ranks (None, None))"
        return None
    after = _tucker_params(weight.shape, chosen, layer.bias is not None)
    if not explicit and after >= report.params_before:
        report.skipped = f"too small to gain (ranks {chosen}: {after:,} >= {report.params_before:,} params)"
        return None
    options = dict(decompose_options or {})
    if isinstance(layer, nn.Conv2d):
        replacement = TuckerConv2d.from_conv(layer, ranks=chosen, decompose_options=options)
    else:
        replacement = TuckerLinear.from_linear(layer, ranks=chosen, decompose_options=options)
    report.ranks = chosen
    report.reconstruction_error = replacement.reconstruction_error
    return replacement


def _tucker_params(weight_shape: torch.Size, ranks: tuple[int | None, int | None], bias: bool) -> int:
    out, inp, *kernel = weight_shape
    r_in, r_out = ranks
    spatial = math.prod(kernel)
    total = (r_out or out) * (r_in or inp) * spatial + (out if bias else 0)
    total += r_in * inp if r_in is not None else 0
    total += out * r_out if r_out is not None else 0
    return total


def _inventory(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers the report lists: every convolution, Linear and Tucker module."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (_ConvNd, nn.Linear, *_TUCKER))]


def _parent_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) that holds it, so shared modules stay shared."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, attr))
    return slots


def _skip_reason(
    name: str,
    layer: nn.Module,
    parents: Mapping[int, list[tuple[nn.Module, str]]],
    include: list[str] | None,
    exclude: list[str] | None,
) -> str | None:
    if isinstance(layer, _TUCKER):
        return "already a Tucker layer"
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        return f"{type(layer).__name__} not supported (only Conv2d and Linear)"
    if _uninitialized(layer):
        return "uninitialized lazy layer (run a forward pass first)"
    if exclude and _matches(name, exclude):
        return "excluded"
    if include is not None and not _matches(name, include):
        return "not included"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"groups={layer.groups} not supported"
    if isinstance(layer, nn.Conv2d):
        problem = conv_padding_error(layer)
        if problem is not None:
            return f"suspicious padding rejected by the ops: {problem}"
    if any(isinstance(parent, nn.MultiheadAttention) for parent, _ in parents.get(id(layer), [])):
        return "inside MultiheadAttention, which reads its weight directly"
    if parametrize.is_parametrized(layer):
        return "parametrized weight not supported"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return "has forward hooks, which would be lost"
    return None


def _uninitialized(layer: nn.Module) -> bool:
    return isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params()


def _patterns(patterns: Iterable[str] | None, what: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"compress: {what} must be names or fnmatch patterns (strings), got {out!r}")
    return out


def _matches(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def _progress_disabled(progress: bool | None, n: int) -> bool | None:
    if progress is None:
        return True if n < 2 else None  # None: tqdm shows the bar only on a terminal
    return not progress


def _count_params(model: nn.Module) -> int:
    """Parameters of the whole model; uninitialized lazy ones have no size yet and count 0."""
    return sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


def _describe(name: str, layer: nn.Module, calls: list[tuple[tuple[int, ...], tuple[int, ...]]] | None) -> LayerReport:
    if isinstance(layer, _TUCKER):
        weight_shape = _tucker_weight_shape(layer)
        params = layer.num_params()
    elif _uninitialized(layer):
        weight_shape, params = (), 0
    else:
        weight_shape = tuple(layer.weight.shape)
        params = sum(p.numel() for p in layer.parameters(recurse=False))
    report = LayerReport(name=name, type=type(layer).__name__, weight_shape=weight_shape, params_before=params, params_after=params)
    if calls is not None:
        report.in_shape, report.out_shape = calls[0] if calls else (None, None)
        report.macs_before = sum(_layer_macs(layer, shape_in, shape_out) for shape_in, shape_out in calls)
        report.macs_after = report.macs_before
    if isinstance(layer, _TUCKER):
        report.ranks = layer.ranks
    return report


def _tucker_weight_shape(layer: TuckerConv2d | TuckerLinear) -> tuple[int, ...]:
    if isinstance(layer, TuckerConv2d):
        return (layer.out_channels, layer.in_channels, *layer.kernel_size)
    return (layer.out_features, layer.in_features)


def _layer_macs(layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """MACs of one call of a dense layer (bias additions not counted)."""
    if isinstance(layer, _TUCKER):
        return layer.macs(in_shape)
    if isinstance(layer, nn.Linear):
        return math.prod(out_shape) * layer.in_features
    kernel = math.prod(layer.kernel_size)
    if layer.transposed:
        # Every input pixel scatters into out_channels/groups channels over the kernel.
        return math.prod(in_shape) * (layer.out_channels // layer.groups) * kernel
    return math.prod(out_shape) * (layer.in_channels // layer.groups) * kernel


def _measure(
    model: nn.Module, rows: list[tuple[str, nn.Module]], example_input: Any
) -> tuple[dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]], tuple[int, ...] | None]:
    """Run ``model`` once on ``example_input`` and record (input shape, output shape) per call per layer."""
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {name: [] for name, _ in rows}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                calls[name].append((tuple(args[0].shape), tuple(output.shape)))

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in rows]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    shape = tuple(example_input.shape) if isinstance(example_input, Tensor) else None
    return calls, shape


# -- chains <-> fused modules -----------------------------------------------------


def _try_fuse(seq: nn.Sequential) -> nn.Module | None:
    """The fused module for a decomposed chain, or None when ``seq`` is not one."""
    stages = list(seq)
    if len(stages) not in (2, 3):
        return None
    try:
        if all(isinstance(s, nn.Conv2d) for s in stages):
            return TuckerConv2d.from_sequential(seq)
        if all(isinstance(s, nn.Linear) for s in stages):
            return TuckerLinear.from_sequential(seq)
    except ValueError:
        return None
    return None


def fuse_sequential_chains(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[str]]:
    """Replace decomposed ``nn.Sequential`` chains anywhere in ``model`` by fused modules.

    A chain is an ``nn.Sequential`` (exactly that class) of 2 or 3 ``nn.Conv2d`` or
    ``nn.Linear`` layers that :meth:`TuckerConv2d.from_sequential` /
    :meth:`TuckerLinear.from_sequential` accept; the function the model computes
    stays the same. Other Sequentials are searched for chains inside them. When
    ``model`` itself is a chain, the fused module is returned in its place.

    Returns:
        ``(model, names)``: the model (a deep copy unless ``inplace``) and the
        qualified names of the chains replaced ("" for the model itself).
    """
    target = model if inplace else copy.deepcopy(model)
    replaced: list[str] = []
    if type(target) is nn.Sequential:
        fused = _try_fuse(target)
        if fused is not None:
            return fused, [""]
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for attr, child in list(module._modules.items()):
            if child is None:
                continue
            name = f"{prefix}{attr}"
            if id(child) in done:  # a shared chain: reuse its fused module
                setattr(module, attr, done[id(child)])
                continue
            fused = _try_fuse(child) if type(child) is nn.Sequential else None
            if fused is not None:
                done[id(child)] = fused
                setattr(module, attr, fused)
                replaced.append(name)
            else:
                visit(child, f"{name}.")

    visit(target, "")
    return target, replaced


def to_sequential_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every ``TuckerConv2d`` / ``TuckerLinear`` by its ``to_sequential()`` chain.

    The inverse of :func:`fuse_sequential_chains`: the result is a plain PyTorch
    model that prints like the thesis's "Net after" and computes the same function.
    Returns a deep copy unless ``inplace``; a model that is itself a Tucker module
    comes back as its chain.
    """
    target = model if inplace else copy.deepcopy(model)
    if isinstance(target, _TUCKER):
        return target.to_sequential()
    chains: dict[int, nn.Sequential] = {}
    for parent in list(target.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, _TUCKER):
                if id(child) not in chains:
                    chains[id(child)] = child.to_sequential()
                setattr(parent, attr, chains[id(child)])
    return target
