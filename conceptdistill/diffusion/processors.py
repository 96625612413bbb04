"""Attention processors that hand the concept tokens' attention to an `AttentionStore` (diffusion/attention.py).

One per attention arithmetic diffusers uses for text-to-image attention:
- `CapturingAttnProcessor`: a UNet's cross-attention (SD 1.x/2.x, SDXL), diffusers' `AttnProcessor2_0`;
- `CapturingJointAttnProcessor`: SD3 / 3.5 joint attention (`JointAttnProcessor2_0`): image and text tokens
  attend to [image, text] keys together;
- `CapturingFluxAttnProcessor`: FLUX's double-stream ([text, image] keys) and single-stream blocks
  (`FluxAttnProcessor`, rotary position embeddings).

Each computes the layer's output as the stock processor does (fused attention on the same tensors) and, beside
it, only what the method needs: for each image query, the summed probability of the concept keys, normalised
over ALL keys (image and text) as the model's softmax normalises them. Where PyTorch's flash-attention kernel
returns the softmax's log-normaliser with the output (CUDA in bf16/fp16, and the CPU kernel), the probability
of the few concept keys is exp(q . k_c * scale - logsumexp): one small matmul beside the fused kernel, and no
attention matrix is ever materialised (`attention_with_concept_mass`); elsewhere the scores are recomputed in
float32 query chunks (`concept_attention_mass`). The processors follow the stock arithmetic line by line because
no diffusers hook exposes the post-norm, post-rotary queries and keys; a diffusers release that changes it is
caught by the equality tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: one chunk of attention scores holds at most this many float32 values (256 MiB)
MAX_CHUNK_ELEMENTS = 1 << 26


def concept_attention_mass(
    query: torch.Tensor, key: torch.Tensor, key_index: torch.Tensor | None, scale: float,
) -> torch.Tensor:
    """Summed softmax attention probability of the keys `key_index` for each query.

    Args:
        query: (B, H, Nq, D) queries (the image positions only).
        key: (B, H, Nk, D) ALL keys the layer attends to: the softmax is normalised over all of them.
        key_index: (k,) int64 positions into the key axis; None sums over every key (which gives 1: a check).
        scale: the logit scale (the layer's `attn.scale`, 1/sqrt(D) by default).
    Returns:
        (B, H, Nq) float32 in [0, 1]: sum_{j in key_index} softmax_j(scale * q . k_j).
    Computed in float32, in chunks of queries holding at most MAX_CHUNK_ELEMENTS scores at a time.
    """
    batch, heads, queries, _ = query.shape
    keys_t = key.float().transpose(-1, -2)
    rows = max(1, MAX_CHUNK_ELEMENTS // max(1, batch * heads * key.shape[2]))
    masses = []
    for start in range(0, queries, rows):
        scores = torch.matmul(query[:, :, start : start + rows].float(), keys_t) * scale
        log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)
        selected = scores if key_index is None else scores.index_select(-1, key_index)
        masses.append(torch.exp(selected - log_norm).sum(dim=-1))
    return torch.cat(masses, dim=2)


def _fused_attention(query, key, value) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output (B, H, Nq, D), log-normaliser (B, H, Nq) float32) of softmax attention with the default scale, from
    the flash-attention kernel that also returns the normaliser; None where PyTorch has none for these inputs.
    These ops are PyTorch's own kernels behind `scaled_dot_product_attention` (no public API returns the
    normaliser); any failure falls back to the unfused path."""
    try:
        if query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            output, log_norm = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value)[:2]
        elif query.device.type == "cpu":
            output, log_norm = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
        else:
            return None
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return output, log_norm


def attention_with_concept_mass(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_index: torch.Tensor | None,
    image_queries: slice,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (default scale 1/sqrt(D), no mask) and the concept mass of the `image_queries`.

    Args:
        query, key, value: (B, H, N, D) in the layer's dtype.
        key_index: concept key positions (k,), or None for all keys (the mass is then 1: a check).
        image_queries: which queries are image positions.
    Returns:
        output (B, H, Nq, D) as `F.scaled_dot_product_attention` gives it, and mass (B, H, Nq_image) float32.
    """
    fused = _fused_attention(query, key, value)
    scale = query.shape[-1] ** -0.5
    if fused is None:
        output = F.scaled_dot_product_attention(query, key, value)
        return output, concept_attention_mass(query[:, :, image_queries], key, key_index, scale)
    output, log_norm = fused
    keys = key if key_index is None else key.index_select(2, key_index)
    scores = torch.matmul(query[:, :, image_queries].float(), keys.float().transpose(-1, -2)) * scale
    return output, torch.exp(scores - log_norm[:, :, image_queries, None]).sum(dim=-1)


def split_heads(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, norm_q: Any, norm_k: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projections (B, N, heads * d) -> (B, heads, N, d) each, then the layer's query / key norms where it has
    them (diffusers' processors apply RMS / layer norms per head, after the split)."""
    batch_size, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    return (query if norm_q is None else norm_q(query)), (key if norm_k is None else norm_k(key)), value


class CapturingAttnProcessor:
    """diffusers `AttnProcessor2_0` (a UNet's attention) with the concept mass of each image position handed to the
    store, for cross-attention layers (see `unet_capturing_processors`). Projections are called as modules, so
    LoRA-wrapped (peft) ``to_q``/``to_k``/``to_v``/``to_out`` layers behave as usual. A store with
    ``needs_probabilities = True`` gets every token's probabilities instead, (batch*heads, queries, keys) through
    its ``__call__(layer_name, probs, heads)``: the explicit softmax, for stores that keep all maps."""

    def __init__(self, store: Any, layer_name: str) -> None:
        self.store = store
        self.layer_name = layer_name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,  # e.g. the deprecated LoRA `scale`, ignored as diffusers' processors do
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = split_heads(attn, query, attn.to_k(context), attn.to_v(context), attn.norm_q, attn.norm_k)
        head_dim = query.shape[-1]

        if encoder_hidden_states is not None and self.store.enabled and getattr(self.store, "needs_probabilities", False):
            # a store that keeps every token's map (the reference code's way, a benchmark peer): explicit softmax
            scores = query.float() @ key.float().transpose(-1, -2) * head_dim**-0.5
            probs = torch.softmax(scores if attention_mask is None else scores + attention_mask.float(), dim=-1)
            self.store(self.layer_name, probs.flatten(0, 1), attn.heads)
            hidden_states = (probs @ value.float()).to(query.dtype)
        elif encoder_hidden_states is not None and attention_mask is None and self.store.enabled:
            index = self.store.key_index(0, query.device)
            hidden_states, mass = attention_with_concept_mass(query, key, value, index, slice(None))
            self.store.add_mass(self.layer_name, mass)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
            if encoder_hidden_states is not None and self.store.enabled:  # a masked cross-attention (rare)
                probs = torch.softmax(query.float() @ key.float().transpose(-1, -2) * head_dim**-0.5
                                      + attention_mask.float(), dim=-1)
                index = self.store.key_index(0, query.device)
                self.store.add_mass(self.layer_name, probs.sum(-1) if index is None else probs[..., index].sum(-1))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def unet_capturing_processors(unet: torch.nn.Module, store: Any) -> dict[str, tuple[Any, Any]]:
    """{layer name: (attention module, CapturingAttnProcessor)} for the UNet's cross-attention (attn2) layers
    that ``store.wants``. Walks ``named_modules`` rather than ``unet.attn_processors`` so that a UNet wrapped by
    peft (whose module names gain a prefix) works too."""
    return {
        name: (module, CapturingAttnProcessor(store, name))
        for name, module in unet.named_modules()
        if hasattr(module, "set_processor") and f"{name}.processor".endswith("attn2.processor") and store.wants(name)
    }


class CapturingJointAttnProcessor:
    """diffusers' `JointAttnProcessor2_0` (SD3 / 3.5 joint attention) plus the concept mass of each image query.

    Keys are [image tokens, text tokens]; the text tokens are the prompt's CLIP then T5 tokens, so the store's
    token indices (positions in that text sequence) are offset by the number of image tokens.
    """

    def __init__(self, store: Any, layer_name: str) -> None:
        self.store = store
        self.layer_name = layer_name

    def __call__(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any,
    ) -> Any:
        batch_size, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states), attn.norm_q, attn.norm_k)
        head_dim = query.shape[-1]
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = split_heads(
                attn, *(proj(encoder_hidden_states) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)),
                attn.norm_added_q, attn.norm_added_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        if encoder_hidden_states is not None and self.store.enabled:
            index = self.store.key_index(image_tokens, query.device)
            hidden_states, mass = attention_with_concept_mass(query, key, value, index, slice(0, image_tokens))
            self.store.add_mass(self.layer_name, mass)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class CapturingFluxAttnProcessor:
    """diffusers' `FluxAttnProcessor` plus the concept mass of each image query.

    Double-stream blocks get the text separately and attend to [text, image] keys; single-stream blocks get the
    concatenated [text, image] sequence. Either way the text tokens come first, so the store's T5 token
    indices are positions on the key axis; the image tokens are the last `image_tokens` queries.
    """

    def __init__(self, store: Any, layer_name: str, original: Any, image_tokens: int) -> None:
        self.store = store
        self.layer_name = layer_name
        self.image_tokens = image_tokens
        # the stock processor's attention backend and parallel settings carry over
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_q, text_k, text_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_q, text_k, text_v))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((text_q, query), (text_k, key), (text_v, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        index, image = self.store.key_index(0, query.device), slice(query.shape[1] - self.image_tokens, None)
        default_kernel = self._attention_backend is None and self._parallel_config is None and attention_mask is None
        if self.store.enabled and default_kernel:
            # diffusers' default backend is torch's SDPA on (B, H, S, D): the same kernel, with the normaliser
            output, mass = attention_with_concept_mass(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), index, image
            )
            hidden_states = output.transpose(1, 2)
            self.store.add_mass(self.layer_name, mass)
        else:
            if self.store.enabled:  # another attention backend: its output, and the scores recomputed beside it
                q_heads, k_heads = query.transpose(1, 2), key.transpose(1, 2)
                mass = concept_attention_mass(q_heads[:, :, image], k_heads, index, attn.head_dim**-0.5)
                self.store.add_mass(self.layer_name, mass)
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())
