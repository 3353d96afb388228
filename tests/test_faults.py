"""Faults around checkpoints (CPU, tiny Qwen3 with dropout): SIGKILL mid-step and mid-save, truncated / corrupted /
missing checkpoint files. Each time ``--resume`` takes the newest valid checkpoint (warning about the skipped ones)
and the per-step losses, learning rates and grad norms equal the uninterrupted run's bit for bit.

The killed runs are subprocesses (``python tests/test_faults.py OUT``) that SIGKILL themselves at a named point
through the ``BITDISTILL_TEST_KILL_AT`` hook of bitdistill.checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import losses, straight, tiny_run  # noqa: E402,F401  (straight: the shared fixture)

from bitdistill.checkpoint import KILL_ENV, CheckpointError, CheckpointWarning, latest_valid, verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILES = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer_state.json",
         "rng-0.safetensors", "rng-0.json", "manifest.json"]


def killed_run(out: Path, point: str) -> None:
    env = {**os.environ, KILL_ENV: point, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run's checkpoints 2, 4, 6 (copied per test before being damaged)."""
    out = tmp_path_factory.mktemp("finished")
    tiny_run(out)
    return out / "checkpoints"


def test_sigkill_mid_step_resumes_from_the_last_checkpoint(tmp_path, straight):
    killed_run(tmp_path, "step:5")
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    assert losses(tiny_run(tmp_path, resume=True)["history"]) == straight


@pytest.mark.parametrize("step,file", [(2, "model.safetensors"), (4, "rng-0.json"), (4, "manifest.json")])
def test_sigkill_mid_save_resumes_from_the_previous_checkpoint(tmp_path, straight, step, file):
    killed_run(tmp_path, f"save:{step}:{file}")
    assert f"checkpoint-{step}.tmp" in names(tmp_path) and f"checkpoint-{step}" not in names(tmp_path)
    with pytest.warns(CheckpointWarning, match=rf"checkpoint-{step}\.tmp \(interrupted save.*steps {step - 1}-{step} "
                                               r"will be recomputed"):
        resumed = tiny_run(tmp_path, resume=True)
    assert losses(resumed["history"]) == straight
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]   # the .tmp is gone
    assert all(not verify(tmp_path / "checkpoints" / n) for n in names(tmp_path))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:   # one flipped bit, same size
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1:])


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("file", FILES)
def test_damaged_file_falls_back_to_the_previous_checkpoint(tmp_path, finished, file, how):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(finished, ckpts)
    damage(ckpts / "checkpoint-6" / file, how)
    problem = "manifest" if file == "manifest.json" else file
    with pytest.warns(CheckpointWarning, match=rf"checkpoint-6 \(.*{problem}.*resuming from .*checkpoint-4: "
                                               r"steps 5-6 will be recomputed"):
        assert latest_valid(ckpts) == ckpts / "checkpoint-4"
    assert (ckpts / "checkpoint-6").is_dir()   # reported, not deleted


def test_resume_after_a_damaged_checkpoint_is_bit_exact(tmp_path, finished, straight):
    shutil.copytree(finished, tmp_path / "checkpoints")
    damage(tmp_path / "checkpoints" / "checkpoint-6" / "optimizer.safetensors", "truncate")
    with pytest.warns(CheckpointWarning, match="optimizer.safetensors has"):
        resumed = tiny_run(tmp_path, resume=True)
    assert losses(resumed["history"]) == straight
    assert not verify(tmp_path / "checkpoints" / "checkpoint-6")   # rewritten


def test_unreadable_safetensors_is_reported_even_when_the_manifest_matches(tmp_path, finished):
    import hashlib

    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(finished / "checkpoint-6", ckpt)
    (ckpt / "rng-0.safetensors").write_bytes(b"\xff" * 64)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["rng-0.safetensors"] = {"size": 64, "sha256": hashlib.sha256(b"\xff" * 64).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert any("rng-0.safetensors unreadable" in p for p in verify(ckpt))


def test_no_valid_checkpoint_is_a_clear_error_and_deletes_nothing(tmp_path, finished):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(finished, ckpts)
    for n in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        damage(ckpts / n / "model.safetensors", "truncate")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint in .*checkpoint-6 \(model.safetensors has.*"
                                              r"checkpoint-2 .*Delete .* or run without --resume"):
        tiny_run(tmp_path, resume=True)
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_missing_manifest_means_incomplete(tmp_path, finished):
    shutil.copytree(finished / "checkpoint-6", tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / "manifest.json").unlink()
    assert verify(tmp_path / "checkpoint-6") == ["no manifest.json (the save did not finish)"]


@pytest.mark.slow
def test_two_ranks_stop_together_at_a_deadline_and_resume_bit_exact(tmp_path):
    """DDP on 2 CPU processes (gloo): only rank 1's clock passes the deadline, both stop after step 3; each rank
    restores its own RNG file; the resumed histories equal the uninterrupted ones."""
    pytest.importorskip("torch.distributed.run")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}   # gloo on CPU everywhere: two ranks cannot share one GPU under NCCL
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             __file__, "ddp", str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both workers
        raise
    assert proc.returncode == 0, stderr[-4000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["stopped"] == [True, 3] and got["resumed"] == got["straight"]
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= set(n.name for n in (tmp_path / "b" / "checkpoints" /
                                                                              "checkpoint-3").iterdir())


def ddp_worker(out: Path) -> None:
    from types import SimpleNamespace

    import bitdistill.trainer as trainer

    rank = int(os.environ["RANK"])
    straight_run = tiny_run(out / "a")
    real = trainer.time
    clock = iter(range(1000, 2000)) if rank == 1 else None   # rank 1 only: past the deadline after step 3
    trainer.time = SimpleNamespace(time=lambda: next(clock)) if clock else real
    stopped = tiny_run(out / "b", deadline=1002 if rank == 1 else 1e12)
    trainer.time = real
    resumed = tiny_run(out / "b", resume=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "straight": losses(straight_run["history"]), "resumed": losses(resumed["history"]),
        "stopped": [stopped["stopped_early"], stopped["steps"]]}))


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        ddp_worker(Path(sys.argv[2]))
    else:   # the killed run of killed_run()
        tiny_run(Path(sys.argv[1]))
        sys.exit("the kill point was never reached")
