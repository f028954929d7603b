//! The `metrics` feature as a new user reads it: each wait, of every form (allocate, owned,
//! poll-style, blocking, reserve, grow, a child's request waiting above), is one sample of
//! `membudget_wait_seconds` in the pool whose queue it waited in; a grant given back untaken
//! is a wait in `PoolStats` but no sample; the totals pushed by `record_metrics` are the
//! stats'; the samples add up to the stats' wait time.

#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::watchdog;
use membudget::{BufPool, BufPoolCfg, BufferSize, PollAllocate, metric_names};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

const BS: usize = 64;

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

fn samples(values: &HashMap<(String, String), DebugValue>, pool: &str) -> Vec<f64> {
    match values.get(&(metric_names::WAIT_SECONDS.to_owned(), pool.to_owned())) {
        Some(DebugValue::Histogram(samples)) => samples.iter().map(|sample| sample.0).collect(),
        None => Vec::new(),
        other => panic!("{other:?}"),
    }
}

fn counter(values: &HashMap<(String, String), DebugValue>, name: &str, pool: &str) -> u64 {
    match values.get(&(name.to_owned(), pool.to_owned())) {
        Some(DebugValue::Counter(value)) => *value,
        other => panic!("counter {name}{{pool={pool}}}: {other:?}"),
    }
}

fn poll<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
#[cfg_attr(miri, ignore = "wall-clock wait figures")]
fn every_wait_form_is_one_sample_where_it_waited_and_samples_add_up_to_the_stats() {
    watchdog(30, || {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (root, child) = metrics::with_local_recorder(&recorder, || {
            let root = Arc::new(
                BufPool::builder(BufPoolCfg {
                    buffer_size: BufferSize::S64,
                    max_memory: 8 * BS,
                })
                .name("root")
                .build()
                .unwrap(),
            );
            let child = root
                .child(
                    "child",
                    BufPoolCfg {
                        buffer_size: BufferSize::S64,
                        max_memory: 8 * BS,
                    },
                )
                .unwrap();
            (root, child)
        });
        let held = root.try_allocate(8).unwrap();
        let mut reservation = root.try_reserve(0).unwrap();
        let mut a = Box::pin(root.allocate(1));
        assert!(poll(a.as_mut()).is_pending());
        let mut o = Box::pin(Arc::clone(&root).allocate_owned(1));
        assert!(poll(o.as_mut()).is_pending());
        let mut p = PollAllocate::new(Arc::clone(&root));
        assert!(
            p.poll_allocate(&mut Context::from_waker(Waker::noop()), 1)
                .is_pending()
        );
        let mut r = Box::pin(root.reserve(BS));
        assert!(poll(r.as_mut()).is_pending());
        let mut c = Box::pin(child.allocate(1)); // waits at the root's level
        assert!(poll(c.as_mut()).is_pending());
        let mut untaken = Box::pin(root.allocate(1)); // granted, then dropped untaken
        assert!(poll(untaken.as_mut()).is_pending());
        let blocking = {
            let root = Arc::clone(&root);
            std::thread::spawn(move || root.allocate_blocking(1).map(|a| a.length()))
        };
        common::wait_waiting(&root, 7);
        let results = {
            let mut grow = Box::pin(reservation.grow(BS));
            assert!(poll(grow.as_mut()).is_pending());
            assert_eq!(root.stats().waiting, 8);
            std::thread::sleep(Duration::from_millis(20));
            drop(held); // 8 free: every one of the 8 is granted
            assert_eq!(blocking.join().unwrap(), Ok(1));
            drop(untaken);
            let x = poll(a.as_mut());
            let y = poll(o.as_mut());
            let z = p.poll_allocate(&mut Context::from_waker(Waker::noop()), 1);
            let v = poll(r.as_mut());
            let w = poll(c.as_mut());
            let g = poll(grow.as_mut());
            assert!(matches!(g, Poll::Ready(Ok(()))), "{g:?}");
            (x, y, z, v, w)
        };
        assert!(matches!(results.0, Poll::Ready(Ok(_))));
        assert!(matches!(results.1, Poll::Ready(Ok(_))));
        assert!(matches!(results.2, Poll::Ready(Ok(_))));
        assert!(matches!(results.3, Poll::Ready(Ok(_))));
        assert!(matches!(results.4, Poll::Ready(Ok(_))));
        drop(results);
        drop(reservation);
        let s = root.stats();
        assert!(s.is_drained(), "{s}");
        // allocate, owned, poll, reserve, child, untaken, blocking, grow.
        assert_eq!(s.waited_allocations, 8, "{s}");
        assert_eq!(
            child.stats().waited_allocations,
            0,
            "it waited at the root only"
        );
        let values = snapshot(&snapshotter);
        let root_samples = samples(&values, "root");
        assert_eq!(
            root_samples.len(),
            7,
            "every wait but the untaken grant: {root_samples:?} {s}"
        );
        assert!(samples(&values, "child").is_empty());
        assert!(root_samples.iter().all(|&w| w >= 0.015), "{root_samples:?}");
        let max = root_samples.iter().copied().fold(0.0, f64::max);
        assert!(
            max <= s.max_wait.as_secs_f64() * 1.1 + 0.002,
            "a sample above the stats' max: {max} vs {:?}",
            s.max_wait
        );
        let sum: f64 = root_samples.iter().sum();
        assert!(
            sum <= s.total_wait.as_secs_f64() * 1.1 + 0.002,
            "samples {sum} above the total {:?} (which counts the untaken one too)",
            s.total_wait
        );
        metrics::with_local_recorder(&recorder, || root.record_metrics());
        let values = snapshot(&snapshotter);
        assert_eq!(
            counter(&values, metric_names::WAITED_TOTAL, "root"),
            s.waited_allocations as u64
        );
        assert_eq!(
            counter(&values, metric_names::ALLOCATIONS_TOTAL, "root"),
            s.total_allocations as u64
        );
    });
}
