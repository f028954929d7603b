//! The `metrics` feature: every gauge and total through `metrics-util`'s debugging recorder,
//! with the values asserted, the `pool` label, and the wait histogram recorded by waiters.

#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize, metric_names};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Every metric in the snapshot, by (name, `pool` label).
fn snapshot(snapshotter: &Snapshotter) -> HashMap<(String, String), DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _unit, _description, value)| {
            let key = key.key();
            let pool = key
                .labels()
                .find(|label| label.key() == metric_names::POOL_LABEL)
                .map(|label| label.value().to_owned())
                .expect("every metric has the pool label");
            ((key.name().to_owned(), pool), value)
        })
        .collect()
}

fn gauge(values: &HashMap<(String, String), DebugValue>, name: &str, pool: &str) -> f64 {
    match values.get(&(name.to_owned(), pool.to_owned())) {
        Some(DebugValue::Gauge(value)) => value.0,
        other => panic!("gauge {name}{{pool={pool}}}: {other:?}"),
    }
}

fn counter(values: &HashMap<(String, String), DebugValue>, name: &str, pool: &str) -> u64 {
    match values.get(&(name.to_owned(), pool.to_owned())) {
        Some(DebugValue::Counter(value)) => *value,
        other => panic!("counter {name}{{pool={pool}}}: {other:?}"),
    }
}

fn histogram(values: &HashMap<(String, String), DebugValue>, name: &str, pool: &str) -> Vec<f64> {
    match values.get(&(name.to_owned(), pool.to_owned())) {
        Some(DebugValue::Histogram(samples)) => samples.iter().map(|sample| sample.0).collect(),
        None => Vec::new(),
        other => panic!("histogram {name}{{pool={pool}}}: {other:?}"),
    }
}

#[test]
fn record_metrics_reports_every_gauge_and_total_with_the_pool_label() {
    watchdog(30, || {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let pool = BufPool::builder(BufPoolCfg {
                buffer_size: BufferSize::S64,
                max_memory: 64 * 4,
            })
            .name("ingest")
            .recycle(4)
            .recycle_min_bytes(64)
            .build()
            .unwrap();
            let a = pool.try_allocate(3).unwrap();
            assert_eq!(pool.try_allocate(2).unwrap_err(), AllocError::WouldBlock);
            assert_eq!(
                pool.allocate_timeout(2, Duration::from_millis(1))
                    .unwrap_err(),
                AllocError::TimedOut
            );
            let mut waiter = Box::pin(pool.allocate(4));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(waiter.as_mut().poll(&mut cx).is_pending());

            pool.record_metrics();
            let values = snapshot(&snapshotter);
            assert_eq!(gauge(&values, metric_names::IN_USE_BYTES, "ingest"), 192.0);
            assert_eq!(
                gauge(&values, metric_names::MAX_MEMORY_BYTES, "ingest"),
                256.0
            );
            assert_eq!(gauge(&values, metric_names::WAITING, "ingest"), 1.0);
            assert_eq!(gauge(&values, metric_names::CACHED_BYTES, "ingest"), 0.0);
            assert_eq!(
                counter(&values, metric_names::ALLOCATIONS_TOTAL, "ingest"),
                1
            );
            assert_eq!(counter(&values, metric_names::WAITED_TOTAL, "ingest"), 0);
            assert_eq!(
                counter(&values, metric_names::WOULD_BLOCK_TOTAL, "ingest"),
                1
            );
            assert_eq!(counter(&values, metric_names::TIMED_OUT_TOTAL, "ingest"), 1);

            drop(a); // grants the waiter its 4 buffers
            let Poll::Ready(Ok(b)) = waiter.as_mut().poll(&mut cx) else {
                panic!("the waiter was not served");
            };
            drop(b); // cached: the pool recycles
            pool.record_metrics();
            let values = snapshot(&snapshotter);
            assert_eq!(gauge(&values, metric_names::IN_USE_BYTES, "ingest"), 0.0);
            assert_eq!(gauge(&values, metric_names::WAITING, "ingest"), 0.0);
            assert_eq!(gauge(&values, metric_names::CACHED_BYTES, "ingest"), 256.0);
            assert_eq!(
                counter(&values, metric_names::ALLOCATIONS_TOTAL, "ingest"),
                2
            );
            assert_eq!(counter(&values, metric_names::WAITED_TOTAL, "ingest"), 1);
            // The one wait, recorded by the waiter as it took its allocation.
            let waits = histogram(&values, metric_names::WAIT_SECONDS, "ingest");
            assert_eq!(waits.len(), 1, "{waits:?}");
            assert!(waits[0] >= 0.0 && waits[0] < 60.0, "{waits:?}");
        });
    });
}

#[test]
fn unnamed_pools_report_as_unnamed_and_pools_are_told_apart() {
    watchdog(30, || {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let cfg = BufPoolCfg {
                buffer_size: BufferSize::S128,
                max_memory: 128 * 8,
            };
            let unnamed = BufPool::new(cfg);
            let named = BufPool::builder(cfg)
                .name(String::from("tenant-a"))
                .build()
                .unwrap();
            let _a = unnamed.try_allocate(1).unwrap();
            let _b = named.try_allocate(2).unwrap();
            unnamed.record_metrics();
            named.record_metrics();
            let values = snapshot(&snapshotter);
            assert_eq!(
                gauge(&values, metric_names::IN_USE_BYTES, metric_names::UNNAMED),
                128.0
            );
            assert_eq!(
                gauge(&values, metric_names::IN_USE_BYTES, "tenant-a"),
                256.0
            );
        });
    });
}

#[test]
fn waits_are_recorded_by_threads_and_tasks_alike_and_untimed_pools_record_none() {
    watchdog(60, || {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (timed, untimed) = metrics::with_local_recorder(&recorder, || {
            let cfg = BufPoolCfg {
                buffer_size: BufferSize::S64,
                max_memory: 64,
            };
            (
                Arc::new(BufPool::builder(cfg).name("timed").build().unwrap()),
                Arc::new(
                    BufPool::builder(cfg)
                        .name("untimed")
                        .time_waits(false)
                        .build()
                        .unwrap(),
                ),
            )
        });
        // Handles are bound when the pool is built: these waits are recorded on other
        // threads, outside the local recorder's scope.
        for pool in [&timed, &untimed] {
            let held = pool.try_allocate(1).unwrap();
            let waiter = {
                let pool = Arc::clone(pool);
                std::thread::spawn(move || drop(pool.allocate_blocking(1).unwrap()))
            };
            common::wait_until(30, "the thread waits", || pool.stats().waiting == 1);
            std::thread::sleep(Duration::from_millis(5));
            drop(held);
            waiter.join().unwrap();
        }
        let values = snapshot(&snapshotter);
        let waits = histogram(&values, metric_names::WAIT_SECONDS, "timed");
        assert_eq!(waits.len(), 1, "{waits:?}");
        assert!(waits[0] >= 0.004, "waited at least the sleep: {waits:?}");
        assert!(histogram(&values, metric_names::WAIT_SECONDS, "untimed").is_empty());
    });
}

#[test]
fn record_metrics_reports_reclaim() {
    use std::future::Future as _;
    use std::sync::{Arc, Mutex};

    struct Cache(Mutex<Vec<membudget::BufPoolAllocation>>);
    impl membudget::Reclaimer for Cache {
        fn estimate(&self) -> usize {
            self.0.lock().unwrap().len() * 64
        }
        fn reclaim(
            &self,
            target: usize,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>> {
            let mut entries = self.0.lock().unwrap();
            let mut freed = 0;
            while freed < target && entries.pop().is_some() {
                freed += 64;
            }
            Box::pin(async move { freed })
        }
    }

    watchdog(30, || {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let pool = BufPool::builder(BufPoolCfg {
                buffer_size: BufferSize::S64,
                max_memory: 64 * 4,
            })
            .name("cached")
            .build()
            .unwrap();
            let entries = (0..4).map(|_| pool.try_allocate(1).unwrap()).collect();
            let _handle = pool.register_reclaimer("cache", 0, Arc::new(Cache(Mutex::new(entries))));
            let mut waiter = Box::pin(pool.allocate(2));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(waiter.as_mut().poll(&mut cx).is_ready());
            pool.record_metrics();
            let values = snapshot(&snapshotter);
            assert_eq!(
                counter(&values, metric_names::RECLAIM_ROUNDS_TOTAL, "cached"),
                1
            );
            assert_eq!(
                counter(&values, metric_names::RECLAIM_ASKED_BYTES_TOTAL, "cached"),
                128
            );
            assert_eq!(
                counter(&values, metric_names::RECLAIMED_BYTES_TOTAL, "cached"),
                128
            );
            assert!(gauge(&values, metric_names::RECLAIM_SECONDS_TOTAL, "cached") >= 0.0);
        });
    });
}
