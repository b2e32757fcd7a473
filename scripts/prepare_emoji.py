#!/usr/bin/env python
"""Turn Google's emoji set (npm package ``emoji-datasource-google``) into image-caption pairs.

Each emoji's Unicode name, lower-cased ("grinning face", "crown"), is its caption; the
64 px RGBA PNG is composited on white and written as an HF ``imagefolder``.  Without
``--package-dir`` the package is fetched with ``npm pack`` (needs npm and the npm
registry) into a temporary folder.

    python scripts/prepare_emoji.py --out /tmp/emoji
    python scripts/prepare_emoji.py --out /tmp/emoji --package-dir ./node_modules/emoji-datasource-google
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

try:
    import lmfusion  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmfusion.data import BadImageError, ImageFolderWriter, load_rgb_pil  # noqa: E402

PACKAGE = "emoji-datasource-google"
IMAGE_SUBDIR = "img/google/64"


def fetch_package(workdir: Path) -> Path:
    """``npm pack`` the package into ``workdir`` and unpack only emoji.json and the 64 px PNGs."""
    if shutil.which("npm") is None:
        raise RuntimeError("npm not found: install Node.js/npm, or pass --package-dir")
    result = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir,
                            capture_output=True, text=True, check=False)
    tarballs = sorted(workdir.glob(f"{PACKAGE}-*.tgz"))
    if result.returncode != 0 or not tarballs:
        raise RuntimeError(f"npm pack {PACKAGE} failed: {result.stderr.strip()}")
    wanted = ("package/emoji.json", f"package/{IMAGE_SUBDIR}/")
    with tarfile.open(tarballs[-1], "r:gz") as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(wanted)]
        archive.extractall(workdir, members=members, filter="data")
    return workdir / "package"


def resolve_package_dir(path: Path) -> Path:
    """Accept the package root itself or a folder holding ``package/`` (an unpacked tarball)."""
    for candidate in (path, path / "package"):
        if (candidate / "emoji.json").is_file():
            return candidate
    raise FileNotFoundError(f"no emoji.json in {path} or {path / 'package'}")


def caption_of(entry: dict) -> str:
    """Lower-cased Unicode name, falling back to the short name ("thumbsup" style)."""
    name = (entry.get("name") or "").strip()
    if not name:
        name = (entry.get("short_name") or "").replace("_", " ").replace("-", " ").strip()
    return name.lower()


def select_entries(entries: list[dict], n: int | None, seed: int) -> list[dict]:
    """Emoji with a Google image, in Unicode sort order; ``n`` of them sampled by ``seed``."""
    usable = [e for e in entries if e.get("has_img_google") and e.get("image") and caption_of(e)]
    usable.sort(key=lambda entry: entry.get("sort_order", 0))
    if n is not None and n < len(usable):
        keep = set(random.Random(seed).sample(range(len(usable)), n))
        usable = [entry for index, entry in enumerate(usable) if index in keep]
    return usable


def write_dataset(package: Path, args: argparse.Namespace) -> tuple[int, int]:
    entries = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    chosen = select_entries(entries, args.n, args.seed)
    skipped = 0
    with ImageFolderWriter(args.out, overwrite=args.overwrite) as writer:
        for entry in tqdm(chosen, desc="emoji", unit="img"):
            try:
                picture = load_rgb_pil(package / IMAGE_SUBDIR / entry["image"], args.size)
            except BadImageError as error:
                print(f"skipping: {error}", file=sys.stderr)
                skipped += 1
                continue
            writer.add(picture, caption_of(entry), unified=entry.get("unified"),
                       short_name=entry.get("short_name"), category=entry.get("category"))
    return writer.counts[""], skipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n", type=int, default=None, help="number of emoji (default: all)")
    parser.add_argument("--package-dir", type=Path, default=None,
                        help=f"an unpacked {PACKAGE} (skips npm pack)")
    parser.add_argument("--size", type=int, default=64, help="output side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="which --n emoji are sampled")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="emoji-npm-") as workdir:
            if args.package_dir is not None:
                package = resolve_package_dir(args.package_dir)
            else:
                package = fetch_package(Path(workdir))
            written, skipped = write_dataset(package, args)
    except (FileExistsError, FileNotFoundError, RuntimeError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({written} images, {skipped} skipped) "
          f"in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
