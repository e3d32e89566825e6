"""Next-token cross-entropy that never holds the full `[B, T, vocab]` fp32 logits.

transformers' causal-LM loss projects every position through `lm_head`, upcasts all logits to fp32 and only
then drops the positions that do not train: at Llama-3's 128256-entry vocabulary that tensor (and its gradient)
is the largest allocation of a step. `chunked_causal_lm_loss` takes the hidden states of the positions that
train (label != -100 after the shift) only, and projects them in chunks of `chunk_size` rows, each chunk
recomputed in the backward pass (activation checkpointing), so at most one chunk's logits exist at a time.
The value and the gradients equal the full computation's up to float rounding (tests/test_models_loss.py).

On a GPU with liger-kernel installed, the same selected rows go through its fused linear cross-entropy
(Triton: the projection and the loss in one kernel, gradients computed in the forward pass), which is faster
and leaner than the checkpointed chunks; the chunks remain the path everywhere else, and where the head's
weight is not a plain local tensor (DeepSpeed ZeRO-3 partitions it; a quantised head).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vir.data.conversation import IGNORE_INDEX


def softcap_logits(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """`softcap * tanh(logits / softcap)` (Gemma 2/3's `final_logit_softcapping`); unchanged when None."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _chunk_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                    softcap: Optional[float] = None) -> torch.Tensor:
    # The module itself, not F.linear on its weight: DeepSpeed ZeRO-3 gathers the weight in its forward hook.
    return F.cross_entropy(softcap_logits(lm_head(hidden), softcap).float(), targets, reduction="sum")


def _chunked_loss_sum(selected: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                      chunk_size: int, softcap: Optional[float] = None) -> torch.Tensor:
    total = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_size):
        part, part_targets = selected[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, part, lm_head, part_targets, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(part, lm_head, part_targets, softcap)
    return total


def _liger_loss_sum() -> Optional[nn.Module]:
    """liger-kernel's fused linear cross-entropy (summed), or None where it is not installed."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:  # not installed, or no Triton on this machine
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def fused_loss_applies(hidden: torch.Tensor, lm_head: nn.Module) -> bool:
    """Whether liger's kernel can take this head: on a GPU, a plain Linear whose weight is all here."""
    weight = getattr(lm_head, "weight", None)
    return (hidden.is_cuda and type(lm_head) is nn.Linear and lm_head.bias is None and weight is not None
            and weight.dim() == 2 and weight.shape[1] == hidden.shape[-1] and weight.dtype.is_floating_point)


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                           chunk_size: int = 1024, num_items_in_batch: Optional[torch.Tensor | int] = None,
                           softcap: Optional[float] = None) -> torch.Tensor:
    """Shifted next-token CE of `lm_head(hidden_states)` against `labels` ([B, T], -100 ignored): the mean over
    trained positions, or their sum over `num_items_in_batch` when given (the Trainer's count across gradient
    accumulation), as transformers' `ForCausalLMLoss` computes it. `softcap`: the logits go through
    `softcap_logits` first, as Gemma's `final_logit_softcapping` does."""
    shift_hidden = hidden_states[:, :-1, :]
    shift_labels = labels[:, 1:].to(hidden_states.device)
    trained = shift_labels != IGNORE_INDEX
    selected = shift_hidden[trained]  # [M, D]
    targets = shift_labels[trained]
    fused = (_liger_loss_sum() if targets.numel() and softcap is None and fused_loss_applies(hidden_states, lm_head)
             else None)
    if fused is not None:
        total = fused(lm_head.weight, selected, targets).float()
    else:
        total = _chunked_loss_sum(selected, lm_head, targets, chunk_size, softcap)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=total.device, dtype=torch.float32)
    else:
        denominator = torch.as_tensor(max(int(targets.numel()), 1), device=total.device, dtype=torch.float32)
    if targets.numel() == 0:
        return total + 0.0 * hidden_states.sum()  # keeps the graph (and DDP's reducer) connected
    return total / denominator
