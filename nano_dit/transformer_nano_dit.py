"""Nano DiT: a small diffusion transformer conditioned on T5 text tokens and a DINOv3 image embedding.

The whole architecture reads top to bottom in this file:

    latents (B, C, H, W)
      -> PatchEmbed + 2-D sin-cos positions           (B, N, D),  N = H·W / p²
    timestep σ·1000 + DINOv3 global embedding
      -> conditioning vector c                         (B, D)      drives adaLN-Zero
    T5 tokens (+ optional DINOv3 patch tokens)
      -> cross-attention context                       (B, L(+M), D)
    NanoDiTBlock × num_layers:
      adaLN-Zero self-attention -> cross-attention -> adaLN-Zero MLP
    final adaLN + linear -> unpatchify                 (B, C, H, W)  velocity v = ε − x0

A dropped condition (classifier-free guidance) is a per-sample boolean mask; the model swaps in a
*learned* null embedding with ``torch.where`` so that every parameter stays in the graph each step
(DDP then needs no ``find_unused_parameters``), and sampling with CFG uses the very same masks.

The pieces come from diffusers wherever it has them (``PatchEmbed``, ``AdaLayerNormZero``,
``AdaLayerNormContinuous``, ``CombinedTimestepTextProjEmbeddings``, ``FeedForward``, the attention
dispatcher and its mixins); what is ours is how they are put together. The model class carries
diffusers' model interfaces: attention processors and backends (``AttentionMixin``), LoRA
adapters (``PeftAdapterMixin``), sampling caches (``CacheMixin``: First-Block, PAB, FasterCache,
MagCache, TaylorSeer) and regional compilation (``_repeated_blocks``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    PatchEmbed,
    PixArtAlphaTextProjection,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.utils import apply_lora_scale
from torch import nn


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class NanoDiTAttnProcessor:
    """Projections to heads, then diffusers' attention dispatcher.

    `dispatch_attention_fn` runs whichever backend the user chose: `model.set_attention_backend`
    ("flash", "_native_cudnn", "sage", ...; stored on this processor), the `attention_backend(...)`
    context manager, or `DIFFUSERS_ATTN_BACKEND`; PyTorch's SDPA ("native") by default. Tokens
    stay in the dispatcher's (B, S, heads, head_dim) layout throughout.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: NanoDiTAttention,
        hidden_states: torch.Tensor,  # (B, N, D)
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, D): cross-attention context
        attention_mask: torch.Tensor | None = None,  # (B, 1, 1, S) bool, True = attend
    ) -> torch.Tensor:
        if attn.fused_projections and encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif attn.fused_projections:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=None
        )  # (B, N, heads, head_dim)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class NanoDiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with diffusers' attention interface.

    `AttentionModuleMixin` gives it `set_processor`, `set_attention_backend` and
    `fuse_projections` (one q·k·v matmul for self-attention, one k·v matmul for cross-attention).
    The parameter names are those of diffusers' `Attention` (`to_q`, `to_k`, `to_v`, `to_out.0`),
    so checkpoints saved with it load unchanged.
    """

    _default_processor_cls = NanoDiTAttnProcessor
    _available_processors = [NanoDiTAttnProcessor]

    def __init__(self, dim: int, heads: int, is_cross_attention: bool = False, processor=None):
        super().__init__()
        self.heads = heads
        self.is_cross_attention = is_cross_attention
        self.use_bias = True
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask)


# --------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------
class NanoDiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the conditioning context, adaLN-Zero MLP.

    The gated branches (self-attention, MLP) take shift / scale / gate from the conditioning vector
    (DiT, Peebles & Xie 2023, §3.2). Cross-attention is pre-normed and ungated, as in PixArt-α; its
    output projection is zero-initialised so that, like the gated branches, the block starts as
    the identity.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)  # c -> 6 modulation vectors; LayerNorm without affine
        self.attn = NanoDiTAttention(dim, num_heads)
        # No affine: a per-channel scale and shift right before the cross-attention projections
        # is redundant with them (W·(γ⊙x + β) + b is again a linear map of x).
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = NanoDiTAttention(dim, num_heads, is_cross_attention=True)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, N, D) image tokens
        temb: torch.Tensor,  # (B, D) timestep + DINOv3 global
        encoder_hidden_states: torch.Tensor,  # (B, S, D) text (+ DINOv3 patch) tokens
        attention_mask: torch.Tensor,  # (B, 1, 1, S) bool, True = attend
    ) -> torch.Tensor:
        x = hidden_states
        # addcmul(a, b, c) = a + b·c in one pass over the (B, N, D) tensors instead of two.
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        x = torch.addcmul(x, gate_msa[:, None], self.attn(h))
        x = x + self.cross_attn(self.norm2(x), encoder_hidden_states, attention_mask)
        h = torch.addcmul(shift_mlp[:, None], self.norm3(x), 1 + scale_mlp[:, None])
        x = torch.addcmul(x, gate_mlp[:, None], self.ff(h))
        return x


# diffusers' block caches (First-Block, MagCache) find a block's input and output through this
# registry: the block takes `hidden_states` and returns the new hidden states alone.
TransformerBlockRegistry.register(
    NanoDiTBlock, TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class NanoDiTTransformer2DModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, CacheMixin):
    r"""A diffusion transformer conditioned on T5 text tokens and a DINOv3 image embedding.

    Args:
        num_layers (`int`, defaults to 12): number of `NanoDiTBlock`s.
        hidden_size (`int`, defaults to 384): transformer width D.
        num_attention_heads (`int`, defaults to 6): heads; `hidden_size` must divide by it.
        patch_size (`int`, defaults to 2): side of the square latent patch that becomes one token.
        in_channels (`int`, defaults to 16): latent channels (16 for the Flux VAE, 3 in pixel mode).
        text_embed_dim (`int`, defaults to 768): width of the T5 token embeddings (t5-v1_1-base).
        image_embed_dim (`int`, defaults to 384): width of the DINOv3 embeddings (ViT-S/16).
        sample_size (`int`, defaults to 64): latent side the sin-cos positions are laid out for;
            other grids (aspect buckets) get positions rescaled to it, as in PixArt.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width over `hidden_size`.
        use_image_tokens (`bool`, defaults to `False`): append the DINOv3 patch tokens to the
            cross-attention context, beside the text tokens.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["NanoDiTBlock"]
    _repeated_blocks = ["NanoDiTBlock"]  # compile_repeated_blocks(): one block compiled, reused by all
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        num_layers: int = 12,
        hidden_size: int = 384,
        num_attention_heads: int = 6,
        patch_size: int = 2,
        in_channels: int = 16,
        text_embed_dim: int = 768,
        image_embed_dim: int = 384,
        sample_size: int = 64,
        mlp_ratio: float = 4.0,
        use_image_tokens: bool = False,
    ):
        super().__init__()
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}"
            )
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size={sample_size} is not divisible by patch_size={patch_size}")
        D = hidden_size

        # 1. Inputs: latent patches, conditioning vector, cross-attention context.
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=D,
            pos_embed_type="sincos",
        )
        # Timestep (σ·1000) and the DINOv3 global embedding summed into one vector, as SD3 does
        # with its pooled text embedding.
        self.time_image_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=D, pooled_projection_dim=image_embed_dim
        )
        self.caption_projection = PixArtAlphaTextProjection(text_embed_dim, D)
        self.image_token_projection = PixArtAlphaTextProjection(image_embed_dim, D) if use_image_tokens else None

        # Learned null embeddings for classifier-free guidance, in each input's own space.
        self.null_text_embed = nn.Parameter(torch.zeros(text_embed_dim))
        self.null_image_embed = nn.Parameter(torch.zeros(image_embed_dim))
        self.null_image_token = nn.Parameter(torch.zeros(image_embed_dim)) if use_image_tokens else None

        # 2. Blocks.
        self.transformer_blocks = nn.ModuleList(
            [NanoDiTBlock(D, num_attention_heads, mlp_ratio) for _ in range(num_layers)]
        )

        # 3. Output: adaLN (shift, scale from c), then a linear map back to patches.
        self.norm_out = AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(D, patch_size * patch_size * in_channels)

        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # Follows DiT's initialize_weights (facebookresearch/DiT, models.py).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embedding initialised like a linear layer over the flattened patch.
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        # Timestep MLP and null embeddings: small normal, as DiT's embedding tables.
        nn.init.normal_(self.time_image_embed.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_image_embed.timestep_embedder.linear_2.weight, std=0.02)
        for null in (self.null_text_embed, self.null_image_embed, self.null_image_token):
            if null is not None:
                nn.init.normal_(null, std=0.02)
        # Zero-out adaLN modulation and the cross-attention output, so every block starts as the
        # identity (DiT §3.2, "adaLN-Zero").
        for block in self.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
            nn.init.zeros_(block.cross_attn.to_out[0].weight)
            nn.init.zeros_(block.cross_attn.to_out[0].bias)
        # Zero-out the output layers: an untrained model predicts v = 0 exactly.
        nn.init.zeros_(self.norm_out.linear.weight)
        nn.init.zeros_(self.norm_out.linear.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # ----------------------------------------------------------------------------------------
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""Predict the flow-matching velocity ``v = ε − x0``.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, C, H, W)`): noisy latents x_σ.
            timestep (`torch.Tensor` of shape `(B,)` or a scalar): σ·1000, float.
            encoder_hidden_states (`torch.Tensor` of shape `(B, L, text_embed_dim)`): T5 token
                embeddings. `None` means no text for any sample (the null text embedding is used).
            encoder_attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 = keep,
                0 = padding. Each row must keep at least one token (T5 always has its EOS token).
            image_embeds (`torch.Tensor` of shape `(B, image_embed_dim)`, *optional*): DINOv3
                global embedding. `None` means no image condition for any sample.
            image_tokens (`torch.Tensor` of shape `(B, M, image_embed_dim)`, *optional*): DINOv3
                patch tokens; only with `config.use_image_tokens`.
            drop_text, drop_image (`torch.Tensor` of shape `(B,)`, bool, *optional*): per-sample
                classifier-free-guidance masks; True swaps in the learned null embedding.
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales the loaded LoRA adapters
                for this call (diffusers' convention); nothing else is read from it.
            return_dict (`bool`, defaults to `True`): return a `Transformer2DModelOutput`.

        Returns:
            `Transformer2DModelOutput` with `sample` of shape `(B, C, H, W)`, or a 1-tuple.
        """
        B, C, H, W = self._check_latents(hidden_states)
        p = self.config.patch_size
        device = hidden_states.device
        timestep = torch.as_tensor(timestep, device=device)
        timestep = self._check_batch_vector(timestep, B, "timestep", allow_scalar=True)
        drop_text = self._drop_mask(drop_text, B, device, "drop_text", absent=encoder_hidden_states is None)
        drop_image = self._drop_mask(drop_image, B, device, "drop_image", absent=image_embeds is None)

        # 1. Inputs. The door: latents arrive in whatever dtype they were cached or drawn in (fp32
        # flow-matching math, bf16 features) and are cast to the weights' dtype; under autocast the
        # layers then compute in the autocast dtype. Conditioning follows the token stream's dtype.
        # PatchEmbed returns a transposed view; without .contiguous() every residual add would
        # inherit its (B, D, N) memory order and every LayerNorm would copy it back.
        hidden_states = hidden_states.to(self.pos_embed.proj.weight.dtype)
        x = self.pos_embed(hidden_states).contiguous()  # (B, N, D), N = H·W / p²
        image_embeds = self._select(image_embeds, self.null_image_embed, drop_image, B, "image_embeds")
        cond = self.time_image_embed(timestep, image_embeds.to(x.dtype))  # (B, D)
        context, context_mask = self._context(
            x, encoder_hidden_states, encoder_attention_mask, image_tokens, drop_text, drop_image
        )  # (B, S, D), (B, 1, 1, S)

        # 2. Blocks.
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond, context, context_mask)
            else:
                x = block(x, cond, context, context_mask)

        # 3. Output.
        x = self.proj_out(self.norm_out(x, cond))  # (B, N, p·p·C)
        h, w = H // p, W // p
        x = x.reshape(B, h, w, p, p, C)
        v = x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)  # (B, C, H, W)

        if not return_dict:
            return (v,)
        return Transformer2DModelOutput(sample=v)

    # ----------------------------------------------------------------------------------------
    # Conditioning helpers
    # ----------------------------------------------------------------------------------------
    def _context(self, x, text, text_mask, image_tokens, drop_text, drop_image):
        """Project text (and DINOv3 patch) tokens to the cross-attention context of the token
        stream `x` `(B, N, D)`, nulls swapped in.

        Cached embeddings may come in another dtype (bf16 encoders); they are cast to the
        working dtype of the token stream.
        """
        B, dtype = x.shape[0], x.dtype
        text_tokens, text_mask = self._tokens(
            text, text_mask, self.null_text_embed, drop_text, B, "encoder_hidden_states"
        )
        context = self.caption_projection(text_tokens.to(dtype))  # (B, L, D)
        if self.config.use_image_tokens:
            image_tokens, image_mask = self._tokens(
                image_tokens, None, self.null_image_token, drop_image, B, "image_tokens"
            )
            image_context = self.image_token_projection(image_tokens.to(dtype))  # (B, M, D)
            context = torch.cat([context, image_context], dim=1)  # (B, L+M, D)
            text_mask = torch.cat([text_mask, image_mask], dim=1)
        elif image_tokens is not None:
            raise ValueError(
                "image_tokens were given but the model was built with use_image_tokens=False; "
                "build it with use_image_tokens=True or pass image_tokens=None"
            )
        return context, text_mask[:, None, None, :]  # (B, 1, 1, S): one row for every head and query

    def _tokens(self, tokens, mask, null, drop, B, name):
        """A token sequence with its keep-mask; dropped rows become one null token.

        A dropped row keeps only its first slot (holding the null embedding) and masks the rest,
        so that "dropped" is exactly "a single null token" whatever the sequence length.
        """
        width = null.shape[0]
        if tokens is None:
            tokens = null.expand(B, 1, width)
            return tokens, torch.ones(B, 1, dtype=torch.bool, device=tokens.device)
        if tokens.ndim != 3 or tokens.shape[0] != B or tokens.shape[2] != width:
            raise ValueError(f"{name} must have shape (B={B}, L, {width}), got {tuple(tokens.shape)}")
        L = tokens.shape[1]
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
        elif tuple(mask.shape) != (B, L):
            raise ValueError(
                f"encoder_attention_mask must have shape (B, L) = ({B}, {L}) to match {name}, got {tuple(mask.shape)}"
            )
        first = torch.arange(L, device=tokens.device) == 0  # (L,)
        mask = torch.where(drop[:, None], first[None, :], mask.bool())  # (B, L)
        tokens = torch.where(drop[:, None, None], null.to(tokens.dtype), tokens)  # (B, L, width)
        return tokens, mask

    def _select(self, embeds, null, drop, B, name):
        """A (B, width) embedding with the null embedding swapped in where `drop` is True."""
        width = null.shape[0]
        if embeds is None:
            return null.expand(B, width)
        if tuple(embeds.shape) != (B, width):
            raise ValueError(f"{name} must have shape (B, {width}) = ({B}, {width}), got {tuple(embeds.shape)}")
        return torch.where(drop[:, None], null.to(embeds.dtype), embeds)

    # ----------------------------------------------------------------------------------------
    # Input checks (shapes only: nothing here syncs with the device)
    # ----------------------------------------------------------------------------------------
    def _check_latents(self, latents: torch.Tensor) -> tuple[int, int, int, int]:
        if latents.ndim != 4:
            raise ValueError(f"hidden_states must be (B, C, H, W), got shape {tuple(latents.shape)}")
        B, C, H, W = latents.shape
        p = self.config.patch_size
        if C != self.config.in_channels:
            raise ValueError(f"hidden_states has {C} channels, expected in_channels={self.config.in_channels}")
        if H % p or W % p:
            raise ValueError(f"latent grid {H}x{W} is not divisible by patch_size={p}")
        return B, C, H, W

    @staticmethod
    def _check_batch_vector(t: torch.Tensor, B: int, name: str, allow_scalar: bool = False) -> torch.Tensor:
        if allow_scalar and t.ndim == 0:
            return t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
        return t

    def _drop_mask(self, drop, B, device, name, absent: bool) -> torch.Tensor:
        """(B,) bool; an absent condition counts as dropped for every sample."""
        if absent or drop is None:
            return torch.full((B,), absent, dtype=torch.bool, device=device)
        return self._check_batch_vector(drop, B, name).to(device=device, dtype=torch.bool)
