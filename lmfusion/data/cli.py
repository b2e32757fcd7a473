"""`lmfusion data shapes`: the built-in dataset, generated locally so no download is needed."""

from __future__ import annotations

import argparse

from .shapes import generate_shapes_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare datasets")
    kinds = data.add_subparsers(dest="data_command", required=True)
    shapes = kinds.add_parser("shapes", help="generate the procedural shapes dataset (imagefolder layout)")
    shapes.add_argument("--out", required=True, help="output folder (gets train/ and test/)")
    shapes.add_argument("--n", type=int, default=10000, help="number of images")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0, help="scene seed; a seed a run never trained on gives held-out data")
    shapes.add_argument("--test-fraction", type=float, default=0.05, help="share of images written to test/ (default 0.05)")
    shapes.add_argument("--two-object-prob", type=float, default=0.5,
                        help="share of scenes with two objects, the rest have one (default 0.5)")
    shapes.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    shapes.set_defaults(func=_shapes)


def _shapes(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    out = generate_shapes_dataset(
        args.out, args.n, size=args.size, seed=args.seed, split=True,
        test_fraction=args.test_fraction, overwrite=args.overwrite, two_object_prob=args.two_object_prob,
    )
    print(f"wrote {args.n} shapes images to {out}")
    return 0
