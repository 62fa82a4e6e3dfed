"""How many of a model's free answers apply, before and after a bootstrap adapter (issue 17).

    python bench/format_rate.py --adapter runs/bootstrap/adapter                 # SmolLM2, 32 prompts
    python bench/format_rate.py --llm hf:tinycoder --adapter DIR --prompts 4 --max-new-tokens 64

The same held-out prompts go to the base model (the baseline) and then to the model with the
adapter, under `constrain = "none"` (no grammar, no pre-filled header: the paper's protocol) unless
`--constrain prefix`. Each prompt is the run's own (tools/prompting.propose_messages) for a parent
the bootstrap never trained on: a zoo network or a mutator variant drawn with another seed
(`--seed`, default 1000; a bootstrap uses the run's seed, 0 by default). Per model it prints:
- applied: the first answer applies to its parent through the run's own applier (the patched
  file compiles and leaves the protected functions alone);
- novel: applied, and under the run's MinHash similarity threshold to its parent;
- a 95% Wilson interval on the applied rate;
- answer tokens and seconds per answer.
Nothing the model writes is run: this measures the format, and the run's sandbox measures the rest.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from deltanas.agent.config import load_config
from deltanas.agent.learning.bootstrap import mutator_pairs, shape_of
from deltanas.agent.llm.base import Prompt, Sampling
from deltanas.agent.llm.factory import make_backend
from deltanas.tools import prompting
from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.diff_grammar import answer_format
from deltanas.tools.novelty import NoveltyIndex


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def parents(n: int, dataset: str, seed: int) -> list[str]:
    """n parents: every zoo network once, then mutator variants drawn with `seed`."""
    made = mutator_pairs(2 * n, dataset=dataset, seed=seed)  # zoo parents repeat, and count once
    zoo = {p.base_source for p in made.pairs if "+" not in p.base_name}
    rest = list(dict.fromkeys(p.base_source for p in made.pairs if "+" in p.base_name))
    return (sorted(zoo) + rest)[:n]


def measure(llm, prompts: list[Prompt], sampling: Sampling, index: NoveltyIndex) -> dict:
    started = time.perf_counter()
    out = llm.generate(prompts, sampling)
    seconds = time.perf_counter() - started
    applied = novel = fuzzy = exact = 0
    errors: dict[str, int] = {}
    answers = []
    for prompt, comp in zip(prompts, out):
        res = apply_model_output(prompt.base_source, comp.text)
        answers.append({"code": None if res.ok else res.error.code.value, "message": res.message[:400],
                        "fuzzy": res.fuzzy, "text": comp.text})
        if not res.ok:
            errors[res.error.code.value] = errors.get(res.error.code.value, 0) + 1
            continue
        applied += 1
        fuzzy += res.fuzzy > 0  # placed only with wrong context lines tolerated (tools/diff_apply.py)
        exact += apply_model_output(prompt.base_source, comp.text, fuzz=False).ok
        novel += index.check(res.source, prompt.base_source).novel
    n = len(prompts)
    low, high = wilson(applied, n)
    return {"answers": n, "applied": applied, "applied_rate": applied / n, "applied_ci95": [low, high],
            "novel": novel, "novel_rate": novel / n, "errors": errors,
            "applied_fuzzy": fuzzy, "applied_without_fuzz": exact, "applied_without_fuzz_rate": exact / n,
            "tokens_per_answer": sum(c.completion_tokens for c in out) / n, "seconds_per_answer": seconds / n,
            "sample": out[0].text[:600] if out else "", "outcomes": answers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="hf:smollm2")
    ap.add_argument("--adapter", action="append", default=[], metavar="DIR", help="an adapter to compare (repeatable)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--seed", type=int, default=1000, help="draws the held-out parents (a bootstrap's is 0)")
    ap.add_argument("--constrain", choices=["none", "prefix"], default="none")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args()

    cfg = load_config(None, {"llm.spec": args.llm})
    in_shape, classes = shape_of(args.dataset)
    prompts = []
    for src in parents(args.prompts, args.dataset, args.seed):
        fmt = answer_format(src, mode="delta", constrain=args.constrain)
        prompts.append(Prompt(messages=prompting.propose_messages(
            parent_source=src, dataset=args.dataset, in_shape=in_shape, num_classes=classes, parent_accuracy=None),
            base_source=src, prefix=fmt.prefix))
    c = cfg.llm
    sampling = Sampling(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, max_new_tokens=args.max_new_tokens,
                        seed=args.seed)
    n = cfg.novelty
    index = NoveltyIndex(threshold=n.threshold, num_perm=n.num_perm, shingle=n.shingle)
    llm = make_backend(c.backend, device=args.device, batch_size=args.batch, seed=args.seed)
    rows = {"base model (baseline)": measure(llm, prompts, sampling, index)}
    for path in args.adapter:
        llm.load_adapter(str(Path(path).resolve()))
        rows[f"adapter {path}"] = measure(llm, prompts, sampling, index)
    llm.close()
    print(f"{args.llm}, {len(prompts)} held-out prompts ({args.dataset}), constrain={args.constrain}, "
          f"max {args.max_new_tokens} new tokens")
    print(f"{'model':<44} {'applied':>8} {'95% CI':>15} {'novel':>7} {'tok/ans':>8} {'s/ans':>7}")
    for name, r in rows.items():
        lo, hi = r["applied_ci95"]
        print(f"{name[:44]:<44} {r['applied_rate']:>8.1%} {f'{lo:.0%}-{hi:.0%}':>15} {r['novel_rate']:>7.1%} "
              f"{r['tokens_per_answer']:>8.0f} {r['seconds_per_answer']:>7.1f}")
        print(f"    without the applier's fuzzy tier: {r['applied_without_fuzz_rate']:.1%} applied "
              f"({r['applied_fuzzy']} answer(s) placed only with wrong context lines tolerated)")
        print(f"    errors: {r['errors'] or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"llm": args.llm, "constrain": args.constrain, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
