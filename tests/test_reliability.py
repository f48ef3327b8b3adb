"""Reliability of a run folder: divergence never reaches a checkpoint, one writer per run folder, checkpoints that
verify themselves, and one line (never a traceback) for every failure, each leaving every saved file as it was."""

import dataclasses
import errno
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from reliability_helpers import (
    copy_run,
    make_corpus,
    make_done_run,
    one_error_line,
    poison_from,
    small_config,
    snapshot,
)
from test_train import run_config

from fasttrain import _files
from fasttrain.cli import main
from fasttrain.train import checkpoint, train
from fasttrain.train.files import RunLock

pytestmark = pytest.mark.usefixtures("cpu_user")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, corpus_dir):
    return make_done_run(tmp_path_factory, corpus_dir)


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
    left += [run / f".config.json.tmp-{dead.pid}-{dead.pid + 1}"]  # atomic_write's: pid, then thread id
    live = run / f".training_metrics.json.tmp-{os.getppid()}"
    live_thread = run / f".config.json.tmp-{os.getppid()}-7"
    for path in [*left, live, live_thread]:
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
    assert not any(path.exists() for path in left)
    assert live.read_bytes() == live_thread.read_bytes() == b"partial"


# -- 3. checkpoints that verify themselves; 4. one line for every failure


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


def test_a_damaged_checkpoint_stops_eval_generate_and_export_and_resume_falls_back(
    tmp_path, done_run, corpus_dir, capsys
):
    run, cfg = copy_run(done_run, tmp_path), small_config(tmp_path, corpus_dir)
    file = run / "checkpoints" / "step_00000004.pt"
    flip(file, file.stat().st_size // 2)
    before = snapshot(run)
    eval_args = ["eval", "--checkpoint", str(run), "--data", str(corpus_dir), "--which", "latest", "--max-batches", "1"]
    export_args = ["export", "--checkpoint", str(run), "--to", str(tmp_path / "exported"), "--which", "latest"]
    for args in (
        eval_args,
        ["generate", "--checkpoint", str(run), "--prompt", "def", "--which", "latest"],
        export_args,
    ):
        assert main(args) == 2, args[0]
        assert "step_00000004.pt' is damaged: its bytes do not match" in one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before and not (tmp_path / "exported").exists()

    result = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6)), resume=True)
    err = capsys.readouterr().err
    assert "fasttrain: warning: " in err and "resuming from the previous good one, step_00000002.pt" in err
    assert result.metrics.steps == [1, 2, 3, 4, 5, 6] and checkpoint.load(run)["step"] == 6


def test_a_latest_that_names_a_missing_file_resumes_from_the_newest_good_one(tmp_path, done_run, corpus_dir, capsys):
    run = copy_run(done_run, tmp_path)
    (run / "checkpoints" / "latest").write_text("step_00000009.pt")
    (run / "checkpoints" / "step_00000004.pt").write_bytes(b"PK\x03\x04 not a whole archive")
    result = train(small_config(tmp_path, corpus_dir, steps=6), resume=True)
    err = capsys.readouterr().err
    assert "step_00000009.pt" in err and "resuming from the previous good one, step_00000002.pt" in err
    assert result.metrics.steps == [1, 2, 3, 4, 5, 6]


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
    """_files.open raising OSError(code) for the temporaries of atomic writes: as on a read-only mount (EROFS), or a
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
    monkeypatch.setattr(_files, "open", failing_open(code), raising=False)
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
