"""Config of `erasure testbed build` (data only: no torch/diffusers import)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erasure.config import config_path, option
from erasure.errors import ConfigError


@dataclass
class TestbedBuildConfig:
    """Build the CIFAR-10 text-to-image testbed: judge, VAE, cached latents, UNet + text encoder."""

    out: str = option("outputs/testbed", "output directory; the pipeline lands in <out>/pipeline")
    data_dir: str | None = option(None, "folder holding cifar10_jpeg.npz (default: $ERASURE_DATA_DIR, ../shared/data)")
    judge_config: str = option("configs/classifier_cifar10_16_train.yaml",
                               "`erasure classifier train` config of the judge (trained at the same resolution)")
    judge_epochs: int | None = option(None, "override the judge config's epochs (quick builds)", ge=1)
    train_limit: int | None = option(None, "use only the first N training images (quick builds)", ge=1)
    exclude: list[str] = option([], "classes the UNet stage never sees: a retrained gold standard for erasing "
                                    "them (the judge, VAE and latents stay those of all the data)")
    reuse: str | None = option(None, "a finished build whose judge, vae and latents stages are copied instead of "
                                     "trained again (a gold standard then costs only its UNet stage)")
    width: int = option(32, "base channels of the UNet (its two levels: width, 2 x width)", ge=8)
    text_width: int = option(64, "hidden size of the CLIP text encoder (= the UNet's cross-attention dim)", ge=8)
    vae_steps: int = option(400, "VAE optimizer steps", ge=1)
    vae_batch_size: int = option(128, "images per VAE step", ge=1)
    vae_lr: float = option(1e-3, "VAE Adam learning rate after warm-up", gt=0)
    vae_warmup: int = option(0, "VAE steps of linear learning-rate warm-up", ge=0)
    vae_cosine: bool = option(False, "decay the VAE's learning rate to zero along a half cosine after the warm-up "
                                     "(else constant)")
    vae_kl_weight: float = option(1e-4, "weight of the VAE's KL term (per latent element) beside the pixel MSE", ge=0)
    steps: int = option(2500, "UNet + text encoder optimizer steps", ge=1)
    batch_size: int = option(128, "latents per UNet step", ge=1)
    lr: float = option(1e-3, "UNet + text encoder Adam learning rate after warm-up", gt=0)
    warmup: int = option(200, "steps of linear learning-rate warm-up", ge=0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this value (0: off)", ge=0)
    ema_decay: float = option(0.999, "decay of the EMA weights that are saved for sampling", ge=0, lt=1)
    caption_dropout: float = option(0.1, "share of captions replaced by the empty prompt (classifier-free guidance)",
                                    ge=0, lt=1)
    seed: int = option(0, "random seed (inits, data order, captions, noise, timesteps)", ge=0)
    checkpoint_every: int = option(250, "save resumable state every N steps of each training stage (0: never)", ge=0)
    threads: int = option(1, "torch CPU threads (on a busy 2-core machine one thread trained 5x faster than two)",
                          ge=1)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished build: finished stages are kept, the running one resumes")

    def validate(self) -> None:
        """Check the judge config, the excluded classes and the reused build before any data is read."""
        from pipelines.testbed_captions import CLASSES

        judge_config = config_path(self.judge_config)
        if not judge_config.is_file():
            raise ConfigError(f"config key 'judge_config': no file '{self.judge_config}'; pass an `erasure classifier "
                              "train` YAML such as configs/classifier_cifar10_16_train.yaml")
        self.judge_config = str(judge_config)

        unknown = [name for name in self.exclude if name not in CLASSES]
        if unknown:
            raise ConfigError(f"config key 'exclude': '{unknown[0]}' is not a CIFAR-10 class ({', '.join(CLASSES)})")
        if self.reuse is not None and not (Path(self.reuse) / "latents" / "manifest.json").is_file():
            raise ConfigError(f"config key 'reuse': '{self.reuse}' holds no finished latents stage; pass the --out "
                              "of a finished `erasure testbed build`")


@dataclass
class TestbedEvalConfig:
    """Judge generations from "a photo of a {class}" (the testbed's quality bar): per-class accuracy and mean."""

    model: str = option("testbed", "the pipeline: a diffusers directory, or 'testbed' (the committed one)")
    run: str | None = option(None, "an erased run (`erasure sd --out`) whose UNet replaces the pipeline's: the "
                                   "table then shows what the erasure left of each class")
    judge: str = option("testbed", "the judge: a classifier model.safetensors, a finished `erasure classifier train` "
                                   "run, or 'testbed' (the committed one)")
    per_class: int = option(50, "images per class", ge=1)
    seed: int = option(0, "image i of a class is seeded with seed + i", ge=0)
    steps: int = option(25, "sampling steps", ge=1)
    guidance: float = option(7.5, "classifier-free guidance scale (diffusers' guidance_scale; Stable Diffusion's "
                                   "default)", ge=1)
    batch_size: int = option(100, "images per pipeline call", ge=1)
    reconstructions: int = option(1000, "CIFAR-10 test images the judge also sees as they are and through the "
                                        "pipeline's VAE (what the decoder lets the UNet show; 0: skip)", ge=0)
    data_dir: str | None = option(None, "folder holding cifar10_jpeg.npz (default: $ERASURE_DATA_DIR, ../shared/data)")
    threads: int = option(1, "torch CPU threads", ge=1)


@dataclass
class TestbedExportConfig:
    """Copy a finished build's pipeline and judge in half precision (the committed assets)."""

    build: str = option("outputs/testbed", "the --out directory of a finished `erasure testbed build`")
    out: str = option("pipelines/assets", "folder that receives testbed/ (pipeline) and testbed_judge/")
    overwrite: bool = option(False, "replace existing testbed/ and testbed_judge/ folders")
