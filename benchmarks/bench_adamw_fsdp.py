"""AdamW step on FSDP2's sharded parameters (DTensor Shard(0), as fully_shard leaves them): fasttrain (its native
kernel over the local shards, and with fused global-norm clipping: one all-reduce) vs torch.optim.AdamW fused=True
and foreach=True on the same shards, over a GPT-like mix of tensors. The time is the slowest rank's median; GB/s
counts each rank's 28 bytes per local fp32 param, summed over the ranks.

    python -m fasttrain.benchmarks.bench_adamw_fsdp [--device cpu|cuda] [--nproc N] [--quick] [--out DIR]

It starts itself under torchrun with N ranks (default: 2 on CPU over gloo, every GPU over nccl).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from fasttrain.benchmarks import common
from fasttrain.benchmarks.bench_adamw import BYTES_PER_PARAM, gpt_shapes
from fasttrain.optim import AdamW

SIZES = {"cpu": [4 << 20, 16 << 20], "cuda": [16 << 20, 128 << 20]}
QUICK = {"cpu": [1 << 20], "cuda": [16 << 20]}


def sharded_params(shapes, mesh, seed: int):
    """Shard(0) DTensor params with grads, the same full tensors on every rank."""
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = distribute_tensor((torch.randn(s, generator=gen) * 0.02).to(mesh.device_type), mesh, [Shard(0)])
        p.grad = distribute_tensor((torch.randn(s, generator=gen) * 1e-3).to(mesh.device_type), mesh, [Shard(0)])
        params.append(p)
    return params


def variants(device: str) -> dict:
    backend = "cuda" if device == "cuda" else "cpu"
    return {
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True).step,
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True).step,
        "fasttrain": lambda ps: AdamW(ps, lr=1e-3, backend=backend).step,
        "fasttrain +clip": lambda ps: AdamW(ps, lr=1e-3, max_grad_norm=1.0, backend=backend).step,
    }


def time_in_step(fns: dict, device: str, rounds: int = 5, iters: int = 10) -> dict:
    """Median ms per call of each fn over rounds of `iters` calls, in alternation, every rank calling the same fns
    the same number of times (the clipped step holds an all-reduce, so adaptive repeat counts per rank would
    deadlock); each round starts at a barrier."""
    per_round: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            dist.barrier()
            common.synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            common.synchronize(device)
            per_round[name].append((time.perf_counter() - start) * 1e3 / iters)
    return {name: sorted(v)[len(v) // 2] for name, v in per_round.items()}


def check_correct(shapes, mesh, device: str) -> float:
    """fasttrain with clipping against torch's AdamW after clip_grad_norm_ on the same shards, 3 steps with fresh
    grads and a clip norm that bites -> the largest max |diff| relative to max |param| over the ranks."""
    hyper = dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    ours, ref = sharded_params(shapes, mesh, 0), sharded_params(shapes, mesh, 0)
    opt = AdamW(ours, max_grad_norm=1e-2, backend="cuda" if device == "cuda" else "cpu", **hyper)
    torch_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
    for step in range(3):
        for p, q in zip(sharded_params(shapes, mesh, step + 1), zip(ours, ref)):
            for r in q:
                r.grad = p.grad.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref, 1e-2)
        torch_opt.step()
    pairs = [(p.to_local(), q.to_local()) for p, q in zip(ours, ref) if p.to_local().numel()]  # shards may be empty
    local = [max(((p - q).abs().max().item() for p, q in pairs), default=0.0)]
    local.append(max((q.abs().max().item() for _, q in pairs), default=0.0))
    worst = torch.tensor(local, device=device)  # nccl reduces device tensors only
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank judges the same numbers
    err, scale = worst.tolist()
    if not err <= 1e-6 * scale:
        raise AssertionError(f"fasttrain AdamW on shards differs from torch: {err:.3g} vs scale {scale:.3g}")
    return err / scale


def run(args) -> None:
    """One rank's part: measure, then rank 0 prints and writes the rows."""
    from torch.distributed.device_mesh import init_device_mesh

    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device, (world,))
    copy_gbs = common.copy_bandwidth_gbs(device)
    rows = []
    for n_target in (QUICK if args.quick else SIZES)[device]:
        shapes = gpt_shapes(n_target)
        n = sum(torch.Size(s).numel() for s in shapes)
        rel_err = check_correct(shapes, mesh, device)
        params = sharded_params(shapes, mesh, 0)
        steps = {name: factory(params) for name, factory in variants(device).items()}
        for step in steps.values():
            step()  # the state, outside the timed region
        times = time_in_step(steps, device)
        slowest = torch.tensor([times[name] for name in steps], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = dict(zip(steps, slowest.tolist()))
        for name, ms in times.items():
            gbs = BYTES_PER_PARAM * n / (ms * 1e-3) / 1e9  # every rank moves its shard's bytes at once
            rows.append(
                {
                    "params": n,
                    "ranks": world,
                    "impl": name,
                    "ms": ms,
                    "GB/s": gbs,
                    "%copy": 100 * gbs / (copy_gbs * world),
                    "x fused": times["torch fused"] / ms,
                    "rel_err_vs_torch": rel_err,
                }
            )
        del steps, params
    if rank == 0:
        common.print_table(rows, ["params", "ranks", "impl", "ms", "GB/s", "%copy", "x fused"])
        ceilings = {"copy_GB/s_per_rank": copy_gbs, "backend": dist.get_backend()}
        path = common.write_results("adamw_fsdp", device, rows, ceilings, args.out, args.quick)
        print(f"wrote {path}")
    dist.destroy_process_group()


def main() -> None:
    args = common.parse_args(
        __doc__.splitlines()[0],
        lambda p: p.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, every GPU)"),
    )
    if "RANK" in os.environ:
        return run(args)
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "fasttrain.benchmarks.bench_adamw_fsdp", *sys.argv[1:]]
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    main()
