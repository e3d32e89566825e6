"""A from-scratch "pretrained" Llama for the synthetic task: a causal LM on the data set's own text.

Stands in for Llama-3's pretraining + instruction tuning when no weights exist offline: a random-init
`LlamaForCausalLM` over the synthetic tokenizer learns the data set's language inside the Llama-3 chat
template (so it knows the header / `<|eot_id|>` structure LLaVA's llama3 template uses), and, from text-only
scene-description QA (`scene_text`), to answer the task's questions about a described scene.

It trains through HF's `Trainer`, as every other stage does (`_BaseTrainer`: the library's length-grouped
sampler, the loss weighted by labelled tokens). On a 2-core CPU that costs what the former hand-written loop
did: 400 steps in 22.0 s, where the old loop took 23.4 s. On one H200, 16000 steps took 345 s and the base read
93.5 % in text for seed 0; the old loop's shipped base reads 96.0 %, within the old loop's own seed spread
(docs/training-log.md, 2026-12-04).

    metrics = pretrain_llm("runs/bases/llm", tokenizer_dir, documents, cfg.model.llm, cfg.demo.bases.llm)
    LlamaForCausalLM.from_pretrained("runs/bases/llm"); AutoTokenizer.from_pretrained("runs/bases/llm")
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, Trainer

from vir.data.collator import DataCollatorForSupervisedDataset
from vir.data.conversation import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, Message
from vir.data.templates import build_example
from vir.demo.common import (
    PathLike,
    StepRecords,
    as_dataclass,
    clear_metrics,
    fingerprint,
    finished_metrics,
    pretrain_arguments,
    refuse_mismatch,
    write_metrics,
)
from vir.demo.config import LLMPretrainConfig
from vir.demo.scene_text import Document, SceneCaption, to_messages
from vir.inference.generate import Query, generate_answers
from vir.inference.scoring import accuracy_by_type, overall_accuracy
from vir.models.model_config import llm_fields_from_sizes
from vir.training.distributed import run_state
from vir.training.sampler import grouped_train_sampler
from vir.utils.config_schema import LLMConfig

logger = logging.getLogger(__name__)

_SAVED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_NO_IMAGE_ID = -1  # documents are text-only: the renderer never emits an image block
_MAX_ANSWER_TOKENS = 16  # the longest reference answer is a ~12-token sentence


def build_llama(llm: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A random-init `LlamaForCausalLM` with the size fields of `model.llm` and the tokenizer's vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **llm_fields_from_sizes(llm),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model


@torch.no_grad()
def init_from_words(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, token_words: Mapping[str, str]
) -> None:
    """Set each `token`'s input embedding to the sum of the embeddings of `words` as they read in a sentence
    (`" " + words`, so `<|grid_small_red_circle|>` starts at Ġsmall + Ġred + Ġcircle).

    A new token then starts out sharing its words' directions: attention that matches "red" in a question
    against a scene cell is right from the first step instead of being learnt per token (the look-ups of the
    grid base learn faster, see README Status)."""
    embeddings = model.get_input_embeddings().weight
    vocabulary = tokenizer.get_vocab()
    for token, words in token_words.items():
        if token not in vocabulary or not words.strip():
            raise ValueError(f"cannot start {token!r} from the words {words!r}: "
                             + ("no words" if token in vocabulary else "the token is not in the vocabulary"))
        ids = tokenizer.encode(" " + words.strip(), add_special_tokens=False)
        embeddings[vocabulary[token]] = embeddings[ids].sum(dim=0)


def encode_document(
    document: Document, tokenizer: PreTrainedTokenizerBase, max_length: int, loss_on: str = "all"
) -> Tuple[List[int], List[int]]:
    """A document rendered with the Llama-3 chat template -> (input_ids [T], labels [T]), cut to `max_length`;
    a `SceneCaption` with LLaVA's stage-1 `plain` template instead (bos, scene tokens, caption, eos).

    `loss_on="all"` trains every token after `<|begin_of_text|>` (plain causal LM: user turns and headers
    too); `"assistant"` only what LLaVA's llama3 template trains (assistant replies and their `<|eot_id|>`).
    """
    if isinstance(document, SceneCaption):  # plain template, the scene's tokens where the image block goes
        scene_ids = tokenizer(document.scene, add_special_tokens=False)["input_ids"]
        messages = [Message("user", DEFAULT_IMAGE_TOKEN), Message("assistant", document.caption)]
        input_ids, labels = build_example(messages, tokenizer, "plain", _NO_IMAGE_ID, len(scene_ids))
        start = input_ids.index(_NO_IMAGE_ID)
        input_ids[start : start + len(scene_ids)] = scene_ids
    else:
        input_ids, labels = build_example(to_messages(document), tokenizer, "llama3", _NO_IMAGE_ID, 1)
    if loss_on == "all":
        labels = [IGNORE_INDEX] + input_ids[1:]
    elif loss_on != "assistant":
        raise ValueError(f"unknown loss_on {loss_on!r} (demo.bases.llm.loss_on); choices: ['all', 'assistant']")
    return input_ids[:max_length], labels[:max_length]


def collate(examples: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """(ids, labels) pairs -> the library collator's `input_ids`, `labels`, `attention_mask` [B, T_max]."""
    return DataCollatorForSupervisedDataset(pad_id)([{"input_ids": ids, "labels": labs} for ids, labs in examples])


def answer_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Mapping], batch_size: int = 64
) -> Dict[str, float]:
    """Greedy answers to `scene_qa_examples` (first user turn only) -> exact-match accuracy per type + overall,
    by the library's answerer (`generate_answers`) and scorer."""
    queries = [Query(to_messages(e["messages"])[:1]) for e in examples]
    predictions = generate_answers(model, tokenizer, None, queries, template="llama3",
                                   max_new_tokens=_MAX_ANSWER_TOKENS, batch_size=batch_size)
    per_type = accuracy_by_type(predictions, [e["answer"] for e in examples], [e["question_type"] for e in examples])
    result = {kind: row["accuracy"] for kind, row in per_type.items()}
    result["overall"] = overall_accuracy(per_type)
    return {k: round(v, 4) for k, v in sorted(result.items())}


def pretrain_llm(
    out_dir: PathLike,
    tokenizer_dir: PathLike,
    texts: Sequence[Document],
    llm_cfg: Any,
    pretrain_cfg: Any = None,
    eval_examples: Optional[Sequence[Mapping]] = None,
    force: bool = False,
    extra_tokens: Sequence[str] = (),
    token_words: Optional[Mapping[str, str]] = None,
    source: Optional[str] = None,
) -> Dict[str, Any]:
    """Train a random-init Llama as a causal LM on `texts`; save it with its tokenizer to `out_dir`.

    `texts` are documents (`corpus_texts` strings and/or message lists such as `scene_qa_examples`'
    "messages"); `llm_cfg` is `model.llm` (sizes; its `path` is ignored), `pretrain_cfg` is `demo.bases.llm`.
    `eval_examples` (`scene_qa_examples` on held-out scenes) are scored by greedy exact match every
    `eval_every` steps. `extra_tokens` (e.g. `scene_text.grid_tokens`) join the vocabulary before the model is
    built and are saved with its tokenizer, as a real LLM's vocabulary holds what its corpus needed;
    `token_words` ({token: words}, `scene_text.grid_token_words`) starts those tokens' embeddings at the sum
    of their words' (`init_from_words`). Writes a self-contained HF Llama directory (`config.json`,
    `model.safetensors`, tokenizer files) and, last, `pretrain_metrics.json` (loss and accuracy over time);
    returns the metrics, or the saved ones at once when `out_dir` holds a finished run with the same inputs
    (unless `force`). With `source` (`demo.bases.source`, where `out_dir`'s base was copied from) a base that does
    not match raises `BaseMismatchError` instead of being retrained.
    """
    llm = as_dataclass(LLMConfig, llm_cfg)
    cfg = as_dataclass(LLMPretrainConfig, pretrain_cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_tokens([token for token in extra_tokens if token not in tokenizer.get_vocab()])
    token_words = dict(token_words or {})
    digest = fingerprint({
        "kind": "llm", "llm": _llm_fields(llm), "pretrain": dataclasses.asdict(cfg),
        "tokenizer": Path(tokenizer_dir, "tokenizer.json").read_text(),
        "extra_tokens": list(extra_tokens), "token_words": token_words,
        "texts": [_document_key(doc) for doc in texts],
        "eval": [_document_key(example["messages"]) for example in eval_examples or ()],
    })
    done = finished_metrics(out_dir, digest, _SAVED_FILES)
    if done is not None and not force:
        logger.info("LLM at %s matches the inputs (fingerprint %s); not retraining", out_dir, digest)
        return done
    if source is not None:
        raise refuse_mismatch("LLM", out_dir, digest, source)
    state = run_state()
    rank, world = state.process_index, state.num_processes
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        clear_metrics(out_dir)
    torch.manual_seed(cfg.seed)
    model = build_llama(llm, tokenizer)
    init_from_words(model, tokenizer, token_words)
    history = _train(model, tokenizer, texts, eval_examples or [], cfg, out_dir)
    if rank != 0:  # the first process writes the base; the others read its metrics once it has
        state.wait_for_everyone()
        return finished_metrics(out_dir, digest, _SAVED_FILES)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    metrics = {
        "fingerprint": digest,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_documents": len(texts),
        "processes": world,  # data-parallel processes that trained it (torchrun), 1 otherwise
        "train_seconds": history[-1]["seconds"],
        "steps": history[-1]["step"],
        "final": {key: history[-1][key] for key in ("loss", "accuracy") if key in history[-1]},
        "history": history,
    }
    write_metrics(out_dir, metrics)
    logger.info("LLM saved to %s after %d steps (%.0fs): %s", out_dir, metrics["steps"], metrics["train_seconds"],
                metrics["final"])
    state.wait_for_everyone()
    return metrics


class LabelledLoss(torch.nn.Module):
    """`LlamaForCausalLM`'s causal-LM loss, with the LM head run only where a label is set.

    The answers-only base (`loss_on="assistant"`) trains ~10 % of its tokens; the head and its softmax over
    the rest would be thrown away. Returns the mean over labelled tokens (the model's own loss, test) and their
    number."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.model.lm_head(hidden[:, :-1][keep])
        if not keep.any():  # nothing to learn in this share: a zero loss that still reaches every parameter
            return hidden.sum() * 0.0 + logits.sum() * 0.0, 0
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep]), int(keep.sum())


class DocumentDataset(Dataset):
    """Documents encoded on first use (a run may see only part of a large corpus) and kept;
    `modality_lengths` (all positive: no images) are character counts, a free proxy of token lengths for
    the length-grouped sampler."""

    def __init__(self, texts: Sequence[Document], tokenizer: PreTrainedTokenizerBase, cfg: LLMPretrainConfig):
        self.texts, self.tokenizer, self.cfg = texts, tokenizer, cfg
        self.encoded: Dict[int, Tuple[List[int], List[int]]] = {}
        self.modality_lengths = [max(1, sum(len(m.content) for m in to_messages(text))) for text in texts]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        if index not in self.encoded:
            self.encoded[index] = encode_document(self.texts[index], self.tokenizer, self.cfg.max_length,
                                                  self.cfg.loss_on)
        ids, labels = self.encoded[index]
        return {"input_ids": ids, "labels": labels}


class _BaseTrainer(Trainer):
    """The Trainer for the LLM base: length-grouped batches (the library's sampler) and each batch's mean loss
    over labelled tokens weighted by its labelled tokens over the corpus' average per batch, so grouped batches
    weigh each token as mixed ones do (a batch of captions holds ~20x the labels of one of one-word answers)."""

    def __init__(self, *args, length_grouping: int, tokens_per_batch: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.length_grouping, self.tokens_per_batch = length_grouping, tokens_per_batch
        self.window: List[Tuple[float, int]] = []  # (loss x tokens, tokens) since the last record

    def _get_train_sampler(self, train_dataset=None):
        return grouped_train_sampler(self.args, self.train_dataset.modality_lengths, self.length_grouping)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, tokens = model(**inputs)
        self.window.append((loss.item() * tokens, tokens))
        return loss * (tokens / self.tokens_per_batch)

    def take_window_loss(self) -> float:
        """The mean loss over the labelled tokens trained since the last call."""
        total, tokens = sum(t for t, _ in self.window), sum(n for _, n in self.window)
        self.window = []
        return total / max(1, tokens)


def labelled_tokens_per_document(texts: Sequence[Document], tokenizer: PreTrainedTokenizerBase,
                                 cfg: LLMPretrainConfig, sample: int = 512) -> float:
    """The mean number of trained tokens per document, over an even sample of `sample` of `texts`."""
    step = max(1, len(texts) // sample)
    counts = [sum(label != IGNORE_INDEX for label in encode_document(text, tokenizer, cfg.max_length,
                                                                       cfg.loss_on)[1][1:])
              for text in texts[::step][:sample]]
    return max(1.0, sum(counts) / len(counts))


def _train(model, tokenizer, texts, eval_examples, cfg: LLMPretrainConfig, out_dir: PathLike) -> List[Dict[str, Any]]:
    """Train `model` with HF's Trainer (data-parallel under torchrun: `cfg.batch_size` is the global batch); the
    main process scores `eval_examples` every `cfg.eval_every` steps. Returns those records."""
    if cfg.length_grouping < 1:
        raise ValueError(f"demo.bases.llm.length_grouping={cfg.length_grouping} must be >= 1")
    if len(texts) < cfg.batch_size:
        raise ValueError(f"demo.bases.llm.batch_size={cfg.batch_size} is more than the {len(texts)} documents")
    try:
        args = pretrain_arguments(out_dir, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                                  learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  warmup_ratio=cfg.warmup_ratio, seed=cfg.seed, every_parameter_trains=True)
    except ValueError as err:
        raise ValueError(f"demo.bases.llm.{err}") from None
    tokens_per_batch = labelled_tokens_per_document(texts, tokenizer, cfg) * args.per_device_train_batch_size
    trainer = _BaseTrainer(
        model=LabelledLoss(model), args=args, train_dataset=DocumentDataset(texts, tokenizer, cfg),
        data_collator=DataCollatorForSupervisedDataset(tokenizer.eos_token_id),
        length_grouping=cfg.length_grouping, tokens_per_batch=tokens_per_batch,
    )

    def record(step: int, seconds: float) -> Dict[str, Any]:
        row = {"step": step, "seconds": seconds, "loss": round(trainer.take_window_loss(), 4)}
        if eval_examples:
            tick = time.perf_counter()
            row["accuracy"] = answer_accuracy(model, tokenizer, eval_examples)
            row["eval_seconds"] = round(time.perf_counter() - tick, 2)
        logger.info("llm step %d (%.0fs) %s", step, seconds, row)
        return row

    records = StepRecords(record, cfg.eval_every, cfg.max_steps, cfg.max_seconds)
    trainer.add_callback(records)
    trainer.train()
    return records.history


def _llm_fields(llm: LLMConfig) -> Dict[str, Any]:
    fields = dataclasses.asdict(llm)
    for key in ("path", "dtype", "attn_implementation", "quantization", "double_quant"):  # how it loads, not what it is
        fields.pop(key)
    for key in _FAMILY_KEYS:  # the demo's base is always a Llama of the size fields
        fields.pop(key)
    return fields


# `model.llm` keys that shape other families' random-init LLMs, not the demo's Llama base.
_FAMILY_KEYS = ("model_type", "vocab_size", "head_dim", "tie_word_embeddings", "extra_config")


def _document_key(document: Document) -> str:
    kind = "plain\x1d" if isinstance(document, SceneCaption) else ""
    return kind + "\x1e".join(f"{m.role}\x1f{m.content}" for m in to_messages(document))
