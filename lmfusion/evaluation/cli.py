"""`lmfusion eval`: text preservation, captioning and generation metrics for one checkpoint;
`lmfusion eval --task edit`: editing success, preservation and L1 on held-out shapes edits;
`lmfusion eval --task chat`: when the model draws (BOI F1, false draws, image counts) on held-out chats.

Arguments are checked before anything loads, so a typo fails in a second. User errors are
ValueError / FileNotFoundError, which the dispatcher prints as one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..diffusion import DEFAULT_IMAGE_GUIDANCE_SCALE
from ..sampling.interleaved import DRAW_DECISIONS
from .chat import ChatEvalSettings
from .edit import EditEvalSettings
from .evaluate import EvalSettings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint (text ppl, CIDEr, FID, oracle)",
        description="Evaluate a checkpoint on held-out text and a caption dataset's test split; "
        "writes report.json, report.md and sample grids.",
    )
    p.add_argument("--checkpoint", required=True, help="model folder, checkpoint folder or training run folder")
    p.add_argument("--task", choices=("caption", "edit", "chat"), default="caption",
                   help="caption: text, captioning and generation metrics (default); edit: editing metrics on "
                        "DATA/test of `lmfusion data shapes-edits`, with the copy and caption-only baselines; chat: "
                        "BOI F1, false draws, image counts and base-identical replies on DATA/test of "
                        "`lmfusion data shapes-chat`")
    p.add_argument("--data", required=True, help="caption dataset (DATA/train + DATA/test, e.g. `lmfusion data shapes`), "
                   "or with --task edit a shapes-edits folder")
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval/STEP, or MODEL-eval)")
    p.add_argument("--n", type=int, default=None,
                   help="test images to caption and captions to generate from (default 64); with --task edit, test "
                        f"triples (default {EditEvalSettings.n}); with --task chat, test turns (default "
                        f"{ChatEvalSettings.n})")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per generated image (default 20; the model's own sampler)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"classifier-free guidance scale; 1 = none (default {EvalSettings.guidance_scale:g}, the paper's "
                        f"FID protocol; {EditEvalSettings.guidance_scale:g} on the instruction with --task edit)")
    p.add_argument("--guidance", dest="guidance_scale", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--image-guidance-scale", type=float, nargs="+", default=[DEFAULT_IMAGE_GUIDANCE_SCALE],
                   help="--task edit: guidance toward the source image, one run per value given (e.g. 1 1.5 to measure "
                        f"what it adds); 1 = none (default {DEFAULT_IMAGE_GUIDANCE_SCALE})")
    p.add_argument("--strength", type=float, default=1.0,
                   help="--task edit: below 1, start every edit from its source noised to this share of the steps "
                        "(SDEdit) instead of pure noise (default 1)")
    p.add_argument("--no-baselines", action="store_true",
                   help="--task edit: skip the copy-the-source and target-caption-alone baselines")
    p.add_argument("--max-new-tokens", type=int, default=ChatEvalSettings.max_new_tokens,
                   help=f"--task chat: tokens per reply (default {ChatEvalSettings.max_new_tokens}, shapes-chat's reply length)")
    p.add_argument("--draw-decision", choices=DRAW_DECISIONS, default=ChatEvalSettings.draw_decision,
                   help="--task chat: greedy replies draw when p(BOI) > 1/2 (mass, default) or when BOI is the "
                        "single most likely token (token, the rule before 2026-12-07)")
    p.add_argument("--no-freeform", action="store_true",
                   help="--task chat: skip the hand-written text questions (lmfusion/evaluation/chat_freeform.txt) "
                        "asked after the test turns")
    p.add_argument("--seed", type=int, default=0, help="seed of generated image i is seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts sampled together (default 16)")
    p.add_argument("--base-model", default=None, help="load the base LM from here instead of the checkpoint's base_model")
    p.add_argument("--feature-cache", default=None, help="folder for the cached FID feature net")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from .evaluate import evaluate_checkpoint

    if args.task == "edit":
        return _run_edit_eval(args)
    if args.task == "chat":
        return _run_chat_eval(args)
    settings = EvalSettings(
        n=64 if args.n is None else args.n, steps=args.steps,
        guidance_scale=EvalSettings.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        seed=args.seed, batch_size=args.batch_size, base_model=args.base_model, feature_cache=args.feature_cache,
    )
    _check_paths_and_threads(args)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.out, settings, device=args.device)
    print(f"[eval] wrote {result['out_dir']}/report.json and report.md in {result['seconds']} s")
    return 0


def _run_edit_eval(args) -> int:
    from .edit import evaluate_edits

    settings = EditEvalSettings(
        n=EditEvalSettings.n if args.n is None else args.n, steps=args.steps,
        guidance_scale=EditEvalSettings.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        image_guidance_scales=list(args.image_guidance_scale), seed=args.seed, batch_size=args.batch_size,
        baselines=not args.no_baselines, base_model=args.base_model, strength=args.strength,
    )
    _check_paths_and_threads(args)
    result = evaluate_edits(args.checkpoint, args.data, args.out, settings, device=args.device)
    print(f"[eval] wrote {result['out_dir']}/report.json and report.md in {result['seconds']} s")
    return 0


def _run_chat_eval(args) -> int:
    from .chat import evaluate_chat

    settings = ChatEvalSettings(
        n=ChatEvalSettings.n if args.n is None else args.n, steps=args.steps,
        guidance_scale=ChatEvalSettings.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        max_new_tokens=args.max_new_tokens, seed=args.seed, base_model=args.base_model, freeform=not args.no_freeform,
        draw_decision=args.draw_decision,
    )
    _check_paths_and_threads(args)
    result = evaluate_chat(args.checkpoint, args.data, args.out, settings, device=args.device)
    print(f"[eval] wrote {result['out_dir']}/report.json and report.md in {result['seconds']} s")
    return 0


def _check_paths_and_threads(args) -> None:
    """The checks every task shares, before anything loads; then the requested torch threads."""
    import torch

    for name in ("checkpoint", "data"):
        if not Path(getattr(args, name)).exists():
            raise FileNotFoundError(f"--{name} not found: {getattr(args, name)}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
