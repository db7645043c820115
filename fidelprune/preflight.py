"""Checks that need only the arguments, config.json and file headers, run before any weight is loaded.

A model's shapes come from its config alone: `shape_model` builds it on the meta device (no memory, no weights),
so the width plan, the method's and the allocation's requirements and a scores file's fit are decided by the
same code the real run uses, in seconds, whatever the model's size.
"""

from __future__ import annotations

from pathlib import Path

from .adapters import AdaptedModel
from .allocation import WidthPlan
from .calibration import CalibrationError, check_source, sample_windows
from .errors import ConfigError
from .models import ModelLocation, model_config, shape_model
from .outputs import check_scores_fit, score_shapes
from .reconstruction import reconstruction_windows
from .settings import PruneConfig, check_width_plan


def check_prune(where: ModelLocation, config: PruneConfig, scores: str | Path | None = None,
                trust_remote_code: bool = False) -> tuple[AdaptedModel, WidthPlan]:
    """Everything `prune` will require of this model and config, decided before loading it: the family, the
    width plan (ratio or keep, round-to, protected layers, FLAP's bias, dropped layers and heads), the window
    length against the model's positions, and a scores file's layers and widths. Returns the model's shapes (on
    the meta device) for the memory planner, and the width plan."""
    check_source(config.calibration.source)
    if config.reconstruction.calibration is not None:
        check_source(config.reconstruction.calibration)
    model_cfg = model_config(where, trust_remote_code)
    shapes = shape_model(model_cfg)
    plan = check_width_plan(shapes, config, scores_given=scores is not None)
    _check_refit_tokens(shapes, config)
    alloc = config.allocation
    if alloc.kind == "search" and alloc.search_samples > config.calibration.samples:
        raise ConfigError(f"--search-samples {alloc.search_samples} is more than the {config.calibration.samples} "
                          f"calibration windows; choose --search-samples {config.calibration.samples} or less, or more --samples")
    max_positions = getattr(model_cfg, "max_position_embeddings", None)
    if config.draws_windows(scores is not None) and max_positions and config.calibration.seq_len > max_positions:
        raise CalibrationError(f"--seq-len {config.calibration.seq_len} exceeds the model's {max_positions} positions; "
                               f"choose --seq-len {max_positions} or less")
    if scores is not None:
        check_scores_fit(score_shapes(scores), shapes.widths(), str(scores))
    return shapes, plan


def _check_refit_tokens(shapes: AdaptedModel, config: PruneConfig) -> None:
    """The refit solves for each MLP's I neurons (and an intercept) from the calibration tokens: with no more tokens
    than that it reproduces them exactly, a layer error of 0 that says nothing, and the refit weights are noise."""
    recon, calib = config.reconstruction, config.calibration
    if recon.mode == "none":
        return
    _, samples, _ = recon.own_draw(calib)
    width, tokens = max(shapes.widths()), samples * calib.seq_len
    if tokens <= width + 1:
        flag = "--reconstruct-samples" if recon.samples else "--samples"
        raise ConfigError(f"--reconstruct {recon.mode} fits each MLP's {width} neurons on {samples} x {calib.seq_len} = "
                          f"{tokens} calibration tokens, too few to determine the fit (it needs more than {width + 1}); "
                          f"raise {flag} or --seq-len, or pass --reconstruct none")


def check_calibration(tokenizer, config: PruneConfig, vocab: int, scores_given: bool = False) -> None:
    """Draw the windows once with the model's tokenizer, so that a source with too little text for
    samples x seq_len (or a file that cannot be read), or a tokenizer whose ids the model's `vocab` embedding rows
    do not hold, fails before the weights load. The run draws them again from the same seed: the same windows, for
    a few seconds of tokenization."""
    calib, recon = config.calibration, config.reconstruction
    drawn = []
    if config.draws_windows(scores_given):
        drawn.append(sample_windows(tokenizer, calib.source, calib.samples, calib.seq_len, calib.seed, calib.sampling)[0])
    if recon.mode != "none" and recon.separate:
        source, samples, seed = recon.own_draw(calib)
        drawn.append(reconstruction_windows(source, None, tokenizer, samples, calib.seq_len, seed, calib.sampling)[0])
    highest = max((int(ids.max()) for ids in drawn), default=-1)
    if highest >= vocab:
        raise CalibrationError(f"the tokenizer gives token id {highest}, and the model's embedding has {vocab} rows: "
                               f"the tokenizer belongs to another model; use the model's own tokenizer files")
