"""The columns of the supplement's Tables A.2-A.19 as Quantus (>= 0.6) metrics, scored one image at a time.

Two presets: ``"paper"`` (the paper's settings) and ``"fast"`` (fewer samples and steps, for
searches). What differs from calling Quantus 0.6 with its defaults, and why:

- Explanations are normalized by their second moment *per sample* (Quantus' default normalizes
  over the whole batch); pixel flipping is not normalized, as in the paper.
- Each image is scored alone, with the random state seeded from ``(seed, image index)``, so a
  score depends neither on the batch size nor on the other images of a batch (Quantus reseeds
  ``RandomLogit`` per batch and draws noise and subsets per batch).
- Pixel flipping and faithfulness correlation perturb whole pixels (all channels), as the paper
  did with Quantus' earlier unbatched functions: Quantus 0.6 perturbs channel values. Both
  metrics see a one-channel *pixel mask* of ones and a model that replaces masked-out pixels by
  the baseline (``PixelMask``); Quantus' own batched replacement does the perturbing.
- Sensitivities are divided by the norm of the input, as in the paper (Quantus 0.6 divides by the
  explanation's norm).
- Baselines are the scalar 0 (the mean pixel of the normalized data).

Deviations that remain: pixel flipping needs the step to divide ``H * W``; the step is the
divisor closest to the paper's 448 of 224 * 224 pixels (32 pixels, 128 steps, at 64x64).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

PAPER_PIXEL_FRACTION = 448 / (224 * 224)


@dataclass(frozen=True)
class Column:
    """A table column: its heading and whether larger is better."""

    name: str
    higher_is_better: bool
    needs_mask: bool = False

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


COLUMNS = {
    "sparseness": Column("Sparseness", True),
    "faithfulness_correlation": Column("Faithfulness corr.", True),
    "aopc": Column("AoPC", True),
    "rma": Column("RMA", True, needs_mask=True),
    "rra": Column("RRA", True, needs_mask=True),
    "random_logit": Column("Random logit", False),
    "avg_sensitivity": Column("Avg. sensitivity", False),
    "max_sensitivity": Column("Max. sensitivity", False),
    "aopc_paper": Column("AoPC (paper's ref.)", True),
}
TABLE_COLUMNS = tuple(c for c in COLUMNS if c != "aopc_paper")


@dataclass(frozen=True)
class Preset:
    """Sample counts of the randomized metrics."""

    faithfulness_runs: int = 100
    faithfulness_fraction: float = 0.01
    flip_fraction: float = PAPER_PIXEL_FRACTION
    sensitivity_samples: int = 10
    noise: float = 0.2


PRESETS = {"paper": Preset(), "fast": Preset(faithfulness_runs=20, flip_fraction=1 / 32, sensitivity_samples=3)}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset]


class PixelMask(nn.Module):
    """``model`` applied to ``image`` with the pixels where the (N, 1, H, W) input is 0 set to ``baseline``."""

    def __init__(self, model: nn.Module, image: Tensor, baseline: float = 0.0) -> None:
        super().__init__()
        self.model, self.image, self.baseline = model, image, baseline
        self.train(model.training)

    def forward(self, keep: Tensor) -> Tensor:
        keep = keep.to(self.image)
        return self.model(self.image * keep + self.baseline * (1 - keep))


def flip_step(pixels: int, fraction: float) -> int:
    """The divisor of ``pixels`` closest to ``fraction * pixels`` (Quantus needs the step to divide them)."""
    divisors = [d for d in range(1, pixels + 1) if pixels % d == 0]
    return min(divisors, key=lambda d: abs(d - fraction * pixels))


def aopc(curve: np.ndarray, reference: float) -> float:
    """Area over the perturbation curve: mean drop of the explained output below ``reference``."""
    return float(np.mean(reference - np.asarray(curve)))


@functools.lru_cache(maxsize=None)
def _quantus() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import quantus
    return quantus


def _common(quantus: Any) -> dict[str, Any]:
    return {"normalise": True, "normalise_func": quantus.normalise_func.normalise_by_average_second_moment_estimate,
            "normalise_func_kwargs": {"normalise_axes": (1, 2, 3)}, "disable_warnings": True,
            "display_progressbar": False}


def score_image(model: nn.Module, x: Tensor, y: int, a: np.ndarray, mask: Tensor | None,
                explain: Callable[..., np.ndarray], *, num_classes: int, preset: str | Preset = "paper",
                seed: int = 0, columns: tuple[str, ...] = tuple(COLUMNS)) -> tuple[dict[str, float], np.ndarray]:
    """Scores of one explanation ``a`` (1, 1, H, W) of image ``x`` (1, C, H, W) for class ``y``, and
    the pixel-flipping curve (probability of ``y`` after each step).

    ``model`` takes the image alone (bind further inputs first); ``explain`` is the Quantus explain
    function used by the metrics that explain again (random logit, sensitivities). Columns that
    need a mask are NaN without one.
    """
    quantus, settings = _quantus(), get_preset(preset)
    common = _common(quantus)
    x_np, y_np, pixels = x.detach().numpy(), np.array([y]), x.shape[-1] * x.shape[-2]
    s_np = None if mask is None else mask.detach().numpy().astype(float)
    keep = np.ones((1, 1, *x.shape[-2:]), np.float32)
    masked = PixelMask(model, x.detach())
    call = {"x_batch": x_np, "y_batch": y_np, "a_batch": a, "explain_func": explain, "batch_size": 1}
    scores: dict[str, float] = {}
    curve = np.array([])

    def seeded(offset: int) -> None:
        np.random.seed((seed * 1_000_003 + offset) % 2 ** 32)

    if "sparseness" in columns:
        scores["sparseness"] = quantus.Sparseness(abs=True, **common)(model=model, **call)[0]
    if "faithfulness_correlation" in columns:
        seeded(1)
        metric = quantus.FaithfulnessCorrelation(
            nr_runs=settings.faithfulness_runs, subset_size=max(1, round(settings.faithfulness_fraction * pixels)),
            perturb_baseline=0.0, abs=False, return_aggregate=False, **common)
        scores["faithfulness_correlation"] = metric(model=masked, **{**call, "x_batch": keep})[0]
    if {"aopc", "aopc_paper"} & set(columns):
        metric = quantus.PixelFlipping(features_in_step=flip_step(pixels, settings.flip_fraction),
                                       perturb_baseline=0.0, abs=False, **{**common, "normalise": False})
        curve = np.asarray(metric(model=masked, **{**call, "x_batch": keep}, softmax=True)[0])
        with torch.no_grad():
            unperturbed = float(torch.softmax(model(x), 1)[0, y])
        scores["aopc"], scores["aopc_paper"] = aopc(curve, unperturbed), aopc(curve[1:], curve[0])
    for name, metric_class in (("rma", quantus.RelevanceMassAccuracy), ("rra", quantus.RelevanceRankAccuracy)):
        if name in columns:
            scores[name] = np.nan if s_np is None else metric_class(abs=True, **common)(model=model, s_batch=s_np,
                                                                                      **call)[0]
    if "random_logit" in columns:
        metric = quantus.RandomLogit(num_classes=num_classes, seed=(seed * 1_000_003 + 2) % 2 ** 32, abs=False,
                                     **common)
        scores["random_logit"] = metric(model=model, **call)[0]
    norm_of_input = functools.partial(_input_norm, float(np.linalg.norm(x_np)))
    for offset, (name, metric_class) in enumerate((("avg_sensitivity", quantus.AvgSensitivity),
                                                   ("max_sensitivity", quantus.MaxSensitivity)), 3):
        if name in columns:
            seeded(offset)
            metric = metric_class(nr_samples=settings.sensitivity_samples, lower_bound=settings.noise,
                                  norm_denominator=norm_of_input, abs=False, **common)
            scores[name] = metric(model=model, **call)[0]
    return {k: float(v) for k, v in scores.items()}, curve


def _input_norm(norm: float, a: np.ndarray, **_: Any) -> np.ndarray:
    return np.full(a.shape[0], norm)
