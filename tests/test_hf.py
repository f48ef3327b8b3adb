"""attn_implementation="fasttrain" in HF Transformers: a small random Llama (GQA 4/2, head_dim 32, no download)
gives eager attention's logits and gradients, with and without a padding mask, and its greedy generation with a KV
cache; unsupported features are refused by name."""

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import sdpa_mask

from fasttrain.integrations.hf import fasttrain_attention_forward, fasttrain_mask  # importing registers "fasttrain"

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
    model.set_attn_implementation(impl)
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


@pytest.mark.filterwarnings("ignore:fasttrain. attention runs on the reference")  # a mask runs the reference
def test_padding_mask_matches_eager_on_real_tokens(model):
    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    model.set_attn_implementation("fasttrain")
    logits = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    want = model(ids, attention_mask=mask).logits
    assert (logits - want)[mask.bool()].abs().max() < 1e-5


def test_greedy_generation_with_kv_cache_matches_eager(model):
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    outs = {}
    for impl in ("fasttrain", "eager"):
        model.set_attn_implementation(impl)
        outs[impl] = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(outs["fasttrain"], outs["eager"])


def test_unsupported_features_are_refused_by_name(model):
    q = torch.randn(1, 4, 3, 32)
    with pytest.raises(ValueError, match="softcap"):
        fasttrain_attention_forward(model.model.layers[0].self_attn, q, q, q, None, softcap=30.0)


@pytest.mark.parametrize("skip", [True, False], ids=["causal skip allowed", "no causal skip"])
def test_mask_function_passes_no_mask_for_causal_unpadded_inputs(skip):
    # transformers asks for no skip when it cannot rule out packed sequences (position_ids given, or tracing).
    args = dict(batch_size=2, q_length=6, kv_length=6, allow_is_causal_skip=skip)
    assert fasttrain_mask(**args, attention_mask=torch.ones(2, 6, dtype=torch.bool)) is None
    padded = torch.ones(2, 6, dtype=torch.bool)
    padded[0, :2] = False
    assert torch.equal(fasttrain_mask(**args, attention_mask=padded), sdpa_mask(**args, attention_mask=padded))
    cached = dict(batch_size=1, q_length=2, kv_length=6, q_offset=4, allow_is_causal_skip=False)  # decode steps
    assert torch.equal(fasttrain_mask(**cached), sdpa_mask(**cached))


def _compiled_run(model, ids, mask, impl):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # the graphs as traced, and their backward
    out = torch.compile(model, backend=counter, fullgraph=True)(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return counter, out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiles_to_one_graph_with_fullgraph(model):
    # Traced, transformers passes a mask even when unpadded (it cannot read position_ids), so this one case runs the
    # masked path a padded batch takes too; no warning may be traced.
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 11, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fasttrain")  # and fullgraph=True fails on any warning traced
        counter, logits, grads = _compiled_run(model, ids, mask, "fasttrain")
    assert counter.frame_count == 1 and counter.op_count > 0
    want_logits, want_grads = _run(model, "eager", ids, mask)
    assert (logits - want_logits).abs().max() < 1e-5
    for name, g in want_grads.items():
        assert (grads[name] - g).abs().max() < TOL * max(1.0, g.abs().max().item()), name
