"""The columns of the supplement's Tables A.2-A.19 as Quantus (>= 0.6) metrics.

Two presets: ``"paper"`` (the paper's settings) and ``"fast"`` (fewer samples and steps, for
searches). What differs from calling Quantus 0.6 with its defaults, and why:

- Explanations are normalized by their second moment *per sample* (Quantus' default normalizes
  over the whole batch); pixel flipping is not normalized, as in the paper.
- A score depends neither on the batch size nor on the other images of a batch: Quantus reseeds
  ``RandomLogit`` per batch and draws subsets and noise per batch from numpy's global state. So
  faithfulness correlation and random logit score one image at a time, seeded from the image's
  bytes and ``seed``; the sensitivities draw their noise per image from a generator seeded the
  same way (``ImageSeededNoise``); the deterministic metrics run on whole batches.
- Pixel flipping and faithfulness correlation perturb whole pixels (all channels), as the paper
  did with Quantus' earlier unbatched functions: Quantus 0.6 perturbs channel values. Both
  metrics see a one-channel *pixel mask* of ones and a model that replaces masked-out pixels by
  the baseline (``PixelMask``); Quantus' own batched replacement does the perturbing.
- Sensitivities are divided by the norm of the input, as in the paper (Quantus 0.6 divides by the
  explanation's norm).
- Baselines are the scalar 0 (the mean pixel of the normalized data).
- Two AoPC columns from the same curve: ``aopc`` measures the drop from the unperturbed
  prediction (the standard definition, the default), ``aopc_paper`` from the first perturbed step
  (what the paper's code computes; it inflates differences).

Deviations that remain: pixel flipping needs the step to divide ``H * W``; the step is the
divisor closest to the paper's 448 of 224 * 224 pixels (32 pixels, 128 steps, at 64x64).
"""

from __future__ import annotations

import functools
import zlib
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

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


COLUMNS = {
    "sparseness": Column("Sparseness", True),
    "faithfulness_correlation": Column("Faithfulness corr.", True),
    "aopc": Column("AoPC", True),
    "rma": Column("RMA", True),
    "rra": Column("RRA", True),
    "random_logit": Column("Random logit", False),
    "avg_sensitivity": Column("Avg. sensitivity", False),
    "max_sensitivity": Column("Max. sensitivity", False),
    "aopc_paper": Column("AoPC (paper's ref.)", True),
}
TABLE_COLUMNS = tuple(c for c in COLUMNS if c != "aopc_paper")


@dataclass(frozen=True)
class Preset:
    """Sample counts, perturbation sizes and noise of the metrics; ``"paper"`` is the paper's."""

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


class Bound(nn.Module):
    """``model`` with its inputs after the image fixed (a Relation Network's question)."""

    def __init__(self, model: nn.Module, *extra: Tensor) -> None:
        super().__init__()
        self.model, self.extra = model, extra
        self.train(model.training)

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image, *self.extra)


class PixelMask(nn.Module):
    """``model`` applied to ``images`` with the pixels where the (N, 1, H, W) input is 0 set to ``baseline``."""

    def __init__(self, model: nn.Module, images: Tensor, baseline: float = 0.0) -> None:
        super().__init__()
        self.model, self.images, self.baseline = model, images, baseline
        self.train(model.training)

    def forward(self, keep: Tensor) -> Tensor:
        keep = keep.to(self.images)
        return self.model(self.images * keep + self.baseline * (1 - keep))


def image_seed(image: np.ndarray, seed: int) -> int:
    """A seed from an image's bytes and ``seed``: the random draws for an image depend on nothing else."""
    return zlib.crc32(np.ascontiguousarray(image).tobytes()) ^ (seed % 2 ** 32)


class ImageSeededNoise:
    """Quantus' uniform noise, drawn per image from a generator seeded by the image itself, so the
    noise an image gets does not depend on its batch (Quantus draws one array per batch)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generators: dict[tuple[int, int], np.random.Generator] = {}

    def __call__(self, arr: np.ndarray, indices: np.ndarray, lower_bound: float, **_: Any) -> np.ndarray:
        perturbed = arr.copy()
        seen: dict[int, int] = {}
        for row, image in enumerate(arr):
            key = image_seed(image, self.seed)
            seen[key] = seen.get(key, -1) + 1  # a repeated image gets its own stream
            generator = self.generators.setdefault((key, seen[key]), np.random.default_rng([key, seen[key]]))
            noise = generator.uniform(-lower_bound, lower_bound, image.shape).astype(arr.dtype)
            perturbed[row, indices[row]] += noise[indices[row]]
        return perturbed


def flip_step(pixels: int, fraction: float) -> int:
    """The divisor of ``pixels`` closest to ``fraction * pixels`` (Quantus needs the step to divide them)."""
    divisors = [d for d in range(1, pixels + 1) if pixels % d == 0]
    return min(divisors, key=lambda d: abs(d - fraction * pixels))


def aopc(curve: np.ndarray, reference: float) -> float:
    """Area over the perturbation curve: mean drop of the explained output below ``reference``."""
    return float(np.mean(reference - np.asarray(curve)))


@functools.cache
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


def score_batch(model: nn.Module, x: Tensor, y: Tensor, a: np.ndarray, mask: Tensor | None,
                explain: Callable[..., np.ndarray], *, extra: tuple[Tensor, ...] = (), num_classes: int,
                preset: str | Preset = "paper", seed: int = 0, columns: tuple[str, ...] = tuple(COLUMNS)
                ) -> tuple[list[dict[str, float]], np.ndarray]:
    """Scores of the explanations ``a`` (N, 1, H, W) of images ``x`` (N, C, H, W) for classes ``y``,
    one dict per image, and the pixel-flipping curves (N, steps: probability of ``y`` after each step).

    ``extra`` are the model's further inputs per image; ``explain`` is the Quantus explain function
    used by the metrics that explain again (random logit, sensitivities). Columns that need a mask
    are NaN without one. An image's scores do not depend on the other images of the batch.
    """
    quantus, settings = _quantus(), get_preset(preset)
    common = _common(quantus)
    n, pixels = len(x), x.shape[-1] * x.shape[-2]
    x_np, y_np = x.detach().cpu().numpy(), y.detach().cpu().numpy()
    model = Bound(model, *extra)
    call = {"x_batch": x_np, "y_batch": y_np, "a_batch": a, "explain_func": explain, "batch_size": n}
    masked_call = {**call, "model": PixelMask(model, x.detach()), "x_batch": np.ones((n, 1, *x.shape[-2:]), np.float32)}
    scores: dict[str, np.ndarray] = {}
    curves = np.zeros((n, 0))
    if "sparseness" in columns:
        scores["sparseness"] = quantus.Sparseness(abs=True, **common)(model=model, **call)
    if {"aopc", "aopc_paper"} & set(columns):
        metric = quantus.PixelFlipping(features_in_step=flip_step(pixels, settings.flip_fraction),
                                       perturb_baseline=0.0, abs=False, **{**common, "normalise": False})
        curves = np.asarray(metric(**masked_call, softmax=True))
        with torch.no_grad():
            unperturbed = torch.softmax(model(x), 1)[torch.arange(n), y].numpy()
        scores["aopc"] = np.array([aopc(c, p) for c, p in zip(curves, unperturbed)])
        scores["aopc_paper"] = np.array([aopc(c[1:], c[0]) for c in curves])
    for name, metric_class in (("rma", quantus.RelevanceMassAccuracy), ("rra", quantus.RelevanceRankAccuracy)):
        if name in columns:
            scores[name] = np.full(n, np.nan) if mask is None else metric_class(abs=True, **common)(
                model=model, s_batch=mask.detach().cpu().numpy().astype(float), **call)
    input_norms = np.linalg.norm(x_np.reshape(n, -1), axis=1)
    for name, metric_class in (("avg_sensitivity", quantus.AvgSensitivity),
                               ("max_sensitivity", quantus.MaxSensitivity)):
        if name in columns:
            metric = metric_class(nr_samples=settings.sensitivity_samples, lower_bound=settings.noise,
                                  perturb_func=ImageSeededNoise(seed), norm_denominator=lambda a, **_: input_norms,
                                  abs=False, **common)
            scores[name] = metric(model=model, **call)
    for i in range(n):  # Quantus draws these per batch from numpy's global state: one image at a time
        one = {**call, "x_batch": x_np[i:i + 1], "y_batch": y_np[i:i + 1], "a_batch": a[i:i + 1], "batch_size": 1}
        image = image_seed(x_np[i], seed)
        if "faithfulness_correlation" in columns:
            np.random.seed(image)
            metric = quantus.FaithfulnessCorrelation(
                nr_runs=settings.faithfulness_runs, subset_size=max(1, round(settings.faithfulness_fraction * pixels)),
                perturb_baseline=0.0, abs=False, return_aggregate=False, **common)
            scores.setdefault("faithfulness_correlation", np.full(n, np.nan))[i] = np.asarray(metric(
                **{**one, "model": PixelMask(Bound(model.model, *(e[i:i + 1] for e in extra)), x[i:i + 1].detach()),
                   "x_batch": np.asarray(masked_call["x_batch"])[i:i + 1]}))[0]
        if "random_logit" in columns:
            metric = quantus.RandomLogit(num_classes=num_classes, seed=image, abs=False, **common)
            scores.setdefault("random_logit", np.full(n, np.nan))[i] = np.asarray(metric(
                model=Bound(model.model, *(e[i:i + 1] for e in extra)), **one))[0]
    return [{k: float(v[i]) for k, v in scores.items()} for i in range(n)], curves
