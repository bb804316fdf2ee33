"""Several processes, one run: torch.distributed under torchrun (gloo on CPU, NCCL on CUDA).

    torchrun --standalone --nproc_per_node 2 -m seq2seq train translator --preset multi30k-en-fr ...

Every rank holds the same weights (DistributedDataParallel averages the gradients) and trains on
its own share of each epoch's batches. Every rank also evaluates (the results are identical, so
every rank takes the same decisions without a message), decisions that read a clock use rank
0's, and only rank 0 writes files, logs and progress bars.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from seq2seq.errors import UserError


class Cluster:
    """This process's place in the run; a single process is rank 0 of 1 and every call is local."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu")):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def from_env(cls, device: torch.device) -> "Cluster":
        """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK,
        LOCAL_RANK, MASTER_ADDR/PORT); without torchrun, a cluster of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise UserError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # hours, not the default minutes: the other ranks wait while rank 0 builds a cold token cache
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
        return cls(rank, world, device)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def sum(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        tensor = self._tensor(values)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        tensor = self._tensor(values)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def from_main(self, value):
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's value, in rank order, on every rank."""
        if not self.active:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Leave the group together: a rank that tears its connections down while another still
        writes its files can make gloo abort that one ("terminate called ...") at exit."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
