"""Every method's scores on a fixed calibration of the packaged SmolLM2 are bitwise what they were when the
digests in digests/smollm2-scores.json were recorded (before the architecture redesign of issue 20; the two
hfprune cases again, on purpose, when the entropy gradient moved to fp64 for accuracy, issue 25): a refactor may
move code, never change a score, a kept neuron or a pruned weight.

Re-record only on purpose (a deliberate change of results, or a new torch): `python tests/test_score_digests.py`.
Bitwise float results hold for one torch build on one kind of CPU (its kernels differ by instruction set and
vendor), so the file keeps one record per (torch, CPU) and the test checks against this machine's; on a machine
with no record it skips, saying so. A new machine's record must be made from the code before a change (a clean
checkout of the previous commit: `PYTHONPATH=. python tests/test_score_digests.py` there), then the change is
checked against it.
"""

from __future__ import annotations

import hashlib
import json
import platform
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


def cpu_kind() -> str:
    """What decides which float kernels torch runs here: the architecture, the vector extension torch uses, the CPU."""
    model = "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {model}"


def records() -> list[dict]:
    data = json.loads(DIGESTS.read_text())
    return data["records"] if "records" in data else [{**data, "cpu": None}]  # the first file had one record, CPU unrecorded


def compute() -> dict:
    import fidelprune
    from fidelprune.calibration import sample_windows

    model, tokenizer, _ = fidelprune.load_model("smollm2", dtype="float32", device="cpu")
    # The windows the digests were recorded on: fidelprune's first sampling (the default is now the seeds' one
    # window per document, tests/test_calibration.py), so that these keep pinning the methods across that change.
    windows, _ = sample_windows(tokenizer, "c4", SAMPLES, SEQ_LEN, SEED, sampling="spans")
    out = {"torch": torch.__version__, "cpu": cpu_kind(), "calibration_ids": _digest({"ids": windows}), "cases": {}}
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
    here = [r for r in records() if r["torch"] == torch.__version__ and r["cpu"] == cpu_kind()]
    if not here:
        pytest.skip(f"no digests recorded for torch {torch.__version__} on {cpu_kind()} (see this file's docstring)")
    recorded, now = here[0], compute()
    assert now["calibration_ids"] == recorded["calibration_ids"]
    changed = {label: [k for k in digests if now["cases"][label][k] != digests[k]]
               for label, digests in recorded["cases"].items()}
    assert not any(changed.values()), f"results changed: {changed}"


if __name__ == "__main__":
    DIGESTS.parent.mkdir(exist_ok=True)
    now = compute()
    kept = [r for r in (records() if DIGESTS.exists() else []) if (r["torch"], r["cpu"]) != (now["torch"], now["cpu"])]
    DIGESTS.write_text(json.dumps({"records": [*kept, now]}, indent=2) + "\n")
    print(f"wrote {DIGESTS} (torch {now['torch']} on {now['cpu']})", file=sys.stderr)
