"""Data order for the supervised trainers (SFT, reward model): held-out split and length buckets.

Both are pure functions of the random generator they are given, which each trainer seeds from
(seed, epoch) alone, so a resumed run replays exactly the batches of the uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Callable, List, Sequence, Tuple


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, chunk_batches: int,
                            longest_first: bool = False) -> List[List[int]]:
    """Batches of example indices with similar lengths, still random: shuffle, cut into chunks of
    `chunk_batches` batches, sort each chunk by length (stable), cut it into batches, shuffle the
    batches (so the longest are not all at the start of each chunk). Less padding per batch.
    `longest_first` sorts each chunk longest first (SFT: an out-of-memory shows up in the first chunk)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    sign = -1 if longest_first else 1
    batches: List[List[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: sign * lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def held_out_indices(n: int, fraction: float, rng: random.Random,
                     rounding: Callable[[float], int] = round) -> Tuple[List[int], List[int]]:
    """(train, held-out) indices in the shuffled order: `rounding(n * fraction)` examples held out,
    at least one and never all; nothing when fraction <= 0 or n < 2."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    rng.shuffle(order)
    n_held = min(max(1, rounding(n * fraction)), n - 1)
    return order[n_held:], order[:n_held]
