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


def _warn_too_long(tokenizer, prompt: str, ids: Sequence[int], max_length: int, kind: str) -> None:
    """The warning for a prompt of ``ids`` (start and end tokens included) cut to ``max_length`` tokens."""
    dropped = len(ids) - max_length
    start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
    tail = tokenizer.decode(ids[max_length - 1:-1])
    tail = tail if len(tail) <= 100 else tail[:100] + "..."
    warnings.warn(f"{kind} {start!r} is {len(ids)} tokens long; CLIP reads {max_length} (start and end "
                  f"tokens included), so the last {dropped} tokens were dropped: {tail!r}", UserWarning,
                  stacklevel=3)   # (the caller of tokenize)


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
        _warn_too_long(tokenizer, prompt, ids, max_length, kind)
    ids = tokenizer(expand_embedding_tokens(tokenizer, prompts), padding="max_length", max_length=max_length,
                    truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32)


# A1111's emphasis syntax (modules/prompt_parser.py, parse_prompt_attention): one alternative per kind of piece.
_ATTENTION = re.compile(r"""
    \\[()\[\]\\]             # \( \) \[ \] \\: the character itself
  | \\                       # any other backslash: dropped, as A1111 drops it
  | \( | \[                  # opens a group
  | :\s*([+-]?[.\d]+)\s*\)   # closes a (text:1.5) group with its factor
  | \) | \]                  # closes a group
  | [^\\()\[\]:]+            # text
  | :                        # a colon that ends no (text:factor)
""", re.VERBOSE)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")   # A1111's: the spaces around it go with it
COMMA_BACKTRACK = 20   # A1111's comma_padding_backtrack default
ROUND_FACTOR = 1.1   # (text) multiplies by it, [text] divides


def parse_prompt_attention(prompt: str) -> list[tuple[str, float]]:
    """A prompt's AUTOMATIC1111 emphasis syntax read as A1111's ``parse_prompt_attention`` reads it: a list
    of (text, weight) chunks, consecutive chunks of equal weight merged, at least one chunk (``[("", 1.0)]``).

    ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)``
    multiplies it by 1.5 (nested groups multiply); ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are
    those characters, another backslash is dropped; a bracket left open applies to the rest of the prompt,
    a closing one that closes nothing and a colon that ends no ``(text:factor)`` (``(word:abc)``) are text.
    ``BREAK`` stays in the text here (`chunk_weighted` reads it as A1111's chunk break). A factor that is
    no number (``(a:1.2.3)``, which A1111 fails on) is a ValueError.

    >>> parse_prompt_attention("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    if not isinstance(prompt, str):
        raise TypeError(f"parse_prompt_attention takes a prompt string, got {type(prompt).__name__}")
    chunks: list[list] = []   # [text, weight], weights multiplied in place as groups close
    rounds: list[int] = []    # where each open ( and [ group starts in chunks
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] *= factor

    for match in _ATTENTION.finditer(prompt):
        piece, factor = match.group(0), match.group(1)
        if piece.startswith("\\"):
            chunks.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(chunks))
        elif piece == "[":
            squares.append(len(chunks))
        elif factor is not None and rounds:
            try:
                value = float(factor)
            except ValueError:
                raise ValueError(f"prompt {prompt!r}: the weight {factor!r} in {piece!r} is not a number") from None
            multiply(rounds.pop(), value)
        elif piece == ")" and rounds:
            multiply(rounds.pop(), ROUND_FACTOR)
        elif piece == "]" and squares:
            multiply(squares.pop(), 1 / ROUND_FACTOR)
        else:
            chunks.append([piece, 1.0])
    for start in rounds:   # unbalanced: to the end of the prompt, in the order they were opened (as A1111)
        multiply(start, ROUND_FACTOR)
    for start in squares:
        multiply(start, 1 / ROUND_FACTOR)
    merged: list[list] = []
    for text, weight in chunks or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def _embedding_runs(tokenizer) -> dict[int, list[int]]:
    """The token ids of each multi-vector textual inversion embedding (``<style> <style>_1 <style>_2``, as
    `expand_embedding_tokens` spells it out), keyed by its first token's id."""
    added = tokenizer.added_tokens_encoder
    runs = {}
    for token, first in added.items():
        if f"{token}_1" in added:
            count = next(i for i in range(1, len(added) + 1) if f"{token}_{i}" not in added)
            runs[first] = [first] + [added[f"{token}_{i}"] for i in range(1, count)]
    return runs


# AUTOMATIC1111's "Emphasis" setting (sd_emphasis): its name for each mode sdjax has
EMPHASIS_MODES = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None"}


def check_emphasis(emphasis) -> str:
    """``emphasis`` if it is one of `EMPHASIS_MODES`; else a ValueError naming them."""
    if not isinstance(emphasis, str) or emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis={emphasis!r}: choose one of {', '.join(map(repr, EMPHASIS_MODES))} "
                         "(AUTOMATIC1111's Emphasis: Original, No norm, Ignore, None)")
    return emphasis


def chunk_weighted(tokenizer, prompt: str, max_length: int | None = None, *,
                   comma_backtrack: int = COMMA_BACKTRACK,
                   emphasis: str = "original") -> list[tuple[list[int], list[float]]]:
    """A prompt in AUTOMATIC1111's syntax cut into the chunks A1111 encodes as windows (its
    ``tokenize_line``): a list of (token ids, weights), each at most ``max_length`` - 2 tokens (75 for
    SD's CLIP), without start and end tokens, at least one (the empty prompt's is empty).

    The chunks of `parse_prompt_attention` are tokenized on their own (textual inversion tokens spelled
    out) and their tokens laid out one after the other; a chunk is closed when it is full, at ``BREAK``
    (the word in capitals between word boundaries, with the spaces around it; in a bracket group too,
    where A1111 would tokenize it as a word of weight -1.1), and where a multi-vector embedding would
    cross its end (the embedding moves to the next chunk whole). When a chunk is full and its last comma
    is at most ``comma_backtrack`` tokens from its end (A1111's ``comma_padding_backtrack``, default 20;
    0: off), the tokens after that comma move to the next chunk (a comma that ends the chunk moves none).
    An embedding longer than a chunk is a ValueError.

    ``emphasis``: A1111's Emphasis setting (`EMPHASIS_MODES`): "original" and "no_norm" weight the tokens
    as above (they differ in the encoder: `sdjax.sampling.emphasize`); "ignore" reads the syntax (and
    ``BREAK``) but weights every token 1; "none" reads no syntax: the prompt is text, ``BREAK`` a word."""
    if not isinstance(prompt, str):
        raise TypeError(f"chunk_weighted takes a prompt string, got {type(prompt).__name__}")
    if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) or comma_backtrack < 0:
        raise ValueError(f"comma_backtrack={comma_backtrack!r}: must be a whole number >= 0")
    size = (max_length or tokenizer.model_max_length) - 2
    pieces: list[tuple[str, float] | None] = []   # None: a BREAK
    # (A1111's tokenize_line with Emphasis None: the line as one piece of weight 1, BREAK a word in it)
    parsed = [(prompt, 1.0)] if check_emphasis(emphasis) == "none" else parse_prompt_attention(prompt)
    for text, weight in parsed:
        for i, part in enumerate(_BREAK_SPLIT.split(text) if emphasis != "none" else [text]):
            if i:
                pieces.append(None)
            pieces.append((part, 1.0 if emphasis == "ignore" else weight))
    texts = expand_embedding_tokens(tokenizer, [piece[0] for piece in pieces if piece is not None])
    tokenized = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids)
    comma = tokenizer.convert_tokens_to_ids(",</w>")   # (the unknown token's id where there is none: no comma)
    comma = comma if tokenizer.convert_ids_to_tokens(comma) == ",</w>" else None
    runs = _embedding_runs(tokenizer)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1   # the index in ids of the chunk's last comma

    def close(moved: int = 0) -> None:   # the chunk ends; its last `moved` tokens start the next one
        nonlocal ids, weights, last_comma
        cut = len(ids) - moved
        chunks.append((ids[:cut], weights[:cut]))
        ids, weights, last_comma = ids[cut:], weights[cut:], -1

    for piece in pieces:
        if piece is None:
            close()
            continue
        tokens, weight = next(tokenized), piece[1]
        position = 0
        while position < len(tokens):
            token = tokens[position]
            run = runs.get(token)
            n = len(run) if run is not None and tokens[position:position + len(run)] == run else 1
            if n > size:
                raise ValueError(f"prompt {prompt!r}: the textual inversion embedding {tokenizer.decode([token])!r} "
                                 f"has {n} vectors, more than a window's {size} tokens")
            if token == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == size and last_comma != -1 and size - last_comma <= comma_backtrack:
                close(moved=size - last_comma - 1)
            if len(ids) == size or len(ids) + n > size:
                close()
            ids += tokens[position:position + n]
            weights += [weight] * n
            position += n
    if ids or not chunks:
        close()
    return chunks


def window_count(tokenizer, prompts: str | Sequence[str], max_length: int | None = None, *,
                 comma_backtrack: int = COMMA_BACKTRACK, emphasis: str = "original") -> int:
    """How many windows of ``max_length`` tokens (77 for SD's CLIP) the longest of ``prompts`` takes
    in AUTOMATIC1111's reading (`chunk_weighted`): `tokenize_weighted`'s ``windows`` that cuts none."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return max((len(chunk_weighted(tokenizer, p, max_length, comma_backtrack=comma_backtrack, emphasis=emphasis))
                for p in dict.fromkeys(prompts)), default=1)


def tokenize_weighted(tokenizer, prompts: str | Sequence[str], max_length: int | None = None, *,
                      kind: str = "prompt", warn: bool = True, windows: int | None = None,
                      comma_backtrack: int = COMMA_BACKTRACK,
                      emphasis: str = "original") -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [B, windows * max_length] and their emphasis weights float32 (same shape) of
    prompts written in AUTOMATIC1111's syntax, laid out as A1111 lays them out: each prompt's chunks
    (`chunk_weighted`: emphasis of `parse_prompt_attention`, ``BREAK``, 75 tokens a chunk, the comma
    backtrack, embeddings kept whole) each in a window of its own, the start token, the chunk, the end
    token and `tokenize`'s padding (``max_length``, 77 for SD), each token weighted as its chunk of the
    syntax and the others 1.0; the windows one after the other. ``windows``: how many per prompt (None:
    as many as the longest prompt takes, `window_count`); a prompt with fewer has empty windows added
    (the empty prompt's, weights 1), one with more is cut to the first ``windows`` (a warning says what is
    dropped). A prompt of one window without ``BREAK`` has `tokenize`'s ids and weights of 1 where it
    has no syntax. `sdjax.sampling.encode_prompts` encodes each window on its own and applies the
    weights per window (`sdjax.sampling.emphasize`), as A1111 does. ``emphasis``: see `chunk_weighted`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError(f"no {kind}s to tokenize (an empty list)")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{kind}s must be strings")
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, (int, np.integer))
                                or windows < 1):
        raise ValueError(f"windows={windows!r}: must be a whole number >= 1 (or None: as many as needed)")
    max_length = max_length or tokenizer.model_max_length
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    chunked = {p: chunk_weighted(tokenizer, p, max_length, comma_backtrack=comma_backtrack, emphasis=emphasis)
               for p in dict.fromkeys(prompts)}   # a batch often repeats one prompt for many seeds
    windows = int(windows or max(len(c) for c in chunked.values()))
    rows: dict[str, tuple[list[int], list[float]]] = {}
    for prompt, chunks in chunked.items():
        if len(chunks) > windows:
            if warn:
                dropped = [t for ids, _ in chunks[windows:] for t in ids]
                head = prompt if len(prompt) <= 40 else prompt[:40] + "..."
                tail = tokenizer.decode(dropped)
                tail = tail if len(tail) <= 100 else tail[:100] + "..."
                warnings.warn(f"{kind} {head!r} takes {len(chunks)} windows of {max_length} tokens; {windows} are "
                              f"read, so its last {len(dropped)} tokens were dropped: {tail!r}", UserWarning,
                              stacklevel=2)
            chunks = chunks[:windows]
        chunks = chunks + [([], [])] * (windows - len(chunks))
        ids, weights = [], []
        for chunk_ids, chunk_weights in chunks:
            rest = max_length - 2 - len(chunk_ids)
            ids += [start] + chunk_ids + [end] + [pad] * rest
            weights += [1.0] + chunk_weights + [1.0] + [1.0] * rest
        rows[prompt] = ids, weights
    return (np.asarray([rows[p][0] for p in prompts], dtype=np.int32),
            np.asarray([rows[p][1] for p in prompts], dtype=np.float32))


# ----------------------------------------------------------------------------- prompt editing
# AUTOMATIC1111's prompt editing, [from:to:when] / [to:when] / [from::when], and alternation, [a|b|c],
# read as its prompt_parser's grammar reads them: a bracket is one of these only where its whole inside
# is prompt syntax (text, backslash escapes, (emphasis), (emphasis:x), [emphasis] and these two again);
# at the prompt's own level brackets and colons that form none are text. A '|' outside an alternation
# (or a backslash at the very end) fails A1111's parse: the prompt is then used as written, unedited.
_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*")


class _Unparsed(Exception):
    """The prompt is not in A1111's editing grammar."""


def _nodes(text: str, i: int, top: bool) -> tuple[list, int]:
    """The syntax of ``text`` from ``i``: text pieces (str), ``("edit", from, to, when)`` and ``("alt",
    options)``, their parts node lists again. Inside a bracket (``top`` False) it ends at the first
    ``] ) : |`` of its own level: the index returned."""
    nodes: list = []
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 == len(text):
                raise _Unparsed
            nodes.append(text[i:i + 2])   # (kept as written: the emphasis parser reads the escape)
            i += 2
        elif c in "[(":
            try:
                inner, i = _bracket(text, i)
                nodes += inner
            except _Unparsed:
                if not top:
                    raise
                nodes.append(c)   # a bracket that forms nothing: text (what it holds is read on)
                i += 1
        elif c in "]):|":
            if not top:
                break
            if c == "|":
                raise _Unparsed
            nodes.append(c)
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in "\\[]():|":
                j += 1
            nodes.append(text[i:j])
            i = j
    return nodes, i


def _bracket(text: str, i: int) -> tuple[list, int]:
    """The nodes of the construct ``text[i]`` (``[`` or ``(``) opens, and the index after it; _Unparsed
    where it forms none."""
    def at(k: int) -> str:
        return text[k] if k < len(text) else ""
    first, j = _nodes(text, i + 1, top=False)
    if text[i] == "(":   # emphasis: kept as written, for the emphasis parser
        if at(j) == ")":
            return ["(", *first, ")"], j + 1
        if at(j) == ":":
            second, k = _nodes(text, j + 1, top=False)
            if at(k) == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        raise _Unparsed
    if at(j) == "]":
        return ["[", *first, "]"], j + 1
    if at(j) == "|":
        options = [first]
        while at(j) == "|":
            option, j = _nodes(text, j + 1, top=False)
            options.append(option)
        if at(j) == "]":
            return [("alt", options)], j + 1
    elif at(j) == ":":
        second, k = _nodes(text, j + 1, top=False)
        if at(k) == "]":   # [to:when]
            when = _WHEN.fullmatch(text, j + 1, k)
            if when:
                return [("edit", [], first, when.group(1))], k + 1
        elif at(k) == ":":   # [from:to:when]
            close = text.find("]", k + 1)
            when = _WHEN.fullmatch(text, k + 1, close) if close > 0 else None
            if when:
                return [("edit", first, second, when.group(1))], close + 1
    raise _Unparsed


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A prompt's AUTOMATIC1111 prompt editing and alternation over ``steps`` sampling steps, as A1111's
    ``get_learned_conditioning_prompt_schedules`` gives it: ``[(last_step, text), ...]``, the text each
    step up to ``last_step`` (from 1, after the entry before) is conditioned on, the last entry's step
    ``steps``.

    ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
    after it, ``[from::when]`` removes ``from``. ``when`` with a decimal point is a fraction of the steps
    (``0.25`` of 20: 5), without one a step (capped at ``steps``; below 1: ``to`` from the start);
    ``[a|b|c]`` is ``a`` at step 1, ``b`` at 2, ``c`` at 3, ``a`` at 4, ...; both nest, and may hold
    emphasis, which stays in the texts as written (`parse_prompt_attention` reads it). A prompt A1111
    cannot parse (a ``|`` outside an alternation) is one entry, as written.

    >>> prompt_schedule("a [cat:dog:0.5] in the [snow|rain]", 4)
    [(1, 'a cat in the snow'), (2, 'a cat in the rain'), (3, 'a dog in the snow'), (4, 'a dog in the rain')]
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be a whole number >= 1")
    try:
        nodes, _ = _nodes(prompt, 0, top=True)
    except _Unparsed:
        return [(steps, prompt)]

    def step_of(when: str) -> int:   # (below 1: never reached; a float's inf is capped like any number)
        value = float(when) * (steps if "." in when else 1)
        return int(min(max(value, 0.0), steps))

    ends = {steps}

    def collect(nodes) -> None:
        for node in nodes:
            if isinstance(node, tuple) and node[0] == "edit":
                ends.update({step_of(node[3])} - {0})
                collect(node[1]), collect(node[2])
            elif isinstance(node, tuple):
                ends.update(range(1, steps + 1))
                for option in node[1]:
                    collect(option)

    def text_at(nodes, step: int) -> str:
        parts = []
        for node in nodes:
            if isinstance(node, str):
                parts.append(node)
            elif node[0] == "edit":
                parts.append(text_at(node[1] if step <= step_of(node[3]) else node[2], step))
            else:
                parts.append(text_at(node[1][(step - 1) % len(node[1])], step))
        return "".join(parts)

    collect(nodes)
    return [(end, text_at(nodes, end)) for end in sorted(ends)]


def edited_prompts(prompt: str, steps: int, calls: int) -> tuple[list[str], list[int]]:
    """`prompt_schedule` per model call, as A1111's sampler counts them: the prompt's distinct texts (in
    order of first use) and, for each of ``calls`` model calls (the run's from its first: counts from 0),
    the index of its text: the first entry whose last step is at least the count (so calls 0 and 1
    both take step 1's text), or the first entry past the last step, as A1111's ``reconstruct_cond_batch``."""
    schedule = prompt_schedule(prompt, steps)
    texts = list(dict.fromkeys(text for _, text in schedule))
    entry = [next((k for k, (end, _) in enumerate(schedule) if c <= end), 0) for c in range(calls)]
    return texts, [texts.index(schedule[k][1]) for k in entry]


# ----------------------------------------------------------------------------- AND
# AUTOMATIC1111 splits a prompt at the word AND (in capitals) before anything else, and reads a
# trailing ":number" of each part as its weight (also of a prompt with no AND): its get_multicond_prompt_list.
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*\Z")


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """A prompt's parts and their weights as AUTOMATIC1111's ``AND`` (composable diffusion) reads them:
    the prompt split at each word ``AND``, each part's trailing ``:number`` (spaces around the colon
    allowed) its weight, 1.0 where it has none, and its trailing spaces dropped. The sampler guides each
    image by all its parts at once, eps_u + g * sum_k w_k (eps_k - eps_u) (`sdjax.sampling.Composition`);
    each part has its own emphasis, windows and prompt editing. A prompt with no ``AND`` is one part,
    whose weight scales its guidance.

    >>> composable_parts("a cat AND a dog :0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = []
    for part in _AND.split(prompt):
        weight = _PART_WEIGHT.search(part)
        if weight is None:
            parts.append((part.rstrip(), 1.0))
        else:
            parts.append((part[:weight.start()], float(weight.group(1))))
    return parts
