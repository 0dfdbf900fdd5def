"""Explanation quality with and without canonization (the supplement's Tables A.2-A.20), with Quantus.

    results = evaluate(model, data, composites=("eb", "epsilon_plus"), preset="paper")
    print(results.table())                       # composites x metrics x canonized no/yes, Markdown
    results.save("results/")                     # table.md, scores.csv, scores.json, pixel_flipping.png

``data`` is a :class:`fxcanon.datasets.Data` (or ``(x, y, mask)``); the model is canonized once
(``canonicalize(model)``) and once with the structural passes only (the paper's "not canonized"
baseline: explicit sums, gates and pooling, BatchNorms kept). Needs the ``eval`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .canonicalize import canonicalize
from .datasets import Data
from .metrics import COLUMNS, TABLE_COLUMNS, Bound, Preset, score_batch
from .passes import STRUCTURAL_PASSES

POOLINGS = ("sum", "max_norm", "pos_sq_sum")
PAPER_COMPOSITES = ("eb", "alpha2_beta1", "epsilon_plus")
COMPOSITE_LABELS = {"eb": "EB", "alpha2_beta1": "LRP-α2β1", "epsilon_plus": "LRP-ε+", "rn_custom": "LRP-Custom",
                    "epsilon": "LRP-ε"}


def pool(relevance: Tensor, pooling: str = "sum") -> Tensor:
    """Channel pooling to (N, 1, H, W): ``"sum"``, ``"max_norm"`` (largest absolute value) or
    ``"pos_sq_sum"`` (sum of squared positive parts, CLEVR-XAI's positive-squared-sum)."""
    if pooling == "sum":
        return relevance.sum(1, keepdim=True)
    if pooling == "max_norm":
        return relevance.abs().amax(1, keepdim=True)
    if pooling == "pos_sq_sum":
        return relevance.clamp(min=0).pow(2).sum(1, keepdim=True)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")


def explain_fn(model: nn.Module, inputs: np.ndarray | Tensor, targets: np.ndarray | Tensor | int, *,
               composite: Any = "epsilon_plus", pooling: str = "sum", init: str = "onehot",
               composite_kwargs: dict[str, Any] | None = None, **_: Any) -> np.ndarray:
    """The explain function Quantus calls: LRP relevance pooled over channels, numpy (N, 1, H, W).

    ``model`` is used as it is: pass a model canonized once beforehand (:func:`prepare`). It may
    take the image alone (:class:`Bound` fixes further inputs). ``composite`` is a name of
    :func:`fxcanon.xai.lrp_composite` (built with ``composite_kwargs``) or a zennit ``Composite``.
    """
    from .xai import attribute, lrp_composite

    if isinstance(composite, str):
        composite = lrp_composite(composite, **(composite_kwargs or {}))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs, dtype=dtype)
    target = torch.as_tensor(np.asarray(targets)).long().reshape(-1)
    relevance = attribute(model, x, target, composite, canonize=False, init=init)[0]
    return pool(relevance, pooling).detach().cpu().numpy()


def prepare(model: nn.Module, example_inputs: Sequence[Tensor]) -> dict[bool, nn.Module]:
    """The model canonized (``True``) and with the structural passes only (``False``), once each."""
    model = model.eval()
    inputs = tuple(example_inputs)
    return {False: canonicalize(model, inputs, passes=STRUCTURAL_PASSES), True: canonicalize(model, inputs)}


def as_data(data: Data | tuple[Tensor, ...]) -> Data:
    """``data`` as :class:`Data`; a tuple ``(x, y)`` or ``(x, y, mask)`` of tensors or arrays too."""
    if isinstance(data, Data):
        return data
    x, y, *rest = data
    x = torch.as_tensor(x).float()
    mask = torch.as_tensor(rest[0]) if rest and rest[0] is not None else None
    return Data(x, torch.as_tensor(y).long(), mask, low=float(x.min()), high=float(x.max()))


def composite_arguments(name: Any, data: Data) -> dict[str, Any]:
    """``rn_custom`` needs the input domain; take it from the data set, not from each batch."""
    return {"low": data.low, "high": data.high} if name == "rn_custom" else {}


def score_all(models: dict[bool, nn.Module], data: Data, explainers: Mapping[Any, Callable[..., np.ndarray]], *,
              preset: str | Preset, columns: Sequence[str], seed: int, batch_size: int,
              progress: bool, desc: str) -> tuple[list[dict[str, Any]], dict[tuple[Any, bool], np.ndarray],
                                                  dict[tuple[Any, bool], np.ndarray]]:
    """Per-image scores for every (explainer, canonized), pixel-flipping curves and the explanations."""
    from tqdm.auto import tqdm

    records, curves, maps = [], {}, {}
    bar = tqdm(total=len(explainers) * len(models) * len(data), desc=desc, disable=not progress, file=sys.stderr)
    for name, explain in explainers.items():
        for canonized, model in models.items():
            explanations, batch_curves = [], []
            for start in range(0, len(data), batch_size):
                part = data[start:start + batch_size]
                a = explain(Bound(model, *part.extra), part.x, part.y)
                scores, curve = score_batch(model, part.x, part.y, a, part.mask, explain, extra=part.extra,
                                            num_classes=data.num_classes, preset=preset, seed=seed,
                                            columns=tuple(columns))
                records += [{"explainer": name, "canonized": canonized, "image": start + i, **row}
                            for i, row in enumerate(scores)]
                explanations.append(a)
                batch_curves.append(curve)
                bar.update(len(part))
            maps[name, canonized] = np.concatenate(explanations)
            curves[name, canonized] = np.concatenate(batch_curves)
    bar.close()
    return records, curves, maps


@dataclass
class Results:
    """Per-image scores (``records``), pixel-flipping curves and explanations per (composite, canonized)."""

    records: list[dict[str, Any]]
    curves: dict[tuple[str, bool], np.ndarray]
    explanations: dict[tuple[str, bool], np.ndarray] = field(repr=False)
    columns: tuple[str, ...] = TABLE_COLUMNS
    meta: dict[str, Any] = field(default_factory=dict)

    def means(self) -> dict[tuple[str, bool], dict[str, float]]:
        """Mean score over images (NaN ignored) per (composite, canonized) and metric."""
        groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        for r in self.records:
            groups.setdefault((r["explainer"], r["canonized"]), []).append(r)
        return {key: {c: _nanmean([r.get(c, np.nan) for r in rows]) for c in self.columns}
                for key, rows in groups.items()}

    def table(self) -> str:
        """The supplement's layout in Markdown: a row per composite, no/yes per metric, the better in bold."""
        means = self.means()
        names = list(dict.fromkeys(key[0] for key in means))
        columns = [c for c in self.columns if not all(np.isnan(means[n, b][c]) for n in names for b in (False, True))]
        head = "| canonized | " + " | ".join(f"{COLUMNS[c].arrow} {COLUMNS[c].name}: no | yes" for c in columns) + " |"
        lines = [head, "|---" * (1 + 2 * len(columns)) + "|"]
        for n in names:
            cells = []
            for c in columns:
                no, yes = means[n, False][c], means[n, True][c]
                better = (max if COLUMNS[c].higher_is_better else min)(no, yes) if no != yes else None
                cells += [f"**{v:.2f}**" if better is not None and v == better and f"{no:.2f}" != f"{yes:.2f}"
                          else f"{v:.2f}" for v in (no, yes)]
            lines.append(f"| {COMPOSITE_LABELS.get(n, n)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def wins(self) -> str:
        """Markdown: per composite and metric, the share of images whose canonized score is the better one."""
        rows: dict[tuple[str, int], dict[bool, dict[str, Any]]] = {}
        for r in self.records:
            rows.setdefault((r["explainer"], r["image"]), {})[r["canonized"]] = r
        names = list(dict.fromkeys(name for name, _ in rows))
        columns = [c for c in self.columns if any(np.isfinite(r.get(c, np.nan)) for r in self.records)]
        header = " | ".join(f"{COLUMNS[c].arrow} {COLUMNS[c].name}" for c in columns)
        lines = [f"| canonized better on | {header} |", "|---" * (1 + len(columns)) + "|"]
        for n in names:
            cells = []
            for c in columns:
                pairs = [(p[False][c], p[True][c]) for (name, _), p in rows.items() if name == n]
                pairs = [(no, yes) for no, yes in pairs if np.isfinite(no) and np.isfinite(yes)]
                better = sum((yes > no) if COLUMNS[c].higher_is_better else (yes < no) for no, yes in pairs)
                cells.append(f"{better / len(pairs):.0%}" if pairs else "-")
            lines.append(f"| {COMPOSITE_LABELS.get(n, n)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, out: str | Path, prefix: str = "") -> list[Path]:
        """Write ``table.md`` (means, then the share of images canonization improves), ``scores.csv``
        (one row per image), ``scores.json`` and ``pixel_flipping.png``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{prefix}table.md", out / f"{prefix}scores.csv", out / f"{prefix}scores.json",
                 out / f"{prefix}pixel_flipping.png"]
        paths[0].write_text(f"{self.table()}\n\n{self.wins()}\n")
        keys = ["explainer", "canonized", "image", *(c for c in COLUMNS if any(c in r for r in self.records))]
        paths[1].write_text("\n".join([",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys)
                                                          for r in self.records]) + "\n")
        means = {f"{n}/{'canonized' if b else 'not canonized'}": v for (n, b), v in self.means().items()}
        paths[2].write_text(json.dumps({"meta": self.meta, "means": means, "records": self.records}, indent=1,
                                       default=float))
        plot_pixel_flipping(self.curves, paths[3])
        return paths


def _nanmean(values: Sequence[float]) -> float:
    array = np.asarray(values, dtype=float)
    return float(np.nanmean(array)) if np.isfinite(array).any() else float("nan")


def plot_pixel_flipping(curves: dict[tuple[str, bool], np.ndarray], path: Path) -> None:
    """Mean probability of the explained class against the fraction of pixels flipped (canonized solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    colours = dict(zip(dict.fromkeys(n for n, _ in curves), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for (name, canonized), curve in curves.items():
        if curve.size:
            mean = curve.mean(0)
            ax.plot(np.arange(1, len(mean) + 1) / len(mean), mean, "-" if canonized else "--", color=colours[name],
                    label=f"{COMPOSITE_LABELS.get(name, name)} ({'canonized' if canonized else 'not canonized'})")
    ax.set(xlabel="fraction of pixels flipped (most relevant first)", ylabel="probability of the class")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(model: nn.Module | dict[bool, nn.Module], data: Data | tuple[Tensor, ...],
             composites: Sequence[str] = PAPER_COMPOSITES, preset: str | Preset = "paper", *,
             pooling: str = "sum", init: str = "onehot", columns: Sequence[str] = tuple(COLUMNS),
             seed: int = 0, batch_size: int = 16, progress: bool = True,
             explain: Callable[..., np.ndarray] = explain_fn) -> Results:
    """Per-image scores and pixel-flipping curves of every composite, canonized and not.

    ``model`` is canonized once (or pass :func:`prepare`'s result). Localization columns are NaN
    without masks. Scores of an image depend on that image, the model, ``seed`` and the settings
    only: not on ``batch_size`` nor on the other images. ``explain`` replaces :func:`explain_fn`
    (same signature: it gets ``composite``, ``pooling`` and ``init`` as keywords).
    """
    data = as_data(data)
    models = model if isinstance(model, dict) else prepare(model, (data.x[:2], *(e[:2] for e in data.extra)))
    explainers = {name: _explainer(explain, name, pooling, init, composite_arguments(name, data))
                  for name in composites}
    records, curves, maps = score_all(models, data, explainers, preset=preset, columns=columns, seed=seed,
                                      batch_size=batch_size, progress=progress, desc="evaluate")
    meta = {"preset": preset if isinstance(preset, str) else repr(preset), "pooling": pooling, "init": init,
            "images": len(data), "data": data.name}
    return Results(records, curves, maps, tuple(c for c in TABLE_COLUMNS if c in columns) +
                   (("aopc_paper",) if "aopc_paper" in columns else ()), meta)


def _explainer(explain: Callable[..., np.ndarray], composite: Any, pooling: str, init: str,
               composite_kwargs: dict[str, Any]) -> Callable[..., np.ndarray]:
    from .xai import lrp_composite

    built = lrp_composite(composite, **composite_kwargs) if isinstance(composite, str) else composite
    return partial(explain, composite=built, pooling=pooling, init=init)


def load_task(model_name: str, data_name: str | None, n: int, *, seed: int, cache: str | None,
              weights: str | None) -> tuple[nn.Module, Data, dict[str, Any]]:
    """A trained small model (``weights``, the cache, or trained now) and ``n`` fresh images of its task."""
    from .datasets import generate
    from .train import DATA_OF, build_small, load_or_train

    data_name = data_name or DATA_OF.get(model_name, "shapes")
    if (model_name == "rn") != (data_name == "sort_of_clevr"):
        raise ValueError("the Relation Network ('rn') answers questions on sort_of_clevr; the other models "
                         "classify shapes")
    data = generate(data_name, n, seed=20_000 + seed)
    if weights:
        model = build_small(model_name, data)
        model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
        return model.eval(), data, {"weights": weights}
    model, info = load_or_train(model_name, data_name, seed=seed, cache=cache)
    return model, data, info


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="small model family: vgg, resnet, densenet, efficientnet, rn")
    parser.add_argument("--data", choices=["shapes", "sort_of_clevr"], help="task (default: shapes; rn: sort_of_clevr)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--images", type=int, default=32, help="images to score (default 32)")
    parser.add_argument("--weights", help="state dict of the model (default: cached or trained now)")
    parser.add_argument("--cache", help="weight cache folder (default: $FXCANON_CACHE or ~/.cache/fxcanon)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pooling", choices=POOLINGS, help="channel pooling (default: sum; rn: pos_sq_sum)")


def main(argv: Sequence[str] | None = None) -> int:
    """``fxcanon evaluate``: the table, CSV/JSON and pixel-flipping plot for a small trained model."""
    parser = argparse.ArgumentParser(prog="fxcanon evaluate",
                                     description="Explanation quality with and without canonization (Quantus).")
    common_arguments(parser)
    parser.add_argument("--composite", action="append", help="repeat (default: eb, alpha2_beta1, epsilon_plus; "
                                                             "rn: eb, rn_custom)")
    parser.add_argument("--preset", choices=["paper", "fast"], default="paper")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, data, info = load_task(args.model, args.data, args.images, seed=args.seed, cache=args.cache,
                                  weights=args.weights)
    default = ("eb", "rn_custom") if args.model == "rn" else PAPER_COMPOSITES
    pooling = args.pooling or ("pos_sq_sum" if args.model == "rn" else "sum")
    results = evaluate(model, data, args.composite or default, args.preset, pooling=pooling, seed=args.seed)
    results.meta.update(model=args.model, training=info)
    print(results.table())
    for path in results.save(args.out, f"{args.model}_"):
        print(path, file=sys.stderr)
    return 0
