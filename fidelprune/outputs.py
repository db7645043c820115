"""Writing outputs: atomic directories and files, the model files of a pruned or recovered model, score files.

What the files are called and what a per-layer shape looks like on disk is layout.py's."""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import is_main
from .errors import FidelpruneError
from .layout import CALIBRATION_FILE, LAYER_WIDTHS_KEY, MANIFEST, SCORES_FILE, SIDE_DIR, ModelShape, side_file
from .scoring import Scores

log = logging.getLogger(__name__)

# transformers 5 writes this tokenizer class name, which transformers 4 (llama.cpp's converter, older vLLM) cannot
# import; both versions read the same tokenizer.json as this class.
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save the tokenizer so that transformers 4 and 5 readers both load it (see PORTABLE_TOKENIZER_CLASS)."""
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") in PORTABLE_TOKENIZER_CLASS:
            config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS[config["tokenizer_class"]]
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class OutputExistsError(FidelpruneError, FileExistsError):
    """The output directory already holds files."""


class OutputWriteError(FidelpruneError, OSError):
    """The file system refused an output (disk full, read-only, permissions, an I/O error); nothing was written
    there, and an output it was to replace is unchanged."""


def size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def free_bytes(path: Path) -> int | None:
    """Free space on the disk that holds `path` (or would: its nearest existing parent); None when unknown."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as saved: every distinct tensor of its state dict once (tied weights are one)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.device.type == "meta" or (key := (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)) in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def check_output_space(output: Path, needed: int) -> None:
    """Refuse an output its disk has no room for (an --overwrite output is replaced only once the new one is
    written, so the whole new output must fit beside it)."""
    free = free_bytes(output.parent)
    if free is not None and needed > free:
        raise OutputWriteError(f"no space for output {output}: it needs about {size_text(needed)} and its disk has "
                               f"{size_text(free)} free; free some space or choose an --output on another disk")


def os_error(err: BaseException) -> OSError | None:
    """The operating-system error behind `err`: an OSError itself (not fidelprune's own), or one that safetensors
    reports in its message ('... (os error 28)'); None for anything else."""
    if isinstance(err, FidelpruneError):
        return None
    if isinstance(err, OSError):
        return err
    found = re.search(r"\(os error (\d+)\)", str(err))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def write_failure(output: Path, err: OSError, needed: int | None, written: int, replacing: bool) -> OutputWriteError:
    """The one line for an output the file system refused partway."""
    after = "nothing was written" + (" and the previous output is unchanged" if replacing else "")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"about {size_text(needed)}" if needed else f"more than the {size_text(written)} written before the disk filled"
        free = free_bytes(output.parent)
        return OutputWriteError(f"no space left for output {output}: it needs {need}"
                                f"{'' if free is None else f' ({size_text(free)} free now)'}; {after}; free some space "
                                f"or choose an --output on another disk")
    where = f" ({err.filename})" if err.filename else ""
    return OutputWriteError(f"cannot write output {output}: {err.strerror or err}{where}; {after}; check the disk and "
                            f"its permissions, or choose another --output")


# lock files this process holds, with their nesting depth: a run claims its output, then its save claims it again
_CLAIMS: dict[Path, int] = {}


@contextmanager
def claimed(output: str | Path) -> Iterator[Path]:
    """Hold `output` for the block: a lock file `.NAME.lock` beside it names this process, so a second run to the
    same output stops at once with one line naming this one (checking an output at the start is not enough: two
    runs would both find it empty). A lock whose process is gone (a killed run) is taken over. Claims nest. The
    folders made for the lock are removed again if the run ends without writing anything into them."""
    output = Path(output)
    lock = _lock_path(output)
    key = Path(os.path.abspath(lock))
    made: list[Path] = []
    if key not in _CLAIMS:
        made = [p for p in [output.parent, *output.parent.parents] if not p.exists()]  # innermost first
        output.parent.mkdir(parents=True, exist_ok=True)
        _take(lock, output)
    _CLAIMS[key] = _CLAIMS.get(key, 0) + 1
    try:
        yield output
    finally:
        _CLAIMS[key] -= 1
        if not _CLAIMS[key]:
            del _CLAIMS[key]
            lock.unlink(missing_ok=True)
            for folder in made:
                if any(folder.iterdir()):
                    break
                folder.rmdir()


def _take(lock: Path, output: Path) -> None:
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and not _alive(owner):
                lock.unlink(missing_ok=True)
                log.warning("took over the lock of %s left by a run that ended (process %d)", output, owner)
                continue
            raise OutputExistsError(
                f"output {output} is being written by another run (process {owner or 'unknown'}, lock file {lock}); "
                f"wait for it to end or choose another --output (no such run going on? delete the lock file)") from None
        with os.fdopen(handle, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise OutputExistsError(f"output {output} is being claimed by other runs at the same time; choose another --output")


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _lock_owner(lock: Path) -> int | None:
    """The process id in a lock file; None while it is being written (or cannot be read)."""
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def loaded_from(model: nn.Module) -> list[Path]:
    """The local model folder `model` was loaded from, as transformers recorded it (`name_or_path`), whatever
    loaded it; a folder without config.json (a GGUF file's directory, a hub id) is not one."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    folder = Path(str(name)) if name else None
    return [folder] if folder is not None and (folder / "config.json").is_file() else []


def overlaps(output: Path, source: Path) -> bool:
    """Whether writing `output` could destroy `source`: the same path, or one inside the other (links resolved)."""
    out, src = output.resolve(), source.resolve()
    return out == src or out in src.parents or src in out.parents


def check_output_dir(output: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that is, holds or sits inside any of `inputs` (whatever `overwrite` says), a non-empty
    output unless overwrite, and one that cannot be written; call before any compute."""
    output = _refuse_inputs_and_tidy(Path(output), inputs)
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {output} is not empty; choose another --output or pass --overwrite")
    _check_writable(output)
    return output


def _refuse_inputs_and_tidy(output: Path, inputs: Iterable[str | Path]) -> Path:
    """What every output check starts with: refuse an output that is, holds or lies inside an input; then clear
    (on rank 0 of a data-parallel run) what killed runs left beside it, putting back a moved-aside output."""
    try:
        resolved = output.resolve()
    except (RuntimeError, OSError) as err:  # a symbolic-link loop: RuntimeError before Python 3.13, OSError since
        raise OutputExistsError(f"cannot use output {output} ({err}); choose another --output") from None
    if resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise OutputExistsError(f"output {output} is the working directory or holds it; give a new folder's name "
                                f"(--output pruned/)")
    for source in inputs:
        if overlaps(output, Path(source)):
            raise OutputExistsError(
                f"output {output} would overwrite the input {source} (it is, contains or lies inside it); "
                f"choose an --output outside the input"
            )
    if output.parent.is_dir() and is_main():
        remove_stale_siblings(output)
    return output


def _check_writable(output: Path) -> None:
    """Create and remove a probe file where the output's temporary sibling will be made."""
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"cannot create output {output}: {parent} is not a directory; choose another --output")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".fidelprune-probe-"):
            pass
    except OSError as err:
        raise OutputExistsError(f"cannot write output {output} ({err.strerror or err}); choose another --output") from err


def temporary_sibling(output: Path, kind: str = "tmp") -> Path:
    """A new hidden directory beside `output`, named `.NAME.KIND-PID-XXXX`, so that a later run can tell an
    abandoned one (its process is gone) from one being written now."""
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.{kind}-{os.getpid()}-", dir=output.parent))


def remove_stale_siblings(output: Path) -> list[Path]:
    """Remove the temporary siblings of `output` left by runs that were killed (their process no longer exists);
    return what was removed. A run killed in the middle of an --overwrite swap had moved the previous output
    aside into `.NAME.old-PID-*` without putting the new one in place: that previous output is put back."""
    removed = []
    for path in sorted(output.parent.glob(f".{glob.escape(output.name)}.*-*-*")):
        kind, _, rest = path.name[len(output.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            previous = path / output.name
            if kind == "old" and previous.exists() and not output.exists():
                previous.rename(output)
                log.warning("put back %s, which a run killed while replacing it had moved aside", output)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    lock = _lock_path(output)
    if lock.is_file() and (owner := _lock_owner(lock)) is not None and not _alive(owner):
        lock.unlink(missing_ok=True)
        removed.append(lock)
    if removed:
        log.warning("removed %d temporary file(s) or folder(s) left beside %s by interrupted runs: %s", len(removed), output,
                    ", ".join(p.name for p in removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_directory_write(output: str | Path, write, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                           size: int | None = None) -> Path:
    """Run write(tmp_dir) in a temporary sibling of `output`, then rename it into place, so an interrupted run
    never leaves a directory that looks complete (and the next run to the same output removes its leftovers).
    `size`, the bytes it will write where known, is checked against the free space first; a disk that fills
    anyway (or any other refusal of the file system) ends with one OutputWriteError line."""
    output = check_output_dir(output, overwrite, inputs)  # also clears what killed runs left beside it
    with claimed(output):
        if size:
            check_output_space(output, size)
        replacing = output.exists()
        tmp = temporary_sibling(output)
        try:
            write(tmp)
            _default_permissions(tmp)
            _swap_in(tmp, output, overwrite)
        except BaseException as err:
            written = _tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if (cause := os_error(err)) is not None:
                raise write_failure(output, cause, size, written, replacing) from err
            raise
    return output


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _swap_in(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the written folder into place; never over an output that appeared during the write unless asked."""
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise OutputExistsError(f"output {output} appeared while this run was writing it; nothing was written "
                                f"there: choose another --output or pass --overwrite")
    if output.exists():
        old = temporary_sibling(output, "old")
        _rename(output, old / output.name)  # a kill between these two renames: see remove_stale_siblings
        try:
            _rename(tmp, output)
        except BaseException:  # interrupted (or failed) here: the previous output goes back at once
            (old / output.name).rename(output)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old)
    else:
        _rename(tmp, output)


def check_output_file(output: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """check_output_dir for an output that is one file (an exported GGUF)."""
    output = _refuse_inputs_and_tidy(Path(output), inputs)
    if output.is_dir():
        raise OutputExistsError(f"output {output} is a directory; give a file name (--output NAME.gguf)")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} exists; choose another --output or pass --overwrite")
    _check_writable(output)
    return output


def atomic_file_write(output: str | Path, write, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Run write(tmp_file) on a temporary sibling of `output`, then rename it into place (see
    atomic_directory_write); write may raise to abandon the file."""
    output = check_output_file(output, overwrite, inputs)  # also clears what killed runs left beside it
    with claimed(output):
        handle, name = tempfile.mkstemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent)
        os.close(handle)
        tmp = Path(name)
        replacing = output.exists()
        try:
            write(tmp)
            tmp.chmod(0o666 & ~_umask())
            if output.exists() and not overwrite:
                raise OutputExistsError(f"output {output} appeared while this run was writing it; nothing was "
                                        f"written there: choose another --output or pass --overwrite")
            os.replace(tmp, output)
        except BaseException as err:
            written = tmp.stat().st_size if tmp.is_file() else 0
            tmp.unlink(missing_ok=True)
            if (cause := os_error(err)) is not None:
                raise write_failure(output, cause, None, written, replacing) from err
            raise
    return output


def _rename(source: Path, target: Path) -> None:
    """One rename of the output swap (a function of its own so that the kill tests can stop a run between two)."""
    source.rename(target)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_permissions(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; give the output the permissions of any new file."""
    umask = _umask()
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_scores(scores: Scores, path: str | Path, extra: Scores | None = None, prefix: str = "layer") -> None:
    tensors = {f"{prefix}.{i}": s.float().contiguous() for i, s in scores.items()}
    for name, s in (extra or {}).items():
        tensors[name] = s.float().contiguous()
    save_file(tensors, str(path))


class ScoresError(FidelpruneError, ValueError):
    """A scores file or dict that does not fit the model (other layers or widths), or is unreadable."""


def _scores_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = side_file(path, SCORES_FILE)
    if not path.is_file():
        raise ScoresError(f"scores file not found: {path} (give a scores.safetensors from an earlier run)")
    return path


def _layer_index(name: str, prefix: str) -> int | None:
    index = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else ""
    return int(index) if index.isdigit() else None


def score_shapes(path: str | Path, prefix: str = "layer") -> dict[int, tuple[int, ...]]:
    """{layer: shape} of a scores file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    path = _scores_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {_layer_index(name, prefix): tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ScoresError(f"{path} is not a readable safetensors file ({err}); re-run the scoring or give another --scores") from err
    shapes.pop(None, None)
    if not shapes:
        raise ScoresError(f"{path} holds no '{prefix}.N' score tensors; give a scores.safetensors from an earlier run")
    return dict(sorted(shapes.items()))


def check_scores_fit(shapes: dict[int, tuple[int, ...]], widths: list[int], where: str) -> None:
    """Scores must name exactly the model's layers, each with one score per neuron."""
    if sorted(shapes) != list(range(len(widths))):
        raise ScoresError(f"{where} has scores for layers {_span(sorted(shapes))}, the model has layers "
                          f"{_span(list(range(len(widths))))}: they come from another model; score afresh (drop --scores)")
    for layer, shape in shapes.items():
        if tuple(shape) != (widths[layer],):
            raise ScoresError(f"{where}: layer {layer} has scores of shape {list(shape)} for an MLP of width "
                              f"{widths[layer]}: they come from another model; score afresh (drop --scores)")


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers else "none"


def load_scores(path: str | Path, prefix: str = "layer") -> Scores:
    path = _scores_path(path)
    score_shapes(path, prefix)  # a damaged file fails here, with its name
    tensors = load_file(str(path))
    return dict(sorted((i, t) for name, t in tensors.items() if (i := _layer_index(name, prefix)) is not None))


def save_model(model: nn.Module, tokenizer, directory: Path) -> None:
    """The model files engines load: safetensors weights, config.json (with a per-layer shape's keys, layout.py),
    generation config and tokenizer."""
    # transformers reads a device map's 'cpu' entries as accelerate-offloaded weights and takes another save
    # path for them; fidelprune's placed modules are all in memory (placement.py), so save the plain way
    device_map = vars(model).pop("hf_device_map", None)
    try:
        model.save_pretrained(directory)
    finally:
        if device_map is not None:
            model.hf_device_map = device_map
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if LAYER_WIDTHS_KEY in config:  # per-layer widths: transformers' own per_layer_config beside fidelprune's key
        config = ModelShape.from_config(config).to_config(config)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)


def save_pruned(
    model: nn.Module,
    tokenizer,
    output: str | Path,
    manifest: dict,
    scores: Scores,
    calibration_ids: torch.Tensor | None,
    *,
    extra_scores: Scores | None = None,
    overwrite: bool = False,
    reconstruction_ids: torch.Tensor | None = None,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write safetensors weights + config + generation config + tokenizer + pruning.json + scores and the
    exact calibration token ids, atomically."""

    def write(tmp: Path) -> None:
        save_model(model, tokenizer, tmp)
        (tmp / SIDE_DIR).mkdir()
        save_scores(scores, tmp / SIDE_DIR / SCORES_FILE, extra_scores)
        windows = {"input_ids": calibration_ids, "reconstruction_ids": reconstruction_ids}  # the latter: separate windows
        windows = {name: ids.contiguous() for name, ids in windows.items() if ids is not None}
        if windows:
            save_file(windows, str(tmp / SIDE_DIR / CALIBRATION_FILE))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    side = sum(ids.numel() * ids.element_size() for ids in (calibration_ids, reconstruction_ids) if ids is not None)
    return atomic_directory_write(output, write, overwrite, inputs, size=tensor_bytes(model) + side)
