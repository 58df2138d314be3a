"""Multi-process training on PyTorch's own distributed package, launched by torchrun:

    torchrun --nproc_per_node 2 -m visiontune train DATA ...             # one machine, 2 processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m visiontune train DATA ...             # two machines, 8 GPUs each

The process group is "cpu:gloo,cuda:nccl" on GPUs (so object and CPU collectives work as
well) and gloo on CPUs. Each process sees batch_size / world_size images per step from a
DistributedSampler (the global batch stays `batch_size`); every collective tensor lives on
the training device (NCCL has no CPU tensors).

A training step is explicit rather than DistributedDataParallel's hooks inside backward:
each process runs its micro-batches forward and backward with no collective at all, then
all processes meet once (`agree_step`: did anyone run out of memory or get a non-finite
loss, and what micro-batch size can everyone manage), then average their gradients in
one flat all-reduce (`average_gradients`) and step. So an out-of-memory error on one
process can never leave the others waiting inside a collective: all shrink to the same
micro-batch size and repeat the step together, and the number of backward passes per
step is the same everywhere. BatchNorm statistics that train are broadcast from rank 0
after each step (as DDP's broadcast_buffers), and the best weights restored at the end
are broadcast from rank 0, so every process ends with the same model.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """More than one process: collectives are needed."""
        return self.launched and self.world_size > 1


def from_env() -> DistEnv:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)


def backend_for(device: torch.device) -> str:
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(env: DistEnv, device: torch.device) -> None:
    """Start the process group under torchrun (once per process). The group visiontune
    starts is destroyed at interpreter exit: gloo's worker threads left to the interpreter's
    teardown abort a process now and then (SIGABRT, "terminate called without an active
    exception") after a run that finished."""
    if env.launched and not dist.is_initialized():
        dist.init_process_group(backend_for(device))
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    if env.launched and device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return device


def reduce_totals(total: float, count: int, env: DistEnv, device: torch.device) -> tuple[float, int]:
    """(sum(total), sum(count)) over all processes."""
    summed, images = sum_over_processes([total, float(count)], env, device)
    return summed, int(images)


def sum_over_processes(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Each of `values` summed over all processes (every process must call it)."""
    if not env.parallel:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@dataclass(frozen=True)
class StepAgreement:
    out_of_memory: bool  # some process ran out of memory: everyone repeats the step
    non_finite: bool  # some process got a NaN/inf loss: nobody steps
    micro_size: int  # the smallest micro-batch any process proposes


def agree_step(out_of_memory: bool, non_finite: bool, micro_size: int, env: DistEnv,
               device: torch.device) -> StepAgreement:
    """One all-reduce per step: MAX of the flags, MIN of the proposed micro-batch sizes."""
    if not env.parallel:
        return StepAgreement(out_of_memory, non_finite, micro_size)
    t = torch.tensor([float(out_of_memory), float(non_finite), -float(micro_size)], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    oom, bad, neg = t.tolist()
    return StepAgreement(oom > 0, bad > 0, int(-neg))


def average_gradients(params: list[nn.Parameter], env: DistEnv, device: torch.device) -> None:
    """Replace each gradient by its mean over the processes (one flat all-reduce per dtype).
    Every process has gradients for the same parameters (the same phase trains)."""
    if not env.parallel:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same]).to(device)
        dist.all_reduce(flat)
        flat /= env.world_size
        offset = 0
        for g in same:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_tensors(tensors: list[torch.Tensor], env: DistEnv, device: torch.device) -> None:
    """Overwrite `tensors` with rank 0's values, in place."""
    if not env.parallel:
        return
    for t in tensors:
        buf = t.detach().to(device)
        dist.broadcast(buf, src=0)
        if buf.data_ptr() != t.data_ptr():  # t lives elsewhere (a CPU tensor under NCCL)
            t.detach().copy_(buf)


def broadcast_state(module: nn.Module, env: DistEnv, device: torch.device) -> None:
    """Every parameter and buffer of `module` as rank 0 holds it."""
    broadcast_tensors(list(module.state_dict().values()), env, device)


def training_norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Running statistics of the normalisation layers that are in training mode."""
    return [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
            for b in m.buffers()]


def barrier(env: DistEnv) -> None:
    """Every process waits here until all have arrived."""
    if env.parallel:
        dist.barrier()


def gather(obj: Any, env: DistEnv) -> list[Any]:
    if not env.parallel:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
