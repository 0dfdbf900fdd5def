"""Coverage on timm: BatchNorms folded with no example inputs, across CNN families, and why any stay.

    python benchmarks/bench_timm.py [--models efficientnet_b0 resnet18 ...] [--size 96] [--no-write]

Each model: ``timm.create_model(name, pretrained=False)``, randomized BatchNorm statistics, float64,
``canonicalize(model)`` (no example inputs), relative error against the original at one input of
the model's configured size capped at ``--size``. Writes section "timm" of benchmarks/RESULTS.md:
per model the BatchNorms, those left, the error and the time, then the reasons left, counted.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

from fxcanon import canonicalize, get_report  # noqa: E402
from fxcanon.equivalence import randomize_batchnorms, relative_error  # noqa: E402

# one or two small models per timm CNN family that uses BatchNorm
MODELS = [
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "gcresnet33ts", "skresnet18",
    "res2net50_26w_4s", "resnest14d", "regnetx_002", "regnety_002", "efficientnet_b0", "tf_efficientnet_b0",
    "efficientnetv2_rw_t", "mobilenetv2_050", "mobilenetv3_small_050", "mnasnet_050", "fbnetc_100", "lcnet_050",
    "mixnet_s", "ghostnet_050", "hardcorenas_a", "tinynet_e", "rexnet_100", "cspresnet50", "cspdarknet53",
    "darknet17", "dla34", "dpn48b", "densenet121", "vovnet39a", "ese_vovnet19b_dw", "hrnet_w18_small",
    "repvgg_a0", "selecsls42b", "tresnet_m", "inception_v3", "xception41", "nfnet_l0", "resnetv2_50",
    "vgg11_bn", "mobileone_s0", "fastvit_t8", "repghostnet_050", "bat_resnext26ts",
]


def run(name: str, size: int) -> tuple[int, list[str], float, float]:
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model(name, pretrained=False)).eval().double()
    side = min(model.pretrained_cfg.get("input_size", (3, size, size))[-1], size)
    x = torch.randn(1, 3, side, side, dtype=torch.float64)
    start = time.perf_counter()
    gm = canonicalize(model)
    seconds = time.perf_counter() - start
    report = get_report(gm)
    with torch.no_grad():
        error = relative_error(gm(x), model(x))
    return len(report.entries), [e.left_reason or "" for e in report.left], error, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| model | BatchNorms | left | rel. error (float64) | canonicalize s |", "|---|---:|---:|---:|---:|"]
    reasons: Counter[str] = Counter()
    total = left = 0
    failed, errors = [], []
    for name in args.models:
        try:
            count, why, error, seconds = run(name, args.size)
        except Exception as error:  # untraceable models are reported, not hidden
            failed.append(f"- {name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            print(failed[-1], flush=True)
            continue
        total, left = total + count, left + len(why)
        errors.append(error)
        reasons.update(re.sub(r"\b\w+_\d+\b", "<node>", r)[:160] for r in why)
        rows.append(f"| {name} | {count} | {len(why)} | {error:.1e} | {seconds:.2f} |")
        print(rows[-1], flush=True)
    summary = f"{total - left} of {total} BatchNorms folded ({100 * (total - left) / max(total, 1):.2f}%), " \
              f"with no example inputs, {len(args.models) - len(failed)} models; largest relative error " \
              f"{max(errors, default=0.0):.1e}."
    body = "\n".join([summary, "", *rows, "", "Reasons left (counted):", "",
                      *(f"- {n} x {r}" for r, n in reasons.most_common()), "",
                      "Models that failed:" if failed else "", *failed])
    print(body)
    if not args.no_write:
        write_section("timm", body)


if __name__ == "__main__":
    main()
