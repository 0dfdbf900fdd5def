"""``layer(x) + BN(x)`` folded into the layer: the identity branch of RepVGG-style blocks."""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import Guard, rank_guard
from ..fold_math import add_identity
from ..mutation import fold_hazard
from ..report import IDENTITY_BRANCH, NO_SIBLING_LAYER, Fold, Refusal
from ..rewrite import build_layer, finish, install_layer, layer_tensors
from ..views import BatchNormView, LinearView, has_hooks, identity_input, linear_view, reads_only_metadata
from ._base import CanonizationPass

# out-of-place additions and subtractions: the sign each takes its second operand with
_SIGNS = {operator.add: 1, torch.add: 1, operator.sub: -1, torch.sub: -1}
_METHOD_SIGNS = {"add": 1, "sub": -1}


def _operands(node: Node) -> tuple[tuple[Any, int], tuple[Any, int]] | None:
    """``((a, 1), (b, +-1))`` for ``a + b`` / ``a - b`` (out of place, no ``alpha``), else None."""
    sign = None
    if node.op == "call_method":
        sign = _METHOD_SIGNS.get(str(node.target))
    elif node.op == "call_function":
        sign = next((v for f, v in _SIGNS.items() if f is node.target), None)
    if sign is None or len(node.args) != 2 or node.kwargs:
        return None
    return (node.args[0], 1), (node.args[1], sign)


def _real_users(node: Node) -> list[Node]:
    """The users of ``node`` that read more than its shape, dtype or device."""
    return [user for user in node.users if not reads_only_metadata(user, node)]


def _branch(gm: GraphModule, node: Node) -> tuple[list[Node], Node] | None:
    """``(chain, add)``: ``node`` and the identity ops after it (each the only real use of the one
    before) up to the addition (or subtraction) that uses the last of them once; None if ``node``
    goes elsewhere."""
    chain = [node]
    while True:
        users = _real_users(chain[-1])
        if len(users) != 1:
            return None
        operands = _operands(users[0])
        if operands is not None:
            return (chain, users[0]) if sum(o is chain[-1] for o, _ in operands) == 1 else None
        if identity_input(gm, users[0]) is not chain[-1]:
            return None
        chain.append(users[0])


def _branch_start(gm: GraphModule, operand: Node) -> Node:
    """What an addition's operand is before the identity ops that only pass it on to the addition."""
    while isinstance(source := identity_input(gm, operand), Node) and _real_users(source) == [operand]:
        operand = source
    return operand


def _origin(gm: GraphModule, node: Node) -> Node:
    """``node`` before any identity ops: the value they all return."""
    while isinstance(source := identity_input(gm, node), Node):
        node = source
    return node


def _terms(gm: GraphModule, add: Node) -> list[tuple[Node, int]]:
    """The terms of the sum that ``add`` belongs to, with their signs in it: the operands of the
    whole tree of additions and subtractions, each the only real use of the one below (identity
    ops in between)."""
    while (up := _branch(gm, add)) is not None:
        add = up[1]
    terms: list[tuple[Node, int]] = []
    pending = [(add, 1)]
    while pending:
        node, sign = pending.pop()
        for operand, operand_sign in _operands(node) or ():
            if not isinstance(operand, Node):
                continue
            start = _branch_start(gm, operand)
            nested = _operands(start) is not None and _branch(gm, start) is not None
            (pending if nested else terms).append((start, sign * operand_sign))
    return terms


def _detach(gm: GraphModule, chain: list[Node], add: Node) -> tuple[list[Node], Node, Node] | None:
    """How to drop the term ``chain`` ends in from its sum: ``(dropped, add, other)``, the nodes to
    erase and the addition that becomes its other operand ``other``. Where that operand is a zero
    (``0 + BN(x)``, as in ``out = 0 + identity; out += conv(x)``), the addition is dropped too, from
    the addition above (which exists: the sum has a layer term). None where a non-zero constant is
    added, or the term is what another is subtracted from (``BN(x) - y`` would leave ``-y``)."""
    dropped = list(chain)
    while True:
        operands = _operands(add)
        assert operands is not None  # ``add`` is an addition or subtraction
        (first, _), (second, _) = operands
        other = second if first is dropped[-1] else first
        if isinstance(other, Node):
            subtracted_from = first is dropped[-1] and operands[1][1] < 0
            return None if subtracted_from else (dropped, add, other)
        up = _branch(gm, add)
        if type(other) not in (int, float) or other != 0 or up is None:
            return None
        dropped.extend(up[0])
        add = up[1]


def _misfit(gm: GraphModule, bn: BatchNormView, view: LinearView) -> str | None:
    """Why ``view`` cannot take the identity map ``bn`` adds to it, or None."""
    spatial = view.weight.shape[2:]
    if _origin(gm, view.input) is not _origin(gm, bn.input):
        return "reads another input"
    if has_hooks(view.module):
        return "has forward hooks"
    if view.transposed or view.input_pad:
        return "is transposed or pads its input itself"
    if not view.in_channels == view.out_channels == bn.num_features:
        return f"maps {view.in_channels} to {view.out_channels} channels, the BatchNorm has {bn.num_features}"
    if any(s != 1 for s in view.stride) or any(k % 2 == 0 for k in spatial):
        return "has a stride or an even kernel: its centre tap does not read the output's position"
    aligned = tuple(d * (k - 1) // 2 for d, k in zip(view.dilation, spatial))
    if view.padding != "same" and view.padding != aligned and not (view.padding == "valid" and not any(aligned)):
        return f"has padding {view.padding}, not {aligned}: its output is shifted or of another size"
    return None


class _Plan(NamedTuple):
    layer: LinearView
    guard: Guard | None  # on the BatchNorm's input
    sign: int  # of the BatchNorm's term relative to the layer's: -1 where one of them is subtracted
    dropped: list[Node]  # the BatchNorm's term, and additions of zero to it
    add: Node  # the addition (subtraction) that becomes its other operand
    other: Node


class FoldIdentityBranch(CanonizationPass):
    """``layer(x) + BN(x) = layer'(x)``: ``W'[c, c mod (in/groups), centre] = W[...] + s[c]``, ``b' = b + t``.

    RepVGG, MobileOne, FastViT and RepGhost blocks add a BatchNorm of the block's input ``x`` to
    convolution branches that read the same ``x``. A sibling ConvNd with ``in == out ==`` the
    BatchNorm's channels, stride 1, an odd kernel and padding ``dilation * (k - 1) / 2`` per
    dimension has an output aligned with its input at every size, and its centre tap reads exactly
    ``x`` at the output's position (never padding, whatever the padding mode): adding ``s[c]`` to
    the tap of channel ``c`` on itself (in its group, since ``in == out``) and ``t`` to the bias
    gives ``layer(x) + s * x + t`` at every position, for every input size. A Linear sibling
    (``in == out``) takes ``s`` on its diagonal. The addition then sums the other terms. The sum may
    be a tree of out-of-place additions and subtractions (``operator.add``, ``torch.add``, ``sub``)
    with identity ops (eval-mode dropout, ``nn.Identity``) in between; the BatchNorm and the layer
    must feed only it. Where one of them is subtracted (FastViT's ``mixer(x) - norm(x)``) the layer
    takes ``-s`` and ``-t``.
    Runs after the forward folds, so conv -> BN branches are already one layer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._left: dict[str, str] = {}  # why each BatchNorm found no sibling, kept across rounds

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        if self.folder.graph_params:  # the fold computes tensors now: module graphs only
            return PassResult(graph_module, modified)
        self.folder.flush(graph_module)  # it reads the layers' tensors
        for bn, entry, affine in self.batchnorms(graph_module):
            branch = _branch(graph_module, bn.node)
            if entry.folds or (branch is None and bn.node.name not in self._left):
                continue
            # the reason found before ExplicitSums turned the addition into a Sum (in an earlier round)
            plan = self._plan(graph_module, bn, *branch) if branch is not None else self._left[bn.node.name]
            if isinstance(plan, str):
                self._left[bn.node.name] = plan
                if not entry.refused(NO_SIBLING_LAYER):
                    entry.refusals.append(Refusal(NO_SIBLING_LAYER, f"no sibling layer: {plan}"))
                continue
            view = plan.layer
            tensors = add_identity(layer_tensors(view), plan.sign * affine.s, plan.sign * affine.t)
            fused = install_layer(graph_module, view, build_layer(view, tensors, view.input_pad))
            plan.add.replace_all_uses_with(plan.other)
            graph_module.graph.erase_node(plan.add)
            for node in reversed(plan.dropped):  # what is left reads only the shape, dtype or device: x's
                node.replace_all_uses_with(bn.input)
                graph_module.graph.erase_node(node)
            self.guard(graph_module, bn.input, plan.guard, fused, bn, entry)
            entry.folds.append(Fold(fused.name, IDENTITY_BRANCH))
            entry.refusals = []
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)

    def _plan(self, gm: GraphModule, bn: BatchNormView, chain: list[Node], add: Node) -> _Plan | str:
        """How the BatchNorm's term goes into a sibling layer, or why it stays."""
        terms = _terms(gm, add)
        sign = next(sign for term, sign in terms if term is bn.node)
        misfits = []
        for term, term_sign in terms:
            view = linear_view(gm, term)
            if view is None or _branch(gm, term) is None:
                continue
            reason = _misfit(gm, bn, view)
            guard = rank_guard(bn, view.batched_rank) if reason is None else None
            if isinstance(guard, str):
                reason, guard = guard, None
            if reason is not None:
                misfits.append(f"{term.name} {reason}")
                continue
            order = {node: i for i, node in enumerate(gm.graph.nodes)}
            hazard = fold_hazard(gm, (bn.node, term), bn.node, bn.input, min(bn.node, term, key=order.__getitem__))
            if hazard is not None:
                return hazard
            detach = _detach(gm, chain, add)
            if detach is None:
                return f"{add.name} adds it to a non-zero constant or subtracts another term from it"
            return _Plan(view, guard, sign * term_sign, *detach)
        return "; ".join(misfits) if misfits else f"the sum at {add.name} has no Linear/Conv term of its own"
