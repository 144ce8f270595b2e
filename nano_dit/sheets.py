"""Contact sheets: a grid of images with their captions, for looking rather than reading."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """An image `(3, H, W)` in [0, 1] as an 8-bit PIL image (rounded, clamped)."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


@dataclass
class Sheet:
    """A contact sheet to draw: images `(3, H, W)` in [0, 1], a caption each, `columns` a row,
    each scaled to `cell` pixels."""

    cells: list[torch.Tensor]
    captions: list[str]
    columns: int = 4
    cell: int = 160

    def render(self) -> Image.Image:
        return contact_sheet([to_pil(c) for c in self.cells], self.captions, columns=self.columns, cell=self.cell)


def contact_sheet(images: list[Image.Image], captions: list[str], columns: int = 4, cell: int = 192) -> Image.Image:
    """Images scaled to `cell` pixels (nearest neighbour: small images stay crisp), captions below."""
    font = ImageFont.load_default()
    chars = max(12, cell // 6)  # the default bitmap font is about 6 px wide
    wrapped = [textwrap.wrap(c, chars)[:6] for c in captions]
    text_height = 11 * max((len(w) for w in wrapped), default=0) + 6
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        scaled = image.convert("RGB").resize((cell, cell * image.height // image.width), Image.Resampling.NEAREST)
        sheet.paste(scaled, (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 3, y + cell + 3 + 11 * j), line, fill="black", font=font)
    return sheet
