"""The CLIP text encoder (transformers' ``CLIPTextModel``) in Flax NNX."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.models.layers import Pretrained, attention, check_config_floats, check_config_ints, layer_norm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The CLIP text encoder's architecture (transformers' ``CLIPTextConfig`` fields sdjax builds;
    defaults: SD v1.5's ViT-L/14 text tower)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # transformers' default; SD v1.5's config says 2 (the legacy pooling below)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "CLIPTextConfig":
        """From a ``text_encoder/config.json`` dict (or a full ``CLIPConfig``'s); an activation sdjax
        does not have is a NotImplementedError, other keys are ignored."""
        if cfg.get("model_type") == "clip" and "text_config" in cfg:  # a full CLIPConfig
            cfg = cfg["text_config"]
        if cfg.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise NotImplementedError(f"CLIP hidden_act={cfg['hidden_act']!r} is not supported "
                                      f"(one of {sorted(ACTIVATIONS)})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known and v is not None})

    def __post_init__(self):
        check_config_ints("CLIP text", self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "max_position_embeddings")
        check_config_floats("CLIP text", self, "layer_norm_eps", positive=True)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP text config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array          # [B, T, D], after final_layer_norm: what SD conditions on
    pooler_output: jax.Array              # [B, D], the state at each prompt's end-of-text token
    hidden_states: tuple | None = None    # embeddings + every layer's output (for clip-skip)


class CLIPAttention(nnx.Module):
    def __init__(self, dim, heads, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.q_proj, self.k_proj = nnx.Linear(dim, dim, **kw), nnx.Linear(dim, dim, **kw)
        self.v_proj, self.out_proj = nnx.Linear(dim, dim, **kw), nnx.Linear(dim, dim, **kw)

    def __call__(self, x_BTD):
        B, T, D = x_BTD.shape
        split = lambda t: t.reshape(B, T, self.heads, D // self.heads)  # noqa: E731
        out = attention(split(self.q_proj(x_BTD)), split(self.k_proj(x_BTD)), split(self.v_proj(x_BTD)),
                        is_causal=True)  # causal mask only; SD passes no padding mask
        return self.out_proj(out.reshape(B, T, D))


class CLIPMLP(nnx.Module):
    def __init__(self, dim, hidden, act, *, dtype, param_dtype, rngs):
        self.act = act
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, **kw)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

    def __call__(self, input_ids_BT):
        input_ids_BT = jnp.asarray(input_ids_BT)
        if input_ids_BT.ndim != 2 or not jnp.issubdtype(input_ids_BT.dtype, jnp.integer):
            raise ValueError(f"input_ids_BT has shape {tuple(input_ids_BT.shape)} and dtype {input_ids_BT.dtype}; "
                             "expected integer token ids [batch, tokens] (sdjax.text.tokenize gives them)")
        vocab = self.token_embedding.num_embeddings
        if not isinstance(input_ids_BT, jax.core.Tracer) and input_ids_BT.size:
            largest = int(np.max(input_ids_BT))
            if largest >= vocab or int(np.min(input_ids_BT)) < 0:   # jnp.take would give NaN rows, as below
                raise ValueError(f"token id {largest if largest >= vocab else int(np.min(input_ids_BT))} is outside "
                                 f"the text encoder's vocabulary 0..{vocab - 1} (a tokenizer with added tokens "
                                 "needs an embedding resized to match)")
        T, limit = input_ids_BT.shape[1], self.position_embedding.num_embeddings
        if T > limit:  # jnp.take would give NaN rows, which causal attention spreads to every token
            raise ValueError(f"token sequence of length {T} is longer than the CLIP text encoder's "
                             f"max_position_embeddings={limit}; truncate it (sdjax.text.tokenize does)")
        positions = jnp.arange(T)
        return self.token_embedding(input_ids_BT) + self.position_embedding(positions)[None]


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, **kw)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)


class CLIPTextModel(nnx.Module, Pretrained):
    """Token ids [B, T] -> `CLIPTextOutput`. The attribute tree mirrors transformers' names
    (``text_model.encoder.layers[i].self_attn.q_proj``) so checkpoints map one to one."""

    def __init__(self, config: CLIPTextConfig | dict, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        cfg = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(config)
        self.config, self.dtype = cfg, dtype
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, param_dtype=param_dtype or dtype, rngs=rngs)

    def __call__(self, input_ids_BT, output_hidden_states: bool = False) -> CLIPTextOutput:
        """Encode token ids [B, T] (int; any array-like): ``last_hidden_state`` [B, T, D] (after the
        final layer norm, what SD conditions on), ``pooler_output`` [B, D] (at each end token) and,
        with ``output_hidden_states``, the embeddings and every layer's output. Ids outside the
        vocabulary are an error when the ids are concrete; under ``jit`` they cannot be checked,
        and give NaN states."""
        input_ids_BT = jnp.asarray(input_ids_BT)
        tm = self.text_model
        x = tm.embeddings(input_ids_BT)
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = tm.final_layer_norm(x)
        if self.config.eos_token_id == 2:  # legacy configs: the end token has the largest id
            eos_pos = jnp.argmax(input_ids_BT, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids_BT == self.config.eos_token_id, axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos_pos]
        return CLIPTextOutput(last, pooled, tuple(hidden) if output_hidden_states else None)
