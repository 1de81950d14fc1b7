"""llaca_optim: the LLaCA optimizer (arXiv 2410.10868), fused, exact, and a drop-in for AdamW.

    optimizer = llaca_optim.LLaCAAdamW(model.parameters(), lr=2e-5)   # was torch.optim.AdamW
    ...
    optimizer.end_task()                                              # weights <- EMA

See README.md for the API, the backends and how the native kernels are built.
"""

from . import _ops  # noqa: F401  (declares the torch.library ops before any backend registers)
from . import reference
from ._core import LLaCAAlphas
from .adamw import LLaCAAdamW
from .backends import BackendUnavailable, available_backends, backend_status
from .reference import PRESETS
from .wrapper import LLaCA

__version__ = "0.1.0"

__all__ = [
    "LLaCAAdamW",
    "LLaCA",
    "LLaCAAlphas",
    "PRESETS",
    "BackendUnavailable",
    "available_backends",
    "backend_status",
    "reference",
]
