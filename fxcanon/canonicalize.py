"""The front door: ``canonicalize(model)``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Tracer
from torch.fx.passes.shape_prop import ShapeProp

from . import modules
from .affine import PROBE_KEY, VALUE_KEY
from .errors import CanonizationError
from .inventory import record_unread
from .passes import DEFAULT_PASSES, CanonizationPass, ordered
from .report import REPORT_KEY, Report
from .rewrite import regenerate


_MAX_ROUNDS = 8


def run_passes(gm: GraphModule, passes: Sequence[CanonizationPass], max_rounds: int = _MAX_ROUNDS) -> GraphModule:
    """Run ``passes`` in order, again while any of them changes the graph (a fold can enable another).

    Like ``torch.fx.passes.infra.PassManager`` with ``steps``, but regenerating code once, after
    the last pass, rather than after every pass (codegen dominated canonicalization time that way).
    """
    changed = False
    for _ in range(max_rounds):
        modified = False
        for canon_pass in passes:
            result = canon_pass.run(gm)
            gm, modified = result.graph_module, modified or result.modified
        changed = changed or modified
        if not modified:
            break
    if changed:
        regenerate(gm)
    return gm


class _ShapeRecorder(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (sizes, ints) for the affine analysis."""

    def run_node(self, n: Any) -> Any:
        result = super().run_node(n)
        if isinstance(result, (int, float, bool, torch.Size)) or (
                isinstance(result, (tuple, list)) and all(isinstance(r, (int, float, bool)) for r in result)):
            n.meta[VALUE_KEY] = result
        return result


class _Tracer(Tracer):
    """torch.fx's tracer, keeping fxcanon's own modules (fused layers, Sum, Gate...) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__ == modules.__name__ or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> GraphModule:
    """``symbolic_trace(model)`` (fxcanon's modules stay leaves), with a CanonizationError that
    says what to do if it fails."""
    if isinstance(model, GraphModule):
        return model
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:
        raise CanonizationError(
            f"could not trace {type(model).__name__} with torch.fx.symbolic_trace ({type(error).__name__}: "
            f"{error}); trace it yourself (concrete_args, a custom Tracer, leaf modules) and pass the GraphModule"
        ) from error


def record_shapes(gm: GraphModule, example_inputs: Sequence[Any]) -> None:
    """Annotate every node with its shape (``tensor_meta``) by running ``gm`` once without grad."""
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).propagate(*example_inputs)
    except Exception as error:
        raise CanonizationError(f"running the model on example_inputs failed: {error}") from error


class _SizeProbe(torch.fx.Interpreter):
    """Records every node's shape (tensors) or value (the rest) for one more input size."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.records: dict[Any, tuple[Any, Any]] = {}

    def run_node(self, n: Any) -> Any:
        result = super().run_node(n)
        self.records[n] = (tuple(result.shape), None) if isinstance(result, Tensor) else (None, result)
        return result


def _grown(x: Any, batch: int, spatial: Callable[[int], int]) -> Any:
    """``x`` with ``batch`` more rows and spatial sizes ``spatial(size)`` (slices repeated cyclically)."""
    if not isinstance(x, Tensor) or x.dim() == 0:
        return x
    for dim, size in [(0, x.shape[0] + batch), *((d, spatial(x.shape[d])) for d in range(2, x.dim()))]:
        if size != x.shape[dim]:
            index = torch.arange(size, device=x.device) % x.shape[dim]
            x = x.index_select(dim, index)
    return x


# Other input sizes tried in order until the model accepts one; the last varies the batch only.
_PROBES: tuple[tuple[int, Callable[[int], int]], ...] = (
    (1, lambda n: n + 1), (2, lambda n: n + 2), (1, lambda n: 2 * n), (1, lambda n: n),
)


def probe_sizes(gm: GraphModule, example_inputs: Sequence[Any]) -> int:
    """Run ``gm`` once more at another batch and spatial size (the first of ``_PROBES`` the model
    accepts), recording sizes.

    Folds through layout ops then have to map features the same way at both sizes, and dimensions
    the probe did not vary are guarded at call time (``fxcanon.guards``). Returns how many ran (0, 1).
    """
    records: list[dict[Any, tuple[Any, Any]]] = []
    for batch, spatial in _PROBES:
        probe = _SizeProbe(gm)
        try:
            with torch.no_grad():
                probe.run(*(_grown(x, batch, spatial) for x in example_inputs))
        except Exception:  # the model does not accept this size
            continue
        records.append(probe.records)
        break
    for node in gm.graph.nodes:
        if records:
            node.meta[PROBE_KEY] = tuple(r[node] for r in records)
        else:
            node.meta.pop(PROBE_KEY, None)
    return len(records)


def _copied(value: Any) -> Any:
    """Example inputs as copies: a model that changes its input in place must not change the caller's."""
    return value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)


def _unshare(gm: GraphModule, caller: nn.Module) -> None:
    """Replace every module and tensor ``gm`` still shares with the caller's model by a copy
    (one copy per shared object, so modules used twice stay one module)."""
    owned = {id(m) for m in caller.modules()} | {id(t) for t in caller.parameters()} | \
        {id(t) for t in caller.buffers()}
    memo: dict[int, Any] = {}
    pending = [gm]  # gm's own modules: the copies made here and the fused ones share nothing
    while pending:
        module = pending.pop()
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and id(tensor) in owned:
                setattr(module, attr, copy.deepcopy(tensor, memo))
        for child_name, child in list(module.named_children()):
            if id(child) in owned:
                setattr(module, child_name, copy.deepcopy(child, memo))
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
    (optional) lets the analysis record shapes: it is needed to fold through layout ops
    (view, permute, cat, pooling...) and to prove the channel axis of BatchNorm1d/functional
    BatchNorms; a model that defines ``example_inputs()`` (like
    :class:`fxcanon.models.RelationNetwork`) provides them itself. ``passes`` selects pass classes
    (or instances) to run instead of :data:`fxcanon.passes.DEFAULT_PASSES`. BatchNorms in training
    mode raise CanonizationError unless ``allow_training`` leaves them untouched. The report is
    ``get_report(result)``.

    Where a BatchNorm can fold either way (``conv1 -> norm -> relu -> conv2``), ``prefer="forward"``
    (default: fastest, vector biases) folds it into ``conv1``, ``prefer="threshold"`` through the ReLU
    into ``conv2``; ``preset="paper"`` chooses as Pahde et al.'s canonizers do (see
    :func:`fxcanon.passes.ordered`).
    """
    if example_inputs is None and callable(getattr(model, "example_inputs", None)):
        example_inputs = model.example_inputs()
    if isinstance(model, GraphModule):  # work on a copy: new containers, new graph, same leaf modules
        gm = GraphModule(model, copy.deepcopy(model.graph), class_name=type(model).__name__)
    else:
        gm = trace(model)
    if example_inputs is not None:
        inputs = tuple(_copied(x) for x in ((example_inputs,) if isinstance(example_inputs, Tensor)
                                            else example_inputs))
        buffers = {name: buffer.clone() for name, buffer in gm.named_buffers()}
        try:  # running the model must not move the caller's statistics (training-mode BatchNorms)
            record_shapes(gm, inputs)
            probe_sizes(gm, inputs)
        finally:
            with torch.no_grad():
                for name, buffer in gm.named_buffers():
                    if name in buffers and not torch.equal(buffer, buffers[name]):
                        buffer.copy_(buffers[name])
    report = Report()
    selected = [p(report, allow_training=allow_training) if isinstance(p, type) else p
                for p in ordered(DEFAULT_PASSES if passes is None else passes, prefer, preset, gm)]
    out = run_passes(gm, selected)
    record_unread(out, report)
    _unshare(out, model)
    out.meta[REPORT_KEY] = report
    return out
