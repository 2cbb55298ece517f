"""The LoRA export's round trip through plain diffusers, shared by the model-family tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from erasure.cli import main
from erasure.io import read_json


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
