//! Routing: which queues a publish goes to. MQTT subscriptions send it to sessions
//! (`subscriptions`, over a topic `trie`); a deployment's routes send a device's or module's
//! telemetry to endpoints (`routes`, `endpoints`).

pub mod endpoints;
pub mod routes;
pub mod subscriptions;
pub mod topic;
pub mod trie;

pub use subscriptions::{RetainHandling, Router, SubscriptionOptions, SubscriptionTable, Target};
