"""A deterministic synthetic image set whose captions say everything in the picture.

Each image holds one or two coloured shapes on a plain or gradient background; its caption states
every object's size, colour, shape and position *and* the background ("a small red circle on the
left and a large blue square at the bottom right, on a gradient background from white to light
blue"), so the text alone determines the image and the text-only CFG mode has something to learn.

The set is built for the validation plan's validation tests:
- text manipulation: the edits ("left" ↔ "right", colour and shape swaps) name attributes that
  occur throughout the set, and the ground-truth layout (`<key>.json`) says where each object is,
  so an edit's effect can be measured;
- DINO swap: images differ in composition (position, count, size, background), so swapping the
  image embedding of a pair should visibly move the output.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import multiprocessing
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

# One place for the vocabulary: the captions, the stand-in tokenizer and the caption edits use it.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "light blue": (170, 205, 240),
    "beige": (225, 210, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.08, "large": 0.15}  # radius as a fraction of the side; fits in a grid cell (1/3)
# 3 x 3 grid of positions: name -> (column, row), each in {0, 1, 2}.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
WORDS = sorted(
    {w for name in (*COLORS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS) for w in name.split()}
    | {"a", "and", "on", "the", "in", "at", "plain", "gradient", "background", "from", "to", ","}
)


@dataclass
class ShapeSpec:
    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) in [0, 1], image coordinates (y down)
    radius: float  # fraction of the image side


@dataclass
class Layout:
    objects: list[ShapeSpec]
    background: list[str]  # one colour name (plain) or two (vertical gradient, top to bottom)

    @property
    def caption(self) -> str:
        things = " and ".join(f"a {o.size} {o.color} {o.shape} {_where(o.position)}" for o in self.objects)
        if len(self.background) == 1:
            return f"{things}, on a plain {self.background[0]} background"
        return f"{things}, on a gradient background from {self.background[0]} to {self.background[1]}"

    def to_json(self) -> dict:
        objects = [{**asdict(o), "center": list(o.center)} for o in self.objects]  # JSON has no tuples
        return {"caption": self.caption, "background": self.background, "objects": objects}


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def sample_layout(rng: np.random.Generator) -> Layout:
    """One or two objects in distinct grid cells, each with its own shape, colour and size."""
    count = int(rng.integers(1, 3))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    colors = rng.choice(len(COLORS), size=count, replace=False)
    objects = []
    for cell, color in zip(cells, colors):
        position = list(POSITIONS)[cell]
        col, row = POSITIONS[position]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        objects.append(
            ShapeSpec(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                color=list(COLORS)[color],
                size=size,
                position=position,
                center=((col + 0.5) / 3, (row + 0.5) / 3),
                radius=SIZES[size],
            )
        )
    names = list(BACKGROUNDS)
    if rng.random() < 0.5:
        background = [names[int(rng.integers(len(names)))]]
    else:
        first, second = rng.choice(len(names), size=2, replace=False)
        background = [names[first], names[second]]
    return Layout(objects=objects, background=background)


def render(layout: Layout, resolution: int, supersample: int = 4) -> Image.Image:
    """Draw the layout as an RGB image, anti-aliased by drawing large and downsampling."""
    side = resolution * supersample
    image = _background(layout.background, side)
    draw = ImageDraw.Draw(image)
    for o in layout.objects:
        cx, cy, r = o.center[0] * side, o.center[1] * side, o.radius * side
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            half = r * 0.886  # same area as the circle of radius r
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:  # an upward triangle inscribed in the circle of radius r
            draw.polygon([(cx, cy - r), (cx - 0.866 * r, cy + r / 2), (cx + 0.866 * r, cy + r / 2)], fill=fill)
    return image.resize((resolution, resolution), Image.LANCZOS)


def _background(names: list[str], side: int) -> Image.Image:
    top = np.array(BACKGROUNDS[names[0]], dtype=np.float32)
    bottom = np.array(BACKGROUNDS[names[-1]], dtype=np.float32)
    t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]  # (side, 1, 1)
    rows = (1 - t) * top + t * bottom  # (side, 1, 3)
    return Image.fromarray(np.broadcast_to(rows, (side, side, 3)).round().astype(np.uint8), "RGB")


def synthetic_samples(num_images: int = 100, resolution: int = 512, seed: int = 0, workers: int | None = None):
    """Yield `num_images` samples: dicts with key, image (PIL), caption and layout metadata.

    Deterministic for a seed: the same call gives the same pixels and captions on any machine, with
    any number of `workers`. No two samples share a caption. The layouts are drawn here, in order;
    drawing the images (the slow part at 512²) is shared by `workers` processes (default: one per
    core, up to 16, from 128² up; below, where a process costs more than it saves, and with 1, they
    are drawn here).
    """
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    layouts = []
    while len(layouts) < num_images:
        layout = sample_layout(rng)
        if layout.caption in seen:  # a repeated caption would make two targets for one text
            continue
        seen.add(layout.caption)
        layouts.append(layout)
    with _renderer(workers if workers is not None or resolution >= 128 else 1, num_images) as draw:
        for index, (layout, image) in enumerate(zip(layouts, draw(layouts, resolution))):
            digest = hashlib.sha1(layout.caption.encode()).hexdigest()[:8]
            yield {
                "key": f"synth_{index:05d}_{digest}",
                "image": image,
                "caption": layout.caption,
                "meta": layout.to_json(),
            }


@contextlib.contextmanager
def _renderer(workers: int | None, num_images: int):
    """`draw(layouts, resolution)`: the images, in order; from a pool of forked processes when
    there is more than one worker (fork: the workers need nothing but this module's functions,
    already in memory), else drawn here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers or min(cores, 16), num_images)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield lambda layouts, resolution: (render(layout, resolution) for layout in layouts)
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield lambda layouts, resolution: pool.map(
            render, layouts, itertools.repeat(resolution), chunksize=max(1, len(layouts) // (4 * workers))
        )
