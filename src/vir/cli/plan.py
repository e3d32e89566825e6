"""`vir-plan`: will this training config fit? Estimated peak GPU memory per device, from shapes alone.

    vir-plan experiment=llava15_qlora model.llm.path=null model.vision_tower.path=null plan.gpu_gb=24
    vir-plan experiment=llava15_stage2_full plan.world_size=8 plan.gpu_gb=80 plan.output=json

Exits 0 when the estimate fits `plan.gpu_gb`, 1 when it does not.
"""

from __future__ import annotations

from omegaconf import DictConfig

from vir.planning.memory import plan_memory
from vir.utils.config import ConfigError, cli_entry


def run(cfg: DictConfig) -> int:
    if cfg.plan.output not in ("table", "json"):
        raise ConfigError(f"plan.output={cfg.plan.output!r} is not one of table, json")
    plan = plan_memory(cfg)
    print(plan.to_json() if cfg.plan.output == "json" else plan.table())
    return 0 if plan.fits else 1


main = cli_entry(run)

if __name__ == "__main__":
    main()
