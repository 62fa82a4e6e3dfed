"""What one LoRA update learns from improving answers: held-out likelihood, adapter against base.

    python bench/learnability.py --train RUN [RUN ...] --held-out RUN [RUN ...] [--epochs 1,3]

The learning loop trains on the candidates that beat their parent (`learn.rule = "improved"`).
If that teaches the model which edits help (and not only the answer's form), an adapter trained
on the improving answers of some runs raises the likelihood of other runs' improving answers more
than that of their answers that trained but did not improve. This measures that directly, without
the loop's sampling noise: per held-out answer, the mean log-probability per answer token under
the base model and under the adapter (teacher-forced, on the chat the answer was given for, as
`learn` trains on it). It prints, per setting:
- the shift (adapter − base, nats per token) on the training answers: did the update move the
  model at all;
- the shift on held-out improving answers, and on held-out answers that did not improve;
- their difference, with a 95% bootstrap interval over answers: what the update learnt about
  improving, beyond the form every answer shares.

The training answers are `agent/learning/examples.training_set`'s (`rule = "improved"`); the
adapter is `train_adapter`'s with the run's `[learn]` defaults, `--epochs` (and `--lr`) varied.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path


from deltanas.agent.archive import Store
from deltanas.agent.config import LearnConfig
from deltanas.agent.learning.examples import sft_example, training_set


def held_out(run_dirs: list[Path], from_cycle: int) -> list[tuple[dict, bool]]:
    """(example, improved) for every answer from `from_cycle` on that trained and was novel."""
    out = []
    for run in run_dirs:
        store = Store(run / "archive.sqlite", readonly=True)
        accuracy = {r.id: r.accuracy for r in store.candidates()}
        for r in store.candidates():
            parent = accuracy.get(r.parent_id)
            if r.kind == "baseline" or r.cycle < from_cycle or r.status != "ok" or None in (r.accuracy, parent):
                continue
            example = sft_example(store.get_trajectory(r.id) or [])
            if example is not None:
                out.append((example, r.accuracy >= parent))
    return out


def training(run_dirs: list[Path], from_cycle: int, limit: int, seed: int) -> list[dict]:
    """What `learn` trains on under `rule = "improved"`, from `from_cycle` on."""
    examples = []
    for run in run_dirs:
        store = Store(run / "archive.sqlite", readonly=True)
        cycle = {r.id: r.cycle for r in store.candidates()}
        ids, ex = training_set(store, "improved", 5, up_to_cycle=max(cycle.values(), default=0))
        examples += [e for i, e in zip(ids, ex) if cycle.get(i, -1) >= from_cycle]
    random.Random(seed).shuffle(examples)
    return examples[:limit]


def scorer(model: str, device: str):
    """(score(net, example) -> mean log-probability per answer token, the base network)."""
    import torch

    from deltanas.agent.llm.hf import CHATML_TEMPLATE, load_pretrained

    tok, net = load_pretrained(model, device, torch.float32)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    net.eval()

    def score(m, example: dict) -> float:
        prompt = tok.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as the full chat's start")
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = m(torch.tensor([ids], device=net.device)).logits[0, :-1].float().cpu()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        answer = logp[len(p_ids) - 1:]
        return float(answer.mean())

    return score, net


def bootstrap(a: list[float], b: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    rng = random.Random(seed)
    diff = sum(a) / len(a) - sum(b) / len(b)
    draws = sorted(sum(rng.choices(a, k=len(a))) / len(a) - sum(rng.choices(b, k=len(b))) / len(b)
                   for _ in range(n))
    return diff, draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, nargs="+", required=True, help="run directories to learn from")
    ap.add_argument("--held-out", type=Path, nargs="+", required=True, help="run directories to score on")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--epochs", default=str(LearnConfig().epochs), help="comma-separated: one adapter each")
    ap.add_argument("--lr", type=float, default=LearnConfig().lr)
    ap.add_argument("--max-train", type=int, default=24, help="at most this many training answers")
    ap.add_argument("--max-held-out", type=int, default=120, help="at most this many held-out answers")
    ap.add_argument("--from-cycle", type=int, default=1, help="the first cycle read (0 is the mutator's under --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if set(args.train) & set(args.held_out):
        ap.error("a run may not be both trained on and held out")
    from deltanas.agent.learning.lora import LoraSettings, train_adapter

    train = training(args.train, args.from_cycle, args.max_train, args.seed)
    rest = held_out(args.held_out, args.from_cycle)
    random.Random(args.seed).shuffle(rest)
    rest = rest[:args.max_held_out]
    good = [e for e, better in rest if better]
    other = [e for e, better in rest if not better]
    if not train or not good or not other:
        raise SystemExit(f"too little to measure: {len(train)} training answers, {len(good)} improving and "
                         f"{len(other)} other held-out answers")
    print(f"{len(train)} training answers from {len(args.train)} runs; held out: {len(good)} improving, "
          f"{len(other)} not, from {len(args.held_out)} runs", flush=True)
    score, net = scorer(args.model, args.device)
    started = time.perf_counter()
    base = {"train": [score(net, e) for e in train], "good": [score(net, e) for e in good],
            "other": [score(net, e) for e in other]}
    print(f"base model scored in {time.perf_counter() - started:.0f} s", flush=True)
    c = LearnConfig()
    results = []
    for epochs in (float(x) for x in args.epochs.split(",")):
        from peft import PeftModel

        settings = LoraSettings(r=c.r, alpha=c.alpha, dropout=c.dropout, lr=args.lr, epochs=epochs,
                                grad_accum=c.grad_accum, weight_decay=c.weight_decay, scheduler=c.scheduler,
                                batch_size=c.batch_size, max_length=c.max_length, checkpointing=c.checkpointing)
        with tempfile.TemporaryDirectory() as tmp:
            info = train_adapter(args.model, train, Path(tmp) / "adapter", settings, device=args.device,
                                 seed=args.seed)
            tuned = PeftModel.from_pretrained(net, str(Path(tmp) / "adapter"))
            tuned.eval()
            shift = {k: [score(tuned, e) - b for e, b in zip(group, base[k])]
                     for k, group in (("train", train), ("good", good), ("other", other))}
            net = tuned.unload()  # the base network again, for the next setting
        diff, lo, hi = bootstrap(shift["good"], shift["other"], seed=args.seed)
        mean = {k: sum(v) / len(v) for k, v in shift.items()}
        results.append({"epochs": epochs, "lr": args.lr, "steps": info["steps"], "loss": info["loss"],
                        "train_seconds": info["seconds"], "shift": mean, "difference": [diff, lo, hi],
                        "n": {k: len(v) for k, v in shift.items()}})
        print(f"epochs {epochs:g}, lr {args.lr:g}: {info['steps']} steps in {info['seconds']:.0f} s, loss "
              f"{info['loss']:.3f}; shift (nats/token) on training answers {mean['train']:+.4f}, held-out "
              f"improving {mean['good']:+.4f}, held-out other {mean['other']:+.4f}; improving − other "
              f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}] (×{math.exp(diff):.3f} per token)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
