#!/usr/bin/env python
"""Turn Fashion-MNIST into a small image-caption dataset ("a photo of a sneaker").

Reads the gzipped IDX files shipped by the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``) and writes an HF ``imagefolder``
(PNGs + metadata.jsonl) that :func:`lmfusion.data.open_caption_dataset` reads.
The 28 px greyscale images are upscaled (bicubic) to ``--size`` RGB.

    python scripts/prepare_fashion_mnist.py --out /tmp/fashion --n 6000 --split
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

try:
    import lmfusion  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmfusion.data import ImageFolderWriter, load_rgb_pil  # noqa: E402

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Label order of Fashion-MNIST; phrased so that "a photo of {name}" reads naturally.
CLASS_PHRASES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                 "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, dims..., then uint8 data)."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(source: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28]`` and labels ``[N]`` of ``train`` or ``t10k``."""
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    if len(images) != len(labels):
        raise ValueError(f"{source}/{prefix}: {len(images)} images but {len(labels)} labels")
    return images, labels


def write_split(writer: ImageFolderWriter, images: np.ndarray, labels: np.ndarray, n: int,
                split: str, size: int, invert: bool) -> None:
    for index in tqdm(range(min(n, len(images))), desc=split or "images", unit="img"):
        picture = Image.fromarray(images[index], mode="L")
        if invert:  # dark garment on white, closer to a product photo
            picture = ImageOps.invert(picture)
        label = int(labels[index])
        writer.add(load_rgb_pil(picture, size), f"a photo of {CLASS_PHRASES[label]}",
                   split=split, label=label, class_name=CLASS_NAMES[label], source_index=index)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n", type=int, default=60000, help="training images (first N)")
    parser.add_argument("--split", action="store_true",
                        help="write train/ and test/ (test from the official t10k files)")
    parser.add_argument("--n-test", type=int, default=None,
                        help="test images with --split (default: n/6, at most 10000)")
    parser.add_argument("--size", type=int, default=64, help="output side in pixels")
    parser.add_argument("--invert", action="store_true", help="dark garments on white")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="folder with the *-idx?-ubyte.gz files")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.source / "train-images-idx3-ubyte.gz").is_file():
        print(f"Fashion-MNIST not found in {args.source}. Install it with\n"
              "    sudo apt-get install dataset-fashion-mnist\n"
              "or pass --source DIR with the four *-ubyte.gz files.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        writer = ImageFolderWriter(args.out, overwrite=args.overwrite)
    except FileExistsError as error:
        print(error, file=sys.stderr)
        return 1
    with writer:
        images, labels = load_split(args.source, "train")
        write_split(writer, images, labels, args.n, "train" if args.split else "",
                    args.size, args.invert)
        if args.split:
            n_test = args.n_test if args.n_test is not None else min(10000, max(1, -(-args.n // 6)))
            images, labels = load_split(args.source, "t10k")
            write_split(writer, images, labels, n_test, "test", args.size, args.invert)
    counts = ", ".join(f"{split or 'all'}={count}" for split, count in writer.counts.items())
    print(f"wrote {args.out} ({counts}) in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
