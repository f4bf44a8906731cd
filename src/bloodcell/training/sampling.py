"""Which training images each step sees: one dataset, or several labs in fixed shares of each batch.

With one source (BloodMNIST alone), an epoch is a fresh permutation cut into batches, as it always
was. With several (BloodMNIST and lab folders), each batch takes a fixed number of images from
each source, so a lab of a few hundred cells is not drowned by BloodMNIST's twelve thousand: the
first source (the largest, BloodMNIST when it is trained on) is walked through by a permutation,
once per epoch, and each other source is drawn from at random, with replacement. Classes a lab
lacks come from the sources that have them. Every draw uses the training generator, whose state
checkpoints save, so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bloodcell.errors import BloodcellError


def shares(n_labs: int, lab_share: float, with_bloodmnist: bool) -> tuple[float, ...]:
    """Each source's share of a batch: BloodMNIST first (if trained on), then the labs equally."""
    if n_labs == 0:
        return (1.0,)
    if not with_bloodmnist:
        return (1.0 / n_labs,) * n_labs
    return (1.0 - lab_share, *((lab_share / n_labs,) * n_labs))


def per_batch(source_shares: Sequence[float], batch_size: int) -> list[int]:
    """Images per batch from each source (at least one each), summing to `batch_size`."""
    counts = [max(1, math.floor(share * batch_size)) for share in source_shares]
    counts[0] += batch_size - sum(counts)
    if counts[0] < 1:
        raise BloodcellError(f"batch size {batch_size} is too small for {len(counts)} sources")
    return counts


def steps_per_epoch(
    n: int, batch_size: int, sources: torch.Tensor | None = None, source_shares: Sequence[float] = (1.0,)
) -> int:
    """An epoch is one pass over the first source (over all `n` images when there is one)."""
    if sources is None or len(source_shares) == 1:
        return math.ceil(n / batch_size)
    first = int((sources == 0).sum())
    return math.ceil(first / per_batch(source_shares, batch_size)[0])


def epoch_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    sources: torch.Tensor | None = None,
    source_shares: Sequence[float] = (1.0,),
) -> list[torch.Tensor]:
    """The index batches of one epoch over `n` training images (`sources[i]`: image i's source)."""
    if sources is None or len(source_shares) == 1:
        order = torch.randperm(n, generator=generator)
        return [order[start : start + batch_size] for start in range(0, n, batch_size)]
    counts = per_batch(source_shares, batch_size)
    members = [torch.nonzero(sources == s).squeeze(1) for s in range(len(counts))]
    first = members[0][torch.randperm(len(members[0]), generator=generator)]
    batches = []
    for step in range(steps_per_epoch(n, batch_size, sources, source_shares)):
        parts = [first[step * counts[0] : (step + 1) * counts[0]]]
        for pool, count in zip(members[1:], counts[1:]):
            parts.append(pool[torch.randint(0, len(pool), (count,), generator=generator)])
        batches.append(torch.cat(parts))
    return batches
