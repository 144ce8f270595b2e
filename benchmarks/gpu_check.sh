#!/usr/bin/env bash
# One prepared GPU check: install what is missing (nothing, when the project is installed), then
# the memory prediction beside the measured peak, and the pipeline's guided-step cost, on the card.
# Prints tables; under 5 minutes on one modern GPU. Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import nano_dit" 2>/dev/null || pip install -q -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python - <<'PY'
import torch
from nano_dit import FlowMatching, NanoDiTTransformer2DModel
from nano_dit.training import PRESETS

# Measured peak memory of one bf16-autocast training step (fp32 weights, fused AdamW, EMA copy).
for batch in (8, 16, 32):
    torch.cuda.reset_peak_memory_stats()
    model = NanoDiTTransformer2DModel(**PRESETS["nano"]["model"], in_channels=16, sample_size=64,
                                      text_embed_dim=768, image_embed_dim=384).cuda()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x0 = torch.randn(batch, 16, 64, 64, device="cuda")
    cond = dict(encoder_hidden_states=torch.randn(batch, 128, 768, device="cuda"),
                encoder_attention_mask=torch.ones(batch, 128, dtype=torch.long, device="cuda"),
                image_embeds=torch.randn(batch, 384, device="cuda"))
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = FlowMatching().loss(model, x0, **cond).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(f"| {batch} | measured peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB |")
    del model, opt, ema
PY
python benchmarks/bench_memory.py --batch-sizes 8 16 32
python benchmarks/bench_train.py --device cuda --latent-size 64 --batch-sizes 8 16 32 --compile
python benchmarks/bench_pipeline_cfg.py --device cuda --latent-size 64 --batch-size 4 --repeats 5
