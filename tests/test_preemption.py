"""A scheduler's signal (SIGTERM, SIGUSR1) mid-training: the step ends, is checkpointed, the run
exits with PREEMPTED_EXIT_CODE, and `--resume latest` ends on the weights of a run never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TWO_CPU_PROCESSES, TWO_CPU_PROCESSES_ENV, load_train_script
from safetensors.torch import load_file

from nano_dit.checkpointing import list_checkpoints, verify_checkpoint
from nano_dit.preemption import PREEMPTED_EXIT_CODE, STOP_RECORD, Preempted, StopSignals

train_nano_dit = load_train_script()
SCRIPT = Path(__file__).parents[1] / "train_nano_dit.py"
FINAL = "checkpoints/checkpoint_final/transformer/diffusion_pytorch_model.safetensors"
EMA = "checkpoints/{}/transformer_ema/diffusion_pytorch_model.safetensors"


def _args(tmp_path, stand_in_dir, out, steps=60):
    return [
        *("--num-images", "8", "--resolution", "16", "--batch-size", "4", "--warmup-steps", "2"),
        *("--total-steps", str(steps), "--checkpoint-every", "1000", "--log-every", "1"),
        *("--shards", str(tmp_path / "shards"), "--cache", str(tmp_path / "cache")),
        *("--stand-in-encoders", str(stand_in_dir), "--output-dir", str(tmp_path / out)),
        "--no-validation",
    ]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "checkpoints" / "training_log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _sigterm(process: psutil.Process) -> None:
    process.send_signal(signal.SIGTERM)


def _start_and_signal(command, run_dir: Path, send=_sigterm, env=None) -> subprocess.CompletedProcess:
    """Start `command`, and once its log holds 5 steps `send(process)` its signal; what it printed
    and its exit code."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + 300
    while len(_logged_steps(run_dir)) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it was signalled: " + proc.stderr.read()[-3000:]
    send(psutil.Process(proc.pid))
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), name


def _check_stopped(run_dir: Path, result) -> int:
    """The stop a signal leaves: stopped.json, a whole checkpoint at its step, every step up to it
    logged once. Returns the step."""
    record = json.loads((run_dir / STOP_RECORD).read_text())
    step, checkpoint = record["step"], Path(record["checkpoint"])
    assert record["signal"] == "SIGTERM" and record["exit_code"] == PREEMPTED_EXIT_CODE
    assert 5 <= step < 60, step  # mid-run: after the 5 steps seen, before the end
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [checkpoint.name]
    assert checkpoint.name.endswith(f"{step:07d}") and verify_checkpoint(checkpoint) is None
    assert _logged_steps(run_dir) == list(range(1, step + 1))  # the buffered lines written, none lost
    assert f"stopped by SIGTERM after step {step} of 60; checkpoint: {checkpoint}" in result.stdout
    assert not (run_dir / "checkpoints" / "checkpoint_final").exists()
    return step


def test_a_signalled_run_checkpoints_its_step_exits_75_and_resumes_to_the_same_weights(tmp_path, stand_in_dir):
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "straight"))
    run = tmp_path / "stopped"
    result = _start_and_signal([sys.executable, str(SCRIPT), *_args(tmp_path, stand_in_dir, "stopped")], run)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    assert "SIGTERM received: finishing this step" in result.stderr
    step = _check_stopped(run, result)

    train_nano_dit.main([*_args(tmp_path, stand_in_dir, "stopped"), "--resume", "latest"])
    assert not (run / STOP_RECORD).exists()  # the run went on from it
    assert _logged_steps(run) == list(range(1, 61))
    _same_weights(tmp_path / "straight" / FINAL, run / FINAL)
    assert step < 60


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_after_one_step_and_they_resume_exactly(tmp_path, stand_in_dir):
    # DDP on CPU; SIGTERM to rank 1 alone.
    launch, env = [sys.executable, *TWO_CPU_PROCESSES, str(SCRIPT)], TWO_CPU_PROCESSES_ENV

    def to_rank_1(launcher: psutil.Process) -> None:
        # the workers are the launcher's children; each knows its rank from its environment
        ranks = {p.environ().get("RANK"): p for p in launcher.children(recursive=True)}
        ranks["1"].send_signal(signal.SIGTERM)

    def run(out, *extra):
        command = [*launch, *_args(tmp_path, stand_in_dir, out), *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert result.returncode == 0, result.stderr[-3000:]

    run("straight")
    stopped = tmp_path / "stopped"
    result = _start_and_signal([*launch, *_args(tmp_path, stand_in_dir, "stopped")], stopped, to_rank_1, env)
    # The workers exit with 75; torchrun, under `accelerate launch`, reports that as its own failure
    # (exit 1): stopped.json is what a wrapper reads there.
    assert result.returncode != 0
    assert "process 1: SIGTERM received" in result.stderr and "process 0: SIGTERM" not in result.stderr
    step = _check_stopped(stopped, result)
    checkpoint = stopped / "checkpoints" / f"checkpoint_step{step:07d}"
    assert {p.name for p in checkpoint.glob("process_state_*.pt")} == {"process_state_0.pt", "process_state_1.pt"}

    run("stopped", "--resume", "latest")
    assert _logged_steps(stopped) == list(range(1, 61))
    _same_weights(tmp_path / "straight" / FINAL, stopped / FINAL)


def test_a_second_signal_during_the_save_leaves_it_whole(tmp_path, stand_in_dir, monkeypatch):
    """SIGTERM at step 3, then again while its checkpoint is being written: the save completes,
    checksummed, and the resumed run ends as the straight one."""
    args = _args(tmp_path, stand_in_dir, "run", steps=8)
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "straight", steps=8))
    real_ema_step, real_save, steps = train_nano_dit.ema_step, train_nano_dit.save_checkpoint, []

    def ema_step(*a, **k):
        real_ema_step(*a, **k)
        steps.append(None)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def save_signalled(accelerator, checkpoint_dir, step, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this thread: mid-save
        return real_save(accelerator, checkpoint_dir, step, *a, **k)

    monkeypatch.setattr(train_nano_dit, "ema_step", ema_step)
    monkeypatch.setattr(train_nano_dit, "save_checkpoint", save_signalled)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        train_nano_dit.main(args)
    assert signal.getsignal(signal.SIGTERM) is previous  # the run's handler is gone with it
    assert stopped.value.checkpoint.name == "checkpoint_step0000003"
    assert verify_checkpoint(stopped.value.checkpoint) is None

    monkeypatch.setattr(train_nano_dit, "ema_step", real_ema_step)
    monkeypatch.setattr(train_nano_dit, "save_checkpoint", real_save)
    train_nano_dit.main([*args, "--resume", "latest"])
    _same_weights(tmp_path / "straight" / FINAL, tmp_path / "run" / FINAL)


def test_a_signal_at_the_last_step_lets_the_run_finish(tmp_path, stand_in_dir, monkeypatch):
    real_ema_step, steps = train_nano_dit.ema_step, []

    def ema_step(*a, **k):
        real_ema_step(*a, **k)
        steps.append(None)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train_nano_dit, "ema_step", ema_step)
    train_nano_dit.main(_args(tmp_path, stand_in_dir, "run", steps=4))  # no Preempted: nothing left to train
    run = tmp_path / "run"
    assert (run / "checkpoints" / "checkpoint_final").is_dir() and not (run / STOP_RECORD).exists()


def test_stop_signals_note_the_signal_say_so_and_put_the_handlers_back(capfd):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    stop = StopSignals().install()
    try:
        assert stop.should_stop() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        assert stop.should_stop() == "SIGUSR1"
    finally:
        stop.restore()
    assert {sig: signal.getsignal(sig) for sig in previous} == previous
    err = capfd.readouterr().err
    assert "SIGUSR1 received: finishing this step, then writing a checkpoint" in err
    assert "SIGTERM received again: the checkpoint in progress will complete" in err


@pytest.mark.slow
def test_the_slurm_script_checkpoints_on_its_warning_requeues_and_its_next_run_finishes(tmp_path, stand_in_dir):
    """scripts/slurm_train.sbatch as Slurm runs it, on 2 CPU processes: SIGUSR1 to the batch script
    (what `--signal=B:USR1@300` sends) mid-run; then the requeued job, run again, finishes."""
    bin_dir = tmp_path / "bin"  # a stand-in `scontrol` that writes down what it was asked
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_SUBMIT_DIR": str(SCRIPT.parent),
        **TWO_CPU_PROCESSES_ENV,  # DDP on CPU (gloo), as the other multi-process tests launch it
    }
    job = ["bash", str(SCRIPT.parent / "scripts" / "slurm_train.sbatch"), *_args(tmp_path, stand_in_dir, "run")]
    run = tmp_path / "run"

    first = _start_and_signal(job, run, lambda script: script.send_signal(signal.SIGUSR1), env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in first.stdout
    record = json.loads((run / STOP_RECORD).read_text())
    step = record["step"]
    assert record["signal"] == "SIGUSR1" and 5 <= step < 60 and _logged_steps(run) == list(range(1, step + 1))

    second = subprocess.run(job, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'checkpoint_step{step:07d}'}" in second.stdout
    assert _logged_steps(run) == list(range(1, 61)) and (run / "checkpoints" / "checkpoint_final").is_dir()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again: done
