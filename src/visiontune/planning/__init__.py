"""Deciding before training: `plan_run` (plan.py) resolves `--strategy auto` (the
advisor's rule on measured data, advice.py), `--batch-size auto` and `--time-budget` (the
planner, budget.py, on the costs measured here, costs.py) once into a `RunPlan`, whose
config `train_run` takes; training refuses anything left unresolved. Below the tools
(selection/, the API), which all plan through it."""
