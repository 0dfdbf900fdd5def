"""BatchNorms of parameters alone (weight standardization) evaluated once: a constant at inference."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..inventory import is_batchnorm_call
from ..kinds import function_kind
from ..mutation import fold_hazard, mutated_args
from ..report import NOT_CONSTANT, PRECOMPUTED, Fold, Refusal
from ..rewrite import build_layer, finish, fresh_name, install_layer, layer_tensors
from ..views import bind_args, linear_view
from ._base import CanonizationPass

# deterministic ops whose result is a function of their arguments alone
_PURE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.getitem,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sqrt, torch.rsqrt, torch.abs, torch.exp, torch.log,
    torch.mean, torch.sum, torch.var, torch.std, torch.reshape, torch.flatten, torch.permute, torch.transpose,
    torch.squeeze, torch.unsqueeze, torch.cat, torch.stack, F.batch_norm, torch.batch_norm, F.layer_norm,
    F.normalize,
}
_PURE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "sqrt", "rsqrt", "abs", "exp", "log", "mean", "sum", "var", "std",
    "reshape", "reshape_as", "view", "view_as", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
    "contiguous", "expand", "expand_as", "t", "clone", "detach", "float", "double", "half", "type_as",
}


def _updates_statistics(node: Node) -> bool:
    """True for a training-mode BatchNorm call given running statistics: it changes them on every call."""
    found = function_kind(node.target) if node.op == "call_function" else None
    if found is None:
        return False
    kind, spelling = found
    args = {**spelling.defaults, **bind_args(node, spelling.args)}
    batch_statistics = args.get(kind.flag) is not (not kind.flag_selects)  # set, or unknown (computed)
    return batch_statistics and \
        (args.get("running_mean") is not None or args.get("running_var") is not None)


class _Constants:
    """Which nodes compute the same value on every call from parameters and buffers alone:
    ``get_attr`` nodes and pure ops (no in-place op, no random op, no module call) of such nodes."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.memo: dict[Node, bool] = {}
        for node in gm.graph.nodes:  # in order: each node's inputs are decided before it
            self(node)

    def __call__(self, node: Node) -> bool:
        if node not in self.memo:
            self.memo[node] = node.op == "get_attr" or (all(map(self, node.all_input_nodes)) and self._pure(node))
        return self.memo[node]

    def _pure(self, node: Node) -> bool:
        pure = (node.op == "call_function" and node.target in _PURE_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _PURE_METHODS)
        return pure and not mutated_args(self.gm, node) and not _updates_statistics(node)


def _downstream(node: Node, constant: _Constants) -> list[Node]:
    """``node`` and every constant node computed from it, in graph order."""
    found, pending = {node}, [node]
    while pending:
        for user in pending.pop().users:
            if user not in found and constant(user):
                found.add(user)
                pending.append(user)
    return [n for n in node.graph.nodes if n in found]


def _ancestors(nodes: list[Node]) -> list[Node]:
    """``nodes`` and everything they read, in graph order."""
    found, pending = set(nodes), list(nodes)
    while pending:
        for arg in pending.pop().all_input_nodes:
            if arg not in found:
                found.add(arg)
                pending.append(arg)
    return [n for n in nodes[0].graph.nodes if n in found]


def _store(gm: GraphModule, node: Node, value: nn.Parameter, constant: _Constants) -> list[str]:
    """Make the users of ``node`` that read activations read ``value`` instead (a new Parameter of
    ``gm``); a functional layer among them becomes a layer module. Returns those users' names."""
    name = fresh_name(gm, f"{node.name}_precomputed")
    gm.register_parameter(name, value)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    attr.meta = dict(node.meta)
    node.replace_all_uses_with(attr, delete_user_cb=lambda user: not constant(user))
    names = []
    for user in list(attr.users):
        view = linear_view(gm, user)
        if view is not None and view.module is None and attr in (view.args.get("weight"), view.args.get("bias")):
            user = install_layer(gm, view, build_layer(view, layer_tensors(view)))
        names.append(user.name)
    if not attr.users:  # each layer holds its own copy now
        gm.graph.erase_node(attr)
        delattr(gm, name)
    return names


class PrecomputeParameterBatchNorms(CanonizationPass):
    """``BN(f(P))`` with ``f`` pure and ``P`` parameters/buffers only is a constant ``C``: computed once.

    Weight standardization (timm's ``StdConv2d``, ``ScaledStdConv2d``: NF-Nets, BiT) normalizes a
    layer's *weight* with a training-mode ``F.batch_norm`` over the weight tensor itself, then
    convolves with it. At inference that is a function of the parameters alone, so the pass
    evaluates the constant subgraph (under no_grad, in the parameters' dtype) up to where
    activations enter, stores each value it hands on as a new Parameter (a copy) and reads it with
    ``get_attr``. Exact: the same ops on the same values, once instead of on every call. A
    functional layer whose weight and bias are now constants becomes a layer module (LRP libraries
    see a Conv/Linear). Refused where the graph changes the parameters or the result in place, and
    for training-mode BatchNorms given running statistics (they update them on every call).
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        if not any(n.op == "call_function" and function_kind(n.target) for n in graph_module.graph.nodes):
            return PassResult(graph_module, False)  # only a functional norm can read parameters alone
        constant = _Constants(graph_module)
        modified, erased = False, set()
        for node in list(graph_module.graph.nodes):
            if node in erased or not is_batchnorm_call(graph_module, node) or not constant(node):
                continue  # erased, not a BatchNorm, or it reads activations
            handed_on = [n for n in _downstream(node, constant) if not all(map(constant, n.users))]
            if not handed_on:  # its result is not used
                continue
            entry = self.report.entry(node.name, node.name)
            cone = _ancestors(handed_on)
            reason = next(filter(None, (fold_hazard(graph_module, cone, output) for output in handed_on)), None)
            if reason is not None:
                entry.refusals = [Refusal(NOT_CONSTANT, f"parameters only, but {reason}")]
                continue
            with torch.no_grad():
                interpreter = Interpreter(graph_module)
                for n in cone:
                    interpreter.env[n] = interpreter.run_node(n)
            values = [interpreter.env[n] for n in handed_on]
            if not all(isinstance(v, Tensor) and v.is_floating_point() for v in values):
                entry.refusals = [Refusal(NOT_CONSTANT, "parameters only, but it hands on values that are not "
                                                        "floating tensors")]
                continue
            grad = any(isinstance(v, nn.Parameter) and v.requires_grad for v in
                       (interpreter.env[n] for n in cone if n.op == "get_attr"))
            consumers = [name for output, value in zip(handed_on, values)
                         for name in _store(graph_module, output, nn.Parameter(value.detach().clone(), grad),
                                            constant)]
            batchnorms = [n for n in cone if is_batchnorm_call(graph_module, n)]
            for n in reversed(cone):
                if not n.users:
                    graph_module.graph.erase_node(n)
                    erased.add(n)
            for bn in batchnorms:
                done = self.report.entry(bn.name, bn.name)
                done.folds.extend(Fold(name, PRECOMPUTED) for name in consumers)
                done.refusals = []
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)
