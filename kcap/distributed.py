"""Data parallelism through torchrun (DDP), and the same code single-process.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 we join the process
group (NCCL on GPUs, gloo on CPU) and wrap the model in DistributedDataParallel. Each rank
reads its own shard of the data stream (see kcap.data.stream).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # A gloo group over the same ranks for small host-side values (all_min) when the main
    # group is NCCL: an NCCL reduction of a value the host needs back waits for the GPU's
    # whole queue, every step; gloo reduces host tensors without touching the GPU.
    host_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, wanted: str = "auto"):
        import torch

        if wanted == "auto":
            wanted = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(wanted)
        if device.type == "cuda" and device.index is None:  # set_device needs an index
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {wanted!r} asked for, but CUDA is not available")
            torch.cuda.set_device(device)
        return device

    def wrap(self, model):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a one-element list single-process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def all_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (on the host, in the gloo group: the
        trainer asks every step, and the GPU's queue must not be waited for)."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.int64)
        td.all_reduce(t, op=td.ReduceOp.MIN, group=self.host_group)
        return int(t.item())

    def barrier(self):
        if self.world > 1:
            import torch.distributed as td
            td.barrier()

    def shutdown(self):
        """Leave the process group together: a rank that tears down while another still works
        (rank 0 evaluating and writing the report) was seen to abort in gloo's destructor."""
        if self.world > 1:
            import torch.distributed as td
            if td.is_initialized():
                td.barrier()
                td.destroy_process_group()


def init() -> Dist:
    """Join the process group if torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not td.is_initialized():
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # every rank creates it, in the same order (new_group is collective)
    host = td.new_group(backend="gloo") if td.get_backend() == "nccl" else None
    return Dist(rank, world, local, host)
