#!/usr/bin/env bash
# QoS 1 throughput of spool and mosquitto, side by side in one run: alternating rounds of
# spool-load against each, then the median of each and their ratio.
#
#   scripts/compare.sh [ROUNDS] [PUBLISHERS...]      defaults: 5 rounds, 1 and 10 publishers
#
# spool runs with its defaults (every QoS 1 message fsynced before its PUBACK), its data on the
# disk under target/ (never tmpfs, where fsync is free). mosquitto runs in memory, configured
# for its best: no in-flight or queue limits. SPOOL_LOAD_COUNT sets the messages per round.
# SPOOL_BASELINE_BIN names a second spool binary (an earlier build, say) measured in the same
# rounds, for before/after figures.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-5}
shift || true
publishers=("$@")
[ ${#publishers[@]} -gt 0 ] || publishers=(1 10)
count=${SPOOL_LOAD_COUNT:-50000}
spool_port=18830
mosquitto_port=18831
baseline_port=18833
baseline=${SPOOL_BASELINE_BIN:-}

command -v mosquitto >/dev/null || { echo "mosquitto is missing: apt-get install mosquitto" >&2; exit 1; }
cargo build --release --locked -p spool-broker -p spool-bench

work=$(mktemp -d "$PWD/target/compare.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/mosquitto.conf" <<CONF
listener $mosquitto_port 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 0
max_queued_messages 0
CONF
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
pids+=($!)
SPOOL_ADMIN_BIND= target/release/spool serve --data-dir "$work/spool-data" --mqtt-bind "127.0.0.1:$spool_port" \
    --mqtts-bind '' > "$work/spool.log" 2>&1 &
pids+=($!)
if [ -n "$baseline" ]; then
    SPOOL_ADMIN_BIND= "$baseline" serve --data-dir "$work/baseline-data" --mqtt-bind "127.0.0.1:$baseline_port" \
        --mqtts-bind '' > "$work/baseline.log" 2>&1 &
    pids+=($!)
fi
sleep 1

run() { # port publishers -> msg/s
    target/release/spool-load --port "$1" --count "$count" --inflight 64 --publishers "$2" |
        sed -E 's/.*: ([0-9]+) msg\/s.*/\1/'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "QoS 1, 256 B, $count messages a round, 64 in flight per publisher, $rounds rounds (msg/s)"
for p in "${publishers[@]}"; do
    spool=() mosquitto=() before=()
    for ((round = 1; round <= rounds; round++)); do
        spool+=("$(run $spool_port "$p")")
        mosquitto+=("$(run $mosquitto_port "$p")")
        [ -z "$baseline" ] || before+=("$(run $baseline_port "$p")")
    done
    s=$(printf '%s\n' "${spool[@]}" | median)
    m=$(printf '%s\n' "${mosquitto[@]}" | median)
    echo "$p -> 1: spool ${spool[*]} (median $s); mosquitto ${mosquitto[*]} (median $m); ratio $(awk "BEGIN { printf \"%.2f\", $s / $m }")"
    if [ -n "$baseline" ]; then
        b=$(printf '%s\n' "${before[@]}" | median)
        echo "$p -> 1: baseline spool ${before[*]} (median $b); ratio to mosquitto $(awk "BEGIN { printf \"%.2f\", $b / $m }"); this build / baseline $(awk "BEGIN { printf \"%.2f\", $s / $b }")"
    fi
done
