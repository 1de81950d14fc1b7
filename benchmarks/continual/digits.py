"""Task family (b): permuted digits, the classic domain-incremental benchmark on real data.

scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package, nothing downloaded);
task k sees them through its own fixed permutation of the 64 pixels; a small MLP learns the tasks
one after another. The data, model and training loop are the main job's (llaca_optim.demo), so the
demo's numbers (docs/continual.md) and this suite measure the same thing; here over several seeds
and methods.
"""

from __future__ import annotations

import argparse

from llaca_optim import demo


def run(method_name: str, make_optimizer, seed: int, tasks: int, steps: int, width: int,
        progress) -> demo.Result:
    args = argparse.Namespace(seed=seed, steps=steps, batch=64, width=width)
    data = demo.load_tasks(tasks, seed)
    return demo.run_method(method_name, make_optimizer, data, args, progress)
