"""fidelprune: prune the MLP neurons of a causal LM whose loss changes its predictions least.

    model, tokenizer, source = fidelprune.load_model()            # packaged SmolLM2-135M-Instruct
    pruned, report = fidelprune.prune(model, tokenizer, method="hfprune", ratio=0.2)
    fidelprune.save(pruned, tokenizer, report, "pruned/")
"""

__version__ = "0.1.0"

from .adapters import UnsupportedModelError, supported_families  # noqa: E402
from .allocation import AllocationError, plan_width  # noqa: E402
from .calibration import CalibrationError, sample_windows  # noqa: E402
from .checkpoint import OutputExistsError, load_scores, read_manifest  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .methods import METHODS  # noqa: E402
from .models import ModelLoadError, load_model  # noqa: E402
from .pruning import PruneReport, prune, save  # noqa: E402
from .recovery import RecoveryConfig, recover, save_recovered  # noqa: E402
from .scoring import FORMS, ScoringError  # noqa: E402

__all__ = [
    "AllocationError", "CalibrationError", "FORMS", "METHODS", "ModelLoadError", "OutputExistsError", "PruneReport",
    "ScoringError", "UnsupportedModelError", "load_model", "load_scores", "plan_width", "prune", "read_manifest",
    "sample_windows", "save", "supported_families",
    "RecoveryConfig", "recover", "save_recovered",
    "evaluate",
]
