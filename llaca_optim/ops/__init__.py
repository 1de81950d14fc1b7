"""The op layer: what a step's kernels are and how a call reaches one.

* ``roles.py``: the per-tensor roles of the ops, declared once (and the Bucket of one call);
* ``library.py``: the ``torch.library`` schemas built from them, and the namespaces that carry them;
* ``reference.py``: the reference kernels, registered as the ops' default kernels;
* ``native.py``: loading the C++/CUDA extension, whose kernels register for CPU and CUDA;
* ``triton/``: the Triton kernels, their launcher and their namespace;
* ``registry.py``: backends (a namespace plus what it takes), their status and the choice of one.

The public face of this layer is ``llaca_optim.functional`` and ``torch.ops.llaca_optim``.
"""

from . import library, reference_kernels  # noqa: F401  (the schemas, then their default kernels)
