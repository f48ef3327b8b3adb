"""LoRA layers and freezing on fasttrain's GPT: outputs and gradients against the plain formula, PEFT's target
rules, merging, and frozen parameters left without gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fasttrain.finetune import LoRALinear, apply_lora, freeze, memory, merge_lora
from fasttrain.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("cpu_user")

LLAMA = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, vocab_size=61, max_seq_len=128)
LLAMA.update(norm="rmsnorm", activation="swiglu", tie_embeddings=False)


@pytest.mark.parametrize("T", [1, 97])
@pytest.mark.parametrize("spans", [[(0, 40)], [(0, 16), (24, 32)], [(8, 24), (24, 40)]])
def test_lora_linear_equals_the_formula_with_its_gradients(T, spans):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    lora = LoRALinear(base, spans, rank=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        for b in lora.lora_B:
            b.normal_()
    base.weight.requires_grad_(False)
    x = torch.randn(2, T, 24, requires_grad=True)
    y = lora(x)
    want = x @ base.weight.T + base.bias
    delta = [2.0 * (x @ a.T @ b.T) for a, b in zip(lora.lora_A, lora.lora_B)]
    for (start, stop), d in zip(spans, delta):
        want = torch.cat([want[..., :start], want[..., start:stop] + d, want[..., stop:]], -1)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [x, *lora.lora_A, *lora.lora_B, base.bias]
    for got, ref in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.delta_weight() + base.weight, _merged(lora), rtol=1e-6, atol=1e-6)


def _merged(lora):
    w = lora.weight.detach().clone()
    for (start, stop), a, b in zip(lora.spans, lora.lora_A, lora.lora_B):
        w[start:stop] += lora.scaling * (b @ a).detach()
    return w


def test_apply_lora_follows_peft_targets_and_freezes_the_rest():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA))
    spec = apply_lora(model, rank=2)  # PEFT's Llama default: q_proj, v_proj
    assert spec.modules == {
        f"blocks.{i}.attn.qkv": [f"model.layers.{i}.self_attn.{p}_proj" for p in "qv"] for i in (0, 1)
    }
    assert model.blocks[0].attn.qkv.spans == [(0, 32), (48, 64)]  # q rows, then v rows (k: 32..48 skipped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"blocks.{i}.attn.qkv.lora_{ab}.{j}" for i in (0, 1) for ab in "AB" for j in (0, 1)]
    idx = torch.randint(0, 61, (2, 9))
    before = model(idx)[0]
    model2 = GPT(GPTConfig(**LLAMA))
    model2.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    torch.testing.assert_close(before, model2(idx)[0])  # B starts at zero: the base model's function
    every = apply_lora(GPT(GPTConfig(**LLAMA)), rank=2, targets=["all-linear"])
    assert sorted(every.modules["blocks.1.mlp.up"]) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert "lm_head" not in every.modules
    with pytest.raises(ValueError, match=r"lora_targets \['query'\] match no module of this llama model"):
        apply_lora(GPT(GPTConfig(**LLAMA)), rank=2, targets=["query"])
    with pytest.raises(ValueError, match="lora_rank must be a positive int"):
        apply_lora(GPT(GPTConfig(**LLAMA)), rank=0)


def test_merge_keeps_the_function_and_leaves_plain_linears():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA))
    apply_lora(model, rank=3, targets=["o_proj", "up_proj", "k_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    idx = torch.randint(0, 61, (1, 33))
    want = model(idx)[0]
    merge_lora(model)
    assert not any("lora" in k for k in model.state_dict()) and type(model.blocks[0].attn.proj) is nn.Linear
    torch.testing.assert_close(model(idx)[0], want, rtol=1e-5, atol=1e-5)


def test_freeze_leaves_no_gradient_and_counts_memory():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA))
    full = memory(model)
    frozen = freeze(model, ["embeddings", "blocks:1", "*.norm2.weight"])
    assert "wte.weight" in frozen and "blocks.0.mlp.up.weight" in frozen and "blocks.1.norm2.weight" in frozen
    assert "blocks.1.attn.qkv.weight" not in frozen and "lm_head.weight" not in frozen
    idx = torch.randint(0, 61, (2, 9))
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n in frozen), n
    m = memory(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert m["gradients"] == 4 * trainable < full["gradients"] and m["optimizer_state"] == 8 * trainable
    assert m["parameters"] == full["parameters"] == 4 * full["all_parameters"]
    for bad, message in [("blocks:9", "N must be in 1..2"), ("*.nothing", "matches no parameter")]:
        with pytest.raises(ValueError, match=message):
            freeze(model, [bad])
