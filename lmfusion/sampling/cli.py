"""`lmfusion generate | edit | caption | chat`.

Arguments are checked before the model loads, so a bad guidance scale or a missing image fails
in a second, not after a checkpoint load. Every user error is a ValueError / FileNotFoundError,
which the dispatcher prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

from ..utils import atomic_write_bytes

from ..diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, SAMPLER_NAMES as SCHEDULERS
from ..data.shapes_chat import render_user_turn


def register(subparsers) -> None:
    _add_generate(subparsers)
    _add_edit(subparsers)
    _add_caption(subparsers)
    _add_chat(subparsers)


def _add_model_args(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model folder, or a training run folder (its latest model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: image k of a prompt uses seed + k (default 0)")


def _add_diffusion_args(parser) -> None:
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    add_guidance_scale_argument(parser)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                        help="sampler (default: the model's: euler for flow models, ddim for eps/v models)")


def add_guidance_scale_argument(parser, help: str = "classifier-free guidance scale; 1 = none") -> None:
    """`--guidance-scale` (args.guidance_scale; None when not given: the model's own default), plus the
    old spelling `--guidance` as a hidden alias."""
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help=f"{help} (default: the model's own, saved with it by its preset, e.g. the quickstart's 5; "
                             f"{DEFAULT_GUIDANCE_SCALE} for a model that saved none)")
    # Kept so that scripts written for earlier versions still run; SUPPRESS leaves the default to the flag above.
    parser.add_argument("--guidance", dest="guidance_scale", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_decoding_args(parser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"most tokens generated per reply (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0 (default 1.0)")


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text-to-image", description="Generate images from a text prompt.")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to draw")
    p.add_argument("--out", required=True, help="image file (.png, .jpg, ...)")
    p.add_argument("--n", type=int, default=1, help="images; n > 1 writes one grid to --out unless --separate")
    p.add_argument("--separate", action="store_true", help="with --n > 1: numbered files OUT_1.png ... instead of a grid")
    p.add_argument("--unconditional", action="store_true", help="allow an empty prompt (unconditional sample)")
    _add_diffusion_args(p)
    p.set_defaults(func=run_generate)


def _add_edit(subparsers) -> None:
    p = subparsers.add_parser("edit", help="edit an image by an instruction",
                              description="Edit an image as an instruction says (InstructPix2Pix-style guidance).")
    _add_model_args(p)
    p.add_argument("--image", required=True, help="the image to edit")
    p.add_argument("--prompt", required=True, help="the edit instruction, e.g. 'make it blue'")
    p.add_argument("--out", required=True, help="image file (.png, .jpg, ...)")
    p.add_argument("--n", type=int, default=1, help="edits; n > 1 writes one grid to --out")
    p.add_argument("--image-guidance-scale", type=float, default=None,
                   help="guidance toward the source image; above 1 preserves more of it, 1 = none (default: the "
                        "model's own, saved with it by its preset, e.g. the edit preset's 2.5; "
                        f"{DEFAULT_IMAGE_GUIDANCE_SCALE} for a model that saved none)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="in (0, 1]: below 1, start from the source noised to this share of the steps and run only "
                        "those (SDEdit, as diffusers' img2img strength); keeps more of the source's layout. "
                        "1 = from pure noise (default)")
    _add_diffusion_args(p)
    p.set_defaults(func=run_edit)


def _add_caption(subparsers) -> None:
    p = subparsers.add_parser(
        "caption", help="describe images, or answer a question about them (VLM base)",
        description="Caption one or more images. With a VLM base (llavafusion) the VLM itself reads them, "
                    "and --question asks it something else.",
    )
    _add_model_args(p)
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--question", default=None,
                   help="what to ask about each image (VLM base only; default: a caption, "
                        "the VLM asked 'Describe the image.')")
    _add_decoding_args(p, 32)
    p.set_defaults(func=run_caption)


def _add_chat(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="interleaved text and images",
        description="Generate text and images; without --prompt, read one prompt per line from stdin.",
    )
    _add_model_args(p)
    p.add_argument("--prompt", default=None, help="one prompt (default: interactive, lines from stdin)")
    p.add_argument("--image", nargs="+", default=None,
                   help="image file(s) the prompts are about: a VLM base (llavafusion) answers each prompt "
                        "about them through its own understanding path")
    p.add_argument("--out", required=True, help="folder for chat.md and its images")
    p.add_argument("--max-images", type=int, default=4, help="images per reply at most")
    p.add_argument("--chat-template", action="store_true",
                   help="send each prompt as a user turn in the base's chat template, as `task: chat` trains (use it "
                        "with a chat-trained model such as the instruct preset's); each prompt is then its own "
                        "one-turn conversation")
    _add_decoding_args(p, 256)
    _add_diffusion_args(p)
    p.set_defaults(func=run_chat)


# ---------------------------------------------------------------------- commands
def run_generate(args) -> int:
    from .image import check_sampling_args

    check_sampling_args(args.steps, args.guidance_scale, args.n, args.scheduler)
    if not args.prompt.strip() and not args.unconditional:
        raise ValueError("prompt is empty (use --unconditional for an unconditional sample)")
    out = Path(args.out)
    image_format = _image_format(out)
    pipe = _load(args)
    images = pipe.generate_image(
        args.prompt, args.steps, args.guidance_scale, args.seed, args.scheduler, args.n,
        allow_empty=args.unconditional, output="tensor",
    )
    if args.n > 1 and args.separate:
        paths = [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(1, args.n + 1)]
        for path, image in zip(paths, images):
            _save(image, path, image_format)
    else:
        from ..data.images import make_grid

        grid = images[0] if args.n == 1 else make_grid(images, nrow=math.ceil(math.sqrt(args.n)))
        paths = [out]
        _save(grid, out, image_format)
    for path in paths:
        print(path)
    return 0


def run_edit(args) -> int:
    from ..data.images import verify_image
    from .edit import check_edit_args

    check_edit_args(args.steps, args.guidance_scale, args.image_guidance_scale, args.n, args.scheduler,
                    strength=args.strength)
    if not args.prompt.strip():
        raise ValueError("prompt is empty: say what to change, e.g. 'make it blue'")
    verify_image(args.image)  # raises BadImageError (a ValueError) naming the file
    out = Path(args.out)
    image_format = _image_format(out)
    pipe = _load(args)
    images = pipe.edit(args.image, args.prompt, args.guidance_scale, args.image_guidance_scale, args.steps,
                       args.seed, args.scheduler, args.n, output="tensor", strength=args.strength)
    from ..data.images import make_grid

    _save(images[0] if args.n == 1 else make_grid(images, nrow=math.ceil(math.sqrt(args.n))), out, image_format)
    print(out)
    return 0


def run_caption(args) -> int:
    from ..data.images import verify_image
    from .text import TokenPicker

    TokenPicker(args.temperature, args.top_p)  # validates before the model loads
    for path in args.image:
        verify_image(path)  # raises BadImageError (a ValueError) naming the file
    if args.question is not None and not args.question.strip():
        raise ValueError("--question is empty")
    pipe = _load(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.question is not None:
        _require_vlm(pipe, "--question")
        texts = pipe.answer(list(args.image), args.question, **options)
    else:
        texts = pipe.caption(list(args.image), **options)
    for path, text in zip(args.image, texts):
        print(text if len(args.image) == 1 else f"{path}\t{text}")
    return 0


def run_chat(args) -> int:
    from .interleaved import MarkdownTranscript

    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("prompt is empty")
    if args.image:
        return _chat_about_images(args)
    transcript = MarkdownTranscript(args.out)
    pipe = _load(args)

    def new_session():
        return pipe.chat(
            max_new_tokens=args.max_new_tokens, max_images=args.max_images, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
            scheduler=args.scheduler,
        )

    session = new_session()
    prompts = [args.prompt] if args.prompt is not None else _stdin_prompts()
    for prompt in prompts:
        if args.chat_template:  # a rendered turn opens the template's conversation: one session per turn
            session = new_session()
            parts = session.send(render_user_turn(pipe.model.tokenizer, prompt))
        else:
            parts = session.send(prompt)
        saved = transcript.add_turn(prompt, parts)
        reply = "".join(p if isinstance(p, str) else f"[image {saved.pop(0)}]" for p in parts)
        print(reply, flush=True)
    print(f"transcript: {transcript.path}", file=sys.stderr)
    return 0


def _chat_about_images(args) -> int:
    """Each prompt answered by the VLM base about all of --image, in one prompt (also in OUT/chat.md)."""
    from ..data.images import verify_image
    from .understanding import answer

    for path in args.image:
        verify_image(path)
    pipe = _load(args)
    _require_vlm(pipe, "--image")
    lines = [f"images: {', '.join(args.image)}", ""]
    for prompt in [args.prompt] if args.prompt is not None else _stdin_prompts():
        reply = answer(pipe.model, list(args.image), prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        print(reply, flush=True)
        lines += [f"**user:** {prompt}", "", f"**assistant:** {reply}", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "chat.md", "\n".join(lines).encode())
    print(f"transcript: {out / 'chat.md'}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- helpers
def _require_vlm(pipe, flag: str) -> None:
    if not pipe.model.is_vlm:
        raise ValueError(f"{flag} needs a checkpoint whose base is a VLM (e.g. the llavafusion preset); this "
                         "one's base is a text LM, which cannot read a question about an image: use lmfusion caption")


def _load(args):
    from .pipeline import LMFusionPipeline

    return LMFusionPipeline.from_pretrained(args.checkpoint, args.device)


def _stdin_prompts():
    """Non-empty lines from stdin, with a prompt marker when a person is typing."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _image_format(path: Path) -> str:
    from PIL import Image

    formats = Image.registered_extensions()
    if path.suffix.lower() not in formats:
        raise ValueError(f"--out {path}: unknown image extension {path.suffix!r} (use .png or .jpg)")
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder; give an image file name")
    return formats[path.suffix.lower()]


def _save(image, path: Path, image_format: str) -> None:
    from ..data.images import to_pil

    buffer = io.BytesIO()
    to_pil(image).save(buffer, format=image_format)
    atomic_write_bytes(path, buffer.getvalue())
