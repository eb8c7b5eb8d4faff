#!/usr/bin/env bash
# The IoT Edge path beside plain MQTT, on one spool in one run: alternating rounds of
# spool-load's plain 1 -> 1 (anonymous, plain TCP, one topic), the same over TLS (what TLS
# alone costs), and its IoT Edge 1 -> 1 (modules over TLS with SAS tokens, telemetry routed by
# a route with a WHERE to the sink module's input), then the median of each and their ratios.
# The TLS listener lets anonymous clients in for the middle series; the modules still prove
# their identities.
#
#   scripts/iotedge-bench.sh [ROUNDS] [PUBLISHERS]      defaults: 5 rounds, 1 publisher
#
# spool runs with its defaults (every QoS 1 message fsynced before its PUBACK), its data on the
# disk under target/. SPOOL_LOAD_COUNT sets the messages per round (default 50,000).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-5}
publishers=${2:-1}
count=${SPOOL_LOAD_COUNT:-50000}
plain_port=18840
tls_port=18841

cargo build --release --locked -p spool-broker -p spool-bench

work=$(mktemp -d "$PWD/target/iotedge-bench.XXXXXX")
pid=
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

key=$(head -c 32 /dev/urandom | base64)
{
    for module in sink $(seq -f 'pub%g' 0 $((publishers - 1))); do
        printf '[[identities]]\nid = "edge/%s"\nauth = { type = "sas", primary = "%s", secondary = "%s" }\n' \
            "$module" "$key" "$key"
    done
} > "$work/identities.toml"
cat > "$work/deployment.json" <<'JSON'
{ "schemaVersion": "1.1",
  "routes": { "load": "FROM /messages/modules/* WHERE k = 'v' INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")" },
  "storeAndForwardConfiguration": { "timeToLiveSecs": 7200 } }
JSON
SPOOL_ADMIN_BIND= target/release/spool serve --data-dir "$work/spool-data" --mqtt-bind "127.0.0.1:$plain_port" \
    --mqtts-bind "127.0.0.1:$tls_port" --mqtts-auth anonymous --identities "$work/identities.toml" \
    --deployment "$work/deployment.json" > "$work/spool.log" 2>&1 &
pid=$!
for _ in $(seq 50); do [ -f "$work/spool-data/tls/ca.pem" ] && break; sleep 0.1; done
sleep 0.5

run() { # spool-load arguments -> msg/s
    target/release/spool-load "$@" --count "$count" --inflight 64 --publishers "$publishers" |
        sed -E 's/.*: ([0-9]+) msg\/s.*/\1/'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "QoS 1, 256 B, $count messages a round, $publishers -> 1, 64 in flight per publisher, $rounds rounds (msg/s)"
plain=() tls=() iotedge=()
for ((round = 1; round <= rounds; round++)); do
    plain+=("$(run --port "$plain_port")")
    tls+=("$(run --port "$tls_port" --ca "$work/spool-data/tls/ca.pem")")
    iotedge+=("$(run iotedge --port "$tls_port" --ca "$work/spool-data/tls/ca.pem" --key "$key")")
done
p=$(printf '%s\n' "${plain[@]}" | median)
t=$(printf '%s\n' "${tls[@]}" | median)
i=$(printf '%s\n' "${iotedge[@]}" | median)
ratio() { awk "BEGIN { printf \"%.2f\", $1 / $2 }"; }
echo "plain MQTT: ${plain[*]} (median $p)"
echo "plain MQTT over TLS (anonymous): ${tls[*]} (median $t)"
echo "IoT Edge (TLS, SAS, route with WHERE): ${iotedge[*]} (median $i)"
echo "IoT Edge / plain: $(ratio "$i" "$p") (TLS alone: $(ratio "$t" "$p"); IoT Edge / plain over TLS: $(ratio "$i" "$t"))"
