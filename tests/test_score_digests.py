"""Every method's scores on a fixed calibration of the packaged SmolLM2 are bitwise what they were when the
digests in digests/smollm2-scores.json were recorded (before the architecture redesign of issue 20; the two
hfprune cases again, on purpose, when the entropy gradient moved to fp64 for accuracy, issue 25): a refactor may
move code, never change a score, a kept neuron or a pruned weight.

Re-record only on purpose (a deliberate change of results, or a new torch): `python tests/test_score_digests.py`.
Bitwise float results hold for one torch build on one kind of CPU; the test skips, saying so, on another torch.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

DIGESTS = Path(__file__).parent / "digests" / "smollm2-scores.json"
SAMPLES, SEQ_LEN, SEED = 4, 64, 0
# (label, prune() keywords): every method, the LLM-Pruner second-order form, and a method run with reconstruction
# (which also pins surgery and the refit, through the pruned weights' digest).
CASES = {
    "hfprune": dict(method="hfprune"),
    "sdmprune": dict(method="sdmprune"),
    "llm-pruner": dict(method="llm-pruner"),
    "llm-pruner-element2": dict(method="llm-pruner", form="element2"),
    "wanda-sp": dict(method="wanda-sp"),
    "flap": dict(method="flap"),
    "activation": dict(method="minitron"),  # recorded under the method's old name
    "activation-l2": dict(method="minitron", aggregation="l2"),
    "magnitude": dict(method="magnitude"),
    "random": dict(method="random"),
    "hfprune-sequential": dict(method="hfprune", reconstruct="sequential"),
    "flap-parallel-global": dict(method="flap", reconstruct="parallel", allocation="global"),
}


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors, key=str):
        t = tensors[name].detach().cpu().contiguous()
        h.update(str(name).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute() -> dict:
    import fidelprune
    from fidelprune.calibration import sample_windows

    model, tokenizer, _ = fidelprune.load_model("smollm2", dtype="float32", device="cpu")
    windows, _ = sample_windows(tokenizer, "c4", SAMPLES, SEQ_LEN, SEED)
    out = {"torch": torch.__version__, "calibration_ids": _digest({"ids": windows}), "cases": {}}
    for label, kwargs in CASES.items():
        kwargs = {"ratio": 0.2, "calibration_ids": windows, "progress": False, **kwargs}
        method = kwargs.pop("method")
        pruned, report = fidelprune.prune(model, tokenizer, method, **kwargs)
        out["cases"][label] = {
            "scores": _digest(report.scores),
            "extra_scores": _digest(report.extra_scores),
            "kept": _digest({int(i): torch.tensor(k) for i, k in report.manifest["kept_neurons"].items()}),
            "weights": _digest(pruned.state_dict()),
        }
        del pruned
    return out


def test_scores_kept_neurons_and_weights_are_bitwise_unchanged():
    recorded = json.loads(DIGESTS.read_text())
    if recorded["torch"] != torch.__version__:
        pytest.skip(f"digests were recorded with torch {recorded['torch']}, this is {torch.__version__}")
    now = compute()
    assert now["calibration_ids"] == recorded["calibration_ids"]
    changed = {label: [k for k in digests if now["cases"][label][k] != digests[k]]
               for label, digests in recorded["cases"].items()}
    assert not any(changed.values()), f"results changed: {changed}"


if __name__ == "__main__":
    DIGESTS.parent.mkdir(exist_ok=True)
    DIGESTS.write_text(json.dumps(compute(), indent=2) + "\n")
    print(f"wrote {DIGESTS}", file=sys.stderr)
