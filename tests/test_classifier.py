"""Classifier unlearning on scikit-learn's digits: every method, resume, the metrics and the data splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.digits import train_config, unlearn_config

from classifiers import methods as methods_module
from classifiers.commands import train, unlearn
from classifiers.config import METHODS, UnlearnConfig
from classifiers.data import forget_split
from classifiers.metrics import mia_efficacy
from classifiers.models import load_model
from erasure.config import from_dict
from erasure.datasets import load_digits
from erasure.errors import ConfigError, NonFiniteLossError
from erasure.saliency import Mask
from erasure.trainer import Trainer


@pytest.fixture
def original(digits_original: Path) -> Path:
    return digits_original


def test_method_names_in_config_match_the_registry():
    assert set(METHODS) == set(methods_module.METHODS)


@pytest.mark.parametrize("method, extra", [
    ("ft", {"lr": 0.1, "epochs": 10}),
    ("ga", {"lr": 0.005, "epochs": 4}),
    ("rl", {}),
    ("rl", {"rl": {"plan": "joint"}}),
    ("l1_sparse", {"l1_sparse": {"alpha": 1e-3}, "epochs": 10}),
    ("salun", {}),
    ("iu", {"iu": {"alpha": 3.0}}),
    ("retrain", {}),
])
def test_each_method_raises_unlearning_accuracy(original, tmp_path, method, extra):
    metrics = unlearn(unlearn_config(original, tmp_path / method, method, **extra))
    assert metrics["UA"] > 5.0, f"{method} did not forget: {metrics}"
    assert metrics["RA"] > 50.0, f"{method} destroyed the retain set: {metrics}"
    assert (tmp_path / method / "manifest.json").is_file() and (tmp_path / method / "model.safetensors").is_file()


def test_rl_reference_schedule_is_a_forget_pass_then_a_retain_pass(original, tmp_path, monkeypatch):
    seen = []
    real_loss = methods_module.RandomLabel.loss

    def record(self, model, batch):
        if batch.forget is not None:
            seen.append(("forget", len(batch.forget[1]), int((batch.forget_random_labels == batch.forget[1]).sum())))
        seen.append(("retain", len(batch.retain[1]), 0) if batch.retain is not None else None)
        return real_loss(self, model, batch)

    monkeypatch.setattr(methods_module.RandomLabel, "loss", record)
    config = unlearn_config(original, tmp_path / "rl", "rl", epochs=2, schedule="cosine", nesterov=True)
    metrics = unlearn(config)
    split = forget_split("class:3", load_digits(), seed=config.seed)
    n_forget, n_retain = len(split.forget_index), len(load_digits().train) - len(split.forget_index)
    kinds = [s for s in seen if s is not None]
    forget_steps, retain_steps = -(-n_forget // 64), -(-n_retain // 64)
    epoch = ["forget"] * forget_steps + ["retain"] * retain_steps
    assert [k for k, _, _ in kinds] == epoch * 2 and metrics["steps"] == len(kinds)
    assert sum(n for k, n, _ in kinds[:forget_steps]) == n_forget
    assert sum(n for k, n, _ in kinds[forget_steps:len(epoch)]) == n_retain
    assert sum(same for _, _, same in kinds) > 0, "reference labels are drawn from all classes, the true one included"
    optim = methods_module.build_method(config).optim_config(config)
    assert (optim.nesterov, optim.schedule) == (False, "constant")
    joint = unlearn_config(original, tmp_path / "joint", "rl", rl={"plan": "joint"})
    assert methods_module.build_method(joint).optim_config(joint) is joint


def test_rl_joint_schedule_sums_both_sets_with_wrong_labels(original, tmp_path, monkeypatch):
    seen = []
    real_loss = methods_module.RandomLabel.loss

    def record(self, model, batch):
        seen.append((batch.retain is not None, bool((batch.forget_random_labels == batch.forget[1]).any())))
        return real_loss(self, model, batch)

    monkeypatch.setattr(methods_module.RandomLabel, "loss", record)
    unlearn(unlearn_config(original, tmp_path / "rl", "rl", epochs=1, rl={"plan": "joint"}))
    assert seen and all(both and not same for both, same in seen)


def test_salun_leaves_unmasked_weights_bit_identical(original, tmp_path):
    unlearn(unlearn_config(original, tmp_path / "salun", "salun", salun={"mask_ratio": 0.3}))
    mask = Mask.load(tmp_path / "salun" / "mask.safetensors")
    before = dict(load_model(original / "model.safetensors").named_parameters())
    after = dict(load_model(tmp_path / "salun" / "model.safetensors").named_parameters())
    moved = 0
    for name, m in mask.masks.items():
        assert torch.equal(before[name].detach()[~m], after[name].detach()[~m]), name
        moved += int((before[name].detach()[m] != after[name].detach()[m]).sum())
    assert moved > 0
    assert abs(mask.density - 0.3) < 1e-3


def test_a_saved_mask_is_reused_and_a_foreign_mask_is_refused(original, tmp_path):
    from erasure.errors import MaskError

    unlearn(unlearn_config(original, tmp_path / "a", "salun"))
    saved = str(tmp_path / "a" / "mask.safetensors")
    reused = unlearn(unlearn_config(original, tmp_path / "b", "salun", salun={"mask": saved}))
    assert torch.equal(Mask.load(tmp_path / "b" / "mask.safetensors").masks["head.weight"],
                       Mask.load(tmp_path / "a" / "mask.safetensors").masks["head.weight"])
    assert reused["UA"] > 5
    cnn = tmp_path / "cnn"
    train(train_config(cnn, arch="cnn", width=4, epochs=1))
    unlearn(unlearn_config(cnn, tmp_path / "cnn-salun", "salun", epochs=1))
    with pytest.raises(MaskError):
        unlearn(unlearn_config(original, tmp_path / "c", "salun",
                               salun={"mask": str(tmp_path / "cnn-salun" / "mask.safetensors")}))


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(train_config(reference, epochs=4, checkpoint_every=7))
    interrupted = tmp_path / "interrupted"
    original_step = Trainer._step

    def crash_at_step_23(self, loss_at, step):
        if step == 23:
            raise KeyboardInterrupt
        return original_step(self, loss_at, step)

    monkeypatch.setattr(Trainer, "_step", crash_at_step_23)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(interrupted, epochs=4, checkpoint_every=7))
    monkeypatch.setattr(Trainer, "_step", original_step)
    assert (interrupted / "checkpoints" / "step-21").is_dir()
    metrics = train(train_config(interrupted, epochs=4, checkpoint_every=7, resume=True))
    assert metrics["resumed_from_step"] == 21
    a = load_model(reference / "model.safetensors").state_dict()
    b = load_model(interrupted / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(original, tmp_path, monkeypatch):
    original_loss = methods_module.FineTune.loss

    calls = []

    def nan_after_12(self, model, batch):
        calls.append(1)
        loss = original_loss(self, model, batch)
        return loss * float("nan") if len(calls) > 12 else loss

    monkeypatch.setattr(methods_module.FineTune, "loss", nan_after_12)
    with pytest.raises(NonFiniteLossError, match="step 12.*last good checkpoint \\(step 10\\)"):
        unlearn(unlearn_config(original, tmp_path / "nan", "ft", epochs=2, checkpoint_every=5))
    from erasure.io import read_json
    from erasure.trainer import last_checkpoint_dir

    assert last_checkpoint_dir(tmp_path / "nan" / "checkpoints")[0] == 10
    assert read_json(tmp_path / "nan" / "manifest.json")["status"] == "failed"


def test_forget_specs_are_deterministic_and_validated():
    data = load_digits()
    a, b = forget_split("random:0.1", data, seed=4), forget_split("random:0.1", data, seed=4)
    assert torch.equal(a.forget_index, b.forget_index)
    assert not torch.equal(a.forget_index, forget_split("random:0.1", data, seed=5).forget_index)
    assert len(a.forget_index) + len(a.retain_index) == len(data.train)
    cls = forget_split("class:7", data)
    assert (data.train.labels[cls.forget_index] == 7).all() and (data.train.labels[cls.retain_index] != 7).all()
    assert (cls.test(data).labels != 7).all()
    for bad in ("class:unicorn", "random:1.5", "random:x", "everything"):
        with pytest.raises(ConfigError):
            forget_split(bad, data)


def test_splits_are_deterministic_by_seed():
    assert torch.equal(load_digits(1).val.labels, load_digits(1).val.labels)
    assert not torch.equal(load_digits(1).val.images, load_digits(2).val.images)


def test_mia_efficacy_is_chance_for_random_confidences_and_one_for_separated_ones():
    rng = np.random.default_rng(0)
    same = mia_efficacy(rng.uniform(size=500), rng.uniform(size=500), rng.uniform(size=500))
    assert 30 < same < 70
    separated = mia_efficacy(rng.uniform(0.9, 1.0, 500), rng.uniform(0.0, 0.1, 500), rng.uniform(0.0, 0.1, 500))
    assert separated > 99


def test_woodfisher_solve_matches_the_dense_inverse():
    from classifiers.methods import woodfisher_solve

    g = torch.randn(5, 12, dtype=torch.float64)
    v = torch.randn(12, dtype=torch.float64)
    dense = torch.linalg.solve(0.1 * torch.eye(12, dtype=torch.float64) + g.T @ g / 5, v)
    assert torch.allclose(woodfisher_solve(g, v, 0.1), dense)


def test_early_stop_on_forget_accuracy_ends_gradient_ascent_at_the_target(original, tmp_path):
    metrics = unlearn(unlearn_config(original, tmp_path / "ga", "ga", lr=0.002, epochs=50, stop_forget_acc=20.0,
                                     stop_check_every=1))
    assert metrics["UA"] >= 80.0
    assert metrics["steps"] < 50 * 2  # the forget set holds 2 batches a pass: it stopped early
    assert metrics["RA"] > 80.0


def test_compare_reuses_a_matching_retrain_run_and_refuses_another(original, tmp_path):
    from classifiers.commands import compare
    from classifiers.config import CompareConfig
    from erasure.errors import RunDirError

    retrain = tmp_path / "retrain"
    unlearn(unlearn_config(original, retrain, "retrain"))
    base = {"original": str(original), "retrain": str(retrain), "methods": ["rl"], "forget": "class:3",
            "unlearn": {"epochs": 1, "checkpoint_every": 0}}
    summary = compare(from_dict(CompareConfig, {**base, "out": str(tmp_path / "cmp")}))
    assert summary["methods"]["retrain"]["UA"] == 100.0 and "Avg.Gap" in summary["methods"]["rl"]
    assert not (tmp_path / "cmp" / "retrain").exists()
    assert (tmp_path / "cmp" / "report.md").read_text().count("| rl |") == 1
    with pytest.raises(RunDirError, match="not a retrain run for forget 'class:4'"):
        compare(from_dict(CompareConfig, {**base, "forget": "class:4", "out": str(tmp_path / "cmp4")}))


def test_a_resumed_compare_reuses_rows_with_equal_settings_and_refuses_changed_ones(original, tmp_path):
    from classifiers.commands import compare
    from classifiers.config import CompareConfig
    from erasure.errors import RunDirError

    retrain = tmp_path / "retrain"
    unlearn(unlearn_config(original, retrain, "retrain"))
    base = {"original": str(original), "retrain": str(retrain), "methods": ["rl"], "forget": "class:3",
            "unlearn": {"epochs": 1, "checkpoint_every": 0}, "out": str(tmp_path / "cmp")}
    first = compare(from_dict(CompareConfig, base))
    row = tmp_path / "cmp" / "rl" / "manifest.json"
    made = row.stat().st_mtime_ns
    # another method's settings, carried by every unlearning config, do not make the rl row stale
    again = compare(from_dict(CompareConfig, {**base, "resume": True, "overwrite": False,
                                              "per_method": {"salun": {"mask_ratio": 0.3}}}))
    assert row.stat().st_mtime_ns == made and again["methods"]["rl"] == first["methods"]["rl"]
    with pytest.raises(RunDirError, match=r"'.*cmp/rl' holds a finished run made with other settings \(lr\)"):
        compare(from_dict(CompareConfig, {**base, "resume": True, "per_method": {"rl": {"lr": 0.5}}}))


def test_downsampling_is_the_rounded_block_mean_and_resolution_is_cifar_only():
    from classifiers.config import TrainConfig
    from erasure.datasets import downsample

    images = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    small = downsample(images, 16)
    block = images[:, :, :2, :2].float().mean(dim=(2, 3)).round().to(torch.uint8)
    assert small.shape == (3, 3, 16, 16) and small.dtype == torch.uint8 and torch.equal(small[:, :, 0, 0], block)
    assert downsample(images, 32) is images
    with pytest.raises(ConfigError, match="'resolution' applies to cifar10 only"):
        from_dict(TrainConfig, {"dataset": "digits", "resolution": 16})
    with pytest.raises(ConfigError, match="'resolution' must be one of: 32, 16, 8"):
        from_dict(TrainConfig, {"dataset": "cifar10", "resolution": 12})


@pytest.mark.parametrize("forget", ["class:3", "random:0.1"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_its_defaults_without_diverging(original, tmp_path, method, forget):
    config = from_dict(UnlearnConfig, {"original": str(original), "out": str(tmp_path / method), "method": method,
                                       "forget": forget, "checkpoint_every": 0})
    metrics = unlearn(config)
    assert np.isfinite(metrics.get("final_loss", 0.0)), metrics
    weights = load_model(tmp_path / method / "model.safetensors").state_dict().values()
    assert all(bool(torch.isfinite(w).all()) for w in weights)
