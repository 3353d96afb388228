"""Deployment benchmark of cpu_ref: packed ternary student vs torch fp32 / bf16 / fp16 on this CPU.

    python bench/bench_cpu_ref.py                       # random Qwen3-0.6B-shaped student, 1 and all threads
    python bench/bench_cpu_ref.py --student DIR         # a distilled student (bitdistill save_pretrained dir)
    python bench/bench_cpu_ref.py --preset tiny         # seconds; checks that the harness works

Prints a table and writes bench/results/cpu_ref-<cpu>-<date>.json. All options: cpu_ref/measure.py.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cpu_ref.measure import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
