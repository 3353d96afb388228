"""Benchmark helpers: what they time must be what they say (variants take effect, swept kernels are correct)."""
import io
import json
import os
import pathlib
import subprocess
import tarfile
import types

import pytest
import torch

from bench.suites import quant
from bitkernels.ops import _common

# The sweep's CPU pass and the timed BitLinear steps run their Triton kernels in Triton's interpreter.
interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="runs the Triton kernels on the CPU in Triton's interpreter")


def test_results_record_the_commit_they_measured(tmp_path, monkeypatch):
    # Every result file says what code it measured: HEAD's commit and whether the tree was dirty, or "unknown".
    from bench import harness

    monkeypatch.delenv("BITKERNELS_GIT_COMMIT", raising=False)
    meta = {"device": "Test Device", "date": "2000-01-01"}
    path = harness.write_results({"meta": dict(meta), "rows": [1]}, str(tmp_path / "r.json"), meta)
    written = json.loads(path.read_text())
    head = subprocess.run(["git", "-C", str(harness.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        status = subprocess.run(["git", "-C", str(harness.ROOT), "status", "--porcelain"], capture_output=True,
                                text=True, check=True).stdout
        assert written["meta"]["git_commit"] == head.stdout.strip()
        assert written["meta"]["git_dirty"] is bool(status.strip())
    assert written["rows"] == [1] and written["meta"]["device"] == "Test Device"
    # A copy without git history (the device machines'): the commit from the environment, else "unknown".
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert harness.git_provenance() == {"git_commit": "unknown", "git_dirty": "unknown"}
    monkeypatch.setenv("BITKERNELS_GIT_COMMIT", "0123abc")
    assert harness.git_provenance() == {"git_commit": "0123abc", "git_dirty": "unknown"}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    path = harness.write_results({"meta": dict(meta)}, str(tmp_path / "s.json"), meta)
    assert json.loads(path.read_text())["meta"]["git_commit"] == "0123abc"


def test_quant_suite_tiling_variants_take_effect():
    # row_tiling is cached per row length: a variant that only set the module's limits would time the shipped tiling.
    shipped = _common.row_tiling(9728)
    assert shipped.tail and not shipped.chunked
    chunked = quant._with_tiling(_common.row_tiling, SPLIT_ROW_MAX=0)(9728)
    one_tile = quant._with_tiling(_common.row_tiling, SINGLE_PASS_MAX=_common.MAX_ROW)(9728)
    assert chunked.chunked and chunked.block_n == _common.CHUNK
    assert not one_tile.chunked and one_tile.tail == 0 and one_tile.block_n == 16384
    assert _common.row_tiling(9728) == shipped  # settings and cache restored


@interpreter_only
def test_int8_gemm_variant_sweep_checks_against_the_shipped_kernel():
    # The sweep's CPU pass (interpreter): every epilogue / loop variant equals the shipped int8_matmul bit for bit,
    # so a GPU run times only correct kernels; it returns nonzero when one differs or fails to compile.
    from bench.tools import sweep_int8_gemm

    assert sweep_int8_gemm.main([]) == 0
    # --set occupancy: programs walking tiles with a stride of two programs an SM (the interpreter's "SMs": 2)
    assert sweep_int8_gemm.main(["--set", "occupancy"]) == 0


@interpreter_only
def test_int8_gemm_sweep_baseline_is_checked_bit_for_bit(tmp_path):
    # --baseline (an earlier int8_matmul.py, the A/B of a change to the shipped kernel) is timed only when it computes
    # the same bits as the shipped kernel: a copy passes, a copy whose epilogue subtracts the bias fails.
    from bench.tools import sweep_int8_gemm

    source = (pathlib.Path(sweep_int8_gemm.__file__).parents[2] / "bitkernels" / "ops" / "int8_matmul.py").read_text()
    same, wrong = tmp_path / "same.py", tmp_path / "wrong.py"
    same.write_text(source)
    assert source.count("y += tl.load(bias_ptr") == 1
    wrong.write_text(source.replace("y += tl.load(bias_ptr", "y -= tl.load(bias_ptr"))
    assert sweep_int8_gemm.main(["--baseline", str(same)]) == 0
    assert sweep_int8_gemm.main(["--baseline", str(wrong)]) == 1
    with pytest.raises(SystemExit, match="no file"):
        sweep_int8_gemm.main(["--baseline", str(tmp_path / "missing.py")])


@interpreter_only
def test_bitlinear_steps_recompute_not_accumulate_gradients():
    # What the bitlinear suite and bench/tools/profile_bitlinear_host.py time as one training step: a forward + backward
    # that leaves each parameter's gradient of this step alone (a step that accumulated would time an extra add
    # kernel), and the same gradients from ours eager and ours under torch.compile.
    from bench.suites import bitlinear

    torch.manual_seed(0)
    x, w, nw, dy = bitlinear.training_inputs(16, 64, 96, torch.device("cpu"))
    steps, fwds, module, _ = bitlinear.training_steps(x, w, nw, dy, bitlinear.plain, bitlinear.reference_bitlinear)
    assert {"ours", "ours_compile", "plain_eager", "plain_compile"} <= set(steps)
    for name in ("ours", "ours_compile", "plain_eager"):  # the memory probe calls each forward on a fresh input x=
        assert fwds[name](x=x * 1.0).shape == (16, 96)
    grads = {}
    for name in ("ours", "ours_compile"):
        params = (x, module.weight, module.subln.weight) if name == "ours_compile" else (x, w, nw)
        for _ in range(2):
            steps[name]()
        grads[name] = [p.grad.clone() for p in params]
        steps[name]()
        for p, g in zip(params, grads[name]):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    for g_compiled, g_eager in zip(grads["ours_compile"], grads["ours"]):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-2, atol=1e-2)


@interpreter_only
def test_host_pieces_time_the_work_of_ours_backward():
    # bench/tools/profile_bitlinear_host.py --pieces sets "ours backward work, direct" beside the autograd backward: it
    # must be the same work (the same gradients), and every piece must run.
    from bench.tools import profile_bitlinear_host

    torch.manual_seed(0)
    pieces = profile_bitlinear_host.piece_steps(16, 64, 96, torch.device("cpu"))
    for fn in pieces.values():
        (fn.fn if isinstance(fn, profile_bitlinear_host.OnAnotherThread) else fn)()
    grad_x, grad_w, grad_b, grad_nw = pieces["ours backward work, direct"]()
    assert grad_b is None
    for direct, through_autograd in zip((grad_x, grad_w, grad_nw), pieces["ours backward (autograd)"]()):
        torch.testing.assert_close(direct, through_autograd, rtol=0, atol=0)
    assert pieces["ours backward work, direct, other thread"].fn is pieces["ours backward work, direct"]


def test_grad_weight_block_ab_profiles_settings_in_rotating_order(monkeypatch):
    # ab_grad_weight_block.py --kernels: the setting profiled first ran slower even in kernels common to all settings,
    # so each pass starts at the next setting, and a kernel's time is its median over the passes.
    from bench.tools import ab_grad_weight_block

    order = []

    def fake_kernel_times(step):
        order.append(step())
        first = len(order) % 3 == 1  # the first profile of a pass is slower
        return {"gemm": 100.0 + 50.0 * first, "only_" + order[-1]: 1.0}

    monkeypatch.setattr(ab_grad_weight_block, "kernel_times", fake_kernel_times)
    steps = {name: (lambda name=name: name) for name in ("a", "b", "c")}
    medians, totals = ab_grad_weight_block.kernel_passes(steps, 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert medians == {n: {"gemm": 100.0, "only_" + n: 1.0} for n in "abc"}
    assert totals == {"a": [151.0, 101.0, 101.0], "b": [101.0, 151.0, 101.0], "c": [101.0, 101.0, 151.0]}


@interpreter_only
def test_host_ab_imports_an_earlier_revision_beside_the_working_tree(tmp_path):
    # bench/tools/profile_bitlinear_host.py --ab REV: REV's bitkernels imports beside this one (its custom ops in their
    # own namespace: two packages registering bitkernels::* could not both import), runs, and is compared bit for bit
    # before any timing. HEAD against the working tree computes the same bits.
    from bench.tools import profile_bitlinear_host

    old_ops = profile_bitlinear_host.package_at("HEAD", tmp_path)
    name = old_ops.__name__.split(".")[0]
    assert name.startswith("bitkernels_") and (tmp_path / name / "ops" / "bitlinear.py").is_file()
    assert "bitkernels::" not in (tmp_path / name / "ops" / "bitlinear_library.py").read_text()
    assert hasattr(getattr(torch.ops, name), "bitlinear_forward")
    torch.manual_seed(0)
    calls, same = profile_bitlinear_host.ab_steps(16, 64, 96, old_ops, torch.device("cpu"))
    assert same
    assert set(calls) == {f"{impl} {part}" for impl in ("old", "new", "plain") for part in ("step", "fwd")}
    for fn in calls.values():
        fn()
    doubled = types.SimpleNamespace(bitlinear=lambda *args, **kwargs: old_ops.bitlinear(*args, **kwargs) * 2)
    assert not profile_bitlinear_host.ab_steps(16, 64, 96, doubled, torch.device("cpu"))[1]
    with pytest.raises(SystemExit, match="cannot read bitkernels at git revision"):
        profile_bitlinear_host.package_at("no-such-revision", tmp_path)
    # A copy of the checkout without git history (the device machines'): the revision as an extracted directory.
    extracted, imports = tmp_path / "old rev-1", tmp_path / "imports"
    imports.mkdir()
    archive = subprocess.run(["git", "-C", str(profile_bitlinear_host.ROOT), "archive", "HEAD", "bitkernels"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(extracted, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    from_dir = profile_bitlinear_host.package_at(str(extracted), imports)
    assert from_dir.__name__ == "bitkernels_old_rev_1.ops"
    assert hasattr(torch.ops.bitkernels_old_rev_1, "bitlinear_forward")
    assert profile_bitlinear_host.ab_steps(16, 64, 96, from_dir, torch.device("cpu"))[1]


def _fake_module(monkeypatch, name: str, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(__import__("sys").modules, name, module)


def test_bitlinear_peers_are_timed_only_when_they_run_and_match(monkeypatch, capsys):
    # A peer is timed only when it imports and runs on the benchmark's own tensors; one that is absent or fails is in
    # the row's notes with why (never silently dropped); the check prints its error against the reference.
    import sys

    from bench import peers
    from bench.suites import bitlinear

    x, w, nw, dy = bitlinear.training_inputs(16, 64, 48, torch.device("cpu"), torch.float32)
    calls = []

    def fla_like(x, norm_weight, norm_bias, weight, bias, eps):
        calls.append((norm_weight is nw, weight is w))
        return bitlinear.reference_bitlinear(x, norm_weight, weight)

    _fake_module(monkeypatch, "fla")
    _fake_module(monkeypatch, "fla.modules")
    _fake_module(monkeypatch, "fla.modules.fused_bitlinear", rms_norm_linear_quant=fla_like)
    monkeypatch.setitem(sys.modules, "onebitllms", None)  # not installed

    def broken(*_):
        raise RuntimeError("no driver")
    _fake_module(monkeypatch, "torchao", quantize_=broken)
    _fake_module(monkeypatch, "torchao.prototype")
    _fake_module(monkeypatch, "torchao.prototype.quantized_training", bitnet_training=lambda: None)

    found, skipped = peers.bitlinear_peers(w, nw, bitlinear.EPS)
    assert set(found) == {"fla_fused_bitlinear"} and set(skipped) == {"onebitllms", "torchao_bitnet"}
    assert "RuntimeError: no driver" in skipped["torchao_bitnet"] and "onebitllms" in skipped["onebitllms"]

    # A peer that imports but fails on the tensors moves to skipped too.
    found["bad"] = (broken, (w,))
    ran = bitlinear._check_peers(found, skipped, x, w, nw, dy, "tiny")
    assert set(ran) == {"fla_fused_bitlinear"} and skipped["bad"] == "RuntimeError: no driver"
    assert calls and all(a and b for a, b in calls)  # it was handed our tensors, not copies
    assert "check fla_fused_bitlinear vs reference (relative L2), tiny: {'y': '0.0e+00', 'dx': '0.0e+00'" in \
        capsys.readouterr().out
    assert w.grad is None and nw.grad is None  # the check leaves no grads behind on the timed leaves


def test_distill_peers_get_our_tensors_and_absent_ones_are_noted(monkeypatch):
    import sys

    from bench import peers

    hs, ws, ht, wt = (torch.randn(8, 4) for _ in range(4))
    labels = torch.zeros(8, dtype=torch.long)
    seen = {}

    class JSD:
        @staticmethod
        def apply(*args):
            seen["ops"] = args
            return torch.tensor(1.0)

    _fake_module(monkeypatch, "liger_kernel")
    _fake_module(monkeypatch, "liger_kernel.ops")
    _fake_module(monkeypatch, "liger_kernel.ops.fused_linear_jsd", LigerFusedLinearJSDFunction=JSD)
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)
    found, skipped = peers.distill_loss_peers(hs, ws, ht, wt, labels, 5.0)
    assert set(found) == {"liger_fused_linear_jsd"} and set(skipped) == {"liger_chunked_jsd"}
    assert found["liger_fused_linear_jsd"]().item() == 1.0
    # beta 0 is forward KL(teacher || student) in Liger's convention, at our temperature
    assert seen["ops"][:5] == (hs, ws, ht, wt, labels) and seen["ops"][5:] == (0.0, -100, 5.0)


def test_peer_ratio_plot(tmp_path):
    from bench.peers import plot_peer_ratios

    rows = [{"case": "fwd", "shape": "M=1", "ms": {"ours": 1.0, "fla_fused_bitlinear": 2.0, "plain_eager": 3.0}},
            {"case": "fwd", "shape": "M=2", "ms": {"ours": 1.0, "torchao_bitnet": None}}]
    assert plot_peer_ratios(rows, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000
    assert not plot_peer_ratios(rows[1:], tmp_path / "q.png") and not (tmp_path / "q.png").exists()
