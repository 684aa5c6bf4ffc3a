"""Models and ranks named on a command line: a saved module, or ``module:factory`` plus a state_dict.

Used by ``tucker-ops compress`` and ``tucker-ops bench``. Every failure raises
:class:`ModelSpecError` naming what was given and what was expected.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelSpecError", "load_model", "parse_input_shape", "parse_ranks", "save_model"]

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ModelSpecError(ValueError):
    """A model or rank given on the command line that cannot be used; the message says why."""


def load_model(spec: str, state_dict: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load a model from ``spec``.

    Args:
        spec: a checkpoint written by ``tucker_ops.save`` (its model class is
            imported and built without arguments, then the plan and weights are
            applied), a file written by ``torch.save(module)``, or
            ``package.module:factory`` naming a callable that returns an ``nn.Module``
            when called without arguments (a class works).
        state_dict: a ``tucker_ops.save`` checkpoint or a plain ``state_dict`` file,
            loaded (strictly) into the model that ``spec`` makes.

    A ``torch.save(module)`` file is unpickled with ``weights_only=False``: only load
    files you trust. Checkpoints and state_dicts are read with ``weights_only=True``.
    """
    path = Path(spec)
    if path.is_file():
        if state_dict is not None:
            raise ModelSpecError(f"--state-dict: applies to a 'package.module:factory' model, not to the file {spec!r}")
        return _load_file(path)
    if _FACTORY.match(spec):
        model = _from_factory(spec)
        if state_dict is not None:
            model = _load_state(model, Path(state_dict))
        return model
    if path.suffix or os.sep in spec:
        raise ModelSpecError(f"model: file {spec!r} not found (expected a saved model file, or package.module:factory)")
    raise ModelSpecError(f"model: expected a saved model file or a 'package.module:factory' spec, but got {spec!r}")


def _checkpoint(path: Path) -> Any:
    """The file's ``tucker_ops.serialization.Checkpoint``, or None when it is not a checkpoint."""
    from .serialization import CheckpointError, load

    try:
        return load(path)
    except CheckpointError:
        return None


def _load_file(path: Path) -> nn.Module:
    checkpoint = _checkpoint(path)
    if checkpoint is not None:
        class_path = str(checkpoint.metadata.get("model_class", ""))
        module_name, _, attr = class_path.rpartition(".")
        hint = "give the architecture as 'package.module:factory' and this file as --state-dict"
        if not module_name or module_name == "__main__":
            raise ModelSpecError(f"model: {str(path)!r} is a tucker_ops checkpoint of class {class_path!r}, which cannot be imported; {hint}")
        try:
            model = _from_factory(f"{module_name}:{attr}")
        except ModelSpecError as err:
            raise ModelSpecError(f"{err}; {str(path)!r} is a tucker_ops checkpoint: {hint}") from None
        return _restore(checkpoint, model, path, "model")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad input file here
        raise ModelSpecError(f"model: cannot read {str(path)!r} as a saved model ({type(err).__name__}: {err})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelSpecError(
            f"model: {str(path)!r} holds a state_dict, not a module; give the architecture as 'package.module:factory' "
            f"and this file as --state-dict"
        )
    raise ModelSpecError(f"model: expected {str(path)!r} to hold an nn.Module, but it holds a {type(obj).__name__}")


def _restore(checkpoint: Any, model: nn.Module, path: Path, what: str) -> nn.Module:
    from .serialization import CheckpointError

    try:
        return checkpoint.restore(model)
    except (CheckpointError, ValueError, TypeError) as err:
        raise ModelSpecError(f"{what}: checkpoint {str(path)!r} does not fit the model: {err}") from None


def _from_factory(spec: str) -> nn.Module:
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(f"model: cannot import module {module_name!r} of {spec!r} ({err})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"model: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"model: expected {spec!r} to be a callable returning an nn.Module, but it is a {type(target).__name__}")
    try:
        model = target()
    except TypeError as err:
        raise ModelSpecError(f"model: calling {spec!r} with no arguments failed ({err})") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model: expected {spec!r}() to return an nn.Module, but got a {type(model).__name__}")
    return model


def _load_state(model: nn.Module, path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelSpecError(f"--state-dict: file {str(path)!r} not found")
    checkpoint = _checkpoint(path)
    if checkpoint is not None:
        return _restore(checkpoint, model, path, "--state-dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelSpecError(f"--state-dict: cannot read {str(path)!r} as a state_dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise ModelSpecError(f"--state-dict: expected {str(path)!r} to hold a dict of tensors, but it holds a {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelSpecError(f"--state-dict: {str(path)!r} does not fit the model: {err}") from None
    return model


def save_model(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model`` with ``tucker_ops.save`` (plan + state_dict, atomically; no pickled classes)."""
    from .serialization import save

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save(model, path)


def parse_ranks(text: str) -> Any:
    """A rank spec from the command line.

    ``8`` -> 8 (explicit (8, 8)); ``8,4`` or ``none,30`` -> (8, 4) / (None, 30);
    ``0.3`` -> 0.3 (keep 30% of parameters); ``thesis`` -> the thesis's per-layer ranks;
    a JSON object ``{"conv2": [8, 4], "l2": [null, 30]}``, or ``@file.json`` holding one,
    -> per-layer ranks.
    """
    text = text.strip()
    if text == "thesis":
        from .models import thesis_ranks

        return thesis_ranks()
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ModelSpecError(f"--ranks: file {str(path)!r} not found")
        text = path.read_text()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelSpecError(f"--ranks: invalid JSON ({err})") from None
        return {str(name): _one_rank(value, f"--ranks[{name!r}]") for name, value in raw.items()}
    if "," in text:
        parts = [p.strip().lower() for p in text.split(",")]
        if len(parts) != 2:
            raise ModelSpecError(f"--ranks: expected two ranks 'r_in,r_out', but got {text!r}")
        return tuple(_side(p, text) for p in parts)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ModelSpecError(
            f"--ranks: expected an int, 'r_in,r_out', a fraction in (0, 1], 'thesis', a JSON object or @file.json, but got {text!r}"
        ) from None
    if not 0 < value <= 1:
        raise ModelSpecError(f"--ranks: a fraction of parameters must be in (0, 1], but got {value}")
    return value


def _side(part: str, text: str) -> int | None:
    if part in ("none", "-", ""):
        return None
    try:
        value = int(part)
    except ValueError:
        raise ModelSpecError(f"--ranks: expected integers or 'none' in 'r_in,r_out', but got {text!r}") from None
    if value < 1:
        raise ModelSpecError(f"--ranks: expected ranks >= 1, but got {text!r}")
    return value


def _one_rank(value: Any, where: str) -> Any:
    if isinstance(value, bool):
        raise ModelSpecError(f"{where}: expected an int, [r_in, r_out] or a fraction, but got {value!r}")
    if isinstance(value, (int, float)) or value is None:
        return value
    if isinstance(value, list) and len(value) == 2 and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        return tuple(value)
    raise ModelSpecError(f"{where}: expected an int, [r_in, r_out] or a fraction, but got {value!r}")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` or ``"1x28x28"`` -> (1, 28, 28): one example's shape, without the batch."""
    parts = re.split(r"[,x]", text.strip())
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelSpecError(f"--input-shape: expected sizes like '1,28,28' (one example, no batch), but got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ModelSpecError(f"--input-shape: expected positive sizes, but got {text!r}")
    return shape
