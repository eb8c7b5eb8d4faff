//! spool-bench: benchmarks live in `benches/`; the load generator comes with the MQTT server.
