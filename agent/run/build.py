"""Builds the live parts of a run from its config: dataset, sandbox, job settings, executor,
LLM, archive and novelty index. Only the CLI and tests call this; nodes get `Deps`.

Every job of a run, whoever trains it (the local executor, the Ray executor, `deltanas
eval`), takes its settings from one `JobSpec` that `job_spec` builds from the config; they
add only the candidate (tools/proxy.py `make_job`)."""
from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from deltanas.agent.archive import Store
from deltanas.agent.config import Config, ConfigError, SandboxConfig
from deltanas.agent.llm.base import LLMBackend
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.loop.deps import DatasetInfo, Deps
from deltanas.agent.run import isolation
from deltanas.agent.run.executor import Executor, LocalExecutor, Target
from deltanas.agent.run.rundir import ARCHIVE_FILE
from deltanas.sandbox.base import JobSpec, Limits, Sandbox
from deltanas.sandbox.choose import sandbox_for
from deltanas.sandbox.sizing import check_device, gpu_share_mb
from deltanas.tools.datasets import DatasetUnavailable, default_cache_dir, load_dataset, prepare_handle
from deltanas.tools.novelty import NoveltyIndex


def make_sandbox(cfg: Config, work_root: Path) -> Sandbox:
    """The sandbox `[sandbox]` asks for (sandbox/choose.py), keeping a warm worker per slot."""
    from deltanas.sandbox.docker import DockerUnavailable

    s = cfg.sandbox
    try:  # a warm worker per slot and dataset: each holds one dataset's tensors
        return sandbox_for(s.type, work_root, image=s.image, warm=s.warm, max_idle=s.workers * len(cfg.data.datasets))
    except DockerUnavailable as e:
        raise ConfigError(str(e)) from None


def probe_fs_isolation(s: SandboxConfig) -> tuple[str, str | None]:
    """(the sandbox `[sandbox]` gets on this machine, `isolation.fs_isolation` of it), without
    starting a worker. Under Ray it stands for the actors on this machine."""
    from deltanas.sandbox.docker import DockerUnavailable
    from deltanas.sandbox.choose import select_backend

    try:
        kind, _why = select_backend(s.type, s.image)
    except DockerUnavailable as e:
        raise ConfigError(str(e)) from None
    if kind == "docker":
        return kind, None  # a container of its own; building a DockerSandbox would sweep containers
    with tempfile.TemporaryDirectory(prefix="deltanas-probe-") as tmp:
        sandbox = sandbox_for("process", Path(tmp), image=s.image, warm=s.warm, max_idle=1)
        try:
            return sandbox.name, isolation.fs_isolation(sandbox)
        finally:
            sandbox.close()


def check_isolation(cfg: Config) -> None:
    """Refuses a run whose model-written candidates would get no filesystem view of their own,
    unless `sandbox.unsafe_no_isolation` (agent/run/isolation.py)."""
    model_code = isolation.runs_model_code(cfg.llm.backend)
    if not model_code or cfg.sandbox.unsafe_no_isolation:
        return  # nothing to refuse: no probe
    _kind, missing = probe_fs_isolation(cfg.sandbox)
    isolation.require(missing, model_code=model_code, opted_in=False)


def _gpu_share(cfg: Config) -> int | None:
    """Each candidate's GPU memory share under `[sandbox]` (sandbox/sizing.py)."""
    s = cfg.sandbox
    if s.executor == "ray":
        return s.gpu_memory_mb  # each actor has a GPU of its own
    return gpu_share_mb(s.device, workers=s.workers, warm=s.warm, asked_mb=s.gpu_memory_mb)


def job_spec(cfg: Config, handle_dir: Path) -> JobSpec:
    """The settings of every job of this run, on the dataset handle `handle_dir`: what the loop's
    executors, `deltanas eval` and any other caller that trains a candidate as the loop does pass on,
    adding only the candidate."""
    s = cfg.sandbox
    limits = Limits(timeout_s=s.timeout_s, memory_mb=s.memory_mb, cpu_threads=s.cpu_threads,
                    max_output_bytes=s.max_output_bytes, gpu_memory_mb=_gpu_share(cfg))
    return JobSpec(dataset_dir=str(handle_dir), hyperparameters=cfg.train.hyperparameters(), epochs=cfg.train.epochs,
                   seed=cfg.search.seed, batch_size=cfg.train.batch_size, device=s.device, limits=limits,
                   cuda_graphs=s.cuda_graphs)


def load_run_dataset(cfg: Config, name: str | None = None):
    """One of the run's datasets (the first when `name` is None), loaded as `[data]` says."""
    try:
        return load_dataset(name or cfg.data.datasets[0], data_dir=cfg.data.data_dir, download=cfg.data.download,
                            limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test, seed=cfg.search.seed)
    except DatasetUnavailable as e:
        raise ConfigError(str(e)) from None


def load_run_datasets(cfg: Config) -> dict:
    """Every dataset of the run, by name, in its order; a missing one is a ConfigError."""
    return {name: load_run_dataset(cfg, name) for name in cfg.data.datasets}


def available_datasets(cfg: Config) -> tuple[Config, dict, list[str]]:
    """A new pool run's datasets that load here: (the config with `data.dataset` narrowed to them,
    their arrays by name, a line for each missing one saying how to provide it). A single dataset,
    or a pool of which none loads, is a ConfigError."""
    names = cfg.data.datasets
    if len(names) == 1:
        return cfg, load_run_datasets(cfg), []
    found, missing = {}, []
    for name in names:
        try:
            found[name] = load_run_dataset(cfg, name)
        except ConfigError as e:
            missing.append(f"{name}: {e}")
    if not found:
        raise ConfigError("none of the pool's datasets is here:\n  " + "\n  ".join(missing))
    data = cfg.data.model_copy(update={"dataset": ",".join(found)})
    return cfg.model_copy(update={"data": data}), found, missing


def preflight(cfg: Config, *, new_pool: bool = False):
    """Every check that needs the machine, done before a run directory is created, so a run
    that cannot start leaves nothing behind. Returns the loaded datasets by name; with `new_pool`
    (a new run), (the config narrowed to the pool's datasets found here, those, the missing ones'
    lines) as `available_datasets` does."""
    check_device(cfg.sandbox.device, here=cfg.sandbox.executor == "local")
    _gpu_share(cfg)
    if cfg.sandbox.executor == "ray":
        from deltanas.agent.run.executor_ray import import_ray

        import_ray()
    spec = cfg.llm.backend
    if spec.type == "hf":
        from deltanas.agent.llm.model_folder import resolve_model

        try:
            resolve_model(spec.model)
        except FileNotFoundError as e:
            raise ConfigError(f"llm.spec {cfg.llm.spec!r}: {e}") from None
    if cfg.sandbox.type == "docker":
        from deltanas.sandbox.docker import DockerUnavailable
        from deltanas.sandbox.choose import select_backend

        try:
            select_backend("docker", cfg.sandbox.image)
        except DockerUnavailable as e:
            raise ConfigError(str(e)) from None
    check_isolation(cfg)
    return available_datasets(cfg) if new_pool else load_run_datasets(cfg)


def make_llm(cfg: Config) -> LLMBackend:
    from deltanas.agent.llm.factory import make_backend

    backend = make_backend(cfg.llm.backend, device=cfg.llm.device, dtype=cfg.llm.dtype, batch_size=cfg.llm.batch_size,
                           seed=cfg.search.seed, timeout_s=cfg.llm.timeout_s, max_lora_rank=cfg.learn.r,
                           gpu_memory=cfg.llm.gpu_memory, seed_requests=cfg.llm.seed_requests)
    return CoalescingBackend(backend)


def make_learner(cfg: Config):
    """(the LoRA trainer for this run's model, or None; why not, when None)."""
    if not cfg.learn.enabled:
        return None, "learn.enabled is false"
    spec = cfg.llm.backend
    if spec.type not in ("hf", "vllm", "openai"):
        return None, f"the {spec.type} backend has no weights to adapt"
    if spec.type == "openai":
        # The trainer needs the served model's weights on this machine; `deltanas serve MODEL`
        # names the server's model after MODEL, so an alias or a local path resolves here.
        from deltanas.agent.llm.model_folder import resolve_model

        try:
            resolve_model(spec.model)
        except FileNotFoundError:
            return None, (f"the server's model {spec.model!r} is not a local model (an alias, a .gguf file or a "
                          "folder), so no adapter can be trained for it here; serve it with `deltanas serve "
                          "PATH` and use openai:PATH@URL")
    from deltanas.agent.learning.lora import LoraSettings, train_adapter

    c = cfg.learn
    settings = LoraSettings(r=c.r, alpha=c.alpha, dropout=c.dropout, lr=c.lr, epochs=c.epochs,
                            grad_accum=c.grad_accum, weight_decay=c.weight_decay, scheduler=c.scheduler,
                            batch_size=c.batch_size, max_length=c.max_length, qlora=c.qlora, dpo_beta=c.dpo_beta,
                            checkpointing=c.checkpointing)
    device = cfg.llm.device if cfg.llm.device != "auto" else _auto_device()

    def learn(examples, out_dir, stop, start_from=None, preferences=None, progress=None):
        """learn.method sft: SFT on `examples`; dpo: DPO on `examples` (preference pairs); sft+dpo:
        SFT on `examples`, then DPO on `preferences` from that adapter (SFT alone without them)."""
        def train(data, out, method, start):
            return train_adapter(spec.model, data, out, settings, device=device, seed=cfg.search.seed, stop=stop,
                                 start_from=start, method=method, progress=progress)

        if c.method == "dpo":
            return train(examples, out_dir, "dpo", start_from)
        if c.method == "sft" or not preferences:
            return train(examples, out_dir, "sft", start_from)
        sft_dir = Path(out_dir).parent / f".{Path(out_dir).name}.sft-{uuid.uuid4().hex[:8]}"
        try:
            sft = train(examples, sft_dir, "sft", start_from)
            dpo = train(preferences, out_dir, "dpo", sft_dir)
        finally:
            shutil.rmtree(sft_dir, ignore_errors=True)
        return {**dpo, "sft_loss": sft["loss"], "steps": sft["steps"] + dpo["steps"],
                "seconds": sft["seconds"] + dpo["seconds"], "examples": len(examples) + len(preferences)}

    return learn, ""


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_words(device: str) -> str:
    """Where the model trains, in words for a record: the GPU's name, or the CPU and its threads."""
    import platform

    import torch

    device = device if device != "auto" else _auto_device()
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def restore_adapter(deps: Deps) -> str | None:
    """On resume: generate with the newest complete adapter the run trained. Returns its path."""
    from deltanas.agent.learning.lora import adapter_complete

    for a in reversed(deps.store.adapters()):
        path = deps.run_dir / (a.get("path") or "")
        if a["status"] in ("trained", "reused") and a.get("path") and adapter_complete(path):
            deps.llm.load_adapter(str(path))
            return str(path)
    return None


def run_targets(cfg: Config, datasets: dict) -> dict[str, Target]:
    """Each dataset's Target (agent/run/executor.py): its arrays and the run's job settings on its handle."""
    handles = default_cache_dir() / "handles"
    return {name: Target(ds, job_spec(cfg, prepare_handle(ds, handles))) for name, ds in datasets.items()}


def make_executor(cfg: Config, targets: dict[str, Target], work_root: Path, stop: threading.Event,
                  sandbox: Sandbox | None = None) -> Executor:
    s = cfg.sandbox
    if s.executor == "ray":
        if sandbox is not None:
            raise ValueError("an injected sandbox runs here; the ray executor builds one in each actor")
        from deltanas.agent.run.executor_ray import RayExecutor

        return RayExecutor(s, targets, work_root / "ray", workers=s.workers, address=s.ray_address, stop=stop)
    sb = sandbox if sandbox is not None else make_sandbox(cfg, work_root)
    return LocalExecutor(sb, targets, workers=s.workers, stop=stop)


def _isolation_record(cfg: Config, executor: Executor) -> dict:
    """This session's entry under `isolation.ISOLATION_META`."""
    sandbox = getattr(executor, "sandbox", None)  # the Ray executor's are in its actors: probe one here
    name, missing = (sandbox.name, isolation.fs_isolation(sandbox)) if sandbox is not None \
        else probe_fs_isolation(cfg.sandbox)
    return isolation.record(name, executor.isolation(), missing, model_code=isolation.runs_model_code(cfg.llm.backend),
                            opted_in=cfg.sandbox.unsafe_no_isolation)


def build_deps(cfg: Config, run_dir: Path, *, llm: LLMBackend | None = None, sandbox: Sandbox | None = None,
               dataset=None, learner=None) -> Deps:
    """Everything a run needs. `llm`, `sandbox`, `dataset` (arrays, or {name: arrays} for a pool) and
    `learner` can be injected (tests)."""
    check_device(cfg.sandbox.device, here=cfg.sandbox.executor == "local")
    if dataset is None:
        datasets = load_run_datasets(cfg)
    else:
        datasets = dict(dataset) if isinstance(dataset, dict) else {dataset.name: dataset}
    if tuple(datasets) != cfg.data.datasets:
        raise ValueError(f"the datasets given ({', '.join(datasets)}) are not the run's ({cfg.data.dataset})")
    work_root = run_dir / ".work"
    shutil.rmtree(work_root, ignore_errors=True)  # leftovers of a killed driver
    work_root.mkdir(parents=True)
    stop = threading.Event()
    executor = make_executor(cfg, run_targets(cfg, datasets), work_root, stop, sandbox)
    try:
        entry = _isolation_record(cfg, executor)
        if llm is None:  # the CLI's preflight refuses first; this holds for callers that skip it
            isolation.require(entry["missing"], model_code=entry["model_code"], opted_in=entry["opted_in"])
    except BaseException:
        executor.close()
        raise
    store = Store(run_dir / ARCHIVE_FILE)
    store.set_meta(isolation.ISOLATION_META, [*store.get_meta(isolation.ISOLATION_META, []), entry])
    n = cfg.novelty
    index = NoveltyIndex(threshold=n.threshold, num_perm=n.num_perm, shingle=n.shingle)
    for row in store.candidates():
        if row.minhash and (row.kind == "baseline" or row.novel):
            index.add(row.id, index.from_hashvalues(row.minhash))
    learn, note = (learner, "") if learner is not None else make_learner(cfg)
    cold = None
    if cfg.learn.cold_start_cycles:
        from deltanas.agent.llm.factory import make_backend

        cold = CoalescingBackend(make_backend("mutate", seed=cfg.search.seed))
    deps = Deps(config=cfg, llm=llm if llm is not None else make_llm(cfg), executor=executor, store=store,
                novelty=index, datasets={n: DatasetInfo(n, tuple(d.in_shape), d.num_classes) for n, d in datasets.items()},
                run_dir=run_dir,
                stop=stop, learner=learn, learner_note=note, cold_llm=cold)
    if learn is not None:
        restore_adapter(deps)
    return deps
