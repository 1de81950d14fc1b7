"""llaca_optim: the LLaCA optimizer (arXiv 2410.10868), fused, exact, and a drop-in for AdamW.

    optimizer = llaca_optim.LLaCAAdamW(model.parameters(), lr=2e-5)   # was torch.optim.AdamW
    ...
    optimizer.end_task()                                              # weights <- EMA

The layers, top down: the optimizers (``optim/``: LLaCAAdamW, the LLaCA wrapper, the step
planner), the functional API (``functional.py``), the ops and their kernels (``ops/``), and the
math they all match (``reference.py``). See README.md and docs/ for the API, the backends and the build.
"""

from . import ops  # noqa: F401  (declares the torch.library ops, with their default kernels)
from . import functional, reference
from .ops.registry import BackendUnavailable, available_backends, backend_status
from .optim.adamw import LLaCAAdamW
from .optim.base import LLaCAAlphas
from .optim.llaca import LLaCA
from .presets import PRESETS

from ._version import __version__

__all__ = [
    "__version__",
    "LLaCAAdamW",
    "LLaCA",
    "LLaCAAlphas",
    "PRESETS",
    "BackendUnavailable",
    "available_backends",
    "backend_status",
    "functional",
    "reference",
]
