"""Checks of an erased run that every model-family test makes: the mask kept the unmasked weights and the run loads
with plain diffusers and with `load_erased_pipeline`; the LoRA export's round trip through plain diffusers; the
saved denoiser's weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from erasure.cli import main
from erasure.io import read_json


def denoiser_state(run: Path) -> dict[str, torch.Tensor]:
    """The run's UNet or transformer weights, read as saved."""
    from safetensors.torch import load_file

    from pipelines.loading import erased_unet_dir

    return {k: v for f in sorted(erased_unet_dir(run).glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_masked_run_loads(pipeline_class: Any, denoiser_class: Any, model_dir: Path, run: Path,
                            base: dict[str, torch.Tensor], erased: dict[str, torch.Tensor]) -> None:
    """Every weight the run's mask leaves out equals `base`, some weight moved, and the run's denoiser folder loads
    into `pipeline_class` both with plain diffusers and with `load_erased_pipeline`, holding `erased`."""
    from erasure.saliency import Mask
    from pipelines.loading import erased_unet_dir, load_erased_pipeline

    mask = Mask.load(run / "mask.safetensors")
    for name in mask:
        assert torch.equal(erased[name][~mask[name].bool()], base[name][~mask[name].bool()]), name
    assert any(not torch.equal(erased[name], base[name]) for name in base)
    folder = erased_unet_dir(run)
    plain = pipeline_class.from_pretrained(model_dir, **{folder.name: denoiser_class.from_pretrained(folder)})
    ours = load_erased_pipeline(str(model_dir), run)
    assert type(ours) is pipeline_class
    for pipe in (plain, ours):
        assert all(torch.equal(v, erased[k]) for k, v in getattr(pipe, folder.name).state_dict().items())


def assert_lora_round_trip(pipeline_class: Any, model_dir: Path, run: Path, out: Path,
                           erased: dict[str, torch.Tensor]) -> Any:
    """Export `run` as a full-rank LoRA into `out`, load it into the base pipeline with `load_lora_weights`, fuse
    and unload it, and check that every weight the file carries equals the erased one (`erased`); returns the
    pipeline."""
    assert main(["export", "--run", str(run), "--format", "lora", "--rank", "100000", "--out", str(out)]) == 0
    pipe = pipeline_class.from_pretrained(model_dir)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    left_out = {row["parameter"] for row in read_json(out / "metrics.json")["left_out"]}
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    for name, value in denoiser.state_dict().items():
        if name not in left_out:
            torch.testing.assert_close(value, erased[name], rtol=0, atol=1e-5, msg=name)
    return pipe
