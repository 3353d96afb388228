"""BitLinear (SubLN RMSNorm + int8 act quant + ternary weight quant + matmul) vs plain RMSNorm + nn.Linear in bf16.

Rows: the linear shapes of Qwen3-0.6B / 1.7B / 4B (hidden -> intermediate, and 4B's down_proj) at 8192 and 2048
tokens, bf16 activations and weights; fwd+bwd (a training step of the layer, weight quantized every call as after an
optimizer step) and forward only. Implementations:
    ours               bitkernels.ops.bitlinear: int8 tensor-core forward (TMA kernel on Hopper), cuBLAS backward on
                       dequantized codes; keeps x alone
                       (exact SubLN gradients); the SubLN backward rebuilds the int8 codes from the same read of x
    ours_save_codes    the same keeping only the int8 codes (save_input=False: approximate SubLN gradients)
    ours_cached_w      forward only, ternary codes cached (eval / gradient-accumulation micro-steps)
    ours_compile       the same layer as a BitLinear module under torch.compile (default mode): the custom ops
                       torch.ops.bitkernels.* in one graph, no Python autograd Function (bitkernels.ops.bitlinear_library)
    ours_cudagraph     the same module under torch.compile(mode="reduce-overhead"): the step replayed as CUDA graphs
                       (x and dy copied into the graph's static inputs each call; CUDA only)
    plain_eager        F.rms_norm + F.linear in bf16 (cuBLAS), eager;   plain_compile: the same under torch.compile
    plain_cudagraph    the same as a module under torch.compile(mode="reduce-overhead"), timed as ours_cudagraph is
    ref_eager          reference.bitlinear (fake-quantized bf16 math);  ref_compile: the same under torch.compile
    peers (bench/peers.py, where installed): fla_fused_bitlinear, onebitllms, torchao_bitnet on the same x, w and
                       SubLN weight; those not installed are listed in the row's notes as peers_skipped
    floor_bf16_3gemm   the three cuBLAS bf16 GEMMs of the step (fwd, grad_x, grad_W) and nothing else
    cublas_linear      forward only: F.linear in bf16 alone (no norm)
    int8_gemm_only     the forward int8 GEMM alone (codes already made)
    int8_gemm_pointer  the same on the pointer kernel (the path of pre-Hopper GPUs and unaligned operands)
    part_*             the pieces of `ours` fwd+bwd timed alone: where its time goes
notes: saved_MiB_* = device memory held for backward after the forward (minus the output; the input counted when it
is saved; newly made weight copies such as the ternary codes counted too), per implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import bitkernels.reference as ref
from bench.harness import Case
from bench.peers import bitlinear_peers, skip_reason

SHAPES = [(1024, 3072), (2048, 6144), (2560, 9728), (9728, 2560)]
TOKENS = (8192, 2048)
EPS = 1e-6


def plain(x, nw, w):
    return F.linear(F.rms_norm(x, (x.shape[-1],), nw, EPS), w)


def reference_bitlinear(x, nw, w):
    return ref.bitlinear(x, w, None, nw, EPS)




def _check(ops, x, w, nw, dy, shape):
    """Correctness at the benchmark's own shape, printed next to its timings: ours vs the reference."""
    grads = []
    for fn in (lambda a, b, c: ops.bitlinear(a, b, None, c, EPS), lambda a, b, c: reference_bitlinear(a, c, b)):
        a, b, c = (t.detach().clone().requires_grad_() for t in (x, w, nw))
        y = fn(a, b, c)
        y.backward(dy)
        grads.append((y.detach(), a.grad, b.grad, c.grad))

    def rel(u, v):
        return ((u.double() - v.double()).norm() / v.double().norm()).item()
    errs = {name: f"{rel(u, v):.1e}" for name, u, v in zip(("y", "dx", "dW", "dnorm"), *grads)}
    print(f"check ours vs reference (relative L2), {shape}: {errs}", flush=True)


def _check_peers(peers: dict, skipped: dict, x, w, nw, dy, shape) -> dict:
    """Each peer vs the reference at the benchmark's shape (the peers must compute the same layer to be compared):
    the peers that ran; one that fails here (e.g. no GPU driver for its kernels) moves to ``skipped`` with why."""
    a, b, c = (t.detach().clone().requires_grad_() for t in (x, w, nw))
    expected = reference_bitlinear(a, c, b)
    expected.backward(dy)
    ran = {}
    for name, (fwd, params) in peers.items():
        xi = x.detach().clone().requires_grad_()
        try:
            y = fwd(xi)
            y.backward(dy)
        except Exception as exc:
            skipped[name] = skip_reason(exc)
            continue
        finally:
            grads = [p.grad for p in params]
            for p in params:
                p.grad = None
        errs = {k: f"{((g.double() - e.double()).norm() / e.double().norm()).item():.1e}"
                for k, g, e in zip(("y", "dx", "dW"), (y, xi.grad, grads[0]), (expected, a.grad, b.grad))}
        print(f"check {name} vs reference (relative L2), {shape}: {errs}", flush=True)
        ran[name] = (fwd, params)
    return ran


def _fwd_bwd(fn, params, dy, new_step: bool = False):
    def run():
        if new_step:  # cudagraph trees: each call is a new training step, free to overwrite the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        for p in params:
            p.grad = None
        fn().backward(dy)
    return run


def _ours_module(w, nw):
    """`ours` as a model holds it: a BitLinear whose parameters share w's and nw's storage (parameters are what
    CUDA graphs take as static inputs, uncopied)."""
    from bitkernels import BitLinear

    module = BitLinear(w.shape[1], w.shape[0], bias=False, subln=True, subln_eps=EPS, backend="triton", device="meta")
    module.weight = torch.nn.Parameter(w.detach())
    module.subln.weight = torch.nn.Parameter(nw.detach())
    return module


class _PlainLayer(torch.nn.Module):
    """`plain` as a module (parameters sharing w's and nw's storage), for the same CUDA-graph capture as ours."""

    def __init__(self, w, nw):
        super().__init__()
        self.weight = torch.nn.Parameter(w.detach())
        self.norm_weight = torch.nn.Parameter(nw.detach())

    def forward(self, x):
        return plain(x, self.norm_weight, self.weight)


def _check_compiled(eager_module, compiled: dict, x, dy, shape):
    """Compiled modules vs the eager module, same parameters: the ops are the same, so ~0 apart."""
    def run(f, new_step):
        if new_step:
            torch.compiler.cudagraph_mark_step_begin()
        xi = x.detach().clone().requires_grad_()
        eager_module.zero_grad(set_to_none=True)
        y = f(xi)
        y.backward(dy)
        out = [t.detach().clone() for t in (y, xi.grad, eager_module.weight.grad, eager_module.subln.weight.grad)]
        eager_module.zero_grad(set_to_none=True)
        return out

    expected = run(eager_module, False)
    for name, f in compiled.items():
        got = run(f, name == "ours_cudagraph")
        errs = {k: f"{(g.double() - e.double()).abs().max().item():.1e}"
                for k, g, e in zip(("y", "dx", "dW", "dnorm"), got, expected)}
        print(f"check {name} vs ours (max abs difference), {shape}: {errs}", flush=True)


def _saved_bytes(fwd, x, device) -> int | None:
    """Bytes kept alive by the autograd graph after one forward, the output excluded. The input is a fresh non-leaf
    copy of x (as in a network, where x is the previous layer's output), so it counts exactly when it is saved."""
    if device.type != "cuda":
        return None
    fwd(x=x * 1.0)  # compile / autotune outside the measurement, with the same kind of input
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    xin = x * 1.0  # multiplying by a Python number saves nothing for backward
    y = fwd(x=xin)
    del xin
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
    del y
    return held


def training_inputs(tokens: int, k: int, n: int, device: torch.device, dtype=torch.bfloat16):
    """x [tokens, k], latent weight w [n, k], SubLN weight nw [k] (leaves that want grads) and the upstream gradient."""
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5).requires_grad_()
    nw = (torch.rand(k, device=device, dtype=dtype) + 0.5).requires_grad_()
    dy = torch.randn(tokens, n, device=device, dtype=dtype)
    return x, w, nw, dy


def training_steps(x, w, nw, dy, plain_c, ref_c):
    """Each implementation's fwd+bwd step on the same tensors, as this suite and bench/tools/profile_bitlinear_host.py
    time them -> (steps, forwards, the BitLinear module the compiled `ours` wrap, {name: compiled module}).
    ``plain_c`` and ``ref_c`` are torch.compile of `plain` and `reference_bitlinear` (made once, shared across
    shapes)."""
    from bitkernels import ops

    params = (x, w, nw)
    fwds = {
        "ours": lambda x=x: ops.bitlinear(x, w, None, nw, EPS),
        "ours_save_codes": lambda x=x: ops.bitlinear(x, w, None, nw, EPS, save_input=False),
        "plain_eager": lambda x=x: plain(x, nw, w),
        "plain_compile": lambda x=x: plain_c(x, nw, w),
        "ref_eager": lambda x=x: reference_bitlinear(x, nw, w),
        "ref_compile": lambda x=x: ref_c(x, nw, w),
    }
    steps = {name: _fwd_bwd(f, params, dy) for name, f in fwds.items()}
    # ours_compile / ours_cudagraph: a module over the same tensors, with its own parameter objects.
    module = _ours_module(w, nw)
    module_params = (x, module.weight, module.subln.weight)
    compiled = {"ours_compile": torch.compile(module, dynamic=False)}
    if x.device.type == "cuda":
        compiled["ours_cudagraph"] = torch.compile(module, mode="reduce-overhead", dynamic=False)
    for name, m in compiled.items():
        fwds[name] = lambda x=x, m=m: m(x)
        steps[name] = _fwd_bwd(fwds[name], module_params, dy, new_step=name == "ours_cudagraph")
    if x.device.type == "cuda":  # like for like with ours_cudagraph: the same capture and input copies
        plain_module = _PlainLayer(w, nw)
        plain_cg = torch.compile(plain_module, mode="reduce-overhead", dynamic=False)
        fwds["plain_cudagraph"] = lambda x=x: plain_cg(x)
        steps["plain_cudagraph"] = _fwd_bwd(fwds["plain_cudagraph"], (x, plain_module.weight,
                                                                       plain_module.norm_weight), dy, True)
    return steps, fwds, module, compiled


def cases(device: torch.device, quick: bool):
    from bitkernels import ops

    dtype = torch.bfloat16
    shapes = [(128, 384)] if quick else SHAPES
    tokens_list = (64,) if quick else TOKENS
    plain_c = torch.compile(plain, dynamic=False)
    ref_c = torch.compile(reference_bitlinear, dynamic=False)
    # Every compiled BitLinear module shares BitLinear.forward's code object: one entry per shape and mode must fit
    # under Dynamo's recompile limit (past it, calls silently run eager and the "compiled" timings would lie).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for tokens in tokens_list:
        for k, n in shapes:
            shape = f"M={tokens} K={k} N={n}"
            x, w, nw, dy = training_inputs(tokens, k, n, device)
            impls, fwds, module, compiled = training_steps(x, w, nw, dy, plain_c, ref_c)
            peers, peers_skipped = bitlinear_peers(w, nw, EPS)
            peers = _check_peers(peers, peers_skipped, x, w, nw, dy, shape)
            for name, (fwd, params) in peers.items():
                fwds[name] = lambda x=x, fwd=fwd: fwd(x)
                impls[name] = _fwd_bwd(fwds[name], (x, *params), dy)
            xd, wd, dyd = x.detach(), w.detach(), dy
            impls["floor_bf16_3gemm"] = lambda xd=xd, wd=wd, dyd=dyd: (xd @ wd.t(), dyd @ wd, dyd.t() @ xd)
            # The pieces of `ours`, timed alone: where its time goes.
            nwd = nw.detach()
            wc, ws = ops.ternarize_absmean(wd)
            xc, xs, rstd = ops.rmsnorm_quantize_int8_forward(xd, nwd, EPS, 1e-5)
            gh = ops.bitlinear_grad_input(dy, wc, ws)
            xq = ops.dequantize_int8(xc, xs, dtype)
            impls.update({
                "part_ternarize_w": lambda wd=wd: ops.ternarize_absmean(wd),
                "part_subln_quant": lambda xd=xd, nwd=nwd: ops.rmsnorm_quantize_int8_forward(xd, nwd, EPS, 1e-5),
                "part_int8_gemm": lambda xc=xc, xs=xs, wc=wc, ws=ws: ops.int8_matmul(xc, wc, xs, ws),
                "part_grad_x_gemm": lambda dy=dy, wc=wc, ws=ws: ops.bitlinear_grad_input(dy, wc, ws),
                "part_grad_w_gemm": lambda dy=dy, xq=xq: ops.bitlinear_grad_weight(dy, xq, dtype),
                # the SubLN backward from x, also writing the grad_W GEMM's dequantized codes (ours' default path)
                "part_subln_bwd": lambda gh=gh, xd=xd, rstd=rstd, nwd=nwd: ops.rmsnorm_backward_and_dequantize(
                    gh, xd, nwd, rstd, 1e-5, dtype),
            })
            saved_fwds = {name: f for name, f in fwds.items() if not name.endswith("_cudagraph")}  # static pools
            notes = {f"saved_MiB_{name}": (lambda b: None if b is None else round(b / 2 ** 20, 2))(
                _saved_bytes(f, x, device)) for name, f in saved_fwds.items()}
            print(f"saved for backward, MiB, {shape}: {notes}", flush=True)
            _check(ops, x, w, nw, dy, shape)
            _check_compiled(module, compiled, x, dy, shape)
            if peers_skipped:
                notes["peers_skipped"] = peers_skipped
            flops = 3 * 2 * tokens * k * n
            yield Case("bitlinear", "fwd+bwd", shape, impls, flops=flops, notes=notes)

            cache: dict = {}
            codes, a_scale = ops.quantize_activations_int8(xd)
            w_codes, w_scale = ops.ternarize_absmean(wd)
            impls = {
                "ours": fwds["ours"],
                "ours_cached_w": lambda x=x, w=w, nw=nw, c=cache: ops.bitlinear(x, w, None, nw, EPS, weight_cache=c),
                "cublas_linear": lambda xd=xd, wd=wd: F.linear(xd, wd),
                **{name: fwds[name] for name in ("plain_eager", "plain_compile", "ref_eager", "ref_compile")},
                "int8_gemm_only": lambda c=codes, s=a_scale, wc=w_codes, ws=w_scale: ops.int8_matmul(c, wc, s, ws),
                "int8_gemm_pointer": lambda c=codes, s=a_scale, wc=w_codes, ws=w_scale: ops.int8_matmul(
                    c, wc, s, ws, tma=False),
                **{name: fwds[name] for name in peers},
            }
            yield Case("bitlinear", "fwd", shape, impls, flops=2 * tokens * k * n)
    if device.type == "cuda":  # which autotuned tile each GEMM picked, per (M bucket, N, K, ...) key
        import importlib

        mm = importlib.import_module("bitkernels.ops.int8_matmul")  # the module, not ops.int8_matmul the function
        for key, (_, cfg) in mm._TUNED.items():  # (tma, M bucket, N, K, per_channel, bias, bias dtype, out dtype, device)
            print(f"autotune int8_matmul {key}: {cfg}", flush=True)
