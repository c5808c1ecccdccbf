"""The model configs the tests and benchmarks build models at (tiny ones, and SD v1.5's real
ones for the slow suite and the GPU benchmarks), as diffusers / transformers dicts, and a tiny CLIP
tokenizer. No torch here: ``benchmarks/common.py build`` uses this on a plain install."""
from __future__ import annotations

import json
from pathlib import Path

# Two levels, one layer a block: SD's block kinds (cross-attention, then a last level without) at the fewest
# layers, as most tests compile it (its programs compile in about half the time of the deep one's).
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# Three levels, two layers a block: the skip connections' order over several layers and levels (a UNet parity
# test in tests/test_models.py), the original layout's layer numbering (tests/test_controlnet.py), and the model
# whose learning figures the README quotes (tests/test_training_learns.py).
TINY_UNET_DEEP = dict(
    TINY_UNET, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    scaling_factor=0.13025,   # not the default 0.18215: a loader that ignored the config would show
)
TINY_CLIP = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32,
)
# The real SD v1.5 configs (for the slow suite).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_CLIP = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768,
)


def write_tiny_tokenizer(directory: Path) -> Path:
    """A small but real CLIP BPE vocabulary (vocab.json + merges.txt) in CLIPTokenizer's format:
    byte-level base tokens, their end-of-word forms, a few merges and the two special tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the rest map above 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    base = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    vocab = base + [b + "</w>" for b in base]
    merges = ["t h", "th e</w>", "o f</w>", "c a", "ca t</w>", "d o", "do g</w>", "p h", "o t",
              "ph ot", "phot o</w>", "r e", "re d</w>", "b l", "bl u", "blu e</w>", "i n</w>"]
    for m in merges:
        vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "do_lower_case": True}))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    return directory
