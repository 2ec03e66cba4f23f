"""Toy Hydra task: prints where the job runs, the launch directory, and where a relative store resolves."""

from __future__ import annotations

import json
import os

import hydra
from omegaconf import DictConfig

from intraneuron.tracking.hydra_job import launch_dir
from intraneuron.tracking.store import TrackingConfig


@hydra.main(config_path=None, config_name=None, version_base="1.3")
def main(cfg: DictConfig) -> None:
    resolved = TrackingConfig(tracking_uri="sqlite:///store/mlflow.db").validate()
    print(json.dumps({
        "cwd": os.getcwd(),
        "launch_dir": str(launch_dir()),
        "tracking_uri": resolved.tracking_uri,
    }))


if __name__ == "__main__":
    main()
