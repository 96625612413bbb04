"""Word-level CLIP tokenizers written from scratch, and concept-token lookup that works for any CLIP tokenizer.

The tiny test models and the shapes-world model need a tokenizer but may not download one. Instead of a
different tokenizer class, we write the two files a real `transformers.CLIPTokenizer` reads (vocab.json and
merges.txt) for a small vocabulary, so that every prompt goes through exactly the code Stable Diffusion's
tokenizer uses. Each listed word gets one merge chain ending in ``word</w>``, so it becomes a single token;
any other word falls back to pieces of the vocabulary (down to byte-level characters), i.e. several tokens,
as rare words do in SD.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

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
    clean: list[str] = []
    for word in words:
        word = word.strip().lower()
        # Non-ASCII letters would be split into UTF-8 bytes by the byte-level pre-tokenizer.
        if not (word.isascii() and word.isalpha()):
            raise ValueError(f"tokenizer words must be non-empty and made of ASCII letters, got {word!r}")
        if word not in clean:
            clean.append(word)

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


def _find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    """Start positions of non-overlapping occurrences of `needle` in `haystack`."""
    starts, i, n = [], 0, len(needle)
    while i + n <= len(haystack):
        if list(haystack[i : i + n]) == list(needle):
            starts.append(i)
            i += n
        else:
            i += 1
    return starts


def concept_token_indices(tokenizer: Any, prompt: str, concept_words: str | Sequence[str]) -> list[int]:
    """Positions, in the tokenized `prompt` (BOS at 0), of every token belonging to the concept word(s).

    Each word is tokenized alone (no special tokens) and its token sequence located in the prompt's ids, so a
    word that the tokenizer splits contributes all its pieces, and a word mentioned twice contributes both
    mentions. Several words (e.g. ``["human", "arms", "legs"]``) are united. The prompt is truncated to the
    tokenizer's ``model_max_length`` as `encode_prompts` does, so every index is valid for the text embedding.

    Raises:
        ValueError: naming the word and the prompt when a word does not occur (or was truncated away).
    """
    words = [concept_words] if isinstance(concept_words, str) else list(concept_words)
    if not words:
        raise ValueError("concept_words is empty")
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    indices: set[int] = set()
    for word in words:
        starts: list[int] = []
        word_ids: list[int] = []
        # CLIP splits words itself; BPE tokenizers that encode a leading space (GPT-2 style) need the " " form.
        for form in (word, " " + word):
            word_ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            starts = _find_subsequence(prompt_ids, word_ids) if word_ids else []
            if starts:
                break
        if not starts:
            raise ValueError(
                f"concept word {word!r} (tokens {word_ids}) not found in the tokenized prompt {prompt!r} "
                f"(ids {prompt_ids}, max length {tokenizer.model_max_length})"
            )
        for start in starts:
            indices.update(range(start, start + len(word_ids)))
    return sorted(indices)
