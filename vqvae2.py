"""Generating Diverse High-Fidelity Images with VQ-VAE-2: a two-level vector-quantised autoencoder, its
gated PixelCNN priors, and the image tokenizer of dalle.py.

Papers: Razavi, van den Oord & Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2", 2019,
        arXiv:1906.00446. The vector quantiser and its EMA codebook: van den Oord, Vinyals & Kavukcuoglu,
        "Neural Discrete Representation Learning", 2017, arXiv:1711.00937 (appendix A.1). The priors: van
        den Oord et al., "Conditional Image Generation with PixelCNN Decoders", 2016, arXiv:1606.05328.

Usage:
    python vqvae2.py --train shapes                          # the autoencoder (runs/vqvae2)
    python vqvae2.py --resume --out runs/vqvae2              # continue a stopped run exactly
    python vqvae2.py --eval --ckpt runs/vqvae2/ckpt.pt       # held-out MSE, PSNR, codes in use, scorer
    python vqvae2.py --encode shapes --ckpt runs/vqvae2/ckpt.pt --out runs/vqvae2/codes.pt
    torchrun --nproc_per_node=4 vqvae2.py --encode SHARDS --ckpt runs/vqvae2/ckpt.pt  # runs/vqvae2/codes/part-*.pt
    python vqvae2.py --train-prior runs/vqvae2/codes.pt      # the PixelCNN priors (runs/vqvae2/prior)
    python vqvae2.py --sample 64 --ckpt runs/vqvae2/prior/ckpt.pt  # top codes, then bottom, then pixels
    torchrun --nproc_per_node=2 vqvae2.py --train shapes     # data parallel (gloo on CPU, nccl on GPU)

Shapes: B batch, S image side, C channels, D code dimension, K codes per level, N vectors quantised at
once; the bottom grid is S/4 x S/4 (Hb x Wb), the top grid S/8 x S/8 (Ht x Wt).

The model (VQ-VAE-2 section 3.1 and its algorithm 1):
    h_bottom   = E_bottom(x)                                    (B, C, S/4, S/4)
    z_e_top    = E_top(h_bottom)                                (B, D, S/8, S/8)
    z_q_top    = e_k with k = argmin_j ||z_e_top - e_j||_2      nearest code of the top codebook
    z_e_bottom = conv1x1([h_bottom; D_top(z_q_top)])            (B, D, S/4, S/4): sees the decoded top
    z_q_bottom = nearest code of the bottom codebook
    x_hat      = D([upsample(z_q_top); z_q_bottom])             (B, 3, S, S)
    loss       = ||x - x_hat||^2 + beta sum_levels ||z_e - sg[z_q]||^2     (VQ-VAE eq. 3)
Gradients pass the quantiser unchanged (straight-through); the codebooks are not trained by gradient
but are exponential moving averages of the encoder outputs assigned to each code (VQ-VAE app. A.1).

Known deviations from the papers:
    - pixels reach the S/4 grid and come back through an MLP on each 4x4 patch instead of strided
      (transposed) convolutions, and each level has 1024 codes instead of 512 (both measured, see the
      NOTEs in VQVAE2 and the README);
    - codebooks start from encoder outputs of the first batch, and codes unused over a window are
      restarted from random recent encoder outputs (as Jukebox does, Dhariwal et al. 2020,
      arXiv:2005.00341); the EMA counts are Laplace-smoothed (as in the authors' Sonnet code);
    - both priors are small gated PixelCNNs without the paper's self-attention layers, sized for a CPU;
    - Adam with warmup and cosine decay, and gradient-norm clipping.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from data import (Logger, NonFiniteGuard, StopRequest, UsageError, atomic_write, autocast, batches, check,
                  config_from_dict, format_score, learning_rate, load_checkpoint, load_state, load_test,
                  load_train_test, parse_caption, parse_config, part_indices, parts_in, read_parts, run_cli, run_config,
                  save_checkpoint, save_grid, score_report, score_shapes, setup, step_generator, teardown, write_parts)


@dataclass
class Config:
    train: str = "shapes"  # training images: a folder, tar shards ('s/{000..009}.tar', see data.py), 'shapes' or 'shapes:N'
    test: str = ""  # held-out folder or shards; default: the shapes test split, or a fixed 5% of --train
    out: str = "runs/vqvae2"  # run folder (ckpt.pt, metrics.jsonl, grids); with --encode the codes file or folder
    image_size: int = 32  # side S of the square images (a multiple of 8, at least 16)
    hidden: int = 64  # C, channels of the convolutional encoders and decoders on the S/4 and S/8 grids (paper 128)
    patch_hidden: int = 512  # hidden units of the per-patch MLPs between 4x4 pixel patches and the S/4 grid
    residual_blocks: int = 2  # residual blocks per encoder and decoder stack (paper 2)
    residual_hidden: int = 32  # channels inside a residual block
    codebook_size: int = 1024  # K, codes per level (paper 512; see the NOTE in VQVAE2)
    code_dim: int = 64  # D, dimension of a code (paper 64)
    beta: float = 0.25  # commitment cost beta (paper 0.25)
    decay: float = 0.99  # gamma, decay of the EMA codebook statistics (paper 0.99)
    window: int = 25  # steps over which code usage is counted; a code unused over one is dead
    restarts: bool = True  # at the end of each window, restart dead codes from recent encoder outputs
    steps: int = 3200  # optimizer steps in total
    batch_size: int = 16  # images (or code grids, for the priors) per step and per process
    lr: float = 2e-3  # peak learning rate of Adam
    warmup: int = 100  # steps of linear warmup before cosine decay to lr/10
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    log_every: int = 100  # steps between progress lines and metric records
    save_every: int = 1000  # steps between held-out figures, grids and checkpoints
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    seed: int = 0  # seeds initialisation, data order and restarts
    resume: bool = False  # continue OUT/ckpt.pt (or --ckpt) with its saved flags; flags given now override them
    eval: bool = False  # report held-out MSE, PSNR, codes in use (and the shapes scorer) of --ckpt, then exit
    encode: str = ""  # shapes, a folder or shards: write the codes and captions of its images to --out, then exit
    train_prior: str = ""  # codes from --encode (file or folder of parts): train the priors on them (default --out: ../prior)
    prior_width: int = 64  # channels of each PixelCNN prior
    prior_layers: int = 6  # gated layers of each PixelCNN prior
    sample: int = 0  # N > 0: draw N images from the priors in --ckpt (default OUT/prior/ckpt.pt), then exit
    ckpt: str = ""  # checkpoint for --eval, --encode, --resume (default OUT/ckpt.pt) and --sample


def validate(config):
    check(config.image_size >= 16 and config.image_size % 8 == 0, "--image-size must be a multiple of 8, >= 16")
    for name in ("hidden", "patch_hidden", "residual_hidden", "codebook_size", "code_dim", "window", "steps", "batch_size",
                 "log_every", "save_every", "prior_width", "prior_layers"):
        check(getattr(config, name) > 0, f"--{name.replace('_', '-')} must be positive")
    check(config.codebook_size <= 32768, "--codebook-size must be at most 32768 (codes are stored as int16)")
    check(0 <= config.decay < 1 and config.beta >= 0, "--decay must be in [0, 1) and --beta not negative")
    check(config.lr > 0 and config.warmup >= 0 and config.grad_clip >= 0 and config.sample >= 0
          and config.residual_blocks >= 0,
          "--lr must be positive; --warmup, --grad-clip, --sample and --residual-blocks must not be negative")
    modes = [flag for flag, on in (("--eval", config.eval), ("--encode", config.encode),
                                   ("--train-prior", config.train_prior), ("--sample", config.sample)) if on]
    check(len(modes) <= 1, f"{' and '.join(modes)} cannot be combined")


# ----------------------------------------------------------------------------------------------------
# The vector quantiser with an EMA codebook that stays alive


def broadcast_from_first_rank(*tensors):
    """Under torchrun, copy rank 0's tensors to every rank (in place)."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


class VectorQuantizer(nn.Module):
    """z_e (B, D, H, W) -> its nearest codes. The codebook e (K, D) is a buffer updated by EMA, never by
    gradient; usage over the current window is counted so that dead codes can be restarted."""

    def __init__(self, codebook_size, code_dim, decay, epsilon=1e-5):
        super().__init__()
        self.codebook_size, self.decay, self.epsilon = codebook_size, decay, epsilon
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))  # e, (K, D)
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # N, EMA of assignment counts (K,)
        self.register_buffer("embed_sum", self.codebook.clone())  # m, EMA of assigned vector sums (K, D)
        self.register_buffer("usage", torch.zeros(codebook_size))  # assignments in the current window (K,)
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("window_stats", torch.zeros(3))  # last window: codes used, restarted; all restarts
        self.recent = None  # encoder outputs of the last training batch (N, D): where dead codes restart

    def nearest(self, flat):
        """(N, D) -> (N,) index of the nearest code in squared Euclidean distance."""
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every code, so it is left out
        distances = torch.addmm(self.codebook.pow(2).sum(1), flat, self.codebook.t(), alpha=-2)  # (N, D) @ (D, K) -> (N, K)
        return distances.argmin(1)

    def lookup(self, ids):
        """(B, H, W) code indices -> z_q (B, D, H, W)."""
        return self.codebook[ids.long()].permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)

    def forward(self, z_e):
        """-> z_q (straight-through), ids (B, H, W), commitment ||z_e - sg[z_q]||^2 averaged over B, D, H, W.
        In training mode the codebook is first initialised (once), then updated by EMA."""
        B, D, H, W = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):  # distances in float32 even under bf16 autocast
            flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, D)  # (B, D, H, W) -> (B H W, D)
            if self.training and not self.initialised:
                self.initialise(flat)
            ids = self.nearest(flat)  # (N,)
            z_q = self.lookup(ids.view(B, H, W))  # (B, D, H, W)
            if self.training:
                self.update(flat, ids)
            commitment = F.mse_loss(z_e.float(), z_q)  # z_q is a buffer lookup: no gradient reaches it
        z_q = z_e + (z_q - z_e).detach()  # straight-through: the forward value is z_q, dL/dz_e = dL/dz_q
        return z_q, ids.view(B, H, W), commitment

    @torch.no_grad()
    def initialise(self, flat):
        """Codebook <- K encoder outputs drawn from the first batch (with replacement if fewer than K)."""
        K = self.codebook_size
        pick = torch.randperm(len(flat), device=flat.device)[:K] if len(flat) >= K else \
            torch.randint(len(flat), (K,), device=flat.device)
        self.codebook.copy_(flat[pick])
        broadcast_from_first_rank(self.codebook)
        self.embed_sum.copy_(self.codebook)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, flat, ids):
        """One EMA step (VQ-VAE appendix A.1), with the batch statistics summed over all ranks:
            N_i <- gamma N_i + (1 - gamma) n_i              n_i: vectors assigned to code i in this batch
            m_i <- gamma m_i + (1 - gamma) sum_j z_e,j      summed over the n_i vectors assigned to i
            e_i <- m_i / N_i'                               N_i' Laplace-smoothed, so no N_i' is ever 0"""
        K = self.codebook_size
        counts = torch.bincount(ids, minlength=K).float()  # n_i, (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, flat)  # (K, D)
        if dist.is_initialized():  # every rank then adds the same totals: the codebooks stay identical
            statistics = torch.cat([counts[:, None], sums], 1)  # (K, 1 + D)
            dist.all_reduce(statistics)
            counts, sums = statistics[:, 0], statistics[:, 1:]
        self.usage += counts
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + K * self.epsilon) * total  # N_i', (K,)
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self.recent = flat

    @torch.no_grad()
    def end_window(self, restart, generator=None):
        """Close a usage window: record the fraction of codes used in it and, if `restart`, move every
        code unused in it onto a random encoder output of the last batch (rank 0 draws them, every rank
        copies them). Returns (fraction used, codes restarted)."""
        dead = (self.usage == 0).nonzero().flatten()  # the same on every rank: usage sums all ranks
        used = 1.0 - len(dead) / self.codebook_size
        restarted = len(dead) if restart and self.recent is not None else 0
        if restarted:
            pick = torch.randint(len(self.recent), (restarted,), device=self.recent.device, generator=generator)
            self.codebook[dead] = self.recent[pick]
            self.embed_sum[dead] = self.recent[pick]
            self.cluster_size[dead] = 1.0
            broadcast_from_first_rank(self.codebook, self.embed_sum, self.cluster_size)
        self.usage.zero_()
        self.window_stats[:2] = torch.tensor([used, restarted])
        self.window_stats[2] += restarted
        return used, restarted


def perplexity(ids, codebook_size):
    """exp(entropy) of the code frequencies in `ids`: K when all codes are equally used, 1 when one is."""
    p = torch.bincount(ids.flatten().long(), minlength=codebook_size).float() / ids.numel()  # (K,)
    return math.exp(-(p * torch.log(p.clamp_min(1e-12))).sum().item())


# ----------------------------------------------------------------------------------------------------
# The two-level autoencoder, which is also the tokenizer API of dalle.py


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
    """Images (B, 3, S, S) in [0, 1] <-> top codes (B, S/8, S/8) and bottom codes (B, S/4, S/4).

    Tokenizer API: encode(images) -> (top_ids, bottom_ids); decode(top_ids, bottom_ids) -> images;
    VQVAE2.from_checkpoint(path, device); attributes top_codebook_size, bottom_codebook_size, top_shape,
    bottom_shape, image_size."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C, D, R, n = config.hidden, config.code_dim, config.residual_hidden, config.residual_blocks
        self.image_size = config.image_size
        self.top_codebook_size = self.bottom_codebook_size = config.codebook_size
        self.top_shape, self.bottom_shape = (config.image_size // 8,) * 2, (config.image_size // 4,) * 2
        P = config.patch_hidden
        # NOTE: the paper goes from pixels to the S/4 grid and back with two strided (transposed)
        # convolutions; we use an MLP on each 4x4 patch (pixel unshuffle + 1x1 convolutions), which
        # learned sharp edges faster on a CPU: the strided version of this file reached 28.3 dB PSNR on
        # shapes after 1500 steps of 64 images (184 s here) and was still gaining slowly; this one 31.1 dB
        # after 3200 steps of 16 (about 4 minutes).
        self.encoder_bottom = nn.Sequential(
            nn.PixelUnshuffle(4),  # (B, 3, S, S) -> (B, 48, S/4, S/4): one 4x4x3 patch per position
            nn.Conv2d(48, P, 1), nn.ReLU(), nn.Conv2d(P, C, 1), nn.ReLU(),  # per-patch MLP: (B, C, S/4, S/4)
            nn.Conv2d(C, C, 3, padding=1), *residual_stack(C, R, n))  # h_bottom (B, C, S/4, S/4)
        self.encoder_top = nn.Sequential(
            nn.Conv2d(C, C, 4, 2, 1), nn.ReLU(),  # (B, C, S/8, S/8)
            nn.Conv2d(C, C, 3, padding=1), *residual_stack(C, R, n),
            nn.Conv2d(C, D, 1))  # z_e_top (B, D, S/8, S/8)
        # NOTE: the paper has K = 512 codes per level. Shapes 32x32 holds ~1500 distinct 4x4 patches; the
        # 512 most frequent ones rebuild the test split at 26.8 dB PSNR, the 1024 most frequent at 30.8 dB,
        # so our default K is 1024.
        self.quantize_top = VectorQuantizer(config.codebook_size, D, config.decay)
        self.decoder_top = nn.Sequential(
            nn.Conv2d(D, C, 3, padding=1), *residual_stack(C, R, n),
            nn.ConvTranspose2d(C, D, 4, 2, 1))  # D_top(z_q_top) (B, D, S/4, S/4)
        self.to_z_e_bottom = nn.Conv2d(C + D, D, 1)  # [h_bottom; D_top(z_q_top)] -> z_e_bottom
        self.quantize_bottom = VectorQuantizer(config.codebook_size, D, config.decay)
        self.upsample_top = nn.ConvTranspose2d(D, D, 4, 2, 1)  # z_q_top onto the bottom grid (B, D, S/4, S/4)
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * D, C, 3, padding=1), *residual_stack(C, R, n),
            nn.Conv2d(C, P, 1), nn.ReLU(), nn.Conv2d(P, 48, 1),  # per-patch MLP: (B, 48, S/4, S/4)
            nn.PixelShuffle(4))  # (B, 48, S/4, S/4) -> (B, 3, S, S), in [-1, 1] units

    def quantize(self, x):
        """x (B, 3, S, S) in [0, 1] -> (z_q_top, z_q_bottom), (top_ids, bottom_ids), (commitment top, bottom)."""
        h_bottom = self.encoder_bottom(2 * x - 1)  # the networks see [-1, 1]
        z_q_top, top_ids, commitment_top = self.quantize_top(self.encoder_top(h_bottom))
        z_e_bottom = self.to_z_e_bottom(torch.cat([h_bottom, self.decoder_top(z_q_top)], 1))  # (B, C + D, ..) -> (B, D, ..)
        z_q_bottom, bottom_ids, commitment_bottom = self.quantize_bottom(z_e_bottom)
        return (z_q_top, z_q_bottom), (top_ids, bottom_ids), (commitment_top, commitment_bottom)

    def reconstruct(self, z_q_top, z_q_bottom):
        """The decoder D: -> x_hat (B, 3, S, S) in [0, 1] units, not clamped."""
        h = torch.cat([self.upsample_top(z_q_top), z_q_bottom], 1)  # (B, 2D, S/4, S/4)
        return 0.5 * (self.decoder(h) + 1)

    def forward(self, x):
        """-> x_hat (B, 3, S, S), commitments (top, bottom), ids (top (B, Ht, Wt), bottom (B, Hb, Wb))."""
        latents, ids, commitments = self.quantize(x)
        return self.reconstruct(*latents), commitments, ids

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, S, S) in [0, 1] -> top_ids (B, Ht, Wt), bottom_ids (B, Hb, Wb), long. Never updates
        the codebooks, whatever the module's mode."""
        training = self.training
        self.eval()
        _, ids, _ = self.quantize(images)
        self.train(training)
        return ids

    @torch.no_grad()
    def decode(self, top_ids, bottom_ids):
        """top_ids (B, Ht, Wt), bottom_ids (B, Hb, Wb), any integer type -> images (B, 3, S, S) in [0, 1]."""
        z_q_top, z_q_bottom = self.quantize_top.lookup(top_ids), self.quantize_bottom.lookup(bottom_ids)
        return self.reconstruct(z_q_top, z_q_bottom).clamp(0, 1)

    def state(self):
        """Plain data that rebuilds this tokenizer (stored in codes files and prior checkpoints)."""
        return dict(config=dataclasses.asdict(self.config), model=self.state_dict())

    @classmethod
    def from_state(cls, state, device="cpu", path="checkpoint"):
        check(isinstance(state, dict) and {"config", "model"} <= state.keys(), f"{path}: its tokenizer is incomplete")
        model = cls(config_from_dict(Config, state["config"], validate)).to(device)
        load_state(model, state["model"], path)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """The trained autoencoder of a vqvae2 checkpoint, in eval mode, on `device`."""
        return cls.from_state(load_checkpoint(path, "vqvae2"), device, path)


# ----------------------------------------------------------------------------------------------------
# Gated PixelCNN priors over the codes


def gated(a):
    """tanh(first half of the channels) * sigmoid(second half): (B, 2C, H, W) -> (B, C, H, W)."""
    f, g = a.chunk(2, 1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One gated PixelCNN layer (van den Oord et al. 2016, figure 2), causal by padding and shifting:
    the vertical stack at row i sees rows <= i, and is shifted down one row before it feeds the
    horizontal stack, which sees row i up to column j (the first layer: columns < j). So the horizontal
    output at (i, j) depends only on codes before (i, j) in raster order. Activation (paper eq. 5):
        y = tanh(W_f * x + V_f c) * sigmoid(W_g * x + V_g c),    c: the top codes, for the bottom prior"""

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
    """p(codes) = prod_i p(code_i | codes before i in raster order [, top codes]): ids (B, H, W) -> logits (B, K, H, W)."""

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
        x = self.embed(ids.long()).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        condition = None
        if condition_ids is not None:
            condition = self.condition_net(self.condition_embed(condition_ids.long()).permute(0, 3, 1, 2))
        vertical = horizontal = x
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
    """p(top) p(bottom | top): the VQ-VAE-2 prior factorisation (paper section 3.2)."""

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

    def sample(self, count, generator):
        top_ids = self.top.sample(count, self.top_shape, generator)
        return top_ids, self.bottom.sample(count, self.bottom_shape, generator, condition_ids=top_ids)


# ----------------------------------------------------------------------------------------------------
# Training the autoencoder


@torch.no_grad()
def evaluate(model, dataset, device, batch_size=250, score=True):
    """Held-out figures through the tokenizer path decode(encode(x)): MSE averaged over every pixel,
    channel and image (in [0, 1] units); PSNR = 10 log10(1 / MSE) of that average; the fraction of each
    level's codes the held-out set uses; and, when every caption is a shapes caption, the shapes
    scorer's report on the reconstructions."""
    squared_error, values = 0.0, 0
    seen = [torch.zeros(model.top_codebook_size, dtype=torch.bool, device=device),
            torch.zeros(model.bottom_codebook_size, dtype=torch.bool, device=device)]
    reconstructions, captions = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([image for image, _ in items]).to(device)  # (B, 3, S, S)
        ids = model.encode(x)
        x_hat = model.decode(*ids)
        squared_error += (x_hat - x).pow(2).sum().item()
        values += x.numel()
        for level, level_ids in zip(seen, ids):
            level[level_ids.flatten()] = True
        reconstructions.append(x_hat.cpu())
        captions += [caption for _, caption in items]
    mse = squared_error / values
    results = dict(mse=mse, psnr=10 * math.log10(1 / max(mse, 1e-12)), top_used=seen[0].float().mean().item(),
                   bottom_used=seen[1].float().mean().item())
    if score and all(parse_caption(caption) for caption in captions):
        results["score"] = score_report(torch.cat(reconstructions), captions)
    return results


def write_grid(model, test_set, out, tag, device):
    """32 held-out images, each followed by its reconstruction: (input, output) pairs, 4 per row."""
    count = min(32, len(test_set))
    x = torch.stack([test_set[i][0] for i in range(count)]).to(device)  # (N, 3, S, S)
    pairs = torch.stack([x, model.decode(*model.encode(x))], 1).flatten(0, 1)  # (N, 2, 3, S, S) -> (2N, 3, S, S)
    save_grid(pairs, out / f"reconstructions_{tag}.png", nrow=8)


def codebook_spread(model):
    """Largest |e - e_rank0| over every rank and code: 0 when the codebooks are identical everywhere."""
    spread = torch.zeros((), device=model.quantize_top.codebook.device)
    for quantizer in (model.quantize_top, model.quantize_bottom):
        reference = quantizer.codebook.clone()
        broadcast_from_first_rank(reference)
        spread = torch.maximum(spread, (quantizer.codebook - reference).abs().max())
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()


def train(config, runtime, checkpoint=None):
    """Train the autoencoder from scratch, or from `checkpoint` (a loaded ckpt.pt) when resuming."""
    out = Path(config.out)
    device = runtime.device
    train_set, test_set = load_train_test(config.train, config.test, config.image_size)
    model = VQVAE2(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = 0
    if checkpoint:
        load_state(model, checkpoint["model"], out / "ckpt.pt")
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        check(step < config.steps, f"the checkpoint is at step {step} already; pass a larger --steps")
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"vqvae2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_set)} training images, {len(test_set)} held out, device {device}, "
              f"{runtime.world_size} process(es), from step {step}")
    # The quantisers keep their buffers identical on every rank themselves (all_reduce, broadcast), so
    # DDP must not overwrite them from rank 0 at each forward (the flag was renamed in torch 2.13).
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    network = DistributedDataParallel(model, **{no_sync: False}) if runtime.distributed else model
    logger = Logger(out, config.steps, step, runtime.is_main)
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)
    levels = (("top", model.quantize_top), ("bottom", model.quantize_bottom))
    guard = NonFiniteGuard(model)  # a NaN or infinite loss skips its update, EMA included; too many stop the run

    def save():
        save_checkpoint(out / "ckpt.pt", "vqvae2", config, step, model=model.state_dict(),
                        optimizer=optimizer.state_dict())

    start_time, start_step, held_out_seconds = time.time(), step, 0.0  # throughput leaves evaluation out
    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            x, _ = next(data)  # (B, 3, S, S) in [0, 1]
            guard.remember()  # the codebooks before this step's EMA update
            recent = [quantizer.recent for _, quantizer in levels]  # the last batch, where dead codes restart
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
            with autocast(device):
                x_hat, (commitment_top, commitment_bottom), ids = network(x)
            mse = F.mse_loss(x_hat.float(), x)  # ||x - x_hat||^2 averaged over pixels, channels and batch
            loss = mse + config.beta * (commitment_top + commitment_bottom)  # VQ-VAE eq. 3, codebook term by EMA
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            if guard.finite(step, loss, grad_norm):
                optimizer.step()
            else:  # the guard put the codebooks back; dead codes must not restart from this batch either
                for (_, quantizer), previous in zip(levels, recent):
                    quantizer.recent = previous
            step += 1
            if step % config.window == 0:  # the restart draws depend only on (seed, step): exact resume
                restart_noise = step_generator(device, config.seed, 0, step)
                for _, quantizer in levels:
                    quantizer.end_window(config.restarts, restart_noise)
            if step % config.log_every == 0 or step == config.steps:
                metrics = dict(loss=loss.item(), mse=mse.item(), psnr=-10 * math.log10(max(mse.item(), 1e-12)),
                               lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item())
                for (name, quantizer), commitment, level_ids in zip(levels, (commitment_top, commitment_bottom), ids):
                    used, restarted, total = quantizer.window_stats.tolist()
                    metrics |= {f"{name}_commitment": commitment.item(),
                                f"{name}_perplexity": perplexity(level_ids, quantizer.codebook_size),
                                f"{name}_used": used, f"{name}_restarts": restarted, f"{name}_restarts_total": total}
                if runtime.distributed:
                    metrics["codebook_spread"] = codebook_spread(model)
                metrics["images_per_second"] = ((step - start_step) * config.batch_size * runtime.world_size
                                                / (time.time() - start_time - held_out_seconds))
                logger.log(step, **metrics)
                logger.progress(step, loss=metrics["loss"], psnr=metrics["psnr"],
                                top_used=metrics["top_used"], bottom_used=metrics["bottom_used"])
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                evaluation_start = time.time()
                model.eval()
                held_out = evaluate(model, test_set, device, score=False)
                logger.log(step, **{f"test_{key}": value for key, value in held_out.items()})
                print(f"step {step}: held-out MSE {held_out['mse']:.5f}, PSNR {held_out['psnr']:.2f} dB, "
                      f"codes used top {100 * held_out['top_used']:.0f}% bottom {100 * held_out['bottom_used']:.0f}%",
                      flush=True)
                write_grid(model, test_set, out, f"{step:06d}", device)
                model.train()
                save()
                held_out_seconds += time.time() - evaluation_start
    if step < config.steps:  # stopped by Ctrl-C or SIGTERM: keep the work, then exit with 130
        if runtime.is_main:
            save()
            print(f"stopped: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        raise KeyboardInterrupt
    if runtime.is_main:
        seconds = time.time() - start_time
        images_per_second = (step - start_step) * config.batch_size * runtime.world_size / (seconds - held_out_seconds)
        print(f"trained {step - start_step} steps in {seconds:.0f} s ({held_out_seconds:.0f} s of it held-out "
              f"evaluation and checkpoints): {images_per_second:.0f} training images/s")
        report(model.eval(), test_set, device, logger, step)


def report(model, test_set, device, logger=None, step=None):
    results = evaluate(model, test_set, device)
    score = results.pop("score", None)
    if logger:
        logger.log(step, **{f"test_{key}": value for key, value in results.items()},
                   **({"test_score_all": score["overall"]["all"]} if score else {}))
    print(f"held-out ({len(test_set)} images): MSE {results['mse']:.5f}, PSNR {results['psnr']:.2f} dB, "
          f"codes used top {100 * results['top_used']:.1f}% bottom {100 * results['bottom_used']:.1f}%")
    if score:
        print("shapes scorer on the reconstructions:\n" + format_score(score))
    return results | ({"score": score} if score else {})


# ----------------------------------------------------------------------------------------------------
# Codes files and the priors


@torch.no_grad()
def encode_split(model, dataset, indices, device, batch_size=500):
    """The codes and captions of dataset[i] for i in `indices`: top (N, Ht, Wt), bottom (N, Hb, Wb) int16."""
    top, bottom = [torch.zeros(0, *model.top_shape, dtype=torch.int16)], [torch.zeros(0, *model.bottom_shape, dtype=torch.int16)]
    captions, state = [], random.getstate()
    for first in range(0, len(indices), batch_size):
        items = []
        for index in indices[first: first + batch_size]:
            random.seed(index)  # of several captions, the one drawn depends on the index alone: parts agree
            items.append(dataset[index])
        top_ids, bottom_ids = model.encode(torch.stack([image for image, _ in items]).to(device))
        top.append(top_ids.to(torch.int16).cpu())
        bottom.append(bottom_ids.to(torch.int16).cpu())
        captions += [caption for _, caption in items]
    random.setstate(state)
    return dict(top=torch.cat(top), bottom=torch.cat(bottom), captions=captions)


def encode_dataset(config, runtime, out_given):
    """Write the codes and captions of every image, train and held-out split, with the tokenizer that made
    them, to one file; or, under torchrun or into a folder already there, to a folder of parts, one per
    process, of which a rerun writes only the missing ones (data.write_parts). -> the codes, as load_codes."""
    path = config.ckpt or str(Path(config.out) / "ckpt.pt")
    model = VQVAE2.from_checkpoint(path, runtime.device)
    out = Path(config.out) if out_given else Path(path).parent / ("codes" if runtime.distributed else "codes.pt")
    splits = dict(zip(("train", "test"), load_train_test(config.encode, config.test, model.image_size)))

    def encode(index, count):  # part `index` of `count`: a codes file of its own
        start_time = time.time()
        codes = {name: encode_split(model, dataset, part_indices(dataset, index, count), runtime.device)
                 for name, dataset in splits.items()}
        sizes, seconds = [len(split["captions"]) for split in codes.values()], max(time.time() - start_time, 1e-9)
        print(f"rank {runtime.rank}: encoded {sizes[0]} train and {sizes[1]} held-out images in {seconds:.1f} s "
              f"({sum(sizes) / seconds:.0f} images/s, data loading included; part {index} of {count})", flush=True)
        return dict(kind="vqvae2-codes", tokenizer=model.state(), **codes)

    in_parts = runtime.distributed or out.is_dir()
    if in_parts:
        check(not out.is_file(), f"--out {out} is a file; under torchrun --encode writes a folder of parts")
        write_parts(out, runtime, encode, "vqvae2-codes", made_by=("tokenizer", model.state()))
        codes = load_codes(out)  # every part there, all from one tokenizer: this one, as the first part was
    else:
        codes = encode(0, 1)
        atomic_write(out, lambda file: torch.save(codes, file))
    if runtime.is_main:
        print(f"codes: {len(codes['train']['captions'])} train, {len(codes['test']['captions'])} held out"
              f"{f', in {parts_in(out)[0]} parts' if in_parts else ''} -> {out}")
    return codes


def load_codes(path):
    """A codes file from --encode, or a folder of its parts (complete, from one tokenizer, joined in part order).
    -> dict(tokenizer, train, test), each split dict(top (N, Ht, Wt), bottom (N, Hb, Wb), captions)."""
    if Path(path).is_dir():
        return read_parts(path, "vqvae2-codes", ("tokenizer", "train", "test"), made_by="tokenizer")
    codes = load_checkpoint(path, "vqvae2-codes", required=("tokenizer", "train", "test"))
    check("parts" not in codes, f"{path}: one part of {str(codes.get('parts'))[:20]}; pass the folder of them all")
    return codes


class CodesDataset(Dataset):
    """One split of a codes file as (top and bottom codes flattened into one (Ht Wt + Hb Wb,) tensor, caption)."""

    def __init__(self, split):
        self.codes = torch.cat([split["top"].flatten(1), split["bottom"].flatten(1)], 1).long()  # (N, Ht Wt + Hb Wb)
        self.captions = split["captions"]

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, index):
        return self.codes[index], self.captions[index]


def split_codes(codes, tokenizer):
    """(B, Ht Wt + Hb Wb) -> top (B, Ht, Wt), bottom (B, Hb, Wb)."""
    top_size = tokenizer.top_shape[0] * tokenizer.top_shape[1]
    return codes[:, :top_size].view(-1, *tokenizer.top_shape), codes[:, top_size:].view(-1, *tokenizer.bottom_shape)


@torch.no_grad()
def prior_nll(priors, dataset, tokenizer, device, batch_size=500):
    """Held-out NLL in bits per code, top and bottom, averaged over codes and images."""
    totals = torch.zeros(2)
    for first in range(0, len(dataset), batch_size):
        codes = dataset.codes[first: first + batch_size].to(device)
        totals += torch.tensor([nll.item() for nll in priors(*split_codes(codes, tokenizer))]) * len(codes)
    return (totals / len(dataset) / math.log(2)).tolist()


@torch.no_grad()
def write_samples(priors, tokenizer, count, path, seed, device):
    generator = torch.Generator(device).manual_seed(seed)
    images = tokenizer.decode(*priors.sample(count, generator))
    save_grid(images, path, nrow=int(math.ceil(math.sqrt(count))))
    return images


def train_prior(config, runtime, checkpoint=None):
    """Train p(top) and p(bottom | top) together on a codes file or folder of parts: loss = their NLLs in nats per
    code, summed."""
    out, device = Path(config.out), runtime.device
    codes = load_codes(config.train_prior)
    tokenizer = VQVAE2.from_state(codes["tokenizer"], device, config.train_prior)
    train_set, test_set = CodesDataset(codes["train"]), CodesDataset(codes["test"])
    priors = Priors(tokenizer, config).to(device)
    optimizer = torch.optim.Adam(priors.parameters(), lr=config.lr)
    step = 0
    if checkpoint:
        load_state(priors, checkpoint["model"], out / "ckpt.pt")
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        check(step < config.steps, f"the checkpoint is at step {step} already; pass a larger --steps")
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"vqvae2 priors: {sum(p.numel() for p in priors.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_set)} training code grids, {len(test_set)} held out, device {device}, "
              f"{runtime.world_size} process(es), from step {step}")
    network = DistributedDataParallel(priors) if runtime.distributed else priors
    logger = Logger(out, config.steps, step, runtime.is_main)
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)
    guard = NonFiniteGuard()  # a NaN or infinite loss skips its update; too many stop the run

    def save():
        save_checkpoint(out / "ckpt.pt", "vqvae2-prior", config, step, model=priors.state_dict(),
                        optimizer=optimizer.state_dict(), tokenizer=tokenizer.state())

    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            batch, _ = next(data)  # (B, Ht Wt + Hb Wb)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
            with autocast(device):
                nll_top, nll_bottom = network(*split_codes(batch, tokenizer))
            loss = nll_top + nll_bottom
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(priors.parameters(), config.grad_clip or float("inf"))
            if guard.finite(step, loss, grad_norm):  # else this batch is skipped
                optimizer.step()
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                bits_top, bits_bottom = nll_top.item() / math.log(2), nll_bottom.item() / math.log(2)
                logger.log(step, loss=loss.item(), top_bits=bits_top, bottom_bits=bits_bottom,
                           lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item())
                logger.progress(step, top_bits=bits_top, bottom_bits=bits_bottom)
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                priors.eval()
                top_bits, bottom_bits = prior_nll(priors, test_set, tokenizer, device)
                logger.log(step, test_top_bits=top_bits, test_bottom_bits=bottom_bits)
                print(f"step {step}: held-out NLL top {top_bits:.3f} bits/code, bottom {bottom_bits:.3f} bits/code",
                      flush=True)
                write_samples(priors, tokenizer, 16, out / f"samples_{step:06d}.png", config.seed, device)
                priors.train()
                save()
    if step < config.steps:
        if runtime.is_main:
            save()
            print(f"stopped: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        raise KeyboardInterrupt
    if runtime.is_main and all(parse_caption(caption) for caption in test_set.captions[:10]):
        priors.eval()  # on shapes: how many samples the pixel scorer reads as one clean shape
        images = write_samples(priors, tokenizer, 100, out / "samples.png", config.seed, device)
        clean = score_shapes(images, [""] * len(images))["clean"]
        logger.log(step, clean_samples=clean)
        print(f"samples read as one clean shape by the shapes scorer: {100 * clean:.0f}% (of 100, {out / 'samples.png'})")


@torch.no_grad()
def sample(config, runtime, out_given):
    path = config.ckpt or str(Path(config.out) / "prior" / "ckpt.pt")
    checkpoint = load_checkpoint(path, "vqvae2-prior", required=("config", "model", "tokenizer"))
    tokenizer = VQVAE2.from_state(checkpoint["tokenizer"], runtime.device, path)
    priors = Priors(tokenizer, config_from_dict(Config, checkpoint["config"], validate)).to(runtime.device)
    load_state(priors, checkpoint["model"], path)
    out = Path(config.out) if out_given else Path(path).parent
    write_samples(priors.eval(), tokenizer, config.sample, out / "samples.png", config.seed, runtime.device)
    print(f"wrote {out / 'samples.png'}")


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    if config.train_prior and "out" not in given:
        config.out = str(Path(config.train_prior).parent / "prior")
    config, checkpoint = run_config(config, given, lambda c: "vqvae2-prior" if c.train_prior else "vqvae2", validate,
                                    training=not (config.sample or config.eval or config.encode))
    runtime = setup(config.device, config.seed)
    try:
        if config.sample:
            sample(config, runtime, "out" in given)
        elif config.eval:
            model = VQVAE2.from_checkpoint(config.ckpt or str(Path(config.out) / "ckpt.pt"), runtime.device)
            try:
                test_set = load_test(model.config.train, config.test or model.config.test, model.image_size)
            except UsageError as error:
                raise UsageError(f"the held-out images are not available here; pass --test DIR ({error})") from None
            report(model, test_set, runtime.device)
        elif config.encode:
            encode_dataset(config, runtime, "out" in given)
        elif config.train_prior:
            train_prior(config, runtime, checkpoint)
        else:
            train(config, runtime, checkpoint)
    finally:
        teardown()


if __name__ == "__main__":
    run_cli(main)
