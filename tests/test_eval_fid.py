"""Protocol retain-fid-v1 with a tiny local CLIP extractor: ~0 on identical sets, large on different ones."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import needs_cifar10
from PIL import Image
from torch import nn

from erasure.evaluation import fid as fid_module
from erasure.evaluation.fid import FeatureError, build_extractor


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPVisionModel saved like a downloaded one (32x32 input, 32 features)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("clip") / "clip-vision"
    CLIPVisionModel(config).save_pretrained(path)
    return path


def image_folder(path: Path, kind: str, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        if kind == "noise":
            image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        else:  # smooth, dark, nearly flat images
            image = np.full((48, 48, 3), rng.integers(0, 40, 3), dtype=np.uint8)
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return path


def test_identical_sets_score_zero_and_different_sets_large(run_cli, clip_dir: Path, tmp_path: Path) -> None:
    noise = image_folder(tmp_path / "noise", "noise", 12, seed=0)
    flat = image_folder(tmp_path / "flat", "flat", 12, seed=1)
    status, log = run_cli("eval", "fid", "--images", noise, "--reference", noise, "--features", f"clip:{clip_dir}",
                          "--out", tmp_path / "same")
    assert status == 0, log
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())
    status, log = run_cli("eval", "fid", "--images", noise, "--reference", flat, "--features", f"clip:{clip_dir}",
                          "--kid-subset-size", "8")
    assert status == 0, log
    different = json.loads((noise / "eval-fid" / "metrics.json").read_text())

    assert same["protocol"] == "retain-fid-v1"
    assert abs(same["fid"]) < 1e-6
    assert different["fid"] > 1.0 and different["fid"] > 1e6 * abs(same["fid"])
    assert different["kid_mean"] > 10 * abs(same["kid_mean"]) and different["kid_subset_size"] == 8
    assert same["kid_subset_size"] == 12  # capped at N
    assert same["settings"]["extractor"] == {"name": "clip", "model": str(clip_dir), "num_features": 32,
                                             "input_size": 32}
    report = (noise / "eval-fid" / "report.md").read_text()
    for text in ("`retain-fid-v1`", "| Fréchet distance (clip features) |", "KID (mean)", "Small sample",
                 "extractor.name | clip", "resize | PIL bicubic to 32x32", "grid_reference.png"):
        assert text in report, text
    assert (noise / "eval-fid" / "grid_images.png").is_file()


class Spy(nn.Module):
    """Records what a feature extractor receives."""

    input_size = 24
    num_features = 3
    seen: list[torch.Tensor] = []

    def __init__(self, argument: str | None):
        super().__init__()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        Spy.seen.append(images.clone())
        return images.float().mean(dim=(2, 3))

    def describe(self) -> dict:
        return {"name": "spy", "model": "mean colour", "num_features": 3, "input_size": 24}


def test_extractor_receives_uint8_nchw_in_full_range(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fid_module.FEATURE_EXTRACTORS, "spy", Spy)
    Spy.seen.clear()
    noise = image_folder(tmp_path / "noise", "noise", 5, seed=0)
    status, log = run_cli("eval", "fid", "--images", noise, "--reference", noise, "--features", "spy",
                          "--batch-size", "2")
    assert status == 0, log
    assert [tuple(t.shape) for t in Spy.seen] == [(2, 3, 24, 24), (2, 3, 24, 24), (1, 3, 24, 24)] * 2
    batch = Spy.seen[0]
    assert batch.dtype == torch.uint8 and int(batch.max()) > 200 and int(batch.min()) < 50
    original = np.array(Image.open(noise / "000.png").resize((24, 24), Image.Resampling.BICUBIC))
    assert torch.equal(batch[0], torch.from_numpy(original).permute(2, 0, 1))


def test_extractor_errors_name_the_features_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FeatureError, match="unknown feature extractor 'vgg'; choose one of: inception, clip, "
                                           "classifier"):
        build_extractor("vgg")
    with pytest.raises(FeatureError, match="clip:<dir>"):
        build_extractor("clip")
    with pytest.raises(FeatureError, match="not a transformers CLIP model directory"):
        build_extractor(f"clip:{tmp_path}")
    import torchmetrics.image.fid as tm_fid

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", offline)
    with pytest.raises(FeatureError, match="could not download the FID Inception weights.*--features clip:"):
        build_extractor("inception")


def test_inception_without_torch_fidelity_says_what_to_do(run_cli, tmp_path: Path) -> None:
    pytest.importorskip("torchmetrics")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed")
    noise = image_folder(tmp_path / "noise", "noise", 3, seed=0)
    status, log = run_cli("eval", "fid", "--images", noise, "--reference", noise)
    assert status == 2 and "torch-fidelity" in log and "--features clip:" in log
    assert not (noise / "eval-fid").exists()


def test_full_clip_model_directory_works(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    extractor = build_extractor(f"clip:{tmp_path / 'clip'}")
    features = extractor(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 32) and extractor.num_features == 32


def test_fid_errors(run_cli, clip_dir: Path, tmp_path: Path) -> None:
    one = image_folder(tmp_path / "one", "noise", 1, seed=0)
    status, log = run_cli("eval", "fid", "--images", one, "--reference", one, "--features", f"clip:{clip_dir}")
    assert status == 2 and "at least 2 images" in log
    (tmp_path / "empty").mkdir()
    status, log = run_cli("eval", "fid", "--images", tmp_path / "empty", "--reference", one)
    assert status == 2 and "holds no images" in log
    status, log = run_cli("eval", "fid", "--images", one)
    assert status == 2 and "--reference" in log


@needs_cifar10
def test_a_classifier_run_is_a_feature_extractor_through_the_entry_point(run_cli, cifar_judge: Path,
                                                                          tmp_path: Path) -> None:
    judge = cifar_judge
    assert "classifier" in fid_module.available_extractors() and "classifier" not in fid_module.FEATURE_EXTRACTORS
    noise = image_folder(tmp_path / "noise", "noise", 6, seed=0)
    flat = image_folder(tmp_path / "flat", "flat", 6, seed=1)
    status, log = run_cli("eval", "fid", "--images", noise, "--reference", flat, "--features", f"classifier:{judge}",
                          "--out", tmp_path / "eval")
    assert status == 0 and "retain-fid-v1: Fréchet distance (classifier features) " in log and "FID" not in log, log
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["extractor"]["name"] == "classifier" and metrics["fid"] > 0
    extractor = metrics["settings"]["extractor"]
    assert extractor["num_features"] == 16 and extractor["input_size"] == 32
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Fréchet distance (classifier features)" in report and "| FID" not in report
    status, log = run_cli("eval", "fid", "--images", noise, "--reference", flat, "--features", "classifier")
    assert status == 2 and "classifier:<run dir>" in log
