"""cpu_ref: run a distilled BitNet student on the CPU from packed ternary weights, and measure the win.

- ``packing``: lossless 2-bit (``i2``) and base-3 (``tq1``, 1.6 bits) packings of ternary codes.
- ``ops``: the C++ kernel (kernel.cpp: ternary product; head.cpp: float lm_head GEMV), built at first use with
  g++ -O3 -march=native -fopenmp (see ``_build``).
- ``model``: PackedBitLinear, KernelHead, ``pack_model`` / ``save_packed`` / ``load_packed`` (safetensors next to the
  HF config); ``fuse``: q/k/v and gate/up stacked into one product each.
- ``decoder``: the lean decode loop shared by every variant (static KV cache; ``layer_ops`` / layer.cpp: the decode
  step's norms, attention and SwiGLU as C calls); ``runner``: greedy generation, classification, and the CLI
  ``python -m cpu_ref {pack,generate,classify,bench,export-gguf,check-gguf}`` (the benchmark is
  bench/bench_cpu_ref.py).
- ``gguf_export`` / ``gguf_reader`` / ``gguf_check``: the student as a GGUF for stock llama.cpp (its bitnet
  architecture, TQ2_0 / TQ1_0 ternary blocks), a strict reader of those files, and the comparison in llama.cpp.
"""
from .model import PackedBitLinear, linear_weight_bytes, load_packed, pack_model, save_packed, set_threads
from .packing import PackingError, pack_i2, pack_tq1, unpack_i2, unpack_tq1

__all__ = ["PackedBitLinear", "PackingError", "linear_weight_bytes", "load_packed", "pack_i2", "pack_model",
           "pack_tq1", "save_packed", "set_threads", "unpack_i2", "unpack_tq1"]
