"""The training loop on tiny models: learning, accumulation, exact resume, kill-safe checkpoints, the run directory."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from fasttrain.config import parse_overrides
from fasttrain.data import DataConfig
from fasttrain.model import GPT, GPTConfig
from fasttrain.optim import AdamW
from fasttrain.train import OptimConfig, RunConfig, TrainConfig, checkpoint, train
from fasttrain.train.build import load_for_inference
from fasttrain.train.callbacks import EarlyStopping, StopRequest
from fasttrain.train.graphed import WARMUP_STEPS, GraphedStep, warm_up
from fasttrain.train.step import forward_backward

# The trainer as a CPU user runs it (conftest.cpu_user): C++ kernels and references, not the Triton interpreter.
pytestmark = pytest.mark.usefixtures("cpu_user")

TINY_MODEL = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=32)


def write_corpus(folder, n_files=8):
    """Code-like text with regular structure, so a tiny model learns it within tens of steps."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = [f"def add_{f}_{i}(x):\n    return x + {i % 7}\n\n" for i in range(40)]
        (folder / f"mod_{f}.py").write_text("".join(lines))
    return folder


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run_config(tmp_path, corpus_dir, model=None, optim=None, data=None, **train_kw):
    train_kw = {
        "steps": 40,
        "batch_size": 8,
        "seq_len": 32,
        "eval_interval": 10,
        "eval_batches": 2,
        "checkpoint_interval": 10,
        "log_interval": 5,
        "progress_bar": False,
        "sample_tokens": 0,
        "out_dir": str(tmp_path / "run"),
        **train_kw,
    }
    data = {
        "paths": [str(corpus_dir)],
        "num_workers": 0,
        "val_fraction": 0.25,
        "cache_dir": str(tmp_path / "cache"),
        **(data or {}),
    }
    return RunConfig(
        model=GPTConfig(**{**TINY_MODEL, **(model or {})}),
        optim=OptimConfig(**{"lr": 3e-3, "warmup_steps": 5, **(optim or {})}),
        train=TrainConfig(**train_kw),
        data=DataConfig(**data),
    )


def test_loss_falls_and_the_run_directory_is_complete(tmp_path, corpus_dir):
    cfg = run_config(tmp_path, corpus_dir, steps=60, sample_tokens=20, sample_prompt="def ", keep_last=1)
    result = train(cfg)
    m = result.metrics
    assert result.stopped == "completed" and m.steps == list(range(1, 61))
    first, last = sum(m.train_loss[:5]) / 5, sum(m.train_loss[-5:]) / 5
    assert first > 4.0 and last < 0.6 * first, (first, last)
    assert m.val_loss[-1] < 0.6 * m.val_loss[0] and m.val_accuracy[-1] > m.val_accuracy[0]
    assert m.val_perplexity[-1] == pytest.approx(torch.tensor(m.val_loss[-1]).exp().item(), rel=1e-6)
    run = result.run_dir
    saved = json.loads((run / "training_metrics.json").read_text())
    assert saved["train_loss"] == m.train_loss and saved["val_loss"] == m.val_loss
    for key in ("learning_rate", "epochs", "steps", "tokens_per_s"):
        assert saved[key], key
    assert saved["epochs"] == sorted(saved["epochs"]) and saved["epochs"][-1] > 0
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == 320  # 257 byte ids, padded to 64
    for png in ("training_curve.png", "loss_by_epoch.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.sample.startswith("def ") and (run / "sample.txt").read_text() == result.sample
    # keep_last=1 plus the best: at most two step files survive.
    files = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert "step_00000060.pt" in files and len(files) <= 2
    model, tokenizer, loaded_cfg = load_for_inference(run, which="latest")
    assert loaded_cfg.model.vocab_size == 320 and tokenizer.decode(tokenizer.encode("x = 1")) == "x = 1"
    idx = torch.tensor([tokenizer.encode("def add_1_3(x):")])
    logits, _ = model(idx)
    assert logits.shape == (1, idx.shape[1], 320)

    # A second run into the same folder is refused; the first run's files are untouched.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_fused_loss_leaves_the_runs_losses_as_they_were(tmp_path, corpus_dir, monkeypatch):
    """The trainer's loss runs through linear_cross_entropy (GPT's default with targets); the same run with the loss
    taken from the logits instead (return_logits=True) gives the same losses, step by step."""
    kw = dict(steps=8, eval_interval=4, checkpoint_interval=8, log_interval=1)
    fused = train(run_config(tmp_path / "fused", corpus_dir, **kw)).metrics
    forward = GPT.forward

    def with_logits(self, idx, targets=None, **options):
        return forward(self, idx, targets, **{**options, "return_logits": True})

    monkeypatch.setattr(GPT, "forward", with_logits)
    on_logits = train(run_config(tmp_path / "logits", corpus_dir, **kw)).metrics
    assert len(fused.train_loss) == 8 and fused.train_loss == pytest.approx(on_logits.train_loss, rel=1e-5)
    assert fused.val_loss == pytest.approx(on_logits.val_loss, rel=1e-5)


def test_overfitting_one_batch_drives_the_loss_near_zero():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=8, d_model=64, vocab_size=64, max_seq_len=32))
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x = torch.randint(0, 64, (4, 32))
    y = torch.randint(0, 64, (4, 32))
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05, loss.item()


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    a = GPT(GPTConfig(**TINY_MODEL, vocab_size=64))
    b = GPT(GPTConfig(**TINY_MODEL, vocab_size=64))
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 64, (8, 32)), torch.randint(0, 64, (8, 32))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def no_autocast():  # fp32
        return torch.autocast("cpu", enabled=False)

    loss_big = forward_backward(a, [(x, y)], torch.device("cpu"), no_autocast, scaler)
    loss_acc = forward_backward(
        b, [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)], torch.device("cpu"), no_autocast, scaler
    )
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-6, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_after_sigterm_gives_the_identical_loss_curve(tmp_path, corpus_dir):
    # Dropout makes the curve depend on the RNG state, so a resume that lost it would diverge.
    kw = dict(model={"dropout": 0.1}, steps=16, eval_interval=4, checkpoint_interval=100, log_interval=3)
    full = train(run_config(tmp_path / "full", corpus_dir, **kw)).metrics

    def sigterm_at_step_7(step, metrics):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = run_config(tmp_path / "split", corpus_dir, **kw)
    first = train(cfg, callbacks=[sigterm_at_step_7])
    assert first.stopped == "interrupted" and first.metrics.steps[-1] == 7
    assert checkpoint.load(first.run_dir)["step"] == 7  # the signal wrote a checkpoint before stopping
    resumed = train(cfg, resume=True).metrics
    assert resumed.steps == full.steps == list(range(1, 17))
    assert resumed.train_loss == full.train_loss  # exact equality on CPU
    assert resumed.val_loss == full.val_loss and resumed.learning_rate == full.learning_rate


def test_a_run_resumes_in_fp16(tmp_path, corpus_dir):
    # A non-fp16 run saves an empty scaler state: the fp16 resume starts a fresh scale instead of failing to load it.
    kw = dict(optim={"warmup_steps": 1}, batch_size=4, eval_interval=2)
    train(run_config(tmp_path, corpus_dir, steps=2, **kw))
    resumed = train(run_config(tmp_path, corpus_dir, steps=3, precision="fp16", **kw), resume=True)
    assert resumed.stopped == "completed" and resumed.metrics.steps == [1, 2, 3]
    assert checkpoint.load(resumed.run_dir)["scaler"]["scale"] > 0


def test_a_run_that_died_before_its_first_checkpoint_can_be_started_again(tmp_path, corpus_dir):
    # config.json is written before the first step; a crash before any checkpoint must not lock the folder, since
    # --resume has nothing to continue from.
    cfg = run_config(tmp_path, corpus_dir, steps=6, checkpoint_interval=100, eval_interval=100)

    def crash_at_step_2(step, metrics):
        if step == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, callbacks=[crash_at_step_2])
    assert (tmp_path / "run" / "config.json").exists()
    with pytest.raises(ValueError, match="no latest checkpoint"):
        train(cfg, resume=True)
    assert train(cfg).stopped == "completed"


def test_a_second_signal_stops_at_once():
    # The first signal asks for a checkpoint and a clean stop; the second goes to the handler that was there before.
    # Python's own SIGINT handler is installed here: a shell's background job starts with SIGINT ignored.
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signal == signal.SIGTERM and seen == []
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGTERM)  # our handler is gone: the previous one keeps getting them
            assert seen == [signal.SIGTERM] * 2
        with StopRequest() as stop, pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from fasttrain.train import checkpoint

    def half_then_die(obj, f):
        f.write(b"PK" + b"\\0" * 1000)  # the start of a zip archive, then the process dies mid-write
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.torch.save = half_then_die
    checkpoint.save(sys.argv[1], 2, {"step": 2}, keep_last=3)
""")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    weights = torch.randn(64, 64)
    checkpoint.save(tmp_path, 1, {"step": 1, "w": weights}, keep_last=3, is_best=True)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    folder = checkpoint.checkpoint_dir(tmp_path)
    assert list(folder.glob(".*.tmp-*")), "the killed save should have left its partial temporary file"
    assert not (folder / "step_00000002.pt").exists()
    for which in ("latest", "best"):
        state = checkpoint.load(tmp_path, which)
        assert state["step"] == 1 and torch.equal(state["w"], weights)
    checkpoint.save(tmp_path, 3, {"step": 3}, keep_last=3)  # the next save sweeps the partial file away
    assert not list(folder.glob(".*.tmp-*")) and checkpoint.load(tmp_path)["step"] == 3


def test_checkpoint_keeps_the_last_k_and_the_best(tmp_path):
    for step in range(1, 7):
        checkpoint.save(tmp_path, step, {"step": step}, keep_last=2, is_best=step == 2)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).glob("step_*.pt"))
    assert names == ["step_00000002.pt", "step_00000005.pt", "step_00000006.pt"]
    assert checkpoint.load(tmp_path, "best")["step"] == 2 and checkpoint.load(tmp_path)["step"] == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no latest checkpoint"):
        checkpoint.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.load(tmp_path / "missing")


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    checkpoint.save(tmp_path, 1, {"step": 1}, keep_last=2)
    folder = checkpoint.checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {}}')
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    for wrong in (folder / "latest", tmp_path / "config.json", tmp_path / "other.zip"):
        with pytest.raises(ValueError, match=f"{wrong.name}' is not a fasttrain checkpoint"):
            checkpoint.load(wrong)
    (folder / "step_00000001.pt").unlink()  # `latest` now names a file that is gone
    with pytest.raises(ValueError, match=r"step_00000001.pt', named by .*latest', does not exist"):
        checkpoint.load(tmp_path)


def test_early_stopping_counts_evaluations_without_improvement():
    early = EarlyStopping(patience=2)
    assert [early.update(v) for v in (3.0, 2.5, 2.6)] == [True, True, False]
    assert not early.should_stop
    early.update(2.5)
    assert early.should_stop and early.best == 2.5
    assert not EarlyStopping(patience=None).should_stop


def test_early_stopping_ends_the_run(tmp_path, corpus_dir):
    # lr 1e-9 barely moves the weights, so the validation loss stalls and patience runs out after a few evals.
    cfg = run_config(
        tmp_path,
        corpus_dir,
        optim={"lr": 1e-9, "schedule": "constant", "warmup_steps": 0},
        steps=100,
        eval_interval=2,
        early_stopping_patience=2,
    )
    result = train(cfg)
    assert result.stopped == "early_stopping" and result.metrics.steps[-1] < 100
    assert checkpoint.load(result.run_dir)["step"] == result.metrics.steps[-1]

    # Resuming it is a no-op, as for a completed run: no step, no new checkpoint.
    folder = checkpoint.checkpoint_dir(result.run_dir)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    again = train(cfg, resume=True)
    assert again.stopped == "early_stopping" and again.metrics.steps == result.metrics.steps
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # A larger patience is read at resume time, so the run goes on.
    last = result.metrics.steps[-1]
    more = train(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, early_stopping_patience=3, steps=last + 2)),
        resume=True,
    )
    assert more.metrics.steps[-1] == last + 2


def test_tensorboard_logs_or_names_the_missing_package(tmp_path, corpus_dir):
    cfg = run_config(tmp_path, corpus_dir, steps=10, tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"train.tensorboard=true needs the tensorboard package"):
            train(cfg)
        return
    train(cfg)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_none_on_the_command_line_is_none_for_optional_strings():
    overrides = parse_overrides(
        RunConfig,
        [
            "--optim.backend",
            "none",
            "--data.cache_dir=null",
            "--train.early_stopping_patience",
            "None",
            "--train.out_dir",
            "none",
        ],
    )
    assert overrides == {
        "optim": {"backend": None},
        "data": {"cache_dir": None},
        "train": {"early_stopping_patience": None, "out_dir": "none"},
    }


def test_seq_len_above_max_seq_len_and_missing_data_raise(tmp_path):
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'triton'"):
        OptimConfig(backend="triton")  # AdamW has no Triton kernel: refused before any data is prepared
    with pytest.raises(ValueError, match=r"train.seq_len \(64\) exceeds model.max_seq_len \(32\)"):
        RunConfig(model=GPTConfig(**TINY_MODEL), train=TrainConfig(seq_len=64))
    cfg = run_config(tmp_path, tmp_path / "no-such-dir")
    with pytest.raises(ValueError, match="no-such-dir"):
        train(cfg)


def test_settings_that_cannot_work_together_raise_at_once():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        TrainConfig(seed=-1)
    with pytest.raises(ValueError, match="train.early_stopping_patience needs a validation split.*data.val_fraction"):
        RunConfig(
            model=GPTConfig(**TINY_MODEL),
            train=TrainConfig(seq_len=32, early_stopping_patience=2),
            data=DataConfig(val_fraction=0.0),
        )


def test_cuda_graph_refuses_what_it_cannot_capture_before_any_data(tmp_path, monkeypatch):
    model = GPTConfig(**TINY_MODEL)
    for train_kw, optim_kw, match in [
        ({"compile": True}, {}, "train.cuda_graph and train.compile cannot both be on"),
        ({"device": "cpu"}, {}, "train.cuda_graph needs a CUDA device, but train.device is 'cpu'"),
        ({"precision": "fp16"}, {}, "train.cuda_graph does not take precision 'fp16'"),
        ({}, {"backend": "reference"}, "train.cuda_graph needs AdamW's cuda backend.*'reference'"),
    ]:
        with pytest.raises(ValueError, match=match):
            RunConfig(
                model=model, optim=OptimConfig(**optim_kw), train=TrainConfig(seq_len=32, cuda_graph=True, **train_kw)
            )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # device auto resolves to the CPU, GPU or not
    cfg = run_config(tmp_path, tmp_path / "no-such-dir", cuda_graph=True)  # the corpus does not exist
    with pytest.raises(ValueError, match="train.cuda_graph needs a CUDA device.*'auto' resolved to cpu"):
        train(cfg)
    with pytest.raises(ValueError, match="a CUDA graph needs a CUDA device, got cpu"):
        net = GPT(dataclasses.replace(model, vocab_size=64))
        GraphedStep(net, AdamW(net.parameters()), 1, 2, 8, torch.device("cpu"), None)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_the_graph_warm_up_leaves_weights_and_optimizer_state_as_they_were(backend):
    """What makes a graphed run's first replay its next step: the warm-up (fasttrain.train.graphed.warm_up) at lr 0
    moves no weight and puts AdamW's state back, fresh or loaded (a resume). Exact on the CPU."""
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY_MODEL, vocab_size=64)
    nets = [GPT(cfg), GPT(cfg)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, backend=backend) for net in nets]
    x, y = torch.randint(0, 64, (2, 2, 16))

    def step_of(net, opt):
        def one_step():
            _, loss = net(x, y)
            loss.backward()
            opt.step()
            return loss

        return one_step

    for warm_up_steps in (3, 2):  # over a fresh state, then over one a step old (as after a resume)
        warm_up(opts[0], step_of(nets[0], opts[0]), warm_up_steps)
        for net, opt in zip(nets, opts):
            opt.zero_grad(set_to_none=True)
            step_of(net, opt)()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opts[0].state[p][k], opts[1].state[q][k]) for k in opts[1].state[q])
    assert opts[0].param_groups[0]["lr"] == 1e-2


class _CpuGraphedStep(GraphedStep):
    """A CUDA graph's semantics on the CPU, for GraphedStep's own logic: the capture executes nothing (the eager
    stand-in's effects are undone), and a replay reruns the step with its grads overwritten, not accumulated (a
    replay rewrites the grads the capture allocated)."""

    def _capture(self, one_step, optimizer, device):
        warm_up(optimizer, one_step, WARMUP_STEPS)
        optimizer.zero_grad(set_to_none=True)
        params = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
        state = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        loss = one_step()
        with torch.no_grad():
            for p, before in zip((p for group in optimizer.param_groups for p in group["params"]), params):
                p.copy_(before)
        for p, s in optimizer.state.items():
            for k, v in s.items():
                v.copy_(state[p][k])
        self._one_step, self._optimizer = one_step, optimizer
        return loss

    def _replay(self):
        self._optimizer.zero_grad(set_to_none=True)
        self.loss.copy_(self._one_step())


def test_graphed_step_is_the_eager_step_on_new_batches_and_lrs():
    """GraphedStep's buffers, device lr and accumulation, with a CUDA graph's semantics emulated on the CPU: each
    replay is the eager step (grad accumulation 2, a new lr each step, clipping), bit for bit."""
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY_MODEL, vocab_size=64)
    nets = [GPT(cfg), GPT(cfg)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0) for net in nets]
    graphed = _CpuGraphedStep(nets[0], opts[0], 2, 2, 16, torch.device("cpu"), contextlib.nullcontext)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        micro = [tuple(torch.randint(0, 64, (2, 2, 16), generator=gen)) for _ in range(2)]
        lr = 1e-2 * (step + 1) / 3
        got = graphed.step(micro, lr)
        for group in opts[1].param_groups:
            group["lr"] = lr
        opts[1].zero_grad(set_to_none=True)
        want = forward_backward(
            nets[1], micro, torch.device("cpu"), contextlib.nullcontext, torch.amp.GradScaler("cpu", enabled=False)
        )
        opts[1].step()
        assert torch.equal(got, want), step
    assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))


def test_an_out_dir_that_is_no_run_folder_is_refused_before_the_data(tmp_path):
    # The corpus does not exist: these errors must come before the data preparation would report it.
    missing = tmp_path / "no-such-corpus"
    project = tmp_path / "project"
    project.mkdir()
    for text in ('{"my": "app config"}', "not json {"):
        (project / "config.json").write_text(text)
        with pytest.raises(ValueError, match=r"train.out_dir .*project' holds a config.json that is not a fasttrain"):
            train(run_config(tmp_path, missing, out_dir=str(project)))
        assert (project / "config.json").read_text() == text
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"train.out_dir .*a_file' cannot be made: File exists"):
        train(run_config(tmp_path, missing, out_dir=str(tmp_path / "a_file")))


def test_a_sample_prompt_longer_than_the_model_is_refused_before_training(tmp_path, corpus_dir):
    steps = []
    cfg = run_config(tmp_path, corpus_dir, steps=6, sample_tokens=5, sample_prompt="x" * 40)
    with pytest.raises(ValueError, match=r"train.sample_prompt is 40 tokens, more than model.max_seq_len \(32\)"):
        train(cfg, callbacks=[lambda step, metrics: steps.append(step)])
    assert steps == []


def test_splits_shorter_than_a_window_are_named_before_training(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("x" * 20)
    with pytest.raises(ValueError, match=r"training split has .* train.seq_len 32 .*data.paths.*data.max_bytes"):
        train(run_config(tmp_path, tmp_path / "small"))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("x" * 300)  # one document: its last 5% (15 tokens) is validation
    with pytest.raises(ValueError, match=r"validation split has 15 tokens; train.seq_len 32 .* data.val_fraction"):
        train(run_config(tmp_path, tmp_path / "one", data={"val_fraction": 0.05}))


def test_val_fraction_0_trains_without_evaluation(tmp_path, corpus_dir):
    cfg = run_config(
        tmp_path,
        corpus_dir,
        optim={"warmup_steps": 1},
        data={"val_fraction": 0.0},
        steps=4,
        batch_size=4,
        eval_interval=2,
        checkpoint_interval=2,
        log_interval=2,
        keep_last=1,
    )
    result = train(cfg)
    m = result.metrics
    assert result.stopped == "completed" and m.steps == [1, 2, 3, 4] and result.best_val_loss is None
    assert m.val_loss == [] and json.loads((result.run_dir / "training_metrics.json").read_text())["val_loss"] == []
    folder = checkpoint.checkpoint_dir(result.run_dir)
    # keep_last 1, no best; each checkpoint with its checksum
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000004.pt", "step_00000004.pt.sha256"]
    for png in ("training_curve.png", "loss_by_epoch.png"):
        assert (result.run_dir / png).is_file()
    load_for_inference(result.run_dir)  # which="best" falls back to latest


@pytest.mark.gpu
@pytest.mark.parametrize("precision, compile", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_mixed_precision_training_on_cuda(tmp_path, corpus_dir, precision, compile):
    # n_head 1 -> head_dim 32: attention runs on the Triton kernels; fp16 goes through the GradScaler.
    cfg = run_config(
        tmp_path,
        corpus_dir,
        model={"n_head": 1},
        steps=60,
        precision=precision,
        device="cuda",
        compile=compile,
        sample_tokens=16,
    )
    result = train(cfg)
    m = result.metrics
    assert result.stopped == "completed" and all(torch.isfinite(torch.tensor(m.train_loss)))
    assert sum(m.train_loss[-5:]) / 5 < 0.6 * sum(m.train_loss[:5]) / 5
    assert m.val_loss[-1] < 0.6 * m.val_loss[0]
    assert m.tokens_per_s and min(m.tokens_per_s) > 0
    name = torch.cuda.get_device_name()
    if any(key in name for key in ("H100", "H200", "A100")):
        assert len(m.mfu) == len(m.tokens_per_s) and 0 < max(m.mfu) < 1
    if precision == "fp16":
        assert checkpoint.load(result.run_dir)["scaler"]["scale"] > 0
    model, _, _ = load_for_inference(result.run_dir, device="cuda")
    assert next(model.parameters()).device.type == "cuda"


@pytest.mark.gpu
def test_cuda_graph_training_matches_eager_and_resumes(tmp_path, corpus_dir):
    """train.cuda_graph: the replayed step (grad accumulation included; no dropout, whose draws inside a graph need
    not be eager's) follows the eager run's loss curve (bf16: kernels of different tiles would round apart, the same
    ones replay identically), and a run stopped by a signal resumes into the curve of an uninterrupted graphed run."""
    kw = dict(
        model={"n_head": 1, "dropout": 0.0},
        steps=30,
        grad_accum=2,
        precision="bf16",
        device="cuda",
        eval_interval=10,
        checkpoint_interval=100,
        log_interval=5,
    )
    eager = train(run_config(tmp_path / "eager", corpus_dir, **kw)).metrics
    graphed = train(run_config(tmp_path / "graphed", corpus_dir, cuda_graph=True, **kw)).metrics
    assert graphed.steps == eager.steps and graphed.learning_rate == eager.learning_rate
    for got, want in zip(graphed.train_loss, eager.train_loss):
        assert abs(got - want) <= 2e-2 * abs(want), (graphed.train_loss, eager.train_loss)
    assert graphed.train_loss[-1] < 0.6 * graphed.train_loss[0]

    def sigterm_at_step_12(step, metrics):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = run_config(tmp_path / "split", corpus_dir, cuda_graph=True, **kw)
    assert train(cfg, callbacks=[sigterm_at_step_12]).stopped == "interrupted"
    resumed = train(cfg, resume=True).metrics
    assert resumed.steps == graphed.steps
    for got, want in zip(resumed.train_loss, graphed.train_loss):
        assert abs(got - want) <= 2e-2 * abs(want), (resumed.train_loss, graphed.train_loss)
