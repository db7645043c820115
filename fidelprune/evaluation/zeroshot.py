"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model, offline.

fidelprune ships lm-eval task YAMLs (evaluation/tasks/) that are lm-eval 0.4.13's own, with the hub dataset
swapped for the bundled local files; lm-eval does the prompting, scoring and metrics. A TaskManager that sees
only those YAMLs (include_defaults=False) guarantees that no task reaches for the hub.

Protocol (docs/methods.md): zero-shot, lm-eval's prompts, the tokenizer's own BOS convention (lm-eval's
default; recorded), acc and acc_norm where the task defines both. The reported metric per task is acc_norm for
ARC-e, ARC-c, OBQA, PIQA, HellaSwag and acc for BoolQ and WinoGrande; the commonsense average is their mean.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..utils import eval_mode
from .tasks import TASKS_DIR

BUNDLED_TASKS = ("arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa")
TASKS = (*BUNDLED_TASKS, "hellaswag")  # hellaswag reads a file the user gives
COMMONSENSE_7 = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
REPORTED_METRIC = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm",
                   "hellaswag": "acc_norm", "boolq": "acc", "winogrande": "acc"}


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def parse_tasks(spec: str | list[str] | tuple[str, ...] | None, hellaswag: str | Path | None = None) -> list[str]:
    """'arc_easy,piqa' / a list / 'all' (the six bundled tasks, plus hellaswag when its file is given) / 'none'."""
    if spec is None or spec == "all":
        return [*BUNDLED_TASKS, *(["hellaswag"] if hellaswag else [])]
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [t for t in names if t and t != "none"]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
    if "hellaswag" in names and not hellaswag:
        raise ConfigError("hellaswag needs the original HellaSwag jsonl: pass hellaswag=PATH (CLI: --hellaswag PATH)")
    return list(dict.fromkeys(names))


def task_manager(hellaswag: str | Path | None = None):
    """An lm-eval TaskManager over fidelprune's task YAMLs only (no built-in task, hence no hub dataset)."""
    from lm_eval.tasks import TaskManager

    metadata = {"hellaswag_path": str(Path(hellaswag).expanduser().resolve())} if hellaswag else None
    with quiet_lm_eval():
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def load_tasks(names: list[str], hellaswag: str | Path | None = None) -> dict:
    """{name: lm-eval Task}, documents loaded: for inspecting prompts, or for running them yourself."""
    with quiet_lm_eval():
        return task_manager(hellaswag).load(list(names))["tasks"]


@contextlib.contextmanager
def quiet_lm_eval(verbose: bool = False):
    """lm-eval logs every task build at INFO/WARNING; keep the console to progress bars and errors."""
    if verbose:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # acc, acc_norm (where defined) and their *_stderr
    reported_metric: str
    n: int  # documents scored
    n_available: int  # documents in the set
    per_item: list[float] | None = None  # the reported metric of each document, by doc_id (zeroshot(per_item=True))

    @property
    def reported(self) -> float:
        return self.metrics[self.reported_metric]


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    limit: int | None
    batch_size: int
    bos_added: bool
    seed: int
    lm_eval_version: str
    seconds: float
    average: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tasks"] = {name: asdict(t) for name, t in self.tasks.items()}
        return out


def commonsense_average(tasks: dict[str, TaskResult]) -> dict:
    """Mean of each task's reported metric over the tasks present; `commonsense7` says whether it covers all
    seven of the LLM-Pruner-style average (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA)."""
    names = [t for t in COMMONSENSE_7 if t in tasks]
    if not names:
        return {}
    value = sum(tasks[t].reported for t in names) / len(names)
    return {"value": value, "tasks": names, "metrics": {t: tasks[t].reported_metric for t in names},
            "commonsense7": len(names) == len(COMMONSENSE_7),
            "label": "commonsense-7 average" if len(names) == len(COMMONSENSE_7) else f"average of {len(names)} tasks"}


def _task_results(raw: dict, names: list[str]) -> dict[str, TaskResult]:
    results = {}
    samples = raw.get("samples") or {}
    for name in names:
        metrics = {}
        for key, value in raw["results"][name].items():
            metric, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)):
                metrics[metric] = float(value)
        counts = raw["n-samples"][name]
        per_item = None
        if name in samples:
            # kept so that two models scored on the same documents can be compared pairwise (McNemar)
            per_item = [float(s[REPORTED_METRIC[name]]) for s in sorted(samples[name], key=lambda s: s["doc_id"])]
        results[name] = TaskResult(name, metrics, REPORTED_METRIC[name], int(counts["effective"]), int(counts["original"]), per_item)
    return results


def zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: str | list[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    hellaswag: str | Path | None = None,
    seed: int = 0,
    per_item: bool = False,
    verbose: bool = False,
) -> ZeroShotResult:
    """Zero-shot accuracy of an in-memory causal LM on fidelprune's lm-eval tasks (default: the six bundled);
    `limit` scores the first N documents of each task (recorded); `per_item` also keeps each document's 0/1
    outcome (`TaskResult.per_item`), for paired comparisons. Progress bars are lm-eval's own."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks, hellaswag)
    if not names:
        raise ConfigError("no zero-shot task selected")
    start = time.perf_counter()
    with eval_mode(model), quiet_lm_eval(verbose):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = simple_evaluate(
            model=lm, tasks=names, num_fewshot=0, limit=limit, task_manager=task_manager(hellaswag),
            log_samples=per_item, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    results = _task_results(raw, names)
    return ZeroShotResult(results, limit, batch_size, tokenizer_adds_bos(tokenizer), seed, lm_eval_version(),
                          time.perf_counter() - start, commonsense_average(results))
