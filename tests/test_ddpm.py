"""Class-conditional DDPM: train, save/load, resume, guided sampling, unlearning with a mask, evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import needs_cifar10
from PIL import Image

from erasure.config import from_dict, to_dict
from erasure.errors import ConfigError

pytestmark = needs_cifar10

TINY = {"preset": "tiny", "steps": 6, "batch_size": 8, "train_limit": 64, "warmup": 2, "ema_decay": 0.9,
        "checkpoint_every": 2}
UNLEARN = {"forget": "cat", "steps": 4, "forget_batch_size": 8, "retain_batch_size": 8,
           "mask_batches": 2, "lr": 1e-3}


def train_tiny(out: Path, accelerator=None, **overrides):
    from pipelines.ddpm_commands import train
    from pipelines.ddpm_config import DDPMTrainConfig

    return train(from_dict(DDPMTrainConfig, {**TINY, "out": str(out), **overrides}), accelerator)


def unlearn_tiny(run: Path, out: Path, **overrides):
    from pipelines.ddpm_commands import unlearn
    from pipelines.ddpm_config import DDPMUnlearnConfig

    return unlearn(from_dict(DDPMUnlearnConfig, {**UNLEARN, "run": str(run), "out": str(out), **overrides}))


def weights(run: Path) -> dict[str, torch.Tensor]:
    from pipelines.ddpm import load_model

    return load_model(run)[0].state_dict()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddpm") / "tiny"
    train_tiny(out)
    return out


def test_training_writes_a_diffusers_run_that_reloads_exactly(trained: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    from pipelines.ddpm import load_model, save_model

    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["kind"] == "ddpm-train"
    assert manifest["metrics"]["steps"] == 6 and np.isfinite(manifest["metrics"]["final_loss"])
    assert not (trained / "checkpoints").exists()
    unet, scheduler = load_model(trained)
    assert unet.config.num_class_embeds == 11
    assert UNet2DModel.from_pretrained(trained / "unet").state_dict().keys() == unet.state_dict().keys()
    save_model(tmp_path, unet, scheduler)
    again, _ = load_model(tmp_path)
    for name, value in unet.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_resume_after_interruption_is_bit_identical(trained: Path, tmp_path: Path, monkeypatch) -> None:
    from erasure.errors import ErasureError
    from erasure.trainer import Trainer

    real_step = Trainer._step

    def crash_at_step_4(self, loss_at, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(self, loss_at, step)

    monkeypatch.setattr(Trainer, "_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "_step", real_step)
    with pytest.raises(ErasureError, match="--resume"):
        train_tiny(tmp_path / "resumed")
    metrics = train_tiny(tmp_path / "resumed", resume=True)
    assert metrics["resumed_from_step"] == 4
    expected = weights(trained)
    for name, value in weights(tmp_path / "resumed").items():
        assert torch.equal(value, expected[name]), name


def test_guided_sampling_is_deterministic_per_seed_and_depends_on_the_class() -> None:
    from pipelines.ddpm import build_scheduler, build_unet, sample_batched

    torch.manual_seed(0)
    unet, scheduler = build_unet("tiny").eval(), build_scheduler()

    def draw(labels, seeds, batch_size=4, sampler="ddim"):
        return sample_batched(unet, scheduler, labels, seeds, guidance=2.0, steps=3, sampler=sampler,
                              batch_size=batch_size).int()

    first = draw([3, 3], [10, 11])
    assert first.dtype == torch.int32 and first.shape == (2, 3, 32, 32)
    assert torch.equal(first, draw([3, 3], [10, 11]))
    assert (first - draw([3, 3], [10, 11], batch_size=1)).abs().max() <= 1
    assert not torch.equal(first, draw([5, 5], [10, 11]))
    assert not torch.equal(first[0], first[1])
    assert torch.equal(draw([3], [10], sampler="model"), draw([3], [10], sampler="model"))


def test_salun_leaves_unmasked_weights_bit_identical_and_lowers_the_forget_objective(trained: Path,
                                                                                       tmp_path: Path) -> None:
    from erasure.saliency import Mask
    from pipelines.ddpm import load_model

    metrics = unlearn_tiny(trained, tmp_path / "salun")
    assert metrics["forget_objective_after"] < metrics["forget_objective_before"]
    assert metrics["remap_class"] == "deer" and 0.49 < metrics["mask_density"] < 0.51
    card = (tmp_path / "salun" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: \"diffusers\"") and "class 'cat'" in card and "'deer'" in card
    before, after = weights(trained), weights(tmp_path / "salun")
    mask = Mask.load(tmp_path / "salun" / "mask.safetensors", load_model(trained)[0])
    moved = 0
    for name, value in after.items():
        frozen = ~mask[name]
        assert torch.equal(value[frozen], before[name][frozen]), name
        moved += int((value != before[name]).sum())
    assert moved > 0
    assert "class_embedding.weight" in mask.masks


@pytest.mark.parametrize("method, extra", [("ga", {}), ("rl", {}), ("esd", {"esd.ddim_steps": 4, "alpha": 0}),
                                           ("ca", {"mask_ratio": 0.3})])
def test_other_methods_run_in_the_same_loop(trained: Path, tmp_path: Path, method: str, extra: dict) -> None:
    from erasure.saliency import Mask
    from pipelines.ddpm import load_model

    metrics = unlearn_tiny(trained, tmp_path / method, method=method, steps=3 if method == "esd" else 2, **extra)
    assert metrics["method"] == method
    assert metrics["remap_class"] == ("deer" if method == "ca" else None)
    before, after = weights(trained), weights(tmp_path / method)
    assert any(not torch.equal(v, before[k]) for k, v in after.items())
    if method == "esd":  # alpha 0 is the paper's ESD (the retain term dominates a tiny model's few steps otherwise)
        assert metrics["forget_objective_after"] < metrics["forget_objective_before"]
    if "mask_ratio" in extra:  # SalUn's mask works with any method
        assert 0.29 < metrics["mask_density"] < 0.31
        mask = Mask.load(tmp_path / method / "mask.safetensors", load_model(trained)[0])
        assert all(torch.equal(after[k][~mask[k]], before[k][~mask[k]]) for k in mask.masks)
    else:
        assert metrics["mask_density"] is None and not (tmp_path / method / "mask.safetensors").exists()


def test_class_errors_are_clear(trained: Path, run_cli, tmp_path: Path) -> None:
    from pipelines.ddpm_config import DDPMUnlearnConfig

    with pytest.raises(ConfigError, match="remap class 'cat' is the forgotten class itself"):
        from_dict(DDPMUnlearnConfig, {"run": str(trained), "forget": "cat", "remap": "3"})
    assert from_dict(DDPMUnlearnConfig, {"run": "x", "forget": "9"}).remap_class == 0
    status, log = run_cli("ddpm", "unlearn", "--run", trained, "--forget", "kat", "--out", tmp_path / "u")
    assert status == 2 and "unknown class 'kat'" in log and "airplane, automobile" in log
    status, log = run_cli("sample", "--run", trained, "--class", "zebra", "--out", tmp_path / "s")
    assert status == 2 and "unknown class 'zebra'" in log


def test_sample_command_writes_class_images(trained: Path, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    status, log = run_cli("sample", "--run", trained, "--class", "ship", "--n", "3", "--steps", "2",
                          "--scheduler", "ddim", "--out", out)
    assert status == 0, log
    files = sorted(p.name for p in out.glob("ship_*.png"))
    assert files == ["ship_00000.png", "ship_00001.png", "ship_00002.png"]
    assert np.asarray(Image.open(out / files[0])).shape == (32, 32, 3) and (out / "grid" / "grid.png").is_file()
    from erasure.media import list_images

    assert [p.name for p in list_images(out)] == files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["guidance"] == 2.0 and manifest["metrics"]["class"] == "ship"


def test_sampling_a_class_resumes_where_it_stopped(trained: Path, run_cli, tmp_path: Path, monkeypatch) -> None:
    import pipelines.ddpm_commands as commands

    args = ["sample", "--run", trained, "--class", "frog", "--n", "5", "--batch-size", "2", "--steps", "2",
            "--scheduler", "ddim"]
    assert run_cli(*args, "--out", tmp_path / "whole")[0] == 0
    real, calls = commands.sample_batched, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(commands, "sample_batched", interrupted)
    assert run_cli(*args, "--out", tmp_path / "part")[0] == 130
    assert len(list((tmp_path / "part").glob("frog_*.png"))) == 2
    monkeypatch.setattr(commands, "sample_batched", real)
    status, log = run_cli(*args, "--out", tmp_path / "part", "--resume")
    assert status == 0 and "3 generated, 2 already there" in log, log
    for i in range(5):
        name = f"frog_{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "whole" / name)),
                              np.asarray(Image.open(tmp_path / "part" / name)))


def test_eval_reports_ua_accuracy_and_a_labelled_feature_distance(trained: Path, cifar_judge: Path,
                                                                   tmp_path: Path) -> None:
    from pipelines.ddpm_commands import evaluate
    from pipelines.ddpm_config import DDPMEvalConfig

    unlearn_tiny(trained, tmp_path / "salun", steps=1)
    config = from_dict(DDPMEvalConfig, {"run": str(tmp_path / "salun"), "judge": str(cifar_judge), "n_forget": 4,
                                        "n_per_class": 2, "steps": 2, "out": str(tmp_path / "eval")})
    metrics = evaluate(config)
    assert metrics["protocol"] == "ddpm-cifar10-v1" and metrics["forget_class"] == "cat"
    assert metrics["baseline"]["run"] == str(trained)
    for side in ("evaluated", "baseline"):
        assert 0 <= metrics[side]["UA"] <= 100 and len(metrics[side]["class_accuracy"]) == 10
    report = (tmp_path / "eval" / "report.md").read_text()
    if metrics["distance_metric"] == "feature_distance":
        assert "feature distance (not FID)" in report and "| FID" not in report
    assert (tmp_path / "eval" / "grid_evaluated.png").is_file() and (tmp_path / "eval" / "grid_baseline.png").is_file()
    alone = evaluate(from_dict(DDPMEvalConfig, {**to_dict(config), "baseline": "none", "out": str(tmp_path / "e2")}))
    assert "baseline" not in alone and "change" not in alone
    assert alone["evaluated"]["class_accuracy"] == metrics["evaluated"]["class_accuracy"]


def test_the_cache_samples_a_shared_baseline_once_and_keys_on_weights_and_settings(trained: Path, cifar_judge: Path,
                                                                                    tmp_path: Path,
                                                                                    monkeypatch) -> None:
    import pipelines.ddpm_eval as ddpm_eval
    from pipelines.ddpm_commands import evaluate
    from pipelines.ddpm_config import DDPMEvalConfig

    sampled = []
    real_generate = ddpm_eval.generate
    monkeypatch.setattr(ddpm_eval, "generate", lambda *args: sampled.append(1) or real_generate(*args))
    unlearn_tiny(trained, tmp_path / "one", steps=1)
    unlearn_tiny(trained, tmp_path / "two", steps=2)
    base = {"judge": str(cifar_judge), "n_forget": 4, "n_per_class": 2, "steps": 2, "cache": str(tmp_path / "cache")}

    def run(name: str, **overrides) -> dict:
        sampled.clear()
        return evaluate(from_dict(DDPMEvalConfig, {**base, "run": str(tmp_path / "one"), **overrides,
                                                   "out": str(tmp_path / name)}))

    first = run("e1")
    assert len(sampled) == 2 and "reused_from" not in first["baseline"]
    again = run("e2")
    assert sampled == [] and again["baseline"]["reused_from"] and again["evaluated"]["reused_from"]
    for side in ("evaluated", "baseline"):
        assert {k: v for k, v in again[side].items() if k != "reused_from"} == first[side]
    assert (tmp_path / "e2" / "grid_baseline.png").read_bytes() == (tmp_path / "e1" / "grid_baseline.png").read_bytes()
    other_weights = run("e3", run=str(tmp_path / "two"))
    assert len(sampled) == 1 and other_weights["baseline"]["reused_from"]
    run("e4", steps=3)
    assert len(sampled) == 2


def test_a_reduced_resolution_run_generates_at_its_size_and_needs_a_judge_of_that_size(cifar_judge: Path,
                                                                                        tmp_path: Path) -> None:
    from pipelines.ddpm import load_model, sample
    from pipelines.ddpm_commands import evaluate
    from pipelines.ddpm_config import DDPMEvalConfig

    run = tmp_path / "tiny8"
    train_tiny(run, resolution=8, steps=2, checkpoint_every=0)
    unet, scheduler = load_model(run)
    assert unet.config.sample_size == 8
    images = sample(unet, scheduler, [1, 2], [0, 1], guidance=2.0, steps=2)
    assert images.shape == (2, 3, 8, 8)
    config = from_dict(DDPMEvalConfig, {"run": str(run), "judge": str(cifar_judge), "forget": "cat", "n_forget": 2,
                                        "n_per_class": 2, "steps": 1, "out": str(tmp_path / "eval")})
    with pytest.raises(ConfigError, match="classifies 32x32 images but the DDPM generates 8x8.*--resolution 8"):
        evaluate(config)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a test that asks for another precision must reset it around it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains_and_saves_float32_weights(tmp_path: Path, monkeypatch,
                                                                fresh_accelerate_state) -> None:
    import pipelines.ddpm_commands as commands
    from erasure.accel import make_accelerator

    seen = []

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args, **kwargs)

    real = commands.diffusion_loss
    monkeypatch.setattr(commands, "diffusion_loss", recording)
    metrics = train_tiny(tmp_path / "bf16", accelerator=make_accelerator(mixed_precision="bf16"), resolution=8,
                         steps=3, checkpoint_every=0)
    assert np.isfinite(metrics["final_loss"]) and seen == [True] * 3
    state = weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in state.values())


def test_the_forget_probe_ignores_dropout_and_keeps_the_mode() -> None:
    from diffusers import UNet2DModel

    from erasure.datasets import ImageSet
    from pipelines.ddpm import build_scheduler
    from pipelines.ddpm_commands import probe_loss
    from pipelines.ddpm_config import DDPMUnlearnConfig

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, num_class_embeds=11, dropout=0.5,
                       block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).train()
    forget = ImageSet(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.full((8,), 3))
    config = from_dict(DDPMUnlearnConfig, {"run": "x", "forget": "cat", "forget_batch_size": 4})
    first, second = (probe_loss(config, unet, forget, build_scheduler()) for _ in range(2))
    assert first == second and unet.training


def test_the_learning_rate_warms_up_then_stays_or_decays_along_a_cosine() -> None:
    from pipelines.ddpm import LoopSettings

    constant, cosine = LoopSettings(10, 1.0, warmup=2), LoopSettings(10, 1.0, warmup=2, cosine=True)
    assert [constant.lr_at(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [cosine.lr_at(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cosine.lr_at(6) == pytest.approx(0.5) and cosine.lr_at(10) == pytest.approx(0.0)
    rates = [cosine.lr_at(s) for s in range(2, 11)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
