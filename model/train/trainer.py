"""`knotstream train`: VAE stage, DiT stage (teacher forcing), rollout stage (exposure bias),
decoder stage (sharper VAE decoder on the frozen latent space), replay stage (fine-tuning on
the model's own chains of chunks, `model/train/replay.py`; not part of `all`).

Resumable: every stage keeps a checkpoint (model, optimiser, step, RNG) in `--out`
and continues from it when run again with the same command. Seeded. A progress bar
shows the loss and it/s. `--export` writes the bundled-model safetensors file.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger("knotstream.train")

STAGES = ("vae", "dit", "rollout", "decoder")
EXTRA_STAGES = ("replay",)  # run only when asked by name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=STAGES + EXTRA_STAGES + ("all",), default="all")
    p.add_argument("--model", default="tiny",
                   help="preset to train, or a .safetensors file or a checkpoint (.pt) to start from")
    p.add_argument("--out", default="runs/train", help="checkpoint folder (kept out of git)")
    p.add_argument("--data", default="runs/data", help="dataset folder (generated when missing)")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--dit-steps", type=int, default=20000)
    p.add_argument("--rollout-steps", type=int, default=4000)
    p.add_argument("--rollout-context", choices=("all", "last", "truncated"), default="all",
                   help="rollout stage: generate every context chunk, or only the last one before the trained chunk")
    p.add_argument("--context-steps", type=int, default=0,
                   help="rollout stage: Euler steps of the generated context chunks (0 = the stream's denoise_steps)")
    p.add_argument("--replay-steps", type=int, default=2000)
    p.add_argument("--replay-every", type=int, default=25, help="replay stage: regenerate the chains every N steps")
    p.add_argument("--replay-chains", type=int, default=32,
                   help="replay stage: chains in the buffer (a multiple of --batch: one group per batch)")
    p.add_argument("--chain-chunks", type=int, default=6, help="replay stage: chunks per chain")
    p.add_argument("--teacher-forced", type=float, default=0.3,
                   help="replay stage: fraction of samples with the ground-truth context")
    p.add_argument("--windows", type=_window_range, default=None, metavar="LO,HI",
                   help="DiT stages: window length drawn per sample (replay: per chain group) "
                        "from [LO, HI]; default the model's window_frames")
    p.add_argument("--mouth-given", type=_share, default=0.0, metavar="SHARE",
                   help="dit/rollout stages on world data: share of clips whose mouth fields are given (the "
                        "world's own mouth), so the model learns to follow a given mouth; the rest keeps the "
                        "mouth to the audio")
    p.add_argument("--mouth-alone", type=_share, default=0.5, metavar="SHARE",
                   help="with --mouth-given: share of those clips whose audio is zeroed, so that the mouth fields "
                        "alone must move the mouth (beside the audio the model learns to ignore them)")
    p.add_argument("--decoder-steps", type=int, default=3000,
                   help="decoder stage: VAE decoder alone, encoder frozen (the DiT's latents stay valid)")
    p.add_argument("--reference-decoder", action="store_true",
                   help="decoder stage: give the decoder the reference portrait (copies what does not move; "
                        "adds the modules to a decoder trained without them)")
    p.add_argument("--temporal-weight", type=float, default=1.0,
                   help="decoder stage: weight of the frame-difference loss (flicker between latent frames)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip-latents", type=int, default=8, help="latent frames per training clip")
    p.add_argument("--pool", type=int, default=400, help="clips pre-encoded by the VAE for the DiT stages")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--keep-every", type=int, default=0,
                   help="DiT stages: also keep the checkpoint of every N-th step as <stage>_<step>.pt (0 = only the "
                        "latest), e.g. to evaluate a run part way (--model <stage>_<step>.pt --export ...)")
    p.add_argument("--keep-steps", type=_step_list, default=(), metavar="N,N,...",
                   help="DiT stages: also keep the checkpoints of these steps, as --keep-every does")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (checkpointed) after this long; 0 = no limit")
    p.add_argument("--export", help="write the trained model here (e.g. model/assets/tiny.safetensors)")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="stream default written into the exported file (repeatable), e.g. denoise_steps=2")


def _share(text: str) -> float:
    """A share of clips: a number in [0, 1]."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"a share must lie between 0 and 1, got {text!r}")
    return x


def _step_list(text: str) -> tuple[int, ...]:
    """Training steps, comma-separated: positive whole numbers."""
    try:
        steps = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected steps such as 400,600, got {text!r}") from None
    if any(n < 1 for n in steps):
        raise argparse.ArgumentTypeError(f"steps must be positive, got {text!r}")
    return steps


def _window_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI window lengths, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"window lengths need 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _checkpoint_path(out: Path, stage: str) -> Path:
    return out / f"{stage}.pt"


def kept_checkpoint(out: Path, stage: str, step: int) -> Path:
    """Where --keep-every / --keep-steps keep a DiT stage's weights of `step`."""
    return out / f"{stage}_{step}.pt"


def save_checkpoint(path: Path, model, opt, step: int, gen, extra: dict | None = None) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict() if opt else None, "step": step,
                "config": model.config.to_dict(), "gen": gen.get_state(), "extra": extra or {},
                "saved_at": time.time()}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


def load_checkpoint(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


class Loop:
    """Step counting, progress bar, periodic checkpoints and the time limit of one stage."""

    def __init__(self, stage: str, total: int, start: int, args, deadline: float | None):
        from tqdm import tqdm

        self.stage, self.total, self.step, self.args, self.deadline = stage, total, start, args, deadline
        self.bar = tqdm(total=total, initial=start, desc=stage, unit="it", file=sys.stderr, dynamic_ncols=True)
        self.ema = None

    def update(self, loss: float, **info) -> None:
        self.step += 1
        self.ema = loss if self.ema is None else 0.98 * self.ema + 0.02 * loss
        self.bar.set_postfix(loss=f"{self.ema:.4f}", **{k: f"{v:.4g}" for k, v in info.items()})
        self.bar.update(1)
        hook = getattr(self.args, "on_progress", None)  # a caller's own report (the server's fit job)
        if hook is not None:
            hook(self.stage, self.step, self.total, self.ema)
        if self.step % self.args.save_every == 0:  # a plain line for logs (the bar rewrites itself)
            rate = self.bar.format_dict.get("rate") or 0.0
            self.bar.write(f"{self.stage} step {self.step}/{self.total} loss {self.ema:.4f} "
                           f"{1 / rate if rate else float('nan'):.2f} s/step {time.strftime('%H:%M:%S')}",
                           file=sys.stderr)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def close(self) -> None:
        self.bar.close()


def _resume(ck: Path, opt, gen) -> int:
    """Optimiser and RNG state of a stage's checkpoint; returns its step (0 when none)."""
    if not ck.exists():
        return 0
    from model.weights import widen_optimizer_state

    state = load_checkpoint(ck)
    opt.load_state_dict(state["opt"])
    widen_optimizer_state(opt, ck)  # a checkpoint of before the head fields, as _build_model widens its model
    gen.set_state(state["gen"])
    return state["step"]


def _saved_at(path: Path) -> float:
    """When a checkpoint was written, as it records it: a folder copied without its files'
    times (`cp -r`) keeps it, and resuming must continue from the last stage that ran, not
    from whichever file was copied last (a fit would have resumed from its decoder stage's
    weights, its DiT untrained). Checkpoints written before the record: the file's time."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # lazily: only the record is read
    return float(state.get("saved_at", path.stat().st_mtime))


def _build_model(args, out: Path):
    """The model to train: from the latest checkpoint of any stage, else the given checkpoint
    (.pt) or model file, else a fresh preset."""
    from model.avatar import AvatarModel
    from model.config import ModelConfig, from_name
    from model.weights import load_model, widen_motion_state

    existing = [_checkpoint_path(out, s) for s in STAGES + EXTRA_STAGES if _checkpoint_path(out, s).exists()]
    newest = max(existing, key=_saved_at, default=None)  # the newest weights
    if newest is None and Path(args.model).is_file() and args.model.endswith(".pt"):
        newest = Path(args.model)
    if newest is not None:
        state = load_checkpoint(newest)
        model = AvatarModel(ModelConfig.from_dict(state["config"]))
        model.load_state_dict(widen_motion_state(state["model"]))  # a checkpoint of before the head fields too
        return model
    if Path(args.model).is_file():
        return load_model(args.model)
    return AvatarModel.random(from_name(args.model), seed=args.seed)


def _random_crop(frames, weight, size: int, gen, *more):
    """The same random (size x size) window, 8-aligned, of frames (B, 3, T, H, W), weights and
    any further tensors with the same last two dimensions (e.g. the reference portrait)."""
    import torch

    H, W = frames.shape[-2:]
    if H <= size and W <= size:
        return (frames, weight, *more)
    y = int(torch.randint((H - size) // 8 + 1, (1,), generator=gen)) * 8
    x = int(torch.randint((W - size) // 8 + 1, (1,), generator=gen)) * 8
    return tuple(t[..., y:y + size, x:x + size] for t in (frames, weight, *more))


def train_vae(model, data, args, out: Path, deadline) -> None:
    import torch

    from model.train.losses import vae_loss

    ck = _checkpoint_path(out, "vae")
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(model.vae.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if ck.exists():
        state = load_checkpoint(ck)
        if state["extra"].get("stats_done") and state["step"] >= args.vae_steps:
            return
        # A finished VAE asked for more steps continues from where it stopped; its latent
        # statistics are measured again at the new end.
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
    model.train()
    loop = Loop("vae", args.vae_steps, start, args, deadline)
    while not loop.done and not loop.out_of_time:
        for g in opt.param_groups:  # cosine decay to 10% over the requested steps
            g["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * loop.step / max(1, args.vae_steps))))
        # Fully convolutional: train on random 64x64 crops of 2-latent clips (8x cheaper
        # than whole 128x128 frames, same receptive field per pixel).
        batch = data.clips(args.batch, n_latents=2, gen=gen)
        frames, weight = _random_crop(batch.frames, batch.weight, 64, gen)
        mean, logvar = model.vae.encode_dist(frames)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        recon = model.vae.decode(model.vae.normalize(z), clamp=False)
        losses = vae_loss(recon, frames, weight, mean, logvar)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.vae.parameters(), 1.0)
        opt.step()
        loop.update(losses["loss"].item(), rec=losses["rec"].item())
        if loop.step % args.save_every == 0:
            save_checkpoint(ck, model, opt, loop.step, gen)
    loop.close()
    if loop.done:
        # Latent statistics (per channel) so the DiT sees unit-variance latents.
        model.eval()
        with torch.no_grad():
            zs = torch.cat([model.vae.encode_dist(data.clips(args.batch, n_latents=3, gen=gen).frames)[0]
                            for _ in range(8)], dim=0)
        zs = zs.transpose(0, 1).reshape(zs.shape[1], -1)
        model.config.vae.latent_mean = tuple(float(x) for x in zs.mean(1))
        model.config.vae.latent_std = tuple(float(x) for x in zs.std(1).clamp_min(1e-3))
        log.info("VAE latent std per channel: %s", [round(x, 3) for x in model.config.vae.latent_std])
    save_checkpoint(ck, model, opt, loop.step, gen, {"stats_done": loop.done})


def train_decoder(model, data, args, out: Path, deadline) -> None:
    """The VAE decoder alone, on the frozen encoder's latents.

    The latent space (encoder and latent statistics) is what the DiT learned to predict;
    training only the decoder sharpens the pictures without invalidating a trained DiT,
    so this stage can run before or after the DiT stages. Same reconstruction loss and
    64x64 crops as the VAE stage, latents sampled from the encoder's posterior (a decoder
    that tolerates small latent errors copes better with the DiT's predictions).

    Clips of 3 latents (9 frames), so two latent borders fall inside each; a frame-difference
    loss (`--temporal-weight`) makes the decoded motion match the true motion across them:
    the per-frame loss alone leaves errors that change at every latent border (flicker).
    `--reference-decoder` adds the reference-conditioned modules (see VAEConfig)."""
    import torch

    from model.train.losses import temporal_loss, vae_loss

    ck = _checkpoint_path(out, "decoder")
    gen = torch.Generator().manual_seed(args.seed + 4)
    vae = model.vae
    upgrade = args.reference_decoder and not vae.cfg.reference_decoder
    if upgrade:
        add_reference_decoder(vae)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=args.lr, weight_decay=0.0)
    # A decoder checkpoint from before the upgrade belongs to other parameters: start over.
    start = 0 if upgrade else _resume(ck, opt, gen)
    if start >= args.decoder_steps:
        return
    vae.encoder.eval().requires_grad_(False)
    vae.decoder.train().requires_grad_(True)
    loop = Loop("decoder", args.decoder_steps, start, args, deadline)
    while not loop.done and not loop.out_of_time:
        for g in opt.param_groups:  # short warm-up (fresh optimiser on trained weights), cosine to 10%
            p = loop.step / max(1, args.decoder_steps)
            g["lr"] = args.lr * min(1.0, (loop.step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        batch = data.clips(args.batch, n_latents=3, gen=gen)
        blend = () if batch.blend is None else (batch.blend,)  # a motion warp's per-frame copy source
        frames, weight, reference, *blend = _random_crop(batch.frames, batch.weight, 64, gen, batch.reference, *blend)
        with torch.no_grad():
            mean, logvar = vae.encode_dist(frames)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        recon = vae.decode(vae.normalize(z), clamp=False, reference=reference, blend=blend[0] if blend else None)
        losses = vae_loss(recon, frames, weight, mean, logvar, kl_weight=0.0)
        motion = temporal_loss(recon, frames, weight)
        loss = losses["loss"] + args.temporal_weight * motion
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt.step()
        loop.update(loss.item(), rec=losses["rec"].item(), dt=motion.item())
        if loop.step % args.save_every == 0:
            save_checkpoint(ck, model, opt, loop.step, gen)
    loop.close()
    vae.encoder.requires_grad_(True)
    save_checkpoint(ck, model, opt, loop.step, gen)


def add_reference_decoder(vae) -> None:
    """Switch a trained VAE to the reference-conditioned decoder: a new decoder with the old
    weights and the new modules in their neutral start (zero injection, blend near 0)."""
    from model.vae import Decoder

    vae.cfg.reference_decoder = True  # the config object is the model's: saved with it
    new = Decoder(vae.cfg).to(next(vae.decoder.parameters()).dtype)
    missing, unexpected = new.load_state_dict(vae.decoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("reference_") for k in missing):
        raise RuntimeError(f"decoder upgrade mismatch: missing {missing}, unexpected {unexpected}")
    vae.decoder = new
    log.info("decoder: reference-conditioned modules added (%d new tensors)", len(missing))


def vae_fingerprint(vae):
    """A few numbers that change whenever the latents change: the encoder's weights and the
    latent statistics (the decoder stage leaves both alone, so the pool stays valid)."""
    import torch

    with torch.no_grad():
        sums = [p.double().abs().sum() for p in vae.encoder.parameters()]
    stats = list(vae.cfg.latent_mean or ()) + list(vae.cfg.latent_std or ())
    return torch.tensor([float(sum(sums)), float(sums[0]), float(sums[-1]), *stats], dtype=torch.float64)


def latent_pool(model, data, args, out: Path):
    """The DiT stages' pool of VAE-encoded clips (`--pool` clips of `--clip-latents`), saved in
    `out`; encoded again when the VAE changed or the pool is smaller than asked."""
    import torch

    from model.train.data import LatentPool

    pool_path = out / f"latent_pool_{args.clip_latents}.pt"
    pool = LatentPool.load(pool_path) if pool_path.exists() else None
    fingerprint = vae_fingerprint(model.vae)
    warped = model.warp is not None
    if pool is None or pool.t.get("vae_fingerprint") is None or not torch.equal(pool.t["vae_fingerprint"], fingerprint) \
            or len(pool) < args.pool or ("hint_latent" in pool.t) != warped:
        # Latents from another VAE (it trained on), a smaller pool than asked, or condition
        # latents of the motion warp missing or not wanted: encode again.
        pool = LatentPool.build(data, model.vae, args.pool, args.clip_latents, torch.Generator().manual_seed(args.seed))
        pool.t["vae_fingerprint"] = fingerprint
        pool.save(pool_path)
    return pool


def _sampler(model, pool, trainer, args, stage: str):
    """step, gen -> (ClipBatch, ChunkPlan, Context | None, rollout) for one training step of `stage`."""
    from tqdm import tqdm

    from model.train.chunks import plan_chunk
    from model.train.data import give_mouth
    from model.train.replay import ReplayBuffer

    knobs = model.config.stream
    if stage != "replay":
        rollout = args.rollout_context if stage == "rollout" else None
        fps, rate = model.config.fps, model.config.driving.sample_rate

        def clips(gen):
            return give_mouth(pool.clips(args.batch, gen), args.mouth_given, fps, gen, rate, args.mouth_alone)

        return lambda step, gen: (clips(gen), plan_chunk(args.clip_latents, knobs, gen, args.windows), None, rollout)
    if args.mouth_given:
        raise ValueError("--mouth-given applies to the dit and rollout stages, not replay")
    if args.replay_chains % args.batch:
        raise ValueError(f"--replay-chains {args.replay_chains} is not a multiple of --batch {args.batch}")
    windows = args.windows or (knobs.window_frames, knobs.window_frames)
    buffer = ReplayBuffer(trainer, pool, knobs, args.chain_chunks, args.batch, args.replay_chains // args.batch,
                          windows, args.teacher_forced)

    refreshed = [None]  # the step of the last refresh (a resumed run refreshes at once)

    def sample(step: int, gen):
        if refreshed[0] is None or step - refreshed[0] >= args.replay_every:
            t, refreshed[0] = time.time(), step
            buffer.refresh(gen)
            windows_now = sorted(g.knobs.window_frames for g in buffer.groups)
            tqdm.write(f"replay step {step}: {args.replay_chains} chains regenerated in {time.time() - t:.1f} s "
                       f"(windows {windows_now})", file=sys.stderr)  # a line of its own beside the bar
        s = buffer.sample(gen)
        return s.batch, s.plan, s.context, None

    return sample


def train_dit(model, data, args, out: Path, deadline, stage: str) -> None:
    """The DiT stages: teacher forcing ("dit"), rollout contexts ("rollout"), replayed chains ("replay")."""
    import torch

    from model.train.chunks import ChunkTrainer, sample_sigma
    from model.train.losses import x0_loss

    steps = {"dit": args.dit_steps, "rollout": args.rollout_steps, "replay": args.replay_steps}[stage]
    ck = _checkpoint_path(out, stage)
    gen = torch.Generator().manual_seed(args.seed + {"dit": 2, "rollout": 3, "replay": 5}[stage])
    params = list(model.dit.parameters()) + list(model.driving.parameters())
    lr = args.lr if stage == "dit" else args.lr / 3
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = _resume(ck, opt, gen)
    if start >= steps:
        return
    pool = latent_pool(model, data, args, out)
    model.train()
    model.vae.eval().requires_grad_(False)
    trainer = ChunkTrainer(model)
    sample = _sampler(model, pool, trainer, args, stage)
    # A short fine-tune (model/personal/fit.py) sets its own, shorter warm-up.
    warmup = getattr(args, "warmup_steps", None) or min(300, max(1, steps // 10))
    loop = Loop(stage, steps, start, args, deadline)
    while not loop.done and not loop.out_of_time:
        for g in opt.param_groups:  # linear warm-up, cosine decay to 10%
            p = loop.step / max(1, steps)
            g["lr"] = lr * min(1.0, (loop.step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        batch, plan, context, rollout = sample(loop.step, gen)
        sigma = sample_sigma(len(batch.audio), model.config.sampler.shift, gen)
        out_ = trainer.forward(batch, plan, sigma, gen, rollout=rollout, context=context,
                               context_steps=args.context_steps or None)
        w = batch.latent_weight[:, :, plan.start:plan.start + out_["x0"].shape[2]]
        loss = x0_loss(out_["x0_pred"], out_["x0"], w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loop.update(loss.item(), gnorm=float(gn))
        if loop.step % args.save_every == 0:
            save_checkpoint(ck, model, opt, loop.step, gen)
        if args.keep_every and loop.step % args.keep_every == 0 or loop.step in args.keep_steps:
            # The weights only: a kept step is read as a model (--model, a fit's snapshot
            # choice), never resumed from; the optimiser's state would double the file.
            save_checkpoint(kept_checkpoint(out, stage, loop.step), model, None, loop.step, gen)
    loop.close()
    save_checkpoint(ck, model, opt, loop.step, gen)


def run(args: argparse.Namespace) -> int:
    import torch

    from model.train.data import TrainingData
    from model.weights import save_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    from model.render import parse_knobs

    model = _build_model(args, out)
    knobs = parse_knobs(model.config.stream, args.knob)  # bad knobs fail before hours of training
    data = TrainingData(args.data, model.config, seed=args.seed)
    stages = STAGES if args.stage == "all" else (args.stage,)
    t0 = time.time()
    for stage in stages:
        if stage == "vae":
            train_vae(model, data, args, out, deadline)
        elif stage == "decoder":
            train_decoder(model, data, args, out, deadline)
        else:
            train_dit(model, data, args, out, deadline, stage)
        if deadline is not None and time.time() > deadline:
            print(f"stopped at the time limit during {stage}; run the same command to resume", file=sys.stderr)
            break
    print(f"training wall time this run: {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    if args.export:
        model.config.stream = knobs
        save_model(model.eval(), args.export, extra={"trained_stages": list(stages)}, dtype=torch.float16)
        print(f"exported {args.export}")
    return 0
