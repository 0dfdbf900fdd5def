"""LayerNorm/GroupNorm -> (permutes) -> Linear/Conv/ConvTranspose: the norm's affine tail folded
into the layer's input (opt-in: not in ``DEFAULT_PASSES``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import Guard, Sink, identity_map
from ..guards import insert_guard
from ..mutation import fold_hazard
from ..report import NOT_BEFORE_LAYER, Refusal
from ..rewrite import finish, replace_with_module
from ..views import AffineTailView, affine_tail_view, has_hooks, linear_view, reads_only_metadata
from ._base import CanonizationPass


def _permutation(node: Node, value: Node) -> list[int] | None:
    """The dims of ``node`` if it is ``value.permute(dims)`` or ``torch.permute(value, dims)``, else None."""
    method = node.op == "call_method" and node.target == "permute"
    if not (method or (node.op == "call_function" and node.target is torch.permute)) or node.args[:1] != (value,):
        return None
    dims: Any = node.args[1:] or (node.kwargs.get("dims"),)
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return list(dims) if all(isinstance(d, int) for d in dims) and not node.kwargs.keys() - {"dims"} else None


def _only_user(node: Node) -> Node | None:
    """The one use of ``node`` that reads more than its shape, dtype or device, else None."""
    users = [u for u in node.users if not reads_only_metadata(u, node)]
    return users[0] if len(users) == 1 else None


def plan_tail_fold(gm: GraphModule, tail: AffineTailView) -> tuple[Sink, Guard | None] | str:
    """The layer that ``tail``'s affine map folds into (with a guard on the norm's input rank where
    only the call-time rank can tell), or why it cannot."""
    if has_hooks(tail.module):
        return "has forward hooks (folding it would drop them)"
    axis, rank, path, node = tail.kind.axis, None, [], tail.node
    user = _only_user(node)
    while user is not None and (dims := _permutation(user, node)) is not None:
        rank = len(dims)
        if not -rank <= axis < rank:
            return f"{user.name}: permutes fewer dims than the norm's feature axis"
        axis = [d % rank for d in dims].index(axis % rank)
        path.append(user.name)
        node, user = user, _only_user(user)
    if user is None:
        return f"output of {node.name} does not feed exactly one op"
    view = linear_view(gm, user)
    if view is None or view.input is not node:
        return f"{user.name} is not a Linear/Conv/ConvTranspose layer"
    if has_hooks(view.module):
        return f"{user.name} has forward hooks"
    if view.in_channels != tail.weight.shape[0]:
        return f"{user.name}: its input features are not the {tail.kind.name}'s"
    guard = None
    if rank is None and axis == 1:  # GroupNorm: dim 1 is the layer's feature axis at its batched rank only
        guard = Guard(view.batched_rank, why=f"{tail.node.name!r} scales dim 1, the layer's feature axis at this rank")
    elif rank is None and view.spatial_dims == 0:  # LayerNorm -> Linear: the last dim at every rank
        guard = None
    elif rank is None or axis != (rank - 1 if view.spatial_dims == 0 else 1) or \
            (view.spatial_dims and rank != view.batched_rank):
        return f"{user.name}: its feature axis is not the one the {tail.kind.name} scales"
    return Sink(view, identity_map(view.in_channels), tuple(path), identity=True), guard


def _drop_tail(gm: GraphModule, tail: AffineTailView) -> None:
    """The norm without its affine tail: a new module, or the call without weight and bias."""
    if tail.module is not None:
        replace_with_module(gm, tail.node, tail.kind.modules[type(tail.module)](tail.module), (tail.input,),
                            "normalized")
    else:
        tail.node.args, tail.node.kwargs = (), {**tail.args, "weight": None, "bias": None}


class FoldNormAffine(CanonizationPass):
    """``layer(g * n + b) = layer_{W diag(g)}(n) + B``: a LayerNorm's or GroupNorm's affine tail
    ``(g, b)`` folds into the next layer's input features like a BatchNorm's ``(s, t)`` (A.6-A.20:
    ``B = W b + c`` for a Linear or a convolution without zero padding, a bias map otherwise); the
    norm stays, as a new norm without affine parameters.

    ``g`` and ``b`` scale the last dim of a LayerNorm over its last dim only, dim 1 of a GroupNorm.
    Applies when the norm's output feeds only the layer, directly or through permutes (ConvNeXt's
    ``LayerNorm2d``: permute -> layer_norm -> permute -> conv), and that axis is the layer's
    feature axis: LayerNorm -> Linear at every rank, after permutes at the rank they fix, GroupNorm
    without permutes at the layer's batched rank (a guard). Not for ``torch.compile`` graphs.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for node in list(graph_module.graph.nodes) if not self.folder.graph_params else []:
            tail = affine_tail_view(graph_module, node)
            if tail is None:
                continue
            entry = self.report.entry(node.name, str(node.target) if node.op == "call_module" else node.name)
            plan = plan_tail_fold(graph_module, tail)
            if not isinstance(plan, str):
                hazard = fold_hazard(graph_module, (node, plan[0].view.node), node)
                plan = hazard if hazard is not None else plan
            if isinstance(plan, str):
                entry.refusals = [Refusal(NOT_BEFORE_LAYER, f"affine tail kept: {plan}")]
                continue
            sink, guard = plan
            if guard is not None:
                insert_guard(graph_module, tail.input, guard, node, node.name, tail.kind.name)
                entry.guards.append(guard.describe())
            with torch.no_grad():
                g = tail.weight.detach().double()
                b = torch.zeros_like(g) if tail.bias is None else tail.bias.detach().double()
            entry.folds.append(self.folder.fold_input(graph_module, sink, g, b))
            _drop_tail(graph_module, tail)
            entry.refusals = []
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)
