"""benchmarks/paper_replication.py --smoke: four runs at equal FLOPs, evaluated, tabulated, resumable."""

import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_replication.py"


def _benchmark():
    from lmfusion.testing import load_script

    return load_script(BENCHMARK)


def test_smoke_run_tabulates_all_modes_and_resumes(tmp_path, capsys):
    bench = _benchmark()
    args = ["--smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    assert bench.main(args) == 0
    results = json.loads((tmp_path / "results" / "paper_replication_smoke.json").read_text())
    runs = {run["mode"]: run for run in results["runs"]}
    assert set(runs) == {"lmfusion", "scratch", "dense", "ffn_only"}
    budget = results["meta"]["budget_flops"]
    for run in runs.values():  # equal FLOPs, up to rounding to whole steps
        assert abs(run["train_flops"] / budget - 1) <= run["flops_per_step"]["measured"] / budget
    assert runs["lmfusion"]["eval"]["text"]["max_abs_logit_diff"] == 0.0
    assert runs["ffn_only"]["eval"]["text"]["max_abs_logit_diff"] == 0.0
    assert runs["dense"]["eval"]["text"]["max_abs_logit_diff"] > 0.0
    page = (tmp_path / "results" / "paper_replication_smoke.md").read_text()
    for needle in ("Table 1", "Ablation", "claims", "python benchmarks/paper_replication.py --smoke"):
        assert needle in page

    capsys.readouterr()
    assert bench.main(args) == 0  # everything is reused: no training, no evaluation
    log = capsys.readouterr().out
    assert log.count("already trained") == 4 and log.count("evaluation reused") == 4
    assert "measuring FLOPs" not in log
