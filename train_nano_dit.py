"""Train Nano DiT with rectified flow and mutually exclusive CFG dropout.

    accelerate launch --config_file accelerate_config.yaml train_nano_dit.py --preset nano
    accelerate launch train_nano_dit.py --preset demo     # offline, CPU: synthetic set, stand-in encoders

Training reads the feature cache only (`nano-dit data encode`); when the cache lacks samples of
`--shards`, the data phase encodes them first, and with `--synth-if-missing` (the demo preset)
it writes the synthetic set and the stand-in encoders too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from nano_dit import FlowMatching, NanoDiTTransformer2DModel
from nano_dit.checkpointing import (
    check_replicas_agree,
    check_resumable,
    checkpoint_name,
    list_checkpoints,
    load_process_state,
    read_state,
    resolve_resume,
    save_checkpoint,
)
from nano_dit.feature_cache import load_cache
from nano_dit.flow_matching import loss_by_sigma_bin
from nano_dit.folders import save_aside
from nano_dit.hub import PushFailed, build_pipeline, card_figures, run_info, set_model_card, validation_of
from nano_dit.report import write_report
from nano_dit.timings import PhaseTimer, RunTimings, describe_device, phase
from nano_dit.training import (
    CachedBatches,
    JsonlLog,
    TrainConfig,
    conditioning,
    model_config_for,
    parse_config,
    prepare_feature_cache,
)
from nano_dit.validation import ImageMetrics, run_validation

SIGMA_BINS = 4  # the tracker gets the loss per quarter of the noise range


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the last validation's results. Every phase below, and in the helpers it
    calls, is timed into `<output-dir>/timings.json`."""
    with PhaseTimer() as timer:
        return train(argv, timer)


def train(argv: list[str] | None, timer: PhaseTimer) -> dict:
    # ---------------------------------------------------------------- setup
    started = time.perf_counter()
    config = parse_config(argv)
    # Unset flags (None) leave the choice to `accelerate launch` (its flags or config file).
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
        dynamo_backend=config.compile_backend if config.compile else None,
    )
    record_launch_settings(config, accelerator)  # config.json, the report and validation see what is in effect
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    set_seed(config.seed, device_specific=True)
    if accelerator.device.type == "cpu":  # `accelerate launch` sets OMP_NUM_THREADS=1 unless asked otherwise
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(config.cpu_threads or max(cores // accelerator.num_processes, 1))
    ckpt_dir = config.checkpoints
    check_output_dir(config, ckpt_dir, remove=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    timer.device = accelerator.device  # phases end when the device's queued work has

    # ---------------------------------------------------------------- data
    with accelerator.main_process_first():  # one process encodes, the others then read the cache
        if accelerator.is_main_process:
            accelerator.print(prepare_feature_cache(config).summary())
        with phase("data: loading the cache"):
            manifest, buckets = load_cache(config.cache)
            batches = CachedBatches(
                buckets,
                config.batch_size,
                accelerator.device,
                seed=config.seed + accelerator.process_index,
                on_device={"auto": None, "yes": True, "no": False}[config.cache_on_device],
            )
    config.model = model_config_for(config, buckets)

    # ---------------------------------------------------------------- model
    with phase("model: build"):
        model = NanoDiTTransformer2DModel(**config.model)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True, foreach=True)
        optimizer = build_optimizer(config, model, accelerator.device)
        # Accelerate steps a prepared scheduler once per process at each optimizer step, hence the
        # scaling (as diffusers' training scripts do): the schedule spans total_steps optimizer steps.
        n = accelerator.num_processes
        lr_scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, config.warmup_steps * n, config.total_steps * n, min_lr=config.min_lr
        )
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        ema.to(accelerator.device)
    cfg_dropout = config.cfg_dropout(rank=accelerator.process_index)
    accelerator.register_for_checkpointing(ema)  # the same on every process; save_state carries it
    stand_in = (
        " with STAND-IN encoders (tiny, random: not real T5 / DINOv3)" if manifest["encoders"]["stand_in"] else ""
    )
    accelerator.print(
        f"NanoDiT: {accelerator.unwrap_model(model, keep_torch_compile=False).num_parameters() / 1e6:.2f}M parameters; "
        f"{sum(len(b) for b in buckets)} cached samples in {len(buckets)} bucket(s){stand_in}"
        + (
            ""
            if accelerator.device.type == "cpu"
            else f"; cache in {'device' if batches.on_device else 'host'} memory"
        )
    )

    # ---------------------------------------------------------------- resume
    start_step = 0
    path = resolve_resume(config.resume, ckpt_dir) if config.resume else None
    if path is not None:
        saved = read_state(path)
        check_resumable(saved, config.model, cfg_dropout.scheme, path)
        with phase("checkpoints: resume"):
            accelerator.load_state(str(path))
        restore_samplers(path, accelerator, {"cfg_dropout": cfg_dropout, "batches": batches})
        start_step = saved["step"]
        accelerator.print(f"resumed from {path} at step {start_step}")
    if accelerator.is_main_process:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump(vars(config), f, indent=2)
    accelerator.init_trackers("nano-dit", config={k: v for k, v in vars(config).items() if k != "model"})

    # ---------------------------------------------------------------- loop
    log_path = os.path.join(ckpt_dir, "training_log.jsonl")
    run = dict(accelerator=accelerator, model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler)
    run["params"] = list(model.parameters())  # walked once, not at every clip and EMA update
    settings = {"device": describe_device(accelerator.device), "mixed_precision": config.mixed_precision}
    settings.update(compile=config.compile, start_step=start_step)  # a resumed run times its own steps
    run["timings"] = RunTimings(config.output_dir, timer, settings, started)
    run["validator"] = Validator(
        config, buckets, cfg_dropout.scheme, bool(stand_in), accelerator, ema, log_path, run["timings"]
    )
    if accelerator.is_main_process:
        run["timings"].save()  # the data and model phases, before the loop (rewritten as the run goes)
    with JsonlLog(
        log_path, enabled=accelerator.is_main_process, resume_step=start_step if config.resume else None
    ) as log:
        train_loop(config, run, cfg_dropout, batches, log, start_step, ckpt_dir)

    # ---------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    result = {}
    if accelerator.is_main_process:
        with phase("export"):
            result = export_final(config, run, buckets, cfg_dropout.scheme)
        run["timings"].save()  # timings.json, then RESULTS.md with every phase, export included
        run["validator"].report()
    accelerator.end_training()
    if "push_failed" in run:  # after the report: everything local is written
        raise run["push_failed"]
    return result


def export_final(config: TrainConfig, run: dict, buckets, scheme: str) -> dict:
    """checkpoint_final: the pipeline with the final EMA weights and a model card carrying the last
    validation's figures (pushed to the Hub when asked). Returns that validation's results."""
    accelerator, validator, ckpt_dir = run["accelerator"], run["validator"], config.checkpoints
    if validator.pipe is None:  # no validation ran: build the shipped pipeline now
        final = accelerator.unwrap_model(run["model"], keep_torch_compile=False)
        run["ema"].copy_to(final.parameters())  # the EMA weights are the ones we ship and sample
        validator.pipe = build_pipeline(final, config.encoder_spec())
    pipe, result = validator.pipe, validator.last
    figures, sheet = card_figures(result), validator.sheet()
    last = Path(ckpt_dir) / checkpoint_name(config.total_steps)
    if not figures and last.exists():  # resumed with no step left: the last step's validation, if it ran
        figures, sheet = validation_of(last, config.total_steps, config.output_dir)
    data = {"shards": config.shards, "samples": sum(len(b) for b in buckets), "buckets": [b.bucket for b in buckets]}
    info = run_info(config, config.total_steps, scheme, data=data, results=figures)
    set_model_card(pipe, info, sheet, repo_id=config.repo_id if config.push_to_hub else None)
    final_dir = Path(ckpt_dir) / "checkpoint_final"
    save_aside(pipe.save_pretrained, final_dir)  # written beside it, swapped in whole
    accelerator.print(f"pipeline (EMA weights): {final_dir}")
    if config.push_to_hub:
        try:
            url = pipe.push_to_hub(config.repo_id)
        except Exception as err:  # offline, no connection, refused: the run is saved, say why and go on
            run["push_failed"] = PushFailed.of(err, config.repo_id, final_dir)
        else:
            accelerator.print(f"pushed to the Hub: {url}")
    return result


def record_launch_settings(config: TrainConfig, accelerator: Accelerator) -> None:
    """The precision and compilation in effect, whoever chose them (a flag, `accelerate launch`'s
    flags or config file, or the defaults), written back into `config`."""
    config.mixed_precision = accelerator.mixed_precision
    backend = accelerator.state.dynamo_plugin.backend.value.lower()
    if backend != "no":
        config.compile, config.compile_backend = True, backend


def restore_samplers(path, accelerator, samplers: dict) -> None:
    """Each process's CFG-dropout and batch streams, from its own file in the checkpoint."""
    state = load_process_state(path, accelerator.process_index)
    if state is None:  # saved by fewer processes: this one starts its streams afresh
        print(f"process {accelerator.process_index}: no sampler state in {path}; its streams restart from the seed")
        return
    for name, sampler in samplers.items():
        sampler.load_state_dict(state[name])


def check_output_dir(config: TrainConfig, ckpt_dir: str, remove: bool) -> None:
    """A new run does not write over an earlier one unless asked (--resume or --overwrite-output-dir);
    asked, the earlier checkpoints go first (`remove`: the main process), so that a later
    `--resume latest` cannot pick one of them."""
    earlier = os.path.isdir(ckpt_dir) and any(os.scandir(ckpt_dir))
    if earlier and config.overwrite_output_dir and not config.resume:
        if remove:
            shutil.rmtree(ckpt_dir)
        return
    if earlier and not config.resume:
        raise FileExistsError(
            f"{config.output_dir} already holds a run; pass --resume latest to continue it, "
            "--overwrite-output-dir to start afresh, or another --output-dir"
        )


def build_optimizer(config: TrainConfig, model, device) -> torch.optim.Optimizer:
    params = dict(lr=config.peak_lr, weight_decay=config.weight_decay)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError('--use-8bit-adam needs bitsandbytes: pip install "nano-dit[gpu]"') from None
        return bnb.optim.AdamW8bit(model.parameters(), **params)
    # fused: one kernel for all parameters, where the device has it
    return torch.optim.AdamW(model.parameters(), fused=device.type in ("cuda", "cpu"), **params)


def train_loop(config: TrainConfig, run: dict, cfg_dropout, batches, log, start_step: int, ckpt_dir: str) -> None:
    accelerator = run["accelerator"]
    objective = FlowMatching()
    progress = tqdm(
        range(config.total_steps), initial=start_step, disable=not accelerator.is_main_process, desc="train"
    )
    start, pending, bad_in_a_row = time.perf_counter(), [], 0
    samples_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    bin_sums = bin_counts = torch.zeros(SIGMA_BINS, device=accelerator.device)
    timer = run["timings"].timer
    timed_before, loop_start = sum(timer.seconds.values()), time.perf_counter()
    for step in range(start_step + 1, config.total_steps + 1):
        try:
            # The first step apart: it compiles (--compile) and warms the allocator and kernels.
            with timer.phase("training: first step") if step == start_step + 1 else contextlib.nullcontext():
                loss, grad_norm, applied, bins = optimizer_step(config, run, objective, batches, cfg_dropout)
        except torch.cuda.OutOfMemoryError as err:  # (torch.OutOfMemoryError in newer torch)
            raise OutOfMemory(out_of_memory_message(config, step, ckpt_dir)) from err
        progress.update(1)
        # One record per step, kept on the device; the host syncs only at logging intervals.
        lr, decay = run["lr_scheduler"].get_last_lr()[0], run["ema"].cur_decay_value
        pending.append((step, loss, grad_norm, lr, decay, not applied))
        bad_in_a_row = 0 if applied else bad_in_a_row + 1
        if not applied:
            accelerator.print(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= config.max_bad_steps:
                # the log keeps every step up to the stop, for the report
                write_records(log, pending, samples_per_step, time.perf_counter() - start)
                run["validator"].report_stopped()
                raise RuntimeError(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (the last at step {step}): "
                    f"stopping. Lower --peak-lr or check the data; resume from the last checkpoint in {ckpt_dir}"
                )
        bin_sums, bin_counts = bin_sums + bins[0], bin_counts + bins[1]
        validating = config.validation and (step % config.validation_every == 0 or step == config.total_steps)
        last = step == config.total_steps  # the log ends with the run's last step, whatever the intervals
        if last or step % config.log_every == 0 or step % config.checkpoint_every == 0 or validating:
            records = write_records(log, pending, samples_per_step, time.perf_counter() - start)
            scalars = {k: records[-1][k] for k in ("loss", "grad_norm", "lr", "ema_decay", "samples_per_s")}
            by_sigma = (bin_sums / bin_counts.clamp(min=1)).tolist()  # mean loss per σ bin since the last log
            scalars.update(
                {f"loss_sigma_{i / SIGMA_BINS:.2f}-{(i + 1) / SIGMA_BINS:.2f}": v for i, v in enumerate(by_sigma)}
            )
            accelerator.log(scalars, step=step)
            bin_sums = bin_counts = torch.zeros(SIGMA_BINS, device=accelerator.device)
            progress.set_postfix(loss=f"{records[-1]['loss']:.4f}", lr=f"{records[-1]['lr']:.2e}")
            pending = []
        if step % config.checkpoint_every == 0:
            with timer.phase("checkpoints"):
                check_replicas_agree(accelerator, run["model"])
                state = {"config": vars(config), "cfg_dropout_scheme": cfg_dropout.scheme}
                samplers = {"cfg_dropout": cfg_dropout.state_dict(), "batches": batches.state_dict()}
                save_checkpoint(accelerator, ckpt_dir, step, state, config.checkpoints_total_limit, samplers)
            if accelerator.is_main_process:
                run["timings"].save()  # a run killed later still shows where its time went so far
        if validating:
            run["timings"].note_peak(accelerator.device)
            with timer.phase("validation"):
                run["validator"](step)
        if not pending:  # logged: the next interval's rate counts training alone
            start = time.perf_counter()
    # Training's own time: the loop's, less the first step, checkpoints and validations (timed apart).
    timer.sync()
    steps_run = config.total_steps - start_step
    if steps_run > 0:
        seconds = time.perf_counter() - loop_start - (sum(timer.seconds.values()) - timed_before)
        timer.add("training", seconds)
        run["timings"].note_peak(accelerator.device)
        first = timer.seconds["training: first step"]
        run["timings"].note_training(steps_run - 1, seconds, first, samples_per_step)


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message says what to change and where to resume."""


def out_of_memory_message(config: TrainConfig, step: int, ckpt_dir: str) -> str:
    found = list_checkpoints(ckpt_dir)
    resume = f"{found[-1]} (--resume latest)" if found else "none yet: it starts afresh"
    remedies = [f"--batch-size {max(config.batch_size // 2, 1)} (now {config.batch_size})"]
    if not config.gradient_checkpointing:
        remedies.append("--gradient-checkpointing")
    if not config.use_8bit_adam:
        remedies.append('--use-8bit-adam (pip install "nano-dit[gpu]")')
    if config.mixed_precision == "no":
        remedies.append("--mixed-precision bf16")
    return f"out of device memory at step {step}. Try {', '.join(remedies)}. The last good checkpoint is {resume}."


def optimizer_step(config: TrainConfig, run: dict, objective, batches, cfg_dropout):
    """One optimizer step: forward and backward over `gradient_accumulation_steps` micro-batches,
    clip, and — if loss and gradients are finite — the update and EMA.

    Returns (loss, grad_norm, applied, (σ-bin loss sums, counts)). Deciding costs one host sync per
    step, on purpose: a non-finite update must never reach the weights (nor, so, any checkpoint).
    """
    accelerator, model = run["accelerator"], run["model"]
    losses, bins = [], None
    for _ in range(config.gradient_accumulation_steps):
        batch = next(batches)
        drop_text, drop_image = (m.to(accelerator.device) for m in cfg_dropout.sample(config.batch_size))
        with accelerator.accumulate(model), accelerator.autocast():
            out = objective.loss(
                model, batch["latents"], drop_text=drop_text, drop_image=drop_image, **conditioning(batch)
            )
            accelerator.backward(out.loss)  # Accelerate divides by the accumulation steps
        losses.append(out.loss.detach())
        micro = loss_by_sigma_bin(out.per_sample, out.sigmas, SIGMA_BINS)
        bins = micro if bins is None else (bins[0] + micro[0], bins[1] + micro[1])
    grad_norm = accelerator.clip_grad_norm_(run["params"], config.grad_clip)  # gradients are synced now
    loss = torch.stack(losses).mean()
    applied = bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
    if applied:
        run["optimizer"].step()
        run["lr_scheduler"].step()
        run["ema"].step(run["params"])
    run["optimizer"].zero_grad(set_to_none=True)
    return loss, grad_norm.detach(), applied, bins


def write_records(log, pending: list, samples_per_step: int, seconds: float) -> list[dict]:
    """Turn the buffered per-step values into log records with one host sync for all of them,
    write them to `log` and return them."""
    losses = torch.stack([p[1] for p in pending]).float().tolist()
    norms = torch.stack([p[2] for p in pending]).float().tolist()
    rate = samples_per_step * len(pending) / max(seconds, 1e-9)
    now = time.time()
    records = [
        {
            "step": step,
            "loss": loss,
            "grad_norm": norm,
            "lr": lr,
            "ema_decay": decay,
            "samples_per_s": rate,
            "time": now,
            **({"skipped": True} if skipped else {}),
        }
        for (step, _, _, lr, decay, skipped), loss, norm in zip(pending, losses, norms)
    ]
    for record in records:
        log.write(record)
    return records


class Validator:
    """The seed's three tests on the EMA weights (main process; the others wait), then RESULTS.md.

    The validation pipeline (its own transformer, the encoders the run used, LPIPS) is built at the
    first validation and kept; at the end it holds the final EMA weights and is what ships.
    """

    def __init__(self, config: TrainConfig, buckets, scheme: str, stand_in: bool, accelerator, ema, log_path, timings):
        self.config, self.buckets, self.scheme, self.stand_in = config, buckets, scheme, stand_in
        self.accelerator, self.ema, self.log_path, self.timings = accelerator, ema, log_path, timings
        self.pipe, self.metrics, self.last, self.folder = None, None, {}, None

    def __call__(self, step: int) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # training's random numbers stay as they were
                self._validate(step)
        accelerator.wait_for_everyone()

    def _validate(self, step: int) -> None:
        accelerator, config = self.accelerator, self.config
        start = time.perf_counter()
        if self.pipe is None:  # the first validation loads the encoders and the metrics' networks
            model = NanoDiTTransformer2DModel(**config.model)
            self.pipe = build_pipeline(model, config.encoder_spec()).to(accelerator.device)
            self.metrics = ImageMetrics(accelerator.device, config.lpips_backbone)
        self.ema.copy_to(self.pipe.transformer.parameters())
        setup = time.perf_counter() - start
        self.folder = Path(config.output_dir) / "validation" / f"step{step:07d}"
        info = {"checkpoint": f"EMA weights at step {step}", "cfg_dropout_scheme": self.scheme}
        results = run_validation(self.pipe, self.buckets, self.folder, self.metrics, config.sampling(), step, info)
        phases = {"setup": round(setup, 3), **results["timings"]["phases"]}
        self.timings.note_validation(step, time.perf_counter() - start, phases)
        self.timings.save()
        summary = self.report()
        self.last = {**results, **summary}
        accelerator.log(card_figures(self.last), step=step)
        reasons = "; ".join(summary["reasons"][:3])
        accelerator.print(
            f"validation at step {step}: {summary['verdict']}{' — ' + reasons if reasons else ''} "
            f"(see {Path(config.output_dir) / 'RESULTS.md'})"
        )

    def report(self, stopped: bool = False) -> dict:
        config = self.config
        return write_report(
            config.output_dir,
            config.thresholds(),
            config.warmup_steps,
            scheme=self.scheme,
            log_path=self.log_path,
            stand_in=self.stand_in,
            stopped=stopped,
        )

    def report_stopped(self) -> None:
        """A run that stops itself still gets its RESULTS.md, from the training log."""
        if self.accelerator.is_main_process:
            self.report(stopped=True)

    def sheet(self):
        """The newest reconstruction sheet, for the model card."""
        path = self.folder / "reconstruction" / "sheet.png" if self.folder else None
        return Image.open(path) if path and path.exists() else None


if __name__ == "__main__":
    try:
        main()
    except (FileExistsError, FileNotFoundError, NotADirectoryError, OutOfMemory, PushFailed) as err:  # a message
        sys.exit(f"train_nano_dit.py: error: {err}")
    except ValueError as err:  # bad input found past the flags (data, checkpoints): one line unless debugging
        if os.environ.get("NANO_DIT_DEBUG"):
            raise
        sys.exit(f"train_nano_dit.py: error: {err} (NANO_DIT_DEBUG=1 shows the traceback)")
