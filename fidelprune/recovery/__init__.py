"""Recovery fine-tuning of a pruned model (docs/methods.md, "Recovery"; docs/recovery.md).

    recovered, report = fidelprune.recover("pruned/", data="alpaca", mode="lora", loss="kd")
    fidelprune.recovery.save_recovered(recovered, tokenizer, report, "recovered/")
"""

from ..layout import RECOVERY_FILE
from .data import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, IGNORE, Packed, build_data, pack, render_alpaca
from .save import save_recovered
from .train import RecoveryConfig, RecoveryReport, check_packing, recover

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_INPUT", "IGNORE", "Packed", "RECOVERY_FILE", "RecoveryConfig", "RecoveryReport",
    "build_data", "check_packing", "pack", "recover", "render_alpaca", "save_recovered",
]
