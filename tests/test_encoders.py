import dataclasses
import json
import logging

import pytest
import torch

from nano_dit.encoders import STAND_IN_MARKER, ConditioningEncoders, EncoderSpec, images_to_tensor
from nano_dit.pipelines.pipeline_nano_dit import decode_latents
from nano_dit.synthetic import synthetic_samples


@pytest.fixture(scope="module")
def encoders(stand_in_dir):
    return ConditioningEncoders(EncoderSpec.stand_in(stand_in_dir), device="cpu")


def test_stand_ins_load_through_from_pretrained_and_say_so(stand_in_dir, caplog):
    assert json.loads((stand_in_dir / STAND_IN_MARKER).read_text())["stand_in"] is True
    spec = EncoderSpec.stand_in(stand_in_dir)
    assert spec.uses_stand_ins and not EncoderSpec().uses_stand_ins
    with caplog.at_level(logging.WARNING):
        ConditioningEncoders(spec, device="cpu")
    assert "STAND-IN encoders" in caplog.text


def test_text_embeddings_and_mask(encoders):
    embeds, mask = encoders.encode_text(["a small red circle on the left", "a large blue square"])
    assert embeds.shape == (2, mask.shape[1], encoders.text_encoder.config.d_model)
    assert mask.tolist()[1][-2:] == [0, 0]  # the shorter caption is padded
    alone, _ = encoders.encode_text(["a large blue square"])
    torch.testing.assert_close(embeds[1, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)  # padding is inert
    ids = encoders.tokenizer("a red circle").input_ids
    assert ids[-1] == encoders.tokenizer.eos_token_id and encoders.tokenizer.unk_token_id not in ids


def test_image_embeddings_global_and_patch_tokens(encoders):
    images = [s["image"] for s in synthetic_samples(3, 32)]
    global_embeds, tokens = encoders.encode_images(images)
    width = encoders.image_encoder.config.hidden_size
    assert global_embeds.shape == (3, width)
    assert tokens.shape == (3, (32 // 16) ** 2, width)  # registers and CLS left out
    assert not torch.allclose(global_embeds[0], global_embeds[1])


def test_vae_latents_apply_the_flux_shift_and_scale(encoders):
    images = [s["image"] for s in synthetic_samples(2, 32)]
    latents = encoders.encode_latents(images)
    assert latents.shape == (2, 16, 4, 4)  # 16 channels, x8 down
    vae = encoders.vae
    raw = vae.encode(images_to_tensor(images)).latent_dist.mode()
    expected = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    # The pipeline's decoding undoes the shift and scale before the VAE's decoder.
    decoded = decode_latents(vae, latents)
    assert decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(decoded, vae.decode(raw).sample)


def test_the_text_window_cuts_captions_and_counts_the_cut_ones(stand_in_dir):
    spec = dataclasses.replace(EncoderSpec.stand_in(stand_in_dir), max_sequence_length=4)
    encoders = ConditioningEncoders(spec, device="cpu")
    captions = ["a small red circle on the left and a large blue square at the top", "a square"]
    embeds, mask = encoders.encode_text(captions)
    assert mask.shape == (2, 4) and embeds.shape[:2] == (2, 4)
    assert mask.tolist()[1] == [1, 1, 1, 0]  # "a square" and its EOS fit; the first caption is cut
    assert encoders.count_truncated(captions) == 1
    assert spec.fingerprint("text") != EncoderSpec.stand_in(stand_in_dir).fingerprint("text")


def test_pixel_mode_latents_are_the_image(stand_in_dir):
    encoders = ConditioningEncoders(EncoderSpec.stand_in(stand_in_dir, pixel_mode=True), device="cpu")
    images = [s["image"] for s in synthetic_samples(2, 32)]
    pixels = encoders.encode_latents(images)
    torch.testing.assert_close(pixels, images_to_tensor(images))
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_fingerprints_change_only_for_the_encoder_that_changed():
    a = EncoderSpec()
    b = EncoderSpec(vae="someone/other-vae")
    assert a.fingerprint("latents") != b.fingerprint("latents")
    assert a.fingerprint("text") == b.fingerprint("text") and a.fingerprint("image") == b.fingerprint("image")
    assert EncoderSpec(revision="abc").fingerprint("text") != a.fingerprint("text")
    assert EncoderSpec(vae=None).fingerprint("latents") == "pixels"


def test_a_folder_without_stand_ins_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-tiny"):
        EncoderSpec.stand_in(tmp_path)


def test_stand_ins_are_deterministic_for_a_seed(tmp_path):
    from nano_dit.encoders import make_stand_in_encoders

    def fingerprints(folder):
        spec = EncoderSpec.stand_in(folder)
        return [spec.fingerprint(kind).split("@")[1] for kind in ("latents", "text", "image")]

    a = fingerprints(make_stand_in_encoders(tmp_path / "a", seed=1, image_size=32))
    b = fingerprints(make_stand_in_encoders(tmp_path / "b", seed=1, image_size=32))
    c = fingerprints(make_stand_in_encoders(tmp_path / "c", seed=2, image_size=32))
    assert a == b  # same seed: byte-identical files
    assert all(x != y for x, y in zip(a, c))


def test_making_stand_ins_leaves_the_global_random_state_alone(tmp_path):
    from nano_dit.encoders import make_stand_in_encoders

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_stand_in_encoders(tmp_path / "t", seed=0, image_size=32)
    assert torch.equal(torch.rand(3), expected)


def test_stand_in_encoders_refuse_a_file_for_their_folder(tmp_path):
    from nano_dit.encoders import make_stand_in_encoders

    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(NotADirectoryError, match="a_file is a file"):
        make_stand_in_encoders(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep"
