//! Who may connect, and do what: the identity registry (devices and modules, their keys or certificates,
//! enabled or not), SAS tokens, and the `spool identity` commands that manage the registry.
//!
//! - `identity`: [`identity::Identity`] and its id, credentials and connection string; the
//!   identities file spool is seeded from.
//! - `registry`: [`registry::IdentityRegistry`], the identities in the metadata store.
//! - `sas`: parsing, signing and verifying SAS tokens (edgehub-contract.md §2.1).
//! - `username`: the IoT Hub MQTT username grammar (§1.2).
//! - `x509`: leaf devices' certificates, by thumbprint or by chain (§2.3).
//! - `authenticator`: [`authenticator::Authenticator`], who a CONNECT is.
//! - `policy`: [`policy::Policy`], a deployment's authorization policy: who may connect, and
//!   publish and subscribe on topics other than IoT Hub's.
//! - `cli`: `spool identity …`, on a data directory or through a running server's admin API.

pub mod authenticator;
pub mod cli;
pub mod identity;
pub mod policy;
pub mod registry;
pub mod sas;
pub mod username;
pub mod x509;
