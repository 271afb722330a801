"""Datasets, evaluation metrics and plots (liftplace.train.data, liftplace.eval.metrics, .plots)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from liftplace.eval.metrics import (
    DigitsClassifier,
    frechet_distance,
    sample_quality,
    teacher_agreement,
    train_digits_classifier,
)
from liftplace.eval.plots import plot_heatmap, plot_training_curves, save_image_grid
from liftplace.train.data import DigitsDataset, ImageFolderDataset, SyntheticDataset, make_dataset, random_hflip

diffusers = pytest.importorskip("diffusers")

# ---------------------------------------------------------------------------------
# Datasets


@pytest.mark.parametrize("resolution", [8, 16, 20])
def test_digits_shape_range_labels(resolution):
    ds = DigitsDataset(resolution=resolution)
    item = ds[0]
    x = item["pixel_values"]
    assert x.shape == (1, resolution, resolution) and x.dtype == torch.float32
    assert isinstance(item["label"], int) and 0 <= item["label"] <= 9
    assert ds.images.shape == (len(ds), 1, resolution, resolution)
    assert ds.labels.dtype == torch.long and ds.labels.shape == (len(ds),)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    # Background is exactly -1 and strokes reach the top of the range.
    assert ds.images.min() == -1 and ds.images.max() > 0.9
    assert set(ds.labels.tolist()) == set(range(10))


def test_digits_split_disjoint_and_complete():
    train = DigitsDataset(split="train", holdout_fraction=0.2, seed=3)
    test = DigitsDataset(split="test", holdout_fraction=0.2, seed=3)
    full = DigitsDataset(split="all", seed=3)
    assert len(full) == 1797
    assert len(train) + len(test) == len(full)
    assert len(test) == round(1797 * 0.2)
    a, b = set(train.indices.tolist()), set(test.indices.tolist())
    assert not (a & b)
    assert a | b == set(range(1797))
    # The same image at the same sklearn index, whichever split holds it.
    i = int(test.indices[0])
    torch.testing.assert_close(test.images[0], full.images[i], rtol=0, atol=0)
    assert int(test.labels[0]) == int(full.labels[i])


def test_digits_split_deterministic_and_seeded():
    a = DigitsDataset(split="test", seed=0)
    b = DigitsDataset(split="test", seed=0)
    c = DigitsDataset(split="test", seed=1)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.indices, c.indices)
    # The split does not depend on the resolution.
    assert torch.equal(a.indices, DigitsDataset(resolution=12, split="test", seed=0).indices)


def test_random_hflip_flips_each_image_or_not_from_the_generator():
    images = DigitsDataset(split="test").images[:32]
    out = random_hflip(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, x.flip(-1)) for o, x in zip(out, images)]
    plain = [torch.equal(o, x) for o, x in zip(out, images)]
    assert any(flipped) and any(plain) and all(f or p for f, p in zip(flipped, plain))
    # a function of the generator alone: the same seed flips the same images
    assert torch.equal(out, random_hflip(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_hflip(images, torch.Generator().manual_seed(1)))


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        DigitsDataset(split="val")
    with pytest.raises(ValueError, match="holdout_fraction"):
        DigitsDataset(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="resolution"):
        DigitsDataset(resolution=0)


def _write_images(folder, sizes, mode="RGB"):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{k}.png")


def test_image_folder_loading(tmp_path):
    _write_images(tmp_path / "imgs", [(40, 30), (24, 24), (17, 50)])
    _write_images(tmp_path / "imgs" / "sub", [(20, 20)], mode="L")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path / "imgs", resolution=16, channels=3)
    assert len(ds) == 4  # recursive, text file ignored
    for i in range(len(ds)):
        item = ds[i]
        x = item["pixel_values"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and item["label"] == 0
    gray = ImageFolderDataset(tmp_path / "imgs", resolution=8, channels=1)
    assert gray[0]["pixel_values"].shape == (1, 8, 8)


def test_image_folder_exact_values(tmp_path):
    # A 16x16 image at resolution 16: no resize, no crop, so values map exactly.
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    (tmp_path / "f").mkdir()
    Image.fromarray(arr).save(tmp_path / "f" / "a.png")
    ds = ImageFolderDataset(tmp_path / "f", resolution=16, channels=1)
    expected = torch.from_numpy(arr.astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(ds[0]["pixel_values"][0], expected)
    # the dataset never flips (the trainer does, with random_hflip)
    assert all(torch.equal(ds[0]["pixel_values"][0], expected) for _ in range(8))


def test_image_folder_random_crop_within_image(tmp_path):
    # Wide image: shorter side already 16, so random crops are windows of the original.
    arr = np.tile(np.arange(64, dtype=np.uint8) * 4, (16, 1))
    (tmp_path / "w").mkdir()
    Image.fromarray(arr).save(tmp_path / "w" / "a.png")
    ds = ImageFolderDataset(tmp_path / "w", resolution=16, channels=1,
                            center_crop=False)
    torch.manual_seed(0)
    starts = {int(round((float(ds[0]["pixel_values"][0, 0, 0]) + 1) * 127.5)) // 4 for _ in range(20)}
    assert len(starts) > 1 and all(0 <= s <= 48 for s in starts)
    center = ImageFolderDataset(tmp_path / "w", resolution=16, channels=1)
    assert int(round((float(center[0]["pixel_values"][0, 0, 0]) + 1) * 127.5)) == 24 * 4


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found in .*empty.*\.png"):
        ImageFolderDataset(tmp_path / "empty", resolution=16)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", resolution=16)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path / "empty", resolution=16, channels=2)


def test_synthetic_deterministic_smooth():
    a, b = SyntheticDataset(seed=5), SyntheticDataset(seed=5)
    c = SyntheticDataset(seed=6)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 1, 16, 16)
    assert a.images.min() > -1 and a.images.max() < 1 and a.images.std() > 0.2
    x = a[3]["pixel_values"]
    assert x.shape == (1, 16, 16) and a[3]["label"] == 0
    # Smooth: neighbouring pixels differ much less than random pixels do.
    neighbour = (a.images[..., 1:] - a.images[..., :-1]).abs().mean()
    shuffled = a.images.flatten()[torch.randperm(a.images.numel(), generator=torch.Generator().manual_seed(0))]
    assert neighbour < 0.3 * (shuffled[1:] - shuffled[:-1]).abs().mean()
    assert SyntheticDataset(num_samples=4, resolution=8, channels=3).images.shape == (4, 3, 8, 8)


def test_make_dataset(tmp_path):
    d = make_dataset("digits", 16, 1, split="test", seed=0)
    assert isinstance(d, DigitsDataset) and d.split == "test"
    s_train = make_dataset("synthetic", 8, 3, num_samples=5)
    s_test = make_dataset("synthetic", 8, 3, split="test", num_samples=5)
    assert isinstance(s_train, SyntheticDataset) and s_train.images.shape == (5, 3, 8, 8)
    assert not torch.equal(s_train.images, s_test.images)
    _write_images(tmp_path / "folder", [(20, 20)])
    f = make_dataset(str(tmp_path / "folder"), 16, 3, center_crop=False)
    assert isinstance(f, ImageFolderDataset) and not f.center_crop
    assert f[0]["pixel_values"].shape == (3, 16, 16)


def test_make_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*digits.*synthetic"):
        make_dataset("nope", 16, 1)
    with pytest.raises(ValueError, match="grayscale"):
        make_dataset("digits", 16, 3)
    with pytest.raises(TypeError, match="num_samples"):
        make_dataset("digits", 16, 1, num_samples=3)
    with pytest.raises(ValueError, match="split"):
        make_dataset("digits", 16, 1, split="validation")
    _write_images(tmp_path / "folder", [(20, 20)])
    with pytest.raises(ValueError, match="held-out"):
        make_dataset(tmp_path / "folder", 16, 3, split="test")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset(str(tmp_path / "a_file"), 16, 3)


# ---------------------------------------------------------------------------------
# Classifier and sample quality


@pytest.fixture(scope="module")
def classifier():
    return train_digits_classifier(resolution=16, seed=0)


def test_classifier_accuracy(classifier):
    model, acc = classifier
    assert isinstance(model, DigitsClassifier) and not model.training
    assert isinstance(acc, float) and 0.9 < acc <= 1.0
    test = DigitsDataset(split="test")
    with torch.no_grad():
        feats = model.features(test.images[:5])
        logits = model(test.images[:5])
    assert feats.shape == (5, model.feature_dim) and 32 <= model.feature_dim <= 128
    assert logits.shape == (5, 10)


def test_classifier_deterministic_and_keeps_global_state():
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    m1, a1 = train_digits_classifier(resolution=8, seed=1, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    m2, a2 = train_digits_classifier(resolution=8, seed=1, epochs=1)
    assert a1 == a2
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_sample_quality(classifier):
    model, _ = classifier
    train, test = DigitsDataset(split="train"), DigitsDataset(split="test")
    real = sample_quality(model, test.images, train.images)
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(test.images.shape, generator=g) * 2 - 1)
    fake = sample_quality(model, noise, train.images)
    assert set(real) == {"frechet", "confidence", "class_entropy"}
    assert all(math.isfinite(v) for v in (*real.values(), *fake.values()))
    assert real["frechet"] < 0.2 * fake["frechet"]
    assert real["confidence"] > 0.9
    assert real["class_entropy"] == pytest.approx(math.log(10), abs=0.05)
    # A single repeated digit: one class, no entropy.
    ones = test.images[test.labels == 1][:1].repeat(20, 1, 1, 1)
    assert sample_quality(model, ones, train.images)["class_entropy"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same"):
        sample_quality(model, test.images, torch.zeros(4, 1, 8, 8))


# ---------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_identical_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    b = torch.randn(400, 16, generator=g) * 2 + 0.5
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    d_ab, d_ba = frechet_distance(a, b), frechet_distance(b, a)
    assert d_ab > 1 and d_ab == pytest.approx(d_ba, rel=1e-9)


def test_frechet_grows_with_mean_shift():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, 8, generator=g)
    d = [frechet_distance(a, a + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert d == sorted(d) and d[0] < 1e-8
    # A pure shift changes only the mean term: |shift|^2 = 8 s^2.
    assert d[3] == pytest.approx(8 * 4.0, rel=1e-9)


def _exact_moments(n, d, mean, std, g):
    # Whitened samples: the sample mean and (unbiased) covariance are exactly mean, diag(std^2).
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    cov = z.T @ z / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)
    z = z @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
    return z * std + mean


def test_frechet_matches_closed_form_diagonal():
    g = torch.Generator().manual_seed(2)
    d = 6
    mu_a, mu_b = torch.randn(d, dtype=torch.float64, generator=g), torch.randn(d, dtype=torch.float64, generator=g)
    sd_a = torch.rand(d, dtype=torch.float64, generator=g) + 0.2
    sd_b = torch.rand(d, dtype=torch.float64, generator=g) + 0.2
    closed = float((mu_a - mu_b).square().sum() + (sd_a - sd_b).square().sum())
    # Exact sample moments: agreement to rounding.
    a = _exact_moments(300, d, mu_a, sd_a, g)
    b = _exact_moments(200, d, mu_b, sd_b, g)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9, abs=1e-10)
    # Plain i.i.d. samples: agreement to sampling error.
    a = torch.randn(20000, d, dtype=torch.float64, generator=g) * sd_a + mu_a
    b = torch.randn(20000, d, dtype=torch.float64, generator=g) * sd_b + mu_b
    assert frechet_distance(a.float(), b.float()) == pytest.approx(closed, rel=0.05, abs=0.02)


def test_frechet_matches_scipy_sqrtm_and_handles_singular():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(300, 10, generator=g) @ torch.randn(10, 10, generator=g)).double()
    b = (torch.randn(250, 10, generator=g) @ torch.randn(10, 10, generator=g) + 1).double()
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy_linalg.sqrtm(ca @ cb).real
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + np.trace(ca + cb - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    # Fewer samples than dimensions, and a constant feature: singular covariances.
    small = torch.randn(5, 10, generator=g)
    small[:, 0] = 3.0
    out = frechet_distance(small, small + 1)
    assert math.isfinite(out) and out == pytest.approx(10.0, rel=1e-6)


def test_frechet_errors():
    with pytest.raises(ValueError, match="feature dim"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet_distance(torch.zeros(4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((4, 3), float("nan")), torch.zeros(4, 3))


# ---------------------------------------------------------------------------------
# Teacher agreement


def _tiny_unet(seed):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def unets():
    return _tiny_unet(0), _tiny_unet(1)


def test_teacher_agreement_identical_and_different(unets):
    teacher, student = unets
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    images = DigitsDataset(split="test").images[:6]
    same = teacher_agreement(teacher, teacher, sched, images, num_timesteps=4)
    assert same["output_mse"] == 0.0 and same["x0_mse"] == 0.0
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert sorted(same["per_timestep"]) == [0, 33, 66, 99]

    student.train()
    teacher.eval()
    diff = teacher_agreement(student, teacher, sched, images, num_timesteps=4, seed=0)
    assert student.training and not teacher.training  # modes restored
    assert diff["output_mse"] > 0 and all(v > 0 for v in diff["per_timestep"].values())
    assert diff["output_mse"] == pytest.approx(np.mean(list(diff["per_timestep"].values())))
    assert -1 <= diff["cosine"] < 0.999
    # Deterministic in the seed, and independent of the batch size.
    again = teacher_agreement(student, teacher, sched, images, num_timesteps=4, seed=0, batch_size=4)
    assert again["output_mse"] == pytest.approx(diff["output_mse"], rel=1e-5)
    other = teacher_agreement(student, teacher, sched, images, num_timesteps=4, seed=1)
    assert other["output_mse"] != diff["output_mse"]


def test_teacher_agreement_matches_manual_computation():
    # Plain callables returning tensors: student = 2 * teacher output.
    sched = diffusers.DDPMScheduler(num_train_timesteps=10)
    teacher = lambda x, t: x * 0.5 + t.view(-1, 1, 1, 1).float() / 10  # noqa: E731
    student = lambda x, t: 2 * teacher(x, t)  # noqa: E731
    images = torch.rand(3, 1, 4, 4) * 2 - 1
    out = teacher_agreement(student, teacher, sched, images, num_timesteps=2, seed=7)
    g = torch.Generator().manual_seed(7)
    expected = {}
    for t in (0, 9):
        noise = torch.randn(images.shape, generator=g)
        tb = torch.full((3,), t)
        y = teacher(sched.add_noise(images, noise, tb), tb)
        expected[t] = float((y ** 2).mean())  # (2y - y)^2
    assert out["per_timestep"].keys() == expected.keys()
    for t in expected:
        assert out["per_timestep"][t] == pytest.approx(expected[t], rel=1e-5)
    assert out["cosine"] == pytest.approx(1.0, abs=1e-6)  # parallel outputs


def test_teacher_agreement_errors(unets):
    teacher, _ = unets
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    images = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="num_timesteps"):
        teacher_agreement(teacher, teacher, sched, images, num_timesteps=0)
    with pytest.raises(ValueError, match="prediction_type"):
        teacher_agreement(teacher, teacher, sched, images, prediction_type="flow")


# ---------------------------------------------------------------------------------
# Plots


def _png_size(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_save_image_grid(tmp_path):
    imgs = DigitsDataset(split="test").images[:10]
    p = save_image_grid(imgs, tmp_path / "sub" / "grid.png", nrow=5, padding=1)
    # 5 x 2 tiles of 16 px + 1 px padding, upscaled x4.
    assert _png_size(p) == ((5 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    rgb = torch.rand(3, 3, 8, 8) * 2 - 1
    assert _png_size(save_image_grid(rgb, tmp_path / "rgb.png")) == ((2 * 9 + 1) * 8, (2 * 9 + 1) * 8)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB"
    with pytest.warns(UserWarning, match="NaN"):
        save_image_grid(torch.full((1, 1, 4, 4), float("nan")), tmp_path / "nan.png")
    with pytest.raises(ValueError, match="channels"):
        save_image_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")


def test_plot_training_curves(tmp_path):
    runs = {}
    for name, scale in (("output", 1.0), ("place", 0.5)):
        run = tmp_path / name
        run.mkdir()
        with open(run / "metrics.jsonl", "w") as f:
            for step in range(1, 21):
                rec = {"step": step, "loss": scale / step, "kd_weight": min(1.0, step / 10)}
                if name == "place":
                    rec["kd_slope_mean"] = 1 - 1 / step
                if step == 5:
                    rec["loss"] = float("nan")  # a skipped step: left out, not drawn
                f.write(json.dumps(rec) + "\n")
            f.write('{"step": 21, "loss"')  # truncated last line
        runs[name] = run
    with pytest.warns(UserWarning, match="not valid JSON"):
        p = plot_training_curves(runs, tmp_path / "curves.png")
    w, h = _png_size(p)
    assert w > 600 and h > 200
    with pytest.raises(FileNotFoundError, match="metrics"):
        plot_training_curves({"x": tmp_path / "missing"}, tmp_path / "c2.png")


def test_plot_heatmap(tmp_path):
    m = torch.rand(4, 30)
    m[0, 0] = float("nan")
    p = plot_heatmap(m, tmp_path / "heat.png", xlabel="step", ylabel="timestep bucket",
                     title="mean |a-1|", xticks=[str(10 * i) for i in range(30)],
                     yticks=["0-249", "250-499", "500-749", "750-999"])
    assert _png_size(p)[0] > 300
    with pytest.raises(ValueError, match="xticks"):
        plot_heatmap(m, tmp_path / "h2.png", xlabel="x", ylabel="y", title="t", xticks=[1, 2])
