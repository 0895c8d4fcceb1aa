"""Zero-Shot Text-to-Image Generation: a decoder-only transformer over [caption bytes; VQ-VAE-2 codes].

Paper:  Ramesh, Pavlov, Goh, Gray, Voss, Radford, Chen & Sutskever, "Zero-Shot Text-to-Image Generation",
        2021, arXiv:2102.12092; guidance: Ho & Salimans 2022, arXiv:2207.12598; tokenizer: vqvae2.py.

Usage:
    python dalle.py --train shapes                  # tokenizer, codes, transformer, score (runs/dalle)
    python dalle.py --resume --out runs/dalle       # continue a stopped run exactly
    python dalle.py --sample "a red circle" -n 8 --ckpt runs/dalle/ckpt.pt
    python dalle.py --train shapes --reranker --out runs/rerank   # with the paper's reranker (sec. 2.5)
    python dalle.py --sample "a red circle" -n 16 --keep 4 --ckpt runs/rerank/ckpt.pt   # its best 4 of 16
    torchrun --nproc_per_node=2 dalle.py --train shapes                 # data parallel

Deviations: bytes, not BPE; VQ-VAE-2 codes, not the dVAE; dense attention; guidance; a small model; a pooled
caption summary beside attention; reranking by a small CLIP trained beside the transformer on the user's images
(--reranker), not one on 400M pairs; and the section "Beyond the paper" below (README: dalle.py).
"""

import dataclasses
import math
import shlex
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import vqvae2
from data import (PAD, TEXT_VOCAB, CodesDataset, Logger, NonFiniteGuard, StopRequest, UsageError, autocast, barrier,
                  batches, check, check_ranges, config_from_dict, encode_text, format_score, keep_work_if_stopped,
                  learning_rate, load_checkpoint, load_codes, load_state, load_test, load_train_test, parse_caption,
                  parse_config, parts_in, read_prompts, restore, run_cli, run_config, same_state, save_checkpoint,
                  save_grid, score_report, setup, shapes_size, split_codes, step_generator, warn, warn_if_cut,
                  write_codes, write_config, write_pairs)


@dataclasses.dataclass
class Config:
    train: str = "shapes"  # folder, tar shards or 'shapes[:N]'
    test: str = ""  # held-out images ('': split of --train)
    out: str = "runs/dalle"  # run folder: ckpt, codes, grids
    vqvae: str = ""  # a tokenizer ('': train OUT/vqvae2)
    vqvae_steps: int = 3200  # steps of that tokenizer training
    vqvae_flags: str = ""  # its other vqvae2.py flags, after '='
    codes: str = ""  # codes from vqvae2.py --encode instead
    image_size: int = 32  # side S of the square images
    text_len: int = 48  # T, caption bytes per sequence
    width: int = 128  # C, the transformer's width
    layers: int = 4  # transformer blocks
    heads: int = 4  # H, attention heads per block
    dropout: float = 0.2  # residual dropout (Beyond the paper)
    drop_key: float = 0.2  # DropKey (Beyond the paper)
    appearance: bool = True  # code descriptions (Beyond the paper)
    silhouette: bool = True  # silhouettes too (Beyond the paper)
    code_drop: float = 0.0  # code dropout (Beyond the paper)
    code_noise: float = 0.0  # input codes made random (Beyond the paper)
    summary: bool = True  # pooled caption summary (Beyond the paper)
    adaln: bool = False  # the summary scales every block (Beyond the paper)
    flip: bool = False  # mirrored training images too (Beyond the paper)
    reranker: bool = False  # train a small CLIP to rerank (sec. 2.5)
    steps: int = 1800  # optimizer steps
    batch_size: int = 32  # sequences per step and process
    lr: float = 2e-3  # peak learning rate of AdamW
    warmup: int = 100  # warmup steps, then cosine decay
    compile: bool = False  # torch.compile (CUDA)
    log_every: int = 100  # steps between progress lines
    save_every: int = 600  # steps between evaluations and saves
    device: str = "auto"  # auto, cpu, cuda or mps
    seed: int = 0  # seeds weights, data, dropout, sampling
    resume: bool = False  # continue OUT/ckpt.pt with its flags
    sample: list[str] = dataclasses.field(default_factory=list)  # captions to draw from --ckpt
    prompts: str = ""  # a caption file, one a line ('-': stdin)
    n: int = 8  # images per caption
    keep: int = 0  # keep the M of n ranked best (see --reranker)
    guidance: float = 1.5  # guidance scale s (1: none)
    temperature: float = 0.2  # sampling temperature (Beyond the paper)
    top_k: int = 0  # sample from the k likeliest (0: all)
    top_p: float = 1.0  # nucleus sampling mass (1: all)
    eval: bool = False  # score --ckpt on shapes test captions
    ckpt: str = ""  # checkpoint ('': OUT/ckpt.pt)


def validate(config):
    check_ranges(config, ("vqvae_steps", "text_len", "width", "layers", "heads", "steps", "batch_size", "log_every",
                          "save_every", "n", "lr", "temperature"), ("warmup", "top_k", "guidance", "keep"),
                 ("dropout", "drop_key", "code_drop", "code_noise"))
    check(config.width % config.heads == 0, "--width must be a multiple of --heads")
    check(config.text_len <= 1024, "--text-len must be at most 1024 caption bytes")
    check(config.image_size >= 16 and config.image_size % 8 == 0, "--image-size must be a multiple of 8, >= 16")
    check(0 < config.top_p <= 1, f"--top-p must be in (0, 1], not {config.top_p:g}")
    check(config.keep <= config.n, f"--keep {config.keep} is more than -n {config.n}")
    check(not (config.codes and config.vqvae), "--codes carries its own tokenizer: leave out --vqvae")
    check(not (config.codes and config.flip), "--flip encodes mirrored images; --codes are encoded already")
    check(not (config.flip and shapes_size(config.train)), "--flip: shapes captions name left and right")
    check(config.summary or not config.adaln, "--adaln needs the caption summary (this run has --no-summary)")


# ----------------------------------------------------------------------------------------------------
# The model and its loss (paper sec. 2.2): y = caption bytes, z = image codes, a sequence s = [y ; z_top ; z_bottom]
# Shapes: B batch, T = text_len caption bytes, Nt = Ht*Wt top codes, Nb = Hb*Wb bottom codes,
# L = T + Nt + Nb tokens in a sequence, C width, H heads, K codes in a level's codebook.


class CausalSelfAttention(nn.Module):
    """Multi-head attention of position i to positions <= i; a key/value cache computes each position once."""

    def __init__(self, width, heads, dropout, drop_key):
        super().__init__()
        self.heads, self.dropout, self.drop_key = heads, dropout, drop_key
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x, cache=None, start=0):
        """x (B, L, C) at sequence positions start .. start+L-1; cache = (keys, values), each (B, H, L_max, C/H)."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, L, C)
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, C/H)
        mask = None  # None: plain causal attention (is_causal, below)
        if cache is not None:
            cache[0][:, :, start:start + L], cache[1][:, :, start:start + L] = k, v
            k, v = cache[0][:, :, :start + L], cache[1][:, :, :start + L]  # (B, H, start+L, C/H)
            if start > 0 and L > 1:  # new positions see the whole cache and the new ones up to themselves
                mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)  # (L, start+L)
        if self.training and self.drop_key > 0 and cache is None:  # DropKey, Beyond the paper
            mask = keep_mask((B, self.heads, L, L), self.drop_key, x.device).tril_()  # (B, H, L, L)
            mask.diagonal(dim1=2, dim2=3).fill_(True)  # each query always sees itself
        # softmax(q k^T / sqrt(C/H)) v, the softmax over each query's allowed keys (Vaswani et al. 2017, eq. 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1)  # (B, H, L, C/H)
        return dropout(self.proj(y.transpose(1, 2).reshape(B, L, C)), self.dropout, self.training)  # (B, L, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, heads, dropout, drop_key):
        super().__init__()
        self.norm1, self.norm2, self.dropout = nn.LayerNorm(width), nn.LayerNorm(width), dropout
        self.attention = CausalSelfAttention(width, heads, dropout, drop_key)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, cache=None, start=0, modulation=None):
        """modulation (Beyond the paper, --adaln): (shift, scale, gate) of the attention, then of the MLP, each
        (B, L, C), zero at first: x + (1 + gate) * attention((1 + scale) * LN(x) + shift), the same for the MLP."""
        if modulation is None:
            x = x + self.attention(self.norm1(x), cache, start)  # (B, L, C)
            return x + dropout(self.mlp(self.norm2(x)), self.dropout, self.training)  # (B, L, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        x = x + (1 + gate1) * self.attention(self.norm1(x) * (1 + scale1) + shift1, cache, start)  # (B, L, C)
        return x + (1 + gate2) * dropout(self.mlp(self.norm2(x) * (1 + scale2) + shift2), self.dropout, self.training)


class DALLE(nn.Module):
    """p(s) = prod_i p(s_i | s_<i) over s = [y_1 .. y_T ; z_1 .. z_Nt ; z_Nt+1 .. z_Nt+Nb]: caption bytes, then the top
    and bottom code grids in raster order (the paper: 256 BPE tokens, then 32 x 32 dVAE codes)."""

    def __init__(self, config, top_shape, bottom_shape, top_codebook_size, bottom_codebook_size):
        super().__init__()
        C, T, H = config.width, config.text_len, config.heads
        self.text_len, self.top_count, self.bottom_count = T, math.prod(top_shape), math.prod(bottom_shape)  # Nt, Nb
        self.length = T + self.top_count + self.bottom_count  # L
        vocabularies = (TEXT_VOCAB, top_codebook_size, bottom_codebook_size)  # a part's own embedding, positions, head
        self.text_embedding, self.top_embedding, self.bottom_embedding = (nn.Embedding(V, C) for V in vocabularies)
        self.text_position = nn.Parameter(torch.zeros(T, C))  # learned, one per byte; a row and a column per code:
        self.top_row, self.top_column = (nn.Parameter(torch.zeros(side, C)) for side in top_shape)  # (Ht, C), (Wt, C)
        self.bottom_row, self.bottom_column = (nn.Parameter(torch.zeros(side, C)) for side in bottom_shape)
        self.blocks = nn.ModuleList(Block(C, H, config.dropout, config.drop_key) for _ in range(config.layers))
        self.norm = nn.LayerNorm(C)
        self.text_head, self.top_head, self.bottom_head = (nn.Linear(C, V, bias=False) for V in vocabularies)
        add_code_descriptions(self, config, top_codebook_size, bottom_codebook_size)  # Beyond the paper
        self.summary = CaptionSummary(C) if config.summary else None  # Beyond the paper
        self.modulation = nn.ModuleList(nn.Linear(C, 6 * C) for _ in range(config.layers)) if config.adaln else None
        for name, parameter in self.named_parameters():  # GPT-2 initialisation, as in nanoGPT
            if parameter.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(parameter, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)
        for layer in self.modulation or []:  # zero: each block starts as the plain one (DiT's at the identity)
            nn.init.zeros_(layer.weight)

    def parts(self):
        """(first position, end, input vectors (V, C), output vectors (V, C)) of the text, top and bottom codes."""
        T, Nt = self.text_len, self.top_count
        return ((0, T, self.text_embedding.weight, self.text_head.weight),
                (T, T + Nt, *code_vectors(self, "top")), (T + Nt, self.length, *code_vectors(self, "bottom")))

    def hidden(self, tokens, start=0, cache=None, parts=None):
        """tokens (B, L') at positions start .. start+L'-1, each an id in its part's vocabulary -> (B, L', C)."""
        stop = start + tokens.shape[1]  # each part embeds the tokens at its positions first .. end-1:
        pieces = [F.embedding(tokens[:, max(first, start) - start: end - start], vectors)  # (B, its tokens, C)
                  for first, end, vectors, _ in parts or self.parts() if max(first, start) < min(end, stop)]
        top = (self.top_row[:, None] + self.top_column[None]).flatten(0, 1)  # (Ht, 1, C) + (1, Wt, C) -> (Nt, C)
        bottom = (self.bottom_row[:, None] + self.bottom_column[None]).flatten(0, 1)  # (Nb, C)
        positions = torch.cat([self.text_position, top, bottom])  # (L, C): learned, row + column for the codes
        x = torch.cat(pieces, 1) + positions[start: stop]  # (B, L', C)
        if self.summary is not None and stop >= self.text_len:  # Beyond the paper: s(y) added at positions T-1 ..
            summary = self.summary(tokens[:, :self.text_len]) if start == 0 else cache[-1]  # (B, C), then cached
            x[:, max(self.text_len - 1 - start, 0):] += summary[:, None]  # (B, L', C)
            if cache is not None:
                cache[-1] = summary
        modulations = [None] * len(self.blocks)
        if self.modulation is not None and stop >= self.text_len:  # Beyond the paper: from position T-1 on
            image = (torch.arange(start, stop, device=x.device) >= self.text_len - 1)[:, None].to(x.dtype)  # (L', 1)
            modulations = [(layer(F.silu(summary))[:, None] * image).chunk(6, 2)  # 6 x (B, L', C), see Block
                           for layer in self.modulation]
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache is not None else None, start, modulations[i])
        return self.norm(x)

    def forward(self, tokens):
        """tokens (B, L) -> logits of the next tokens: text (B, T-1, 257), image [(B, Nt, Kt), (B, Nb, Kb)]."""
        parts, T, Nt = self.parts(), self.text_len, self.top_count
        h = self.hidden(tokens[:, :-1], parts=parts)  # (B, L-1, C)
        (_, _, _, text_head), (_, _, _, top_head), (_, _, _, bottom_head) = parts
        return (h[:, :T - 1] @ text_head.T,  # (B, T-1, C) @ (C, 257): predicts tokens 1 .. T-1
                [h[:, T - 1: T - 1 + Nt] @ top_head.T, h[:, T - 1 + Nt:] @ bottom_head.T])  # (B, Nt, K), (B, Nb, K)

    def new_cache(self, batch, device, dtype):
        C, H = self.norm.normalized_shape[0], self.blocks[0].attention.heads
        return [(torch.zeros(batch, H, self.length, C // H, device=device, dtype=dtype),
                 torch.zeros(batch, H, self.length, C // H, device=device, dtype=dtype)) for _ in self.blocks] + [None]


def losses(model, tokens, inputs=None):
    """tokens (B, L) -> (CE_text, scalar; -log p(z_i | y, z_<i) of every image token, (B, Nt + Nb)), in nats.
    Training averages the latter over the batch's B (Nt + Nb) image tokens. `inputs` (B, L), if given, is what
    the model reads in place of tokens (--code-noise); tokens stay the targets."""
    text_logits, image_logits = model(tokens if inputs is None else inputs)  # (B, T-1, 257), [(B, Nt, Kt), ...]
    T = text_logits.shape[1] + 1
    # CE_text = -1/(B (T-1)) sum_b sum_{t=2..T} log p(y_t | y_<t): the mean over the batch's predicted bytes
    text = F.cross_entropy(text_logits.flatten(0, 1).float(), tokens[:, 1:T].flatten())  # (B (T-1), 257) -> scalar
    z = tokens[:, T:].split([logits.shape[1] for logits in image_logits], 1)  # (B, Nt), (B, Nb)
    log_p = torch.cat([logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # (B, N, K) -> (B, N)
                       for logits, targets in zip(image_logits, z)], 1)  # (B, Nt + Nb): log p(z_i | y, z_<i)
    return text, -log_p


# ----------------------------------------------------------------------------------------------------
# Sampling: one code at a time, with classifier-free guidance


def pick(logits, generator, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row from logits (B, K): temperature, then top-k, then top-p (nucleus) filtering."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, K)
        p = sorted_logits.softmax(-1)  # (B, K)
        remove = p.cumsum(-1) - p >= top_p  # the mass before each token; keep the first token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)


@torch.no_grad()
def sample_codes(model, text, generator, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0, cache=True):
    """text (B, T) -> image codes (B, Nt + Nb), one token per step; guided, the rows and their unconditional
    twins (padded captions) run as one batch of 2B. cache=False recomputes the prefix at every step."""
    guided, T, count = guidance != 1.0, model.text_len, model.top_count + model.bottom_count
    sequence = torch.cat([text, torch.full_like(text, PAD)]) if guided else text  # (R, T), R = 2B or B
    kv = model.new_cache(len(sequence), text.device, next(model.parameters()).dtype) if cache else None
    parts = model.parts()  # the code vectors, computed once
    hidden = model.hidden(sequence, 0, kv, parts)[:, -1]  # the caption is computed once: (R, C)
    for i in range(count):
        head = next(head for first, end, _, head in parts if first <= T + i < end)  # E'_k of token T + i: (K, C)
        logits = hidden @ head.T  # (R, C) @ (C, K) -> (R, K) for image token i
        if guided:  # Ho & Salimans eq. 6: uncond + s (cond - uncond), written so that s = 1 gives cond exactly
            conditional, unconditional = logits.chunk(2)  # (B, K) each
            logits = conditional + (guidance - 1) * (conditional - unconditional)  # (B, K)
        token = pick(logits, generator, temperature, top_k, top_p)  # (B,)
        sequence = torch.cat([sequence, (torch.cat([token, token]) if guided else token)[:, None]], 1)  # (R, T+i+1)
        if i + 1 < count:  # the new token's hidden state, from the cache or from the whole sequence again
            new = model.hidden(sequence[:, -1:], T + i, kv, parts) if cache else model.hidden(sequence, parts=parts)
            hidden = new[:, -1]  # (R, C)
    return sequence[:len(text), T:]  # (B, Nt + Nb)


@torch.no_grad()
def to_images(tokenizer, codes):
    """codes (B, Nt + Nb) -> images (B, 3, S, S) in [0, 1] through the VQ-VAE-2 decoder, 256 at a time."""
    return torch.cat([tokenizer.decode(*split_codes(chunk, tokenizer)) for chunk in codes.split(256)])


class Reranker(nn.Module):
    """CLIP (Radford et al. 2021, arXiv:2103.00020), small: an image encoder f and a caption encoder g map to unit
    vectors whose cosine, times a learned scale e^t, scores how well an image fits a caption (paper sec. 2.5)."""

    def __init__(self, width):
        super().__init__()
        layers, channels = [], (3, 32, 64, 128, 128)  # 32 x 32 pixels -> 32, 16, 8, 4
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, 1 if i == 0 else 2, 1), nn.GroupNorm(8, c_out), nn.ReLU()]
        self.image = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, width))  # f
        self.text = CaptionSummary(width)  # g: the caption summary's architecture, its own weights
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # t, CLIP's initial temperature 0.07

    def forward(self, images, text):
        """images (B, 3, S, S) in [0, 1], caption bytes (B, T) -> e^t cos(f(x_i), g(y_j)): (B, B)."""
        if images.shape[-1] > 32:
            images = F.interpolate(images, size=(32, 32), mode="area")  # (B, 3, 32, 32)
        f = F.normalize(self.image(images * 2 - 1), dim=1)  # (B, C)
        g = F.normalize(self.text(text), dim=1)  # (B, C)
        return f @ g.T * self.log_scale.exp().clamp(max=100)  # (B, C) @ (C, B) -> (B, B), e^t capped at 100 as CLIP


def contrastive_loss(logits, text):
    """CLIP's symmetric cross-entropy over a batch's (B, B) image-caption scores, the mean over its 2B rows; pairs
    whose captions are the same bytes (an image twice, or mirrored) are each other's positives, shared evenly."""
    same = (text[:, None] == text[None]).all(-1).float()  # (B, B), symmetric
    target = same / same.sum(1, keepdim=True)  # each row a distribution over its positives
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.float().T, target)) / 2


@torch.no_grad()
def generate(model, tokenizer, captions, config, device, reranker=None):
    """n images per caption (the best `keep` of them with --keep): images, captions, their codes."""
    generator = torch.Generator(device).manual_seed(config.seed)
    text = encode_text([c for c in captions for _ in range(config.n)], model.text_len).to(device)  # (B n, T)
    codes = torch.cat([sample_codes(model, chunk, generator, config.guidance, config.temperature, config.top_k,
                                    config.top_p) for chunk in text.split(256)])  # (B n, Nt + Nb)
    images = to_images(tokenizer, codes)  # (B n, 3, S, S)
    if config.keep:  # reranking (sec. 2.5): the M = keep of each caption's n the reranker scores highest
        score = torch.cat([reranker(x, y).diagonal()  # (256,) each: e^t cos(f(x_i), g(y_i))
                           for x, y in zip(images.split(256), text.split(256))]).view(-1, config.n)  # (B n,) -> (B, n)
        first = torch.arange(len(score), device=device)[:, None] * config.n  # (B, 1): each caption's first sample
        best = score.topk(config.keep, 1).indices + first  # (B, M)
        images, codes = images[best.flatten()], codes[best.flatten()]  # (B M, 3, S, S), (B M, Nt + Nb)
    return images, [c for c in captions for _ in range(config.keep or config.n)], codes


# ====================================================================================================
# Beyond the paper: each addition with a NOTE (what the paper does, what we do, why); README: dalle.py
# NOTE: the paper states no regulariser; we use residual dropout and DropKey (Li et al. 2023, arXiv:2208.02646),
# 0.2 each, without which our model memorises its training codes on shapes. DropKey hides each earlier key from
# a query with probability p; its paper also drops the diagonal and lowers p with depth, we do neither.
# NOTE: the paper trains on 250M pairs; on a small set we can also train on each image's mirror image (--flip, in
# prepare_codes): on Twemoji it lowers the held-out image loss and new names draw their category more often (README).
# NOTE: the paper's blocks read the caption through attention alone; with --adaln, like DiT's adaLN-Zero (Peebles
# & Xie 2023, arXiv:2212.09748), s(y) also sets a shift, scale and gate of each sublayer at the image positions,
# zero at first (Block, hidden). On Twemoji it doubles the caption gap; the accuracy, less than seeds vary (README).
# NOTE: the paper samples at temperature 1; our defaults (temperature 0.2, guidance 1.5) are the best measured on
# shapes, not on real images (README: --guidance 3 --temperature 1 there).
# NOTE: the paper reranks with a CLIP trained on 400M pairs, which we cannot download; --reranker trains a small one
# beside the transformer (train) on the same images, decoded from their codes as samples are, at 32 x 32 pixels.


def keep_mask(shape, p, device):
    """A boolean tensor of `shape`, True with probability 1 - p. NOTE: torch.rand draws one number per element
    on one CPU thread; we cut four 16-bit numbers from each 64-bit draw (p in steps of 2^-16), a faster step."""
    if torch.device(device).type != "cpu":  # GPU generators draw in parallel
        return torch.rand(shape, device=device) >= p
    count = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)  # (ceil(count/4),)
    return bits.view(torch.int16)[:count].view(shape) >= round(p * 2**16) - 2**15  # int16 uniform on [-2^15, 2^15)


def dropout(x, p, training):
    """Dropout (Srivastava et al. 2014): zero each entry with probability p, scale the rest by 1 / (1 - p)."""
    return x * keep_mask(x.shape, p, x.device) / (1 - p) if training and p > 0 else x


def add_code_descriptions(model, config, top_codebook_size, bottom_codebook_size):
    """NOTE: the paper's codes have learned vectors E_k only, which do not say what a code looks like, so a colour never
    seen in a triangle is not drawn in one. We add describe(a_k), an MLP of the mean RGB patch a_k the tokenizer decodes
    where code k sits, and silhouette(m_k), one of its colour-free brightness. Here: the buffers a_k and the MLPs."""
    C = config.width
    model.appearance, model.silhouette = config.appearance, config.appearance and config.silhouette
    model.code_drop = config.code_drop if config.appearance else 0.0  # without descriptions nothing would stand in
    if model.appearance:
        top_patch, bottom_patch = 3 * 8 * 8, 3 * 4 * 4  # vqvae2.py: a top code covers 8 x 8 pixels, a bottom one 4 x 4
        model.register_buffer("top_appearance", torch.zeros(top_codebook_size, top_patch))  # (Kt, 3 8 8)
        model.register_buffer("bottom_appearance", torch.zeros(bottom_codebook_size, bottom_patch))  # (Kb, 3 4 4)
        model.top_describe = nn.Sequential(nn.Linear(top_patch, C), nn.GELU(), nn.Linear(C, C))
        model.bottom_describe = nn.Sequential(nn.Linear(bottom_patch, C), nn.GELU(), nn.Linear(C, C))
    if model.silhouette:
        model.top_silhouette = nn.Sequential(nn.Linear(top_patch // 3, C), nn.GELU(), nn.Linear(C, C))
        model.bottom_silhouette = nn.Sequential(nn.Linear(bottom_patch // 3, C), nn.GELU(), nn.Linear(C, C))


def code_vectors(model, level):
    """A level's input and output code vectors (K, C): E_k + d_k and E'_k + d_k, d_k = describe(a_k) + silhouette(m_k).
    In training E_k and E'_k sit out together with probability code_drop. NOTE: embedding dropout (Gal & Ghahramani
    2016, arXiv:1512.05287) on the learned part only, so that the descriptions must tell the codes apart."""
    E_in, E_out = getattr(model, f"{level}_embedding").weight, getattr(model, f"{level}_head").weight  # (K, C) each
    if model.training and model.code_drop > 0:
        keep = keep_mask((len(E_in), 1), model.code_drop, E_in.device) / (1 - model.code_drop)  # (K, 1)
        E_in, E_out = E_in * keep, E_out * keep  # (K, C) each
    if not model.appearance:
        return E_in, E_out
    appearance = getattr(model, f"{level}_appearance")  # (K, 3 p p)
    description = getattr(model, f"{level}_describe")(appearance)  # (K, C)
    if model.silhouette:
        description = description + getattr(model, f"{level}_silhouette")(brightness(appearance))  # (K, C)
    return E_in + description, E_out + description


def brightness(appearance):
    """m_k: a patch's brightness (the largest of R, G and B) over its brightest pixel's, (K, 3 p p) in [-1, 1]
    -> (K, p p) in [0, 1]; on a black background, the silhouette of what it shows, the same in every colour."""
    value = ((appearance + 1) / 2).unflatten(1, (3, -1)).amax(1)  # (K, 3, p p) -> (K, p p), in [0, 1]
    return value / value.amax(1, keepdim=True).clamp(min=0.05)  # (K, p p); a black patch stays black


@torch.no_grad()
def code_appearance(model, tokenizer, codes, chunk=256):
    """Set a_k: the mean RGB patch in [-1, 1] the tokenizer decodes where code k sits in codes (N, Nt + Nb)."""
    levels = ((model.top_appearance, tokenizer.top_shape), (model.bottom_appearance, tokenizer.bottom_shape))
    sums = [torch.zeros_like(appearance) for appearance, _ in levels]  # (K, 3 p p) each
    counts = [torch.zeros(len(appearance), device=appearance.device) for appearance, _ in levels]  # (K,)
    for piece in codes.split(chunk):
        images = 2 * to_images(tokenizer, piece.to(model.top_appearance.device)) - 1  # (B, 3, S, S) in [-1, 1]
        for (appearance, shape), ids, total, count in zip(levels, split_codes(piece, tokenizer), sums, counts):
            p = tokenizer.image_size // shape[0]  # a code covers p x p pixels
            patches = F.unfold(images, p, stride=p).transpose(1, 2).flatten(0, 1)  # (B, 3 p p, H W) -> (B H W, 3 p p)
            ids = ids.flatten().to(appearance.device).long()  # (B H W,), raster order like unfold's
            total.index_add_(0, ids, patches)
            count.index_add_(0, ids, torch.ones_like(ids, dtype=count.dtype))
    for (appearance, _), total, count in zip(levels, sums, counts):
        appearance.copy_(total / count.clamp(min=1)[:, None])  # a code never used: zeros, a mid-grey patch


def noisy_codes(model, tokens, p, generator):
    """tokens (B, L) with each image code replaced by a uniformly random code of its level with probability p.
    NOTE: the paper reads every code as it is. Like word dropout (Bowman et al. 2016, arXiv:1511.06349) we hide
    input codes (never the targets), a regulariser for small sets: on Twemoji it lowers the held-out image loss and
    lifts the category accuracy of new names at temperature 1 (README: Twemoji)."""
    if p == 0:
        return tokens
    T, Nt, z = model.text_len, model.top_count, tokens[:, model.text_len:]  # z: (B, Nt + Nb)
    replace = torch.rand(z.shape, device=z.device, generator=generator) < p  # (B, Nt + Nb)
    noise = torch.cat([torch.randint(0, embedding.num_embeddings, part.shape, device=z.device, generator=generator)
                       for embedding, part in ((model.top_embedding, z[:, :Nt]), (model.bottom_embedding, z[:, Nt:]))],
                      1)  # (B, Nt + Nb): a top code < Kt, then bottom codes < Kb
    return torch.cat([tokens[:, :T], torch.where(replace, noise, z)], 1)  # (B, L)


class CaptionSummary(nn.Module):
    """Caption bytes (B, T) -> s(y) (B, C): byte embeddings, 1-D convolutions dilated 1, 2, 4, the max over the bytes.
    NOTE: the paper reads a caption by attention alone, which on a small set learns names by heart; s(y), added at
    every image position, holds its words wherever they sit ("... face"), so new names are read. On by default: it
    lifts Twemoji's held-out names by 14 points and shapes' seen pairs by 5, and changes little on Fashion-MNIST."""

    def __init__(self, width):
        super().__init__()
        self.embedding, self.out = nn.Embedding(TEXT_VOCAB, width), nn.Linear(width, width)
        self.convolutions = nn.ModuleList(nn.Conv1d(width, width, 3, padding=d, dilation=d) for d in (1, 2, 4))

    def forward(self, text):
        mask = (text != PAD).unsqueeze(1).float()  # (B, 1, T)
        h = self.embedding(text).transpose(1, 2) * mask  # (B, T, C) -> (B, C, T), pads zero like the convolution's
        for convolution in self.convolutions:
            h = F.relu(convolution(h)) * mask  # pads stay zero, below every ReLU feature
        return self.out(h.amax(2))  # max over the bytes: (B, C)


# ----------------------------------------------------------------------------------------------------
# Training: stages 1 and 2 (tokenizer and codes) when needed, then stage 3, the transformer


OWN_FLAGS = {"train", "test", "out", "image_size", "steps", "device", "seed"}  # the tokenizer's, set by dalle.py's


def tokenizer_flags(config, out):
    """The vqvae2.Config of the tokenizer stage 1 trains in `out`: --vqvae-flags, with dalle.py's own flags for
    the data, image size, steps, device and seed."""
    try:
        flags = shlex.split(config.vqvae_flags)
    except ValueError as error:  # an unclosed quote
        raise UsageError(f"--vqvae-flags {config.vqvae_flags!r}: {error}") from None
    tokenizer_config, given = parse_config(vqvae2.Config, flags, prog="dalle.py --vqvae-flags")
    own = sorted(f"--{name.replace('_', '-')}" for name in given & OWN_FLAGS)
    check(config.resume or not own, f"--vqvae-flags: set {', '.join(own)} by dalle.py's own flags (--train, "
                                    "--test, --out, --image-size, --vqvae-steps, --device, --seed)")
    tokenizer_config = dataclasses.replace(tokenizer_config, train=config.train, test=config.test, out=str(out),
                                           image_size=config.image_size, steps=config.vqvae_steps,
                                           device=config.device, seed=config.seed)
    try:
        vqvae2.validate(tokenizer_config)
    except UsageError as error:
        raise UsageError(f"--vqvae-flags: {error}") from None
    return tokenizer_config


def data_name(name):
    """A --train or --test as the same data whatever the spelling: 'shapes:N' as it is, a path resolved."""
    return name if not name or shapes_size(name) else str(Path(name).resolve())


def starting_stage(config, runtime, stage):
    """Before stage 1 or 2 works: the data is there, and OUT/config.json holds the flags --resume restarts with."""
    check(shapes_size(config.train) or Path(config.train).exists(), f"{config.train}: no such folder")
    if runtime.is_main:
        write_config(config.out, config)
        print(stage, flush=True)


def prepare_codes(config, runtime):
    """Stages 1 and 2, each resumable: the tokenizer in OUT/vqvae2 (or --vqvae), the codes in OUT/codes.pt
    (torchrun: OUT/codes/, a part per rank) or --codes. -> (tokenizer, train and held-out CodesDatasets)."""
    out, path = Path(config.out), Path(config.vqvae or Path(config.out) / "vqvae2" / "ckpt.pt")
    codes_path = Path(config.codes) if config.codes else out / "codes.pt"
    encoded = (out / "codes.pt").is_file() or (out / "codes").is_dir()  # (they carry their tokenizer)
    if not config.codes and not config.vqvae:
        barrier(runtime)
        tokenizer_config = tokenizer_flags(config, path.parent)
        checkpoint = load_checkpoint(path, "vqvae2") if path.exists() else None
        if checkpoint:  # its own flags, with this run's data, folder (it may have been copied) and --vqvae-steps
            made = config_from_dict(vqvae2.Config, checkpoint["config"], vqvae2.validate)
            theirs, ours = ((data_name(c.train), data_name(c.test), c.image_size) for c in (made, config))
            check(config.resume or theirs == ours, f"{path.parent} holds a tokenizer of --train {made.train} --test "
                                                   f"'{made.test}' at {made.image_size} px, not this run's: choose "
                                                   "another --out")
            ignored = [f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(made) if field.name not in
                       OWN_FLAGS | {"resume"} and getattr(made, field.name) != getattr(tokenizer_config, field.name)]
            if ignored and runtime.is_main:
                warn(f"--vqvae-flags {' '.join(ignored)} do not apply: {path} continues with the flags it started with")
            tokenizer_config = dataclasses.replace(made, train=config.train, test=config.test, out=str(path.parent),
                                                   steps=config.vqvae_steps)
        if checkpoint and checkpoint["step"] < tokenizer_config.steps and encoded:
            raise UsageError(f"{out} holds codes its tokenizer made at step {checkpoint['step']}, so --vqvae-steps "
                             f"{tokenizer_config.steps} would train it on: " + (
                                 "the transformer in ckpt.pt learned those codes, start a new run (another --out)"
                                 if (out / "ckpt.pt").exists() else "remove the codes to encode again"))
        if not encoded and (checkpoint is None or checkpoint["step"] < tokenizer_config.steps):
            starting_stage(config, runtime, f"stage 1/3: training the VQ-VAE-2 tokenizer in {path.parent}")
            vqvae2.train(tokenizer_config, runtime, checkpoint)
    if not config.codes:
        barrier(runtime)  # rank 0 has saved the tokenizer before any rank reads it
        if not codes_path.exists() and (runtime.distributed or (out / "codes").is_dir()):
            codes_path = out / "codes"  # a folder of parts: one process or several continue it alike
        count, found = parts_in(codes_path) if codes_path.is_dir() else (0, {})
    if reuse := config.codes or codes_path.is_file() or (count and len(found) == count):
        codes = load_codes(codes_path)
    else:
        starting_stage(config, runtime, f"stage 2/3: encoding the dataset with {path}")
        tokenizer = vqvae2.VQVAE2.from_checkpoint(path, runtime.device)
        splits = load_train_test(config.train, config.test, tokenizer.image_size)
        mirror = ("train",) if config.flip else ()  # Beyond the paper: each training image mirrored, twice the data
        codes = write_codes(tokenizer, dict(zip(("train", "test"), splits)), codes_path, runtime, mirror)
    tokenizer = vqvae2.VQVAE2.from_state(codes["tokenizer"], runtime.device, codes_path)
    if tokenizer.image_size != config.image_size and runtime.is_main:
        warn(f"the tokenizer's images are {tokenizer.image_size} px, so --image-size {config.image_size} does not "
             "apply: the run records its size")
    mirrored = codes["train"].get("mirrored")  # --flip: the training images mirrored too (None: not recorded)
    check(config.codes or mirrored in (None, config.flip),
          f"{codes_path} holds codes encoded {'with' if mirrored else 'without'} --flip, unlike this run: " + (
              "its transformer learned them, start a new run (another --out)" if (out / "ckpt.pt").exists()
              else "remove them, or choose another --out"))
    maker = None if config.codes or not reuse or not path.exists() else load_checkpoint(path, "vqvae2")["model"]
    check(maker is None or same_state(codes["tokenizer"]["model"], maker),
          f"{codes_path} holds codes of another tokenizer than {path}: remove it, or choose another --out")
    return tokenizer, CodesDataset(codes["train"]), CodesDataset(codes["test"])


def parameter_groups(model, weight_decay):
    """AdamW groups as in nanoGPT: matrices and embeddings decay, biases and LayerNorm gains do not."""
    return [dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)]


def train(config, runtime, checkpoint=None):
    out, device = Path(config.out), runtime.device
    check(config.reranker or not config.keep, "--keep ranks samples by the reranker: add --reranker")
    if not (config.codes or config.vqvae):
        tokenizer_flags(config, out)  # --vqvae-flags refused before any stage runs
    tokenizer, train_set, test_set = prepare_codes(config, runtime)  # stages 1 and 2
    check(not checkpoint or same_state(checkpoint["tokenizer"]["model"], {name: value.cpu() for name, value in
                                                                            tokenizer.state_dict().items()}),
          f"{out / 'ckpt.pt'}: its transformer learned the codes of another tokenizer than these: start a new run")
    config = dataclasses.replace(config, image_size=tokenizer.image_size)  # the size of the codes trained on
    torch.manual_seed(config.seed)  # stage 3: the same initial weights whether or not stages 1 and 2 ran here
    model = DALLE(config, tokenizer.top_shape, tokenizer.bottom_shape, tokenizer.top_codebook_size,
                  tokenizer.bottom_codebook_size).to(device)
    if config.appearance and not checkpoint:  # (a checkpoint carries the appearances it was trained with)
        code_appearance(model, tokenizer, train_set.codes)
    reranker = Reranker(config.width).to(device) if config.reranker else None  # after the transformer's weights
    groups = parameter_groups(model, 0.045) + (parameter_groups(reranker, 0.045) if reranker else [])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.96), eps=1e-8,
                                  fused=device.type == "cuda")  # weight decay, betas and eps from the paper (B.2)
    check(not checkpoint or ("reranker" in checkpoint) == config.reranker,
          "--reranker cannot be switched on or off when resuming: start a new run")
    step = restore(checkpoint, config, model, optimizer)  # 0, or --resume's step with its states loaded
    if checkpoint and reranker:
        load_state(reranker, checkpoint["reranker"], out / "ckpt.pt")
    if runtime.is_main:
        extra = f" (reranker {sum(p.numel() for p in reranker.parameters()) / 1e6:.2f}M more)" if reranker else ""
        print(f"stage 3/3: dalle transformer, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
              f"{extra}, sequences of {config.text_len} bytes + {model.top_count} + {model.bottom_count} codes, "
              f"{len(train_set)} training, {len(test_set)} held out, device {device}, "
              f"{runtime.world_size} process(es), from step {step}", flush=True)
    network = torch.compile(model) if config.compile else model
    network = DistributedDataParallel(network) if runtime.distributed else network
    contrast = DistributedDataParallel(reranker) if reranker and runtime.distributed else reranker
    logger, guard = Logger(out, config.steps, step, runtime.is_main, config), NonFiniteGuard()
    data = batches(train_set, config.batch_size, runtime, config.seed, start_step=step)

    def save():
        save_checkpoint(out / "ckpt.pt", "dalle", config, step, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), tokenizer=tokenizer.state(),
                        **(dict(reranker=reranker.state_dict()) if reranker else {}))

    start_time, start_step, paused = time.time(), step, 0.0  # `paused`: evaluation time, left out of the speed
    with StopRequest() as stop:
        while step < config.steps and not stop.requested:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
            generator = step_generator(device, config.seed, runtime.rank, step)
            torch.manual_seed(generator.initial_seed())  # dropout masks: a function of the step, for --resume
            z, captions = next(data)  # (B, Nt + Nb) codes
            y = encode_text(captions, config.text_len).to(device)  # (B, T) caption bytes
            dropped = torch.rand(len(y), device=y.device, generator=generator) < 0.1  # (B,): p_uncond = 0.1 (guidance)
            tokens = torch.cat([torch.where(dropped[:, None], torch.full_like(y, PAD), y), z], 1)  # (B, L)
            with autocast(device):
                text_loss, nll = losses(network, tokens, noisy_codes(model, tokens, config.code_noise, generator))
                image_loss = nll.mean()  # CE_image: the mean over the batch's B (Nt + Nb) image tokens
                loss = 1 / 8 * text_loss + 7 / 8 * image_loss  # paper sec. 2.2, each CE a mean over its tokens
                rerank_loss = contrastive_loss(contrast(to_images(tokenizer, z), y), y) if reranker else 0 * loss
                (loss + rerank_loss).backward()  # the reranker reads the batch's images as decoded (no gradient)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the gradient norm, clipped at 1
            rerank_norm = nn.utils.clip_grad_norm_(reranker.parameters(), 1.0) if reranker else 0 * grad_norm
            if guard.finite(step, loss + rerank_loss, grad_norm + rerank_norm):  # NaN or inf: skipped; the 11th stops
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                speed = ((step - start_step) * config.batch_size * runtime.world_size * (model.length - 1)
                         / (time.time() - start_time - paused))  # tokens per second
                logger.log(step, loss=loss.item(), text_loss=text_loss.item(), image_loss=image_loss.item(),
                           lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm.item(), tokens_per_second=speed,
                           **(dict(rerank_loss=rerank_loss.item()) if reranker else {}))
                logger.progress(step, text=text_loss.item(), image=image_loss.item(), tok_per_s=speed)
            if runtime.is_main and (step % config.save_every == 0 or step == config.steps):
                evaluation_start = time.time()
                evaluate(model.eval(), tokenizer, test_set, config, device, logger, step, reranker)
                model.train()
                save()
                paused += time.time() - evaluation_start
    keep_work_if_stopped(step, config.steps, runtime, save, out)  # Ctrl-C or SIGTERM: save, exit 130
    if runtime.is_main:
        print(f"trained {step - start_step} steps in {time.time() - start_time:.0f} s ({paused:.0f} s evaluating)")
        report(model.eval(), tokenizer, test_set.captions, config, device, out, logger, step, reranker)


@torch.no_grad()
def evaluate(model, tokenizer, test_set, config, device, logger, step, reranker=None):
    """Held-out text and image loss, the image loss a dropped caption adds (the caption gap), a grid; with
    --reranker, how often a caption's best-scored image among 256 held-out ones has its caption."""
    y, z = encode_text(test_set.captions[:256], model.text_len).to(device), test_set.codes[:256].to(device)
    text, nll = losses(model, torch.cat([y, z], 1))  # (256, L) = [y ; z]
    _, nll_dropped = losses(model, torch.cat([torch.full_like(y, PAD), z], 1))  # the same without their captions
    metrics = dict(text_loss=text.item(), image_loss=nll.mean().item(), caption_gap=(nll_dropped - nll).mean().item())
    if reranker:
        best = reranker(to_images(tokenizer, z), y).argmax(0)  # (images, captions) -> each caption's image
        metrics["rerank_accuracy"] = (y[best] == y).all(1).float().mean().item()
    logger.log(step, **{f"test_{key}": value for key, value in metrics.items()})
    print(f"step {step}: held-out text {metrics['text_loss']:.3f}, image {metrics['image_loss']:.3f} "
          f"nats/token, caption gap {metrics['caption_gap']:.3f} nats/image token"
          + (f", reranker top-1 {metrics['rerank_accuracy']:.1%}" if reranker else ""), flush=True)
    write_samples(model, tokenizer, test_set.captions, config, device, Path(config.out) / f"samples_{step:06d}.png")


# ----------------------------------------------------------------------------------------------------
# Sampling and scoring from the command line


def write_samples(model, tokenizer, captions, config, device, path, count=16):
    """A grid of one sample each for up to `count` captions, twice, spread over a split (a folder sorts by class)."""
    picks = dict.fromkeys(captions[int(i)] for i in torch.linspace(0, len(captions) - 1, 4 * count).round())
    captions = [caption for caption in list(picks)[:count] for _ in range(2)]
    images, captions, _ = generate(model, tokenizer, captions, dataclasses.replace(config, n=1, keep=0), device)
    save_grid(images, path, nrow=8, captions=captions)


def report(model, tokenizer, captions, config, device, out, logger=None, step=None, reranker=None):
    """On shapes: the scorer on a sample per caption (--keep M: the M best of n) at guidance 1 and --guidance."""
    if not all(parse_caption(caption) for caption in captions[:20]):
        write_samples(model, tokenizer, captions, config, device, out / "samples.png")
        return print(f"samples for held-out captions: {out / 'samples.png'}")
    for guidance in sorted({1.0, config.guidance}):
        start, scored = time.time(), dataclasses.replace(config, guidance=guidance, n=config.n if config.keep else 1)
        images, labels, _ = generate(model, tokenizer, captions, scored, device, reranker)
        result = score_report(images.cpu(), labels)
        each = f", the best {config.keep} of {config.n} samples of each by the reranker" if config.keep else ""
        print(f"shapes scorer on {len(captions)} test captions{each}, guidance {guidance:g} "
              f"({time.time() - start:.0f} s):\n" + format_score(result))
        if logger:
            logger.log(step, **{f"guidance_{guidance:g}_{name}_all": value["all"] for name, value in result.items()})
        if guidance == config.guidance:
            save_grid(images[:32], out / "samples.png", nrow=8, captions=labels[:32])
            parts = [f"{name.replace('_', '-')} {100 * result[name]['all']:.1f}%" for name in ("seen", "held_out")
                     if name in result]
            print(f"faithfulness (guidance {guidance:g}): {', '.join(parts)}; sample grid: {out / 'samples.png'}")


def sample_or_score(config, given, runtime):
    """--sample and --prompts (a file, one caption a line; '-': standard input): a grid, and a PNG + TXT pair per
    image (`python data.py score` reads them); --eval: the scorer on --test's captions, else the run's own."""
    path, device = Path(config.ckpt or Path(config.out) / "ckpt.pt"), runtime.device
    checkpoint = load_checkpoint(path, "dalle", required=("config", "model", "tokenizer"))
    saved = config_from_dict(Config, checkpoint["config"], validate)
    tokenizer = vqvae2.VQVAE2.from_state(checkpoint["tokenizer"], device, path)
    model = DALLE(saved, tokenizer.top_shape, tokenizer.bottom_shape, tokenizer.top_codebook_size,
                  tokenizer.bottom_codebook_size).to(device)
    load_state(model, checkpoint["model"], path)
    model, out = model.eval(), Path(config.out) if "out" in given else path.parent
    reranker = Reranker(saved.width).to(device) if saved.reranker else None  # no dropout or batch norm: no eval()
    check(reranker or not config.keep, f"--keep ranks samples by the reranker; {path} was trained without --reranker")
    if reranker:
        check("reranker" in checkpoint, f"{path}: incomplete dalle checkpoint (no reranker)")
        load_state(reranker, checkpoint["reranker"], path)
    if not config.sample:  # --eval
        if saved.codes and not config.test:
            check(Path(saved.codes).exists(), f"--eval: the run trained on {saved.codes}, which is gone; pass --test")
            captions = CodesDataset(load_codes(saved.codes)["test"]).captions
        else:
            test_set = load_test(saved.train, config.test or saved.test, tokenizer.image_size)
            captions = getattr(test_set, "captions", None) or [test_set[i][1] for i in range(min(1000, len(test_set)))]
        return report(model, tokenizer, captions, config, device, out, reranker=reranker)
    warn_if_cut(config.sample, model.text_len)
    images, captions, _ = generate(model, tokenizer, config.sample, config, device, reranker)
    write_pairs(out / "samples", images, captions)
    save_grid(images, out / "samples.png", nrow=min(config.keep or config.n, 8), captions=captions)
    print(f"wrote {out / 'samples.png'} and {len(captions)} PNG + TXT pairs in {out / 'samples'}")


def main(argv=None):
    config, given = parse_config(Config, argv, description=__doc__)
    if config.prompts:  # --sample's captions, read from a file
        config.sample = list(config.sample) + read_prompts(config.prompts)
    training = not (config.sample or config.eval)
    config, checkpoint = run_config(config, given, "dalle", validate, training)
    runtime = setup(config.device, config.seed)
    if training:
        return train(config, runtime, checkpoint)
    sample_or_score(config, given, runtime)


if __name__ == "__main__":
    run_cli(main)
