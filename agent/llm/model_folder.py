"""A model as a serving engine wants it: a Hugging Face folder of safetensors weights.

vLLM loads folders; the offline models here ship as GGUF files (SmolLM2's is
Q4_1). LoRA adapters are trained on the weights transformers de-quantises from
that file, so the engine must serve those same weights, not a re-quantised
copy: the GGUF is loaded once through transformers, its GGUF mark dropped, and
saved as a folder (bf16 by default, about 270 MB for SmolLM2-135M) under the
cache. The folder is written beside its final name and renamed into place, so a
killed conversion never leaves a folder that looks whole.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from deltanas.agent.llm.hf import resolve_model

READY_MARK = ".deltanas-ready"


def default_cache() -> Path:
    return Path(os.environ.get("DELTANAS_CACHE", Path.home() / ".cache" / "deltanas")) / "models"


def serving_folder(model: str, *, cache: Path | None = None, dtype: str = "bfloat16") -> Path:
    """The folder an engine should load for `model` (an alias, a .gguf path or a folder).

    A folder is returned as it is. A GGUF model is converted once per file and reused after
    that, from any environment: the key is the file's name, size and its first and last MiB,
    not its path (each Python environment installs its own copy of a packaged model)."""
    loc = resolve_model(model)
    if not loc.gguf_file:
        folder = Path(loc.path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model {model!r}: serving engines load local folders; {loc.path} is not one")
        return folder
    gguf = Path(loc.path) / loc.gguf_file
    out = (cache or default_cache()) / f"{gguf.stem}-{dtype}-{_file_key(gguf, dtype)}"
    if (out / READY_MARK).is_file():
        return out
    _convert(model, out, dtype)
    return out


def _file_key(path: Path, dtype: str) -> str:
    size = path.stat().st_size
    h = hashlib.sha1(f"{path.name}|{size}|{dtype}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def _convert(model: str, out: Path, dtype: str) -> None:
    import torch

    from deltanas.agent.llm.hf import load_pretrained

    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r} (use bfloat16, float16 or float32)") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok, net = load_pretrained(model, "cpu", torch_dtype)
    drop_gguf_mark(net)
    net.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / READY_MARK).write_text(model + "\n")
    shutil.rmtree(out, ignore_errors=True)  # a folder without its mark is a killed conversion
    os.replace(tmp, out)


def drop_gguf_mark(net) -> None:
    """transformers dequantizes a GGUF file into ordinary float weights on load, but keeps a
    GGUF quantizer on the model, and its Trainer refuses to train one. The weights are plain
    floats (checked here), so the mark goes."""
    import torch

    quantizer = getattr(net, "hf_quantizer", None)
    if quantizer is None or str(quantizer.quantization_config.quant_method).lower().split(".")[-1] != "gguf":
        return
    if not all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in net.parameters()):
        raise ValueError("the GGUF model did not load as float weights; it cannot be trained")
    net.hf_quantizer = None
    net.is_quantized = False
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
