"""Training-data loading beside a stand-in accelerator step.

    python benchmarks/data_loading.py [--step-seconds 0.3] [--batch-size 4] [--resolution 512]
                                      [--steps 8] [--workdir /tmp/sdjax-data-bench]

Writes 16 photo-sized (4000x3000) JPEGs with captions in the training-folder layout (once, into
WORKDIR), then times ``--steps`` batches of ``sdjax.training.data.iterate_batches`` at RESOLUTION,
each followed by ``time.sleep(STEP_SECONDS)``: a stand-in for a training step on an accelerator,
which leaves the CPUs free for decoding as a real one does. It prints the mean wall time per step
(the first batch, loaded before the timing, is not counted). A loader that keeps up with the
accelerator gives STEP_SECONDS; one that does not gives STEP_SECONDS plus its own time.

To compare with another sdjax checkout, run this file with ``PYTHONPATH=/path/to/that/checkout``.
Needs only sdjax's own dependencies (numpy, Pillow).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import sdjax
from sdjax.training.data import iterate_batches, load_captioned_images, write_captioned_folder


def photos(root: Path, count: int = 16) -> Path:
    """``count`` 4000x3000 JPEGs (smooth colour waves with noise, like a photo's detail)."""
    if (root / "image_captions.csv").is_file():
        return root
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:3000, 0:4000]
    base_HWC = np.stack([(np.sin(x / 50) + 1) * 120, (np.cos(y / 70) + 1) * 120, (x + y) % 256], -1).astype(np.uint8)
    items = [(base_HWC + rng.integers(0, 10, base_HWC.shape, dtype=np.uint8), f"photo {i}") for i in range(count)]
    return write_captioned_folder(root, items, image_format="jpeg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-seconds", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdjax-data-bench"))
    args = parser.parse_args()
    dataset = load_captioned_images(photos(args.workdir / "photos"))
    with iterate_batches(dataset, resolution=args.resolution, batch_size_per_process=args.batch_size) as batches:
        next(batches)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
            time.sleep(args.step_seconds)
        per_step = (time.perf_counter() - start) / args.steps
    print(f"sdjax at {Path(sdjax.__file__).parent.parent}: {per_step:.3f} s per step of {args.batch_size} "
          f"4000x3000 JPEGs at {args.resolution} px (stand-in step {args.step_seconds} s)")


if __name__ == "__main__":
    main()
