import numpy as np
import pytest
import torch
from conftest import make_inputs
from diffusers import FlowMatchEulerDiscreteScheduler

from nano_dit import FlowMatching, NanoDiTTransformer2DModel
from nano_dit.flow_matching import (
    TIMESTEP_SCALE,
    add_noise,
    loss_by_sigma_bin,
    shift_sigmas,
    velocity_target,
)


def _pair(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_noising_runs_from_data_at_sigma_0_to_noise_at_sigma_1():
    x0, noise = _pair()
    torch.testing.assert_close(add_noise(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(add_noise(x0, noise, torch.ones(3)), noise)
    sigmas = torch.tensor([0.25, 0.5, 0.9])
    expected = torch.stack([(1 - s) * x0[i] + s * noise[i] for i, s in enumerate(sigmas)])
    torch.testing.assert_close(add_noise(x0, noise, sigmas), expected)


def test_velocity_is_the_derivative_of_the_path():
    x0, noise = _pair()
    s, h = torch.full((3,), 0.3, dtype=torch.float64), 1e-6
    x0, noise = x0.double(), noise.double()
    finite_difference = (add_noise(x0, noise, s + h) - add_noise(x0, noise, s)) / h
    torch.testing.assert_close(finite_difference, velocity_target(x0, noise), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheduler_shift", [1.0, 3.0])
def test_scheduler_step_fed_the_true_velocity_lands_exactly_on_x0(scheduler_shift):
    # Checks the sign convention end to end: our path and velocity against diffusers' Euler step.
    x0, noise = _pair()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=scheduler_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10))
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * TIMESTEP_SCALE)
    assert scheduler.sigmas[-1] == 0
    x = add_noise(x0, noise, scheduler.sigmas[:1].expand(3))
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity_target(x0, noise), t, x, return_dict=False)[0]
        # every intermediate state lies on the straight path at the scheduler's next σ
        torch.testing.assert_close(x, add_noise(x0, noise, scheduler.sigmas[i + 1].expand(3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sigmas_lie_in_the_unit_interval_and_are_seeded(scheme):
    fm = FlowMatching(weighting_scheme=scheme)
    a = fm.sample_sigmas(4096, generator=torch.Generator().manual_seed(0))
    b = fm.sample_sigmas(4096, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4096,)
    assert torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert abs(a.median().item() - 0.5) < 0.05  # all three densities are symmetric about 0.5


def test_logit_normal_concentrates_mass_in_the_middle():
    g = torch.Generator().manual_seed(0)
    uniform = FlowMatching(weighting_scheme="uniform").sample_sigmas(20000, generator=g)
    logit_normal = FlowMatching(weighting_scheme="logit_normal").sample_sigmas(20000, generator=g)
    middle = lambda s: ((s > 0.25) & (s < 0.75)).float().mean()  # noqa: E731
    assert middle(logit_normal) > middle(uniform) + 0.1


def test_shift_moves_sigmas_towards_noise_and_keeps_the_endpoints():
    sigmas = torch.linspace(0, 1, 11)
    shifted = shift_sigmas(sigmas, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > sigmas[1:-1]).all()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = FlowMatching(shift=1.0).sample_sigmas(1000, generator=g())
    torch.testing.assert_close(FlowMatching(shift=3.0).sample_sigmas(1000, generator=g()), shift_sigmas(plain, 3.0))


def test_loss_is_zero_for_the_true_velocity_and_the_target_norm_for_a_zero_model(tiny_config):
    x0, noise = _pair(shape=(2, 4, 8, 8))
    fm = FlowMatching()
    oracle = lambda x_t, t, **kw: type("Out", (), {"sample": noise - x0})  # noqa: E731
    result = fm.loss(oracle, x0, noise=noise)
    assert result.loss.item() == 0 and result.per_sample.shape == (2,) and result.sigmas.shape == (2,)

    untrained = NanoDiTTransformer2DModel(**tiny_config)  # predicts v = 0 exactly
    cond = {k: v for k, v in make_inputs(tiny_config).items() if k not in ("hidden_states", "timestep")}
    result = fm.loss(untrained, x0, noise=noise, **cond)
    expected = (noise - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(result.per_sample, expected)
    torch.testing.assert_close(result.loss, expected.mean())


def test_noise_interpolation_and_target_are_fp32_whatever_the_features_dtype():
    seen = {}

    def model(x_t, t, **kw):
        seen["x_t"] = x_t
        return type("Out", (), {"sample": torch.zeros_like(x_t)})

    x0, noise = _pair()
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    result = FlowMatching().loss(model, x0.bfloat16(), sigmas=sigmas, generator=torch.Generator().manual_seed(0))
    assert seen["x_t"].dtype == torch.float32
    # the noise drawn for a bf16 x0 is the fp32 noise drawn for an fp32 one, not a rounded copy
    drawn = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["x_t"], add_noise(x0.bfloat16().float(), drawn, sigmas), rtol=0, atol=0)
    expected = (drawn - x0.bfloat16().float()).pow(2).flatten(1).mean(1)  # the target in fp32
    torch.testing.assert_close(result.per_sample, expected, rtol=0, atol=0)


def test_loss_passes_sigma_times_1000_to_the_model():
    seen = {}

    def model(x_t, t, **kw):
        seen["t"] = t
        return type("Out", (), {"sample": torch.zeros_like(x_t)})

    x0, _ = _pair()
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    FlowMatching().loss(model, x0, sigmas=sigmas)
    torch.testing.assert_close(seen["t"], sigmas * 1000)


def test_loss_by_sigma_bin_sums_and_counts_per_bin():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    sigmas = torch.tensor([0.05, 0.2, 0.3, 0.99, 1.0])
    sums, counts = loss_by_sigma_bin(losses, sigmas, num_bins=4)
    torch.testing.assert_close(sums, torch.tensor([3.0, 3.0, 0.0, 9.0]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 1.0, 0.0, 2.0]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weighting_scheme": "cosmap"}, "weighting_scheme must be one of"),
        ({"logit_std": 0.0}, "logit_std must be > 0"),
        ({"shift": -1.0}, "shift must be > 0"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowMatching(**kwargs)
