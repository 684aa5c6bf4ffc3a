"""Fusing ``TuckerConv2d → ReLU → average pool`` into one ``tucker_conv2d_relu_pool`` call.

:class:`TuckerConv2dReLUPool` is a ``TuckerConv2d`` whose forward also applies the
ReLU and the pooling, inside the op (see ``_epilogue_op``): the full-size conv output
is never written out. :func:`fuse_epilogues` finds the pattern in a model with
torch.fx and swaps the conv for such a module under the same name, so the model's
``state_dict`` does not change::

    model, _ = tucker_ops.compress(ThesisNet(), ranks=tucker_ops.thesis_ranks())
    fast = fuse_epilogues(model)   # conv1, conv2 now TuckerConv2dReLUPool(pool=2)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._epilogue_op import tucker_conv2d_relu_pool
from .modules import TuckerConv2d, TuckerLinear

__all__ = ["TuckerConv2dReLUPool", "fuse_epilogues"]


def _check_pool(pool: Any, what: str) -> int:
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(
            f"{what}: pool must be an int >= 1 (window and stride of the average pool; 1 means ReLU only), got {pool!r}"
        )
    return pool


class TuckerConv2dReLUPool(TuckerConv2d):
    """``avg_pool2d(relu(TuckerConv2d(x)), pool, pool)`` as one call of ``tucker_conv2d_relu_pool``.

    Build it from an existing conv with :meth:`from_tucker` (shares its Parameters),
    or like ``TuckerConv2d`` with an extra keyword ``pool``. Parameters, buffers and
    ``state_dict`` keys are exactly those of ``TuckerConv2d``.

    Attributes:
        pool: window and stride of the average pool (floor mode, no padding); 1 means
            ReLU only.

    Shapes: input ``(N, C_in, H, W)`` or ``(C_in, H, W)`` -> output
    ``(N, C_out, H_out // pool, W_out // pool)`` (or without ``N``), where
    ``H_out``, ``W_out`` are the conv's (:meth:`output_size`). ``macs`` and
    ``output_size`` describe the conv alone, as for ``TuckerConv2d``.
    """

    pool: int

    def __init__(self, *args: Any, pool: int = 1, **kwargs: Any) -> None:
        # pool defaults to 1 so that the inherited constructors (from_conv,
        # from_sequential), which call cls(...) without it, still work.
        super().__init__(*args, **kwargs)
        self.pool = _check_pool(pool, "TuckerConv2dReLUPool")

    @classmethod
    def from_tucker(cls, conv: TuckerConv2d, pool: int) -> TuckerConv2dReLUPool:
        """A ``TuckerConv2dReLUPool`` that shares ``conv``'s Parameter objects (no copies).

        A one-level copy of ``conv``: its attribute dicts (parameters, buffers,
        hooks) are new dicts holding the same tensors, so registering a new
        parameter on one module later does not change the other, while training
        either updates both. ``conv`` itself is left as it is.

        Raises:
            TypeError when ``conv`` is not a ``TuckerConv2d`` or is already fused;
            ValueError when ``pool`` is not an int >= 1.
        """
        what = "TuckerConv2dReLUPool.from_tucker"
        if not isinstance(conv, TuckerConv2d) or isinstance(conv, TuckerConv2dReLUPool):
            raise TypeError(f"{what}: conv must be a TuckerConv2d that is not fused already, got {type(conv).__name__}")
        pool = _check_pool(pool, what)
        fused = cls.__new__(cls)
        # copy.copy would share the _parameters/_modules/... dicts themselves between
        # the two modules; copying each container one level keeps them independent.
        fused.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in conv.__dict__.items()})
        fused.pool = pool
        return fused

    def _run_op(self, x: Tensor) -> Tensor:
        # TuckerConv2d.forward does the padding and unbatched handling; only the op differs.
        return tucker_conv2d_relu_pool(
            x, self.first, self.core, self.last, self.bias,
            self.stride, self._op_padding, self.dilation, self.pool, backend=self.backend,
        )  # fmt: skip

    def to_sequential(self) -> nn.Sequential:
        """The unfused chain ``[Conv2d..., ReLU, AvgPool2d(pool)]`` (no pool layer when ``pool == 1``).

        Appending the epilogue keeps ``to_sequential_model`` exact on fused models.
        """
        layers = [*super().to_sequential(), nn.ReLU()]
        if self.pool > 1:
            layers.append(nn.AvgPool2d(self.pool))
        seq = nn.Sequential(*layers)
        seq.train(self.training)
        return seq

    def to_dense(self) -> nn.Conv2d:
        """Not available: one ``nn.Conv2d`` cannot hold the ReLU and the pool (raises TypeError)."""
        # Returning the bare conv would silently drop the epilogue from a model.
        raise TypeError(
            "TuckerConv2dReLUPool.to_dense: a dense nn.Conv2d cannot hold the ReLU + average-pool epilogue; "
            "use to_sequential() (conv chain, ReLU, AvgPool2d), or to_dense() of the unfused TuckerConv2d"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool={self.pool}"


# -- the fx pass ------------------------------------------------------------------

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
# Parameter order of F.avg_pool2d, to read positional and keyword arguments alike.
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


class _TuckerLeafTracer(fx.Tracer):
    """Records Tucker layers as single call_module nodes.

    The default tracer only keeps ``torch.nn`` modules whole and would trace into
    ``TuckerConv2d.forward``, whose unbatched-input branch fx cannot trace.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (TuckerConv2d, TuckerLinear)) or super().is_leaf_module(m, module_qualified_name)


def _has_hooks(module: nn.Module) -> bool:
    # A hook would see the fused output (or never run): leave such layers unfused.
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` reads ``source`` as its first argument and nowhere else."""
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first is source and len(source.users) == 1 and list(node.all_input_nodes) == [source]


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    module = _module(gm, node)
    return type(module) is nn.ReLU and not _has_hooks(module)


def _square_window(value: Any) -> int | None:
    """``k`` for ``k`` or ``(k, k)`` with ``k >= 1``, else None."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def _pool_window(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """``k`` when ``node`` is an average pool the op's epilogue computes exactly, else None.

    That is a square window ``k``, stride ``k``, no padding (so count_include_pad
    does not matter), floor mode and the default divisor.
    """
    if node.op == "call_function" and node.target is F.avg_pool2d:
        options = dict(zip(_AVG_POOL_ARGS, node.args))
        if len(node.args) > len(_AVG_POOL_ARGS) or any(k not in _AVG_POOL_ARGS for k in node.kwargs):
            return None
        options.update(node.kwargs)
        kernel, stride = options.get("kernel_size"), options.get("stride")
        padding, ceil_mode = options.get("padding", 0), options.get("ceil_mode", False)
        divisor = options.get("divisor_override")
    elif node.op == "call_module" and type(module := _module(gm, node)) is nn.AvgPool2d and not _has_hooks(module):
        kernel, stride, padding = module.kernel_size, module.stride, module.padding
        ceil_mode, divisor = module.ceil_mode, module.divisor_override
    else:
        return None
    k = _square_window(kernel)
    if k is None or (stride is not None and _square_window(stride) != k):
        return None
    if padding not in (0, (0, 0), [0, 0]) or ceil_mode is not False or divisor is not None:
        return None
    return k


def _fusable_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = _module(gm, node)
    # Exactly TuckerConv2d's computation: a subclass that overrides its forward or
    # its op call (the fused module among them) computes something else.
    return (
        isinstance(module, TuckerConv2d)
        and type(module).forward is TuckerConv2d.forward
        and type(module)._run_op is TuckerConv2d._run_op
        and not _has_hooks(module)
    )


def _match(gm: fx.GraphModule, conv: fx.Node) -> tuple[int, list[fx.Node]] | None:
    """``(pool, [relu, pool?])`` when ``conv`` starts the pattern, else None."""
    if not _fusable_conv(gm, conv) or len(conv.users) != 1:
        return None
    relu = next(iter(conv.users))
    if not _is_relu(gm, relu) or not _only_input(relu, conv):
        return None
    if len(relu.users) == 1:
        pool = next(iter(relu.users))
        k = _pool_window(gm, pool)
        if k is not None and _only_input(pool, relu):
            return k, [relu, pool]
    return 1, [relu]


def fuse_epilogues(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with torch.fx and fuse every ``TuckerConv2d → ReLU → average pool``.

    Each match becomes one call of a :class:`TuckerConv2dReLUPool` installed under
    the conv's own name; the relu and pool nodes go. Matched:

    - the conv: a ``TuckerConv2d`` submodule (not a subclass overriding ``forward``),
      whose output feeds the ReLU and nothing else;
    - the ReLU: ``F.relu`` / ``torch.relu`` (inplace or not), ``x.relu()`` /
      ``x.relu_()`` or an ``nn.ReLU`` module;
    - the pool, when the ReLU feeds only it: ``nn.AvgPool2d`` or ``F.avg_pool2d``
      with a square window ``k``, stride ``k`` (or None), padding 0,
      ``ceil_mode=False`` and no ``divisor_override``. Otherwise conv + ReLU still
      fuse, with ``pool=1``.

    A conv called more than once is fused only when every call matches with the
    same pool (they share one module). Layers with forward/backward hooks (the
    conv, an ``nn.ReLU`` or ``nn.AvgPool2d``) are left alone, since their hooks
    would no longer see the tensors they saw before.

    Args:
        model: any ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace
            (Tucker layers are kept whole). ``model`` itself is not modified.

    Returns:
        A ``torch.fx.GraphModule`` computing the same function (float rounding
        aside). It shares ``model``'s parameters and its unfused submodules (no
        copies: training one trains the other; ``.train()`` / ``.eval()`` on it also
        reach the shared submodules); each fused layer is a new module holding the
        conv's own Parameter objects. ``state_dict()`` keys stay those of ``model``
        as long as fx kept every stateful submodule (it drops submodules that the
        forward never uses).

    Raises:
        TypeError when ``model`` is not an ``nn.Module`` or fx cannot trace it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_epilogues: model must be an nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    tracer = _TuckerLeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ... depending on the construct
        raise TypeError(
            f"fuse_epilogues: torch.fx cannot trace {name} ({type(e).__name__}: {e}). fx runs forward once on "
            "proxies, so Python control flow that depends on tensor values or shapes is not supported. Make that "
            "part traceable (torch.where instead of if on a tensor, for example), or fuse a traceable submodule "
            "and put the result back: model.features = fuse_epilogues(model.features)"
        ) from e
    gm = fx.GraphModule(tracer.root, graph, name)

    # Group the matches by module: one module object serves all calls of its name.
    matches: dict[str, list[tuple[fx.Node, int, list[fx.Node]]] | None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(_module(gm, node), TuckerConv2d):
            continue
        match = _match(gm, node)
        if match is None:
            matches[node.target] = None
        elif matches.setdefault(node.target, []) is not None:
            matches[node.target].append((node, *match))

    removed_modules: set[str] = set()
    for target, calls in matches.items():
        if not calls or len({pool for _, pool, _ in calls}) != 1:
            continue
        # setattr on the parent, not Module.set_submodule: that needs torch >= 2.5.
        parent, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(parent), attr, TuckerConv2dReLUPool.from_tucker(gm.get_submodule(target), calls[0][1]))
        for conv, _, epilogue in calls:
            epilogue[-1].replace_all_uses_with(conv)
            for node in reversed(epilogue):
                if node.op == "call_module":
                    removed_modules.add(node.target)
                gm.graph.erase_node(node)

    # Drop the ReLU / AvgPool2d modules no node calls any more (they hold no state).
    still_used = {node.target for node in gm.graph.nodes if node.op in ("call_module", "get_attr")}
    for target in sorted(removed_modules - still_used):
        gm.delete_submodule(target)
    gm.graph.lint()
    gm.recompile()
    return gm
