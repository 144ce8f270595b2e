import shutil

import pytest
import torch
from conftest import TINY_CONFIG, make_inputs, randomize_
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from nano_dit import NanoDiTTransformer2DModel


def _run(model, **inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("height,width", [(8, 8), (8, 12), (16, 8), (4, 20)])
def test_output_shape_matches_latents_for_any_grid(tiny_model, tiny_config, height, width):
    inputs = make_inputs(tiny_config, batch=3, height=height, width=width)
    v = _run(tiny_model, **inputs)
    assert v.shape == (3, tiny_config["in_channels"], height, width)
    assert torch.isfinite(v).all()


def test_default_config_is_the_seed_nano_model_with_30_to_50m_parameters():
    model = NanoDiTTransformer2DModel()
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (12, 384, 6)
    assert (config.patch_size, config.in_channels) == (2, 16)
    assert 30e6 <= model.num_parameters() <= 50e6


def test_untrained_model_predicts_exactly_zero(tiny_config):
    model = NanoDiTTransformer2DModel(**tiny_config)
    v = _run(model, **make_inputs(tiny_config))
    assert torch.equal(v, torch.zeros_like(v))


def test_return_dict_false_gives_a_tuple(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    out = tiny_model(**inputs)
    assert isinstance(out, Transformer2DModelOutput)
    with torch.no_grad():
        (v,) = tiny_model(**inputs, return_dict=False)
    assert torch.equal(v, out.sample)


def test_save_and_load_round_trip_gives_identical_outputs(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = NanoDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(tiny_model.config)
    inputs = make_inputs(tiny_config)
    assert torch.equal(_run(loaded, **inputs), _run(tiny_model, **inputs))


def test_samples_in_a_batch_do_not_affect_each_other(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, batch=3)
    inputs["encoder_attention_mask"][1, 3:] = 0
    inputs["drop_text"] = torch.tensor([False, True, False])
    inputs["drop_image"] = torch.tensor([True, False, False])
    batched = _run(tiny_model, **inputs)
    for i in range(3):
        single = _run(tiny_model, **{k: v[i : i + 1] for k, v in inputs.items()})
        torch.testing.assert_close(single, batched[i : i + 1], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config):
    torch.manual_seed(0)
    model = randomize_(NanoDiTTransformer2DModel(**tiny_config))
    inputs = make_inputs(tiny_config)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs).sample.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = loss_and_grads()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


@pytest.mark.parametrize("use_image_tokens", [False, True])
def test_every_parameter_gets_a_gradient_whatever_is_dropped(tiny_config, use_image_tokens):
    # DDP without find_unused_parameters needs every parameter in the graph on every step.
    model = randomize_(NanoDiTTransformer2DModel(**tiny_config, use_image_tokens=use_image_tokens))
    inputs = make_inputs(tiny_config)
    inputs["drop_text"] = torch.tensor([True, True])
    inputs["drop_image"] = torch.tensor([True, False])
    model(**inputs).sample.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_padded_text_tokens_do_not_change_the_output(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, text_len=5)
    reference = _run(tiny_model, **inputs)
    padding = torch.randn(2, 3, tiny_config["text_embed_dim"]) * 10
    inputs["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], padding], dim=1)
    inputs["encoder_attention_mask"] = torch.cat([inputs["encoder_attention_mask"], torch.zeros(2, 3)], dim=1)
    torch.testing.assert_close(_run(tiny_model, **inputs), reference, atol=1e-5, rtol=1e-5)


def test_a_dropped_text_makes_the_output_independent_of_the_text(tiny_model, tiny_config):
    a = make_inputs(tiny_config, text_len=5, seed=0)
    b = dict(a, encoder_hidden_states=torch.randn(2, 9, tiny_config["text_embed_dim"]))
    b["encoder_attention_mask"] = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    # Kept, the text matters; dropped, neither its values, its length nor its mask do.
    assert not torch.allclose(_run(tiny_model, **a), _run(tiny_model, **b))
    drop = torch.tensor([True, True])
    dropped_a = _run(tiny_model, **a, drop_text=drop)
    torch.testing.assert_close(_run(tiny_model, **b, drop_text=drop), dropped_a)
    # ... and dropping every text equals giving no text at all.
    none = dict(a, encoder_hidden_states=None, encoder_attention_mask=None)
    torch.testing.assert_close(_run(tiny_model, **none), dropped_a)


@pytest.mark.parametrize("use_image_tokens", [False, True])
def test_a_dropped_image_makes_the_output_independent_of_the_image(tiny_config, use_image_tokens):
    torch.manual_seed(0)
    model = randomize_(NanoDiTTransformer2DModel(**tiny_config, use_image_tokens=use_image_tokens)).eval()
    width = tiny_config["image_embed_dim"]
    a = make_inputs(tiny_config, seed=0)
    b = dict(a, image_embeds=torch.randn(2, width))
    if use_image_tokens:
        a["image_tokens"] = torch.randn(2, 6, width)
        b["image_tokens"] = torch.randn(2, 3, width)
    assert not torch.allclose(_run(model, **a), _run(model, **b))
    drop = torch.tensor([True, True])
    dropped_a = _run(model, **a, drop_image=drop)
    torch.testing.assert_close(_run(model, **b, drop_image=drop), dropped_a)
    none = {k: v for k, v in a.items() if k not in ("image_embeds", "image_tokens")}
    torch.testing.assert_close(_run(model, **none), dropped_a)


def test_drop_masks_act_per_sample(tiny_model, tiny_config):
    a = make_inputs(tiny_config, seed=0)
    b = dict(a, encoder_hidden_states=torch.randn(2, 5, tiny_config["text_embed_dim"]))
    drop = torch.tensor([True, False])
    va, vb = _run(tiny_model, **a, drop_text=drop), _run(tiny_model, **b, drop_text=drop)
    torch.testing.assert_close(va[0], vb[0])  # dropped: text ignored
    assert not torch.allclose(va[1], vb[1])  # kept: text used


def test_timestep_changes_the_output_and_may_be_a_scalar(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    at_100 = _run(tiny_model, **dict(inputs, timestep=torch.full((2,), 100.0)))
    at_900 = _run(tiny_model, **dict(inputs, timestep=torch.full((2,), 900.0)))
    assert not torch.allclose(at_100, at_900)
    torch.testing.assert_close(_run(tiny_model, **dict(inputs, timestep=torch.tensor(100.0))), at_100)


# --------------------------------------------------------------------------------------------
# Bad input names what was expected and what came
# --------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "channels": (lambda i, c: i.update(hidden_states=torch.randn(2, 3, 8, 8)), "3 channels, expected in_channels=4"),
    "not 4-d": (lambda i, c: i.update(hidden_states=torch.randn(2, 4, 8)), r"\(B, C, H, W\)"),
    "grid": (lambda i, c: i.update(hidden_states=torch.randn(2, 4, 8, 9)), "8x9 is not divisible by patch_size=2"),
    "text width": (
        lambda i, c: i.update(encoder_hidden_states=torch.randn(2, 5, 7)),
        r"encoder_hidden_states must have shape \(B=2, L, 24\), got \(2, 5, 7\)",
    ),
    "text batch": (
        lambda i, c: i.update(encoder_hidden_states=torch.randn(3, 5, 24)),
        r"\(B=2, L, 24\), got \(3, 5, 24\)",
    ),
    "mask shape": (
        lambda i, c: i.update(encoder_attention_mask=torch.ones(2, 6)),
        r"encoder_attention_mask must have shape \(B, L\) = \(2, 5\).*got \(2, 6\)",
    ),
    "image width": (
        lambda i, c: i.update(image_embeds=torch.randn(2, 15)),
        r"image_embeds must have shape \(B, 16\) = \(2, 16\), got \(2, 15\)",
    ),
    "drop_text shape": (
        lambda i, c: i.update(drop_text=torch.tensor([True, False, True])),
        r"drop_text must have shape \(B,\) = \(2,\), got \(3,\)",
    ),
    "drop_image shape": (
        lambda i, c: i.update(drop_image=torch.ones(2, 1, dtype=torch.bool)),
        r"drop_image must have shape \(B,\) = \(2,\), got \(2, 1\)",
    ),
    "timestep shape": (lambda i, c: i.update(timestep=torch.ones(5)), r"timestep must have shape \(B,\)"),
    "image tokens off": (
        lambda i, c: i.update(image_tokens=torch.randn(2, 4, 16)),
        "use_image_tokens=False",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_value_error_naming_it(tiny_model, tiny_config, case):
    corrupt, message = BAD_INPUTS[case]
    inputs = make_inputs(tiny_config)
    corrupt(inputs, tiny_config)
    with pytest.raises(ValueError, match=message):
        tiny_model(**inputs)


def test_bad_config_raises_a_value_error():
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_attention_heads=4"):
        NanoDiTTransformer2DModel(**dict(TINY_CONFIG, hidden_size=30))


def test_conditioning_in_another_dtype_is_cast_to_the_model_dtype(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config)
    reference = _run(tiny_model, **inputs)
    for key in ("encoder_hidden_states", "image_embeds"):
        inputs[key] = inputs[key].double()
    torch.testing.assert_close(_run(tiny_model, **inputs), reference)


def test_bf16_latents_are_cast_at_the_door_of_an_fp32_model(tiny_model, tiny_config):
    """Features cached by bf16 encoders (a GPU) reach an fp32 model with autocast off: the model
    casts them to its weights' dtype (this crashed PatchEmbed's conv once)."""
    inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in make_inputs(tiny_config).items()}
    widened = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    out = _run(tiny_model, **inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _run(tiny_model, **widened))


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler"
)
def test_the_inductor_compiled_model_matches_eager_in_fp32_and_within_bf16_tolerance(tiny_config):
    """What --compile runs (torch.compile, inductor: generated kernels), against the eager model."""
    torch._dynamo.reset()
    model = randomize_(NanoDiTTransformer2DModel(**tiny_config))
    compiled = torch.compile(model, dynamic=False)
    inputs = make_inputs(tiny_config, batch=2)

    def forward_backward(m, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(**inputs).sample
        out.float().square().mean().backward()
        return out.float(), torch.cat([p.grad.flatten() for p in model.parameters()])

    # All gradients as one vector: some are zero in exact arithmetic (a key bias shifts every
    # logit of a query alike, and softmax ignores that), so only their rounding noise is compared.
    for autocast, tol in ((False, 1e-4), (True, 3e-2)):  # fp32; bf16 keeps ~3 significant digits
        out, grads = forward_backward(model, autocast)
        out_c, grads_c = forward_backward(compiled, autocast)
        assert (out_c - out).abs().max() <= tol * out.abs().max()
        assert (grads_c - grads).norm() <= tol * grads.norm()


def test_regional_compilation_compiles_each_block_and_changes_no_output(tiny_model, tiny_config):
    """diffusers' `compile_repeated_blocks`: the blocks compiled in place ("eager" backend: graph
    capture without code generation), the outputs and the state-dict names unchanged."""
    torch._dynamo.reset()
    inputs = make_inputs(tiny_config)
    reference = _run(tiny_model, **inputs)
    names = set(tiny_model.state_dict())
    tiny_model.compile_repeated_blocks(backend="eager", fullgraph=True)
    assert all(block._compiled_call_impl is not None for block in tiny_model.transformer_blocks)
    assert tiny_model._compiled_call_impl is None  # the model around them stays eager
    torch.testing.assert_close(_run(tiny_model, **inputs), reference)
    assert set(tiny_model.state_dict()) == names
