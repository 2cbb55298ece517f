"""Diffusion methods carry their own settings (one registry per domain), and every training config its tracker."""
from __future__ import annotations

import dataclasses

import pytest

from erasure.cli import build_parser
from erasure.config import from_dict, load_config
from erasure.errors import ConfigError


def test_ddpm_methods_have_their_own_sections_and_keep_their_flags():
    from pipelines.ddpm_config import DDPMUnlearnConfig, DDPMUnlearnSharedConfig
    from pipelines.methods import DDPM_METHODS, method_sections

    args = vars(build_parser().parse_args(["ddpm", "unlearn", "--mask-ratio", "0.3", "--remap", "dog",
                                           "--mask-batches", "2", "--mask-guidance", "0"]))
    assert (args["mask_ratio"], args["mask_batches"], args["mask_guidance"]) == ("0.3", "2", "0")
    assert args["remap"] == "dog"  # shared: salun's remap class is ca's anchor class
    config = load_config(DDPMUnlearnConfig, None, {"run": "x", "forget": "cat", "remap": "dog"})
    assert (config.remap, config.remap_class, config.mask_ratio) == ("dog", 5, 0.5)
    assert load_config(DDPMUnlearnConfig, None, {"run": "x", "method": "ga"}).mask_ratio is None
    assert load_config(DDPMUnlearnConfig, None, {"run": "x", "method": "esd", "mask_ratio": 0.2}).mask_ratio == 0.2
    with pytest.raises(ConfigError, match="config key 'mask_ratio' must be < 1"):
        load_config(DDPMUnlearnConfig, None, {"run": "x", "mask_ratio": 1})
    with pytest.raises(ConfigError, match="unknown class 'dragon' in config key 'remap'"):
        load_config(DDPMUnlearnConfig, None, {"run": "x", "remap": "dragon"})
    with pytest.raises(ConfigError, match="unknown config key 'guidance'.*esd"):
        load_config(DDPMUnlearnConfig, None, {"run": "x", "guidance": 0.5})
    method = next(f for f in dataclasses.fields(DDPMUnlearnConfig) if f.name == "method")
    assert method.metadata["choices"] == tuple(DDPM_METHODS) == ("salun", "ga", "rl", "esd", "ca")
    shared = {f.name for f in dataclasses.fields(DDPMUnlearnSharedConfig)}
    assert not shared & {f.name for s in method_sections(DDPM_METHODS).values() for f in dataclasses.fields(s)}


def test_sd_methods_have_their_own_sections_and_presets_fill_them_unless_given():
    from pipelines.methods import SD_METHODS
    from pipelines.sd_config import SDEraseConfig

    args = vars(build_parser().parse_args(["sd", "--esd-guidance", "2", "--remap-prompt", "a dog"]))
    assert (args["esd.guidance"], args["remap_prompt"]) == ("2", "a dog")
    preset = load_config(SDEraseConfig, None, {"concept": "nudity"})
    assert preset.remap_prompt == "a photo of a person wearing clothes" and preset.esd.guidance == 1.0
    given = load_config(SDEraseConfig, None, {"concept": "nudity", "remap_prompt": "a dog", "esd.guidance": 3,
                                              "method": "esd"})
    assert (given.remap_prompt, given.esd.guidance, given.retain_prompts) == (
        "a dog", 3.0, ["a photo of a person wearing clothes"])
    with pytest.raises(ConfigError, match="config key 'esd.guidance' must be >= 0"):
        load_config(SDEraseConfig, None, {"concept": "nudity", "esd.guidance": -1})
    method = next(f for f in dataclasses.fields(SDEraseConfig) if f.name == "method")
    assert method.metadata["choices"] == tuple(SD_METHODS)
    variants = load_config(SDEraseConfig, None, {"concept": "nudity", "method": "esd-u", "esd.start_guidance": 2})
    assert variants.esd.start_guidance == 2.0 and not hasattr(variants, "esd-u")
    with pytest.raises(ConfigError, match="config key 'esd' holds settings of method esd, but the method is salun"):
        load_config(SDEraseConfig, None, {"concept": "nudity", "esd.guidance": 3})


def _training_configs():
    from classifiers.config import TrainConfig, UnlearnConfig
    from pipelines.ddpm_config import DDPMTrainConfig, DDPMUnlearnConfig
    from pipelines.sd_config import SDEraseConfig

    return [(TrainConfig, {}), (UnlearnConfig, {"original": "x"}), (DDPMTrainConfig, {}),
            (DDPMUnlearnConfig, {"run": "x"}), (SDEraseConfig, {"concept": "nudity"})]


@pytest.mark.parametrize("index", range(5))
def test_every_training_config_takes_a_known_tracker(index):
    cls, required = _training_configs()[index]
    assert from_dict(cls, required).log_with is None
    assert from_dict(cls, {**required, "log_with": "tensorboard"}).log_with == "tensorboard"
    with pytest.raises(ConfigError, match="config key 'log_with' must be one of: tensorboard, wandb; got 'mlflow'"):
        from_dict(cls, {**required, "log_with": "mlflow"})


def test_an_uninstalled_tracker_fails_in_one_line_before_any_work(tmp_path, monkeypatch):
    from classifiers.commands import train as train_classifier
    from classifiers.config import TrainConfig
    from erasure import trainer
    from pipelines.ddpm_commands import unlearn as unlearn_ddpm
    from pipelines.ddpm_config import DDPMUnlearnConfig

    monkeypatch.setitem(trainer.TRACKERS, "wandb", "a_package_that_is_not_installed")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="^log_with: wandb is not installed; pip install") as info:
        train_classifier(from_dict(TrainConfig, {"out": str(out), "log_with": "wandb"}))
    assert "\n" not in str(info.value) and not out.exists()
    with pytest.raises(ConfigError, match="^log_with: wandb is not installed"):  # before the run is even read
        unlearn_ddpm(from_dict(DDPMUnlearnConfig, {"run": str(tmp_path / "missing"), "out": str(out),
                                                    "log_with": "wandb"}))
    assert not out.exists()
    from classifiers.commands import compare
    from classifiers.config import CompareConfig
    for section in ("unlearn", "train"):  # compare's runs log to the tracker too, so it is checked first
        with pytest.raises(ConfigError, match="^log_with: wandb is not installed"):
            compare(from_dict(CompareConfig, {"out": str(out), "train": {"dataset": "digits"},
                                              section: {"log_with": "wandb"}}))
        assert not out.exists()
