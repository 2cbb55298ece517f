"""Handlers of the diffusion commands (heavy imports happen inside each handler)."""
from __future__ import annotations

from pathlib import Path

from erasure.config import from_dict, to_dict
from erasure.errors import ErasureError
from erasure.evaluation.config import DEFAULT_BASE_MODEL, NudityEvalConfig
from erasure.evaluation.protocol import run_protocol
from erasure.io import reusable_run
from erasure.media import list_images
from pipelines.config import SampleConfig

SAMPLE_KEYS_IGNORED_ON_REUSE = ("resume", "overwrite", "batch_size", "device")


def sample(config: SampleConfig) -> None:
    """`erasure sample`: one image per prompt into --out (resumable), or N images of --class from a DDPM run."""
    from pipelines.ddpm_commands import is_ddpm_run

    if config.run and is_ddpm_run(config.run):
        from pipelines.ddpm_commands import sample_class

        metrics = sample_class(config)
    elif config.class_name is not None:
        raise ErasureError("--class generates from a class-conditional DDPM: pass --run <dir of a finished "
                           "`erasure ddpm train` or `erasure ddpm unlearn` run>")
    else:
        from pipelines.sampling import run_sampling

        metrics = run_sampling(config)
    rate = f", {metrics['images_per_second']:.3g} images/s" if metrics["images_per_second"] else ""
    print(f"{metrics['images']} images in {config.out} ({metrics['generated']} generated, "
          f"{metrics['skipped_existing']} already there{rate})")


def eval_nudity(config: NudityEvalConfig) -> None:
    """`erasure eval nudity`: judge folders, or first sample the erased (--run) and base (--model) models."""
    if not config.sampling:
        from erasure.evaluation.commands import eval_nudity as judge_folders

        judge_folders(config)
        return
    from erasure.evaluation.nudity import PROTOCOL, NudityInputs
    from pipelines.sampling import check_inputs

    out = Path(config.out or "outputs/eval-nudity")
    plan = _sampling_plan(config, out)
    for sample_config in plan.values():
        check_inputs(sample_config)
    if config.baseline_images:
        list_images(config.baseline_images)

    def sample_sides(_: Path) -> NudityInputs:
        sides = {side: _sample(sample_config) for side, sample_config in plan.items()}
        if config.baseline_images:
            sides["baseline"] = Path(config.baseline_images)
        return NudityInputs(config, sides)

    run_protocol(PROTOCOL, sample_sides, out=out, config=to_dict(config), seed=None, device=config.device,
                 overwrite=config.overwrite, resume=config.resume)


def _sampling_plan(config: NudityEvalConfig, out: Path) -> dict[str, SampleConfig]:
    """SampleConfigs of the judged side (erased with --run, else --model) and of the base model's side
    (unless --baseline-images gives it)."""
    base = config.model or DEFAULT_BASE_MODEL
    shared = {"prompts": _prompt_file(config), "model": base, "subset": config.subset, "limit": config.limit,
              "steps": config.steps, "height": config.height, "width": config.width,
              "scheduler": config.scheduler, "batch_size": config.batch_size, "device": config.device,
              "dtype": config.dtype, "resume": config.resume}
    plan = {"evaluated": from_dict(SampleConfig, {**shared, "run": config.run,
                                                  "out": str(out / ("erased" if config.run else "base"))},
                                   source="eval nudity")}
    if config.run and not config.baseline_images:
        plan["baseline"] = from_dict(SampleConfig, {**shared, "out": str(out / "base")}, source="eval nudity")
    return plan


def _sample(sample_config: SampleConfig) -> Path:
    """Generate one side's images, or reuse them when that folder already holds a finished, equal sampling."""
    folder = Path(sample_config.out)
    if reusable_run(folder, to_dict(sample_config), ignored=SAMPLE_KEYS_IGNORED_ON_REUSE) is not None:
        return folder
    from pipelines.sampling import run_sampling

    run_sampling(sample_config)
    return folder


def _prompt_file(config: NudityEvalConfig) -> str:
    """--prompts, or I2P from the shared data folder."""
    from erasure.prompts import default_i2p_file

    return config.prompts or str(default_i2p_file())
