"""`vir-validate`: run every record of a split through the dataset and print what will train.

    vir-validate data.train_path=data/llava_v1_5_mix665k.json data.image_folder=data/images \
        validate.dump_dir=/tmp/check

Exit status 0 when the data can train, 1 when any record is invalid (all invalid ids are listed).
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from vir.data.dataset import LazySupervisedDataset
from vir.data.validation import format_summary, validate_dataset
from vir.models.builder import build_image_processor, build_tokenizer
from vir.models.model_config import build_model_config
from vir.utils.config import cli_entry


def run(cfg: DictConfig) -> int:
    split = cfg.validate.split
    tokenizer = build_tokenizer(cfg.model)
    image_processor = build_image_processor(cfg.model)
    model_config = build_model_config(cfg.model, tokenizer, image_aspect_ratio=cfg.data.image_aspect_ratio)
    dataset = LazySupervisedDataset.from_config(
        cfg.data,
        split,
        tokenizer,
        image_processor,
        num_image_tokens=model_config.num_image_tokens,
        model_max_length=cfg.model.model_max_length,
        image_token=cfg.model.image_token,
    )
    summary = validate_dataset(dataset, dump_dir=cfg.validate.dump_dir, max_records=cfg.validate.max_records)
    print(format_summary(summary, split, str(cfg.data.get(f"{split}_path"))))
    if cfg.validate.dump_dir:
        print(f"wrote {cfg.validate.dump_dir}/samples.jsonl and {cfg.validate.dump_dir}/tokenizer/")
        with open(f"{cfg.validate.dump_dir}/summary.json", "w", encoding="utf-8") as fh:
            json.dump(summary.to_dict(), fh, indent=2)
    return 0 if summary.can_train else 1


main = cli_entry(run)

if __name__ == "__main__":
    main()
