"""Replacing a folder (or a file) the user already has, without a moment where nothing whole exists."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def swap_in(new: Path, target: Path) -> None:
    """Put the finished folder `new` in place of `target`. The old folder is moved aside first
    and deleted only once the new one is in place: at any moment a whole folder exists, under
    `target` or (between the two renames) as `<target>.old` beside the new one."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    target.parent.mkdir(parents=True, exist_ok=True)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_aside(path: Path, text: str) -> None:
    """`text` into `path`, written beside it first and renamed over it: a crash leaves the previous
    file whole. The temporary name is this process's, so processes writing one file at once (runs
    started together) do not mix their bytes."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_aside(save: Callable[[Path], object], target: Path) -> None:
    """`save(folder)` into `.<target name>.partial` beside `target`, then `swap_in` the whole of it:
    a kill during the save leaves the previous `target` as it was."""
    target = Path(target)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    swap_in(partial, target)
