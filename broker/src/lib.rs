//! spool-broker: the hub behind the `spool` binary.
//!
//! # Layout
//! - [`mqtt`]: the protocol edge: listeners, the codec adapter, connection tasks (bytes and
//!   packets only).
//! - [`ingest`]: the protocol-neutral publish path: routing, log append, durability.
//! - [`hub`]: the single owner of sessions, subscriptions and delivery; synchronous handlers.
//! - [`session`]: one client's session state, without sockets.
//! - [`routing`]: topic validation and matching, the subscription table, edgeHub's routes and
//!   the endpoints they deliver to.
//! - [`deployment`]: a deployment manifest's routes put in force.
//! - [`delivery`]: the WAL record of a publish (naming queues), queues as endpoints, the
//!   message cache.
//! - [`auth`]: identities, SAS tokens, who a CONNECT is; `spool identity`.
//! - [`admin`]: the admin API (gRPC, `spool.admin.v1`).
//! - [`workload`]: IoT Edge's workload API, for modules started with `IOTEDGE_*` variables.
//! - [`iothub`]: IoT Hub topics and property bags; which topics an identity may use.
//! - [`tls`]: the MQTTS listener's certificate, given or generated.
//! - [`twin`]: device and module twins, kept durably; the twin topics.
//! - [`method`]: direct methods: calls relayed to modules and their answers back; the HTTPS
//!   endpoint modules call them through.
//! - [`http`]: what the HTTP servers (workload API, methods) share.
//! - [`clock`]: the hub's time, which tests move by hand.
//! - [`files`]: files written whole (certificates, exported identities).
//! - [`config`], [`server`] (wiring), [`message`], [`encoding`], [`limits`], [`id_hash`]
//!   (hashing for maps keyed by the hub's own numbers).

pub mod admin;
pub mod auth;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod deployment;
pub mod encoding;
pub mod files;
pub mod http;
pub mod hub;
pub mod id_hash;
pub mod ingest;
pub mod iothub;
pub mod limits;
pub mod message;
pub mod method;
pub mod mqtt;
pub mod routing;
pub mod server;
pub mod session;
pub mod tls;
pub mod twin;
pub mod workload;
