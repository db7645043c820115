__version__ = "0.2.0"  # the one version source (pyproject.toml reads it); pruning.json records it
