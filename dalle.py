"""Zero-Shot Text-to-Image Generation: a decoder-only transformer over [caption bytes; VQ-VAE-2 codes].

Paper:  Ramesh, Pavlov, Goh, Gray, Voss, Radford, Chen & Sutskever, "Zero-Shot Text-to-Image
        Generation", 2021, arXiv:2102.12092. Guidance: Ho & Salimans, "Classifier-Free Diffusion
        Guidance", 2022, arXiv:2207.12598. The tokenizer: vqvae2.py (Razavi et al. 2019, arXiv:1906.00446).

Usage:
    python dalle.py --train shapes                  # tokenizer, codes, transformer, score (runs/dalle)
    python dalle.py --train shapes --width 192 --layers 6 --heads 6 --steps 2400 --code-drop 0.5   # 60-minute CPU config
    python dalle.py --train DIR --vqvae runs/vqvae2/ckpt.pt   # reuse a trained tokenizer
    python dalle.py --codes runs/vqvae2/codes      # train on codes from vqvae2.py --encode (file or folder of parts)
    python dalle.py --resume --out runs/dalle       # continue a stopped run exactly
    python dalle.py --sample "a large red circle at the top left" "a small blue square at the top" \\
                    --ckpt runs/dalle/ckpt.pt -n 16 --keep 4        # grid + one PNG/TXT pair per image
    python dalle.py --prompts captions.txt --ckpt runs/dalle/ckpt.pt     # one caption per line
    python dalle.py --interactive --ckpt runs/dalle/ckpt.pt              # captions from standard input
    python dalle.py --eval --ckpt runs/dalle/ckpt.pt                     # shapes scorer, seen / held-out
    python dalle.py --benchmark --image-size 64     # training and sampling speed (random weights)
    torchrun --nproc_per_node=2 dalle.py --train shapes                  # data parallel

Shapes: B batch, T = text_len caption bytes, Nt = Ht*Wt top codes, Nb = Hb*Wb bottom codes,
L = T + Nt + Nb tokens in a sequence, C width, H heads, K codes per level.

The model (DALL-E section 2.2): one sequence per image, text first, then the image codes in raster
order, the top level before the bottom one:
    s        = [t_1 .. t_T ; a_1 .. a_Nt ; b_1 .. b_Nb]                  (L,)
    p(s)     = prod_i p(s_i | s_<i)        a decoder-only pre-LayerNorm transformer, causal attention
    loss     = 1/8 CE_text + 7/8 CE_image           each cross-entropy a mean over its tokens (sec. 2.2)
    e_k      = E_k + describe(a_k) + silhouette(m_k)     vectors of code k, in and out (not in the paper)
Each position predicts only from the vocabulary of the token that follows it (text bytes, top codes
or bottom codes). With probability cond_drop a caption is replaced by padding during training, so
one model gives both p(image | caption) and p(image); sampling mixes them (Ho & Salimans eq. 6):
    logits   = logits_uncond + s (logits_cond - logits_uncond)                 guidance scale s

Known deviations from the paper:
    - UTF-8 bytes instead of BPE (no tokenizer dependency, any language) and VQ-VAE-2 codes (two
      levels, vqvae2.py) instead of the dVAE's 32x32 grid; a padded caption is the unconditional one;
    - dense causal attention instead of the row/column/convolutional sparse masks (short sequences);
    - classifier-free guidance and reranking by the caption's likelihood gain instead of CLIP reranking
      (no downloaded network);
    - sampling at temperature 0.2 by default (see the NOTE in pick); residual dropout and DropKey 0.2 (NOTE in DALLE);
    - each code's vectors are its learned ones plus shared MLPs of its mean decoded pixel patch a_k and of
      that patch's colour-free brightness m_k (the NOTE in DALLE), the learned ones optionally left out of
      a training step (--code-drop, embedding dropout), and training captions move right by a random
      number of pad bytes (shift_captions);
    - a small model, fp32 on CPU or bf16 autocast on CUDA, instead of 12B parameters in fp16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import vqvae2
from data import (PAD, TEXT_VOCAB, Logger, NonFiniteGuard, StopRequest, UsageError, atomic_write, autocast, barrier,
                  batches, check, config_from_dict, encode_text, format_score, learning_rate, load_checkpoint, load_state,
                  load_test, parse_caption, parse_config, parts_in, run_cli, run_config, save_checkpoint, save_grid, score_report,
                  setup, step_generator, teardown, warn_if_cut)


@dataclass
class Config:
    train: str = "shapes"  # captioned training images: a folder (NAME.png + NAME.txt), tar shards, 'shapes' or 'shapes:N'
    test: str = ""  # held-out folder or shards; default: the shapes test split, or a fixed 5% of --train
    out: str = "runs/dalle"  # run folder: vqvae2/ (the tokenizer), codes.pt (torchrun: codes/), ckpt.pt, metrics, grids
    vqvae: str = ""  # a trained vqvae2 checkpoint to use as the tokenizer; '' trains one in OUT/vqvae2 first
    vqvae_steps: int = 3200  # steps of that tokenizer training (vqvae2.py default)
    vqvae_flags: str = ""  # more vqvae2.py flags for that training, written with '=': --vqvae-flags='--hidden 32'
    codes: str = ""  # train on these codes (vqvae2.py --encode: a file or a folder of parts), tokenizer included
    image_size: int = 32  # side S of the square images (with --vqvae: the tokenizer's)
    text_len: int = 48  # T, caption bytes per sequence; longer captions are cut, shorter ones padded
    width: int = 128  # C, the transformer's width
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads per block
    dropout: float = 0.2  # dropout on the residual branches (attention and MLP outputs; see the NOTE in DALLE)
    drop_key: float = 0.2  # DropKey: probability that a query ignores a key in training (attention regulariser)
    cond_drop: float = 0.1  # probability of training on a padded (dropped) caption, for guidance
    appearance: bool = True  # add to each code's vectors a description of its mean decoded patch (NOTE in DALLE)
    silhouette: bool = True  # with --appearance: describe that patch's colour-free brightness too (NOTE in DALLE)
    code_drop: float = 0.0  # with --appearance: probability that a code's own learned vectors sit out a training step (NOTE in DALLE)
    text_shift: bool = True  # in training, move each caption right by a random number of pad bytes (shift_captions)
    text_weight: float = 0.125  # weight of the text loss; the image loss gets 1 - this (paper 1/8)
    steps: int = 1800  # transformer optimizer steps in total
    batch_size: int = 32  # sequences per micro-batch and per process
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    lr: float = 2e-3  # peak learning rate of AdamW
    weight_decay: float = 0.045  # AdamW weight decay on matrices and embeddings (paper 4.5e-2)
    warmup: int = 100  # steps of linear warmup before cosine decay to lr/10
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    compile: bool = False  # torch.compile the transformer (CUDA; slower to start)
    log_every: int = 100  # steps between progress lines and metric records
    save_every: int = 600  # steps between held-out losses, sample grids and checkpoints
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    seed: int = 0  # seeds initialisation, data order, caption dropping and sampling
    resume: bool = False  # continue OUT/ckpt.pt (or --ckpt) with its saved flags; flags given now override them
    sample: list[str] = field(default_factory=list)  # captions to draw images for with --ckpt, then exit
    prompts: str = ""  # a text file of captions, one per line, sampled like --sample
    interactive: bool = False  # read captions from standard input, one grid per line, until end of input
    n: int = 8  # images drawn per caption by --sample, --prompts and --interactive
    keep: int = 0  # M > 0: keep (and with --eval score) the M of n per caption its caption raises most in likelihood
    guidance: float = 1.5  # classifier-free guidance scale s (1: plain conditional sampling)
    temperature: float = 0.2  # divide the logits by this before sampling (see the NOTE in pick)
    top_k: int = 0  # sample among the k most likely codes only (0: all)
    top_p: float = 1.0  # sample among the smallest set of codes with this much probability (1: all)
    nearest: bool = False  # put beside each sample the training image with the closest codes
    eval: bool = False  # score --ckpt on the shapes test captions (seen / held-out pairs), then exit
    benchmark: bool = False  # measure training and sampling speed of this config (random weights), then exit
    ckpt: str = ""  # checkpoint for --sample, --eval and --resume; '' means OUT/ckpt.pt


def validate(config):
    for name in ("vqvae_steps", "text_len", "width", "layers", "heads", "steps", "batch_size", "accumulate",
                 "log_every", "save_every", "n"):
        check(getattr(config, name) > 0, f"--{name.replace('_', '-')} must be positive")
    check(config.width % config.heads == 0, "--width must be a multiple of --heads")
    check(config.image_size >= 16 and config.image_size % 8 == 0, "--image-size must be a multiple of 8, >= 16")
    check(0 <= config.cond_drop < 1 and 0 <= config.text_weight <= 1 and 0 <= config.dropout < 1
          and 0 <= config.drop_key < 1 and 0 <= config.code_drop < 1,
          "--cond-drop, --dropout, --drop-key and --code-drop must be in [0, 1), --text-weight in [0, 1]")
    check(config.lr > 0 and config.warmup >= 0 and config.grad_clip >= 0 and config.weight_decay >= 0,
          "--lr must be positive; --warmup, --grad-clip and --weight-decay must not be negative")
    check(config.temperature > 0 and config.top_k >= 0 and 0 < config.top_p <= 1 and config.guidance >= 0,
          "--temperature must be positive, --top-k >= 0, --top-p in (0, 1], --guidance >= 0")
    check(0 <= config.keep <= config.n, "--keep must be between 0 and -n")
    check(not (config.codes and config.vqvae), "--codes carries its own tokenizer: leave out --vqvae")


# ----------------------------------------------------------------------------------------------------
# The transformer


def keep_mask(shape, p, device):
    """A boolean tensor of `shape` whose entries are True with probability 1 - p, independently.
    NOTE: torch's CPU generator draws one number per element on one thread, so the masks of dropout and
    DropKey (torch.rand, bernoulli_) took about a sixth of a CPU training step. Here each 64-bit draw is
    read as four 16-bit integers, a quarter of the draws; the probability is p rounded to a multiple of
    2^-16. GPU generators draw in parallel, so there torch.rand is used as it is."""
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device) >= p
    count = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)  # (ceil(count/4),)
    return bits.view(torch.int16)[:count].view(shape) >= round(p * 2**16) - 2**15  # int16 uniform on [-2^15, 2^15)


def dropout(x, p, training):
    """Dropout (Srivastava et al. 2014): zero each entry with probability p, scale the rest by 1 / (1 - p)."""
    return x * keep_mask(x.shape, p, x.device) / (1 - p) if training and p > 0 else x


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position i attends to positions <= i, with an optional cache of
    keys and values so that sampling computes each position once."""

    def __init__(self, width, heads, dropout, drop_key):
        super().__init__()
        self.heads, self.dropout, self.drop_key = heads, dropout, drop_key
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, cache=None, start=0):
        """x (B, L, C) at sequence positions start .. start+L-1; cache = (keys, values), each (B, H, L_max, C/H)."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, L, C)
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, C/H)
        mask, causal = None, L > 1
        if cache is not None:
            cache[0][:, :, start:start + L], cache[1][:, :, start:start + L] = k, v
            k, v = cache[0][:, :, :start + L], cache[1][:, :, :start + L]  # (B, H, start+L, C/H)
            if start > 0 and L > 1:  # new positions see the whole cache and the new ones up to themselves
                mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)
                causal = False
        if self.training and self.drop_key > 0 and cache is None:
            # DropKey (Li et al. 2023, arXiv:2208.02646): each query ignores each earlier key with
            # probability drop_key, before the softmax, which renormalises over the keys kept.
            # NOTE: instead of dropout on the attention weights, which on a CPU made a training step 1.5x
            # slower (SDPA falls back to its unfused path); a boolean mask keeps the fused kernel. The paper
            # also masks the diagonal and lowers the ratio with depth; here the diagonal is kept (no query
            # is left without keys) and the ratio is constant.
            mask = keep_mask((B, self.heads, L, L), self.drop_key, x.device).tril_()  # (B, H, L, L), causal
            mask.diagonal(dim1=2, dim2=3).fill_(True)  # each query always sees itself
            causal = False
        # softmax(q k^T / sqrt(C/H)) v over the allowed positions (Vaswani et al. 2017, eq. 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, L, C/H)
        return dropout(self.proj(y.transpose(1, 2).reshape(B, L, C)), self.dropout, self.training)  # (B, L, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, heads, dropout, drop_key):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout, drop_key)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = dropout

    def forward(self, x, cache=None, start=0):
        x = x + self.attention(self.norm1(x), cache, start)
        return x + dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


class DALLE(nn.Module):
    """p(caption bytes, top codes, bottom codes) in one causal sequence of length L = T + Nt + Nb."""

    def __init__(self, config, top_shape, bottom_shape, top_codebook_size, bottom_codebook_size):
        super().__init__()
        C, T = config.width, config.text_len
        self.text_len, self.top_shape, self.bottom_shape = T, tuple(top_shape), tuple(bottom_shape)
        self.top_count, self.bottom_count = math.prod(top_shape), math.prod(bottom_shape)  # Nt, Nb
        self.length = T + self.top_count + self.bottom_count  # L
        # each part of the sequence has its own vocabulary, input embedding, positions and output head
        self.text_embedding = nn.Embedding(TEXT_VOCAB, C)
        self.top_embedding = nn.Embedding(top_codebook_size, C)
        self.bottom_embedding = nn.Embedding(bottom_codebook_size, C)
        self.text_position = nn.Parameter(torch.zeros(T, C))  # learned, one per byte
        self.top_row, self.top_column = nn.Parameter(torch.zeros(top_shape[0], C)), nn.Parameter(torch.zeros(top_shape[1], C))
        self.bottom_row = nn.Parameter(torch.zeros(bottom_shape[0], C))
        self.bottom_column = nn.Parameter(torch.zeros(bottom_shape[1], C))
        # NOTE: residual dropout 0.2 and DropKey 0.2 by default (the paper states no regulariser). Without
        # them our model memorises its 20,000 code sequences on shapes (training image loss 0.19 against
        # 1.04 nats held out after 1,800 steps) and draws unseen colour-shape pairs right 45% of the time;
        # with both, 57% (README, Regularisation).
        self.blocks = nn.ModuleList(Block(C, config.heads, config.dropout, config.drop_key) for _ in range(config.layers))
        self.norm = nn.LayerNorm(C)
        self.text_head = nn.Linear(C, TEXT_VOCAB, bias=False)
        self.top_head = nn.Linear(C, top_codebook_size, bias=False)
        self.bottom_head = nn.Linear(C, bottom_codebook_size, bias=False)
        # NOTE: not in the paper. A code's input and output vectors are its own learned ones plus
        # describe(its appearance): the mean RGB patch the tokenizer decodes where the code sits in the
        # training images (set by code_appearance), through a small MLP shared by all codes of a level.
        # A learned vector alone says nothing about what a code looks like, so a red triangle, whose red
        # edge codes never sit in a triangle in training, came out red but round; with shared
        # descriptions, edge codes of every colour that look alike get alike vectors. On shapes this
        # raised the unseen colour-shape pairs drawn right from 48% to 66% (README, Compositional codes).
        # A second MLP, silhouette, sees only the patch's brightness over its brightest pixel, so it gives
        # the edge of a triangle one vector whatever its colour: a code's logit adds a colour-free shape
        # term to the rest. On shapes it drew unseen pairs right 75% and 65% of the time in two seeds,
        # against 66% and 68% without it: a gain inside the spread between seeds (README, Silhouettes).
        # Embedding dropout (Gal & Ghahramani 2016, arXiv:1512.05287, sec. 4.2) on the learned part only: in
        # a training step each code's E_k (input and output) is left out with probability code_drop, for
        # every row of the batch, so the shared descriptions must tell that code apart on their own. With
        # the learned vectors alone a code that never sat in a red triangle in training stays unlikely
        # there, whatever its description says. At the 60-minute size, --code-drop 0.5 drew unseen pairs
        # right 97%, 92% and 99% of the time in three seeds whose runs without it drew 84%, 78% and 70%
        # (README, Code dropout); it is off by default because the quickstart was not measured with it.
        self.appearance, self.silhouette = config.appearance, config.appearance and config.silhouette
        self.code_drop = config.code_drop if config.appearance else 0.0  # without descriptions nothing would stand in
        if self.appearance:
            top_patch, bottom_patch = 3 * 8 * 8, 3 * 4 * 4  # vqvae2.py: a top code covers 8 x 8 pixels, a bottom one 4 x 4
            self.register_buffer("top_appearance", torch.zeros(top_codebook_size, top_patch))  # (Kt, 3 8 8)
            self.register_buffer("bottom_appearance", torch.zeros(bottom_codebook_size, bottom_patch))  # (Kb, 3 4 4)
            self.top_describe = nn.Sequential(nn.Linear(top_patch, C), nn.GELU(), nn.Linear(C, C))
            self.bottom_describe = nn.Sequential(nn.Linear(bottom_patch, C), nn.GELU(), nn.Linear(C, C))
        if self.silhouette:
            self.top_silhouette = nn.Sequential(nn.Linear(top_patch // 3, C), nn.GELU(), nn.Linear(C, C))
            self.bottom_silhouette = nn.Sequential(nn.Linear(bottom_patch // 3, C), nn.GELU(), nn.Linear(C, C))
        for name, parameter in self.named_parameters():  # GPT-2 initialisation, as in nanoGPT
            if parameter.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(parameter, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)

    def positions(self):
        """Position embeddings of the whole sequence: (L, C), row + column embeddings for the codes."""
        top = (self.top_row[:, None] + self.top_column[None]).flatten(0, 1)  # (Ht, 1, C) + (1, Wt, C) -> (Nt, C)
        bottom = (self.bottom_row[:, None] + self.bottom_column[None]).flatten(0, 1)  # (Nb, C)
        return torch.cat([self.text_position, top, bottom])  # (L, C)

    def parts(self):
        """(first position, end, input vectors (V, C), output vectors (V, C)) of the text, top and bottom
        parts of the sequence; a code's vectors are its learned ones plus describe(a_k) + silhouette(m_k)."""
        T, Nt = self.text_len, self.top_count
        top, bottom = 0, 0
        if self.appearance:
            top, bottom = self.top_describe(self.top_appearance), self.bottom_describe(self.bottom_appearance)  # (K, C)
        if self.silhouette:
            top = top + self.top_silhouette(brightness(self.top_appearance))  # (K, C)
            bottom = bottom + self.bottom_silhouette(brightness(self.bottom_appearance))  # (K, C)
        levels = []
        for embedding, head, description in ((self.top_embedding, self.top_head, top),
                                             (self.bottom_embedding, self.bottom_head, bottom)):
            free_in, free_out = embedding.weight, head.weight  # (K, C) each: E_k in, E'_k out
            if self.training and self.code_drop > 0:  # one mask per code, shared by input and output
                keep = keep_mask((len(free_in), 1), self.code_drop, free_in.device) / (1 - self.code_drop)  # (K, 1)
                free_in, free_out = free_in * keep, free_out * keep
            levels.append((free_in + description, free_out + description))
        (top_in, top_out), (bottom_in, bottom_out) = levels
        return ((0, T, self.text_embedding.weight, self.text_head.weight),
                (T, T + Nt, top_in, top_out),
                (T + Nt, self.length, bottom_in, bottom_out))

    def hidden(self, tokens, start=0, cache=None, parts=None):
        """tokens (B, L') at positions start .. start+L'-1, each an id in its part's vocabulary -> (B, L', C)."""
        pieces = []
        for first, end, vectors, _ in parts or self.parts():
            a, b = max(first, start), min(end, start + tokens.shape[1])
            if a < b:
                pieces.append(F.embedding(tokens[:, a - start: b - start], vectors))  # (B, b - a, C)
        x = torch.cat(pieces, 1) + self.positions()[start: start + tokens.shape[1]]  # (B, L', C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache is not None else None, start)
        return self.norm(x)

    @staticmethod
    def head(parts, position):
        """The output vectors (V, C) at `position`: it predicts the token at position + 1, from that token's vocabulary."""
        return next(head for first, end, _, head in parts if first <= position + 1 < end)

    def forward(self, tokens):
        """tokens (B, L) -> (text logits (B, T-1, 257), image logits [(B, Nt, K), (B, Nb, K)]); the
        output at position i predicts token i + 1, so the first byte is never predicted."""
        parts = self.parts()
        h = self.hidden(tokens[:, :-1], parts=parts)  # (B, L-1, C)
        T, Nt = self.text_len, self.top_count
        (_, _, _, text_head), (_, _, _, top_head), (_, _, _, bottom_head) = parts
        return (h[:, :T - 1] @ text_head.T,  # (B, T-1, C) @ (C, 257): predicts tokens 1 .. T-1
                [h[:, T - 1: T - 1 + Nt] @ top_head.T, h[:, T - 1 + Nt:] @ bottom_head.T])  # (B, Nt, K), (B, Nb, K)

    def new_cache(self, batch, device, dtype):
        C, H = self.norm.normalized_shape[0], self.blocks[0].attention.heads
        return [(torch.zeros(batch, H, self.length, C // H, device=device, dtype=dtype),
                 torch.zeros(batch, H, self.length, C // H, device=device, dtype=dtype)) for _ in self.blocks]


def brightness(appearance):
    """m_k: a patch's brightness over its brightest pixel, (K, 3 p p) in [-1, 1] -> (K, p p) in [0, 1]. On a
    black background it is the silhouette of what the patch shows, the same in every colour (brightness:
    the largest of R, G and B)."""
    value = ((appearance + 1) / 2).unflatten(1, (3, -1)).amax(1)  # (K, 3, p p) -> (K, p p), in [0, 1]
    return value / value.amax(1, keepdim=True).clamp(min=0.05)  # (K, p p); a black patch stays black


@torch.no_grad()
def code_appearance(model, tokenizer, codes, chunk=256):
    """Set each code's appearance: the mean RGB patch, in [-1, 1], that the tokenizer decodes at the places
    the code holds in these code grids (N, Nt + Nb); a top code covers 8 x 8 pixels, a bottom code 4 x 4."""
    levels = ((model.top_appearance, tokenizer.top_shape), (model.bottom_appearance, tokenizer.bottom_shape))
    sums = [torch.zeros_like(appearance) for appearance, _ in levels]  # (K, 3 p p) each
    counts = [torch.zeros(len(appearance), device=appearance.device) for appearance, _ in levels]  # (K,)
    for piece in codes.split(chunk):
        images = 2 * to_images(tokenizer, piece.to(model.top_appearance.device)) - 1  # (B, 3, S, S) in [-1, 1]
        for (appearance, shape), ids, total, count in zip(levels, vqvae2.split_codes(piece, tokenizer), sums, counts):
            side = tokenizer.image_size // shape[0]
            patches = F.unfold(images, side, stride=side).transpose(1, 2).flatten(0, 1)  # (B, 3 p p, H W) -> (B H W, 3 p p)
            ids = ids.flatten().to(appearance.device).long()  # (B H W,), raster order like unfold's
            total.index_add_(0, ids, patches)
            count.index_add_(0, ids, torch.ones_like(ids, dtype=count.dtype))
    for (appearance, _), total, count in zip(levels, sums, counts):
        appearance.copy_(total / count.clamp(min=1)[:, None])  # a code never used: zeros, a mid-grey patch


def losses(model, tokens):
    """Mean cross-entropies in nats per token: text over bytes 2 .. T, image over all Nt + Nb codes."""
    text_logits, image_logits = model(tokens)
    T = text_logits.shape[1] + 1
    text = F.cross_entropy(text_logits.flatten(0, 1).float(), tokens[:, 1:T].flatten())  # mean over B (T-1)
    image_targets = tokens[:, T:]  # (B, Nt + Nb)
    log_probs = torch.cat([logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
                           for logits, targets in zip(image_logits, image_targets.split(
                               [logits.shape[1] for logits in image_logits], 1))], 1)  # (B, Nt + Nb)
    return text, -log_probs  # scalar, (B, Nt + Nb) per-token NLL


def shift_captions(text, generator):
    """Move each caption (B, T) right by s pad bytes, s uniform over 0 .. its trailing padding.

    NOTE: not in the paper. Text positions are learned and absolute, so a word is a byte at a position;
    on shapes, 'red' is the only three-letter colour, so no training caption has a shape word at the
    bytes where 'a small red triangle' has 'triangle'. Shifting captions in training lets every word
    appear at every position it can reach. Sampling uses unshifted captions (s = 0)."""
    B, T = text.shape
    length = (text != PAD).sum(1)  # (B,) caption bytes; the padding trails them
    s = (torch.rand(B, device=text.device, generator=generator) * (T - length + 1)).long()  # (B,) in 0 .. T - length
    index = (torch.arange(T, device=text.device) - s[:, None]) % T  # (B, T): output j reads input j - s
    return text.gather(1, index)  # (B, T), the first s bytes wrapped around from the padding


def drop_captions(text, probability, generator):
    """Replace each caption (B, T) by padding with the given probability: the unconditional model."""
    dropped = torch.rand(text.shape[0], device=text.device, generator=generator) < probability  # (B,)
    return torch.where(dropped[:, None], torch.full_like(text, PAD), text)


# ----------------------------------------------------------------------------------------------------
# Sampling


def pick(logits, generator, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row from logits (B, K): temperature, then top-k, then top-p (nucleus) filtering."""
    # NOTE: the paper samples at temperature 1 and reranks with CLIP. Our small CPU-trained model draws
    # far more faithful images colder: on shapes, 57% -> 89% of seen captions right at temperature
    # 1 -> 0.2 (README), at the price of less varied images.
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, K)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the first token that crosses p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)


@torch.no_grad()
def sample_codes(model, text, generator, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0, cache=True):
    """text (B, T) -> image codes (B, Nt + Nb), one token per step. With guidance != 1 the conditional
    rows and their unconditional twins (padded captions) run as one batch of 2B with their own caches.
    cache=False recomputes the whole prefix at every step (for the speed comparison and the tests)."""
    guided = guidance != 1.0
    rows = torch.cat([text, torch.full_like(text, PAD)]) if guided else text  # (R, T), R = 2B or B
    T, count = model.text_len, model.top_count + model.bottom_count
    dtype = next(model.parameters()).dtype
    kv = model.new_cache(len(rows), text.device, dtype) if cache else None
    parts = model.parts()  # the code vectors, computed once
    sequence, hidden = rows, model.hidden(rows, 0, kv, parts)[:, -1]  # the caption is computed once: (R, C)
    codes = []
    for i in range(count):
        logits = hidden @ model.head(parts, T - 1 + i).T  # (R, C) @ (C, K) -> (R, K) for image token i
        if guided:  # = uncond + s (cond - uncond), written so that s = 1 gives cond exactly
            conditional, unconditional = logits.chunk(2)
            logits = conditional + (guidance - 1) * (conditional - unconditional)  # (B, K)
        token = pick(logits, generator, temperature, top_k, top_p)  # (B,)
        codes.append(token)
        if i + 1 < count:
            new = (torch.cat([token, token]) if guided else token)[:, None]  # (R, 1)
            if cache:
                hidden = model.hidden(new, T + i, kv, parts)[:, -1]
            else:
                sequence = torch.cat([sequence, new], 1)  # (R, T + i + 1)
                hidden = model.hidden(sequence, parts=parts)[:, -1]
    return torch.stack(codes, 1)  # (B, Nt + Nb)


@torch.no_grad()
def caption_gain(model, text, codes):
    """sum over image tokens of log p(code | caption) - log p(code | no caption): (B,), used to rerank."""
    both = torch.cat([torch.cat([text, codes], 1), torch.cat([torch.full_like(text, PAD), codes], 1)])  # (2B, L)
    _, nll = losses(model, both)  # (2B, Nt + Nb)
    conditional, unconditional = nll.sum(1).chunk(2)
    return unconditional - conditional


def to_images(tokenizer, codes):
    """codes (B, Nt + Nb) -> images (B, 3, S, S) in [0, 1] through the VQ-VAE-2 decoder, 256 at a time."""
    return torch.cat([tokenizer.decode(*vqvae2.split_codes(chunk, tokenizer)) for chunk in codes.split(256)])


@torch.no_grad()
def generate(model, tokenizer, captions, config, device, seed):
    """n images per caption (keeping the best `keep` if reranking): images, captions, their codes."""
    generator = torch.Generator(device).manual_seed(seed)
    text = encode_text([c for c in captions for _ in range(config.n)], model.text_len).to(device)  # (B n, T)
    codes = torch.cat([sample_codes(model, chunk, generator, config.guidance, config.temperature, config.top_k,
                                    config.top_p) for chunk in text.split(256)])  # (B n, Nt + Nb)
    if config.keep:
        gain = torch.cat([caption_gain(model, text_chunk, codes_chunk)  # in chunks: (256, L) logits each
                          for text_chunk, codes_chunk in zip(text.split(256), codes.split(256))])
        gain = gain.view(len(captions), config.n)  # (B, n)
        best = gain.topk(config.keep, 1).indices + torch.arange(len(captions), device=device)[:, None] * config.n
        codes, text = codes[best.flatten()], text[best.flatten()]  # (B M, Nt + Nb)
    per_caption = config.keep or config.n
    return to_images(tokenizer, codes), [c for c in captions for _ in range(per_caption)], codes


# ----------------------------------------------------------------------------------------------------
# Data: a codes file (vqvae2.py --encode) as token sequences


class TokenDataset(Dataset):
    """One split of a codes file as (tokens (L,) = [caption bytes; top codes; bottom codes], caption)."""

    def __init__(self, split, text_len):
        self.codes = vqvae2.CodesDataset(split).codes  # (N, Nt + Nb)
        self.captions = split["captions"]
        self.tokens = torch.cat([encode_text(self.captions, text_len), self.codes], 1)  # (N, L)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index], self.captions[index]


def prepare_codes(config, runtime):
    """Stages 1 and 2: train the tokenizer (unless --vqvae), then encode the dataset once, into OUT/codes.pt;
    under torchrun into the folder OUT/codes, each rank writing its own parts (data.write_parts). Both
    stages resume where a stopped run left them; --codes skips both. -> (codes, where they are)."""
    if config.codes:
        return vqvae2.load_codes(config.codes), Path(config.codes)
    out = Path(config.out)
    path = Path(config.vqvae) if config.vqvae else out / "vqvae2" / "ckpt.pt"
    if not config.vqvae:
        barrier(runtime)
        try:
            flags = shlex.split(config.vqvae_flags)
        except ValueError as error:  # an unclosed quote
            raise UsageError(f"--vqvae-flags {config.vqvae_flags!r}: {error}") from None
        tokenizer_config, _ = parse_config(vqvae2.Config, flags)
        tokenizer_config = dataclasses.replace(tokenizer_config, train=config.train, test=config.test,
                                               out=str(path.parent), image_size=config.image_size,
                                               steps=config.vqvae_steps, device=config.device, seed=config.seed)
        vqvae2.validate(tokenizer_config)
        checkpoint = load_checkpoint(path, "vqvae2") if path.exists() else None
        if checkpoint:
            tokenizer_config = config_from_dict(vqvae2.Config, checkpoint["config"], vqvae2.validate)
        if checkpoint is None or checkpoint["step"] < tokenizer_config.steps:
            if runtime.is_main:
                print(f"stage 1/3: training the VQ-VAE-2 tokenizer in {path.parent}", flush=True)
            vqvae2.train(tokenizer_config, runtime, checkpoint)
    barrier(runtime)  # rank 0 has saved the tokenizer before any rank reads it
    codes_path = out / "codes.pt"
    if not codes_path.exists() and (runtime.distributed or (out / "codes").is_dir()):
        codes_path = out / "codes"  # a folder of parts: one process or several continue it alike
    count, found = parts_in(codes_path) if codes_path.is_dir() else (0, {})
    if codes_path.is_file() or (count and len(found) == count):
        return vqvae2.load_codes(codes_path), codes_path
    if runtime.is_main:
        print(f"stage 2/3: encoding the dataset with {path}", flush=True)
    return vqvae2.encode_dataset(vqvae2.Config(encode=config.train, test=config.test, ckpt=str(path),
                                               out=str(codes_path)), runtime, out_given=True), codes_path


# ----------------------------------------------------------------------------------------------------
# Evaluation and training


@torch.no_grad()
def held_out_losses(model, tokens):
    """Text and image loss on held-out sequences (B, L), and the image-loss gap between real and
    dropped captions in nats per image token: how much the model uses the text."""
    text, nll = losses(model, tokens)
    _, nll_dropped = losses(model, torch.cat([torch.full_like(tokens[:, :model.text_len], PAD),
                                              tokens[:, model.text_len:]], 1))
    return dict(text_loss=text.item(), image_loss=nll.mean().item(), caption_gap=(nll_dropped - nll).mean().item())


@torch.no_grad()
def score(model, tokenizer, captions, config, device):
    """One sample per caption (with --keep M: the best M of n), scored by data.py's pixel scorer for seen and
    held-out pairs."""
    images, captions, _ = generate(model, tokenizer, captions, config if config.keep else
                                   dataclasses.replace(config, n=1), device, config.seed)
    return score_report(images.cpu(), captions), images


def write_samples(model, tokenizer, captions, config, device, path):
    images, captions, _ = generate(model, tokenizer, captions, dataclasses.replace(config, n=1, keep=0),
                                   device, config.seed)
    save_grid(images, path, nrow=8, captions=captions)


def parameter_groups(model, weight_decay):
    """AdamW groups as in nanoGPT: matrices and embeddings decay, biases and LayerNorm gains do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def train(config, runtime, checkpoint=None):
    """Stage 3: the transformer, on the cached codes (stages 1 and 2 run first when needed)."""
    out, device = Path(config.out), runtime.device
    codes, codes_path = prepare_codes(config, runtime)
    tokenizer = vqvae2.VQVAE2.from_state(codes["tokenizer"], device, codes_path)
    train_set, test_set = TokenDataset(codes["train"], config.text_len), TokenDataset(codes["test"], config.text_len)
    torch.manual_seed(config.seed)  # the same initial weights whether or not stages 1 and 2 ran in this process
    model = DALLE(config, tokenizer.top_shape, tokenizer.bottom_shape, tokenizer.top_codebook_size,
                  tokenizer.bottom_codebook_size).to(device)
    if config.appearance and not checkpoint:  # (a checkpoint carries the appearances it was trained with)
        code_appearance(model, tokenizer, train_set.codes)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.96),
                                  eps=1e-8, fused=device.type == "cuda")  # betas and eps from the paper (B.2)
    step = 0
    if checkpoint:
        load_state(model, checkpoint["model"], out / "ckpt.pt")
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        check(step < config.steps, f"the checkpoint is at step {step} already; pass a larger --steps")
    if runtime.is_main:
        print(f"stage 3/3: dalle transformer, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"sequences of {config.text_len} bytes + {model.top_count} + {model.bottom_count} codes, "
              f"{len(train_set)} training, {len(test_set)} held out, device {device}, "
              f"{runtime.world_size} process(es), from step {step}", flush=True)
    network = torch.compile(model) if config.compile else model
    network = DistributedDataParallel(network) if runtime.distributed else network
    logger = Logger(out, config.steps, step, runtime.is_main)
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step * config.accumulate)
    guard = NonFiniteGuard()  # a NaN or infinite loss skips its update; too many stop the run
    held_out = test_set.tokens[:256].to(device)  # (256, L), a fixed held-out batch
    fixed_captions = test_set.captions[:16]  # on shapes: seen and held-out pairs alternate

    def save():
        save_checkpoint(out / "ckpt.pt", "dalle", config, step, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), tokenizer=tokenizer.state())

    start_time, start_step, paused = time.time(), step, 0.0  # `paused`: evaluation time, left out of speed
    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
            generator = step_generator(device, config.seed, runtime.rank, step)
            torch.manual_seed(generator.initial_seed())  # dropout and DropKey masks: a function of the step, for --resume
            for micro in range(config.accumulate):
                tokens, _ = next(data)  # (B, L)
                text = tokens[:, :config.text_len]  # (B, T)
                text = shift_captions(text, generator) if config.text_shift else text
                tokens = torch.cat([drop_captions(text, config.cond_drop, generator), tokens[:, config.text_len:]], 1)
                syncing = micro == config.accumulate - 1 or not runtime.distributed
                with (network.no_sync() if not syncing else torch.enable_grad()), autocast(device):
                    text_loss, nll = losses(network, tokens)
                    image_loss = nll.mean()
                    # loss = 1/8 CE_text + 7/8 CE_image (DALL-E sec. 2.2), averaged over micro-batches
                    loss = (config.text_weight * text_loss + (1 - config.text_weight) * image_loss) / config.accumulate
                    loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            if guard.finite(step, loss, grad_norm):  # else this step (all its micro-batches) is skipped
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                seconds = time.time() - start_time - paused
                tokens_per_second = ((step - start_step) * config.batch_size * config.accumulate * runtime.world_size
                                     * (model.length - 1) / seconds)
                logger.log(step, loss=loss.item() * config.accumulate, text_loss=text_loss.item(),
                           image_loss=image_loss.item(), lr=optimizer.param_groups[0]["lr"],
                           grad_norm=grad_norm.item(), tokens_per_second=tokens_per_second)
                logger.progress(step, text=text_loss.item(), image=image_loss.item(), tok_per_s=tokens_per_second)
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                evaluation_start = time.time()
                model.eval()
                metrics = held_out_losses(model, held_out)
                logger.log(step, **{f"test_{key}": value for key, value in metrics.items()})
                print(f"step {step}: held-out text {metrics['text_loss']:.3f}, image {metrics['image_loss']:.3f} "
                      f"nats/token, caption gap {metrics['caption_gap']:.3f} nats/image token", flush=True)
                write_samples(model, tokenizer, fixed_captions, config, device, out / f"samples_{step:06d}.png")
                model.train()
                save()
                paused += time.time() - evaluation_start
    if step < config.steps:  # stopped by Ctrl-C or SIGTERM: keep the work, then exit with 130
        if runtime.is_main:
            save()
            print(f"stopped: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        raise KeyboardInterrupt
    if runtime.is_main:
        seconds = time.time() - start_time
        print(f"trained {step - start_step} steps in {seconds:.0f} s ({paused:.0f} s of it held-out evaluation)")
        report(model.eval(), tokenizer, test_set.captions, config, device, out, logger, step)


def report(model, tokenizer, captions, config, device, out, logger=None, step=None):
    """On shapes: the scorer on one sample per test caption, at guidance 1 and at --guidance."""
    if not all(parse_caption(caption) for caption in captions[:20]):
        write_samples(model, tokenizer, captions[:16], config, device, out / "samples.png")
        print(f"samples for held-out captions: {out / 'samples.png'}")
        return
    for guidance in sorted({1.0, config.guidance}):
        start = time.time()
        result, images = score(model, tokenizer, captions, dataclasses.replace(config, guidance=guidance), device)
        each = f", the best {config.keep} of {config.n} samples of each by caption gain" if config.keep else ""
        print(f"shapes scorer on {len(captions)} test captions{each}, guidance {guidance:g} "
              f"({time.time() - start:.0f} s):\n" + format_score(result))
        if logger:
            logger.log(step, **{f"guidance_{guidance:g}_{name}_all": value["all"] for name, value in result.items()})
        if guidance == config.guidance:
            save_grid(images[:32], out / "samples.png", nrow=8, captions=captions[:32])
            parts = [f"{name.replace('_', '-')} {100 * result[name]['all']:.1f}%" for name in ("seen", "held_out")
                     if name in result]
            print(f"faithfulness (guidance {guidance:g}): {', '.join(parts)}; sample grid: {out / 'samples.png'}")


# ----------------------------------------------------------------------------------------------------
# Sampling from a checkpoint, and the speed benchmark


# options a checkpoint saved before they existed trained without
LEGACY = dict(drop_key=0.0, appearance=False, text_shift=False, silhouette=False, code_drop=0.0)


def saved_config(checkpoint):
    """The Config of a dalle checkpoint. One saved before a training option existed ran without it."""
    values = checkpoint["config"]
    return config_from_dict(Config, {**LEGACY, **values} if isinstance(values, dict) else values, validate)


def load_model(path, device):
    checkpoint = load_checkpoint(path, "dalle", required=("config", "model", "tokenizer"))
    saved = saved_config(checkpoint)
    tokenizer = vqvae2.VQVAE2.from_state(checkpoint["tokenizer"], device, path)
    model = DALLE(saved, tokenizer.top_shape, tokenizer.bottom_shape, tokenizer.top_codebook_size,
                  tokenizer.bottom_codebook_size).to(device)
    load_state(model, checkpoint["model"], path)
    return model.eval(), tokenizer, saved


def read_prompts(path):
    check(Path(path).is_file(), f"--prompts {path}: no such file")
    try:
        lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as error:
        raise UsageError(f"--prompts {path}: cannot be read ({error.strerror})") from None
    captions = [line.strip() for line in lines if line.strip()]
    check(captions, f"--prompts {path}: no captions in it")
    return captions


@torch.no_grad()
def nearest_training_codes(codes, train_codes):
    """For each sample (B, Nt + Nb): the index of the training code grid at the smallest Hamming
    distance, and that distance (how many of the Nt + Nb codes differ)."""
    distances = torch.cat([(chunk[:, None] != train_codes[None]).sum(-1) for chunk in codes.split(16)])  # (B, N)
    distance, index = distances.min(1)
    return index, distance


def write_outputs(model, tokenizer, captions, config, device, out, name, train_codes=None):
    warn_if_cut(captions, model.text_len)
    images, captions, codes = generate(model, tokenizer, captions, config, device, config.seed)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):  # PNG + TXT pairs: `python data.py score`
        save_grid(image[None], folder / f"{i:04d}.png", nrow=1, padding=0)
        atomic_write(folder / f"{i:04d}.txt", lambda f, c=caption: f.write(c.encode("utf-8", errors="replace")))
    per_row = config.keep or config.n
    labels = captions
    if train_codes is not None:
        index, distance = nearest_training_codes(codes, train_codes.to(device))
        nearest = to_images(tokenizer, train_codes[index.cpu()].to(device).long())
        images = torch.stack([images, nearest], 1).flatten(0, 1)  # sample, nearest, sample, ...: (2N, 3, S, S)
        labels = [label for caption, d in zip(captions, distance.tolist())
                  for label in (caption, f"nearest training codes: {d}/{codes.shape[1]} differ")]
        per_row = 2 * min(per_row, 4)
    save_grid(images, out / f"{name}.png", nrow=min(per_row, 8), captions=labels)
    print(f"wrote {out / f'{name}.png'} and {len(captions)} PNG + TXT pairs in {folder}")


def sample(config, runtime, out_given):
    path = config.ckpt or str(Path(config.out) / "ckpt.pt")
    model, tokenizer, saved = load_model(path, runtime.device)
    out = Path(config.out) if out_given else Path(path).parent
    train_codes = None
    if config.nearest:  # the codes the run trained on: its --codes, else codes.pt or codes/ beside the checkpoint
        places = [Path(saved.codes)] if saved.codes else [Path(path).parent / "codes.pt", Path(path).parent / "codes"]
        codes_path = next((place for place in places if place.exists()), places[0])
        check(codes_path.exists(), f"--nearest needs the run's codes, {codes_path}, which are not there")
        train_codes = vqvae2.CodesDataset(vqvae2.load_codes(codes_path)["train"]).codes  # (N, Nt + Nb)
    if config.sample or config.prompts:
        captions = list(config.sample) + (read_prompts(config.prompts) if config.prompts else [])
        write_outputs(model, tokenizer, captions, config, runtime.device, out, "samples", train_codes)
    if config.interactive:
        print("type a caption and press enter (end of input stops)", flush=True)
        for i, line in enumerate(sys.stdin):
            if line.strip():
                write_outputs(model, tokenizer, [line.strip()], config, runtime.device, out, f"interactive_{i:03d}",
                              train_codes)


def eval_captions(config, saved, image_size):
    """The captions --eval samples: --test's if given; else those of the held-out split the run itself
    scored at the end of training: its --codes file's (encoded from any dataset), or its --train's."""
    if saved.codes and not config.test:
        check(Path(saved.codes).exists(), f"--eval: the run trained on {saved.codes}, which is gone; pass --test")
        return vqvae2.load_codes(saved.codes)["test"]["captions"]
    test_set = load_test(saved.train, config.test or saved.test, image_size)
    return getattr(test_set, "captions", None) or [test_set[i][1] for i in range(min(1000, len(test_set)))]


def benchmark(config, runtime):
    """Training tokens/s, and image tokens/s of sampling with and without the cache, random weights."""
    device = runtime.device
    tokenizer_config = vqvae2.Config(image_size=config.image_size)
    top, bottom = (config.image_size // 8,) * 2, (config.image_size // 4,) * 2
    model = DALLE(config, top, bottom, tokenizer_config.codebook_size, tokenizer_config.codebook_size).to(device)
    codes = torch.randint(0, tokenizer_config.codebook_size, (config.batch_size, model.length - config.text_len),
                          device=device)
    tokens = torch.cat([encode_text(["a large red circle at the top left"] * config.batch_size,
                                    config.text_len).to(device), codes], 1)  # (B, L)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = dict(parameters=sum(p.numel() for p in model.parameters()), image_tokens=model.length - config.text_len)
    for timed in (False, True):  # a warm-up round, then the measured one
        synchronize()
        start = time.time()
        for _ in range(5 if timed else 1):
            with autocast(device):
                text_loss, nll = losses(model, tokens)
                loss = config.text_weight * text_loss + (1 - config.text_weight) * nll.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize()
    results["train_tokens_per_second"] = 5 * config.batch_size * (model.length - 1) / (time.time() - start)
    model.eval()
    text = tokens[:config.n, :config.text_len]
    for cache in (True, False):
        generator = torch.Generator(device).manual_seed(0)
        synchronize()
        start = time.time()
        with autocast(device):
            sample_codes(model, text, generator, config.guidance, cache=cache)
        synchronize()
        results[f"sample_tokens_per_second_{'cached' if cache else 'uncached'}"] = (
            len(text) * results["image_tokens"] / (time.time() - start))
    results["cache_speedup"] = results["sample_tokens_per_second_cached"] / results["sample_tokens_per_second_uncached"]
    results["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({key: round(value, 1) if isinstance(value, float) else value for key, value in results.items()}))
    return results


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    sampling = config.sample or config.prompts or config.interactive
    config, checkpoint = run_config(config, given, "dalle", validate, legacy=LEGACY,
                                    training=not (config.benchmark or sampling or config.eval))
    path = Path(config.ckpt or Path(config.out) / "ckpt.pt")
    runtime = setup(config.device, config.seed)
    try:
        if config.benchmark:
            benchmark(config, runtime)
        elif sampling:
            sample(config, runtime, "out" in given)
        elif config.eval:
            model, tokenizer, saved = load_model(path, runtime.device)
            out = Path(config.out) if "out" in given else path.parent
            report(model, tokenizer, eval_captions(config, saved, tokenizer.image_size), config, runtime.device, out)
        else:
            train(config, runtime, checkpoint)
    finally:
        teardown()


if __name__ == "__main__":
    run_cli(main)
