"""Mask-learning and competition methods on digits: each forgets, and each edit touches exactly what it says."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.digits import unlearn_config

from classifiers.commands import compare, unlearn
from classifiers.config import CompareConfig, UnlearnConfig
from classifiers.data import forget_split
from classifiers.methods import build_method
from classifiers.models import load_model
from classifiers.piggyback import last_stage
from classifiers.report import comparison_table
from erasure.config import from_dict
from erasure.datasets import load_digits
from erasure.saliency import Mask


@pytest.fixture
def original(digits_original: Path) -> Path:
    return digits_original


def forget_and_retain(config: UnlearnConfig):
    data = load_digits()
    split = forget_split(config.forget, data, seed=config.seed)
    return split.forget(data), split.retain(data)


@pytest.mark.parametrize("method, extra", [
    ("piggyback_shrink", {"epochs": 1, "piggyback_shrink": {"eta": 0.5}}),
    ("kaggle_1st", {}),
    ("kaggle_2nd", {"epochs": 2}),
    ("ssd", {}),
    ("salun", {"salun": {"mask_type": "soft"}}),
])
def test_each_method_lowers_forget_accuracy(original, tmp_path, method, extra):
    metrics = unlearn(unlearn_config(original, tmp_path / method, method, **extra))
    assert metrics["UA"] > 5.0, f"{method} did not forget: {metrics}"  # the original's forget accuracy is 100%
    assert metrics["RA"] > 80.0, f"{method} destroyed the retain set: {metrics}"


def test_soft_salun_saves_a_soft_mask(original, tmp_path):
    unlearn(unlearn_config(original, tmp_path / "soft", "salun", salun={"mask_type": "soft"}, epochs=1))
    mask = Mask.load(tmp_path / "soft" / "mask.safetensors")
    assert mask.is_soft and 0 < mask.density < 1 and mask.metadata["soft_temperature"] == 0.1


def test_piggyback_learns_a_sparse_binary_mask_and_shrinks_only_its_weights(original):
    config = unlearn_config(original, Path("unused"), "piggyback_shrink", piggyback_shrink={"eta": 0.3})
    model = load_model(original / "model.safetensors")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = build_method(config).edit(model, *forget_and_retain(config))
    assert not mask.is_soft and set(mask) == set(last_stage(model)) == {"trunk.1.weight", "trunk.3.weight"}
    assert 0.005 < mask.density < 0.3
    for name, p in model.named_parameters():
        if name in mask:
            assert torch.equal(p.detach()[mask[name]], before[name][mask[name]] * 0.3)
            assert torch.equal(p.detach()[~mask[name]], before[name][~mask[name]])
        else:
            assert torch.equal(p.detach(), before[name])
    unpenalised = replace(config, piggyback_shrink=replace(config.piggyback_shrink, penalty=0.0))
    denser = build_method(unpenalised).edit(load_model(original / "model.safetensors"), *forget_and_retain(config))
    assert denser.density > mask.density


def test_kaggle_2nd_reinitialises_exactly_the_least_salient_weights(original):
    config = unlearn_config(original, Path("unused"), "kaggle_2nd",
                            kaggle_2nd={"reinit_ratio": 0.3, "grad_scale": 0.1})
    model = load_model(original / "model.safetensors")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = build_method(config).edit(model, *forget_and_retain(config))
    assert mask.is_soft
    fresh_total = total = 0
    for name, p in model.named_parameters():
        fresh = mask[name] == 1.0
        assert torch.equal(p.detach() != before[name], fresh), name
        assert bool((mask[name][~fresh] == torch.tensor(0.1)).all())
        if p.dim() > 1:
            fresh_total, total = fresh_total + int(fresh.sum()), total + p.numel()
        else:
            assert not fresh.any()
    assert fresh_total == total - round(0.7 * total)


def test_ssd_dampens_only_the_weights_it_selects(original, tmp_path):
    unlearn(unlearn_config(original, tmp_path / "ssd", "ssd"))
    mask = Mask.load(tmp_path / "ssd" / "mask.safetensors")
    before = dict(load_model(original / "model.safetensors").named_parameters())
    after = dict(load_model(tmp_path / "ssd" / "model.safetensors").named_parameters())
    assert 0 < mask.density < 0.5
    for name, m in mask.masks.items():
        assert torch.equal(before[name].detach()[~m], after[name].detach()[~m])
        assert bool((after[name].detach()[m].abs() <= before[name].detach()[m].abs()).all())


def test_compare_over_seeds_reports_mean_and_std(original, tmp_path):
    config = from_dict(CompareConfig, {"out": str(tmp_path / "cmp"), "original": str(original), "forget": "class:3",
                                       "methods": ["ssd", "kaggle_2nd"], "seeds": [0, 1],
                                       "unlearn": {"epochs": 1, "checkpoint_every": 0}})
    summary = compare(config)
    assert summary["seeds"] == [0, 1] and (tmp_path / "cmp" / "seed1" / "ssd" / "model.safetensors").is_file()
    row = summary["methods"]["kaggle_2nd"]
    runs = [summary["per_seed"][str(s)]["methods"]["kaggle_2nd"]["UA"] for s in (0, 1)]
    assert row["UA"] == pytest.approx(sum(runs) / 2)
    assert row["UA.std"] == pytest.approx(abs(runs[0] - runs[1]) / 2 ** 0.5)
    table = comparison_table(summary)
    assert "| kaggle_2nd |" in table and " ± " in table
