"""Distributed checks on the CPU: 2 processes over gloo under torchrun, each launch bounded by a timeout.

A launch costs seconds (two Python processes importing torch), so each runs every check of one job of
tests/dist_checks.py, which prints `ok <name>` per passing check.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from fasttrain import _extension

CHECKS = Path(__file__).with_name("dist_checks.py")
LAUNCH_TIMEOUT_S = 120

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo"),
    pytest.mark.skipif(not _extension.available(), reason="fasttrain._C not built"),
]


def torchrun(*args: str, nproc: int = 2, cwd=None) -> str:
    """Runs `torchrun --standalone --nproc_per_node nproc ARGS` and returns its output; fails the test on a non-zero
    exit or past LAUNCH_TIMEOUT_S."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(args)} ran past {LAUNCH_TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}")
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}:\n{text[-6000:]}"
    return text


def test_adamw_on_fsdp2_shards_matches_torch():
    out = torchrun(str(CHECKS), "adamw")
    for name in ("fsdp_matches_torch", "state_dict_layout", "mixed_plain_and_sharded", "found_inf_agreed"):
        assert f"ok {name}" in out, f"check {name} did not report:\n{out[-4000:]}"


# ---- the trainer under torchrun ----------------------------------------------------------------------------------

STEPS = 20


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(6):
        (folder / f"m{f}.py").write_text("".join(f"def g_{f}_{i}(y):\n    return y * {i % 5}\n\n" for i in range(30)))
    return folder


def train_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    """A tiny run of STEPS steps whose clipping is active at every step (max_grad_norm 0.05), so the global norm
    decides every update; checkpoints at STEPS / 2 and STEPS."""
    return [
        "train",
        "--preset",
        "tiny",
        *("--model.n_layer", "2", "--model.n_head", "4", "--model.d_model", "32", "--model.max_seq_len", "32"),
        *("--train.seq_len", "32", "--train.batch_size", "4", "--train.steps", str(STEPS), "--train.log_interval", "1"),
        *("--optim.warmup_steps", "2", "--optim.max_grad_norm", "0.05"),
        *("--train.eval_interval", str(STEPS), "--train.eval_batches", "2", "--train.checkpoint_interval", "10"),
        *("--train.progress_bar", "false", "--train.sample_tokens", "4", "--train.out_dir", str(tmp_path / out)),
        *("--data.paths", str(tmp_path / "corpus"), "--data.num_workers", "0", "--data.val_fraction", "0.2"),
        *("--data.cache_dir", str(tmp_path / "cache")),
        *extra,
    ]


def losses(run: Path) -> list[float]:
    return json.loads((run / "training_metrics.json").read_text())["train_loss"]


def assert_same_curve(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want) == STEPS, (what, len(got), len(want))
    for step, (a, b) in enumerate(zip(got, want), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}: step {step} loss {a} vs one process's {b}"


def cli(args: list[str]) -> None:
    from fasttrain.cli import main

    assert main(args) == 0


def back_to(run: Path, step: int) -> None:
    """Point the run's latest checkpoint at an earlier step, as if it had been stopped there."""
    (run / "checkpoints" / "latest").write_text(f"step_{step:08d}.pt")


@pytest.mark.usefixtures("cpu_user")
def test_ddp_curve_equals_one_process_and_resumes_across_world_sizes(tmp_path):
    write_corpus(tmp_path / "corpus")
    # One process with grad_accum 2 takes the batches that 2 ranks with grad_accum 1 take (fasttrain.data.Batches).
    cli(train_args(tmp_path, "one", "--train.grad_accum", "2"))
    out = torchrun("-m", "fasttrain", *train_args(tmp_path, "ddp", "--dist.strategy", "ddp"), cwd=tmp_path)
    assert out.count("global batch 8 sequences (batch_size 4 x grad_accum 1 x 2 ranks)") == 1  # rank 0 alone speaks
    assert out.count("--- sample ---") == 1
    assert_same_curve(losses(tmp_path / "ddp"), losses(tmp_path / "one"), "ddp")

    # 2 -> 1: the ddp run's step-10 checkpoint (one file, from rank 0) resumed by one process.
    back_to(tmp_path / "ddp", 10)
    cli(["train", "--resume", str(tmp_path / "ddp"), "--dist.strategy", "none", "--train.grad_accum", "2"])
    assert_same_curve(losses(tmp_path / "ddp"), losses(tmp_path / "one"), "ddp resumed by one process")
    # 1 -> 2: the one-process run's step-10 checkpoint resumed by 2 ranks.
    back_to(tmp_path / "one", 10)
    resume = ["train", "--resume", str(tmp_path / "one"), "--dist.strategy", "ddp", "--train.grad_accum", "1"]
    torchrun("-m", "fasttrain", *resume, cwd=tmp_path)
    metrics = json.loads((tmp_path / "one" / "training_metrics.json").read_text())
    assert metrics["steps"] == list(range(1, STEPS + 1))
    assert_same_curve(metrics["train_loss"], losses(tmp_path / "ddp"), "one-process run resumed by ddp")


FAKE_TORCHRUN = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({}, ["--dist.strategy", "ddp"], "dist.strategy 'ddp' needs torchrun's environment (no RANK)"),
        ({"WORLD_SIZE": "2"}, [], "one of 2 started by torchrun, but dist.strategy is 'none'"),
        (FAKE_TORCHRUN, ["--dist.strategy", "ddp", "--dist.backend", "nccl"], "'nccl' needs CUDA devices"),
        ({}, ["--dist.strategy", "zero"], "dist: strategy must be one of ('none', 'ddp', 'fsdp')"),
        ({}, ["--dist.timeout_s", "0"], "dist: timeout_s must be finite and > 0"),
    ],
)
def test_bad_dist_options_end_with_one_line(tmp_path, capsys, monkeypatch, env, args, message):
    from fasttrain.cli import main

    for key in (*FAKE_TORCHRUN, "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_corpus(tmp_path / "corpus")
    assert main(train_args(tmp_path, "run", *args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fasttrain: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
