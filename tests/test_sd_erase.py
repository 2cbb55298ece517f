"""`erasure sd` on a tiny offline Stable Diffusion: sets -> mask -> masked training -> save -> load -> generate."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.interrupt import crashing_at
from helpers.launch import accelerate_launch, log_of

from erasure.cli import main
from erasure.config import load_config
from erasure.errors import ConfigError
from erasure.io import read_json
from pipelines.sd_config import SDEraseConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sd_tiny.yaml"


def erase_args(model: Path, out: Path, *extra: object) -> list[str]:
    return ["sd", "--config", str(TINY), "--model", str(model), "--out", str(out), *map(str, extra)]


def reuse_sets(run: Path) -> list[str]:
    """Flags that reuse a finished run's forget/retain images (skips generating them again)."""
    return ["--forget-images", str(run / "data" / "forget"), "--retain-images", str(run / "data" / "retain")]


def unet_state(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).state_dict()


def crash_eraser_at(monkeypatch: pytest.MonkeyPatch, crash_step: int):
    """Make `Eraser.step_loss` raise at `crash_step` (a simulated interruption); returns the original."""
    from pipelines.stable_diffusion import Eraser

    original = Eraser.step_loss
    monkeypatch.setattr(Eraser, "step_loss", crashing_at(original, crash_step))
    return original


@pytest.fixture(scope="module")
def erased(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished salun run of configs/sd_tiny.yaml on the saved tiny pipeline."""
    out = tmp_path_factory.mktemp("sd") / "run"
    assert main(erase_args(tiny_sd_dir, out)) == 0
    return out


def test_erased_run_writes_every_output_and_the_forget_objective_falls(erased):
    manifest, metrics = read_json(erased / "manifest.json"), read_json(erased / "metrics.json")
    assert manifest["status"] == "finished" and manifest["config"]["forget_prompt"] == "a photo of a nude person"
    assert metrics["forget_objective_after"] < 0.8 * metrics["forget_objective_before"]
    for name in ("unet/config.json", "mask.safetensors", "delta.safetensors", "samples/before_after.png",
                 "data/forget/prompts.jsonl", "data/retain/00007.png"):
        assert (erased / name).is_file(), name
    assert not (erased / "checkpoints").exists()


def test_the_run_carries_a_hub_model_card_whose_config_reproduces_it(erased, tmp_path):
    import yaml

    from pipelines.model_card import sd_card

    text = (erased / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["library_name"] == "diffusers" and {"salun", "concept-erasure"} <= set(header["tags"])
    assert "base_model" not in header  # a local path is not a hub id
    assert "a photo of a nude person" in text and "UNet2DConditionModel.from_pretrained" in text
    reproduce = tmp_path / "config.yaml"
    reproduce.write_text(text.split("```yaml\n")[1].split("```")[0])
    assert load_config(SDEraseConfig, reproduce) == load_config(SDEraseConfig, None,
                                                                 read_json(erased / "manifest.json")["config"])
    metrics = read_json(erased / "metrics.json")
    sd_card(tmp_path, {**read_json(erased / "manifest.json")["config"], "model": "CompVis/stable-diffusion-v1-4"},
            "SalUn", metrics, "StableDiffusionPipeline", "unet", "UNet2DConditionModel")
    assert yaml.safe_load((tmp_path / "README.md").read_text().split("---\n")[1])["base_model"] == \
        "CompVis/stable-diffusion-v1-4"


def test_the_saved_unet_loads_strictly_into_a_diffusers_pipeline_and_generates(erased, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet, info = UNet2DConditionModel.from_pretrained(erased / "unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, unet=unet, safety_checker=None,
                                                   requires_safety_checker=False)
    image = pipe("a photo of a nude person", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_unmasked_weights_are_bit_identical_and_masked_ones_moved(erased, tiny_sd_dir):
    from erasure.saliency import Mask

    base, after = unet_state(tiny_sd_dir / "unet"), unet_state(erased / "unet")
    mask = Mask.load(erased / "mask.safetensors")
    assert mask.summary()["density"] == pytest.approx(0.5, abs=1e-5)
    moved = 0
    for name, keep in mask.masks.items():
        assert torch.equal(base[name][~keep], after[name][~keep]), name
        moved += int((base[name][keep] != after[name][keep]).sum())
    assert moved > 0


def test_load_erased_pipeline_and_the_delta_reproduce_the_erased_unet_exactly(erased, tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from pipelines.delta import apply_delta, read_delta
    from pipelines.loading import load_erased_pipeline

    expected = unet_state(erased / "unet")
    loaded = load_erased_pipeline(str(tiny_sd_dir), erased).unet.state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    tensors, summary = read_delta(erased / "delta.safetensors")
    assert summary["base_model"] == str(tiny_sd_dir) and 0 < len(tensors) < len(expected)
    applied = apply_delta(base, erased / "delta.safetensors").state_dict()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value) and torch.equal(applied[name], value), name


def test_resume_after_interruption_is_bit_identical(erased, tiny_sd_dir, tmp_path, monkeypatch):
    from erasure.trainer import last_checkpoint_dir
    from pipelines.stable_diffusion import Eraser

    out = tmp_path / "resumed"
    original = crash_eraser_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(erase_args(tiny_sd_dir, out, *reuse_sets(erased), "--grid-seeds", 0))
    assert last_checkpoint_dir(out / "checkpoints")[0] == 2
    monkeypatch.setattr(Eraser, "step_loss", original)
    assert main(erase_args(tiny_sd_dir, out, *reuse_sets(erased), "--grid-seeds", 0, "--resume")) == 0
    assert read_json(out / "metrics.json")["resumed_from_step"] == 2
    expected, resumed = unet_state(erased / "unet"), unet_state(out / "unet")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


@pytest.mark.slow  # the default suite ran 373 s of its 300 s budget
def test_two_cpu_processes_give_the_one_process_result(erased, tiny_sd_dir, tmp_path):
    out = tmp_path / "two"
    result = accelerate_launch(REPO / "erase.py", *erase_args(tiny_sd_dir, out, *reuse_sets(erased), "--mask",
                                                              erased / "mask.safetensors", "--grid-seeds", 0,
                                                              "--no-export-delta"))
    metrics_file = out / "metrics.json"
    assert metrics_file.is_file(), log_of(result)
    assert read_json(metrics_file)["processes"] == 2
    base, expected, got = unet_state(tiny_sd_dir / "unet"), unet_state(erased / "unet"), unet_state(out / "unet")
    # Summation order differs (two shard means averaged by DDP vs one mean); Adam divides each gradient by its
    # own running RMS, which magnifies that float noise where gradients are ~0, so compare with the moves.
    moved = max(float((expected[n] - base[n]).abs().max()) for n in base)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0.02 * moved, msg=name)


def test_gradient_accumulation_gives_the_one_batch_result(erased, tiny_sd_dir, tmp_path):
    out = tmp_path / "accumulated"
    assert main(erase_args(tiny_sd_dir, out, *reuse_sets(erased), "--mask", erased / "mask.safetensors",
                           "--gradient-accumulation-steps", 2, "--grid-seeds", 0, "--no-export-delta")) == 0
    base, expected, got = unet_state(tiny_sd_dir / "unet"), unet_state(erased / "unet"), unet_state(out / "unet")
    moved = max(float((expected[n] - base[n]).abs().max()) for n in base)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0.02 * moved, msg=name)


# ESD through the same loop (scope, mask, falling objective) is test_sd_methods' esd-x test; full-UNet ESD is slow.
@pytest.mark.parametrize("method", [pytest.param("esd", marks=pytest.mark.slow), "ga"])
def test_esd_and_ga_baselines_run_in_the_same_loop(method, erased, tiny_sd_dir, tmp_path):
    out = tmp_path / method
    sampling = ["--esd-ddim-steps", 4] if method == "esd" else []
    assert main(erase_args(tiny_sd_dir, out, *reuse_sets(erased), "--method", method, "--steps", 3, "--lr", 1e-4,
                           *sampling, "--grid-seeds", 0, "--no-export-delta", "--checkpoint-every", 0)) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["method"] == method and "mask" not in metrics
    assert metrics["forget_objective_after"] < metrics["forget_objective_before"]


def test_non_finite_loss_stops_the_run_and_marks_it_failed(erased, tiny_sd_dir, tmp_path, monkeypatch, capsys):
    from pipelines.stable_diffusion import Eraser

    monkeypatch.setattr(Eraser, "step_loss", lambda self, step, micro=0: torch.tensor(float("nan")))
    out = tmp_path / "nan"
    assert main(erase_args(tiny_sd_dir, out, *reuse_sets(erased), "--grid-seeds", 0)) == 2
    assert "loss became nan" in capsys.readouterr().err
    assert read_json(out / "manifest.json")["status"] == "failed"


def test_concept_presets_fill_unset_options_and_flags_win():
    config = load_config(SDEraseConfig, None, {"concept": "Van Gogh", "alpha": "0.5"})
    assert config.forget_prompt == "a painting in the style of Van Gogh" and config.alpha == 0.5
    assert config.out == "outputs/sd-van-gogh" and config.mask_ratio == 0.5
    nudity = load_config(SDEraseConfig, None, {"concept": "nudity"})
    assert nudity.retain_prompts == [nudity.remap_prompt] and nudity.alpha == 0.1
    assert load_config(SDEraseConfig, None, {"concept": "church", "method": "esd"}).mask_ratio is None


@pytest.mark.parametrize("data, words", [
    ({"concept": "dragons"}, ["unknown concept 'dragons'", "nudity"]),
    ({}, ["no forget prompt", "--concept"]),
    ({"forget_prompt": "a cat"}, ["remap) prompt", "--remap-prompt"]),
    ({"concept": "nudity", "resolution": "60"}, ["multiple of 8"]),
])
def test_bad_sd_configs_say_what_to_do(data, words):
    with pytest.raises(ConfigError) as info:
        load_config(SDEraseConfig, None, data)
    for word in words:
        assert word in str(info.value)


def test_a_hub_id_that_cannot_be_loaded_offline_says_to_pass_a_local_directory(run_cli, tmp_path):
    status, output = run_cli("sd", "--concept", "nudity", "--model", "nobody/no-such-model", "--out", tmp_path / "x")
    assert status == 2
    assert "could not load model 'nobody/no-such-model' offline" in output and "local diffusers directory" in output


def test_a_delta_refuses_a_model_it_was_not_made_from(erased):
    from pipelines.delta import DeltaError, apply_delta

    with pytest.raises(DeltaError, match="apply it to the base model it was made from"):
        apply_delta(torch.nn.Linear(2, 2), erased / "delta.safetensors")


def test_retain_prompts_come_from_a_list_or_a_prompt_file(tmp_path):
    from pipelines.sd_data import prompt_texts

    path = tmp_path / "retain.txt"
    path.write_text("a photo of a dog\na photo of a cat\n")
    assert prompt_texts([str(path)]) == ["a photo of a dog", "a photo of a cat"]
    assert prompt_texts(["a", "b"]) == ["a", "b"]
