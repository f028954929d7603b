//! Cooperative reclaim (issue 21): who is asked, in what order, for how much; one round in
//! flight; cancels, panics, reclaimers that lie or allocate; blocking drivers; registrations
//! and pools dropped during a round; `reclaim_ahead`. Every quiescent point checks the books.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer};

const B: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * B,
    }
}

/// Runs `f` on a thread and fails if it does not return within 20 s.
fn watchdog(f: impl FnOnce() + Send + 'static) {
    let (done, wait) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    match wait.recv_timeout(Duration::from_secs(if cfg!(miri) { 600 } else { 20 })) {
        Ok(()) => worker.join().unwrap(),
        Err(_) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("watchdog: the test did not finish in time"),
        },
    }
}

fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

/// How a test reclaimer behaves when asked.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Frees whole entries until `target` is covered, at once.
    Honest,
    /// Frees nothing, says so.
    Nothing,
    /// Frees nothing, says it freed what it was asked for.
    Liar,
    /// Frees everything it holds.
    Everything,
    /// Its future is pending until `Gate::open`.
    Gated,
    PanicInEstimate,
    PanicInReclaim,
    PanicInPoll,
    /// Tries to allocate from its pool while asked, then frees honestly.
    Allocates,
}

/// Shared log of who was asked for what, in order.
type Log = Arc<Mutex<Vec<(String, usize)>>>;

struct Cache {
    name: String,
    entries: Mutex<Vec<BufPoolAllocation>>,
    behaviour: Behaviour,
    log: Log,
    gate: Arc<AtomicBool>,
    futures_dropped: Arc<AtomicUsize>,
    pool_for_allocating: Mutex<Option<Arc<BufPool>>>,
}

impl Cache {
    fn new(
        name: &str,
        entries: Vec<BufPoolAllocation>,
        behaviour: Behaviour,
        log: &Log,
    ) -> Arc<Self> {
        Arc::new(Cache {
            name: name.to_owned(),
            entries: Mutex::new(entries),
            behaviour,
            log: Arc::clone(log),
            gate: Arc::new(AtomicBool::new(false)),
            futures_dropped: Arc::new(AtomicUsize::new(0)),
            pool_for_allocating: Mutex::new(None),
        })
    }

    fn held(&self) -> usize {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(BufPoolAllocation::allocated_bytes)
            .sum()
    }

    fn free_up_to(&self, target: usize) -> usize {
        let mut entries = self.entries.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            let Some(entry) = entries.pop() else { break };
            freed += entry.allocated_bytes();
        }
        freed
    }
}

/// Counts its drops (a reclaimer's future dropped before it completed, or after).
struct Tracked<F> {
    inner: F,
    dropped: Arc<AtomicUsize>,
}

impl<F: Future + Unpin> Future for Tracked<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

impl<F> Drop for Tracked<F> {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, SeqCst);
    }
}

impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        if self.behaviour == Behaviour::PanicInEstimate {
            panic!("estimate panics");
        }
        self.held()
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        self.log.lock().unwrap().push((self.name.clone(), target));
        let dropped = Arc::clone(&self.futures_dropped);
        let boxed = |inner: Pin<Box<dyn Future<Output = usize> + Send>>| -> Pin<Box<dyn Future<Output = usize> + Send>> {
            Box::pin(Tracked { inner, dropped })
        };
        match self.behaviour {
            Behaviour::Honest | Behaviour::PanicInEstimate => {
                let freed = self.free_up_to(target);
                boxed(Box::pin(async move { freed }))
            }
            Behaviour::Nothing => boxed(Box::pin(async { 0 })),
            Behaviour::Liar => boxed(Box::pin(async move { target })),
            Behaviour::Everything => {
                let freed = self.free_up_to(usize::MAX);
                boxed(Box::pin(async move { freed }))
            }
            Behaviour::Allocates => {
                let pool = self.pool_for_allocating.lock().unwrap().clone();
                if let Some(pool) = pool {
                    // The pool is short: this fails at once, and must not deadlock.
                    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
                    let stats = pool.stats();
                    assert!(stats.waiting >= 1);
                }
                let freed = self.free_up_to(target);
                boxed(Box::pin(async move { freed }))
            }
            Behaviour::Gated => {
                let gate = Arc::clone(&self.gate);
                let freed_later = target;
                let entries: Vec<BufPoolAllocation> = {
                    let mut entries = self.entries.lock().unwrap();
                    let mut taken = Vec::new();
                    let mut bytes = 0;
                    while bytes < freed_later {
                        let Some(entry) = entries.pop() else { break };
                        bytes += entry.allocated_bytes();
                        taken.push(entry);
                    }
                    taken
                };
                let mut entries = Some(entries);
                boxed(Box::pin(std::future::poll_fn(move |cx| {
                    if gate.load(SeqCst) {
                        let freed = entries
                            .take()
                            .unwrap_or_default()
                            .iter()
                            .map(BufPoolAllocation::allocated_bytes)
                            .sum();
                        Poll::Ready(freed)
                    } else {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                })))
            }
            Behaviour::PanicInReclaim => panic!("reclaim panics"),
            Behaviour::PanicInPoll => boxed(Box::pin(std::future::poll_fn(|_| -> Poll<usize> {
                panic!("the reclaim future panics")
            }))),
        }
    }
}

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn asked(log: &Log) -> Vec<(String, usize)> {
    log.lock().unwrap().clone()
}

fn entries(pool: &BufPool, buffers: usize) -> Vec<BufPoolAllocation> {
    (0..buffers)
        .map(|_| pool.try_allocate(1).unwrap())
        .collect()
}

#[test]
fn order_is_priority_then_largest_estimate() {
    let pool = BufPool::new(cfg(8));
    let log = log();
    let small_urgent = Cache::new("small-0", entries(&pool, 1), Behaviour::Honest, &log);
    let big_late = Cache::new("big-5", entries(&pool, 4), Behaviour::Honest, &log);
    let big_urgent = Cache::new("big-0", entries(&pool, 3), Behaviour::Honest, &log);
    let _h1 = pool.register_reclaimer("small-0", 0, small_urgent.clone());
    let _h2 = pool.register_reclaimer("big-5", 5, big_late.clone());
    let _h3 = pool.register_reclaimer("big-0", 0, big_urgent.clone());
    // The report lists them in the order a round asks them.
    let names: Vec<_> = pool
        .report()
        .reclaimers
        .iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(names, ["big-0", "small-0", "big-5"]);
    // 5 buffers wanted, none free: big-0 frees its 3, small-0 its 1, big-5 one more.
    let got = futures::executor::block_on(pool.allocate(5)).unwrap();
    assert_eq!(
        asked(&log),
        [
            ("big-0".to_owned(), 5 * B),
            ("small-0".to_owned(), 2 * B),
            ("big-5".to_owned(), B)
        ]
    );
    let stats = pool.stats();
    assert_eq!(stats.reclaim_rounds, 1);
    assert_eq!(stats.reclaimed_bytes, 5 * B);
    assert_eq!(stats.reclaim_asked_bytes, 8 * B);
    assert_eq!(stats.in_use_bytes, 8 * B);
    drop(got);
    assert_eq!(pool.stats().in_use_bytes, 3 * B);
}

#[test]
fn shortfall_is_what_the_head_needs_beyond_the_free_room() {
    let pool = BufPool::new(cfg(8));
    let log = log();
    let cache = Cache::new("cache", entries(&pool, 6), Behaviour::Honest, &log);
    let _handle = pool.register_reclaimer("cache", 0, cache.clone());
    // 2 free, 4 wanted: short by 2 buffers, and asked for exactly that.
    let got = futures::executor::block_on(pool.allocate(4)).unwrap();
    assert_eq!(asked(&log), [("cache".to_owned(), 2 * B)]);
    assert_eq!(cache.held(), 4 * B);
    assert_eq!(pool.stats().in_use_bytes, 8 * B);
    drop(got);
}

#[test]
fn a_sibling_is_asked_through_the_shared_ancestor_never_an_unrelated_tree() {
    let root = BufPool::new(cfg(8));
    let a = root.child("a", cfg(8)).unwrap();
    let b = root.child("b", cfg(8)).unwrap();
    let other = BufPool::new(cfg(8));
    let log = log();
    let sibling_cache = Cache::new("a-cache", entries(&a, 8), Behaviour::Honest, &log);
    let unrelated = Cache::new("other", entries(&other, 8), Behaviour::Honest, &log);
    let _h1 = a.register_reclaimer("a-cache", 0, sibling_cache.clone());
    let _h2 = other.register_reclaimer("other", 0, unrelated.clone());
    // b is short at the root: the root's scope includes a's cache.
    let got = futures::executor::block_on(b.allocate(3)).unwrap();
    assert_eq!(asked(&log), [("a-cache".to_owned(), 3 * B)]);
    assert_eq!(unrelated.held(), 8 * B);
    assert_eq!(root.stats().reclaim_rounds, 1);
    assert_eq!(b.stats().reclaim_rounds, 0);
    assert_eq!(root.stats().in_use_bytes, 8 * B);
    drop(got);
    assert_eq!(root.stats().in_use_bytes, 5 * B);
}

#[test]
fn one_round_in_flight_whatever_the_number_of_waiters() {
    let pool = BufPool::new(cfg(8));
    let log = log();
    let cache = Cache::new("gated", entries(&pool, 8), Behaviour::Gated, &log);
    let _handle = pool.register_reclaimer("gated", 0, cache.clone());
    let mut waiters: Vec<_> = (0..5).map(|_| Box::pin(pool.allocate(1))).collect();
    for waiter in &mut waiters {
        assert!(poll_once(waiter.as_mut()).is_pending());
    }
    // Polled again and again: still the one round.
    for waiter in &mut waiters {
        assert!(poll_once(waiter.as_mut()).is_pending());
    }
    assert_eq!(asked(&log).len(), 1, "one reclaimer call for five waiters");
    cache.gate.store(true, SeqCst);
    // The driver (the first) finishes the round; the freed buffer goes to the head.
    assert!(poll_once(waiters[0].as_mut()).is_ready());
    assert_eq!(pool.stats().reclaim_rounds, 1);
    drop(waiters);
    assert_eq!(pool.stats().in_use_bytes, 7 * B);
}

#[test]
fn cancelling_the_driver_drops_its_round_and_wakes_the_head() {
    let pool = BufPool::new(cfg(8));
    let log = log();
    let cache = Cache::new("gated", entries(&pool, 8), Behaviour::Gated, &log);
    let _handle = pool.register_reclaimer("gated", 0, cache.clone());
    let mut driver = Box::pin(pool.allocate(1));
    assert!(poll_once(driver.as_mut()).is_pending());
    let mut next = Box::pin(pool.allocate(1));
    assert!(poll_once(next.as_mut()).is_pending());
    assert_eq!(asked(&log).len(), 1);
    drop(driver);
    // The round's future went with its driver, before any new round.
    assert_eq!(cache.futures_dropped.load(SeqCst), 1);
    let stats = pool.stats();
    assert_eq!((stats.reclaim_rounds, stats.in_use_bytes), (1, 8 * B));
    // The next waiter starts a new one (the gated entries the dropped future held went back
    // with it, so the pool has room already).
    cache.gate.store(true, SeqCst);
    assert!(poll_once(next.as_mut()).is_ready());
    drop(next);
    assert_eq!(pool.stats().in_use_bytes, 7 * B);
}

#[test]
fn a_reclaimer_that_frees_nothing_stalls_until_the_pool_changes() {
    let pool = BufPool::new(cfg(4));
    let log = log();
    let liar = Cache::new("nothing", Vec::new(), Behaviour::Nothing, &log);
    let _handle = pool.register_reclaimer("nothing", 0, liar);
    let held = entries(&pool, 4);
    let mut waiter = Box::pin(pool.allocate(2));
    assert!(poll_once(waiter.as_mut()).is_pending());
    assert_eq!(pool.stats().reclaim_rounds, 1);
    // No storm: polls without a change start no round.
    for _ in 0..10 {
        assert!(poll_once(waiter.as_mut()).is_pending());
    }
    let mut second = Box::pin(pool.allocate(1));
    assert!(poll_once(second.as_mut()).is_pending());
    assert_eq!(pool.stats().reclaim_rounds, 1);
    // A release changes the pool: a new round may start.
    let mut held = held;
    drop(held.pop());
    assert!(poll_once(waiter.as_mut()).is_pending());
    assert_eq!(pool.stats().reclaim_rounds, 2);
    drop(held);
    assert!(poll_once(waiter.as_mut()).is_ready());
    assert!(poll_once(second.as_mut()).is_ready());
}

#[test]
fn a_reclaimer_that_reports_bytes_it_did_not_free_causes_no_storm() {
    let pool = BufPool::new(cfg(4));
    let log = log();
    let liar = Cache::new("liar", Vec::new(), Behaviour::Liar, &log);
    let _handle = pool.register_reclaimer("liar", 0, liar);
    let held = entries(&pool, 4);
    let mut waiter = Box::pin(pool.allocate(2));
    let mut second = Box::pin(pool.allocate(1));
    for _ in 0..10 {
        assert!(poll_once(waiter.as_mut()).is_pending());
        assert!(poll_once(second.as_mut()).is_pending());
    }
    // Covered by its report, but the head is as short as before: the pool stalls.
    assert_eq!(pool.stats().reclaim_rounds, 1);
    assert_eq!(asked(&log).len(), 1);
    drop(held);
    assert!(poll_once(waiter.as_mut()).is_ready());
    assert!(poll_once(second.as_mut()).is_ready());
}

#[test]
fn a_reclaimer_that_frees_more_than_asked_is_fine() {
    let pool = BufPool::new(cfg(8));
    let log = log();
    let generous = Cache::new("all", entries(&pool, 8), Behaviour::Everything, &log);
    let _handle = pool.register_reclaimer("all", 0, generous.clone());
    let got = futures::executor::block_on(pool.allocate(1)).unwrap();
    assert_eq!(asked(&log), [("all".to_owned(), B)]);
    let stats = pool.stats();
    assert_eq!((stats.reclaimed_bytes, stats.in_use_bytes), (8 * B, B));
    drop(got);
}

#[test]
fn a_reclaimer_may_allocate_from_its_pool() {
    let pool = Arc::new(BufPool::new(cfg(4)));
    let log = log();
    let cache = Cache::new("allocates", entries(&pool, 4), Behaviour::Allocates, &log);
    *cache.pool_for_allocating.lock().unwrap() = Some(Arc::clone(&pool));
    let handle = pool.register_reclaimer("allocates", 0, cache.clone());
    let got = futures::executor::block_on(pool.allocate(2)).unwrap();
    assert_eq!(pool.stats().in_use_bytes, 4 * B);
    drop(got);
    // The cycle (cache -> pool) is broken by hand: the contract says not to hold one.
    cache.pool_for_allocating.lock().unwrap().take();
    drop(handle);
}

#[test]
fn panicking_reclaimers_end_the_round_and_lose_nothing() {
    for behaviour in [
        Behaviour::PanicInEstimate,
        Behaviour::PanicInReclaim,
        Behaviour::PanicInPoll,
    ] {
        let pool = BufPool::new(cfg(4));
        let log = log();
        let bad = Cache::new("bad", entries(&pool, 4), behaviour, &log);
        let handle = pool.register_reclaimer("bad", 0, bad.clone());
        let mut waiter = Box::pin(pool.allocate(2));
        let caught = catch_unwind(AssertUnwindSafe(|| poll_once(waiter.as_mut())));
        assert!(caught.is_err(), "{behaviour:?}: the panic goes on");
        let stats = pool.stats();
        assert_eq!(
            (stats.waiting, stats.in_use_bytes),
            (1, 4 * B),
            "{behaviour:?}"
        );
        assert_eq!(
            stats.reclaim_rounds, 1,
            "{behaviour:?}: the round was ended"
        );
        // The request is still a valid waiter: cancelled, it leaves cleanly; a new one is
        // served once the cache lets go.
        drop(waiter);
        drop(handle);
        bad.entries.lock().unwrap().clear();
        assert_eq!(pool.stats().in_use_bytes, 0, "{behaviour:?}");
        assert!(pool.try_allocate(4).is_ok());
    }
}

#[test]
fn blocking_waiters_drive_reclaim() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let log = log();
        let cache = Cache::new("cache", entries(&pool, 4), Behaviour::Honest, &log);
        let _handle = pool.register_reclaimer("cache", 0, cache.clone());
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || pool.allocate_blocking(1))
            })
            .collect();
        // Each keeps its allocation: three buffers reclaimed from the cache.
        let got: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().unwrap().unwrap())
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!(cache.held(), B);
        assert_eq!(pool.stats().in_use_bytes, 4 * B);
        drop(got);
        assert_eq!(pool.stats().in_use_bytes, B);
        assert!(pool.stats().reclaim_rounds >= 1);
    });
}

#[test]
fn a_registration_dropped_during_its_round_finishes_that_round_only() {
    let pool = BufPool::new(cfg(4));
    let log = log();
    let cache = Cache::new("gated", entries(&pool, 4), Behaviour::Gated, &log);
    let handle = pool.register_reclaimer("gated", 0, cache.clone());
    let mut waiter = Box::pin(pool.allocate(1));
    assert!(poll_once(waiter.as_mut()).is_pending());
    drop(handle);
    assert!(pool.report().reclaimers.is_empty());
    cache.gate.store(true, SeqCst);
    assert!(poll_once(waiter.as_mut()).is_ready());
    // Not asked again.
    let mut again = Box::pin(pool.allocate(4));
    assert!(poll_once(again.as_mut()).is_pending());
    assert_eq!(asked(&log).len(), 1);
    drop((waiter, again));
}

#[test]
fn close_fails_waiters_at_once_while_a_round_is_pending() {
    let pool = BufPool::new(cfg(4));
    let log = log();
    let cache = Cache::new("gated", entries(&pool, 4), Behaviour::Gated, &log);
    let _handle = pool.register_reclaimer("gated", 0, cache.clone());
    let mut driver = Box::pin(pool.allocate(1));
    let mut other = Box::pin(pool.allocate(1));
    assert!(poll_once(driver.as_mut()).is_pending());
    assert!(poll_once(other.as_mut()).is_pending());
    pool.close();
    assert!(matches!(
        poll_once(other.as_mut()),
        Poll::Ready(Err(AllocError::Closed))
    ));
    assert!(matches!(
        poll_once(driver.as_mut()),
        Poll::Ready(Err(AllocError::Closed))
    ));
    // The driver's round ended with it, its future dropped.
    assert_eq!(cache.futures_dropped.load(SeqCst), 1);
}

#[test]
fn dropping_the_pool_during_a_round_and_a_handle_outliving_it() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let log = log();
        let cache = Cache::new("gated", entries(&pool, 4), Behaviour::Gated, &log);
        let handle = pool.register_reclaimer("gated", 0, cache.clone());
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(1).map(|a| a.length()))
        };
        while asked(&log).is_empty() {
            std::thread::yield_now();
        }
        // The test's cache still holds its entries: the barrier waits for them, so they are
        // dropped from another thread once the pool is closed.
        let closed = Arc::new(AtomicBool::new(false));
        let releaser = {
            let closed = Arc::clone(&closed);
            let cache = cache.clone();
            std::thread::spawn(move || {
                while !closed.load(SeqCst) {
                    std::thread::yield_now();
                }
                cache.entries.lock().unwrap().clear();
            })
        };
        pool.close();
        closed.store(true, SeqCst);
        assert_eq!(waiter.join().unwrap(), Err(AllocError::Closed));
        drop(Arc::try_unwrap(pool).expect("the waiter's handle is gone"));
        releaser.join().unwrap();
        // The handle outlives its pool: dropping it now does nothing.
        drop(handle);
    });
}

#[test]
fn a_registration_does_not_hold_up_the_drop_barrier() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let log = log();
        // The registration holds the cache's only `Arc`: dropping the pool drops it first,
        // and its allocations with it.
        let handle = pool.register_reclaimer(
            "cache",
            0,
            Cache::new("cache", entries(&pool, 4), Behaviour::Honest, &log),
        );
        drop(pool);
        drop(handle);
    });
}

#[test]
fn a_new_registration_wakes_a_waiter_which_reclaims() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let log = log();
        let cache = Cache::new("late", entries(&pool, 4), Behaviour::Honest, &log);
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(2).map(|a| a.length()))
        };
        while pool.stats().waiting == 0 {
            std::thread::yield_now();
        }
        let _handle = pool.register_reclaimer("late", 0, cache.clone());
        assert_eq!(waiter.join().unwrap(), Ok(2));
        assert_eq!(asked(&log), [("late".to_owned(), 2 * B)]);
    });
}

#[test]
fn try_allocate_never_reclaims() {
    let pool = BufPool::new(cfg(4));
    let log = log();
    let cache = Cache::new("cache", entries(&pool, 4), Behaviour::Honest, &log);
    let _handle = pool.register_reclaimer("cache", 0, cache.clone());
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert!(asked(&log).is_empty());
    assert_eq!(pool.stats().reclaim_rounds, 0);
}

#[test]
fn reclaim_ahead_keeps_the_low_water_mark_and_sleeps_above_it() {
    watchdog(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let pool = Arc::new(BufPool::new(cfg(16)));
            let log = log();
            let cache = Cache::new("cache", entries(&pool, 8), Behaviour::Honest, &log);
            let _handle = pool.register_reclaimer("cache", 0, cache.clone());
            let ahead = tokio::spawn(pool.reclaim_ahead(4 * B));
            // Room 8 >= 4: asleep, nothing asked.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(asked(&log).is_empty());
            // A reservation takes 6: room 2 < 4, so the cache gives 2 back, with no request
            // waiting.
            let taken = pool.try_reserve(6 * B).unwrap();
            while pool.stats().available_bytes() < 4 * B {
                tokio::task::yield_now().await;
            }
            assert_eq!(asked(&log), [("cache".to_owned(), 2 * B)]);
            assert_eq!(cache.held(), 6 * B);
            // Buffer allocations do not wake it as they succeed; a refusal does.
            let more = pool.try_allocate(4).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(asked(&log).len(), 1);
            assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
            while pool.stats().available_bytes() < 4 * B {
                tokio::task::yield_now().await;
            }
            assert_eq!(cache.held(), 2 * B);
            assert!(pool.try_allocate(4).is_ok());
            drop((taken, more));
            pool.close();
            ahead.await.unwrap();
            assert_eq!(pool.stats().in_use_bytes, 2 * B);
            assert!(pool.stats().reclaim_rounds >= 2);
        });
    });
}

#[test]
fn stats_and_report_show_reclaim() {
    let pool = BufPool::new(cfg(4));
    let log = log();
    let cache = Cache::new("cache", entries(&pool, 4), Behaviour::Honest, &log);
    let _handle = pool.register_reclaimer("cache", 3, cache.clone());
    let got = futures::executor::block_on(pool.allocate(1)).unwrap();
    let report = pool.report();
    let entry = &report.reclaimers[0];
    assert_eq!(
        (
            entry.name.as_ref(),
            entry.priority,
            entry.estimate,
            entry.times_asked,
            entry.asked_bytes,
            entry.reclaimed_bytes
        ),
        ("cache", 3, 3 * B, 1, B, B)
    );
    let text = report.to_string();
    assert!(text.contains("reclaimer \"cache\" (priority 3)"), "{text}");
    let stats = pool.stats();
    assert!(
        stats
            .to_string()
            .contains("1 reclaim rounds freed 64 of 64 bytes"),
        "{stats}"
    );
    drop(got);
}

/// Many tasks on a small pool with two caches that refill themselves, cancels and
/// timeouts; at the end every byte is back.
#[test]
fn stress_reclaim_with_waiters_cancels_and_refills() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(16)));
        let log = log();
        let a = Cache::new("a", Vec::new(), Behaviour::Honest, &log);
        let b = Cache::new("b", Vec::new(), Behaviour::Everything, &log);
        let _ha = pool.register_reclaimer("a", 0, a.clone());
        let _hb = pool.register_reclaimer("b", 1, b.clone());
        let rounds = if cfg!(miri) { 20 } else { 2_000 };
        let workers: Vec<_> = (0..4)
            .map(|index| {
                let pool = Arc::clone(&pool);
                let cache = if index % 2 == 0 { a.clone() } else { b.clone() };
                std::thread::spawn(move || {
                    for round in 0..rounds {
                        let n = 1 + (round + index) % 5;
                        match round % 3 {
                            0 => {
                                if let Ok(got) = pool.allocate_timeout(n, Duration::from_millis(5))
                                {
                                    // Keep some in the cache: refill.
                                    cache.entries.lock().unwrap().push(got);
                                }
                            }
                            1 => drop(pool.allocate_timeout(n, Duration::from_micros(50))),
                            _ => drop(pool.try_allocate(n)),
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        a.entries.lock().unwrap().clear();
        b.entries.lock().unwrap().clear();
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.waiting, stats.outstanding),
            (0, 0, 0)
        );
        assert!(stats.reclaim_rounds > 0);
    });
}

/// A waker that panics the first time it is woken, then counts.
struct PanicOnce {
    woken: AtomicUsize,
}

impl std::task::Wake for PanicOnce {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if self.woken.fetch_add(1, SeqCst) == 0 {
            panic!("a waker that panics once");
        }
    }
}

fn panic_once_waker() -> (Waker, Arc<PanicOnce>) {
    let inner = Arc::new(PanicOnce {
        woken: AtomicUsize::new(0),
    });
    (Waker::from(Arc::clone(&inner)), inner)
}

/// Found by the soak's `--faults`: a registration whose announcement wakes a waiter with a
/// panicking waker must not stay registered with no handle to remove it.
#[test]
fn a_registration_whose_wake_up_panics_is_not_left_behind() {
    let pool = BufPool::new(cfg(2));
    let held = entries(&pool, 2);
    let (waker, _inner) = panic_once_waker();
    let mut waiting = Box::pin(pool.allocate(1));
    assert!(
        waiting
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    let log = log();
    let registered = catch_unwind(AssertUnwindSafe(|| {
        pool.register_reclaimer(
            "leaked?",
            0,
            Cache::new("leaked?", Vec::new(), Behaviour::Nothing, &log),
        )
    }));
    assert!(registered.is_err(), "the waker's panic goes on");
    assert!(
        pool.report().reclaimers.is_empty(),
        "and nothing stays registered"
    );
    drop((waiting, held));
    assert_eq!(pool.stats().in_use_bytes, 0);
}

/// Found by the soak's `--faults`: a request served while it drives a round ends the round
/// (which wakes the head of the queue); if that wake-up panics, the bytes it was served go
/// back before the panic goes on (nobody would hold them otherwise).
#[test]
fn a_driver_served_whose_round_end_wakes_a_panicking_waker_loses_nothing() {
    let pool = BufPool::new(cfg(3));
    let log = log();
    let cache = Cache::new("gated", entries(&pool, 2), Behaviour::Gated, &log);
    let _handle = pool.register_reclaimer("gated", 0, cache.clone());
    let held = pool.try_allocate(1).unwrap();
    // The driver heads the queue; its round's future holds one of the cache's entries.
    let mut driver = Box::pin(pool.allocate(1));
    assert!(poll_once(driver.as_mut()).is_pending());
    // Behind it, a request for 2 with a waker that panics once.
    let (waker, _inner) = panic_once_waker();
    let mut behind = Box::pin(pool.allocate(2));
    assert!(
        behind
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    // The driver is served by a release while its round is pending.
    drop(held);
    let served = catch_unwind(AssertUnwindSafe(|| poll_once(driver.as_mut())));
    assert!(
        served.is_err(),
        "the head's wake-up panicked, and that goes on"
    );
    drop(driver);
    // The driver's bytes went back: the round's entry and the driver's buffer are free, the
    // cache holds the other entry; the request behind was granted what came back.
    assert_eq!(cache.held(), B);
    let stats = pool.stats();
    assert_eq!(stats.in_use_bytes, 3 * B, "{stats:?}");
    let Poll::Ready(Ok(got)) = poll_once(behind.as_mut()) else {
        panic!("the request behind was served");
    };
    assert_eq!(got.length(), 2);
    drop(got);
    cache.entries.lock().unwrap().clear();
    let stats = pool.stats();
    assert_eq!((stats.in_use_bytes, stats.outstanding), (0, 0));
}

/// Found by the soak's `--faults`: a driver cancelled while its cancel's wake-ups panic must
/// still end its round (else the pool keeps it in flight for good: no round ever again, and
/// what the round's future holds is never given back).
#[test]
fn a_driver_cancelled_while_a_wake_up_panics_still_ends_its_round() {
    let pool = BufPool::new(cfg(3));
    let log = log();
    let cache = Cache::new("gated", entries(&pool, 2), Behaviour::Gated, &log);
    let _handle = pool.register_reclaimer("gated", 0, cache.clone());
    let held = pool.try_allocate(1).unwrap();
    let mut driver = Box::pin(pool.allocate(1));
    assert!(poll_once(driver.as_mut()).is_pending());
    let (waker, _inner) = panic_once_waker();
    let mut behind = Box::pin(pool.allocate(1));
    assert!(
        behind
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    // The driver is granted the released buffer, then dropped: its grant goes on to the
    // request behind, whose waker panics.
    drop(held);
    let cancelled = catch_unwind(AssertUnwindSafe(move || drop(driver)));
    assert!(cancelled.is_err());
    assert_eq!(
        cache.futures_dropped.load(SeqCst),
        1,
        "the round's future went"
    );
    assert_eq!(pool.stats().reclaim_rounds, 1, "the round ended");
    let Poll::Ready(Ok(got)) = poll_once(behind.as_mut()) else {
        panic!("the request behind was served");
    };
    // A new round can start.
    let mut next = Box::pin(pool.allocate(2));
    cache.gate.store(true, SeqCst);
    assert!(poll_once(next.as_mut()).is_ready());
    assert_eq!(asked(&log).len(), 2);
    drop((got, next));
}
