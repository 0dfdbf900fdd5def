"""Train the small models on the generated tasks, and cache the weights.

    model, info = load_or_train("vgg", "shapes")   # ~/.cache/fxcanon/vgg-shapes-s0.pt on the second call

``FXCANON_CACHE`` or ``cache=`` moves the cache. ``info`` records the held-out accuracy, the
epochs and the training time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .datasets import QUESTION_VOCABULARY, Data, generate
from .models.small import SMALL_MODELS

DATA_OF = {"rn": "sort_of_clevr"}
TRAIN_SIZE = {"shapes": 2000, "sort_of_clevr": 8000}
# per family: epochs of the one-cycle schedule and its peak learning rate
SCHEDULE = {"densenet": (30, 3e-3), "rn": (10, 2e-3)}
CACHE_VERSION = 2


def cache_dir(cache: str | Path | None = None) -> Path:
    return Path(cache or os.environ.get("FXCANON_CACHE") or Path.home() / ".cache" / "fxcanon")


def build_small(family: str, data: Data) -> nn.Module:
    """A small model of ``family`` (``vgg``, ``resnet``, ``densenet``, ``efficientnet``, ``rn``) for ``data``."""
    if family not in SMALL_MODELS:
        raise ValueError(f"unknown model {family!r}; choose from {', '.join(SMALL_MODELS)}")
    if family == "rn":
        return SMALL_MODELS[family](data.num_classes, QUESTION_VOCABULARY)
    return SMALL_MODELS[family](data.num_classes)


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        part = data[start:start + batch_size]
        correct += int((model(part.x, *part.extra).argmax(1) == part.y).sum())
    return correct / len(data)


def fit(model: nn.Module, train: Data, val: Data, *, epochs: int = 12, budget_s: float = 300.0,
        target: float = 0.97, lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Adam with a one-cycle schedule until ``target`` validation accuracy, ``epochs`` or ``budget_s``."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * -(-len(train) // batch_size))
    start, history = time.perf_counter(), []
    for epoch in range(epochs):
        model.train()
        for index in torch.randperm(len(train)).split(batch_size):
            part = train[index]
            loss = nn.functional.cross_entropy(model(part.x, *part.extra), part.y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        history.append(accuracy(model, val))
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch + 1}: validation accuracy {history[-1]:.3f} ({elapsed:.0f} s)", file=sys.stderr)
        if history[-1] >= target or elapsed > budget_s:
            break
    return {"epochs": len(history), "val_accuracy": history[-1], "train_s": time.perf_counter() - start,
            "history": history, "threads": torch.get_num_threads()}


def load_or_train(family: str, data: str | None = None, *, seed: int = 0, cache: str | Path | None = None,
                  retrain: bool = False, budget_s: float = 300.0) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model (eval mode) and its training record, from the cache or trained now."""
    data = data or DATA_OF.get(family, "shapes")
    stem = cache_dir(cache) / f"{family}-{data}-s{seed}-v{CACHE_VERSION}"
    val = generate(data, 500, seed=10_000 + seed)
    model = build_small(family, val)
    if stem.with_suffix(".pt").exists() and not retrain:
        model.load_state_dict(torch.load(stem.with_suffix(".pt"), weights_only=True))
        return model.eval(), json.loads(stem.with_suffix(".json").read_text())
    train = generate(data, TRAIN_SIZE[data], seed=seed)
    epochs, lr = SCHEDULE.get(family, (12, 3e-3))
    info = {"model": family, "data": data, "train_size": len(train),
            **fit(model, train, val, epochs=epochs, lr=lr, budget_s=budget_s, seed=seed)}
    stem.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), stem.with_suffix(".pt"))
    stem.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return model.eval(), info
