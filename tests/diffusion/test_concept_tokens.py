"""Concept-word lookup: whole words of the prompt only, checked on Stable Diffusion's real CLIP vocabulary."""

from __future__ import annotations

import pytest

from conceptdistill.diffusion.tiny import DEFAULT_WORDS
from conceptdistill.diffusion.tokenizer import (
    WordBoundaries,
    concept_token_indices,
    word_boundaries,
    write_word_tokenizer,
)

PHOTO = "a photo of a {}"
# Prompts whose CLIP token ids are cross-checked against open_clip's own tokenizer.
PROMPTS = [
    "a photo of a bird",
    "a photo of a human with arms and legs",
    "a photo of a chest x-ray with opacity",
    "a photo of a pneumothorax",
    "a photo of a Labrador",
    "a photo of a songbird",
    "a photo of a bluebird",
]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny models' word tokenizer: "zebra" is not one of its words, so it splits into z e b r a</w>."""
    return write_word_tokenizer(tmp_path_factory.mktemp("words"), DEFAULT_WORDS)


@pytest.fixture(scope="module", params=["CLIPTokenizer", "CLIPTokenizerFast"])
def clip(request: pytest.FixtureRequest, clip_tokenizer):
    """The real CLIP vocabulary through both transformers classes (one class in transformers 5)."""
    import transformers

    if request.param == "CLIPTokenizer":
        return clip_tokenizer
    return getattr(transformers, request.param).from_pretrained(clip_tokenizer.name_or_path, local_files_only=True)


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- the CLIP vocabulary itself


def test_clip_tokenizer_matches_clip(clip_tokenizer) -> None:
    assert clip_tokenizer("a photo of a bird")["input_ids"] == [49406, 320, 1125, 539, 320, 3329, 49407]
    assert len(clip_tokenizer) == 49408 and clip_tokenizer.model_max_length == 77
    # open_clip's own byte-level BPE (the reference implementation) gives the same ids for every prompt used here.
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    for prompt in PROMPTS:
        assert clip_tokenizer(prompt, add_special_tokens=False)["input_ids"] == reference.encode(prompt), prompt


# ---------------------------------------------------------------- accepted: whole words


@pytest.mark.parametrize("word", ["bird", "dog", "car"])
def test_single_piece_words(clip, word: str) -> None:
    assert _pieces(clip, word) == [f"{word}</w>"]
    # BOS=0, a=1, photo=2, of=3, a=4, word=5.
    assert concept_token_indices(clip, PHOTO.format(word), word) == [5]
    assert concept_token_indices(clip, PHOTO.format(word), [word]) == [5]


def test_several_words_are_united(clip) -> None:
    prompt = "a photo of a human with arms and legs"
    assert concept_token_indices(clip, prompt, ["human", "arms", "legs"]) == [5, 7, 9]
    assert concept_token_indices(clip, prompt, ["legs", "human"]) == [5, 9]


def test_hyphenated_word_gives_all_its_pieces(clip) -> None:
    prompt = "a photo of a chest x-ray with opacity"
    # CLIP splits at the hyphen into three words x</w> -</w> ray</w>; "x-ray" is the whole run, a whole word.
    assert _pieces(clip, "x-ray") == ["x</w>", "-</w>", "ray</w>"]
    assert concept_token_indices(clip, prompt, "x-ray") == [6, 7, 8]
    assert _pieces(clip, "opacity") == ["op", "acity</w>"]
    assert concept_token_indices(clip, prompt, ["x-ray", "opacity"]) == [6, 7, 8, 10, 11]
    # Decided, not accidental: CLIP itself treats "ray" as a word of its own here, so it is accepted too.
    assert concept_token_indices(clip, prompt, "ray") == [8]


def test_word_of_several_pieces(clip) -> None:
    assert _pieces(clip, "pneumothorax") == ["pneu", "mo", "thor", "ax</w>"]
    assert concept_token_indices(clip, "a photo of a pneumothorax", "pneumothorax") == [5, 6, 7, 8]


def test_capitalised_words(clip) -> None:
    # CLIP lower-cases, so case never matters, in the prompt or in the concept.
    assert _pieces(clip, "Labrador") == ["labrador</w>"]
    assert concept_token_indices(clip, "a photo of a Labrador", "Labrador") == [5]
    assert concept_token_indices(clip, "a photo of a Labrador", "labrador") == [5]
    assert concept_token_indices(clip, "a photo of a Bird", "bird") == [5]
    assert concept_token_indices(clip, "a photo of a bird", "Bird") == [5]
    assert concept_token_indices(clip, "A photo of a bird.", "BIRD") == [5]


def test_repeated_word_gives_every_occurrence(clip) -> None:
    assert concept_token_indices(clip, "a bird and a bird", "bird") == [2, 5]
    assert concept_token_indices(clip, "a Bird and a bird", ["bird", "Bird"]) == [2, 5]
    assert concept_token_indices(clip, "a pneumothorax or a pneumothorax", "pneumothorax") == [2, 3, 4, 5, 8, 9, 10, 11]


def test_one_piece_compound_is_a_whole_word(clip) -> None:
    assert _pieces(clip, "bluebird") == ["bluebird</w>"]
    assert concept_token_indices(clip, "a photo of a bluebird", "bluebird") == [5]


# ---------------------------------------------------------------- refused: parts of words


def test_part_of_a_word_split_into_pieces_is_refused(clip) -> None:
    # songbird = song + bird</w>: the old lookup matched bird</w> and returned the piece of "songbird".
    assert _pieces(clip, "songbird") == ["song", "bird</w>"]
    with pytest.raises(ValueError, match=r"whole words of the prompt: 'bird' is part of 'songbird'") as error:
        concept_token_indices(clip, "a photo of a songbird", "bird")
    message = str(error.value)
    assert "'a photo of a songbird'" in message and "bird</w>" in message and "song" in message
    assert concept_token_indices(clip, "a photo of a songbird", "songbird") == [5, 6]


def test_part_of_a_one_piece_word_is_refused_with_the_same_rule(clip) -> None:
    # bluebird is one piece: "bird" does not occur as a token at all; the reason given is the same rule.
    with pytest.raises(ValueError, match=r"whole words of the prompt: 'bird' is part of 'bluebird'"):
        concept_token_indices(clip, "a photo of a bluebird", "bird")


def test_word_start_and_end_are_both_required(clip) -> None:
    # "song" is the first piece of "songbird" (a word start) but does not end the word.
    with pytest.raises(ValueError, match="'song' is part of 'songbird'"):
        concept_token_indices(clip, "a photo of a songbird", "song")
    with pytest.raises(ValueError, match="'thorax' is part of 'pneumothorax'"):
        concept_token_indices(clip, "a photo of a pneumothorax", "thorax")


def test_missing_and_truncated_words(clip) -> None:
    with pytest.raises(ValueError, match=r"'dog' does not occur.*'a photo of a bird'"):
        concept_token_indices(clip, "a photo of a bird", "dog")
    # 76 tokens fit between BOS and EOS: the bird at token 81 is cut off, the one at token 2 is kept.
    long_prompt = "a bird " + "and " * 77 + "a bird"
    assert concept_token_indices(clip, long_prompt, "bird") == [2]
    with pytest.raises(ValueError, match=r"'legs'.*truncated"):
        concept_token_indices(clip, "a bird " + "and " * 77 + "legs", "legs")


def test_bad_arguments(clip) -> None:
    with pytest.raises(ValueError, match="empty"):
        concept_token_indices(clip, "a photo of a bird", [])
    with pytest.raises(ValueError, match="no tokens"):
        concept_token_indices(clip, "a photo of a bird", " ")
    with pytest.raises(TypeError):
        concept_token_indices(clip, "a photo of a bird", [3])


# ---------------------------------------------------------------- the tiny models' word tokenizer


def test_unknown_word_gives_all_its_pieces_never_the_article(word_tokenizer) -> None:
    prompt = "a photo of a zebra"
    assert _pieces(word_tokenizer, "zebra") == ["z", "e", "b", "r", "a</w>"]
    assert concept_token_indices(word_tokenizer, prompt, "zebra") == [5, 6, 7, 8, 9]
    # The last piece of "zebra" is the article's token a</w>; it is not the word "a".
    assert concept_token_indices(word_tokenizer, prompt, "a") == [1, 4]
    assert concept_token_indices(word_tokenizer, "a red zebra with legs", ["zebra", "legs"]) == [3, 4, 5, 6, 7, 9]
    with pytest.raises(ValueError, match="'bird' is part of 'songbird'"):
        concept_token_indices(word_tokenizer, "a photo of a songbird", "bird")


# ---------------------------------------------------------------- other tokenizer kinds


def _wrap(backend, **special: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=16, **special)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A T5-shaped tokenizer (Unigram pieces, "▁" marks a word start, "</s>" appended, case kept)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = ["<pad>", "</s>", "<unk>", "▁", "▁a", "▁photo", "▁of", "▁bird", "▁song", "bird", "."]
    pieces += list("abcdefghijklmnopqrstuvwxyz")
    backend = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 2 else -5.0) for p in pieces], unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    return _wrap(backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def test_sentencepiece_word_starts(sentencepiece_tokenizer) -> None:
    tok = sentencepiece_tokenizer
    # No BOS: ▁a=0, ▁photo=1, ▁of=2, ▁a=3, ▁bird=4, then </s>.
    assert concept_token_indices(tok, "a photo of a bird", "bird") == [4]
    assert concept_token_indices(tok, "a photo of a bird.", "bird") == [4]  # punctuation ends a word, as in CLIP
    assert _pieces(tok, "a photo of a songbird")[-2:] == ["▁song", "bird"]
    assert concept_token_indices(tok, "a photo of a songbird", "songbird") == [4, 5]
    with pytest.raises(ValueError, match="'bird' is part of 'songbird'"):
        concept_token_indices(tok, "a photo of a songbird", "bird")
    with pytest.raises(ValueError, match="'song' is part of 'songbird'"):
        concept_token_indices(tok, "a photo of a songbird", "song")
    # Sentencepiece keeps case (unlike CLIP): "Bird" is other pieces, and the message says so.
    with pytest.raises(ValueError, match="'bird' appears as 'Bird' in .* tokenized differently"):
        concept_token_indices(tok, "a photo of a Bird", "bird")


def test_word_boundaries_are_read_from_the_tokenizer(clip, word_tokenizer, sentencepiece_tokenizer) -> None:
    assert word_boundaries(clip) == WordBoundaries(end_suffix="</w>")
    assert word_boundaries(word_tokenizer) == WordBoundaries(end_suffix="</w>")
    assert word_boundaries(sentencepiece_tokenizer) == WordBoundaries(start_prefix="▁")


def test_tokenizer_without_word_boundaries_is_refused() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "bird": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = _wrap(backend, unk_token="[UNK]")
    with pytest.raises(NotImplementedError, match=type(tok).__name__):
        concept_token_indices(tok, "a bird", "bird")
