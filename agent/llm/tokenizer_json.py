"""A byte-level BPE tokenizer.json declared as byte-level, for readers that go by the declaration.

Some transformers versions (5.17 on the GPU machine) convert SmolLM2's GGUF tokenizer, a GPT-2 style
byte-level BPE, with `byte_fallback` on and a sentencepiece-style decoder chain (ByteFallback, Fuse,
Replace "▁") wrapped around the ByteLevel decoder; 5.25 writes the plain byte-level form. Encoding
and decoding through transformers are the same either way. But llguidance reads the JSON, takes
`byte_fallback` for a sentencepiece vocabulary, and so takes "Ġ" and "Ċ" for literal characters
instead of a space and a newline: every answer grammar then breaks at the first space or newline
the model writes, and each constrained answer ended after a few tokens (every candidate of a GPU run
`apply_failed`). `byte_level` undoes the wrapping where the vocabulary has no byte tokens
(`<0x0A>`) for the fallback to use, which is exactly when it can change nothing for transformers.
"""
from __future__ import annotations

import json
import re

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _parts(node: dict | None) -> list[dict]:
    """A pre-tokenizer or decoder and, for a Sequence, its members."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("decoders") or []
    return [node, *(p for sub in inner for p in _parts(sub))]


def needs_fix(spec: dict) -> bool:
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    if not any(p.get("type") == "ByteLevel" for p in _parts(spec.get("pre_tokenizer"))):
        return False
    return not any(_BYTE_TOKEN.fullmatch(t) for t in (model.get("vocab") or {}))


def byte_level(text: str) -> str:
    """`text` (a tokenizer.json) with a byte-level BPE declared as one: `byte_fallback` off and the
    ByteLevel decoder alone. Returned unchanged when it already is, or is not byte-level."""
    spec = json.loads(text)
    if not needs_fix(spec):
        return text
    spec["model"]["byte_fallback"] = False
    level = next((p for p in _parts(spec.get("decoder")) if p.get("type") == "ByteLevel"), None)
    spec["decoder"] = level or {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                "use_regex": True}
    return json.dumps(spec, ensure_ascii=False)
