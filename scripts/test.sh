#!/usr/bin/env bash
# Runs every check and test of tessera, the way CI does.
#
# 1. Installs what a fresh Debian machine lacks (apt-get when root, or sudo):
#    dbus, gnome-keyring, libsecret-tools, age, openssl (test certificates),
#    nodejs + npm, and the npm package shamir-secret-sharing (tests/interop:
#    an independent Shamir implementation tessera's shares must match),
#    systemd (for `systemd-analyze verify` of deploy/systemd).
# 2. Inside a private D-Bus session with a throw-away HOME and an unlocked
#    gnome-keyring (the real OS keychain), runs:
#    cargo fmt --check, cargo clippy --all-targets -D warnings,
#    cargo doc -D warnings, the macOS type-check (scripts/check-macos.sh),
#    cargo test --workspace --locked.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${TESSERA_TEST_SESSION:-}" ]]; then
    missing=()
    command -v dbus-run-session >/dev/null || missing+=(dbus)
    command -v gnome-keyring-daemon >/dev/null || missing+=(gnome-keyring)
    command -v secret-tool >/dev/null || missing+=(libsecret-tools)
    command -v age >/dev/null || missing+=(age)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    # systemd-analyze verifies the units in deploy/systemd.
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    if ((${#missing[@]})); then
        echo "==> installing ${missing[*]}"
        if [[ $(id -u) == 0 ]]; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo apt-get update -qq
            sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        else
            echo "error: missing ${missing[*]}; install them (apt-get install ${missing[*]}) and re-run" >&2
            exit 1
        fi
    fi
    for c in rustfmt clippy; do
        if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
            rustup component add "$c"
        fi
    done
    if [[ ! -d tests/interop/node_modules/shamir-secret-sharing ]]; then
        echo "==> npm ci (tests/interop: shamir-secret-sharing)"
        npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error
    fi
    export TESSERA_TEST_SESSION=1
    exec dbus-run-session -- bash "$0" "$@"
fi

# Inside the D-Bus session. Keep the toolchain where it is, but give the
# keyring (and anything else that writes under HOME) a throw-away home.
export CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
test_home="$(mktemp -d)"
trap 'rm -rf "$test_home"' EXIT
export HOME="$test_home"
export XDG_DATA_HOME="$test_home/.local/share"
# An empty password does not unlock; any fixed one does.
printf '%s' "tessera-test-keyring" \
    | gnome-keyring-daemon --unlock --components=secrets --daemonize >/dev/null
echo "==> keyring unlocked in D-Bus session ${DBUS_SESSION_BUS_ADDRESS%%,*}"

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked -q
bash scripts/check-macos.sh
echo "==> cargo test"
cargo build --locked -p tessera-cli --bin tessera
cargo test --workspace --locked
