import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, make_inputs, randomize_
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from nano_dit import NanoDiTPipeline, NanoDiTTransformer2DModel
from nano_dit.encoders import ConditioningEncoders, EncoderSpec
from nano_dit.hub import build_pipeline
from nano_dit.pipelines import guidance_weights
from nano_dit.pipelines.pipeline_nano_dit import MAX_SEQUENCE_LENGTH


def _pipe(model):
    pipe = NanoDiTPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _conditions(config, batch=2):
    inputs = make_inputs(config, batch=batch)
    return {
        "prompt_embeds": inputs["encoder_hidden_states"],
        "prompt_attention_mask": inputs["encoder_attention_mask"],
        "image_embeds": inputs["image_embeds"],
    }


@pytest.mark.parametrize(
    "mode,scales,expected",
    [
        ("independent", (3.0, 2.0), {"none": -4.0, "text": 3.0, "image": 2.0}),
        ("independent", (1.0, 0.0), {"text": 1.0}),
        ("nested", (3.0, 2.0), {"none": -1.0, "image": -1.0, "both": 3.0}),
        ("nested", (1.0, 1.0), {"both": 1.0}),
    ],
)
def test_guidance_weights_write_each_formula_as_a_sum_of_branches(mode, scales, expected):
    assert guidance_weights(mode, *scales) == expected


@pytest.mark.parametrize("mode", ["independent", "nested"])
def test_one_step_applies_the_guidance_formula_in_one_batched_forward(tiny_config, mode):
    model = randomize_(NanoDiTTransformer2DModel(**tiny_config)).eval()
    cond = _conditions(tiny_config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = _pipe(model)(**cond, latents=latents, num_inference_steps=1, guidance_mode=mode, output_type="latent").images
    assert calls == [6]  # three branches x batch 2, one forward

    def v(drop_text, drop_image):
        t = torch.full((2,), 1000.0)
        mask = {"drop_text": torch.tensor([drop_text] * 2), "drop_image": torch.tensor([drop_image] * 2)}
        with torch.no_grad():
            return model(
                latents, t, cond["prompt_embeds"], cond["prompt_attention_mask"], cond["image_embeds"], **mask
            ).sample

    v_none, v_text, v_image, v_both = v(True, True), v(False, True), v(True, False), v(False, False)
    if mode == "independent":
        guided = v_none + 3.0 * (v_text - v_none) + 2.0 * (v_image - v_none)
    else:
        guided = v_none + 2.0 * (v_image - v_none) + 3.0 * (v_both - v_image)
    torch.testing.assert_close(out, latents - guided, atol=1e-5, rtol=1e-5)  # σ: 1 -> 0


def test_unit_nested_scales_run_the_conditional_branch_alone(tiny_config):
    model = randomize_(NanoDiTTransformer2DModel(**tiny_config)).eval()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    _pipe(model)(
        **_conditions(tiny_config),
        num_inference_steps=3,
        guidance_scale=1.0,
        image_guidance_scale=1.0,
        guidance_mode="nested",
        output_type="latent",
    )
    assert calls == [2, 2, 2]


def test_an_untrained_model_leaves_the_latents_unchanged(tiny_config):
    model = NanoDiTTransformer2DModel(**tiny_config)  # v = 0 exactly
    latents = torch.randn(2, 4, 8, 8)
    out = _pipe(model)(**_conditions(tiny_config), latents=latents, num_inference_steps=4, output_type="latent")
    assert torch.equal(out.images, latents)


def test_save_and_load_give_identical_images(tiny_config, tmp_path):
    pipe = _pipe(randomize_(NanoDiTTransformer2DModel(**tiny_config)).eval())
    pipe.save_pretrained(tmp_path)
    loaded = NanoDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    cond = _conditions(tiny_config)
    a = pipe(**cond, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = loaded(**cond, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (2, 8, 8, 4)
    assert (a == b).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"guidance_mode": "sum"}, "guidance_mode must be one of"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0, got -1.0"),
        ({"height": 9}, "height and width must be multiples of 2, got height=9"),
    ],
)
def test_bad_arguments_raise_a_value_error(tiny_config, kwargs, message):
    pipe = _pipe(NanoDiTTransformer2DModel(**tiny_config))
    with pytest.raises(ValueError, match=message):
        pipe(**_conditions(tiny_config), num_inference_steps=1, **kwargs)


def test_prompt_and_image_batch_sizes_must_match(tiny_config):
    cond = _conditions(tiny_config)
    cond["image_embeds"] = cond["image_embeds"][:1]
    with pytest.raises(ValueError, match="prompt and image batch sizes differ"):
        _pipe(NanoDiTTransformer2DModel(**tiny_config))(**cond, num_inference_steps=1)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_sigma_schedule_is_linear_and_shifted_exactly_once(tiny_config, shift):
    pipe = NanoDiTPipeline(
        transformer=NanoDiTTransformer2DModel(**tiny_config), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift)
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(**_conditions(tiny_config), num_inference_steps=5, output_type="latent")
    linear = torch.linspace(1.0, 0.2, 5, dtype=torch.float64)
    expected = shift * linear / (1 + (shift - 1) * linear)  # SD3's shift, applied once
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), expected, atol=1e-6, rtol=0)
    assert pipe.scheduler.sigmas[-1] == 0
    torch.testing.assert_close(pipe.scheduler.timesteps.double(), expected * 1000, atol=1e-3, rtol=0)


def test_a_generator_makes_sampling_repeatable_and_a_new_seed_changes_it(tiny_model, tiny_config):
    pipe, cond = _pipe(tiny_model), _conditions(tiny_config)

    def run(seed):
        return pipe(**cond, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="pt")

    a, b, c = run(0).images, run(0).images, run(1).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_output_types(tiny_model, tiny_config):
    pipe, cond = _pipe(tiny_model), _conditions(tiny_config)
    out = {
        t: pipe(**cond, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type=t).images
        for t in ("pil", "np", "pt", "latent")
    }
    assert [im.size for im in out["pil"]] == [(8, 8), (8, 8)]  # pixel mode here: the 4 channels are "RGBA"
    assert out["np"].shape == (2, 8, 8, 4) and 0 <= out["np"].min() and out["np"].max() <= 1
    assert out["pt"].shape == (2, 4, 8, 8)
    torch.testing.assert_close(out["pt"], ((out["latent"].clamp(-1, 1) + 1) / 2))
    assert pipe(**cond, num_inference_steps=1, output_type="latent", return_dict=False)[0].shape == (2, 4, 8, 8)


def test_num_images_per_prompt_gives_each_image_its_own_noise(tiny_model, tiny_config):
    calls = []
    tiny_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    images = _pipe(tiny_model)(
        **_conditions(tiny_config), num_inference_steps=1, num_images_per_prompt=3, output_type="pt"
    ).images
    assert images.shape[0] == 6 and calls == [3 * 6]  # three branches of 6 images, one forward
    assert not torch.allclose(images[0], images[1])


def test_an_absent_image_drops_its_guidance_term_and_its_branches(tiny_model, tiny_config):
    cond = _conditions(tiny_config)
    del cond["image_embeds"]
    batch_sizes = []
    tiny_model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    _pipe(tiny_model)(**cond, num_inference_steps=1, output_type="latent")
    assert batch_sizes == [4]  # ∅ and text-only, batch 2: no image-only branch


def test_callback_on_step_end_sees_and_may_replace_the_latents(tiny_model, tiny_config):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = _pipe(tiny_model)(
        **_conditions(tiny_config), num_inference_steps=3, callback_on_step_end=callback, output_type="latent"
    )
    assert seen == [(0, (2, 4, 8, 8)), (1, (2, 4, 8, 8)), (2, (2, 4, 8, 8))]
    assert torch.equal(out.images, torch.zeros(2, 4, 8, 8))


def test_under_bf16_autocast_the_guided_step_runs_in_fp32_and_the_latents_stay_fp32(tiny_model, tiny_config):
    """Validation samples an fp32 pipeline under bf16 autocast (as the run trained): the branches
    come out in bf16, but the guided sum (weights −1, −1, 3) and the Euler step are fp32."""
    seen = []
    tiny_model.register_forward_hook(lambda m, args, out: seen.append(out.sample.dtype))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    args = dict(**_conditions(tiny_config), latents=latents, num_inference_steps=4, output_type="latent")
    reference = _pipe(tiny_model)(**args).images
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _pipe(tiny_model)(**args).images
    assert seen[-1] == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)


def test_load_with_torch_dtype(tiny_model, tmp_path):
    _pipe(tiny_model).save_pretrained(tmp_path)
    pipe = NanoDiTPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert isinstance(pipe.transformer, NanoDiTTransformer2DModel)


def test_diffusers_still_needs_the_loading_view(tiny_model, tmp_path):
    """`NanoDiTPipeline.from_pretrained` reads a view of the folder whose model_index.json names the
    installed classes (docs/design.md). This is why: diffusers' own loader, called on the installed
    class and handed the transformer, still takes the folder's carried modules for custom code. The
    day it loads the folder directly, this fails: drop the view."""
    from diffusers import DiffusionPipeline

    _pipe(tiny_model).save_pretrained(tmp_path)
    transformer = NanoDiTTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained.__func__(NanoDiTPipeline, tmp_path, transformer=transformer)
    assert isinstance(NanoDiTPipeline.from_pretrained(tmp_path), NanoDiTPipeline)  # through the view


def test_a_bf16_pipeline_samples_close_to_fp32_and_a_compiled_one_saves_plain_names(tiny_model, tiny_config, tmp_path):
    conditions = _conditions(tiny_config)

    def run(pipe):
        return pipe(
            **conditions, num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0)
        ).images

    reference = run(_pipe(tiny_model))
    _pipe(tiny_model).save_pretrained(tmp_path / "fp32")
    half = NanoDiTPipeline.from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    assert (run(half).float() - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 tolerance

    graphs = []
    pipe = _pipe(tiny_model)
    pipe.transformer.compile(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    assert torch.allclose(run(pipe), reference, atol=1e-5) and len(graphs) == 1
    pipe.save_pretrained(tmp_path / "compiled")
    reloaded = NanoDiTPipeline.from_pretrained(tmp_path / "compiled")
    assert reloaded.transformer.state_dict().keys() == tiny_model.state_dict().keys()  # no `_orig_mod.`
    assert torch.equal(run(reloaded), reference)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"output_type": "jpeg"}, "output_type must be one of"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer, got 0"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer, got 0"),
        ({"prompt": "a red circle"}, "pass either prompt or prompt_embeds"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, r"must be among \['latents'\], got \['noise'\]"),
        ({"latents": torch.zeros(2, 4, 4, 4)}, r"latents must have shape \(2, 4, 8, 8\), got \(2, 4, 4, 4\)"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0, got nan"),
        ({"image_guidance_scale": float("inf")}, "image_guidance_scale must be a finite number >= 0, got inf"),
        ({"image_embeds": torch.full((2, 16), float("nan"))}, "image_embeds holds NaN or infinite values"),
        ({"height": 0}, r"height must be a positive integer \(or None for the default\), got 0"),
        ({"height": -32}, "height must be a positive integer .*got -32"),
        ({"generator": [torch.Generator()] * 3}, r"got 3 generators for 2 image\(s\)"),
        ({"image_embeds": torch.zeros(2, 999)}, r"image_embeds must have shape \(B, 16\), got \(2, 999\)"),
        ({"prompt_attention_mask": torch.ones(2, 3)}, r"prompt_attention_mask must have shape \(2, 5\)"),
    ],
)
def test_more_bad_arguments_name_the_argument(tiny_config, kwargs, message):
    pipe = _pipe(NanoDiTTransformer2DModel(**tiny_config))
    with pytest.raises(ValueError, match=message):
        pipe(**{**_conditions(tiny_config), "num_inference_steps": 1, **kwargs})


# --------------------------------------------------------------------------------------------
# With the stand-in encoders: prompts and reference images in, the same features as the cache
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_pipe(stand_in_dir):
    from nano_dit.hub import build_pipeline

    config = dict(TINY_CONFIG, in_channels=16, text_embed_dim=64, image_embed_dim=64, sample_size=4)
    pipe = build_pipeline(randomize_(NanoDiTTransformer2DModel(**config)).eval(), EncoderSpec.stand_in(stand_in_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(n, size=32):
    from PIL import Image

    return [Image.new("RGB", (size, size), (40 * i, 200 - 30 * i, 90)) for i in range(n)]


PROMPTS = ["a small red circle on the left and a large blue square at the top", "a large blue square at the top"]


SHORT_WINDOW = 4  # T5 tokens: both PROMPTS are longer


def _short_window(stand_in_dir):
    """The stand-in encoders as the feature cache loads them with a 4-token text window, and a
    pipeline of the same encoders told that window (as a run with `--max-sequence-length 4` ships)."""
    spec = dataclasses.replace(EncoderSpec.stand_in(stand_in_dir), max_sequence_length=SHORT_WINDOW)
    encoders = ConditioningEncoders(spec, device="cpu")
    config = dict(TINY_CONFIG, in_channels=16, text_embed_dim=64, image_embed_dim=64, sample_size=4)
    pipe = build_pipeline(randomize_(NanoDiTTransformer2DModel(**config)).eval(), spec)  # as a run ships it
    pipe.set_progress_bar_config(disable=True)
    return encoders, pipe


@pytest.fixture(scope="module")
def short_window_folder(stand_in_dir, tmp_path_factory):
    encoders, pipe = _short_window(stand_in_dir)
    folder = tmp_path_factory.mktemp("short_window")
    pipe.save_pretrained(folder)
    return encoders, folder


def test_a_saved_pipeline_keeps_its_text_window_and_encodes_exactly_as_the_feature_cache_does(short_window_folder):
    encoders, folder = short_window_folder
    assert encoders.count_truncated(PROMPTS) == 2  # the window cuts both prompts: a default would not
    assert json.loads((folder / "model_index.json").read_text())["max_sequence_length"] == SHORT_WINDOW
    pipe = NanoDiTPipeline.from_pretrained(folder)
    assert pipe.config.max_sequence_length == SHORT_WINDOW
    embeds, mask = pipe.encode_prompt(PROMPTS)
    cached_embeds, cached_mask = encoders.encode_text(PROMPTS)
    assert mask.shape == (2, SHORT_WINDOW)
    assert torch.equal(embeds, cached_embeds) and torch.equal(mask, cached_mask)
    global_embeds, tokens = pipe.encode_image(_images(2))
    cached_global, cached_tokens = encoders.encode_images(_images(2))
    assert torch.equal(global_embeds, cached_global) and torch.equal(tokens, cached_tokens)


def test_the_text_window_survives_loading_without_this_package(short_window_folder, tmp_path):
    encoders, folder = short_window_folder
    script = f"""
import sys
sys.modules["nano_dit"] = None  # as if this package were not installed: importing it fails
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
embeds, mask = pipe.encode_prompt({PROMPTS!r})
save_file({{"embeds": embeds, "mask": mask}}, {str(tmp_path / "remote.safetensors")!r})
print(type(pipe).__module__, pipe.config.max_sequence_length)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, window = done.stdout.split()[-2:]
    assert module.split(".")[0] not in ("nano_dit", "pipelines") and window == str(SHORT_WINDOW)
    remote = load_file(tmp_path / "remote.safetensors")
    cached_embeds, cached_mask = encoders.encode_text(PROMPTS)
    assert torch.equal(remote["embeds"], cached_embeds) and torch.equal(remote["mask"], cached_mask)


def test_the_call_s_text_window_defaults_to_the_pipeline_s_config(stand_in_dir):
    _, pipe = _short_window(stand_in_dir)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = dict(num_inference_steps=2, output_type="latent")
    default = pipe(PROMPTS, generator=seed(), **common).images
    assert torch.equal(default, pipe(PROMPTS, max_sequence_length=SHORT_WINDOW, generator=seed(), **common).images)
    wide = pipe(PROMPTS, max_sequence_length=MAX_SEQUENCE_LENGTH, generator=seed(), **common).images
    assert not torch.equal(default, wide)
    assert pipe.encode_prompt(PROMPTS)[1].shape == (2, SHORT_WINDOW)


def test_a_folder_saved_without_a_text_window_loads_with_the_default(tiny_model, tmp_path):
    pipe = _pipe(tiny_model)
    assert pipe.config.max_sequence_length == MAX_SEQUENCE_LENGTH == EncoderSpec().max_sequence_length
    pipe.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    del index["max_sequence_length"]  # as pipelines were saved before the window was recorded
    index_path.write_text(json.dumps(index))
    assert NanoDiTPipeline.from_pretrained(tmp_path).config.max_sequence_length == MAX_SEQUENCE_LENGTH
    assert NanoDiTPipeline.from_pretrained(tmp_path, max_sequence_length=6).config.max_sequence_length == 6


@pytest.mark.parametrize("window", [0, -3, 4.0, True])
def test_a_text_window_that_is_not_a_positive_integer_is_refused(tiny_model, window):
    with pytest.raises(ValueError, match=f"max_sequence_length must be a positive integer, got {window!r}"):
        NanoDiTPipeline(
            transformer=tiny_model, scheduler=FlowMatchEulerDiscreteScheduler(), max_sequence_length=window
        )


def test_a_prompt_and_a_reference_image_give_the_same_images_as_their_embeddings(encoder_pipe):
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    from_inputs = encoder_pipe(PROMPTS, _images(2), num_inference_steps=2, generator=seed(), output_type="np")
    embeds, mask = encoder_pipe.encode_prompt(PROMPTS)
    image_embeds, _ = encoder_pipe.encode_image(_images(2))
    from_embeds = encoder_pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        image_embeds=image_embeds,
        num_inference_steps=2,
        generator=seed(),
        output_type="np",
    )
    assert from_inputs.images.shape == (2, 32, 32, 3)  # through the VAE: 4×4 latents, ×8
    assert (from_inputs.images == from_embeds.images).all()


def test_max_sequence_length_caps_the_prompt_tokens_in_the_call_as_in_encode_prompt(encoder_pipe):
    embeds, mask = encoder_pipe.encode_prompt(PROMPTS, max_sequence_length=3)
    assert embeds.shape[1] == 3 and mask.shape == (2, 3)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = dict(num_inference_steps=2, output_type="latent")
    capped = encoder_pipe(PROMPTS, max_sequence_length=3, generator=seed(), **common).images
    from_embeds = encoder_pipe(prompt_embeds=embeds, prompt_attention_mask=mask, generator=seed(), **common).images
    assert torch.equal(capped, from_embeds)
    assert not torch.equal(capped, encoder_pipe(PROMPTS, generator=seed(), **common).images)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": PROMPTS, "image": _images(3)}, r"got 2 prompt\(s\) and 3 image\(s\)"),
        ({"prompt": PROMPTS[0], "image": "photo.png"}, "image must be a PIL image.*got \\['str'\\]"),
        ({"prompt": PROMPTS[0], "image": torch.zeros(1, 1, 8, 8)}, r"image tensor must be float \(B, 3, H, W\)"),
        ({"prompt": PROMPTS[0], "height": 36}, "height and width must be multiples of 16, got height=36"),
        ({"prompt": [3]}, "prompt must be a string or a non-empty list of strings"),
    ],
)
def test_bad_prompts_and_images_name_the_argument(encoder_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encoder_pipe(**kwargs, num_inference_steps=1)


def test_a_reference_image_as_pil_tensor_or_numpy_gives_the_same_dinov3_features(encoder_pipe):
    """A float tensor in [0, 1], as the docstring invites, was once rescaled by 1/255 a second time
    (pixels near −2, a blank image to DINOv3). Every form of the same picture must agree."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    uint8 = (torch.rand(2, 40, 48, 3, generator=g) * 255).round().byte().numpy()  # (B, H, W, 3)
    pil = [Image.fromarray(a) for a in uint8]
    reference, reference_tokens = encoder_pipe.encode_image(pil)
    forms = {
        "tensor (B, 3, H, W)": torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255,
        "list of tensors (3, H, W)": list(torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255),
        "float array (B, H, W, 3)": uint8.astype(np.float32) / 255,
        "uint8 array (B, H, W, 3)": uint8,
        "list of uint8 arrays": list(uint8),
    }
    for name, image in forms.items():
        embeds, tokens = encoder_pipe.encode_image(image)
        torch.testing.assert_close(embeds, reference, rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(tokens, reference_tokens, rtol=1e-4, atol=1e-4, msg=name)


def test_a_float_image_outside_0_1_is_refused_naming_its_range(encoder_pipe):
    with pytest.raises(ValueError, match=r"float image values must lie in \[0, 1\], got \[0, 255\]"):
        encoder_pipe.encode_image(torch.full((1, 3, 32, 32), 255.0).index_fill_(1, torch.tensor([0]), 0.0))


def test_callbacks_read_the_call_state_and_may_interrupt_as_in_diffusers(tiny_model, tiny_config):
    seen, at_step_1 = [], {}

    def callback(pipe, i, t, tensors):
        seen.append((i, pipe.num_timesteps, pipe.guidance_scale, pipe.image_guidance_scale))
        assert pipe.do_classifier_free_guidance
        if i == 1:
            at_step_1["latents"] = tensors["latents"].clone()
            pipe._interrupt = True  # diffusers' way to stop early
        return {}

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = _pipe(tiny_model)(
        **_conditions(tiny_config),
        latents=latents,
        num_inference_steps=4,
        guidance_scale=2.5,
        image_guidance_scale=1.5,
        output_type="latent",
        callback_on_step_end=callback,
    ).images
    assert seen == [(0, 4, 2.5, 1.5), (1, 4, 2.5, 1.5)]  # no step after the interrupt
    assert torch.equal(out, at_step_1["latents"])


def test_guidance_scale_is_the_text_scale(tiny_model, tiny_config):
    args = dict(**_conditions(tiny_config), num_inference_steps=2, output_type="latent")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    new = _pipe(tiny_model)(**args, latents=latents, guidance_scale=2.5).images
    default = _pipe(tiny_model)(**args, latents=latents).images
    assert not torch.equal(default, new)  # the scale took effect
    with pytest.raises(TypeError, match="guidance_scal"):
        _pipe(tiny_model)(**args, latents=latents, guidance_scal=2.5)


def test_a_callback_that_cuts_guidance_changes_the_branches_run_from_the_next_step(tiny_model, tiny_config):
    """diffusers' CFG cut-off callbacks set `pipe._guidance_scale` mid-call; the steps after it
    follow the new scales: nested at (1, 1) runs the conditional branch alone."""
    batches = []
    tiny_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))

    def cut_after_step_1(pipe, i, t, tensors):
        if i == 1:
            pipe._guidance_scale, pipe._image_guidance_scale = 1.0, 1.0
        return {}

    def sample(**kwargs):
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        args = dict(**_conditions(tiny_config), num_inference_steps=4, output_type="latent")
        return _pipe(tiny_model)(**args, latents=latents, guidance_mode="nested", **kwargs).images

    cut = sample(callback_on_step_end=cut_after_step_1)
    assert batches == [6, 6, 2, 2]  # 3 branches × 2 images, then the conditional branch alone
    batches.clear()
    assert not torch.equal(cut, sample())
    assert batches == [6, 6, 6, 6]


def test_numpy_scalars_are_accepted_as_guidance_scales(tiny_model, tiny_config):
    args = dict(**_conditions(tiny_config), num_inference_steps=2, output_type="latent")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = _pipe(tiny_model)(**args, latents=latents, guidance_scale=2.5, image_guidance_scale=1.5).images
    numpy = _pipe(tiny_model)(
        **args, latents=latents, guidance_scale=np.float32(2.5), image_guidance_scale=np.float64(1.5)
    ).images
    assert torch.equal(plain, numpy)
