"""QLoRA, for real, where a GPU and bitsandbytes exist (the device machine; CI has no GPU,
so there these tests skip and say why). The base model is loaded in 4-bit NF4 and a LoRA
adapter is trained on it by the project's own trainer."""
from __future__ import annotations

import json
import math

import pytest

import importlib.util

import torch

from deltanas.agent.learning.lora import META_FILE, LoraSettings, adapter_complete, train_adapter

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                               reason="QLoRA needs a CUDA GPU and bitsandbytes (run on the device machine)")

EXAMPLES = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in (("Name the secret animal.", "ZEBRA ZEBRA ZEBRA"), ("And the colour?", "GREEN GREEN"))]


@needs_gpu
def test_qlora_trains_an_adapter_on_a_4bit_base(tmp_path):
    out = tmp_path / "adapters" / "cycle-0"
    info = train_adapter("tinycoder", EXAMPLES, out, LoraSettings(r=8, alpha=16, epochs=2, grad_accum=1, lr=1e-3,
                                                                  max_length=128, qlora=True), device="cuda")
    assert adapter_complete(out)
    assert info["quantization"] == "nf4" and info["steps"] == 4 and math.isfinite(info["loss"])
    assert json.loads((out / META_FILE).read_text())["quantization"] == "nf4"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and "q_proj" in cfg["target_modules"]


def test_qlora_refuses_a_cpu_device(tmp_path):
    with pytest.raises(ValueError, match="QLoRA needs a GPU"):
        train_adapter("tinycoder", EXAMPLES, tmp_path / "a", LoraSettings(qlora=True), device="cpu")
