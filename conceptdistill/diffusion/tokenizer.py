"""Word-level CLIP tokenizers written from scratch, and the lookup of a concept word's tokens in a prompt.

The tiny test models and the shapes-world model need a tokenizer but may not download one. Instead of a
different tokenizer class, we write the two files a real `transformers.CLIPTokenizer` reads (vocab.json and
merges.txt) for a small vocabulary, so that every prompt goes through exactly the code Stable Diffusion's
tokenizer uses. Each listed word gets one merge chain ending in ``word</w>``, so it becomes a single token;
any other word falls back to pieces of the vocabulary (down to byte-level characters), i.e. several tokens,
as rare words do in SD.

`concept_token_indices` accepts a concept word only as a whole word of the prompt, judged by the tokenizer's own
word-boundary markers (CLIP's ``</w>`` suffix, sentencepiece's ``▁`` prefix), never by how BPE splits it.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2/CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the best (lowest) merge rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, -1), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
        candidates = [(rank, i) for rank, i in pairs if rank >= 0]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merge rules under which every word in `words` encodes to the single symbol ``word</w>``.

    Independent per-word chains interfere: BPE applies the best-ranked pair found anywhere in a word, so the
    first merge of "arms" ("a r") would fire inside "square" and break its chain. Instead, words are added one
    at a time: segment the new word with the rules so far, then append rules joining its segments left to
    right. Appended rules rank after all earlier ones, so they cannot change how earlier words encode (at
    every step of an earlier word one of its own, better-ranked rules still applies).
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + END_OF_WORD], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_merges(symbols, ranks)
    return merges


def clean_words(words: Iterable[str], *, lower: bool) -> list[str]:
    """The distinct words of a written test tokenizer's vocabulary, stripped (and lower-cased when `lower`, as CLIP
    lower-cases its input), in first-seen order.

    Raises ValueError for an empty word or one with anything but ASCII letters: the byte-level pre-tokenizer would
    split non-ASCII letters into UTF-8 bytes, and both pre-tokenizers split at anything else.
    """
    clean: list[str] = []
    for word in words:
        word = word.strip().lower() if lower else word.strip()
        if not (word.isascii() and word.isalpha()):
            raise ValueError(f"tokenizer words must be non-empty and made of ASCII letters, got {word!r}")
        if word not in clean:
            clean.append(word)
    return clean


def write_word_tokenizer(
    folder: str | os.PathLike,
    words: Iterable[str],
    *,
    model_max_length: int = 16,
) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and a tokenizer config to `folder` and load them as a `CLIPTokenizer`.

    Vocabulary (in CLIP's id order): the 256 byte characters, the same with ``</w>``, the intermediate and final
    symbols of each word's merge chain, then ``<|startoftext|>`` and ``<|endoftext|>`` (also used for padding
    and unknowns, as in SD). Words are lower-cased (CLIP lower-cases its input) and must be made of ASCII letters
    only (CLIP's pre-tokenizer splits at anything else).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = clean_words(words, lower=True)

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [c + END_OF_WORD for c in alphabet]:
        vocab[symbol] = len(vocab)
    merges = _word_merges(clean)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in (BOS_TOKEN, EOS_TOKEN):
        vocab[special] = len(vocab)

    with open(folder / "vocab.json", "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        handle.writelines(f"{left} {right}\n" for left, right in merges)
    config: dict[str, Any] = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    # Guard against any divergence between our merge simulation and the tokenizers library.
    for word in clean:
        tokens = tokenizer.tokenize(word)
        if tokens != [word + END_OF_WORD]:
            raise RuntimeError(f"word {word!r} tokenizes to {tokens}, expected one token {word + END_OF_WORD!r}")
    return tokenizer


SENTENCEPIECE_WORD_START = "\u2581"  # "▁": sentencepiece (T5) writes the space before a word as this prefix


class WordBoundaries(NamedTuple):
    """How a tokenizer marks words in its token strings: exactly one of the two fields is set."""

    end_suffix: str | None = None  # CLIP's BPE: a word's last piece ends with "</w>"
    start_prefix: str | None = None  # sentencepiece: a word's first piece starts with "▁"


def word_boundaries(tokenizer: Any) -> WordBoundaries:
    """The word-boundary marker that `tokenizer` writes into its token strings.

    Read from the tokenizer's own configuration: a `tokenizers` backend whose BPE model has an
    ``end_of_word_suffix`` (CLIP: the fast class, and the only class in transformers 5) or whose pre-tokenizer
    is a ``Metaspace`` (T5 and other sentencepiece conversions); a slow sentencepiece tokenizer (``sp_model``).
    Only the slow transformers 4 `CLIPTokenizer`, whose BPE appends ``</w>`` in Python code, is recognised by
    its class.

    Raises:
        NotImplementedError: naming the tokenizer class when none of these applies (e.g. GPT-2's byte-level BPE,
            whose word starts depend on spaces the token strings do not always show).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        suffix = getattr(backend.model, "end_of_word_suffix", None)
        if suffix:
            return WordBoundaries(end_suffix=suffix)
        prefix = _metaspace_replacement(json.loads(backend.to_str()).get("pre_tokenizer"))
        if prefix:
            return WordBoundaries(start_prefix=prefix)
    elif getattr(tokenizer, "sp_model", None) is not None:
        return WordBoundaries(start_prefix=SENTENCEPIECE_WORD_START)
    elif any(cls.__name__ == "CLIPTokenizer" for cls in type(tokenizer).__mro__):
        return WordBoundaries(end_suffix=END_OF_WORD)
    raise NotImplementedError(
        f"cannot tell word boundaries from the tokens of a {type(tokenizer).__name__}: concept words are located "
        "by CLIP's end-of-word suffix or sentencepiece's word-start prefix"
    )


def _metaspace_replacement(node: Any) -> str | None:
    """The ``replacement`` of a Metaspace pre-tokenizer anywhere in a serialised pre-tokenizer (or None)."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace":
            return node.get("replacement") or SENTENCEPIECE_WORD_START
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = _metaspace_replacement(child)
            if found:
                return found
    return None


def _word_edges(tokens: Sequence[str], special: Sequence[bool], rule: WordBoundaries) -> tuple[list[bool], list[bool]]:
    """Per position, whether the token starts a word and whether it ends one (special tokens delimit words).

    With a start prefix, a word also starts or ends where letters/digits meet punctuation, as CLIP's
    pre-tokenizer splits there ("x-ray" is x, -, ray for both kinds; "bird." ends the word "bird").
    """
    n = len(tokens)
    outside = [True] + list(special) + [True]  # outside[i + 1] is position i; both sequence ends are outside
    if rule.end_suffix is not None:
        ends = [not special[i] and tokens[i].endswith(rule.end_suffix) for i in range(n)]
        starts = [not special[i] and (outside[i] or ends[i - 1]) for i in range(n)]
        return starts, ends
    prefix = rule.start_prefix or SENTENCEPIECE_WORD_START
    text = [token.removeprefix(prefix) for token in tokens]
    marked = [token.startswith(prefix) for token in tokens]

    def split_between(i: int) -> bool:  # a word boundary between positions i and i + 1
        if outside[i + 1] or outside[i + 2] or marked[i + 1]:
            return True
        left, right = text[i], text[i + 1]
        return not (left and right and left[-1].isalnum() and right[0].isalnum())

    starts = [not special[i] and (i == 0 or split_between(i - 1)) for i in range(n)]
    ends = [not special[i] and (i == n - 1 or split_between(i)) for i in range(n)]
    return starts, ends


def _occurrences(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    """Start positions of every (possibly overlapping) occurrence of `needle` in `haystack`."""
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if list(haystack[i : i + n]) == list(needle)]


def _enclosing_word(prompt: str, word: str) -> str | None:
    """The whitespace-delimited run of `prompt` around the first case-insensitive occurrence of `word`, if any."""
    match = re.search(re.escape(word.strip()), prompt, flags=re.IGNORECASE)
    if match is None:
        return None
    start, end = match.span()
    while start > 0 and not prompt[start - 1].isspace():
        start -= 1
    while end < len(prompt) and not prompt[end].isspace():
        end += 1
    return prompt[start:end]


class TruncatedConceptError(ValueError):
    """A concept word that is a whole word of the prompt, but only beyond the tokens the tokenizer keeps."""


def concept_token_indices(
    tokenizer: Any, prompt: str, concept_words: str | Sequence[str], *, max_length: int | None = None
) -> list[int]:
    """Positions, in the tokenized `prompt` (BOS at 0 for CLIP), of every token of the concept word(s).

    Rule: a concept word matches only whole words of the prompt, i.e. its whole sequence of pieces (the word
    tokenized alone) where that sequence starts a word and ends a word of the prompt, by the tokenizer's own
    word markers (`word_boundaries`):
    - CLIP: the previous token is BOS or ends with ``</w>``, and the last piece ends with ``</w>``;
    - sentencepiece (T5): the first piece starts with ``▁`` (or follows a special token or punctuation), and
      the next token starts with ``▁``, is special (``</s>``) or punctuation, or there is none.
    So "bird" matches in "a bird." but not in "songbird" (song + bird</w>) nor in "bluebird" (one piece), however
    the BPE happens to split. Matching is on token ids, hence case-insensitive exactly when the tokenizer
    lower-cases (CLIP does, T5 does not). A run of several words such as "x-ray" (CLIP: x</w> -</w> ray</w>)
    matches as one whole span. A word split into pieces contributes all of them (their maps are summed
    downstream), a word occurring twice contributes both occurrences, and several words are united. A string
    `concept_words` is one word. The prompt is truncated to `max_length` (default: ``model_max_length``) as the
    model's prompt encoding does (SD3 and FLUX cut T5 at their `max_sequence_length`), so every index is valid
    for the text embedding.

    Returns:
        Sorted, distinct int positions.
    Raises:
        ValueError: no words, a word that tokenizes to nothing, or a word that is not a whole word of the kept
            prompt (the message names the word, the prompt, the pieces and the rule); TruncatedConceptError (a
            ValueError) when the word is whole but only beyond the kept tokens.
        TypeError: a concept word that is not a string.
        NotImplementedError: a tokenizer whose word boundaries cannot be read (see `word_boundaries`).
    """
    words = [concept_words] if isinstance(concept_words, str) else list(concept_words)
    if not words:
        raise ValueError("concept_words is empty")
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"concept words must be strings, got {word!r} of type {type(word).__name__}")
    rule = word_boundaries(tokenizer)
    # Boundaries are read on the whole prompt so that a word cut by truncation is not mistaken for a whole one.
    full_ids = list(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
    limit = int(max_length or tokenizer.model_max_length)
    kept_ids = tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
    kept = 0  # length of the common prefix: the tokens truncation keeps (it replaces the last one by EOS)
    while kept < min(len(full_ids), len(kept_ids)) and full_ids[kept] == kept_ids[kept]:
        kept += 1
    tokens = tokenizer.convert_ids_to_tokens(full_ids)
    special_ids = set(tokenizer.all_special_ids)
    special = [i in special_ids for i in full_ids]
    starts, ends = _word_edges(tokens, special, rule)

    indices: set[int] = set()
    for word in words:
        word_ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        if not word_ids:
            raise ValueError(f"concept word {word!r} has no tokens")
        pieces = tokenizer.convert_ids_to_tokens(word_ids)
        n = len(word_ids)
        found = _occurrences(full_ids, word_ids)
        whole = [s for s in found if starts[s] and ends[s + n - 1]]
        within = [s for s in whole if s + n <= kept]
        if within:
            for s in within:
                indices.update(range(s, s + n))
            continue
        context = f"(pieces of {word!r}: {pieces}; prompt pieces: {tokens})"
        if whole:
            raise TruncatedConceptError(
                f"concept word {word!r} occurs in {prompt!r} only beyond the first {kept} tokens, which the "
                f"tokenizer keeps (max_length {limit}): it was truncated away {context}"
            )
        if found:  # its pieces occur, but inside a longer word: name that word
            s = found[0]
            first, last = s, s + n - 1
            while first > 0 and not starts[first]:
                first -= 1
            while last + 1 < len(tokens) and not ends[last] and not special[last + 1]:
                last += 1
            enclosing: str | None = tokenizer.decode(full_ids[first : last + 1]).strip()
        else:
            enclosing = _enclosing_word(prompt, word)
        if enclosing is not None and enclosing.casefold().strip(string.punctuation) == word.strip().casefold():
            problem = f"{word!r} appears as {enclosing!r} in {prompt!r} but is tokenized differently there"
        elif enclosing is not None:
            problem = f"{word!r} is part of {enclosing!r} in {prompt!r}"
        else:
            problem = f"{word!r} does not occur in {prompt!r}"
        raise ValueError(
            f"concept words must be whole words of the prompt: {problem} {context}; a concept word matches only "
            "its whole sequence of pieces starting and ending at word boundaries of the prompt"
        )
    return sorted(indices)
