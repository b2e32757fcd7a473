"""`lmfusion data shapes`: the built-in dataset, generated locally so no download is needed.
`lmfusion data shapes-edits`: (source, instruction, target) editing triples from the same renderer.
`lmfusion data shapes-chat`: conversations that draw one or two images, or answer in the base's own words.
`lmfusion data encode`: any caption source -> latent shards that training streams from."""

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

    edits = kinds.add_parser("shapes-edits", help="generate shapes editing triples (edits.jsonl + images, train/ and test/)")
    edits.add_argument("--out", required=True, help="output folder (gets train/ and test/, each an edits.jsonl and images/)")
    edits.add_argument("--count", type=int, default=8000, help="number of triples, all edit types in turn (default 8000)")
    edits.add_argument("--seed", type=int, default=0, help="scene seed; a seed a run never trained on gives held-out data")
    edits.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    edits.add_argument("--test-fraction", type=float, default=0.1,
                       help="share written to test/, with held-out phrasings and edit results (default 0.1)")
    edits.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    edits.set_defaults(func=_shapes_edits)

    chat = kinds.add_parser("shapes-chat", help="generate shapes chat conversations (chat.jsonl + images, train/ "
                            "and test/); text replies are the base model's own greedy ones, computed once here")
    chat.add_argument("--out", required=True, help="output folder (gets train/ and test/, each a chat.jsonl and images/)")
    chat.add_argument("--count", type=int, default=3000,
                      help="conversations: one-image, two-image and text-only in turn (default 3000)")
    chat.add_argument("--seed", type=int, default=0, help="scene seed; a seed a run never trained on gives held-out data")
    chat.add_argument("--base-model", default="smollm2-135m",
                      help="the base LM whose chat template renders the user turn and whose greedy replies are stored "
                           "(use the base the model will train on; default smollm2-135m)")
    chat.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    chat.add_argument("--test-fraction", type=float, default=0.1,
                      help="share written to test/, with unseen phrasings, paraphrases and questions (default 0.1)")
    chat.add_argument("--reply-tokens", type=int, default=48, help="most tokens of a stored base reply (default 48)")
    chat.add_argument("--lead-in-tokens", type=int, default=0,
                      help="most tokens of the base's own greedy opening kept before an image (default 0: BOI is the "
                           "reply's first token)")
    chat.add_argument("--device", default="cpu", help="device the base model generates its replies on, e.g. cuda "
                      "(default cpu)")
    chat.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    chat.set_defaults(func=_shapes_chat)

    encode = kinds.add_parser("encode", help="encode a caption dataset into latent shards (resumable)")
    encode.add_argument("--data", required=True, help="source: image folder, WebDataset shards or HF dataset on disk")
    encode.add_argument("--out", required=True, help="output folder of shard-*.safetensors and index.json; "
                        "rerun with the same flags to resume an interrupted encode")
    encode.add_argument("--codec", default="{name: pixel}",
                        help="codec as a YAML mapping, as `lmfusion train --codec` (default: '{name: pixel}')")
    encode.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    encode.add_argument("--shard-size", type=int, default=10000, help="records per shard (default 10000)")
    encode.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="stored latent dtype (default fp16)")
    encode.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2; 0 = none)")
    encode.add_argument("--batch-size", type=int, default=64, help="images per codec call (default 64)")
    encode.add_argument("--flip", action="store_true", help="also store the latents of horizontally flipped images")
    encode.add_argument("--device", default="cpu", help="device the codec runs on, e.g. cuda (default cpu)")
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")
    encode.set_defaults(func=_encode)


def _shapes(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    out = generate_shapes_dataset(
        args.out, args.n, size=args.size, seed=args.seed, split=True,
        test_fraction=args.test_fraction, overwrite=args.overwrite, two_object_prob=args.two_object_prob,
    )
    print(f"wrote {args.n} shapes images to {out}")
    return 0


def _shapes_edits(args: argparse.Namespace) -> int:
    from .shapes_edits import generate_shapes_edits

    out = generate_shapes_edits(args.out, args.count, size=args.size, seed=args.seed,
                                test_fraction=args.test_fraction, overwrite=args.overwrite)
    print(f"wrote {args.count} shapes edits to {out}")
    return 0


def _shapes_chat(args: argparse.Namespace) -> int:
    from .shapes_chat import generate_shapes_chat

    out = generate_shapes_chat(args.out, args.count, base_model=args.base_model, size=args.size, seed=args.seed,
                               test_fraction=args.test_fraction, reply_tokens=args.reply_tokens,
                               lead_in_tokens=args.lead_in_tokens, overwrite=args.overwrite, device=args.device)
    print(f"wrote {args.count} shapes chats to {out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    import yaml

    from ..codecs import load_codec
    from .encode_shards import encode_to_shards

    codec = yaml.safe_load(args.codec) if isinstance(args.codec, str) else args.codec
    if not isinstance(codec, dict) or "name" not in codec:
        raise ValueError(f"--codec must be a mapping with a 'name', got {args.codec!r}")
    shards = encode_to_shards(args.data, args.out, load_codec(**codec), args.image_size, shard_size=args.shard_size,
                              dtype=args.dtype, workers=args.workers, flip=args.flip, device=args.device,
                              batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {len(shards)} records in {len(shards.index['shards'])} shards to {args.out}; {shards.stats_summary()}")
    return 0
