"""Training checkpoints: `accelerator.save_state` folders written aside, then renamed into place.

    <output_dir>/checkpoints/checkpoint_step0001000/   model, optimizer, LR schedule, RNG states,
                                                       EMA, CFG dropout, batch sampler, and
                                                       training_state.json (step, config, version,
                                                       CFG-dropout scheme)

A checkpoint appears under its final name only once it is complete (`os.replace` of a folder
written as `.checkpoint_step0001000.partial`), so a crash or kill during a save leaves the previous
checkpoints whole and never a half-written one that `--resume latest` could pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from . import __version__

STATE_FILE = "training_state.json"
CHECKPOINT = re.compile(r"^checkpoint_step(\d{7})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step{step:07d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def save_checkpoint(
    accelerator,
    ckpt_dir: str | os.PathLike,
    step: int,
    state: dict,
    keep: int | None,
    process_state: dict | None = None,
) -> Path:
    """Save the accelerator state (and `state` as JSON) as `checkpoint_step<step>`; keep the
    newest `keep` checkpoints (all when None). Call on every process: save_state gathers.

    `process_state` is what differs between processes (their samplers' states); Accelerate saves
    registered objects from the main process only, so each process writes its own file here.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    partial = ckpt_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if process_state is not None:
        torch.save(process_state, partial / f"process_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # every process's part is on disk before the rename
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({**state, "step": step, "version": __version__}, indent=2))
        if final.exists():  # a rerun of the same step: the new one wins, atomically
            shutil.rmtree(final)
        os.replace(partial, final)
        if keep is not None:
            for old in list_checkpoints(ckpt_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> Path:
    """`latest` -> the newest complete checkpoint in ckpt_dir; otherwise the given folder."""
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_FILE} in it)")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load_process_state(path: Path, process_index: int) -> dict | None:
    """This process's own part of a checkpoint, or None if it was saved by fewer processes."""
    file = path / f"process_state_{process_index}.pt"
    return torch.load(file, weights_only=True) if file.exists() else None


def check_resumable(saved: dict, model_config: dict, cfg_scheme: str, path: Path) -> None:
    """Refuse a checkpoint of another architecture or another CFG-dropout scheme, saying why."""
    if saved.get("cfg_dropout_scheme") != cfg_scheme:
        raise ValueError(
            f"{path} was trained with CFG-dropout scheme {saved.get('cfg_dropout_scheme')!r}, this run uses "
            f"{cfg_scheme!r}. A model trained with other conditioning modes has not learned the ones dual CFG "
            "samples (checkpoints from the old independent-Bernoulli dropout are invalid): retrain, or resume "
            "with the same --p-* flags"
        )
    saved_model = saved.get("config", {}).get("model", {})
    diff = {k: (saved_model.get(k), v) for k, v in model_config.items() if saved_model.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{path} holds another architecture ({details})")


def check_replicas_agree(accelerator, model) -> None:
    """Raise if the processes' weights differ (DDP keeps them equal; a checkpoint shows one copy).

    One all-gather of a checksum per process; run before each checkpoint.
    """
    checksum = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()[None]  # (1,)
    sums = accelerator.gather(checksum)  # (num_processes,)
    if not torch.equal(sums, sums[:1].expand_as(sums)):
        raise RuntimeError(f"the processes hold different weights (checksums {sums.tolist()}); not saving")
