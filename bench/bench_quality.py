"""The BitDistill quality table on a real model and task: FP-SFT, BitNet-SFT, BitDistill and its ablations, with
accuracy (and macro-F1), training tokens and time per row, resumable across calls.

    python bench/bench_quality.py --config bitdistill/configs/smollm2-135m-tweets.yaml [--rows main|all|A,B]
        [--seeds 42,43] [--resume] [--time_budget_min 9] [--sweep] [--set key=value ...]

Rows (each a set of ``bitdistill/train.py`` runs under ``<output_dir>/seed<s>/``; later rows reuse earlier outputs):
  FP-SFT       sft: the full-precision model fine-tuned on the task (also the teacher of every distill row)
  BitNet-SFT   bitnet-sft: SubLN + BitLinear, fine-tuned on the task without distillation
  BitDistill   pretrain (Stage 2) then distill (Stage 3: CE + lambda*LD + gamma*AD from the FP-SFT teacher)
  no-LD        as BitDistill with lambda = 0          no-AD      as BitDistill with gamma = 0
  no-Stage-2   Stage 3 straight after Stage 1 (distill.student = convert)
  no-SubLN     Stage 2 and 3 without the SubLN norms (convert.subln = false)
  allnorm      Stage 2 and 3 with an RMSNorm before every projection (the authors' shipped layout); not in "main"
The first seed runs every row; further seeds (``--seeds``) rerun FP-SFT, BitNet-SFT and BitDistill (Stage 2 is
shared with the first seed: the spread is that of the task stages). ``--time_budget_min`` stops cleanly (a
checkpoint, exit code 3) when the budget is spent; ``--resume`` continues where it stopped.

``--sweep`` instead picks the learning rates of sft and bitnet-sft (the BitNet lr also drives pretrain and distill)
by a small grid on a dev split carved from the end of the train split (the eval split is never seen), and writes
``<output_dir>/sweep.json``; the table then reads its choices unless ``--set`` overrides them.

Writes ``bench/results/quality/<model>-<task>-<date>.json`` (rows, loss terms at the first and last steps, goals,
device, commit) and a ``.png`` beside it, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import git_provenance, write_json  # noqa: E402

MAIN_ROWS = ("FP-SFT", "BitNet-SFT", "BitDistill")
ABLATIONS = ("no-LD", "no-AD", "no-Stage-2", "no-SubLN")
EXTRA_ROWS = ("allnorm",)
SEED_ROWS = MAIN_ROWS
SWEEP_GRID = {"sft": (3e-5, 1e-4, 3e-4), "bitnet-sft": (1e-4, 3e-4, 1e-3)}
RESUMABLE_EXIT = 3


class OutOfTime(Exception):
    pass


def row_runs(row: str, seed_dir: Path, first_seed_dir: Path) -> list[tuple[str, list[str], list[str]]]:
    """(run directory name, stages, --set overrides) of a row, in order."""
    main = seed_dir / "main"
    teacher = f"distill.teacher={main / 'sft' / 'model'}"
    pretrained = f"distill.student={first_seed_dir / 'main' / 'pretrain' / 'model'}"
    if row == "FP-SFT":
        return [("main", ["sft"], [])]
    if row == "BitNet-SFT":
        return [("main", ["bitnet-sft"], [])]
    if row == "BitDistill":
        if seed_dir == first_seed_dir:
            return [("main", ["pretrain", "distill"], [])]
        return [("main", ["distill"], [pretrained])]
    if row == "no-LD":
        return [("no-ld", ["distill"], [teacher, pretrained, "distill.lambda_ld=0"])]
    if row == "no-AD":
        return [("no-ad", ["distill"], [teacher, pretrained, "distill.gamma_ad=0"])]
    if row == "no-Stage-2":
        return [("no-stage2", ["distill"], [teacher, "distill.student=convert"])]
    if row == "no-SubLN":
        return [("no-subln", ["pretrain", "distill"], [teacher, "convert.subln=false"])]
    if row == "allnorm":
        return [("allnorm", ["pretrain", "distill"], [teacher, "convert.layout=allnorm"])]
    raise ValueError(f"unknown row {row!r}; rows are {MAIN_ROWS + ABLATIONS + EXTRA_ROWS}")


def metric_stage(row: str) -> str:
    return {"FP-SFT": "sft", "BitNet-SFT": "bitnet-sft"}.get(row, "distill")


def run_training(config: str, out: Path, stages: list[str], overrides: list[str], deadline: float | None) -> dict:
    from accelerate.state import AcceleratorState

    from bitdistill import train as T

    if deadline is not None and time.time() > deadline - 15:
        raise OutOfTime(f"{out}: {','.join(stages)} not started (time budget spent)")
    argv = ["--config", config, "--output_dir", str(out), "--stages", ",".join(stages), "--resume"]
    for item in overrides + ([f"train.deadline={deadline}"] if deadline is not None else []):
        argv += ["--set", item]
    AcceleratorState._reset_state(True)  # one Accelerator per run: a new mixed-precision/device state each time
    results = T.main(argv)
    if any(r.get("stopped_early") for r in results.values()):
        raise OutOfTime(f"{out}: stopped at the time budget (checkpointed; rerun with --resume)")
    return results


def stage_result(run_dir: Path, stage: str) -> dict | None:
    f = run_dir / stage / "result.json"
    return json.loads(f.read_text()) if f.is_file() else None


def loss_terms(run_dir: Path, cfg: dict) -> dict | None:
    """Each distill loss term at step 1 and over the last 10 steps, raw and weighted (lambda*LD, gamma*AD)."""
    f = run_dir / "distill" / "history.json"
    if not f.is_file():
        return None
    import yaml

    from bitdistill.config import parse_config

    history = json.loads(f.read_text())
    resolved = run_dir / "config.resolved.yaml"  # from the run's own train.py call: the row's overrides included
    loss = parse_config(yaml.safe_load(resolved.read_text()) if resolved.is_file() else cfg).distill.loss
    weights = {"ce": 1.0, "ld": loss.lambda_ld, "ad": loss.gamma_ad}

    def summary(records):
        out = {}
        for k, w in weights.items():
            values = [r[k] for r in records if k in r]
            if values:
                mean = sum(values) / len(values)
                out[k] = mean
                out[f"weighted_{k}"] = w * mean
        return out

    return {"step_1": summary(history[:1]), "last_10_steps": summary(history[-10:]), "steps": len(history)}


def collect_row(row: str, cfg: dict, out: Path, seeds: list[int]) -> dict:
    first = out / f"seed{seeds[0]}"
    per_seed = []
    for s in (seeds if row in SEED_ROWS else seeds[:1]):
        seed_dir = out / f"seed{s}"
        runs = row_runs(row, seed_dir, first)
        results = [(seed_dir / d, st, ov) for d, st, ov in runs]
        final = stage_result(results[-1][0], metric_stage(row))
        if not final or "metrics" not in final:
            continue
        tokens = seconds = 0.0
        for run_dir, stages, _ in results:
            for st in stages:
                r = stage_result(run_dir, st) or {}
                tokens, seconds = tokens + r.get("tokens", 0), seconds + r.get("seconds", 0)
        if row in ("BitDistill", "no-LD", "no-AD") and not (row == "BitDistill" and seed_dir == first):
            r = stage_result(first / "main", "pretrain") or {}  # the shared Stage 2 counts toward every row using it
            tokens, seconds = tokens + r.get("tokens", 0), seconds + r.get("seconds", 0)
        entry = {"seed": s, **final["metrics"], "train_tokens": tokens, "train_seconds": seconds}
        terms = loss_terms(results[-1][0], cfg)
        if terms and metric_stage(row) == "distill":
            entry["loss_terms"] = terms
        per_seed.append(entry)
    if not per_seed:
        return {}
    acc = [e["accuracy"] for e in per_seed]
    row_out = {"accuracy": sum(acc) / len(acc), "train_tokens": per_seed[0]["train_tokens"],
               "train_seconds": per_seed[0]["train_seconds"], "seeds": per_seed}
    if "macro_f1" in per_seed[0]:
        row_out["macro_f1"] = sum(e["macro_f1"] for e in per_seed) / len(per_seed)
    if len(acc) > 1:
        row_out["accuracy_spread"] = max(acc) - min(acc)
    if "loss_terms" in per_seed[0]:
        row_out["loss_terms"] = per_seed[0]["loss_terms"]
    return row_out


def goals(rows: dict) -> dict:
    if not all(r in rows for r in MAIN_ROWS):
        return {}
    bd, fp, bn = (rows[r]["accuracy"] for r in MAIN_ROWS)
    out = {"BitDistill_minus_FP-SFT": bd - fp, "within_1_point_of_FP-SFT": bd >= fp - 1.0,
           "BitDistill_minus_BitNet-SFT": bd - bn, "at_least_3_points_above_BitNet-SFT": bd >= bn + 3.0}
    out["ablations_below_BitDistill"] = {r: rows[r]["accuracy"] < bd for r in ABLATIONS + EXTRA_ROWS if r in rows}
    return out


def markdown(rows: dict, three_class: bool) -> str:
    head = "| row | accuracy | " + ("macro-F1 | " if three_class else "") + "seeds (spread) | train tokens | time (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        spread = f"{len(r['seeds'])} ({r['accuracy_spread']:.2f})" if "accuracy_spread" in r else str(len(r["seeds"]))
        f1 = f"{r['macro_f1']:.2f} | " if three_class else ""
        lines.append(f"| {name} | {r['accuracy']:.2f} | {f1}{spread} | {r['train_tokens'] / 1e6:.2f}M | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(rows)
    acc = [rows[n]["accuracy"] for n in names]
    err = [rows[n].get("accuracy_spread", 0) / 2 for n in names]
    colors = ["tab:gray" if n == "FP-SFT" else "tab:orange" if n == "BitNet-SFT" else "tab:blue" if n == "BitDistill"
              else "tab:cyan" for n in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.4))
    ax.bar(names, acc, yerr=err, color=colors, capsize=3)
    low = min(acc) - 5
    ax.set_ylim(max(0, low), min(100, max(acc) + 3))
    for i, a in enumerate(acc):
        ax.text(i, a + 0.3, f"{a:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    plt.xticks(rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sweep(config: str, out: Path, cfg: dict, extra: list[str], deadline: float | None, dev_examples: int,
          train_examples: int) -> dict:
    """Learning-rate grid for sft and bitnet-sft on a dev split carved from the end of the train split."""
    from bitdistill.data import TaskSpec, load_task_split

    spec = TaskSpec(**cfg["task"])
    rows = load_task_split(spec, "train")
    if len(rows) < dev_examples + 100:
        raise SystemExit(f"--sweep: the train split has {len(rows)} rows, too few for a dev split of {dev_examples}")
    files = out / "sweep-data"
    files.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:min(train_examples, len(rows) - dev_examples)]), ("dev", rows[-dev_examples:])):
        with (files / f"{name}.jsonl").open("w") as f:
            for r in part:
                f.write(json.dumps({"text": r["text"], "label": r["label"], **(
                    {"text_pair": r["text_pair"]} if "text_pair" in r else {})}) + "\n")
    data = [f"task.train_file={files / 'train.jsonl'}", f"task.eval_file={files / 'dev.jsonl'}",
            "task.text_column=text", "task.label_column=label", "task.max_train_examples=null", "task.max_eval_examples=null"]
    if spec.text_pair_column:
        data.append("task.text_pair_column=text_pair")
    found = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {"runs": {}}
    for stage, grid in SWEEP_GRID.items():
        for lr in grid:
            key = f"{stage}@{lr:g}"
            if key not in found["runs"]:
                section = stage.replace("-", "_")
                res = run_training(config, out / "sweep" / key, [stage], data + extra + [f"{section}.lr={lr}"],
                                   deadline)
                found["runs"][key] = res[stage]["metrics"]["accuracy"]
                write_json(out / "sweep.json", found)
        best = max(grid, key=lambda lr: found["runs"][f"{stage}@{lr:g}"])
        found[stage] = best
    write_json(out / "sweep.json", found)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--rows", default="main+ablations", help="main | main+ablations | all | comma-separated names")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    p.add_argument("--resume", action="store_true", help="continue a table started earlier in the same output_dir")
    p.add_argument("--time_budget_min", type=float, default=None, help="stop cleanly (exit 3) after this long")
    p.add_argument("--sweep", action="store_true", help="pick the sft / bitnet-sft learning rates first (see above)")
    p.add_argument("--sweep_train_examples", type=int, default=6000)
    p.add_argument("--sweep_dev_examples", type=int, default=1000)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality"))
    p.add_argument("--name", default=None, help="model-task name of the results file (default: from output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    a = p.parse_args(argv)

    from bitdistill.train import load_config

    cfg = load_config(a.config, a.set)
    out = Path(cfg.get("output_dir", "outputs/quality"))
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [int(cfg.get("seed", 0))]
    rows = {"main": MAIN_ROWS, "main+ablations": MAIN_ROWS + ABLATIONS,
            "all": MAIN_ROWS + ABLATIONS + EXTRA_ROWS}.get(a.rows) or tuple(a.rows.split(","))
    for r in rows:
        row_runs(r, out, out)  # unknown row names fail before any training
    if out.exists() and any(out.iterdir()) and not a.resume:
        raise SystemExit(f"{out} already holds runs: pass --resume to continue them, or set output_dir elsewhere")
    deadline = time.time() + 60 * a.time_budget_min if a.time_budget_min else None
    started = time.time()
    status = 0
    lrs, found = [], None
    try:
        if a.sweep:
            found = sweep(a.config, out, cfg, a.set, deadline, a.sweep_dev_examples, a.sweep_train_examples)
            lrs = [f"sft.lr={found['sft']}", f"bitnet_sft.lr={found['bitnet-sft']}",
                   f"distill.lr={found['bitnet-sft']}"]
            print(f"sweep: sft lr {found['sft']:g}, bitnet-sft lr {found['bitnet-sft']:g} (dev accuracy "
                  f"{json.dumps(found['runs'])})")
        elif (out / "sweep.json").is_file():
            found = json.loads((out / "sweep.json").read_text())
            if "sft" in found and "bitnet-sft" in found:
                lrs = [f"sft.lr={found['sft']}", f"bitnet_sft.lr={found['bitnet-sft']}",
                       f"distill.lr={found['bitnet-sft']}"]
        user = a.set  # the user's --set wins over the sweep's choice
        plan = [(r, seeds[0]) for r in rows] + [(r, s) for s in seeds[1:] for r in rows if r in SEED_ROWS]
        for row, s in plan:
            seed_dir = out / f"seed{s}"
            for run_dir, stages, overrides in row_runs(row, seed_dir, out / f"seed{seeds[0]}"):
                print(f"[table] {row} seed {s}: {run_dir} {','.join(stages)}", flush=True)
                run_training(a.config, seed_dir / run_dir, stages, lrs + overrides + [f"seed={s}"] + user, deadline)
    except OutOfTime as e:
        print(f"[table] {e}. Continue with --resume.")
        status = RESUMABLE_EXIT
    table = {r: row for r in rows if (row := collect_row(r, cfg, out, seeds))}
    name = a.name or out.name
    date = datetime.date.today().isoformat()
    payload = {"model": cfg.get("model", {}).get("name_or_path"), "task": cfg.get("task", {}).get("train_file") or
               cfg.get("task", {}).get("name"), "device": device_name(), "date": date, "seeds": seeds,
               "complete": status == 0, "rows": table, "goals": goals(table), "config": cfg,
               # the sweep's choices override the config's learning rates (a user --set wins over both)
               "sweep": found, "learning_rate_overrides": [x for x in lrs if x.split("=")[0] not in
                                                           {u.split("=")[0] for u in a.set}],
               "wall_seconds_this_call": time.time() - started, "versions": _versions(), **git_provenance()}
    path = Path(a.results) / f"{name}-{date}.json"
    write_json(path, payload)
    plot(table, path.with_suffix(".png"), f"{name} ({payload['device']}, {date})")
    three = len((cfg.get("task", {}) or {}).get("label_words", [])) > 2
    print(f"\n{markdown(table, three)}\n\ngoals: {json.dumps(payload['goals'])}\nresults: {path}")
    return status


def _versions() -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
