//! Adversarial tests of the `metrics` feature: a hostile `metrics::Recorder` whose counters,
//! gauges and wait histogram panic, re-enter the pool (allocate, give back, close, resize,
//! `record_metrics` again), block briefly or drop pools, installed with
//! `metrics::with_local_recorder`. After each: no deadlock (watchdogs), the budget exact,
//! no wait counted twice; and the values reported match `stats()` at quiescence, under the
//! `metric_names` constants and the `pool` label.

#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_full_budget_back, assert_idle, wait_waiting, watchdog};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate, metric_names,
};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

// ---- the hostile recorder ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

type Hook = Arc<dyn Fn(Kind, &str, &str) + Send + Sync>;
type MetricKey = (String, Vec<(String, String)>);

#[derive(Default)]
struct Shared {
    values: Mutex<HashMap<MetricKey, Value>>,
    hook: Mutex<Option<Hook>>,
}

impl Shared {
    /// Runs the hook (user code: it may panic, block or re-enter), then stores the value:
    /// a panicking hook records nothing.
    fn update(&self, kind: Kind, key: &MetricKey, f: impl FnOnce(&mut Value)) {
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            let pool = key
                .1
                .iter()
                .find(|(k, _)| k == metric_names::POOL_LABEL)
                .map_or("", |(_, v)| v.as_str());
            hook(kind, &key.0, pool);
        }
        let mut values = self.values.lock().unwrap();
        let value = values.entry(key.clone()).or_insert(match kind {
            Kind::Counter => Value::Counter(0),
            Kind::Gauge => Value::Gauge(0.0),
            Kind::Histogram => Value::Histogram(Vec::new()),
        });
        f(value);
    }
}

struct Handle {
    shared: Arc<Shared>,
    key: MetricKey,
}

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        self.shared.update(Kind::Counter, &self.key, |v| {
            if let Value::Counter(c) = v {
                *c += value;
            }
        });
    }
    fn absolute(&self, value: u64) {
        self.shared.update(Kind::Counter, &self.key, |v| {
            if let Value::Counter(c) = v {
                *c = (*c).max(value);
            }
        });
    }
}

impl GaugeFn for Handle {
    fn increment(&self, value: f64) {
        self.shared.update(Kind::Gauge, &self.key, |v| {
            if let Value::Gauge(g) = v {
                *g += value;
            }
        });
    }
    fn decrement(&self, value: f64) {
        self.shared.update(Kind::Gauge, &self.key, |v| {
            if let Value::Gauge(g) = v {
                *g -= value;
            }
        });
    }
    fn set(&self, value: f64) {
        self.shared.update(Kind::Gauge, &self.key, |v| {
            if let Value::Gauge(g) = v {
                *g = value;
            }
        });
    }
}

impl HistogramFn for Handle {
    fn record(&self, value: f64) {
        self.shared.update(Kind::Histogram, &self.key, |v| {
            if let Value::Histogram(h) = v {
                h.push(value);
            }
        });
    }
}

#[derive(Clone, Default)]
struct Hostile(Arc<Shared>);

impl Hostile {
    fn handle(&self, key: &Key) -> Arc<Handle> {
        let labels = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        Arc::new(Handle {
            shared: Arc::clone(&self.0),
            key: (key.name().to_owned(), labels),
        })
    }

    fn set_hook(&self, hook: impl Fn(Kind, &str, &str) + Send + Sync + 'static) {
        *self.0.hook.lock().unwrap() = Some(Arc::new(hook));
    }

    fn clear_hook(&self) {
        *self.0.hook.lock().unwrap() = None;
    }

    fn values(&self) -> HashMap<MetricKey, Value> {
        self.0.values.lock().unwrap().clone()
    }

    fn get(&self, name: &str, pool: &str) -> Option<Value> {
        self.values()
            .get(&(
                name.to_owned(),
                vec![(metric_names::POOL_LABEL.to_owned(), pool.to_owned())],
            ))
            .cloned()
    }

    fn waits(&self, pool: &str) -> usize {
        match self.get(metric_names::WAIT_SECONDS, pool) {
            Some(Value::Histogram(h)) => h.len(),
            None => 0,
            other => panic!("wait histogram: {other:?}"),
        }
    }
}

impl Recorder for Hostile {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle(key))
    }
}

fn quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .copied()
                .unwrap_or_default();
            if !msg.starts_with("hostile") {
                default(info);
            }
        }));
    });
}

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64 * buffers,
    }
}

fn named(recorder: &Hostile, name: &str, buffers: usize) -> Arc<BufPool> {
    metrics::with_local_recorder(recorder, || {
        Arc::new(BufPool::builder(cfg(buffers)).name(name).build().unwrap())
    })
}

/// Every gauge and total `record_metrics` reported for `pool` equals its `stats()`.
#[track_caller]
fn assert_reported_matches_stats(recorder: &Hostile, pool: &BufPool, label: &str) {
    let s = pool.stats();
    let gauge = |name: &str| match recorder.get(name, label) {
        Some(Value::Gauge(g)) => g,
        other => panic!("{name}{{pool={label}}}: {other:?}"),
    };
    let counter = |name: &str| match recorder.get(name, label) {
        Some(Value::Counter(c)) => c as usize,
        other => panic!("{name}{{pool={label}}}: {other:?}"),
    };
    assert_eq!(gauge(metric_names::IN_USE_BYTES), s.in_use_bytes as f64);
    assert_eq!(gauge(metric_names::MAX_MEMORY_BYTES), s.max_memory as f64);
    assert_eq!(gauge(metric_names::WAITING), s.waiting as f64);
    assert_eq!(gauge(metric_names::CACHED_BYTES), s.cached_bytes as f64);
    assert_eq!(
        gauge(metric_names::RECLAIM_SECONDS_TOTAL),
        s.reclaim_time.as_secs_f64()
    );
    assert_eq!(
        counter(metric_names::ALLOCATIONS_TOTAL),
        s.total_allocations
    );
    assert_eq!(counter(metric_names::WAITED_TOTAL), s.waited_allocations);
    assert_eq!(counter(metric_names::WOULD_BLOCK_TOTAL), s.would_block);
    assert_eq!(counter(metric_names::TIMED_OUT_TOTAL), s.timed_out);
    assert_eq!(counter(metric_names::QUEUE_FULL_TOTAL), s.queue_full);
    assert_eq!(
        counter(metric_names::RECLAIM_ROUNDS_TOTAL),
        s.reclaim_rounds
    );
    assert_eq!(
        counter(metric_names::RECLAIM_ASKED_BYTES_TOTAL),
        s.reclaim_asked_bytes
    );
    assert_eq!(
        counter(metric_names::RECLAIMED_BYTES_TOTAL),
        s.reclaimed_bytes
    );
}

// ---- values, names and labels ----

#[test]
fn reported_values_names_and_labels_match_stats_at_quiescence() {
    watchdog(20, || {
        let recorder = Hostile::default();
        let (root, unnamed, child) = metrics::with_local_recorder(&recorder, || {
            let root = Arc::new(
                BufPool::builder(cfg(4))
                    .name("root")
                    .max_waiters(1)
                    .recycle(2)
                    .recycle_min_bytes(0)
                    .build()
                    .unwrap(),
            );
            let unnamed = Arc::new(BufPool::new(cfg(2)));
            let child = Arc::new(
                BufPool::builder(cfg(4))
                    .name("child")
                    .parent(&root)
                    .build()
                    .unwrap(),
            );
            (root, unnamed, child)
        });
        // Waits at every level, refusals of every kind.
        let held = root.try_allocate(4).unwrap();
        assert_eq!(root.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(
            root.allocate_timeout(1, Duration::from_millis(1))
                .unwrap_err(),
            AllocError::TimedOut
        );
        let waiter = {
            let child = Arc::clone(&child);
            std::thread::spawn(move || child.allocate_blocking(2).map(|a| a.length()))
        };
        wait_waiting(&root, 1);
        assert_eq!(
            root.allocate_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        drop(held);
        assert_eq!(waiter.join().unwrap(), Ok(2));
        // A reservation that waits, and an unnamed pool's wait.
        let u_held = unnamed.try_allocate(2).unwrap();
        let r = {
            let unnamed = Arc::clone(&unnamed);
            std::thread::spawn(move || unnamed.reserve_blocking(64).map(|r| r.size()))
        };
        wait_waiting(&unnamed, 1);
        drop(u_held);
        assert_eq!(r.join().unwrap(), Ok(64));
        drop(root.try_allocate(3).unwrap()); // cached
        metrics::with_local_recorder(&recorder, || {
            root.record_metrics();
            unnamed.record_metrics();
            child.record_metrics();
        });
        assert_reported_matches_stats(&recorder, &root, "root");
        assert_reported_matches_stats(&recorder, &unnamed, metric_names::UNNAMED);
        assert_reported_matches_stats(&recorder, &child, "child");
        // Every wait recorded once, in the histogram of the pool it waited in.
        for (pool, label) in [
            (&root, "root"),
            (&unnamed, metric_names::UNNAMED),
            (&child, "child"),
        ] {
            assert_eq!(
                recorder.waits(label),
                pool.stats().waited_allocations,
                "{label}: histogram samples vs waited_allocations"
            );
        }
        // Names: exactly the constants; labels: exactly `pool`.
        let names = [
            metric_names::IN_USE_BYTES,
            metric_names::MAX_MEMORY_BYTES,
            metric_names::WAITING,
            metric_names::CACHED_BYTES,
            metric_names::ALLOCATIONS_TOTAL,
            metric_names::WAITED_TOTAL,
            metric_names::WOULD_BLOCK_TOTAL,
            metric_names::TIMED_OUT_TOTAL,
            metric_names::QUEUE_FULL_TOTAL,
            metric_names::RECLAIM_ROUNDS_TOTAL,
            metric_names::RECLAIM_ASKED_BYTES_TOTAL,
            metric_names::RECLAIMED_BYTES_TOTAL,
            metric_names::RECLAIM_SECONDS_TOTAL,
            metric_names::WAIT_SECONDS,
        ];
        for ((name, labels), _) in recorder.values() {
            assert!(names.contains(&name.as_str()), "unknown metric {name}");
            assert_eq!(labels.len(), 1, "{name}: {labels:?}");
            assert_eq!(labels[0].0, metric_names::POOL_LABEL);
            assert!(
                ["root", "child", metric_names::UNNAMED].contains(&labels[0].1.as_str()),
                "{labels:?}"
            );
        }
        // The recorder here stores a histogram at its first sample: pools that saw a wait.
        let waited = [&root, &unnamed, &child]
            .iter()
            .filter(|pool| pool.stats().waited_allocations > 0)
            .count();
        assert_eq!(
            recorder.values().len(),
            13 * 3 + waited,
            "13 gauges and totals per pool, plus the wait histograms"
        );
        drop(child);
        assert_full_budget_back(&root);
    });
}

// ---- a panicking wait histogram ----

/// One way to wait; returns the allocation's length or the panic.
#[derive(Clone, Copy, Debug)]
enum Form {
    Async,
    Blocking,
    Timeout,
    Polled,
    Owned,
    ZeroedBlocking,
    Reserve,
}

const FORMS: [Form; 7] = [
    Form::Async,
    Form::Blocking,
    Form::Timeout,
    Form::Polled,
    Form::Owned,
    Form::ZeroedBlocking,
    Form::Reserve,
];

/// Waits for `n` buffers of `pool` on its own thread (polling by hand for the futures),
/// announcing when it is queued; returns the allocation length or the panic message.
fn wait_in_thread(
    pool: &Arc<BufPool>,
    form: Form,
    n: usize,
) -> std::thread::JoinHandle<Result<Result<usize, AllocError>, String>> {
    let pool = Arc::clone(pool);
    std::thread::spawn(move || {
        catch_unwind(AssertUnwindSafe(|| match form {
            Form::Async => futures::executor::block_on(pool.allocate(n)).map(|a| a.length()),
            Form::Blocking => pool.allocate_blocking(n).map(|a| a.length()),
            Form::ZeroedBlocking => pool.allocate_zeroed_blocking(n).map(|a| a.length()),
            Form::Timeout => pool
                .allocate_timeout(n, Duration::from_secs(20))
                .map(|a| a.length()),
            Form::Polled => {
                let mut poller = PollAllocate::new(Arc::clone(&pool));
                futures::executor::block_on(std::future::poll_fn(|cx| poller.poll_allocate(cx, n)))
                    .map(|a| a.length())
            }
            Form::Reserve => pool.reserve_blocking(n * 64).map(|r| r.size() / 64),
            Form::Owned => {
                futures::executor::block_on(Arc::clone(&pool).allocate_owned(n)).map(|a| a.length())
            }
        }))
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .unwrap_or_default()
        })
    })
}

#[test]
fn a_panicking_wait_histogram_costs_only_its_waiter_in_every_form() {
    quiet();
    watchdog(30, || {
        for form in FORMS {
            let recorder = Hostile::default();
            let pool = named(&recorder, "p", 4);
            let held = pool.try_allocate(4).unwrap();
            let first = wait_in_thread(&pool, form, 2);
            wait_waiting(&pool, 1);
            let second = wait_in_thread(&pool, Form::Blocking, 3);
            wait_waiting(&pool, 2);
            let panics = Arc::new(AtomicUsize::new(0));
            {
                let panics = Arc::clone(&panics);
                recorder.set_hook(move |kind, _, _| {
                    if kind == Kind::Histogram && panics.fetch_add(1, SeqCst) == 0 {
                        panic!("hostile histogram");
                    }
                });
            }
            drop(held); // grants `first` 2; `second` (3) waits for them
            let first = first.join().unwrap();
            assert_eq!(
                first.as_ref().err().map(String::as_str),
                Some("hostile histogram"),
                "{form:?}: {first:?}"
            );
            // The panicking waiter's grant went back, so `second` is served.
            assert_eq!(second.join().unwrap(), Ok(Ok(3)), "{form:?}");
            assert_idle(&pool);
            let s = pool.stats();
            // Two grants made (one given back untaken), one taken and recorded.
            assert_eq!(s.waited_allocations, 2, "{form:?}: {s}");
            assert_eq!(recorder.waits("p"), 1, "{form:?}");
            assert_eq!(s.outstanding, 0);
            assert_full_budget_back(&pool);
        }
    });
}

#[test]
fn a_panicking_wait_histogram_of_a_child_request_waiting_at_the_root() {
    quiet();
    watchdog(20, || {
        let recorder = Hostile::default();
        let (root, child) = metrics::with_local_recorder(&recorder, || {
            let root = Arc::new(BufPool::builder(cfg(4)).name("root").build().unwrap());
            let child = Arc::new(
                BufPool::builder(cfg(4))
                    .name("child")
                    .parent(&root)
                    .build()
                    .unwrap(),
            );
            (root, child)
        });
        let held = root.try_allocate(4).unwrap();
        let waiter = wait_in_thread(&child, Form::Blocking, 2);
        wait_waiting(&root, 1);
        let behind = wait_in_thread(&root, Form::Blocking, 3);
        wait_waiting(&root, 2);
        let panicked = Arc::new(AtomicUsize::new(0));
        {
            let panicked = Arc::clone(&panicked);
            recorder.set_hook(move |kind, _, pool| {
                if kind == Kind::Histogram && pool == "root" && panicked.fetch_add(1, SeqCst) == 0 {
                    panic!("hostile histogram");
                }
            });
        }
        drop(held);
        assert!(waiter.join().unwrap().is_err());
        assert_eq!(behind.join().unwrap(), Ok(Ok(3)));
        assert_idle(&child);
        assert_idle(&root);
        assert_eq!(child.stats().in_use_bytes, 0);
        drop(child);
        assert_full_budget_back(&root);
    });
}

// ---- a wait histogram that re-enters the pool ----

#[derive(Clone, Copy, Debug)]
enum Reentry {
    AllocateAndDrop,
    DropAHeldAllocation,
    Close,
    RecordMetrics,
    Shrink,
    Grow,
    Sleep,
    AllocateBlocking,
}

#[test]
fn a_wait_histogram_that_reenters_the_pool_neither_deadlocks_nor_loses_bytes() {
    watchdog(60, || {
        for reentry in [
            Reentry::AllocateAndDrop,
            Reentry::DropAHeldAllocation,
            Reentry::Close,
            Reentry::RecordMetrics,
            Reentry::Shrink,
            Reentry::Grow,
            Reentry::Sleep,
            Reentry::AllocateBlocking,
        ] {
            for form in FORMS {
                let recorder = Hostile::default();
                let pool = named(&recorder, "p", 4);
                let held = pool.try_allocate(3).unwrap();
                let stash: Arc<Mutex<Option<BufPoolAllocation>>> =
                    Arc::new(Mutex::new(Some(pool.try_allocate(1).unwrap())));
                let first = wait_in_thread(&pool, form, 2);
                wait_waiting(&pool, 1);
                let second = wait_in_thread(&pool, Form::Blocking, 1);
                wait_waiting(&pool, 2);
                let once = Arc::new(AtomicUsize::new(0));
                {
                    let pool = Arc::downgrade(&pool);
                    let stash = Arc::clone(&stash);
                    let recorder2 = recorder.clone();
                    recorder.set_hook(move |kind, _, _| {
                        if kind != Kind::Histogram || once.fetch_add(1, SeqCst) != 0 {
                            return;
                        }
                        let Some(pool) = pool.upgrade() else { return };
                        match reentry {
                            Reentry::AllocateAndDrop => {
                                drop(pool.try_allocate(1));
                                drop(pool.try_allocate_zeroed(1));
                                let _ = pool.stats();
                            }
                            Reentry::DropAHeldAllocation => drop(stash.lock().unwrap().take()),
                            Reentry::Close => pool.close(),
                            Reentry::RecordMetrics => {
                                metrics::with_local_recorder(&recorder2, || pool.record_metrics())
                            }
                            Reentry::Shrink => pool.set_max_memory(64).unwrap(),
                            Reentry::Grow => pool.set_max_memory(64 * 8).unwrap(),
                            Reentry::Sleep => std::thread::sleep(Duration::from_millis(5)),
                            // Waits (a nested blocking wait on the waiter's own thread) until
                            // the other waiter gives its allocation back.
                            Reentry::AllocateBlocking => {
                                assert_eq!(pool.allocate_blocking(1).map(|a| a.length()), Ok(1));
                            }
                        }
                    });
                }
                // Frees 3: `first` (2) and `second` (1) are both granted.
                drop(held);
                let first = first.join().unwrap();
                assert_eq!(first, Ok(Ok(2)), "{reentry:?} {form:?}");
                let second = second.join().unwrap();
                // Granted before any close or shrink the hook makes: taken all the same.
                assert_eq!(second, Ok(Ok(1)), "{reentry:?} {form:?}");
                drop(stash.lock().unwrap().take());
                assert_idle(&pool);
                recorder.clear_hook();
                let s = pool.stats();
                // The nested blocking wait may wait too.
                let extra = usize::from(matches!(reentry, Reentry::AllocateBlocking));
                assert!(
                    (2..=2 + extra).contains(&s.waited_allocations),
                    "{reentry:?} {form:?}: {s}"
                );
                assert_eq!(
                    recorder.waits("p"),
                    s.waited_allocations,
                    "{reentry:?} {form:?}: a wait not recorded once"
                );
                if !matches!(reentry, Reentry::Close) {
                    pool.set_max_memory(256).unwrap();
                    assert_full_budget_back(&pool);
                } else {
                    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
                }
            }
        }
    });
}

/// The wait histogram of a child's request drops the root pool's last handle: the root's
/// drop (its barrier) then waits for the very grant the waiter is taking, on the waiter's
/// own thread.
#[test]
fn a_wait_histogram_that_drops_the_roots_last_handle() {
    watchdog(20, || {
        let recorder = Hostile::default();
        let (root, child) = metrics::with_local_recorder(&recorder, || {
            let root = BufPool::builder(cfg(4)).name("root").build().unwrap();
            let child = Arc::new(
                BufPool::builder(cfg(4))
                    .name("child")
                    .parent(&root)
                    .drop_warning_after(Duration::from_secs(60))
                    .build()
                    .unwrap(),
            );
            (root, child)
        });
        let held = child.try_allocate(4).unwrap();
        let slot = Arc::new(Mutex::new(Some(root)));
        let waiter = wait_in_thread(&child, Form::Blocking, 1);
        wait_waiting(&child, 1);
        {
            let slot = Arc::clone(&slot);
            recorder.set_hook(move |kind, _, pool| {
                if kind == Kind::Histogram && pool == "child" {
                    // Sent to another thread: its drop must not wait for this waiter.
                    let root = slot.lock().unwrap().take();
                    std::thread::spawn(move || drop(root));
                }
            });
        }
        drop(held);
        let got = waiter.join().unwrap();
        // Either taken, or failed as closed: never lost.
        assert!(
            matches!(got, Ok(Ok(1)) | Ok(Err(AllocError::Closed))),
            "{got:?}"
        );
        common::wait_until(10, "the root dropped", || slot.lock().unwrap().is_none());
        assert_eq!(child.stats().in_use_bytes, 0, "{}", child.stats());
    });
}

// ---- hostile gauges and counters in record_metrics ----

#[test]
fn panicking_gauges_and_counters_leave_the_pool_exact() {
    quiet();
    watchdog(20, || {
        let recorder = Hostile::default();
        let pool = named(&recorder, "p", 4);
        let held = pool.try_allocate(2).unwrap();
        let names = [
            metric_names::IN_USE_BYTES,
            metric_names::CACHED_BYTES,
            metric_names::ALLOCATIONS_TOTAL,
            metric_names::RECLAIMED_BYTES_TOTAL,
            metric_names::RECLAIM_SECONDS_TOTAL,
        ];
        for name in names {
            recorder.set_hook(move |_, metric, _| {
                if metric == name {
                    panic!("hostile metric");
                }
            });
            let result = catch_unwind(AssertUnwindSafe(|| {
                metrics::with_local_recorder(&recorder, || pool.record_metrics())
            }));
            assert!(result.is_err(), "{name}");
            assert_eq!(pool.stats().in_use_bytes, 128);
            // The pool still works, its lock free.
            drop(pool.try_allocate(2).unwrap());
        }
        recorder.clear_hook();
        metrics::with_local_recorder(&recorder, || pool.record_metrics());
        assert_reported_matches_stats(&recorder, &pool, "p");
        drop(held);
        assert_full_budget_back(&pool);
    });
}

#[test]
fn reentrant_gauges_and_counters_neither_deadlock_nor_lose_bytes() {
    watchdog(20, || {
        let recorder = Hostile::default();
        let pool = named(&recorder, "p", 4);
        let depth = Arc::new(AtomicUsize::new(0));
        let stash: Arc<Mutex<Vec<BufPoolAllocation>>> = Arc::new(Mutex::new(Vec::new()));
        {
            let pool = Arc::downgrade(&pool);
            let recorder2 = recorder.clone();
            let depth = Arc::clone(&depth);
            let stash = Arc::clone(&stash);
            recorder.set_hook(move |kind, name, _| {
                let Some(pool) = pool.upgrade() else { return };
                match (kind, name) {
                    (Kind::Gauge, n) if n == metric_names::IN_USE_BYTES => {
                        // record_metrics from inside record_metrics, twice deep.
                        let deep = depth.fetch_add(1, SeqCst) < 2;
                        if deep {
                            metrics::with_local_recorder(&recorder2, || pool.record_metrics());
                        }
                    }
                    (Kind::Gauge, n) if n == metric_names::WAITING => {
                        if let Ok(a) = pool.try_allocate(1) {
                            stash.lock().unwrap().push(a);
                        }
                    }
                    (Kind::Counter, n) if n == metric_names::ALLOCATIONS_TOTAL => {
                        stash.lock().unwrap().pop();
                        pool.set_max_memory(64 * 4).unwrap();
                    }
                    (Kind::Counter, n) if n == metric_names::QUEUE_FULL_TOTAL => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    _ => {}
                }
            });
        }
        // Concurrent record_metrics from several threads, each with the recorder.
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let pool = Arc::clone(&pool);
                let recorder = recorder.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        metrics::with_local_recorder(&recorder, || pool.record_metrics());
                        drop(pool.try_allocate(1));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        recorder.clear_hook();
        stash.lock().unwrap().clear();
        assert_idle(&pool);
        metrics::with_local_recorder(&recorder, || pool.record_metrics());
        assert_reported_matches_stats(&recorder, &pool, "p");
        // A close from a gauge.
        {
            let pool = Arc::downgrade(&pool);
            recorder.set_hook(move |_, _, _| {
                if let Some(pool) = pool.upgrade() {
                    pool.close();
                }
            });
        }
        metrics::with_local_recorder(&recorder, || pool.record_metrics());
        recorder.clear_hook();
        assert!(pool.stats().closed);
        assert_idle(&pool);
    });
}

// ---- no double counting under threads ----

#[test]
fn every_wait_is_recorded_once_under_threads_and_tasks() {
    watchdog(30, || {
        let recorder = Hostile::default();
        let pool = named(&recorder, "p", 4);
        let slow = Arc::new(AtomicUsize::new(0));
        {
            let slow = Arc::clone(&slow);
            recorder.set_hook(move |kind, _, _| {
                if kind == Kind::Histogram && slow.fetch_add(1, SeqCst) % 7 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        }
        let threads: Vec<_> = (0..4usize)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    for i in 0..150 {
                        let n = 1 + (t + i) % 3;
                        let a = if i % 2 == 0 {
                            pool.allocate_blocking(n).unwrap()
                        } else {
                            futures::executor::block_on(Arc::clone(&pool).allocate_owned(n))
                                .unwrap()
                        };
                        std::hint::black_box(&a);
                        drop(a);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_idle(&pool);
        let s = pool.stats();
        assert_eq!(s.total_allocations, 600);
        assert_eq!(
            recorder.waits("p"),
            s.waited_allocations,
            "histogram samples vs waited_allocations: {s}"
        );
        metrics::with_local_recorder(&recorder, || pool.record_metrics());
        assert_reported_matches_stats(&recorder, &pool, "p");
    });
}
