"""The chunked loss (vir.models.loss) equals transformers' full-logits loss, value and gradients, and the model
uses it in training only (evaluation still gets logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from training_fixtures import mixed_batch, run_config, tiny_bases

from vir.models.builder import build_all
from vir.models.loss import chunked_causal_lm_loss


def _reference(hidden, lm_head, labels, num_items=None):
    logits = lm_head(hidden).float()[:, :-1].reshape(-1, lm_head.out_features)
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return total / (num_items if num_items is not None else (targets != -100).sum())


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("num_items", [None, 40])
def test_value_and_gradients_equal_the_full_computation(chunk, num_items):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :6] = -100  # a prompt
    labels[2] = -100  # a row that trains nothing
    ours = chunked_causal_lm_loss(hidden, lm_head, labels, chunk_size=chunk, num_items_in_batch=num_items)
    grads = torch.autograd.grad(ours, [hidden, lm_head.weight])
    theirs = _reference(hidden, lm_head, labels, num_items)
    expected = torch.autograd.grad(theirs, [hidden, lm_head.weight])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_nothing_to_train_is_a_zero_loss_that_still_has_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, torch.nn.Linear(8, 5, bias=False), torch.full((1, 4), -100))
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_the_model_trains_with_the_chunked_loss_and_evaluates_with_logits(tmp_path_factory, tmp_path):
    bases = tiny_bases(tmp_path_factory)
    model, tokenizer, processor = build_all(run_config(bases, tmp_path, "stage2_full"))
    batch = mixed_batch(bases, tokenizer, processor, model.config.num_image_tokens)
    model.train()
    results = {}
    for chunk in (0, 7):
        model.zero_grad()
        model.loss_chunk_size = chunk
        out = model(**batch)
        out.loss.backward()
        results[chunk] = (out.loss.detach(), out.logits,
                          {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert results[7][1] is None and results[0][1] is not None  # no full logits on the chunked path
    torch.testing.assert_close(results[7][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert results[7][2].keys() == results[0][2].keys()
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[7][2][name], grad, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits is not None  # evaluation (token accuracy) still has logits


def test_the_training_mode_sets_the_chunk_size_from_the_config(tmp_path_factory, tmp_path):
    from vir.training.modes import apply_training_mode

    bases = tiny_bases(tmp_path_factory)
    for chunk in (0, 512):
        cfg = run_config(bases, tmp_path, "stage2_lora", f"training.loss_chunk_size={chunk}")
        model = apply_training_mode(build_all(cfg)[0], cfg.training)
        assert model.get_base_model().loss_chunk_size == chunk
    assert run_config(bases, tmp_path, "stage2_lora").training.loss_chunk_size == 1024  # on by default


def test_on_a_gpu_liger_kernels_fused_loss_takes_the_selected_rows(monkeypatch):
    """The GPU path's wiring (the kernel itself needs Triton on a GPU): where liger-kernel is installed and the
    head is a plain local Linear, the trained rows and the head's weight go to its fused loss, summed."""
    import sys
    import types

    from vir.models import loss as loss_module

    calls = []

    class FakeLiger(torch.nn.Module):  # liger's API: forward(lin_weight, _input, target)
        def __init__(self, ignore_index, reduction):
            super().__init__()
            assert ignore_index == -100 and reduction == "sum"

        def forward(self, weight, rows, target):
            calls.append((rows.shape[0], target.tolist()))
            return F.cross_entropy(rows @ weight.t(), target, reduction="sum")

    module = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    module.LigerFusedLinearCrossEntropyLoss = FakeLiger
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.fused_linear_cross_entropy", module)
    monkeypatch.setattr(loss_module, "fused_loss_applies", lambda hidden, head: True)
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20, bias=False)
    labels = torch.randint(0, 20, (2, 6))
    labels[0, :3] = -100
    ours = chunked_causal_lm_loss(hidden, head, labels, chunk_size=2)
    assert calls == [(8, labels[:, 1:][labels[:, 1:] != -100].tolist())]  # one call, the trained rows only
    torch.testing.assert_close(ours, _reference(hidden, head, labels), atol=1e-6, rtol=1e-5)


def test_the_fused_loss_is_only_for_a_plain_linear_head_on_a_gpu():
    from vir.models.loss import fused_loss_applies

    head = torch.nn.Linear(8, 20, bias=False)
    assert not fused_loss_applies(torch.randn(1, 2, 8), head)  # CPU: the chunks
    if torch.cuda.is_available():
        assert fused_loss_applies(torch.randn(1, 2, 8, device="cuda"), head.cuda())
        partitioned = torch.nn.Linear(8, 20, bias=False).cuda()
        partitioned.weight = torch.nn.Parameter(torch.empty(0, device="cuda"))  # ZeRO-3's placeholder
        assert not fused_loss_applies(torch.randn(1, 2, 8, device="cuda"), partitioned)
