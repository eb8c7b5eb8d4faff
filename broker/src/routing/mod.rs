//! Routing: which sessions a published topic goes to. For now MQTT subscriptions only; the
//! edgeHub route language joins it with the IoT Edge layer.

pub mod routes;
pub mod subscriptions;
pub mod topic;
pub mod trie;

pub use subscriptions::{RetainHandling, Router, SubscriptionOptions, SubscriptionTable, Target};
