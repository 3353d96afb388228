"""Lossless packings of ternary codes {-1, 0, +1} (int8, shape [N, K], one row per output feature).

``i2`` (2 bits a weight, the I2_S / TQ2_0 idea; what the kernel runs on)
    Each code is stored as ``q = code + 1`` in {0, 1, 2}. A row is padded with code 0 to ``K_pad`` = K rounded up to
    256 and cut in blocks of 256 weights = 64 bytes; byte ``j`` of a block holds the weights ``j, j+64, j+128, j+192``
    of the block in bits 0-1, 2-3, 4-5, 6-7. Shape on disk: uint8 [N, K_pad / 4]. The value 3 never occurs.
    Why this order: one shift and one AND yield 64 contiguous weights, aligned with 64 contiguous int8 activations
    (see kernel.cpp), and ``q`` unsigned is the operand the u8 x s8 dot instructions want.

``tq1`` (1.6 bits a weight, base 3, the TQ1_0 idea; a storage format)
    Row padded with code 0 to a multiple of 5; byte ``i`` of a row holds the weights ``5i .. 5i+4`` as
    ``sum_j (code_{5i+j} + 1) * 3**j`` in [0, 242]. Shape on disk: uint8 [N, ceil(K / 5)]. Bytes 243..255 never
    occur. It is transcoded to ``i2`` when a model is loaded (the kernel needs shifts, not divisions by 3).

Both keep the scale separately (float32, [] per tensor or [N] per row): ``W ~= codes * scale``.
"""
from __future__ import annotations

import torch

I2_BLOCK = 256          # weights per block of the i2 layout
I2_BLOCK_BYTES = 64
TQ1_GROUP = 5           # trits per byte of the tq1 layout
PACKINGS = ("i2", "tq1")
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


class PackingError(ValueError):
    """Packed data that is not a valid encoding (corrupt or truncated file, wrong shape)."""


def i2_padded_k(k: int) -> int:
    return -(-k // I2_BLOCK) * I2_BLOCK


def tq1_row_bytes(k: int) -> int:
    return -(-k // TQ1_GROUP)


def packed_shape(packing: str, n: int, k: int) -> tuple[int, int]:
    if packing == "i2":
        return n, i2_padded_k(k) // 4
    if packing == "tq1":
        return n, tq1_row_bytes(k)
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out_features, in_features], got shape {tuple(codes.shape)}")
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8 (from bitkernels.reference.ternarize_absmean), got {codes.dtype}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"codes must be ternary in {{-1, 0, 1}}, got values in [{int(codes.min())}, "
                         f"{int(codes.max())}]")


def _check_packed(packed: torch.Tensor, packing: str, n: int, k: int) -> None:
    expect = packed_shape(packing, n, k)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expect:
        raise PackingError(f"{packing} packed weights for a [{n}, {k}] matrix must be uint8 of shape {expect}, "
                           f"got {packed.dtype} of shape {tuple(packed.shape)} (corrupt or mismatched file?)")


def pack_i2(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> uint8 [N, K_pad / 4] in the ``i2`` layout."""
    _check_codes(codes)
    n, k = codes.shape
    kp = i2_padded_k(k)
    q = torch.ones(n, kp, dtype=torch.uint8)          # padding: code 0 stored as 1
    q[:, :k] = (codes.cpu() + 1).to(torch.uint8)
    q = q.view(n, kp // I2_BLOCK, 4, I2_BLOCK_BYTES)  # [row, block, slot s, byte j] = weight 64 s + j
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).contiguous()


def unpack_i2(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, K_pad / 4] -> int8 codes [N, K]; raises PackingError on a value 3 or a bad shape."""
    n = packed.shape[0] if packed.dim() == 2 else -1
    _check_packed(packed, "i2", n, k)
    kp = i2_padded_k(k)
    p = packed.view(n, kp // I2_BLOCK, 1, I2_BLOCK_BYTES)
    q = (p >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = q.reshape(n, kp)
    if q.numel() and int(q.max()) > 2:
        raise PackingError("i2 packed weights contain the invalid 2-bit value 3 (corrupt file?)")
    codes = q.to(torch.int8) - 1
    if kp > k and codes.numel() and bool((codes[:, k:] != 0).any()):
        raise PackingError("i2 packed weights have nonzero padding past in_features (corrupt or mismatched file?)")
    return codes[:, :k].contiguous()


def pack_tq1(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> uint8 [N, ceil(K / 5)] in the ``tq1`` (base-3) layout."""
    _check_codes(codes)
    n, k = codes.shape
    nb = tq1_row_bytes(k)
    t = torch.ones(n, nb * TQ1_GROUP, dtype=torch.int32)
    t[:, :k] = codes.cpu().to(torch.int32) + 1
    return (t.view(n, nb, TQ1_GROUP) * _POW3).sum(-1).to(torch.uint8)


def _tq1_table() -> torch.Tensor:
    v = torch.arange(243, dtype=torch.int32).unsqueeze(1)
    return ((v // _POW3) % 3).to(torch.int8) - 1  # [243, 5] codes of each valid byte


_TQ1_TABLE = _tq1_table()


def unpack_tq1(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K / 5)] -> int8 codes [N, K]; raises PackingError on a byte > 242 or a bad shape."""
    n = packed.shape[0] if packed.dim() == 2 else -1
    _check_packed(packed, "tq1", n, k)
    if packed.numel() and int(packed.max()) > 242:
        raise PackingError(f"tq1 packed weights contain the byte {int(packed.max())} > 242, not 5 base-3 digits "
                           "(corrupt file?)")
    codes = _TQ1_TABLE[packed.long()].reshape(n, -1)
    if codes.shape[1] > k and bool((codes[:, k:] != 0).any()):
        raise PackingError("tq1 packed weights have nonzero padding past in_features (corrupt or mismatched file?)")
    return codes[:, :k].contiguous()


def pack(codes: torch.Tensor, packing: str) -> torch.Tensor:
    if packing == "i2":
        return pack_i2(codes)
    if packing == "tq1":
        return pack_tq1(codes)
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


def unpack(packed: torch.Tensor, k: int, packing: str) -> torch.Tensor:
    if packing == "i2":
        return unpack_i2(packed, k)
    if packing == "tq1":
        return unpack_tq1(packed, k)
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
