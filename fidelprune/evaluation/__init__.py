"""Evaluation: perplexity, zero-shot accuracy (lm-evaluation-harness), speed, reports."""

from .baseline import evaluate_location
from .perplexity import CORPORA, PerplexityResult, load_corpus, perplexity
from .report import plot_run, read_results, to_markdown, write_results
from .speed import SpeedResult, measure_speed, model_size
from .suite import EvalConfig, evaluate, evaluate_model
from .zeroshot import BUNDLED_TASKS, COMMONSENSE_7, TASKS, ZeroShotResult, load_tasks, zeroshot

__all__ = [
    "BUNDLED_TASKS", "COMMONSENSE_7", "CORPORA", "EvalConfig", "PerplexityResult", "SpeedResult", "TASKS",
    "ZeroShotResult", "evaluate", "evaluate_location", "evaluate_model", "load_corpus", "load_tasks", "measure_speed", "model_size",
    "perplexity", "plot_run", "read_results", "to_markdown", "write_results", "zeroshot",
]
