"""Fine-tuning learns: a tiny random model memorises four captioned images, and does so at least as
well as the same loop written with diffusers PyTorch (the yardstick), in the same number of steps.

The model is built so that "learned the data" is measurable. The VAE encoder is near-deterministic
(log-variance pinned at -20: std ~4.5e-5) and its ``scaling_factor`` is computed from the data so the
UNet-space latents have unit scale. A caption "generates its image" when the latents sampled for it
(DDIM, no guidance) land nearest (L2) to that image's training latents, for every caption and seed.
Latents are compared, not decoded pixels: the random decoder is not the encoder's inverse.

Choices that make this decidable in a few hundred CPU steps (each measured, both implementations
alike):

- ``prediction_type="v_prediction"`` in the scheduler config (SD 2.x's objective; sdjax and diffusers
  both read it from there). With epsilon prediction the clean-latent estimate at the first sampling
  steps is the epsilon error times 1/sqrt(alpha_bar) (13x at t=981): after 400 steps the loss had
  fallen 5x, yet generated latents were 12-24 (L2) from every training latent, and which image came
  out followed the seed, not the caption, in sdjax and PyTorch alike. v-prediction learns the caption's
  image at high noise directly; at 400 steps every caption gets its image, with the generated latents
  about half as far from their own image as from any other.
- 16x16 images (8x8x4 latents) that share half their pixels (a checkerboard): the training latents are
  8.6-10 apart, so the noise alone does not pick the image and the caption has to.

Both loops: the same pipeline folder, data, steps, batch (all four images each step), AdamW (lr,
betas, weight decay, eps) after global-norm clipping at 1, MSE on the v target, frozen VAE and CLIP.
The "final loss" compared is each trained UNet's loss on one fixed set of (image, timestep, noise)
triples, evaluated by the same PyTorch code (sdjax's UNet through its PyTorch-layout export), so the
sampling noise of the training curves does not decide it; the tails of the training curves are
compared too.

One run decides little about "as well as": at this learning rate training is chaotic. Both loops
see the same draws, yet their per-step losses differ by 1e-4 after 4 steps and by 10% after ~36
(rounding differences grow), and the end point moves with them. Measured fixed-set losses, seeds
0-3 (2026-11-23): sdjax 0.126 / 0.098 / 0.090 / 0.081 (the same in two runs; with optax's clipping
expression, equal up to rounding: 0.096 / 0.140 / 0.085 / 0.079); PyTorch 0.093 / 0.118 / 0.079 /
0.096 in one run and 0.093 / 0.162 / 0.076 / 0.077 in another (its VAE posterior sample came from
torch's global generator: see the last paragraph). Per seed sdjax / PyTorch ranged 0.60-1.35 (curve
tails 0.56-1.34); the 4-seed means were 0.97-1.04. Since 2026-12-06 the test process (8 CPU devices)
runs XLA:CPU's YNNPACK kernels (sdjax no longer swaps them for XLA's own on several devices, which
raced), and sdjax's end points moved: 0.140 /
0.142 / 0.074 / 0.093 against PyTorch's 0.093 / 0.162 / 0.076 / 0.077, per seed 1.50 / 0.88 / 0.98 / 1.19
(tails 1.48 / 0.87 / 0.99 / 1.21), means 1.10 (tails 1.11). So the default suite checks one seed against a
margin that covers that spread (0.60-1.50), and the opt-in slow test (``--runslow``) compares the means
over four seeds.

Until 2026-12-06 the yardstick drew its VAE posterior sample (``latent_dist.sample()``) from torch's
global generator, whose state depends on what ran before it in the process: the tests selected, the
order of the fixtures, whether ``accelerate`` is installed (without it diffusers' ``from_pretrained``
draws a random initialisation first). The draw is tiny (std ~4.5e-5), but training is chaotic: over 21
generator states its seed-0 fixed-set loss ranged 0.093-0.163 (sdjax / PyTorch 0.86-1.50), which is
what moved its end points between runs above. It now takes sdjax's own posterior draws (as it takes its
timesteps and noise) and is bit-stable: 0.099 / 0.122 / 0.094 / 0.090 (tails 0.104 / 0.109 / 0.084 /
0.093) against sdjax's 0.140 / 0.142 / 0.074 / 0.092, per seed 1.41 / 1.17 / 0.79 / 1.03 (tails 1.39 /
1.20 / 0.76 / 1.02), means 1.11 (tails 1.11); the first steps' losses now agree to ~1e-6.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import reference as R
from conftest import SD15_SCHEDULER

CAPTIONS = ["the red dog", "the blue cat", "a photo of the cat", "the dog in blue"]
RESOLUTION = 16                # latents 8x8x4 (the tiny VAE downsamples by 2)
OWN = 0.5                      # each image: half its own picture, half a shared checkerboard
PREDICTION_TYPE = "v_prediction"
STEPS = 400
LEARNING_RATE = 3e-3
LR_SCHEDULE = "cosine"          # decays to 0 at the last step: the end point varies less between runs
BATCH = len(CAPTIONS)          # every step sees every image (one device, no accumulation)
BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-2
SAMPLE_STEPS = 25
SEEDS = [0, 1, 2]
TAIL = STEPS // 5              # "final training loss": mean of the last 20% of steps
RUN_MARGIN = 1.6               # one seed: sdjax's fixed-set loss and tail <= 1.6 x PyTorch's (seen 0.60-1.50)
MEAN_SEEDS = [0, 1, 2, 3]      # the slow test: means over these seeds...
MEAN_MARGIN = 1.15             # ...sdjax's <= 1.15 x PyTorch's (seen 0.97-1.04)


def synthetic_images(r: int | None = None, *, own: float | None = None) -> list[np.ndarray]:
    """Four r x r RGB images: a shared black-and-white checkerboard blended with ``own`` of each
    image's own picture (red|blue halves, green stripes, a yellow-black checkerboard, a white disc)."""
    r = r or RESOLUTION
    own = OWN if own is None else own
    yy, xx = np.mgrid[0:r, 0:r] + 0.5
    shared = np.where((((yy * 4 // r) + (xx * 4 // r)) % 2 == 0)[..., None], [255, 255, 255], [0, 0, 0])
    halves = np.where((xx < r / 2)[..., None], [220, 30, 30], [30, 30, 220])
    stripes = np.where(((yy * 8 // r) % 2 == 0)[..., None], [30, 200, 60], [240, 240, 240])
    checker = np.where((((yy * 2 // r) + (xx * 2 // r)) % 2 == 0)[..., None], [250, 220, 20], [10, 10, 10])
    disc = np.where((((yy - r / 2) ** 2 + (xx - r / 2) ** 2) < (r / 3) ** 2)[..., None], [255, 255, 255],
                    [120, 30, 140])
    return [np.rint((1 - own) * shared + own * a).astype(np.uint8) for a in (halves, stripes, checker, disc)]


def to_pixels(images) -> np.ndarray:
    """uint8 HWC -> float32 [B, H, W, 3] in [-1, 1], as the data loader gives them at this size."""
    return np.stack(images).astype(np.float32) / 127.5 - 1.0


def build_setup(root) -> dict:
    """The tiny pipeline folder (near-deterministic, unit-scale VAE; v-prediction), the dataset
    folder in the user layout, and the training latents [4, h, w, 4] (NHWC, UNet space)."""
    import torch
    from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.text import load_tokenizer, tokenize
    from sdjax.training.data import write_captioned_folder
    from sdjax.weights import save_pipeline

    images = synthetic_images()
    vae = R.torch_vae(seed=1)
    with torch.no_grad():
        half = vae.config.latent_channels
        vae.quant_conv.weight[half:] = 0.0       # log-variance = bias = -20: std = exp(-10) ~ 4.5e-5
        vae.quant_conv.bias[half:] = -20.0
        pixels = torch.from_numpy(to_pixels(images).transpose(0, 3, 1, 2))
        posterior = vae.encode(pixels).latent_dist
        scaling_factor = float(1.0 / posterior.mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    parts = root / "parts"
    # The deep tiny UNet (three levels, two layers a block): the figures measured and quoted in the README are its
    for kind, model in (("unet", R.torch_unet(R.TINY_UNET_DEEP, seed=1)), ("vae", vae), ("clip", R.torch_clip(seed=1))):
        R.save_torch_layout(model, parts / kind)
    tokenizer = load_tokenizer(R.write_tiny_tokenizer(parts / "tok"), subfolder=None)
    ids = tokenize(tokenizer, CAPTIONS)
    assert len({tuple(row) for row in ids}) == len(CAPTIONS), "captions must tokenize to distinct ids"
    model_dir = save_pipeline(root / "tiny-sd", text_encoder=CLIPTextModel.from_pretrained(parts / "clip"),
                              unet=UNet2DConditionModel.from_pretrained(parts / "unet"),
                              vae=AutoencoderKL.from_pretrained(parts / "vae"), tokenizer=tokenizer,
                              scheduler_config={**SD15_SCHEDULER, "prediction_type": PREDICTION_TYPE},
                              format="pytorch")
    data_dir = write_captioned_folder(root / "data", zip(images, CAPTIONS))
    latents = (posterior.mean * scaling_factor).numpy().transpose(0, 2, 3, 1)
    assert 0.9 < latents.std() < 1.1 and float(posterior.std.max()) < 1e-4
    return {"root": root, "model": model_dir, "data": data_dir, "pixels": to_pixels(images), "latents": latents}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("learns"))


def distances(generated_BHWC: np.ndarray, train_latents: np.ndarray) -> np.ndarray:
    """L2 distance from each generated latent to each training latent: [B, 4]."""
    return np.sqrt(((generated_BHWC[:, None] - train_latents[None]) ** 2).sum(axis=(2, 3, 4)))


def own_image() -> np.ndarray:
    """The training image each generated sample should be: [captions * seeds], caption-major."""
    return np.repeat(np.arange(len(CAPTIONS)), len(SEEDS))


def initial_noise(latent_shape_HWC) -> np.ndarray:
    """Per (caption, seed) initial N(0, 1) latents, shared by both implementations: [C*S, h, w, 4]."""
    return np.stack([np.random.default_rng(seed).standard_normal(latent_shape_HWC).astype(np.float32)
                     for _ in CAPTIONS for seed in SEEDS])


def training_target(scheduler, latents, noise, t):
    return scheduler.get_velocity(latents, noise, t) if PREDICTION_TYPE == "v_prediction" else noise


def eval_loss(unet, setup, *, noises: int = 8, timesteps: int = 50) -> float:
    """Mean MSE of a PyTorch UNet against its target on fixed (image, timestep, noise) triples:
    4 images x ``timesteps`` evenly spread over [0, 1000) x ``noises`` noise draws."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer
    model = setup["model"]
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    g = torch.Generator().manual_seed(1234)
    latents = torch.from_numpy(setup["latents"].transpose(0, 3, 1, 2)).repeat(noises, 1, 1, 1)
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    losses = []
    with torch.no_grad():
        context = text_encoder(ids)[0].repeat(noises, 1, 1)
        for t in torch.linspace(0, 999, timesteps).round().long():
            noise = torch.randn(latents.shape, generator=g)
            tt = t.repeat(len(latents))
            pred = unet(scheduler.add_noise(latents, noise, tt), tt, context).sample
            losses.append(torch.mean((pred - training_target(scheduler, latents, noise, tt)) ** 2).item())
    return float(np.mean(losses))


# ----------------------------------------------------------------------------- sdjax
@pytest.fixture(scope="module")
def sdjax_run(setup):
    return train_sdjax(setup)


def train_sdjax(setup: dict, seed: int = 0, learning_rate: float = LEARNING_RATE, **settings) -> dict:
    """sdjax's run (``settings``: further TrainConfig fields, e.g. ``lora_rank``)."""
    import jax
    import jax.numpy as jnp
    from diffusers import UNet2DConditionModel as TorchUNet
    from flax import nnx
    from sdjax import parallel, sampling
    from sdjax.text import tokenize
    from sdjax.training.loop import TrainConfig, Trainer

    start = time.perf_counter()
    out = setup["root"] / f"sdjax-run-{seed}-{learning_rate:g}{''.join(f'-{k}-{v}' for k, v in settings.items())}"
    cfg = TrainConfig(model=str(setup["model"]), train_data=str(setup["data"]), output_dir=str(out),
                      resolution=RESOLUTION, batch_size=BATCH, max_steps=STEPS, learning_rate=learning_rate, lr_schedule=LR_SCHEDULE,
                      adam_b1=BETAS[0], adam_b2=BETAS[1], weight_decay=WEIGHT_DECAY, max_grad_norm=1.0,
                      checkpoint_every=10 * STEPS, keep_checkpoints=1, export_format="pytorch", seed=seed,
                      **settings)
    trainer = Trainer.create(cfg, mesh=parallel.data_mesh(jax.devices()[:1]))
    try:
        t0 = time.perf_counter()
        trainer.run(progress=False)
        train_s = time.perf_counter() - t0
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        pipe = trainer.sampling_pipeline()
        final = trainer.export()
        if trainer.base is not None:   # a LoRA file: the UNet it makes, for eval_loss's PyTorch UNet
            final = pipe.save_pretrained(out / "merged", format="pytorch")
    finally:
        trainer.close()

    # Each caption with a few seeds (DDIM, no guidance): the final UNet-space latents.
    scheduler = pipe.make_scheduler("ddim", SAMPLE_STEPS)
    te_gd, te_state = nnx.split(pipe.text_encoder)
    unet_gd, unet_state = nnx.split(pipe.unet)

    @jax.jit
    def generate(te_state, unet_state, scheduler, ids, noise):
        context = sampling.encode_prompts(nnx.merge(te_gd, te_state), ids)
        return sampling.denoise(nnx.merge(unet_gd, unet_state), scheduler, noise * scheduler.init_noise_sigma,
                                context, None)

    ids = tokenize(pipe.tokenizer, [c for c in CAPTIONS for _ in SEEDS])
    generated = np.asarray(generate(te_state, unet_state, scheduler, jnp.asarray(ids),
                                    jnp.asarray(initial_noise(setup["latents"].shape[1:]))))
    unet = TorchUNet.from_pretrained(final, subfolder="unet").eval()
    return {"losses": losses, "generated": generated, "eval_loss": eval_loss(unet, setup), "train_s": train_s,
            "total_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- PyTorch yardstick
@pytest.fixture(scope="module")
def torch_run(setup):
    return train_torch(setup)


def sdjax_draws(seed: int, steps: int, batch: int, latent_shape_HWC) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The timesteps int [steps, batch], noise [steps, batch, h, w, 4] and VAE posterior draws (the
    N(0, 1) of ``mean + std * eps``) [steps, batch, h, w, 4] that sdjax's train_step draws with ``seed``
    (keys: run seed -> update -> micro-batch 0 -> example -> 0 for the posterior, 1 for t, 2 for
    noise; see sdjax/training/step.py). The yardstick trains on the same draws, so both loops see the
    same (image, timestep, noise) sequence and their losses are comparable step by step; none comes
    from torch's global generator, whose state depends on what ran before in the process."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def draws(step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 0)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))

        def normal(j):   # each example's N(0, 1) draw under its key's child j
            return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), latent_shape_HWC, jnp.float32))(keys)
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, 1000))(keys)
        return t, normal(2), normal(0)

    t, noise, eps = jax.lax.map(draws, jnp.arange(steps))
    return np.array(t), np.array(noise), np.array(eps)  # writable copies (torch.from_numpy)


def learning_rates(learning_rate: float = LEARNING_RATE) -> np.ndarray:
    """The learning rate of every update (and one past the end), as sdjax's optimizer schedules it."""
    from sdjax.training.step import make_optimizer
    _, schedule = make_optimizer(learning_rate, schedule=LR_SCHEDULE, total_steps=STEPS)
    return np.array([float(schedule(step)) for step in range(STEPS + 1)])


def train_torch(setup: dict, seed: int = 0, learning_rate: float = LEARNING_RATE, lora_rank: int | None = None
                ) -> dict:
    """The yardstick: the fine-tuning loop in diffusers PyTorch on sdjax's batches and draws. With
    ``lora_rank``: PEFT LoRA of the UNet's to_q / to_k / to_v / to_out.0 as diffusers'
    train_text_to_image_lora.py adds it (alpha = rank), starting from sdjax's initial LoRA weights."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer
    from sdjax.training.data import BatchIterator, load_captioned_images

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this tiny model: ~10x faster than 2 threads on a busy 2-core machine
    try:
        model = setup["model"]
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").train()
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval().requires_grad_(False)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        assert noise_scheduler.config.prediction_type == PREDICTION_TYPE
        if lora_rank is not None:
            start_lora(unet, model, lora_rank, seed)
        trained = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=learning_rate, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=1e-8)
        lr_at = learning_rates(learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at[step] / learning_rate)
        # sdjax's own batches (order, preprocessing) and random draws, as TrainConfig(seed=seed) makes them.
        batches = BatchIterator(load_captioned_images(str(setup["data"])), resolution=RESOLUTION,
                                batch_size_per_process=BATCH, seed=seed)
        timesteps, noises, posterior_eps = sdjax_draws(seed, STEPS, BATCH, setup["latents"].shape[1:])
        losses = []
        t0 = time.perf_counter()
        for step in range(STEPS):
            batch = next(batches)
            with torch.no_grad():
                pixels = torch.from_numpy(batch["pixel_values"].transpose(0, 3, 1, 2))
                posterior = vae.encode(pixels).latent_dist   # its sample(): torch's global generator
                eps = torch.from_numpy(posterior_eps[step].transpose(0, 3, 1, 2))
                latents = (posterior.mean + posterior.std * eps) * vae.config.scaling_factor
                ids = tokenizer(batch["captions"], padding="max_length", max_length=77, return_tensors="pt").input_ids
                context = text_encoder(ids)[0]
            noise = torch.from_numpy(noises[step].transpose(0, 3, 1, 2))
            t = torch.from_numpy(timesteps[step]).long()
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, context).sample
            loss = torch.nn.functional.mse_loss(pred, training_target(noise_scheduler, latents, noise, t))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        train_s = time.perf_counter() - t0
        unet.eval()
        if lora_rank is not None:
            unet.fuse_lora()

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler.from_config(noise_scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.from_numpy(initial_noise(setup["latents"].shape[1:]).transpose(0, 3, 1, 2))
        with torch.no_grad():
            generated = pipe([c for c in CAPTIONS for _ in SEEDS], latents=noise, num_inference_steps=SAMPLE_STEPS,
                             guidance_scale=1.0, height=RESOLUTION, width=RESOLUTION, output_type="latent").images
        result = {"losses": losses, "generated": generated.numpy().transpose(0, 2, 3, 1),
                  "eval_loss": eval_loss(unet, setup), "train_s": train_s}
    finally:
        torch.set_num_threads(threads)
    result["total_s"] = time.perf_counter() - start
    return result


def start_lora(unet, model, rank: int, seed: int) -> None:
    """PEFT LoRA adapters on ``unet`` (frozen; loaded from pipeline folder ``model``), their down
    weights set to the ones sdjax's run draws for ``seed`` (sdjax.training.loop: the seed's key folded
    with 0xFFFFFFFF), up zeros as PEFT's."""
    import jax
    import torch
    from flax import nnx
    from peft import LoraConfig
    from sdjax import UNet2DConditionModel as SdjaxUNet
    from sdjax.training import lora

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    base = {"unet": nnx.to_pure_dict(nnx.state(SdjaxUNet.from_pretrained(model, subfolder="unet"), nnx.Param))}
    spec = lora.lora_spec(base, rank=rank)
    start = lora.init_lora(spec, base, jax.random.fold_in(jax.random.key(seed), 0xFFFFFFFF))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, _, path in spec.targets:
            module = modules[".".join(map(str, path[:-1]))]
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(start[name]["down"]).T.copy()))
            assert not module.lora_B["default"].weight.any()


# ----------------------------------------------------------------------------- the checks
def summary(name: str, run: dict, setup: dict) -> str:
    d = distances(run["generated"], setup["latents"])
    own = own_image()
    to_own = d[np.arange(len(own)), own]
    to_other = np.where(np.eye(len(CAPTIONS), dtype=bool)[own], np.inf, d).min(axis=1)
    picks = d.argmin(axis=1).reshape(len(CAPTIONS), len(SEEDS))
    first, tail = np.mean(run["losses"][:5]), np.mean(run["losses"][-TAIL:])
    return (f"{name}: loss first 5 steps {first:.4f} -> last {TAIL} steps {tail:.4f}; fixed-set loss "
            f"{run['eval_loss']:.4f}; nearest training image per (caption, seed) {picks.tolist()}; generated "
            f"latents to own image max {to_own.max():.2f}, to any other min {to_other.min():.2f}; training "
            f"{run['train_s']:.1f} s, fixture {run['total_s']:.1f} s")


def assert_each_caption_generates_its_image(name: str, run: dict, setup: dict) -> None:
    picks = distances(run["generated"], setup["latents"]).argmin(axis=1)
    assert (picks == own_image()).all(), summary(name, run, setup)


def test_sdjax_loss_falls_well_below_its_start(sdjax_run, setup):
    print("\n" + summary("sdjax", sdjax_run, setup))
    losses = sdjax_run["losses"]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-TAIL:]) < 0.3 * np.mean(losses[:5]), summary("sdjax", sdjax_run, setup)


def test_sdjax_each_caption_generates_its_own_image(sdjax_run, setup):
    assert_each_caption_generates_its_image("sdjax", sdjax_run, setup)


def test_pytorch_yardstick_each_caption_generates_its_own_image(torch_run, setup):
    print("\n" + summary("diffusers PyTorch", torch_run, setup))
    assert_each_caption_generates_its_image("diffusers PyTorch", torch_run, setup)


def test_the_first_steps_follow_pytorch_on_the_same_draws(sdjax_run, torch_run):
    """Before rounding differences grow (module docstring), the per-step losses of the two loops
    agree: the same targets, noise, timesteps, learning rate and AdamW update step by step (a wrong
    latent scale, timestep range or update would move them by far more than the tolerance)."""
    first = [run["losses"][:4] for run in (sdjax_run, torch_run)]
    print(f"first losses: sdjax {first[0]}, PyTorch {first[1]}")
    np.testing.assert_allclose(first[0], first[1], rtol=1e-3)


def test_sdjax_loss_within_pytorch_seed_spread(sdjax_run, torch_run, setup):
    report = summary("sdjax", sdjax_run, setup) + "\n" + summary("diffusers PyTorch", torch_run, setup)
    print("\n" + report)
    assert sdjax_run["eval_loss"] <= RUN_MARGIN * torch_run["eval_loss"], report
    tails = [np.mean(run["losses"][-TAIL:]) for run in (sdjax_run, torch_run)]
    assert tails[0] <= RUN_MARGIN * tails[1], report


@pytest.mark.slow
def test_sdjax_learns_as_well_as_pytorch_over_seeds(sdjax_run, torch_run, setup):
    """Means over MEAN_SEEDS (~2 min per seed and side on 2 cores): fixed-set loss and curve tail."""
    runs = {0: (sdjax_run, torch_run)}
    for seed in MEAN_SEEDS:
        if seed not in runs:
            runs[seed] = (train_sdjax(setup, seed=seed), train_torch(setup, seed=seed))
    lines = []
    for seed in MEAN_SEEDS:
        ours, theirs = runs[seed]
        assert_each_caption_generates_its_image(f"sdjax seed {seed}", ours, setup)
        lines.append(f"seed {seed}: fixed-set loss sdjax {ours['eval_loss']:.4f} PyTorch {theirs['eval_loss']:.4f}; "
                     f"tail {np.mean(ours['losses'][-TAIL:]):.4f} vs {np.mean(theirs['losses'][-TAIL:]):.4f}")
    means = {key: [np.mean([f(runs[s][i]) for s in MEAN_SEEDS]) for i in (0, 1)]
             for key, f in (("eval", lambda r: r["eval_loss"]), ("tail", lambda r: np.mean(r["losses"][-TAIL:])))}
    report = "\n".join(lines + [f"means: fixed-set sdjax {means['eval'][0]:.4f} PyTorch {means['eval'][1]:.4f}; "
                                 f"tail {means['tail'][0]:.4f} vs {means['tail'][1]:.4f}"])
    print("\n" + report)
    assert means["eval"][0] <= MEAN_MARGIN * means["eval"][1], report
    assert means["tail"][0] <= MEAN_MARGIN * means["tail"][1], report


LORA_RANK, LORA_LEARNING_RATE = 4, 1e-2


@pytest.mark.slow
def test_lora_learns_as_peft_lora_does(setup):
    """LoRA of rank 4 on the UNet's attention projections (the rest frozen), sdjax's against PEFT's
    in the diffusers loop, from the same initial LoRA weights on the same batches and draws: the first
    steps' losses agree, and the fixed-set loss and curve tail end within 10% of each other (measured
    2026-12-07: 0.5466 vs 0.5458, tails 0.5543 vs 0.5537, the same nearest images). Rank-4 attention
    alone cannot memorise this task as the whole model does (0.55 against ~0.1; lr 3e-2, 1e-1 and rank
    16 did no better in sdjax), so the yardstick is the point, not each caption's own image (~70 s)."""
    ours = train_sdjax(setup, learning_rate=LORA_LEARNING_RATE, lora_rank=LORA_RANK)
    theirs = train_torch(setup, learning_rate=LORA_LEARNING_RATE, lora_rank=LORA_RANK)
    report = (summary(f"sdjax LoRA rank {LORA_RANK}", ours, setup) + "\n"
              + summary(f"PEFT LoRA rank {LORA_RANK}", theirs, setup))
    print("\n" + report)
    np.testing.assert_allclose(ours["losses"][:4], theirs["losses"][:4], rtol=1e-3)
    assert np.mean(ours["losses"][-TAIL:]) < 0.7 * np.mean(ours["losses"][:5]), report
    assert ours["eval_loss"] <= 1.1 * theirs["eval_loss"], report
    assert np.mean(ours["losses"][-TAIL:]) <= 1.1 * np.mean(theirs["losses"][-TAIL:]), report
