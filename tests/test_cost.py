"""``liftplace cost``: MACs against hand counts, ratios, peak memory, JSON record, errors."""

import json

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

pytest.importorskip("diffusers")

from liftplace.cli import main  # noqa: E402
from liftplace.eval.cost import compare_cost, count_macs, format_cost, model_cost, peak_memory  # noqa: E402
from liftplace.train.models import UNet2DFamily, build_from_config, count_parameters  # noqa: E402

from testing import TINY_UNET  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = UNet2DFamily()


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_macs_equal_hand_count_for_conv_and_linear():
    x = torch.randn(2, 3, 5, 5)
    total, blocks = count_macs(ConvLinear(), x)
    conv = 2 * 8 * 5 * 5 * (3 * 3 * 3)  # N * C_out * H * W * (C_in * k * k)
    fc = 2 * (8 * 5 * 5) * 4  # N * in * out
    assert blocks == {"conv": conv, "act": 0, "fc": fc}
    assert total == conv + fc


def test_peak_memory_cpu_counts_live_operator_outputs():
    class Twice(nn.Module):
        def forward(self, x, t):
            return (x * 2).sum()  # a [1000] float32 temporary (4000 bytes) and a 4-byte scalar

    peak, method = peak_memory(Twice(), torch.randn(1000), torch.zeros(1))
    assert peak == 4000 + 4
    # a view of a weight (F.linear's weight.t()) or of the input allocates nothing: only the output counts
    class ViewLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1000, 10, bias=False)

        def forward(self, x, t):
            return self.lin(x.view(1, 1000))

    peak, _ = peak_memory(ViewLinear(), torch.randn(1000), torch.zeros(1))
    assert peak == 10 * 4
    assert "kernel scratch not counted" in method


def _models():
    teacher = build_from_config(TINY_UNET, FAMILY, "teacher", seed=0)
    student_cfg = FAMILY.derive_student_config(dict(TINY_UNET), width_mult=0.5)
    student = build_from_config(student_cfg, FAMILY, "student", seed=1)
    return teacher, student


def test_ratio_student_over_teacher_and_blocks():
    teacher, student = _models()
    kw = dict(batch_size=2, repeats=1, warmup=0)
    t = model_cost(teacher, FAMILY, (1, 16, 16), name="teacher", **kw)
    s = model_cost(student, FAMILY, (1, 16, 16), name="student", **kw)
    assert t.parameters == count_parameters(teacher) and s.parameters == count_parameters(student)
    assert 0 < s.macs_per_call < t.macs_per_call
    # every MAC of a U-Net is in one of its top-level blocks
    assert sum(b["macs"] for b in t.blocks.values()) == t.macs_per_call
    assert sum(b["parameters"] for b in s.blocks.values()) == s.parameters
    rec = compare_cost(t, s, {"batch_size": 2, "sample_shape": [1, 16, 16], "dtype": "fp32", "device": "cpu",
                              "num_inference_steps": None})
    ratio = rec["ratio_student_over_teacher"]
    assert ratio["parameters"] == s.parameters / t.parameters
    assert ratio["macs_per_call"] == s.macs_per_call / t.macs_per_call
    assert [b["block"] for b in rec["blocks"]] == list(t.blocks)
    assert "student/teacher" in format_cost(rec)
    # MACs scale linearly with the batch
    assert model_cost(teacher, FAMILY, (1, 16, 16), batch_size=4, repeats=1, warmup=0).macs_per_call \
        == 2 * t.macs_per_call


def test_model_cost_keeps_training_mode():
    teacher, _ = _models()
    teacher.train()
    model_cost(teacher, FAMILY, (1, 16, 16), repeats=1, warmup=0)
    assert teacher.training


def _save(model, folder):
    from diffusers import DDPMScheduler

    model.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder)
    return str(folder)


def test_cost_cli_json_record(tmp_path, capsys):
    teacher, student = _models()
    t_dir, s_dir = _save(teacher, tmp_path / "t"), _save(student, tmp_path / "s")
    out = tmp_path / "cost.json"
    rc = main(["cost", "--teacher", t_dir, "--student", s_dir, "--batch_size", "2", "--num_inference_steps", "2",
               "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert set(rec) == {"schema_version", "protocol", "models", "ratio_student_over_teacher", "blocks"}
    for key in ("device", "dtype", "batch_size", "sample_shape", "num_inference_steps", "torch", "threads",
                "models", "sampler"):
        assert key in rec["protocol"]
    assert rec["protocol"]["sample_shape"] == [1, 16, 16]
    for m in rec["models"].values():
        assert set(m) == {"name", "parameters", "parameter_bytes", "macs_per_call", "peak_memory_bytes",
                          "peak_memory_method", "latency_per_call_s", "latency_per_sample_s", "blocks"}
        assert m["latency_per_call_s"] > 0 and m["latency_per_sample_s"] > 0 and m["peak_memory_bytes"] > 0
    assert set(rec["blocks"][0]) == {"block", "teacher_parameters", "student_parameters", "teacher_macs",
                                     "student_macs"}
    assert "MACs per call" in capsys.readouterr().out
    # --resolution and --dtype: a quarter of the pixels, a quarter of the MACs whatever the dtype
    # (but for the time embedding's, which do not depend on the pixels)
    assert main(["cost", "--student", s_dir, "--resolution", "8", "--dtype", "bf16", "--repeats", "1",
                 "--num_inference_steps", "1", "--json", str(out)]) == 0
    small = json.loads(out.read_text())
    assert small["protocol"]["sample_shape"] == [1, 8, 8] and small["protocol"]["dtype"] == "bf16"
    per_image = rec["models"]["student"]["macs_per_call"] // 2
    assert small["models"]["student"]["macs_per_call"] * 4 == pytest.approx(per_image, rel=0.01)
    # one model alone: no ratio
    assert main(["cost", "--student", s_dir, "--repeats", "1", "--num_inference_steps", "1",
                 "--json", str(out)]) == 0
    assert "ratio_student_over_teacher" not in json.loads(out.read_text())


def test_cost_errors(tmp_path, capsys):
    teacher, _ = _models()
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model_cost(teacher, FAMILY, (1, 16, 16), batch_size=0)
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16"):
        model_cost(teacher, FAMILY, (1, 16, 16), dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pass --device cpu"):
            model_cost(teacher, FAMILY, (1, 16, 16), device="cuda")
    conditional = UNet2DFamily()
    conditional.cond_keys = ("label",)
    with pytest.raises(ValueError, match=r"needs conditioning \(label\) .* gives no example of it"):
        model_cost(teacher, conditional, (1, 16, 16))
    assert main(["cost"]) == 2
    assert "pass --student PATH" in capsys.readouterr().err
    assert main(["cost", "--student", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_trainer_logs_the_cost_summary_at_start(tmp_path, caplog):
    from liftplace.train import Trainer
    from test_trainer import make_config

    with caplog.at_level("INFO"):
        Trainer(make_config(tmp_path, max_train_steps=1)).setup()
    text = caplog.text
    assert "MACs per call" in text and "student/teacher" in text and "latency per step" in text


def test_conditional_family_is_measured_with_zero_conditioning(tmp_path, capsys):
    """A text-conditional U-Net: the prompt embeddings reach the call (cross-attention MACs grow
    with the text length), and `liftplace cost` on a pipeline folder records the conditioning."""
    from diffusers import UNet2DConditionModel

    from liftplace.train.models import UNet2DConditionFamily
    from liftplace.train.tiny import TINY_SD_UNET, write_tiny_pipeline

    family = UNet2DConditionFamily()
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_SD_UNET).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 10)
    macs = [count_macs(model, x, t, family=family, cond=family.example_cond(dict(model.config), 2, "cpu",
                                                                              torch.float32, tokens=n))[0]
            for n in (8, 16)]
    assert macs[1] > macs[0]
    cost = model_cost(model, family, (4, 8, 8), batch_size=2, repeats=1, scheduler=DDIMScheduler(
        num_train_timesteps=100), num_inference_steps=2)
    assert cost.macs_per_call > 0 and cost.latency_per_sample_s > 0 and cost.peak_memory_bytes > 0

    pipe = write_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "cost.json"
    assert main(["cost", "--student", str(pipe), "--repeats", "1", "--num_inference_steps", "1",
                 "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["protocol"]["conditioning"] == {"student": {"encoder_hidden_states": "zeros [1, 77, 16]"}}
    assert rec["models"]["student"]["macs_per_call"] > 0


@pytest.mark.parametrize("name", ["dit", "sd3"])
def test_transformer_families_are_measured_with_their_conditioning(name):
    """dit (class labels) and sd3 (prompt embeddings + pooled projections): MACs, memory and a
    full sample with the family's example conditioning; sd3's attention MACs grow with the text."""
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

    from liftplace.train.models import get_family
    from test_dit import DIT
    from test_dit_sd3 import SD3

    family = get_family(name)
    cls, cfg = (DiTTransformer2DModel, DIT) if name == "dit" else (SD3Transformer2DModel, SD3)
    torch.manual_seed(0)
    model = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    shape = family.sample_shape(dict(model.config))
    cost = model_cost(model, family, shape, batch_size=2, repeats=1, scheduler=DDIMScheduler(num_train_timesteps=100),
                      num_inference_steps=2)
    assert cost.macs_per_call > 0 and cost.latency_per_sample_s > 0 and cost.peak_memory_bytes > 0
    if name == "sd3":
        x, t = torch.randn(2, *shape), torch.full((2,), 10)
        macs = [count_macs(model, x, t, family=family,
                           cond=family.example_cond(dict(model.config), 2, "cpu", torch.float32, tokens=n))[0]
                for n in (4, 32)]
        assert macs[1] > macs[0]
