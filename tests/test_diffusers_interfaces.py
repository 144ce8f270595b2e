"""The model's diffusers interfaces: attention processors and backends, fused projections,
sampling caches. (LoRA has its own file, test_lora.py.)"""

import pytest
import torch
from conftest import TINY_CONFIG, make_inputs, randomize_
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from nano_dit import NanoDiTPipeline
from nano_dit.transformer_nano_dit import NanoDiTAttention, NanoDiTAttnProcessor

N_ATTENTION = 2 * TINY_CONFIG["num_layers"]  # self- and cross-attention in each block


def _run(model, **inputs):
    with torch.no_grad():
        return model(**inputs).sample


class RecordingProcessor(NanoDiTAttnProcessor):
    """The model's processor, counting the attention calls it computes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [False, True])
def test_the_attention_computes_what_diffusers_attention_with_sdpa_computes(cross):
    """Same parameter names and the same numbers as diffusers' `Attention` + `AttnProcessor2_0`
    (what the blocks used before), so checkpoints written before load and sample unchanged."""
    torch.manual_seed(0)
    ours = randomize_(NanoDiTAttention(32, heads=4, is_cross_attention=cross))
    reference = Attention(32, cross_attention_dim=32 if cross else None, heads=4, dim_head=8, bias=True)
    reference.set_processor(AttnProcessor2_0())
    reference.load_state_dict(ours.state_dict())  # strict: the names match one for one
    x, context = torch.randn(2, 16, 32), torch.randn(2, 5, 32)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        if cross:
            got = ours(x, context, keep[:, None, None, :])
            want = reference(x, encoder_hidden_states=context, attention_mask=keep[:, None, :])
        else:
            got, want = ours(x), reference(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attn_processors_lists_every_attention_and_set_attn_processor_replaces_them(tiny_model, tiny_config):
    processors = tiny_model.attn_processors
    assert len(processors) == N_ATTENTION
    assert "transformer_blocks.0.attn.processor" in processors
    assert "transformer_blocks.0.cross_attn.processor" in processors
    inputs = make_inputs(tiny_config)
    reference = _run(tiny_model, **inputs)

    recorder = RecordingProcessor()
    tiny_model.set_attn_processor(recorder)
    torch.testing.assert_close(_run(tiny_model, **inputs), reference)
    assert recorder.calls == N_ATTENTION  # every attention went through the processor set

    with pytest.raises(ValueError, match=f"number of attention layers: {N_ATTENTION}"):
        tiny_model.set_attn_processor({"transformer_blocks.0.attn.processor": NanoDiTAttnProcessor()})


@pytest.fixture
def recorded_backends(monkeypatch):
    """Wrap the native and math backends of diffusers' dispatcher so that each counts its calls."""
    calls = {}
    for name in (AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH):
        original = _AttentionBackendRegistry._backends[name]

        def recording(_original=original, _name=name.value, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(**kwargs)

        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, recording)
    # diffusers' set_attention_backend also makes its choice the process's default: restore it.
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    return calls


def test_set_attention_backend_takes_effect(tiny_model, tiny_config, recorded_backends):
    inputs = make_inputs(tiny_config)
    inputs["encoder_attention_mask"][0, 3:] = 0  # a padded prompt: the mask reaches the backend too
    reference = _run(tiny_model, **inputs)
    assert recorded_backends == {"native": N_ATTENTION}  # PyTorch's SDPA unless told otherwise

    recorded_backends.clear()
    tiny_model.set_attention_backend("_native_math")
    out = _run(tiny_model, **inputs)
    assert recorded_backends == {"_native_math": N_ATTENTION}
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)

    # diffusers' context manager chooses for modules that have no backend set.
    tiny_model.reset_attention_backend()
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    recorded_backends.clear()
    _run(tiny_model, **inputs)
    with attention_backend("_native_math"):
        _run(tiny_model, **inputs)
    assert recorded_backends == {"native": N_ATTENTION, "_native_math": N_ATTENTION}


def test_an_unknown_attention_backend_is_refused_naming_it(tiny_model):
    with pytest.raises(ValueError, match="backend='flashy'"):
        tiny_model.set_attention_backend("flashy")


def test_fused_qkv_projections_give_the_same_output_and_unfuse_restores_the_weights(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    inputs["encoder_attention_mask"][1, 2:] = 0
    reference = _run(tiny_model, **inputs)
    names = set(tiny_model.state_dict())
    tiny_model.fuse_qkv_projections()
    block = tiny_model.transformer_blocks[0]
    assert block.attn.to_qkv.weight.shape == (3 * 32, 32)  # self-attention: q, k, v in one matmul
    assert block.cross_attn.to_kv.weight.shape == (2 * 32, 32)  # cross-attention: k, v from the context
    torch.testing.assert_close(_run(tiny_model, **inputs), reference, rtol=1e-5, atol=1e-6)
    tiny_model.unfuse_qkv_projections()
    assert set(tiny_model.state_dict()) == names
    torch.testing.assert_close(_run(tiny_model, **inputs), reference)


# --------------------------------------------------------------------------------------------
# Sampling caches
# --------------------------------------------------------------------------------------------
STEPS = 8

CACHES = {
    "first_block": lambda pipe: FirstBlockCacheConfig(threshold=0.5),
    "pyramid_attention_broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(0, 1000),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    # The guided batch holds three branches, not FasterCache's [uncond, cond] pair: only its
    # attention reuse applies, which is what `is_guidance_distilled=True` selects.
    "faster_cache": lambda pipe: FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(0, 1000),
        attention_weight_callback=lambda _: 0.5,
        current_timestep_callback=lambda: pipe.current_timestep,
        is_guidance_distilled=True,
    ),
    "mag_cache": lambda pipe: MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=0.5),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
}


def _sample(pipe, conditions):
    """Latents after each step, and the number of attention calls computed."""
    recorder = RecordingProcessor()
    pipe.transformer.set_attn_processor(recorder)
    steps = []

    def keep(pipe, i, t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    pipe(
        **conditions,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=keep,
    )
    return steps, recorder.calls


@pytest.mark.parametrize("cache", list(CACHES))
def test_a_cache_leaves_the_first_step_unchanged_and_skips_work_after_it(tiny_model, tiny_config, cache):
    pipe = NanoDiTPipeline(transformer=tiny_model, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    inputs = make_inputs(tiny_config)
    conditions = {
        "prompt_embeds": inputs["encoder_hidden_states"],
        "prompt_attention_mask": inputs["encoder_attention_mask"],
        "image_embeds": inputs["image_embeds"],
    }
    reference, full_calls = _sample(pipe, conditions)
    assert full_calls == STEPS * N_ATTENTION

    tiny_model.enable_cache(CACHES[cache](pipe))
    assert tiny_model.is_cache_enabled
    cached, cached_calls = _sample(pipe, conditions)
    torch.testing.assert_close(cached[0], reference[0], rtol=0, atol=0)  # nothing cached yet
    assert cached_calls < full_calls  # later steps reuse what the cache kept
    assert not torch.equal(cached[-1], reference[-1])

    again, _ = _sample(pipe, conditions)  # the pipeline resets the cache's state after each call
    torch.testing.assert_close(again[-1], cached[-1], rtol=0, atol=0)

    tiny_model.disable_cache()
    assert not tiny_model.is_cache_enabled
    after, after_calls = _sample(pipe, conditions)
    assert after_calls == full_calls
    torch.testing.assert_close(after[-1], reference[-1], rtol=0, atol=0)
