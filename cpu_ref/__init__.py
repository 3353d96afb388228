"""cpu_ref: run a distilled BitNet student on the CPU from packed ternary weights, and measure the win.

- ``packing``: lossless 2-bit (``i2``) and base-3 (``tq1``, 1.6 bits) packings of ternary codes.
- ``ops``: the C++ kernel (built at first use with g++ -O3 -march=native -fopenmp; see ``_build``).
- ``model``: PackedBitLinear, ``pack_model`` / ``save_packed`` / ``load_packed`` (safetensors next to the HF config).
- ``runner``: greedy generation, classification, and the CLI ``python -m cpu_ref {pack,generate,classify,bench}``.
"""
from .model import PackedBitLinear, linear_weight_bytes, load_packed, pack_model, save_packed, set_threads
from .packing import PackingError, pack_i2, pack_tq1, unpack_i2, unpack_tq1

__all__ = ["PackedBitLinear", "PackingError", "linear_weight_bytes", "load_packed", "pack_i2", "pack_model",
           "pack_tq1", "save_packed", "set_threads", "unpack_i2", "unpack_tq1"]
