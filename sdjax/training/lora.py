"""LoRA fine-tuning: low-rank changes of the attention projections, trained while the models stay frozen.

Each targeted kernel W [in, out] is trained as ``W + alpha / rank * down @ up`` (down [in, rank], up
[rank, out]): the modules diffusers' LoRA training scripts target, the UNet's ``to_q`` / ``to_k`` /
``to_v`` / ``to_out.0`` and, when the text encoder trains too, its ``q_proj`` / ``k_proj`` / ``v_proj`` /
``out_proj``. ``down`` starts as N(0, 1 / rank^2) (PEFT's "gaussian" init, which diffusers' scripts
use) and ``up`` as zeros, so training starts from the model itself.

The train step computes each target as ``base(x) + alpha / rank * (x @ down) @ up`` (`attach`: the
models merged for the step get a `LoraLinear` in place of each target Linear; their code is not
changed), as PEFT does: no gradient of the frozen kernels is computed, and in bf16 the change is rounded
as part of the Linear's output, where a merged ``W + delta`` rounded to bf16 would lose, weight by
weight, each delta below W's rounding step (at the start of a run, all of them). Sampling and the export use the merged kernels (`merged`).

The trained tree is {kohya module name: {"down", "up"}}: the names of the file `save_lora` writes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from sdjax.weights import kohya_lora_name, torch_key

# The modules trained, by the end of their PyTorch module name (diffusers' LoRA scripts' target_modules)
TARGET_MODULES = {"unet": ("to_q", "to_k", "to_v", "to_out.0"),
                  "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run trains (static: part of the compiled step)."""
    rank: int
    alpha: float
    targets: tuple[tuple[str, str, tuple], ...]   # (kohya module name, part, NNX path of its kernel)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def parts(self) -> tuple[str, ...]:
        """The pipeline parts changed: ("unet",) or ("unet", "text_encoder")."""
        return tuple(dict.fromkeys(part for _, part, _ in self.targets))

    def of(self, part: str) -> tuple[tuple[str, tuple], ...]:
        """(kohya module name, kernel path) of ``part``'s targets."""
        return tuple((name, path) for name, p, path in self.targets if p == part)


def lora_spec(base: dict[str, dict], *, rank: int, alpha: float | None = None,
              modules: dict[str, tuple[str, ...]] = TARGET_MODULES) -> LoraSpec:
    """The spec of rank-``rank`` LoRA (``alpha`` None: the rank, a scale of 1) of the Linears of each
    part in ``base`` ({"unet": pure dict, ["text_encoder": pure dict]}) whose PyTorch module names end
    in one of ``modules[part]``."""
    targets = []
    for part, params in base.items():
        for path in sorted(flatten_dict(params), key=str):
            module = "." + torch_key(path).removesuffix(".weight")
            if path[-1] == "kernel" and module.endswith(tuple("." + m for m in modules[part])):
                targets.append((kohya_lora_name(part, path), part, path))
    if not targets:
        raise ValueError(f"no LoRA target modules ({', '.join(TARGET_MODULES['unet'])}) in the model")
    return LoraSpec(rank=int(rank), alpha=float(rank if alpha is None else alpha), targets=tuple(targets))


def init_lora(spec: LoraSpec, base: dict[str, dict], key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Step 0's LoRA weights (float32): ``down`` N(0, 1 / rank^2), keyed by ``key`` and the module's
    place in the spec, ``up`` zeros."""
    lora = {}
    for i, (name, part, path) in enumerate(spec.targets):
        fan_in, fan_out = flatten_dict(base[part])[path].shape
        down = jax.random.normal(jax.random.fold_in(key, i), (fan_in, spec.rank), jnp.float32) / spec.rank
        lora[name] = {"down": down, "up": jnp.zeros((spec.rank, fan_out), jnp.float32)}
    return lora


def target_kernels(params: dict, spec: LoraSpec, part: str) -> dict:
    """The target kernels of ``params`` (a part's pure dict) alone, as a nested dict."""
    flat = flatten_dict(params)
    return unflatten_dict({path: flat[path] for _, path in spec.of(part)})


def merged(params: dict, lora: dict, spec: LoraSpec, part: str, *, only_targets: bool = False) -> dict:
    """``params`` (a part's pure dict) with each target kernel W replaced by ``W + scale * down @ up``,
    in float32; ``only_targets``: just those kernels (for ``set_params(..., partial=True)``)."""
    flat = flatten_dict(params)
    changed = {path: jnp.asarray(flat[path], jnp.float32) + spec.scale * (lora[name]["down"] @ lora[name]["up"])
               for name, path in spec.of(part)}
    return unflatten_dict(changed if only_targets else {**flat, **changed})


class LoraLinear(nnx.Module):
    """A frozen ``nnx.Linear`` with its LoRA branch: ``base(x) + scale * (x @ down) @ up``, the branch in
    the Linear's compute dtype."""

    def __init__(self, base: nnx.Linear, down, up, scale: float):
        dtype = base.dtype or down.dtype
        self.base, self.scale = base, scale
        self.down, self.up = nnx.Param(down.astype(dtype)), nnx.Param(up.astype(dtype))

    def __call__(self, x):
        return self.base(x) + self.scale * ((x @ self.down[...]) @ self.up[...])


def attach(model: nnx.Module, lora: dict, spec: LoraSpec, part: str) -> nnx.Module:
    """``model`` (pipeline part ``part``, merged for one train step) with each of its target Linears
    replaced by a `LoraLinear` of ``lora``'s weights (a no-op for a part without targets)."""
    for name, path in spec.of(part):
        *parents, attr = path[:-1]
        owner = model
        for p in parents:
            owner = owner[p] if isinstance(p, int) else getattr(owner, p)
        base = owner[attr] if isinstance(attr, int) else getattr(owner, attr)
        if not isinstance(base, nnx.Linear):
            raise TypeError(f"LoRA target {name} ({'.'.join(map(str, path[:-1]))}) is a {type(base).__name__}; "
                            "LoRA branches go on nnx.Linear layers")
        branch = LoraLinear(base, lora[name]["down"], lora[name]["up"], spec.scale)
        if isinstance(attr, int):
            owner[attr] = branch
        else:
            setattr(owner, attr, branch)
    return model
