"""Per-rank memory of SmolLM2-135M LMFusion training under DDP and FSDP2, 2 processes (torchrun).

Each mode runs a few real training steps (`lmfusion train`, pixel codec at 64 px, 8x8 patches)
and reads the line the loop logs after its first step: the elements each rank stores of the
trainable weights, the frozen text weights and the AdamW moments (local shards under FSDP), and
the process's resident memory then and at its peak. Bytes = elements x 4 (fp32); gradients
take as many bytes as the trainable weights a rank holds.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fsdp_memory.py            # writes results/fsdp_memory.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(mode: str, work: Path, steps: int, base_model: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lmfusion.cli", "train", "--preset", "quickstart", "--name", mode, "--runs-dir", str(work / "runs"),
               "--base-model", base_model, "--data", str(work / "shapes"), "--generate-shapes", "64",
               "--latent-cache", str(work / "latents"), "--max-steps", str(steps), "--batch-size", "2",
               "--checkpoint-every", "0", "--sample-every", "0", "--log-every", "1", "--progress", "false",
               "--parallel", mode]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    log = (work / "runs" / mode / "train.log").read_text()
    shards = json.loads(log.split("per-rank shards: ", 1)[1].splitlines()[0])
    return {"mode": mode, "seconds": round(time.time() - started), **shards}


def table(rows: list[dict]) -> str:
    lines = ["| mode | rank | trainable weights MiB | grads MiB | AdamW state MiB | frozen weights MiB | "
             "params+grads+AdamW MiB | RSS after step 1 MiB | peak RSS MiB |", "|" + "---|" * 9]
    for row in rows:
        for rank in range(len(row["trainable"])):
            mib = lambda n: n * 4 / 2**20  # noqa: E731 (fp32 elements)
            weights, moments, frozen = mib(row["trainable"][rank]), mib(row["optimizer"][rank]), mib(row["frozen"][rank])
            lines.append(f"| {row['mode']} | {rank} | {weights:.0f} | {weights:.0f} | {moments:.0f} | {frozen:.0f} | "
                         f"{2 * weights + moments + frozen:.0f} | {row['memory_mb'][rank]} | {row['peak_memory_mb'][rank]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per mode (default 3)")
    parser.add_argument("--base-model", default="smollm2-135m", help="base LM (default smollm2-135m)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fsdp_memory"),
                        help="results path without suffix (.md and .json are written)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [run(mode, Path(work), args.steps, args.base_model) for mode in ("ddp", "fsdp")]
    load = os.getloadavg()
    text = (f"# Per-rank memory, {args.base_model}, 2 processes (torchrun, gloo, CPU, fp32)\n\n"
            f"`OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fsdp_memory.py --steps {args.steps}`; "
            f"batch 2 (1 per rank), pixel codec 64 px, 8x8 patches. Load average at the end: "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores (shared machine).\n\n"
            f"{table(rows)}\n\n"
            "Tensor columns are counted from each rank's local tensors (DTensor shards under FSDP) after the "
            "first step. RSS also holds the Python/torch runtime, activations, and under FSDP the communication "
            "buffers; its peak includes building the full model before it is sharded (every rank loads the "
            "base model whole, then fully_shard frees what it does not own).\n")
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
