"""Where "memorised" lies: ST-LPIPS and PSNR of the synthetic set against copies of itself that a
person can't tell from it at a glance, and against copies a person can.

    python scripts/calibrate_thresholds.py                       # the demo's set: 100 images at 32²
    python scripts/calibrate_thresholds.py --resolution 64 --out runs/calibration_64

The verdict's "memorised" means what the validation plan means by it: a person looking at the
reconstruction sheet can't tell a reconstruction from its original. This script measures that
line once, on the ground truth alone, never on a trained model: each perturbation below is applied
to every image of the set, and the distance of the perturbed copy to its original is recorded.

- *unnoticed*: changes that the person who judged the sheet (`perturbations.png`, written here;
  each cell at the 96-pixel size of the validation sheets) could not see at a glance: faint noise,
  a slight colour cast, a sub-pixel blur, a one-pixel shift of the whole picture.
- *soft, all right*: a change a person sees on a second look (a slight blur) but after which every
  attribute the validation plan asks for is still right: each shape's kind, colour, size and
  position, and the scene.
- *wrong*: changes that make it another picture: the shapes blurred into blobs, one shape of the
  wrong colour or kind or in the wrong cell, another scene, heavy grain.

"Memorised" must take the first two and refuse the third; "failed" is as far as the blobs. The
table gives, for each perturbation, the share of images the demo's line calls memorised. The
figures of one run are recorded in docs/validation.md with the judgment that sorted them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nano_dit.config import PRESETS
from nano_dit.encoders import images_to_tensor
from nano_dit.metrics import ImageMetrics
from nano_dit.sheets import contact_sheet
from nano_dit.synthetic import COLORS, POSITIONS, SHAPES, Layout, ShapeSpec, render, sample_layouts


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _noise(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _shift(x: torch.Tensor) -> torch.Tensor:  # the whole picture one pixel to the right
    return torch.cat([x[..., :1], x[..., :-1]], dim=-1)


def _edited(layouts: list[Layout], resolution: int, change) -> torch.Tensor:
    """Every layout with its first object changed by `change(object) -> object`, drawn."""
    out = []
    for layout in layouts:
        first = change(layout.objects[0], {o.position for o in layout.objects}, {o.color for o in layout.objects})
        out.append(render(Layout([first, *layout.objects[1:]], layout.scene), resolution))
    return (images_to_tensor(out) + 1) / 2


def _recolor(o: ShapeSpec, cells, colors) -> ShapeSpec:
    return ShapeSpec(o.shape, next(c for c in COLORS if c not in colors), o.size, o.position, o.center, o.radius)


def _reshape(o: ShapeSpec, cells, colors) -> ShapeSpec:
    shape = SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)]
    return ShapeSpec(shape, o.color, o.size, o.position, o.center, o.radius)


def _move(o: ShapeSpec, cells, colors) -> ShapeSpec:  # to the nearest free cell
    col, row = POSITIONS[o.position]
    free = [(abs(c - col) + abs(r - row), name) for name, (c, r) in POSITIONS.items() if name not in cells]
    name = min(free)[1]
    c, r = POSITIONS[name]
    return ShapeSpec(o.shape, o.color, o.size, name, ((c + 0.5) / 3, (r + 0.5) / 3), o.radius)


def perturbations(layouts: list[Layout], truth: torch.Tensor, resolution: int) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (judgment, the perturbed copies `(N, 3, H, W)` in [0, 1])."""
    other_scene = [Layout(layout.objects, layouts[(i + 1) % len(layouts)].scene) for i, layout in enumerate(layouts)]
    cast = torch.tensor([4 / 255, -3 / 255, 2 / 255]).view(1, 3, 1, 1)
    return {
        "noise, std 2/255": ("unnoticed", _noise(truth, 2 / 255)),
        "noise, std 4/255": ("unnoticed", _noise(truth, 4 / 255)),
        "colour cast, 4/255": ("unnoticed", (truth + cast).clamp(0, 1)),
        "blur, σ 0.4 px": ("unnoticed", _blur(truth, 0.4)),
        "shifted 1 px": ("unnoticed", _shift(truth)),
        "blur, σ 0.7 px": ("soft, all right", _blur(truth, 0.7)),
        "blur, σ 1.2 px (blobs)": ("wrong", _blur(truth, 1.2)),
        "noise, std 16/255": ("wrong", _noise(truth, 16 / 255)),
        "one shape recoloured": ("wrong", _edited(layouts, resolution, _recolor)),
        "one shape of another kind": ("wrong", _edited(layouts, resolution, _reshape)),
        "one shape moved a cell": ("wrong", _edited(layouts, resolution, _move)),
        "another image's scene": ("wrong", (images_to_tensor([render(o, resolution) for o in other_scene]) + 1) / 2),
    }


def _pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/calibration")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layouts = sample_layouts(args.num_images, args.seed)
    truth = (images_to_tensor([render(layout, args.resolution) for layout in layouts]) + 1) / 2
    metrics = ImageMetrics("cpu", backbone="none")
    line = PRESETS["demo"]["thresholds"]
    rows, cells, captions = [], [truth[i] for i in range(4)], ["original"] * 4
    for name, (judgment, copies) in perturbations(layouts, truth, args.resolution).items():
        st, psnr = metrics.stlpips(copies, truth), metrics.psnr(copies, truth)
        rows.append(
            {
                "perturbation": name,
                "judgment": judgment,
                "stlpips_median": statistics.median(st.tolist()),
                "stlpips_p90": float(np.percentile(st.numpy(), 90)),
                "psnr_median": statistics.median(psnr.tolist()),
                "psnr_p10": float(np.percentile(psnr.numpy(), 10)),
                # the share of images the demo's line calls memorised
                "memorised": ((st <= line["stlpips_success"]) & (psnr >= line["min_psnr"])).float().mean().item(),
            }
        )
        cells += [copies[i] for i in range(4)]
        captions += [f"{name} ({judgment})"] * 4
    contact_sheet([_pil(c) for c in cells], captions, columns=8, cell=96).save(out / "perturbations.png")
    unnoticed = [r for r in rows if r["judgment"] != "wrong"]
    seen = [r for r in rows if r["judgment"] == "wrong"]
    bounds = {
        "largest right ST-LPIPS (90th percentile)": max(r["stlpips_p90"] for r in unnoticed),
        "smallest wrong ST-LPIPS (median)": min(r["stlpips_median"] for r in seen),
        "lowest right PSNR (10th percentile)": min(r["psnr_p10"] for r in unnoticed),
        "highest wrong PSNR (median)": max(r["psnr_median"] for r in seen),
    }
    memorised = f"ST-LPIPS ≤ {line['stlpips_success']:g} and PSNR ≥ {line['min_psnr']:g} dB"
    print(f"| perturbation | judged | ST-LPIPS median (p90) | PSNR median (p10) | called memorised ({memorised}) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['perturbation']} | {r['judgment']} | {r['stlpips_median']:.3f} ({r['stlpips_p90']:.3f}) "
            f"| {r['psnr_median']:.1f} dB ({r['psnr_p10']:.1f}) | {r['memorised']:.0%} |"
        )
    print()
    for k, v in bounds.items():
        print(f"{k}: {v:.3f}")
    (out / "calibration.json").write_text(json.dumps({"rows": rows, "bounds": bounds, **vars(args)}, indent=2))
    return {"rows": rows, "bounds": bounds}


if __name__ == "__main__":
    main()
