"""Fused layers: what a canonized graph calls.

Each fused layer subclasses the standard layer it replaces (``FusedConv2d`` is an
``nn.Conv2d``) and keeps ``weight`` and ``bias`` as Parameters, so LRP libraries that pick
rules by layer type and modify ``weight``/``bias`` by name see an ordinary layer.

A BatchNorm folded *into the input* of a zero-padded convolution leaves a bias that depends on
the output position (supplement A.10-A.20). Convolutions and transposed convolutions therefore
carry two optional Parameters with the weight's layout:

* ``bias_kernel`` ``K = W * t`` (the BatchNorm shift ``t`` spread over the input channels), whose
  response to an all-ones input with the layer's own padding is the position-dependent part of
  the bias: ``B = conv(P(1), K) + bias``;
* ``pad_kernel`` ``W * v`` for an explicit ``F.pad(..., value=v)`` between the BatchNorm and the
  layer (``input_pad`` holds that padding; the graph then pads with 0 and this kernel restores v).

The layer output is ``conv(x, weight) + bias + bias_map(x)``. Rules that zero or clamp biases must
treat ``bias_kernel`` and ``pad_kernel`` like ``bias`` (zennit's parameter modifiers visit every
Parameter of a layer; ``zero_params`` must name all three). The bias map is computed on every
forward from the kernels as they are (:func:`conv_bias_map`, also what the ``torch.compile``
backend emits): never stale, whatever edits the Parameters (``load_state_dict``, ``.data``,
``vector_to_parameters``), differentiable in the kernels, and free of data-dependent branches, so
a canonized model exports (``torch.export``) and compiles as one graph. Its cost is one
convolution of a one-channel map per forward (``benchmarks/RESULTS.md``, "fused layers").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE: dict[int, Callable[..., Tensor]] = {1: F.conv_transpose1d, 2: F.conv_transpose2d,
                                                     3: F.conv_transpose3d}


def _channel_sum(kernel: Tensor, transposed: bool, groups: int) -> Tensor:
    """The kernel of a one-input-channel layer (groups=1) with the same response to all-ones:
    input channels summed within each group, ``(out, 1, k...)`` for ConvNd, ``(1, out, k...)`` for
    ConvTransposeNd (whose weight is ``(in, out/groups, k...)``)."""
    if not transposed:
        return kernel.sum(1, keepdim=True)
    in_channels, per_group = kernel.shape[:2]
    grouped = kernel.reshape(groups, in_channels // groups, per_group, *kernel.shape[2:])
    return grouped.sum(1).reshape(1, groups * per_group, *kernel.shape[2:])


def _masks(x: Tensor, spatial_dims: int, input_pad: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """One-channel all-ones of x's spatial size (batch 1; unbatched stays unbatched), split into
    the interior and the ring of an explicit padding ``input_pad`` (None without one)."""
    shape = (1,) * (x.dim() - spatial_dims) + tuple(x.shape[x.dim() - spatial_dims:])
    if not input_pad:
        return x.new_ones(shape), None
    inner = list(shape)
    for i in range(len(input_pad) // 2):
        inner[-1 - i] -= input_pad[2 * i] + input_pad[2 * i + 1]
    interior = F.pad(x.new_ones(inner), input_pad)
    return interior, 1 - interior


def conv_bias_map(x: Tensor, bias_kernel: Tensor | None, pad_kernel: Tensor | None = None, *, spatial_dims: int,
                  transposed: bool, stride: tuple[int, ...], padding: tuple[int, ...] | str,
                  dilation: tuple[int, ...], groups: int, output_padding: tuple[int, ...] = (),
                  input_pad: tuple[int, ...] = ()) -> Tensor:
    """The position-dependent bias for input ``x`` (A.10-A.20), broadcasting over the batch:
    ``conv(P(1), bias_kernel) + conv(ring, pad_kernel)`` for a (transposed) convolution with these
    hyperparameters, ``P(1)`` being all-ones of x's size inside an explicit padding ``input_pad``.

    Computed on one input channel: all-ones look alike in every channel, so each kernel is summed
    over its input channels first (``in/groups`` times fewer products than a convolution of
    all-ones). No cache and no data-dependent branch: right after any edit of the kernels, and
    one graph under ``torch.export`` and ``torch.compile``.
    """
    interior, ring = _masks(x, spatial_dims, input_pad)
    responses = []
    for mask, kernel in ((interior, bias_kernel), (ring, pad_kernel)):
        if kernel is not None:
            assert mask is not None  # a pad kernel comes with its padding
            summed = _channel_sum(kernel.to(x.dtype), transposed, groups)
            responses.append(
                _CONV_TRANSPOSE[spatial_dims](mask, summed, None, stride, padding, output_padding, 1, dilation)
                if transposed else _CONV[spatial_dims](mask, summed, None, stride, padding, dilation, 1))
    return responses[0] if len(responses) == 1 else responses[0] + responses[1]


if TYPE_CHECKING:  # what the mixins are mixed into
    _ConvBase = nn.modules.conv._ConvNd
    _ConvTransposeBase = nn.modules.conv._ConvTransposeNd
else:
    _ConvBase = _ConvTransposeBase = object


class _FusedLayer:
    """What every fused layer shares with the standard layer it subclasses, but initialization on
    the meta device: tensors there hold no data (``fxcanon.rewrite.build_layer`` builds a layer
    there, then gives it every parameter)."""

    weight: Tensor

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()  # type: ignore[misc]


class _BiasMapMixin(_FusedLayer, _ConvBase):
    """Adds ``bias_map(x)`` (see module docstring) to a convolution-like layer."""

    bias_kernel: nn.Parameter | None
    pad_kernel: nn.Parameter | None
    input_pad: tuple[int, ...]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_parameter("bias_kernel", None)
        self.register_parameter("pad_kernel", None)
        self.input_pad = ()

    @property
    def has_bias_map(self) -> bool:
        return self.bias_kernel is not None or self.pad_kernel is not None

    def bias_map(self, x: Tensor, output_padding: tuple[int, ...] | None = None) -> Tensor | None:
        """The position-dependent bias for input ``x`` (broadcasts over the batch), or None.
        ``output_padding``: a transposed layer's for this call (default: the layer's own)."""
        if not self.has_bias_map:
            return None
        return conv_bias_map(x, self.bias_kernel, self.pad_kernel, spatial_dims=len(self.kernel_size),
                             transposed=self.transposed, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, groups=self.groups,
                             output_padding=tuple(self.output_padding) if output_padding is None else output_padding,
                             input_pad=self.input_pad)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.has_bias_map:
            text += ", bias_map=True"
        if self.input_pad:
            text += f", input_pad={self.input_pad}"
        return text


class _FusedConvNd(_BiasMapMixin):
    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        bias_map = self.bias_map(x)
        return y if bias_map is None else y + bias_map


class _FusedConvTransposeNd(_BiasMapMixin, _ConvTransposeBase):
    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        y = super().forward(x, output_size)
        if not self.has_bias_map:
            return y
        padding = cast(tuple[int, ...], self.padding)  # transposed layers take no string padding
        output_padding = self._output_padding(x, output_size, list(self.stride), list(padding),
                                              list(self.kernel_size), len(self.kernel_size), list(self.dilation))
        bias_map = self.bias_map(x, tuple(output_padding))
        assert bias_map is not None
        return y + bias_map


def threshold_relu(x: Tensor, threshold: Tensor, sign: Tensor) -> Tensor:
    """``h(x)`` of :class:`ThresholdReLU` for per-channel (dim 1) ``threshold`` and ``sign``: ``x``
    clamped from below at ``threshold`` where ``sign > 0``, from above where ``sign < 0``, and to
    ``threshold = 0`` where ``sign == 0``. Branch-free (one graph under ``torch.export`` and
    ``torch.compile``); NaN propagates as in ReLU."""
    shape = (-1,) + (1,) * (x.dim() - 2)
    theta, sign = threshold.to(x.dtype).reshape(shape), sign.reshape(shape)
    upper, lower = theta.masked_fill(sign > 0, math.inf), theta.masked_fill(sign < 0, -math.inf)
    return torch.maximum(torch.minimum(x, upper), lower)


class ThresholdReLU(nn.ReLU):
    """``h(x)``: what remains of ``ReLU(s * x + t)`` once the affine map moved past it.

    ``ReLU(s * x + t) = s * h(x) + t'`` with ``h(x) = max(x, theta)`` where ``s > 0``,
    ``min(x, theta)`` where ``s < 0`` and ``0`` where ``s = 0``; ``theta = -t / s``. The gate
    ``x > theta`` (``x < theta``) is ReLU's gate, so gradients see the same mask. A subclass of
    ``nn.ReLU`` so that LRP composites treat it as an activation. ``sign`` and ``threshold`` are
    per-channel buffers along dim 1 (the last dim for rank-1/2 inputs is dim 1 as well).
    """

    threshold: Tensor
    sign: Tensor

    def __init__(self, threshold: Tensor, sign: Tensor) -> None:
        super().__init__()
        self.register_buffer("threshold", threshold)
        self.register_buffer("sign", sign)

    def forward(self, x: Tensor) -> Tensor:
        return threshold_relu(x, self.threshold, self.sign)

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}"


class Sum(nn.Module):
    """Sum over the last dimension: ``Sum()(torch.stack([a, b], -1)) == a + b``.

    Residual joins become this module (the layout of zennit's ``zennit.layer.Sum``), so LRP
    libraries can attach a rule to the join.
    """

    def forward(self, stacked: Tensor) -> Tensor:
        return stacked.sum(dim=-1)


class Gate(nn.Module):
    """A multiplicative gate ``signal * gate`` (squeeze-excitation's ``scale * x``) as a module,
    so that LRP composites can send the relevance to the signal and none to the gate."""

    def forward(self, signal: Tensor, gate: Tensor) -> Tensor:
        return signal * gate


class FusedLinear(_FusedLayer, nn.Linear):
    """An ``nn.Linear`` whose weight and bias absorbed one or more BatchNorms."""


class FusedConv1d(_FusedConvNd, nn.Conv1d):
    """An ``nn.Conv1d`` with BatchNorms folded in; optional bias map (module docstring)."""


class FusedConv2d(_FusedConvNd, nn.Conv2d):
    """An ``nn.Conv2d`` with BatchNorms folded in; optional bias map (module docstring)."""


class FusedConv3d(_FusedConvNd, nn.Conv3d):
    """An ``nn.Conv3d`` with BatchNorms folded in; optional bias map (module docstring)."""


class FusedConvTranspose1d(_FusedConvTransposeNd, nn.ConvTranspose1d):
    """An ``nn.ConvTranspose1d`` with BatchNorms folded in; optional bias map."""


class FusedConvTranspose2d(_FusedConvTransposeNd, nn.ConvTranspose2d):
    """An ``nn.ConvTranspose2d`` with BatchNorms folded in; optional bias map."""


class FusedConvTranspose3d(_FusedConvTransposeNd, nn.ConvTranspose3d):
    """An ``nn.ConvTranspose3d`` with BatchNorms folded in; optional bias map."""


# fused type -> the standard layer it stands for
FUSED_TYPES: dict[type, type] = {
    FusedLinear: nn.Linear,
    FusedConv1d: nn.Conv1d,
    FusedConv2d: nn.Conv2d,
    FusedConv3d: nn.Conv3d,
    FusedConvTranspose1d: nn.ConvTranspose1d,
    FusedConvTranspose2d: nn.ConvTranspose2d,
    FusedConvTranspose3d: nn.ConvTranspose3d,
}
FUSED_FOR = {base: fused for fused, base in FUSED_TYPES.items()}
