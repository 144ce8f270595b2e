"""The caption edits of the text-manipulation test: rule-based, and drawn where the layout is known.

On the synthetic set (captions made from a recorded layout) an edit changes the layout, mirrored
left-right or top-bottom, another colour or another shape, and its caption is the edited layout's
own, so the picture the edit asks for is drawn too. Other captions get word swaps ("left" ↔
"right", "sitting" ↔ "standing", colours) and no picture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from PIL import Image

from .feature_cache import CachedBucket
from .synthetic import EDIT_KINDS, Layout, edit_layout, render


@dataclass
class Edit:
    """A caption edit of sample `index`; `target` is the edited layout rendered, when known."""

    index: int
    kind: str
    caption: str
    edited: str
    target: Image.Image | None = field(default=None, repr=False)


WORD_SWAPS = [("left", "right"), ("top", "bottom"), ("sitting", "standing"), ("red", "blue"), ("green", "purple")]


def caption_edits(bucket: CachedBucket, n: int = 5) -> list[Edit]:
    """`n` rule-based edits of distinct samples, cycling through the kinds of `EDIT_KINDS`.

    With a synthetic layout (`meta["objects"]`), the edit is made to the layout (left ↔ right,
    top ↔ bottom, another colour, another shape) and the caption is the layout's own, so the
    edited image is known. Other captions get word swaps ("left" ↔ "right", "sitting" ↔
    "standing", colours) and no target. Edits whose caption the set holds (on its other
    samples) come first: an overfit model is asked to recombine what it learned, the caption of
    one sample with the image of another, as the DINO swap asks of the embedding; an edit to a
    caption it never saw asks for a generalisation that 100 images cannot be expected to teach.
    """
    known = set(bucket.captions)
    edits, used = [], set()
    for in_set in (True, False):
        for attempt in range(4 * n * len(EDIT_KINDS)):  # a kind that fits no sample is skipped
            if len(edits) == n:
                break
            kind = EDIT_KINDS[attempt % len(EDIT_KINDS)]
            for i in (j for j in range(len(bucket)) if j not in used):
                edit = _edit_sample(bucket, i, kind)
                if edit is not None and (edit.edited in known) == in_set:
                    edits.append(edit)
                    used.add(i)
                    break
    return edits


def _edit_sample(bucket: CachedBucket, i: int, kind: str) -> Edit | None:
    caption, meta = bucket.captions[i], bucket.meta[i] or {}
    if "objects" in meta:
        layout = Layout.from_json(meta)
        edited = edit_layout(layout, kind)
        if edited is None:
            return None
        return Edit(i, kind, caption, edited.caption, render(edited, bucket.bucket[0]))
    for a, b in WORD_SWAPS:
        for old, new in ((a, b), (b, a)):
            if re.search(rf"\b{old}\b", caption):
                return Edit(i, f"{old} -> {new}", caption, re.sub(rf"\b{old}\b", new, caption))
    return None
