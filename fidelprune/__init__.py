"""fidelprune: prune the MLP neurons of a causal LM whose loss changes its predictions least.

    model, tokenizer, source = fidelprune.load_model()            # packaged SmolLM2-135M-Instruct
    pruned, report = fidelprune.prune(model, tokenizer, method="hfprune", ratio=0.2)
    fidelprune.save(pruned, tokenizer, report, "pruned/")
    fidelprune.export("pruned/", fidelprune.ExportConfig(to="gguf", outtype="q8_0"))   # llama.cpp; or to="vllm"
    fidelprune.prune_location("smollm2", fidelprune.PruneConfig(), "pruned/")   # `fidelprune prune`: load, prune, save

The data flow and which module owns which step: docs/architecture.md.
"""

from ._version import __version__
from .adapters import AdaptedModel, UnsupportedModelError, adapt, supported_families
from .allocation import AllocationConfig, AllocationError, plan_width
from .calibration import CalibrationConfig, CalibrationError, sample_windows
from .deploy import ExportConfig, ExportError, export
from .errors import ConfigError, FidelpruneError
from .evaluation import EvalConfig, evaluate
from .layout import read_manifest
from .methods import METHODS, MethodConfig, get_method, register_method
from .models import ModelLoadError, load_model
from .outputs import OutputExistsError, load_scores
from .pruning import PruneReport, PruneRun, prune, prune_location, save
from .reconstruction import ReconstructionConfig
from .recovery import RecoveryConfig, recover, save_recovered
from .scoring import FORMS, ScoringError
from .settings import PruneConfig

__all__ = [
    "__version__",
    "AdaptedModel", "AllocationConfig", "AllocationError", "CalibrationConfig", "CalibrationError", "FORMS",
    "METHODS", "MethodConfig", "ModelLoadError", "OutputExistsError", "PruneConfig", "PruneReport",
    "ReconstructionConfig", "ScoringError", "UnsupportedModelError", "adapt", "get_method", "load_model",
    "load_scores", "plan_width", "prune", "prune_location", "PruneRun", "read_manifest", "register_method", "sample_windows", "save",
    "supported_families",
    "RecoveryConfig", "recover", "save_recovered",
    "EvalConfig", "evaluate",
    "ExportConfig", "ExportError", "export",
    "ConfigError", "FidelpruneError",
]
