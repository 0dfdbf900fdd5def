"""Multiplicative gates as explicit ``Gate`` modules (squeeze-excitation in EfficientNet,
MobileNetV3, RegNet), as the paper's EfficientNet canonizer does."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..modules import Gate
from ..rewrite import finish, replace_with_module
from ..views import submodule
from ._base import CanonizationPass

_MULTIPLY = {operator.mul, torch.mul}
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)


def _is_gate(gm: GraphModule, node: object) -> bool:
    """True if ``node`` is the output of a sigmoid-like gate activation."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_module":
        return isinstance(submodule(gm, str(node.target)), _GATE_MODULES)
    return (node.op == "call_function" and node.target in _GATE_FUNCTIONS) or \
        (node.op == "call_method" and node.target in ("sigmoid", "hardsigmoid"))


class ExplicitGates(CanonizationPass):
    """``g * x`` with ``g`` a sigmoid/hardsigmoid output -> ``Gate()(x, g)``; the function is unchanged.

    LRP composites (``fxcanon.xai``) give ``Gate`` the signal-takes-all rule: all relevance of the
    product goes to ``x``. Leave the pass out of ``passes`` for inference.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for node in list(graph_module.graph.nodes):
            is_mul = (node.op == "call_function" and node.target in _MULTIPLY) or \
                (node.op == "call_method" and node.target == "mul")
            if not is_mul or len(node.args) != 2 or node.kwargs:
                continue
            a, b = node.args
            if _is_gate(graph_module, a) and isinstance(b, Node) and not _is_gate(graph_module, b):
                signal, gate = b, a
            elif _is_gate(graph_module, b) and isinstance(a, Node):
                signal, gate = a, b
            else:
                continue
            replace_with_module(graph_module, node, Gate(), (signal, gate), "gate")
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)
