"""Single-file checkpoints in the original Stable Diffusion layout (``v1-5-pruned-emaonly.safetensors``,
AUTOMATIC1111 / ComfyUI files): sdjax writes one, diffusers' own single-file loader reads it back as
the reference models, and sdjax reads it back to the same weights; bad files give errors that say why.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sdjax.pipeline import StableDiffusion, load_pipeline
from sdjax.weights import CheckpointError, load_single_file

DATA = Path(__file__).parent / "data"
PARTS = {"unet": "unet", "vae": "vae", "text_encoder": "clip"}  # pipeline part -> tiny_checkpoints kind


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return StableDiffusion.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def single_file(pipe, tmp_path_factory):
    return pipe.save_single_file(tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def configs_of(pipe) -> dict:
    return {part: getattr(pipe, part).config for part in PARTS}


def comparable_state(module: torch.nn.Module, kind: str) -> dict[str, np.ndarray]:
    """A PyTorch model's weights as numpy, CLIP's under "text_model." (transformers 5 drops it), no buffers."""
    state = {k: v.numpy() for k, v in module.state_dict().items() if "position_ids" not in k}
    return {("text_model." + k if kind == "clip" and not k.startswith("text_model.") else k): v
            for k, v in state.items()}


def reference_state(tiny_checkpoints, kind) -> dict[str, np.ndarray]:
    return comparable_state(tiny_checkpoints[kind]["torch"], kind)


def assert_same_params(a, b):
    flat_b = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    flat_a = dict(nnx.to_flat_state(nnx.state(a, nnx.Param)))
    assert flat_a.keys() == flat_b.keys()
    for path, var in flat_a.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(flat_b[path].get_value()),
                                      err_msg=str(path))


def test_diffusers_reads_the_written_file_as_the_reference_models(single_file, tiny_checkpoints, tiny_pipeline_dir):
    """diffusers' LDM converters turn the file into exactly the reference state dicts (every key, no
    other, same values), and its StableDiffusionPipeline.from_single_file loads those models."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    file_state = {k: torch.from_numpy(v) for k, v in load_file(str(single_file)).items()}
    converted = {
        "unet": convert_ldm_unet_checkpoint(file_state, dict(tiny_checkpoints["unet"]["torch"].config)),
        "vae": convert_ldm_vae_checkpoint(file_state, dict(tiny_checkpoints["vae"]["torch"].config)),
        "clip": convert_ldm_clip_checkpoint(file_state),
    }
    for kind, state in converted.items():
        ref = reference_state(tiny_checkpoints, kind)
        assert sorted(state) == sorted(ref), kind
        for key, value in ref.items():
            np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    assert len(file_state) == sum(map(len, converted.values()))  # nothing else in the file

    loaded = StableDiffusionPipeline.from_single_file(str(single_file), config=str(tiny_pipeline_dir),
                                                      local_files_only=True, safety_checker=None)
    for part, kind in PARTS.items():
        state = comparable_state(getattr(loaded, part), kind)
        ref = reference_state(tiny_checkpoints, kind)
        assert sorted(state) == sorted(ref), part
        for key, value in ref.items():
            np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_from_single_file_equals_from_pretrained(pipe, single_file, tiny_pipeline_dir):
    loaded = StableDiffusion.from_single_file(single_file, config=str(tiny_pipeline_dir))
    for part in PARTS:
        assert_same_params(getattr(loaded, part), getattr(pipe, part))
    assert loaded.scheduler_config == pipe.scheduler_config
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    same = load_pipeline(str(single_file), model_config=str(tiny_pipeline_dir))   # what --model FILE does
    assert_same_params(same.unet, pipe.unet)


def test_a_single_file_beside_its_pipeline_folder_takes_that_folders_configs(pipe, single_file, tiny_pipeline_dir,
                                                                             tmp_path):
    """train.py's export writes final/ and final.safetensors: --model final.safetensors (no
    --model-config) takes final/'s configs, tokenizer and scheduler config (here v-prediction, which
    the file cannot say), not SD v1.5's from the Hub; a warning names the folder."""
    import json
    shutil.copy(single_file, tmp_path / "final.safetensors")
    shutil.copytree(tiny_pipeline_dir, tmp_path / "final")
    scheduler = tmp_path / "final" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'final.safetensors'}: its configs, tokenizer and "
                                                   f"scheduler config from {tmp_path / 'final'} beside it")):
        loaded = load_pipeline(str(tmp_path / "final.safetensors"))
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert_same_params(loaded.unet, pipe.unet)
    explicit = load_pipeline(str(tmp_path / "final.safetensors"), model_config=str(tiny_pipeline_dir))
    assert explicit.scheduler_config.get("prediction_type", "epsilon") == "epsilon"   # --model-config wins


def test_a_pipeline_folder_named_like_a_checkpoint_file_loads_as_a_folder(pipe, tiny_pipeline_dir, tmp_path):
    """--model my-finetune.ckpt/ (a folder) is a pipeline folder; it used to go to the single-file
    loader, which said it is a folder."""
    folder = tmp_path / "my-finetune.ckpt"
    shutil.copytree(tiny_pipeline_dir, folder)
    assert_same_params(load_pipeline(str(folder)).unet, pipe.unet)


@pytest.mark.parametrize("clip_names", ["text_model", "old"])
def test_ckpt_with_ema_copies_and_schedule_buffers(pipe, single_file, tmp_path, clip_names):
    """A training checkpoint as the original repo saves it: a pickled {"state_dict": ...} that also
    holds EMA copies, the noise schedule's buffers and CLIP's position_ids; the model weights load.
    "old": CLIP keys without "text_model.", as files made with early transformers versions have them."""
    clip = "cond_stage_model.transformer."
    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(str(single_file)).items()}
    if clip_names == "old":
        state = {k.replace(clip + "text_model.", clip): v for k, v in state.items()}
    position_ids = clip + ("text_model." if clip_names == "text_model" else "") + "embeddings.position_ids"
    extra = {"betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.ones(1000),
             "model_ema.decay": torch.tensor(0.9999), position_ids: torch.arange(77)[None]}
    extra.update({"model_ema." + k[len("model."):].replace(".", ""): torch.zeros_like(v)
                  for k, v in state.items() if k.startswith("model.diffusion_model.")})
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {**state, **extra}, "global_step": 10}, path)
    with pytest.warns(UserWarning, match=r"tiny.ckpt holds an EMA copy of the UNet beside its weights "
                                         r"\(model_ema.\*\): the weights are loaded, as diffusers' from_single_file"):
        models = load_single_file(path, configs_of(pipe))
    for part in PARTS:
        assert_same_params(models[part], getattr(pipe, part))


def test_an_existing_file_is_replaced_only_when_asked_and_through_its_link(pipe, tmp_path):
    """A web UI's models/ folder of links: the file the link points to is replaced (with
    overwrite=True), the link stays. Without overwrite=True an existing file is refused."""
    real = pipe.save_single_file(tmp_path / "disk" / "model.safetensors")
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "model.safetensors"
    link.symlink_to(real)
    with pytest.raises(FileExistsError, match=re.escape(f"{real} exists (pass overwrite=True to replace it)")):
        pipe.save_single_file(link, dtype="float16")
    assert {v.dtype for v in load_file(str(real)).values()} == {np.dtype(np.float32)}
    assert pipe.save_single_file(link, dtype="float16", overwrite=True) == real
    assert link.is_symlink() and {v.dtype for v in load_file(str(link)).values()} == {np.dtype(np.float16)}


def test_keys_outside_the_models_are_not_read(pipe, single_file, tmp_path, monkeypatch):
    """A file's EMA copy (3.4 GB in v1-5-pruned.safetensors) is skipped without being read: here a
    tensor of a shape no weight has is never allocated, from a whole file or as a VAE."""
    from sdjax import weights
    from sdjax.pipeline import load_vae
    state = load_file(str(single_file))
    state["model_ema.big"] = np.zeros((7, 11, 13), np.float32)
    state["first_stage_model.loss.logvar"] = np.zeros((7, 11, 13), np.float32)
    path = tmp_path / "with-ema.safetensors"
    save_file(state, str(path))
    real_empty, shapes = np.empty, []

    def recording_empty(shape, *args, **kwargs):
        shapes.append(tuple(shape))
        return real_empty(shape, *args, **kwargs)
    monkeypatch.setattr(weights.np, "empty", recording_empty)
    with pytest.warns(UserWarning, match="holds an EMA copy of the UNet"):
        models = load_single_file(path, configs_of(pipe))
    vae = load_vae(path, pipe.vae.config)   # (no warning: the UNet is not read)
    assert shapes and (7, 11, 13) not in shapes
    assert_same_params(models["unet"], pipe.unet)
    assert_same_params(vae, pipe.vae)


def _training_checkpoint(single_file, path, *, drop=None):
    """``single_file`` with an EMA copy of its UNet as LDM's training checkpoints hold it (LitEma:
    "model_ema." + the key below "model." without dots, plus its decay and update count), with
    values of its own; ``drop``: a UNet key whose EMA copy is left out. Saved as ``path``'s suffix
    says (a pickled {"state_dict": ...} for .ckpt)."""
    state = load_file(str(single_file))
    rng = np.random.default_rng(7)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): (v + rng.standard_normal(v.shape)).astype(v.dtype)
           for k, v in state.items() if k.startswith("model.diffusion_model.") and k != drop}
    state.update(ema, **{"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(10)})
    if path.suffix == ".ckpt":
        torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, path)
    else:
        save_file({k: np.asarray(v) for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ema_weights_load_the_ema_copy_as_diffusers_extract_ema_does(pipe, single_file, tiny_checkpoints, tmp_path,
                                                                    suffix):
    """v1-5-pruned.ckpt holds the UNet twice; ema_weights=True loads its EMA copy: the state dict
    diffusers' LDM converter extracts with extract_ema=True (every key, same values); the other
    models are the file's as before."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sdjax.weights import _numpy_params, to_torch_layout, torch_key
    path = _training_checkpoint(single_file, tmp_path / f"train{suffix}")
    file_state = ({k: torch.from_numpy(v) for k, v in load_file(str(path)).items()} if suffix == ".safetensors"
                  else torch.load(path, weights_only=True)["state_dict"])
    expected = convert_ldm_unet_checkpoint(file_state, dict(tiny_checkpoints["unet"]["torch"].config),
                                           extract_ema=True)
    models = load_single_file(path, configs_of(pipe), ema_weights=True)   # (no warning: the EMA copy is loaded)
    got = {torch_key(p): to_torch_layout(a, p) for p, a in _numpy_params(models["unet"]).items()}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
    assert not np.array_equal(got["conv_in.weight"], reference_state(tiny_checkpoints, "unet")["conv_in.weight"])
    for part in ("vae", "text_encoder"):
        assert_same_params(models[part], getattr(pipe, part))


def test_ema_weights_that_are_not_there_are_named(pipe, single_file, tiny_pipeline_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"tiny-sd.safetensors: has no EMA copy of the UNet \(no 'model_ema.\*' "
                                              r"keys\) to load with ema_weights=True"):
        load_pipeline(str(single_file), model_config=str(tiny_pipeline_dir), ema_weights=True)
    path = _training_checkpoint(single_file, tmp_path / "partial.safetensors",
                                drop="model.diffusion_model.out.2.weight")
    with pytest.raises(CheckpointError, match=r"missing.*model_ema\.diffusion_modelout2weight"):
        load_single_file(path, configs_of(pipe), ema_weights=True)
    with pytest.raises(CheckpointError, match=r"--ema-weights: picks the EMA copy in a single-file training "
                                              r"checkpoint .*a pipeline folder or Hub repo .* holds one set"):
        load_pipeline(str(tiny_pipeline_dir), ema_weights=True)


def test_a_file_with_the_other_formats_suffix_says_to_rename_it(pipe, single_file, tmp_path):
    torch_file = tmp_path / "model.safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(single_file)).items()}, torch_file)
    with pytest.raises(CheckpointError, match="a PyTorch checkpoint \\(torch.save\\) named .safetensors: rename it "
                                              "to model.bin"):
        load_single_file(torch_file, configs_of(pipe))
    safetensors_file = tmp_path / "model.ckpt"
    shutil.copy(single_file, safetensors_file)
    with pytest.raises(CheckpointError, match="a safetensors file named .ckpt: rename it to .safetensors") as info:
        load_single_file(safetensors_file, configs_of(pipe))
    assert "weights_only" not in str(info.value)


def test_float16_file(pipe, tmp_path):
    path = pipe.save_single_file(tmp_path / "half.safetensors", dtype="float16")
    assert {v.dtype for v in load_file(str(path)).values()} == {np.dtype(np.float16)}
    models = load_single_file(path, configs_of(pipe), dtype="bfloat16")
    got = models["unet"].conv_in.kernel.get_value()
    want = np.asarray(pipe.unet.conv_in.kernel.get_value())
    assert got.dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-3)


def _rewrite(single_file, tmp_path, edit) -> str:
    state = load_file(str(single_file))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return str(path)


UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
BAD_FILES = {
    "missing": (lambda s: s.pop(UNET_KEY), f"does not match its config's UNet2DConditionModel\n  missing keys (1): "
                f"{UNET_KEY}"),
    "unexpected": (lambda s: s.update({"first_stage_model.encoder.extra.weight": np.zeros(3, np.float32)}),
                   "unexpected keys (1): first_stage_model.encoder.extra.weight"),
    "shape": (lambda s: s.update({UNET_KEY: s[UNET_KEY][:, :-1].copy()}), f"key '{UNET_KEY}' has shape"),
    # (shapes as the file holds them: OIHW)
    "pix2pix": (lambda s: s.update({CONV_IN: np.concatenate([s[CONV_IN]] * 2, axis=1)}),   # (9: inpainting loads)
                f"key '{CONV_IN}' has shape (32, 8, 3, 3): a UNet that takes 8 input channels; sdjax loads one that "
                "takes the 4 latent channels it denoises (text-to-image) or 9 (inpainting: the latents, the mask and "
                "the masked image's latents), not others (instruct-pix2pix: 8, depth: 5)"),
    "sdxl": (lambda s: s.update({"conditioner.embedders.1.model.ln_final.weight": np.ones(4, np.float32)}),
             "an SDXL checkpoint"),
    "sd2": (lambda s: s.update({"cond_stage_model.model.token_embedding.weight": np.ones((4, 4), np.float32)}),
            "an SD 2.x checkpoint"),
    "sd3": (lambda s: s.update({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": np.ones(4, np.float32)}),
            "an SD 3 checkpoint"),
    "flux": (lambda s: [s.clear(), s.update({"double_blocks.0.img_attn.qkv.weight": np.ones(4, np.float32)})],
             "a Flux checkpoint"),
    "diffusers_file": (lambda s: [s.clear(), s.update({"down_blocks.0.resnets.0.conv1.weight": np.ones(3, np.float32)})],
                       "no 'model.diffusion_model.*' keys (it has down_blocks.0.resnets.0.conv1.weight); a diffusers "
                       "model file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_single_files_are_named(pipe, single_file, tmp_path, case):
    edit, message = BAD_FILES[case]
    path = _rewrite(single_file, tmp_path, edit)
    with pytest.raises(CheckpointError, match="(?s)edited.safetensors: .*" + re.escape(message)):
        load_single_file(path, configs_of(pipe))


def test_an_inpainting_single_file_loads_and_saves_as_one(pipe, single_file, tiny_pipeline_dir, tmp_path):
    """A file whose conv_in takes 2 * 4 + 1 input channels (sd-v1-5-inpainting's latents, mask and
    masked image's latents) loads with the text-to-image configs as an inpainting UNet, from
    safetensors (its shape from the header) or a pickled .ckpt (its EMA copy too), to the file's
    weights; it is written back as the same file, and as a folder diffusers' inpainting pipeline
    loads to the same weights."""
    from diffusers import StableDiffusionInpaintPipeline

    from sdjax.weights import _numpy_params, to_torch_layout, torch_key
    rng = np.random.default_rng(3)
    widen = lambda s: s.update({CONV_IN: np.concatenate(  # noqa: E731
        [s[CONV_IN], rng.standard_normal((32, 5, 3, 3)).astype(np.float32)], axis=1)})
    path = Path(_rewrite(single_file, tmp_path, widen))
    file_state = load_file(str(path))
    loaded = StableDiffusion.from_single_file(path, config=str(tiny_pipeline_dir))
    assert loaded.unet.config.in_channels == 9 and pipe.unet.config.in_channels == 4
    assert loaded.unet.conv_in.kernel.get_value().shape == (3, 3, 9, 32)
    again = loaded.save_single_file(tmp_path / "again.safetensors")
    assert load_file(str(again)).keys() == file_state.keys()
    for key, value in load_file(str(again)).items():   # the weights it was built from, all of them
        np.testing.assert_array_equal(value, file_state[key], err_msg=key)

    ckpt = _training_checkpoint(path, tmp_path / "inpainting.ckpt")   # (with a model_ema.* copy of other values)
    ema = load_single_file(ckpt, configs_of(pipe), ema_weights=True)["unet"]
    assert ema.config.in_channels == 9
    assert not np.array_equal(np.asarray(ema.conv_in.kernel.get_value()),
                              np.asarray(loaded.unet.conv_in.kernel.get_value()))
    with pytest.warns(UserWarning, match="holds an EMA copy"):
        assert_same_params(load_single_file(ckpt, configs_of(pipe))["unet"], loaded.unet)

    folder = loaded.save_pretrained(tmp_path / "inpainting", format="pytorch")
    assert StableDiffusion.from_pretrained(folder).unet.config.in_channels == 9
    reference = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    assert reference.unet.config.in_channels == 9
    expected = {torch_key(p): to_torch_layout(a, p) for p, a in _numpy_params(loaded.unet).items()}
    got = {k: v.numpy() for k, v in reference.unet.state_dict().items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_every_part_that_does_not_match_is_named_at_once(pipe, single_file, tmp_path):
    """A UNet-only file: one error names the text encoder's and the VAE's absence (fixing one part
    used to reveal the next), and says how to give a VAE."""
    path = _rewrite(single_file, tmp_path, lambda s: [s.pop(k) for k in list(s)
                                                       if not k.startswith("model.diffusion_model.")])
    with pytest.raises(CheckpointError) as info:
        load_single_file(path, configs_of(pipe))
    message = str(info.value)
    assert "UNet2DConditionModel" not in message   # the UNet loaded
    for expected in ("does not match its config's AutoencoderKL", "it has no vae at all (no 'first_stage_model.*' "
                     "weights); load one beside it with vae= (--vae)", "does not match its config's CLIPTextModel",
                     "it has no text_encoder at all (no 'cond_stage_model.transformer.*' weights)"):
        assert expected in message, (expected, message)


def test_a_config_that_is_a_file_or_a_models_folder_is_named(single_file, tiny_pipeline_dir):
    for config, message in ((single_file, f"config={single_file} is a file; a single file's configs and tokenizer "
                                          "come from a pipeline folder or Hub repo id"),
                            (tiny_pipeline_dir / "unet", f"config={tiny_pipeline_dir / 'unet'} is the unet/ folder of "
                                                         f"a pipeline; give the pipeline folder, {tiny_pipeline_dir}")):
        with pytest.raises(CheckpointError, match=re.escape(f"{single_file}: {message}")):
            StableDiffusion.from_single_file(single_file, config=str(config))


def test_single_file_errors_come_before_the_configs_are_fetched(tmp_path, monkeypatch):
    """A bad file is reported without going to the Hub for the configs (here: offline)."""
    import sdjax.pipeline as P
    monkeypatch.setattr(P, "resolve_model_dir", lambda *a, **k: pytest.fail("fetched the configs"))
    (tmp_path / "notes.txt").write_text("hello")
    for name, message in (("notes.txt", "not a single-file checkpoint sdjax reads"),
                          ("nope.safetensors", "no such checkpoint file"), (".", "is a folder")):
        with pytest.raises(CheckpointError, match=message):
            StableDiffusion.from_single_file(tmp_path / name)


def test_names_and_shapes_are_ldms_at_the_sd15_configs():
    """At the real SD v1.5 configs, the UNet and VAE weights sdjax writes have exactly the names and
    PyTorch shapes of the original code's modules (tests/data/ldm_sd15_keys.tsv, made by running
    CompVis' UNetModel / Encoder / Decoder). The round trips above cannot show this: diffusers'
    converter also accepts an upsampler at the wrong index, and the tiny configs have fewer blocks."""
    import reference as R
    from sdjax import AutoencoderKL, UNet2DConditionModel
    from sdjax.models import UNetConfig, VAEConfig
    from sdjax.weights import abstract_model, single_file_tensor

    expected = dict(line.split("\t") for line in (DATA / "ldm_sd15_keys.tsv").read_text().splitlines())
    written = {}
    for part, cls, config in (("unet", UNet2DConditionModel, UNetConfig.from_dict(R.SD15_UNET)),
                              ("vae", AutoencoderKL, VAEConfig.from_dict(R.SD15_VAE))):
        _, state = abstract_model(cls, config)
        for path, var in nnx.to_flat_state(state):
            placeholder = np.broadcast_to(np.zeros((), np.float32), var.get_value().shape)  # no memory
            name, array = single_file_tensor(part, path, placeholder, config)
            written[name] = "x".join(map(str, array.shape))
    assert sorted(set(expected) - set(written)) == [] and sorted(set(written) - set(expected)) == []
    assert {k: v for k, v in written.items() if expected[k] != v} == {}


# ----------------------------------------------------------------------------- Hub file URLs
class FakeHub:
    """huggingface_hub's header read, file download and cache, served from local files: {(repo,
    filename, revision): path}. Records the calls, so a test sees what was (not) downloaded."""

    def __init__(self, monkeypatch, files):
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
        from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo
        self.files, self.headers, self.downloads, self.cached = files, [], [], {}

        def parse_safetensors_file_metadata(api, repo, filename, *, revision=None, **kwargs):
            self.headers.append((repo, filename, revision))
            with safe_open(str(self._path(repo, filename, revision)), "np") as f:
                keys = list(f.keys())
            info = TensorInfo(dtype="F32", shape=[1], data_offsets=(0, 4))
            return SafetensorsFileMetadata(metadata={}, tensors=dict.fromkeys(keys, info))

        def hf_hub_download(repo, filename, *, revision=None, local_files_only=False, **kwargs):
            if local_files_only:
                if (repo, filename, revision) not in self.cached:
                    raise LocalEntryNotFoundError(f"{repo}/{filename} is not in the cache")
                return self.cached[repo, filename, revision]
            self.downloads.append((repo, filename, revision))
            self.cached[repo, filename, revision] = str(self._path(repo, filename, revision))
            return self.cached[repo, filename, revision]

        monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata", parse_safetensors_file_metadata)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    def _path(self, repo, filename, revision):
        if (repo, filename, revision) not in self.files:
            raise ConnectionError(f"no network: cannot reach huggingface.co for {repo}/{filename}")
        return self.files[repo, filename, revision]


@pytest.mark.parametrize("url,revision", [
    ("https://huggingface.co/someone/tiny-sd/blob/main/tiny%20sd.safetensors", "main"),
    ("https://huggingface.co/someone/tiny-sd/resolve/main/tiny%20sd.safetensors?download=true", "main"),
    ("https://huggingface.co/someone/tiny-sd/blob/refs%2Fpr%2F3/tiny%20sd.safetensors", "refs/pr/3")])  # a PR's
def test_hub_file_url_loads_as_the_local_file(pipe, single_file, tiny_pipeline_dir, monkeypatch, url, revision):
    hub = FakeHub(monkeypatch, {("someone/tiny-sd", "tiny sd.safetensors", revision): single_file})
    loaded = load_pipeline(url, model_config=str(tiny_pipeline_dir))  # what sample.py --model URL does
    for part in PARTS:
        assert_same_params(getattr(loaded, part), getattr(pipe, part))
    assert hub.downloads == [("someone/tiny-sd", "tiny sd.safetensors", revision)]
    assert set(hub.headers) == set(hub.downloads)
    assert loaded.name == url
    hub.files.clear()  # offline now: the second time, the file comes from the cache
    again = load_pipeline(url, model_config=str(tiny_pipeline_dir))
    assert_same_params(again.unet, pipe.unet)
    assert len(hub.downloads) == 1 and len(hub.headers) == 1   # the header was read once, the file fetched once


def test_hub_file_url_is_downloaded_only_once_the_configs_are_there(single_file, monkeypatch):
    import sdjax.pipeline as P
    hub = FakeHub(monkeypatch, {("someone/tiny-sd", "tiny.safetensors", "main"): single_file})

    def offline(*args, **kwargs):
        raise CheckpointError("could not get 'someone/configs' from the Hugging Face Hub")
    monkeypatch.setattr(P, "resolve_model_dir", offline)
    with pytest.raises(CheckpointError, match="configs and tokenizer come from .*could not get 'someone/configs'"):
        StableDiffusion.from_single_file("https://huggingface.co/someone/tiny-sd/blob/main/tiny.safetensors",
                                         config="someone/configs")
    assert hub.headers and not hub.downloads


def test_hub_file_url_in_the_hub_cache_loads_offline(pipe, single_file, tiny_pipeline_dir, tmp_path, monkeypatch):
    """huggingface_hub itself (no fake): a file already in the Hub cache loads with HF_HUB_OFFLINE=1;
    one that is not there is an error that says what to do."""
    from huggingface_hub import constants
    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "tiny.safetensors").symlink_to(single_file)
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_pipeline("https://huggingface.co/someone/tiny-sd/blob/main/tiny.safetensors",
                           model_config=str(tiny_pipeline_dir))
    assert_same_params(loaded.unet, pipe.unet)
    with pytest.raises(CheckpointError, match=r"OfflineModeIsEnabled: .*offline mode is enabled.*\. Without network "
                                              r"access here, download it where there is \(`hf download someone/"
                                              r"tiny-sd other.safetensors --revision main"):
        load_pipeline("https://huggingface.co/someone/tiny-sd/blob/main/other.safetensors",
                      model_config=str(tiny_pipeline_dir))


def test_hub_file_url_of_another_architecture_is_refused_before_the_download(single_file, tmp_path, monkeypatch):
    sdxl = _rewrite(single_file, tmp_path, BAD_FILES["sdxl"][0])
    hub = FakeHub(monkeypatch, {("someone/xl", "xl.safetensors", "v2"): sdxl})
    url = "https://huggingface.co/someone/xl/blob/v2/xl.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(url) + ": an SDXL checkpoint"):
        StableDiffusion.from_single_file(url)
    assert hub.headers and not hub.downloads


def test_hub_file_url_offline_says_how_to_get_the_file(tiny_pipeline_dir, monkeypatch):
    FakeHub(monkeypatch, {})
    url = "https://huggingface.co/someone/tiny-sd/blob/main/weights/model.ckpt"
    with pytest.raises(CheckpointError) as error:
        StableDiffusion.from_single_file(url, config=str(tiny_pipeline_dir))
    assert str(error.value) == (
        f"could not get {url} from the Hugging Face Hub: ConnectionError: no network: cannot reach huggingface.co "
        "for someone/tiny-sd/weights/model.ckpt. Without network access here, download it where there is "
        "(`hf download someone/tiny-sd weights/model.ckpt --revision main --local-dir DIR`) and pass "
        "DIR/weights/model.ckpt instead.")


@pytest.mark.parametrize("url, message", [
    ("https://civitai.com/api/download/models/12345", "sdjax downloads only Hugging Face Hub file URLs"),
    ("https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
     "a Hub pipeline repo loads by its id (OWNER/NAME)"),
    ("https://huggingface.co/someone/tiny-sd/blob/main/README.md", "README.md is not a single-file checkpoint"),
])
def test_other_urls_are_refused_without_network(url, message, monkeypatch):
    hub = FakeHub(monkeypatch, {})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_pipeline(url)
    assert not hub.headers and not hub.downloads


# ----------------------------------------------------------------------------- a VAE of its own
@pytest.fixture(scope="module")
def other_vae(pipe, tmp_path_factory):
    """Another VAE of the tiny pipeline's architecture (other random weights): its diffusers folder,
    and the same weights as a VAE file in the original layout (``vae-ft-mse-840000-ema-pruned``'s
    names: the single file's ``first_stage_model.*`` keys without the prefix)."""
    import reference as R
    from sdjax import AutoencoderKL

    root = tmp_path_factory.mktemp("vae")
    folder = R.save_torch_layout(R.torch_vae(seed=5), root / "sd-vae-other").parent
    model = AutoencoderKL.from_pretrained(folder)
    whole = StableDiffusion(text_encoder=pipe.text_encoder, unet=pipe.unet, vae=model, tokenizer=pipe.tokenizer,
                            scheduler_config=pipe.scheduler_config).save_single_file(root / "whole.safetensors")
    prefix = "first_stage_model."
    ldm = {k[len(prefix):]: v for k, v in load_file(str(whole)).items() if k.startswith(prefix)}
    save_file(ldm, str(root / "vae-other.safetensors"))
    return {"folder": folder, "model": model, "whole": whole, "file": root / "vae-other.safetensors", "ldm": ldm}


def test_vae_file_in_the_original_layout_loads_as_diffusers_reads_it(pipe, other_vae):
    """diffusers' AutoencoderKL.from_single_file reads the VAE file as the weights of the folder it
    came from; sdjax's load_vae_file reads it (and a whole checkpoint's VAE) as the same model."""
    from diffusers import AutoencoderKL as TorchVAE
    from sdjax.weights import load_vae_file

    reference = TorchVAE.from_single_file(str(other_vae["file"]), config=str(other_vae["folder"]),
                                          local_files_only=True)
    folder_state = comparable_state(TorchVAE.from_pretrained(other_vae["folder"]), "vae")
    for key, value in comparable_state(reference, "vae").items():
        np.testing.assert_array_equal(value, folder_state[key], err_msg=key)
    for source in (other_vae["file"], other_vae["whole"]):
        assert_same_params(load_vae_file(source, pipe.vae.config), other_vae["model"])
    with pytest.raises(AssertionError):   # a real check: the pipeline's own VAE differs
        assert_same_params(pipe.vae, other_vae["model"])


def test_vae_ckpt_with_training_leftovers_and_diffusers_layout_file(pipe, other_vae, tmp_path):
    """A PyTorch .ckpt VAE as the original repo saved vae-ft-mse-840000 ({"state_dict": ...} with the
    LPIPS / discriminator loss's weights beside the model's) and a diffusers weights file alone."""
    from sdjax.weights import load_vae_file

    state = {k: torch.from_numpy(v.copy()) for k, v in other_vae["ldm"].items()}
    state.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4)})
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "vae.ckpt")
    diffusers_file = other_vae["folder"] / "diffusion_pytorch_model.safetensors"
    for source in (tmp_path / "vae.ckpt", diffusers_file):
        assert_same_params(load_vae_file(source, pipe.vae.config), other_vae["model"])


BAD_VAE_FILES = {
    "missing": (lambda s: s.pop("decoder.conv_out.weight"), "missing keys (1): decoder.conv_out.weight"),
    "unexpected": (lambda s: s.update({"encoder.extra.weight": np.zeros(3, np.float32)}),
                   "unexpected keys (1): encoder.extra.weight"),
    "not_a_vae": (lambda s: [s.clear(), s.update({"lora_unet_down.alpha": np.ones((), np.float32)})],
                  "not a VAE: no 'encoder.*' / 'decoder.*' keys, nor a checkpoint's 'first_stage_model.*' "
                  "(it has lora_unet_down.alpha)"),
}


@pytest.mark.parametrize("case", list(BAD_VAE_FILES))
def test_bad_vae_files_are_named(pipe, other_vae, tmp_path, case):
    from sdjax.weights import load_vae_file
    edit, message = BAD_VAE_FILES[case]
    state = dict(other_vae["ldm"])
    edit(state)
    save_file(state, str(tmp_path / "bad-vae.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)bad-vae.safetensors: .*" + re.escape(message)):
        load_vae_file(tmp_path / "bad-vae.safetensors", pipe.vae.config)


@pytest.mark.parametrize("source", ["file", "folder", "pipeline_folder", "model"])
def test_pipeline_with_another_vae(pipe, single_file, other_vae, tiny_pipeline_dir, tmp_path, source):
    """vae= in from_pretrained and from_single_file (sample.py --vae): the pipeline's text encoder and
    UNet with the VAE given as a file, a VAE folder, a pipeline folder (its vae/) or a model."""
    if source == "pipeline_folder":
        given = pipe.save_pretrained(tmp_path / "other-sd")
        StableDiffusion(text_encoder=pipe.text_encoder, unet=pipe.unet, vae=other_vae["model"],
                        tokenizer=pipe.tokenizer, scheduler_config=pipe.scheduler_config).save_pretrained(
            given, overwrite=True)
    else:
        given = other_vae[source]
    for loaded in (StableDiffusion.from_pretrained(tiny_pipeline_dir, vae=given),
                   load_pipeline(str(single_file), model_config=str(tiny_pipeline_dir),
                                 vae=given if source == "model" else str(given))):
        assert_same_params(loaded.vae, other_vae["model"])
        assert_same_params(loaded.unet, pipe.unet)
        assert_same_params(loaded.text_encoder, pipe.text_encoder)


def test_single_file_without_a_vae_loads_with_another(pipe, single_file, other_vae, tiny_pipeline_dir, tmp_path):
    """A checkpoint saved without its VAE (first_stage_model.*) loads with vae= (its VAE keys are
    not read), and without one it is an error naming the missing keys."""
    path = _rewrite(single_file, tmp_path, lambda s: [s.pop(k) for k in list(s) if k.startswith("first_stage_model.")])
    loaded = StableDiffusion.from_single_file(path, config=str(tiny_pipeline_dir), vae=other_vae["file"])
    assert_same_params(loaded.vae, other_vae["model"])
    assert_same_params(loaded.unet, pipe.unet)
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): first_stage_model\."):
        StableDiffusion.from_single_file(path, config=str(tiny_pipeline_dir))


def test_another_vae_with_the_pipelines_variant_or_in_place_of_a_missing_vae(pipe, other_vae, tmp_path):
    """--variant fp16 --vae FOLDER: the folder's fp16 weights where it has them (its plain ones
    otherwise); a pipeline folder without vae/ loads with a VAE folder or model given, and says
    what a VAE weights file would need."""
    folder = pipe.save_pretrained(tmp_path / "sd", format="pytorch")
    plain = folder / "vae" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(str(other_vae["folder"] / "diffusion_pytorch_model.safetensors")),
              str(plain.with_name("diffusion_pytorch_model.fp16.safetensors")))
    plain.unlink()
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(unet_file, unet_file.with_name("diffusion_pytorch_model.fp16.safetensors"))
    for given in (folder / "vae", folder):   # a VAE folder, a pipeline folder (its vae/)
        loaded = load_pipeline(str(folder), variant="fp16", vae=str(given))
        assert_same_params(loaded.vae, other_vae["model"])
        assert_same_params(loaded.text_encoder, pipe.text_encoder)   # (no fp16 file: its plain weights)
    shutil.rmtree(folder / "vae")
    for given in (other_vae["model"], str(other_vae["folder"])):
        assert_same_params(StableDiffusion.from_pretrained(folder, vae=given).vae, other_vae["model"])
    with pytest.raises(CheckpointError, match="vae-other.safetensors: a VAE weights file takes its architecture from "
                                              r"the model's VAE config \(vae/config.json\), which this model does not "
                                              "have: give a VAE folder instead"):
        StableDiffusion.from_pretrained(folder, vae=other_vae["file"])
    with pytest.raises(CheckpointError, match=r"vae: no config.json"):
        StableDiffusion.from_pretrained(folder)


def test_another_vae_is_checked_against_the_pipeline(pipe, tiny_pipeline_dir):
    """A VAE of another latent width is refused naming it (not the UNet); a URL is refused without
    network; a wrong type is a TypeError."""
    import dataclasses
    from sdjax import AutoencoderKL

    wide = AutoencoderKL(dataclasses.replace(pipe.vae.config, latent_channels=8), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="vae=the AutoencoderKL given: its latents have 8 channels, this "
                                              "model's 4 .its UNet denoises those.: a VAE of another model"):
        StableDiffusion.from_pretrained(tiny_pipeline_dir, vae=wide)
    with pytest.raises(CheckpointError, match="a VAE loads from a local file, a folder or a Hub repo id"):
        StableDiffusion.from_pretrained(tiny_pipeline_dir, vae="https://example.com/vae.safetensors")
    with pytest.raises(TypeError, match="vae must be an AutoencoderKL, or a path or Hub repo id of one; got dict"):
        StableDiffusion.from_pretrained(tiny_pipeline_dir, vae={})
