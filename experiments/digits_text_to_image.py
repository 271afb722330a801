"""Latent text-to-image distillation end to end on the bundled digits (issue 11's example).

    python experiments/digits_text_to_image.py --output_dir runs/digits_t2i           # ~20 min, 1 thread
    python experiments/digits_text_to_image.py --quick --output_dir /tmp/digits_t2i   # smoke run, ~1-2 min

1. Data: scikit-learn's digits rendered as 16x16 RGB PNGs with captions "a handwritten digit
   seven" (metadata.jsonl, diffusers' layout), the train split of DigitsDataset.
2. VAE: a tiny AutoencoderKL (16x16x3 -> 4x8x8) trained here for reconstruction (MSE + a small
   KL term) -- a random VAE would decode nothing a classifier can read.
   Text encoder: the tiny character-level CLIP of liftplace.train.tiny with random weights,
   frozen: ten fixed prompts only need ten distinct embeddings for cross-attention to key on.
3. Teacher: a Stable-Diffusion-shaped UNet2DConditionModel trained by the project's recipe
   (`liftplace train-teacher` = Trainer(role="teacher"), kd_loss none, cond_drop_prob 0.1).
4. Students: bk_small (block removal + weight copy) distilled three ways with the same seeds:
   output KD, PLACE, PLACE + BK-SDM feature KD.
5. Report: per-model sample grids (one row per prompt), prompt adherence (the digits
   classifier's accuracy on the digit named in the prompt), sample quality (classifier
   Frechet distance to held-out digits, confidence) and teacher agreement (output MSE on
   held-out latents, prompts and timesteps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[16, 32, 32],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16,
            attention_head_dim=4, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32], layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
           sample_size=16)


def prompt(d: int) -> str:
    return f"a handwritten digit {WORDS[d]}"


def write_data(folder: Path, split: str) -> Path:
    from PIL import Image

    from liftplace.train.data import DigitsDataset

    ds = DigitsDataset(16, split=split)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(len(ds)):
        arr = ((ds.images[i, 0] + 1) * 127.5).round().to(torch.uint8)
        Image.fromarray(arr.unsqueeze(-1).expand(16, 16, 3).contiguous().numpy()).save(folder / f"{i:04d}.png")
        rows.append({"file_name": f"{i:04d}.png", "text": prompt(int(ds.labels[i]))})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def train_vae(folder: Path, images: torch.Tensor, steps: int, seed: int) -> float:
    """Reconstruction training of the tiny VAE; returns the final reconstruction MSE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (64,), generator=g)]
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=g)).sample
        loss = (rec - x).square().mean() + 1e-4 * dist.kl().mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = float((vae.decode(vae.encode(images[:256]).latent_dist.mean).sample - images[:256]).square().mean())
        # scaling_factor as Stable Diffusion chose it: unit variance latents
        vae.register_to_config(scaling_factor=float(1 / vae.encode(images[:512]).latent_dist.mean.std()))
    vae.save_pretrained(str(folder))
    return mse


def to_gray(images: torch.Tensor) -> torch.Tensor:
    return images.mean(1, keepdim=True)


@torch.no_grad()
def evaluate(name, folder, pipe_dir, classifier, reference, n_per_prompt, steps, guidance, held_latents, teacher):
    from liftplace.eval.metrics import sample_quality
    from liftplace.train.latent import encoders_from_pipeline
    from liftplace.train.models import get_family, load_pretrained
    from liftplace.train.sampling import ddim_scheduler_from, save_grid, text_to_image

    fam = get_family("unet2d_condition")
    enc = encoders_from_pipeline(pipe_dir)
    unet = load_pretrained(pipe_dir, fam, name).eval()
    sched_cfg = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    images = text_to_image(fam, unet, enc, ddim_scheduler_from(sched_cfg), [prompt(d) for d in range(10)],
                           images_per_prompt=n_per_prompt, guidance_scale=guidance, num_inference_steps=steps,
                           sample_shape=(4, 8, 8))
    save_grid(images, folder / f"grid_{name}.png", nrow=n_per_prompt)
    gray = to_gray(images)
    labels = torch.arange(10).repeat_interleave(n_per_prompt)
    adherence = float((classifier(gray).argmax(-1) == labels).float().mean())
    q = sample_quality(classifier, gray, reference)
    out = {"params": sum(p.numel() for p in unet.parameters()), "prompt_adherence": adherence, **q}
    if teacher is not None:
        lat, hid, t, noise = held_latents
        noisy = teacher[1].add_noise(lat, noise, t)
        out["teacher_output_mse"] = float((fam.forward(unet, noisy, t, {"encoder_hidden_states": hid})
                                           - fam.forward(teacher[0], noisy, t, {"encoder_hidden_states": hid}))
                                          .square().mean())
    return out, unet, enc


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/digits_t2i")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from liftplace.eval.metrics import train_digits_classifier
    from liftplace.train import Trainer, build_config
    from liftplace.train.data import DigitsDataset
    from liftplace.train.tiny import tiny_text_encoder, write_char_tokenizer

    t_start = time.perf_counter()
    out = Path(args.output_dir)
    q = args.quick
    vae_steps, teacher_steps, student_steps = (30, 40, 20) if q else (400, 1500, 400)
    n_per_prompt, sample_steps = (2, 5) if q else (8, 25)
    data = write_data(out / "data", "train")
    held = DigitsDataset(16, split="test")
    rgb = lambda x: x.expand(-1, 3, -1, -1)  # noqa: E731
    train_rgb = rgb(DigitsDataset(16, split="train").images)
    timings = {}

    t0 = time.perf_counter()
    vae_mse = train_vae(out / "vae", train_rgb, vae_steps, args.seed)
    tok = write_char_tokenizer(out / "text" / "tokenizer", model_max_length=32)
    tiny_text_encoder(tok, seed=args.seed).save_pretrained(str(out / "text" / "text_encoder"))
    timings["vae"] = time.perf_counter() - t0

    common = dict(train_data_dir=str(data), resolution=16, train_batch_size=64, logging_steps=50,
                  validation_steps=0, num_validation_images=4, ddpm_num_inference_steps=sample_steps,
                  report_to="none", progress_bar=False, seed=args.seed, kd_reduction="mean", guidance_scale=3.0,
                  validation_prompts=[prompt(d) for d in range(10)], cache_latents=True,
                  latent_cache_dir=str(out / "latent_cache"), checkpointing_steps=10_000)
    t0 = time.perf_counter()
    teacher_cfg = build_config(None, dict(common, output_dir=str(out / "teacher_run"), teacher_config=UNET,
                                          pretrained_vae_model_name_or_path=str(out / "vae"),
                                          text_encoder_path=str(out / "text"), kd_loss="none",
                                          max_train_steps=teacher_steps, learning_rate=1e-3, cond_drop_prob=0.1,
                                          use_ema=True, ema_decay=0.999))
    teacher_dir = Trainer(teacher_cfg, role="teacher").train().model_dir
    timings["teacher"] = time.perf_counter() - t0

    students = {"output": dict(kd_loss="output"), "place": dict(kd_loss="place"),
                "place_feat": dict(kd_loss="place", lambda_kd_feat=0.1, kd_feat_layers="bk_sdm")}
    dirs = {"teacher": teacher_dir}
    for name, kw in students.items():
        t0 = time.perf_counter()
        cfg = build_config(None, dict(common, output_dir=str(out / name), pretrained_model_name_or_path=str(teacher_dir),
                                      student_arch="bk_small", max_train_steps=student_steps, learning_rate=5e-4,
                                      use_ema=False, group_size=16, **kw))
        dirs[name] = Trainer(cfg).train().model_dir
        timings[name] = time.perf_counter() - t0

    classifier, clf_acc = train_digits_classifier(16, seed=args.seed)
    from liftplace.train.latent import encoders_from_pipeline
    from liftplace.train.models import get_family, load_pretrained
    from liftplace.train.objective import make_noise_scheduler

    enc = encoders_from_pipeline(teacher_dir)
    g = torch.Generator().manual_seed(1234)
    n_held = 64 if q else 256
    lat = enc.latents_from_posterior(enc.posterior(rgb(held.images[:n_held])), None)
    hid = enc.embed([prompt(int(d)) for d in held.labels[:n_held]])
    t = torch.randint(0, 1000, (n_held,), generator=g)
    noise = torch.randn(lat.shape, generator=g)
    teacher_unet = load_pretrained(teacher_dir, get_family("unet2d_condition"), "teacher").eval()
    sched = make_noise_scheduler(teacher_cfg)
    results = {}
    for name, d in dirs.items():
        results[name], _, _ = evaluate(name, out, d, classifier, held.images, n_per_prompt, sample_steps, 3.0,
                                       (lat, hid, t, noise), None if name == "teacher" else (teacher_unet, sched))
    wall = time.perf_counter() - t_start
    lines = [f"# Digits text-to-image distillation ({'quick' if q else 'full'} run)", "",
             f"VAE {vae_steps} steps (reconstruction MSE {vae_mse:.4f}), teacher {teacher_steps} steps, each "
             f"student {student_steps} steps (bk_small from the teacher); DDIM {sample_steps} steps, guidance 3.0, "
             f"{n_per_prompt} images per prompt; digits classifier held-out accuracy {clf_acc:.3f}. "
             f"Wall time {wall / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", "",
             "| model | parameters | prompt adherence | Frechet | confidence | teacher output MSE |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params']:,} | {r['prompt_adherence']:.3f} | {r['frechet']:.2f} | "
                     f"{r['confidence']:.3f} | {r.get('teacher_output_mse', float('nan')):.4f} |")
    lines += ["", "Grids (one row per prompt, digits 0-9): " + ", ".join(f"`grid_{n}.png`" for n in results)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "wall_s": wall, "timings": timings}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
