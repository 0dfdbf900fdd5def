"""Fold math: pure tensor functions, no graph. Everything is computed in float64: BatchNorm
vectors are float64, and weights of lower precision are promoted to float64 by the products
(a block at a time: a scaled weight is rounded once to its own dtype as it is computed).

Notation (``../shared/design/canonization-math.md``): an eval-mode BatchNorm is the per-channel
affine map ``BN(x) = s * x + t`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta - s * mean``.
Weights use PyTorch's layouts: ``(out, in/groups, k...)`` for Linear and ConvNd,
``(in, out/groups, k...)`` for ConvTransposeNd.

``torch.nn.utils.fusion.fuse_conv_bn_weights`` covers only the forward fold, computes in the
weights' own precision and scales ConvTranspose weights along dim 1 alone (wrong for groups > 1):
hence these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def batchnorm_affine(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float | Tensor
) -> tuple[Tensor, Tensor]:
    """``(s, t)`` of an eval-mode BatchNorm in float64 (A.3-A.4; gamma=1, beta=0 without affine).
    ``eps`` may be a float64 vector, one value per channel (several BatchNorms at once)."""
    mean, var = running_mean.double(), running_var.double()
    gamma = torch.ones_like(mean) if weight is None else weight.double()
    beta = torch.zeros_like(mean) if bias is None else bias.double()
    s = gamma / torch.sqrt(var + eps)
    return s, beta - s * mean


_BLOCK = 1 << 18  # elements per float64 block of a product


def _times(tensor: Tensor, factor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``tensor * factor`` computed in float64 and rounded once to ``tensor``'s dtype: bit for bit
    the float64 product, then the cast. A tensor of lower precision is converted a block at a time
    into its result, so no float64 copy of a large weight is ever allocated; under
    ``torch.compile`` (one traced op) and for float64 the product is a scaled float64 copy.

    With ``dtype``, ``tensor`` is a float64 copy of the caller's own (:func:`_float64_copy`,
    :func:`float64_blocks`): it is scaled in place and rounded to ``dtype``.
    """
    if dtype is not None:
        return tensor.mul_(factor).to(dtype)
    if tensor.dtype == torch.float64 or torch.compiler.is_compiling():
        return tensor.to(torch.float64, copy=True).mul_(factor)
    if tensor.numel() <= _BLOCK:  # one block
        return tensor.double().mul_(factor).to(tensor.dtype)
    out = torch.empty_like(tensor)
    dim = next((d for d, n in enumerate(tensor.shape) if n > 1), 0)  # blocks along the first dim that has any
    step = max(1, _BLOCK * tensor.shape[dim] // max(1, tensor.numel()))
    varies = factor.dim() > dim and factor.shape[dim] > 1
    for start in range(0, tensor.shape[dim], step):
        block = (slice(None),) * dim + (slice(start, start + step),)
        out[block] = tensor[block].double().mul_(factor[block] if varies else factor)
    return out


def _one_block(tensor: Tensor) -> bool:
    """True for a weight of lower precision that one block of :func:`_times` holds (outside ``torch.compile``)."""
    return tensor.dtype != torch.float64 and tensor.numel() <= _BLOCK and not torch.compiler.is_compiling()


def _float64_copy(tensor: Tensor) -> Tensor | None:
    """A float64 copy of a one-block weight (so one conversion can serve two products), else None."""
    return tensor.double() if _one_block(tensor) else None


def _scale_dim0(weight: Tensor, scale: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return _times(weight, scale.reshape(-1, *([1] * (weight.dim() - 1))), dtype)


def _scale_dim1_per_group(weight: Tensor, scale: Tensor, groups: int, dtype: torch.dtype | None = None) -> Tensor:
    """``weight[g * (n0/groups) + i, j] * scale[g * n1 + j]``: dim 1 indexes channels within a group."""
    shape = weight.shape
    grouped = weight.reshape(groups, shape[0] // groups, *shape[1:])
    return _times(grouped, scale.reshape(groups, 1, -1, *([1] * (weight.dim() - 2))), dtype).reshape(shape)


def scale_output_channels(weight: Tensor, scale: Tensor, *, transposed: bool = False, groups: int = 1,
                          in_place: bool = False) -> Tensor:
    """``diag(s) W``: scale each output channel (A.5), in ``weight``'s dtype (see :func:`_times`;
    ``in_place``: ``weight`` is a float64 copy of the caller's own, scaled in place).

    Linear/ConvNd: dim 0. ConvTransposeNd: out-channel ``g * (out/groups) + j`` lives at
    ``weight[g * (in/groups):(g + 1) * (in/groups), j]``, so dim 1 alone is right only for groups=1.
    """
    dtype = torch.float64 if in_place else None
    return _scale_dim1_per_group(weight, scale, groups, dtype) if transposed else _scale_dim0(weight, scale, dtype)


def scale_input_channels(weight: Tensor, scale: Tensor, *, transposed: bool = False, groups: int = 1) -> Tensor:
    """``W diag(s)``: scale each input channel (A.9), in ``weight``'s dtype (see :func:`_times`).

    Linear: dim 1. ConvNd: out-channel ``o`` of group ``g`` sees input channel ``g * (in/groups) + j``
    at ``weight[o, j]``. ConvTransposeNd: dim 0.
    """
    return _scale_dim0(weight, scale) if transposed else _scale_dim1_per_group(weight, scale, groups)


@dataclass(frozen=True)
class LayerTensors:
    """The tensors of a linear-like layer; kernels have the weight's layout (see modules).

    Inputs are the layer's own tensors; the fold functions return new tensors for what they change
    (biases in float64, scaled kernels rounded once to the kernel's dtype) and pass the others through.
    ``scratch``: weight and kernels are float64 copies of the folds' own (:func:`float64_blocks`),
    which a fold that reads nothing else of them scales in place."""

    weight: Tensor
    bias: Tensor
    bias_kernel: Tensor | None = None
    pad_kernel: Tensor | None = None
    scratch: bool = False


def float64_blocks(layer: LayerTensors) -> LayerTensors:
    """``layer`` with a weight of lower precision that is one block of :func:`_times` (and its kernels)
    in float64, so that folds applied one after the other are rounded once, at the end; else as it is."""
    if not _one_block(layer.weight):
        return layer
    bias_kernel, pad_kernel = (None if k is None else k.double() for k in (layer.bias_kernel, layer.pad_kernel))
    return LayerTensors(layer.weight.double(), layer.bias, bias_kernel, pad_kernel, scratch=True)


def fold_into_output(layer: LayerTensors, s: Tensor, t: Tensor, *, transposed: bool = False,
                     groups: int = 1) -> LayerTensors:
    """``BN(layer(x))`` as one layer (A.1-A.5): ``W' = diag(s) W``, ``b' = s * b + t``.

    A position-dependent bias is scaled with the weight: ``B' = s * B + t``.
    """
    def scale(kernel: Tensor) -> Tensor:
        return scale_output_channels(kernel, s, transposed=transposed, groups=groups, in_place=layer.scratch)

    return LayerTensors(scale(layer.weight), s * layer.bias + t,
                        None if layer.bias_kernel is None else scale(layer.bias_kernel),
                        None if layer.pad_kernel is None else scale(layer.pad_kernel), layer.scratch)


def fold_into_input(layer: LayerTensors, s_in: Tensor, t_in: Tensor, *, transposed: bool = False, groups: int = 1,
                    vector_bias: bool, pad_value: float | None = None) -> LayerTensors:
    """``layer(s_in * x + t_in)`` as one layer (A.6-A.9, A.10-A.15).

    ``W' = W diag(s_in)``. The shift goes through the *unscaled* weight, ``K = W diag(t_in)``: with
    ``vector_bias`` (every output position sees every tap, i.e. no zero padding) it is summed into
    ``b' = b + sum(K)``; otherwise it is added to the bias kernel, whose response to an all-ones
    input of the layer's size is the bias map ``conv(P(1), K)``.

    ``pad_value`` ``v``: the layer takes over an explicit constant padding between the BatchNorm and
    itself (the graph then pads with 0). The padded ring sees neither ``s_in`` nor ``t_in`` but the
    value ``v``, and whatever bias kernel the layer had so far, which applied to its whole input,
    ring included: both go to the ring's kernel, ``pad_kernel += v * W + K_old``.
    """
    if vector_bias and transposed:
        raise ValueError("a transposed convolution's shift is position-dependent: vector_bias must be False")
    pad_kernel = layer.pad_kernel
    if pad_value is not None and (pad_value != 0.0 or layer.bias_kernel is not None):
        ring = layer.weight.double() * pad_value
        if layer.bias_kernel is not None:
            ring = ring + layer.bias_kernel.double()
        pad_kernel = ring if pad_kernel is None else pad_kernel + ring
    if vector_bias:  # one float64 copy of the weight for the shift and the product, where one block
        weight64 = layer.weight if layer.scratch else _float64_copy(layer.weight)
        shift = _input_shift(layer.weight if weight64 is None else weight64, t_in, groups)
        weight = scale_input_channels(layer.weight, s_in, groups=groups) if weight64 is None else \
            _scale_dim1_per_group(weight64, s_in, groups, layer.weight.dtype)  # last: in place where scratch
        return replace(layer, weight=weight, bias=layer.bias + shift, pad_kernel=pad_kernel)
    weight = scale_input_channels(layer.weight, s_in, transposed=transposed, groups=groups)
    if layer.bias_kernel is None:
        bias_kernel = scale_input_channels(layer.weight, t_in, transposed=transposed, groups=groups)
    else:  # summed in float64, rounded once
        bias_kernel = layer.bias_kernel.double() + \
            scale_input_channels(layer.weight.double(), t_in, transposed=transposed, groups=groups)
    return replace(layer, weight=weight, bias_kernel=bias_kernel, pad_kernel=pad_kernel)


def _input_shift(weight: Tensor, t_in: Tensor, groups: int) -> Tensor:
    """``sum(W diag(t_in))`` per output channel of a Linear/ConvNd weight, in float64: the taps
    summed first, then one product per input channel within each group."""
    out = weight.shape[0]
    taps = weight.double().reshape(out, weight.shape[1], -1)
    taps = taps.sum(2) if taps.shape[2] > 1 else taps.reshape(out, -1)  # summing over one tap is slow
    return torch.bmm(taps.reshape(groups, out // groups, -1), t_in.reshape(groups, -1, 1)).reshape(out)


def add_identity(layer: LayerTensors, s: Tensor, t: Tensor) -> LayerTensors:
    """``layer(x) + s * x + t`` as one layer, for ``in == out`` channels, stride 1 and an odd kernel
    whose centre tap reads the output's own position: ``W'[c, c mod (in/groups), centre] = W[...] + s[c]``
    (output channel ``c`` sees its own input channel at index ``c mod (in/groups)`` of its group),
    ``b' = b + t``. Linear layers (no kernel dims): ``W'[c, c] = W[c, c] + s[c]``.
    """
    weight = layer.weight.double().clone()
    channels = torch.arange(weight.shape[0], device=weight.device)
    centre = tuple(k // 2 for k in weight.shape[2:])
    index: tuple[Tensor | int, ...] = (channels, channels % weight.shape[1], *centre)
    weight[index] += s.to(weight.device)
    return replace(layer, weight=weight, bias=layer.bias + t.to(weight.device))


def channel_affine(channel_map: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-input-channel ``(s_in, t_in)`` for a channel map (BatchNorm channel index, or -1 for
    features that do not come from the BatchNorm and keep the identity ``(1, 0)``)."""
    from_bn = channel_map >= 0
    if bool(from_bn.all()):
        return s[channel_map], t[channel_map]
    index = channel_map.clamp(min=0)
    s_in = torch.where(from_bn, s[index], torch.ones_like(s[index]))
    t_in = torch.where(from_bn, t[index], torch.zeros_like(t[index]))
    return s_in, t_in


def relu_factorization(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``ReLU(s * x + t) = s * h(x) + t2`` (section 5): returns ``(theta, sign, t2)`` of the
    threshold activation ``h`` (see ``fxcanon.modules.ThresholdReLU``) and the shift after it.

    ``theta = -t / s`` and ``t2 = t`` where ``s != 0``; a channel with ``s = 0`` is the constant
    ``ReLU(t)``: ``h = 0``, ``t2 = ReLU(t)``.
    """
    zero = s == 0
    theta = torch.where(zero, torch.zeros_like(t), -t / torch.where(zero, torch.ones_like(s), s))
    return theta, torch.sign(s), torch.where(zero, t.clamp(min=0), t)


def fused_output(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, *, transposed: bool = False,
                 groups: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`fold_into_output` on raw layer tensors, results in the weight's dtype.

    Graph-callable: the ``torch.compile`` backend emits it on the parameters the graph receives.
    """
    bias64 = torch.zeros(s.shape, dtype=torch.float64, device=weight.device) if bias is None else bias.double()
    fused = fold_into_output(LayerTensors(weight, bias64), s, t, transposed=transposed, groups=groups)
    return fused.weight.to(weight.dtype), fused.bias.to(weight.dtype)


def fused_input(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, *, channel_map: tuple[int, ...],
                transposed: bool = False, groups: int = 1, vector_bias: bool
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`fold_into_input` on raw layer tensors for a channel map; weight, bias and bias kernel
    (None with ``vector_bias``) in the weight's dtype. Graph-callable like :func:`fused_output`."""
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    bias64 = torch.zeros(out_channels, dtype=torch.float64, device=weight.device) if bias is None \
        else bias.double()
    s_in, t_in = channel_affine(torch.tensor(channel_map, device=s.device), s, t)
    fused = fold_into_input(LayerTensors(weight, bias64), s_in, t_in, transposed=transposed, groups=groups,
                            vector_bias=vector_bias)
    kernel = None if fused.bias_kernel is None else fused.bias_kernel.to(weight.dtype)
    return fused.weight.to(weight.dtype), fused.bias.to(weight.dtype), kernel
