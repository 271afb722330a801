"""``report_to``: accelerate's trackers, validated against what accelerate supports and what is
installed; metrics and validation grids reach the tracker (a tracker class registered with
accelerate's ``register_tracker_class``, so no tracker package is needed)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
accelerate = pytest.importorskip("accelerate")

from liftplace.train import ConfigError, Trainer, build_config  # noqa: E402
from liftplace.train.distributed import (installed_trackers, parse_report_to, resolve_trackers,  # noqa: E402
                                         supported_trackers)

from testing import TINY_UNET as TEACHER  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(out, **kw):
    base = dict(output_dir=str(out), teacher_config=TEACHER, dataset_name="synthetic", train_batch_size=4,
                max_train_steps=4, logging_steps=2, checkpointing_steps=100, validation_steps=2,
                num_validation_images=4, ddpm_num_inference_steps=2, student_width_mult=0.5, report_to="none",
                progress_bar=False)
    base.update(kw)
    return build_config(None, base)


def test_names_are_accelerates():
    from accelerate.utils import LoggerType

    names = supported_trackers()
    for t in LoggerType:
        assert str(t.value) in names
    assert parse_report_to("none") == [] and parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]


def test_unknown_tracker_is_a_config_error_listing_accelerates(tmp_path):
    with pytest.raises(ConfigError, match=r"report_to: 'tensorbord' is not a tracker accelerate supports.*"
                                          r"tensorboard.*did you mean 'tensorboard'"):
        make_config(tmp_path, report_to="tensorbord")


def test_tracker_not_installed_is_an_error_before_anything_is_written(tmp_path):
    missing = [n for n in ("wandb", "mlflow", "comet_ml", "aim", "tensorboard") if n not in installed_trackers()]
    if not missing:
        pytest.skip("every tracker is installed here")
    cfg = make_config(tmp_path / "out", report_to=missing[0])  # a known name: the config is valid
    with pytest.raises(ConfigError, match=rf"report_to={missing[0]}: accelerate's {missing[0]} tracker needs a "
                                          r"package that is not installed: pip install"):
        Trainer(cfg).train()
    assert not (tmp_path / "out").exists()


@pytest.fixture
def recorder():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    register = pytest.importorskip("accelerate.tracking").__dict__.get("register_tracker_class")
    if register is None:
        pytest.skip("this accelerate has no register_tracker_class")

    class Recorder(GeneralTracker):
        name = "liftplace_test_recorder"
        requires_logging_directory = False
        main_process_only = True
        instances: list = []

        def __init__(self, run_name, **kwargs):
            super().__init__()
            self.config, self.scalars, self.images, self.finished = None, [], [], False
            Recorder.instances.append(self)

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.scalars.append((step, dict(values)))

        def log_images(self, values, step=None, **kwargs):
            self.images.append((step, {k: [v.shape for v in vs] for k, vs in values.items()}))

        def finish(self):
            self.finished = True

    register(Recorder)
    yield Recorder
    LOGGER_TYPE_TO_CLASS.pop(Recorder.name, None)


def test_metrics_and_validation_grids_reach_the_tracker(tmp_path, recorder):
    assert "liftplace_test_recorder" in resolve_trackers("liftplace_test_recorder")
    Trainer(make_config(tmp_path, report_to="liftplace_test_recorder")).train()
    (rec,) = recorder.instances
    assert rec.finished and rec.config["kd_loss"] == "place"
    metrics = [json.loads(s) for s in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in rec.scalars] == [m["step"] for m in metrics] == [2, 4]
    for (_, values), m in zip(rec.scalars, metrics):
        assert values["loss"] == pytest.approx(m["loss"]) and values["kd_weight"] == pytest.approx(m["kd_weight"])
    # the mid-run grid at step 2 and the final one at step 4 (sent before the tracker is closed)
    assert [s for s, _ in rec.images] == [2, 4]
    assert all(shapes["validation"][0][-1] == 3 for _, shapes in rec.images)  # H x W x RGB


def test_tensorboard_writes_events(tmp_path):
    if "tensorboard" not in installed_trackers():
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    Trainer(make_config(tmp_path, report_to="tensorboard")).train()
    assert list((Path(tmp_path) / "logs").rglob("events.out.tfevents.*"))


def test_eval_scores_reach_the_tracker(tmp_path, recorder):
    from liftplace.train.distributed import log_scores

    sent = log_scores("liftplace_test_recorder", tmp_path / "logs", {"fid": 1.5, "kid": 0.25},
                      {"features": {"name": "classifier", "feature_dim": 64}, "seed_policy": "seed + i"})
    assert sent == ["liftplace_test_recorder"]
    (rec,) = recorder.instances
    assert rec.scalars == [(0, {"fid": 1.5, "kid": 0.25})] and rec.finished
    assert rec.config == {"features/name": "classifier", "features/feature_dim": 64, "seed_policy": "seed + i"}


def test_eval_refuses_an_unknown_tracker_before_evaluating(tmp_path, capsys):
    from liftplace.cli import main

    code = main(["eval", "--images", str(tmp_path), "--reference", "digits", "--features", "inception",
                 "--output_dir", str(tmp_path / "out"), "--report_to", "nosuchtracker"])
    assert code == 2
    assert "report_to: 'nosuchtracker' is not a tracker accelerate supports" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
