"""Residual additions as explicit ``Sum`` modules (as zennit's ResNet canonizer does)."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import PROBE_KEY
from ..modules import Sum
from ..rewrite import finish, replace_with_module
from ._base import CanonizationPass

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist", "__len__"}


def _is_computed_tensor(node: object) -> bool:
    """True if ``node`` is a tensor computed by the graph (not a constant, parameter or size)."""
    if not isinstance(node, Node) or node.op in ("get_attr", "output"):
        return False
    meta = node.meta.get("tensor_meta")
    if meta is not None:
        return hasattr(meta, "shape")
    if "fxcanon_value" in node.meta:
        return False
    if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
        return False
    if node.op == "call_function":
        if node.target is getattr:
            return False
        if node.target is operator.getitem:
            return _is_computed_tensor(node.args[0])
        if node.target in vars(operator).values():
            return any(_is_computed_tensor(arg) for arg in node.args)
    return True


def _same_shapes(a: Node, b: Node) -> bool:
    """True if ``a`` and ``b`` had equal shapes in every recorded run (the example inputs and the
    grown-size probe): equal at one size only may still broadcast at another."""
    meta = [n.meta.get("tensor_meta") for n in (a, b)]
    if not all(hasattr(m, "shape") for m in meta) or meta[0].shape != meta[1].shape:
        return False
    probes = [n.meta.get(PROBE_KEY) for n in (a, b)]
    return all(p is None for p in probes) or (None not in probes and probes[0][0] == probes[1][0])


def _used_later(value: Node, node: Node) -> bool:
    """True if ``value`` is read after ``node`` (an in-place add there would have changed it)."""
    later = set()
    for n in node.graph.nodes:
        if n is node:
            later = {node}
        elif later:
            later.add(n)
    return any(user in later and user is not node for user in value.users)


def _summands(node: Node) -> tuple[Node, Node] | None:
    if node.op == "call_function" and node.target is operator.iadd and _used_later(node.args[0], node):
        return None
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        if len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            return (a, b) if _is_computed_tensor(a) and _is_computed_tensor(b) else None
    if node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        return (a, b) if _is_computed_tensor(a) and _is_computed_tensor(b) else None
    return None


def _reduced(node: Node) -> tuple[Node, int] | None:
    """``(x, dim)`` for ``x.sum(dim)`` / ``torch.sum(x, dim)`` over one dimension, else None."""
    if not ((node.op == "call_method" and node.target == "sum") or
            (node.op == "call_function" and node.target is torch.sum)):
        return None
    args = dict(zip(("input", "dim", "keepdim"), node.args))
    args.update(node.kwargs)
    dim = args.get("dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or args.get("keepdim", False) or set(args) - {"input", "dim", "keepdim"} \
            or not _is_computed_tensor(args["input"]):
        return None
    return args["input"], dim


class ExplicitSums(CanonizationPass):
    """Sums as explicit ``Sum`` modules (summing over the last dimension), function unchanged:

    * ``a + b`` of two tensors computed by the graph -> ``Sum()(torch.stack([a, b], -1))``
      (with ``torch.broadcast_tensors`` first unless the shapes were equal in every recorded run); ``x + 1``,
      additions of parameters and size arithmetic stay;
    * ``x.sum(dim)`` over one dimension (sum pooling, e.g. a Relation Network's sum over pairs)
      -> ``Sum()(x.movedim(dim, -1))``.

    LRP composites give ``Sum`` the norm rule. Switch it off (leave it out of ``passes``) for inference.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.nodes):
            summands, reduced = _summands(node), _reduced(node)
            if summands is None and reduced is None:
                continue
            with graph.inserting_before(node):
                if reduced is not None:
                    stacked = graph.call_method("movedim", (reduced[0], reduced[1], -1))
                else:
                    values = list(summands) if _same_shapes(*summands) else graph.call_function(torch.broadcast_tensors, summands)
                    stacked = graph.call_function(torch.stack, (values, -1))
            replace_with_module(graph_module, node, Sum(), (stacked,), "sum")
            modified = True
        finish(graph_module, modified)
        return PassResult(graph_module, modified)
