//! A hasher for the hub's maps keyed by numbers the hub hands out itself (session ids, queue
//! ids, log sequence numbers). SipHash, the standard one, resists keys chosen to collide, which
//! these are not; its cost showed on every message, which takes several such lookups on its way
//! to a subscriber. Maps keyed by what clients choose (client ids, topics) keep SipHash.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-and-rotate hashing (as rustc's FxHash): the product spreads a number's bits to the
/// high ones, which the hash table's tags read, and keeps sequential numbers apart in the low
/// ones, which pick its buckets.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.add(u64::from(byte));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// A map keyed by the hub's own numbers.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// A set of the hub's own numbers.
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(value: &T) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(value)
    }

    /// Goal: sequential ids (how sessions and log records are numbered) spread over the table's
    /// buckets and tags, so that lookups stay one probe.
    #[test]
    fn sequential_ids_spread_over_low_and_high_bits() {
        let ids = (1u64 << 32..(1u64 << 32) + 4096).map(|id| hash(&id));
        let (mut low, mut high) = (IdSet::default(), IdSet::default());
        for h in ids {
            low.insert(h & 0xfff);
            high.insert(h >> 57);
        }
        assert!(low.len() > 2500, "buckets used: {}", low.len());
        assert_eq!(high.len(), 128, "every tag is used");
    }
}
