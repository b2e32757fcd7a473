"""How fast this CPU multiplies the decoder's weight matrices by few rows: GFLOP/s against rows.

A quickstart step's matmuls take a quarter of the rows at batch 4 as at batch 16, yet about half
the time (benchmarks/results/quickstart_profile.md). This times, alone, the three products one
linear layer costs in training (forward x W^T, grad-input dy W, grad-weight dy^T x) at
SmolLM2-135M's layer shapes for a range of row counts, so the efficiency lost to small batches
is seen without the rest of the step.

    python benchmarks/cpu_matmul_rows.py                       # this CPU, fp32, 2 threads
    python benchmarks/cpu_matmul_rows.py --isa avx2            # as on a CPU without AVX-512
    python benchmarks/cpu_matmul_rows.py --dtype bf16

`--isa avx2` caps the kernels as quickstart_profile.py's flag does; the caps are environment
variables read when torch starts, so the script runs itself again with them set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from quickstart_profile import ISA_ENV

# (in, out) of one SmolLM2-135M decoder layer's projections: q, k, v, o, gate, up, down.
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def layer_seconds(rows: int, dtype: torch.dtype, repeats: int) -> float:
    """Seconds for forward, grad-input and grad-weight of every projection of one layer."""
    mats = [(torch.randn(rows, i, dtype=dtype), torch.randn(o, i, dtype=dtype), torch.randn(rows, o, dtype=dtype))
            for i, o in LAYER]

    def once():
        for x, w, dy in mats:
            x @ w.t()
            dy @ w
            dy.t() @ x

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512],
                        help="row counts (tokens through one modality's weights) to time")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="matmul precision")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per row count (after one warm-up)")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: cap ATen, oneDNN and MKL at AVX2, as on a CPU without AVX-512 (an emulation)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    caps = ISA_ENV.get(args.isa, {})
    if any(os.environ.get(key) != value for key, value in caps.items()):
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **caps})
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    flops_per_row = sum(3 * 2 * i * o for i, o in LAYER)
    result = {"isa": args.isa, "dtype": args.dtype, "threads": args.threads, "capability": torch.backends.cpu.get_cpu_capability(),
              "rows": {}}
    print(f"{'rows':>6} {'ms/layer':>9} {'GFLOP/s':>8} {'us/row':>7}")
    for rows in args.rows:
        seconds = layer_seconds(rows, dtype, args.repeats)
        gflops = flops_per_row * rows / seconds / 1e9
        result["rows"][rows] = {"seconds_per_layer": seconds, "gflop_per_s": gflops}
        print(f"{rows:>6} {seconds * 1e3:>9.2f} {gflops:>8.1f} {seconds / rows * 1e6:>7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
