"""Predict the GPU memory of one training step without a GPU.

    python benchmarks/bench_memory.py                        # nano preset, 512² (64² latents), batch 8
    python benchmarks/bench_memory.py --batch-sizes 8 16 32 --gradient-checkpointing

Counts, on any device:
- activations: the bytes autograd saves for backward in one forward at the real shapes
  (`torch.autograd.graph.saved_tensors_hooks`; tensors counted once per storage, parameters left
  out), measured in fp32 and halved for bf16 autocast (an estimate: a few saved tensors stay fp32);
- parameters, gradients, AdamW moments (fp32) and the EMA copy (fp32): 20 bytes per parameter.

The prediction leaves out the CUDA context and allocator slack (a few hundred MB on most cards);
`benchmarks/gpu_check.sh` measures `torch.cuda.max_memory_allocated` where a GPU is lent.
Random weights and inputs of the real shapes: nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch

from nano_dit import FlowMatching, NanoDiTTransformer2DModel
from nano_dit.training import PRESETS

MB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="nano")
    parser.add_argument("--latent-size", type=int, default=64, help="latent side (default 64: 512² through the VAE)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--text-tokens", type=int, default=128, help="T5 tokens per caption (default 128, the cap)")
    parser.add_argument("--text-dim", type=int, default=768, help="T5 width (default 768: t5-v1_1-base)")
    parser.add_argument("--image-dim", type=int, default=384, help="DINOv3 width (default 384: ViT-S/16)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    return parser.parse_args()


def saved_activation_bytes(model: torch.nn.Module, batch: int, args: argparse.Namespace) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, model.config.in_channels, args.latent_size, args.latent_size, generator=g)
    cond = {
        "encoder_hidden_states": torch.randn(batch, args.text_tokens, args.text_dim, generator=g),
        "encoder_attention_mask": torch.ones(batch, args.text_tokens, dtype=torch.long),
        "image_embeds": torch.randn(batch, args.image_dim, generator=g),
    }
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = FlowMatching().loss(model, x0, generator=g, **cond).loss
    loss.backward()  # the graph was real: free it the normal way
    return sum(seen.values())


def main() -> None:
    args = parse_args()
    config = dict(
        PRESETS[args.preset]["model"],
        in_channels=16,
        sample_size=args.latent_size,
        text_embed_dim=args.text_dim,
        image_embed_dim=args.image_dim,
    )
    model = NanoDiTTransformer2DModel(**config).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    n = model.num_parameters()
    static = 20 * n  # fp32 weights, gradients, two AdamW moments, EMA
    tokens = (args.latent_size // config["patch_size"]) ** 2
    print(
        f"# {args.preset} preset: {n / 1e6:.2f}M parameters, {tokens} image tokens + {args.text_tokens} text tokens"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
    )
    print(f"weights + gradients + AdamW + EMA (fp32): {static / MB:.0f} MB")
    print("| batch | activations fp32 (MB) | activations bf16, est. (MB) | predicted total, bf16 (MB) |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in args.batch_sizes:
        acts = saved_activation_bytes(model, batch, args)
        model.zero_grad(set_to_none=True)
        print(f"| {batch} | {acts / MB:.0f} | {acts / 2 / MB:.0f} | {(static + acts / 2) / MB:.0f} |")


if __name__ == "__main__":
    main()
