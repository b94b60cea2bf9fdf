"""Alignment and merge checks: Procrustes recovers a known rotation; OOF coverage violations raise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ortho_group

from distrib.errors import DataError
from distrib.stacking.align import (
    average_aligned,
    check_oof_table,
    fit_alignments,
    fit_rotation,
    load_alignment,
    save_alignment,
)


def test_procrustes_recovers_known_rotation_and_shift():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(64, 8))
    true_rot = ortho_group.rvs(8, random_state=1)
    shift = rng.normal(size=8) * 5
    source = target @ true_rot.T + shift  # source = target rotated by R^T and shifted
    rot, mu_s, _, residual = fit_rotation(source, target)
    np.testing.assert_allclose(rot, true_rot, atol=1e-8)
    np.testing.assert_allclose((source - mu_s) @ rot + target.mean(0), target, atol=1e-8)
    assert residual < 1e-10


def test_procrustes_with_noise_is_close_and_orthogonal():
    rng = np.random.default_rng(3)
    target = rng.normal(size=(200, 6))
    true_rot = ortho_group.rvs(6, random_state=4)
    source = target @ true_rot.T + rng.normal(scale=0.05, size=target.shape)
    rot, *_, residual = fit_rotation(source, target)
    np.testing.assert_allclose(rot.T @ rot, np.eye(6), atol=1e-10)
    assert np.abs(rot - true_rot).max() < 0.05
    assert 0 < residual < 0.1


def _fold_features(rng, n, latent_dim, feat_dim, mix):
    z = rng.normal(size=(n, latent_dim)) * np.linspace(3, 1, latent_dim)
    return z, z @ mix


def test_fit_alignments_maps_every_fold_into_the_reference_frame(tmp_path):
    """Two 'fold models' see the same latent content through different linear feature maps."""
    rng = np.random.default_rng(0)
    latent, feat_dim, dim = 4, 12, 4
    mixes = [rng.normal(size=(latent, feat_dim)) for _ in range(2)]
    # fold-specific orthogonal feature maps so PCA spaces differ only by a rotation
    mixes = [np.linalg.qr(m.T)[0].T for m in mixes]
    train = [_fold_features(rng, 300, latent, feat_dim, m)[1] for m in mixes]
    z_anchor = rng.normal(size=(50, latent)) * np.linspace(3, 1, latent)
    anchors = [z_anchor @ m for m in mixes]
    aligns = fit_alignments(train, anchors, dim=dim, seed=0)
    assert aligns[0].residual < 1e-8 and aligns[1].residual < 1e-6
    z_new = rng.normal(size=(20, latent))
    a0 = aligns[0].transform(z_new @ mixes[0])
    a1 = aligns[1].transform(z_new @ mixes[1])
    np.testing.assert_allclose(a0, a1, atol=1e-6)  # same sample -> same aligned coordinates
    np.testing.assert_allclose(average_aligned([z_new @ mixes[0], z_new @ mixes[1]], aligns), a0, atol=1e-6)
    path = save_alignment(tmp_path / "alignment.npz", aligns, {"runs": ["a", "b"]})
    loaded, meta = load_alignment(path)
    assert meta["runs"] == ["a", "b"] and meta["folds"] == [0, 1]
    np.testing.assert_allclose(loaded[1].transform(z_new @ mixes[1]), a1)


def test_projection_refuses_more_dims_than_samples():
    with pytest.raises(DataError, match="embed.dim"):
        fit_alignments([np.ones((3, 10))], [np.ones((3, 10))], dim=8)


def _tables():
    expected = pd.DataFrame(
        {
            "key": [f"k{i}" for i in range(9)],
            "group": ["g0", "g0", "g1", "g2", "g2", "g3", "g4", "g4", "g5"],
            "label": [0, 1, 0, 1, 0, 1, 0, 1, 0],
            "fold": [0, 0, 0, 1, 1, 1, 2, 2, 2],
        }
    )
    oof = expected.assign(split="oof", prob=0.5)
    val = pd.DataFrame(
        {"key": ["v0", "v1"], "group": ["gv", "gv"], "label": [0, 1], "fold": -1, "split": "val", "prob": 0.5}
    )
    return expected, pd.concat([oof, val], ignore_index=True)


def test_valid_table_passes():
    expected, df = _tables()
    check_oof_table(df, expected)


def test_duplicated_row_raises_naming_the_key():
    expected, df = _tables()
    df = pd.concat([df, df.iloc[[4]]], ignore_index=True)
    with pytest.raises(DataError, match=r"more than once: k4"):
        check_oof_table(df, expected)


def test_missing_row_raises_naming_the_key():
    expected, df = _tables()
    df = df[df["key"] != "k7"]
    with pytest.raises(DataError, match=r"no out-of-fold row: k7"):
        check_oof_table(df, expected)


def test_row_from_a_model_that_saw_it_raises():
    expected, df = _tables()
    df.loc[df["key"] == "k2", "fold"] = 1
    with pytest.raises(DataError, match=r"trained on them.*k2"):
        check_oof_table(df, expected)


def test_label_mismatch_and_group_leak_raise():
    expected, df = _tables()
    bad = df.copy()
    bad.loc[bad["key"] == "k5", "label"] = 0
    with pytest.raises(DataError, match=r"labels differ.*k5"):
        check_oof_table(bad, expected)
    leaky_expected = expected.copy()
    leaky_expected.loc[leaky_expected["key"] == "k3", "group"] = "g0"  # g0 now in folds 0 and 1
    leaky = df.copy()
    leaky.loc[leaky["key"] == "k3", "group"] = "g0"
    with pytest.raises(DataError, match=r"cross folds.*g0"):
        check_oof_table(leaky, leaky_expected)
    shared = df.copy()
    shared.loc[shared["key"] == "v0", "group"] = "g1"
    with pytest.raises(DataError, match=r"both the training folds and val: g1"):
        check_oof_table(shared, expected)
