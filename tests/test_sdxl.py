"""SDXL, the second model family: its conditioning against diffusers' own, erasure end to end on a tiny SDXL
pipeline saved in diffusers format, loading, exports, and a family erasure does not train refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.erased_runs import assert_lora_round_trip, assert_masked_run_loads
from safetensors.torch import load_file
from test_sd_erase import erase_args, reuse_sets, unet_state

from erasure.cli import main
from erasure.io import read_json


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tiny import TINY_SDXL_NAME, save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline", name=TINY_SDXL_NAME)


@pytest.fixture(scope="module")
def salun_run(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdxl") / "salun"
    assert main(erase_args(sdxl_dir, out, "--steps", 2, "--lr", 1e-3, "--grid-seeds", 0)) == 0
    return out


def test_the_condition_is_what_the_sdxl_pipeline_feeds_its_unet() -> None:
    """Hidden states, pooled embedding and time ids as `encode_prompt` and `_get_add_time_ids` make them; the
    empty prompt is the zeros its classifier-free guidance uses."""
    from pipelines.families import text_conditioning
    from pipelines.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    text = text_conditioning(pipe, 32)
    condition = text.encode(["a photo of a cat", ""])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a cat", device="cpu",
                                                                    do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    x_t, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        ours = text.predictor(pipe.unet)(x_t, t, condition)
        theirs = pipe.unet(x_t, t, encoder_hidden_states=torch.cat([embeds, negative]),
                           added_cond_kwargs={"text_embeds": torch.cat([pooled, negative_pooled]),
                                              "time_ids": time_ids.repeat(2, 1)}).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert condition.shape == (2, 78, 80) and not negative.any() and not condition[1, :77].any()


def test_salun_erases_an_sdxl_model_whose_unet_loads_with_plain_diffusers(salun_run: Path, sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from erasure.saliency import Mask

    metrics = read_json(salun_run / "metrics.json")
    assert metrics["family"] == "sdxl" and metrics["forget_objective_after"] < metrics["forget_objective_before"]
    base, after = unet_state(sdxl_dir / "unet"), unet_state(salun_run / "unet")
    assert "add_embedding.linear_1.weight" in Mask.load(salun_run / "mask.safetensors").masks
    assert_masked_run_loads(StableDiffusionXLPipeline, UNet2DConditionModel, sdxl_dir, salun_run, base, after)


@pytest.mark.parametrize("method", ["esd-x", "uce"])
def test_a_cross_attention_method_changes_only_cross_attention_on_sdxl(method: str, salun_run: Path, sdxl_dir: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / method
    extra = ["--esd-ddim-steps", 2, *reuse_sets(salun_run), "--steps", 1, "--lr", 1e-3] if method == "esd-x" else []
    assert main(erase_args(sdxl_dir, out, "--method", method, "--grid-seeds", 0, "--no-export-delta", *extra)) == 0
    base, after = unet_state(sdxl_dir / "unet"), unet_state(out / "unet")
    changed = {name for name in base if not torch.equal(base[name], after[name])}
    assert changed and all(".attn2." in name for name in changed)
    # (UCE solves its closed form over SDXL's token states: test_sd_methods' minimiser test runs on both families)


def test_exports_of_an_sdxl_run_load(salun_run: Path, sdxl_dir: Path, tmp_path: Path, run_cli) -> None:
    from diffusers import StableDiffusionXLPipeline

    after = unet_state(salun_run / "unet")
    pipe = assert_lora_round_trip(StableDiffusionXLPipeline, sdxl_dir, salun_run, tmp_path / "lora", after)
    status, output = run_cli("export", "--run", salun_run, "--format", "single-file", "--out", tmp_path / "single")
    assert status == 0, output
    from pipelines.export_ldm import UNET_PREFIX, unet_key_map  # the layouts' round trip: test_export

    single = load_file(tmp_path / "single" / "model.safetensors")
    renamed = unet_key_map(pipe.unet.config, list(after))
    assert all(torch.equal(single[UNET_PREFIX + renamed[name]], value) for name, value in after.items())


def test_a_model_family_erasure_does_not_train_is_refused_by_name(tmp_path: Path, run_cli) -> None:
    model = tmp_path / "pixart"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                        "_diffusers_version": "0.30"}))
    status, output = run_cli("sd", "--concept", "nudity", "--model", model, "--out", tmp_path / "run")
    assert status != 0 and "is a PixArtAlphaPipeline" in output and "SDXL, SD3, FLUX" in output


def test_the_attacks_refuse_an_sdxl_model_in_one_line(tmp_path: Path, run_cli) -> None:
    """They render candidates from token ids through SD's one text encoder, the paraphrase baseline too."""
    from test_eval_attack import classifier_run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of an airplane\n")
    judge = classifier_run(tmp_path / "judge", favoured=0)
    for attack in ("paraphrase", "unlearndiffatk"):
        status, output = run_cli("eval", "attack", "--model", "tiny-sdxl", "--steps", "2", "--height", "32",
                                 "--width", "32", "--device", "cpu", "--prompts", prompts, "--judge", judge,
                                 "--target-class", "airplane", "--attack", attack, "--out", tmp_path / attack)
        assert status == 2 and "this model is SDXL" in output and not (tmp_path / attack).exists(), output


@pytest.mark.slow  # two processes under accelerate launch: ~30 s
def test_two_cpu_processes_erase_sdxl_like_one(salun_run: Path, sdxl_dir: Path, tmp_path: Path) -> None:
    from helpers.launch import erase_with_two_processes

    out = tmp_path / "two"
    erase_with_two_processes(sdxl_dir, salun_run, out)
    base, expected, got = unet_state(sdxl_dir / "unet"), unet_state(salun_run / "unet"), unet_state(out / "unet")
    # Float summation order differs (two shard means averaged by DDP vs one mean) and Adam divides each gradient
    # by its own RMS, which magnifies that noise where a gradient is near Adam's eps: a handful of entries (4 of
    # 1.4M when measured) move up to 8 % of the largest move differently; every other entry agrees within 2 %.
    moved = max(float((expected[n] - base[n]).abs().max()) for n in base)
    apart = sum(int(((got[n] - expected[n]).abs() > 0.02 * moved).sum()) for n in expected)
    assert apart <= 1e-5 * sum(value.numel() for value in expected.values()), apart
    assert max(float((got[n] - expected[n]).abs().max()) for n in expected) < 0.2 * moved
