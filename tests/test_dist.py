"""Distributed checks on the CPU: 2 processes over gloo under torchrun, each launch bounded by a timeout.

A launch costs seconds (two Python processes importing torch), so each runs every check of one job of
tests/dist_checks.py, which prints `ok <name>` per passing check.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def test_adamw_on_fsdp2_shards_matches_torch_and_ddp_syncs_once_per_step():
    out = torchrun(str(CHECKS), "units")
    checks = ("fsdp_matches_torch", "state_dict_layout", "mixed_plain_and_sharded", "found_inf_agreed")
    for name in (*checks, "gradients_sync_on_the_last_micro_batch"):
        assert f"ok {name}" in out, f"check {name} did not report:\n{out[-4000:]}"


def test_flash_attn_cross_entropy_splits_the_vocabulary_over_a_process_group():
    out = torchrun(str(CHECKS), "cross_entropy")
    assert "ok cross_entropy_vocab_split" in out, f"the check did not report:\n{out[-4000:]}"


# ---- the trainer under torchrun ----------------------------------------------------------------------------------

STEPS = 20


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(6):
        (folder / f"m{f}.py").write_text("".join(f"def g_{f}_{i}(y):\n    return y * {i % 5}\n\n" for i in range(30)))
    return folder


def train_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    """A tiny run of STEPS steps whose clipping is active at every step (max_grad_norm 0.05), so the global norm
    decides every update; a checkpoint every 5 steps, all kept."""
    return [
        "train",
        "--preset",
        "tiny",
        *("--model.n_layer", "2", "--model.n_head", "4", "--model.d_model", "32", "--model.max_seq_len", "32"),
        *("--model.norm", "rmsnorm", "--model.activation", "swiglu"),  # a Llama, which `fasttrain export` writes
        *("--train.seq_len", "32", "--train.batch_size", "4", "--train.steps", str(STEPS), "--train.log_interval", "1"),
        *("--optim.warmup_steps", "2", "--optim.max_grad_norm", "0.05"),
        *("--train.eval_interval", str(STEPS), "--train.eval_batches", "2", "--train.checkpoint_interval", "5"),
        *("--train.progress_bar", "false", "--train.sample_tokens", "4", "--train.out_dir", str(tmp_path / out)),
        *("--data.paths", str(tmp_path / "corpus"), "--data.num_workers", "0", "--data.val_fraction", "0.2"),
        *("--data.cache_dir", str(tmp_path / "cache"), "--train.keep_last", "4"),
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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with grad_accum 2, which takes the batches 2 ranks with grad_accum 1 take
    (fasttrain.data.Batches). -> (folder with the corpus and the run `one`, its losses)."""
    tmp = tmp_path_factory.mktemp("dist")
    write_corpus(tmp / "corpus")
    with pytest.MonkeyPatch.context() as mp:  # conftest's cpu_user, for a module-scoped fixture
        mp.delenv("TRITON_INTERPRET", raising=False)
        mp.setenv("OMP_NUM_THREADS", "1")
        cli(train_args(tmp, "one", "--train.grad_accum", "2"))
    return tmp, losses(tmp / "one")


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def resumed_copy(tmp: Path, run: str, step: int, name: str) -> Path:
    """A copy of run whose latest checkpoint is the one of `step`, as if it had stopped there."""
    copy = tmp / name
    shutil.copytree(tmp / run, copy)
    target = f"step_{step:08d}"  # a sharded checkpoint's folder, or a one-file checkpoint
    if not (copy / "checkpoints" / target).is_dir():
        target += ".pt"
    (copy / "checkpoints" / "latest").write_text(target)
    return copy


@pytest.mark.usefixtures("cpu_user")
def test_ddp_curve_equals_one_process_and_resumes_across_world_sizes(one_process):
    tmp, want = one_process
    out = torchrun("-m", "fasttrain", *train_args(tmp, "ddp", "--dist.strategy", "ddp"), cwd=tmp)
    assert out.count("global batch 8 sequences (batch_size 4 x grad_accum 1 x 2 ranks)") == 1  # rank 0 alone speaks
    assert out.count("--- sample ---") == 1
    assert_same_curve(losses(tmp / "ddp"), want, "ddp")

    # 2 -> 1: the ddp run's step-5 checkpoint (one file, from rank 0) resumed by one process.
    run = resumed_copy(tmp, "ddp", 5, "ddp_then_one")
    cli(["train", "--resume", str(run), "--dist.strategy", "none", "--train.grad_accum", "2"])
    assert_same_curve(losses(run), want, "ddp resumed by one process")


@pytest.mark.usefixtures("cpu_user")
def test_fsdp_curve_equals_one_process_resumes_across_world_sizes_and_consolidates(one_process, capsys):
    from fasttrain.cli import main
    from fasttrain.train.build import load_for_inference

    tmp, want = one_process
    out = torchrun("-m", "fasttrain", *train_args(tmp, "fsdp", "--dist.strategy", "fsdp"), cwd=tmp)
    assert out.count("dist: fsdp over 2 ranks") == 1 and out.count("--- sample ---") == 1
    assert_same_curve(losses(tmp / "fsdp"), want, "fsdp")
    assert (tmp / "fsdp" / "sample.txt").read_text() == (tmp / "one" / "sample.txt").read_text()

    # Read whole by one process without a process group: the weights the one-process run ended with.
    ours, _, _ = load_for_inference(tmp / "fsdp", "latest")
    theirs, _, _ = load_for_inference(tmp / "one", "latest")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert main(["export", "--checkpoint", str(tmp / "fsdp"), "--to", str(tmp / "fsdp_hf"), "--which", "latest"]) == 0
    assert (tmp / "fsdp_hf" / "model.safetensors").is_file()
    # A sharded checkpoint resumed as a one-file run: one line saying which strategy reads it.
    assert main(["train", "--resume", str(tmp / "fsdp"), "--dist.strategy", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a sharded (fsdp) checkpoint, which dist.strategy fsdp resumes" in err[0], err

    # 2 -> 1 from step 5, then that run's step-10 checkpoint (written by one rank) 1 -> 2.
    run = resumed_copy(tmp, "fsdp", 5, "fsdp_then_one")
    # A save killed mid-way leaves its temporary folder (the pid in its name is gone) and the pointers untouched.
    killed = run / "checkpoints" / f".step_00000006.tmp-{dead_pid()}"
    shutil.copytree(run / "checkpoints" / "step_00000010", killed)
    (killed / "trainer.pt").unlink()
    torchrun("-m", "fasttrain", "train", "--resume", str(run), "--train.grad_accum", "2", nproc=1, cwd=tmp)
    assert_same_curve(losses(run), want, "fsdp resumed by one rank")
    assert not killed.exists()  # swept by the resume


@pytest.mark.slow
@pytest.mark.usefixtures("cpu_user")
def test_one_rank_checkpoints_resume_on_two(one_process):
    tmp, want = one_process
    # ddp: the one-process run's step-10 checkpoint resumed by 2 ranks.
    run = resumed_copy(tmp, "one", 10, "one_then_ddp")
    resume = ("train", "--resume", str(run), "--dist.strategy", "ddp", "--train.grad_accum", "1")
    torchrun("-m", "fasttrain", *resume, cwd=tmp)
    assert_same_curve(losses(run), want, "one-process run resumed by ddp")
    # fsdp: a 1-rank run's step-10 checkpoint resumed by 2 ranks.
    fsdp_one = ("--dist.strategy", "fsdp", "--train.grad_accum", "2")
    torchrun("-m", "fasttrain", *train_args(tmp, "fsdp_one", *fsdp_one), nproc=1, cwd=tmp)
    assert_same_curve(losses(tmp / "fsdp_one"), want, "fsdp on one rank")
    run = resumed_copy(tmp, "fsdp_one", 10, "fsdp_one_then_two")
    torchrun("-m", "fasttrain", "train", "--resume", str(run), "--train.grad_accum", "1", cwd=tmp)
    assert_same_curve(losses(run), want, "fsdp resumed by two ranks after one")


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


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker of `rank` that torchrun started (Linux: /proc)."""
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(child)
    raise AssertionError(f"torchrun {torchrun_pid} has no worker of rank {rank}")


def signal_rank_1(sig: int, when: str, tmp: Path, *args: str) -> tuple[int, str]:
    """Launch 2 ranks, send sig to rank 1 once rank 0 prints a line starting with `when` -> (torchrun's exit code,
    its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONUNBUFFERED": "1"}, cwd=tmp
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(when):
                os.kill(rank_pid(proc.pid, 1), sig)
                break
        lines.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        proc.kill()
    return proc.returncode, "".join(lines)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers in /proc")
@pytest.mark.usefixtures("cpu_user")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint(one_process, strategy):
    tmp, _ = one_process
    # Signalled after the evaluation of step 6: rank 1 is then inside the loop, whose handler turns SIGTERM into a
    # stop (a signal during set-up ends a process as it would end any other).
    args = train_args(tmp, f"term_{strategy}", "--dist.strategy", strategy, "--train.steps", "400")
    args += ["--train.eval_interval", "6"]
    code, out = signal_rank_1(signal.SIGTERM, "step 6: val loss", tmp, "-m", "fasttrain", *args)
    assert code == 0, out[-4000:]
    stopped = json.loads((tmp / f"term_{strategy}" / "training_metrics.json").read_text())["steps"][-1]
    assert 0 < stopped < 400 and f"step {stopped}: signal to a rank received" in out, out[-4000:]
    latest = (tmp / f"term_{strategy}" / "checkpoints" / "latest").read_text()
    assert latest.startswith(f"step_{stopped:08d}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers in /proc")
@pytest.mark.usefixtures("cpu_user")
def test_a_killed_rank_restarts_the_job_from_its_latest_checkpoint(one_process):
    tmp, want = one_process
    # Killed after the evaluation of step 6 (which changes nothing the curve depends on) and its checkpoint.
    args = train_args(tmp, "killed", "--dist.strategy", "ddp", "--train.checkpoint_interval", "2")
    args += ["--train.eval_interval", "6"]
    # More than one restart allowed: on a loaded machine a restarted rank's first connection is sometimes refused.
    code, out = signal_rank_1(signal.SIGKILL, "step 6: val loss", tmp, "--max-restarts", "3", "-m", "fasttrain", *args)
    assert code == 0, out[-4000:]
    assert out.count("dist: ddp over 2 ranks") >= 2  # the first start and a restart
    assert_same_curve(losses(tmp / "killed"), want, "ddp restarted after a rank was killed")


def test_fsdp_adamw_benchmark_checks_results_before_timing(tmp_path, monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh

    from fasttrain.benchmarks import bench_adamw_fsdp as bench

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        assert bench.check_correct([(64, 32), (1, 8), (32,)], mesh, "cpu") < 1e-6
        real = bench.AdamW  # betas that 3 steps tell apart from the asked ones
        monkeypatch.setattr(bench, "AdamW", lambda params, **kw: real(params, **dict(kw, betas=(0.0, 0.0))))
        with pytest.raises(AssertionError, match="differs from torch"):
            bench.check_correct([(64, 32), (1, 8), (32,)], mesh, "cpu")
    finally:
        dist.destroy_process_group()


def test_sharded_checkpoints_are_pruned_as_one_file_checkpoints_are(tmp_path):
    from fasttrain.train import sharded

    folder = tmp_path / "checkpoints"
    for step in range(1, 6):
        (folder / f"step_{step:08d}").mkdir(parents=True)
        (folder / f"step_{step:08d}" / "__0_0.distcp").write_bytes(b"x")
    (folder / "best").write_text("step_00000002")
    (folder / "latest").write_text("step_00000005")
    (folder / ".step_00000006.tmp-1").mkdir()  # a save under way: not a checkpoint yet
    sharded._prune(folder, keep_last=2)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".step_00000006.tmp-1",
        "best",
        "latest",
        "step_00000002",
        "step_00000004",
        "step_00000005",
    ]


def test_a_sharded_checkpoint_with_a_nan_is_not_written(tmp_path):
    # One rank (a file store, no launch): what every rank of a job does, the non-finite check agreed over the job.
    from fasttrain.optim import AdamW
    from fasttrain.train import sharded
    from fasttrain.train.config import DistConfig
    from fasttrain.train.dist import Dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        job = Dist(DistConfig(strategy="fsdp"))
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        model.blocks = [model[0]]  # sharded.shard's units: each block, then the root
        sharded.shard(model, None, "fp32", reshard_after_forward=True, compile_blocks=False)
        opt = AdamW(model.parameters())
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        run = tmp_path / "run"
        sharded.save(run, 1, model, opt, {"step": 1}, keep_last=2, is_best=False, job=job)
        with torch.no_grad():
            model[1].weight.to_local()[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"step 2 not written: model\.1\.weight holds a NaN"):
            sharded.save(run, 2, model, opt, {"step": 2}, keep_last=2, is_best=False, job=job)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
        assert sharded.load_trainer_state(sharded.latest(run)) == {"step": 1}
    finally:
        dist.destroy_process_group()
