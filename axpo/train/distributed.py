"""Process group setup and the few collectives the trainer needs (gloo on CPU, NCCL on GPUs).

Launched by torchrun / the deepspeed launcher, the environment names rank, world size and the
rendezvous; a plain `axpo train` is a world of one on a free local port.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "all_gather_objects", "all_reduce_sum", "all_reduce_max", "barrier",
           "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config trainer.device is 'cuda' but torch sees no CUDA device")
    return device


def setup(device: str) -> DistInfo:
    """Initializes the default process group (once) through DeepSpeed and picks the device."""
    kind = resolve_device(device)
    if kind == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    if "RANK" not in os.environ:  # not launched by torchrun / deepspeed: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if kind == "cpu" else "nccl", auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (pickled; rollout records, small)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _reduce(values, op, device) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values, device=torch.device("cpu")) -> list[float]:
    return _reduce(values, dist.ReduceOp.SUM, device)


def all_reduce_max(values, device=torch.device("cpu")) -> list[float]:
    return _reduce(values, dist.ReduceOp.MAX, device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
