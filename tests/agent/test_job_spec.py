"""One `JobSpec` per run: `deltanas eval` trains a candidate exactly as the loop does, because both
take every job setting from `build.job_spec` (agent/run/build.py) and add only the candidate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltanas.agent import cli

from deltanas.agent.config import load_config
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.run import build
from deltanas.sandbox.base import DEFAULT_HYPERPARAMETERS, Candidate, Job, JobSpec, Limits, Result
from deltanas.tools.proxy import make_job
from deltanas.tools.zoo import get_baseline

# Every job setting away from its default, so that a setting one path drops shows.
SETTINGS = """
[data]
dataset = "{dataset}"
limit_train = {limit_train}
limit_test = {limit_test}

[search]
seed = 5

[train]
batch_size = 64
lr = 0.03
momentum = 0.8

[sandbox]
type = "process"
timeout_s = 240.0
memory_mb = 6000
cpu_threads = 1
max_output_bytes = 900000
cuda_graphs = false
"""


class RecordingSandbox:
    """Keeps the jobs it is given and trains none of them."""

    name = "recording"
    fs_isolated = True

    def __init__(self):
        self.jobs: list[Job] = []

    def isolation(self) -> str:
        return "none: a test double"

    def run(self, job: Job) -> Result:
        self.jobs.append(job)
        return Result(status="crashed", error="a recording sandbox trains nothing")

    def prewarm(self, job: Job) -> None:
        pass

    def close(self) -> None:
        pass


def write_settings(tmp_path: Path, dataset: str, limit_train: int, limit_test: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(SETTINGS.format(dataset=dataset, limit_train=limit_train, limit_test=limit_test))
    return path


def loop_evaluate(cfg, source: str, candidate_id: str, run_dir: Path, sandbox=None):
    """`source` through the loop's own executor, as `build_deps` makes it for a run."""
    deps = build.build_deps(cfg, run_dir, llm=ScriptedBackend([]), sandbox=sandbox)
    try:
        return deps.executor.evaluate(source, candidate_id, run_dir / "candidates" / candidate_id)
    finally:
        deps.executor.close()


def test_a_job_is_the_spec_plus_the_candidate_in_the_workers_key_order():
    spec = JobSpec("/handle", {"lr": 0.1}, epochs=2, seed=7, batch_size=32, device="cuda:1",
                   limits=Limits(timeout_s=9, gpu_memory_mb=512), cuda_graphs=False)
    job = Job.of(spec, Candidate("c000-001", "x = 1\n"))
    assert job == Job("c000-001", "x = 1\n", "/handle", {"lr": 0.1}, epochs=2, seed=7, batch_size=32,
                      device="cuda:1", limits=Limits(timeout_s=9, gpu_memory_mb=512), cuda_graphs=False)
    # job.json as sandbox/worker.py has always read it: the candidate first, the limits nested.
    assert list(job.to_json()) == ["candidate_id", "source", "dataset_dir", "hyperparameters", "epochs", "seed",
                                   "batch_size", "device", "limits", "cuda_graphs"]
    assert job.to_json()["limits"] == {"timeout_s": 9, "memory_mb": 8192, "cpu_threads": 2,
                                       "max_output_bytes": 1_000_000, "max_processes": 256, "gpu_memory_mb": 512}


def test_the_configs_defaults_are_the_jobs(tmp_path):
    cfg = load_config(None, {})
    spec = build.job_spec(cfg, tmp_path)
    assert spec.limits == Limits() and spec.limits.timeout_s == cfg.sandbox.timeout_s == 300.0
    assert spec.hyperparameters == DEFAULT_HYPERPARAMETERS
    bare = JobSpec(str(tmp_path))
    assert (spec.epochs, spec.batch_size, spec.device, spec.cuda_graphs) == \
        (bare.epochs, bare.batch_size, bare.device, bare.cuda_graphs)
    # The hyperparameters a job gets are those its source declares, from the run's values.
    source = get_baseline("lenet").source
    assert make_job(spec, "x = 1\n", "c").hyperparameters == DEFAULT_HYPERPARAMETERS
    assert make_job(build.job_spec(load_config(None, {"train.lr": 0.5}), tmp_path), source, "c").hyperparameters \
        == {**DEFAULT_HYPERPARAMETERS, "lr": 0.5}


def test_eval_builds_the_job_the_loop_builds(tmp_path, monkeypatch):
    settings = write_settings(tmp_path, "digits", 300, 100)
    model = tmp_path / "c000-003.py"
    model.write_text(get_baseline("lenet").source)
    evaluated = RecordingSandbox()
    monkeypatch.setattr(build, "make_sandbox", lambda cfg, work_root: evaluated)
    assert cli.main(["eval", str(model), "--config", str(settings), "--json"]) == cli.EXIT_FAIL
    cfg = load_config(settings, {"llm.spec": "mutate"})
    looped = RecordingSandbox()
    loop_evaluate(cfg, model.read_text(), "c000-003", tmp_path / "run", sandbox=looped)
    assert len(evaluated.jobs) == len(looped.jobs) == 1
    got, want = evaluated.jobs[0], looped.jobs[0]
    assert json.dumps(got.to_json()) == json.dumps(want.to_json())
    assert (want.batch_size, want.seed, want.cuda_graphs, want.limits.timeout_s, want.limits.cpu_threads) == \
        (64, 5, False, 240.0, 1)
    assert want.hyperparameters == {"lr": 0.03, "momentum": 0.8, "dropout": 0.2}


def test_eval_flags_override_the_config(tmp_path, monkeypatch):
    settings = write_settings(tmp_path, "digits", 300, 100)
    model = tmp_path / "net.py"
    model.write_text(get_baseline("lenet").source)
    sandbox = RecordingSandbox()
    monkeypatch.setattr(build, "make_sandbox", lambda cfg, work_root: sandbox)
    cli.main(["eval", str(model), "--config", str(settings), "--timeout", "50", "--epochs", "2", "--json"])
    (job,) = sandbox.jobs
    assert (job.limits.timeout_s, job.epochs, job.batch_size) == (50.0, 2, 64)


@pytest.mark.slow
def test_eval_and_the_loop_score_the_same_on_real_mnist(tmp_path, capsys):
    settings = write_settings(tmp_path, "mnist", 1000, 500)
    model = tmp_path / "lenet.py"
    model.write_text(get_baseline("lenet").source)
    rc = cli.main(["eval", str(model), "--config", str(settings), "--unsafe-no-isolation", "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    assert rc == cli.EXIT_OK and evaluated["status"] == "ok", evaluated
    cfg = load_config(settings, {"llm.spec": "mutate"})
    looped = loop_evaluate(cfg, model.read_text(), "lenet", tmp_path / "run")
    assert looped.status == "ok", looped
    assert evaluated["accuracy"] == looped.accuracy and looped.accuracy > 0.2  # chance: 0.1
    assert evaluated["param_count"] == looped.param_count
