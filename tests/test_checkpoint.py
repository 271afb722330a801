"""Checkpoint manifests (every file read is listed and verified) and rewinding to an older
checkpoint (later ones moved aside before anything is written, crash-safe at every write)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file, save_file  # noqa: E402

from liftplace.train import CheckpointError, build_config, distill, load_for_sampling  # noqa: E402
from liftplace.train import checkpoint as ck  # noqa: E402
from liftplace.train.config import load_yaml  # noqa: E402

from testing import TINY_UNET  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "student/diffusion_pytorch_model.safetensors"


def tiny_run(out, **kw):
    cfg = dict(output_dir=str(out), teacher_config=TINY_UNET, dataset_name="synthetic", train_batch_size=4,
               max_train_steps=2, checkpointing_steps=2, logging_steps=1, validation_steps=0,
               num_validation_images=4, ddpm_num_inference_steps=2, student_width_mult=0.5, report_to="none",
               progress_bar=False)
    cfg.update(kw)
    return build_config(None, cfg)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """A checkpoint written by the trainer (EMA on): copy it before changing it."""
    out = tmp_path_factory.mktemp("real")
    distill(tiny_run(out))
    return out / "checkpoint-2"


def edit_state(ckpt: Path, edit) -> None:
    path = ckpt / ck.STATE_FILE
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def copy_run(real_checkpoint, tmp_path) -> Path:
    dest = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(real_checkpoint, dest)
    return dest


# --- item 3: the manifest lists every file, and only well-formed values --------------------------

def test_manifest_entry_removed_and_weights_replaced_by_nan_is_refused(real_checkpoint, tmp_path):
    ckpt = copy_run(real_checkpoint, tmp_path)
    weights = ckpt / WEIGHTS
    sd = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, str(weights))
    edit_state(ckpt, lambda s: s["manifest"].pop(WEIGHTS))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors is not listed in the manifest"):
        distill(tiny_run(ckpt.parent, max_train_steps=4, resume_from_checkpoint="latest"))
    with pytest.raises(CheckpointError, match="not listed in the manifest"):
        load_for_sampling(ckpt, prefer_ema=False)


def test_emptied_manifest_is_refused(real_checkpoint, tmp_path):
    ckpt = copy_run(real_checkpoint, tmp_path)
    edit_state(ckpt, lambda s: s.update(manifest={}))
    with pytest.raises(CheckpointError, match=r"is not listed in the manifest .*resuming reads it"):
        distill(tiny_run(ckpt.parent, max_train_steps=4, resume_from_checkpoint=str(ckpt)))


def test_unlisted_extra_file_is_refused(real_checkpoint, tmp_path):
    ckpt = copy_run(real_checkpoint, tmp_path)
    (ckpt / "student" / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"student/extra\.bin is not listed .*Delete the file if you added it"):
        ck.read_verified_state(ckpt)


@pytest.mark.parametrize("rel", ["kd_loss.safetensors", "student_ema/diffusion_pytorch_model.safetensors"])
def test_file_the_run_reads_missing_from_disk_and_manifest_is_refused(real_checkpoint, tmp_path, rel):
    ckpt = copy_run(real_checkpoint, tmp_path)
    (ckpt / rel).unlink()
    edit_state(ckpt, lambda s: s["manifest"].pop(rel))
    ck.read_verified_state(ckpt)  # consistent as a folder, but not for a run that reads the file
    with pytest.raises(CheckpointError, match=rf"{rel} is not listed in the manifest .*resuming reads it"):
        ck.read_verified_state(ckpt, ck.required_files(ema=True, kd_state=True))
    kw = {"kd_weight": "adaptive-timestep"} if rel.startswith("kd_loss") else {}
    with pytest.raises(CheckpointError, match=rf"{rel} is not listed"):
        distill(tiny_run(ckpt.parent, max_train_steps=4, resume_from_checkpoint="latest", **kw))


def _set(key, value):
    return lambda s: s.update({key: value})


def _entry(**meta):
    def edit(s):
        s["manifest"]["optimizer.pt"] = meta
    return edit


def _rename_entry(new):
    def edit(s):
        s["manifest"][new] = s["manifest"].pop("optimizer.pt")
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda s: [s], "must hold a JSON object, got list"),
    (lambda s: s.pop("manifest") and None, "'manifest' is missing"),
    (_set("manifest", []), "'manifest' must map file paths"),
    (_set("manifest", None), "'manifest' must map file paths"),
    (_entry(sha256="0" * 64), r"manifest entry 'optimizer\.pt' must be \{'size'"),
    (_entry(size="12", sha256="0" * 64), r"manifest entry 'optimizer\.pt' must be"),
    (_entry(size=12, sha256=None), r"manifest entry 'optimizer\.pt' must be"),
    (_entry(size=True, sha256="0" * 64), r"manifest entry 'optimizer\.pt' must be"),
    (lambda s: s["manifest"].update({"optimizer.pt": [1, 2]}), r"manifest entry 'optimizer\.pt' must be"),
    (_rename_entry("../optimizer.pt"), r"'\.\./optimizer\.pt' is not a file path inside"),
    (_rename_entry("/etc/passwd"), "is not a file path inside"),
    (_set("global_step", -1), r"'global_step' must be an integer >= 0, got -1"),
    (_set("global_step", "2"), r"'global_step' must be an integer >= 0, got '2'"),
    (_set("global_step", 2.5), "'global_step' must be an integer"),
    (_set("bad_steps", -3), "'bad_steps' must be an integer >= 0"),
    (_set("num_processes", 0), "'num_processes' must be >= 1"),
    (_set("format_version", 99), "checkpoint format 99 is not the supported format"),
])
def test_malformed_trainer_state_is_a_checkpoint_error(real_checkpoint, tmp_path, edit, message):
    ckpt = copy_run(real_checkpoint, tmp_path)
    state_path = ckpt / ck.STATE_FILE
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps(edit(state) or state))
    with pytest.raises(CheckpointError, match=message):
        ck.read_verified_state(ckpt)


def test_renamed_checkpoint_folder_is_refused(real_checkpoint, tmp_path):
    ckpt = copy_run(real_checkpoint, tmp_path)
    renamed = ckpt.with_name("checkpoint-6")
    ckpt.rename(renamed)
    with pytest.raises(CheckpointError, match="records global_step 2 but the folder is named checkpoint-6"):
        ck.read_verified_state(renamed)


def test_trainer_state_that_is_not_text_is_a_checkpoint_error(real_checkpoint, tmp_path):
    ckpt = copy_run(real_checkpoint, tmp_path)
    (ckpt / ck.STATE_FILE).write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="is corrupt"):
        ck.read_verified_state(ckpt)


# --- item 4: rewinding to an older checkpoint -------------------------------------------------------

def fake_writer(step, lineage):
    def writer(tmp):
        for rel in ck.REQUIRED_FILES:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(f"{lineage} {step} {rel}")
        return {"global_step": step, "lineage": lineage}
    return writer


def fake_run(root, steps, lineage="old"):
    for s in steps:
        ck.write_checkpoint(root, s, fake_writer(s, lineage))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, max(steps) + 1)))


def lineage(path: Path) -> tuple[int, str]:
    state = ck.read_verified_state(path)
    return state["global_step"], state["lineage"]


def rewound_run(root):
    """What the trainer does when it resumes from checkpoint-2 and trains to step 4."""
    ck.clean_stale_temporaries(root)
    resume = root / "checkpoint-2"
    ck.read_verified_state(resume)
    ck.abandon_later_checkpoints(root, 2, resumed_from=resume)
    ck.write_checkpoint(root, 4, fake_writer(4, "new"))


class Crash(BaseException):
    """A simulated SIGKILL: from the chosen write on, nothing more reaches the disk."""


class KillAt:
    """Count every write-like call (rename, fsync, unlink, mkdir, open for writing, copy, the
    checkpoint writer); from the ``at``-th on, raise :class:`Crash` instead."""

    PATCHED = (("os", os, "replace"), ("os", os, "fsync"), ("os", os, "unlink"), ("os", os, "mkdir"),
               ("os", os, "rename"), ("shutil", shutil, "copy2"))

    def __init__(self, at=None):
        self.at, self.calls, self.saved = at, [], []

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            if self.at is not None and len(self.calls) > self.at:
                raise Crash(name)
            return fn(*args, **kwargs)
        return wrapper

    def __enter__(self):
        for mod_name, mod, attr in self.PATCHED:
            self.saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, self._wrap(f"{mod_name}.{attr}", getattr(mod, attr)))
        real_open = open
        ck_globals = ck.__dict__

        def guarded_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                return self._wrap("open", real_open)(file, mode, *args, **kwargs)
            return real_open(file, mode, *args, **kwargs)
        ck_globals["open"] = guarded_open
        real_write_text = Path.write_text
        self.saved.append((Path, "write_text", real_write_text))
        Path.write_text = self._wrap("write_text", real_write_text)
        return self

    def __exit__(self, *exc):
        ck.__dict__.pop("open", None)
        for mod, attr, fn in reversed(self.saved):
            setattr(mod, attr, fn)
        return False


def test_rewind_moves_later_checkpoints_aside_before_writing(tmp_path):
    fake_run(tmp_path, [2, 4, 6])
    rewound_run(tmp_path)
    assert [lineage(p) for _, p in ck.list_checkpoints(tmp_path)] == [(2, "old"), (4, "new")]
    (abandoned,) = tmp_path.glob("abandoned-after-step-2-*")
    assert [lineage(p) for _, p in ck._scan_checkpoints(abandoned)] == [(4, "old"), (6, "old")]
    assert len((abandoned / "metrics.jsonl").read_text().splitlines()) == 6  # the abandoned run's record
    assert not (tmp_path / ck.REWIND_JOURNAL).exists()
    # checkpoints_total_limit never reaches into the abandoned folder
    assert ck.prune_checkpoints(tmp_path, 1) == [tmp_path / "checkpoint-2"]
    assert len(ck._scan_checkpoints(abandoned)) == 2


def test_rewind_crash_at_every_write_point_leaves_one_lineage(tmp_path):
    probe = tmp_path / "probe"
    fake_run(probe, [2, 4, 6])
    with KillAt() as count:
        rewound_run(probe)
    n = len(count.calls)
    assert n >= 10 and "os.replace" in count.calls and "os.fsync" in count.calls
    before, committed, done = [(2, "old"), (4, "old"), (6, "old")], [(2, "old")], [(2, "old"), (4, "new")]
    outcomes = []
    for at in range(n):
        root = tmp_path / f"kill-{at}"
        fake_run(root, [2, 4, 6])
        with KillAt(at), pytest.raises(Crash):
            rewound_run(root)
        where = (at, count.calls[at])
        # what the next run sees before it writes anything: one lineage, never the abandoned 4 or 6
        visible = [lineage(p) for _, p in ck.list_checkpoints(root)]
        assert visible in (before, committed, done), (where, visible)
        outcomes.append(visible)
        ck.clean_stale_temporaries(root)
        assert [lineage(p) for _, p in ck.list_checkpoints(root)] == visible, where
        assert not list(root.glob(".tmp-*")) and not (root / ck.REWIND_JOURNAL).exists(), where
        assert ck.latest_checkpoint(root) == root / f"checkpoint-{visible[-1][0]}", where
        if visible != done:  # the rerun of the same command ends where an uninterrupted one does
            rewound_run(root)
        assert [lineage(p) for _, p in ck.list_checkpoints(root)] == done, where
        (abandoned,) = root.glob(f"{ck.ABANDONED_PREFIX}*")  # nothing of the old run is lost
        assert [lineage(p) for _, p in ck._scan_checkpoints(abandoned)] == [(4, "old"), (6, "old")], where
    # the rewind takes effect once its journal is in place, and holds from then on
    first = outcomes.index(committed)
    assert outcomes[:first] == [before] * first and before not in outcomes[first:]


def test_interrupted_rewind_journal_hides_checkpoints_until_finished(tmp_path):
    fake_run(tmp_path, [2, 4, 6])
    journal = {"after_step": 2, "move": ["checkpoint-4", "checkpoint-6"], "to": "abandoned-after-step-2-x"}
    (tmp_path / ck.REWIND_JOURNAL).write_text(json.dumps(journal))
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    ck.clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in (tmp_path / "abandoned-after-step-2-x").iterdir()) == [
        "checkpoint-4", "checkpoint-6", "metrics.jsonl"]
    (tmp_path / ck.REWIND_JOURNAL).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"rewind-in-progress\.json is malformed"):
        ck.latest_checkpoint(tmp_path)


def test_replacing_an_existing_checkpoint_crash_between_renames(tmp_path):
    fake_run(tmp_path, [2, 4])
    with KillAt() as count:
        ck.write_checkpoint(tmp_path, 4, fake_writer(4, "new"))
    assert lineage(tmp_path / "checkpoint-4") == (4, "new") and not list(tmp_path.glob("abandoned-*"))
    fake_run(tmp_path, [4])
    second_replace = [i for i, c in enumerate(count.calls) if c == "os.replace"][1]
    with KillAt(second_replace), pytest.raises(Crash):
        ck.write_checkpoint(tmp_path, 4, fake_writer(4, "new"))
    ck.clean_stale_temporaries(tmp_path)
    assert [lineage(p) for _, p in ck.list_checkpoints(tmp_path)] == [(2, "old")]
    (old,) = tmp_path.glob("abandoned-replaced-checkpoint-4-*")
    assert lineage(old / "checkpoint-4") == (4, "old")  # kept, out of latest's reach


def test_trainer_rewind_then_crash_while_resaving_resumes_the_rewound_run(tmp_path, monkeypatch):
    """The issue's scenario with the real trainer: checkpoints 2, 4, 6; resume from 2; crash
    while checkpoint-4 is re-saved; the next `latest` resume continues the rewound run and
    ends bitwise where the first run ended."""
    kw = dict(max_train_steps=6, checkpointing_steps=2)
    distill(tiny_run(tmp_path, **kw))
    first6 = load_file(str(tmp_path / "checkpoint-6" / WEIGHTS))

    def killed(root):
        raise Crash("SIGKILL while writing checkpoint-4")
    with monkeypatch.context() as m:
        m.setattr(ck, "_fsync_tree", killed)
        with pytest.raises(Crash):
            distill(tiny_run(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-2"), **kw))
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    (abandoned,) = tmp_path.glob("abandoned-after-step-2-*")
    assert sorted(p.name for p in abandoned.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]

    res = distill(tiny_run(tmp_path, resume_from_checkpoint="latest", **kw))
    assert res.global_step == 6 and [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 4, 6]
    again6 = load_file(str(tmp_path / "checkpoint-6" / WEIGHTS))
    assert all(torch.equal(first6[k], again6[k]) for k in first6)  # exact resume from 2
    assert load_file(str(abandoned / "checkpoint-6" / WEIGHTS)).keys() == first6.keys()


def test_fresh_run_in_a_used_output_dir_moves_old_checkpoints_aside(tmp_path):
    distill(tiny_run(tmp_path, max_train_steps=4, checkpointing_steps=2))
    distill(tiny_run(tmp_path, max_train_steps=2, checkpointing_steps=2, learning_rate=1e-4))
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2]
    (abandoned,) = tmp_path.glob("abandoned-after-step-0-*")
    assert sorted(p.name for p in abandoned.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert load_yaml(tmp_path / "checkpoint-2" / "config.yaml")["learning_rate"] == 1e-4
    assert load_yaml(abandoned / "checkpoint-4" / "config.yaml")["learning_rate"] == 1e-3
