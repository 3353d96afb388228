"""A small, strict GGUF reader (no dependency on gguf-py) for checking what ``cpu_ref.gguf_export`` wrote.

It parses the header, the metadata and the tensor table of a GGUF v2/v3 file and decodes the tensor types the
exporter writes: TQ1_0 and TQ2_0 (ternary, 256 values a block), bitnet.cpp's I2_S, Q8_0, F16, F32. Anything out
of bounds, a wrong magic, an unknown type, a tensor whose data would run past the end of the file, or a size that
does not match its type raises :class:`GGUFError` naming the file (and the tensor).

Ternary blocks (ggml's layout, ``ggml-common.h``):

    TQ1_0  54 bytes: qs[48] (5 trits a byte, base-3, scaled to 0..255), qh[4] (4 trits a byte), d (fp16)
    TQ2_0  66 bytes: qs[64] (4 values a byte, 2 bits each, value + 1), d (fp16)
    I2_S   bitnet.cpp's type 36, per tensor: blocks of 128 values in 32 bytes (byte j: values j, 32 + j, 64 + j,
           96 + j at bits 6, 4, 2, 0, each value + 1), then the fp32 scale and 28 bytes of padding: n / 4 + 32 bytes

``ternary_codes`` returns the codes (int8 in {-1, 0, 1}) and the per-block fp16 scales (I2_S: its one fp32 scale,
shape [1, 1]), so a round trip can be checked bit for bit; ``dequantize`` returns ``codes * d`` as float32.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"GGUF"
QK_K = 256
# ggml type id -> (name, values per block, bytes per block)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 8: ("Q8_0", 32, 34), 34: ("TQ1_0", QK_K, 54), 35: ("TQ2_0", QK_K, 66),
         36: ("I2_S", 128, 32)}  # I2_S: 32 bytes a 128-value block, plus 32 bytes a tensor (see tensor_nbytes)
TYPE_IDS = {name: tid for tid, (name, _, _) in TYPES.items()}
# GGUF metadata value types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def tensor_nbytes(type_id: int, n_values: int) -> int:
    """Bytes of a tensor of ``n_values`` (a whole number of blocks) in ggml type ``type_id``."""
    _, per_block, block_bytes = TYPES[type_id]
    return n_values // per_block * block_bytes + (32 if TYPES[type_id][0] == "I2_S" else 0)


class GGUFError(ValueError):
    """A GGUF file that this reader cannot accept (bad magic, truncated, inconsistent sizes, unknown types)."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: rows first (ggml's ne reversed)
    type_id: int
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPES[self.type_id][0]


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    alignment: int = 32

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8, one row of blocks per row of the tensor)."""
        t = self._info(name)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise GGUFError(f"{self.path}: tensor {name!r} is truncated ({len(data)} of {t.nbytes} bytes)")
        if t.type_name == "I2_S":  # one stream with the tensor's scale after it: not rows of blocks
            return np.frombuffer(data, dtype=np.uint8)
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        return np.frombuffer(data, dtype=np.uint8).reshape(rows, -1)

    def ternary_codes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes int8 [rows, cols] in {-1, 0, 1}, block scales float16 [rows, cols // 256]) of a TQ1_0/TQ2_0 tensor;
        of an I2_S tensor, (codes, its one float32 scale [1, 1])."""
        t = self._info(name)
        if t.type_name == "I2_S":
            return _decode_i2_s(self.raw(name), t.shape, f"{self.path}: tensor {name!r}")
        if t.type_name not in ("TQ1_0", "TQ2_0"):
            raise GGUFError(f"{self.path}: tensor {name!r} is {t.type_name}, not a ternary type (TQ1_0 / TQ2_0 / "
                            "I2_S)")
        blocks = self.raw(name).reshape(-1, TYPES[t.type_id][2])
        codes, d = (_decode_tq1 if t.type_name == "TQ1_0" else _decode_tq2)(blocks)
        rows, cols = int(np.prod(t.shape[:-1])), t.shape[-1]
        return codes.reshape(rows, cols), d.reshape(rows, cols // QK_K)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, in its numpy shape."""
        t = self._info(name)
        kind = t.type_name
        if kind == "I2_S":
            codes, scale = self.ternary_codes(name)
            out = codes.astype(np.float32) * scale
        elif kind in ("TQ1_0", "TQ2_0"):
            codes, d = self.ternary_codes(name)
            out = codes.reshape(codes.shape[0], -1, QK_K).astype(np.float32) * d.astype(np.float32)[..., None]
        elif kind == "Q8_0":
            blocks = self.raw(name).reshape(-1, 34)
            d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
            out = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d
        else:
            out = self.raw(name).copy().view(np.float32 if kind == "F32" else np.float16).astype(np.float32)
        return out.reshape(t.shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor {name!r} (has {len(self.tensors)} tensors)")
        return self.tensors[name]


def _decode_tq2(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    qs = blocks[:, :64].reshape(n, 2, 1, 32)  # two halves of 128 values; byte j of a half holds values j + 32 * l
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(n, QK_K)
    if (q == 3).any():
        raise GGUFError("TQ2_0 block holds the unused 2-bit value 3 (not a ternary code)")
    return q.astype(np.int8) - 1, blocks[:, 64:66].copy().view(np.float16).reshape(n)


def _decode_i2_s(data: np.ndarray, shape: tuple[int, ...], where: str) -> tuple[np.ndarray, np.ndarray]:
    n = int(np.prod(shape))
    packed = data[:n // 4].reshape(-1, 1, 32)
    q = (packed >> np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)) & 3  # [block, value // 32, j]
    if (q == 3).any():
        raise GGUFError(f"{where}: I2_S holds the unused 2-bit value 3 (not a ternary code)")
    scale = data[n // 4:n // 4 + 4].copy().view(np.float32).reshape(1, 1)
    return q.astype(np.int8).reshape(int(np.prod(shape[:-1])), shape[-1]) - 1, scale


def _decode_tq1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)

    def trits(b: np.ndarray, k: int) -> np.ndarray:  # b [n, m] -> [n, k, m]: trit i of each byte, i-major
        t = (b.astype(np.uint16)[:, None, :] * pow3[:k, None]) & 0xFF  # ggml's "q = x * pow3[i]" on a uint8
        return ((t * 3) >> 8).astype(np.int8)

    qs0 = trits(blocks[:, :32], 5).reshape(n, 160)    # values 0..159
    qs1 = trits(blocks[:, 32:48], 5).reshape(n, 80)   # values 160..239
    qh = trits(blocks[:, 48:52], 4).reshape(n, 16)    # values 240..255
    return np.concatenate([qs0, qs1, qh], axis=1) - 1, blocks[:, 52:54].copy().view(np.float16).reshape(n)


class _Cursor:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise GGUFError(f"{self.path}: truncated while reading {what} at byte {self.pos} (file has "
                            f"{len(self.data)} bytes)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: {what} is not UTF-8") from exc

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype, n = self.scalar("<I", what), self.scalar("<Q", what)
            if itype in _SCALARS and itype != 7:  # fixed-size items: one slice
                size = struct.calcsize(_SCALARS[itype])
                return np.frombuffer(self.take(n * size, what), dtype=np.dtype(_SCALARS[itype])).tolist()
            return [self.value(itype, what) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} in {what}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header, metadata and tensor table of ``path`` and check every tensor's extent against the file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(min(size, 64 << 20))  # metadata (vocab included) is far below this; tensors are read lazily
    cur = _Cursor(head, path)
    if size < 24 or head[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise GGUFError(f"{path}: implausible header ({n_tensors} tensors, {n_kv} metadata entries)")
    out = GGUFFile(path, version)
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        out.metadata[key] = cur.value(cur.scalar("<I", f"type of {key}"), key)
    out.alignment = int(out.metadata.get("general.alignment", 32))
    if out.alignment <= 0 or out.alignment & (out.alignment - 1):
        raise GGUFError(f"{path}: general.alignment {out.alignment} is not a power of two")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("<I", f"dims of {name}")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4)")
        ne = [cur.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
        type_id, rel = cur.scalar("<I", f"type of {name}"), cur.scalar("<Q", f"offset of {name}")
        if type_id not in TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has ggml type {type_id}, which this reader does not decode "
                            f"(it reads {', '.join(n for n, _, _ in TYPES.values())})")
        if name in out.tensors or name in {t[0] for t in infos}:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        infos.append((name, ne, type_id, rel))
    data_start = -(-cur.pos // out.alignment) * out.alignment
    for name, ne, type_id, rel in infos:
        tname, per_block, block_bytes = TYPES[type_id]
        if ne[0] % per_block:
            raise GGUFError(f"{path}: tensor {name!r} ({tname}) has rows of {ne[0]} values, not a multiple of "
                            f"the block size {per_block}")
        nbytes = tensor_nbytes(type_id, int(np.prod(ne, dtype=np.int64)))
        if rel % out.alignment:
            raise GGUFError(f"{path}: tensor {name!r} offset {rel} is not aligned to {out.alignment}")
        if data_start + rel + nbytes > size:
            raise GGUFError(f"{path}: tensor {name!r} ({tname} {ne[::-1]}, {nbytes} bytes at {data_start + rel}) "
                            f"runs past the end of the file ({size} bytes): truncated")
        out.tensors[name] = TensorInfo(name, tuple(ne[::-1]), type_id, data_start + rel, nbytes)
    return out
