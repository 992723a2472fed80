"""Memory plan of an RL run (issue 28): per-rank peak by component and phase, from the config alone.

`build_plan` computes it, `format_plan` prints it, `lrl.plan.command` is ``lrl plan`` and the preflight of
``lrl fit``, and `lrl.plan.measure` measures peaks to check it.
"""

from lrl.plan.plan import MemoryPlan, build_plan
from lrl.plan.report import format_plan

__all__ = ["MemoryPlan", "build_plan", "format_plan"]
