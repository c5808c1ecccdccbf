"""AUTOMATIC1111's long prompts and BREAK under prompt weighting: the chunking against hand-derived cases,
the window layout, the windowed text states against transformers' CLIPTextModel window by window, and a
pipeline call with a long weighted prompt (tiny models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference as R
from conftest import run_jitted
from sdjax import parallel
from sdjax.text import chunk_weighted, load_tokenizer, tokenize, tokenize_weighted, window_count

D = 1 / 1.1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(R.write_tiny_tokenizer(tmp_path_factory.mktemp("tok")), subfolder=None)


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def lengths(chunks):
    return [len(ids) for ids, _ in chunks]


def test_chunks_break_and_the_75_token_boundary(tokenizer):
    """BREAK ends a chunk (its spaces with it; in a group too; not inside a word); a chunk holds 75 tokens,
    the 76th starts a second one; the empty prompt and a trailing BREAK give one (empty / first) chunk."""
    a, red, cat, comma = (ids_of(tokenizer, w)[0] for w in ("a", "red", "cat", ","))
    assert chunk_weighted(tokenizer, "a red BREAK (cat:1.5)") == [([a, red], [1.0, 1.0]), ([cat], [1.5])]
    assert chunk_weighted(tokenizer, "a red,BREAK\ncat") == [([a, red, comma], [1.0] * 3), ([cat], [1.0])]
    assert chunk_weighted(tokenizer, "(a BREAK red)") == [([a], [1.1]), ([red], [1.1])]
    assert chunk_weighted(tokenizer, "BREAK a") == [([], []), ([a], [1.0])]   # an empty window first, as A1111
    assert chunk_weighted(tokenizer, "a BREAK") == [([a], [1.0])]
    assert chunk_weighted(tokenizer, "a BREAK BREAK cat") == [([a], [1.0]), ([], []), ([cat], [1.0])]
    assert chunk_weighted(tokenizer, "") == [([], [])]
    assert len(chunk_weighted(tokenizer, "a BREAKS break")) == 1   # not the word BREAK: text
    assert lengths(chunk_weighted(tokenizer, " ".join(["red"] * 75))) == [75]
    chunks = chunk_weighted(tokenizer, " ".join(["red"] * 75) + " (cat:1.3)")
    assert lengths(chunks) == [75, 1] and chunks[1] == ([cat], [1.3])
    assert lengths(chunk_weighted(tokenizer, " ".join(["red"] * 151))) == [75, 75, 1]
    assert window_count(tokenizer, ["a", " ".join(["red"] * 76), "b BREAK c"]) == 2
    with pytest.raises(TypeError, match="takes a prompt string"):
        chunk_weighted(tokenizer, ["a"])


def test_a_full_chunk_backs_up_to_its_last_comma(tokenizer):
    """A1111's comma_padding_backtrack (20): when a chunk is full and its last comma is among its last 20
    tokens, the tokens after the comma start the next chunk (with their weights); 0 turns it off."""
    comma, cat = ids_of(tokenizer, ",")[0], ids_of(tokenizer, "cat")[0]
    prompt = " ".join(["red"] * 70) + ", (" + " ".join(["cat"] * 10) + ":1.2)"   # comma at index 70
    chunks = chunk_weighted(tokenizer, prompt)
    assert lengths(chunks) == [71, 10]
    assert chunks[0][0][-1] == comma and chunks[1] == ([cat] * 10, [1.2] * 10)
    assert lengths(chunk_weighted(tokenizer, prompt, comma_backtrack=0)) == [75, 6]
    assert lengths(chunk_weighted(tokenizer, prompt, comma_backtrack=4)) == [75, 6]   # 5 back: too far
    assert lengths(chunk_weighted(tokenizer, prompt, comma_backtrack=5)) == [71, 10]
    far = " ".join(["red"] * 50) + ", " + " ".join(["cat"] * 30)   # the comma 25 tokens from the end
    assert lengths(chunk_weighted(tokenizer, far)) == [75, 6]
    ends = " ".join(["red"] * 74) + ", cat"   # a comma that ends the chunk moves nothing
    assert lengths(chunk_weighted(tokenizer, ends)) == [75, 1]
    with pytest.raises(ValueError, match="comma_backtrack=-1: must be a whole number >= 0"):
        chunk_weighted(tokenizer, "a", comma_backtrack=-1)


def test_an_embedding_that_would_cross_a_window_moves_to_the_next_whole(tmp_path):
    """A 3-vector textual inversion embedding after 73 tokens would straddle: the chunk ends there (74
    tokens) and the embedding's 3 tokens start the next one; after 72 it fits exactly (75)."""
    tok = load_tokenizer(R.write_tiny_tokenizer(tmp_path), subfolder=None)
    tok.add_tokens(["<style>", "<style>_1", "<style>_2", "<one>"])
    style = [tok.convert_tokens_to_ids(t) for t in ("<style>", "<style>_1", "<style>_2")]
    chunks = chunk_weighted(tok, " ".join(["red"] * 73) + " (<style>:1.5) cat")
    assert lengths(chunks) == [73, 4] and chunks[1][0][:3] == style and chunks[1][1] == [1.5, 1.5, 1.5, 1.0]
    assert lengths(chunk_weighted(tok, " ".join(["red"] * 72) + " <style> cat")) == [75, 1]
    # a single-vector token and the rows written out are words: they fill the chunk to its end
    assert lengths(chunk_weighted(tok, " ".join(["red"] * 74) + " <one> cat")) == [75, 1]
    assert lengths(chunk_weighted(tok, " ".join(["red"] * 73) + " <style>_1 <style>_2 cat")) == [75, 1]
    tok.add_tokens(["<big>"] + [f"<big>_{i}" for i in range(1, 76)])
    with pytest.raises(ValueError, match="'<big>' has 76 vectors, more than a window's 75 tokens"):
        chunk_weighted(tok, "a <big>")


def test_windows_are_laid_out_and_padded_with_empty_windows(tokenizer):
    """Each chunk in a 77-token window of its own (start, chunk, end, padding), weights 1 outside the chunks;
    a prompt with fewer windows gets the empty prompt's windows added; `windows` sets the count."""
    long = "(" + " ".join(["red"] * 76) + ":1.2) [cat]"
    ids, weights = tokenize_weighted(tokenizer, [long, "a dog"])
    assert ids.shape == weights.shape == (2, 154)
    empty_ids, empty_weights = tokenize_weighted(tokenizer, "")
    np.testing.assert_array_equal(ids[1, :77], tokenize(tokenizer, "a dog")[0])
    np.testing.assert_array_equal(ids[1, 77:], empty_ids[0])
    np.testing.assert_array_equal(weights[1], 1)
    red, cat = ids_of(tokenizer, "red")[0], ids_of(tokenizer, "cat")[0]
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    np.testing.assert_array_equal(ids[0, :77], [start] + [red] * 75 + [end])
    np.testing.assert_array_equal(ids[0, 77:80], [start, red, cat])
    assert ids[0, 80] == end and (ids[0, 81:] == tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(weights[0, :77], np.float32([1] + [1.2] * 75 + [1]))
    np.testing.assert_array_equal(weights[0, 77:81], np.float32([1, 1.2, D, 1]))
    assert (weights[0, 81:] == 1).all()
    three, _ = tokenize_weighted(tokenizer, "a dog", windows=3)
    np.testing.assert_array_equal(three[0], np.concatenate([ids[1], empty_ids[0]]))
    with pytest.raises(ValueError, match="windows=0: must be a whole number >= 1"):
        tokenize_weighted(tokenizer, "a", windows=0)


def test_windowed_states_are_transformers_states_window_by_window(tiny_checkpoints, tokenizer):
    """encode_prompts of k windows = transformers' CLIPTextModel run on each 77-token window, its states
    weighted and their mean restored per window (A1111's process_tokens per chunk), concatenated
    ([B, 77 k, D]); a prompt and a negative prompt of different lengths give the same k. To 1e-5, at clip
    skip 1 and 2 (5e-5: a window's mean ratio magnifies float32 rounding)."""
    from sdjax import CLIPTextModel
    from sdjax.sampling import encode_prompts
    model = CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["safetensors"].parent)
    torch_model = tiny_checkpoints["clip"]["torch"]
    final_layer_norm = getattr(torch_model, "text_model", torch_model).final_layer_norm
    prompts = ["a (red:1.5) [cat] " + " ".join(["dog"] * 80) + " BREAK ((the red)) cat", "(blue:0.5) cat"]
    k = window_count(tokenizer, prompts)
    assert k == 3
    ids, weights = tokenize_weighted(tokenizer, prompts, windows=k)
    assert ids.shape == (2, 77 * 3) and (weights[:, 77:] != 1).sum() >= 2
    for clip_skip in (1, 2):
        want, whole_mean = [], []
        for w in range(k):
            window = slice(77 * w, 77 * (w + 1))
            with torch.no_grad():
                out = torch_model(torch.from_numpy(ids[:, window].astype(np.int64)), output_hidden_states=True)
                z = (out.last_hidden_state if clip_skip == 1 else final_layer_norm(out.hidden_states[-2])).numpy()
            z = z.astype(np.float64)
            weighted = z * weights[:, window, None]
            want.append(weighted * z.mean(axis=(1, 2), keepdims=True) / weighted.mean(axis=(1, 2), keepdims=True))
            whole_mean.append((z, weighted))
        want = np.concatenate(want, axis=1)
        got = run_jitted(f"windows_{clip_skip}", model, lambda m, x, w, n=clip_skip: encode_prompts(m, x, n, w),
                         ids, weights)
        assert got.shape == (2, 77 * 3, model.config.hidden_size)
        assert np.abs(got - want).max() < 5e-5, clip_skip   # (float32 against float64)
        # (the mean restored over the whole prompt instead of per window would be told apart)
        z, weighted = (np.concatenate(x, axis=1) for x in zip(*whole_mean))
        other = weighted * z.mean(axis=(1, 2), keepdims=True) / weighted.mean(axis=(1, 2), keepdims=True)
        assert np.abs(other - want).max() > 1e-2
    unweighted = run_jitted("windows_plain", model, encode_prompts, ids)
    with torch.no_grad():
        plain = np.concatenate([torch_model(torch.from_numpy(ids[:, 77 * w:77 * (w + 1)].astype(np.int64)))
                                .last_hidden_state.numpy() for w in range(k)], axis=1)
    assert np.abs(unweighted - plain).max() < 1e-5
    with pytest.raises(ValueError, match=r"not whole windows of it \(k \* 77"):
        encode_prompts(model, ids[:, :100])


def test_a_long_weighted_prompt_runs_end_to_end_in_windows(tiny_pipeline_dir):
    """prompt_weighting=True with a prompt past 75 tokens: the sampler gets [B, 154] ids and weights for
    the prompts (the call's longest prompt sets k) and [B, 77] for the short negative prompt (its own k),
    the image runs and the words of the second window change it (cut at 75 tokens they would be dropped)."""
    from sdjax.pipeline import StableDiffusion
    from test_prompt_weighting import _captured
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    base = " ".join(["red"] * 75)
    kw = dict(prompts=[base + " (cat:1.3)", base + " dog"], negative_prompts="[blue]", seeds=[1, 1],
              num_inference_steps=2, height=32, width=32, prompt_weighting=True, batch_size=2)
    args, kwargs = _captured(pipe, **kw)
    ids, weights = tokenize_weighted(pipe.tokenizer, kw["prompts"])
    neg_ids, neg_weights = tokenize_weighted(pipe.tokenizer, ["[blue]"] * 2)
    assert ids.shape == weights.shape == (2, 154) and neg_ids.shape == neg_weights.shape == (2, 77)
    for got, want in ((args[2], ids), (args[3], neg_ids), (kwargs["cond_weights_BT"], weights),
                      (kwargs["uncond_weights_BT"], neg_weights)):
        np.testing.assert_array_equal(parallel.to_host(got)[:2], want)
    out = pipe(**kw)
    assert out.images.shape == (2, 32, 32, 3)
    assert np.abs(out.images[0].astype(int) - out.images[1].astype(int)).max() > 0


def test_a_prompt_and_negative_prompt_of_different_lengths_go_through_the_unet_apart(tiny_pipeline_dir):
    """A1111's default for a prompt and a negative prompt of different window counts: each through the
    UNet at its own length (two calls), eps_u + g * (eps_c - eps_u), not the negative prompt padded with
    empty windows (A1111's "Pad prompt/negative prompt" option), which attends to more tokens and so
    gives another result."""
    from sdjax.pipeline import StableDiffusion
    from sdjax.sampling import encode_prompts, guided_model_output
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    cond_ids, _ = tokenize_weighted(pipe.tokenizer, [" ".join(["red"] * 80)] * 2)
    neg_ids, _ = tokenize_weighted(pipe.tokenizer, ["blue"] * 2)
    padded_ids, _ = tokenize_weighted(pipe.tokenizer, ["blue"] * 2, windows=2)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    t, g = jnp.asarray(500), jnp.asarray([7.5, 3.0])

    def outputs(models, x, cond_ids, neg_ids, padded_ids):
        text_encoder, unet = models
        cond, uncond, padded = (encode_prompts(text_encoder, ids) for ids in (cond_ids, neg_ids, padded_ids))
        assert cond.shape[1] == padded.shape[1] == 154 and uncond.shape[1] == 77
        return (guided_model_output(unet, x, t, cond, uncond, g), unet(x, t, uncond), unet(x, t, cond),
                guided_model_output(unet, x, t, cond, padded, g))
    got, eps_u, eps_c, with_padding = run_jitted("apart", nnx.List([pipe.text_encoder, pipe.unet]), outputs, x,
                                                 cond_ids, neg_ids, padded_ids)
    np.testing.assert_allclose(got, eps_u + np.asarray(g)[:, None, None, None] * (eps_c - eps_u), atol=1e-5)
    assert np.abs(got - with_padding).max() > 1e-3
