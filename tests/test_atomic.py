"""Atomic writes: a failed write (e.g. a full disk) leaves the old file intact and no temp file behind."""

import errno

import pytest

from distrib import cli
from distrib.atomic import atomic_path, write_text


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results.json"
    write_text(target, "old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_suffix_is_kept_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "a.npz") as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.npz").read_bytes() == b"x"


def test_cli_reports_a_full_disk_clearly(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "shard.tar"))

    # under test is the CLI's reporting, so the full disk is simulated at the writer's boundary
    monkeypatch.setattr("distrib.data.shards.write_shards", full_disk)
    rc = cli.main(["shard", "--train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no space left" in err and "shard.tar" in err and "larger disk" in err


def test_json_files_carry_null_and_a_reason_never_a_bare_nan(tmp_path):
    import json

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from distrib.atomic import write_json

    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc = roc_auc_score([1, 1, 1], [0.2, 0.5, 0.9])  # one class: sklearn gives NaN
    assert np.isnan(auc)
    path = write_json(tmp_path / "metrics.json", {"test": {"auc": np.float64(auc), "n": np.int64(3)}})
    text = path.read_text()
    assert "NaN" not in text
    obj = json.loads(text)
    assert obj["test"]["auc"] is None and "one class" in obj["test"]["auc_reason"] and obj["test"]["n"] == 3
