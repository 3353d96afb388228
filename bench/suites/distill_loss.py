"""Logits distillation (BitDistill stage 3): fused LM heads + temperature KL + CE vs the PyTorch reference.

fused_linear_distill_loss fwd+bwd at Qwen-vocabulary shapes (V=151936, bf16, tau=5, 5% of labels ignored):
- "ours": the chunked Triton op at its default chunk; "ours_c<C>": the same op at C tokens per chunk (memory for time);
- "ref_eager" / "ref_compile": ``bitkernels.reference.fused_linear_distill_loss`` (full float32 logits), eager and
  under torch.compile;
- "gemms_only": just the four cuBLAS products the op must do (student and teacher logits, grad_h, grad_w) in the
  default chunks: the matmul floor as this cuBLAS reaches it.
- peers (bench/peers.py, where installed): Liger's fused_linear_jsd (KL only) and chunked LigerFusedLinearJSDLoss
  (CE + KL) at beta=0 (forward KL) and the same temperature; those not installed are listed as peers_skipped.
flops counts those four products (2*N*V*(3*H_s + H_t)); peak memory is what compare.py records.
Also: the chunk kernel alone on one default chunk, and distill_kl fwd+bwd on materialized bf16 logits (memory-bound:
bytes = read s, t twice (fwd, bwd) + write grad).
"""
from __future__ import annotations

import torch

import bitkernels.reference as ref
from bench.harness import Case
from bench.peers import distill_loss_peers, skip_reason
from bitkernels.ops import distill_loss as ops_dl

SHAPES = {"qwen3-1.7b": (8192, 2048, 151936), "qwen3-0.6b": (4096, 1024, 151936)}
CHUNKS = (256, 512, 1024, 2048, 4096)
TEMPERATURE = 5.0


def _inputs(n, h, v, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rnd(n, h).requires_grad_()
    ws = rnd(v, h, scale=h ** -0.5).requires_grad_()
    ht = rnd(n, h)
    wt = rnd(v, h, scale=h ** -0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = -100
    return hs, ws, ht, wt, labels.to(device)


def _fwd_bwd(fn, hs, ws, ht, wt, labels, **kw):
    def run():
        hs.grad = None
        ws.grad = None
        total, _, _ = fn(hs, ws, ht, wt, labels, TEMPERATURE, 1.0, 1.0, -100, **kw)
        total.backward()
    return run


def _gemms_only(hs, ws, ht, wt, chunk):
    """The four products of the fused op in its chunks, nothing else: what cuBLAS makes of the matmul floor."""
    hs_, ws_ = hs.detach(), ws.detach()

    def run():
        zs = torch.empty(chunk, ws_.shape[0], device=hs_.device, dtype=hs_.dtype)
        zt = torch.empty_like(zs)
        gw = torch.zeros_like(ws_)
        gh = torch.empty_like(hs_)
        for s in range(0, hs_.shape[0], chunk):
            e = min(s + chunk, hs_.shape[0])
            torch.mm(hs_[s:e], ws_.t(), out=zs[: e - s])
            torch.mm(ht[s:e], wt.t(), out=zt[: e - s])
            torch.mm(zs[: e - s], ws_, out=gh[s:e])
            gw.addmm_(zs[: e - s].t(), hs_[s:e])
        return gw
    return run


def _peer_step(loss, hs, ws):
    def run():
        hs.grad = None
        ws.grad = None
        loss().backward()
    return run


def cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16
    shapes = {"tiny": (64, 32, 1000)} if quick else SHAPES
    chunks = (16, 32) if quick else CHUNKS
    ref_compiled = torch.compile(ref.fused_linear_distill_loss, dynamic=False)
    for model, (n, h, v) in shapes.items():
        hs, ws, ht, wt, labels = _inputs(n, h, v, device, dtype)
        default = ops_dl.default_chunk_size(n, v)
        impls = {
            "ours": _fwd_bwd(ops_dl.fused_linear_distill_loss, hs, ws, ht, wt, labels),
            **{f"ours_c{c}": _fwd_bwd(ops_dl.fused_linear_distill_loss, hs, ws, ht, wt, labels, chunk_size=c)
               for c in chunks if c != default},
            "ref_eager": _fwd_bwd(ref.fused_linear_distill_loss, hs, ws, ht, wt, labels),
            "ref_compile": _fwd_bwd(ref_compiled, hs, ws, ht, wt, labels),
            "gemms_only": _gemms_only(hs, ws, ht, wt, default),
        }
        peers, peers_skipped = distill_loss_peers(hs, ws, ht, wt, labels, TEMPERATURE)
        values = {}
        for name, loss in list(peers.items()):  # a peer that cannot run here is skipped with why, not timed
            try:
                with torch.no_grad():
                    values[name] = f"{loss().item():.4g}"
            except Exception as exc:
                peers_skipped[name] = skip_reason(exc)
                del peers[name]
        impls.update({name: _peer_step(loss, hs, ws) for name, loss in peers.items()})
        if peers:  # the peers' reductions differ from ours (sum vs mean, tau^2): values printed for the record
            with torch.no_grad():
                total, kd, ce = ops_dl.fused_linear_distill_loss(hs, ws, ht, wt, labels, TEMPERATURE, 1.0, 1.0, -100)
            print(f"check distill peers, {model}: ours total {total.item():.4g} kd {kd.item():.4g} "
                  f"ce {ce.item():.4g}; peers {values}", flush=True)
        notes = {"default_chunk": default, "temperature": TEMPERATURE}
        if peers_skipped:
            notes["peers_skipped"] = peers_skipped
        yield Case("distill", "fused_linear_distill fwd+bwd", f"{model} N={n} H={h} V={v}", impls,
                   flops=2.0 * n * v * (3 * h + h), notes=notes)

        # The chunk kernel alone on one default chunk: 5 passes of C*V bf16 (read s, t twice; write grad).
        zs = torch.randn(default, v, device=device, dtype=dtype) * 4
        zt = torch.randn(default, v, device=device, dtype=dtype) * 4
        y = labels[:default]
        kd = torch.empty(default, device=device, dtype=torch.float32)
        ce = torch.empty_like(kd)
        zs_work = zs.clone()

        def chunk_kernel(zs=zs, zt=zt, y=y, kd=kd, ce=ce, work=zs_work):
            work.copy_(zs)  # the kernel overwrites the student logits; the copy is timed separately below
            ops_dl.distill_ce_chunk_(work, zt, y, kd, ce, TEMPERATURE, TEMPERATURE, 1.0, -100)
        def with_block(block, fn=chunk_kernel):
            def run():
                saved, ops_dl.MAX_BLOCK_V = ops_dl.MAX_BLOCK_V, block
                try:
                    fn()
                finally:
                    ops_dl.MAX_BLOCK_V = saved
            return run
        blocks = (64, 256) if quick else (1024, 2048, 8192)
        yield Case("distill", "chunk kernel (+ restoring copy)", f"{model} C={default} V={v}", {
            "ours": chunk_kernel,
            **{f"ours_block{b}": with_block(b) for b in blocks},
            "copy_only": lambda zs=zs, work=zs_work: work.copy_(zs),
        }, bytes_moved=5.0 * default * v * zs.element_size() + 2.0 * default * v * zs.element_size())

        # distill_kl on materialized logits.
        s = (torch.randn(n, v, device=device, dtype=dtype) * 4).requires_grad_()
        t = torch.randn(n, v, device=device, dtype=dtype) * 4
        mask = (labels != -100)
        ref_kl_compiled = torch.compile(ref.distill_kl, dynamic=False)

        def kl_fwd_bwd(fn, s=s, t=t, mask=mask):
            def run():
                s.grad = None
                fn(s, t, TEMPERATURE, mask).backward()
            return run
        yield Case("distill", "distill_kl fwd+bwd", f"{model} N={n} V={v}", {
            "ours": kl_fwd_bwd(ops_dl.distill_kl),
            "ref_eager": kl_fwd_bwd(ref.distill_kl),
            "ref_compile": kl_fwd_bwd(ref_kl_compiled),
        }, bytes_moved=5.0 * n * v * s.element_size())
