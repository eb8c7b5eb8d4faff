//! Routing a publish against many subscriptions: the cost must follow the topic's levels and
//! the filters that match, not the number of filters held (issue 10: 10,000 filters).
//!
//! The filters look like an edge hub's: per-device, per-module exact topics
//! (`devices/{d}/modules/{m}/inputs/in1`), a `devices/{d}/#` for every tenth device, and a few
//! shared wildcards (`devices/+/modules/+/outputs/#`). Each routed topic matches three of them.
//! `subscribe` measures one subscription change while publishers hold a snapshot, which is
//! what the hub pays before each SUBACK (a copy of the nodes on the filter's path).
//!
//! Run: `cargo bench -p spool-bench --bench routing`
#![allow(clippy::unwrap_used)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use spool_broker::message::QoS;
use spool_broker::routing::{RetainHandling, SubscriptionOptions, SubscriptionTable};
use std::hint::black_box;

const FILTER_COUNTS: [u64; 3] = [100, 1_000, 10_000];
const MODULES_PER_DEVICE: u64 = 10;

fn options() -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        subscription_id: None,
        retain_handling: RetainHandling::AtSubscribe,
    }
}

/// A table of about `filters` subscriptions, one session each.
fn table(filters: u64) -> SubscriptionTable {
    let mut table = SubscriptionTable::default();
    let devices = filters / MODULES_PER_DEVICE;
    let mut session = 0;
    let mut subscribe = |table: &mut SubscriptionTable, filter: String| {
        session += 1;
        table.subscribe(session, &filter, options());
    };
    for device in 0..devices {
        for module in 0..MODULES_PER_DEVICE {
            subscribe(
                &mut table,
                format!("devices/d{device}/modules/m{module}/inputs/in1"),
            );
        }
        if device % 10 == 0 {
            subscribe(&mut table, format!("devices/d{device}/#"));
        }
    }
    subscribe(&mut table, "devices/+/modules/+/inputs/#".into());
    subscribe(&mut table, "devices/+/modules/+/outputs/#".into());
    table
}

fn route(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    for filters in FILTER_COUNTS {
        let table = table(filters);
        let topic = "devices/d0/modules/m3/inputs/in1";
        assert_eq!(table.route(topic, 0, QoS::AtLeastOnce).len(), 3);
        group.bench_with_input(BenchmarkId::from_parameter(filters), &table, |b, table| {
            b.iter(|| table.route(black_box(topic), 0, QoS::AtLeastOnce));
        });
    }
    group.finish();
}

fn subscribe(c: &mut Criterion) {
    let mut group = c.benchmark_group("subscribe_with_snapshot_held");
    for filters in FILTER_COUNTS {
        let mut table = table(filters);
        group.bench_function(BenchmarkId::from_parameter(filters), |b| {
            b.iter(|| {
                let snapshot = table.clone();
                table.subscribe(u64::MAX, "devices/d1/modules/m1/twin/#", options());
                table.unsubscribe(u64::MAX, "devices/d1/modules/m1/twin/#");
                snapshot
            });
        });
    }
    group.finish();
}

criterion_group!(benches, route, subscribe);
criterion_main!(benches);
