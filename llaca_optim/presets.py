"""The named settings of the balance weight (scale, base_weight and norms): the published code's,
a port's, and a size-invariant one calibrated to the published one at the recipe's tensor size."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NORMS", "PRESETS", "Preset"]


NORMS = ("sum", "mean")


@dataclass(frozen=True)
class Preset:
    """A setting of the balance weight ``alpha = scale * (1 + b) / (a * c)``, ``base_weight``
    when it is out of (0, 1). ``norms`` says what a, b and c are: ``"sum"``, the L1 sums over the
    tensor (the published update), or ``"mean"``, the L1 means (the sums over the tensor's
    element count), whose regime does not depend on the tensor's size (docs/spec.md section 2)."""

    scale: float
    base_weight: float
    norms: str = "sum"
    # Set: the EMA's time constant in steps, the level the balance weight is calibrated to
    # (``base_weight`` is then 1 / horizon and ``scale`` unused; NOTE [horizon] in
    # optim/sharded.py).
    horizon: float | None = None

    @property
    def mean_norms(self) -> bool:
        return self.norms == "mean"


#: ``coin``: the authors' released code; ``continual-next``: the Continual-NExT benchmark's port;
#: ``coin-mean``: the L1 means, with the scale that gives a rank-128 LoRA factor of a 4096-wide
#: layer (the published recipe's tensors) coin's median alpha there, and the same regime at
#: every other size (docs/coin-recipe.md; benchmarks/results/continual/alpha-size/).
PRESETS: dict[str, Preset] = {
    "coin": Preset(scale=2.0, base_weight=0.01),
    "continual-next": Preset(scale=0.01, base_weight=0.001),
    "coin-mean": Preset(scale=1e-9, base_weight=0.01, norms="mean"),
}
