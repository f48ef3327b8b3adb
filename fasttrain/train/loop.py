"""The training loop: `train(RunConfig) -> TrainResult`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fasttrain.config import to_dict
from fasttrain.data import Batches, prepare
from fasttrain.generate import generate
from fasttrain.model import GPT, flops_per_token
from fasttrain.optim import AdamW
from fasttrain.train import checkpoint
from fasttrain.train.callbacks import EarlyStopping, StopRequest, evaluate
from fasttrain.train.config import RunConfig
from fasttrain.train.graphed import GraphedStep
from fasttrain.train.metrics import Metrics, TensorBoard

# Dense bf16 tensor-core peaks from the vendors' datasheets, for MFU; other devices report none. Matched by substring
# in order, so the most specific name comes first.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "A10": 125e12,
}


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(precision: str, device: torch.device, cache_enabled: bool = True):
    """A zero-argument context-manager factory: autocast in bf16/fp16, nothing in fp32. cache_enabled=False for a
    CUDA graph's capture, whose cached weight casts would not outlive it."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; leave norm weights and biases alone (they set scales, not features)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def forward_backward(model, micro_batches, device: torch.device, autocast, scaler) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over equal-sized micro-batches; return that mean loss (detached)."""
    total = torch.zeros((), device=device)
    for x, y in micro_batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            _, loss = model(x, y)
        scaler.scale(loss / len(micro_batches)).backward()
        total += loss.detach()
    return total / len(micro_batches)


def _sample_prompt_ids(tokenizer, prompt: str, max_seq_len: int) -> list[int]:
    """The ids of train.sample_prompt; raises when they leave no room for one sampled token within max_seq_len."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    if len(ids) > max_seq_len:
        raise ValueError(f"train.sample_prompt is {len(ids)} tokens, more than model.max_seq_len ({max_seq_len})")
    return ids


def sample_text(model: GPT, tokenizer, prompt: str, n_tokens: int, seed: int, autocast) -> str:
    """prompt + up to n_tokens sampled at temperature 0.8 from the 40 likeliest, within max_seq_len."""
    ids = _sample_prompt_ids(tokenizer, prompt, model.config.max_seq_len)
    n_tokens = min(n_tokens, model.config.max_seq_len + 1 - len(ids))
    with autocast():
        result = generate(
            model,
            [ids],
            n_tokens,
            temperature=0.8,
            top_k=40,
            stop_tokens=[tokenizer.eot_id],
            seed=seed,
            vocab_size=tokenizer.vocab_size,
        )
    return tokenizer.decode(ids + result.tokens[0])


def _is_run_config(path: Path) -> bool:
    """Whether path is a config.json that a fasttrain run wrote (a JSON object with the four section tables)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("model", "optim", "train", "data"))


def _check_splits(corpus, cfg: RunConfig) -> None:
    """Each split the run cuts into windows holds at least one window (train.seq_len + 1 tokens)."""
    need, d = cfg.train.seq_len + 1, cfg.data
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, *, resume: bool = False, callbacks: list[Callable[[int, Metrics], None]] = ()) -> TrainResult:
    """Train cfg.model on cfg.data as cfg.train and cfg.optim say; write the run directory train.out_dir.

    resume=True continues from the run directory's latest checkpoint (on CPU, the loss curve is exactly that of an
    uninterrupted run). Each callback is called as callback(step, metrics) after every step.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig, got {type(cfg).__name__}")
    tc, oc = cfg.train, cfg.optim
    device = resolve_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    if tc.cuda_graph and device.type != "cuda":
        raise ValueError(
            f"train.cuda_graph needs a CUDA device, but train.device {tc.device!r} resolved to {device.type}"
        )
    if tc.cuda_graph and precision == "fp16":
        raise ValueError(
            "train.cuda_graph does not take fp16 (train.precision 'auto' chose it: this GPU lacks bf16); "
            "set train.precision to 'fp32'"
        )
    run_dir = Path(tc.out_dir)
    # A run is a checkpoint, not a config.json: a run that died before its first checkpoint left nothing --resume
    # could continue, so refusing it would leave the folder usable by neither command.
    if not resume and (checkpoint.checkpoint_dir(run_dir) / "latest").is_file():  # never train over a run the user has
        raise ValueError(
            f"train.out_dir {str(run_dir)!r} already holds a run: continue it with --resume, or pick "
            f"a new --train.out_dir"
        )
    if not resume and (run_dir / "config.json").is_file() and not _is_run_config(run_dir / "config.json"):
        raise ValueError(
            f"train.out_dir {str(run_dir)!r} holds a config.json that is not a fasttrain run's; pick "
            f"a new --train.out_dir"
        )
    state = checkpoint.load(run_dir, "latest") if resume else None
    try:  # before the data preparation, which can take minutes
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"train.out_dir {str(run_dir)!r} cannot be made: {e.strerror or e}") from None

    corpus = prepare(cfg.data)
    corpus.report(run_dir)  # the data summary, on screen and as run_dir/data_summary.{txt,json}
    _check_splits(corpus, cfg)
    evaluating = cfg.data.val_fraction > 0  # 0: the user asked for no validation split
    tokenizer = corpus.tokenizer
    if tc.sample_tokens > 0:
        _sample_prompt_ids(tokenizer, tc.sample_prompt, cfg.model.max_seq_len)  # fail now, not after the whole run
    if cfg.model.vocab_size is None:  # pad to a multiple of 64: tensor-core-friendly matmul shapes for the head
        padded = -(-tokenizer.vocab_size // 64) * 64
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
        )
    if state is not None and state["config"]["model"] != to_dict(cfg.model):
        diff = [k for k, v in to_dict(cfg.model).items() if state["config"]["model"].get(k) != v]
        raise ValueError(f"cannot resume {run_dir}: model.{', model.'.join(diff)} differ from its checkpoint")

    _seed_everything(tc.seed)
    model = GPT(cfg.model).to(device)
    optimizer = AdamW(
        param_groups(model, oc.weight_decay),
        lr=oc.lr,
        betas=(oc.beta1, oc.beta2),
        eps=oc.eps,
        weight_decay=oc.weight_decay,
        max_grad_norm=oc.max_grad_norm,
        backend=oc.backend,
    )
    schedule = cfg.schedule()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    train_batches = Batches(corpus.train, tc.batch_size, tc.seq_len, seed=tc.seed, mode="random")
    metrics, early = Metrics(), EarlyStopping(tc.early_stopping_patience)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state["scaler"]:  # empty when a non-fp16 run saved it: fp16 starts a fresh scale
            scaler.load_state_dict(state["scaler"])
        train_batches.load_state_dict(state["batches"])
        metrics = Metrics.from_state_dict(state["metrics"])
        early.load_state_dict(state["early_stopping"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
    step_model = torch.compile(model) if tc.compile else model
    autocast = autocast_for(precision, device)
    tokens_per_step = tc.batch_size * tc.grad_accum * tc.seq_len
    flops, peak = flops_per_token(cfg.model, tc.seq_len), peak_flops(device, precision)
    board = TensorBoard(run_dir) if tc.tensorboard else None
    # Only now, with every check passed: a refused --resume must leave the config a plain --resume continues from.
    checkpoint.atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=1))
    if hasattr(tokenizer, "save"):
        tokenizer.save(run_dir / "tokenizer.json")

    def save(step: int, is_best: bool) -> None:
        checkpoint.save(
            run_dir,
            step,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "batches": train_batches.state_dict(),
                "rng": checkpoint.rng_state(),
                "metrics": metrics.state_dict(),
                "early_stopping": early.state_dict(),
                "config": to_dict(cfg),
                "tokenizer": tokenizer.to_config(),
            },
            keep_last=tc.keep_last,
            is_best=is_best,
        )

    bar = tqdm(total=tc.steps, initial=start, disable=not tc.progress_bar, dynamic_ncols=True, unit="step")
    pending: list[tuple[int, float, float, torch.Tensor]] = []  # (step, lr, epoch, loss on device) since last log
    t_log = time.perf_counter()

    def flush() -> None:
        """Move the pending losses into metrics: one device sync per log interval, not one per step."""
        nonlocal t_log
        losses = torch.stack([p[3] for p in pending]).tolist()
        elapsed, t_log = time.perf_counter() - t_log, time.perf_counter()
        tok_s = len(pending) * tokens_per_step / elapsed
        for (s, lr, epoch, _), value in zip(pending, losses):
            metrics.steps.append(s)
            metrics.train_loss.append(value)
            metrics.learning_rate.append(lr)
            metrics.epochs.append(epoch)
        metrics.log_steps.append(pending[-1][0])
        metrics.tokens_per_s.append(tok_s)
        if peak is not None:
            metrics.mfu.append(flops * tok_s / peak)
        bar.update(len(pending))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][1]:.2e}", tok_s=f"{tok_s:,.0f}")
        if board is not None:
            board.scalars(
                pending[-1][0], {"train/loss": losses[-1], "train/lr": pending[-1][1], "train/tokens_per_s": tok_s}
            )
        pending.clear()
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None and precision != "fp16":  # fp16 skips such steps through the GradScaler
            raise FloatingPointError(
                f"training loss became {losses[bad]} at step {metrics.steps[bad - len(losses)]}; "
                f"lower optim.lr (now {oc.lr}) or set optim.max_grad_norm"
            )

    # A resumed run that early stopping ended has nothing left to do, like a completed one (should_stop reads the
    # current patience, so raising it lets the run go on).
    stopped = "early_stopping" if early.should_stop else "completed"
    end = start if early.should_stop else tc.steps
    model.train()
    graphed = None
    if tc.cuda_graph and start < end:
        graphed = GraphedStep(
            model,
            optimizer,
            tc.grad_accum,
            tc.batch_size,
            tc.seq_len,
            device,
            autocast_for(precision, device, cache_enabled=False),
        )
    with StopRequest() as stop:
        for step in range(start, end):
            done = step + 1
            micro = [train_batches.next() for _ in range(tc.grad_accum)]
            if graphed is not None:  # the grads live in the graph's pool: never set to None here
                lr = schedule(step)
                loss = graphed.step(micro, lr)
            else:
                lr = schedule.apply(optimizer, step)
                loss = forward_backward(step_model, micro, device, autocast, scaler)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            pending.append((done, lr, train_batches.epoch, loss))
            if done % tc.log_interval == 0:
                flush()

            is_best = False
            eval_now = evaluating and (done % tc.eval_interval == 0 or done == tc.steps)
            if eval_now:
                if pending:
                    flush()
                val_batches = Batches(corpus.val, tc.batch_size, tc.seq_len, mode="sequential")
                result = evaluate(model, val_batches, tc.eval_batches, device, autocast)
                metrics.record_val(done, train_batches.epoch, result)
                is_best = early.update(result["loss"])
                bar.write(
                    f"step {done}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
                    f"accuracy {result['accuracy']:.3f}"
                )
                if board is not None:
                    board.scalars(done, {f"val/{k}": v for k, v in result.items()})
            for callback in callbacks:
                callback(done, metrics)
            if stop.signal is not None:
                stopped = "interrupted"
                bar.write(
                    f"step {done}: signal {stop.signal} received; writing a checkpoint and stopping "
                    f"(send it again to stop at once)"
                )
            elif early.should_stop:
                stopped = "early_stopping"
                bar.write(
                    f"step {done}: early stopping, no better validation loss in "
                    f"{tc.early_stopping_patience} evaluations"
                )
            if is_best or done % tc.checkpoint_interval == 0 or done == tc.steps or stopped != "completed":
                if pending:
                    flush()
                save(done, is_best)
                metrics.write(run_dir)
            if stopped != "completed":
                break
            if eval_now or done % tc.checkpoint_interval == 0:
                t_log = time.perf_counter()  # tokens/s counts training steps only, not evaluation or saving
    bar.close()
    if board is not None:
        board.close()
    metrics.write(run_dir)
    metrics.plot(run_dir)
    text = None
    if stopped != "interrupted" and tc.sample_tokens > 0:
        text = sample_text(model, tokenizer, tc.sample_prompt, tc.sample_tokens, tc.seed, autocast)
        checkpoint.atomic_write_text(run_dir / "sample.txt", text)
    best = early.best if math.isfinite(early.best) else None
    return TrainResult(run_dir=run_dir, metrics=metrics, stopped=stopped, best_val_loss=best, sample=text)
