"""Step time of the `instruct` preset with rows padded vs packed, side by side in one process.

Chat turns, text replies and edits differ a lot in length, so padded rows are ~60-66% real
tokens. This builds the instruct model and its data once (the chat and editing latents must be
cached by an earlier `lmfusion train --preset instruct`, or it encodes them), then times the real
training step (lmfusion.training.loop.train_step) on the same step's examples laid out both
ways, alternating A B A B so that a change in the machine's load hits both alike.

    python benchmarks/chat_packing.py --data data/shapes_chat --rounds 4 --pack-length 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes_chat", help="the instruct run's chat set")
    parser.add_argument("--pack-length", type=int, default=256, help="packed row length (default 256)")
    parser.add_argument("--rounds", type=int, default=4, help="A/B pairs timed after one warm-up pair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()

    import torch

    from lmfusion.training.config import load_config
    from lmfusion.training.data import build_batch_source, open_latent_store
    from lmfusion.training.distributed import DistInfo
    from lmfusion.training.loop import StepPlan, build_model, build_optimizer, build_scheduler, train_step

    torch.set_num_threads(args.threads)
    config = load_config("instruct", overrides={"data": args.data, "init_from": "", "progress": False})
    model, codec = build_model(config)
    store = open_latent_store(config, codec, progress=False, say=lambda _: None)
    sources = {"padded": build_batch_source(store, model, config)}
    sources["packed"] = build_batch_source(store, model, config)
    sources["packed"].pack_length = args.pack_length
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    plan, info = StepPlan(config.batch_size, config.batch_size, 1), DistInfo()
    model.train()
    times: dict[str, list[float]] = {name: [] for name in sources}
    real: dict[str, list[float]] = {name: [] for name in sources}
    for step in range(args.rounds + 1):
        for name, source in sources.items():  # the same step's examples, both layouts
            batch = source.batch(plan.positions(step, 0))[0]
            start = time.perf_counter()
            train_step(step, model, model, source, optimizer, scheduler, config, plan, info, batches=[batch])
            if step:  # the first pair warms up allocators and caches
                times[name].append(time.perf_counter() - start)
                real[name].append(batch.num_tokens / batch.input_ids.numel())
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "pack_length": args.pack_length, "rounds": args.rounds,
              **{name: {"step_s": statistics.mean(t), "real_fraction": statistics.mean(real[name]), "all_s": t}
                 for name, t in times.items()}}
    result["packed_over_padded"] = result["packed"]["step_s"] / result["padded"]["step_s"]
    for name in sources:
        print(f"{name:7s} {result[name]['step_s']:.2f} s/step, {result[name]['real_fraction']:.0%} of positions real")
    print(f"packed / padded step time: {result['packed_over_padded']:.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as stream:
            json.dump(result, stream, indent=1)


if __name__ == "__main__":
    main()
