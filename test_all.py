"""Tests for data.py and every model file. CPU only, a few minutes on 2 cores: pytest test_all.py"""

import dataclasses
import gzip
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvae
import dalle
import data
import dcgan
import vae
import vqvae2


# ----------------------------------------------------------------------------------------------------
# Shared helpers: command lines, tiny datasets and shards, torchrun, kills, the judge's fixtures


ROOT = Path(__file__).resolve().parent


def decode_text(tokens):
    """Inverse of data.encode_text: (B, T) -> captions (pads dropped, a cut character replaced)."""
    return [bytes(t for t in row if t < 256).decode("utf-8", errors="replace")
            for row in torch.as_tensor(tokens).tolist()]


def run(*args, cwd=None, env=None):

    """Run a command line with this Python; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def in_process(capsys, module, *args):
    """A model file's command line run in this process (as `python FILE.py ARGS` runs it): a CompletedProcess."""
    try:
        data.run_cli(module.main, [str(arg) for arg in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_clean_error(result, *fragments):
    """Exit status 2, one line on stderr, no traceback, mentioning every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("warning:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def logged(folder, *keys):
    """(step, loss, and each of `keys`) of every training record in a run's metrics.jsonl."""
    records = map(json.loads, (Path(folder) / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], *(r[key] for key in keys)) for r in records if "loss" in r]


def ctrl_c_then_resume(monkeypatch, module, args, out, batch, saved_step=None):
    """module.main(args) into `out`, with a Ctrl-C while batch number `batch` (from 0) trains; the run must
    stop with its checkpoint at `saved_step`; then `--resume` runs it to its end."""
    real_batches = module.batches

    def batches_then_ctrl_c(*arguments, **keywords):
        for i, item in enumerate(real_batches(*arguments, **keywords)):
            if i == batch:  # the step finishes, is saved, and the run stops
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    monkeypatch.setattr(module, "batches", batches_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        module.main(args + ["--out", str(out)])
    if saved_step is not None:
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == saved_step
    monkeypatch.setattr(module, "batches", real_batches)
    module.main(["--resume", "--out", str(out)])


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """A folder of 48 captioned 16-px shapes images (NAME.png + NAME.txt)."""
    folder = tmp_path_factory.mktemp("tiny")
    assert run(ROOT / "data.py", "shapes", folder, "--n", 48, "--size", 16).returncode == 0
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_ERRORS = ("RendezvousConnectionError", "RendezvousTimeoutError", "RendezvousClosedError",
                   "DistNetworkError", "address already in use")


IN_SYNC = """import os, runpy, sys, torch
sys.path.insert(0, {root!r})
optimizers, init = [], torch.optim.Optimizer.__init__
def record(self, *args, **kwargs):  # every optimizer the script builds
    init(self, *args, **kwargs)
    optimizers.append(self)
torch.optim.Optimizer.__init__ = record
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
weights = [p.detach().flatten() for o in optimizers for group in o.param_groups for p in group["params"]]
if weights:  # what this rank trained, for ranks_in_sync
    torch.save(torch.cat(weights), os.path.join(sys.argv[-1], "weights-rank" + os.environ["RANK"] + ".pt"))
"""


def ranks_in_sync(out):
    """Both ranks ended with the same trained weights, bit for bit: every optimized module was wrapped in DDP
    (each rank reads other images, so an unwrapped one drifts apart) and trained through its wrapper."""
    ranks = [torch.load(out / f"weights-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    return len(ranks[0]) > 0 and torch.equal(*ranks)


def torchrun(script, *args, out, nodes=1, timeout=300):
    """Two processes under torchrun on this machine, writing to `out`: one launcher running both
    (--standalone: torchrun binds a free port itself, so no other program can take it first), or with
    nodes=2 two launchers of one process each, meeting at a c10d rendezvous. Returns (exit status,
    stdout, stderr) of each launcher.
    NOTE: torchrun's own agents can fail around our processes: an agent whose worker still runs can ask
    the c10d store about waiting nodes after the agent hosting it has left (RendezvousConnectionError in
    torch.distributed.elastic), and the rendezvous port of two nodes can be taken between free_port()
    and its bind. A launch that fails with one of LAUNCHER_ERRORS runs once more, from an empty `out`;
    any other failure, or a launcher error twice, is returned as it is."""
    for attempt in range(2):
        shutil.rmtree(out, ignore_errors=True)
        if nodes == 1:
            launch = ["--standalone", "--nproc_per_node", "2"]
        else:
            launch = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
        wrapper = out.parent / f"{out.name}-in-sync.py"  # runs the script, then saves each rank's trained weights
        wrapper.write_text(IN_SYNC.format(root=str(ROOT)))
        command = [sys.executable, "-m", "torch.distributed.run", *launch, str(wrapper), str(ROOT / script),
                   *map(str, args), "--out", str(out)]
        launchers = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(nodes)]
        deadline = time.monotonic() + timeout
        try:
            outputs = [launcher.communicate(timeout=max(deadline - time.monotonic(), 1)) for launcher in launchers]
        except subprocess.TimeoutExpired:  # a hang: stop both, and show what each printed
            for launcher in launchers:
                launcher.terminate()  # torchrun passes it on to its workers
            outputs = []
            for launcher in launchers:
                try:
                    outputs.append(launcher.communicate(timeout=30))
                except subprocess.TimeoutExpired:
                    launcher.kill()
                    outputs.append(launcher.communicate())
            return [(f"timed out after {timeout} s", *output) for output in outputs]
        results = [(launcher.returncode, *output) for launcher, output in zip(launchers, outputs)]
        launcher_error = any(status != 0 and any(error in stderr for error in LAUNCHER_ERRORS)
                             for status, _, stderr in results)
        if not launcher_error or attempt == 1:
            return results


def succeeded(results):
    """The stdout of torchrun's launchers, joined, after checking that each exited with status 0."""
    assert all(status == 0 for status, _, _ in results), "\n".join(
        f"launcher {i}: exit status {status}\n{stdout[-2000:]}\n{stderr[-4000:]}"
        for i, (status, stdout, stderr) in enumerate(results))
    return "".join(stdout for _, stdout, _ in results)


class Killed(BaseException):
    """A SIGKILL, in a test: nothing catches it, so nothing is saved on the way out."""


def die(*arguments, **keywords):
    raise Killed


@pytest.fixture(scope="module")
def tiny_shards(tiny_shapes, tmp_path_factory):
    """The 48 tiny shapes images in 4 shards of 12: OUT/000000.tar ... OUT/000003.tar."""
    folder = tmp_path_factory.mktemp("shards")
    images = sorted(tiny_shapes.glob("*.png"))
    for shard in range(4):  # each image beside its caption, as `tar cf` of the folder's files would hold them
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as archive:
            for image in images[12 * shard: 12 * shard + 12]:
                archive.add(image, image.name)
                archive.add(image.with_suffix(".txt"), image.with_suffix(".txt").name)
    return folder


def write_tar(path, members):
    """A tar of `members`: (name, bytes) pairs become regular files; a TarInfo is added as it is."""
    with tarfile.open(path, "w") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))


def png_bytes(colour, size=16):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_labelled(folder, n, seed, colours=("red", "green", "blue", "yellow")):
    """Shapes images of the given colours as FOLDER/<colour>/NNNN.png + NNNN.txt (the shapes caption)."""
    images, captions, _ = data.make_shapes(n, 16, seed=seed)
    for i, (image, caption) in enumerate(zip(images, captions)):
        colour = data.parse_caption(caption)["colour"]
        if colour in colours:
            (folder / colour).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / colour / f"{i:04d}.png")
            (folder / colour / f"{i:04d}.txt").write_text(caption + "\n")
    return folder


def write_samples(folder, images, captions):
    """What a model's --sample writes: NNNN.png + NNNN.txt pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """A four-class folder (colours), its test folder and a judge trained on it."""
    root = tmp_path_factory.mktemp("judge")
    train, test = write_labelled(root / "train", 300, 0), write_labelled(root / "test", 400, 1)
    data.main(["judge", "train", str(train), "--test", str(test), "--out", str(root / "judge.pt"),
               "--image-size", "16", "--steps", "60", "--batch-size", "32"])
    return train, test, root / "judge.pt"


def judge_score(capsys, *args):
    result = in_process(capsys, data, "judge", "score", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# data.py: loading any folder


def test_folder_loader_modes_captions_and_bad_files(tmp_path, capsys):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "captioned.png")
    (tmp_path / "captioned.txt").write_text("first caption\n\n  second caption  \n")
    (tmp_path / "red_apple").mkdir()
    Image.fromarray(rgb[:, :, 0], "L").save(tmp_path / "red_apple" / "grey.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "red_apple" / "palette.gif")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(tmp_path / "sixteen.png")  # I;16 white
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent: must come out black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    Image.new("LA", (16, 16), (200, 255)).save(tmp_path / "grey_alpha.png")
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "blue.webp")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "green.bmp")
    (tmp_path / "badcaption.txt").write_bytes(b"caf\xe9 \xff\xfe au lait\n")  # not UTF-8
    Image.new("RGB", (16, 16)).save(tmp_path / "badcaption.png")
    # bad files: zero bytes, not an image, truncated
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:300])
    (tmp_path / "full.png").unlink()

    dataset = data.ImageTextFolder(tmp_path, 8)
    warnings = capsys.readouterr().err
    assert "empty.png" in warnings and f"skipping {tmp_path / 'notes.jpg'}: not an image\n" in warnings, warnings
    names = [path.name for path in dataset.paths]
    assert "empty.png" not in names and "notes.jpg" not in names and len(names) == 11

    items = {path.name: dataset[i] for i, path in enumerate(dataset.paths)}
    assert "truncated.png" in capsys.readouterr().err  # skipped on access, with a warning
    for name, (image, caption) in items.items():
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32, name
        assert 0.0 <= image.min() and image.max() <= 1.0, name
    assert items["captioned.png"][1] in ("first caption", "second caption")
    captioned = names.index("captioned.png")
    assert {dataset[captioned][1] for _ in range(40)} == {"first caption", "second caption"}  # per access
    assert items["grey.png"][1] == "red apple" and items["palette.gif"][1] == "red apple"
    assert items["sixteen.png"][1] == "" and torch.allclose(items["sixteen.png"][0], torch.ones(3, 8, 8))
    assert items["transparent.png"][0].max() == 0.0
    assert items["badcaption.png"][1].startswith("caf\ufffd")
    assert torch.allclose(items["blue.webp"][0][2], torch.ones(8, 8), atol=0.02)
    # the shorter side is resized and the centre cropped: the red/black vertical split stays central
    red = items["captioned.png"][0][0]
    assert red[:, 0].min() > 0.9 and red[:, -1].max() < 0.1


def test_unreadable_caption_files_are_named_once_each(tmp_path, capsys):
    folder = tmp_path / "red_apple"
    folder.mkdir()
    for name in ("folder", "dangling", "loop", "good"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / f"{name}.png")
    (folder / "folder.txt").mkdir()
    (folder / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    (folder / "good.txt").write_text("a good caption\n")
    dataset = data.ImageTextFolder(tmp_path, 8)
    captions = {path.stem: {dataset[i][1] for _ in range(3)} for i, path in enumerate(dataset.paths)}
    assert captions == {"dangling": {"red apple"}, "folder": {"red apple"}, "good": {"a good caption"},
                        "loop": {"red apple"}}  # the folder's name, as if there were no .txt file
    warnings = capsys.readouterr().err.splitlines()
    assert sorted(warnings) == [  # one line per file, however often it is read
        f"warning: cannot read caption {folder / 'dangling.txt'} (No such file or directory); it is left out",
        f"warning: cannot read caption {folder / 'folder.txt'} (Is a directory); it is left out",
        f"warning: cannot read caption {folder / 'loop.txt'} (Too many levels of symbolic links); it is left out"]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (16, 8), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 8))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.png", exif=exif)
    loaded = data.load_image(tmp_path / "rotated.png")
    assert loaded.shape == (3, 16, 8)  # portrait after the transpose
    assert loaded[0, :8].float().mean() > 200 and loaded[0, 8:].float().mean() < 50  # white on top


def test_folder_errors(tmp_path):
    with pytest.raises(data.UsageError, match="no such folder"):
        data.ImageTextFolder(tmp_path / "missing", 16)
    with pytest.raises(data.UsageError, match="no usable image"):
        data.ImageTextFolder(tmp_path, 16)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(data.UsageError, match="no usable image"):
        data.ImageTextFolder(tmp_path, 16)


# ----------------------------------------------------------------------------------------------------
# data.py: tar shards


def test_shards_round_trip_to_the_folder_dataset(tmp_path, capsys):
    folder = tmp_path / "folder"
    (folder / "red_apple").mkdir(parents=True)
    images, captions, _ = data.make_shapes(12, 16, seed=5)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption + "\n")
    Image.new("RGB", (20, 16), (200, 0, 0)).save(folder / "red_apple" / "apple.jpg")  # captioned by its folder
    Image.new("RGB", (16, 16), (9, 9, 9)).save(folder / "uncaptioned.png")
    Image.new("RGB", (16, 16), (0, 0, 90)).save(folder / "two.png")
    (folder / "two.txt").write_bytes(b"first line\n\n  second line \n")
    (folder / "empty.png").write_bytes(b"")  # skipped with a warning, in the folder and in the shard

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "000000.tar", "w") as archive:  # tar cf shards/000000.tar -C folder .
        archive.add(folder, ".")

    def pairs(dataset):  # (pixels, every caption drawn in 30 accesses) for each image, in a fixed order
        return sorted((dataset[i][0].numpy().tobytes(), frozenset(dataset[i][1] for _ in range(30)))
                      for i in range(len(dataset)))
    expected = pairs(data.ImageTextFolder(folder, 16))
    assert len(expected) == 15 and frozenset({"first line", "second line"}) in [c for _, c in expected]
    assert frozenset({"red apple"}) in [c for _, c in expected] and frozenset({""}) in [c for _, c in expected]
    dataset = data.load_dataset(str(tmp_path / "shards"), 16)
    assert isinstance(dataset, data.ShardDataset) and pairs(dataset) == expected
    assert "'./empty.png' is not a regular file, or empty" in capsys.readouterr().err


def test_shard_names_files_and_folders(tmp_path):
    (tmp_path / "s").mkdir()
    for i in range(3):
        write_tar(tmp_path / "s" / f"{i:02d}.tar", [(f"{i}.png", png_bytes((255, 0, 0)))])
    paths = [tmp_path / "s" / f"{i:02d}.tar" for i in range(3)]
    assert data.shard_paths(str(tmp_path / "s" / "01.tar")) == paths[1:2]
    assert data.shard_paths(str(tmp_path / "s")) == paths  # a folder of .tar files only
    with pytest.raises(data.UsageError, match=r"03.tar: no such shard"):
        data.shard_paths(str(tmp_path / "s" / "03.tar"))
    (tmp_path / "gz").mkdir()
    for name in ("00.tar", "01.tar.gz", "02.tgz"):  # compressed: refused, with the way out
        (tmp_path / "gz" / name).write_bytes(gzip.compress((tmp_path / "s" / "00.tar").read_bytes()))
    for name in ("gz", "gz/01.tar.gz", "gz/02.tgz"):
        with pytest.raises(data.UsageError, match=r"compressed shards are not read .*\(gunzip X.tar.gz leaves X.tar\)"):
            data.shard_paths(str(tmp_path / name))
    Image.new("RGB", (8, 8)).save(tmp_path / "s" / "x.png")
    assert data.shard_paths(str(tmp_path / "s")) is None  # images beside them: an image folder
    (tmp_path / "s" / "archive.tar.gz").write_bytes(b"")
    assert data.shard_paths(str(tmp_path / "s")) is None  # ... even with an archive among them
    assert data.shard_paths("shapes") is None and data.shard_paths(str(tmp_path)) is None


def test_malicious_shard_members_touch_nothing_on_disk(tmp_path, capsys):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes((0, 0, 255)))
    symlink = tarfile.TarInfo("link.png")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, str(outside)
    hardlink = tarfile.TarInfo("hard.png")
    hardlink.type, hardlink.linkname = tarfile.LNKTYPE, "good.png"
    device = tarfile.TarInfo("device.png")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    folder = tarfile.TarInfo("folder.png")
    folder.type = tarfile.DIRTYPE
    absolute = str(tmp_path / "absolute")  # an absolute member name: where an extracting reader would write
    write_tar(tmp_path / "evil.tar", [("good.png", png_bytes((255, 0, 0))), ("good.txt", b"a good one"),
                                      ("../../evil.png", png_bytes((0, 255, 0))), ("../../evil.txt", b"climbing"),
                                      (absolute + ".png", png_bytes((255, 255, 255))), symlink, hardlink,
                                      ("link.txt", b"the link's caption"), device, folder])
    before = sorted(tmp_path.rglob("*"))
    dataset = data.load_dataset(str(tmp_path / "evil.tar"), 8)
    items = {key: dataset[i] for i, (_, key, *_) in enumerate(dataset.samples)}
    assert sorted(items) == sorted(["good", "../../evil", absolute])  # names are keys, nothing more
    assert items["good"][1] == "a good one" and items["../../evil"][1] == "climbing"
    assert items["../../evil"][0][1].min() == 1.0 and items[absolute][0].min() == 1.0  # green; white
    warnings = capsys.readouterr().err
    for name in ("link.png", "hard.png", "device.png"):
        assert f"'{name}' is not a regular file" in warnings, warnings
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, extracted or followed
    assert not (ROOT.parent.parent / "evil.png").exists() and not Path(absolute + ".png").exists()


def test_corrupt_shard_members_are_skipped_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "_warned", set())  # some warnings are printed once a process
    good = png_bytes((255, 0, 0))
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noise, "PNG")
    write_tar(tmp_path / "000.tar", [("a.png", good), ("a.txt", "café".encode("latin-1")), ("b.png", b"not an image"),
                                     ("c.png", noise.getvalue()[:300]), ("d.jpg", b""),  # truncated; empty
                                     ("e.png", png_bytes((0, 255, 0)))])
    write_tar(tmp_path / "001.tar", [("f.png", good), ("g.png", noise.getvalue())])
    with tarfile.open(tmp_path / "001.tar") as archive:
        cut = archive.getmember("g.png").offset_data + 100
    (tmp_path / "001.tar").write_bytes((tmp_path / "001.tar").read_bytes()[:cut])  # ends inside g.png
    (tmp_path / "002.tar").write_bytes(b"not a tar at all " * 64)
    (tmp_path / "003.tar").write_bytes(gzip.compress((tmp_path / "000.tar").read_bytes()))  # compressed: refused
    dataset = data.load_dataset(str(tmp_path), 8)
    warnings = capsys.readouterr().err
    for name in ("001.tar: ", "002.tar: ", "003.tar: "):
        assert f"skipping the rest of {tmp_path / name}" in warnings, warnings
    assert "000.tar: 'd.jpg' is not a regular file, or empty" in warnings, warnings
    assert [key for _, key, *_ in dataset.samples] == ["a", "b", "c", "e", "f", "g"]
    items = [dataset[i] for i in range(len(dataset))]
    warnings = capsys.readouterr().err
    assert "000.tar: 'b': not an image" in warnings and "000.tar: 'c': " in warnings, warnings  # c: truncated
    assert "001.tar: 'g': the tar ends" in warnings
    assert items[0][1] == "caf\ufffd" and items[0][0][0].min() == 1.0  # caption bytes not UTF-8: replaced
    assert "000.tar: 'a.txt': not UTF-8" in warnings, warnings  # ... and named
    assert all(torch.equal(items[i][0], items[3][0]) for i in (1, 2))  # a bad image gives the next good one
    assert torch.equal(items[5][0], items[0][0])  # ... wrapping around at the end
    with pytest.raises(data.UsageError, match="no image in 1 shard"):
        data.load_dataset(str(tmp_path / "002.tar"), 8)


def test_shard_members_that_no_key_can_hold_and_a_tar_cut_between_members_are_named(tmp_path, capsys):
    members = [("a.png", png_bytes((255, 0, 0))), ("photo.2023.png", png_bytes((0, 255, 0))),
               ("photo.2023.txt", b"green"), ("b.png", png_bytes((0, 0, 255)))]
    write_tar(tmp_path / "dots.tar", members)
    assert [key for _, key, *_ in data.load_dataset(str(tmp_path / "dots.tar"), 8).samples] == ["a", "b"]
    warnings = capsys.readouterr().err
    assert "'photo.2023.png', as a KEY ends at the first dot" in warnings  # its key would be 'photo', not an image
    with tarfile.open(tmp_path / "dots.tar") as archive:
        cut = archive.getmember("b.png").offset  # b's header and all after it gone: tarfile sees a clean end
    (tmp_path / "cut.tar").write_bytes((tmp_path / "dots.tar").read_bytes()[:cut])
    assert [key for _, key, *_ in data.load_dataset(str(tmp_path / "cut.tar"), 8).samples] == ["a"]
    assert "cut.tar ends early (cut short?): reading the 1 complete images in it" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# data.py: the shapes benchmark and its scorer


def test_shapes_spec():
    images, captions, held_out = data.make_shapes(1500, 32, seed=1, split="train")
    assert images.shape == (1500, 3, 32, 32) and images.dtype == torch.uint8
    assert not any(held_out)
    for caption in captions:
        parsed = data.parse_caption(caption)
        assert parsed is not None and caption == (f"a {parsed['size']} {parsed['colour']} {parsed['shape']} "
                                                  f"at the {parsed['position']}")
        assert (parsed["colour"], parsed["shape"]) not in data.HELD_OUT
    # every pixel is black or exactly the caption's colour (no antialiasing)
    for image, caption in zip(images[:200], captions[:200]):
        colour = torch.tensor(data.COLOURS[data.parse_caption(caption)["colour"]]).view(3, 1, 1)
        is_black, is_colour = (image == 0).all(0), (image == colour).all(0)
        assert (is_black | is_colour).all() and is_colour.any()
    # the test split alternates seen and held-out pairs, and marks them
    _, test_captions, test_flags = data.make_shapes(200, 32, seed=1, split="test")
    assert test_flags == [i % 2 == 1 for i in range(200)]
    assert [data.is_held_out(c) for c in test_captions] == test_flags
    # deterministic for a seed, different across seeds and splits
    assert torch.equal(data.make_shapes(50, 32, seed=1)[0], images[:50])
    assert not torch.equal(data.make_shapes(50, 32, seed=2)[0], images[:50])
    # box geometry: a large square at the centre of a 32-px image is 14x14 pixels
    square = np.asarray(data.render_shape("white", "square", "large", "center", 32))
    assert (square[..., 0] > 0).sum() == 14 * 14


def test_shapes_names_choose_the_training_size():
    assert data.shapes_size("shapes") == data.SHAPES_TRAIN_SIZE == 20000
    assert data.shapes_size("shapes:30") == 30
    assert data.shapes_size("data/shapes") is None and data.shapes_size("shapes:x") is None
    for name in ("shapes:0", "shapes:1000001"):
        with pytest.raises(data.UsageError, match="N from 1 to 1,000,000"):
            data.shapes_size(name)
    train, test = data.load_train_test("shapes:30", "", 16)
    assert len(train) == 30 and len(test) == data.SHAPES_TEST_SIZE
    assert not any(train.held_out) and sum(test.held_out) == data.SHAPES_TEST_SIZE // 2
    # a larger N extends a smaller one: 'shapes' is the first 20,000 of any 'shapes:N' with N >= 20,000
    smaller = data.load_dataset("shapes:10", 16)
    assert torch.equal(train.images[:10], smaller.images) and train.captions[:10] == smaller.captions
    assert torch.equal(test.images, data.load_dataset("shapes", 16, split="test").images)


def test_scorer_ground_truth_and_shuffled():
    images, captions, _ = data.make_shapes(600, 32, seed=3, split="test")
    truth = data.score_shapes(images, captions)
    assert truth["all"] >= 0.99 and truth["clean"] >= 0.99
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    chance = data.score_shapes(images, shuffled)
    assert chance["all"] < 0.03  # chance is 1/8 * 1/4 * 1/2 * 1/9 = 0.2%
    assert chance["colour"] < 0.2 and chance["shape"] < 0.35 and chance["position"] < 0.2
    # float images, mild blur and noise are still read correctly
    x = images.float() / 255
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (0.5 * x + 0.5 * blurred + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert data.score_shapes(noisy, captions)["all"] >= 0.95
    assert data.score_shapes(torch.zeros_like(x[:10]), captions[:10])["all"] == 0.0
    assert data.score_shapes(images[:5], ["nonsense"] * 5)["all"] == 0.0


def test_scorer_counts_a_shape_only_when_it_is_drawn_cleanly():
    from PIL import ImageDraw, ImageFilter
    images, captions, _ = data.make_shapes(300, 32, seed=5, split="test")
    noise = np.random.default_rng(0).normal(0, 25.5, (32, 32, 3))  # sigma 0.1 of the range
    degraded = torch.stack([torch.from_numpy(np.clip(np.asarray(  # a Gaussian blur of radius 1 px, then noise
        Image.fromarray(image.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(1))) + noise, 0, 255)
        .round().astype(np.uint8)).permute(2, 0, 1) for image in images])  # (N, 3, S, S)
    assert data.score_shapes(degraded, captions)["all"] >= 0.99
    malformed = []
    for size, notch in (("small", 3), ("large", 5)):  # a square with a notch cut out, a square with a roof
        for roof in (False, True):
            image = Image.new("RGB", (32, 32))
            draw = ImageDraw.Draw(image)
            x0, y0, x1, y1 = data.shape_box(size, "center", 32)
            draw.rectangle((x0, y0, x1, y1), fill=(0, 255, 0))
            if roof:
                draw.polygon([((x0 + x1) / 2, y0 - 6), (x1, y0), (x0, y0)], fill=(0, 255, 0))
            else:
                draw.rectangle((x1 - notch + 1, y0, x1, y0 + notch - 1), fill=(0, 0, 0))
            malformed.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # (3, S, S)
    score = data.score_shapes(torch.stack(malformed), [f"a {size} green square at the center"
                                                       for size in ("small", "small", "large", "large")])
    assert score["shape"] == score["clean"] == score["all"] == 0.0 and score["colour"] == 1.0


def test_data_cli_shapes_and_score(tmp_path):
    result = run(ROOT / "data.py", "shapes", tmp_path, "--n", 20, "--image-size", 32, "--split", "test", "--seed", 4)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("*_heldout.png"))) == 10 and len(list(tmp_path.glob("*.txt"))) == 20
    scored = run(ROOT / "data.py", "score", tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert "overall   n=20    all 100.0%" in scored.stdout and "held_out" in scored.stdout
    assert_clean_error(run(ROOT / "data.py", "score", tmp_path / "missing"), "no such folder")
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (40, 10)).save(wide / "0000.png")
    (wide / "0000.txt").write_text("a large red circle at the center")
    assert_clean_error(run(ROOT / "data.py", "score", wide), "square images of 16 px or more, not 40 x 10")
    assert_clean_error(run(ROOT / "data.py", "shapes", tmp_path, "--n", "many"), "invalid int")
    helped = run(ROOT / "data.py", "shapes", "--help").stdout  # the defaults shown, the usage lines kept as written
    assert "number of images (default: 1000)" in helped
    assert "\n    python data.py score DIR " in run(ROOT / "data.py", "--help").stdout


# ----------------------------------------------------------------------------------------------------
# data.py: the judge, an in-domain classifier for class accuracy and Fréchet distance


def test_judge_separates_two_easy_classes_deterministically(tmp_path, capsys):
    folder = write_labelled(tmp_path / "two", 250, 2, colours=("red", "blue"))  # about 60 images
    accuracies, weights = [], []
    for run_name in ("a", "b"):  # no --test: a fixed 10% is held out
        result = in_process(capsys, data, "judge", "train", folder, "--out", tmp_path / f"{run_name}.pt",
                            "--image-size", "16", "--epochs", "10", "--batch-size", "16", "--seed", "3")
        assert result.returncode == 0 and "held-out accuracy" in result.stdout, result.stderr
        saved = torch.load(tmp_path / f"{run_name}.pt", weights_only=True)
        assert saved["config"]["classes"] == ["blue", "red"] and saved["config"]["image_size"] == 16
        accuracies.append(saved["accuracy"])
        assert saved["train_accuracy"] >= 0.9 and "training images" in result.stdout, result.stdout
        assert "more --epochs" not in result.stdout  # the hint is for an undertrained judge only
        weights.append(saved["model"])
    assert accuracies[0] >= 0.9, accuracies
    assert accuracies[0] == accuracies[1] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_judge_class_accuracy_true_and_shuffled_captions(judged, tmp_path, capsys):
    _, test, judge = judged
    real, labels, classes, captions = data.read_labelled(test, 16)
    true = [lines[0] for lines in captions]  # 'a large red circle at the top': a caption line of the real set
    true[:3] = ["RED", "Blue", "nonsense"]  # a class name (any case) also names it; nonsense names none
    report = judge_score(capsys, judge, write_samples(tmp_path / "true", real, true), "--real", test)
    assert report["samples"] == len(real) and report["unnamed"] == 1
    assert report["class_accuracy"] >= 0.9 and report["real_accuracy"] >= 0.9, report
    shuffled = true[:]
    random.Random(0).shuffle(shuffled)
    report = judge_score(capsys, judge, write_samples(tmp_path / "shuffled", real, shuffled), "--real", test)
    assert report["class_accuracy"] < 0.45, report  # chance is 1/4
    # four samples a caption (a class name), one of its class: a quarter right, and every caption has one; each
    # an image the judge classifies right, so that the expected figures are exact on any machine's floats
    saved = torch.load(judge, weights_only=True)
    model = data.Judge(data.JudgeConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    right = model.judge(real, "cpu")[0].argmax(1) == labels  # (N,)
    picked, names = [], []
    for c, name in enumerate(classes):
        others = [((labels == (c + k) % len(classes)) & right).nonzero()[0].item() for k in range(len(classes))]
        picked, names = picked + others, names + [name] * len(classes)
    report = judge_score(capsys, judge, write_samples(tmp_path / "one", real[picked], names), "--real", test)
    assert report["class_accuracy"] == 0.25 and report["captions_with_a_hit"] == 1.0, report
    assert report["class_accuracy_by_class"] == dict.fromkeys(classes, 0.25), report


def test_judge_frechet_distance_zero_for_itself_large_for_noise(judged, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=generator)
    b = torch.randn(200, 5, generator=generator) @ torch.randn(5, 5, generator=generator) + 1
    assert data.frechet_distance(a, a) < 1e-9
    a64, b64 = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a64.T), np.cov(b64.T)  # Tr (S1 S2)^(1/2) from the eigenvalues of S1 S2, not symmetric
    expected = (((a64.mean(0) - b64.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum())
    assert data.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)  # float64, LAPACK builds differ
    x, y = torch.randn(1000, 1, generator=generator), 2 * torch.randn(1000, 1, generator=generator) + 3
    assert data.frechet_distance(x, y) == pytest.approx(
        (x.mean() - y.mean()).item() ** 2 + (x.std() - y.std()).item() ** 2, rel=1e-5)  # 1-D: means and std devs
    _, test, judge = judged
    real, _, _, captions = data.read_labelled(test, 16)
    same = judge_score(capsys, judge, write_samples(tmp_path / "real", real, ["red"] * len(real)), "--real", test)
    # more samples than half the real images: the floor is half of them against the other half, the
    # reference of the samples that other half, which the samples contain: closer than the floor
    assert same["floor_n"] == len(real) // 2 and same["reference"] == len(real) - len(real) // 2
    assert same["fd"] < 0.5 * same["floor"], same
    noise = torch.randint(0, 256, (50, 3, 16, 16), dtype=torch.uint8, generator=generator)
    noisy = judge_score(capsys, judge, write_samples(tmp_path / "noise", noise, ["red"] * 50), "--real", test)
    assert noisy["floor_n"] == 50 and noisy["reference"] == len(real) - 50  # disjoint: other real images
    assert noisy["fd"] > 10 * noisy["floor"] and noisy["floor"] > 0, noisy


def test_judge_cli_end_to_end_and_bad_inputs(judged, tmp_path, capsys):
    train, test, judge = judged
    (train / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    trained = run(ROOT / "data.py", "judge", "train", train, "--out", tmp_path / "j.pt", "--image-size", 16,
                  "--steps", 5, "--batch-size", 8)
    assert trained.returncode == 0 and "held-out accuracy" in trained.stdout, trained.stderr
    assert "training images" in trained.stdout and "give it more --epochs" in trained.stdout, trained.stdout
    assert "warning: skipping" in trained.stderr and "broken.png" in trained.stderr
    real, _, _, captions = data.read_labelled(test, 16)
    samples = write_samples(tmp_path / "samples", real[:20], [lines[0] for lines in captions[:20]])
    scored = in_process(capsys, data, "judge", "score", tmp_path / "j.pt", samples, "--real", test)
    assert scored.returncode == 0, scored.stderr
    assert [line.split()[0] for line in scored.stdout.splitlines()] == ["samples", "class", "by", "by", "FD", "floor"]
    assert "20 other real images" in scored.stdout
    assert_clean_error(in_process(capsys, data, "judge", "train", tmp_path / "missing"), "no such folder")
    assert_clean_error(in_process(capsys, data, "judge", "train", samples), "no class subfolders")
    assert_clean_error(in_process(capsys, data, "judge", "train", train, "--image-size", 0),  # before any image
                       "8 to 512 px, not --image-size 0")
    assert_clean_error(in_process(capsys, data, "judge", "train", train, "--out", tmp_path / "j.pt"),
                       "j.pt exists")  # a judge can take minutes to train: never overwritten
    assert_clean_error(in_process(capsys, data, "shapes", tmp_path / "j.pt"), "j.pt is a file")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    assert_clean_error(in_process(capsys, data, "judge", "score", tmp_path / "text.pt", samples, "--real", test),
                       "neither a torch.save file nor a pickle")
    assert_clean_error(in_process(capsys, data, "judge", "score", judge, tmp_path / "missing", "--real", test),
                       "no such folder")
    data.save_checkpoint(tmp_path / "vae.pt", "vae", data.JudgeConfig(), 0, model={})
    assert_clean_error(in_process(capsys, data, "judge", "score", tmp_path / "vae.pt", samples, "--real", test),
                       "a vae checkpoint, not a judge checkpoint")
    (tmp_path / "other" / "purple").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "other" / "purple" / "x.png")
    assert_clean_error(in_process(capsys, data, "judge", "score", judge, samples, "--real", tmp_path / "other"),
                       "not classes of this judge")



def test_judge_nearest_copies_the_training_images_of_the_most_similar_captions(tmp_path, capsys):
    images = {"flags/a": ("flag: France", 10), "flags/b": ("flag: Japan", 20), "faces/c": ("grinning face\ngrin", 30),
              "faces/d": ("sad face", 40), "food/e": ("red apple", 50), "food/f": ("green apple", 60)}
    for stem, (caption, value) in images.items():
        (tmp_path / "train" / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (value, value, value)).save(tmp_path / "train" / f"{stem}.png")
        (tmp_path / "train" / f"{stem}.txt").write_text(caption + "\n")
    (tmp_path / "train" / "flags" / "g.png").write_bytes(b"\x89PNG not really")  # skipped, named in a warning
    (tmp_path / "train" / "flags" / "g.txt").write_text("flag: Germany\n")
    (tmp_path / "names.txt").write_text("flag: Germany\nGRIN\ngrinning apple\nzebra\n")
    result = in_process(capsys, data, "judge", "nearest", tmp_path / "train", tmp_path / "names.txt",
                        tmp_path / "out", "-n", "2", "--image-size", "8")
    assert result.returncode == 0 and "wrote 8 training images for 4 captions" in result.stdout, result.stderr
    assert "skipping" in result.stderr and "g.png" in result.stderr
    samples, captions = data.read_pairs(tmp_path / "out")
    assert captions == ["flag: Germany"] * 2 + ["GRIN"] * 2 + ["grinning apple"] * 2 + ["zebra"] * 2
    # a rare shared word outweighs a common one ("grinning" in 1 caption, "apple" in 2); ties and captions sharing
    # no word ("zebra") follow the folder's order: faces c, d, flags a, b, food e, f
    assert samples[:, 0, 0, 0].tolist() == [10, 20, 30, 40, 30, 50, 30, 40]
    assert_clean_error(in_process(capsys, data, "judge", "nearest", tmp_path / "train", tmp_path / "names.txt",
                                  tmp_path / "out", "-n", "0"), "-n must be positive")
    (tmp_path / "blank.txt").write_text("\n \n")
    assert_clean_error(in_process(capsys, data, "judge", "nearest", tmp_path / "train", tmp_path / "blank.txt",
                                  tmp_path / "out"), "captions file", "no captions in it")


# ----------------------------------------------------------------------------------------------------
# data.py: text, IDX, Twemoji, grids


def test_byte_text_encoding():
    captions = ["a red circle", "", "日本語のキャプション 🎨", "x" * 100, "\ud800 lone surrogate"]
    tokens = data.encode_text(captions, 16)
    assert tokens.shape == (5, 16) and tokens.dtype == torch.long
    assert tokens.max() <= data.PAD and data.TEXT_VOCAB == data.PAD + 1
    assert (tokens[1] == data.PAD).all() and (tokens[3] != data.PAD).all()
    decoded = decode_text(tokens)
    assert decoded[0] == "a red circle" and decoded[1] == "" and decoded[3] == "x" * 16
    assert decoded[2].startswith("日本語の")  # 16 bytes cut a character: replaced, never an error
    assert decode_text(data.encode_text(["héllo wörld"], 64)) == ["héllo wörld"]


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_idx_to_captioned_folder(tmp_path):
    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    labels = np.array([0, 1, 2, 0, 1, 2])
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels.gz", labels)
    result = run(ROOT / "data.py", "idx", tmp_path / "images.gz", tmp_path / "labels.gz", tmp_path / "out",
                 "--names", "t-shirt,ankle boot,bag")
    assert result.returncode == 0, result.stderr
    dataset = data.ImageTextFolder(tmp_path / "out", 32)
    assert len(dataset) == 6
    assert sorted({dataset[i][1] for i in range(6)}) == ["ankle boot", "bag", "t-shirt"]
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    assert_clean_error(run(ROOT / "data.py", "idx", tmp_path / "bad.gz", tmp_path / "labels.gz", tmp_path / "o"),
                       "bad.gz")
    assert_clean_error(run(ROOT / "data.py", "idx", tmp_path / "images.gz", tmp_path / "labels.gz", tmp_path / "o",
                           "--names", "t-shirt,,bag"), "a class without a name")  # else its images land in OUT
    assert not (tmp_path / "o").exists()


def fake_emoji_package(folder):
    """A tiny emoji-datasource-twitter layout: 24 emoji over 3 categories, 8-px RGBA PNGs whose left half is
    opaque red and right half transparent; plus one without a Twitter image and one whose file is missing."""
    (folder / "img" / "twitter" / "64").mkdir(parents=True)
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:, :4] = (255, 0, 0, 255)
    categories = ["Smileys & Emotion", "Animals & Nature", "Flags"]
    entries = [{"name": f"THING {i}", "unified": f"1F{i:03X}", "image": f"1f{i:03x}.png", "has_img_twitter": True,
                "short_names": [f"thing_{i}", f"t{i}"], "category": categories[i % 3]} for i in range(24)]
    entries[5]["short_names"].append("thing 7")  # a caption line two emoji share: never in both splits
    for entry in entries:
        Image.fromarray(pixels, "RGBA").save(folder / "img" / "twitter" / "64" / entry["image"])
    entries += [dict(entries[0], name="NO TWITTER", image="ff0.png", has_img_twitter=False),
                dict(entries[0], name="NO FILE", image="ff1.png")]
    (folder / "emoji.json").write_text(json.dumps(entries))


def test_emoji_prep_layout_captions_background_and_fixed_split(tmp_path, capsys):
    fake_emoji_package(tmp_path / "package")
    result = in_process(capsys, data, "emoji", tmp_path / "package", tmp_path / "out", "--size", 8,
                        "--test-fraction", 0.3)
    assert result.returncode == 0, result.stderr
    assert "skipped 2" in result.stdout.splitlines()[-1] and "flags " in result.stdout
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 24 and all(png.with_suffix(".txt").is_file() for png in pngs)
    assert {png.parent.relative_to(tmp_path / "out").parts[1] for png in pngs} == {
        "smileys-emotion", "animals-nature", "flags"}
    captions = {png.stem: png.with_suffix(".txt").read_text().splitlines() for png in pngs}
    assert captions["1f003"] == ["thing 3", "t3"]  # name lower-case, short names with spaces, deduplicated
    with Image.open(pngs[0]) as image:
        assert image.mode == "RGB" and image.size == (8, 8)
        assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((7, 0)) == (0, 0, 0)  # over black
    lines = {split: {line for png in pngs if png.parts[-3] == split for line in captions[png.stem]}
             for split in ("train", "test")}
    assert lines["train"] and lines["test"] and not lines["train"] & lines["test"]
    assert (tmp_path / "out" / "train" / "flags" / "1f005.png").is_file()  # hashed to test, but shares "thing 7"
    assert data.ImageTextFolder(tmp_path / "out" / "train", 8)[0][1] in lines["train"]
    # the same split again, and over white on request
    assert in_process(capsys, data, "emoji", tmp_path / "package", tmp_path / "white", "--size", 8,
                      "--test-fraction", 0.3, "--background", "white").returncode == 0
    whites = sorted((tmp_path / "white").rglob("*.png"))
    assert [png.relative_to(tmp_path / "white") for png in whites] == [
        png.relative_to(tmp_path / "out") for png in pngs]
    with Image.open(whites[0]) as image:
        assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((7, 0)) == (255, 255, 255)


def test_emoji_prep_errors(tmp_path, capsys):
    assert_clean_error(in_process(capsys, data, "emoji", tmp_path / "missing", tmp_path / "out"), "no such folder")
    assert_clean_error(in_process(capsys, data, "emoji", tmp_path, tmp_path / "out"), "no emoji.json")
    fake_emoji_package(tmp_path / "package")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.png").write_bytes(b"")
    assert_clean_error(in_process(capsys, data, "emoji", tmp_path / "package", tmp_path / "out"), "not empty")


def test_save_grid_with_captions(tmp_path):
    images = torch.rand(5, 3, 16, 16)
    data.save_grid(images, tmp_path / "plain.png", nrow=4)
    assert Image.open(tmp_path / "plain.png").size == (4 * 18 + 2, 2 * 18 + 2)
    data.save_grid(images, tmp_path / "captioned.png", nrow=4, captions=["a large red circle at the top left"] * 5)
    grid = np.asarray(Image.open(tmp_path / "captioned.png"))
    assert grid.shape[1] == 4 * (96 + 2) + 2 and grid.shape[0] > 2 * (96 + 2)  # room for the text
    text_band = grid[2 + 96: 2 + 96 + 20, 2: 2 + 96]  # under the first tile
    assert (text_band.min(-1) > 180).sum() > 30  # white caption pixels were drawn
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


# ----------------------------------------------------------------------------------------------------
# data.py: plumbing


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = vae.VAE(vae.Config(image_size=16))
    data.save_checkpoint(tmp_path / "ckpt.pt", "vae", vae.Config(image_size=16), 7, model=model.state_dict())
    checkpoint = data.load_checkpoint(tmp_path / "ckpt.pt", "vae")
    assert checkpoint["step"] == 7 and checkpoint["config"]["image_size"] == 16
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in model.state_dict().items())
    with pytest.raises(data.UsageError, match="not a dcgan checkpoint"):
        data.load_checkpoint(tmp_path / "ckpt.pt", "dcgan")
    with pytest.raises(data.UsageError, match="does not fit"):
        data.load_state(vae.VAE(vae.Config(image_size=32)), checkpoint["model"], "ckpt.pt")
    with pytest.raises(data.UsageError, match="no such checkpoint"):
        data.load_checkpoint(tmp_path / "missing.pt", "vae")
    data.save_checkpoint(tmp_path / "partial.pt", "vae", vae.Config(), 1)  # no model state in it
    with pytest.raises(data.UsageError, match="incomplete vae checkpoint"):
        data.load_checkpoint(tmp_path / "partial.pt", "vae")
    marker = tmp_path / "pwned"
    torch.save({"kind": "vae", "payload": Exploit(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(data.UsageError, match="could run code"):
        data.load_checkpoint(tmp_path / "evil.pt", "vae")
    assert not marker.exists()
    for junk in (b"junk", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"):  # the second: an image renamed
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(data.UsageError, match="not a readable checkpoint"):
            data.load_checkpoint(tmp_path / "junk.pt", "vae")


class Exploit:
    """Unpickling this would create a file: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_config_cli_generation():
    config, given = data.parse_config(vae.Config, ["--steps", "7", "--no-resume", "--lr", "0.5"])
    assert config.steps == 7 and config.lr == 0.5 and config.resume is False and config.batch_size == 64
    assert given == {"steps", "resume", "lr"}
    help_text = run(ROOT / "vae.py", "--help").stdout
    assert "arXiv:1312.6114" in help_text
    for field in ("--batch-size", "--iw", "--resume", "--ckpt"):
        assert field in help_text
    assert "importance samples per image" in help_text  # each flag's help comes from its Config comment
    assert help_text.startswith("usage: vae.py [options]\n") and "python vae.py --sample 64" in help_text
    assert "ELBO   =" not in help_text and "deviations" not in help_text  # the docstring's maths stays in the file
    assert help_text[:help_text.index("options:")].count("\n") < 25  # the flags begin on the first screen

    @dataclasses.dataclass
    class Sampling:
        sample: list[str] = dataclasses.field(default_factory=list)  # captions
        n: int = 4  # images per caption
    config, given = data.parse_config(Sampling, ["--sample", "a red circle", "一个红色的圆", "-n", "3"])
    assert config == Sampling(["a red circle", "一个红色的圆"], 3) and given == {"sample", "n"}
    assert data.parse_config(Sampling, ["--n", "5"])[0] == Sampling([], 5)  # one-letter fields: -n and --n


def test_infinite_sampler_shards_and_resumes():
    ranks = [list(zip(range(10), data.InfiniteSampler(10, seed=3, rank=r, world_size=2))) for r in range(2)]
    first_epoch = [index for rank in ranks for _, index in rank[:5]]
    assert sorted(first_epoch) == list(range(10))  # the two ranks split an epoch disjointly
    full = [index for _, index in zip(range(23), data.InfiniteSampler(7, seed=1))]
    resumed = [index for _, index in zip(range(13), data.InfiniteSampler(7, seed=1, start=10))]
    assert resumed == full[10:]
    assert sorted(full[:7]) == list(range(7)) and full[:7] != full[7:14]  # reshuffled every epoch


def test_learning_rate_schedule():
    rates = [data.learning_rate(step, 100, 1.0, 10) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] == pytest.approx(0.1, abs=0.01)


def test_codes_keep_every_caption_and_training_draws_one_as_a_function_of_the_step(tmp_path):
    for i in range(6):  # six images, each with a name and a short name
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"name {i}\n\nshort {i}\n")

    class Tokenizer:  # what encode_split needs of a VQ-VAE-2
        top_shape, bottom_shape = (1, 1), (2, 2)

        def encode(self, images):  # (B, 3, S, S) -> top (B, 1, 1), bottom (B, 2, 2): the red level, twice
            red = (images[:, 0, :2, :2] * 5).round().long()  # (B, 2, 2)
            return red[:, :1, :1], red

    dataset = data.ImageTextFolder(tmp_path, 8)
    split = data.encode_split(Tokenizer(), dataset, list(range(6)), "cpu")
    assert split["captions"] == [f"name {i}\nshort {i}" for i in range(6)]  # every line, in the file's order
    assert dataset[0][1] in ("name 0", "short 0")  # the folder itself still gives one line
    codes = data.CodesDataset(split)
    assert codes.captions == [f"name {i}" for i in range(6)]  # the first line names an image in evaluations
    assert codes.codes[:, 0].tolist() == [round(40 * i / 255 * 5) for i in range(6)]
    assert {codes[2][1] for _ in range(40)} == {"name 2", "short 2"}
    runtime = data.Runtime(torch.device("cpu"))
    full = [captions for _, (_, captions) in zip(range(9), data.batches(codes, 2, runtime, seed=1))]
    resumed = [captions for _, (_, captions) in zip(range(4), data.batches(codes, 2, runtime, seed=1, start_step=5))]
    assert resumed == full[5:]  # the same lines drawn, so --resume continues exactly
    drawn = [caption for captions in full for caption in captions]
    assert {caption.split()[0] for caption in drawn} == {"name", "short"}
    assert {caption.split()[1] for caption in drawn} == {str(i) for i in range(6)}


def test_codes_mirror_appends_each_image_flipped_left_to_right_with_its_captions(tmp_path):
    for i in range(3):  # red in the left column only, a different amount in each image
        image = Image.new("RGB", (8, 8))
        image.paste((60 * (i + 1), 0, 0), (0, 0, 1, 8))
        image.save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"name {i}\nshort {i}\n")

    class Tokenizer:  # the red of the left and the right column: top (B, 1, 1), bottom (B, 1, 2)
        top_shape, bottom_shape = (1, 1), (1, 2)

        def state(self):
            return {"weights": torch.zeros(1)}

        def encode(self, images):
            columns = (images[:, 0, :1, [0, -1]] * 10).round().long()  # (B, 1, 2)
            return columns[:, :, :1], columns

    dataset = data.ImageTextFolder(tmp_path, 8)
    plain = data.encode_split(Tokenizer(), dataset, [0, 1, 2], "cpu", batch_size=2)
    both = data.encode_split(Tokenizer(), dataset, [0, 1, 2], "cpu", batch_size=2, mirror=True)
    assert torch.equal(both["bottom"][:3], plain["bottom"]) and both["captions"] == plain["captions"] * 2
    assert torch.equal(both["bottom"][3:], plain["bottom"].flip(-1))  # left and right swapped
    assert plain["bottom"][:, 0, 0].tolist() == [round(60 * (i + 1) / 255 * 10) for i in range(3)]
    assert plain["bottom"][:, 0, 1].tolist() == [0, 0, 0]
    assert plain["mirrored"] is False and both["mirrored"] is True  # what dalle.py checks before reusing codes
    (tmp_path / "codes").mkdir()  # a folder of parts continues only as it began, mirrored or not
    splits, runtime = {"train": dataset, "test": dataset}, data.Runtime(torch.device("cpu"))
    assert data.write_codes(Tokenizer(), splits, tmp_path / "codes", runtime)["train"]["mirrored"] is False
    with pytest.raises(data.UsageError, match="encoded without mirrored images"):
        data.write_codes(Tokenizer(), splits, tmp_path / "codes", runtime, mirror=("train",))
    for config in (dalle.Config(codes="codes.pt", flip=True), dalle.Config(flip=True)):  # shapes name left and right
        with pytest.raises(data.UsageError, match="--flip"):
            dalle.validate(config)
    dalle.validate(dalle.Config(train=str(tmp_path), flip=True))


def test_codes_parts_cut_datasets_in_order(tiny_shards):
    folder = data.Subset(list(range(10)), list(range(10)))
    shards = data.load_dataset(str(tiny_shards), 16)  # 4 shards of 12
    for dataset in (folder, shards):
        for count in (1, 2, 3, 5):
            parts = [data.part_indices(dataset, part, count) for part in range(count)]
            assert [i for part in parts for i in part] == list(range(len(dataset)))  # in order, each index once
    assert [len(data.part_indices(folder, part, 3)) for part in range(3)] == [4, 3, 3]


def test_teardown_frees_the_ddp_reducer_before_the_process_exits(tmp_path):
    """The first DDP model a process trains outlives its function in a reference cycle (in a fresh
    process: later ones in the same process need not); if teardown() left it to the interpreter's exit,
    its reducer would race gloo's threads there (the SIGABRT of the torchrun tests, one run in a few)."""
    script = f"""
import gc, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import data
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
def train():
    model = DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
gc.disable()  # so that only teardown() collects
train()
alive = lambda: sum(type(o) is DistributedDataParallel for o in gc.get_objects())
before = alive()
data.teardown()
print(before, alive(), dist.is_initialized())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "0", "False"]  # in a cycle after train(), freed by teardown()


# ----------------------------------------------------------------------------------------------------
# vae.py


def test_vae_shapes_for_several_sizes():
    for size in (16, 32, 64):
        config = vae.Config(image_size=size, latent_dim=8, width=8)
        model = vae.VAE(config)
        logits, mu, logvar = model(torch.rand(2, 3, size, size))
        assert logits.shape == (2, 3, size, size) and mu.shape == logvar.shape == (2, 8)


def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(4, 6), torch.ones(4, 6))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(vae.kl_divergence(mu, logvar), expected, atol=1e-5)


def test_likelihood_matches_torch_distributions():
    logits, x = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8).round()
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(vae.log_likelihood(logits, x), expected, atol=1e-4)


def test_importance_weighted_nll_exact_when_posterior_is_prior():
    # zero the last layers: mu = logvar = 0 (so q = p) and every logit is 0 (so p(x|z) = 2^-D for any
    # x in {0, 1}): then the IW estimate is exactly D ln 2 for every K, and so is the -ELBO.
    model = vae.VAE(vae.Config(image_size=16, latent_dim=4, width=8))
    for layer in (model.encoder.to_stats, model.decoder.net[-1]):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    x = torch.rand(3, 3, 16, 16).round()
    expected = torch.full((3,), 3 * 16 * 16 * np.log(2))
    for K in (1, 7, 60):
        assert torch.allclose(vae.importance_weighted_nll(model, x, K), expected, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(vae.negative_elbo(model, x)[0], expected, rtol=1e-5)
    # p(x|z) still 2^-D for every z, but q(z|x) = N(1/2, I) against p(z) = N(0, I): log p(x) = -D ln 2, the
    # -ELBO is D ln 2 + KL, KL = 4 (1/2)^2 / 2 = 0.5 nats; K = 1 gives the -ELBO on average, and the IW estimate
    # approaches D ln 2 as K grows, which needs the log p(z) - log q(z|x) term with its sign
    torch.nn.init.constant_(model.encoder.to_stats.bias[:4], 0.5)  # mu
    with torch.no_grad():
        assert torch.allclose(vae.negative_elbo(model, x)[0], expected + 0.5, rtol=1e-5)
    generator = torch.Generator().manual_seed(0)
    single = torch.stack([vae.importance_weighted_nll(model, x, 1, generator) for _ in range(400)]).mean(0)
    assert torch.allclose(single, expected + 0.5, atol=0.2), single - expected
    assert torch.allclose(vae.importance_weighted_nll(model, x, 2000, generator), expected, atol=0.15)


def test_importance_weighted_nll_bounds_the_elbo():
    torch.manual_seed(0)
    model = vae.VAE(vae.Config(image_size=16, latent_dim=4, width=8)).eval()
    x = torch.rand(8, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        neg_elbo = torch.stack([vae.negative_elbo(model, x, generator)[0] for _ in range(50)]).mean(0)
    iw_nll = vae.importance_weighted_nll(model, x, 200, generator)
    assert iw_nll.mean() < neg_elbo.mean()  # log p(x) >= IW bound >= ELBO
    single = torch.stack([vae.importance_weighted_nll(model, x, 1, generator) for _ in range(50)]).mean(0)
    assert torch.allclose(single, neg_elbo, rtol=0.02)  # K = 1 is the ELBO


def test_vae_training_lowers_held_out_loss(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    vae.main(["--train", str(tiny_shapes), "--image-size", "16", "--steps", "80", "--batch-size", "16",
              "--width", "16", "--log-every", "10", "--save-every", "10", "--iw", "20", "--out", str(out),
              "--warmup", "10", "--device", "cpu"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    held_out = [r["test_neg_elbo"] for r in records if "test_neg_elbo" in r and "test_iw_nll" not in r]
    assert len(held_out) == 8 and held_out[-1] < 0.7 * held_out[0], held_out
    final = [r for r in records if "test_iw_nll" in r][-1]
    assert final["test_iw_nll"] < final["test_neg_elbo"]


def test_vae_cli_end_to_end_resume_sample_eval(tiny_shapes, tmp_path, capsys):
    common = ["--train", tiny_shapes, "--image-size", 16, "--batch-size", 8, "--width", 8, "--iw", 2,
              "--log-every", 1, "--device", "cpu"]
    trained = run(ROOT / "vae.py", *common, "--steps", 3, "--save-every", 2, "--out", tmp_path / "a")
    assert trained.returncode == 0, trained.stderr
    assert "IW-NLL (K=2)" in trained.stdout
    for name in ("ckpt.pt", "metrics.jsonl", "config.json", "samples_000003.png", "reconstructions_000002.png"):
        assert (tmp_path / "a" / name).is_file(), name
    again = in_process(capsys, vae, *common, "--steps", 3, "--out", tmp_path / "a")
    assert_clean_error(again, "exists", "--resume")  # never overwrite a run by accident
    resumed = in_process(capsys, vae, "--resume", "--steps", 5, "--out", tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 3" in resumed.stdout and "step 5/5" in resumed.stdout
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 5

    sampled = in_process(capsys, vae, "--sample", 4, "--ckpt", tmp_path / "a" / "ckpt.pt", "--out", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    assert Image.open(tmp_path / "s" / "samples.png").size == (2 * 18 + 2, 2 * 18 + 2)
    assert Image.open(tmp_path / "s" / "interpolation.png").size[0] == 10 * 18 + 2
    evaluated = in_process(capsys, vae, "--eval", "--ckpt", tmp_path / "a" / "ckpt.pt", "--iw", 3)
    assert evaluated.returncode == 0 and "IW-NLL (K=3)" in evaluated.stdout, evaluated.stderr
    done = in_process(capsys, vae, "--resume", "--out", tmp_path / "a")
    assert_clean_error(done, "already", "--steps")


def test_vae_stop_signal_saves_and_resume_continues_exactly(tiny_shapes, tmp_path, monkeypatch):
    args = ["--train", str(tiny_shapes), "--image-size", "16", "--batch-size", "8", "--width", "8", "--iw", "2",
            "--log-every", "1", "--save-every", "100", "--steps", "7", "--warmup", "1", "--device", "cpu"]
    vae.main(args + ["--out", str(tmp_path / "straight")])

    # a Ctrl-C while step 4 runs: the step finishes, is saved, and the run stops
    ctrl_c_then_resume(monkeypatch, vae, args, tmp_path / "stopped", batch=3, saved_step=4)

    assert logged(tmp_path / "straight") == logged(tmp_path / "stopped") and len(logged(tmp_path / "stopped")) == 7
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "stopped"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 7


def test_vae_cli_bad_inputs(tmp_path, tiny_shapes, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/vae, stays in tmp_path
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"\xff\xd8 not really")
    missing = run(ROOT / "vae.py", "--train", tmp_path / "missing", "--out", tmp_path / "no_run")  # as a script
    assert_clean_error(missing, "no such folder")
    assert not (tmp_path / "no_run").exists()  # a new run that bad input stopped leaves nothing
    assert_clean_error(in_process(capsys, vae, "--train", tmp_path / "empty"), "no usable image")
    assert_clean_error(in_process(capsys, vae, "--train", "shapes:0"), "N from 1 to 1,000,000")
    assert_clean_error(in_process(capsys, vae, "--train", tmp_path / "broken"), "no usable image")
    assert_clean_error(in_process(capsys, vae, "--steps", "abc"), "invalid int")
    assert_clean_error(in_process(capsys, vae, "--steps", "-3"), "--steps")
    assert_clean_error(in_process(capsys, vae, "--image-size", "20"), "--image-size")
    assert_clean_error(in_process(capsys, vae, "--device", "tpu"), "--device")
    assert_clean_error(in_process(capsys, vae, "--device", "cuda:0"), "no CUDA device")
    assert_clean_error(in_process(capsys, vae, "--sample", 4, "--ckpt", tmp_path / "none.pt"), "no such checkpoint")
    data.save_checkpoint(tmp_path / "gan.pt", "dcgan", vae.Config(), 1, model={})
    assert_clean_error(in_process(capsys, vae, "--sample", 4, "--ckpt", tmp_path / "gan.pt"), "dcgan checkpoint")
    torch.save({"kind": "vae", "payload": Exploit(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    assert_clean_error(in_process(capsys, vae, "--eval", "--ckpt", tmp_path / "evil.pt"), "could run code")
    assert not (tmp_path / "pwned").exists()
    assert_clean_error(in_process(capsys, vae, "--resume", "--out", tmp_path / "norun"), "no such checkpoint")


def test_vae_torchrun_two_processes(tiny_shapes, tmp_path):
    stdout = succeeded(torchrun("vae.py", "--train", tiny_shapes, "--image-size", 16, "--steps", 4, "--batch-size", 4,
                                "--width", 8, "--iw", 2, "--log-every", 2, "--device", "cpu", out=tmp_path))
    assert "2 process(es)" in stdout and stdout.count("held-out (") == 1  # rank 0 reports once
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # one writer: no record twice
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4 and ranks_in_sync(tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))


def test_vae_on_shards_cli_and_exact_resume(tiny_shards, tmp_path, monkeypatch):
    spec = str(tiny_shards)
    trained = run(ROOT / "vae.py", "--train", spec, "--image-size", 16, "--batch-size", 8, "--width", 8, "--iw", 2,
                  "--steps", 2, "--out", tmp_path / "cli", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    assert "46 training images, 2 held out" in trained.stdout  # a fixed random 2 of the 48
    evaluated = run(ROOT / "vae.py", "--eval", "--ckpt", tmp_path / "cli" / "ckpt.pt")
    assert evaluated.returncode == 0 and "held-out (2 images)" in evaluated.stdout, evaluated.stderr
    assert_clean_error(run(ROOT / "vae.py", "--train", tiny_shards / "000009.tar"), "000009.tar: no such shard")

    # stopped at step 4 of 7 (8 images a step: the run crosses an epoch of 46), then resumed: the same run
    args = ["--train", spec, "--image-size", "16", "--batch-size", "8", "--width", "8", "--iw", "2", "--log-every",
            "1", "--save-every", "100", "--steps", "7", "--warmup", "1", "--device", "cpu"]
    vae.main(args + ["--out", str(tmp_path / "straight")])
    ctrl_c_then_resume(monkeypatch, vae, args, tmp_path / "stopped", batch=3)

    assert logged(tmp_path / "straight") == logged(tmp_path / "stopped") and len(logged(tmp_path / "stopped")) == 7
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "stopped"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])


# ----------------------------------------------------------------------------------------------------
# vqvae2.py


def tiny_vqvae2(image_size=16):
    return vqvae2.VQVAE2(vqvae2.Config(image_size=image_size, hidden=16, patch_hidden=32, residual_hidden=8,
                                       residual_blocks=1, codebook_size=32, code_dim=8))


def test_vqvae2_shapes_for_several_sizes():
    for size in (16, 32, 64):
        model = tiny_vqvae2(size)
        x = torch.rand(2, 3, size, size)
        assert model.encoder_bottom(x).shape == (2, 16, size // 4, size // 4)
        x_hat, commitments, (top, bottom) = model(x)
        assert x_hat.shape == x.shape and all(c.shape == () for c in commitments)
        assert top.shape == (2, *model.top_shape) == (2, size // 8, size // 8)
        assert bottom.shape == (2, *model.bottom_shape) == (2, size // 4, size // 4)
        assert model.decode(top, bottom).shape == x.shape
        assert model.top_codebook_size == model.bottom_codebook_size == 32 and model.image_size == size


def test_vqvae2_straight_through_gradient_is_identity():
    quantizer = vqvae2.VectorQuantizer(16, 4, decay=0.99).eval()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, ids, commitment = quantizer(z_e)
    assert torch.allclose(z_q, quantizer.lookup(ids))  # the forward value is the nearest code
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z_e.grad, upstream)  # and the gradient passes unchanged
    z_e.grad = None
    commitment.backward()  # d/dz_e mean((z_e - sg[z_q])^2) = 2 (z_e - z_q) / numel; nothing reaches the codebook
    assert torch.allclose(z_e.grad, 2 * (z_e - z_q).detach() / z_e.numel())


def quantizer_with_codes(codes, decay=0.99):
    quantizer = vqvae2.VectorQuantizer(len(codes), len(codes[0]), decay)
    quantizer.codebook.copy_(torch.tensor(codes, dtype=torch.float))
    quantizer.embed_sum.copy_(quantizer.codebook)
    quantizer.initialised.fill_(True)
    return quantizer


def as_z_e(vectors):
    """(N, D) vectors -> a (1, D, 1, N) encoder output."""
    return torch.tensor(vectors, dtype=torch.float).t()[None, :, None, :]


def test_vqvae2_ema_moves_a_code_to_the_mean_of_its_vectors():
    quantizer = quantizer_with_codes([[0.0, 0.0], [10.0, 10.0], [-50.0, 50.0]])
    near_first, near_second = [[1.0, 2.0], [2.0, 1.0], [0.0, 3.0]], [[9.0, 8.0], [8.0, 9.0]]
    z_e = as_z_e(near_first + near_second)
    quantizer(z_e)  # one step, checked against the equations (K = 3, eps = 1e-5)
    N = torch.tensor([0.99 + 0.01 * 3, 0.99 + 0.01 * 2, 0.99])
    m = 0.99 * torch.tensor([[0.0, 0.0], [10.0, 10.0], [-50.0, 50.0]])
    m[0] += 0.01 * torch.tensor(near_first).sum(0)
    m[1] += 0.01 * torch.tensor(near_second).sum(0)
    smoothed = (N + 1e-5) / (N.sum() + 3e-5) * N.sum()
    assert torch.allclose(quantizer.codebook, m / smoothed[:, None], atol=1e-5)
    for _ in range(1500):  # decay 0.99: after many steps each used code is the mean of its vectors
        quantizer(z_e)
    assert torch.allclose(quantizer.codebook[0], torch.tensor([1.0, 2.0]), atol=1e-3)
    assert torch.allclose(quantizer.codebook[1], torch.tensor([8.5, 8.5]), atol=1e-3)
    before = quantizer.codebook.clone()
    quantizer.eval()(z_e)  # eval mode never updates
    assert torch.equal(before, quantizer.codebook)


def test_vqvae2_dead_code_is_restarted():
    quantizer = quantizer_with_codes([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]])
    vectors = [[0.1, 0.0], [0.9, 1.0], [0.0, 0.2]]
    quantizer(as_z_e(vectors))
    kept = quantizer.codebook[:2].clone()
    used, restarted = quantizer.end_window(restart=False)
    assert used == 0.5 and restarted == 0 and quantizer.codebook[2, 0] > 50  # counted, not moved
    quantizer(as_z_e(vectors))
    used, restarted = quantizer.end_window(restart=True, generator=torch.Generator().manual_seed(0))
    assert used == 0.5 and restarted == 2 and quantizer.window_stats.tolist() == [0.5, 2.0, 2.0]
    for code in quantizer.codebook[2:]:  # each dead code now sits on one of the recent encoder outputs
        assert any(torch.allclose(code, torch.tensor(v)) for v in vectors)
    assert quantizer.usage.sum() == 0 and (quantizer.codebook[:2] - kept).abs().max() < 0.1
    quantizer(as_z_e(vectors))
    assert quantizer.end_window(restart=True)[0] > 0.5  # the restarted codes win vectors


def test_vqvae2_initialises_codebooks_from_the_first_batch():
    for count in (32, 8):  # more encoder outputs than codes: drawn without replacement; fewer: with
        quantizer = vqvae2.VectorQuantizer(16, 4, decay=1.0).train()  # decay 1: the EMA step keeps the codebook
        z_e = torch.randn(count // 4, 4, 2, 2)  # (B, D, H, W): `count` vectors
        quantizer(z_e)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)  # (count, D)
        distance, nearest = (quantizer.codebook[:, None] - flat[None]).norm(dim=2).min(1)  # (K, count) -> (K,)
        assert quantizer.initialised and distance.max() < 1e-4  # every code is one of the first batch's z_e
        assert len(set(nearest.tolist())) == 16 or count < 16  # all different when there are enough
    model = tiny_vqvae2(16)
    x = torch.rand(64, 3, 16, 16)
    model(x)
    top_inputs = model.encoder_top(model.encoder_bottom(2 * x - 1)).permute(0, 2, 3, 1).reshape(-1, 8)  # (B Ht Wt, D)
    distance = (model.quantize_top.codebook[:, None] - top_inputs[None]).norm(dim=2).min(1).values  # (K,)
    assert model.quantize_top.initialised and distance.max() < 0.1  # each EMA-updated once from one of these


def test_vqvae2_decode_of_encode_is_the_forward_reconstruction():
    torch.manual_seed(0)
    model = tiny_vqvae2(16)
    model(torch.rand(32, 3, 16, 16))  # a training step's forward initialises and updates the codebooks
    x = torch.rand(6, 3, 16, 16)
    model.train()
    codebooks = [model.quantize_top.codebook.clone(), model.quantize_bottom.codebook.clone()]
    top, bottom = model.encode(x)  # never updates, even in training mode
    assert torch.equal(codebooks[0], model.quantize_top.codebook) and model.training
    assert torch.equal(codebooks[1], model.quantize_bottom.codebook)
    with torch.no_grad():
        x_hat, _, (forward_top, forward_bottom) = model.eval()(x)
    assert torch.equal(top, forward_top) and torch.equal(bottom, forward_bottom)
    assert torch.allclose(model.decode(top.to(torch.int16), bottom.to(torch.int16)), x_hat.clamp(0, 1), atol=1e-5)


def test_vqvae2_pixelcnn_is_causal():
    torch.manual_seed(0)
    top_prior = vqvae2.PixelCNN(10, 8, 3)
    bottom_prior = vqvae2.PixelCNN(10, 8, 3, condition_codebook_size=6)
    condition = torch.randint(6, (1, 4, 4))
    for prior, shape, top in ((top_prior, (4, 4), None), (bottom_prior, (8, 8), condition)):
        ids = torch.randint(10, (1, *shape))
        with torch.no_grad():
            base = prior(ids, top)  # (1, K, H, W)
            for p in range(ids.numel()):
                changed = ids.clone()
                changed.view(-1)[p] = (changed.view(-1)[p] + 1) % 10
                difference = (prior(changed, top) - base).abs().amax(1).flatten()  # per position, (H W,)
                assert difference[: p + 1].max() == 0, p  # the code at p and every earlier logit: untouched
                if p + 1 < ids.numel():
                    assert difference[p + 1:].max() > 0, p  # some later position sees it
                if prior is top_prior and p + 1 < ids.numel():
                    assert difference[-1] > 0, p  # no blind spot: the last code sees every earlier one
    with torch.no_grad():
        assert not torch.equal(bottom_prior(ids, condition), bottom_prior(ids, (condition + 1) % 6))
        sampled = bottom_prior.sample(3, (8, 8), torch.Generator().manual_seed(0), condition.expand(3, 4, 4))
    assert sampled.shape == (3, 8, 8) and sampled.max() < 10


def test_vqvae2_training_lowers_the_loss(tiny_shapes, tmp_path):
    vqvae2.main(["--train", str(tiny_shapes), *map(str, TINY_VQVAE2), "--steps", "60", "--batch-size", "16",
                 "--log-every", "10", "--save-every", "10", "--window", "10", "--lr", "3e-3", "--warmup", "5",
                 "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mse = [r["mse"] for r in records if "mse" in r]
    assert len(mse) == 6 and mse[-1] < 0.5 * mse[0], mse
    assert all(0 < r["top_used"] <= 1 and 0 < r["bottom_used"] <= 1 for r in records if "mse" in r)
    held_out = [r["test_psnr"] for r in records if "test_psnr" in r]
    assert len(held_out) >= 6 and held_out[-1] > held_out[0] + 3, held_out  # dB, step 60 against step 10


def test_vqvae2_cli_train_resume_encode_prior_sample(tiny_shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out stays in tmp_path
    common = ["--train", tiny_shapes, *TINY_VQVAE2, "--batch-size", 8, "--log-every", 1, "--window", 2]
    trained = run(ROOT / "vqvae2.py", *common, "--steps", 3, "--save-every", 2, "--out", tmp_path / "a")
    assert trained.returncode == 0, trained.stderr
    assert "PSNR" in trained.stdout
    for name in ("ckpt.pt", "metrics.jsonl", "config.json", "reconstructions_000002.png", "reconstructions_000003.png"):
        assert (tmp_path / "a" / name).is_file(), name
    assert Image.open(tmp_path / "a" / "reconstructions_000003.png").size == (4 * 18 + 2, 18 + 2)  # 2 held out: 2 pairs
    assert_clean_error(in_process(capsys, vqvae2, *common, "--steps", 3, "--out", tmp_path / "a"), "exists", "--resume")
    resumed = in_process(capsys, vqvae2, "--resume", "--steps", 5, "--out", tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 3" in resumed.stdout and "step 5/5" in resumed.stdout
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 5

    encoded = in_process(capsys, vqvae2, "--encode", tiny_shapes, "--ckpt", tmp_path / "a" / "ckpt.pt")
    assert encoded.returncode == 0, encoded.stderr
    codes = torch.load(tmp_path / "a" / "codes.pt", weights_only=True)  # plain data only
    train_set, test_set = data.load_train_test(str(tiny_shapes), "", 16)
    tokenizer = vqvae2.VQVAE2.from_checkpoint(tmp_path / "a" / "ckpt.pt")
    for split, dataset in (("train", train_set), ("test", test_set)):
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        top, bottom = tokenizer.encode(images)
        assert codes[split]["top"].dtype == torch.int16 and codes[split]["top"].shape == (len(dataset), 2, 2)
        assert torch.equal(codes[split]["top"].long(), top) and torch.equal(codes[split]["bottom"].long(), bottom)
        assert codes[split]["captions"] == [dataset[i][1] for i in range(len(dataset))]
    rebuilt = vqvae2.VQVAE2.from_state(codes["tokenizer"])  # the codes file carries its tokenizer
    assert torch.equal(rebuilt.decode(top, bottom), tokenizer.decode(top, bottom))

    prior = ["--train-prior", tmp_path / "a" / "codes.pt", "--prior-width", 8, "--prior-layers", 2,
             "--batch-size", 8, "--log-every", 1, "--save-every", 2, "--device", "cpu"]
    priors = in_process(capsys, vqvae2, *prior, "--steps", 2)
    assert priors.returncode == 0, priors.stderr
    assert "bits/code" in priors.stdout and (tmp_path / "a" / "prior" / "samples_000002.png").is_file()
    resumed = in_process(capsys, vqvae2, *prior, "--steps", 3, "--resume")
    assert resumed.returncode == 0 and "from step 2" in resumed.stdout, resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "a" / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "top_bits" in r] == [1, 2, 3] and "test_top_bits" in records[-1]
    sampled = in_process(capsys, vqvae2, "--sample", 4, "--ckpt", tmp_path / "a" / "prior" / "ckpt.pt", "--out", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    assert Image.open(tmp_path / "s" / "samples.png").size == (2 * 18 + 2, 2 * 18 + 2)
    evaluated = in_process(capsys, vqvae2, "--eval", "--ckpt", tmp_path / "a" / "ckpt.pt", "--test", tiny_shapes)
    assert evaluated.returncode == 0 and "held-out (48 images)" in evaluated.stdout, evaluated.stderr

    assert_clean_error(in_process(capsys, vqvae2, "--sample", 4, "--ckpt", tmp_path / "a" / "ckpt.pt"),
                       "vqvae2 checkpoint, not a vqvae2-prior checkpoint")
    assert_clean_error(in_process(capsys, vqvae2, "--train-prior", tmp_path / "a" / "ckpt.pt", "--out", tmp_path / "p"),
                       "not a vqvae2-codes")
    assert_clean_error(in_process(capsys, vqvae2, "--encode", tiny_shapes, "--sample", 2), "cannot be combined")
    assert_clean_error(in_process(capsys, vqvae2, "--encode", tiny_shapes, "--ckpt", tmp_path / "none.pt"),
                       "no such checkpoint")
    assert_clean_error(in_process(capsys, vqvae2, "--image-size", 20), "--image-size")


def test_vqvae2_stop_and_resume_continue_exactly(tiny_shapes, tmp_path, monkeypatch):
    args = ["--train", str(tiny_shapes), *map(str, TINY_VQVAE2), "--batch-size", "8", "--log-every", "1",
            "--save-every", "100", "--steps", "8", "--window", "2", "--warmup", "1"]
    vqvae2.main(args + ["--out", str(tmp_path / "straight")])
    # a Ctrl-C while step 5 runs: after a window closed with restarts at step 4
    ctrl_c_then_resume(monkeypatch, vqvae2, args, tmp_path / "stopped", batch=4, saved_step=5)

    def records(folder):
        return [{k: v for k, v in r.items() if k not in ("time", "images_per_second")}
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert records(tmp_path / "straight") == records(tmp_path / "stopped") and len(records(tmp_path / "stopped")) == 8
    assert records(tmp_path / "straight")[-1]["bottom_restarts_total"] > 0  # restarts happened, and repeated
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "stopped"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])


def test_vqvae2_torchrun_keeps_codebooks_identical(tiny_shapes, tmp_path):
    stdout = succeeded(torchrun("vqvae2.py", "--train", tiny_shapes, *TINY_VQVAE2, "--steps", 6, "--batch-size", 4,
                                "--window", 2, "--log-every", 2, out=tmp_path))
    assert "2 process(es)" in stdout and stdout.count("held-out (") == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6] and ranks_in_sync(tmp_path)
    assert all(r["codebook_spread"] == 0.0 for r in logged)  # every rank holds the same codebooks
    assert logged[-1]["top_restarts_total"] > 0 and logged[-1]["bottom_restarts_total"] > 0  # restarts included


def test_vqvae2_prior_killed_before_its_first_checkpoint_resumes_from_its_flags_as_a_prior(tiny_shapes, tmp_path,
                                                                                            monkeypatch, capsys):
    vqvae2.main(["--train", str(tiny_shapes), *map(str, TINY_VQVAE2), "--batch-size", "8", "--steps", "2",
                 "--out", str(tmp_path / "a")])
    vqvae2.main(["--encode", str(tiny_shapes), "--ckpt", str(tmp_path / "a" / "ckpt.pt")])
    prior = ["--train-prior", str(tmp_path / "a" / "codes.pt"), "--prior-width", "8", "--prior-layers", "2",
             "--batch-size", "8", "--steps", "3", "--save-every", "2", "--lr", "0.001", "--device", "cpu"]
    vqvae2.main(prior + ["--out", str(tmp_path / "straight")])
    with monkeypatch.context() as patch:
        patch.setattr(vqvae2, "batches", die)
        with pytest.raises(Killed):
            vqvae2.main(prior + ["--out", str(tmp_path / "killed")])
    assert not (tmp_path / "killed" / "ckpt.pt").exists()
    vqvae2.main(["--resume", "--out", str(tmp_path / "killed")])  # no checkpoint: from step 0, with its config.json
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "killed"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    vqvae2.main(["--resume", "--steps", "4", "--out", str(tmp_path / "killed")])  # as a prior, not an autoencoder
    b = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    assert b["kind"] == "vqvae2-prior" and (b["step"], b["config"]["prior_width"], b["config"]["lr"]) == (4, 8, 0.001)


def test_vqvae2_two_nodes_on_shards(tiny_shards, tmp_path):
    stdout = succeeded(torchrun("vqvae2.py", "--train", tiny_shards, *TINY_VQVAE2,
                                "--steps", 6, "--batch-size", 4, "--window", 2, "--log-every", 2, out=tmp_path, nodes=2))
    assert stdout.count("2 process(es)") == 1 and stdout.count("held-out (2 images)") == 1  # global rank 0 only
    logged = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert all(r["codebook_spread"] == 0.0 for r in logged)  # the two nodes hold the same codebooks


def test_vqvae2_encode_parts_under_torchrun_equal_one_process(tiny_shapes, tiny_shards, tmp_path, capsys):
    tokenizer = tiny_vqvae2()
    images = data.load_dataset(str(tiny_shapes), 16)
    tokenizer.train()(torch.stack([images[i][0] for i in range(len(images))]))  # codebooks from the data
    data.save_checkpoint(tmp_path / "tokenizer.pt", "vqvae2", tokenizer.config, 1, model=tokenizer.state_dict())
    encode = ["--encode", tiny_shards, "--ckpt", tmp_path / "tokenizer.pt", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks below: the same sums, so the same nearest codes, bit for bit
    try:
        assert in_process(capsys, vqvae2, *encode, "--out", tmp_path / "one.pt").returncode == 0
    finally:
        torch.set_num_threads(threads)
    stdout = succeeded(torchrun("vqvae2.py", *encode, out=tmp_path / "parts"))
    assert "codes: 46 train, 2 held out, in 2 parts" in stdout
    names = ["part-00000-of-00002.pt", "part-00001-of-00002.pt"]
    assert sorted(path.name for path in (tmp_path / "parts").iterdir()) == names
    one, parts = torch.load(tmp_path / "one.pt", weights_only=True), vqvae2.load_codes(tmp_path / "parts")
    for split in ("train", "test"):  # the parts, in order, are the one-process codes, in the same order
        assert torch.equal(one[split]["top"], parts[split]["top"]) and torch.equal(one[split]["bottom"], parts[split]["bottom"])
        assert one[split]["captions"] == parts[split]["captions"]
    assert one["train"]["bottom"].unique().numel() > 8  # codes worth comparing
    assert data.same_state(one["tokenizer"], parts["tokenizer"])
    halves = [torch.load(tmp_path / "parts" / name, weights_only=True) for name in names]
    assert [len(half["train"]["captions"]) for half in halves] == [23, 23]  # each half of the 46 in order
    assert [(half["kind"], half["part"], half["parts"]) for half in halves] == [("vqvae2-codes", 0, 2), ("vqvae2-codes", 1, 2)]

    # a stopped encoding: one process writes the missing part only, and what it writes is the same
    first = (tmp_path / "parts" / names[0]).stat().st_mtime_ns
    (tmp_path / "parts" / names[1]).unlink()
    (tmp_path / "parts" / f".{names[1]}.tmp").write_bytes(b"half")  # left by a SIGKILL
    resumed = in_process(capsys, vqvae2, *encode, "--out", tmp_path / "parts")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(path.name for path in (tmp_path / "parts").iterdir()) == names  # the temporary was written over
    assert (tmp_path / "parts" / names[0]).stat().st_mtime_ns == first
    again = torch.load(tmp_path / "parts" / names[1], weights_only=True)
    assert torch.equal(again["train"]["bottom"], halves[1]["train"]["bottom"])

    # refused: an incomplete folder, a part of another tokenizer, a part alone
    (tmp_path / "incomplete").mkdir()
    (tmp_path / "incomplete" / names[0]).write_bytes((tmp_path / "parts" / names[0]).read_bytes())
    other = tiny_vqvae2()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / names[0]).write_bytes((tmp_path / "parts" / names[0]).read_bytes())
    torch.save(halves[1] | {"tokenizer": other.state()}, tmp_path / "mixed" / names[1])
    for codes, message in ((tmp_path / "incomplete", "incomplete, 1 of 2 parts (missing: 1)"),
                           (tmp_path / "mixed", f"{names[1]}: made by another tokenizer than {names[0]}"),
                           (tmp_path / "parts" / names[1], "one part of 2; pass the folder"),
                           (tmp_path, "no codes in it")):
        assert_clean_error(in_process(capsys, vqvae2, "--train-prior", codes, "--out", tmp_path / "prior"), message)
        assert_clean_error(in_process(capsys, dalle, "--codes", codes, "--out", tmp_path / "refused"), message)
    assert_clean_error(in_process(capsys, vqvae2, *encode, "--out", tmp_path / "mixed"), "made by another tokenizer")
    data.save_checkpoint(tmp_path / "retrained.pt", "vqvae2", other.config, 1, model=other.state_dict())
    assert_clean_error(in_process(capsys, vqvae2, "--encode", tiny_shards, "--ckpt", tmp_path / "retrained.pt",
                                  "--out", tmp_path / "parts"), "parts were made by another tokenizer")
    assert_clean_error(in_process(capsys, vqvae2, "--encode", tiny_shards, "--ckpt", tmp_path / "retrained.pt",
                                  "--out", tmp_path / "incomplete"), "parts were made by another tokenizer")
    assert [path.name for path in (tmp_path / "incomplete").iterdir()] == [names[0]]  # refused before encoding
    for folder in ("unrecorded", "flip-mixed"):  # mirroring: every part alike; parts that do not say it, unknown
        (tmp_path / folder).mkdir()
    for name, half in zip(names, halves):
        torch.save(half | {split: {key: value for key, value in half[split].items() if key != "mirrored"}
                           for split in ("train", "test")}, tmp_path / "unrecorded" / name)
        torch.save(half | {"train": half["train"] | {"mirrored": name == names[1]}}, tmp_path / "flip-mixed" / name)
    assert parts["train"]["mirrored"] is False
    assert vqvae2.load_codes(tmp_path / "unrecorded")["train"]["mirrored"] is None
    assert_clean_error(in_process(capsys, dalle, "--codes", tmp_path / "flip-mixed"), "mix mirrored and plain images")

    # the priors and the transformer train on a folder of parts
    prior = in_process(capsys, vqvae2, "--train-prior", tmp_path / "parts", "--prior-width", 8, "--prior-layers", 2,
                       "--batch-size", 8, "--steps", 1, "--device", "cpu")
    assert prior.returncode == 0 and "46 training code grids, 2 held out" in prior.stdout, prior.stderr
    trained = in_process(capsys, dalle, "--codes", tmp_path / "parts", "--image-size", 16, "--width", 32, "--layers", 1,
                         "--heads", 2, "--text-len", 40, "--batch-size", 8, "--steps", 2, "--device", "cpu", "--out",
                         tmp_path / "dalle")
    assert trained.returncode == 0 and "46 training, 2 held out" in trained.stdout, trained.stderr
    assert "stage 1/3" not in trained.stdout and "stage 2/3" not in trained.stdout
    scored = in_process(capsys, dalle, "--eval", "--ckpt", tmp_path / "dalle" / "ckpt.pt")  # the codes' held-out captions
    assert scored.returncode == 0 and "shapes scorer on 2 test captions" in scored.stdout, scored.stderr
    assert_clean_error(in_process(capsys, dalle, "--codes", tmp_path / "parts", "--vqvae", tmp_path / "tokenizer.pt"),
                       "leave out --vqvae")


# ----------------------------------------------------------------------------------------------------
# dalle.py


TINY_TOKENIZER = "--vqvae-flags=--hidden 16 --patch-hidden 32 --residual-hidden 8 --residual-blocks 1 " \
                 "--codebook-size 32 --code-dim 8 --batch-size 8 --window 2 --log-every 5"


TINY_DALLE = ["--image-size", 16, "--vqvae-steps", 6, TINY_TOKENIZER, "--width", 32, "--layers", 1, "--heads", 2,
              "--text-len", 40, "--batch-size", 8, "--device", "cpu"]


def tiny_dalle(dtype=torch.float32, seed=0, **flags):
    torch.manual_seed(seed)
    config = dalle.Config(width=32, layers=2, heads=4, text_len=12, **{"adaln": True, **flags})  # every addition on
    model = dalle.DALLE(config, (2, 2), (4, 4), 24, 40).to(dtype).eval()  # L = 12 + 4 + 16 = 32
    for parameter in model.parameters():  # the zero-initialised position embeddings get values too
        parameter.data += 0.02 * torch.randn_like(parameter)
    model.top_appearance.uniform_(-1, 1), model.bottom_appearance.uniform_(-1, 1)  # as if code_appearance had run
    return model


def random_tokens(model, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text = data.encode_text(["a red circle", "ein rotes Quadrat am oberen Rand", "", "一个红圆"][:batch], model.text_len)
    top = torch.randint(0, 24, (batch, model.top_count), generator=generator)
    bottom = torch.randint(0, 40, (batch, model.bottom_count), generator=generator)
    return torch.cat([text, top, bottom], 1)  # (B, L)


def all_logits(model, tokens):
    text, (top, bottom) = model(tokens)
    return [text, top, bottom]


def test_dalle_text_is_bytes_any_language_and_cut_to_length():
    text = data.encode_text(["héllo 世界 🙂", "x" * 100], 16)
    assert text.shape == (2, 16) and text[1].tolist() == [ord("x")] * 16
    assert decode_text(text[:1]) == ["héllo 世界 \ufffd"]  # the emoji's bytes are cut at 16: replaced
    assert text[0, :6].tolist() == list("héllo".encode())[:6]


def test_dalle_has_no_future_leakage():
    model = tiny_dalle(torch.float64)
    tokens = random_tokens(model, 2)
    for t in (3, model.text_len + 2, model.length - 5):
        changed = tokens.clone()
        vocabulary = 257 if t < model.text_len else 24 if t < model.text_len + model.top_count else 40
        changed[:, t] = (changed[:, t] + 7) % vocabulary
        text, (top, bottom) = model(changed)
        per_position = torch.cat([text.abs().sum(-1), top.abs().sum(-1), bottom.abs().sum(-1)], 1)  # (B, L-1)
        reference = torch.cat([x.abs().sum(-1) for x in all_logits(model, tokens)], 1)
        # the output at position i predicts token i + 1: outputs at positions < t must not move
        assert torch.equal(per_position[:, :t], reference[:, :t])
        assert not torch.allclose(per_position[:, t:], reference[:, t:])


def test_dalle_adaln_starts_as_the_plain_blocks_then_the_caption_scales_the_image_positions():
    config = dalle.Config(width=32, layers=2, heads=4, text_len=12, summary=True)
    plain, modulated = (dalle.DALLE(c, (2, 2), (4, 4), 24, 40).eval()
                        for c in (config, dataclasses.replace(config, adaln=True)))
    assert modulated.load_state_dict(plain.state_dict(), strict=False).missing_keys == [
        f"modulation.{i}.{name}" for i in range(2) for name in ("weight", "bias")]
    tokens = random_tokens(plain, 2)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(all_logits(plain, tokens), all_logits(modulated, tokens)))
        for layer in modulated.modulation:  # adaLN-Zero: zero at first, anything once trained
            layer.weight.normal_(0, 0.1)
        before, after = all_logits(plain, tokens), all_logits(modulated, tokens)
    assert torch.equal(before[0], after[0])  # the caption's bytes are predicted as before, from the bytes alone
    assert not torch.allclose(before[1], after[1]) and not torch.allclose(before[2], after[2])
    with pytest.raises(data.UsageError, match="--adaln"):
        dalle.validate(dataclasses.replace(config, summary=False, adaln=True))


def test_dalle_caption_summary_reads_words_wherever_they_sit():
    summary = tiny_dalle(torch.float64).summary
    text = data.encode_text(["dog face", "face", "dog"], 12)  # (3, 12)
    shifted = torch.cat([torch.full((3, 3), data.PAD), text[:, :9]], 1)  # the same captions 3 bytes later
    assert torch.allclose(summary(shifted), summary(text), atol=1e-12)
    assert not torch.allclose(summary(text[:1]), summary(text[1:2]))
    # the empty caption (guidance's unconditional half) gets the bias alone
    assert torch.allclose(summary(torch.full((1, 12), data.PAD)), summary.out.bias[None])


def test_dalle_drop_key_is_causal_never_empty_and_off_at_evaluation():
    torch.manual_seed(0)
    model = dalle.DALLE(dalle.Config(width=32, layers=2, heads=4, text_len=12, dropout=0.0, drop_key=0.99),
                        (2, 2), (4, 4), 24, 40).double()
    tokens = random_tokens(model, 2)
    changed = tokens.clone()
    t = model.text_len + 3
    changed[:, t] = (changed[:, t] + 7) % 24
    model.train()
    outputs = []
    for batch in (tokens, changed):
        torch.manual_seed(1)  # the same keys dropped in both
        outputs.append(model.hidden(batch))  # (B, L, C)
    assert torch.isfinite(outputs[0]).all()  # nearly every key dropped, but each query still sees itself
    assert torch.equal(outputs[0][:, :t], outputs[1][:, :t])  # dropping keys never lets the future in
    torch.manual_seed(2)
    assert not torch.allclose(model.hidden(tokens), outputs[0])  # a different draw drops other keys
    model.eval()
    assert torch.equal(model.hidden(tokens), model.hidden(tokens))  # evaluation drops nothing


def test_dalle_keep_mask_and_dropout_have_the_right_rates():
    torch.manual_seed(0)
    for p in (0.0, 0.2, 0.5, 0.9):
        mask = dalle.keep_mask((3, 5, 7001), p, "cpu")  # an odd count: the last 64-bit draw is cut
        assert mask.shape == (3, 5, 7001) and mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - (1 - p)) < 0.01  # 105,015 draws: 0.01 is over 6 standard deviations
    rows = dalle.keep_mask((2000, 64), 0.5, "cpu").float()
    assert abs((rows[:, :-1] * rows[:, 1:]).mean().item() - 0.25) < 0.01  # neighbours independent
    x = torch.ones(100_000)
    dropped = dalle.dropout(x, 0.2, True)
    assert set(dropped.unique().tolist()) == {0.0, 1.25} and abs(dropped.mean().item() - 1) < 0.02
    assert torch.equal(dalle.dropout(x, 0.2, False), x) and torch.equal(dalle.dropout(x, 0.0, True), x)


def test_dalle_code_appearance_is_the_mean_decoded_patch_and_reaches_only_its_code():
    torch.manual_seed(0)
    tokenizer = vqvae2.VQVAE2(vqvae2.Config(image_size=16, hidden=8, patch_hidden=8, residual_hidden=4,
                                            residual_blocks=1, codebook_size=6, code_dim=4)).eval()
    model = dalle.DALLE(dalle.Config(width=16, layers=1, heads=2, text_len=4), tokenizer.top_shape,
                        tokenizer.bottom_shape, 6, 6).eval()
    Nt, Nb = model.top_count, model.bottom_count  # 2 x 2 and 4 x 4
    codes = torch.randint(0, 5, (7, Nt + Nb), generator=torch.Generator().manual_seed(1))  # code 5 never used
    dalle.code_appearance(model, tokenizer, codes, chunk=3)  # in pieces of 3, 3 and 1 grids
    top, bottom = vqvae2.split_codes(codes, tokenizer)  # (7, 2, 2), (7, 4, 4)
    images = 2 * tokenizer.decode(top, bottom) - 1  # (7, 3, 16, 16) in [-1, 1]
    for appearance, grid, side in ((model.top_appearance, top, 8), (model.bottom_appearance, bottom, 4)):
        for k in range(6):  # the mean of the decoded patches under code k, one at a time
            patches = [images[n, :, i * side:(i + 1) * side, j * side:(j + 1) * side].flatten()
                       for n, i, j in (grid == k).nonzero().tolist()]
            expected = torch.stack(patches).mean(0) if patches else torch.zeros(3 * side * side)
            assert torch.allclose(appearance[k], expected, atol=1e-6), (side, k)
    assert (model.bottom_appearance[5] == 0).all() and model.bottom_appearance[:5].abs().sum() > 0
    # a code's appearance moves that code's logit and no other (code 0 is not among the inputs)
    tokens = torch.cat([data.encode_text(["ab"], 4), torch.randint(1, 6, (1, Nt + Nb))], 1)  # (1, L)
    before = model(tokens)[1][1]  # (1, Nb, 6)
    model.bottom_appearance[0] += 0.5
    changed = (model(tokens)[1][1] != before).any(1)[0]  # (6,)
    assert changed.tolist() == [True, False, False, False, False, False]


def test_dalle_silhouette_is_the_same_in_every_colour():
    mask = torch.rand(2, 1, 16, generator=torch.Generator().manual_seed(0))  # two 4 x 4 patches, coverage in [0, 1)
    mask[:, :, 0] = 1  # each has a fully covered pixel
    colours = torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 0.5, 1], [0.4, 0, 0]])[:, :, None]  # red, white, azure, dark red
    silhouettes = [dalle.brightness((2 * mask * colour - 1).flatten(1)) for colour in colours]  # on black: -1
    assert all(torch.allclose(silhouette, mask[:, 0]) for silhouette in silhouettes)
    assert torch.equal(dalle.brightness(-torch.ones(1, 48)), torch.zeros(1, 16))  # a black patch stays black


def test_dalle_code_drop_leaves_out_whole_codes_in_and_out_in_training_only():
    torch.manual_seed(0)
    model = dalle.DALLE(dalle.Config(width=16, layers=1, heads=2, text_len=4, code_drop=0.25), (2, 2), (4, 4), 24, 4000)
    model.top_appearance.uniform_(-1, 1), model.bottom_appearance.uniform_(-1, 1)
    learned_in, learned_out = model.bottom_embedding.weight, model.bottom_head.weight  # (K, C)
    with torch.no_grad():
        _, _, (_, _, evaluated_in, evaluated_out) = model.eval().parts()
        description = evaluated_in - learned_in  # (K, C), describe(a_k) + silhouette(m_k)
        assert torch.allclose(evaluated_out - learned_out, description, atol=1e-6)  # evaluation: nothing left out
        _, _, (_, _, trained_in, trained_out) = model.train().parts()
    free_in, free_out = trained_in - description, trained_out - description  # (K, C)
    kept = free_in.abs().amax(1) > 1e-4  # (K,); the learned vectors are N(0, 0.02^2), a dropped one rounding error
    assert torch.equal(kept, free_out.abs().amax(1) > 1e-4)  # a code sits out in and out together
    assert abs((~kept).float().mean().item() - 0.25) < 0.03  # of 4,000 codes, about a quarter
    assert torch.allclose(free_in[kept], learned_in[kept] / 0.75, atol=1e-6)  # the rest scaled by 1 / (1 - p)
    assert torch.allclose(free_out[kept], learned_out[kept] / 0.75, atol=1e-6)
    assert torch.allclose(trained_in[~kept], description[~kept], atol=1e-6)  # a dropped code is its description
    plain = dalle.DALLE(dalle.Config(width=16, layers=1, heads=2, text_len=4, code_drop=0.25, appearance=False),
                        (2, 2), (4, 4), 24, 40).train()  # without descriptions, nothing is left out
    _, _, (_, _, plain_in, plain_out) = plain.parts()
    assert torch.equal(plain_in, plain.bottom_embedding.weight) and torch.equal(plain_out, plain.bottom_head.weight)


def test_dalle_noisy_codes_replace_input_codes_only_at_rate_p_within_each_codebook():
    model = dalle.DALLE(dalle.Config(width=16, layers=1, heads=2, text_len=4, appearance=False), (2, 2), (4, 4), 8, 300)
    y, top, bottom = torch.randint(0, 256, (500, 4)), torch.randint(0, 8, (500, 4)), torch.randint(0, 300, (500, 16))
    tokens = torch.cat([y, top, bottom], 1)  # (B, T + Nt + Nb)
    generator = torch.Generator().manual_seed(0)
    assert dalle.noisy_codes(model, tokens, 0.0, generator) is tokens
    noisy = dalle.noisy_codes(model, tokens, 0.4, generator)
    assert torch.equal(noisy[:, :4], tokens[:, :4])  # the caption is never touched
    assert noisy[:, 4:8].max() < 8  # a top code stays a top code
    top_changed = (noisy[:, 4:8] != tokens[:, 4:8]).float().mean().item()  # a replacement may draw the same code
    assert abs(top_changed - 0.4 * 7 / 8) < 0.04, top_changed  # 2,000 top codes, 1/8 redrawn unchanged
    replaced = noisy[:, 8:] != tokens[:, 8:]  # (B, Nb)
    assert abs(replaced.float().mean().item() - 0.4 * 299 / 300) < 0.01, replaced.float().mean()
    assert abs(noisy[:, 8:][replaced].float().mean().item() - 149.5) < 10  # uniform over the 300 bottom codes
    model.eval()
    with torch.no_grad():  # the targets stay the clean codes: the loss differs only through what the model reads
        clean_text, clean = dalle.losses(model, tokens[:8])
        text, nll = dalle.losses(model, tokens[:8], noisy[:8])
        _, read_noisy = dalle.losses(model, noisy[:8])
    assert torch.equal(text, clean_text) and not torch.equal(nll, clean) and not torch.equal(nll, read_noisy)
    z = tokens[:8, 4:]
    logits = model(noisy[:8])[1]
    expected = -torch.cat([logit.log_softmax(-1).gather(-1, target[..., None])[..., 0]  # (8, N)
                           for logit, target in zip(logits, z.split([4, 16], 1))], 1)  # (8, Nt + Nb)
    assert torch.allclose(nll, expected, atol=1e-5)


def test_dalle_stop_and_resume_continue_exactly(tiny_shapes, tmp_path, monkeypatch, capsys):
    args = ["--train", str(tiny_shapes), *map(str, TINY_DALLE), "--steps", "4", "--log-every", "1",
            "--save-every", "100", "--warmup", "1", "--code-noise", "0.3", "--reranker"]  # dropout, DropKey: defaults
    dalle.main(args + ["--out", str(tmp_path / "straight")])
    # a Ctrl-C while step 3 runs
    ctrl_c_then_resume(monkeypatch, dalle, args, tmp_path / "stopped", batch=2, saved_step=3)
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "stopped"))
    assert all(torch.equal(a[part][key], b[part][key]) for part in ("model", "reranker") for key in a[part])
    dalle.main([*args[:-1], "--vqvae", str(tmp_path / "straight" / "vqvae2" / "ckpt.pt"), "--out", str(tmp_path / "p")])
    c = torch.load(tmp_path / "p" / "ckpt.pt", weights_only=True)  # without --reranker the transformer is the same
    assert "reranker" not in c and all(torch.equal(a["model"][key], c["model"][key]) for key in c["model"])
    capsys.readouterr()
    for out, flag in (("stopped", "--no-reranker"), ("p", "--reranker")):
        assert_clean_error(in_process(capsys, dalle, "--resume", "--steps", 6, flag, "--out", tmp_path / out),
                           "--reranker cannot be switched")
    scored = in_process(capsys, dalle, "--eval", "--ckpt", tmp_path / "stopped" / "ckpt.pt", "-n", 3, "--keep", 2)
    assert scored.returncode == 0 and "the best 2 of 3 samples of each by the reranker" in scored.stdout, scored
    assert_clean_error(in_process(capsys, dalle, "--sample", "x", "-n", 2, "--keep", 1, "--ckpt",
                                  tmp_path / "p" / "ckpt.pt"), "trained without --reranker")  # nothing to rank by


def test_dalle_killed_in_any_stage_starts_again_from_the_stages_it_finished(tiny_shapes, tmp_path, monkeypatch, capsys):
    args = ["--train", str(tiny_shapes), *map(str, TINY_DALLE), "--steps", "3", "--save-every", "2", "--log-every",
            "1", "--warmup", "1", "--code-drop", "0.25", "--adaln", "--flip"]  # none of them the default
    dalle.main(args + ["--out", str(tmp_path / "straight")])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    train = torch.load(tmp_path / "straight" / "codes.pt", weights_only=True)["train"]  # --flip: each image mirrored
    half = len(train["captions"]) // 2
    assert train["captions"][:half] == train["captions"][half:] and not torch.equal(*train["bottom"].split(half))
    # killed while the tokenizer trains, while the dataset is encoded, and before the transformer's first save
    for stage, (module, name) in enumerate([(vqvae2, "batches"), (data, "encode_split"), (dalle, "batches")], 1):
        out = tmp_path / f"killed_in_stage_{stage}"
        with monkeypatch.context() as patch:
            patch.setattr(module, name, die)
            with pytest.raises(Killed):
                dalle.main(args + ["--out", str(out)])
        assert not (out / "ckpt.pt").exists() and (out / "codes.pt").exists() == (stage == 3)
        capsys.readouterr()
        dalle.main(["--resume", "--out", str(out)])  # no checkpoint yet: its flags from config.json
        stdout = capsys.readouterr().out
        assert ("stage 1/3" in stdout, "stage 2/3" in stdout) == (stage == 1, stage <= 2), stdout  # finished: kept
        resumed = torch.load(out / "ckpt.pt", weights_only=True)
        assert resumed["config"] == {**straight["config"], "out": str(out), "resume": True}
        assert all(torch.equal(straight["model"][key], resumed["model"][key]) for key in straight["model"])
        record = json.loads((out / "config.json").read_text())
        assert record == {**straight["config"], "out": str(out), "resume": True}
    shutil.copytree(tiny_shapes, tmp_path / "images")  # killed in stage 1; its images moved; resumed from there
    with monkeypatch.context() as patch:
        patch.setattr(vqvae2, "batches", die)
        with pytest.raises(Killed):
            dalle.main(["--train", str(tmp_path / "images"), *args[2:], "--out", str(tmp_path / "moved")])
    (tmp_path / "images").rename(tmp_path / "elsewhere")
    dalle.main(["--resume", "--train", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "moved")])
    resumed = torch.load(tmp_path / "moved" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(straight["model"][key], resumed["model"][key]) for key in straight["model"])
    shutil.copytree(tmp_path / "straight", tmp_path / "unflipped", ignore=shutil.ignore_patterns("ckpt.pt", "*.json*"))
    assert_clean_error(in_process(capsys, dalle, *args[:-1], "--out", tmp_path / "unflipped"),  # mirrored codes
                       "codes encoded with --flip, unlike this run")  # are not reused by a run without --flip


def test_dalle_without_appearance_silhouette_or_summary_trains_samples_and_resumes(tiny_shapes, tmp_path, capsys):
    trained = in_process(capsys, dalle, "--train", tiny_shapes, *TINY_DALLE, "--steps", 2, "--no-appearance",
                         "--no-summary", "--out", tmp_path)  # the paper's transformer
    assert trained.returncode == 0, trained.stderr
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not any(word in key for key in checkpoint["model"] for word in ("appearance", "describe", "summary"))
    sample = in_process(capsys, dalle, "--sample", "a red circle", "-n", 2, "--ckpt", tmp_path / "ckpt.pt",
                        "--out", tmp_path / "samples")
    assert sample.returncode == 0, sample.stderr
    resumed = in_process(capsys, dalle, "--resume", "--steps", 3, "--out", tmp_path)
    assert resumed.returncode == 0 and "from step 2" in resumed.stdout, resumed.stderr
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert (saved["appearance"], saved["steps"]) == (False, 3)
    # appearances without silhouettes
    trained = in_process(capsys, dalle, "--train", tiny_shapes, *TINY_DALLE, "--steps", 2, "--no-silhouette",
                         "--out", tmp_path / "appearance")
    assert trained.returncode == 0, trained.stderr
    checkpoint = torch.load(tmp_path / "appearance" / "ckpt.pt", weights_only=True)
    assert "bottom_appearance" in checkpoint["model"] and not any("silhouette" in key for key in checkpoint["model"])
    resumed = in_process(capsys, dalle, "--resume", "--steps", 3, "--out", tmp_path / "appearance")
    assert resumed.returncode == 0 and "from step 2" in resumed.stdout, resumed.stderr
    saved = torch.load(tmp_path / "appearance" / "ckpt.pt", weights_only=True)["config"]
    assert saved["silhouette"] is False


def test_dalle_cached_forward_equals_full_forward():
    for model in (tiny_dalle(torch.float64), tiny_dalle(torch.float64, summary=False, adaln=False)):  # and the paper's
        tokens = random_tokens(model, 3)
        full = model.hidden(tokens)  # (B, L, C)
        cache = model.new_cache(3, "cpu", torch.float64)
        pieces = [model.hidden(tokens[:, :model.text_len], 0, cache)]  # the caption in one go
        pieces += [model.hidden(tokens[:, [t]], t, cache) for t in range(model.text_len, model.text_len + 5)]
        pieces.append(model.hidden(tokens[:, model.text_len + 5:], model.text_len + 5, cache))  # a chunk after it
        assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-10)


def test_dalle_sampling_cache_guidance_and_caption_untouched():
    model = tiny_dalle(torch.float64)
    text = random_tokens(model, 4)[:, :model.text_len]
    original = text.clone()
    samples = {}
    for guidance in (1.0, 3.0):
        for cache in (True, False):
            generator = torch.Generator().manual_seed(5)
            samples[guidance, cache] = dalle.sample_codes(model, text, generator, guidance, top_k=10, top_p=0.9,
                                                          cache=cache)
    assert torch.equal(text, original)  # sampling leaves the caption tensor alone
    assert samples[1.0, True].shape == (4, model.top_count + model.bottom_count)
    assert samples[1.0, True][:, :model.top_count].max() < 24 and samples[1.0, True].max() < 40
    assert torch.equal(samples[1.0, True], samples[1.0, False])  # the cache changes nothing
    assert torch.equal(samples[3.0, True], samples[3.0, False])
    assert not torch.equal(samples[1.0, True], samples[3.0, True])  # guidance does something

    # guidance 1 is plain conditional sampling: the same draws as sampling by hand from p(code | caption)
    generator, tokens = torch.Generator().manual_seed(5), text
    for i in range(model.top_count + model.bottom_count):
        text_logits, (top, bottom) = model(torch.cat([tokens, torch.zeros_like(tokens[:, :1])], 1))
        logits = top[:, i] if i < model.top_count else bottom[:, i - model.top_count]  # (B, K) for image token i
        tokens = torch.cat([tokens, dalle.pick(logits, generator, top_k=10, top_p=0.9)[:, None]], 1)
    assert torch.equal(tokens[:, model.text_len:], samples[1.0, True])


def test_dalle_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(dalle.pick(logits, generator, top_k=2).tolist()) == {0, 1}
    assert set(dalle.pick(logits, generator, top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(dalle.pick(logits, generator, top_p=0.85).tolist()) == {0, 1, 2}
    assert set(dalle.pick(logits, generator).tolist()) == {0, 1, 2, 3}
    # the frequencies too: top-k 2 renormalises 0.5 and 0.3 to 0.625 and 0.375; temperature 1/2 squares the
    # probabilities, 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025) = 0.685 (2,000 draws: a standard error near 0.011)
    assert abs((dalle.pick(logits, generator, top_k=2) == 0).float().mean().item() - 0.625) < 0.04
    assert abs((dalle.pick(logits, generator, temperature=0.5) == 0).float().mean().item() - 0.685) < 0.04
    assert abs((dalle.pick(logits, generator) == 0).float().mean().item() - 0.5) < 0.04


def test_dalle_sampling_temperature_reaches_every_token():
    # near temperature 0 every code is the likeliest, so two generators draw the same codes; at 1 they do not
    model = tiny_dalle(torch.float64)
    text = random_tokens(model, 4)[:, :model.text_len]
    cold, hot = ([dalle.sample_codes(model, text, torch.Generator().manual_seed(seed), 3.0, temperature)
                  for seed in (1, 2)] for temperature in (1e-4, 1.0))
    assert torch.equal(*cold) and not torch.equal(*hot)


def test_dalle_training_lowers_the_loss():
    model = tiny_dalle().train()
    tokens = random_tokens(model, 4).repeat(4, 1)  # (16, L)
    optimizer = torch.optim.AdamW(dalle.parameter_groups(model, 0.01), lr=3e-3)
    history = []
    for _ in range(30):
        text, nll = dalle.losses(model, tokens)
        loss = text / 8 + 7 / 8 * nll.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


def test_dalle_reranker_learns_which_caption_fits_which_image():
    torch.manual_seed(0)
    colours = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1)}
    names, images = list(colours), torch.tensor(list(colours.values())).float()[:, :, None, None]  # (5, 3, 1, 1)
    text = data.encode_text([f"a {name} square" for name in names], 24)  # (5, T)
    reranker = dalle.Reranker(32)
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=3e-3)
    for _ in range(60):
        index = torch.randint(0, 5, (16,))  # repeats in a batch: the same caption's images are each other's positives
        x = images[index].expand(-1, -1, 48, 48) * (0.8 + 0.2 * torch.rand(16, 1, 48, 48))  # 48 px: pooled to 32
        loss = dalle.contrastive_loss(reranker(x, text[index]), text[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = reranker.eval()(images.expand(-1, -1, 48, 48), text)  # (images, captions)
    assert (scores.argmax(0) == torch.arange(5)).all() and (scores.argmax(1) == torch.arange(5)).all(), scores
    # the loss: a perfect scorer nears 0; the same caption twice shares the positive evenly (its least: log 2 a row)
    twice = data.encode_text(["a", "a", "b"], 4)
    assert dalle.contrastive_loss(100 * torch.eye(3), data.encode_text(["a", "b", "c"], 4)) < 1e-6
    shared = dalle.contrastive_loss(torch.tensor([[20., 20, 0], [20, 20, 0], [0, 0, 20]]), twice)
    assert abs(shared - 2 / 3 * math.log(2)) < 1e-6
    assert dalle.contrastive_loss(20 * torch.eye(3), twice) > 3  # a positive scored as a negative


def test_dalle_keep_takes_the_samples_the_reranker_scores_highest():
    torch.manual_seed(1)
    tokenizer = tiny_vqvae2(16).eval()
    model = dalle.DALLE(dalle.Config(width=32, layers=1, heads=2, text_len=12), tokenizer.top_shape,
                        tokenizer.bottom_shape, 32, 32).eval()
    reranker = dalle.Reranker(32).eval()
    config = dalle.Config(n=5, guidance=2.0, temperature=1.0)
    captions = ["a red circle", "a blue square"]
    every, _, codes = dalle.generate(model, tokenizer, captions, config, "cpu")  # all n = 5 of each, seeded
    kept, labels, kept_codes = dalle.generate(model, tokenizer, captions, dataclasses.replace(config, keep=2), "cpu",
                                              reranker)
    score = reranker(every, data.encode_text([c for c in captions for _ in range(5)], 12)).diagonal().view(2, 5)
    best = score.topk(2, 1).indices + torch.tensor([[0], [5]])  # (2 captions, 2 kept)
    assert torch.equal(kept_codes, codes[best.flatten()]) and torch.equal(kept, every[best.flatten()])
    assert labels == ["a red circle"] * 2 + ["a blue square"] * 2 and len({tuple(c) for c in codes.tolist()}) == 10
    assert not torch.equal(kept_codes, codes.view(2, 5, -1)[:, :2].flatten(0, 1))  # not merely the first two


def test_dalle_cli_pipeline_resume_sample_eval(tiny_shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out stays in tmp_path
    common = ["--train", tiny_shapes, *TINY_DALLE, "--log-every", 2, "--save-every", 3, "--reranker",
              "--out", tmp_path / "run"]
    trained = run(ROOT / "dalle.py", *common, "--steps", 3)
    assert trained.returncode == 0, trained.stderr
    for stage in ("stage 1/3", "stage 2/3", "stage 3/3", "caption gap"):
        assert stage in trained.stdout, trained.stdout
    for name in ("vqvae2/ckpt.pt", "codes.pt", "ckpt.pt", "metrics.jsonl", "samples_000003.png", "samples.png"):
        assert (tmp_path / "run" / name).is_file(), name
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    assert state["bottom_appearance"].abs().sum() > 0 and "bottom_silhouette.0.weight" in state  # measured and saved
    assert_clean_error(in_process(capsys, dalle, *common, "--steps", 3), "exists", "--resume")
    resumed = in_process(capsys, dalle, "--resume", "--steps", 5, "--vqvae-flags=--hidden 32", "--out", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    assert "stage 1/3" not in resumed.stdout and "from step 3" in resumed.stdout and "step 5/5" in resumed.stdout
    assert "warning: --vqvae-flags --hidden --patch-hidden" in resumed.stderr  # (these and the others it drops)
    assert "do not apply" in resumed.stderr  # the tokenizer keeps the flags it started with
    # a copied run resumes without its images (stage 3 reads the codes), and in its own folder
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert_clean_error(in_process(capsys, dalle, "--resume", "--vqvae-steps", 9, "--out", tmp_path / "copy"),
                       "holds codes its tokenizer made at step 6", "start a new run")  # before any training
    shutil.rmtree(tmp_path / "copy" / "vqvae2")  # the codes carry their tokenizer
    moved = in_process(capsys, dalle, "--resume", "--train", tmp_path / "moved", "--steps", 6, "--out", tmp_path / "copy")
    assert moved.returncode == 0 and "step 6/6" in moved.stdout and "stage 1/3" not in moved.stdout, moved.stderr
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 5  # the original untouched
    codes = torch.load(tmp_path / "copy" / "codes.pt", weights_only=True)
    next(iter(codes["tokenizer"]["model"].values())).add_(1)  # codes of another tokenizer under this transformer
    torch.save(codes, tmp_path / "copy" / "codes.pt")
    assert_clean_error(in_process(capsys, dalle, "--resume", "--steps", 7, "--out", tmp_path / "copy"),
                       "its transformer learned the codes of another tokenizer")
    # codes of another size: their size applies, and is said; a tokenizer or codes in --out that do not fit this
    # run's data are refused before any work, never silently reused
    other = in_process(capsys, dalle, "--codes", tmp_path / "run" / "codes.pt", *TINY_DALLE[5:], "--steps", 1,
                       "--out", tmp_path / "other")
    assert other.returncode == 0 and "images are 16 px, so --image-size 32 does not apply" in other.stderr
    assert torch.load(tmp_path / "other" / "ckpt.pt", weights_only=True)["config"]["image_size"] == 16
    tokenizer = tmp_path / "run" / "vqvae2" / "ckpt.pt"
    shutil.copytree(tmp_path / "run" / "vqvae2", tmp_path / "stale" / "vqvae2")  # another dataset's tokenizer
    assert_clean_error(in_process(capsys, dalle, common[0], "shapes:40", *common[2:-1], tmp_path / "stale"),
                       "holds a tokenizer of --train", "choose another --out")
    shutil.copy(tmp_path / "run" / "codes.pt", tmp_path / "stale" / "codes.pt")
    checkpoint = torch.load(tokenizer, weights_only=True)
    next(iter(checkpoint["model"].values())).add_(1)  # the codes' tokenizer, retrained since
    torch.save(checkpoint, tmp_path / "stale" / "vqvae2" / "ckpt.pt")
    assert_clean_error(in_process(capsys, dalle, *common[:-1], tmp_path / "stale", "--steps", 3),
                       "codes of another tokenizer", "remove it")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "image_loss" in r] == [2, 3, 4, 5]

    ckpt = tmp_path / "run" / "ckpt.pt"
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a small red square at the top\n\n一个红色的圆\n".encode() + b"\xff bad bytes\n")
    sampled = in_process(capsys, dalle, "--sample", "a large blue circle at the center", "--prompts", prompts,
                  "--ckpt", ckpt, "-n", 3, "--keep", 2, "--out", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    pairs = sorted((tmp_path / "s" / "samples").glob("*.png"))
    assert len(pairs) == 4 * 2 and Image.open(pairs[0]).size == (16, 16)  # 4 captions x 2 kept
    assert (tmp_path / "s" / "samples" / "0002.txt").read_text() == "a small red square at the top"
    assert (tmp_path / "s" / "samples.png").is_file()
    scored = run(ROOT / "data.py", "score", tmp_path / "s" / "samples")  # the pairs are scorable as they are
    assert scored.returncode == 0, scored.stderr
    for name in ("12.png", "0042.png", "notes.txt"):  # not pairs this call's kind writes: left alone
        shutil.copy(pairs[0], tmp_path / "s" / "samples" / name)
    again = in_process(capsys, dalle, "--sample", "a red circle", "--ckpt", ckpt, "-n", 1, "--out", tmp_path / "s")
    assert again.returncode == 0 and "removed the 8 NNNN.png + NNNN.txt pairs" in again.stdout, again.stderr
    assert sorted(p.name for p in (tmp_path / "s" / "samples").iterdir()) == [
        "0000.png", "0000.txt", "0042.png", "12.png", "notes.txt"]  # none of the 8 pairs before
    piped = subprocess.run([sys.executable, ROOT / "dalle.py", "--prompts", "-", "--ckpt", ckpt, "-n", "2",
                            "--out", tmp_path / "i"], input="a red circle\n\nun cercle bleu\n",
                           capture_output=True, text=True, timeout=120)  # captions from standard input
    assert piped.returncode == 0, piped.stderr
    assert len(list((tmp_path / "i" / "samples").glob("*.png"))) == 2 * 2  # the blank line is no caption
    evaluated = in_process(capsys, dalle, "--eval", "--ckpt", ckpt, "--test", tiny_shapes, "--guidance", 2)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "48 test captions, guidance 2" in evaluated.stdout and "seen " in evaluated.stdout  # a folder of shapes
    reranked = in_process(capsys, dalle, "--eval", "--ckpt", ckpt, "--test", tiny_shapes, "-n", 3, "--keep", 2)
    assert reranked.returncode == 0, reranked.stderr
    assert "the best 2 of 3 samples of each by the reranker" in reranked.stdout and "overall   n=96 " in reranked.stdout

    assert_clean_error(in_process(capsys, dalle, "--sample", "x", "--ckpt", tmp_path / "run" / "codes.pt"),
                       "not a dalle checkpoint")
    assert_clean_error(in_process(capsys, dalle, "--prompts", tmp_path / "none.txt", "--ckpt", ckpt), "no such file")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert_clean_error(in_process(capsys, dalle, "--prompts", tmp_path / "blank.txt", "--ckpt", ckpt), "no captions")
    assert_clean_error(in_process(capsys, dalle, "--sample", "x", "--ckpt", ckpt, "--top-p", 0), "--top-p")
    assert_clean_error(in_process(capsys, dalle, "--width", 30, "--heads", 4), "--width")
    for flag, value, message in [("--top-k", -1, "--top-k must be 0 or more, not -1"),  # each flag named alone
                                 ("--code-noise", 1, "--code-noise must be in [0, 1), not 1"),
                                 ("--temperature", 0, "--temperature must be positive, not 0")]:
        result = in_process(capsys, dalle, flag, value, "--out", tmp_path / "no_run")
        assert_clean_error(result, message)
        assert result.stderr.count("--") == 1, result.stderr
    for flags, message in [("--image-size 64 --steps 5", "set --image-size, --steps by dalle.py's own flags"),
                           ("--hidden 0", "--vqvae-flags: --hidden must be positive"),
                           ("--bogus 1", "dalle.py --vqvae-flags: error: unrecognized arguments: --bogus 1")]:
        assert_clean_error(in_process(capsys, dalle, f"--vqvae-flags={flags}", "--out", tmp_path / "no_run"), message)
    assert_clean_error(in_process(capsys, dalle, "--train", tmp_path / "missing", "--out", tmp_path / "no_run"), "missing")
    assert_clean_error(in_process(capsys, dalle, "--train", tiny_shapes, *TINY_DALLE, "-n", 2, "--keep", 1, "--out",
                                  tmp_path / "no_run"), "add --reranker")
    assert not (tmp_path / "no_run").exists()  # refused before any stage ran


def test_dalle_torchrun_two_processes(tiny_shapes, tmp_path):
    stdout = succeeded(torchrun("dalle.py", "--train", tiny_shapes, *TINY_DALLE, "--steps", 4, "--batch-size", 4,
                                "--log-every", 2, "--reranker", out=tmp_path))  # two DDP modules, both in sync
    assert "2 process(es)" in stdout and stdout.count("stage 3/3") == 1 and "reranker top-1" in stdout
    assert ranks_in_sync(tmp_path)  # tokenizer, transformer and reranker
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    assert sorted(path.name for path in (tmp_path / "codes").iterdir()) == [  # each rank encoded its own part
        "part-00000-of-00002.pt", "part-00001-of-00002.pt"] and not (tmp_path / "codes.pt").exists()


def test_dalle_two_nodes_on_shards(tiny_shards, tmp_path):
    stdout = succeeded(torchrun("dalle.py", "--train", tiny_shards, *TINY_DALLE, "--steps", 4, "--batch-size", 4,
                                "--log-every", 2, out=tmp_path, nodes=2))
    assert stdout.count("2 process(es)") == 2 and stdout.count("stage 3/3") == 1  # tokenizer and transformer
    assert "codes: 46 train, 2 held out, in 2 parts" in stdout  # the codes of the shards, a part from each node
    parts = [torch.load(path, weights_only=True) for path in sorted((tmp_path / "codes").iterdir())]
    assert [len(part["train"]["captions"]) for part in parts] == [23, 23]  # half each
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4 and ranks_in_sync(tmp_path)


# ----------------------------------------------------------------------------------------------------
# dcgan.py


TINY_DCGAN = ["--image-size", "16", "--width", "8", "--latent-dim", "8", "--text-dim", "8", "--text-len", "48",
              "--batch-size", "8", "--device", "cpu"]


def tiny_dcgan(image_size=16, cond=False, width=8):
    return dcgan.Config(image_size=image_size, cond=cond, width=width, latent_dim=8, text_dim=8, text_len=48)


def test_dcgan_shapes_for_several_sizes():
    captions = ["a large red circle at the top left", "a small blue square at the center"]
    for size in (16, 32, 64, 128):
        for cond in (False, True):
            config = tiny_dcgan(size, cond, width=4)
            generator, discriminator = dcgan.Generator(config), dcgan.Discriminator(config)
            tokens = data.encode_text(captions, config.text_len) if cond else None
            images = generator(dcgan.noise(2, config, "cpu"), tokens)
            assert images.shape == (2, 3, size, size) and images.abs().max() <= 1
            assert discriminator(images, tokens).shape == (2,)
            # the paper's guidelines: no batch norm at G's output (a Tanh) or at D's input
            assert isinstance(generator.net[-1], torch.nn.Tanh) and isinstance(generator.net[-2], torch.nn.ConvTranspose2d)
            assert [type(layer) for layer in discriminator.features[:2]] == [torch.nn.Conv2d, torch.nn.LeakyReLU]
            assert discriminator.features[1].negative_slope == 0.2
            strides = [m.stride for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
            assert len(strides) == np.log2(size) - 2 and set(strides) == {(2, 2)}
    assert abs(generator.net[2].weight.std().item() - 0.02) < 0.002  # N(0, 0.02) initialisation


def test_dcgan_conditioning_matters():
    torch.manual_seed(0)
    config = tiny_dcgan(16, cond=True)
    generator, discriminator = dcgan.Generator(config), dcgan.Discriminator(config)  # batch statistics
    z = dcgan.noise(2, config, "cpu").repeat(2, 1)  # the same two z for both captions
    captions = ["a large red circle at the top left"] * 2 + ["a small blue square at the bottom right"] * 2
    tokens = data.encode_text(captions, config.text_len)
    with torch.no_grad():
        images = generator(z, tokens)
        logits = discriminator(images[:2].repeat(2, 1, 1, 1), tokens)
    assert (images[:2] - images[2:]).abs().amax((1, 2, 3)).min() > 1e-4  # y changes G(z, y) (float noise: 1e-7)
    assert (logits[:2] - logits[2:]).abs().min() > 1e-4  # and the projection term changes l(x, y)
    # pads are masked out of the caption embedding: more padding changes nothing
    longer = data.encode_text(captions, config.text_len + 20)
    assert torch.allclose(generator.text(tokens), generator.text(longer), atol=1e-6)


def test_dcgan_ema_and_health_checks():
    live, average = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    start = average.weight.detach().clone()
    dcgan.update_ema(average, live, 0.75)
    assert torch.allclose(average.weight, 0.75 * start + 0.25 * live.weight)
    healthy = dict(step=600, first_step=501, total_steps=1000, d_loss=0.1, g_loss=4.0, d_accuracy=1.0, diversity=0.8)
    assert dcgan.health_warnings(**healthy) == []
    assert "mode collapse" in dcgan.health_warnings(**healthy | dict(diversity=0.05))[0]
    assert "wins outright" in dcgan.health_warnings(**healthy | dict(d_loss=0.003))[0]
    assert "diverged" in dcgan.health_warnings(**healthy | dict(g_loss=float("nan")))[0]
    assert dcgan.health_warnings(**healthy | dict(step=100, diversity=0.05, d_loss=0.003)) == []  # early on: no verdict
    assert dcgan.mean_pairwise_distance(torch.ones(5, 3, 4, 4)) == 0


def test_dcgan_steps_update_both_networks_and_ema_lags(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(dcgan, "SCORED_SAMPLES", 100)  # the scorer is slow; 100 samples exercise it
    args = ["--train", str(tiny_shapes), *TINY_DCGAN, "--steps", "6", "--log-every", "2", "--save-every", "6",
            "--out", str(tmp_path), "--ema", "0.9"]
    initial = {}  # the weights train() starts from, as each network's constructor leaves them
    for key, network in (("generator", dcgan.Generator), ("discriminator", dcgan.Discriminator)):
        def recorded(self, config, key=key, init=network.__init__):
            init(self, config)
            initial.setdefault(key, {name: value.clone() for name, value in self.state_dict().items()})
        monkeypatch.setattr(network, "__init__", recorded)
    dcgan.main(args)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    weights = [name for name, _ in dcgan.Generator(tiny_dcgan(16)).named_parameters()]
    for network in ("generator", "discriminator"):
        changed = [not torch.equal(value, checkpoint[network][name]) for name, value in initial[network].items()
                   if "num_batches" not in name]
        assert all(changed), network  # every weight and statistic moved
    live, average, start = (torch.cat([state[name].flatten() for name in weights])
                            for state in (checkpoint["generator"], checkpoint["ema_generator"], initial["generator"]))
    assert not torch.allclose(live, average)
    assert 0 < (average - start).norm() < (live - start).norm()  # it moved, but less far than the live weights
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "d_loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert all(r["diversity"] > 0 and np.isfinite(r["g_loss"]) for r in logged)
    # D's accuracy: over 2 steps, each the mean of its 8 real and 8 fake images' hits, so a multiple of 1/32
    assert all(0 <= r["d_accuracy"] <= 1 and abs(32 * r["d_accuracy"] - round(32 * r["d_accuracy"])) < 1e-4
               for r in logged)
    assert "clean" in records[-1]["score"] and (tmp_path / "samples_000006.png").is_file()


def test_dcgan_collapse_is_reported(tiny_shapes, tmp_path, monkeypatch, capsys):
    # a generator whose every z is the same can only make one image: the collapse check must say so
    monkeypatch.setattr(dcgan, "noise", lambda count, config, device, generator=None: torch.zeros(count, config.latent_dim))
    monkeypatch.setattr(dcgan, "SCORED_SAMPLES", 10)
    dcgan.main(["--train", str(tiny_shapes), *TINY_DCGAN, "--steps", "2", "--log-every", "2", "--save-every", "2",
                "--out", str(tmp_path)])
    assert "mode collapse" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("mode collapse" in warning for r in records for warning in r.get("warnings", []))


def test_dcgan_stop_signal_saves_and_resume_continues_exactly(tiny_shapes, tmp_path, monkeypatch):
    args = ["--train", str(tiny_shapes), *TINY_DCGAN, "--cond", "--steps", "5", "--log-every", "1",
            "--save-every", "100"]
    dcgan.main(args + ["--out", str(tmp_path / "straight")])
    # a Ctrl-C while step 3 runs: the step finishes, is saved, and the run stops
    ctrl_c_then_resume(monkeypatch, dcgan, args, tmp_path / "stopped", batch=2, saved_step=3)

    def records(folder):
        return [{k: v for k, v in r.items() if k != "time"}
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "d_loss" in r]
    assert records(tmp_path / "straight") == records(tmp_path / "stopped") and len(records(tmp_path / "stopped")) == 5
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "stopped"))
    for key in ("generator", "discriminator", "ema_generator"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert a["discriminator_optimizer"]["state"][0]["step"] == b["discriminator_optimizer"]["state"][0]["step"] == 5


def test_dcgan_cli_end_to_end_resume_sample_eval(tiny_shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dcgan, "SCORED_SAMPLES", 100)
    common = ["--train", tiny_shapes, *TINY_DCGAN, "--log-every", 1]
    cond = tmp_path / "cond"
    trained = in_process(capsys, dcgan, *common, "--cond", "--steps", 3, "--save-every", 2, "--out", cond)
    assert trained.returncode == 0, trained.stderr
    assert "caption-conditioned" in trained.stdout and "d_loss" in trained.stdout and "overall " in trained.stdout
    for name in ("ckpt.pt", "metrics.jsonl", "config.json", "samples_000002.png", "samples_000003.png"):
        assert (cond / name).is_file(), name
    assert_clean_error(in_process(capsys, dcgan, *common, "--steps", 3, "--out", cond), "exists", "--resume")
    resumed = in_process(capsys, dcgan, "--resume", "--steps", 5, "--out", cond)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 3" in resumed.stdout and "step 5/5" in resumed.stdout
    assert torch.load(cond / "ckpt.pt", weights_only=True)["step"] == 5

    captions = ["a large red triangle at the top", "a small green square at the center", "x" * 60]
    (tmp_path / "prompts.txt").write_text("\n".join(captions[1:]) + "\n\n")  # --prompts adds them to --sample's
    sampled = in_process(capsys, dcgan, "--sample", captions[0], "--prompts", tmp_path / "prompts.txt", "-n", 2,
                         "--ckpt", cond / "ckpt.pt", "--out", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    assert "first 48 bytes" in sampled.stderr  # a caption longer than --text-len is cut, and said so
    pairs = sorted((tmp_path / "s" / "samples").glob("*.png"))
    assert len(pairs) == 6 and Image.open(pairs[0]).size == (16, 16)
    assert (tmp_path / "s" / "samples" / "0002.txt").read_text() == captions[1]  # 2 per caption
    assert Image.open(tmp_path / "s" / "samples.png").size[0] == 2 * (96 + 2) + 2  # 2 per row, captioned
    scored = run(ROOT / "data.py", "score", tmp_path / "s" / "samples")  # the pairs are scorable as they are
    assert scored.returncode == 0 and "overall   n=6" in scored.stdout, scored.stderr
    evaluated = in_process(capsys, dcgan, "--eval", "--ckpt", cond / "ckpt.pt", "--test", tiny_shapes)
    assert evaluated.returncode == 0 and "overall   n=48 " in evaluated.stdout, evaluated.stderr

    plain = tmp_path / "plain"
    trained = in_process(capsys, dcgan, *common, "--steps", 2, "--out", plain)
    assert trained.returncode == 0 and "clean shape" in trained.stdout, trained.stderr
    sampled = in_process(capsys, dcgan, "--sample", 5, "--ckpt", plain / "ckpt.pt")
    assert sampled.returncode == 0, sampled.stderr
    assert len(list((plain / "samples").glob("*.png"))) == 5 and (plain / "samples" / "0004.txt").read_text() == ""
    assert Image.open(plain / "samples.png").size == (3 * 18 + 2, 2 * 18 + 2)
    evaluated = in_process(capsys, dcgan, "--eval", "--out", plain)
    assert evaluated.returncode == 0 and "% of 100\n" in evaluated.stdout, evaluated.stderr
    assert_clean_error(in_process(capsys, dcgan, "--sample", "a red circle", "--ckpt", plain / "ckpt.pt"), "unconditional")


def test_dcgan_cli_bad_inputs(tmp_path, capsys):
    assert_clean_error(run(ROOT / "dcgan.py", "--train", tmp_path / "missing", "--out", tmp_path / "no_run"), "no such folder")  # a real process
    assert_clean_error(in_process(capsys, dcgan, "--image-size", 48), "power of two")
    assert_clean_error(in_process(capsys, dcgan, "--image-size", 256), "power of two")
    assert_clean_error(in_process(capsys, dcgan, "--steps", "abc"), "invalid int")
    assert_clean_error(in_process(capsys, dcgan, "--ema", 1.5), "--ema")
    assert_clean_error(in_process(capsys, dcgan, "--bogus-flag", 3), "unrecognized arguments")
    assert_clean_error(in_process(capsys, dcgan, "--sample", 4, "--eval"), "cannot be combined")
    data.save_checkpoint(tmp_path / "vae.pt", "vae", vae.Config(), 1, model={})
    for mode in (["--sample", 4], ["--eval"], ["--resume"]):
        assert_clean_error(in_process(capsys, dcgan, *mode, "--ckpt", tmp_path / "vae.pt"), "vae checkpoint, not a dcgan")
    assert_clean_error(in_process(capsys, dcgan, "--sample", 4, "--ckpt", tmp_path / "none.pt"), "no such checkpoint")


def test_dcgan_torchrun_two_processes(tiny_shapes, tmp_path):
    stdout = succeeded(torchrun("dcgan.py", "--train", tiny_shapes, *TINY_DCGAN, "--cond", "--steps", 4,
                                "--batch-size", 4, "--log-every", 2, out=tmp_path))
    assert "2 process(es)" in stdout and stdout.count("overall ") == 1  # rank 0 reports once
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "d_loss" in r] == [2, 4]
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["generator_optimizer"]["state"][0]["step"] == 4
    assert ranks_in_sync(tmp_path)  # G and D


# ----------------------------------------------------------------------------------------------------
# cvae.py


TINY_CVAE = ["--image-size", 16, "--width", 8, "--latent-dim", 4, "--text-dim", 16, "--text-len", 32,
             "--batch-size", 8, "--device", "cpu"]


def tiny_cvae(image_size=16, **changes):
    torch.manual_seed(0)
    config = cvae.Config(image_size=image_size, width=8, latent_dim=4, text_dim=16, text_len=32, **changes)
    return cvae.CVAE(config)


def test_cvae_shapes_for_several_sizes():
    captions = ["a large red circle at the top left", "一个红色的圆 🎨"]
    tokens = data.encode_text(captions, 32)
    for size in (16, 32, 64):
        for fixed_prior in (False, True):
            model = tiny_cvae(size, fixed_prior=fixed_prior)
            logits, prior_logits, (mu, logvar), (mu_p, logvar_p) = model(torch.rand(2, 3, size, size), tokens)
            assert logits.shape == prior_logits.shape == (2, 3, size, size)
            assert all(t.shape == (2, 4) for t in (mu, logvar, mu_p, logvar_p))
            assert bool((mu_p == 0).all() and (logvar_p == 0).all()) == fixed_prior  # N(0, I) only when fixed
            images = model.generate(captions, 32)
            assert images.shape == (2, 3, size, size) and 0 <= images.min() and images.max() <= 1


def test_cvae_text_encoder_takes_any_utf8_and_ignores_padding():
    torch.manual_seed(0)
    encoder = cvae.TextEncoder(cvae.Config(text_dim=16))
    captions = ["a red circle", "", "日本語のキャプション 🎨", "x" * 100, "\ud800 lone surrogate", "😀" * 3]
    short, long = (encoder(data.encode_text(captions, length)) for length in (40, 120))
    assert short.shape == (6, 16) and torch.isfinite(short).all() and torch.isfinite(long).all()
    fits = [0, 1, 2, 4, 5]  # every caption but the 100 bytes fits in 40: more padding must change nothing
    assert torch.allclose(short[fits], long[fits], atol=1e-5)
    assert not torch.allclose(short[3], long[3], atol=1e-3)  # 40 vs 100 bytes of it
    cut = encoder(data.encode_text(["x" * 100, "x" * 40 + "yyy", "y" * 100], 40))  # truncated to 40 bytes
    assert torch.allclose(cut[0], cut[1]) and not torch.allclose(cut[0], cut[2], atol=1e-3)
    assert not torch.allclose(short[0], short[2], atol=1e-3)


def test_cvae_kl_between_gaussians_matches_torch_distributions():
    mu, logvar, mu_p, logvar_p = torch.randn(4, 5, 6).unbind(0)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(mu_p, torch.exp(0.5 * logvar_p))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(cvae.gaussian_kl(mu, logvar, mu_p, logvar_p), expected, atol=1e-5)
    zeros = torch.zeros_like(mu)  # against N(0, I) it is the VAE's KL
    assert torch.allclose(cvae.gaussian_kl(mu, logvar, zeros, zeros), vae.kl_divergence(mu, logvar), atol=1e-5)
    assert torch.allclose(cvae.gaussian_kl(mu, logvar, mu, logvar), torch.zeros(5), atol=1e-6)


def test_cvae_importance_weighted_nll_exact_and_bounds_the_elbo():
    # q(z|x,c) = p(z|c) = N(0, I) and every logit 0: the IW estimate is exactly D ln 2 for every K
    model = tiny_cvae()
    for layer in (model.recognition.to_stats, model.prior.net[-1], model.decoder.to_logits):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    x, tokens = torch.rand(3, 3, 16, 16).round(), data.encode_text(["a", "b", "c"], 32)
    expected = torch.full((3,), 3 * 16 * 16 * np.log(2))
    for K in (1, 7, 60):
        assert torch.allclose(cvae.importance_weighted_nll(model, x, tokens, K), expected, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(cvae.losses(model, x, tokens)[0], expected, rtol=1e-5)
    # p(x|z,c) still 2^-D for every z, but now q(z|x,c) = N(1/2, I) and p(z|c) = N(0, I): log p(x|c) = -D ln 2,
    # the -ELBO is D ln 2 + KL with KL = 4 (1/2)^2 / 2 = 0.5 nats, K = 1 gives the -ELBO on average, and the
    # IW estimate approaches D ln 2 as K grows
    torch.nn.init.constant_(model.recognition.to_stats.bias[:4], 0.5)  # mu
    with torch.no_grad():
        assert torch.allclose(cvae.losses(model, x, tokens)[0], expected + 0.5, rtol=1e-5)
    generator = torch.Generator().manual_seed(0)
    single = torch.stack([cvae.importance_weighted_nll(model, x, tokens, 1, generator) for _ in range(400)]).mean(0)
    assert torch.allclose(single, expected + 0.5, atol=0.2), single - expected
    assert torch.allclose(cvae.importance_weighted_nll(model, x, tokens, 2000, generator), expected, atol=0.15)
    model = tiny_cvae().eval()  # a random model: log p(x|c) >= IW bound >= ELBO, and K = 1 is the ELBO
    x, tokens = torch.rand(8, 3, 16, 16), data.encode_text(["a red circle", "a blue square"] * 4, 32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        neg_elbo = torch.stack([cvae.losses(model, x, tokens, 1.0, generator)[0] for _ in range(50)]).mean(0)
    assert cvae.importance_weighted_nll(model, x, tokens, 200, generator).mean() < neg_elbo.mean()
    single = torch.stack([cvae.importance_weighted_nll(model, x, tokens, 1, generator) for _ in range(50)]).mean(0)
    assert torch.allclose(single, neg_elbo, rtol=0.02)


def test_cvae_caption_changes_the_decoder_output():
    model = tiny_cvae().eval()
    with torch.no_grad():
        c = model.text(data.encode_text(["a large red circle at the top left", "a small blue square at the center"], 32))
        z = torch.randn(1, 4).expand(2, 4)  # one z for both captions
        assert torch.equal(*model.decoder(z, c[[0, 0]]))  # same z, same caption: same image
        assert (model.decoder(z, c)[0] - model.decoder(z, c)[1]).abs().max() > 1e-3  # same z, other caption
        assert not torch.allclose(*model.prior(c)[0]) and not torch.allclose(*model.recognition(torch.zeros(2, 3, 16, 16), c)[0])


def test_cvae_training_lowers_the_loss(tiny_shapes, tmp_path):
    cvae.main(["--train", str(tiny_shapes), *map(str, TINY_CVAE), "--steps", "60", "--batch-size", "16",
               "--log-every", "10", "--save-every", "10", "--iw", "20", "--warmup", "5", "--lr", "3e-3",
               "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    held_out = [r["test_neg_elbo"] for r in records if "test_neg_elbo" in r and "test_iw_nll" not in r]
    assert len(losses) == len(held_out) == 6
    assert losses[-1] < 0.7 * losses[0] and held_out[-1] < 0.7 * held_out[0], (losses, held_out)
    assert records[-1]["test_iw_nll"] < records[-1]["test_neg_elbo"] and "score_overall_all" in records[-1]


def test_cvae_cli_train_resume_sample_eval(tiny_shapes, tmp_path, capsys):
    common = ["--train", tiny_shapes, *TINY_CVAE, "--iw", 2, "--log-every", 1]
    trained = run(ROOT / "cvae.py", *common, "--steps", 3, "--save-every", 2, "--out", tmp_path / "a")
    assert trained.returncode == 0, trained.stderr
    assert "IW-NLL (K=2)" in trained.stdout and "shapes scorer" in trained.stdout
    for name in ("ckpt.pt", "metrics.jsonl", "config.json", "samples_000002.png", "samples_000003.png"):
        assert (tmp_path / "a" / name).is_file(), name
    assert Image.open(tmp_path / "a" / "samples_000003.png").size[0] == 4 * (96 + 2) + 2  # captioned: 4 per row
    cvae.main(["--resume", "--steps", "5", "--out", str(tmp_path / "a")])
    assert "from step 3" in capsys.readouterr().out
    ckpt = tmp_path / "a" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 5

    sampled = run(ROOT / "cvae.py", "--sample", "a large red circle at the top left", "一只猫 🐱", "-n", 3,
                  "--ckpt", ckpt, "--out", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    pairs = sorted((tmp_path / "s" / "samples").glob("*.png"))
    assert len(pairs) == 6 and Image.open(pairs[0]).size == (16, 16)
    assert (tmp_path / "s" / "samples" / "0004.txt").read_text() == "一只猫 🐱"
    assert Image.open(tmp_path / "s" / "samples.png").size[0] == 3 * (96 + 2) + 2
    data.main(["score", str(tmp_path / "s" / "samples")])  # the pairs are scorable as they are
    assert "overall   n=6" in capsys.readouterr().out
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    prompted = in_process(capsys, cvae, "--prompts", tmp_path / "prompts.txt", "-n", 1, "--ckpt",
                          tmp_path / "a" / "ckpt.pt", "--out", tmp_path / "p")
    assert prompted.returncode == 0, prompted.stderr
    assert [p.read_text() for p in sorted((tmp_path / "p" / "samples").glob("*.txt"))] == ["a red circle",
                                                                                           "a blue square"]

    data.main(["shapes", str(tmp_path / "test"), "--n", "8", "--size", "16", "--split", "test"])
    capsys.readouterr()
    cvae.main(["--eval", "--ckpt", str(ckpt), "--iw", "3", "--test", str(tmp_path / "test")])
    evaluated = capsys.readouterr().out
    assert "IW-NLL (K=3)" in evaluated
    assert "seen      n=4" in evaluated and "held_out  n=4" in evaluated


def test_cvae_stop_signal_saves_and_resume_continues_exactly(tiny_shapes, tmp_path, monkeypatch):
    args = ["--train", str(tiny_shapes), *map(str, TINY_CVAE), "--iw", "2", "--log-every", "1",
            "--save-every", "100", "--steps", "6", "--warmup", "1"]
    cvae.main(args + ["--out", str(tmp_path / "straight")])
    # a Ctrl-C while step 3 runs: the step finishes, is saved, and the run stops
    ctrl_c_then_resume(monkeypatch, cvae, args, tmp_path / "stopped", batch=2, saved_step=3)

    assert (logged(tmp_path / "straight", "kl") == logged(tmp_path / "stopped", "kl")
            and len(logged(tmp_path / "stopped")) == 6)
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "stopped"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 6


def test_cvae_cli_bad_inputs(tmp_path, capsys):
    def cli(*argv):  # run_cli in this process: its exit status and output, as run() would return them
        with pytest.raises(SystemExit) as stopped:
            cvae.run_cli(cvae.main, [str(arg) for arg in argv])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(argv, stopped.value.code, captured.out, captured.err)

    out = ["--out", tmp_path / "run"]
    assert_clean_error(cli("--train", tmp_path / "missing", *out), "no such folder")
    data.save_checkpoint(tmp_path / "vae.pt", "vae", vae.Config(), 1, model={}, optimizer={})
    assert_clean_error(run(ROOT / "cvae.py", "--sample", "a red circle", "--ckpt", tmp_path / "vae.pt"),
                       "vae checkpoint, not a cvae checkpoint")  # the real command line, once
    assert_clean_error(cli("--eval", "--ckpt", tmp_path / "vae.pt"), "vae checkpoint, not a cvae checkpoint")
    assert_clean_error(cli("--resume", "--ckpt", tmp_path / "vae.pt", *out), "not a cvae checkpoint")
    assert_clean_error(cli("--resume", *out), "no such checkpoint")  # the failed start left nothing to resume
    assert_clean_error(cli("--steps", "abc"), "invalid int")
    assert_clean_error(cli("--alpha", 1.5), "--alpha")
    assert_clean_error(cli("--text-len", 0), "--text-len")
    assert_clean_error(cli("-n", 0, "--sample", "x"), "--n")
    assert_clean_error(cli("--image-size", 20), "--image-size")
    assert_clean_error(cli("--sample"), "expected at least one argument")
    assert_clean_error(cli("--sample", "x", "--eval"), "cannot be combined")
    assert_clean_error(cli("--nonsense"), "unrecognized arguments")
    assert not (tmp_path / "run").exists()


def test_cvae_torchrun_two_processes(tiny_shapes, tmp_path):
    stdout = succeeded(torchrun("cvae.py", "--train", tiny_shapes, *TINY_CVAE, "--steps", 4, "--batch-size", 4,
                                "--iw", 2, "--log-every", 2, out=tmp_path))
    assert "2 process(es)" in stdout and stdout.count("held-out (") == 1  # rank 0 reports once
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4 and ranks_in_sync(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Every model file: runs that are stopped or killed, untrusted checkpoints, non-finite losses, determinism


TINY_VQVAE2 = ["--image-size", 16, "--hidden", 16, "--patch-hidden", 32, "--residual-hidden", 8,
               "--residual-blocks", 1, "--codebook-size", 32, "--code-dim", 8, "--device", "cpu"]


def test_resume_applies_and_records_what_it_overrides_and_refuses_what_it_cannot_continue(tiny_shapes, tmp_path,
                                                                                          monkeypatch, capsys):
    args = ["--train", str(tiny_shapes), "--image-size", "16", "--batch-size", "8", "--width", "8", "--iw", "2",
            "--latent-dim", "4", "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "vae")]
    monkeypatch.setattr(data, "_warned", set())
    assert_clean_error(in_process(capsys, vae, *args, "--ckpt", tmp_path / "elsewhere.pt"),  # not silently ignored
                       "--ckpt names a checkpoint to sample, evaluate, encode with or --resume")
    assert not (tmp_path / "vae").exists()
    with monkeypatch.context() as patch:
        patch.setattr(vae, "batches", die)
        with pytest.raises(Killed):
            vae.main(args)
    capsys.readouterr()  # killed before its first checkpoint: --resume starts it again from its config.json
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["steps"] == 3  # written before any step
    (tmp_path / "other").mkdir()
    assert_clean_error(in_process(capsys, vae, "--resume", "--out", tmp_path / "other"),
                       "holds no ckpt.pt", "start it again without --resume")
    monkeypatch.setattr(data, "_warned", set())  # each distinct warning is printed once a process
    assert_clean_error(in_process(capsys, cvae, "--resume", "--out", tmp_path / "vae"),  # a vae run's flags
                       "the flags of another model's run")
    restarted = in_process(capsys, vae, "--resume", "--out", tmp_path / "vae")
    assert restarted.returncode == 0 and "from step 0 with the flags it was started with\n" in restarted.stdout
    assert "warning: --warmup 100 is longer than --steps 3" in restarted.stderr  # the peak --lr is never reached
    resumed = in_process(capsys, vae, "--resume", "--steps", 4, "--out", tmp_path / "vae")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 3 with the flags it was started with, except --steps 4 (was 3)\n" in resumed.stdout
    record = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert (record["steps"], record["latent_dim"], record["width"], record["resume"]) == (4, 4, 8, True)
    saved = torch.load(tmp_path / "vae" / "ckpt.pt", weights_only=True)
    assert (saved["step"], saved["config"]["latent_dim"], saved["config"]["width"]) == (4, 4, 8)
    again = in_process(capsys, vae, "--resume", "--steps", 6, "--width", 8, "--out", tmp_path / "vae")
    assert again.returncode == 0 and "from step 4 with the flags it was started with, except --steps 6 (was 4)\n" \
        in again.stdout, again.stderr

    assert_clean_error(in_process(capsys, dalle, "--resume", "--out", tmp_path / "vae"),
                       "this is a vae checkpoint, not a dalle checkpoint")
    assert_clean_error(in_process(capsys, vae, "--resume", "--width", 0, "--out", tmp_path / "vae"), "--width")
    assert_clean_error(in_process(capsys, vae, "--resume", "--out", tmp_path / "none"), "no such checkpoint")


KILLED_MID_SAVE = """
import io, os, signal, sys
import torch
import data, vae
real_save = torch.save

def save_half_then_die(payload, file):  # SIGKILL with half of the step-6 checkpoint written
    if isinstance(payload, dict) and payload.get("step") == 6:
        whole = io.BytesIO()
        real_save(payload, whole)
        file.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(payload, file)

torch.save = save_half_then_die
data.run_cli(vae.main, sys.argv[1:])
"""


def wait_for_replacement(path, process, timeout=120):
    """Return once `path` is replaced by a newer file (or the process has ended)."""
    def identity():
        return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None
    before, deadline = identity(), time.time() + timeout
    while process.poll() is None and identity() == before and time.time() < deadline:
        time.sleep(0.005)


def test_sigkill_at_any_moment_leaves_a_checkpoint_that_resumes_exactly(tiny_shapes, tmp_path, capsys):
    args = ["--train", tiny_shapes, "--image-size", 16, "--batch-size", 8, "--width", 8, "--iw", 2,
            "--log-every", 1, "--save-every", 2, "--steps", 30, "--warmup", 1, "--device", "cpu"]
    vae.main([str(arg) for arg in args + ["--out", tmp_path / "straight"]])
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # as this process: the same sums, bit for bit
    out, ckpt = tmp_path / "killed", tmp_path / "killed" / "ckpt.pt"
    killed = run("-c", KILLED_MID_SAVE, *args, "--out", out, env=threads)  # dies writing its step-6 checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(out.glob(".ckpt.pt.tmp*")) and data.load_checkpoint(ckpt, "vae")["step"] == 4  # the old one, whole
    resume = [sys.executable, str(ROOT / "vae.py"), "--resume", "--out", str(out)]
    environment = {**os.environ, **threads}
    process = subprocess.Popen(resume, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_replacement(ckpt, process)  # it saved once; a SIGKILL some milliseconds later, mid-step or mid-save
    time.sleep(delay := random.uniform(0.0, 0.03))
    process.kill()
    assert process.wait() == -signal.SIGKILL, f"the resumed run ended before the kill ({delay:.3f} s after a save)"
    steps = [4, data.load_checkpoint(ckpt, "vae")["step"]]  # it loads, whatever the moment was
    process = subprocess.Popen(resume, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for_replacement(ckpt, process)
    process.send_signal(signal.SIGTERM)  # what a cluster sends before it takes the machine back
    stdout, stderr = process.communicate(timeout=120)
    steps.append(data.load_checkpoint(ckpt, "vae")["step"])
    assert process.returncode == 130 and f"saved {ckpt} at step {steps[-1]};" in stdout, stderr
    assert steps[0] < steps[1] < steps[2] < 30, (steps, delay)  # every run moved on, none reached the end
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"step": 29, "loss": 3')  # a record cut short, as a kill in the middle of a write leaves it
    (out / ".ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves them
    (out / ".samples_000030.png.tmp").write_bytes(b"half a grid")
    vae.main(["--resume", "--out", str(out)])
    assert not list(out.glob(".*.tmp*"))  # the next write of each file went through its temporary
    with Image.open(out / "samples_000030.png") as grid:
        grid.load()  # a whole grid, written over its leftover temporary

    def records(folder):  # every record, in order, without the wall-clock time
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert records(out) == records(tmp_path / "straight")  # nothing lost, nothing twice, nothing garbled
    a, b = (torch.load(folder / "ckpt.pt", weights_only=True) for folder in (tmp_path / "straight", out))
    assert a["step"] == b["step"] == 30 and all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 30
    before = ckpt.read_bytes()  # a flag that changes the shapes cannot resume it, and does not touch it
    assert_clean_error(in_process(capsys, vae, "--resume", "--out", out, "--width", 16, "--steps", 31),
                       "does not fit")
    assert ckpt.read_bytes() == before


def mismatched_checkpoint(name, path):
    """A `name` checkpoint whose weights are those of a model twice as wide as its config says."""
    if name == "vae":
        data.save_checkpoint(path, "vae", vae.Config(image_size=16, width=8), 1,
                             model=vae.VAE(vae.Config(image_size=16, width=16)).state_dict())
    elif name == "cvae":
        data.save_checkpoint(path, "cvae", cvae.Config(image_size=16, width=8), 1,
                             model=cvae.CVAE(cvae.Config(image_size=16, width=16)).state_dict())
    elif name == "dcgan":
        data.save_checkpoint(path, "dcgan", tiny_dcgan(width=8), 1,
                             ema_generator=dcgan.Generator(tiny_dcgan(width=16)).state_dict())
    elif name == "vqvae2":
        config = tiny_vqvae2().config
        wide = vqvae2.VQVAE2(dataclasses.replace(config, hidden=32))
        data.save_checkpoint(path, "vqvae2", config, 1, model=wide.state_dict())
    else:  # a tokenizer that fits and a transformer that does not
        tokenizer, config = tiny_vqvae2(), dalle.Config(width=32, layers=1, heads=2, text_len=12)
        wide = dalle.DALLE(dataclasses.replace(config, width=64), tokenizer.top_shape, tokenizer.bottom_shape,
                           tokenizer.top_codebook_size, tokenizer.bottom_codebook_size)
        data.save_checkpoint(path, "dalle", config, 1, model=wide.state_dict(), tokenizer=tokenizer.state())


LOADING_MODES = {  # every way each command line reads a checkpoint; CKPT stands for its path
    "vae": [["--sample", 2, "--ckpt", "CKPT"], ["--eval", "--ckpt", "CKPT"], ["--resume", "--ckpt", "CKPT"]],
    "vqvae2": [["--eval", "--ckpt", "CKPT"], ["--encode", "shapes", "--ckpt", "CKPT"], ["--resume", "--ckpt", "CKPT"],
               ["--sample", 2, "--ckpt", "CKPT"], ["--train-prior", "CKPT"]],
    "dcgan": [["--sample", 2, "--ckpt", "CKPT"], ["--eval", "--ckpt", "CKPT"], ["--resume", "--ckpt", "CKPT"]],
    "cvae": [["--sample", "x", "--ckpt", "CKPT"], ["--eval", "--ckpt", "CKPT"], ["--resume", "--ckpt", "CKPT"]],
    "dalle": [["--sample", "x", "--ckpt", "CKPT"], ["--eval", "--ckpt", "CKPT"], ["--resume", "--ckpt", "CKPT"],
              ["--train", "shapes", "--vqvae", "CKPT"]],
}


@pytest.mark.parametrize("name", list(LOADING_MODES))
def test_untrusted_and_wrong_checkpoints_are_refused_by_every_cli(name, tmp_path, capsys):
    module, marker = globals()[name], tmp_path / "pwned"
    torch.save({"kind": name, "payload": Exploit(str(marker))}, tmp_path / "evil.pt")  # runs code when unpickled
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Exploit(str(marker))))  # a raw pickle, not torch's format
    (tmp_path / "cut.pt").write_bytes((tmp_path / "evil.pt").read_bytes()[:300])  # a file cut short
    data.save_checkpoint(tmp_path / "other.pt", "dcgan" if name == "vae" else "vae", vae.Config(), 1, model={})
    expected = {"evil.pt": "could run code", "evil.pkl": "could run code", "cut.pt": "not a readable checkpoint",
                "other.pt": "checkpoint, not a"}
    for mode in LOADING_MODES[name]:
        for file, message in expected.items():
            argv = [str(tmp_path / file) if arg == "CKPT" else arg for arg in mode] + ["--out", tmp_path / "run"]
            assert_clean_error(in_process(capsys, module, *argv), file, message)
    assert not marker.exists() and not (tmp_path / "run" / "ckpt.pt").exists()
    mismatched_checkpoint(name, tmp_path / "wide.pt")
    mode = ["--eval"] if name == "vqvae2" else ["--sample", "2" if name in ("vae", "dcgan") else "x"]
    assert_clean_error(in_process(capsys, module, *mode, "--ckpt", tmp_path / "wide.pt", "--out", tmp_path / "s"),
                       "wide.pt: does not fit this model", "size mismatch")
    data.save_checkpoint(tmp_path / "typed.pt", name, vae.Config(), 1, model={}, ema_generator={}, tokenizer={})
    torch.save(torch.load(tmp_path / "typed.pt", weights_only=True) | {"config": {"image_size": "16"}},
               tmp_path / "typed.pt")  # a crafted config: a string where an integer belongs
    assert_clean_error(in_process(capsys, module, *mode, "--ckpt", tmp_path / "typed.pt"),
                       "image_size = '16' (str, expected int)")
    for mode in LOADING_MODES[name]:  # well typed but nonsense, in the model's config or its tokenizer's
        kind = ("vqvae2-codes" if "--train-prior" in mode else "vqvae2" if "--vqvae" in mode
                else "vqvae2-prior" if name == "vqvae2" and "--sample" in mode else name)
        nonsense = dataclasses.asdict((vqvae2 if kind.startswith("vqvae2") else module).Config()) | {"steps": -5}
        parts = ("model", "ema_generator", "generator", "discriminator", "generator_optimizer",
                 "discriminator_optimizer", "window", "train", "test")  # whatever one of the files requires
        torch.save(dict(kind=kind, config=nonsense, step=1, tokenizer=dict(config=nonsense, model={}),
                        **{part: {} for part in parts}), tmp_path / "nonsense.pt")
        argv = [str(tmp_path / "nonsense.pt") if arg == "CKPT" else arg for arg in mode] + ["--out", tmp_path / "run"]
        assert_clean_error(in_process(capsys, module, *argv), "config is refused: --steps must be positive")
    if name == "dalle":
        torch.save(dict(kind="dalle", config=dict(width=128, heads=3), step=1, model={}, tokenizer={}),
                   tmp_path / "heads.pt")
        assert_clean_error(in_process(capsys, dalle, "--sample", "x", "--ckpt", tmp_path / "heads.pt"),
                           "config is refused: --width must be a multiple of --heads")


def poisoned(module, steps):
    """Make the training batches (or, for dalle, the training loss) NaN at the given 0-based steps."""
    if module is dalle:
        real_losses, calls = dalle.losses, iter(range(10**6))

        def losses(model, tokens, inputs=None):
            text, nll = real_losses(model, tokens, inputs)
            return (text * float("nan"), nll) if model.training and next(calls) in steps else (text, nll)
        return "losses", losses
    real_batches = module.batches

    def batches(*arguments, **keywords):
        for step, (images, captions) in enumerate(real_batches(*arguments, **keywords)):
            yield (images * float("nan") if step in steps else images), captions
    return "batches", batches


NAN_RUNS = {  # tiny runs of each trainer: 20 steps, a checkpoint every 4
    "vae": ["--width", 8, "--iw", 2],
    "vqvae2": [*TINY_VQVAE2[2:], "--window", 2],
    "dcgan": [*TINY_DCGAN[2:], "--cond"],
    "cvae": [*TINY_CVAE[2:], "--iw", 2],
    "dalle": [*TINY_DALLE[2:]],
}


@pytest.mark.parametrize("name", list(NAN_RUNS))
def test_non_finite_loss_skips_the_step_then_stops_keeping_the_last_checkpoint(name, tiny_shapes, tmp_path, capsys,
                                                                              monkeypatch):
    module = globals()[name]
    monkeypatch.setattr(data, "_warned", set())
    monkeypatch.setattr(module, *poisoned(module, {2} | set(range(6, 100))))  # step 3, then every step from 7
    result = in_process(capsys, module, "--train", tiny_shapes, "--image-size", 16, "--batch-size", 8,
                        *NAN_RUNS[name], "--steps", 20, "--save-every", 4, "--log-every", 1, "--device", "cpu",
                        "--out", tmp_path)
    # steps 3 and 7..16 are not finite: ten are skipped, the eleventh stops the run, without saving
    assert_clean_error(result, "step 16:", "not finite", "last checkpoint is kept")
    assert "step 3: the loss or gradient norm is not finite" in result.stderr and "(10 of at most 10)" in result.stderr
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 12  # the checkpoints of steps 4, 8 and 12 were saved; nothing after
    states = [checkpoint[key] for key in ("model", "generator", "discriminator", "ema_generator") if key in checkpoint]
    assert all(tensor.isfinite().all() for state in states for tensor in state.values() if tensor.is_floating_point())
    optimizers = [value for key, value in checkpoint.items() if key.endswith("optimizer")]
    assert [optimizer["state"][0]["step"] for optimizer in optimizers] == [5] * len(optimizers)  # steps 1, 2, 4, 5, 6


DETERMINISM = {  # training, then sampling, each twice with the same seed; RUN stands for the run folder
    "vae": [["--train", "TINY", "--width", 8, "--iw", 2, "--steps", 3, "--out", "RUN"],
            ["--sample", 4, "--ckpt", "RUN/ckpt.pt", "--out", "RUN/samples"]],
    "vqvae2": [["--train", "TINY", *TINY_VQVAE2, "--steps", 3, "--window", 2, "--out", "RUN"],
               ["--encode", "TINY", "--ckpt", "RUN/ckpt.pt", "--out", "RUN/codes.pt"],
               ["--train-prior", "RUN/codes.pt", "--prior-width", 8, "--prior-layers", 2, "--steps", 2,
                "--out", "RUN/prior"],
               ["--sample", 2, "--ckpt", "RUN/prior/ckpt.pt", "--out", "RUN/samples"]],
    "dcgan": [["--train", "TINY", *TINY_DCGAN, "--cond", "--steps", 3, "--out", "RUN"],
              ["--sample", "a red circle", "-n", 2, "--ckpt", "RUN/ckpt.pt", "--out", "RUN/samples"]],
    "cvae": [["--train", "TINY", *TINY_CVAE, "--iw", 2, "--steps", 3, "--out", "RUN"],
             ["--sample", "a red circle", "-n", 2, "--ckpt", "RUN/ckpt.pt", "--out", "RUN/samples"]],
    "dalle": [["--train", "TINY", *TINY_DALLE, "--steps", 2, "--out", "RUN"],
              ["--sample", "a red circle", "-n", 2, "--ckpt", "RUN/ckpt.pt", "--out", "RUN/samples"]],
}


@pytest.mark.parametrize("name", list(DETERMINISM))
def test_same_seed_same_losses_and_samples(name, tiny_shapes, tmp_path, capsys, monkeypatch):
    module = globals()[name]
    monkeypatch.setattr(dcgan, "SCORED_SAMPLES", 10)
    for run_folder in (tmp_path / "a", tmp_path / "b"):
        for command in DETERMINISM[name]:
            argv = [str(arg).replace("TINY", str(tiny_shapes)).replace("RUN", str(run_folder)) for arg in command]
            result = in_process(capsys, module, "--image-size", 16, "--device", "cpu", *argv)
            assert result.returncode == 0, result.stderr

    def outputs(folder):  # the metrics without times and speeds, and every image and checkpoint written
        found = {}
        for path in sorted(folder.rglob("*")):
            if path.name == "metrics.jsonl":
                found[path.relative_to(folder)] = [
                    {k: v for k, v in json.loads(line).items() if k != "time" and "per_second" not in k}
                    for line in path.read_text().splitlines()]
            elif path.suffix == ".png":
                found[path.relative_to(folder)] = path.read_bytes()
            elif path.name == "ckpt.pt":
                found[path.relative_to(folder)] = torch.load(path, weights_only=True)["generator" if name == "dcgan"
                                                                                      else "model"]
        return found
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert a.keys() == b.keys() and any(path.name == "samples.png" for path in a)
    for path in a:
        if path.name == "ckpt.pt":
            assert all(torch.equal(a[path][key], b[path][key]) for key in a[path]), path
        else:
            assert a[path] == b[path], path
