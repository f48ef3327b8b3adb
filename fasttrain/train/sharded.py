"""FSDP runs: the sharding (fully_shard per block, then the root) and their checkpoints, which are
torch.distributed.checkpoint (DCP) folders.

A checkpoint is RUN/checkpoints/step_N/ (never one holding a NaN or an inf): each rank's shards of the model and
optimizer (DCP's files, with the FQN keys of torch.distributed.checkpoint.state_dict, so it loads at any world size)
and trainer.pt (the rest of the run's state, from rank 0). It is written into a temporary folder and renamed once
every rank has written its part, so a job killed mid-save leaves the previous checkpoint and the pointers as they
were; `latest` and `best` name the folder as they name a one-file checkpoint. One process reads the whole model back
without a process group (`load_model`: eval, generate, export).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from fasttrain._files import atomic_write, atomic_write_text, fsync_dir
from fasttrain.train.checkpoint import CheckpointError, checkpoint_dir, first_non_finite, load_file, prunable
from fasttrain.train.files import sweep_temporaries

TRAINER_STATE = "trainer.pt"
"""The run's state beside the model and optimizer (Run.state_dict without them), saved by rank 0."""
_FOLDER = re.compile(r"^step_(\d{8})$")


def shard(model: torch.nn.Module, mesh, precision: str, reshard_after_forward: bool, compile_blocks: bool) -> None:
    """FSDP2 in place: each transformer block its own unit (all-gathered for its forward, resharded after), then the
    root (embeddings, final norm, head). bf16 and fp16 compute in their dtype with gradients reduced in fp32.
    compile_blocks: torch.compile each block before it is sharded, so the compiled code sees the unit's hooks
    from outside (as torchtitan does)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # A block returns views, which FSDP2 warns about (an in-place op on one would skip its pre-backward hook): the
    # next block and the final norm only read them (fasttrain.model.gpt.add_norm).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for block in model.blocks:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def is_sharded(path: Path) -> bool:
    """Whether path is a sharded checkpoint folder (else a one-file checkpoint, or nothing)."""
    return path.is_dir() and (path / ".metadata").is_file()


def latest(run_dir: Path, which: str = "latest") -> Path | None:
    """The sharded checkpoint folder the run's `which` pointer names, or None when it names none."""
    pointer = checkpoint_dir(run_dir) / which
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    return target if _FOLDER.match(target.name) else None


def save(run_dir: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int, is_best: bool, job) -> Path:
    """Every rank writes its shards of step `step`; rank 0 then renames the folder into place, moves the pointers
    and prunes as fasttrain.train.checkpoint.save does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = checkpoint_dir(run_dir)
    bad = _first_non_finite_shard(model, optimizer)
    if job.any(bad is not None):  # every rank refuses together: none of them writes its shards
        raise FloatingPointError(
            f"checkpoint of step {step} not written: {bad or 'a shard on another rank'} holds a NaN or inf; the "
            f"latest checkpoint is the one before"
        )
    final = folder / f"step_{step:08d}"
    tmp = folder / f".{final.name}.tmp-{job.main_pid}"  # one name on every rank: rank 0's pid, for the sweep
    if job.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(folder)
        shutil.rmtree(tmp, ignore_errors=True)
    job.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if job.is_main:
        atomic_write(tmp / TRAINER_STATE, lambda f: torch.save(trainer_state, f))
    job.barrier()  # every rank's shards are on disk
    if job.is_main:
        if final.exists():  # this step saved before (a resume that went back): the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
        atomic_write_text(folder / "latest", final.name)
        if is_best:
            atomic_write_text(folder / "best", final.name)
        _prune(folder, keep_last)
    return final


def _first_non_finite_shard(model: torch.nn.Module, optimizer) -> str | None:
    """The name of the first parameter or optimizer state whose local shard holds a NaN or inf, else None."""

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    names = {p: name for name, p in model.named_parameters()}
    state = {
        "model": {name: local(p) for name, p in model.named_parameters()},
        "optimizer": {names.get(p, "?"): {k: local(v) for k, v in s.items()} for p, s in optimizer.state.items()},
    }
    return first_non_finite(state)


def _prune(folder: Path, keep_last: int) -> None:
    for p in prunable(folder, _FOLDER, keep_last):
        shutil.rmtree(p)


def load_trainer_state(path: Path, require=()) -> dict:
    """trainer.pt of a sharded checkpoint folder (CheckpointError naming the folder when it is not one)."""
    if not is_sharded(path) or not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{str(path)!r} is not a whole sharded checkpoint (no .metadata or {TRAINER_STATE})")
    return load_file(path / TRAINER_STATE, require=require)


def load_sharded(path: Path, model, optimizer) -> None:
    """Every rank reads its shards of the model and optimizer, whatever the world size that wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    except Exception as e:  # DCP's errors carry every rank's traceback; the first line says what
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run: {first}") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def load_model(path: Path, model: torch.nn.Module) -> None:
    """The whole model from a sharded checkpoint into a plain one, in one process without a process group."""
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=path, no_dist=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the run's model: {first}") from None
    model.load_state_dict(state)


def full_model_state(model: torch.nn.Module, job) -> dict | None:
    """The whole model's state on rank 0's CPU, None elsewhere (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if job.is_main else None
