//! Delivery: what the hub writes to the log for each publish, and the queues over the log that
//! deliver it in order (`endpoint`: a queue as an endpoint; `queue`: its entries and window).

pub mod cache;
pub mod endpoint;
pub mod queue;
pub mod record;

/// Whether the `count`th message dropped undelivered (by a session: expired, beyond its queue
/// limit; by a connection: too large for its client) is logged: the first, then every
/// thousandth, each line with the running count, so a client that misses many does not flood
/// the log.
#[must_use]
pub fn drop_worth_logging(count: u64) -> bool {
    count == 1 || count.is_multiple_of(1000)
}
