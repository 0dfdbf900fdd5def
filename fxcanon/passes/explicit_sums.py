"""Residual additions as explicit ``Sum`` modules (as zennit's ResNet canonizer does)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult
from torchvision.ops import stochastic_depth

from ..modules import Sum
from ..mutation import returns_fresh
from ..rewrite import finish, replace_with_module
from ..views import call_input, get_attr_value, submodule
from ._base import CanonizationPass

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
# ops whose tensor results are floating when their tensor arguments are
_DTYPE_KEEPING = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.getitem, torch.add, torch.sub,
    torch.mul, torch.relu, torch.sigmoid, torch.tanh, torch.flatten, torch.cat, torch.concat, torch.stack,
    torch.mean, torch.sum, torch.permute, torch.transpose, torch.reshape, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.movedim, torch.chunk, torch.split, torch.clamp, torch.conv1d, torch.conv2d, torch.conv3d,
    torch.batch_norm, F.linear, F.batch_norm, F.layer_norm, F.group_norm, F.relu, F.relu6, F.leaky_relu, F.elu,
    F.silu, F.gelu, F.mish, F.hardswish, F.hardtanh, F.sigmoid, F.hardsigmoid, F.softmax, F.dropout, F.pad,
    F.interpolate, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, stochastic_depth,
}
_DTYPE_KEEPING_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "view", "view_as", "reshape",
                          "flatten", "permute", "transpose", "contiguous", "clone", "mean", "sum", "squeeze",
                          "unsqueeze", "expand", "expand_as", "repeat", "narrow", "chunk", "split", "softmax"}


# layers whose input must be floating (an Embedding's floating weight says nothing of its input)
_FLOATING_INPUT = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class _Floating:
    """Whether a node is a floating-point tensor: its recorded dtype; else what computes it (layers
    with floating weights, ops that keep floating inputs floating) or what consumes it (a layer's
    input must be floating for the model to run at all)."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.memo: dict[Node, bool] = {}

    def __call__(self, node: Any) -> bool:
        if not isinstance(node, Node):
            return False
        if node not in self.memo:
            self.memo[node] = False  # stops re-entry while deciding
            self.memo[node] = self._decide(node)
        return self.memo[node]

    def _decide(self, node: Node) -> bool:
        dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
        if dtype is not None:
            return dtype.is_floating_point
        args = node.all_input_nodes
        if node.op == "get_attr":
            value = get_attr_value(self.gm, str(node.target))
            return isinstance(value, torch.Tensor) and value.is_floating_point()
        if node.op == "call_module" and self._has_floating_weights(node):
            return True
        keeps = node.op == "call_module" or (node.op == "call_function" and node.target in _DTYPE_KEEPING) or \
            (node.op == "call_method" and node.target in _DTYPE_KEEPING_METHODS)
        if keeps and args and all(self(a) for a in args):
            return True
        return any(user.op == "call_module" and isinstance(submodule(self.gm, str(user.target)), _FLOATING_INPUT)
                   and call_input(user) is node for user in node.users)

    def _has_floating_weights(self, node: Node) -> bool:
        module = submodule(self.gm, str(node.target))
        return any(t.is_floating_point() for t in [*module.parameters(), *module.buffers()])


def _inplace_add_is_safe(gm: GraphModule, node: Node) -> bool:
    """``a += b`` may become ``Sum`` (a new tensor) only if nothing can see that ``a`` changed:
    ``a`` is a fresh tensor of the graph (not an input) read by nothing after the addition and
    viewed by nothing."""
    a = node.args[0]
    if not isinstance(a, Node) or a.op == "placeholder" or not returns_fresh(gm, a):
        return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return all(user is node or (order[user] < order[node] and returns_fresh(gm, user)) for user in a.users)


def _summands(gm: GraphModule, node: Node, floating: _Floating) -> tuple[Node, Node] | None:
    """``(a, b)`` for an addition of two floating tensors of the same dtype, else None."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target == "add")
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    if node.target is operator.iadd and not _inplace_add_is_safe(gm, node):
        return None
    a, b = node.args
    if not (isinstance(a, Node) and isinstance(b, Node) and floating(a) and floating(b)):
        return None
    dtypes = [getattr(n.meta.get("tensor_meta"), "dtype", None) for n in (a, b)]
    return (a, b) if dtypes[0] == dtypes[1] else None


def _reduced(node: Node, floating: _Floating) -> tuple[Node, int] | None:
    """``(x, dim)`` for ``x.sum(dim)`` / ``torch.sum(x, dim)`` over one dimension, else None."""
    if not ((node.op == "call_method" and node.target == "sum") or
            (node.op == "call_function" and node.target is torch.sum)):
        return None
    args = dict(zip(("input", "dim", "keepdim"), node.args))
    args.update(node.kwargs)
    dim = args.get("dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    x = args.get("input")
    if not isinstance(dim, int) or args.get("keepdim", False) or set(args) - {"input", "dim", "keepdim"} \
            or not isinstance(x, Node) or not floating(x):
        return None
    return x, dim


class ExplicitSums(CanonizationPass):
    """Sums as explicit ``Sum`` modules (summing over the last dimension), function unchanged:

    * ``a + b`` of two floating tensors of one dtype -> ``Sum()(torch.stack(torch.broadcast_tensors(a, b), -1))``,
      the same at every shape (broadcasting included); ``x + 1``, integer and boolean tensors, mixed
      dtypes and size arithmetic stay; ``a += b`` only where nothing else sees ``a`` change;
    * ``x.sum(dim)`` over one dimension (sum pooling, e.g. a Relation Network's sum over pairs)
      -> ``Sum()(x.movedim(dim, -1))``.

    LRP composites give ``Sum`` the norm rule. Switch it off (leave it out of ``passes``) for inference.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        floating = _Floating(graph_module)
        for node in list(graph.nodes):
            summands, reduced = _summands(graph_module, node, floating), _reduced(node, floating)
            if summands is None and reduced is None:
                continue
            with graph.inserting_before(node):
                if reduced is not None:
                    stacked = graph.call_method("movedim", (reduced[0], reduced[1], -1))
                else:
                    values = graph.call_function(torch.broadcast_tensors, summands)
                    stacked = graph.call_function(torch.stack, (values, -1))
            replace_with_module(graph_module, node, Sum(), (stacked,), "sum")
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)
