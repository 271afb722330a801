"""Atomic, verifiable, resumable checkpoints in diffusers-style folders.

    output_dir/checkpoint-<step>/
        student/              config.json + diffusion_pytorch_model.safetensors (save_pretrained)
        student_ema/          the EMA weights, same layout (EMAModel.save_pretrained)
        adapters.safetensors  feature-KD adapters, when used
        optimizer.pt  lr_scheduler.pt  random_states.pt   (torch.save of plain state, weights_only-safe)
        scheduler_config.json config.yaml
        trainer_state.json    step, data position, counters, and a manifest (size + sha256 of every file)

A checkpoint is written into ``.tmp-checkpoint-<step>-<pid>`` and renamed into place
with ``os.replace``: a crash mid-write leaves a temporary folder that resume ignores
(and the next run deletes), never a half ``checkpoint-<step>``. ``trainer_state.json``
is written last; loading verifies every file against its manifest entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Completed checkpoints (by folder name) sorted by step."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir) -> Path | None:
    cps = list_checkpoints(output_dir)
    return cps[-1][1] if cps else None


def clean_stale_temporaries(output_dir) -> None:
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(output_dir, keep: int | None) -> list[Path]:
    """Delete all but the ``keep`` most recent checkpoints; returns the deleted folders."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {keep}")
    removed = []
    for _, p in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p)
        removed.append(p)
    return removed


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(output_dir, step: int, writer) -> Path:
    """Create ``checkpoint-<step>`` atomically. ``writer(tmp_dir) -> dict`` fills the folder and
    returns the trainer state; the manifest and ``trainer_state.json`` are added here."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = writer(tmp)
        manifest = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                manifest[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        state = dict(state, format_version=FORMAT_VERSION, manifest=manifest)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first
            old = root / f".tmp-checkpoint-{step}-{os.getpid()}-old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_verified_state(ckpt: Path) -> dict:
    """``trainer_state.json`` of ``ckpt`` after checking every manifest file's size and sha256."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not exist or is not a folder")
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing: {ckpt} is incomplete or not a liftplace checkpoint")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path} is corrupt (not valid JSON: {exc})") from exc
    if not isinstance(state, dict) or "manifest" not in state or "global_step" not in state:
        raise CheckpointError(f"{state_path} is corrupt: missing 'manifest' or 'global_step'")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: checkpoint format {state.get('format_version')!r} is not the "
                              f"supported format {FORMAT_VERSION}")
    for rel, meta in state["manifest"].items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing (listed in {STATE_FILE})")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: {size} bytes, expected {meta['size']}")
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: sha256 {digest[:16]}... does not match "
                                  f"the recorded {meta['sha256'][:16]}...")
    return state


def load_torch_state(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - name the file whatever failed
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc


def check_state_dict(path: Path, loaded: dict, expected: dict, what: str) -> None:
    """Same keys and shapes, or a :class:`CheckpointError` naming the file and the first mismatch."""
    missing = [k for k in expected if k not in loaded]
    extra = [k for k in loaded if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]!r})")
        raise CheckpointError(f"{path} does not match the {what}: {', '.join(parts)} tensors")
    for k, v in expected.items():
        if tuple(loaded[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path} does not match the {what}: tensor {k!r} has shape "
                                  f"{list(loaded[k].shape)} in the checkpoint but {list(v.shape)} in the model")


def load_safetensors_checked(path: Path, expected: dict, what: str) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        loaded = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint file {path} is corrupt or not safetensors: {exc}") from exc
    check_state_dict(path, loaded, expected, what)
    return loaded


def compare_model_config(path: Path, saved: dict, current: dict, what: str) -> None:
    keys = sorted(set(saved) | set(current))
    diffs = [k for k in keys
             if not k.startswith("_") and k not in _EMA_KEYS and _norm(saved.get(k)) != _norm(current.get(k))]
    if diffs:
        k = diffs[0]
        raise CheckpointError(f"{path} does not match the {what}: {k!r} is {saved.get(k)!r} in the checkpoint "
                              f"but {current.get(k)!r} now" + (f" (and {len(diffs) - 1} more keys differ)"
                                                                 if len(diffs) > 1 else ""))


_EMA_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v
