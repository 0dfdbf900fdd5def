"""Synthetic image tasks with ground-truth masks, generated deterministically from a seed.

- ``shapes``: 64x64 images, the class is the shape of one object (circle, square, triangle,
  cross) on a textured background, next to a distractor bar; the mask is the object.
- ``sort_of_clevr``: six coloured squares and circles and a question about one of them (Santoro
  et al. 2017); the answer is the class, the mask covers the objects the question is about.

Images are stored normalized, ``(pixel - 0.5) / 0.25``: 0 is mid-grey, the input domain is
``[LOW, HIGH]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

LOW, HIGH = -2.0, 2.0
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.1), "blue": (0.1, 0.2, 0.9),
           "orange": (1.0, 0.55, 0.0), "grey": (0.5, 0.5, 0.5), "yellow": (0.95, 0.9, 0.1)}
QUESTIONS = ("shape", "left", "top", "closest shape", "furthest shape", "same shape count")
ANSWERS = ("yes", "no", "circle", "square", "1", "2", "3", "4", "5", "6")
QUESTION_VOCABULARY = 1 + len(QUESTIONS) + len(COLOURS)  # token 0 pads


@dataclass
class Data:
    """Images ``x`` (N, 3, H, W), labels ``y`` (N,), masks (N, 1, H, W) or None, and further model
    inputs per image in ``extra`` (a Relation Network's questions)."""

    x: Tensor
    y: Tensor
    mask: Tensor | None = None
    extra: tuple[Tensor, ...] = ()
    classes: tuple[str, ...] = ()
    low: float = LOW
    high: float = HIGH
    name: str = "data"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: slice | Tensor | list[int]) -> Data:
        return Data(self.x[index], self.y[index], None if self.mask is None else self.mask[index],
                    tuple(e[index] for e in self.extra), self.classes, self.low, self.high, self.name, self.meta)

    @property
    def num_classes(self) -> int:
        return len(self.classes) or int(self.y.max()) + 1


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


def _shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if kind == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if kind == "triangle":
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == "cross":
        return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
    raise ValueError(kind)


def _normalize(images: np.ndarray) -> Tensor:
    return torch.from_numpy((np.clip(images, 0, 1) - 0.5) / 0.25).float()


def shapes(n: int, seed: int = 0, size: int = 64) -> Data:
    """The shapes task: ``n`` images, classes balanced, a mask per object."""
    rng = np.random.default_rng(seed)
    ys, xs = _grid(size)
    images = np.empty((n, 3, size, size), np.float32)
    masks = np.zeros((n, 1, size, size), bool)
    labels = np.arange(n) % len(SHAPES)
    rng.shuffle(labels)
    for i, label in enumerate(labels):
        background = np.full((3, size, size), 0.5, np.float32)
        for _ in range(3):  # texture: oriented sinusoids per channel
            angle, frequency = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
            wave = np.sin(frequency * (np.cos(angle) * xs + np.sin(angle) * ys) + rng.uniform(0, 2 * np.pi))
            background += rng.uniform(-0.12, 0.12, (3, 1, 1)).astype(np.float32) * wave
        background += rng.normal(0, 0.03, background.shape).astype(np.float32)
        r = rng.uniform(8, 13)
        cy, cx = rng.uniform(r + 1, size - r - 1, 2)
        obj = _shape_mask(SHAPES[label], ys - cy, xs - cx, r)
        for _ in range(20):  # distractor: a bar of another colour, not on the object
            length, angle = rng.uniform(8, 16), rng.uniform(0, np.pi)
            by, bx = rng.uniform(4, size - 4, 2)
            t = np.clip((xs - bx) * np.cos(angle) + (ys - by) * np.sin(angle), -length / 2, length / 2)
            bar = (xs - bx - t * np.cos(angle)) ** 2 + (ys - by - t * np.sin(angle)) ** 2 <= 2.25
            if not (bar & obj).any():
                break
        background[:, bar] = rng.uniform(0, 1, (3, 1))
        background[:, obj] = rng.uniform(0, 1, (3, 1))
        images[i], masks[i, 0] = background, obj
    return Data(_normalize(images), torch.from_numpy(labels).long(), torch.from_numpy(masks), (), SHAPES,
                name="shapes", meta={"seed": seed, "size": size})


def sort_of_clevr(n: int, seed: int = 0, size: int = 64) -> Data:
    """Sort-of-CLEVR: ``n`` images with one question each (``extra[0]``: tokens (N, 2)), answers as labels."""
    rng = np.random.default_rng(seed)
    ys, xs = _grid(size)
    colours = np.array(list(COLOURS.values()), np.float32)
    half = size / 12
    images = np.ones((n, 3, size, size), np.float32)
    masks = np.zeros((n, 1, size, size), bool)
    questions = np.zeros((n, 2), np.int64)
    answers = np.zeros(n, np.int64)
    for i in range(n):
        centres: list[np.ndarray] = []
        while len(centres) < len(colours):
            c = rng.uniform(half + 1, size - half - 1, 2)
            if all(np.abs(c - d).max() > 2 * half + 2 for d in centres):
                centres.append(c)
        centre = np.array(centres)
        squares = rng.random(len(colours)) < 0.5
        objects = [_shape_mask("square" if s else "circle", ys - c[0], xs - c[1], half / 0.85 if s else half)
                   for c, s in zip(centre, squares)]
        for colour, obj in zip(colours, objects):
            images[i][:, obj] = colour[:, None]
        kind, colour = rng.integers(len(QUESTIONS)), rng.integers(len(colours))
        distance = np.linalg.norm(centre - centre[colour], axis=1)
        involved = [int(colour)]
        if kind == 0:
            answer = "square" if squares[colour] else "circle"
        elif kind == 1:
            answer = "yes" if centre[colour, 1] < size / 2 else "no"
        elif kind == 2:
            answer = "yes" if centre[colour, 0] < size / 2 else "no"
        elif kind in (3, 4):
            other = int(np.argsort(distance)[1] if kind == 3 else np.argmax(distance))
            involved.append(other)
            answer = "square" if squares[other] else "circle"
        else:
            same = np.flatnonzero(squares == squares[colour])
            involved = list(same)
            answer = str(len(same))
        masks[i, 0] = np.any([objects[j] for j in involved], axis=0)
        questions[i] = (1 + kind, 1 + len(QUESTIONS) + colour)
        answers[i] = ANSWERS.index(answer)
    return Data(_normalize(images), torch.from_numpy(answers), torch.from_numpy(masks), (torch.from_numpy(questions),),
                ANSWERS, name="sort_of_clevr", meta={"seed": seed, "size": size})


GENERATORS = {"shapes": shapes, "sort_of_clevr": sort_of_clevr}


def generate(name: str, n: int, seed: int = 0, size: int = 64) -> Data:
    """A generated data set by name (``"shapes"`` or ``"sort_of_clevr"``)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(GENERATORS)}")
    return GENERATORS[name](n, seed, size)
