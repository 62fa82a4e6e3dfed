"""The LoRA update: trl's SFTTrainer with peft on the cycle's training examples.

The paper's settings are the defaults (DESIGN.md): r=32, alpha=32, dropout 0.05
on every attention and MLP projection; lr 1e-5, 3 epochs, gradient accumulation
8, weight decay 0.01, a cosine schedule. The paper also adapts `lm_head`; trl
(1.16) computes log-probabilities from `lm_head.weight` directly and refuses an
adapter there ("the adapter would never be trained"), so `lm_head` is off by
default and turning it on fails with trl's message. Examples are
conversational prompt-completion pairs (agent/learning/examples.py), so trl renders them
with the tokenizer's own chat template (the one the hf backend serves with) and
puts the loss on the completion's tokens only.

An adapter is written to a hidden sibling folder and renamed into place only
once it is whole, so `adapters/cycle-<k>/` either holds a complete adapter or
does not exist: an update killed midway leaves nothing the run would load, and
is redone on resume.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # llama, qwen, mistral
               "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
               "fc1", "fc2", "out_proj", "Wqkv", "wo", "w1", "w2", "w3")
META_FILE = "deltanas_adapter.json"
METHODS = ("sft", "dpo")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 32
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-5
    epochs: float = 3.0
    grad_accum: int = 8
    weight_decay: float = 0.01
    scheduler: str = "cosine"
    batch_size: int = 1
    max_length: int = 2048
    lm_head: bool = False  # the paper adapts lm_head too; trl 1.16 refuses it (see the module's note)
    qlora: bool = False  # 4-bit base; needs a GPU and bitsandbytes
    dpo_beta: float = 0.1  # trl's default: how far the DPO update may move from the reference
    checkpointing: bool = False  # recompute activations in the backward pass: less memory, a third more compute


def target_modules(model, lm_head: bool = True) -> list[str]:
    """The attention and MLP projections the model has (by their last name), plus lm_head."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = sorted(names & set(PROJECTIONS))
    if not found:
        raise ValueError(f"no attention/MLP projection layers found among {sorted(names)[:20]}")
    if lm_head and "lm_head" in names:
        found.append("lm_head")
    return found


def adapter_complete(path: Path) -> bool:
    p = Path(path)
    return (p / "adapter_config.json").is_file() and (p / META_FILE).is_file() and any(
        (p / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin"))


def train_adapter(model: str, examples: list[dict[str, Any]], out_dir: Path, settings: LoraSettings,
                  device: str = "cpu", seed: int = 0, stop=None, start_from: Path | None = None,
                  method: str = "sft", progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Trains an adapter on `examples` and moves it to `out_dir` when whole: a fresh one, or one that
    starts from the adapter at `start_from` (a bootstrap's: its rank and targets then hold, and
    `settings`' r, alpha and dropout are not used). `method` "sft": prompt-completion examples
    (trl's SFTTrainer, loss on the completion); "dpo": preference examples, each a prompt with a
    chosen and a rejected answer (trl's DPOTrainer, with `settings.dpo_beta`; the reference is the
    adapter it starts from, which trl copies as a frozen `ref` adapter, or the base model for a
    fresh one). Only the trained adapter is saved. Returns
    {"loss", "steps", "examples", "seconds", ...}; `progress`, if given, hears a line about every
    tenth of the steps (the step, the loss, the time so far). A set `stop` event (threading.Event)
    aborts with RunStopped before the next decoder layer's forward (or micro-batch), leaving
    no adapter: on a CPU one micro-batch of a long example takes a minute."""
    if not examples:
        raise ValueError("no training examples")
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; use sft or dpo")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig
    from datasets.utils.logging import disable_progress_bar
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from deltanas.agent.llm.hf import CHATML_TEMPLATE, load_pretrained, stop_points
    from deltanas.agent.learning.examples import as_dataset
    from deltanas.agent.llm.model_folder import drop_gguf_mark

    hf_logging.disable_progress_bar()
    disable_progress_bar()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    quant = {}
    if settings.qlora:
        if not device.startswith("cuda"):
            raise ValueError("QLoRA needs a GPU (learn.qlora = true with a CPU device)")
        from transformers import BitsAndBytesConfig

        quant = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)}
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tok, net = load_pretrained(model, device, dtype) if not quant else _load_quantized(model, quant)
    if not quant:
        drop_gguf_mark(net)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE  # the same fallback the hf backend serves with
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"

    partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        # The run's view reports the update; trl's and transformers' notices of renamed options
        # (and peft's on a GGUF model's missing config.json) would only clutter it.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(trl|transformers|deltanas)\.")
        warnings.filterwarnings("ignore", message="Could not find a config file", module=r"peft\.")
        common = dict(
            output_dir=str(partial / "trainer"), learning_rate=settings.lr, num_train_epochs=settings.epochs,
            gradient_accumulation_steps=settings.grad_accum, weight_decay=settings.weight_decay,
            lr_scheduler_type=settings.scheduler, per_device_train_batch_size=settings.batch_size,
            max_length=settings.max_length, truncation_mode="keep_end", report_to=[], save_strategy="no",
            logging_steps=1, seed=seed, use_cpu=device == "cpu", bf16=device != "cpu", disable_tqdm=True,
            dataloader_num_workers=0, gradient_checkpointing=settings.checkpointing)
        args = (SFTConfig(**common, completion_only_loss=True) if method == "sft"
                else DPOConfig(**common, beta=settings.dpo_beta))
        if start_from is not None:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, str(start_from), is_trainable=True)
            peft_config = None
            targets = sorted(net.peft_config["default"].target_modules)
        else:
            peft_config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                     target_modules=target_modules(net, settings.lm_head), task_type="CAUSAL_LM")
            targets = sorted(peft_config.target_modules)
        trainer = (SFTTrainer if method == "sft" else DPOTrainer)(
            model=net, args=args, train_dataset=as_dataset(examples), processing_class=tok,
            peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)  # the run's own view reports the update
        if progress is not None:
            trainer.add_callback(_progress_callback(progress, started))
        if stop is not None:
            trainer.add_callback(_stop_callback(stop))
            for layer in stop_points(trainer.model):
                layer.register_forward_pre_hook(_stop_hook(stop))
        out = trainer.train()
        adapter = partial / "adapter"
        trainer.model.save_pretrained(str(adapter), selected_adapters=["default"])  # not DPO's frozen `ref`
        info = {"loss": float(out.training_loss), "steps": int(out.global_step), "examples": len(examples),
                "method": method,
                "seconds": time.perf_counter() - started, "base_model": model,
                "quantization": "nf4" if quant else None,
                "settings": settings.__dict__, "target_modules": targets,
                "start_from": str(start_from) if start_from is not None else None}
        (adapter / META_FILE).write_text(json.dumps(info, indent=2))
        _fsync_tree(adapter)
        if out_dir.exists():  # a complete adapter is never overwritten in place
            shutil.rmtree(out_dir)
        os.replace(adapter, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return info


def _stop_hook(stop):
    from deltanas.agent.stopping import RunStopped

    def check(*_):
        if stop.is_set():
            raise RunStopped("stop requested during the LoRA update")

    return check


def _progress_callback(say: Callable[[str], None], started: float):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            step, total = state.global_step, state.max_steps or 1
            if logs and "loss" in logs and (step % max(1, total // 10) == 0 or step == total):
                say(f"step {step}/{total}, loss {logs['loss']:.4f}, {time.perf_counter() - started:.0f} s")
            return control

    return Progress()


def _stop_callback(stop):
    """Raises RunStopped before training and between micro-batches once the run is asked to stop."""
    from transformers import TrainerCallback

    check = _stop_hook(stop)

    class StopCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            check()
            return control

        def on_substep_end(self, args, state, control, **kwargs):
            check()
            return control

        def on_step_end(self, args, state, control, **kwargs):
            check()
            return control

    return StopCallback()


def copy_adapter(src: Path, dest: Path) -> None:
    """A whole adapter copied to `dest`, through a hidden sibling renamed into place (as trained ones are)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, partial)
        _fsync_tree(partial)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def clear_partials(adapters_dir: Path) -> int:
    """Removes what killed updates left behind; returns how many."""
    n = 0
    for p in Path(adapters_dir).glob(".*.partial-*"):  # .cycle-<k>.partial-*, .cold-start.partial-*
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


def _load_quantized(model: str, quant: dict):
    """(tokenizer, 4-bit model on GPU 0). A GGUF model goes through its plain-weights folder
    (agent/llm/model_folder.py): transformers quantizes float weights, not GGUF blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltanas.agent.llm.model_folder import resolve_model, serving_folder

    loc = resolve_model(model)
    path = str(serving_folder(model, dtype="float32")) if loc.gguf_file else loc.path
    return (AutoTokenizer.from_pretrained(path, local_files_only=True),
            AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, local_files_only=True, **quant))


def _fsync_tree(root: Path) -> None:
    for p in Path(root).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
