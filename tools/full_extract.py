"""Full-generation mode: the model rewrites the whole file.

This is the paper's comparison arm. The new file is taken from the reply, put
through the same checks as a patched file, and described by a difflib diff so
that both modes report diff sizes the same way.
"""
from __future__ import annotations

import difflib

from deltanas.tools.diff_apply import ApplyResult
from deltanas.tools.diff_errors import DiffCode, DiffError
from deltanas.tools.diff_extract import fenced_blocks, find_placeholder, normalise_newlines
from deltanas.tools.protected import check_source
from deltanas.tools import pyast

_PYTHON_TAGS = frozenset({"python", "py", "python3", ""})

EXAMPLE_FULL = """\
```python
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        ...  # the complete, changed architecture; train_setup and learn as in the baseline
```"""


def _no_code() -> DiffError:
    return DiffError(
        DiffCode.NO_DIFF,
        "no Python code block found in the reply",
        hint=(
            "I could not find the new model.py in your reply. Reply with the complete file in one "
            f"```python block, starting like this:\n{EXAMPLE_FULL}\nWrite out every line; do not "
            "abbreviate unchanged parts."
        ),
    )


def _code_in(text: str) -> str | None:
    blocks = [b.body for b in fenced_blocks(text) if b.tag in _PYTHON_TAGS and b.body.strip()]
    if blocks:
        return max(blocks, key=len)
    if "class Net" in text:
        try:
            pyast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
        return text
    return None


def _with_final_newline(code: str) -> str:
    return code.rstrip("\n") + "\n"


def apply_full_output(
    base_source: str,
    model_text: str,
    *,
    allow_train_changes: bool = False,
    max_bytes: int = 200_000,
) -> ApplyResult:
    """Raw model text holding a whole new file -> checked source, with its diff against base."""
    size = len(model_text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        err = DiffError(
            DiffCode.TOO_LARGE,
            f"reply is {size} bytes, over the {max_bytes}-byte limit",
            hint=f"Your reply is too large ({size} bytes, the limit is {max_bytes}). Send only the new model.py.",
        )
        return ApplyResult(False, None, err, "", 0, 0, 0)
    code = _code_in(normalise_newlines(model_text)) if model_text.strip() else None
    if code is None:
        return ApplyResult(False, None, _no_code(), "", 0, 0, 0)
    base = normalise_newlines(base_source)
    new = _with_final_newline(code)
    diff_lines = list(
        difflib.unified_diff(base.splitlines(True), new.splitlines(True), "a/model.py", "b/model.py")
    )
    diff = "".join(x if x.endswith("\n") else x + "\n" for x in diff_lines)
    body = [x for x in diff_lines[2:] if not x.startswith("@@")]
    added = sum(x.startswith("+") for x in body)
    removed = sum(x.startswith("-") for x in body)
    hunks = sum(x.startswith("@@") for x in diff_lines)

    placeholder = find_placeholder(new.split("\n"))
    if placeholder is not None:
        err = DiffError(
            DiffCode.PLACEHOLDER_ECHO,
            f"the file contains a template placeholder: {placeholder!r}",
            hint=(
                f"Your file contains {placeholder!r}. Placeholders and elisions are not code: write "
                "out the complete model.py, every line, with real Python in place of any placeholder."
            ),
        )
    elif len(new.encode("utf-8", "surrogatepass")) > max_bytes:
        err = DiffError(DiffCode.TOO_LARGE, "the new file is over the size limit", hint="Send a smaller model.py.")
    else:
        err = check_source(base, new, allow_train_changes=allow_train_changes)
    return ApplyResult(err is None, new if err is None else None, err, diff, added, removed, hunks)
