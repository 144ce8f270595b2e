"""Replacing a folder the user already has, without a moment where nothing whole exists."""

from __future__ import annotations

import shutil
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
