"""Linear/Conv/ConvTranspose -> BatchNorm folded into the layer (supplement A.1-A.5)."""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import ForwardFold, forward_fold
from ..mutation import fold_hazard
from ..report import FORWARD, Fold
from ..rewrite import finish
from ..views import call_input
from ._base import CanonizationPass


class FoldBatchNormForward(CanonizationPass):
    """``BN(W x + b) = (diag(s) W) x + (s * b + t)``  (A.1-A.5).

    The BatchNorm's scale multiplies the producer's *output* channels: dim 0 of Linear/ConvNd
    weights, the grouped dim 1 of ConvTransposeNd weights. A position-dependent bias already in
    the layer is scaled alike. Applies when the producer's output feeds only the BatchNorm and the
    BatchNorm's channel axis is provably the producer's output-channel axis.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for bn, entry, affine in self.batchnorms(graph_module):
            plan = forward_fold(graph_module, bn, self.folder.graph_params)
            if isinstance(plan, ForwardFold):
                hazard = fold_hazard(graph_module, (bn.node, plan.producer.node))
                plan = hazard if hazard is not None else plan
            if not isinstance(plan, ForwardFold) or not self.folder.supports(plan.producer):
                if not entry.folds:
                    entry.left_reason = f"not after a layer: {plan if isinstance(plan, str) else 'unsupported'}"
                continue
            fused = self.folder.fold_output(graph_module, plan, affine)
            bn.node.replace_all_uses_with(fused)
            graph_module.graph.erase_node(bn.node)
            self.guard(graph_module, call_input(fused), plan.guard, fused, bn, entry)
            entry.folds.append(Fold(fused.name, FORWARD))
            entry.left_reason = None
            modified = True
        finish(graph_module, modified)
        return PassResult(graph_module, modified)
