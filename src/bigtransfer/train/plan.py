"""Which examples each optimizer step sees, and how they are mixed: a pure function of (seed, step).

The order of examples is a function of (seed, epoch), each example's augmentation of (seed, epoch, position) and
MixUp of (seed, step), so a resumed run replays exactly what an uninterrupted one would have done, and a global
batch is the same whether one process or N computes it: each rank takes a contiguous shard of every global batch,
and micro-batches (`batch_split`) only bound memory.
"""

from __future__ import annotations

import numpy as np
import torch


class BatchPlan:
    """The examples of every optimizer step, as `(epoch, position)` keys of a TransformedDataset.

    The data is an endless stream of per-epoch permutations (permutation `e` drawn from `(seed, e)`); step `s`
    takes stream items `[s * batch_size, (s + 1) * batch_size)`. Rank `r` of `world_size` takes the `r`-th
    contiguous shard of that global batch and splits it into `batch_split` micro-batches.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 batch_split: int = 1):
        if num_examples < 1:
            raise ValueError("no training examples")
        if batch_size % (world_size * batch_split):
            raise ValueError(
                f"batch_size {batch_size} must be divisible by processes x batch_split = {world_size} x {batch_split}"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.world_size, self.rank, self.batch_split = world_size, rank, batch_split
        self.per_rank = batch_size // world_size
        self.micro_batch_size = self.per_rank // batch_split
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._permutations[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        start = step * self.batch_size
        keys = []
        for item in range(start, start + self.batch_size):
            epoch, offset = divmod(item, self.num_examples)
            keys.append((epoch, int(self.permutation(epoch)[offset])))
        return keys

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of `step`, in order."""
        keys = self.global_batch(step)[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        size = self.micro_batch_size
        return [keys[index : index + size] for index in range(0, len(keys), size)]

    def micro_batch_offset(self, index: int) -> int:
        """Position in the global batch where this rank's micro-batch `index` starts."""
        return self.rank * self.per_rank + index * self.micro_batch_size

    def epoch(self, steps: int) -> float:
        return steps * self.batch_size / self.num_examples


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of keys for steps `start..total-1`: a DataLoader `batch_sampler`."""

    def __init__(self, plan: BatchPlan, start: int, total: int):
        self.plan, self.start, self.total = plan, start, total

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return (self.total - self.start) * self.plan.batch_split


def mixup_lambda(seed: int, step: int, alpha: float) -> float | None:
    """The step's MixUp lambda ~ Beta(alpha, alpha), shared by all its micro-batches; None without MixUp."""
    if alpha <= 0:
        return None
    return float(np.random.default_rng([seed, 0x6D6978, step]).beta(alpha, alpha))


def mixup_partners(seed: int, step: int, offset: int, count: int) -> torch.Tensor:
    """Which image each image of a micro-batch is mixed with; fixed by its place in the global batch."""
    return torch.from_numpy(np.random.default_rng([seed, 0x706172, step, offset]).permutation(count))
