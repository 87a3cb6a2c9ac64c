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


def reference_wsd(step: int, warmup: int, steps: int, decay: int, min_lr_ratio: float, decay_type: str) -> float:
    """The EMA-Nesterov code's wsd_quick_recovery LambdaLR factor (no restarts), written from its formula: linear
    warmup from 0, 1 until the decay starts at steps - decay, then progress = (step - start) / decay, capped at 1."""
    if step < warmup:
        return step / max(1, warmup)
    decay_start = steps - decay
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start) / max(1, decay), 1.0)
    if decay_type == "exponential":
        return math.exp(math.log(min_lr_ratio) * progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


@pytest.mark.parametrize("decay_type", ["exponential", "linear"])
@pytest.mark.parametrize("steps, warmup, decay", [(20, 3, 5), (2500, 250, 250), (5000, 500, 500)])
def test_wsd_start_at_zero_is_the_ema_nesterov_loop(decay_type, steps, warmup, decay):
    """The authors' loop: a LambdaLR stepped after each of exactly `steps` updates, update s at factor(s): the first
    at lr 0, the last at progress (decay - 1) / decay (exponential: 0.1 ** 0.996 at 2500 steps, not 0.1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.03)
    schedule, scheduler = build_schedule(opt, "wsd", steps=steps, warmup_ratio=warmup / steps,
                                         decay_ratio=decay / steps, min_lr_ratio=0.1, start_at_zero=True,
                                         decay_type=decay_type)
    assert (schedule.warmup, schedule.decay, schedule.num_updates) == (warmup, decay, steps)
    lrs = []
    for _ in range(schedule.num_updates):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    expected = [0.03 * reference_wsd(s, warmup, steps, decay, 0.1, decay_type) for s in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(0.03) and lrs[steps - decay] == pytest.approx(0.03)
    last_progress = (decay - 1) / decay
    assert lrs[-1] == pytest.approx(0.03 * (0.1 ** last_progress if decay_type == "exponential"
                                            else 1 - 0.9 * last_progress), rel=1e-12)


def test_wsd_exponential_without_start_at_zero_ends_at_min_lr_ratio():
    """llmopt's default loop, one update ahead of the reference counter: the last update at exactly 0.1 x peak."""
    w = Schedule("wsd", steps=20, warmup=4, min_lr_ratio=0.1, decay=5, decay_type="exponential")
    assert [w.factor(s) for s in range(20)] == pytest.approx(
        [reference_wsd(s + 1, 4, 20, 5, 0.1, "exponential") for s in range(20)], rel=1e-12)
    assert w.factor(19) == pytest.approx(0.1, rel=1e-12) and w.factor(15) == pytest.approx(0.1 ** 0.2)
    linear = Schedule("wsd", steps=20, warmup=4, min_lr_ratio=0.1, decay=5, decay_type="linear")
    unset = Schedule("wsd", steps=20, warmup=4, min_lr_ratio=0.1, decay=5)
    assert [linear.factor(s) for s in range(20)] == [unset.factor(s) for s in range(20)]  # None is linear


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
    ({"name": "wsd", "decay": 10, "decay_type": "exp"}, r"unknown schedule.decay_type 'exp'; choose one of "
                                                        r"\['linear', 'exponential'\]"),
    ({"name": "cosine", "decay_type": "exponential"}, "schedule.decay_type is the wsd decay's shape; "
                                                      "schedule=cosine has none"),
    ({"name": "constant", "decay_type": "linear"}, "schedule=constant has none"),
    ({"name": "wsd", "decay": 10, "decay_type": "exponential", "min_lr_ratio": 0.0}, "must be > 0"),
])
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)
