"""Cost of `erasure eval attack`'s attacks at SD v1.4's size, measured per unit and extrapolated to the
references' full budgets. Prints one JSON line.

Times one optimisation step of UnlearnDiffAtk and of P4D (text encoder + UNet forward and backward; P4D adds
the base UNet's forward), one Ring-A-Bell generation (a population's text encoding) and one judged image
(guided sampling), on `--size sd` (SD v1.4's architecture with random weights, from bench_sample; its
tokenizer is the byte-level test one, which only shrinks the vocabulary table) or `--size tiny`. The full
budgets: 50 timesteps x 40 steps plus up to 51 images (prefix attacks), 3,000 generations plus one image
(Ring-A-Bell); a prompt that succeeds early costs less.

    python scripts/bench_attack.py --size sd --dtype fp32          # on a GPU (the references' precision)
    python scripts/bench_attack.py --size tiny --steps 2 --resolution 32 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from bench_sample import sd14_random_pipeline
from erasure.accel import resolve_device, resolve_dtype
from erasure.config import from_dict
from erasure.prompts import Prompt
from pipelines.attack_config import AttackEvalConfig, P4DSettings, RingABellSettings, UnlearnDiffAtkSettings
from pipelines.attacks.base import Cost, Target
from pipelines.attacks.p4d import P4D
from pipelines.attacks.ringabell import RingABell
from pipelines.attacks.runner import _prepared, render
from pipelines.attacks.text import token_ids
from pipelines.attacks.unlearndiffatk import UnlearnDiffAtk
from pipelines.tiny import build_tiny_pipeline

PROMPT = Prompt(0, "a photograph of a person standing on a beach at sunset", 0, 7.5)


def seconds_per(work: Callable[[int], None], repeats: int, device: torch.device) -> float:
    """Seconds of one unit of `work(n)` (n units), after one warm-up unit."""
    work(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work(repeats)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("sd", "tiny"), default="sd")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of a judged image")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="units timed after the warm-up")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = _prepared((sd14_random_pipeline() if args.size == "sd" else build_tiny_pipeline()).to(device, dtype),
                     "model")
    pipe.set_progress_bar_config(disable=True)
    config = from_dict(AttackEvalConfig, {"model": "tiny", "steps": args.steps, "height": args.resolution,
                                          "width": args.resolution})
    original = token_ids(pipe.tokenizer, PROMPT.text)
    image = np.zeros((args.resolution, args.resolution, 3), dtype=np.uint8)
    target = Target(pipe, lambda: pipe, lambda _: image)

    def prefix(attack_class: type, settings_class: type) -> Callable[[int], None]:
        def work(n: int) -> None:
            attack = attack_class(settings_class(iterations=n, timesteps=1))
            list(attack.candidates(target, PROMPT, original, torch.Generator().manual_seed(0)))
        return work

    def ringabell(n: int) -> None:
        attack = RingABell(RingABellSettings(generations=n), [("a nude person", "a person")])
        list(attack.candidates(target, PROMPT, original, torch.Generator().manual_seed(0)))

    def images(n: int) -> None:
        for _ in range(n):
            render(pipe, original, PROMPT, config, Cost())

    per = {"unlearndiffatk_step": seconds_per(prefix(UnlearnDiffAtk, UnlearnDiffAtkSettings), args.repeats, device),
           "p4d_step": seconds_per(prefix(P4D, P4DSettings), args.repeats, device),
           "ringabell_generation": seconds_per(ringabell, args.repeats, device),
           "image": seconds_per(images, args.repeats, device)}
    steps, images_judged, generations = 50 * 40, 51, 3000
    full = {"unlearndiffatk": steps * per["unlearndiffatk_step"] + images_judged * per["image"],
            "p4d": steps * per["p4d_step"] + images_judged * per["image"],
            "ringabell": generations * per["ringabell_generation"] + per["image"]}
    print(json.dumps({"size": args.size, "device": str(device), "dtype": args.dtype, "resolution": args.resolution,
                      "image_steps": args.steps, "seconds_per_unit": {k: round(v, 4) for k, v in per.items()},
                      "seconds_per_resisting_prompt_full_budget": {k: round(v, 1) for k, v in full.items()}}))


if __name__ == "__main__":
    main()
