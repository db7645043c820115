"""Deprecated: fidelprune 0.2 split this module into outputs.py (writing outputs) and layout.py (the on-disk format).
Its names are still found here, with a DeprecationWarning saying where they went."""

from .utils import moved_names

__getattr__ = moved_names(__name__, {
    "save_tokenizer": "fidelprune.outputs",
    "OutputExistsError": "fidelprune.outputs",
    "overlaps": "fidelprune.outputs",
    "check_output_dir": "fidelprune.outputs",
    "temporary_sibling": "fidelprune.outputs",
    "remove_stale_siblings": "fidelprune.outputs",
    "atomic_directory_write": "fidelprune.outputs",
    "check_output_file": "fidelprune.outputs",
    "atomic_file_write": "fidelprune.outputs",
    "save_scores": "fidelprune.outputs",
    "ScoresError": "fidelprune.outputs",
    "score_shapes": "fidelprune.outputs",
    "check_scores_fit": "fidelprune.outputs",
    "load_scores": "fidelprune.outputs",
    "save_model": "fidelprune.outputs",
    "save_pruned": "fidelprune.outputs",
    "PORTABLE_TOKENIZER_CLASS": "fidelprune.outputs",
    "read_manifest": "fidelprune.layout",
    "ManifestError": "fidelprune.layout",
    "MANIFEST": "fidelprune.layout",
    "SCORES_FILE": "fidelprune.layout",
    "CALIBRATION_FILE": "fidelprune.layout",
    "SIDE_DIR": "fidelprune.layout",
    "side_file": "fidelprune.layout",
})
