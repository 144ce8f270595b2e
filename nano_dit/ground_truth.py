"""What a ground-truth layout lets validation measure: how far a generated picture went from one
known picture toward another.

On the synthetic set every image's layout is recorded (`<key>.json`), so the picture each test
*should* give can be drawn: A's shapes on B's scene for a DINO swap, the edited layout for a
caption edit, the scene with no shapes for the text-only mode. Each measure is then one number,

    toward(output, source, target) = ⟨output − source, target − source⟩ / ‖target − source‖²

the output projected on the line from `source` (what a model that failed the test would draw) to
`target` (what the test asks for), in pixels. Where the two pictures agree the pixels count for
nothing, so the number reads only the part of the picture the test is about: the scene around
A's shapes, the place an object was moved from and to, the area of a recoloured shape. 0 is the
source, 1 the target; 0.5 is the half-way point, past which the output is nearer the target than
the source pixel for pixel: the line every test below draws.

Where a test asks only whether *some* shape was drawn, wherever it is (the image-only CFG mode,
whose samples may draw another training image of their scene), `shape_pixels` counts the pixels
that stand off the bare scene as the set's faintest shape does, against the area of its smallest
(`faintest_shape`).
"""

from __future__ import annotations

import torch

from .encoders import images_to_tensor
from .synthetic import Layout, render

HALF_WAY = 0.5  # nearer the target than the source: the test's line


def toward(output: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, how far `output` went from `source` toward `target`; all `(N, 3, H, W)`. NaN where
    source and target are the same picture (nothing to measure)."""
    direction = (target - source).flatten(1).double()
    moved = (output - source).flatten(1).double()
    length = direction.pow(2).sum(1)
    return torch.where(length > 1e-12, (moved * direction).sum(1) / length.clamp(min=1e-12), torch.nan).float()


def drawn(layout: Layout, resolution: int) -> torch.Tensor:
    """The layout drawn, `(3, H, W)` in [0, 1]."""
    return (images_to_tensor([render(layout, resolution)])[0] + 1) / 2


def scene_alone(layout: Layout, resolution: int) -> torch.Tensor:
    """The layout's scene with no shapes, `(3, H, W)` in [0, 1], drawn as the images are."""
    return drawn(Layout([], layout.scene), resolution)


def faintest_shape(layouts: list[Layout], resolution: int) -> tuple[float, int]:
    """What a picture must hold to count as showing a shape, from the set's own shapes: half the
    lowest contrast any of them has against its scene (the largest channel difference), and the
    area in pixels that the smallest of them covers at that contrast."""
    contrast, diffs = [], []
    for layout in layouts:
        bare = scene_alone(layout, resolution)
        for shape in layout.objects:
            diff = (drawn(Layout([shape], layout.scene), resolution) - bare).abs().amax(0)
            contrast.append(diff.max().item())
            diffs.append(diff)
    line = HALF_WAY * min(contrast)
    return line, min(int((diff > line).sum()) for diff in diffs)


def shape_pixels(output: torch.Tensor, scene: torch.Tensor, contrast: float) -> torch.Tensor:
    """Per image, how many pixels of `output` stand off its bare `scene` (both `(N, 3, H, W)`) by
    more than `contrast`, wherever they are. The picture's median difference is taken off first,
    so that a scene drawn a little off as a whole does not read as shapes everywhere."""
    diff = (output - scene).abs().amax(1).flatten(1)  # (N, H·W)
    return (diff - diff.median(1, keepdim=True).values > contrast).sum(1)


def swapped(a: Layout, b: Layout) -> Layout:
    """What a DINO swap should draw: A's shapes (its caption) on B's scene (its image)."""
    return Layout(a.objects, b.scene)


def layout_of(bucket, i: int) -> Layout | None:
    """Sample `i` of a `CachedBucket`: its recorded layout (the synthetic set records one), else None."""
    meta = bucket.meta[i] or {}
    return Layout.from_json(meta) if "objects" in meta and "scene" in meta else None


def drawn_all(layouts: list[Layout], resolution: int) -> torch.Tensor:
    """`drawn` of each layout, stacked: `(N, 3, H, W)` in [0, 1]."""
    return torch.stack([drawn(layout, resolution) for layout in layouts])
