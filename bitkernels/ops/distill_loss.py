"""Logits distillation in Triton: temperature KL (teacher -> student) and cross-entropy, one program per token row.

Two ops, defined exactly as their twins in ``bitkernels.reference.distill_loss`` (read its docstring for the
reduction: per-token mean over counted tokens, KD and CE sharing the denominator):

- ``distill_kl(student_logits, teacher_logits, temperature, mask)``: for users who already hold logits. The forward
  kernel makes ONE pass over each row (online log-sum-exps of s/tau and t/tau and the running expectation
  E_p[t/tau - s/tau]), saving two floats per row; the backward kernel makes one pass writing tau * (q - p).
- ``fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels, ...)``: never holds the [tokens, vocab] logits. It walks
  the tokens in chunks of ``chunk_size`` rows: both LM heads' logits of the chunk by cuBLAS, then one kernel that
  computes the row statistics and losses and overwrites the student logits with their gradient, then grad_h and
  grad_w of the chunk by cuBLAS. Everything happens in the forward (the loss is a scalar, so the backward only
  scales the saved gradients by grad_output), as Liger-Kernel's fused linear losses do.

Peak memory of the fused op: two [chunk, V] logit buffers + grad_w (the weight's dtype; float32 for float16 weights,
whose unscaled sums could overflow) + grad_h. Gradients in the logits buffer are stored unscaled (weights alpha and
tau, no 1/count) so that float16 keeps small probabilities; 1/count * grad_output is applied once at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._base import as_rows
from ._common import next_power_of_2, on_device

MAX_BLOCK_V = 4096  # widest vocabulary tile of the row kernels: longer rows are walked tile by tile
DEFAULT_CHUNK_ELEMENTS = 1 << 27  # logits per chunk buffer: 128M elements = 256 MB in bf16 (x2 for the teacher)


def _block_v(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernels: the row is walked in BLOCK_V-wide tiles."""
    block = min(MAX_BLOCK_V, next_power_of_2(max(n_cols, 16)))
    return block, max(1, min(8, block // 512))


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk: DEFAULT_CHUNK_ELEMENTS logits per buffer, a multiple of 128 rows (cuBLAS-friendly)."""
    rows = max(128, (DEFAULT_CHUNK_ELEMENTS // max(vocab, 1)) // 128 * 128)
    return max(1, min(rows, n_rows))


# ----------------------------------------------------------------------------------------------- row statistics

@triton.jit
def _online_kl_stats(s_row, t_row, n_cols, inv_t, BLOCK_V: tl.constexpr, RAW_LSE: tl.constexpr):
    """One pass over a row: log-sum-exps of s/tau and t/tau, KL(softmax(t/tau) || softmax(s/tau)) through the running
    E_p[t/tau - s/tau], and, if RAW_LSE, the log-sum-exp of s (the cross-entropy's, needed when tau != 1).
    Running max/sum rescaled as in online softmax. Each log-sum-exp is returned as (max, log(sum)), never added:
    with logits near 1e4 the sum max + log(sum) would round by ~1e-3, and exp(x - max - log(sum)) keeps full
    float32 accuracy because x - max is exact."""
    cols = tl.arange(0, BLOCK_V)
    m_s = float("-inf")
    l_s = 0.0
    m_t = float("-inf")
    l_t = 0.0
    a_t = 0.0  # sum exp(t' - m_t) * (t' - s'), rescaled with l_t
    m_c = float("-inf")
    l_c = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        msk = offs < n_cols
        s_raw = tl.load(s_row + offs, mask=msk, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + offs, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
        s = s_raw * inv_t
        m_s_new = tl.maximum(m_s, tl.max(s, 0))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new), 0)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        rescale = tl.exp(m_t - m_t_new)
        e_t = tl.exp(t - m_t_new)
        l_t = l_t * rescale + tl.sum(e_t, 0)
        # masked lanes are -inf - -inf = NaN before the where: select, never multiply, to drop them.
        a_t = a_t * rescale + tl.sum(tl.where(msk, e_t * (t - s), 0.0), 0)
        m_t = m_t_new
        if RAW_LSE:
            m_c_new = tl.maximum(m_c, tl.max(s_raw, 0))
            l_c = l_c * tl.exp(m_c - m_c_new) + tl.sum(tl.exp(s_raw - m_c_new), 0)
            m_c = m_c_new
    log_l_s = tl.log(l_s)
    log_l_t = tl.log(l_t)
    # KL = sum p (log p - log q) = E_p[t' - s'] - lse_t + lse_s; clamped: it is >= 0 up to rounding.
    kl = tl.maximum(a_t / l_t - (m_t - m_s) - (log_l_t - log_l_s), 0.0)
    if RAW_LSE:
        log_l_c = tl.log(l_c)
    else:
        m_c = m_s
        log_l_c = log_l_s
    return m_s, log_l_s, m_t, log_l_t, kl, m_c, log_l_c


# ------------------------------------------------------------------------- fused chunk kernel (loss + grad in place)

@triton.jit
def _distill_ce_chunk_kernel(s_ptr, t_ptr, labels_ptr, kd_ptr, ce_ptr, n_cols, stride_s, stride_t, inv_t,
                             kd_weight, ce_weight, ignore_index,
                             HAS_LABELS: tl.constexpr, RAW_LSE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of a chunk: KL_r and CE_r to kd_ptr/ce_ptr, then overwrite the student logits with the unscaled
    gradient kd_weight * (q - p) + ce_weight * (softmax(s) - onehot(y)) (kd_weight = alpha_kd * tau)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    cols = tl.arange(0, BLOCK_V)
    y = -1
    counted = True
    if HAS_LABELS:
        y = tl.load(labels_ptr + row).to(tl.int32)
        counted = y != ignore_index
    if counted:
        m_s, log_l_s, m_t, log_l_t, kl, m_c, log_l_c = _online_kl_stats(s_row, t_row, n_cols, inv_t, BLOCK_V,
                                                                          RAW_LSE)
        ce = 0.0
        if HAS_LABELS:
            in_range = (y >= 0) & (y < n_cols)  # out-of-range labels are refused by the checked API; never read OOB
            s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(tl.float32)
            ce = tl.where(in_range, (m_c - s_y) + log_l_c, 0.0)
        tl.store(kd_ptr + row, kl)
        tl.store(ce_ptr + row, ce)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            msk = offs < n_cols
            s_raw = tl.load(s_row + offs, mask=msk, other=0.0).to(tl.float32)
            t = tl.load(t_row + offs, mask=msk, other=0.0).to(tl.float32) * inv_t
            q = tl.exp((s_raw * inv_t - m_s) - log_l_s)
            grad = kd_weight * (q - tl.exp((t - m_t) - log_l_t))
            if HAS_LABELS:
                if RAW_LSE:
                    q_ce = tl.exp((s_raw - m_c) - log_l_c)
                else:
                    q_ce = q
                grad += ce_weight * (q_ce - tl.where(offs == y, 1.0, 0.0))
            tl.store(s_row + offs, grad.to(s_ptr.dtype.element_ty), mask=msk)
    else:  # padding: no loss, zero gradient (the chunk's grad GEMMs read every row)
        tl.store(kd_ptr + row, 0.0)
        tl.store(ce_ptr + row, 0.0)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            tl.store(s_row + offs, tl.zeros([BLOCK_V], dtype=s_ptr.dtype.element_ty), mask=offs < n_cols)


def distill_ce_chunk_(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      kd_out: torch.Tensor, ce_out: torch.Tensor, temperature: float, kd_weight: float,
                      ce_weight: float, ignore_index: int) -> None:
    """Launch the chunk kernel on [C, V] logits (unit column stride); student_logits is overwritten by its grad."""
    n_rows, n_cols = student_logits.shape
    if n_rows == 0:
        return
    block_v, num_warps = _block_v(n_cols)
    has_labels = labels is not None
    with on_device(student_logits):
        _distill_ce_chunk_kernel[(n_rows,)](
            student_logits, teacher_logits, labels if has_labels else kd_out, kd_out, ce_out, n_cols,
            student_logits.stride(0), teacher_logits.stride(0), 1.0 / temperature, kd_weight, ce_weight,
            ignore_index, HAS_LABELS=has_labels, RAW_LSE=has_labels and temperature != 1.0, BLOCK_V=block_v,
            num_warps=num_warps)


class FusedLinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_student, w_student, h_teacher, w_teacher, labels, b_student, b_teacher, temperature,
                alpha_kd, alpha_ce, ignore_index, chunk_size):
        hs = h_student.reshape(-1, h_student.shape[-1])
        ht = h_teacher.reshape(-1, h_teacher.shape[-1])
        n_rows, vocab = hs.shape[0], w_student.shape[0]
        y = labels.reshape(-1).contiguous() if labels is not None else None
        dev = hs.device
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5]

        kd_rows = torch.empty(n_rows, device=dev, dtype=torch.float32)
        ce_rows = torch.empty(n_rows, device=dev, dtype=torch.float32)
        grad_h = torch.empty_like(hs) if need_h else None
        # float16 gradient sums over many tokens could overflow: accumulate them in float32 there.
        acc_w = torch.float32 if w_student.dtype == torch.float16 else w_student.dtype
        grad_w = torch.empty(w_student.shape, device=dev, dtype=acc_w) if need_w else None
        grad_b = torch.zeros(vocab, device=dev, dtype=torch.float32) if need_b else None

        chunk = chunk_size or default_chunk_size(n_rows, vocab)
        chunk = max(1, min(chunk, n_rows))
        zs_buf = torch.empty(chunk, vocab, device=dev, dtype=hs.dtype)
        zt_buf = torch.empty(chunk, vocab, device=dev, dtype=ht.dtype)
        ws_t, wt_t = w_student.t(), w_teacher.t()
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            hs_c, ht_c = hs[start:end], ht[start:end]
            zs, zt = zs_buf[: end - start], zt_buf[: end - start]
            if b_student is None:
                torch.mm(hs_c, ws_t, out=zs)
            else:
                torch.addmm(b_student, hs_c, ws_t, out=zs)
            if b_teacher is None:
                torch.mm(ht_c, wt_t, out=zt)
            else:
                torch.addmm(b_teacher, ht_c, wt_t, out=zt)
            distill_ce_chunk_(zs, zt, y[start:end] if y is not None else None, kd_rows[start:end],
                              ce_rows[start:end], temperature, alpha_kd * temperature, alpha_ce, ignore_index)
            grad_z = zs  # now holds d(loss * count)/d(logits)
            if need_h:
                torch.mm(grad_z, w_student, out=grad_h[start:end])
            if need_w:
                if acc_w != grad_z.dtype:  # float16: products summed in float32
                    grad_w_c = torch.mm(grad_z.t(), hs_c).to(acc_w)
                    grad_w.copy_(grad_w_c) if start == 0 else grad_w.add_(grad_w_c)
                elif start == 0:  # the first chunk writes grad_w: no zero-fill pass over [V, H]
                    torch.mm(grad_z.t(), hs_c, out=grad_w)
                else:
                    grad_w.addmm_(grad_z.t(), hs_c)
            if need_b:
                grad_b.add_(grad_z.sum(0, dtype=torch.float32))
        del zs_buf, zt_buf
        if n_rows == 0 and need_w:  # no chunk ran: nothing wrote grad_w
            grad_w.zero_()

        if y is None:
            count = torch.full((), float(max(n_rows, 1)), device=dev, dtype=torch.float32)
        else:
            count = (y != ignore_index).sum().to(torch.float32).clamp_min(1.0)
        kd = kd_rows.sum() / count * temperature ** 2
        ce = ce_rows.sum() / count if y is not None else torch.zeros((), device=dev, dtype=torch.float32)
        total = alpha_ce * ce + alpha_kd * kd
        ctx.save_for_backward(grad_h, grad_w, grad_b, count)
        ctx.h_shape = h_student.shape
        ctx.dtypes = (h_student.dtype, w_student.dtype, None if b_student is None else b_student.dtype)
        ctx.mark_non_differentiable(kd, ce)
        ctx.used = False
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, grad_kd, grad_ce):
        # The saved gradients are scaled in place (no second [V, H] buffer at the peak), so they serve one backward.
        if ctx.used:
            raise RuntimeError("fused_linear_distill_loss supports a single backward per forward (its saved gradients "
                               "are scaled in place); call the loss again instead of retain_graph=True")
        ctx.used = True
        grad_h, grad_w, grad_b, count = ctx.saved_tensors
        scale = grad_total.to(torch.float32) / count  # the 1/count kept out of the logits buffers
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = grad_h.mul_(scale.to(grad_h.dtype)).view(ctx.h_shape)
        if grad_w is not None:
            grad_w = (grad_w.mul_(scale) if grad_w.dtype == torch.float32 else grad_w.mul_(scale.to(grad_w.dtype)))
            grad_w = grad_w.to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(scale).to(b_dtype)
        return grad_h, grad_w, None, None, None, grad_b, None, None, None, None, None, None


def fused_linear_distill_loss(h_student, w_student, h_teacher, w_teacher, labels=None, temperature=1.0,
                              alpha_kd=1.0, alpha_ce=1.0, ignore_index=-100, chunk_size=None, b_student=None,
                              b_teacher=None):
    """-> (total, kd, ce), chunked; see the module docstring. ``kd`` and ``ce`` are detached reports."""
    return FusedLinearDistillFunction.apply(
        h_student, w_student, h_teacher, w_teacher, labels, b_student, b_teacher, float(temperature),
        float(alpha_kd), float(alpha_ce), int(ignore_index), chunk_size)


# ------------------------------------------------------------------------------------ distill_kl on given logits

@triton.jit
def _distill_kl_fwd_kernel(s_ptr, t_ptr, mask_ptr, kl_ptr, stats_ptr, n_cols, stride_s, stride_t,
                           inv_t, BLOCK_V: tl.constexpr):
    """KL of row r in one pass; saves (max, log sum) of both softmaxes, 4 floats, for the backward."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(mask_ptr + row) != 0.0:
        m_s, log_l_s, m_t, log_l_t, kl, _, _ = _online_kl_stats(s_ptr + row * stride_s, t_ptr + row * stride_t,
                                                                n_cols, inv_t, BLOCK_V, False)
        tl.store(kl_ptr + row, kl)
        tl.store(stats_ptr + row * 4, m_s)
        tl.store(stats_ptr + row * 4 + 1, log_l_s)
        tl.store(stats_ptr + row * 4 + 2, m_t)
        tl.store(stats_ptr + row * 4 + 3, log_l_t)
    else:  # masked rows are skipped; their statistics are never read
        tl.store(kl_ptr + row, 0.0)


@triton.jit
def _distill_kl_bwd_kernel(s_ptr, t_ptr, grad_ptr, row_scale_ptr, stats_ptr, n_cols, stride_s, stride_t,
                           stride_g, inv_t, BLOCK_V: tl.constexpr):
    """grad_s = row_scale * (softmax(s/tau) - softmax(t/tau)); row_scale = mask * grad_out * tau / count."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    scale = tl.load(row_scale_ptr + row)
    g_row = grad_ptr + row * stride_g
    if scale != 0.0:
        m_s = tl.load(stats_ptr + row * 4)
        log_l_s = tl.load(stats_ptr + row * 4 + 1)
        m_t = tl.load(stats_ptr + row * 4 + 2)
        log_l_t = tl.load(stats_ptr + row * 4 + 3)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            msk = offs < n_cols
            s = tl.load(s_ptr + row * stride_s + offs, mask=msk, other=0.0).to(tl.float32) * inv_t
            t = tl.load(t_ptr + row * stride_t + offs, mask=msk, other=0.0).to(tl.float32) * inv_t
            grad = scale * (tl.exp((s - m_s) - log_l_s) - tl.exp((t - m_t) - log_l_t))
            tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=msk)
    else:
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=offs < n_cols)


class DistillKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, mask):
        s = as_rows(student_logits)
        t = as_rows(teacher_logits)
        n_rows, n_cols = s.shape
        dev = s.device
        m = (torch.ones(n_rows, device=dev, dtype=torch.float32) if mask is None
             else mask.reshape(-1).to(device=dev, dtype=torch.float32))
        kl = torch.empty(n_rows, device=dev, dtype=torch.float32)
        stats = torch.empty(n_rows, 4, device=dev, dtype=torch.float32)
        block_v, num_warps = _block_v(n_cols)
        if n_rows:
            with on_device(s):
                _distill_kl_fwd_kernel[(n_rows,)](s, t, m, kl, stats, n_cols, s.stride(0), t.stride(0),
                                                  1.0 / temperature, BLOCK_V=block_v, num_warps=num_warps)
        count = m.sum().clamp_min(1.0)
        loss = (kl * m).sum() / count * temperature ** 2
        ctx.save_for_backward(s, t, m, stats, count)
        ctx.temperature = temperature
        ctx.shape = student_logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        s, t, m, stats, count = ctx.saved_tensors
        tau = ctx.temperature
        # d(tau^2 KL)/ds = tau^2 * (1/tau) * (q - p) = tau * (q - p), per counted token / count
        row_scale = m * (grad_out.to(torch.float32) * tau / count)
        grad = torch.empty_like(s)
        n_rows, n_cols = s.shape
        if n_rows:
            block_v, num_warps = _block_v(n_cols)
            with on_device(s):
                _distill_kl_bwd_kernel[(n_rows,)](s, t, grad, row_scale, stats, n_cols, s.stride(0),
                                                  t.stride(0), grad.stride(0), 1.0 / tau, BLOCK_V=block_v,
                                                  num_warps=num_warps)
        return grad.view(ctx.shape), None, None, None


def distill_kl(student_logits, teacher_logits, temperature=1.0, mask=None):
    """``tau**2 * KL(softmax(t/tau) || softmax(s/tau))``, mean over (masked) tokens; gradient to the student only."""
    return DistillKLFunction.apply(student_logits, teacher_logits.detach(), float(temperature), mask)
