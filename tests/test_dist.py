"""Distributed checks on the CPU: 2 processes over gloo under torchrun, each launch bounded by a timeout.

A launch costs seconds (two Python processes importing torch), so each runs every check of one job of
tests/dist_checks.py, which prints `ok <name>` per passing check.
"""

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
