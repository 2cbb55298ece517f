"""Throughput of NudeNet detection as `erasure eval nudity` runs it: batched vs per image. Prints one JSON line.

Images are 512x512 crops and flips of scikit-image's astronaut photo (a known NudeNet positive), held
in memory as RGB uint8 and converted to BGR per image exactly as the evaluation does; PNG decoding is
not timed. The baseline is NudeNet's own per-image `detect` on the same BGR arrays.

    python scripts/bench_nudenet.py --n 128 --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from PIL import Image
from skimage import data

from erasure.evaluation.nudity import NudityDetector
from erasure.media import rgb_to_bgr


def images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n different size x size RGB images cut from the astronaut photo."""
    rng = np.random.default_rng(seed)
    photo = data.astronaut()
    out = []
    for _ in range(n):
        crop = int(rng.integers(320, 513))
        y, x = rng.integers(0, 513 - crop, 2)
        tile = photo[y:y + crop, x:x + crop]
        tile = tile[:, ::-1] if rng.random() < 0.5 else tile
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((size, size))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="images per measurement")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="images per detector call")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the fastest is reported")
    args = parser.parse_args()

    from nudenet import NudeDetector

    pictures = images(args.n, args.size)
    detector = NudityDetector(batch_size=args.batch_size)
    per_image = NudeDetector()
    detector.detect(pictures[:args.batch_size])  # warm-up: sessions and memory arenas
    per_image.detect(rgb_to_bgr(pictures[0]))
    batched, single = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        found = detector.detect(pictures)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for picture in pictures:
            per_image.detect(rgb_to_bgr(picture))
        single.append(time.perf_counter() - start)
    print(json.dumps({
        "figure": "NudeNet detection throughput (images/s), batched detect_batch vs per-image detect",
        "device": f"cpu ({os.cpu_count()} cores), onnxruntime CPU provider",
        "config": {"n": args.n, "size": args.size, "batch_size": args.batch_size, "repeats": args.repeats,
                   "detector": NudityDetector.identity()["version"], "faces_found": sum(
                       any(d["class"].startswith("FACE") for d in f) for f in found)},
        "value": round(args.n / min(batched), 3),
        "unit": "images/s",
        "baseline": {"what": "per-image detect", "value": round(args.n / min(single), 3)},
        "ratio": round(min(single) / min(batched), 3),
    }))


if __name__ == "__main__":
    main()
