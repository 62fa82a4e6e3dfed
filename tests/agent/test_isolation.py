"""No model-written code runs without a filesystem view of its own unless the user opts in
(agent/run/isolation.py): the refusal, the opt-in by flag and by config key, the mutate
exemption, and the archive's record as `deltanas status` and `deltanas report` show it.
A fake sandbox stands in for a machine without Docker, bubblewrap or Landlock."""
from __future__ import annotations

import json

import pytest

from deltanas.agent.archive import Store
from deltanas.agent.cli import main
from deltanas.agent.config import ConfigError, load_config
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.run import isolation, build

MODEL = "openai:m@http://127.0.0.1:9/v1"  # a model-written run; preflight never calls the server


class Unconfined:
    """The process sandbox on a machine where no filesystem layer can be had."""

    name = "process"
    fs_isolated = False

    def __init__(self, *args, **kwargs):
        self.closed = False

    def layers(self):
        return [{"name": "bubblewrap", "in_force": False, "why": "bwrap is not installed"},
                {"name": "landlock", "in_force": False, "why": "the kernel has no Landlock"},
                {"name": "rlimits", "in_force": True, "why": "always"}]

    def isolation(self):
        return "process backend WITHOUT bubblewrap: NO filesystem isolation"

    def run(self, job):
        raise AssertionError("no job runs in these tests")

    def close(self):
        self.closed = True


class Layered(Unconfined):
    def __init__(self, in_force: str):
        super().__init__()
        self.in_force = in_force

    def layers(self):
        return [{**layer, "in_force": layer["name"] in (self.in_force, "rlimits")} for layer in super().layers()]


class Plain:
    """A sandbox from before `layers()`: only `fs_isolated` says."""

    name = "process"

    def __init__(self, fs_isolated: bool):
        self.fs_isolated = fs_isolated


class Docker:
    name = "docker"


@pytest.fixture
def unconfined(monkeypatch):
    """Every sandbox the run builds is Unconfined; the run itself stops before loading anything."""
    monkeypatch.setattr(build, "sandbox_for", lambda *a, **k: Unconfined())
    monkeypatch.setattr(build, "make_sandbox", lambda *a, **k: Unconfined())
    monkeypatch.setattr(build, "load_run_dataset", lambda cfg, name=None: "dataset")
    started = []

    def run_session(cfg, run_dir, *, plain, dataset):
        started.append(cfg)
        return 0

    import deltanas.agent.run.terminal as terminal

    monkeypatch.setattr(terminal, "run_session", run_session)
    return started


def test_fs_isolation_counts_docker_bubblewrap_and_landlock():
    assert isolation.fs_isolation(Docker()) is None
    assert isolation.fs_isolation(Layered("bubblewrap")) is None
    assert isolation.fs_isolation(Layered("landlock")) is None
    assert isolation.fs_isolation(Plain(True)) is None
    missing = isolation.fs_isolation(Unconfined())
    assert "bwrap is not installed" in missing and "no Landlock" in missing  # rlimits do not count
    assert "bubblewrap" in isolation.fs_isolation(Plain(False))


def test_a_model_run_without_isolation_is_refused_and_creates_nothing(tmp_path, unconfined, capsys):
    d = tmp_path / "r"
    assert main(["run", "--llm", MODEL, "--sandbox", "process", "--run-dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltanas: error: no filesystem isolation") and err.count("\n") == 1
    for needed in ("bwrap is not installed", "test labels", "apt install bubblewrap", "Docker engine",
                   "--unsafe-no-isolation", "unsafe_no_isolation = true under [sandbox]"):
        assert needed in err
    assert not d.exists() and unconfined == []


def test_the_flag_and_the_config_key_opt_in_alike(tmp_path, unconfined):
    d = tmp_path / "flag"
    assert main(["run", "--llm", MODEL, "--sandbox", "process", "--unsafe-no-isolation", "--run-dir", str(d)]) == 0
    assert "unsafe_no_isolation = true" in (d / "config.toml").read_text()  # so a resume keeps it
    toml = tmp_path / "c.toml"
    toml.write_text("[sandbox]\ntype = \"process\"\nunsafe_no_isolation = true\n")
    assert main(["run", "--llm", MODEL, "--config", str(toml), "--run-dir", str(tmp_path / "key")]) == 0
    assert [cfg.sandbox.unsafe_no_isolation for cfg in unconfined] == [True, True]


def test_mutate_runs_without_isolation_and_without_the_flag(tmp_path, unconfined):
    assert main(["run", "--llm", "mutate", "--sandbox", "process", "--run-dir", str(tmp_path / "r")]) == 0
    assert len(unconfined) == 1 and not unconfined[0].sandbox.unsafe_no_isolation


def test_eval_is_refused_too_and_names_its_flag(tmp_path, unconfined, capsys):
    model = tmp_path / "m.py"
    model.write_text("import os\n")
    assert main(["eval", str(model), "--sandbox", "process", "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "--unsafe-no-isolation" in err and "bubblewrap" in err and "[sandbox]" not in err


def test_build_deps_refuses_too_for_callers_that_skip_preflight(tmp_path):
    cfg = load_config(None, {"llm.spec": MODEL, "data.dataset": "synthetic", "baselines": ["lenet"]})
    sandbox = Unconfined()
    with pytest.raises(ConfigError, match="--unsafe-no-isolation"):
        build.build_deps(cfg, tmp_path / "run", sandbox=sandbox)
    assert sandbox.closed


def test_an_opted_in_run_is_recorded_and_shown_by_status_and_report(tmp_path, capsys):
    cfg = load_config(None, {"llm.spec": MODEL, "data.dataset": "synthetic", "baselines": ["lenet"],
                             "learn.enabled": False, "sandbox.unsafe_no_isolation": True})
    run_dir = tmp_path / "run"
    deps = build.build_deps(cfg, run_dir, llm=ScriptedBackend([]), sandbox=Unconfined())
    deps.executor.close()
    deps.store.close()
    [entry] = Store(run_dir / "archive.sqlite", readonly=True).get_meta(isolation.ISOLATION_META)
    assert entry["unsafe"] and entry["opted_in"] and not entry["isolated"] and entry["sandbox"] == "process"
    assert "bwrap is not installed" in entry["missing"] and "WITHOUT bubblewrap" in entry["description"]

    shown = "isolation: NONE (opted in with --unsafe-no-isolation"
    assert main(["status", str(run_dir)]) == 0
    assert shown in capsys.readouterr().out
    assert main(["status", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["isolation"] == [entry]
    assert main(["report", str(run_dir)]) == 0
    assert shown in capsys.readouterr().out
    assert f"**{shown}" in (run_dir / "report" / "summary.md").read_text()


def test_an_isolated_session_after_an_unsafe_one_still_says_so():
    unsafe = isolation.record("process", "", "no bwrap", model_code=True, opted_in=True)
    safe = isolation.record("docker", "", None, model_code=True, opted_in=False)
    mutate = isolation.record("process", "", "no bwrap", model_code=False, opted_in=False)
    assert isolation.describe([safe]).startswith("isolation: docker sandbox, a filesystem view of its own")
    assert "1 earlier session(s)" in isolation.describe([unsafe, safe]) and isolation.unsafe([unsafe, safe])
    assert "mutate backend's candidates only" in isolation.describe([mutate]) and not isolation.unsafe([mutate])
    assert "not recorded" in isolation.describe(None)
