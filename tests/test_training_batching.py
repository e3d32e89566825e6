"""training.global_batch_size: set once, the same optimisation on any number of processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vir.training.batching import batch_layout
from vir.utils.config import ConfigError


def _cfg(global_batch_size, micro=16, accumulation=1):
    return SimpleNamespace(global_batch_size=global_batch_size, per_device_train_batch_size=micro,
                           gradient_accumulation_steps=accumulation)


@pytest.mark.parametrize("world, expected", [(1, (16, 8)), (2, (16, 4)), (8, (16, 1)), (64, (2, 1)), (128, (1, 1))])
def test_the_global_batch_is_the_same_on_any_world_size(world, expected):
    micro, accumulation = batch_layout(_cfg(128), world)
    assert (micro, accumulation) == expected
    assert micro * accumulation * world == 128


def test_the_micro_batch_divides_each_processes_share():
    assert batch_layout(_cfg(96, micro=10), 2) == (8, 6)  # 48 a process: 8 x 6, never 10 x 4.8


def test_without_a_global_batch_the_per_device_keys_are_used_as_given():
    assert batch_layout(_cfg(None, micro=4, accumulation=3), 8) == (4, 3)


def test_a_global_batch_that_does_not_split_names_the_key():
    with pytest.raises(ConfigError, match="training.global_batch_size=100 does not split over 8 processes"):
        batch_layout(_cfg(100), 8)
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        batch_layout(_cfg(8, micro=0), 1)


def test_the_trainer_arguments_carry_the_derived_layout(tmp_path):
    from vir.training.run import training_arguments
    from vir.utils.config import compose_config

    cfg = compose_config(["model=tiny", "training.global_batch_size=8", "training.per_device_train_batch_size=4",
                          f"training.output_dir={tmp_path}", "training.report_to=[]"])
    args = training_arguments(cfg, has_eval=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)


def test_deepspeed_names_resolve_to_shipped_configs_and_bad_ones_name_the_key(tmp_path):
    import json as _json

    from vir.training.deepspeed_config import SHIPPED, deepspeed_arguments, resolve_deepspeed

    for name in SHIPPED:
        config = _json.loads(open(resolve_deepspeed(name)).read())
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["zero_optimization"]["stage"] in (2, 3)
    own = tmp_path / "ds.json"
    own.write_text("{}")
    assert resolve_deepspeed(str(own)) == str(own) and resolve_deepspeed(None) is None
    assert deepspeed_arguments(None) == {}
    with pytest.raises(ConfigError, match="training.deepspeed=zero9"):
        resolve_deepspeed("zero9")
