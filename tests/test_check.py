"""`fasttrain check`: each debugging aid passes on a healthy tiny model, and fails, with its numbers, when it should."""

from __future__ import annotations

import pytest
import torch

from fasttrain.cli import main
from fasttrain.model import GPT, GPTConfig
from fasttrain.train.check import initial_loss, kernel_gradients

pytestmark = pytest.mark.usefixtures("cpu_user")

TINY = ["check", "--preset", "tiny", "--model.n_layer", "1", "--model.d_model", "32", "--model.vocab_size", "32"]


def test_every_check_passes_on_a_healthy_model(capsys):
    assert main([*TINY, "--model.norm", "rmsnorm", "--model.activation", "swiglu", "--lr", "2e-2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "PASS  initial loss",
        "PASS  overfit one batch",
        "PASS  gradcheck (float64)",
        "PASS  kernel gradients (float32)",
    ]
    assert "vs ln(32) = 3.4657" in lines[0]


def test_a_failing_check_says_so_with_its_numbers_and_exit_code_1(capsys):
    assert main([*TINY, "--steps", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  overfit one batch: loss " in out and "in 3 steps" in out


def test_initial_loss_and_kernel_gradients_judge_their_numbers():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=4, d_model=32, vocab_size=50, max_seq_len=64))
    assert initial_loss(model, pretrained=False, seed=0).passed
    with torch.no_grad():
        model.wte.weight.mul_(100.0)  # confident logits: far from uniform
    bad = initial_loss(model, pretrained=False, seed=0)
    assert bad.passed is False and "vs ln(50)" in bad.detail
    assert initial_loss(model, pretrained=True, seed=0).passed is None  # reported, not judged
    assert kernel_gradients(GPTConfig(n_kv_head=4, vocab_size=50), seed=0).passed
