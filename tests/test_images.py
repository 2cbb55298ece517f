"""Value ranges and layouts going into every metric: explicit, checked, never a silent cast."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.errors import ErasureError
from erasure.evaluation.report import markdown_table
from erasure.media import (
    SIGNED,
    UNIT,
    image_grid,
    list_images,
    load_rgb,
    pixelate,
    rgb_to_bgr,
    to_nchw_tensor,
    to_uint8,
)


def test_unit_float_numpy_batch_maps_to_full_uint8_range() -> None:
    batch = np.stack([np.zeros((4, 4, 3)), np.full((4, 4, 3), 0.5), np.ones((4, 4, 3))]).astype(np.float32)
    pixels = to_uint8(batch, UNIT)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 4, 4, 3)
    assert [int(p.max()) for p in pixels] == [0, 128, 255]


def test_signed_torch_tensor_is_rescaled_not_cast() -> None:
    """The reference code cast [-1, 1] straight to uint8: -1 wrapped to 255 and 0.5 became 0."""
    tensor = torch.tensor([-1.0, 0.0, 0.5, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)  # NCHW
    pixels = to_uint8(tensor, SIGNED)
    assert pixels.shape == (1, 1, 4, 3)
    assert pixels[0, 0, :, 0].tolist() == [0, 128, 191, 255]
    naive = tensor.to(torch.uint8)[0, 0, 0].tolist()
    assert naive != pixels[0, 0, :, 0].tolist()


def test_values_outside_the_declared_range_are_refused() -> None:
    signed = np.linspace(-1, 1, 48, dtype=np.float32).reshape(4, 4, 3)
    with pytest.raises(ValueError, match="outside the declared range"):
        to_uint8(signed, UNIT)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.full((2, 2, 3), np.nan, dtype=np.float32), UNIT)


def test_float_without_range_and_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="explicit value_range"):
        to_uint8(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        to_uint8(np.zeros((3, 5, 5), np.uint8))  # CHW numpy is not a layout we guess
    with pytest.raises(ValueError, match="already in"):
        to_uint8(np.zeros((4, 4, 3), np.uint8), UNIT)


def test_uint8_pil_grey_and_alpha_inputs() -> None:
    rgb = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert np.array_equal(to_uint8(rgb), rgb)
    assert np.array_equal(to_uint8(Image.fromarray(rgb)), rgb)
    grey = to_uint8(np.full((4, 4, 1), 7, np.uint8))
    assert grey.shape == (4, 4, 3) and (grey == 7).all()
    rgba = np.dstack([rgb, np.full((4, 4), 9, np.uint8)])
    assert np.array_equal(to_uint8(rgba), rgb)


def test_bgr_and_nchw_conversions() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 200
    bgr = rgb_to_bgr(rgb)
    assert bgr[..., 2].max() == 200 and bgr[..., 0].max() == 0 and bgr.flags.c_contiguous
    with pytest.raises(ValueError):
        rgb_to_bgr(rgb.astype(np.float32) / 255)
    tensor = to_nchw_tensor([rgb, rgb])
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (2, 3, 2, 3)
    assert tensor[:, 0].max() == 200


def test_list_images_and_load(tmp_path: Path) -> None:
    with pytest.raises(ErasureError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ErasureError, match="holds no images"):
        list_images(tmp_path)
    Image.fromarray(np.full((10, 20, 3), 40, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.full((10, 20), 90, np.uint8)).save(tmp_path / "a.jpg")
    files = list_images(tmp_path)
    assert [f.name for f in files] == ["a.jpg", "b.png"]
    assert load_rgb(files[0]).shape == (10, 20, 3)
    assert load_rgb(files[1], size=8).shape == (8, 8, 3)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ErasureError, match="cannot read image"):
        load_rgb(tmp_path / "c.png")


def test_grid_pixelates_only_flagged_images() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    grid = np.asarray(image_grid(images, flagged=[False, True, False], redact=True, columns=3, cell=64))
    assert grid.shape == (64, 192, 3)
    flagged_tile = grid[4:60, 68:124]  # inside the red frame
    assert len(np.unique(flagged_tile.reshape(-1, 3), axis=0)) <= 8 * 8
    assert len(np.unique(grid[4:60, 4:60].reshape(-1, 3), axis=0)) > 500
    assert (grid[0, 64] == (220, 30, 30)).all()
    assert len(np.unique(pixelate(images[0]).reshape(-1, 3), axis=0)) <= 64


def test_markdown_table_formats_cells() -> None:
    table = markdown_table(["a", "b"], [(0.123456, None), ("x|y", 3)])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 0.1235 | - |", "| x\\|y | 3 |"]
