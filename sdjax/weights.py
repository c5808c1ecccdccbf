"""Reading and writing checkpoints: the one place for all renaming and transposing.

sdjax modules mirror diffusers/transformers attribute names, so a parameter's NNX path
``('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')`` names it in every layout:

* diffusers / transformers PyTorch: ``down_blocks.0.resnets.1.conv1.weight`` (OIHW convs, [out, in]
  linears), in ``*.safetensors`` or ``*.bin``;
* diffusers Flax msgpack: ``down_blocks_0/resnets_1/conv1/kernel`` (HWIO, [in, out] — already the
  NNX layout); transformers' Flax CLIP nests list indices instead: ``layers/0``.

Loading is strict (every key present, none unexpected, shapes equal) and streams tensor by tensor
into an abstract (never initialised) model, so peak host memory stays near one copy of the weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import nnx

from sdjax.images import atomic_write
from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig

DIFFUSERS_VERSION = "0.42.1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching the model."""


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """File names and naming quirks of one model kind."""
    model_cls: type
    config_cls: type
    flax_file: str
    torch_files: tuple[str, ...]          # in order of preference
    flax_joins_indices: bool              # diffusers: "down_blocks_0"; transformers: "layers/0"
    torch_aliases: tuple[tuple[str, str], ...] = ()   # old name -> current name (regex on the key)
    torch_ignored: tuple[str, ...] = ()   # buffers some writers save that carry no weights


UNET = LayoutSpec(UNet2DConditionModel, UNetConfig, "diffusion_flax_model.msgpack",
                  ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), True)
VAE = LayoutSpec(AutoencoderKL, VAEConfig, "diffusion_flax_model.msgpack",
                 ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), True,
                 torch_aliases=((r"\.attentions\.0\.query\.", ".attentions.0.to_q."),
                                (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
                                (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
                                (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0.")))
CLIP = LayoutSpec(CLIPTextModel, CLIPTextConfig, "flax_model.msgpack",
                  ("model.safetensors", "pytorch_model.bin"), False,
                  # transformers 5 writes CLIPTextModel keys without the "text_model." prefix of SD's files
                  torch_aliases=((r"^(?!text_model\.)", "text_model."),),
                  torch_ignored=(r"text_model\.embeddings\.position_ids",))
SPECS = {UNet2DConditionModel: UNET, AutoencoderKL: VAE, CLIPTextModel: CLIP}

_FLAX_ALIASES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}  # Flax VAE attention
_FLAX_NAMES = {new: old for old, new in _FLAX_ALIASES.items()}  # what diffusers' FlaxAutoencoderKL calls them


# ----------------------------------------------------------------------------- names
def torch_key(path: tuple) -> str:
    """NNX path -> PyTorch state-dict key."""
    *mods, leaf = path
    return ".".join([str(p) for p in mods] + ["bias" if leaf == "bias" else "weight"])


def flax_key(path: tuple, joins_indices: bool) -> str:
    """NNX path -> '/'-joined key of a Flax param tree."""
    parts: list[str] = []
    for p in path:
        if isinstance(p, int) and joins_indices:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(str(p))
    return "/".join(parts)


def to_nnx_layout(array: np.ndarray, path: tuple, target_shape: tuple) -> np.ndarray:
    """PyTorch tensor -> NNX layout: OIHW convs -> HWIO, [out, in] linears -> [in, out]."""
    if path[-1] != "kernel":
        return array
    if array.ndim == 4 and len(target_shape) == 2:  # a linear stored as a 1x1 conv (old VAE attention)
        array = array[:, :, 0, 0]
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2 and len(target_shape) == 4:  # a 1x1 conv stored as a linear
        return array.T[None, None]
    return array.T


def to_torch_layout(array: np.ndarray, path: tuple) -> np.ndarray:
    if path[-1] != "kernel":
        return array
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T


# ----------------------------------------------------------------------------- readers
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Read a safetensors file tensor by tensor with plain reads, in file order.

    Not ``safe_open``: it memory-maps the file, and the mapped pages it touches count as the
    process's resident memory until the file is closed, so loading the 3.4 GB UNet that way
    peaks at ~1.75x the weights (measured); read one tensor at a time, the peak stays ~1x.
    """
    size = path.stat().st_size

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("shorter than its 8-byte header length")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise corrupt(f"header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"bad JSON header: {e}") from e
        if not isinstance(header, dict):
            raise corrupt("the header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        try:
            entries = sorted(((info["data_offsets"][0], info["data_offsets"][1], key, info["dtype"],
                               tuple(info["shape"])) for key, info in header.items()))
        except (KeyError, TypeError, IndexError) as e:
            raise corrupt(f"malformed header entry ({e!r})") from e
        for start, end, key, dtype_name, shape in entries:
            if dtype_name not in _SAFETENSORS_DTYPES:
                raise corrupt(f"key {key!r} has unsupported dtype {dtype_name}")
            array = np.empty(shape, _SAFETENSORS_DTYPES[dtype_name])
            if end - start != array.nbytes or data_start + end > size:
                raise corrupt(f"key {key!r}: byte range [{start}, {end}) does not fit shape {shape} "
                              f"{dtype_name} in a file of {size} bytes (truncated?)")
            f.seek(data_start + start)
            if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                raise corrupt(f"key {key!r}: unexpected end of file (truncated?)")
            yield key, array


def _read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading PyTorch .bin files needs torch (pip install torch), "
                              "or convert the checkpoint to .safetensors") from e
    try:
        # Not mmap=True: the mapped file stays resident next to the converted arrays (measured on the
        # SD v1.5 UNet: peak 2.06x the file, still 2.06x after loading; without mmap 1.09x).
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    for key in list(state):
        t = state.pop(key)
        yield key, (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _decode_flax_array(code: int, data: bytes):
    """Flax msgpack ext types: 1 = ndarray (shape, dtype name, bytes), 2 = numpy scalar."""
    if code == 1:
        shape, dtype_name, buf = msgpack.unpackb(data)
        return np.frombuffer(buf, dtype=jnp.dtype(dtype_name)).reshape(shape)
    if code == 2:
        dtype_name, buf = msgpack.unpackb(data)
        return np.frombuffer(buf, dtype=jnp.dtype(dtype_name))[0]
    return msgpack.ExtType(code, data)


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flatten(v, key)
        else:
            yield key, v


def _read_flax_msgpack(path: Path, convert: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    """Stream a flax.serialization msgpack file; each array is converted as soon as it is parsed
    (``convert``), so the file is never held twice in memory."""
    size = path.stat().st_size

    def hook(code, data):
        value = _decode_flax_array(code, data)
        return convert(value) if isinstance(value, np.ndarray) else value

    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, ext_hook=hook, read_size=1 << 22, max_buffer_size=0,
                                        strict_map_key=False)
            tree = unpacker.unpack()
            if f.tell() != size or unpacker.tell() != size:
                raise CheckpointError(f"{path}: trailing bytes after the msgpack tree (corrupt file)")
    except CheckpointError:
        raise
    except Exception as e:  # OutOfData for truncated files, ExtraData, ValueError...
        raise CheckpointError(f"{path}: not a readable Flax msgpack file ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: the msgpack file does not hold a parameter tree")
    if set(tree) == {"params"}:  # some writers save {"params": tree}
        tree = tree["params"]
    return dict(_flatten(tree))


# ----------------------------------------------------------------------------- strict fill
class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` when the model is only traced for its shapes: every stream
    (``rngs.params()``...) returns the same key and updates no counter.

    With a real ``nnx.Rngs`` each key draw bumps an ``RngCount`` variable, and under
    ``eval_shape`` flax 0.12 then asks the traced count for its ``sharding``; jax builds the
    AttributeError's message by walking the whole trace so far, so building the abstract SD v1.5
    UNet is quadratic: ~7 s (16 s under a profiler) instead of ~0.8 s.
    """

    def __getattr__(self, stream: str):
        if stream.startswith("_"):
            raise AttributeError(stream)
        return lambda: jax.random.key(0)


def abstract_model(model_cls, config, **kwargs):
    """(graphdef, abstract state) of ``model_cls(config, **kwargs)`` without computing any weights."""
    model = nnx.eval_shape(lambda: model_cls(config, rngs=_ShapeOnlyRngs(), **kwargs))
    return nnx.split(model)


def _check_complete(file: Path, names: dict[tuple, str], loaded: dict[tuple, Any], unexpected: list[str]) -> None:
    missing = [names[path] for path in names if path not in loaded]
    if missing or unexpected:
        lines = [f"{file}: the checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def load_weights(model_cls, config, file: str | os.PathLike, *, dtype=jnp.float32):
    """Build ``model_cls(config)`` with the weights in ``file`` (any supported layout), strictly.

    Every model parameter must be in the file with the right shape and nothing else may be;
    otherwise a `CheckpointError` names the file, the keys and the shapes.
    """
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such checkpoint file")
    dtype = resolve_dtype(dtype)
    spec = SPECS[model_cls]
    graphdef, state = abstract_model(model_cls, config, dtype=dtype)
    expected = {path: var.get_value() for path, var in nnx.to_flat_state(state)}  # path -> ShapeDtypeStruct
    is_flax = file.suffix == ".msgpack"
    names = {path: flax_key(path, spec.flax_joins_indices) if is_flax else torch_key(path) for path in expected}
    by_name = {name: path for path, name in names.items()}
    loaded: dict[tuple, Any] = {}
    unexpected: list[str] = []

    def place(name: str, array: np.ndarray, converted: bool):
        path = by_name.get(name)
        if path is None:
            unexpected.append(name)
            return
        target = expected[path]
        if not converted:
            array = to_nnx_layout(array, path, target.shape)
        if tuple(array.shape) != tuple(target.shape):
            raise CheckpointError(f"{file}: key {name!r} has shape {tuple(array.shape)} "
                                  f"(in sdjax layout), the model expects {tuple(target.shape)}")
        loaded[path] = jnp.asarray(array, dtype=dtype)

    if is_flax:
        def convert(a: np.ndarray):
            if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
                raise CheckpointError(f"{file}: an array of dtype {a.dtype} where float weights were expected")
            return jnp.asarray(a, dtype=dtype)  # cast per array, while streaming
        for name, value in _read_flax_msgpack(file, convert).items():
            parts = name.split("/")
            parts = [_FLAX_ALIASES.get(p, p) if model_cls is AutoencoderKL else p for p in parts]
            place("/".join(parts), value, converted=True)
    else:
        reader = _read_safetensors if file.suffix == ".safetensors" else _read_torch_bin
        for name, array in reader(file):
            if any(re.fullmatch(pat, name) for pat in spec.torch_ignored):
                continue
            for old, new in spec.torch_aliases:
                name = re.sub(old, new, name)
            place(name, array, converted=False)
    _check_complete(file, names, loaded, unexpected)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(loaded[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------- dtypes
_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype) -> Any:
    """'bfloat16' / 'bf16' / jnp.bfloat16 / ... -> a JAX float dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}") from e
    if dt not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"unsupported dtype {dt}: use float32, bfloat16 or float16")
    return dt.type


# ----------------------------------------------------------------------------- configs
def read_json_object(path: Path, missing: str) -> dict:
    """A JSON settings file (config.json, scheduler_config.json); ``missing``: the error if absent."""
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got a {type(raw).__name__}")
    return raw


def read_config(model_dir: Path, model_cls):
    path = model_dir / "config.json"
    raw = read_json_object(path, f"{model_dir}: no config.json (is this a diffusers model folder?)")
    try:
        return SPECS[model_cls].config_cls.from_dict(raw), raw
    except (TypeError, ValueError, KeyError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: not a config sdjax can build a {model_cls.__name__} from: "
                              f"{type(e).__name__}: {e}") from e


def config_to_dict(config) -> dict[str, Any]:
    """Our config dataclass -> the config.json diffusers / transformers expect."""
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    if isinstance(config, UNetConfig):
        heads = d.pop("num_attention_heads")
        # diffusers' SD configs name the head count "attention_head_dim" (a historical quirk).
        return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
                **d, "attention_head_dim": heads, "act_fn": "silu", "mid_block_scale_factor": 1,
                "resnet_time_scale_shift": "default", "only_cross_attention": False,
                "dual_cross_attention": False}
    if isinstance(config, VAEConfig):
        n = len(config.block_out_channels)
        return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **d,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "act_fn": "silu"}
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **d,
            "bos_token_id": 0, "pad_token_id": 1, "projection_dim": d["hidden_size"]}


# ----------------------------------------------------------------------------- locating files
def with_variant(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _weight_candidates(model_cls, variant: str | None) -> list[str]:
    spec = SPECS[model_cls]
    return [with_variant(n, variant) for n in (spec.torch_files[0], spec.flax_file, spec.torch_files[1])]


def has_weights(model_dir: Path, model_cls, variant: str | None = None) -> bool:
    """Whether a model folder holds a weights file `weight_file` would pick."""
    return any((model_dir / name).is_file() for name in _weight_candidates(model_cls, variant))


def weight_file(model_dir: Path, model_cls, *, prefer: str | None = None, variant: str | None = None) -> Path:
    """Pick the weights file in a model folder: safetensors, then Flax msgpack, then .bin
    (``prefer='flax'`` puts msgpack first)."""
    candidates = _weight_candidates(model_cls, variant)
    if prefer == "flax":
        candidates.insert(0, candidates.pop(1))
    elif prefer not in (None, "pytorch"):
        raise ValueError(f"unknown weights format {prefer!r}: use 'flax' or 'pytorch'")
    for name in candidates:
        if (model_dir / name).is_file():
            return model_dir / name
    found = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".safetensors", ".msgpack", ".bin"))
    variants = sorted({name.split(".")[-2] for name in found if name.count(".") >= 2})
    hint = (f"; the folder has {', '.join(found)}" if found else "") + (
        f" (load a variant with variant={variants[0]!r}, sample.py --variant {variants[0]})" if variants else "")
    if any(model_dir.glob("*.index.json")):
        hint += ("; sharded checkpoints (*.index.json) are not supported: re-save them unsharded, e.g. with "
                 "diffusers' save_pretrained(dir, max_shard_size='20GB')")
    raise CheckpointError(f"{model_dir}: no weights file; expected one of {', '.join(candidates)}{hint}")


def hub_files(model_cls, format: str | None = None, variant: str | None = None) -> list[str]:
    """The files of one model folder that sdjax reads from a Hub repo: its config and one weights
    file (safetensors, or msgpack with ``format="flax"``; see `fetch_missing_bin_weights`)."""
    spec = SPECS[model_cls]
    return ["config.json", with_variant(spec.flax_file if format == "flax" else spec.torch_files[0], variant)]


def fetch_missing_bin_weights(path_or_repo_id, revision: str | None, root: Path, folders: dict,
                              variant: str | None = None) -> None:
    """After a Hub download of configs and safetensors into ``root``: fetch, in one more request,
    the PyTorch .bin weights of the model folders (``folders``: subfolder or None -> model class)
    that came with a config but no weights file (older repos have only .bin). Nothing for a local
    folder."""
    if Path(path_or_repo_id).expanduser().is_dir():
        return
    wanted = []
    for sub, model_cls in folders.items():
        folder = root / sub if sub else root
        if folder.is_dir() and not has_weights(folder, model_cls, variant):
            name = with_variant(SPECS[model_cls].torch_files[1], variant)
            wanted.append(f"{sub}/{name}" if sub else name)
    if wanted:
        resolve_model_dir(path_or_repo_id, None, revision, allow_patterns=wanted)


def _is_local_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or (os.path.sep in text and not re.fullmatch(r"[\w.-]+/[\w.-]+", text))


def resolve_model_dir(path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                      revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a Hub repo id downloaded with huggingface_hub (cached)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        out = local / subfolder if subfolder else local
        if not out.is_dir():
            raise CheckpointError(f"{local}: no {subfolder}/ folder in this model directory")
        return out
    if local.is_file():
        raise CheckpointError(
            f"{path_or_repo_id}: is a file; sdjax loads a diffusers pipeline folder (model_index.json, unet/, "
            "vae/, text_encoder/, tokenizer/, scheduler/) or a Hub repo id. A single-file checkpoint converts "
            "with diffusers: StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)")
    if _is_local_path(str(path_or_repo_id)):
        raise CheckpointError(f"{path_or_repo_id}: no such directory")
    from huggingface_hub import snapshot_download
    patterns = allow_patterns or ["*.json", "*.txt", "*.safetensors"]
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns] + ["model_index.json"]
    try:
        root = Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=patterns))
    except Exception as e:
        # The command that fetches just these files (the whole SD v1.5 repo is ~20 GB more).
        command = " ".join(["hf download", shlex.quote(str(path_or_repo_id)),
                            *([f"--revision {shlex.quote(revision)}"] if revision else []),
                            *[f"--include {shlex.quote(p)}" for p in patterns], "--local-dir DIR"])
        raise CheckpointError(
            f"could not get {path_or_repo_id!r} (revision {revision!r}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Without network access here, "
            f"download the files sdjax reads where there is (`{command}`) and pass DIR instead.") from e
    out = root / subfolder if subfolder else root
    if not out.is_dir():
        raise CheckpointError(f"{path_or_repo_id}: the repo has no {subfolder}/ folder")
    return out


def from_pretrained(model_cls, path_or_repo_id, *, subfolder=None, revision=None, dtype=jnp.float32,
                    format: str | None = None, variant: str | None = None):
    """Load a model from a diffusers/transformers folder (any layout) or a Hub repo id (safetensors,
    or msgpack with ``format="flax"``; .bin where the repo has no safetensors)."""
    flax = format == "flax" or revision in ("flax", "bf16")
    patterns = hub_files(model_cls, "flax" if flax else None, variant)
    model_dir = resolve_model_dir(path_or_repo_id, subfolder, revision, allow_patterns=patterns)
    if not flax:
        fetch_missing_bin_weights(path_or_repo_id, revision, model_dir.parent if subfolder else model_dir,
                                  {subfolder: model_cls}, variant)
    config, _ = read_config(model_dir, model_cls)
    prefer = format or ("flax" if revision in ("flax", "bf16") else None)
    return load_weights(model_cls, config, weight_file(model_dir, model_cls, prefer=prefer, variant=variant),
                        dtype=dtype)


# ----------------------------------------------------------------------------- writers
def _numpy_params(model, dtype=None) -> dict[tuple, np.ndarray]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = np.asarray(jax.device_get(var.get_value()))
        out[path] = a.astype(resolve_dtype(dtype)) if dtype is not None else a
    return out


def save_pretrained(model, directory: str | os.PathLike, *, format: str = "both", dtype=None) -> Path:
    """Write ``config.json`` and the weights: ``format`` = 'pytorch' (safetensors), 'flax' (msgpack)
    or 'both'. ``dtype`` casts the saved weights (default: as held)."""
    from safetensors.numpy import save_file
    if format not in ("pytorch", "flax", "both"):
        raise ValueError(f"unknown format {format!r}: use 'pytorch', 'flax' or 'both'")
    spec = SPECS[type(model)]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = _numpy_params(model, dtype)
    config = config_to_dict(model.config)
    if spec is CLIP:
        config["torch_dtype"] = str(np.dtype(next(iter(params.values())).dtype))
    if format in ("pytorch", "both"):
        tensors = {torch_key(p): np.ascontiguousarray(to_torch_layout(a, p)) for p, a in params.items()}
        atomic_write(directory / spec.torch_files[0],
                      lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    if format in ("flax", "both"):
        from flax.serialization import msgpack_serialize
        tree: dict = {}
        for p, a in params.items():
            node = tree
            *parents, leaf = flax_key(p, spec.flax_joins_indices).split("/")
            if spec is VAE:
                parents = [_FLAX_NAMES.get(part, part) for part in parents]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = a
        atomic_write(directory / spec.flax_file, lambda tmp: tmp.write_bytes(msgpack_serialize(tree)))
    atomic_write(directory / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


PIPELINE_PARTS = {  # folder -> (library, PyTorch class, old Flax class)
    "text_encoder": ("transformers", "CLIPTextModel", "FlaxCLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer", "CLIPTokenizer"),
    "unet": ("diffusers", "UNet2DConditionModel", "FlaxUNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL", "FlaxAutoencoderKL"),
}


def save_pipeline(directory: str | os.PathLike, *, text_encoder, tokenizer, unet, vae, scheduler_config: dict,
                  format: str = "both", dtype=None, overwrite: bool = False) -> Path:
    """Write a complete diffusers pipeline folder (model_index.json, scheduler, tokenizer and the
    three models) that ``StableDiffusion.from_pretrained`` and diffusers' PyTorch
    ``StableDiffusionPipeline.from_pretrained`` both load.

    The folder is assembled under a temporary name and renamed into place at the end, so an
    interrupted save never leaves a half-written pipeline.
    """
    import shutil
    import tempfile
    directory = Path(directory)
    if directory.exists() and not overwrite and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace it)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        flax_names = format == "flax"
        index = {"_class_name": "FlaxStableDiffusionPipeline" if flax_names else "StableDiffusionPipeline",
                 "_diffusers_version": DIFFUSERS_VERSION,
                 "feature_extractor": [None, None], "safety_checker": [None, None],
                 "requires_safety_checker": False}
        for part, (lib, torch_cls, flax_cls) in PIPELINE_PARTS.items():
            index[part] = [lib, flax_cls if flax_names else torch_cls]
        scheduler = dict(scheduler_config)
        scheduler_cls = scheduler.get("_class_name", "PNDMScheduler").removeprefix("Flax")
        scheduler["_class_name"] = ("Flax" + scheduler_cls) if flax_names else scheduler_cls
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for part, model in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
            save_pretrained(model, tmp / part, format=format, dtype=dtype)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old)  # onto the empty folder just made
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
