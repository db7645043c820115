"""fidelprune's lm-eval tasks: bundled documents, lm-eval's exact prompts and choices, and end-to-end runs offline."""

import math
import socket
from importlib.metadata import version
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks._yaml_loader import load_yaml

from fidelprune.evaluation import BUNDLED_TASKS, load_tasks, zeroshot
from fidelprune.evaluation.tasks import TASKS_DIR
from fidelprune.evaluation.zeroshot import TaskResult, commonsense_average, parse_tasks
from fidelprune.utils import bundled_path

from eval_helpers import read_jsonl, smollm2_tokenizer, tiny_lm

FIRST = 3  # documents whose rendered requests are checked


def requests(task, doc) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for one document, zero-shot."""
    return [tuple(r.args) for r in task.construct_requests(doc=doc, ctx=task.fewshot_context(doc, 0))]


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(list(BUNDLED_TASKS))


# ---- what lm-eval's conventions say each prompt is, written out from the raw bundled files ----
def expected_arc(name):
    rows = read_jsonl(bundled_path(f"arc/{name}-Test.docs.jsonl"))
    # bundled query is already "Question: {question}\nAnswer:"; each choice is scored after a space
    return len(rows), [([(r["query"], f" {c}") for c in r["choices"]], r["gold"]) for r in rows[:FIRST]]


def expected_piqa():
    rows = read_jsonl(bundled_path("piqa/valid.jsonl"))
    labels = bundled_path("piqa/valid-labels.lst").read_text().split()
    return len(rows), [([(f"Question: {r['goal']}\nAnswer:", f" {r[s]}") for s in ("sol1", "sol2")], int(y))
                       for r, y in zip(rows[:FIRST], labels)]


def expected_boolq():
    rows = read_jsonl(bundled_path("boolq/val.jsonl"))
    out = []
    for r in rows[:FIRST]:
        context = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        out.append(([(context, " no"), (context, " yes")], {"false": 0, "true": 1}[r["label"]]))
    return len(rows), out


def expected_winogrande():
    rows = read_jsonl(bundled_path("winogrande/dev.jsonl"))
    labels = bundled_path("winogrande/dev-labels.lst").read_text().split()
    out = []
    for r, y in zip(rows[:FIRST], labels):
        blank = r["sentence"].index("_")
        rest = " " + r["sentence"][blank + 1 :].strip()  # partial scoring: the sentence after the blank
        out.append(([(r["sentence"][:blank] + r[o], rest) for o in ("option1", "option2")], int(y) - 1))
    return len(rows), out


def expected_openbookqa():
    rows = read_jsonl(bundled_path("openbookqa/openbook_qa.jsonl"))
    return len(rows), [([(r["query"], f" {c}") for c in r["choices"]], r["gold"]) for r in rows[:FIRST]]


EXPECTED = {
    "arc_easy": lambda: expected_arc("ARC-Easy"),
    "arc_challenge": lambda: expected_arc("ARC-Challenge"),
    "piqa": expected_piqa,
    "boolq": expected_boolq,
    "winogrande": expected_winogrande,
    "openbookqa": expected_openbookqa,
}


@pytest.mark.parametrize("name", BUNDLED_TASKS)
def test_bundled_task_documents_prompts_and_choices_match_lm_eval(name, tasks):
    task = tasks[name]
    count, first = EXPECTED[name]()
    docs = task.eval_docs
    assert len(docs) == count
    for doc, (pairs, gold) in zip(docs, first):
        assert requests(task, doc) == pairs
        # WinoGrande has one context per option, so lm-eval's doc_to_text gives the gold index there
        assert (task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)) == gold


def test_sample_prompts_written_out():
    """Two literal examples, so that a change in lm-eval's or our rendering shows up as text."""
    tasks = load_tasks(["arc_easy", "openbookqa"])
    arc = requests(tasks["arc_easy"], tasks["arc_easy"].eval_docs[0])[0]
    assert arc == ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
                   "\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.")
    obqa = requests(tasks["openbookqa"], tasks["openbookqa"].eval_docs[1])
    assert obqa[0] == ("There is most likely going to be fog around:", " a marsh")


# lm-eval's own YAML for each task: ours must carry the same prompt, target, choices, output type and metrics
LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml", "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
}
SAME_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "metric_list",
               "target_delimiter", "fewshot_delimiter", "num_fewshot", "metadata")


def _comparable(value):
    return (value.__module__, value.__name__) if callable(value) else value


@pytest.mark.parametrize("name", list(LM_EVAL_YAML))
def test_task_yaml_carries_lm_eval_definition(name):
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name])
    ours = load_yaml(TASKS_DIR / f"{name}.yaml")
    assert ours["task"] == theirs["task"] == name
    for key in SAME_FIELDS:
        assert _comparable(ours.get(key)) == _comparable(theirs.get(key)), key
    assert "dataset_path" not in ours and callable(ours["custom_dataset"])  # local data, never the hub


def test_tiny_model_runs_every_bundled_task_end_to_end_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access during evaluation")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    result = zeroshot(tiny_lm(), smollm2_tokenizer(), "all", limit=2, batch_size=4)
    assert list(result.tasks) == list(BUNDLED_TASKS)
    for name, task in result.tasks.items():
        assert task.n == 2 and task.n_available > 100
        assert 0.0 <= task.reported <= 1.0 and math.isfinite(task.metrics["acc"])
        assert ("acc_norm" in task.metrics) == (name not in ("boolq", "winogrande"))
    assert result.limit == 2 and result.lm_eval_version == version("lm_eval")
    assert result.average["tasks"] == ["boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert result.average["commonsense7"] is False and result.average["label"] == "average of 6 tasks"
    assert result.to_dict()["tasks"]["piqa"]["n"] == 2


def test_per_item_outcomes_average_to_the_reported_metric():
    result = zeroshot(tiny_lm(), smollm2_tokenizer(), "piqa,boolq", limit=5, batch_size=4, per_item=True)
    for task in result.tasks.values():
        assert len(task.per_item) == task.n == 5 and set(task.per_item) <= {0.0, 1.0}
        assert sum(task.per_item) / task.n == pytest.approx(task.reported)
    assert zeroshot(tiny_lm(), smollm2_tokenizer(), "piqa", limit=2).tasks["piqa"].per_item is None


# ---- HellaSwag from the original jsonl schema ----
HELLASWAG_ROWS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3, "source_id": "x",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "label": 0, "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                                                   "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]},
    {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
     "ctx_b": "", "label": "1", "endings": ["Scrub it [substeps] well.", "Brush the grates [substeps] gently.",
                                           "Wait.", "Spray it."]},
]


@pytest.fixture
def hellaswag_file(tmp_path):
    import json

    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS))
    return path


def test_hellaswag_reads_the_original_schema_with_lm_eval_preprocessing(hellaswag_file):
    task = load_tasks(["hellaswag"], hellaswag=hellaswag_file)["hellaswag"]
    docs = task.eval_docs
    assert len(docs) == 3
    # activity_label + ": " + ctx_a + " " + ctx_b.capitalize(); WikiHow brackets removed, " [title]" -> ". "
    assert requests(task, docs[0])[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                                          " starts pulling up roofing on a roof.")
    assert task.doc_to_target(docs[0]) == 3 and task.doc_to_target(docs[1]) == 0 and task.doc_to_target(docs[2]) == 1
    assert requests(task, docs[2])[:2] == [("Home and Garden: How to clean a grill. Heat the grill.", " Scrub it well."),
                                           ("Home and Garden: How to clean a grill. Heat the grill.", " Brush the grates gently.")]
    result = zeroshot(tiny_lm(), smollm2_tokenizer(), "hellaswag", hellaswag=hellaswag_file, batch_size=4)
    assert result.tasks["hellaswag"].n == 3 and result.tasks["hellaswag"].reported_metric == "acc_norm"


def test_hellaswag_needs_a_path_with_the_original_fields(tmp_path):
    with pytest.raises(ValueError, match="hellaswag needs"):
        parse_tasks("hellaswag")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "no original fields", "label": 0}\n')
    with pytest.raises(ValueError, match="ctx_a"):
        load_tasks(["hellaswag"], hellaswag=bad)


def test_task_selection():
    assert parse_tasks("all") == list(BUNDLED_TASKS)
    assert parse_tasks("all", hellaswag="h.jsonl")[-1] == "hellaswag"
    assert parse_tasks("piqa,arc_easy,piqa") == ["piqa", "arc_easy"]
    assert parse_tasks("none") == []
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("mmlu")


def test_commonsense_average_says_which_tasks_it_covers():
    names = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    metric = {"boolq": "acc", "winogrande": "acc"}
    results = {}
    for i, n in enumerate(names):
        reported = metric.get(n, "acc_norm")
        results[n] = TaskResult(n, {"acc": 0.0, "acc_norm": 0.0, reported: 0.1 * (i + 1)}, reported, 5, 9)
    average = commonsense_average(results)
    assert average["commonsense7"] and average["label"] == "commonsense-7 average"
    assert average["value"] == pytest.approx(0.4)
    del results["hellaswag"]
    average = commonsense_average(results)
    assert not average["commonsense7"] and "hellaswag" not in average["tasks"] and average["label"] == "average of 6 tasks"
