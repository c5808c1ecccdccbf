"""LoRA files merged into the pipeline (StableDiffusion.fuse_lora, sdjax.weights.read_lora) against
diffusers' StableDiffusionPipeline.load_lora_weights + fuse_lora (peft), in kohya's and diffusers' formats."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.torch import save_file

from sdjax.pipeline import StableDiffusion
from sdjax.weights import CLIP, to_torch_layout, torch_key

# (part, diffusers module name, torch weight shape) of the tiny models (tests/model_configs.py): attention
# projections (square and not), feed-forward linears, 1x1 and 3x3 convs (LoCon), text-encoder layers.
MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (32, 32)),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", (64, 32)),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", (64, 64)),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", (256, 32)),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", (32, 128)),
    ("unet", "down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1)),
    ("unet", "up_blocks.0.resnets.0.conv_shortcut", (64, 128, 1, 1)),
    ("unet", "up_blocks.0.resnets.0.conv1", (64, 128, 3, 3)),
    ("unet", "conv_in", (32, 4, 3, 3)),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", (32, 32)),
    ("text_encoder", "text_model.encoder.layers.1.self_attn.out_proj", (32, 32)),
    ("text_encoder", "text_model.encoder.layers.2.mlp.fc1", (37, 32)),
]
RANKS = [4, 4, 2, 4, 4, 4, 3, 4, 2, 4, 4, 2]   # mixed, as kohya's dims per block can be
TOLERANCE = 1e-5   # float32 merges in two frameworks: the weights differ by rounding only


def lora_tensors(seed):
    """{(part, module): (down, up)} of random LoRA factors (down [r, in(, kh, kw)], up [out, r(, 1, 1)])."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (part, module, shape), rank in zip(MODULES, RANKS):
        down = torch.randn((rank, shape[1], *shape[2:]), generator=g) * 0.2
        up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=g) * 0.2
        out[part, module] = (down, up)
    return out


def write_kohya(path, factors, alphas):
    """kohya / A1111: lora_unet_<name with _>.lora_down.weight / .lora_up.weight / .alpha (absent: None)."""
    tensors = {}
    for (part, module), (down, up) in factors.items():
        name = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alphas[part, module] is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alphas[part, module]))
    save_file(tensors, str(path))
    return path


def write_old_diffusers(path, factors):
    """diffusers' older LoRA names (no alphas: alpha = rank): attention processors' ``attn1.processor.to_q_lora.
    down.weight`` / the text encoder's ``self_attn.to_q_lora.down.weight``, other layers' ``.lora.down.weight``
    (UNet) and ``.lora_linear_layer.down.weight`` (text encoder)."""
    tensors = {}
    for (part, module), (down, up) in factors.items():
        attention = re.fullmatch(r"(.*\.(?:attn[12]|self_attn))\.(to_[qkv]|to_out\.0|[qkv]_proj|out_proj)", module)
        if attention:
            short = {"to_out.0": "to_out", "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v",
                     "out_proj": "to_out"}.get(attention[2], attention[2])
            processor = ".processor" if part == "unet" else ""
            name, down_name, up_name = f"{attention[1]}{processor}.{short}_lora", "down.weight", "up.weight"
        else:
            name = module
            down_name, up_name = ("lora.down.weight", "lora.up.weight") if part == "unet" else (
                "lora_linear_layer.down.weight", "lora_linear_layer.up.weight")
        tensors[f"{part}.{name}.{down_name}"], tensors[f"{part}.{name}.{up_name}"] = down, up
    save_file(tensors, str(path))
    return path


def write_peft(path, factors, lora_alpha, alpha_pattern):
    """diffusers / PEFT: unet.<name>.lora_A.weight / lora_B.weight, the alphas in lora_adapter_metadata
    (PEFT's LoraConfig per part, as diffusers' save_lora_weights writes it; the text encoder's module names
    as a transformers 5 CLIPTextModel has them, without "text_model.")."""
    tensors, metadata = {}, {}
    for (part, module), (down, up) in factors.items():
        tensors[f"{part}.{module}.lora_A.weight"], tensors[f"{part}.{module}.lora_B.weight"] = down, up
    for part in ("unet", "text_encoder"):
        modules = [m.removeprefix("text_model.") for p, m in factors if p == part]
        ranks = {m.removeprefix("text_model."): factors[part, m][0].shape[0] for p, m in factors if p == part}
        metadata.update({f"{part}.r": 4, f"{part}.lora_alpha": lora_alpha, f"{part}.target_modules": modules,
                         f"{part}.rank_pattern": {m: r for m, r in ranks.items() if r != 4},
                         f"{part}.alpha_pattern": {m.removeprefix("text_model."): a for m, a in alpha_pattern.items()
                                                   if m.removeprefix("text_model.") in modules}})
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return path


def mixed_alphas():
    """Per-module alphas, != rank, some absent (then alpha = rank: scale 1, as kohya and A1111 take it)."""
    return {(part, module): None if i % 5 == 0 else [1.0, 8.0, 3.0, 0.5][i % 4]
            for i, (part, module, _) in enumerate(MODULES)}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        # one alpha for all modules, != their ranks (diffusers 0.42.1 merges a kohya file's per-module alphas
        # only in part: its alpha_pattern misses the attention layers, and a module without an alpha gets the
        # others'; test_kohya_alphas_per_module checks those against the file's tensors instead)
        "kohya": write_kohya(root / "kohya_style.safetensors", lora_tensors(1), dict.fromkeys(mixed_alphas(), 3.0)),
        "kohya_mixed": write_kohya(root / "kohya_mixed.safetensors", lora_tensors(1), mixed_alphas()),
        "peft": write_peft(root / "peft_style.safetensors", lora_tensors(2), 8.0,
                           {MODULES[1][1]: 2.0, MODULES[9][1]: 16.0}),
        "old": write_old_diffusers(root / "old_style.safetensors", lora_tensors(3)),
    }


def sdjax_torch_weights(pipe):
    """{part: {torch key: numpy array in PyTorch's layout}} of the pipeline's UNet and text encoder."""
    out = {}
    for part in ("unet", "text_encoder"):
        params = flatten_dict(nnx.to_pure_dict(nnx.state(getattr(pipe, part), nnx.Param)))
        out[part] = {torch_key(path): to_torch_layout(np.asarray(value, np.float32), path)
                     for path, value in params.items()}
    return out


def diffusers_fused_weights(model_dir, loras):
    """{part: {torch key: array}} of diffusers' pipeline after load_lora_weights + fuse_lora of each
    (file, scale) in ``loras`` (adapters fused, then unloaded: the fused weights stay)."""
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    for i, (file, scale) in enumerate(loras):
        ref.load_lora_weights(str(file), adapter_name=f"lora{i}")
        ref.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[f"lora{i}"])
        ref.unload_lora_weights()
    te = {CLIP.torch_name(k): v for k, v in ref.text_encoder.state_dict().items()}
    return {"unet": {k: v.numpy() for k, v in ref.unet.state_dict().items()},
            "text_encoder": {k: v.numpy() for k, v in te.items() if k is not None}}


def assert_weights_match(ours, theirs, base):
    changed = 0
    for part in ours:
        assert set(ours[part]) == set(theirs[part]), part
        for key, value in ours[part].items():
            np.testing.assert_allclose(value, theirs[part][key], atol=TOLERANCE, rtol=0, err_msg=key)
            changed += not np.allclose(value, base[part][key], atol=1e-3)
    assert changed == len(MODULES)   # each LoRA module changed its weight, visibly; nothing else changed
    return max(float(np.abs(v - theirs[p][k]).max()) for p in ours for k, v in ours[p].items())


@pytest.mark.parametrize("fmt,scale", [("kohya", 0.7), ("peft", 1.3), ("old", 0.8)])
def test_fuse_lora_matches_diffusers(tiny_pipeline_dir, lora_files, fmt, scale):
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    base = sdjax_torch_weights(pipe)
    pipe.fuse_lora(lora_files[fmt], scale=scale)
    error = assert_weights_match(sdjax_torch_weights(pipe), diffusers_fused_weights(
        tiny_pipeline_dir, [(lora_files[fmt], scale)]), base)
    print(f"{fmt}: max |sdjax - diffusers| = {error:.2e}")


def test_two_loras_stack(tiny_pipeline_dir, lora_files):
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    base = sdjax_torch_weights(pipe)
    pipe.fuse_lora(lora_files["kohya"], scale=0.5)
    pipe.fuse_lora(lora_files["peft"])
    loras = [(lora_files["kohya"], 0.5), (lora_files["peft"], 1.0)]
    error = assert_weights_match(sdjax_torch_weights(pipe), diffusers_fused_weights(tiny_pipeline_dir, loras), base)
    print(f"stacked: max |sdjax - diffusers| = {error:.2e}")


def test_kohya_alphas_per_module(tiny_pipeline_dir, lora_files):
    """Each module's own alpha, alpha = rank where the file has none (A1111's and kohya's reading): against
    the merge derived here from the file's tensors with torch, W + scale * alpha / rank * up @ down."""
    from safetensors.torch import load_file
    scale = 0.6
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    expected = sdjax_torch_weights(pipe)
    tensors = load_file(str(lora_files["kohya_mixed"]))
    for part, module, shape in MODULES:
        name = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else rank
        product = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        key = f"{module}.weight"
        expected[part][key] = expected[part][key] + scale * alpha / rank * product.numpy()
    pipe.fuse_lora(lora_files["kohya_mixed"], scale=scale)
    ours = sdjax_torch_weights(pipe)
    for part in ours:
        for key, value in ours[part].items():
            np.testing.assert_allclose(value, expected[part][key], atol=TOLERANCE, rtol=0, err_msg=key)


def test_kohya_original_layout_unet_names_read_as_its_diffusers_names(tmp_path):
    """``lora_unet_input_blocks_1_1_proj_in`` (the original SD layout's names, as some trainers write them) is the
    layer ``lora_unet_down_blocks_0_attentions_0_proj_in`` is (names mapped by sdjax's single-file converter, which
    test_single_file.py checks against diffusers')."""
    from model_configs import TINY_CLIP, TINY_UNET
    from sdjax.models.clip_text import CLIPTextConfig
    from sdjax.models.unet import UNetConfig
    from sdjax.weights import read_lora, single_file_key
    configs = {"unet": UNetConfig.from_dict(TINY_UNET), "text_encoder": CLIPTextConfig.from_dict(TINY_CLIP)}
    factors = lora_tensors(4)
    diffusers_named = write_kohya(tmp_path / "a.safetensors", factors, mixed_alphas())
    ldm = {}
    for (part, module), value in factors.items():
        if part == "unet":
            module = single_file_key("unet", module + ".weight", configs["unet"])
            module = module.removeprefix("model.diffusion_model.").removesuffix(".weight")
        ldm[part, module] = value
    assert ("unet", "input_blocks.1.1.proj_in") in ldm and ("unet", "input_blocks.0.0") in ldm
    ldm_named = write_kohya(tmp_path / "b.safetensors", ldm, dict(zip(ldm, mixed_alphas().values())))
    ours, theirs = (read_lora(f, configs, scale=0.5) for f in (diffusers_named, ldm_named))
    assert {p: sorted(d) for p, d in ours.items()} == {p: sorted(d) for p, d in theirs.items()}
    assert sum(map(len, ours.values())) == len(MODULES)
    for part in ours:
        for path in ours[part]:
            np.testing.assert_array_equal(ours[part][path], theirs[part][path])
    with pytest.raises(ValueError, match="the LoRA scale must be a finite number, got nan"):
        read_lora(diffusers_named, configs, scale=float("nan"))


def test_fused_weights_keep_the_pipeline_dtype_and_sampler(tiny_pipeline_dir, lora_files):
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype="bfloat16")
    generate = pipe._generate
    pipe.fuse_lora(lora_files["kohya"])
    params = flatten_dict(nnx.to_pure_dict(nnx.state(pipe.unet, nnx.Param)))
    assert {jnp.result_type(v) for v in params.values()} == {jnp.dtype(jnp.bfloat16)}
    assert pipe._generate is generate


def test_unfuse_lora_puts_the_weights_back_bit_for_bit(tiny_pipeline_dir, lora_files):
    """unfuse_lora after two LoRAs that change the same weights: every weight as it was before the first,
    bit for bit, in bfloat16 (where subtracting the changes would not give them back), the compiled sampler
    and the sampling state current; fused again, the same weights as the first time. After set_params its
    weights are the ones kept."""
    def weights(pipe):
        return {(part, *path): np.asarray(value, np.float32) for part in ("unet", "text_encoder")
                for path, value in flatten_dict(nnx.to_pure_dict(nnx.state(getattr(pipe, part), nnx.Param))).items()}

    def unchanged(a, b):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype="bfloat16")
    generate, base = pipe._generate, weights(pipe)
    pipe.unfuse_lora()   # (nothing fused: nothing changes)
    assert unchanged(weights(pipe), base)
    pipe.fuse_lora(lora_files["kohya"], scale=0.5)
    once = weights(pipe)
    from sdjax.weights import read_lora
    deltas = read_lora(lora_files["kohya"], {"unet": pipe.unet.config, "text_encoder": pipe.text_encoder.config},
                       scale=0.5)
    subtracted = {(part, *path): np.asarray(jnp.asarray(once[(part, *path)] - d, jnp.bfloat16), np.float32)
                  for part, changes in deltas.items() for path, d in changes.items()}
    assert any(not np.array_equal(w, base[k]) for k, w in subtracted.items())   # (what diffusers' unfuse does)
    pipe.fuse_lora(lora_files["peft"])
    twice = weights(pipe)
    changed = [k for k in base if not np.array_equal(twice[k], base[k])]
    assert len(changed) >= len(MODULES) and any(not np.array_equal(twice[k], once[k]) for k in changed)
    pipe.unfuse_lora()
    assert unchanged(weights(pipe), base) and pipe._generate is generate
    state = pipe.state.unet   # (what the sampler is given)
    state = flatten_dict(state if isinstance(state, dict) else nnx.to_pure_dict(state))
    assert all(np.array_equal(np.asarray(state[k[1:]], np.float32), base[k]) for k in changed if k[0] == "unet")
    pipe.fuse_lora(lora_files["kohya"], scale=0.5)
    assert unchanged(weights(pipe), once)
    key = changed[0]
    new = {key[1:]: np.zeros_like(base[key])}
    pipe.set_params(**{key[0]: unflatten_dict(new)}, partial=True)
    kept = weights(pipe)
    pipe.unfuse_lora()   # (set_params' weights stay: the LoRA is part of them now)
    assert unchanged(weights(pipe), kept)
    pipe.fuse_lora(lora_files["kohya"], scale=0.5)   # and weights changed on the model itself (a training step's)
    state = nnx.state(pipe.unet, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten_dict({key[1:]: np.ones_like(base[key]) for key in changed[:1]
                                                    if key[0] == "unet"}))
    nnx.update(pipe.unet, state)
    kept = weights(pipe)
    pipe.unfuse_lora()
    assert unchanged(weights(pipe), kept)


def bad_file(path, extra):
    """The kohya test file with ``extra`` tensors added to it."""
    write_kohya(path, lora_tensors(3), mixed_alphas())
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    tensors.update(extra)
    save_file(tensors, str(path))
    return path


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def unfused(tiny_pipeline_dir):
    """One pipeline for the tests of refused files, with its weights: a refused file changes nothing (each
    test checks), so they can share it."""
    pipe = StableDiffusion.from_pretrained(tiny_pipeline_dir)
    return pipe, sdjax_torch_weights(pipe)


@pytest.mark.parametrize("extra,message", [
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 32)},
     r"key 'lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a' is LoHa \(LyCORIS\)"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1": torch.zeros(4, 4)},
     r"key 'lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1' is LoKr"),
    ({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
     r"key 'lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight': it names no Linear or Conv layer"),
    ({f"{Q}.lora_down.weight": torch.zeros(4, 48), f"{Q}.lora_up.weight": torch.zeros(32, 4)},
     rf"key '{Q}.lora_down.weight' has shape \(4, 48\) and '{Q}.lora_up.weight' \(32, 4\): no LoRA of the layer's "
     r"weight \(32, 32\)"),
    ({f"{Q}.lora_up.weight": torch.zeros(32, 3)}, rf"key '{Q}.lora_down.weight' has shape \(4, 32\)"),
    ({f"{Q}.lora_down.weight": torch.zeros(0, 32), f"{Q}.lora_up.weight": torch.zeros(32, 0)},
     rf"key '{Q}.lora_down.weight' has shape \(0, 32\)"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
     r"key 'model.diffusion_model.input_blocks.0.0.weight' is a model checkpoint, not a LoRA"),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
     r"key 'lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight' is for a second text encoder \(an SDXL"),
    ({"lora_unet_conv_out.lora_down.weight": torch.zeros(4, 32, 3, 3)},
     r"key 'lora_unet_conv_out.lora_down.weight' has no LoRA up weight"),
], ids=["loha", "lokr", "unknown-module", "wrong-shape", "wrong-rank", "rank-0", "checkpoint", "sdxl", "no-up"])
def test_bad_lora_files_are_refused_naming_the_key_and_change_nothing(unfused, tmp_path, extra, message):
    pipe, before = unfused
    path = bad_file(tmp_path / "bad.safetensors", extra)
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + ": " + message):
        pipe.fuse_lora(path)
    after = sdjax_torch_weights(pipe)
    for part in before:
        for key in before[part]:
            np.testing.assert_array_equal(after[part][key], before[part][key])


def test_files_that_are_no_lora_are_refused(unfused, tmp_path):
    pipe, _ = unfused
    with pytest.raises(ValueError, match="no such LoRA file"):
        pipe.fuse_lora(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(ValueError, match="not a LoRA file: it holds no tensors"):
        pipe.fuse_lora(empty)
    model = tmp_path / "unet.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(model))
    with pytest.raises(ValueError, match=r"key 'down_blocks.0.resnets.0.conv1.weight' is a model checkpoint"):
        pipe.fuse_lora(model)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a safetensors file")
    with pytest.raises(ValueError, match="notes.safetensors: not a readable safetensors file"):
        pipe.fuse_lora(text)
    pt = tmp_path / "lora.pt"
    pt.write_bytes(b"")
    with pytest.raises(ValueError, match=r"lora.pt: sdjax reads LoRA files as \.safetensors"):
        pipe.fuse_lora(pt)
