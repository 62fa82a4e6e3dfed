"""Checks on a patched candidate source: it changed, it compiles, and it left the
training contract alone.

By default a diff may change only the architecture. `supported_hyperparameters`,
`Net.train_setup` and `Net.learn` are compared by AST, so comments and layout
inside them may change but their code may not. This is a policy on what the
search explores, not a security boundary: the sandbox and trusted scoring are.

`protected_statements` is the one reading of what is protected: the mutator
checks its results with it, and the answer grammar (tools/diff_grammar.py) keeps
those lines as context.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from types import CodeType

from deltanas.tools.diff_errors import DiffCode, DiffError
from deltanas.tools import pyast

PROTECTED_NAMES = ("supported_hyperparameters", "train_setup", "learn")
# The keys of `protected_definitions`: the protected names where they are bound.
PROTECTED_KEYS = ("supported_hyperparameters", "Net.train_setup", "Net.learn")

_CONTEXT_LINES = 2


def _normalised(source: str) -> list[str]:
    lines = [line.rstrip() for line in source.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _compile(source: str) -> tuple[ast.Module, CodeType] | DiffError:
    """Parse and compile once: the tree feeds the protection check, the code the no-op check."""
    try:
        tree = pyast.parse(source)
        return tree, pyast.compile_code(tree)
    except SyntaxError as e:
        return _syntax_hint(source, e)
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes, lone surrogates, absurd nesting
        return DiffError(
            DiffCode.SYNTAX_ERROR,
            f"the patched model.py does not compile: {type(e).__name__}: {e}",
            hint=(
                f"After applying your diff, model.py does not compile ({type(e).__name__}: {e}). "
                "Send a diff whose '+' lines are plain, valid Python."
            ),
        )


def _syntax_hint(source: str, e: SyntaxError) -> DiffError:
    lines = source.split("\n")
    lineno = e.lineno or 0
    kind = type(e).__name__
    where = f"line {lineno}" + (f", column {e.offset}" if e.offset else "")
    shown: list[str] = []
    for n in range(max(1, lineno - _CONTEXT_LINES), min(len(lines), lineno + _CONTEXT_LINES) + 1):
        mark = ">" if n == lineno else " "
        shown.append(f"{mark}{n:4d} | {lines[n - 1]}")
        if n == lineno and e.offset:
            shown.append(" " * 5 + " | " + " " * (e.offset - 1) + "^")
    excerpt = "\n".join(shown)
    return DiffError(
        DiffCode.SYNTAX_ERROR,
        f"the patched model.py has a {kind} at {where}: {e.msg}",
        hint=(
            f"After applying your diff, model.py has a {kind} at {where}: {e.msg}\n{excerpt}\n"
            "Fix the diff so that the patched file is valid Python: check brackets, colons and "
            "the indentation of your '+' lines against the lines around them."
        ),
    )


def protected_statements(tree: ast.Module) -> Iterator[tuple[str, ast.stmt | None]]:
    """(protected name, the statement that binds it) in source order: a top-level def or
    assignment of `supported_hyperparameters`; a def or assignment of `train_setup` or `learn` in
    a top-level `class Net`, or a module-level `Net.train_setup = ...` / `Net.learn = ...`.

    A second `class Net` starts afresh: it first yields (`Net.train_setup`, None) and
    (`Net.learn`, None), as its methods replace the first class's at import time.
    """
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "supported_hyperparameters":
            yield "supported_hyperparameters", node
        elif isinstance(node, ast.ClassDef) and node.name == "Net":
            yield "Net.train_setup", None
            yield "Net.learn", None
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in PROTECTED_NAMES[1:]:
                    yield f"Net.{item.name}", item
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    for name in _assigned_names(item):
                        if name in PROTECTED_NAMES[1:]:
                            yield f"Net.{name}", item
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for name in _assigned_names(node):
                if name in PROTECTED_KEYS:
                    yield name, node


def protected_definitions(tree: ast.Module) -> dict[str, str | None]:
    """Name -> AST dump of each protected definition (None when absent). The last binding wins,
    as at import time."""
    found: dict[str, str | None] = dict.fromkeys(PROTECTED_KEYS)
    for name, stmt in protected_statements(tree):
        found[name] = None if stmt is None else ast.dump(stmt)
    return found


def protected_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every protected definition written as a def, the replaced ones included."""
    return [stmt for _, stmt in protected_statements(tree) if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _assigned_names(node: ast.stmt) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names: list[str] = []
    for t in targets:
        if isinstance(t, ast.Name):
            names.append(t.id)
        elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
            names.append(f"{t.value.id}.{t.attr}")
    return names


@dataclass(frozen=True)
class _Facts:
    code: CodeType | None  # None when the source does not compile
    protected: dict[str, str | None]


@lru_cache(maxsize=64)
def _base_facts(base_source: str) -> _Facts:
    """A run applies many diffs to the same parent, so its analysis is cached."""
    compiled = _compile(base_source)
    if isinstance(compiled, DiffError):
        return _Facts(None, dict.fromkeys(PROTECTED_KEYS))
    tree, code = compiled
    return _Facts(code, protected_definitions(tree))


def _same_code(a: CodeType, b: CodeType) -> bool:
    """Equal bytecode, names and constants: the same program whatever its
    comments and layout. Line tables are left out on purpose."""
    if (
        a.co_code != b.co_code
        or a.co_name != b.co_name
        or a.co_names != b.co_names
        or a.co_varnames != b.co_varnames
        or a.co_freevars != b.co_freevars
        or a.co_cellvars != b.co_cellvars
        or a.co_flags != b.co_flags
        or a.co_argcount != b.co_argcount
        or a.co_posonlyargcount != b.co_posonlyargcount
        or a.co_kwonlyargcount != b.co_kwonlyargcount
        or len(a.co_consts) != len(b.co_consts)
    ):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, CodeType) and isinstance(y, CodeType):
            if not _same_code(x, y):
                return False
        elif type(x) is not type(y) or x != y:  # 1, 1.0 and True are equal but not the same constant
            return False
    return True


def _protected_error(base: dict[str, str | None], new: dict[str, str | None]) -> DiffError | None:
    for name, before in base.items():
        after = new[name]
        if before == after:
            continue
        verb = "removes" if after is None else "adds" if before is None else "changes"
        return DiffError(
            DiffCode.PROTECTED_REGION,
            f"the diff {verb} {name}, which is protected",
            hint=(
                f"Your diff {verb} {name}. Only the architecture may change: layers in "
                "Net.__init__, Net.forward, and helper modules or functions. Keep "
                "supported_hyperparameters, Net.train_setup and Net.learn exactly as they are in "
                f"the baseline, and resend the diff without any '+' or '-' lines in {name}."
            ),
        )
    return None


def _no_op(what: str) -> DiffError:
    return DiffError(
        DiffCode.NO_OP,
        f"the change leaves model.py as it was ({what})",
        hint=(
            f"Your change leaves model.py's code unchanged ({what}). Propose a real architectural "
            "change: add, remove or resize a layer, or change how forward connects the layers."
        ),
    )


def check_source(base_source: str, new_source: str, *, allow_train_changes: bool = False) -> DiffError | None:
    """NO_OP, SYNTAX_ERROR or PROTECTED_REGION for a patched source; None when fine.

    A change of comments or layout only is a no-op too: the same bytecode trains
    the same network, and the model should learn to propose a real change.
    """
    if _normalised(base_source) == _normalised(new_source):
        return _no_op("at most trailing whitespace differs")
    compiled = _compile(new_source)
    if isinstance(compiled, DiffError):
        return compiled
    tree, code = compiled
    base = _base_facts(base_source)
    if base.code is not None and _same_code(base.code, code):
        return _no_op("only comments or layout differ")
    if allow_train_changes:
        return None
    return _protected_error(base.protected, protected_definitions(tree))
