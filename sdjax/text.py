"""Prompt tokenization with transformers' CLIPTokenizer (vocab.json + merges.txt, or tokenizer.json)."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from sdjax.weights import CheckpointError, resolve_model_dir


MAX_TOKENS_LIMIT = 100_000   # a model_max_length above this is transformers' "no limit" (int(1e30))


def _clip_tokenizer_class():
    """transformers' CLIPTokenizer, imported without the "PyTorch was not found. Models won't be
    available" advice transformers prints when torch is not installed: sdjax uses only its
    tokenizers, which need no torch, and a newcomer would take the line for a broken install."""
    previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        from transformers import CLIPTokenizer
    finally:
        if previous is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous
    return CLIPTokenizer


def load_tokenizer(path_or_repo_id, *, subfolder: str | None = "tokenizer", revision: str | None = None):
    """The checkpoint's ``CLIPTokenizer`` (from a local pipeline folder or a Hub repo id)."""
    CLIPTokenizer = _clip_tokenizer_class()
    directory = resolve_model_dir(path_or_repo_id, subfolder, revision, allow_patterns=["*.json", "*.txt"])
    # Without its vocabulary transformers builds a tokenizer of a few special tokens, which turns
    # every prompt into the same ids: the images would ignore the prompt.
    if not ((directory / "tokenizer.json").is_file()
            or ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file())):
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise CheckpointError(f"{directory}: not a CLIP tokenizer: it needs vocab.json + merges.txt or tokenizer.json "
                              f"(it has {', '.join(present) or 'no files'})")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise CheckpointError(f"{directory}: not a readable CLIP tokenizer "
                              f"(needs vocab.json + merges.txt or tokenizer.json): {e}") from e
    if tokenizer.model_max_length > MAX_TOKENS_LIMIT:   # transformers' "no limit" placeholder (1e30)
        raise CheckpointError(f"{directory}: the tokenizer has no model_max_length (the text encoder's window, 77 "
                              "for SD's CLIP): tokenizer_config.json is missing or lacks it; add "
                              '{"model_max_length": 77} to it')
    return tokenizer


def save_tokenizer(tokenizer, directory) -> None:
    """Write the tokenizer as transformers 5 does (tokenizer.json) and also as vocab.json +
    merges.txt, the files transformers 4's CLIPTokenizer reads, so that a saved pipeline loads
    with either (diffusers is often run with transformers 4)."""
    tokenizer.save_pretrained(str(directory))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        return
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (Path(directory) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    # CLIP's own merges.txt starts with a version line, which transformers 4 skips.
    (Path(directory) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def expand_embedding_tokens(tokenizer, prompts: Sequence[str]) -> list[str]:
    """``prompts`` with each multi-vector textual inversion token spelled out as its tokens, as
    diffusers' ``maybe_convert_prompt`` does: an embedding of 3 vectors loaded as ``<style>`` is the
    tokens ``<style> <style>_1 <style>_2`` (`StableDiffusion.load_textual_inversion` adds them). The
    tokenizer matches added tokens in any letter case (it lowercases the text), and so does this; it
    spells out a token only where the tokenizer matches it (the longest added token at each place), so
    ``EasyNegativeV2`` beside ``EasyNegative`` and a row written out (``<style>_2``) stay as they are
    (diffusers' ``str.replace`` spells out ``EasyNegative`` inside them too)."""
    added = tokenizer.added_tokens_encoder
    multi = {t.lower(): t for t in added if f"{t}_1" in added}
    if not multi:
        return list(prompts)
    # One pass over every added token, longest first, as the tokenizer matches them (leftmost, longest):
    # a token that starts another one (EasyNegative, EasyNegativeV2) spells out only where it is the match.
    pattern = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))), re.IGNORECASE)

    def spell(match: re.Match) -> str:
        token = multi.get(match.group(0).lower())
        if token is None:
            return match.group(0)
        count = next(i for i in range(1, len(added) + 1) if f"{token}_{i}" not in added)
        return " ".join([token] + [f"{token}_{i}" for i in range(1, count)])

    expanded: dict[str, str] = {}   # a batch often repeats one prompt for many seeds
    for prompt in dict.fromkeys(prompts):
        lower = prompt.lower()
        expanded[prompt] = pattern.sub(spell, prompt) if any(t in lower for t in multi) else prompt
    return [expanded[p] for p in prompts]


def too_long(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> list[tuple[str, list[int]]]:
    """The distinct prompts longer than the text encoder's window, each with its full token ids."""
    max_length = max_length or tokenizer.model_max_length
    distinct = list(dict.fromkeys(prompts))  # a batch often repeats one prompt for many seeds
    full = tokenizer(expand_embedding_tokens(tokenizer, distinct), padding=False, truncation=False,
                     verbose=False).input_ids
    return [(prompt, ids) for prompt, ids in zip(distinct, full) if len(ids) > max_length]


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None, *,
             kind: str = "prompt", warn: bool = True) -> np.ndarray:
    """Token ids int32 [B, max_length] (77 for SD), padded with the end token as SD was trained.

    A prompt longer than the text encoder's window is truncated, with one warning per distinct
    prompt that quotes its start and the dropped words (``kind`` names it: "prompt", "negative prompt";
    ``warn=False``: none, for callers that count them with `too_long` instead).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError(f"no {kind}s to tokenize (an empty list)")
    max_length = max_length or tokenizer.model_max_length
    for prompt, ids in too_long(tokenizer, prompts, max_length) if warn else ():
        dropped = len(ids) - max_length
        start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
        tail = tokenizer.decode(ids[max_length - 1:-1])
        tail = tail if len(tail) <= 100 else tail[:100] + "..."
        warnings.warn(f"{kind} {start!r} is {len(ids)} tokens long; CLIP reads {max_length} (start and end "
                      f"tokens included), so the last {dropped} tokens were dropped: {tail!r}", UserWarning,
                      stacklevel=2)
    ids = tokenizer(expand_embedding_tokens(tokenizer, prompts), padding="max_length", max_length=max_length,
                    truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32)
