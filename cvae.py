"""Conditional VAE for text-to-image: a caption c conditions the prior, the recognition net and the decoder.

Paper:  Sohn, Lee & Yan, "Learning Structured Output Representation using Deep Conditional Generative
        Models", NeurIPS 2015 (no arXiv id). --fixed-prior: Kingma, Rezende, Mohamed & Welling, "Semi-
        Supervised Learning with Deep Generative Models", 2014, arXiv:1406.5298 (M2, label observed).

Usage:
    python cvae.py --train shapes                         # train on the built-in shapes (runs/cvae)
    python cvae.py --sample "a large red circle at the top left" -n 8 --ckpt runs/cvae/ckpt.pt
    python cvae.py --eval --ckpt runs/cvae/ckpt.pt        # held-out -ELBO, IW-NLL and the shapes scorer
    torchrun --nproc_per_node=2 cvae.py --train shapes    # data parallel; --resume --out RUN continues

Sohn et al.'s output y given an input x is here the image x given a caption c:
    recognition q(z|x,c), prior p(z|c) (N(0, I) with --fixed-prior), generation p(x|z,c), Bernoulli;
    loss = -(alpha ELBO + (1 - alpha) GSNN), with ELBO = E_q[log p(x|z,c)] - KL(q(z|x,c) || p(z|c))
    and GSNN = E_p(z|c)[log p(x|z,c)] (the path samples take), each from one reparameterised z.
Shapes: B batch, T caption bytes, E text features, S image side, J latent_dim, K importance samples.

Deviations: the condition is free text through a byte-level encoder trained jointly; FiLM in the
decoder; Adam with warmup, cosine decay and gradient clipping; Bernoulli on intensities in [0, 1].
"""

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (PAD, TEXT_VOCAB, Logger, NonFiniteGuard, StopRequest, autocast, batches, check, check_ranges,
                  encode_text, format_score, keep_work_if_stopped, learning_rate, load_run, load_test, load_train_test,
                  parse_caption, parse_config, read_prompts, restore, run_cli, run_config, save_checkpoint, save_grid,
                  score_report, setup, spread_batch, step_generator, warn_if_cut, write_pairs)


@dataclass
class Config:
    train: str = "shapes"  # images with captions: a folder, tar shards, shapes or shapes:N
    test: str = ""  # held-out images; '': shapes' test split or 5% of --train
    out: str = "runs/cvae"  # run folder; with --sample, where samples go
    image_size: int = 32  # S, image side (a multiple of 8, >= 16)
    latent_dim: int = 16  # J, the dimension of z
    width: int = 32  # channels after the first downsampling
    text_len: int = 64  # T, caption bytes read
    text_dim: int = 128  # E, width of the text encoder
    fixed_prior: bool = False  # p(z|c) = N(0, I), Kingma et al.'s M2
    alpha: float = 0.9  # ELBO weight; 1 - alpha weighs GSNN
    steps: int = 2000  # optimizer steps
    batch_size: int = 64  # images per step and per process
    lr: float = 2e-3  # peak learning rate of Adam
    warmup: int = 100  # warmup steps before cosine decay
    iw: int = 100  # K, importance samples for the IW-NLL
    log_every: int = 100  # steps between progress lines
    save_every: int = 500  # steps between checkpoints
    device: str = "auto"  # auto, cpu, cuda or mps
    seed: int = 0  # seeds weights, data order and noise
    resume: bool = False  # continue OUT/ckpt.pt (flags given win)
    sample: list[str] = field(default_factory=list)  # captions: write -n samples of each, exit
    prompts: str = ""  # a caption file, one a line ('-': stdin)
    n: int = 8  # samples per caption for --sample
    eval: bool = False  # held-out -ELBO, IW-NLL, scores; exit
    ckpt: str = ""  # checkpoint to read; '': OUT/ckpt.pt


def validate(config):
    check(config.image_size >= 16 and config.image_size % 8 == 0, "--image-size must be a multiple of 8, >= 16")
    check_ranges(config, ("latent_dim", "width", "text_len", "text_dim", "steps", "batch_size", "iw", "log_every",
                          "save_every", "n", "lr"), ("warmup",))
    check(0 <= config.alpha <= 1, "--alpha must be in [0, 1]")
    check(not (config.sample and config.eval), "--sample and --eval cannot be combined")


# ----------------------------------------------------------------------------------------------------
# Model: recognition network q(z|x,c), prior network p(z|c), generation network p(x|z,c)


class Recognition(nn.Module):
    """q(z|x,c): x (B, 3, S, S), c (B, E) -> mu, logvar (B, J): three stride-2 convolutions, a linear layer."""

    def __init__(self, config):
        super().__init__()
        width, side = config.width, config.image_size // 8
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),              # (B, width, S/2, S/2)
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),      # (B, 2 width, S/4, S/4)
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.ReLU(),  # (B, 4 width, S/8, S/8)
            nn.Flatten())                                         # (B, 4 width * S/8 * S/8)
        self.to_stats = nn.Linear(4 * width * side * side + config.text_dim, 2 * config.latent_dim)

    def forward(self, x, c):
        h = torch.cat([self.net(x), c], dim=1)  # (B, 4 width S/8 S/8 + E)
        return self.to_stats(h).chunk(2, dim=1)  # (B, 2J) -> mu, logvar, 2 x (B, J)


class Prior(nn.Module):
    """p(z|c): c (B, E) -> mu_p, logvar_p (B, J), a two-layer MLP."""

    def __init__(self, config):
        super().__init__()
        E = config.text_dim
        self.net = nn.Sequential(nn.Linear(E, E), nn.ReLU(), nn.Linear(E, 2 * config.latent_dim))

    def forward(self, c):
        return self.net(c).chunk(2, dim=1)  # (B, 2J) -> mu_p, logvar_p, 2 x (B, J)


class Decoder(nn.Module):
    """p(x|z,c): z (B, J), c (B, E) -> Bernoulli logits (B, 3, S, S). A linear layer on [z; c], then three
    stride-2 transposed convolutions."""

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
            # NOTE: the paper feeds c to the generation network once, with z; we also scale and shift the
            # channels by c before every upsampling (FiLM: Perez et al. 2017, arXiv:1709.07871).
            gamma, beta = film(c)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> 2 x (B, C, 1, 1)
            h = F.relu(h * (1 + gamma) + beta)
            h = self.ups[i](h) if i < len(self.ups) else self.to_logits(h)  # doubles the side, halves C
        return h  # (B, 3, S, S) logits


class CVAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.text = TextEncoder(config)  # caption bytes -> c; see "Beyond the paper"
        self.recognition, self.decoder = Recognition(config), Decoder(config)
        self.prior = None if config.fixed_prior else Prior(config)
        self.latent_dim = config.latent_dim

    def prior_stats(self, c):
        """mu_p, logvar_p of p(z|c), (B, J); zeros for the fixed prior N(0, I)."""
        zeros = c.new_zeros(len(c), self.latent_dim)
        return (zeros, zeros) if self.prior is None else self.prior(c)

    def forward(self, x, tokens, generator=None, gsnn=True):
        """-> logits from z ~ q(z|x,c), logits from z ~ p(z|c) (None unless gsnn), and the stats of q and p."""
        c = self.text(tokens)  # (B, E)
        mu, logvar = self.recognition(x, c)
        mu_p, logvar_p = self.prior_stats(c)
        eps = torch.randn((2, *mu.shape), device=mu.device, generator=generator)  # (2, B, J)
        z = mu + torch.exp(0.5 * logvar) * eps[0]  # reparameterisation, z ~ q(z|x,c)
        logits = self.decoder(z, c)
        prior_logits = self.decoder(mu_p + torch.exp(0.5 * logvar_p) * eps[1], c) if gsnn else None  # GSNN path
        return logits, prior_logits, (mu, logvar), (mu_p, logvar_p)

    @torch.no_grad()
    def generate(self, captions, text_len, generator=None):
        """Images (N, 3, S, S) in [0, 1]: z ~ p(z|c), then the Bernoulli means sigmoid(f(z, c))."""
        device = next(self.parameters()).device
        c = self.text(encode_text(captions, text_len).to(device))  # (N, E)
        mu_p, logvar_p = self.prior_stats(c)
        z = mu_p + torch.exp(0.5 * logvar_p) * torch.randn(mu_p.shape, device=device, generator=generator)
        return torch.sigmoid(self.decoder(z, c))  # NOTE: the Bernoulli means, as is customary, not binary draws


# ----------------------------------------------------------------------------------------------------
# Loss: the hybrid of the ELBO and the GSNN term; the held-out conditional likelihood


def log_likelihood(logits, x):
    """log p(x|z,c), Bernoulli, summed over the pixels and channels of each image: (..., 3, S, S) -> (...)."""
    return -F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none").sum((-3, -2, -1))


def gaussian_kl(mu, logvar, mu_p, logvar_p):
    """KL(N(mu, exp(logvar)) || N(mu_p, exp(logvar_p))) between diagonal Gaussians, in closed form,
    summed over the J latent dimensions: (B, J) -> (B,)
        = 1/2 sum_j [logvar_p - logvar + (exp(logvar) + (mu - mu_p)^2) / exp(logvar_p) - 1]."""
    mu, logvar, mu_p, logvar_p = (t.float() for t in (mu, logvar, mu_p, logvar_p))
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p).pow(2)) / logvar_p.exp() - 1.0).sum(dim=1)


def losses(model, x, tokens, alpha=1.0, generator=None):
    """Per image, (B,) each, in nats: -ELBO, its reconstruction and KL terms, and the hybrid loss
    -(alpha ELBO + (1 - alpha) GSNN). The caller averages over the batch."""
    logits, prior_logits, (mu, logvar), (mu_p, logvar_p) = model(x, tokens, generator, gsnn=alpha < 1)
    reconstruction = -log_likelihood(logits, x)  # -E_q[log p(x|z,c)], one sample, summed over the D pixel values
    kl = gaussian_kl(mu, logvar, mu_p, logvar_p)  # KL(q(z|x,c) || p(z|c)), summed over J
    neg_elbo = reconstruction + kl  # (Sohn et al. eq. 4)
    # NOTE: with alpha = 1 (the plain CVAE) z carries what the caption already says, and prior samples
    # missed their caption (63% scorer accuracy on shapes after 3000 steps); the GSNN term trains the
    # sampling path itself: alpha 0.5 to 0.9 gave 99-100% (3 seeds each), and 0.9 the best -ELBO.
    hybrid = neg_elbo if alpha == 1 else alpha * neg_elbo - (1 - alpha) * log_likelihood(prior_logits, x)
    return neg_elbo, reconstruction, kl, hybrid


@torch.no_grad()
def importance_weighted_nll(model, x, tokens, K, generator=None, chunk_size=25):
    """-log p(x|c) per image (B,), estimated with K samples from q (Sohn et al.'s conditional log-likelihood;
    Burda et al. 2015, arXiv:1509.00519, eq. 8): log p(x|c) ~= log (1/K) sum_k p(x|z_k,c) p(z_k|c) / q(z_k|x,c).
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
        log_weights.append(log_px + p.log_prob(z).sum(-1) - q.log_prob(z).sum(-1))  # (C, B)
    return -(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(K))  # (K, B) -> (B,)


# ----------------------------------------------------------------------------------------------------
# Sampling


def draw(model, captions, config, device, batch_size=500):
    """One sample per caption, (N, 3, S, S) in [0, 1], from a generator seeded with --seed."""
    model.eval()
    generator = torch.Generator(device).manual_seed(config.seed)
    images = torch.cat([model.generate(captions[i: i + batch_size], config.text_len, generator).cpu()
                        for i in range(0, len(captions), batch_size)])  # (N, 3, S, S)
    model.train()
    return images


def sample(model, saved, config, out, device):
    """-n samples of each caption: OUT/samples.png, and OUT/samples/NNNN.png + NNNN.txt for `data.py score`."""
    warn_if_cut(config.sample, saved.text_len)
    captions = [caption for caption in config.sample for _ in range(config.n)]
    images = model.generate(captions, saved.text_len, torch.Generator(device).manual_seed(config.seed))  # (N, 3, S, S)
    save_grid(images, out / "samples.png", nrow=min(config.n, 8), captions=captions)
    write_pairs(out / "samples", images, captions)
    print(f"wrote {out / 'samples.png'} and {len(images)} PNG + TXT pairs in {out / 'samples'}")


# ----------------------------------------------------------------------------------------------------
# Beyond the paper


class TextEncoder(nn.Module):
    """Caption bytes (B, T) -> c (B, E): byte embeddings, residual 1-D convolutions, the mean over the bytes
    (pads zeroed, left out). NOTE: the paper conditions on an image or a label; ours is free text, so c is learned."""

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
        return self.out(h.sum(2) / mask.sum(2).clamp(min=1))  # mean over bytes (B, E); an empty caption gives 0


# ----------------------------------------------------------------------------------------------------
# Training


def train(config, runtime, checkpoint=None):
    """Train from scratch, or from `checkpoint` (a loaded ckpt.pt) when resuming."""
    out, device = Path(config.out), runtime.device
    train_set, test_set = load_train_test(config.train, config.test, config.image_size)
    model = CVAE(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = restore(checkpoint, config, model, optimizer)  # 0, or --resume's step with its states loaded
    grid_captions = [caption for caption in spread_batch(test_set, 8)[1] for _ in range(4)]  # 8 held out, 4 each
    if runtime.is_main:
        print(f"cvae: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_set)} training "
              f"images, {len(test_set)} held out, device {device}, {runtime.world_size} process(es), from step {step}")
    network = DistributedDataParallel(model) if runtime.distributed else model
    logger = Logger(out, config.steps, step, runtime.is_main, config)  # creates OUT
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)
    guard = NonFiniteGuard()  # a NaN or infinite loss skips its update; too many stop the run

    def save():
        save_checkpoint(out / "ckpt.pt", "cvae", config, step, model=model.state_dict(),
                        optimizer=optimizer.state_dict())

    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            x, captions = next(data)  # (B, 3, S, S) in [0, 1], B captions
            tokens = encode_text(captions, config.text_len).to(device)  # (B, T)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
            noise = step_generator(device, config.seed, runtime.rank, step)  # eps of this step
            with autocast(device):
                neg_elbo, reconstruction, kl, hybrid = losses(network, x, tokens, config.alpha, noise)
            loss = hybrid.mean()  # nats per image, averaged over the batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # NOTE: clipped at norm 5, for stability
            if guard.finite(step, loss, grad_norm):  # else this batch is skipped
                optimizer.step()
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                metrics = dict(loss=loss.item(), neg_elbo=neg_elbo.mean().item(),
                               reconstruction=reconstruction.mean().item(), kl=kl.mean().item(),
                               lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item())
                logger.log(step, **metrics)
                logger.progress(step, **{key: metrics[key] for key in ("loss", "neg_elbo", "kl")})
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                held_out = evaluate(model, test_set, config, device)[0]  # the IW-NLL only at the end
                logger.log(step, **{f"test_{key}": value for key, value in held_out.items()})
                print(f"step {step}: held-out -ELBO {held_out['neg_elbo']:.2f} nats "
                      f"({held_out['neg_elbo_bpd']:.4f} bits/dim)", flush=True)
                images = draw(model, grid_captions, config, device)  # 4 samples of 8 held-out captions, a row each
                save_grid(images, out / f"samples_{step:06d}.png", nrow=4, captions=grid_captions)
                save()
    keep_work_if_stopped(step, config.steps, runtime, save, out)  # Ctrl-C or SIGTERM: save, exit 130
    if runtime.is_main:
        report(model, test_set, config, device, logger, step)


@torch.no_grad()
def evaluate(model, dataset, config, device, K=0, batch_size=250):
    """Held-out -ELBO (and the IW-NLL when K > 0) in nats per image and in bits per dimension; the captions."""
    model.eval()
    generators = [torch.Generator(device).manual_seed(config.seed + i) for i in (0, 1)]  # the figures repeat
    sums, captions = dict.fromkeys(("neg_elbo", "iw_nll") if K else ("neg_elbo",), 0.0), []
    for start in range(0, len(dataset), batch_size):
        images, batch = zip(*[dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        x = torch.stack(images).to(device)  # (B, 3, S, S)
        tokens = encode_text(batch, config.text_len).to(device)  # (B, T)
        sums["neg_elbo"] += losses(model, x, tokens, 1.0, generators[0])[0].sum().item()  # summed over images
        if K:
            sums["iw_nll"] += importance_weighted_nll(model, x, tokens, K, generators[1]).sum().item()
        captions += batch
    model.train()
    results = {}
    for key, total in sums.items():
        results[key] = total / len(captions)  # averaged over the images
        results[key + "_bpd"] = results[key] / (3 * config.image_size ** 2 * math.log(2))
    return results, captions


def report(model, test_set, config, device, logger=None, step=None):
    """Held-out -ELBO and IW-NLL; on shapes captions, the scorer on one sample per held-out caption."""
    results, captions = evaluate(model, test_set, config, device, K=config.iw)
    # NOTE: the paper reports likelihoods only; we also score one sample per shapes caption (data.py's scorer).
    score = score_report(draw(model, captions, config, device), captions) if all(map(parse_caption, captions)) else None
    if logger:
        logger.log(step, **{f"test_{key}": value for key, value in results.items()}, iw=config.iw,
                   **{f"score_{name}_{key}": value for name, part in (score or {}).items()
                      for key, value in part.items() if key != "n"})
    print(f"held-out ({len(test_set)} images): -ELBO {results['neg_elbo']:.2f} nats/image "
          f"({results['neg_elbo_bpd']:.4f} bits/dim), IW-NLL (K={config.iw}) {results['iw_nll']:.2f} "
          f"nats/image ({results['iw_nll_bpd']:.4f} bits/dim)")
    if score:
        print("shapes scorer, one sample per held-out caption:\n" + format_score(score))


# ----------------------------------------------------------------------------------------------------
# Command line plumbing


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    if config.prompts:  # --sample's captions, read from a file
        config.sample = list(config.sample) + read_prompts(config.prompts)
    config, checkpoint = run_config(config, given, "cvae", validate, training=not (config.sample or config.eval))
    runtime = setup(config.device, config.seed)
    if not (config.sample or config.eval):
        return train(config, runtime, checkpoint)
    model, saved, out = load_run(config, given, "cvae", validate, lambda saved: CVAE(saved).to(runtime.device))
    if config.sample:
        sample(model, saved, config, out, runtime.device)
    else:
        test_set = load_test(saved.train, config.test or saved.test, saved.image_size)
        report(model, test_set, replace(saved, iw=config.iw, seed=config.seed), runtime.device)


if __name__ == "__main__":
    run_cli(main)
