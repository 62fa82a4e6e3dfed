import pytest

from deltanas.agent.config import Config, ConfigError, dump_toml, load_config


def test_defaults_are_the_offline_demo():
    cfg = load_config()
    assert cfg.llm.spec == "hf:smollm2"
    assert cfg.data.dataset == "mnist"
    assert (cfg.llm.temperature, cfg.llm.top_k, cfg.llm.top_p) == (0.35, 50, 0.9)
    assert cfg.search.max_repairs == 2
    assert cfg.novelty.threshold == 0.9 and cfg.novelty.num_perm == 128 and cfg.novelty.shingle == 7


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\n[search]\ncycles = 7\n[llm]\nspec = "mutate"\n')
    cfg = load_config(p, {"search.candidates": 3, "search.cycles": None})
    assert (cfg.name, cfg.search.cycles, cfg.search.candidates, cfg.llm.spec) == ("x", 7, 3, "mutate")


def test_roundtrip_dump(tmp_path):
    cfg = load_config(None, {"llm.spec": "mutate", "data.limit_train": 100})
    p = tmp_path / "frozen.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("text, needle", [
    ("bogus = 1\n", "bogus: unknown key"),
    ("[search]\ncyclez = 3\n", "search.cyclez: unknown key"),
    ("[sandbox]\ntimeout_s = 0\n", "sandbox.timeout_s"),
    ("[sandbox]\ntimeout_s = -5\n", "greater than 0"),
    ("[search]\ncandidates = 0\n", "search.candidates"),
    ("[search]\ncycles = -1\n", "search.cycles"),
    ("[data]\ndataset = \"imagenet21k\"\n", "unknown dataset 'imagenet21k'"),
    ("[llm]\nspec = \"gpt5\"\n", "llm.spec"),
    ("baselines = [\"nope\"]\n", "unknown baseline"),
    ("[search]\nmode = \"half\"\n", "search.mode"),
    ("[llm]\ndtype = \"float64\"\n", "llm.dtype"),
    ("[search\n", "not valid TOML"),
    ("[search]\nedit_sites = 5\n", "max_hunks is 4"),
    ("[search]\nmin_added = 7\n", "above max_added"),
    ("[llm]\nlayers = \"any\"\n", "llm.layers"),
    ("[search]\nlayer_repeats = \"never\"\n", "search.layer_repeats"),
])
def test_bad_config_is_one_clear_message(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/deltanas.toml")


def test_model_forbids_extra_directly():
    with pytest.raises(Exception):
        Config.model_validate({"llm": {"spec": "mutate", "temperture": 0.2}})


def test_presets_are_overridden_by_the_file_and_the_flags(tmp_path):
    from deltanas.agent.config import ConfigError, load_config

    paper = load_config(None, {}, preset="paper")
    assert (paper.search.cycles, paper.search.candidates, paper.llm.max_new_tokens) == (22, 50, 1024)
    assert (paper.learn.r, paper.learn.alpha, paper.learn.lr, paper.learn.epochs, paper.learn.grad_accum) == \
        (32, 32, 1e-5, 3.0, 8)
    f = tmp_path / "c.toml"
    f.write_text("[search]\ncandidates = 7\n")
    cfg = load_config(f, {"search.cycles": 3}, preset="paper")
    assert (cfg.search.cycles, cfg.search.candidates, cfg.llm.max_new_tokens) == (3, 7, 1024)
    quick = load_config(None, {}, preset="quick")
    assert quick.learn.cold_start_cycles == 1 and quick.search.cycles == 4
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, {}, preset="fast")


def test_your_own_baseline_files_are_checked_before_anything_starts(tmp_path):
    from deltanas.tools.zoo import get_baseline

    mine = tmp_path / "mynet.py"
    mine.write_text(get_baseline("lenet").source)
    cfg = load_config(None, {"baselines": ["resnet", str(mine)]})
    assert cfg.baselines == ["resnet", str(mine)]
    assert get_baseline(str(mine)).name == "mynet"
    cases = {
        tmp_path / "missing.py": "does not exist",
        tmp_path / "broken.py": "does not parse",
        tmp_path / "nonet.py": "defines no class Net",
    }
    (tmp_path / "broken.py").write_text("class Net(:\n")
    (tmp_path / "nonet.py").write_text("import torch\n\nclass Model:\n    pass\n")
    for path, why in cases.items():
        with pytest.raises(ConfigError, match=why):
            load_config(None, {"baselines": [str(path)]})
    (tmp_path / "lenet.py").write_text(get_baseline("lenet").source)
    with pytest.raises(ConfigError, match="share the name"):
        load_config(None, {"baselines": ["lenet", str(tmp_path / "lenet.py")]})
