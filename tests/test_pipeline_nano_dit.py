import pytest
import torch
from conftest import make_inputs, randomize_
from diffusers import FlowMatchEulerDiscreteScheduler

from nano_dit import NanoDiTPipeline, NanoDiTTransformer2DModel
from nano_dit.pipelines import guidance_weights


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
        text_guidance_scale=1.0,
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
        ({"text_guidance_scale": -1.0}, "guidance scales must be >= 0"),
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
