#!/usr/bin/env bash
# The reconnect storm after a failover: CLIENTS persistent sessions, each with a message
# waiting, reconnect at once to a spool that was just killed (SIGKILL) and restarted. Prints
# the time from the restart until every client is subscribed again and has its message.
#
#   scripts/reconnect-storm.sh [CLIENTS] [ROUNDS]      defaults: 1000 clients, 3 rounds
#
# SPOOL_BIN runs another spool binary (an earlier build, for before/after figures).
set -euo pipefail
cd "$(dirname "$0")/.."

clients=${1:-1000}
rounds=${2:-3}
port=18832
spool=${SPOOL_BIN:-target/release/spool}
cargo build --release --locked -p spool-broker -p spool-bench

work=$(mktemp -d "$PWD/target/storm.XXXXXX")
spool_pid=
cleanup() {
    [ -z "$spool_pid" ] || kill -9 "$spool_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_spool() {
    SPOOL_ADMIN_BIND= "$spool" serve --data-dir "$work/spool-data" --mqtt-bind "127.0.0.1:$port" \
        --mqtts-bind '' --max-connections $((clients + 100)) >> "$work/spool.log" 2>&1 &
    spool_pid=$!
}

for ((round = 1; round <= rounds; round++)); do
    rm -rf "$work/spool-data"
    start_spool
    sleep 1
    target/release/spool-load storm --phase prepare --port "$port" --clients "$clients" > /dev/null
    kill -9 "$spool_pid"
    wait "$spool_pid" 2>/dev/null || true
    # The clients start knocking first, as after a failover; spool starts right behind them.
    target/release/spool-load storm --phase reconnect --port "$port" --clients "$clients" &
    load=$!
    start_spool
    wait "$load"
    kill -9 "$spool_pid"
    wait "$spool_pid" 2>/dev/null || true
done
