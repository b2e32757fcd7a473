"""Tables for the paper replication: our Table 1, the §5.1 ablation and a claim-by-claim check.

Used by benchmarks/paper_replication.py; kept here so the benchmark script stays a driver.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ..utils import atomic_write_bytes
from .understanding import blind_cider

# Every table asks for each run's metrics, and the runs share one test set: score its blind
# captioner once (64 CIDEr passes over 64 captions), not once per table cell.
_blind_cider = functools.lru_cache(maxsize=8)(blind_cider)

LABELS = {
    "scratch": "Transfusion-style (from scratch)",
    "dense": "Dense fine-tune (no separation)",
    "ffn_only": "FFN-only (shallow separation)",
    "lmfusion": "LMFusion (deep separation)",
}
TEXT_LR_RATIO = {"lmfusion": "0", "ffn_only": "0", "dense": "1", "scratch": "1 (random init)"}


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.{digits}e}" if abs(value) >= 1e5 or abs(value) < 1e-3 else f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _metrics(run: dict) -> dict[str, Any]:
    ev = run["eval"]
    gen, und, text = ev["generation"], ev["understanding"], ev["text"]
    oracle = gen.get("oracle", {})
    captions = [s["caption"] for s in und.get("samples", [])]
    references = [s["reference"] for s in und.get("samples", [])]
    return {
        "distinct": len(set(captions)) if captions else None,
        "blind_cider": _blind_cider(tuple(references)) if references else None,
        "ppl": text["model_ppl"], "base_ppl": text["base_ppl"], "dlogit": text["max_abs_logit_diff"],
        "cider": und["cider"], "exact": und["exact_match"], "scene_all": und.get("scene", {}).get("all_correct"),
        "fid": gen["fid"], "fid_floor": gen.get("fid_real_vs_real"), "oracle": oracle,
        "oracle_all": oracle.get("all_correct"), "trainable": ev["parameters"]["trainable"],
    }


def table1(runs: list[dict], budget: float) -> list[str]:
    header = ["Model", "Trainable params", "Steps", "Train FLOPs", "Rel. FLOPs", "Text ppl ↓", "max abs Δlogit",
              "CIDEr ↑", "Distinct captions", "Caption exact ↑", "FID ↓", "Oracle all-correct ↑"]
    lines = [_row(header), "|" + "---|" * len(header)]
    first = _metrics(runs[0])
    base_row = ["Base LM (text only)", "–", "–", "–", "–", _num(first["base_ppl"])]
    lines.append(_row(base_row + ["–"] * (len(header) - len(base_row))))
    for run in sorted(runs, key=lambda r: list(LABELS).index(r["mode"])):
        m = _metrics(run)
        lines.append(_row([
            LABELS[run["mode"]], _num(m["trainable"]), _num(run["steps"]), _num(float(run["train_flops"])),
            _num(run["train_flops"] / budget), _num(m["ppl"]), _num(m["dlogit"], 3), _num(m["cider"], 1),
            f"{_num(m['distinct'])} / {_num(run['eval']['understanding']['n'])}", _num(m["exact"], 3),
            _num(m["fid"]), _num(m["oracle_all"], 3),
        ]))
    return lines


def ablation(runs: list[dict]) -> list[str]:
    header = ["Separation", "η_text/η_img", "Text ppl ↓", "max abs Δlogit", "CIDEr ↑", "Caption scene all-correct ↑",
              "FID ↓", "Oracle shape", "colour", "size", "position", "all-correct ↑"]
    lines = [_row(header), "|" + "---|" * len(header)]
    for mode in ("dense", "ffn_only", "lmfusion"):
        run = next((r for r in runs if r["mode"] == mode), None)
        if run is None:
            continue
        m = _metrics(run)
        o = m["oracle"]
        lines.append(_row([
            LABELS[mode], TEXT_LR_RATIO[mode], _num(m["ppl"]), _num(m["dlogit"], 3), _num(m["cider"], 1),
            _num(m["scene_all"], 3), _num(m["fid"]), *(_num(o.get(k), 3) for k in ("shape", "colour", "size", "position")),
            _num(m["oracle_all"], 3),
        ]))
    return lines


def _verdict(ok: bool | str | None) -> str:
    if ok is None or isinstance(ok, str):
        return ok or "–"
    return "yes" if ok else "no"


def claims(runs: list[dict]) -> list[str]:
    """Each paper claim, the numbers that test it here, and whether they agree (single seed)."""
    m = {r["mode"]: _metrics(r) for r in runs}
    get = lambda mode, key: m[mode][key] if mode in m else None  # noqa: E731

    def better(a, b, key, lower=False):
        x, y = get(a, key), get(b, key)
        if x is None or y is None:
            return None
        return "tie" if x == y else (x < y if lower else x > y)

    def better_fid(a, b):
        # Two sets of real images already differ by the real-vs-real FID at this n: a gap below
        # that is sampling noise, not a difference between the models.
        floor = get(a, "fid_floor")
        if floor is not None and get(a, "fid") is not None and get(b, "fid") is not None \
                and abs(get(a, "fid") - get(b, "fid")) < floor:
            return f"within noise: the gap is below the real-vs-real FID ({_num(floor)})"
        return better(a, b, "fid", lower=True)

    def better_cider(a, b):
        blind = get(a, "blind_cider")
        if blind is not None and get(a, "cider") is not None and get(b, "cider") is not None \
                and max(get(a, "cider"), get(b, "cider")) <= blind:
            return f"untested: neither beats a blind captioner ({_num(blind, 1)})"
        return better(a, b, "cider")

    rows = [
        ("Frozen text path: text ability unchanged (Table 1: identical text scores)",
         f"Δlogit {_num(get('lmfusion', 'dlogit'), 3)}, ppl {_num(get('lmfusion', 'ppl'))} vs base {_num(get('lmfusion', 'base_ppl'))}",
         None if "lmfusion" not in m else get("lmfusion", "dlogit") == 0.0),
        ("LMFusion understands images better than Transfusion at equal FLOPs (CIDEr 38.4 vs 32.0)",
         f"CIDEr {_num(get('lmfusion', 'cider'), 1)} vs {_num(get('scratch', 'cider'), 1)}", better_cider("lmfusion", "scratch")),
        ("LMFusion generates images at least as well (FID 14.0 vs 14.4, no CFG)",
         f"FID {_num(get('lmfusion', 'fid'))} vs {_num(get('scratch', 'fid'))}", better_fid("lmfusion", "scratch")),
        ("Dense fine-tuning degrades text (§5.1: ~7% persistent HellaSwag gap)",
         f"dense ppl {_num(get('dense', 'ppl'))} vs base {_num(get('dense', 'base_ppl'))}",
         None if "dense" not in m else get("dense", "ppl") > get("dense", "base_ppl")),
        ("Deep > shallow separation on understanding (text frozen)",
         f"CIDEr {_num(get('lmfusion', 'cider'), 1)} vs {_num(get('ffn_only', 'cider'), 1)}", better_cider("lmfusion", "ffn_only")),
        ("Deep > shallow separation on generation, by a wider margin",
         f"FID {_num(get('lmfusion', 'fid'))} vs {_num(get('ffn_only', 'fid'))}", better_fid("lmfusion", "ffn_only")),
    ]
    lines = [_row(["Claim (paper)", "Here", "Agrees?"]), "|---|---|---|"]
    return lines + [_row([claim, here, _verdict(ok)]) for claim, here, ok in rows]


def _image_path(meta: dict) -> str:
    """How images entered the model; results written before meta recorded it used the pixel codec."""
    s = meta["settings"]
    return meta.get("image_path") or f"{s['image_size']} px pixel codec, {s['patch_size']} px patches"


def markdown(meta: dict, runs: list[dict]) -> str:
    s = meta["settings"]
    floor = next((_metrics(r)["fid_floor"] for r in runs if _metrics(r)["fid_floor"] is not None), None)
    ceiling = runs[0]["eval"]["generation"].get("oracle_on_real", {}).get("all_correct")
    blind = _metrics(runs[0])["blind_cider"]
    title = "Paper replication (SMOKE: tiny random base model, meaningless numbers)" if meta["smoke"] else "Paper replication"
    lines = [
        f"# {title}", "",
        f"Command: `{meta['command']}`", "",
        f"Machine: {meta['machine']['platform']}, {meta['machine']['cpu_count']} CPUs, torch {meta['machine']['torch']} "
        f"({meta['machine']['torch_threads']} threads, load average at the end {meta['machine']['load_average'][0]:.1f}); "
        f"{meta['date']}; this invocation took {meta['wall_seconds']:.0f} s (work reused from earlier invocations "
        "is not counted here: see Train s and Eval s under Runs).", "",
        f"Setup: base `{meta['base_model']}`, shapes data `{meta['data']}`, {_image_path(meta)}, batch {s['batch_size']}, lr {s['lr']} cosine to {s['min_lr']}, "
        f"LMFusion {s['steps']} steps = budget {meta['budget_flops']:.3e} FLOPs (measured; see lmfusion.training.flops.py). "
        f"Evaluation: {s['eval_n']} test images / captions, {s['eval_steps']} denoising steps, no CFG, one seed.", "",
        "## Table 1 at small scale", "", *table1(runs, meta["budget_flops"]), "",
        f"Blind-captioner CIDEr (the best single test caption said for every image): {_num(blind, 1)}; "
        "a CIDEr at or below it shows no use of the image. "
        f"FID uses the project's shapes feature net (not Inception); real-vs-real FID at this n: {_num(floor)}. "
        f"Oracle all-correct on the real test images (its ceiling at this resolution): {_num(ceiling, 3)}.", "",
        "## Ablation (paper §5.1): how much of each layer is per modality", "", *ablation(runs), "",
        "## The paper's claims, checked", "", *claims(runs), "",
        "## Runs", "",
        "FLOPs per step, forward + backward: measured by FlopCounterMode (all of it, and the U-Net's convolution "
        "share), and the formula of lmfusion.training.flops.py for the decoder layers + LM head, which should "
        "match the measured matmuls.", "",
        _row(["Mode", "Steps", "FLOPs/step measured", "U-Net conv share", "matmul measured", "matmul formula",
              "Train s", "Eval s", "Run folder"]),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        f = r["flops_per_step"]
        lines.append(_row([r["mode"], _num(r["steps"]), _num(f["measured"]), _num(f["convolution"] / f["measured"], 3),
                           _num(f["matmul"]), _num(f["analytic_transformer"]), _num(r["train_seconds"], 0),
                           _num(r["eval"].get("seconds"), 0), f"`{r['run_dir']}`"]))
    return "\n".join(lines) + "\n"


def write_results(results_dir: Path, stem: str, meta: dict, runs: list[dict]) -> tuple[Path, Path]:
    """``<stem>.md`` (the tables) and ``<stem>.json`` (everything, per-image samples dropped)."""
    slim = []
    for run in runs:
        ev = json.loads(json.dumps(run["eval"]))
        ev["understanding"].pop("samples", None)
        ev["understanding"].pop("per_image_cider", None)
        slim.append({**run, "eval": ev})
    md, js = results_dir / f"{stem}.md", results_dir / f"{stem}.json"
    atomic_write_bytes(md, markdown(meta, runs).encode())
    atomic_write_bytes(js, (json.dumps({"meta": meta, "runs": slim}, indent=1) + "\n").encode())
    return md, js
