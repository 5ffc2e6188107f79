"""Whole cohorts on a Ray cluster: one engine per worker actor, volumes streamed, a resumable manifest.

:func:`run_cohort` is what ``ptqseg segment-batch`` calls. Ray is imported only when a cohort runs.
"""
from .inputs import CohortItem, collect_inputs
from .manifest import Manifest, model_fingerprint
from .runner import CohortSummary, run_cohort

__all__ = ["CohortItem", "CohortSummary", "Manifest", "collect_inputs", "model_fingerprint", "run_cohort"]
