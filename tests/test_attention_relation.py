"""Attention-relation KL: Triton op (interpreter on CPU, real shapes on GPU) against the fp64 PyTorch reference."""
import pytest
import torch

import bitkernels as bk
import bitkernels.reference as ref
from bitkernels import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative-norm tolerance of (loss, student gradient) vs fp64 on the same rounded inputs. Scores are exact-ish (fp32
# accumulation of rounded inputs); the gradient product takes dz rounded to the input dtype, and dA is stored in it.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-4, 4e-3), torch.bfloat16: (2e-4, 2e-2)}


def rel_err(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


def padding_mask(batch, length, device):
    """Right padding on row 0, left padding on row 1, a hole in the middle of row 2, row 3 unpadded."""
    mask = torch.ones(batch, length, device=device, dtype=torch.int64)
    if length > 3:
        mask[0, length - length // 3:] = 0
        if batch > 1:
            mask[1, : length // 4 + 1] = 0
        if batch > 2:
            mask[2, length // 2] = 0
    return mask


def run_both(t, s, heads, mask=None, causal=False, **kw):
    """(loss, grad) of the Triton op on (t, s) and of the fp64 reference on the same values."""
    s_k = s.clone().requires_grad_()
    loss = ops.attention_relation_kl(t, s_k, heads, mask, causal)
    loss.backward()
    s_r = s.double().clone().requires_grad_()
    loss_r = ref.attention_relation_kl(t.double(), s_r, heads, mask, causal)
    loss_r.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert s_k.grad.dtype == s.dtype and s_k.grad.shape == s.shape
    return loss, s_k.grad, loss_r, s_r.grad


def check(t, s, heads, mask=None, causal=False, tol=None):
    loss, grad, loss_r, grad_r = run_both(t, s, heads, mask, causal)
    loss_tol, grad_tol = tol or TOL[s.dtype]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.item() - loss_r.item()) <= loss_tol * abs(loss_r.item()) + 1e-6, (loss.item(), loss_r.item())
    assert rel_err(grad, grad_r) <= grad_tol, rel_err(grad, grad_r)
    if mask is not None:  # padded positions are neither queries nor keys: no gradient reaches them
        assert (grad[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked,causal", [(False, False), (True, False), (True, True), (False, True)])
def test_matches_reference_ragged_length(dtype, masked, causal, device):
    # L=37 crosses the interpreter's 16-wide tiles with a ragged tail; widths differ (d_t=12, d_s=8).
    batch, length, heads = 3, 37, 2
    t = torch.randn(batch, length, 24, device=device).to(dtype)
    s = torch.randn(batch, length, 16, device=device).to(dtype)
    check(t, s, heads, padding_mask(batch, length, device) if masked else None, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_multiple_length_without_masks(dtype, device):
    # L a multiple of every tile, no mask, not causal: the kernels' fully unmasked fast path.
    t = torch.randn(1, 64, 16, device=device).to(dtype)
    s = torch.randn(1, 64, 32, device=device).to(dtype)
    check(t, s, 2)


def test_configs_are_pruned_to_fit_shared_memory():
    import triton

    from bitkernels.ops import attention_relation as ar
    configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
               triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    def kept(dtype, d):
        x = torch.empty(0, dtype=dtype)
        pruned = ar._prune_by_shared_memory(configs, {"T0": x, "S0": x}, BLOCK_DT=d, BLOCK_DS=d)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in pruned]
    assert kept(torch.bfloat16, 128)[0] == (128, 64)   # 2 * 128 * 2 B * (128 + 3 * 64) rows + dz tile: fits
    assert (128, 64) not in kept(torch.float32, 128)   # 352 KiB measured on an H100: must go
    assert kept(torch.float32, 256) == [(32, 32)]      # nothing else fits: the small fallback


# Shared memory Triton 3.6 allocated on an H100 (compiled metadata, 2026-11-23): (dtype, d_t, d_s, BLOCK_M, BLOCK_N,
# num_stages) -> bytes. fp32 rows are the OutOfResources "Required" figures.
MEASURED_SHARED_MEMORY = [
    ("bf16", 128, 64, 128, 64, 3, 122880), ("bf16", 128, 64, 64, 64, 3, 98304), ("bf16", 128, 64, 128, 32, 3, 86016),
    ("bf16", 128, 128, 128, 64, 3, 163840), ("bf16", 256, 128, 128, 64, 3, 245760),
    ("fp32", 128, 64, 128, 64, 3, 360448), ("fp32", 128, 64, 64, 64, 3, 262144), ("fp32", 128, 64, 128, 32, 3, 278528),
    ("fp32", 128, 64, 64, 32, 2, 155648), ("fp32", 64, 64, 128, 64, 3, 229376),
    # backward kernel
    ("bf16", 64, 64, 64, 64, 2, 49664), ("bf16", 128, 64, 64, 64, 2, 74240), ("bf16", 128, 64, 128, 64, 2, 98816),
    ("bf16", 256, 128, 128, 64, 2, 197120),
    ("fp32", 128, 64, 64, 64, 2, 213504), ("fp32", 128, 64, 128, 32, 2, 254208), ("fp32", 128, 128, 64, 64, 2, 262656),
    ("fp32", 128, 128, 64, 32, 2, 196864),
]


@pytest.mark.parametrize("dtype, d_t, d_s, m, n, stages, measured", MEASURED_SHARED_MEMORY)
def test_shared_memory_estimate_bounds_what_triton_allocated(dtype, d_t, d_s, m, n, stages, measured):
    # A low estimate lets the untuned path launch a config the device refuses (OutOfResources); a far too high one
    # throws fast configs away. Bound it from both sides.
    from bitkernels.ops.attention_relation import shared_memory_estimate
    size = 4 if dtype == "fp32" else 2
    est = shared_memory_estimate(m, n, stages, (d_t + d_s) * size, dtype == "fp32")
    assert measured <= est <= measured + m * n * 4 + 1024


@pytest.mark.parametrize("heads", [1, 3, 32])
def test_relation_heads_one_to_thirty_two(heads, device):
    # 96 = 32 * 3: head widths 96, 32, 3 (the last one is padded up to the 16-wide dot inside the kernel).
    # scaled so that even d=96 gives smooth relations (unit entries make a d=96 relation almost one-hot)
    t = torch.randn(2, 21, 96, device=device) * 0.4
    s = torch.randn(2, 21, 96, device=device) * 0.4
    check(t, s, heads, padding_mask(2, 21, device))


def test_per_head_layout_with_gqa_shapes(device):
    # [B, H, L, d]: teacher 4 heads of 8, student 2 (GQA-like K/V) heads of 8; R=4 splits 32 and 16.
    t = torch.randn(2, 4, 19, 8, device=device)
    s = torch.randn(2, 2, 19, 8, device=device)
    loss, grad, loss_r, grad_r = run_both(t, s, 4)
    flat_t = t.transpose(1, 2).reshape(2, 19, 32)
    flat_s = s.transpose(1, 2).reshape(2, 19, 16)
    assert loss_r.item() == pytest.approx(ref.attention_relation_kl(flat_t.double(), flat_s.double(), 4).item())
    assert grad.shape == s.shape
    assert rel_err(grad, grad_r) <= 1e-4


def test_strided_rows_from_a_fused_projection(device):
    # q sliced out of a fused qkv output: row stride 3 * D, unit column stride, no copy needed.
    fused_t = torch.randn(2, 23, 3 * 32, device=device)
    fused_s = torch.randn(2, 23, 3 * 16, device=device)
    check(fused_t[..., 32:64], fused_s[..., 16:32], 4)


def assert_zero(loss, grad):
    # Teacher and student rows run the same instructions, so the LSEs and probabilities agree bit for bit; on a GPU
    # the compiler may fuse ``zt - zs`` with the score scaling (FMA), leaving a rounding residue in the loss only.
    assert abs(loss.item()) <= 1e-6
    assert grad.abs().max().item() <= 1e-9


@pytest.mark.parametrize("masked", [False, True])
def test_identical_inputs_give_zero(masked, device):
    a = torch.randn(2, 33, 32, device=device)
    s = a.clone().requires_grad_()
    loss = ops.attention_relation_kl(a, s, 4, padding_mask(2, 33, device) if masked else None, causal=masked)
    loss.backward()
    assert_zero(loss, s.grad)


def test_single_position_and_empty_inputs(device):
    t, s = torch.randn(3, 1, 16, device=device), torch.randn(3, 1, 16, device=device).requires_grad_()
    loss = ops.attention_relation_kl(t, s, 2)
    loss.backward()
    # one key: both relations are [1]; KL and its gradient (p_s - p_t) cancel to rounding level (exp2 of a value
    # that is zero only up to an FMA residue on the GPU)
    assert abs(loss.item()) <= 1e-6 and s.grad.abs().max().item() <= 1e-6
    s0 = torch.randn(2, 0, 16, device=device).requires_grad_()
    loss0 = ops.attention_relation_kl(torch.randn(2, 0, 8, device=device), s0, 2)
    loss0.backward()
    assert loss0.item() == 0.0 and s0.grad.shape == s0.shape


def test_fully_padded_batch_gives_zero_not_nan(device):
    t, s = torch.randn(2, 20, 16, device=device), torch.randn(2, 20, 16, device=device)
    mask = torch.zeros(2, 20, device=device)
    for causal in (False, True):
        loss, grad, loss_r, grad_r = run_both(t, s, 2, mask, causal)
        assert loss.item() == 0.0 and loss_r.item() == 0.0
        assert (grad == 0).all()
    mask[1, 3:9] = 1  # one sequence fully padded, the other partly
    check(t, s, 2, mask, True)


def test_teacher_gets_no_gradient_and_grad_output_scales(device):
    t = torch.randn(2, 18, 16, device=device, requires_grad=True)
    s = torch.randn(2, 18, 16, device=device, requires_grad=True)
    (3.0 * ops.attention_relation_kl(t, s, 2)).backward()
    assert t.grad is None
    s_r = s.detach().double().requires_grad_()
    (3.0 * ref.attention_relation_kl(t.detach().double(), s_r, 2)).backward()
    assert rel_err(s.grad, s_r.grad) <= 1e-4


def test_distill_loss_is_mean_over_qkv_and_backends_agree(device):
    torch.manual_seed(1)
    qkv_t = [torch.randn(2, 17, 32, device=device), torch.randn(2, 2, 17, 8, device=device),
             torch.randn(2, 2, 17, 8, device=device)]
    qkv_s = [torch.randn(2, 17, 16, device=device, requires_grad=True) for _ in range(3)]
    mask = padding_mask(2, 17, device)
    loss = bk.attention_relation_distill_loss(qkv_t, qkv_s, 4, mask, backend="triton")
    loss.backward()
    grads = [s.grad.clone() for s in qkv_s]
    for s in qkv_s:
        s.grad = None
    loss_t = bk.functional.attention_relation_distill_loss(qkv_t, qkv_s, 4, mask, backend="torch")
    loss_t.backward()
    each = [ref.attention_relation_kl(t, s, 4, mask) for t, s in zip(qkv_t, qkv_s)]
    assert loss_t.item() == pytest.approx(sum(x.item() for x in each) / 3, rel=1e-6)
    assert loss.item() == pytest.approx(loss_t.item(), rel=1e-5)
    for g, s in zip(grads, qkv_s):
        assert rel_err(g, s.grad) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_of_one_shape_share_one_launch_per_direction(dtype, device, monkeypatch):
    import bitkernels.ops.attention_relation as ar

    launches = []
    for name in ("attention_relation_forward", "attention_relation_backward"):
        real = getattr(ar, name)
        monkeypatch.setattr(ar, name, lambda t, s, *a, _real=real, _name=name: launches.append((_name, len(s)))
                            or _real(t, s, *a))
    torch.manual_seed(3)
    # Q sliced out of a fused projection (row stride 3 * D) and K, V contiguous: strides differ, so Q runs alone
    # and K with V; then three contiguous relations: one launch each way. Every relation has its own values, so a
    # program reading another relation's rows gives a wrong loss or gradient.
    fused_t = torch.randn(2, 21, 3 * 32, device=device)
    for qkv_t in ([fused_t[..., :32], torch.randn(2, 21, 32, device=device), torch.randn(2, 21, 32, device=device)],
                  [torch.randn(2, 21, 32, device=device) for _ in range(3)]):
        qkv_t = [t.to(dtype) for t in qkv_t]
        qkv_s = [(t.float() + 0.7 * torch.randn(t.shape, device=device)).to(dtype)[..., :16].contiguous()
                 .requires_grad_() for t in qkv_t]
        mask = padding_mask(2, 21, device)
        launches.clear()
        loss = ops.attention_relation_distill_loss(qkv_t, qkv_s, 4, mask)
        loss.backward()
        fused_first = qkv_t[0].stride(1) != qkv_t[1].stride(1)
        expect = [1, 2] if fused_first else [3]
        assert sorted(g for n, g in launches if n == "attention_relation_forward") == expect
        assert sorted(g for n, g in launches if n == "attention_relation_backward") == expect
        losses_r = []
        for t, s in zip(qkv_t, qkv_s):
            s_r = s.detach().double().requires_grad_()
            loss_r = ref.attention_relation_kl(t.double(), s_r, 4, mask)
            loss_r.backward()
            losses_r.append(loss_r.item())
            assert rel_err(s.grad * 3, s_r.grad) <= TOL[dtype][1]
        assert loss.item() == pytest.approx(sum(losses_r) / 3, rel=TOL[dtype][0])


@pytest.mark.parametrize("bad,match", [
    (dict(heads=3), "not divisible by num_relation_heads=3"),
    (dict(heads=0), "positive int"),
    (dict(student=torch.randn(2, 9, 16)), "same batch and positions"),
    (dict(student=torch.randn(18, 16)), r"\[B, L, D\]"),
    (dict(mask=torch.ones(2, 5)), r"attention_mask must be a \[B, L\]"),
    (dict(student=torch.randint(0, 3, (2, 10, 16))), "floating tensor"),
])
def test_bad_input_raises_a_clear_error(bad, match):
    t = torch.randn(2, 10, 32)
    s = bad.get("student", torch.randn(2, 10, 16))
    with pytest.raises((ValueError, TypeError), match=match):
        bk.attention_relation_kl(t, s, bad.get("heads", 4), bad.get("mask"), backend="torch")


# ---- realistic shapes (GPU only) -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked,causal", [(False, False), (True, True)])
def test_gpu_real_shapes(dtype, masked, causal, device):
    # Qwen3-1.7B-like: teacher q 2048 wide, student k 1024 wide (GQA), 16 relation heads, L not a tile multiple.
    batch, length = 2, 1000
    t = torch.randn(batch, length, 2048, device=device).to(dtype)
    s = torch.randn(batch, length, 1024, device=device).to(dtype)
    # fp32 products run as 3xTF32 on the GPU: near, not at, fp32 accuracy over 1000-long rows
    tol = (1e-4, 1e-3) if dtype == torch.float32 else None
    check(t, s, 16, padding_mask(batch, length, device) if masked else None, causal, tol)


@pytest.mark.gpu
def test_gpu_memory_stays_linear_in_length(device):
    length, width = 8192, 2048
    t = torch.randn(1, length, width, device=device, dtype=torch.bfloat16)
    s = torch.randn(1, length, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    ops.attention_relation_kl(t, s, 16).backward()  # compile + autotune outside the measurement
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ops.attention_relation_kl(t, s, 16)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - s.grad.numel() * s.grad.element_size()
    assert extra <= 64 * 2 ** 20, f"{extra / 2 ** 20:.1f} MiB beyond the student gradient"
    # 32K positions: the reference would need 16 * 32768^2 * 4 B = 64 GiB per relation matrix.
    t = torch.randn(1, 32768, width, device=device, dtype=torch.bfloat16)
    s = t.clone().requires_grad_()
    loss = ops.attention_relation_kl(t, s, 16)
    loss.backward()
    assert_zero(loss, s.grad)
