"""The named (scale, base_weight) pairs of the balance weight: the published code's and a port's."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """A named (scale, base_weight) pair."""

    scale: float
    base_weight: float


#: ``coin``: the authors' released code; ``continual-next``: the Continual-NExT benchmark's port.
PRESETS: dict[str, Preset] = {
    "coin": Preset(scale=2.0, base_weight=0.01),
    "continual-next": Preset(scale=0.01, base_weight=0.001),
}
