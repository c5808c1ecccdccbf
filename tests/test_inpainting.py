"""Inpainting (``mask_images``) against diffusers' StableDiffusionInpaintPipeline: a text-to-image UNet
(its latents put back to the init image's outside the mask after every step) and an inpainting UNet
(9 input channels: the mask and the masked image's latents beside the latents)."""
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import reference as R
from sdjax.pipeline import StableDiffusion
from sdjax.sampling import image_keys, masked_image_keys, posterior_keys
from test_sampling import NEGATIVES, PROMPTS, SIZE, STEPS, diffusers_scheduler, latents_for

LATENT = SIZE // 2   # (the tiny VAE downsamples by 2)


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def posterior_draws(keys):
    return jax.vmap(lambda k: jax.random.normal(k, (LATENT, LATENT, 4)))(keys)


def patch_reference(monkeypatch, noise, draws):
    """diffusers' inpainting draws (its initial noise and each VAE encode's posterior sample) as sdjax
    takes them from the seeds: ``draws`` in the order the pipeline encodes (None: that encode unused)."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint
    queue = list(draws)
    monkeypatch.setattr(inpaint, "randn_tensor", lambda shape, **kw: nchw(noise))

    def retrieve(out, generator=None, sample_mode="sample"):
        draw = queue.pop(0)
        dist = out.latent_dist
        return dist.mean if draw is None else dist.mean + dist.std * nchw(draw)
    monkeypatch.setattr(inpaint, "retrieve_latents", retrieve)
    return queue


def masks():
    """Two masks of the image's size: the left half, and a centred square (white: repaint)."""
    left = np.zeros((SIZE, SIZE), np.uint8)
    left[:, : SIZE // 2] = 255
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[8:24, 8:24] = 255
    return [Image.fromarray(left), Image.fromarray(square)]


@pytest.fixture(scope="module")
def init_image():
    return np.random.default_rng(5).uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)


def test_text_to_image_unet_matches_diffusers_inpainting(pipe, reference_pipe, init_image, monkeypatch):
    """A 4-channel UNet with masks (default strength 1: from pure noise, euler: in sigma space):
    diffusers' images, each image's own mask (its latents put back to the init image's, noised to
    the next call's level, outside the mask after every step; the VAE's attention makes every pixel
    depend on all latents, so the kept part's pixels are not the init image's either way)."""
    from diffusers import StableDiffusionInpaintPipeline
    ref = StableDiffusionInpaintPipeline(**reference_pipe.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(reference_pipe, "euler")
    noise, seeds = latents_for(2, seed=6), [3, 4]
    left = patch_reference(monkeypatch, noise, [posterior_draws(posterior_keys(image_keys(seeds))), None])
    ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, scheduler="euler",
                latents=noise, init_images=init_image, mask_images=masks()).images
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init_image, 2, axis=0), mask_image=masks(),
               num_inference_steps=STEPS, output_type="np").images
    assert left == []   # (both encodes were made)
    assert ours.shape == want.shape == (2, SIZE, SIZE, 3) and want.std() > 0.01
    assert np.abs(ours - want).max() <= 2e-5


@pytest.fixture(scope="module")
def inpainting_dir(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline with an inpainting UNet (9 input channels), saved by diffusers."""
    folder = tmp_path_factory.mktemp("inpainting") / "tiny-sd-inpainting"
    shutil.copytree(tiny_pipeline_dir, folder)
    shutil.rmtree(folder / "unet")
    R.torch_unet({**R.TINY_UNET, "in_channels": 9}, seed=3).save_pretrained(folder / "unet")
    return folder


def test_inpainting_unet_matches_diffusers(inpainting_dir, reference_pipe, init_image, monkeypatch):
    """An inpainting UNet with a mask, from the noised init image (strength 0.6, pndm) as diffusers
    makes it: the init image's and the masked image's posterior draws, the mask and the masked
    latents beside the latents at every step. Without a mask it makes images from text (the whole
    image masked, the masked image gray, as AUTOMATIC1111 conditions it), equal to diffusers' with
    a white mask."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    pipe = StableDiffusion.from_pretrained(inpainting_dir)
    assert pipe.unet.config.in_channels == 9
    ref = StableDiffusionInpaintPipeline(**{**reference_pipe.components,
                                            "unet": UNet2DConditionModel.from_pretrained(inpainting_dir / "unet")})
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(reference_pipe, "pndm")
    noise, seeds = latents_for(2, seed=7), [5, 6]
    keys = image_keys(seeds)
    left = patch_reference(monkeypatch, noise, [posterior_draws(posterior_keys(keys)),
                                                posterior_draws(masked_image_keys(keys))])
    ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, latents=noise,
                init_images=init_image, mask_images=masks(), strength=0.6).images
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init_image, 2, axis=0), mask_image=masks(),
               strength=0.6, num_inference_steps=STEPS, output_type="np").images
    assert left == []
    assert ours.shape == want.shape == (2, SIZE, SIZE, 3) and want.std() > 0.01
    assert np.abs(ours - want).max() <= 2e-5

    white = Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8))
    patch_reference(monkeypatch, noise, [posterior_draws(masked_image_keys(keys))])
    text_only = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, latents=noise,
                     height=SIZE, width=SIZE).images
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init_image, 2, axis=0), mask_image=[white] * 2,
               num_inference_steps=STEPS, output_type="np").images
    assert np.abs(text_only - want).max() <= 2e-5


def test_masks_are_read_and_checked_before_anything_runs(pipe, init_image):
    """`mask_batch` reads PIL images (grayscale), bools, uint8 and floats, binarized at 0.5 as diffusers
    does; bad masks or a mask without init images are errors naming them, raised by the call before
    anything is compiled."""
    from sdjax.images import mask_batch
    from test_sampling import generate_calls
    gray = np.array([[0, 127], [128, 255]], np.uint8)
    want = np.array([[0, 0], [1, 1]], np.float32)[None, :, :, None]
    for given in (gray, Image.fromarray(gray), Image.fromarray(gray).convert("RGB"), [Image.fromarray(gray)],
                  gray[:, :, None], gray[None] / 255.0, gray[None, :, :, None] > 127):
        got = mask_batch(given)
        assert got.dtype == np.float32 and np.array_equal(got, want), type(given)
    assert mask_batch(np.stack([gray, 255 - gray])).shape == (2, 2, 2, 1)
    square = np.zeros((SIZE, SIZE), np.uint8)
    with generate_calls(pipe) as calls:
        for kw, message in [
                (dict(mask_images=square), "mask_images mark what to repaint of init_images .* give init_images"),
                (dict(init_images=init_image, mask_images=square[:16]),
                 f"mask_images are {SIZE}x16 and init_images {SIZE}x{SIZE}"),
                (dict(init_images=init_image, mask_images=square.astype(np.int32)), "mask_images has dtype int32"),
                (dict(init_images=init_image, mask_images=square.astype(np.float32) + 2),
                 r"float masks must be in \[0, 1\], got values in 2..2"),
                (dict(init_images=init_image, mask_images=np.zeros((1, SIZE, SIZE, 2))),
                 r"mask_images has shape \(1, 32, 32, 2\); expected a mask \[height, width\]"),
                (dict(init_images=init_image, mask_images=np.zeros((SIZE, SIZE, 3), np.uint8)),
                 r"mask_images has shape \(32, 32, 3\): colour pixels .*give one channel"),
                (dict(init_images=init_image, mask_images=np.zeros((0, SIZE, SIZE))), "has shape .*: no pixels"),
                (dict(init_images=init_image, mask_images=[square, square[:8]]), "the masks differ in size"),
                (dict(init_images=init_image, mask_images=square, mask_padding=-1), "mask_padding=-1: must be a whole"),
                (dict(init_images=init_image, mask_images=square, mask_padding=4.0), "=4.0: must be a whole number"),
                (dict(init_images=init_image, mask_padding=4), "mask_padding inpaints the box around a mask: give one"),
                (dict(init_images=init_image, mask_images=np.stack([square] * 2), mask_padding=4), "give one init"),
                (dict(init_images=init_image, mask_images=square + 255, mask_padding=4, return_intermediates=2),
                 "return_intermediates is not available with mask_padding"),
                (dict(init_images=init_image, mask_images=square + 100, mask_padding=4),
                 r"mask_images is black everywhere \(cut at half gray\): mask_padding finds no box"),
                (dict(init_images=init_image, mask_images=np.pad(np.ones((1, 1), bool), (15, 16)), mask_padding=4,
                      mask_blur=4), r"black everywhere \(cut at half gray after mask_blur=4\): mask_padding finds"),
                (dict(init_images=init_image, mask_images=square, mask_blur=-1), "mask_blur=-1: must be a number of "
                 "pixels >= 0"),
                (dict(init_images=init_image, mask_images=square, mask_blur="4"), "mask_blur='4' is not a number"),
                (dict(init_images=init_image, mask_blur=2), "mask_blur=2 softens an inpainting mask's edge: give "
                 "mask_images"),
                (dict(init_images=init_image, mask_images=square + 255, mask_padding=4, height=12),
                 "height=12: must be a positive multiple of 8 .*mask_padding"),
                (dict(init_images=init_image, mask_images=np.stack([square] * 3), seeds=[0, 1]),
                 r"seeds has 2 entries; expected 1 or 3 to match mask_images \(3 entries\)")]:
            with pytest.raises((ValueError, TypeError), match=message):
                pipe("a cat", num_inference_steps=STEPS, **kw)
    assert calls == []


def test_denoise_names_an_inpainting_unets_missing_inputs():
    """`denoise` with an inpainting UNet's config (9 input channels) and 4-channel latents but no extra
    inputs, or extra inputs of the wrong size, is an error saying what to give."""
    from types import SimpleNamespace
    from sdjax.sampling import denoise
    from sdjax.schedulers import make_scheduler
    from conftest import SD15_SCHEDULER
    unet = SimpleNamespace(config=SimpleNamespace(in_channels=9, cross_attention_dim=(32,)))
    sched = make_scheduler("ddim", SD15_SCHEDULER, 2)
    latents, text = np.zeros((2, 4, 4, 4), np.float32), np.zeros((2, 77, 32), np.float32)
    with pytest.raises(ValueError, match="the UNet takes 9 input channels and latents_BHWC has 4: an inpainting UNet, "
                                         r"whose other 5 .* are unet_extra_BHWC \(inpainting_inputs\)"):
        denoise(unet, sched, latents, text)
    with pytest.raises(ValueError, match=r"unet_extra_BHWC has shape \(2, 8, 8, 5\); expected \[2 or 1, 4, 4, "):
        denoise(unet, sched, latents, text, unet_extra_BHWC=np.zeros((2, 8, 8, 5), np.float32))


@pytest.mark.parametrize("blur", [0, 3])
def test_only_masked_matches_diffusers_padding_mask_crop(blur, pipe, reference_pipe, monkeypatch):
    """mask_padding (A1111's "Only masked"): diffusers' padding_mask_crop images, from a picture larger
    than the size it is made at (its box around the mask, padded and grown to that aspect, resized, inpainted,
    resized back and pasted), the picture's own pixels where the mask is black. The box, the resizes and the
    paste alone equal diffusers' on thousands of random cases (a one-off fuzz); here the whole call. With
    mask_blur (A1111's Mask blur), diffusers' given the blurred mask: its box is the blur's, the model's mask
    the blur cut at half gray, the paste blended through the blur's grays, in A1111 and diffusers alike."""
    from diffusers import StableDiffusionInpaintPipeline
    from sdjax.images import as_pil, blur_mask, mask_batch
    ref = StableDiffusionInpaintPipeline(**reference_pipe.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(reference_pipe, "pndm")
    rng = np.random.default_rng(8)
    picture = Image.fromarray(rng.integers(0, 256, (56, 72, 3), np.uint8))   # 72x56, made at 32x32
    mask = np.zeros((56, 72), np.uint8)
    mask[30:44, 40:52] = 255
    mask = Image.fromarray(mask)
    given = as_pil(blur_mask(mask_batch(mask), blur)[0, :, :, 0])
    noise, seeds = latents_for(2, seed=9), [7, 8]
    left = patch_reference(monkeypatch, noise, [posterior_draws(posterior_keys(image_keys(seeds))), None])
    ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, latents=noise,
                init_images=picture, mask_images=mask, mask_padding=6, mask_blur=blur, height=SIZE, width=SIZE)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=picture, mask_image=given, padding_mask_crop=6,
               height=SIZE, width=SIZE, num_inference_steps=STEPS).images
    assert left == []
    want = np.stack([np.asarray(w) for w in want]).astype(np.float32) / 255
    assert ours.images.shape == want.shape == (2, 56, 72, 3)
    assert np.abs(ours.images - want).max() <= 1 / 255 + 1e-6   # (each rounded to 8 bits from within 2e-5)
    keep = np.asarray(given) == 0
    assert keep.sum() < (np.asarray(mask) == 0).sum() - 150 if blur else np.array_equal(given, mask)
    assert np.array_equal(ours.images[0][keep], np.asarray(picture)[keep] / np.float32(255))
    assert np.abs(ours.images[0][~keep] - np.asarray(picture)[~keep] / 255).mean() > 0.02


def test_mask_blur_lays_the_picture_back_as_a1111(pipe, reference_pipe, init_image, monkeypatch):
    """mask_blur (A1111's Mask blur) over the whole picture: diffusers' inpainting images made with the
    blurred masks (which its pipeline cuts at half gray, as sdjax cuts them for the model), then the picture
    laid back over each through A1111's overlay mask, the blur's grays doubled (diffusers' ``apply_overlay``,
    in 8 bits): within an 8-bit level. Where that mask is black, the init image's own pixels (the model's
    differ there: the VAE changes every pixel); where it is white, the model's."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.image_processor import VaeImageProcessor
    from sdjax.images import as_pil, blur_mask, mask_batch
    ref = StableDiffusionInpaintPipeline(**reference_pipe.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(reference_pipe, "euler")
    blurred = blur_mask(mask_batch(masks()), 2)
    noise, seeds = latents_for(2, seed=6), [3, 4]
    left = patch_reference(monkeypatch, noise, [posterior_draws(posterior_keys(image_keys(seeds))), None])
    ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, scheduler="euler",
                latents=noise, init_images=init_image, mask_images=masks(), mask_blur=2).images
    model = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init_image, 2, axis=0),
                mask_image=[as_pil(b[..., 0]) for b in blurred], num_inference_steps=STEPS, output_type="np").images
    assert left == []
    overlay = np.minimum(2 * blurred, 1)   # (A1111: np.clip(mask * 2, 0, 255) of the blurred uint8 mask)
    want = np.stack([np.asarray(VaeImageProcessor.apply_overlay(None, as_pil(m[..., 0]), as_pil(init_image[0]),
                                                                as_pil(image))) for m, image in zip(overlay, model)])
    assert ours.shape == want.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours - want / 255).max() <= 2 / 255   # (PIL's overlay is 8-bit, through premultiplied alpha)
    pictures = np.repeat(init_image, 2, axis=0)
    assert np.abs(ours - (model * overlay + pictures * (1 - overlay))).max() <= 2e-5   # (sdjax's: in floats)
    keep, made = np.repeat(overlay == 0, 3, -1), np.repeat(overlay == 1, 3, -1)
    assert keep.any() and made.any() and (~keep & ~made).any()   # (the blur's seam between them)
    assert np.array_equal(ours[keep], pictures[keep])
    assert np.abs(model[keep] - pictures[keep]).mean() > 0.01
    assert np.abs(ours[made] - model[made]).max() <= 2e-5


def test_blur_mask_is_a1111s_gaussian():
    """`blur_mask` is A1111's Mask blur (OpenCV's GaussianBlur as it calls it): a pass across, then one down,
    each of the taps exp(-x^2 / 2 sigma^2) for |x| <= int(2.5 sigma + 0.5), summing to 1, rounded to 8 bits
    (to one level: OpenCV sums 8-bit pixels in fixed point); at an edge the mask mirrored about its edge
    pixel (OpenCV's default border, gfedcb|abcdefgh)."""
    from sdjax.images import blur_mask
    sigma = 2
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    impulse = np.zeros((1, 21, 21, 1), np.float32)
    impulse[0, 10, 10] = 1
    across = np.floor(255 * taps + 0.5)   # the row through the impulse after the first pass
    want = np.zeros((21, 21))
    want[10 - radius: 11 + radius, 10 - radius: 11 + radius] = np.floor(np.outer(taps, across) + 0.5)
    got = blur_mask(impulse, sigma)
    assert got.shape == impulse.shape and got.dtype == np.float32
    assert np.abs(np.round(got[0, :, :, 0] * 255) - want).max() <= 1
    # a white pixel next to the left edge: mirrored about the edge pixel, it is also 2 pixels left of it
    row = np.zeros((1, 1, 12, 1), np.float32)
    row[0, 0, 1] = 1
    tap = lambda d: taps[d + radius] if abs(d) <= radius else 0.0  # noqa: E731
    want = [np.floor(255 * (tap(j - 1) + tap(j + 1)) + 0.5) for j in range(12)]
    assert np.abs(np.round(blur_mask(row, sigma)[0, 0, :, 0] * 255) - want).max() <= 1
    assert np.array_equal(blur_mask(impulse, 0), impulse)


def test_only_masked_box_resizes_and_paste_equal_diffusers():
    """`mask_crop_region`, `resize_to_fill` and `paste_into` against diffusers' VaeImageProcessor
    (``get_crop_region``, ``resize_mode="fill"``, ``apply_overlay``) on random pictures, masks (one box, or
    scattered, or soft), sizes and paddings: equal, pixel for pixel."""
    from diffusers.image_processor import VaeImageProcessor
    from sdjax.images import mask_crop_region, paste_into, resize_to_fill
    proc = VaeImageProcessor(vae_scale_factor=8)
    rng = np.random.default_rng(0)
    for _ in range(300):
        H, W = rng.integers(8, 90, 2)
        mask = np.zeros((H, W), np.uint8)
        y, x = rng.integers(0, H), rng.integers(0, W)
        mask[y:y + rng.integers(1, H), x:x + rng.integers(1, W)] = 255
        w, h, pad = int(rng.integers(1, 12)) * 8, int(rng.integers(1, 12)) * 8, int(rng.integers(0, 40))
        assert mask_crop_region(mask > 0, w, h, pad) == tuple(proc.get_crop_region(Image.fromarray(mask), w, h, pad))
    for i in range(60):
        H, W = rng.integers(16, 80, 2)
        picture = Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8))
        w, h = int(rng.integers(1, 10)) * 8, int(rng.integers(1, 10)) * 8
        assert np.array_equal(np.asarray(resize_to_fill(picture, w, h)),
                              np.asarray(proc._resize_and_fill(picture, w, h)))
        soft = rng.integers(0, 256, (H, W), np.uint8)
        mask = Image.fromarray(soft if i % 2 else (soft > 180).astype(np.uint8) * 255)
        region = proc.get_crop_region(mask, w, h, pad=int(rng.integers(0, 20)))
        made = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        assert np.array_equal(np.asarray(paste_into(picture, mask, made, region)),
                              np.asarray(proc.apply_overlay(mask, picture, made, region)))
    with pytest.raises(ValueError, match="the mask is black everywhere"):
        mask_crop_region(np.zeros((8, 8), bool), 8, 8, 4)
    # a gray mask is cut at half gray first (as A1111 does; the README says so): its box is the cut's, where
    # diffusers' takes in every pixel above black
    from sdjax.images import image_batch, mask_batch
    from sdjax.pipeline import _crop_to_mask
    soft = np.zeros((40, 60), np.uint8)
    soft[5:30, 10:40], soft[15:20, 25:30] = 60, 255
    picture = image_batch(rng.integers(0, 256, (40, 60, 3), np.uint8))[0]
    region = _crop_to_mask(picture, mask_batch(soft)[0], 16, 16, 2)[2]
    assert region == mask_crop_region(soft >= 128, 16, 16, 2) == (23, 13, 32, 22)
    assert tuple(proc.get_crop_region(Image.fromarray(soft), 16, 16, 2)) == (8, 1, 42, 35)


def test_masked_content_starts_the_repainted_part_as_a1111(pipe, init_image, monkeypatch):
    """AUTOMATIC1111's Masked content (below strength 1): "fill" gives the program the picture filled by
    `fill_masked` (the kept part as it is, the masked part the colours around it); "latent_noise" /
    "latent_nothing" fill it too and then put the seed's noise / zeros in its latents where the mask is (the
    latents started from and blended with; one compiled program for both), as A1111 makes them."""
    import jax.numpy as jnp
    from sdjax.images import as_pil, fill_masked
    from sdjax.sampling import encode_images, seed_noise
    mask = np.asarray(masks()[0])   # (the left half)
    seeds, recorded = [3, 4], []
    kind = type(pipe.make_scheduler("euler", 5))
    add_noise_at = kind.add_noise_at

    def spy(self, x0, noise, index):   # (the latents the part starts from, when the program runs)
        jax.debug.callback(lambda x: recorded.append(np.asarray(x)), x0)
        return add_noise_at(self, x0, noise, index)
    monkeypatch.setattr(kind, "add_noise_at", spy)
    kw = dict(seeds=seeds, num_inference_steps=5, strength=0.6, scheduler="euler", init_images=init_image,
              mask_images=mask)
    filled = np.asarray(fill_masked(as_pil(init_image[0]), Image.fromarray(mask)), np.float32)[None] / 255
    x0 = encode_images(pipe.vae, jnp.asarray(np.repeat(filled, 2, 0)), posterior_keys(image_keys(seeds)))
    noise = seed_noise(image_keys(seeds), (LATENT, LATENT, 4))
    part = np.zeros((1, LATENT, LATENT, 1), np.float32)
    part[:, :, : LATENT // 2] = 1
    images = {}
    for content, want in (("latent_noise", x0 * (1 - part) + noise * part), ("latent_nothing", x0 * (1 - part))):
        recorded.clear()
        images[content] = pipe(PROMPTS, masked_content=content, **kw).images
        assert recorded, content   # (the program traced with the spy: the start and every blend)
        for x in recorded:
            np.testing.assert_allclose(x[:2], np.asarray(want), atol=1e-5, err_msg=content)
    assert np.abs(images["latent_noise"] - images["latent_nothing"]).max() > 0.01
    two = np.zeros((SIZE, SIZE, 3), np.uint8)   # (blue where the mask is, red where it is not: all red after)
    two[:, : SIZE // 2], two[:, SIZE // 2:] = (20, 20, 220), (200, 30, 30)
    out = np.asarray(fill_masked(Image.fromarray(two), Image.fromarray(mask))).astype(np.int32)
    assert np.array_equal(out[:, SIZE // 2:], two[:, SIZE // 2:]) and np.abs(out - (200, 30, 30)).max() <= 6
    # fill: the program is given the filled pictures (each image's mask its own) as its init images

    class Stop(Exception):
        pass

    def program(*args, **kwargs):
        given.append(np.asarray(args[7]))   # (init_images_BHWC, split over the devices: padded)
        raise Stop
    given, kw = [], dict(seeds=seeds, num_inference_steps=STEPS, mask_images=masks())
    monkeypatch.setattr(pipe, "_generate", program)
    with pytest.raises(Stop):
        pipe(PROMPTS, masked_content="fill", init_images=init_image, **kw)
    filled = [np.asarray(fill_masked(as_pil(init_image[0]), m)) for m in masks()]
    np.testing.assert_array_equal(np.round(given[0][:2] * 255), np.stack(filled))
    # with mask_blur, each picture is filled through its blurred mask (with mask_padding: the blur's box)
    import sdjax.images
    masks_given = []

    def spy_fill(picture, mask):
        masks_given.append(np.asarray(mask))
        raise Stop
    monkeypatch.setattr(sdjax.images, "fill_masked", spy_fill)
    for padding in (None, 4):
        with pytest.raises(Stop):
            pipe(PROMPTS[0], masked_content="fill", init_images=init_image, mask_images=masks()[1], mask_blur=3,
                 mask_padding=padding, height=SIZE, width=SIZE)
        assert len(np.unique(masks_given[-1])) > 20, padding   # (the blur's grays, not a cut)
    with pytest.raises(ValueError, match="init_images has 2 entries and mask_images 3: give as many of each, or one"):
        pipe(PROMPTS[0], masked_content="fill", init_images=np.repeat(init_image, 2, 0), mask_images=masks()[:1] * 3)
    with pytest.raises(ValueError, match="masked_content='fill' is what the part an inpainting mask marks starts "
                                         "from: give mask_images"):
        pipe(PROMPTS, masked_content="fill", init_images=init_image, strength=0.6)
    with pytest.raises(ValueError, match="masked_content='latent': choose one of original, fill, latent_noise, "
                                         "latent_nothing"):
        pipe(PROMPTS, masked_content="latent", init_images=init_image, **kw)
