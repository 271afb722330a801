"""``liftplace eval``: Fréchet distance and KID against closed forms, the whole pipeline on a
random-weight classifier (nothing downloaded), the demo's digits metric, bad input."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from liftplace.cli import main  # noqa: E402
from liftplace.eval.classifier import load_classifier, save_classifier  # noqa: E402
from liftplace.eval.fid import ClassifierFeatures, evaluate, load_images  # noqa: E402
from liftplace.eval.frechet import frechet_distance_from_stats, gaussian_stats, kid, save_stats  # noqa: E402
from liftplace.eval.metrics import DigitsClassifier, sample_quality, train_digits_classifier  # noqa: E402
from liftplace.train.data import DigitsDataset  # noqa: E402
from liftplace.train.models import UNet2DFamily, build_from_config  # noqa: E402
from liftplace.train.sampling import save_images  # noqa: E402

from testing import TINY_UNET  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_from_stats_matches_closed_form_for_two_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    sa, sb = _spd(6, g), _spd(6, g)
    cross = scipy_linalg.sqrtm(sa.numpy() @ sb.numpy()).real
    want = float((mu_a - mu_b).square().sum()) + float(np.trace(sa.numpy() + sb.numpy() - 2 * cross))
    assert frechet_distance_from_stats(mu_a, sa, mu_b, sb) == pytest.approx(want, rel=1e-9)
    # one dimension: (mu_a - mu_b)^2 + (s_a - s_b)^2 with standard deviations s
    one = frechet_distance_from_stats(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]),
                                      torch.tensor([[9.0]]))
    assert one == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_a_set_against_itself_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    stats = gaussian_stats(x)
    assert frechet_distance_from_stats(*stats, *stats) < 1e-9
    # KID of a set against itself is 0 only in expectation (subsets differ): small next to a shift's
    same, shifted = kid(x, x, num_subsets=20, subset_size=100)[0], kid(x, x + 0.5, num_subsets=20, subset_size=100)[0]
    assert abs(same) < 0.05 * shifted


def _poly3_expectation(m1, m2):
    """E[(x y + 1)^3] for independent x ~ N(m1, 1), y ~ N(m2, 1) (moments of the normal)."""
    mom = lambda m: (m, 1 + m * m, m ** 3 + 3 * m)  # noqa: E731 - E[x], E[x^2], E[x^3]
    a, b = mom(m1), mom(m2)
    return a[2] * b[2] + 3 * a[1] * b[1] + 3 * a[0] * b[0] + 1


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_kid_is_unbiased_on_known_data(shift):
    # 1-d features, kernel (x y + 1)^3: the population MMD^2 has a closed form. Small subsets
    # (10 per side) make the biased (V-statistic) estimate visibly off; the unbiased one is not.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40000, 1, generator=g, dtype=torch.float64)
    y = torch.randn(40000, 1, generator=g, dtype=torch.float64) + shift
    want = _poly3_expectation(0, 0) + _poly3_expectation(shift, shift) - 2 * _poly3_expectation(0, shift)
    mean, std = kid(x, y, num_subsets=4000, subset_size=10, seed=3)
    stderr = std / math.sqrt(4000)
    assert abs(mean - want) < 4 * stderr, (mean, want, stderr)
    # the biased estimate differs from the truth by far more than that (diagonal terms kept)
    k = lambda a, b: (a @ b.T + 1) ** 3  # noqa: E731
    xs, ys = x[:10], y[:10]
    biased_bias = float((k(xs, xs).diagonal().mean() + k(ys, ys).diagonal().mean())) / 10
    assert biased_bias > 10 * stderr


def _classifier_file(tmp_path, feature_dim=8, in_channels=1, seed=0):
    """A random-weight classifier: CI needs no trained network and no download."""
    torch.manual_seed(seed)
    model = DigitsClassifier(feature_dim=feature_dim, in_channels=in_channels)
    meta = {"data": "random", "resolution": 16, "seed": seed, "epochs": 0, "accuracy": None, "num_classes": 10,
            "width": 16, "feature_dim": feature_dim, "in_channels": in_channels}
    return save_classifier(model, tmp_path / "clf.safetensors", meta)


def _model_folder(tmp_path):
    from diffusers import DDPMScheduler

    model = build_from_config(TINY_UNET, UNet2DFamily(), "model", seed=0)
    model.save_pretrained(tmp_path / "model")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def _reference_folder(tmp_path, n=24):
    ref = tmp_path / "ref"
    save_images(DigitsDataset(16, split="test").images[:n], ref)
    return str(ref)


def test_pipeline_on_a_random_weight_extractor(tmp_path, capsys):
    clf, model, ref = _classifier_file(tmp_path), _model_folder(tmp_path), _reference_folder(tmp_path)
    args = ["eval", "--model", model, "--reference", ref, "--features", f"classifier:{clf}", "--num_images", "12",
            "--batch_size", "5", "--num_inference_steps", "2", "--kid_subsets", "3", "--device", "cpu"]
    assert main(args + ["--output_dir", str(tmp_path / "a")]) == 0
    rec = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert set(rec["scores"]) == {"frechet_distance", "kid", "kid_std"}
    assert rec["scores"]["frechet_distance"] > 0 and math.isfinite(rec["scores"]["kid"])
    p = rec["protocol"]
    assert p["features"]["sha256"] and len(p["features"]["sha256"]) == 64 and p["features"]["feature_dim"] == 8
    assert p["images"]["n"] == 12 and p["resize"] == "none"
    assert p["generated"]["sampler"] == "DDIM" and p["generated"]["num_inference_steps"] == 2
    assert p["generated"]["guidance"] is None and "seed + i" in p["generated"]["seed_policy"]
    assert len(p["reference"]["stats_sha256"]) == 64 and p["reference"]["n"] == 24
    assert "torch" in p["versions"] and p["kid"]["subset_size"] == 12
    assert "frechet_distance:" in capsys.readouterr().out

    # per-image seeds: another batch size gives the same images; a resumed run keeps what is there
    assert main(args[:7] + ["--num_images", "7", "--batch_size", "3", "--num_inference_steps", "2",
                            "--allow_small_n", "--output_dir", str(tmp_path / "b")]) == 0
    a, b = load_images(tmp_path / "a" / "samples"), load_images(tmp_path / "b" / "samples")
    assert torch.equal(a[:7], b)
    # `liftplace sample` writes images and grid.png: the folder scores as it is
    assert main(["sample", "--model", model, "--num_images", "9", "--batch_size", "4", "--num_inference_steps", "2",
                 "--output_dir", str(tmp_path / "sampled"), "--device", "cpu"]) == 0
    assert torch.equal(load_images(tmp_path / "sampled"), a[:9])
    assert main(args + ["--output_dir", str(tmp_path / "b")]) == 0
    rec_b = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert rec_b["protocol"]["generated"]["reused"] == 7
    assert rec_b["scores"] == rec["scores"]

    # a folder of images scores the same as the model run that wrote it; .npz statistics too
    npz = tmp_path / "ref.npz"
    evaluate(images=tmp_path / "a" / "samples", reference=ref, features=f"classifier:{clf}",
             output_dir=tmp_path / "c", kid_subsets=3, save_reference_stats=npz, precision_recall_k=3)
    folder = json.loads((tmp_path / "c" / "scores.json").read_text())
    assert 0 <= folder["scores"].pop("precision") <= 1 and 0 <= folder["scores"].pop("recall") <= 1
    assert folder["scores"] == rec["scores"] and folder["protocol"]["precision_recall"]["k"] == 3
    via_npz = evaluate(images=tmp_path / "a" / "samples", reference=str(npz), features=f"classifier:{clf}",
                       output_dir=tmp_path / "d")
    assert via_npz["scores"] == {"frechet_distance": rec["scores"]["frechet_distance"]}
    assert via_npz["protocol"]["reference"]["stats_sha256"] == p["reference"]["stats_sha256"]


def test_digits_numbers_equal_the_demo_metric(tmp_path):
    clf, acc = train_digits_classifier(resolution=16, seed=0, epochs=2)
    path = save_classifier(clf, tmp_path / "digits.safetensors",
                           {"data": "digits", "resolution": 16, "accuracy": acc, "num_classes": 10, "width": 16,
                            "feature_dim": 64, "in_channels": 1})
    # stand-in "samples": noisy held-out digits, as a generated set would be
    g = torch.Generator().manual_seed(0)
    held = DigitsDataset(16, split="test", seed=0).images
    samples = (held + 0.3 * torch.randn(held.shape, generator=g)).clamp(-1, 1)
    reference = DigitsDataset(16, split="train", seed=0).images
    demo = sample_quality(clf, samples, reference)["frechet"]
    ext = ClassifierFeatures(path)
    ours = frechet_distance_from_stats(*gaussian_stats(ext.features(samples)), *gaussian_stats(ext.features(reference)))
    assert ours == demo  # the same weights, features and float64 statistics: equal, not close
    # the built-in reference of `liftplace eval` is that same train split
    save_images(samples, tmp_path / "s")
    rec = evaluate(images=tmp_path / "s", reference="digits", features=f"classifier:{path}", output_dir=tmp_path)
    quantised = sample_quality(clf, load_images(tmp_path / "s").float() / 127.5 - 1, reference)["frechet"]
    assert rec["scores"]["frechet_distance"] == pytest.approx(quantised, rel=1e-12)


def test_train_classifier_on_a_labelled_folder(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    for label, level in (("dark", 40), ("bright", 210)):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(20):
            arr = np.clip(g.normal(level, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / label / f"{i}.png")
    out = tmp_path / "clf.safetensors"
    assert main(["train-classifier", "--data", str(tmp_path / "data"), "--channels", "3", "--epochs", "15",
                 "--output", str(out)]) == 0
    model, meta = load_classifier(out)
    assert meta["in_channels"] == 3 and meta["num_classes"] == 2 and meta["accuracy"] == 1.0
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 2)


def _write(folder, arrays):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def test_bad_input_names_the_fix(tmp_path, capsys):
    clf = _classifier_file(tmp_path)
    feats = f"classifier:{clf}"
    gray = np.zeros((16, 16), np.uint8)
    mixed_size = _write(tmp_path / "size", [gray, np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match=r"differ in size or channels: 0.png is 16x16 with 1 channel, 1.png is 8x8"):
        load_images(mixed_size)
    mixed_ch = _write(tmp_path / "ch", [gray, np.zeros((16, 16, 3), np.uint8)])
    with pytest.raises(ValueError, match="with 3 channels; every image must share"):
        load_images(mixed_ch)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_images(tmp_path / "empty")
    few = _write(tmp_path / "few", [gray + i for i in range(5)])
    with pytest.raises(ValueError, match=r"5 generated images give a singular 8x8 .*--num_images > 8"):
        evaluate(images=few, reference="digits", features=feats, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="weights-inception-2015-12-05-6726825d.pth"):
        evaluate(images=few, reference="digits", features="inception", output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="--inception_weights PATH .* does not exist"):
        evaluate(images=few, reference="digits", features="inception", inception_weights=tmp_path / "no.pth",
                 output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="liftplace train-classifier --output"):
        evaluate(images=few, reference="digits", features=f"classifier:{tmp_path / 'no.safetensors'}",
                 output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="'inception' or 'classifier:PATH'"):
        evaluate(images=few, reference="digits", features="clip", output_dir=tmp_path / "o")
    many = _write(tmp_path / "many", [(gray + i) for i in range(12)])
    np.savez(tmp_path / "bad.npz", mean=np.zeros(8))
    with pytest.raises(ValueError, match="must hold arrays 'mu'.*pytorch-fid"):
        evaluate(images=many, reference=str(tmp_path / "bad.npz"), features=feats, output_dir=tmp_path / "o")
    save_stats(tmp_path / "wide.npz", torch.zeros(2048), torch.eye(2048))
    with pytest.raises(ValueError, match="holds 2048-d statistics but the features are 8-d"):
        evaluate(images=many, reference=str(tmp_path / "wide.npz"), features=feats, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="exactly one of --images DIR and --model PATH"):
        evaluate(reference="digits", features=feats, output_dir=tmp_path / "o")
    # a sample folder made with other settings is not mixed into a new run
    model = _model_folder(tmp_path)
    evaluate(model=model, reference="digits", features=feats, output_dir=tmp_path / "m", num_images=9,
             num_inference_steps=2, kid_subsets=2)
    with pytest.raises(ValueError, match="holds samples made with other settings.*another --samples_dir"):
        evaluate(model=model, reference="digits", features=feats, output_dir=tmp_path / "m", num_images=9,
                 num_inference_steps=3)
    # the CLI turns them into exit code 2 with the message
    assert main(["eval", "--images", str(tmp_path / "empty"), "--reference", "digits", "--features", feats,
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_inception_path_on_a_stand_in_network(tmp_path, monkeypatch):
    """The --features inception glue (uint8 in, gray repeated to RGB, batching, protocol) with a
    random-weight stand-in for torch-fidelity's extractor: nothing is installed or downloaded."""
    import sys
    import types

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            assert name == "inception-v3-compat" and features_list == ["2048"]
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(3, 2048)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
            return (self.proj(x.float().mean((2, 3)) / 255),)

    fid_mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fid_mod.FeatureExtractorInceptionV3 = FakeInception
    pkg = types.ModuleType("torch_fidelity")
    pkg.__version__ = "stand-in"
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fid_mod)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in")
    images = _reference_folder(tmp_path, n=10)
    rec = evaluate(images=images, reference=images, features="inception", inception_weights=weights,
                   output_dir=tmp_path / "o", allow_small_n=True, kid_subsets=2)
    assert rec["scores"]["fid"] == rec["scores"]["frechet_distance"] < 1e-6
    p = rec["protocol"]["features"]
    assert p["feature_dim"] == 2048 and p["sha256"] == hashlib.sha256(b"stand-in").hexdigest()
    assert "299x299" in rec["protocol"]["resize"]


def test_precision_recall():
    from liftplace.eval.frechet import precision_recall

    g = torch.Generator().manual_seed(4)
    real = torch.randn(300, 4, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    # a generator that covers half the real distribution: precise, but recall about 1/2
    half = real[real[:, 0] > 0]
    p, r = precision_recall(real, half)
    assert p == 1.0 and 0.4 < r < 0.65
    with pytest.raises(ValueError, match="needs more than 3 points"):
        precision_recall(real[:3], real)
