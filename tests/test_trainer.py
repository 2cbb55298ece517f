"""The Trainer alone on a tiny model: exact resume through save_state, EMA, finite-loss guard, masked step, trackers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from erasure.accel import make_accelerator
from erasure.errors import ConfigError, NonFiniteLossError
from erasure.io import RunDir
from erasure.saliency import Mask
from erasure.trainer import EMA, Trainer, last_checkpoint_dir, tracker_options

STEPS = 6


def _loss_at(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)
    return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()


def _micro_loss_at(model: nn.Module, step: int, micro: int) -> torch.Tensor:
    """`_loss_at`'s batch, rows micro::2 of it."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)[micro::2]
    return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()


def _train(path, *, resume=False, steps=STEPS, stop_after=None, ema=False, mask=None, loss_at=_loss_at,
           accumulation=1):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    run = RunDir(path, resume=resume)
    run.start({}, seed=0, device="cpu", kind="test")
    average = EMA(model, 0.9) if ema else None
    accelerator = make_accelerator(gradient_accumulation_steps=accumulation)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.1), accelerator=accelerator, run=run,
                      steps=steps, lr_at=lambda s: 0.1 / (1 + s), checkpoint_every=2, ema=average, mask=mask,
                      samples_per_step=8, accumulation=accumulation)
    result = trainer.fit(loss_at, (lambda s: s + 1 == stop_after) if stop_after else None)
    return trainer.unwrapped, average, result, run


def test_resume_is_bit_identical(tmp_path):
    whole, ema_whole, _, _ = _train(tmp_path / "whole", ema=True)
    _, _, first, _ = _train(tmp_path / "split", stop_after=5, ema=True)
    assert first["steps"] == 5
    resumed, ema_resumed, second, _ = _train(tmp_path / "split", resume=True, ema=True)
    assert second["resumed_from_step"] == 4
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    for name, value in ema_whole.shadow.items():
        assert torch.equal(value, ema_resumed.shadow[name])


def test_micro_steps_give_the_whole_batch_step_and_resume_exactly(tmp_path):
    whole, _, _, _ = _train(tmp_path / "whole")
    micro, _, result, _ = _train(tmp_path / "micro", loss_at=_micro_loss_at, accumulation=2)
    assert result["steps"] == STEPS
    for a, b in zip(whole.state_dict().values(), micro.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    _train(tmp_path / "split", loss_at=_micro_loss_at, accumulation=2, stop_after=5)
    resumed, _, second, _ = _train(tmp_path / "split", resume=True, loss_at=_micro_loss_at, accumulation=2)
    assert second["resumed_from_step"] == 4
    for a, b in zip(micro.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_accumulation_must_match_the_accelerator(tmp_path):
    model = nn.Linear(4, 1)
    with pytest.raises(ConfigError, match="accumulation 2 differs .* gradient_accumulation_steps 1"):
        Trainer(model, torch.optim.Adam(model.parameters()), accelerator=make_accelerator(),
                run=RunDir(tmp_path / "r"), steps=STEPS, lr_at=lambda s: 0.1, accumulation=2)


def test_ema_is_restored_from_the_checkpoint(tmp_path):
    _, after_two, _, _ = _train(tmp_path / "two", steps=2, ema=True)
    _, _, _, run = _train(tmp_path / "r", stop_after=3, ema=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    fresh = EMA(model, 0.9)
    trainer = Trainer(model, torch.optim.Adam(model.parameters()), accelerator=make_accelerator(),
                      run=RunDir(run.path, resume=True), steps=STEPS, lr_at=lambda s: 0.1, ema=fresh)
    assert trainer.resume() == 2
    for name, value in after_two.shadow.items():
        assert torch.equal(fresh.shadow[name], value)
    assert last_checkpoint_dir(run.checkpoints)[0] == 2


def test_non_finite_loss_keeps_the_last_checkpoint(tmp_path):
    def exploding(model, step):
        loss = _loss_at(model, step)
        return loss * float("nan") if step == 4 else loss

    with pytest.raises(NonFiniteLossError, match="step 4.*checkpoint \\(step 4\\)"):
        _train(tmp_path / "r", loss_at=exploding)
    run = RunDir(tmp_path / "r", resume=True)
    assert run.status() == "failed"
    assert last_checkpoint_dir(run.checkpoints)[0] == 4


def test_masked_step_keeps_unmasked_weights_bit_identical(tmp_path):
    torch.manual_seed(0)
    initial = nn.Linear(4, 1).state_dict()
    mask = Mask({"weight": torch.tensor([[True, False, True, False]])})
    model, _, _, _ = _train(tmp_path / "r", mask=mask)
    assert torch.equal(model.weight[0, 1::2], initial["weight"][0, 1::2])
    assert torch.equal(model.bias, initial["bias"])
    assert not torch.equal(model.weight[0, 0::2], initial["weight"][0, 0::2])


def test_progress_bar_shows_loss_and_speed(tmp_path, capsys, monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr("erasure.trainer.tqdm", lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": False}))
    _train(tmp_path / "r")
    err = capsys.readouterr().err
    assert "loss=" in err and "samples/s" in err


def test_tracker_option_off_by_default_and_clear_when_missing(tmp_path, monkeypatch):
    assert tracker_options(None, tmp_path) == {}
    with pytest.raises(ConfigError, match="log_with: unknown tracker 'mlflowx'"):
        tracker_options("mlflowx", tmp_path)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="log_with: wandb is not installed; pip install wandb"):
        tracker_options("wandb", tmp_path)
