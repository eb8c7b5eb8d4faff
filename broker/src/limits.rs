//! The broker's fixed bounds, in one place (configurable limits live in `config`).

/// Topic levels accepted in a name or filter.
pub const TOPIC_LEVELS_MAX: usize = 128;

/// Events queued from all connections to the hub.
pub const HUB_EVENTS_MAX: usize = 4096;

/// Records of the hub's own (a subscriber's PUBREC, a will) handed to the appender and not
/// yet logged, and as many again waiting in the hub; beyond that more are refused, logged.
pub const OWN_APPENDS_MAX: usize = 4096;

/// Metadata writes (sessions stored or forgotten) queued for the metadata writer, and the most
/// it commits in one transaction.
pub const METADATA_WRITES_MAX: usize = 4096;

/// Packets queued from the hub to one connection, beyond its in-flight window.
pub const CONNECTION_OUTBOUND_EXTRA: usize = 64;

/// Connections the kernel queues for a listener before spool accepts them (capped by the
/// system's `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// How long an accept loop waits after a failed accept (out of file descriptors, say).
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Seconds a new connection has to send CONNECT.
pub const CONNECT_TIMEOUT_SECS: u64 = 10;

/// How long a new MQTTS connection has to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a connection closed with a DISCONNECT keeps reading (and dropping) what the
/// client still sends, so that the client can read the DISCONNECT.
pub const CLOSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// QoS 1 publishes of one connection waiting for durability; beyond it the connection stops
/// reading its socket until the oldest is acknowledged.
pub const PUBLISHES_IN_FLIGHT_MAX: usize = 1024;

/// Packets a connection queues in one turn of its loop (deliveries, or acknowledgements whose
/// records are durable) before it writes them: one write, and over TLS one record, for the
/// burst. Bounded, so that one busy direction does not keep the other waiting.
pub const SEND_BURST_MAX: usize = 64;

/// Bytes of recently logged messages the hub keeps in memory for fast delivery; older ones are
/// read back from the write-ahead log.
pub const MESSAGE_CACHE_BYTES_MAX: usize = 64 << 20;

/// Messages the hub asks the loader for at once, for one queue (`hub::loads`).
pub const LOADS_PER_REQUEST: usize = 64;
/// Load requests under way at once; more queues needing messages wait for one to come back.
pub const LOAD_REQUESTS_MAX: usize = 16;

/// How often the hub lets the log reclaim space: publishers held back at the quota wait
/// about this long for the segments their consumers are done with.
pub const RECLAIM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// How often the deployment manifest is read to see whether it changed (and reloaded if so).
pub const MANIFEST_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Sealed log segments one reclaim looks at, at most: with `RECLAIM_LIVE_ENTRIES_MAX`, it
/// bounds the queue entries the hub gathers for it (on its own task) every `RECLAIM_INTERVAL`.
pub const RECLAIM_SEGMENTS_PER_RUN: usize = 4;

/// Queue entries the hub gathers at most for one reclaim; when the oldest segment alone is
/// needed by more, none of its records is moved (it is too dense to be worth it anyway).
pub const RECLAIM_LIVE_ENTRIES_MAX: usize = 1 << 16;

/// MQTT 5 user properties accepted on one PUBLISH (the log record counts them in a u16).
pub const USER_PROPERTIES_MAX: usize = 1024;

/// Subscriptions one session may hold; beyond it SUBSCRIBE is refused with "quota exceeded".
/// It also bounds the subscription identifiers one delivery can carry.
pub const SUBSCRIPTIONS_PER_SESSION_MAX: usize = 1024;

/// Topics with a retained message; a retained publish to a new topic beyond it is delivered
/// but not retained (logged and counted).
pub const RETAINED_MESSAGES_MAX: usize = 100_000;

/// Bytes of retained messages, all kept in memory; beyond it new retained messages are refused
/// like above.
pub const RETAINED_BYTES_MAX: usize = 256 << 20;

/// Targets one message can be routed to; the sessions beyond it (the newest) do not get the
/// message, counted and logged (`fanout_limit`).
pub const TARGETS_PER_MESSAGE_MAX: usize = 1 << 15;

/// Bytes the targets of one publish record may take, subscription identifiers included; like
/// `TARGETS_PER_MESSAGE_MAX`, the targets beyond it are a counted drop. The log's record limit
/// leaves room for it beside the largest packet (`record_payload_bytes_max`), so a wide fan-out
/// never turns into the refusal of a packet that was not too large.
pub const TARGETS_BYTES_MAX: usize = 1 << 20;

/// The largest publish record for a maximum packet size: the message (never larger than the
/// packet that carried it, plus the record's own fields) and its targets.
#[must_use]
pub fn record_payload_bytes_max(packet_size_max: u32) -> u32 {
    let targets_max = u32::try_from(TARGETS_BYTES_MAX).expect("1 MiB fits");
    packet_size_max
        .saturating_mul(2)
        .saturating_add(targets_max)
}

const _: () = assert!(PUBLISHES_IN_FLIGHT_MAX <= u16::MAX as usize);
const _: () = assert!(USER_PROPERTIES_MAX <= u16::MAX as usize);
const _: () = assert!(SUBSCRIPTIONS_PER_SESSION_MAX <= u16::MAX as usize);
// The target count limit is the one that binds when targets carry no subscription ids.
const _: () = assert!(
    TARGETS_PER_MESSAGE_MAX * crate::delivery::record::Target::ENCODED_BYTES_FIXED
        <= TARGETS_BYTES_MAX
);
