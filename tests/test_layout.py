"""The README's layout lists every module of the package, and nothing that is not there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "tools", "sandbox")


def listed() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    rows = [re.match(r"^(\S+)\s{2,}(\S.*)$", line) for line in block.splitlines() if line.strip()]
    assert all(rows), [line for line, row in zip(block.splitlines(), rows) if not row]
    return {row.group(1): row.group(2) for row in rows}


def test_every_listed_path_exists_and_says_what_it_holds():
    rows = listed()
    missing = [path for path in rows if not (ROOT / path).exists()]
    assert not missing, missing
    assert all(len(what) > 10 for what in rows.values())


def test_every_module_is_listed():
    rows = listed()
    folders = [path for path in rows if path.endswith("/")]
    modules = [str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts]
    unlisted = [m for m in modules if m not in rows and not any(m.startswith(f) for f in folders)]
    assert modules and not unlisted, unlisted
