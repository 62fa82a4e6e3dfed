"""Typed outcomes of turning model text into a new candidate source.

Errors the model can fix are text written for the model: each has a stable
`code`, a human `message`, and a `hint` the repair prompt feeds back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class DiffCode(str, Enum):
    NO_DIFF = "no_diff"  # nothing that looks like a unified diff (or a code block in full mode)
    PLACEHOLDER_ECHO = "placeholder_echo"  # the model copied template placeholders
    UNSAFE_PATH = "unsafe_path"  # absolute path, "..", NUL, control characters
    FOREIGN_PATH = "foreign_path"  # a file other than the target
    BINARY = "binary"  # "Binary files differ" / GIT binary patch
    RENAME = "rename"  # rename/copy/delete/new-file headers
    SYMLINK = "symlink"  # mode 120000
    TOO_LARGE = "too_large"  # input or result over the size limit
    MALFORMED_HUNK = "malformed_hunk"  # unparsable hunk or header
    CONTEXT_MISMATCH = "context_mismatch"  # a hunk's old lines are not in the source
    AMBIGUOUS_MATCH = "ambiguous_match"  # a hunk's old lines match in several places
    NO_OP = "no_op"  # applies, but the source is unchanged
    SYNTAX_ERROR = "syntax_error"  # the patched source does not compile
    PROTECTED_REGION = "protected_region"  # train_setup/learn/supported_hyperparameters changed


@dataclass(frozen=True)
class DiffError:
    code: DiffCode
    message: str  # for a person, one line
    hint: str = ""  # for the model: nearest matching lines, what was expected

    def to_json(self) -> dict:
        d = asdict(self)
        d["code"] = self.code.value
        return d
