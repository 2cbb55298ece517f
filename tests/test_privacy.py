"""The likelihood-ratio membership attack (offline LiRA) and its place in `classifier compare`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.digits import unlearn_config
from torch import nn

from classifiers.privacy import OfflineLiRA, attack_metrics, logit_confidence
from erasure.config import from_dict
from erasure.datasets import ImageSet
from erasure.errors import ConfigError, ErasureError
from erasure.io import read_json


class LookupModel(nn.Module):
    """A fake classifier whose logits for image i (its first pixel holds i) come from a table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def _examples(n: int) -> ImageSet:
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageSet(images, torch.zeros(n, dtype=torch.long))


def _logits(phi: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose logit-scaled confidence in class 0 is `phi`."""
    return torch.stack([phi, torch.zeros_like(phi)], dim=1)


def test_logit_confidence_is_the_log_odds_of_the_true_class_and_stays_finite():
    logits = torch.tensor([[2.0, 0.5, -1.0], [200.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0])
    p = torch.softmax(logits.double(), 1)[0, 0].item()
    phi = logit_confidence(logits, labels)
    assert phi[0] == pytest.approx(np.log(p / (1 - p)))
    assert phi[1] == pytest.approx(200.0 - np.log(2.0))  # p rounds to 1 in float32; phi does not


def test_attack_metrics_are_chance_for_equal_scores_and_perfect_for_separated_ones():
    rng = np.random.default_rng(0)
    same = attack_metrics(rng.random(4000), rng.random(4000))
    assert same["LiRA.AUC"] == pytest.approx(50.0, abs=2.0) and same["LiRA.TPR@1%"] < 3.0
    apart = attack_metrics(rng.random(100) + 2.0, rng.random(100))
    assert apart == {"LiRA.AUC": 100.0, "LiRA.TPR@1%": 100.0}


def test_lira_scores_examples_the_target_is_more_confident_on_than_the_shadows():
    n = 200
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=generator) * 3  # examples differ in difficulty
    shadows = [LookupModel(_logits(base + 0.3 * torch.randn(n, generator=generator))) for _ in range(4)]
    members = torch.arange(n) < n // 2
    target = LookupModel(_logits(base + 2.0 * members))  # confident beyond the shadows on the first half only
    attack = OfflineLiRA(shadows, _examples(n))
    scores = attack.scores(target)
    metrics = attack_metrics(scores[members.numpy()], scores[~members.numpy()])
    assert metrics["LiRA.AUC"] > 95.0
    # The raw confidence cannot tell them apart as well: example difficulty swamps the shift.
    raw = logit_confidence(target.table, torch.zeros(n, dtype=torch.long))
    assert attack_metrics(raw[members.numpy()], raw[~members.numpy()])["LiRA.AUC"] < 80.0


def test_lira_needs_two_shadows():
    with pytest.raises(ErasureError, match="at least 2 shadow"):
        OfflineLiRA([LookupModel(torch.zeros(4, 2))], _examples(4))
    from classifiers.config import CompareConfig

    with pytest.raises(ConfigError, match="lira_shadows"):
        from_dict(CompareConfig, {"lira_shadows": 1})


def test_compare_reports_lira_beside_mia_with_shadows_trained_on_the_retain_set(digits_original, tmp_path):
    from classifiers.commands import compare, unlearn
    from classifiers.config import CompareConfig
    from erasure.io import read_json

    retrain = tmp_path / "retrain"
    unlearn(unlearn_config(digits_original, retrain, "retrain"))
    config = from_dict(CompareConfig, {"original": str(digits_original), "retrain": str(retrain), "methods": ["ft"],
                                       "forget": "class:3", "lira_shadows": 2, "out": str(tmp_path / "cmp"),
                                       "unlearn": {"epochs": 1, "checkpoint_every": 0}})
    summary = compare(config)
    for metrics in (summary["original"], *summary["methods"].values()):
        assert 0.0 <= metrics["LiRA.AUC"] <= 100.0 and 0.0 <= metrics["LiRA.TPR@1%"] <= 100.0
    # Class-wise forgetting: the original knows the class, the retrained model never saw it.
    assert summary["original"]["LiRA.AUC"] > summary["methods"]["retrain"]["LiRA.AUC"]
    shadow = tmp_path / "cmp" / "shadows" / "shadow1"
    kept = read_json(shadow / "train_indices.json")["train_index"]
    forgotten = set(read_json(tmp_path / "cmp" / "ft" / "forget_indices.json")["train_index"])
    assert kept and not forgotten & set(kept)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "LiRA.AUC" in report and "Two membership attacks" in report


def test_compare_search_selects_on_validation_data_and_reports_every_point(digits_original, tmp_path, monkeypatch):
    import classifiers.metrics as metrics
    from classifiers.commands import compare, unlearn
    from classifiers.config import CompareConfig

    retrain = tmp_path / "retrain"
    unlearn(unlearn_config(digits_original, retrain, "retrain"))
    validation_flags = []
    evaluate = metrics.evaluate

    def spy(model, data, split, seed=0, validation=False):
        validation_flags.append(validation)
        return evaluate(model, data, split, seed, validation)

    monkeypatch.setattr("classifiers.search.evaluate", spy)
    config = from_dict(CompareConfig, {"original": str(digits_original), "retrain": str(retrain), "methods": ["ft"],
                                       "forget": "class:3", "out": str(tmp_path / "cmp"),
                                       "search": {"ft": {"lr": [1e-5, 0.05, 1e6], "epochs": [1]}},
                                       "unlearn": {"checkpoint_every": 0}})
    summary = compare(config)
    result = summary["search"]["ft"]
    assert [p["settings"] for p in result["points"]] == [{"epochs": 1, "lr": lr} for lr in (1e-5, 0.05, 1e6)]
    assert result["points"][2]["validation_gap"] is None and "became" in result["points"][2]["diverged"]
    # lr 1e-5 leaves the original (which knows class 3) as it was: far from retrain; lr 0.05 fine-tunes it away.
    assert result["selected"] == 1
    selected = tmp_path / "cmp" / "search" / "ft" / "epochs=1,lr=0.05"
    assert summary["methods"]["ft"] == read_json(selected / "metrics.json")
    assert validation_flags and all(validation_flags)  # the search never reads the test set
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "Settings search" in report and "| **1** | 1 | 0.05 |" in report and "| diverged |" in report


def test_a_search_must_name_a_compared_method_and_list_values():
    from classifiers.config import CompareConfig

    with pytest.raises(ConfigError, match="'search.rl'"):
        from_dict(CompareConfig, {"methods": ["ft"], "search": {"rl": {"lr": [0.1]}}})
    with pytest.raises(ConfigError, match="non-empty list"):
        from_dict(CompareConfig, {"methods": ["ft"], "search": {"ft": {"lr": 0.1}}})
    with pytest.raises(ConfigError, match="per_method.ft|lr"):
        from_dict(CompareConfig, {"methods": ["ft"], "search": {"ft": {"lr": [-1.0]}}})
