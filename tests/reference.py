"""Reference checkpoints for the tests: diffusers/transformers PyTorch models with random
weights (norm weights perturbed away from 1/0), saved with ``save_pretrained``, and the same
weights written in the old diffusers/transformers Flax msgpack layout.

The Flax writer here follows the rules of diffusers' (<= 0.39) and transformers' (4.x) own
PyTorch->Flax conversion; it shares no code with ``sdjax.weights`` so that loading is tested
against an independent account of the format.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from model_configs import (SD15_CLIP, SD15_UNET, SD15_VAE, TINY_CLIP, TINY_UNET, TINY_UNET_DEEP, TINY_VAE,
                           write_tiny_tokenizer)

__all__ = ["SD15_CLIP", "SD15_UNET", "SD15_VAE", "TINY_CLIP", "TINY_UNET", "TINY_UNET_DEEP", "TINY_VAE",
           "write_tiny_tokenizer", "perturb_", "torch_unet", "torch_vae", "torch_clip", "save_flax_layout",
           "save_torch_layout", "jaxpr_equations"]


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere: random init leaves norms at 1/0 (hiding bugs) and some layers at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):      # norm scales
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:                                 # biases
                p.copy_(0.1 * noise)
            elif p.abs().max() == 0:                          # zero-initialised layers
                p.copy_(noise / p[0].numel() ** 0.5)
    return model.eval()


def torch_unet(config=TINY_UNET, seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return perturb_(UNet2DConditionModel(**config), seed)


def torch_vae(config=TINY_VAE, seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return perturb_(AutoencoderKL(**config), seed)


def torch_clip(config=TINY_CLIP, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return perturb_(CLIPTextModel(CLIPTextConfig(**config)), seed)


# ----------------------------------------------------------------------------- old Flax layout
def _flax_tree(state_dict: dict, *, join_indices: bool, vae_old_attention: bool, dtype) -> dict:
    tree: dict = {}
    for key, t in state_dict.items():
        if key.endswith("position_ids"):
            continue
        a = t.detach().float().numpy()
        if not join_indices and not key.startswith("text_model."):  # transformers 4 kept the prefix
            key = "text_model." + key
        parts = key.split(".")
        leaf = parts.pop()
        if vae_old_attention:  # diffusers' FlaxAttentionBlock names
            parts = [{"to_q": "query", "to_k": "key", "to_v": "value"}.get(p, p) for p in parts]
            joined = ".".join(parts).replace("to_out.0", "proj_attn")
            parts = joined.split(".")
        # list indices: diffusers joins them to the name ("down_blocks_0"), transformers nests them
        names: list[str] = []
        for p in parts:
            if p.isdigit() and join_indices:
                names[-1] = f"{names[-1]}_{p}"
            else:
                names.append(p)
        if leaf == "weight":
            if a.ndim == 4:
                leaf, a = "kernel", a.transpose(2, 3, 1, 0)
            elif a.ndim == 2 and "embedding" in names[-1]:
                leaf = "embedding"
            elif a.ndim == 2:
                leaf, a = "kernel", a.T
            else:
                leaf = "scale"
        node = tree
        for n in names:
            node = node.setdefault(n, {})
        node[leaf] = np.ascontiguousarray(a).astype(dtype)
    return tree


def save_flax_layout(model: torch.nn.Module, directory: Path, *, kind: str, dtype=np.float32) -> Path:
    """Write ``model`` as diffusers <= 0.39 / transformers 4.x ``save_pretrained`` wrote Flax models.

    The msgpack is streamed to the file array by array, byte-identical to
    ``flax.serialization.msgpack_serialize(tree)`` (sorted keys, flax's ndarray ext type; no SD
    array reaches flax's 1 GiB chunking threshold). ``msgpack_serialize`` holds the tree, the
    packer's growing buffer and the final bytes at once: ~14 GB for the SD v1.5 UNet next to its
    PyTorch model.
    """
    import msgpack
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tree = _flax_tree(model.state_dict(), join_indices=kind != "clip", vae_old_attention=kind == "vae",
                      dtype=dtype)
    name = "flax_model.msgpack" if kind == "clip" else "diffusion_flax_model.msgpack"
    packer = msgpack.Packer(use_bin_type=True)

    def write(node: dict, f) -> None:
        f.write(packer.pack_map_header(len(node)))
        for key, value in sorted(node.items()):  # flax's tree_map copy sorts dict keys
            f.write(packer.pack(key))
            if isinstance(value, dict):
                write(value, f)
            else:  # flax's ndarray ext type 1: (shape, dtype name, C-order bytes)
                payload = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True)
                f.write(packer.pack(msgpack.ExtType(1, payload)))

    with open(directory / name, "wb") as f:
        write(tree, f)
    if kind == "clip":
        cfg = model.config.to_dict()
    else:
        cfg = dict(model.config)
        cfg["_class_name"] = "Flax" + type(model).__name__
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, default=list))
    return directory / name


def save_torch_layout(model: torch.nn.Module, directory: Path, *, safe: bool = True,
                      old_vae_names: bool = False) -> Path:
    """``save_pretrained`` in the PyTorch layout; ``old_vae_names`` renames VAE attention to the
    pre-0.14 names (query/key/value/proj_attn) as old .bin checkpoints have them."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=safe)
    if old_vae_names:
        path = directory / "diffusion_pytorch_model.bin"
        sd = torch.load(path, weights_only=True) if path.exists() else model.state_dict()
        renamed = {}
        for k, v in sd.items():
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                k = re.sub(rf"\.{re.escape(new)}\.", f".{old}.", k)
            renamed[k] = v
        for f in directory.glob("diffusion_pytorch_model.*"):
            f.unlink()
        torch.save(renamed, directory / "diffusion_pytorch_model.bin")
        return directory / "diffusion_pytorch_model.bin"
    return next(directory.glob("*.safetensors" if safe else "*.bin"))


# ----------------------------------------------------------------------------- tokenizer
def jaxpr_equations(jaxpr):
    """Every equation of a jaxpr, nested ones (scan/jit/cond bodies) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from jaxpr_equations(sub)
