"""Capacity planning: a run's per-rank memory, step time and target shapes, computed before it runs.

`planner.plan_run` reads a run config as training does and returns a typed `Plan`; `memory`,
`activations` and `flops` hold the arithmetic (each module states its formulas), `target` turns a
parameter budget into an engine-friendly L0 target shape, `report` formats a plan, `cli` is `drprune plan`.
"""
