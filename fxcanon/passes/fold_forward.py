"""Linear/Conv/ConvTranspose -> BatchNorm folded into the layer (supplement A.1-A.5)."""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..affine import ForwardFold, forward_fold
from ..fold_math import fold_into_output
from ..report import FORWARD, Fold
from ..rewrite import build_layer, finish, install_layer, layer_tensors
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
        for bn, entry, s, t in self.batchnorms(graph_module):
            plan = forward_fold(graph_module, bn)
            if not isinstance(plan, ForwardFold):
                if not entry.folds:
                    entry.left_reason = f"not after a layer: {plan}"
                continue
            producer = plan.producer
            tensors = fold_into_output(layer_tensors(producer), s, t, transposed=producer.transposed,
                                       groups=producer.groups)
            fused = install_layer(graph_module, producer, build_layer(producer, tensors, producer.input_pad))
            bn.node.replace_all_uses_with(fused)
            graph_module.graph.erase_node(bn.node)
            entry.folds.append(Fold(fused.name, FORWARD))
            entry.left_reason = None
            modified = True
        if modified:
            finish(graph_module)
        return PassResult(graph_module, modified)
