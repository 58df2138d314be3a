"""Multi-process training on PyTorch's own distributed package, launched by torchrun:

    torchrun --nproc_per_node 2 -m visiontune train DATA ...             # one machine, 2 processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m visiontune train DATA ...             # two machines, 8 GPUs each

gloo on CPU, nccl on GPU. Each process sees batch_size / world_size images per step from
a DistributedSampler (so the global batch stays `batch_size`), gradients are averaged by
DistributedDataParallel, the training loss and validation outputs are reduced across
processes so every process sees the same metrics (and early stopping agrees), and only
rank 0 writes the run directory. Frozen backbone phases run on images (no feature cache)
and the DDP wrapper is rebuilt when a phase changes which parameters train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistEnv:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)


def init(env: DistEnv, device: torch.device) -> None:
    if env.launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    if env.launched and device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return device


def reduce_mean(total: float, count: int, env: DistEnv) -> float:
    if not env.launched or env.world_size == 1:
        return total / max(1, count)
    t = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / max(1.0, float(t[1])))


def gather(obj: Any, env: DistEnv) -> list[Any]:
    if not env.launched or env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
