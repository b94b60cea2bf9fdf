"""A config field's one-line doc (its ``field(metadata={"doc": ...})``) reaches the user wherever the key
does: ``distrib COMMAND --help`` lists the keys a command's overrides take, and a bad value or an
unknown key quotes the doc of the key it names."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import pytest

from conftest import REPO
from distrib.cascade.config import CascadeConfig, load_cascade_config
from distrib.cli import _parse, build_parser
from distrib.config import ConfigError, load_config, schema
from distrib.config.docs import default_text
from distrib.recipes.config import SECTIONS as RECIPE_SECTIONS
from distrib.recipes.config import load_recipe

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
DEMO_RECIPE = REPO / "launch" / "recipes" / "demo.yaml"


def _doc(cls: type, name: str) -> str:
    return next(f.metadata["doc"] for f in dataclasses.fields(cls) if f.name == name)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        _parse(build_parser(), [*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # wrapped lines joined: the doc reads as one line


def _keys(tables) -> list[tuple[str, str]]:
    out = []
    for section, cls in tables:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                key = f"{section}.{f.name}" if section else f.name
                out.append((key, " ".join(f"{key}={default_text(f)} {f.metadata['doc']}".split())))
    return out


SECTION_OF = {"tune": "tune", "embed": "embed", "stack": "stack", "thresholds": "thresholds", "export": "export"}


@pytest.mark.parametrize("command", ["train", "tune", "embed", "stack", "thresholds", "export", "run", "demo"])
def test_help_lists_each_key_with_its_doc(capsys, command):
    text = _help(capsys, command)
    if command == "train":
        tables = [("", schema.ExperimentConfig)]
        tables += [(k, schema.SECTIONS[k]) for k in ("data", "augment", "model", "optim", "train", "dist", "eval")]
    elif command in SECTION_OF:
        tables = [(SECTION_OF[command], schema.SECTIONS[SECTION_OF[command]])]
    else:
        tables = [(k, RECIPE_SECTIONS[k]) for k in ("data", "stage1", "cascade", "shootout")]
    keys = _keys(tables)
    assert len(keys) >= 5
    for key, row in keys:
        assert f" {row} " in f" {text} ", f"distrib {command} --help lacks {key}'s default and doc: {row}"
    assert "docs/reference/config.md" in text


def test_every_command_taking_overrides_documents_its_keys(capsys):
    """bench's KEY=VALUE words are benchmark knobs, not config keys; every other command's are."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    takes = sorted(n for n, p in sub.choices.items() if any(a.dest == "overrides" for a in p._actions))
    assert len(takes) >= 8
    for name in takes:
        if name != "bench":
            assert "config keys, KEY=DEFAULT" in _help(capsys, name), name


@pytest.mark.parametrize(
    ("override", "cls", "names"),
    [
        ("optim.lr=-1", schema.OptimConfig, ["lr"]),  # a range check
        ("optim.lr=abc", schema.OptimConfig, ["lr"]),  # a type check
        ("stack.meta=xgboost", schema.StackConfig, ["meta"]),  # a choice, in a downstream section
        ("augment.scale_min=9", schema.AugmentConfig, ["scale_min", "scale_max"]),  # one check, two fields
        ("augment.color_jitter=[0,0,0,x]", schema.AugmentConfig, ["color_jitter"]),  # a list item
    ],
)
def test_bad_value_quotes_the_fields_doc(override, cls, names):
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG, [override])
    msg = str(e.value)
    assert msg.startswith("invalid value for ") and msg.count("\n") == 0, msg
    for n in names:
        assert f"{cls._prefix}.{n}: {_doc(cls, n)}" in msg, msg


def test_unknown_key_suggestion_says_what_it_means():
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG, ["optim.learning_rate=1e-3"])
    assert f"did you mean 'optim.lr' ({_doc(schema.OptimConfig, 'lr')})?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO_RECIPE, ["stack.n_estimator=3"])
    assert f"did you mean 'stack.n_estimators' ({_doc(schema.StackConfig, 'n_estimators')})?" in str(e.value)


def test_recipe_and_cascade_values_quote_their_docs(tmp_path):
    cascade_section = RECIPE_SECTIONS["cascade"]
    with pytest.raises(ConfigError, match=re.escape(f"cascade.rule: {_doc(cascade_section, 'rule')}")):
        load_recipe(DEMO_RECIPE, ["cascade.rule=best"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage1: {run: s1}\nstack: {dir: st}\ndevice: tpu\n")
    with pytest.raises(ConfigError, match=re.escape(f"device: {_doc(CascadeConfig, 'device')}")) as e:
        load_cascade_config(cfg)
    assert str(cfg) in str(e.value)
