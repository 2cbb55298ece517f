"""SD3 and FLUX, the flow-matching transformer families: their conditioning and noising against diffusers' own,
erasure end to end on tiny pipelines of both (with T5 encoders and tokenizers built offline) saved in diffusers
format, loading with plain diffusers, the parameter scopes of their joint attention, exports, and the closed-form
edits refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.erased_runs import assert_lora_round_trip, assert_masked_run_loads
from test_sd_erase import erase_args, reuse_sets

from erasure.cli import main
from erasure.io import read_json

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    import diffusers

    from erasure.io import read_json as read

    return getattr(diffusers, read(folder / "config.json")["_class_name"]).from_pretrained(folder).state_dict()


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{family}") / "pipeline", name=f"tiny-{family}")


@pytest.fixture(scope="module")
def salun_run(model_dir: Path, family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(family) / "salun"
    assert main(erase_args(model_dir, out, "--steps", 2, "--lr", 1e-3, "--grid-seeds", 0)) == 0
    return out


def test_the_condition_is_what_the_sd3_pipeline_feeds_its_transformer() -> None:
    """The joint CLIP + T5 sequence and the pooled CLIP projections as `encode_prompt` makes them."""
    from pipelines.families import text_conditioning
    from pipelines.tiny import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline()
    text = text_conditioning(pipe)
    condition = text.encode(["a photo of a cat", ""])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a cat", None, None, device="cpu",
                                                                    do_classifier_free_guidance=True)
    x_t, t = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ours = text.predictor(pipe.transformer)(x_t, t, condition)
        theirs = pipe.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=torch.cat([embeds, negative]),
                                  pooled_projections=torch.cat([pooled, negative_pooled])).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert condition.shape == (2, 77 + 256 + 1, 64) and bool(pipe.text_encoder_3 is not None)


def test_the_condition_and_packing_are_what_the_flux_pipeline_feeds_its_transformer() -> None:
    """T5 states and the CLIP pooled vector as `encode_prompt` makes them, latents packed 2x2 with the pipeline's
    image ids, sigma as the timestep and the embedded guidance diffusers' FLUX fine-tuning uses."""
    from pipelines.families import FLUX_TRAINING_GUIDANCE, text_conditioning
    from pipelines.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline()
    text = text_conditioning(pipe)
    condition = text.encode(["a photo of a cat", ""])
    embeds, pooled, text_ids = pipe.encode_prompt(["a photo of a cat", ""], None, device="cpu")
    x_t, t = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 250.0])
    with torch.no_grad():
        ours = text.predictor(pipe.transformer)(x_t, t, condition)
        packed = pipe.transformer(hidden_states=pipe._pack_latents(x_t, 2, 16, 4, 4), timestep=t / 1000,
                                  guidance=torch.full((2,), FLUX_TRAINING_GUIDANCE), pooled_projections=pooled,
                                  encoder_hidden_states=embeds, txt_ids=text_ids,
                                  img_ids=pipe._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32)).sample
    torch.testing.assert_close(ours, pipe._unpack_latents(packed, 8, 8, 2), rtol=1e-5, atol=1e-5)
    assert condition.shape == (2, 512 + 1, 64)


def test_the_flux_sampling_schedule_is_the_pipelines() -> None:
    """Dynamic shifting: sigmas linspace(1, 1/n, n) and mu from the number of latent patches (`calculate_shift`)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from pipelines.objectives import flow_sampling_schedule
    from pipelines.tiny import build_tiny_flux_pipeline

    config = build_tiny_flux_pipeline().scheduler.config
    schedule = flow_sampling_schedule(config, 8, (1, 16, 64, 48))
    assert schedule["mu"] == pytest.approx(calculate_shift(32 * 24, 256, 4096, 0.5, 1.15))
    assert list(schedule["sigmas"]) == pytest.approx([1 - i / 8 for i in range(8)])


def test_flow_matching_noises_as_diffusers_sd3_training_does() -> None:
    """x_t = (1 - sigma) x0 + sigma noise (the scheduler's own `scale_noise`), target noise - x0, the model reading
    sigma x 1000; index t = 0 is the cleanest training sigma and t = T - 1 pure noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.objectives import model_timesteps, noised_rows, training_scheduler

    scheduler = training_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0 = torch.randn(6, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    x_t, target, t = noised_rows(scheduler, x0, torch.Generator().manual_seed(2), slice(None), 6)
    index = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(2))
    noise = _after_index(2, 6, x0.shape)
    torch.testing.assert_close(t, scheduler.timesteps[999 - index])
    torch.testing.assert_close(target, noise - x0)
    for row in range(6):
        expected = scheduler.scale_noise(x0[row:row + 1], t[row:row + 1], noise[row:row + 1])
        torch.testing.assert_close(x_t[row:row + 1], expected, rtol=1e-5, atol=1e-5)
    ends = model_timesteps(scheduler, torch.tensor([0, 999]))
    assert float(ends[1]) == 1000.0 and 0 < float(ends[0]) < 10


def _after_index(seed: int, count: int, shape: torch.Size) -> torch.Tensor:
    """The noise `noised_rows` draws after its `count` timestep indices from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    torch.randint(0, 1000, (count,), generator=generator)
    return torch.randn(shape, generator=generator)


def test_the_flow_sampling_window_takes_the_schedulers_euler_steps() -> None:
    """With a constant velocity v, guidance aside, steps 0..k-1 move the noise by (sigma_k - sigma_0) v."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.objectives import sampling_window

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    noise, velocity = torch.randn(2, 1, 16, 4, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    condition, null = torch.zeros(2, 1, 3, 8).unbind(0)
    latents = sampling_window(lambda x, t, c: velocity.expand_as(x), scheduler, noise, condition, null, steps=10,
                              window=(0, 4), guidance=3.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(10)
    torch.testing.assert_close(latents, noise + (reference.sigmas[4] - reference.sigmas[0]) * velocity)


def test_salun_erases_a_transformer_model_that_loads_with_plain_diffusers(salun_run: Path, model_dir: Path,
                                                                          family: str) -> None:
    import diffusers

    pipeline_class, transformer_class = (getattr(diffusers, c[family]) for c in (PIPELINES, TRANSFORMERS))
    metrics = read_json(salun_run / "metrics.json")
    assert metrics["family"] == family and metrics["forget_objective_after"] < metrics["forget_objective_before"]
    assert not (salun_run / "unet").exists()
    base, after = transformer_state(model_dir / "transformer"), transformer_state(salun_run / "transformer")
    assert_masked_run_loads(pipeline_class, transformer_class, model_dir, salun_run, base, after)
    assert f"{TRANSFORMERS[family]}.from_pretrained" in (salun_run / "README.md").read_text()


def test_esd_x_trains_only_the_text_key_value_projections(salun_run: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "esd-x"
    assert main(erase_args(model_dir, out, "--method", "esd-x", "--esd-ddim-steps", 2, *reuse_sets(salun_run),
                           "--steps", 1, "--lr", 1e-3, "--grid-seeds", 0, "--no-export-delta")) == 0
    base, after = transformer_state(model_dir / "transformer"), transformer_state(out / "transformer")
    changed = {name for name in base if not torch.equal(base[name], after[name])}
    assert changed and all(".attn.add_k_proj." in name or ".attn.add_v_proj." in name for name in changed)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_closed_form_edit_is_refused_before_loading(name: str, tmp_path: Path, run_cli) -> None:
    status, output = run_cli("sd", "--concept", "nudity", "--method", "uce", "--model", f"tiny-{name}",
                             "--out", tmp_path / "uce")
    assert status == 2 and f"{name.upper()}'s joint attention has none" in output, output
    assert not (tmp_path / "uce").exists()


def test_a_diffusion_sampler_is_refused_for_a_flow_matching_model(tmp_path: Path, run_cli) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    status, output = run_cli("sample", "--model", "tiny-flux", "--prompts", prompts, "--scheduler", "ddim",
                             "--out", tmp_path / "images")
    assert status == 2 and "flow-matching FLUX model" in output and not (tmp_path / "images").exists(), output


def test_exports_of_a_transformer_run_load(salun_run: Path, model_dir: Path, family: str, tmp_path: Path,
                                           run_cli) -> None:
    import diffusers

    from pipelines.delta import apply_delta

    pipeline_class = getattr(diffusers, PIPELINES[family])
    after = transformer_state(salun_run / "transformer")
    assert_lora_round_trip(pipeline_class, model_dir, salun_run, tmp_path / "lora", after)
    patched = apply_delta(pipeline_class.from_pretrained(model_dir), salun_run / "delta.safetensors")
    assert all(torch.equal(v, after[k]) for k, v in patched.state_dict().items())
    status, output = run_cli("export", "--run", salun_run, "--format", "single-file", "--out", tmp_path / "single")
    assert status == 2 and "no single-file layout" in output and not (tmp_path / "single").exists(), output


@pytest.mark.slow  # two processes under accelerate launch: ~40 s
def test_two_cpu_processes_erase_a_transformer_model_like_one(salun_run: Path, model_dir: Path, tmp_path: Path) -> None:
    from helpers.launch import erase_with_two_processes

    out = tmp_path / "two"
    erase_with_two_processes(model_dir, salun_run, out)
    base, expected = transformer_state(model_dir / "transformer"), transformer_state(salun_run / "transformer")
    got = transformer_state(out / "transformer")
    moved = max(float((expected[n] - base[n]).abs().max()) for n in base)
    assert max(float((got[n] - expected[n]).abs().max()) for n in expected) < 0.05 * moved
