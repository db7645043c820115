"""What every benchmark shares: the model under test, machine/version records, resumable results files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from fidelprune.outputs import load_scores, save_scores
from fidelprune.utils import library_versions

RESULTS = Path(__file__).parent / "results"
SCORE_CACHE = Path(__file__).parent / ".cache" / "scores"


# Row names whose prune() arguments differ from the name: a form variant, and the Minitron method's old name, which
# the recorded results keep so that their rows stay comparable.
ROW_ARGUMENTS = {"llm-pruner-element2": {"method": "llm-pruner", "form": "element2"}, "activation": {"method": "minitron"}}


def method_arguments(row: str) -> dict:
    """prune()'s method keywords for a benchmark row name."""
    return ROW_ARGUMENTS.get(row, {"method": row})


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def header(protocol: dict) -> dict:
    return {
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "versions": library_versions(),
        "protocol": protocol,
        "rows": [],
    }


# Real shapes (the published configs' numbers): planned without weights, or built with random weights for timing.
LARGE = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def load_model(name: str):
    """(model, tokenizer, source): 'smollm2' (packaged); 'tiny' (a random 2-layer LLaMA with a byte tokenizer, for
    the smoke tests that keep these scripts from rotting); or a LARGE name + '-random' (e.g. 'Llama-3.2-1B-random':
    that shape with random weights, seed 0, and SmolLM2's tokenizer, whose ids all fit its vocabulary: timing and
    memory depend on the shapes only)."""
    import transformers

    import fidelprune
    from fidelprune.models import ModelSource

    if name.endswith("-random") and name.removesuffix("-random") in LARGE:
        from fidelprune.models import packaged_gguf

        gguf = packaged_gguf()
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = transformers.LlamaConfig(**LARGE[name.removesuffix("-random")], max_position_embeddings=8192,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval(), tokenizer, ModelSource(name, None, None, None)
    if name != "tiny":
        return fidelprune.load_model(name, dtype="float32", device="cpu")
    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=len(tokenizer) - 1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), tokenizer, ModelSource("tiny", None, None, None)


def byte_tokenizer():
    """A real (fast) HF tokenizer over the 256 byte symbols, built in memory: no files, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


class ResultsFile:
    """A JSON results file that a long benchmark fills row by row and resumes: rows whose key is already there
    are skipped; a file made under another protocol is refused rather than mixed."""

    def __init__(self, path: str | Path, protocol: dict) -> None:
        self.path = Path(path)
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["protocol"] != protocol:
                raise SystemExit(f"{self.path} was made under another protocol; pass another --output to start a new table")
            self.data.setdefault("resumed", []).append(" ".join(["python", *map(shlex.quote, sys.argv)]))
        else:
            self.data = header(protocol)

    def done(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> dict | None:
        return next((row for row in self.data["rows"] if row["key"] == key), None)

    def put(self, row: dict) -> None:
        """Add the row, or replace the one with its key (a row whose columns are filled across runs)."""
        self.data["rows"] = [r for r in self.data["rows"] if r["key"] != row["key"]] + [row]
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.rename(self.path)


class ScoreCache:
    """Scores of rows that share them, computed once: every method's scores are independent of the ratio,
    the allocation and reconstruction, except sdmprune's (its stage 2 scores the stage-1-pruned model, and its
    alpha/temperature follow the ratio) and iterative pruning's (each step scores the model pruned so far). The
    time of the run that computed them is kept beside them."""

    def __init__(self, directory: Path, model: str, command: str) -> None:
        self.directory, self.model, self.command = directory, model, command

    def path(self, kwargs: dict) -> Path:
        # iterative pruning (--steps K > 1) scores models masked toward the ratio, as sdmprune's stage 2 does
        steps = kwargs.get("steps") or 1
        fields = (["method", "objective", "form", "alpha", "temperature", "aggregation", "samples", "seq_len", "seed"]
                  + (["steps"] if steps > 1 else []) + (["ratio"] if kwargs["method"] == "sdmprune" or steps > 1 else []))
        if kwargs.get("sampling", "spans") != "spans":  # caches made before the seeds' sampling existed drew spans
            fields.append("sampling")
        name = "-".join([self.model] + [f"{kwargs[f]}" for f in fields if kwargs.get(f) is not None])
        return self.directory / f"{name}.safetensors"

    def get(self, kwargs: dict) -> tuple[dict, dict] | None:
        path = self.path(kwargs)
        if not path.exists():
            return None
        return load_scores(path), json.loads(path.with_suffix(".json").read_text())

    @staticmethod
    def applies(kwargs: dict) -> bool:
        # random costs nothing; flap's bias compensation is computed with its scores, not from them
        return kwargs["method"] not in ("random", "flap")

    def put(self, kwargs: dict, scores: dict, record: dict) -> None:
        path = self.path(kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the record first, the scores last: get() sees the scores only once both are complete
        path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        save_scores(scores, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)

    def prune(self, model, tokenizer, source, kwargs: dict):
        """fidelprune.prune with the cached scores when there are some (computing and caching them otherwise):
        (pruned model, report, the scoring time of the run that computed the scores)."""
        import fidelprune

        cached = self.get(kwargs) if self.applies(kwargs) else None
        pruned, report = fidelprune.prune(model, tokenizer, source=source, progress=False,
                                          scores=cached[0] if cached else None, **kwargs)
        if cached:
            return pruned, report, cached[1]["scoring_s"]
        scoring_s = report.manifest["timings_s"]["scoring"]
        if self.applies(kwargs):
            self.put(kwargs, report.scores, {"scoring_s": scoring_s, "command": self.command, "torch_threads": torch.get_num_threads()})
        return pruned, report, scoring_s


def paired_ratio(numerators: list[float], denominators: list[float]) -> float | None:
    """The median over rounds of one row's figure over another's in the same round: rows of one round ran
    minutes apart at most, so a slow spell of the machine moves both (None when the rounds do not pair)."""
    if len(numerators) != len(denominators):
        return None
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def markdown_table(columns: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def provenance(data: dict) -> str:
    m = data["machine"]
    return (f"Command: `{data['command']}`  \nMachine: {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads)"
            f"{', ' + m['gpu'] if 'gpu' in m else ''}; {m['platform']}  \nVersions: "
            + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if k != "platform") + f"  \nStarted: {data['started']}\n")
