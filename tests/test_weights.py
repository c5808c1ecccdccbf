"""Loading errors, saving back to the diffusers layouts, pipeline folders and the tokenizer."""
import json
import re
import shlex
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference as R
from conftest import run_jitted
from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from sdjax.text import load_tokenizer, tokenize
from sdjax.weights import CheckpointError, read_config, resolve_dtype, save_pipeline

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
    with pytest.raises(CheckpointError, match="`hf download no-such-user/no-such-model --revision fp16 --include "
                                              "unet/config.json .* --local-dir DIR`\\) and pass DIR instead"):
        UNet2DConditionModel.from_pretrained("no-such-user/no-such-model", subfolder="unet", revision="fp16")


def test_model_path_that_is_a_file_or_a_missing_relative_folder(tmp_path, monkeypatch):
    single = tmp_path / "v1-5-pruned-emaonly.safetensors"
    single.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; from_pretrained loads a diffusers pipeline folder.*StableDiffusion.from_single_file"):
        UNet2DConditionModel.from_pretrained(single)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):   # not sent to the Hub as a repo id
        UNet2DConditionModel.from_pretrained("./no-such/model")


def test_mistyped_local_paths_that_look_like_hub_ids(tmp_path, monkeypatch):
    """``runs/fnal`` (for ``runs/final``) has a Hub repo id's shape, so it is tried there, but the
    error says first that ``runs`` has no ``fnal``; a name no repo id can have is not sent at all.
    A train.py output folder given for its exported pipeline points to ``final/``."""
    from sdjax import StableDiffusion
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "final").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^runs/fnal: no such local folder \(runs has no 'fnal'\); as a Hub "
                                              r"repo id: could not get 'runs/fnal'"):
        UNet2DConditionModel.from_pretrained("runs/fnal", subfolder="unet")
    with pytest.raises(CheckpointError, match=r"^my-model~: no such local folder, and not a Hugging Face Hub repo id"):
        UNet2DConditionModel.from_pretrained("my-model~", subfolder="unet")
    with pytest.raises(CheckpointError, match=r"runs: no scheduler/scheduler_config.json \(it looks like a train.py "
                                              r"output folder: its exported pipeline is runs/final\)"):
        StableDiffusion.from_pretrained("runs")
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"sd/unet: no scheduler/scheduler_config.json \(it looks like the unet "
                                              r"of the pipeline sd: load that folder\)"):
        StableDiffusion.from_pretrained("sd/unet")


def test_flax_msgpack_values_decode_as_flax_encodes_them():
    """Every value flax.serialization writes (arrays of any dtype, numpy scalars, complex numbers)
    reads back as flax itself reads it."""
    import ml_dtypes
    import msgpack
    from flax.serialization import msgpack_restore, msgpack_serialize
    from sdjax.weights import _decode_flax_array
    tree = {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "half": np.ones(2, ml_dtypes.bfloat16),
            "scalar": np.float32(2.5), "count": np.int64(7), "z": 1 + 2j}
    data = msgpack_serialize(tree)
    ours, theirs = msgpack.unpackb(data, ext_hook=_decode_flax_array), msgpack_restore(data)
    assert ours.keys() == theirs.keys()
    for key in tree:
        assert type(ours[key]) is type(theirs[key]) and np.array_equal(ours[key], theirs[key]), key


def test_bad_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: expected a JSON object"):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**R.TINY_UNET, "addition_embed_type": "text_time"},
                                                     default=list))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/config.json: .*addition_embed_type='text_time' is not "
                                              "supported"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    # Fields that do not fit together are named, not an IndexError or a shape error from inside the model.
    for change, message in (({"block_out_channels": [32, 64, 64]}, r"down_block_types=\[.*\] has 2 entries; "
                                                                   r"block_out_channels=\[32, 64, 64\] has 3"),
                            ({"norm_num_groups": 7}, "block_out_channels 32 is not divisible by norm_num_groups 7"),
                            ({"attention_head_dim": 3}, "block_out_channels 32 is not divisible by its attention "
                                                        "head count 3"),
                            ({"block_out_channels": "32,64,64"}, "block_out_channels='32,64,64': expected a list, one "
                                                                 "entry per block"),
                            ({"block_out_channels": [32, "64", 64]}, r"block_out_channels=\(32, '64', 64\): expected a "
                                                                     "list of positive integers"),
                            ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
                             r"\['SimpleCrossAttnDownBlock2D'\] not supported"),
                            ({"down_block_types": None}, "down_block_types=None: expected a list, one entry per block"),
                            ({"layers_per_block": "2"}, "layers_per_block='2': expected a positive integer"),
                            ({"layers_per_block": [2, 2, 2]}, r"layers_per_block=\[2, 2, 2\]: per-block lists are "
                                                              "not supported"),
                            ({"addition_embed_type": "text_time"}, r"\(an SDXL UNet: sdjax builds SD 1.x / 2.x "
                                                                   r"ones\)")):
        (tmp_path / "config.json").write_text(json.dumps({**R.TINY_UNET, **change}, default=list))
        with pytest.raises(CheckpointError, match=rf"{tmp_path}/config.json: not a config .*{message}"):
            UNet2DConditionModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**R.TINY_CLIP, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match="hidden_size 32 is not divisible by num_attention_heads 5"):
        CLIPTextModel.from_pretrained(tmp_path)
    # Numbers and flags of the wrong type are named at load, not inside a trace at sampling time.
    for cls, base, change, message in (
            (AutoencoderKL, R.TINY_VAE, {"scaling_factor": "0.18215"}, "scaling_factor='0.18215': expected a "
                                                                       "positive number"),
            (AutoencoderKL, R.TINY_VAE, {"scaling_factor": None}, "scaling_factor=None: expected a positive number"),
            (AutoencoderKL, R.TINY_VAE, {"use_quant_conv": "false"}, "use_quant_conv='false': expected true or false"),
            (UNet2DConditionModel, R.TINY_UNET, {"norm_eps": "1e-5"}, "norm_eps='1e-5': expected a positive number"),
            (UNet2DConditionModel, R.TINY_UNET, {"freq_shift": [0]}, r"freq_shift=\[0\]: expected a number"),
            (UNet2DConditionModel, R.TINY_UNET, {"flip_sin_to_cos": 2}, "flip_sin_to_cos=2: expected true or false"),
            (CLIPTextModel, R.TINY_CLIP, {"layer_norm_eps": "1e-5"}, "layer_norm_eps='1e-5': expected a positive")):
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}, default=list))
        with pytest.raises(CheckpointError, match=rf"{tmp_path}/config.json: .*{message}"):
            cls.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**R.TINY_UNET, "flip_sin_to_cos": 1, "freq_shift": 1},
                                                     default=list))
    config, _ = read_config(tmp_path, UNet2DConditionModel)  # 0 / 1 flags are read as booleans
    assert config.flip_sin_to_cos is True and config.freq_shift == 1


def test_clip_position_ids_buffer_is_ignored(tiny_checkpoints, tmp_path):
    """transformers 4 saved the int64 ``position_ids`` buffer in SD's text encoder files; it is no weight."""
    from safetensors.numpy import load_file, save_file
    directory, file = copy_model_dir(tiny_checkpoints["clip"], "safetensors", tmp_path)
    tensors = load_file(file)
    assert not any("position_ids" in k for k in tensors)
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, file)
    with_buffer = params_of(CLIPTextModel.from_pretrained(directory))
    plain = params_of(CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["safetensors"].parent))
    assert with_buffer.keys() == plain.keys() and all(np.array_equal(with_buffer[k], plain[k]) for k in plain)


def test_bin_file_of_parameters_that_require_grad(tiny_checkpoints, tmp_path):
    """A .bin saved from ``state_dict(keep_vars=True)`` holds nn.Parameters (requires_grad); they load."""
    import torch
    from sdjax.weights import load_weights
    model = tiny_checkpoints["clip"]["torch"]
    file = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(keep_vars=True), file)
    assert any(t.requires_grad for t in torch.load(file, weights_only=True).values())
    config = CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["safetensors"].parent).config
    loaded = params_of(load_weights(CLIPTextModel, config, file))
    plain = params_of(CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["safetensors"].parent))
    assert loaded.keys() == plain.keys() and all(np.array_equal(loaded[k], plain[k]) for k in plain)


def test_variant_files(tiny_checkpoints, tmp_path):
    """``variant="fp16"`` reads diffusion_pytorch_model.fp16.safetensors; without it the error
    names the file that is there and how to load it."""
    directory, file = copy_model_dir(tiny_checkpoints["vae"], "safetensors", tmp_path)
    file.rename(file.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(CheckpointError, match=r"the folder has diffusion_pytorch_model.fp16.safetensors "
                                              r"\(load a variant with variant='fp16'"):
        AutoencoderKL.from_pretrained(directory)
    vae = AutoencoderKL.from_pretrained(directory, variant="fp16")
    reference = AutoencoderKL.from_pretrained(tiny_checkpoints["vae"]["safetensors"].parent)
    a, b = params_of(vae), params_of(reference)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pipeline_variant_with_some_parts_only(tiny_checkpoints, tmp_path):
    """A folder where only unet/ has the fp16 variant: the other parts load their plain weights,
    as diffusers' StableDiffusionPipeline.from_pretrained(variant="fp16") does; a variant no part
    has is still an error naming the files there are."""
    from safetensors.numpy import load_file, save_file
    from sdjax import StableDiffusion
    out = save_pipeline(tmp_path / "pipe", **make_pipeline_dir(tiny_checkpoints, tmp_path), format="pytorch")
    plain = out / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 1 for k, v in load_file(plain).items()},
              out / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    base = StableDiffusion.from_pretrained(out)
    mixed = StableDiffusion.from_pretrained(out, variant="fp16")
    assert max_abs_diff(params_of(mixed.vae), params_of(base.vae)) == 0
    assert all(np.array_equal(a, b + 1) for a, b in zip(params_of(mixed.unet).values(), params_of(base.unet).values()))
    with pytest.raises(CheckpointError, match=rf"{out}: no part has 'bf16' variant weights \(such as unet/"
                                              r"diffusion_pytorch_model.bf16.safetensors\): leave out variant="):
        StableDiffusion.from_pretrained(out, variant="bf16")
    (out / "text_encoder" / "model.safetensors").unlink()   # a part with neither: its own error
    with pytest.raises(CheckpointError, match=r"text_encoder: no weights file; expected one of "
                                              r"model.safetensors.index.fp16.json, model.fp16.safetensors"):
        StableDiffusion.from_pretrained(out, variant="fp16")


# What the SD v1.5 Hub repo holds besides the files sdjax reads: two single-file checkpoints at the
# root (4 and 7.7 GB), EMA-only / non-EMA / fp16 copies, .bin and msgpack copies, a safety checker.
SD15_REPO_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt",
    "v1-5-pruned-emaonly.safetensors", "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
    *[f"tokenizer/{n}" for n in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")],
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack",
    *[f"{part}/{n}" for part in ("unet", "vae") for n in (
        "config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.non_ema.safetensors", "diffusion_pytorch_model.bin",
        "diffusion_flax_model.msgpack")],
]


@pytest.mark.parametrize("variant,format", [(None, None), ("fp16", None), (None, "flax")])
def test_hub_download_takes_only_the_files_it_reads(monkeypatch, variant, format):
    """``StableDiffusion.from_pretrained(repo_id)`` asks huggingface_hub for the configs, the tokenizer
    and one weights file per model: not ``*.safetensors``, which matches every file above (fnmatch's
    ``*`` crosses folders) and would download ~20 GB more."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    from sdjax import StableDiffusion
    asked = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked["patterns"] = allow_patterns
        raise OSError("no network in this test")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError, match="could not get") as info:
        StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", variant=variant,
                                        format=format)
    # The error's download command asks for the same files.
    command = shlex.split(re.search(r"`(hf download .*)`", str(info.value)).group(1))
    assert command[:3] == ["hf", "download", "stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert command[3::2] == ["--include"] * len(asked["patterns"]) + ["--local-dir"]
    assert command[4::2] == [*asked["patterns"], "DIR"]
    got = sorted(filter_repo_objects(SD15_REPO_FILES, allow_patterns=asked["patterns"]))
    weights = {(None, None): ("model.safetensors", "diffusion_pytorch_model.safetensors"),
               ("fp16", None): ("model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
               (None, "flax"): ("flax_model.msgpack", "diffusion_flax_model.msgpack")}[variant, format]
    expected = ["model_index.json", "scheduler/scheduler_config.json",
                *[f for f in SD15_REPO_FILES if f.startswith("tokenizer/")],
                "text_encoder/config.json", f"text_encoder/{weights[0]}",
                *[f"{part}/{n}" for part in ("unet", "vae") for n in ("config.json", weights[1])]]
    assert got == sorted(expected)


def fake_hub(monkeypatch, repo: Path, snapshot: Path) -> list[list[str]]:
    """``huggingface_hub.snapshot_download`` serving the files of the folder ``repo``: each call
    copies the files its patterns match into ``snapshot`` (the Hub cache's folder for one commit)
    and returns it. Returns the list of every call's patterns."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append(list(allow_patterns))
        files = [f.relative_to(repo).as_posix() for f in repo.rglob("*") if f.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, snapshot / name)
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_repo_with_only_bin_weights(tiny_pipeline_dir, tmp_path, monkeypatch):
    """An older Hub repo whose model folders hold only PyTorch .bin weights: the first request
    (configs and safetensors) finds no weights, a second one fetches just the three .bin files, and
    the pipeline equals the one loaded from the safetensors folder. A single model loads the same
    way; a repo with safetensors takes one request."""
    from safetensors.numpy import load_file
    from sdjax import StableDiffusion
    repo = tmp_path / "repo"
    shutil.copytree(tiny_pipeline_dir, repo)
    for f in [*repo.rglob("*.safetensors"), *repo.rglob("*.msgpack")]:
        if f.suffix == ".safetensors":
            name = "pytorch_model.bin" if f.name == "model.safetensors" else f.with_suffix(".bin").name
            torch.save({k: torch.from_numpy(v) for k, v in load_file(f).items()}, f.with_name(name))
        f.unlink()

    calls = fake_hub(monkeypatch, repo, tmp_path / "snapshot")
    pipe = StableDiffusion.from_pretrained("someone/old-sd-finetune")
    assert len(calls) == 2 and calls[1] == [  # the .bin, or its shards and their index
        f"{part}/{name}" for part, stem in (("text_encoder", "pytorch_model"), ("unet", "diffusion_pytorch_model"),
                                             ("vae", "diffusion_pytorch_model"))
        for name in (f"{stem}.bin", f"{stem}.bin.index.json", f"{stem}-*-of-*.bin")]
    local = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    for part in ("text_encoder", "unet", "vae"):
        ours, theirs = (jax.tree.leaves(nnx.state(getattr(p, part), nnx.Param)) for p in (pipe, local))
        assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs)), part

    calls = fake_hub(monkeypatch, repo, tmp_path / "snapshot-unet")
    unet = UNet2DConditionModel.from_pretrained("someone/old-sd-finetune", subfolder="unet")
    assert [c[0] for c in calls] == ["unet/config.json", "unet/diffusion_pytorch_model.bin"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(unet, nnx.Param)),
                                                      jax.tree.leaves(nnx.state(local.unet, nnx.Param))))

    calls = fake_hub(monkeypatch, tiny_pipeline_dir, tmp_path / "snapshot-new")
    StableDiffusion.from_pretrained("someone/new-sd-finetune")
    assert len(calls) == 1


def test_sharded_checkpoints(tiny_checkpoints, tmp_path):
    """``save_pretrained(max_shard_size=...)`` writes shards and an index (``*.safetensors.index.json``,
    ``*.safetensors.index.fp16.json`` for a variant, ``*.bin.index.json``) for the UNet (diffusers) and
    the text encoder (transformers): they load as the unsharded file does. An older unsharded file that diffusers' save leaves beside them is not picked."""
    reference = {kind: params_of(cls.from_pretrained(tiny_checkpoints[kind]["safetensors"].parent))
                 for kind, cls in (("unet", UNet2DConditionModel), ("clip", CLIPTextModel))}
    folder = tmp_path / "unet"
    R.torch_unet(seed=1).save_pretrained(folder, safe_serialization=False)      # an older save, as .bin
    tiny_checkpoints["unet"]["torch"].save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    assert len(list(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 3
    assert max_abs_diff(params_of(UNet2DConditionModel.from_pretrained(folder)), reference["unet"]) == 0

    folder = tmp_path / "unet-fp16"
    tiny_checkpoints["unet"]["torch"].save_pretrained(folder, max_shard_size="20KB", variant="fp16")
    assert (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    with pytest.raises(CheckpointError, match=r"the folder has diffusion_pytorch_model.fp16-NNNNN-of-(\d+)"
                                              r".safetensors, .*index.fp16.json \(load a variant with variant='fp16'"):
        UNet2DConditionModel.from_pretrained(folder)
    assert max_abs_diff(params_of(UNet2DConditionModel.from_pretrained(folder, variant="fp16")),
                        reference["unet"]) == 0

    folder = tmp_path / "clip"  # transformers 5 writes safetensors only
    tiny_checkpoints["clip"]["torch"].save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert max_abs_diff(params_of(CLIPTextModel.from_pretrained(folder)), reference["clip"]) == 0

    folder = tmp_path / "unet-bin"
    tiny_checkpoints["unet"]["torch"].save_pretrained(folder, max_shard_size="20KB", safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin.index.json").is_file()
    assert max_abs_diff(params_of(UNet2DConditionModel.from_pretrained(folder)), reference["unet"]) == 0
    shard = sorted(folder.glob("diffusion_pytorch_model-*-of-*.bin"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"diffusion_pytorch_model.bin.index.json: shard files missing next "
                                              rf"to it: {shard.name}"):
        UNet2DConditionModel.from_pretrained(folder)


def test_hub_repo_with_sharded_weights(tiny_checkpoints, tiny_pipeline_dir, tmp_path, monkeypatch):
    """A Hub repo whose UNet is saved in shards downloads the index and the shards in the first request."""
    from sdjax import StableDiffusion
    repo = tmp_path / "repo"
    shutil.copytree(tiny_pipeline_dir, repo)
    for f in (repo / "unet").glob("diffusion_*"):
        f.unlink()
    tiny_checkpoints["unet"]["torch"].save_pretrained(repo / "unet", max_shard_size="20KB")
    calls = fake_hub(monkeypatch, repo, tmp_path / "snapshot")
    pipe = StableDiffusion.from_pretrained("someone/sharded-sd")
    assert len(calls) == 1
    local = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    assert max_abs_diff(params_of(pipe.unet), params_of(local.unet)) == 0


def test_a_weight_stored_twice_is_an_error(tiny_checkpoints, tmp_path):
    """A file holding one weight under two names (the VAE attention's old and new names) is refused,
    naming both, instead of the last one read winning."""
    from safetensors.numpy import load_file, save_file
    directory, file = copy_model_dir(tiny_checkpoints["vae"], "safetensors", tmp_path)
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith(".attentions.0.to_q.weight"))
    old = key.replace(".to_q.", ".query.")
    tensors[old] = np.zeros_like(tensors[key])
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"keys '(.+)' and '(.+)' are the same weight") as info:
        AutoencoderKL.from_pretrained(directory)
    assert {key, old} <= set(re.findall(r"'([^']+)'", str(info.value)))


def test_tensors_that_do_not_fit_a_weight_are_errors(tiny_checkpoints, tmp_path):
    """A 3x3 kernel where a linear weight goes (only a 1x1 conv kernel converts) and integer data
    where float weights go are errors naming the key, not silently sliced or cast."""
    from safetensors.numpy import load_file, save_file
    directory, file = copy_model_dir(tiny_checkpoints["vae"], "safetensors", tmp_path)
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith(".attentions.0.to_q.weight"))
    original = tensors[key]
    c = original.shape[0]
    for bad, message in ((np.zeros((c, c, 3, 3), np.float32), rf"has shape \({c}, {c}, 3, 3\), the model expects "
                                                                rf"\({c}, {c}\)"),   # (as the file holds them)
                         (original[:, :, None, None], None),           # a 1x1 conv: the old VAE layout, loads
                         (original.astype(np.int64), "has dtype int64; weights are floats")):
        save_file({**tensors, key: bad}, file)
        if message is None:
            assert max_abs_diff(params_of(AutoencoderKL.from_pretrained(directory)),
                                params_of(AutoencoderKL.from_pretrained(tiny_checkpoints["vae"]["safetensors"].parent))) == 0
            continue
        with pytest.raises(CheckpointError, match=rf"{file}: key '{key}' {message}"):
            AutoencoderKL.from_pretrained(directory)


def test_files_that_are_not_weights_say_what_they_are(tiny_checkpoints, tiny_pipeline_dir, tmp_path):
    """A Git LFS pointer (a clone without git-lfs) or a saved web page where the weights should be,
    and a .ckpt holding Python objects that ``weights_only`` loading refuses, say so."""
    import datetime

    from sdjax import StableDiffusion
    directory, file = copy_model_dir(tiny_checkpoints["vae"], "safetensors", tmp_path)
    file.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4c2e\nsize 334643268\n")
    with pytest.raises(CheckpointError, match=rf"{file}: a Git LFS pointer, not the weights: .*git lfs pull"):
        AutoencoderKL.from_pretrained(directory)
    file.unlink()
    (directory / "diffusion_pytorch_model.bin").write_text("<!DOCTYPE html>\n<html><head><title>Hugging Face")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: an HTML page, not the weights"):
        AutoencoderKL.from_pretrained(directory)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(1)},
                "saved_on": datetime.date(2023, 1, 1)}, ckpt)
    with pytest.raises(CheckpointError, match=r"model.ckpt: holds Python objects besides tensors \(datetime.date\)"
                                              r".*If you trust the file, convert it to safetensors"):
        StableDiffusion.from_single_file(ckpt, config=tiny_pipeline_dir)
    ckpt.write_bytes(b"")   # a download or copy that stopped at once
    with pytest.raises(CheckpointError, match=r"model.ckpt: not a readable PyTorch checkpoint \(an empty file, "
                                              r"0 bytes"):
        StableDiffusion.from_single_file(ckpt, config=tiny_pipeline_dir)
    # torch.save'd weights under the safetensors name of a model folder: the folder's .bin name
    (directory / "diffusion_pytorch_model.bin").unlink()
    torch.save({"decoder.conv_in.weight": torch.zeros(1)}, file)
    with pytest.raises(CheckpointError, match=r"a PyTorch checkpoint \(torch.save\) named .safetensors: rename it "
                                              r"to diffusion_pytorch_model.bin"):
        AutoencoderKL.from_pretrained(directory)


def test_a_vae_single_file_is_named(tmp_path):
    from safetensors.numpy import save_file
    from sdjax.weights import check_single_file
    file = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": np.zeros((1, 1, 3, 3), np.float32),
               "decoder.up.0.block.0.conv1.weight": np.zeros((1, 1, 3, 3), np.float32)}, file)
    with pytest.raises(CheckpointError, match=r"a VAE alone \(as vae-ft-mse-840000-ema-pruned\): pass it as the VAE of a model, sample.py --vae FILE"):
        check_single_file(file)


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


def test_a_number_where_a_flax_array_belongs(tiny_checkpoints, tmp_path):
    from flax.serialization import msgpack_restore, msgpack_serialize
    directory, file = copy_model_dir(tiny_checkpoints["vae"], "flax", tmp_path)
    tree = msgpack_restore(file.read_bytes())
    tree["quant_conv"]["bias"] = 1.0   # it used to escape as AttributeError: 'float' has no 'dtype'
    file.write_bytes(msgpack_serialize(tree))
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: key 'quant_conv/bias' holds a float, not an array")):
        AutoencoderKL.from_pretrained(directory)


def test_wrong_shape(tiny_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file
    directory, file = copy_model_dir(tiny_checkpoints["unet"], "safetensors", tmp_path)
    tensors = load_file(file)
    conv_in = tensors["conv_in.weight"]
    tensors["conv_in.weight"] = conv_in[:16]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"'conv_in.weight' has shape \(16, 4, 3, 3\), the model expects "
                                              r"\(32, 4, 3, 3\)"):
        UNet2DConditionModel.from_pretrained(directory)
    # an inpainting UNet's weights where the folder's config.json says in_channels=4
    save_file({**tensors, "conv_in.weight": np.concatenate([conv_in] * 3, axis=1)[:, :9].copy()}, file)
    with pytest.raises(CheckpointError, match=r"'conv_in.weight' has shape \(32, 9, 3, 3\), the model expects "
                                              r"\(32, 4, 3, 3\): weights of a UNet that takes 9 input channels, "
                                              r"where the config's takes 4 \(in_channels\)"):
        UNet2DConditionModel.from_pretrained(directory)


@pytest.mark.parametrize("layout", ["safetensors", "flax"])
def test_truncated_file(tiny_checkpoints, tmp_path, layout):
    directory, file = copy_model_dir(tiny_checkpoints["clip"], layout, tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(file)):
        CLIPTextModel.from_pretrained(directory)


@pytest.mark.parametrize("shape", [[10**6, 10**6, 1000], [-4], ["a"], 3])
def test_corrupt_safetensors_shape_is_named(tiny_checkpoints, tmp_path, shape):
    """A header whose shape is absurd, negative or not numbers is a CheckpointError naming the file
    and key, before anything is allocated (not a MemoryError for petabytes)."""
    directory, file = copy_model_dir(tiny_checkpoints["clip"], "safetensors", tmp_path)
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = shape
    new = json.dumps(header).encode().ljust(n, b" ") if len(json.dumps(header)) <= n else json.dumps(header).encode()
    file.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + n:])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))}: .*({re.escape(key)}|malformed header)"):
        CLIPTextModel.from_pretrained(directory)


def test_a_folder_where_the_weights_file_should_be(tiny_checkpoints, tmp_path):
    directory, file = copy_model_dir(tiny_checkpoints["clip"], "safetensors", tmp_path)
    for other in directory.glob("*.msgpack"):
        other.unlink()
    file.unlink()
    file.mkdir()
    with pytest.raises(CheckpointError, match=f"{re.escape(str(file))} is a folder, not a weights file"):
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
    weights; the Flax file is byte for byte what diffusers / transformers Flax wrote (names
    included: the VAE's attention is query/key/value/proj_attn there), and sdjax reloads it to
    identical params."""
    model = cls.from_pretrained(tiny_checkpoints[kind]["flax"].parent)
    model.save_pretrained(tmp_path, format="both")
    flax_file = tiny_checkpoints[kind]["flax"]
    assert (tmp_path / flax_file.name).read_bytes() == flax_file.read_bytes()
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


@pytest.mark.parametrize("format", ["flax", "pytorch"])
def test_save_bf16(tiny_checkpoints, tmp_path, format):
    """``dtype`` casts what is written: every array in the file is bf16, and reloads to the weights
    rounded to bf16."""
    import ml_dtypes
    from flax.serialization import msgpack_restore
    from safetensors import safe_open
    model = UNet2DConditionModel.from_pretrained(tiny_checkpoints["unet"]["safetensors"].parent)
    model.save_pretrained(tmp_path, format=format, dtype="bfloat16")
    if format == "flax":
        tree = msgpack_restore((tmp_path / "diffusion_flax_model.msgpack").read_bytes())
        dtypes = {a.dtype for a in jax.tree.leaves(tree)}
        assert dtypes == {np.dtype(ml_dtypes.bfloat16)}, dtypes
    else:
        with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16"}, dtypes
    again = UNet2DConditionModel.from_pretrained(tmp_path, dtype=jnp.float32)
    original = params_of(model)
    for k, v in params_of(again).items():
        np.testing.assert_array_equal(v, original[k].astype(ml_dtypes.bfloat16).astype(np.float32))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_resaving_in_one_format_and_choosing_a_format(tiny_checkpoints, tmp_path, monkeypatch):
    """A save in one format removes the other format's weights an earlier save left (a load picked
    the stale safetensors over the new msgpack); ``format="pytorch"`` takes .bin over msgpack;
    ``~`` is expanded; a pipeline saved onto a file is a clear error that leaves nothing behind."""
    from sdjax.weights import save_pretrained
    model = AutoencoderKL.from_pretrained(tiny_checkpoints["vae"]["safetensors"].parent)
    save_pretrained(model, tmp_path / "vae")                     # both formats
    changed = jax.tree.map(lambda a: a + 1, nnx.state(model, nnx.Param))
    nnx.update(model, changed)
    save_pretrained(model, tmp_path / "vae", format="flax")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", "diffusion_flax_model.msgpack"]
    assert max_abs_diff(params_of(AutoencoderKL.from_pretrained(tmp_path / "vae")), params_of(model)) == 0

    folder = tmp_path / "mixed"   # msgpack and .bin, no safetensors: each format picks its own
    save_pretrained(model, folder, format="flax")
    shutil.copy(tiny_checkpoints["vae"]["bin_old_names"], folder / "diffusion_pytorch_model.bin")
    bin_weights = params_of(AutoencoderKL.from_pretrained(tiny_checkpoints["vae"]["bin_old_names"].parent))
    assert max_abs_diff(params_of(AutoencoderKL.from_pretrained(folder, format="pytorch")), bin_weights) == 0
    assert max_abs_diff(params_of(AutoencoderKL.from_pretrained(folder, format="flax")), params_of(model)) == 0

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert save_pretrained(model, "~/vae") == tmp_path / "home" / "vae"
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    assert save_pipeline("~/pipe", **parts) == tmp_path / "home" / "pipe"
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError, match="afile is a file; a pipeline is saved as a folder"):
        save_pipeline(tmp_path / "afile", **parts, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failed_write_names_the_file(tmp_path):
    """A full disk reported without a file name (Python's OSError 28 from a write, safetensors'
    "(os error 28)") becomes an OSError naming the file being written; nothing is left behind."""
    from safetensors import SafetensorError
    from sdjax.images import atomic_write

    def python_write(tmp):
        raise OSError(28, "No space left on device")

    def safetensors_write(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    for write in (python_write, safetensors_write):
        with pytest.raises(OSError, match=re.escape(f"No space left on device (writing {tmp_path / 'w.bin'})")) \
                as info:
            atomic_write(tmp_path / "w.bin", write)
        assert info.value.errno == 28
    with pytest.raises(ValueError, match="unrelated"):   # other errors as they are
        atomic_write(tmp_path / "w.bin", lambda tmp: (_ for _ in ()).throw(ValueError("unrelated")))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_model_save_leaves_the_folder_as_it_was(tiny_checkpoints, tmp_path, monkeypatch):
    """A save over an earlier one that fails part-way (a full disk while writing the msgpack) leaves
    the earlier files, all of them: not new safetensors beside the old msgpack and config.json."""
    import dataclasses

    import flax.serialization
    from sdjax.weights import save_pretrained
    model = AutoencoderKL.from_pretrained(tiny_checkpoints["vae"]["safetensors"].parent)
    save_pretrained(model, tmp_path / "vae")
    before = {p.name: p.read_bytes() for p in (tmp_path / "vae").iterdir()}
    nnx.update(model, jax.tree.map(lambda a: a + 1, nnx.state(model, nnx.Param)))
    model.config = dataclasses.replace(model.config, scaling_factor=0.5)

    def disk_full(tree):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(flax.serialization, "msgpack_serialize", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_pretrained(model, tmp_path / "vae")
    assert {p.name: p.read_bytes() for p in (tmp_path / "vae").iterdir()} == before


def test_pipeline_parts_that_do_not_fit_are_refused_at_load(tiny_pipeline_dir, tmp_path):
    """A UNet of other inputs than the latents (or an inpainting UNet's latents, mask and masked image:
    9 channels), e.g. instruct-pix2pix's 8, or one that attends to states of another width than the
    text encoder's is refused when the folder is read, before any weights, naming the configs."""
    from sdjax import StableDiffusion
    for change, message in (({"in_channels": 8}, r"unet/config.json: in_channels=8, but the VAE's latents have 4 "
                                                 r"channels .* take 4 channels \(text-to-image\) or 9 \(inpainting\)"),
                            ({"cross_attention_dim": 48}, r"unet/config.json: cross_attention_dim=\[48, 48\], "
                                                          r"but the text encoder's states have 32 channels")):
        folder = tmp_path / next(iter(change))
        shutil.copytree(tiny_pipeline_dir, folder)
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
        for f in (folder / "unet").glob("diffusion_*"):   # refused before the weights are read
            f.unlink()
        with pytest.raises(CheckpointError, match=rf"{folder}/{message}"):
            StableDiffusion.from_pretrained(folder)


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
    # Each model as one compiled program (eager, every op compiled on its own).
    ours_text = run_jitted("folder_text", parts["text_encoder"], lambda m, x: m(x).last_hidden_state, ids)
    assert np.abs(np.asarray(ours_text) - ref_text).max() < 1e-5
    to_nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    ours_eps = run_jitted("folder_unet", parts["unet"], lambda m, x, c: m(x, 500, c), to_nhwc(latents), ours_text)
    assert np.abs(np.asarray(ours_eps) - ref_eps.transpose(0, 2, 3, 1)).max() < 1e-5
    ours_img = run_jitted("folder_vae", parts["vae"], lambda m, z: m.decode(z), to_nhwc(latents))
    assert np.abs(np.asarray(ours_img) - ref_img.transpose(0, 2, 3, 1)).max() < 1e-5
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    # The tokenizer as transformers 4 reads it too (vocab.json + merges.txt), giving the same ids.
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (out / "tokenizer").iterdir()}
    files_only = tmp_path / "tokenizer-files"
    files_only.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(out / "tokenizer" / name, files_only / name)
    prompts = ["a photo of the cat", "the cat sat on the mat, a dog!"]
    assert (tokenize(load_tokenizer(files_only, subfolder=None), prompts) == tokenize(pipe.tokenizer, prompts)).all()
    # One value for every block is written as SD v1.5's config has it, a number: diffusers code that
    # builds on a UNet (a ControlNet from it, IP-Adapter layers) fails on a per-block list.
    from diffusers import ControlNetModel
    config = json.loads((out / "unet" / "config.json").read_text())
    assert isinstance(config["cross_attention_dim"], int) and isinstance(config["attention_head_dim"], int)
    assert ControlNetModel.from_unet(pipe.unet).config.cross_attention_dim == config["cross_attention_dim"]


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
    # overwrite=True replaces the folder, even next to a leftover of an interrupted earlier overwrite
    (tmp_path / ".pipe.old").mkdir()
    (tmp_path / ".pipe.old" / "junk").write_text("x")
    with pytest.warns(UserWarning, match=r"\.pipe\.old looks like the temporary folder of an interrupted save of pipe; "
                                          r"delete it unless"):
        save_pipeline(target, **parts, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model_index.json").is_file()
    (tmp_path / ".pipe.x1y2").mkdir()
    with pytest.warns(UserWarning, match=r"\.pipe\.old, \.pipe\.x1y2 look like the temporary folders of an "
                                         r"interrupted save of pipe; delete them unless"):
        save_pipeline(target, **parts, overwrite=True)


def test_an_empty_folder_is_filled_in_place(tiny_checkpoints, tmp_path, monkeypatch):
    """An existing empty folder (a mount point, which no rename can replace; one made for the user
    in a folder they cannot write) is filled where it is: the same folder, nothing made beside it.
    A save that fails there leaves it empty."""
    import os
    from sdjax import weights
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    target = tmp_path / "outer" / "mounted"
    target.mkdir(parents=True)
    inode, real_replace = target.stat().st_ino, os.replace

    def no_rename_of_the_folder(src, dst):
        assert Path(src) != target and Path(dst) != target, "the folder itself was renamed"
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", no_rename_of_the_folder)
    real_save = weights.save_pretrained

    def vae_fails(model, directory, **kw):
        if Path(directory).name == "vae":
            raise OSError(28, "No space left on device")
        return real_save(model, directory, **kw)
    monkeypatch.setattr(weights, "save_pretrained", vae_fails)
    with pytest.raises(OSError, match="No space left"):
        save_pipeline(target, **parts)
    assert list(target.iterdir()) == [] and [p.name for p in target.parent.iterdir()] == ["mounted"]
    monkeypatch.setattr(weights, "save_pretrained", real_save)
    save_pipeline(target, **parts)
    assert target.stat().st_ino == inode and [p.name for p in target.parent.iterdir()] == ["mounted"]
    assert sorted(p.name for p in target.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                        "tokenizer", "unet", "vae"]
    from sdjax import StableDiffusion
    assert StableDiffusion.from_pretrained(target).unet.config == parts["unet"].config


def test_an_interrupted_overwrite_puts_the_old_folder_back(tiny_checkpoints, tmp_path, monkeypatch):
    """Interrupted between moving the old folder aside and renaming the new one into place, a save
    puts the old folder back; nothing is left beside it."""
    import os
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    target = tmp_path / "pipe"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        if Path(dst) == target or Path(src) == target:
            calls.append((Path(src).name, Path(dst).name))
            if len(calls) == 2:  # the new folder into place
                raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pipeline(target, **parts, overwrite=True)
    monkeypatch.undo()
    assert [dst for _, dst in calls] == [calls[0][1], "pipe", "pipe"]  # aside, (interrupted), back
    assert (target / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pipe")) == []


def test_saving_into_a_symlinked_folder_or_the_working_directory(tiny_checkpoints, tmp_path, monkeypatch):
    """A symlink to a folder keeps pointing at the saved pipeline; "." (a folder that the save's
    rename would pull from under the process) is refused, naming it. Neither leaves a temporary
    folder behind."""
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("x")
    (tmp_path / "current").symlink_to(real)
    save_pipeline(tmp_path / "current", **parts, overwrite=True)
    assert (tmp_path / "current").is_symlink() and (tmp_path / "current" / "model_index.json").is_file()
    assert not (real / "old.txt").exists()
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for where in (".", ".."):
        with pytest.raises(ValueError, match=f"{re.escape(str(Path(where).resolve()))} is the working directory "
                                             r"\(or holds it\); save the pipeline to a folder inside it"):
            save_pipeline(where, **parts, overwrite=True)
    assert not list(here.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_old_folder_that_cannot_be_removed_is_a_warning(tiny_checkpoints, tmp_path, monkeypatch):
    """When the new pipeline is in place and only removing the old copy fails, the save succeeded:
    a warning names the leftover folder."""
    parts = make_pipeline_dir(tiny_checkpoints, tmp_path)
    target = save_pipeline(tmp_path / "pipe", **parts)
    real_rmtree = shutil.rmtree

    def stuck(path, *args, **kwargs):
        if ".pipe.old." not in str(path):
            return real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", stuck)
    with pytest.warns(UserWarning, match=r"saved .*/pipe, but could not remove the previous version moved to "
                                         r".*/\.pipe\.old\."):
        save_pipeline(target, **parts, overwrite=True)
    assert (target / "model_index.json").is_file()


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
    with pytest.warns(UserWarning, match="is 102 tokens long"):
        ids = tokenize(tok, ["the cat " * 10, "the cat " * 50])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    with pytest.warns(UserWarning, match=r"prompt 'the cat the cat .*\.\.\.' is 102 tokens long.*last 25 tokens were "
                      r"dropped: 'cat the"):
        tokenize(tok, "the cat " * 50)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenize(tok, ["the cat " * 50] * 4 + ["a dog " * 50, "the cat"], kind="negative prompt")
    assert [str(w.message).split(" is ")[0] for w in caught] == [
        f"negative prompt {p[:40] + '...'!r}" for p in ("the cat " * 50, "a dog " * 50)]  # once per distinct prompt
    assert ids[1, -1] == tok.eos_token_id and ids[1, 0] == tok.bos_token_id


def test_a_tokenizer_without_its_vocabulary_or_window_is_refused(tmp_path):
    """Without vocab.json + merges.txt (or tokenizer.json) transformers builds a tokenizer of the
    special tokens alone, which gives every prompt the same ids; without tokenizer_config.json its
    window is 1e30 tokens, which failed at the first prompt deep inside transformers."""
    directory = R.write_tiny_tokenizer(tmp_path / "tok")
    assert load_tokenizer(directory, subfolder=None).model_max_length == 77
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (directory / name).rename(hidden / name)
    with pytest.raises(CheckpointError, match=rf"{directory}: not a CLIP tokenizer: it needs vocab.json \+ merges.txt "
                                              r"or tokenizer.json \(it has special_tokens_map.json, "
                                              r"tokenizer_config.json\)"):
        load_tokenizer(directory, subfolder=None)
    for name in ("vocab.json", "merges.txt"):
        (hidden / name).rename(directory / name)
    (directory / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{directory}: the tokenizer has no model_max_length .*"
                                              r"tokenizer_config.json is missing or lacks it"):
        load_tokenizer(directory, subfolder=None)


@pytest.mark.parametrize("change,message", [
    ({"num_train_timesteps": "1000"}, "num_train_timesteps='1000': expected a number"),
    ({"num_train_timesteps": 0}, "num_train_timesteps=0: expected a whole number >= 1"),
    ({"beta_schedule": "cosine"}, "beta_schedule 'cosine' is not supported"),
    ({"beta_end": -0.01}, r"beta_end=-0.01: expected a number in \[0, 1\)")])
def test_a_bad_noise_schedule_is_named_at_load(tiny_pipeline_dir, tmp_path, change, message):
    """scheduler_config.json's noise schedule (what every scheduler is built from) is checked when
    the pipeline loads, naming the file, not at the first image as if an option were bad."""
    from sdjax import StableDiffusion
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(CheckpointError, match=rf"{config_file}: .*{message}"):
        StableDiffusion.from_pretrained(folder)


def test_a_model_save_removes_variant_weights_an_earlier_save_left(tiny_checkpoints, tmp_path):
    """``variant="fp16"`` would load an earlier save's fp16 files beside the new config.json."""
    from sdjax.weights import save_pretrained
    directory, file = copy_model_dir(tiny_checkpoints["vae"], "safetensors", tmp_path)
    model = AutoencoderKL.from_pretrained(directory)
    shutil.copy(file, directory / "diffusion_pytorch_model.fp16.safetensors")
    (directory / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text("{}")
    nnx.update(model, jax.tree.map(lambda a: a + 1, nnx.state(model, nnx.Param)))
    save_pretrained(model, directory, format="pytorch")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert max_abs_diff(params_of(AutoencoderKL.from_pretrained(directory)), params_of(model)) == 0


def test_a_model_loaded_from_its_pipeline_folder_says_which_subfolder(tiny_pipeline_dir):
    for cls, part in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        with pytest.raises(CheckpointError, match=re.escape(f"{tiny_pipeline_dir}: no config.json (a pipeline folder: "
                                                            f"its model is in {part}/, from_pretrained(..., "
                                                            f"subfolder='{part}'))")):
            cls.from_pretrained(tiny_pipeline_dir)
