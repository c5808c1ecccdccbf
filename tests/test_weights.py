"""Loading errors, saving back to the diffusers layouts, pipeline folders and the tokenizer."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference as R
from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from sdjax.text import load_tokenizer, tokenize
from sdjax.weights import CheckpointError, resolve_dtype, save_pipeline

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def copy_model_dir(entry, layout, tmp_path):
    src = entry[layout].parent
    dst = tmp_path / layout
    shutil.copytree(src, dst)
    return dst, dst / entry[layout].name


# ----------------------------------------------------------------------------- errors
def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(R.TINY_VAE, default=list))
    with pytest.raises(CheckpointError, match="no weights file.*diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        AutoencoderKL.from_pretrained(tmp_path / "nope" / "deeper")
    with pytest.raises(CheckpointError, match="no config.json"):
        AutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no unet/ folder"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")


def test_offline_hub_error_says_how_to_use_a_local_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local directory"):
        UNet2DConditionModel.from_pretrained("no-such-user/no-such-model", subfolder="unet")


@pytest.mark.parametrize("layout", ["safetensors", "flax"])
def test_missing_and_unexpected_keys(tiny_checkpoints, tmp_path, layout):
    from flax.serialization import msgpack_restore, msgpack_serialize
    from safetensors.numpy import load_file, save_file
    directory, file = copy_model_dir(tiny_checkpoints["vae"], layout, tmp_path)
    if layout == "safetensors":
        tensors = load_file(file)
        del tensors["decoder.conv_in.bias"]
        tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
        save_file(tensors, file)
        missing, extra = "decoder.conv_in.bias", "decoder.extra.weight"
    else:
        tree = msgpack_restore(file.read_bytes())
        del tree["decoder"]["conv_in"]["bias"]
        tree["decoder"]["extra"] = {"kernel": np.zeros(3, np.float32)}
        file.write_bytes(msgpack_serialize(tree))
        missing, extra = "decoder/conv_in/bias", "decoder/extra/kernel"
    with pytest.raises(CheckpointError) as info:
        AutoencoderKL.from_pretrained(directory)
    message = str(info.value)
    assert str(file) in message and f"missing keys (1): {missing}" in message
    assert f"unexpected keys (1): {extra}" in message


def test_wrong_shape(tiny_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file
    directory, file = copy_model_dir(tiny_checkpoints["unet"], "safetensors", tmp_path)
    tensors = load_file(file)
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:16]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"'conv_in.weight' has shape \(3, 3, 4, 16\).*expects \(3, 3, 4, 32\)"):
        UNet2DConditionModel.from_pretrained(directory)


@pytest.mark.parametrize("layout", ["safetensors", "flax"])
def test_truncated_file(tiny_checkpoints, tmp_path, layout):
    directory, file = copy_model_dir(tiny_checkpoints["clip"], layout, tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(file)):
        CLIPTextModel.from_pretrained(directory)


def test_garbage_bin_file(tiny_checkpoints, tmp_path):
    directory, file = copy_model_dir(tiny_checkpoints["vae"], "bin_old_names", tmp_path)
    file.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        AutoencoderKL.from_pretrained(directory)


def test_unknown_dtype(tiny_checkpoints):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["flax"].parent, dtype="float8")
    with pytest.raises(ValueError, match="unsupported dtype int32"):
        resolve_dtype(jnp.int32)
    assert resolve_dtype("bf16") is jnp.bfloat16


# ----------------------------------------------------------------------------- saving
def params_of(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("kind,cls", [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("clip", CLIPTextModel)])
def test_save_then_reference_load(tiny_checkpoints, tmp_path, kind, cls):
    """sdjax -> save_pretrained (both layouts) -> diffusers/transformers PyTorch load: the same
    weights, and sdjax reloads the Flax layout to identical params."""
    model = cls.from_pretrained(tiny_checkpoints[kind]["flax"].parent)
    model.save_pretrained(tmp_path, format="both")
    ref = tiny_checkpoints[kind]["torch"]
    if kind == "clip":
        from transformers import CLIPTextModel as TorchCLIP
        loaded = TorchCLIP.from_pretrained(tmp_path)
    else:
        import diffusers
        loaded = getattr(diffusers, type(ref).__name__).from_pretrained(tmp_path)
    expected = ref.state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    shutil.move(tmp_path / next(p.name for p in tmp_path.glob("*.safetensors")), tmp_path.parent / f"{kind}.st")
    again = cls.from_pretrained(tmp_path)  # only the msgpack is left
    a, b = params_of(model), params_of(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_save_bf16(tiny_checkpoints, tmp_path):
    model = UNet2DConditionModel.from_pretrained(tiny_checkpoints["unet"]["safetensors"].parent)
    model.save_pretrained(tmp_path, format="flax", dtype="bfloat16")
    again = UNet2DConditionModel.from_pretrained(tmp_path, dtype=jnp.float32)
    original = params_of(model)
    for k, v in params_of(again).items():
        np.testing.assert_allclose(v, original[k], rtol=1e-2, atol=1e-6)


def make_pipeline_dir(tiny_checkpoints, tmp_path):
    tok_dir = R.write_tiny_tokenizer(tmp_path / "tok")
    return dict(text_encoder=CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["flax"].parent),
                unet=UNet2DConditionModel.from_pretrained(tiny_checkpoints["unet"]["flax"].parent),
                vae=AutoencoderKL.from_pretrained(tiny_checkpoints["vae"]["flax"].parent),
                tokenizer=load_tokenizer(tok_dir, subfolder=None), scheduler_config=SD15_SCHEDULER)


def test_pipeline_folder_loads_in_diffusers(tiny_checkpoints, tmp_path):
    """A saved pipeline folder loads in diffusers' StableDiffusionPipeline and its models compute
    what sdjax computes."""
    from diffusers import StableDiffusionPipeline
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    out = save_pipeline(tmp_path / "pipe", **parts)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                     "tokenizer", "unet", "vae"]
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    ids = tokenize(pipe.tokenizer, ["a photo of the cat", ""])
    assert ids.shape == (2, 77)
    with torch.no_grad():
        ref_text = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
        latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
        ref_eps = pipe.unet(torch.from_numpy(latents), 500, torch.from_numpy(ref_text)).sample.numpy()
        ref_img = pipe.vae.decode(torch.from_numpy(latents)).sample.numpy()
    ours_text = parts["text_encoder"](jnp.asarray(ids)).last_hidden_state
    assert np.abs(np.asarray(ours_text) - ref_text).max() < 1e-4
    to_nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    ours_eps = parts["unet"](to_nhwc(latents), 500, ours_text)
    assert np.abs(np.asarray(ours_eps) - ref_eps.transpose(0, 2, 3, 1)).max() < 1e-4
    ours_img = parts["vae"].decode(to_nhwc(latents))
    assert np.abs(np.asarray(ours_img) - ref_img.transpose(0, 2, 3, 1)).max() < 1e-4
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_pipeline_folder_is_not_overwritten_or_half_written(tiny_checkpoints, tmp_path):
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    target = tmp_path / "pipe"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        save_pipeline(target, **parts)
    assert (target / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="unknown format"):
        save_pipeline(tmp_path / "other", **parts, format="onnx")
    assert not (tmp_path / "other").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".other")]  # temp folder cleaned up


def test_flax_pipeline_folder_names_flax_classes(tiny_checkpoints, tmp_path):
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    out = save_pipeline(tmp_path / "pipe", **parts, format="flax")
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "FlaxUNet2DConditionModel"]
    assert (out / "unet" / "diffusion_flax_model.msgpack").is_file()
    assert (out / "text_encoder" / "flax_model.msgpack").is_file()
    assert not list(out.rglob("*.safetensors"))


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_truncation_warns(tmp_path):
    tok = load_tokenizer(R.write_tiny_tokenizer(tmp_path), subfolder=None)
    ids = tokenize(tok, ["the cat " * 10, "the cat " * 50])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    with pytest.warns(UserWarning, match=r"prompt 0 is 102 tokens long.*last 25 tokens were dropped"):
        tokenize(tok, "the cat " * 50)
    assert ids[1, -1] == tok.eos_token_id and ids[1, 0] == tok.bos_token_id
