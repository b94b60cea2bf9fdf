"""Launched by tests/test_loader_ddp.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo).

Each rank iterates one training epoch of deliberately uneven shards, doing an all_reduce per batch
(the lock-step a DDP backward does: unequal batch counts would hang here until the timeout), then
all-reduces its batch count, and runs one eval pass whose valid rows must cover the split exactly once.
Rank 0 writes the result JSON for the test to check.
"""

import argparse
import json
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import PartialState

from distrib.config import AugmentConfig, DataConfig
from distrib.data.loader import build_loader
from distrib.data.transforms import build_transform

p = argparse.ArgumentParser()
p.add_argument("--shards", required=True)
p.add_argument("--out", required=True)
p.add_argument("--workers", type=int, default=1)
a = p.parse_args()

# backend must be explicit on CPU: a bare PartialState() here reports DistributedType.NO with 1 process
state = PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=60))
rank, world = state.process_index, state.num_processes
data = DataConfig(img_size=32)
train_tf = build_transform(AugmentConfig(hflip=0.5, rotate=90, motion_blur_p=0.5), data, train=True)
loader = build_loader(a.shards, "train", [0, 1], rank, world, a.workers, 4, epoch=1, transform=train_tf, seed=0)
steps = 0
for batch in loader:
    t = batch["image"].mean().reshape(1)
    dist.all_reduce(t)  # lock-step with the other rank, as DDP's gradient all-reduce is
    steps += 1
total = torch.tensor([steps])
dist.all_reduce(total)  # the all-reduced batch count: equal counts mean total == world * steps
gathered = [None] * world
dist.all_gather_object(gathered, [steps, len(loader)])

eval_tf = build_transform(None, data, train=False)
ev = build_loader(a.shards, "val", None, rank, world, a.workers, 4, 0, eval_tf, 0, mode="eval")
keys = []
for batch in ev:
    dist.all_reduce(batch["valid"].sum().reshape(1))
    keys += [k for k, v in zip(batch["key"], batch["valid"].tolist()) if v]
all_keys = [None] * world
dist.all_gather_object(all_keys, keys)
report = [None] * world
dist.all_gather_object(report, {"train": loader.report(), "eval": ev.report()})
if rank == 0:
    flat = [k for ks in all_keys for k in ks]
    with open(a.out, "w") as f:
        json.dump(
            {
                "world_size": world,
                "backend": str(dist.get_backend()),
                "distributed_type": str(state.distributed_type),
                "train_batches": gathered,
                "train_batches_sum": int(total),
                "eval_keys": flat,
                "reports": report,
            },
            f,
        )
dist.barrier()  # avoids the intermittent gloo-destructor hang at exit (PITFALLS.md)
state.destroy_process_group()
