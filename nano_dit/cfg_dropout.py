"""Mutually exclusive classifier-free-guidance dropout.

Dual CFG at sampling needs four distinct things the model has learned: both conditions, neither,
text only and image only. Dropping text and image with independent Bernoulli draws mixes these up
(the validation plan's "CFG Dropout Fix": checkpoints trained that way are invalid), so every sample here is
given exactly one *mode*, drawn from a shuffled bag: over every block of ``bag_size`` consecutive
draws the counts are exact (70 / 10 / 10 / 10 of 100 by default), not just right on average.
"""

from __future__ import annotations

import enum
import math

import torch


class CFGMode(enum.IntEnum):
    """The four conditioning modes; the value is what `CFGDropout.sample_modes` returns."""

    BOTH = 0  # text and image kept
    NONE = 1  # both dropped (unconditional)
    TEXT_ONLY = 2  # image dropped
    IMAGE_ONLY = 3  # text dropped


class CFGDropout:
    """Draws one `CFGMode` per sample from a shuffled bag, seeded and resumable.

    Args:
        p_both, p_none, p_text_only, p_image_only: probabilities of the four modes; each ≥ 0,
            summing to 1, and each a whole number of draws out of `bag_size`.
        seed: seed of the sampler's own generator (independent of the global RNG).
        bag_size: length of the block over which the counts are exact.

    Example:
        >>> cfg = CFGDropout(seed=0)
        >>> drop_text, drop_image = cfg.sample(8)  # two (8,) bool tensors, never both from one bag slot
    """

    def __init__(
        self,
        p_both: float = 0.7,
        p_none: float = 0.1,
        p_text_only: float = 0.1,
        p_image_only: float = 0.1,
        seed: int = 0,
        bag_size: int = 100,
    ):
        probs = {"p_both": p_both, "p_none": p_none, "p_text_only": p_text_only, "p_image_only": p_image_only}
        if not isinstance(bag_size, int) or bag_size <= 0:
            raise ValueError(f"bag_size must be a positive integer, got {bag_size!r}")
        for name, p in probs.items():
            if not math.isfinite(p) or p < 0:
                raise ValueError(f"{name} must be a probability >= 0, got {p}")
        total = sum(probs.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"CFG mode probabilities must sum to 1, got {total:.6g} from {probs}")
        counts = []
        for name, p in probs.items():
            count = p * bag_size
            if abs(count - round(count)) > 1e-6:
                raise ValueError(
                    f"{name}={p} is not a whole number of draws out of bag_size={bag_size} "
                    f"({count:.4g}); choose probabilities in steps of 1/{bag_size} or another bag_size"
                )
            counts.append(round(count))

        self.counts = tuple(counts)  # per CFGMode, in its order
        self.bag_size = bag_size
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._bag = torch.empty(0, dtype=torch.long)
        self._position = 0
        self.num_drawn = 0

    @property
    def scheme(self) -> str:
        """A string that identifies the dropout scheme; checkpoints record it (resume refuses others).
        `scheme_counts` reads it back."""
        modes = ",".join(f"{m.name.lower()}={c}" for m, c in zip(CFGMode, self.counts))
        return f"exclusive-bag{self.bag_size}:{modes}"

    def sample_modes(self, n: int) -> torch.Tensor:
        """The next `n` modes, a (n,) int64 tensor of `CFGMode` values (on the CPU)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        chunks = []
        while n > 0:
            if self._position == len(self._bag):
                self._refill()
            take = min(n, len(self._bag) - self._position)
            chunks.append(self._bag[self._position : self._position + take])
            self._position += take
            self.num_drawn += take
            n -= take
        return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `n` samples' masks: `(drop_text, drop_image)`, two (n,) bool tensors."""
        modes = self.sample_modes(n)
        drop_text = (modes == CFGMode.NONE) | (modes == CFGMode.IMAGE_ONLY)
        drop_image = (modes == CFGMode.NONE) | (modes == CFGMode.TEXT_ONLY)
        return drop_text, drop_image

    def _refill(self) -> None:
        bag = torch.repeat_interleave(torch.arange(len(CFGMode)), torch.tensor(self.counts))  # (bag_size,)
        self._bag = bag[torch.randperm(self.bag_size, generator=self._generator)]
        self._position = 0

    # Resume: Accelerate's `register_for_checkpointing` saves and restores these.
    def state_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "seed": self.seed,
            "generator": self._generator.get_state(),
            "bag": self._bag.clone(),
            "position": self._position,
            "num_drawn": self.num_drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("scheme") != self.scheme:
            raise ValueError(
                f"the saved CFG-dropout scheme {state.get('scheme')!r} differs from this sampler's "
                f"{self.scheme!r}: a model trained with other conditioning modes does not learn the "
                "ones dual-CFG sampling relies on, so its state cannot be resumed here"
            )
        self.seed = state["seed"]
        self._generator.set_state(state["generator"])
        self._bag = state["bag"].clone()
        self._position = int(state["position"])
        self.num_drawn = int(state["num_drawn"])

    def __repr__(self) -> str:
        return f"CFGDropout({self.scheme}, seed={self.seed}, drawn={self.num_drawn})"


def scheme_counts(scheme: str) -> dict[str, int] | None:
    """Each mode's draws per bag in a recorded exclusive scheme (`CFGDropout.scheme`), e.g.
    {"both": 70, "none": 10, "text_only": 10, "image_only": 10}; None for any other scheme."""
    if not scheme.startswith("exclusive") or ":" not in scheme:
        return None
    return {mode: int(count) for mode, count in (part.split("=") for part in scheme.split(":", 1)[1].split(","))}
