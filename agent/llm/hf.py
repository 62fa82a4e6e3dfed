"""transformers in-process backend, CPU or GPU, loading local folders or GGUF files offline.

The prompt is rendered with the tokenizer's own chat template, the same one a
LoRA trainer uses, so training and generation see identical text. Prompts are
generated in length-sorted chunks of `batch_size` with left padding. A chunk's
prompts share their leading tokens (the system prompt at least, the parent's code
too when they share a parent): those are computed once, their key/value cache
copied to every row, and each row's own tokens follow it after its padding.

`cancel` (from another thread) raises RunStopped inside the model's forward, checked
before every decoder layer: a cancelled call ends within one layer's compute, in a
long prompt's prefill as between decoding steps.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deltanas.agent.llm.base import Completion, Prompt, Sampling
from deltanas.agent.llm.model_folder import resolve_model, serving_folder
from deltanas.agent.stopping import RunStopped

log = logging.getLogger(__name__)

# Used only when a GGUF tokenizer carries no template (tinycoder's, for one).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A chunk whose prompts all start with at least this many equal tokens computes them once.
MIN_SHARED_PREFIX = 32

def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16), read from the
    kernel's CPU flags; False where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # GGUF weights are de-quantised to fp32. A CPU with bf16 matrix instructions runs the model
        # 2.5x faster in bf16, prefill and decoding alike (bench/RESULTS.md); others stay in fp32.
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)") from None


def load_pretrained(model: str, device: str, dtype=None):
    """(tokenizer, model on `device`) for an alias, a .gguf path or a local folder, offline.
    A GGUF model loads from its float32 folder (model_folder.py), converted on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(model)
    path = str(serving_folder(model, dtype="float32")) if location.gguf_file else location.path
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {model!r} offline from {path}: {e}") from None
    return tok, net.to(device)


def shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share, leaving every row at least one of its own
    (generation needs a last token to continue from); 0 for a single row."""
    if len(rows) < 2:
        return 0
    return min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1)


@dataclass
class PrefixPlan:
    """What a chunk computes once: `shared` leading tokens of every row, then, for each group of
    rows that share more (prompts of one parent), the group's further `group_len[g]` - `shared`
    tokens; `group[r]` is row r's group. MIN_SHARED_PREFIX decides what is worth sharing."""

    shared: int
    group: list[int]
    group_len: list[int]

    @property
    def grouped(self) -> bool:
        return any(n > self.shared for n in self.group_len)

    @property
    def cached(self) -> int:
        """The columns the prefix cache covers: the shared tokens and the longest group extension."""
        return self.shared + max(n - self.shared for n in self.group_len) if self.grouped else self.shared


def plan_prefixes(rows: list[list[int]]) -> PrefixPlan:
    shared = shared_prefix(rows)
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    members: list[list[int]] = []
    group = []
    for i, r in enumerate(rows):
        g = next((g for g, m in enumerate(members)
                  if len(os.path.commonprefix([rows[m[0]], r])) >= shared + MIN_SHARED_PREFIX), None)
        if g is None:
            g = len(members)
            members.append([])
        members[g].append(i)
        group.append(g)
    lens = [max(shared, shared_prefix([rows[i] for i in m])) for m in members]
    return PrefixPlan(shared, group, [n if n >= shared + MIN_SHARED_PREFIX else shared for n in lens])


def layout(rows: list[list[int]], plan: PrefixPlan, pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and attention mask of a chunk: the shared tokens, then (when grouped) each row's
    group extension right-aligned in its padded column block, then the row's own tokens right-
    aligned too, so that every row ends at the right edge (plain left padding when nothing is
    shared). Positions come from the mask, so every row's tokens keep their places."""
    ext = [plan.group_len[g] - plan.shared for g in plan.group]
    ext_w = max(ext)
    own = [len(r) - plan.shared - e for r, e in zip(rows, ext)]
    own_w = max(own)
    ids, mask = [], []
    for r, e, o in zip(rows, ext, own):
        head, middle, tail = r[:plan.shared], r[plan.shared:plan.shared + e], r[plan.shared + e:]
        ids.append(head + [pad_id] * (ext_w - e) + middle + [pad_id] * (own_w - o) + tail)
        mask.append([1] * plan.shared + [0] * (ext_w - e) + [1] * e + [0] * (own_w - o) + [1] * o)
    return ids, mask


def _cache_of(out) -> tuple[str, object]:
    """A forward pass's key/value cache and the name transformers gives it (5: `cache`, 4:
    `past_key_values`), which is also the name generate() takes it under."""
    key = "cache" if "cache" in out else "past_key_values"
    return key, out[key]


def _layered_caches() -> bool:
    """Whether transformers builds its caches from per-layer objects (`StaticLayer`, since the
    cache rework that 5.x carries): `_static` relies on that API, older versions keep the
    dynamic cache."""
    from transformers import cache_utils

    return hasattr(cache_utils, "StaticLayer")


def _static(config, kwargs: dict, max_len: int) -> dict:
    """generate()'s arguments for a static cache of `max_len` tokens: the prefix cache in
    `kwargs` (under either name) copied into one, or, with none, generate's own static cache."""
    from transformers import StaticCache

    key = next((k for k in ("cache", "past_key_values") if k in kwargs), None)
    if key is None:
        return {"cache_implementation": "static"}
    prefix = kwargs[key]
    cache = StaticCache(config=config, max_cache_len=max_len)
    for i, layer in enumerate(prefix.layers):
        cache.update(layer.keys, layer.values, i)
    return {key: cache}


def stop_points(net) -> list:
    """Where a cancel is checked: before each decoder layer (the model's longest ModuleList, which
    a LoRA wrapper keeps), or before the whole forward in a model without one."""
    import torch

    stacks = [m for m in net.modules() if isinstance(m, torch.nn.ModuleList)]
    layers = max(stacks, key=len, default=None)
    return list(layers) if layers is not None and len(layers) > 1 else [net]


class HFBackend:
    name = "hf"
    supports_grammar = True
    supports_prefix = True

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never reach for the hub
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the run's own view shows progress; tqdm bars would garble it

        self._fields(model, _pick_device(device), batch_size, seed)
        self.location = resolve_model(model)
        started = time.perf_counter()
        tok, net = load_pretrained(model, self.device, _pick_dtype(dtype, self.device))
        self._model = net.eval()
        self._tokenizer = self._prepare_tokenizer(tok)
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s on %s in %.1f s", model, self.device, self.load_seconds)

    @classmethod
    def around(cls, net, tok, *, name: str, device: str, batch_size: int = 8, seed: int = 0) -> "HFBackend":
        """The backend around a model and tokenizer already in memory and on `device` (a model built
        from a config, for a benchmark on a machine without model files)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        b = cls.__new__(cls)
        b._fields(name, device, batch_size, seed)
        b.location, b.load_seconds = None, 0.0
        b._model = net.eval()
        b._tokenizer = b._prepare_tokenizer(tok)
        return b

    def _fields(self, name: str, device: str, batch_size: int, seed: int) -> None:
        self.model_name = name
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self._calls = 0
        self._cancel = threading.Event()
        self._adapters: dict[str, str] = {}  # adapter name -> path
        self._constrainer = None
        self.active_adapter: str | None = None
        # A key/value cache allocated once per chunk and written in place. transformers' dynamic
        # cache grows every row's keys and values by a copy at every step, which on the CPU took
        # over half of a batch's decoding (bench/RESULTS.md); on a GPU that copy is cheap and the
        # static cache is unmeasured there, so it is the CPU's default only.
        self.static_cache = device == "cpu" and _layered_caches()

    def _prepare_tokenizer(self, tok):
        if not tok.chat_template:
            log.warning("tokenizer of %s has no chat template; using ChatML", self.model_name)
            tok.chat_template = CHATML_TEMPLATE
            self.template_fallback = True
        else:
            self.template_fallback = False
        tok.padding_side = "left"  # generation continues at the right edge of every row
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        return tok

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    def render(self, prompt: Prompt) -> str:
        return self._tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)

    def _eos_ids(self) -> set[int]:
        ids = {self._tokenizer.eos_token_id}
        gen = getattr(self._model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, list) else [extra])
        return {i for i in ids if i is not None}

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        import torch

        if not prompts:
            return []
        base = self.seed if sampling.seed is None else sampling.seed
        torch.manual_seed(base + self._calls)  # reproducible run to run, different call to call
        self._calls += 1
        texts = [self.render(p) + p.prefix for p in prompts]
        # Similar lengths share a chunk, so little compute goes to padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Completion | None] = [None] * len(texts)
        with self._cancellable():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, c in zip(chunk, self._generate_chunk([texts[i] for i in chunk], sampling,
                                                            [prompts[i] for i in chunk])):
                    out[i] = c
        return out  # type: ignore[return-value]

    def cancel(self) -> None:
        self._cancel.set()

    @contextmanager
    def _cancellable(self):
        """The model raises RunStopped before its next decoder layer once `cancel` is called."""
        def check(module, args):  # noqa: ARG001
            if self._cancel.is_set():
                raise RunStopped("generation cancelled")

        if self._cancel.is_set() or self._model is None:
            raise RunStopped("generation cancelled" if self._cancel.is_set() else "the backend is closed")
        handles = [m.register_forward_pre_hook(check) for m in stop_points(self._model)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @property
    def constrainer(self):
        """llguidance's view of this tokenizer, built on the first constrained prompt."""
        if self._constrainer is None:
            from deltanas.agent.llm.constrain import Constrainer

            self._constrainer = Constrainer(self._tokenizer, eos_ids=sorted(self._eos_ids()))
        return self._constrainer

    def constraint_stats(self) -> dict | None:
        return None if self._constrainer is None else self._constrainer.stats.to_json()

    def _grammar_processor(self, prompts: list[Prompt], sampling: Sampling):
        from deltanas.agent.llm.constrain import RowGrammar

        if not any(p.grammar for p in prompts):
            return None
        c = self.constrainer
        rows = [RowGrammar(p.grammar, p.prefix, c.reserve(p.base_source), p.hunks, c.per_hunk(p.base_source))
                if p.grammar and p.mode == "delta" else RowGrammar(p.grammar, p.prefix) if p.grammar else None
                for p in prompts]
        return c.processor(rows, sampling.max_new_tokens)

    def _generate_chunk(self, texts: list[str], sampling: Sampling, prompts: list[Prompt]) -> list[Completion]:
        import torch

        started = time.perf_counter()
        constrained = self._grammar_processor(prompts, sampling)
        rows = [self._tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        plan = plan_prefixes(rows)
        token_ids, mask = layout(rows, plan, self._tokenizer.pad_token_id)
        enc = {"input_ids": torch.tensor(token_ids, device=self.device),
               "attention_mask": torch.tensor(mask, device=self.device)}
        eos = self._eos_ids()
        kwargs = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self._tokenizer.pad_token_id,
                  "eos_token_id": sorted(eos)}
        if plan.cached:
            kwargs.update(self._prefix_cache(enc["input_ids"], enc["attention_mask"], plan))
        if self.static_cache:
            kwargs.update(_static(self._model.config, kwargs, len(token_ids[0]) + sampling.max_new_tokens))
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                          top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if constrained is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([constrained])
        with torch.inference_mode():
            seqs = self._model.generate(**enc, **kwargs)
        seconds = time.perf_counter() - started
        new = seqs[:, enc["input_ids"].shape[1]:].tolist()
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        out = []
        for row, (ids, n_prompt) in enumerate(zip(new, prompt_lens)):
            cut = next((j for j, t in enumerate(ids) if t in eos), None)
            kept = ids if cut is None else ids[:cut]
            grammar_row = constrained.rows[row] if constrained is not None else None
            out.append(Completion(
                text=prompts[row].prefix + self._tokenizer.decode(kept, skip_special_tokens=True),
                prompt_tokens=int(n_prompt),
                completion_tokens=len(ids) if cut is None else cut + 1,  # the EOS counts, as servers count it
                seconds=seconds / len(texts),
                meta={"batch_size": len(texts), "batch_seconds": seconds, "finished": cut is not None,
                      "adapter": self.active_adapter, "shared_prefix_tokens": plan.shared,
                      "group_prefix_tokens": plan.group_len[plan.group[row]],
                      "constrained": grammar_row is not None,
                      "grammar_error": grammar_row.failed if grammar_row is not None else None},
            ))
        return out

    def _prefix_cache(self, ids, mask, plan: PrefixPlan) -> dict:
        """generate()'s cache argument for a chunk laid out by `layout`: the shared tokens computed
        once (one row), then each group's extension (one row per group) on top of them, then every
        row given its group's cache."""
        import torch

        first = [plan.group.index(g) for g in range(len(plan.group_len))]  # a row of each group
        key, cache = None, None
        with torch.inference_mode():
            if plan.shared:
                key, cache = _cache_of(self._model(input_ids=ids[:1, :plan.shared], use_cache=True))
            if plan.grouped:
                cache_arg = {}
                if cache is not None:
                    cache.batch_repeat_interleave(len(first))
                    cache_arg = {key: cache}
                m = mask[first, :plan.cached]
                positions = (m.cumsum(-1) - 1).clamp(min=0)[:, plan.shared:]
                key, cache = _cache_of(self._model(input_ids=ids[first, plan.shared:plan.cached], attention_mask=m,
                                                   position_ids=positions, use_cache=True, **cache_arg))
                cache.batch_select_indices(torch.tensor(plan.group, device=ids.device))
            else:
                cache.batch_repeat_interleave(len(plan.group))
        return {key: cache}

    def load_adapter(self, path: str) -> None:
        """Switch to the LoRA adapter saved at `path` (a peft `save_pretrained` folder)."""
        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter at {path} (adapter_config.json is missing)")
        from peft import PeftModel

        name = re.sub(r"[^A-Za-z0-9_-]", "_", p.resolve().name) or "adapter"
        if name in self._adapters:
            name = f"{name}_{len(self._adapters)}"
        try:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(p), adapter_name=name)
                self._model.set_adapter(name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(p), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise RuntimeError(f"LoRA adapter at {path} does not fit model {self.model_name}: "
                               f"{type(e).__name__}: {e}") from None
        self._model.eval()
        self._adapters[name] = str(p)
        self.active_adapter = name
        log.info("LoRA adapter %s active (%s)", name, path)

    def close(self) -> None:
        import gc

        import torch

        self.cancel()  # a generation still in flight holds the model until its next layer
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
