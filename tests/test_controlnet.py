"""ControlNet (sdjax.models.ControlNetModel, sampling.ControlledUNet) against diffusers' ControlNetModel,
its UNet's additional residuals and StableDiffusionControlNetPipeline, on tiny random weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference as R
from sdjax.models import ControlNetConfig, ControlNetModel, UNet2DConditionModel, UNetConfig
from test_sampling import NEGATIVES, PROMPTS, SIZE, STEPS, diffusers_scheduler, latents_for


def controlnet_config(unet_config: dict) -> dict:
    """A ControlNet for a UNet of ``unet_config``: its blocks; its control images at 2 pixels a latent (one
    stride-2 step), as the tiny VAE's."""
    config = {k: v for k, v in unet_config.items() if k not in ("up_block_types", "out_channels", "sample_size")}
    return {**config, "conditioning_embedding_out_channels": (8, 16)}


TINY_CONTROLNET = controlnet_config(R.TINY_UNET)


def torch_controlnet(seed=0, **config):
    from diffusers import ControlNetModel as TorchControlNet
    torch.manual_seed(seed)
    return R.perturb_(TorchControlNet(**{**TINY_CONTROLNET, **config}), seed)   # (its zero convs made random)


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def reference(kind: str, reference_pipe, *controlnet_dirs, scheduler="pndm"):
    """diffusers' ControlNet pipeline of ``kind`` ("", "Img2Img", "Inpaint") on the tiny pipeline's parts,
    with the ControlNet(s) of ``controlnet_dirs`` and ``scheduler``, its progress bar off."""
    import diffusers
    from diffusers import ControlNetModel as TorchControlNet
    nets = [TorchControlNet.from_pretrained(d) for d in controlnet_dirs]
    ref = getattr(diffusers, f"StableDiffusionControlNet{kind}Pipeline")(
        **reference_pipe.components, controlnet=nets if len(nets) > 1 else nets[0])
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(reference_pipe, scheduler)
    return ref


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    torch_controlnet(seed=4).save_pretrained(folder)
    return folder


def inputs(seed, batch=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, SIZE // 2, SIZE // 2, 4)).astype(np.float32),
            np.array([3.0, 700.0][:batch], np.float32),
            rng.standard_normal((batch, 77, 32)).astype(np.float32),
            rng.uniform(0, 1, (batch, SIZE, SIZE, 3)).astype(np.float32))


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_controlnet_matches_diffusers(order, tmp_path):
    """The residuals for each skip connection and the mid block, times the conditioning scale, from a
    diffusers ControlNet's saved weights (its zero convs random), the control image's channels in the
    config's order."""
    from diffusers import ControlNetModel as TorchControlNet
    ref = torch_controlnet(seed=1, controlnet_conditioning_channel_order=order)
    ref.save_pretrained(tmp_path)
    ours = ControlNetModel.from_pretrained(tmp_path)
    assert ours.config.controlnet_conditioning_channel_order == order and ours.config.image_scale == 2
    x, t, text, image = inputs(0)
    down, mid = ours(x, t, text, image, 0.7)
    with torch.no_grad():
        want_down, want_mid = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(text), nchw(image),
                                  conditioning_scale=0.7, return_dict=False)
    levels, layers = len(TINY_CONTROLNET["block_out_channels"]), TINY_CONTROLNET["layers_per_block"]
    assert len(down) == len(want_down) == 1 + levels * layers + levels - 1   # (conv_in's, a layer's, a downsampler's)
    for a, b in zip(down, want_down):
        assert a.shape == nhwc(b).shape and np.abs(np.asarray(a) - nhwc(b)).max() <= 2e-5
    assert np.abs(np.asarray(mid) - nhwc(want_mid)).max() <= 2e-5 and np.abs(nhwc(want_mid)).mean() > 0.01
    # written back, diffusers loads it and gives the same
    ours.save_pretrained(tmp_path / "saved")
    again = TorchControlNet.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        _, mid_again = again(nchw(x), torch.from_numpy(t), torch.from_numpy(text), nchw(image),
                             conditioning_scale=0.7, return_dict=False)
    assert np.abs(nhwc(mid_again) - nhwc(want_mid)).max() <= 1e-6


def test_unet_adds_the_residuals_as_diffusers(tmp_path):
    """down_block_additional_residuals and mid_block_additional_residual: added to the skip connections
    and to the mid block's output, as diffusers' UNet adds them."""
    from flax import nnx
    ref = R.torch_unet(seed=2)
    unet = UNet2DConditionModel.from_pretrained(R.save_torch_layout(ref, tmp_path).parent)
    x, t, text, image = inputs(1)
    controlnet = ControlNetModel(ControlNetConfig.from_dict(TINY_CONTROLNET), rngs=nnx.Rngs(0))
    down, mid = controlnet(x, t, text, image)
    down = tuple(d * 10 for d in down)   # (random init: small residuals; these change the output plainly)
    ours = unet(x, t, text, down, mid * 10)
    with torch.no_grad():
        want = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(text),
                   down_block_additional_residuals=[nchw(d) for d in down],
                   mid_block_additional_residual=nchw(mid * 10)).sample
        plain = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(text)).sample
    assert np.abs(np.asarray(ours) - nhwc(want)).max() <= 2e-5
    assert np.abs(nhwc(want) - nhwc(plain)).mean() > 0.01
    with pytest.raises(ValueError, match=r"down_block_additional_residuals have shapes \[\(2, 16, 16, 32\)\]; the "
                                         r"skip connections' are \[\(2, 16, 16, 32\), "):
        jax.eval_shape(lambda: unet(x, t, text, down[:1], mid))   # (raised while tracing: nothing computed)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual has shape \(2, 8, 8, 32\); the mid block's "
                                         r"output is \(2, 8, 8, 64\)"):
        jax.eval_shape(lambda: unet(x, t, text, down, mid[..., :32]))


def test_controlled_sampling_matches_diffusers_controlnet_pipeline(pipe, reference_pipe, controlnet_dir):
    """`denoise` of a `ControlledUNet` (the ControlNet's residuals at every UNet call, guidance's rows
    repeating their image's control image), between sdjax's text encoding and decoding: the images of
    diffusers' StableDiffusionControlNetPipeline from the same noise, one control image per image."""
    from sdjax.sampling import ControlledUNet, decode_latents, denoise, encode_prompts
    from sdjax.text import tokenize
    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    ref = reference("", reference_pipe, controlnet_dir)
    noise = latents_for(2, seed=3)
    images = np.random.default_rng(4).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    sched = pipe.make_scheduler("pndm", STEPS)

    @jax.jit
    def run(noise, images):
        cond = encode_prompts(pipe.text_encoder, tokenize(pipe.tokenizer, PROMPTS))
        uncond = encode_prompts(pipe.text_encoder, tokenize(pipe.tokenizer, NEGATIVES))
        latents = denoise(ControlledUNet(pipe.unet, controlnet, images, 0.8), sched, noise * sched.init_noise_sigma,
                          cond, uncond, 7.5)
        return decode_latents(pipe.vae, latents)
    ours = np.asarray(run(jnp.asarray(noise), jnp.asarray(images)))
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=images, latents=nchw(noise), num_inference_steps=STEPS,
               guidance_scale=7.5, controlnet_conditioning_scale=0.8, height=SIZE, width=SIZE,
               output_type="np").images
    plain = reference_pipe(PROMPTS, negative_prompt=NEGATIVES, latents=nchw(noise), num_inference_steps=STEPS,
                           height=SIZE, width=SIZE, output_type="np").images
    assert ours.shape == want.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours - want).max() <= 2e-5
    assert np.abs(want - plain).mean() > 0.01   # (the ControlNet steered the images)


def test_controlnet_errors_name_the_problem(tmp_path):
    """A control image of the wrong size or batch, and a config sdjax does not build, are errors that
    say so."""
    import json
    from flax import nnx
    from sdjax.sampling import ControlledUNet
    from sdjax.weights import CheckpointError
    controlnet = ControlNetModel(ControlNetConfig.from_dict(TINY_CONTROLNET), rngs=nnx.Rngs(0))
    x, t, text, image = inputs(2)
    with pytest.raises(ValueError, match=r"controlnet_cond_BHWC has shape \(2, 16, 16, 3\); expected \(2, 32, 32, 3\)"
                                         ": the control image at 2 pixels a latent"):
        controlnet(x, t, text, image[:, :16, :16])
    with pytest.raises(ValueError, match=r"control_images_BHWC has 3 images for a UNet call of 2 rows"):
        ControlledUNet(None, controlnet, np.concatenate([image, image[:1]]))(x, t, text)
    from sdjax.sampling import control_scales, denoise
    from sdjax.schedulers import make_scheduler
    from conftest import SD15_SCHEDULER
    sched = make_scheduler("ddim", SD15_SCHEDULER, 4)
    assert control_scales(4, 0.5, 0.25, 0.75).tolist() == [0, 0.5, 0.5, 0]   # (diffusers' controlnet_keep)
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(dict(R.TINY_UNET), rngs=nnx.Rngs(0)))   # (never run)
    with pytest.raises(ValueError, match=r"conditioning_scale has shape \(3,\); expected a number or one per model "
                                         r"call run \(4: control_scales\)"):
        denoise(ControlledUNet(unet, controlnet, image, control_scales(3)), sched, x, text)
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONTROLNET, "global_pool_conditions": True}))
    with pytest.raises(CheckpointError, match="global_pool_conditions=True .* is not supported"):
        ControlNetModel.from_pretrained(tmp_path)


def test_pipeline_makes_controlled_images_as_diffusers(pipe, reference_pipe, controlnet_dir, monkeypatch):
    """pipe.load_controlnet(folder), then pipe(..., control_images=): diffusers' StableDiffusionControlNetPipeline
    images from the same noise, with a control image each or one for both (on 8 devices), and with a
    control_guidance_start / end; another scale or window compiles nothing; a call without control images
    runs the plain program, given no control inputs; with init images, diffusers' ControlNet img2img pipeline's;
    load_controlnet(None) takes the ControlNet away."""
    ref = reference("", reference_pipe, controlnet_dir)
    noise = latents_for(2, seed=5)
    images = np.random.default_rng(6).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    kw = dict(negative_prompts=NEGATIVES, seeds=[1, 2], num_inference_steps=STEPS, latents=noise)
    assert pipe.load_controlnet(controlnet_dir) is pipe.controlnet
    from flax import nnx
    held = jax.tree.leaves(nnx.to_pure_dict(nnx.state(pipe.controlnet)))   # (one copy a device: the replicated)
    assert all(a is b for a, b in zip(held, jax.tree.leaves(pipe._controlnet_state)))
    assert all(len(a.sharding.device_set) == len(jax.devices()) for a in held)
    try:
        first = None
        for given, scale, window in ((images, 0.8, (0, 1)), (images, 1.3, (0.2, 0.7)), (images[:1], 1.0, (0, 1))):
            ours = pipe(PROMPTS, control_images=given, controlnet_conditioning_scale=scale,
                        control_guidance_start=window[0], control_guidance_end=window[1], **kw).images
            want = ref(PROMPTS, negative_prompt=NEGATIVES, image=given, latents=nchw(noise), num_inference_steps=STEPS,
                       controlnet_conditioning_scale=scale, control_guidance_start=window[0],
                       control_guidance_end=window[1], height=SIZE, width=SIZE, output_type="np").images
            assert np.abs(ours - want).max() <= 2e-5, scale
            first = ours if first is None else first
            if scale == 1.3:
                assert pipe._controlled._cache_size() == 1   # (the scales are an input)
        class Plain(Exception):
            pass

        def plain(*args, **kwargs):   # (a call without control images: the program of before, with its inputs)
            assert not any(k.startswith("control") for k in kwargs)
            raise Plain
        monkeypatch.setattr(pipe, "_generate", plain)
        with pytest.raises(Plain):
            next(pipe.batches(PROMPTS, height=SIZE, width=SIZE, **kw))
        monkeypatch.undo()
        # img2img steered too: diffusers' StableDiffusionControlNetImg2ImgPipeline (its draws the seeds')
        from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as img2img
        from sdjax.sampling import image_keys, posterior_keys
        draws = jax.vmap(lambda k: jax.random.normal(k, (SIZE // 2, SIZE // 2, 4)))(posterior_keys(image_keys([1, 2])))
        monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **_: nchw(noise))
        monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                            out.latent_dist.mean + out.latent_dist.std * nchw(draws))
        ref = reference("Img2Img", reference_pipe, controlnet_dir, scheduler="euler")
        init = np.random.default_rng(7).uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
        ours = pipe(PROMPTS, init_images=init, strength=0.6, scheduler="euler", control_images=images,
                    controlnet_conditioning_scale=0.8, **kw).images
        want = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init, 2, axis=0), control_image=images,
                   strength=0.6, num_inference_steps=STEPS, controlnet_conditioning_scale=0.8, height=SIZE,
                   width=SIZE, output_type="np").images
        assert np.abs(ours - want).max() <= 2e-5
        # batches() takes the ControlNet as it is when called: another loaded before the first batch changes nothing
        pipe.load_controlnet(controlnet_dir)
        later = pipe.batches(PROMPTS, control_images=images, controlnet_conditioning_scale=0.8, **kw)
        pipe.load_controlnet(None)
        assert np.array_equal(next(later).images, first)
    finally:
        pipe.load_controlnet(None)
    assert pipe.controlnet is None


def test_pipeline_control_images_are_checked(pipe, controlnet_dir):
    """Control images without a ControlNet, of another size, with mask_padding, a scale that
    is no number, and a ControlNet made for another model are errors naming them, before anything runs."""
    from flax import nnx
    from sdjax import HiresFix
    from sdjax.weights import CheckpointError
    from test_sampling import generate_calls
    square = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match=r"control_images steer the images through a ControlNet: load one first"):
        pipe("a cat", control_images=square)
    wide = ControlNetModel(ControlNetConfig.from_dict({**TINY_CONTROLNET, "block_out_channels": (32, 128)}),
                           rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"the ControlNet's the residuals' channels .* are \[32, 32, 32, 128\], "
                                              r"this pipeline's \[32, 32, 32, 64\]: a ControlNet made for another "
                                              r"model"):
        pipe.load_controlnet(wide)
    assert pipe.controlnet is None
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such ControlNet file"):
        pipe.load_controlnet(controlnet_dir / "nope.pth")
    pipe.load_controlnet(controlnet_dir, variant="fp16")   # (a variant it lacks: its plain weights, as a part's)
    try:
        with generate_calls(pipe) as calls:
            for kw, message in [
                    (dict(control_images=square[:16]), f"control_images are {SIZE}x16 and the images {SIZE}x{SIZE}"),
                    (dict(control_images=square, hires=HiresFix(2.0, strength=0.05)), "denoises no step"),
                    (dict(control_images=square, init_images=square, mask_images=square[..., 0] + 255,
                          mask_padding=4), "not available with mask_padding"),
                    (dict(control_images=square, controlnet_conditioning_scale="x"), "'x' is not a number"),
                    (dict(control_images=square, controlnet_conditioning_scale=float("nan")), "not a finite number"),
                    (dict(control_images=square, control_guidance_end=1.5), r"control_guidance_end=1.5: must be a "
                     r"number in \[0, 1\]"),
                    (dict(control_images=square, control_guidance_start=0.5, control_guidance_end=0.5),
                     "control_guidance_start=0.5 must be below control_guidance_end=0.5"),
                    (dict(control_images=square, control_mode="guess"), "control_mode='guess': choose one of "
                     "balanced, prompt, controlnet"),
                    (dict(control_images=np.stack([square] * 3), seeds=[0, 1]),
                     r"seeds has 2 entries; expected 1 or 3 to match control_images \(3 entries\)")]:
                with pytest.raises((ValueError, TypeError), match=message):
                    pipe("a cat", num_inference_steps=STEPS, height=SIZE, width=SIZE, **kw)
        assert calls == []

        class Called(Exception):
            pass

        def controlled(*args, **kwargs):   # (the Control Mode reaches the sampler as its static argument)
            raise Called(kwargs["control_mode"])
        pipe._controlled = controlled
        with pytest.raises(Called, match="controlnet"):
            pipe("a cat", num_inference_steps=STEPS, control_images=square, control_mode="controlnet")
    finally:
        pipe.load_controlnet(None)


def test_pipeline_inpaints_with_a_controlnet_as_diffusers(pipe, reference_pipe, controlnet_dir, monkeypatch):
    """Inpainting (a text-to-image UNet, each image its own mask) steered by a ControlNet: diffusers'
    StableDiffusionControlNetInpaintPipeline's images, its noise and VAE draws the seeds'."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as inpaint
    from sdjax.sampling import image_keys, posterior_keys
    from test_inpainting import masks, posterior_draws
    ref = reference("Inpaint", reference_pipe, controlnet_dir, scheduler="euler")
    noise, seeds = latents_for(2, seed=6), [3, 4]
    draws = [posterior_draws(posterior_keys(image_keys(seeds))), None]   # (the init images', the masked ones')
    monkeypatch.setattr(inpaint, "randn_tensor", lambda shape, **_: nchw(noise))
    monkeypatch.setattr(inpaint, "retrieve_latents", lambda out, generator=None, sample_mode="sample": (
        out.latent_dist.mean if (d := draws.pop(0)) is None else out.latent_dist.mean + out.latent_dist.std * nchw(d)))
    init = np.random.default_rng(5).uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    control = np.random.default_rng(9).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    pipe.load_controlnet(controlnet_dir)
    try:
        ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=seeds, num_inference_steps=STEPS, scheduler="euler",
                    latents=noise, init_images=init, mask_images=masks(), control_images=control,
                    controlnet_conditioning_scale=0.8).images
    finally:
        pipe.load_controlnet(None)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=np.repeat(init, 2, axis=0), mask_image=masks(),
               control_image=control, num_inference_steps=STEPS, controlnet_conditioning_scale=0.8, height=SIZE,
               width=SIZE, output_type="np").images
    assert draws == [] and np.abs(ours - want).max() <= 2e-5


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_original_layout_file_loads_as_diffusers_converts_it(fmt, pipe, tmp_path):
    """A ControlNet file in the original layout (lllyasviel's .pth, A1111's models/ControlNet .safetensors;
    with ``control_model.`` or without): its names are those diffusers' own converter
    (``convert_controlnet_checkpoint``) takes to diffusers' names, the control image's encoder widths
    are read from its shapes, and it gives the diffusers ControlNet's residuals; load_controlnet takes it
    by its path. (The deep UNet's blocks: the original layout numbers layers over several a block and level.)"""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import save_file
    from sdjax.weights import load_controlnet_file, ldm_controlnet_key
    config = {**controlnet_config(R.TINY_UNET_DEEP), "conditioning_embedding_out_channels": (16, 32, 96, 256)}
    ref = torch_controlnet(seed=6, **config)   # (SD's conditioning widths: 8 px a latent)
    state = ref.state_dict()
    original = {ldm_controlnet_key(k, ControlNetConfig.from_dict(config)): v for k, v in state.items()}
    back = convert_controlnet_checkpoint(original, {"layers_per_block": config["layers_per_block"]})
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    path = tmp_path / f"control_tiny.{fmt}"
    if fmt == "safetensors":
        save_file(original, str(path))
    else:
        torch.save({f"control_model.{k}": v for k, v in original.items()}, path)
    ours = load_controlnet_file(path, UNetConfig.from_dict(dict(R.TINY_UNET_DEEP)))
    assert ours.config.conditioning_embedding_out_channels == (16, 32, 96, 256) and ours.config.image_scale == 8
    rng = np.random.default_rng(3)
    x, text = rng.standard_normal((1, 4, 4, 4)).astype(np.float32), rng.standard_normal((1, 77, 32)).astype(np.float32)
    image = rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    _, mid = ours(x, np.float32(500), text, image)
    with torch.no_grad():
        _, want = ref(nchw(x), torch.tensor([500.0]), torch.from_numpy(text), nchw(image), return_dict=False)
    assert np.abs(np.asarray(mid) - nhwc(want)).max() <= 2e-5
    from flax import nnx   # (as its diffusers folder: the same compiled program)
    ref.save_pretrained(tmp_path / "folder")
    assert nnx.graphdef(ours) == nnx.graphdef(ControlNetModel.from_pretrained(tmp_path / "folder"))
    tiny_config = {**TINY_CONTROLNET, "conditioning_embedding_out_channels": (16, 32, 96, 256)}
    save_file({ldm_controlnet_key(k, ControlNetConfig.from_dict(tiny_config)): v
               for k, v in torch_controlnet(seed=6, **tiny_config).state_dict().items()},
              str(tmp_path / "for_tiny.safetensors"))
    with pytest.raises(Exception, match="control image pixels a latent .* are 8, this pipeline's 2"):
        pipe.load_controlnet(tmp_path / "for_tiny.safetensors")   # (the tiny pipeline's VAE: 2 pixels a latent)
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(tmp_path / "not.safetensors"))
    with pytest.raises(Exception, match=r"not\.safetensors: not a ControlNet: no 'input_hint_block\.\*'"):
        load_controlnet_file(tmp_path / "not.safetensors", UNetConfig.from_dict(dict(R.TINY_UNET)))


def test_pipeline_with_two_controlnets_as_diffusers(pipe, reference_pipe, controlnet_dir, tmp_path):
    """Two ControlNets at once (pipe.load_controlnet([a, b]); diffusers' MultiControlNetModel), each with
    its control images, scale and guidance window: their residuals add up, as in diffusers' pipeline;
    a call whose lists do not match the ControlNets is an error saying so."""
    torch_controlnet(seed=7).save_pretrained(tmp_path / "second")
    ref = reference("", reference_pipe, controlnet_dir, tmp_path / "second")
    noise = latents_for(2, seed=8)
    rng = np.random.default_rng(9)
    first, second = (rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32) for n in (2, 1))
    models = pipe.load_controlnet([controlnet_dir, tmp_path / "second"])
    try:
        assert isinstance(models, tuple) and pipe.controlnet == models and len(models) == 2
        kw = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.3],
                  control_guidance_end=[1.0, 0.9])
        ours = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=[1, 2], num_inference_steps=STEPS, latents=noise,
                    control_images=[first, second], **kw).images
        with pytest.raises(ValueError, match="2 ControlNets are loaded: control_images is a list of 2"):
            pipe(PROMPTS, control_images=first, num_inference_steps=STEPS)
        with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 entries for 2 ControlNets"):
            pipe(PROMPTS, control_images=[first, second], controlnet_conditioning_scale=[1, 1, 1])
    finally:
        pipe.load_controlnet(None)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=[first, np.repeat(second, 2, axis=0)], latents=nchw(noise),
               num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np", **kw).images
    assert np.abs(ours - want).max() <= 2e-5


def test_hires_fix_is_steered_in_both_passes(pipe, controlnet_dir):
    """With the Hires fix the ControlNet steers both passes: the images are the controlled first pass's
    (8-bit, resized with PIL's Lanczos) made again by controlled img2img at the larger size, the control
    images' 8-bit pictures resized alike (or hires_control_images, given at that size) and the guidance
    window over the second pass's own steps; with hires_control_mode, in that Control Mode (A1111's soft
    weights there after its canny preprocessor)."""
    from PIL import Image
    from sdjax import HiresFix
    from sdjax.images import as_pil
    images = np.random.default_rng(9).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    kw = dict(negative_prompts=NEGATIVES, seeds=[1, 2], scheduler="euler", control_images=images,
              controlnet_conditioning_scale=0.8, control_guidance_start=0.2, control_guidance_end=0.7)
    hires = HiresFix(scale=1.5, steps=6, strength=0.5, upscaler="lanczos")
    big = int(SIZE * 1.5) // 8 * 8
    pipe.load_controlnet(controlnet_dir)
    try:
        ours = pipe(PROMPTS, num_inference_steps=STEPS, hires=hires, **kw).images
        first = pipe(PROMPTS, num_inference_steps=STEPS, **kw).images
        resize = lambda xs: [as_pil(x).resize((big, big), Image.Resampling.LANCZOS) for x in xs]  # noqa: E731
        want = pipe(PROMPTS, num_inference_steps=6, init_images=resize(first), strength=0.5,
                    **{**kw, "control_images": resize(images)}).images
        # the second pass's own control images (as sample.py gives it each file resized to its size)
        large = np.random.default_rng(10).integers(0, 256, (2, big, big, 3), np.uint8)
        own = pipe(PROMPTS, num_inference_steps=STEPS, hires=hires, hires_control_images=large, **kw).images
        want_own = pipe(PROMPTS, num_inference_steps=6, init_images=resize(first), strength=0.5,
                        **{**kw, "control_images": large}).images
        with pytest.raises(ValueError, match=f"hires_control_images are {SIZE}x{SIZE} and the second pass's images "
                                             f"{big}x{big}"):
            pipe(PROMPTS, num_inference_steps=STEPS, hires=hires, hires_control_images=images, **kw)
        # (hires_control_mode: the second pass's program is called in that mode, the first's in control_mode; the
        # modes' own arithmetic is test_control_modes_weigh_and_place_the_residuals_as_a1111's)
        modes, program = [], pipe._controlled

        class SecondPass(Exception):
            pass

        def spy(*args, control_mode="balanced", **kwargs):
            modes.append(control_mode)
            if len(modes) == 2:
                raise SecondPass
            return program(*args, control_mode=control_mode, **kwargs)
        pipe._controlled = spy
        try:
            with pytest.raises(SecondPass):
                pipe(PROMPTS, num_inference_steps=STEPS, hires=hires, hires_control_mode="prompt", **kw)
        finally:
            pipe._controlled = program
        assert modes == ["balanced", "prompt"]
        with pytest.raises(ValueError, match="hires_control_mode is the Control Mode of the Hires fix's second pass: "
                                             "give control_images and hires too"):
            pipe(PROMPTS, num_inference_steps=STEPS, hires_control_mode="prompt", **kw)
    finally:
        pipe.load_controlnet(None)
    assert ours.shape == want.shape == (2, big, big, 3)
    assert np.abs(ours - want).max() <= 1e-5
    # (another control image for one call of the second pass's three: a small change, far above rounding)
    assert np.abs(own - want_own).max() <= 1e-5 and np.abs(own - ours).max() > 1e-3


@pytest.mark.parametrize("lengths", ["same", "other"])
def test_control_modes_weigh_and_place_the_residuals_as_a1111(lengths):
    """AUTOMATIC1111's Control Modes (its ControlNet extension, after ControlNet 1.1): "prompt" (My prompt is
    more important) multiplies residual i of the n (the mid block's last) by 0.825 ** (n - 1 - i);
    "controlnet" (ControlNet is more important) does so and leaves the negative prompt's rows of guidance
    unsteered; "balanced" is plain. Also with the negative prompt at another length (two UNet calls)."""
    from flax import nnx
    from sdjax.sampling import ControlledUNet, guided_model_output
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(R.TINY_UNET)), rngs=nnx.Rngs(1))
    controlnet = ControlNetModel(ControlNetConfig.from_dict(TINY_CONTROLNET), rngs=nnx.Rngs(2))
    x, _, cond, images = inputs(3)
    t = np.float32(400)
    uncond = np.random.default_rng(4).standard_normal((2, 77 if lengths == "same" else 154, 32)).astype(np.float32)
    scale, g = 8.0, 5.0   # (random zero convs: small residuals; scaled up, they change the output plainly)

    def unet_out(text, mode):   # one image-row block of text states, steered as the mode defines
        if mode is None:
            return unet(x, t, text)
        down, mid = controlnet(x, t, text, images, scale)
        if mode != "balanced":
            down = tuple(d * 0.825 ** (len(down) - i) for i, d in enumerate(down))   # (n = len(down) + 1)
        return unet(x, t, text, down, mid)

    outputs = {}
    for mode in ("balanced", "prompt", "controlnet"):
        ours = guided_model_output(ControlledUNet(unet, controlnet, images, scale, mode), x, t, cond, uncond, g)
        eps_u, eps_c = unet_out(uncond, None if mode == "controlnet" else mode), unet_out(cond, mode)
        assert np.abs(np.asarray(ours) - np.asarray(eps_u + g * (eps_c - eps_u))).max() <= 2e-5, mode
        outputs[mode] = np.asarray(ours)
    assert np.abs(outputs["prompt"] - outputs["balanced"]).max() > 0.01
    assert np.abs(outputs["controlnet"] - outputs["prompt"]).max() > 0.01
    # AUTOMATIC1111's AND: an image's negative prompt and its parts in one call (or two), the parts steered
    from sdjax.sampling import Composition
    parts = np.stack([cond, cond[::-1]], axis=1)   # [B, K=2, S, D]
    weights = np.array([[1.0, 0.5], [0.8, 1.2]], np.float32)
    ours = guided_model_output(ControlledUNet(unet, controlnet, images, scale, "controlnet"), x, t,
                               Composition(parts, weights), uncond, g)
    eps_u = unet_out(uncond, None)
    eps_k = [unet_out(parts[:, k], "controlnet") for k in range(2)]
    want = eps_u + g * sum(weights[:, k, None, None, None] * (eps_k[k] - eps_u) for k in range(2))
    assert np.abs(np.asarray(ours) - np.asarray(want)).max() <= 2e-5
    with pytest.raises(ValueError, match="control_mode='guess': expected one of balanced, prompt, controlnet"):
        ControlledUNet(unet, controlnet, images, scale, "guess")
