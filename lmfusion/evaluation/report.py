"""The human-readable side of an evaluation: sample grids and a Markdown page beside report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.images import save_image_grid

GRID_IMAGES = 32
CAPTION_ROWS = 16


def _enlarge(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscale so 16 px test images are still visible in a page."""
    factor = max(1, min_side // images.shape[-1])
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def write_sample_grids(out_dir: Path, real: torch.Tensor, generated: torch.Tensor) -> dict[str, str]:
    """real.png and generated.png, cell i of both belonging to test caption i."""
    count = min(GRID_IMAGES, real.shape[0], generated.shape[0])
    grids = {"real": "real.png", "generated": "generated.png"}
    save_image_grid(_enlarge(real[:count]), out_dir / grids["real"], nrow=8)
    save_image_grid(_enlarge(generated[:count]), out_dir / grids["generated"], nrow=8)
    return grids


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


def _text_section(text: dict) -> list[str]:
    return [
        "## Text preservation",
        "",
        f"Perplexity on the bundled held-out text ({text['tokens']} tokens) and the largest absolute "
        "difference between the model's and the base LM's logits over the base vocabulary "
        "(0 exactly when the text path is untouched).",
        "",
        *_table(
            ["base ppl", "model ppl", "model ppl incl. BOI/EOI", "max abs logit diff", "identical"],
            [[text["base_ppl"], text["model_ppl"], text["model_ppl_with_image_tokens"], text["max_abs_logit_diff"],
              text["logits_identical"]]],
        ),
        "",
    ]


def _understanding_section(und: dict, captions: Sequence[str], references: Sequence[str]) -> list[str]:
    lines = ["## Image understanding (captioning)", ""]
    header = ["n", "CIDEr (x100)", "blind CIDEr", "distinct captions", "exact match"]
    row = [und["n"], und["cider"], und["blind_cider"], und["distinct_captions"], und["exact_match"]]
    if "scene" in und:
        header += ["shape", "colour", "size", "position", "all correct", "parsed"]
        row += [und["scene"][k] for k in ("shape", "colour", "size", "position", "all_correct", "parsed")]
    blind_note = ("Blind CIDEr: the best single test caption said for every image; a CIDEr at or below it shows no "
                  "use of the image.")
    first_rows = "First test images (same order as `real.png`, left to right, top to bottom):"
    lines += _table(header, [row]) + ["", blind_note, "", first_rows, ""]
    scores = und.get("per_image_cider", [])
    rows = [[i, _escape(r), _escape(c), scores[i] if i < len(scores) else ""]
            for i, (r, c) in enumerate(zip(references[:CAPTION_ROWS], captions[:CAPTION_ROWS]))]
    return lines + _table(["#", "reference", "model caption", "CIDEr"], rows) + [""]


def _generation_section(gen: dict, grids: dict[str, str]) -> list[str]:
    net = gen.get("feature_net", {})
    lines = [
        "## Image generation",
        "",
        "FID uses the penultimate features of the project's shapes classifier (not Inception), "
        f"n = {gen['n']}: compare it only with runs evaluated the same way.",
        "",
    ]
    header, row = ["n", "FID"], [gen["n"], gen["fid"]]
    if "fid_real_vs_real" in gen:
        header.append("FID real vs real (floor)")
        row.append(gen["fid_real_vs_real"])
    lines += _table(header, [row]) + [""]
    if "oracle" in gen:
        keys = ("shape", "colour", "size", "position", "count", "all_correct", "colour_on_white")
        lines += ["Oracle faithfulness (per-attribute accuracy of each image against its prompt's scene):", ""]
        lines += _table(["images", *keys], [["generated", *(gen["oracle"][k] for k in keys)],
                                           ["real (oracle ceiling)", *(gen["oracle_on_real"][k] for k in keys)]])
        lines.append("")
    if "prompt_labels" in gen:
        keys = ("all_labels_correct", "balanced_accuracy")
        lines += ["Prompt labels (the feature net's labels of each image against its prompt's; on a "
                  "class-captioned set, all right = the class is right):", ""]
        lines += _table(["images", *keys], [["generated", *(gen["prompt_labels"][k] for k in keys)],
                                           ["real (net's ceiling)", *(gen["prompt_labels_on_real"][k] for k in keys)]])
        lines.append("")
    if net:
        lines += [f"Feature net: `{net.get('path')}` ({net.get('kind')} labels), test balanced accuracy "
                  f"{_fmt(net.get('balanced_accuracy', float('nan')))}.", ""]
    lines += [f"Generated (`{grids['generated']}`), one per test caption:", "", f"![generated]({grids['generated']})", "",
              f"Real test images for the same captions (`{grids['real']}`):", "", f"![real]({grids['real']})", ""]
    return lines


def write_markdown(path: Path, result: dict, grids: dict[str, str], captions: Sequence[str], references: Sequence[str]) -> None:
    from ..utils import atomic_write_bytes

    settings = result["settings"]
    lines = [
        f"# Evaluation: {result['checkpoint']}",
        "",
        f"mode `{result['mode']}`, base `{result['base_model']}`, data `{result['data']}`, "
        f"{result['parameters']['trainable']:,} trainable of {result['parameters']['total']:,} parameters.",
        f"Settings: n={settings['n']}, {settings['steps']} {result.get('sampler') or settings['scheduler']} steps, guidance scale {settings['guidance_scale']}, "
        f"seed {settings['seed']}. Took {result.get('seconds', '?')} s on {result['machine']['device']}.",
        "",
        *_text_section(result["text"]),
        *_understanding_section(result["understanding"], captions, references),
        *_generation_section(result["generation"], grids),
    ]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
