"""AUTOMATIC1111's prompt weighting ("emphasis"): the parser against hand-derived cases, the weighted
tokenization against `tokenize`, the weighted text states against transformers' CLIPTextModel, and the
pipeline's use of them (without running the sampler: tests/test_cli.py makes a weighted image)."""
import re
import warnings

import jax
import numpy as np
import pytest
import torch

import reference as R
from conftest import run_jitted
from sdjax import parallel
from sdjax.text import chunk_weighted, load_tokenizer, parse_prompt_attention, tokenize, tokenize_weighted, window_count

D = 1 / 1.1   # [text]'s factor


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(R.write_tiny_tokenizer(tmp_path_factory.mktemp("tok")), subfolder=None)


# Each weight is written as the product A1111 forms, in its order (inner groups first), so equal floats.
@pytest.mark.parametrize("prompt,chunks", [
    ("", [("", 1.0)]),
    ("a red cat", [("a red cat", 1.0)]),
    ("a (red) cat", [("a ", 1.0), ("red", 1.1), (" cat", 1.0)]),
    ("[red]", [("red", D)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("(red:1.5)", [("red", 1.5)]),
    ("( red : 0.5 ) cat", [(" red ", 0.5), (" cat", 1.0)]),   # spaces around the factor, as A1111's \s*
    ("(a:+2)", [("a", 2.0)]),
    ("((red:1.5))", [("red", 1.5 * 1.1)]),
    ("[(red:2)] cat", [("red", 2.0 * D), (" cat", 1.0)]),
    ("(a [b] c)", [("a ", 1.1), ("b", D * 1.1), (" c", 1.1)]),
    (r"\(red\) \[x\] \\", [("(red) [x] \\", 1.0)]),       # escapes are the characters themselves
    (r"a\b", [("ab", 1.0)]),                                # another backslash is dropped
    ("a (b [c", [("a ", 1.0), ("b ", 1.1), ("c", 1.1 * D)]),   # unbalanced: to the end, ( before [
    ("a) b]", [("a) b]", 1.0)]),                            # closing nothing: text
    ("(word:abc)", [("word:abc", 1.1)]),                    # no number: the colon is text, the group (word)
    ("word:1.5)", [("word:1.5)", 1.0)]),                    # a factor with no group open: text
    ("(a)(b) (c)", [("ab", 1.1), (" ", 1.0), ("c", 1.1)]),   # equal neighbours merge
    ("a BREAK b", [("a BREAK b", 1.0)]),                    # no chunk break: a word
    # A1111's own docstring example
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", D * 1.1), (" a ", 1.1), ("hill", 0.5 * 1.1),
      (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)]),
])
def test_parse_prompt_attention(prompt, chunks):
    assert parse_prompt_attention(prompt) == chunks


def test_parse_prompt_attention_refuses_a_factor_that_is_no_number():
    for prompt, factor in (("(a:1.2.3)", "1.2.3"), ("(a:.)", "."), ("x (a:+.) y", "+.")):
        with pytest.raises(ValueError, match=re.escape(f"prompt {prompt!r}: the weight {factor!r}")):
            parse_prompt_attention(prompt)
    with pytest.raises(TypeError, match="takes a prompt string"):
        parse_prompt_attention(["a"])


def test_tokenize_weighted_ids_are_tokenizes_and_weights_are_the_chunks(tokenizer):
    """A prompt without the syntax that fits one window: `tokenize`'s ids and weights of 1; with it: the
    ids of its text, each token weighted as its chunk, the rest 1."""
    long = " ".join(["the red dog"] * 40)
    plain = ["a photo of the cat", ""]
    ids, weights = tokenize_weighted(tokenizer, plain)
    np.testing.assert_array_equal(ids, tokenize(tokenizer, plain))
    assert ids.dtype == np.int32 and weights.dtype == np.float32 and weights.shape == (2, 77)
    assert (weights == 1).all()
    ids, weights = tokenize_weighted(tokenizer, ["a (red:1.5) [cat]", r"\(the\) ((dog))"])
    np.testing.assert_array_equal(ids, tokenize(tokenizer, ["a red cat", "(the) dog"]))
    red = tokenizer("red", add_special_tokens=False).input_ids
    assert len(red) == 1   # (the tiny vocabulary has it as one token: the weights below are per token)
    np.testing.assert_array_equal(weights[0, :5], np.float32([1, 1, 1.5, D, 1]))
    n = len(tokenizer("(the)", add_special_tokens=False).input_ids)
    np.testing.assert_array_equal(weights[1, :n + 3], np.float32([1] * (n + 1) + [1.1 * 1.1, 1]))
    assert (weights[:, 6 + n:] == 1).all()
    # a weighted prompt past the window read in one window (windows=1): cut after 75 tokens, with a warning,
    # the end token and its weight kept
    with pytest.warns(UserWarning, match="takes 2 windows of 77 tokens; 1 are read, so its last 45 tokens"):
        ids, weights = tokenize_weighted(tokenizer, f"({long}:1.2)", windows=1)
    assert ids[0, -1] == tokenizer.eos_token_id and weights[0, -1] == 1 and (weights[0, 1:-1] == np.float32(1.2)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ids, tokenize(tokenizer, long))
    with pytest.raises(ValueError, match="no prompts to tokenize"):
        tokenize_weighted(tokenizer, [])


def test_emphasis_modes_read_the_syntax_as_a1111s_settings(tokenizer):
    """A1111's Emphasis setting: "ignore" reads the syntax (the brackets go, BREAK ends a window) and weights
    every token 1; "none" reads none of it (its tokenize_line: the line as one piece of weight 1), so the
    brackets and BREAK are words, and a long prompt is still read in windows; "no_norm" weights as
    "original" (it differs in the encoder)."""
    prompt = "a (red:1.5) [cat] BREAK dog"
    original = tokenize_weighted(tokenizer, prompt)
    assert original[0].shape == (1, 154) and (original[1] != 1).any()
    no_norm = tokenize_weighted(tokenizer, prompt, emphasis="no_norm")
    np.testing.assert_array_equal(no_norm[0], original[0]), np.testing.assert_array_equal(no_norm[1], original[1])
    ignore = tokenize_weighted(tokenizer, prompt, emphasis="ignore")
    np.testing.assert_array_equal(ignore[0], original[0])
    assert (ignore[1] == 1).all()
    none = tokenize_weighted(tokenizer, prompt, emphasis="none")
    np.testing.assert_array_equal(none[0], tokenize(tokenizer, prompt))   # one window: the text as written
    assert (none[1] == 1).all()
    long = " ".join(["(the red dog:1.2)"] * 30)
    assert window_count(tokenizer, long, emphasis="none") > window_count(tokenizer, long) > 1
    assert chunk_weighted(tokenizer, "(a:1.2.3)", emphasis="none")   # (no weight read: no error)
    with pytest.raises(ValueError, match="emphasis='No norm': choose one of 'original', 'no_norm', 'ignore', 'none'"):
        tokenize_weighted(tokenizer, prompt, emphasis="No norm")


def test_textual_inversion_tokens_are_spelled_out_inside_weighted_chunks(tmp_path):
    """A multi-vector embedding's token in a group: all of its tokens, each with the group's weight."""
    tok = load_tokenizer(R.write_tiny_tokenizer(tmp_path), subfolder=None)
    tok.add_tokens(["<style>", "<style>_1", "<style>_2"])
    ids, weights = tokenize_weighted(tok, "the (<style>:1.3) cat")
    np.testing.assert_array_equal(ids, tokenize(tok, "the <style> cat"))
    style = [tok.convert_tokens_to_ids(t) for t in ("<style>", "<style>_1", "<style>_2")]
    assert list(ids[0, 2:5]) == style
    np.testing.assert_array_equal(weights[0, :6], np.float32([1, 1, 1.3, 1.3, 1.3, 1]))


def test_weighted_states_are_transformers_states_weighted_and_mean_restored(tiny_checkpoints, tokenizer):
    """encode_prompts(..., weights_BT) = transformers' hidden states (last layer, and clip skip 2's through
    the final layer norm) times the weights, rescaled per prompt to the mean before (A1111's emphasis),
    to 1e-5; weights of 1 give the states of encode_prompts without weights."""
    from sdjax import CLIPTextModel
    from sdjax.sampling import emphasize, encode_prompts
    model = CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["safetensors"].parent)
    torch_model = tiny_checkpoints["clip"]["torch"]
    final_layer_norm = getattr(torch_model, "text_model", torch_model).final_layer_norm   # (transformers 5: flat)
    ids, weights = tokenize_weighted(tokenizer, ["a (red:1.5) [cat]", "((the)) dog (in blue:0.4)"])
    assert (weights != 1).sum() >= 5
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        states = {1: ref.last_hidden_state.numpy(), 2: final_layer_norm(ref.hidden_states[-2]).numpy()}
    for clip_skip, z in states.items():
        z = z.astype(np.float64)
        want = z * weights[:, :, None]
        want *= z.mean(axis=(1, 2), keepdims=True) / want.mean(axis=(1, 2), keepdims=True)
        got = run_jitted(f"weighted_{clip_skip}", model,
                         lambda m, x, w, n=clip_skip: encode_prompts(m, x, n, w), ids, weights)
        assert np.abs(got - want).max() < 1e-5, clip_skip
        assert np.abs(got - z).max() > 1e-2   # the weights change the states
        # A1111's Emphasis "No norm": the weighted states, the mean not restored
        no_norm = run_jitted(f"no_norm_{clip_skip}", model, lambda m, x, w, n=clip_skip: encode_prompts(
            m, x, n, w, restore_mean=False), ids, weights)
        assert np.abs(no_norm - z * weights[:, :, None]).max() < 1e-5 < np.abs(no_norm - want).max()
    plain = run_jitted("unweighted", model, encode_prompts, ids)
    ones = run_jitted("weighted_ones", model, lambda m, x, w: encode_prompts(m, x, 1, w), ids, np.ones_like(weights))
    np.testing.assert_allclose(ones, plain, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"emphasize: weights of shape \(2, 76\) for text states of shape"):
        emphasize(plain, weights[:, :76])


def _captured(pipe, **kwargs):
    """The (args, kwargs) the pipeline passes its compiled sampler, without running it."""
    calls = []

    class Stop(Exception):
        pass

    def capture(*a, **k):
        calls.append((a, k))
        raise Stop
    original, pipe._generate = pipe._generate, capture
    try:
        with pytest.raises(Stop):
            pipe(**kwargs)
    finally:
        pipe._generate = original
    return calls[0]


def test_the_pipeline_passes_the_weights_as_inputs_and_none_when_off(tiny_pipeline_dir):
    """prompt_weighting=True: the prompts' and negative prompts' weights reach the sampler as float32
    [B, 77] arrays (inputs: other weights compile nothing), the ids those of the text; off (default):
    the call of before, no weights at all, so the default program is the one without weighting."""
    from sdjax.pipeline import StableDiffusion
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    kw = dict(prompts=["a (red:1.5) cat", "the dog"], negative_prompts="[blue]", seeds=[1, 2],
              num_inference_steps=2, height=32, width=32)
    args, kwargs = _captured(pipe, **kw)
    assert "cond_weights_BT" not in kwargs and "uncond_weights_BT" not in kwargs
    np.testing.assert_array_equal(parallel.to_host(args[2])[:2],
                                  tokenize(pipe.tokenizer, ["a (red:1.5) cat", "the dog"]))
    w_args, w_kwargs = _captured(pipe, prompt_weighting=True, **kw)
    assert {k: v for k, v in w_kwargs.items() if "weights" not in k} == kwargs
    ids, weights = tokenize_weighted(pipe.tokenizer, ["a (red:1.5) cat", "the dog"])
    neg_ids, neg_weights = tokenize_weighted(pipe.tokenizer, ["[blue]"] * 2)
    for got, want in ((w_args[2], ids), (w_args[3], neg_ids), (w_kwargs["cond_weights_BT"], weights),
                      (w_kwargs["uncond_weights_BT"], neg_weights)):
        assert got.dtype == want.dtype and isinstance(got, jax.Array)
        np.testing.assert_array_equal(parallel.to_host(got)[:2], want)   # (padded to the devices' batch)
    with pytest.raises(TypeError, match="prompt_weighting='yes': must be True or False"):
        pipe("a cat", prompt_weighting="yes")
    # A1111's Emphasis setting: "no_norm" the same inputs and the static restore_mean=False; "ignore" and
    # "none" no weights (A1111 applies none), "none" the brackets as words
    _, n_kwargs = _captured(pipe, prompt_weighting=True, emphasis="no_norm", **kw)
    assert n_kwargs.pop("restore_mean") is False and n_kwargs.keys() == w_kwargs.keys()
    for emphasis, text in (("ignore", "a red cat"), ("none", "a (red:1.5) cat")):
        e_args, e_kwargs = _captured(pipe, prompt_weighting=True, emphasis=emphasis, **kw)
        assert e_kwargs == kwargs, emphasis   # (the program of no weighting, for one-window prompts)
        np.testing.assert_array_equal(parallel.to_host(e_args[2])[:1], tokenize(pipe.tokenizer, [text]))
    with pytest.raises(ValueError, match="emphasis='none' is a setting of AUTOMATIC1111's prompt syntax: it needs "
                                         "prompt_weighting=True"):
        pipe("a cat", emphasis="none")
