"""Configs are validated on load; every shipped YAML loads into the config of its command."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from erasure.cli import COMMANDS, _resolve
from erasure.config import from_dict, load_config, option, read_yaml
from erasure.errors import ConfigError
from pipelines.testbed_config import TestbedBuildConfig as BuildConfig  # not a pytest class

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Example:
    lr: float = option(0.1, "learning rate", gt=0)
    steps: int = option(10, "steps", ge=1)
    method: str = option("salun", "method", choices=("salun", "ga"))
    ratio: float | None = option(None, "mask ratio", gt=0, lt=1)
    names: list[str] = option(["a"], "names")
    flag: bool = option(False, "a flag")


def test_values_are_coerced_from_strings_as_flags_give_them():
    config = from_dict(Example, {"lr": "0.5", "steps": "3", "ratio": "null", "names": "x,y", "flag": "true"})
    assert (config.lr, config.steps, config.ratio, config.names, config.flag) == (0.5, 3, None, ["x", "y"], True)


@pytest.mark.parametrize("data, words", [
    ({"lrr": 0.1}, ["unknown config key 'lrr'", "did you mean 'lr'"]),
    ({"steps": "many"}, ["'steps'", "int"]),
    ({"steps": 1.5}, ["'steps'", "int"]),
    ({"flag": "maybe"}, ["'flag'", "bool"]),
    ({"lr": 0}, ["'lr'", "> 0"]),
    ({"ratio": 1.0}, ["'ratio'", "< 1"]),
    ({"method": "sallun"}, ["'method'", "salun, ga", "did you mean 'salun'"]),
    ({"names": 3}, ["'names'", "list"]),
])
def test_bad_values_name_the_key_and_what_is_allowed(data, words):
    with pytest.raises(ConfigError) as info:
        from_dict(Example, data)
    for word in words:
        assert word in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "nope.yaml")


def test_a_configs_path_reads_the_packaged_copy_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_yaml("configs/testbed.yaml")["steps"] == 5000
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml("configs/nope.yaml")


def test_a_testbed_build_checks_its_judge_config_before_reading_any_data(tmp_path):
    with pytest.raises(ConfigError, match="config key 'judge_config'"):
        load_config(BuildConfig, None, {"judge_config": str(tmp_path / "nope.yaml")})


def test_a_yaml_list_at_top_level_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Example, path)


def test_exponent_floats_without_a_dot_are_floats_in_every_yaml_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-05\nratio: 5E-1\nnames: [1e3, 1e3x, 10]\nnested: {lr: -2e-4}\n")
    assert read_yaml(path) == {"lr": 1e-05, "ratio": 0.5, "names": [1000.0, "1e3x", 10], "nested": {"lr": -2e-4}}
    path.write_text("lr: 1e-05\n")
    assert load_config(Example, path).lr == 1e-05


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.2\nsteps: 4\n")
    assert load_config(Example, path, {"steps": "7"}).steps == 7


def _command_of(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# command: erasure "), f"{path.name}: first line must be '# command: erasure <subcommand>'"
    words = tuple(first.removeprefix("# command: erasure ").split())
    matches = [c for c in COMMANDS if c.path == words]
    assert matches, f"{path.name} names unknown command {words}"
    return matches[0]


SEARCH_GRID = "# search grid of: erasure classifier compare"
ACCELERATE = "# accelerate config:"
SHIPPED = sorted((ROOT / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if not p.read_text().startswith((SEARCH_GRID, ACCELERATE))],
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    command = _command_of(path)
    load_config(_resolve(command.config), path)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.read_text().startswith(SEARCH_GRID)], ids=lambda p: p.name)
def test_every_shipped_search_grid_makes_valid_runs(path):
    from classifiers.config import CompareConfig
    from classifiers.method_settings import METHODS

    config = load_config(CompareConfig, None, {"search_file": str(path), "methods": list(METHODS)})
    assert config.search and set(config.search) <= set(METHODS)


def test_a_search_file_extends_another_and_replaces_the_methods_it_names(tmp_path):
    from classifiers.config import CompareConfig, read_search_file

    shared = read_search_file(str(ROOT / "configs" / "classifier_search_grid.yaml"))
    wider = read_search_file(str(ROOT / "configs" / "classifier_search_grid_random50.yaml"))
    assert set(wider) == set(shared) and wider["rl"]["epochs"] == [2, 5, 10, 20, 40]
    assert {m: g for m, g in wider.items() if m not in ("rl", "salun")} == \
        {m: g for m, g in shared.items() if m not in ("rl", "salun")}
    path = tmp_path / "g.yaml"
    path.write_text("extends: [configs/classifier_search_grid.yaml]\n")
    with pytest.raises(ConfigError, match="'extends' must name another search file"):
        load_config(CompareConfig, None, {"search_file": str(path), "methods": ["rl"]})


def test_nested_compare_sections_are_validated(tmp_path):
    from classifiers.config import CompareConfig

    path = tmp_path / "c.yaml"
    path.write_text("train: {epoch: 3}\n")
    with pytest.raises(ConfigError, match="unknown config key 'epoch' in 'train'"):
        load_config(CompareConfig, path)
    path.write_text("per_method: {ga: {lr: -1}}\n")
    with pytest.raises(ConfigError, match="'lr' must be > 0"):
        load_config(CompareConfig, path)


def test_each_method_has_its_own_section_with_errors_naming_the_key(tmp_path):
    import dataclasses

    from classifiers.config import CompareConfig, UnlearnConfig, UnlearnSharedConfig
    from classifiers.method_settings import METHOD_SETTINGS

    config = load_config(UnlearnConfig, None, {"original": "x", "method": "iu", "iu.alpha": "2"})
    assert config.settings.alpha == 2.0 and config.lr == METHOD_SETTINGS["iu"].default_lr
    with pytest.raises(ConfigError, match="config key 'iu.alpha' must be > 0"):
        load_config(UnlearnConfig, None, {"original": "x", "iu": {"alpha": 0}})
    with pytest.raises(ConfigError, match="unknown config key 'iu.alpah'.*did you mean 'iu.alpha'"):
        load_config(UnlearnConfig, None, {"original": "x", "iu.alpah": 1})
    compare = from_dict(CompareConfig, {"per_method": {"iu": {"alpha": 2.5, "lr": 0.3}}})
    unlearn = compare.unlearn_config("iu", original="o", out="u")
    assert (unlearn.iu.alpha, unlearn.lr, unlearn.ssd.alpha) == (2.5, 0.3, 10.0)
    path = tmp_path / "c.yaml"
    path.write_text("per_method: {ssd: {strength: -1}}\n")
    with pytest.raises(ConfigError, match="config key 'ssd.strength' must be > 0"):
        load_config(CompareConfig, path)
    shared = {f.name for f in dataclasses.fields(UnlearnSharedConfig)}
    for name, settings in METHOD_SETTINGS.items():
        assert not shared & {f.name for f in dataclasses.fields(settings)}, f"{name} shadows a shared key"


def test_method_flags_and_choices_come_from_the_registry():
    import dataclasses

    from classifiers.config import CompareConfig, UnlearnConfig
    from classifiers.method_settings import METHOD_SETTINGS, METHODS
    from erasure.cli import build_parser

    parser = build_parser()
    args = vars(parser.parse_args(["classifier", "unlearn", "--iu-alpha", "2", "--kaggle2-grad-scale", "0.2",
                                   "--mask-ratio", "0.3"]))
    assert (args["iu.alpha"], args["kaggle_2nd.grad_scale"], args["salun.mask_ratio"]) == ("2", "0.2", "0.3")
    choices = {f.name: f.metadata["choices"] for cls in (UnlearnConfig, CompareConfig) for f in dataclasses.fields(cls)
               if f.name in ("method", "methods")}
    assert choices == {"method": METHODS, "methods": METHODS} and METHODS == tuple(METHOD_SETTINGS)
    sections = {f.name for f in dataclasses.fields(UnlearnConfig) if f.metadata.get("section")}
    assert sections == {name for name, cls in METHOD_SETTINGS.items() if dataclasses.fields(cls)}
    with pytest.raises(ConfigError, match="'method' must be one of"):
        load_config(UnlearnConfig, None, {"original": "x", "method": "nope"})


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.read_text().startswith(ACCELERATE)], ids=lambda p: p.name)
def test_every_shipped_accelerate_config_is_read_by_accelerate(path):
    """Accelerate's own reader takes it (tests/test_fsdp.py launches erasures with it)."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
