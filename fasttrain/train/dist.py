"""A run on several processes under torchrun: the process group, the model's wrapping (DDP here, FSDP2 in
fasttrain.train.sharded), gradient sync on the last micro-batch only, and what the ranks must agree on (the logged
loss, whether to stop).

Every rank runs the same loop on its own stream of batches (fasttrain.data: batch i of rank r is the job's batch
i * world_size + r, so a 2-rank run takes the batches a 1-rank run with twice the grad_accum takes); rank 0 alone
writes the run folder and speaks. docs/distributed.md says how to launch and which strategy to pick.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from fasttrain.train.config import DistConfig

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun (torch.distributed.run) sets for every process it starts."""
LAUNCH = "launch it as `torchrun --nproc_per_node N -m fasttrain train ...`"


class Dist:
    """This process's place in the job: rank, world size, and the collectives the trainer needs. A run without
    dist.strategy is a job of one (every method is then a no-op)."""

    def __init__(self, cfg: DistConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.cfg, self.rank, self.world_size, self.local_rank = cfg, rank, world_size, local_rank
        self.control = None
        """The process group the host-side agreements (stop, barrier) go over: gloo, whatever the device."""
        self.main_pid = os.getpid()
        """Rank 0's process id (what names the temporaries of a save every rank writes into)."""

    @property
    def on(self) -> bool:
        return self.cfg.strategy != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.on:
            dist.barrier(group=self.control)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """t averaged over the ranks (a new tensor, on t's device, no host sync)."""
        if not self.on:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether any rank says flag (a host value: one small gloo all-reduce, no device sync)."""
        if not self.on:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str, compile: bool) -> torch.nn.Module:
        """The module the training step calls: the model (compiled when compile), DDP around it (its weights
        broadcast from rank 0), or the model sharded in place by FSDP2 (fasttrain.train.sharded.shard)."""
        if self.cfg.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            from fasttrain.train import sharded

            mesh = init_device_mesh(device.type, (self.world_size,))
            sharded.shard(model, mesh, precision, self.cfg.reshard_after_forward, compile_blocks=compile)
            return model
        if self.cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return torch.compile(model) if compile else model

    def sync_grads(self, model: torch.nn.Module, sync: bool):
        """A context for one micro-batch's backward: gradients are reduced over the ranks only when sync (the last
        micro-batch of a step)."""
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        model = getattr(model, "_orig_mod", model)  # under torch.compile
        if sync or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    def close(self) -> None:
        if self.on and dist.is_initialized():
            dist.destroy_process_group()


class JobError(ConnectionError):
    """A collective failed: another rank died or stopped answering within dist.timeout_s. One line, saying what to
    do (the CLI prints it as it prints an OSError); the run folder holds the latest checkpoint, as after any stop."""

    def __init__(self, error: Exception, job: Dist):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        super().__init__(
            f"rank {job.rank} of {job.world_size}: the job lost a rank ({first[:200]}); resume it with --resume "
            "(torchrun --max-restarts N does so by itself)"
        )


def lost_rank(error: RuntimeError) -> bool:
    """Whether error is a collective's failure (gloo raises plain RuntimeErrors, NCCL and the store DistErrors)."""
    text = str(error)
    return isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text or "Connection reset" in text


def restarted() -> bool:
    """Whether torchrun started this process again after a failure of the job (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def check_launch(cfg: DistConfig) -> None:
    """ValueError when dist.strategy and the launch disagree: a strategy without torchrun's environment, or a
    torchrun job of several processes without a strategy (each would train alone over the same run folder)."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if cfg.strategy != "none" and missing:
        raise ValueError(f"dist.strategy {cfg.strategy!r} needs torchrun's environment (no {missing[0]}): {LAUNCH}")
    if cfg.strategy == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"this process is one of {os.environ['WORLD_SIZE']} started by torchrun, but dist.strategy is 'none': "
            "set --dist.strategy ddp or fsdp"
        )


def start(cfg: DistConfig, device_name: str) -> tuple[Dist, torch.device]:
    """Join the job (init_process_group) when dist.strategy is set -> (Dist, this rank's device). The device is
    train.device resolved, cuda:LOCAL_RANK on a GPU machine."""
    from fasttrain.train.device import resolve_device

    check_launch(cfg)
    device = resolve_device(device_name)
    if cfg.strategy == "none":
        return Dist(cfg), device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} has no GPU (this machine has {torch.cuda.device_count()}): start at most that "
                "many processes per machine (--nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"dist.backend 'nccl' needs CUDA devices, but train.device resolved to {device.type}")
    if backend == "gloo" and device.type == "cuda" and cfg.strategy == "fsdp":
        raise ValueError("dist.strategy 'fsdp' on CUDA needs dist.backend 'nccl' (gloo has no reduce-scatter)")
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    d = Dist(cfg, rank, world, local)
    d.control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    pid = [os.getpid()]
    dist.broadcast_object_list(pid, src=0, group=d.control)
    d.main_pid = pid[0]
    if not d.is_main:  # one voice: the other ranks' stdout goes nowhere (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    return d, device
