"""The testbed's quality bar and its committed assets: generations from "a photo of a {class}" judged by the
CIFAR-10 classifier (`erasure testbed eval`), and the half-precision copy of a build (`erasure testbed export`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from torch import Tensor, nn

from classifiers.metrics import predict_proba
from classifiers.models import MODEL_FILE, load_model, save_model
from erasure.datasets import ImageSet, load_cifar10
from erasure.errors import ConfigError
from erasure.io import atomic_dir, finished_run
from pipelines.loading import load_base_pipeline, load_erased_pipeline
from pipelines.testbed import PIPELINE_DIR
from pipelines.testbed_captions import CLASSES, QUALITY_PROMPT, caption
from pipelines.testbed_config import TestbedEvalConfig, TestbedExportConfig
from pipelines.testbed_models import JUDGE_DIR, RESOLUTION, TESTBED_DIR, TESTBED_NAME


def judge_path(path: str | Path) -> Path:
    """The committed judge's folder for 'testbed', else `path` (a classifier run directory or its model file)."""
    return JUDGE_DIR if str(path) == TESTBED_NAME else Path(path)


def load_judge(path: str | Path) -> nn.Module:
    """A judge from 'testbed', a classifier run directory or its model file, in float32."""
    path = judge_path(path)
    model = load_model(path / MODEL_FILE if path.is_dir() else path)
    return model.float().eval()


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
             batch_size: int = 100) -> Tensor:
    """uint8 NCHW images, image i from prompts[i] with its own generator seeded seeds[i]."""
    out = []
    for i in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch_size]]
        images = pipe(prompts[i:i + batch_size], generator=generators, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="pt").images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def class_accuracy(pipe: StableDiffusionPipeline, judge: nn.Module, *, per_class: int, seed: int, steps: int,
                   guidance: float, batch_size: int = 100) -> dict[str, Any]:
    """The judge's accuracy (%) on `per_class` generations of each class's quality prompt, and their mean."""
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    prompts = [caption(QUALITY_PROMPT, CLASSES[label]) for label in labels.tolist()]
    seeds = [seed + i % per_class for i in range(len(prompts))]
    images = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, batch_size=batch_size)
    correct = predict_proba(judge, ImageSet(images, labels)).argmax(1) == labels
    per = {name: round(100.0 * correct[labels == i].float().mean().item(), 1) for i, name in enumerate(CLASSES)}
    return {"mean": round(sum(per.values()) / len(per), 2), "per_class": per, "images_per_class": per_class,
            "seed": seed, "steps": steps, "guidance": guidance}


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, judge: nn.Module, data: ImageSet, batch_size: int = 500
                            ) -> dict[str, float]:
    """The judge's accuracy (%) on `data` as it is and decoded from the VAE's posterior means."""
    decoded = []
    for i in range(0, len(data), batch_size):
        x = data.images[i:i + batch_size].float().div(127.5).sub(1.0).to(vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        decoded.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    scores = {}
    for name, images in (("images", data.images), ("reconstructions", torch.cat(decoded))):
        predicted = predict_proba(judge, ImageSet(images, data.labels)).argmax(1)
        scores[name] = round(100.0 * float((predicted == data.labels).float().mean()), 2)
    return {"test_images": len(data), "judge_accuracy": scores["images"],
            "judge_accuracy_on_reconstructions": scores["reconstructions"]}


def evaluate(config: TestbedEvalConfig) -> dict[str, Any]:
    """`erasure testbed eval`: one JSON line with the per-class table and its mean (and, with `reconstructions`,
    the judge's accuracy on test images through the pipeline's VAE beside its accuracy on them)."""
    torch.set_num_threads(config.threads)
    test = load_cifar10(config.data_dir, resolution=RESOLUTION).test if config.reconstructions else None
    pipe = load_erased_pipeline(config.model, config.run) if config.run else load_base_pipeline(config.model)
    judge = load_judge(config.judge)
    metrics = class_accuracy(pipe, judge, per_class=config.per_class, seed=config.seed,
                             steps=config.steps, guidance=config.guidance, batch_size=config.batch_size)
    if test is not None:
        subset = test.subset(torch.arange(min(config.reconstructions, len(test))))
        metrics["vae"] = reconstruction_accuracy(pipe.vae, judge, subset)
    print(json.dumps({"model": config.model, "run": config.run, "judge": config.judge, **metrics}))
    return metrics


def export(config: TestbedExportConfig) -> dict[str, str]:
    """`erasure testbed export`: the build's pipeline and judge as float16 safetensors under `out`."""
    build = Path(config.build)
    finished_run(build, "`erasure testbed build`")
    out = Path(config.out)
    targets = {"pipeline": out / TESTBED_DIR.name, "judge": out / JUDGE_DIR.name}
    for target in targets.values():
        if target.exists() and not config.overwrite:
            raise ConfigError(f"'{target}' exists; pass --overwrite to replace it")
        shutil.rmtree(target, ignore_errors=True)
    pipe = StableDiffusionPipeline.from_pretrained(build / PIPELINE_DIR, torch_dtype=torch.float16, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(targets["pipeline"]) as tmp:
        pipe.save_pretrained(tmp)
    with atomic_dir(targets["judge"]) as tmp:
        save_model(load_judge(build / "judge").half(), tmp / MODEL_FILE)
    return {name: str(path) for name, path in targets.items()}
