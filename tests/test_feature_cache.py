import pytest
import torch

from nano_dit import feature_cache
from nano_dit.encoders import ConditioningEncoders, EncoderSpec
from nano_dit.feature_cache import encode_dataset, load_cache
from nano_dit.shards import write_shards
from nano_dit.synthetic import synthetic_samples


class CountingEncoders(ConditioningEncoders):
    """The real encoders, counting how often each is called (and how often they are loaded)."""

    loads = 0

    def __init__(self, spec, device=None):
        super().__init__(spec, device)
        CountingEncoders.loads += 1
        self.calls = {"latents": 0, "text": 0, "image": 0}

    def encode_latents(self, images):
        self.calls["latents"] += len(images)
        return super().encode_latents(images)

    def encode_text(self, captions):
        self.calls["text"] += len(captions)
        return super().encode_text(captions)

    def encode_images(self, images):
        self.calls["image"] += len(images)
        return super().encode_images(images)


@pytest.fixture(autouse=True)
def counting_encoders(monkeypatch):
    """The cache loads its encoders as CountingEncoders here."""
    monkeypatch.setattr(feature_cache, "ConditioningEncoders", CountingEncoders)


def _encode(shards, cache, spec):
    return encode_dataset(shards, cache, spec, batch_size=4, device="cpu")


def test_round_trip_synth_shards_cache_with_the_vae(tmp_path, stand_in_dir):
    write_shards(synthetic_samples(10, 32), tmp_path / "shards", samples_per_shard=4)
    spec = EncoderSpec.stand_in(stand_in_dir)
    report = _encode(tmp_path / "shards", tmp_path / "cache", spec)
    # each caption is drawn on two scenes: 5 captions to encode for 10 images
    assert report.encoded == {"latents": 10, "text": 5, "image": 10} and report.stand_in

    manifest, (bucket,) = load_cache(tmp_path / "cache")
    assert manifest["encoders"]["stand_in"] is True and bucket.bucket == (32, 32)
    assert bucket.latents.shape == (10, 16, 4, 4)
    assert bucket.prompt_embeds.shape[:2] == bucket.prompt_attention_mask.shape and bucket.image_tokens.shape[:2] == (
        10,
        4,
    )

    # The cached values are what the encoders give for those very samples.
    encoders = ConditioningEncoders(spec, device="cpu")
    samples = list(synthetic_samples(10, 32))
    order = [bucket.keys.index(s["key"]) for s in samples]
    torch.testing.assert_close(bucket.latents[order], encoders.encode_latents([s["image"] for s in samples]))
    embeds, mask = encoders.encode_text([s["caption"] for s in samples])
    L = mask.shape[1]
    torch.testing.assert_close(bucket.prompt_attention_mask[order][:, :L], mask)
    torch.testing.assert_close(bucket.prompt_embeds[order][:, :L] * mask[..., None], embeds * mask[..., None])
    torch.testing.assert_close(bucket.image_embeds[order], encoders.encode_images([s["image"] for s in samples])[0])


def test_a_second_run_loads_no_encoder(tmp_path, stand_in_dir):
    write_shards(synthetic_samples(6, 32), tmp_path / "shards")
    spec = EncoderSpec.stand_in(stand_in_dir)
    _encode(tmp_path / "shards", tmp_path / "cache", spec)
    loads = CountingEncoders.loads
    report = _encode(tmp_path / "shards", tmp_path / "cache", spec)
    assert CountingEncoders.loads == loads  # nothing to compute, nothing loaded
    assert report.encoded == {"latents": 0, "text": 0, "image": 0}
    assert report.reused == {"latents": 6, "text": 3, "image": 6}  # 3 captions, each on two scenes


def test_a_new_vae_recomputes_latents_only(tmp_path, stand_in_dir, monkeypatch):
    write_shards(synthetic_samples(6, 32), tmp_path / "shards")
    spec = EncoderSpec.stand_in(stand_in_dir)
    _encode(tmp_path / "shards", tmp_path / "cache", spec)
    pixel_spec = EncoderSpec.stand_in(stand_in_dir, pixel_mode=True)
    report = _encode(tmp_path / "shards", tmp_path / "cache", pixel_spec)
    assert report.encoded == {"latents": 6, "text": 0, "image": 0}
    _, (bucket,) = load_cache(tmp_path / "cache")
    assert bucket.latents.shape == (6, 3, 32, 32)  # the manifest now points at the pixel latents


def test_new_samples_are_encoded_alone(tmp_path, stand_in_dir):
    spec = EncoderSpec.stand_in(stand_in_dir)
    write_shards(synthetic_samples(4, 32), tmp_path / "shards")
    _encode(tmp_path / "shards", tmp_path / "cache", spec)
    write_shards(synthetic_samples(7, 32), tmp_path / "shards", overwrite=True)  # the 4 among them
    report = _encode(tmp_path / "shards", tmp_path / "cache", spec)
    assert report.encoded == {"latents": 3, "text": 2, "image": 3}  # 2 captions new to the cache
    _, (bucket,) = load_cache(tmp_path / "cache")
    assert len(bucket) == 7


def test_a_new_resolution_recomputes_the_images_but_not_the_captions(tmp_path, stand_in_dir):
    spec = EncoderSpec.stand_in(stand_in_dir)
    write_shards(synthetic_samples(4, 32), tmp_path / "shards")
    _encode(tmp_path / "shards", tmp_path / "cache", spec)
    write_shards(synthetic_samples(4, 64), tmp_path / "shards", overwrite=True)
    report = _encode(tmp_path / "shards", tmp_path / "cache", spec)
    assert report.encoded == {"latents": 4, "text": 0, "image": 4}


def test_bf16_encoders_write_an_fp32_cache_that_loses_nothing(tmp_path, stand_in_dir, monkeypatch):
    """On a GPU the encoders run in bf16 (run here on the CPU): the cache holds their outputs
    widened to fp32, exactly, and says so in its manifest."""
    write_shards(synthetic_samples(4, 32), tmp_path / "shards", samples_per_shard=4)
    spec = EncoderSpec.stand_in(stand_in_dir)
    bf16 = lambda spec, device: ConditioningEncoders(spec, device, dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(feature_cache, "ConditioningEncoders", bf16)
    encode_dataset(tmp_path / "shards", tmp_path / "cache", spec, device="cpu")
    manifest, (bucket,) = load_cache(tmp_path / "cache")
    assert manifest["dtype"] == "float32"
    for name in ("latents", "prompt_embeds", "image_embeds", "image_tokens"):
        t = getattr(bucket, name)
        assert t.dtype == torch.float32, name
        torch.testing.assert_close(t, t.bfloat16().float(), rtol=0, atol=0)  # bf16 values, widened exactly


def test_captions_past_the_text_window_are_counted_and_reported(tmp_path, stand_in_dir, caplog):
    samples = list(synthetic_samples(4, 32))
    samples[1]["caption"] = " ".join(["red circle"] * 100)  # 200 words, past the 128-token window
    write_shards(samples, tmp_path / "shards")
    with caplog.at_level("WARNING"):
        report = _encode(tmp_path / "shards", tmp_path / "cache", EncoderSpec.stand_in(stand_in_dir))
    assert report.truncated == 1
    assert "1 captions cut to the 128-token window" in report.summary()
    assert "1 captions are longer than the text encoder's 128-token window" in caplog.text
    _, (bucket,) = load_cache(tmp_path / "cache")
    assert bucket.prompt_attention_mask.sum(dim=1).max() == 128


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        "cpu:0",  # what a DDP rank on CPU is given
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
    ],
)
def test_the_cache_loads_straight_to_a_device_and_its_size_is_known_before(tmp_path, stand_in_dir, device):
    from nano_dit.feature_cache import cache_nbytes

    write_shards(synthetic_samples(6, 16, seed=0), tmp_path / "shards", samples_per_shard=3)
    _encode(tmp_path / "shards", tmp_path / "cache", EncoderSpec.stand_in(stand_in_dir, pixel_mode=True))
    _, host = load_cache(tmp_path / "cache")
    _, there = load_cache(tmp_path / "cache", device=device)
    fields = ("latents", "prompt_embeds", "prompt_attention_mask", "image_embeds", "image_tokens")
    for a, b in zip(host, there, strict=True):
        assert all(getattr(b, f).device.type == torch.device(device).type for f in fields)
        assert all(torch.equal(getattr(a, f), getattr(b, f).cpu()) for f in fields)
    tensors = sum(getattr(b, f).nbytes for b in host for f in fields if f != "prompt_attention_mask")
    # what the files hold: each caption once (unpadded), plus headers; the same order as in memory
    assert tensors / 2 < cache_nbytes(tmp_path / "cache") < 2 * tensors
