"""The run's configuration: one pydantic model, read from TOML plus CLI overrides.

Everything is validated before anything starts; an unknown key or a bad value is
one clear message. Checks that need the machine (a GPU index, a Docker daemon,
the dataset) are `preflight` in agent/run/build.py, so that this module stays
import-light. A job's defaults (limits, epochs, batch size, hyperparameters) are
those of sandbox/base.py, stated there once.
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deltanas.sandbox.base import DEFAULT_HYPERPARAMETERS, JobSpec, Limits

if TYPE_CHECKING:
    from deltanas.agent.llm.factory import LLMSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_BASELINES = ("lenet", "resnet", "mobilenet")
_LIMITS = Limits()
_JOB = {f.name: f.default for f in fields(JobSpec)}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LLMConfig(_Section):
    spec: str = "hf:smollm2"
    """Backend and model: `hf:smollm2`, `hf:PATH`, `openai:MODEL@URL`, `vllm:MODEL` or `mutate`."""
    device: str = "auto"
    """Where an in-process model runs: `auto`, `cpu`, `cuda`, `cuda:N`."""
    batch_size: int = Field(8, gt=0)
    """Prompts per batched generate call."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`hf:` weights' type. `auto`: bf16 on a GPU, and on a CPU with bf16 matrix instructions
    (AMX or AVX512-BF16); fp32 on other CPUs."""
    temperature: float = Field(0.35, ge=0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(512, gt=0)
    """The paper uses 1024; the CPU demo caps answers lower so it finishes in minutes (an answer
    at four edit sites takes 250-450 tokens)."""
    timeout_s: float = Field(600.0, gt=0)
    """Per-request timeout for server backends."""
    gpu_memory: float = Field(0.5, gt=0, le=1)
    """`vllm:` on a GPU: the engine's share of GPU memory; the rest is left to the LoRA trainer."""
    constrain: Literal["grammar", "prefix", "none"] = "grammar"
    """How answers are held to the format. `grammar`: decoding follows a grammar built from the
    parent that admits only diffs that apply (tools/diff_grammar.py; hf, vllm and openai backends,
    prefix elsewhere). `prefix`: the diff's header is pre-filled. `none`: the paper's unconstrained
    protocol (`--preset paper`)."""
    sites: Literal["sampled", "free"] = "sampled"
    """Under the grammar, where edits go. `sampled`: the search draws `search.edit_sites` layer lines
    per candidate and the answer edits each of them (a small model chooses sites poorly, and the
    draws spread a cycle's edits over the network); `free`: wherever the model chooses."""
    layers: Literal["typed", "free"] = "typed"
    """Under the grammar, what a line added inside an `nn.Sequential` may be. `typed`: a layer from
    a menu that keeps the shapes there, its channel count read from the parent
    (tools/layer_types.py), so any model's additions there build; `free`: any constructor call."""
    seed_requests: bool = False
    """`openai:`: send the run's seed with each request. Off by default: vLLM's CPU engine dies on
    per-request seeds; a server's own seed (`deltanas serve` sets one) still applies."""

    @field_validator("spec")
    @classmethod
    def _spec_parses(cls, v: str) -> str:
        from deltanas.agent.llm.factory import parse_llm_spec

        parse_llm_spec(v)  # raises ValueError with the accepted forms
        return v

    @property
    def backend(self) -> LLMSpec:
        """The parsed `spec` (backend type, model, server URL): what the rest of the code reads.
        The parse is cached per spec string, so it runs once, at validation."""
        from deltanas.agent.llm.factory import parse_llm_spec

        return parse_llm_spec(self.spec)


class SearchConfig(_Section):
    cycles: int = Field(2, gt=0)
    """Cycles of propose → apply/repair → novelty → proxy-train. The paper runs 22."""
    candidates: int = Field(4, gt=0)
    """Candidates per cycle. The paper uses 50."""
    mode: Literal["delta", "full"] = "delta"
    """`delta`: the model writes a unified diff; `full`: it rewrites the whole file."""
    max_repairs: int = Field(2, ge=0)
    """Retries after a failed diff, each feeding the error back to the model."""
    goal: str = "improve the first-epoch test accuracy"
    allow_train_changes: bool = False
    """Allow diffs to change train_setup, learn or supported_hyperparameters."""
    review: bool = False
    """Pause before training each novel candidate for a person's yes / no / edit (`deltanas run
    --review`); the question waits in the checkpoint, so a killed run asks it again on resume."""
    train_duplicates: bool = False
    """Train near-copies too and record their accuracy. They stay `duplicate` and never become
    parents; a measurement (bench/valid_rate.py) then sees whether they would have trained."""
    retry_duplicates: bool = True
    """A near-copy of an archived network is sent back to the model, as a failed diff is, within
    `max_repairs`: with the similarity it reached, and new edit sites and layer kinds where the
    search draws them. A cheap second draw (no training) instead of a lost candidate; the
    near-copies that remain are recorded as `duplicate`. Off under `train_duplicates`."""
    retry_widen: int = Field(0, ge=0)
    """A near-copy sent back as the candidate's k-th retry draws `edit_sites` + k × this many edit
    sites (as many as the parent has), with a hunk allowed for each: a near-copy changed too little,
    and as many small edits elsewhere in a long parent make a near-copy again. Off by default: each
    hunk costs about a hundred tokens, and under a 384-token cap the wider answers ran out (on the
    CPU, 2: near-copies left 0% against 21%, but 31% failed to apply against 0%; bench/RESULTS.md)."""
    edit_sites: int = Field(4, gt=0)
    """Under sampled sites, the layer lines each candidate edits, one hunk apiece. One-line edits
    are near-copies under the paper's novelty rule (similarity 0.95-0.98 to the parent); edits at
    four places, two lines or more each, take most zoo networks below 0.90."""
    max_hunks: int = Field(4, gt=0)
    """Diff limits under the grammar: hunks per answer..."""
    max_removed: int = Field(6, gt=0)
    """...lines one change removes..."""
    max_added: int = Field(6, gt=0)
    """...and lines it adds: an edit, not a rewrite..."""
    min_added: int = Field(2, gt=0)
    """...at least, where a change only adds (a one-line insertion is hardly new)."""
    layer_repeats: Literal["yes", "apart", "no"] = "no"
    """Under typed layers, may one change group add a kind of layer more than once: `yes`; `apart`,
    never twice in a row; `no`, once at most. Asked for two lines, SmolLM2 wrote the same layer
    twice in 57-81% of its hunks (`nn.GELU()` and `nn.GELU()` again), and kept from that, it
    alternated two (`LayerNorm`, `GELU`, `LayerNorm`, ...): a repeated line repeats its shingles,
    and the novelty rule counts the child a near-copy. Where too few kinds fit for the lines
    asked (`min_added`), they may repeat."""
    tournament_size: int = Field(3, gt=0)
    """Parent selection: best of this many random archive members..."""
    explore: float = Field(0.2, ge=0, le=1)
    """...except with this probability, when a uniformly random member is taken."""
    seed: int = 0

    @model_validator(mode="after")
    def _sites_fit(self) -> SearchConfig:
        if self.edit_sites > self.max_hunks:
            raise ValueError(f"edit_sites ({self.edit_sites}) needs as many hunks, but max_hunks is {self.max_hunks}")
        if self.min_added > self.max_added:
            raise ValueError(f"min_added ({self.min_added}) is above max_added ({self.max_added})")
        return self


class DataConfig(_Section):
    dataset: str = "mnist"
    """One dataset, or a pool of several, comma-separated (`mnist,digits`); see `datasets`."""
    data_dir: str | None = None
    """Where torchvision-format files are, for datasets that are not shipped offline."""
    download: bool = False
    """Let torchvision download missing datasets (needs a network)."""
    limit_train: int | None = Field(10_000, gt=0)
    """Train on a class-stratified subset of this many images (None: the whole training set).
    10,000 keeps the CPU demo within its 10 minutes; `--preset paper` trains on the whole set."""
    limit_test: int | None = Field(None, gt=0)

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        from deltanas.tools.datasets import DATASET_NAMES

        names = [n.strip() for n in v.split(",") if n.strip()]
        if not names:
            raise ValueError(f"no dataset named; choose one or more (a,b) of: {', '.join(DATASET_NAMES)}")
        for n in names:
            if n not in DATASET_NAMES:
                raise ValueError(f"unknown dataset {n!r}; choose one or more (a,b) of: {', '.join(DATASET_NAMES)}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named twice")
        return ",".join(names)

    @property
    def datasets(self) -> tuple[str, ...]:
        """The run's datasets in order: one, or a pool (`dataset = "mnist,digits"`), where every
        baseline trains on each, candidates are spread evenly over them, and accuracies are compared
        within a dataset only."""
        return tuple(self.dataset.split(","))


class TrainConfig(_Section):
    epochs: int = Field(_JOB["epochs"], gt=0)
    batch_size: int = Field(_JOB["batch_size"], gt=0)
    lr: float = Field(DEFAULT_HYPERPARAMETERS["lr"], gt=0)
    momentum: float = Field(DEFAULT_HYPERPARAMETERS["momentum"], ge=0, lt=1)
    dropout: float = Field(DEFAULT_HYPERPARAMETERS["dropout"], ge=0, lt=1)

    def hyperparameters(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in DEFAULT_HYPERPARAMETERS}


class SandboxConfig(_Section):
    type: Literal["auto", "docker", "process"] = "auto"
    """`auto` uses Docker where a daemon answers and its image exists, else `process`."""
    image: str = "deltanas-sandbox:base"
    """The Docker image candidates run in (`deltanas sandbox build` makes it)."""
    timeout_s: float = Field(_LIMITS.timeout_s, gt=0)
    """Hard wall-clock limit per candidate, start-up included."""
    memory_mb: int = Field(_LIMITS.memory_mb, gt=0)
    cpu_threads: int = Field(_LIMITS.cpu_threads, gt=0)
    max_output_bytes: int = Field(_LIMITS.max_output_bytes, gt=0)
    workers: int = Field(1, gt=0)
    """Candidates trained at the same time."""
    warm: bool = True
    """Keep workers up across candidates (a fresh forked child each); false starts one per candidate."""
    device: str = _JOB["device"]
    """`cpu`, `cuda` or `cuda:N` for the proxy training (under Ray, `cuda`: the actor's own GPU)."""
    executor: Literal["local", "ray"] = "local"
    """`local`: `workers` sandbox slots on this machine. `ray`: `workers` Ray actors, each with its own
    sandbox and one GPU (cuda) or `cpu_threads` CPUs, on one machine or a cluster (needs `deltanas[ray]`)."""
    ray_address: str | None = None
    """The Ray cluster to join (`ray.init(address=...)`, e.g. `auto` or `ray://head:10001`); unset: a
    local Ray instance started for the run (or the one RAY_ADDRESS names)."""
    cuda_graphs: bool = _JOB["cuda_graphs"]
    """On a GPU: replay each candidate's training steps as a CUDA graph where that is safe (the same
    weights, far fewer kernel launches; sandbox/graphs.py). A loop a graph cannot hold runs eagerly."""
    gpu_memory_mb: int | None = Field(None, gt=0)
    """On a GPU: each candidate's share of the card's memory; past it the candidate alone fails
    as `oom`. Unset with `workers` > 1: an equal share of what is left after each worker's CUDA context."""
    unsafe_no_isolation: bool = False
    """Run model-written candidates even where they cannot get a filesystem view of their own
    (no Docker, bubblewrap or Landlock): they can then read the test labels and your files and
    write anywhere you can. Off, such a run is refused (agent/run/isolation.py); the `mutate`
    backend's candidates run either way. `--unsafe-no-isolation` sets it; the archive records it."""


class LearnConfig(_Section):
    """The LoRA update after each cycle (agent/learning/lora.py). The defaults suit the few examples a
    small run gathers (one epoch, a step per example, a higher rate) and keep the CPU demo within
    its 10 minutes; `--preset paper` has the paper's (3 epochs, 8 accumulated steps, 1e-5)."""

    enabled: bool = True
    """Train an adapter after each cycle and generate with it (hf backends; others skip, saying why)."""
    updates: bool = True
    """Train after each cycle. False keeps the cold-start adapter (if any) fixed for the whole run:
    the control arm of `bench/learning_curve.py`, which differs from the learning arm in this alone."""
    after_last_cycle: bool = False
    """Also train after the run's last cycle. No cycle of the run proposes with that adapter, so by
    default it is recorded as `deferred` and trained first when the run is extended
    (`deltanas run --resume DIR --cycles N`); `--preset paper` trains it, as the paper does."""
    method: Literal["sft", "dpo", "sft+dpo"] = "sft"
    """What each update trains on: the successful trajectories (SFT); preference pairs, a valid first
    answer against a failed one for the same parent (DPO, agent/learning/examples.preference_set);
    or SFT, then DPO from that adapter. Without preference pairs, an sft+dpo update is SFT alone and
    a dpo update is skipped, saying why."""
    dpo_beta: float = Field(0.1, gt=0)
    rule: Literal["improved", "valid", "top_k"] = "improved"
    """Which candidates teach: valid, novel and at least the parent's accuracy; valid and novel; the top k."""
    top_k: int = Field(5, gt=0)
    cold_start_cycles: int = Field(0, ge=0)
    """Cycles proposed by the rule-based mutator before the model: their successful variants are
    the cold-start training pairs (a baseline, a variant that trained as well or better, the diff)."""
    cold_start_from: list[str] = Field(default_factory=list)
    """Paths to take cold-start pairs from before cycle 0 (a network, a better one on the same dataset,
    the diff); a first adapter, `adapters/cold-start`, is trained on them and every later update keeps
    them. Each path is recognised by what is there: a run directory (it holds archive.sqlite) or an
    archive file gives its `ok` candidates that beat their parent; a LEMUR nn-dataset SQLite database
    (tables nn and stat, e.g. `db/ab.nn.db`, or a folder holding `db/ab.nn.db`) or an nn-dataset
    checkout (`ab/nn/nn/<Name>.py` and `ab/nn/stat/train/...`) gives pairs of its networks. A path that
    cannot be read is recorded in the archive and the run goes on (agent/learning/cold_start_pairs.py)."""
    cold_start_max_pairs: int = Field(64, gt=0)
    """At most this many pairs over all `cold_start_from` paths, the more accurate variants first."""
    cold_start_max_diff_lines: int = Field(40, gt=0)
    """Pairs whose diff changes more lines are left out (the propose prompt asks for at most 40)."""
    lemur_task: str = "img-classification"
    """LEMUR's task whose statistics rank its networks (the run's dataset picks the dataset)."""
    lemur_epoch: int = Field(1, gt=0)
    """LEMUR's accuracy after this many epochs ranks its networks; the run's proxy is one epoch."""
    min_examples: int = Field(1, gt=0)
    """Fewer successful trajectories than this and the update is skipped (and recorded as skipped)."""
    r: int = Field(32, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    lr: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    scheduler: str = "cosine"
    batch_size: int = Field(1, gt=0)
    max_length: int = Field(2048, gt=0)
    qlora: bool = False
    """4-bit base model (QLoRA); needs a GPU and bitsandbytes."""
    checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for a large model, about a fifth
    more time (off: a SmolLM2 step on a 2-core CPU took 26 s instead of 33 s, the same loss)."""


class NoveltyConfig(_Section):
    threshold: float = Field(0.9, gt=0, le=1)
    """Jaccard similarity at or above which a candidate is not novel."""
    num_perm: int = Field(128, gt=0)
    shingle: int = Field(7, gt=0)


class Config(_Section):
    name: str = "run"
    baselines: list[str] = Field(default_factory=lambda: list(DEFAULT_BASELINES))
    """Networks the search starts from: zoo names (`deltanas zoo list`) or paths to your own files
    (`*.py` with the LEMUR `Net` interface), each checked before the run starts."""
    llm: LLMConfig = Field(default_factory=LLMConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    learn: LearnConfig = Field(default_factory=LearnConfig)
    novelty: NoveltyConfig = Field(default_factory=NoveltyConfig)

    @field_validator("baselines")
    @classmethod
    def _baselines_exist(cls, v: list[str]) -> list[str]:
        from deltanas.tools.zoo import check_user_baseline, get_baseline, is_path, list_baselines

        known = {b.name for b in list_baselines()}
        if not v:
            raise ValueError("at least one baseline is needed")
        unknown = [b for b in v if not is_path(b) and b not in known]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; available: {', '.join(sorted(known))}, "
                             "or a path to your own model file (*.py)")
        problems = [p for p in (check_user_baseline(b) for b in v if is_path(b)) if p]
        if problems:
            raise ValueError("; ".join(problems))
        names = [get_baseline(b).name for b in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two baselines share the name {twice}: rename one of the files")
        return v


class ConfigError(ValueError):
    """A configuration that cannot run; the message is meant for the user as is."""


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


# The paper's six datasets, searched as one pool; offline, the pool runs on those whose files exist.
PAPER_DATASETS = ("cifar10", "cifar100", "mnist", "svhn", "imagenette", "celeba-gender")

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's protocol (DESIGN.md): 22 cycles of 50, its decoding, 2 repairs, the whole training
    # set, and LoRA after each cycle with its settings.
    "paper": {"search.cycles": 22, "search.candidates": 50, "search.max_repairs": 2, "llm.temperature": 0.35,
              "llm.constrain": "none", "data.limit_train": None, "data.dataset": ",".join(PAPER_DATASETS),
              "llm.top_k": 50, "llm.top_p": 0.9, "llm.max_new_tokens": 1024, "learn.enabled": True,
              "learn.after_last_cycle": True, "learn.epochs": 3.0, "learn.grad_accum": 8, "learn.lr": 1e-5},
    # A CPU-sized loop: one cycle of mutator cold-start pairs, then the model with short LoRA updates.
    "quick": {"search.cycles": 4, "search.candidates": 4, "llm.max_new_tokens": 384, "learn.cold_start_cycles": 1,
              "learn.epochs": 1.0, "learn.grad_accum": 1, "learn.lr": 1e-4, "learn.max_length": 1536,
              "learn.rule": "valid", "data.limit_train": 10000},
}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                preset: str | None = None) -> Config:
    """Read TOML (optional) over a preset (optional), apply dotted-key overrides (`search.cycles`),
    validate. A config file and the overrides win over the preset."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            _set_dotted(data, key, value)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            _merge(data, tomllib.loads(p.read_text()))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e)) from None


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def dump_toml(cfg: Config) -> str:
    """A frozen, complete copy of the config as TOML (None values are omitted)."""
    out: list[str] = []

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    data = cfg.model_dump()
    for k, v in data.items():
        if not isinstance(v, dict) and v is not None:
            out.append(f"{k} = {val(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(f"\n[{k}]")
            out.extend(f"{kk} = {val(vv)}" for kk, vv in v.items() if vv is not None)
    return "\n".join(out) + "\n"
