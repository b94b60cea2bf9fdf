"""Cascade: routing sends exactly the band to stage 2; config errors. The real cascade over trained runs is
checked on the end-to-end demo output (tests/test_demo.py), which trains them once for both."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from distrib.cascade.config import load_cascade_config
from distrib.cascade.run import cascade_score, route
from distrib.config import ConfigError


def test_routing_escalates_exactly_the_band():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(500), [0.2, 0.7, 0.19999, 0.69999]])  # edges: t_low is in, t_high is out
    dec, esc = route(p, 0.2, 0.7)
    np.testing.assert_array_equal(esc, (p >= 0.2) & (p < 0.7))
    np.testing.assert_array_equal(dec[~esc], (p[~esc] >= 0.7).astype(int))
    assert (dec[esc] == -1).all()
    assert esc[-4:].tolist() == [True, False, False, True]
    _, none = route(p, -np.inf, np.inf)  # an infeasible stage-1 band escalates everything
    assert none.all()


def test_cascade_score_orders_paths_and_decides_at_half():
    p1 = np.array([0.05, 0.15, 0.3, 0.5, 0.6, 0.8, 0.95])
    meta = np.array([np.nan, np.nan, 0.1, 0.9, 0.5, np.nan, np.nan])
    s = cascade_score(p1, 0.2, 0.7, meta, 0.4)
    assert (s[:2] < 0.25).all() and (s[5:] >= 0.75).all() and ((s[2:5] >= 0.25) & (s[2:5] < 0.75)).all()
    # decisions at 0.5 equal the cascade's: stage 1 outside the band, meta >= 0.4 inside
    np.testing.assert_array_equal((s >= 0.5).astype(int), [0, 0, 0, 1, 1, 1, 1])
    assert s[0] < s[1] and s[5] < s[6] and s[2] < s[4] < s[3]


def test_cascade_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage1: {run: s1}\nstack: {dir: st, rule: yuoden}\n")
    with pytest.raises(ConfigError, match="stack.rule"):
        load_cascade_config(cfg)
    cfg.write_text("stage1: {run: s1}\nstack: {dir: st}\nbatch_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown cascade key 'batch_sise'.*did you mean 'batch_size'"):
        load_cascade_config(cfg)
    cfg.write_text("stage1: {run: s1, treshold: x}\nstack: {dir: st}\n")
    with pytest.raises(ConfigError, match="stage1.treshold"):
        load_cascade_config(cfg)
    cfg.write_text("stage1: {run: s1}\nstack: {dir: st}\n")
    c = load_cascade_config(cfg)
    assert c.stage1.run == str(tmp_path / "s1") and c.stack.dir == str(tmp_path / "st")  # relative to the YAML
    shipped = sorted((REPO / "launch" / "configs" / "cascades").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"deepfake.yaml", "debug.yaml"}
    for path in shipped:
        load_cascade_config(path)
