"""Protocol retain-fid-v1: FID and KID (torchmetrics) between two image folders, pluggable features.

A feature extractor is an `nn.Module` taking uint8 RGB NCHW images of `input_size` x `input_size`
and returning float features (N, `num_features`); `describe()` says what it is for the report.
Extractors are found by name (a factory(argument) returning the module): the built-in ones in
`FEATURE_EXTRACTORS`, any other through the `erasure.feature_extractors` entry-point group, which is
how a domain or a third-party package adds its own without erasure importing it (this project
registers `classifier`, the penultimate features of an `erasure classifier train` run). A spec is
`name` or `name:argument`, e.g. `inception`, `clip:/models/clip-vit-large-patch14` or `classifier:<run>`.

Features are extracted once per image and handed to torchmetrics' FID and KID through a pass-through
module, so both metrics use torchmetrics' own statistics without running the network twice.
Images are resized to the extractor's input size with PIL bicubic before extraction.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from erasure.errors import ErasureError, first_line
from erasure.evaluation.folders import folder_settings
from erasure.evaluation.protocol import Grid, Protocol, ProtocolCard, Result, register
from erasure.evaluation.report import grid_links, markdown_table, settings_table
from erasure.media import load_rgb, to_nchw_tensor

if TYPE_CHECKING:
    from erasure.evaluation.config import FIDEvalConfig

SMALL_N = 2048
INCEPTION_HELP = "pass --features clip:<local CLIP model dir> to use a feature extractor you have locally"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureError(ErasureError):
    """A feature extractor cannot be built (unknown name, missing weights or package)."""


class InceptionFeatures(nn.Module):
    """The standard FID Inception-v3 pool features (2048) via torchmetrics + torch-fidelity."""

    input_size = 299
    num_features = 2048

    def __init__(self, argument: str | None = None):
        super().__init__()
        if argument:
            raise FeatureError(f"the inception extractor takes no argument, got 'inception:{argument}'; "
                               "pass --features inception")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)])
        except ImportError:
            raise FeatureError(
                "the standard Inception extractor needs the torch-fidelity package, which is not installed, and "
                f"downloads its weights on first use; pip install torch-fidelity, or {INCEPTION_HELP}"
            ) from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise FeatureError(
                f"could not download the FID Inception weights ({first_line(exc, 160)}); "
                f"connect once so torch caches them, or {INCEPTION_HELP}"
            ) from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features of uint8 NCHW images."""
        return self.net(images)

    def describe(self) -> dict[str, Any]:
        """What the report says about this extractor."""
        return {"name": "inception", "model": "inception-v3-compat (torch-fidelity FID weights, pool3)",
                "num_features": self.num_features, "input_size": self.input_size}


class CLIPFeatures(nn.Module):
    """Pooled image features of a local CLIP vision tower (a CLIPModel or CLIPVisionModel directory)."""

    def __init__(self, directory: str | None):
        super().__init__()
        if not directory:
            raise FeatureError("the clip extractor needs a local model directory: pass --features clip:<dir>")
        path = Path(directory)
        if not (path / "config.json").is_file():
            raise FeatureError(f"'{path}' is not a transformers CLIP model directory (no config.json); "
                               "pass --features clip:<dir saved with save_pretrained>")
        from transformers import CLIPVisionModel

        try:
            self.model = CLIPVisionModel.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise FeatureError(f"cannot load a CLIP vision model from '{path}' ({first_line(exc, 160)}); "
                               "pass a CLIPModel or CLIPVisionModel directory") from None
        mean, std = _clip_normalisation(path)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.directory = str(path)
        self.input_size = int(self.model.config.image_size)
        self.num_features = int(self.model.config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of uint8 NCHW images."""
        pixels = (images.float() / 255.0 - self.mean) / self.std
        return self.model(pixel_values=pixels).pooler_output

    def describe(self) -> dict[str, Any]:
        """What the report says about this extractor."""
        return {"name": "clip", "model": self.directory, "num_features": self.num_features,
                "input_size": self.input_size}


def _clip_normalisation(path: Path) -> tuple[Sequence[float], Sequence[float]]:
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text())
        if "image_mean" in data and "image_std" in data:
            return data["image_mean"], data["image_std"]
    return CLIP_MEAN, CLIP_STD


FeatureFactory = Callable[[str | None], nn.Module]
FEATURE_EXTRACTORS: dict[str, FeatureFactory] = {
    "inception": InceptionFeatures,
    "clip": CLIPFeatures,
}
ENTRY_POINT_GROUP = "erasure.feature_extractors"


def available_extractors() -> dict[str, FeatureFactory | EntryPoint]:
    """Built-in extractors and those registered under the `erasure.feature_extractors` entry points."""
    plugins = {p.name: p for p in entry_points(group=ENTRY_POINT_GROUP) if p.name not in FEATURE_EXTRACTORS}
    return {**FEATURE_EXTRACTORS, **plugins}


def build_extractor(spec: str, device: torch.device | str = "cpu") -> nn.Module:
    """The extractor named by `spec` (`name` or `name:argument`), in eval mode on `device`."""
    name, _, argument = spec.partition(":")
    extractors = available_extractors()
    if name not in extractors:
        raise FeatureError(f"unknown feature extractor '{name}'; choose one of: " + ", ".join(extractors)
                           + " (e.g. --features clip:<dir>)")
    factory = extractors[name]
    if isinstance(factory, EntryPoint):
        factory = factory.load()
    return factory(argument or None).eval().to(device)


@torch.inference_mode()
def extract(extractor: nn.Module, files: Sequence[Path], batch_size: int, device: torch.device | str,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """float64 features (N, num_features) of image files, on the CPU."""
    features = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = to_nchw_tensor([load_rgb(path, extractor.input_size) for path in chunk]).to(device)
        features.append(extractor(batch).double().cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(features)


class _Precomputed(nn.Module):
    """Hands already-extracted features to torchmetrics (which calls its `feature` module on its input)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(images: torch.Tensor, reference: torch.Tensor, *, kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FID and KID (mean, std) from the features of two sets; KID subsets are drawn with `seed`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_images, n_reference = len(images), len(reference)
    if min(n_images, n_reference) < 2:
        raise ErasureError(f"FID needs at least 2 images per set, got {n_images} and {n_reference}; add images")
    subset_size = min(kid_subset_size, n_images, n_reference)
    passthrough = _Precomputed(images.shape[1])
    fid = FrechetInceptionDistance(feature=passthrough)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = KernelInceptionDistance(feature=passthrough, subsets=kid_subsets, subset_size=subset_size)
    for metric in (fid, kid):
        metric.update(reference, real=True)
        metric.update(images, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": subset_size, "kid_subsets": kid_subsets, "images": n_images,
            "reference_images": n_reference, "small_n": min(n_images, n_reference) < SMALL_N}


def distance_name(extractor: dict[str, Any]) -> str:
    """'FID' for the Inception features only; a Fréchet distance on any other features is named by them."""
    return "FID" if extractor["name"] == "inception" else f"Fréchet distance ({extractor['name']} features)"


def report_sections(metrics: dict[str, Any], grids: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """report.md sections: FID/KID with a small-N warning, every setting, sample grids."""
    extractor, redact = metrics["settings"]["extractor"], metrics["settings"]["redact"]
    rows = [(distance_name(extractor), metrics["fid"]), ("KID (mean)", metrics["kid_mean"]),
            ("KID (std over subsets)", metrics["kid_std"]), ("images", metrics["images"]),
            ("reference images", metrics["reference_images"])]
    notes = f"Features: {extractor['model']} ({extractor['num_features']} dimensions)."
    if metrics["small_n"]:
        notes += (f"\n\n**Small sample:** fewer than {SMALL_N} images per set. FID is biased and unstable at this N "
                  "(it depends strongly on N); compare KID, which is unbiased, or FIDs computed at the same N only.")
    if metrics["kid_subset_size"] == min(metrics["images"], metrics["reference_images"]):
        notes += ("\n\nKID subsets hold every image of the smaller set, so its std over subsets is not an error bar "
                  "(it is ~0 when the sets are equal in size).")
    sections = [("Result", markdown_table(["metric", "value"], rows) + "\n\n" + notes),
                ("Settings", settings_table(metrics["settings"]))]
    if grids:
        note = "Pixelated (--redact)." if redact else "First images of each set."
        sections.append(("Samples", note + "\n\n" + grid_links(grids)))
    return sections


@dataclass
class FIDInputs:
    """The settings, the two image lists and the feature extractor (built before the run starts)."""

    config: FIDEvalConfig
    images: list[Path]
    reference: list[Path]
    extractor: nn.Module
    device: torch.device


class FIDProtocol(Protocol):
    """FID and KID between generated images and a reference set, with the features chosen."""

    card = ProtocolCard("retain-fid", 1, "Image quality after erasure: FID and KID between two image sets")
    kind = "eval-fid"

    def compute(self, inputs: FIDInputs, out: Path) -> Result:
        config, extractor = inputs.config, inputs.extractor
        sets = {"images": inputs.images, "reference": inputs.reference}
        features = {}
        for name, files in sets.items():
            with tqdm(total=len(files), desc=f"features {name}", unit="img") as bar:
                features[name] = extract(extractor, files, config.batch_size, inputs.device, progress=bar.update)
        result = fid_kid(features["images"], features["reference"], kid_subsets=config.kid_subsets,
                         kid_subset_size=config.kid_subset_size, seed=config.seed)
        settings = {"features": config.features, "extractor": extractor.describe(),
                    "resize": f"PIL bicubic to {extractor.input_size}x{extractor.input_size}",
                    "kid_subsets": config.kid_subsets, "kid_subset_size": result["kid_subset_size"],
                    "kid_seed": config.seed, "redact": config.redact,
                    "images_folder": folder_settings(Path(config.images), len(inputs.images)),
                    "reference_folder": folder_settings(Path(config.reference), len(inputs.reference))}
        grids = []
        if config.grid_size:
            for name, files in sets.items():
                shown = [load_rgb(f) for f in files[:config.grid_size]]
                grids.append(Grid(name, shown, flagged=[config.redact] * len(shown), redact=config.redact))
        line = (f"{distance_name(extractor.describe())} {result['fid']:.4g}, KID {result['kid_mean']:.4g} ± "
                f"{result['kid_std']:.4g} ({result['images']} vs {result['reference_images']} images)")
        return Result({"settings": settings, **result}, line, grids)

    def report_sections(self, metrics: dict[str, Any], grids: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return report_sections(metrics, grids)


PROTOCOL = register(FIDProtocol())
