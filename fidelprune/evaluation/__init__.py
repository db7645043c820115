"""Evaluation: perplexity, zero-shot accuracy (lm-evaluation-harness), speed, reports."""

from .perplexity import CORPORA, PerplexityResult, load_corpus, perplexity

__all__ = ["CORPORA", "PerplexityResult", "load_corpus", "perplexity"]
