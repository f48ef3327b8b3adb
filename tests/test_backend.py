"""The backend table and its chooser, the extension loader, and `fasttrain info`."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

import fasttrain.ops
from fasttrain import _backend, _extension
from fasttrain._backend import Backend, BackendError, NotForDevice, Table
from fasttrain.flash_attn.layers.rotary import apply_rotary_emb_torch


def choose(op: str, reasons: dict, backend: str | None = None) -> str:
    """Table.choose over a table of fixed reasons (a fresh table per call: its warnings are its own)."""
    table = Table(op, {name: Backend(lambda why=why: why) for name, why in reasons.items()})
    del _backend._tables[op]  # not an op of fasttrain's: `fasttrain info` should not list it
    return table.choose(backend=backend)


def test_the_installed_extension_loads():
    # CI builds fasttrain._C from scratch: a silently missing build would turn every native test into a fallback.
    assert _extension.available(), _extension.why_unavailable()
    assert hasattr(torch.ops.fasttrain, "adamw_step_")


def test_auto_takes_the_first_backend_that_can_serve(monkeypatch):
    monkeypatch.delenv("FASTTRAIN_BACKEND", raising=False)
    assert choose("op_a", {"cuda": "no GPU", "cpu": None, "reference": None}) == "cpu"


def test_falling_back_to_reference_warns_once_with_the_reasons(monkeypatch):
    monkeypatch.delenv("FASTTRAIN_BACKEND", raising=False)
    table = Table("op_warn", {"triton": Backend(lambda x: x), "reference": Backend(_backend.always)})
    del _backend._tables["op_warn"]
    with pytest.warns(RuntimeWarning, match="op_warn runs on the reference backend.*head_dim 40"):
        assert table.choose("head_dim 40 is not supported") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.choose("head_dim 40 is not supported") == "reference"  # once per (op, reasons)
    with pytest.warns(RuntimeWarning, match="head_dim 48"):  # other reasons warn again
        assert table.choose("head_dim 48 is not supported") == "reference"


def test_a_backend_not_meant_for_the_device_is_no_fallback_worth_a_warning(monkeypatch):
    monkeypatch.delenv("FASTTRAIN_BACKEND", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            choose("op_quiet", {"triton": NotForDevice("CPU tensors need the interpreter"), "reference": None})
            == "reference"
        )


def test_no_reason_is_built_in_a_call_so_that_a_trace_never_breaks_on_one(monkeypatch):
    """torch.compile traces the backend choice, and Dynamo under torch 2.11 cannot trace str.__new__: a NotForDevice
    built per call would break the graph at every op. The reasons returned for CUDA tensors and CPU ones are module
    constants, and the triton import check is a constant to a trace (no functools.cache wrapper,
    which Dynamo warned about at each compile)."""
    from fasttrain.ops import flash_attn_func, gelu, layer_norm

    def refuse(cls, *args):
        raise AssertionError(f"NotForDevice{args} built in a call")

    monkeypatch.setattr(NotForDevice, "__new__", refuse)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTTRAIN_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _backend.triton_reason(cuda) is None and _backend.triton_reason(cpu) is _backend.NEEDS_INTERPRETER
    assert _backend.cpu_extension_reason(cuda) is _backend.CPU_TAKES_CPU
    assert _backend.cpu_kernel_reason(torch.empty(2, device="meta"), None) is _backend.CPU_TAKES_CPU
    assert _backend.cuda_extension_reason(cpu) is _backend.CUDA_TAKES_CUDA
    assert getattr(_backend._triton_import_error, "_dynamo_marked_constant", False)
    x, q = torch.randn(4, 32), torch.randn(1, 8, 2, 16)

    def ops(x, q):
        return gelu(x).sum() + layer_norm(x, (32,)).sum() + flash_attn_func(q, q, q, causal=True).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lru_cache warning, had a cached function stayed on the traced path
        torch.testing.assert_close(torch.compile(ops, fullgraph=True, backend="eager")(x, q), ops(x, q))


def test_a_named_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.delenv("FASTTRAIN_BACKEND", raising=False)
    with pytest.raises(BackendError, match="backend='cpu' cannot serve these inputs: dtype float64"):
        choose("op_b", {"cpu": "dtype float64", "reference": None}, backend="cpu")
    with pytest.raises(BackendError, match="has no 'triton' backend"):
        choose("op_b", {"cpu": None, "reference": None}, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose("op_b", {"reference": None}, backend="fast")


def test_the_environment_forces_a_backend_where_the_op_has_it(monkeypatch):
    monkeypatch.setenv("FASTTRAIN_BACKEND", "reference")
    assert choose("op_c", {"cpu": None, "reference": None}) == "reference"
    monkeypatch.setenv("FASTTRAIN_BACKEND", "cpu")
    with pytest.raises(BackendError, match="FASTTRAIN_BACKEND='cpu' cannot serve"):
        choose("op_c", {"cpu": "extension missing", "reference": None})
    monkeypatch.setenv("FASTTRAIN_BACKEND", "triton")  # an op without triton keeps choosing automatically
    assert choose("op_c", {"cpu": None, "reference": None}) == "cpu"
    monkeypatch.setenv("FASTTRAIN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTTRAIN_BACKEND must be one of"):
        choose("op_c", {"reference": None})


def test_forced_reads_the_environment_as_it_is_at_each_call(monkeypatch):
    # the short paths' cheap read of FASTTRAIN_BACKEND: set, changed or removed at run time, it takes effect at once
    monkeypatch.delenv("FASTTRAIN_BACKEND", raising=False)
    assert not _backend.forced()
    monkeypatch.setenv("FASTTRAIN_BACKEND", "reference")
    assert _backend.forced()
    monkeypatch.setenv("FASTTRAIN_BACKEND", "auto")
    assert not _backend.forced()
    monkeypatch.setenv("FASTTRAIN_BACKEND", "bogus")  # forced: choose then raises on the name
    assert _backend.forced()
    monkeypatch.delenv("FASTTRAIN_BACKEND")
    assert not _backend.forced()


def test_a_broken_extension_never_breaks_import_and_ops_fall_back():
    # A fresh interpreter in which importing fasttrain._C fails, as with a build against another torch.
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["fasttrain._C"] = None  # makes `import fasttrain._C` raise ImportError
        import torch, fasttrain
        from fasttrain.optim import AdamW
        from fasttrain.info import report
        p = torch.nn.Parameter(torch.randn(10))
        p.grad = torch.randn(10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            AdamW([p], lr=0.1).step()
            AdamW([p], lr=0.1).step()
        messages = [str(w.message) for w in caught if "reference backend" in str(w.message)]
        assert len(messages) == 1, messages
        assert "fasttrain._C failed to import" in messages[0], messages[0]
        text = report()
        assert "extension: unavailable: fasttrain._C failed to import" in text, text
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_info_lists_every_op_and_its_backends():
    from fasttrain.info import report

    text = report()
    for op in ("adamw", "attention", "flash_attn_with_kvcache"):
        assert f"  {op}" in text, text
    assert "reference  live" in text and f"torch {torch.__version__}" in text


def test_liveness_probes_name_a_reason_for_every_backend_that_is_off():
    for op, backends in _backend.liveness().items():
        assert backends.get("reference", "missing") is None, op
        for name, why in backends.items():
            assert why is None or (isinstance(why, str) and why), (op, name)


def _sdpa(x):
    q = x.view(1, 2, 4, 8)  # (B, H, T, E)
    return q, q.detach().flip(2), q.detach() * 2


def _math_sdpa(*args, **kwargs):
    """torch's SDPA on its math backend, the one with a forward derivative on the CPU."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


FORWARD_AD_CASES = {
    "scaled_dot_product_attention": (
        lambda x: fasttrain.ops.scaled_dot_product_attention(*_sdpa(x), is_causal=True),
        lambda x: _math_sdpa(*_sdpa(x), is_causal=True),
    ),
    "swiglu": (
        lambda x: fasttrain.ops.swiglu(x[:, :4], x[:, 4:]),
        lambda x: torch.nn.functional.silu(x[:, :4]) * x[:, 4:],
    ),
    "rotary": (
        lambda x: fasttrain.ops.apply_rotary_emb(x.view(1, 8, 1, 8), *ROTARY),
        lambda x: apply_rotary_emb_torch(x.view(1, 8, 1, 8), *ROTARY),
    ),
}
ROTARY = torch.randn(2, 8, 4).unbind(0)  # cos, sin (T, rotary_dim / 2)


# torch's own forward derivatives of some decomposed ops script their decompositions, which warns in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("op", sorted(FORWARD_AD_CASES))
def test_forward_mode_ad_takes_the_reference_whose_tangent_is_torchs(op):
    """The kernels' autograd is backward-only, and a custom op without a forward derivative returns no tangent without
    an error: under forward-mode AD the choice is the reference's plain PyTorch, whose tangent is torch's own; a
    backend asked for by name refuses (BackendError) rather than drop it."""
    ours, torchs = FORWARD_AD_CASES[op]
    x, tangent = torch.randn(2, 8, 8).unbind(0)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tangent)))
        want = forward_ad.unpack_dual(torchs(forward_ad.make_dual(x, tangent)))
    assert got.tangent is not None
    torch.testing.assert_close(got.primal, want.primal)
    torch.testing.assert_close(got.tangent, want.tangent)
    with forward_ad.dual_level(), pytest.raises(BackendError, match="forward-mode AD tangent"):
        fasttrain.ops.flash_attn_func(*(forward_ad.make_dual(x, tangent).view(1, 8, 1, 8),) * 3, backend="cpu")
