"""Tests for data.py and every model file. CPU only, a few minutes on 2 cores: pytest test_all.py"""

import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import vae

ROOT = Path(__file__).resolve().parent


def run(*args, cwd=None, env=None):
    """Run a command line with this Python; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_clean_error(result, *fragments):
    """Exit status 2, one line on stderr, no traceback, mentioning every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("warning:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """A folder of 48 captioned 16-px shapes images (NAME.png + NAME.txt)."""
    folder = tmp_path_factory.mktemp("tiny")
    assert run(ROOT / "data.py", "shapes", folder, "--n", 48, "--size", 16).returncode == 0
    return folder


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
    assert "empty.png" in warnings and "notes.jpg" in warnings
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


def test_data_cli_shapes_and_score(tmp_path):
    result = run(ROOT / "data.py", "shapes", tmp_path, "--n", 20, "--size", 32, "--split", "test", "--seed", 4)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("*_heldout.png"))) == 10 and len(list(tmp_path.glob("*.txt"))) == 20
    scored = run(ROOT / "data.py", "score", tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert "overall   n=20    all 100.0%" in scored.stdout and "held_out" in scored.stdout
    assert_clean_error(run(ROOT / "data.py", "score", tmp_path / "missing"), "no such folder")
    assert_clean_error(run(ROOT / "data.py", "shapes", tmp_path, "--n", "many"), "invalid int")


# ----------------------------------------------------------------------------------------------------
# data.py: text, IDX, grids


def test_byte_text_encoding():
    captions = ["a red circle", "", "日本語のキャプション 🎨", "x" * 100, "\ud800 lone surrogate"]
    tokens = data.encode_text(captions, 16)
    assert tokens.shape == (5, 16) and tokens.dtype == torch.long
    assert tokens.max() <= data.PAD and data.TEXT_VOCAB == data.PAD + 1
    assert (tokens[1] == data.PAD).all() and (tokens[3] != data.PAD).all()
    decoded = data.decode_text(tokens)
    assert decoded[0] == "a red circle" and decoded[1] == "" and decoded[3] == "x" * 16
    assert decoded[2].startswith("日本語の")  # 16 bytes cut a character: replaced, never an error
    assert data.decode_text(data.encode_text(["héllo wörld"], 64)) == ["héllo wörld"]


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
    (tmp_path / "junk.pt").write_bytes(b"junk")
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


def test_vae_cli_end_to_end_resume_sample_eval(tiny_shapes, tmp_path):
    common = ["--train", tiny_shapes, "--image-size", 16, "--batch-size", 8, "--width", 8, "--iw", 2,
              "--log-every", 1, "--device", "cpu"]
    trained = run(ROOT / "vae.py", *common, "--steps", 3, "--save-every", 2, "--out", tmp_path / "a")
    assert trained.returncode == 0, trained.stderr
    assert "IW-NLL (K=2)" in trained.stdout
    for name in ("ckpt.pt", "metrics.jsonl", "config.json", "samples_000003.png", "reconstructions_000002.png"):
        assert (tmp_path / "a" / name).is_file(), name
    again = run(ROOT / "vae.py", *common, "--steps", 3, "--out", tmp_path / "a")
    assert_clean_error(again, "exists", "--resume")  # never overwrite a run by accident
    resumed = run(ROOT / "vae.py", "--resume", "--steps", 5, "--out", tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 3" in resumed.stdout and "step 5/5" in resumed.stdout
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 5

    sampled = run(ROOT / "vae.py", "--sample", 4, "--ckpt", tmp_path / "a" / "ckpt.pt", "--out", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    assert Image.open(tmp_path / "s" / "samples.png").size == (2 * 18 + 2, 2 * 18 + 2)
    assert Image.open(tmp_path / "s" / "interpolation.png").size[0] == 10 * 18 + 2
    evaluated = run(ROOT / "vae.py", "--eval", "--ckpt", tmp_path / "a" / "ckpt.pt", "--iw", 3)
    assert evaluated.returncode == 0 and "IW-NLL (K=3)" in evaluated.stdout, evaluated.stderr
    done = run(ROOT / "vae.py", "--resume", "--out", tmp_path / "a")
    assert_clean_error(done, "already", "--steps")


def test_vae_stop_signal_saves_and_resume_continues_exactly(tiny_shapes, tmp_path, monkeypatch):
    args = ["--train", str(tiny_shapes), "--image-size", "16", "--batch-size", "8", "--width", "8", "--iw", "2",
            "--log-every", "1", "--save-every", "100", "--steps", "7", "--warmup", "1", "--device", "cpu"]
    vae.main(args + ["--out", str(tmp_path / "straight")])

    real_batches = vae.batches

    def batches_then_ctrl_c(*arguments, **keywords):
        for i, batch in enumerate(real_batches(*arguments, **keywords)):
            if i == 3:  # a Ctrl-C while step 4 runs: the step finishes, is saved, and the run stops
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(vae, "batches", batches_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        vae.main(args + ["--out", str(tmp_path / "stopped")])
    assert torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(vae, "batches", real_batches)
    vae.main(["--resume", "--out", str(tmp_path / "stopped")])

    def losses(folder):
        records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert losses(tmp_path / "straight") == losses(tmp_path / "stopped") and len(losses(tmp_path / "stopped")) == 7
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "stopped"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 7


def test_vae_cli_bad_inputs(tmp_path, tiny_shapes):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"\xff\xd8 not really")
    assert_clean_error(run(ROOT / "vae.py", "--train", tmp_path / "missing"), "no such folder")
    assert_clean_error(run(ROOT / "vae.py", "--train", tmp_path / "empty"), "no usable image")
    assert_clean_error(run(ROOT / "vae.py", "--train", tmp_path / "broken"), "no usable image")
    assert_clean_error(run(ROOT / "vae.py", "--steps", "abc"), "invalid int")
    assert_clean_error(run(ROOT / "vae.py", "--steps", "-3"), "--steps")
    assert_clean_error(run(ROOT / "vae.py", "--image-size", "20"), "--image-size")
    assert_clean_error(run(ROOT / "vae.py", "--device", "tpu"), "--device")
    assert_clean_error(run(ROOT / "vae.py", "--device", "cuda:0"), "no CUDA device")
    assert_clean_error(run(ROOT / "vae.py", "--sample", 4, "--ckpt", tmp_path / "none.pt"), "no such checkpoint")
    data.save_checkpoint(tmp_path / "gan.pt", "dcgan", vae.Config(), 1, model={})
    assert_clean_error(run(ROOT / "vae.py", "--sample", 4, "--ckpt", tmp_path / "gan.pt"), "dcgan checkpoint")
    torch.save({"kind": "vae", "payload": Exploit(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    assert_clean_error(run(ROOT / "vae.py", "--eval", "--ckpt", tmp_path / "evil.pt"), "could run code")
    assert not (tmp_path / "pwned").exists()
    assert_clean_error(run(ROOT / "vae.py", "--resume", "--out", tmp_path / "norun"), "no such checkpoint")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vae_torchrun_two_processes(tiny_shapes, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(ROOT / "vae.py"), "--train", str(tiny_shapes), "--image-size", "16",
         "--steps", "4", "--batch-size", "4", "--width", "8", "--iw", "2", "--log-every", "2",
         "--out", str(tmp_path), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("held-out (") == 1  # rank 0 reports once
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # one writer: no record twice
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    assert not list(tmp_path.glob(".*tmp*"))
