"""BatchNorm -> ReLU -> linear layers: a threshold activation, the affine map folded past it
(section 5 of the design notes; the "ThreshReLU" of the paper's DenseNet canonizer)."""

from __future__ import annotations

import dataclasses

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import BackwardFold, backward_fold, forward_folds
from ..mutation import fold_hazard
from ..report import NOT_THROUGH_RELU, THRESHOLD, Refusal
from ..rewrite import erase_norm, finish
from ..views import batchnorm_view, has_hooks, relu_after, submodule
from ._base import CanonizationPass


class FoldBatchNormThroughReLU(CanonizationPass):
    """``ReLU(s * x + t) = s * h(x) + t'`` (section 5), then ``layer(s * h + t')`` as in A.6-A.26.

    ``h`` is :class:`fxcanon.modules.ThresholdReLU` (``max(x, -t/s)`` for ``s > 0``, ``min`` for
    ``s < 0``, ``0`` for ``s = 0``, where ``t' = ReLU(t)``); ``(s, t')`` is folded into every layer the
    ReLU's output reaches through layout ops, exactly as ``FoldBatchNormBackward`` folds a
    BatchNorm. Applies when the BatchNorm feeds only the ReLU (possibly through identity ops: timm's
    ``norm -> drop -> act``) and *every* use of the ReLU's output
    can take the fold (DenseNet's ``norm -> relu -> conv``, pre-activation ResNets whose
    shortcut and main branch share the ReLU); otherwise the BatchNorm is left as it is.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for bn, entry, affine in self.batchnorms(graph_module):
            found = relu_after(graph_module, bn.node)
            if found is None:
                continue
            relu, between = found
            if relu.op == "call_module" and has_hooks(submodule(graph_module, str(relu.target))):
                continue
            plan = backward_fold(graph_module, dataclasses.replace(bn, node=relu, input=bn.node), affine.scale,
                                 self.folder.graph_params)
            if isinstance(plan, BackwardFold) and not all(self.folder.supports_sink(k) for k in plan.sinks):
                plan = "a consumer's kind is not supported here"
            if isinstance(plan, BackwardFold):
                hazard = fold_hazard(graph_module, (bn.node, relu, *(k.view.node for k in plan.sinks)), relu,
                                     bn.input, bn.node, ignore=(relu,))
                plan = hazard if hazard is not None else plan
            if not isinstance(plan, BackwardFold) or plan.left_reason is not None:
                reason = plan if isinstance(plan, str) else plan.left_reason
                if not entry.refused(NOT_THROUGH_RELU):
                    entry.refusals.append(Refusal(NOT_THROUGH_RELU, f"after its ReLU: {reason}"))
                continue
            self.guard(graph_module, bn.input, plan.guard, bn.node, bn, entry)
            shift = self.folder.threshold(graph_module, bn, relu, affine)  # relu's node computes h(x) now
            for sink in plan.sinks:
                entry.folds.append(self.folder.fold_input(graph_module, sink, affine.s, shift, rule=THRESHOLD))
            for node in reversed(between):
                graph_module.graph.erase_node(node)
            erase_norm(graph_module, bn)
            entry.refusals = []
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)


def is_pre_activation(graph_module: GraphModule) -> bool:
    """Whether some BatchNorm feeds only a ReLU and follows no layer it could fold into (DenseNet's
    ``cat -> norm -> relu -> conv``): the network normalizes before its activations, not after its layers."""
    for node in graph_module.graph.nodes:
        bn = batchnorm_view(graph_module, node)
        if bn is None or relu_after(graph_module, node) is None:
            continue
        if isinstance(forward_folds(graph_module, bn), str):
            return True
    return False
