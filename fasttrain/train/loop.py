"""The training loop: `train(RunConfig) -> TrainResult`, a run's phases in order.

Set-up and resume (fasttrain.train.run.start_run), then per step: the step (fasttrain.train.step.TrainStep), the
losses logged (Progress, checked by step.check_losses), evaluation, the stop conditions, a checkpoint; then the end
(metrics, plots, a sample). Each phase reads and updates one `Run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fasttrain._files import atomic_write_text
from fasttrain.train import checkpoint, dist, sharded
from fasttrain.train.build import apply_finetune, build_model
from fasttrain.train.callbacks import StopRequest, evaluate
from fasttrain.train.config import RunConfig
from fasttrain.train.metrics import Metrics
from fasttrain.train.progress import Progress
from fasttrain.train.run import NothingToTrain, Run, start_run, val_batches, write_run_files
from fasttrain.train.sample import sample_text
from fasttrain.train.step import TrainStep, check_losses

COMPLETED, EARLY_STOPPING, INTERRUPTED = "completed", "early_stopping", "interrupted"


@dataclass
class TrainResult:
    run_dir: Path
    metrics: Metrics
    """The whole history, including steps taken before a resume."""
    stopped: str
    """'completed', 'early_stopping' or 'interrupted' (SIGINT/SIGTERM)."""
    best_val_loss: float | None
    sample: str | None
    """Text sampled from the trained model at the end (None when interrupted or sample_tokens is 0)."""


def train(cfg: RunConfig, *, resume: bool = False, callbacks: list[Callable[[int, Metrics], None]] = ()) -> TrainResult:
    """Train cfg.model on cfg.data as cfg.train and cfg.optim say; write the run directory train.out_dir.

    resume=True continues from the run directory's latest checkpoint (on CPU, the loss curve is exactly that of an
    uninterrupted run). Each callback is called as callback(step, metrics) after every step.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig, got {type(cfg).__name__}")
    job, device = dist.start(cfg.dist, cfg.train.device)
    if dist.restarted() and (checkpoint.checkpoint_dir(cfg.train.out_dir) / "latest").is_file():
        resume = True  # torchrun --max-restarts started this job again after a rank failed: go on from the latest
    try:
        return _train_job(cfg, resume, callbacks, job, device)
    except RuntimeError as e:
        if job.on and dist.lost_rank(e):
            raise dist.JobError(e, job) from None
        raise
    finally:
        job.close()


def _train_job(cfg: RunConfig, resume: bool, callbacks, job: dist.Dist, device) -> TrainResult:
    try:
        run = start_run(cfg, resume, job, device)
    except NothingToTrain as ended:  # said, and nothing in the run folder changes
        stopped = EARLY_STOPPING if ended.early.should_stop else COMPLETED
        print(f"{cfg.train.out_dir}: the run is at step {ended.step} ({stopped.replace('_', ' ')}); nothing to train")
        best = ended.early.best if math.isfinite(ended.early.best) else None
        return TrainResult(Path(cfg.train.out_dir), ended.metrics, stopped, best_val_loss=best, sample=None)
    try:
        return _train(run, callbacks)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(run: Run, callbacks) -> TrainResult:
    tc = run.cfg.train
    stopped, steps = COMPLETED, range(run.start, tc.steps)  # a resume has steps to take (start_run checked)
    if run.job.is_main:
        write_run_files(run)
    log = Progress(run)
    if run.job.on:
        log.write(_job_line(run))
    run.model.train()
    take_step = TrainStep(run)
    with StopRequest() as stop:
        for step in steps:
            done = step + 1
            lr, loss, bad = take_step(step)
            log.record(done, lr, run.train_batches.epoch, loss, bad)
            if done % tc.log_interval == 0:
                _log_losses(run, log)
            eval_now = run.evaluating and (done % tc.eval_interval == 0 or done == tc.steps)
            is_best = _evaluate(run, log, done) if eval_now else False
            for callback in callbacks:
                callback(done, run.metrics)
            stopped = _stop_reason(run, log, stop, done)
            if is_best or done % tc.checkpoint_interval == 0 or done == tc.steps or stopped != COMPLETED:
                _save_checkpoint(run, log, done, is_best)
            if stopped != COMPLETED:
                break
            if eval_now or done % tc.checkpoint_interval == 0:
                log.restart_clock()
    return _finish(run, log, stopped)


def _gathered_model(run: Run):
    """On rank 0, a plain copy of an FSDP run's model with every weight (None on the other ranks, which help
    gather it)."""
    state = sharded.full_model_state(run.model, run.job)
    if state is None:
        return None
    model = build_model(run.cfg.model)
    apply_finetune(model, run.cfg.finetune)
    model.load_state_dict(state)
    return model.to(run.device)


def _job_line(run: Run) -> str:
    tc, job = run.cfg.train, run.job
    batch = tc.batch_size * tc.grad_accum * job.world_size
    return (
        f"dist: {job.cfg.strategy} over {job.world_size} ranks; global batch {batch} sequences "
        f"(batch_size {tc.batch_size} x grad_accum {tc.grad_accum} x {job.world_size} ranks), "
        f"{batch * tc.seq_len:,} tokens per step"
    )


def _log_losses(run: Run, log: Progress) -> None:
    """Every step's loss reaches the metrics through here, and is checked on the way."""
    check_losses(run, log.flush(), log.write)


def _evaluate(run: Run, log: Progress, done: int) -> bool:
    """Evaluate on the same validation batches as every time; True if this is the best validation loss so far."""
    _log_losses(run, log)
    tc = run.cfg.train
    batches = val_batches(run.corpus, run.cfg)
    result = evaluate(run.model, batches, tc.eval_batches, run.device, run.autocast)
    run.metrics.record_val(done, run.train_batches.epoch, result)
    is_best = run.early.update(result["loss"])
    log.write(
        f"step {done}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
        f"accuracy {result['accuracy']:.3f}"
    )
    log.scalars(done, {f"val/{k}": v for k, v in result.items()})
    return is_best


def _stop_reason(run: Run, log: Progress, stop: StopRequest, done: int) -> str:
    """INTERRUPTED after SIGINT/SIGTERM, EARLY_STOPPING when patience ran out, else COMPLETED (go on)."""
    if run.job.any(stop.signal is not None):  # every rank stops at the same step, whichever got the signal
        log.write(
            f"step {done}: signal {stop.signal or 'to a rank'} received; writing a checkpoint and stopping "
            f"(send it again to stop at once)"
        )
        return INTERRUPTED
    if run.early.should_stop:
        log.write(
            f"step {done}: early stopping, no better validation loss in "
            f"{run.cfg.train.early_stopping_patience} evaluations"
        )
        return EARLY_STOPPING
    return COMPLETED


def _save_checkpoint(run: Run, log: Progress, done: int, is_best: bool) -> None:
    """The checkpoint after `done` steps, then the metrics it includes; none while the last step was skipped as
    non-finite, so latest and best stay on a checkpoint of a good step."""
    _log_losses(run, log)
    if run.bad_streak:
        log.write(f"step {done}: no checkpoint, the last {run.bad_streak} step(s) were not finite")
        return
    keep_last = run.cfg.train.keep_last
    if run.job.cfg.strategy == "fsdp":  # every rank writes its shards
        trainer_state = run.state_dict(done, weights=False)
        sharded.save(run.run_dir, done, run.model, run.optimizer, trainer_state, keep_last, is_best, run.job)
    elif run.job.is_main:  # the one-file format: every rank holds the same weights and optimizer state
        checkpoint.save(run.run_dir, done, run.state_dict(done), keep_last=keep_last, is_best=is_best)
    if run.job.is_main:
        run.metrics.write(run.run_dir)


def _finish(run: Run, log: Progress, stopped: str) -> TrainResult:
    """The metrics and plots, and (unless interrupted) the sample; the result."""
    log.close()
    tc, text = run.cfg.train, None
    sampling = stopped != INTERRUPTED and tc.sample_tokens > 0
    model = run.model
    if sampling and run.job.cfg.strategy == "fsdp":  # rank 0 samples from the whole model, gathered
        model = _gathered_model(run)
    if run.job.is_main:
        run.metrics.write(run.run_dir)
        run.metrics.plot(run.run_dir)
        if sampling:
            text = sample_text(model, run.tokenizer, tc.sample_prompt, tc.sample_tokens, tc.seed, run.autocast)
            atomic_write_text(run.run_dir / "sample.txt", text)
    run.job.barrier()  # the job ends when rank 0 has written its files
    best = run.early.best if math.isfinite(run.early.best) else None
    return TrainResult(run_dir=run.run_dir, metrics=run.metrics, stopped=stopped, best_val_loss=best, sample=text)
