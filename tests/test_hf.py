"""attn_implementation="fasttrain" in HF Transformers: a small random Llama (GQA 4/2, head_dim 32, no download)
gives eager attention's logits and gradients on unpadded inputs (T = 1 too), and its greedy generation with a KV
cache; unsupported features (T5-style position biases, attention sinks) are refused by name.
tests/test_hf_attention.py holds padded, packed, sliding-window,
cached and compiled inputs across Llama, Mistral, Qwen2 and GPT-2."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fasttrain.integrations.hf import fasttrain_attention_forward  # importing registers "fasttrain"

from helpers import set_attn_implementation

TOL = 2e-5  # fp32 logits of a 2-layer model: measured 3.6e-7 against eager


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _run(model, impl, ids, mask=None):
    set_attn_implementation(model, impl)
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("ones", [False, True], ids=["no mask", "all-ones mask"])
def test_logits_and_gradients_match_eager(model, T, ones, monkeypatch):
    ids = torch.randint(0, 100, (2, T), generator=torch.Generator().manual_seed(T))
    mask = torch.ones(2, T, dtype=torch.long) if ones else None  # unpadded: fasttrain_mask passes no mask
    with monkeypatch.context() as m:
        m.setenv("FASTTRAIN_BACKEND", "triton")  # the kernels (interpreted here) or an error, never the reference
        logits, grads = _run(model, "fasttrain", ids, mask)
    want_logits, want_grads = _run(model, "eager", ids, mask)
    assert (logits - want_logits).abs().max() < TOL
    for name, g in want_grads.items():
        assert (grads[name] - g).abs().max() < TOL * max(1.0, g.abs().max().item()), name


def test_greedy_generation_with_kv_cache_matches_eager(model):
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    outs = {}
    for impl in ("fasttrain", "eager"):
        set_attn_implementation(model, impl)
        outs[impl] = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(outs["fasttrain"], outs["eager"])


def test_unsupported_features_are_refused_by_name(model):
    q = torch.randn(1, 4, 3, 32)
    with pytest.raises(ValueError, match="position_bias"):
        fasttrain_attention_forward(model.model.layers[0].self_attn, q, q, q, None, position_bias=torch.zeros(1))
