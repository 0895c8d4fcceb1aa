"""VQ-VAE-2: a two-level vector-quantised autoencoder, its PixelCNN priors, and the tokenizer of dalle.py.

Papers: Razavi, van den Oord & Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2", 2019,
        arXiv:1906.00446. Quantiser and EMA codebook: van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete
        Representation Learning", 2017, arXiv:1711.00937. Priors: van den Oord et al., "Conditional Image
        Generation with PixelCNN Decoders", 2016, arXiv:1606.05328.

Usage:
    python vqvae2.py --train shapes                          # the autoencoder (runs/vqvae2)
    python vqvae2.py --eval --ckpt runs/vqvae2/ckpt.pt       # held-out MSE, PSNR, codes in use
    python vqvae2.py --encode shapes --ckpt runs/vqvae2/ckpt.pt --out runs/vqvae2/codes.pt
    torchrun --nproc_per_node=4 vqvae2.py --encode SHARDS --ckpt CKPT --out DIR   # a part per process
    python vqvae2.py --train-prior runs/vqvae2/codes.pt      # the priors (runs/vqvae2/prior)
    python vqvae2.py --sample 64 --ckpt runs/vqvae2/prior/ckpt.pt

Deviations (each marked NOTE): an MLP on each 4x4 patch instead of strided convolutions; 1024 codes per
level, not 512; codebooks start from encoder outputs and dead codes restart (as in Jukebox); small priors
without attention; Adam with warmup, cosine decay and gradient clipping.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (CodesDataset, Logger, NonFiniteGuard, StopRequest, autocast, batches, broadcast_from_first_rank,
                  check, check_ranges, config_from_dict, keep_work_if_stopped, learning_rate, load_checkpoint,
                  load_codes, load_state, load_test, load_train_test, parse_config, restore, run_cli, run_config,
                  save_checkpoint, save_grid, setup, split_codes, step_generator, write_codes)

# Shapes: B batch, S image side, C channels, D code dimension, K codes per level, N vectors quantised at
# once; the bottom grid is Hb x Wb = S/4 x S/4, the top grid Ht x Wt = S/8 x S/8.


@dataclasses.dataclass
class Config:
    train: str = "shapes"  # images: a folder, tar shards, 'shapes' or 'shapes:N'
    test: str = ""  # held-out images; empty: shapes' test split or 5% of --train
    out: str = "runs/vqvae2"  # run folder; with --encode, the codes file or folder
    image_size: int = 32  # side S (a multiple of 8, at least 16)
    hidden: int = 64  # C, channels of the S/4 and S/8 grids (paper 128)
    patch_hidden: int = 512  # hidden units of the per-patch MLPs
    residual_blocks: int = 2  # residual blocks per stack (paper 2)
    residual_hidden: int = 32  # channels inside a residual block
    codebook_size: int = 1024  # K, codes per level (paper 512)
    code_dim: int = 64  # D, dimension of a code (paper 64)
    window: int = 25  # steps after which an unused code is dead
    restarts: bool = True  # restart dead codes from encoder outputs
    steps: int = 3200  # optimizer steps
    batch_size: int = 16  # images (or code grids) per step and process
    lr: float = 2e-3  # peak learning rate of Adam
    warmup: int = 100  # steps of warmup, then cosine decay to lr/10
    log_every: int = 100  # steps between metric records
    save_every: int = 1000  # steps between held-out checks and saves
    device: str = "auto"  # auto (cuda, mps, cpu), cpu, cuda or mps
    seed: int = 0  # seeds initialisation, data and restarts
    resume: bool = False  # continue OUT/ckpt.pt (or --ckpt)
    eval: bool = False  # held-out MSE, PSNR, codes used of --ckpt
    encode: str = ""  # images to encode with --ckpt into --out
    train_prior: str = ""  # codes from --encode: train the priors
    prior_width: int = 64  # channels of each PixelCNN prior
    prior_layers: int = 6  # gated layers of each PixelCNN prior
    sample: int = 0  # draw N images from the priors in --ckpt
    ckpt: str = ""  # checkpoint to read (empty: the one in OUT)


def validate(config):
    check(config.image_size >= 16 and config.image_size % 8 == 0, "--image-size must be a multiple of 8, >= 16")
    check_ranges(config, ("hidden", "patch_hidden", "residual_hidden", "codebook_size", "code_dim", "window", "steps",
                          "batch_size", "lr", "log_every", "save_every", "prior_width", "prior_layers"),
                 ("warmup", "sample", "residual_blocks"))
    check(config.codebook_size <= 32768, "--codebook-size must be at most 32768 (codes are stored as int16)")
    modes = [flag for flag, on in (("--eval", config.eval), ("--encode", config.encode),
                                   ("--train-prior", config.train_prior), ("--sample", config.sample)) if on]
    check(len(modes) <= 1, f"{' and '.join(modes)} cannot be combined")


# ----------------------------------------------------------------------------------------------------
# The two-level autoencoder (VQ-VAE-2 section 3.1, algorithm 1), the tokenizer of dalle.py: first its vector
# quantiser with an EMA codebook (VQ-VAE section 3.1 and appendix A.1)


class EMAQuantizer(nn.Module):
    """z_e (B, D, H, W) -> z_q = e_k, k = argmin_j ||z_e - e_j||_2 at each position. The codebook e (K, D) is a
    buffer, never trained by gradient: each e_i is a moving average of the z_e assigned to it."""

    def __init__(self, codebook_size, code_dim, decay=0.99, epsilon=1e-5):  # gamma = 0.99 as in the paper
        super().__init__()
        self.codebook_size, self.decay, self.epsilon = codebook_size, decay, epsilon
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))  # e, (K, D)
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # N, EMA of assignment counts (K,)
        self.register_buffer("embed_sum", self.codebook.clone())  # m, EMA of assigned vector sums (K, D)

    def lookup(self, ids):  # k (B, H, W) -> e_k (B, D, H, W)
        return self.codebook[ids.long()].permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)

    def forward(self, z_e):
        """-> z_q (straight-through), k (B, H, W), commitment ||z_e - sg[z_q]||^2 averaged over B, D, H, W.
        In training mode the codebook then takes one EMA step."""
        B, D, H, W = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):  # distances in float32 even under bf16 autocast
            flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, D)  # (B, D, H, W) -> (N = B H W, D)
            # ||z_e - e_j||^2 = ||z_e||^2 - 2 z_e.e_j + ||e_j||^2; ||z_e||^2 is the same for every j: left out
            distances = torch.addmm(self.codebook.pow(2).sum(1), flat, self.codebook.t(), alpha=-2)  # (N, D) @ (D, K)
            ids = distances.argmin(1)  # k, (N,)
            z_q = self.lookup(ids.view(B, H, W))  # (N,) -> (B, H, W) -> (B, D, H, W)
            if self.training:
                self.update(flat, ids)
            commitment = F.mse_loss(z_e.float(), z_q)  # z_q is a buffer lookup: no gradient reaches it
        z_q = z_e + (z_q - z_e).detach()  # straight-through: the value is z_q, dL/dz_e = dL/dz_q
        return z_q, ids.view(B, H, W), commitment  # k: (N,) -> (B, H, W)

    @torch.no_grad()
    def update(self, flat, ids):
        """One EMA step (VQ-VAE appendix A.1), with the batch statistics summed over all ranks:
            N_i <- gamma N_i + (1 - gamma) n_i            n_i: how many of the N vectors chose code i
            m_i <- gamma m_i + (1 - gamma) sum_j z_e,j    summed over those n_i vectors
            e_i <- m_i / N_i'                             N_i' Laplace-smoothed (as in the authors' code): never 0
        -> n (K,)."""
        K, gamma = self.codebook_size, self.decay
        n = torch.bincount(ids, minlength=K).float()  # (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, flat)  # (N, D) -> (K, D)
        if dist.is_initialized():  # every rank then adds the same totals: the codebooks stay identical
            statistics = torch.cat([n[:, None], sums], 1)  # (K, 1 + D)
            dist.all_reduce(statistics)
            n, sums = statistics[:, 0], statistics[:, 1:]
        self.cluster_size.mul_(gamma).add_(n, alpha=1 - gamma)
        self.embed_sum.mul_(gamma).add_(sums, alpha=1 - gamma)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + K * self.epsilon) * total  # N_i', (K,)
        self.codebook.copy_(self.embed_sum / smoothed[:, None])  # (K, D) / (K, 1)
        return n


class ResidualBlock(nn.Module):
    """h + conv1x1(ReLU(conv3x3(ReLU(h)))), as in the VQ-VAE paper."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, h):
        return h + self.net(h)


def residual_stack(channels, hidden, count):
    return [ResidualBlock(channels, hidden) for _ in range(count)] + [nn.ReLU()]


class VQVAE2(nn.Module):
    """Images x (B, 3, S, S) in [0, 1] <-> top codes (B, S/8, S/8) and bottom codes (B, S/4, S/4):
        h_bottom   = E_bottom(x)                                  (B, C, S/4, S/4)
        z_e_top    = E_top(h_bottom)                              (B, D, S/8, S/8)
        z_q_top    = e_k, k = argmin_j ||z_e_top - e_j||_2        the nearest code of the top codebook
        z_e_bottom = conv1x1([h_bottom; D_top(z_q_top)])          (B, D, S/4, S/4): sees the decoded top
        z_q_bottom = the nearest code of the bottom codebook
        x_hat      = D([upsample(z_q_top); z_q_bottom])           (B, 3, S, S)
    For dalle.py: encode, decode, state, from_state, from_checkpoint, top/bottom_shape and _codebook_size."""

    def __init__(self, config):
        super().__init__()
        self.config, self.image_size = config, config.image_size
        C, D, P = config.hidden, config.code_dim, config.patch_hidden
        R, n = config.residual_hidden, config.residual_blocks
        self.top_codebook_size = self.bottom_codebook_size = config.codebook_size
        self.top_shape, self.bottom_shape = (config.image_size // 8,) * 2, (config.image_size // 4,) * 2
        self.encoder_bottom = nn.Sequential(
            nn.PixelUnshuffle(4),  # (B, 3, S, S) -> (B, 48, S/4, S/4): one 4x4x3 patch per position
            # NOTE: the paper has two strided convolutions here (and transposed ones in D); an MLP on each 4x4
            # patch learns sharp edges faster on a CPU (README).
            nn.Conv2d(48, P, 1), nn.ReLU(), nn.Conv2d(P, C, 1), nn.ReLU(),  # (B, C, S/4, S/4)
            nn.Conv2d(C, C, 3, padding=1), *residual_stack(C, R, n))  # h_bottom (B, C, S/4, S/4)
        self.encoder_top = nn.Sequential(
            nn.Conv2d(C, C, 4, 2, 1), nn.ReLU(),  # (B, C, S/8, S/8)
            nn.Conv2d(C, C, 3, padding=1), *residual_stack(C, R, n),
            nn.Conv2d(C, D, 1))  # z_e_top (B, D, S/8, S/8)
        self.quantize_top = VectorQuantizer(config.codebook_size, D)  # EMAQuantizer + restarts
        self.decoder_top = nn.Sequential(
            nn.Conv2d(D, C, 3, padding=1), *residual_stack(C, R, n),
            nn.ConvTranspose2d(C, D, 4, 2, 1))  # D_top(z_q_top) (B, D, S/4, S/4)
        self.to_z_e_bottom = nn.Conv2d(C + D, D, 1)  # [h_bottom; D_top(z_q_top)] -> z_e_bottom
        self.quantize_bottom = VectorQuantizer(config.codebook_size, D)
        self.upsample_top = nn.ConvTranspose2d(D, D, 4, 2, 1)  # z_q_top onto the bottom grid (B, D, S/4, S/4)
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * D, C, 3, padding=1), *residual_stack(C, R, n),
            nn.Conv2d(C, P, 1), nn.ReLU(), nn.Conv2d(P, 48, 1),  # the mirror MLP: (B, 48, S/4, S/4)
            nn.PixelShuffle(4))  # (B, 48, S/4, S/4) -> (B, 3, S, S), in [-1, 1] units

    def quantize(self, x):
        """x (B, 3, S, S) in [0, 1] -> (z_q_top, z_q_bottom), (top_ids, bottom_ids), (commitment top, bottom)."""
        h_bottom = self.encoder_bottom(2 * x - 1)  # the networks see [-1, 1]
        z_q_top, top_ids, commitment_top = self.quantize_top(self.encoder_top(h_bottom))
        h = torch.cat([h_bottom, self.decoder_top(z_q_top)], 1)  # (B, C + D, S/4, S/4)
        z_e_bottom = self.to_z_e_bottom(h)  # (B, D, S/4, S/4)
        z_q_bottom, bottom_ids, commitment_bottom = self.quantize_bottom(z_e_bottom)
        return (z_q_top, z_q_bottom), (top_ids, bottom_ids), (commitment_top, commitment_bottom)

    def reconstruct(self, z_q_top, z_q_bottom):
        """The decoder D: -> x_hat (B, 3, S, S) in [0, 1] units, not clamped."""
        h = torch.cat([self.upsample_top(z_q_top), z_q_bottom], 1)  # (B, 2D, S/4, S/4)
        return 0.5 * (self.decoder(h) + 1)

    def forward(self, x):
        """-> x_hat (B, 3, S, S), commitments (top, bottom), ids (top (B, Ht, Wt), bottom (B, Hb, Wb))."""
        z_q, ids, commitments = self.quantize(x)
        return self.reconstruct(*z_q), commitments, ids

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, S, S) in [0, 1] -> top_ids (B, Ht, Wt), bottom_ids (B, Hb, Wb), codebooks untouched."""
        training = self.training
        _, ids, _ = self.eval().quantize(images)
        self.train(training)
        return ids

    @torch.no_grad()
    def decode(self, top_ids, bottom_ids):
        """top_ids (B, Ht, Wt), bottom_ids (B, Hb, Wb), any integer type -> images (B, 3, S, S) in [0, 1]."""
        return self.reconstruct(self.quantize_top.lookup(top_ids), self.quantize_bottom.lookup(bottom_ids)).clamp(0, 1)

    def state(self):  # plain data that rebuilds this tokenizer, kept in codes files and prior checkpoints
        return dict(config=dataclasses.asdict(self.config), model=self.state_dict())

    @classmethod
    def from_state(cls, state, device="cpu", path="checkpoint"):
        check(isinstance(state, dict) and {"config", "model"} <= state.keys(), f"{path}: its tokenizer is incomplete")
        model = cls(config_from_dict(Config, state["config"], validate)).to(device)
        load_state(model, state["model"], path)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):  # the autoencoder of a vqvae2 checkpoint, in eval mode
        return cls.from_state(load_checkpoint(path, "vqvae2"), device, path)


def vqvae_loss(x, x_hat, commitments, beta=0.25):  # beta = 0.25 as in both papers
    """L = ||x - x_hat||^2 + beta sum_levels ||z_e - sg[z_q]||^2 (VQ-VAE eq. 3, both levels). Its codebook term
    ||sg[z_e] - e||^2 is left out: the codebooks follow their moving averages (appendix A.1). -> (L, MSE)."""
    mse = F.mse_loss(x_hat.float(), x)  # averaged over pixels, channels and batch, in [0, 1] units
    return mse + beta * (commitments[0] + commitments[1]), mse  # each commitment averaged over B, D, H, W


# ----------------------------------------------------------------------------------------------------
# Gated PixelCNN priors over the codes (VQ-VAE-2 section 3.2)


def gated(a):  # tanh(first half of the channels) * sigmoid(second half): (B, 2C, H, W) -> (B, C, H, W)
    f, g = a.chunk(2, 1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One gated PixelCNN layer (van den Oord et al. 2016, figure 2), causal by padding and shifting: the
    vertical stack at row i sees rows <= i and, shifted down a row, feeds the horizontal stack, which sees row i
    up to column j (the first layer: columns < j). So the output at (i, j) sees only the codes before it in
    raster order. Paper eq. 5: y = tanh(W_f * x + V_f c) * sigmoid(W_g * x + V_g c), c: top codes (bottom prior)."""

    def __init__(self, channels, kernel, first, conditioned):
        super().__init__()
        self.kernel, self.first = kernel, first
        self.vertical = nn.Conv2d(channels, 2 * channels, (kernel // 2 + 1, kernel))  # rows i-k/2..i, cols j-k/2..j+k/2
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, kernel // 2 + 1))  # row i, cols j-k/2..j
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.condition = nn.Conv2d(channels, 4 * channels, 1) if conditioned else None  # V c for both stacks

    def forward(self, vertical, horizontal, condition=None):
        H, W, k = vertical.shape[2], vertical.shape[3], self.kernel
        v = self.vertical(F.pad(vertical, (k // 2, k // 2, k // 2, 0)))  # (B, 2C, H, W): rows <= i
        h = self.horizontal(F.pad(horizontal, (k // 2, 0, 0, 0)))  # (B, 2C, H, W): row i, columns <= j
        if self.first:  # mask A: the first layer must not see the code it predicts
            h = F.pad(h, (1, 0))[:, :, :, :W]  # shift right: columns < j
        h = h + self.vertical_to_horizontal(F.pad(v, (0, 0, 1, 0))[:, :, :H])  # v shifted down: rows < i
        if self.condition is not None:
            condition_v, condition_h = self.condition(condition).chunk(2, 1)  # 2 x (B, 2C, H, W)
            v, h = v + condition_v, h + condition_h
        out = self.horizontal_out(gated(h))
        return gated(v), out if self.first else horizontal + out  # residual on the horizontal stack


class PixelCNN(nn.Module):
    """p(codes) = prod_i p(code_i | codes before i in raster order [, top codes]): ids (B, H, W) -> (B, K, H, W)."""

    def __init__(self, codebook_size, channels, layers, condition_codebook_size=0, kernel=3):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, channels)
        conditioned = condition_codebook_size > 0
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, i == 0, conditioned) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, codebook_size, 1))
        if conditioned:  # the top codes (B, Ht, Wt) become c (B, C, 2 Ht, 2 Wt) on the bottom grid
            self.condition_embed = nn.Embedding(condition_codebook_size, channels)
            self.condition_net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                               nn.ConvTranspose2d(channels, channels, 4, 2, 1))

    def forward(self, ids, condition_ids=None):
        vertical = horizontal = self.embed(ids.long()).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        condition = None
        if condition_ids is not None:  # (B, Ht, Wt, C) -> (B, C, Ht, Wt) -> (B, C, H, W)
            condition = self.condition_net(self.condition_embed(condition_ids.long()).permute(0, 3, 1, 2))
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal, condition)
        return self.head(horizontal)  # (B, K, H, W)

    @torch.no_grad()
    def sample(self, count, shape, generator, condition_ids=None):
        """Codes drawn one position at a time in raster order: (count, H, W) long."""
        ids = torch.zeros(count, *shape, dtype=torch.long, device=self.embed.weight.device)
        for i in range(shape[0]):
            for j in range(shape[1]):
                probabilities = F.softmax(self(ids, condition_ids)[:, :, i, j].float(), dim=1)  # (count, K)
                ids[:, i, j] = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
        return ids


class Priors(nn.Module):
    """p(top) p(bottom | top): the VQ-VAE-2 prior factorisation, each level a PixelCNN."""

    def __init__(self, tokenizer, config):
        super().__init__()
        self.top_shape, self.bottom_shape = tokenizer.top_shape, tokenizer.bottom_shape
        self.top = PixelCNN(tokenizer.top_codebook_size, config.prior_width, config.prior_layers)
        self.bottom = PixelCNN(tokenizer.bottom_codebook_size, config.prior_width, config.prior_layers,
                               condition_codebook_size=tokenizer.top_codebook_size)

    def forward(self, top_ids, bottom_ids):
        """-> NLL of the top and of the bottom codes, in nats per code averaged over positions and batch."""
        nll_top = F.cross_entropy(self.top(top_ids).float(), top_ids.long())
        nll_bottom = F.cross_entropy(self.bottom(bottom_ids, top_ids).float(), bottom_ids.long())
        return nll_top, nll_bottom

    @torch.no_grad()
    def sample(self, count, generator):
        """Top codes first, then bottom codes given them: (count, Ht, Wt), (count, Hb, Wb)."""
        top_ids = self.top.sample(count, self.top_shape, generator)
        return top_ids, self.bottom.sample(count, self.bottom_shape, generator, condition_ids=top_ids)


# ====================================================================================================
# Beyond the paper
#
# NOTE: the paper has K = 512 codes per level; we default to 1024, since 512 codes rebuild the 4x4 patches
# of shapes poorly (README).


class VectorQuantizer(EMAQuantizer):
    """The EMA quantiser with a codebook that stays alive. NOTE: the paper starts from a random codebook and
    leaves unused codes where they are; we start from the first batch's encoder outputs and move codes unused
    over a window onto recent ones (as Jukebox does, arXiv:2005.00341): without, the top codebook collapses."""

    def __init__(self, codebook_size, code_dim, decay=0.99):
        super().__init__(codebook_size, code_dim, decay)
        self.register_buffer("usage", torch.zeros(codebook_size))  # assignments in the current window (K,)
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("window_stats", torch.zeros(3))  # last window: codes used, restarted; all restarts
        self.recent = None  # z_e of the last training batch (N, D): where dead codes restart

    def forward(self, z_e):
        if self.training and not self.initialised:  # codebook <- K of the first batch's z_e (with replacement if fewer)
            flat, K = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]), self.codebook_size  # (N, D)
            pick = torch.randperm(len(flat), device=flat.device)[:K] if len(flat) >= K else \
                torch.randint(len(flat), (K,), device=flat.device)
            self.codebook.copy_(flat[pick])
            broadcast_from_first_rank(self.codebook)
            self.embed_sum.copy_(self.codebook)
            self.cluster_size.fill_(1.0)
            self.initialised.fill_(True)
        return super().forward(z_e)

    def update(self, flat, ids):
        n = super().update(flat, ids)
        self.usage += n
        self.recent = flat
        return n

    @torch.no_grad()
    def end_window(self, restart, generator=None):
        """Close a usage window: record the fraction of codes used in it and, if `restart`, move every code
        unused in it onto a random z_e of the last batch (drawn on rank 0). -> (fraction used, codes restarted)."""
        dead = (self.usage == 0).nonzero().flatten()  # the same on every rank: usage sums all ranks
        used = 1.0 - len(dead) / self.codebook_size
        restarted = len(dead) if restart and self.recent is not None else 0
        if restarted:
            pick = torch.randint(len(self.recent), (restarted,), device=self.recent.device, generator=generator)
            self.codebook[dead] = self.embed_sum[dead] = self.recent[pick]
            self.cluster_size[dead] = 1.0
            broadcast_from_first_rank(self.codebook, self.embed_sum, self.cluster_size)
        self.usage.zero_()
        self.window_stats[:2] = torch.tensor([used, restarted])
        self.window_stats[2] += restarted
        return used, restarted

# End of "Beyond the paper"
# ====================================================================================================


# ----------------------------------------------------------------------------------------------------
# Training the autoencoder, then the priors on its codes; the codes: a file, or under torchrun a folder of parts


def start(model, optimizer, config, runtime, checkpoint, train_set, what):
    """Resume `checkpoint` if given, say what trains -> (step, module to call (DDP under torchrun), logger, batches)."""
    step = restore(checkpoint, config, model, optimizer)  # 0, or --resume's step with its states loaded
    if runtime.is_main:
        print(f"{what}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {runtime.device}, "
              f"{runtime.world_size} process(es), from step {step}")
    # the quantisers keep their buffers identical themselves: DDP must not copy rank 0's (torch 2.13 renamed the flag)
    flags = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in flags else "broadcast_buffers"
    network = DistributedDataParallel(model, **{no_sync: False}) if runtime.distributed else model
    return step, network, Logger(config.out, config.steps, step, runtime.is_main, config), \
        batches(train_set, config.batch_size, runtime, config.seed, start_step=step)


def optimizer_step(optimizer, parameters, loss, step, config, guard):
    """Backpropagate, clip the gradient norm at 1, step at the scheduled rate unless not finite -> (norm, stepped)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(parameters, 1.0)
    stepped = guard.finite(step, loss, grad_norm)
    if stepped:
        optimizer.step()
    return grad_norm, stepped


def train(config, runtime, checkpoint=None):
    """Train the autoencoder from scratch, or on from `checkpoint` (a loaded ckpt.pt) when resuming."""
    out, device = Path(config.out), runtime.device
    train_set, test_set = load_train_test(config.train, config.test, config.image_size)
    model = VQVAE2(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step, network, logger, data = start(model, optimizer, config, runtime, checkpoint, train_set,
                                        f"vqvae2: {len(train_set)} training images, {len(test_set)} held out")
    guard = NonFiniteGuard(model)  # a NaN or infinite loss skips its update, EMA included; too many stop the run
    quantizers = (model.quantize_top, model.quantize_bottom)

    def save():
        save_checkpoint(out / "ckpt.pt", "vqvae2", config, step, model=model.state_dict(),
                        optimizer=optimizer.state_dict())

    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            x, _ = next(data)  # (B, 3, S, S) in [0, 1]
            guard.remember()  # the codebooks before this step's EMA update
            recent = [quantizer.recent for quantizer in quantizers]  # where dead codes would restart
            with autocast(device):
                x_hat, commitments, _ = network(x)
            loss, mse = vqvae_loss(x, x_hat, commitments)
            grad_norm, stepped = optimizer_step(optimizer, model.parameters(), loss, step, config, guard)
            if not stepped:  # the guard put the codebooks back; dead codes must not restart from this batch either
                model.quantize_top.recent, model.quantize_bottom.recent = recent
            step += 1
            if step % config.window == 0:  # count usage, restart dead codes; the draws depend on (seed, step) only
                restart_noise = step_generator(device, config.seed, 0, step)
                for quantizer in quantizers:
                    quantizer.end_window(config.restarts, restart_noise)
            if step % config.log_every == 0 or step == config.steps:
                metrics = training_metrics(model, loss, mse, commitments, runtime)
                logger.log(step, **metrics, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item())
                logger.progress(step, **{key: metrics[key] for key in ("loss", "psnr", "top_used", "bottom_used")})
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                report(model, test_set, device, logger, step, grid=out / f"reconstructions_{step:06d}.png")
                save()
    keep_work_if_stopped(step, config.steps, runtime, save, config.out)  # Ctrl-C or SIGTERM: save, exit 130
    if runtime.is_main:
        report(model, test_set, device, logger, step)


def training_metrics(model, loss, mse, commitments, runtime):
    """Loss terms; per level the codes used in the last window, the restarts so far; the spread across ranks."""
    metrics = dict(loss=loss.item(), mse=mse.item(), psnr=-10 * math.log10(max(mse.item(), 1e-12)))
    quantizers = (model.quantize_top, model.quantize_bottom)
    for name, quantizer, commitment in zip(("top", "bottom"), quantizers, commitments):
        used, _, total = quantizer.window_stats.tolist()
        metrics |= {f"{name}_commitment": commitment.item(), f"{name}_used": used, f"{name}_restarts_total": total}
    if runtime.distributed:  # max over codes of (largest - smallest over the ranks): 0 when the codebooks agree
        low, high = torch.cat([quantizer.codebook for quantizer in quantizers]).repeat(2, 1, 1)  # 2 x (2K, D)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        metrics["codebook_spread"] = (high - low).max().item()
    return metrics


@torch.no_grad()
def report(model, test_set, device, logger=None, step=None, grid=None, batch_size=250):
    """Held-out MSE of decode(encode(x)) (a mean over pixels, channels, images; [0, 1] units), PSNR = 10 log10(1 /
    MSE), each level's fraction of codes in use; with `grid`, 32 held-out images beside their reconstructions."""
    squared_error, first_batch = 0.0, None
    seen = torch.zeros(2, model.config.codebook_size, dtype=torch.bool, device=device)  # codes in use, (2, K)
    for first in range(0, len(test_set), batch_size):
        x = torch.stack([test_set[i][0] for i in range(first, min(first + batch_size, len(test_set)))]).to(device)
        ids = model.eval().encode(x)  # x: (B, 3, S, S)
        x_hat = model.decode(*ids)
        squared_error += (x_hat - x).pow(2).sum().item()
        seen[0, ids[0].flatten()] = seen[1, ids[1].flatten()] = True  # (B, H, W) -> (B H W,), per level
        first_batch = (x, x_hat) if first_batch is None else first_batch
    mse = squared_error / (len(test_set) * x[0].numel())
    psnr, (top_used, bottom_used) = 10 * math.log10(1 / max(mse, 1e-12)), seen.float().mean(1).tolist()
    if logger:
        logger.log(step, test_mse=mse, test_psnr=psnr, test_top_used=top_used, test_bottom_used=bottom_used)
    print(f"{f'step {step}: held-out' if grid else f'held-out ({len(test_set)} images):'} MSE {mse:.5f}, PSNR "
          f"{psnr:.2f} dB, codes used top {100 * top_used:.1f}% bottom {100 * bottom_used:.1f}%", flush=True)
    if grid:  # the first 32 held-out images, each followed by its reconstruction: (2 N, 3, S, S)
        save_grid(torch.stack([part[:32].cpu() for part in first_batch], 1).flatten(0, 1), grid, nrow=8)
        model.train()


def train_prior(config, runtime, checkpoint=None):
    """Train p(top) and p(bottom | top) together on codes from --encode."""
    out, device = Path(config.out), runtime.device
    codes = load_codes(config.train_prior)
    tokenizer = VQVAE2.from_state(codes["tokenizer"], device, config.train_prior)
    train_set, test_set = CodesDataset(codes["train"]), CodesDataset(codes["test"])
    priors = Priors(tokenizer, config).to(device)
    optimizer = torch.optim.Adam(priors.parameters(), lr=config.lr)
    step, network, logger, data = start(priors, optimizer, config, runtime, checkpoint, train_set, "vqvae2 priors: "
                                        f"{len(train_set)} training code grids, {len(test_set)} held out")
    guard = NonFiniteGuard()  # a NaN or infinite loss skips its update; too many stop the run

    def save():
        save_checkpoint(out / "ckpt.pt", "vqvae2-prior", config, step, model=priors.state_dict(),
                        optimizer=optimizer.state_dict(), tokenizer=tokenizer.state())

    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            codes, _ = next(data)  # (B, Ht Wt + Hb Wb)
            with autocast(device):
                nll_top, nll_bottom = network(*split_codes(codes, tokenizer))
            loss = nll_top + nll_bottom  # nats per code, summed over the two levels
            grad_norm, _ = optimizer_step(optimizer, priors.parameters(), loss, step, config, guard)
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                bits = dict(top_bits=nll_top.item() / math.log(2), bottom_bits=nll_bottom.item() / math.log(2))
                logger.log(step, loss=loss.item(), **bits, lr=optimizer.param_groups[0]["lr"],
                           grad_norm=grad_norm.item())
                logger.progress(step, **bits)
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                with torch.no_grad():  # the held-out NLL of each level, summed over images: (2,)
                    totals = sum(torch.stack(priors.eval()(*split_codes(part.to(device), tokenizer))).cpu() * len(part)
                                 for part in test_set.codes.split(500))  # part (B, Ht Wt + Hb Wb)
                top_bits, bottom_bits = (totals / len(test_set) / math.log(2)).tolist()  # bits per code, averaged
                logger.log(step, test_top_bits=top_bits, test_bottom_bits=bottom_bits)
                print(f"step {step}: held-out NLL top {top_bits:.3f} bits/code, bottom {bottom_bits:.3f} bits/code")
                write_samples(priors, tokenizer, 16, out / f"samples_{step:06d}.png", config.seed, device)
                priors.train()
                save()
    keep_work_if_stopped(step, config.steps, runtime, save, config.out)  # Ctrl-C or SIGTERM: save, exit 130


def write_samples(priors, tokenizer, count, path, seed, device):  # top codes, then bottom codes, then pixels
    save_grid(tokenizer.decode(*priors.sample(count, torch.Generator(device).manual_seed(seed))), path,
              nrow=int(math.ceil(math.sqrt(count))))


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    if config.train_prior and "out" not in given:
        config.out = str(Path(config.train_prior).parent / "prior")
    kind = "vqvae2-prior" if config.train_prior else ("vqvae2", "vqvae2-prior")  # --resume of either, by its --out
    config, checkpoint = run_config(config, given, kind, validate, not (config.sample or config.eval or config.encode))
    runtime = setup(config.device, config.seed)
    if config.sample:  # from the priors of a prior checkpoint, decoded by its tokenizer
        path = config.ckpt or str(Path(config.out) / "prior" / "ckpt.pt")
        checkpoint = load_checkpoint(path, "vqvae2-prior", required=("config", "model", "tokenizer"))
        tokenizer = VQVAE2.from_state(checkpoint["tokenizer"], runtime.device, path)
        priors = Priors(tokenizer, config_from_dict(Config, checkpoint["config"], validate)).to(runtime.device)
        load_state(priors, checkpoint["model"], path)
        out = Path(config.out if "out" in given else Path(path).parent) / "samples.png"
        write_samples(priors.eval(), tokenizer, config.sample, out, config.seed, runtime.device)
        print(f"wrote {out}")
    elif config.eval:  # on the run's held-out images, or --test
        model = VQVAE2.from_checkpoint(config.ckpt or str(Path(config.out) / "ckpt.pt"), runtime.device)
        report(model, load_test(model.config.train, config.test or model.config.test, model.image_size), runtime.device)
    elif config.encode:  # both splits into one codes file; under torchrun, or into a folder there, into parts
        path = config.ckpt or str(Path(config.out) / "ckpt.pt")
        model = VQVAE2.from_checkpoint(path, runtime.device)
        splits = dict(zip(("train", "test"), load_train_test(config.encode, config.test, model.image_size)))
        write_codes(model, splits, config.out if "out" in given else Path(path).parent / (
            "codes" if runtime.distributed else "codes.pt"), runtime)
    elif config.train_prior:
        train_prior(config, runtime, checkpoint)
    else:
        train(config, runtime, checkpoint)


if __name__ == "__main__":
    run_cli(main)
