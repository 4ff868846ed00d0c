"""Long-context benchmarks: RULER's and InfiniteBench's synthetic tasks generated locally at a length in tokens of
the model's tokenizer, their scoring rules, and `run_eval` over strategies x hosts x lengths x tasks.

    from apb_jax.evaluation import make_samples, run_eval
    result = run_eval(model, ["niah_single_1", "kv_retrieval"], [32768], ["full", "star", "apb"], [4], n=50)
"""

from apb_jax.evaluation.base import Sample
from apb_jax.evaluation.registry import TaskSpec, get_task, groups, make_samples, registry, resolve_tasks
from apb_jax.evaluation.scoring import METRICS, score


def run_eval(*args, **kwargs):
    """See `apb_jax.evaluation.runner.run_eval` (imported on first use: it starts jax)."""
    from apb_jax.evaluation.runner import run_eval as _run

    return _run(*args, **kwargs)


__all__ = [
    "METRICS",
    "Sample",
    "TaskSpec",
    "get_task",
    "groups",
    "make_samples",
    "registry",
    "resolve_tasks",
    "run_eval",
    "score",
]
