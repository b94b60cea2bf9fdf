"""OOF extraction on real fold runs over the demo shards: exactly-once, leak-free, aligned, replayable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from distrib.cli import main as cli_main
from distrib.config import load_config
from distrib.data.index import read_index
from distrib.data.loader import build_loader
from distrib.data.transforms import build_transform
from distrib.errors import DataError
from distrib.stacking.align import check_oof_table
from distrib.stacking.embed import AlignedExpert, alignment_path, expected_training_rows, extract_oof

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"


@pytest.fixture(scope="module")
def oof(fold_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("oof") / "oof_embeddings.parquet"
    cfg = load_config(DEBUG, ["embed.dim=8", "embed.anchors=24", "embed.fit_samples=64", "embed.batch_size=16"])
    df = extract_oof(fold_runs, out, cfg.embed)
    return out, df


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_training_sample_once_from_the_model_that_never_saw_it(oof, demo_shards):
    path, df = oof
    index = read_index(demo_shards)
    back = pd.read_parquet(path)
    assert len(back) == len(df)
    assert list(back.columns[:7]) == ["key", "group", "label", "fold", "split", "model", "prob"]
    assert [c for c in back.columns if c.startswith("emb_")] == [f"emb_{j:03d}" for j in range(8)]
    rows = back[back["split"] == "oof"]
    assert rows["key"].is_unique and len(rows) == index["split_counts"]["train"]
    # the predicting model's fold is the sample's held-out fold: the index's group -> fold map
    assert (rows["fold"] == rows["group"].map(lambda g: int(index["groups"][g]))).all()
    assert rows.groupby("group")["fold"].nunique().max() == 1
    for split in ("val", "test"):
        part = back[back["split"] == split]
        assert part["key"].is_unique and len(part) == index["split_counts"][split] and (part["fold"] == -1).all()
    assert back["prob"].between(0, 1).all() and np.isfinite(back.filter(like="emb_").to_numpy()).all()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_duplicated_or_missing_row_in_the_real_table_raises(oof, demo_shards):
    _, df = oof
    expected = expected_training_rows(str(demo_shards))
    check_oof_table(df, expected)
    victim = df[df["split"] == "oof"].iloc[5]["key"]
    with pytest.raises(DataError, match=victim):
        check_oof_table(pd.concat([df, df[df["key"] == victim]]), expected)
    with pytest.raises(DataError, match=victim):
        check_oof_table(df[df["key"] != victim], expected)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_saved_alignment_reproduces_val_rows_at_inference(oof, fold_runs, demo_shards):
    """The cascade's path (AlignedExpert + saved .npz) gives the same val embedding/prob as the table."""
    path, df = oof
    expert = AlignedExpert(fold_runs, alignment_path(path))
    cfg = load_config(fold_runs[0] + "/config.yaml")
    loader = build_loader(
        str(demo_shards), "val", None, 0, 1, 0, 8, 0, build_transform(None, cfg.data, train=False), 0, mode="eval"
    )
    batch = next(iter(loader))
    emb, prob, recon = expert(batch["image"])
    table = df[df["split"] == "val"].set_index("key").loc[batch["key"]]
    np.testing.assert_allclose(emb, table.filter(like="emb_").to_numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prob, table["prob"].to_numpy(), atol=1e-5)
    assert recon is None and expert.meta["runs"] == fold_runs


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_embed_cli_and_bad_run_sets(fold_runs, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    assert (
        cli_main(
            [
                "embed",
                "--runs",
                *fold_runs,
                "--out",
                str(out),
                "embed.dim=4",
                "embed.anchors=16",
                "embed.fit_samples=48",
            ]
        )
        == 0
    )
    assert pd.read_parquet(out).filter(like="emb_").shape[1] == 4 and alignment_path(out).is_file()
    assert cli_main(["embed", "--runs", fold_runs[0], fold_runs[0], fold_runs[2], "--out", str(out)]) == 2
    assert "one run per fold" in capsys.readouterr().err
    assert cli_main(["embed", "--runs", *fold_runs, "--out", str(out), "embed.dim=64"]) == 2
    assert "embed.dim" in capsys.readouterr().err


def test_embed_refuses_fold_runs_of_different_configs_and_a_non_parquet_name(fold_runs, tmp_path, capsys):
    import shutil

    import yaml

    mixed = tmp_path / "fold1_other_lr"
    shutil.copytree(fold_runs[1], mixed)
    cfg = yaml.safe_load((mixed / "config.yaml").read_text())
    cfg["optim"]["lr"] = float(cfg["optim"]["lr"]) * 3
    (mixed / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "mixed.parquet"
    assert cli_main(["embed", "--runs", fold_runs[0], str(mixed), fold_runs[2], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different configs" in err and "optim.lr" in err and str(mixed) in err
    assert not out.exists()
    csv = tmp_path / "oof.csv"
    assert cli_main(["embed", "--runs", *fold_runs, "--out", str(csv)]) == 2
    assert "name it *.parquet" in capsys.readouterr().err and not csv.exists()
