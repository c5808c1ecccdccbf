"""StableDiffusion against diffusers' StableDiffusionPipeline; sharding, determinism, recompilation."""
import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
import torch

import reference as R
from conftest import run_two_processes
from sdjax import parallel
from sdjax.pipeline import StableDiffusion

PROMPTS = ["a photo of the cat", "the red dog in blue"]
NEGATIVES = ["blue", "the cat"]
ROOT = Path(__file__).resolve().parent.parent
SIZE = 32  # tiny VAE downsamples by 2: 16x16 latents
# Calls alike in scheduler, steps, rows (up to 8 images: padded to the 8 devices), latents given or
# not, and guidance on or off run one compiled program; each jit(generate) compile costs ~15 s on a
# 2-core CPU. So tests that need no step count of their own take this one and share them.
STEPS = 10


def diffusers_scheduler(ref, name):
    import diffusers
    cls, opts = {"pndm": ("PNDMScheduler", {}), "ddim": ("DDIMScheduler", {}),
                 "euler": ("EulerDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
                 "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
                 "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})}[name]
    # From the checkpoint's config, not the last test's scheduler (its options, e.g. Karras sigmas, would leak).
    return getattr(diffusers, cls).from_config(ref.checkpoint_scheduler_config, **opts)


def latents_for(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


@contextlib.contextmanager
def generate_calls(pipe):
    """The (args, kwargs) of every compiled-sampler call ``pipe`` makes inside the block (the
    ControlNet's sampler's too, where one is loaded)."""
    calls = []
    originals = {name: getattr(pipe, name) for name in ("_generate", "_controlled") if getattr(pipe, name)}
    for name, original in originals.items():
        setattr(pipe, name, lambda *a, _original=original, **k: calls.append((a, k)) or _original(*a, **k))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(pipe, name, original)


SCHEDULER_CASES = [(name, steps) for name in ["pndm", "ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "lms"]
                   for steps in (STEPS, 50)]


@pytest.mark.parametrize("name,steps", [
    # 50 steps: PNDM's 51 model calls in the default suite, the other schedulers in the slow one.
    pytest.param(n, s, marks=[pytest.mark.slow] if s == 50 and n != "pndm" else []) for n, s in SCHEDULER_CASES])
def test_matches_diffusers_pipeline(pipe, reference_pipe, name, steps):
    """Same latents -> the same images as diffusers, with and without negative prompts."""
    reference_pipe.scheduler = diffusers_scheduler(reference_pipe, name)
    scheduler, options = ("dpmpp_2m", {"use_karras_sigmas": True}) if name == "dpmpp_2m_karras" else (name, {})
    latents = latents_for(2)
    for negatives in (None, NEGATIVES):
        ours = pipe(PROMPTS, negative_prompts=negatives, num_inference_steps=steps, height=SIZE, width=SIZE,
                    scheduler=scheduler, scheduler_options=options, latents=latents).images
        ref = reference_pipe(PROMPTS, negative_prompt=negatives, num_inference_steps=steps, height=SIZE, width=SIZE,
                             latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="np").images
        assert ours.shape == ref.shape == (2, SIZE, SIZE, 3)
        assert ref.std() > 0.01  # a real image, not a flat one
        assert np.abs(ours - ref).max() <= 2e-5, (name, steps, negatives)


def test_an_sd2_style_folder_matches_diffusers(tmp_path):
    """A pipeline folder made as SD 2.x's are (diffusers' layout): a v-prediction scheduler, a UNet with
    linear projections, a head dimension a block and fp32 attention scores (upcast_attention), a text
    encoder with exact GELU and a tokenizer that pads with "!" (not its end token): sdjax's images are
    diffusers' from the same noise (Euler, whose v-prediction step works in sigma space; the schedulers'
    v-prediction steps are tests/test_schedulers.py's)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = R.perturb_(UNet2DConditionModel(**{**R.TINY_UNET, "use_linear_projection": True,
                                              "attention_head_dim": (2, 4), "upcast_attention": True}), 1)
    clip = R.perturb_(CLIPTextModel(CLIPTextConfig(**{**R.TINY_CLIP, "hidden_act": "gelu"})), 2)
    tokenizer = CLIPTokenizer.from_pretrained(R.write_tiny_tokenizer(tmp_path / "tok"), pad_token="!")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    StableDiffusionPipeline(vae=R.perturb_(AutoencoderKL(**R.TINY_VAE), 3), text_encoder=clip, tokenizer=tokenizer,
                            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd2")
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "sd2")
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusion.from_pretrained(tmp_path / "sd2")
    assert ours.scheduler_config["prediction_type"] == "v_prediction"
    ids = ours.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[-1] == tokenizer.convert_tokens_to_ids("!") != tokenizer.eos_token_id
    latents = latents_for(2)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)   # (the folder's: every key written)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=5, height=SIZE, width=SIZE,
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="np").images
    got = ours(PROMPTS, negative_prompts=NEGATIVES, num_inference_steps=5, height=SIZE, width=SIZE, scheduler="euler",
               latents=latents).images
    assert want.std() > 0.01 and np.abs(got - want).max() <= 2e-5


def test_img2img_matches_diffusers_img2img_pipeline(pipe, reference_pipe, monkeypatch):
    """init_images + strength make diffusers' StableDiffusionImg2ImgPipeline's images from the same
    init image and noise: encoded, the posterior drawn with the seeds' posterior_keys (given to
    diffusers as its draw), noised at the strength's start and denoised from there (euler: in sigma
    space, where a stray init_noise_sigma would show). The step bar counts only the steps run; one
    image for every seed (encoded once) is that image given once per seed."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img
    from sdjax.sampling import image_keys, posterior_keys
    ref = StableDiffusionImg2ImgPipeline(**reference_pipe.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(reference_pipe, "euler")
    rng = np.random.default_rng(5)
    init = rng.uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    noise, seeds = latents_for(2, seed=6), [3, 4]
    draws = jax.vmap(lambda k: jax.random.normal(k, (SIZE // 2, SIZE // 2, 4)))(posterior_keys(image_keys(seeds)))
    nchw = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())  # noqa: E731
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: nchw(noise))
    monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mean + out.latent_dist.std * nchw(draws))

    class Bar:
        n = 0

        def update(self, k):
            self.n += k
    bar = Bar()
    ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, scheduler="euler",
                latents=noise, init_images=init, strength=0.6, progress=bar).images
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init, 2, axis=0), strength=0.6,
               num_inference_steps=STEPS, output_type="np").images
    assert bar.n == 6   # int(10 * 0.6) steps
    assert ours.shape == want.shape == (2, SIZE, SIZE, 3) and want.std() > 0.01
    assert np.abs(ours - want).max() <= 2e-5
    each = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, scheduler="euler",
                latents=noise, init_images=np.repeat(init, 2, axis=0), strength=0.6, return_intermediates=[STEPS - 1])
    assert np.abs(each.images - ours).max() <= 1e-6
    assert np.abs(each.intermediates[0] - ours).max() <= 1e-5   # euler's last step lands on its prediction
    # what the patches stand in for: without the seeds' posterior draws the images differ
    monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mean)
    mean_only = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init, 2, axis=0), strength=0.6,
                    num_inference_steps=STEPS, output_type="np").images
    assert np.abs(ours - mean_only).max() > 1e-2


def test_img2img_arguments_are_checked_before_anything_runs(pipe):
    """Bad init images or strengths are errors naming them, raised by the call (nothing compiled)."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    kw = dict(num_inference_steps=STEPS)
    with generate_calls(pipe) as calls:
        for bad, message in [
                (dict(strength=0.5), "strength=0.5 is img2img's: it needs init_images"),
                (dict(init_images=image, height=SIZE + 8), f"height={SIZE + 8} but init_images are {SIZE}x{SIZE}"),
                (dict(init_images=image[:, :-4]), f"init_images are {SIZE - 4}x{SIZE} .* multiple of 8"),
                (dict(init_images=image.transpose(2, 0, 1)[None]), r"NHWC"),
                (dict(init_images=image.astype(np.float32) + 2), r"must be in \[0, 1\], got values in 2..2"),
                (dict(init_images=image.astype(np.int64)), "dtype int64"),
                (dict(init_images=[image, image[:8, :8]]), "differ in size"),
                (dict(init_images=np.stack([image] * 3), seeds=[0, 1]),
                 r"seeds has 2 entries; expected 1 or 3 to match init_images \(3 entries\)"),
                (dict(init_images=image, strength=0.05), "denoises no step"),
                (dict(init_images=image, strength=1.5), r"strength must be a number in \(0, 1\]"),
                (dict(init_images=image, scheduler_options={"skip_prk_steps": False}), "cannot start midway")]:
            with pytest.raises((ValueError, TypeError, NotImplementedError), match=message):
                pipe("a cat", **kw, **bad)
    assert calls == []


def test_clip_skip_two_matches_diffusers_clip_skip_one(pipe, reference_pipe, monkeypatch):
    """clip_skip=2 (A1111's numbering: the penultimate layer) is diffusers' clip_skip=1, on the same
    latents. diffusers applies its clip_skip to the prompt alone; sdjax, as A1111, to the negative
    prompt too: diffusers is given the negative prompts' states from its own encode_prompt(clip_skip=1)."""
    encoder = reference_pipe.text_encoder
    if not hasattr(encoder, "text_model"):   # transformers 5's CLIPTextModel is flat; diffusers' clip_skip reads
        import types                           # text_encoder.text_model.final_layer_norm
        monkeypatch.setattr(encoder, "text_model", types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm),
                            raising=False)
    reference_pipe.scheduler = diffusers_scheduler(reference_pipe, "ddim")
    latents = latents_for(2, seed=4)
    kw = dict(num_inference_steps=5, height=SIZE, width=SIZE)
    ours = pipe(PROMPTS, negative_prompts=NEGATIVES, scheduler="ddim", latents=latents, clip_skip=2, **kw).images
    with torch.no_grad():
        negative_states, _ = reference_pipe.encode_prompt(NEGATIVES, "cpu", 1, False, clip_skip=1)
    ref = reference_pipe(PROMPTS, negative_prompt_embeds=negative_states, clip_skip=1, output_type="np",
                         latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), **kw).images
    assert ours.shape == ref.shape == (2, SIZE, SIZE, 3) and ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 2e-5
    default = pipe(PROMPTS, negative_prompts=NEGATIVES, scheduler="ddim", latents=latents, **kw).images
    assert np.abs(default - ref).max() > 1e-2   # the skipped layer is what makes them agree


def test_clip_skip_one_is_the_default_program_and_images(pipe):
    """clip_skip=1 is today's sampler: the same compiled program as a call of generate without the
    argument, and the same images, bit for bit; clip_skip=2 is a program of its own."""
    kw = dict(seeds=[1, 2], num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler="ddim")
    with generate_calls(pipe) as calls:
        default = pipe("the cat", **kw).images
        one = pipe("the cat", clip_skip=1, **kw).images
    np.testing.assert_array_equal(one, default)
    (args, kwargs), (args_one, kwargs_one) = calls
    assert kwargs["clip_skip"] == kwargs_one["clip_skip"] == 1
    without = {k: v for k, v in kwargs.items() if k != "clip_skip"}
    assert pipe._generate.lower(*args, **without).as_text() == pipe._generate.lower(*args, **kwargs).as_text()
    compiled = pipe._generate._cache_size()
    pipe("the cat", clip_skip=np.int64(1), **kw)   # a numpy integer: the same static value
    assert pipe._generate._cache_size() == compiled


def test_outdated_scheduler_config_is_corrected_as_in_diffusers(tiny_pipeline_dir, tmp_path):
    """A DDIM config from an old training script (steps_offset 0, clip_sample true): diffusers'
    pipeline corrects both (offset 1, no clipping of the predicted x0), and so does sdjax, saying so."""
    import shutil
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    model = tmp_path / "old-ddim"
    shutil.copytree(tiny_pipeline_dir, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": "DDIMScheduler", "steps_offset": 0,
                                       "clip_sample": True}))
    with pytest.warns(FutureWarning):   # diffusers' deprecation notices
        ref = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)   # model_index.json names PNDMScheduler
    ref.set_progress_bar_config(disable=True)
    latents = latents_for(2, seed=5) * 3   # far enough from 0 that clipping x0 to [-1, 1] would show
    theirs = ref(PROMPTS, num_inference_steps=5, height=SIZE, width=SIZE, output_type="np",
                 latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
    ours_pipe = StableDiffusion.from_pretrained(model)
    with pytest.warns(UserWarning, match=r"corrected as diffusers' StableDiffusionPipeline does: steps_offset=0 -> 1, "
                                         r"clip_sample=True -> False"):
        ours = ours_pipe(PROMPTS, num_inference_steps=5, height=SIZE, width=SIZE, scheduler="ddim",
                         latents=latents).images
    uncorrected = ours_pipe(PROMPTS, num_inference_steps=5, height=SIZE, width=SIZE, scheduler="ddim",
                            scheduler_options=dict(steps_offset=0, clip_sample=True), latents=latents).images
    assert np.abs(ours - theirs).max() <= 2e-5
    assert np.abs(uncorrected - theirs).max() > 1e-2   # the correction is what makes them agree


def test_guidance_one_skips_unconditional_pass(pipe, reference_pipe):
    reference_pipe.scheduler = diffusers_scheduler(reference_pipe, "ddim")
    latents = latents_for(2, seed=3)
    with generate_calls(pipe) as calls:
        ours = pipe(PROMPTS, guidance_scale=1.0, num_inference_steps=5, height=SIZE, width=SIZE, scheduler="ddim",
                    latents=latents).images
    # At g = 1 eps_u + g (eps_c - eps_u) is eps_c, so the image cannot show whether the unconditional
    # pass ran: the program can. Its UNet sees the 8 rows (2 images padded to 8 devices), not 16.
    (args, kwargs), = calls
    program = pipe._generate.lower(*args, **kwargs).as_text()
    assert "tensor<8x16x16x32xf32>" in program and "tensor<16x16x16x32xf32>" not in program
    ref = reference_pipe(PROMPTS, guidance_scale=1.0, num_inference_steps=5, height=SIZE, width=SIZE,
                         latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="np").images
    assert np.abs(ours - ref).max() <= 2e-5


@pytest.mark.parametrize("scheduler", ["euler_a", "ddpm", "pndm"])
def test_seed_determines_image(pipe, scheduler):
    """Same seed + prompt + settings = same image; another seed = another image (stochastic
    schedulers included: their per-step noise comes from the image's own key)."""
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler=scheduler)
    a = pipe("the cat", seeds=[7, 8], **kw).images
    b = pipe(["the cat"] * 3, seeds=[8, 7, 9], **kw).images
    np.testing.assert_allclose(a[0], b[1], atol=1e-5)
    np.testing.assert_allclose(a[1], b[0], atol=1e-5)
    assert np.abs(a[0] - a[1]).max() > 1e-2


def test_batch_split_over_devices_equals_one_device(pipe, tiny_pipeline_dir):
    """16 seeds on 8 devices == each seed alone on 1 device, and the work really is split."""
    assert len(jax.devices()) == 8
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, scheduler="euler_a")
    with generate_calls(pipe) as calls:
        together = pipe("the cat", seeds=list(range(16)), batch_size=16, **kw).images
    (args, kwargs), = calls
    compiled = pipe._generate.lower(*args, **kwargs).compile()
    hlo = compiled.as_text()
    # Per-device programs see 2 seeds (16 / 8) and 4 UNet rows (2 images x [uncond, cond]).
    assert "u32[2]" in hlo and "u32[16]" not in hlo
    assert "f32[4,16,16,32]" in hlo and "f32[32,16,16,32]" not in hlo
    out_sharding = compiled.output_shardings[0]
    assert out_sharding.shard_shape((16, SIZE, SIZE, 3))[0] == 2

    single = StableDiffusion.from_pretrained(tiny_pipeline_dir, mesh=parallel.data_mesh(jax.devices()[:1]))
    for seed in (0, 5, 11, 15):
        alone = single("the cat", seeds=seed, **kw).images[0]
        np.testing.assert_allclose(together[seed], alone, atol=1e-4)


def test_sharding_helpers_say_what_is_wrong():
    mesh = parallel.data_mesh()                       # 8 devices
    x = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    padded = parallel.pad_batch(x, parallel.padded_size(5, mesh))
    assert padded.shape == (8, 2) and (padded[5:] == x[-1]).all()
    sharded = parallel.shard_batch(padded, mesh)
    assert sharded.sharding.shard_shape(sharded.shape) == (1, 2)
    with pytest.raises(ValueError, match=r"a batch of 5 \(axis 0 of shape \(5, 2\)\) does not split over 8 devices: "
                                         r"pad it first"):
        parallel.shard_batch(x, mesh)
    with pytest.raises(ValueError, match=r"batch axis 2 is not an axis of an array of shape \(8, 2\)"):
        parallel.shard_batch(padded, mesh, axis=2)
    with pytest.raises(ValueError, match=r"batch axis 0 is not an axis of an array of shape \(\)"):
        parallel.shard_batch(np.float32(1), mesh)
    for bad in (np.zeros((0, 2)), np.zeros((9, 2)), np.float32(1)):
        with pytest.raises(ValueError, match="cannot be padded to 8 rows"):
            parallel.pad_batch(bad, 8)
    # typed PRNG keys (sampling.image_keys), which numpy cannot hold, pad and split as well
    from sdjax.sampling import image_keys
    keys = parallel.pad_batch(image_keys(jnp.arange(6, dtype=jnp.uint32)), 8)
    split_keys = parallel.shard_batch(keys, mesh)
    assert split_keys.sharding.shard_shape(split_keys.shape) == (1,)
    np.testing.assert_array_equal(jax.random.key_data(split_keys),
                                  jax.random.key_data(image_keys(jnp.array([0, 1, 2, 3, 4, 5, 5, 5], jnp.uint32))))
    assert parallel.replicate(sharded, mesh) is not sharded                  # split -> copied whole
    whole = parallel.replicate(jnp.ones(3), mesh)
    assert parallel.replicate(whole, mesh) is whole                          # already whole: no copy


def test_a_mesh_of_your_own_splits_the_batch_over_its_data_axis(pipe, tiny_pipeline_dir):
    """A (data=4, model=2) mesh: batches split 4 ways (a batch of 4 is not padded to 8), the images
    are those of the default mesh. A mesh without a "data" axis is refused when the pipeline is
    built, and training, which splits over every device, refuses a mesh with other axes."""
    from jax.sharding import Mesh
    from sdjax.training.loop import TrainConfig, Trainer
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    assert parallel.data_size(mesh) == 4 and parallel.padded_size(4, mesh) == 4 and parallel.padded_size(5, mesh) == 8
    x = parallel.shard_batch(np.zeros((4, 3), np.float32), mesh)
    assert x.sharding.shard_shape(x.shape) == (1, 3)
    own = StableDiffusion.from_pretrained(tiny_pipeline_dir, mesh=mesh)
    kw = dict(seeds=[0, 1, 2, 3], num_inference_steps=STEPS, height=SIZE, width=SIZE)   # pipe's: as uneven batches'
    with generate_calls(own) as calls:
        images = own("the cat", **kw).images
    (args, _), = calls
    assert args[2].shape == (4, 77)                                  # ids: 4 images, not 8
    np.testing.assert_allclose(images, pipe("the cat", **kw).images, atol=1e-5)
    with pytest.raises(ValueError, match=r"sdjax splits the batch over a mesh axis named 'data'; this mesh has axes "
                                         r"\('dp',\)"):
        StableDiffusion.from_pretrained(tiny_pipeline_dir, mesh=Mesh(np.asarray(jax.devices()), ("dp",)))
    with pytest.raises(ValueError, match=r"training splits each batch over every device of its mesh, and this one "
                                         r"has axes \{'data': 4, 'model': 2\}"):
        Trainer.create(TrainConfig(model=str(tiny_pipeline_dir), train_data="unused"), mesh=mesh)


def test_uneven_batches_are_padded_and_trimmed(pipe):
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    out = pipe(["the cat"] * 3, seeds=[1, 2, 3], **kw)  # one call: 3 rows padded to the 8 devices
    assert out.images.shape == (3, SIZE, SIZE, 3) and out.seeds == [1, 2, 3]
    with generate_calls(pipe) as calls:
        chunked = pipe("the cat", seeds=list(range(1, 21)), batch_size=16, **kw)  # 16 rows, then 4 padded to 16
    # args[4]: the call's seeds (after state, scheduler, ids, negative ids). The short last batch takes the
    # first one's shape: one compiled program.
    assert [args[4].shape for args, _ in calls] == [(16,), (16,)]
    assert chunked.images.shape == (20, SIZE, SIZE, 3)
    np.testing.assert_allclose(chunked.images[:3], out.images, atol=1e-5)
    np.testing.assert_allclose(chunked.images[16:], pipe("the cat", seeds=[17, 18, 19, 20], **kw).images, atol=1e-5)
    with generate_calls(pipe) as calls:  # fewer images than batch_size: padded to the 8 devices only
        small = pipe("the cat", seeds=[1, 2, 3], batch_size=16, **kw)
    assert [args[4].shape for args, _ in calls] == [(8,)]
    np.testing.assert_allclose(small.images, out.images, atol=1e-5)



def test_batches_hand_over_each_batch_with_the_next_one_already_dispatched(pipe):
    """pipe.batches: pipe()'s images one batch at a time, each with its prompts, seeds and
    intermediates; batch k + 1 is on the devices before batch k is handed over (so they work while
    the caller writes files). A bad argument raises at the call, before anything runs; an
    iterator closed early lets other threads use the pipeline."""
    import threading
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, batch_size=8, return_intermediates=2)
    prompts, seeds = [f"a cat, number {i}" for i in range(20)], list(range(20))
    whole = pipe(prompts, seeds=seeds, **kw)
    with generate_calls(pipe) as calls:
        batches = pipe.batches(prompts, seeds=seeds, **kw)
        assert not calls
        outputs, dispatched = [], []
        for out in batches:
            outputs.append(out)
            dispatched.append(len(calls))
    assert dispatched == [2, 3, 3]
    assert [o.seeds for o in outputs] == [seeds[:8], seeds[8:16], seeds[16:]]
    assert [o.prompts for o in outputs] == [prompts[:8], prompts[8:16], prompts[16:]]
    assert all(o.intermediate_steps == whole.intermediate_steps for o in outputs)
    np.testing.assert_array_equal(np.concatenate([o.images for o in outputs]), whole.images)
    np.testing.assert_array_equal(np.concatenate([o.intermediates for o in outputs], axis=1), whole.intermediates)

    with generate_calls(pipe) as calls:
        with pytest.raises(ValueError, match="seed -1 is not an integer"):
            pipe.batches("a cat", seeds=[1, -1])
    assert not calls
    batches = pipe.batches(prompts, seeds=seeds, **kw)
    next(batches)
    batches.close()
    other = threading.Thread(target=lambda: pipe("a dog", seeds=[0], **kw))
    other.start()
    other.join(timeout=120)
    assert not other.is_alive()


def test_a_call_does_not_hash_the_model_graphs(pipe, monkeypatch):
    """The compiled sampler has the models' graphdefs bound in: as a static argument, jit would hash
    all three at every call (7.8 ms for SD v1.5's on a 2-core CPU, ~1% of a GPU's image at batch 1)."""
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, return_intermediates=1)
    pipe("the cat", seeds=[0], **kw)   # compiled (the sampler and the intermediates' decode)
    graphdef_class = type(pipe.graphdefs.unet)
    hashed = []
    original = graphdef_class.__hash__
    monkeypatch.setattr(graphdef_class, "__hash__", lambda self: hashed.append(self) or original(self))
    pipe("the dog", seeds=[1], **kw)
    assert not hashed


class CountingBar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def test_step_progress_counts_every_model_call_and_compiles_once(pipe):
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, batch_size=8)
    seeds = list(range(1, 11))  # two calls of 8 rows, as in the test above
    plain = pipe("the cat", seeds=seeds, **kw)
    calls = pipe.make_scheduler("pndm", STEPS).num_model_calls
    bar = CountingBar()
    with generate_calls(pipe) as programs:
        ticked = pipe("the cat", seeds=seeds, progress=bar, **kw)
    assert bar.n == 2 * calls
    # one host callback, on the replicated loop index: no cross-device traffic on the 8-device mesh
    (args, kwargs), _ = programs
    hlo = pipe._generate.lower(*args, **kwargs).compile().as_text()
    assert hlo.count("custom-call") == 1
    assert not [op for op in ("all-reduce", "all-gather", "collective-permute", "all-to-all") if op in hlo]
    np.testing.assert_array_equal(ticked.images, plain.images)  # the callback changes nothing computed
    compiled = pipe._generate._cache_size()
    other = CountingBar()  # a new bar, the same compiled program
    pipe("the red dog", seeds=[4], progress=other, **kw)
    assert other.n == calls and pipe._generate._cache_size() == compiled
    batches = pipe("the cat", seeds=seeds, progress="batches", **kw)  # no callback: the plain program again
    np.testing.assert_array_equal(batches.images, plain.images)
    assert pipe._generate._cache_size() == compiled


def test_calls_from_two_threads_take_turns_and_each_bar_counts_its_own_steps(pipe):
    """Each call's step bar counts that call's model calls only (one shared ticker used to send both
    calls' steps to the bar set last, and the first to finish cut the other's off)."""
    import threading
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, batch_size=8, progress=None)
    calls = pipe.make_scheduler("pndm", STEPS).num_model_calls
    bars, outputs, start = [CountingBar(), CountingBar()], [None, None], threading.Barrier(2)

    def sample(i):
        start.wait()
        outputs[i] = pipe("the cat", seeds=list(range(8 * (i + 1))), **{**kw, "progress": bars[i]})
    threads = [threading.Thread(target=sample, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [bar.n for bar in bars] == [calls, 2 * calls]
    np.testing.assert_array_equal(outputs[1].images[:8], outputs[0].images)


def test_latents_batch_broadcasts_and_unordered_or_missing_arguments_are_refused(pipe):
    """Four initial noises with one prompt make four images (the prompt broadcasts as it does over
    seeds); a set of prompts (no order to pair them with seeds by) and seeds=None are TypeErrors;
    intermediate steps come back sorted, once each."""
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler="ddim")
    seeded = pipe("the cat", seeds=[1, 2], latents=latents_for(2, 0), **kw)
    broadcast = pipe("the cat", latents=latents_for(2, 0), return_intermediates=[2, 0, 2], **kw)
    assert broadcast.images.shape[0] == 2 and broadcast.intermediate_steps == [0, 2]
    np.testing.assert_allclose(broadcast.images, seeded.images, atol=1e-6)   # ddim: the seeds draw nothing here
    # one initial noise for every prompt, as one prompt's noise broadcasts over many seeds
    shared = pipe(["the cat", "a dog"], latents=latents_for(1, 0), **kw)
    each = pipe(["the cat", "a dog"], latents=np.repeat(latents_for(1, 0), 2, axis=0), **kw)
    assert shared.images.shape[0] == 2
    np.testing.assert_array_equal(shared.images, each.images)
    with pytest.raises(ValueError, match=r"prompts has 2 entries; expected 1 or 3 to match latents \(3 entries\)"):
        pipe(["the cat", "a dog"], latents=latents_for(3, 0), **kw)
    with pytest.raises(TypeError, match=r"prompts must be a string or a list of strings, got a set \(use a list"):
        pipe({"the cat", "the dog"}, **kw)
    with pytest.raises(TypeError, match="seeds is required: an integer, a list of integers"):
        pipe("the cat", seeds=None, **kw)
    with pytest.raises(ValueError, match=rf"latents have shape \({SIZE // 2}, {SIZE // 2}, 4\); expected "
                                         rf"\(1, {SIZE // 2}, {SIZE // 2}, 4\)"):   # no batch axis: not H as batch
        pipe("the cat", latents=latents_for(1, 0)[0], **kw)


def test_no_recompilation_for_new_prompts_seeds_guidance_latents(pipe):
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler="ddim")
    pipe("the cat", seeds=[1, 2], latents=latents_for(2, 0), **kw)
    before = pipe._generate._cache_size()
    pipe("the red dog", negative_prompts="blue", seeds=[5, 9], guidance_scale=4.0, latents=latents_for(2, 1), **kw)
    pipe(["a photo of the cat", "blue"], seeds=[3, 4], guidance_scale=11.0, latents=latents_for(2, 2), **kw)
    assert pipe._generate._cache_size() == before


def test_vary_noise_is_a1111s_slerp():
    """vary_noise is AUTOMATIC1111's rng.slerp(strength, noise, variation) on each image's noise [C, h, w]
    (transcribed in torch below from its rng.py): normalised along h, a great-circle step per column and
    channel, and its linear blend, with its weights as they are, where the two are that close."""
    from sdjax.sampling import vary_noise

    def a1111_slerp(val, low, high):
        low_norm = low / torch.norm(low, dim=1, keepdim=True)
        high_norm = high / torch.norm(high, dim=1, keepdim=True)
        dot = (low_norm * high_norm).sum(1)
        if dot.mean() > 0.9995:
            return low * val + high * (1 - val)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        return ((torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low
                + (torch.sin(val * omega) / so).unsqueeze(1) * high)

    rng = np.random.default_rng(0)
    noise, variation = rng.standard_normal((2, 3, 8, 6, 4)).astype(np.float32)   # [B, h, w, C] each
    variation[2] = noise[2] + 1e-3 * variation[2]   # image 2: close enough for the linear blend
    for strength in (0.0, 0.25, 1.0):
        got = np.asarray(vary_noise(noise, variation, strength))
        want = np.stack([a1111_slerp(strength, *(torch.from_numpy(x.transpose(2, 0, 1)) for x in (n, v))).numpy()
                         .transpose(1, 2, 0) for n, v in zip(noise, variation)])
        assert np.abs(got - want).max() < 1e-5, strength
    np.testing.assert_allclose(np.asarray(vary_noise(noise, variation, 1.0))[:2], variation[:2], atol=1e-6)
    blend = noise[2] * 0.25 + variation[2] * 0.75   # (A1111's weights: the variation's is 1 - strength here)
    np.testing.assert_allclose(np.asarray(vary_noise(noise, variation, 0.25))[2], blend, atol=1e-6)


def test_variation_seeds_move_the_noise_toward_theirs(pipe):
    """variation_seeds with variation_strength 1 make the variation seed's own image (the noise is its
    noise; PNDM draws no more), 0 passes no inputs (the program of before); between, each image differs
    from its seed's. The strength is an input: another compiles nothing."""
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    plain = pipe("a cat", seeds=[7, 9], **kw).images
    ones = pipe("a cat", seeds=7, variation_seeds=[9, 7], variation_strength=1.0, **kw).images
    np.testing.assert_allclose(ones, plain[::-1], atol=2e-5)
    before = pipe._generate._cache_size()
    some = pipe("a cat", seeds=7, variation_seeds=[9, 7], variation_strength=0.2, **kw).images
    assert pipe._generate._cache_size() == before
    assert np.abs(some[0] - plain[0]).max() > 1e-2 and np.abs(some[1] - plain[0]).max() < 1e-5
    with generate_calls(pipe) as calls:
        pipe("a cat", seeds=7, variation_seeds=9, variation_strength=0.0, **kw)
    assert not {"variation_seeds_B", "variation_strength"} & set(calls[0][1])
    # the trajectory's first frame is the noise the image starts from: the varied one
    from sdjax.trajectory import noise_images
    np.testing.assert_allclose(noise_images(pipe, [7], SIZE, SIZE, variation_seeds=[9], variation_strength=1.0),
                               noise_images(pipe, [9], SIZE, SIZE), atol=1e-6)
    assert np.abs(noise_images(pipe, [7], SIZE, SIZE, variation_seeds=[9], variation_strength=0.2)
                  - noise_images(pipe, [7], SIZE, SIZE)).max() > 1e-2


def test_seed_resize_lays_the_noise_as_a1111(pipe):
    """seed_noise(..., resize_from_hw) is AUTOMATIC1111's "Seed resize from" (its create_random_tensors,
    transcribed below on [C, h, w]): the seed's (and variation seed's) noise drawn at the source size,
    its part that fits laid over the middle of the seed's own noise at the target size, larger or smaller,
    each side on its own, odd differences as A1111 floors them. The pipeline draws its noise so (its
    images are those of these latents); a source of the images' own size passes nothing (the program of
    before)."""
    from sdjax.sampling import image_keys, initial_noise, seed_noise, vary_noise

    def a1111_placed(noise, x):   # noise: the source size's; x: the seed's own at the target size
        x = x.copy()
        dx, dy = (x.shape[2] - noise.shape[2]) // 2, (x.shape[1] - noise.shape[1]) // 2
        w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
        h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
        tx, ty = (0 if dx < 0 else dx), (0 if dy < 0 else dy)
        dx, dy = max(-dx, 0), max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
        return x

    keys = image_keys(np.array([3, 8], np.uint32))
    for target, source in [((10, 12), (6, 8)), ((9, 12), (6, 5)), ((6, 8), (10, 12)), ((5, 7), (8, 10)),
                           ((10, 6), (7, 9))]:
        for variation in (None, np.array([5, 6], np.uint32)):
            got = np.asarray(seed_noise(keys, (*target, 4), variation, 0.3, resize_from_hw=source))
            small = initial_noise(keys, (*source, 4))
            if variation is not None:
                small = vary_noise(small, initial_noise(image_keys(variation), (*source, 4)), 0.3)
            own = np.asarray(initial_noise(keys, (*target, 4)))
            want = np.stack([a1111_placed(n.transpose(2, 0, 1), x.transpose(2, 0, 1)).transpose(1, 2, 0)
                             for n, x in zip(np.asarray(small), own)])
            np.testing.assert_array_equal(got, want)
            assert not np.array_equal(got, own)   # (the source's noise shows)
    kw = dict(num_inference_steps=3, height=SIZE + 8, width=SIZE, scheduler="euler")
    latents = seed_noise(image_keys(np.array([7], np.uint32)), ((SIZE + 8) // 2, SIZE // 2, 4),
                         resize_from_hw=(SIZE // 2, SIZE // 2))
    resized = pipe("a cat", seeds=7, seed_resize_from=(SIZE, SIZE), **kw).images
    np.testing.assert_allclose(resized, pipe("a cat", seeds=7, latents=np.asarray(latents), **kw).images, atol=1e-5)
    with generate_calls(pipe) as calls:
        pipe("a cat", seeds=7, seed_resize_from=(SIZE + 8, SIZE), **kw)
    assert "seed_resize_from_hw" not in calls[0][1]
    for bad in [(SIZE, SIZE + 1), (0, SIZE), SIZE, (SIZE, 8.0)]:
        with pytest.raises(ValueError, match="seed_resize_from=.*: must be \\(height, width\\) in pixels"):
            pipe("a cat", seeds=7, seed_resize_from=bad, **kw)
    with pytest.raises(ValueError, match="seed_resize_from draws the seeds' noise at another size: not with latents"):
        pipe("a cat", seeds=7, seed_resize_from=(SIZE, SIZE), latents=np.asarray(latents), **kw)


def test_intermediates_resolve_toward_the_image(pipe):
    out = pipe("the cat", seeds=3, num_inference_steps=10, height=SIZE, width=SIZE, return_intermediates=5)
    assert out.intermediate_steps == [0, 2, 5, 8, 10]  # PNDM: 10 steps = 11 model calls
    assert out.intermediates.shape == (5, 1, SIZE, SIZE, 3)
    dist = [np.abs(frame[0] - out.images[0]).mean() for frame in out.intermediates]
    assert dist[-1] < dist[0] and dist[-1] < 0.05


@pytest.fixture(scope="module")
def pipe_bf16(tiny_pipeline_dir):
    return StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype="bfloat16")


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_bf16_sampler_structure(pipe_bf16, scheduler):
    """The bf16 fast path as traced: one scan over the model calls with no host callbacks in the
    program, every UNet convolution and matmul in the scan in bf16, the scan carry (latents and
    scheduler state) in fp32."""
    from flax import nnx

    from sdjax import sampling
    from sdjax.text import tokenize
    sched = pipe_bf16.make_scheduler(scheduler, 5)
    graphdefs, state = zip(*(nnx.split(m) for m in (pipe_bf16.text_encoder, pipe_bf16.unet, pipe_bf16.vae)))
    ids = tokenize(pipe_bf16.tokenizer, PROMPTS)
    traced = jax.make_jaxpr(lambda st, sc, seeds: sampling.generate(
        sampling.SDState(*graphdefs), st, sc, ids, ids, seeds, None, np.float32(7.5),
        latent_shape_HWC=(SIZE // 2, SIZE // 2, 4), use_guidance=True))(
        sampling.SDState(*state), sched, np.arange(2, dtype=np.uint32))
    eqns = list(R.jaxpr_equations(traced.jaxpr))
    assert not [e.primitive.name for e in eqns if "callback" in e.primitive.name or "feed" in e.primitive.name]
    scan, = [e for e in eqns if e.primitive.name == "scan"]
    assert scan.params["length"] == sched.num_model_calls
    carry = [v.aval for v in scan.outvars[: scan.params["num_carry"]]]
    assert carry[0].shape == (2, SIZE // 2, SIZE // 2, 4)
    assert {a.dtype for a in carry if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    body = list(R.jaxpr_equations(scan.params["jaxpr"].jaxpr))
    bf16_convs = 0
    for e in body:
        if e.primitive.name in ("conv_general_dilated", "dot_general"):
            if {v.aval.dtype for v in e.invars[:2]} == {jnp.dtype(jnp.bfloat16)}:
                bf16_convs += e.primitive.name == "conv_general_dilated"
            else:  # only the scheduler's: PNDM combines its stored eps with a vector of coefficients
                assert e.primitive.name == "dot_general" and e.invars[0].aval.ndim == 1, e
    # each of the UNet's convolutions once per model call, all of them bf16
    assert bf16_convs == sum(isinstance(m, nnx.Conv) for _, m in nnx.iter_graph(pipe_bf16.unet))


# The bf16 bound, for the tiny pipeline at 32 px, 10 steps, on [0, 1]: max abs error 0.05 (13 of 255 levels),
# mean abs error 0.01. Measured: max 0.017 (pndm) / 0.023 (euler_a), mean 0.0022 / 0.0035. Rounding the
# scheduler state to bf16 too changes these little at this size (max 0.013-0.025), which is why the structure
# test checks the fp32 carry itself. benchmarks/bf16_error.py measures the full-size models (BENCHMARKS.md).
@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_bf16_sampler_stays_close_to_fp32(pipe, pipe_bf16, scheduler):
    kw = dict(seeds=[0, 1], num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler=scheduler)
    ref = pipe(PROMPTS, **kw).images
    got = pipe_bf16(PROMPTS, **kw).images
    assert got.dtype == np.float32 and ref.std() > 0.1
    err = np.abs(got - ref)
    assert err.max() <= 0.05 and err.mean() <= 0.01, (err.max(), err.mean())


def test_float16_pipeline_runs_on_the_cpu_close_to_fp32(pipe, tiny_pipeline_dir):
    """XLA:CPU has no fp16 attention dot (fp16 x fp16 -> fp32): fp16 attention there runs in fp32,
    so ``dtype=float16`` (``sample.py --dtype float16``) works on the CPU, within the bf16 bound."""
    half = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype="float16")
    kw = dict(seeds=[0, 1], num_inference_steps=STEPS, height=SIZE, width=SIZE)
    ref, got = pipe(PROMPTS, **kw).images, half(PROMPTS, **kw).images
    err = np.abs(got - ref)
    assert np.isfinite(got).all() and err.max() <= 0.05 and err.mean() <= 0.01, (err.max(), err.mean())


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=30), "height=30: must be a positive multiple of 8"),
    (dict(scheduler="heun"), "unknown scheduler 'heun'"),
    (dict(seeds=[1, 2], prompts=["a", "b", "c"]), "seeds has 2 entries; expected 1 or 3 to match prompts"),
    (dict(prompts=["a", "b"], negative_prompts=["x", "y", "z"]),
     "prompts has 2 entries; expected 1 or 3 to match negative_prompts"),
    (dict(seeds=-1), r"seed -1 is not an integer in \[0, 2\*\*32 - 1\]"),
    (dict(latents=np.zeros((1, 8, 8, 4))), r"latents have shape \(1, 8, 8, 4\); expected \(1, 16, 16, 4\)"),
    (dict(seeds=[0, 1], latents=np.zeros((1, 8, 8, 4))),   # the shape given, not the one broadcast to 2
     r"latents have shape \(1, 8, 8, 4\); expected \(2, 16, 16, 4\) or \(1, 16, 16, 4\)"),
    (dict(guidance_scale=float("nan")), "not a finite number"),
    (dict(return_intermediates=[0, 99]), r"intermediate steps \[99\] are outside"),
    (dict(progress="sometimes"), r"progress='sometimes': expected True, False, 'steps', 'batches'"),
    (dict(variation_strength=0.3), r"variation_strength=0.3 moves each image's noise .*: give variation_seeds"),
    (dict(variation_seeds=1, variation_strength=1.5), r"variation_strength=1.5: must be in \[0, 1\]"),
    (dict(variation_seeds=[1, 2, 3], seeds=[1, 2]), "seeds has 2 entries; expected 1 or 3 to match variation_seeds"),
    (dict(variation_seeds=-1, variation_strength=0.1), r"variation seed -1 is not an integer in \[0, 2\*\*32 - 1\]"),
    (dict(variation_seeds=1, variation_strength=0.1, latents=np.zeros((1, 16, 16, 4))),
     "variation_seeds vary the seeds' noise: not with latents given"),
])
def test_bad_input(pipe, kwargs, message):
    kwargs = {"prompts": "the cat", "height": SIZE, "width": SIZE, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(prompts=None), TypeError, "prompts is required: a string or a list of strings"),
    (dict(seeds=2.0), TypeError, "seeds must be an integer, a list of integers or an integer array, got float"),
    (dict(seeds=True), ValueError, "seed True is not an integer"),
    (dict(seeds=np.array([1.5])), ValueError, "seed 1.5 is not an integer"),
    (dict(batch_size=-5), ValueError, r"batch_size=-5: must be a whole number >= 1"),
    (dict(batch_size=2.5), ValueError, r"batch_size=2.5: must be a whole number >= 1"),
    (dict(return_intermediates=True), TypeError, "return_intermediates: a number of steps or a list of step"),
    (dict(return_intermediates=2.5), TypeError, r"return_intermediates=2.5: a number of steps or a list"),
    (dict(guidance_scale="high"), TypeError, "guidance_scale='high' is not a number"),
    (dict(clip_skip=0), ValueError, r"clip_skip=0: must be an integer in 1\.\.3 \(this text encoder's layers"),
    (dict(clip_skip=4), ValueError, r"clip_skip=4: must be an integer in 1\.\.3"),   # the tiny encoder has 3
    (dict(clip_skip=2.0), ValueError, r"clip_skip=2\.0: must be an integer in 1\.\.3"),
    (dict(clip_skip=True), ValueError, r"clip_skip=True: must be an integer in 1\.\.3"),
    (dict(clip_skip="2"), ValueError, r"clip_skip='2': must be an integer in 1\.\.3"),
])
def test_bad_input_types(pipe, kwargs, error, message):
    """Wrong types are errors that name the argument (before the model runs)."""
    kwargs = {"prompts": "the cat", "height": SIZE, "width": SIZE, "num_inference_steps": 2, **kwargs}
    with generate_calls(pipe) as calls, pytest.raises(error, match=message):
        pipe(**kwargs)
    assert not calls


def test_jax_arrays_as_seeds_and_guidance_scale(pipe):
    """A JAX library takes JAX values: seeds as an integer array and a guidance scale from
    ``jnp.linspace`` give the images that Python ints and floats give, from the same program."""
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler="ddim")
    want = pipe("the cat", seeds=[1, 2], guidance_scale=3.0, **kw).images
    with generate_calls(pipe) as calls:
        got = pipe("the cat", seeds=jnp.arange(1, 3), guidance_scale=jnp.linspace(1.0, 3.0, 3)[-1], **kw).images
        also = pipe("the cat", seeds=[jnp.uint32(1), np.int64(2)], guidance_scale=np.float32(3.0), **kw).images
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(also, want)
    assert all(call[1]["use_guidance"] is True for call in calls)


def test_weights_changed_on_the_models_are_used(pipe_bf16, tiny_pipeline_dir):
    """Editing ``pipe.unet`` itself (``nnx.update``, as an optimizer step or weight surgery does)
    changes the next images, without recompiling; ``set_params`` checks keys and shapes before
    replacing anything and casts to the pipeline's dtype. (The module's bf16 pipeline, whose weights
    it restores, and test_bf16_sampler_stays_close_to_fp32's compiled program.)"""
    from flax import nnx
    pipe = pipe_bf16
    kw = dict(seeds=[0], num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler="pndm")
    before = pipe("the cat", **kw).images
    compiled = pipe._generate._cache_size()
    conv_out = pipe.unet.conv_out.kernel
    nnx.update(pipe.unet, nnx.State({"conv_out": {"kernel": nnx.Param(jnp.zeros_like(conv_out[...]))}}))
    edited = pipe("the cat", **kw).images
    assert np.abs(edited - before).max() > 0.01
    assert pipe._generate._cache_size() == compiled
    np.testing.assert_array_equal(pipe("the cat", **kw).images, edited)   # unchanged models: the same state

    original = nnx.to_pure_dict(nnx.state(StableDiffusion.from_pretrained(tiny_pipeline_dir).unet, nnx.Param))
    bad_shape = jax.tree.map(lambda a: a, original)
    bad_shape["conv_in"]["bias"] = np.zeros(3, np.float32)
    for params, message in (({**original, "lora": {"a": np.zeros(2)}}, "lora/a is not a weight of the unet"),
                            ({"conv_in": original["conv_in"]}, r"weights missing, e.g. .*partial=True"),
                            (bad_shape, r"conv_in/bias has shape \(3,\); the model's is \(32,\)")):
        with pytest.raises(ValueError, match=message):
            pipe.set_params(unet=params)
        assert pipe.unet.conv_out.kernel[...].max() == 0                    # nothing was replaced
    pipe.set_params(unet=original)                                          # fp32 weights into a bf16 pipeline
    assert {a.dtype for a in jax.tree.leaves(nnx.state(pipe.unet, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(pipe("the cat", **kw).images, before)
    assert pipe._generate._cache_size() == compiled
    pipe.set_params(unet={"conv_out": {"kernel": np.zeros(conv_out.shape, np.float32)}}, partial=True)
    np.testing.assert_array_equal(pipe("the cat", **kw).images, edited)
    with pytest.raises(ValueError, match="conv_out/kernel has dtype int32; weights are floats"):
        pipe.set_params(unet={"conv_out": {"kernel": np.zeros(conv_out.shape, np.int32)}}, partial=True)
    pipe.set_params(unet=nnx.state(StableDiffusion.from_pretrained(tiny_pipeline_dir).unet, nnx.Param))  # a State
    np.testing.assert_array_equal(pipe("the cat", **kw).images, before)

    # The pipeline's own arrays donated to a jitted function (a train step given them): an error
    # saying what to do, not a crash of the compiled sampler, and set_params mends it.
    weights = nnx.to_pure_dict(nnx.state(pipe.unet, nnx.Param))
    jax.block_until_ready(jax.jit(lambda w: jax.tree.map(lambda a: a * 2, w), donate_argnums=0)(weights))
    with pytest.raises(RuntimeError, match=r"weights have been deleted .*pipe.set_params"):
        pipe("the cat", **kw)
    pipe.set_params(unet=original)
    np.testing.assert_array_equal(pipe("the cat", **kw).images, before)


def test_denoise_takes_one_text_state_for_every_image(pipe):
    """``sampling.denoise`` with one conditional and one unconditional text state for a batch of
    latents uses them for every image; another batch size is an error naming both."""
    from sdjax import sampling
    from sdjax.text import tokenize
    sched = pipe.make_scheduler("ddim", 2)
    ids = jnp.asarray(tokenize(pipe.tokenizer, ["the cat", ""]))
    text = sampling.encode_prompts(pipe.text_encoder, ids)
    latents = jnp.asarray(latents_for(3))
    one = sampling.denoise(pipe.unet, sched, latents, text[:1], text[1:], 7.5)
    every = sampling.denoise(pipe.unet, sched, latents, jnp.repeat(text[:1], 3, 0), jnp.repeat(text[1:], 3, 0), 7.5)
    np.testing.assert_allclose(one, every, atol=1e-6)
    with pytest.raises(ValueError, match="cond_BSD has batch 2 but the latents have 3"):
        sampling.denoise(pipe.unet, sched, latents, text, None, 1.0)
    with pytest.raises(ValueError, match=r"cond_BSD has shape \(77, 32\); expected text states \[batch or 1"):
        sampling.denoise(pipe.unet, sched, latents, text[0], None, 1.0)
    with pytest.raises(ValueError, match="uncond_BSD has shape .* must agree in width"):
        sampling.denoise(pipe.unet, sched, latents, text[:1], text[1:, :, :16], 7.5)
    with pytest.raises(ValueError, match=r"cond_BSD has shape \(1, 77, 16\); the UNet attends to text states of width "
                                         r"32 \(cross_attention_dim\)"):   # (not the doubled batch of the pairs)
        sampling.denoise(pipe.unet, sched, latents, text[:1, :, :16], text[1:, :, :16], 7.5)
    # keys_B: one key per image. Seeds, or one key for the whole batch, were taken as it and gave
    # noise that no longer follows the images' seeds (or a JAX error about key data).
    euler_a = pipe.make_scheduler("euler_a", 2)
    seeds = np.arange(3, dtype=np.uint32)
    with pytest.raises(ValueError, match=r"the euler_a scheduler is stochastic: denoise needs keys_B, one key per "
                                         r"image \(the pipeline's: step_keys\(image_keys\(seeds\)\)\)"):
        sampling.denoise(pipe.unet, euler_a, latents, text[:1], None)
    for bad in (seeds, jax.random.PRNGKey(0), jax.random.key(0), sampling.image_keys(seeds[:2])):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"keys_B is shape {shape} of .*; expected one "
                                             r"key per image of the 3: .*from seeds: step_keys\(image_keys\(seeds\)\); "
                                             r"from one key: jax.random.split\(key, 3\)"):
            sampling.denoise(pipe.unet, euler_a, latents, text[:1], None, keys_B=bad)
    with pytest.raises(ValueError, match=r"keys_B is a list; expected one key per image of the 3"):
        sampling.denoise(pipe.unet, euler_a, latents, text[:1], None, keys_B=[0, 1, 2])
    for good in (sampling.step_keys(sampling.image_keys(seeds)), jax.random.split(jax.random.PRNGKey(0), 3)):
        # Traced, not run (each run would compile the sampling loop): the checks above are at trace time too.
        out = jax.eval_shape(lambda k: sampling.denoise(pipe.unet, euler_a, latents, text[:1], None, keys_B=k), good)
        assert out.shape == latents.shape
    assert sampling.img2img_start(10, jnp.float32(0.5)) == sampling.img2img_start(10, 0.5) == 5   # a 0-d array
    with pytest.raises(ValueError, match=r"initial_noise takes one PRNG key per image .*got shape \(3,\) of uint32: "
                                         r"for seeds, initial_noise\(image_keys\(seeds\), ...\)"):
        sampling.initial_noise(seeds, (4, 4, 4))
    with pytest.raises(TypeError, match="cond_BSD is required"):
        sampling.denoise(pipe.unet, sched, latents, None, text[1:], 7.5)
    with pytest.raises(ValueError, match=r"latents_BHWC has shape \(3, 4, 16, 16\); .* looks like NCHW"):
        sampling.denoise(pipe.unet, sched, latents.transpose(0, 3, 1, 2), text[:1], text[1:], 7.5)
    with pytest.raises(TypeError, match=r"start must be a Python int \(static under jit"):
        jax.jit(lambda s: sampling.denoise(pipe.unet, sched, latents, text[:1], text[1:], 7.5, start=s))(1)
    with pytest.raises(TypeError, match="encode_prompts takes token ids, not text: tokenize the prompts first"):
        sampling.encode_prompts(pipe.text_encoder, "the cat")
    with pytest.raises(ValueError, match=r"no prompts to tokenize \(an empty list\)"):
        tokenize(pipe.tokenizer, [])


def test_guided_model_output_takes_one_text_state_for_every_image():
    """A loop of your own around ``guided_model_output`` takes text states as `denoise` does: one
    row ([1, S, D]) for every image (it stacked them with the latents' batch: a shape error of
    jnp.stack), or one per image; another batch is an error naming the argument."""
    from sdjax import sampling

    def unet(x, t, text):   # as the UNet: one text state per sample, each row its own output
        assert text.shape[0] == x.shape[0]
        return x * t + text.mean(axis=(1, 2))[:, None, None, None]
    text = jnp.asarray(np.random.default_rng(0).standard_normal((2, 77, 32)), jnp.float32)
    latents = jnp.asarray(latents_for(3))
    guided = lambda cond, uncond: sampling.guided_model_output(unet, latents, 0.5, cond, uncond, 7.5)  # noqa: E731
    every = lambda x: jnp.repeat(x, 3, axis=0)  # noqa: E731
    np.testing.assert_allclose(guided(text[:1], text[1:]), guided(every(text[:1]), every(text[1:])), atol=1e-6)
    np.testing.assert_allclose(guided(text[:1], None), guided(every(text[:1]), None), atol=1e-6)
    with pytest.raises(ValueError, match="uncond_BSD has batch 2 but the latents have 3"):
        guided(text[:1], text)


def test_denoise_refuses_a_scheduler_name():
    """The pipeline takes scheduler names; denoise a Scheduler (a name failed on ``.stochastic``)."""
    from sdjax import sampling
    with pytest.raises(TypeError, match=r"denoise takes a Scheduler, not its name 'euler': sdjax.schedulers.make_sch"):
        sampling.denoise(lambda x, t, text: x, "euler", jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 77, 32)))


def test_denoise_takes_a_guidance_rule_of_your_own():
    """``unet`` may be any function (x, t, text): classifier-free guidance written as one, with
    ``uncond_BSD=None``, gives denoise's own guided latents."""
    from sdjax import sampling
    from sdjax.schedulers import make_scheduler
    model = lambda x, t, text: 0.1 * x + 0.01 * t * text.mean(axis=(1, 2))[:, None, None, None]  # noqa: E731
    text = jnp.asarray(np.random.default_rng(0).standard_normal((2, 77, 32)), jnp.float32)
    cond, uncond = jnp.repeat(text[:1], 2, 0), jnp.repeat(text[1:], 2, 0)

    def guided(x, t, c):
        eps_uncond = model(x, t, uncond)
        return eps_uncond + 7.5 * (model(x, t, c) - eps_uncond)
    sched = make_scheduler("euler", {}, 3)
    latents = jnp.asarray(latents_for(2)) * sched.init_noise_sigma
    np.testing.assert_allclose(sampling.denoise(guided, sched, latents, cond, None),
                               sampling.denoise(model, sched, latents, cond, uncond, 7.5), rtol=1e-5, atol=1e-3)


def test_image_keys_checks_concrete_seeds():
    """Seeds past 2**32 - 1 or below 0 would wrap onto other seeds' keys; a plain list works."""
    from sdjax.sampling import image_keys
    np.testing.assert_array_equal(jax.random.key_data(image_keys([0, 7])),
                                  jax.random.key_data(image_keys(jnp.array([0, 7], jnp.uint32))))
    for bad, message in (([0, 2**32], r"seeds must be in \[0, 2\*\*32 - 1\], got 0..4294967296"),
                         (np.array([-1]), "got -1..-1"), (np.array([[1]]), "expected a 1-D array of integer seeds"),
                         (np.array([1.5]), "of float64")):
        with pytest.raises(ValueError, match=message):
            image_keys(bad)
    split = parallel.shard_batch(np.arange(8, dtype=np.uint32), parallel.data_mesh())
    assert image_keys(split).sharding == split.sharding                      # keys placed as the seeds were
    traced = jax.jit(image_keys)(jnp.array([3], jnp.uint32))                 # traced: taken as it is
    np.testing.assert_array_equal(jax.random.key_data(traced), jax.random.key_data(image_keys([3])))


def test_denoise_per_image_guidance_and_the_pipelines_step_keys(pipe):
    """A guidance scale per image ([B]) guides each image by its own (a bare [B] used to multiply the
    4 latent channels when B was 4); step_keys gives the pipeline's images of a stochastic scheduler."""
    from flax import nnx
    from sdjax import sampling
    from sdjax.text import tokenize
    sched = pipe.make_scheduler("euler_a", STEPS)   # STEPS: the pipeline's program is test_seed_determines_image's
    ids = jnp.asarray(tokenize(pipe.tokenizer, ["the cat", ""]))
    text = sampling.encode_prompts(pipe.text_encoder, ids)
    seeds = jnp.arange(4, dtype=jnp.uint32)
    keys = sampling.image_keys(seeds)
    noise = sampling.initial_noise(keys, (SIZE // 2, SIZE // 2, 4)) * sched.init_noise_sigma
    scales = jnp.array([1.5, 3.0, 5.0, 7.5])
    unet_graph, unet_state = nnx.split(pipe.unet)
    # One compiled loop per batch size and guidance shape (eager, every call compiled its own loop).
    jitted = jax.jit(lambda state, x, g, k: sampling.denoise(nnx.merge(unet_graph, state), sched, x, text[:1],
                                                             text[1:], g, k))
    run = lambda x, g, k: jitted(unet_state, x, g, k)  # noqa: E731
    together = run(noise, scales, sampling.step_keys(keys))
    for b in range(4):
        alone = run(noise[b:b + 1], float(scales[b]), sampling.step_keys(keys[b:b + 1]))
        np.testing.assert_allclose(together[b:b + 1], alone, rtol=1e-4, atol=1e-4)  # sigma-scaled latents ~20
    with pytest.raises(ValueError, match=r"guidance_scale has shape \(3,\); expected a number or one per image \(\[4\]\)"):
        run(noise, scales[:3], keys)
    np.testing.assert_array_equal(run(noise, scales.reshape(4, 1, 1, 1), sampling.step_keys(keys)), together)
    images = sampling.decode_latents(pipe.vae, together)
    want = np.concatenate([pipe("the cat", seeds=int(s), num_inference_steps=STEPS, height=SIZE, width=SIZE,
                                scheduler="euler_a", guidance_scale=float(g)).images for s, g in zip(seeds, scales)])
    np.testing.assert_allclose(np.asarray(images), want, atol=1e-4)


def test_token_ids_past_the_text_encoders_vocabulary_are_an_error(pipe, monkeypatch):
    """A tokenizer with added tokens and an embedding not resized gave all-NaN images."""
    import sdjax.pipeline
    vocab, tokenize = pipe.text_encoder.config.vocab_size, sdjax.pipeline.tokenize
    # An added token: the tokenizer's end token (the largest id here) becomes one past the embedding.
    monkeypatch.setattr(sdjax.pipeline, "tokenize", lambda tok, texts, **kw: np.where(
        (ids := tokenize(tok, texts, **kw)) == ids.max(), vocab + 3, ids))
    with pytest.raises(ValueError, match=rf"token id {vocab + 3}, outside the text encoder's vocabulary 0..{vocab - 1}"):
        pipe("the cat", num_inference_steps=STEPS, height=SIZE, width=SIZE)


@pytest.mark.parametrize("env,multi", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_NODELIST": "n1"}, False),    # one-task sbatch script
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NODELIST": "n1"}, False),    # its shell, outside srun
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}, False),                    # srun -n 1
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-2]"}, True),                 # srun -n 4
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False), ({"OMPI_COMM_WORLD_SIZE": "2"}, True),  # mpirun -n 1 / 2
    ({"PMI_SIZE": "1"}, False), ({"PMI_SIZE": "2"}, True),                          # MPICH's mpirun -n 1 / 2
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"TPU_WORKER_ID": "0"}, False), ({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "localhost"}, False),  # one host
    ({"TPU_WORKER_ID": "1", "TPU_WORKER_HOSTNAMES": "t-0,t-1"}, True),              # a GKE TPU pod slice
    ({"TPU_WORKER_ID": "1", "TPU_PROCESS_ADDRESSES": "t-0:8476,t-1:8476"}, True),
])
def test_launcher_environments(env, multi):
    assert parallel.env_says_multi_process(env) is multi


@pytest.mark.slow
def test_several_cpu_devices_give_the_same_images_call_after_call(tiny_pipeline_dir):
    """On 4 CPU devices with XLA's own CPU kernels in place of YNNPACK's (the flag sdjax adds on one
    device), jaxlib 0.10.2 gave images up to 1.0 apart from one call to the next; sdjax leaves that
    flag out when there are several CPU devices (the rule itself: test_models.py's
    test_xla_flags_are_added_only_where_allowed, in the default suite). ~40 s: opt-in."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("SDJAX_XLA_FLAGS", "JAX_NUM_CPU_DEVICES")},
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    code = textwrap.dedent(f"""
        import numpy as np
        from sdjax import StableDiffusion
        pipe = StableDiffusion.from_pretrained({str(tiny_pipeline_dir)!r})
        run = lambda: pipe(["a cat"] * 16, seeds=list(range(16)), num_inference_steps=3, height=64,
                           width=64).images
        first = run()
        print(max(float(np.abs(run() - first).max()) for _ in range(4)))
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == 0.0


def test_one_task_sbatch_script_runs_single_process():
    """jax.distributed.initialize fails there (no coordinator); sdjax must not call it."""
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_NODELIST": "n1",
           "OMPI_COMM_WORLD_SIZE": "1"}
    code = ("import jax; from sdjax import parallel; parallel.initialize_distributed(); "
            "print(jax.process_count(), jax.device_count())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", str(jax.device_count())]


def test_hand_launch_reads_the_process_count_and_id(monkeypatch):
    """JAX reads JAX_COORDINATOR_ADDRESS but no variable for the process count and id: sdjax passes
    JAX_NUM_PROCESSES and JAX_PROCESS_ID on, and names a bad one."""
    seen = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    parallel.initialize_distributed()
    assert seen == [{"num_processes": 2, "process_id": 1}]
    parallel.initialize_distributed(process_id=0)  # an explicit argument wins
    assert seen[-1] == {"num_processes": 2, "process_id": 0}
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        parallel.initialize_distributed()


@pytest.mark.parametrize("env,named", [
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "Open MPI 5's mpirun"),
    ({"PMI_SIZE": "2", "PMI_RANK": "1"}, "this mpirun (MPICH, Intel MPI)"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, None),
])
def test_an_mpirun_jax_does_not_detect_is_named(monkeypatch, env, named):
    """JAX finds the processes of Open MPI 4's mpirun only (OMPI_MCA_orte_hnp_uri): under Open MPI 5's
    or MPICH's, the error says so and where the process count and id are, not "launch with mpirun"."""
    def fails(**kwargs):
        raise ValueError("coordinator_address should be defined.")
    for key in ("OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "PMI_SIZE", "JAX_COORDINATOR_ADDRESS",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", fails)
    with pytest.raises(ValueError) as error:
        parallel.initialize_distributed()
    message = str(error.value)
    assert "set JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES and JAX_PROCESS_ID" in message
    if named is None:
        assert "the launcher did not describe it" in message
    else:
        size, rank = env
        assert f"does not find the processes of {named}" in message and f"${size} and ${rank}" in message
    if "OMPI_COMM_WORLD_SIZE" in env:   # Open MPI 4's: JAX's own error stands (not an undetected launcher)
        monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.0.0.1:34911")
        with pytest.raises(ValueError, match="the launcher did not describe it"):
            parallel.initialize_distributed()


def test_hand_launch_without_the_process_count_is_one_line(tmp_path):
    """JAX_COORDINATOR_ADDRESS alone: sample.py stops with one line saying what to set (JAX's own
    ValueError, "Number of processes must be defined", said neither where nor how)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    env["JAX_COORDINATOR_ADDRESS"] = "127.0.0.1:1"
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "a cat", "--model", str(tmp_path / "absent")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("sample.py: error: cannot start the multi-process run (")
    assert "set JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES and JAX_PROCESS_ID" in done.stderr
    assert "Traceback" not in done.stderr


MULTIHOST_WORKER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from sdjax import parallel
    me = int(sys.argv[2])
    parallel.initialize_distributed(coordinator_address=sys.argv[1], num_processes=2, process_id=me)
    import numpy as np
    from sdjax.pipeline import StableDiffusion
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    model, steps, tmp, sample_py = sys.argv[3:7]
    pipe = StableDiffusion.from_pretrained(model)
    out = pipe("the cat", seeds=list(range(8)), num_inference_steps=int(steps), height=32, width=32,
               scheduler="euler_a", return_intermediates=2)
    np.save(f"{tmp}/out{me}.npy", out.images)
    np.save(f"{tmp}/intermediates{me}.npy", out.intermediates)

    # sample.py on both processes (initialize_distributed is then a no-op): first with the model
    # missing on process 1's host, then for real, each process given its own --out.
    spec = importlib.util.spec_from_file_location("sample_script", sample_py)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import sdjax.cli_utils

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    real_save_png = sdjax.cli_utils.save_png
    cases = (("missing", f"{tmp}/absent" if me == 1 else model, "0-7"),
             ("other", model, "0-6" if me == 1 else "0-7"),   # e.g. a prompts file that differs between hosts
             ("unreadable", model, "x" if me == 1 else "0-7"),
             ("disk_full", model, "0-15"),                    # two batches of 8; process 0 cannot write
             ("run", model, "0-7"))
    for case, where, seeds in cases:
        sdjax.cli_utils.save_png = disk_full if case == "disk_full" and me == 0 else real_save_png
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = script.main(["the cat", "--model", where, "--seeds", seeds, "--steps", steps, "--height", "32",
                              "--width", "32", "--scheduler", "euler_a", "--progress", "batches", "--trajectory",
                              "--compilation-cache", "none", "--out", f"{tmp}/out-{case}-{me}", "--batch-size", "8"])
        print("CASE " + json.dumps(dict(case=case, rc=rc, stdout=stdout.getvalue(), stderr=stderr.getvalue())))
""")


def test_two_processes_match_single_process(pipe, tiny_pipeline_dir, tmp_path):
    """2 processes x 4 CPU devices with jax.distributed on 127.0.0.1 give the single-process images
    and intermediates, from the API (on every process) and from sample.py (written by process 0 alone,
    with --trajectory). sample.py with the model missing on one host stops every process with an
    error naming it."""
    logs = run_two_processes(MULTIHOST_WORKER, tmp_path, tiny_pipeline_dir, STEPS, tmp_path, ROOT / "sample.py",
                             timeout=600)
    single = pipe("the cat", seeds=list(range(8)), num_inference_steps=STEPS, height=SIZE, width=SIZE,
                  scheduler="euler_a", return_intermediates=2)
    expected = single.images
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"out{i}.npy"), expected, atol=1e-4)
        np.testing.assert_allclose(np.load(tmp_path / f"intermediates{i}.npy"), single.intermediates, atol=1e-4)

    cases = [{c["case"]: c for c in map(json.loads, re.findall(r"^CASE (.*)$", log, re.M))} for log in logs]
    missing, run = [c["missing"] for c in cases], [c["run"] for c in cases]
    assert [c["rc"] for c in missing] == [2, 2] and missing[0]["stdout"] == missing[1]["stdout"] == ""
    assert missing[1]["stderr"] == f"sample.py: error: {tmp_path / 'absent'}: no such directory\n"
    assert missing[0]["stderr"] == (f"sample.py: error: {tiny_pipeline_dir}: processes 1 of 2 could not load the "
                                    "model (their logs say why); every host needs the weights\n")
    assert not (tmp_path / "out-missing-0").exists() and not (tmp_path / "out-missing-1").exists()
    other = [c["other"] for c in cases]   # process 1 asked for other seeds: both stop before loading
    assert [c["rc"] for c in other] == [2, 2]
    assert other[0]["stderr"] == other[1]["stderr"] == (
        "sample.py: error: processes 1 of 2 were given other prompts, seeds or settings than process 0: start the "
        "same command on every host (with --prompts-file -, give every task the input: srun --input=all)\n")
    unreadable = [c["unreadable"] for c in cases]   # a usage error on process 1 stops process 0 too
    assert [c["rc"] for c in unreadable] == [2, 2] and unreadable[1]["stderr"].startswith("sample.py: error: ")
    assert unreadable[0]["stderr"] == ("sample.py: error: processes 1 of 2 could not read the request (their logs "
                                       "say why)\n")
    assert not list(tmp_path.glob("out-other-*")) and not list(tmp_path.glob("out-unreadable-*"))
    full = [c["disk_full"] for c in cases]   # process 0's write error stops process 1 too (it waited forever)
    assert [c["rc"] for c in full] == [1, 1]
    assert full[0]["stderr"].splitlines()[-1] == ("sample.py: error: cannot write the images: [Errno 28] No space "
                                                  f"left on device; any images written before it are in "
                                                  f"{tmp_path / 'out-disk_full-0'}")
    assert full[1]["stderr"].splitlines()[-1] == ("sample.py: error: cannot write the images: process 0 could not "
                                                  "write the images (its log says why); any images written before "
                                                  f"it are in {tmp_path / 'out-disk_full-1'}")
    assert [c["rc"] for c in run] == [0, 0] and "on 2 processes, 8 devices" in run[0]["stdout"]
    assert run[1]["stdout"] == run[1]["stderr"] == ""     # no bars, no messages, no files on process 1
    assert not (tmp_path / "out-run-1").exists()
    pngs = sorted(p for p in (tmp_path / "out-run-0").glob("*.png") if not p.name.endswith("-trajectory.png"))
    assert [p.name[:5] for p in pngs] == [f"{i:05d}" for i in range(8)]
    assert len(list((tmp_path / "out-run-0").glob("*-trajectory.png"))) == 8
    assert len(list((tmp_path / "out-run-0").glob("*-trajectory.gif"))) == 8
    written = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs]).astype(np.float64) / 255
    assert np.abs(written - expected).max() <= 0.5 / 255 + 1e-4    # PNG rounding + the processes' 1e-4 above


def test_ctrl_c_stops_a_call_while_its_batch_computes(tiny_pipeline_dir, monkeypatch):
    """Ctrl-C / SIGTERM (sample.py raises KeyboardInterrupt for both) acts while a batch computes, not
    once it is done: Python runs signal handlers only between bytecodes, and a fetch blocked in
    np.asarray put them off for the whole batch (minutes on a CPU), then dropped its images. Here the
    interrupt comes 20 ms after the fetch starts waiting (no timing of the batch: under a loaded CI
    one call can take twice another), and the batch must still be computing when it stops the call.
    One device (a sharded array is fetched shard by shard, between bytecodes) and one batch (with
    several CPU devices, dispatching a second one waits for the first, in a C call too)."""
    import _thread
    import signal
    import threading
    from sdjax import pipeline as P
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir, mesh=parallel.data_mesh(jax.devices()[:1]))
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, batch_size=8)
    pipe("a cat", seeds=range(8), **kw)   # compiled
    waited, seen, wait = [], {}, P._wait_interruptibly
    timer = threading.Timer(0.02, _thread.interrupt_main)   # as a Ctrl-C from outside

    def interrupted_wait(arrays):
        waited.append(arrays)
        seen["ready when the wait began"] = all(a.is_ready() for a in arrays)
        timer.start()
        wait(arrays)
        seen["wait returned"] = True
    monkeypatch.setattr(P, "_wait_interruptibly", interrupted_wait)
    # Python's own Ctrl-C handler, as a program starts with: in the full suite an earlier module left this
    # pytest-xdist worker with SIGINT ignored (SIG_IGN, where interrupt_main does nothing).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        pipe("a dog", seeds=range(8), **kw)
    except KeyboardInterrupt:
        pass
    else:
        pytest.fail(f"not interrupted: {seen}; SIGINT handler {signal.getsignal(signal.SIGINT)}")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert len(waited) == 1 and not all(a.is_ready() for a in waited[0]), "stopped only once the batch was done"
    monkeypatch.undo()
    np.testing.assert_array_equal(pipe("a dog", seeds=[0], **kw).images.shape, (1, SIZE, SIZE, 3))  # usable after
