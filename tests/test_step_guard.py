"""The non-finite guard decided on the device: a skipped step leaves weights, moments and EMA bit for
bit; an applied one is exactly the plain step; and neither reads the decision back to the host."""

import copy

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from nano_dit.step_guard import ema_step, optimizer_step


def _setup(fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.03, fused=fused)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), decay=0.9, foreach=True)
    return accelerator, model, optimizer, ema


def _backward(model, poison: bool = False):
    loss = model(torch.randn(5, 8, generator=torch.Generator().manual_seed(1))).pow(2).mean()
    (loss * float("nan") if poison else loss).backward()


def _snapshot(model, optimizer, ema):
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy(optimizer.optimizer.state_dict()["state"]),
        [s.clone() for s in ema.shadow_params],
    )


def _assert_same(a, b):
    weights_a, state_a, shadow_a = a
    weights_b, state_b, shadow_b = b
    assert all(torch.equal(x, y) for x, y in zip(weights_a, weights_b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(shadow_a, shadow_b, strict=True))
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for name in state_a[i]:  # exp_avg, exp_avg_sq and the step count
            assert torch.equal(torch.as_tensor(state_a[i][name]), torch.as_tensor(state_b[i][name])), (i, name)


def _guarded_step(accelerator, model, optimizer, ema, poison=False):
    _backward(model, poison)
    params = list(model.parameters())
    finite = torch.stack([p.grad.isfinite().all() for p in params]).all()
    optimizer_step(optimizer, finite, accelerator.scaler)
    ema_step(ema, params, finite)
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_leaves_weights_moments_and_ema_exactly_as_they_were(fused):
    accelerator, model, optimizer, ema = _setup(fused)
    assert getattr(optimizer.optimizer, "_step_supports_amp_scaling", False) == fused  # else: the host-sync fallback
    _guarded_step(accelerator, model, optimizer, ema)  # the moments exist from here on
    before = _snapshot(model, optimizer, ema)
    _guarded_step(accelerator, model, optimizer, ema, poison=True)
    _assert_same(before, _snapshot(model, optimizer, ema))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_finite_step_is_exactly_the_plain_step():
    guarded, plain = _setup(fused=True), _setup(fused=True)
    for _ in range(3):
        _guarded_step(*guarded)
        accelerator, model, optimizer, ema = plain
        _backward(model)
        optimizer.step()
        ema.step(model.parameters())
        optimizer.zero_grad(set_to_none=True)
    _assert_same(_snapshot(*guarded[1:]), _snapshot(*plain[1:]))


def test_the_fused_path_never_reads_the_decision_back(monkeypatch):
    accelerator, model, optimizer, ema = _setup(fused=True)
    _guarded_step(accelerator, model, optimizer, ema)  # the moments exist from here on
    _backward(model, poison=True)
    params = list(model.parameters())
    finite = torch.stack([p.grad.isfinite().all() for p in params]).all()
    before = _snapshot(model, optimizer, ema)

    def host_read(*args):
        raise AssertionError("the step read a device value back to the host")

    with monkeypatch.context() as patch:  # what a sync looks like from Python
        for name in ("__bool__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, host_read)
        optimizer_step(optimizer, finite, accelerator.scaler)
        ema_step(ema, params, finite)
    _assert_same(before, _snapshot(model, optimizer, ema))
