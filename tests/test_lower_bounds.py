"""scripts/lower_bounds.py: the constraints CI's lowest-versions leg installs, read from setup.cfg."""

from conftest import load_script

lower_bounds = load_script("lower_bounds")


def test_every_lower_bound_of_setup_cfg_is_pinned_and_nothing_else():
    lines = lower_bounds.requirements(extras=("hf", "lora"))
    bounds = lower_bounds.lower_bounds(lines)
    assert bounds["diffusers"] == "0.41" and bounds["torch"] == "2.14.1" and bounds["peft"] == "0.18"
    with_bound = [line for line in lines if ">=" in line]
    assert len(bounds) == len(with_bound)  # one pin per declared bound
    assert "pytest" not in bounds  # the dev tools are left to pip


def test_comments_extras_and_upper_bounds_are_read_as_pip_reads_them(tmp_path):
    cfg = tmp_path / "setup.cfg"
    cfg.write_text(
        "[options]\ninstall_requires =\n    # a comment\n    diffusers>=0.41,<1.0\n    numpy\n"
        "[options.extras_require]\nx =\n    peft[torch] >= 0.18  # why\ny =\n    other>=9\n"
    )
    lines = lower_bounds.requirements(cfg, extras=("x",))
    assert lines == ["diffusers>=0.41,<1.0", "numpy", "peft[torch] >= 0.18"]
    assert lower_bounds.lower_bounds(lines) == {"diffusers": "0.41", "peft": "0.18"}
