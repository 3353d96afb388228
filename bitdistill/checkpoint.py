"""Training checkpoints without pickles, complete only when their manifest is written.

``checkpoint-<step>/`` holds (written into ``checkpoint-<step>.tmp/``, renamed when complete)::

    model.safetensors        the unwrapped model's weights                                            rank 0
    optimizer.safetensors    every tensor of optimizer.state_dict()["state"] (exp_avg, step, ...)     rank 0
    optimizer.json           the rest of it: param_groups, non-tensor per-parameter values            rank 0
    scheduler.json           the LR scheduler's state_dict (LambdaLR: numbers only)                   rank 0
    scaler.json              the fp16 GradScaler's state, when there is one                           rank 0
    rng-<rank>.safetensors   torch CPU and CUDA generator states (uint8), numpy's MT19937 key         every rank
    rng-<rank>.json          python ``random``'s state, numpy's position and gaussian cache           every rank
    trainer_state.json       step, world size, the per-step history                                   rank 0
    manifest.json            name, size and sha256 of every file above, written last (tmp + rename)   rank 0

Nothing is pickled and loading runs no unpickler: tensors go through safetensors, everything else through JSON
(tuples tagged so they come back as tuples). DDP ranks hold identical model and optimizer states, so rank 0 writes
them; each rank writes its own RNG state. The checkpoint directory must be shared by all ranks (rank 0 hashes
every rank's files). FSDP / DeepSpeed sharded states are not supported by this format (``save`` refuses them).

A checkpoint is valid only if its manifest exists and every listed file has the listed size and sha256 (and each
``.safetensors`` header parses). ``resume_point`` takes the newest valid one, warns about newer bad or interrupted
ones (by path, with the steps that will be recomputed), and raises ``CheckpointError`` when checkpoints exist but
none is valid; it never deletes anything.

Test hook (for fault-injection tests only): with ``BITDISTILL_TEST_KILL_AT=save:<step>:<file>`` the process
SIGKILLs itself right after writing ``<file>`` of checkpoint ``<step>`` (``manifest.json``: after the manifest,
before the directory rename); the trainer also honours ``step:<n>`` (mid-step n, after backward).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import warnings
from pathlib import Path

import torch

MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer_state.json",
            "rng-0.safetensors", "rng-0.json")
KILL_ENV = "BITDISTILL_TEST_KILL_AT"


class CheckpointError(RuntimeError):
    pass


class CheckpointWarning(UserWarning):
    pass


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``$BITDISTILL_TEST_KILL_AT`` names this point (see module docstring)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ file helpers

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(v):
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"checkpoint: cannot store {type(v).__name__} value {v!r} as JSON")


def _decode(v):
    if isinstance(v, dict):
        return tuple(_decode(x) for x in v["__tuple__"]) if set(v) == {"__tuple__"} else \
            {k: _decode(x) for k, x in v.items()}
    return [_decode(x) for x in v] if isinstance(v, list) else v


def _write_json(path: Path, obj, step: int) -> None:
    path.write_text(json.dumps(_encode(obj)))
    _fsync(path)
    fault_point(f"save:{step}:{path.name}")


def _read_json(path: Path):
    return _decode(json.loads(path.read_text()))


def _write_tensors(path: Path, tensors: dict, step: int) -> None:
    from safetensors.torch import save_file

    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path))
    _fsync(path)
    fault_point(f"save:{step}:{path.name}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------- save

def save(accelerator, ckpt_dir: Path, step: int, model, optimizer, scheduler, history: list, keep: int) -> Path:
    """Write checkpoint ``step`` (all ranks call this); prune to the newest ``keep`` at or before ``step``."""
    from accelerate.utils import DistributedType
    from safetensors.torch import save_model

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise NotImplementedError(f"bitdistill checkpoints do not support {accelerator.distributed_type} "
                                  f"(sharded states); use DDP")
    final, tmp = ckpt_dir / f"checkpoint-{step}", ckpt_dir / f"checkpoint-{step}.tmp"
    main, rank = accelerator.is_main_process, accelerator.process_index
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if main:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        _fsync(tmp / "model.safetensors")
        fault_point(f"save:{step}:model.safetensors")
        opt = optimizer.state_dict()
        tensors = {f"{pid}.{k}": v for pid, st in opt["state"].items() for k, v in st.items()
                   if isinstance(v, torch.Tensor)}
        rest = {pid: {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)} for pid, st in opt["state"].items()}
        _write_tensors(tmp / "optimizer.safetensors", tensors, step)
        _write_json(tmp / "optimizer.json", {"param_groups": opt["param_groups"], "state": rest}, step)
        _write_json(tmp / "scheduler.json", scheduler.state_dict(), step)
        if accelerator.scaler is not None:
            _write_json(tmp / "scaler.json", accelerator.scaler.state_dict(), step)
        _write_json(tmp / "trainer_state.json", {"step": step, "world": accelerator.num_processes,
                                                 "history": history}, step)
    rng_tensors, rng_json = rng_state()
    _write_tensors(tmp / f"rng-{rank}.safetensors", rng_tensors, step)
    _write_json(tmp / f"rng-{rank}.json", rng_json, step)
    accelerator.wait_for_everyone()
    if main:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        part = tmp / (MANIFEST + ".tmp")
        part.write_text(json.dumps(manifest, indent=1))
        _fsync(part)
        part.replace(tmp / MANIFEST)
        _fsync(tmp)
        fault_point(f"save:{step}:{MANIFEST}")
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        _fsync(ckpt_dir)
        _prune(ckpt_dir, step, keep)
    accelerator.wait_for_everyone()
    return final


def _numbered(ckpt_dir: Path, suffix: str = "") -> list[tuple[int, Path]]:
    out = []
    for p in ckpt_dir.glob(f"checkpoint-*{suffix}"):
        num = p.name[len("checkpoint-"):len(p.name) - len(suffix)]
        if p.is_dir() and num.isdigit():
            out.append((int(num), p))
    return sorted(out)


def _prune(ckpt_dir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints at or before ``step``. Newer ones (bad ones skipped by a resume) are left
    alone: this run overwrites them when it reaches their step. Interrupted saves (``*.tmp``) are removed."""
    older = [p for s, p in _numbered(ckpt_dir) if s <= step]
    for old in older[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for _, stale in _numbered(ckpt_dir, ".tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def rng_state() -> tuple[dict, dict]:
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {"python": random.getstate(), "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    import numpy as np

    random.setstate(meta["python"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k[11:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this host has "
                          f"{torch.cuda.device_count()}: CUDA RNG states not restored", CheckpointWarning)
        else:
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------------- load

def verify(path: Path) -> list[str]:
    """Problems of checkpoint ``path`` against its manifest (empty: valid)."""
    from safetensors import safe_open

    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST} (the save did not finish)"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} unreadable ({type(e).__name__}: {e})"]
    problems = [f"{name} not in the manifest" for name in REQUIRED if name not in files]
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} missing")
        elif (size := f.stat().st_size) != want["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {want['size']}")
        elif _sha256(f) != want["sha256"]:
            problems.append(f"{name} sha256 differs from the manifest")
        elif name.endswith(".safetensors"):
            try:
                with safe_open(str(f), "pt") as st:
                    list(st.keys())
            except Exception as e:   # safetensors raises its own error types
                problems.append(f"{name} unreadable ({type(e).__name__}: {e})")
    return problems


def latest_valid(ckpt_dir: Path) -> Path | None:
    """The newest valid checkpoint in ``ckpt_dir``, warning about newer bad or interrupted ones; None when there is
    no checkpoint (interrupted saves only count as none); CheckpointError when checkpoints exist but none is valid."""
    done, partial = _numbered(ckpt_dir), _numbered(ckpt_dir, ".tmp")
    bad = []
    for step, path in reversed(done):
        problems = verify(path)
        if not problems:
            break
        bad.append((step, path, problems))
    else:
        step, path = 0, None
    skipped = [f"{p} ({'; '.join(why)})" for _, p, why in bad]
    skipped += [f"{p} (interrupted save, incomplete)" for s, p in partial if s > step]
    newest = max([s for s, *_ in bad] + [s for s, _ in partial if s > step], default=step)
    if path is None and bad:
        raise CheckpointError(
            f"no valid checkpoint in {ckpt_dir} to resume from: " + ", ".join(skipped) + f". Delete {ckpt_dir} (or "
            f"the bad checkpoints) or run without --resume to start over; nothing was deleted.")
    if skipped:
        what = f"resuming from {path}" if path else "starting from step 0"
        warnings.warn(f"skipping {', '.join(skipped)}; {what}: steps {step + 1}-{newest} will be recomputed",
                      CheckpointWarning)
    return path


def resume_point(accelerator, ckpt_dir: Path) -> Path | None:
    """``latest_valid`` decided on rank 0 (it reads every file) and broadcast, so every rank loads the same one."""
    from accelerate.utils import broadcast

    found, error = None, None
    if accelerator.is_main_process:
        try:
            found = latest_valid(ckpt_dir)
        except CheckpointError as e:
            error = e
    code = torch.tensor([-2 if error else int(found.name.split("-")[1]) if found else -1], device=accelerator.device)
    code = int(broadcast(code, from_process=0).item())
    if error is not None:
        raise error
    if code == -2:
        raise CheckpointError(f"no valid checkpoint in {ckpt_dir} (rank 0 has the details)")
    return None if code == -1 else ckpt_dir / f"checkpoint-{code}"


def load(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler, scaler and this rank's RNG states from ``path`` (verified by
    ``resume_point``); returns its trainer_state ({"step", "world", "history"})."""
    from safetensors.torch import load_file, load_model

    state = _read_json(path / "trainer_state.json")
    # read on the CPU, copied into the parameters where they are (accelerate's CPU device under DDP is "cpu:<rank>",
    # which safetensors refuses)
    load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"), strict=True, device="cpu")
    tensors, meta = load_file(str(path / "optimizer.safetensors")), _read_json(path / "optimizer.json")
    opt_state = {int(pid): dict(rest) for pid, rest in meta["state"].items()}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = t
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(_read_json(path / "scheduler.json"))
    if accelerator.scaler is not None and (path / "scaler.json").is_file():
        accelerator.scaler.load_state_dict(_read_json(path / "scaler.json"))
    rank = accelerator.process_index
    if state.get("world") != accelerator.num_processes:
        warnings.warn(f"{path} was written by {state.get('world')} processes, this run has "
                      f"{accelerator.num_processes}: the batches (and numbers) differ from an uninterrupted run",
                      CheckpointWarning)
    if (path / f"rng-{rank}.json").is_file():
        set_rng_state(load_file(str(path / f"rng-{rank}.safetensors")), _read_json(path / f"rng-{rank}.json"))
    return state
