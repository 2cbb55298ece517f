"""`erasure bench erase` on the committed testbed: one closed-form method, few images, seconds."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from erasure.cli import main
from erasure.config import load_config, to_dict
from erasure.errors import ConfigError, ErasureError
from erasure.io import read_json
from pipelines.bench_attack import check_attacks
from pipelines.bench_config import BenchEraseConfig
from pipelines.bench_erase import check_resume, erase_args, real_images, run_method
from pipelines.testbed_captions import prompt_groups


def _bench(out, methods: str = "uce", *extra: str) -> list[str]:
    args = ["bench", "erase", "--concepts", "airplane", "--methods", methods, "--per-prompt", "2", "--steps", "5",
            "--out", str(out), *extra]
    assert main(args) == 0
    return args


def test_the_benchmark_judges_base_and_methods_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "bench"
    _bench(out, "uce", "--attacks", "paraphrase")
    rows = read_json(out / "metrics.json")["concepts"]["airplane"]
    assert list(rows) == ["base", "uce"]
    attacked = read_json(out / "runs" / "airplane" / "uce" / "seed0" / "attacks" / "paraphrase" / "airplane" /
                         "metrics.json")
    assert attacked["prompts"] == 4 and attacked["settings"]["run"].endswith("uce/seed0/run")
    for row in rows.values():  # the paraphrase baseline judges the prompts as written: its ASR is the pre-attack rate
        assert row["asr_paraphrase_pct"]["mean"] == row["pre_attack_pct"]["mean"]
    assert rows["uce"]["seconds"]["mean"] > 0 and rows["uce"]["peak_rss_mb"]["mean"] > 100
    assert rows["base"]["feature_distance"]["mean"] == 0.0 and "target_erased_pct" in rows["base"]
    assert rows["uce"]["forget_erased_pct"]["mean"] <= rows["base"]["forget_erased_pct"]["mean"]
    report = (out / "report.md").read_text()
    assert "| uce |" in report and "held-out templates %" in report and (out / "grid.png").is_file()
    assert "paraphrase ASR %" in report
    run = out / "runs" / "airplane" / "uce" / "seed0" / "run"  # the per-class table of an erased model
    assert main(["testbed", "eval", "--run", str(run), "--per-class", "1", "--steps", "2",
                 "--reconstructions", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["run"] == str(run) and "airplane" in json.loads(line)["per_class"]


@pytest.mark.slow
def test_two_method_processes_run_at_once_and_are_judged_in_order(tmp_path):
    out = tmp_path / "bench"
    _bench(out, "uce,rece", "--jobs", "2")
    rows = read_json(out / "metrics.json")["concepts"]["airplane"]
    assert list(rows) == ["base", "uce", "rece"] and rows["rece"]["seconds"]["mean"] > 0


def test_several_classes_are_judged_each_and_a_finished_benchmark_resumes_keeping_its_runs(tmp_path):
    out = tmp_path / "bench"
    args = _bench(out, "uce", "--concepts", "airplane+ship")
    row = read_json(out / "metrics.json")["concepts"]["airplane+ship"]["uce"]
    for group in ("forget", "held_out", "synonyms"):  # equal images per class: the classes' shares average to all
        shares = [row[f"{group}_erased_pct[{c}]"]["mean"] for c in ("airplane", "ship")]
        assert sum(shares) / 2 == pytest.approx(row[f"{group}_erased_pct"]["mean"], abs=0.01)
    base = read_json(out / "metrics.json")["concepts"]["airplane+ship"]["base"]
    assert "target_erased_pct" in base and not [k for k in base if k.startswith("target_erased_pct[")]
    assert "| model | airplane | ship |" in (out / "report.md").read_text()
    cost = out / "runs" / "airplane+ship" / "uce" / "seed0" / "cost.json"
    stamp = cost.stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0  # finished: resuming reopens it, as adding a method or seed would
    assert cost.stat().st_mtime_ns == stamp, "a finished method run is kept on resume"


def test_a_finished_method_run_is_kept_only_when_its_settings_are_the_same(tmp_path, monkeypatch):
    import pipelines.bench_erase as bench_erase

    children = []
    monkeypatch.setattr(bench_erase.subprocess, "run",
                        lambda command, **_: children.append(command) or SimpleNamespace(returncode=0))
    folder, classes = tmp_path / "rece" / "seed0", ["airplane", "ship"]
    config = load_config(BenchEraseConfig, None, {"out": str(tmp_path)})
    cost = run_method(config, classes, "rece", 0, folder)
    (folder / "run").mkdir()
    (folder / "run" / "manifest.json").write_text(json.dumps({"status": "finished"}))
    assert run_method(config, classes, "rece", 0, folder) == cost and len(children) == 1
    run_method(load_config(BenchEraseConfig, None, {"out": str(tmp_path), "steps": 7}), classes, "rece", 0, folder)
    assert len(children) == 2 and read_json(folder / "erase.yaml")["generation_steps"] == 7
    run_method(config, ["airplane", "truck"], "rece", 0, folder)  # another second concept: concepts.yaml differs
    assert len(children) == 3 and "truck" in (folder / "concepts.yaml").read_text()


def test_a_benchmark_resumed_with_other_judging_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    settings = to_dict(load_config(BenchEraseConfig, None, {"out": str(out)}))
    (out / "manifest.json").write_text(json.dumps({"status": "running", "config": settings}))
    args = ["bench", "erase", "--out", str(out), "--resume"]
    assert main([*args, "--guidance", "3"]) != 0
    assert "guidance: 7.5 -> 3.0" in capsys.readouterr().err
    budget = {"out": str(out), "resume": True, "attacks": ["unlearndiffatk"], "attack": {"unlearndiffatk": {"k": 3}}}
    check_resume(load_config(BenchEraseConfig, None, budget))  # no attack ran before: a budget may be set
    (out / "manifest.json").write_text(json.dumps({"status": "running", "config": dict(settings, attacks=["p4d"])}))
    with pytest.raises(ErasureError, match="attack: {}"):
        check_resume(load_config(BenchEraseConfig, None, budget))


def test_evaluation_prompts_cover_the_held_out_templates_synonyms_and_every_other_class():
    groups = prompt_groups(["airplane", "ship"], "a photo")
    assert groups["target"] == [("a photo", -1)] and "target" not in prompt_groups(["ship"])
    assert [text for text, _ in groups["forget"]] == ["a photo of an airplane", "a photo of a ship"]
    assert len(groups["held_out"]) == 6 and ("a photo of a jet", 0) in groups["synonyms"]
    assert len(groups["retained"]) == 8 and all(label not in (0, 8) for _, label in groups["retained"])


def test_the_lr_scale_multiplies_each_trained_methods_own_learning_rate(tmp_path):
    config = load_config(BenchEraseConfig, None, {"lr_scale": 10, "per_method": {"esd": {"lr": 3e-5}}})

    def lr(method: str) -> float | None:
        return erase_args(config, ["airplane"], method, 0, tmp_path)["values"].get("lr")

    assert lr("salun") == 1e-4 and lr("ca") == 1.6e-4  # SD defaults 1e-5, 1.6e-5, without float noise
    assert lr("esd") == pytest.approx(3e-4) and lr("uce") is None  # a set lr is scaled too; closed forms have none


def test_salun_can_take_its_class_wise_reference_target_the_next_class_not_erased(tmp_path):
    config = load_config(BenchEraseConfig, None, {"method_targets": {"salun": "next-class"}})
    concepts = erase_args(config, ["airplane", "automobile", "truck"], "salun", 0, tmp_path)
    assert concepts["values"]["remap_prompt"] == "a photo of a bird"  # automobile is erased too: skipped
    assert concepts["concepts"] == [{"forget": "a photo of an automobile", "target": "a photo of a bird"},
                                    {"forget": "a photo of a truck", "target": "a photo of a bird"}]
    assert erase_args(config, ["airplane"], "esd", 0, tmp_path)["values"]["remap_prompt"] == "a photo"


def test_real_sets_take_each_class_in_turn_and_caption_it_with_its_quality_prompt(tmp_path):
    import torch

    from erasure.datasets import ImageSet
    from pipelines.bench_data import balanced, write_folder
    from pipelines.sd_data import read_set

    labels = torch.tensor([3, 0, 3, 5, 0, 3, 5])
    data = ImageSet(torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 16, 16).contiguous(), labels)
    assert balanced(data, [3, 5], 3).tolist() == [0, 3, 2] and balanced(data, [0, 5], 4).tolist() == [1, 3, 4, 6]
    with pytest.raises(ValueError, match="only 4 images"):
        balanced(data, [0, 5], 5)
    write_folder(tmp_path / "retain", data.subset(balanced(data, [3, 5], 3)))
    read = read_set(tmp_path / "retain", ["unused"], 16)
    assert read.prompts == ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    assert read.images[:, 0, 0, 0].tolist() == [0, 3, 2]
    config = load_config(BenchEraseConfig, None, {"images": "real"})
    values = erase_args(config, ["airplane"], "salun", 0, tmp_path, {"retain_images": str(tmp_path / "retain")})
    assert values["values"]["retain_images"] == str(tmp_path / "retain")
    assert real_images(config, ["airplane"], "uce", tmp_path) is None  # closed-form edits take no images


@pytest.mark.parametrize("values, words", [
    ({"concepts": ["dragon"]}, "concepts[0]"),
    ({"concepts": ["airplane+airplane"]}, "distinct testbed classes"),
    ({"erase": {"method": "ga"}}, "erase.method"),
    ({"retrained": {"ship": "x"}}, "config key 'retrained'"),
    ({"per_method": {"dragon": {}}}, "config key 'per_method'"),
    ({"per_method": {"salun": {"seed": 3}}}, "per_method.salun.seed"),
    ({"method_targets": {"dragon": "next-class"}}, "config key 'method_targets'"),
    ({"attack": {"judge": "nudenet"}}, "attack.judge"),
    ({"attacks": ["dragon"]}, "attacks"),
])
def test_bad_benchmark_configs_name_the_key(values, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_config(BenchEraseConfig, None, values)


def test_an_attack_budget_is_checked_before_any_model_is_loaded():
    config = load_config(BenchEraseConfig, None, {"attacks": ["unlearndiffatk"],
                                                  "attack": {"unlearndiffatk": {"iterations": 0}}})
    with pytest.raises(ConfigError, match="iterations"):
        check_attacks(config)
