"""fasttrain.optim.AdamW: a drop-in for torch.optim.AdamW with fused kernels, fused clipping and GradScaler support.

Backends, declared in one table (fasttrain._backend) and chosen per (device, dtype) group of parameters: `cuda`
(csrc/adamw_cuda.cu, one multi-tensor launch per group), `cpu` (csrc/adamw_cpu.cpp, vectorized + OpenMP, one call
per group), both behind the extension's op fasttrain::adamw_step_, and `reference` (`adamw_reference` below:
torch's single-tensor math op for op, the test oracle and the fallback).

State and param_groups use torch.optim.AdamW's layout, so a state_dict saved by either loads into the other.

DTensor params (FSDP2's fully_shard, tensor parallel) take the same kernels on their local shards (`to_local()`, the
update is elementwise), with their state held as DTensors of the param's placement, as torch's AdamW holds it. Only
the clipping norm and GradScaler's found_inf cross shards: the local sums of squares (and found_inf) are all-reduced
over the mesh dimensions that shard the params, in one collective per mesh, on the device (no host sync).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fasttrain import _backend

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CLIP_EPS = 1e-6  # added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does


def adamw_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_norm: Tensor | None = None,
    max_grad_norm: float | None = None,
) -> None:
    """One AdamW step in plain PyTorch, in the order of operations of torch's single-tensor AdamW.

    Beyond torch: grads are multiplied by 1/grad_scale (GradScaler) and by the clip coefficient
    min(1, max_grad_norm / (grad_norm / grad_scale + 1e-6)) when given; found_inf > 0 skips the whole step. This is
    the oracle, not the fast path: it reads found_inf and the steps on the host.
    """
    if found_inf is not None and found_inf.item() > 0:
        return
    coef = None
    if grad_scale is not None:
        coef = grad_scale.double().reciprocal()
    if max_grad_norm is not None:
        norm = grad_norm.double() if coef is None else grad_norm.double() * coef
        clip = (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        coef = clip if coef is None else coef * clip
    for i, param in enumerate(params):
        grad = grads[i]
        if coef is not None:
            grad = grad * coef.to(device=grad.device, dtype=torch.float32)
        grad = -grad if maximize else grad
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], steps[i]
        step_t += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def grad_sumsq_reference(grads: list[Tensor]) -> Tensor:
    """Sum of squares of all grads as a float32 device tensor (fp64 accumulation)."""
    return sum(g.double().square().sum() for g in grads).float()


class Reference:
    step = staticmethod(adamw_reference)
    grad_sumsq = staticmethod(grad_sumsq_reference)


class Native:
    """The extension's kernels, CPU or CUDA by the tensors' device: one call per group."""

    @staticmethod
    def step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        *,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        amsgrad,
        maximize,
        grad_scale=None,
        found_inf=None,
        grad_norm=None,
        max_grad_norm=None,
    ) -> None:
        # A CUDA tensor lr is read by the kernel on the device; a CPU one is a host value (no sync).
        lr_tensor, lr_value = None, 0.0
        if isinstance(lr, Tensor) and lr.device.type != "cpu":
            lr_tensor = lr.to(device=params[0].device, dtype=torch.float32).reshape(())  # (1,) or () -> ()
        else:
            lr_value = float(lr)
        torch.ops.fasttrain.adamw_step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            lr_tensor,
            lr_value,
            beta1,
            beta2,
            float(eps),
            float(weight_decay),
            bool(amsgrad),
            bool(maximize),
            grad_scale,
            found_inf,
            grad_norm,
            max_grad_norm if max_grad_norm is not None else 0.0,
        )

    @staticmethod
    def grad_sumsq(grads: list[Tensor]) -> Tensor:
        return torch.ops.fasttrain.adamw_grad_sumsq(grads)


# Each reason takes a group's (device, dtype, whether its params are a tensor subclass other than DTensor, whose
# local shards the kernels take). Read once, at import.
_OP_REASON = _backend.native_op_reason("adamw_step_")


def _group_reason(dtype: torch.dtype, subclass: bool) -> str | None:
    if subclass:
        return "native kernels take plain tensors and DTensors, not another tensor subclass"
    return None if dtype in NATIVE_DTYPES else f"native kernels take {NATIVE_DTYPES}, got {dtype}"


def _cuda_reason(device: torch.device, dtype: torch.dtype, subclass: bool) -> str | None:
    return _backend.cuda_extension_reason(device) or _OP_REASON or _group_reason(dtype, subclass)


def _cpu_reason(device: torch.device, dtype: torch.dtype, subclass: bool) -> str | None:
    return _backend.cpu_extension_reason(device) or _OP_REASON or _group_reason(dtype, subclass)


ADAMW = _backend.Table(
    "adamw",
    {
        "cuda": _backend.Backend(
            _cuda_reason, Native, live=lambda: _cuda_reason(_backend.default_device(), torch.float32, False)
        ),
        "cpu": _backend.Backend(
            _cpu_reason, Native, live=lambda: _cpu_reason(torch.device("cpu"), torch.float32, False)
        ),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


def _is_dtensor(t: Tensor) -> bool:
    # A DTensor exists only once its module is imported; importing it here would add ~1 s to `import fasttrain`.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _shard_key(p: DTensor):
    """(mesh, the mesh dims whose placement shards p), or None for a DTensor every rank holds whole."""
    dims = tuple(i for i, placement in enumerate(p.placements) if placement.is_shard())
    return (p.device_mesh, dims) if dims else None


def _local_like(t: Tensor, p: DTensor) -> Tensor:
    """The local shard of t (p, its grad or a state tensor) laid out as p's."""
    if not _is_dtensor(t):
        raise RuntimeError(
            "fasttrain AdamW: a DTensor param has plain-tensor state; load sharded optimizer state with "
            "torch.distributed.checkpoint (set_optimizer_state_dict), not a full state_dict"
        )
    if t.device_mesh != p.device_mesh or t.placements != p.placements:
        t = t.redistribute(p.device_mesh, p.placements)
    return t.to_local()


def _all_reduce_sum(shard_key, local: Tensor | None, found_inf: Tensor | None):
    """local and found_inf (either may be None) summed over the ranks that shard_key's mesh dims span: one
    all-reduce per dim on one buffer, on the device, without a host sync."""
    mesh, dims = shard_key
    parts = [t.to(mesh.device_type, torch.float32).reshape(1) for t in (local, found_inf) if t is not None]
    buf = torch.cat(parts)  # (1 or 2,): a fresh buffer, so the caller's tensors stay untouched
    for dim in dims:
        dist.all_reduce(buf, group=mesh.get_group(dim))
    out = iter(buf.unbind())
    return (None if local is None else next(out)), (None if found_inf is None else next(out))


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's checks and messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (
        (isinstance(betas[0], float) and isinstance(betas[1], float))
        or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
    ):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")


class AdamW(Optimizer):
    """torch.optim.AdamW with fused native kernels.

    Same arguments as torch.optim.AdamW; foreach and fused are taken and change nothing (the step is one fused
    kernel per device and dtype whatever they say), capturable and differentiable only as False. Plus:
      max_grad_norm: clip the global grad norm to this value inside the step (one norm pass, then the update pass,
        no host sync); the norm before clipping is kept in `last_grad_norm` (a float32 device tensor; with DTensor
        params the global norm, the same on every rank), and a step whose norm is not finite is skipped (as a
        GradScaler skips an inf step) instead of clipping by it.
      backend: "auto" (default), "cuda", "cpu" or "reference" (see fasttrain._backend; FASTTRAIN_BACKEND overrides
        auto).
    Works with torch.amp.GradScaler: the inverse scale and found_inf are read on the device, an inf step is skipped.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        backend: str | None = None,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        if foreach and fused:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's check and message
        for name, value in (("lr", lr), ("betas[0]", betas[0]), ("betas[1]", betas[1])):
            if isinstance(value, Tensor) and foreach and not capturable:  # torch's check and message
                raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
        for name, value in (("capturable", capturable), ("differentiable", differentiable)):
            if value:  # a step under CUDA graph capture, or one autograd can differentiate: not measured, not taken
                raise ValueError(f"{name}=True is not supported by fasttrain's AdamW (use torch.optim.AdamW)")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
                raise TypeError(f"max_grad_norm must be a positive number or None, got {type(max_grad_norm).__name__}")
            if not max_grad_norm > 0:
                raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        _backend.requested_backend(backend)  # validates the name now rather than at the first step
        betas = tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)
        # The keys of torch.optim.AdamW's groups, so that each optimizer can load the other's state_dict.
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=fused,
            decoupled_weight_decay=True,
        )
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self.last_grad_norm: Tensor | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        for p in group["params"]:
            if not torch.is_floating_point(p):
                raise TypeError(f"fasttrain AdamW requires floating point parameters, got {p.dtype}")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in dict(
                amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None
            ).items():
                group.setdefault(key, value)
            group["decoupled_weight_decay"] = True

    def _state_for(self, p: Tensor, group: dict) -> dict:
        """Lazily create torch's per-param state; move a loaded 'step' to the param's device (CUDA) or CPU."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if p.is_cuda else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            want = p.device if p.is_cuda else torch.device("cpu")
            step = state["step"]
            if not torch.is_tensor(step) or step.device != want or step.dtype != torch.float32:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(want)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _collect(self) -> list[tuple[dict, dict]]:
        """Per param group: (device, dtype, is a tensor subclass other than DTensor) -> lists of params, grads,
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, and each grad's shard key (`_shard_key`). A DTensor enters as
        its local shard, so one kernel call serves the plain params and the shards of a (device, dtype)."""
        out = []
        for group in self.param_groups:
            buckets: dict = defaultdict(lambda: ([], [], [], [], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                state = self._state_for(p, group)
                tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"]]
                if group["amsgrad"]:
                    tensors.append(state["max_exp_avg_sq"])
                shard_key = None
                if _is_dtensor(p):
                    shard_key = _shard_key(p)
                    tensors = [_local_like(t, p) for t in tensors]
                p_, grad = tensors[0], tensors[1]
                if grad.stride() != p_.stride():  # the kernels walk grad and param as one flat range of memory
                    grad = torch.empty_like(p_).copy_(grad)
                subclass = is_traceable_wrapper_subclass(p_)
                b = buckets[(p_.device, p_.dtype, subclass)]
                b[0].append(p_)
                b[1].append(grad)
                b[2].append(tensors[2])
                b[3].append(tensors[3])
                if group["amsgrad"]:
                    b[4].append(tensors[4])
                b[5].append(state["step"])
                b[6].append(shard_key)
            out.append((group, buckets))
        return out

    def _global_grad_norm(self, collected, backends, found_inf):
        """sqrt of the sum of squares over every grad of every group, and found_inf agreed over the shards.

        One native pass per (device, dtype) and shard key; the sums of the sharded grads, with found_inf beside them,
        are all-reduced once per shard key (the mesh dimensions that shard them), then added to the unsharded ones.
        Returns (norm, found_inf); norm is None when no param has a grad."""
        partial: dict = defaultdict(list)  # shard key -> sums of squares
        for _, buckets in collected:
            for key, lists in buckets.items():
                by_key: dict = defaultdict(list)
                for grad, shard_key in zip(lists[1], lists[6]):
                    by_key[shard_key].append(grad)
                for shard_key, grads in by_key.items():
                    partial[shard_key].append(ADAMW[backends[key]].grad_sumsq(grads))
        if not partial:
            return None, found_inf
        total = []
        for shard_key, sums in partial.items():
            device = sums[0].device
            local = torch.stack([t.to(device, non_blocking=True) for t in sums]).sum()
            if shard_key is not None:
                local, found_inf = _all_reduce_sum(shard_key, local, found_inf)
            total.append(local)
        device = total[0].device
        return torch.stack([t.to(device, non_blocking=True) for t in total]).sum().sqrt(), found_inf

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every param with a grad; returns closure() when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler.step (None when unscaled)
        found_inf = getattr(self, "found_inf", None)
        collected = self._collect()
        backends = {}
        for _, buckets in collected:
            for key in buckets:
                backends[key] = ADAMW.choose(*key, backend=self.backend)
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm, found_inf = self._global_grad_norm(collected, backends, found_inf)
            if grad_norm is not None:
                self.last_grad_norm = grad_norm if grad_scale is None else grad_norm / grad_scale.to(grad_norm.device)
                # Clipping by a non-finite norm would write NaN into every weight: that step is skipped, on the device.
                bad_norm = (~torch.isfinite(grad_norm)).float()
                found_inf = bad_norm if found_inf is None else found_inf.to(grad_norm.device) + bad_norm
        elif found_inf is not None:  # an inf in one rank's shard skips the step on every rank
            for shard_key in dict.fromkeys(
                k for _, buckets in collected for lists in buckets.values() for k in lists[6]
            ):
                if shard_key is not None:
                    _, found_inf = _all_reduce_sum(shard_key, None, found_inf)
        for group, buckets in collected:
            beta1, beta2 = (float(b) for b in group["betas"])
            for (device, dtype, subclass), lists in buckets.items():
                self._step_bucket(
                    backends[(device, dtype, subclass)],
                    device,
                    lists,
                    group,
                    beta1,
                    beta2,
                    grad_scale,
                    found_inf,
                    grad_norm,
                )
        return loss

    def _step_bucket(self, backend, device, lists, group, beta1, beta2, grad_scale, found_inf, grad_norm) -> None:
        def on_device(t):
            return None if t is None else t.to(device, non_blocking=True)

        ADAMW[backend].step(
            *lists[:6],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            grad_scale=on_device(grad_scale),
            found_inf=on_device(found_inf),
            grad_norm=on_device(grad_norm),
            max_grad_norm=self.max_grad_norm,
        )
