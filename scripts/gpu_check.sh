#!/usr/bin/env bash
# One command for a fresh offline GPU node: install the bundle beside the node's torch, build the demo shards,
# run the gpu tests (most informative first) and the trainer/loader benches, write OUT_DIR/gpu_report.{json,md}.
#
#     scripts/gpu_check.sh BUNDLE OUT_DIR        # BUNDLE from `make offline-bundle PY=3.12 SLIM=1`
#
# Every step runs under its own `timeout`; one over budget is recorded as timed out and the next step runs.
# The budgets add up to 7.7 minutes, so the check ends within 8 on one H100 with 16 cores. PYTHON names the
# node's interpreter (default python3); the venv keeps its site-packages, so the node's CUDA torch is the one
# that runs. Without CUDA the gpu tests skip and the benches run as a small CPU smoke run; the report says so.
set -u
if [ $# -ne 2 ] || [ ! -d "$1" ] || ! ls "$1"/*.whl > /dev/null 2>&1; then
    echo "usage: scripts/gpu_check.sh BUNDLE OUT_DIR (BUNDLE: a folder of wheels from make offline-bundle)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$(cd "$1" && pwd)
mkdir -p "$2/logs" "$2/bench" && OUT=$(cd "$2" && pwd)
PYTHON=${PYTHON:-python3}
VENV=$OUT/venv
PY=$VENV/bin/python
rm -f "$OUT/steps.jsonl" "$OUT/tests.jsonl" "$OUT/tests.jsonl.order" "$OUT/junit.xml" "$OUT/env.json" "$OUT"/bench/*.out
export REPO BUNDLE OUT PYTHON VENV PY TMPDIR=$OUT/tmp HF_HUB_OFFLINE=1 MPLBACKEND=Agg RAY_AUTH_MODE=disabled
mkdir -p "$TMPDIR"
T0=$(date +%s)

step() { # step NAME BUDGET_S COMMAND...: stdout+stderr to logs/NAME.log, outcome to steps.jsonl
    local name=$1 budget=$2 start rc
    shift 2
    start=$(date +%s%N)
    # bash -c: COMMAND may be one of the functions below (exported), which `timeout` alone cannot run
    timeout -k 5 "$budget" bash -c '"$@"' step "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    "$PYTHON" "$REPO/scripts/gpu_report.py" step "$OUT" "$name" "$rc" \
        "$((($(date +%s%N) - start) / 1000000))e-3" "$budget" "$OUT/logs/$name.log"
    echo "[$(($(date +%s) - T0)) s] $name: $([ $rc = 0 ] && echo ok || echo "exit $rc")" >&2
    return $rc
}

install() {
    "$PYTHON" -m venv --system-site-packages "$VENV" || return
    # a node whose python is itself a venv: its site-packages (the node's torch) stay visible too
    "$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")' \
        > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_node_site.pth" &&
        "$PY" -m pip install -q --disable-pip-version-check --no-compile --no-index --no-deps "$BUNDLE"/*.whl &&
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation "$REPO" &&
        { "$PY" -m pip check || true; } # informational: the node's own packages may declare more than we use
}

environment() {
    "$PY" - << 'EOF'
import json, os, platform, sys
from importlib.metadata import version
import torch
cuda = torch.cuda.is_available()
env = {
    "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
    "torch": torch.__version__, "torch_file": torch.__file__, "cuda_build": torch.version.cuda,
    "cuda_available": cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
    "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": torch.cuda.device_count(),
    "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
}
env.update({p: version(p) for p in ("distrib", "torchvision", "timm", "accelerate", "ray", "deepspeed", "transformers")})
open(os.path.join(os.environ["OUT"], "env.json"), "w").write(json.dumps(env, indent=1) + "\n")
print(env)
EOF
}

data() {
    "$VENV/bin/distrib" data demo --out "$OUT/demo_data" --size tiny --overwrite &&
        "$VENV/bin/distrib" shard --train "$OUT/demo_data/train_manifest.csv" --val "$OUT/demo_data/val_manifest.csv" \
            --test "$OUT/demo_data/test_manifest.csv" --out "$OUT/shards" --folds 3 --shard-size 30 --overwrite
}

bench() { # bench NAME ARGS...: `distrib bench ARGS` with its stdout (the JSON on the last line) to bench/NAME.out
    local name=$1
    shift
    "$VENV/bin/distrib" bench "$@" > "$OUT/bench/$name.out"
}
export -f install environment data bench

if ! step install 75 install; then
    "$PYTHON" "$REPO/scripts/gpu_report.py" write "$OUT"
    echo "gpu check: the install failed (see $OUT/logs/install.log); report in $OUT/gpu_report.md" >&2
    exit 1
fi
step env 15 environment
{ nvidia-smi && nvidia-smi topo -m; } > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi on this machine" > "$OUT/nvidia-smi.txt"
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2> /dev/null || echo 0)
# CPU-only: one thread per process; OpenMP's spinning threads on a shared CPU make a step 30x slower
[ "$CUDA" = 1 ] || export OMP_NUM_THREADS=1

step data 30 data

cd "$REPO" # the suite's pytest config (markers, timeouts) lives in pyproject.toml
step pytest_gpu 135 env PYTHONPATH="$REPO/scripts" GPU_CHECK_RESULTS="$OUT/tests.jsonl" \
    "$PY" -m pytest -q -p gpu_order -m gpu tests/ --junitxml="$OUT/junit.xml" -o cache_dir="$OUT/.pytest_cache" \
    --basetemp="$OUT/pytest_tmp"

# The plans' models at their batch sizes (the experiment YAMLs), bf16, peak memory. Without CUDA only a smoke run
# that shows the command works (MobileNetV4-S, fp32, 32 px, batch 2: a CPU step of the larger two takes seconds).
EXP=launch/configs/experiments
STEPS=10 SMALL=()
[ "$CUDA" = 1 ] || STEPS=2 SMALL=(data.batch_size=2 data.img_size=32 "train.mixed_precision='no'")
for spec in mobilenetv4_s_224:deepfake_stage1_mobilenetv4 effnetv2_b3_256:deepfake_expert_effnetv2_b3 \
    convnextv2_t_128:pit_exp002_convnextv2_tiny; do
    name=${spec%%:*}
    if [ "$CUDA" = 1 ] || [ "$name" = mobilenetv4_s_224 ]; then
        step "bench_trainer_$name" 35 bench "trainer_$name" trainer --config "$EXP/${spec#*:}.yaml" --vs timm \
            --steps "$STEPS" --out "$TMPDIR/bench_$name" model.pretrained=false train.mixed_precision=bf16 "${SMALL[@]}"
    else
        "$PYTHON" "$REPO/scripts/gpu_report.py" skip "$OUT" "bench_trainer_$name" "no CUDA"
    fi
done

# augment.device=model and decode on the GPU (the bench checks both keys; it times the augment split on the GPU).
# Without CUDA: 1 worker, 2 steps, on the CPU.
for w in 1 4 8 16; do
    if [ "$CUDA" = 1 ]; then
        step "bench_loader_w$w" 25 bench "loader_w$w" loader --shards "$OUT/shards" --workers "$w" --steps 8 \
            --out "$TMPDIR/bench_loader_w$w" augment.device=model data.decode_device=cuda
    elif [ "$w" = 1 ]; then
        step "bench_loader_w$w" 60 bench "loader_w$w" loader --shards "$OUT/shards" --workers "$w" --steps 2 \
            --out "$TMPDIR/bench_loader_w$w" augment.device=model data.decode_device=cpu device=cpu
    else
        "$PYTHON" "$REPO/scripts/gpu_report.py" skip "$OUT" "bench_loader_w$w" "no CUDA"
    fi
done

"$PYTHON" "$REPO/scripts/gpu_report.py" write "$OUT"
echo "gpu check: $(($(date +%s) - T0)) s, report in $OUT/gpu_report.md" >&2
