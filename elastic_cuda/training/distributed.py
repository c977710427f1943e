"""Running over torchrun ranks: the rank environment (DistEnv), the device and dtype a rank uses, and sharding /
reducing / gathering work over ranks so that results do not depend on the number of ranks. Used by the trainer, the
eval and the experiments."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "gather_records", "global_mean", "resolve_device_dtype", "shard"]


def resolve_device_dtype(device: str, dtype: str, local_rank: int = 0):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        # more local ranks than GPUs share them round-robin (the 135M backbone leaves a GPU mostly idle: a rank
        # is bound by its Python launch overhead, so 2-3 ranks per GPU train 2-3x faster)
        device = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    dev = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)} or 'auto', got {dtype!r}")
    return dev, dtypes[dtype]


class DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment (torchrun); a process group when WORLD_SIZE > 1."""

    def __init__(self, device_type: str):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            backend = "gloo"
            if device_type == "cuda":
                ngpu = torch.cuda.device_count()
                torch.cuda.set_device(self.local_rank % ngpu)
                # NCCL refuses two ranks on one GPU; gloo all-reduces CUDA tensors too (ours are a few MB)
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
                backend = "nccl" if local_world <= ngpu else "gloo"
            dist.init_process_group(backend=backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()


def shard(items: list, env) -> list[tuple[int, object]]:
    """(global index, item) pairs this rank runs: indices rank, rank + W, ..."""
    return [(i, x) for i, x in enumerate(items) if i % env.world == env.rank]


def global_mean(total: float, count: int, env, device) -> float:
    """sum(total) / sum(count) over ranks."""
    t = env.all_reduce_(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
    return float(t[0] / t[1])


def gather_records(records: list[dict], env) -> list[dict]:
    """Every rank's records, on every rank, in the single-process order: sorted by their "_order" then "_index"
    keys (policy order, then sample index in eval), which are removed."""
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    records = sorted(records, key=lambda r: (r["_order"], r["_index"]))
    for r in records:
        del r["_order"], r["_index"]
    return records
