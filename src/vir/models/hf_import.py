"""The way in from transformers' Llava: a `llava-hf/*` style directory split into the three things a `vir` run
starts from (`model.init_from_hf=DIR`):

    llm/              an LLM directory of the text model's family (config, weights, the checkpoint's tokenizer)
                                                                                            -> model.llm.path
    clip/ or siglip/  the vision model's directory with its image processor                -> model.vision_tower.path
    mm_projector.bin  the projector under LLaVA's keys                                     -> model.pretrained_projector

Every key layout is read: the modules' own names (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.*`) and the serialised one that transformers writes and the hub's
llava-hf checkpoints carry (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower[.vision_model].*`,
`multi_modal_projector.*`). Weights are renamed, never changed;
any key or shape the split does not expect fails with one message naming expected and found keys and shapes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessorPil, LlavaConfig, SiglipImageProcessorPil
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from vir.data.templates import check_template
from vir.models.configuration import VISION_TYPES_WITH_CLS
from vir.models.encoder import vision_classes
from vir.models.model_types import llm_type_problem
from vir.utils.errors import UserError
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

IMPORT_MARKER = "imported_from.json"
# Our projector's layer index -> transformers' LlavaMultiModalProjector attribute (export maps this way; import
# the other).
HF_PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}
_FROM_HF_PROJECTOR = {hf: ours for ours, hf in HF_PROJECTOR_LAYERS.items()}


class ImportMismatchError(UserError):
    """A checkpoint whose keys or shapes are not what its config says; the message lists both."""


def split_hf_state_dict(state: Dict[str, torch.Tensor]) -> Tuple[dict, dict, dict]:
    """(causal-LM keys, vision-model keys, LLaVA projector keys) from a Llava state dict in either layout (pure)."""
    llm, tower, projector, unknown = {}, {}, {}, []
    for key, tensor in state.items():
        name = key.removeprefix("model.")
        if name.startswith("language_model.model."):  # old layout
            llm["model." + name[len("language_model.model."):]] = tensor
        elif name.startswith("language_model.lm_head."):
            llm[name[len("language_model."):]] = tensor
        elif name.startswith("language_model."):  # new layout: model.language_model.<base model keys>
            llm["model." + name[len("language_model."):]] = tensor
        elif key == "lm_head.weight":
            llm[key] = tensor
        elif name.startswith("vision_tower."):  # vision-model keys; hub checkpoints add `vision_model.`
            tower[name[len("vision_tower."):].removeprefix("vision_model.")] = tensor
        elif name.startswith("multi_modal_projector."):
            layer, _, param = name[len("multi_modal_projector."):].partition(".")
            if layer not in _FROM_HF_PROJECTOR:
                unknown.append(key)
                continue
            projector[f"model.mm_projector.{_FROM_HF_PROJECTOR[layer]}.{param}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ImportMismatchError(f"keys that are no part of a Llava model: {sorted(unknown)[:10]}")
    return llm, tower, projector


def check_state(found: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]], what: str, source: Path) -> None:
    """Raise `ImportMismatchError` naming missing, unexpected and mis-shaped keys of `found` against `expected`."""
    shapes = {k: tuple(v.shape) for k, v in found.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = {k: {"expected": expected[k], "found": shapes[k]} for k in set(expected) & set(shapes)
             if expected[k] != shapes[k]}
    if missing or unexpected or wrong:
        raise ImportMismatchError(
            f"{source}: the {what} weights do not match its config.json: "
            + "; ".join(part for part in (
                f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
                f"wrong shapes {dict(sorted(wrong.items())[:8])}" if wrong else "") if part))


def _expected(model_class, config) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _read_weights(directory: Path) -> Dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory} holds no .safetensors weights (convert .bin checkpoints to safetensors first: "
                        "pickled .bin files can run code when loaded)")
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def fingerprint(directory: Path) -> str:
    """What identifies a source checkpoint: its config and the names, sizes and times of its weight files."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in sorted(directory.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def import_hf_llava(hf_dir: PathLike, out_dir: PathLike) -> Dict[str, str]:
    """Split `hf_dir` into `out_dir/{llm,clip|siglip,mm_projector.bin}` (once: an unchanged source is not re-read).

    Returns the config values the checkpoint fixes: `llm`, `clip` (the tower, CLIP or SigLIP), `projector` paths,
    `select_layer`,
    `select_feature`, `image_aspect_ratio` (pad when its image processor pads to a square)."""
    source, out = Path(hf_dir), Path(out_dir)
    if not (source / "config.json").is_file():
        raise UserError(f"model.init_from_hf={source}: no config.json there (a transformers Llava directory)")
    raw = json.loads((source / "config.json").read_text())
    if raw.get("model_type") != "llava":
        raise UserError(f"model.init_from_hf={source} holds a {raw.get('model_type')!r} model, not transformers' "
                        "'llava' (an original LLaVA checkpoint, model_type llava_llama, goes in model.llm.path)")
    config = LlavaConfig.from_pretrained(str(source))
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise UserError(f"model.init_from_hf={source}: a projector with {config.projector_hidden_act} and bias="
                        f"{config.multimodal_projector_bias}; vir's mlp2x_gelu is Linear -> GELU -> Linear with biases")
    if not isinstance(config.vision_feature_layer, int):
        raise UserError(f"model.init_from_hf={source}: vision_feature_layer={config.vision_feature_layer} (several "
                        "layers concatenated) is not a LLaVA-1.5 tower")
    text_config, vision = config.text_config, config.vision_config
    problem = llm_type_problem(text_config.to_dict())
    if problem is not None:
        raise UserError(f"model.init_from_hf={source}: its text model is a {text_config.model_type!r} model "
                        f"({problem}); a decoder-only causal LM is needed")
    if vision.model_type not in VISION_TYPES_WITH_CLS:
        raise UserError(f"model.init_from_hf={source}: its vision tower is a {vision.model_type!r} model; CLIP or "
                        "SigLIP is needed")
    has_cls = VISION_TYPES_WITH_CLS[vision.model_type]
    if config.vision_feature_select_strategy == "default" and not has_cls:
        raise UserError(f"model.init_from_hf={source}: vision_feature_select_strategy=default drops the first token, "
                        f"but a {vision.model_type} tower has no CLS token to drop")
    tower_dir = out / ("clip" if has_cls else "siglip")
    result = {
        "llm": str(out / "llm"), "clip": str(tower_dir), "projector": str(out / "mm_projector.bin"),
        "select_layer": config.vision_feature_layer,
        "select_feature": "patch" if config.vision_feature_select_strategy == "default" or not has_cls
                          else "cls_patch",
    }
    image_processor = _image_processor(source)
    result["image_aspect_ratio"] = "pad" if getattr(image_processor, "do_pad", False) else "crop"
    marker = out / IMPORT_MARKER
    stamp = {"source": str(source.resolve()), "fingerprint": fingerprint(source)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return result
    llm_state, tower_state, projector = split_hf_state_dict(_read_weights(source))
    causal_lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    tower_class = vision_classes(vision.model_type)[1]
    text_config.tie_word_embeddings = bool(text_config.tie_word_embeddings or config.tie_word_embeddings)
    if text_config.tie_word_embeddings and "lm_head.weight" not in llm_state:
        llm_state["lm_head.weight"] = llm_state["model.embed_tokens.weight"]
    check_state(llm_state, _expected(causal_lm_class, text_config), "language model", source)
    if text_config.tie_word_embeddings:  # one weight: saved once, as transformers saves a tied model
        llm_state.pop("lm_head.weight")
    check_state(tower_state, _expected(tower_class, vision), "vision tower", source)
    width_in, width_out = vision.hidden_size, text_config.hidden_size
    shapes = {"0.weight": (width_out, width_in), "0.bias": (width_out,), "2.weight": (width_out, width_out),
              "2.bias": (width_out,)}
    check_state(projector, {f"model.mm_projector.{k}": v for k, v in shapes.items()}, "projector", source)
    (out / "llm").mkdir(parents=True, exist_ok=True)
    tower_dir.mkdir(parents=True, exist_ok=True)
    text_config.architectures = [causal_lm_class.__name__]
    text_config.save_pretrained(str(out / "llm"))
    save_file({k: v.contiguous() for k, v in llm_state.items()}, str(out / "llm" / "model.safetensors"))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out / "llm"))
    vision.architectures = [tower_class.__name__]
    vision.save_pretrained(str(tower_dir))
    save_file({k: v.contiguous() for k, v in tower_state.items()}, str(tower_dir / "model.safetensors"))
    _tower_processor(image_processor, vision.image_size, has_cls).save_pretrained(str(tower_dir))
    torch.save({k: v.contiguous() for k, v in projector.items()}, out / "mm_projector.bin")
    marker.write_text(json.dumps(stamp, indent=2))
    logger.info("imported %s -> %s (llm/, %s/, mm_projector.bin)", source, out, tower_dir.name)
    return result


def _image_processor(source: Path):
    try:
        return AutoProcessor.from_pretrained(str(source)).image_processor
    except (OSError, ValueError, TypeError):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(source))


def _tower_processor(processor, image_size: int, clip: bool):
    """The tower family's preprocessing with the checkpoint's sizes, mean, std and resampling (padding is the data
    config's `image_aspect_ratio`): CLIP's resize + crop, or SigLIP's resize to a square."""
    if not clip:
        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                       image_mean=list(processor.image_mean), image_std=list(processor.image_std),
                                       resample=processor.resample)
    size = {k: v for k, v in dict(processor.size).items() if v is not None} if processor.size else {
        "shortest_edge": image_size}
    crop = dict(processor.crop_size) if getattr(processor, "crop_size", None) else {"height": image_size,
                                                                                     "width": image_size}
    return CLIPImageProcessorPil(size=size, crop_size=crop, image_mean=list(processor.image_mean),
                                 image_std=list(processor.image_std), resample=processor.resample)


def apply_init_from_hf(cfg) -> None:
    """With `model.init_from_hf` set, import it into `<training.output_dir>/init_from_hf/` and point
    `model.llm.path`, `model.vision_tower.path`, `model.pretrained_projector` (and the tower's feature selection)
    at the result, in place. Those keys must be unset (`???` or null) beside it. Under several processes, call it
    in `main_process_first()`: the others then find the import done."""
    from omegaconf import OmegaConf

    from vir.utils.config import ConfigError

    source = cfg.model.init_from_hf
    if source is None:
        return
    taken = [key for key in ("model.llm.path", "model.vision_tower.path", "model.pretrained_projector",
                             "model.tokenizer_path")
             if not OmegaConf.is_missing(OmegaConf.select(cfg, key.rpartition(".")[0]), key.rpartition(".")[2])
             and OmegaConf.select(cfg, key) is not None]
    if taken:
        raise ConfigError(f"model.init_from_hf={source} provides the LLM, the tower and the projector: leave "
                          f"{', '.join(taken)} unset")
    _check_template_fits(cfg.data.template, Path(source))
    result = import_hf_llava(source, Path(cfg.training.output_dir) / "init_from_hf")
    cfg.model.llm.path = result["llm"]
    cfg.model.vision_tower.path = result["clip"]
    cfg.model.pretrained_projector = result["projector"]
    cfg.model.vision_tower.select_layer = result["select_layer"]
    cfg.model.vision_tower.select_feature = result["select_feature"]
    if result["image_aspect_ratio"] != cfg.data.image_aspect_ratio:
        logger.warning("model.init_from_hf=%s was trained with image_aspect_ratio=%s; this run uses "
                       "data.image_aspect_ratio=%s", source, result["image_aspect_ratio"], cfg.data.image_aspect_ratio)


def _check_template_fits(template: str, source: Path) -> None:
    """`data.template` against the checkpoint's own tokenizer, before its weights are read and split: a template
    that does not fit (the Llama-3 default on LLaVA-1.5's Vicuna) stops the run in one line, not after the import."""
    if not (source / "config.json").is_file():
        return  # import_hf_llava names what is missing
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"model.init_from_hf={source}: no tokenizer loads from it "
                        f"({str(err).splitlines()[0][:200]})") from None
    check_template(template, tokenizer)
