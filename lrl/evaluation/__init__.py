"""Evaluation: the accuracy–TPF (Pareto) sweep and its artefacts."""

from lrl.evaluation.pareto import ParetoPoint, ParetoResult, run_pareto_sweep, write_pareto

__all__ = ["ParetoPoint", "ParetoResult", "run_pareto_sweep", "write_pareto"]
