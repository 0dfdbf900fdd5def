"""fxcanon: exact BatchNorm canonization of torch.fx graphs."""

from . import passes
from .backend import fxcanon_backend, register as _register_backend
from .canonicalize import canonicalize, trace
from .errors import CanonizationError
from .kinds import register_norm
from .modules import (FusedConv1d, FusedConv2d, FusedConv3d, FusedConvTranspose1d, FusedConvTranspose2d,
                      FusedConvTranspose3d, FusedLinear)
from .report import Refusal, Report, get_report
from .views import register_layer

__all__ = [
    "CanonizationError", "FusedConv1d", "FusedConv2d", "FusedConv3d", "FusedConvTranspose1d",
    "FusedConvTranspose2d", "FusedConvTranspose3d", "FusedLinear", "Refusal", "Report", "canonicalize",
    "get_report", "fxcanon_backend", "passes", "register_layer", "register_norm", "trace",
]

_register_backend()
