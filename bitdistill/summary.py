"""The summary of a pipeline run: the FP-SFT / BitNet-SFT / BitDistill table and the loss / metric plot."""
from __future__ import annotations

import json
from pathlib import Path

STAGES = ("sft", "bitnet-sft", "pretrain", "distill")  # the pipeline's stages, in order
SUMMARY_ROWS = (("FP-SFT", "sft"), ("BitNet-SFT", "bitnet-sft"), ("BitDistill", "distill"))


def summary_table(results: dict, task_type: str) -> str:
    keys = ["accuracy"] if task_type == "classification" else ["rouge1", "rouge2", "rougeL"]
    lines = [f"{'model':<12}" + "".join(f"{k:>10}" for k in keys) + f"{'steps':>8}{'tok/s':>10}"]
    for label, stage in SUMMARY_ROWS:
        r = results.get(stage)
        if not r or "metrics" not in r:
            continue
        tps = r["tokens"] / r["seconds"] if r.get("seconds") else float("nan")
        lines.append(f"{label:<12}" + "".join(f"{r['metrics'][k]:>10.2f}" for k in keys)
                     + f"{r['steps']:>8}{tps:>10.0f}")
    return "\n".join(lines)


def write_plot(results: dict, out: Path, task_type: str) -> Path | None:
    """Loss curves of every stage run here and the task metric per model, in ``out/summary.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    stages = [s for s in STAGES if (out / s / "history.json").is_file()]
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4 * (len(stages) + 1), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        history = json.loads((out / stage / "history.json").read_text())
        steps = [h["step"] for h in history]
        for key in ("loss", "ce", "ld", "ad"):
            if key in history[0] and (key == "loss" or stage == "distill"):
                ax.plot(steps, [h[key] for h in history], label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    metric = "accuracy" if task_type == "classification" else "rougeL"
    rows = [(label, results[s]["metrics"][metric]) for label, s in SUMMARY_ROWS if "metrics" in results.get(s, {})]
    axes[0][-1].bar([r[0] for r in rows], [r[1] for r in rows], color=["tab:gray", "tab:orange", "tab:blue"][:len(rows)])
    axes[0][-1].set_title(metric)
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
