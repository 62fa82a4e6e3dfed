"""Grammar-constrained decoding for in-process transformers models, through llguidance.

Each prompt that carries a grammar gets an `llguidance.LLMatcher`; at every decoding step the
processor feeds the row's last token to its matcher and masks the logits to the tokens the
grammar allows next, before temperature, top-k and top-p see them. Rows without a grammar pass
through untouched, so one batch can mix constrained and free prompts.

Closing before the budget runs out: once a row has fewer new tokens left than it needs to close
(the longest parent line plus the fence), the processor prefers, among the tokens the grammar
allows, those that end the current `+` line and those that start a context line or the closing
fence, so an answer is not cut in the middle of a hunk.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CLOSE_SLACK = 8  # tokens beyond the longest parent line that closing takes: a fence, a newline
# Under a grammar a model often writes a text in more tokens than the tokenizer would (spaces one by
# one): a SmolLM2 answer of 359 tokens as tokenized took 512 as generated. The estimates above are
# of tokenized text, so closing starts this much earlier.
TOKENIZATION_SLACK = 1.4


class GrammarCompileError(RuntimeError):
    """The grammar library refused a grammar (a bug in the grammar builder, or a hostile parent)."""


@dataclass
class MaskStats:
    """What constraining cost: compiles and their seconds, masks computed and their seconds."""

    compiles: int = 0
    compile_seconds: float = 0.0
    masks: int = 0
    mask_seconds: float = 0.0
    closing_steps: int = 0

    def to_json(self) -> dict:
        return {"compiles": self.compiles, "compile_seconds": round(self.compile_seconds, 4),
                "masks": self.masks, "mask_seconds": round(self.mask_seconds, 4),
                "mask_ms": round(1e3 * self.mask_seconds / self.masks, 4) if self.masks else None,
                "closing_steps": self.closing_steps}


class Constrainer:
    """The llguidance view of one tokenizer: compiled grammars (cached by text) and per-token facts
    the closing rule needs. Built once per backend; about a second for a 50k vocabulary."""

    def __init__(self, hf_tokenizer, *, eos_ids: list[int] | None = None, cache_size: int = 64):
        from copy import copy

        import llguidance
        import numpy as np

        from deltanas.agent.llm.tokenizer_json import byte_level

        self.tokenizer = hf_tokenizer
        # As llguidance.hf.from_tokenizer does, but with a byte-level vocabulary declared as one
        # (tokenizer_json.py: a folder converted by some transformers versions hides it).
        backend = copy(hf_tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        # The ends of a turn the model's generation config knows too (a chat model's end-of-turn
        # token), so an answer the grammar has closed ends where generate() stops.
        self.ll = llguidance.LLTokenizer(byte_level(backend.to_str()),
                                         eos_token=eos_ids or hf_tokenizer.eos_token_id)
        self.vocab = self.ll.vocab_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size
        self.stats = MaskStats()
        first = np.zeros(self.vocab, dtype=bool)  # tokens whose text starts a diff line we may close with
        fence = np.zeros(self.vocab, dtype=bool)
        header = np.zeros(self.vocab, dtype=bool)
        plus = np.zeros(self.vocab, dtype=bool)
        newline = np.zeros(self.vocab, dtype=bool)
        line_end = np.zeros(self.vocab, dtype=bool)
        closer = np.zeros(self.vocab, dtype=bool)
        opener = np.zeros(self.vocab, dtype=bool)
        for t in range(self.vocab):
            b = self.ll.decode_bytes([t])
            first[t] = b[:1] in (b" ", b"`")
            fence[t] = b[:1] == b"`"
            header[t] = b[:1] == b"@"
            plus[t] = b[:1] == b"+"
            newline[t] = b"\n" in b
            line_end[t] = b.endswith(b"\n")
            closer[t] = any(c in b for c in b")]},")
            opener[t] = b"(" in b
        self.starts_closing_line = first
        self.starts_fence = fence
        self.starts_header = header
        self.starts_plus = plus
        self.has_newline = newline
        self.ends_line = line_end
        self.has_closer = closer
        self.has_opener = opener

    def matcher(self, lark: str):
        """A fresh matcher for `lark`, compiled once per distinct grammar."""
        import llguidance

        m = self._cache.get(lark)
        if m is None:
            started = time.perf_counter()
            m = llguidance.LLMatcher(self.ll, lark, log_level=0)
            self.stats.compiles += 1
            self.stats.compile_seconds += time.perf_counter() - started
            if m.is_error():
                raise GrammarCompileError(f"the grammar did not compile: {m.get_error()[:500]}")
            self._cache[lark] = m
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(lark)
        return m.deep_copy()

    def tokens(self, text: str) -> list[int]:
        return self.ll.tokenize_str(text)

    def reserve(self, parent_source: str) -> int:
        """New tokens a delta answer may still need to close: a removed line the grammar may force
        (when a hunk has no change yet), the context line after it, and the fence."""
        lines = parent_source.splitlines() or [""]
        longest = max(lines, key=len)
        return 2 * len(self.tokens(" " + longest + "\n")) + CLOSE_SLACK

    def per_hunk(self, parent_source: str) -> int:
        """New tokens a hunk the grammar still requires takes at least: its header, two context lines
        and an added line, as long as a typical (third-longest quarter) line of the parent, and
        another added line as long as its longest (a layer written out in full)."""
        lines = sorted((x for x in parent_source.splitlines() if x.strip()), key=len) or [""]
        typical = lines[(3 * len(lines)) // 4 - (1 if len(lines) >= 4 else 0)]
        return (3 * len(self.tokens(" " + typical + "\n")) + len(self.tokens(" " + lines[-1] + "\n"))
                + len(self.tokens("@@ -100 @@\n")))

    def processor(self, rows: list["RowGrammar | None"], max_new_tokens: int) -> "GrammarLogitsProcessor":
        return GrammarLogitsProcessor(self, rows, max_new_tokens)


@dataclass
class RowGrammar:
    """One prompt's constraint: the grammar of what follows its pre-filled prefix, and the tokens
    to keep in hand for closing."""

    lark: str
    prefix: str = ""
    reserve: int = 0
    hunks: int = 0  # hunks the grammar requires (one per edit site)
    per_hunk: int = 0  # tokens each required hunk not yet started takes at least
    matcher: object = None
    text: str = ""  # what the row has written since its last newline (for the closing rule)
    lines: list[str] = field(default_factory=list)  # the answer's finished lines
    done: bool = False
    failed: str | None = None


class GrammarLogitsProcessor:
    """A transformers LogitsProcessor over a batch whose rows may each carry a grammar."""

    def __init__(self, constrainer: Constrainer, rows: list[RowGrammar | None], max_new_tokens: int):
        self.c = constrainer
        self.rows = rows
        self.max_new = max_new_tokens
        self.step = 0
        for r in rows:
            if r is None:
                continue
            r.matcher = constrainer.matcher(r.lark)  # the grammar of what follows the pre-filled prefix
            r.text = r.prefix.rsplit("\n", 1)[-1]

    def __call__(self, input_ids, scores):
        import numpy as np
        import torch

        if self.step > 0:
            last = input_ids[:, -1].tolist()
            for r, tok in zip(self.rows, last):
                if r is None or r.done:
                    continue
                if not r.matcher.consume_token(tok):
                    r.failed = r.matcher.get_error()[:300]
                    r.done = True
                    continue
                *ended, r.text = (r.text + self.c.ll.decode_str([tok])).split("\n")
                r.lines.extend(ended)
                if r.matcher.is_stopped():
                    r.done = True
        self.step += 1
        left = self.max_new - self.step + 1  # new tokens left, this one included
        vocab = scores.shape[-1]
        started = time.perf_counter()
        masks = []
        for r in self.rows:
            if r is None:
                masks.append(None)
                continue
            if r.done:  # the answer is complete (or broken): only end-of-sequence from here on
                allowed = np.zeros(self.c.vocab, dtype=bool)
                allowed[self.c.ll.eos_tokens] = True
            else:
                bits = np.frombuffer(r.matcher.compute_bitmask(), dtype=np.uint8)
                allowed = np.unpackbits(bits, bitorder="little")[: self.c.vocab].astype(bool)
                self.c.stats.masks += 1
                if not allowed.any():  # the matcher is stuck (a limit, an error): end the answer, and say why
                    r.failed = f"no token allowed after {len(r.lines)} line(s): {r.matcher.get_error() or 'empty mask'}"[:300]
                    r.done = True
                    allowed[self.c.ll.eos_tokens] = True
                elif left <= TOKENIZATION_SLACK * (r.reserve + r.per_hunk * max(0, r.hunks - self._started(r))):
                    allowed = self._closing(r, allowed)
                elif r.text == "" and self._repeating(r):
                    allowed = self._prefer(allowed, ~self.c.starts_plus)
            masks.append(allowed)
        self.c.stats.mask_seconds += time.perf_counter() - started
        out = scores.clone()
        for i, allowed in enumerate(masks):
            if allowed is None:
                continue
            full = np.zeros(vocab, dtype=bool)
            n = min(vocab, len(allowed))
            full[:n] = allowed[:n]
            out[i, ~torch.from_numpy(full).to(out.device)] = float("-inf")
        return out

    @staticmethod
    def _started(r: RowGrammar) -> int:
        return sum(x.startswith("@@") for x in r.lines) + r.text.startswith("@@")

    @staticmethod
    def _repeating(r: RowGrammar) -> bool:
        """Did the last '+' line repeat the line before it? Small models loop on a line until the
        group's cap; a repeated line ends the group instead."""
        return len(r.lines) >= 2 and r.lines[-1].startswith("+") and r.lines[-1][1:] == r.lines[-2][1:]

    @staticmethod
    def _prefer(allowed, wanted):
        both = allowed & wanted
        return both if both.any() else allowed

    def _closing(self, r: RowGrammar, allowed):
        """Among the allowed tokens, those that move toward the end. At a line's start: the closing
        fence, else the next hunk's header (a hunk the grammar still requires), else a context line
        (which ends a change group). In a '+' line: end it. Falls back to all allowed tokens when
        none of those is."""
        self.c.stats.closing_steps += 1
        if r.text == "":
            for wanted in (self.c.starts_fence, self.c.starts_header):
                both = allowed & wanted
                if both.any():
                    return both
            return self._prefer(allowed, self.c.starts_closing_line)
        if r.text.startswith("+"):
            # End the line if it may end (with a bare newline, so that the next line's start is
            # chosen by the rule above); else close a bracket or the element; else open the call a
            # constructor needs. Each step then moves toward the newline.
            for wanted in (self.c.ends_line, self.c.has_newline, self.c.has_closer, self.c.has_opener):
                both = allowed & wanted
                if both.any():
                    return both
        return allowed
