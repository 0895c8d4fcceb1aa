"""Deep convolutional GAN, unconditional or conditioned on the caption.

Paper:  Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional
        Generative Adversarial Networks", 2015, arXiv:1511.06434.
        The game and its loss: Goodfellow et al., "Generative Adversarial Nets", 2014, arXiv:1406.2661.
        Caption conditioning: Miyato & Koyama, "cGANs with Projection Discriminator", 2018, arXiv:1802.05637.

Usage:
    python dcgan.py --train shapes                        # unconditional, 32 px (runs/dcgan)
    python dcgan.py --train shapes --cond --out runs/dcgan-cond   # conditioned on the caption
    python dcgan.py --resume --out runs/dcgan             # continue a stopped run exactly
    python dcgan.py --sample 64 --ckpt runs/dcgan/ckpt.pt # 64 samples: a grid + NAME.png/NAME.txt pairs
    python dcgan.py --sample "a large red triangle at the top" "a small cyan circle at the center" \\
                    -n 8 --ckpt runs/dcgan-cond/ckpt.pt   # 8 samples of each caption, captions under them
    python data.py score runs/dcgan-cond/samples          # score those pairs from pixels
    python dcgan.py --eval --ckpt runs/dcgan/ckpt.pt      # the shapes scorer on samples
    torchrun --nproc_per_node=2 dcgan.py --train shapes   # data parallel (gloo on CPU, nccl on GPU)

Shapes: B batch, S image side, J = latent_dim, T = text_len bytes, E = text_dim, C channels,
F = C * 4 * 4 flattened discriminator features.

The game (Goodfellow et al. eq. 1), with D(x) = sigmoid(l(x)) and l the discriminator's logit:
    min_G max_D  E_x[log D(x)] + E_z[log(1 - D(G(z)))],        z ~ U(-1, 1)^J   (DCGAN sec. 4)
    D's loss: -log D(x) - log(1 - D(G(z))) = softplus(-l(x)) + softplus(l(G(z))), each term averaged
              over its batch (real and generated images go through D as two batches)
    G's loss: -log D(G(z)) = softplus(-l(G(z))), averaged over the batch: the non-saturating loss that
              Goodfellow et al. (sec. 3) recommend instead of minimising log(1 - D(G(z)))
    One step: one D update, then one G update through the updated D.
With --cond, G(z, y) and l(x, y) also take the caption y, and the discriminator is (Miyato & Koyama eq. 3)
    l(x, y) = psi(phi(x)) + e(y)^T V phi(x)
with phi the discriminator's convolutional features (flattened), psi a linear layer, e(y) a byte-level
caption encoder, V a matrix. G sees y as e(y) concatenated to z.

Architecture (DCGAN sec. 3): strided convolutions, no pooling and no hidden fully connected layers;
batch norm everywhere except G's output and D's input; ReLU in G with Tanh at its output; LeakyReLU
(slope 0.2) in D; weights from N(0, 0.02); Adam with beta1 0.5.

Health checks: every --log-every steps the log and metrics.jsonl get D's accuracy and the diversity
of G's batch (mean pairwise distance of its images over that of the real batch's); a collapse of the
diversity, D winning outright, or non-finite losses are printed as warning lines and recorded. A step
whose loss or gradient is not finite updates nothing, and the 11th such step stops the run
(data.NonFiniteGuard).

Known deviations from the paper:
    - sized for a CPU: width 32 (the paper's 64-px G starts at 1024 channels), batch 64 (paper 128);
    - lr 1e-3 decaying (cosine, to lr/10) instead of a constant 2e-4: in our 2000-step runs on shapes 2e-4
      made blobs, then one collapsed shape;
    - samples come from an exponential moving average of G's weights (Yazici et al. 2018,
      arXiv:1806.04498), whose batch-norm statistics are re-estimated for the averaged weights;
    - the caption encoders (one in G, one in D) end in batch norm (see TextEncoder) and keep PyTorch's
      default initialisation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (PAD, TEXT_VOCAB, Logger, NonFiniteGuard, StopRequest, atomic_write, autocast, batches, check,
                  config_from_dict, encode_text, format_score, learning_rate, load_checkpoint, load_state, load_test,
                  load_train_test, parse_caption, parse_config, run_cli, run_config, save_checkpoint, save_grid, score_report,
                  score_shapes, setup, spread_batch, step_generator, teardown, warn, warn_if_cut)


@dataclass
class Config:
    train: str = "shapes"  # training images: a folder or shards (captions for --cond), 'shapes' or 'shapes:N'
    test: str = ""  # held-out folder or shards; default: the shapes test split, or a fixed 5% of --train
    out: str = "runs/dcgan"  # run folder: ckpt.pt, metrics.jsonl, grids
    image_size: int = 32  # side S of the square images (a power of two from 16 to 128)
    cond: bool = False  # condition G and D on the caption (G: concatenated to z; D: projection)
    latent_dim: int = 100  # J, the dimension of z ~ U(-1, 1) (paper 100)
    width: int = 32  # channels of G's last hidden layer and of D's first; doubled per halving of the side
    text_len: int = 64  # T, caption bytes the text encoder reads (longer captions are cut)
    text_dim: int = 32  # E, channels of the text encoder and size of its caption embedding
    steps: int = 2500  # optimizer steps in total (one D and one G update each)
    batch_size: int = 64  # images per step and per process (paper 128)
    lr: float = 1e-3  # peak learning rate of Adam for both networks (paper 2e-4: too slow for a short run)
    beta1: float = 0.5  # Adam's beta1 for both networks (paper 0.5)
    ema: float = 0.999  # decay of the moving average of G's weights that makes the samples
    log_every: int = 100  # steps between progress lines, metric records and the collapse checks
    save_every: int = 500  # steps between fixed-noise grids and checkpoints
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    seed: int = 0  # seeds initialisation, data order and noise
    resume: bool = False  # continue OUT/ckpt.pt (or --ckpt) with its saved flags; flags given now override them
    sample: list[str] = field(default_factory=list)  # captions (a --cond checkpoint) or a count N: sample --ckpt, exit
    n: int = 8  # samples per caption for --sample with captions
    eval: bool = False  # score samples of --ckpt with the shapes scorer, then exit
    ckpt: str = ""  # checkpoint for --sample, --eval and --resume; '' means OUT/ckpt.pt


def validate(config):
    check(config.image_size in (16, 32, 64, 128), "--image-size must be a power of two from 16 to 128")
    for name in ("latent_dim", "width", "text_len", "text_dim", "steps", "batch_size", "log_every", "save_every", "n"):
        check(getattr(config, name) > 0, f"--{name.replace('_', '-')} must be positive")
    check(config.lr > 0 and 0 <= config.beta1 < 1 and 0 <= config.ema < 1,
          "--lr must be positive; --beta1 and --ema must be in [0, 1)")
    check(config.batch_size >= 2, "--batch-size must be at least 2 (batch norm needs a batch)")
    check(not (config.sample and config.eval), "--sample and --eval cannot be combined")


# ----------------------------------------------------------------------------------------------------
# Model


def initialise(module):
    """Weights from N(0, 0.02) (DCGAN sec. 4), zero biases, unit batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class TextEncoder(nn.Module):
    """Caption bytes (B, T) -> e(y) (B, E): byte embedding, three 1-D convolutions dilated 1, 2, 4 (each
    byte's feature sees the 15 bytes around it), the maximum over the caption's bytes, then a linear
    layer and batch norm. The batch norm matters: at initialisation every caption pools to nearly the
    same vector, and normalising over the batch turns their small differences into unit-sized ones that
    G and D can use from the first step (with layer norm instead, conditional runs collapsed)."""

    def __init__(self, config):
        super().__init__()
        width = config.text_dim
        self.embedding = nn.Embedding(TEXT_VOCAB, width, padding_idx=PAD)
        self.convolutions = nn.ModuleList(nn.Conv1d(width, width, 3, padding=d, dilation=d) for d in (1, 2, 4))
        self.out = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width))

    def forward(self, tokens):
        mask = (tokens != PAD).unsqueeze(1).float()  # (B, 1, T)
        h = self.embedding(tokens).transpose(1, 2)  # (B, T, E) -> (B, E, T)
        for convolution in self.convolutions:
            h = F.relu(convolution(h)) * mask  # pads stay zero: nothing leaks in past a caption's end
        return self.out(h.amax(2))  # max over the bytes (B, E); a pad's 0 never exceeds a ReLU feature


def levels(config):
    """Stride-2 layers between the 4x4 map and the S x S image: log2(S) - 2."""
    return int(math.log2(config.image_size)) - 2


class Generator(nn.Module):
    """z (B, J) [and caption bytes (B, T)] -> images (B, 3, S, S) in [-1, 1]."""

    def __init__(self, config):
        super().__init__()
        n = levels(config)
        channels = [config.width * 2 ** (n - 1 - i) for i in range(n)] + [3]  # 4x4 map first: 128, 64, 32, 3 at 32 px
        self.text = TextEncoder(config) if config.cond else None
        inputs = config.latent_dim + (config.text_dim if config.cond else 0)
        # "project and reshape" (DCGAN fig. 1): one matrix multiplication to a 4x4 map, no hidden FC layer
        self.project = nn.Linear(inputs, channels[0] * 16, bias=False)
        self.net = nn.Sequential(nn.BatchNorm2d(channels[0]), nn.ReLU())
        for i in range(n):  # each doubles the side: (B, C_i, H, W) -> (B, C_i+1, 2H, 2W)
            last = i == n - 1
            self.net.append(nn.ConvTranspose2d(channels[i], channels[i + 1], 4, 2, 1, bias=last))
            self.net.extend([nn.Tanh()] if last else [nn.BatchNorm2d(channels[i + 1]), nn.ReLU()])  # no BN at output
        self.project.apply(initialise)
        self.net.apply(initialise)

    def forward(self, z, tokens=None):
        if self.text is not None:
            z = torch.cat([z, self.text(tokens)], dim=1)  # (B, J + E)
        h = self.project(z).view(len(z), -1, 4, 4)  # (B, C0 * 16) -> (B, C0, 4, 4)
        return self.net(h)  # (B, 3, S, S)


class Discriminator(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] [and caption bytes (B, T)] -> logits l(x[, y]) (B,)."""

    def __init__(self, config):
        super().__init__()
        n = levels(config)
        channels = [3] + [config.width * 2 ** i for i in range(n)]  # 3, 32, 64, 128 at 32 px
        self.features = nn.Sequential()
        for i in range(n):  # each halves the side: (B, C_i, H, W) -> (B, C_i+1, H/2, W/2)
            self.features.append(nn.Conv2d(channels[i], channels[i + 1], 4, 2, 1, bias=i == 0))
            self.features.extend([nn.BatchNorm2d(channels[i + 1])] if i > 0 else [])  # no BN at the input
            self.features.append(nn.LeakyReLU(0.2))
        self.features.append(nn.Flatten())  # (B, C, 4, 4) -> (B, F): phi(x)
        self.psi = nn.Linear(channels[-1] * 16, 1)  # "flattened and fed into a single sigmoid output"
        self.features.apply(initialise)
        self.psi.apply(initialise)
        self.text = TextEncoder(config) if config.cond else None
        self.V = nn.Linear(config.text_dim, channels[-1] * 16, bias=False) if config.cond else None
        if self.V is not None:
            self.V.apply(initialise)

    def forward(self, x, tokens=None):
        phi = self.features(x)  # (B, F)
        logits = self.psi(phi).squeeze(1)  # psi(phi(x)): (B, 1) -> (B,)
        if self.text is not None:
            logits = logits + (self.V(self.text(tokens)) * phi).sum(1)  # + e(y)^T V phi(x) (Miyato eq. 3): (B,)
        return logits


def noise(count, config, device, generator=None):
    return torch.rand(count, config.latent_dim, device=device, generator=generator) * 2 - 1  # z ~ U(-1, 1)^J


def to_pixels(images):
    return (images.float() + 1) / 2  # G's [-1, 1] -> [0, 1]


# ----------------------------------------------------------------------------------------------------
# Losses, the moving average of G, and the health checks


def discriminator_loss(real_logits, fake_logits):
    """-log D(x) - log(1 - D(G(z))) (Goodfellow eq. 1, maximised by D), each term averaged over its batch."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_loss(fake_logits):
    """-log D(G(z)), averaged over the batch: the non-saturating generator loss (Goodfellow sec. 3)."""
    return F.softplus(-fake_logits.float()).mean()


def gradient_norm(network):
    """The L2 norm of all of a network's gradients together: not finite when any of them is not."""
    return torch.stack([parameter.grad.float().norm() for parameter in network.parameters()
                        if parameter.grad is not None]).norm()


@torch.no_grad()
def update_ema(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta, for every weight (not the batch-norm statistics)."""
    for average, live in zip(ema.parameters(), model.parameters()):
        average.lerp_(live, 1 - decay)


@torch.no_grad()
def refresh_statistics(ema, config, device, captions=None, count=512, chunk=128):
    """Re-estimate the averaged generator's batch-norm statistics: the live G's running averages belong
    to other weights. `count` fixed noise vectors (with training captions under --cond) pass through in
    training mode with a cumulative average, then the generator is left in eval mode."""
    generator = torch.Generator(device).manual_seed(config.seed)
    for module in ema.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average over the chunks
    ema.train()
    for start in range(0, count, chunk):
        tokens = None
        if captions:
            chosen = [captions[(start + i) % len(captions)] for i in range(chunk)]
            tokens = encode_text(chosen, config.text_len).to(device)  # (chunk, T)
        ema(noise(chunk, config, device, generator), tokens)
    return ema.eval()


def mean_pairwise_distance(images):
    """Mean L2 distance between the images of a batch (B, 3, S, S): low when G has collapsed."""
    return torch.pdist(images.detach().float().flatten(1)).mean()  # B(B-1)/2 distances


def health_warnings(step, first_step, total_steps, d_loss, g_loss, d_accuracy, diversity):
    """Divergence and mode collapse over the window of steps first_step..step, as warning lines. G starts
    out making near-identical images, so collapse and D's dominance are judged after a fifth of the run."""
    where = f"steps {first_step}-{step}"
    if not (math.isfinite(d_loss) and math.isfinite(g_loss)):
        return [f"{where}: the losses are not finite (D {d_loss:.4g}, G {g_loss:.4g}): training diverged"]
    warnings = []
    if step > total_steps / 5 and diversity < 0.3:  # G's batches are far less varied than the data's
        warnings.append(f"{where}: sample diversity {diversity:.3f} of the data's: mode collapse")
    if step > total_steps / 5 and d_accuracy > 0.99 and d_loss < 0.01:  # D is certain of every sample
        warnings.append(f"{where}: D accuracy {d_accuracy:.3f}, D loss {d_loss:.4f}: D wins outright, "
                        "G may have diverged")
    return warnings


# ----------------------------------------------------------------------------------------------------
# Training


def caption_tokens(captions, config, device):
    return encode_text(captions, config.text_len).to(device) if config.cond else None  # (B, T)


@torch.no_grad()
def write_grid(ema, grid_noise, grid_captions, config, path, device):
    """64 samples of the averaged G from fixed noise (and fixed held-out captions under --cond)."""
    images = to_pixels(ema(grid_noise, caption_tokens(grid_captions, config, device)))
    save_grid(images, path, nrow=8, captions=grid_captions if config.cond else None)


def train(config, runtime, checkpoint=None):
    """Train from scratch, or from `checkpoint` (a loaded ckpt.pt) when resuming."""
    out = Path(config.out)
    device = runtime.device
    train_set, test_set = load_train_test(config.train, config.test, config.image_size)
    generator, discriminator = Generator(config).to(device), Discriminator(config).to(device)
    ema = copy.deepcopy(generator).requires_grad_(False)
    optimizers = [torch.optim.Adam(network.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
                  for network in (generator, discriminator)]
    step, window = 0, torch.zeros(5, device=device)  # window: summed D loss, G loss, D accuracy, diversity; steps
    if checkpoint:
        for module, key in ((generator, "generator"), (discriminator, "discriminator"), (ema, "ema_generator")):
            load_state(module, checkpoint[key], out / "ckpt.pt")
        optimizers[0].load_state_dict(checkpoint["generator_optimizer"])
        optimizers[1].load_state_dict(checkpoint["discriminator_optimizer"])
        step, window = checkpoint["step"], checkpoint["window"].to(device)
        check(step < config.steps, f"the checkpoint is at step {step} already; pass a larger --steps")
    refresh_captions = spread_batch(train_set, 512)[1] if config.cond else None
    grid_captions = spread_batch(test_set, 64)[1] if config.cond else None  # up to 64 held-out captions
    grid_noise = noise(len(grid_captions) if config.cond else 64, config, device,
                       torch.Generator(device).manual_seed(config.seed))  # (64, J)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        millions = [sum(p.numel() for p in network.parameters()) / 1e6 for network in (generator, discriminator)]
        print(f"dcgan{' (caption-conditioned)' if config.cond else ''}: G {millions[0]:.2f}M, D {millions[1]:.2f}M "
              f"parameters, {len(train_set)} training images, device {device}, {runtime.world_size} process(es), "
              f"from step {step}")
    if runtime.distributed:
        generator_network, discriminator_network = map(DistributedDataParallel, (generator, discriminator))
    else:
        generator_network, discriminator_network = generator, discriminator
    logger = Logger(out, config.steps, step, runtime.is_main)
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)
    guard = NonFiniteGuard(generator, discriminator)  # a NaN or infinite loss skips its step; too many stop the run

    def save():
        refresh_statistics(ema, config, device, refresh_captions)
        save_checkpoint(out / "ckpt.pt", "dcgan", config, step, generator=generator.state_dict(),
                        discriminator=discriminator.state_dict(), ema_generator=ema.state_dict(),
                        generator_optimizer=optimizers[0].state_dict(),
                        discriminator_optimizer=optimizers[1].state_dict(), window=window.cpu())

    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            x, captions = next(data)  # (B, 3, S, S) in [0, 1]
            guard.remember()  # the batch-norm statistics before this step
            real, tokens = 2 * x - 1, caption_tokens(captions, config, device)  # G's tanh range; (B, T)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, config.steps, config.lr, 0)
            z = noise(len(x), config, device, step_generator(device, config.seed, runtime.rank, step))  # (B, J)
            # D step: ascend log D(x) + log(1 - D(G(z)))
            with autocast(device):
                fake = generator_network(z, tokens)  # (B, 3, S, S); under --cond with the real batch's captions
                real_logits = discriminator_network(real, tokens)  # (B,)
                fake_logits = discriminator_network(fake.detach(), tokens)  # (B,)
            d_loss = discriminator_loss(real_logits, fake_logits)
            optimizers[1].zero_grad(set_to_none=True)
            d_loss.backward()
            updated = guard.finite(step, d_loss, gradient_norm(discriminator))  # else no D, G or EMA update
            if updated:
                optimizers[1].step()
                # G step: descend -log D(G(z)) through the updated D. Only G's gradients are computed; D is
                # called bare (not through its DDP wrapper), since it gets no gradient to average.
                with autocast(device):
                    g_loss = generator_loss(discriminator(fake, tokens))
                optimizers[0].zero_grad(set_to_none=True)
                g_loss.backward(inputs=list(generator.parameters()))
                updated = guard.finite(step, g_loss, gradient_norm(generator))
                if updated:
                    optimizers[0].step()
            step += 1
            if updated:  # a skipped step leaves the moving average and the health window alone
                update_ema(ema, generator, min(config.ema, (1 + step) / (10 + step)))  # short memory early on
                with torch.no_grad():
                    accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
                    diversity = mean_pairwise_distance(fake) / mean_pairwise_distance(real).clamp(min=1e-8)
                    window += torch.stack([d_loss, g_loss, accuracy, diversity, torch.ones_like(d_loss)]).detach()
            if step % config.log_every == 0 or step == config.steps:
                d_mean, g_mean, accuracy_mean, diversity_mean = (window[:4] / window[4]).tolist()
                warnings = health_warnings(step, step - int(window[4].item()) + 1, config.steps, d_mean, g_mean,
                                           accuracy_mean, diversity_mean)
                window.zero_()
                metrics = dict(d_loss=d_mean, g_loss=g_mean, d_accuracy=accuracy_mean, diversity=diversity_mean,
                               lr=optimizers[0].param_groups[0]["lr"])
                logger.log(step, **metrics, **({"warnings": warnings} if warnings else {}))
                logger.progress(step, d_loss=d_mean, g_loss=g_mean, d_accuracy=accuracy_mean, diversity=diversity_mean)
                for line in warnings if runtime.is_main else []:
                    warn(line)
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                save()
                write_grid(ema, grid_noise, grid_captions, config, out / f"samples_{step:06d}.png", device)
    if step < config.steps:  # stopped by Ctrl-C or SIGTERM: keep the work, then exit with 130
        if runtime.is_main:
            save()
            print(f"stopped: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        raise KeyboardInterrupt
    if runtime.is_main:
        report(ema, test_set, config, device, logger, step)


# ----------------------------------------------------------------------------------------------------
# Sampling and evaluation


@torch.no_grad()
def generate(ema, config, device, count, captions=None, seed=0, chunk=250):
    """`count` samples of the averaged G as (N, 3, S, S) in [0, 1]; one per caption when captions are given."""
    generator = torch.Generator(device).manual_seed(seed)
    images = []
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        tokens = caption_tokens(captions[start:start + size], config, device) if captions else None  # (n, T)
        images.append(to_pixels(ema(noise(size, config, device, generator), tokens)).cpu())
    return torch.cat(images)  # (N, 3, S, S)


SCORED_SAMPLES = 1000  # unconditional samples the shapes scorer reads at the end of training and for --eval


def report(ema, test_set, config, device, logger=None, step=None):
    """On shapes: under --cond one sample per held-out caption, scored for caption fidelity (seen and
    held-out colour-shape pairs apart); otherwise the fraction of SCORED_SAMPLES samples read as one clean shape."""
    captions = [test_set[i][1] for i in range(len(test_set))]
    if not all(parse_caption(caption) for caption in captions):
        return None
    if config.cond:
        results = score_report(generate(ema, config, device, len(captions), captions, config.seed), captions)
        print(f"samples for the {len(captions)} held-out captions, read by the shapes scorer:\n{format_score(results)}")
    else:
        count = SCORED_SAMPLES
        results = {"clean": score_shapes(generate(ema, config, device, count, seed=config.seed), [""] * count)["clean"]}
        print(f"samples read as one clean shape by the shapes scorer: {100 * results['clean']:.1f}% of {count}")
    if logger:
        logger.log(step, score=results)
    return results


def load_generator(config, device):
    """The averaged generator and its saved config from --ckpt (default OUT/ckpt.pt)."""
    path = config.ckpt or str(Path(config.out) / "ckpt.pt")
    checkpoint = load_checkpoint(path, "dcgan", required=("config", "step", "ema_generator"))
    saved = config_from_dict(Config, checkpoint["config"], validate)
    ema = Generator(saved).to(device)
    load_state(ema, checkpoint["ema_generator"], path)
    return ema.eval(), saved, Path(path).parent


def sample(config, runtime, out_given):
    """A caption-conditioned checkpoint: --sample CAPTION [...] -n N, N samples of each caption (one row
    each); an unconditional one: --sample N. Writes OUT/samples.png and OUT/samples/NAME.png + NAME.txt
    pairs (the caption, or an empty line), so that `python data.py score OUT/samples` reads them."""
    ema, saved, run_folder = load_generator(config, runtime.device)
    out = Path(config.out) if out_given else run_folder
    if saved.cond:
        captions, per_row = [caption for caption in config.sample for _ in range(config.n)], config.n
        names = [f"{i // config.n:03d}_{i % config.n:03d}" for i in range(len(captions))]
        warn_if_cut(config.sample, saved.text_len)
    else:
        check(len(config.sample) == 1 and config.sample[0].isdigit() and int(config.sample[0]) > 0,
              f"{config.ckpt or 'the checkpoint'} is unconditional: --sample takes a count N >= 1, not captions")
        captions, per_row = None, math.ceil(math.sqrt(int(config.sample[0])))
        names = [f"{i:05d}" for i in range(int(config.sample[0]))]
    images = generate(ema, saved, runtime.device, len(names), captions, config.seed)  # (N, 3, S, S)
    save_grid(images, out / "samples.png", nrow=per_row, captions=captions)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for i, (image, name) in enumerate(zip(images, names)):
        save_grid(image[None], out / "samples" / f"{name}.png", nrow=1, padding=0)  # the image alone, S x S
        text = (captions[i] if captions else "") + "\n"
        atomic_write(out / "samples" / f"{name}.txt", lambda f: f.write(text.encode("utf-8", errors="replace")))
    print(f"wrote {out / 'samples.png'} and {len(images)} PNG + TXT pairs in {out / 'samples'}")


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    config, checkpoint = run_config(config, given, "dcgan", validate, training=not (config.sample or config.eval),
                                    required=("config", "step", "generator", "discriminator", "ema_generator",
                                              "generator_optimizer", "discriminator_optimizer", "window"))
    runtime = setup(config.device, config.seed)
    try:
        if config.sample:
            sample(config, runtime, "out" in given)
        elif config.eval:
            ema, saved, _ = load_generator(config, runtime.device)
            test_set = load_test(saved.train, config.test or saved.test, saved.image_size)
            check(report(ema, test_set, dataclasses.replace(saved, seed=config.seed), runtime.device) is not None,
                  "--eval scores shapes samples, but the held-out captions are not shapes captions")
        else:
            train(config, runtime, checkpoint)
    finally:
        teardown()


if __name__ == "__main__":
    run_cli(main)
