"""Train Nano DiT with rectified flow and mutually exclusive CFG dropout.

    accelerate launch --config_file accelerate_config.yaml train_nano_dit.py --preset nano
    python train_nano_dit.py --preset demo          # one process, CPU is fine

This first version trains on a synthetic stand-in set (`nano_dit.training.synthetic_dataset`);
the shard / feature-cache pipeline replaces it.
"""

from __future__ import annotations

import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from nano_dit import CFGDropout, FlowMatching, NanoDiTPipeline, NanoDiTTransformer2DModel
from nano_dit.training import JsonlLog, TrainConfig, parse_config, synthetic_dataset


def main(argv: list[str] | None = None) -> dict:
    # ---------------------------------------------------------------- setup
    config = parse_config(argv)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    set_seed(config.seed, device_specific=True)
    ckpt_dir = os.path.join(config.output_dir, "checkpoints")
    if accelerator.is_main_process:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump(vars(config), f, indent=2)

    # ---------------------------------------------------------------- data
    dataset = synthetic_dataset(config)
    if config.batch_size > len(dataset):
        raise ValueError(f"--batch-size {config.batch_size} is larger than the data ({len(dataset)} images)")
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True)

    # ---------------------------------------------------------------- model
    model = NanoDiTTransformer2DModel(**config.model)
    ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.peak_lr,
        weight_decay=config.weight_decay,
        fused=accelerator.device.type in ("cuda", "cpu"),  # one kernel for all parameters
    )
    lr_scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.total_steps, min_lr=config.min_lr
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema.to(accelerator.device)
    accelerator.print(
        f"NanoDiT: {accelerator.unwrap_model(model).num_parameters() / 1e6:.2f}M parameters; "
        f"{len(dataset)} synthetic stand-in images (random conditioning codes, no real encoders)"
    )

    # ---------------------------------------------------------------- loop
    with JsonlLog(os.path.join(ckpt_dir, "training_log.jsonl"), enabled=accelerator.is_main_process) as log:
        train_loop(config, accelerator, model, ema, optimizer, lr_scheduler, loader, log)

    # ---------------------------------------------------------------- save + check
    accelerator.wait_for_everyone()
    result = {}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        ema.copy_to(final.parameters())  # the EMA weights are the ones we ship and sample
        pipe = NanoDiTPipeline(transformer=final, scheduler=FlowMatchEulerDiscreteScheduler())
        pipe.save_pretrained(os.path.join(ckpt_dir, "checkpoint_final"))
        result = reconstruction_check(pipe, dataset, config)
        accelerator.print(json.dumps(result, indent=2))
    accelerator.end_training()
    return result


def train_loop(config: TrainConfig, accelerator, model, ema, optimizer, lr_scheduler, loader, log) -> None:
    objective = FlowMatching()
    cfg_dropout = CFGDropout(seed=config.seed + accelerator.process_index)
    progress = tqdm(range(config.total_steps), disable=not accelerator.is_main_process, desc="train")
    start, batches = time.perf_counter(), _forever(loader)
    for step in range(1, config.total_steps + 1):
        images, text, mask, dino = next(batches)
        drop_text, drop_image = (m.to(accelerator.device) for m in cfg_dropout.sample(images.shape[0]))
        with accelerator.autocast():
            out = objective.loss(
                model,
                images,
                encoder_hidden_states=text,
                encoder_attention_mask=mask,
                image_embeds=dino,
                drop_text=drop_text,
                drop_image=drop_image,
            )
        accelerator.backward(out.loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        progress.update(1)
        if step % config.log_every == 0 or step == config.total_steps:  # host sync only here
            record = {
                "step": step,
                "loss": out.loss.item(),
                "grad_norm": float(grad_norm),
                "lr": lr_scheduler.get_last_lr()[0],
                "ema_decay": ema.cur_decay_value,
                "wall_time": time.perf_counter() - start,
            }
            log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")


def reconstruction_check(pipe: NanoDiTPipeline, dataset, config: TrainConfig) -> dict:
    """Regenerate every training image from its own conditioning; mean squared error in [−1, 1]."""
    images, text, mask, dino = dataset.tensors
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt_embeds=text,
        prompt_attention_mask=mask,
        image_embeds=dino,
        num_inference_steps=25,
        height=config.resolution,
        width=config.resolution,
        generator=torch.Generator().manual_seed(config.seed),
        output_type="pt",
    ).images  # (N, 3, R, R) in [0, 1]
    mse = (out * 2 - 1 - images).pow(2).mean().item()
    return {"reconstruction_mse": mse, "data_variance": images.var().item()}


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
