"""Diffusion methods as plugins: the registry, each method's claimed property on the tiny pipeline, several
concepts in one run."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_sd_erase import crash_eraser_at, erase_args, reuse_sets, unet_state

from erasure.cli import main
from erasure.config import load_config
from erasure.errors import ConfigError
from erasure.io import read_json
from pipelines.methods import SD_METHODS
from pipelines.methods.base import CROSS_ATTENTION, CROSS_ATTENTION_KEY_VALUE, TRAINED
from pipelines.methods.esd import UNCONDITIONED
from pipelines.sd_config import SDEraseConfig


def test_every_registered_method_is_a_module_with_settings_and_a_summary_in_help():
    from erasure.cli import build_parser

    parser = build_parser()
    sd = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "sd")[1]
    text = " ".join(sd.format_help().split())
    for name, spec in SD_METHODS.items():
        assert spec.name == name and dataclasses.is_dataclass(spec.settings) and spec.source
        assert name in text
        assert spec.build(spec.settings()) is not None
    assert {"salun", "esd", "esd-x", "esd-u", "ga", "ca", "uce", "rece"} <= set(SD_METHODS)


def _changed(base: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in base if not torch.equal(base[name], after[name])}


@pytest.fixture(scope="module")
def sets_run(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished salun run whose generated images the other runs reuse."""
    out = tmp_path_factory.mktemp("methods") / "salun"
    assert main(erase_args(tiny_sd_dir, out, "--steps", 1, "--grid-seeds", 0)) == 0
    return out


@pytest.mark.parametrize("method, scope", [("esd-x", CROSS_ATTENTION),
                                           pytest.param("esd-u", UNCONDITIONED, marks=pytest.mark.slow)])
def test_esd_variants_change_only_their_scope_and_a_mask_keeps_the_rest_bit_identical(
        method, scope, sets_run, tiny_sd_dir, tmp_path):
    out = tmp_path / method
    assert main(erase_args(tiny_sd_dir, out, *reuse_sets(sets_run), "--method", method, "--steps", 2, "--lr", 1e-3,
                           "--esd-ddim-steps", 4, "--mask-ratio", 0.5, "--grid-seeds", 0, "--no-export-delta")) == 0
    base, after = unet_state(tiny_sd_dir / "unet"), unet_state(out / "unet")
    changed = _changed(base, after)
    assert changed and all(scope.includes(name) for name in changed)
    from erasure.saliency import Mask

    mask = Mask.load(out / "mask.safetensors")
    assert set(mask) and all(scope.includes(name) for name in mask)
    for name in mask:
        kept = ~mask[name].bool()
        assert torch.equal(after[name][kept], base[name][kept]), name
    metrics = read_json(out / "metrics.json")
    assert metrics["scope"] == scope.name and metrics["images"] == {"forget": 8}
    assert metrics["method"] == method and metrics["forget_objective_after"] < metrics["forget_objective_before"]


def test_concept_ablation_trains_cross_attention_keys_and_values_on_anchor_images(sets_run, tiny_sd_dir, tmp_path):
    out = tmp_path / "ca"
    assert main(erase_args(tiny_sd_dir, out, "--method", "ca", "--steps", 3, "--lr", 1e-3, "--batch-size", 4,
                           "--grid-seeds", 0, "--no-export-delta")) == 0
    base, after = unet_state(tiny_sd_dir / "unet"), unet_state(out / "unet")
    changed = _changed(base, after)
    assert changed and all(CROSS_ATTENTION_KEY_VALUE.includes(name) for name in changed)
    metrics = read_json(out / "metrics.json")
    assert metrics["images"] == {"anchor": 8} and metrics["forget_objective_after"] < metrics["forget_objective_before"]
    records = (out / "data" / "anchor" / "prompts.jsonl").read_text()
    assert "a photo of a person wearing clothes" in records and "nude" not in records
    config = load_config(SDEraseConfig, None, {"concept": "van_gogh", "method": "ca"})
    assert (config.steps, config.batch_size, config.lr, config.weight_decay, config.grad_clip) == (100, 8, 1.6e-5,
                                                                                                  1e-2, 1.0)


def test_ddim_prefix_is_the_reference_ddim_update_stopped_at_t_enc():
    """ESD's `quick_sample_till_t`: t_enc DDIM (eta 0) steps from noise, guided eps_u + s (eps_c - eps_u)."""
    from pipelines.objectives import sampling_window
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    unet, config = pipe.unet.eval(), pipe.scheduler.config
    condition, null = torch.randn(2, 1, 77, 32).unbind(0)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def eps(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    steps, stop, scale = 5, 3, 3.0
    alphas = torch.as_tensor(pipe.scheduler.alphas_cumprod)
    grid = [t + config.steps_offset for t in range(0, config.num_train_timesteps, config.num_train_timesteps // steps)]
    x = noise
    with torch.no_grad():
        for i, t in enumerate(reversed(grid[-steps:])):
            if i == stop:
                break
            e = eps(x, t, null) + scale * (eps(x, t, condition) - eps(x, t, null))
            prev = t - config.num_train_timesteps // steps
            a, a_prev = alphas[t], alphas[prev] if prev >= 0 else alphas.new_tensor(1.0)
            x = a_prev.sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt() + (1 - a_prev).sqrt() * e
        ours = sampling_window(lambda x_t, t, c: eps(x_t, t, c), pipe.scheduler, noise, condition, null, steps=steps,
                           window=(0, stop), guidance=scale)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sampling_window(eps, pipe.scheduler, noise, condition, null, steps=steps, window=(1, 1),
                                           guidance=scale), noise)


def test_esd_u_leaves_out_what_the_reference_noxattn_leaves_out():
    names = ["time_embedding.linear_1.weight", "conv_out.weight", "conv_norm_out.bias", "conv_in.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", "mid_block.resnets.0.conv1.weight"]
    assert [n for n in names if UNCONDITIONED.includes(n)] == [names[3], names[5], names[6]]
    assert [n for n in names if CROSS_ATTENTION.includes(n)] == [names[4]]


def test_esd_samples_and_trains_where_the_reference_does():
    """t_enc ~ U{0..ddim_steps-1}; the reference's DDIM loop with `till_T = t_enc` decides how many steps x_t gets;
    t ~ U[round(t_enc / ddim_steps * T), round((t_enc + 1) / ddim_steps * T))."""
    from types import SimpleNamespace

    from pipelines.methods.base import Draw
    from pipelines.methods.esd import ESD, ESDSettings, reference_window

    def ldm_timesteps(till: int, steps: int) -> list[int]:  # ldm/models/diffusion/ddim.py, ddim_sampling
        ddim = [1 + i * (1000 // steps) for i in range(steps)][:-1]  # t_start=-1: timesteps[:t_start]
        taken = []
        for i, step in enumerate(reversed(ddim)):
            index = len(ddim) - i - 1
            taken.append(step)
            if index + 1 == till:
                break
        return taken

    from diffusers import DDIMScheduler

    grid = DDIMScheduler(steps_offset=1)
    grid.set_timesteps(50)
    for t_enc in range(50):
        start, stop = reference_window(t_enc, 50)
        assert grid.timesteps[start:stop].tolist() == ldm_timesteps(t_enc, 50), t_enc
    taken = []
    session = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)),
                              latent_shape=(4, 2, 2), condition=lambda role, concept: torch.zeros(len(concept), 1, 1),
                              sample=lambda noise, c, steps, window, guidance, base: taken.append(window) or noise)
    method = ESD(ESDSettings(ddim_steps=50))
    for step in range(40):
        draw = Draw(step, torch.Generator().manual_seed(step), slice(None), 3, 0)
        _, t = method.sampled_inputs(session, torch.zeros(3, dtype=torch.long), draw)
        t_enc = int(torch.randint(50, (1,), generator=torch.Generator().manual_seed(step)))
        assert taken[-1] == reference_window(t_enc, 50)
        assert ((t >= round(t_enc / 50 * 1000)) & (t < round((t_enc + 1) / 50 * 1000))).all(), (t_enc, t)
    assert len(set(taken)) > 10


def _uce_objective_gradient(layer_before: torch.Tensor, layer_after: torch.Tensor, erase, kept, settings, scale):
    """d/dW' of erase_scale sum |W' c - v*|^2 + preserve_scale sum |W' c_j - W c_j|^2 + lamb |W' - W|^2."""
    w, w_new = layer_before.double(), layer_after.double()
    grad = settings.lamb * (w_new - w)
    for c, c_new in erase:
        c, c_new = c.double(), c_new.double()
        grad = grad + settings.erase_scale * (c @ w_new.T - c_new @ w.T).T @ c
    for c in kept:
        c = c.double()
        grad = grad + scale * (c @ w_new.T - c @ w.T).T @ c
    return grad


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_uce_is_the_minimiser_of_its_objective_and_edits_only_cross_attention_keys_and_values(family):
    from pipelines.methods.uce import UCE, UCESettings, aligned_tokens, edited_layers, full_tokens
    from pipelines.tiny import TINY_BUILDERS

    pipe = TINY_BUILDERS[family]()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    concepts, preserve = [("a photo of a nude person", "a photo of a person"), ("van gogh", "")], ["a cat", "a dog"]
    settings = UCESettings()
    metrics = UCE(settings).edit(pipe, concepts, preserve)
    after = pipe.unet.state_dict()
    changed = _changed(before, after)
    assert changed == {f"{name}.weight" for name in edited_layers(pipe.unet, keys=True)}
    scale = 1 / 3  # max(0.1, 1 / n) over the preserved prompts and the empty one, as the reference
    assert all(CROSS_ATTENTION_KEY_VALUE.includes(name) for name in changed) and metrics["preserve_scale"] == scale
    erase = [aligned_tokens(pipe, f, t) for f, t in concepts]
    kept = [full_tokens(pipe, text) for text in ["", *preserve]]
    assert kept[0].shape == (77, pipe.unet.config.cross_attention_dim)  # what the keys and values project
    for name in changed:
        at_edit = _uce_objective_gradient(before[name], after[name], erase, kept, settings, scale)
        at_start = _uce_objective_gradient(before[name], before[name], erase, kept, settings, scale)
        assert float(at_edit.norm()) < 1e-4 * float(at_start.norm()), name  # float32 storage rounds the rest


def test_uce_without_preservation_fits_the_targets_as_well_as_least_squares_can():
    """With lamb -> 0 and nothing preserved, W' c is the least-squares fit of the targets (exact when the tokens
    are fewer than the embedding width, as in SD; the tiny encoder's 32 dims make it a fit)."""
    from pipelines.methods.uce import UCE, UCESettings, aligned_tokens, edited_layers
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    concept, target = aligned_tokens(pipe, "a photo of a nude person", "a photo of a person")
    layers = edited_layers(pipe.unet, keys=True)
    wanted = {name: target @ layer.weight.detach().T for name, layer in layers.items()}
    gap = {name: float((concept @ layer.weight.detach().T - wanted[name]).norm()) for name, layer in layers.items()}
    best = {name: float((concept @ torch.linalg.lstsq(concept, wanted[name]).solution - wanted[name]).norm())
            for name in layers}
    UCE(UCESettings(lamb=1e-6, preserve_scale=0)).edit(pipe, [("a photo of a nude person", "a photo of a person")], [])
    for name, layer in layers.items():
        residual = float((concept @ layer.weight.detach().T - wanted[name]).norm())
        assert residual < best[name] * 1.001 + 1e-4 < gap[name], name


def test_uce_runs_end_to_end_in_seconds_without_images_and_refuses_a_mask(tiny_sd_dir, tmp_path):
    out = tmp_path / "uce"
    assert main(erase_args(tiny_sd_dir, out, "--method", "uce", "--concept", "van_gogh", "--preserve",
                           "a photo of a cat")) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["edit_seconds"] < 10 and not (out / "data").exists()
    assert metrics["concepts"][-1] == {"forget": "a painting in the style of Van Gogh", "target": "a painting"}
    assert metrics["preserve"] == ["a photo of a cat"] and (out / "samples" / "before_after.png").is_file()
    with pytest.raises(ConfigError, match="closed-form edit and takes no saliency mask"):
        load_config(SDEraseConfig, None, {"concept": "nudity", "method": "uce", "mask_ratio": 0.5})


def test_rece_adversarial_embedding_is_its_closed_form_minimiser():
    from pipelines.methods.rece import adversarial_embedding
    from pipelines.methods.uce import UCE, UCESettings, edited_layers, full_tokens
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    layers = edited_layers(pipe.unet, keys=True)
    original = {name: layer.weight.detach().double().clone() for name, layer in layers.items()}
    UCE(UCESettings()).edit(pipe, [("a photo of a nude person", "")], [])
    concept = full_tokens(pipe, "a photo of a nude person").double()
    e = adversarial_embedding(concept.float(), layers, original, 0.1).double().requires_grad_(True)
    objective = 0.1 * e.square().sum() + sum(
        (e @ layer.weight.detach().double().T - concept @ original[name].T).square().sum()
        for name, layer in layers.items())
    objective.backward()
    assert float(e.grad.abs().max()) < 1e-3 * float(concept.abs().max())
    assert e.shape == (77, concept.shape[1])


def test_rece_runs_in_seconds_edits_only_keys_and_values_and_each_round_leaves_less_to_recover(tiny_sd_dir,
                                                                                                tmp_path):
    out = tmp_path / "rece"
    assert main(erase_args(tiny_sd_dir, out, "--method", "rece", "--concept", "nudity", "--concept", "van_gogh",
                           "--grid-seeds", 0)) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["edit_seconds"] < 10 and len(metrics["concepts"]) == 2
    gaps = metrics["adversarial_gap_by_epoch"]
    assert len(gaps) == 3 and gaps[0] < gaps[-1]
    changed = _changed(unet_state(tiny_sd_dir / "unet"), unet_state(out / "unet"))
    assert changed and all(CROSS_ATTENTION_KEY_VALUE.includes(name) for name in changed)


def test_several_concepts_come_from_repeated_presets_and_a_concepts_file(tmp_path):
    table = tmp_path / "concepts.csv"
    table.write_text("forget,target\na photo of a cat,a photo of a dog\na photo of a car,\n")
    config = load_config(SDEraseConfig, None, {"concept": ["nudity", "van_gogh"], "concepts": str(table),
                                               "method": "uce"})
    assert config.concept_pairs() == [
        ("a photo of a nude person", "a photo of a person wearing clothes"),
        ("a painting in the style of Van Gogh", "a painting"), ("a photo of a cat", "a photo of a dog"),
        ("a photo of a car", "")]
    assert "a painting in the style of Claude Monet" in config.retain_prompts
    assert config.out == "outputs/sd-nudity-van-gogh"
    yaml_table = tmp_path / "concepts.yaml"
    yaml_table.write_text("- {forget: a photo of a cat, target: a photo of a dog}\n- {forget: a photo of a car}\n")
    assert load_config(SDEraseConfig, None, {"concepts": str(yaml_table), "method": "esd-x"}).concept_pairs() == [
        ("a photo of a cat", "a photo of a dog"), ("a photo of a car", "")]
    with pytest.raises(ConfigError, match="needs a target .remap. prompt for every concept; 'a photo of a car'"):
        load_config(SDEraseConfig, None, {"concepts": str(table), "method": "salun"})
    yaml_table.write_text("- {forget: a cat, anchor: a dog}\n")
    with pytest.raises(ConfigError, match="row 1 of .* must have a non-empty 'forget'"):
        load_config(SDEraseConfig, None, {"concepts": str(yaml_table)})


def test_a_two_concept_salun_run_trains_each_row_on_its_own_concept(sets_run, tiny_sd_dir, tmp_path, monkeypatch):
    from pipelines.stable_diffusion import Eraser

    seen = []
    original = Eraser.chunks_loss

    def spy(self, model, chunks):
        seen.append((self, chunks[0]))
        return original(self, model, chunks)

    monkeypatch.setattr(Eraser, "chunks_loss", spy)
    out = tmp_path / "two"
    assert main(erase_args(tiny_sd_dir, out, "--concept", "nudity", "--concept", "van_gogh", "--steps", 2,
                           "--num-images", 8, "--grid-seeds", 1, "--no-export-delta")) == 0
    metrics = read_json(out / "metrics.json")
    assert [c["forget"] for c in metrics["concepts"]] == ["a photo of a nude person",
                                                          "a painting in the style of Van Gogh"]
    records = (out / "data" / "forget" / "prompts.jsonl").read_text()
    assert "Van Gogh" in records and "nude person" in records
    eraser, chunk = seen[-1]
    forget = eraser.conditions.forget
    rows = [int(torch.argmin((forget - c).abs().flatten(1).sum(1))) for c in chunk.condition]
    assert set(rows) == {0, 1}
    assert SD_METHODS["salun"].kind == TRAINED


@pytest.mark.slow
def test_a_resumed_esd_run_with_self_sampled_inputs_is_bit_identical(sets_run, tiny_sd_dir, tmp_path, monkeypatch):
    from pipelines.stable_diffusion import Eraser

    flags = ["--method", "esd-x", "--steps", 4, "--lr", 1e-3, "--esd-ddim-steps", 3, "--checkpoint-every", 2,
             "--grid-seeds", 0, "--no-export-delta"]
    whole = tmp_path / "whole"
    assert main(erase_args(tiny_sd_dir, whole, *flags)) == 0
    original = crash_eraser_at(monkeypatch, 3)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(erase_args(tiny_sd_dir, resumed, *flags))
    monkeypatch.setattr(Eraser, "step_loss", original)
    assert main(erase_args(tiny_sd_dir, resumed, *flags, "--resume")) == 0
    assert read_json(resumed / "metrics.json")["resumed_from_step"] == 2
    expected, got = unet_state(whole / "unet"), unet_state(resumed / "unet")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
def test_eight_bit_adam_trains_the_masked_weights_only_and_resumes_exactly(sets_run, tiny_sd_dir, tmp_path,
                                                                          monkeypatch):
    """bitsandbytes' AdamW8bit (8-bit states for tensors of 4,096 entries or more) under the same mask; its
    quantised states go through the checkpoint and back. Slow (7 s): AdamW's case above keeps the masked,
    resumable loop in the default suite."""
    pytest.importorskip("bitsandbytes")
    from erasure.saliency import Mask
    from pipelines.stable_diffusion import Eraser

    flags = [*reuse_sets(sets_run), "--mask", sets_run / "mask.safetensors", "--optimizer", "adamw8bit", "--steps", 4,
             "--lr", 1e-3, "--checkpoint-every", 2, "--grid-seeds", 0, "--no-export-delta"]
    whole = tmp_path / "whole"
    assert main(erase_args(tiny_sd_dir, whole, *flags)) == 0
    base, after = unet_state(tiny_sd_dir / "unet"), unet_state(whole / "unet")
    mask = Mask.load(sets_run / "mask.safetensors")
    assert any(not torch.equal(base[name], after[name]) for name in mask)
    for name in mask:
        assert torch.equal(after[name][~mask[name].bool()], base[name][~mask[name].bool()]), name
    original = crash_eraser_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(erase_args(tiny_sd_dir, tmp_path / "resumed", *flags))
    monkeypatch.setattr(Eraser, "step_loss", original)
    assert main(erase_args(tiny_sd_dir, tmp_path / "resumed", *flags, "--resume")) == 0
    got = unet_state(tmp_path / "resumed" / "unet")
    assert all(torch.equal(after[name], got[name]) for name in after)


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_gradient_checkpointing_recomputes_in_backward_and_saves_the_same_weights(family, tiny_sd_dir, tmp_path,
                                                                                 monkeypatch):
    """`--gradient-checkpointing` really checkpoints (diffusers calls torch's checkpoint in the denoiser's blocks)
    and, recomputing the same activations on the CPU, trains exactly the weights of the run without it."""
    import torch.utils.checkpoint
    from helpers.erased_runs import denoiser_state

    from pipelines.tiny import save_tiny_pipeline

    model = tiny_sd_dir if family == "sd" else save_tiny_pipeline(tmp_path / "pipeline", name=f"tiny-{family}")
    flags = ["--steps", 2, "--lr", 1e-3, "--grid-seeds", 0, "--no-export-delta"]
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    assert main(erase_args(model, tmp_path / "plain", *flags)) == 0
    assert not calls
    checkpointed = tmp_path / "checkpointed"
    flags += [*reuse_sets(tmp_path / "plain"), "--gradient-checkpointing"]
    assert main(erase_args(model, checkpointed, *flags)) == 0
    assert calls, "no block was checkpointed"
    plain, got = denoiser_state(tmp_path / "plain"), denoiser_state(checkpointed)
    assert all(torch.equal(plain[name], got[name]) for name in plain)


def test_a_missing_optimizer_package_is_named_before_any_work(monkeypatch):
    import erasure.optimizers as optimizers

    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes"):
        load_config(SDEraseConfig, None, {"concept": "nudity", "optimizer": "adamw8bit"})
    load_config(SDEraseConfig, None, {"concept": "nudity", "method": "uce", "optimizer": "adamw8bit"})  # no training
