"""Atomic, verifiable, resumable checkpoints in diffusers-style folders.

    output_dir/checkpoint-<step>/
        student/              config.json + diffusion_pytorch_model.safetensors (save_pretrained)
        student_ema/          the EMA weights, same layout (EMAModel.save_pretrained)
        adapters.safetensors  feature-KD adapters, when used
        kd_loss.safetensors   the KD loss's per-timestep-bucket EMA
        optimizer.pt  lr_scheduler.pt  random_states.pt   (torch.save of plain state, weights_only-safe)
        scheduler_config.json config.yaml
        trainer_state.json    step, data position, counters, and a manifest (size + sha256 of every file)

A checkpoint is written into ``.tmp-checkpoint-<step>-<pid>`` and renamed into place
with ``os.replace``: a crash mid-write leaves a temporary folder that resume ignores
(and the next run deletes), never a half ``checkpoint-<step>``. ``trainer_state.json``
is written last. Loading verifies that the manifest lists exactly the files in the
folder (and every file the loader needs), and every file's size and sha256.

A run that starts at step ``S`` (a fresh run: 0) while ``output_dir`` holds checkpoints
past ``S`` moves them into ``output_dir/abandoned-after-step-<S>-<time>/`` before it
writes anything (:func:`abandon_later_checkpoints`), so ``latest`` can never resume the
abandoned run. The move is journaled in ``rewind-in-progress.json``: while the journal
exists the checkpoints it names are invisible to :func:`list_checkpoints`, and the next
run finishes the move (:func:`clean_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path, PurePosixPath

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
REWIND_JOURNAL = "rewind-in-progress.json"
ABANDONED_PREFIX = "abandoned-"
# Read by every resume (and by ``liftplace sample``): they must be in the manifest.
REQUIRED_FILES = ("config.yaml", "optimizer.pt", "lr_scheduler.pt", "random_states.pt", "scheduler_config.json",
                  "student/config.json", "student/diffusion_pytorch_model.safetensors")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _scan_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Completed checkpoints (by folder name) sorted by step, less those an interrupted
    rewind is moving aside (see :func:`abandon_later_checkpoints`)."""
    root = Path(output_dir)
    journal = _read_journal(root)
    hidden = set(journal["move"]) if journal else set()
    return [(s, p) for s, p in _scan_checkpoints(root) if p.name not in hidden]


def latest_checkpoint(output_dir) -> Path | None:
    cps = list_checkpoints(output_dir)
    return cps[-1][1] if cps else None


def clean_stale_temporaries(output_dir) -> None:
    """After a crash: finish an interrupted rewind, delete temporary checkpoint folders."""
    root = Path(output_dir)
    if root.is_dir():
        journal = _read_journal(root)
        if journal is not None:
            _finish_rewind(root, journal)
        (root / (REWIND_JOURNAL + ".tmp")).unlink(missing_ok=True)
        for p in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)


# --- rewinding ---------------------------------------------------------------------------------

def _read_journal(root: Path) -> dict | None:
    path = root / REWIND_JOURNAL
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); it journals a move of later checkpoints into an "
                              f"{ABANDONED_PREFIX}* folder. Move any checkpoint-<step> past the step you resumed "
                              "from into such a folder by hand, then delete the journal") from exc
    ok = (isinstance(journal, dict) and isinstance(journal.get("to"), str)
          and journal["to"].startswith(ABANDONED_PREFIX) and "/" not in journal["to"]
          and isinstance(journal.get("move"), list)
          and all(isinstance(n, str) and CHECKPOINT_RE.match(n) for n in journal["move"]))
    if not ok:
        raise CheckpointError(f"{path} is malformed (expected {{'to': 'abandoned-...', 'move': ['checkpoint-N', "
                              "...]}); move the checkpoints past the step you resumed from aside by hand, then "
                              "delete the journal")
    return journal


def _abandoned_dir_name(root: Path, label: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = f"{ABANDONED_PREFIX}{label}-{stamp}", 1
    while (root / name).exists():
        n += 1
        name = f"{ABANDONED_PREFIX}{label}-{stamp}-{n}"
    return name


def _finish_rewind(root: Path, journal: dict) -> None:
    """Carry out a journaled move (idempotent: a crash anywhere in it is finished by a rerun)."""
    dest = root / journal["to"]
    dest.mkdir(exist_ok=True)
    metrics = root / "metrics.jsonl"
    if metrics.is_file():
        shutil.copy2(metrics, dest / metrics.name)  # the abandoned run's record, before resume truncates it
    for name in journal["move"]:
        src = root / name
        if src.is_dir():
            if (dest / name).exists():
                raise CheckpointError(f"cannot move {src} aside: {dest / name} exists already; move one of "
                                      f"them elsewhere and delete {root / REWIND_JOURNAL}")
            os.replace(src, dest / name)
    _fsync_dir(dest)
    _fsync_dir(root)
    (root / REWIND_JOURNAL).unlink()
    _fsync_dir(root)


def abandon_later_checkpoints(output_dir, step: int, resumed_from=None) -> Path | None:
    """Before a run that starts at ``step`` (0: a fresh run; else the step of ``resumed_from``)
    writes anything, move every checkpoint of ``output_dir`` past ``step`` -- and one at
    ``step`` that is not ``resumed_from`` itself -- into ``output_dir/abandoned-after-step-<step>-<time>/``
    (with a copy of ``metrics.jsonl``), so that ``latest`` can only find checkpoints of this run.

    Crash-safe: the move is first written to the journal ``rewind-in-progress.json``
    (atomically); from then on :func:`list_checkpoints` ignores the checkpoints it names,
    and :func:`clean_stale_temporaries` (or the next call of this function) finishes it.
    Returns the folder they were moved into, or ``None`` when there were none.
    Call it on the main process only.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    journal = _read_journal(root)
    if journal is not None:
        _finish_rewind(root, journal)
    keep = Path(resumed_from).resolve() if resumed_from is not None else None
    later = [p.name for s, p in _scan_checkpoints(root) if s > step or (s == step and p.resolve() != keep)]
    if not later:
        return None
    journal = {"after_step": step, "resumed_from": str(resumed_from) if resumed_from is not None else None,
               "move": later, "to": _abandoned_dir_name(root, f"after-step-{step}")}
    _write_json_atomic(root / REWIND_JOURNAL, journal)
    _finish_rewind(root, journal)
    dest = root / journal["to"]
    _log.warning(f"this run starts at step {step}; the later checkpoints {', '.join(later)} (of an earlier run) "
                 f"were moved to {dest} so that resume_from_checkpoint=latest cannot pick them up")
    return dest


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
            # os.replace cannot replace a non-empty folder: move the old one aside first, where
            # latest cannot see it (a crash between the two renames leaves it there, not deleted)
            old = root / _abandoned_dir_name(root, f"replaced-checkpoint-{step}")
            old.mkdir()
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def required_files(*, ema: bool = False, adapters: bool = False, kd_state: bool = False) -> tuple[str, ...]:
    """The files a resume reads, relative to the checkpoint: :data:`REQUIRED_FILES`, plus the
    EMA weights (``ema``), the feature-KD adapters (``adapters``) and the KD loss's state
    (``kd_state``: a loss whose state changes the result, i.e. ``kd_weight=adaptive-timestep``)."""
    files = list(REQUIRED_FILES)
    if ema:
        files += ["student_ema/config.json", "student_ema/diffusion_pytorch_model.safetensors"]
    if adapters:
        files.append("adapters.safetensors")
    if kd_state:
        files.append("kd_loss.safetensors")
    return tuple(files)


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_state_fields(state, state_path: Path) -> None:
    """``trainer_state.json``'s shape and types, or a :class:`CheckpointError` naming the field."""
    corrupt = f"{state_path} is corrupt or was edited"
    if not isinstance(state, dict):
        raise CheckpointError(f"{corrupt}: it must hold a JSON object, got {type(state).__name__}")
    for key in ("format_version", "manifest", "global_step"):
        if key not in state:
            raise CheckpointError(f"{corrupt}: {key!r} is missing")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: checkpoint format {state['format_version']!r} is not the "
                              f"supported format {FORMAT_VERSION}")
    for key in ("global_step", "micro_index", "epoch", "bad_steps", "consecutive_bad_steps", "num_processes"):
        if key in state and not _nonneg_int(state[key]):
            raise CheckpointError(f"{corrupt}: {key!r} must be an integer >= 0, got {state[key]!r}")
    if state.get("num_processes", 1) < 1:
        raise CheckpointError(f"{corrupt}: 'num_processes' must be >= 1, got {state['num_processes']!r}")
    manifest = state["manifest"]
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{corrupt}: 'manifest' must map file paths to {{'size', 'sha256'}}, "
                              f"got {type(manifest).__name__}")
    for rel, meta in manifest.items():
        parts = PurePosixPath(rel).parts
        if (not rel or rel.startswith("/") or "\\" in rel or ".." in parts or "." in parts
                or rel != PurePosixPath(rel).as_posix() or rel == STATE_FILE):
            raise CheckpointError(f"{corrupt}: manifest entry {rel!r} is not a file path inside the checkpoint")
        if not isinstance(meta, dict) or not _nonneg_int(meta.get("size")) \
                or not (isinstance(meta.get("sha256"), str) and _SHA256_RE.match(meta["sha256"])):
            raise CheckpointError(f"{corrupt}: manifest entry {rel!r} must be {{'size': bytes (int >= 0), "
                                  f"'sha256': 64 hex digits}}, got {meta!r}")


def read_verified_state(ckpt: Path, required=REQUIRED_FILES) -> dict:
    """``trainer_state.json`` of ``ckpt`` after checking that its manifest lists exactly the
    files in the folder, including every path in ``required`` (what the caller will read;
    see :func:`required_files`), and each file's size and sha256. Anything else -- a
    malformed manifest, a negative step, a file missing, unlisted or changed -- is a
    :class:`CheckpointError` naming the file."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not exist or is not a folder")
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing: {ckpt} is incomplete or not a liftplace checkpoint")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path} is corrupt (not valid JSON: {exc})") from exc
    _check_state_fields(state, state_path)
    named = CHECKPOINT_RE.match(ckpt.name)
    if named and int(named.group(1)) != state["global_step"]:
        raise CheckpointError(f"{state_path} records global_step {state['global_step']} but the folder is named "
                              f"{ckpt.name}: it was renamed or copied over; rename it back to "
                              f"checkpoint-{state['global_step']}")
    manifest = state["manifest"]
    fix = "resume from another checkpoint (or start a new output_dir)"
    for rel in required:
        if rel not in manifest:
            raise CheckpointError(f"checkpoint file {ckpt / rel} is not listed in the manifest of {state_path} "
                                  f"but resuming reads it: the checkpoint is incomplete or was edited; {fix}")
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {STATE_FILE}
    unlisted = sorted(on_disk - set(manifest))
    if unlisted:
        more = f" (and {len(unlisted) - 1} more files)" if len(unlisted) > 1 else ""
        raise CheckpointError(f"checkpoint file {ckpt / unlisted[0]}{more} is not listed in the manifest of "
                              f"{state_path}, so it cannot be verified: the checkpoint was changed after it was "
                              f"written. Delete the file if you added it; otherwise {fix}")
    for rel, meta in manifest.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing (listed in {STATE_FILE}); {fix}")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: {size} bytes, expected {meta['size']}; {fix}")
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: sha256 {digest[:16]}... does not match "
                                  f"the recorded {meta['sha256'][:16]}...; {fix}")
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
