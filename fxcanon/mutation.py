"""Alias and mutation analysis: which values a graph may change in place, and where.

A fold moves reads: after a backward fold the BatchNorm's users read its *input*, later in the
program than the BatchNorm did, and layout ops on the path produce views of that input instead
of views of a fresh tensor. Both are exact only when no in-place op changes those tensors. This
analysis is conservative: any op not known to return a fresh tensor may return a view of its
tensor arguments, and every graph input may alias every other one.

In-place spellings recognised: ``x.op_()`` methods and ``torch.op_`` functions, ``inplace=True``
(functional or module attribute), ``operator.i*`` augmented assignment, ``out=`` arguments and
``operator.setitem`` / ``__setitem__``. Leaf modules and wrapped functions of the user's own
(code the graph does not show) may change any tensor they receive, unless registered as a layer
or norm kind (``fxcanon.register_layer``, ``fxcanon.register_norm``).
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .kinds import module_kind
from .views import LINEAR_MODULES, Submodules, submodule

_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
              operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
              operator.imatmul, operator.setitem}
_SETITEM_METHODS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
# methods whose name ends in "_" without changing data
_NOT_MUTATING_METHODS = {"requires_grad_", "retain_grad_", "share_memory_", "pin_memory_"}

# ops that return a new tensor (never a view of an argument)
_FRESH_FUNCTIONS: set[Any] = {
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, F.linear, F.batch_norm, torch.batch_norm, F.layer_norm, F.group_norm,
    torch.cat, torch.concat, torch.stack, torch.clone, torch.add, torch.sub, torch.mul, torch.div, torch.matmul,
    torch.sum, torch.mean, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.maximum, torch.minimum, torch.where, F.pad, torch._C._nn.pad,
    F.interpolate, F.softmax, F.gelu, F.silu, F.hardswish, F.sigmoid, F.hardsigmoid,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.matmul,
    operator.pow, operator.mod,
}
_FRESH_METHODS = {"clone", "add", "sub", "mul", "div", "matmul", "sum", "mean", "relu", "sigmoid", "tanh", "exp",
                  "neg", "pow", "new_zeros", "new_ones", "new_full", "new_empty", "softmax"}
_FRESH_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                  nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                  nn.modules.pooling._AdaptiveMaxPoolNd, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Softmax, nn.Embedding)


_LIBRARIES = ("torch", "torchvision", "operator", "_operator", "math", "builtins", "fxcanon")


def _is_library(obj: Any) -> bool:
    """True for torch's, torchvision's, Python's and fxcanon's own functions and modules, whose in-place
    behaviour the rules above know; code of the user's that the graph calls opaquely may change
    any tensor it receives."""
    module = getattr(obj, "__module__", None) or "builtins"
    return module.split(".")[0] in _LIBRARIES


@functools.cache
def _inplace_position(target: Any) -> int | None:
    """Position of a function's ``inplace`` parameter, or None if it has none."""
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _inplace_flag(target: Any, node: Node) -> bool:
    """True if a functional call passes ``inplace=True`` (by keyword or position)."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        index = _inplace_position(target)
    except TypeError:  # not hashable
        return False
    return index is not None and len(node.args) > index and node.args[index] is True


def mutated_args(gm: GraphModule, node: Node, modules: dict[str, nn.Module] | None = None) -> list[Node]:
    """The argument nodes that ``node`` changes in place (empty for out-of-place ops); ``modules``:
    ``dict(gm.named_modules())`` when the caller has it."""
    targets: list[Any] = []
    if isinstance(node.kwargs.get("out"), (Node, tuple, list)):
        targets.append(node.kwargs["out"])
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if node.op == "call_method":
        name = str(node.target)
        if name in _SETITEM_METHODS or (name.endswith("_") and not name.endswith("__")
                                        and name not in _NOT_MUTATING_METHODS):
            targets.append(first)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _AUGMENTED or (name.endswith("_") and not name.endswith("__")
                                         and name not in _NOT_MUTATING_METHODS) or _inplace_flag(node.target, node):
            targets.append(first)
    elif node.op == "call_module":
        module = modules[str(node.target)] if modules is not None else submodule(gm, str(node.target))
        if getattr(module, "inplace", False) is True:
            targets.append(first)
        elif not (_is_library(type(module)) or type(module) in LINEAR_MODULES or module_kind(module) is not None):
            # a leaf module of the user's, not registered as a layer or norm: its code is not in the graph
            targets.extend(node.all_input_nodes)
    if node.op == "call_function" and not _is_library(node.target):  # a wrapped function of the user's
        targets.extend(node.all_input_nodes)
    found: list[Node] = []

    def collect(n: Node) -> Node:
        found.append(n)
        return n

    map_arg(targets, collect)
    return found


def returns_fresh(gm: GraphModule, node: Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """True if ``node`` returns a tensor that aliases none of its arguments."""
    return not mutated_args(gm, node, modules) and _fresh_op(gm, node, modules)


def _fresh_op(gm: GraphModule, node: Node, modules: dict[str, nn.Module] | None) -> bool:
    """True if ``node``'s op returns a new tensor, unless it changes an argument in place."""
    if node.op in ("get_attr", "output"):
        return True
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.op == "call_module":
        module = modules[str(node.target)] if modules is not None else submodule(gm, str(node.target))
        return isinstance(module, _FRESH_MODULES) or (isinstance(module, nn.ReLU) and not module.inplace)
    return False


class AliasAnalysis:
    """May-alias classes of a graph's values and the nodes that mutate each class in place.

    Two values are in one class when a node that may return a view of its arguments (or changes
    one in place) links its result to them, when both are graph inputs, or when both read one
    attribute. Classes are found on demand, from the queried value through those links, so a query
    looks only at the values that may alias it; answers hold while the graph is not edited.
    """

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self._effects: dict[Node, tuple[list[Node], bool]] = {}
        self._modules = Submodules(gm)

    def _effect(self, node: Node) -> tuple[list[Node], bool]:
        """The arguments ``node`` changes in place, and whether its result may alias its arguments."""
        if node not in self._effects:
            mutated = mutated_args(self.gm, node, self._modules)
            self._effects[node] = mutated, bool(mutated) or not _fresh_op(self.gm, node, self._modules)
        return self._effects[node]

    def alias_class(self, value: Node) -> set[Node]:
        """``value`` and every value that may alias it."""
        graph = self.gm.graph
        members, pending = {value}, [value]
        while pending:
            node = pending.pop()
            linked = [user for user in node.users if self._effect(user)[1]]
            if self._effect(node)[1]:
                linked += node.all_input_nodes
            if node.op == "placeholder":  # a caller may pass one tensor twice
                linked += graph.find_nodes(op="placeholder", sort=False)
            elif node.op == "get_attr":  # one tensor read twice
                linked += graph.find_nodes(op="get_attr", target=node.target, sort=False)
            for other in linked:
                if other not in members:
                    members.add(other)
                    pending.append(other)
        return members

    def mutations(self, value: Node, after: Node | None = None, ignore: Iterable[Node] = ()) -> list[Node]:
        """Nodes that change ``value`` or anything that may alias it in place, in program order (only
        those after ``after`` when given), except the nodes in ``ignore``. (A node that changes a
        value in place is linked to it, hence in its class.)"""
        skip = set(ignore)
        found = [m for m in self.alias_class(value) if self._effect(m)[0] and m not in skip]
        if not found:
            return []
        order = {node: i for i, node in enumerate(self.gm.graph.nodes)}
        start = -1 if after is None else order[after]
        return sorted((m for m in found if order[m] > start), key=order.__getitem__)

    def changes_parameters(self, call: Node) -> bool:
        """True if the graph changes in place a tensor ``call`` reads as an attribute: a ``get_attr``
        argument, or a parameter or buffer of the module it calls."""
        read = {arg.target for arg in call.all_input_nodes if arg.op == "get_attr"}
        prefix = f"{call.target}." if call.op == "call_module" else None
        return any((node.target in read or (prefix is not None and f"{node.target}.".startswith(prefix)))
                   and self.mutations(node) for node in self.gm.graph.find_nodes(op="get_attr", sort=False))


def fold_hazard(gm: GraphModule, calls: Iterable[Node], output: Node | None = None, source: Node | None = None,
                read_at: Node | None = None, ignore: Iterable[Node] = ()) -> str | None:
    """Why a fold is not exact in the presence of in-place ops, or None.

    ``calls`` are the BatchNorm and layer calls whose parameters the fold bakes in: the graph must
    not change those parameters. A backward fold removes ``output`` (the BatchNorm's or its ReLU's)
    and makes its users read ``source`` (the BatchNorm's input, first read at ``read_at``) instead:
    nothing may change ``output`` in place (``ignore``: the folded in-place ReLU itself), nor
    ``source`` after ``read_at``.
    """
    aliases = AliasAnalysis(gm)
    if output is not None:
        changed = aliases.mutations(output, ignore=ignore)
        if changed:
            return f"{changed[0].name} changes {output.name} (or a view of it) in place"
    if source is not None:
        changed = aliases.mutations(source, after=read_at)
        if changed:
            return f"{changed[0].name} changes {source.name} (or a view of it) in place after it is read"
    for call in calls:
        if aliases.changes_parameters(call):
            return f"the graph changes parameters of {call.name} in place"
    return None
