//! Delivery: what the hub writes to the log for each publish, and the per-session queues over
//! the log that deliver it in order.

pub mod cache;
pub mod queue;
pub mod record;
