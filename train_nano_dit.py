"""Train Nano DiT with rectified flow and mutually exclusive CFG dropout.

    accelerate launch --config_file accelerate_config.yaml train_nano_dit.py --preset nano
    accelerate launch train_nano_dit.py --preset demo     # offline, CPU: synthetic set, stand-in encoders

One `main`: set up, prepare the data, build the model, then the loop, whose every step is
data -> CFG dropout -> loss -> optimizer step -> EMA -> log -> checkpoint -> validation.
Training reads the feature cache only (`nano-dit data encode`); when the cache lacks samples of
`--shards`, the data phase encodes them first, and with `--synth-if-missing` (the demo preset)
it writes the synthetic set and the stand-in encoders too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import diffusers.optimization
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin, set_seed
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from nano_dit import NanoDiTTransformer2DModel
from nano_dit.checkpointing import (
    check_replicas_agree,
    check_resumable,
    checkpoint_ema_with_the_state,
    checkpoint_name,
    list_checkpoints,
    load_process_state,
    read_state,
    resolve_resume,
    save_checkpoint,
)
from nano_dit.config import TrainConfig, parse_config
from nano_dit.data import CachedBatches, cache_fits_on_device, conditioning, model_config_for, prepare_data, to_device
from nano_dit.feature_cache import cache_nbytes, load_cache
from nano_dit.flow_matching import LossBySigma
from nano_dit.hub import HubRepoRefused, PushFailed, create_run_repo, ema_pipeline, export_run, recorded_figures
from nano_dit.locks import BuildLock
from nano_dit.metrics import ImageMetrics
from nano_dit.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignals, clear_stop_record, write_stop_record
from nano_dit.recorder import ValidationRecorder
from nano_dit.report import ReportInputs
from nano_dit.sampling import Sampler, compile_for_sampling
from nano_dit.step_guard import ema_step, optimizer_step
from nano_dit.timings import PhaseTimer, RunTimings, describe_device
from nano_dit.training_log import TrainingLog
from nano_dit.validation import Prompt, validate

SIGMA_BINS = 4  # the tracker gets the loss per quarter of the noise range


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the last validation's results and verdict (with --seeds: {seed: those} for
    the seeds this process ran). Every phase is timed into `<output-dir>/timings.json`."""
    started = time.perf_counter()
    config = parse_config(argv)
    if config.seeds is not None:
        return train_seeds(config)
    return train(config, started)


def train(config: TrainConfig, started: float | None = None) -> dict:
    """One run of `config`, timed from `started` (its parsing), else from here."""
    # ---------------------------------------------------------------- setup
    started, timer = started or time.perf_counter(), PhaseTimer()
    # Unset flags (None) leave the choice to `accelerate launch` (its flags or config file).
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
        dynamo_plugin=dynamo_plugin(config),
    )
    record_launch_settings(config, accelerator)  # config.json, the report and validation see what is in effect
    if config.push_to_hub and accelerator.is_main_process:
        accelerator.print(f"Hub repo for the final push: {create_run_repo(config)}")  # checked before any work
    device = accelerator.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    set_seed(config.seed, device_specific=True)
    if device.type == "cpu":  # `accelerate launch` sets OMP_NUM_THREADS=1 unless asked otherwise
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(config.cpu_threads or max(cores // accelerator.num_processes, 1))
    checkpoint_dir = config.checkpoint_dir
    check_output_dir(config, remove=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    timer.device = device  # phases end when the device's queued work has

    # ---------------------------------------------------------------- data
    with accelerator.main_process_first():  # one process encodes, the others then read the cache
        if accelerator.is_main_process:
            accelerator.print(prepare_data(config, timer).summary())
        with timer.phase("data: loading the cache"):  # straight to the device when it belongs there
            on_device = {"auto": None, "yes": True, "no": False}[config.cache_on_device]
            if on_device is None:
                on_device = cache_fits_on_device(cache_nbytes(config.cache), device)
            manifest, buckets = load_cache(config.cache, device=device if on_device else None)
            batches = CachedBatches(
                buckets, config.batch_size, device, seed=config.seed + accelerator.process_index, on_device=on_device
            )
    config.model = model_config_for(config, buckets)
    if config.compile:  # one static graph per bucket shape: room for every bucket before dynamo gives up
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(buckets))

    # ---------------------------------------------------------------- model
    with timer.phase("model: build"):
        model = NanoDiTTransformer2DModel(**config.model)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        ema = EMAModel(
            model.parameters(),
            decay=config.ema_decay,
            use_ema_warmup=True,
            foreach=True,
            model_cls=NanoDiTTransformer2DModel,
            model_config=model.config,
        )
        optimizer = build_optimizer(config, model, device)
        lr_scheduler = build_lr_scheduler(config, optimizer, accelerator.num_processes)
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        ema.to(device)
    params = list(model.parameters())  # walked once, not at every clip and EMA update
    objective = config.objective()
    tokens = bool(config.model.get("use_image_tokens"))  # the DINOv3 patch tokens too, in the cross-attention
    cfg_dropout = config.cfg_dropout(rank=accelerator.process_index)
    checkpoint_ema_with_the_state(accelerator, ema)  # the same on every process: the main one saves it
    stand_in = manifest["encoders"]["stand_in"]
    accelerator.print(
        f"NanoDiT: {accelerator.unwrap_model(model, keep_torch_compile=False).num_parameters() / 1e6:.2f}M parameters; "
        f"{sum(len(b) for b in buckets)} cached samples in {len(buckets)} bucket(s)"
        + (" with STAND-IN encoders (tiny, random: not real T5 / DINOv3)" if stand_in else "")
        + ("" if device.type == "cpu" else f"; cache in {'device' if batches.on_device else 'host'} memory")
    )

    # ---------------------------------------------------------------- resume
    start_step, run_id = 0, uuid.uuid4().hex[:12]  # the run's id: its checkpoints and validations carry it
    path = resolve_resume(config.resume, checkpoint_dir) if config.resume else None
    if path is not None:
        saved = read_state(path)
        check_resumable(saved, config.model, cfg_dropout.scheme, path)
        with timer.phase("checkpoints: resume"):
            accelerator.load_state(str(path))
        restore_samplers(path, accelerator, {"cfg_dropout": cfg_dropout, "batches": batches})
        start_step, run_id = saved["step"], saved["run_id"]
        accelerator.print(f"resumed from {path} at step {start_step}")
    if accelerator.is_main_process:
        os.makedirs(checkpoint_dir, exist_ok=True)
        os.makedirs(config.output_dir, exist_ok=True)
        clear_stop_record(config.output_dir)  # an earlier stop's record: this run goes on from it
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump(config_record(config), f, indent=2)
    accelerator.init_trackers(config.tracker_project_name, config=tracker_config(config))

    # ---------------------------------------------------------------- loop
    log_path = os.path.join(checkpoint_dir, "training_log.jsonl")
    settings = {"device": describe_device(device), "mixed_precision": config.mixed_precision}
    settings.update(compile=config.compile, start_step=start_step)  # a resumed run times its own steps
    timings = RunTimings(config.output_dir, timer, settings, started)
    report = ReportInputs.of_run(config, cfg_dropout.scheme, log_path, stand_in)
    recorder = ValidationRecorder(config.output_dir, report, trackers=accelerator.trackers, timings=timings)
    validator = EMAValidator(config, buckets, ema, accelerator, recorder)
    info = {"cfg_dropout_scheme": cfg_dropout.scheme, "run_id": run_id}  # in results.json and each checkpoint
    if accelerator.is_main_process:
        timings.save()  # the data and model phases, before the loop (rewritten as the run goes)
    log = TrainingLog(log_path, enabled=accelerator.is_main_process, resume_step=start_step if config.resume else None)
    progress = tqdm(
        range(config.total_steps), initial=start_step, disable=not accelerator.is_main_process, desc="train"
    )
    samples_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    loss_by_sigma = LossBySigma(SIGMA_BINS, device)
    bad_in_a_row, interval_start = 0, time.perf_counter()
    timings.start_loop()
    step = start_step
    # SIGTERM / SIGUSR1 (a scheduler's warning): the step in progress ends, is checkpointed, the run stops
    stop = StopSignals(accelerator.process_index, accelerator.num_processes).install()
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            # The first step apart: it compiles (--compile) and warms the allocator and kernels.
            first = timer.phase("training: first step") if step == start_step + 1 else contextlib.nullcontext()
            with first:
                if config.compile:  # a new iteration for CUDA graphs: the last step's outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                losses = []
                for _ in range(config.gradient_accumulation_steps):
                    batch = next(batches)
                    drop_text, drop_image = (to_device(m, device) for m in cfg_dropout.sample(config.batch_size))
                    with accelerator.accumulate(model), accelerator.autocast():
                        out = objective.loss(
                            model,
                            batch["latents"],
                            drop_text=drop_text,
                            drop_image=drop_image,
                            **conditioning(batch, tokens),
                        )
                        accelerator.backward(out.loss)  # Accelerate divides by the accumulation steps
                    losses.append(out.loss.detach())
                    loss_by_sigma.add(out.per_sample, out.sigmas)
                grad_norm = accelerator.clip_grad_norm_(params, config.grad_clip)  # gradients are synced now
                loss = torch.stack(losses).mean()
                # Decided on the device, never read back here: a non-finite update reaches neither the
                # weights, the optimizer's moments nor the EMA (nor so any checkpoint).
                finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
                optimizer_step(optimizer, finite, accelerator.scaler)
                lr_scheduler.step()
                ema_step(ema, params, finite)
                optimizer.zero_grad(set_to_none=True)
            progress.update(1)
            last = step == config.total_steps
            stopping = stop.should_stop() if not last else None  # the last step just ends the run

            # -------- log: each step's values stay on the device until a logging step reads them all; the
            # log ends with the run's last step (or the one a signal stops it after), whatever the intervals
            log.add(step, loss, grad_norm.detach(), lr_scheduler.get_last_lr()[0], ema.cur_decay_value, ~finite)
            validating = config.validation and (step % config.validation_every == 0 or last) and not stopping
            saving = step % config.checkpoint_every == 0 or stopping
            if last or stopping or validating or saving or step % config.log_every == 0:
                records = log.flush(samples_per_step, time.perf_counter() - interval_start)
                bad_in_a_row = count_skipped(records, bad_in_a_row, config, accelerator, recorder, step)
                record = records[-1]
                accelerator.log({**record.scalars(), **loss_by_sigma.read()}, step=step)
                progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}")

            # -------- checkpoint
            if saving:
                with timer.phase("checkpoints"):
                    check_replicas_agree(accelerator, model)
                    state = {"config": config_record(config), **info}
                    samplers = {"cfg_dropout": cfg_dropout.state_dict(), "batches": batches.state_dict()}
                    save_checkpoint(accelerator, checkpoint_dir, step, state, config.checkpoints_total_limit, samplers)
                if accelerator.is_main_process:
                    timings.save()  # a run killed later still shows where its time went so far

            # -------- validate
            if validating:
                timings.note_peak(device)
                with timer.phase("validation"):
                    validator(step, info)
            if stopping:
                raise stopped_by_signal(config, stopping, step, accelerator, timings)
            if not log.pending:  # logged: the next interval's rate counts training alone
                interval_start = time.perf_counter()
    except torch.cuda.OutOfMemoryError as err:  # (torch.OutOfMemoryError in newer torch)
        raise OutOfMemory(out_of_memory_message(config, step, checkpoint_dir)) from err
    finally:
        log.close()
        stop.restore()

    timings.end_loop(config.total_steps - start_step, samples_per_step, device)

    # ---------------------------------------------------------------- export
    accelerator.wait_for_everyone()
    push_failed = None
    if accelerator.is_main_process:
        with timer.phase("export"):  # checkpoint_final: the EMA weights, the encoders, a model card
            data = {
                "shards": config.shards,
                "samples": sum(len(b) for b in buckets),
                "buckets": [b.bucket for b in buckets],
            }
            figures, sheet = recorder.card()
            last = Path(checkpoint_dir) / checkpoint_name(config.total_steps)
            if not figures and last.exists():  # resumed with no step left: those recorded for its last checkpoint
                figures, sheet = recorded_figures(last, config.output_dir)
            push_failed = export_run(ema_pipeline(ema, config), config, info, data, figures, sheet)
        timings.save()  # timings.json, then RESULTS.md with every phase, export included
        recorder.report()
    accelerator.end_training()
    if push_failed is not None:  # after the report: everything local is written
        raise push_failed
    return recorder.last


def train_seeds(config: TrainConfig) -> dict:
    """--seeds: one run of the design per seed, in `<output_dir>/seed<S>/`, then COMPARE.md over
    them in `<output_dir>` (`nano_dit.compare`). One process runs them one after another. Launched
    as N processes, each runs every N-th seed as a run of its own (one process, its own device:
    no gradients are shared between seeds), and each writes COMPARE.md when its seeds are done,
    under a lock, so that the last to finish leaves the whole comparison. A preempted seed stops
    the sweep (exit 75); `--resume latest` then resumes every seed (a finished one has nothing left)."""
    from nano_dit.compare import write_comparison

    seeds = config.seed_list()
    rank, processes = seed_process()
    mine = seeds[rank::processes]
    if processes > 1:  # on a CPU, each process a share of the cores (its launch no longer says how many share them)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        config = dataclasses.replace(config, cpu_threads=config.cpu_threads or max(cores // processes, 1))
        print(
            f"process {rank} of {processes}: seeds {', '.join(map(str, mine)) or 'none (more processes than seeds)'}"
        )
    results = {}
    for seed in mine:
        print(f"--seeds: seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) in {config.for_seed(seed).output_dir}")
        results[seed] = train(config.for_seed(seed))
    with BuildLock(Path(config.output_dir) / "COMPARE.md", "the comparison of the seeds"):
        report = write_comparison([config.output_dir], out=config.output_dir)
    print(f"the {len(seeds)} seeds compared: {report}")
    return results


def seed_process() -> tuple[int, int]:
    """This process's index and the number of processes `accelerate launch` started; with more
    than one, the launcher's distributed settings are taken off so that this process trains alone
    (on a GPU, the one its local rank names)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        return 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    if torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU"):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # Accelerate's "cuda": this one
    return rank, processes


# What torchrun (under `accelerate launch`) sets to make a process one of several
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
LAUNCHER_VARIABLES += ("ROLE_RANK", "ROLE_WORLD_SIZE")


class EMAValidator:
    """Validation during training: the EMA weights of a step, in a pipeline built at the first
    validation and kept (the run's encoders, on the device, compiled with --compile), measured by
    `validate` and written by `recorder`. Every process validates its share (`validate`'s
    `processes`); the main one writes it."""

    def __init__(self, config: TrainConfig, buckets, ema: EMAModel, accelerator: Accelerator, recorder):
        self.config, self.buckets, self.ema = config, buckets, ema
        self.accelerator, self.recorder = accelerator, recorder
        self.pipe, self.metrics = None, None
        self.prompts = [  # --validation-prompts, their reference images read once
            Prompt(text, Image.open(path).convert("RGB") if path else None, path) for text, path in config.prompts()
        ]

    def __call__(self, step: int, info: dict) -> None:
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # training's random numbers stay as they were
            self._validate(step, info)
        self.accelerator.wait_for_everyone()

    def _validate(self, step: int, info: dict) -> None:
        config, accelerator, start = self.config, self.accelerator, time.perf_counter()
        if accelerator.is_main_process:
            self.recorder.wait()  # the last validation's images (usually long written)
        if self.pipe is None:  # the first validation loads the encoders and the metrics' networks
            self.pipe = ema_pipeline(self.ema, config).to(accelerator.device)
            self.metrics = ImageMetrics(accelerator.device, config.lpips_backbone)
            compile_for_sampling(self.pipe, config.compile_backend if config.compile else None)
        else:
            self.ema.copy_to(self.pipe.transformer.parameters())
        sampler = Sampler(self.pipe, config.sampling, config.mixed_precision, PhaseTimer(accelerator.device))
        setup = time.perf_counter() - start
        validation = validate(
            sampler, self.buckets, self.metrics, seed=config.seed, prompts=self.prompts, processes=accelerator
        )
        if not accelerator.is_main_process:
            return
        info = {"checkpoint": f"EMA weights at step {step}", **info}
        summary = self.recorder.record(validation, step, info, setup_seconds=setup)
        reasons = "; ".join(summary["reasons"][:3])
        accelerator.print(
            f"validation at step {step}: {summary['verdict']}{' — ' + reasons if reasons else ''} "
            f"(see {Path(config.output_dir) / 'RESULTS.md'})"
        )


def stopped_by_signal(config: TrainConfig, signal_name: str, step: int, accelerator, timings) -> Preempted:
    """The end of a run stopped by `signal_name` once step `step` is checkpointed: stopped.json,
    the timings so far, the trackers closed, and the line that names the checkpoint."""
    checkpoint = Path(config.checkpoint_dir) / checkpoint_name(step)
    if accelerator.is_main_process:
        write_stop_record(config.output_dir, signal_name, step, checkpoint)
        timings.save()
    accelerator.end_training()
    message = (
        f"stopped by {signal_name} after step {step} of {config.total_steps}; checkpoint: {checkpoint}; "
        f"continue with --resume latest (exit code {PREEMPTED_EXIT_CODE})"
    )
    accelerator.print(message)
    return Preempted(message, checkpoint)


def count_skipped(records, bad_in_a_row: int, config: TrainConfig, accelerator, recorder, step: int) -> int:
    """The run of skipped (non-finite) steps, carried through `records`, the steps just read back.
    `--max-bad-steps` in a row stop the run here, at the logging step that sees them, before this
    step's checkpoint or validation: the report is written from the log, which holds every step."""
    for r in records:
        bad_in_a_row = bad_in_a_row + 1 if r.skipped else 0
        if r.skipped:
            accelerator.print(f"step {r.step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)")
        if bad_in_a_row >= config.max_bad_steps:
            if accelerator.is_main_process:
                recorder.report(stopped=True)
            raise RuntimeError(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (the last at step {r.step}, "
                f"read at step {step}): stopping. Lower --peak-lr or check the data; resume from the last "
                f"checkpoint in {config.checkpoint_dir}"
            )
    return bad_in_a_row


def config_record(config: TrainConfig) -> dict:
    """The config as plain values (config.json, the checkpoint's training state, the tracker)."""
    return dataclasses.asdict(config)


def dynamo_plugin(config: TrainConfig) -> TorchDynamoPlugin | None:
    """--compile as Accelerate compiles: static graphs (one per bucket, captured once and replayed),
    CUDA graphs on CUDA unless --compile-mode says otherwise. None leaves it to `accelerate launch`."""
    if not config.compile:
        return None
    mode = config.compile_mode or ("reduce-overhead" if torch.cuda.is_available() else "default")
    return TorchDynamoPlugin(backend=config.compile_backend, mode=mode, dynamic=False)


def tracker_config(config: TrainConfig) -> dict:
    """The settings as the trackers take them: flat, scalars only (TensorBoard's hparams refuse a
    nested dict or a list); the sampling settings as `sampling_<name>`, a list as one string, the
    model config left out."""
    record = config_record(config)
    sampling = {f"sampling_{k}": v for k, v in record.pop("sampling").items()}
    record.pop("model")
    return {k: " | ".join(v) if isinstance(v, list) else v for k, v in {**record, **sampling}.items()}


def record_launch_settings(config: TrainConfig, accelerator: Accelerator) -> None:
    """The precision and compilation in effect, whoever chose them (a flag, `accelerate launch`'s
    flags or config file, or the defaults), written back into `config`."""
    config.mixed_precision = accelerator.mixed_precision
    plugin = accelerator.state.dynamo_plugin
    if plugin.backend.value.lower() != "no":
        config.compile, config.compile_backend = True, plugin.backend.value.lower()
        config.compile_mode = plugin.mode


def restore_samplers(path, accelerator, samplers: dict) -> None:
    """Each process's CFG-dropout and batch streams, from its own file in the checkpoint."""
    state = load_process_state(path, accelerator.process_index)
    if state is None:  # saved by fewer processes: this one starts its streams afresh
        print(f"process {accelerator.process_index}: no sampler state in {path}; its streams restart from the seed")
        return
    for name, sampler in samplers.items():
        sampler.load_state_dict(state[name])


def check_output_dir(config: TrainConfig, remove: bool) -> None:
    """A new run does not write over an earlier one unless asked (--resume or --overwrite-output-dir);
    asked, the earlier checkpoints go first (`remove`: the main process), so that a later
    `--resume latest` cannot pick one of them."""
    checkpoint_dir = config.checkpoint_dir
    earlier = os.path.isdir(checkpoint_dir) and any(os.scandir(checkpoint_dir))
    if earlier and config.overwrite_output_dir and not config.resume:
        if remove:
            shutil.rmtree(checkpoint_dir)
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


def build_lr_scheduler(config: TrainConfig, optimizer, num_processes: int):
    """--lr-scheduler over --total-steps after --warmup-steps. Accelerate steps a prepared scheduler
    once per process at each optimizer step, hence the scaling (as diffusers' training scripts do).
    The default, the validation plan's cosine to a floor (`--min-lr`), is transformers'
    `cosine_with_min_lr`; the others are diffusers' `get_scheduler`'s."""
    warmup, total = config.warmup_steps * num_processes, config.total_steps * num_processes
    if config.lr_scheduler == "cosine_with_min_lr":
        return transformers.get_scheduler(
            "cosine_with_min_lr", optimizer, warmup, total, scheduler_specific_kwargs={"min_lr": config.min_lr}
        )
    return diffusers.optimization.get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total
    )


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message says what to change and where to resume."""


def out_of_memory_message(config: TrainConfig, step: int, checkpoint_dir: str) -> str:
    found = list_checkpoints(checkpoint_dir)
    resume = f"{found[-1]} (--resume latest)" if found else "none yet: it starts afresh"
    remedies = [f"--batch-size {max(config.batch_size // 2, 1)} (now {config.batch_size})"]
    if not config.gradient_checkpointing:
        remedies.append("--gradient-checkpointing")
    if not config.use_8bit_adam:
        remedies.append('--use-8bit-adam (pip install "nano-dit[gpu]")')
    if config.mixed_precision == "no":
        remedies.append("--mixed-precision bf16")
    return f"out of device memory at step {step}. Try {', '.join(remedies)}. The last good checkpoint is {resume}."


if __name__ == "__main__":
    try:
        main()
    except Preempted:  # its line is printed: a requeue wrapper tests the code (or stopped.json)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, OutOfMemory, PushFailed, HubRepoRefused) as err:
        sys.exit(f"train_nano_dit.py: error: {err}")
    except ValueError as err:  # bad input found past the flags (data, checkpoints): one line unless debugging
        if os.environ.get("NANO_DIT_DEBUG"):
            raise
        sys.exit(f"train_nano_dit.py: error: {err} (NANO_DIT_DEBUG=1 shows the traceback)")
