"""ST-LPIPS (nano_dit.perceptual) against numbers from the stlpips-pytorch package's own code.

REFERENCE was computed once with stlpips-pytorch 0.0.2's own `LPIPS(net="alex", variant="shift_tolerant")`
(torch 2.14.1, CPU), in a scratch environment outside the repository, because importing the package
needs IPython and torchsummary:

    python -m venv /tmp/stlref
    /tmp/stlref/bin/pip install torch torchvision stlpips-pytorch==0.0.2 ipython torchsummary
    /tmp/stlref/bin/python - <<'EOF'
    import ast, torch, torch.nn.functional as F
    # make_pair, taken verbatim from tests/test_perceptual.py
    tree = ast.parse(open("tests/test_perceptual.py").read())
    exec(ast.unparse([n for n in tree.body if getattr(n, "name", "") == "make_pair"][0]))
    from stlpips_pytorch import stlpips
    metric = stlpips.LPIPS(net="alex", variant="shift_tolerant")
    with torch.no_grad():
        print([metric(*make_pair(k)).item() for k in range(4)])
    EOF
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nano_dit import perceptual
from nano_dit.perceptual import MIN_SIZE, ShiftTolerantLPIPS, stlpips_weights_path

# make_pair(k) for k = 0..3: unrelated 64x64, identical 64x64, 1-pixel shift 64x64, noisy copy 96x64 (H x W).
REFERENCE = [0.5133529901504517, 0.0, 0.004941289778798819, 0.13921236991882324]


def make_pair(k):
    """Input pair k (0..3): two (1, 3, H, W) images in [-1, 1], from torch.Generator().manual_seed(k)."""
    g = torch.Generator().manual_seed(k)

    def image(h, w):
        # Uniform noise on a coarse and a finer grid, upsampled bilinearly: image-like, mostly low
        # frequencies, so that a one-pixel shift is a small change. Convex mixes keep it in [-1, 1].
        octaves = [torch.rand(1, 3, h // s, w // s, generator=g) * 2 - 1 for s in (16, 4)]
        up = [F.interpolate(o, size=(h, w), mode="bilinear", align_corners=False) for o in octaves]
        return (2 * up[0] + up[1]) / 3

    if k == 0:
        return image(64, 64), image(64, 64)
    if k == 1:
        x = image(64, 64)
        return x, x.clone()
    if k == 2:
        wide = image(64, 65)
        return wide[..., :64], wide[..., 1:]
    x = image(96, 64)
    return x, (x + 0.2 * (torch.rand(x.shape, generator=g) * 2 - 1)).clamp(-1, 1)


@pytest.fixture(scope="module")
def metric():
    return ShiftTolerantLPIPS.from_pretrained()


def test_loads_the_shipped_weights_frozen_with_the_expected_parameter_count(metric):
    # from_pretrained loads strictly: a missing or unexpected key would already have raised.
    assert sum(p.numel() for p in metric.parameters()) == 2_470_848
    assert not metric.training
    assert not any(p.requires_grad for p in metric.parameters())


@pytest.mark.parametrize("k", range(4))
def test_distance_equals_the_package_s(metric, k):
    with torch.no_grad():
        d = metric(*make_pair(k))
    assert d.shape == (1,)
    assert d.item() == pytest.approx(REFERENCE[k], abs=1e-5)


def test_a_batch_gives_one_distance_per_pair(metric):
    pairs = [make_pair(k) for k in range(3)]  # the 64x64 ones
    with torch.no_grad():
        d = metric(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    torch.testing.assert_close(d, torch.tensor(REFERENCE[:3]), atol=1e-5, rtol=0)


def test_identical_images_are_at_distance_zero(metric):
    x, y = make_pair(1)
    with torch.no_grad():
        assert metric(x, y).item() == 0.0


def test_a_one_pixel_shift_is_much_closer_than_an_unrelated_image(metric):
    x, shifted = make_pair(2)
    _, unrelated = make_pair(0)
    with torch.no_grad():
        assert metric(x, shifted).item() < 0.1 * metric(x, unrelated).item()


def test_images_below_the_minimum_size_are_refused(metric):
    x = torch.zeros(1, 3, MIN_SIZE, 64)
    with torch.no_grad():
        metric(x, x)
        with pytest.raises(ValueError, match=f"at least {MIN_SIZE}x{MIN_SIZE}"):
            metric(x[:, :, 1:], x[:, :, 1:])


def test_weights_path_says_how_to_install_when_the_distribution_is_absent(monkeypatch):
    find_spec = perceptual.importlib.util.find_spec
    monkeypatch.setattr(
        perceptual.importlib.util, "find_spec", lambda name: None if name == "stlpips_pytorch" else find_spec(name)
    )
    with pytest.raises(FileNotFoundError, match=r"alex_shift_tolerant\.pth.*pip install stlpips-pytorch"):
        stlpips_weights_path()


def test_importing_and_running_it_imports_neither_the_package_nor_its_debug_dependencies():
    # `import nano_dit` alone takes seconds (diffusers); a bare parent package imports just this module.
    script = f"""
import sys, types, torch
sys.modules["nano_dit"] = types.ModuleType("nano_dit")
sys.modules["nano_dit"].__path__ = [{str(Path(perceptual.__file__).parent)!r}]
from nano_dit.perceptual import ShiftTolerantLPIPS
x = torch.zeros(1, 3, 32, 32)
ShiftTolerantLPIPS.from_pretrained()(x, x)
print(sorted(m for m in ("stlpips_pytorch", "IPython", "torchsummary") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
