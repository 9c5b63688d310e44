"""Pretrain the toy world's base model and classifier, reproducibly, on a CPU.

    python benchmarks/toyworld/pretrain.py                  # ~2 h on one idle CPU thread
    python benchmarks/toyworld/pretrain.py --device cuda    # minutes on a GPU

Phases (each one's result is kept in --work, so an interrupted run continues where it
stopped; the UNet phase resumes from its last checkpoint):

1. data: seeded scenes from `personalize.toyworld.world` (solid shapes for the diffusion
   model; half of them patterned for the VAE and the classifier).
2. vae: an AutoencoderKL (8 x 8 x 8 latents) trained on both sets (MSE + L1 + a small KL term); its
   scaling_factor is set to 1 / std of the latents, as SD's 0.18215 was. Then its decoder
   alone is fine-tuned longer (the encoder, so every latent, stays as it was).
3. classifier: the shape/color/background/size/pattern/dot CNN, on clean images and on
   their VAE reconstructions (the look of generated samples).
4. latents: the diffusion set encoded once (posterior mean and std) and four caption
   variants per scene tokenized once, so a UNet step costs only the UNet + text encoder.
5. unet: UNet + text encoder from scratch, epsilon prediction, min-SNR weighting, 10%
   empty captions (for classifier-free guidance), EMA weights; every --eval-every steps the
   EMA model draws prompts and the classifier scores shape / color / background.
6. export: the EMA pipeline saved with `save_pretrained` (the UNet in fp16, which diffusers
   loads back as fp32), the classifier, and a report measured on the reloaded files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from personalize.io import atomic_torch_save  # noqa: E402
from personalize.toyworld import models as tw  # noqa: E402
from personalize.toyworld.classifier import HEADS, ToyClassifier, scene_labels  # noqa: E402
from personalize.toyworld.evaluate import prompt_following  # noqa: E402
from personalize.toyworld.world import caption, make_dataset  # noqa: E402

CAPTION_VARIANTS = 4


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()

    def __call__(self, phase: str, **fields) -> None:
        rec = {"phase": phase, "elapsed_s": round(time.time() - self.t0, 1), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


def portable_args(args) -> dict:
    """The arguments as the report and the log keep them: folders by name only, so no path
    of the machine that trained goes into the shipped files."""
    return {k: Path(v).name if k in ("work", "out") else v for k, v in vars(args).items()}


def drop_local_paths(folder: Path) -> None:
    """save_pretrained records where each model was loaded from (`_name_or_path`)."""
    for config in folder.rglob("config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).float().div(255.0).permute(0, 3, 1, 2)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------ phases


def phase_data(args, work: Path, log: Log) -> None:
    out = work / "data.npz"
    if out.is_file():
        return
    t = time.time()
    diff_images, diff_scenes, _ = make_dataset(args.n_scenes, args.seed + 1, captions=False)
    rng = np.random.default_rng(args.seed + 11)
    captions = np.array([[caption(s, rng) for _ in range(CAPTION_VARIANTS)] for s in diff_scenes])
    mixed_images, mixed_scenes, _ = make_dataset(
        args.n_mixed, args.seed + 2, patterned=0.5, captions=False
    )
    test_images, test_scenes, _ = make_dataset(1000, args.seed + 3, patterned=0.5, captions=False)
    labels = {k: np.array([scene_labels(s)[k] for s in mixed_scenes]) for k in HEADS}
    test_labels = {k: np.array([scene_labels(s)[k] for s in test_scenes]) for k in HEADS}
    tmp = work / "data.tmp.npz"
    np.savez(
        tmp,
        diff_images=diff_images,
        captions=captions,
        mixed_images=mixed_images,
        test_images=test_images,
        **{f"label_{k}": v for k, v in labels.items()},
        **{f"test_label_{k}": v for k, v in test_labels.items()},
    )
    os.replace(tmp, out)
    log(
        "data",
        seconds=round(time.time() - t, 1),
        diffusion_scenes=len(diff_images),
        mixed_scenes=len(mixed_images),
        example_captions=list(captions[:3, 0]),
    )


def phase_vae(args, work: Path, data, log: Log):
    out = work / "vae"
    if (out / "config.json").is_file():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(out).to(args.device).eval()
    t = time.time()
    device = args.device
    vae = tw.make_vae(args.seed).to(device).train()
    images = np.concatenate([data["diff_images"][: args.n_mixed], data["mixed_images"]])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 20)
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, 1e-3, 100)
        idx = torch.randint(len(images), (args.vae_batch,), generator=g).numpy()
        x = to_tensor(images[idx], device) * 2 - 1
        # bf16 autocast halves the VAE's step time on CPUs with AMX/AVX512-BF16 (measured);
        # the weights and the loss stay fp32.
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(
                device
            )
            rec = vae.decode(z).sample.float()
        mse = F.mse_loss(rec, x)
        # The KL term only keeps the latent scale in check (SD uses 1e-6 too); the decoder
        # learns from sampled latents, so the trainers' `latent_dist.sample()` stays clean.
        loss = mse + F.l1_loss(rec, x) + 1e-6 * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log("vae", step=step, mse=round(mse.item(), 5), loss=round(loss.item(), 5))
    vae.eval()
    with torch.no_grad():
        means = torch.cat(
            [
                vae.encode(
                    to_tensor(data["diff_images"][i : i + 500], device) * 2 - 1
                ).latent_dist.mean
                for i in range(0, min(4000, len(data["diff_images"])), 500)
            ]
        )
        test = to_tensor(data["test_images"], device) * 2 - 1
        rec = vae.decode(vae.encode(test).latent_dist.mean).sample
        test_mse = F.mse_loss(rec, test).item()
    scaling = 1.0 / means.std().item()
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out, safe_serialization=True)
    log(
        "vae",
        done=True,
        seconds=round(time.time() - t, 1),
        test_mse=round(test_mse, 5),
        scaling_factor=round(scaling, 5),
        latent_mean=round(means.mean().item(), 4),
    )
    return vae


def phase_decoder(args, work: Path, data, vae, log: Log):
    """Fine-tune the VAE's decoder only (as SD's ft-MSE VAE did): the encoder, hence every
    latent the UNet trains on, stays exactly as it is; stripes and spots decode sharper."""
    from diffusers import AutoencoderKL

    out = work / "vae_decoder_ft"
    if (out / "config.json").is_file():
        return AutoencoderKL.from_pretrained(out).to(args.device).eval()
    t = time.time()
    device = args.device
    vae = copy.deepcopy(vae).to(device)
    vae.requires_grad_(False)
    trained = [vae.post_quant_conv, vae.decoder]
    for m in trained:
        m.requires_grad_(True).train()
    params = [p for m in trained for p in m.parameters()]
    # Patterned scenes are the hard part: half of the batches' images are patterned.
    images = np.concatenate(
        [data["diff_images"][: args.n_mixed], data["mixed_images"], data["mixed_images"]]
    )
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 40)
    for step in range(args.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.decoder_steps, 3e-4, 50)
        idx = torch.randint(len(images), (args.vae_batch,), generator=g).numpy()
        x = to_tensor(images[idx], device) * 2 - 1
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(
                device
            )
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            rec = vae.decode(z).sample.float()
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == args.decoder_steps - 1:
            log("vae_decoder", step=step, mse=round(mse.item(), 5))
    vae.eval()
    with torch.no_grad():
        test = to_tensor(data["test_images"], device) * 2 - 1
        rec = vae.decode(vae.encode(test).latent_dist.mean).sample
        test_mse = F.mse_loss(rec, test).item()
    vae.save_pretrained(out, safe_serialization=True)
    log("vae_decoder", done=True, seconds=round(time.time() - t, 1), test_mse=round(test_mse, 5))
    return vae


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, device) -> np.ndarray:
    out = []
    for i in range(0, len(images), 500):
        x = to_tensor(images[i : i + 500], device) * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        out.append(rec.cpu().numpy())
    return np.concatenate(out)


def classifier_accuracy(clf, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict:
    clf.eval()
    with torch.no_grad():
        logits = {k: [] for k in HEADS}
        for i in range(0, len(images), 500):
            for k, v in clf(clf.to_tensor(images[i : i + 500])).items():
                logits[k].append(v.argmax(1).cpu())
    return {
        k: round(float((torch.cat(v).numpy() == labels[k]).mean()), 4) for k, v in logits.items()
    }


def phase_classifier(args, work: Path, data, vae, log: Log) -> ToyClassifier:
    out = work / "classifier"
    if (out / "classifier.json").is_file():
        return ToyClassifier.load(out)
    t = time.time()
    device = args.device
    mixed = data["mixed_images"]
    recon = reconstruct(vae, mixed, device)
    labels = {k: torch.from_numpy(data[f"label_{k}"]) for k in HEADS}
    clf = ToyClassifier().to(device).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed + 30)
    for step in range(args.clf_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.clf_steps, 2e-3, 50, floor=0.02)
        idx = torch.randint(len(mixed), (args.clf_batch,), generator=g)
        use_recon = (torch.rand(args.clf_batch, generator=g) < 0.5).numpy()
        batch = np.where(use_recon[:, None, None, None], recon[idx.numpy()], mixed[idx.numpy()])
        logits = clf(to_tensor(batch, device))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx].to(device)) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.clf_steps - 1:
            log("classifier", step=step, loss=round(loss.item(), 4))
    clf.eval().cpu()
    test_labels = {k: data[f"test_label_{k}"] for k in HEADS}
    acc_clean = classifier_accuracy(clf, data["test_images"], test_labels)
    acc_recon = classifier_accuracy(clf, reconstruct(vae, data["test_images"], device), test_labels)
    clf.save(out)
    (out / "accuracy.json").write_text(json.dumps({"clean": acc_clean, "vae_recon": acc_recon}))
    log(
        "classifier",
        done=True,
        seconds=round(time.time() - t, 1),
        test_accuracy=acc_clean,
        test_accuracy_vae_reconstructions=acc_recon,
    )
    return clf.to(device)


def phase_latents(args, work: Path, data, vae, tokenizer, log: Log):
    out = work / "latents.pt"
    if out.is_file():
        return torch.load(out, weights_only=True)
    t = time.time()
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(data["diff_images"]), 500):
            x = to_tensor(data["diff_images"][i : i + 500], args.device) * 2 - 1
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    caps = data["captions"]
    ids = tokenizer(
        list(caps.reshape(-1)),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.view(len(caps), CAPTION_VARIANTS, -1)
    cache = {"mean": torch.cat(means).half(), "std": torch.cat(stds).half(), "ids": ids}
    atomic_torch_save(cache, out)
    log(
        "latents",
        seconds=round(time.time() - t, 1),
        shape=list(cache["mean"].shape),
        mean_posterior_std=round(cache["std"].float().mean().item(), 5),
    )
    return cache


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def evaluate(args, tokenizer, te, vae, unet, clf, n: int, guidance: float) -> dict:
    pipe = tw.make_pipeline(tokenizer, te.eval(), vae, unet.eval())
    res = prompt_following(pipe, clf, n=n, seed=args.seed + 1234, steps=20, guidance_scale=guidance)
    return res


def phase_unet(args, work: Path, cache, vae, tokenizer, clf, log: Log):
    ckpt_file = work / "unet_ckpt.pt"
    device = args.device
    te = tw.make_text_encoder(tokenizer, args.seed).to(device)
    unet = tw.make_unet(args.seed).to(device)
    ema_te, ema_unet = copy.deepcopy(te).eval(), copy.deepcopy(unet).eval()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    start = 0
    if ckpt_file.is_file():
        state = torch.load(ckpt_file, weights_only=True, map_location=device)
        for m, k in (
            (unet, "unet"),
            (te, "te"),
            (ema_unet, "ema_unet"),
            (ema_te, "ema_te"),
            (opt, "opt"),
        ):
            m.load_state_dict(state[k])
        start = state["step"]
        log("unet", resumed_from=start)
    if start >= args.unet_steps:
        return ema_te, ema_unet
    sched = tw.make_scheduler()
    sf = vae.config.scaling_factor
    mean, std, ids = cache["mean"], cache["std"], cache["ids"]
    empty = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids[0]
    unet.train()
    te.train()
    t0, losses = time.time(), []
    for step in range(start, args.unet_steps):
        # Everything random in a step comes from (seed, step): a resumed run redraws it.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        # Warmup, then constant (EMA does the averaging): --unet-steps can then be raised
        # and the run resumed, and the result equals a fresh run with the final value.
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        bs = args.batch_size
        idx = torch.randint(len(mean), (bs,), generator=g)
        variant = torch.randint(CAPTION_VARIANTS, (bs,), generator=g)
        tokens = ids[idx, variant].clone()
        tokens[torch.rand(bs, generator=g) < args.caption_dropout] = empty
        latents = (
            mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g)
        ) * sf
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=g)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = sched.add_noise(latents, noise, timesteps)
        hidden = te(tokens.to(device))[0]
        pred = unet(noisy, timesteps, hidden).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(sched, timesteps, 5.0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_te, te)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0:
            rate = (done - start) / (time.time() - t0)
            log(
                "unet",
                step=done,
                loss=round(float(np.mean(losses)), 5),
                lr=round(opt.param_groups[0]["lr"], 6),
                steps_per_s=round(rate, 3),
            )
            losses = []
        if done % args.ckpt_every == 0 or done == args.unet_steps:
            atomic_torch_save(
                {
                    "unet": unet.state_dict(),
                    "te": te.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_te": ema_te.state_dict(),
                    "opt": opt.state_dict(),
                    "step": done,
                },
                ckpt_file,
            )
        if done % args.eval_every == 0 or done == args.unet_steps:
            res = evaluate(
                args, tokenizer, ema_te, vae, ema_unet, clf, n=56, guidance=args.guidance
            )
            log("unet_eval", step=done, guidance=args.guidance, accuracy=res["accuracy"])
            save_grid(res["images"][:40], work / f"samples_step{done:05d}.png")
            unet.train()
            te.train()
    return ema_te, ema_unet


def save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image

    n = len(images)
    rows = math.ceil(n / cols)
    h, w = images.shape[1:3]
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    Image.fromarray(grid).resize((cols * w * 3, rows * h * 3), Image.NEAREST).save(path)


def phase_export(args, work: Path, tokenizer, te, vae, unet, clf, log: Log) -> None:
    from personalize.models import load_pipeline

    out = Path(args.out)
    pipe_dir = out / "pipeline"
    # fp16 halves the UNet file; diffusers loads it back as fp32. The text encoder stays fp32:
    # transformers 5 would load an fp16 file as fp16 and mix dtypes in the pipeline.
    pipe = tw.make_pipeline(
        tokenizer,
        copy.deepcopy(te).cpu(),
        copy.deepcopy(vae).cpu(),
        copy.deepcopy(unet).cpu().half(),
    )
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    drop_local_paths(pipe_dir)
    clf.cpu().save(out / "classifier")
    # Measure what ships: the files as a user loads them.
    reloaded = load_pipeline(str(pipe_dir))
    shipped_clf = ToyClassifier.load(out / "classifier")
    report = {
        "seed": args.seed,
        "args": portable_args(args),
        "classifier_test_accuracy": json.loads((work / "classifier" / "accuracy.json").read_text()),
        "unet_parameters": sum(p.numel() for p in reloaded.unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in reloaded.text_encoder.parameters()),
        "vae_parameters": sum(p.numel() for p in reloaded.vae.parameters()),
        "prompt_following": {},
    }
    for guidance in (3.0, 5.0, 7.5):
        res = prompt_following(
            reloaded, shipped_clf, n=140, seed=args.seed + 99, steps=20, guidance_scale=guidance
        )
        report["prompt_following"][str(guidance)] = res["accuracy"]
        log("export_eval", guidance=guidance, n=140, accuracy=res["accuracy"])
        if guidance == 5.0:
            save_grid(res["images"][:40], work / "samples_final.png")
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "pretrain_report.json"]
    report["weights_bytes"] = sum(p.stat().st_size for p in files)
    report["log"] = "pretrain_log.jsonl in --work (a copy: benchmarks/toyworld/)"
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    log("export", out=out.name, weights_mb=round(report["weights_bytes"] / 1e6, 2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="/tmp/toyworld_work", help="intermediate files + log")
    p.add_argument("--out", default=str(ROOT / "personalize" / "toyworld" / "weights"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-scenes", type=int, default=30000, help="diffusion training scenes")
    p.add_argument("--n-mixed", type=int, default=20000, help="VAE/classifier scenes")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--decoder-steps", type=int, default=1000)
    p.add_argument("--clf-steps", type=int, default=2000)
    p.add_argument("--clf-batch", type=int, default=128)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--guidance", type=float, default=5.0, help="guidance for the evaluations")
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument(
        "--stop-after",
        choices=("classifier",),
        default=None,
        help="stop after this phase (e.g. to prepare it beside a running UNet phase)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work / "pretrain_log.jsonl")
    log("start", args=portable_args(args), torch_threads=torch.get_num_threads())
    phase_data(args, work, log)
    data = dict(np.load(work / "data.npz"))
    vae = phase_vae(args, work, data, log)
    vae = phase_decoder(args, work, data, vae, log)
    vae.requires_grad_(False)
    clf = phase_classifier(args, work, data, vae, log).to(args.device)
    if args.stop_after == "classifier":
        return
    tokenizer = tw.make_tokenizer()
    cache = phase_latents(args, work, data, vae, tokenizer, log)
    del data
    te, unet = phase_unet(args, work, cache, vae, tokenizer, clf, log)
    phase_export(args, work, tokenizer, te, vae, unet, clf, log)


if __name__ == "__main__":
    main()
