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

command -v cargo >/dev/null || { echo "cargo not found: install Rust 1.95 with rustup" >&2; exit 1; }
need_rust_component fmt rustfmt
need_rust_component clippy clippy

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p spool-storage --all-targets --features failpoints --locked -- -D warnings

step "cargo test --workspace"
cargo test --workspace --locked

step "storage tests with failpoints compiled in"
cargo test -p spool-storage --features failpoints --locked --test failpoints

step "all checks passed"
