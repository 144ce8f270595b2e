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
from shapes import IMAGE_DIM, TEXT_DIM, TEXT_TOKENS, add_shape_arguments, build_model, random_inputs

from nano_dit import FlowMatching

MB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, latent_size=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument(
        "--text-tokens", type=int, default=TEXT_TOKENS, help="T5 tokens per caption (default: the cap)"
    )
    parser.add_argument("--text-dim", type=int, default=TEXT_DIM, help="T5 width (default: t5-v1_1-base's)")
    parser.add_argument("--image-dim", type=int, default=IMAGE_DIM, help="DINOv3 width (default: ViT-S/16's)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--budgets-gb",
        type=float,
        nargs="*",
        default=[4, 8],
        help="report the largest batch predicted to fit in each (GiB)",
    )
    return parser.parse_args()


def saved_activation_bytes(
    model: torch.nn.Module, batch: int, latent_size: int, text_tokens: int = TEXT_TOKENS
) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x0, cond = random_inputs(model, batch, latent_size, text_tokens, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = FlowMatching().loss(model, x0, generator=g, **cond).loss
    loss.backward()  # the graph was real: free it the normal way
    return sum(seen.values())


def main() -> None:
    args = parse_args()
    model = build_model(args.preset, args.latent_size, args.text_dim, args.image_dim).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    n = model.num_parameters()
    static = 20 * n  # fp32 weights, gradients, two AdamW moments, EMA
    tokens = (args.latent_size // model.config.patch_size) ** 2
    print(
        f"# {args.preset} preset: {n / 1e6:.2f}M parameters, {tokens} image tokens + {args.text_tokens} text tokens"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
    )
    print(f"weights + gradients + AdamW + EMA (fp32): {static / MB:.0f} MB")
    print("| batch | activations fp32 (MB) | activations bf16, est. (MB) | predicted total, bf16 (MB) |")
    print("| ---: | ---: | ---: | ---: |")
    per_sample = []
    for batch in args.batch_sizes:
        acts = saved_activation_bytes(model, batch, args.latent_size, args.text_tokens)
        model.zero_grad(set_to_none=True)
        per_sample.append(acts / 2 / batch)
        print(f"| {batch} | {acts / MB:.0f} | {acts / 2 / MB:.0f} | {(static + acts / 2) / MB:.0f} |")
    for gb in args.budgets_gb:
        fits = largest_batch(static, max(per_sample), gb * 2**30)
        print(f"largest batch predicted to fit in {gb:g} GiB (bf16): {fits}")


def largest_batch(static_bytes: float, bytes_per_sample: float, budget_bytes: float) -> int:
    """The largest batch whose predicted memory (static + batch x per-sample activations) fits."""
    return max(int((budget_bytes - static_bytes) // bytes_per_sample), 0)


if __name__ == "__main__":
    main()
