"""Textual inversion embeddings (StableDiffusion.load_textual_inversion, sdjax.weights.read_textual_inversion)
against diffusers' StableDiffusionPipeline.load_textual_inversion, in diffusers' and AUTOMATIC1111's formats."""
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sdjax.pipeline import StableDiffusion
from sdjax.sampling import encode_prompts
from sdjax.text import tokenize
from sdjax.weights import CheckpointError

WIDTH = 32   # the tiny text encoder's (tests/model_configs.py)


def vectors(n, seed):
    return np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32)


def write_files(folder):
    """One embedding file per format: {name: (path, token diffusers is given, token in sdjax's prompts)}."""
    save_file({"<fox>": vectors(1, 1)[0]}, folder / "learned_embeds.safetensors")            # diffusers, 1 vector
    torch.save({"<owl-style>": torch.from_numpy(vectors(2, 2))}, folder / "learned_embeds.bin")  # diffusers, 2
    import ml_dtypes   # (bfloat16, as a safetensors file may hold them)
    save_file({"emb_params": vectors(3, 3).astype(ml_dtypes.bfloat16)}, folder / "EasyNegative.safetensors")  # A1111, 3
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors(2, 4))},
                "name": "other-name", "step": 100}, folder / "Watercolor.pt")                   # A1111 .pt, 2
    return {"fox": (folder / "learned_embeds.safetensors", "<fox>", "<fox>"),
            "owl": (folder / "learned_embeds.bin", "<owl-style>", "<owl-style>"),
            # diffusers' multi-vector spelling matches the token's letter case only: it gets a lower-case one
            "easy": (folder / "EasyNegative.safetensors", "<easy>", "EasyNegative"),
            "watercolor": (folder / "Watercolor.pt", "<watercolor>", "Watercolor")}


def states(pipe, prompts):
    return np.asarray(encode_prompts(pipe.text_encoder, tokenize(pipe.tokenizer, prompts)))


def test_embeddings_give_diffusers_text_states(tiny_pipeline_dir, tmp_path):
    """Each format's vectors take the place diffusers' load_textual_inversion gives them: the text
    states of prompts using them (several vectors spelled out from one token, in any letter case, in a
    prompt of several) are diffusers' encode_prompt's; prompts without them are unchanged."""
    from diffusers import StableDiffusionPipeline
    files = write_files(tmp_path)
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    plain = states(pipe, ["a photo of the cat"])
    ref = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    for name, (path, ref_token, token) in files.items():
        assert pipe.load_textual_inversion(path) == token
        ref.load_textual_inversion(str(path), token=ref_token)
    ours = states(pipe, ["a <fox> by the river, EasyNegative", "easynegative <owl-style>, watercolor", "<fox>",
                         "a photo of the cat"])
    prompts = ["a <fox> by the river, <easy>", "<easy> <owl-style>, <watercolor>", "<fox>", "a photo of the cat"]
    with torch.no_grad():
        want = ref.encode_prompt(prompts, "cpu", 1, False)[0].numpy()
    assert np.abs(ours - want).max() <= 1e-5
    assert np.abs(ours[3] - plain[0]).max() <= 1e-5   # (a batch of 4 against 1: rounding only)
    assert np.abs(ours[0] - states(StableDiffusion.from_pretrained(tiny_pipeline_dir),
                                   ["a <fox> by the river, EasyNegative"])[0]).max() > 1e-2


def test_bad_embedding_files_are_refused_before_anything_changes(tiny_pipeline_dir, tmp_path):
    """A missing file, another format, an SDXL embedding, vectors of another width and a token the
    tokenizer knows (a word, an embedding loaded before) are errors naming the file, and leave the
    tokenizer and the text encoder as they were."""
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    save_file({"emb_params": vectors(2, 0)}, tmp_path / "ok.safetensors")
    pipe.load_textual_inversion(tmp_path / "ok.safetensors")
    save_file({"clip_l": vectors(2, 0), "clip_g": vectors(2, 1)}, tmp_path / "sdxl.safetensors")
    save_file({"a": vectors(1, 0), "b": vectors(1, 1)}, tmp_path / "two.safetensors")
    save_file({"<wide>": np.zeros((2, WIDTH * 2), np.float32)}, tmp_path / "wide.safetensors")
    save_file({"cat": vectors(1, 0)}, tmp_path / "word.safetensors")
    save_file({"<nan>": np.full((1, WIDTH), np.nan, np.float32)}, tmp_path / "nan.safetensors")
    torch.save({"<ints>": torch.ones(2, WIDTH, dtype=torch.int64)}, tmp_path / "ints.bin")
    (tmp_path / "notes.txt").write_text("hello")
    size, table = len(pipe.tokenizer), np.asarray(pipe.text_encoder.text_model.embeddings.token_embedding.embedding)
    for file, message in [("nope.safetensors", "no such embedding file"),
                          ("notes.txt", "sdjax reads textual inversion embeddings as"),
                          ("sdxl.safetensors", "an SDXL embedding"),
                          ("two.safetensors", "not a textual inversion embedding sdjax reads .* it has a, b"),
                          ("wide.safetensors", f"its vectors have width {WIDTH * 2}; this text encoder's is {WIDTH}"),
                          ("word.safetensors", "the token 'cat' is already known"),
                          ("nan.safetensors", "the embedding's vectors hold NaN or infinite values"),
                          ("ints.bin", r"the embedding has shape \(2, 32\) and dtype int64; expected float vectors"),
                          ("ok.safetensors", "the token 'ok' is already known")]:
        with pytest.raises(CheckpointError, match=f"{tmp_path / file}: {message}"):
            pipe.load_textual_inversion(tmp_path / file)
    with pytest.raises(CheckpointError, match="the token 'OK_1' is already known"):   # any letter case
        pipe.load_textual_inversion(tmp_path / "word.safetensors", token="OK_1")
    with pytest.raises(CheckpointError,
                       match="the token 'Ok_5' would be read as a further vector of the embedding 'Ok'"):
        pipe.load_textual_inversion(tmp_path / "word.safetensors", token="Ok_5")
    assert len(pipe.tokenizer) == size
    np.testing.assert_array_equal(np.asarray(pipe.text_encoder.text_model.embeddings.token_embedding.embedding), table)


def test_a_saved_pipeline_keeps_its_embeddings(tiny_pipeline_dir, tmp_path):
    """save_pretrained writes the added tokens and the grown table: the folder loads again in sdjax
    with the same text states (a multi-vector token still spelled out) and in diffusers."""
    from diffusers import StableDiffusionPipeline
    files = write_files(tmp_path)
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    pipe.load_textual_inversion(files["easy"][0])
    prompts = ["a <easy> cat, EasyNegative"]
    before = states(pipe, prompts)
    pipe.save_pretrained(tmp_path / "saved", format="pytorch")
    again = StableDiffusion.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(states(again, prompts), before)
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    with torch.no_grad():
        want = ref.encode_prompt(["a <easy> cat, EasyNegative EasyNegative_1 EasyNegative_2"], "cpu", 1, False)[0]
    assert np.abs(before - want.numpy()).max() <= 1e-5


def test_a_token_that_starts_another_is_spelled_out_only_where_it_is_the_match(tiny_pipeline_dir, tmp_path):
    """EasyNegative and EasyNegativeV2 (both multi-vector) in one prompt: each is its own vectors, as the
    tokenizer matches them (longest first); a token's own row (``<x>_1``) written out is that row alone."""
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    save_file({"emb_params": vectors(3, 0)}, tmp_path / "EasyNegative.safetensors")
    save_file({"emb_params": vectors(2, 1)}, tmp_path / "EasyNegativeV2.safetensors")
    for name in ("EasyNegative", "EasyNegativeV2"):
        pipe.load_textual_inversion(tmp_path / f"{name}.safetensors")
    ids = tokenize(pipe.tokenizer, ["easynegativev2, EasyNegative EasyNegative_2"])[0]
    words = "EasyNegativeV2 EasyNegativeV2_1 ,</w> EasyNegative EasyNegative_1 EasyNegative_2 EasyNegative_2".split()
    want = pipe.tokenizer.convert_tokens_to_ids(words)
    assert list(ids[1:len(want) + 1]) == want


def test_a_single_file_leaves_the_embeddings_out_and_loads(tiny_pipeline_dir, tmp_path):
    """Embeddings that grew the token table are not written to a single file (with a warning): the file
    loads in sdjax (and diffusers' from_single_file, the web UIs) with the model's own rows."""
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    rows = pipe.text_encoder.config.vocab_size
    save_file({"<many>": vectors(rows - len(pipe.tokenizer) + 2, 5)}, tmp_path / "many.safetensors")
    pipe.load_textual_inversion(tmp_path / "many.safetensors")
    assert pipe.text_encoder.config.vocab_size == rows + 2   # (the table grew)
    with pytest.warns(UserWarning, match=r"the textual inversion embeddings \(<many>\) are not written"):
        pipe.save_single_file(tmp_path / "model.safetensors")
    again = StableDiffusion.from_single_file(tmp_path / "model.safetensors", config=tiny_pipeline_dir)
    assert again.text_encoder.config.vocab_size == rows
    np.testing.assert_array_equal(states(again, ["a photo of the cat"]),
                                  states(StableDiffusion.from_pretrained(tiny_pipeline_dir), ["a photo of the cat"]))


def test_the_first_textual_inversion_codes_pt_files_are_read(tmp_path):
    """string_to_param as an nn.ParameterDict (rinongal/textual_inversion's .pt files, which A1111 reads)."""
    from sdjax.weights import read_textual_inversion
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.from_numpy(vectors(2, 6)))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "Old.pt")
    token, found = read_textual_inversion(tmp_path / "Old.pt")
    assert token == "Old"
    np.testing.assert_array_equal(found, vectors(2, 6))
