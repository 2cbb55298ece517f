"""`erasure export` and `erasure sd --export`: every format round-trips to the erased model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erasure.cli import main
from erasure.io import read_json

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sd_tiny.yaml"


@pytest.fixture(scope="module")
def run(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny salun run that also exported itself as single-file and LoRA (`sd --export`)."""
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["sd", "--config", str(TINY), "--model", str(tiny_sd_dir), "--out", str(out), "--grid-seeds", "0",
                 "--no-export-delta", "--export", "single-file,lora"]) == 0
    return out


def erased_pipeline(run: Path, base: Path):
    from pipelines.loading import load_erased_pipeline

    return load_erased_pipeline(str(base), run)


def test_the_single_file_checkpoint_loads_back_with_every_weight_exact(run, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines.tiny import save_tiny_pipeline

    path = run / "exports" / "single-file" / "model.safetensors"
    keys = load_file(path)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.") for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    other = save_tiny_pipeline(tmp_path / "configs-only", seed=1)  # same configs, other weights: all from the file
    back = StableDiffusionPipeline.from_single_file(str(path), config=str(other), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    expected = erased_pipeline(run, tiny_sd_dir)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(expected, part).state_dict(), getattr(back, part).state_dict()
        assert set(want) == set(got), part
        for name, value in want.items():
            assert torch.equal(got[name], value), f"{part}.{name}"


@pytest.mark.parametrize("name, key, shape", [
    ("tiny-sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (96, 32)),
    ("tiny-sdxl", "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", (144, 48))])
def test_sd2_and_sdxl_pipelines_are_written_in_their_layouts_and_load_back_exactly(name, key, shape, tmp_path):
    """SD 2.x's OpenCLIP (GELU) under `cond_stage_model.model.`; SDXL's CLIP and OpenCLIP (with its projection)
    under `conditioner.embedders.0/1.`, its added conditioning as `label_emb`; q/k/v fused into in_proj."""
    from pipelines.export import write_single_file
    from pipelines.loading import load_base_pipeline
    from pipelines.tiny import save_tiny_pipeline

    pipe = load_base_pipeline(name)
    write_single_file(pipe, tmp_path / "model.safetensors")
    keys = load_file(tmp_path / "model.safetensors")
    assert keys[key].shape == shape
    other = save_tiny_pipeline(tmp_path / "configs-only", seed=1, name=name)  # other weights: all from the file
    back = type(pipe).from_single_file(str(tmp_path / "model.safetensors"), config=str(other), local_files_only=True)
    parts = ["unet", "vae", "text_encoder"]
    if name == "tiny-sdxl":
        parts.append("text_encoder_2")
        assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"} <= set(keys)
    else:
        assert back.scheduler.config.prediction_type == "v_prediction"
    for part in parts:
        want, got = getattr(pipe, part).state_dict(), getattr(back, part).state_dict()
        assert set(want) == set(got), part
        for param, value in want.items():
            assert torch.equal(got[param], value), f"{part}.{param}"


def lora_layers(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(path)
    names = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in tensors}
    return {n: (tensors[f"unet.{n}.lora_B.weight"], tensors[f"unet.{n}.lora_A.weight"]) for n in names}


def test_a_full_rank_lora_loaded_by_diffusers_reproduces_the_erased_weights(run, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    assert main(["export", "--run", str(run), "--format", "lora", "--rank", "100000", "--out", str(out)]) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["layers"] > 0 and metrics["max_relative_error"] < 1e-6
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused, expected = pipe.unet.state_dict(), erased_pipeline(run, tiny_sd_dir).unet.state_dict()
    left_out = {row["parameter"] for row in metrics["left_out"]}
    assert left_out and all(not name.endswith(".weight") or "norm" in name for name in left_out)
    for name, value in expected.items():
        if name in left_out:
            assert torch.equal(fused[name], base[name]), name
        else:
            torch.testing.assert_close(fused[name], value, rtol=0, atol=1e-5, msg=name)


def test_a_low_rank_lora_reports_the_error_it_has(run, tiny_sd_dir, tmp_path):
    out = tmp_path / "rank2"
    assert main(["export", "--run", str(run), "--format", "lora", "--rank", "2", "--out", str(out)]) == 0
    from diffusers import UNet2DConditionModel

    metrics = read_json(out / "metrics.json")
    before = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").state_dict()
    after = erased_pipeline(run, tiny_sd_dir).unet.state_dict()
    layers = lora_layers(out / "pytorch_lora_weights.safetensors")
    assert metrics["max_relative_error"] > 0.01
    full = read_json(run / "exports" / "lora" / "metrics.json")  # rank 16 from `sd --export`
    assert 0 < full["prediction_error"] < metrics["prediction_error"]
    for row in metrics["per_layer"]:
        b, a = layers[row["layer"]]
        assert b.shape[1] == row["rank"] <= 2
        delta = (after[row["layer"] + ".weight"] - before[row["layer"] + ".weight"]).double().flatten(1)
        measured = torch.linalg.norm(delta - b.double().flatten(1) @ a.double().flatten(1)) / torch.linalg.norm(delta)
        assert float(measured) == pytest.approx(row["relative_error"], rel=1e-4, abs=1e-6), row["layer"]


def test_delta_and_diffusers_exports_are_exact_and_an_export_is_not_clobbered(run, tiny_sd_dir, tmp_path, run_cli):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pipelines.delta import apply_delta

    expected = erased_pipeline(run, tiny_sd_dir).unet.state_dict()
    assert main(["export", "--run", str(run), "--format", "delta", "--out", str(tmp_path / "delta")]) == 0
    applied = apply_delta(UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet"),
                          tmp_path / "delta" / "delta.safetensors").state_dict()
    assert main(["export", "--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "full")]) == 0
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "full" / "pipeline").unet.state_dict()
    for name, value in expected.items():
        assert torch.equal(applied[name], value) and torch.equal(loaded[name], value), name
    status, text = run_cli("export", "--run", run, "--format", "delta", "--out", tmp_path / "delta")
    assert status == 2 and "--overwrite" in text
    assert run_cli("export", "--run", run, "--format", "delta", "--out", tmp_path / "delta", "--overwrite")[0] == 0


def test_export_of_a_folder_that_is_no_sd_run_says_what_to_pass(tmp_path, run_cli):
    status, text = run_cli("export", "--run", tmp_path, "--format", "lora")
    assert status == 2 and "no manifest.json" in text and "--out folder" in text
    (tmp_path / "manifest.json").write_text('{"status": "finished", "kind": "ddpm-unlearn", "config": {}}')
    status, text = run_cli("export", "--run", tmp_path, "--format", "lora")
    assert status == 2 and "ddpm-unlearn run" in text and "erasure sd" in text


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:UserWarning")
def test_a_lora_with_biases_carries_every_changed_linear_and_conv_parameter(run, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "bias"
    assert main(["export", "--run", str(run), "--format", "lora", "--rank", "100000", "--lora-bias",
                 "--out", str(out)]) == 0
    left_out = {row["parameter"] for row in read_json(out / "metrics.json")["left_out"]}
    assert left_out and all("norm" in name for name in left_out)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out))
    expected = erased_pipeline(run, tiny_sd_dir).unet.state_dict()
    checked = 0
    for name, module in pipe.unet.named_modules():
        if not getattr(module, "lora_B", None):
            continue
        (adapter,), base = list(module.lora_B), module.base_layer  # diffusers names the one adapter
        torch.testing.assert_close(base.weight + module.get_delta_weight(adapter), expected[f"{name}.weight"],
                                   rtol=0, atol=1e-5, msg=name)
        bias = module.lora_B[adapter].bias + (base.bias if base.bias is not None else 0)
        if base.bias is not None:
            torch.testing.assert_close(bias, expected[f"{name}.bias"], rtol=0, atol=1e-6, msg=name)
        else:
            assert not bias.any(), name
        checked += 1
    assert checked == read_json(out / "metrics.json")["layers"]


def sd_shaped_pipeline(seed: int):
    """SD v1.4's block structure (4 levels, 2 layers per block, attention in the first 3) at toy width."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from pipelines.tiny import HIDDEN, tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16, 16, 16), layers_per_block=2, cross_attention_dim=HIDDEN,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, sample_size=32)
    tokenizer = tiny_tokenizer()
    return StableDiffusionPipeline(vae=vae, text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_the_single_file_layout_holds_for_sd_v1_block_structure(tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines.export import write_single_file

    pipe = sd_shaped_pipeline(seed=0)
    sd_shaped_pipeline(seed=1).save_pretrained(tmp_path / "configs-only")
    write_single_file(pipe, tmp_path / "model.safetensors")
    keys = load_file(tmp_path / "model.safetensors")
    for key in ("model.diffusion_model.input_blocks.11.0.out_layers.3.weight",  # SD v1.4 names
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.decoder.up.0.block.2.conv2.weight",
                "first_stage_model.encoder.down.2.downsample.conv.weight"):
        assert key in keys, key
    back = StableDiffusionPipeline.from_single_file(str(tmp_path / "model.safetensors"),
                                                    config=str(tmp_path / "configs-only"), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, part).state_dict(), getattr(back, part).state_dict()
        assert set(want) == set(got), part
        assert all(torch.equal(got[name], value) for name, value in want.items()), part
