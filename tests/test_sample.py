"""`erasure sample` on the tiny pipeline: outputs, seeds independent of batching, resume, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.errors import ErasureError
from erasure.prompts import Prompt

SMALL = ("--height", "32", "--width", "32", "--steps", "2")


def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,categories,evaluation_seed,evaluation_guidance\n"
                    "a red car,sexual,11,7\na blue house,sexual,12,7\n"
                    "a green tree,hate,13,7\na cat on a mat,sexual,14,3\n", encoding="utf-8")
    return path


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_sample_writes_pngs_records_and_manifest(run_cli, tiny_sd_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    status, log = run_cli("sample", "--model", tiny_sd_dir, "--prompts", prompt_file(tmp_path), "--subset", "sexual",
                          "--out", out, "--batch-size", "2", *SMALL)
    assert status == 0, log
    images = pixels(out)
    assert sorted(images) == ["00000.png", "00001.png", "00003.png"]
    assert all(a.dtype == np.uint8 and a.shape == (32, 32, 3) for a in images.values())
    assert all(a.std() > 0 for a in images.values())
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00000.png", "00001.png", "00003.png"]
    assert records[2] == {"file": "00003.png", "row": 3, "prompt": "a cat on a mat", "seed": 14, "guidance": 3.0,
                          "steps": 2, "scheduler": "PNDMScheduler", "height": 32, "width": 32,
                          "categories": ["sexual"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["kind"] == "sample"
    assert len(manifest["config"]["prompt_file_sha256"]) == 64
    assert manifest["metrics"]["generated"] == 3 and manifest["metrics"]["images_per_second"] > 0


def test_images_do_not_depend_on_batch_size(run_cli, tiny_sd_dir: Path, tmp_path: Path) -> None:
    prompts = prompt_file(tmp_path)
    for batch in ("1", "3"):
        status, log = run_cli("sample", "--model", tiny_sd_dir, "--prompts", prompts, "--out", tmp_path / batch,
                              "--batch-size", batch, *SMALL)
        assert status == 0, log
    one, three = pixels(tmp_path / "1"), pixels(tmp_path / "3")
    assert sorted(one) == sorted(three) and len(one) == 4
    for name in one:
        assert np.abs(one[name].astype(int) - three[name].astype(int)).max() <= 1, name


def test_resume_skips_existing_images(run_cli, tiny_sd_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    args = ("sample", "--model", tiny_sd_dir, "--prompts", prompt_file(tmp_path), "--out", out, *SMALL)
    assert run_cli(*args)[0] == 0
    before = pixels(out)
    kept = out / "00000.png"
    kept_mtime = kept.stat().st_mtime_ns
    # Simulate a crash after two images: one PNG missing, a torn record line, the manifest still running.
    (out / "00002.png").unlink()
    (out / "prompts.jsonl").write_text((out / "prompts.jsonl").read_text() + '{"file": "000')
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))

    status, log = run_cli(*args)
    assert status == 2 and "--resume" in log
    status, log = run_cli(*args, "--resume")
    assert status == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["generated"], metrics["skipped_existing"]) == (1, 3)
    assert kept.stat().st_mtime_ns == kept_mtime
    after = pixels(out)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == [0, 1, 2, 3]

    status, log = run_cli(*args)
    assert status == 2 and "finished run" in log and "--overwrite" in log
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    status, log = run_cli(*args[:-1], "4", "--resume")
    assert status == 2 and "different settings (steps: 2 -> 4)" in log


def test_erased_unet_replaces_the_base_unet(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from pipelines import load_erased_pipeline
    from pipelines.tiny import tiny_unet

    with pytest.raises(ErasureError, match="holds no erased UNet"):
        load_erased_pipeline(str(tiny_sd_dir), tmp_path)
    torch.manual_seed(7)
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "run" / "unet")
    pipe = load_erased_pipeline(str(tiny_sd_dir), tmp_path / "run")
    for name, value in unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], value), name


def test_run_flag_generates_with_the_erased_unet(run_cli, tiny_sd_dir: Path, tmp_path: Path) -> None:
    from pipelines.tiny import tiny_unet

    torch.manual_seed(7)
    tiny_unet().save_pretrained(tmp_path / "run" / "unet")
    prompts = prompt_file(tmp_path)
    base = ("sample", "--model", tiny_sd_dir, "--prompts", prompts, "--limit", "1", *SMALL)
    assert run_cli(*base, "--out", tmp_path / "base")[0] == 0
    status, log = run_cli(*base, "--run", tmp_path / "run", "--out", tmp_path / "erased")
    assert status == 0, log
    assert not np.array_equal(pixels(tmp_path / "base")["00000.png"], pixels(tmp_path / "erased")["00000.png"])
    status, log = run_cli(*base, "--run", tmp_path, "--out", tmp_path / "bad")
    assert status == 2 and "holds no erased UNet" in log and not (tmp_path / "bad").exists()


def test_model_errors_and_the_tiny_name(run_cli, tmp_path: Path) -> None:
    prompts = prompt_file(tmp_path)
    status, log = run_cli("sample", "--model", "no-such-org/no-such-model", "--prompts", prompts,
                          "--out", tmp_path / "a", *SMALL)
    assert status == 2 and "could not load model 'no-such-org/no-such-model'" in log and "--model" in log
    status, log = run_cli("sample", "--model", tmp_path, "--prompts", prompts, "--out", tmp_path / "b", *SMALL)
    assert status == 2 and "is not a diffusers Stable Diffusion directory" in log
    status, log = run_cli("sample", "--model", "tiny", "--prompts", prompts, "--limit", "1",
                          "--out", tmp_path / "c", *SMALL)
    assert status == 0, log
    assert (tmp_path / "c" / "00000.png").is_file()


def test_prompt_file_errors_leave_no_output(run_cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    status, log = run_cli("sample", "--model", "tiny", "--prompts", empty, "--out", tmp_path / "o")
    assert status == 2 and "is empty" in log and not (tmp_path / "o").exists()
    status, log = run_cli("sample", "--model", "tiny", "--out", tmp_path / "o")
    assert status == 2 and "--prompts" in log


def test_batches_share_guidance() -> None:
    from pipelines.sampling import batches

    prompts = [Prompt(i, f"p{i}", i, g) for i, g in enumerate([7, 3, 7, 7, 3, 7])]
    grouped = [[p.row for p in batch] for batch in batches(prompts, 3)]
    assert grouped == [[1, 4], [0, 2, 3], [5]]
