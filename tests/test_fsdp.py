"""FSDP through Accelerate's own config (`accelerate launch --use_fsdp --fsdp_version 2`).

On CPU: Accelerate switches FSDP on only for accelerators, so two gloo processes run `erasure sd` through
helpers/fsdp_cpu.py, which sets the FSDP state the launch flags describe and leaves the rest (sharding, the
optimizer's remapping, gathering, checkpoints) to Accelerate. The UNet is sharded before the mask pass, so the
mask comes from sharded gradients; it must equal the unsharded one, and the run must save exactly the weights of
the same two-process run without FSDP.

On a GPU (`pytest -m gpu`): a masked erasure under FSDP2 keeps every unmasked weight bit-identical and moves the
masked ones as the same run without FSDP does, up to GPU arithmetic. Why the masked weights are compared on
average there: on an H200 (2026-12-04) they differed by about 1e-5 after 2 Adam steps of lr 1e-3, and by up to
1.2e-3 in a few entries, because Adam's first step is lr * g / |g| and a gradient near zero changes sign with the
GPU's reduction order; unmasked weights did not move in either run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.erased_runs import denoiser_state
from helpers.launch import ERASE, REPO, accelerate_launch, launch_erasure, log_of
from test_sd_erase import erase_args, reuse_sets, unet_state

from erasure.cli import main
from erasure.io import read_json
from erasure.saliency import Mask

LR, STEPS = 1e-3, 2
FSDP2 = ("--use_fsdp", "--fsdp_version", "2")
"""Accelerate's default wrapping: the whole denoiser one shard group (a final norm, if found, a second)."""
FSDP2_BLOCKS = ("--config_file", str(REPO / "configs" / "accelerate_fsdp2.yaml"))
"""The shipped config: each block class of the denoiser's `_no_split_modules` its own group."""


@pytest.fixture(scope="module", params=["tiny", *(pytest.param(f"tiny-{family}", marks=pytest.mark.slow)
                                                  for family in ("sd2", "sdxl", "sd3", "flux"))])
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "pipeline", name=request.param)


def test_fsdp2_on_two_cpu_processes_masks_the_shards_and_saves_the_run_without_fsdp(family_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """Both wrappings select the one-process mask from their shards. Accelerate's default wrapping (the whole
    denoiser one group, its final norm another) saves the weights of the run without FSDP bit for bit; with a group
    per block (the shipped config) the CPU's convolution kernels sum a weight's gradient in another order on the
    gathered block weights, which moves the masked weights by up to about 4e-7 against a move of 2e-3 (tiny SD),
    so they are compared to 1e-3 of the move."""
    one = tmp_path / "one"
    assert main(erase_args(family_dir, one, "--steps", STEPS, "--lr", LR, "--grid-seeds", 0,
                           "--no-export-delta")) == 0
    log = launch_erasure(family_dir, one, tmp_path / "ddp")
    assert (tmp_path / "ddp" / "metrics.json").is_file(), log
    reference = Mask.load(one / "mask.safetensors")
    base, ddp = denoiser_state(family_dir), denoiser_state(tmp_path / "ddp")
    move = max(float((ddp[n] - base[n]).abs().max()) for n in base)
    assert move > 0, "the run without FSDP trained nothing"
    groups = {}
    for name, flags in (("whole", FSDP2), ("blocks", FSDP2_BLOCKS)):
        log = launch_erasure(family_dir, one, tmp_path / name, fsdp=flags)
        assert (tmp_path / name / "metrics.json").is_file(), log
        groups[name] = read_json(tmp_path / name / "metrics.json")["fsdp"]["shard_groups"]["denoiser"]
        sharded = Mask.load(tmp_path / name / "mask.safetensors")
        assert sharded.metadata["sharded"] and sharded.metadata["world_size"] == 2
        assert sharded.metadata["model_class"] == reference.metadata["model_class"]
        assert set(sharded) == set(reference) and all(torch.equal(sharded[n], reference[n]) for n in reference)
        fsdp = denoiser_state(tmp_path / name)
        for n in reference:
            kept = reference[n].bool()
            assert torch.equal(fsdp[n][~kept], base[n][~kept]), f"{name}: the unmasked weights of {n} moved"
        if name == "whole":
            assert all(torch.equal(fsdp[n], ddp[n]) for n in ddp), "FSDP2 saved other weights than without it"
        else:
            apart = max(float((fsdp[n] - ddp[n]).abs().max()) for n in ddp)
            assert apart <= 1e-3 * move, f"per-block FSDP2 is {apart:.3g} from the run without it (move {move:.3g})"
    assert groups["whole"] <= 2 < groups["blocks"], groups


@pytest.mark.slow  # two two-process launches per method: ~25 s each
@pytest.mark.parametrize("method", ["esd-x", "ca", "ga"])
def test_scoped_frozen_copy_and_ascent_methods_train_under_fsdp2_as_without_it(method: str, tiny_sd_dir: Path,
                                                                              tmp_path: Path) -> None:
    """ESD-x trains cross-attention only (most of each shard group frozen) against a frozen copy of the denoiser,
    sharded too; CA reads the current model without gradient; GA ascends. Each moves exactly the entries it moves
    without FSDP, within 1 % of the move (Adam's first step, lr * g / |g|, amplifies the per-block reordering where
    a gradient is near zero)."""
    one = tmp_path / "one"
    assert main(erase_args(tiny_sd_dir, one, "--steps", 1, "--grid-seeds", 0, "--no-export-delta")) == 0
    for name, flags in (("ddp", ()), ("fsdp", FSDP2_BLOCKS)):
        log = launch_erasure(tiny_sd_dir, one, tmp_path / name, "--method", method, fsdp=flags)
        assert (tmp_path / name / "metrics.json").is_file(), log
    base, ddp, fsdp = (denoiser_state(run) for run in (tiny_sd_dir, tmp_path / "ddp", tmp_path / "fsdp"))
    move = max(float((ddp[n] - base[n]).abs().max()) for n in base)
    assert move > 0 and all(torch.equal(ddp[n] != base[n], fsdp[n] != base[n]) for n in base)
    assert max(float((fsdp[n] - ddp[n]).abs().max()) for n in base) <= 0.01 * move
    groups = read_json(tmp_path / "fsdp" / "metrics.json")["fsdp"]["shard_groups"]
    assert groups["denoiser"] > 1 and groups.get("frozen_copy", groups["denoiser"]) == groups["denoiser"]
    assert ("frozen_copy" in groups) == (method == "esd-x")
    assert read_json(tmp_path / "ddp" / "metrics.json")["fsdp"] is None


@pytest.mark.slow  # three two-process launches: ~40 s
def test_an_interrupted_fsdp2_run_resumes_bit_identically_from_its_sharded_checkpoint(tiny_sd_dir: Path,
                                                                                       tmp_path: Path) -> None:
    one = tmp_path / "one"
    assert main(erase_args(tiny_sd_dir, one, "--steps", STEPS, "--lr", LR, "--grid-seeds", 0)) == 0
    steps = ("--steps", 4, "--checkpoint-every", 1)
    log = launch_erasure(tiny_sd_dir, one, tmp_path / "whole", *steps, fsdp=FSDP2_BLOCKS)
    assert (tmp_path / "whole" / "metrics.json").is_file(), log
    log = launch_erasure(tiny_sd_dir, one, tmp_path / "cut", *steps, fsdp=FSDP2_BLOCKS, env={"CRASH_AT_STEP": "3"})
    assert "simulated crash" in log and not (tmp_path / "cut" / "metrics.json").exists(), log
    log = launch_erasure(tiny_sd_dir, one, tmp_path / "cut", *steps, "--resume", fsdp=FSDP2_BLOCKS)
    assert read_json(tmp_path / "cut" / "metrics.json")["resumed_from_step"] == 3, log
    whole, resumed = denoiser_state(tmp_path / "whole"), denoiser_state(tmp_path / "cut")
    assert all(torch.equal(resumed[n], whole[n]) for n in whole)


def test_fsdp1_and_fsdp2_under_an_old_accelerate_are_refused_before_any_work(tiny_sd_dir: Path, tmp_path: Path,
                                                                             run_cli, monkeypatch) -> None:
    monkeypatch.setattr("erasure.accel.fsdp_version", lambda accelerator: 1)
    status, output = run_cli(*erase_args(tiny_sd_dir, tmp_path / "run"))
    assert status == 2 and "add --fsdp_version 2" in output and not (tmp_path / "run").exists(), output
    monkeypatch.setattr("erasure.accel.fsdp_version", lambda accelerator: 2)
    monkeypatch.setattr("accelerate.__version__", "1.9.0")
    status, output = run_cli(*erase_args(tiny_sd_dir, tmp_path / "run"))
    assert status == 2 and "needs accelerate>=1.10 (found 1.9.0)" in output and not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_an_fsdp2_erasure_saves_the_weights_of_the_same_run_without_fsdp(tiny_sd_dir: Path, tmp_path: Path) -> None:
    flags = ["--steps", STEPS, "--lr", LR, "--grid-seeds", 0, "--no-export-delta"]
    assert main(erase_args(tiny_sd_dir, tmp_path / "plain", *flags)) == 0
    flags += [*reuse_sets(tmp_path / "plain"), "--mask", tmp_path / "plain" / "mask.safetensors"]
    result = accelerate_launch(ERASE, *erase_args(tiny_sd_dir, tmp_path / "fsdp", *flags), mode=FSDP2, processes=1,
                               timeout=600)
    assert result.returncode == 0, log_of(result)
    base, mask = unet_state(tiny_sd_dir / "unet"), Mask.load(tmp_path / "plain" / "mask.safetensors")
    plain, fsdp = unet_state(tmp_path / "plain" / "unet"), unet_state(tmp_path / "fsdp" / "unet")
    moved, apart = [], []
    for name, value in base.items():
        kept = mask[name].bool()
        assert torch.equal(fsdp[name][~kept], value[~kept]), f"{name}: FSDP moved unmasked weights"
        moved.append((plain[name] - value)[kept].abs())
        apart.append((fsdp[name] - plain[name])[kept].abs())
    moved, apart = torch.cat(moved), torch.cat(apart)
    assert moved.mean() > LR, "the plain run did not train the masked weights"
    assert apart.mean() < moved.mean() / 20, f"FSDP and plain runs differ on average by {apart.mean():.3g}"


@pytest.mark.gpu
def test_an_fsdp2_erasure_on_a_gpu_masks_from_its_shards_what_the_run_without_fsdp_masks(tiny_sd_dir: Path,
                                                                                        tmp_path: Path) -> None:
    """The mask pass on GPU shards: the mask agrees with the unsharded run's up to near-ties that GPU reduction
    order may swap (at most 1e-4 of the entries), and the run keeps every weight outside its own mask."""
    flags = ["--steps", STEPS, "--lr", LR, "--grid-seeds", 0, "--no-export-delta"]
    assert main(erase_args(tiny_sd_dir, tmp_path / "plain", *flags)) == 0
    flags += reuse_sets(tmp_path / "plain")
    result = accelerate_launch(ERASE, *erase_args(tiny_sd_dir, tmp_path / "fsdp", *flags), mode=FSDP2_BLOCKS,
                               processes=1, timeout=600)
    assert result.returncode == 0, log_of(result)
    plain, sharded = (Mask.load(tmp_path / run / "mask.safetensors") for run in ("plain", "fsdp"))
    assert sharded.metadata["sharded"] and sharded.metadata["kept"] == plain.metadata["kept"]
    differing = sum(int((sharded[n] != plain[n]).sum()) for n in plain)
    assert differing <= 1e-4 * plain.metadata["numel"], f"{differing} mask entries differ"
    base, fsdp = unet_state(tiny_sd_dir / "unet"), unet_state(tmp_path / "fsdp" / "unet")
    for name, value in base.items():
        kept = sharded[name].bool()
        assert torch.equal(fsdp[name][~kept], value[~kept]), f"{name}: FSDP moved unmasked weights"
