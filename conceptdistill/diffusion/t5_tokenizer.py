"""A T5-style sentencepiece tokenizer written offline (the tokenizers library's Unigram model), for the tiny and
real-size SD3 and FLUX test models: each listed word is one piece "▁word", any other word falls back to
single characters, `</s>` is appended, ids follow T5's (<pad>=0, </s>=1, <unk>=2). Saved so that
`T5TokenizerFast.from_pretrained(folder)` loads it, as diffusers pipelines load tokenizer_3/ (SD3) and
tokenizer_2/ (FLUX)."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conceptdistill.diffusion.tokenizer import SENTENCEPIECE_WORD_START, clean_words

# T5's special pieces and their ids (sentencepiece's <pad>=0, </s>=1, <unk>=2).
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


def write_t5_tokenizer(
    folder: str | os.PathLike,
    words: Iterable[str],
    *,
    model_max_length: int = 32,
) -> Any:
    """Write a T5-style sentencepiece (Unigram) tokenizer to `folder` and load it as a `T5TokenizerFast`.

    Built offline with the `tokenizers` library the way transformers converts T5's sentencepiece model: a Unigram
    model (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2), whitespace split then a Metaspace pre-tokenizer that writes
    a word's leading space as "▁", a Metaspace decoder, and a post-processor appending ``</s>``. The vocabulary:
    the three special pieces, "▁", each word of `words` as ONE piece "▁word", then every printable ASCII
    character with and without "▁" (scored far below whole words), so any other ASCII word falls back to several
    pieces ("zebra" -> ▁z e b r a) as rare words do in T5. Case is kept (T5 does not lower-case). No sentinel
    (``<extra_id_N>``) tokens. Writes tokenizer.json and tokenizer_config.json; that is what
    ``T5TokenizerFast.from_pretrained(folder)`` reads, as the SD3 and FLUX pipelines load their T5 tokenizer.

    Returns:
        The loaded tokenizer; ``len(tokenizer)`` is its vocabulary size (ids 0 .. len - 1).
    Raises:
        ValueError: a word that is empty or not made of ASCII letters only.
        RuntimeError: a word that does not come back as its single piece (a bug here, never expected).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = clean_words(words, lower=False)
    start = SENTENCEPIECE_WORD_START
    # Unigram picks the segmentation with the highest summed score: a whole word (-1) always beats characters.
    pieces: list[tuple[str, float]] = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (start, -2.0)]
    pieces += [(start + word, -1.0) for word in clean]
    characters = string.ascii_letters + string.digits + string.punctuation
    seen = {piece for piece, _ in pieces}
    for piece in [start + c for c in characters] + list(characters):
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -10.0))

    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=start, prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement=start, prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (T5_PAD, T5_EOS, T5_UNK)])
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",  # as the hub repos write it; transformers maps it to the fast class
        "model_max_length": model_max_length,
        "eos_token": T5_EOS,
        "unk_token": T5_UNK,
        "pad_token": T5_PAD,
        "extra_ids": 0,
        "additional_special_tokens": [],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    tokenizer = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    for word in clean:
        tokens = tokenizer.tokenize(word)
        if tokens != [start + word]:
            raise RuntimeError(f"word {word!r} tokenizes to {tokens}, expected one piece {start + word!r}")
    return tokenizer
