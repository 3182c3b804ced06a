"""Processes sharing a benchmark: members are dealt round-robin by rank, and each member's own Trainer runs as
a single process on one device (it must neither join the benchmark's process group nor gather over it)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from lit_amdet.errors import ConfigError, LitAmdetError

#: environment variables that would make a member's own Trainer join the benchmark's process group
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                   "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Shard:
    """This process's place among the processes sharing a benchmark; members are dealt round-robin."""

    rank: int = 0
    world_size: int = 1

    def take(self, items: Sequence) -> list:
        return list(items[self.rank::self.world_size])


def current_shard(rank: int | None = None, world_size: int | None = None) -> Shard:
    """Rank and world size: given, else ``RANK``/``WORLD_SIZE`` (torchrun), else an initialised torch.distributed."""
    if rank is None or world_size is None:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not within world size {world_size}")
    return Shard(rank, world_size)


@contextmanager
def one_process() -> Iterator[None]:
    """Run a member's own Trainer as a single process: hide the benchmark's distributed environment from it."""
    saved = {k: os.environ.pop(k) for k in DISTRIBUTED_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def choose_device(accelerator: str) -> tuple[str, int | list[int]]:
    """One device per process: this process's GPU (by LOCAL_RANK) or the CPU."""
    import torch

    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        return "gpu", [int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())]
    return accelerator, 1


def torch_device(device: tuple[str, int | list[int]]) -> str:
    """The torch device string of `choose_device`'s answer."""
    accelerator, devices = device
    return "cpu" if accelerator == "cpu" else f"cuda:{devices[0]}"


def keep_metrics_local(module) -> None:
    """A member trains in one process: its torchmetrics must not all-gather over a process group a caller made."""
    import torch.distributed as dist
    from torchmetrics import Metric

    if dist.is_available() and dist.is_initialized():
        for m in module.modules():
            if isinstance(m, Metric):
                m.distributed_available_fn = _no_process_group


def _no_process_group() -> bool:
    return False


def wait_for_files(paths: Sequence[Path], timeout: float, what: str = "result") -> list[Path]:
    """Process 0: ``paths``, once the other processes have written them all (their launcher stops us if one of
    them fails; the timeout is for a process that hangs)."""
    started = time.monotonic()
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return list(paths)
        if time.monotonic() - started > timeout:
            raise LitAmdetError(f"waited {timeout:.0f} s for {len(missing)} {what}(s) of other processes "
                                f"(first: {missing[0]})")
        time.sleep(2.0)
