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

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import nnx

from sdjax.images import atomic_write, atomic_write_all, umask
from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel
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

    def torch_name(self, name: str) -> str | None:
        """A PyTorch key under its current name, or None for a buffer that carries no weights."""
        if any(re.fullmatch(pat, name) for pat in self.torch_ignored):
            return None
        for old, new in self.torch_aliases:
            name = re.sub(old, new, name)
        return name


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
                  torch_ignored=(r"(text_model\.)?embeddings\.position_ids",))
CONTROLNET = LayoutSpec(ControlNetModel, ControlNetConfig, "diffusion_flax_model.msgpack",
                        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), True)
SPECS = {UNet2DConditionModel: UNET, AutoencoderKL: VAE, CLIPTextModel: CLIP, ControlNetModel: CONTROLNET}

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
    if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):  # a linear stored as a 1x1 conv
        array = array[:, :, 0, 0]                                                # (old VAE attention)
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2 and len(target_shape) == 4:  # a 1x1 conv stored as a linear
        return array.T[None, None]
    return array.T


def to_torch_layout(array: np.ndarray, path: tuple) -> np.ndarray:
    """An sdjax weight at ``path`` in PyTorch's layout: a conv kernel HWIO -> OIHW, a linear one
    transposed; anything else as it is (the inverse of loading's conversion)."""
    if path[-1] != "kernel":
        return array
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T


# ----------------------------------------------------------------------------- readers
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _what_else(path: Path) -> str | None:
    """What a file that should hold weights holds instead, when its first bytes give it away."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(b"version https://git-lfs"):
        return ("a Git LFS pointer, not the weights: fetch them with `git lfs pull` in the clone "
                "(or download the file itself)")
    if head.lstrip()[:1] == b"<" and (b"<html" in head.lower() or b"<!doctype" in head.lower()):
        return "an HTML page, not the weights: a download that saved a web page? Use the file's download link"
    torch_file = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"   # torch.save: a zip, or an old pickle
    if path.suffix == ".safetensors" and torch_file:
        # (.bin: what a model folder looks for, and a single file takes too; transformers': pytorch_model.bin)
        text_encoder = path.name == "model.safetensors" and path.parent.name == "text_encoder"
        name = "pytorch_model.bin" if text_encoder else path.with_suffix(".bin").name
        return f"a PyTorch checkpoint (torch.save) named .safetensors: rename it to {name}"
    if path.suffix != ".safetensors" and len(head) > 9 and head[8:10] == b'{"' and \
            int.from_bytes(head[:8], "little") < path.stat().st_size:
        return f"a safetensors file named {path.suffix}: rename it to .safetensors"
    return None


def _safetensors_corrupt(path: Path, why: str) -> CheckpointError:
    if (instead := _what_else(path)) is not None:
        return CheckpointError(f"{path}: {instead}")
    return CheckpointError(f"{path}: not a readable safetensors file ({why})")


def _safetensors_header(f, path: Path, size: int, *, keep_metadata: bool = False) -> tuple[dict, int]:
    """(the JSON header without its metadata, unless ``keep_metadata``, the offset where the data
    starts) of an open file."""
    head = f.read(8)
    if len(head) < 8:
        raise _safetensors_corrupt(path, "shorter than its 8-byte header length")
    header_len = int.from_bytes(head, "little")
    if header_len > size - 8:
        raise _safetensors_corrupt(path, f"header length {header_len} exceeds the file size {size}")
    try:
        header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _safetensors_corrupt(path, f"bad JSON header: {e}") from e
    if not isinstance(header, dict):
        raise _safetensors_corrupt(path, "the header is not a JSON object")
    if not keep_metadata:
        header.pop("__metadata__", None)
    return header, 8 + header_len


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    return list(safetensors_shapes(path))


def safetensors_shapes(path: Path) -> dict[str, tuple | None]:
    """The tensors of a safetensors file and their shapes (None where the header gives none that
    reads as one; reading the tensor names it), from its header alone."""
    with open(path, "rb") as f:
        header = _safetensors_header(f, path, path.stat().st_size)[0]
    shape = lambda info: info.get("shape") if isinstance(info, dict) else None  # noqa: E731
    return {key: tuple(shape(info)) if isinstance(shape(info), list) else None for key, info in header.items()}


def _read_safetensors(path: Path, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Read a safetensors file tensor by tensor with plain reads, in file order; with ``wanted``,
    only the keys it accepts (the others are not read: a single file's EMA copy, 3.4 GB).

    Not ``safe_open``: it memory-maps the file, and the mapped pages it touches count as the
    process's resident memory until the file is closed, so loading the 3.4 GB UNet that way
    peaks at ~1.75x the weights (measured); read one tensor at a time, the peak stays ~1x.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_start = _safetensors_header(f, path, size)
        try:
            entries = sorted(((info["data_offsets"][0], info["data_offsets"][1], key, info["dtype"],
                               tuple(info["shape"])) for key, info in header.items()))
        except (KeyError, TypeError, IndexError) as e:
            raise _safetensors_corrupt(path, f"malformed header entry ({e!r})") from e
        for start, end, key, dtype_name, shape in entries:
            if dtype_name not in _SAFETENSORS_DTYPES:
                raise _safetensors_corrupt(path, f"key {key!r} has unsupported dtype {dtype_name}")
            if not all(type(n) is int and n >= 0 for n in shape):
                raise _safetensors_corrupt(path, f"key {key!r} has shape {list(shape)}, not a list of sizes")
            if not (type(start) is int and type(end) is int and 0 <= start <= end):
                raise _safetensors_corrupt(path, f"key {key!r} has data_offsets [{start!r}, {end!r}]")
            dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
            # Check the byte range before allocating: a corrupt shape could ask for petabytes.
            if end - start != math.prod(shape) * dtype.itemsize or data_start + end > size:
                raise _safetensors_corrupt(path, f"key {key!r}: byte range [{start}, {end}) does not fit shape "
                                           f"{shape} {dtype_name} in a file of {size} bytes (truncated?)")
            if wanted is not None and not wanted(key):
                continue
            array = np.empty(shape, dtype)
            f.seek(data_start + start)
            if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                raise _safetensors_corrupt(path, f"key {key!r}: unexpected end of file (truncated?)")
            yield key, array


def _torch_load(path: Path, allow: Iterable[str] = ()) -> Any:
    """``torch.load`` of a PyTorch checkpoint, tensors and plain containers only (``weights_only``),
    and the torch classes named in ``allow`` (``"nn.ParameterDict"``: ``torch.nn.ParameterDict``);
    a `CheckpointError` naming the file and why otherwise."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading PyTorch checkpoints (.bin, .ckpt) needs torch (pip install torch), "
                              "or convert the checkpoint to .safetensors") from e
    try:
        # Not mmap=True: the mapped file stays resident next to the converted arrays (measured on the
        # SD v1.5 UNet: peak 2.06x the file, still 2.06x after loading; without mmap 1.09x).
        classes = []
        for name in allow:
            found: Any = torch
            for part in name.split("."):
                found = getattr(found, part)
            classes.append(found)
        with torch.serialization.safe_globals(classes):
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:
        if (instead := _what_else(path)) is not None:
            raise CheckpointError(f"{path}: {instead}") from e
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):  # other objects (a callback's state)
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors ({found[1]}), which sdjax does not unpickle. If you "
                "trust the file, convert it to safetensors: python -c \"import sys, torch; from safetensors.torch "
                "import save_file; sd = torch.load(sys.argv[1], weights_only=False); sd = sd.get('state_dict', sd); "
                "save_file({k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
                "sys.argv[2])\" "
                "IN.ckpt OUT.safetensors") from e
        reason = str(e) or type(e).__name__
        if path.is_file() and path.stat().st_size == 0:
            reason = "an empty file, 0 bytes: an interrupted download or copy?"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from e
    return state


def _torch_state_dict(path: Path) -> dict:
    """The state dict of a PyTorch checkpoint (a training checkpoint's ``state_dict``), as
    `_torch_load` reads it: the tensors and whatever else it holds beside them."""
    state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint (.ckpt): the weights and other things
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    yield from _torch_tensors(_torch_state_dict(path))


def _torch_tensors(state: dict) -> Iterator[tuple[str, np.ndarray]]:
    """A state dict's tensors as numpy arrays, each dropped from ``state`` as it is given (so the
    checkpoint is not held twice); other values (a step count) skipped."""
    import torch
    for key in list(state):
        t = state.pop(key)
        if not isinstance(t, torch.Tensor):  # e.g. a training step count next to the weights
            continue
        t = t.detach()  # a saved nn.Parameter (state_dict(keep_vars=True)) requires grad
        yield key, (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _decode_flax_array(code: int, data: bytes):
    """Flax msgpack ext types: 1 = ndarray (shape, dtype name, bytes), 2 = Python complex (real,
    imag), 3 = numpy scalar (as an ndarray of shape ())."""
    if code in (1, 3):
        shape, dtype_name, buf = msgpack.unpackb(data)
        array = np.frombuffer(buf, dtype=jnp.dtype(dtype_name)).reshape(shape)
        return array if code == 1 else array[()]
    if code == 2:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
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
        if (instead := _what_else(path)) is not None:
            raise CheckpointError(f"{path}: {instead}") from e
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


class _StrictFill:
    """Collects one model's weights from a file's tensors, strictly: every parameter must arrive
    once with the model's shape, and names that match none are kept to report."""

    def __init__(self, model_cls, config, file: Path, dtype, *, flax: bool = False, label: str = "the model"):
        self.file, self.dtype, self.label = file, dtype, label
        self.graphdef, self.state = abstract_model(model_cls, config, dtype=dtype)
        self.expected = {path: var.get_value() for path, var in nnx.to_flat_state(self.state)}
        joins = SPECS[model_cls].flax_joins_indices
        self.names = {path: flax_key(path, joins) if flax else torch_key(path) for path in self.expected}
        self.by_name = {name: path for path, name in self.names.items()}
        self.loaded: dict[tuple, Any] = {}
        self.source: dict[tuple, str] = {}  # path -> the file's name for the tensor placed there
        self.unexpected: list[str] = []

    def place(self, name: str, array, *, converted: bool = False, shown_as: str | None = None) -> None:
        """Put tensor ``name`` (torch layout unless ``converted``) in place; ``shown_as``: the
        file's own name for it, for messages."""
        path = self.by_name.get(name)
        if path is None:
            self.unexpected.append(shown_as or name)
            return
        shown = shown_as or name
        if path in self.loaded:  # e.g. a VAE attention weight under its old and its new name
            raise CheckpointError(f"{self.file}: keys {self.source[path]!r} and {shown!r} are the same weight "
                                  f"of {self.label}; a checkpoint must hold it once")
        if not hasattr(array, "dtype"):   # a corrupt msgpack can hold a number or a list there
            raise CheckpointError(f"{self.file}: key {shown!r} holds a {type(array).__name__}, not an array")
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise CheckpointError(f"{self.file}: key {shown!r} has dtype {array.dtype}; weights are floats")
        target = self.expected[path]
        stored = tuple(array.shape)
        if not converted:
            array = to_nnx_layout(array, path, target.shape)
        if tuple(array.shape) != tuple(target.shape):
            expected = (target.shape if converted   # as the file holds it
                        else to_torch_layout(np.empty(target.shape, np.int8), path).shape)
            extra = ""
            if path == ("conv_in", "kernel") and array.ndim == 4 and array.shape[2] != target.shape[2]:
                extra = (f": weights of a UNet that takes {array.shape[2]} input channels, where the config's takes "
                         f"{target.shape[2]} (in_channels)")
            raise CheckpointError(f"{self.file}: key {shown!r} has shape {stored}, the model expects "
                                  f"{tuple(expected)}{extra}")
        self.loaded[path] = jnp.asarray(array, dtype=self.dtype)
        self.source[path] = shown

    def check(self, shown_name: Callable[[str], str] = lambda name: name) -> None:
        """Raise `CheckpointError` listing the missing and unexpected keys, if any."""
        missing = [shown_name(self.names[path]) for path in self.names if path not in self.loaded]
        if missing or self.unexpected:
            lines = [f"{self.file}: the checkpoint does not match {self.label}"]
            for what, keys in (("missing", missing), ("unexpected", self.unexpected)):
                if keys:
                    lines.append(f"  {what} keys ({len(keys)}): " + ", ".join(keys[:20])
                                 + (" ..." if len(keys) > 20 else ""))
            raise CheckpointError("\n".join(lines))

    def model(self):
        flat = nnx.to_flat_state(self.state)
        for path, var in flat:
            var.set_value(self.loaded[path])
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))


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
    is_flax = file.suffix == ".msgpack"
    fill = _StrictFill(model_cls, config, file, dtype, flax=is_flax)
    shards = _shard_files(file) if is_shard_index(file) else [file]
    if is_flax:
        def convert(a: np.ndarray):
            if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
                raise CheckpointError(f"{file}: an array of dtype {a.dtype} where float weights were expected")
            return jnp.asarray(a, dtype=dtype)  # cast per array, while streaming
        for name, value in _read_flax_msgpack(file, convert).items():
            parts = name.split("/")
            parts = [_FLAX_ALIASES.get(p, p) if model_cls is AutoencoderKL else p for p in parts]
            fill.place("/".join(parts), value, converted=True)
    else:
        for shard in shards:
            fill.file = shard  # messages about a tensor name the file that holds it
            reader = _read_safetensors if shard.suffix == ".safetensors" else _read_torch_bin
            _place_torch_names(fill, spec, reader(shard))
        fill.file = file
    fill.check()
    return fill.model()


def _place_torch_names(fill: _StrictFill, spec: LayoutSpec, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Put a diffusers/transformers PyTorch file's ``tensors`` in place (names the model skips, such
    as CLIP's position_ids, left out)."""
    for key, array in tensors:
        if (name := spec.torch_name(key)) is not None:
            fill.place(name, array, shown_as=key)


def is_shard_index(file: Path) -> bool:
    """``diffusion_pytorch_model.safetensors.index.json`` (``.index.fp16.json`` for a variant):
    the weight map of a checkpoint saved in shards."""
    return file.suffix == ".json" and ".index." in file.name


def _shard_files(index: Path) -> list[Path]:
    """The shard files an index names, in the index's order; each must be next to it."""
    raw = read_json_object(index, f"{index}: no such file")
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and "/" not in v and "\\" not in v for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a shard index (expected a 'weight_map' of tensor name -> file name)")
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    if missing := [p.name for p in shards if not p.is_file()]:
        raise CheckpointError(f"{index}: shard files missing next to it: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return shards


# ----------------------------------------------------------------------------- dtypes
DTYPE_NAMES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
               "float16": jnp.float16, "fp16": jnp.float16}   # what resolve_dtype takes by name


def resolve_dtype(dtype) -> Any:
    """'bfloat16' / 'bf16' / jnp.bfloat16 / ... -> a JAX float dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPE_NAMES)}") from e
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
    """(``model_cls``'s config, the raw dict) from ``model_dir/config.json``; a CheckpointError
    naming the file when it is missing or describes a model sdjax cannot build."""
    path = model_dir / "config.json"
    part = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}.get(
        model_cls.__name__)
    hint = (f"a pipeline folder: its model is in {part}/, from_pretrained(..., subfolder={part!r})"
            if part and (model_dir / "model_index.json").is_file() and (model_dir / part).is_dir()
            else "is this a diffusers model folder?")
    raw = read_json_object(path, f"{model_dir}: no config.json ({hint})")
    try:
        return SPECS[model_cls].config_cls.from_dict(raw), raw
    except (TypeError, ValueError, KeyError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: not a config sdjax can build a {model_cls.__name__} from: "
                              f"{type(e).__name__}: {e}") from e


def config_to_dict(config) -> dict[str, Any]:
    """Our config dataclass -> the config.json diffusers / transformers expect."""
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    if isinstance(config, ControlNetConfig):   # (no up blocks, no output: the UNet's it steers)
        unet = config_to_dict(UNetConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(UNetConfig)}))
        return {**{k: v for k, v in unet.items() if k not in ("up_block_types", "out_channels")},
                "_class_name": "ControlNetModel", "conditioning_channels": d["conditioning_channels"],
                "conditioning_embedding_out_channels": d["conditioning_embedding_out_channels"],
                "controlnet_conditioning_channel_order": d["controlnet_conditioning_channel_order"],
                "global_pool_conditions": False}
    if isinstance(config, UNetConfig):
        # One value for every block is written as that value, as SD v1.5's own config has it: diffusers
        # code that reads these (ControlNetModel.from_unet, IP-Adapter loading) takes the scalar form.
        for key in ("cross_attention_dim", "num_attention_heads", "transformer_layers_per_block"):
            if len(set(d[key])) == 1:
                d[key] = d[key][0]
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


def shard_index_name(weights_name: str, variant: str | None = None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.safetensors.index.json``
    (``....index.fp16.json`` for variant fp16, as diffusers and transformers name it)."""
    return with_variant(f"{weights_name}.index.json", variant)


def shard_pattern(weights_name: str, variant: str | None = None) -> str:
    """The glob of the shards: ``diffusion_pytorch_model-*-of-*.safetensors``
    (``diffusion_pytorch_model.fp16-*-of-*.safetensors`` for variant fp16)."""
    stem, ext = with_variant(weights_name, variant).rsplit(".", 1)
    return f"{stem}-*-of-*.{ext}"


def _weight_candidates(model_cls, variant: str | None) -> list[str]:
    """The weights files of a model folder, in the order they are looked for. A shard index comes
    before the unsharded file of its format (as diffusers loads it), so a file left by an older
    save next to newer shards is never picked."""
    spec = SPECS[model_cls]
    safetensors, bin_ = spec.torch_files
    return [shard_index_name(safetensors, variant), with_variant(safetensors, variant),
            with_variant(spec.flax_file, variant), shard_index_name(bin_, variant), with_variant(bin_, variant)]


def has_weights(model_dir: Path, model_cls, variant: str | None = None) -> bool:
    """Whether a model folder holds a weights file `weight_file` would pick."""
    return any((model_dir / name).is_file() for name in _weight_candidates(model_cls, variant))


def weight_file(model_dir: Path, model_cls, *, prefer: str | None = None, variant: str | None = None) -> Path:
    """Pick the weights file in a model folder: safetensors (a shard index first), then Flax
    msgpack, then .bin (a shard index first); ``prefer='flax'`` puts msgpack first,
    ``prefer='pytorch'`` last."""
    candidates = _weight_candidates(model_cls, variant)
    flax_file = candidates.pop(2)
    if prefer == "flax":
        candidates.insert(0, flax_file)
    elif prefer == "pytorch":
        candidates.append(flax_file)
    elif prefer is None:
        candidates.insert(2, flax_file)
    else:
        raise ValueError(f"unknown weights format {prefer!r}: use 'flax' or 'pytorch'")
    for name in candidates:
        if (model_dir / name).is_file():
            return model_dir / name
    if folders := [name for name in candidates if (model_dir / name).is_dir()]:
        raise CheckpointError(f"{model_dir / folders[0]} is a folder, not a weights file")
    # Shards as one entry ("...-00001-of-00106.safetensors" for 106 names), variants from the names.
    found = sorted({re.sub(r"-\d+-of-(\d+)\.", r"-NNNNN-of-\1.", p.name) for p in model_dir.iterdir()
                    if p.suffix in (".safetensors", ".msgpack", ".bin") or is_shard_index(p)})
    variants = sorted({m[1] for name in found if (m := re.fullmatch(
        r"[^.]+\.(?:(?:safetensors|bin|msgpack)\.index\.)?([^.]+?)(?:-NNNNN-of-\d+)?\.(?:safetensors|bin|msgpack|json)",
        name)) and m[1] != "index"})
    from_hub = any(part.startswith("models--") for part in model_dir.parts)   # the Hub cache: only some files came
    hint = (f"; the folder has {', '.join(found)}" if found else
            " (a Hub repo with Flax weights only loads with format='flax')" if from_hub else "")
    if variants and variant not in variants:
        hint += f" (load a variant with variant={variants[0]!r}, sample.py / train.py --variant {variants[0]})"
    raise CheckpointError(f"{model_dir}: no weights file; expected one of {', '.join(candidates)}{hint}")


def hub_files(model_cls, format: str | None = None, variant: str | None = None) -> list[str]:
    """The files of one model folder that sdjax reads from a Hub repo (patterns): its config and
    its weights, one file or shards with their index (safetensors, or msgpack with
    ``format="flax"``; see `fetch_missing_bin_weights`)."""
    spec = SPECS[model_cls]
    if format == "flax":   # diffusers' Flax models were saved whole
        return ["config.json", with_variant(spec.flax_file, variant)]
    name = spec.torch_files[0]
    return ["config.json", with_variant(name, variant), shard_index_name(name, variant), shard_pattern(name, variant)]


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
            name = SPECS[model_cls].torch_files[1]
            for pattern in (with_variant(name, variant), shard_index_name(name, variant), shard_pattern(name, variant)):
                wanted.append(f"{sub}/{pattern}" if sub else pattern)
    if wanted:
        resolve_model_dir(path_or_repo_id, None, revision, allow_patterns=wanted)


def _is_local_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or (os.path.sep in text and not re.fullmatch(r"[\w.-]+/[\w.-]+", text))


def _hub_error(what: str, error: Exception, offline_fix: str) -> CheckpointError:
    """A failed Hub download, with the first line of huggingface_hub's reason and what to do offline."""
    reason = str(error).splitlines()[0].rstrip(".") if str(error) else ""
    return CheckpointError(f"could not get {what} from the Hugging Face Hub: {type(error).__name__}: {reason}. "
                           f"Without network access here, {offline_fix}.")


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
            f"{path_or_repo_id}: is a file; from_pretrained loads a diffusers pipeline folder (model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a Hub repo id. A single-file checkpoint loads "
            "with StableDiffusion.from_single_file (sample.py and train.py take it as --model)")
    if _is_local_path(str(path_or_repo_id)):
        raise CheckpointError(f"{path_or_repo_id}: no such directory")
    from huggingface_hub import snapshot_download
    patterns = allow_patterns or ["*.json", "*.txt", "*.safetensors"]
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns] + ["model_index.json"]
    try:
        root = Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=patterns))
    except Exception as e:
        if type(e).__name__ == "HFValidationError":   # e.g. "my-model~": no repo id could look like it
            raise CheckpointError(f"{path_or_repo_id}: no such local folder, and not a Hugging Face Hub repo id "
                                  "(OWNER/NAME)") from e
        # The command that fetches just these files (the whole SD v1.5 repo is ~20 GB more).
        command = " ".join(["hf download", shlex.quote(str(path_or_repo_id)),
                            *([f"--revision {shlex.quote(revision)}"] if revision else []),
                            *[f"--include {shlex.quote(p)}" for p in patterns], "--local-dir DIR"])
        error = _hub_error(f"{path_or_repo_id!r} (revision {revision!r})", e,
                           f"download the files sdjax reads where there is (`{command}`) and pass DIR instead")
        if local.parent.is_dir() and str(local.parent) != ".":   # "runs/fnal" for "runs/final": a typo?
            error = CheckpointError(f"{path_or_repo_id}: no such local folder ({local.parent} has no {local.name!r}); "
                                    f"as a Hub repo id: {error}")
        raise error from e
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
    or 'both'. ``dtype`` casts the saved weights (default: as held). Weights of the other format
    left by an earlier save (which a later load could pick) are removed, and so are variant weights
    (``*.fp16.safetensors``): they would load with the new config."""
    from safetensors.numpy import save_file
    if format not in ("pytorch", "flax", "both"):
        raise ValueError(f"unknown format {format!r}: use 'pytorch', 'flax' or 'both'")
    spec = SPECS[type(model)]
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    params = _numpy_params(model, dtype)
    config = config_to_dict(model.config)
    if spec is CLIP:
        config["torch_dtype"] = str(np.dtype(next(iter(params.values())).dtype))
    files = []  # (path, writer): written together, so a failure leaves the folder as it was
    if format in ("pytorch", "both"):
        tensors = {torch_key(p): np.ascontiguousarray(to_torch_layout(a, p)) for p, a in params.items()}
        files.append((directory / spec.torch_files[0],
                      lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})))
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
        files.append((directory / spec.flax_file, lambda tmp: tmp.write_bytes(msgpack_serialize(tree))))
    files.append((directory / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n")))
    atomic_write_all(files)
    # An earlier save's weights that a later load could pick before the new ones: the format not
    # written now, safetensors shards (whose index is looked for first), and variant files
    # (``variant="fp16"`` would load them, with the new config.json).
    stale_torch = spec.torch_files if format == "flax" else spec.torch_files[:1]
    stale = [*(name for name in stale_torch for name in (shard_index_name(name), shard_pattern(name))),
             *(spec.torch_files if format == "flax" else ()), *((spec.flax_file,) if format == "pytorch" else ()),
             *(pattern for name in (*spec.torch_files, spec.flax_file)
               for pattern in (with_variant(name, "*"), shard_index_name(name, "*")))]
    for pattern in stale:
        for path in directory.glob(pattern):
            path.unlink()
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
    interrupted save never leaves a half-written pipeline; ``overwrite=True`` replaces an existing
    folder whole (put back if the save is interrupted before the new one is in place). An existing
    empty folder (a mount point, a folder made for you in one you cannot write) is filled from a
    temporary folder inside it instead, ``model_index.json`` last.
    """
    import shutil
    import tempfile
    directory = Path(directory).expanduser().resolve()  # a symlinked folder's target is what is replaced
    if directory == Path.cwd() or directory in Path.cwd().parents:
        # The folder is replaced by a rename, which would leave this process in a deleted folder.
        raise ValueError(f"{directory} is the working directory (or holds it); save the pipeline to a folder "
                         "inside it, e.g. save_pretrained('my-model')")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; a pipeline is saved as a folder")
    if directory.exists() and not overwrite and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace it)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(p.name for p in directory.parent.glob(f".{directory.name}.*") if p.is_dir())
    if leftovers:   # a killed save's temporary folder: as large as a pipeline, and hidden
        these = ("looks like the temporary folder", "it") if len(leftovers) == 1 else (
            "look like the temporary folders", "them")
        warnings.warn(f"{directory.parent}: {', '.join(leftovers)} {these[0]} of an interrupted save of "
                      f"{directory.name}; delete {these[1]} unless a save is running", stacklevel=2)
    fill_in_place = directory.is_dir() and not any(directory.iterdir())
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory if fill_in_place else directory.parent))
    old = None  # where an existing folder is moved aside while the new one is renamed into place
    replaced = False
    moved: list[Path] = []   # filling in place: what is already in the folder
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would keep the folder from other users
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
        from sdjax.text import save_tokenizer  # sdjax.text imports this module
        save_tokenizer(tokenizer, tmp / "tokenizer")
        for part, model in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
            save_pretrained(model, tmp / part, format=format, dtype=dtype)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if fill_in_place:   # model_index.json last: until it is there, the folder is no pipeline
            for child in sorted(tmp.iterdir(), key=lambda child: child.name == "model_index.json"):
                os.replace(child, directory / child.name)
                moved.append(directory / child.name)
            tmp.rmdir()
            return directory
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old)  # onto the empty folder just made
        os.replace(tmp, directory)
        replaced = True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in moved:   # the folder was empty: leave it so
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if old is not None and not replaced:
            if not directory.exists():
                os.replace(old, directory)  # interrupted between the two renames: put the old folder back
            else:
                with contextlib.suppress(OSError):
                    old.rmdir()  # still the empty placeholder
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():  # the new pipeline is in place; only the old copy's removal failed
            warnings.warn(f"saved {directory}, but could not remove the previous version moved to {old}; "
                          "delete it by hand", stacklevel=2)
    return directory


# ----------------------------------------------------------------------------- single-file checkpoints
# The original Stable Diffusion layout (CompVis' latent-diffusion names), as in
# v1-5-pruned-emaonly.safetensors and the files AUTOMATIC1111 / ComfyUI load: the three models in one
# state dict, each under its prefix, in PyTorch tensor layouts. Its configs and tokenizer come from
# elsewhere (a diffusers pipeline folder). Keys outside these prefixes (the noise schedule's buffers
# "betas", "alphas_cumprod"...) are not model weights and are skipped; so is the UNet's EMA copy
# "model_ema.*" that training checkpoints (v1-5-pruned.ckpt) hold beside it, unless it is asked for.
SINGLE_FILE_PARTS = {  # pipeline folder name -> (model class, key prefix)
    "unet": (UNet2DConditionModel, "model.diffusion_model."),
    "vae": (AutoencoderKL, "first_stage_model."),
    "text_encoder": (CLIPTextModel, "cond_stage_model.transformer."),
    "controlnet": (ControlNetModel, "control_model."),   # (a ControlNet file's own keys may lack it)
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_OTHER_ARCHITECTURES = {  # a key prefix that gives away a single file sdjax cannot load -> what it is
    "conditioner.embedders.": "an SDXL checkpoint (sdjax loads SD v1.x)",
    "cond_stage_model.model.": "an SD 2.x checkpoint (OpenCLIP text encoder; sdjax loads SD v1.x)",
    "model.diffusion_model.joint_blocks.": "an SD 3 checkpoint (MMDiT; sdjax loads SD v1.x)",
    "model.diffusion_model.double_blocks.": "a Flux checkpoint (sdjax loads SD v1.x)",
    "double_blocks.": "a Flux checkpoint (sdjax loads SD v1.x)",
}
EMA_PREFIX = "model_ema."   # LDM's LitEma: the UNet's weights again, each named without its dots
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


def ema_key(key: str) -> str:
    """The name of the EMA copy of the UNet weight ``key`` (``model.diffusion_model.X``) in an LDM
    training checkpoint: ``model_ema.`` + its name below ``model.`` with the dots removed."""
    return EMA_PREFIX + key.split(".", 1)[1].replace(".", "")


_LDM_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_LDM_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed_module(rest: str, names: dict[str, str]) -> str:
    """``"norm1.weight"`` -> ``"in_layers.0.weight"`` with ``names`` for the module part."""
    module, leaf = rest.rsplit(".", 1)
    return f"{names.get(module, module)}.{leaf}"


def ldm_unet_key(key: str, config: UNetConfig) -> str:
    """A diffusers UNet key -> its single-file name (without ``model.diffusion_model.``).

    LDM numbers the UNet's blocks flat: ``input_blocks`` 0 is conv_in, then each down block's
    (resnet, attention) layers and its downsampler as one more; ``output_blocks`` are each up
    block's layers, the upsampler riding on the block's last one; ``middle_block`` is resnet,
    attention, resnet."""
    per_block = config.layers_per_block + 1
    module, leaf = key.rsplit(".", 1)
    if module in _LDM_UNET_TOP:
        return f"{_LDM_UNET_TOP[module]}.{leaf}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, block, part, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if part in ("downsamplers", "upsamplers"):
            layer = config.layers_per_block
        if side == "down":
            where = f"input_blocks.{1 + block * per_block + layer}"
        else:
            where = f"output_blocks.{block * per_block + layer}"
        if part == "resnets":
            return f"{where}.0.{_renamed_module(rest, _LDM_UNET_RESNET)}"
        if part == "attentions":
            return f"{where}.1.{rest}"
        if part == "downsamplers":
            return f"{where}.0.op.{rest.removeprefix('conv.')}"
        with_attention = config.up_block_types[block].startswith("CrossAttn")
        return f"{where}.{2 if with_attention else 1}.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_renamed_module(m[3], _LDM_UNET_RESNET)}"
    raise ValueError(f"no single-file name for the UNet key {key!r}")


def ldm_controlnet_key(key: str, config: ControlNetConfig) -> str:
    """A diffusers ControlNet key -> its original name (without ``control_model.``): the UNet's part as
    the UNet's (`ldm_unet_key`), the control image's encoder as ``input_hint_block`` (a Sequential with
    a SiLU after each conv), the residuals' 1x1 convs as ``zero_convs.N.0`` and ``middle_block_out.0``."""
    module, leaf = key.rsplit(".", 1)
    blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    m = re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))", module)
    if m:
        index = 0 if m[1] == "conv_in" else 2 * (blocks + 1) if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
        return f"input_hint_block.{index}.{leaf}"
    m = re.fullmatch(r"controlnet_down_blocks\.(\d+)", module)
    if m:
        return f"zero_convs.{m[1]}.0.{leaf}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{leaf}"
    return ldm_unet_key(key, config)


def ldm_vae_key(key: str, config: VAEConfig) -> str:
    """A diffusers VAE key -> its single-file name (without ``first_stage_model.``). LDM numbers
    the decoder's blocks from the lowest resolution up (diffusers' up_blocks.0 is LDM's up.N-1)."""
    last = len(config.block_out_channels) - 1
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)",
                     key)
    if m:
        coder, side, block, part, layer, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
        where = f"{coder}.{side}.{block if side == 'down' else last - block}"
        return f"{where}.block.{layer}.{rest}" if part == "resnets" else f"{where}.{side}sample.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[2] == "attentions":
            return f"{m[1]}.mid.attn_1.{_renamed_module(m[4], _LDM_VAE_ATTENTION)}"
        return f"{m[1]}.mid.block_{int(m[3]) + 1}.{m[4]}"
    return key.replace("conv_norm_out.", "norm_out.")  # conv_in, conv_out, (post_)quant_conv: same names


def single_file_key(part: str, key: str, config) -> str:
    """The full single-file name of the diffusers key ``key`` of pipeline part ``part``."""
    prefix = SINGLE_FILE_PARTS[part][1]
    if part == "unet":
        return prefix + ldm_unet_key(key, config)
    if part == "vae":
        return prefix + ldm_vae_key(key, config)
    if part == "controlnet":
        return prefix + ldm_controlnet_key(key, config)
    return prefix + key  # the text encoder is transformers' CLIPTextModel, names and all


def _weights_file(file: str | os.PathLike, missing: str, kind: str, folder_hint: str) -> Path:
    """``file`` as a Path if it is a file with a checkpoint's suffix; else a `CheckpointError`
    (``no such {missing}``, ``not a {kind} sdjax reads``, or a folder: ``folder_hint``)."""
    file = Path(file).expanduser()
    if file.is_dir():
        raise CheckpointError(f"{file}: is a folder; {folder_hint}")
    if not file.is_file():
        raise CheckpointError(f"{file}: no such {missing}")
    if file.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{file}: not a {kind} sdjax reads (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
    return file


def check_single_file(file: str | os.PathLike) -> Path:
    """What can be checked of a single-file checkpoint without its configs (so before fetching
    them): it is a file with a checkpoint's suffix and, for safetensors (from the header alone),
    holds SD v1.x keys. Raises `CheckpointError` saying what is wrong; returns the path."""
    file = _weights_file(file, "checkpoint file", "single-file checkpoint",
                         "a diffusers pipeline folder loads with from_pretrained")
    if file.suffix == ".safetensors":
        _check_single_file_keys(file, safetensors_keys(file))
    return file


# A file on the Hugging Face Hub as its page or download link gives it: .../owner/name/blob/REV/PATH
# (or resolve/), with an optional query such as "?download=true".
_HUB_FILE_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/(?P<repo>[\w.-]+/[\w.-]+)/(?:blob|resolve)/"
                           r"(?P<revision>[^/?#]+)/(?P<filename>[^?#]+)(?:[?#].*)?")


def is_url(text: str | os.PathLike) -> bool:
    return str(text).startswith(("http://", "https://"))


def prepare_single_file(file: str | os.PathLike) -> Callable[[], Path]:
    """Check a single-file checkpoint as far as can be done without its bytes, and return a
    function that gives its local path. ``file`` is a local path, or a Hugging Face Hub file URL
    (``https://huggingface.co/OWNER/NAME/blob/REV/FILE``, or ``resolve/``): one in the Hub cache is
    used as it is, without network; otherwise a ``.safetensors`` URL's header is read now (so a
    file of another architecture is refused before gigabytes are downloaded) and the returned
    function downloads it. Raises `CheckpointError` saying what is wrong, as `check_single_file`."""
    if not is_url(file):
        local = check_single_file(file)
        return lambda: local
    url = str(file)
    match = _HUB_FILE_URL.fullmatch(url)
    if match is None:
        raise CheckpointError(
            f"{url}: sdjax downloads only Hugging Face Hub file URLs (https://huggingface.co/OWNER/NAME/blob/REV/"
            "FILE); a Hub pipeline repo loads by its id (OWNER/NAME); from elsewhere, download the file and pass "
            "its path")
    # The Hub's links encode a revision's "/" (refs%2Fpr%2F3): decoded, as huggingface_hub encodes it again.
    repo, revision = match["repo"], urllib.parse.unquote(match["revision"])
    filename = urllib.parse.unquote(match["filename"])
    if Path(filename).suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{url}: {filename} is not a single-file checkpoint sdjax reads (expected one of "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)})")
    import huggingface_hub
    command = (f"hf download {shlex.quote(repo)} {shlex.quote(filename)} --revision {shlex.quote(revision)} "
               "--local-dir DIR")
    failed = lambda e: _hub_error(  # noqa: E731
        url, e, f"download it where there is (`{command}`) and pass DIR/{filename} instead")
    try:  # downloaded before: no network needed (HF_HUB_OFFLINE=1 works)
        local = check_single_file(huggingface_hub.hf_hub_download(repo, filename, revision=revision,
                                                                  local_files_only=True))
        return lambda: local
    except huggingface_hub.errors.LocalEntryNotFoundError:
        pass
    if filename.endswith(".safetensors"):  # the header alone: a few hundred kB
        try:
            header = huggingface_hub.HfApi().parse_safetensors_file_metadata(repo, filename, revision=revision)
        except Exception as e:
            raise failed(e) from e
        _check_single_file_keys(url, list(header.tensors))

    def download() -> Path:
        try:
            path = huggingface_hub.hf_hub_download(repo, filename, revision=revision)
        except Exception as e:
            raise failed(e) from e
        return check_single_file(path)
    return download


def _check_single_file_keys(file: Path | str, keys: list[str]) -> None:
    for prefix, what in _OTHER_ARCHITECTURES.items():
        if any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{file}: {what}: its keys start with {prefix!r}")
    if not any(k.startswith(SINGLE_FILE_PARTS["unet"][1]) for k in keys):
        has = f"it has {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}" if keys else "it holds no tensors"
        if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in keys):
            hint = ("; a VAE alone (as vae-ft-mse-840000-ema-pruned): pass it as the VAE of a model, sample.py "
                    "--vae FILE (from Python, vae=FILE)")
        elif any(k.startswith(("down_blocks.", "encoder.", "text_model.")) for k in keys):
            hint = "; a diffusers model file: load its pipeline folder with from_pretrained"
        else:
            hint = ""
        raise CheckpointError(f"{file}: not a Stable Diffusion single-file checkpoint: no "
                              f"'model.diffusion_model.*' keys ({has}){hint}")


def load_single_file(file: str | os.PathLike, configs: dict[str, Any], *, dtype=jnp.float32,
                     ema_weights: bool = False) -> dict[str, Any]:
    """The models of an original-layout single-file checkpoint (``.safetensors``, or a PyTorch
    ``.ckpt`` / ``.pt`` / ``.bin`` read with ``weights_only=True``), strictly, in one pass over the
    file: {"unet": ..., "vae": ..., "text_encoder": ...}.

    ``configs`` maps the same names to the models' configs (`UNetConfig`...); a part left out of
    it is not read (its keys may be missing, as a VAE replaced by another). Every weight of every
    model read must be in the file with the right shape, and every key under its prefix must be a
    weight of it; otherwise a `CheckpointError` names the file, the keys and the shapes. The
    UNet's input channels are the file's (`single_file_unet_config`): an inpainting UNet's 9 load
    with a text-to-image model's configs, and its returned config says ``in_channels=9``.

    ``ema_weights``: a training checkpoint that holds the UNet twice (``v1-5-pruned.ckpt``: the
    trained weights and their EMA copy, ``model_ema.*``) gives its EMA copy instead, as
    diffusers' conversion script does with ``--extract_ema`` (the weights diffusers' SD v1.5 folder
    holds, and the better ones for images). A file without an EMA copy is an error then.
    """
    file = check_single_file(file)
    prefixes = {part: prefix for part, (_, prefix) in SINGLE_FILE_PARTS.items() if part in configs}
    ema_weights = ema_weights and "unet" in configs
    wanted = _weight_prefixes(prefixes)
    if ema_weights:   # the UNet's EMA copy in place of its weights, which are not read
        wanted = tuple(start for start in wanted if start != prefixes["unet"]) + (EMA_PREFIX,)

    def note_ema(keys):
        has_ema = any(key.startswith(EMA_PREFIX) for key in keys)
        if ema_weights and not has_ema:
            raise CheckpointError(f"{file}: has no EMA copy of the UNet (no '{EMA_PREFIX}*' keys) to load with "
                                  "ema_weights=True / --ema-weights: its UNet weights are the only ones (an EMA-only "
                                  "file, as v1-5-pruned-emaonly, already holds the EMA weights); load it without")
        if "unet" in configs and has_ema and not ema_weights:
            warnings.warn(f"{file} holds an EMA copy of the UNet beside its weights (model_ema.*): the weights are "
                          "loaded, as diffusers' from_single_file does; for images the EMA copy is usually the "
                          "better one: load it with ema_weights=True (sample.py/train.py --ema-weights)", stacklevel=4)

    if file.suffix == ".safetensors":   # (its keys were checked from its header by check_single_file)
        shapes = safetensors_shapes(file)
        note_ema(shapes)
        tensors = _read_safetensors(file, wanted=lambda key: key.startswith(wanted))
    else:   # unpickled whole (torch.load), then converted tensor by tensor
        state = _torch_state_dict(file)
        _check_single_file_keys(file, list(state))
        note_ema(state)
        shapes = {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
        tensors = _torch_tensors(state)
    if "unet" in configs:
        conv_in = single_file_key("unet", "conv_in.weight", configs["unet"])
        conv_in = ema_key(conv_in) if ema_weights else conv_in
        configs = {**configs, "unet": single_file_unet_config(file, configs["unet"], conv_in, shapes.get(conv_in))}
    return _load_original_layout(file, tensors, configs, prefixes, dtype, ema_weights=ema_weights)


def single_file_unet_config(file: Path | str, config: UNetConfig, key: str, shape: tuple | None) -> UNetConfig:
    """The UNet config a single file's UNet loads with: ``config`` with the input channels of the
    file's conv_in weight (``key``, of ``shape`` as the file holds it, OIHW), as AUTOMATIC1111 and
    diffusers tell the models apart: a text-to-image UNet takes the latents it denoises
    (``config.out_channels``), an inpainting UNet (``sd-v1-5-inpainting``) 2 * latents + 1 (the
    latents, the mask and the masked image's latents). Other inputs (instruct-pix2pix's 8, a depth
    model's 5) are refused with a `CheckpointError` naming the file, the key and its shape, before
    any weights are read; a weight that is not there or not a conv's is left to the strict load."""
    if shape is None or len(shape) != 4 or not all(type(n) is int for n in shape):   # (a corrupt header's:
        return config                                                                   # the reader names it)
    inputs, latent = shape[1], config.out_channels
    if inputs not in (latent, 2 * latent + 1):
        raise CheckpointError(
            f"{file}: key {key!r} has shape {shape}: a UNet that takes {inputs} input channels; sdjax loads one "
            f"that takes the {latent} latent channels it denoises (text-to-image) or {2 * latent + 1} (inpainting: "
            "the latents, the mask and the masked image's latents), not others (instruct-pix2pix: 8, depth: 5)")
    return dataclasses.replace(config, in_channels=inputs)


# The modules of an LDM VAE (its keys after first_stage_model.); a file's other VAE keys are training
# leftovers (loss.*: the LPIPS and discriminator of its training loss), skipped as diffusers does.
_LDM_VAE_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _weight_prefixes(prefixes: dict[str, str]) -> tuple[str, ...]:
    """The key prefixes of the weights of ``prefixes``' parts (part -> its prefix in the file): a
    VAE's are its modules', not its training loss's."""
    return tuple(start for part, prefix in prefixes.items()
                 for start in ([prefix + module for module in _LDM_VAE_MODULES] if part == "vae" else [prefix]))


def _load_original_layout(file: Path, tensors: Iterator[tuple[str, np.ndarray]], configs: dict[str, Any],
                          prefixes: dict[str, str], dtype, *, ema_weights: bool = False) -> dict[str, Any]:
    """The models of ``configs`` (pipeline part -> config) from ``file``'s ``tensors`` in the
    original layout, where part P's weights are named ``prefixes[P]`` + their LDM names; strictly.
    ``ema_weights``: the UNet from its EMA copy (`ema_key` names) instead."""
    dtype = resolve_dtype(dtype)
    fills, to_torch_name = {}, {}  # part -> _StrictFill; part -> {LDM name: torch name}
    for part, config in configs.items():
        model_cls, prefix = SINGLE_FILE_PARTS[part]
        fills[part] = _StrictFill(model_cls, config, file, dtype, label=f"its config's {model_cls.__name__}")
        to_torch_name[part] = {single_file_key(part, name, config)[len(prefix):]: name
                               for name in fills[part].names.values()}
    from_ema = {}   # an EMA key -> the UNet key it stands in for
    if ema_weights:
        from_ema = {ema_key(prefixes["unet"] + name): prefixes["unet"] + name for name in to_torch_name["unet"]}
    for key, array in tensors:
        shown = key
        if ema_weights:
            if key.startswith(prefixes["unet"]) or key in _EMA_BOOKKEEPING:
                continue   # the weights the EMA copy replaces; LitEma's decay and update count
            if key.startswith(EMA_PREFIX):
                if key not in from_ema:
                    fills["unet"].unexpected.append(key)
                    continue
                key = from_ema[key]
        part = next((p for p, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is None:
            continue  # not a weight of these models
        rest = key[len(prefixes[part]):]
        if part == "vae" and not rest.startswith(_LDM_VAE_MODULES):
            continue
        name = SPECS[SINGLE_FILE_PARTS[part][0]].torch_name(rest)  # CLIP's keys are transformers' own
        if name is None:
            continue
        torch_name = to_torch_name[part].get(name)
        if torch_name is None:
            fills[part].unexpected.append(key)
        else:
            fills[part].place(torch_name, array, shown_as=shown)
    problems = []   # every part's, so that fixing one does not just reveal the next
    for part, fill in fills.items():
        skip = len(SINGLE_FILE_PARTS[part][1])
        from_the_ema = ema_weights and part == "unet"

        def file_key(name, part=part, skip=skip, from_the_ema=from_the_ema):
            key = prefixes[part] + single_file_key(part, name, configs[part])[skip:]
            return ema_key(key) if from_the_ema else key
        try:
            fill.check(file_key)
        except CheckpointError as e:
            problems.append(str(e))
            if not fill.loaded:
                where = f"'{EMA_PREFIX}*' EMA" if from_the_ema else f"'{prefixes[part]}*'"
                problems.append(f"  it has no {part} at all (no {where} weights)"
                                + ("; load one beside it with vae= (--vae)" if part == "vae" else ""))
    if problems:
        raise CheckpointError("\n".join(problems))
    return {part: fill.model() for part, fill in fills.items()}


def load_vae_file(file: str | os.PathLike, config: VAEConfig, *, dtype=jnp.float32) -> AutoencoderKL:
    """A VAE from one weights file, strictly: a VAE file in the original (LDM) layout that
    AUTOMATIC1111 and ComfyUI use (``vae-ft-mse-840000-ema-pruned.safetensors`` or ``.ckpt``: keys
    ``encoder.down.*``, ``decoder.up.*``, ``quant_conv.*``, ...), the VAE of a whole single-file
    checkpoint (``first_stage_model.*``), or a diffusers VAE's weights file
    (``diffusion_pytorch_model.safetensors``). A file holds no config: ``config`` (the
    pipeline's VAE config) gives the architecture. A PyTorch file is read with ``weights_only=True``."""
    file = _weights_file(file, "VAE file", "VAE file", "a VAE folder loads with AutoencoderKL.from_pretrained")
    checkpoint_prefix = SINGLE_FILE_PARTS["vae"][1]
    if file.suffix == ".safetensors":   # of a whole checkpoint, only its VAE's keys are read
        keys = safetensors_keys(file)
        whole = any(k.startswith(checkpoint_prefix) for k in keys)
        vae_keys = _weight_prefixes({"vae": checkpoint_prefix})
        tensors = _read_safetensors(file, wanted=(lambda key: key.startswith(vae_keys)) if whole else None)
    else:  # a VAE is small (335 MB in fp32): read whole, its names decide the layout
        state = dict(_read_torch_bin(file))
        keys, tensors = list(state), ((k, state.pop(k)) for k in list(state))
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):   # diffusers' names
        fill = _StrictFill(AutoencoderKL, config, file, resolve_dtype(dtype))
        _place_torch_names(fill, VAE, tensors)   # the tensors already read, not the file again
        fill.check()
        return fill.model()
    if any(k.startswith(checkpoint_prefix) for k in keys):
        prefix = checkpoint_prefix
    elif any(k.startswith(_LDM_VAE_MODULES) for k in keys):
        prefix = ""
    else:
        has = f"it has {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}" if keys else "it holds no tensors"
        raise CheckpointError(f"{file}: not a VAE: no 'encoder.*' / 'decoder.*' keys, nor a checkpoint's "
                              f"'{checkpoint_prefix}*' ({has})")
    return _load_original_layout(file, tensors, {"vae": config}, {"vae": prefix}, dtype)["vae"]


def load_controlnet_file(file: str | os.PathLike, unet_config: UNetConfig, *, dtype=jnp.float32) -> ControlNetModel:
    """A ControlNet from one weights file in the original layout (lllyasviel's ``control_v11p_sd15_canny.pth``,
    the ``.safetensors`` files of AUTOMATIC1111's ``models/ControlNet``): keys ``input_hint_block.*``,
    ``zero_convs.*``, ``input_blocks.*``, ..., with or without ``control_model.`` (a v1.0 file that holds the
    whole model beside it: its ControlNet's). A file holds no config: the blocks are those of the UNet it
    steers (``unet_config``), the control image's encoder's widths are read from the file's shapes. A
    PyTorch file is read with ``weights_only=True``; strictly, as the other single files."""
    file = _weights_file(file, "ControlNet file", "ControlNet file",
                         "a diffusers ControlNet folder loads with ControlNetModel.from_pretrained")
    if file.suffix == ".safetensors":
        shapes = safetensors_shapes(file)
        keys, tensors = list(shapes), _read_safetensors(file)
    else:
        state = dict(_read_torch_bin(file))
        keys, shapes = list(state), {k: tuple(np.shape(v)) for k, v in state.items()}
        tensors = ((k, state.pop(k)) for k in list(state))
    prefix = SINGLE_FILE_PARTS["controlnet"][1] if any(k.startswith("control_model.") for k in keys) else ""
    hint = sorted((int(m[1]), shapes[k]) for k in keys
                  if (m := re.fullmatch(re.escape(prefix) + r"input_hint_block\.(\d+)\.weight", k)) and shapes[k])
    if not hint or not any(k.startswith(prefix + "zero_convs.") for k in keys):
        has = f"it has {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}" if keys else "it holds no tensors"
        raise CheckpointError(f"{file}: not a ControlNet: no 'input_hint_block.*' / 'zero_convs.*' keys ({has})")
    # input_hint_block: conv_in, then (conv, stride-2 conv) per width step, then conv_out: its widths are the
    # outputs of conv_in and of each stride-2 conv; its input is the control image's channels
    widths = tuple(shape[0] for index, shape in hint[:-1] if index == 0 or (index // 2) % 2 == 0)
    # the UNet's fields but those a diffusers ControlNet config has not (as a folder's: one program for both)
    fields = {f.name: getattr(unet_config, f.name) for f in dataclasses.fields(UNetConfig)
              if f.name not in ("up_block_types", "out_channels", "sample_size")}
    try:
        config = ControlNetConfig.from_dict({**fields, "conditioning_channels": hint[0][1][1],
                                             "conditioning_embedding_out_channels": widths})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: its control image encoder (input_hint_block) is not one sdjax builds: "
                              f"{e}") from e
    return _load_original_layout(file, tensors, {"controlnet": config}, {"controlnet": prefix}, dtype)["controlnet"]


def single_file_tensor(part: str, path: tuple, array: np.ndarray, config) -> tuple[str, np.ndarray]:
    """(single-file name, array in its PyTorch layout) of the weight at NNX ``path`` of pipeline part ``part``."""
    array = to_torch_layout(array, path)
    if part == "vae" and array.ndim == 2:  # the VAE's attention projections: 1x1 convs in LDM
        array = array[:, :, None, None]
    return single_file_key(part, torch_key(path), config), array


def save_single_file(file: str | os.PathLike, *, text_encoder, unet, vae, dtype=None,
                     overwrite: bool = False, token_rows: int | None = None) -> Path:
    """Write the three models as one original-layout ``.safetensors`` file (what AUTOMATIC1111,
    ComfyUI and diffusers' ``from_single_file`` load). ``dtype`` casts the weights (e.g.
    ``"float16"``, the usual for such files; default: as held). Written to a temporary name and
    renamed into place. An existing file is refused unless ``overwrite=True``; a symlink's target
    is what is replaced (the link stays). ``token_rows``: write the text encoder's first token rows
    only (without those textual inversion embeddings added)."""
    from safetensors.numpy import save_file
    file = Path(file).expanduser()
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: a single file is written as .safetensors")
    file = file.resolve()   # a models/ folder of links (a web UI's): write where the link points
    if file.is_dir():
        raise IsADirectoryError(f"{file} is a folder; a single file is written as FILE.safetensors")
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file} exists (pass overwrite=True to replace it)")
    tensors = {}
    for part, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        for path, array in _numpy_params(model, dtype).items():
            name, array = single_file_tensor(part, path, array, model.config)
            if token_rows is not None and name.endswith(".token_embedding.weight"):
                array = array[:token_rows]
            tensors[name] = np.ascontiguousarray(array)
    file.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


# ----------------------------------------------------------------------------- LoRA
LORA_PARTS = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}   # what a SD v1.x LoRA changes
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"   # diffusers' name: its load_lora_weights(folder) reads it
# (down, up) key suffixes of the LoRA formats read: kohya/A1111, diffusers' PEFT, diffusers' older ones
_LORA_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
               (".lora.down.weight", ".lora.up.weight"),
               (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
# diffusers' attention-processor LoRA (<= 0.20): "attn1.processor.to_q_lora.down.weight" -> "attn1.to_q"
_PROCESSOR_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_PROCESSOR_LORA = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
# Other LyCORIS / LoRA variants, which are not a plain up @ down: refused by name
_LORA_VARIANTS = {r"hada_": "LoHa (LyCORIS)", r"lokr_": "LoKr (LyCORIS)",
                  r"lora_mid\.": "LoCon with a CP/Tucker mid weight (LyCORIS)", r"dora_scale": "DoRA",
                  r"lora_magnitude_vector": "DoRA", r"\.b?oft_": "OFT / BOFT (LyCORIS)",
                  r"\.diff(_b)?$": "a full weight difference (LyCORIS 'full')", r"\.[wb]_norm$": "a norm LoRA",
                  r"lora_B\.bias$": "a LoRA with a bias (PEFT lora_bias)"}


def _safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file's header ({} when it has none)."""
    with open(path, "rb") as f:
        metadata = _safetensors_header(f, path, path.stat().st_size, keep_metadata=True)[0].get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


def read_textual_inversion(file: str | os.PathLike, token: str | None = None) -> tuple[str, np.ndarray]:
    """The trigger token and vectors (float32 [n, width]) of a textual inversion embedding file.

    Reads what diffusers' ``load_textual_inversion`` reads: diffusers' files (``learned_embeds.safetensors``
    or ``.bin``: one tensor under its token, e.g. ``<cat-toy>``) and AUTOMATIC1111's (``.safetensors``
    with ``emb_params``, ``.pt`` with ``string_to_param``), whose token is the file's name without its
    suffix, as A1111 users type it (``EasyNegative.safetensors`` -> ``EasyNegative``). ``token``
    replaces the file's. Anything else (an SDXL embedding, other keys) raises `CheckpointError` naming
    the file and its keys."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise CheckpointError(f"{file}: no such embedding file")
    if file.suffix.lower() == ".safetensors":
        state: Any = dict(_read_safetensors(file))
    elif file.suffix.lower() in (".pt", ".bin"):
        state = _torch_load(file, allow=["nn.ParameterDict"])   # (the first textual inversion code's .pt files)
    else:
        raise CheckpointError(f"{file}: sdjax reads textual inversion embeddings as .safetensors, .pt or .bin files")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{file}: not a textual inversion embedding (it holds no tensors by name)")
    keys = sorted(map(str, state))
    if "string_to_param" in state and hasattr(state["string_to_param"], "keys") \
            and "*" in state["string_to_param"]:   # A1111 .pt (a dict; an nn.ParameterDict in older files)
        found, vectors = file.stem, state["string_to_param"]["*"]
    elif "emb_params" in state:                      # A1111 .safetensors
        found, vectors = file.stem, state["emb_params"]
    elif {"clip_l", "clip_g"} & set(state):
        raise CheckpointError(f"{file}: an SDXL embedding (clip_l / clip_g), not one for SD v1.x's text encoder")
    elif len(state) == 1:                            # diffusers: {token: vectors}
        found, vectors = next(iter(state.items()))
    else:
        raise CheckpointError(f"{file}: not a textual inversion embedding sdjax reads (expected one tensor under its "
                              f"token, emb_params or string_to_param; it has {', '.join(keys[:8])})")
    if hasattr(vectors, "detach"):   # a torch tensor, from a .pt / .bin (bf16 as float32: numpy has none)
        vectors = vectors.detach()
        vectors = (vectors.float() if vectors.is_floating_point() else vectors).numpy()
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.size or not jnp.issubdtype(vectors.dtype, jnp.floating):   # (bf16 too)
        raise CheckpointError(f"{file}: the embedding has shape {vectors.shape} and dtype {vectors.dtype}; expected "
                              "float vectors [count, width]")
    if not np.isfinite(vectors.astype(np.float32)).all():
        raise CheckpointError(f"{file}: the embedding's vectors hold NaN or infinite values (a diverged training?)")
    token = found if token is None else token
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise CheckpointError(f"{file}: the token {token!r} must be a word without surrounding spaces")
    return token, vectors.astype(np.float32)


def _lora_module_names(part: str, config, state) -> dict[str, tuple]:
    """The names a LoRA file gives the Linear and Conv modules of pipeline part ``part`` -> the NNX
    path of their kernel: diffusers' dotted module names and kohya's (``lora_unet_`` / ``lora_te_``
    + the name with "_" for "."; for the UNet also its original-layout name, ``lora_unet_input_blocks_
    1_1_proj_in``, as some trainers write it). A kohya name two modules would share is left out.
    ``state``: the part's abstract state (`abstract_model`)."""
    names: dict[str, tuple] = {}
    kohya: dict[str, tuple | None] = {}
    for path, _ in nnx.to_flat_state(state):
        if path[-1] != "kernel":
            continue
        module = torch_key(path).removesuffix(".weight")
        names[f"{part}.{module}"] = path
        if module.startswith("text_model."):   # diffusers' files of a transformers 5 CLIPTextModel: without it
            names[f"{part}.{module.removeprefix('text_model.')}"] = path
        spellings = [module]
        if part == "unet":
            spellings.append(single_file_key(part, torch_key(path), config)
                             .removeprefix(SINGLE_FILE_PARTS[part][1]).removesuffix(".weight"))
        for prefix, kohya_part in _KOHYA_PREFIXES.items():
            for spelling in spellings if kohya_part == part else ():
                name = _kohya_name(prefix, spelling)
                kohya[name] = None if name in kohya and kohya[name] != path else path
    names.update({name: path for name, path in kohya.items() if path is not None})
    return names


def _kohya_name(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def kohya_lora_name(part: str, path: tuple) -> str:
    """The kohya / AUTOMATIC1111 LoRA module name of the kernel at NNX ``path`` of pipeline part
    ``part`` ("unet" / "text_encoder"): ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part]
    return _kohya_name(prefix, torch_key(path).removesuffix(".weight"))


def save_lora(file: str | os.PathLike, lora: dict[str, dict[str, Any]], *, alpha: float,
              metadata: dict[str, str] | None = None) -> Path:
    """Write LoRA weights as a kohya / AUTOMATIC1111 ``.safetensors`` file, the format web UIs, ComfyUI,
    diffusers' ``load_lora_weights`` and `read_lora` all read. ``lora``: {kohya module name (see
    `kohya_lora_name`): {"down": [in, rank], "up": [rank, out]}} in sdjax's layout (the kernel's
    change is ``alpha / rank * down @ up``), stored as PyTorch's ``lora_down.weight`` [rank, in],
    ``lora_up.weight`` [out, rank] and ``alpha``, in float32. Written atomically."""
    tensors = {}
    for name, pair in lora.items():
        down, up = np.asarray(pair["down"], np.float32), np.asarray(pair["up"], np.float32)
        tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(down.T)
        tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(up.T)
        tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    from safetensors.numpy import save_file
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})}))


def _lora_base(key: str) -> tuple[str, str] | None:
    """(the module name, "down" / "up" / "alpha") of a LoRA file's key, or None when it is neither."""
    if m := _PROCESSOR_LORA.search(key):
        part = "text_encoder" if key.startswith("text_encoder.") else "unet"
        return key[:m.start()] + "." + _PROCESSOR_NAMES[part][m[1]], m[2]
    for down, up in _LORA_PAIRS:
        if key.endswith(down):
            return key[:-len(down)], "down"
        if key.endswith(up):
            return key[:-len(up)], "up"
    if key.endswith(".alpha"):
        return key[:-len(".alpha")], "alpha"
    return None


def _peft_alpha(metadata: dict, part: str, module: str, rank: int) -> tuple[float, float]:
    """(alpha, the rank it divides) of diffusers' adapter metadata (PEFT's LoraConfig per part):
    its alpha_pattern's entry for ``module``, else its lora_alpha, else the rank; rsLoRA divides by
    sqrt(rank)."""
    config = {k.removeprefix(f"{part}."): v for k, v in metadata.items() if k.startswith(f"{part}.")}
    alpha = config.get("lora_alpha") or rank
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            alpha = value
            break
    return float(alpha), math.sqrt(rank) if config.get("use_rslora") else float(rank)


def read_lora(file: str | os.PathLike, configs: dict[str, Any], *, scale: float = 1.0
              ) -> dict[str, dict[tuple, np.ndarray]]:
    """The weight changes of a LoRA file, in sdjax's layout: {part: {NNX path of a kernel: delta}},
    parts "unet" and "text_encoder" (those ``configs`` maps to their configs; a file's LoRA for a
    part left out is an error). Each delta, in float32, is ``scale * alpha / rank * up @ down``
    (alpha absent: alpha = rank), the weight change diffusers' ``fuse_lora`` makes.

    Reads LoRA ``.safetensors`` files as kohya's sd-scripts and AUTOMATIC1111 write them
    (``lora_unet_*`` / ``lora_te_*`` modules with ``.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha``; LoCon's 1x1 and 3x3 convs too; the UNet's layers by their diffusers or original-layout
    names) and as diffusers writes them (PEFT's
    ``unet.*.lora_A.weight`` / ``lora_B.weight``, alpha from the file's ``lora_adapter_metadata``;
    the older ``*.lora.down.weight`` / ``.lora.up.weight`` and ``*.processor.to_q_lora.down.weight``).
    Anything else (LoHa, LoKr, DoRA and other LyCORIS variants, a module the models do not have, a
    shape that does not fit) raises `CheckpointError` (a ValueError) naming the file and the key.
    """
    file = Path(file).expanduser()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{file}: the LoRA scale must be a finite number, got {scale!r}")
    if not file.is_file():
        raise CheckpointError(f"{file}: no such LoRA file")
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file}: sdjax reads LoRA files as .safetensors (convert the file to safetensors)")
    tensors = dict(_read_safetensors(file))
    if not tensors:
        raise CheckpointError(f"{file}: not a LoRA file: it holds no tensors")
    metadata_json = _safetensors_metadata(file).get("lora_adapter_metadata")
    try:
        metadata = json.loads(metadata_json) if metadata_json else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: its lora_adapter_metadata is not JSON ({e})") from e
    for part in configs:
        if metadata.get(f"{part}.use_dora"):
            raise CheckpointError(f"{file}: a DoRA adapter ({part}.use_dora in its metadata), not a plain LoRA; "
                                  "sdjax merges plain LoRA only")
    states = {part: abstract_model(LORA_PARTS[part], config)[1] for part, config in configs.items()}
    names = {}
    for part, config in configs.items():
        names.update(_lora_module_names(part, config, states[part]))
    modules: dict[str, dict[str, str]] = {}   # module name -> {"down"/"up"/"alpha": the file's key}
    for key in tensors:
        for marker, what in _LORA_VARIANTS.items():
            if re.search(marker, key):
                raise CheckpointError(f"{file}: key {key!r} is {what}, not a plain LoRA; sdjax merges "
                                      "plain LoRA (up @ down) only")
        base = _lora_base(key)
        if base is None:
            looks_like = ("a model checkpoint, not a LoRA" if key.startswith(("model.diffusion_model.", "down_blocks.",
                                                                                "text_model.", "first_stage_model."))
                          else "not a LoRA weight")
            raise CheckpointError(f"{file}: key {key!r} is {looks_like} (a LoRA's keys end in .lora_down.weight / "
                                  ".lora_up.weight / .alpha, or .lora_A.weight / .lora_B.weight)")
        module, role = base
        if module.startswith("lora_te2_") or module.startswith("text_encoder_2."):
            raise CheckpointError(f"{file}: key {key!r} is for a second text encoder (an SDXL LoRA); sdjax runs "
                                  "SD v1.x")
        if module not in names and not module.startswith(("unet.", "text_encoder.", "lora_")) \
                and f"unet.{module}" in names:
            module = f"unet.{module}"   # diffusers' oldest files: the UNet's names without "unet."
        if module not in names:
            part = next((p for p in LORA_PARTS if module.startswith((f"{p}.", *(k for k, v in _KOHYA_PREFIXES.items()
                                                                                 if v == p)))), None)
            why = (f"the file has LoRA for the {part}, which is not merged here" if part is not None
                   and part not in configs else "it names no Linear or Conv layer of the SD v1.x UNet or text "
                   "encoder")
            raise CheckpointError(f"{file}: key {key!r}: {why}")
        if role in modules.setdefault(module, {}):
            raise CheckpointError(f"{file}: keys {modules[module][role]!r} and {key!r} are the same LoRA weight")
        modules[module][role] = key
    deltas: dict[str, dict[tuple, np.ndarray]] = {part: {} for part in configs}
    shapes = {part: dict(nnx.to_flat_state(state)) for part, state in states.items()}
    for module, keys in modules.items():
        for role in ("down", "up"):
            if role not in keys:
                other = next(iter(keys.values()))
                raise CheckpointError(f"{file}: key {other!r} has no LoRA {role} weight beside it")
        down = tensors[keys["down"]].astype(np.float32)
        up = tensors[keys["up"]].astype(np.float32)
        path = names[module]
        part = "unet" if module.startswith(("unet.", "lora_unet_")) else "text_encoder"
        target = tuple(shapes[part][path].get_value().shape)
        rank = down.shape[0] if down.ndim else 0
        fits = (down.ndim in (2, 4) and up.ndim == down.ndim and rank > 0 and up.shape[1] == rank
                and (up.ndim == 2 or up.shape[2:] == (1, 1)))
        if fits:
            if down.ndim == 2:
                delta = up @ down
            else:   # a conv: down [r, in, kh, kw] (the layer's kernel size), up [out, r, 1, 1]
                delta = np.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
            delta = to_nnx_layout(delta, path, target)
            fits = tuple(delta.shape) == target
        if not fits:
            expected = to_torch_layout(np.empty(target, np.int8), path).shape
            raise CheckpointError(f"{file}: key {keys['down']!r} has shape {tuple(down.shape)} and "
                                  f"{keys['up']!r} {tuple(up.shape)}: no LoRA of the layer's weight "
                                  f"{tuple(expected)} (down [rank, in(, kh, kw)], up [out, rank(, 1, 1)])")
        if "alpha" in keys:
            alpha_array = tensors[keys["alpha"]]
            if alpha_array.size != 1:
                raise CheckpointError(f"{file}: key {keys['alpha']!r} has shape {tuple(alpha_array.shape)}; "
                                      "an alpha is one number")
            alpha, divisor = float(alpha_array.reshape(())), float(rank)
        else:
            alpha, divisor = _peft_alpha(metadata, part, module.removeprefix(f"{part}."), rank)
        if path in deltas[part]:
            raise CheckpointError(f"{file}: key {keys['down']!r} changes a layer another key of the file "
                                  "changes too")
        deltas[part][path] = (float(scale) * alpha / divisor) * delta
    return deltas
