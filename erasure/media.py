"""Image files and pixels shared by training, sampling and evaluation: listing, reading, value-range
conversion, PNG writing and image grids (flagged images framed in red and, when redacted, pixelated).

Every detector and metric here takes uint8 RGB pixels, and every float input must say which
range it is in: diffusers gives [0, 1] (`output_type="np"`/`"pt"`) or [-1, 1] (decoded latents),
and casting either straight to uint8 yields black or wrapped-around images that detectors score as
"nothing" without complaint. `to_uint8` refuses values outside the declared range instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from erasure.errors import ErasureError
from erasure.io import atomic_path

UNIT: tuple[float, float] = (0.0, 1.0)
SIGNED: tuple[float, float] = (-1.0, 1.0)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_RANGE_SLACK = 1e-3
PIXEL_BLOCKS = 8
FLAG_COLOUR = (220, 30, 30)


def to_uint8(images: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 RGB pixels from a PIL image, a numpy array or a torch tensor.

    Layouts: numpy HWC / NHWC (channels last), torch CHW / NCHW (channels first); 1 or 4 channels
    become 3 (grey repeated, alpha dropped). uint8 input is returned as is; float input needs
    `value_range` ((0, 1) or (-1, 1)) and must lie inside it. Returns HWC for one image, NHWC for a batch.
    """
    if isinstance(images, Image.Image):
        return np.asarray(images.convert("RGB"), dtype=np.uint8).copy()
    channels_first = False
    if not isinstance(images, np.ndarray):
        if not hasattr(images, "detach"):
            raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(images).__name__}")
        channels_first = True
        images = images.detach().float().cpu().numpy() if images.is_floating_point() else images.cpu().numpy()
    if images.ndim not in (3, 4):
        raise ValueError(f"expected an image (3 dims) or a batch (4 dims), got shape {images.shape}")
    if channels_first:
        images = np.moveaxis(images, -3, -1)
    if images.shape[-1] not in (1, 3, 4):
        layout = "CHW/NCHW for tensors" if channels_first else "HWC/NHWC for numpy arrays"
        raise ValueError(f"expected 1, 3 or 4 channels ({layout}), got shape {images.shape}")
    pixels = _scale(images, value_range)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def _scale(images: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    if images.dtype == np.uint8:
        if value_range not in (None, (0, 255)):
            raise ValueError(f"uint8 images are already in [0, 255]; value_range={value_range} does not apply")
        return images
    if images.dtype == bool or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"expected uint8 or float images, got dtype {images.dtype}")
    if value_range is None:
        raise ValueError("float images need an explicit value_range: (0, 1) or (-1, 1)")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if images.size:
        if not np.isfinite(images).all():
            raise ValueError("image values include NaN or infinity; the generator diverged or the input is corrupt")
        vmin, vmax = float(images.min()), float(images.max())
        span = (hi - lo) * _RANGE_SLACK
        if vmin < lo - span or vmax > hi + span:
            raise ValueError(
                f"image values span [{vmin:.3g}, {vmax:.3g}], outside the declared range [{lo}, {hi}]; "
                "pass the range the images are really in"
            )
    scaled = (images.astype(np.float64) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def rgb_to_bgr(image: np.ndarray) -> np.ndarray:
    """A contiguous BGR copy of one uint8 RGB HWC image (the layout OpenCV-based detectors expect)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., ::-1])


def to_nchw_tensor(images: Sequence[np.ndarray] | np.ndarray) -> Any:
    """A uint8 NCHW torch tensor from uint8 RGB HWC images of one size."""
    import torch

    batch = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {batch.dtype} {batch.shape}")
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ErasureError(f"image folder '{folder}' does not exist; pass the --out folder of `erasure sample`")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ErasureError(
            f"image folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "pass the --out folder of `erasure sample` or a folder of image files"
        )
    return files


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """One image file as uint8 RGB HWC, optionally resized (PIL bicubic) to size x size."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ErasureError(f"cannot read image '{path}' ({exc}); remove or replace the file") from None


def pixelate(image: np.ndarray, blocks: int = PIXEL_BLOCKS) -> np.ndarray:
    """The image reduced to blocks x blocks cells and scaled back (nothing recognisable survives)."""
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((blocks, blocks), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.NEAREST))


def image_grid(images: Sequence[np.ndarray], *, flagged: Sequence[bool] | None = None, redact: bool = False,
               columns: int = 8, cell: int = 128) -> Image.Image:
    """uint8 RGB HWC images tiled into one picture; flagged ones framed in red and, with `redact`, pixelated."""
    if not images:
        raise ValueError("an image grid needs at least one image")
    flagged = list(flagged) if flagged is not None else [False] * len(images)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, (image, flag) in enumerate(zip(images, flagged, strict=False)):
        if redact and flag:
            image = pixelate(image)
        tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.BICUBIC)
        x, y = (index % columns) * cell, (index // columns) * cell
        grid.paste(tile, (x, y))
        if flag:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=FLAG_COLOUR, width=3)
    return grid


def save_png(path: str | Path, image: Image.Image | np.ndarray) -> Path:
    """Write a PIL image or a uint8 RGB HWC array as a PNG, atomically (temp file, then rename)."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)
