"""LlavaLlamaForCausalLM: splicing, loss on a mixed batch, generation, save/load, meta-device loading, grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models_fixtures import IMAGE_TOKEN_ID, TINY_TEXT, image_ids, text_ids, tiny_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from vir.models import LlavaLlamaForCausalLM, splice_image_features

K = tiny_config().num_image_tokens  # 4


def naive_splice(embeds, ids, features, image_token_id):
    """Per-sample Python reference: walk the batch row by row, fill image positions one feature at a time."""
    out = embeds.clone()
    flat = features.reshape(-1, features.shape[-1])
    cursor = 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] == image_token_id:
                out[b, t] = flat[cursor]
                cursor += 1
    assert cursor == flat.shape[0]
    return out


def test_splice_matches_naive_reference():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 20), generator=gen)
    ids[0, 2:6] = 7  # row 0: one image (4 tokens)
    ids[1, 0:4] = 7  # row 1: two images, back to back and at the end
    ids[1, 16:20] = 7
    embeds = torch.randn(3, 20, 8, generator=gen)
    features = torch.randn(3, 4, 8, generator=gen)
    spliced = splice_image_features(embeds, ids, features, image_token_id=7)
    assert torch.equal(spliced, naive_splice(embeds, ids, features, 7))
    assert torch.equal(spliced[2], embeds[2])  # text-only row untouched


def test_splice_mismatch_names_both_counts():
    ids = torch.tensor([[5, 7, 7, 7, 5]])
    with pytest.raises(ValueError, match=r"3 image-token positions.*2 image\(s\) x 4 tokens = 8"):
        splice_image_features(torch.zeros(1, 5, 8), ids, torch.zeros(2, 4, 8), image_token_id=7)


def test_forward_refuses_image_tokens_without_images():
    model = tiny_model()
    ids = torch.cat([text_ids(torch.Generator().manual_seed(0), 3), image_ids(K)])[None]
    with pytest.raises(ValueError, match=rf"{K} image-token positions .* but 0 images"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=rf"{K} image-token positions .* 2 image\(s\)"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16))


def _mixed_batch(gen):
    """Rows: text-only, one image, two images; right padded with pad id 0. Returns ids, mask, labels, rows."""
    rows = [
        text_ids(gen, 7),
        torch.cat([text_ids(gen, 2), image_ids(K), text_ids(gen, 5)]),
        torch.cat([text_ids(gen, 1), image_ids(K), text_ids(gen, 2), image_ids(K), text_ids(gen, 3)]),
    ]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN_ID), -100)
    labels[:, :2] = -100  # a masked "prompt"
    return ids, mask, labels, rows


def test_mixed_batch_loss_and_logits_match_per_row_forward():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    ids, mask, labels, rows = _mixed_batch(gen)
    pixel_values = torch.randn(3, 3, 16, 16, generator=gen)  # row 1's image, then row 2's two images
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixel_values)
        vocab = out.logits.shape[-1]
        expected = F.cross_entropy(
            out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(out.loss, expected)
        images_per_row = [pixel_values[:0], pixel_values[:1], pixel_values[1:]]
        for b, (row, images) in enumerate(zip(rows, images_per_row)):
            single = model(input_ids=row[None], pixel_values=images).logits[0]
            torch.testing.assert_close(out.logits[b, : len(row)], single, rtol=1e-4, atol=1e-5)


def test_image_features_change_the_logits_only_after_the_image():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    ids = torch.cat([text_ids(gen, 3), image_ids(K), text_ids(gen, 3)])[None]
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=gen)).logits
        b = model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=gen)).logits
    assert torch.equal(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_equals_stepwise_full_forward(use_cache):
    model = tiny_model(seed=3)
    model.generation_config.eos_token_id = None  # always produce max_new_tokens
    gen = torch.Generator().manual_seed(3)
    prompt = torch.cat([text_ids(gen, 2), image_ids(K), text_ids(gen, 1), image_ids(K), text_ids(gen, 2)])[None]
    pixel_values = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            pixel_values=pixel_values,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )
        sequence = prompt
        for _ in range(6):
            logits = model(input_ids=sequence, pixel_values=pixel_values).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_prepare_inputs_for_generation_passes_pixels_on_prefill_only():
    model = tiny_model()
    pixel_values = torch.randn(1, 3, 16, 16)
    ids = torch.cat([image_ids(K), text_ids(torch.Generator().manual_seed(0), 2)])[None]
    first = model.prepare_inputs_for_generation(ids, pixel_values=pixel_values, is_first_iteration=True)
    assert first["pixel_values"] is pixel_values
    with torch.no_grad():
        cache = model(input_ids=ids, pixel_values=pixel_values, use_cache=True).cache
    later = model.prepare_inputs_for_generation(ids, cache=cache, pixel_values=pixel_values, next_sequence_length=1)
    assert "pixel_values" not in later


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(seed=4)
    gen = torch.Generator().manual_seed(4)
    ids = torch.cat([text_ids(gen, 2), image_ids(K), text_ids(gen, 4)])[None]
    pixel_values = torch.randn(1, 3, 16, 16, generator=gen)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "model.mm_projector.0.weight" in saved and "model.mm_projector.2.bias" in saved
    assert "model.vision_tower.vision_tower.embeddings.patch_embedding.weight" in saved

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlavaLlamaForCausalLM
    assert loaded.config.num_image_tokens == K and loaded.config.vision_config.image_size == 16
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values).logits
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixel_values).logits, expected)


def test_loading_a_plain_llama_dir_initialises_projector_on_cpu(tmp_path):
    torch.manual_seed(5)
    llama = LlamaForCausalLM(LlamaConfig(**TINY_TEXT))
    llama.save_pretrained(tmp_path)
    model = LlavaLlamaForCausalLM.from_pretrained(tmp_path, config=tiny_config(), low_cpu_mem_usage=True)
    assert torch.equal(model.get_input_embeddings().weight, llama.get_input_embeddings().weight)
    for name, param in model.named_parameters():
        assert param.device.type == "cpu", name
        assert torch.isfinite(param).all(), name
    projector = model.get_model().mm_projector
    assert projector[0].weight.abs().sum() > 0 and projector[2].weight.abs().sum() > 0
    out = model(input_ids=torch.cat([image_ids(K), torch.tensor([5, 6])])[None], pixel_values=torch.randn(1, 3, 16, 16))
    assert torch.isfinite(out.logits).all()


def test_projector_is_real_even_when_the_model_is_built_on_meta():
    with torch.device("meta"):
        model = LlavaLlamaForCausalLM(tiny_config())
    assert model.get_input_embeddings().weight.is_meta
    for param in model.get_model().mm_projector.parameters():
        assert param.device.type == "cpu" and torch.isfinite(param).all()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_projector_grads(use_reentrant):
    gen = torch.Generator().manual_seed(6)
    ids, mask, labels, _ = _mixed_batch(gen)
    pixel_values = torch.randn(3, 3, 16, 16, generator=gen)
    grads, layer_calls = [], []
    for checkpointing in (False, True):
        model = tiny_model(seed=6).train()
        model.requires_grad_(False)  # LoRA-style: frozen LLM and tower, only the projector trains
        model.get_model().mm_projector.requires_grad_(True)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
            model.enable_input_require_grads()  # what peft does; reentrant checkpointing needs it
        calls = []
        model.get_model().layers[0].mlp.act_fn.register_forward_hook(lambda *args: calls.append(1))
        model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixel_values).loss.backward()
        grads.append([p.grad.clone() for p in model.get_model().mm_projector.parameters()])
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2]  # the checkpointed layer really ran again in backward
    for plain, checkpointed in zip(*grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(plain, checkpointed)


def test_frozen_tower_runs_without_autograd_and_trainable_tower_gets_grads():
    model = tiny_model()
    tower = model.get_vision_tower()
    tower.requires_grad_(False)
    assert not model.get_image_features(torch.randn(1, 3, 16, 16)).grad_fn is None  # projector still trains
    assert tower(torch.randn(1, 3, 16, 16)).grad_fn is None
    tower.requires_grad_(True)
    tower(torch.randn(1, 3, 16, 16)).sum().backward()
    assert tower.vision_tower.embeddings.patch_embedding.weight.grad is not None


def test_decode_step_with_cache_matches_full_forward_under_either_cache_name():
    model = tiny_model(seed=7)
    gen = torch.Generator().manual_seed(7)
    ids = torch.cat([text_ids(gen, 2), image_ids(K), text_ids(gen, 3)])[None]
    pixel_values = torch.randn(1, 3, 16, 16, generator=gen)
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixel_values).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefill = model(input_ids=ids[:, :-1], pixel_values=pixel_values, use_cache=True)
            step = model(input_ids=ids[:, -1:], use_cache=True, **{name: prefill.cache}).logits[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_beam_expansion_repeats_each_rows_images_with_the_row():
    model = tiny_model(seed=8)
    model.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(8)
    rows = torch.stack([
        torch.cat([text_ids(gen, 2), image_ids(K), image_ids(K), text_ids(gen, 2)]),  # images a, b
        torch.cat([text_ids(gen, 6), image_ids(K), text_ids(gen, 2)]),  # image c
    ])
    pixel_values = torch.randn(3, 3, 16, 16, generator=gen)
    _, expanded = model._expand_inputs_for_generation(expand_size=2, input_ids=rows, pixel_values=pixel_values)
    assert torch.equal(expanded["pixel_values"], pixel_values[[0, 1, 0, 1, 2, 2]])
    common = {"input_ids": rows, "pixel_values": pixel_values, "max_new_tokens": 3, "pad_token_id": 0}
    with torch.no_grad():
        greedy = model.generate(**common, do_sample=False)
        # top_k=1 sampling is greedy, so every returned copy must equal its row's greedy continuation
        copies = model.generate(**common, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(copies, greedy.repeat_interleave(2, dim=0))
