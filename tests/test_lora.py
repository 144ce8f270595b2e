"""LoRA: fine-tune a trained checkpoint's transformer with PEFT adapters, save them, load them
into a fresh pipeline, scale, fuse and unload them (diffusers' LoRA interface; `peft` extra)."""

import pytest
import torch
from conftest import load_train_script
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from nano_dit import NanoDiTPipeline
from nano_dit.feature_cache import load_cache
from nano_dit.flow_matching import TIMESTEP_SCALE, FlowMatching, add_noise

# Every attention projection and MLP of every block, and the output layer (as diffusers' Flux
# LoRA script targets); a short run's gates are still near zero, so the output layer matters here.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stand_in_dir):
    """checkpoint_final of a short pixel-space demo run, and its feature cache."""
    tmp = tmp_path_factory.mktemp("lora")
    load_train_script().main(
        [
            *("--num-images", "8", "--resolution", "16", "--batch-size", "8"),
            *("--total-steps", "20", "--warmup-steps", "2", "--no-validation"),
            *("--shards", str(tmp / "shards"), "--cache", str(tmp / "cache")),
            *("--stand-in-encoders", str(stand_in_dir), "--output-dir", str(tmp / "run")),
        ]
    )
    return tmp / "run" / "checkpoints" / "checkpoint_final", tmp / "cache"


def _batch(cache):
    (bucket,) = load_cache(cache)[1]
    g = torch.Generator().manual_seed(0)
    return dict(
        x0=bucket.latents,
        noise=torch.randn(bucket.latents.shape, generator=g),
        sigmas=torch.rand(len(bucket), generator=g),
        encoder_hidden_states=bucket.prompt_embeds,
        encoder_attention_mask=bucket.prompt_attention_mask,
        image_embeds=bucket.image_embeds,
    )


def _velocity(model, batch, **kwargs):
    x_t = add_noise(batch["x0"], batch["noise"], batch["sigmas"])
    conditioning = {k: batch[k] for k in ("encoder_hidden_states", "encoder_attention_mask", "image_embeds")}
    with torch.no_grad():
        return model(x_t, batch["sigmas"] * TIMESTEP_SCALE, **conditioning, **kwargs).sample


def test_a_lora_fine_tune_trains_only_the_adapters_and_round_trips_through_save_and_load(trained, tmp_path):
    checkpoint, cache = trained
    batch = _batch(cache)
    pipe = NanoDiTPipeline.from_pretrained(checkpoint)
    transformer = pipe.transformer
    base_weights = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    base_v = _velocity(transformer, batch)

    # diffusers' LoRA recipe: freeze the model, add the adapter (its parameters alone train).
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    per_block = 2 * (4 * 2 + 2)  # A and B for 4 projections × 2 attentions, and 2 MLP layers
    assert len(trainable) == per_block * transformer.config.num_layers + 2  # + proj_out's A and B
    torch.testing.assert_close(_velocity(transformer, batch), base_v)  # B starts at zero: no change yet

    flow = FlowMatching()
    conditioning = {k: batch[k] for k in ("encoder_hidden_states", "encoder_attention_mask", "image_embeds")}

    def loss():
        return flow.loss(transformer, batch["x0"], batch["noise"], batch["sigmas"], **conditioning).loss

    with torch.no_grad():
        before = loss().item()
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    transformer.train()
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    transformer.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.9 * before  # the adapters learned (the same batch: this is fitting, not validation)
    for n, p in transformer.named_parameters():
        if n in base_weights:  # PEFT keeps the frozen weights under their base_layer name otherwise
            assert torch.equal(p, base_weights[n]), n
    tuned_v = _velocity(transformer, batch)
    assert not torch.allclose(tuned_v, base_v)

    # Save the adapters alone, as diffusers' LoRA scripts do.
    NanoDiTPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer))
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()

    fresh = NanoDiTPipeline.from_pretrained(checkpoint)
    torch.testing.assert_close(_velocity(fresh.transformer, batch), base_v)
    fresh.load_lora_weights(tmp_path, adapter_name="tuned")
    torch.testing.assert_close(_velocity(fresh.transformer, batch), tuned_v)
    # {"scale": 0} switches the adapters off for one call; the pipeline passes attention_kwargs on.
    torch.testing.assert_close(_velocity(fresh.transformer, batch, attention_kwargs={"scale": 0.0}), base_v)
    fresh.fuse_lora()
    torch.testing.assert_close(_velocity(fresh.transformer, batch), tuned_v, rtol=1e-4, atol=1e-5)
    fresh.unfuse_lora()
    fresh.unload_lora_weights()
    torch.testing.assert_close(_velocity(fresh.transformer, batch), base_v, rtol=1e-5, atol=1e-6)


def test_the_pipeline_passes_the_lora_scale_to_the_transformer(trained, tmp_path):
    checkpoint, cache = trained
    batch = _batch(cache)
    pipe = NanoDiTPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    with torch.no_grad():  # a non-zero B, so that the adapter changes the output
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    common = dict(
        prompt_embeds=batch["encoder_hidden_states"][:2],
        prompt_attention_mask=batch["encoder_attention_mask"][:2],
        image_embeds=batch["image_embeds"][:2],
        num_inference_steps=2,
        output_type="latent",
    )

    def sample(**kwargs):
        return pipe(**common, generator=torch.Generator().manual_seed(0), **kwargs).images

    with_adapter = sample()
    switched_off = sample(attention_kwargs={"scale": 0.0})
    pipe.transformer.disable_adapters()
    without_adapter = sample()
    assert not torch.allclose(with_adapter, without_adapter)
    torch.testing.assert_close(switched_off, without_adapter)
