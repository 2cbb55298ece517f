"""Benchmark mask selection on Stable-Diffusion-UNet-sized saliency scores.

Times `erasure.saliency.select_mask` (exact radix select) against the naive
`torch.cat(...).kthvalue(...)` and prints one JSON line with wall time and peak extra memory.

    python scripts/bench_mask.py [--numel 859520964] [--ratio 0.5] [--device auto] [--no-baseline]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from erasure.saliency import select_mask

SD_UNET_NUMEL = 859_520_964
TEXT_WIDTH = 768  # CLIP text-embedding width used by the cross-attention keys and values


def block_shapes(c: int) -> list[tuple[int, ...]]:
    """Parameter shapes of one SD-v1-like ResNet block plus transformer block of width c."""
    resnet = [(c,), (c,), (c, c, 3, 3), (c,), (c, 1280), (c,), (c,), (c,), (c, c, 3, 3), (c,)]
    attention = [(c, c), (c, c), (c, c), (c, c), (c,)]
    cross = [(c, c), (c, TEXT_WIDTH), (c, TEXT_WIDTH), (c, c), (c,)]
    feed_forward = [(8 * c, c), (8 * c,), (c, 4 * c), (c,)]
    norms = [(c,)] * 8
    projection = [(c, c, 1, 1), (c,)]
    return [*resnet, *projection, *attention, *cross, *feed_forward, *norms, *projection]


def unet_like_shapes(numel: int) -> list[tuple[int, ...]]:
    """Blocks cycling through widths 320/640/1280, the last shape trimmed so the sizes sum to `numel`."""
    shapes: list[tuple[int, ...]] = []
    total, block = 0, 0
    widths = [320, 640, 1280, 1280, 640, 320]
    while total < numel:
        for shape in block_shapes(widths[block % len(widths)]):
            size = torch.Size(shape).numel()
            if total + size >= numel:
                shapes.append((numel - total,))
                return shapes
            shapes.append(shape)
            total += size
        block += 1
    return shapes


def make_scores(numel: int, device: torch.device, seed: int) -> dict[str, Tensor]:
    """Random |g|-like scores: uniform values times a per-tensor magnitude spanning 1e-6..1e-2."""
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = {}
    for i, shape in enumerate(unet_like_shapes(numel)):
        scale = 10 ** -(2 + 4 * torch.rand((), generator=generator, device=device).item())
        scores[f"p{i}"] = torch.rand(shape, generator=generator, device=device).mul_(scale)
    return scores


def naive_select(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """The baseline: concatenate every score, take the k-th largest, compare."""
    values = torch.cat([s.flatten() for s in scores.values()])
    k = round(ratio * values.numel())
    cut = values.kthvalue(values.numel() - k + 1).values.item()
    del values
    return {name: s >= cut for name, s in scores.items()}


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the process's VmHWM on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *_: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.extra = _proc_status_bytes("VmHWM") - self.base


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is missing from /proc/self/status; this benchmark needs Linux")


def measure(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[list[float], int]:
    """Wall seconds of each of `repeats` runs, and the peak extra memory of the first run."""
    seconds, peaks = [], []
    for _ in range(repeats):
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            result = run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
            del result
        peaks.append(peak.extra)
    return seconds, peaks[0]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=SD_UNET_NUMEL, help="total score entries (SD v1 UNet size)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of entries to keep")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3 on GPU, 1 on CPU)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.cat + kthvalue")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    scores = make_scores(args.numel, device, args.seed)
    params_bytes = 4 * args.numel
    runs, peak = measure(lambda: select_mask(scores, ratio=args.ratio), device, repeats)
    seconds = statistics.median(runs)
    row = {
        "figure": "mask_select", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "numel": args.numel, "ratio": args.ratio, "repeats": repeats, "seconds": round(seconds, 3),
        "seconds_runs": [round(r, 3) for r in runs],
        "peak_extra_bytes": peak, "extra_over_params": round(peak / params_bytes, 4),
        "baseline_seconds": None, "baseline_seconds_runs": None, "baseline_peak_extra_bytes": None,
        "baseline_extra_over_params": None, "speedup_vs_baseline": None, "torch": torch.__version__,
    }
    if args.baseline:
        base_runs, base_peak = measure(lambda: naive_select(scores, args.ratio), device, repeats)
        base_seconds = statistics.median(base_runs)
        row |= {"baseline_seconds": round(base_seconds, 3), "baseline_seconds_runs": [round(r, 3) for r in base_runs],
                "baseline_peak_extra_bytes": base_peak,
                "baseline_extra_over_params": round(base_peak / params_bytes, 4),
                "speedup_vs_baseline": round(base_seconds / seconds, 2)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
