"""fidelprune's lm-evaluation-harness task definitions: lm-eval's own YAMLs with the hub dataset swapped for the
bundled local files (see loaders.py). Point a TaskManager at TASKS_DIR with include_defaults=False."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
