# Sourced by scripts/demo and scripts/test: make sure .venv exists and holds Ember and its
# development tools. Works on a fresh Debian machine that has only python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c "import ensurepip" >/dev/null 2>&1; then
    echo "○ installing python3-venv (Debian splits venv out of python3)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "○ creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# CRIU for the checkpoint tests: Debian 13 ships 4.1+, which works on these kernels; Debian 12's
# 3.17 fails on them, so there the CRIU tests skip with the reason (or use a criu built by hand).
if ! command -v criu >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ -r /etc/debian_version ]; then
  DEBIAN_MAJOR="$(cut -d. -f1 /etc/debian_version)"
  if [[ "$DEBIAN_MAJOR" =~ ^[0-9]+$ ]] && [ "$DEBIAN_MAJOR" -ge 13 ]; then
    echo "○ installing criu (Debian $DEBIAN_MAJOR ships a version that works here)"
    apt-get install -y -qq criu >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq criu >/dev/null; } \
      || echo "  criu could not be installed: the CRIU tests will skip" >&2
  fi
fi

# The tests verify generated units with `systemd-analyze verify` (Debian's systemd package).
# Installed only where that is possible without asking: as root, on Debian (or a derivative).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
  echo "○ installing systemd (for systemd-analyze verify)"
  install=(apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends systemd)
  "${install[@]}" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && "${install[@]}" >/dev/null; }
fi

# Docker for the image and container-runtime tests: Debian's docker.io (dockerd, containerd,
# runc). The tests start their own dockerd with its data in a temporary folder; where it cannot
# start, they skip with the reason.
if ! command -v dockerd >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
  echo "○ installing docker.io (for the image and container-runtime tests)"
  install=(apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker.io)
  "${install[@]}" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && "${install[@]}" >/dev/null; } \
    || echo "  docker.io could not be installed: the Docker tests will skip" >&2
fi

# Reinstall when the dependencies or the set of modules change: the strict editable install
# (which mypy and IDEs need to resolve ember.*) links files, so new modules need a reinstall.
STAMP="$VENV/.ember-install-stamp"
# Only the folders that exist: a branch may not have every part yet (find fails on a missing one).
WANT="$(cat "$ROOT/pyproject.toml"; cd "$ROOT" && for d in sdk daemon tui cli sync; do [ -d "$d" ] && find "$d" -name '*.py'; done | sort)"
WANT_HASH="$(printf '%s' "$WANT" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT_HASH" ]; then
  echo "○ installing Ember and its development tools into $VENV"
  LOG="$(mktemp)"
  if ! (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e ".[dev]" \
        --config-settings editable_mode=strict >"$LOG" 2>&1); then
    cat "$LOG" >&2
    rm -f "$LOG" "$STAMP"
    echo "error: installing Ember failed (pip's output above)" >&2
    exit 1
  fi
  rm -f "$LOG"
  echo "$WANT_HASH" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
