"""Thread-safe `ast.parse` and `compile`.

CPython 3.11's parser keeps its AST recursion-depth counter in shared state;
parsing from several threads at once raises "SystemError: AST constructor
recursion depth mismatch". The graph applies a cycle's candidates in parallel
threads, so every parse and compile in the project goes through this lock.
"""
from __future__ import annotations

import ast
import threading
from types import CodeType

_LOCK = threading.RLock()


def parse(source: str, filename: str = "model.py") -> ast.Module:
    with _LOCK:
        return ast.parse(source, filename)


def compile_code(source: str | ast.Module, filename: str = "model.py") -> CodeType:
    with _LOCK:
        return compile(source, filename, "exec", dont_inherit=True)
