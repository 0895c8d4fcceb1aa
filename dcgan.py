"""Deep convolutional GAN, unconditional or conditioned on the caption.

Paper:  Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional
        Generative Adversarial Networks", 2015, arXiv:1511.06434. The game: Goodfellow et al.,
        "Generative Adversarial Nets", 2014, arXiv:1406.2661. --cond: Miyato & Koyama, "cGANs with
        Projection Discriminator", 2018, arXiv:1802.05637.

Usage:
    python dcgan.py --train shapes                        # unconditional, 32 px (runs/dcgan)
    python dcgan.py --train shapes --cond --out runs/dcgan-cond   # conditioned on the caption
    python dcgan.py --sample 64 --ckpt runs/dcgan/ckpt.pt # 64 samples: a grid + NAME.png/NAME.txt pairs
    python dcgan.py --sample "a large red triangle at the top" -n 8 --ckpt runs/dcgan-cond/ckpt.pt
    python dcgan.py --eval --ckpt runs/dcgan/ckpt.pt      # the shapes scorer on samples

The game, with D(x) = sigmoid(l(x)): min_G max_D E_x[log D(x)] + E_z[log(1 - D(G(z)))], z ~ U(-1, 1)^J.
With --cond, G(z, y) gets the caption embedding e(y) beside z; D, l(x, y) = psi(phi(x)) + e(y)^T V phi(x).
Shapes: B batch, S image side, J latent_dim, T caption bytes, E text_dim, F = C*4*4 features of D.

Deviations: width 32, batch 64 (the paper's 64 px G starts at 1024 channels, batch 128); lr 1e-3 with
cosine decay (paper 2e-4, constant); samples from a moving average of G; see "Beyond the paper".
"""

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (PAD, TEXT_VOCAB, Logger, NonFiniteGuard, StopRequest, autocast, batches, check, check_ranges,
                  encode_text, format_score, keep_work_if_stopped, learning_rate, load_run, load_state, load_test,
                  load_train_test, parse_caption, parse_config, read_prompts, run_cli, run_config, save_checkpoint,
                  save_grid, score_report, score_shapes, setup, spread_batch, step_generator, warn, warn_if_cut,
                  write_pairs)


@dataclass
class Config:
    train: str = "shapes"  # images (captions for --cond): a folder, shards, shapes[:N]
    test: str = ""  # held-out images; '': shapes' test split or 5% of --train
    out: str = "runs/dcgan"  # run folder
    image_size: int = 32  # S, image side: 16, 32, 64 or 128
    cond: bool = False  # condition G and D on the caption
    latent_dim: int = 100  # J, the dimension of z (paper 100)
    width: int = 32  # channels of G's last and D's first layer
    text_len: int = 64  # T, caption bytes read
    text_dim: int = 32  # E, width of the caption encoders
    steps: int = 2500  # optimizer steps (one D, one G update each)
    batch_size: int = 64  # images per step and per process
    lr: float = 1e-3  # peak learning rate of Adam (paper 2e-4)
    ema: float = 0.999  # decay of the moving average of G
    log_every: int = 100  # steps between progress lines
    save_every: int = 500  # steps between checkpoints
    device: str = "auto"  # auto, cpu, cuda or mps
    seed: int = 0  # seeds weights, data order and noise
    resume: bool = False  # continue OUT/ckpt.pt (flags given win)
    sample: list[str] = field(default_factory=list)  # a count N, or captions: sample, exit
    prompts: str = ""  # a caption file, one a line ('-': stdin)
    n: int = 8  # samples per caption for --sample
    eval: bool = False  # score samples of --ckpt; exit
    ckpt: str = ""  # checkpoint to read; '': OUT/ckpt.pt


def validate(config):
    check(config.image_size in (16, 32, 64, 128), "--image-size must be a power of two from 16 to 128")
    check_ranges(config, ("latent_dim", "width", "text_len", "text_dim", "steps", "batch_size", "log_every",
                          "save_every", "n", "lr"), fractions=("ema",))
    check(config.batch_size >= 2, "--batch-size must be at least 2 (batch norm needs a batch)")
    check(not (config.sample and config.eval), "--sample and --eval cannot be combined")


# ----------------------------------------------------------------------------------------------------
# Model (DCGAN sec. 3): strided convolutions, no pooling and no hidden fully connected layers; batch norm
# except at G's output and D's input; ReLU in G with Tanh at its output; LeakyReLU 0.2 in D.


def initialise(module):
    """Weights from N(0, 0.02) (DCGAN sec. 4), zero biases; batch norm keeps its unit scales, zero shifts."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """G: z (B, J) [and caption bytes (B, T)] -> images (B, 3, S, S) in [-1, 1]."""

    def __init__(self, config):
        super().__init__()
        n = int(math.log2(config.image_size)) - 2  # stride-2 layers between the 4x4 map and the S x S image
        channels = [config.width * 2 ** (n - 1 - i) for i in range(n)] + [3]  # 4x4 map first: 128, 64, 32, 3 at 32 px
        self.text = TextEncoder(config) if config.cond else None  # e(y); see "Beyond the paper"
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
    """D: images (B, 3, S, S) in [-1, 1] [and caption bytes (B, T)] -> logits l(x[, y]) (B,)."""

    def __init__(self, config):
        super().__init__()
        n = int(math.log2(config.image_size)) - 2  # stride-2 layers between the S x S image and a 4x4 map
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
        self.V = nn.Linear(config.text_dim, channels[-1] * 16, bias=False).apply(initialise) if config.cond else None

    def forward(self, x, tokens=None):
        phi = self.features(x)  # (B, F)
        logits = self.psi(phi).squeeze(1)  # psi(phi(x)): (B, 1) -> (B,)
        if self.text is not None:
            logits = logits + (self.V(self.text(tokens)) * phi).sum(1)  # + e(y)^T V phi(x) (Miyato eq. 3): (B,)
        return logits


def noise(count, config, device, generator=None):
    return torch.rand(count, config.latent_dim, device=device, generator=generator) * 2 - 1  # z ~ U(-1, 1)^J


def caption_tokens(captions, config, device):
    return encode_text(captions, config.text_len).to(device) if config.cond else None  # (B, T)


# ----------------------------------------------------------------------------------------------------
# Losses (Goodfellow eq. 1), with l the logit of D: -log D(x) = softplus(-l(x)), -log(1 - D(x)) = softplus(l(x))


def discriminator_loss(real_logits, fake_logits):
    """-log D(x) - log(1 - D(G(z))), minimised by D; each term averaged over its batch (two batches through D)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_loss(fake_logits):
    """-log D(G(z)), averaged over the batch: non-saturating, recommended over log(1 - D(G(z))) (Goodfellow sec. 3)."""
    return F.softplus(-fake_logits.float()).mean()


# ----------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def generate(G_ema, config, device, count, captions=None, seed=0, chunk=250):
    """`count` samples of the averaged G as (N, 3, S, S) in [0, 1]; one per caption when captions are given."""
    generator = torch.Generator(device).manual_seed(seed)
    images = []
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        tokens = caption_tokens(captions[start:start + size], config, device) if captions else None  # (n, T)
        images.append(((G_ema(noise(size, config, device, generator), tokens).float() + 1) / 2).cpu())  # to [0, 1]
    return torch.cat(images)  # (N, 3, S, S)


def sample(G_ema, saved, config, out, device):
    """--cond checkpoint: -n samples of each caption (a row each); unconditional: --sample N. Writes
    OUT/samples.png and OUT/samples/NNNN.png + NNNN.txt (the caption, or nothing) for `data.py score`."""
    if saved.cond:
        captions, per_row = [caption for caption in config.sample for _ in range(config.n)], config.n
        warn_if_cut(config.sample, saved.text_len)
    else:
        check(len(config.sample) == 1 and config.sample[0].isdigit() and int(config.sample[0]) > 0,
              f"{config.ckpt or 'the checkpoint'} is unconditional: --sample takes a count N >= 1, not captions")
        captions, per_row = [""] * int(config.sample[0]), math.ceil(math.sqrt(int(config.sample[0])))
    images = generate(G_ema, saved, device, len(captions), captions if saved.cond else None, config.seed)
    save_grid(images, out / "samples.png", nrow=per_row, captions=captions if saved.cond else None)
    write_pairs(out / "samples", images, captions)  # images (N, 3, S, S): 0000.png + 0000.txt, ...
    print(f"wrote {out / 'samples.png'} and {len(images)} PNG + TXT pairs in {out / 'samples'}")


# ----------------------------------------------------------------------------------------------------
# Beyond the paper


class TextEncoder(nn.Module):
    """Caption bytes (B, T) -> e(y) (B, E): byte embedding, 1-D convolutions dilated 1, 2, 4 (15 bytes seen),
    the max over the bytes, a linear layer, batch norm. NOTE: the paper is unconditional; the batch norm turns
    the captions' near-identical pooled vectors at initialisation into unit-sized differences (layer norm collapsed)."""

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


@torch.no_grad()
def update_ema(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta, for every weight (not the batch-norm statistics).
    NOTE: the paper samples the live G; the average (Yazici et al. 2018, arXiv:1806.04498) is steadier."""
    for average, live in zip(ema.parameters(), model.parameters()):
        average.lerp_(live, 1 - decay)


@torch.no_grad()
def refresh_statistics(ema, config, device, captions=None, count=512, chunk=128):
    """Re-estimate the averaged G's batch-norm statistics (the live G's belong to other weights): `count`
    fixed z (with training captions under --cond) pass in training mode, cumulatively; leaves eval mode."""
    generator = torch.Generator(device).manual_seed(config.seed)
    for module in ema.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average over the chunks
    ema.train()
    for start in range(0, count, chunk):
        chosen = [captions[(start + i) % len(captions)] for i in range(chunk)] if captions else None
        ema(noise(chunk, config, device, generator), caption_tokens(chosen, config, device))  # tokens (chunk, T)
    return ema.eval()


def mean_pairwise_distance(images):
    """Mean L2 distance between the images of a batch (B, 3, S, S): low when G has collapsed."""
    return torch.pdist(images.detach().float().flatten(1)).mean()  # (B, 3 S S) -> B(B-1)/2 distances


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


def log_window(logger, window, step, total_steps, lr, is_main):
    """Log the means of the window (the steps since the last log) and warn; then empty it. NOTE: not in the
    paper, a check that training works: D's accuracy, and G's batch's diversity over the real batch's."""
    d_loss, g_loss, d_accuracy, diversity = (window[:4] / window[4]).tolist()
    first_step = step - int(window[4].item()) + 1
    warnings = health_warnings(step, first_step, total_steps, d_loss, g_loss, d_accuracy, diversity)
    window.zero_()
    logger.log(step, d_loss=d_loss, g_loss=g_loss, d_accuracy=d_accuracy, diversity=diversity, lr=lr,
               **({"warnings": warnings} if warnings else {}))
    logger.progress(step, d_loss=d_loss, g_loss=g_loss, d_accuracy=d_accuracy, diversity=diversity)
    for line in warnings if is_main else []:
        warn(line)


# ----------------------------------------------------------------------------------------------------
# Training


def train(config, runtime, checkpoint=None):
    """Train from scratch, or from `checkpoint` (a loaded ckpt.pt) when resuming."""
    out, device = Path(config.out), runtime.device
    train_set, test_set = load_train_test(config.train, config.test, config.image_size)
    G, D = Generator(config).to(device), Discriminator(config).to(device)
    G_ema = copy.deepcopy(G).requires_grad_(False)  # the moving average of G: it makes the samples
    optimizer_G, optimizer_D = (torch.optim.Adam(network.parameters(), lr=config.lr, betas=(0.5, 0.999))
                                for network in (G, D))  # beta1 0.5 (DCGAN sec. 4)
    step, window = 0, torch.zeros(5, device=device)  # summed D loss, G loss, D accuracy, diversity; steps
    if checkpoint:  # resuming: the weights, Adam's moments, the step and the window
        for module, key in ((G, "generator"), (D, "discriminator"), (G_ema, "ema_generator"),
                            (optimizer_G, "generator_optimizer"), (optimizer_D, "discriminator_optimizer")):
            load_state(module, checkpoint[key], out / "ckpt.pt")
        step, window = checkpoint["step"], checkpoint["window"].to(device)
        check(step < config.steps, f"the checkpoint is at step {step} already; pass a larger --steps")
    refresh_captions = spread_batch(train_set, 512)[1] if config.cond else None
    grid_captions = spread_batch(test_set, 64)[1] if config.cond else None  # up to 64 held-out captions
    grid_z = noise(len(grid_captions) if config.cond else 64, config, device,
                   torch.Generator(device).manual_seed(config.seed))  # (64, J)
    if runtime.is_main:
        millions = [sum(p.numel() for p in network.parameters()) / 1e6 for network in (G, D)]
        print(f"dcgan{' (caption-conditioned)' * config.cond}: G {millions[0]:.2f}M, D {millions[1]:.2f}M parameters, "
              f"{len(train_set)} training images, device {device}, {runtime.world_size} process(es), from step {step}")
    G_network, D_network = (DistributedDataParallel(network) if runtime.distributed else network for network in (G, D))
    logger = Logger(out, config.steps, step, runtime.is_main, config)
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)
    guard = NonFiniteGuard(G, D)  # a NaN or infinite loss skips its step; too many stop the run

    def save():
        refresh_statistics(G_ema, config, device, refresh_captions)
        save_checkpoint(out / "ckpt.pt", "dcgan", config, step, generator=G.state_dict(), discriminator=D.state_dict(),
                        ema_generator=G_ema.state_dict(), generator_optimizer=optimizer_G.state_dict(),
                        discriminator_optimizer=optimizer_D.state_dict(), window=window.cpu())

    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            x, captions = next(data)  # (B, 3, S, S) in [0, 1]
            guard.remember()  # the batch-norm statistics before this step
            real, tokens = 2 * x - 1, caption_tokens(captions, config, device)  # G's tanh range; (B, T)
            for group in optimizer_G.param_groups + optimizer_D.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, 0)
            z = noise(len(x), config, device, step_generator(device, config.seed, runtime.rank, step))  # (B, J)
            with autocast(device):  # D step: ascend log D(x) + log(1 - D(G(z)))
                fake = G_network(z, tokens)  # G(z): (B, 3, S, S); under --cond with the real batch's captions
                real_logits = D_network(real, tokens)  # (B,)
                fake_logits = D_network(fake.detach(), tokens)  # (B,)
            d_loss = discriminator_loss(real_logits, fake_logits)
            optimizer_D.zero_grad(set_to_none=True)
            d_loss.backward()
            norm = nn.utils.clip_grad_norm_(D.parameters(), math.inf)  # the gradient norm only: clips nothing
            updated = guard.finite(step, d_loss, norm)  # else no D, G or EMA update
            if updated:
                optimizer_D.step()
                with autocast(device):  # G step: descend -log D(G(z)) through the updated D, called bare
                    g_loss = generator_loss(D(fake, tokens))  # (not through DDP: D gets no gradient here)
                optimizer_G.zero_grad(set_to_none=True)
                g_loss.backward(inputs=list(G.parameters()))
                updated = guard.finite(step, g_loss, nn.utils.clip_grad_norm_(G.parameters(), math.inf))
                if updated:
                    optimizer_G.step()
            step += 1
            if updated:  # a skipped step leaves the moving average and the health window alone
                update_ema(G_ema, G, min(config.ema, (1 + step) / (10 + step)))  # short memory early on
                with torch.no_grad():  # the health window (see log_window)
                    accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
                    diversity = mean_pairwise_distance(fake) / mean_pairwise_distance(real).clamp(min=1e-8)
                    window += torch.stack([d_loss, g_loss, accuracy, diversity, torch.ones_like(d_loss)]).detach()
            if step % config.log_every == 0 or step == config.steps:
                log_window(logger, window, step, config.steps, optimizer_G.param_groups[0]["lr"], runtime.is_main)
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                save()  # with G_ema's statistics refreshed: the grid below uses them
                with torch.no_grad():  # fixed z (and held-out captions): 64 samples of the averaged G
                    images = (G_ema(grid_z, caption_tokens(grid_captions, config, device)).float() + 1) / 2
                save_grid(images, out / f"samples_{step:06d}.png", nrow=8, captions=grid_captions)
    keep_work_if_stopped(step, config.steps, runtime, save, out)  # Ctrl-C or SIGTERM: save, exit 130
    if runtime.is_main:
        report(G_ema, test_set, config, device, logger, step)


SCORED_SAMPLES = 1000  # unconditional samples the shapes scorer reads at the end of training and for --eval


def report(G_ema, test_set, config, device, logger=None, step=None):
    """On shapes: under --cond one sample per held-out caption, scored for caption fidelity (seen and
    held-out colour-shape pairs apart); otherwise the fraction of SCORED_SAMPLES samples read as one clean shape."""
    captions = [test_set[i][1] for i in range(len(test_set))]
    if not all(parse_caption(caption) for caption in captions):
        return None
    if config.cond:
        results = score_report(generate(G_ema, config, device, len(captions), captions, config.seed), captions)
        print(f"samples for the {len(captions)} held-out captions, read by the shapes scorer:\n{format_score(results)}")
    else:
        images = generate(G_ema, config, device, SCORED_SAMPLES, seed=config.seed)  # (N, 3, S, S)
        results = {"clean": score_shapes(images, [""] * SCORED_SAMPLES)["clean"]}
        print(f"samples read as one clean shape by the shapes scorer: {100 * results['clean']:.1f}% of "
              f"{SCORED_SAMPLES}")
    if logger:
        logger.log(step, score=results)
    return results


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    if config.prompts:  # --sample's captions, read from a file
        config.sample = list(config.sample) + read_prompts(config.prompts)
    config, checkpoint = run_config(config, given, "dcgan", validate, training=not (config.sample or config.eval),
                                    required=("config", "step", "generator", "discriminator", "ema_generator",
                                              "generator_optimizer", "discriminator_optimizer", "window"))
    runtime = setup(config.device, config.seed)
    if not (config.sample or config.eval):
        return train(config, runtime, checkpoint)
    G_ema, saved, out = load_run(config, given, "dcgan", validate,  # --sample and --eval: the averaged G
                                 lambda saved: Generator(saved).to(runtime.device), key="ema_generator")
    if config.sample:
        sample(G_ema, saved, config, out, runtime.device)
    else:
        test_set = load_test(saved.train, config.test or saved.test, saved.image_size)
        check(report(G_ema, test_set, replace(saved, seed=config.seed), runtime.device) is not None,
              "--eval scores shapes samples, but the held-out captions are not shapes captions")


if __name__ == "__main__":
    run_cli(main)
