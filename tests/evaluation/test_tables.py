"""The replication's claim verdicts: differences inside the noise are not called wins."""

from lmfusion.evaluation.tables import claims

REFERENCES = ["a small red circle on the left", "a large blue square on the right", "a small green triangle at the top"]


def _run(mode, cider, fid, captions, ppl=27.0, dlogit=0.0):
    samples = [{"reference": r, "caption": c} for r, c in zip(REFERENCES, captions)]
    return {"mode": mode, "eval": {
        "text": {"model_ppl": ppl, "base_ppl": 27.0, "max_abs_logit_diff": dlogit},
        "understanding": {"n": 3, "cider": cider, "exact_match": 0.0, "samples": samples},
        "generation": {"fid": fid, "fid_real_vs_real": 100.0, "oracle": {}},
        "parameters": {"trainable": 1},
    }}


def _verdicts(runs):
    rows = claims(runs)[2:]
    return {row.split(" | ")[0].lstrip("| "): row.rsplit(" | ", 1)[1].rstrip(" |") for row in rows}


def test_gaps_below_the_noise_floors_are_not_wins():
    collapsed = [REFERENCES[0]] * 3
    runs = [_run("lmfusion", 50.0, 1000.0, collapsed), _run("scratch", 40.0, 1050.0, collapsed, ppl=900.0, dlogit=3.0)]
    verdict = _verdicts(runs)
    understanding = next(v for k, v in verdict.items() if k.startswith("LMFusion understands"))
    generation = next(v for k, v in verdict.items() if k.startswith("LMFusion generates"))
    assert understanding.startswith("untested: neither beats a blind captioner")
    assert generation.startswith("within noise")


def test_clear_differences_get_a_verdict():
    runs = [_run("lmfusion", 900.0, 1000.0, REFERENCES), _run("scratch", 800.0, 1500.0, REFERENCES)]
    verdict = _verdicts(runs)
    assert next(v for k, v in verdict.items() if k.startswith("LMFusion understands")) == "yes"
    assert next(v for k, v in verdict.items() if k.startswith("LMFusion generates")) == "yes"
    assert next(v for k, v in verdict.items() if k.startswith("Frozen text path")) == "yes"
