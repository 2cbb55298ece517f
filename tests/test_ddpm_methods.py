"""ESD and Concept Ablation on the class-conditional DDPM: each chunk against its formula written out by hand."""
from __future__ import annotations

import copy

import pytest
import torch

from erasure.config import from_dict
from erasure.errors import ConfigError
from pipelines.ddpm import NULL_CLASS, build_scheduler, build_unet
from pipelines.ddpm_commands import DDPMSession, build_method
from pipelines.ddpm_config import DDPMUnlearnConfig
from pipelines.methods.base import Draw
from pipelines.methods.esd import reference_window
from pipelines.objectives import noised, sampling_window

FORGET, REMAP = 3, 5  # cat -> dog


def config(method: str, **values) -> DDPMUnlearnConfig:
    return from_dict(DDPMUnlearnConfig, {"run": "x", "forget": "cat", "remap": "dog", "method": method,
                                         "label_dropout": 0, **values})


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", 8).eval()


def eps(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, label: int) -> torch.Tensor:
    labels = torch.full((x_t.shape[0],), label)
    return model(x_t, t, class_labels=labels).sample


def test_esd_regresses_the_forgotten_class_onto_the_frozen_negatively_guided_prediction(unet) -> None:
    """x_t: DDIM (guidance 3, the forgotten class) by the trained model, stopped as the reference stops it; target:
    eps0(null) - eta (eps0(c) - eps0(null)) from the frozen base."""
    settings = config("esd", **{"esd.ddim_steps": 5, "esd.guidance": 2.0})
    scheduler, base = build_scheduler(), copy.deepcopy(unet)
    with torch.no_grad():
        base.conv_out.bias.add_(0.1)  # a base that differs from the trained model
    batch = (torch.zeros(3, 3, 8, 8), torch.full((3,), FORGET), 7)
    session = DDPMSession(settings, scheduler, unet, batch, train_mode=False, base=base)
    chunk = build_method(settings).forget_chunk(session, Draw(7, torch.Generator().manual_seed(4), slice(None), 3, 0))

    generator = torch.Generator().manual_seed(4)
    t_enc = int(torch.randint(5, (1,), generator=generator))
    low, high = round(t_enc / 5 * 1000), round((t_enc + 1) / 5 * 1000)
    t = torch.randint(low, high, (3,), generator=generator)
    noise = torch.randn((3, 3, 8, 8), generator=generator)
    with torch.no_grad():
        x_t = sampling_window(lambda x, s, c: unet(x, s, class_labels=c).sample, scheduler, noise,
                          torch.full((3,), FORGET), torch.full((3,), NULL_CLASS), steps=5,
                          window=reference_window(t_enc, 5), guidance=3.0)
        null, concept = eps(base, x_t, t, NULL_CLASS), eps(base, x_t, t, FORGET)
    torch.testing.assert_close(chunk.x_t, x_t)
    assert torch.equal(chunk.t, t) and torch.equal(chunk.condition, torch.full((3,), FORGET))
    torch.testing.assert_close(chunk.target, null - 2.0 * (concept - null))
    assert build_method(settings).needs_frozen and chunk.reduction == "mean"


def test_concept_ablation_makes_the_forgotten_class_predict_the_remap_class_on_its_images(unet) -> None:
    settings = config("ca")
    scheduler = build_scheduler()
    anchor = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = (torch.zeros(2, 3, 8, 8), torch.full((2,), FORGET), 0)
    session = DDPMSession(settings, scheduler, unet, batch, train_mode=False, anchor=(anchor, torch.full((2,), REMAP)))
    method = build_method(settings)
    chunk = method.forget_chunk(session, Draw(0, torch.Generator().manual_seed(2), slice(None), 2, 0))
    x_t, _, t = noised(scheduler, anchor, torch.Generator().manual_seed(2), antithetic=True)
    torch.testing.assert_close(chunk.x_t, x_t)
    assert torch.equal(chunk.condition, torch.full((2,), FORGET))
    with torch.no_grad():
        torch.testing.assert_close(chunk.target, eps(unet, x_t, t, REMAP))
    assert method.images == ("anchor",) and method.scope.name == "the whole denoiser (UNet or transformer)"


def test_settings_of_another_method_and_an_unknown_remap_class_are_refused() -> None:
    with pytest.raises(ConfigError, match="config key 'esd' holds settings of method esd, but the method is ca"):
        config("ca", **{"esd.guidance": 3.0})
    with pytest.raises(ConfigError, match="unknown class 'dragon' in config key 'remap'"):
        config("ca", remap="dragon")
    assert config("ca").remap_class == REMAP and config("esd", remap=None).remap_class == 4
