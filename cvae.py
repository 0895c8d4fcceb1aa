"""Conditional VAE for text-to-image: a caption c conditions the prior, the recognition net and the decoder.

Papers: Sohn, Lee & Yan, "Learning Structured Output Representation using Deep Conditional Generative
        Models", NeurIPS 2015 (no arXiv id). Kingma, Rezende, Mohamed & Welling, "Semi-Supervised
        Learning with Deep Generative Models", 2014, arXiv:1406.5298 (model M2 with the label observed:
        a fixed prior p(z) = N(0, I), --fixed-prior). IW-NLL: Burda et al. 2015, arXiv:1509.00519.

Usage:
    python cvae.py --train shapes                         # train on the built-in shapes (runs/cvae)
    python cvae.py --resume --out runs/cvae               # continue a stopped run exactly
    python cvae.py --sample "a large red circle at the top left" "a small blue square at the center" \\
                   --ckpt runs/cvae/ckpt.pt -n 8          # grid + one NAME.png / NAME.txt pair per image
    python data.py score runs/cvae/samples                # score those pairs from pixels
    python cvae.py --eval --ckpt runs/cvae/ckpt.pt        # held-out -ELBO, IW-NLL and the shapes scorer
    torchrun --nproc_per_node=2 cvae.py --train shapes    # data parallel (gloo on CPU, nccl on GPU)

Shapes: B batch, T caption bytes (--text-len), E text features, S image side, J = latent_dim,
K importance samples, D = 3*S*S pixel values. Sohn et al. condition an output y on an input x; here
the output is the image x and the input the caption c.

The model:
    c        = TextEncoder(UTF-8 bytes of the caption)         (B, E), pads masked out of the pooling
    q(z|x,c) = N(z; mu(x, c), diag(exp(logvar(x, c))))        recognition network
    p(z|c)   = N(z; mu_p(c), diag(exp(logvar_p(c))))          conditional prior network (N(0, I) with --fixed-prior)
    p(x|z,c) = prod_d Bernoulli(x_d; sigmoid(f(z, c)_d))       generation network
    ELBO     = E_q[log p(x|z,c)] - KL(q(z|x,c) || p(z|c)) <= log p(x|c)        (Sohn et al. eq. 4)
    GSNN     = E_p(z|c)[log p(x|z,c)]                          the path used at test time, trained directly
    loss     = -(alpha ELBO + (1 - alpha) GSNN)                Sohn et al.'s hybrid objective
Each expectation uses one reparameterised sample (z = mu + exp(logvar/2) * eps); log p(x|z,c) is summed
over the D pixel values, the KL over the J latent dimensions, and the loss averaged over the batch.
Samples: z ~ p(z|c), x = sigmoid(f(z, c)).

Known deviations from the papers:
    - the condition is free text through a small byte-level convolutional encoder trained jointly;
    - the decoder is modulated by c at every resolution (FiLM: Perez et al. 2017, arXiv:1709.07871);
    - Adam with warmup and cosine decay instead of the papers' optimisers, and gradient-norm clipping;
    - Bernoulli likelihood on intensities in [0, 1], as in vae.py (see its docstring).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (PAD, TEXT_VOCAB, Logger, NonFiniteGuard, StopRequest, atomic_write, autocast, batches, check,
                  config_from_dict, encode_text, format_score, is_held_out, learning_rate, load_checkpoint, load_state,
                  load_test, load_train_test, parse_caption, parse_config, run_cli, run_config, save_checkpoint, save_grid,
                  score_report, setup, spread_batch, step_generator, teardown, warn_if_cut)


@dataclass
class Config:
    train: str = "shapes"  # training images with captions: a folder, tar shards, 'shapes' or 'shapes:N' (N images)
    test: str = ""  # held-out folder or shards; default: the shapes test split, or a fixed 5% of --train
    out: str = "runs/cvae"  # run folder: ckpt.pt, metrics.jsonl, grids; with --sample, where samples go
    image_size: int = 32  # side S of the square images (a multiple of 8, at least 16)
    latent_dim: int = 16  # J, the dimension of z
    width: int = 32  # channels after the first downsampling; doubled at each of the three
    text_len: int = 64  # T, caption bytes kept (UTF-8, padded or truncated)
    text_dim: int = 128  # E, width of the text encoder and of the caption vector c
    fixed_prior: bool = False  # p(z|c) = N(0, I) (Kingma et al. M2) instead of a learned conditional prior
    alpha: float = 0.9  # weight of the ELBO in the hybrid objective; 1 - alpha weighs the GSNN term (Sohn et al.)
    steps: int = 2000  # optimizer steps in total
    batch_size: int = 64  # images per step and per process
    lr: float = 2e-3  # peak learning rate of Adam
    warmup: int = 100  # steps of linear warmup before cosine decay to lr/10
    grad_clip: float = 5.0  # clip the global gradient norm to this (0: off)
    iw: int = 100  # K, importance samples per image for the held-out IW-NLL
    log_every: int = 100  # steps between progress lines and metric records
    save_every: int = 500  # steps between held-out -ELBO, sample grids and checkpoints
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    seed: int = 0  # seeds initialisation, data order and noise
    resume: bool = False  # continue OUT/ckpt.pt (or --ckpt) with its saved flags; flags given now override them
    sample: list[str] = field(default_factory=list)  # captions: write N samples of each from --ckpt, then exit
    n: int = 8  # images drawn per caption by --sample
    eval: bool = False  # report held-out -ELBO, IW-NLL and (on shapes captions) the scorer for --ckpt, then exit
    ckpt: str = ""  # checkpoint for --sample, --eval and --resume; '' means OUT/ckpt.pt


def validate(config):
    check(config.image_size >= 16 and config.image_size % 8 == 0, "--image-size must be a multiple of 8, >= 16")
    for name in ("latent_dim", "width", "text_len", "text_dim", "steps", "batch_size", "iw", "log_every",
                 "save_every", "n"):
        check(getattr(config, name) > 0, f"--{name.replace('_', '-')} must be positive")
    check(config.lr > 0 and config.warmup >= 0 and config.grad_clip >= 0,
          "--lr must be positive; --warmup and --grad-clip must not be negative")
    check(0 <= config.alpha <= 1, "--alpha must be in [0, 1]")
    check(not (config.sample and config.eval), "--sample and --eval cannot be combined")


# ----------------------------------------------------------------------------------------------------
# Model


class TextEncoder(nn.Module):
    """Caption bytes (B, T) -> c (B, E): byte embeddings, residual 1-D convolutions, then the mean over
    the caption's own bytes (pads are zeroed before every convolution and left out of the mean)."""

    def __init__(self, config, layers=3):
        super().__init__()
        E = config.text_dim
        self.embedding = nn.Embedding(TEXT_VOCAB, E)
        self.convs = nn.ModuleList(nn.Conv1d(E, E, 5, padding=2) for _ in range(layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(E, E))

    def forward(self, tokens):
        mask = (tokens != PAD).unsqueeze(1).float()  # (B, 1, T)
        h = self.embedding(tokens).transpose(1, 2) * mask  # (B, T, E) -> (B, E, T)
        for conv in self.convs:
            h = (h + conv(F.relu(h))) * mask  # (B, E, T)
        pooled = h.sum(2) / mask.sum(2).clamp(min=1)  # (B, E): an empty caption gives 0
        return self.out(pooled)


class Recognition(nn.Module):
    """q(z|x,c): x (B, 3, S, S) and c (B, E) -> mu, logvar (B, J). Three stride-2 convolutions on x,
    then a linear layer on the flattened features joined with c."""

    def __init__(self, config):
        super().__init__()
        width, side = config.width, config.image_size // 8
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),              # (B, width, S/2, S/2)
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),      # (B, 2 width, S/4, S/4)
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.ReLU(),  # (B, 4 width, S/8, S/8)
            nn.Flatten(),                                         # (B, 4 width * S/8 * S/8)
        )
        self.to_stats = nn.Linear(4 * width * side * side + config.text_dim, 2 * config.latent_dim)

    def forward(self, x, c):
        h = torch.cat([self.net(x), c], dim=1)  # (B, 4 width S/8 S/8 + E)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)  # (B, 2J) -> 2 x (B, J)
        return mu, logvar


class Prior(nn.Module):
    """p(z|c): c (B, E) -> mu_p, logvar_p (B, J), a two-layer MLP."""

    def __init__(self, config):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(config.text_dim, config.text_dim), nn.ReLU(),
                                 nn.Linear(config.text_dim, 2 * config.latent_dim))

    def forward(self, c):
        mu, logvar = self.net(c).chunk(2, dim=1)  # (B, 2J) -> 2 x (B, J)
        return mu, logvar


class Decoder(nn.Module):
    """p(x|z,c): z (B, J), c (B, E) -> Bernoulli logits (B, 3, S, S). A linear layer on [z; c], then three
    stride-2 transposed convolutions; before each, c scales and shifts the channels (FiLM)."""

    def __init__(self, config):
        super().__init__()
        width, E, self.side = config.width, config.text_dim, config.image_size // 8
        self.from_latent = nn.Linear(config.latent_dim + E, 4 * width * self.side ** 2)
        channels = (4 * width, 2 * width, width)
        self.films = nn.ModuleList(nn.Linear(E, 2 * C) for C in channels)  # c -> (gamma, beta) per channel
        self.ups = nn.ModuleList(nn.ConvTranspose2d(C, C // 2, 4, 2, 1) for C in channels[:2])
        self.to_logits = nn.ConvTranspose2d(width, 3, 4, 2, 1)

    def forward(self, z, c):
        h = self.from_latent(torch.cat([z, c], 1)).view(len(z), -1, self.side, self.side)  # (B, 4 width, S/8, S/8)
        for i, film in enumerate(self.films):
            gamma, beta = film(c)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> 2 x (B, C, 1, 1)
            h = F.relu(h * (1 + gamma) + beta)  # FiLM: per-channel scale and shift from the caption
            h = self.ups[i](h) if i < len(self.ups) else self.to_logits(h)  # doubles the side, halves C
        return h  # (B, 3, S, S) logits


class CVAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.text = TextEncoder(config)
        self.recognition, self.decoder = Recognition(config), Decoder(config)
        self.prior = None if config.fixed_prior else Prior(config)
        self.latent_dim = config.latent_dim

    def prior_stats(self, c):
        """mu_p, logvar_p of p(z|c), (B, J); zeros for the fixed prior N(0, I)."""
        if self.prior is None:
            zeros = c.new_zeros(len(c), self.latent_dim)
            return zeros, zeros
        return self.prior(c)

    def forward(self, x, tokens, generator=None, gsnn=True):
        """-> logits from z ~ q(z|x,c), logits from z ~ p(z|c) (None unless gsnn), and the stats of q and p."""
        c = self.text(tokens)  # (B, E)
        mu, logvar = self.recognition(x, c)
        mu_p, logvar_p = self.prior_stats(c)
        eps = torch.randn((2, *mu.shape), device=mu.device, generator=generator)  # (2, B, J)
        z = mu + torch.exp(0.5 * logvar) * eps[0]  # reparameterisation, z ~ q(z|x,c)
        logits = self.decoder(z, c)
        prior_logits = None
        if gsnn:  # GSNN: z ~ p(z|c), the way images are generated
            prior_logits = self.decoder(mu_p + torch.exp(0.5 * logvar_p) * eps[1], c)
        return logits, prior_logits, (mu, logvar), (mu_p, logvar_p)

    @torch.no_grad()
    def generate(self, captions, text_len, generator=None):
        """Images (N, 3, S, S) in [0, 1]: z ~ p(z|c), then the Bernoulli means sigmoid(f(z, c))."""
        device = next(self.parameters()).device
        c = self.text(encode_text(captions, text_len).to(device))  # (N, E)
        mu_p, logvar_p = self.prior_stats(c)
        z = mu_p + torch.exp(0.5 * logvar_p) * torch.randn(mu_p.shape, device=device, generator=generator)
        # NOTE: we show the Bernoulli means, as is customary, not binary draws from them.
        return torch.sigmoid(self.decoder(z, c))


# ----------------------------------------------------------------------------------------------------
# Loss and held-out likelihood


def log_likelihood(logits, x):
    """log p(x|z,c), Bernoulli, summed over the pixels and channels of each image: (..., 3, H, W) -> (...)."""
    return -F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none").sum((-3, -2, -1))


def gaussian_kl(mu, logvar, mu_p, logvar_p):
    """KL(N(mu, exp(logvar)) || N(mu_p, exp(logvar_p))) between diagonal Gaussians, in closed form,
    summed over the J latent dimensions: (B, J) -> (B,)
        = 1/2 sum_j [logvar_p - logvar + (exp(logvar) + (mu - mu_p)^2) / exp(logvar_p) - 1]."""
    mu, logvar, mu_p, logvar_p = (t.float() for t in (mu, logvar, mu_p, logvar_p))
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p).pow(2)) / logvar_p.exp() - 1.0).sum(dim=1)


def losses(model, x, tokens, alpha=1.0, generator=None):
    """Per image, (B,) each, in nats: -ELBO, its reconstruction and KL terms, and the hybrid loss
    -(alpha ELBO + (1 - alpha) GSNN)."""
    logits, prior_logits, (mu, logvar), (mu_p, logvar_p) = model(x, tokens, generator, gsnn=alpha < 1)
    reconstruction = -log_likelihood(logits, x)  # -E_q[log p(x|z,c)], one sample
    kl = gaussian_kl(mu, logvar, mu_p, logvar_p)  # KL(q(z|x,c) || p(z|c))
    neg_elbo = reconstruction + kl  # (Sohn et al. eq. 4)
    # NOTE: with alpha = 1 (the plain CVAE) z carries what the caption already says, and prior samples
    # missed their caption (63% scorer accuracy on shapes after 3000 steps); the GSNN term trains the
    # sampling path itself: alpha 0.5 to 0.9 gave 99-100% (3 seeds each), and 0.9 the best -ELBO.
    hybrid = neg_elbo if alpha == 1 else alpha * neg_elbo - (1 - alpha) * log_likelihood(prior_logits, x)
    return neg_elbo, reconstruction, kl, hybrid


@torch.no_grad()
def importance_weighted_nll(model, x, tokens, K, generator=None, chunk_size=25):
    """-log p(x|c) estimated with K samples from q (Burda et al. eq. 8; Sohn et al.'s conditional
    log-likelihood estimate), per image, (B,):
        log p(x|c) ~= log (1/K) sum_k p(x|z_k,c) p(z_k|c) / q(z_k|x,c),   z_k ~ q(z|x,c).
    Equal to the ELBO at K = 1 and tighter as K grows; chunk_size (C below) bounds memory."""
    c = model.text(tokens)  # (B, E)
    mu, logvar = model.recognition(x, c)  # (B, J)
    mu_p, logvar_p = model.prior_stats(c)  # (B, J)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))  # q(z|x,c)
    p = torch.distributions.Normal(mu_p, torch.exp(0.5 * logvar_p))  # p(z|c)
    log_weights = []
    for start in range(0, K, chunk_size):
        C = min(chunk_size, K - start)
        z = mu + q.scale * torch.randn((C, *mu.shape), device=x.device, generator=generator)  # (C, B, J)
        logits = model.decoder(z.flatten(0, 1), c.repeat(C, 1)).view(C, *x.shape)  # (C B, 3, S, S) -> (C, B, 3, S, S)
        log_px = log_likelihood(logits, x.expand(C, *x.shape))  # (C, B)
        log_weights.append(log_px + p.log_prob(z).sum(-1) - q.log_prob(z).sum(-1))  # summed over J: (C, B)
    log_weights = torch.cat(log_weights)  # (K, B)
    return -(torch.logsumexp(log_weights, dim=0) - math.log(K))  # (B,)


@torch.no_grad()
def evaluate(model, dataset, config, device, importance_samples=0, batch_size=250):
    """Held-out -ELBO (and IW-NLL when importance_samples > 0) in nats per image and bits per dimension,
    over every image and over those whose caption names a held-out shapes colour-shape pair (`_unseen`).
    Returns the figures and the captions seen."""
    model.eval()
    generator = torch.Generator(device).manual_seed(config.seed)  # own streams: the figures repeat exactly
    iw_generator = torch.Generator(device).manual_seed(config.seed + 1)
    keys = ("neg_elbo", "iw_nll") if importance_samples else ("neg_elbo",)
    sums, counts, captions = {}, {"": 0, "_unseen": 0}, []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([image for image, _ in items]).to(device)  # (B, 3, S, S)
        batch_captions = [caption for _, caption in items]
        tokens = encode_text(batch_captions, config.text_len).to(device)  # (B, T)
        unseen = torch.tensor([is_held_out(caption) for caption in batch_captions], device=device)  # (B,)
        values = {"neg_elbo": losses(model, x, tokens, 1.0, generator)[0]}
        if importance_samples:
            values["iw_nll"] = importance_weighted_nll(model, x, tokens, importance_samples, iw_generator)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value.sum().item()
            sums[key + "_unseen"] = sums.get(key + "_unseen", 0.0) + value[unseen].sum().item()
        counts[""] += len(x)
        counts["_unseen"] += unseen.sum().item()
        captions += batch_captions
    model.train()
    results = {}
    for key in keys:
        for group in ("", "_unseen") if counts["_unseen"] else ("",):
            results[key + group] = sums[key + group] / counts[group]
            results[key + group + "_bpd"] = results[key + group] / (3 * config.image_size ** 2 * math.log(2))
    return results, captions


def shapes_score(model, captions, config, device, batch_size=500):
    """One sample per caption, read by the shapes scorer: score_report over all, seen and held-out pairs."""
    model.eval()
    generator = torch.Generator(device).manual_seed(config.seed)
    images = torch.cat([model.generate(captions[i: i + batch_size], config.text_len, generator).cpu()
                        for i in range(0, len(captions), batch_size)])  # (N, 3, S, S)
    model.train()
    return score_report(images, captions)


# ----------------------------------------------------------------------------------------------------
# Training


def write_samples(model, captions, config, path, device, per_caption=4):
    """A grid of `per_caption` samples for each caption (one row each), captions under the images."""
    model.eval()
    generator = torch.Generator(device).manual_seed(config.seed)
    repeated = [caption for caption in captions for _ in range(per_caption)]
    save_grid(model.generate(repeated, config.text_len, generator), path, nrow=per_caption, captions=repeated)
    model.train()


def fixed_captions(test_set, count=8):
    """Captions spread over the held-out set (on shapes: seen and held-out colour-shape pairs)."""
    return spread_batch(test_set, count)[1]


def train(config, runtime, checkpoint=None):
    """Train from scratch, or from `checkpoint` (a loaded ckpt.pt) when resuming."""
    out = Path(config.out)
    device = runtime.device
    train_set, test_set = load_train_test(config.train, config.test, config.image_size)
    model = CVAE(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = 0
    if checkpoint:
        load_state(model, checkpoint["model"], out / "ckpt.pt")
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        check(step < config.steps, f"the checkpoint is at step {step} already; pass a larger --steps")
    captions = fixed_captions(test_set)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"cvae: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_set)} training images, {len(test_set)} held out, device {device}, "
              f"{runtime.world_size} process(es), from step {step}")
    network = DistributedDataParallel(model) if runtime.distributed else model
    logger = Logger(out, config.steps, step, runtime.is_main)
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)
    guard = NonFiniteGuard()  # a NaN or infinite loss skips its update; too many stop the run

    def save():
        save_checkpoint(out / "ckpt.pt", "cvae", config, step, model=model.state_dict(),
                        optimizer=optimizer.state_dict())

    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            x, batch_captions = next(data)  # (B, 3, S, S) in [0, 1], B captions
            tokens = encode_text(batch_captions, config.text_len).to(device)  # (B, T)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
            noise = step_generator(device, config.seed, runtime.rank, step)  # eps of this step
            with autocast(device):
                neg_elbo, reconstruction, kl, hybrid = losses(network, x, tokens, config.alpha, noise)
            loss = hybrid.mean()  # nats per image, averaged over the batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            if guard.finite(step, loss, grad_norm):  # else this batch is skipped
                optimizer.step()
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                metrics = dict(loss=loss.item(), neg_elbo=neg_elbo.mean().item(),
                               reconstruction=reconstruction.mean().item(), kl=kl.mean().item(),
                               lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item())
                logger.log(step, **metrics)
                logger.progress(step, loss=metrics["loss"], neg_elbo=metrics["neg_elbo"], kl=metrics["kl"])
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                held_out = evaluate(model, test_set, config, device)[0]
                logger.log(step, **{f"test_{key}": value for key, value in held_out.items()})
                print(f"step {step}: held-out -ELBO {held_out['neg_elbo']:.2f} nats "
                      f"({held_out['neg_elbo_bpd']:.4f} bits/dim)", flush=True)
                write_samples(model, captions, config, out / f"samples_{step:06d}.png", device)
                save()
    if step < config.steps:  # stopped by Ctrl-C or SIGTERM: keep the work, then exit with 130
        if runtime.is_main:
            save()
            print(f"stopped: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        raise KeyboardInterrupt
    if runtime.is_main:
        report(model, test_set, config, device, logger, step)


def report(model, test_set, config, device, logger=None, step=None):
    """Held-out -ELBO and IW-NLL; on shapes captions, the scorer on one sample per held-out caption."""
    results, captions = evaluate(model, test_set, config, device, importance_samples=config.iw)
    score = shapes_score(model, captions, config, device) if all(map(parse_caption, captions)) else None
    if logger:
        logger.log(step, **{f"test_{key}": value for key, value in results.items()}, iw=config.iw,
                   **{f"score_{name}_{key}": value for name, part in (score or {}).items()
                      for key, value in part.items() if key != "n"})
    print(f"held-out ({len(test_set)} images): -ELBO {results['neg_elbo']:.2f} nats/image "
          f"({results['neg_elbo_bpd']:.4f} bits/dim), IW-NLL (K={config.iw}) {results['iw_nll']:.2f} "
          f"nats/image ({results['iw_nll_bpd']:.4f} bits/dim)")
    if "neg_elbo_unseen" in results:
        print(f"  on held-out colour-shape pairs: -ELBO {results['neg_elbo_unseen']:.2f}, "
              f"IW-NLL {results['iw_nll_unseen']:.2f} nats/image")
    if score:
        print("shapes scorer, one sample per held-out caption:\n" + format_score(score))
    return results, score


# ----------------------------------------------------------------------------------------------------
# Sampling and evaluation of a checkpoint


def load_model(config, device):
    """The model and its saved config from --ckpt (default OUT/ckpt.pt)."""
    path = config.ckpt or str(Path(config.out) / "ckpt.pt")
    checkpoint = load_checkpoint(path, "cvae")
    saved = config_from_dict(Config, checkpoint["config"], validate)
    model = CVAE(saved).to(device)
    load_state(model, checkpoint["model"], path)
    return model.eval(), saved, Path(path).parent


def sample(config, runtime, out_given):
    """config.n samples of each caption: OUT/samples.png (captions under the images) and the pairs
    OUT/samples/NNNN.png + NNNN.txt, so that `python data.py score OUT/samples` reads them."""
    model, saved, run_folder = load_model(config, runtime.device)
    out = Path(config.out) if out_given else run_folder
    generator = torch.Generator(runtime.device).manual_seed(config.seed)
    warn_if_cut(config.sample, saved.text_len)
    captions = [caption for caption in config.sample for _ in range(config.n)]
    images = model.generate(captions, saved.text_len, generator)  # (N, 3, S, S)
    save_grid(images, out / "samples.png", nrow=min(config.n, 8), captions=captions)
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):  # PNG + TXT pairs for `python data.py score`
        save_grid(image[None], folder / f"{i:04d}.png", nrow=1, padding=0)  # the image alone, S x S
        atomic_write(folder / f"{i:04d}.txt", lambda f: f.write(caption.encode("utf-8", errors="replace")))
    print(f"wrote {out / 'samples.png'} and {len(images)} PNG + TXT pairs in {out / 'samples'}")


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    config, checkpoint = run_config(config, given, "cvae", validate, training=not (config.sample or config.eval))
    runtime = setup(config.device, config.seed)
    try:
        if config.sample:
            sample(config, runtime, "out" in given)
        elif config.eval:
            model, saved, _ = load_model(config, runtime.device)
            test_set = load_test(saved.train, config.test or saved.test, saved.image_size)
            report(model, test_set, dataclasses.replace(saved, iw=config.iw, seed=config.seed), runtime.device)
        else:
            train(config, runtime, checkpoint)
    finally:
        teardown()


if __name__ == "__main__":
    run_cli(main)
