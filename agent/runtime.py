"""Builds the live parts of a run from its config: dataset, sandbox, executor, LLM,
archive and novelty index. Only the CLI and tests call this; nodes get `Deps`."""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from deltanas.agent import isolation
from deltanas.agent.config import Config, ConfigError, SandboxConfig
from deltanas.agent.deps import DatasetInfo, Deps
from deltanas.agent.executor import Executor, LocalExecutor
from deltanas.agent.llm.base import LLMBackend
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.rundir import ARCHIVE_FILE
from deltanas.agent.store import Store
from deltanas.sandbox.base import Limits, Sandbox
from deltanas.sandbox.warm import SPARES
from deltanas.tools.datasets import DatasetUnavailable, default_cache_dir, load_dataset, prepare_handle
from deltanas.tools.novelty import NoveltyIndex


def make_sandbox(cfg: Config, work_root: Path) -> Sandbox:
    """Docker where a daemon answers and the image exists (or where it is demanded), else
    the process sandbox."""
    return sandbox_for(cfg.sandbox, work_root, max_idle=cfg.sandbox.workers)


def sandbox_for(s: SandboxConfig, work_root: Path, *, max_idle: int) -> Sandbox:
    """The sandbox `[sandbox]` asks for; also what each Ray actor builds for itself."""
    from deltanas.sandbox.docker import DockerUnavailable
    from deltanas.sandbox.image import select_backend

    try:
        kind, _why = select_backend(s.type, s.image)
    except DockerUnavailable as e:
        raise ConfigError(str(e)) from None
    if kind == "docker":
        from deltanas.sandbox.docker import DockerSandbox

        return DockerSandbox(work_root, image=s.image, warm=s.warm, max_idle=max_idle)
    from deltanas.sandbox.process import ProcessSandbox

    return ProcessSandbox(work_root, warm=s.warm, max_idle=max_idle)


def probe_fs_isolation(s: SandboxConfig) -> tuple[str, str | None]:
    """(the sandbox `[sandbox]` gets on this machine, `isolation.fs_isolation` of it), without
    starting a worker. Under Ray it stands for the actors on this machine."""
    from deltanas.sandbox.docker import DockerUnavailable
    from deltanas.sandbox.image import select_backend

    try:
        kind, _why = select_backend(s.type, s.image)
    except DockerUnavailable as e:
        raise ConfigError(str(e)) from None
    if kind == "docker":
        return kind, None  # a container of its own; building a DockerSandbox would sweep containers
    with tempfile.TemporaryDirectory(prefix="deltanas-probe-") as tmp:
        sandbox = sandbox_for(s.model_copy(update={"type": "process"}), Path(tmp), max_idle=1)
        try:
            return sandbox.name, isolation.fs_isolation(sandbox)
        finally:
            sandbox.close()


def check_isolation(cfg: Config) -> None:
    """Refuses a run whose model-written candidates would get no filesystem view of their own,
    unless `sandbox.unsafe_no_isolation` (agent/isolation.py)."""
    model_code = isolation.runs_model_code(cfg.llm.spec)
    if not model_code or cfg.sandbox.unsafe_no_isolation:
        return  # nothing to refuse: no probe
    _kind, missing = probe_fs_isolation(cfg.sandbox)
    isolation.require(missing, model_code=model_code, opted_in=False)


def check_device(device: str, *, here: bool = True) -> None:
    """`here`: the device must exist on this machine (false under Ray, whose actors may train on
    other nodes: the executor checks the cluster's GPUs instead)."""
    if device == "cpu" or device == "auto":
        return
    head, _, index = device.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device {device!r}: use cpu, cuda or cuda:N")
    if not here:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if int(index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")


CUDA_CONTEXT_MB = 768  # a job child's own CUDA context and cuDNN/cuBLAS workspaces, outside its share


def gpu_share_mb(cfg: Config, total_mb: int | None = None) -> int | None:
    """Each candidate's GPU memory share: `sandbox.gpu_memory_mb`, or with several workers on one
    GPU an equal part of what their CUDA contexts leave. A config that cannot fit is refused."""
    s = cfg.sandbox
    if not s.device.startswith("cuda") or s.executor == "ray" or (s.gpu_memory_mb is None and s.workers == 1):
        return s.gpu_memory_mb  # under Ray each actor has a GPU of its own
    if total_mb is None:
        import torch

        total_mb = torch.cuda.get_device_properties(torch.device(s.device)).total_memory // 2**20
    # A warm worker on a GPU holds 1 + SPARES CUDA contexts: its running job's, and those of the
    # spare children that ready the next jobs (sandbox/warm.py).
    contexts = s.workers * (1 + SPARES if s.warm else 1)
    free = total_mb - contexts * CUDA_CONTEXT_MB
    share = s.gpu_memory_mb if s.gpu_memory_mb is not None else free // s.workers
    if share <= 0 or share * s.workers > free:
        raise ConfigError(f"sandbox.workers = {s.workers} candidates of {share} MB each do not fit on {s.device} "
                          f"({total_mb} MB, {CUDA_CONTEXT_MB} MB for each of {contexts} CUDA contexts): lower "
                          "sandbox.workers or sandbox.gpu_memory_mb")
    return share


def load_run_dataset(cfg: Config):
    try:
        return load_dataset(cfg.data.dataset, data_dir=cfg.data.data_dir, download=cfg.data.download,
                            limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test, seed=cfg.search.seed)
    except DatasetUnavailable as e:
        raise ConfigError(str(e)) from None


def preflight(cfg: Config):
    """Every check that needs the machine, done before a run directory is created, so a run
    that cannot start leaves nothing behind. Returns the loaded dataset."""
    check_device(cfg.sandbox.device, here=cfg.sandbox.executor == "local")
    gpu_share_mb(cfg)
    if cfg.sandbox.executor == "ray":
        from deltanas.agent.executor_ray import import_ray

        import_ray()
    from deltanas.agent.llm.factory import parse_llm_spec

    spec = parse_llm_spec(cfg.llm.spec)
    if spec.type == "hf":
        from deltanas.agent.llm.hf import resolve_model

        try:
            resolve_model(spec.model)
        except FileNotFoundError as e:
            raise ConfigError(f"llm.spec {cfg.llm.spec!r}: {e}") from None
    if cfg.sandbox.type == "docker":
        from deltanas.sandbox.docker import DockerUnavailable
        from deltanas.sandbox.image import select_backend

        try:
            select_backend("docker", cfg.sandbox.image)
        except DockerUnavailable as e:
            raise ConfigError(str(e)) from None
    check_isolation(cfg)
    return load_run_dataset(cfg)


def make_llm(cfg: Config) -> LLMBackend:
    from deltanas.agent.llm.factory import make_backend

    backend = make_backend(cfg.llm.spec, device=cfg.llm.device, dtype=cfg.llm.dtype, batch_size=cfg.llm.batch_size,
                           seed=cfg.search.seed, timeout_s=cfg.llm.timeout_s, max_lora_rank=cfg.learn.r,
                           gpu_memory=cfg.llm.gpu_memory, seed_requests=cfg.llm.seed_requests)
    return CoalescingBackend(backend)


def make_learner(cfg: Config):
    """(the LoRA trainer for this run's model, or None; why not, when None)."""
    from deltanas.agent.llm.factory import parse_llm_spec

    if not cfg.learn.enabled:
        return None, "learn.enabled is false"
    spec = parse_llm_spec(cfg.llm.spec)
    if spec.type not in ("hf", "vllm", "openai"):
        return None, f"the {spec.type} backend has no weights to adapt"
    if spec.type == "openai":
        # The trainer needs the served model's weights on this machine; `deltanas serve MODEL`
        # names the server's model after MODEL, so an alias or a local path resolves here.
        from deltanas.agent.llm.hf import resolve_model

        try:
            resolve_model(spec.model)
        except FileNotFoundError:
            return None, (f"the server's model {spec.model!r} is not a local model (an alias, a .gguf file or a "
                          "folder), so no adapter can be trained for it here; serve it with `deltanas serve "
                          "PATH` and use openai:PATH@URL")
    from deltanas.agent.lora import LoraSettings, train_adapter

    c = cfg.learn
    settings = LoraSettings(r=c.r, alpha=c.alpha, dropout=c.dropout, lr=c.lr, epochs=c.epochs,
                            grad_accum=c.grad_accum, weight_decay=c.weight_decay, scheduler=c.scheduler,
                            batch_size=c.batch_size, max_length=c.max_length, qlora=c.qlora)
    device = cfg.llm.device if cfg.llm.device != "auto" else _auto_device()

    def learn(examples, out_dir, stop):
        return train_adapter(spec.model, examples, out_dir, settings, device=device, seed=cfg.search.seed, stop=stop)

    return learn, ""


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def restore_adapter(deps: Deps) -> str | None:
    """On resume: generate with the newest complete adapter the run trained. Returns its path."""
    from deltanas.agent.lora import adapter_complete

    for a in reversed(deps.store.adapters()):
        path = deps.run_dir / (a.get("path") or "")
        if a["status"] in ("trained", "reused") and a.get("path") and adapter_complete(path):
            deps.llm.load_adapter(str(path))
            return str(path)
    return None


def make_executor(cfg: Config, ds, handle: Path, work_root: Path, stop: threading.Event,
                  sandbox: Sandbox | None = None) -> Executor:
    s = cfg.sandbox
    limits = Limits(timeout_s=s.timeout_s, memory_mb=s.memory_mb, cpu_threads=s.cpu_threads,
                    max_output_bytes=s.max_output_bytes, gpu_memory_mb=gpu_share_mb(cfg))
    common = dict(workers=s.workers, hyperparameters=cfg.train.hyperparameters(), epochs=cfg.train.epochs,
                  batch_size=cfg.train.batch_size, device=s.device, limits=limits, seed=cfg.search.seed, stop=stop,
                  cuda_graphs=s.cuda_graphs)
    if s.executor == "ray":
        if sandbox is not None:
            raise ValueError("an injected sandbox runs here; the ray executor builds one in each actor")
        from deltanas.agent.executor_ray import RayExecutor

        return RayExecutor(s, ds, handle, work_root / "ray", address=s.ray_address, **common)
    sb = sandbox if sandbox is not None else make_sandbox(cfg, work_root)
    return LocalExecutor(sb, ds, handle, **common)


def _isolation_record(cfg: Config, executor: Executor) -> dict:
    """This session's entry under `isolation.ISOLATION_META`."""
    sandbox = getattr(executor, "sandbox", None)  # the Ray executor's are in its actors: probe one here
    name, missing = (sandbox.name, isolation.fs_isolation(sandbox)) if sandbox is not None \
        else probe_fs_isolation(cfg.sandbox)
    return isolation.record(name, executor.isolation(), missing, model_code=isolation.runs_model_code(cfg.llm.spec),
                            opted_in=cfg.sandbox.unsafe_no_isolation)


def build_deps(cfg: Config, run_dir: Path, *, llm: LLMBackend | None = None, sandbox: Sandbox | None = None,
               dataset=None, learner=None) -> Deps:
    """Everything a run needs. `llm`, `sandbox`, `dataset` and `learner` can be injected (tests)."""
    check_device(cfg.sandbox.device, here=cfg.sandbox.executor == "local")
    ds = dataset if dataset is not None else load_run_dataset(cfg)
    handle = prepare_handle(ds, default_cache_dir() / "handles")
    work_root = run_dir / ".work"
    shutil.rmtree(work_root, ignore_errors=True)  # leftovers of a killed driver
    work_root.mkdir(parents=True)
    stop = threading.Event()
    executor = make_executor(cfg, ds, handle, work_root, stop, sandbox)
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
                novelty=index, dataset=DatasetInfo(ds.name, tuple(ds.in_shape), ds.num_classes), run_dir=run_dir,
                stop=stop, learner=learn, learner_note=note, cold_llm=cold)
    if learn is not None:
        restore_adapter(deps)
    return deps
