"""A deterministic synthetic image set in which each conditioning signal carries something only it can.

Each image holds one or two coloured shapes on a *scene*: a two-colour gradient in one of four
directions, lit by a soft light spot (or by none). The caption names the shapes and nothing else
("a small red circle on the left and a large blue square at the bottom right"); the scene goes
unmentioned, so only the image (its DINOv3 embedding) can say it. Each caption is drawn on two
different scenes, and each scene carries several captions, so:

- the text-only CFG mode has the shapes to learn, and can't know the scene;
- the image-only mode has the scene to learn (and, from the image, the shapes too);
- a DINO swap (A's caption, B's embedding) should draw A's shapes on B's scene, and the
  ground-truth layout (`<key>.json`) says exactly what that picture is: the validation plan's
  "adopt the composition / lighting of the swapped DINO source", measured;
- the text edits ("left" ↔ "right", colour and shape swaps) name attributes that occur throughout
  the set, and the edited layout can be drawn, so an edit's effect is measured where it should be.
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
# The scenes' colours: muted, so that every shape stands out on every scene. Never in a caption.
SCENE_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 235),
    "charcoal": (40, 40, 48),
    "slate": (110, 125, 140),
    "sky": (160, 200, 235),
    "sand": (220, 200, 160),
    "teal": (40, 110, 110),
    "rose": (225, 170, 175),
}
DIRECTIONS = ("top to bottom", "left to right", "top left to bottom right", "top right to bottom left")
# Where the light spot sits (x, y in [0, 1]); None: no spot.
SPOTS: dict[str, tuple[float, float] | None] = {
    "none": None,
    "top left": (0.2, 0.2),
    "top right": (0.8, 0.2),
    "bottom left": (0.2, 0.8),
    "bottom right": (0.8, 0.8),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.11, "large": 0.16}  # radius as a fraction of the side; fits in a grid cell (1/3)
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
    {w for name in (*COLORS, *SHAPES, *SIZES, *POSITIONS) for w in name.split()}
    | {"a", "and", "on", "the", "in", "at"}
)
CAPTIONS_PER_SCENE = 10  # a set of N images has N / 10 scenes; each caption is drawn on two of them
SCENES_PER_CAPTION = 2


@dataclass
class ShapeSpec:
    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) in [0, 1], image coordinates (y down)
    radius: float  # fraction of the image side


@dataclass(frozen=True)
class Scene:
    """What only the image shows: a gradient from `colors[0]` to `colors[1]` along `direction`,
    brightened by a soft light spot at `spot` (a `SPOTS` name)."""

    colors: tuple[str, str]
    direction: str
    spot: str

    def to_json(self) -> dict:
        return {"colors": list(self.colors), "direction": self.direction, "spot": self.spot}

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        return cls(tuple(data["colors"]), data["direction"], data["spot"])


@dataclass
class Layout:
    objects: list[ShapeSpec]
    scene: Scene

    @property
    def caption(self) -> str:
        """The shapes, and only the shapes: the scene is the image's to tell."""
        return " and ".join(f"a {o.size} {o.color} {o.shape} {_where(o.position)}" for o in self.objects)

    def to_json(self) -> dict:
        objects = [{**asdict(o), "center": list(o.center)} for o in self.objects]  # JSON has no tuples
        return {"caption": self.caption, "scene": self.scene.to_json(), "objects": objects}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        objects = [ShapeSpec(**{**o, "center": tuple(o["center"])}) for o in data["objects"]]
        return cls(objects, Scene.from_json(data["scene"]))


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def sample_objects(rng: np.random.Generator) -> list[ShapeSpec]:
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
    return objects


def sample_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """`n` distinct scenes; no two share both their colours, so each is told apart at a glance."""
    names = list(SCENE_COLORS)
    scenes: list[Scene] = []
    while len(scenes) < n:
        first, second = rng.choice(len(names), size=2, replace=False)
        colors = (names[first], names[second])
        if any(set(colors) == set(s.colors) for s in scenes):
            continue
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        spot = list(SPOTS)[int(rng.integers(len(SPOTS)))]
        scenes.append(Scene(colors, direction, spot))
    return scenes


def sample_layouts(num_images: int, seed: int = 0) -> list[Layout]:
    """The set's layouts, in order: ⌈N / 2⌉ distinct captions, each drawn on two scenes.

    The captions come in families of two: a layout and the same layout with one edit of
    `EDIT_KINDS` (an object mirrored, recoloured or of another kind), so that the validation's
    caption edits lead to captions the set holds, on other scenes. The first half of the
    captions are the families' first members, the second half their edits. Sample k < ⌈N / 2⌉
    holds caption k on scene k mod S; sample ⌈N / 2⌉ + k holds caption k again on another scene.
    Consecutive samples differ in caption and in scene (the DINO-swap pairs are (0, 1), (2, 3), ...).
    """
    rng = np.random.default_rng(seed)
    num_captions = -(-num_images // SCENES_PER_CAPTION)
    num_scenes = min(max(2, num_images // CAPTIONS_PER_SCENE), 2 * len(SCENE_COLORS))
    scenes = sample_scenes(rng, num_scenes)
    seen: set[str] = set()
    bases: list[list[ShapeSpec]] = []
    variants: list[list[ShapeSpec]] = []
    while len(bases) + len(variants) < num_captions:
        objects = sample_objects(rng)
        family = [objects]
        if len(bases) + len(variants) + 1 < num_captions:  # room for the pair (an odd count ends on a lone one)
            edited = edit_layout(Layout(objects, scenes[0]), EDIT_KINDS[len(variants) % len(EDIT_KINDS)])
            if edited is None:
                continue
            family.append(edited.objects)
        names = [Layout(o, scenes[0]).caption for o in family]
        if any(name in seen for name in names):  # a caption names one set of shapes
            continue
        seen.update(names)
        bases.append(family[0])
        variants += family[1:]
    captions = bases + variants
    first = [k % num_scenes for k in range(num_captions)]
    # the second scene: another one, spread evenly (an offset of about half the scenes)
    second = [(s + max(1, num_scenes // 2) + k // num_scenes) % num_scenes for k, s in enumerate(first)]
    second = [t if t != s else (t + 1) % num_scenes for s, t in zip(first, second)]
    layouts = [Layout(objects, scenes[s]) for objects, s in zip(captions, first)]
    layouts += [Layout(objects, scenes[s]) for objects, s in zip(captions, second)]
    return layouts[:num_images]


EDIT_KINDS = ("mirror left-right", "color", "mirror top-bottom", "shape")  # the caption edits


def edit_layout(layout: Layout, kind: str) -> Layout | None:
    """The layout with one attribute of one object changed, or None when `kind` does not apply."""
    cells = {o.position for o in layout.objects}
    for n, o in enumerate(layout.objects):
        changed = None
        if kind.startswith("mirror"):
            col, row = POSITIONS[o.position]
            col, row = (2 - col, row) if kind == "mirror left-right" else (col, 2 - row)
            position = next(name for name, cell in POSITIONS.items() if cell == (col, row))
            if position != o.position and position not in cells:
                changed = ShapeSpec(o.shape, o.color, o.size, position, ((col + 0.5) / 3, (row + 0.5) / 3), o.radius)
        elif kind == "color":
            taken = {x.color for x in layout.objects}
            color = next(c for c in COLORS if c not in taken)
            changed = ShapeSpec(o.shape, color, o.size, o.position, o.center, o.radius)
        elif kind == "shape":
            shape = SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)]
            changed = ShapeSpec(shape, o.color, o.size, o.position, o.center, o.radius)
        if changed is not None:
            return Layout(layout.objects[:n] + [changed] + layout.objects[n + 1 :], layout.scene)
    return None


def render(layout: Layout, resolution: int, supersample: int = 4) -> Image.Image:
    """Draw the layout as an RGB image, anti-aliased by drawing large and downsampling."""
    side = resolution * supersample
    image = render_scene(layout.scene, side)
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


def render_scene(scene: Scene, side: int) -> Image.Image:
    """The scene alone, `side` pixels square: the gradient, then the light spot."""
    start = np.array(SCENE_COLORS[scene.colors[0]], dtype=np.float32)
    end = np.array(SCENE_COLORS[scene.colors[1]], dtype=np.float32)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)  # (side, side) each, in [0, 1]
    t = {
        DIRECTIONS[0]: y,
        DIRECTIONS[1]: x,
        DIRECTIONS[2]: (x + y) / 2,
        DIRECTIONS[3]: (1 - x + y) / 2,
    }[scene.direction][..., None]  # (side, side, 1)
    pixels = (1 - t) * start + t * end  # (side, side, 3)
    spot = SPOTS[scene.spot]
    if spot is not None:  # a soft white light: half-way to white at its centre, fading over a third of the side
        glow = np.exp(-((x - spot[0]) ** 2 + (y - spot[1]) ** 2) / (2 * 0.15**2))[..., None]
        pixels = pixels + 0.6 * glow * (255 - pixels)
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8), "RGB")


def synthetic_samples(num_images: int = 100, resolution: int = 512, seed: int = 0, workers: int | None = None):
    """Yield `num_images` samples: dicts with key, image (PIL), caption and layout metadata.

    Deterministic for a seed: the same call gives the same pixels and captions on any machine, with
    any number of `workers`. Each caption is drawn on two scenes (`sample_layouts`); no two images
    are the same. Drawing the images (the slow part at 512²) is shared by `workers` processes
    (default: one per core, up to 16, from 128² up; below, where a process costs more than it
    saves, and with 1, they are drawn here).
    """
    layouts = sample_layouts(num_images, seed)
    with _renderer(workers if workers is not None or resolution >= 128 else 1, num_images) as draw:
        for index, (layout, image) in enumerate(zip(layouts, draw(layouts, resolution))):
            digest = hashlib.sha1(_identity(layout).encode()).hexdigest()[:8]
            yield {
                "key": f"synth_{index:05d}_{digest}",
                "image": image,
                "caption": layout.caption,
                "meta": layout.to_json(),
            }


def _identity(layout: Layout) -> str:
    """What makes a sample itself: its caption and its scene."""
    return f"{layout.caption} | {layout.scene}"


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
