"""Every normalization a canonized model still runs, including those no pass could read.

A BatchNorm the passes cannot view (parameters computed in the graph, a mode flag that is not a
constant, an aten overload, a subclass kept as a leaf module, one inside a leaf module or a nested
GraphModule) is still in the model: the report must say so. Norm calls of every kind in
``fxcanon.kinds`` are reported; all but InstanceNorms that normalize with the statistics of each
sample count as BatchNorms (:func:`is_batchnorm_call`): those are no fixed affine map, so a
canonized model may keep them (reported with code ``PER_SAMPLE_STATISTICS``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .kinds import INSTANCE_NORM, function_kind, module_kind
from .report import INSIDE, UNREAD, Refusal, Report
from .views import batchnorm_view, bind_args, submodule

# BatchNorm spellings no view reads
_UNREAD_FUNCTIONS = {torch.cudnn_batch_norm, torch.ops.aten.batch_norm.default,
                     torch.ops.aten.native_batch_norm.default,
                     torch.ops.aten._native_batch_norm_legit_no_training.default}
_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def is_norm_call(gm: GraphModule, node: Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """True if ``node`` runs a BatchNorm or an InstanceNorm, in any spelling, directly (not inside a
    leaf module). ``modules``: ``dict(gm.named_modules())``, when the caller asks for many nodes."""
    if node.op == "call_function":
        return function_kind(node.target) is not None or node.target in _UNREAD_FUNCTIONS
    if node.op != "call_module":
        return False
    module = modules[str(node.target)] if modules is not None else submodule(gm, str(node.target))
    return isinstance(module, _NORM_MODULES) or module_kind(module) is not None


def _per_sample(module: nn.Module) -> bool:
    """True for an InstanceNorm module that normalizes with the statistics of each sample."""
    kind = module_kind(module) or (INSTANCE_NORM if isinstance(module, _NORM_MODULES[1]) else None)
    return kind is not None and not kind.flag_is_training and not kind.tracks(module)


def _per_sample_call(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return _per_sample(submodule(gm, str(node.target)))
    found = function_kind(node.target) if node.op == "call_function" else None
    if found is None or found[0].flag_is_training:
        return False
    kind, spelling = found
    return {**spelling.defaults, **bind_args(node, spelling.args)}.get(kind.flag) == kind.flag_selects


def is_batchnorm_call(gm: GraphModule, node: Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """True if ``node`` runs a norm that is a BatchNorm or acts as one (an InstanceNorm with running
    statistics), in any spelling, directly (not inside a leaf module)."""
    return is_norm_call(gm, node, modules) and not _per_sample_call(gm, node)


def _unread_reason(gm: GraphModule, node: Node) -> Refusal:
    if _per_sample_call(gm, node):
        return INSTANCE_NORM.without_statistics
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        return Refusal(UNREAD, f"{type(module).__name__} is not a norm type fxcanon reads "
                               "(register it with fxcanon.register_norm, or trace through it)")
    name = getattr(node.target, "__name__", node.target)
    found = function_kind(node.target)
    if found is None:
        return Refusal(UNREAD, f"{name}: a spelling fxcanon does not read")
    output = found[1].output
    if output is not None:
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != output:
            return Refusal(UNREAD, f"{name}: results other than the normalized tensor are used")
        node = users[0]
    if batchnorm_view(gm, node) is None:
        return Refusal(UNREAD, f"{name}: statistics, parameters or mode are not constants")
    return Refusal(UNREAD, "not analysed")


def _inner_norms(module: nn.Module, prefix: str) -> Iterator[tuple[str, Refusal]]:
    """(name, refusal) for norms run inside a leaf module or a nested GraphModule."""
    if isinstance(module, GraphModule):
        for node in module.graph.nodes:
            if is_norm_call(module, node):
                yield f"{prefix}.{node.name}", INSTANCE_NORM.without_statistics if _per_sample_call(module, node) \
                    else Refusal(INSIDE, "inside a nested GraphModule (canonicalize it on its own)")
            elif node.op == "call_module":
                yield from _inner_norms(module.get_submodule(str(node.target)), f"{prefix}.{node.target}")
        return
    for name, child in module.named_modules():
        if name and (isinstance(child, _NORM_MODULES) or module_kind(child) is not None):
            yield f"{prefix}.{name}", INSTANCE_NORM.without_statistics if _per_sample(child) \
                else Refusal(INSIDE, f"inside leaf module {type(module).__name__} (not traced through)")


def record_unread(gm: GraphModule, report: Report) -> None:
    """Add a report entry for every norm still in ``gm`` that no pass reported."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in gm.graph.nodes:
        if is_norm_call(gm, node, modules):
            if node.name not in report.entries:
                report.entry(node.name, str(node.target) if node.op == "call_module" else node.name).refusals = \
                    [_unread_reason(gm, node)]
        elif node.op == "call_module":
            for name, refusal in _inner_norms(modules[str(node.target)], str(node.target)):
                report.entry(name, name).refusals = [refusal]
