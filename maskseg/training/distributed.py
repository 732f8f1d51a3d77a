"""DistributedDataParallel under ``torchrun``: the rank's device, the wrapped model, averaged losses."""

from __future__ import annotations

import os
from typing import Any


class Distributed:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) or a single process."""

    def __init__(self, world: int, rank: int, local_rank: int) -> None:
        self.world, self.rank, self.local_rank = world, rank, local_rank

    @classmethod
    def from_env(cls) -> Distributed:
        """The processes torchrun started (its environment variables), or one process without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(1, 0, 0)
        return cls(world, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, spec: str) -> Any:
        """The device of this rank (``spec`` as ``--device``); joins the process group under torchrun."""
        import torch
        import torch.distributed as dist

        from ..models import resolve_device

        device = resolve_device(spec)
        if self.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def wrap(self, module: Any, device: Any) -> Any:
        """``module`` in DistributedDataParallel under torchrun, else itself."""
        if self.world <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def mean(self, values: dict[str, float], device: Any) -> dict[str, float]:
        """``values`` averaged over the ranks."""
        if self.world <= 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist(), strict=True))

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group (if one was joined)."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
