"""Prompt/completion fine-tuning data: loss on completion tokens only, and packed examples computing exactly what
each computes alone (cu_seqlens and per-example positions through the model's varlen path)."""

from __future__ import annotations

import json

import pytest
import torch

from fasttrain.data.examples import IGNORE, ExampleBatches, encode_examples, read_examples
from fasttrain.data.tokenizers import ByteTokenizer
from fasttrain.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("cpu_user")


def test_records_become_completion_only_targets(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"q": "2+2=", "a": "4"}) + "\n\n" + json.dumps({"q": "hi", "a": " there"}) + "\n")
    examples = read_examples([str(f)], prompt_field="q", completion_field="a")
    assert examples == [("2+2=", "4"), ("hi", " there")]
    tok = ByteTokenizer()
    (ids, targets), _ = encode_examples(tok, examples)
    assert ids.tolist() == list(b"2+2=4") and targets.tolist() == [IGNORE] * 3 + [ord("4"), tok.eot_id]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: needs string fields 'q' and 'a'"):
        read_examples([str(tmp_path / "bad.jsonl")], "q", "a")


@pytest.mark.parametrize(
    "options", [dict(), dict(positions="learned", bias=True), dict(norm="rmsnorm", activation="swiglu", n_kv_head=1)]
)
def test_packed_examples_equal_each_example_alone(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=257, max_seq_len=64, **options)).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 17, 9, 30, 2]
    examples = [(torch.randint(0, 256, (n,), generator=g).numpy(),) * 2 for n in lengths]
    batches = ExampleBatches(examples, batch_size=2, seq_len=32, mode="pack", seed=0)
    assert len(batches.rows) == 2  # [5, 1, 17, 9] and [30, 2]: 32 tokens each, no padding
    idx, targets, positions, cu = batches.next()
    assert idx.shape == (2, 32) and cu[-1] == 64
    logits, loss = model(idx, targets, positions=positions, cu_seqlens=cu, return_logits=True)
    fused = model(idx, targets, positions=positions, cu_seqlens=cu)[1]  # the loss without the logits
    torch.testing.assert_close(fused, loss, rtol=1e-6, atol=0)
    flat = logits.reshape(64, -1)
    for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = model(idx.reshape(1, 64)[:, start:stop])[0][0]
        torch.testing.assert_close(flat[start:stop], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss)
    loss.backward()  # the varlen path trains: every weight gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_padding_mode_puts_one_example_per_row_and_ignores_the_pad():
    examples = [(torch.arange(n).numpy(), torch.arange(n).numpy()) for n in (3, 40, 7)]
    batches = ExampleBatches(examples, batch_size=3, seq_len=16, mode="pad", pad_id=0)
    assert len(batches.rows) == 3 and batches.truncated == 1  # 40 cut to 16
    idx, targets, positions, cu = batches.next()
    assert sorted((t != IGNORE).sum().item() for t in targets) == [3, 7, 16]
    assert cu.tolist()[-1] == 48 and positions.max() == 15
    with pytest.raises(ValueError, match="mode must be one of"):
        ExampleBatches(examples, 1, 16, mode="stack")


def test_positions_and_cu_seqlens_go_together():
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, vocab_size=11, max_seq_len=8))
    idx = torch.randint(0, 11, (1, 6))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="positions and cu_seqlens go together"):
        model(idx, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"positions must be \(B, T\) = \(1, 6\), got \(6,\)"):
        model(idx, positions=torch.arange(6), cu_seqlens=cu)


def test_ranks_take_disjoint_strides_of_the_example_stream():
    examples = [(torch.arange(n).numpy(), torch.arange(n).numpy()) for n in (3, 9, 7, 5, 2, 11, 4)]
    one = ExampleBatches(examples, 2, 16, mode="pad", seed=1)
    ranks = [ExampleBatches(examples, 2, 16, mode="pad", seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # 20 rows of 7: across epochs, each in its own order
        for r in ranks:
            got, want = r.next(), one.next()
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert ranks[0].served == ranks[1].served == one.served
