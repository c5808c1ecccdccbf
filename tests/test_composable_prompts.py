"""AUTOMATIC1111's AND (composable diffusion): the prompt split into weighted parts as A1111's
get_multicond_prompt_list reads it, and the pipeline's images against a sampling loop written here with
diffusers' UNet, scheduler and VAE that guides by every part as A1111's combine_denoised does."""
import numpy as np
import pytest
import torch

from sdjax import parallel
from sdjax.text import composable_parts, tokenize_weighted
from test_sampling import SIZE, diffusers_scheduler, latents_for

STEPS = 10
GUIDANCE = 7.5
LONG = "a castle, " + ", ".join(f"tower {i}" for i in range(14))   # two windows of the tiny tokenizer


@pytest.mark.parametrize("prompt,parts", [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),     # (the leading space stays: the tokenizer drops it)
    ("a cat :1.5 AND a dog: -0.5 ", [("a cat", 1.5), (" a dog", -0.5)]),
    ("cat:1.2", [("cat", 1.2)]),                                # a weight without AND too
    ("a:.5 AND b:5.", [("a", 0.5), (" b", 5.0)]),
    ("a:1.:2", [("a:1.", 2.0)]),                                # only the last ":number"
    ("(cat:1.2)", [("(cat:1.2)", 1.0)]), ("a cat :", [("a cat :", 1.0)]), ("a:1e3", [("a:1e3", 1.0)]),
    ("ANDROID, BAND AND and", [("ANDROID, BAND", 1.0), (" and", 1.0)]),   # the word AND, in capitals
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("a\nsky :2", [("a\nsky", 2.0)]),
])
def test_composable_parts_read_a1111s_and_and_weights(prompt, parts):
    assert composable_parts(prompt) == parts


def _states(ref, text, windows=None):
    """transformers' text states of ``text`` as A1111 encodes it: window by window (ids laid out by
    tokenize_weighted, checked against A1111's layout in test_long_prompts), no emphasis in these texts."""
    ids, weights = tokenize_weighted(ref.tokenizer, [text], windows=windows)
    assert (weights == 1).all()
    with torch.no_grad():
        return torch.cat([ref.text_encoder(torch.from_numpy(w).long())[0]
                          for w in np.split(ids, ids.shape[1] // 77, axis=1)], dim=1)


def _reference_images(ref, latents, texts_at):
    """diffusers' PNDM loop of 10 steps (11 model calls), each image guided as A1111's combine_denoised
    does: eps_u + g * sum_k w_k (eps_k - eps_u) over its parts; ``texts_at(b, c)`` gives image b's
    negative states and [(states, weight), ...] at model call c."""
    sched = diffusers_scheduler(ref, "pndm")
    sched.set_timesteps(STEPS)
    images = []
    for b in range(len(latents)):
        x = torch.from_numpy(latents[b:b + 1].transpose(0, 3, 1, 2)) * sched.init_noise_sigma
        sched = diffusers_scheduler(ref, "pndm")
        sched.set_timesteps(STEPS)
        with torch.no_grad():
            for c, t in enumerate(sched.timesteps):
                uncond, parts = texts_at(b, c)
                eps_u = ref.unet(x, t, encoder_hidden_states=uncond).sample
                eps = eps_u + GUIDANCE * sum(w * (ref.unet(x, t, encoder_hidden_states=s).sample - eps_u)
                                             for s, w in parts)
                x = sched.step(eps, t, x).prev_sample
            image = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
        images.append((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    return np.concatenate(images)


def test_and_guides_by_every_part_as_a1111(pipe, reference_pipe):
    """prompt_weighting=True reads AND: the images are those of a loop that guides each image by all its
    parts (on 8 devices, three images padded to eight). Image 0 composes two parts, one weighted 0.5,
    against a negative prompt; image 1 is one part of weight 1.4 with alternation in it ([red|blue]:
    A1111 edits each part on its own; calls 0 and 1 take step 1's text); image 2 a part of two windows
    (a long prompt) and one of one window, which A1111 lines up by repeating the short one's last state
    (its reconstruct_multicond_batch), and a negative prompt of one window (two UNet calls). The call's
    texts are two windows (image 2's), so images 0 and 1 get the empty prompt's second window, as any
    shorter prompt in a call does. Image 1's call has a second part of weight 0, adding nothing."""
    ref = reference_pipe
    prompts = ["a photo of a cat AND a dog:0.5", "the [red|blue] sky :1.4", f"{LONG} AND a tree"]
    negatives = ["blurry", "", ""]
    neg = {text: _states(ref, text) for text in negatives}
    two = {text: _states(ref, text, windows=2) for text in ("a photo of a cat", "a dog", "the red sky", "the blue sky")}
    castle, tree = _states(ref, LONG), _states(ref, "a tree")
    assert castle.shape[1] == 154 and tree.shape[1] == 77
    tree_lined_up = torch.cat([tree, tree[:, -1:].expand(-1, 77, -1)], dim=1)

    def texts_at(b, c):
        if b == 0:
            return neg["blurry"], [(two["a photo of a cat"], 1.0), (two["a dog"], 0.5)]
        if b == 1:
            return neg[""], [(two["the red sky" if max(c, 1) % 2 else "the blue sky"], 1.4)]
        return neg[""], [(castle, 1.0), (tree_lined_up, 1.0)]

    latents = latents_for(3, seed=5)
    want = _reference_images(ref, latents, texts_at)
    got = pipe(prompts, negative_prompts=negatives, num_inference_steps=STEPS, height=SIZE, width=SIZE,
               latents=latents, guidance_scale=GUIDANCE, prompt_weighting=True).images
    assert np.abs(got - want).max() <= 2e-5
    # the check can fail: the tree part padded with the empty prompt's window instead is another image
    tree_padded = _states(ref, "a tree", 2)
    other = _reference_images(ref, latents[2:], lambda b, c: (neg[""], [(castle, 1.0), (tree_padded, 1.0)]))
    assert np.abs(other - want[2:]).max() > 1e-3


def test_the_pipeline_passes_parts_only_where_a_prompt_has_and_or_a_weight(pipe):
    """Without AND or a part weight the sampler gets the call of before (a trailing ":1" is dropped from
    the text, as A1111 drops it); with them, each image's texts [B, P, 77], phases [B, K, C] (each part's
    text per call, an image with fewer parts padded with parts of weight 0) and the weights [B, K];
    lengths [B, P] only where an image's parts take different window counts. AND in a negative prompt is
    text. Guidance off refuses AND, naming the prompt."""
    from test_prompt_weighting import _captured
    kw = dict(num_inference_steps=4, height=32, width=32, prompt_weighting=True)
    args, kwargs = _captured(pipe, prompts=["a cat :1", "plain"], negative_prompts="x AND y", **kw)
    assert "cond_part_weights_BK" not in kwargs and "cond_phases_BC" not in kwargs
    np.testing.assert_array_equal(parallel.to_host(args[2])[:2],
                                  tokenize_weighted(pipe.tokenizer, ["a cat", "plain"])[0])
    np.testing.assert_array_equal(parallel.to_host(args[3])[:1], tokenize_weighted(pipe.tokenizer, ["x AND y"])[0])
    args, kwargs = _captured(pipe, prompts=["a AND [b:c:2] :0.5", "d:2"], **kw)
    texts = ["a", " b", " c", "d", "d", "d"]
    for got, want in ((args[2], tokenize_weighted(pipe.tokenizer, texts)[0].reshape(2, 3, 77)),
                      (kwargs["cond_phases_BC"], np.array([[[0] * 5, [1, 1, 1, 2, 2]], [[0] * 5] * 2], np.int32)),
                      (kwargs["cond_part_weights_BK"], np.array([[1.0, 0.5], [2.0, 0.0]], np.float32))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(parallel.to_host(got)[:2], want)
    assert "cond_lengths_BP" not in kwargs
    _, kwargs = _captured(pipe, prompts=[f"{LONG} AND a", "b"], **kw)
    np.testing.assert_array_equal(parallel.to_host(kwargs["cond_lengths_BP"])[:2], [[154, 77], [77, 77]])
    with pytest.raises(ValueError, match="prompt 'b AND c' has AND or a weight .* guidance_scale must be above 1"):
        pipe(["a", "b AND c"], guidance_scale=1.0, **kw)


def test_extend_by_last_state_lines_up_each_images_texts():
    """Each text's states past its own length, up to its image's longest, are its last state's; past the
    image's longest they stay (the call's padding)."""
    from sdjax.sampling import extend_by_last_state
    states = np.arange(2 * 2 * 6, dtype=np.float32).reshape(2, 2, 6, 1)
    got = np.asarray(extend_by_last_state(states, np.array([[4, 2], [2, 2]])))[..., 0]
    np.testing.assert_array_equal(got, [[[0, 1, 2, 3, 4, 5], [6, 7, 7, 7, 10, 11]],
                                        [[12, 13, 14, 15, 16, 17], [18, 19, 20, 21, 22, 23]]])


def test_denoise_checks_a_composition(pipe):
    """A `Composition` needs a negative prompt (it acts through guidance), one weight a part, and phases of
    [batch, parts, calls]; it is the prompt's, not the negative prompt's."""
    import jax.numpy as jnp
    from sdjax.sampling import Composition, TextSchedule, denoise
    sched = pipe.make_scheduler("ddim", 4)
    x, text = jnp.zeros((2, 4, 4, 4)), jnp.zeros((2, 3, 77, 32))
    unet = lambda x, t, c: x  # noqa: E731
    for args, message in (
            ((Composition(text, jnp.ones((2, 3))), None), "needs guidance_scale > 1"),
            ((Composition(text, jnp.ones((2, 2))), text[:, 0]), r"3 parts an image with weights of shape \(2, 2\)"),
            ((Composition(text[0], jnp.ones((2, 3))), text[:, 0]), "expected states \\[batch, parts, tokens, width\\]"),
            ((Composition(TextSchedule(text, jnp.zeros((2, 4), jnp.int32)), jnp.ones((2, 1))), text[:, 0]),
             r"phases \(2, 4\); expected .* \[batch, parts, model calls\]"),
            ((text[:, 0], Composition(text, jnp.ones((2, 3)))), "uncond_BSD is a Composition"),
            ((Composition(text, jnp.ones((2, 3))), text[:, 0, :, :16]),
             r"and cond_BSD \(2, 77, 32\): they must agree")):   # (Python ints in the shape)
        with pytest.raises((ValueError, TypeError), match=message):
            denoise(unet, sched, x, *args)
    parts = Composition(TextSchedule(text[:1], jnp.zeros((1, 2, 4), jnp.int32)), jnp.array([[1.0, -0.5]]))
    assert denoise(unet, sched, x, parts, text[:, 0]).shape == x.shape   # (one row broadcast to the batch)
    # texts for every image with weights of each image's own: both broadcast to the latents' batch
    swept = Composition(text[:1], jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]]))
    assert denoise(unet, sched, x, swept, text[:, 0]).shape == x.shape
    with pytest.raises(ValueError, match=r"weights of shape \(2, 2\); expected \[batch or 1, 3\]"):
        denoise(unet, sched, x, Composition(text[:1], jnp.ones((2, 2))), text[:, 0])
    with pytest.raises(ValueError, match="cond_BSD has batch 3 but the latents have 2"):
        denoise(unet, sched, x, Composition(text[:1], jnp.ones((3, 3))), text[:, 0])


def test_sample_py_checks_the_weights_of_each_part_on_its_own():
    """sample.py's check of the emphasis weights reads a prompt with AND part by part, as the pipeline
    (and A1111) does: '(a AND b:1.2.3)' is the parts '(a' and ' b:1.2.3)', whose ':1.2.3)' closes no
    bracket (text), so it runs; the whole prompt read at once would have a weight '1.2.3' to refuse."""
    from sdjax.cli_utils import SampleRequest, UsageError, validate_request
    validate_request(SampleRequest(prompts=["(a AND b:1.2.3)"], seeds=[0], prompt_weighting=True))
    with pytest.raises(UsageError, match="the weight '1.2.3'"):
        validate_request(SampleRequest(prompts=["a AND (b:1.2.3)"], seeds=[0], prompt_weighting=True))
    # the same text as the negative prompt is read whole (AND is text there): its weight '1.2.3' is refused
    with pytest.raises(UsageError, match="--negative-prompt '\\(a AND b:1.2.3\\)': the weight '1.2.3'"):
        validate_request(SampleRequest(prompts=["(a AND b:1.2.3)"], seeds=[0], prompt_weighting=True,
                                       negative_prompt="(a AND b:1.2.3)"))
