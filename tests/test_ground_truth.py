"""The measures that read a generated picture against the ground-truth layouts, and the ideal
predictions the CFG-mode probe compares each mode with."""

import math
from types import SimpleNamespace

import pytest
import torch

from nano_dit import ground_truth
from nano_dit.config import SamplingConfig
from nano_dit.feature_cache import CachedBucket
from nano_dit.probes import ideal_x0, measure_mode_samples, mode_probes
from nano_dit.sampling import Sampler
from nano_dit.synthetic import SCENE_COLORS, render_scene, sample_layouts


def test_toward_reads_only_where_source_and_target_differ():
    g = torch.Generator().manual_seed(0)
    source, target = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    target[:, :, :4] = source[:, :, :4]  # the top half agrees
    assert ground_truth.toward(source, source, target).tolist() == pytest.approx([0, 0])
    assert ground_truth.toward(target, source, target).tolist() == pytest.approx([1, 1])
    assert ground_truth.toward((source + target) / 2, source, target).tolist() == pytest.approx([0.5, 0.5])
    scribbled = target.clone()
    scribbled[:, :, :4] = torch.rand(2, 3, 4, 8, generator=g)  # where they agree, anything goes
    assert ground_truth.toward(scribbled, source, target).tolist() == pytest.approx([1, 1])
    assert math.isnan(ground_truth.toward(source[:1], source[:1], source[:1]).item())  # nothing to measure


def test_a_dino_swap_is_measured_against_a_shapes_on_b_scene():
    a, b = sample_layouts(100, seed=0)[:2]
    assert a.scene != b.scene and a.caption != b.caption
    side = 32
    image_a, image_b = ground_truth.drawn(a, side), ground_truth.drawn(b, side)
    expected = ground_truth.drawn(ground_truth.swapped(a, b), side)
    bare_b = ground_truth.scene_alone(b, side)

    def measure(output):
        out = output[None]
        return (
            ground_truth.toward(out, image_a[None], expected[None]).item(),  # took B's scene
            ground_truth.toward(out, bare_b[None], expected[None]).item(),  # kept A's shapes
        )

    assert measure(expected) == pytest.approx((1, 1))
    scene, _ = measure(image_a)  # the embedding ignored: A's own picture
    assert scene == pytest.approx(0)
    _, shapes = measure(image_b)  # the caption ignored: B's picture
    assert shapes < ground_truth.HALF_WAY
    _, shapes = measure(bare_b)  # B's scene, no shapes at all
    assert shapes == pytest.approx(0)


def test_captions_name_the_shapes_and_never_the_scene():
    layouts = sample_layouts(100, seed=0)
    captions = [layout.caption for layout in layouts]
    assert len(set(captions)) == 50 and all(captions.count(c) == 2 for c in captions)
    for c in set(captions):  # each caption on two different scenes
        assert len({layout.scene for layout in layouts if layout.caption == c}) == 2
    assert len({layout.scene for layout in layouts}) == 10
    scene_words = {w for name in SCENE_COLORS for w in name.split()} | {"background", "gradient", "light"}
    assert not any(w in scene_words for c in captions for w in c.split())
    for first, second in zip(layouts[::2], layouts[1::2]):  # the swap pairs: another caption, another scene
        assert first.caption != second.caption and first.scene != second.scene
    assert [layout.caption for layout in sample_layouts(100, seed=0)] == captions  # deterministic


def test_the_scene_alone_is_what_the_caption_leaves_out():
    layout = sample_layouts(1, seed=3)[0]
    bare = ground_truth.scene_alone(layout, 32)
    drawn = ground_truth.drawn(layout, 32)
    differs = (drawn - bare).abs().amax(0) > 0.05  # (H, W): the shapes' pixels
    assert 0.02 < differs.float().mean() < 0.5
    assert render_scene(layout.scene, 32).size == (32, 32)


def test_ideal_x0_is_the_posterior_mean_of_the_allowed_candidates():
    g = torch.Generator().manual_seed(0)
    candidates = torch.randn(5, 3, 4, 4, generator=g)
    x_t = torch.randn(2, 3, 4, 4, generator=g)
    only_second = torch.zeros(2, 5, dtype=torch.bool)
    only_second[:, 1] = True
    assert torch.allclose(ideal_x0(x_t, 0.5, candidates, only_second), candidates[1].expand(2, -1, -1, -1))
    everything = torch.ones(2, 5, dtype=torch.bool)
    # no signal left: every allowed candidate equally likely, the ideal is their mean
    assert torch.allclose(
        ideal_x0(x_t, 1.0 - 1e-9, candidates, everything), candidates.mean(0).expand(2, -1, -1, -1), atol=1e-5
    )
    # little noise: x_σ gives its x0 away
    near = 0.99 * candidates[3:4] + 0.01 * torch.randn(1, 3, 4, 4, generator=g)
    assert torch.allclose(ideal_x0(near, 0.01, candidates, everything[:1]), candidates[3:4], atol=1e-4)


class Oracle(torch.nn.Module):
    """A model whose every CFG mode predicts that mode's ideal velocity on `bucket` (or, with
    `ignore_masks`, the fully conditioned one for every mode: the null conditions never learned)."""

    def __init__(self, bucket, ignore_masks=False):
        super().__init__()
        self.bucket, self.ignore_masks = bucket, ignore_masks

    def forward(
        self, x_t, timestep, encoder_hidden_states, encoder_attention_mask, image_embeds, image_tokens, **drops
    ):
        drop_text, drop_image = drops["drop_text"], drops["drop_image"]
        sigma = timestep[0].item() / 1000
        texts, images = self.bucket.prompt_embeds.flatten(1), self.bucket.image_embeds
        same_text = torch.stack([(texts == e.flatten()).all(1) for e in encoder_hidden_states])
        same_image = torch.stack([(images == e).all(1) for e in image_embeds])
        if self.ignore_masks:
            drop_text, drop_image = torch.zeros_like(drop_text), torch.zeros_like(drop_image)
        allowed = (same_text | drop_text[:, None]) & (same_image | drop_image[:, None])
        x0 = ideal_x0(x_t, sigma, self.bucket.latents, allowed)
        return SimpleNamespace(sample=(x_t - x0) / sigma)


def _bucket_with_siblings(n=8):
    """`n` samples: captions in pairs (as the synthetic set), each image its own embedding."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(n // 2, 4, 8, generator=g).repeat(2, 1, 1)  # sample k and k + n/2 share a caption
    return CachedBucket(
        bucket=(8, 8),
        keys=[f"k{i}" for i in range(n)],
        captions=[f"caption {i % (n // 2)}" for i in range(n)],
        meta=[None] * n,
        latents=torch.rand(n, 3, 8, 8, generator=g) * 2 - 1,
        prompt_embeds=text,
        prompt_attention_mask=torch.ones(n, 4, dtype=torch.long),
        image_embeds=torch.randn(n, 8, generator=g),
        image_tokens=torch.zeros(n, 1, 8),
    )


def _probe(model, bucket):
    pipe = SimpleNamespace(transformer=model, device=torch.device("cpu"))
    noise = torch.randn(bucket.latents.shape, generator=torch.Generator().manual_seed(1))
    return mode_probes(Sampler(pipe, SamplingConfig()), bucket, noise)["predictions"]


def test_the_mode_probe_passes_every_ideal_mode_and_fails_a_never_learned_null_mode():
    bucket = _bucket_with_siblings()
    ideal = _probe(Oracle(bucket), bucket)
    assert {m: p["relative_error"] for m, p in ideal.items()} == pytest.approx(dict.fromkeys(ideal, 0), abs=1e-4)
    broken = _probe(Oracle(bucket, ignore_masks=True), bucket)  # every mode is the conditional one
    assert broken["none"]["relative_error"] == pytest.approx(1, abs=1e-4)  # exactly the never-learned answer
    assert broken["both"]["relative_error"] == pytest.approx(0, abs=1e-4)
    assert broken["text"]["relative_error"] > 0.05  # it knows the image too: not the text-only ideal


def test_the_mode_samples_measure_fails_bare_scenes_and_passes_training_pictures():
    layouts = sample_layouts(100, seed=0)
    side, k = 32, 16
    truth = torch.stack([ground_truth.drawn(layout, side) for layout in layouts])
    bare = torch.stack([ground_truth.scene_alone(layout, side) for layout in layouts[:k]])
    # each row drawn as another training image of its own scene: a learned mode that recombines
    sibling = [next(i for i, o in enumerate(layouts) if o.scene == layouts[r].scene and i != r) for r in range(k)]
    figures, went = measure_mode_samples(truth[:k], truth[sibling], truth, layouts)
    assert figures["text"]["share_drawn"] == 1.0 and figures["image"]["share_drawn"] == 1.0
    assert figures["image_shapes"]["share_drawn"] == 1.0
    assert (went["image_shapes"] >= 1).all()  # every training image holds at least the smallest shape
    # the image-only mode never learned: the right scene, left bare
    figures, went = measure_mode_samples(truth[:k], bare, truth, layouts)
    assert figures["image"]["share_drawn"] >= 0.8  # the scene alone still reads as its own scene
    assert figures["image_shapes"]["share_drawn"] == 0.0 and (went["image_shapes"] == 0).all()
    # ... or its scene drawn a little off as a whole: still no shapes
    figures, _ = measure_mode_samples(truth[:k], (bare + 0.15).clamp(0, 1), truth, layouts)
    assert figures["image_shapes"]["share_drawn"] == 0.0
    # the text-only mode never learned: the bare scene, no shapes
    figures, _ = measure_mode_samples(bare, truth[:k], truth, layouts)
    assert figures["text"]["share_drawn"] == 0.0


def test_the_faintest_shape_is_read_off_the_set():
    layouts = sample_layouts(100, seed=0)
    contrast, smallest = ground_truth.faintest_shape(layouts, 32)
    assert 0 < contrast < 0.5 and 0 < smallest < 32 * 32 * 0.05
    one = next(layout for layout in layouts if len(layout.objects) == 1)
    bare, drawn = ground_truth.scene_alone(one, 32), ground_truth.drawn(one, 32)
    assert ground_truth.shape_pixels(drawn[None], bare[None], contrast).item() >= smallest
    faint = bare + (drawn - bare) * 0.9 * contrast / (drawn - bare).abs().max()  # just under the line
    assert ground_truth.shape_pixels(faint[None], bare[None], contrast).item() == 0
