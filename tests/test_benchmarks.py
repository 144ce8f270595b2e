"""The benchmarks' own logic (their figures are printed, never asserted: see benchmarks/)."""

import functools

import pytest
import torch
from conftest import load_benchmark

bench_train = load_benchmark("bench_train")
shapes = load_benchmark("shapes")


@pytest.mark.parametrize("budget", [700, 1_000, 1_001, 5_000, 99, 130, 200])
def test_the_largest_batch_search_finds_the_boundary_of_a_budget(budget):
    def memory(b):  # weights 100, 25 per sample, and an allocator that rounds up to 64
        return float(-(-(100 + 25 * b) // 64) * 64)

    runs = []
    peak = functools.cache(lambda b: runs.append(b) or memory(b))
    expected = max((n for n in range(1, 400) if memory(n) <= budget), default=0)
    assert bench_train.largest_batch_measured(budget, peak) == expected
    assert len(runs) < 12  # a guess and a few checks, not a scan


def test_the_search_steps_down_when_memory_grows_faster_than_the_line():
    peak = functools.cache(lambda b: 100 + 10 * b + (b > 20) * 1_000.0)  # a second kernel kicks in past 20
    assert bench_train.largest_batch_measured(500, peak) == 20


def test_benchmark_inputs_have_the_models_widths():
    model = shapes.build_model("demo", latent_size=8, randomize=True)
    x0, cond = shapes.random_inputs(model, 3, 8, text_tokens=7)
    assert x0.shape == (3, 16, 8, 8) and cond["encoder_hidden_states"].shape == (3, 7, 768)
    assert cond["image_embeds"].shape == (3, 384)
    assert model.config.in_channels == 16 and model.config.text_embed_dim == 768
    assert all(p.abs().sum() > 0 for p in model.parameters())  # randomised: no zero-initialised layer left
    out = model(x0, torch.full((3,), 500.0), **cond).sample
    assert out.shape == x0.shape and out.abs().mean() > 0


def test_the_search_survives_a_flat_line_between_8_and_16():
    peak = functools.cache(lambda b: 1_000.0 if b <= 16 else 1_000.0 + 50 * (b - 16))  # the allocator rounded up
    runs = []
    counted = functools.cache(lambda b: runs.append(b) or peak(b))
    assert bench_train.largest_batch_measured(1_200, counted) == 20
    assert len(runs) < 20  # bracketing and bisection, not a walk down from the wild guess (200)


def test_the_search_agrees_with_a_scan_for_every_budget():
    def memory(b):  # an allocator with coarse blocks, and a jump where a workspace is added
        return float(-(-(300 + 37 * b + (b > 30) * 400) // 256) * 256)

    for budget in range(100, 4_000, 23):
        peak = functools.cache(memory)
        expected = max((n for n in range(1, 200) if memory(n) <= budget), default=0)
        assert bench_train.largest_batch_measured(budget, peak) == expected, budget
