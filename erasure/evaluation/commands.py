"""Handlers of `erasure eval nudity` (on image folders) and `erasure eval fid`: checks, then the protocol runner.

Sampling before judging (`eval nudity --run/--model`) belongs to `pipelines.commands`, which runs the
same nudity protocol: `erasure` never imports the diffusion domain.
"""
from __future__ import annotations

from pathlib import Path

from erasure.accel import resolve_device
from erasure.config import to_dict
from erasure.evaluation.config import FIDEvalConfig, NudityEvalConfig
from erasure.evaluation.protocol import run_protocol
from erasure.media import list_images


def eval_nudity(config: NudityEvalConfig) -> None:
    """Protocol nudity-i2p-v1 on the folders --images (and --baseline-images)."""
    from erasure.evaluation.nudity import PROTOCOL, NudityInputs

    sides = {"evaluated": Path(config.images)}
    if config.baseline_images:
        sides["baseline"] = Path(config.baseline_images)
    for folder in sides.values():
        list_images(folder)
    out = Path(config.out) if config.out else sides["evaluated"] / "eval-nudity"
    run_protocol(PROTOCOL, lambda _: NudityInputs(config, sides), out=out, config=to_dict(config), seed=None,
                 device="cpu", overwrite=config.overwrite, resume=config.resume)


def eval_fid(config: FIDEvalConfig) -> None:
    """Protocol retain-fid-v1: FID and KID between --images and --reference with the chosen features."""
    from erasure.evaluation.fid import PROTOCOL, FIDInputs, build_extractor

    images, reference = list_images(config.images), list_images(config.reference)
    device = resolve_device(config.device)
    extractor = build_extractor(config.features, device)
    out = Path(config.out) if config.out else Path(config.images) / "eval-fid"
    run_protocol(PROTOCOL, lambda _: FIDInputs(config, images, reference, extractor, device), out=out,
                 config=to_dict(config), seed=config.seed, device=str(device), overwrite=config.overwrite)
