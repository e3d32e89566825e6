"""LLaVA-1.5 on any decoder LLM: `LlavaForCausalLMMixin` and the per-family classes it makes.

`llava_causal_lm_class(Qwen2ForCausalLM)` is `LlavaQwen2ForCausalLM`: the family's own causal LM with the vision
tower and the projector added to its base model (keys `model.vision_tower.*`, `model.mm_projector.*`, the layout
of LLaVA's releases), so a plain checkpoint of that family loads into it unchanged, tied embeddings, quantisation
and device maps included. The family code runs the decoder; this mixin only adds the images. One code path for
every family: nothing below names one (`vir.models.families` picks the class from a config).

Image tokens are expanded when text is tokenised: `input_ids` already hold `num_image_tokens` copies of
`image_token_id` per image, so the forward pass only embeds the ids, encodes all images in one call and
overwrites the image positions with the projected features (`splice_image_features`); sequence lengths,
attention masks, labels and position ids never change inside the model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from vir.models.configuration import llava_config_class
from vir.models.encoder import VisionTower
from vir.models.loss import chunked_causal_lm_loss
from vir.models.projector import build_projector

logger = logging.getLogger(__name__)

# Config fields with which a family's causal LM rescales its logits in ways the chunked loss does not redo
# (Cohere's `logit_scale`, Granite's `logits_scaling`): those families train with transformers' own loss.
_LOGIT_SCALE_FIELDS = ("logit_scale", "logits_scaling")


def splice_image_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Put image features where `input_ids == image_token_id`; a new tensor, gradients flow to both inputs.

    inputs_embeds [B, T, D], input_ids [B, T], image_features [N, K, D] -> [B, T, D]. Positions are filled in
    row-major order: image 0's K features go to the first K image positions of the batch (reading row 0
    left to right, then row 1, ...), image 1's to the next K, and so on, so images must be listed in the
    order they appear in the batch. Raises ValueError when the batch has not exactly N * K image positions.
    """
    num_images, tokens_per_image, dim = image_features.shape
    if dim != inputs_embeds.shape[-1]:
        raise ValueError(f"image features have width {dim} but the text embeddings {inputs_embeds.shape[-1]}")
    image_mask = input_ids == image_token_id
    num_positions = int(image_mask.sum())
    if num_positions != num_images * tokens_per_image:
        raise ValueError(
            f"input_ids hold {num_positions} image-token positions (image_token_id={image_token_id}) but "
            f"{num_images} image(s) x {tokens_per_image} tokens = {num_images * tokens_per_image} image features "
            f"were given; each image must appear as exactly {tokens_per_image} consecutive image tokens "
            "(expanded at tokenisation time, never cut by truncation)"
        )
    features = image_features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype).reshape(-1, dim)
    return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(inputs_embeds), features)


def init_multimodal_modules(base_model: nn.Module, config) -> None:
    """Add `vision_tower` and `mm_projector` to a family's base model (the module under `base_model_prefix`)."""
    base_model.vision_tower = VisionTower.from_config(config)
    # Models are often built on the meta device (transformers v5 `from_pretrained` always does, quantised
    # and FSDP loading do, so does `with torch.device("meta")` + `load_state_dict(assign=True)`). A base
    # LLM checkpoint has no projector weights, so a meta projector would stay without storage; build it
    # on CPU with real values instead. `from_pretrained` still re-initialises and places keys it did not
    # load (`_init_weights`: normal(0, initializer_range), zero bias), as `post_init` does for plain init.
    on_meta = torch.get_default_device().type == "meta"
    with torch.device("cpu") if on_meta else contextlib.nullcontext():
        base_model.mm_projector = build_projector(config)


class LlavaForCausalLMMixin:
    """LLaVA-1.5: vision tower -> projector -> the family's decoder, trained with the shifted CE loss.

    Placed before a family's `*ForCausalLM` in the MRO (`llava_causal_lm_class`). `forward` takes
    `pixel_values` [N_images, 3, H, W] for the N images of the whole batch, in the order their image tokens
    appear (row-major). Text-only batches pass `pixel_values=None` (or N == 0): the tower is not called.
    """

    def __init__(self, config):
        super().__init__(config)
        base_model = self.get_model()
        init_multimodal_modules(base_model, config)
        # The family's __init__ ran post_init before the new children existed: run it again (inner model first,
        # as transformers does depth-first) so their init, `_no_split_modules` (tower layers for device maps)
        # and the like are registered too.
        base_model.post_init()
        # Training loss: > 0 projects only the trained positions, this many rows at a time (vir.models.loss);
        # 0 is transformers' loss over full fp32 logits. Set from `training.loss_chunk_size`; not saved.
        self.loss_chunk_size = 0
        self.post_init()

    def get_model(self) -> nn.Module:
        """The family's base model (`self.model` for Llama, Qwen, Gemma, ...), which holds tower and projector."""
        return getattr(self, self.base_model_prefix)

    def get_vision_tower(self) -> VisionTower:
        return self.get_model().vision_tower

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> projected features [N, num_image_tokens, hidden_size] (one tower call)."""
        base_model = self.get_model()
        features = base_model.vision_tower(pixel_values)
        projector_dtype = next(base_model.mm_projector.parameters(), features).dtype
        return base_model.mm_projector(features.to(projector_dtype))

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] (image tokens already expanded), pixel_values [N, 3, H, W] -> logits [B, T, V].

        `labels` [B, T] use -100 for ignored positions; the loss is HF's shifted next-token CE (mean over
        labelled tokens, or over `num_items_in_batch` when the Trainer passes it).
        `past_key_values` is the pre-5.x name of transformers' `cache` argument; both are accepted.
        """
        if past_key_values is not None and cache is not None:
            raise ValueError("pass either `cache` or `past_key_values` (its old name), not both")
        cache = cache if cache is not None else past_key_values
        has_images = pixel_values is not None and pixel_values.shape[0] > 0
        if has_images:
            if input_ids is None or inputs_embeds is not None:
                raise ValueError("pass pixel_values with input_ids, not inputs_embeds: image positions are found by id")
            inputs_embeds = splice_image_features(
                self.get_input_embeddings()(input_ids),
                input_ids,
                self.get_image_features(pixel_values),
                self.config.image_token_id,
            )
            input_ids = None
        elif input_ids is not None and self.config.image_token_id is not None and _is_prefill(cache):
            # Same check as the splice: image tokens without images would silently train on placeholders.
            num_positions = int((input_ids == self.config.image_token_id).sum())
            if num_positions:
                raise ValueError(
                    f"input_ids hold {num_positions} image-token positions (image_token_id="
                    f"{self.config.image_token_id}) but 0 images were given (pixel_values is None or empty)"
                )
        if labels is not None and (self.training or (attention_mask is None and position_ids is not None)):
            # A training step has no use for a cache (building one copies every layer's keys and values), and
            # packed rows (vir.data.packing) must not have one: with a cache the mask ignores the position resets.
            use_cache = False
        if labels is not None and self.training and self.loss_chunk_size > 0 and self.chunked_loss_applies:
            # The loss without the full logits: a training step needs nothing else (`logits` is None).
            num_items = kwargs.pop("num_items_in_batch", None)
            outputs = self.get_model()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            loss = chunked_causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels, self.loss_chunk_size,
                                          num_items_in_batch=num_items,
                                          softcap=getattr(self.config, "final_logit_softcapping", None))
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @property
    def chunked_loss_applies(self) -> bool:
        """Whether `loss_chunk_size` can apply: the family's logits are `lm_head(h)`, softcapped at most."""
        return not any(getattr(self.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_SCALE_FIELDS)

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, pixel_values=None, is_first_iteration=False, **kwargs
    ):
        """Pass `pixel_values` on the prefill step only; later steps feed one new token against the cache."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        if pixel_values is not None and (is_first_iteration or _is_prefill(cache)):
            model_inputs["pixel_values"] = pixel_values
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search / num_return_sequences repeat every row; repeat each row's images with it.

        (The generic version repeats each image in place, pairing rows that hold 2+ images with wrong ones.)
        """
        pixel_values = model_kwargs.pop("pixel_values", None)
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if pixel_values is not None and expand_size > 1 and input_ids is not None and pixel_values.shape[0] > 0:
            per_row = (input_ids == self.config.image_token_id).sum(dim=1) // self.config.num_image_tokens
            starts = (per_row.cumsum(0) - per_row).tolist()
            counts = per_row.tolist()
            order = [i for s, n in zip(starts, counts) for _ in range(expand_size) for i in range(s, s + n)]
            pixel_values = pixel_values[torch.tensor(order, dtype=torch.long, device=pixel_values.device)]
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return expanded_ids, model_kwargs


def _is_prefill(cache) -> bool:
    return cache is None or cache.get_seq_length() == 0


@functools.cache
def llava_causal_lm_class(causal_lm_class: type) -> type:
    """The LLaVA class for a family's causal LM (`LlamaForCausalLM` -> `LlavaLlamaForCausalLM`), built once and
    registered with `AutoModelForCausalLM` for its config class (`llava_config_class`)."""
    from transformers import AutoModelForCausalLM

    config_class = llava_config_class(causal_lm_class.config_class)
    name = "Llava" + causal_lm_class.__name__
    model_class = type(name, (LlavaForCausalLMMixin, causal_lm_class), {
        "__module__": __name__, "__qualname__": name, "config_class": config_class,
        "__doc__": f"{causal_lm_class.__name__} + vision tower + projector. " + (LlavaForCausalLMMixin.__doc__ or ""),
    })
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return model_class


LlavaLlamaForCausalLM = llava_causal_lm_class(LlamaForCausalLM)
