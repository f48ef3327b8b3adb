"""Set-up and resume: the checks a run's config and folder must pass, then the run's live state (`Run`), fresh or
restored from the run directory's latest checkpoint."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fasttrain._files import atomic_write_text
from fasttrain.config import to_dict
from fasttrain.data import Batches, Corpus, prepare
from fasttrain.data.examples import ExampleBatches, ExampleSet, prepare_examples
from fasttrain.data.summary import as_json
from fasttrain.finetune import memory
from fasttrain.integrations.hf_checkpoint import HF_CONFIG, load_weights, read_config
from fasttrain.model import GPT
from fasttrain.optim import AdamW
from fasttrain.optim.schedules import LRSchedule
from fasttrain.train import checkpoint, sharded
from fasttrain.train.build import apply_finetune, build_model, build_optimizer
from fasttrain.train.callbacks import EarlyStopping
from fasttrain.train.config import DistConfig, RunConfig
from fasttrain.train.device import autocast_for, resolve_precision
from fasttrain.train.dist import Dist
from fasttrain.train.files import RunLock, sweep_temporaries
from fasttrain.train.metrics import Metrics, TensorBoard
from fasttrain.train.sample import sample_prompt_ids


@dataclass
class Run:
    """What a run holds from set-up to its end; each phase of the loop (fasttrain.train.loop) reads and updates it."""

    cfg: RunConfig
    """The config as run: model.vocab_size filled in from the tokenizer."""
    run_dir: Path
    device: torch.device
    precision: str
    """train.precision resolved: 'fp32', 'bf16' or 'fp16'."""
    autocast: Callable[[], AbstractContextManager]
    """A fresh autocast context for the precision (nothing in fp32)."""
    corpus: Corpus | ExampleSet
    """The data: a Corpus of token shards (data.format 'text') or an ExampleSet (data.format 'prompt_completion')."""
    model: GPT
    step_model: torch.nn.Module
    """What the training step calls: the model, or its DDP wrapper, or the torch.compile wrapper of either."""
    optimizer: AdamW
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    """fp16's loss scaler; disabled (a pass-through) in the other precisions."""
    train_batches: Batches | ExampleBatches
    metrics: Metrics
    early: EarlyStopping
    board: TensorBoard | None = None
    """TensorBoard's writer when train.tensorboard is on."""
    lock: RunLock | None = None
    """The run folder's lock, held from set-up to the end of train() (by rank 0 alone in a job of several)."""
    job: Dist = dataclasses.field(default_factory=lambda: Dist(DistConfig()))
    """This process's place in a torchrun job (a job of one without dist.strategy)."""
    start: int = 0
    """Steps taken before this process started: the checkpoint's step on a resume, else 0."""
    bad_streak: int = 0
    """Non-finite (skipped) steps in a row up to the last one checked (fasttrain.train.step.check_losses)."""

    @property
    def tokenizer(self):
        return self.corpus.tokenizer

    @property
    def evaluating(self) -> bool:
        """False when data.val_fraction is 0: the user asked for no validation split."""
        return self.cfg.data.val_fraction > 0

    def state_dict(self, step: int, weights: bool = True) -> dict:
        """The checkpoint after `step` steps: all a resume needs to continue as if never stopped. weights=False
        leaves out the model and optimizer (a sharded checkpoint holds them: fasttrain.train.sharded)."""
        weights = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()} if weights else {}
        return {
            "step": step,
            **weights,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "batches": self.train_batches.state_dict(),
            "rng": checkpoint.rng_state(),
            "metrics": self.metrics.state_dict(),
            "early_stopping": self.early.state_dict(),
            "config": to_dict(self.cfg),
            "tokenizer": self.tokenizer.to_config(),
        }

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's state; its model and optimizer when it holds them (a one-file checkpoint)."""
        if "model" in state:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        # The scaler's state is empty when a non-fp16 run saved it: an fp16 resume starts a fresh scale.
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.train_batches.load_state_dict(state["batches"])
        self.metrics = Metrics.from_state_dict(state["metrics"])
        self.early.load_state_dict(state["early_stopping"])
        checkpoint.set_rng_state(state["rng"])
        self.start = state["step"]


class NothingToTrain(Exception):
    """A resume of a run that has ended (completed, or early stopping ended it): the loop says so and changes
    nothing."""

    def __init__(self, state: dict, early: EarlyStopping):
        super().__init__(state["step"])
        self.step, self.early = state["step"], early
        self.metrics = Metrics.from_state_dict(state["metrics"])


def start_run(cfg: RunConfig, resume: bool, job: Dist, device: torch.device) -> Run:
    """Check what can be checked before the data (the device, the run folder), lock the run folder, prepare the data
    and check it, build the model and optimizer, restore the latest good checkpoint when resuming. Writes nothing
    but the lock and the data summary: `write_run_files` writes config.json once the loop has steps to take.
    job and device: from fasttrain.train.dist.start; every rank checks and reads, rank 0 alone locks and writes."""
    tc = cfg.train
    precision = resolve_precision(tc.precision, device)
    _check_device(cfg, device, precision)
    run_dir = Path(tc.out_dir)
    _check_out_dir(run_dir, resume)
    if resume and not (checkpoint.checkpoint_dir(run_dir) / "latest").is_file():
        checkpoint.resolve(run_dir, "latest")  # a run folder with nothing to resume is named before it is locked
    lock = None
    if job.is_main:
        try:  # before the data preparation, which can take minutes
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"train.out_dir {str(run_dir)!r} cannot be made: {e.strerror or e}") from None
        lock = RunLock(run_dir)
    try:
        return _start_locked(cfg, resume, run_dir, device, precision, lock, job)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _start_locked(
    cfg: RunConfig, resume: bool, run_dir: Path, device, precision: str, lock: RunLock | None, job: Dist
) -> Run:
    tc = cfg.train
    _check_out_dir(run_dir, resume)  # again, now that no other trainer can be writing it
    if job.is_main:
        for folder in (run_dir, checkpoint.checkpoint_dir(run_dir)):
            if folder.is_dir():
                sweep_temporaries(folder)
    state = file = None
    if resume:
        file = sharded.latest(run_dir)
        if file is not None:
            state = sharded.load_trainer_state(file, require=SHARDED_STATE_KEYS)
        else:
            file, state = checkpoint.load_latest_good(run_dir, _warn, require=STATE_KEYS)
        _check_strategy(file, cfg)
        if tc.steps < state["step"]:
            raise ValueError(
                f"cannot resume {run_dir} with train.steps {tc.steps}: the run is at step {state['step']}, and a "
                f"resume only goes forward (give train.steps above {state['step']}); nothing was changed"
            )
        early = EarlyStopping(tc.early_stopping_patience)  # the current patience: raising it lets the run go on
        try:
            early.load_state_dict(state["early_stopping"])
        except (KeyError, TypeError) as e:
            raise _does_not_fit(file, e) from None
        if tc.steps == state["step"] or early.should_stop:
            raise NothingToTrain(state, early)

    if not job.is_main:  # rank 0 prepares the shards; the others then find them in the cache
        job.barrier()
    corpus = prepare(cfg.data) if cfg.data.format == "text" else prepare_examples(cfg.data)
    if job.is_main:
        job.barrier()
    if isinstance(corpus, ExampleSet):
        corpus.fit(tc.seq_len)
    # The data summary, on screen and, for a fresh run, as run_dir/data_summary.{txt,json} (which say why a corpus
    # too small is refused); a resume's is written by write_run_files, once nothing can refuse it.
    corpus.report(None if resume or not job.is_main else run_dir)
    _check_splits(corpus, cfg)
    if tc.sample_tokens > 0:
        sample_prompt_ids(corpus.tokenizer, tc.sample_prompt, cfg.model.max_seq_len)  # fail now, not after the run
    cfg = _with_vocab_size(cfg, corpus.tokenizer)
    if state is not None and state["config"]["model"] != to_dict(cfg.model):
        diff = [k for k, v in to_dict(cfg.model).items() if state["config"]["model"].get(k) != v]
        raise ValueError(f"cannot resume {run_dir}: model.{', model.'.join(diff)} differ from its checkpoint")

    _seed_everything(tc.seed)
    model = build_model(cfg.model).to(device)
    if state is None and cfg.init.from_ is not None:
        load_weights(model, cfg.init.from_)
    if apply_finetune(model, cfg.finetune) is not None or cfg.finetune.freeze:
        _report_finetune(model)
    if state is not None and "model" in state:  # before FSDP shards the model
        checkpoint.check_model_state(model, state["model"], file)
    step_model = job.wrap(model, device, precision, tc.compile)
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        precision=precision,
        autocast=autocast_for(precision, device),
        corpus=corpus,
        model=model,
        step_model=step_model,
        optimizer=build_optimizer(model, cfg.optim),
        schedule=cfg.schedule(),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        train_batches=train_batches(corpus, cfg, job.rank, job.world_size),
        metrics=Metrics(),
        early=EarlyStopping(tc.early_stopping_patience),
        lock=lock,
        job=job,
    )
    if state is not None:
        if "model" not in state:
            sharded.load_sharded(file, model, run.optimizer)
        try:
            run.load_state_dict(state)
        except (KeyError, IndexError, TypeError, RuntimeError) as e:  # an entry of the wrong shape or contents
            raise _does_not_fit(file, e) from None
    if tc.tensorboard and job.is_main:
        run.board = TensorBoard(run_dir)
    return run


STATE_KEYS = (
    "step",
    "model",
    "optimizer",
    "schedule",
    "scaler",
    "batches",
    "rng",
    "metrics",
    "early_stopping",
    "config",
    "tokenizer",
)
"""What a resume reads of a checkpoint (Run.state_dict writes them all)."""
SHARDED_STATE_KEYS = tuple(k for k in STATE_KEYS if k not in ("model", "optimizer"))
"""What a resume reads of a sharded checkpoint's trainer.pt."""


def _check_strategy(file: Path, cfg: RunConfig) -> None:
    """A resume reads a checkpoint of its own format: one file (no strategy, ddp) or a sharded folder (fsdp)."""
    fsdp = cfg.dist.strategy == "fsdp"
    if file.is_dir() != fsdp:
        kind, takes = ("a sharded (fsdp)", "fsdp") if file.is_dir() else ("a one-file", "'none' or 'ddp'")
        raise ValueError(
            f"cannot resume {str(file)!r} with dist.strategy {cfg.dist.strategy!r}: it is {kind} checkpoint, "
            f"which dist.strategy {takes} resumes (fsdp on one process: torchrun --nproc_per_node 1)"
        )


def _does_not_fit(file: Path, e: Exception) -> checkpoint.CheckpointError:
    what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else str(e).splitlines()[0]
    return checkpoint.CheckpointError(f"checkpoint {str(file)!r} does not fit this run: {what}")


def write_run_files(run: Run) -> None:
    """The data summary, config.json and the tokenizer: written only once every check has passed and there are steps
    to take, so a refused or empty --resume changes nothing in the run folder."""
    c = run.corpus
    if run.start:  # a resume: its summary is written only now
        atomic_write_text(run.run_dir / "data_summary.txt", c.summary() + "\n")
        summary = c.summary_json() if isinstance(c, ExampleSet) else as_json(c.manifest, c.folder, c.reused)
        data = json.dumps(summary, indent=1)
        atomic_write_text(run.run_dir / "data_summary.json", data)
    atomic_write_text(run.run_dir / "config.json", json.dumps(to_dict(run.cfg), indent=1))
    if not run.start and run.cfg.init.from_ is not None:
        # The checkpoint's own config (token ids, its other keys), which `fasttrain export` writes back.
        atomic_write_text(run.run_dir / HF_CONFIG, json.dumps(read_config(run.cfg.init.from_), indent=1))
    if hasattr(run.tokenizer, "save"):
        run.tokenizer.save(run.run_dir / "tokenizer.json")


def _warn(line: str) -> None:
    print(f"fasttrain: warning: {line}", file=sys.stderr, flush=True)


def _report_finetune(model: GPT) -> None:
    m = memory(model)
    mb = {k: m[k] / 2**20 for k in ("parameters", "gradients", "optimizer_state")}
    print(
        f"finetune: {m['trainable_parameters']:,} of {m['all_parameters']:,} parameters train; parameters "
        f"{mb['parameters']:.1f} MB, gradients {mb['gradients']:.1f} MB, optimizer state {mb['optimizer_state']:.1f} MB"
    )


def _check_device(cfg: RunConfig, device: torch.device, precision: str) -> None:
    """What train.cuda_graph and dist.strategy fsdp need of the device and precision that 'auto' resolved to."""
    tc = cfg.train
    if cfg.dist.strategy == "fsdp" and precision == "fp16":
        raise ValueError(
            "dist.strategy 'fsdp' does not take precision 'fp16' (train.precision "
            f"{tc.precision!r}): each rank's GradScaler would see only its shards; use 'bf16' or 'fp32'"
        )
    if tc.cuda_graph and device.type != "cuda":
        raise ValueError(
            f"train.cuda_graph needs a CUDA device, but train.device {tc.device!r} resolved to {device.type}"
        )
    if tc.cuda_graph and precision == "fp16":
        raise ValueError(
            "train.cuda_graph does not take fp16 (train.precision 'auto' chose it: this GPU lacks bf16); "
            "set train.precision to 'fp32'"
        )


def _check_out_dir(run_dir: Path, resume: bool) -> None:
    """A fresh run never trains over a run the user has, nor into a folder whose config.json is not a run's."""
    if resume:
        return
    # A run is a checkpoint, not a config.json: a run that died before its first checkpoint left nothing --resume
    # could continue, so refusing it would leave the folder usable by neither command.
    if (checkpoint.checkpoint_dir(run_dir) / "latest").is_file():
        raise ValueError(
            f"train.out_dir {str(run_dir)!r} already holds a run: continue it with --resume, or pick "
            f"a new --train.out_dir"
        )
    if (run_dir / "config.json").is_file() and not _is_run_config(run_dir / "config.json"):
        raise ValueError(
            f"train.out_dir {str(run_dir)!r} holds a config.json that is not a fasttrain run's; pick "
            f"a new --train.out_dir"
        )


def _is_run_config(path: Path) -> bool:
    """Whether path is a config.json that a fasttrain run wrote (a JSON object with the four section tables)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("model", "optim", "train", "data"))


def train_batches(
    corpus: Corpus | ExampleSet, cfg: RunConfig, rank: int = 0, world_size: int = 1
) -> Batches | ExampleBatches:
    """The training batches of one rank: random windows of a corpus, or the examples packed or padded, shuffled per
    epoch."""
    tc = cfg.train
    if isinstance(corpus, Corpus):
        return Batches(corpus.train, tc.batch_size, tc.seq_len, seed=tc.seed, rank=rank, world_size=world_size)
    return _example_batches(corpus.train, corpus, cfg, shuffle=True, rank=rank, world_size=world_size)


def val_batches(corpus: Corpus | ExampleSet, cfg: RunConfig) -> Batches | ExampleBatches:
    """The validation batches, the same ones at every evaluation: windows (or rows of examples) in order."""
    tc = cfg.train
    if isinstance(corpus, Corpus):
        return Batches(corpus.val, tc.batch_size, tc.seq_len, mode="sequential")
    return _example_batches(corpus.val, corpus, cfg, shuffle=False)


def _example_batches(
    examples, corpus: ExampleSet, cfg: RunConfig, shuffle: bool, rank: int = 0, world_size: int = 1
) -> ExampleBatches:
    tc, mode = cfg.train, "pack" if cfg.data.packing else "pad"
    pad_id = corpus.tokenizer.eot_id  # any id: padding's targets are IGNORE and no example attends to it
    return ExampleBatches(
        examples,
        tc.batch_size,
        tc.seq_len,
        mode,
        pad_id=pad_id,
        seed=tc.seed,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
    )


def _check_splits(corpus: Corpus | ExampleSet, cfg: RunConfig) -> None:
    """Each split the run cuts into windows holds at least one window (train.seq_len + 1 tokens); of examples, at
    least one example."""
    need, d = cfg.train.seq_len + 1, cfg.data
    if isinstance(corpus, ExampleSet):
        if not corpus.train:
            raise ValueError(
                f"the training split has no example with a completion token within train.seq_len "
                f"{cfg.train.seq_len}: add examples or raise train.seq_len"
            )
        if d.val_fraction > 0 and not corpus.val:
            raise ValueError(
                f"the validation split has no example (data.val_fraction {d.val_fraction} of "
                f"{len(corpus.train)} examples): add examples, or set data.val_fraction 0 to train without evaluation"
            )
        return
    if len(corpus.train) < need:
        raise ValueError(
            f"the training split has {len(corpus.train):,} tokens; train.seq_len {cfg.train.seq_len} "
            f"needs at least {need}: add data (data.paths) or raise data.max_bytes (now {d.max_bytes}), "
            f"or lower train.seq_len"
        )
    if d.val_fraction > 0 and len(corpus.val) < need:
        raise ValueError(
            f"the validation split has {len(corpus.val):,} tokens; train.seq_len {cfg.train.seq_len} "
            f"needs at least {need}: raise data.val_fraction (now {d.val_fraction}), lower "
            f"train.seq_len, or set data.val_fraction 0 to train without evaluation"
        )


def _with_vocab_size(cfg: RunConfig, tokenizer) -> RunConfig:
    """cfg with model.vocab_size set from the tokenizer when not given, checked against it when given."""
    if cfg.model.vocab_size is None:  # pad to a multiple of 64: tensor-core-friendly matmul shapes for the head
        padded = -(-tokenizer.vocab_size // 64) * 64
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
        )
    return cfg


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
