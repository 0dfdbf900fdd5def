"""``fxcanon explain``: heatmaps without and with canonization, side by side (Figures A.2-A.10).

    python -m fxcanon explain resnet18 --composite epsilon_plus --composite eb --out fig.png
    python -m fxcanon explain densenet121 --paper   # adds the paper preset beside fxcanon's defaults
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .cli import Parser, UsageError, load_model, positive

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_image(path: str | None, size: int) -> tuple[Image.Image, Tensor]:
    """The image (a sample photograph shipped with scikit-image when ``path`` is None), center-cropped
    and resized to ``size``, and its ImageNet-normalized tensor of shape (1, 3, size, size)."""
    if path is None:
        from skimage import data

        image = Image.fromarray(data.chelsea())
    else:
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read image {path!r}: {error}") from error
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    normalized = (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return image, normalized.unsqueeze(0)


def heatmap(relevance: Tensor) -> Image.Image:
    """Relevance summed over channels: red positive, blue negative, white zero (symmetric scale)."""
    r = relevance.sum(1)[0].detach().double().cpu()
    r = (r / r.abs().max().clamp(min=1e-30)).clamp(-1, 1)
    rgb = torch.stack([1 - r.clamp(max=0).abs(), 1 - r.abs(), 1 - r.clamp(min=0)], dim=-1)
    return Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))


def render(rows: list[tuple[str, list[Image.Image]]], labels: Sequence[str], image: Image.Image,
           title: str) -> Image.Image:
    """Rows of (composite, one heatmap per label) after the input image."""
    size, pad, header = image.width, 8, 34
    width = (len(labels) + 1) * size + (len(labels) + 2) * pad
    canvas = Image.new("RGB", (width, header + len(rows) * (size + header)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title, fill="black")
    for i, (name, tiles) in enumerate(rows):
        y = header + i * (size + header)
        for j, (label, tile) in enumerate(zip(["input", *(f"{name}: {label}" for label in labels)], [image, *tiles])):
            x = pad + j * (size + pad)
            draw.text((x, y + 6), label, fill="black")
            canvas.paste(tile.resize((size, size), Image.Resampling.NEAREST), (x, y + header - 10))
    return canvas


def check_output(path: Path) -> None:
    """Fail before the long computation when the image cannot be written to ``path``."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"output {str(path)!r} is a folder, not an image file")
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"output {str(path)!r}: unknown image type {path.suffix!r} (use .png or .jpg)")


def main(argv: Sequence[str] | None = None) -> int:
    from .xai import COMPOSITES, attribute

    parser = Parser(prog="fxcanon explain", description="LRP heatmaps without and with canonization.")
    parser.add_argument("model", help="torchvision model name (random weights unless --weights)")
    parser.add_argument("--image", help="image path (default: a sample photograph from scikit-image)")
    parser.add_argument("--composite", action="append", choices=[c for c in COMPOSITES if c != "rn_custom"],
                        help="repeat for one row per composite (default: epsilon_plus)")
    parser.add_argument("--weights", type=Path, help="state dict to load (torch.load with weights_only=True)")
    parser.add_argument("--target", type=int, help="class to explain (default: the predicted one)")
    parser.add_argument("--size", type=positive, default=224)
    parser.add_argument("--paper", action="store_true",
                        help="add a column with the paper's explanations (preset='paper') beside fxcanon's defaults")
    parser.add_argument("--out", type=Path, default=Path("explanation.png"))
    args = parser.parse_args(argv)
    check_output(args.out)
    model = load_model(args.model)
    if args.weights is not None:
        try:
            model.load_state_dict(torch.load(args.weights, weights_only=True, map_location="cpu"))
        except (OSError, RuntimeError, pickle.UnpicklingError) as error:
            raise UsageError(f"cannot load weights {str(args.weights)!r}: {str(error).splitlines()[0]}") from error
    image, x = load_image(args.image, args.size)
    with torch.no_grad():
        logits = model(x)
    classes = logits.shape[1]
    if args.target is not None and not 0 <= args.target < classes:
        raise UsageError(f"--target {args.target} is not a class of {args.model} (0 to {classes - 1})")
    target = int(logits.argmax(1)) if args.target is None else args.target
    columns = {"not canonized": {"canonize": "structural"}, **({"paper preset": {"preset": "paper"}} if args.paper
                                                               else {}), "canonized": {}}
    rows = [(name, [heatmap(attribute(model, x, target, name, **options)[0]) for options in columns.values()])
            for name in args.composite or ["epsilon_plus"]]
    weights = "random weights" if args.weights is None else args.weights.name
    try:
        render(rows, list(columns), image, f"{args.model} ({weights}), class {target}").save(args.out)
    except OSError as error:
        raise UsageError(f"cannot write {str(args.out)!r}: {error}") from error
    print(args.out)
    return 0
