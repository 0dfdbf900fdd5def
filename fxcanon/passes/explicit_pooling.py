"""Functional average pooling as pooling modules, so LRP composites give it the norm rule."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..rewrite import finish, replace_with_module
from ..views import bind_args
from ._base import CanonizationPass

_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
# functional -> (module type, argument names after the input)
_POOLS = {
    F.avg_pool1d: (nn.AvgPool1d, _POOL_ARGS[1:6]),
    F.avg_pool2d: (nn.AvgPool2d, _POOL_ARGS[1:]),
    F.avg_pool3d: (nn.AvgPool3d, _POOL_ARGS[1:]),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)),
}


class ExplicitPooling(CanonizationPass):
    """``F.avg_pool2d(x, ...)`` -> ``nn.AvgPool2d(...)(x)`` (and the 1d, 3d and adaptive ones).

    Same function; LRP composites match pooling *modules* (zennit's ``AvgPool`` type, norm rule),
    while a functional pool would pass relevance on as a plain gradient. Inception's branch pools
    (``count_include_pad=True``) conserve relevance only as modules.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for node in list(graph_module.graph.nodes):
            if node.op != "call_function" or node.target not in _POOLS:
                continue
            module_type, names = _POOLS[node.target]
            args = bind_args(node, ("input", *names))
            if not all(isinstance(v, (int, bool, tuple, list, type(None))) for k, v in args.items() if k != "input"):
                continue
            pool = module_type(**{k: v for k, v in args.items() if k != "input"})
            replace_with_module(graph_module, node, pool, (args["input"],), "pool")
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)
