"""Parity of sdjax's CLIP, UNet and VAE with transformers / diffusers PyTorch (fp32), from every layout."""
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference as R
from conftest import run_jitted, skip_unless_flax_needs_hiprimitive
from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

LAYOUTS = ["safetensors", "flax", "bin_old_names"]
TOL = 1e-5  # measured 0.7-1.8e-6 on the tiny fp32 models (2026-12-05); 1e-4 let a tanh-GELU through


def nchw(x_BHWC):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_BHWC).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def load(model_cls, entry, layout, dtype=jnp.float32):
    return model_cls.from_pretrained(entry[layout].parent, dtype=dtype)


def call(model, *arrays):  # for run_jitted
    return model(*arrays)


# ----------------------------------------------------------------------------- CLIP
def clip_outputs(model, ids):
    out = model(jnp.asarray(ids), output_hidden_states=True)
    return out


@pytest.mark.parametrize("layout", ["safetensors", "flax"])
def test_clip_matches_transformers(tiny_checkpoints, layout):
    entry = tiny_checkpoints["clip"]
    ids = np.random.default_rng(0).integers(3, 1000, (3, 77))
    ids[:, 0], ids[0, 5], ids[1, 76], ids[2, 30] = 0, 999, 999, 999  # bos and an end token (largest id)
    ours = clip_outputs(load(CLIPTextModel, entry, layout), ids)
    with torch.no_grad():
        ref = entry["torch"](torch.from_numpy(ids), output_hidden_states=True)
    assert max_err(ours.last_hidden_state, ref.last_hidden_state) < TOL
    assert max_err(ours.pooler_output, ref.pooler_output) < TOL
    assert len(ours.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert max_err(a, b) < TOL


def test_clip_skip_states_are_transformers_hidden_states_through_the_final_layer_norm(tiny_checkpoints):
    """encode_prompts(clip_skip=N) is transformers' hidden_states[-N] through final_layer_norm (A1111's
    "Clip skip", diffusers' clip_skip=N-1); 1 is last_hidden_state; under jit the layers after the one
    used are not computed; a value outside 1..num_hidden_layers is an error naming it and the range."""
    from sdjax.sampling import encode_prompts
    entry = tiny_checkpoints["clip"]
    model = load(CLIPTextModel, entry, "safetensors")
    ids = np.random.default_rng(1).integers(3, 1000, (2, 77))
    ids[:, 0], ids[0, 9], ids[1, 40] = 0, 999, 999
    torch_model = entry["torch"]
    final_layer_norm = getattr(torch_model, "text_model", torch_model).final_layer_norm   # (transformers 5: flat)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
        for n in (2, 3):   # 3: the tiny encoder's first layer, the deepest skip
            want = final_layer_norm(ref.hidden_states[-n]).numpy()
            got = run_jitted(f"clip_skip_{n}", model, lambda m, x, n=n: encode_prompts(m, x, clip_skip=n), ids)
            assert max_err(got, want) < TOL, n
            assert max_err(got, ref.last_hidden_state) > 1e-2, n   # another layer's states
    default = run_jitted("clip_skip_default", model, encode_prompts, ids)
    np.testing.assert_array_equal(run_jitted("clip_skip_1", model, lambda m, x: encode_prompts(m, x, clip_skip=1),
                                             ids), default)
    assert max_err(default, ref.last_hidden_state) < TOL
    # only what is needed: the compiled program has the matmuls of the layers used, not those after
    graphdef, state = nnx.split(model)
    dots = [jax.jit(lambda s, x, n=n: encode_prompts(nnx.merge(graphdef, s), x, clip_skip=n)).lower(
        state, ids).compile().as_text().count(" dot(") for n in (1, 2, 3)]
    assert dots[0] > dots[1] > dots[2] > 0, dots   # measured 24, 16, 8 (8 a layer) on the CPU
    for bad in (0, 4, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match=re.escape(f"clip_skip={bad!r}: must be an integer in 1..3")):
            encode_prompts(model, ids, clip_skip=bad)


def test_clip_pooling_with_explicit_eos_id(tmp_path):
    """Newer CLIP configs name the real end token; pooling must pick its first occurrence."""
    cfg = dict(R.TINY_CLIP, eos_token_id=7)
    ref_model = R.torch_clip(cfg, seed=3)
    R.save_torch_layout(ref_model, tmp_path)
    ids = np.random.default_rng(1).integers(10, 1000, (2, 77))
    ids[0, 4] = ids[0, 9] = 7
    ids[1, 60] = 7
    ours = CLIPTextModel.from_pretrained(tmp_path)(ids.tolist())   # a nested list works like an array
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids))
    assert max_err(ours.pooler_output, ref.pooler_output) < TOL


def test_clip_default_eos_id_is_transformers(tmp_path):
    """A config without eos_token_id pools where transformers does (its default 49407), not at the
    largest id (the legacy eos_token_id=2 rule), which an added token above 49407 would take."""
    cfg = {k: v for k, v in dict(R.TINY_CLIP, vocab_size=49410).items() if k != "eos_token_id"}
    ref_model = R.torch_clip(cfg, seed=4)
    assert ref_model.config.eos_token_id == 49407
    R.save_torch_layout(ref_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("eos_token_id", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = np.random.default_rng(2).integers(10, 1000, (2, 12))
    ids[0, 3], ids[0, 6], ids[1, 8], ids[1, 2] = 49407, 49409, 49407, 49409  # 49409: an added token
    ours = CLIPTextModel.from_pretrained(tmp_path)(ids.tolist())   # a nested list works like an array
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids))
    assert max_err(ours.pooler_output, ref.pooler_output) < TOL


def test_clip_refuses_sequences_past_its_positions():
    model = CLIPTextModel(R.TINY_CLIP, rngs=nnx.Rngs(0))
    assert model(jnp.ones((1, 77), jnp.int32)).last_hidden_state.shape == (1, 77, 32)
    with pytest.raises(ValueError, match="length 80 is longer than .* max_position_embeddings=77"):
        model(jnp.ones((1, 80), jnp.int32))


def test_wrong_inputs_are_errors_naming_the_argument():
    """Shapes, dtypes and token ids that XLA would report from deep inside the model (or not at all:
    an id past the vocabulary gives NaN everywhere) are errors naming the argument. The checks come
    before any weight is used: abstract models (nnx.eval_shape), as initialising the UNet's random
    weights op by op took ~12 s."""
    abstract = lambda make: nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))  # noqa: E731
    clip = abstract(lambda rngs: CLIPTextModel(R.TINY_CLIP, rngs=rngs))
    vocab = clip.config.vocab_size
    for ids, message in ((np.full((1, 5), vocab), f"token id {vocab} is outside .* 0..{vocab - 1}"),
                         (np.full((1, 5), -1), "token id -1 is outside"),
                         (np.ones(77, np.int32), r"shape \(77,\) .* expected integer token ids \[batch, tokens\]"),
                         (np.ones((1, 77), np.float32), "dtype float32")):
        with pytest.raises(ValueError, match=message):
            clip(ids)
    unet = abstract(lambda rngs: UNet2DConditionModel(R.TINY_UNET, rngs=rngs))
    C, D = unet.config.in_channels, unet.config.cross_attention_dim[0]
    x, context = jnp.zeros((2, 8, 8, C)), jnp.zeros((2, 77, D))
    with pytest.raises(ValueError, match=rf"sample_BHWC has shape \(2, {C}, 8, 8\); .* looks like NCHW"):
        unet(jnp.zeros((2, C, 8, 8)), 10, context)
    for bad in (jnp.zeros((2, 77, D + 1)), jnp.zeros((3, 77, D)), jnp.zeros((77, D))):
        with pytest.raises(ValueError, match=r"encoder_hidden_states_BSD has shape .* \(cross_attention_dim\)"):
            unet(x, 10, bad)
    for bad in (jnp.array([1, 2, 3, 4]), jnp.array([[1], [2]])):   # doubled for guidance; a column
        with pytest.raises(ValueError, match=rf"timesteps has shape {re.escape(str(bad.shape))}; expected a scalar "
                                             r"or one per sample \(\[2\], sample_BHWC's batch\)"):
            unet(x, bad, context)
    vae = abstract(lambda rngs: AutoencoderKL(R.TINY_VAE, rngs=rngs))
    with pytest.raises(ValueError, match=r"images_BHWC has shape \(1, 3, 16, 16\); .* looks like NCHW"):
        vae.encode(jnp.zeros((1, 3, 16, 16)))
    with pytest.raises(TypeError, match="dtype uint8; expected floats in"):
        vae.encode(jnp.zeros((1, 16, 16, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"latents_BHWC has shape \(1, 8, 8\)"):
        vae.decode(jnp.zeros((1, 8, 8)))


def test_a_posterior_draw_per_image_does_not_depend_on_the_batch():
    """``DiagonalGaussian.sample`` with one key per image (as the sampler's noise): an image's draw
    is the same alone or in a batch; one key for the batch still works (diffusers' way)."""
    from sdjax.sampling import image_keys
    vae = AutoencoderKL(R.TINY_VAE, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32))
    batch = vae.encode(images)
    together = batch.sample(image_keys(np.array([5, 6, 7])))
    alone = vae.encode(images[1:2]).sample(image_keys([6]))
    np.testing.assert_allclose(together[1:2], alone, atol=1e-5)
    raw = batch.sample(jax.random.key_data(image_keys([5, 6, 7])))          # raw [B, 2] keys
    np.testing.assert_array_equal(raw, together)
    assert batch.sample(jax.random.key(0)).shape == batch.mean.shape
    with pytest.raises(ValueError, match="got 2 per-image keys for a batch of 3"):
        batch.sample(image_keys([1, 2]))


@pytest.mark.parametrize("kind, cls", [("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                                       ("clip", CLIPTextModel)])
def test_every_norm_has_the_reference_eps(tiny_checkpoints, kind, cls):
    """Layer by layer: at ordinary activations an eps of 1e-6 for 1e-5 moves the output by ~6e-6,
    under the parity tolerance, yet it is a different model where activations are small."""
    entry = tiny_checkpoints[kind]
    model = load(cls, entry, "safetensors")
    ours = {".".join(map(str, path)): float(m.epsilon) for path, m in nnx.iter_graph(model)
            if isinstance(m, (nnx.GroupNorm, nnx.LayerNorm))}
    prefix = "text_model." if kind == "clip" else ""   # transformers 5 leaves it out of CLIPTextModel's names
    ref = {(name if name.startswith(prefix) else prefix + name): float(m.eps)
           for name, m in entry["torch"].named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    assert len(ours) > 5 and ours == ref


# ----------------------------------------------------------------------------- UNet
@pytest.mark.parametrize("layout", ["safetensors", "flax"])
def test_unet_matches_diffusers(tiny_checkpoints, layout):
    entry = tiny_checkpoints["unet"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((4, 77, 32)).astype(np.float32)
    t = np.array([0, 10, 500, 999])
    ours = run_jitted("tiny-unet", load(UNet2DConditionModel, entry, layout), call, x, t, ctx)
    with torch.no_grad():
        ref = entry["torch"](nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    assert np.abs(nhwc(ref)).max() > 0.1  # a real signal, not zeros
    assert max_err(ours, nhwc(ref)) < TOL


@pytest.mark.parametrize("deep", [False, True])
def test_unet_odd_latent_size(tiny_checkpoints, tmp_path, deep):
    """Latents whose size does not halve evenly at every level need the skip-shaped upsample (upsample_size):
    odd ones for the tiny UNet's one downsampler; for the deep UNet's two (three levels, two layers a
    block: the skips' order over several layers and levels), a multiple of 2 but not of 4."""
    if deep:
        torch_model = R.torch_unet(R.TINY_UNET_DEEP, seed=4)
        unet = UNet2DConditionModel.from_pretrained(R.save_torch_layout(torch_model, tmp_path).parent)
        size = (10, 14)
    else:
        torch_model = tiny_checkpoints["unet"]["torch"]
        unet = load(UNet2DConditionModel, tiny_checkpoints["unet"], "safetensors")
        size = (9, 13)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *size, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    ours = run_jitted("tiny-unet", unet, call, x, jnp.float32(321.0), ctx)
    with torch.no_grad():
        ref = torch_model(nchw(x), 321, torch.from_numpy(ctx)).sample
    assert ours.shape == (2, *size, 4) and np.abs(nhwc(ref)).max() > 0.1
    assert max_err(ours, nhwc(ref)) < TOL


def test_unet_sd2_style_config(tmp_path):
    """SD 2.x keys: linear projections, per-block head counts, upcast attention."""
    cfg = dict(R.TINY_UNET, use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True)
    ref_model = R.torch_unet(cfg, seed=5)
    R.save_torch_layout(ref_model, tmp_path)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    ours = run_jitted("tiny-unet", UNet2DConditionModel.from_pretrained(tmp_path), call, x, np.array([3, 700]),
                      ctx)
    with torch.no_grad():
        ref = ref_model(nchw(x), torch.tensor([3, 700]), torch.from_numpy(ctx)).sample
    assert max_err(ours, nhwc(ref)) < TOL
    # fp32 cannot show upcasting; in bf16, upcast_attention puts exactly the attention matmuls in fp32
    # (2 per attention: q.k and p.v; 2 attentions per transformer block). Traced, not run.
    n_attention = 0
    for upcast in (True, False):
        model = nnx.eval_shape(lambda: UNet2DConditionModel({**cfg, "upcast_attention": upcast}, dtype=jnp.bfloat16,
                                                            rngs=nnx.Rngs(0)))   # abstract weights: traced only
        if upcast:
            n_attention = sum(1 for path, _ in nnx.iter_graph(model) if path and path[-1] in ("attn1", "attn2"))
        graphdef, state = nnx.split(model)
        traced = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, x, np.array([3, 700]), ctx)
        dots = [e for e in R.jaxpr_equations(traced.jaxpr) if e.primitive.name == "dot_general"]
        fp32 = [e for e in dots if all(v.aval.dtype == jnp.float32 for v in e.invars)]
        assert len(fp32) == (2 * n_attention if upcast else 0) and len(dots) > len(fp32), (upcast, len(fp32))


def test_unet_timestep_embedding_options(tmp_path):
    """freq_shift and flip_sin_to_cos as diffusers reads them (SD's 0 and True hide a sign or order slip)."""
    cfg = dict(R.TINY_UNET, freq_shift=1, flip_sin_to_cos=False)
    ref_model = R.torch_unet(cfg, seed=3)
    R.save_torch_layout(ref_model, tmp_path)
    rng = np.random.default_rng(4)
    x, ctx = rng.standard_normal((2, 8, 8, 4)).astype(np.float32), rng.standard_normal((2, 7, 32)).astype(np.float32)
    ours = run_jitted("tiny-unet", UNet2DConditionModel.from_pretrained(tmp_path), call, x, np.array([3, 700]), ctx)
    with torch.no_grad():
        ref = ref_model(nchw(x), torch.tensor([3, 700]), torch.from_numpy(ctx)).sample
    assert max_err(ours, nhwc(ref)) < TOL


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("timestep_post_act", "silu"),
                                       ("time_embedding_act_fn", "silu"), ("resnet_out_scale_factor", 2.0)])
def test_unet_rejects_unsupported_config(key, value):
    """Including keys that add no weights but change diffusers' output (strict loading cannot catch them).
    (Built abstractly, nnx.eval_shape: the config is read as ever, no random weights are drawn op by op.)"""
    with pytest.raises(NotImplementedError, match=key):
        nnx.eval_shape(lambda: UNet2DConditionModel({**R.TINY_UNET, key: value}, rngs=nnx.Rngs(0)))


def test_unet_accepts_the_defaults_diffusers_writes():
    """The values of those keys that diffusers writes into config.json are accepted (once, not per
    rejected key as before: it does not depend on the key)."""
    nnx.eval_shape(lambda: UNet2DConditionModel({**R.TINY_UNET, "mid_block_scale_factor": 1.0,
                                                 "resnet_out_scale_factor": 1.0, "timestep_post_act": None},
                                                rngs=nnx.Rngs(0)))


def test_unet_gradient_checkpointing_same_gradients_fewer_residuals():
    """``remat=True`` (train.py's gradient_checkpointing) gives the same gradients and makes the
    backward pass keep only each block's inputs. Counted on JAX's residuals (what the backward pass
    is handed), not on a compiled plan: XLA:CPU drops jax.checkpoint's barriers before its last CSE,
    so its plan shows no saving (BENCHMARKS.md); XLA:GPU keeps them through scheduling."""

    config = dict(R.TINY_UNET, layers_per_block=1, block_out_channels=(32,),  # one down, mid, one up block
                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)

    def grads_and_residual_bytes(remat):
        graphdef, params = nnx.split(UNet2DConditionModel(config, remat=remat, rngs=nnx.Rngs(0)), nnx.Param)
        unet = lambda p: nnx.merge(graphdef, p)(x, jnp.array([10, 900]), ctx)  # noqa: E731

        def saved_activations(p):  # the backward pass's residuals, less the parameters themselves
            param_ids = {id(leaf) for leaf in jax.tree.leaves(p)}
            return [r for r in jax.tree.leaves(jax.vjp(unet, p)[1]) if id(r) not in param_ids]

        saved = jax.eval_shape(saved_activations, params)
        grads = jax.jit(jax.grad(lambda p: jnp.sum(unet(p) ** 2)))(params)
        return grads, sum(r.size * r.dtype.itemsize for r in saved)

    grads, saved = grads_and_residual_bytes(False)
    grads_remat, saved_remat = grads_and_residual_bytes(True)
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        # Recomputation reorders fp32 sums: equal up to rounding, relative to each gradient's scale.
        assert max_err(g_remat, g) <= 1e-5 * float(jnp.abs(g).max()), (max_err(g_remat, g), float(jnp.abs(g).max()))
    # Every attention score, norm statistic and conv output inside the blocks is dropped; what is
    # left is the blocks' inputs and the layers outside them (measured: 1.7% of the activations).
    assert saved_remat < 0.1 * saved, (saved_remat, saved)

    # A remat UNet also runs where its weights come from an outer trace, as in the sampler's scan over
    # steps (nnx.remat failed there: "Cannot mutate Param from a different trace level").
    def two_steps(remat):
        model = UNet2DConditionModel(config, remat=remat, rngs=nnx.Rngs(0))

        @jax.jit
        def run(state, x):
            unet = nnx.merge(nnx.graphdef(model), state)
            return jax.lax.scan(lambda h, t: (unet(h, t, ctx), None), x, jnp.array([900, 10]))[0]
        return run(nnx.state(model), x)
    np.testing.assert_allclose(two_steps(True), two_steps(False), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- VAE
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vae_matches_diffusers(tiny_checkpoints, layout):
    entry = tiny_checkpoints["vae"]
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    vae = load(AutoencoderKL, entry, layout)
    posterior = vae.encode(jnp.asarray(images))
    decoded = vae.decode(jnp.asarray(latents))
    with torch.no_grad():
        ref_post = entry["torch"].encode(nchw(images)).latent_dist
        ref_dec = entry["torch"].decode(nchw(latents)).sample
    assert max_err(posterior.mean, nhwc(ref_post.mean)) < TOL
    assert max_err(posterior.logvar, nhwc(ref_post.logvar)) < TOL
    assert max_err(decoded, nhwc(ref_dec)) < TOL
    assert vae.scaling_factor == entry["torch"].config.scaling_factor


# ----------------------------------------------------------------------------- layouts and dtypes
@pytest.mark.parametrize("kind,cls", [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("clip", CLIPTextModel)])
def test_layouts_give_identical_params(tiny_checkpoints, kind, cls):
    entry = tiny_checkpoints[kind]
    layouts = ["safetensors", "flax"] + (["bin_old_names"] if kind == "vae" else [])
    states = [nnx.to_flat_state(nnx.state(load(cls, entry, lay), nnx.Param)) for lay in layouts]
    first = dict(states[0])
    for other in states[1:]:
        other = dict(other)
        assert first.keys() == other.keys()
        for path in first:
            np.testing.assert_array_equal(np.asarray(first[path].get_value()), np.asarray(other[path].get_value()),
                                          err_msg=str(path))


@pytest.mark.parametrize("layout", ["safetensors", "flax_bf16"])
def test_bf16_loading(tiny_checkpoints, layout):
    """bf16 from an fp32 file (cast on load) or a bf16 msgpack file: params are bf16 and the
    output stays close to fp32 (the bound here is the one BENCHMARKS.md reports at full size)."""
    entry = tiny_checkpoints["unet"]
    model = load(UNet2DConditionModel, entry, layout, dtype=jnp.bfloat16)
    dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t = np.array([10, 800])
    out = run_jitted("tiny-unet", model, call, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    ref = run_jitted("tiny-unet", load(UNet2DConditionModel, entry, "safetensors"), call, x, t, ctx)
    rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel


# ----------------------------------------------------------------------------- the CPU attention kernel
@pytest.mark.parametrize("B,T,S,N,H", [(2, 64, 64, 3, 8), (3, 140, 77, 2, 16), (1, 35, 35, 1, 32)])
def test_blocked_attention_equals_xla_kernel(B, T, S, N, H):
    """The blocked kernel (several heads, several query blocks, lengths that do not halve evenly)
    gives jax.nn.dot_product_attention's values and gradients; bf16 stays within bf16 rounding."""
    from sdjax.models.layers import blocked_attention
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape).astype(np.float32))
               for shape in ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    block_bytes = B * 16 * S * 4  # forces blocks of 16-35 queries

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * jnp.cos(jnp.arange(H)))

    ours = blocked_attention(q, k, v, block_bytes=block_bytes)
    ref = jax.nn.dot_product_attention(q, k, v)
    assert max_err(ours, ref) < 1e-5
    grads = jax.grad(lambda *a: loss(lambda *b: blocked_attention(*b, block_bytes=block_bytes), *a), (0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *a: loss(jax.nn.dot_product_attention, *a), (0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < 1e-4 * max(1.0, float(jnp.abs(r).max()))
    bf16 = blocked_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), block_bytes=block_bytes)
    assert bf16.dtype == jnp.bfloat16
    assert max_err(bf16, ref) < 0.05


@pytest.mark.parametrize("backend,query_blocks", [("cpu", 16), ("gpu", 1), ("tpu", 1)])
def test_blocked_attention_blocks_for_cache_on_the_cpu_and_for_memory_elsewhere(monkeypatch, backend, query_blocks):
    """The default block: on the CPU 8 MiB of scores (cache), so SD v1.5's 4096-token attention at
    batch 2 (128 MiB per head) runs in 16 query blocks per head; on a GPU/TPU 1 GiB (memory), so it
    runs whole per head instead of in thousands of small matmuls. Shapes only (jax.make_jaxpr)."""
    from sdjax.models import layers
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    q = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda *a: layers.blocked_attention(*a))(q, q, q)   # a new function: no cached trace
    monkeypatch.undo()

    def scans(jaxpr):
        return [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    [heads] = scans(jaxpr.jaxpr)
    assert heads.params["length"] == 8  # one iteration per head
    blocks = scans(heads.params["jaxpr"].jaxpr)
    assert [e.params["length"] for e in blocks] == ([query_blocks] if query_blocks > 1 else [])


def test_blocked_attention_blocks_token_counts_that_do_not_halve_evenly(monkeypatch):
    """600 x 800 px gives 7500 tokens at the first level: halving stopped at blocks of 1875 queries
    (107 MiB of scores at batch 2); the block is the largest divisor of T that fits the 8 MiB, 125
    (60 blocks). Shapes only (jax.make_jaxpr)."""
    from sdjax.models import layers
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    q = jax.ShapeDtypeStruct((2, 7500, 8, 40), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda *a: layers.blocked_attention(*a))(q, q, q)
    monkeypatch.undo()
    [heads] = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    [blocks] = [e for e in heads.params["jaxpr"].jaxpr.eqns if e.primitive.name == "scan"]
    assert blocks.params["length"] == 60


def test_unet_with_blocked_attention_matches_diffusers(tiny_checkpoints, monkeypatch):
    """The whole UNet with every attention through the blocked kernel still equals diffusers."""
    from sdjax.models import layers
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "blocked")
    monkeypatch.setattr(layers, "BLOCK_SCORE_BYTES", 2 * 32 * 77 * 4)  # several query blocks per head
    entry = tiny_checkpoints["unet"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t = np.array([3, 700])
    ours = load(UNet2DConditionModel, entry, "safetensors")(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    with torch.no_grad():
        ref = entry["torch"](nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    assert max_err(ours, nhwc(ref)) < TOL


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_cudnn_attention_falls_back_to_xla_where_cudnn_cannot_run(monkeypatch, dtype):
    """SDJAX_ATTENTION=cudnn where cuDNN's fused kernel cannot run (here the CPU; on a GPU, shapes or
    dtypes it rejects) traces XLA's kernel instead and gives its result, under jit."""
    from sdjax.models import layers
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((2, 64, 2, 40), (2, 77, 2, 40),
                                                                            (2, 77, 2, 40)))
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "xla")
    ref = jax.jit(lambda *a: layers.attention(*a))(q, k, v)  # a new function each: no shared trace cache
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "cudnn")
    monkeypatch.setattr(layers, "_CUDNN_REFUSALS", set())
    if dtype == jnp.bfloat16:   # asked for and refused: said once per shape
        with pytest.warns(UserWarning, match=r"SDJAX_ATTENTION=cudnn: cuDNN's fused attention refused q \(2, 64, 2, 40\)"):
            got = jax.jit(lambda *a: layers.attention(*a))(q, k, v)
    else:                       # fp32: cuDNN is not asked
        got = jax.jit(lambda *a: layers.attention(*a))(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(lambda *a: layers.attention(*a))(q, k, v)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))


def test_unknown_attention_setting_is_an_error(monkeypatch):
    from sdjax.models import layers
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "flash")
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="SDJAX_ATTENTION='flash'"):
        layers.attention(q, q, q)


def test_xla_flags_are_added_only_where_allowed(monkeypatch):
    from jax._src import xla_bridge
    from sdjax import _xla_flags
    import jaxlib
    name = "xla_cpu_experimental_ynn_fusion_type"
    monkeypatch.setattr(xla_bridge, "_backends", {})  # as before JAX starts
    monkeypatch.setattr(_xla_flags, "FLAGS", {name: ("", (jaxlib.__version__,), True)})
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert _xla_flags.apply(env) == [f"--{name}="]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=1 --{name}="
    for several in ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, {"JAX_NUM_CPU_DEVICES": "2"}):
        assert _xla_flags.apply(several) == [], several   # one CPU device only (it races on several)
    assert _xla_flags.apply({"JAX_NUM_CPU_DEVICES": "1",
                             "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) == [f"--{name}="]
    user = {"XLA_FLAGS": f"--{name}=dot"}  # the user's own setting wins
    assert _xla_flags.apply(user) == [] and user["XLA_FLAGS"] == f"--{name}=dot"
    off = {"SDJAX_XLA_FLAGS": "0"}
    assert _xla_flags.apply(off) == [] and "XLA_FLAGS" not in off
    monkeypatch.setattr(_xla_flags, "FLAGS", {name: ("", ("0.0.",), False)})  # not measured on this jaxlib
    assert _xla_flags.apply({}) == []
    monkeypatch.setattr(xla_bridge, "_backends", {"cpu": object()})  # XLA already read its flags
    monkeypatch.setattr(_xla_flags, "FLAGS", {name: ("", (jaxlib.__version__,), False)})
    assert _xla_flags.apply({}) == []


def test_flax_that_cannot_import_under_this_jax_is_a_clear_error():
    """As with jax 0.11.2 and flax <= 0.12.9: the jax class flax subclasses at import time is gone."""
    skip_unless_flax_needs_hiprimitive()
    import subprocess
    import sys
    from importlib.metadata import version
    code = "import jax.experimental.hijax as hijax; del hijax.HiPrimitive; import sdjax"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: sdjax needs flax.nnx, but flax {version('flax')} cannot be imported with "
                           f"jax {version('jax')} (AttributeError: "), last
    assert last.endswith("jax 0.11.2 and later need flax 0.12.10 or later: pip install -U 'flax>=0.12.10'"), last
