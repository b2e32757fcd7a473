"""Shapes chat conversations: a user turn, then an assistant turn that draws (or does not).

Three kinds of example, in turn (index % 3):

    draw       "Draw a small red circle."                 -> (lead-in), [image]
    draw_edit  "Draw a small red circle, then make it blue." -> (lead-in), [image], [edited image]
    text       "How many sides does a triangle have?"     -> the BASE model's own greedy reply

The second image of a draw_edit is the first one edited by the shapes-edits proposer, re-rendered
from the edited records, so both images have exact object records for the shapes oracle.

Why the lead-in and the text replies come from the base model itself: the base vocabulary's
logits are frozen, so a trained model's greedy text before its first image is whatever the base
says. A lead-in written by hand ("Here is a small red circle:") would put BOI after text the model
never produces at inference. A lead-in is therefore the base's own greedy opening of its reply
(cut at the first line break or sentence end, at most `lead_in_tokens` tokens), and BOI is trained
at the position where inference will actually be. The default is no lead-in (0: BOI is the reply's
first token, the decision made right after the request): SmolLM2-135M-Instruct's openings are often
no lead-in at all ("Sketch a small red square at the top." -> "The sky is a canvas of endless
possibilities."), and each costs a base generation per drawing request.

The test split holds drawing requests in training phrasings (new scenes), in unseen phrasings
(the training verbs in new frames) and in unseen paraphrases (wording training never uses), and
text questions from templates training never shows. Layout: train/ and test/, each a chat.jsonl
and images/; chat_meta.json names the base model the replies came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .shapes import COLOURS, SHAPES, caption_for, render_scene, sample_scene
from .shapes_edits import HELDOUT_PHRASES, PHRASES, propose_edit
from .split_writer import check_split_args, write_splits

CHAT_FILE = "chat.jsonl"
META_FILE = "chat_meta.json"
KINDS = ("draw", "draw_edit", "text")
PHRASINGS = ("seen", "unseen_phrasing", "unseen_paraphrase")
CHAT_EDIT_TYPES = ("recolour", "resize", "move", "reshape")  # edits of a one-object picture
_CHAT_SALT = 0xC4A7

DRAW_PHRASES = {
    "seen": ["Draw {c}.", "Please draw {c}.", "Can you draw {c}?", "Make a picture of {c}.", "Show me {c}.",
             "Draw me {c}."],
    # the training verbs (draw, picture, show) in frames training never shows
    "unseen_phrasing": ["I want you to draw {c}.", "Could you please make a picture of {c}?", "Please show me {c} now.",
                        "Now draw {c} for me."],
    # wording training never uses
    "unseen_paraphrase": ["Sketch {c}.", "Illustrate {c} for me.", "I'd love to see an image of {c}.", "Paint {c}."],
}
# Text questions, many about the same shapes and colours, so that "mentions a red circle" is not
# enough to decide to draw. Test questions come from templates training never shows. None of them
# writes a question of the hand-written held-out set, lmfusion/evaluation/chat_freeform.txt (tested).
TEXT_QUESTIONS = {
    "train": ["How many sides does a {shape} have?", "What is a {shape}?", "Name a fruit that is {colour}.",
              "Why is the sky blue?", "What colour do you get by mixing {colour} and white?",
              "Describe a {colour} {shape} in one sentence.", "Is a {shape} a polygon?",
              "Tell me a short fact about the colour {colour}.", "What is the capital of France?",
              "Write a short poem about the sea."],
    "test": ["Explain what makes a {shape} different from other shapes.", "Which things in nature are {colour}?",
             "What does the word {shape} mean?", "How do you say {colour} in French?",
             "Give me a tip for learning maths."],
}


def render_user_turn(tokenizer, user: str) -> str:
    """The prompt text before the assistant's reply: the base's chat template with its generation
    prompt (as the server renders a chat, lmfusion.serving.engine.render_chat), or without a
    template the user's text exactly as written."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return user


def user_turn_ids(tokenizer, user: str) -> list[int]:
    """The rendered user turn as ids; no special tokens added (the template writes its own), as
    training and the interleaved sampler tokenise."""
    return list(tokenizer(render_user_turn(tokenizer, user), add_special_tokens=False).input_ids)


class BaseReplies:
    """The base LM's greedy replies, computed once per distinct prompt (greedy: deterministic)."""

    def __init__(self, text_model, tokenizer, reply_tokens: int, lead_in_tokens: int):
        self.model, self.tokenizer = text_model, tokenizer
        self.reply_tokens, self.lead_in_tokens = reply_tokens, lead_in_tokens
        self.cache: dict[tuple[str, int], tuple[list[int], bool]] = {}
        eos = text_model.generation_config.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None and not self.eos:
            self.eos = {tokenizer.eos_token_id}

    @torch.no_grad()
    def greedy(self, user: str, max_new_tokens: int) -> tuple[list[int], bool]:
        """(new ids without the stop id, whether the base stopped by itself)."""
        key = (user, max_new_tokens)
        if key not in self.cache:
            ids = torch.tensor([user_turn_ids(self.tokenizer, user)], device=self.model.device)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos, default=0)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad)[0, ids.shape[1]:].tolist()
            stopped = bool(out) and out[-1] in self.eos
            self.cache[key] = (out[:-1] if stopped else out, stopped)
        return self.cache[key]

    def reply(self, user: str) -> tuple[str, bool]:
        ids, stopped = self.greedy(user, self.reply_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True), stopped

    def lead_in(self, user: str) -> str:
        """The base's own opening of its reply, up to the first line break or sentence end."""
        if self.lead_in_tokens == 0:
            return ""
        ids, _ = self.greedy(user, self.lead_in_tokens)
        kept = []
        for token in ids:
            piece = self.tokenizer.decode([token], skip_special_tokens=True)
            if "\n" in piece:
                break
            kept.append(token)
            if piece.rstrip().endswith((".", "!", ":")):
                break
        return self.tokenizer.decode(kept, skip_special_tokens=True)


def _one_object_edit(rng: np.random.Generator) -> tuple[list[dict], list[dict], str, str]:
    kind = CHAT_EDIT_TYPES[int(rng.integers(len(CHAT_EDIT_TYPES)))]
    while True:
        proposal = propose_edit(kind, rng)
        if proposal is not None and len(proposal[0]) == 1:
            source, target, _, value = proposal
            return source, target, kind, value


def make_request(seed: int, index: int, heldout: bool) -> dict[str, Any]:
    """Row `index` without its reply: kind, user text, phrasing group, object records per image."""
    kind = KINDS[index % len(KINDS)]
    rng = np.random.default_rng([seed, _CHAT_SALT, index])
    row: dict[str, Any] = {"index": index, "kind": kind}
    if kind == "text":
        template = TEXT_QUESTIONS["test" if heldout else "train"]
        question = template[int(rng.integers(len(template)))]
        shape, colour = list(SHAPES)[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
        return {**row, "user": question.format(shape=shape, colour=colour), "phrasing": "unseen" if heldout else "seen",
                "objects": []}
    phrasing = PHRASINGS[int(rng.integers(len(PHRASINGS)))] if heldout else "seen"
    template = DRAW_PHRASES[phrasing][int(rng.integers(len(DRAW_PHRASES[phrasing])))]
    if kind == "draw":
        objects, _ = sample_scene(rng, 0.0)
        return {**row, "user": template.format(c=caption_for(objects)), "phrasing": phrasing, "objects": [objects]}
    source, target, edit_type, value = _one_object_edit(rng)
    edits = (HELDOUT_PHRASES if phrasing != "seen" else PHRASES)[edit_type]
    edit = edits[int(rng.integers(len(edits)))].format(ref="it", value=value)
    user = template.format(c=f"{caption_for(source)}, then {edit}")
    return {**row, "user": user, "phrasing": phrasing, "objects": [source, target], "edit_type": edit_type}


def generate_shapes_chat(out_dir: str | os.PathLike, count: int, base_model: str = "smollm2-135m", size: int = 64,
                         seed: int = 0, test_fraction: float = 0.1, reply_tokens: int = 48, lead_in_tokens: int = 0,
                         progress: bool = True, overwrite: bool = False, device: str = "cpu") -> Path:
    """Write `count` conversations (the last round(count * test_fraction) form test/), with the
    base model's greedy replies and lead-ins computed once here. Published whole, as shapes-edits."""
    from ..base_models import load_text_model  # loads torch weights: only when generating

    if reply_tokens < 1 or lead_in_tokens < 0:
        raise ValueError(f"reply_tokens must be >= 1 and lead_in_tokens >= 0, got {reply_tokens} and {lead_in_tokens}")
    out = check_split_args(count, test_fraction, out_dir, overwrite)
    text_model, tokenizer = load_text_model(base_model)
    replies = BaseReplies(text_model.to(device).eval(), tokenizer, reply_tokens, lead_in_tokens)

    def write_row(index: int, split: str, folder: Path) -> dict:
        row = make_request(seed, index, heldout=split == "test")
        if row["kind"] == "text":
            row["reply"], row["reply_stopped"] = replies.reply(row["user"])
            row["lead_in"], row["images"] = "", []
        else:
            row["lead_in"], row["images"] = replies.lead_in(row["user"]), []
            for k, objects in enumerate(row["objects"]):
                name = f"images/{index:06d}_{k}.png"
                render_scene(objects, size).save(folder / name, format="PNG")
                row["images"].append(name)
        return row

    meta = {"base_model": base_model, "reply_tokens": reply_tokens, "lead_in_tokens": lead_in_tokens,
            "seed": seed, "count": count, "image_size": size}
    return write_splits(out, count, test_fraction, CHAT_FILE, write_row, desc="shapes chat", unit="chat",
                        progress=progress, extra_files={META_FILE: json.dumps(meta, indent=1) + "\n"})


def find_chat_file(data: str | os.PathLike, split: str = "train") -> Path | None:
    """DATA/<split>/chat.jsonl, else DATA/chat.jsonl; None when neither exists."""
    for path in (Path(data) / split / CHAT_FILE, Path(data) / CHAT_FILE):
        if path.is_file():
            return path
    return None


def read_chat_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a chat.jsonl; a malformed line is a ValueError naming its line number."""
    rows = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if row.get("kind") not in KINDS or not isinstance(row.get("user"), str):
                raise ValueError(f"{path}:{number}: a chat row needs kind in {KINDS} and a user text")
            if row["kind"] != "text" and len(row.get("images", [])) != (1 if row["kind"] == "draw" else 2):
                raise ValueError(f"{path}:{number}: a {row['kind']} row needs {1 if row['kind'] == 'draw' else 2} images")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no chat rows")
    return rows
