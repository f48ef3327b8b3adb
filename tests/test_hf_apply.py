"""fasttrain.integrations.hf.apply(model) on tiny random GPT-2, Llama, Mistral, Qwen2, Gemma, Gemma 2 and Gemma 3
models (no download), as a CPU user runs them (the C++ kernels and the references): the patched model's loss, logits
and every parameter's gradient against the unpatched model's, with and without padding; greedy generation; one graph
under torch.compile; an HF Trainer run with fasttrain's AdamW, gradient accumulation and a checkpoint resume; revert,
state_dict, double apply, the rotary function shared across models, and the errors."""

import copy
import sys
import warnings

import pytest
import torch
import transformers as tf
from torch._dynamo.testing import CompileCounterWithBackend

from fasttrain.integrations import hf_apply, hf_modules
from fasttrain.integrations.hf import apply, revert

from helpers import assert_within_2x_torch, err

V = 96
TOL = 2e-5  # fp32, relative to the largest gradient: measured worst 2.4e-7 (Gemma 3's 13 norms) on these models
_COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA 4/2
    attention_dropout=0.0,
    pad_token_id=0,
)
CONFIGS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    ),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, sliding_window=None)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_COMMON, head_dim=16)),
    # attention-logit softcapping low enough to cap these tiny scores (Gemma 2's own is 50): the logits move by 2e-3,
    # 100x TOL, when it is left out
    "gemma2": lambda: tf.Gemma2ForCausalLM(
        tf.Gemma2Config(**_COMMON, head_dim=16, attn_logit_softcapping=0.02, attn_implementation="eager")
    ),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_COMMON, head_dim=16)),
}
# what apply() patches in each (the parts' module counts): the table in docs/hf.md
PATCHED = {
    "gpt2": {"attention": 1, "norms": 5, "mlp": 2, "loss": 1},  # mlp: the GELU-tanh activation
    "llama": {"attention": 1, "norms": 5, "rotary": 1, "mlp": 2, "loss": 1},
    "mistral": {"attention": 1, "norms": 5, "rotary": 1, "mlp": 2, "loss": 1},
    "qwen2": {"attention": 1, "norms": 5, "rotary": 1, "mlp": 2, "loss": 1},
    "gemma": {"attention": 1, "norms": 5, "rotary": 1, "mlp": 2, "loss": 1},
    "gemma2": {"attention": 1, "norms": 9, "rotary": 1, "mlp": 2, "loss": 1},  # attention softcapped by the kernels
    "gemma3": {"attention": 1, "norms": 13, "rotary": 1, "mlp": 2, "loss": 1},  # q_norm, k_norm per layer
}
OPS = ("rms_norm", "layer_norm", "apply_rotary_emb", "swiglu", "geglu", "gelu", "linear_cross_entropy")


def _model(arch: str, seed: int = 0):
    """A tiny random model whose norm weights are not all 1 (0 for Gemma), so that a wrong scaling would show."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's config names token ids past this vocabulary
        model = CONFIGS[arch]()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


_PATCHED_MODELS = []


def _apply(model, **kwargs):
    patch = apply(model, **kwargs)
    _PATCHED_MODELS.append(model)
    return patch


@pytest.fixture(autouse=True)
def _revert_after():
    """Every model a test patched is reverted after it, so that the modeling files' rotary functions are
    transformers' own again for the next test's unpatched models."""
    yield
    while _PATCHED_MODELS:
        model = _PATCHED_MODELS.pop()
        if hf_modules.HANDLE in model.__dict__:
            revert(model)
    assert not hf_modules.ROTARY_SWAPS


@pytest.fixture
def calls(monkeypatch):
    """How many times each fasttrain op ran through the patched modules (counted from apply() on)."""
    counts = dict.fromkeys(OPS, 0)
    for name in OPS:
        where = hf_apply if name == "linear_cross_entropy" else hf_modules
        op = getattr(where, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(where, name, counted)
    return counts


def _batch(padded: bool, B: int = 2, T: int = 13, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a prompt not trained on
    mask = None
    if padded:  # right padding of 5 on row 1: its pads are neither attended to nor trained on
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, -5:] = 0
        ids[1, -5:] = 0
        labels[1, -5:] = -100
    return ids, labels, mask


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, want: dict, tol=TOL):
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert err(got[name], g) < tol * max(1.0, g.abs().max().item()), name


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_loss_gradients_and_logits_match_the_unpatched_model(arch, padded, calls, cpu_user):
    # The unpatched model runs first: once a model of a family is patched, its modeling file's rotary function is
    # fasttrain's for every model of that family in the process.
    ref = _model(arch)
    ids, labels, mask = _batch(padded)
    want = ref(ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    ref.eval()
    with torch.no_grad():
        want_eval = ref(ids, attention_mask=mask, labels=labels)
    model = copy.deepcopy(ref).train()
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patch = _apply(model)
    assert {part: len(names) for part, names in patch.patched.items()} == PATCHED[arch]
    calls.update(dict.fromkeys(calls, 0))  # the probes' calls do not count

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # training with labels: no (B, T, V) logits
    assert err(out.loss, want.loss) < TOL
    out.loss.backward()
    _assert_grads_close(_grads(model), _grads(ref))
    assert calls["linear_cross_entropy"] == 1
    assert calls["rms_norm"] + calls["layer_norm"] == PATCHED[arch]["norms"]
    if arch == "gpt2":
        assert calls["gelu"] == 2
    else:
        assert calls["apply_rotary_emb"] == 2 * 2  # q and k per layer
        assert calls["geglu" if arch.startswith("gemma") else "swiglu"] == 2

    model.eval()
    with torch.no_grad():  # eval with labels: logits returned, the loss transformers' own
        out = model(ids, attention_mask=mask, labels=labels)
    assert err(out.loss, want_eval.loss) < TOL
    real = mask.bool() if padded else torch.ones(ids.shape, dtype=torch.bool)
    assert (out.logits - want_eval.logits)[real].abs().max() < TOL

    revert(model)
    assert "forward" not in model.__dict__ and hf_modules.HANDLE not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model.config._attn_implementation == ref.config._attn_implementation
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma", "gemma2"])
def test_greedy_generation_matches(arch, cpu_user):
    ref = _model(arch).eval()
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kwargs)  # before apply (see the first test)
    model = copy.deepcopy(ref)
    _apply(model)
    assert torch.equal(model.generate(ids, **kwargs), want)


def test_num_items_in_batch_shift_labels_and_skip_logits(cpu_user):
    # Trainer's gradient accumulation passes num_items_in_batch: a sum over the tokens divided by it, as HF's loss
    ref = _model("llama")
    ids, labels, _ = _batch(False)
    n, shift = torch.tensor(37), torch.roll(labels, -1, dims=1)
    cases = [dict(num_items_in_batch=n), dict(shift_labels=shift), dict(logits_to_keep=torch.arange(13)), dict()]
    with torch.no_grad():
        want = [ref(ids, labels=labels, **kwargs).loss for kwargs in cases]  # before apply (see the first test)
    model = copy.deepcopy(ref)
    _apply(model)
    with torch.no_grad():
        for kwargs, loss in zip(cases[:3], want):
            assert err(model(ids, labels=labels, **kwargs).loss, loss) < TOL, kwargs
        out = model(ids, labels=labels, skip_logits=False)  # asked for: training returns the logits
    assert out.logits.shape == (2, 13, V) and err(out.loss, want[3]) < TOL


def test_compiles_to_one_graph(cpu_user):
    # No attention mask: the masked path under torch.compile belongs to attn_implementation="fasttrain"'s own tests.
    ref = _model("llama")
    ids, labels, _ = _batch(False)
    want = ref(input_ids=ids, labels=labels)  # before apply (see the first test)
    want.loss.backward()
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    _apply(model)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # the graph as traced, and its backward
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fasttrain")
        out = torch.compile(model, backend=counter, fullgraph=True)(input_ids=ids, labels=labels)
    out.loss.backward()
    assert counter.frame_count == 1 and counter.op_count > 0
    assert err(out.loss, want.loss) < TOL
    _assert_grads_close(_grads(model), _grads(ref))


def _trainer_losses(tmp_path, resume: bool = False, patched: bool = True, max_steps: int = 4):
    from fasttrain.optim import AdamW

    model = _model("llama", seed=3)
    if patched:
        _apply(model)
    g = torch.Generator().manual_seed(4)
    rows = [{"input_ids": (ids := torch.randint(1, V, (9,), generator=g)), "labels": ids.clone()} for _ in range(16)]
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        save_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=5,
        disable_tqdm=True,
    )
    opt = AdamW(model.parameters(), lr=1e-3)
    trainer = tf.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2") if resume else None)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_with_fasttrain_adamw_accumulation_and_resume(tmp_path, cpu_user):
    # The unpatched run first (see the first test). With gradient accumulation Trainer passes num_items_in_batch.
    want = _trainer_losses(tmp_path / "unpatched", patched=False)
    losses = _trainer_losses(tmp_path / "patched")
    assert len(losses) == 4 and losses == pytest.approx(want, rel=1e-5)
    resumed = _trainer_losses(tmp_path / "patched", resume=True)  # from checkpoint-2: steps 3 and 4 again
    assert resumed[-2:] == pytest.approx(losses[-2:], rel=1e-6)


def test_twice_applied_is_left_as_it_is_and_revert_restores_the_shared_rotary(cpu_user):
    modeling = sys.modules[type(_model("llama").model.layers[0].self_attn).__module__]
    original = modeling.apply_rotary_pos_emb
    a, b = _model("llama"), _model("llama", seed=1)
    patch = _apply(a)
    with pytest.warns(RuntimeWarning, match="already patched"):
        assert _apply(a) is patch
    _apply(b)
    assert modeling.apply_rotary_pos_emb is not original
    revert(a)  # b still runs fasttrain's rotary
    assert modeling.apply_rotary_pos_emb is not original
    revert(b)
    assert modeling.apply_rotary_pos_emb is original
    with pytest.raises(ValueError, match="not patched"):
        revert(b)


def test_a_peft_lora_model_patched_through_its_base_model(cpu_user):
    ref = _peft(_model("llama"))
    ids, labels, _ = _batch(False)
    want = ref(input_ids=ids, labels=labels)  # before apply (see the first test)
    want.loss.backward()
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    patch = _apply(model.get_base_model())
    assert set(patch.patched) == {"attention", "norms", "rotary", "mlp", "loss"}
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None and err(out.loss, want.loss) < TOL
    _assert_grads_close(_grads(model), _grads(ref))  # the adapters' gradients only
    assert all("lora_" in name for name in _grads(model))


def test_parts_can_be_turned_off(cpu_user):
    model = _model("llama")
    patch = _apply(model, attention=False, loss=False, rotary=False)
    assert set(patch.patched) == {"norms", "mlp"} and model.config._attn_implementation != "fasttrain"
    revert(model)


def test_unsupported_architecture_and_best_effort():
    cfg = tf.PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    model = tf.PhiForCausalLM(cfg)
    with pytest.raises(ValueError, match="model_type 'phi' is not supported; supported: GPT-2 .*Llama"):
        apply(model)
    assert hf_modules.HANDLE not in model.__dict__
    with pytest.warns(RuntimeWarning, match="not among"):
        patch = apply(model, strict=False)
    assert "norms" in patch.patched and "loss" in patch.patched
    _PATCHED_MODELS.append(model)


def test_a_module_the_probe_does_not_confirm():
    model = _model("llama")
    model.model.layers[0].mlp.act_fn = torch.nn.ReLU()  # a gated MLP of another activation
    with pytest.raises(ValueError, match=r"model.layers.0.mlp \(LlamaMLP\): activation is not SiLU or GELU-tanh"):
        apply(model)
    assert all("forward" not in m.__dict__ for m in model.modules())  # strict: nothing stays patched
    with pytest.warns(RuntimeWarning, match="left unpatched: model.layers.0.mlp"):
        patch = apply(model, strict=False)
    assert patch.patched["mlp"] == ["model.layers.1.mlp"]
    _PATCHED_MODELS.append(model)


def _peft(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: apply(torch.nn.Linear(2, 2)), TypeError, "model must be a transformers PreTrainedModel"),
        (lambda: apply(_peft(_model("llama"))), TypeError, r"for a PEFT model, its get_base_model\(\)"),
        (lambda: apply(_model("llama"), norms=1), TypeError, "norms must be a bool"),
        (lambda: hf_apply.apply_to_llama(_model("gpt2")), ValueError, "must be a Llama model, got 'gpt2'"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_within_twice_the_unpatched_error(device, cpu_user):
    # bf16 weights: the patched model's loss and gradients at most twice as far from the float64 model's as the
    # unpatched bf16 model's
    ref = _model("llama").to(device)
    ids, labels, _ = (t if t is None else t.to(device) for t in _batch(False))
    out = {}
    for name, dtype, patched in (
        ("want", torch.float64, False),
        ("torch", torch.bfloat16, False),
        ("ours", torch.bfloat16, True),
    ):
        model = copy.deepcopy(ref).to(dtype)
        if patched:
            _apply(model)
        loss = model(ids, labels=labels).loss
        loss.backward()
        out[name] = loss.detach(), _grads(model)
    # The loss is a float32 mean over 26 tokens of bf16 logits: both models' errors (measured 1.0e-4 ours, 4.7e-5
    # torch's) are far under one bf16 ulp of its value (0.03); the slack, 1e-3, is a thirtieth of that.
    assert_within_2x_torch(out["ours"][0], out["torch"][0], out["want"][0], slack=1e-3, what="loss")
    for name, want in out["want"][1].items():
        assert_within_2x_torch(out["ours"][1][name], out["torch"][1][name], want, what=name)


def test_the_hf_module_exports_the_apply_functions():
    from fasttrain.integrations import hf

    assert set(hf_apply.__all__) <= set(hf.__all__) and hf.apply is hf_apply.apply and hf.apply_to_llama
    assert {"NAME", "fasttrain_attention_forward", "fasttrain_mask"} <= set(hf.__all__)
