"""Conformance: the Stable Diffusion objectives against plain-torch statements of their references.

salun: `SD/train-scripts/nsfw_removal.py` of OPTML-Group/Unlearn-Saliency (a6e89fd):
loss = MSELoss(eps(x_t, c_forget), eps(x_t, c_remap).detach()) + alpha * MSELoss(eps(x_r_t, c_r), noise_r).
esd: rohitgandikota/erasing: MSE(eps(x_t, c), eps*(x_t, null) - eta (eps*(x_t, c) - eps*(x_t, null))) with eps*
the frozen base model. ca: nupurkmr9/concept-ablation `diffusers/train.py` (model-based): on anchor latents,
MSE(eps(x_t, c_concept), eps(x_t, c_anchor) under no_grad), the same model making both predictions.
ga: `SD/train-scripts/gradient_ascent.py`: -MSE(eps(x_t, c_forget), noise).
Our batch (latents, timesteps, noise) is taken from the eraser; the reference loss is recomputed from it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from erasure.config import load_config
from erasure.io import RunDir
from pipelines.families import text_conditioning
from pipelines.sd_config import SDEraseConfig
from pipelines.stable_diffusion import Conditions, Eraser, Latents
from pipelines.tiny import build_tiny_pipeline


def _eraser(tmp_path: Path, method: str) -> Eraser:
    esd = {"esd.guidance": 1.5} if method.startswith("esd") else {}
    config = load_config(SDEraseConfig, None, {"concept": "nudity", "model": "tiny", "method": method,
                                               "batch_size": 4, "alpha": 0.3, "resolution": 8, **esd})
    pipe = build_tiny_pipeline()
    generator = torch.Generator().manual_seed(0)
    shape = (6, 4, 4, 4)
    forget = Latents(torch.randn(shape, generator=generator), torch.rand(shape, generator=generator) * 0.1,
                     torch.zeros(6, dtype=torch.long))
    retain = Latents(torch.randn(shape, generator=generator), torch.rand(shape, generator=generator) * 0.1,
                     torch.zeros(6, dtype=torch.long))
    embeddings = text_conditioning(pipe).encode([config.forget_prompt, config.remap_prompt, "", config.remap_prompt])
    conditions = Conditions(embeddings[0:1], embeddings[1:2], embeddings[2:3], embeddings[3:])
    return Eraser(config, pipe, Accelerator(cpu=True), RunDir(tmp_path / "run"),
                  {"forget": forget, "retain": retain, "anchor": retain}, conditions)


def _eps(unet, x_t, t, condition):
    return unet(x_t, t, encoder_hidden_states=condition.expand(x_t.shape[0], -1, -1)).sample


@pytest.mark.parametrize("method", ["salun", "esd", "esd-x", "ga", "ca"])
def test_each_method_loss_is_its_reference_formula(tmp_path: Path, method: str) -> None:
    eraser = _eraser(tmp_path, method)
    captured = []
    original = eraser.chunks_loss
    eraser.chunks_loss = lambda model, chunks: captured.extend(chunks) or original(model, chunks)
    read, images = [], eraser.images
    eraser.images = lambda name, draw: read.append(name) or images(name, draw)
    ours = eraser.step_loss(0, 0)
    unet, c = eraser.pipe.unet, eraser.conditions
    assert eraser.latent_shape == tuple(eraser.sets["forget"].x0.shape[1:]), "self-sampled latents match the VAE's"
    forget = captured[0]
    out = _eps(unet, forget.x_t, forget.t, c.forget)
    if method == "salun":
        pseudo = _eps(unet, forget.x_t, forget.t, c.target).detach()
        retain = captured[1]
        reference = F.mse_loss(out, pseudo) + 0.3 * F.mse_loss(_eps(unet, retain.x_t, retain.t, c.retain),
                                                                retain.target)
    elif method.startswith("esd"):
        with torch.no_grad():
            null, cond = _eps(eraser.base, forget.x_t, forget.t, c.null), _eps(eraser.base, forget.x_t,
                                                                                  forget.t, c.forget)
        reference = F.mse_loss(out, null - 1.5 * (cond - null))
    elif method == "ca":
        assert read == ["anchor"], "ca trains on anchor images"
        reference = F.mse_loss(out, _eps(unet, forget.x_t, forget.t, c.target).detach())
        assert len(captured) == 1, "no prior preservation by default"
    else:
        reference = -F.mse_loss(out, forget.target)
        assert len(captured) == 1, "gradient ascent has no retain term"
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
