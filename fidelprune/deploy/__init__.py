"""`fidelprune export`: a pruned checkpoint as a file an inference engine serves, checked by reloading it.

    export(directory, ExportConfig(to="gguf", outtype="q8_0"))   # -> report dict; writes NAME-q8_0.gguf

Every export runs in three phases, like prune: validate everything the config, the files' headers and the output
location decide (before any weight loads), load and write (to a temporary sibling, renamed into place), then the
load check (check.py): the written file is read back with a reader other than the one that wrote it and its
next-token logits are compared with the checkpoint's on a few WikiText-2 windows. A check past the tolerance of
the output type removes the file and raises. Formats: gguf.py (llama.cpp), vllm.py (a folder vLLM serves).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, check_int
from ..layout import ModelShape, manifest_or_none
from ..models import load_model, locate, model_config, model_shape, shape_model, source_paths
from ..outputs import atomic_directory_write, atomic_file_write, check_output_dir, check_output_file
from ..utils import library_versions
from .check import check_gguf, check_vllm
from .gguf import OUTTYPES, ExportError, Template, target_arch, write_gguf
from .vllm import check_servable, write_vllm

FORMATS = ("gguf", "vllm")
__all__ = ["ExportConfig", "ExportError", "export", "FORMATS"]


@dataclass
class ExportConfig:
    to: str = "gguf"
    outtype: str = "f16"  # GGUF tensor type: f32, f16, bf16, q8_0 (1-D tensors stay f32)
    template: str | None = None  # a GGUF of the base model whose metadata and vocabulary to reuse
    llama_cpp: str | None = None  # a llama.cpp checkout whose converter writes the vocabulary (--vocab-only)
    converter_python: str | None = None  # the Python that runs that converter (default: this one)
    check: bool = True
    check_windows: int = 4
    check_seq_len: int = 128

    def __post_init__(self) -> None:
        if self.to not in FORMATS:
            raise ConfigError(f"--to {self.to!r}: choose one of {', '.join(FORMATS)}")
        if self.outtype not in OUTTYPES:
            raise ConfigError(f"--outtype {self.outtype!r}: choose one of {', '.join(OUTTYPES)}")
        check_int("--check-windows", self.check_windows, 1)
        check_int("--check-seq-len", self.check_seq_len, 2)

    def to_dict(self) -> dict:
        return asdict(self)


def default_output(directory: Path, config: ExportConfig) -> Path:
    if config.to == "gguf":
        return directory.parent / f"{directory.name}-{config.outtype}.gguf"
    return directory.parent / f"{directory.name}-vllm"


def report_path(output: Path) -> Path:
    """Where the export's record (what was written, the load check) goes: beside the output, not inside a folder
    an engine globs."""
    return output.parent / f"{output.name}.export.json"


@dataclass
class ExportPlan:
    """What the validation phase decided, before any weight is read."""

    directory: Path
    output: Path
    model_config: object
    shape: ModelShape
    manifest: dict | None
    template: Template | None = None
    arch: str | None = None


def plan_export(directory: str | Path, config: ExportConfig, output: str | Path | None = None, overwrite: bool = False) -> ExportPlan:
    """Every check that needs no weights: a fidelprune / HF checkpoint directory, a family the format serves, the
    widths it can serve, a template that fits, and a writable output outside the input."""
    directory = Path(directory)
    if str(directory).endswith(".gguf") or not directory.is_dir():
        raise ExportError(f"{directory} is not a model directory: export takes a fidelprune output or a Hugging Face "
                          f"checkpoint directory (config.json + safetensors)")
    where = locate(directory)
    hf_config = model_config(where)
    shape_model(hf_config)  # a family fidelprune adapts, whose shapes transformers builds
    shape = model_shape(hf_config)
    manifest = manifest_or_none(directory)
    output = Path(output) if output else default_output(directory, config)
    inputs = [directory] + ([Path(config.template)] if config.template else [])
    if config.to == "gguf":
        if output.suffix != ".gguf":
            raise ExportError(f"--output {output}: a GGUF export is one file; give a name ending in .gguf")
        check_output_file(output, overwrite, inputs)
        plan = ExportPlan(directory, output, hf_config, shape, manifest, arch=target_arch(hf_config.model_type, shape))
        plan.template = resolve_template(plan, config)
        plan.template.check_fits(hf_config, plan.arch, dropped_layers(manifest))
        return plan
    check_servable(hf_config, shape)
    check_output_dir(output, overwrite, inputs)
    return ExportPlan(directory, output, hf_config, shape, manifest)


def resolve_template(plan: ExportPlan, config: ExportConfig) -> Template:
    """The template GGUF: --template, else the GGUF the run was pruned from (pruning.json), else llama.cpp's
    converter's vocabulary-only output (--llama-cpp)."""
    if config.template:
        if not Path(config.template).is_file():
            raise ExportError(f"--template {config.template}: file not found")
        return Template.read(config.template)
    source = (plan.manifest or {}).get("source_model") or {}
    if source.get("gguf_file"):
        paths = source_paths(source)
        if paths:
            return Template.read(paths[0])
    if config.llama_cpp:
        return Template.read(converter_vocabulary(plan.directory, Path(config.llama_cpp), config.converter_python))
    raise ExportError(
        f"{plan.directory} was not pruned from a GGUF, so there is no vocabulary to reuse: give --template BASE.gguf "
        f"(a GGUF of the model it was pruned from) or --llama-cpp DIR (a llama.cpp checkout; its "
        f"convert_hf_to_gguf.py writes the vocabulary)"
    )


def converter_vocabulary(directory: Path, llama_cpp: Path, python: str | None = None) -> Path:
    """Run llama.cpp's converter with --vocab-only on the checkpoint: the metadata and vocabulary, no tensors."""
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(f"--llama-cpp {llama_cpp}: no convert_hf_to_gguf.py there; give a llama.cpp checkout")
    out = Path(tempfile.mkdtemp(prefix="fidelprune-vocab-")) / "vocab.gguf"
    command = [python or sys.executable, str(script), str(directory), "--vocab-only", "--outfile", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"llama.cpp's converter failed on {directory}: {last}")
    return out


def dropped_layers(manifest: dict | None) -> int:
    """How many decoder layers pruning.json says --drop-layers removed (the base model's GGUF has that many more)."""
    return len(((manifest or {}).get("allocation") or {}).get("dropped_layers") or [])


def export(directory: str | Path, config: ExportConfig | None = None, *, output: str | Path | None = None,
           overwrite: bool = False, progress: bool = True, say=print) -> dict:
    """Export a checkpoint (validate, load, write atomically, load-check); returns the report, also written as
    OUTPUT.export.json."""
    config = config or ExportConfig()
    plan = plan_export(directory, config, output, overwrite)
    started = time.perf_counter()
    model, tokenizer, _ = load_model(plan.directory, dtype="float32", device="cpu")
    loaded = time.perf_counter()
    report = {"format": config.to, "source": str(plan.directory), "output": str(plan.output),
              "settings": config.to_dict(), "versions": library_versions()}

    def write_and_check(path: Path) -> None:
        if config.to == "gguf":
            report["written"] = write_gguf(model, plan.template, path, config.outtype, progress=progress,
                                           dropped_layers=dropped_layers(plan.manifest))
            check = check_gguf if config.check else None
        else:
            report["written"] = write_vllm(plan.directory, path)
            check = check_vllm if config.check else None
        report["seconds"] = {"load": round(loaded - started, 2), "write": round(time.perf_counter() - loaded, 2)}
        if check is not None:
            before = time.perf_counter()
            report["check"] = check(model, tokenizer, path, config, report["written"].get("architecture"))
            report["seconds"]["check"] = round(time.perf_counter() - before, 2)
            say(describe_check(report["check"]))
            if not report["check"]["passed"]:
                raise ExportError(f"the exported {config.to} file failed its load check ({failure(report['check'])}); "
                                  f"nothing was written. Report this with {plan.directory}'s pruning.json")

    if config.to == "gguf":
        atomic_file_write(plan.output, write_and_check, overwrite, [plan.directory])
    else:
        atomic_directory_write(plan.output, write_and_check, overwrite, [plan.directory])
    report_path(plan.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def describe_check(check: dict) -> str:
    return (f"load check ({check['reader']}, {check['windows']}x{check['seq_len']} WikiText-2 tokens): top-1 agreement "
            f"{check['top1_agreement']:.4f}, max |dlogit| {check['max_abs_logit_diff']:.3g}, PPL {check['ppl_exported']:.4f} vs "
            f"{check['ppl_checkpoint']:.4f} (ratio {check['ppl_ratio']:.5f}) -> {'passed' if check['passed'] else 'FAILED'}")


def failure(check: dict) -> str:
    tol = check["tolerance"]
    return (f"top-1 agreement {check['top1_agreement']:.4f} (needs >= {tol['top1_agreement']}), PPL ratio "
            f"{check['ppl_ratio']:.5f} (needs within {tol['ppl_ratio']} of 1)")
