"""data.py: the plumbing every model file shares; copy it together with any one model file.

Sections, in the order a model file meets them: errors and the CLI; images, folders and tar shards; the
`shapes` benchmark and its scorer; byte-level text; dataset preparation (IDX, Twemoji); grids; training
plumbing (datasets, device, torchrun, sampler, checkpoints, --resume, logging); codes, in one file or parts
(vqvae2.py, dalle.py); the judge.
Images are float tensors (B, 3, H, W) in [0, 1]. B batch, C channels, H height, W width, T tokens.

    python data.py shapes OUT_DIR --n 1000 --image-size 32 --seed 0 --split test   # write PNG + TXT pairs
    python data.py score DIR                                                  # score them from pixels
    python data.py idx IMAGES.gz LABELS.gz OUT --names t-shirt,trouser,...    # MNIST-family to folders
    python data.py emoji PACKAGE OUT --image-size 64 --background black       # Twemoji, captioned, split
    python data.py judge train DIR --out JUDGE.pt [--test TEST_DIR]           # a classifier of DIR/<class>/
    python data.py judge score JUDGE.pt SAMPLES --real TEST_DIR [--json]      # class accuracy (by class), FD, floor
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import gzip
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tarfile
import threading
import time
import typing
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, Subset


# ----------------------------------------------------------------------------------------------------
# Errors and the command line


class UsageError(Exception):
    """Bad input from the user (missing folder, wrong checkpoint, nonsense value): one line, exit 2."""


def run_cli(main, argv=None):
    """Run `main(argv)`, then leave torchrun's group. A UsageError or an OSError (an --out that is a file, a
    full disk) becomes one line on stderr and exit status 2, never a traceback; Ctrl-C exits with 130."""
    status, distributed = 0, False
    try:
        try:
            main(argv)
        finally:
            distributed = teardown()
    except (UsageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    if distributed:
        gc.collect()  # the frames of a failed run are free now: see teardown()
    if status:
        sys.exit(status)


_warned: set[str] = set()


def warn(message, key=None):  # each distinct warning (or each key's first) once
    if (key or message) not in _warned:
        _warned.add(key or message)
        print(f"warning: {message}", file=sys.stderr)


def check(condition, message):
    if not condition:
        raise UsageError(message)


def check_ranges(config, positive=(), not_negative=(), fractions=()):
    """Refuse the first Config field out of its range, by its flag: > 0, >= 0, or in [0, 1)."""
    for names, fits, wanted in ((positive, lambda v: v > 0, "positive"), (not_negative, lambda v: v >= 0, "0 or more"),
                                (fractions, lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            value = getattr(config, name)
            check(fits(value), f"--{name.replace('_', '-')} must be {wanted}, not {value:g}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):  # help shows the defaults
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):  # argparse prints usage plus the error; we keep it to one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(config_class, argv=None, description=None, prog=None):
    """An argparse CLI from a Config dataclass: one flag per field, its help the `# comment` after the field.
    Returns the config and the names of the flags given (--resume applies exactly those on top)."""
    types = typing.get_type_hints(config_class)
    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):  # a class built at run time has no source: no help texts
        source = ""
    comments = dict(re.findall(r"(?m)^\s+(\w+)\s*:[^#\n]*#\s*(.*\S)", source))  # {field: its comment}
    if description:  # --help: the docstring's title, papers and usage lines; the rest is for readers of the file
        description = "\n\n".join(part for i, part in enumerate(description.strip().split("\n\n"))
                                  if i == 0 or part.startswith(("Paper", "Usage")))
    parser = _Parser(prog=prog, usage="%(prog)s [options]", description=description,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(config_class):
        flags = ["-" + field.name] * (len(field.name) == 1) + ["--" + field.name.replace("_", "-")]  # n: -n, --n
        kind = types[field.name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        common = dict(default=argparse.SUPPRESS, help=f"{comments.get(field.name, '')} (default: {default!r})"
                      .replace("%", "%%"))
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is list:  # list[str]: --flag A B C
            parser.add_argument(*flags, nargs="+", type=typing.get_args(kind)[0], metavar="TEXT", **common)
        else:
            parser.add_argument(*flags, type=finite_float if kind is float else kind,
                                metavar={int: "N", float: "X"}.get(kind, "TEXT"), **common)
    given = vars(parser.parse_args(argv))  # only the flags actually given
    defaults = config_class()
    for name, value in given.items():  # --out "" would be the current folder: an unset shell variable, likely
        check(value != "" or getattr(defaults, name) == "",
              f"--{name.replace('_', '-')} '': an empty value (leave the flag out for {getattr(defaults, name)!r})")
    return dataclasses.replace(defaults, **given), set(given)


def finite_float(text):
    """The value of a float flag: nan and inf are refused, since no setting means them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def config_from_dict(config_class, values, validate):
    """Rebuild a Config saved in a checkpoint, ignoring fields this version no longer has, and refusing
    values of the wrong type or ones its file's `validate` refuses (a crafted checkpoint: width 0, say)."""
    check(isinstance(values, dict), "a checkpoint whose config is not a dict")
    types = typing.get_type_hints(config_class)
    kept = {key: value for key, value in values.items() if key in types}
    for key, value in kept.items():
        expected = typing.get_origin(types[key]) or types[key]
        check(type(value) is expected or (expected is float and type(value) is int),
              f"a checkpoint whose config has {key} = {str(value)[:40]!r} ({type(value).__name__}, expected "
              f"{expected.__name__})")
    try:
        validate(config := config_class(**kept))
    except UsageError as error:
        raise UsageError(f"a checkpoint whose config is refused: {error}") from None
    return config


# ----------------------------------------------------------------------------------------------------
# Images (any file PIL opens, as RGB, square, image_size), captioned folders of them, and tar shards of them


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def to_rgb(image, background=(0, 0, 0)):
    """Any PIL mode (1, L, LA, P, RGBA, I;16, I, F, CMYK, ...) to 8-bit RGB; alpha over `background`."""
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer or float grey
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")  # a palette's transparent index becomes alpha
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, background)  # black by default, like the shapes background
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image.convert("RGB")


def resize_center_crop(image, size):
    """Resize the shorter side to `size` (bicubic, antialiased), then crop the centre square."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path, image_size=None):
    """Read one image file (the first frame; camera orientation applied) as uint8 (3, H, W); raises if broken."""
    with Image.open(path) as image:
        image.seek(0)
        image.load()  # decodes now, so a truncated file raises here
        image = to_rgb(ImageOps.exif_transpose(image))
    if image_size is not None:
        image = resize_center_crop(image, image_size)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def reason(error):
    """An exception as one short line, for a warning."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def try_load(path, image_size=None):
    """load_image, or None with a warning naming the file when it does not decode (corrupt, truncated)."""
    try:
        return load_image(path, image_size)
    except Exception as error:  # PIL raises many kinds for many formats; skip the file, never stop a long run
        warn(f"skipping {path}: {reason(error)}")


def caption_lines(content, name=None):
    """The non-blank lines of a caption file's bytes (invalid UTF-8 becomes replacement characters; with the
    file's `name` given, a warning says so)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        text = content.decode("utf-8", errors="replace")
        if name:  # the first named: a dataset may hold thousands
            warn(f"{name}: not UTF-8, its undecodable bytes read as U+FFFD (any further such files alike, unnamed)",
                 key="not UTF-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def pick_caption(lines, every=False):
    """One of an image's captions at random (drawn again at every access), or with `every` all, one per line."""
    return "\n".join(lines) if every else random.choice(lines) if lines else ""


class CaptionedImages(Dataset):
    """(image (3, S, S) float in [0, 1], caption str) pairs; a subclass reads item i (`read`), names it (`name`)
    and starts `broken`, an empty set. An item that does not decode joins it, named in a warning once; the next
    one is used."""

    every_caption = False  # see pick_caption

    def __getitem__(self, index):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if i not in self.broken:
                try:
                    image, lines = self.read(i)  # uint8 (3, S, S), caption lines
                    return image.float() / 255.0, pick_caption(lines, self.every_caption)
                except Exception as error:  # corrupt or truncated: skip it, never stop a long run
                    self.broken.add(i)
                    warn(f"skipping {self.name(i)}: {reason(error)}")
        raise UsageError(f"{self.name(0)}: no usable image (every file failed to decode)")


class ImageTextFolder(CaptionedImages):
    """Every image under `root` (recursively). Caption: a random non-blank line of the same-stem `.txt` file; else
    the name of its subfolder of `root` (`red_apple/x.png` -> "red apple"); else ""."""

    def __init__(self, root, image_size):
        self.root, self.image_size, self.broken, self.paths = Path(root), image_size, set(), []
        check(self.root.is_dir(), f"{root}: no such folder")
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            try:  # a cheap look at the header now; full decoding happens on access
                check(path.stat().st_size > 0, "empty file")
                Image.open(path).close()
                self.paths.append(path)
            except Exception as error:  # PIL raises many kinds for many formats; any of them means skip
                warn(f"skipping {path}: {reason(error)}")
        check(self.paths, f"{root}: no usable image found (looked for {', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.paths)

    def name(self, index):
        return self.paths[index]

    def read(self, index):
        return load_image(self.paths[index], self.image_size), self.caption_choices(self.paths[index])

    def caption_choices(self, path):
        """Every caption an image can get: the non-blank lines of its .txt file, else its subfolder's name."""
        text_path = path.with_suffix(".txt")
        if os.path.lexists(text_path):  # a folder, a dangling link or a link loop too: named in a warning, once
            try:
                if lines := caption_lines(text_path.read_bytes(), text_path):
                    return lines
            except OSError as error:
                warn(f"cannot read caption {text_path} ({error.strerror or reason(error)}); it is left out")
        return [path.parent.name.replace("_", " ")] if path.parent != self.root else []


COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def shard_paths(name):
    """The tar files a --train or --test value names (one .tar, or a folder of only .tar files), else None."""
    path = Path(name)
    tars = sorted(child for child in path.iterdir() if not child.name.startswith(".")) if path.is_dir() else [path]
    if not tars or not all(tar.name.endswith((".tar", *COMPRESSED_TAR)) for tar in tars):
        return None
    check(all(tar.suffix == ".tar" for tar in tars),  # compressed: no seeking, so no random access
          f"{name}: compressed shards are not read (samples are read by seeking into the tar); decompress them "
          "first (gunzip X.tar.gz leaves X.tar)")
    check(all(tar.is_file() for tar in tars), f"{name}: no such shard")
    return tars


class ShardDataset(CaptionedImages):
    """The samples of tar shards, in shard order. A sample is the regular files of one tar sharing a KEY (the member
    name up to the first dot of its last part): KEY.png (or .jpg, ...) and its caption KEY.txt, else the name of
    its folder, read as a folder's are (so `tar cf OUT.tar -C FOLDER .` holds what FOLDER does).
    NOTE: WebDataset streams shards (an IterableDataset). We keep where each member's bytes lie, so a sample is
    one seek and the dataset stays map-style: len(), the held-out split and an exact --resume work as for a
    folder. Member names are dictionary keys, never paths; links, folders and devices are skipped."""

    def __init__(self, paths, image_size):
        self.paths, self.image_size, self.broken, self.samples = [str(path) for path in paths], image_size, set(), []
        for shard, path in enumerate(self.paths):
            images, captions = {}, {}  # KEY -> where its bytes lie in the tar, (offset, size)
            try:
                with tarfile.open(path, "r:") as archive:  # "r:": uncompressed only, so seekable
                    for member in archive:
                        folder, slash, base = member.name.rpartition("/")
                        key, _, extension = base.partition(".")
                        extension = "." + extension.lower()
                        places = images if extension in IMAGE_EXTENSIONS else captions if extension == ".txt" else None
                        if places is None and Path(base).suffix.lower() in IMAGE_EXTENSIONS + (".txt",) and key:
                            warn(f"skipping {path}: {member.name!r}, as a KEY ends at the first dot of a name (as in "
                                 "WebDataset): rename it without dots (any further such members alike, unnamed)",
                                 key=f"dotted names in {path}")
                        elif places is not None and not (member.isfile() and (member.size or places is captions)):
                            warn(f"skipping {path}: {member.name!r} is not a regular file, or empty")
                        elif places is not None:
                            places.setdefault(folder + slash + key, (member.offset_data, member.size))
                    if (size := Path(path).stat().st_size) < archive.offset + 1024:  # no end-of-archive blocks
                        images = {key: place for key, place in images.items() if sum(place) <= size}
                        warn(f"{path} ends early (cut short?): reading the {len(images)} complete images in it")
            except (tarfile.TarError, OSError) as error:
                warn(f"skipping the rest of {path}: {reason(error)} (shards are uncompressed tar files)")
            self.samples += [(shard, key, place, captions.get(key)) for key, place in images.items()]
        check(self.samples, f"{self.paths[0]}{' ...' if len(self.paths) > 1 else ''}: no image in "
                            f"{len(self.paths)} shard(s) (looked for KEY.png, KEY.jpg, ...)")

    def __len__(self):
        return len(self.samples)

    def name(self, index):
        shard, key = self.samples[index][:2]
        return f"{self.paths[shard]}: {key!r}"

    def _read(self, shard, place):
        with open(self.paths[shard], "rb") as file:  # opened per read: safe in forked DataLoader workers
            file.seek(place[0])
            content = file.read(place[1])
        if len(content) != place[1]:
            raise OSError(f"the tar ends {place[1] - len(content)} bytes early")
        return content

    def read(self, index):
        shard, key, image_place, caption_place = self.samples[index]
        image = load_image(io.BytesIO(self._read(shard, image_place)), self.image_size)
        try:
            lines = caption_lines(self._read(shard, caption_place), f"{self.paths[shard]}: {key + '.txt'!r}") \
                if caption_place else []
        except OSError as error:
            warn(f"cannot read caption {self.paths[shard]}: {key + '.txt'!r}: {error}")
            lines = []
        return image, lines or [Path(key).parent.name.replace("_", " ")]  # else its folder's name, if any


# ----------------------------------------------------------------------------------------------------
# The `shapes` benchmark: one coloured shape on black, captioned; some colour-shape pairs held out


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255), "orange": (255, 128, 0)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.25, "large": 0.45}  # box side as a fraction of the image side S
POSITIONS = ("top left", "top", "top right", "left", "center", "right",  # row-major 3x3 grid
             "bottom left", "bottom", "bottom right")
HELD_OUT = {("red", "triangle"), ("green", "square"), ("blue", "diamond"), ("white", "circle")}
SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE = 20000, 1000  # what `--train shapes` uses
_CAPTION = re.compile(r"^a (small|large) (\w+) (circle|square|triangle|diamond) at the (.+)$")


def shape_box(size, position, image_size, jitter=(0.0, 0.0)):
    """Integer pixel box (x0, y0, x1, y1), inclusive, of a shape centred on its grid cell."""
    row, col = divmod(POSITIONS.index(position), 3)
    centre_x, centre_y = (col + 0.5) * image_size / 3 + jitter[0], (row + 0.5) * image_size / 3 + jitter[1]
    side = round(SIZES[size] * image_size)
    x0, y0 = round(centre_x - side / 2), round(centre_y - side / 2)
    return x0, y0, x0 + side - 1, y0 + side - 1


def draw_shape(draw, shape, box, fill):
    x0, y0, x1, y1 = box
    middle_x, middle_y = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # apex up
        draw.polygon([(middle_x, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond: the midpoints of the box's sides
        draw.polygon([(middle_x, y0), (x1, middle_y), (middle_x, y1), (x0, middle_y)], fill=fill)


def render_shape(colour, shape, size, position, image_size=32, jitter=(0.0, 0.0)):
    """One shapes image as a PIL RGB image (black background, no antialiasing)."""
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw_shape(ImageDraw.Draw(image), shape, shape_box(size, position, image_size, jitter), COLOURS[colour])
    return image


def make_shapes(n, image_size=32, seed=0, split="train"):
    """Deterministic shapes data: uint8 images (n, 3, S, S), captions, held-out flags. The train split never
    holds a HELD_OUT colour-shape pair; in the test split odd items are held-out pairs, even ones seen pairs."""
    check(split in ("train", "test"), f"unknown split {split!r} (train or test)")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    seen, held_out = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT], sorted(HELD_OUT)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    captions, flags = [], [split == "test" and i % 2 == 1 for i in range(n)]
    for i in range(n):
        pairs = held_out if flags[i] else seen
        colour, shape = pairs[rng.integers(len(pairs))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        jitter = rng.uniform(-1.0, 1.0, size=2)  # each centre moves by up to 1 px
        images[i] = np.asarray(render_shape(colour, shape, size, position, image_size, jitter))
        captions.append(f"a {size} {colour} {shape} at the {position}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions, flags  # (n, 3, S, S)


class ShapesDataset(Dataset):
    """The shapes benchmark in memory: (image (3, S, S) float in [0, 1], caption)."""

    def __init__(self, n, image_size=32, seed=0, split="train"):
        self.images, self.captions, self.held_out = make_shapes(n, image_size, seed, split)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index):
        return self.images[index].float() / 255.0, self.captions[index]


def parse_caption(caption):
    """'a large red circle at the top left' -> dict(size, colour, shape, position), or None."""
    match = _CAPTION.match(caption.strip().lower())
    if match and match[2] in COLOURS and match[4] in POSITIONS:
        return dict(size=match[1], colour=match[2], shape=match[3], position=match[4])


@lru_cache(maxsize=8192)
def _template(shape, size, x0, y0, image_size):
    """Boolean mask (S, S) of `shape` drawn with its box's top-left corner at (x0, y0)."""
    side = round(SIZES[size] * image_size)
    image = Image.new("L", (image_size, image_size), 0)
    draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + side - 1, y0 + side - 1), 255)
    return np.asarray(image) > 0


STRAY_PIXELS = 2  # a clean shape: at most this many pixels disagree with its template off the outline


def read_shape(image):
    """Colour, shape, size and position of the one object in an (S, S, 3) image, from pixels alone; None if blank.
    Foreground: brightest channel >= 128. Colour: majority vote of the nearest palette colour. Shape and size:
    the best IoU against exact renderings of every (shape, size) placed around the foreground's centroid.
    Position: the grid cell of that template's box centre. `stray`: pixels where foreground and template
    disagree, off the template's outline (within 1 px of its edge, where blur and noise move it)."""
    pixels = np.asarray(image, dtype=np.float32)  # (S, S, 3) in [0, 255]
    image_size = pixels.shape[0]
    mask = pixels.max(axis=2) >= 128
    if not mask.any():
        return None
    palette = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
    distances = ((pixels[mask][:, None, :] - palette[None, :, :]) ** 2).sum(-1)  # (N_fg, 8)
    colour = list(COLOURS)[np.bincount(distances.argmin(1), minlength=len(COLOURS)).argmax()]
    ys, xs = np.nonzero(mask)
    best = (-1.0, None)
    for shape in SHAPES:
        for size in SIZES:
            drawn_y, drawn_x = np.nonzero(_template(shape, size, 0, 0, image_size))  # a triangle's centroid sits low
            base_x, base_y = round(xs.mean() - drawn_x.mean()), round(ys.mean() - drawn_y.mean())
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    template = _template(shape, size, base_x + dx, base_y + dy, image_size)
                    iou = np.logical_and(template, mask).sum() / max(np.logical_or(template, mask).sum(), 1)
                    if iou > best[0]:
                        best = (iou, (shape, size, base_x + dx, base_y + dy))
    iou, (shape, size, x0, y0) = best
    template = np.pad(_template(shape, size, x0, y0, image_size), 1)  # (S + 2, S + 2)
    windows = [template[dy: dy + image_size, dx: dx + image_size] for dy in range(3) for dx in range(3)]
    outline = np.logical_or.reduce(windows) & ~np.logical_and.reduce(windows)  # dilated minus eroded, (S, S)
    stray = int(((mask ^ template[1:-1, 1:-1]) & ~outline).sum())
    side = round(SIZES[size] * image_size)
    col = min(max(int((x0 + side / 2) // (image_size / 3)), 0), 2)
    row = min(max(int((y0 + side / 2) // (image_size / 3)), 0), 2)
    return dict(colour=colour, shape=shape, size=size, position=POSITIONS[3 * row + col], iou=float(iou), stray=stray)


def score_shapes(images, captions):
    """Fraction of images (N, 3, S, S), float in [0, 1] or uint8, whose colour, shape, size and position match
    their caption, and `all` four. `clean`: the fraction read as one cleanly drawn shape (at most STRAY_PIXELS
    stray pixels); a shape counts as right only when clean. An unparseable caption counts as a miss."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, 3, S, S) -> (N, S, S, 3)
    keys = ("colour", "shape", "size", "position")
    hits = {key: 0 for key in (*keys, "all", "clean")}
    for image, caption in zip(pixels, captions, strict=True):
        target, found = parse_caption(caption), read_shape(image)
        if found is not None:
            hits["clean"] += (clean := found["stray"] <= STRAY_PIXELS)
            matches = [target is not None and found[key] == target[key] and (clean or key != "shape") for key in keys]
            for key, match in zip((*keys, "all"), (*matches, all(matches))):
                hits[key] += match
    n = max(len(captions), 1)
    return {key: value / n for key, value in hits.items()} | {"n": len(captions)}


def is_held_out(caption):
    parsed = parse_caption(caption)
    return parsed is not None and (parsed["colour"], parsed["shape"]) in HELD_OUT


def score_report(images, captions):
    """score_shapes overall and separately for seen and held-out colour-shape pairs."""
    report = {"overall": score_shapes(images, captions)}
    for name, wanted in (("seen", False), ("held_out", True)):
        if chosen := [i for i, caption in enumerate(captions) if is_held_out(caption) == wanted]:
            report[name] = score_shapes(torch.as_tensor(images)[chosen], [captions[i] for i in chosen])
    return report


def read_pairs(folder, image_size=None):
    """The NAME.png + NAME.txt pairs under `folder` (from --sample or `data.py shapes`): uint8 images
    (N, 3, H, W) and the first line of each caption. A broken image is skipped with a warning."""
    check(Path(folder).is_dir(), f"{folder}: no such folder")
    images, captions = [], []
    for path in sorted(Path(folder).rglob("*.png")):
        if path.with_suffix(".txt").is_file() and (image := try_load(path, image_size)) is not None:
            images.append(image)
            captions.append((caption_lines(path.with_suffix(".txt").read_bytes(), path.with_suffix(".txt")) or [""])[0])
    check(images, f"{folder}: no PNG + TXT pairs to score")
    check(len({tuple(image.shape) for image in images}) == 1, f"{folder}: images differ in size")
    return torch.stack(images), captions


def format_score(report):
    return "\n".join(f"{name:9s} n={score['n']:<5d} " + "  ".join(
        f"{key} {100 * score[key]:5.1f}%" for key in ("all", "colour", "shape", "size", "position", "clean"))
        for name, score in report.items())


# ----------------------------------------------------------------------------------------------------
# Byte-level text: UTF-8 bytes 0..255 plus one pad id; any language, never an error


PAD = 256  # the pad id after the 256 byte values
TEXT_VOCAB = 257


def encode_text(captions, length):
    """Captions to a (B, length) long tensor of UTF-8 byte values, padded with PAD, truncated."""
    tokens = torch.full((len(captions), length), PAD, dtype=torch.long)  # (B, T)
    for i, caption in enumerate(captions):
        data = caption.encode("utf-8", errors="replace")[:length]  # lone surrogates become '?'
        tokens[i, : len(data)] = torch.tensor(list(data), dtype=torch.long)
    return tokens


def read_prompts(path, flag="--prompts "):
    """The captions of a prompt file, one a non-blank line ('-': standard input)."""
    check(path == "-" or Path(path).is_file(), f"{flag}{path}: no such file")
    captions = caption_lines(sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes(), path)
    check(captions, f"{flag}{path}: no captions in it")
    return captions


def warn_if_cut(captions, length):
    """Say which captions are longer than the `length` bytes a model reads (it sees their start only)."""
    for caption in captions:
        size = len(caption.encode("utf-8", errors="replace"))
        if size > length:
            shown = repr(caption[:40]) + ("..." if len(caption) > 40 else "")
            warn(f"the model reads the first {length} bytes of {shown} only ({size} bytes)")


# ----------------------------------------------------------------------------------------------------
# Dataset preparation: MNIST-family IDX files; Twemoji (npm pack emoji-datasource-twitter@16.0.0; tar xzf it)


def read_idx(path):
    """An IDX file (gzip or plain) of unsigned bytes as a numpy array with the dimensions it declares."""
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise UsageError(f"{path}: cannot read ({error})") from None
    check(len(data) >= 4 and data[:3] == b"\x00\x00\x08", f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    check(len(data) == 4 + 4 * ndim + math.prod(dims), f"{path}: size does not match its header {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_to_folder(images_path, labels_path, out, names):
    """Write OUT/<class name>/<index>.png, so the folder name becomes each image's caption."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    check(images.ndim == 3 and labels.ndim == 1 and len(images) == len(labels),
          f"{images_path}, {labels_path}: expected N images (N, H, W) and N labels")
    check(int(labels.max()) < len(names), f"labels go up to {labels.max()} but only {len(names)} names given")
    folders = [re.sub(r"[^\w\-]+", "_", name.strip()) for name in names]
    check(all(folders), f"--names {','.join(names)!r}: a class without a name")
    for folder in set(folders):
        (Path(out) / folder).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, "L").save(Path(out) / folders[label] / f"{i:05d}.png")
    return len(images)


def emoji_to_folder(package, out, size=64, background="black", test_fraction=0.1):
    """Write OUT/{train,test}/<category>/<stem>.png (alpha over `background`) + <stem>.txt (the emoji's name,
    then its short names) from PACKAGE/emoji.json and img/twitter/64/. Test: a hash of the name falls in the
    first `test_fraction`, and no caption line is a train emoji's (captions new to a model). Black by default:
    Twemoji have no outlines and are mostly bright, so 585 of 1,911 lose their edge on white, 149 on black.
    Skin tones are left out (1,875 near-copies). Returns ({(split, category): count}, the number skipped)."""
    package, out = Path(package), Path(out)
    check(package.is_dir(), f"{package}: no such folder")
    check((package / "emoji.json").is_file(), f"{package}: no emoji.json (unpack emoji-datasource-twitter there)")
    check(8 <= size <= 1024 and 0 <= test_fraction < 1, "--image-size from 8 to 1024, --test-fraction in [0, 1)")
    check(not out.is_dir() or not any(out.iterdir()), f"{out}: not empty (a new split would mix with the old)")
    try:
        entries = json.loads((package / "emoji.json").read_bytes())
    except ValueError as error:
        raise UsageError(f"{package / 'emoji.json'}: not JSON ({error})") from None
    check(isinstance(entries, list) and all(isinstance(entry, dict) for entry in entries),
          f"{package / 'emoji.json'}: not a list of emoji")
    colour = {"black": (0, 0, 0), "white": (255, 255, 255)}[background]
    kept, skipped = [], 0  # (image, path, category, caption lines, held out)
    for entry in entries:
        path = package / "img" / "twitter" / "64" / str(entry.get("image"))
        name = str(entry.get("name") or "").lower()
        try:
            check(entry.get("has_img_twitter") and name and path.is_file(), "no image")
            with Image.open(path) as image:
                image = resize_center_crop(to_rgb(image, colour), size)  # composite first: no dark fringes
        except Exception:  # no image, or one that does not decode: counted in the final line
            skipped += 1
            continue
        lines = [name] + [short.replace("_", " ").lower() for short in entry.get("short_names") or []]
        category = re.sub(r"[^a-z0-9]+", "-", str(entry.get("category")).lower()).strip("-")
        digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
        kept.append((image, path, category, list(dict.fromkeys(lines)), digest < test_fraction * 2 ** 64))
    test, moved = {i for i, item in enumerate(kept) if item[4]}, True
    while moved:  # a test emoji sharing a caption line with a train one ('kiss', of 'kiss mark') moves to train
        seen = {line for i, item in enumerate(kept) if i not in test for line in item[3]}
        test -= (moved := {i for i in test if not seen.isdisjoint(kept[i][3])})
    counts = {}
    for i, (image, path, category, lines, _) in enumerate(kept):
        folder = out / ("test" if i in test else "train") / category
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{path.stem}.png")
        (folder / f"{path.stem}.txt").write_text("".join(f"{line}\n" for line in lines))
        counts[folder.parent.name, category] = counts.get((folder.parent.name, category), 0) + 1
    return counts, skipped


# ----------------------------------------------------------------------------------------------------
# Grids


def save_grid(images, path, nrow=8, captions=None, padding=2):
    """Save (N, 3, H, W) images in [0, 1] as one PNG, `nrow` per row, captions written under them."""
    def wrap(text, font, width):
        """`text` in lines at most `width` pixels wide (a longer word gets a line of its own)."""
        lines = []
        for word in text.split():
            if lines and font.getlength(f"{lines[-1]} {word}") <= width:
                lines[-1] += f" {word}"
            else:
                lines.append(word)
        return lines

    images = torch.as_tensor(images).detach().float().clamp(0, 1).cpu()
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (N, H, W, 3)
    scale = max(1, math.ceil(96 / images.shape[3])) if captions else 1  # room for a caption under small images
    tile_w, tile_h = images.shape[3] * scale, images.shape[2] * scale
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [wrap(caption, font, tile_w) for caption in captions] if captions else [[]] * len(images)
    cell_w, cell_h = tile_w + padding, tile_h + max(map(len, wrapped), default=0) * line_h + padding
    grid = Image.new("RGB", (min(nrow, len(images)) * cell_w + padding,
                             math.ceil(len(images) / nrow) * cell_h + padding), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(pixels):
        x, y = padding + i % nrow * cell_w, padding + i // nrow * cell_h
        grid.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + tile_h + j * line_h), line, fill=(255, 255, 255), font=font)
    atomic_write(path, lambda file: grid.save(file, format="PNG"))


def write_pairs(folder, images, captions, names=None):
    """Images (N, 3, S, S) in [0, 1] as FOLDER/NAME.png + caption FOLDER/NAME.txt (NAME 0000, 0001, ... unless
    `names` are given): the pairs that `data.py score` and `data.py judge score` read. Numbered pairs of an
    earlier call are removed first, so that the folder holds this call's alone."""
    if not names and Path(folder).is_dir():
        earlier = [path for path in Path(folder).glob("*.png") if re.fullmatch(r"\d{4,}", path.stem)
                   and path.is_file() and path.with_suffix(".txt").is_file()]  # NNNN.png + NNNN.txt, as written here
        for path in earlier:
            path.unlink()
            path.with_suffix(".txt").unlink()
        if earlier:
            print(f"removed the {len(earlier)} NNNN.png + NNNN.txt pairs an earlier call wrote in {folder}")
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        name = names[i] if names else f"{i:04d}"
        save_grid(image[None], Path(folder) / f"{name}.png", nrow=1, padding=0)  # image[None]: (1, 3, S, S)
        atomic_write(Path(folder) / f"{name}.txt", lambda file: file.write(caption.encode("utf-8", errors="replace")))


# ----------------------------------------------------------------------------------------------------
# Training plumbing: datasets by name, device, torchrun, sampler, schedule; atomic checkpoints and an exact
# --resume; the training loop's Ctrl-C, non-finite steps and metrics log


def shapes_size(name):
    """'shapes' -> SHAPES_TRAIN_SIZE training images, 'shapes:N' -> N (the first N of one deterministic sequence;
    the test split is the same for every N); any other --train name -> None."""
    if match := re.fullmatch(r"shapes(?::(\d+))?", name):
        size = int(match[1]) if match[1] else SHAPES_TRAIN_SIZE
        check(0 < size <= 1_000_000, f"{name}: shapes:N renders N images in memory; N from 1 to 1,000,000")
        return size


def load_dataset(name, image_size, split="train"):
    """'shapes' or 'shapes:N' (that split, rendered in memory), tar shards (see shard_paths) or a folder."""
    if size := shapes_size(name):
        return ShapesDataset(size if split == "train" else SHAPES_TEST_SIZE, image_size, split=split)
    shards = shard_paths(name)
    return ShardDataset(shards, image_size) if shards else ImageTextFolder(name, image_size)


def load_test(train, test, image_size, test_size=1000):
    """The held-out set alone (for evaluating a checkpoint): see load_train_test."""
    if test or shapes_size(train):
        return load_dataset(test or train, image_size, split="test")
    return load_train_test(train, test, image_size, test_size)[1]


def load_train_test(train, test, image_size, test_size=1000):
    """The training set and a held-out set: `test` if given; else the shapes test split (half of it unseen
    colour-shape pairs); else a fixed random 5% (at most `test_size`) of the training images, kept out of training."""
    dataset = load_dataset(train, image_size, split="train")
    if test or shapes_size(train):
        return dataset, load_dataset(test or train, image_size, split="test")
    if len(dataset) < 20:
        warn(f"{train}: fewer than 20 images, so the held-out figures use the training images")
        return dataset, dataset
    held = min(test_size, len(dataset) // 20)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return Subset(dataset, order[held:]), Subset(dataset, order[:held])


def spread_batch(dataset, count):
    """`count` items spread evenly over a dataset (a sorted folder groups its classes), as (images, captions)."""
    count = min(count, len(dataset))
    items = [dataset[int(i)] for i in torch.linspace(0, len(dataset) - 1, count).round()]
    return torch.stack([image for image, _ in items]), [caption for _, caption in items]


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        self.is_main, self.distributed = self.rank == 0, self.world_size > 1  # rank 0 writes; several processes


def setup(device="auto", seed=0):
    """Pick the device (cuda, then mps, then cpu), join torchrun's group (gloo on CPU, nccl on CUDA), seed every
    generator, and enable TF32 on CUDA."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    check(0 <= seed < 10**8, f"--seed {seed}: use 0 to 99999999")  # step_generator's seeds stay below 2**64
    mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    check(kind in ("cpu", "cuda", "mps"), f"--device {device}: use auto, cpu, cuda, cuda:N or mps")
    check(kind != "cuda" or torch.cuda.is_available(), f"--device {device}: no CUDA device is available")
    check(kind != "mps" or mps, f"--device {device}: MPS is not available")
    if device == "cuda":  # set_device needs an index: plain 'cuda' is GPU 0, or under torchrun LOCAL_RANK's
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) if world_size > 1 else 0}"
    if (device := torch.device(device)).type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    for seed_all in (random.seed, np.random.seed, torch.manual_seed):  # DDP copies rank 0's initial weights
        seed_all(seed + rank)
    return Runtime(device, rank, world_size)


def barrier(runtime):
    if runtime.distributed:
        dist.barrier()


def broadcast_from_first_rank(*tensors):  # under torchrun, copy rank 0's tensors to every rank, in place
    for tensor in tensors if dist.is_initialized() else ():
        dist.broadcast(tensor, 0)


def teardown():
    """Leave torchrun's process group. NOTE: DDP sits in a reference cycle, so uncollected its gradient reducer
    is freed at interpreter exit, racing gloo's threads: 15 of 30 two-process runs aborted (SIGABRT) after
    finishing under torch 2.13; collecting first gave 0 of 40. Without a group there is no race, and no collection
    (a full one takes about 0.1 s once torch is loaded). -> whether a group was left."""
    if not dist.is_initialized():
        return False
    gc.collect()
    dist.destroy_process_group()
    return True


def autocast(device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 for these models)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class InfiniteSampler(Sampler):
    """Endless shuffled indices: epoch e is a permutation seeded by (seed, e); rank r of W takes every W-th.
    `start` counts the indices this rank already consumed. NOTE: DistributedSampler's role, but endless and
    step-based, so an exact --resume is a matter of one number."""

    def __init__(self, size, seed=0, rank=0, world_size=1, start=0):
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self.per_rank = max(size // world_size, 1)

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            order = order[self.rank::self.world_size][: self.per_rank] if self.size >= self.world_size else order
            yield from order[offset:].tolist()
            offset, epoch = 0, epoch + 1


def batches(dataset, batch_size, runtime, seed=0, start_step=0):
    """An endless iterator of (images, captions) batches for this rank, resuming at `start_step`."""
    sampler = InfiniteSampler(len(dataset), seed, runtime.rank, runtime.world_size, start_step * batch_size)
    in_memory, cuda = isinstance(dataset, ShapesDataset), runtime.device.type == "cuda"
    workers = min(8, os.cpu_count() or 1) if cuda and not in_memory else 0
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=cuda, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone
    iterator = iter(loader)
    for step in itertools.count(start_step):  # an image's caption, of several: a function of (seed, rank, step)
        random.seed((seed * 1000 + runtime.rank) * 100_000_000 + step)
        images, captions = next(iterator)
        yield images.to(runtime.device, non_blocking=True), list(captions)


def step_generator(device, seed, rank, step):
    """The generator of one step of one rank: its noise depends on (seed, rank, step) only, so --resume is exact."""
    return torch.Generator(device).manual_seed((seed * 1000 + rank) * 100_000_000 + step)


def learning_rate(step, total_steps, peak, warmup):
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to peak/10 at `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def atomic_write(path, write):
    """write(file) into `.NAME.tmp` beside `path`, fsync, rename over `path`: a crash leaves the old or new file.
    NOTE: one fixed temporary name per target, so a killed write leaves at most one, which the next write of that
    target overwrites; no two processes write one target (rank 0 writes checkpoints, each rank its own parts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # only left if writing failed (a full disk, say)


def keep_work_if_stopped(step, steps, runtime, save, out):
    """After a training loop that StopRequest ended before `steps`: save (rank 0), then exit with 130."""
    if step < steps:
        if runtime.is_main:
            save()
            print(f"stopped: saved {Path(out) / 'ckpt.pt'} at step {step}; continue with --resume")
        raise KeyboardInterrupt


def load_run(config, given, kind, validate, build, key="model", name="ckpt.pt"):
    """For --sample and --eval: build(saved config) with the weights `key` of --ckpt (default OUT/NAME), in eval
    mode; the saved Config; the folder to write in (--out when given, else the checkpoint's)."""
    path = Path(config.ckpt or Path(config.out) / name)
    checkpoint = load_checkpoint(path, kind, required=("config", key))
    saved = config_from_dict(type(config), checkpoint["config"], validate)
    model = build(saved)
    load_state(model, checkpoint[key], path)
    return model.eval(), saved, Path(config.out) if "out" in given else path.parent


def save_checkpoint(path, kind, config, step, **state):
    """Atomically save plain data only: `kind`, the config as a dict, the step, the states (model=..., ...)."""
    payload = dict(kind=kind, config=dataclasses.asdict(config), step=step, **state)
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path, kind, required=("config", "model", "step")):
    """Load a checkpoint without running code (weights_only=True); refuse other models' and incomplete ones."""
    check(Path(path).is_file(), f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        with open(path, "rb") as file:  # a torch.save zip or a binary pickle; else an image renamed, say
            header = file.read(2)
        if "Unsupported operand" in str(error) and header[:1] != b"\x80" and header != b"PK":
            raise UsageError(f"{path}: not a readable checkpoint (neither a torch.save file nor a pickle)") from None
        raise UsageError(f"{path}: refused, it holds Python objects that could run code "
                         "(only plain-data checkpoints are loaded)") from None
    except Exception as error:  # cut short, empty, not a checkpoint: the error's kind and first sentence
        with open(path, "rb") as file:
            header = file.read(2)
        detail = ": ".join([type(error).__name__] + [line.split(". ")[0] for line in str(error).splitlines()[:1]])
        if header[:1] != b"\x80" and header != b"PK":  # empty, or a text file, say: no error of torch's to show
            detail = "an empty file" if not header else "neither a torch.save file nor a pickle"
        raise UsageError(f"{path}: not a readable checkpoint ({detail})") from None
    found = checkpoint.get("kind", "unknown") if isinstance(checkpoint, dict) else "unknown"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    check(found in kinds, f"{path}: this is a {str(found)[:40]} checkpoint, not a {' or '.join(kinds)} checkpoint")
    kind = found  # the kind it is, for the messages below
    check(not (missing := [key for key in required if key not in checkpoint]),
          f"{path}: incomplete {kind} checkpoint (no {', '.join(missing)})")
    check(isinstance(checkpoint.get("config", {}), dict) and type(checkpoint.get("step", 0)) is int,
          f"{path}: a malformed {kind} checkpoint (its config is not a dict or its step not an integer)")
    return checkpoint


def restore(checkpoint, config, model, optimizer):
    """The step a run starts at: 0, or with --resume the checkpoint's, after loading its model and optimizer."""
    if not checkpoint:
        return 0
    load_state(model, checkpoint["model"], Path(config.out) / "ckpt.pt")
    optimizer.load_state_dict(checkpoint["optimizer"])
    check(checkpoint["step"] < config.steps,
          f"the checkpoint is at step {checkpoint['step']} already; pass a larger --steps")
    return checkpoint["step"]


def load_state(module, state, path):
    """load_state_dict with a one-line error when the shapes do not match."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        detail = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise UsageError(f"{path}: does not fit this model ({detail[-1] if detail else error})") from None


def run_config(config, given, kind, validate, training, required=("config", "model", "step")):
    """The config a command runs with, and the checkpoint it continues (None for a new run). --resume continues
    OUT/ckpt.pt (or --ckpt) with its saved config; the flags given with it go on top and are printed. `kind`: the
    checkpoint kind, or a tuple of them (one file writes several). Logger writes the run's flags to config.json."""
    validate(config)
    out = Path(config.out)
    if not config.resume:
        check(not training or "ckpt" not in given, "--ckpt names a checkpoint to sample, evaluate, encode with or "
              "--resume; a new run starts from scratch in --out")
        check(not training or not (out / "ckpt.pt").exists(),
              f"{out / 'ckpt.pt'} exists: continue it with --resume, or choose another --out")
        return warn_if_no_peak(config, training), None
    if not config.ckpt and not (out / "ckpt.pt").exists() and (out / "config.json").is_file():
        # stopped before its first checkpoint (dalle.py: in stage 1 or 2): start again with its flags
        try:
            values = json.loads((out / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{out / 'config.json'}: unreadable ({error})") from None
        check(isinstance(values, dict) and set(values) == {field.name for field in dataclasses.fields(config)},
              f"{out / 'config.json'}: the flags of another model's run (or another version's): start it again "
              "without --resume")
        checkpoint, saved = None, config_from_dict(type(config), values, validate)
    else:
        check(config.ckpt or (out / "ckpt.pt").exists() or not out.is_dir(),
              f"{out} holds no ckpt.pt (stopped before its first checkpoint?): start it again without --resume")
        checkpoint = load_checkpoint(config.ckpt or out / "ckpt.pt", kind, required)
        saved = config_from_dict(type(config), checkpoint["config"], validate)
    config = dataclasses.replace(saved, **{name: getattr(config, name) for name in given})
    validate(config)
    changed = [f"--{name.replace('_', '-')} {getattr(config, name)} (was {getattr(saved, name)})"
               for name in sorted(given - {"resume", "out", "ckpt"}) if getattr(config, name) != getattr(saved, name)]
    if os.environ.get("RANK", "0") == "0":
        print(f"resuming {config.out} from step {checkpoint['step'] if checkpoint else 0} with the flags it was "
              "started with" + (f", except {', '.join(changed)}" if changed else ""), flush=True)
    return warn_if_no_peak(config, training), checkpoint


def warn_if_no_peak(config, training):  # a run shorter than its warmup never trains at --lr
    if training and getattr(config, "warmup", 0) > config.steps:
        warn(f"--warmup {config.warmup} is longer than --steps {config.steps}: the learning rate never reaches --lr")
    return config


class StopRequest:
    """SIGINT and SIGTERM become a flag the training loop checks between steps: no checkpoint mid-update."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only it may set handlers; others leave them
            self.previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("stopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exception):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class NonFiniteGuard:
    """Leaves out the update of a step whose loss or gradient norm is not finite and puts the buffers of `modules`
    (batch-norm statistics, EMA codebooks) back as remember() copied them; the step still uses up its batch,
    learning rate and noise, so --resume stays exact. After `limit` such steps in this process, the next stops the
    run (one line, exit 2; the last checkpoint is kept). Under torchrun every rank skips the same steps."""

    def __init__(self, *modules, limit=10):
        self.modules, self.limit, self.skipped, self.saved = modules, limit, 0, []

    def buffers(self):
        return [buffer for module in self.modules for buffer in module.buffers()]

    def remember(self):
        """Copy the modules' buffers; call it before each step's forward pass."""
        self.saved = [buffer.clone() for buffer in self.buffers()]

    @torch.no_grad()
    def finite(self, step, *values):
        """True when every value (tensors on one device) is finite; else restore the buffers, warn and return
        False, or stop. `step` counts the steps before this one; messages say step + 1, as the logs do."""
        bad = torch.stack([~torch.isfinite(value).all() for value in values]).any().float()
        if dist.is_initialized():
            dist.all_reduce(bad)
        if not bad.item():
            return True
        for buffer, saved in zip(self.buffers(), self.saved):
            buffer.copy_(saved)
        self.skipped += 1
        shown = ", ".join(f"{value.float().item():.4g}" if value.numel() == 1 else "..." for value in values)
        problem = f"step {step + 1}: the loss or gradient norm is not finite ({shown})"
        check(self.skipped <= self.limit, f"{problem} after {self.limit} skipped steps; stopped without saving, so "
                                          "the last checkpoint is kept (try a lower --lr, or look for bad data)")
        if not dist.is_initialized() or dist.get_rank() == 0:
            warn(f"{problem}; its update is skipped ({self.skipped} of at most {self.limit})")
        return False


def _record_step(line):
    """The step of one metrics.jsonl line; infinity (never kept) for a blank line or one cut short by a crash."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    return record.get("step", 0) if isinstance(record, dict) else math.inf


def write_config(out, config):
    """The run's flags as OUT/config.json: what --resume starts again from when no checkpoint was saved yet."""
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out) / "config.json", lambda file: file.write(json.dumps(dataclasses.asdict(config),
                                                                                indent=1).encode()))


class Logger:
    """Metrics as OUT/metrics.jsonl (rank 0 only) and a progress line with step, loss, it/s and ETA; the run's flags
    (`config`) as OUT/config.json. On resume the records after the checkpoint's step and any line cut short are
    dropped, so metrics.jsonl reads as if never stopped, and config.json holds the flags as resumed."""

    def __init__(self, out, total_steps, start_step=0, enabled=True, config=None):
        self.total_steps, self.enabled = total_steps, enabled
        self.last_step, self.last_time, self.start_time = start_step, time.time(), time.time()
        self.path = Path(out) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and config:
            write_config(out, config)
        if enabled and self.path.exists():  # resuming: forget what ran after the checkpoint
            lines = self.path.read_text(errors="replace").splitlines()
            kept = [line for line in lines if _record_step(line) <= start_step]
            atomic_write(self.path, lambda file: file.write("".join(f"{line}\n" for line in kept).encode()))

    def log(self, step, **metrics):
        if self.enabled:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": step, "time": round(time.time() - self.start_time, 2),
                                       **metrics}) + "\n")

    def progress(self, step, **metrics):
        now = time.time()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        if self.enabled:
            values = " | ".join(f"{key} {value:.4g}" for key, value in metrics.items())
            eta = int((self.total_steps - step) / max(rate, 1e-9))
            eta = f"{eta // 3600}h{eta % 3600 // 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"
            print(f"step {step}/{self.total_steps} | {values} | {rate:.2f} it/s | ETA {eta}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Codes: a dataset encoded by a tokenizer (vqvae2.py), in one file or, under torchrun, a folder of parts


CODES = "vqvae2-codes"  # the kind of a codes file or part: dict(tokenizer, train, test[, part, parts])


@torch.no_grad()
def encode_split(tokenizer, dataset, indices, device, batch_size=500, mirror=False):
    """The codes and captions of dataset[i], i in `indices`: dict(top (N, Ht, Wt), bottom (N, Hb, Wb), captions);
    an image's captions all, one per line (CodesDataset draws one at every access). mirror: then the same images
    mirrored left to right, after them (2N in all), and `mirrored` says so."""
    levels = [[torch.zeros(0, *shape, dtype=torch.int16)] for shape in (tokenizer.top_shape, tokenizer.bottom_shape)]
    captions, base = [], getattr(dataset, "dataset", dataset)  # a Subset's dataset
    for flip, first in [(flip, first) for flip in range(1 + mirror) for first in range(0, len(indices), batch_size)]:
        base.every_caption = True
        try:
            items = [dataset[index] for index in indices[first: first + batch_size]]
        finally:  # the dataset draws one caption again, even after a failed read
            base.every_caption = False
        images = torch.stack([image for image, _ in items])  # (B, 3, S, S)
        for level, ids in zip(levels, tokenizer.encode((images.flip(-1) if flip else images).to(device))):
            level.append(ids.to(torch.int16).cpu())
        captions += [caption for _, caption in items]
    return dict(top=torch.cat(levels[0]), bottom=torch.cat(levels[1]), captions=captions, mirrored=bool(mirror))


def write_codes(tokenizer, splits, out, runtime, mirror=()):
    """Encode splits {name: dataset} into one codes file `out`; under torchrun, or into a folder already there, into
    a folder of parts OUT/part-INDEX-of-COUNT.pt, each a contiguous run of each split. Every rank writes its parts
    (rank, rank + W, ...); COUNT: the parts already there, else the processes, so any number of them continues a
    stopped job by writing the missing ones. The splits named in `mirror` get their mirror images too (dalle.py
    --flip). -> the codes (load_codes)."""
    out, state = Path(out), tokenizer.state()

    def encode(part, count):
        return dict(kind=CODES, tokenizer=state, **{name: encode_split(tokenizer, dataset, part_indices(
            dataset, part, count), runtime.device, mirror=name in mirror) for name, dataset in splits.items()})

    if not (in_parts := runtime.distributed or out.is_dir()):
        codes = encode(0, 1)
        atomic_write(out, lambda file: torch.save(codes, file))
    else:
        check(not out.is_file(), f"--out {out} is a file; under torchrun --encode writes a folder of parts")
        if runtime.is_main:
            out.mkdir(parents=True, exist_ok=True)
        barrier(runtime)
        count, found = parts_in(out)
        count = count or runtime.world_size
        if found:  # one part read is enough: load_codes checks that they all agree
            first = load_checkpoint(next(iter(found.values())), CODES, ("tokenizer",))
            check(same_state(first["tokenizer"], state), f"{out}: its parts were made by another tokenizer; remove "
                                                         "them or choose another --out")
            check(all(first.get(name, {}).get("mirrored") in (None, name in mirror) for name in splits),
                  f"{out}: its parts were encoded {'without' if mirror else 'with'} mirrored images (dalle.py --flip); "
                  "remove them or choose another --out")
        for part in range(runtime.rank, count, runtime.world_size):
            if not (path := out / f"part-{part:05d}-of-{count:05d}.pt").exists():  # else written whole earlier
                codes = dict(encode(part, count), part=part, parts=count)
                atomic_write(path, lambda file: torch.save(codes, file))
        # NOTE: the wait for the other ranks' parts watches the folder instead of calling dist.barrier(), which
        # NCCL gives up on after 10 minutes: a rank with nothing left to redo may wait for a whole part.
        waited = 0
        while (there := len(parts_in(out)[1])) < count:
            time.sleep(1)
            waited += 1
            if waited % 60 == 0:  # a slow rank and a dead one on another machine look alike: say what it waits for
                print(f"rank {runtime.rank}: waiting for the other ranks' parts in {out} ({there} of {count} there)",
                      flush=True)
        codes = load_codes(out)  # every part there, all from one tokenizer: this one
    if runtime.is_main:
        print(f"codes: {len(codes['train']['captions'])} train, {len(codes['test']['captions'])} held out"
              f"{f', in {parts_in(out)[0]} parts' if in_parts else ''} -> {out}")
    return codes


def part_indices(dataset, part, count):
    """The indices of `dataset` in part `part` of `count`: a contiguous run (on shards, mostly whole shards)."""
    return [i for i in range(len(dataset)) if count * i // len(dataset) == part]


def parts_in(folder):
    """(count, {index: path}) of the part files part-INDEX-of-COUNT.pt in a folder; (0, {}) if none."""
    found = {}
    for path in Path(folder).glob("part-*-of-*.pt"):
        if match := re.fullmatch(r"part-(\d+)-of-(\d+)\.pt", path.name):
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    check(len(found) <= 1, f"{folder}: holds parts of {len(found)} encodings "
                           f"(of {' and of '.join(map(str, sorted(found)))} parts); keep one set")
    count, found = next(iter(found.items()), (0, {}))
    return count, {index: path for index, path in found.items() if index < count}


def load_codes(path):
    """A codes file, or a folder of its parts (checked complete and made by one tokenizer, joined in order).
    -> dict(kind, tokenizer, train, test), each split dict(top (N, Ht, Wt), bottom (N, Hb, Wb), captions, and
    mirrored: whether its second half is the first mirrored, None when the codes do not say)."""
    if not Path(path).is_dir():
        codes = load_checkpoint(path, CODES, required=("tokenizer", "train", "test"))
        check("parts" not in codes, f"{path}: one part of {str(codes.get('parts'))[:20]}; pass the folder of them all")
        return codes
    count, found = parts_in(path)
    check(count, f"{path}: no codes in it (part-00000-of-00002.pt, ... from vqvae2.py --encode under torchrun)")
    missing = [index for index in range(count) if index not in found]
    check(not missing, f"{path}: incomplete, {len(found)} of {count} parts (missing: {str(missing)[1:-1][:40]}); "
                       "run the encoding again to write the missing ones")
    parts = [load_checkpoint(found[index], CODES, ("tokenizer", "train", "test")) for index in range(count)]
    for index, part in enumerate(parts):
        check(part.get("part") == index and part.get("parts") == count,
              f"{found[index]}: its contents are not part {index} of {count}")
        check(same_state(part["tokenizer"], parts[0]["tokenizer"]),
              f"{found[index]}: made by another tokenizer than {found[0].name}; write the folder again")
    try:  # each split's tensors concatenated along dim 0, its captions chained
        mirrored = {split: {part[split].get("mirrored") for part in parts} for split in ("train", "test")}
        check(all(len(values) == 1 for values in mirrored.values()),
              f"{path}: its parts mix mirrored and plain images (dalle.py --flip); write the folder again")
        return dict(kind=CODES, tokenizer=parts[0]["tokenizer"], **{split: dict({
            key: torch.cat([part[split][key] for part in parts]) if key != "captions" else
            [caption for part in parts for caption in part[split][key]] for key in ("top", "bottom", "captions")},
            mirrored=mirrored[split].pop()) for split in ("train", "test")})
    except (KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise UsageError(f"{path}: malformed parts ({type(error).__name__}: {reason(error)})") from None


def same_state(a, b):
    """Whether two plain-data states (a tokenizer's config and weights, say) are equal, tensors bit for bit."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[key], b[key]) for key in a)
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


class CodesDataset(Dataset):
    """One split of a codes file as (top and bottom codes flattened into one (Ht Wt + Hb Wb,) tensor, caption): one
    of the image's captions at random. `captions`: the first of each image's (its name, in a Twemoji folder)."""

    def __init__(self, split):
        self.codes = torch.cat([split["top"].flatten(1), split["bottom"].flatten(1)], 1).long()  # (N, Ht Wt + Hb Wb)
        self.lines = [caption.split("\n") for caption in split["captions"]]
        self.captions = [lines[0] for lines in self.lines]

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, index):
        return self.codes[index], random.choice(self.lines[index])


def split_codes(codes, tokenizer):
    """(B, Ht Wt + Hb Wb) -> top (B, Ht, Wt), bottom (B, Hb, Wb)."""
    top_size = tokenizer.top_shape[0] * tokenizer.top_shape[1]
    return codes[:, :top_size].view(-1, *tokenizer.top_shape), codes[:, top_size:].view(-1, *tokenizer.bottom_shape)


# ----------------------------------------------------------------------------------------------------
# Judge: an in-domain classifier for class accuracy and Fréchet distance


@dataclasses.dataclass
class JudgeConfig:
    classes: list[str] = dataclasses.field(default_factory=list)  # class (folder) names, label 0 first
    image_size: int = 32  # side S the images are resized to


def validate_judge(config):
    check_judge_size(config.image_size)
    check(len(config.classes) >= 2, f"a judge needs 2 classes or more, not {len(config.classes)}")


def check_judge_size(image_size):
    check(8 <= image_size <= 512, f"a judge reads images of 8 to 512 px, not --image-size {image_size}")


class Judge(torch.nn.Module):
    """A small CNN classifier of one dataset's class folders: its accuracy on samples says whether they show
    the class their caption names; the Fréchet distance of its penultimate features is an in-domain FID (as
    papers use for MNIST-like data), NOT comparable with Inception FIDs. Compare it with the floor (real vs real)."""

    def __init__(self, config):
        super().__init__()
        w, layers = 32, []  # channels 32, 64, 128, 128
        for c_in, c_out, stride in ((3, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 4 * w, 2)):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(c_out),
                       torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # (B, 128)
        self.head = torch.nn.Linear(4 * w, len(config.classes))

    def forward(self, images):
        """(B, 3, S, S) in [0, 1] -> logits (B, classes), penultimate features (B, 128)."""
        features = self.body(images * 2 - 1)
        return self.head(features), features

    @torch.no_grad()
    def judge(self, images, device, batch_size=256):
        """uint8 images (N, 3, S, S) -> logits (N, classes), features (N, 128) on the CPU, in evaluation mode."""
        outputs = [self.eval()(images[i: i + batch_size].to(device).float() / 255)
                   for i in range(0, len(images), batch_size)]
        return [torch.cat(parts).cpu() for parts in zip(*outputs)]


def read_labelled(folder, image_size, classes=None):
    """FOLDER/<class>/<image> as uint8 images (N, 3, S, S), labels (N,), class names and each image's caption
    lines. `classes` (a judge's) fixes the labels: a subfolder of another name is refused."""
    dataset = ImageTextFolder(folder, image_size)  # refuses a missing or empty folder; warns on bad headers
    paths = [path for path in dataset.paths if path.parent != dataset.root]
    check(paths, f"{folder}: no class subfolders (expected {folder}/<class name>/<image>)")
    if len(paths) < len(dataset.paths):
        warn(f"{folder}: {len(dataset.paths) - len(paths)} image(s) outside a class subfolder are left out")
    found = sorted({path.relative_to(dataset.root).parts[0] for path in paths})
    classes = classes or found
    check(set(found) <= set(classes), f"{folder}: subfolder(s) {sorted(set(found) - set(classes))[:3]} are "
                                      "not classes of this judge")
    images, labels, captions = [], [], []
    for path in paths:
        if (image := try_load(path, image_size)) is not None:
            images.append(image)
            labels.append(classes.index(path.relative_to(dataset.root).parts[0]))
            captions.append(dataset.caption_choices(path))
    check(images, f"{folder}: no usable image")
    return torch.stack(images), torch.tensor(labels), classes, captions


def frechet_distance(a, b):
    """Between Gaussians fitted to features a (N, F) and b (M, F), in float64:
    FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), where Tr (S1 S2)^(1/2) = Tr (R S2 R)^(1/2) with
    R = S1^(1/2): R S2 R is symmetric, so both roots come from eigendecompositions (no scipy)."""
    check(len(a) >= 2 and len(b) >= 2, "the Fréchet distance needs at least 2 images on each side")
    a, b = a.double(), b.double()
    s1, s2 = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (F, F), also for F = 1
    values, vectors = torch.linalg.eigh(s1)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T  # S1^(1/2)
    cross = torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()  # Tr (S1 S2)^(1/2)
    return max(float((a.mean(0) - b.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * cross), 0.0)  # >= 0


def train_judge(args):
    check(args.epochs > 0 and args.steps >= 0 and args.batch_size > 0, "--epochs and --batch-size must be "
                                                                       "positive, --steps not negative")
    check_judge_size(args.image_size)  # before any image is read
    check(not Path(args.out).exists(), f"{args.out} exists: choose another --out, or remove it to train it again")
    runtime = setup(args.device, args.seed)
    images, labels, classes, _ = read_labelled(args.folder, args.image_size)
    if args.test:
        test_images, test_labels, _, _ = read_labelled(args.test, args.image_size, classes)
    else:  # a fixed 10% of the folder, the same for every --seed
        check(len(images) >= 10, f"{args.folder}: fewer than 10 images to train on and hold out (give --test)")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        held, order = order[: len(images) // 10], order[len(images) // 10:]
        test_images, test_labels, images, labels = images[held], labels[held], images[order], labels[order]
    validate_judge(config := JudgeConfig(classes, args.image_size))
    model = Judge(config).to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.steps or args.epochs * math.ceil(len(images) / args.batch_size)
    sampler, logger = iter(InfiniteSampler(len(images), args.seed)), Logger(Path(args.out).parent, steps)
    for step in range(steps):
        index = torch.tensor([next(sampler) for _ in range(args.batch_size)])  # (B,)
        optimizer.param_groups[0]["lr"] = learning_rate(step, steps, 2e-3, min(100, steps // 10))
        logits, _ = model.train()(images[index].to(runtime.device).float() / 255)
        loss = torch.nn.functional.cross_entropy(logits, labels[index].to(runtime.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(steps // 10, 1) == 0:
            logger.progress(step + 1, loss=loss.item())
    accuracy, train_accuracy = ((model.judge(x, runtime.device)[0].argmax(1) == y).double().mean().item()
                                for x, y in ((test_images, test_labels), (images, labels)))
    save_checkpoint(args.out, "judge", config, steps, model=model.state_dict(), accuracy=accuracy,
                    train_accuracy=train_accuracy)
    hint = " (under 90%: give it more --epochs)" if train_accuracy < 0.9 else ""
    print(f"held-out accuracy {100 * accuracy:.1f}% on {len(test_images)} images ({len(classes)} classes); on its "
          f"{len(images)} training images {100 * train_accuracy:.1f}%{hint}; wrote {args.out}")


def score_judge(args):
    def class_key(text):
        """'Ankle_boot', 'ankle-boot', 'ankle boot' -> 'ankleboot': how a caption is compared with class names."""
        return re.sub(r"[\s_\-]+", "", text).casefold()

    runtime = setup(args.device, 0)
    saved = load_checkpoint(args.judge, "judge")
    config = config_from_dict(JudgeConfig, saved["config"], validate_judge)
    model = Judge(config).to(runtime.device)
    load_state(model, saved["model"], args.judge)
    samples, captions = read_pairs(args.samples, config.image_size)
    real, real_labels, classes, real_captions = read_labelled(args.real, config.image_size, config.classes)
    owners = {}  # a caption line of a real image -> the classes of the real images with that line
    for lines, label in zip(real_captions, real_labels.tolist()):
        for line in lines:
            owners.setdefault(class_key(line), set()).add(label)
    named = {key: min(labels) for key, labels in owners.items() if len(labels) == 1}  # one class only
    named |= {class_key(name): i for i, name in enumerate(classes)}  # a class name wins over a caption
    wanted = torch.tensor([named.get(class_key(caption), -1) for caption in captions])  # (N,), -1: no class
    logits, features = model.judge(samples, runtime.device)  # (N, classes), (N, 128)
    real_logits, real_features = model.judge(real, runtime.device)
    named = wanted >= 0  # (N,)
    hits, named_wanted = (logits.argmax(1) == wanted)[named], wanted[named]  # (n named,) each
    by_class = {classes[c]: (hits[named_wanted == c].double().mean().item(), int((named_wanted == c).sum()))
                for c in named_wanted.unique().tolist()}  # class -> (accuracy, samples)
    caption_hits = {}  # a caption -> whether any of its samples is judged its class (what a reranker could pick)
    for caption, hit in zip(itertools.compress(captions, named.tolist()), hits.tolist()):
        caption_hits[caption] = caption_hits.get(caption, False) or hit
    # the floor: as many real images as samples against the other real ones, or half against half
    n, floor_n = len(samples), min(len(samples), len(real) // 2)
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    floor, reference = order[:floor_n], order[floor_n:]
    report = dict(samples=n, unnamed=n - len(hits), class_accuracy=hits.double().mean().item() if len(hits) else None,
                  real_accuracy=(real_logits.argmax(1) == real_labels).double().mean().item(),
                  class_accuracy_by_class={name: accuracy for name, (accuracy, _) in by_class.items()},
                  captions_with_a_hit=sum(caption_hits.values()) / len(caption_hits) if caption_hits else None,
                  fd=frechet_distance(features, real_features[reference]), reference=len(reference),
                  floor=frechet_distance(real_features[floor], real_features[reference]), floor_n=len(floor))
    unnamed = sorted({repr(caption[:40]) for caption, label in zip(captions, wanted.tolist()) if label < 0})
    print(json.dumps(report) if args.json else "\n".join([
        f"samples         {n}, {n - len(hits)} of them with a caption naming no class"
        + (f" ({', '.join(unnamed[:3])}{', ...' * (len(unnamed) > 3)})" if unnamed else ""),
        "class accuracy  " + (f"{100 * report['class_accuracy']:.1f}% of {len(hits)}" if len(hits) else "-")
        + f" (the judge on the {len(real)} real images: {100 * report['real_accuracy']:.1f}%)",
        "  by class      " + (", ".join(f"{name} {100 * accuracy:.1f}% of {count}" for name, (accuracy, count)
                                       in sorted(by_class.items(), key=lambda item: -item[1][1])) or "-"),
        "  by caption    " + (f"{100 * report['captions_with_a_hit']:.1f}% of {len(caption_hits)} captions have a "
                              "sample of their class (the most a reranker keeping one could score)"
                              if caption_hits else "-"),
        f"FD              {report['fd']:.3f} (the samples against {len(reference)} real images)",
        f"floor           {report['floor']:.3f} ({len(floor)} other real images against the same {len(reference)})"]))


def nearest_samples(args):
    """A reference for `judge score`: for each caption of PROMPTS, the -n training images whose captions share the
    most words with it, weighted by rarity (cosine of TF-IDF word counts), written as --sample writes its images.
    It is what a model that copied training images by caption would score; it draws nothing new."""
    check(args.n > 0 and args.image_size >= 8, "-n must be positive and --image-size at least 8")
    check(args.prompts == "-" or Path(args.prompts).is_file(), f"{args.prompts}: no such caption file")
    dataset, prompts = ImageTextFolder(args.folder, args.image_size), read_prompts(args.prompts, flag="captions file ")

    def vector(text, idf):  # word -> TF-IDF weight, of unit length
        counts = {word: text.count(word) * idf.get(word, 0.0) for word in set(text)}
        norm = math.sqrt(sum(weight * weight for weight in counts.values())) or 1.0
        return {word: weight / norm for word, weight in counts.items()}

    texts = [re.findall(r"\w+", " ".join(dataset.caption_choices(path)).casefold()) for path in dataset.paths]
    document_frequency = collections.Counter(word for text in texts for word in set(text))
    idf = {word: math.log(len(texts) / count) for word, count in document_frequency.items()}
    vectors = [vector(text, idf) for text in texts]
    images, captions = [], []
    for caption in prompts:
        query = vector(re.findall(r"\w+", caption.casefold()), idf)
        similarity = torch.tensor([sum(query.get(word, 0.0) * weight for word, weight in v.items()) for v in vectors])
        ranked = (try_load(dataset.paths[i], args.image_size)  # most similar first; ties in the folder's order
                  for i in similarity.argsort(descending=True, stable=True).tolist())
        picked = list(itertools.islice((image for image in ranked if image is not None), args.n))  # broken: skipped
        images += [image.float() / 255 for image in picked]
        captions += [caption + "\n"] * len(picked)
    write_pairs(args.out, torch.stack(images), captions)
    print(f"wrote {len(images)} training images for {len(prompts)} captions to {args.out}")


# ----------------------------------------------------------------------------------------------------
# Command line: python data.py shapes|score|idx|emoji|judge


def main(argv=None):
    parser = _Parser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    shapes = commands.add_parser("shapes", help="write the shapes benchmark as NAME.png + NAME.txt pairs")
    shapes.add_argument("out", help="output folder")
    shapes.add_argument("--n", type=int, default=1000, help="number of images")
    shapes.add_argument("--image-size", "--size", dest="size", type=int, default=32, help="image side S in pixels")
    shapes.add_argument("--seed", type=int, default=0, help="random seed")
    shapes.add_argument("--split", choices=("train", "test"), default="train",
                        help="train never holds the held-out colour-shape pairs; test alternates seen/held-out")
    score = commands.add_parser("score", help="score a folder of PNG + TXT pairs with the shapes scorer")
    score.add_argument("folder", help="folder of NAME.png + NAME.txt (caption) pairs")
    idx = commands.add_parser("idx", help="turn MNIST-family IDX files into a captioned folder")
    idx.add_argument("images", help="IDX images file (.gz or plain)")
    idx.add_argument("labels", help="IDX labels file (.gz or plain)")
    idx.add_argument("out", help="output folder: OUT/<class name>/<index>.png")
    idx.add_argument("--names", default=",".join(map(str, range(10))), help="class names, label 0 first")
    emoji = commands.add_parser("emoji", help="Twemoji (npm emoji-datasource-twitter) to captioned train/test folders")
    emoji.add_argument("package", help="the unpacked npm package: emoji.json and img/twitter/64/*.png")
    emoji.add_argument("out", help="output folder: OUT/{train,test}/<category>/<stem>.png + .txt")
    emoji.add_argument("--image-size", "--size", dest="size", type=int, default=64, help="image side S in pixels")
    emoji.add_argument("--background", choices=("black", "white"), default="black",
                       help="colour under the alpha; black keeps the bright, outline-free Twemoji legible")
    emoji.add_argument("--test-fraction", type=finite_float, default=0.1, help="share of names held out")
    judge = commands.add_parser("judge", help="an in-domain classifier: class accuracy and Fréchet distance")
    actions = judge.add_subparsers(dest="action", required=True)
    judge_train = actions.add_parser("train", help="train on DIR/<class>/<image>")
    judge_train.add_argument("folder", help="folder of class subfolders (a caption .txt beside an image is ignored)")
    judge_train.add_argument("--out", default="judge.pt", help="checkpoint to write")
    judge_train.add_argument("--test", default="", help="held-out folder of the same classes (else 10%% of FOLDER)")
    judge_train.add_argument("--image-size", type=int, default=32, help="side S images are resized to")
    judge_train.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    judge_train.add_argument("--steps", type=int, default=0, help="training steps (0: from --epochs)")
    judge_train.add_argument("--batch-size", type=int, default=64, help="images per step")
    judge_train.add_argument("--seed", type=int, default=0, help="random seed")
    judge_score = actions.add_parser("score", help="score a --sample folder: class accuracy, by class too, and FD")
    judge_score.add_argument("judge", help="checkpoint written by `judge train`")
    judge_score.add_argument("samples", help="folder of NNNN.png + NNNN.txt (caption) pairs")
    judge_score.add_argument("--real", required=True, help="real images, TEST_DIR/<class name>/<image>")
    judge_score.add_argument("--json", action="store_true", help="print the figures as one JSON line instead")
    judge_nearest = actions.add_parser("nearest", help="a reference: training images of the most similar captions")
    judge_nearest.add_argument("folder", help="captioned training images")
    judge_nearest.add_argument("prompts", help="a caption file, one a line")
    judge_nearest.add_argument("out", help="folder for NNNN.png + NNNN.txt pairs, as --sample writes them")
    judge_nearest.add_argument("-n", type=int, default=4, help="images per caption")
    judge_nearest.add_argument("--image-size", type=int, default=32, help="side S images are resized to")
    for action in (judge_train, judge_score):
        action.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    if args.command in ("emoji", "shapes", "idx"):  # before any work: where the images go must be a folder
        check(not Path(args.out).is_file(), f"{args.out} is a file: the images go into a folder")
    if args.command == "judge":
        {"train": train_judge, "score": score_judge, "nearest": nearest_samples}[args.action](args)
    elif args.command == "emoji":
        counts, skipped = emoji_to_folder(args.package, args.out, args.size, args.background, args.test_fraction)
        for category in sorted({category for _, category in counts}):
            train, test = (counts.get((split, category), 0) for split in ("train", "test"))
            print(f"{category:20} train {train:5}  test {test:4}")
        train, test = (sum(n for (split, _), n in counts.items() if split == s) for s in ("train", "test"))
        print(f"wrote {train + test} emoji to {args.out}: train {train}, test {test}; skipped {skipped} "
              f"(no Twitter image, or its file missing or unreadable); skin-tone variations left out")
    elif args.command == "shapes":
        check(args.n > 0 and args.size >= 16, "--n must be positive and --image-size at least 16")
        images, captions, held_out = make_shapes(args.n, args.size, args.seed, args.split)
        write_pairs(args.out, images / 255, [caption + "\n" for caption in captions],
                    [f"{i:05d}_{'heldout' if flag else 'seen'}" for i, flag in enumerate(held_out)])
        print(f"wrote {args.n} images to {Path(args.out)}")
    elif args.command == "score":
        images, captions = read_pairs(args.folder)
        height, width = images.shape[2:]
        check(height == width >= 16, f"{args.folder}: the scorer reads square images of 16 px or more, not {width} x "
                                     f"{height}")
        print(format_score(score_report(images, captions)))
    else:
        count = idx_to_folder(args.images, args.labels, args.out, args.names.split(","))
        print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    run_cli(main)
