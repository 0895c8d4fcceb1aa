"""Auto-Encoding Variational Bayes: a convolutional variational autoencoder.

Paper:  Kingma & Welling, "Auto-Encoding Variational Bayes", 2013, arXiv:1312.6114.
        Held-out likelihood by importance weighting: Burda, Grosse & Salakhutdinov, "Importance
        Weighted Autoencoders", 2015, arXiv:1509.00519.

Usage:
    python vae.py --train shapes                          # train on the built-in shapes (runs/vae)
    python vae.py --train data/fashion/train --test data/fashion/test --steps 5000  # see README
    python vae.py --resume --out runs/vae                 # continue a stopped run exactly
    python vae.py --sample 64 --ckpt runs/vae/ckpt.pt     # prior samples + an interpolation grid
    python vae.py --eval --ckpt runs/vae/ckpt.pt --iw 1000  # held-out -ELBO and IW-NLL
    torchrun --nproc_per_node=2 vae.py --train shapes     # data parallel (gloo on CPU, nccl on GPU)

Shapes: B batch, S image side, J = latent_dim, K importance samples, D = 3*S*S pixel values.

The model:
    q(z|x) = N(z; mu(x), diag(exp(logvar(x))))     recognition model, a conv net
    p(z)   = N(z; 0, I)                             prior
    p(x|z) = prod_d Bernoulli(x_d; sigmoid(f(z)_d)) generative model, a transposed-conv net
    ELBO   = E_q[log p(x|z)] - KL(q(z|x) || p(z)) <= log p(x)          (paper eq. 3)
The expectation uses one reparameterised sample z = mu + exp(logvar/2) * eps, eps ~ N(0, I) (eq. 10).

Known deviations from the paper:
    - convolutional encoder and decoder instead of one-hidden-layer MLPs;
    - Adam with warmup and cosine decay instead of Adagrad, and gradient-norm clipping;
    - the Bernoulli likelihood is applied to intensities in [0, 1], as the paper (and pytorch/examples)
      do for MNIST; for non-binary pixels it is not a normalised density over images, so its NLL
      compares models trained the same way, not models with other likelihoods.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (Logger, NonFiniteGuard, StopRequest, UsageError, autocast, batches, check, check_ranges,
                  keep_work_if_stopped, learning_rate, load_run, load_test, load_train_test, parse_config, restore,
                  run_cli, run_config, save_checkpoint, save_grid, score_shapes, setup, shapes_size, spread_batch,
                  step_generator, warn)


@dataclass
class Config:
    train: str = "shapes"  # training images: a folder, tar shards (captions unused), 'shapes' or 'shapes:N' (N images)
    test: str = ""  # held-out folder or shards; default: the shapes test split, or a fixed 5% of --train
    out: str = "runs/vae"  # run folder: ckpt.pt, metrics.jsonl, grids
    image_size: int = 32  # side S of the square images (a multiple of 8, at least 16)
    latent_dim: int = 16  # J, the dimension of z
    width: int = 32  # channels after the first downsampling; doubled at each of the three
    steps: int = 3000  # optimizer steps in total
    batch_size: int = 64  # images per step and per process
    lr: float = 2e-3  # peak learning rate of Adam
    warmup: int = 100  # steps of linear warmup before cosine decay to lr/10
    grad_clip: float = 5.0  # clip the global gradient norm to this (0: off)
    iw: int = 100  # K, importance samples per image for the held-out IW-NLL
    log_every: int = 100  # steps between progress lines and metric records
    save_every: int = 1000  # steps between held-out -ELBO, grids and checkpoints
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    seed: int = 0  # seeds initialisation, data order and noise
    resume: bool = False  # continue OUT/ckpt.pt (or --ckpt) with its saved flags; flags given now override them
    sample: int = 0  # N > 0: write N prior samples and an interpolation grid from --ckpt, then exit
    eval: bool = False  # report held-out -ELBO and IW-NLL of --ckpt, then exit
    ckpt: str = ""  # checkpoint for --sample, --eval and --resume; '' means OUT/ckpt.pt


def validate(config):
    check(config.image_size >= 16 and config.image_size % 8 == 0, "--image-size must be a multiple of 8, >= 16")
    check_ranges(config, ("latent_dim", "width", "steps", "batch_size", "iw", "log_every", "save_every", "lr"),
                 ("warmup", "grad_clip", "sample"))


# ----------------------------------------------------------------------------------------------------
# Model


class Encoder(nn.Module):
    """x (B, 3, S, S) -> mu, logvar (B, J): three stride-2 convolutions, then a linear layer."""

    def __init__(self, config):
        super().__init__()
        width, side = config.width, config.image_size // 8
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),              # (B, width, S/2, S/2)
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),      # (B, 2 width, S/4, S/4)
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.ReLU(),  # (B, 4 width, S/8, S/8)
            nn.Flatten(),                                         # (B, 4 width * S/8 * S/8)
        )
        self.to_stats = nn.Linear(4 * width * side * side, 2 * config.latent_dim)

    def forward(self, x):
        mu, logvar = self.to_stats(self.net(x)).chunk(2, dim=1)  # (B, 2J) -> 2 x (B, J)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, J) -> Bernoulli logits (B, 3, S, S): a linear layer, then three stride-2 transposed convs."""

    def __init__(self, config):
        super().__init__()
        width, self.side = config.width, config.image_size // 8
        self.from_z = nn.Linear(config.latent_dim, 4 * width * self.side ** 2)
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.ReLU(),  # (B, 2 width, S/4, S/4)
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),      # (B, width, S/2, S/2)
            nn.ConvTranspose2d(width, 3, 4, 2, 1),                          # (B, 3, S, S) logits
        )

    def forward(self, z):
        h = self.from_z(z).view(len(z), -1, self.side, self.side)  # (B, 4 width S/8 S/8) -> (B, 4 width, S/8, S/8)
        return self.net(h)


class VAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.encoder, self.decoder = Encoder(config), Decoder(config)

    def forward(self, x, generator=None):
        mu, logvar = self.encoder(x)
        eps = torch.randn(mu.shape, device=mu.device, generator=generator)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation, z ~ q(z|x)   (paper eq. 10)
        return self.decoder(z), mu, logvar


# ----------------------------------------------------------------------------------------------------
# Loss and held-out likelihood


def log_likelihood(logits, x):
    """log p(x|z) = sum_d [x_d log sigmoid(l_d) + (1 - x_d) log(1 - sigmoid(l_d))], summed over the
    pixels and channels of each image: (..., 3, H, W) -> (...)."""
    return -F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none").sum((-3, -2, -1))


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j), summed
    over the J latent dimensions: (B, J) -> (B,)   (paper appendix B)."""
    return 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=1)


def negative_elbo(model, x, generator=None):
    """-ELBO per image in nats, (B,), with its two terms."""
    logits, mu, logvar = model(x, generator)
    reconstruction = -log_likelihood(logits, x)  # (B,)
    kl = kl_divergence(mu, logvar)  # (B,)
    return reconstruction + kl, reconstruction, kl


@torch.no_grad()
def importance_weighted_nll(model, x, K, generator=None, chunk_size=25):
    """-log p(x) estimated with K importance samples from q (Burda et al. eq. 8), per image, (B,):
        log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x).
    The bound is below log p(x) for every K, equals the ELBO at K = 1, and tightens as K grows.
    Samples are drawn `chunk_size` at a time (C below) to bound memory."""
    mu, logvar = model.encoder(x)  # (B, J)
    std = torch.exp(0.5 * logvar)
    log_weights = []
    for start in range(0, K, chunk_size):
        C = min(chunk_size, K - start)
        eps = torch.randn((C, *mu.shape), device=x.device, generator=generator)  # (C, B, J)
        z = mu + std * eps  # (C, B, J)
        logits = model.decoder(z.flatten(0, 1)).view(C, *x.shape)  # (C * B, 3, S, S) -> (C, B, 3, S, S)
        log_px = log_likelihood(logits, x.expand(C, *x.shape))  # (C, B)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)  # summed over J: (C, B)
        log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)  # summed over J: (C, B)
        log_weights.append(log_px + log_pz - log_qz)
    log_weights = torch.cat(log_weights)  # (K, B)
    return -(torch.logsumexp(log_weights, dim=0) - math.log(K))  # (B,)


@torch.no_grad()
def evaluate(model, dataset, config, device, importance_samples=0, batch_size=250):
    """Held-out -ELBO (and IW-NLL when importance_samples > 0), averaged over images, in nats per image
    and in bits per dimension (nats / (3*H*W*ln 2))."""
    model.eval()
    # own generators, apart from the training RNG stream, so the figures repeat exactly
    generator = torch.Generator(device).manual_seed(config.seed)
    iw_generator = torch.Generator(device).manual_seed(config.seed + 1)
    totals = {"neg_elbo": 0.0, "iw_nll": 0.0}
    count = 0
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        x = torch.stack([dataset[i][0] for i in indices]).to(device)  # (B, 3, S, S)
        totals["neg_elbo"] += negative_elbo(model, x, generator)[0].sum().item()
        if importance_samples:
            totals["iw_nll"] += importance_weighted_nll(model, x, importance_samples, iw_generator).sum().item()
        count += len(x)
    model.train()
    dimensions = 3 * config.image_size ** 2
    keys = ("neg_elbo", "iw_nll") if importance_samples else ("neg_elbo",)
    results = {key: totals[key] / count for key in keys}
    results |= {f"{key}_bpd": results[key] / (dimensions * math.log(2)) for key in keys}
    return results


# ----------------------------------------------------------------------------------------------------
# Training


def write_grids(model, test_set, config, out, tag, device):
    """Reconstructions (odd rows: input, even rows: output) and prior samples, with fixed noise."""
    model.eval()
    generator = torch.Generator(device).manual_seed(config.seed)
    with torch.no_grad():
        per_row = min(8, len(test_set))
        count = min(32, len(test_set)) // per_row * per_row
        x = spread_batch(test_set, count)[0].to(device)  # (N, 3, S, S)
        reconstruction = torch.sigmoid(model.decoder(model.encoder(x)[0]))  # decode the posterior mean
        rows = [t.view(-1, per_row, *x.shape[1:]) for t in (x, reconstruction)]  # 2 x (N/R, R, 3, S, S)
        pairs = torch.stack(rows, dim=1).flatten(0, 2)  # (N/R, 2, R, 3, S, S) -> (2N, 3, S, S)
        save_grid(pairs, out / f"reconstructions_{tag}.png", nrow=per_row)
        z = torch.randn(64, config.latent_dim, device=device, generator=generator)
        save_grid(torch.sigmoid(model.decoder(z)), out / f"samples_{tag}.png", nrow=8)
    model.train()


def train(config, runtime, checkpoint=None):
    """Train from scratch, or from `checkpoint` (a loaded ckpt.pt) when resuming."""
    out = Path(config.out)
    device = runtime.device
    train_set, test_set = load_train_test(config.train, config.test, config.image_size)
    model = VAE(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = restore(checkpoint, config, model, optimizer)  # 0, or --resume's step with its states loaded
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"vae: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_set)} training images, {len(test_set)} held out, device {device}, "
              f"{runtime.world_size} process(es), from step {step}")
    network = DistributedDataParallel(model) if runtime.distributed else model
    logger = Logger(out, config.steps, step, runtime.is_main, config)
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)
    guard = NonFiniteGuard()  # a NaN or infinite loss skips its update; too many stop the run

    def save():
        save_checkpoint(out / "ckpt.pt", "vae", config, step, model=model.state_dict(),
                        optimizer=optimizer.state_dict())

    dimensions = 3 * config.image_size ** 2
    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            x, _ = next(data)  # (B, 3, S, S) in [0, 1]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
            noise = step_generator(device, config.seed, runtime.rank, step)  # eps of this step
            with autocast(device):
                neg_elbo, reconstruction, kl = negative_elbo(network, x, noise)
            loss = neg_elbo.mean()  # -ELBO in nats per image, averaged over the batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            if guard.finite(step, loss, grad_norm):  # else this batch is skipped
                optimizer.step()
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                metrics = dict(loss=loss.item(), loss_bpd=loss.item() / (dimensions * math.log(2)),
                               reconstruction=reconstruction.mean().item(), kl=kl.mean().item(),
                               lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item())
                logger.log(step, **metrics)
                logger.progress(step, loss=metrics["loss"], kl=metrics["kl"])
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                held_out = evaluate(model, test_set, config, device)
                logger.log(step, **{f"test_{key}": value for key, value in held_out.items()})
                print(f"step {step}: held-out -ELBO {held_out['neg_elbo']:.2f} nats "
                      f"({held_out['neg_elbo_bpd']:.4f} bits/dim)", flush=True)
                write_grids(model, test_set, config, out, f"{step:06d}", device)
                save()
    keep_work_if_stopped(step, config.steps, runtime, save, out)  # Ctrl-C or SIGTERM: save, exit 130
    if runtime.is_main:
        report(model, test_set, config, device, logger, step)


@torch.no_grad()
def clean_sample_fraction(model, config, device, count=500):
    """On shapes: the fraction of prior samples that the pixel scorer reads as one clean shape."""
    model.eval()
    z = torch.randn(count, config.latent_dim, device=device,
                    generator=torch.Generator(device).manual_seed(config.seed))  # (N, J)
    fraction = score_shapes(torch.sigmoid(model.decoder(z)), [""] * count)["clean"]
    model.train()
    return fraction


def report(model, test_set, config, device, logger=None, step=None):
    results = evaluate(model, test_set, config, device, importance_samples=config.iw)
    if shapes_size(config.train):
        results["clean_samples"] = clean_sample_fraction(model, config, device)
    if logger:
        logger.log(step, **{f"test_{key}": value for key, value in results.items()}, iw=config.iw)
    print(f"held-out ({len(test_set)} images): -ELBO {results['neg_elbo']:.2f} nats/image "
          f"({results['neg_elbo_bpd']:.4f} bits/dim), IW-NLL (K={config.iw}) {results['iw_nll']:.2f} "
          f"nats/image ({results['iw_nll_bpd']:.4f} bits/dim)")
    if "clean_samples" in results:
        print(f"prior samples read as one clean shape by the shapes scorer: {100 * results['clean_samples']:.1f}%")
    return results


# ----------------------------------------------------------------------------------------------------
# Sampling and evaluation of a checkpoint


@torch.no_grad()
def sample(model, saved, config, out, runtime):
    generator = torch.Generator(runtime.device).manual_seed(config.seed)
    z = torch.randn(config.sample, saved.latent_dim, device=runtime.device, generator=generator)  # (N, J)
    # NOTE: we show the Bernoulli means sigmoid(f(z)), as is customary, not binary draws from them.
    save_grid(torch.sigmoid(model.decoder(z)), out / "samples.png", nrow=int(math.ceil(math.sqrt(config.sample))))
    print(f"wrote {out / 'samples.png'}")
    try:
        test_set = load_test(saved.train, config.test or saved.test, saved.image_size)
    except UsageError as error:
        warn(f"no interpolation grid: the training data is not available here ({error})")
        return
    # Interpolate between the posterior means of held-out pairs: z_t = (1 - t) mu_a + t mu_b, 10 steps.
    x = spread_batch(test_set, min(16, len(test_set)) // 2 * 2)[0].to(runtime.device)  # (2P, 3, S, S)
    mu = model.encoder(x)[0].view(-1, 2, saved.latent_dim)  # (P, 2, J): P pairs
    t = torch.linspace(0, 1, 10, device=runtime.device).view(1, 10, 1)  # (1, 10, 1)
    z = (1 - t) * mu[:, :1] + t * mu[:, 1:]  # (P, 10, J)
    x = torch.sigmoid(model.decoder(z.flatten(0, 1)))  # z (P, 10, J) -> (P * 10, J): one row per pair
    save_grid(x, out / "interpolation.png", nrow=10)
    print(f"wrote {out / 'interpolation.png'}")


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    config, checkpoint = run_config(config, given, "vae", validate, training=not (config.sample or config.eval))
    runtime = setup(config.device, config.seed)
    if not (config.sample or config.eval):
        return train(config, runtime, checkpoint)
    model, saved, out = load_run(config, given, "vae", validate, lambda saved: VAE(saved).to(runtime.device))
    if config.sample:
        sample(model, saved, config, out, runtime)
    else:
        test_set = load_test(saved.train, config.test or saved.test, saved.image_size)
        report(model, test_set, dataclasses.replace(saved, iw=config.iw, seed=config.seed), runtime.device)


if __name__ == "__main__":
    run_cli(main)
