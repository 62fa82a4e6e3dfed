"""Parent selection: tournament over the archive, with some uniform exploration."""
from __future__ import annotations

import random
from collections.abc import Sequence

from deltanas.agent.archive import CandidateRow


def select_parents(pool: Sequence[CandidateRow], n: int, *, tournament_size: int, explore: float,
                   seed: str) -> list[str]:
    """Pick `n` parent ids (repeats allowed). Deterministic for a given seed string, so a
    resumed cycle selects the same parents."""
    if not pool:
        raise ValueError("no trained network to select parents from")
    rng = random.Random(seed)
    ranked = sorted(pool, key=lambda c: c.id)  # order-independent of how the pool was read
    picks = []
    for _ in range(n):
        if rng.random() < explore:
            picks.append(rng.choice(ranked).id)
            continue
        entrants = rng.sample(ranked, min(tournament_size, len(ranked)))
        picks.append(max(entrants, key=lambda c: (c.accuracy or 0.0, c.id)).id)
    return picks
