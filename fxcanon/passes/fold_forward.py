"""Linear/Conv/ConvTranspose -> BatchNorm folded into the layer (supplement A.1-A.5)."""

from __future__ import annotations

import operator

from torch import Tensor
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import forward_folds
from ..folders import Affine
from ..mutation import fold_hazard
from ..report import FORWARD, NOT_AFTER_LAYER, Fold, Refusal
from ..rewrite import erase_norm, finish
from ..views import call_input
from ._base import CanonizationPass


class FoldBatchNormForward(CanonizationPass):
    """``BN(W x + b) = (diag(s) W) x + (s * b + t)``  (A.1-A.5).

    The BatchNorm's scale multiplies the producer's *output* channels: dim 0 of Linear/ConvNd
    weights, the grouped dim 1 of ConvTransposeNd weights. A position-dependent bias already in
    the layer is scaled alike. Applies when the producer's output feeds only the BatchNorm and the
    BatchNorm's channel axis is provably the producer's output-channel axis. A BatchNorm of a
    channel concatenation of layer outputs (MixNet's mixed convolutions) folds slice by slice:
    ``BN(cat(a, b)) = cat(BN_a(a), BN_b(b))``.
    """

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for bn, entry, affine in self.batchnorms(graph_module):
            plan = forward_folds(graph_module, bn, self.folder.graph_params)
            if not isinstance(plan, str):
                hazard = fold_hazard(graph_module, (bn.node, *(fold.producer.node for fold in plan)))
                plan = hazard if hazard is not None else plan
            if isinstance(plan, str) or not all(self.folder.supports(fold.producer) for fold in plan):
                if not entry.folds:
                    reason = plan if isinstance(plan, str) else "unsupported"
                    entry.refusals = [Refusal(NOT_AFTER_LAYER, f"not after a layer: {reason}")]
                continue
            fused = [self.folder.fold_output(graph_module, fold, _channels(graph_module, affine, fold.channels))
                     for fold in plan]
            bn.node.replace_all_uses_with(bn.input if plan[0].channels is not None else fused[0])
            erase_norm(graph_module, bn)
            self.guard(graph_module, call_input(fused[0]), plan[0].guard, fused[0], bn, entry)
            entry.folds.extend(Fold(node.name, FORWARD) for node in fused)
            entry.refusals = []
            modified = True
        finish(graph_module)
        return PassResult(graph_module, modified)


def _channels(gm: GraphModule, affine: Affine, channels: slice | None) -> Affine:
    """The affine map of some of the BatchNorm's channels (tensors, or graph nodes in Dynamo graphs)."""
    if channels is None:
        return affine
    if isinstance(affine.s, Tensor):
        return Affine(affine.s[channels], affine.t[channels], affine.s[channels])
    with gm.graph.inserting_after(affine.t):
        s = gm.graph.call_function(operator.getitem, (affine.s, channels))
    with gm.graph.inserting_after(s):
        t = gm.graph.call_function(operator.getitem, (affine.t, channels))
    return Affine(s, t, None)
