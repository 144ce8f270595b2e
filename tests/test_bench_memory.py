"""The memory prediction's measurement (benchmarks/bench_memory.py) on a tiny model."""

from conftest import load_benchmark

from nano_dit import NanoDiTTransformer2DModel

bench_memory = load_benchmark("bench_memory")


def test_saved_activations_grow_with_the_batch_and_shrink_with_checkpointing(tiny_config):
    model = NanoDiTTransformer2DModel(**tiny_config).train()
    two, four = (bench_memory.saved_activation_bytes(model, b, latent_size=8, text_tokens=5) for b in (2, 4))
    assert 1.8 < four / two < 2.1  # activations are per sample
    model.enable_gradient_checkpointing()
    assert bench_memory.saved_activation_bytes(model, 4, latent_size=8, text_tokens=5) < 0.6 * four


def test_the_largest_batch_that_fits_a_budget():
    assert bench_memory.largest_batch(1_000, 100, 2_000) == 10
    assert bench_memory.largest_batch(1_000, 100, 1_999) == 9
    assert bench_memory.largest_batch(3_000, 100, 2_000) == 0  # not even the weights fit
