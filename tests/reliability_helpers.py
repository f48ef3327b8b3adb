"""What the reliability tests share: a tiny finished run to copy, snapshots of a folder, the one-line check, and a
way to make the loss NaN from a given step."""

import math
import shutil

import pytest
from test_train import run_config, write_corpus

from fasttrain.model import GPT
from fasttrain.train import train


def make_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_files=4)


def make_done_run(tmp_path_factory, corpus_dir):
    """A finished tiny run (checkpoints at steps 2 and 4); tests work on a copy (`copy_run`)."""
    tmp = tmp_path_factory.mktemp("done")
    with pytest.MonkeyPatch.context() as mp:  # the cpu_user fixture, for a module-scoped run
        mp.delenv("TRITON_INTERPRET", raising=False)
        train(small_config(tmp, corpus_dir))
    return tmp / "run"


def small_config(tmp_path, corpus_dir, **kw):
    kw = {"steps": 4, "batch_size": 4, "eval_interval": 2, "checkpoint_interval": 2, **kw}
    return run_config(tmp_path, corpus_dir, optim={"warmup_steps": 1}, **kw)


def copy_run(done_run, tmp_path):
    shutil.copytree(done_run, tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder):
    """Every file under folder, by path, with its bytes."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasttrain: error: ") and "Traceback" not in err, err
    return lines[0]


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
