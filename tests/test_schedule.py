import math

import pytest
import torch

from llmopt.train.schedule import Schedule, build_schedule


def test_cosine_protocol_shape():
    s = Schedule("cosine", steps=100, warmup=10, min_lr_ratio=0.1)
    assert s.num_updates == 100
    assert s.factor(0) == pytest.approx(0.1)          # first update not at lr 0
    assert s.factor(9) == pytest.approx(1.0)          # warmup ends at the peak
    assert s.factor(99) == pytest.approx(0.1)         # last update at min_lr_ratio
    mid = 10 + 45  # halfway through the cosine (reference counter 55)
    assert s.factor(mid - 1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_reference_quirks_first_update_at_zero_and_n_plus_one_updates():
    q = Schedule("cosine", steps=100, warmup=10, min_lr_ratio=0.1, reference_quirks=True)
    plain = Schedule("cosine", steps=100, warmup=10, min_lr_ratio=0.1)
    assert q.num_updates == 101 and q.factor(0) == 0.0 and q.factor(100) == 1e-7
    assert all(q.factor(s + 1) == plain.factor(s) for s in range(99))


def reference_cyclical_cosine(step: int, warmup: int, cycle: int, min_lr_ratio: float) -> float:
    """The GaLore protocol code's LambdaLR factor, written from its formula: a cosine with warmup, cyclical
    (cycle = the run's steps); in cycles after the first, the restarted warmup's first two steps are at 1e-7."""
    in_cycle = step % cycle
    if in_cycle < warmup:
        if step != in_cycle and in_cycle < 2:
            return 1e-7
        return in_cycle / max(1, warmup)
    progress = (in_cycle - warmup) / max(1, cycle - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("steps, warmup", [(100, 10), (10000, 1000), (11000, 1100), (20, 0), (7, 1)])
def test_reference_quirks_match_the_reference_lambda(steps, warmup):
    """Every one of the reference loop's steps + 1 updates at the reference's factor, the last one included."""
    q = Schedule("cosine", steps=steps, warmup=warmup, min_lr_ratio=0.1, reference_quirks=True)
    for update in range(q.num_updates):
        assert q.factor(update) == pytest.approx(reference_cyclical_cosine(update, warmup, steps, 0.1), abs=1e-15)


@pytest.mark.parametrize("steps, warmup", [(5000, 500), (19125, 1912), (7, 1)])
def test_start_at_zero_matches_the_sgd_ll_loop(steps, warmup):
    """The SGD-LL code's loop: exactly `steps` updates, update s at its scheduler's factor(s) (the first at lr 0);
    within one cycle its cyclical cosine is the plain one."""
    z = Schedule("cosine", steps=steps, warmup=warmup, min_lr_ratio=0.1, start_at_zero=True)
    plain = Schedule("cosine", steps=steps, warmup=warmup, min_lr_ratio=0.1)
    assert z.num_updates == steps and z.factor(0) == 0.0
    for update in range(steps):
        assert z.factor(update) == pytest.approx(reference_cyclical_cosine(update, warmup, steps, 0.1), abs=1e-15)
    assert all(z.factor(s + 1) == plain.factor(s) for s in range(steps - 1))  # one update behind the default


def test_wsd_and_constant():
    w = Schedule("wsd", steps=100, warmup=10, min_lr_ratio=0.1, decay=10)
    assert w.factor(50) == 1.0 and w.factor(89) == 1.0 and w.factor(99) == pytest.approx(0.1)
    assert w.factor(94) == pytest.approx(1 - 0.9 * 0.5)
    c = Schedule("constant", steps=10, warmup=0)
    assert [c.factor(i) for i in range(10)] == [1.0] * 10


def test_build_schedule_drives_every_group():
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.1}])
    schedule, sched = build_schedule(opt, "cosine", steps=10, warmup_ratio=0.2)
    assert schedule.warmup == 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "linear"}, "unknown schedule"), ({"steps": 0}, "steps >= 1"),
    ({"warmup": 20, "steps": 10}, "warmup <= steps"), ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
])
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)
