"""flash-attn's `flash_attn.modules.mlp`, `.block` and `.embedding` (fasttrain.flash_attn.modules): Mlp, GatedMlp,
Block (prenorm and postnorm, fused and unfused add + norm) and the embeddings against the same computation written
out here in float64 from the modules' own weights, the residual stream's values and dtypes, dropout and stochastic
depth only in training, flash-attn's state_dict names and shapes (from its source), and the errors."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.flash_attn.modules.block import Block, ParallelBlock
from fasttrain.flash_attn.modules.embedding import BertEmbeddings, GPT2Embeddings
from fasttrain.flash_attn.modules.mha import MHA
from fasttrain.flash_attn.modules.mlp import GatedMlp, Mlp
from fasttrain.flash_attn.ops.triton.layer_norm import RMSNorm

from helpers import randn

pytestmark = pytest.mark.usefixtures("cpu_user")

D, H = 64, 4
TOL = 4e-6  # fp32 modules against float64: two projections, attention and two norms (measured worst 8.1e-7)


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _p(module, name) -> torch.Tensor:
    return dict(module.named_parameters())[name].detach().double()


def _linear(module, prefix, x):
    bias = dict(module.named_parameters()).get(f"{prefix}.bias")
    return F.linear(x, _p(module, f"{prefix}.weight"), None if bias is None else bias.detach().double())


def _mha_ref(mha, x):
    """x (B, T, D) float64 through mha's weights: causal softmax attention."""
    B, T, _ = x.shape
    qkv = _linear(mha, "Wqkv", x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # -> (3, B, H, T, d)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
    return _linear(mha, "out_proj", out.transpose(1, 2).reshape(B, T, D))  # (B, H, T, d) -> (B, T, D)


def _norm_ref(norm, x):
    w = norm.weight.detach().double()
    if isinstance(norm, RMSNorm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, norm.bias.detach().double(), norm.eps)


def _mlp_ref(mlp, x):
    return _linear(mlp, "fc2", F.gelu(_linear(mlp, "fc1", x), approximate="tanh"))


def _block(norm_cls=nn.LayerNorm, return_residual=False, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("mixer_cls", partial(MHA, num_heads=H, causal=True, return_residual=return_residual))
    tanh_gelu = partial(F.gelu, approximate="tanh")
    kwargs.setdefault("mlp_cls", partial(Mlp, activation=tanh_gelu, return_residual=return_residual))
    block = Block(D, norm_cls=norm_cls, return_residual=return_residual, **kwargs)
    with torch.no_grad():  # norms away from 1 and 0, so that a missed weight or bias shows
        for name, p in block.named_parameters():
            if name.startswith("norm"):
                p.copy_(torch.rand_like(p) + 0.5)
    return block.eval()


# ---- Mlp, GatedMlp ---------------------------------------------------------------------------------------------------


def test_mlp_state_dicts_are_flash_attns():
    assert _shapes(Mlp(D)) == {"fc1.weight": (256, 64), "fc1.bias": (256,), "fc2.weight": (64, 256), "fc2.bias": (64,)}
    assert _shapes(Mlp(D, 100, 32, bias1=False, bias2=False)) == {"fc1.weight": (100, 64), "fc2.weight": (32, 100)}
    # hidden int(8 * 64 / 3) = 170, rounded up to 256; 266 kept with multiple_of=1; 200 rounded up to 256
    assert _shapes(GatedMlp(D)) == {
        "fc1.weight": (512, 64),
        "fc1.bias": (512,),
        "fc2.weight": (64, 256),
        "fc2.bias": (64,),
    }
    assert _shapes(GatedMlp(100, multiple_of=1, bias1=False))["fc1.weight"] == (532, 100)
    assert _shapes(GatedMlp(D, hidden_features=200, out_features=8))["fc2.weight"] == (8, 256)
    assert Mlp(D).activation is F.gelu and GatedMlp(D).activation is F.sigmoid


@pytest.mark.parametrize(
    "activation",
    [F.gelu, partial(F.gelu, approximate="tanh"), F.relu],
    ids=["gelu", "gelu_tanh", "relu"],
)
def test_mlp_matches_torch(activation):
    torch.manual_seed(0)
    mlp = Mlp(D, 96, 48, activation=activation, return_residual=True)
    x = torch.randn(2, 97, D)
    y, res = mlp(x)
    assert res is x and y.shape == (2, 97, 48) and y.dtype == torch.float32
    want = _linear(mlp, "fc2", activation(_linear(mlp, "fc1", x.double())))
    torch.testing.assert_close(y.double(), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("activation", [F.sigmoid, F.silu, F.relu], ids=["glu", "swiglu", "relu"])
def test_gated_mlp_matches_torch(activation):
    torch.manual_seed(0)
    mlp = GatedMlp(D, activation=activation)
    x = torch.randn(1, 1, D, requires_grad=True)
    y = mlp(x)
    h = _linear(mlp, "fc1", x.detach().double())
    want = _linear(mlp, "fc2", h[..., :256] * activation(h[..., 256:]))  # fc1's first half gated by the second
    torch.testing.assert_close(y.double(), want, atol=TOL, rtol=0)
    if activation is F.sigmoid:
        torch.testing.assert_close(y.double(), _linear(mlp, "fc2", F.glu(h, dim=-1)), atol=TOL, rtol=0)
    y.sum().backward()
    assert mlp.fc1.weight.grad is not None and x.grad.shape == x.shape


# ---- Block -----------------------------------------------------------------------------------------------------------


def test_block_state_dict_is_flash_attns():
    block = Block(D, partial(MHA, num_heads=H), partial(Mlp, hidden_features=128), norm_cls=RMSNorm)
    assert _shapes(block) == {
        "mixer.Wqkv.weight": (192, 64),
        "mixer.Wqkv.bias": (192,),
        "mixer.out_proj.weight": (64, 64),
        "mixer.out_proj.bias": (64,),
        "norm1.weight": (64,),
        "mlp.fc1.weight": (128, 64),
        "mlp.fc1.bias": (128,),
        "mlp.fc2.weight": (64, 128),
        "mlp.fc2.bias": (64,),
        "norm2.weight": (64,),
    }
    # defaults: MHA with dim // 64 heads, Mlp 4 * dim wide; mlp_cls giving nn.Identity drops norm2 and dropout2
    default = Block(128)
    assert default.mixer.num_heads == 2 and default.mlp.fc1.weight.shape == (512, 128)
    assert sorted(_shapes(Block(D, mlp_cls=lambda dim: nn.Identity()))) == [
        "mixer.Wqkv.bias",
        "mixer.Wqkv.weight",
        "mixer.out_proj.bias",
        "mixer.out_proj.weight",
        "norm1.bias",
        "norm1.weight",
    ]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, RMSNorm], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 97)])
def test_prenorm_block_matches_reference(fused, norm_cls, B, T):
    block = _block(norm_cls, fused_dropout_add_ln=fused, resid_dropout1=0.3, drop_path2=0.5)  # eval: no dropout
    x, residual = torch.randn(B, T, D), torch.randn(B, T, D)
    for res in (None, residual):
        hidden, res_out = block(x, res)
        r = x.double() if res is None else x.double() + res.double()
        r = _mha_ref(block.mixer, _norm_ref(block.norm1, r)) + r
        torch.testing.assert_close(res_out.double(), r, atol=TOL, rtol=0)
        torch.testing.assert_close(hidden.double(), _mlp_ref(block.mlp, _norm_ref(block.norm2, r)), atol=TOL, rtol=0)
        assert hidden.dtype == res_out.dtype == torch.float32


@pytest.mark.parametrize("prenorm", [True, False], ids=["prenorm", "postnorm"])
def test_fused_block_gradients_are_the_unfused(prenorm):
    x, residual = randn(2, 9, D), randn(2, 9, D, seed=1)
    results = []
    for fused in (False, True):
        block = _block(RMSNorm, prenorm=prenorm, fused_dropout_add_ln=fused)
        out = block(x, residual) if prenorm else block(x)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in (out if prenorm else (out,)))
        inputs = [x, residual, *block.parameters()] if prenorm else [x, *block.parameters()]
        results.append(torch.autograd.grad(loss, inputs))
    for unfused, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, unfused, atol=TOL, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("return_residual", [False, True])
def test_postnorm_block_matches_reference(fused, return_residual):
    block = _block(prenorm=False, fused_dropout_add_ln=fused, return_residual=return_residual)
    x = torch.randn(2, 97, D)
    out = block(x)
    h = _norm_ref(block.norm1, _mha_ref(block.mixer, x.double()) + x.double())
    want = _norm_ref(block.norm2, _mlp_ref(block.mlp, h) + h)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_prenorm_residual_dtype(fused, residual_in_fp32):
    block = _block(fused_dropout_add_ln=fused, residual_in_fp32=residual_in_fp32).to(torch.bfloat16)
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    hidden, residual = block(x)
    assert hidden.dtype == torch.bfloat16
    assert residual.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    hidden, residual = block(hidden, residual)  # the next block takes the fp32 stream as it is
    assert residual.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_dropout_and_drop_path_only_in_training(fused):
    # prenorm, residual None: the returned stream's first add is drop(x) alone, x all ones
    x = torch.ones(64, 3, D)
    block = _block(fused_dropout_add_ln=fused, resid_dropout1=0.5)
    torch.testing.assert_close(block(x)[1], block(x)[1])  # eval: the identity, twice the same
    block.train()
    block.mlp = nn.Identity()  # the stream after the first add, undisturbed by the second
    dropped = block(x)[1]
    assert set(dropped.unique().tolist()) == {0.0, 2.0}  # elements zeroed or scaled by 1 / (1 - p)
    block = _block(fused_dropout_add_ln=fused, drop_path1=0.5, mlp_cls=lambda dim: nn.Identity()).train()
    rows = block(x)[1].flatten(1)  # (64, 3 * D): whole batch rows zeroed or scaled by 2
    assert ((rows == 0).all(1) | (rows == 2).all(1)).all()
    assert 0 < (rows == 0).all(1).sum() < 64
    # drop_path 1: both branches dropped, the stream comes back as it went in
    block = _block(fused_dropout_add_ln=fused, drop_path1=1.0, drop_path2=1.0).train()
    residual = torch.randn(2, 3, D)
    torch.testing.assert_close(block(torch.randn(2, 3, D), residual)[1], residual)


def test_mixer_subset_and_kwargs():
    block = _block()
    block.mixer = MHA(D, H, cross_attn=True)
    x, residual, x_kv = torch.randn(2, 7, D), torch.randn(2, 7, D), torch.randn(2, 5, D)
    kwargs = {"x_kv": x_kv}
    hidden, res_out = block(x, residual, mixer_subset=slice(0, 1), mixer_kwargs=kwargs)
    assert hidden.shape == res_out.shape == (2, 1, D) and kwargs == {"x_kv": x_kv}
    torch.testing.assert_close(res_out[:, 0], (x + residual)[:, 0] + block.mixer(block.norm1(x + residual), x_kv)[:, 0])


def test_allocate_inference_cache_is_the_mixers():
    block = _block()
    cache = block.allocate_inference_cache(3, 16, dtype=torch.bfloat16)
    assert cache.shape == (3, 16, 2, H, D // H) and cache.dtype == torch.bfloat16


def _parallel_block(**kwargs):
    torch.manual_seed(0)
    block = ParallelBlock(
        D,
        partial(MHA, num_heads=H, causal=True),
        partial(Mlp, activation=partial(F.gelu, approximate="tanh")),
        **kwargs,
    )
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.startswith("norm"):
                p.copy_(torch.rand_like(p) + 0.5)
    return block.eval()


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("tied_norm", [False, True], ids=["norm2", "tied"])
@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, RMSNorm], ids=["layernorm", "rmsnorm"])
def test_parallel_block_matches_reference(fused, tied_norm, norm_cls):
    block = _parallel_block(norm_cls=norm_cls, tied_norm=tied_norm, fused_dropout_add_ln=fused, resid_dropout2=0.5)
    assert hasattr(block, "norm2") != tied_norm
    x1, x2, residual = torch.randn(2, 97, D), torch.randn(2, 97, D), torch.randn(2, 97, D)
    for args in ((x1,), (x1, x2), (x1, x2, residual), (x1, None, residual)):
        out1, out2, res_out = block(*args)
        r = sum(a.double() for a in args if a is not None)
        torch.testing.assert_close(res_out.double(), r, atol=TOL, rtol=0)
        norm2 = block.norm1 if tied_norm else block.norm2
        torch.testing.assert_close(out1.double(), _mha_ref(block.mixer, _norm_ref(block.norm1, r)), atol=TOL, rtol=0)
        torch.testing.assert_close(out2.double(), _mlp_ref(block.mlp, _norm_ref(norm2, r)), atol=TOL, rtol=0)
    block = _parallel_block(fused_dropout_add_ln=fused, residual_in_fp32=True).to(torch.bfloat16)
    out1, out2, res_out = block(x1.bfloat16(), x2.bfloat16())
    assert out1.dtype == out2.dtype == torch.bfloat16 and res_out.dtype == torch.float32


def test_parallel_block_state_dict_and_errors():
    block = ParallelBlock(D, partial(MHA, num_heads=H), partial(Mlp, hidden_features=128), norm_cls=RMSNorm)
    assert sorted(_shapes(block)) == [
        "mixer.Wqkv.bias",
        "mixer.Wqkv.weight",
        "mixer.out_proj.bias",
        "mixer.out_proj.weight",
        "mlp.fc1.bias",
        "mlp.fc1.weight",
        "mlp.fc2.bias",
        "mlp.fc2.weight",
        "norm1.weight",
        "norm2.weight",
    ]
    assert block.allocate_inference_cache(1, 4).shape == (1, 4, 2, H, D // H)
    with pytest.raises(ValueError, match="ParallelBlock: sequence_parallel"):
        ParallelBlock(D, sequence_parallel=True)
    with pytest.raises(ValueError, match="fused_dropout_add_ln.*norm_cls"):
        ParallelBlock(D, norm_cls=lambda dim: nn.GroupNorm(1, dim), fused_dropout_add_ln=True)


def test_block_errors_name_the_argument():
    with pytest.raises(ValueError, match="residual_in_fp32"):
        Block(D, prenorm=False, residual_in_fp32=True)
    for arg in ("sequence_parallel", "mark_shared_params"):
        with pytest.raises(ValueError, match=arg):
            Block(D, **{arg: True})
    with pytest.raises(ValueError, match="drop_path2"):
        Block(D, drop_path2=1.5)
    with pytest.raises(ValueError, match="fused_dropout_add_ln.*norm_cls"):
        Block(D, norm_cls=lambda dim: nn.GroupNorm(1, dim), fused_dropout_add_ln=True)
    with pytest.raises(ValueError, match="fused_dropout_add_ln.*dropout_cls"):
        Block(D, dropout_cls=lambda p: nn.Identity(), fused_dropout_add_ln=True)
    with pytest.raises(ValueError, match="residual"):
        _block(prenorm=False)(torch.randn(1, 2, D), torch.randn(1, 2, D))
    with pytest.raises(ValueError, match="hidden_features"):
        Mlp(D, hidden_features=0)
    with pytest.raises(ValueError, match="multiple_of"):
        GatedMlp(D, multiple_of=0)


# ---- embeddings ------------------------------------------------------------------------------------------------------


def test_gpt2_embeddings():
    torch.manual_seed(0)
    emb = GPT2Embeddings(D, 50, 16, word_embed_proj_dim=32)
    assert _shapes(emb) == {
        "word_embeddings.weight": (50, 32),
        "project_in.weight": (64, 32),
        "position_embeddings.weight": (16, 64),
    }
    ids = torch.randint(0, 50, (2, 9))
    want = emb.word_embeddings.weight[ids] @ emb.project_in.weight.T + emb.position_embeddings.weight[:9]
    torch.testing.assert_close(emb(ids), want)
    positions = torch.randint(0, 16, (2, 9))
    plain = GPT2Embeddings(D, 50, 0, padding_idx=0)
    assert _shapes(plain) == {"word_embeddings.weight": (50, 64)} and plain.project_in is None
    torch.testing.assert_close(plain(ids, positions), plain.word_embeddings.weight[ids])
    with pytest.raises(ValueError, match="input_ids"):
        plain(ids.float())


def test_bert_embeddings():
    torch.manual_seed(0)
    emb = BertEmbeddings(D, 50, 16, 2)
    assert sorted(_shapes(emb).items()) == [
        ("position_embeddings.weight", (16, 64)),
        ("token_type_embeddings.weight", (2, 64)),
        ("word_embeddings.weight", (50, 64)),
    ]
    ids, types = torch.randint(0, 50, (2, 9)), torch.randint(0, 2, (2, 9))
    w, p, t = emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight
    torch.testing.assert_close(emb(ids), w[ids] + p[:9] + t[0])
    torch.testing.assert_close(emb(ids, token_type_ids=types), w[ids] + p[:9] + t[types])
    with pytest.raises(ValueError, match="token_type_ids"):
        emb(ids, token_type_ids=types.float())


def test_bf16_rounds_as_flash_attns_glu_and_parallel_residual():
    # GLU through F.glu (one rounding), and ParallelBlock's residual added as (residual + dropped1) + dropped2
    x = torch.randn(4, 33, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    mlp = GatedMlp(16, 32, multiple_of=8).to(torch.bfloat16)
    assert torch.equal(mlp(x), mlp.fc2(F.glu(mlp.fc1(x), dim=-1)))
    block = ParallelBlock(64, mixer_cls=lambda d: nn.Identity(), mlp_cls=lambda d: nn.Identity(), tied_norm=True)
    block = block.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    h1, h2, r = (torch.randn(8, 33, 64, dtype=torch.bfloat16, generator=g) * s for s in (1, 1, 30))
    assert torch.equal(block(h1, h2, r)[2], r + h1 + h2)
