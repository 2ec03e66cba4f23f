"""Start-up cost of the command line: `intraneuron --help` and a shell-completion query against
`python -c "import hydra"` and against a bare Hydra app of one config file, measured in one run.

    .venv/bin/python benchmarks/startup.py [--repeats 7]

Only Hydra is imported before the task runs, so `--help` and TAB completion cost Hydra's own work
(composing the config, listing the config groups), not torch or MLflow. Each command runs as a
fresh process; the median of the repeats is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
BARE_APP = '''
import hydra

@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    pass

main()
'''


def wall(command: list[str], env: dict | None = None, cwd: str | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    repeats = parser.parse_args().repeats

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "conf").mkdir()
        (Path(tmp) / "conf" / "config.yaml").write_text("x: 1\n")
        (Path(tmp) / "app.py").write_text(BARE_APP)
        completion = {**os.environ, "COMP_LINE": "intraneuron clustering=", "COMP_POINT": "24"}
        commands = {
            'python -c "import hydra"': ([sys.executable, "-c", "import hydra"], None, None),
            "bare Hydra app --help": ([sys.executable, "app.py", "--help"], None, tmp),
            "intraneuron --help": ([str(BIN / "intraneuron"), "--help"], None, None),
            "intraneuron TAB completion (clustering=)": (
                [str(BIN / "intraneuron"), "--shell-completion", "query=bash"], completion, None),
            'python -c "import intraneuron.runner"': (
                [sys.executable, "-c", "import intraneuron.runner, torch, mlflow"], None, None),
        }  # fmt: skip
        for command, env, cwd in commands.values():  # warm the file cache and .pyc files
            wall(command, env, cwd)
        medians = {
            name: statistics.median(wall(command, env, cwd) for _ in range(repeats))
            for name, (command, env, cwd) in commands.items()
        }
    base = medians['python -c "import hydra"']
    print(f"median of {repeats} fresh processes each")
    for name, seconds in medians.items():
        print(f"{name:45s} {seconds:6.3f} s  {seconds / base:5.2f}x import hydra")
    help_ratio = medians["intraneuron --help"] / medians["bare Hydra app --help"]
    print(f"intraneuron --help vs a bare Hydra app's --help: {help_ratio:.2f}x")


if __name__ == "__main__":
    main()
