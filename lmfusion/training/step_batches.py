"""Each optimizer step's micro-batches for this rank, built ahead in DataLoader workers.

A map-style dataset indexed by step, not an iterable with a cursor: item i is step
first_step + i, and the micro-batches of a step are a pure function of (seed, step, chunk, rank)
through ExamplePlanner and StepPlan. So a resumed run needs no data-loader state (it starts at
its checkpoint's step and draws exactly what an uninterrupted run draws), and ranks are disjoint by
construction. Workers only overlap building batches (tokenising, reading latent rows from
shards) with the training step.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset


class StepBatches(Dataset):
    """Item i: (step, this rank's micro-batches of step first_step + i), on the CPU."""

    def __init__(self, source, plan, rank: int, first_step: int, max_steps: int):
        self.source, self.plan, self.rank = source, plan, rank
        self.first_step, self.max_steps = first_step, max_steps

    def __len__(self) -> int:
        return max(0, self.max_steps - self.first_step)

    def chunks(self) -> list[int]:
        return [self.rank * self.plan.accum + a for a in range(self.plan.accum)]

    def __getitem__(self, i: int):
        step = self.first_step + i
        return step, [self.source.batch(self.plan.positions(step, j))[0] for j in self.chunks()]


def _identity(item):
    return item


def step_loader(source, plan, rank: int, first_step: int, max_steps: int, workers: int) -> DataLoader:
    """Steps in order; with workers > 0 the next steps are built while this one trains."""
    return DataLoader(StepBatches(source, plan, rank, first_step, max_steps), batch_size=None, shuffle=False,
                      num_workers=workers, collate_fn=_identity)
