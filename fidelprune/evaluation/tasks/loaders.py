"""Local documents for fidelprune's lm-eval tasks, in the schema of the hub datasets lm-eval's YAMLs read.

Each task YAML names one of these functions as `custom_dataset`; lm-eval calls it with the task's metadata and
`dataset_kwargs` as keyword arguments and expects {split: datasets.Dataset}. The functions only re-shape the
bundled files (fidelprune/data/SOURCES.md) into the hub schema, so the prompt templates, choices, targets and
metrics stay exactly lm-eval's own (compare lm_eval/tasks/*/ in the installed package). Nothing here touches
the network: the datasets are built in memory, never through `datasets.load_dataset`.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from fidelprune.utils import bundled_path

LETTERS = "ABCDEFGH"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_labels(path: str | Path) -> list[str]:
    """A .lst label file: one label a line."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _with_labels(docs: list[dict], labels: list[str], path: Path) -> None:
    if len(labels) != len(docs):
        raise ValueError(f"{path}: {len(labels)} labels for {len(docs)} documents")


# ---------------------------------------------------------------------------------------------- converters
def arc_docs(path: str | Path) -> list[dict]:
    """Bundled ARC ({"id", "query": "Question: ...\\nAnswer:", "choices", "gold"}) -> allenai/ai2_arc schema."""
    docs = []
    for row in read_jsonl(path):
        query = row["query"]
        prefix, suffix = "Question: ", "\nAnswer:"
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise ValueError(f"{path}: ARC query not in the 'Question: ...\\nAnswer:' form: {query[:60]!r}")
        labels = list(LETTERS[: len(row["choices"])])
        docs.append({
            "id": row["id"],
            "question": query[len(prefix) : -len(suffix)],
            "choices": {"text": row["choices"], "label": labels},
            "answerKey": labels[row["gold"]],
        })
    return docs


def openbookqa_docs(path: str | Path) -> list[dict]:
    """Bundled OpenBookQA ({"query": bare stem, "choices", "gold"}) -> allenai/openbookqa "main" schema."""
    docs = []
    for i, row in enumerate(read_jsonl(path)):
        labels = list(LETTERS[: len(row["choices"])])
        docs.append({
            "id": str(i),
            "question_stem": row["query"],
            "choices": {"text": row["choices"], "label": labels},
            "answerKey": labels[row["gold"]],
        })
    return docs


def piqa_docs(path: str | Path, labels_path: str | Path) -> list[dict]:
    """PIQA valid.jsonl + valid-labels.lst -> baber/piqa schema {"goal", "sol1", "sol2", "label": 0/1}."""
    docs, labels = read_jsonl(path), read_labels(labels_path)
    _with_labels(docs, labels, Path(labels_path))
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]


def boolq_docs(path: str | Path) -> list[dict]:
    """SuperGLUE BoolQ val.jsonl (label "true"/"false" or a bool) -> aps/super_glue boolq schema, label 1 = True
    (lm-eval's choices are ["no", "yes"])."""
    def label(value) -> int:
        if isinstance(value, bool):
            return int(value)
        if str(value).lower() not in {"true", "false"}:
            raise ValueError(f"{path}: unexpected BoolQ label {value!r}")
        return int(str(value).lower() == "true")

    return [{"question": d["question"], "passage": d["passage"], "idx": int(d["idx"]), "label": label(d["label"])}
            for d in read_jsonl(path)]


def winogrande_docs(path: str | Path, labels_path: str | Path) -> list[dict]:
    """WinoGrande dev.jsonl + dev-labels.lst -> allenai/winogrande schema, "answer" as the string "1"/"2"."""
    docs, labels = read_jsonl(path), read_labels(labels_path)
    _with_labels(docs, labels, Path(labels_path))
    out = []
    for d, y in zip(docs, labels):
        if d.get("answer") not in (None, "", y):
            raise ValueError(f"{path}: {d['qID']} answer {d['answer']!r} disagrees with {labels_path} ({y!r})")
        out.append({"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": y})
    return out


HELLASWAG_FIELDS = ("ctx_a", "ctx_b", "activity_label", "endings", "label")


def hellaswag_docs(path: str | Path) -> list[dict]:
    """The original HellaSwag jsonl (e.g. hellaswag_val.jsonl) -> Rowan/hellaswag schema; lm-eval's own
    process_docs (lm_eval.tasks.hellaswag.utils) then builds the query and choices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file not found: {path} (give the original hellaswag_val.jsonl)")
    docs = []
    for i, row in enumerate(read_jsonl(path)):
        missing = [k for k in HELLASWAG_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path} line {i + 1}: missing {', '.join(missing)} (needs the original HellaSwag schema)")
        docs.append({"ind": row.get("ind", i), "activity_label": row["activity_label"], "ctx_a": row["ctx_a"],
                     "ctx_b": row["ctx_b"], "endings": list(row["endings"]), "label": str(row["label"])})
    return docs


# ------------------------------------------------------------------------------- lm-eval custom_dataset hooks
def _dataset(split: str, docs: list[dict]) -> dict[str, datasets.Dataset]:
    return {split: datasets.Dataset.from_list(docs)}


def arc(data_file: str, **_metadata) -> dict[str, datasets.Dataset]:
    return _dataset("test", arc_docs(bundled_path(data_file)))


def openbookqa(**_metadata) -> dict[str, datasets.Dataset]:
    return _dataset("test", openbookqa_docs(bundled_path("openbookqa/openbook_qa.jsonl")))


def piqa(**_metadata) -> dict[str, datasets.Dataset]:
    return _dataset("validation", piqa_docs(bundled_path("piqa/valid.jsonl"), bundled_path("piqa/valid-labels.lst")))


def boolq(**_metadata) -> dict[str, datasets.Dataset]:
    return _dataset("validation", boolq_docs(bundled_path("boolq/val.jsonl")))


def winogrande(**_metadata) -> dict[str, datasets.Dataset]:
    docs = winogrande_docs(bundled_path("winogrande/dev.jsonl"), bundled_path("winogrande/dev-labels.lst"))
    return _dataset("validation", docs)


def hellaswag(hellaswag_path: str | None = None, **_metadata) -> dict[str, datasets.Dataset]:
    # The path arrives through the TaskManager's metadata (fidelprune.evaluation.zeroshot passes it).
    if not hellaswag_path:
        raise ValueError("hellaswag needs the original HellaSwag jsonl: pass hellaswag=PATH (CLI: --hellaswag PATH)")
    return _dataset("validation", hellaswag_docs(hellaswag_path))
