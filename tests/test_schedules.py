"""WSD schedule vs the closed-form formulas (docs/yulan_reference.md 3.4), written here once more, vectorized in numpy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from yulan_tune.training.schedules import WSDSchedule, WSDScheduler, create_wsd_scheduler, wsd_lambda


def closed_form(steps: np.ndarray, *, warmup: int, stable: int, decay: int, shape: str, start: int, end: float):
    s = np.maximum(steps - start, 0).astype(np.float64)
    p = np.clip((s - warmup - stable) / decay, 0.0, 1.0)
    f = {
        "cosine": np.cos(np.pi * p / 2),  # the reference's "cos": (1 - cos(pi p / 2)) (end - 1) + 1
        "cos2": 0.5 * (1 + np.cos(np.pi * p)),
        "linear": 1 - p,
        "1-sqrt": 1 - np.sqrt(p),
    }[shape]
    return np.where(s < warmup, s / max(warmup, 1), np.where(s < warmup + stable, 1.0, end + (1 - end) * f))


@pytest.mark.parametrize("shape", ["cosine", "cos2", "linear", "1-sqrt"])
@pytest.mark.parametrize("warmup,stable,decay,start,end", [(50, 200, 300, 0, 0.0), (0, 0, 19000, 243198, 0.1)])
def test_wsd_matches_closed_form_including_after_the_end(shape, warmup, stable, decay, start, end):
    schedule = WSDSchedule(warmup_steps=warmup, stable_steps=stable, decay_steps=decay, decay_shape=shape,
                           start_step=start, end_lr_factor=end)
    # every step of the run, plus far past the end (the reference jumps back to the peak there)
    end_step = start + warmup + stable + decay
    steps = np.concatenate([np.arange(max(start - 50, 0), start + warmup + stable + 50),  # before/at start, warmup
                            np.linspace(start + warmup + stable, end_step + 50, 2001).astype(int),  # decay, after
                            start + np.array([10**6, 10**7])])
    ours = np.array([schedule(int(t)) for t in steps])
    expected = closed_form(steps, warmup=warmup, stable=stable, decay=decay, shape=shape, start=start, end=end)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert ours[-1] == pytest.approx(end) and schedule.end_step == start + warmup + stable + decay
    # spot values by hand: the middle of the decay window
    mid = start + warmup + stable + decay // 2
    by_hand = {"cosine": np.cos(np.pi / 4), "cos2": 0.5, "linear": 0.5, "1-sqrt": 1 - np.sqrt(0.5)}[shape]
    assert schedule(mid) == pytest.approx(end + (1 - end) * by_hand, abs=1e-12)


def test_reference_spellings_and_yulan_annealing_value():
    # phase 26: decay [243198, 262198], 1-sqrt from 1 to 0; at the reference's clamp step 262000: 1 - sqrt(18802/19000)
    schedule = WSDSchedule(stable_steps=0, decay_steps=19000, decay_shape="1sqrt", start_step=243198)
    assert schedule.decay_shape == "1-sqrt"
    assert schedule(262000) == pytest.approx(1 - np.sqrt(18802 / 19000), abs=1e-15)
    assert WSDSchedule(stable_steps=0, decay_steps=10, decay_shape="cos").decay_shape == "cosine"
    with pytest.raises(ValueError, match="unknown decay shape 'cosin'"):
        WSDSchedule(stable_steps=0, decay_steps=10, decay_shape="cosin")


def test_stable_forever_and_tokens():
    forever = WSDSchedule(warmup_steps=10)
    assert [forever(t) for t in (0, 5, 10, 10**9)] == [0.0, 0.5, 1.0, 1.0]
    # windows in tokens: 4096-token rows x 8 per step; the token clock at step t is t * 32768
    tokens_per_step = 4096 * 8
    by_tokens = WSDSchedule.from_tokens(tokens_per_step=tokens_per_step, warmup_tokens=20 * tokens_per_step,
                                        stable_tokens=100 * tokens_per_step, decay_tokens=50 * tokens_per_step,
                                        decay_shape="cos2", end_lr_factor=0.01)
    steps = np.arange(0, 400)
    expected = closed_form(steps, warmup=20, stable=100, decay=50, shape="cos2", start=0, end=0.01)
    np.testing.assert_allclose([by_tokens(int(t)) for t in steps], expected, atol=1e-12)
    # a budget that does not divide rounds up: the window never ends before its tokens are consumed
    assert WSDSchedule.from_tokens(tokens_per_step=100, decay_tokens=250, stable_tokens=0).decay_steps == 3


def test_scheduler_resumes_from_state_dict(caplog):
    def optimizer():
        params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
        # two groups with different peaks, as the muP groups: the multiplier applies to each group's own LR
        return torch.optim.AdamW([{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 1e-2 / 7.5}])

    schedule = WSDSchedule(warmup_steps=3, stable_steps=5, decay_steps=6, decay_shape="linear", end_lr_factor=0.1)
    opt = optimizer()
    scheduler = create_wsd_scheduler(opt, schedule)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    expected = closed_form(np.arange(20), warmup=3, stable=5, decay=6, shape="linear", start=0, end=0.1)
    np.testing.assert_allclose(np.array(lrs), np.outer(expected, [1e-2, 1e-2 / 7.5]), rtol=1e-12)

    # interrupt after 9 steps, resume in a fresh optimizer/scheduler from the saved state
    opt_a = optimizer()
    sched_a = create_wsd_scheduler(opt_a, schedule)
    for _ in range(9):
        opt_a.step()
        sched_a.step()
    saved_opt, saved_sched = opt_a.state_dict(), sched_a.state_dict()
    assert saved_sched["schedule"]["decay_shape"] == "linear" and saved_sched["last_epoch"] == 9
    opt_b = optimizer()  # the order of transformers' Trainer: create both, then load the optimizer, then the scheduler
    sched_b = create_wsd_scheduler(opt_b, schedule)
    opt_b.load_state_dict(saved_opt)
    sched_b.load_state_dict(saved_sched)
    resumed = []
    for _ in range(9, 20):
        resumed.append([g["lr"] for g in opt_b.param_groups])
        opt_b.step()
        sched_b.step()
    np.testing.assert_array_equal(np.array(resumed), np.array(lrs[9:]))

    # a changed schedule at resume: the configured one is kept, and the jump is reported
    changed = WSDScheduler(optimizer(), WSDSchedule(warmup_steps=3))
    with caplog.at_level(logging.WARNING, logger="yulan_tune.training.schedules"):
        changed.load_state_dict(saved_sched)
    assert changed.last_epoch == 9 and changed.schedule == WSDSchedule(warmup_steps=3)
    assert "different LR schedule" in caplog.text


def test_wsd_lambda_signature_matches_dataclass():
    kwargs = dict(warmup_steps=4, stable_steps=2, decay_steps=8, decay_shape="cosine", start_step=100, end_lr_factor=0.2)
    schedule = WSDSchedule(**kwargs)
    assert all(wsd_lambda(t, **kwargs) == schedule(t) for t in range(90, 130))
    assert schedule(99) == 0.0 and schedule(100) == 0.0 and schedule(102) == 0.5
