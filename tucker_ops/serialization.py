"""Saving and loading compressed models: ``save``, ``load`` and the compression plan.

A checkpoint is one ``torch.save`` file holding plain data only (dicts, lists,
strings, numbers, tensors), so ``torch.load(path, weights_only=True)`` reads it::

    {"format": "tucker_ops.checkpoint", "format_version": 1, "tucker_ops_version": "0.1.0",
     "model_class": "mypkg.MyNet", "plan": [<layer entry>, ...], "state_dict": {...}}

The plan lists every ``TuckerConv2d`` / ``TuckerLinear`` of the model with its
name, kind, ranks and layer options (and, for a layer fused with its ReLU /
average-pool epilogue by ``fuse_epilogues``, the pool). ``load`` builds the dense
model from a factory, replaces the planned layers by Tucker modules of the same
ranks (no decomposition: only the structure), loads the state_dict, then fuses the
epilogues again where the saved model had them, so the round trip is exact. Writes are atomic: the file is written next to its destination,
fsynced, then renamed over it, so an interrupted save leaves the previous file.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .epilogues import TuckerConv2dReLUPool, fuse_epilogues
from .modules import TuckerConv2d, TuckerLinear

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "apply_compression_plan",
    "compression_plan",
    "load",
    "save",
]

CHECKPOINT_FORMAT_VERSION = 1
_FORMAT = "tucker_ops.checkpoint"
_KINDS = {"conv2d": TuckerConv2d, "linear": TuckerLinear}

PathLike = str | os.PathLike[str]
ModelFactory = Callable[[], nn.Module]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    """The content of a checkpoint file, as :func:`load` returns it without a model factory.

    Attributes:
        plan: one dict per Tucker layer (see :func:`compression_plan`).
        state_dict: the model's ``state_dict`` at save time.
        format_version: the file's format version.
        metadata: the remaining header fields (``tucker_ops_version``, ``model_class``).
    """

    plan: list[dict[str, Any]]
    state_dict: dict[str, Tensor]
    format_version: int = CHECKPOINT_FORMAT_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)

    def restore(self, model: nn.Module | ModelFactory, *, strict: bool = True) -> nn.Module:
        """Re-compress ``model`` (a dense model, or a factory making one) by the plan and load the weights.

        Returns the model: a new object when the model itself is one planned layer,
        or the ``torch.fx.GraphModule`` of ``fuse_epilogues`` when the saved model had
        fused epilogues (fused again here; a submodule's, where only that submodule
        was fused). Raises :class:`CheckpointError` when the plan or the state_dict
        does not fit.
        """
        if not isinstance(model, nn.Module):
            if not callable(model):
                raise TypeError(
                    f"model must be an nn.Module or a callable returning one, but got {type(model).__name__}"
                )
            made = model()
            if not isinstance(made, nn.Module):
                raise TypeError(f"model_factory must return an nn.Module, but it returned {type(made).__name__}")
            model = made
        model = apply_compression_plan(model, self.plan)
        try:
            model.load_state_dict(self.state_dict, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint's state_dict does not fit the model: {e}") from e
        return _refuse_epilogues(model, self.plan)


# -- the plan -------------------------------------------------------------------------


def _layer_entry(name: str, module: TuckerConv2d | TuckerLinear) -> dict[str, Any]:
    r_in, r_out = module.ranks
    entry: dict[str, Any] = {
        "name": name,
        "ranks": [r_in, r_out],
        "bias": module.bias is not None,
        "dtype": str(module.core.dtype).removeprefix("torch."),
        "backend": module.backend,
        "reconstruction_error": module.reconstruction_error,
    }
    if isinstance(module, TuckerConv2dReLUPool):
        entry["epilogue_pool"] = module.pool
    if isinstance(module, TuckerConv2d):
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        entry.update(
            kind="conv2d",
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=list(module.kernel_size),
            stride=list(module.stride),
            padding=padding,
            dilation=list(module.dilation),
            padding_mode=module.padding_mode,
        )
    else:
        entry.update(kind="linear", in_features=module.in_features, out_features=module.out_features)
    return entry


def compression_plan(model: nn.Module) -> list[dict[str, Any]]:
    """The structure of every Tucker layer of ``model``, as plain data.

    One dict per ``TuckerConv2d`` / ``TuckerLinear`` (a shared module once, under its
    first name; ``""`` when ``model`` itself is one) with keys ``name``, ``kind``
    (``"conv2d"`` / ``"linear"``), ``ranks`` ``[r_in, r_out]``, ``bias``, ``dtype``,
    ``backend``, ``reconstruction_error`` and the layer options: ``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``padding_mode`` for conv; ``in_features``, ``out_features`` for linear. A conv fused
    with its ReLU / average-pool epilogue (:class:`TuckerConv2dReLUPool`) also has
    ``epilogue_pool``.
    """
    return [_layer_entry(name, m) for name, m in model.named_modules() if isinstance(m, (TuckerConv2d, TuckerLinear))]


def _fit_error(name: str, what: str, expected: Any, got: Any) -> CheckpointError:
    return CheckpointError(
        f"the compression plan does not fit the model: layer {name!r} expected {what} {expected!r} "
        f"(from the checkpoint), but the model's layer has {got!r}"
    )


def _dense_options(layer: nn.Module) -> dict[str, Any]:
    """The options of a dense (or already Tucker) layer, in the plan's terms."""
    if isinstance(layer, (nn.Conv2d, TuckerConv2d)):
        padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
        if padding == "valid":
            padding = [0, 0]
        return {
            "kind": "conv2d",
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": padding,
            "dilation": list(layer.dilation),
            "padding_mode": layer.padding_mode,
            "groups": layer.groups,
            "bias": layer.bias is not None,
        }
    if isinstance(layer, (nn.Linear, TuckerLinear)):
        return {
            "kind": "linear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }
    return {"kind": type(layer).__name__}


def _check_entry(entry: Any) -> None:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise CheckpointError(f"malformed compression plan entry (expected a dict with a 'name'), got {entry!r}")
    kind = entry.get("kind")
    if kind not in _KINDS:
        raise CheckpointError(f"plan entry {entry['name']!r} has unknown kind {kind!r}; known kinds: {sorted(_KINDS)}")
    ranks = entry.get("ranks")
    if (
        not isinstance(ranks, (list, tuple))
        or len(ranks) != 2
        or not all(r is None or (isinstance(r, int) and not isinstance(r, bool) and r >= 1) for r in ranks)
    ):
        raise CheckpointError(f"plan entry {entry['name']!r} has malformed ranks {ranks!r}")
    pool = entry.get("epilogue_pool")
    if pool is not None and (kind != "conv2d" or isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
        raise CheckpointError(
            f"plan entry {entry['name']!r} has malformed epilogue_pool {pool!r} (expected an int >= 1 on a conv2d layer)"
        )


def _build(entry: Mapping[str, Any], layer: nn.Module) -> TuckerConv2d | TuckerLinear:
    """A Tucker module with the plan's structure, on the layer's device and dtype, weights uninitialised."""
    name = entry["name"]
    got = _dense_options(layer)
    if got["kind"] != entry["kind"]:
        expected = "nn.Conv2d" if entry["kind"] == "conv2d" else "nn.Linear"
        raise _fit_error(name, "a layer of type", expected, type(layer).__name__)
    keys = ["bias"]
    keys += (
        ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"]
        if entry["kind"] == "conv2d"
        else ["in_features", "out_features"]
    )
    for key in keys:
        expected = entry.get(key)
        if isinstance(expected, tuple):
            expected = list(expected)
        if expected != got[key]:
            raise _fit_error(name, key, expected, got[key])
    if got.get("groups", 1) != 1:
        raise _fit_error(name, "groups", 1, got["groups"])
    ranks = tuple(entry["ranks"])
    reference = next(iter(layer.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    # The model's dtype wins, as in load_state_dict (which casts into it).
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    if entry["kind"] == "conv2d":
        module: TuckerConv2d | TuckerLinear = TuckerConv2d(
            entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"]), ranks,
            stride=tuple(entry["stride"]), padding=entry["padding"] if isinstance(entry["padding"], str)
            else tuple(entry["padding"]), dilation=tuple(entry["dilation"]), bias=entry["bias"],
            padding_mode=entry["padding_mode"], device="meta", dtype=dtype,
        )  # fmt: skip
    else:
        module = TuckerLinear(
            entry["in_features"], entry["out_features"], ranks, bias=entry["bias"], device="meta", dtype=dtype
        )
    # to_empty: no random init for weights the state_dict overwrites anyway.
    module = module.to_empty(device=device)
    module.backend = entry.get("backend")
    module.reconstruction_error = entry.get("reconstruction_error")
    module.requires_grad_(all(p.requires_grad for p in layer.parameters()))
    module.train(layer.training)
    return module


def apply_compression_plan(model: nn.Module, plan: list[Mapping[str, Any]]) -> nn.Module:
    """Replace, in place, each layer named in ``plan`` by a Tucker module of the planned ranks.

    Only the structure changes: the new modules' weights are uninitialised until a
    state_dict is loaded. A planned layer may be the dense layer (``nn.Conv2d`` /
    ``nn.Linear``) or already a Tucker module of the same options, which is
    rebuilt with the planned ranks. Every slot holding a planned module gets the
    replacement, so shared layers stay shared.

    Returns ``model``, or the replacement when the plan names ``""`` (the model is
    itself one layer). Raises :class:`CheckpointError` naming the layer when a
    planned layer is missing or its options differ from the plan.
    """
    if not isinstance(plan, (list, tuple)):
        raise CheckpointError(f"the compression plan must be a list of layer entries, but got {type(plan).__name__}")
    for entry in plan:
        _check_entry(entry)
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, attr))
    built: dict[int, nn.Module] = {}
    for entry in plan:
        name = entry["name"]
        try:
            layer = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(
                f"the compression plan does not fit the model: it names layer {name!r}, which the model "
                f"({type(model).__name__}) does not have ({e})"
            ) from e
        if id(layer) in built:  # shared module, already replaced through another name
            continue
        replacement = _build(entry, layer)
        built[id(layer)] = replacement
        if name == "":
            model = replacement
        for parent, attr in slots.get(id(layer), []):
            setattr(parent, attr, replacement)
    return model


def _fused_pools(model: nn.Module) -> dict[str, int]:
    return {name: m.pool for name, m in model.named_modules() if isinstance(m, TuckerConv2dReLUPool)}


def _refuse_epilogues(model: nn.Module, plan: list[Mapping[str, Any]]) -> nn.Module:
    """``model`` with the epilogues fused again where the plan records them.

    ``fuse_epilogues`` traces the whole model or, where fx cannot trace it (a user
    then fuses a traceable submodule, as its error message advises), the outermost
    traceable module around each recorded layer. A layer whose pattern is not found
    stays unfused (same results, without the fused kernel's speed), with a warning.
    """
    wanted = {entry["name"]: entry["epilogue_pool"] for entry in plan if entry.get("epilogue_pool")}
    if not wanted:
        return model
    if "" in wanted:  # the model is the fused layer itself: nothing for fx to match
        return TuckerConv2dReLUPool.from_tucker(model, wanted[""])
    try:
        model = fuse_epilogues(model)
    except TypeError:
        for name in sorted(wanted):
            if _fused_pools(model).get(name) == wanted[name]:
                continue
            ancestors = name.split(".")[:-1]
            for depth in range(1, len(ancestors) + 1):
                scope = ".".join(ancestors[:depth])
                try:
                    fused = fuse_epilogues(model.get_submodule(scope))
                except TypeError:
                    continue
                parent, _, attr = scope.rpartition(".")
                setattr(model.get_submodule(parent), attr, fused)
                break
    got = _fused_pools(model)
    missing = sorted(name for name, pool in wanted.items() if got.get(name) != pool)
    if missing:
        warnings.warn(
            f"tucker_ops.load: layers {missing} were saved fused with their ReLU / average-pool epilogue, but "
            "fuse_epilogues does not find that pattern in the loaded model; they load unfused (same results, "
            "without the fused kernel's speed)",
            RuntimeWarning,
            stacklevel=3,
        )
    return model


# -- save / load ----------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s state_dict and compression plan to ``path``, atomically.

    The file is first written to a temporary file in the same directory, flushed
    and fsynced, then renamed over ``path`` (``os.replace``), so a crash or an
    error at any point leaves the previous file, if any, untouched. Only plain
    data is stored: ``torch.load(path, weights_only=True)`` reads it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tucker_ops.save: model must be an nn.Module, but got {type(model).__name__}")
    from . import __version__

    payload = {
        "format": _FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "tucker_ops_version": __version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "plan": compression_plan(model),
        "state_dict": dict(model.state_dict()),
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never reuse someone else's file; 0o666 lets the umask decide, as for open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _read(path: PathLike, map_location: Any) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tucker_ops.load: no checkpoint file at {path!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, io.UnsupportedOperation) as e:
        raise CheckpointError(
            f"tucker_ops.load: {path!r} is not a readable checkpoint (truncated or corrupted?): {e}"
        ) from e
    if not isinstance(payload, Mapping) or payload.get("format") != _FORMAT:
        raise CheckpointError(
            f"tucker_ops.load: {path!r} is not a tucker_ops checkpoint (no 'format': {_FORMAT!r} header); "
            "a plain state_dict loads with torch.load and model.load_state_dict"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"tucker_ops.load: {path!r} has an invalid format_version {version!r}")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"tucker_ops.load: {path!r} was written by a newer tucker_ops (checkpoint format version {version}, "
            f"written by tucker_ops {payload.get('tucker_ops_version', '?')}); this version reads format versions "
            f"up to {CHECKPOINT_FORMAT_VERSION}. Upgrade tucker_ops to load it."
        )
    for key, kind in (("plan", list), ("state_dict", Mapping)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"tucker_ops.load: {path!r} has no valid {key!r} (got {type(payload.get(key)).__name__})")
    return payload


def load(
    path: PathLike,
    model_factory: ModelFactory | nn.Module | None = None,
    *,
    map_location: Any = None,
    strict: bool = True,
) -> nn.Module | Checkpoint:
    """Read a checkpoint written by :func:`save`.

    Args:
        path: the checkpoint file.
        model_factory: a callable returning a fresh model of the original (dense)
            architecture, or such a model itself (changed in place). Its planned
            layers are replaced by Tucker modules of the saved ranks, the
            state_dict is loaded and fused epilogues are fused again (see
            :meth:`Checkpoint.restore`). None returns the file's :class:`Checkpoint`
            (plan and state_dict) instead, for :meth:`Checkpoint.restore` later.
        map_location: as ``torch.load``.
        strict: as ``nn.Module.load_state_dict``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError (a ValueError): the file is truncated or corrupted, is not a
            tucker_ops checkpoint, was written by a newer format version, or its plan
            or state_dict does not fit the model.
    """
    payload = _read(path, map_location)
    metadata = {k: v for k, v in payload.items() if k not in ("plan", "state_dict", "format", "format_version")}
    checkpoint = Checkpoint(
        plan=list(payload["plan"]),
        state_dict=dict(payload["state_dict"]),
        format_version=payload["format_version"],
        metadata=metadata,
    )
    if model_factory is None:
        return checkpoint
    return checkpoint.restore(model_factory, strict=strict)
