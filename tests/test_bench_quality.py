"""bench/bench_quality.py's --sweep on the tiny generated task (CPU, under a minute): the grid runs on a dev split
carved from train, the table's rows then train at its picks, and the results file says which rates were used."""
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def test_sweep_picks_the_rates_the_table_then_uses(tmp_path):
    from bench import bench_quality
    from bitdistill import tiny

    files = tiny.generate_data(tmp_path / "data", seed=0, n_train=400, n_eval=60, n_corpus=10)
    out = tmp_path / "out"
    status = bench_quality.main([
        "--config", str(ROOT / "bitdistill" / "configs" / "tiny.yaml"), "--rows", "FP-SFT,BitNet-SFT", "--sweep",
        "--sweep_train_examples", "200", "--sweep_dev_examples", "100", "--results", str(tmp_path / "results"),
        "--set", f"output_dir={out}", "--set", f"task.train_file={files['sentiment_train']}",
        "--set", f"task.eval_file={files['sentiment_eval']}", "--set", "train.max_steps=4",
        "--set", "task.max_eval_examples=30", "--set", "backend=torch"])
    assert status == 0
    sweep = json.loads((out / "sweep.json").read_text())
    grid = bench_quality.SWEEP_GRID
    assert set(sweep["runs"]) == {f"{stage}@{lr:g}" for stage, lrs in grid.items() for lr in lrs}
    for stage in grid:  # the pick is the grid's best dev accuracy
        assert sweep[stage] == max(grid[stage], key=lambda lr: sweep["runs"][f"{stage}@{lr:g}"])
    # the sweep saw its own dev split (the end of train), never the eval file
    dev = (out / "sweep-data" / "dev.jsonl").read_text().splitlines()
    train = Path(files["sentiment_train"]).read_text().splitlines()
    assert [json.loads(r)["text"] for r in dev] == [json.loads(r)["text"] for r in train[-100:]]
    resolved = yaml.safe_load((out / "seed0" / "main" / "config.resolved.yaml").read_text())
    assert resolved["sft"]["lr"] == sweep["sft"] and resolved["bitnet_sft"]["lr"] == sweep["bitnet-sft"]
    result = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert result["sweep"]["sft"] == sweep["sft"] and set(result["rows"]) == {"FP-SFT", "BitNet-SFT"}
    assert f"bitnet_sft.lr={sweep['bitnet-sft']}" in result["learning_rate_overrides"]
