"""fasttrain.optim.AdamW against torch.optim.AdamW: parity over 100 steps, state_dict both ways, fused clipping,
GradScaler, torch's errors. CPU tests run the C++ kernel ("cpu") and the reference; `-m gpu` tests run the CUDA kernel.
"""

import copy

import pytest
import torch

from fasttrain import _extension
from fasttrain.optim import AdamW

# Awkward sizes: one element, one short of a power of two, one past a 64K chunk, multi-dimensional, non-contiguous.
SHAPES = [(1,), (1023,), (65537,), (7, 13, 5), (33, 17)]
STEPS = 100
FP32_RTOL = 1e-6  # max |ours - torch| over a tensor, relative to max |torch| of that tensor

needs_ext = pytest.mark.skipif(not _extension.available(), reason="fasttrain._C not built")
CPU_BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


def make_params(device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in SHAPES]
    params[-1] = params[-1].t()  # (17, 33) with strides (1, 17): dense but not contiguous
    return [p.requires_grad_() for p in params]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]  # clone keeps the transposed strides


def groups(params, lr, tensor_lr):
    """Three groups with different lr, weight decay (0 included) and a tensor lr."""
    return [
        {"params": params[:2], "weight_decay": 0.0},
        {"params": params[2:4], "lr": torch.tensor(3e-3) if tensor_lr else 3e-3, "weight_decay": 0.1},
        {"params": params[4:]},
    ]


def set_grads(param_lists, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(param_lists[0])):
        g = torch.randn(param_lists[0][i].shape, generator=gen) * scale
        for params in param_lists:
            # empty_like keeps the param's strides (the transposed one too), as autograd's grads do; torch's fused
            # AdamW refuses a grad laid out unlike its param.
            params[i].grad = torch.empty_like(params[i]).copy_(g)


def assert_tensor_close(ours, ref, rtol, what, atol=0.0):
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max abs diff {err:.3g} > {rtol} x max |ref| {scale:.3g} + {atol:.3g}"


def assert_states_close(opt, ref_opt, params, ref_params, rtol=FP32_RTOL, exact=False, atol=0.0):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        pairs = [(p, q, "param")] + [(opt.state[p][k], ref_opt.state[q][k], k) for k in ref_opt.state[q] if k != "step"]
        for a, b, name in pairs:
            if exact:
                assert torch.equal(a, b), f"{name} of param {i} {tuple(p.shape)} differs from torch"
            else:
                assert_tensor_close(a, b, rtol, f"{name} of param {i} {tuple(p.shape)}", atol)
        assert opt.state[p]["step"].item() == ref_opt.state[q]["step"].item()


def assert_low_precision_within_2x_torch_fused(device, dtype, steps):
    """Ours in dtype is no further from an fp32 run than torch's fused AdamW in dtype is (both do fp32 math)."""
    p32, ours, torch_fused = (
        [p.detach().to(device, dt).requires_grad_() for p in make_params()] for dt in (torch.float32, dtype, dtype)
    )
    opts = [
        torch.optim.AdamW(p32, lr=1e-2, foreach=False),
        AdamW(ours, lr=1e-2, backend=device),
        torch.optim.AdamW(torch_fused, lr=1e-2, fused=True),
    ]
    for step in range(steps):
        set_grads([p32, ours, torch_fused], seed=step)
        for o in opts:
            o.step()
    for p, q, r in zip(ours, torch_fused, p32):
        err_ours = (p.float() - r).abs().max().item()
        err_torch = (q.float() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6, (dtype, tuple(p.shape), err_ours, err_torch)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "amsgrad,maximize,tensor_lr",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
)
def test_parity_with_torch_100_steps(backend, amsgrad, maximize, tensor_lr):
    params, ref_params = make_params(), make_params()
    opt = AdamW(
        groups(params, 1e-3, tensor_lr), lr=1e-3, betas=(0.9, 0.95), amsgrad=amsgrad, maximize=maximize, backend=backend
    )
    ref = torch.optim.AdamW(
        groups(ref_params, 1e-3, tensor_lr),
        lr=1e-3,
        betas=(0.9, 0.95),
        amsgrad=amsgrad,
        maximize=maximize,
        foreach=False,
    )
    for step in range(STEPS):
        set_grads([params, ref_params], seed=step)
        opt.step()
        ref.step()
    # The reference is torch's op sequence, bit for bit; the C++ kernel differs only where torch's vectorized sqrt
    # is not correctly rounded (1 ulp in ~20% of elements, measured), which the relative tolerance covers.
    assert_states_close(opt, ref, params, ref_params, exact=backend == "reference")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_params_without_grad_are_untouched(backend):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = AdamW(params, backend=backend)
    set_grads([params[:2]], seed=0)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params[2:], before[2:]))
    assert all(len(opt.state[p]) == 0 for p in params[2:])
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip(backend, direction):
    """Train 5 steps with one optimizer, load its state_dict into the other, train 5 more: same as 10 with torch."""
    make = {
        "ours": lambda p: AdamW(groups(p, 1e-3, False), lr=1e-3, amsgrad=True, backend=backend),
        "torch": lambda p: torch.optim.AdamW(groups(p, 1e-3, False), lr=1e-3, amsgrad=True, foreach=False),
    }
    first, second = direction.split("_to_")
    params, ref_params = make_params(), make_params()
    ref = make["torch"](ref_params)
    opt = make[first](params)
    for step in range(10):
        if step == 5:
            saved = copy.deepcopy(opt.state_dict())
            opt = make[second](params)
            opt.load_state_dict(saved)
        set_grads([params, ref_params], seed=step)
        opt.step()
        ref.step()
    assert_states_close(opt, ref, params, ref_params)
    assert set(opt.state_dict()["param_groups"][0]) >= set(ref.state_dict()["param_groups"][0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e4])  # clipping active, and a bound above the norm (coefficient 1)
def test_fused_clipping_equals_clip_grad_norm(backend, max_norm):
    params, ref_params = make_params(), make_params()
    opt = AdamW(params, lr=1e-2, max_grad_norm=max_norm, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    for step in range(20):
        set_grads([params, ref_params], seed=step, scale=3.0)
        norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        opt.step()
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
    assert_states_close(opt, ref, params, ref_params, rtol=2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_norm_skips_the_step_instead_of_clipping_by_it(backend, bad):
    params = make_params()
    opt = AdamW(params, lr=1e-2, max_grad_norm=1.0, backend=backend)
    set_grads([params], seed=0, scale=3.0)
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    set_grads([params], seed=1, scale=3.0)
    params[1].grad[3] = bad
    opt.step()
    assert not torch.isfinite(opt.last_grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a non-finite norm must not touch params"
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(params, moments))
    assert opt.state[params[0]]["step"].item() == 1
    set_grads([params], seed=2, scale=3.0)  # the next finite step goes on as usual
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_with_inf_step(backend):
    """GradScaler.step hands our optimizer scale and found_inf; a step with an inf gradient changes nothing."""
    params, ref_params = make_params(), make_params()
    opt = AdamW(params, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3) for _ in range(2)]
    for step in range(12):
        for s in scalers:
            s.scale(torch.ones(()))  # what scaler.scale(loss) does first: creates the scale on the device
        scale = scalers[0].get_scale()
        set_grads([params, ref_params], seed=step, scale=scale)
        if step == 4:
            params[2].grad[7] = float("inf")
            ref_params[2].grad[7] = float("inf")
            before = [p.detach().clone() for p in params]
        for s, o in zip(scalers, (opt, ref)):
            s.step(o)
            s.update()
        if step == 4:
            assert all(torch.equal(p, b) for p, b in zip(params, before)), "the inf step must not touch params"
            assert opt.state[params[0]]["step"].item() == 4
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert_states_close(opt, ref, params, ref_params, rtol=2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_with_clipping_unscales_the_norm(backend):
    params, ref_params = make_params(), make_params()
    opt = AdamW(params, lr=1e-2, max_grad_norm=0.5, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    set_grads([params], seed=0, scale=256.0)
    set_grads([ref_params], seed=0)
    opt.grad_scale, opt.found_inf = torch.tensor(256.0), torch.tensor(0.0)
    opt.step()
    norm = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    ref.step()
    torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
    assert_states_close(opt, ref, params, ref_params, rtol=2e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu_within_2x_torch_fused(dtype):
    """bf16/fp16 params with fp32 math: no further from an fp32 run than torch's fused CPU AdamW is."""
    assert_low_precision_within_2x_torch_fused("cpu", dtype, steps=20)


@needs_ext
def test_grad_sumsq_op_matches_torch():
    grads = [torch.randn(s) for s in [(1,), (65537,), (3, 1000), (0,)]]
    got = torch.ops.fasttrain.adamw_grad_sumsq(grads)
    want = sum(g.double().square().sum() for g in grads)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


TORCH_ERRORS = [
    (dict(lr=-1e-3), ValueError, "Invalid learning rate"),
    (dict(eps=-1.0), ValueError, "Invalid epsilon value"),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be 1-element"),
    (dict(betas=(0.9, torch.tensor(0.99))), ValueError, "betas must be either both floats or both Tensors"),
]


@pytest.mark.parametrize("kwargs,error,message", TORCH_ERRORS)
def test_bad_hyperparameters_raise_torchs_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        torch.optim.AdamW([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(error, match=message):
        AdamW([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(error, match=message):  # the same checks for a group added later
        AdamW([torch.zeros(2, requires_grad=True)]).add_param_group({"params": [torch.zeros(1)], **kwargs})


@pytest.mark.parametrize(
    "params,error,message",
    [
        ([], ValueError, "empty parameter list"),
        (torch.zeros(2, requires_grad=True), TypeError, "iterable of Tensors or dicts"),
        ([torch.zeros(2, requires_grad=True) * 2], ValueError, "can't optimize a non-leaf Tensor"),
    ],
)
def test_bad_params_raise_torchs_error(params, error, message):
    with pytest.raises(error, match=message):
        torch.optim.AdamW(params)
    with pytest.raises(error, match=message):
        AdamW(params)


def test_complex_and_integer_params_raise():
    for dtype in (torch.complex64, torch.int64):
        with pytest.raises(TypeError, match="floating point parameters"):
            AdamW([torch.zeros(2, dtype=dtype)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_grad_raises_torchs_error(backend):
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        AdamW([p], backend=backend).step()


def test_bad_extras_raise():
    p = [torch.zeros(2, requires_grad=True)]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
            AdamW(p, max_grad_norm=bad)
    with pytest.raises(TypeError, match="max_grad_norm must be a positive number or None, got str"):
        AdamW(p, max_grad_norm="1")
    with pytest.raises(ValueError, match="backend must be one of"):
        AdamW(p, backend="gpu")
    for name in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{name}=True is not supported"):
            AdamW(p, **{name: True})


def test_takes_torchs_foreach_and_fused_flags():
    # A script's torch.optim.AdamW(..., fused=True) becomes fasttrain's by the import alone; the step is the same.
    params = make_params()
    plain, flagged = clone_params(params), clone_params(params)
    opts = [AdamW(plain, lr=1e-2), AdamW(flagged, lr=1e-2, fused=True, foreach=False, capturable=False)]
    for seed in range(3):
        set_grads([plain, flagged], seed)
        for opt in opts:
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(plain, flagged))
    assert opts[1].state_dict()["param_groups"][0]["fused"] is True


def test_tensor_lr_with_foreach_raises_as_torch():
    # torch refuses a Tensor lr or beta with foreach=True (capturable=False), takes one with fused=True or foreach unset
    p = [torch.nn.Parameter(torch.randn(3))]
    for cls in (torch.optim.AdamW, AdamW):
        with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
            cls(p, lr=torch.tensor(0.01), foreach=True)
        with pytest.raises(ValueError, match=r"betas\[0\] as a Tensor is not supported"):
            cls(p, betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True)
        cls(p, lr=torch.tensor(0.01), fused=True)
        cls(p, lr=torch.tensor(0.01))


# ---- GPU (pytest -m gpu on the GPU machine): the CUDA multi-tensor kernel ----


def cuda_params(dtype=torch.float32, seed=0):
    return [p.detach().cuda().to(dtype).requires_grad_() for p in make_params(seed=seed)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "amsgrad,maximize,tensor_lr", [(False, False, False), (True, True, False), (False, False, True)]
)
def test_cuda_parity_with_torch_100_steps(amsgrad, maximize, tensor_lr):
    params, ref_params = cuda_params(), cuda_params()
    lr = torch.tensor(1e-3, device="cuda") if tensor_lr else 1e-3
    opt = AdamW(params, lr=lr, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize, backend="cuda")
    ref = torch.optim.AdamW(ref_params, lr=lr, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize, foreach=False)
    for step in range(STEPS):
        set_grads([params, ref_params], seed=step)
        opt.step()
        ref.step()
    assert all(opt.state[p]["step"].is_cuda for p in params)
    assert_states_close(opt, ref, params, ref_params)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_within_2x_torch_fused(dtype):
    assert_low_precision_within_2x_torch_fused("cuda", dtype, steps=STEPS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # GradScaler cannot unscale bf16 grads (torch 2.11)
def test_cuda_grad_scaler_inf_step_and_clipping_without_sync(dtype):
    """GradScaler + fused clipping on CUDA: matches torch (unscale, clip_grad_norm_, fused step); the inf step is
    skipped; and our step never synchronizes with the host.
    The reference unscales by hand: GradScaler.unscale_ refuses fp16 grads ("Attempting to unscale FP16 gradients"),
    and the scale is a power of two, so the multiply is exact as in unscale_. The expected norm is taken in fp64:
    clip_grad_norm_ returns it in the grads' dtype (bf16: 8 bits of mantissa).
    The unscaled grads' norm is ~260, so clipping binds at either limit. fp16 clips to 30, not 1: at 1 the grads are
    ~0.004, exp_avg_sq (1e-3 g^2 ~ 1.6e-8) rounds to 0 in fp16 while exp_avg does not, and the next step's update
    m / (sqrt(v) + eps) blows up, in torch's fused AdamW as in ours (params in the thousands where they start within
    5, on the CUDA and the CPU kernel alike), each where its own rounding lands: a comparison of noise."""
    params, ref_params = cuda_params(dtype), cuda_params(dtype)
    max_norm = 1.0 if dtype == torch.float32 else 30.0
    opt = AdamW(params, lr=1e-2, max_grad_norm=max_norm, backend="cuda")
    ref = torch.optim.AdamW(ref_params, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=3)
    for step in range(12):
        scaler.scale(torch.ones((), device="cuda"))  # what scaler.scale(loss) does first: creates the scale
        scale = scaler.get_scale()
        set_grads([params, ref_params], seed=step, scale=scale)
        if step == 4:
            params[2].grad[7] = float("inf")
            ref_params[2].grad[7] = float("inf")
            before = [p.detach().clone() for p in params]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        if step == 4:
            assert all(torch.equal(p, b) for p, b in zip(params, before)), "the inf step must not touch params"
            assert opt.state[params[0]]["step"].item() == 4
            assert scaler.get_scale() == scale / 2, "GradScaler must have seen found_inf"
            continue
        for q in ref_params:
            q.grad.mul_(1.0 / scale)
        want = torch.stack([q.grad.double().norm() for q in ref_params]).norm()
        torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm.double(), want, rtol=1e-5, atol=0)
    # The clip coefficient carries the grad norm's error (ours: one fp32 pass, asserted within 1e-5 of fp64 above;
    # torch's: per-tensor norms, then their norm), and exp_avg_sq is quadratic in it: fp32 exp_avg_sq differs by
    # ~1e-5 of its value. fp16: the reference's clip_grad_norm_ rounds the clipped grads (and its
    # coefficient) to fp16 while ours keeps them in fp32, so elements may differ by ~2 ulps, and the smallest
    # exp_avg_sq lie among fp16's subnormals, whose ulp is 2^-24. Measured at max_norm 30 (the CPU kernel against
    # torch's fused AdamW on the CPU, the same fp32 arithmetic): at most 0.7% of a tensor's largest value (exp_avg).
    if dtype == torch.float32:
        assert_states_close(opt, ref, params, ref_params, rtol=3e-5)
    else:
        assert_states_close(opt, ref, params, ref_params, rtol=2e-2, atol=2 * 2.0**-24)


@pytest.mark.gpu
def test_cuda_many_tensors_large_and_unaligned_match_reference():
    """Over one launch's metadata: 150 tensors (> 45 per launch), a 21M-element tensor (> 320 chunks of 64K, so it
    is cut across launches), and views at odd offsets (the unaligned path).
    The reference runs on aligned copies."""
    gen = torch.Generator().manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 5000, (150,), generator=gen)] + [21_000_001]
    base = torch.randn(sum(sizes) + 3, generator=gen).cuda()
    views, offset = [], 1  # offset 1: every tensor starts 4 bytes past a 16-byte boundary, or elsewhere
    for n in sizes:
        views.append(base[offset : offset + n])
        offset += n
    params = [v.detach().requires_grad_() for v in views]  # disjoint views of one buffer: independent params
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = AdamW(params, lr=1e-3, amsgrad=True, max_grad_norm=10.0, backend="cuda")
    ref = AdamW(ref_params, lr=1e-3, amsgrad=True, max_grad_norm=10.0, backend="reference")
    for _ in range(3):
        for p, q in zip(params, ref_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm, ref.last_grad_norm, rtol=1e-5, atol=0)
    assert_states_close(opt, ref, params, ref_params, rtol=4 * FP32_RTOL)


@pytest.mark.gpu
def test_cuda_state_dict_to_torch_and_back():
    params, ref_params = cuda_params(), cuda_params()
    opt = AdamW(params, lr=1e-3, backend="cuda")
    ref = torch.optim.AdamW(ref_params, lr=1e-3, foreach=False)
    for step in range(10):
        if step == 3:
            opt2 = torch.optim.AdamW(params, lr=1e-3, foreach=False)
            opt2.load_state_dict(opt.state_dict())
            opt = opt2
        if step == 6:
            opt2 = AdamW(params, lr=1e-3, backend="cuda")
            opt2.load_state_dict(opt.state_dict())
            opt = opt2
        set_grads([params, ref_params], seed=step)
        opt.step()
        ref.step()
    assert_states_close(opt, ref, params, ref_params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dtensor_params_step_as_plain_ones(tmp_path, backend):
    # What FSDP2's fully_shard and tensor parallel hand an optimizer: every backend steps the local shards and lands
    # where plain tensors do, clipping norm included (tests/test_dist.py runs 2 ranks).
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = make_params()[:3]
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        opts = [AdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, backend=backend) for ps in (plain, sharded)]
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p, d in zip(plain, sharded):
                p.grad = torch.randn(p.shape, generator=gen)
                d.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
            for opt in opts:
                opt.step()
        for p, d in zip(plain, sharded):
            assert torch.allclose(d.full_tensor(), p, rtol=1e-6, atol=1e-7)
            assert type(opts[1].state[d]["exp_avg"]) is type(d)  # state of the param's placement, as torch's AdamW
        assert torch.allclose(opts[1].last_grad_norm, opts[0].last_grad_norm, rtol=1e-6)
    finally:
        dist.destroy_process_group()
