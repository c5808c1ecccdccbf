"""sample.py, its library helpers (sdjax.cli_utils, sdjax.images) and sdjax.trajectory, on a tiny
random pipeline folder at 32x32 pixels (16x16 latents) with 3 steps.

Most runs call ``sample.main(argv)`` in-process with one shared loaded pipeline (loading is
memoized, so compiled programs are reused across tests); one subprocess test runs the script twice
against a fresh persistent compilation cache.
"""
from __future__ import annotations

import errno
import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import images as I
from sdjax import trajectory as T
from sdjax.cli_utils import UsageError, load_config, parse_seeds, run_sampling, settings_from_png

ROOT = Path(__file__).resolve().parent.parent
# --progress batches: the program the tests' own pipe(...) calls compile too (a step bar adds a host callback).
SMALL = ["--height", "32", "--width", "32", "--steps", "3", "--dtype", "float32", "--compilation-cache", "none",
         "--progress", "batches"]


def _load_sample_module():
    spec = importlib.util.spec_from_file_location("sdjax_sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample = _load_sample_module()


@pytest.fixture(scope="module")
def pipe_dir(tiny_checkpoints, tmp_path_factory):
    from test_weights import make_pipeline_dir
    from sdjax.weights import save_pipeline
    tmp = tmp_path_factory.mktemp("cli_pipe")
    return save_pipeline(tmp / "pipe", **make_pipeline_dir(tiny_checkpoints, tmp), format="pytorch")


@pytest.fixture(scope="module")
def cached_loading():
    """Load each (folder, dtype) once per module: main() then reuses the pipeline and its compiled
    programs (real loading errors still go through the real from_pretrained)."""
    from sdjax.pipeline import StableDiffusion
    real = StableDiffusion.from_pretrained.__func__
    memo = {}

    def from_pretrained(cls, path, **kwargs):
        key = (str(path), str(kwargs.get("dtype")), kwargs.get("variant"), str(kwargs.get("vae")))
        if key not in memo:
            memo[key] = real(cls, path, **kwargs)
        return memo[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StableDiffusion, "from_pretrained", classmethod(from_pretrained))
        yield


@pytest.fixture(scope="module")
def pipe(pipe_dir, cached_loading):
    from sdjax.pipeline import StableDiffusion
    return StableDiffusion.from_pretrained(str(pipe_dir), dtype="float32")


def run_main(capsys, *argv):
    rc = sample.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------- helpers
def test_parse_seeds():
    assert parse_seeds("7") == [7]
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("3,7,9") == [3, 7, 9]
    assert parse_seeds("0-2, 10") == [0, 1, 2, 10]
    assert parse_seeds([1, "4-5"]) == [1, 4, 5] and parse_seeds(12) == [12]
    assert parse_seeds(str(2**32 - 1)) == [2**32 - 1]
    for bad in ["", "x", "1-", "-1", "3-1", "1,,2", "1.5", str(2**32), "0-2000000"]:
        with pytest.raises(UsageError):
            parse_seeds(bad)


def test_names_and_a1111_parameters(tmp_path, monkeypatch):
    assert I.image_file_name(3, 7, "A photo of a Cat!") == "00003-seed7-a-photo-of-a-cat.png"
    assert I.slugify("  ") == "untitled" and len(I.slugify("x" * 500)) == 60
    text = I.a1111_parameters("a photo of a cat", "blurry", steps=50, scheduler="pndm", guidance_scale=7.5,
                              seed=7, width=512, height=512, model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert text == ("a photo of a cat\nNegative prompt: blurry\nSteps: 50, Sampler: PLMS, CFG scale: 7.5, "
                    "Seed: 7, Size: 512x512, Model: stable-diffusion-v1-5")
    parsed = I.parse_a1111_parameters(text)
    assert parsed["negative_prompt"] == "blurry" and parsed["Seed"] == "7" and parsed["Sampler"] == "PLMS"
    # A model name with a comma or colon is JSON-quoted, as A1111 quotes such values, and reads back whole.
    text = I.a1111_parameters("p", steps=3, scheduler="ddim", guidance_scale=7, seed=1, width=8, height=8,
                              model="/home/alice/models/my,model: v2.safetensors")
    assert text.endswith('Size: 8x8, Model: "my,model: v2"')
    assert I.parse_a1111_parameters(text)["Model"] == "my,model: v2"
    # a train.py export is named by its run (every run's export folder is "final"), a pipeline's VAE by it
    assert [I.model_name(m) for m in ("runs/my_style/final", "runs/my_style/final/", "final", "C:\\m\\sd.ckpt",
                                      "./final", "../final", "my_style/./final", "my_style/final.safetensors",
                                      "/models/other-model/vae", "runs/my_style/final/vae",
                                      "my_style/final/vae/diffusion_pytorch_model.safetensors")] \
        == ["my_style", "my_style", "final", "sd", "final", "final", "my_style", "my_style", "other-model",
            "my_style", "my_style"]
    # a local path that exists is resolved; a diffusers weights file is named as its model folder; a
    # file named vae.safetensors is a VAE of that name, not a pipeline's vae/ folder
    (tmp_path / "sd15" / "vae").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sd15")
    names = (".", "vae", "/m/sd15/vae/diffusion_pytorch_model.safetensors",
             "/m/sd15/unet/diffusion_pytorch_model.fp16.safetensors", "/m/VAE/vae.safetensors")
    assert [I.model_name(m) for m in names] == ["sd15", "sd15", "sd15", "unet", "vae"]
    no_negative = I.a1111_parameters("p", "", steps=3, scheduler="euler_a", guidance_scale=11, seed=0,
                                     width=64, height=32)
    assert no_negative == "p\nSteps: 3, Sampler: Euler a, CFG scale: 11, Seed: 0, Size: 64x32"
    # Clip skip as A1111 writes it: after the model and VAE, and only when it is not 1
    text = I.a1111_parameters("p", steps=3, scheduler="ddim", guidance_scale=7, seed=0, width=8, height=8,
                              model="sd15", vae="ft-mse", clip_skip=2)
    assert text.endswith("Model: sd15, VAE: ft-mse, Clip skip: 2")
    assert I.parse_a1111_parameters(text)["Clip skip"] == "2"
    assert I.a1111_parameters("p", steps=3, scheduler="euler_a", guidance_scale=11, seed=0, width=64, height=32,
                              clip_skip=1) == no_negative
    # LoRAs as A1111 users write them, after the prompt: <lora:NAME:SCALE> (A1111 and Civitai read them back)
    for prompt, negative in (("a cat\nin a hat", "blurry"), ("", "")):
        text = I.a1111_parameters(prompt, negative, steps=3, scheduler="ddim", guidance_scale=7, seed=5, width=8,
                                  height=8, loras=[("style_v2", 0.75), ("detail", 1.0)])
        parsed = I.parse_a1111_parameters(text)
        tags = "<lora:style_v2:0.75> <lora:detail:1>"
        assert (parsed["prompt"], parsed["negative_prompt"], parsed["Seed"]) == \
            (f"{prompt} {tags}" if prompt else tags, negative, "5")
    # the scale as used, so that the settings read back make the same image (%g wrote 7.12346)
    for scale in (7.123456789, 1234567.0, 0.1 + 0.2, 2.5e-7):
        text = I.a1111_parameters("p", steps=3, scheduler="ddim", guidance_scale=scale, seed=0, width=8, height=8)
        assert float(I.parse_a1111_parameters(text)["CFG scale"]) == scale
    # prompts over several lines (A1111 allows them): the last line is the settings line
    for prompt, negative in (("a cat\nin a hat", "blurry\nugly"), ("a cat\nin a hat", ""), ("", "")):
        parsed = I.parse_a1111_parameters(I.a1111_parameters(prompt, negative, steps=3, scheduler="ddim",
                                                             guidance_scale=7, seed=5, width=8, height=8))
        assert (parsed["prompt"], parsed["negative_prompt"], parsed["Seed"], parsed["Size"]) == \
            (prompt, negative, "5", "8x8")


def test_runs_into_one_folder_reserve_their_numbers(tmp_path):
    """Two runs writing into one folder at once take ranges of numbers that do not overlap (they used
    to take the same numbers and replace each other's files); a claim left by a killed run leaves a
    gap; another tool's numbered files do not count."""
    (tmp_path / "00004-seed1-a-cat.png").write_bytes(b"")
    (tmp_path / "20240101-holiday.jpg").write_bytes(b"")
    first, release_first = I.reserve_indices(tmp_path, 3)
    second, release_second = I.reserve_indices(tmp_path, 2)
    assert (first, second) == (5, 8)
    release_first()
    assert I.next_free_index(tmp_path) == 10         # the second run's claim still counts
    release_second()
    assert I.next_free_index(tmp_path) == 5          # nothing was written: the numbers are free again
    (tmp_path / "00005-control0.png").write_bytes(b"")   # (a run's control image, written before its images)
    assert I.next_free_index(tmp_path) == 6
    (tmp_path / "00005-control0.png").unlink()
    (tmp_path / ".sdjax-reserved-00005").write_text("6")   # left by a run that was killed
    assert I.reserve_indices(tmp_path, 1)[0] == 7
    (tmp_path / ".sdjax-reserved-00008").write_text("")    # killed (or a full disk) before writing its last
    assert I.reserve_indices(tmp_path, 1)[0] == 9           # its first number counts (it looped forever)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_run_counting_while_another_claims_takes_numbers_past_its_range(tmp_path, monkeypatch, hard_links):
    """Run B counts the folder at the moment run A's claim appears. With hard links the claim
    appears holding its last number, so B starts past A's range (B used to read it empty and take
    A's second number). Without them (the fallback, which keeps that window) the claims still differ."""
    real_link, real_open = os.link, os.open
    ranges = {}

    def then_run_b(claim):   # the claim is visible now: run B counts and claims
        if not ranges and Path(claim).name.startswith(".sdjax-reserved-"):
            ranges["b"] = None   # once: B's own claim runs no third
            ranges["b"] = I.reserve_indices(tmp_path, 10)[0]

    def link(src, dst, *args, **kwargs):
        if not hard_links:
            raise OSError(errno.EPERM, "hard links are not supported here")
        real_link(src, dst, *args, **kwargs)
        then_run_b(dst)

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_EXCL:
            then_run_b(path)
        return fd

    monkeypatch.setattr(I.os, "link", link)
    monkeypatch.setattr(I.os, "open", open_)
    a = I.reserve_indices(tmp_path, 10)[0]
    assert a == 0
    assert ranges["b"] == (10 if hard_links else 1)
    assert I.next_free_index(tmp_path) == ranges["b"] + 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sdjax-reserved-00000", f".sdjax-reserved-{ranges['b']:05d}"]


def test_the_out_folder_check_touches_nothing_of_it(tmp_path):
    """The --out check makes and removes a probe folder beside the target, never the target or its
    parents (removing one that another process made at that moment)."""
    from sdjax.cli_utils import unwritable_folder
    assert unwritable_folder(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        I.atomic_write(tmp_path / "x.png", failing)
    assert list(tmp_path.iterdir()) == []
    # a written file gets the usual permissions (0666 less the umask), not a temp file's 0600
    umask = os.umask(0)
    os.umask(umask)
    written = I.atomic_write(tmp_path / "y.png", lambda tmp: tmp.write_bytes(b"png"))
    assert written.read_bytes() == b"png" and (written.stat().st_mode & 0o777) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["y.png"]


def test_image_strip_size_and_grid():
    rng = np.random.default_rng(0)
    frames = [rng.random((24, 16, 3)) for _ in range(5)]
    plain = T.image_strip(frames)
    assert plain.size == (5 * 16 + 6 * I.GAP, 24 + 2 * I.GAP)
    labelled = T.image_strip(frames, [f"t={t}" for t in range(5)])
    L = I.label_height()
    assert labelled.height == 24 + L + 2 * I.GAP and labelled.width >= plain.width
    grid = T.image_strip(frames, None, columns=2)
    assert grid.size == (2 * 16 + 3 * I.GAP, 3 * 24 + 4 * I.GAP)
    assert I.image_grid(frames).size == (3 * 16 + 4 * I.GAP, 2 * 24 + 3 * I.GAP)
    # the first tile's pixels are where the layout says
    np.testing.assert_array_equal(np.asarray(plain)[I.GAP:I.GAP + 24, I.GAP:I.GAP + 16],
                                  I.as_pil(frames[0]))
    with pytest.raises(ValueError, match="labels"):
        T.image_strip(frames, ["a"])


def test_save_gif_frame_count(tmp_path):
    frames = [np.full((8, 8, 3), v, np.float32) for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
    path = T.save_gif(frames, tmp_path / "a.gif", duration_ms=100)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.info["loop"] == 0

    def durations(path):
        with Image.open(path) as gif:
            return [(gif.seek(i), gif.info["duration"])[1] for i in range(gif.n_frames)]
    assert durations(path) == [100, 100, 100, 100, 1200]          # the last frame held
    assert durations(T.save_gif(frames[:3], tmp_path / "b.gif", duration_ms=[100, 200, 300])) == [100, 200, 300]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "b.gif"]


def test_trajectory_steps():
    assert T.trajectory_steps(51, 8) == [0, 8, 17, 25, 33, 42]   # + the noise and the final image = 8 frames
    assert T.trajectory_steps(4, 8) == [0, 1, 2]
    assert T.trajectory_steps(11, 4, 5) == [5, 8]   # img2img from loop index 5: linspace(5, 10, 3) less the last
    with pytest.raises(ValueError):
        T.trajectory_steps(10, 2)


# ----------------------------------------------------------------------------- config presets
@pytest.mark.parametrize("text,message", [
    ("steps: 2\nguidance_scale: 5\nsteps: 3\n", "line 3: not valid YAML (key 'steps' appears twice (first on line 1))"),
    ("guidance-scale: 2\nguidance_scale: 3\n", "key 'guidance_scale' sets guidance_scale a second time"),
    ("steps: [2\n", "line 2: not valid YAML (expected ',' or ']'"),
    ("? [a, b]\n: 1\n", "line 1: not valid YAML (found unhashable key)"),
])
def test_config_files_with_repeated_keys_or_broken_yaml_are_refused_by_both_tools(tmp_path, text, message):
    """YAML keeps the last of two equal keys silently; both tools' config readers refuse them, and
    name the line of a syntax error."""
    from sdjax.training.cli import load_train_config
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(f"{path}") + ".*" + re.escape(message)):
        load_config(path)
    if "guidance" not in text:   # a sampling key; train.py's own keys follow the same rules
        with pytest.raises(UsageError, match=re.escape(f"{path}") + ".*" + re.escape(message)):
            load_train_config(path)
    else:
        path.write_text("max-steps: 2\nmax_steps: 3\n")
        with pytest.raises(UsageError, match="key 'max_steps' sets max_steps a second time"):
            load_train_config(path)


def test_config_files_may_merge_yaml_anchors(tmp_path):
    """YAML merge keys (<<: *base) are not repeated keys: the keys beside them override the base's."""
    from sdjax.cli_utils import read_yaml_mapping
    path = tmp_path / "preset.yaml"
    path.write_text("defaults: &base {steps: 5, scheduler: ddim}\nrun:\n  <<: *base\n  steps: 7\n")
    assert read_yaml_mapping(path)["run"] == {"steps": 7, "scheduler": "ddim"}


def test_presets_load_and_precedence(tmp_path):
    presets = {p.stem: load_config(p) for p in (ROOT / "configs").glob("*.yaml")}
    assert presets["draft"]["steps"] == 25 and presets["quality"]["steps"] == 90
    assert presets["creative"]["guidance_scale"] == 6.0 and presets["precise"]["guidance_scale"] == 11.0
    readme = (ROOT / "configs" / "README.md").read_text()
    from sdjax.cli_utils import CONFIG_KEYS
    for key in CONFIG_KEYS:
        assert f"`{key}`" in readme, key

    req, _ = sample.parse_request(["a cat", "--config", "draft"])
    assert (req.steps, req.guidance_scale, req.scheduler) == (25, 7.5, "pndm")
    req, _ = sample.parse_request(["a cat", "--config", "precise", "--guidance-scale", "9", "--steps", "30"])
    assert (req.steps, req.guidance_scale) == (30, 9.0) and req.negative_prompt
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("steps: 3\nguidance-scale: 6\nseeds: [4, 5]\ngrid: true\nnegative_prompt: ugly\n")
    req, _ = sample.parse_request(["a cat", "--config", str(cfg), "--no-grid"])
    assert (req.steps, req.guidance_scale, req.seeds, req.grid, req.negative_prompt) == (3, 6.0, [4, 5], False, "ugly")
    req, _ = sample.parse_request(["a cat"])
    assert (req.steps, req.guidance_scale, req.scheduler, req.height, req.width, req.seeds, req.out, req.dtype) == \
        (50, 7.5, "pndm", 512, 512, [0], "outputs", None)
    from sdjax.cli_utils import default_dtype
    assert default_dtype() == "float32"   # CPU
    cfg.write_text("out: ~/pictures\nvariant: fp16\n")
    req, _ = sample.parse_request(["a cat", "--config", str(cfg)])
    assert (req.out, req.variant) == (str(Path.home() / "pictures"), "fp16")   # not a folder named "~"
    for name in ("a.safetensors", "b:c.safetensors"):
        (tmp_path / name).write_bytes(b"")
    cfg.write_text(f"lora: {tmp_path / 'a.safetensors'}:0.5\n")   # one, or a list; --lora flags add to them
    req, _ = sample.parse_request(["a cat", "--config", str(cfg), "--lora", str(tmp_path / "b:c.safetensors")])
    assert req.lora == [f"{tmp_path / 'a.safetensors'}:0.5", str(tmp_path / "b:c.safetensors")]
    from sdjax.cli_utils import lora_tags
    assert lora_tags(req.lora) == [("a", 0.5), ("b:c", 1.0)]   # a file named with a colon is taken whole
    cfg.write_text("lora: [3]\n")
    with pytest.raises(UsageError, match="key 'lora' has item 3; expected FILE or FILE:SCALE strings"):
        load_config(cfg)
    Image.new("RGB", (24, 16)).save(tmp_path / "pose.png")
    cfg.write_text(f"controlnet: [{tmp_path}, {tmp_path / 'a'}]\ncontrol_image: [{tmp_path / 'pose.png'}, "
                   f"{tmp_path / 'pose.png'}]\ncontrolnet_scale: [0.5, '2']\ncontrolnet_end: 0.8\n"
                   "controlnet_mode: [controlnet, balanced]\n")
    req, _ = sample.parse_request(["a cat", "--config", str(cfg)])   # (two ControlNets; the size: the image's)
    assert (req.controlnet, req.controlnet_scale, req.controlnet_end, req.width, req.height) == (
        [str(tmp_path), str(tmp_path / "a")], [0.5, 2.0], [0.8], 24, 16)
    assert [(u.scale, u.start, u.end, u.mode) for u in req.control_units] == [(0.5, 0.0, 0.8, "controlnet"),
                                                                             (2.0, 0.0, 0.8, "balanced")]
    req, _ = sample.parse_request(["a cat", "--config", str(cfg), "--controlnet", str(tmp_path), "--control-image",
                                   str(tmp_path / "pose.png"), "--controlnet-scale", "0.3", "--controlnet-mode",
                                   "prompt"])
    assert (req.controlnet, req.controlnet_scale, req.controlnet_end, req.controlnet_mode) == (
        [str(tmp_path)], [0.3], [0.8], ["prompt"])   # (the preset's lists replaced by the flags)
    cfg.write_text("controlnet_scale: [1, high]\n")
    with pytest.raises(UsageError, match="key 'controlnet_scale' has item 'high'; expected numbers"):
        load_config(cfg)
    # (how the control images are made: a value for all, or a list of one each)
    cfg.write_text(f"controlnet: [{tmp_path}, {tmp_path / 'a'}]\ncontrol_image: [{tmp_path / 'pose.png'}, "
                   f"{tmp_path / 'pose.png'}]\ncontrolnet_module: [canny, invert]\ncontrolnet_resize: fill\n"
                   "controlnet_processor_res: '256'\ncontrolnet_canny_low: [50, 60]\ncontrolnet_canny_high: 150\n"
                   "controlnet_pixel_perfect: [true, false]\n")
    req, _ = sample.parse_request(["a cat", "--config", str(cfg)])
    assert [(u.module, u.resize, u.processor_res, u.low_threshold, u.high_threshold, u.pixel_perfect)
            for u in req.control_units] == [("canny", "fill", 256, 50, 150, True), ("invert", "fill", 256, 60, 150,
                                                                                      False)]
    for text, expected in (("controlnet_canny_low: [50, 0.5]", "key 'controlnet_canny_low' has item 0.5; expected "
                            "whole numbers"),
                           ("controlnet_pixel_perfect: [1]", "key 'controlnet_pixel_perfect' has item 1; expected true "
                            "or false"),
                           ("controlnet_module: [3]", "key 'controlnet_module' has item 3; expected strings")):
        cfg.write_text(text + "\n")
        with pytest.raises(UsageError, match=re.escape(expected)):
            load_config(cfg)
    cfg.write_text(f"controlnet: {tmp_path}\ncontrol_image: {tmp_path / 'pose.png'}\ncontrolnet_module: canny\n"
                   "controlnet_canny_high: 300\n")
    with pytest.raises(UsageError, match=re.escape(f"{cfg}: key 'controlnet_canny_high' has value [300]: must be a "
                                                   "whole number from 1 to 255")):
        sample.parse_request(["a cat", "--config", str(cfg)])
    cfg.write_text(f"controlnet: {tmp_path}\ncontrol_image: {tmp_path / 'pose.png'}\ncontrolnet_mode: guess\n")
    with pytest.raises(UsageError, match=re.escape(f"{cfg}: key 'controlnet_mode' has value ['guess']: choose one of "
                                                   "balanced, prompt, controlnet")):
        sample.parse_request(["a cat", "--config", str(cfg)])
    cfg.write_text("guidance_scale: 1e1\n")   # YAML 1.1 reads this as the text '1e1'
    assert load_config(cfg)["guidance_scale"] == 10.0
    cfg.write_text("steps: 1e1\n")            # still no integer
    with pytest.raises(UsageError, match="key 'steps' has value '1e1'; expected an integer"):
        load_config(cfg)
    cfg.write_text("steps: '30'\nguidance_scale: \"7.5\"\nheight: ' 64'\n")   # quoted numbers, as train.py reads them
    assert {k: load_config(cfg)[k] for k in ("steps", "guidance_scale", "height")} == \
        {"steps": 30, "guidance_scale": 7.5, "height": 64}
    for text, expected in (("steps: '3.5'", "'3.5'; expected an integer"), ("guidance_scale: 'high'", "'high'; "
                           "expected an integer or a number"), ("seeds: '0-3'", None)):
        cfg.write_text(text + "\n")
        if expected is None:
            assert load_config(cfg)["seeds"] == "0-3"   # seeds take text: not a number
        else:
            with pytest.raises(UsageError, match=re.escape(expected)):
                load_config(cfg)


# ----------------------------------------------------------------------------- generating
def test_every_prompt_times_every_seed_with_metadata_and_grid(pipe_dir, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "a photo of a cat", "a dog", "a bird", "--seeds", "3,7", "--negative-prompt",
                             "blurry", "--model", pipe_dir, "--out", out, "--grid", *SMALL)
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-grid.png", "00000-seed3-a-photo-of-a-cat.png", "00001-seed7-a-photo-of-a-cat.png",
                     "00002-seed3-a-dog.png", "00003-seed7-a-dog.png", "00004-seed3-a-bird.png",
                     "00005-seed7-a-bird.png"]
    assert re.search(r"^6 images in [\d.]+ s \([\d.]+ images/s, compile [\d.]+ s\)$", stdout, re.M), stdout
    params = I.read_png_parameters(out / "00001-seed7-a-photo-of-a-cat.png")
    assert params == ("a photo of a cat\nNegative prompt: blurry\nSteps: 3, Sampler: PLMS, CFG scale: 7.5, "
                      f"Seed: 7, Size: 32x32, Model: {pipe_dir.name}")   # the name, not the local path
    # each file is the pipeline's image for its (prompt, seed)
    ref = pipe(["a dog", "a photo of a cat"], "blurry", seeds=[7, 3], num_inference_steps=3, height=32, width=32)
    np.testing.assert_array_equal(pixels(out / "00003-seed7-a-dog.png"), ref.to_pil()[0])
    np.testing.assert_array_equal(pixels(out / "00000-seed3-a-photo-of-a-cat.png"), ref.to_pil()[1])
    assert Image.open(out / "00000-grid.png").size == (2 * 32 + 3 * I.GAP, 3 * 32 + 4 * I.GAP)  # a row per prompt
    assert I.read_png_parameters(out / "00000-grid.png") == I.read_png_parameters(
        out / "00000-seed3-a-photo-of-a-cat.png")   # as A1111: the first image's settings
    first_grid = (out / "00000-grid.png").read_bytes()

    # a second run into the same folder continues the numbering instead of overwriting; with the
    # default progress (on the CPU, a bar over every model call) it makes the same image
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "7", "--negative-prompt", "blurry", "--model", pipe_dir,
                             "--out", out, *SMALL, "--progress", "auto", "--grid")
    calls = pipe.make_scheduler("pndm", 3).num_model_calls
    assert re.search(rf"steps: 100%.* {calls}/{calls} ", stderr), stderr
    assert rc == 0 and (out / "00006-seed7-a-dog.png").is_file()
    np.testing.assert_array_equal(pixels(out / "00006-seed7-a-dog.png"), pixels(out / "00003-seed7-a-dog.png"))
    assert (out / "00006-grid.png").is_file() and (out / "00000-grid.png").read_bytes() == first_grid
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temp files


def test_scheduler_options_from_flags_and_presets(tmp_path):
    """--scheduler-option KEY=VALUE (values read as YAML) over a preset's scheduler_options; a key
    the scheduler does not take, or an item without "=", is one line naming it."""
    cfg = tmp_path / "karras.yaml"
    cfg.write_text("scheduler: dpmpp_2m\nscheduler_options: {use_karras_sigmas: true, timestep_spacing: leading}\n")
    req, _ = sample.parse_request(["a cat", "--config", str(cfg), "--scheduler-option", "timestep_spacing=trailing"])
    assert req.scheduler_options == {"use_karras_sigmas": True, "timestep_spacing": "trailing"}
    req, _ = sample.parse_request(["a cat", "--config", str(cfg), "--scheduler-option", "use_exponential_sigmas=true"])
    assert req.scheduler_options == {"timestep_spacing": "leading", "use_exponential_sigmas": True}   # not both
    req, _ = sample.parse_request(["a cat", "--scheduler", "ddim", "--scheduler-option", "eta=0.5"])
    assert req.scheduler_options == {"eta": 0.5}
    # YAML 1.1 reads 1e-3 (no dot) as text: meant as a number, on the command line and in a preset
    req, _ = sample.parse_request(["a cat", "--scheduler", "ddim", "--scheduler-option", "eta=1e-3"])
    assert req.scheduler_options == {"eta": 0.001}
    cfg.write_text("scheduler: ddim\nscheduler_options: {eta: 1e-3}\n")
    assert sample.parse_request(["a cat", "--config", str(cfg)])[0].scheduler_options == {"eta": 0.001}
    for text in ("-inf", "-Infinity"):   # as Python and JSON write it (YAML 1.1 spells it -.inf)
        req, _ = sample.parse_request(["a cat", "--scheduler", "dpmpp_2m", "--scheduler-option",
                                       f"lambda_min_clipped={text}"])
        assert req.scheduler_options == {"lambda_min_clipped": -math.inf}
    for argv, message in (
            (["--scheduler", "ddim", "--scheduler-option", "use_karras_sigmas=true"],
             "--scheduler-option: 'ddim' scheduler has no option 'use_karras_sigmas'; valid options: "),
            (["--scheduler-option", "karras"], "--scheduler-option 'karras': expected KEY=VALUE"),
            (["--scheduler", "dpmpp_2m", "--scheduler-option", "use_karras_sigmas=tru"],
             "--scheduler-option: dpmpp_2m setting use_karras_sigmas='tru': expected true or false"),
            (["--scheduler-option", "eta="], "--scheduler-option 'eta=': expected one value")):
        with pytest.raises(UsageError, match=re.escape(message)):
            sample.parse_request(["a cat", *argv])
    cfg.write_text("scheduler_options: [use_karras_sigmas]\n")
    with pytest.raises(UsageError, match="key 'scheduler_options' has value .*; expected a mapping"):
        sample.parse_request(["a cat", "--config", str(cfg)])


def test_scheduler_options_make_the_pipelines_image_and_are_recorded(pipe_dir, pipe, tmp_path, capsys):
    """DPM++ 2M Karras from the command line is the pipeline's image with use_karras_sigmas, and the
    PNG parameters say "Schedule type: Karras" as A1111 writes it."""
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--scheduler", "dpmpp_2m", "--scheduler-option",
                             "use_karras_sigmas=true", "--model", pipe_dir, "--out", out, *SMALL)
    assert rc == 0, stderr
    params = I.read_png_parameters(out / "00000-seed4-a-dog.png")
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 4" in params
    ref = pipe("a dog", seeds=4, num_inference_steps=3, height=32, width=32, scheduler="dpmpp_2m",
               scheduler_options={"use_karras_sigmas": True}).to_pil()
    plain = pipe("a dog", seeds=4, num_inference_steps=3, height=32, width=32, scheduler="dpmpp_2m").to_pil()
    np.testing.assert_array_equal(pixels(out / "00000-seed4-a-dog.png"), ref[0])
    assert not np.array_equal(np.asarray(ref[0]), np.asarray(plain[0]))   # the option changed the image
    # a value the scheduler cannot take: one line, exit 2, before the output folder is made
    rc, _, stderr = run_main(capsys, "a dog", "--scheduler", "ddim", "--scheduler-option", "eta=2", "--model",
                             pipe_dir, "--out", tmp_path / "none", *SMALL)
    assert rc == 2 and stderr.strip().splitlines()[-1] == (
        "sample.py: error: --scheduler-option eta=2: ddim eta must be a number in [0, 1] (0: deterministic, "
        "1: DDPM's noise), got 2")
    assert not (tmp_path / "none").exists()
    assert I.a1111_parameters("p", steps=3, scheduler="ddim", scheduler_options={"eta": 0.5, "timestep_spacing":
                              "trailing"}, guidance_scale=7, seed=0, width=8, height=8) == \
        "p\nSteps: 3, Sampler: DDIM, Eta DDIM: 0.5, timestep_spacing: trailing, CFG scale: 7, Seed: 0, Size: 8x8"


def test_from_png_makes_the_image_again_and_flags_override_it(pipe_dir, pipe, tmp_path, capsys):
    """--from-png IMAGE: the settings in its parameters make the same image, bit for bit, with the same
    parameters and nothing to warn about; a prompt or flag given replaces the image's."""
    first = tmp_path / "first"
    rc, _, stderr = run_main(capsys, "a dog", "--negative-prompt", "blurry, a cat", "--seeds", "4", "--scheduler",
                             "dpmpp_2m", "--scheduler-option", "use_karras_sigmas=true", "--guidance-scale", "6",
                             "--model", pipe_dir, "--out", first, *SMALL)
    assert rc == 0, stderr
    png = first / "00000-seed4-a-dog.png"
    same = ["--model", pipe_dir, "--dtype", "float32", "--compilation-cache", "none", "--progress", "batches"]
    rc, _, stderr = run_main(capsys, "--from-png", png, "--out", tmp_path / "again", *same)
    assert rc == 0 and "warning" not in stderr.lower(), stderr   # (stderr holds the batch bar)
    again = tmp_path / "again" / png.name
    np.testing.assert_array_equal(pixels(again), pixels(png))
    assert I.read_png_parameters(again) == I.read_png_parameters(png)
    rc, _, stderr = run_main(capsys, "a bird", "--from-png", png, "--seeds", "5", "--out", tmp_path / "other", *same)
    assert rc == 0, stderr
    params = I.parse_a1111_parameters(I.read_png_parameters(tmp_path / "other" / "00000-seed5-a-bird.png"))
    assert (params["prompt"], params["negative_prompt"], params["Seed"], params["CFG scale"]) == \
        ("a bird", "blurry, a cat", "5", "6")
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras" and params["Size"] == "32x32"


def test_from_png_reads_a1111_parameters_and_says_what_it_leaves_out(tmp_path):
    """An AUTOMATIC1111 image's parameters: its settings, its older "DPM++ 2M Karras" sampler name, the
    prompt without its LoRA tags; warnings name the LoRA, the other model and the fields sample.py has
    no setting for (not A1111's hashes and version); img2img's strength only with --init-image."""
    png = tmp_path / "a1111.png"
    I.save_png(np.zeros((8, 8, 3)), png, "masterpiece, a fox <lora:fluffy:0.7>\nNegative prompt: lowres\nSteps: 20, "
               "Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: "
               "v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, ENSD: 31337, TI hashes: \"EasyNegative: "
               "c74b4e810b03, bad-hands-5: aa7651be154c\", Version: v1.6.0")
    (tmp_path / "EasyNegative.safetensors").write_bytes(b"")   # (its contents are read with the model)
    req, args = sample.parse_request(["--from-png", str(png), "--embedding",
                                      str(tmp_path / "EasyNegative.safetensors")])
    assert (req.prompts, req.negative_prompt, req.steps, req.scheduler, req.scheduler_options) == \
        (["masterpiece, a fox"], "lowres", 20, "dpmpp_2m", {"use_karras_sigmas": True})
    assert (req.guidance_scale, req.seeds, req.width, req.height, req.clip_skip) == (7.0, [1234], 512, 768, 2)
    assert req.init_image is None and req.strength is None
    assert args.png_notes == [
        "--from-png: the image was made with the LoRA fluffy at 0.7: to use it, pass --lora FILE:0.7 (its file) "
        "or --lora-dir DIR (its folder)",
        "--from-png: the image was made with the textual inversion embedding bad-hands-5: to use it, pass "
        "--embedding FILE (its file) or --embedding-dir DIR (its folder)",
        "--from-png: the image was made with the model v1-5-pruned-emaonly, this run uses stable-diffusion-v1-5 "
        "(--model)",
        "--from-png: the image was made from a picture (img2img, Denoising strength 0.5): to make it again, pass "
        "--init-image PICTURE; this run makes one from noise",
        "--from-png: settings sample.py has no flag for are left out: ENSD: 31337"]
    Image.new("RGB", (16, 16)).save(tmp_path / "start.png")
    req, _ = sample.parse_request(["--from-png", str(png), "--init-image", str(tmp_path / "start.png"),
                                   "--steps", "30", "--scheduler", "euler"])
    assert (req.strength, req.steps, req.scheduler, req.scheduler_options) == \
        (0.5, 30, "euler", {"use_karras_sigmas": True})
    assert (req.width, req.height) == (512, 768)   # the image's Size, not the init image's
    (tmp_path / "strong.yaml").write_text("strength: 0.3\n")
    start = ["--from-png", str(png), "--init-image", str(tmp_path / "start.png"),
             "--config", str(tmp_path / "strong.yaml")]
    assert sample.parse_request(start)[0].strength == 0.5   # over the preset's
    assert sample.parse_request(start + ["--strength", "0.7"])[0].strength == 0.7   # under the flag


def test_from_png_reads_the_exif_user_comment_of_a1111_jpeg_and_webp_images(tmp_path):
    """AUTOMATIC1111 keeps a JPEG's, WebP's or AVIF's settings in the EXIF UserComment (EXIF 2.3: an 8-byte
    character code, then the text; A1111 writes "UNICODE\\0" and UTF-16 big-endian, through piexif): --from-png
    reads them as a PNG's parameters chunk, in either UTF-16 byte order and in the ASCII code (UTF-8 bytes)."""
    text = ("a café, (fox:1.2)\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Version: v1.10.1")
    for name, comment in (("be.jpg", b"UNICODE\0" + text.encode("utf-16-be")),
                          ("le.webp", b"UNICODE\0" + text.encode("utf-16-le")),
                          ("ascii.jpg", b"ASCII\0\0\0" + text.encode("utf-8"))):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = comment   # (the Exif IFD's UserComment)
        Image.new("RGB", (8, 8)).save(tmp_path / name, exif=exif)
        assert I.read_parameters(tmp_path / name) == text, name
        req, args = sample.parse_request(["--from-png", str(tmp_path / name)])
        assert (req.prompts, req.negative_prompt, req.steps, req.scheduler, req.scheduler_options) == \
            (["a café, (fox:1.2)"], "lowres", 20, "dpmpp_2m", {"use_karras_sigmas": True}), name
        assert (req.seeds, req.width, req.height, req.prompt_weighting) == ([1234], 512, 768, True), name
    png = tmp_path / "a.png"
    I.save_png(np.zeros((8, 8, 3)), png, text)
    assert I.read_parameters(png) == I.read_png_parameters(png) == text


def test_from_png_reads_a1111_automatic_schedule_as_the_samplers_default(tmp_path):
    """A1111 1.9+ writes a Schedule type always; its "Automatic" is the sampler's default schedule, which
    for DPM++ 2M is Karras there (sd_samplers_kdiffusion: 'DPM++ 2M' ... {'scheduler': 'karras'}); for Euler
    and LMS it is their plain one, "Uniform" for every sampler. Without the field (A1111 before 1.9) DPM++ 2M is
    plain; sample.py writes its plain DPM++ 2M as "Uniform", so that A1111 1.9+ reads it as plain too."""
    def scheduler_options(sampler, schedule=""):
        png = tmp_path / "a.png"
        I.save_png(np.zeros((8, 8, 3)), png, f"a fox\nSteps: 20, Sampler: {sampler}{schedule}, CFG scale: 7, "
                   "Seed: 1, Size: 64x64, Version: v1.10.1")
        req, _ = sample.parse_request(["--from-png", str(png)])
        return req.scheduler, req.scheduler_options
    assert scheduler_options("DPM++ 2M", ", Schedule type: Automatic") == ("dpmpp_2m", {"use_karras_sigmas": True})
    assert scheduler_options("DPM++ 2M", ", Schedule type: Karras") == ("dpmpp_2m", {"use_karras_sigmas": True})
    assert scheduler_options("DPM++ 2M") == ("dpmpp_2m", {})
    assert scheduler_options("Euler", ", Schedule type: Automatic") == ("euler", {})
    assert scheduler_options("LMS", ", Schedule type: Automatic") == ("lms", {})
    assert scheduler_options("Euler a", ", Schedule type: Automatic") == ("euler_a", {})
    assert scheduler_options("DPM++ 2M", ", Schedule type: Uniform") == ("dpmpp_2m", {})
    assert scheduler_options("Euler", ", Schedule type: Uniform") == ("euler", {})
    # DPM++ 2M SDE: Exponential by default in A1111 1.9+ (its 'scheduler': 'exponential'); before, the schedule
    # and the Heun variant were part of the sampler's name
    exponential = {"use_exponential_sigmas": True}
    assert scheduler_options("DPM++ 2M SDE", ", Schedule type: Automatic") == ("dpmpp_2m_sde", exponential)
    assert scheduler_options("DPM++ 2M SDE", ", Schedule type: Karras") == ("dpmpp_2m_sde", {"use_karras_sigmas": True})
    assert scheduler_options("DPM++ 2M SDE Karras") == ("dpmpp_2m_sde", {"use_karras_sigmas": True})
    assert scheduler_options("DPM++ 2M SDE Exponential") == ("dpmpp_2m_sde", exponential)
    assert scheduler_options("DPM++ 2M SDE") == ("dpmpp_2m_sde", {})
    assert scheduler_options("DPM++ 2M SDE Heun", ", Schedule type: Automatic") == (
        "dpmpp_2m_sde", {"solver_type": "heun", **exponential})
    assert scheduler_options("DPM++ 2M", ", Schedule type: Exponential") == ("dpmpp_2m", exponential)
    # a schedule in the sampler's name wins over the field (A1111's get_sampler_and_scheduler), not both
    assert scheduler_options("DPM++ 2M SDE Karras", ", Schedule type: Automatic") == (
        "dpmpp_2m_sde", {"use_karras_sigmas": True})
    assert scheduler_options("DPM++ 2M Karras", ", Schedule type: Exponential") == (
        "dpmpp_2m", {"use_karras_sigmas": True})
    assert scheduler_options("DPM++ 2M SDE Heun Exponential", ", Schedule type: Karras") == (
        "dpmpp_2m_sde", {"solver_type": "heun", **exponential})
    # sample.py's own plain DPM++ 2M says so, which A1111 1.9+ would take for Karras without the field
    plain, karras = (I.a1111_parameters("a fox", steps=20, scheduler="dpmpp_2m", guidance_scale=7, seed=1, width=64,
                                        height=64, scheduler_options=options)
                     for options in ({}, {"use_karras_sigmas": True}))
    assert "Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7" in plain
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7" in karras
    assert "Schedule type" not in I.a1111_parameters("a fox", steps=20, scheduler="euler", guidance_scale=7, seed=1,
                                                     width=64, height=64)
    for text, options in ((plain, {}), (karras, {"use_karras_sigmas": True})):
        I.save_png(np.zeros((8, 8, 3)), tmp_path / "own.png", text)
        assert sample.parse_request(["--from-png", str(tmp_path / "own.png")])[0].scheduler_options == options
    for options, written in (({}, "DPM++ 2M SDE, Schedule type: Uniform"),
                             (exponential, "DPM++ 2M SDE, Schedule type: Exponential"),
                             ({"solver_type": "heun"}, "DPM++ 2M SDE Heun, Schedule type: Uniform")):
        text = I.a1111_parameters("a fox", steps=20, scheduler="dpmpp_2m_sde", guidance_scale=7, seed=1, width=64,
                                  height=64, scheduler_options=options)
        assert f"Sampler: {written}, CFG scale: 7" in text
        I.save_png(np.zeros((8, 8, 3)), tmp_path / "own.png", text)
        assert sample.parse_request(["--from-png", str(tmp_path / "own.png")])[0].scheduler_options == options


def test_the_parameters_record_the_schedule_the_models_config_sets():
    """A model whose scheduler config sets Karras sigmas samples dpmpp_2m with them: its PNGs say so
    (they said Schedule type: Uniform, which A1111 reads as plain); an option given is recorded as given."""
    from sdjax.cli_utils import recorded_scheduler_options
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert recorded_scheduler_options("dpmpp_2m", karras, {}) == {"use_karras_sigmas": True}
    assert recorded_scheduler_options("dpmpp_2m", karras, {"use_karras_sigmas": False}) == {"use_karras_sigmas": False}
    assert recorded_scheduler_options("dpmpp_2m_sde", {}, {}) == {}
    assert recorded_scheduler_options("pndm", karras, {}) == {}   # (PNDM has no such setting)


def test_seed_resize_from_is_recorded_and_read_as_a1111s(tmp_path):
    """--seed-resize-from WxH: the pipeline's (height, width), recorded as A1111 writes it (Seed resize from:
    WxH) and read back by --from-png; A1111's -1x-1 (none) is no setting."""
    req, _ = sample.parse_request(["a", "--seed-resize-from", "512x768", "--width", "640"])
    assert req.seed_resize_from == "512x768" and req.seed_resize_hw == (768, 512)
    text = I.a1111_parameters("a", steps=20, scheduler="euler", guidance_scale=7, seed=1, width=640, height=512,
                              seed_resize_from=req.seed_resize_hw)
    assert text.endswith("Size: 640x512, Seed resize from: 512x768")
    I.save_png(np.zeros((8, 8, 3)), tmp_path / "a.png", text)
    req, args = sample.parse_request(["--from-png", str(tmp_path / "a.png")])
    assert req.seed_resize_hw == (768, 512) and args.png_notes == []
    I.save_png(np.zeros((8, 8, 3)), tmp_path / "b.png", "a\nSteps: 20, Sampler: Euler, Seed: 1, Seed resize from: "
               "-1x-1")
    req, args = sample.parse_request(["--from-png", str(tmp_path / "b.png")])
    assert req.seed_resize_from is None and args.png_notes == []
    assert sample.parse_request(["a"])[0].seed_resize_hw is None


def test_variation_seeds_make_a_job_each_and_are_recorded_as_a1111s(tmp_path):
    """--seeds 7 --variation-seeds 1-3 --variation-strength 0.25: three jobs of seed 7, one per variation
    seed (for each prompt and seed, as the jobs are ordered); the PNG parameters say Variation seed and
    Variation seed strength as A1111 writes them, and --from-png reads them back. Either without the other
    exits 2 (A1111's strength 0 is no variation)."""
    req, _ = sample.parse_request(["a", "b", "--seeds", "7", "--variation-seeds", "1-3",
                                   "--variation-strength", "0.25"])
    assert req.jobs == [("a", 7)] * 3 + [("b", 7)] * 3 and req.variations == [1, 2, 3] * 2
    text = I.a1111_parameters("a", steps=20, scheduler="euler", guidance_scale=7, seed=7, width=64, height=64,
                              model="m", variation_seed=2, variation_strength=0.25)
    assert text.endswith("Seed: 7, Size: 64x64, Model: m, Variation seed: 2, Variation seed strength: 0.25"), text
    assert "Variation" not in I.a1111_parameters("a", steps=20, scheduler="euler", guidance_scale=7, seed=7,
                                                 width=64, height=64, variation_seed=2, variation_strength=0.0)
    I.save_png(np.zeros((8, 8, 3)), tmp_path / "v.png", text + ", Version: v1.10.1")
    req, args = sample.parse_request(["--from-png", str(tmp_path / "v.png"), "--model", "m"])
    assert (req.seeds, req.variation_seeds, req.variation_strength, args.png_notes) == ([7], [2], 0.25, [])
    req, _ = sample.parse_request(["a"])
    assert req.jobs == [("a", 0)] and req.variations == [None]


def test_from_png_reads_eta_ddim_as_a_number(tmp_path):
    """``Eta DDIM: 0.5`` (as sample.py's --scheduler-option eta=0.5 and A1111 write it) is the number 0.5,
    which the DDIM scheduler takes (its text '0.5' was refused: 'expected a number')."""
    png = tmp_path / "ddim.png"
    I.save_png(np.zeros((8, 8, 3)), png, "a fox\nSteps: 20, Sampler: DDIM, timestep_spacing: trailing, Eta DDIM: 0.5, "
               "CFG scale: 7, Seed: 1, Size: 64x64")
    req, _ = sample.parse_request(["--from-png", str(png)])
    assert req.scheduler == "ddim" and req.scheduler_options == {"timestep_spacing": "trailing", "eta": 0.5}
    assert list(req.scheduler_options) == ["timestep_spacing", "eta"]   # in the image's order: the same text again


def test_from_png_names_what_a1111_images_hold_that_it_leaves_out(tmp_path):
    """A1111's extra-network tags in every form (<lora:NAME>, <lora:NAME:TE:UNET>, <lyco:...>,
    <hypernet:...>) are taken out of the prompt and named; an img2img image without --init-image is
    said to be made from noise; Hires fix's Denoising strength is no img2img strength; a VAE named by
    its file is this run's --vae; Euler a with Karras, a JPEG without EXIF and a text without settings exit 2."""
    def png(text, name="a.png"):
        I.save_png(np.zeros((8, 8, 3)), tmp_path / name, text)
        return str(tmp_path / name)
    settings = "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    req, args = sample.parse_request(["--from-png", png(f"a <lora:x> fox <lora:y:0.8:0.5> <lyco:z:0.6> "
                                                          f"<hypernet:h:0.5>\n{settings}, VAE: v.safetensors"),
                                      "--vae", "v.safetensors"])
    assert req.prompts == ["a fox"]
    assert [note.split(": to use")[0].split("with ")[1] for note in args.png_notes[:3]] == \
        ["the LoRA x at 1", "the LoRA y at 0.8", "the LoRA z at 0.6"]
    assert args.png_notes[3:] == ["--from-png: settings sample.py has no flag for are left out: "
                                  "<hypernet:h:0.5> (no sdjax equivalent)"]
    req, args = sample.parse_request(["--from-png", png(f"  a fox\n{settings}, Denoising strength: 0.4")])
    assert req.prompts == ["  a fox"] and req.strength is None   # (sample.py writes the prompt as given)
    assert args.png_notes == ["--from-png: the image was made from a picture (img2img, Denoising strength 0.4): "
                              "to make it again, pass --init-image PICTURE; this run makes one from noise"]
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Denoising strength: 0.75, Mask blur: 4, "
                                                          "Inpaint area: Only masked")])
    assert args.png_notes == [
        "--from-png: the image was made by inpainting a picture (a mask, Only masked, Denoising strength 0.75): to "
        "make it again, pass --init-image PICTURE --mask MASK; this run makes one from noise"]
    assert req.mask_padding is None and req.mask_blur == 0   # (the box around a mask and its blur, without one: none)
    Image.new("RGB", (16, 16)).save(tmp_path / "start.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "white.png")
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Mask blur: 0, Inpaint area: Only masked"),
                                      "--init-image", str(tmp_path / "start.png"), "--mask",
                                      str(tmp_path / "white.png")])
    assert req.mask_padding == 32 and args.png_notes == []   # (A1111's default padding, when none is written)
    unit = ('ControlNet 0: "Module: depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], Weight: 0.6, Resize '
            'Mode: Crop and Resize, Guidance Start: 0, Guidance End: 0.8"')
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, {unit}")])
    assert req.controlnet == [] and args.png_notes == [
        "--from-png: the image was made with the ControlNet control_v11f1p_sd15_depth [cfd03158] (preprocessor "
        "depth_midas): to make it again, pass --controlnet PATH --control-image FILE (the picture its Module read; "
        "Module none: the control image); this run makes it without"]
    given = ["--controlnet", str(tmp_path), "--control-image", str(tmp_path / "start.png")]
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, {unit}"), *given])
    assert (req.controlnet_module, req.controlnet_resize) == (["none"], ["crop"])   # (its map, said so)
    module = ("--from-png: the image's ControlNet 0 preprocessed its control image with depth_midas, which sdjax "
              "lacks: this run takes --control-image as the ControlNet reads it (give its processed map)")
    assert args.png_notes == [module]
    # A1111 writes every field of a unit: canny's resolution and thresholds read, the other modules' not
    canny = ('ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Resize '
             'and Fill, Processor Res: 768, Threshold A: 50, Threshold B: 180, Guidance Start: 0, Guidance End: 1, '
             'Pixel Perfect: True, Control Mode: Balanced", ControlNet 1: "Module: invert, Model: lineart, Weight: 1, '
             'Resize Mode: Just Resize, Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0, '
             'Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced"').replace(
                 "invert", "invert (from white bg & black line)")   # (the name its menu gives it)
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, {canny}"), *given, *given])
    assert [(u.module, u.resize, u.processor_res, u.low_threshold, u.high_threshold, u.pixel_perfect)
            for u in req.control_units] == [("canny", "fill", 768, 50, 180, True), ("invert", "just", 512, 100, 200,
                                                                                      False)]
    # an A1111 unit without a Resize Mode is its default, Crop and Resize; sample.py's (before it wrote one) Just
    # Resize; the extension's old names; canny's -1 (out of range) its default; a mode sdjax lacks is named
    bare = 'ControlNet 0: "Module: canny, Model: c, Weight: 1, Threshold A: -1"'
    for extra, resize in (("Version: v1.10.1, ", "crop"), ("", "just")):
        req, _ = sample.parse_request(["--from-png", png(f"a fox\n{settings}, {extra}{bare}"), *given])
        assert (req.controlnet_resize, req.controlnet_canny_low, req.controlnet_processor_res) == ([resize], [100],
                                                                                                   [512])
    for name, resize in (("Envelope (Outer Fit)", "fill"), ("Inner Fit (Scale to Fit)", "crop")):
        req, args = sample.parse_request(["--from-png", png(f'a fox\n{settings}, {bare[:-1]}, Resize Mode: {name}"'),
                                          *given])
        assert req.controlnet_resize == [resize] and args.png_notes == []
    req, args = sample.parse_request(["--from-png", png(f'a fox\n{settings}, {bare[:-1]}, Resize Mode: Stretch"'),
                                      *given])
    assert req.controlnet_resize == ["just"] and args.png_notes == [
        "--from-png: settings sample.py has no flag for are left out: ControlNet 0: Resize Mode Stretch (sdjax: Just "
        "Resize)"]
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, {unit[:-1]}, Control Mode: My prompt is "
                                                           'more important, Hr Option: Low res only"'), "--controlnet",
                                      str(tmp_path),
                                      "--control-image", str(tmp_path / "start.png")])
    assert (req.controlnet, req.controlnet_scale, req.controlnet_start, req.controlnet_end, req.controlnet_mode) == (
        [str(tmp_path)], [0.6], [0], [0.8], ["prompt"])   # (A1111's Control Mode: sdjax's "prompt")
    assert args.png_notes == [module, "--from-png: settings sample.py has no flag for are left out: ControlNet 0: "
                              "Hr Option Low res only (sdjax: Both)"]
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, {unit[:-1]}, Control Mode: Another"
                                                           '"'), "--controlnet", str(tmp_path), "--control-image",
                                      str(tmp_path / "start.png")])   # (another UI's mode: named, balanced instead)
    assert req.controlnet_mode == ["balanced"] and args.png_notes == [
        module, "--from-png: settings sample.py has no flag for are left out: ControlNet 0: Control Mode Another "
        "(sdjax: balanced)"]
    req, _ = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Mask blur: 4"), "--init-image",
                                   str(tmp_path / "start.png"), "--mask", str(tmp_path / "white.png")])
    assert (req.mask_blur, req.mask_padding) == (4, None)
    req, _ = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Mask blur: 4"), "--init-image",
                                   str(tmp_path / "start.png"), "--mask", str(tmp_path / "white.png"),
                                   "--mask-blur", "0"])
    assert req.mask_blur == 0
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Denoising strength: 0.4, Hires "
                                                          "upscale: 2"), "--init-image", str(tmp_path / "start.png")])
    assert req.strength is None and req.hires is None and args.png_notes == [
        "--from-png: the image's Hires fix (Hires upscale 2) is left out: --init-image makes img2img of that "
        "picture instead"]
    req, args = sample.parse_request(["--from-png", png(f'a fox\n{settings}, Template: "C:\\x, y"')])   # (no JSON)
    assert args.png_notes == ["--from-png: settings sample.py has no flag for are left out: Template: C:\\x, y"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    for path, error in ((png("a fox\nSteps: 20, Sampler: Euler a, Schedule type: Karras, Seed: 1"),
                         "its sampler 'Euler a' with schedule type 'Karras' has no sdjax equivalent"),
                        (str(tmp_path / "a.jpg"), "holds no generation settings (a JPEG image without an EXIF "
                                                  "UserComment, where AUTOMATIC1111 writes them)"),
                        (png("just a caption", "b.png"), "holds no generation settings"),
                        (png(f"a fox\n{settings.replace('64x64', '64x60')}", "c.png"),   # (not --height 60)
                         f"--from-png {tmp_path / 'c.png'}: its height 60: must be a positive multiple of 8")):
        with pytest.raises(UsageError, match=re.escape(error)):
            sample.parse_request(["--from-png", path])


def test_negative_prompt_without_guidance_is_ignored_with_a_warning(pipe_dir, pipe, tmp_path, capsys):
    """At --guidance-scale <= 1 there is no unconditional pass, so a negative prompt changes nothing:
    the user is told, and the PNG's parameters leave it out (A1111 would use it to remake the image)."""
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--negative-prompt", "blurry", "--guidance-scale", "1",
                             "--model", pipe_dir, "--out", out, *SMALL)
    assert rc == 0
    assert "sample.py: warning: the negative prompt 'blurry' (--negative-prompt / negative_prompt) is ignored at " \
           "guidance scale 1" in stderr, stderr
    params = I.parse_a1111_parameters(I.read_png_parameters(out / "00000-seed4-a-dog.png"))
    assert params["negative_prompt"] == "" and params["CFG scale"] == "1"
    ref = pipe("a dog", seeds=4, guidance_scale=1.0, num_inference_steps=3, height=32, width=32).to_pil()
    np.testing.assert_array_equal(pixels(out / "00000-seed4-a-dog.png"), ref[0])


def test_prompt_weighting_makes_the_pipelines_weighted_image_and_from_png_makes_it_again(pipe_dir, pipe, tmp_path,
                                                                                          capsys):
    """--prompt-weighting: the image is the pipeline's with prompt_weighting=True (the prompt and the negative
    prompt weighted), which differs from the unweighted one; the PNG parameters say ``Prompt weighting:
    A1111``, and --from-png of it weights again: the same image and parameters, nothing to warn about.
    A prompt without the syntax gives the unweighted image (all weights 1)."""
    out = tmp_path / "out"
    prompt, negative = "a (dog:1.4) in [blue]", "((red))"
    rc, _, stderr = run_main(capsys, prompt, "--negative-prompt", negative, "--seeds", "4", "--prompt-weighting",
                             "--model", pipe_dir, "--out", out, *SMALL)
    assert rc == 0, stderr
    png = out / "00000-seed4-a-dog-1-4-in-blue.png"
    params = I.parse_a1111_parameters(I.read_png_parameters(png))
    assert params["Prompt weighting"] == "A1111" and params["prompt"] == prompt
    kw = dict(negative_prompts=negative, seeds=4, num_inference_steps=3, height=32, width=32)
    weighted = pipe(prompt, prompt_weighting=True, **kw).to_pil()[0]
    np.testing.assert_array_equal(pixels(png), weighted)
    assert np.abs(pixels(png).astype(int) - np.asarray(pipe(prompt, **kw).to_pil()[0], int)).max() > 2
    rc, _, stderr = run_main(capsys, "--from-png", png, "--out", tmp_path / "again", "--model", pipe_dir,
                             "--dtype", "float32", "--compilation-cache", "none", "--progress", "batches")
    assert rc == 0 and "warning" not in stderr.lower(), stderr
    np.testing.assert_array_equal(pixels(tmp_path / "again" / png.name), pixels(png))
    assert I.read_png_parameters(tmp_path / "again" / png.name) == I.read_png_parameters(png)
    plain = dict(kw, negative_prompts="red")
    np.testing.assert_allclose(pipe("a dog", prompt_weighting=True, **plain).images, pipe("a dog", **plain).images,
                               rtol=0, atol=1e-5)


def test_from_png_weights_a1111_images_and_sdjax_images_that_record_it(tmp_path):
    """An AUTOMATIC1111 image (its Version or Model hash says so) is weighted, as A1111 weights every prompt,
    with its Emphasis setting (None: the brackets are text, its windows, editing and AND still read, as A1111
    reads them); an Emphasis sdjax does not have is named; a sample.py image is weighted only when its
    parameters record it; --no-prompt-weighting and a preset's key work as for other settings."""
    def png(fields, name="a.png"):
        I.save_png(np.zeros((8, 8, 3)), tmp_path / name, f"a (fox:1.2)\nSteps: 20, Sampler: Euler, CFG scale: 7, "
                   f"Seed: 1, Size: 64x64{fields}")
        return str(tmp_path / name)
    for fields, weighted, emphasis, notes in (
            ("", False, "original", []),                                  # sample.py's, without weighting
            (", Prompt weighting: A1111", True, "original", []),          # sample.py's, with
            (", Prompt weighting: A1111, Emphasis: Ignore", True, "ignore", []),
            (", Version: v1.10.1", True, "original", []),
            (", Model hash: 6ce0161689", True, "original", []),
            (", Emphasis: None, Version: v1.10.1", True, "none", []),     # A1111 read the brackets as text
            (", Emphasis: No norm, Version: v1.10.1", True, "no_norm", []),
            (", Emphasis: MeanNorm, Version: f2.0.1", True, "original",   # (Forge's)
             ["--from-png: settings sample.py has no flag for are left out: Emphasis: MeanNorm (sdjax weights as "
              "A1111's Original does)"])):
        req, args = sample.parse_request(["--from-png", png(fields)])
        assert (req.prompts, req.prompt_weighting, req.emphasis, args.png_notes) == (
            ["a (fox:1.2)"], weighted, emphasis, notes), fields
    for flags, emphasis in ((["--no-prompt-weighting"], "original"), (["--emphasis", "ignore"], "ignore")):
        req, _ = sample.parse_request(["--from-png", png(", Emphasis: No norm, Version: v1.10.1"), *flags])
        assert (req.prompt_weighting, req.emphasis) == (flags[0] != "--no-prompt-weighting", emphasis)
    (tmp_path / "weighted.yaml").write_text("prompt_weighting: true\n")
    assert sample.parse_request(["a cat", "--config", str(tmp_path / "weighted.yaml")])[0].prompt_weighting
    assert not sample.parse_request(["--from-png", png(""), "--config", str(tmp_path / "weighted.yaml")])[0] \
        .prompt_weighting   # (the image's setting over the preset's, as every --from-png setting)
    # a preset's emphasis: with its prompt_weighting, used (--no-prompt-weighting drops it); without, an
    # error that names the preset's key (as --emphasis without --prompt-weighting is), not dropped unsaid
    (tmp_path / "no_norm.yaml").write_text("prompt_weighting: true\nemphasis: No norm\n")
    for flags, want in (([], (True, "no_norm")), (["--no-prompt-weighting"], (False, "original"))):
        req, _ = sample.parse_request(["a cat", "--config", str(tmp_path / "no_norm.yaml"), *flags])
        assert (req.prompt_weighting, req.emphasis) == want, flags
    (tmp_path / "no_norm_only.yaml").write_text("emphasis: no_norm\n")
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'no_norm_only.yaml'}: key 'emphasis' has value "
                                                   "'no_norm': is a setting of AUTOMATIC1111's prompt syntax")):
        sample.parse_request(["a cat", "--config", str(tmp_path / "no_norm_only.yaml")])
    with pytest.raises(UsageError, match="its Prompt weighting 'compel' is not one sdjax has"):
        sample.parse_request(["--from-png", png(", Prompt weighting: compel")])
    text = I.a1111_parameters("p", steps=3, scheduler="ddim", guidance_scale=7, seed=0, width=8, height=8,
                              clip_skip=2, prompt_weighting=True)
    assert text.endswith("Size: 8x8, Clip skip: 2, Prompt weighting: A1111")
    for emphasis, name in (("no_norm", "No norm"), ("ignore", "Ignore"), ("none", "None")):   # (A1111's names)
        text = I.a1111_parameters("a (fox:1.2)", steps=3, scheduler="ddim", guidance_scale=7, seed=0, width=8,
                                  height=8, prompt_weighting=True, emphasis=emphasis)
        assert text.endswith(f"Size: 8x8, Prompt weighting: A1111, Emphasis: {name}"), text
        I.save_png(np.zeros((8, 8, 3)), tmp_path / "own.png", text)
        req, _ = sample.parse_request(["--from-png", str(tmp_path / "own.png")])
        assert (req.prompt_weighting, req.emphasis) == (True, emphasis)
    assert sample.parse_request(["a fox", "--prompt-weighting", "--emphasis", "No norm"])[0].emphasis == "no_norm"
    # without weighting, brackets and BREAK are text: "Emphasis: None", as A1111 writes its own such images
    # (which it reads back unweighted; without the field it would weight them)
    def unweighted(prompt, negative=""):
        return I.a1111_parameters(prompt, negative, steps=3, scheduler="ddim", guidance_scale=7, seed=0, width=8,
                                  height=8)
    for prompt, negative in (("a (fox:1.2)", ""), ("a fox", "[blurry]"), ("a fox BREAK a hat", "")):
        text = unweighted(prompt, negative)
        assert text.endswith("Size: 8x8, Emphasis: None"), text
        I.save_png(np.zeros((8, 8, 3)), tmp_path / "own.png", text)
        req, args = sample.parse_request(["--from-png", str(tmp_path / "own.png")])
        assert (req.prompts, req.prompt_weighting, args.png_notes) == ([prompt], False, [])
    assert unweighted("a fox: BREAKFAST").endswith("Size: 8x8")   # nothing A1111 reads otherwise


def test_vae_and_clip_skip_flags_make_the_pipelines_image_and_are_recorded(pipe_dir, pipe, tmp_path, capsys):
    """--vae FOLDER --clip-skip 2: the images are the pipeline's with that VAE (another one's weights
    here) and clip_skip=2, and the PNG parameters say so as A1111 does (``VAE: name``, ``Clip skip: 2``)."""
    import reference as R
    from sdjax.pipeline import StableDiffusion
    vae_dir = R.save_torch_layout(R.torch_vae(seed=5), tmp_path / "sd-vae-other").parent
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--vae", vae_dir, "--clip-skip", "2", "--model",
                             pipe_dir, "--out", out, *SMALL)
    assert rc == 0, stderr
    text = I.read_png_parameters(out / "00000-seed4-a-dog.png")
    assert text.endswith(f"Model: {pipe_dir.name}, VAE: sd-vae-other, Clip skip: 2"), text   # A1111's order
    params = I.parse_a1111_parameters(text)
    assert params["VAE"] == "sd-vae-other" and params["Model"] == pipe_dir.name and params["Clip skip"] == "2"
    kw = dict(seeds=4, num_inference_steps=3, height=32, width=32)
    other_vae = StableDiffusion.from_pretrained(str(pipe_dir), dtype="float32", vae=str(vae_dir))
    np.testing.assert_array_equal(pixels(out / "00000-seed4-a-dog.png"),
                                  other_vae("a dog", clip_skip=2, **kw).to_pil()[0])
    # (that clip_skip=2 changes the images: test_sampling.py's test_clip_skip_two_matches_diffusers_clip_skip_one)
    assert not np.array_equal(pixels(out / "00000-seed4-a-dog.png"), pipe("a dog", **kw).to_pil()[0])


def test_hires_flags_make_the_pipelines_hires_images_recorded_as_a1111_and_from_png_makes_them_again(
        pipe_dir, pipe, tmp_path, capsys):
    """--hires-scale S (--hires-steps, --hires-strength, --hires-upscaler): the images are the pipeline's
    with that HiresFix, at the larger size; the PNG parameters are A1111's (Size the first pass's, then
    Denoising strength, Hires upscale, Hires steps when given, Hires upscaler), and --from-png makes the
    same image again, bit for bit, with the same parameters."""
    from sdjax import HiresFix
    same = ["--model", pipe_dir, "--dtype", "float32", "--compilation-cache", "none", "--progress", "batches"]
    kw = dict(seeds=4, num_inference_steps=3, height=32, width=32)
    for flags, hires, fields in [
            (["--hires-scale", "1.5", "--hires-steps", "2"], HiresFix(1.5, 2, 0.7),
             "Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent"),
            (["--hires-scale", "1.5", "--hires-strength", "0.5", "--hires-upscaler", "lanczos"],
             HiresFix(1.5, None, 0.5, "lanczos"),
             "Denoising strength: 0.5, Hires upscale: 1.5, Hires upscaler: Lanczos")]:
        out = tmp_path / hires.upscaler
        rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", *flags, "--out", out, *SMALL[:-4], *same)
        assert rc == 0, stderr
        png = out / "00000-seed4-a-dog.png"
        text = I.read_png_parameters(png)
        assert text.endswith(f"Size: 32x32, Model: {pipe_dir.name}, {fields}"), text
        assert Image.open(png).size == (48, 48)
        np.testing.assert_array_equal(pixels(png), pipe("a dog", hires=hires, **kw).to_pil()[0])
        rc, _, stderr = run_main(capsys, "--from-png", png, "--out", tmp_path / "again", *same)
        assert rc == 0 and "warning" not in stderr.lower(), stderr
        again = sorted((tmp_path / "again").glob("*-seed4-a-dog.png"))[-1]
        np.testing.assert_array_equal(pixels(again), pixels(png))
        assert I.read_png_parameters(again) == text
    # (the hires fix changes the image: not the first pass's enlarged)
    assert not np.array_equal(pixels(png), np.asarray(pipe("a dog", **kw).to_pil()[0].resize((48, 48))))


def test_hires_second_pass_flags_make_the_pipelines_images_recorded_as_a1111_and_from_png_makes_them_again(
        pipe_dir, pipe, tmp_path, capsys):
    """--hires-scheduler, --hires-scheduler-option, --hires-guidance-scale, --hires-prompt and
    --hires-negative-prompt: the images are the pipeline's with that HiresFix; the PNG parameters say them as
    A1111 1.6+ and Forge write them (Hires sampler, Hires schedule type, Hires CFG Scale, Hires prompt, Hires
    negative prompt; the prompt's LoRA tags after the Hires prompt too), and --from-png makes the image again,
    bit for bit, with the same parameters."""
    from sdjax import HiresFix
    same = ["--model", pipe_dir, "--dtype", "float32", "--compilation-cache", "none", "--progress", "none"]
    flags = ["--scheduler", "dpmpp_2m", "--hires-scale", "1.5", "--hires-scheduler", "euler",
             "--hires-scheduler-option", "use_karras_sigmas=true", "--hires-guidance-scale", "4", "--hires-prompt",
             "a cat, sitting", "--hires-negative-prompt", "blurry"]
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", *flags, "--out", tmp_path / "first", *SMALL[:-4], *same)
    assert rc == 0, stderr
    png = tmp_path / "first" / "00000-seed4-a-dog.png"
    text = I.read_png_parameters(png)
    assert text.endswith("Hires upscale: 1.5, Hires upscaler: Latent, Hires sampler: Euler, Hires schedule type: "
                         "Karras, Hires CFG Scale: 4, Hires prompt: \"a cat, sitting\", Hires negative prompt: "
                         "blurry"), text
    hires = HiresFix(1.5, scheduler="euler", scheduler_options={"use_karras_sigmas": True}, guidance_scale=4.0,
                     prompts="a cat, sitting", negative_prompts="blurry")
    kw = dict(seeds=4, num_inference_steps=3, height=32, width=32, scheduler="dpmpp_2m")
    np.testing.assert_array_equal(pixels(png), pipe("a dog", hires=hires, **kw).to_pil()[0])
    rc, _, stderr = run_main(capsys, "--from-png", png, "--out", tmp_path / "again", *same)
    assert rc == 0 and "warning" not in stderr.lower(), stderr
    again = tmp_path / "again" / "00000-seed4-a-dog.png"
    np.testing.assert_array_equal(pixels(again), pixels(png))
    assert I.read_png_parameters(again) == text
    # (the second pass's own settings change the image)
    assert not np.array_equal(pixels(png), pipe("a dog", hires=HiresFix(1.5), **kw).to_pil()[0])


def test_a1111_parameters_write_the_second_pass_where_it_differs():
    """The Hires fix's own settings are written where they are not the first pass's, its schedule type
    with any Hires sampler (else A1111 reads its Automatic: Karras for DPM++ 2M), and settings_from_png
    reads back what was written (Uniform: the schedules the sampler has turned off)."""
    base = dict(steps=20, guidance_scale=7, seed=1, width=64, height=64, hires_scale=2)
    plain = {"use_karras_sigmas": False, "use_exponential_sigmas": False}
    for first, hires, fields, read in [
            (dict(scheduler="euler"), dict(hires_scheduler="euler"), "", {}),
            (dict(scheduler="euler"), dict(hires_scheduler="dpmpp_2m"),
             "Hires sampler: DPM++ 2M, Hires schedule type: Uniform",
             dict(hires_scheduler="dpmpp_2m", hires_scheduler_options=plain)),
            (dict(scheduler="euler", scheduler_options={"use_karras_sigmas": True}), dict(hires_scheduler="lms"),
             "Hires sampler: LMS, Hires schedule type: Karras",
             dict(hires_scheduler="lms", hires_scheduler_options={"use_karras_sigmas": True})),
            (dict(scheduler="euler", scheduler_options={"use_karras_sigmas": True}),
             dict(hires_scheduler_options={"use_karras_sigmas": False}), "Hires schedule type: Uniform",
             dict(hires_scheduler_options=plain)),
            (dict(scheduler="ddim"), dict(hires_scheduler_options={"eta": 0.5}), "Hires eta: 0.5",
             dict(hires_scheduler_options={"eta": 0.5})),
            (dict(scheduler="euler"), dict(hires_scheduler="dpmpp_2m_sde", hires_scheduler_options={
                "solver_type": "heun"}), "Hires sampler: DPM++ 2M SDE Heun, Hires schedule type: Uniform",
             dict(hires_scheduler="dpmpp_2m_sde", hires_scheduler_options={"solver_type": "heun", **plain})),
            (dict(scheduler="euler"), dict(hires_guidance_scale=7.0, hires_prompt="a fox", hires_negative_prompt=""),
             "", {}),
            (dict(scheduler="euler", loras=[("style", 0.5)]), dict(hires_prompt="a dog", hires_guidance_scale=5),
             "Hires CFG Scale: 5, Hires prompt: \"a dog <lora:style:0.5>\"",
             dict(hires_guidance_scale=5.0, hires_prompt="a dog <lora:style:0.5>"))]:
        text = I.a1111_parameters("a fox", **base, **first, **hires)
        assert text.split("Hires upscaler: Latent")[1] == (fields and ", " + fields), (first, hires, text)
        flags = settings_from_png_text(text).flags
        assert {k: v for k, v in flags.items() if k.startswith("hires_") and k not in (
            "hires_scale", "hires_strength", "hires_upscaler")} == read, (first, hires, text)


def settings_from_png_text(text: str):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        I.save_png(np.zeros((8, 8, 3)), Path(d) / "a.png", text)
        return settings_from_png(Path(d) / "a.png")


def test_from_png_reads_the_a1111_and_forge_second_pass_settings(tmp_path):
    """An A1111 1.6+ / Forge Hires fix image's second-pass fields: Hires sampler (with its Hires schedule
    type, Automatic as A1111 resolves it; without one the first pass's schedule where the sampler has it),
    Hires CFG Scale (Forge writes it always: the call's where equal), Hires prompt (its LoRA tags out; tags
    other than the prompt's said in a note) and Hires negative prompt; a prompt given leaves the image's Hires
    prompt out, said in a note; a Hires sampler sdjax lacks is an error naming it."""
    def png(fields, prompt="a fox"):
        I.save_png(np.zeros((8, 8, 3)), tmp_path / "a.png", f"{prompt}\nSteps: 20, Sampler: {fields}, CFG scale: 7, "
                   "Seed: 1, Size: 64x64, Model hash: abc, Denoising strength: 0.7, Hires upscale: 2")
        return str(tmp_path / "a.png")
    second = lambda req: req.hires.second_scheduler(req.scheduler, req.scheduler_options)  # noqa: E731
    for fields, want in [
            ("Euler, Hires sampler: DPM++ 2M, Hires schedule type: Automatic",
             ("dpmpp_2m", {"use_karras_sigmas": True})),
            ("DPM++ 2M, Schedule type: Karras, Hires sampler: Euler a", ("euler_a", {})),
            ("DPM++ 2M, Schedule type: Karras, Hires sampler: Euler", ("euler", {"use_karras_sigmas": True})),
            ("DPM++ 2M Karras, Hires schedule type: Uniform",
             ("dpmpp_2m", {"use_karras_sigmas": False, "use_exponential_sigmas": False})),
            ("Euler, Hires sampler: Use same sampler, Hires schedule type: Use same scheduler", ("euler", {}))]:
        req, args = sample.parse_request(["--from-png", png(fields)])
        assert second(req) == want and args.png_notes == [], fields
    req, args = sample.parse_request(["--from-png", png("Euler, Hires sampler: DPM++ 2M, Hires schedule type: Uniform"),
                                      "--hires-scheduler", "euler_a"])   # (another second-pass scheduler given)
    assert second(req) == ("euler_a", {}) and args.png_notes == [
        "--from-png: the image's Hires scheduler options use_karras_sigmas=False, use_exponential_sigmas=False are "
        "left out: the euler_a scheduler has none such"]
    req, args = sample.parse_request(["--from-png", png("Euler, Hires CFG Scale: 7")])
    assert req.hires_guidance_scale is None and req.hires.guidance_scale is None and args.png_notes == []
    req, args = sample.parse_request(["--from-png", png('Euler, Hires CFG Scale: 5, Hires prompt: "a dog, '
                                                          '<lora:style:1>", Hires negative prompt: blurry')])
    assert (req.hires.guidance_scale, req.hires.prompts, req.hires.negative_prompts) == (5.0, ("a dog,",), ("blurry",))
    assert args.png_notes == ["the Hires prompt's LoRA tags (<lora:style:1>) are not the prompt's: sdjax makes both "
                              "passes with the prompt's LoRAs"]
    req, args = sample.parse_request(["--from-png", png('Euler, Hires prompt: "a dog <lora:style:1>"',
                                                        prompt="a fox <lora:style:1>")])
    assert req.hires.prompts == ("a dog",) and not any("Hires prompt" in note for note in args.png_notes)
    req, args = sample.parse_request(["a wolf", "--from-png", png("Euler, Hires prompt: a dog")])
    assert req.prompts == ["a wolf"] and req.hires.prompts is None
    assert args.png_notes == ["--from-png: the image's Hires prompt is left out: the prompt given is both passes' "
                              "(give --hires-prompt for the second pass's own)"]
    req, args = sample.parse_request(["a wolf", "--from-png", png("Euler, Hires prompt: a dog"), "--hires-prompt",
                                      "a cow"])
    assert req.hires.prompts == ("a cow",) and args.png_notes == []
    with pytest.raises(UsageError, match="a.png: its Hires sampler 'DPM\\+\\+ SDE' has no sdjax scheduler"):
        sample.parse_request(["--from-png", png("Euler, Hires sampler: DPM++ SDE")])
    with pytest.raises(UsageError, match="a.png: its Hires sampler 'Euler a' with schedule type 'Karras' has no sdjax"):
        sample.parse_request(["--from-png", png("Euler, Hires sampler: Euler a, Hires schedule type: Karras")])


def test_from_png_takes_over_a1111_hires_fix_and_names_the_upscalers_it_lacks(tmp_path):
    """An A1111 txt2img image made with the Hires fix is made again with it: Hires upscale, Hires steps (0:
    the Steps), Denoising strength (its second pass's, no img2img strength), Hires upscaler Latent (also
    when left out, A1111's default) or Lanczos. Another upscaler (R-ESRGAN 4x+, Latent (nearest)) or a
    Hires resize to a size leave the Hires fix out, said in a warning naming it; other Hires fields
    (Hires sampler) are named as left out."""
    from sdjax import HiresFix

    def png(text):
        I.save_png(np.zeros((8, 8, 3)), tmp_path / "a.png", text)
        return str(tmp_path / "a.png")
    settings = "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: abc, Version: v1.10.1"
    hires = lambda req: (req.hires_scale, req.hires_steps, req.hires_strength, req.hires_upscaler)  # noqa: E731
    for fields, want in [
            ("Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent",
             (2.0, 10, 0.7, "latent")),
            ("Denoising strength: 0.45, Hires upscale: 1.5, Hires upscaler: Lanczos", (1.5, None, 0.45, "lanczos")),
            ("Denoising strength: 0.6, Hires upscale: 2, Hires steps: 0", (2.0, None, 0.6, "latent"))]:
        req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, {fields}")])
        assert hires(req) == want and req.strength is None and args.png_notes == [], fields
        assert req.hires == HiresFix(want[0], want[1], want[2], want[3]) and (req.width, req.height) == (64, 64)
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Denoising strength: 0.7, Hires "
                                                          "upscale: 2, Hires upscaler: Latent"),
                                      "--hires-steps", "4", "--hires-upscaler", "lanczos"])
    assert hires(req) == (2.0, 4, 0.7, "lanczos")   # flags given override the image's
    for upscaler in ("R-ESRGAN 4x+", "Latent (nearest)"):
        req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Denoising strength: 0.7, Hires "
                                                              f"upscale: 2, Hires upscaler: {upscaler}, Hires sampler: "
                                                              "DPM++ 2M")])
        assert req.hires is None and req.strength is None
        assert args.png_notes == [
            f"--from-png: settings sample.py has no flag for are left out: the Hires fix (its Hires upscaler "
            f"'{upscaler}' has no sdjax equivalent (sdjax has Latent, Lanczos): this run makes the first pass "
            f"only, at Size); Denoising strength: 0.7; Hires upscale: 2; Hires upscaler: {upscaler}; "
            "Hires sampler: DPM++ 2M"]
    req, args = sample.parse_request(["--from-png", png(f"a fox\n{settings}, Denoising strength: 0.7, Hires "
                                                          "resize: 1024x1024, Hires upscaler: Latent")])
    assert req.hires is None and "a Hires resize to a size: sdjax takes a factor" in args.png_notes[0]
    with pytest.raises(UsageError, match=r"a.png: its hires_scale 1.0: must be a number above 1"):
        sample.parse_request(["--from-png", png(f"a fox\n{settings}, Denoising strength: 0.7, Hires upscale: 1")])


def test_init_image_and_strength_make_the_pipelines_img2img_and_are_recorded(pipe_dir, pipe, tmp_path, capsys):
    """--init-image FILE --strength S: the images are the pipeline's img2img of that picture, resized
    to --width x --height (its own size, rounded down to multiples of 8, when not given), and the
    PNG parameters carry A1111's ``Denoising strength``; a trajectory starts from the picture."""
    picture = np.random.default_rng(3).integers(0, 256, (44, 37, 3), np.uint8)   # 37x44: 32x40 by default
    Image.fromarray(picture).save(tmp_path / "start.png")
    out = tmp_path / "out"
    small = [a for a in SMALL if a not in ("--height", "--width", "32")]
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4,5", "--init-image", tmp_path / "start.png", "--strength",
                             "0.7", "--trajectory", "--trajectory-frames", "3", "--model", pipe_dir, "--out", out,
                             *small)
    assert rc == 0, stderr
    text = I.read_png_parameters(out / "00000-seed4-a-dog.png")
    assert text.endswith(f"Size: 32x40, Model: {pipe_dir.name}, Denoising strength: 0.7"), text   # A1111's order
    resized = np.asarray(Image.fromarray(picture).resize((32, 40), Image.Resampling.LANCZOS))
    ref = pipe("a dog", seeds=[4, 5], num_inference_steps=3, init_images=resized, strength=0.7,
               return_intermediates=[1]).to_pil()
    for k in range(2):
        np.testing.assert_array_equal(pixels(out / f"0000{k}-seed{4 + k}-a-dog.png"), ref[k])
    strip = pixels(out / "00000-seed4-a-dog-trajectory.png")   # init image | step 2 (of 3, from index 1) | final
    tiles = [(y, x) for y in range(strip.shape[0] - 39) for x in range(strip.shape[1] - 31)
             if np.array_equal(strip[y:y + 40, x:x + 32], resized)]
    assert len(tiles) == 1 and tiles[0][1] < strip.shape[1] // 3, tiles   # the first frame
    assert not np.array_equal(pixels(out / "00000-seed4-a-dog.png"), resized)


def test_controlnet_flags_steer_the_images_and_are_recorded(pipe_dir, pipe, tmp_path, capsys):
    """--controlnet DIR --control-image FILE, twice, --controlnet-scale X Y --controlnet-end Z: the
    pipeline's images with those two ControlNets, each with its control image and scale (the first's canny
    edges, the second's cropped to the size: --controlnet-module, --controlnet-resize), recorded as A1111's
    ControlNet extension writes its units; --from-png reads their settings back and says which files to give
    (another number of ControlNets: without the image's settings). The size defaults to the first control
    image's, or with a preprocessor to its aspect at 512 px on the short side. A ControlNet made for another
    model exits 2 before anything is written."""
    from test_controlnet import torch_controlnet
    from sdjax.preprocess import fit, preprocess, resize_map
    torch_controlnet(seed=4).save_pretrained(tmp_path / "tiny-cn")
    torch_controlnet(seed=5).save_pretrained(tmp_path / "depth-cn")
    torch_controlnet(seed=4, block_out_channels=(32, 128)).save_pretrained(tmp_path / "wide-cn")
    rng = np.random.default_rng(8)
    control, depth = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    Image.fromarray(control).save(tmp_path / "edges.png")
    Image.fromarray(depth).resize((48, 40)).save(tmp_path / "depth.png")   # (resized to the first one's size)
    out = tmp_path / "out"
    small = [a for a in SMALL if a not in ("--height", "--width", "32")]   # (the size: the control image's)
    units = ["--controlnet", tmp_path / "tiny-cn", "--control-image", tmp_path / "edges.png", "--controlnet",
             tmp_path / "depth-cn", "--control-image", tmp_path / "depth.png"]
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", *units, "--controlnet-scale", "0.7",
                             "--controlnet-scale", "1.2", "--controlnet-end", "0.5", "--controlnet-mode", "balanced",
                             "--controlnet-mode", "prompt", "--controlnet-module", "canny", "--controlnet-module",
                             "none", "--controlnet-resize", "just", "--controlnet-resize", "crop",
                             "--controlnet-canny-low", "50", "--save-control-images", "--model", pipe_dir, "--out", out,
                             *SMALL)
    assert rc == 0, stderr
    made = out / "00000-seed4-a-dog.png"
    assert I.read_png_parameters(made).endswith(
        'Size: 32x32, Model: pipe, ControlNet 0: "Module: canny, Model: tiny-cn, Weight: 0.7, Resize Mode: Just '
        'Resize, Processor Res: 512, Threshold A: 50, Threshold B: 200, Guidance Start: 0, Guidance End: 0.5, Pixel '
        'Perfect: False, Control Mode: Balanced", ControlNet 1: "Module: none, Model: depth-cn, Weight: 1.2, Resize '
        'Mode: Crop and Resize, Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: False, Control Mode: My prompt '
        'is more important"')
    try:
        pipe.load_controlnet([tmp_path / "tiny-cn", tmp_path / "depth-cn"])
        assert pipe._controlled._cache_size() == 1   # (the run's program: another load of the same ones compiles none)
        edges = fit(preprocess(control, "canny", 512, 50, 200), 32, 32)   # (the edges at 512 px, resized)
        assert 0.05 < (edges > 127).mean() < 0.5   # (a random picture's edges: many, not everywhere)
        depth_cropped = resize_map(np.asarray(Image.open(tmp_path / "depth.png")), 38, 32)   # (48x40 by 0.8)
        ref = pipe("a dog", seeds=[4], num_inference_steps=3, control_images=[
                   edges, depth_cropped[:, 3:35]], controlnet_conditioning_scale=[0.7, 1.2],
                   control_guidance_end=0.5, control_mode=["balanced", "prompt"]).to_pil()
    finally:
        pipe.load_controlnet(None)
    np.testing.assert_array_equal(pixels(made), ref[0])
    for k, image in enumerate((edges, depth_cropped[:, 3:35])):   # (--save-control-images: each as made)
        np.testing.assert_array_equal(pixels(out / f"00000-control{k}.png"), image)
    req, args = sample.parse_request(["--from-png", str(made), "--model", str(pipe_dir)])
    assert req.controlnet == [] and args.png_notes == [
        "--from-png: the image was made with the ControlNets tiny-cn and depth-cn: to make it again, pass --controlnet "
        "PATH --control-image FILE (the picture its Module read; Module none: the control image) for each, in this "
        "order; this run makes it without"]
    req, args = sample.parse_request(["--from-png", str(made), *map(str, units), "--model", str(pipe_dir)])
    assert (req.controlnet_scale, req.controlnet_end, req.controlnet_mode, args.png_notes) == (
        [0.7, 1.2], [0.5, 0.5], ["balanced", "prompt"], [])
    assert (req.controlnet_module, req.controlnet_resize, req.controlnet_canny_low, req.controlnet_canny_high,
            req.controlnet_processor_res, req.controlnet_pixel_perfect) == (
        ["canny", "none"], ["just", "crop"], [50, 100], [200, 200], [512, 512], [False, False])
    req, _ = sample.parse_request(["--from-png", str(made), *map(str, units), "--controlnet-scale", "2"])
    assert (req.controlnet_scale, req.controlnet_end) == ([2.0], [0.5, 0.5])   # (a flag given replaces the image's)
    req, args = sample.parse_request(["--from-png", str(made), *map(str, units[:4]), "--model", str(pipe_dir)])
    assert (req.controlnet_scale, req.controlnet_start, req.controlnet_end) == ([], [], [])
    assert args.png_notes == ["--from-png: the image was made with 2 ControlNets (tiny-cn and depth-cn), this run "
                              "with 1: the image's ControlNet settings (Weight, Guidance Start and End, Control Mode, "
                              "Resize Mode, Module and its settings) are left out"]
    assert req.controlnet_module == req.controlnet_resize == []
    (tmp_path / "p.yaml").write_text("controlnet_scale: 0.3\ncontrolnet_end: 0.6\n")   # (then a preset's hold)
    req, _ = sample.parse_request(["--config", str(tmp_path / "p.yaml"), "--from-png", str(made), *map(str, units[:4]),
                                   "--model", str(pipe_dir)])
    assert [(u.scale, u.start, u.end, u.mode) for u in req.control_units] == [(0.3, 0.0, 0.6, "balanced")]
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'p.yaml'}: key 'controlnet_scale' is a ControlNet's "
                                                   "setting: give --controlnet and --control-image too")):
        sample.parse_request(["--config", str(tmp_path / "p.yaml"), "--from-png", str(made)])   # (not the image's)
    # with the Hires fix, the second pass's control images are the files made again at its size, and a canny
    # unit's residuals are weighed softly there (its Control Mode balanced: "prompt"), as A1111's extension does
    req, _ = sample.parse_request(["a dog", *map(str, units), "--controlnet-module", "canny", "--controlnet-module",
                                   "none", "--controlnet-resize", "crop", "--hires-scale", "1.5", "--out",
                                   str(tmp_path / "hires"), "--controlnet-pixel-perfect", *SMALL])

    class Called(Exception):
        pass

    def batches(*args, **kwargs):
        raise Called(kwargs)
    pipe.batches = batches   # (an instance attribute over the method, taken away after)
    try:
        with pytest.raises(Called) as called:
            run_sampling(pipe, req, progress="none")
    finally:
        del pipe.batches
    kwargs = called.value.args[0]
    depth_picture = np.asarray(Image.open(tmp_path / "depth.png"))
    edges = preprocess(control, "canny", 32)   # (Pixel Perfect: the first pass's scale, one map for both passes)
    for key, size in (("control_images", 32), ("hires_control_images", 48)):
        np.testing.assert_array_equal(kwargs[key][0], fit(edges, size, size, "crop"))
        np.testing.assert_array_equal(kwargs[key][1], fit(depth_picture, size, size, "crop"))
    assert kwargs["control_mode"] == ["balanced", "balanced"] and kwargs["hires_control_mode"] == ["prompt", "balanced"]
    # the size: the first control image's (48x40), or with a preprocessor its aspect at 512 on the short side
    swapped = [*map(str, units[4:]), *map(str, units[:4])]
    assert sample.parse_request(["a dog", *swapped])[0].width == 48
    req, _ = sample.parse_request(["a dog", *swapped, "--controlnet-module", "canny"])
    assert (req.width, req.height) == (614 // 8 * 8, 512)
    for flags, flag in ((["--controlnet-canny-high", "150"], "--controlnet-canny-high"),
                        (["--controlnet-pixel-perfect"], "--controlnet-pixel-perfect")):   # (canny's, without it)
        with pytest.raises(UsageError, match=re.escape(f"{flag}: is the canny preprocessor's setting: give "
                                                       "--controlnet-module canny too")):
            sample.parse_request(["a dog", *swapped, *flags])
    req, _ = sample.parse_request(["--from-png", str(made), *map(str, units), "--no-controlnet-pixel-perfect"])
    assert req.controlnet_pixel_perfect == [False]
    rc, _, stderr = run_main(capsys, "a dog", *units[:4], "--controlnet", tmp_path / "wide-cn", "--control-image",
                             tmp_path / "edges.png", "--model", pipe_dir, "--out", tmp_path / "none", *small)
    assert rc == 2 and not (tmp_path / "none").exists()
    assert stderr.startswith(f"sample.py: error: --controlnet {tmp_path / 'wide-cn'}: the ControlNet's the residuals' "
                             "channels"), stderr


def test_mask_makes_the_pipelines_inpainting_and_is_recorded(pipe_dir, pipe, tmp_path, capsys):
    """--init-image FILE --mask MASK: the images are the pipeline's inpainting of that picture with that
    mask (an RGB mask of another size read as grayscale and resized like the picture; default strength
    1), the PNG parameters carry A1111's ``Denoising strength: 1, Mask blur: 0``, and --from-png of it
    says which files to give."""
    rng = np.random.default_rng(4)
    picture = rng.integers(0, 256, (32, 32, 3), np.uint8)
    Image.fromarray(picture).save(tmp_path / "start.png")
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[8:40, 16:64] = (255, 255, 0)   # (yellow: light gray, repaint)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--init-image", tmp_path / "start.png", "--mask",
                             tmp_path / "mask.png", "--model", pipe_dir, "--out", out, *SMALL)
    assert rc == 0, stderr
    made = out / "00000-seed4-a-dog.png"
    assert I.read_png_parameters(made).endswith("Denoising strength: 1, Mask blur: 0")
    small = np.asarray(Image.fromarray(mask).convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    ref = pipe("a dog", seeds=[4], num_inference_steps=3, init_images=picture, mask_images=small).to_pil()
    np.testing.assert_array_equal(pixels(made), ref[0])
    req, args = sample.parse_request(["--from-png", str(made), "--model", str(pipe_dir)])
    assert req.mask is None and args.png_notes == [
        "--from-png: the image was made by inpainting a picture (a mask, Denoising strength 1): to make it again, "
        "pass --init-image PICTURE --mask MASK; this run makes one from noise"]
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "start.png"),
                                      "--model", str(pipe_dir)])
    assert req.img2img_strength == 1 and args.png_notes == [
        "--from-png: the image was made by inpainting (a mask): to make it again, pass --mask MASK too; this run "
        "repaints the whole picture"]
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "start.png"),
                                      "--mask", str(tmp_path / "mask.png"), "--model", str(pipe_dir)])
    assert req.img2img_strength == 1 and args.png_notes == []
    # --masked-content fill: the picture's masked part painted over before it is encoded (A1111's Masked content)
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--init-image", tmp_path / "start.png", "--mask",
                             tmp_path / "mask.png", "--masked-content", "fill", "--model", pipe_dir, "--out",
                             tmp_path / "filled", *SMALL)
    assert rc == 0, stderr
    made = tmp_path / "filled" / "00000-seed4-a-dog.png"
    assert I.read_png_parameters(made).endswith("Denoising strength: 1, Mask blur: 0, Masked content: fill")
    ref = pipe("a dog", seeds=[4], num_inference_steps=3, init_images=I.fill_masked(   # (through the mask cut at
        Image.fromarray(picture), Image.fromarray(np.uint8(small >= 128) * 255)), mask_images=small).to_pil()  # half)
    np.testing.assert_array_equal(pixels(made), ref[0])
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "start.png"), "--mask",
                                      str(tmp_path / "mask.png"), "--model", str(pipe_dir)])
    assert req.masked_content == "fill" and args.png_notes == []
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "start.png"),
                                      "--model", str(pipe_dir)])
    assert req.masked_content == "original" and args.png_notes == [
        "--from-png: the image was made by inpainting (a mask, Masked content fill): to make it again, pass --mask "
        "MASK too; this run repaints the whole picture"]
    # --mask-invert: the mask's black part repainted (A1111's Inpaint not masked), recorded as A1111 writes it
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--init-image", tmp_path / "start.png", "--mask",
                             tmp_path / "mask.png", "--mask-invert", "--model", pipe_dir, "--out",
                             tmp_path / "inverted", *SMALL)
    assert rc == 0, stderr
    made = tmp_path / "inverted" / "00000-seed4-a-dog.png"
    assert I.read_png_parameters(made).endswith("Denoising strength: 1, Mask blur: 0, Mask mode: Inpaint not masked")
    ref = pipe("a dog", seeds=[4], num_inference_steps=3, init_images=picture, mask_images=255 - small).to_pil()
    np.testing.assert_array_equal(pixels(made), ref[0])
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "start.png"), "--mask",
                                      str(tmp_path / "mask.png"), "--model", str(pipe_dir)])
    assert req.mask_invert and args.png_notes == []
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "start.png"),
                                      "--model", str(pipe_dir)])
    assert not req.mask_invert and args.png_notes == [
        "--from-png: the image was made by inpainting (a mask, Inpaint not masked): to make it again, pass --mask "
        "MASK too; this run repaints the whole picture"]
    with pytest.raises(UsageError, match="--mask-invert: swaps the black and white of --mask: give --mask too"):
        sample.parse_request(["a dog", "--init-image", str(tmp_path / "start.png"), "--mask-invert"])
    with pytest.raises(UsageError, match="--masked-content latent_noise: is what the part --mask marks starts from: "
                                         "give --mask too"):
        sample.parse_request(["a dog", "--init-image", str(tmp_path / "start.png"), "--masked-content",
                              "latent_noise"])
    (tmp_path / "boxed.yaml").write_text("mask_padding: 5\n")   # (a preset's, with no mask: said, not dropped)
    with pytest.raises(UsageError, match="key 'mask_padding' has value 5: inpaints the box around a mask: give"):
        sample.parse_request(["--config", str(tmp_path / "boxed.yaml"), "--from-png", str(made), "--init-image",
                              str(tmp_path / "start.png"), "--model", str(pipe_dir)])
    # --mask-padding: the box around the mask made at --width x --height, pasted into the picture (its own size);
    # --mask-blur: the mask blurred, the paste through the blur
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(tmp_path / "big.png")
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--init-image", tmp_path / "big.png", "--mask",
                             tmp_path / "mask.png", "--mask-padding", "4", "--mask-blur", "2.5", "--model", pipe_dir,
                             "--out", out, *SMALL)
    assert rc == 0, stderr
    made = out / "00001-seed4-a-dog.png"
    assert I.read_png_parameters(made).endswith(
        "Size: 32x32, Model: pipe, Denoising strength: 1, Mask blur: 2.5, Inpaint area: Only masked, Masked area "
        "padding: 4")
    big_mask = np.asarray(Image.fromarray(mask).convert("L").resize((48, 40), Image.Resampling.LANCZOS))
    ref = pipe("a dog", seeds=[4], num_inference_steps=3, init_images=Image.open(tmp_path / "big.png"),
               mask_images=big_mask, mask_padding=4, mask_blur=2.5, height=32, width=32).to_pil()
    assert pixels(made).shape == (40, 48, 3)
    np.testing.assert_array_equal(pixels(made), ref[0])
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "big.png"),
                                      "--mask", str(tmp_path / "mask.png"), "--model", str(pipe_dir)])
    assert (req.mask_padding, req.mask_blur, req.width, req.height, args.png_notes) == (4, 2.5, 32, 32, [])
    req, args = sample.parse_request(["--from-png", str(made), "--model", str(pipe_dir)])   # (no mask: no box)
    assert req.mask_padding is None and req.mask is None
    req, args = sample.parse_request(["--from-png", str(made), "--init-image", str(tmp_path / "big.png"),
                                      "--model", str(pipe_dir)])   # (the whole picture, at the box's size: said)
    assert (req.mask_padding, req.width, req.height) == (None, 32, 32)
    assert args.png_notes == ["--from-png: the image was made by inpainting (a mask, Only masked): to make it again, "
                              "pass --mask MASK too; this run repaints the whole picture, at 32x32: the size of the "
                              "box around the mask it was made at, not the picture's"]


def test_init_image_is_read_upright_as_its_exif_orientation_shows_it(tmp_path):
    """A photo whose EXIF says "turn a quarter" (phones' JPEGs) is sized and read upright, as
    diffusers' load_image and A1111 read it: 100x70 stored, 70x100 shown."""
    from sdjax.cli_utils import init_image_size, load_init_image
    stored = np.zeros((70, 100, 3), np.uint8)
    stored[:, :50] = 255   # left half white
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6   # Orientation: rotate 90 degrees clockwise to show
    image.save(tmp_path / "phone.png", exif=exif)
    assert init_image_size(tmp_path / "phone.png") == (70, 100)
    np.testing.assert_array_equal(load_init_image(tmp_path / "phone.png", 70, 100), np.rot90(stored, -1))


def test_hosts_compare_the_init_images_content_not_its_path(tmp_path):
    """The request fingerprint that hosts compare holds the init image's bytes: the same picture kept
    at another path on each host agrees, another picture at the same path does not."""
    from sdjax.cli_utils import SampleRequest
    for name, color in (("a.png", "red"), ("b.png", "red"), ("c.png", "blue")):
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    prints = [SampleRequest(["a cat"], [0], init_image=str(tmp_path / n)).fingerprint() for n in ("a.png", "b.png",
                                                                                                   "c.png")]
    assert (prints[0] == prints[1]).all() and not (prints[0] == prints[2]).all()
    assert not (SampleRequest(["a cat"], [0], init_image=str(tmp_path / "a.png"), strength=0.5).fingerprint()
                == prints[0]).all()


def test_lora_flags_merge_the_files_and_are_recorded_as_a1111_prompt_tags(pipe_dir, pipe, tmp_path, capsys):
    """--lora FILE:SCALE --lora FILE: the image is that of the pipeline with both LoRAs fused, and the PNG
    parameters carry them as A1111 users write them, ``<lora:NAME:SCALE>`` after the prompt."""
    import shutil
    from test_lora import lora_tensors, mixed_alphas, write_kohya, write_peft
    model = shutil.copytree(pipe_dir, tmp_path / "lora-pipe")   # a pipeline of its own: the module's stays as is
    style = write_kohya(tmp_path / "style_v2.safetensors", lora_tensors(1), mixed_alphas())
    detail = write_peft(tmp_path / "more_detail.safetensors", lora_tensors(2), 8.0, {})
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a dog", "--seeds", "4", "--lora", f"{style}:0.5", "--lora", detail, "--model",
                             model, "--out", out, *SMALL)
    assert rc == 0, stderr
    text = I.read_png_parameters(out / "00000-seed4-a-dog.png")
    assert text.startswith("a dog <lora:style_v2:0.5> <lora:more_detail:1>\nSteps: 3,"), text
    params = I.parse_a1111_parameters(text)
    assert params["prompt"] == "a dog <lora:style_v2:0.5> <lora:more_detail:1>" and params["Steps"] == "3"
    kw = dict(seeds=4, num_inference_steps=3, height=32, width=32)
    assert not np.array_equal(pixels(out / "00000-seed4-a-dog.png"), pipe("a dog", **kw).to_pil()[0])
    # the module's pipeline with the two fused in Python (its compiled sampler: no other compile), then put back
    try:
        pipe.fuse_lora(style, scale=0.5)
        pipe.fuse_lora(detail)
        np.testing.assert_array_equal(pixels(out / "00000-seed4-a-dog.png"), pipe("a dog", **kw).to_pil()[0])
    finally:
        pipe.unfuse_lora()


def test_prompts_naming_different_loras_are_made_each_with_its_own(pipe_dir, pipe, tmp_path, capsys):
    """Prompts whose A1111 tags name different LoRAs (--lora-dir): each run of prompts naming the same is made
    with them (and the --lora flags') fused, in the prompts' order, as the pipeline makes each prompt with
    those fused; each PNG records its own."""
    import shutil
    from test_lora import lora_tensors, mixed_alphas, write_kohya, write_peft
    model = shutil.copytree(pipe_dir, tmp_path / "lora-pipe")   # a pipeline of its own: the module's stays as is
    (tmp_path / "loras").mkdir()
    style = write_kohya(tmp_path / "loras" / "style.safetensors", lora_tensors(1), mixed_alphas())
    detail = write_peft(tmp_path / "detail.safetensors", lora_tensors(2), 8.0, {})
    prompts = ["a dog <lora:style:0.5>", "a cat", "a bird <lora:style:0.5>", "a fox <lora:style:0.5>"]
    req, _ = sample.parse_request([*prompts, "--lora-dir", str(tmp_path / "loras"), "--lora", f"{detail}:0.3"])
    assert req.prompts == ["a dog", "a cat", "a bird", "a fox"] and req.lora == [f"{detail}:0.3"]
    assert req.prompt_loras == [[f"{style}:0.5"], [], [f"{style}:0.5"], [f"{style}:0.5"]]
    out = tmp_path / "out"
    rc, stdout, stderr = run_main(capsys, *prompts, "--seeds", "4", "--lora-dir", tmp_path / "loras", "--lora",
                                  f"{detail}:0.3", "--model", model, "--out", out, *SMALL)
    assert rc == 0, stderr
    assert [line for line in stdout.splitlines() if " with " in line] == [
        "1 prompt with <lora:style:0.5>", "1 prompt with no LoRA of a tag", "2 prompts with <lora:style:0.5>"]
    assert "wrote 4 files" in stdout and "4 images in" in stdout
    kw = dict(seeds=4, num_inference_steps=3, height=32, width=32)
    names = ["00000-seed4-a-dog.png", "00001-seed4-a-cat.png", "00002-seed4-a-bird.png", "00003-seed4-a-fox.png"]
    for name, prompt, styled in zip(names, ["a dog", "a cat", "a bird", "a fox"], [True, False, True, True]):
        try:
            pipe.fuse_lora(detail, scale=0.3)   # (the --lora flags' first: float sums in the order the run adds)
            if styled:
                pipe.fuse_lora(style, scale=0.5)
            np.testing.assert_array_equal(pixels(out / name), pipe(prompt, **kw).to_pil()[0])
        finally:
            pipe.unfuse_lora()
        tags = "<lora:detail:0.3>" + (" <lora:style:0.5>" if styled else "")
        assert I.read_png_parameters(out / name).startswith(f"{prompt} {tags}\nSteps: 3,")


def test_a_file_that_is_no_lora_exits_2_after_loading_before_writing(pipe_dir, pipe, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)}, str(loha))
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a dog", "--lora", loha, "--model", pipe_dir, "--out", out, *SMALL)
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and not out.exists(), stderr
    assert lines[0] == (f"sample.py: error: --lora {loha}: key 'lora_unet_conv_in.hada_w1_a' is LoHa (LyCORIS), not "
                        "a plain LoRA; sdjax merges plain LoRA (up @ down) only"), stderr


def test_embedding_flags_add_the_tokens_and_a_bad_file_exits_2_before_writing(pipe_dir, pipe, tmp_path, capsys):
    """--embedding FILE: its token (an A1111 file's name) in the prompt is the embedding's vectors (the
    image differs from the plain pipeline's, whose tokenizer spells the word out); the run names the
    tokens. An embedding of another width exits 2 after loading, before anything is written."""
    import shutil
    from safetensors.numpy import save_file
    from sdjax.pipeline import StableDiffusion
    model = shutil.copytree(pipe_dir, tmp_path / "ti-pipe")   # a pipeline of its own: the module's stays as is
    save_file({"emb_params": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)},
              tmp_path / "Crayon.safetensors")
    rc, stdout, stderr = run_main(capsys, "a dog, crayon", "--seeds", "4", "--embedding",
                                  tmp_path / "Crayon.safetensors", "--model", model, "--out", tmp_path / "out", *SMALL)
    assert rc == 0, stderr
    assert "embeddings (write them in a prompt to use them): Crayon" in stdout
    loaded = StableDiffusion.from_pretrained(str(model), dtype="float32")   # (the run's, as main() loaded it)
    assert loaded.tokenizer.convert_tokens_to_ids(["Crayon", "Crayon_1"]) == [len(loaded.tokenizer) - 2,
                                                                             len(loaded.tokenizer) - 1]
    plain = pipe("a dog, crayon", seeds=4, num_inference_steps=3, height=32, width=32).to_pil()[0]
    assert not np.array_equal(pixels(tmp_path / "out" / "00000-seed4-a-dog-crayon.png"), plain)
    import hashlib
    from PIL import Image
    digest = hashlib.sha256((tmp_path / "Crayon.safetensors").read_bytes()).hexdigest()[:12]
    assert Image.open(tmp_path / "out" / "00000-seed4-a-dog-crayon.png").text["parameters"].endswith(
        f'TI hashes: "Crayon: {digest}"')   # (A1111's record of it, which --from-png names)
    save_file({"<wide>": np.zeros((1, 64), np.float32)}, tmp_path / "wide.safetensors")
    rc, _, stderr = run_main(capsys, "a dog", "--embedding", tmp_path / "wide.safetensors", "--model", pipe_dir,
                             "--out", tmp_path / "none", *SMALL)
    assert rc == 2 and not (tmp_path / "none").exists()
    assert stderr.strip() == (f"sample.py: error: --embedding {tmp_path / 'wide.safetensors'}: its vectors have width "
                              "64; this text encoder's is 32 (an embedding made for another model?)")


def test_lora_dir_takes_the_tags_out_of_the_prompts_and_finds_their_files(tmp_path):
    """--lora-dir DIR: each <lora:NAME:SCALE> of the prompts becomes --lora DIR/.../NAME.safetensors:SCALE,
    the tag taken out of the text as A1111 takes it out: a tag between two words leaves them two words."""
    (tmp_path / "loras" / "styles").mkdir(parents=True)
    (tmp_path / "loras" / "styles" / "style.safetensors").write_bytes(b"")
    req, _ = sample.parse_request(["a <lora:style:0.5>dog", "--lora-dir", str(tmp_path / "loras")])
    assert req.prompts == ["a dog"] and req.lora == [f"{tmp_path / 'loras' / 'styles' / 'style.safetensors'}:0.5"]
    # a linked folder below it is looked in too, as A1111 lists its models/Lora (once, a link to a folder
    # above it as well)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "Detail.safetensors").write_bytes(b"")
    (tmp_path / "loras" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "loras" / "styles" / "up").symlink_to(tmp_path / "loras")
    req, _ = sample.parse_request(["a dog <lora:Detail:0.3>", "--lora-dir", str(tmp_path / "loras")])
    assert req.lora == [f"{tmp_path / 'loras' / 'linked' / 'Detail.safetensors'}:0.3"]
    # the scale as written (not rounded), and one that is no finite number said of the tag, not of a --lora flag
    req, _ = sample.parse_request(["a dog <lora:style:0.1234567>", "--lora-dir", str(tmp_path / "loras")])
    assert req.lora == [f"{tmp_path / 'loras' / 'styles' / 'style.safetensors'}:0.1234567"]
    with pytest.raises(sample.UsageError, match=r"^the LoRA <lora:style:nan>: its scale is not a finite number$"):
        sample.parse_request(["a dog <lora:style:nan>", "--lora-dir", str(tmp_path / "loras")])
    # prompts naming the same LoRAs in another order name the same ones (they add up)
    req, _ = sample.parse_request(["a <lora:style:0.5> <lora:Detail:1>", "b <lora:Detail:1> <lora:style:0.5>",
                                   "--lora-dir", str(tmp_path / "loras")])
    assert [Path(file).name for file in req.lora] == ["style.safetensors:0.5", "Detail.safetensors:1.0"]
    # an image's LoRAs were tags of its prompt: a prompt given in its place leaves them out (no merge, no note)
    I.save_png(np.zeros((8, 8, 3)), tmp_path / "a.png", "a cat <lora:style:0.7>\nSteps: 20, Sampler: Euler, CFG scale: "
               "7, Seed: 1, Size: 64x64, Version: v1.10.1")
    for argv, loras, notes in ((["--from-png", str(tmp_path / "a.png")], ["style.safetensors:0.7"], []),
                               (["a dog", "--from-png", str(tmp_path / "a.png")], [], [])):
        req, args = sample.parse_request([*argv, "--lora-dir", str(tmp_path / "loras")])
        assert ([Path(file).name for file in req.lora], args.png_notes) == (loras, notes)
    _, args = sample.parse_request(["--from-png", str(tmp_path / "a.png")])
    assert args.png_notes == ["--from-png: the image was made with the LoRA style at 0.7: to use it, pass --lora "
                              "FILE:0.7 (its file) or --lora-dir DIR (its folder)"]   # (the check can fail)


def test_a_file_from_a_folder_that_does_not_load_is_said_of_the_folder(pipe_dir, tmp_path, capsys):
    """A --lora-dir / --embedding-dir file that does not load exits 2 before anything is written, said of
    the folder that gave it (or of the preset's key), not of a --lora / --embedding flag not given."""
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": np.zeros((1, 64), np.float32)}, tmp_path / "emb" / "Wide.safetensors")
    save_torch({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)}, str(tmp_path / "loha.safetensors"))
    wide, out = tmp_path / "emb" / "Wide.safetensors", tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a dog, wide", "--embedding-dir", tmp_path / "emb", "--model", pipe_dir,
                             "--out", out, *SMALL)
    assert rc == 2 and not out.exists()
    assert stderr.strip() == (f"sample.py: error: --embedding-dir {tmp_path / 'emb'}: {wide}: its vectors have "
                              "width 64; this text encoder's is 32 (an embedding made for another model?)")
    (tmp_path / "preset.yaml").write_text(f"embedding_dir: {tmp_path / 'emb'}\nlora_dir: {tmp_path}\n")
    rc, _, stderr = run_main(capsys, "a dog, wide", "--config", tmp_path / "preset.yaml", "--model", pipe_dir,
                             "--out", out, *SMALL)
    assert rc == 2 and not out.exists()
    assert stderr.strip().startswith(f"sample.py: error: {tmp_path / 'preset.yaml'}: key 'embedding_dir' has value "
                                     f"'{tmp_path / 'emb'}': {wide}: its vectors have width 64"), stderr
    for prompts in (["a dog <lora:loha:0.5>"], ["a cat", "a dog <lora:loha:0.5>"]):   # (a later prompt's too)
        rc, _, stderr = run_main(capsys, *prompts, "--lora-dir", tmp_path, "--model", pipe_dir, "--out", out, *SMALL)
        assert rc == 2 and not out.exists()
        assert stderr.strip().startswith(f"sample.py: error: --lora-dir {tmp_path}: {tmp_path / 'loha.safetensors'}: "
                                         "key 'lora_unet_conv_in.hada_w1_a' is LoHa"), stderr


def test_embedding_dir_adds_the_embeddings_the_prompts_name(tmp_path):
    """--embedding-dir DIR: the embedding files there (and in a folder below) that a prompt or the negative
    prompt names by their file name, as a word in any letter case, become --embedding files (loaded as
    those are); one a --embedding file already gives is not added again, nor one named only inside a
    longer word. With --from-png the image's TI hashes then need no warning. A named embedding in two
    files, and a DIR that is no folder, exit 2."""
    emb = tmp_path / "embeddings"
    (emb / "negative").mkdir(parents=True)
    for name in ("EasyNegative.safetensors", "negative/bad-hands-5.pt", "Crayon.bin", "hands.pt", "notes.txt",
                 "given.safetensors"):
        (emb / name).write_bytes(b"")
    req, _ = sample.parse_request(["a cat, bad-hands-5, given", "--negative-prompt", "(easynegative:1.2), blurry",
                                   "--embedding-dir", str(emb), "--embedding", str(emb / "given.safetensors")])
    assert req.embedding == [str(emb / "given.safetensors"), str(emb / "negative" / "bad-hands-5.pt"),
                             str(emb / "EasyNegative.safetensors")]   # (by name: not by where they lie below DIR)
    I.save_png(np.zeros((8, 8, 3)), tmp_path / "a.png", "a cat\nNegative prompt: EasyNegative\nSteps: 20, Sampler: "
               'Euler, CFG scale: 7, Seed: 1, Size: 64x64, TI hashes: "EasyNegative: 0123456789ab", Version: v1.10.1')
    _, args = sample.parse_request(["--from-png", str(tmp_path / "a.png")])
    assert [note for note in args.png_notes if "EasyNegative" in note]   # (the check can fail)
    req, args = sample.parse_request(["--from-png", str(tmp_path / "a.png"), "--embedding-dir", str(emb)])
    assert req.embedding == [str(emb / "EasyNegative.safetensors")] and args.png_notes == []
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "Glow.PT").write_bytes(b"")
    (emb / "linked").symlink_to(tmp_path / "more")   # (a linked folder below it: looked in, as A1111 does)
    req, _ = sample.parse_request(["a glow", "--embedding-dir", str(emb)])
    assert req.embedding == [str(emb / "linked" / "Glow.PT")]
    (emb / "negative" / "Crayon.pt").write_bytes(b"")
    with pytest.raises(sample.UsageError, match=r"--embedding-dir .*: has the embedding Crayon in several files"):
        sample.parse_request(["a crayon drawing", "--embedding-dir", str(emb)])
    with pytest.raises(sample.UsageError, match=r"--embedding-dir .*notes.txt: is not a folder"):
        sample.parse_request(["a cat", "--embedding-dir", str(emb / "notes.txt")])


def test_ti_hashes_name_the_embeddings_the_tokenizer_reads(tmp_path):
    """An embedding whose token is part of a longer loaded one's (Crayon in CrayonV2) is not in a prompt
    that names the longer one: the tokenizer matches that one (was: a substring test listed both)."""
    import reference as R
    from sdjax.cli_utils import embeddings_used
    from sdjax.text import load_tokenizer
    tokenizer = load_tokenizer(R.write_tiny_tokenizer(tmp_path), subfolder=None)
    tokenizer.add_tokens(["Crayon", "Crayon_1", "CrayonV2"])   # as load_textual_inversion adds them
    loaded = [("Crayon", "aaaa"), ("CrayonV2", "bbbb")]
    assert embeddings_used(tokenizer, loaded, "a dog, crayonv2\nblurry") == [("CrayonV2", "bbbb")]
    assert embeddings_used(tokenizer, loaded, "a dog, (Crayon:1.2)\ncrayonV2") == loaded
    assert embeddings_used(tokenizer, loaded, "a dog\n") == []


def test_a_failed_write_is_one_line_and_the_files_before_it_stay(pipe_dir, pipe, tmp_path, capsys, monkeypatch):
    import sdjax.cli_utils
    real, calls = sdjax.cli_utils.save_png, []

    def save_png(image, path, params):   # runs on the writer thread
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(image, path, params)
    monkeypatch.setattr(sdjax.cli_utils, "save_png", save_png)
    out = tmp_path / "out"
    rc, stdout, stderr = run_main(capsys, "a cat", "--seeds", "0-3", "--model", pipe_dir, "--out", out, *SMALL)
    assert rc == 1 and stderr.splitlines()[-1] == (f"sample.py: error: cannot write the images: [Errno 28] No space "
                                                   f"left on device; any images written before it are in {out}")
    assert sorted(p.name for p in out.iterdir()) == ["00000-seed0-a-cat.png", "00001-seed1-a-cat.png",
                                                      "00003-seed3-a-cat.png"]   # each whole; not the failed one
    ref = pipe("a cat", seeds=[0, 3], num_inference_steps=3, height=32, width=32).to_pil()
    np.testing.assert_array_equal(pixels(out / "00003-seed3-a-cat.png"), ref[1])


def test_seed_range_prompts_file_and_config(pipe_dir, pipe, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffred cat\n\n  blue dog  \n", encoding="utf-8")  # a BOM, as Windows editors write
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("steps: 50\nguidance_scale: 6\nscheduler: pndm\n")
    out = tmp_path / "out"
    rc, _, _ = run_main(capsys, "--prompts-file", prompts, "--seeds", "0-1", "--config", cfg, "--model", pipe_dir,
                        "--out", out, "--batch-size", "2", *SMALL)   # SMALL's --steps 3 overrides the preset
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-seed0-red-cat.png", "00001-seed1-red-cat.png",
                     "00002-seed0-blue-dog.png", "00003-seed1-blue-dog.png"]
    assert I.parse_a1111_parameters(I.read_png_parameters(out / "00000-seed0-red-cat.png"))["prompt"] == "red cat"
    params = I.parse_a1111_parameters(I.read_png_parameters(out / "00003-seed1-blue-dog.png"))
    assert params["prompt"] == "blue dog" and params["Steps"] == "3" and params["CFG scale"] == "6"
    assert params["Seed"] == "1" and params["negative_prompt"] == ""


def test_single_file_model(pipe_dir, pipe, tmp_path, capsys):
    """--model FILE.safetensors (the original SD layout) with --model-config: the images of the folder."""
    single = pipe.save_single_file(tmp_path / "tiny-sd.safetensors")
    for model, extra, out in ((pipe_dir, [], tmp_path / "folder"),
                              (single, ["--model-config", pipe_dir], tmp_path / "file")):
        rc, stdout, stderr = run_main(capsys, "a photo of a cat", "--seeds", "3", "--model", model, *extra,
                                      "--out", out, *SMALL)
        assert rc == 0, stderr
    assert f"loaded {single} (float32)" in stdout
    name = "00000-seed3-a-photo-of-a-cat.png"
    np.testing.assert_array_equal(pixels(tmp_path / "file" / name), pixels(tmp_path / "folder" / name))


def test_trajectory_outputs(pipe_dir, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, _ = run_main(capsys, "a photo of a cat", "--seeds", "5", "--model", pipe_dir, "--out", out,
                        "--trajectory", *SMALL)
    assert rc == 0
    stem = "00000-seed5-a-photo-of-a-cat"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}-trajectory.gif", f"{stem}-trajectory.png",
                                                     f"{stem}.png"]
    n_frames = 1 + len(T.trajectory_steps(pipe.make_scheduler("pndm", 3).num_model_calls, 8)) + 1
    with Image.open(out / f"{stem}-trajectory.gif") as gif:
        assert gif.n_frames == n_frames
        assert gif.size == (32, 32)
    strip = Image.open(out / f"{stem}-trajectory.png")
    assert strip.height == 32 + I.label_height() + 2 * I.GAP and strip.width >= n_frames * 32

    # the library function: same frames for the same prompt/seed, last frame = the image
    frames, labels = T.denoising_trajectory(pipe, "a photo of a cat", 5, steps=3, height=32, width=32)
    assert len(frames) == n_frames and labels[0] == "noise" and labels[-1] == "final"
    assert re.fullmatch(r"step 1 t=\d+", labels[1])
    np.testing.assert_array_equal(I.as_pil(frames[-1]), pixels(out / f"{stem}.png"))
    with Image.open(out / f"{stem}-trajectory.gif") as gif:
        gif.seek(n_frames - 1)
        last = np.asarray(gif.convert("RGB"), np.float32)
    assert np.abs(last - pixels(out / f"{stem}.png")).mean() < 12   # GIF palette quantization


def test_trajectory_frames_and_dtype_spellings(pipe_dir, tmp_path, capsys):
    """--trajectory-frames sets the frames of each strip and GIF (it had no flag); --dtype takes
    train.py's short spellings too."""
    out = tmp_path / "out"
    rc, _, _ = run_main(capsys, "a photo of a cat", "--seeds", "5", "--model", pipe_dir, "--out", out,
                        "--trajectory", "--trajectory-frames", "3", *SMALL)
    assert rc == 0
    with Image.open(out / "00000-seed5-a-photo-of-a-cat-trajectory.gif") as gif:
        assert gif.n_frames == 3   # the noise, one step, the image
    with pytest.raises(UsageError, match=re.escape("--trajectory-frames 2: a trajectory needs at least 3 frames")):
        sample.parse_request(["a cat", "--trajectory", "--trajectory-frames", "2"])
    assert sample.parse_request(["a cat", "--dtype", "bf16"])[0].dtype == "bfloat16"
    with pytest.raises(UsageError, match=re.escape("unknown dtype 'half': choose one of float32, bfloat16, float16 "
                                                   "(or fp32, bf16, fp16)")):
        sample.parse_request(["a cat", "--dtype", "half"])


def test_noising_trajectory(pipe):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from sdjax.sampling import decode_latents
    from sdjax.schedulers import make_noise_schedule
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (37, 45, 3), np.uint8))   # center-cropped to 32x40
    timesteps = (0, 500, 999)
    frames, labels = T.noising_trajectory(pipe, image, timesteps, seed=3)
    assert labels == ["t=0", "t=500", "t=999"] and all(f.shape == (32, 40, 3) for f in frames)

    abar = make_noise_schedule(pipe.scheduler_config)

    @jax.jit
    def reference(state, x_1HWC):   # written out independently: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps
        vae = nnx.merge(pipe._graphdefs.vae, state)
        clean = vae.encode(x_1HWC * 2 - 1).mean * vae.scaling_factor
        eps = jax.random.normal(jax.random.key(3), clean.shape[1:])[None]
        noisy = [np.sqrt(abar[t]) * clean + np.sqrt(1 - abar[t]) * eps for t in timesteps]
        return decode_latents(vae, jnp.concatenate([clean, eps] + noisy))
    round_trip, pure_noise, *expected = np.asarray(reference(pipe._state.vae, jnp.asarray(T.prepare_image(image))[None]))
    np.testing.assert_allclose(np.stack(frames), np.stack(expected), atol=2e-5)
    err = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
    # t=0 is the VAE round trip up to sqrt(1 - abar_0) = 3% noise; t=999 keeps sqrt(abar_999) = 7% of the image
    assert err(frames[0], round_trip) < err(frames[1], round_trip) < err(frames[2], round_trip)
    assert err(frames[2], pure_noise) < err(frames[1], pure_noise) < err(frames[0], pure_noise)
    assert err(frames[2], pure_noise) < 0.05 * err(round_trip, pure_noise)


def test_prompts_from_a_pipe_or_standard_input(tmp_path, monkeypatch):
    """A pipe is not a regular file: ``<(...)`` / a FIFO and ``-`` (standard input) are read."""
    import io
    from sdjax.cli_utils import read_prompts_file
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'w').write('a cat\\n\\na dog\\n')"])
    assert read_prompts_file(fifo) == ["a cat", "a dog"]
    writer.wait()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeffa bird\nan owl\n".encode())))
    assert read_prompts_file("-") == ["a bird", "an owl"]


# ----------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "height": (["a cat", "--height", "30"], "multiple of 8"),
    "width": (["a cat", "--width", "100"], "multiple of 8"),
    "scheduler": (["a cat", "--scheduler", "heun"], "unknown scheduler 'heun'"),
    "no_prompt": ([], "no prompt"),
    "missing_prompts_file": (["--prompts-file", "{tmp}/nope.txt"], "does not exist"),
    "empty_prompts_file": (["--prompts-file", "{tmp}/empty.txt"], "has no prompts"),
    "prompts_file_is_a_folder": (["--prompts-file", "{tmp}"], "is a folder; give a text file"),
    "seeds_syntax": (["a cat", "--seeds", "1-x"], "bad seeds"),
    "seeds_reversed": (["a cat", "--seeds", "5-2"], "smaller than the start"),
    "seeds_not_ascii": (["a cat", "--seeds", "\u00b2"], "bad seeds"),
    "config_seeds_not_ascii": (["a cat", "--config", "{tmp}/superscript.yaml"], "key 'seeds': bad seeds"),
    "steps_type": (["a cat", "--steps", "many"], "invalid int value"),
    "clip_skip_zero": (["a cat", "--clip-skip", "0"], "error: --clip-skip 0: must be an integer >= 1"),
    "clip_skip_type": (["a cat", "--clip-skip", "2.5"], "argument --clip-skip: invalid int value: '2.5'"),
    "config_clip_skip": (["a cat", "--config", "{tmp}/clipskip.yaml"], "clipskip.yaml: key 'clip_skip' has value 0: "
                         "must be an integer >= 1"),
    "lora_missing": (["a cat", "--lora", "{tmp}/nope.safetensors:0.5"], "error: --lora {tmp}/nope.safetensors:0.5: "
                     "no such file {tmp}/nope.safetensors"),
    "lora_bad_scale": (["a cat", "--lora", "{tmp}/style.safetensors:strong"], "error: --lora "
                       "{tmp}/style.safetensors:strong: the scale 'strong' is not a finite number"),
    "lora_nan_scale": (["a cat", "--lora", "{tmp}/style.safetensors:nan"], "the scale 'nan' is not a finite number"),
    "lora_not_safetensors": (["a cat", "--lora", "{tmp}/empty.txt"], "empty.txt is not a .safetensors file"),
    "config_lora": (["a cat", "--config", "{tmp}/lora.yaml"], "lora.yaml: key 'lora' has value ['nope.safetensors']: "
                    "no such file nope.safetensors"),
    "init_image_missing": (["a cat", "--init-image", "{tmp}/nope.png"], "error: --init-image {tmp}/nope.png: no such "
                           "file"),
    "init_image_not_an_image": (["a cat", "--init-image", "{tmp}/empty.txt"], "empty.txt: cannot be read as an image"),
    "config_init_image": (["a cat", "--config", "{tmp}/init.yaml"], "init.yaml: key 'init_image' has value "
                          "'nope.png': no such file"),
    "strength_without_init_image": (["a cat", "--strength", "0.5"], "--strength 0.5: is img2img's: give --init-image"),
    "mask_without_init_image": (["a cat", "--mask", "{tmp}/init.png"], "error: --mask {tmp}/init.png: marks what to "
                                "repaint of a picture (inpainting): give --init-image too"),
    "mask_missing": (["a cat", "--init-image", "{tmp}/init.png", "--mask", "{tmp}/nope.png"],
                     "error: --mask {tmp}/nope.png: no such file"),
    "mask_padding_without_mask": (["a cat", "--init-image", "{tmp}/init.png", "--mask-padding", "8"],
                                  "error: --mask-padding 8: inpaints the box around a mask: give --mask too"),
    "mask_padding_negative": (["a cat", "--init-image", "{tmp}/init.png", "--mask", "{tmp}/init.png",
                               "--mask-padding", "-1"], "error: --mask-padding -1: must be a whole number"),
    "mask_padding_black_mask": (["a cat", "--init-image", "{tmp}/init.png", "--mask", "{tmp}/init.png",
                                 "--mask-padding", "8"], "error: --mask {tmp}/init.png: is black everywhere (cut at "
                                                         "half gray): --mask-padding finds no box around it"),
    "mask_blur_without_mask": (["a cat", "--init-image", "{tmp}/init.png", "--mask-blur", "4"],
                               "error: --mask-blur 4.0: softens an inpainting mask's edge: give --mask too"),
    "mask_blur_negative": (["a cat", "--init-image", "{tmp}/init.png", "--mask", "{tmp}/init.png", "--mask-blur", "-2"],
                           "error: --mask-blur -2.0: must be a number of pixels >= 0"),
    "mask_blur_nan": (["a cat", "--init-image", "{tmp}/init.png", "--mask", "{tmp}/init.png", "--mask-blur", "nan"],
                      "error: --mask-blur nan: must be a number of pixels >= 0"),
    "controlnet_without_image": (["a cat", "--controlnet", "{tmp}"], "error: --controlnet {tmp}: a ControlNet steers "
                                 "the images by a control image: give --control-image too"),
    "control_image_without_controlnet": (["a cat", "--control-image", "{tmp}/init.png"], "error: --control-image "
                                         "{tmp}/init.png: a ControlNet steers the images by a control image: give "
                                         "--controlnet too"),
    "control_image_missing": (["a cat", "--controlnet", "{tmp}", "--control-image", "{tmp}/nope.png"],
                              "error: --control-image {tmp}/nope.png: no such file"),
    "controlnet_scale_nan": (["a cat", "--controlnet", "{tmp}", "--control-image", "{tmp}/init.png",
                              "--controlnet-scale", "nan"], "error: --controlnet-scale nan: must be a finite number"),
    "controlnet_scale_alone": (["a cat", "--controlnet-scale", "0.5"], "error: --controlnet-scale 0.5: is a "
                               "ControlNet's setting: give --controlnet and --control-image too"),
    "control_images_count": (["a cat", "--controlnet", "{tmp}", "--controlnet", "{tmp}", "--control-image",
                              "{tmp}/init.png"], "error: --control-image {tmp}/init.png: 1 control image for 2 "
                                                 "ControlNets: give one each (--control-image after its --controlnet)"),
    "controlnet_scales_count": (["a cat", "--controlnet", "{tmp}", "--control-image", "{tmp}/init.png",
                                 "--controlnet-scale", "0.5", "--controlnet-scale", "0.7"],
                                "error: --controlnet-scale 0.5 0.7: 2 values for 1 ControlNet: give one for all, or "
                                "one each (in --controlnet's order)"),
    "controlnet_window": (["a cat", "--controlnet", "{tmp}", "--control-image", "{tmp}/init.png",
                           "--controlnet-start", "0.6", "--controlnet-end", "0.4"], "error: --controlnet-start 0.6: "
                                                                                   "must be below --controlnet-end (0.4)"),
    "controlnet_processor_res_range": (["a cat", "--controlnet", "{tmp}", "--control-image", "{tmp}/init.png",
                                        "--controlnet-module", "canny", "--controlnet-processor-res", "32"],
                                       "error: --controlnet-processor-res 32: must be a whole number from 64 to 2048 "
                                       "(canny's resolution: the short side's pixels)"),
    "controlnet_canny_threshold_range": (["a cat", "--controlnet", "{tmp}", "--control-image", "{tmp}/init.png",
                                          "--controlnet-canny-low", "0"], "error: --controlnet-canny-low 0: must be a "
                                         "whole number from 1 to 255 (a canny threshold of the pixels' gradient)"),
    "controlnet_module_unknown": (["a cat", "--controlnet", "{tmp}", "--control-image", "{tmp}/init.png",
                                   "--controlnet-module", "depth"], "argument --controlnet-module: invalid choice: "
                                                                    "'depth' (choose from "),
    "save_control_images_alone": (["a cat", "--save-control-images"], "error: --save-control-images: writes the "
                                  "ControlNets' control images: give --controlnet too"),
    "controlnet_module_alone": (["a cat", "--controlnet-module", "canny", "--controlnet-pixel-perfect"],
                                "error: --controlnet-module canny: is a ControlNet's setting: give --controlnet and "
                                "--control-image too"),
    "strength_range": (["a cat", "--init-image", "{tmp}/init.png", "--strength", "1.5"],
                       "--strength 1.5: must be a number in (0, 1]"),
    "strength_runs_no_step": (["a cat", "--init-image", "{tmp}/init.png", "--strength", "0.1", "--steps", "5"],
                              "--strength 0.1: with --steps 5 runs no step"),
    "steps_run_no_step_at_default_strength": (["a cat", "--init-image", "{tmp}/init.png", "--steps", "1"],
                                              "--steps 1: with img2img's default --strength 0.8 runs no step"),
    "hires_scale_not_above_1": (["a cat", "--hires-scale", "1"], "--hires-scale 1.0: must be a number above 1"),
    "hires_scale_nan": (["a cat", "--hires-scale", "nan"], "--hires-scale nan: must be a number above 1"),
    "hires_steps_range": (["a cat", "--hires-scale", "2", "--hires-steps", "0"],
                          "--hires-steps 0: must be an integer in 1..1000"),
    "hires_strength_range": (["a cat", "--hires-scale", "2", "--hires-strength", "0"],
                             "--hires-strength 0.0: must be a number in (0, 1]"),
    "hires_upscaler_unknown": (["a cat", "--hires-scale", "2", "--hires-upscaler", "esrgan"],
                               "--hires-upscaler esrgan: choose one of latent, lanczos"),
    "hires_runs_no_step": (["a cat", "--hires-scale", "2", "--hires-steps", "2", "--hires-strength", "0.3"],
                           "--hires-strength 0.3: with 2 second-pass steps runs no step"),
    "hires_strength_without_scale": (["a cat", "--hires-strength", "0.5"],
                                     "--hires-strength 0.5: is the Hires fix's: give --hires-scale too"),
    "hires_steps_without_scale": (["a cat", "--hires-steps", "5"], "--hires-steps 5: is the Hires fix's"),
    "hires_with_init_image": (["a cat", "--hires-scale", "2", "--init-image", "{tmp}/init.png"],
                              "--hires-scale 2.0: the Hires fix is text-to-image in two passes: not with --init-image"),
    "hires_with_trajectory": (["a cat", "--hires-scale", "2", "--trajectory"], "the Hires fix makes no trajectory"),
    "hires_prompt_without_scale": (["a cat", "--hires-prompt", "a dog"],
                                   "error: --hires-prompt a dog: is the Hires fix's: give --hires-scale too"),
    "hires_scheduler_option_without_scale": (["a cat", "--hires-scheduler-option", "eta=1"],
                                             "error: --hires-scheduler-option: is the Hires fix's: give --hires-scale"),
    "hires_scheduler_unknown": (["a cat", "--hires-scale", "2", "--hires-scheduler", "heun"],
                                "error: --hires-scheduler heun: choose one of pndm, ddim"),
    "hires_scheduler_option_it_lacks": (["a cat", "--hires-scale", "2", "--hires-scheduler", "ddim",
                                         "--hires-scheduler-option", "use_karras_sigmas=true"],
                                        "error: --hires-scheduler-option: 'ddim' scheduler has no option "
                                        "'use_karras_sigmas'"),
    "hires_scheduler_option_not_key_value": (["a cat", "--hires-scale", "2", "--hires-scheduler-option", "karras"],
                                             "error: --hires-scheduler-option 'karras': expected KEY=VALUE"),
    "hires_and_without_guidance": (["a cat", "--prompt-weighting", "--hires-scale", "2", "--hires-prompt", "a AND b",
                                    "--hires-guidance-scale", "1"],
                                   "error: --hires-guidance-scale 1.0: the Hires fix's second-pass prompt 'a AND b' "
                                   "has AND or a weight"),
    "hires_guidance_nan": (["a cat", "--hires-scale", "2", "--hires-guidance-scale", "nan"],
                           "error: --hires-guidance-scale nan: must be a finite number"),
    "hires_prompt_weight_not_a_number": (["a cat", "--prompt-weighting", "--hires-scale", "2", "--hires-prompt",
                                          "(a dog:1.2.3)"], "error: prompt '(a dog:1.2.3)': "),
    "hires_negative_prompt_weight_not_a_number": (["a cat", "--prompt-weighting", "--hires-scale", "2",
                                                   "--hires-negative-prompt", "(ugly:1.2.3)"],
                                                  "error: --hires-negative-prompt '(ugly:1.2.3)': "),
    "init_image_smaller_than_8": (["a cat", "--init-image", "{tmp}/tiny.png"], "--height 0: must be a positive "
                                  "multiple of 8 (the init image is smaller than 8 pixels"),
    "from_png_missing": (["--from-png", "{tmp}/nope.png"], "error: --from-png {tmp}/nope.png: no such file"),
    "from_png_without_parameters": (["--from-png", "{tmp}/init.png"], "init.png: holds no generation settings"),
    "from_png_other_sampler": (["--from-png", "{tmp}/sde.png"], "sde.png: its sampler 'DPM++ SDE' has no sdjax "
                               "scheduler (sdjax has PLMS, DDIM"),
    "from_png_other_schedule": (["--from-png", "{tmp}/polyexponential.png"], "its schedule type 'Polyexponential' "
                                "has no sdjax equivalent (sdjax has Karras, and Exponential for DPM++ 2M and DPM++ "
                                "2M SDE)"),
    "from_png_exponential_euler": (["--from-png", "{tmp}/exponential.png"], "its sampler 'Euler' with schedule type "
                                   "'Exponential' has no sdjax equivalent"),
    "embedding_missing": (["a cat", "--embedding", "{tmp}/nope.pt"], "error: --embedding {tmp}/nope.pt: no such file"),
    "embedding_folder": (["a cat", "--embedding", "{tmp}"], "--embedding {tmp}: is a folder; give an embedding file"),
    "config_embedding": (["a cat", "--config", "{tmp}/embedding.yaml"], "embedding.yaml: key 'embedding' has item 3; "
                         "expected file names"),
    "prompt_weight_not_a_number": (["a (cat:1.2.3)", "--prompt-weighting"], "error: prompt 'a (cat:1.2.3)': the "
                                   "weight '1.2.3' in ':1.2.3)' is not a number"),
    "negative_prompt_weight_not_a_number": (["a cat", "--negative-prompt", "(dog:.)", "--prompt-weighting"],
                                            "error: --negative-prompt '(dog:.)': the weight '.' in ':.)' is not a "
                                            "number"),
    "prompt_weight_not_a_number_after_an_edit": (["(a:[1.2:1.3.4:2])", "--prompt-weighting"],   # (its step 3 text)
                                                 "error: prompt '(a:1.3.4)': the weight '1.3.4' in ':1.3.4)' is "
                                                 "not a number"),
    "prompt_weight_not_a_number_in_an_and_part": (["a AND (b:[1:1.2.3:1])", "--prompt-weighting"],
                                                   "error: prompt ' (b:1.2.3)': the weight '1.2.3' in ':1.2.3)' is "
                                                   "not a number"),
    "prompt_weight_not_a_number_in_the_hires_pass": (["(a:[1.2:1.3.4:5])", "--prompt-weighting", "--steps", "3",
                                                      "--hires-scale", "1.5", "--hires-steps", "10"],
                                                     "error: prompt '(a:1.3.4)': the weight '1.3.4'"),   # (its step 6)
    "and_without_guidance": (["a cat AND a dog:0.5", "--prompt-weighting", "--guidance-scale", "1"],
                             "error: --guidance-scale 1.0: the prompt 'a cat AND a dog:0.5' has AND or a weight"),
    "lora_tag_without_a_file": (["a dog <lora:style:0.5>"], "error: the prompt names the LoRA <lora:style:0.5>: pass "
                                "--lora-dir DIR (the folder of style.safetensors"),
    "lora_dir_missing": (["a cat", "--lora-dir", "{tmp}/nope"], "error: --lora-dir {tmp}/nope: no such folder"),
    "lora_dir_empty": (["a cat", "--lora-dir", ""], "error: --lora-dir '': is empty: leave the flag out, or give a "
                       "folder"),
    "embedding_dir_empty": (["a cat", "--embedding-dir", ""], "error: --embedding-dir '': is empty: leave the flag "
                            "out, or give a folder"),
    "lora_dir_without_the_file": (["a dog <lora:nosuch:0.5>", "--lora-dir", "{tmp}"], "error: --lora-dir {tmp}: has "
                                  "no nosuch.safetensors, the LoRA <lora:nosuch>"),
    "emphasis_without_weighting": (["a cat", "--emphasis", "none"], "error: --emphasis none: is a setting of "
                                   "AUTOMATIC1111's prompt syntax: it needs --prompt-weighting"),
    "emphasis_unknown": (["a cat", "--prompt-weighting", "--emphasis", "strong"], "error: --emphasis strong: choose "
                         "one of original, no_norm, ignore, none"),
    "seed_resize_from_not_a_size": (["a cat", "--seed-resize-from", "512"],
                                    "error: --seed-resize-from 512: must be WIDTHxHEIGHT in pixels, positive "
                                    "multiples of 8"),
    "seed_resize_from_not_multiple_of_8": (["a cat", "--seed-resize-from", "500x512"],
                                           "error: --seed-resize-from 500x512: must be WIDTHxHEIGHT"),
    "variation_strength_without_seeds": (["a cat", "--variation-strength", "0.2"], "error: --variation-strength 0.2: "
                                         "moves each image's noise toward its variation seed's: give "
                                         "--variation-seeds"),
    "variation_seeds_without_strength": (["a cat", "--variation-seeds", "1-3"], "error: --variation-seeds 1,2,3: need "
                                         "--variation-strength above 0"),
    "variation_strength_past_1": (["a cat", "--variation-seeds", "1", "--variation-strength", "2"],
                                  "error: --variation-strength 2.0: must be a number in [0, 1]"),
    "dtype": (["a cat", "--dtype", "int8"], "unknown dtype"),
    "progress": (["a cat", "--progress", "sometimes"], "invalid choice: 'sometimes'"),
    "config_unknown_key": (["a cat", "--config", "{tmp}/bad.yaml"], "unknown key 'stpes'"),
    "config_bad_value": (["a cat", "--config", "{tmp}/badvalue.yaml"], "key 'steps' has value 'many'"),
    "config_missing": (["a cat", "--config", "{tmp}/none.yaml"], "does not exist"),
    "config_bad_size": (["a cat", "--config", "{tmp}/size.yaml"], "size.yaml: key 'height' has value 30: must be a "
                        "positive multiple of 8"),   # the file and key, not a flag the user did not type
    "config_bad_scheduler": (["a cat", "--config", "{tmp}/scheduler.yaml"], "scheduler.yaml: key 'scheduler' has "
                             "value 'karras': choose one of pndm, ddim"),
    "config_bad_scheduler_option": (["a cat", "--config", "{tmp}/options.yaml"], "options.yaml: key "
                                    "'scheduler_options' has value {{'foo': 1}}: 'pndm' scheduler has no option 'foo'"),
    "flag_bad_scheduler_option_over_config": (["a cat", "--config", "{tmp}/options.yaml", "--scheduler-option",
                                               "steps_offset=1"], "error: --scheduler-option: 'pndm' scheduler"),
    "config_nan_guidance": (["a cat", "--config", "{tmp}/nan.yaml"], "nan.yaml: key 'guidance_scale' has value nan: "
                            "must be a finite number"),   # NaN != NaN: it was blamed on --guidance-scale
    "flag_bad_size_over_config": (["a cat", "--config", "{tmp}/size.yaml", "--height", "100"],
                                  "error: --height 100: must be a positive multiple of 8"),
    "config_of_train_py": (["a cat", "--config", "style"], "config file 'style' does not exist; 'style' is a preset "
                           "of train.py"),
    "config_no_such_preset": (["a cat", "--config", "drafty"], "the presets here are creative, draft, precise, "
                              "quality"),
    "config_empty": (["a cat", "--config", ""], "--config is empty: give a preset name or a YAML file"),
    "config_of_train_py_by_path": (["a cat", "--config", str(ROOT / "configs" / "train" / "style.yaml")],
                                   "style.yaml is a preset of train.py, not of this tool (its presets: creative"),
    "model_empty": (["a cat", "--model", ""], "--model '': is empty"),
    "out_empty": (["a cat", "--out", " "], "--out ' ': is empty"),
    "no_weights": (["a cat", "--model", "{tmp}/no/such/model"], "no such directory"),
    "model_is_another_file": (["a cat", "--model", "{tmp}/empty.txt"], "empty.txt: not a single-file checkpoint "
                              "sdjax reads (expected one of .safetensors, .ckpt"),
    "no_single_file": (["a cat", "--model", "{tmp}/nope.safetensors"], "nope.safetensors: no such checkpoint file"),
    "single_file_variant": (["a cat", "--model", "{tmp}/nope.ckpt", "--variant", "fp16"],
                            "--variant fp16: picks files in a pipeline folder; the single file"),
    "ema_weights_for_a_folder": (["a cat", "--model", "{tmp}", "--ema-weights"],
                                 "--ema-weights: picks the EMA copy in a single-file training checkpoint"),
    "model_config_for_a_folder": (["a cat", "--model", "{tmp}", "--model-config", "{tmp}"],
                                  "--model-config {tmp}: only for a single-file --model"),
    "not_a_pipeline": (["a cat", "--model", "{tmp}"], "scheduler_config.json"),
    "offline_hub": (["a cat", "--model", "no-such-user/no-such-model"], "--local-dir DIR`) and pass DIR instead"),
    "out_is_a_file": (["a cat", "--out", "{tmp}/empty.txt"], "empty.txt is a file, not a folder"),
    "out_under_a_file": (["a cat", "--out", "{tmp}/empty.txt/images"], "empty.txt is a file, not a folder"),
    # /proc passes root's access check, but no folder can be made there: refused before sampling
    "out_cannot_be_made": (["a cat", "--out", "/proc/sdjax-images/a"], "--out /proc/sdjax-images/a: "),
    "unknown_attention": (["a cat"], "SDJAX_ATTENTION='flash': expected auto, xla, cudnn or blocked"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys, cached_loading, monkeypatch):
    from sdjax.models import layers
    if case == "unknown_attention":   # SDJAX_ATTENTION=flash, as read at import
        monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "flash")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.yaml").write_text("steps: 3\nstpes: 4\n")
    (tmp_path / "badvalue.yaml").write_text("steps: many\n")
    (tmp_path / "size.yaml").write_text("height: 30\n")
    (tmp_path / "scheduler.yaml").write_text("scheduler: karras\n")
    (tmp_path / "options.yaml").write_text("scheduler_options: {foo: 1}\n")
    (tmp_path / "nan.yaml").write_text("guidance_scale: .nan\n")
    (tmp_path / "clipskip.yaml").write_text("clip_skip: 0\n")
    (tmp_path / "lora.yaml").write_text("lora: nope.safetensors\n")
    (tmp_path / "init.yaml").write_text("init_image: nope.png\n")
    (tmp_path / "embedding.yaml").write_text("embedding: [a.pt, 3]\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "init.png")
    Image.new("RGB", (16, 4)).save(tmp_path / "tiny.png")
    for name, sampler in (("sde", "DPM++ SDE Karras"), ("exponential", "Euler, Schedule type: Exponential"),
                          ("polyexponential", "DPM++ 2M, Schedule type: Polyexponential")):
        I.save_png(np.zeros((8, 8, 3)), tmp_path / f"{name}.png", f"a cat\nSteps: 20, Sampler: {sampler}, Seed: 1")
    (tmp_path / "style.safetensors").write_bytes(b"")
    (tmp_path / "superscript.yaml").write_text("seeds: \"\u00b2\"\n", encoding="utf-8")
    argv, message = BAD_INPUTS[case]
    message = message.format(tmp=tmp_path)
    out = tmp_path / "out"
    argv = ["--out", str(out)] + [a.format(tmp=tmp_path) for a in argv] + ["--compilation-cache", "none"]
    rc, stdout, stderr = run_main(capsys, *argv)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: ") and message in lines[0], stderr
    assert not out.exists()
    if case.startswith("config_unknown"):
        assert "bad.yaml" in lines[0]


def test_a_hires_scheduler_that_cannot_take_the_first_pass_schedule_exits_2(pipe_dir, tmp_path, capsys):
    """The second pass's scheduler takes the first pass's options it has: one sdjax cannot make with them
    (Euler with Exponential sigmas), or one that cannot begin midway (PNDM with its Runge-Kutta steps), exits
    2 before anything compiles, naming the flags."""
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--scheduler", "dpmpp_2m", "--scheduler-option",
                             "use_exponential_sigmas=true", "--hires-scale", "1.5", "--hires-scheduler", "euler",
                             "--out", out, "--compilation-cache", "none")
    assert rc == 2 and not out.exists()
    assert stderr.strip().splitlines()[-1] == (
        "sample.py: error: --hires-scheduler euler with use_exponential_sigmas=True (the --scheduler-option settings "
        "it takes and --hires-scheduler-option's): use_exponential_sigmas is not supported")
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--scheduler", "pndm", "--scheduler-option",
                             "skip_prk_steps=false", "--steps", "6", "--hires-scale", "1.5", "--out", out,
                             "--compilation-cache", "none")
    assert rc == 2 and not out.exists()
    assert stderr.strip().splitlines()[-1] == (
        "sample.py: error: --hires-scale 1.5: PNDM with Runge-Kutta steps (skip_prk_steps=False) cannot start midway "
        "(the Hires fix's second pass begins its schedule midway, at --hires-strength 0.7): use another "
        "--hires-scheduler")


def test_a_preset_option_the_models_scheduler_refuses_names_the_preset(pipe_dir, pipe, tmp_path, capsys):
    """eta=2 is checked once the model's scheduler config is read: a preset's value is named by
    the file and key there too, not as a flag the user did not type."""
    (tmp_path / "eta.yaml").write_text("scheduler: ddim\nscheduler_options: {eta: 2}\n")
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--config", tmp_path / "eta.yaml", "--out", out)
    assert rc == 2 and stderr.startswith(f"sample.py: error: {tmp_path / 'eta.yaml'}: key 'scheduler_options' has "
                                         "value {'eta': 2}: ddim eta must be"), stderr
    assert not out.exists()


def test_a_missing_vae_and_repeated_seeds(pipe_dir, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--vae", tmp_path / "no-vae", "--out", out)
    assert rc == 2 and f"{tmp_path / 'no-vae'}: no such VAE file or folder (vae= / --vae takes" in stderr, stderr
    assert not out.exists()
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--seeds", "1,1,0-1", "--steps", "1", "--height",
                             "16", "--width", "16", "--out", out)   # main() prints warnings as lines
    assert rc == 0 and len(list(out.glob("*.png"))) == 4
    assert "sample.py: warning: --seeds repeats 1: a repeated seed makes the same image again" in stderr, stderr


def test_steps_the_schedule_cannot_take_exit_2_before_writing(pipe_dir, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--steps", "1000", "--out", out)
    assert rc == 2 and "reaches timestep 1000, past the last training timestep 999" in stderr, stderr
    assert not out.exists()
    # a clip skip past the loaded text encoder's layers (the tiny one has 3): the same, once it is loaded
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--clip-skip", "4", "--out", out)
    assert rc == 2 and stderr.strip().splitlines()[-1] == (
        "sample.py: error: --clip-skip 4: must be an integer in 1..3 (this model's text encoder has 3 layers)"), stderr
    assert not out.exists()

    # img2img with PNDM's Runge-Kutta warm-up (skip_prk_steps=false), which cannot begin midway: the same
    Image.new("RGB", (16, 16)).save(tmp_path / "init.png")
    img2img = ["a cat", "--model", pipe_dir, "--init-image", tmp_path / "init.png", "--steps", "4",
               "--scheduler-option", "skip_prk_steps=false", "--out", out]
    rc, _, stderr = run_main(capsys, *img2img, "--strength", "0.5")
    assert rc == 2 and stderr.strip().splitlines()[-1] == (
        f"sample.py: error: --init-image {tmp_path / 'init.png'}: PNDM with Runge-Kutta steps (skip_prk_steps=False) "
        "cannot start midway (img2img begins the schedule midway at --strength 0.5): use --strength 1 or another "
        "--scheduler"), stderr
    assert not out.exists()
    rc, _, stderr = run_main(capsys, *img2img, "--strength", "1", "--height", "16", "--width", "16")
    assert rc == 0 and len(list(out.glob("*.png"))) == 1, stderr


def test_out_of_device_memory_is_one_line_with_advice(pipe_dir, pipe, tmp_path, capsys, monkeypatch):
    import jax
    import sdjax.cli_utils
    reason = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12884901888 bytes."

    def fails(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(reason)
    monkeypatch.setattr(sdjax.cli_utils, "run_sampling", fails)
    out = tmp_path / "out"
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--out", out)
    assert rc == 1 and stderr == (
        f"sample.py: error: out of device memory ({reason}): make fewer images per compiled call (--batch-size; "
        f"default 4 per device), smaller ones (--height, --width) or use --dtype bfloat16. The images written "
        f"before this are in {out}\n")
    from sdjax.models import layers
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "xla")   # as "auto" on a GPU
    rc, _, stderr = run_main(capsys, "a cat", "--model", pipe_dir, "--out", out)
    assert rc == 1 and stderr == (
        f"sample.py: error: out of device memory ({reason}): make fewer images per compiled call (--batch-size; "
        f"default 4 per device), smaller ones (--height, --width) or use --dtype bfloat16; or keep attention's "
        f"score tensors small with SDJAX_ATTENTION=cudnn (cuDNN's fused kernel, NVIDIA GPUs) or "
        f"SDJAX_ATTENTION=blocked (any device; slower). The images written before this are in {out}\n")


@pytest.mark.parametrize("backend,setting,named", [("cpu", "auto", False), ("gpu", "auto", True), ("tpu", "auto", True),
                                                   ("cpu", "xla", True), ("gpu", "cudnn", False),
                                                   ("gpu", "blocked", False)])
def test_out_of_memory_advice_names_the_attention_kernels_that_keep_no_scores(monkeypatch, backend, setting, named):
    """Where XLA's attention runs (GPU/TPU by default), it holds whole score tensors: the advice then
    names the fused and blocked kernels (training: the fused one); where one already runs, it does not."""
    import jax
    from sdjax.cli_utils import attention_memory_advice
    from sdjax.models import layers
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", setting)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    advice, for_training = attention_memory_advice(), attention_memory_advice(training=True)
    monkeypatch.undo()
    assert ("SDJAX_ATTENTION=cudnn" in advice and "SDJAX_ATTENTION=blocked" in advice) == named, advice
    assert advice == "" or named
    # blocked attention's backward pass keeps every block's probabilities: training is offered cuDNN only
    assert ("SDJAX_ATTENTION=cudnn" in for_training) == (named or setting == "blocked"), for_training
    assert "blocked" not in for_training


def test_an_unwritable_compilation_cache_is_a_warning(tmp_path):
    """The cache only saves time: a folder that cannot be made (here under a file; a read-only home
    on a cluster) leaves it off with a warning, where it crashed sample.py after the input checks."""
    import jax
    from sdjax.cli_utils import enable_compilation_cache
    (tmp_path / "afile").write_text("")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(UserWarning, match=r"compilation cache .*afile/cache: .*; running without it"):
        assert enable_compilation_cache(tmp_path / "afile" / "cache") is None
    assert jax.config.jax_compilation_cache_dir == before
    for off in ("none", "None"):   # --compilation-cache none (both tools): off, and no folder named "none"
        assert enable_compilation_cache(off) is None
    assert jax.config.jax_compilation_cache_dir == before and not Path("none").exists()


def test_a_weights_mismatch_is_one_line_with_its_clauses(pipe_dir, tmp_path, capsys):
    """The strict loader's multi-line error (missing keys, unexpected keys) is one line whose
    clauses stay apart, not run together."""
    import shutil
    model = tmp_path / "mixed"
    shutil.copytree(pipe_dir, model)
    shutil.copy(model / "vae" / "diffusion_pytorch_model.safetensors", model / "unet")   # the VAE's keys
    rc, _, stderr = run_main(capsys, "a cat", "--model", model, "--out", tmp_path / "out",
                             "--compilation-cache", "none")
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert rc == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"sample.py: error: {unet_file}: the checkpoint does not match the model; missing keys (")
    assert "; unexpected keys (" in stderr


# ----------------------------------------------------------------------------- the script itself
def test_sigterm_stops_like_ctrl_c_with_exit_143(pipe_dir, tmp_path):
    """SIGTERM (a job's time limit, kill) while images are being written: one line, exit 143, only
    whole images, and the image-number claim released (it was left behind)."""
    import signal
    out = tmp_path / "out"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "a cat", "--model", str(pipe_dir), "--seeds",
                             "0-999", "--batch-size", "1", "--height", "32", "--width", "32", "--steps", "2",
                             "--out", str(out), "--compilation-cache", "none", "--progress", "none"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.rstrip().splitlines()[-1] == f"sample.py: terminated (SIGTERM); any images written before it are in {out}"
    files = sorted(out.iterdir())
    assert files and all(f.suffix == ".png" and not f.name.startswith(".") for f in files), files
    for f in files:
        Image.open(f).load()
def test_script_subprocess_and_persistent_compilation_cache(pipe_dir, tmp_path):
    """Run twice in fresh processes: the first fills the compilation cache, the second compiles nothing.

    Hits and misses are read from JAX's own compiler log, not from timings: on a tiny model tracing
    dominates the compile figure, so a timing ratio says little and flakes on a loaded CI machine."""
    cache = tmp_path / "cache"
    env = {**os.environ, "SDJAX_CACHE_DIR": str(cache), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_EXPLAIN_CACHE_MISSES": "1", "JAX_LOG_COMPILES": "1"}  # log each persistent-cache miss, hit
    hits, misses = [], []

    def run_sample(run):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "sample.py"), "a photo of a cat", "--model", str(pipe_dir), "--seeds", "1",
             "--height", "32", "--width", "32", "--steps", "3", "--out", str(tmp_path / f"out{run}"),
             "--progress", "batches"],  # JAX caches no program with host callbacks, as a step bar's
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    for run in range(2):
        out = tmp_path / f"out{run}"
        proc = run_sample(run)
        assert re.search(r"^1 image in [\d.]+ s \([\d.]+ images/s, compile [\d.]+ s\)$", proc.stdout, re.M), \
            proc.stdout
        assert sorted(p.name for p in out.iterdir()) == ["00000-seed1-a-photo-of-a-cat.png"]
        hits.append(re.findall(r"Persistent compilation cache hit for '([^']+)'", proc.stderr))
        misses.append(re.findall(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'", proc.stderr))
        if run == 0:
            assert list((cache / "jax").glob("*-cache")), "the persistent compilation cache got no entries"
    assert misses[0] and not hits[0], (hits[0], misses[0])  # a fresh cache: everything compiles
    assert not misses[1], misses[1]  # the second process compiles nothing ...
    assert sorted(hits[1]) == sorted(misses[0])  # ... and loads every program the first one compiled
    np.testing.assert_array_equal(pixels(tmp_path / "out0/00000-seed1-a-photo-of-a-cat.png"),
                                  pixels(tmp_path / "out1/00000-seed1-a-photo-of-a-cat.png"))

    # An entry cut short (a run killed while JAX wrote it in place) is never rewritten by JAX: every run
    # warns and compiles again. The warning then says which files to remove, and removing them heals it.
    [entry] = (cache / "jax").glob("jit_generate-*-cache")
    size = entry.stat().st_size
    entry.write_bytes(entry.read_bytes()[:size // 2])
    stderr = run_sample(2).stderr
    warning = next(line for line in stderr.splitlines() if "persistent compilation cache entry" in line)
    assert warning.startswith("sample.py: warning: Error reading persistent compilation cache entry for "
                              "'jit_generate'"), warning
    glob = warning.split("remove ")[1].split(" and the next run")[0]
    assert glob == str(cache / "jax" / "jit_generate-*-cache"), warning
    assert entry.stat().st_size == size // 2  # JAX left it as it was
    for path in (cache / "jax").glob(Path(glob).name):
        path.unlink()
    stderr = run_sample(3).stderr
    assert "persistent compilation cache entry" not in stderr, stderr[-3000:]
    assert entry.exists()  # written again (removed above; its bytes differ from run to run)


def test_from_png_with_another_scheduler_leaves_out_the_options_it_has_no_use_for(tmp_path):
    """A Karras image varied with --scheduler euler_a (which has no Karras sigmas): the image's option is
    left out with a note, not an error about a flag the user did not give; a scheduler that takes it keeps
    it, and the same option given as a flag is still checked."""
    png = tmp_path / "k.png"
    I.save_png(np.zeros((8, 8, 3)), png, "a fox\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
               "Seed: 1, Size: 64x64")
    req, args = sample.parse_request(["--from-png", str(png), "--scheduler", "euler_a"])
    assert (req.scheduler, req.scheduler_options) == ("euler_a", {})
    assert args.png_notes == ["--from-png: the image's scheduler options use_karras_sigmas=True are left out: the "
                              "euler_a scheduler has none such"]
    req, args = sample.parse_request(["--from-png", str(png), "--scheduler", "euler"])
    assert (req.scheduler, req.scheduler_options, args.png_notes) == ("euler", {"use_karras_sigmas": True}, [])
    with pytest.raises(UsageError, match="use_karras_sigmas"):
        sample.parse_request(["--from-png", str(png), "--scheduler", "euler_a", "--scheduler-option",
                              "use_karras_sigmas=true"])
    # DPM++ 2M SDE's default schedule, Exponential, varied with euler (diffusers' takes the key; sdjax's has none)
    I.save_png(np.zeros((8, 8, 3)), png, "a fox\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: Automatic, "
               "CFG scale: 7, Seed: 1, Size: 64x64, Version: v1.10.1")
    req, args = sample.parse_request(["--from-png", str(png), "--scheduler", "euler"])
    assert (req.scheduler, req.scheduler_options) == ("euler", {})
    assert args.png_notes == ["--from-png: the image's scheduler options use_exponential_sigmas=True are left out: "
                              "the euler scheduler has none such"]
    # another schedule given replaces the image's (use_karras_sigmas and use_exponential_sigmas exclude each other)
    for scheduler in ([], ["--scheduler", "dpmpp_2m"]):
        req, args = sample.parse_request(["--from-png", str(png), *scheduler, "--scheduler-option",
                                          "use_karras_sigmas=true"])
        assert req.scheduler_options == {"use_karras_sigmas": True}
        assert args.png_notes == ["--from-png: the image's scheduler options use_exponential_sigmas=True are left "
                                  "out: --scheduler-option gives another schedule"]


def test_parse_a1111_parameters_reads_as_a1111_does():
    """Whitespace after the settings line is dropped, and a last line of fewer than 3 key: value fields
    is part of the prompt (A1111's parse_generation_parameters), not settings."""
    assert I.parse_a1111_parameters("a fox\nNegative prompt: x\nSteps: 20, Sampler: Euler, Seed: 1\n\n") == \
        {"prompt": "a fox", "negative_prompt": "x", "Steps": "20", "Sampler": "Euler", "Seed": "1"}
    assert I.parse_a1111_parameters("a fox\nstyle: ink, mood: calm") == \
        {"prompt": "a fox\nstyle: ink, mood: calm", "negative_prompt": ""}
    assert I.parse_a1111_parameters("Steps: 20, Sampler: Euler, Seed: 1") == \
        {"prompt": "", "negative_prompt": "", "Steps": "20", "Sampler": "Euler", "Seed": "1"}
