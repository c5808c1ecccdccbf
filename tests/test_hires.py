"""The Hires fix (AUTOMATIC1111's two-pass txt2img): against diffusers' txt2img -> bilinear latent upscale
-> img2img, and the Lanczos upscaler against its definition (decode, resize, img2img)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdjax import HiresFix
from sdjax.images import as_pil
from sdjax.sampling import image_keys, initial_noise, upscale_latents

PROMPTS = ["a photo of the cat", "the red dog in blue"]
NEGATIVES = ["blue", "the cat"]
SIZE = 32    # tiny VAE downsamples by 2: 16x16 latents, 32x32 in the second pass
STEPS = 10
SEEDS = [3, 4]


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("shapes", [((4, 4), (8, 8)), ((5, 7), (7, 10)), ((8, 6), (12, 9)), ((3, 5), (9, 16))])
def test_upscale_latents_is_torch_bilinear_without_antialias(shapes):
    """upscale_latents is A1111's Latent upscaler: torch's F.interpolate bilinear, align_corners=False,
    antialias=False (whole and fractional ratios, each side its own)."""
    (h, w), size = shapes
    x = np.random.default_rng(0).standard_normal((2, h, w, 4)).astype(np.float32)
    want = F.interpolate(nchw(x), size=size, mode="bilinear", align_corners=False, antialias=False)
    assert np.abs(np.asarray(upscale_latents(x, size)) - want.numpy().transpose(0, 2, 3, 1)).max() <= 1e-6
    with pytest.raises(ValueError, match="only enlarges"):
        upscale_latents(x, (h - 1, w))


def test_hires_latent_matches_diffusers_txt2img_upscale_img2img(pipe, reference_pipe, monkeypatch):
    """hires=HiresFix(2, strength=0.7) makes diffusers' images of the same two passes: txt2img from the
    same noise to latents (output_type="latent"), F.interpolate bilinear x2, then img2img from those
    4-channel latents (no VAE encode) with the noise sdjax draws from each seed at the new latent size.
    The step bar counts both passes' model calls."""
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img
    sched = diffusers.EulerDiscreteScheduler.from_config(reference_pipe.checkpoint_scheduler_config)
    reference_pipe.scheduler = sched
    ref2 = StableDiffusionImg2ImgPipeline(**{**reference_pipe.components, "scheduler": sched})
    ref2.set_progress_bar_config(disable=True)
    noise = np.random.default_rng(6).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    noise2 = initial_noise(image_keys(SEEDS), (SIZE, SIZE, 4))   # the second pass's, as sdjax draws it
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: nchw(noise2))

    class Bar:
        n = 0

        def update(self, k):
            self.n += k
    bar = Bar()
    ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, num_inference_steps=STEPS, height=SIZE,
                width=SIZE, scheduler="euler", latents=noise, hires=HiresFix(scale=2, strength=0.7), progress=bar)
    first = reference_pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                           latents=nchw(noise), output_type="latent").images
    up = F.interpolate(first, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    want = ref2(PROMPTS, negative_prompt=NEGATIVES, image=up, strength=0.7, num_inference_steps=STEPS,
                output_type="np").images
    assert ours.images.shape == want.shape == (2, 2 * SIZE, 2 * SIZE, 3) and want.std() > 0.01
    assert np.abs(ours.images - want).max() <= 2e-5
    assert bar.n == STEPS + int(STEPS * 0.7)
    assert ours.seeds == SEEDS and ours.prompts == PROMPTS
    # what the check stands on: the second pass's own noise and strength show
    other = ref2(PROMPTS, negative_prompt=NEGATIVES, image=up, strength=0.5, num_inference_steps=STEPS,
                 output_type="np").images
    assert np.abs(ours.images - other).max() > 1e-2


@pytest.mark.parametrize("weighting", [False, True])
def test_hires_steps_and_lanczos_are_their_definition(pipe, weighting):
    """upscaler="lanczos": the first pass's images (as saved, 8-bit) resized with PIL's Lanczos and made
    again by img2img (init_images, its posterior draw and noise from the seeds) with hires.steps steps;
    batches of one give the same images (each image its own seed's). With prompt weighting and editing, the
    second pass's edits follow its own steps, as img2img's do."""
    prompts = ["a (photo:1.3) of the [cat:dog:0.5]", PROMPTS[1]] if weighting else PROMPTS
    kw = dict(negative_prompts=NEGATIVES, seeds=SEEDS, height=SIZE, width=SIZE, scheduler="euler",
              prompt_weighting=weighting)
    hires = HiresFix(scale=1.5, steps=6, strength=0.5, upscaler="lanczos")
    ours = pipe(prompts, num_inference_steps=STEPS, hires=hires, **kw).images
    calls = []
    original = pipe._generate
    pipe._generate = lambda *a, **k: calls.append(k) or original(*a, **k)
    try:
        first = pipe(prompts, num_inference_steps=STEPS, **kw).images
    finally:
        pipe._generate = original
    # without hires, the program of before: none of the hires inputs or static arguments
    assert [k for k in calls[0] if k in ("return_latents", "decode", "init_latents_BHWC")] == []
    big = int(SIZE * 1.5) // 8 * 8
    resized = [as_pil(x).resize((big, big), Image.Resampling.LANCZOS) for x in first]
    want = pipe(prompts, num_inference_steps=6, init_images=resized, strength=0.5,
                **{k: v for k, v in kw.items() if k not in ("height", "width")}).images
    assert ours.shape == want.shape == (2, big, big, 3)
    assert np.abs(ours - want).max() <= 1e-5
    if not weighting:
        one_by_one = pipe(prompts, num_inference_steps=STEPS, hires=hires, batch_size=1, **kw).images
        assert np.abs(one_by_one - ours).max() <= 1e-5


def test_hires_second_pass_own_prompts_scheduler_and_guidance_are_their_definition(pipe):
    """HiresFix's own prompts (one per image, weighted, with AND and editing over the second pass's own
    steps), negative prompts, scheduler (with the call's options it takes: the Karras schedule) and guidance
    scale (A1111's Hires prompt, Hires sampler and schedule type, Forge's Hires CFG Scale) are the second
    pass's: the image is img2img of the first pass's with those settings."""
    own = dict(prompts=["a (bird:1.2) AND a [cow:horse:0.5]", "a cow"], negative_prompts="ugly",
               scheduler="dpmpp_2m", guidance_scale=3.0)
    options = {"timestep_spacing": "trailing", "use_karras_sigmas": True}
    kw = dict(seeds=SEEDS, prompt_weighting=True)
    first_kw = dict(kw, negative_prompts=NEGATIVES, height=SIZE, width=SIZE, scheduler="euler", guidance_scale=7.5,
                    scheduler_options=options)
    hires = HiresFix(scale=1.5, steps=6, strength=0.5, upscaler="lanczos", **own)
    ours = pipe(PROMPTS, num_inference_steps=STEPS, hires=hires, **first_kw).images
    first = pipe(PROMPTS, num_inference_steps=STEPS, **first_kw).images
    big = int(SIZE * 1.5) // 8 * 8
    resized = [as_pil(x).resize((big, big), Image.Resampling.LANCZOS) for x in first]
    want = pipe(own["prompts"], negative_prompts=["ugly"] * 2, num_inference_steps=6, init_images=resized,
                strength=0.5, scheduler="dpmpp_2m", scheduler_options=options, guidance_scale=3.0, **kw).images
    assert ours.shape == want.shape == (2, big, big, 3)
    assert np.abs(ours - want).max() <= 1e-5
    # what the check stands on: the call's own settings in the second pass make other images
    plain = pipe(PROMPTS, num_inference_steps=STEPS, hires=HiresFix(scale=1.5, steps=6, strength=0.5,
                                                                     upscaler="lanczos"), **first_kw).images
    assert np.abs(ours - plain).max() > 1e-2


def test_hires_second_scheduler_takes_the_calls_options_it_has():
    """The second pass's options: all the call's for the same scheduler, those another scheduler takes
    for it, then its own."""
    options = {"use_karras_sigmas": True, "timestep_spacing": "trailing"}
    assert HiresFix().second_scheduler("euler", options) == ("euler", options)
    assert HiresFix(scheduler="dpmpp_2m").second_scheduler("euler", options) == ("dpmpp_2m", options)
    assert HiresFix(scheduler="ddim", scheduler_options={"eta": 1.0}).second_scheduler("euler", options) == (
        "ddim", {"timestep_spacing": "trailing", "eta": 1.0})
    assert HiresFix(scheduler_options={"use_karras_sigmas": False}).second_scheduler("euler", options) == (
        "euler", {"use_karras_sigmas": False, "timestep_spacing": "trailing"})
    assert HiresFix(prompts=["a", "b"]).prompts == ("a", "b") and HiresFix(prompts="a").prompts == ("a",)


def test_hires_arguments_are_checked_before_anything_runs(pipe):
    """Bad HiresFix values, and what does not go with it, are errors naming them, before anything compiles."""
    for bad, message in [(dict(scale=1), "scale=1: must be a number above 1"),
                         (dict(scale=float("nan")), "scale=nan"),
                         (dict(steps=0), "steps=0: must be a whole number >= 1"),
                         (dict(steps=2.5), "steps=2.5"),
                         (dict(strength=0), r"strength=0: must be a number in \(0, 1\]"),
                         (dict(strength=1.5), "strength=1.5"),
                         (dict(upscaler="R-ESRGAN 4x+"), "upscaler='R-ESRGAN 4x\\+': choose one of latent, lanczos"),
                         (dict(scheduler="Euler a"), "scheduler='Euler a': choose one of pndm, ddim"),
                         (dict(guidance_scale=float("inf")), "guidance_scale=inf: must be a finite number")]:
        with pytest.raises(ValueError, match=message):
            HiresFix(**bad)
    for bad, message in [(dict(prompts=3), "prompts=3: must be a string, a list of strings"),
                         (dict(negative_prompts=[]), r"negative_prompts=\[\]: must be a string"),
                         (dict(scheduler_options=[("eta", 1)]), "scheduler_options=.*must be a dict")]:
        with pytest.raises(TypeError, match=message):
            HiresFix(**bad)
    calls = []
    original = pipe._generate
    pipe._generate = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        for kw, error, message in [
                (dict(hires=2.0), TypeError, "hires must be a HiresFix"),
                (dict(hires=HiresFix(), init_images=image), ValueError, "not with init_images"),
                (dict(hires=HiresFix(), return_intermediates=2), ValueError, "return_intermediates is not available"),
                (dict(hires=HiresFix(steps=2, strength=0.3)), ValueError, "denoises no step"),
                (dict(hires=HiresFix(), scheduler="pndm", scheduler_options={"skip_prk_steps": False}),
                 (ValueError, NotImplementedError), "cannot start midway"),
                (dict(hires=HiresFix(scheduler="ddim", scheduler_options={"use_karras_sigmas": True})), TypeError,
                 "'ddim' scheduler has no option 'use_karras_sigmas'"),
                (dict(hires=HiresFix(prompts=["a", "b", "c"]), seeds=[1, 2]), ValueError,
                 r"seeds has 2 entries; expected 1 or 3 to match hires.prompts \(3 entries\)"),
                (dict(hires=HiresFix(prompts="a AND b", guidance_scale=1), prompt_weighting=True), ValueError,
                 "composable diffusion.*guidance_scale must be above 1 \\(it is 1 in the Hires fix's second pass\\)"),
                (dict(hires=HiresFix(guidance_scale=1), prompts="a cat AND a dog", prompt_weighting=True),
                 ValueError, "it is 1 in the Hires fix's second pass")]:
            with pytest.raises(error, match=message):
                pipe(**{"prompts": "a cat", **kw}, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    finally:
        pipe._generate = original
    assert calls == []
    assert HiresFix(scale=1.5).size(512, 504) == (768, 752) and HiresFix(scale=1.3).size(512, 512) == (664, 664)
