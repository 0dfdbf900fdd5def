"""Every normalization a canonized model still runs, including those no pass could read.

A BatchNorm the passes cannot view (parameters computed in the graph, a mode flag that is not a
constant, ``torch.native_batch_norm``, a subclass kept as a leaf module, one inside a leaf module
or a nested GraphModule) is still in the model: the report must say so.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .report import Report
from .views import batchnorm_view

_BATCHNORM_FUNCTIONS = {F.batch_norm, torch.batch_norm, torch.native_batch_norm,
                        torch._native_batch_norm_legit_no_training, torch.cudnn_batch_norm,
                        torch.ops.aten.batch_norm.default, torch.ops.aten.native_batch_norm.default,
                        torch.ops.aten._native_batch_norm_legit_no_training.default}


def is_batchnorm_call(gm: GraphModule, node: Node) -> bool:
    """True if ``node`` runs a BatchNorm, in any spelling, directly (not inside a leaf module)."""
    if node.op == "call_function":
        return node.target in _BATCHNORM_FUNCTIONS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)


def _unread_reason(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return f"{type(module).__name__} is not a BatchNorm type fxcanon reads (register it, or trace through it)"
    if batchnorm_view(gm, node) is None:
        return f"{getattr(node.target, '__name__', node.target)}: statistics, parameters or mode are not constants"
    return "not analysed"


def _inner_batchnorms(module: nn.Module, prefix: str) -> Iterator[tuple[str, str]]:
    """(name, reason) for BatchNorms run inside a leaf module or a nested GraphModule."""
    if isinstance(module, GraphModule):
        for node in module.graph.nodes:
            if is_batchnorm_call(module, node):
                yield f"{prefix}.{node.name}", "inside a nested GraphModule (canonicalize it on its own)"
            elif node.op == "call_module":
                yield from _inner_batchnorms(module.get_submodule(node.target), f"{prefix}.{node.target}")
        return
    for name, child in module.named_modules():
        if name and isinstance(child, nn.modules.batchnorm._BatchNorm):
            yield f"{prefix}.{name}", f"inside leaf module {type(module).__name__} (not traced through)"


def record_unread(gm: GraphModule, report: Report) -> None:
    """Add a report entry for every BatchNorm still in ``gm`` that no pass reported."""
    for node in gm.graph.nodes:
        if is_batchnorm_call(gm, node):
            if node.name not in report.entries:
                report.entry(node.name, str(node.target) if node.op == "call_module" else node.name).left_reason = \
                    _unread_reason(gm, node)
        elif node.op == "call_module":
            for name, reason in _inner_batchnorms(gm.get_submodule(node.target), str(node.target)):
                report.entry(name, name).left_reason = reason
