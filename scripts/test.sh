#!/usr/bin/env bash
# The one test entry point, for people and CI alike: formatting, lints, and every test suite.
# It installs what a fresh machine lacks (or says how), and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

need_rust_component() {
    if ! cargo "$1" --version >/dev/null 2>&1; then
        step "installing rustup component $2"
        rustup component add "$2" || {
            echo "cargo $1 is missing; install it with: rustup component add $2" >&2
            exit 1
        }
    fi
}

# Installs Debian packages, as root or through sudo.
need_debian_package() {
    if ! command -v "$1" >/dev/null 2>&1; then
        step "installing Debian package $2"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "$2"; } || {
            echo "$1 is missing; install it with: apt-get install $2" >&2
            exit 1
        }
    fi
}

# The paho-mqtt the interop tests are written against.
PAHO_MQTT_VERSION=2.1.0
need_python_package() {
    if ! python3 -c "import paho.mqtt, sys; sys.exit(paho.mqtt.__version__ != '$PAHO_MQTT_VERSION')" 2>/dev/null; then
        step "installing paho-mqtt $PAHO_MQTT_VERSION from PyPI"
        # Debian 12 marks its Python as externally managed (PEP 668); this test-only package
        # is then installed for the user beside it.
        python3 -m pip install --quiet --disable-pip-version-check "paho-mqtt==$PAHO_MQTT_VERSION" ||
            python3 -m pip install --quiet --disable-pip-version-check --user \
                --break-system-packages "paho-mqtt==$PAHO_MQTT_VERSION" || {
            echo "paho-mqtt is missing; install it with: python3 -m pip install paho-mqtt==$PAHO_MQTT_VERSION" >&2
            exit 1
        }
    fi
}

# The Azure IoT Python SDK the module interop tests use; it pins paho-mqtt below 2, so it gets a
# virtual environment of its own.
AZURE_IOT_DEVICE_VERSION=2.14.0
AZURE_PYTHON=target/azure-python
need_azure_python_sdk() {
    if ! "$AZURE_PYTHON/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('azure-iot-device') != '$AZURE_IOT_DEVICE_VERSION')" 2>/dev/null; then
        step "installing azure-iot-device $AZURE_IOT_DEVICE_VERSION from PyPI in $AZURE_PYTHON"
        rm -rf "$AZURE_PYTHON"
        { python3 -m venv "$AZURE_PYTHON" &&
            "$AZURE_PYTHON/bin/python" -m pip install --quiet --disable-pip-version-check \
                "azure-iot-device==$AZURE_IOT_DEVICE_VERSION"; } || {
            echo "cannot install azure-iot-device $AZURE_IOT_DEVICE_VERSION in $AZURE_PYTHON (python3 -m venv and PyPI are needed)" >&2
            exit 1
        }
    fi
}

# The Azure IoT Node SDK the module interop tests use, as pinned in its package-lock.json.
AZURE_NODE=tests/interop/azure_node
need_azure_node_sdk() {
    need_debian_package node nodejs
    need_debian_package npm npm
    if ! (cd "$AZURE_NODE" && npm ls --silent azure-iot-device azure-iot-device-mqtt >/dev/null 2>&1); then
        step "installing the Azure IoT Node SDK from npm in $AZURE_NODE/node_modules"
        (cd "$AZURE_NODE" && npm ci --no-audit --no-fund --silent) || {
            echo "cannot install the Azure IoT Node SDK (npm ci in $AZURE_NODE)" >&2
            exit 1
        }
    fi
}

command -v cargo >/dev/null || { echo "cargo not found: install Rust 1.95 with rustup" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found: install Python 3.11 or later" >&2; exit 1; }
need_rust_component fmt rustfmt
need_rust_component clippy clippy
need_debian_package mosquitto_sub mosquitto-clients
need_python_package
need_azure_python_sdk
need_azure_node_sdk

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p spool-storage --all-targets --features failpoints --locked -- -D warnings

step "cargo test --workspace"
cargo test --workspace --locked

step "storage tests with failpoints compiled in"
cargo test -p spool-storage --features failpoints --locked --test failpoints

step "interop: mosquitto-clients and paho-mqtt against spool serve (tests/interop)"
cargo build -p spool-broker --locked
SPOOL_BIN=target/debug/spool python3 -m unittest discover -s tests/interop -v

step "interop: IoT Edge modules on the Azure IoT Python SDK against spool serve (ports 8883 and 443)"
SPOOL_BIN=target/debug/spool "$AZURE_PYTHON/bin/python" -m unittest discover \
    -s tests/interop/azure_python -v

step "interop: IoT Edge modules on the Azure IoT Node SDK against spool serve (ports 8883 and 443)"
SPOOL_BIN=target/debug/spool node --test "$AZURE_NODE/module_sdk.test.js"

step "all checks passed"
