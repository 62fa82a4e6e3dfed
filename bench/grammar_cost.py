"""What decoding under the diff grammar costs: tokens per second on the same batch, held to the
grammar and free.

    python bench/grammar_cost.py                      # hf:smollm2 on this machine, 4 prompts, 3 rounds
    python bench/grammar_cost.py --prompts 8 --max-new-tokens 256 --rounds 2 --json

The prompts are the run's own: the zoo baselines in turn as parents, each candidate with the
edit sites and kinds of layer the run would draw for it (`agent/loop/answer_format.py` on the embedded
config). The same batch is generated with its grammars (`constrain = "grammar"`) and without
them (`none`, the paper's protocol), at the same token cap and sampling, alternating rounds so
that a machine busy with other work slows both alike. The figure is the constrained tokens per
second against the free ones (the target: a cost of at most 15%), and the seconds per decoding
step: a batch steps until its longest answer ends, and answers held to the grammar end at
different lengths while free ones mostly run to the cap, so tokens per second also counts the
idle rows of a batch, which the per-step time does not. The grammar's compile time and mask cost
per row and step come from the backend's own counters.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from deltanas.agent.config import load_config
from deltanas.agent.llm.base import Prompt, Sampling
from deltanas.agent.loop.answer_format import families_for, format_for, sites_for
from deltanas.tools import prompting
from deltanas.tools.zoo import get_baseline

TARGET = 0.15


def batch(backend, n: int) -> tuple[list[Prompt], list[Prompt]]:
    """`n` proposal prompts under the grammar, and the same prompts free."""
    cfg = load_config(None, {})
    parents = cfg.baselines
    held, free = [], []
    for i in range(n):
        src = get_baseline(parents[i % len(parents)]).source
        families = families_for(cfg, backend, src, 0, i)
        sites = sites_for(cfg, backend, src, 0, i)
        fmt = format_for(cfg, backend, src, sites, families)
        messages = prompting.propose_messages(parent_source=src, dataset="mnist", in_shape=(1, 28, 28),
                                              num_classes=10, parent_accuracy=0.97, sites=sites,
                                              families=families)
        held.append(Prompt(messages=messages, base_source=src, prefix=fmt.prefix, grammar=fmt.grammar,
                           hunks=fmt.hunks))
        free.append(Prompt(messages=messages, base_source=src))
    return held, free


def rate(backend, prompts: list[Prompt], sampling: Sampling) -> tuple[float, int, float]:
    """(tokens per second, tokens, seconds per decoding step) of one batched call."""
    t0 = time.perf_counter()
    out = backend.generate(prompts, sampling)
    seconds = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for c in out)
    return tokens / seconds, tokens, seconds / max(c.completion_tokens for c in out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="hf:smollm2")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from deltanas.agent.llm.factory import make_backend

    backend = make_backend(a.llm, batch_size=a.prompts)
    held, free = batch(backend, a.prompts)
    sampling = Sampling(temperature=0.35, top_k=50, top_p=0.9, max_new_tokens=a.max_new_tokens, seed=0)
    # Warm-up, both ways: kernels and caches, and the grammar library's view of the tokenizer
    # (built once per backend), so that the rounds time steady decoding.
    backend.generate([held[0], free[0]], Sampling(temperature=0.0, max_new_tokens=4))
    rates: dict[str, list[float]] = {"grammar": [], "none": []}
    steps: dict[str, list[float]] = {"grammar": [], "none": []}
    tokens: dict[str, int] = {"grammar": 0, "none": 0}
    stats = getattr(backend, "constraint_stats", None)
    for _ in range(a.rounds):
        for mode, prompts in (("grammar", held), ("none", free)):
            r, n, step = rate(backend, prompts, sampling)
            rates[mode].append(r)
            steps[mode].append(step)
            tokens[mode] += n
    g, f = statistics.median(rates["grammar"]), statistics.median(rates["none"])
    gs, fs = statistics.median(steps["grammar"]), statistics.median(steps["none"])
    cost, step_cost = 1 - g / f, gs / fs - 1
    figures = {"llm": a.llm, "prompts": a.prompts, "max_new_tokens": a.max_new_tokens, "rounds": a.rounds,
               "tokens_per_s": {"grammar": g, "none": f}, "tokens": tokens, "cost": cost, "target": TARGET,
               "seconds_per_step": {"grammar": gs, "none": fs}, "step_cost": step_cost,
               "grammar_stats": stats() if callable(stats) else None}
    if a.json:
        print(json.dumps(figures))
    else:
        print(f"{a.llm}, {a.prompts} prompts, {a.max_new_tokens} new tokens, {a.rounds} rounds (median)")
        print(f"tokens/s under the grammar: {g:.1f}   free: {f:.1f}   cost: {cost:.1%}   target: <= {TARGET:.0%}")
        print(f"seconds per decoding step under the grammar: {gs:.3f}   free: {fs:.3f}   cost: {step_cost:.1%}")
        print(f"output tokens: grammar {tokens['grammar']}, free {tokens['none']}")
        if figures["grammar_stats"]:
            print(f"grammar counters: {figures['grammar_stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
