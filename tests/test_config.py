"""Config resolution: defaults -> YAML -> dotted overrides; every shipped YAML loads."""

from pathlib import Path

import pytest

from distrib.config import ConfigError, config_to_overrides, load_config, save_config

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "launch" / "configs"
CONFIGS = sorted((CONFIG_ROOT / "experiments").glob("*.yaml"))
LOADED_BY_A_TEST = ("experiments", "grids", "cascades")  # test_config, test_tune, test_cascade


def test_resolution_order(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "debug.yaml", ["optim.lr=3e-4", "data.fold=2"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # override beats YAML
    assert cfg.data.fold == 2
    assert cfg.data.img_size == 32  # YAML beats base.yaml
    assert cfg.model.num_classes == 1  # base.yaml beats defaults
    assert cfg.embed.dim == 16


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    if path.name.startswith("grid_") or path.name.startswith("cascade_"):
        pytest.skip("not an experiment config (grid/cascade files have their own loader tests)")
    cfg = load_config(path)
    assert cfg.model.name


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimm.lr'.*'optim'"):
        load_config(None, ["optimm.lr=1e-3"])


def test_bad_value_names_field_value_and_range():
    with pytest.raises(ConfigError, match=r"'augment.hflip': 2.0 \(allowed: a probability in 0..1\)"):
        load_config(None, ["augment.hflip=2"])
    with pytest.raises(ConfigError, match=r"'data.normalize': 'foo'.*imagenet, model, none"):
        load_config(None, ["data.normalize=foo"])
    with pytest.raises(ConfigError, match=r"'optim.lr': 'abc' \(expected a number\)"):
        load_config(None, ["optim.lr=abc"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  nmae: resnet18\n")
    with pytest.raises(ConfigError, match=r"'model.nmae' in .*bad.yaml.*did you mean 'model.name'"):
        load_config(p)


def test_saved_config_replays(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "debug.yaml", ["optim.lr=3e-4", "model.kwargs.depth=3"])
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg
    assert load_config(None, config_to_overrides(cfg)) == cfg


def test_every_shipped_config_folder_is_loaded_by_a_test():
    folders = {p.parent.name for p in CONFIG_ROOT.rglob("*.yaml")}
    assert folders <= set(LOADED_BY_A_TEST), f"config folders no test loads: {folders - set(LOADED_BY_A_TEST)}"
    assert not list(CONFIG_ROOT.glob("*.yaml")), "configs live in a folder that says what they are"
