"""launch/slurm/*.sbatch: each renders (bash substitutes its variables) into commands the real parsers accept."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from conftest import REPO

SLURM = REPO / "launch" / "slurm"


def _render(name: str, **variables: str) -> list[list[str]]:
    """Run the template with DRY_RUN=1 and the given variables; one argv per printed command."""
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **variables}
    proc = subprocess.run(["bash", str(SLURM / name)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["train.sbatch", "ray_cluster.sbatch"])
def test_template_is_valid_bash(name):
    text = (SLURM / name).read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes=" in text and "# ---- variables" in text
    proc = subprocess.run(["bash", "-n", str(SLURM / name)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name,var", [("train.sbatch", "MAIN_IP"), ("ray_cluster.sbatch", "HEAD_IP")])
def test_template_without_the_main_address_stops_and_names_the_variable(name, var):
    """Outside Slurm (no node list), the address used to come out empty (`--main_process_ip ''`) with exit 0."""
    proc = subprocess.run(
        ["bash", str(SLURM / name)],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and f"{var} is empty" in proc.stderr and f"set {var}=" in proc.stderr, proc.stderr
    assert "launch" not in proc.stdout and "tune" not in proc.stdout  # nothing printed to run


def test_train_sbatch_renders_to_valid_accelerate_launches():
    from accelerate.commands.launch import launch_command_parser

    cmds = _render(
        "train.sbatch",
        MAIN_IP="10.1.2.3",
        NNODES="3",
        GPUS_PER_NODE="4",
        RUN_DIR="/nfs/runs/x",
        SHARDS="s3://bucket/shards",
        EXTRA_OVERRIDES="optim.lr=3e-4 train.epochs=2",
        RESUME="--resume",
    )
    assert len(cmds) == 3  # one per node
    parser = launch_command_parser()
    for rank, argv in enumerate(cmds):
        assert argv[:2] == ["accelerate", "launch"]
        args = parser.parse_args(argv[2:])  # the real accelerate flag set; unknown flags exit
        assert (args.machine_rank, args.num_machines, args.num_processes) == (rank, 3, 12)
        assert (args.main_process_ip, args.main_process_port) == ("10.1.2.3", 29500)
        assert args.rdzv_conf == "timeout=300" and args.config_file == "accelerate_config.yaml"
        assert args.training_script == "launch/train.py"
        assert args.training_script_args == [
            "launch/configs/experiments/deepfake_expert_effnetv2_b3.yaml",
            "--out",
            "/nfs/runs/x",
            "data.shards=s3://bucket/shards",
            "optim.lr=3e-4",
            "train.epochs=2",
            "--resume",
        ]
    assert (REPO / cmds[0][cmds[0].index("--config_file") + 1]).is_file()


def test_ray_cluster_sbatch_renders_to_valid_ray_and_tune_commands():
    from ray.scripts.scripts import start

    from distrib.cli import _parse, build_parser

    cmds = _render(
        "ray_cluster.sbatch",
        HEAD_NODE="node1",
        HEAD_IP="10.1.2.3",
        RAY_PORT="6380",
        SWEEP_DIR="/nfs/sweep",
        STORAGE="/nfs/ray",
        CPUS_PER_NODE="16",
        GPUS_PER_NODE="2",
    )
    head, worker, tune, node = cmds
    for argv in (head, worker):  # Ray's own click command parses (and rejects unknown options)
        assert argv[:2] == ["ray", "start"]
        start.make_context("start", argv[2:])
    assert "--head" in head and head[head.index("--port") + 1] == "6380"
    assert worker[worker.index("--address") + 1] == "10.1.2.3:6380"
    assert tune[0] == "distrib"
    a = _parse(build_parser(), tune[1:])  # what `distrib` itself does with argv
    assert (a.command, a.address, a.storage, a.out) == ("tune", "10.1.2.3:6380", "/nfs/ray", "/nfs/sweep")
    assert a.overrides == ["data.shards=/shared/shards", "tune.gpus_per_trial=0.25"]
    for path in (a.config, a.grid):  # the defaults point at shipped files
        assert (REPO / path).is_file(), path


def test_ray_cluster_sbatch_starts_a_fork_server_per_node_and_hands_the_raylet_its_socket(tmp_path):
    """The node prefix the template puts before `ray start`, run here with a stand-in for `ray start`: a real
    sweep.zygote comes up on the socket and the command after the prefix sees DISTRIB_ZYGOTE."""
    import sys

    import psutil

    sock = str(tmp_path / "z.sock")
    *_, node = _render(
        "ray_cluster.sbatch", HEAD_NODE="node1", HEAD_IP="10.1.2.3", PYTHON=sys.executable, ZYGOTE_SOCK=sock
    )
    probe = [
        sys.executable,
        "-c",
        "import os, time; time.sleep(1); print(os.environ['DISTRIB_ZYGOTE'], "
        "os.path.exists(os.environ['DISTRIB_ZYGOTE']))",
    ]
    try:
        out = subprocess.run([*node, *probe], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0 and out.stdout.split() == [sock, "True"], out.stderr
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if sock in (p.info["cmdline"] or []):
                p.kill()
