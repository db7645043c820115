"""Recovery throughput: `fidelprune.recover` against a bare PyTorch training step, in one process, on the same rows.

Rows measured, each on the same packed rows (the recovery schedule's rows for each step) and counting the same
tokens (the rows' real, non-padding tokens, as recovery.json does):
  floor            forward + backward with every weight frozen (what scoring costs): the least a step can cost
  bare full        forward + CE + backward + AdamW over every weight: a plain PyTorch full fine-tuning step
  bare lora        the same with peft LoRA on recovery's default targets, rank, alpha and dropout
  bare X+teacher   one teacher forward (inference mode), then the bare X step: what a distillation step must cost
  recover M/L      fidelprune.recover with mode M and loss L, timed per optimizer step through its on_step callback

Rows run in rounds (every row once per round, each for --steps timed steps after one untimed warm-up step), so
machine noise lands on every row alike; a row's tokens/s is the median over rounds, and `vs bare` the median
over rounds of a recover row's tokens/s over its matching bare row's in the same round (KD: bare + teacher).

    python benchmarks/recovery_speed.py                 # pruned SmolLM2 (20 %), Alpaca rows of 256 tokens, batch 1
    python benchmarks/recovery_speed.py --model tiny --steps 1 --rounds 1 --output /tmp/rs.json   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, ResultsFile, load_model, markdown_table, paired_ratio, provenance  # noqa: E402

RECOVER_ROWS = ("recover lora/ce", "recover lora/kd", "recover full/ce", "recover full/kd")
BARE_ROWS = ("floor", "bare full", "bare lora", "bare full+teacher", "bare lora+teacher")
# each recover row's baseline: the bare step of its mode, plus a teacher forward when it distils
BASELINE = {"recover lora/ce": "bare lora", "recover lora/kd": "bare lora+teacher",
            "recover full/ce": "bare full", "recover full/kd": "bare full+teacher"}


def pruned_student(model, tokenizer, source):
    """The model recovery trains: 20 % pruned by magnitude (throughput depends on the shapes, not on which
    neurons were kept); a quarter of each MLP for the tiny model, whose parameters are mostly embeddings."""
    import fidelprune

    try:
        pruned, _ = fidelprune.prune(model, tokenizer, method="magnitude", ratio=0.2, source=source, progress=False)
    except fidelprune.errors.FidelpruneError:
        pruned, _ = fidelprune.prune(model, tokenizer, method="magnitude", keep=model.config.intermediate_size * 3 // 4,
                                     source=source, progress=False)
    return pruned


class Bare:
    """A plain training step as a user would write it from the PyTorch / peft documentation."""

    def __init__(self, student, teacher, mode: str, config) -> None:
        from fidelprune.recovery.modes import apply_lora
        from fidelprune.recovery.train import DEFAULT_LR

        torch.manual_seed(config.seed)
        self.teacher = teacher
        model = copy.deepcopy(student)
        if mode == "floor":
            self.model, self.optimizer = model.eval().requires_grad_(False), None
            return
        if mode == "lora":
            model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules)
        else:
            model.requires_grad_(True)
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DEFAULT_LR[mode])

    def step(self, batch) -> None:
        inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
        if self.teacher is not None:
            with torch.inference_mode():
                self.teacher(**inputs)
        if self.optimizer is None:  # the floor: gradients reach the embeddings' output only
            embeds = self.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
            self.model(inputs_embeds=embeds, position_ids=batch.position_ids, labels=batch.labels, use_cache=False).loss.backward()
            return
        self.model(**inputs, labels=batch.labels).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_bare(row: str, student, teacher, train, schedule, config, steps: int) -> tuple[float, int]:
    """(seconds, tokens) of `steps` timed steps after one warm-up step."""
    mode = row.split()[-1].split("+")[0]
    bare = Bare(student, teacher if row.endswith("+teacher") else None, mode, config)
    seconds, tokens = 0.0, 0
    for step in range(steps + 1):
        batch = train.select(schedule.micro_batches(step)[0])
        start = time.perf_counter()
        bare.step(batch)
        if step:
            seconds += time.perf_counter() - start
            tokens += batch.real_tokens
    return seconds, tokens


def time_recover(row: str, student, teacher, tokenizer, config, steps: int) -> tuple[float, int]:
    """(seconds, tokens) of recover()'s steps after its first, from the times on_step is called."""
    from fidelprune.recovery.train import recover

    mode, loss = row.split()[1].split("/")
    stamps: list[tuple[float, int]] = []
    recover(student, teacher if loss == "kd" else None, "alpaca", tokenizer, config=config, mode=mode, loss=loss,
            max_steps=steps + 1, eval_windows=0, progress=False,
            on_step=lambda step, metrics: stamps.append((time.perf_counter(), metrics["tokens"])))
    return stamps[-1][0] - stamps[0][0], sum(tokens for _, tokens in stamps[1:])


def render(data: dict) -> str:
    rows = {r["key"]: r for r in data["rows"]}
    table = []
    for key in (*BARE_ROWS, *RECOVER_ROWS):
        if key not in rows:
            continue
        rounds = rows[key]["rounds_tokens_per_s"]
        base, floor = rows.get(BASELINE.get(key, "")), rows.get("floor")
        table.append([key, rows[key]["tokens_per_s"], base and paired_ratio(rounds, base["rounds_tokens_per_s"]),
                      floor and paired_ratio(rounds, floor["rounds_tokens_per_s"]), " ".join(f"{t:.1f}" for t in rounds)])
    p = data["protocol"]
    return (f"# Recovery throughput\n\n{p['model']} pruned 20 % (magnitude), Alpaca rows of {p['seq_len']} tokens, batch "
            f"{p['batch_size']}, LoRA r {p['lora_r']} / alpha {p['lora_alpha']} / dropout {p['lora_dropout']}; "
            f"{p['rounds']} rounds of {p['steps']} timed steps per row, all rows in one process; tok/s counts the rows' "
            f"real tokens and is the median over rounds. `vs bare`: the median over rounds of tokens/s over the matching bare "
            f"step's in the same round (KD rows: bare step + one teacher forward); `vs floor` likewise against the floor.\n\n" + provenance(data) + "\n"
            + markdown_table(["row", "tok/s", "vs bare", "vs floor", "per round tok/s"], table))


def main() -> None:
    from fidelprune.recovery.data import build_data
    from fidelprune.recovery.train import RecoveryConfig, _Schedule

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default=",".join((*BARE_ROWS, *RECOVER_ROWS)))
    parser.add_argument("--lora-dropout", type=float, help="instead of recovery's default (bare and recover rows alike)")
    parser.add_argument("--output", default=str(RESULTS / "recovery-speed.json"))
    args = parser.parse_args()

    config = RecoveryConfig(seq_len=args.seq_len, batch_size=1, val_fraction=0.0)  # recover() resolves its own copy
    if args.lora_dropout is not None:
        config.lora_dropout = args.lora_dropout
    protocol = {"model": args.model, "seq_len": args.seq_len, "batch_size": 1, "steps": args.steps, "rounds": args.rounds,
                "lora_r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout}
    results = ResultsFile(args.output, protocol)
    teacher, tokenizer, source = load_model(args.model)
    teacher.requires_grad_(False)
    student = pruned_student(teacher, tokenizer, source)
    train = build_data(tokenizer, "alpaca", args.seq_len, val_fraction=0.0, seed=config.seed).train
    schedule = _Schedule(len(train), 1, 1, 1, 0, config.seed)
    todo = [row for row in args.rows.split(",") if not results.done(row)]
    measured: dict[str, list[float]] = {row: [] for row in todo}
    for round_ in range(args.rounds):
        for row in todo:
            if row.startswith("recover"):
                seconds, tokens = time_recover(row, student, teacher, tokenizer, config, args.steps)
            else:
                seconds, tokens = time_bare(row, student, teacher, train, schedule, config, args.steps)
            measured[row].append(tokens / seconds)
            print(f"round {round_ + 1}: {row}: {tokens / seconds:.1f} tok/s", flush=True)
    for row in todo:
        results.put({"key": row, "tokens_per_s": statistics.median(measured[row]), "rounds_tokens_per_s": measured[row]})
    Path(args.output).with_suffix(".md").write_text(render(results.data))
    print(Path(args.output).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
