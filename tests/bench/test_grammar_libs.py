"""bench/grammar_libs.py: compile and mask cost of the per-parent diff grammar, per structured-decoding
library, side by side. CI has llguidance only: the others must be reported as skipped, with why."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import load_bench

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "grammar_libs.py"
PARENTS = {"lenet", "resnet+helpers"}  # --quick: lenet and the 200-line parent
OTHERS = ("xgrammar", "xgrammar-dyn", "outlines-core")

pytest.importorskip("llguidance")


def _tinycoder_available() -> bool:
    from deltanas.agent.llm.model_folder import resolve_model

    try:
        resolve_model("tinycoder")
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _tinycoder_available(), reason="the tinycoder GGUF package is not installed")


def run_bench(tmp_path: Path, *args: str, hide: tuple[str, ...] = ()) -> dict:
    """Run the bench's --quick size; `hide`: modules made unimportable, as where they are not installed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if hide:
        shims = tmp_path / "shims"
        shims.mkdir()
        for module in hide:
            (shims / f"{module}.py").write_text(f'raise ImportError("No module named {module}")\n')
        env["PYTHONPATH"] = os.pathsep.join([str(shims), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = tmp_path / "grammar_libs.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "library" in proc.stdout and "llguidance" in proc.stdout, proc.stdout[-2000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def without_others(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("grammar_libs"), hide=("xgrammar", "outlines_core"))


def test_llguidance_has_a_timed_row_per_parent_and_mode(without_others):
    rows = [r for r in without_others["rows"] if r["library"] == "llguidance"]
    assert {(r["parent"], r["mode"]) for r in rows} == {(p, m) for p in PARENTS for m in ("full", "narrowed")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["compile_ms"] > 0 and len(r["compile_ms_all"]) == 1, r  # --quick: one repeat
        assert r["tokens"] > 0 and r["mask_us_median"] > 0 and r["first_mask_us"] > 0, r
        assert r["answer_ms"] >= r["compile_ms"], r
        assert r["extra"]["rejects_bad_answer"] is True, r
    assert {r["lines"] for r in rows if r["parent"] == "resnet+helpers"} == {200}
    narrowed = {r["parent"]: r for r in rows if r["mode"] == "narrowed"}
    full = {r["parent"]: r for r in rows if r["mode"] == "full"}
    assert all(narrowed[p]["rules"] < full[p]["rules"] for p in PARENTS)
    info = without_others["info"]
    assert info["tokenizer"] == "tinycoder" and info["repeats"] == 1
    assert set(without_others["answers"]) == PARENTS


def test_libraries_not_installed_are_skipped_with_the_reason(without_others):
    for lib in OTHERS:
        rows = [r for r in without_others["rows"] if r["library"] == lib]
        assert len(rows) == 2 * len(PARENTS), lib
        for r in rows:
            assert r["status"] == "skipped" and "not installed" in r["note"] and "pip install" in r["note"], r
            assert r["compile_ms"] is None and r["mask_us_median"] is None, r


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None or importlib.util.find_spec("outlines_core") is None,
                    reason="xgrammar and outlines-core are not both installed")
def test_other_libraries_are_measured_beside_llguidance(tmp_path):
    # --max-regex 1: outlines-core gets no regex it could compile in CI time, so every row says why
    res = run_bench(tmp_path, "--libs", "llguidance,xgrammar,outlines-core", "--max-regex", "1")
    by_lib: dict[str, list] = {}
    for r in res["rows"]:
        by_lib.setdefault(r["library"], []).append(r)
    assert set(by_lib) == {"llguidance", "xgrammar", "outlines-core"}
    for r in by_lib["xgrammar"]:
        assert r["status"] == "ok" and r["compile_ms"] > 0 and r["tokens"] > 0, r
        assert r["extra"]["rejects_bad_answer"] is True, r  # the converted grammar still checks context lines
        assert "lower bound" in r["note"], r  # the &/~ terminals were approximated, and the row says so
    for r in by_lib["outlines-core"]:
        assert r["status"] == "infeasible" and "no CFG support" in r["note"], r


def test_the_grammar_as_one_regex_admits_the_answer_and_refuses_a_wrong_one():
    """The outlines-core path, checked with Python's re: the inlined narrowed grammar takes the
    bench's answer and not the same answer with a broken context line."""
    gl = load_bench("grammar_libs")
    src = gl.get_baseline("lenet").source
    answer = gl.find_answer(src)
    assert answer is not None and gl.accepts(gl.delta_grammar(src).lark, answer.text)
    lark = gl.delta_grammar(src, sites=gl.site_window(answer.anchor)).lark
    regex, cut = gl.inline_regex(lark, 10**6)
    assert cut  # the terminals with & or ~ were cut to their first operand
    assert re.fullmatch(regex, answer.text)
    assert not re.fullmatch(regex, gl.bad_answer(answer.text))
    with pytest.raises(gl.RegexTooLarge, match="no CFG support"):
        gl.inline_regex(gl.delta_grammar(src).lark, 10**6)


def test_regex_terminals_become_ebnf_with_shared_groups():
    gl = load_bench("grammar_libs")
    assert gl.regex_to_ebnf(r"(?:    |\t){0,2}x") == '("    " | "\\t"){0,2} "x"'
    shared: dict[str, str] = {}
    ebnf = gl.regex_to_ebnf(r"(?:a|\((?:b|\[c*\])*\)|\[(?:b|\[c*\])*\])*", shared)
    assert ebnf == "xsub1*" and len(shared) == 2  # the inner group is written once, used twice
    ebnf, cut = gl.EbnfWriter().convert('start: "x" A{1,3} "\\n"\nA: /[ab]+/ & ~/b.*/\nB: "unused"\n')
    assert cut == ["A"] and "g_B" not in ebnf
    assert ebnf.splitlines()[:3] == ["root ::= g_start", 'g_start ::= "x" (g_A){1,3} "\\n"', "g_A ::= xre0"]
