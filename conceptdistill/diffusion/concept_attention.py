"""ConceptAttention (Helbling et al., ICML 2025): concept maps from the attention OUTPUT space of an MMDiT
(SD 3 / 3.5, FLUX), the `masks.module.attention_space=output` alternative to stage 1's cross-attention maps.

Each concept word becomes one extra "concept token" (the family's `concept_token_states`: the word's T5 state,
the word encoded on its own). The concept tokens form a residual stream of their own that runs beside the
text stream through every block with a text stream (SD3's joint blocks, FLUX's double-stream blocks) and gets
exactly the text stream's treatment there: the context embedder, the block's context modulation and norm
(`norm1_context`, with the same time embedding), the text projections `add_q_proj` / `add_k_proj` /
`add_v_proj` and their q/k norms, the text tokens' rotary position (FLUX), the attention output projection
`to_add_out`, the gates, `norm2_context` and `ff_context`. In attention, concept queries attend to the concept
keys and the image keys (not the text keys); image and text queries never see the concept keys, so the model's
own computation, and its output, is untouched: the stock processors run as they are, and the hooks here only
read the image keys, values and attention outputs the stock computation makes.

The map of concept c at image position i, in each such block, is softmax over the concepts of <o_i, o_c>, the
dot product of the attention outputs (all heads, before the output projection) of the image token and of the
concept token. `ConceptAttentionStore` reduces it at once to a (concepts, h, w) map per image on the latent grid
and keeps running sums over blocks and steps, as `AttentionStore` does for cross-attention. Hooks are removed
on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import inspect
import string
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from conceptdistill.diffusion.attention import AttentionStore

#: function words, never a concept (articles, prepositions, conjunctions, determiners)
FUNCTION_WORDS = frozenset(
    "a an the of with without and or in on at to for from by into onto over under near its his her their this "
    "that these those some".split()
)
#: words that name the picture rather than something in it ("a photo of ..."): no region of the image
MEDIUM_WORDS = frozenset({"photo", "photograph", "picture", "image"})


def background_concept_words(background_prompt: str, concept: Sequence[str]) -> list[str]:
    """The content words of the background prompt: its words (as written, outer punctuation stripped, first
    occurrence) less function words, words naming the medium ("photo") and the concept's own words; matching is
    case-insensitive. "a photo of a background" gives ["background"]; "a photo of a chest x-ray" (whose concept is
    "opacity") gives ["chest", "x-ray"].

    Raises:
        ValueError: naming `prompts.background` when no word is left.
    """
    excluded = FUNCTION_WORDS | MEDIUM_WORDS | {word.lower() for word in concept}
    words: list[str] = []
    for raw in str(background_prompt).split():
        word = raw.strip(string.punctuation)
        if word and word.lower() not in excluded and word.lower() not in {w.lower() for w in words}:
            words.append(word)
    if not words:
        raise ValueError(
            f"prompts.background={background_prompt!r} has no content word besides the concept {list(concept)}: "
            "masks.module.attention_space=output needs at least one concept the foreground concept competes with; "
            "give them as masks.module.background_concepts=[...]"
        )
    return words


def concept_set(concept: Sequence[str], background_prompt: str | None,
                background_concepts: Sequence[str] | None = None) -> list[str]:
    """The concepts of the softmax: the concept's words first, then `background_concepts` or, when that is None,
    the content words of `background_prompt` (`background_concept_words`).

    Raises:
        ValueError: naming `masks.module.background_concepts` when it is empty or repeats a concept word, or
            `prompts.background` when neither gives a word.
    """
    concept = [str(word) for word in concept]
    if background_concepts is None:
        if background_prompt is None:
            raise ValueError("masks.module.attention_space=output needs the background prompt (prompts.background) "
                             "or masks.module.background_concepts")
        return concept + background_concept_words(background_prompt, concept)
    others = [str(word) for word in background_concepts]
    shared = {w.lower() for w in others} & {w.lower() for w in concept}
    if not others or shared or len({w.lower() for w in others}) < len(others):
        raise ValueError(f"masks.module.background_concepts={others}: give distinct words other than the concept's "
                         f"{concept} (at least one)")
    return concept + others


def concept_outputs(concept_query: torch.Tensor, concept_key: torch.Tensor, concept_value: torch.Tensor,
                    image_key: torch.Tensor, image_value: torch.Tensor) -> torch.Tensor:
    """Attention outputs of the concept tokens, which attend to the concept keys and the image keys.

    Args: (B, L, H, D) tensors, L = number of concepts C or of image tokens N, as the layer made them (after q/k
        norms and rotary embedding).
    Returns:
        (B, C, H * D): softmax attention with the default scale 1/sqrt(D), heads concatenated.
    """
    keys = torch.cat([concept_key, image_key], dim=1).transpose(1, 2)
    values = torch.cat([concept_value, image_value], dim=1).transpose(1, 2)
    output = F.scaled_dot_product_attention(concept_query.transpose(1, 2), keys, values)
    return output.transpose(1, 2).flatten(2)


def concept_probabilities(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """(B, N, F) image attention outputs and (B, C, F) concept attention outputs -> (B, N, C) float32: for each
    image position, softmax over the concepts of the dot products <o_i, o_c> (no temperature, as the paper)."""
    scores = torch.einsum("bnf,bcf->bnc", image_out.float(), concept_out.float())
    return scores.softmax(dim=-1)


class ConceptAttentionStore(AttentionStore):
    """Accumulates ConceptAttention maps over blocks and steps; ``mean()`` is the map A of stage 1.

    Args:
        concept_states: (C, D) the concept tokens as the text sequence holds them (before the context embedder),
            the foreground concept's words first (`DiffusionParts.concept_token_states`).
        foreground: how many of the first concepts are the foreground concept; A sums their maps.
        output_size, layers, keep, per_layer: as for `AttentionStore` (layer names are the blocks' attention
            modules, e.g. ``transformer_blocks.3.attn``).
    `concept_maps()` is (batch, C, h, w): a distribution over the concepts at every position.
    """

    space = "output"

    def __init__(self, concept_states: torch.Tensor, foreground: int, output_size: tuple[int, int], *,
                 layers: Sequence[str] | None = None, keep: slice | None = None, per_layer: bool = False) -> None:
        super().__init__(None, output_size, layers=layers, keep=keep, per_layer=per_layer)
        if concept_states.ndim != 2 or not 1 <= int(foreground) < concept_states.shape[0]:
            raise ValueError(f"concept_states {tuple(concept_states.shape)} must be (concepts, width) with "
                             f"foreground={foreground} of them foreground and at least one other")
        self.concept_states = concept_states.detach()
        self.foreground = int(foreground)

    def capture(self, parts: Any):
        """Carry the concept tokens through `parts`' denoiser within the block (see the module docstring).

        Raises:
            ValueError: naming `masks.module.attention_space` for a family without an MMDiT.
        """
        parts.check_attention_space(self.space)
        return capture_concept_attention(parts.denoiser, self)

    def add_outputs(self, layer_name: str, image_out: torch.Tensor, concept_out: torch.Tensor) -> None:
        """One block's (B, N, F) image and (B, C, F) concept attention outputs -> its maps, added to the sums."""
        if not self.enabled:
            return
        probs = concept_probabilities(image_out.detach(), concept_out.detach())
        if self.keep is not None:
            probs = probs[self.keep]
        batch, positions, concepts = probs.shape
        maps = self._to_maps(probs.permute(0, 2, 1).reshape(batch * concepts, 1, positions))
        self.accumulate(layer_name, maps.reshape(batch, concepts, *maps.shape[-2:]))

    def concept_maps(self) -> torch.Tensor:
        """Mean over the captured blocks and steps of every concept's map: (batch, C, h, w)."""
        return super().mean()

    def per_layer_concept_maps(self) -> dict[str, torch.Tensor]:
        """Layer name -> mean over steps (batch, C, h, w); needs ``per_layer=True``."""
        return super().per_layer_mean()

    def mean(self) -> torch.Tensor:
        """The foreground concept's map A (batch, h, w): the summed maps of its words."""
        return self.concept_maps()[:, : self.foreground].sum(dim=1)

    def per_layer_mean(self) -> dict[str, torch.Tensor]:
        return {name: maps[:, : self.foreground].sum(dim=1) for name, maps in self.per_layer_concept_maps().items()}


def text_stream_blocks(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every transformer block with a text stream of its own: a context norm and an attention
    with text projections (SD3's `JointTransformerBlock`, FLUX's `FluxTransformerBlock`; not FLUX's
    single-stream blocks, where text and image share every weight)."""
    return [
        (name, module) for name, module in denoiser.named_modules()
        if hasattr(module, "norm1_context") and getattr(getattr(module, "attn", None), "add_k_proj", None) is not None
    ]


def _argument(function: Any, args: tuple, kwargs: dict, name: str) -> Any:
    """The value `function` gets for parameter `name` from a call with `args` and `kwargs` (None if not given)."""
    if name in kwargs:
        return kwargs[name]
    return inspect.signature(function).bind_partial(*args, **kwargs).arguments.get(name)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


class _ConceptStream:
    """The concept tokens' residual stream through one denoiser call, and the hooks that carry it."""

    def __init__(self, denoiser: torch.nn.Module, store: ConceptAttentionStore) -> None:
        self.denoiser, self.store = denoiser, store
        self.tokens: torch.Tensor | None = None

    def start(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Denoiser pre-hook: the concept tokens through the context embedder, one copy per image."""
        self.tokens = None
        if not self.store.enabled:
            return
        hidden = _argument(module.forward, args, kwargs, "hidden_states")
        embedder = self.denoiser.context_embedder
        states = self.store.concept_states.to(device=hidden.device, dtype=hidden.dtype)
        with torch.no_grad():
            self.tokens = embedder(states).unsqueeze(0).expand(hidden.shape[0], -1, -1)


class _BlockHooks:
    """Hooks on one text-stream block: its concept-stream input (block pre-hook), the image keys, values and
    attention outputs of the stock attention (hooks on `to_k`, `to_v` and `to_out[0]`), the concept attention
    and the maps (attention forward hook), and the residual update (block forward hook)."""

    def __init__(self, stream: _ConceptStream, name: str, block: torch.nn.Module, scored: bool) -> None:
        self.stream, self.name, self.block, self.scored = stream, name, block, scored
        self.attn = block.attn
        if getattr(self.attn, "fused_projections", False):
            raise ValueError(f"{name}.attn has fused q/k/v projections: masks.module.attention_space=output reads "
                             "the separate to_k / to_v outputs (load the model without fusing them)")
        self._clear()

    def _clear(self) -> None:
        self.normed = self.modulation = self.image_key = self.image_value = self.image_out = self.context_out = None

    def install(self) -> list[Any]:
        attn = self.attn
        return [
            self.block.register_forward_pre_hook(self.before_block, with_kwargs=True),
            attn.to_k.register_forward_hook(lambda module, args, output: self._keep("image_key", output)),
            attn.to_v.register_forward_hook(lambda module, args, output: self._keep("image_value", output)),
            attn.to_out[0].register_forward_pre_hook(lambda module, args: self._keep("image_out", args[0])),
            attn.register_forward_hook(self.after_attention, with_kwargs=True),
            self.block.register_forward_hook(self.after_block),
        ]

    def _keep(self, field: str, tensor: torch.Tensor) -> None:
        """Keep one of the stock attention's image tensors, while the concept stream runs through this block."""
        if self.normed is not None:
            setattr(self, field, tensor)

    def before_block(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The concept tokens through the block's context modulation and norm, as the text tokens go."""
        self._clear()
        if self.stream.tokens is None:
            return
        temb = _argument(block.forward, args, kwargs, "temb")
        with torch.no_grad():
            if self.attn.context_pre_only:  # SD3's last block: the text stream ends here (AdaLayerNormContinuous)
                self.normed = block.norm1_context(self.stream.tokens, temb)
            else:
                self.normed, *self.modulation = block.norm1_context(self.stream.tokens, emb=temb)

    def after_attention(self, attn: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Concept queries over [concept, image] keys; the maps from the image and concept attention outputs."""
        if self.normed is None or (attn.context_pre_only and not self.scored):
            return
        if self.image_key is None or self.image_value is None or self.image_out is None:
            raise RuntimeError(f"{self.name}.attn ran without calling to_k, to_v and to_out[0] on the image tokens: "
                               "its attention processor is not one masks.module.attention_space=output can read")
        head_dim = self.image_key.shape[-1] // attn.heads
        with torch.no_grad():
            image_key, image_value = _heads(self.image_key, head_dim), _heads(self.image_value, head_dim)
            query, key, value = (_heads(proj(self.normed), head_dim)
                                 for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_k is not None:
                image_key = attn.norm_k(image_key)
            if attn.norm_added_q is not None:
                query = attn.norm_added_q(query)
            if attn.norm_added_k is not None:
                key = attn.norm_added_k(key)
            rotary = _argument(attn.forward, args, kwargs, "image_rotary_emb")
            if rotary is not None:  # FLUX: [text, image] rows; every text token (position id 0) gets the first row
                from diffusers.models.embeddings import apply_rotary_emb

                image_rows = tuple(r[-image_key.shape[1]:] for r in rotary)
                text_rows = tuple(r[:1].expand(query.shape[1], -1) for r in rotary)
                image_key = apply_rotary_emb(image_key, image_rows, sequence_dim=1)
                query = apply_rotary_emb(query, text_rows, sequence_dim=1)
                key = apply_rotary_emb(key, text_rows, sequence_dim=1)
            out = concept_outputs(query, key, value, image_key, image_value).to(self.normed.dtype)
            if self.scored:
                self.stream.store.add_outputs(f"{self.name}.attn", self.image_out, out)
            if not attn.context_pre_only:
                self.context_out = attn.to_add_out(out)
        self.image_key = self.image_value = self.image_out = None

    def after_block(self, block: torch.nn.Module, args: tuple, output: Any) -> None:
        """The residual update of the concept stream: gated attention output, then the gated context MLP."""
        if self.normed is None:
            return
        if self.modulation is None or self.context_out is None:
            self.stream.tokens = None  # the text stream ends in this block: nothing after it reads concepts
        else:
            gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation
            with torch.no_grad():
                tokens = self.stream.tokens + gate_msa.unsqueeze(1) * self.context_out
                normed = block.norm2_context(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                tokens = tokens + gate_mlp.unsqueeze(1) * block.ff_context(normed)
                if tokens.dtype == torch.float16:
                    tokens = tokens.clip(-65504, 65504)
            self.stream.tokens = tokens
        self._clear()


@contextlib.contextmanager
def capture_concept_attention(denoiser: torch.nn.Module, store: ConceptAttentionStore) -> Iterator[ConceptAttentionStore]:
    """Within the block, every call of `denoiser` carries `store`'s concept tokens through its text-stream blocks
    and adds the maps of the blocks ``store.wants`` to `store`; the stream runs through every such block (the
    layer filter only picks the maps). Nothing but forward hooks is installed, and all are removed on exit.

    Raises:
        ValueError: when the denoiser has no block with a text stream, or no such block matches the layer filter
            (`masks.module.layers`).
    """
    blocks = text_stream_blocks(denoiser)
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} has no transformer block with a text stream: "
                         "masks.module.attention_space=output is for SD 3 / 3.5 and FLUX")
    scored = {name: store.wants(f"{name}.attn") for name, _ in blocks}
    if not any(scored.values()):
        raise ValueError(f"no text-stream block's attention ({blocks[0][0]}.attn, ...) matches the layer filter "
                         f"masks.module.layers={store.layers}")
    stream = _ConceptStream(denoiser, store)
    handles: list[Any] = []
    try:
        handles.append(denoiser.register_forward_pre_hook(stream.start, with_kwargs=True))
        for name, block in blocks:
            handles += _BlockHooks(stream, name, block, scored[name]).install()
        yield store
    finally:
        for handle in handles:
            handle.remove()
        stream.tokens = None
