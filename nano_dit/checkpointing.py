"""Training checkpoints: `accelerator.save_state` folders written aside, then renamed into place.

    <output_dir>/checkpoints/checkpoint_step0001000/   model, optimizer, LR schedule, RNG states
                                                       (accelerator.save_state), CFG dropout and
                                                       batch sampler per process, training_state.json
                                                       (step, config, version, CFG-dropout scheme,
                                                       run id), and
      transformer_ema/                                 the EMA weights and state, as diffusers'
                                                       training examples save them (EMAModel.save_pretrained)

A checkpoint appears under its final name only once it is complete (`os.replace` of a folder
written as `.checkpoint_step0001000.partial`), so a crash or kill during a save leaves the previous
checkpoints whole and never a half-written one that `--resume latest` could pick. Each carries
`checksums.json` (size and SHA-256 of every file), checked before a resume: `--resume latest`
passes over a damaged checkpoint with a warning and takes the newest whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging

from . import __version__

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
EMA_DIR = "transformer_ema"  # EMAModel.save_pretrained: a model folder, the EMA state in its config
CHECKSUMS = "checksums.json"
CHECKPOINT = re.compile(r"^checkpoint_step(\d{7})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step{step:07d}"


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def save_checkpoint(
    accelerator,
    checkpoint_dir: str | os.PathLike,
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
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / checkpoint_name(step)
    partial = checkpoint_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if process_state is not None:
        torch.save(process_state, partial / f"process_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # every process's part is on disk before the rename
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({**state, "step": step, "version": __version__}, indent=2))
        write_checksums(partial)
        if final.exists():  # a rerun of the same step: the new one wins, atomically
            shutil.rmtree(final)
        os.replace(partial, final)
        if keep is not None:
            for old in list_checkpoints(checkpoint_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_ema_with_the_state(accelerator, ema: EMAModel) -> None:
    """Save `ema` into every `accelerator.save_state` folder as `transformer_ema/` and load it back
    with `load_state`, through Accelerate's save / load hooks: diffusers' training examples' way
    (`ema.save_pretrained`, `EMAModel.from_pretrained`), public APIs only. The shadow weights are
    saved in fp32 safetensors and the EMA's step count in the folder's config: a resume continues
    the average exactly. `ema` needs `model_cls` and `model_config`."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            with torch.random.fork_rng(devices=[]):  # it builds a model to save: training's numbers stay
                ema.save_pretrained(os.path.join(output_dir, EMA_DIR))

    def load(models, input_dir):
        ema.load_state_dict(load_ema(Path(input_dir), ema.model_cls, foreach=ema.foreach).state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_ema(checkpoint: Path, model_cls, foreach: bool = False) -> EMAModel:
    """The EMA of a checkpoint (`transformer_ema/`), as `EMAModel.from_pretrained` reads it: the
    shadow weights are the folder's model, the EMA's state (decay, step count) its config's extra
    keys. Read with `from_pretrained` and `load_config` directly, without that method's deprecated
    config-as-path call, and without diffusers' warning that the extra keys "will be ignored" (here
    they are read)."""
    folder = str(checkpoint / EMA_DIR)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model = model_cls.from_pretrained(folder)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    ema = EMAModel(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
    ema.load_state_dict(model_cls.load_config(folder))  # it takes the EMA's keys, the model's are no state
    return ema


def resolve_resume(resume: str, checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, verified against its checksums.

    `latest`: the newest whole checkpoint in checkpoint_dir; damaged ones are passed over with a
    warning. With none at all (a first save that never completed, or no run yet), None: the run
    starts from step 0, with a warning, as diffusers' training scripts do. A given folder must be
    whole; a damaged one is refused naming the file.
    """
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_FILE} in it)")
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"--resume {resume}: {problem}")
        return path
    damaged = []
    for path in reversed(list_checkpoints(checkpoint_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            for earlier, why in damaged:
                logger.warning("--resume latest: skipping %s (%s)", earlier.name, why)
            return path
        damaged.append((path, problem))
    if damaged:
        details = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise ValueError(f"--resume latest: every checkpoint in {checkpoint_dir} is damaged ({details})")
    unfinished = sorted(p.name for p in Path(checkpoint_dir).glob(".checkpoint_step*.partial"))
    logger.warning(
        "--resume latest: no complete checkpoint in %s%s; starting from step 0",
        checkpoint_dir,
        f" ({', '.join(unfinished)} never completed)" if unfinished else "",
    )
    return None


def write_checksums(folder: Path) -> None:
    """checksums.json: the size and SHA-256 of every file under `folder`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    manifest = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(manifest, indent=1))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file matches checksums.json; else what is wrong, naming the file. A
    checkpoint written before checksums existed is taken as it is (with a warning)."""
    manifest_path = folder / CHECKSUMS
    if not manifest_path.exists():
        if not (folder / STATE_FILE).exists():
            return f"no {STATE_FILE} (incomplete)"
        logger.warning("%s has no %s (an older version wrote it): its files are not verified", folder, CHECKSUMS)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{CHECKSUMS} is unreadable ({err})"
    for name, expected in manifest.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} is damaged: {size} bytes, {expected['size']} written"
        if _sha256(file) != expected["sha256"]:
            return f"{name} is damaged: its contents differ from what was written (SHA-256)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
