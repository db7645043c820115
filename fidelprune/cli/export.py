"""`fidelprune export DIR --to gguf|vllm`: flags -> ExportConfig -> export.export -> a file or folder an engine
serves, load-checked, with OUTPUT.export.json beside it."""

from __future__ import annotations

from pathlib import Path

from ..deploy import FORMATS, ExportConfig, export, report_path
from ..deploy.gguf import OUTTYPES
from .common import console


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a GGUF (llama.cpp) or a folder vLLM serves, and check it",
                       description="Export a fidelprune output (or any Hugging Face checkpoint directory) for an "
                                   "inference engine. The written file is read back by another reader and its "
                                   "next-token logits compared with the checkpoint's; a failed check writes nothing.")
    p.add_argument("directory", help="a fidelprune output or Hugging Face checkpoint directory")
    p.add_argument("--to", choices=FORMATS, default="gguf", help="gguf (llama.cpp, default) or vllm (a model folder)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="GGUF tensor type (default f16; 1-D tensors stay f32; q8_0 falls back to f16 for rows that "
                        "are not a multiple of 32)")
    p.add_argument("--output", "-o", default=None,
                   help="output file (gguf; default DIR-OUTTYPE.gguf beside DIR) or folder (vllm; default DIR-vllm)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--template", default=None,
                   help="GGUF of the base model whose metadata and vocabulary to reuse (default: the GGUF the run "
                        "was pruned from, as pruning.json records)")
    p.add_argument("--llama-cpp", default=None,
                   help="a llama.cpp checkout: its convert_hf_to_gguf.py writes the vocabulary when there is no GGUF "
                        "to reuse")
    p.add_argument("--converter-python", default=None, help="the Python that runs llama.cpp's converter")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the load check")
    p.add_argument("--check-windows", type=int, default=4, help="load check: WikiText-2 windows (default 4)")
    p.add_argument("--check-seq-len", type=int, default=128, help="load check: tokens per window (default 128)")
    p.set_defaults(run=run)


def run(args) -> int:
    config = ExportConfig(to=args.to, outtype=args.outtype, template=args.template, llama_cpp=args.llama_cpp,
                          converter_python=args.converter_python, check=args.check,
                          check_windows=args.check_windows, check_seq_len=args.check_seq_len)
    report = export(args.directory, config, output=args.output, overwrite=args.overwrite, say=console.print)
    written = report["written"]
    what = (f"{written['architecture']} GGUF, feed_forward_length {written['feed_forward_length']}, "
            f"tensor types {written['tensor_types']}" if args.to == "gguf" else f"{len(written['files'])} files")
    console.print(f"wrote {report['output']} ({what}); record: {report_path(Path(report['output']))}")
    return 0
