"""The optimizers: LLaCAAdamW (adamw.py), the LLaCA wrapper (llaca.py), what both share
(base.py), the step planner (plan.py), pending blends (deferred.py), sharded parameters
(sharded.py), bad-input checks (validation.py) and the wrapper's inner state check
(inner_check.py). docs/architecture.md traces a step through them."""
