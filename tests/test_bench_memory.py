"""The memory prediction's measurement (benchmarks/bench_memory.py) on a tiny model."""

import argparse
import importlib.util
from pathlib import Path

from nano_dit import NanoDiTTransformer2DModel

spec = importlib.util.spec_from_file_location(
    "bench_memory", Path(__file__).parents[1] / "benchmarks" / "bench_memory.py"
)
bench_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_memory)

ARGS = argparse.Namespace(latent_size=8, text_tokens=5, text_dim=24, image_dim=16)


def test_saved_activations_grow_with_the_batch_and_shrink_with_checkpointing(tiny_config):
    model = NanoDiTTransformer2DModel(**tiny_config).train()
    two, four = (bench_memory.saved_activation_bytes(model, b, ARGS) for b in (2, 4))
    assert 1.8 < four / two < 2.1  # activations are per sample
    model.enable_gradient_checkpointing()
    assert bench_memory.saved_activation_bytes(model, 4, ARGS) < 0.6 * four
