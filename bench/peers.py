"""Other open implementations of the same ops, timed beside ours in bench/compare.py when their package is installed.

Each loader returns ``({name: callable}, {name: why it is absent})``: a peer that cannot be imported or built is
skipped with its reason (recorded in the case's notes), never silently. Peers compute what ours computes on the same
tensors, so a row compares like with like:

BitLinear (SubLN RMSNorm, int8 per-token activations, absmean ternary weights, STE backward), ``fwd(x) -> y``:
    fla_fused_bitlinear   FLA's ``rms_norm_linear_quant`` (the op behind ``FusedBitLinear``): norm + activation
                          quantization fused in Triton, the matmul on fake-quantized bf16 operands (``fla-core``)
    onebitllms            Falcon's ``BitNetLinear`` after ``F.rms_norm`` (its Triton quantizers, bf16 matmul)
    torchao_bitnet        torchao's BitNet training prototype (``quantize_(linear, bitnet_training())``: int8
                          tensor-core forward) after ``F.rms_norm``
Logits distillation (lm heads + temperature KL, teacher -> student), ``step() -> loss`` with backward:
    liger_fused_linear_jsd  Liger's ``LigerFusedLinearJSDFunction`` at ``jsd_beta=0`` (forward KL, its convention),
                            KL only (ours also does CE in the same pass)
    liger_chunked_jsd       Liger's ``LigerFusedLinearJSDLoss`` (chunked_loss) at ``beta=0``: CE + KL, as ours
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F


BITLINEAR_PEERS = ("fla_fused_bitlinear", "onebitllms", "torchao_bitnet")
DISTILL_PEERS = ("liger_fused_linear_jsd", "liger_chunked_jsd")
PEERS = BITLINEAR_PEERS + DISTILL_PEERS


def plot_peer_ratios(rows: list[dict], path) -> bool:
    """One bar per (case, peer): the peer's time over ours (above 1: ours is faster), to ``path`` (a PNG). False when
    no row timed a peer or matplotlib is missing."""
    bars = [(f"{r['case']}\n{r['shape']}", peer, r["ms"][peer] / r["ms"]["ours"]) for r in rows
            for peer in PEERS if r["ms"].get(peer) and r["ms"].get("ours")]
    if not bars:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(c for c, _, _ in bars))
    peers = list(dict.fromkeys(p for _, p, _ in bars))
    width = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cases)), 4.5))
    for i, peer in enumerate(peers):
        xs = [cases.index(c) + i * width for c, p, _ in bars if p == peer]
        ax.bar(xs, [r for _, p, r in bars if p == peer], width, label=peer)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("peer time / ours (> 1: ours faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def skip_reason(exc: BaseException) -> str:
    """Why a peer is not timed, as the row's ``peers_skipped`` records it: the exception's first line."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _try(name: str, build: Callable[[], Callable], found: dict, skipped: dict) -> None:
    try:
        found[name] = build()
    except Exception as exc:  # an absent or incompatible peer is a note in the results, not a failed benchmark
        skipped[name] = skip_reason(exc)


def bitlinear_peers(w: torch.Tensor, nw: torch.Tensor, eps: float) -> tuple[dict, dict]:
    """``{name: (fwd, params)}`` of each installed BitLinear peer: ``fwd(x) -> y`` reads the latent weight ``w``
    [N, K] and the SubLN weight ``nw`` [K] themselves where the peer's API allows, otherwise a module whose
    parameters share their storage; ``params`` are the leaves its backward writes grads to (besides x)."""
    found: dict = {}
    skipped: dict = {}
    k = w.shape[1]

    def fla():
        fused = importlib.import_module("fla.modules.fused_bitlinear")
        return (lambda x: fused.rms_norm_linear_quant(x, nw, None, w, None, eps=eps)), (w, nw)

    def onebit():
        layer_cls = importlib.import_module("onebitllms").BitNetLinear
        if w.device.type != "cuda":
            raise RuntimeError("onebitllms' kernels run on CUDA only")
        layer = layer_cls(k, w.shape[0], bias=False).to(device=w.device, dtype=w.dtype)
        layer.weight = torch.nn.Parameter(w.detach(), requires_grad=True)
        # Its activation quantizer takes [batch, seq, hidden].
        return (lambda x: layer(F.rms_norm(x, (k,), nw, eps).unsqueeze(0)).squeeze(0)), (layer.weight, nw)

    def torchao():
        ao = importlib.import_module("torchao")
        bitnet = importlib.import_module("torchao.prototype.quantized_training").bitnet_training
        layer = torch.nn.Linear(k, w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        layer.weight = torch.nn.Parameter(w.detach(), requires_grad=True)
        ao.quantize_(layer, bitnet())
        return (lambda x: layer(F.rms_norm(x, (k,), nw, eps))), (layer.weight, nw)

    _try("fla_fused_bitlinear", fla, found, skipped)
    _try("onebitllms", onebit, found, skipped)
    _try("torchao_bitnet", torchao, found, skipped)
    return found, skipped


def distill_loss_peers(hs, ws, ht, wt, labels, temperature: float) -> tuple[dict, dict]:
    """Losses ``loss() -> scalar`` of each installed logits-distillation peer on the same student hidden states
    ``hs`` [N, H] and head ``ws`` [V, H], teacher ``ht``, ``wt`` and labels (-100 ignored)."""
    found: dict = {}
    skipped: dict = {}

    def liger_ops():
        fn = importlib.import_module("liger_kernel.ops.fused_linear_jsd").LigerFusedLinearJSDFunction
        return lambda: fn.apply(hs, ws, ht, wt, labels, 0.0, -100, temperature)

    def liger_chunked():
        loss_cls = importlib.import_module("liger_kernel.chunked_loss").LigerFusedLinearJSDLoss
        loss = loss_cls(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0, ignore_index=-100,
                        temperature=temperature)
        return lambda: loss(hs, ws, ht, wt, labels)

    _try("liger_fused_linear_jsd", liger_ops, found, skipped)
    _try("liger_chunked_jsd", liger_chunked, found, skipped)
    return found, skipped
