"""Reliability of a run folder: divergence never reaches a checkpoint, one writer per run folder, checkpoints that
verify themselves, and one line (never a traceback) for every failure, each leaving every saved file as it was."""

import contextlib
import ctypes
import dataclasses
import errno
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch
from test_train import run_config, write_corpus

from fasttrain.cli import main
from fasttrain.data.tokenizers import MAX_PIECE, train_bpe
from fasttrain.model import GPT
from fasttrain.train import RunConfig, checkpoint, files, train
from fasttrain.train.files import RunLock

pytestmark = pytest.mark.usefixtures("cpu_user")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_files=4)


def snapshot(folder):
    """Every file under folder, by path, with its bytes."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def poison_from(monkeypatch, first_step, last_step=math.inf, evaluation=False):
    """Make the model's training loss (and with evaluation, its logits in evaluation) NaN from optimizer step
    first_step to last_step; returns the callback that counts the steps."""
    state = {"step": 0}
    forward = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if first_step <= state["step"] + 1 <= last_step:
            if loss is not None and self.training:
                loss = loss * float("nan")
            elif evaluation and not self.training:
                logits = logits * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)

    def count(step, metrics):
        state["step"] = step

    return count


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasttrain: error: ") and "Traceback" not in err, err
    return lines[0]


# -- 1. divergence


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_a_diverged_run_stops_and_leaves_the_last_good_checkpoint(tmp_path, corpus_dir, monkeypatch, precision):
    # Steps 5.. are NaN: fp16's GradScaler skips them itself, fp32's AdamW by the loss's flag; the run stops after
    # max_bad_steps in a row; the step-6 checkpoint is not written (its step was bad) and nothing saved changes.
    count = poison_from(monkeypatch, 5)
    saved = {}

    def keep(step, metrics):
        count(step, metrics)
        if step == 4:
            saved.update(snapshot(tmp_path / "run"))

    cfg = run_config(
        tmp_path,
        corpus_dir,
        steps=12,
        batch_size=4,
        checkpoint_interval=3,
        eval_interval=3,
        log_interval=4,
        precision=precision,
        max_bad_steps=3,
    )
    with pytest.raises(FloatingPointError, match="3 steps in a row .up to step 7.") as info:
        train(cfg, callbacks=[keep])
    assert "\n" not in str(info.value)
    folder = checkpoint.checkpoint_dir(tmp_path / "run")
    assert (folder / "latest").read_text() == "step_00000003.pt" and (folder / "best").read_text() == "step_00000003.pt"
    assert {p: b for p, b in snapshot(tmp_path / "run").items() if "checkpoints" in p.parts} == {
        p: b for p, b in saved.items() if "checkpoints" in p.parts
    }
    state = checkpoint.load(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_on_nan_skip_skips_and_counts_and_the_weights_stay_finite(tmp_path, corpus_dir, monkeypatch):
    count = poison_from(monkeypatch, 3, 4)
    cfg = run_config(tmp_path, corpus_dir, steps=8, batch_size=4, log_interval=2, eval_interval=4, on_nan="skip")
    result = train(cfg, callbacks=[count])
    m = result.metrics
    assert result.stopped == "completed" and m.skipped_steps == [3, 4] and m.steps == list(range(1, 9))
    assert math.isnan(m.train_loss[2]) and all(math.isfinite(v) for v in m.train_loss[4:])
    assert json.loads((result.run_dir / "training_metrics.json").read_text())["skipped_steps"] == [3, 4]
    state = checkpoint.load(result.run_dir)
    assert state["step"] == 8 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_no_checkpoint_with_a_nan_is_ever_written(tmp_path):
    checkpoint.save(tmp_path, 1, {"w": torch.randn(3, 3)}, keep_last=2)
    before = snapshot(tmp_path)
    bad = {"model": {"w": torch.randn(3, 3)}, "optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, math.inf])}}}}
    with pytest.raises(FloatingPointError, match=r"optimizer.state.0.exp_avg holds a NaN or inf; .*step_00000001.pt"):
        checkpoint.save(tmp_path, 2, bad, keep_last=2)
    assert snapshot(tmp_path) == before


def test_a_diverged_cli_run_ends_with_one_line_and_exit_2(tmp_path, corpus_dir, monkeypatch, capsys):
    # All steps NaN from the first: no val loss is finite either (the best loss line must still print).
    poison_from(monkeypatch, 1, evaluation=True)
    args = ["train", "--preset", "tiny", "--model.n_layer", "1", "--model.d_model", "32", "--model.max_seq_len", "32"]
    args += ["--train.seq_len", "32", "--train.batch_size", "2", "--train.steps", "4", "--train.progress_bar", "false"]
    args += ["--train.log_interval", "2", "--train.max_bad_steps", "2", "--train.sample_tokens", "0"]
    args += ["--train.out_dir", str(tmp_path / "run"), "--data.paths", str(corpus_dir)]
    args += ["--data.cache_dir", str(tmp_path / "cache"), "--optim.warmup_steps", "1"]
    assert main(args) == 2
    assert "training diverged: 2 steps in a row" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # on_nan=skip: the run ends, its val loss NaN, without a crash on the missing best loss.
    assert main([*args, "--train.on_nan", "skip", "--train.eval_interval", "2"]) == 0
    out = capsys.readouterr().out
    assert "best val loss none finite" in out


# -- 2. one writer per run folder

# What RunLock does, without importing torch: flock RUN/.lock and write the pid into it.
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_folder_has_one_writer_and_a_killed_holder_frees_it(tmp_path, corpus_dir):
    cfg = run_config(
        tmp_path, corpus_dir, steps=2, batch_size=4, eval_interval=2, checkpoint_interval=2, optim={"warmup_steps": 1}
    )
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        before = snapshot(tmp_path / "run")
        with pytest.raises(ValueError, match=rf"in use by another fasttrain run \(pid {holder.pid}\)"):
            train(cfg)
        assert snapshot(tmp_path / "run") == before
    finally:
        holder.kill()  # SIGKILL: the OS frees the lock; nothing has to clean up
        holder.wait(timeout=30)
    assert train(cfg).stopped == "completed"

    # A resume while another writer holds the folder is refused too, and changes nothing.
    lock = RunLock(tmp_path / "run")
    try:
        before = snapshot(tmp_path / "run")
        with pytest.raises(ValueError, match=rf"pid {os.getpid()}"):
            train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4)), resume=True)
        assert snapshot(tmp_path / "run") == before
    finally:
        lock.release()


def test_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path, corpus_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    left = [run / f".training_metrics.json.tmp-{dead.pid}", run / f".config.json.tmp-{dead.pid}"]
    left += [run / "checkpoints" / f".step_00000002.pt.tmp-{dead.pid}", run / f".training_curve.png.tmp-{dead.pid}"]
    left += [run / f".tokenizer.json.tmp-{dead.pid}", run / f".data_summary.txt.tmp-{dead.pid}"]
    live = run / f".training_metrics.json.tmp-{os.getppid()}"
    for path in [*left, live]:
        path.write_bytes(b"partial")
    train(
        run_config(
            tmp_path,
            corpus_dir,
            steps=2,
            batch_size=4,
            eval_interval=2,
            checkpoint_interval=2,
            optim={"warmup_steps": 1},
        )
    )
    assert not any(path.exists() for path in left) and live.read_bytes() == b"partial"


# -- 3. checkpoints that verify themselves; 4. one line for every failure


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, corpus_dir):
    """A finished tiny run (checkpoints at steps 2 and 4); tests work on a copy (`copy_run`)."""
    tmp = tmp_path_factory.mktemp("done")
    with pytest.MonkeyPatch.context() as mp:  # the cpu_user fixture, for a module-scoped run
        mp.delenv("TRITON_INTERPRET", raising=False)
        cfg = small_config(tmp, corpus_dir)
        train(cfg)
    return tmp / "run"


def small_config(tmp_path, corpus_dir, **kw):
    kw = {"steps": 4, "batch_size": 4, "eval_interval": 2, "checkpoint_interval": 2, **kw}
    return run_config(tmp_path, corpus_dir, optim={"warmup_steps": 1}, **kw)


def copy_run(done_run, tmp_path):
    shutil.copytree(done_run, tmp_path / "run")
    return tmp_path / "run"


def flip(path, offset, n=16):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_anywhere_in_a_checkpoint_are_caught(tmp_path, done_run):
    run = copy_run(done_run, tmp_path)
    file = run / "checkpoints" / "step_00000004.pt"
    size = file.stat().st_size
    for offset in random.Random(0).sample(range(size - 16), 6):
        original = file.read_bytes()
        flip(file, offset)
        with pytest.raises(checkpoint.CheckpointError, match=rf"'{file}' (is damaged|is not a fasttrain)"):
            checkpoint.load(run)
        file.write_bytes(original)
    assert checkpoint.load(run)["step"] == 4


def test_a_damaged_checkpoint_stops_eval_and_generate_and_resume_falls_back(tmp_path, done_run, corpus_dir, capsys):
    run, cfg = copy_run(done_run, tmp_path), small_config(tmp_path, corpus_dir)
    file = run / "checkpoints" / "step_00000004.pt"
    flip(file, file.stat().st_size // 2)
    before = snapshot(run)
    eval_args = ["eval", "--checkpoint", str(run), "--data", str(corpus_dir), "--which", "latest", "--max-batches", "1"]
    for args in (eval_args, ["generate", "--checkpoint", str(run), "--prompt", "def", "--which", "latest"]):
        assert main(args) == 2
        assert "step_00000004.pt' is damaged: its bytes do not match" in one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before

    result = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6)), resume=True)
    err = capsys.readouterr().err
    assert "fasttrain: warning: " in err and "resuming from the previous good one, step_00000002.pt" in err
    assert result.metrics.steps == [1, 2, 3, 4, 5, 6] and checkpoint.load(run)["step"] == 6


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("model"), "it has no 'model' entry"),
        (lambda s: s.pop("config"), "it has no 'config' entry"),
        (lambda s: s["model"].pop("lm_head.weight"), "does not fit the run's model: it has no 'lm_head.weight'"),
        (lambda s: s["model"].update(extra=torch.ones(2)), "does not fit the run's model: it has an unknown 'extra'"),
        (
            lambda s: s["model"].update({"lm_head.weight": torch.ones(3, 5)}),
            "lm_head.weight is (3, 5), the model's is (320, 32)",
        ),
        # lm_head.weight is wte.weight (tied): the first name of the tensor is the one named.
        (lambda s: s["model"]["lm_head.weight"].fill_(math.nan), "holds a NaN or inf in wte.weight (its run diverged)"),
    ],
)
def test_a_checkpoint_of_the_wrong_contents_is_one_line(tmp_path, done_run, corpus_dir, capsys, change, message):
    run = copy_run(done_run, tmp_path)
    file = run / "checkpoints" / "step_00000004.pt"
    state = torch.load(file, weights_only=True)
    change(state)
    torch.save(state, file)  # as another tool would write it: no checksum, no check of what it holds
    (run / "checkpoints" / "step_00000004.pt.sha256").unlink()
    before = snapshot(run)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def", "--which", "latest"]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("optimizer"), "step_00000004.pt' is not a fasttrain run's checkpoint: it has no 'optimizer'"),
        (lambda s: s["early_stopping"].clear(), "step_00000004.pt' does not fit this run: no 'best' entry"),
        (lambda s: s["model"].update(extra=torch.ones(1)), "step_00000004.pt' does not fit the run's model"),
    ],
)
def test_a_resume_of_the_wrong_contents_is_one_line(tmp_path, done_run, capsys, change, message):
    run = copy_run(done_run, tmp_path)
    for file in sorted((run / "checkpoints").glob("step_*.pt")):
        state = torch.load(file, weights_only=True)
        change(state)
        checkpoint.save(run, state["step"], state, keep_last=2)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--train.steps", "6"]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before


def test_a_resume_never_goes_back_and_changes_nothing(tmp_path, done_run, capsys):
    run = copy_run(done_run, tmp_path)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--train.steps", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "train.steps 3: the run is at step 4, and a resume only goes forward" in line
    assert main(["train", "--resume", str(run)]) == 0
    assert "the run is at step 4 (completed); nothing to train" in capsys.readouterr().out
    assert snapshot(run) == before


def failing_open(code):
    """files.open raising OSError(code) for the temporaries of atomic writes: as on a read-only mount (EROFS), or a
    folder root cannot write either (root ignores chmod, so the tests patch instead)."""

    def fake(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    return fake


@pytest.mark.parametrize(
    "code, advice", [(errno.EROFS, "read-only file system"), (errno.EACCES, "check its permissions")]
)
def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, done_run, monkeypatch, capsys, code, advice):
    run = copy_run(done_run, tmp_path)
    before = snapshot(run)
    monkeypatch.setattr(files, "open", failing_open(code), raising=False)
    assert main(["train", "--resume", str(run), "--train.steps", "6"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{os.strerror(code)}: {run}/." in line and advice in line
    assert snapshot(run) == before
    with pytest.raises(OSError):  # the traceback, for a bug report
        main(["train", "--resume", str(run), "--train.steps", "6", "--debug"])
    monkeypatch.setenv("FASTTRAIN_DEBUG", "1")
    with pytest.raises(OSError):
        main(["train", "--resume", str(run), "--train.steps", "6"])


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, done_run, monkeypatch, capsys):
    run = copy_run(done_run, tmp_path)
    before = snapshot(run)
    written = {"n": 0}
    real_write = checkpoint._Hashing.write

    def write_until_full(self, data):
        written["n"] += len(data)
        if written["n"] > 10_000:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(checkpoint._Hashing, "write", write_until_full)
    assert main(["train", "--resume", str(run), "--train.steps", "6"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"No space left on device: {run / 'checkpoints' / 'step_00000006.pt'}; the disk is full" in line
    after = snapshot(run)
    assert {p: b for p, b in after.items() if "checkpoints" in p.parts} == {
        p: b for p, b in before.items() if "checkpoints" in p.parts
    }
    assert not list(run.rglob(".*.tmp-*"))


# -- 5. TOML sections of the wrong type; 6. BPE on a line without spaces


@pytest.mark.parametrize(
    "toml, message",
    [
        ("model = 3", "model must be a table of keys ([model] in TOML), got 3 (int)"),
        ('optim = "fast"', "optim must be a table of keys ([optim] in TOML), got 'fast' (str)"),
        ("train = [1]", "train must be a table of keys ([train] in TOML), got [1] (list)"),
        ("[data]\npaths = 1", "data.paths expects list[str], got 1 (int)"),
    ],
)
def test_a_toml_section_that_is_not_a_table_is_an_error(tmp_path, capsys, toml, message):
    # An override of the same section after it (--model.n_layer) used to replace the 3 with a fresh table.
    (tmp_path / "bad.toml").write_text(toml + "\n")
    code = main(
        [
            "train",
            "--config",
            str(tmp_path / "bad.toml"),
            "--model.n_layer",
            "1",
            "--train.out_dir",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_bpe_training_on_a_1_mb_line_without_spaces_takes_seconds():
    rng = random.Random(0)
    line = "".join(rng.choices("ACGT", k=1_000_000))  # a DNA string: one 1 MB "word" to the GPT-2 split
    start = time.perf_counter()
    tok = train_bpe(iter([line, "def f(x):\n    return x\n"]), 300)
    assert time.perf_counter() - start < 30  # quadratic in the line, it did not finish in minutes
    assert tok.decode(tok.encode(line[:5000])) == line[:5000]
    assert max(len(tok.decode([i])) for i in range(tok.vocab_size)) <= MAX_PIECE


# -- 7. kill -9 anywhere in a save


def kill_during_save(run, seed, state):
    """In a forked child (no interpreter start, no imports): checkpoint.save(run, 3, state) killed by SIGKILL at a
    point drawn by seed among the operations that touch the disk (each chunk torch.save writes, each fsync, rename
    and unlink), counted on a dry run first. Returns the child's wait status."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:
        calls = {"n": 0, "kill_at": None}

        def counted(fn):
            def wrapper(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == calls["kill_at"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)

            return wrapper

        checkpoint._Hashing.write = counted(checkpoint._Hashing.write)
        for name in ("fsync", "replace", "unlink"):
            setattr(os, name, counted(getattr(os, name)))
        checkpoint.save(run / "dry", 1, state, keep_last=1)
        checkpoint.save(run / "dry", 2, state, keep_last=1, is_best=True)  # the second prunes the first
        calls["kill_at"] = calls["n"] + random.Random(seed).randint(1, calls["n"] // 2)
        checkpoint.save(run, 3, state, keep_last=2, is_best=True)
    finally:
        os._exit(1)  # not killed: the parent sees exit status 1


def model_state(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {f"w{i}": torch.randn(64, 64, generator=g) for i in range(6)}}


@pytest.mark.parametrize("seed", [0, 1, 2, *(pytest.param(s, marks=pytest.mark.slow) for s in range(3, 23))])
def test_a_kill_at_any_point_of_a_save_leaves_a_loadable_run(tmp_path, seed):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model_state(step), keep_last=2, is_best=step == 1)
    before = snapshot(tmp_path / "checkpoints")
    status = kill_during_save(tmp_path, seed, model_state(3))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    after = snapshot(tmp_path / "checkpoints")
    # latest and best load and verify: the old ones, or step 3's once it is whole.
    latest, best = checkpoint.load(tmp_path), checkpoint.load(tmp_path, "best")
    assert latest["step"] in (2, 3) and best["step"] in (1, 3)
    for name in ("latest", "best"):
        checkpoint.verify(checkpoint.resolve(tmp_path, name))
    # Every file saved before is as it was, but for the pointers moved to step 3 and what the prune then removed.
    for path, data in before.items():
        if path.name in ("latest", "best") and after[path] != data:
            assert after[path] == b"step_00000003.pt"
        elif path not in after:
            assert latest["step"] == 3 and path.name.startswith("step_00000001.pt")
        else:
            assert after[path] == data, path
    # The next save sweeps what the killed one left: its temporaries, a sidecar whose file a killed prune removed.
    checkpoint.save(tmp_path, 4, {"step": 4}, keep_last=2)
    folder = tmp_path / "checkpoints"
    assert not list(folder.glob(".*.tmp-*"))
    assert all(p.with_name(p.name.removesuffix(".sha256")).is_file() for p in folder.glob("*.sha256"))


# -- 7. the CLI's bad-input table: in-process main() calls, each refused before any data is read


def config_fields():
    """(section.field, the field's type) for every field of every section of RunConfig."""
    sections = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        hints = typing.get_type_hints(sections[section.name])
        for f in dataclasses.fields(sections[section.name]):
            yield f"{section.name}.{f.name}", hints[f.name]


def refused(capsys, tmp_path, *args):
    """main's exit code and its one error line, for a command that must not create its out_dir. The data folder
    is missing: a config that were accepted would end there, not train the default corpus."""
    first = ["--train.out_dir", str(tmp_path / "never"), "--data.paths", str(tmp_path / "no_data")]
    code = main(["train", *first, *args])
    line = one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "never").exists()
    return code, line


def test_every_option_of_the_wrong_type_is_one_line(tmp_path, capsys):
    checked = 0
    for key, tp in config_fields():
        options = typing.get_args(tp) or (tp,)
        if int in options or float in options:
            wrong = "1x"
        elif bool in options:
            wrong = "maybe"
        else:
            continue  # a str or list[str] takes any text
        code, line = refused(capsys, tmp_path, f"--{key}", wrong)
        assert code == 2 and f"--{key} expects" in line and repr(wrong) in line, (key, line)
        checked += 1
    assert checked >= 40


RANGES = [
    ("model.n_layer", "0"),
    ("model.n_head", "-2"),
    ("model.n_kv_head", "3"),
    ("model.d_model", "30"),
    ("model.max_seq_len", "0"),
    ("model.dropout", "1"),
    ("model.rope_theta", "nan"),
    ("model.rope_theta", "inf"),
    ("model.norm", "batchnorm"),
    ("model.activation", "relu6"),
    ("optim.lr", "0"),
    ("optim.lr", "nan"),
    ("optim.beta1", "1"),
    ("optim.beta2", "-0.5"),
    ("optim.beta2", "nan"),
    ("optim.eps", "-1e-8"),
    ("optim.weight_decay", "inf"),
    ("optim.max_grad_norm", "0"),
    ("optim.max_grad_norm", "nan"),
    ("optim.schedule", "exp"),
    ("optim.warmup_steps", "-1"),
    ("optim.min_lr_ratio", "2"),
    ("optim.backend", "triton"),
    *((f"train.{name}", "0") for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_interval")),
    *((f"train.{name}", "0") for name in ("eval_batches", "checkpoint_interval", "keep_last", "log_interval")),
    ("train.max_bad_steps", "0"),
    ("train.early_stopping_patience", "0"),
    ("train.seed", "-1"),
    ("train.sample_tokens", "-1"),
    ("train.precision", "fp8"),
    ("train.device", "tpu"),
    ("train.on_nan", "ignore"),
    ("train.out_dir", ""),
    ("data.val_fraction", "1.5"),
    ("data.val_fraction", "-0.1"),
    ("data.num_workers", "-1"),
    ("data.max_decompressed_bytes", "0"),
    ("data.jsonl_field", ""),
]


def test_every_option_out_of_range_is_one_line(tmp_path, capsys):
    for key, value in RANGES:
        code, line = refused(capsys, tmp_path, f"--{key}", value)
        assert code == 2 and key.split(".")[1] in line, (key, value, line)


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("eval", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("eval", ["--seq-len", "-3"], "--seq-len must be >= 1, got -3"),
        ("eval", ["--max-batches", "0"], "--max-batches must be >= 1, got 0"),
        ("generate", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        ("generate", ["--temperature", "-1"], "temperature"),
        ("generate", ["--top-k", "0"], "top_k"),
        ("generate", ["--top-p", "1.5"], "top_p"),
        ("generate", ["--prompt", ""], "--prompt must encode to at least one token"),
    ],
)
def test_a_bad_eval_or_generate_option_is_one_line(done_run, corpus_dir, capsys, command, args, message):
    base = ["--checkpoint", str(done_run)]
    base += ["--data", str(corpus_dir)] if command == "eval" else ["--prompt", "def", "--max-new-tokens", "2"]
    try:
        code = main([command, *base, *args])
    except SystemExit as e:  # argparse's own checks: its usage line, then the error line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err


# -- 7. a real full disk and a real read-only mount, in a private mount namespace of a forked child

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def _private_mounts(libc) -> None:
    """This process in a mount namespace of its own (and a user namespace when not root), whose mounts no other
    process sees and which end with it; OSError where the machine does not allow it."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWNS if uid == 0 else CLONE_NEWNS | CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    args = [None if a is None else str(a).encode() for a in (source, target, fstype)]
    if libc.mount(*args, flags, None if data is None else data.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def in_mount_namespace(tmp_path, body):
    """body() in a forked child with private mounts; returns what it returned (JSON), or None where mounts are not
    allowed here."""
    result = tmp_path / "result.json"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                _private_mounts(libc)
            except OSError:
                result.write_text("null")
                code = 0
            else:
                result.write_text(json.dumps(body(libc)))
                code = 0
        except BaseException as e:
            result.write_text(json.dumps({"error": repr(e)}))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return json.loads(result.read_text())


def test_a_real_full_disk_and_a_real_read_only_mount_are_one_line(tmp_path, done_run, corpus_dir):
    def body(libc):
        out = {}
        disk = tmp_path / "disk"
        disk.mkdir()
        used = sum(p.stat().st_size for p in done_run.rglob("*") if p.is_file())
        _mount(libc, "tmpfs", disk, "tmpfs", 0, f"size={used + 200_000}")  # no room for one more checkpoint
        shutil.copytree(done_run, disk / "run")
        before = snapshot(disk / "run")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            out["full_code"] = main(["train", "--resume", str(disk / "run"), "--train.steps", "6"])
        out["full_err"] = err.getvalue()
        after = snapshot(disk / "run")
        out["full_kept"] = all(after.get(p) == b for p, b in before.items() if "checkpoints" in p.parts)
        out["full_temporaries"] = [str(p) for p in (disk / "run").rglob(".*.tmp-*")]

        ro = tmp_path / "ro"
        shutil.copytree(done_run, ro)
        _mount(libc, ro, ro, None, MS_BIND)
        _mount(libc, None, ro, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        before = snapshot(ro)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            out["ro_code"] = main(["train", "--resume", str(ro), "--train.steps", "6"])
            out["ro_eval"] = main(["eval", "--checkpoint", str(ro), "--data", str(corpus_dir), "--max-batches", "1"])
        out["ro_err"] = err.getvalue()
        out["ro_kept"] = snapshot(ro) == before
        return out

    out = in_mount_namespace(tmp_path, body)
    if out is None:
        pytest.skip("no private mount namespace here: the patched full disk and read-only tests above stand in")
    assert "error" not in out, out
    assert out["full_code"] == 1 and out["full_kept"] and not out["full_temporaries"], out
    line = one_error_line(out["full_err"])
    assert "No space left on device: " in line and "step_00000006.pt; the disk is full" in line
    assert out["ro_code"] == 1 and out["ro_eval"] == 0 and out["ro_kept"], out
    line = one_error_line(out["ro_err"])
    assert f"Read-only file system: {tmp_path / 'ro' / '.lock'}; it is on a read-only file system" in line
