"""The lowest versions setup.cfg declares, as pip constraints: `name==minimum` for every `>=` bound.

    python scripts/lower_bounds.py --extras dev > lowest.txt
    pip install -c lowest.txt -e ".[dev]"

CI's lowest-versions leg installs with these, so what setup.cfg declares and what is tested are
read from the same lines and cannot drift apart. Requirements without a lower bound are left to pip.
"""

from __future__ import annotations

import argparse
import configparser
import re
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def requirements(setup_cfg: Path = SETUP_CFG, extras: tuple[str, ...] = ()) -> list[str]:
    """install_requires and the named extras of `setup_cfg`, one requirement string each."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    blocks = [parser["options"]["install_requires"]]
    blocks += [parser["options.extras_require"][name] for name in extras]
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def lower_bounds(lines: list[str]) -> dict[str, str]:
    """name -> the version of its `>=` bound, for every requirement that has one."""
    bounds = {}
    for line in lines:
        match = REQUIREMENT.match(line)
        if match is None:
            raise ValueError(f"setup.cfg: cannot read the requirement {line!r}")
        name, specifiers = match.group(1).lower(), match.group(3)
        for spec in (s.strip() for s in specifiers.split(",") if s.strip()):
            if spec.startswith(">="):
                bounds[name] = spec[2:].strip()
    return bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", nargs="*", default=[], help="extras whose bounds are pinned too (e.g. dev)")
    args = parser.parse_args()
    for name, version in lower_bounds(requirements(extras=tuple(args.extras))).items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
