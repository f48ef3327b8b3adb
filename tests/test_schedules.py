"""LR schedules: the shape of each one, and bad arguments."""

import math

import pytest
import torch

from fasttrain.optim.schedules import LRSchedule

LR, WARMUP, TOTAL, MIN = 1e-3, 10, 110, 1e-4


def curve(kind, **kw):
    s = LRSchedule(kind, lr=LR, warmup_steps=WARMUP, total_steps=TOTAL, min_lr=MIN, **kw)
    return [s(step) for step in range(TOTAL + 20)]


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_linear_warmup_reaches_lr(kind):
    lrs = curve(kind)
    assert lrs[0] == pytest.approx(LR / WARMUP)
    assert all(b > a for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP]))
    assert lrs[WARMUP - 1] == pytest.approx(LR)


def test_constant_after_warmup():
    assert curve("constant")[WARMUP:] == [LR] * (TOTAL + 20 - WARMUP)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_ends_at_min_lr_and_holds(kind):
    lrs = curve(kind)
    assert lrs[WARMUP] == pytest.approx(LR)
    assert all(b < a for a, b in zip(lrs[WARMUP:TOTAL], lrs[WARMUP + 1 : TOTAL + 1]))
    assert lrs[TOTAL] == pytest.approx(MIN) and lrs[-1] == pytest.approx(MIN)
    # Halfway through the decay both are at the midpoint; a quarter in, cosine is still above linear.
    assert lrs[WARMUP + (TOTAL - WARMUP) // 2] == pytest.approx((LR + MIN) / 2)
    quarter = lrs[WARMUP + (TOTAL - WARMUP) // 4]
    expected = MIN + (LR - MIN) * (0.5 * (1 + math.cos(math.pi / 4)) if kind == "cosine" else 0.75)
    assert quarter == pytest.approx(expected)


def test_inverse_sqrt_peaks_at_warmup_then_falls_as_one_over_sqrt_step():
    s = LRSchedule("inverse_sqrt", lr=LR, warmup_steps=WARMUP)
    assert s(WARMUP - 1) == pytest.approx(LR)
    assert max(s(i) for i in range(1000)) == pytest.approx(LR)
    assert s(4 * WARMUP - 1) == pytest.approx(LR / 2)
    assert s(100 * WARMUP - 1) == pytest.approx(LR / 10)


def test_apply_sets_every_group_and_state_round_trips():
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    s = LRSchedule("cosine", lr=LR, warmup_steps=WARMUP, total_steps=TOTAL, min_lr=MIN)
    assert s.apply(opt, 50) == s(50)
    assert [g["lr"] for g in opt.param_groups] == [s(50), s(50)]
    again = LRSchedule.from_state_dict(s.state_dict())
    assert [again(i) for i in range(TOTAL)] == [s(i) for i in range(TOTAL)]


@pytest.mark.parametrize(
    "kind, kw, match",
    [
        ("cosine", dict(total_steps=None), "total_steps"),
        ("linear", dict(warmup_steps=20, total_steps=20), "total_steps"),
        ("inverse_sqrt", dict(warmup_steps=0), "warmup_steps"),
        ("step", dict(), "schedule must be one of"),
        ("constant", dict(min_lr=2.0), "min_lr"),
        ("constant", dict(warmup_steps=-1), "warmup_steps"),
        ("constant", dict(lr=math.inf), "lr must be finite and > 0"),
        ("constant", dict(lr=math.nan), "lr must be finite and > 0"),
        ("constant", dict(lr=0.0), "lr must be finite and > 0"),
    ],
)
def test_bad_arguments_raise(kind, kw, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(kind, **{"lr": LR, **kw})


def test_negative_step_raises():
    with pytest.raises(ValueError, match="step"):
        LRSchedule("constant", lr=LR)(-1)
