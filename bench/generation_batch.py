"""Batched generation against one request at a time, on the same backend and hardware.

    python bench/generation_batch.py                         # hf:smollm2 on the CPU, 8 prompts
    python bench/generation_batch.py --model config --device cuda --prompts 64 --batch 64
    python bench/generation_batch.py --llm openai:smollm2@http://127.0.0.1:8000/v1
    python bench/generation_batch.py --json                  # the figures as JSON on stdout, the prose on stderr

A cycle's proposals go to the backend as one batch (`hf`: padded batched `generate`;
`vllm`/`openai`: concurrent requests). The figure is output tokens per second for
the cycle's prompts sent as one batch; the baseline is the same prompts sent one at
a time. The prompts are the run's real proposal prompts against the zoo baselines,
decoding is greedy with a fixed token cap, so both sides generate the same text.

`--model config` builds a randomly initialised Llama from a config (no weights needed,
for a GPU machine that has no model files); its tokenizer is SmolLM2's when that
package is installed, else a small byte-level one trained on the spot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from unittest import mock

from deltanas.agent.llm.base import Prompt, Sampling
from deltanas.tools import prompting
from deltanas.tools.zoo import get_baseline, list_baselines


def prompts(n: int, parents: int | None = None) -> list[Prompt]:
    """`n` proposal prompts, their parents taken in turn from the first `parents` zoo baselines
    (all of them by default). A cycle's tournament selection repeats its best parents."""
    names = [b.name for b in list_baselines()][:parents]
    out = []
    for i in range(n):
        src = get_baseline(names[i % len(names)]).source
        out.append(Prompt(messages=prompting.propose_messages(parent_source=src, dataset="mnist", in_shape=(1, 28, 28),
                                                              num_classes=10, parent_accuracy=0.97), base_source=src))
    return out


def config_backend(device: str, batch: int, layers: int, hidden: int):
    """An hf backend around a random Llama built from a config (same code path as a real model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltanas.agent.llm.hf import HFBackend

    tok = None
    try:
        from deltanas.agent.llm.model_folder import resolve_model
        from transformers import AutoTokenizer

        loc = resolve_model("smollm2")
        tok = AutoTokenizer.from_pretrained(loc.path, gguf_file=loc.gguf_file, local_files_only=True)
    except (FileNotFoundError, OSError, ImportError):
        tok = _byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 192), max_position_embeddings=8192)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    net = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    b = HFBackend.around(net, tok, name="config", device=device, batch_size=batch)  # the backend's own generate path
    return b, sum(p.numel() for p in net.parameters())


def _byte_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from deltanas.agent.llm.hf import CHATML_TEMPLATE

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    text = [get_baseline(b.name).source for b in list_baselines()] * 4
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def timed(backend, ps: list[Prompt], sampling: Sampling, one_at_a_time: bool) -> tuple[float, int]:
    started = time.perf_counter()
    if one_at_a_time:
        outs = [c for p in ps for c in backend.generate([p], sampling)]
    else:
        outs = backend.generate(ps, sampling)
    wall = time.perf_counter() - started
    return wall, sum(c.completion_tokens for c in outs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="hf:smollm2", help="a backend spec (ignored with --model config)")
    p.add_argument("--model", choices=["spec", "config"], default="spec")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="hf: prompts per padded generate call")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=12, help="--model config: decoder layers")
    p.add_argument("--hidden", type=int, default=768, help="--model config: hidden size")
    p.add_argument("--parents", type=int, default=None,
                   help="distinct parents among the prompts (default: every zoo baseline, one prompt each in turn)")
    p.add_argument("--plain", action="store_true",
                   help="hf: also time the batch without computing the prompts' shared tokens once")
    p.add_argument("--dynamic", action="store_true",
                   help="hf: also time the batch with transformers' growing cache instead of one written in place")
    p.add_argument("--dtype", default="auto", help="hf: the weights' type (auto, float32, bfloat16, float16)")
    p.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout, the prose on stderr")
    a = p.parse_args(argv)
    stdout = sys.stdout
    if a.json:
        sys.stdout = sys.stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.model == "config":
        backend, n_params = config_backend(a.device, a.batch, a.layers, a.hidden)
        label = f"random Llama from a config ({n_params / 1e6:.0f}M parameters)"
    else:
        from deltanas.agent.llm.factory import make_backend

        backend = make_backend(a.llm, device=a.device, dtype=a.dtype, batch_size=a.batch)
        label = a.llm
    is_hf = getattr(backend, "name", "") == "hf"
    if is_hf:
        label += f" ({str(backend.model.dtype).removeprefix('torch.')}, " \
                 f"{'static' if backend.static_cache else 'dynamic'} cache)"
    ps = prompts(a.prompts, a.parents)
    sampling = Sampling(temperature=0.0, max_new_tokens=a.max_new_tokens, seed=0)
    timed(backend, ps[:1], Sampling(temperature=0.0, max_new_tokens=4), True)  # warm-up: kernels, caches
    one_s, one_tok = timed(backend, ps, sampling, one_at_a_time=True)
    batch_s, batch_tok = timed(backend, ps, sampling, one_at_a_time=False)
    variants = {}  # the same batch again with one of the hf backend's speed-ups turned off
    if is_hf:
        from deltanas.agent.llm import hf

        for wanted, name, target, attr, off in ((a.plain, "plain", hf, "MIN_SHARED_PREFIX", 1 << 30),
                                                (a.dynamic, "dynamic", backend, "static_cache", False)):
            if wanted:
                with mock.patch.object(target, attr, off):
                    variants[name] = timed(backend, ps, sampling, one_at_a_time=False)
    backend.close()
    one_rate, batch_rate = one_tok / one_s, batch_tok / batch_s
    print(f"backend: {label} on {a.device}; {a.prompts} proposal prompts "
          f"({len({p.base_source for p in ps})} distinct parents), greedy, up to {a.max_new_tokens} tokens each")
    print(f"one at a time (baseline): {one_rate:8.1f} output tokens/s  ({one_tok} tokens in {one_s:.1f} s)")
    how = f"batch {a.batch}" if is_hf else f"all {a.prompts} at once"
    print(f"batched ({how}):      {batch_rate:8.1f} output tokens/s  ({batch_tok} tokens in {batch_s:.1f} s)")
    for name, what in (("plain", "the shared tokens computed per row"), ("dynamic", "transformers' growing cache")):
        if name in variants:
            secs, toks = variants[name]
            print(f"batched, {what}: {toks / secs:8.1f} output tokens/s  ({toks} tokens in {secs:.1f} s): "
                  f"{toks / secs / one_rate:.1f}x")
    print(f"speed-up: {batch_rate / one_rate:.1f}x (target >= 5x)")
    if a.json:
        print(json.dumps({"backend": label, "device": a.device, "prompts": a.prompts, "batch": a.batch,
                          "one_tokens_per_s": one_rate, "batch_tokens_per_s": batch_rate,
                          "speedup": batch_rate / one_rate, "one_tokens": one_tok, "batch_tokens": batch_tok,
                          **{f"{name}_tokens_per_s": variants[name][1] / variants[name][0] if name in variants else None
                             for name in ("plain", "dynamic")}}),
              file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
