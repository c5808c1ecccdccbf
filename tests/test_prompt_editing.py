"""AUTOMATIC1111's prompt editing ([from:to:when]) and alternation ([a|b]): the schedule as A1111's
prompt_parser reads it, per model call as its sampler counts, and the pipeline's images against
diffusers' StableDiffusionPipeline with its text states switched at those calls."""
import numpy as np
import pytest
import torch

from sdjax import parallel
from sdjax.text import edited_prompts, prompt_schedule, tokenize_weighted
from test_sampling import SIZE, diffusers_scheduler, latents_for

STEPS = 10


@pytest.mark.parametrize("prompt,schedule", [
    # AUTOMATIC1111's own examples (its get_learned_conditioning_prompt_schedules doctests, 10 steps)
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # the rules they follow: `when` with a point is a fraction of the steps, without one a step, capped
    # at the steps; below 1 `to` holds from the start; emphasis stays as written
    ("[a:b:0.25]", [(2, "a"), (10, "b")]),            # int(0.25 * 10)
    ("[a:b:1.0]", [(10, "a")]),                        # the whole run
    ("[a:b:25]", [(10, "a")]),                         # capped at the steps
    ("[a:b:0]", [(10, "b")]), ("[a:b:-2]", [(10, "b")]),
    ("[a:b:1e1]", [(10, "a")]),                        # no point: step 10
    ("[a::4] x", [(4, "a x"), (10, " x")]),
    ("(a [b:c:2]:1.3)", [(2, "(a b:1.3)"), (10, "(a c:1.3)")]),
    ("[(a:1.2):[b]:2]", [(2, "(a:1.2)"), (10, "[b]")]),
    ("style: anime, [cat:dog:0.5]", [(5, "style: anime, cat"), (10, "style: anime, dog")]),
    # not editing: escaped brackets, a colon without a number, three colons; A1111's parse fails on a
    # '|' outside an alternation and on a backslash at the end: the prompt as written, no editing
    ("\\[a:b:1\\]", [(10, "\\[a:b:1\\]")]),
    ("[a:b] [c:d:e:1]", [(10, "[a:b] [c:d:e:1]")]),
    ("a | b [c:d:1]", [(10, "a | b [c:d:1]")]),
    ("(a|b) [c:d:1]", [(10, "(a|b) [c:d:1]")]),
    ("[c:d:1] \\", [(10, "[c:d:1] \\")]),
])
def test_prompt_schedule_reads_a1111_prompt_editing(prompt, schedule):
    assert prompt_schedule(prompt, STEPS) == schedule


def test_edited_prompts_count_model_calls_as_a1111s_sampler():
    """A1111's denoiser counts its model calls from 0 and takes the first schedule entry whose step is at
    least the count: calls 0 and 1 both take step 1's text, call c > 0 step c's; a call past the last
    step (none of sdjax's schedulers makes one) the first entry's. The texts are distinct, in order."""
    assert edited_prompts("[cat:dog:2]", 4, 4) == (["cat", "dog"], [0, 0, 0, 1])
    assert edited_prompts("[cat:dog:2]", 4, 5) == (["cat", "dog"], [0, 0, 0, 1, 1])   # PNDM: steps + 1 calls
    assert edited_prompts("[x|y]", 4, 5) == (["x", "y"], [0, 0, 1, 0, 1])
    assert edited_prompts("[x|y]", 2, 4) == (["x", "y"], [0, 0, 1, 0])
    assert edited_prompts("a [x|y|x] b", 3, 3) == (["a x b", "a y b"], [0, 0, 1])
    assert edited_prompts("plain", 4, 4) == (["plain"], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="steps=0: must be a whole number >= 1"):
        prompt_schedule("a", 0)


def _embeds(ref, texts):
    return ref.encode_prompt(texts, "cpu", 1, False)[0]


def test_edited_prompts_make_diffusers_images_with_the_text_switched_at_those_calls(pipe, reference_pipe):
    """prompt_weighting=True reads editing in prompts and negative prompts: the images are diffusers'
    from the same latents with its prompt_embeds replaced after each step (callback_on_step_end) by
    those of the texts A1111 would use at the next call; derived here by hand from the rules above
    (PNDM, 10 steps: 11 model calls, counted 0..10): image 0's prompt is the cat up to call 3 and the dog
    from call 4, its negative prompt blurry up to call 5; image 1 alternates red (odd steps; calls 0 and
    1 are step 1) and blue, with the empty negative prompt. On 8 devices (two images padded to eight)."""
    prompts = ["a photo of the [cat:dog:3]", "the [red|blue] dog"]
    negatives = ["[blurry:sharp:5]", ""]
    calls = STEPS + 1

    def texts_at(c):
        step = max(c, 1)
        return (["a photo of the cat" if c <= 3 else "a photo of the dog",
                 "the red dog" if step % 2 else "the blue dog"],
                ["blurry" if c <= 5 else "sharp", ""])

    embeds = [[_embeds(reference_pipe, t) for t in texts_at(c)] for c in range(calls)]
    used = []

    def switch(ref, i, t, kwargs):
        used.append(i)
        if i + 1 == calls:
            return {}
        cond, uncond = embeds[i + 1]
        return {"prompt_embeds": torch.cat([uncond, cond])}   # (diffusers' guidance order: negatives first)

    latents = latents_for(2, seed=3)
    reference_pipe.scheduler = diffusers_scheduler(reference_pipe, "pndm")
    ref = reference_pipe(prompt_embeds=embeds[0][0], negative_prompt_embeds=embeds[0][1], num_inference_steps=STEPS,
                         height=SIZE, width=SIZE, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                         callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                         output_type="np").images
    assert used == list(range(calls))
    ours = pipe(prompts, negative_prompts=negatives, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                latents=latents, prompt_weighting=True).images
    assert np.abs(ours - ref).max() <= 2e-5
    unswitched = reference_pipe(prompt_embeds=embeds[0][0], negative_prompt_embeds=embeds[0][1],
                                num_inference_steps=STEPS, height=SIZE, width=SIZE,
                                latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="np").images
    assert np.abs(unswitched - ref).max() > 1e-3   # (the switches change the images: the check can fail)


def test_the_pipeline_passes_phases_only_where_a_prompt_edits(pipe):
    """Without editing (or with editing that holds one text for the whole run, its text's ids) the
    sampler gets the weighted call of before: ids [B, 77] and no phases, so its program is unchanged.
    With it, ids and weights [B, P, 77] (each image's texts, its last repeated up to the call's most)
    and phases int32 [B, C] for that side alone; img2img's C counts only the calls it runs."""
    from test_prompt_weighting import _captured
    kw = dict(num_inference_steps=4, height=32, width=32, prompt_weighting=True)
    args, kwargs = _captured(pipe, prompts=["a [cat:dog:9] (x:1.2)", "plain"], **kw)
    assert set(kwargs) >= {"cond_weights_BT", "uncond_weights_BT"} and "cond_phases_BC" not in kwargs
    np.testing.assert_array_equal(parallel.to_host(args[2])[:2],
                                  tokenize_weighted(pipe.tokenizer, ["a cat (x:1.2)", "plain"])[0])
    args, kwargs = _captured(pipe, prompts=["a [cat:dog:2]", "[x|y|z] w"], negative_prompts="[p::1]", **kw)
    texts = ["a cat", "a dog", "a dog", "x w", "y w", "z w"]
    ids, weights = tokenize_weighted(pipe.tokenizer, texts)
    for got, want in ((args[2], ids.reshape(2, 3, 77)), (kwargs["cond_weights_BT"], weights.reshape(2, 3, 77)),
                      (kwargs["cond_phases_BC"], np.array([[0, 0, 0, 1, 1], [0, 0, 1, 2, 0]], np.int32)),
                      (kwargs["uncond_phases_BC"], np.array([[0, 0, 1, 1, 1]] * 2, np.int32))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(parallel.to_host(got)[:2], want)   # (padded to the devices' batch)
    from PIL import Image
    _, kwargs = _captured(pipe, prompts="a [cat:dog:1]", init_images=Image.new("RGB", (32, 32)), strength=0.75,
                          scheduler="ddim", **{k: v for k, v in kw.items() if k not in ("height", "width")})
    np.testing.assert_array_equal(parallel.to_host(kwargs["cond_phases_BC"])[:1], [[0, 0, 1]])   # 3 of 4 calls


def test_denoise_checks_a_text_schedule(pipe):
    """A `TextSchedule` whose phases do not cover the run's model calls, or are no integers, or whose
    states are not [batch, texts, tokens, width], is an error naming it before anything is traced."""
    import jax.numpy as jnp
    from sdjax.sampling import TextSchedule, denoise
    sched = pipe.make_scheduler("ddim", 4)
    x, states = jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 2, 77, 32))
    for text, message in (
            (TextSchedule(states, jnp.zeros((1, 3), jnp.int32)), "cond_BSD's phases have 3 model calls per image; "
                                                                  "this run makes 4"),
            (TextSchedule(states, jnp.zeros((1, 4))), "cond_BSD's phases are float32; expected integers"),
            (TextSchedule(states[0], jnp.zeros((1, 4), jnp.int32)), "expected states [batch, texts, tokens, width]")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            denoise(lambda x, t, c: x, sched, x, text)
    with pytest.raises(ValueError, match="this run makes 2"):   # img2img: the calls it runs
        denoise(lambda x, t, c: x, sched, x, TextSchedule(states, jnp.zeros((1, 4), jnp.int32)), start=2)
