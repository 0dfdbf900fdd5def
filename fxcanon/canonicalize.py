"""The front door: ``canonicalize(model)``."""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Tracer

from . import modules
from .errors import CanonizationError
from .folders import ModuleFolder
from .inventory import record_unread
from .passes import DEFAULT_PASSES, CanonizationPass, ordered
from .report import REPORT_KEY, Report
from .rewrite import regenerate
from .shapes import record_shapes


_MAX_ROUNDS = 8

try:  # generates code only when asked: the working copy's code would be regenerated unused
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover
    _LazyGraphModule = GraphModule  # type: ignore[misc,assignment]
_WORKING: type[GraphModule] = _LazyGraphModule


def run_passes(gm: GraphModule, passes: Sequence[CanonizationPass], max_rounds: int = _MAX_ROUNDS) -> GraphModule:
    """Run ``passes`` in order, again while any of them changes the graph (a fold can enable another).

    Like ``torch.fx.passes.infra.PassManager`` with ``steps``, but regenerating code once, after
    the last pass, rather than after every pass (codegen dominated canonicalization time that way).
    """
    if _run(gm, passes, max_rounds):
        regenerate(gm)
    return gm


@torch.no_grad()
def _run(gm: GraphModule, passes: Sequence[CanonizationPass], max_rounds: int) -> bool:
    """Edit ``gm``'s graph with ``passes`` until none changes it; True if any did. Without autograd:
    fused tensors keep no link to the caller's parameters, and no op on them records one."""
    changed = False
    for _ in range(max_rounds):
        modified = False
        for canon_pass, after in zip(passes, [*passes[1:], *passes[:1]]):
            result = canon_pass.sweep(gm)
            if after.folder is not canon_pass.folder:  # what the next pass reads is computed
                canon_pass.folder.flush(gm)
            modified = modified or result.modified
        changed = changed or modified
        if not modified:
            break
    for canon_pass in passes:
        canon_pass.folder.flush(gm)
    return changed


class _Tracer(Tracer):
    """torch.fx's tracer, keeping fxcanon's own modules (fused layers, Sum, Gate...) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__ == modules.__name__ or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, graph_module_cls: type[GraphModule] = GraphModule) -> GraphModule:
    """``symbolic_trace(model)`` (fxcanon's modules stay leaves), with a CanonizationError that
    says what to do if it fails."""
    if isinstance(model, GraphModule):
        return model
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return graph_module_cls(tracer.root, graph, type(model).__name__)
    except Exception as error:
        raise CanonizationError(
            f"could not trace {type(model).__name__} with torch.fx.symbolic_trace ({type(error).__name__}: "
            f"{error}); trace it yourself (concrete_args, a custom Tracer, leaf modules) and pass the GraphModule"
        ) from error


def _copied(value: Any) -> Any:
    """Example inputs as copies: a model that changes its input in place must not change the caller's."""
    return value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)


_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None))
_TENSOR_DICTS = ("_parameters", "_buffers")


def _immutable(value: Any) -> bool:
    return isinstance(value, _IMMUTABLE) or (type(value) is tuple and all(map(_immutable, value)))


@functools.lru_cache(maxsize=256)  # bounded: graph modules make a class per instance
def _own_copy_protocol(cls: type) -> bool:
    return any(name in vars(base) for base in cls.__mro__ if base not in (nn.Module, object)
               for name in ("__deepcopy__", "__getstate__", "__reduce_ex__", "__reduce__"))


def _copy_plain(module: nn.Module, memo: dict[int, Any]) -> nn.Module | None:
    """``copy.deepcopy(module, memo)`` for a module that holds nothing but tensors, immutable values
    and flat collections of them (ReLU, pooling, a Conv2d: no children, no hooks, no copy protocol
    of its own), without deepcopy's generic walk; None for any other module."""
    if _own_copy_protocol(type(module)):  # type: ignore[arg-type]  # classes hash
        return None
    state: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key in _TENSOR_DICTS and type(value) is dict:
            state[key] = {name: copy.deepcopy(tensor, memo) for name, tensor in value.items()}
        elif type(value) in (list, set, dict, OrderedDict) and all(map(_immutable, value)) and \
                (type(value) not in (dict, OrderedDict) or not value):  # dicts: hooks, children
            state[key] = type(value)(value)
        elif not _immutable(value):
            return None
    new = copy.copy(module)
    new.__dict__.update(state)
    memo[id(module)] = new
    return new


def _unshare(gm: GraphModule, caller: nn.Module) -> None:
    """Replace every module and tensor ``gm`` still shares with the caller's model by a copy
    (one copy per shared object, so modules used twice stay one module)."""
    owned: set[int] = set()
    walk = [caller]
    while walk:  # caller.modules(), parameters() and buffers(), without their generators' overhead
        module = walk.pop()
        if id(module) not in owned:
            owned.add(id(module))
            owned.update(id(t) for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
            walk.extend(child for child in module._modules.values() if child is not None)
    memo: dict[int, Any] = {}
    pending: list[nn.Module] = [gm]  # gm's own modules: the copies made here and the fused ones share nothing
    while pending:
        module = pending.pop()
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and id(tensor) in owned:
                setattr(module, attr, copy.deepcopy(tensor, memo))
        for child_name, child in list(module.named_children()):
            if id(child) in owned:
                copied = memo[id(child)] if id(child) in memo else _copy_plain(child, memo)
                setattr(module, child_name, copy.deepcopy(child, memo) if copied is None else copied)
            else:
                pending.append(child)


def canonicalize(
    model: nn.Module,
    example_inputs: Sequence[Any] | Tensor | None = None,
    *,
    passes: Sequence[type[CanonizationPass] | CanonizationPass] | None = None,
    allow_training: bool = False,
    prefer: str = "forward",
    preset: str | None = None,
) -> GraphModule:
    """Return a new GraphModule computing the same function with foldable BatchNorms merged.

    ``model`` is a GraphModule or a module to trace; it is never mutated. ``example_inputs``
    (optional) are the inputs at which shapes are recorded, to fold through layout ops (view,
    permute, cat, pooling...) and to prove the channel axis of BatchNorm1d/functional BatchNorms;
    a model that defines ``example_inputs()`` (like :class:`fxcanon.models.RelationNetwork`)
    provides them itself; without them, inputs are made from the graph when a BatchNorm needs
    shapes (``fxcanon.shapes``). ``passes`` selects pass classes
    (or instances) to run instead of :data:`fxcanon.passes.DEFAULT_PASSES`. BatchNorms in training
    mode raise CanonizationError unless ``allow_training`` leaves them untouched. The report is
    ``get_report(result)``.

    Where a BatchNorm can fold either way (``conv1 -> norm -> relu -> conv2``), ``prefer="forward"``
    (default: fastest, vector biases) folds it into ``conv1``, ``prefer="threshold"`` through the ReLU
    into ``conv2``; ``preset="paper"`` chooses as Pahde et al.'s canonizers do (see
    :func:`fxcanon.passes.ordered`).
    """
    own_inputs = getattr(model, "example_inputs", None)
    if example_inputs is None and callable(own_inputs):
        example_inputs = own_inputs()
    if isinstance(model, GraphModule):  # work on a copy: new containers, new graph, same leaf modules
        gm: GraphModule = _WORKING(model, copy.deepcopy(model.graph), class_name=type(model).__name__)
    else:
        gm = trace(model, _WORKING)
    if example_inputs is not None:
        inputs = tuple(_copied(x) for x in ((example_inputs,) if isinstance(example_inputs, Tensor)
                                            else example_inputs))
        record_shapes(gm, inputs)  # puts back the statistics a training-mode BatchNorm moves
    report = Report()
    folder = ModuleFolder()  # one for all passes: each BatchNorm's affine map computed once
    selected = [p(report, allow_training=allow_training, folder=folder) if isinstance(p, type) else p
                for p in ordered(DEFAULT_PASSES if passes is None else passes, prefer, preset, gm)]
    if _run(gm, selected, _MAX_ROUNDS):
        gm.graph.lint()
    out = GraphModule(gm, gm.graph, class_name=type(gm).__name__)  # the modules the graph uses, its code
    out.meta = gm.meta
    record_unread(out, report)
    _unshare(out, model)
    out.meta[REPORT_KEY] = report
    return out
