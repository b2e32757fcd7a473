#!/usr/bin/env python
"""Print a sample grid as rows of coloured-square emoji, for Markdown that holds no image files.

The repository commits no generated images, so the README shows the quickstart's sample grid
this way: each cell of `--cell` x `--cell` pixels becomes the palette square nearest to the mean
colour of its non-white pixels (white when fewer than `--ink` of them are non-white).

    python scripts/grid_as_text.py runs/quickstart/samples/step_000360.png --tile 64 --pad 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Unicode's coloured squares and the RGB each stands for (the shapes palette is six of them).
PALETTE = {
    "⬜": (255, 255, 255), "⬛": (0, 0, 0), "🟥": (215, 25, 25), "🟧": (255, 140, 0), "🟨": (240, 220, 30),
    "🟩": (30, 160, 50), "🟦": (30, 80, 220), "🟪": (140, 50, 170), "🟫": (120, 70, 30),
}
# A cell with ink is never drawn white, so its colour is chosen among the others.
INK_SYMBOLS = [name for name in PALETTE if name != "⬜"]
INK_COLOURS = np.array([PALETTE[name] for name in INK_SYMBOLS], dtype=float)


def cell_symbol(pixels: np.ndarray, ink: float) -> str:
    """The palette square for one cell [h, w, 3] (uint8)."""
    flat = pixels.reshape(-1, 3).astype(float)
    strength = (255 - flat).max(axis=1)  # how far from white
    inked = flat[strength > 40]
    if len(inked) < ink * len(flat):
        return "⬜"
    # The colour of the cell's strongest half, so anti-aliased edges do not tint it towards white.
    mean = inked[np.argsort(strength[strength > 40])[len(inked) // 2:]].mean(axis=0)
    return INK_SYMBOLS[int(np.argmin(((INK_COLOURS - mean) ** 2).sum(axis=1)))]


def mono_symbol(pixels: np.ndarray, ink: float) -> str:
    """White or black by the cell's mean brightness (greyscale images: the palette has no greys)."""
    return "⬜" if pixels.astype(float).mean() >= 128 else "⬛"


def image_as_text(image: np.ndarray, cell: int, ink: float, mono: bool = False) -> list[str]:
    rows = image.shape[0] // cell
    cols = image.shape[1] // cell
    symbol = mono_symbol if mono else cell_symbol
    return ["".join(symbol(image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell], ink) for c in range(cols))
            for r in range(rows)]


def grid_as_text(path: Path, cell: int = 4, ink: float = 0.3, tile: int = 0, pad: int = 0, mono: bool = False) -> str:
    image = np.asarray(Image.open(path).convert("RGB"))
    if not tile:
        return "\n".join(trim(image_as_text(image, cell, ink, mono)))
    tiles = []
    for left in range(pad, image.shape[1] - tile + 1, tile + pad):
        tiles.append(image_as_text(image[pad:pad + tile, left:left + tile], cell, ink, mono))
    return "\n".join(trim(" ".join(parts) for parts in zip(*tiles)))


def trim(lines) -> list[str]:
    """Drop blank (all-white) rows above and below the drawing, keeping one as a margin."""
    lines = list(lines)
    inked = [i for i, line in enumerate(lines) if set(line) - {"⬜", " "}]
    if not inked:
        return lines
    return lines[max(inked[0] - 1, 0):inked[-1] + 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="a PNG, e.g. runs/quickstart/samples/step_000360.png")
    parser.add_argument("--cell", type=int, default=4, help="pixels per square (default 4)")
    parser.add_argument("--ink", type=float, default=0.3, help="share of non-white pixels that colours a cell (default 0.3)")
    parser.add_argument("--tile", type=int, default=0, help="side of each image in the grid, to space them apart (default: none)")
    parser.add_argument("--pad", type=int, default=0, help="padding around each tile in the grid, in pixels (default 0)")
    parser.add_argument("--mono", action="store_true", help="black and white by brightness, for greyscale images")
    args = parser.parse_args()
    if not args.image.is_file():
        print(f"grid_as_text: no such image: {args.image}", file=sys.stderr)
        return 2
    print(grid_as_text(args.image, args.cell, args.ink, args.tile, args.pad, args.mono))
    return 0


if __name__ == "__main__":
    sys.exit(main())
