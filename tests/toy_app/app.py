"""Toy Hydra task: logs params, per-layer metrics and a Parquet table; raises for x == fail_on; a
multirun job whose config already FINISHED is skipped (tracking.skip_finished)."""

from __future__ import annotations

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from intraneuron.errors import ConfigError
from intraneuron.tracking import RunLogger, tracked_task


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@tracked_task(param_keys=["x", "model"], skipped=lambda run_id: -1)  # -1: already FINISHED
def main(cfg: DictConfig, run: RunLogger) -> int:
    if cfg.x == cfg.fail_on:
        raise ConfigError("x", cfg.x, f"anything but fail_on={cfg.fail_on}")
    for layer in range(cfg.n_layers):
        run.for_layer(layer).log_metrics(
            {f"m{i}": cfg.x * 100 + layer * 10 + i for i in range(cfg.metrics_per_layer)}
        )
    neurons = np.arange(cfg.model.d_mlp)
    run.log_table(pd.DataFrame({"neuron": neurons, "score": cfg.x * neurons}), "tables/neurons.parquet")
    return int(cfg.x)


if __name__ == "__main__":
    main()
