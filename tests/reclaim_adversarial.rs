//! Cooperative reclaim (README "Reclaim", guarantee 17) against hostile reclaimers: panics in
//! every piece of user code (the call, the future's poll, the future's drop, the reclaimer's
//! own drop), lies, re-entry into the pool's queue, registrations during a round, futures that
//! never complete while their driver times out, is failed by a shrink or served by a grow,
//! child/parent scopes, and `reclaim_ahead` against `close()`. After every scenario the books
//! are checked at a quiescent point (guarantee 10): nothing in use, outstanding or waiting
//! once everything is dropped, and the whole budget allocatable again. Every test runs under
//! a watchdog that fails instead of hanging.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

mod common;

use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer, ReclaimerHandle,
};

const B: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * B,
    }
}

/// Runs `f` on a thread and fails if it does not return within 20 s (a hang is a failure);
/// a panic in `f` is passed on.
fn watchdog(f: impl FnOnce() + Send + 'static) {
    common::watchdog(20, f);
}

fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

fn entries(pool: &BufPool, buffers: usize) -> Vec<BufPoolAllocation> {
    (0..buffers)
        .map(|_| pool.try_allocate(1).unwrap())
        .collect()
}

/// The quiescent-point check: nothing in use, outstanding or waiting, no reservation or
/// overcommit left, and the whole budget allocatable at once.
fn assert_drained(pool: &BufPool, buffers: usize) {
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.outstanding,
            stats.waiting,
            stats.reserved_bytes,
            stats.overcommit_bytes
        ),
        (0, 0, 0, 0, 0),
        "{stats:?}"
    );
    let all = pool
        .try_allocate(buffers)
        .expect("the whole budget is free");
    drop(all);
    assert_eq!(pool.stats().in_use_bytes, 0);
}

type ReclaimFn =
    dyn Fn(&Hostile, usize) -> Pin<Box<dyn Future<Output = usize> + Send>> + Send + Sync;

/// A reclaimer whose every call is a closure of the test; it holds a cache of allocations.
struct Hostile {
    cache: Mutex<Vec<BufPoolAllocation>>,
    asked: Mutex<Vec<usize>>,
    reclaim: Box<ReclaimFn>,
    estimate_panics: AtomicBool,
    drop_panics: AtomicBool,
    /// Anything the reclaimer keeps for the test (handles it registered, futures...).
    stash: Mutex<Vec<Box<dyn Send>>>,
}

impl Hostile {
    fn new(
        cache: Vec<BufPoolAllocation>,
        reclaim: impl Fn(&Hostile, usize) -> Pin<Box<dyn Future<Output = usize> + Send>>
        + Send
        + Sync
        + 'static,
    ) -> Arc<Self> {
        Arc::new(Hostile {
            cache: Mutex::new(cache),
            asked: Mutex::new(Vec::new()),
            reclaim: Box::new(reclaim),
            estimate_panics: AtomicBool::new(false),
            drop_panics: AtomicBool::new(false),
            stash: Mutex::new(Vec::new()),
        })
    }

    /// Frees whole entries until `target` is covered; returns what it freed.
    fn free_up_to(&self, target: usize) -> usize {
        let mut cache = self.cache.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            let Some(entry) = cache.pop() else { break };
            freed += entry.allocated_bytes();
        }
        freed
    }

    fn held(&self) -> usize {
        self.cache
            .lock()
            .unwrap()
            .iter()
            .map(BufPoolAllocation::allocated_bytes)
            .sum()
    }

    fn asked(&self) -> Vec<usize> {
        self.asked.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.cache.lock().unwrap().clear();
        self.stash.lock().unwrap().clear();
    }
}

impl Reclaimer for Hostile {
    fn estimate(&self) -> usize {
        assert!(!self.estimate_panics.load(SeqCst), "hostile estimate");
        self.held()
    }
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        self.asked.lock().unwrap().push(target);
        (self.reclaim)(self, target)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if self.drop_panics.load(SeqCst) && !std::thread::panicking() {
            panic!("hostile reclaimer drop");
        }
    }
}

/// Frees honestly, at once.
fn honest(h: &Hostile, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
    let freed = h.free_up_to(target);
    Box::pin(async move { freed })
}

/// A future pending until its gate opens (then it frees what it holds), counting its drops;
/// it keeps the last waker it saw and the gate's opener wakes it.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
    dropped: Arc<AtomicUsize>,
    polls: Arc<AtomicUsize>,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, SeqCst);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }
}

struct Gated {
    gate: Gate,
    held: Vec<BufPoolAllocation>,
    /// Panics when dropped before it completed.
    panic_on_drop: bool,
    done: bool,
}

impl Future for Gated {
    type Output = usize;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
        self.gate.polls.fetch_add(1, SeqCst);
        if self.gate.open.load(SeqCst) {
            let freed = self.held.drain(..).map(|a| a.allocated_bytes()).sum();
            self.done = true;
            return Poll::Ready(freed);
        }
        *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.gate.dropped.fetch_add(1, SeqCst);
        if self.panic_on_drop && !self.done && !std::thread::panicking() {
            panic!("hostile future drop");
        }
    }
}

/// A reclaimer whose future takes `target` worth of its cache and holds it until the gate
/// opens (then frees it). Dropped early, the future gives the entries back with itself.
fn gated(
    gate: &Gate,
    panic_on_drop: bool,
) -> impl Fn(&Hostile, usize) -> Pin<Box<dyn Future<Output = usize> + Send>> + Send + Sync + 'static
{
    let gate = gate.clone();
    move |h, target| {
        let mut cache = h.cache.lock().unwrap();
        let mut held = Vec::new();
        let mut took = 0;
        while took < target {
            let Some(entry) = cache.pop() else { break };
            took += entry.allocated_bytes();
            held.push(entry);
        }
        Box::pin(Gated {
            gate: gate.clone(),
            held,
            panic_on_drop,
            done: false,
        })
    }
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------------

/// Guarantee 17 (panics lose no byte, hang nothing) and "Reclaim": a panic in the drop of a
/// reclaimer's future, when its driver is cancelled, ends the round: the books are exact, a
/// later round may start, and the budget is whole once everything is dropped.
#[test]
fn a_future_whose_drop_panics_when_its_driver_is_cancelled() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let gate = Gate::default();
        let bad = Hostile::new(entries(&pool, 4), gated(&gate, true));
        let handle = pool.register_reclaimer("bad", 0, bad.clone());
        let mut driver = Box::pin(pool.allocate(2));
        assert!(poll_once(driver.as_mut()).is_pending());
        assert_eq!(bad.asked(), [2 * B]);
        let caught = catch_unwind(AssertUnwindSafe(|| drop(driver)));
        // Passed on or not, the round is over and the entries the future held went back.
        let _ = caught;
        assert_eq!(gate.dropped.load(SeqCst), 1);
        let stats = pool.stats();
        assert_eq!((stats.waiting, stats.reclaim_rounds), (0, 1), "{stats:?}");
        assert_eq!(stats.in_use_bytes, 2 * B);
        // No round is left in flight: a new waiter starts one (honest this time: the gate
        // is open, and the next future does not panic when dropped after completing).
        gate.open();
        let got = futures::executor::block_on(pool.allocate(4)).unwrap();
        assert_eq!(pool.stats().reclaim_rounds, 2);
        drop(got);
        drop(handle);
        bad.clear();
        assert_drained(&pool, 4);
    });
}

/// "Reclaim": "A panic in `estimate`, `reclaim` or its future ends the round (...) and is
/// passed on to the poll that drove it". Here the future completes (reports its bytes) and
/// panics as it is dropped afterwards: the books must stay exact and the request be served
/// or stay a valid waiter; the panic should reach the driver's poll.
#[test]
fn a_future_whose_drop_panics_after_it_completed_is_passed_on() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let dropped = Arc::new(AtomicUsize::new(0));
        let bad = {
            let dropped = Arc::clone(&dropped);
            Hostile::new(entries(&pool, 4), move |h, target| {
                struct Bomb(Arc<AtomicUsize>);
                impl Drop for Bomb {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, SeqCst);
                        if !std::thread::panicking() {
                            panic!("hostile drop after completion");
                        }
                    }
                }
                let bomb = Bomb(Arc::clone(&dropped));
                let freed = h.free_up_to(target);
                Box::pin(std::future::poll_fn(move |_| {
                    let _keep = &bomb;
                    Poll::Ready(freed)
                }))
            })
        };
        let handle = pool.register_reclaimer("bad", 0, bad.clone());
        let mut driver = Box::pin(pool.allocate(2));
        let caught = catch_unwind(AssertUnwindSafe(|| poll_once(driver.as_mut())));
        // (What it served, if it was not a panic, is given back here.)
        let passed_on = caught.is_err();
        drop(caught);
        assert_eq!(dropped.load(SeqCst), 1);
        let stats = pool.stats();
        assert_eq!(stats.reclaim_rounds, 1, "{stats:?}");
        assert_eq!(stats.reclaimed_bytes, 2 * B);
        // The books are exact whatever happened to the panic.
        drop(driver);
        drop(handle);
        bad.clear();
        assert_drained(&pool, 4);
        assert!(
            passed_on,
            "the drop's panic was passed on to the driver's poll"
        );
    });
}

/// Guarantee 17 / "Lifetimes": a reclaimer unregistered during its round whose own `Drop`
/// panics when the round lets go of it (the round held its last `Arc`): the panic goes to
/// the driver's poll, the request stays a valid waiter (or is served, then gives back), and
/// nothing is lost.
#[test]
fn a_reclaimer_whose_drop_panics_when_its_round_lets_go_of_it() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let held = entries(&pool, 4);
        let gate = Gate::default();
        let bad = Hostile::new(Vec::new(), gated(&gate, false));
        bad.drop_panics.store(true, SeqCst);
        let handle = pool.register_reclaimer("bad", 0, bad);
        let mut driver = Box::pin(pool.allocate(1));
        assert!(poll_once(driver.as_mut()).is_pending());
        // The registration goes; the round keeps the reclaimer's last `Arc`.
        drop(handle);
        gate.open();
        let caught = catch_unwind(AssertUnwindSafe(|| poll_once(driver.as_mut())));
        assert!(caught.is_err(), "the reclaimer's drop panic goes on");
        let stats = pool.stats();
        assert_eq!(
            (stats.reclaim_rounds, stats.in_use_bytes, stats.waiting),
            (1, 4 * B, 1),
            "{stats:?}"
        );
        // Still a valid waiter: served by a release, FIFO.
        drop(held);
        match poll_once(driver.as_mut()) {
            Poll::Ready(Ok(got)) => drop(got),
            other => panic!("not served: {other:?}"),
        }
        drop(driver);
        assert_drained(&pool, 4);
    });
}

/// Guarantee 17: a panic in `estimate` of one reclaimer among honest ones ends the round
/// before anyone is asked (counted), the panic goes on, and the next round (estimate fixed)
/// asks in order and serves the waiter; the stats never go down.
#[test]
fn an_estimate_panic_among_honest_reclaimers_then_recovery() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let a = Hostile::new(entries(&pool, 2), honest);
        let b = Hostile::new(entries(&pool, 2), honest);
        b.estimate_panics.store(true, SeqCst);
        let _ha = pool.register_reclaimer("a", 0, a.clone());
        let _hb = pool.register_reclaimer("b", 0, b.clone());
        let mut waiter = Box::pin(pool.allocate(3));
        assert!(catch_unwind(AssertUnwindSafe(|| poll_once(waiter.as_mut()))).is_err());
        let first = pool.stats();
        assert_eq!((first.reclaim_rounds, first.waiting), (1, 1));
        assert!(a.asked().is_empty() && b.asked().is_empty());
        // The pool changes (a registration): a new round is allowed.
        b.estimate_panics.store(false, SeqCst);
        let c = Hostile::new(Vec::new(), honest);
        let _hc = pool.register_reclaimer("c", 9, c.clone());
        let got = futures::executor::block_on(waiter.as_mut()).unwrap();
        let second = pool.stats();
        assert!(second.reclaim_rounds > first.reclaim_rounds);
        assert!(second.reclaim_asked_bytes >= first.reclaim_asked_bytes);
        assert!(second.reclaimed_bytes >= 3 * B);
        assert!(
            c.asked().is_empty(),
            "priority 9 is asked last, never needed"
        );
        drop(got);
        drop(waiter);
        a.clear();
        b.clear();
        assert_drained(&pool, 4);
    });
}

// ---------------------------------------------------------------------------------------
// Lies
// ---------------------------------------------------------------------------------------

/// "Visible" + guarantee 10 (stats never go down): a reclaimer that reports absurd amounts
/// (`usize::MAX`) must not make any figure wrap: the pool's `reclaimed_bytes` and the
/// report's per-reclaimer `reclaimed_bytes` only grow (saturate).
#[test]
fn a_reclaimer_reporting_usize_max_never_makes_a_figure_go_down() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let liar = Hostile::new(Vec::new(), |_, _| Box::pin(async { usize::MAX }));
        let _handle = pool.register_reclaimer("liar", 0, liar.clone());
        let mut held = entries(&pool, 4);
        let mut previous = (0, 0);
        for round in 1..=3 {
            let mut waiter = Box::pin(pool.allocate(1));
            assert!(poll_once(waiter.as_mut()).is_pending());
            let stats = pool.stats();
            assert_eq!(stats.reclaim_rounds, round);
            let report = pool.report();
            let entry = &report.reclaimers[0];
            assert!(stats.reclaimed_bytes >= previous.0, "pool total went down");
            assert!(
                entry.reclaimed_bytes >= previous.1,
                "per-reclaimer figure went down: {} after {}",
                entry.reclaimed_bytes,
                previous.1
            );
            previous = (stats.reclaimed_bytes, entry.reclaimed_bytes);
            // A release changes the pool (the stall lifts) and serves the waiter, which
            // keeps the pool full for the next round.
            drop(held.pop());
            match poll_once(waiter.as_mut()) {
                Poll::Ready(Ok(a)) => held.push(a),
                other => panic!("not served: {other:?}"),
            }
            drop(waiter);
            assert_eq!(pool.stats().in_use_bytes, 4 * B);
        }
        drop(held);
        assert_drained(&pool, 4);
    });
}

/// "Reclaim" (freed bytes go out in FIFO order, no barging) and guarantee 5: a reclaimer
/// that frees much more than asked and reports less; every waiter is served in arrival
/// order and the books are exact.
#[test]
fn a_reclaimer_that_frees_everything_and_under_reports_serves_fifo() {
    watchdog(|| {
        let pool = BufPool::new(cfg(8));
        let generous = Hostile::new(entries(&pool, 8), |h, _| {
            h.cache.lock().unwrap().clear();
            Box::pin(async { 0 })
        });
        let _handle = pool.register_reclaimer("generous", 0, generous.clone());
        let mut waiters: Vec<_> = [3, 1, 4]
            .iter()
            .map(|&n| Box::pin(pool.allocate(n)))
            .collect();
        let mut got: Vec<Option<BufPoolAllocation>> = vec![None, None, None];
        for _ in 0..2 {
            for (waiter, slot) in waiters.iter_mut().zip(&mut got) {
                if slot.is_none() {
                    if let Poll::Ready(result) = poll_once(waiter.as_mut()) {
                        *slot = Some(result.unwrap());
                    }
                }
            }
        }
        let lengths: Vec<_> = got.iter().map(|a| a.as_ref().map(|a| a.length())).collect();
        assert_eq!(lengths, [Some(3), Some(1), Some(4)]);
        drop(got);
        assert_eq!(generous.asked(), [3 * B]);
        assert_eq!(pool.stats().reclaimed_bytes, 0, "it reported 0");
        drop(waiters);
        assert_drained(&pool, 8);
    });
}

// ---------------------------------------------------------------------------------------
// Re-entry
// ---------------------------------------------------------------------------------------

/// Guarantee 17 (reclaimers' allocations and registrations lose no byte and hang nothing)
/// and guarantee 5 (no barging): inside `reclaim`, a reclaimer queues a request of its own
/// pool (polled once, so it waits behind the head), tries `try_allocate` (refused: others
/// wait), registers a second reclaimer and drops its own registration. The head is served
/// first, the reclaimer's request next; the dropped registration is never asked again and
/// the new one is.
#[test]
fn a_reclaimer_that_queues_registers_and_unregisters_inside_its_round() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let weak = Arc::downgrade(&pool);
        let own_handle: Arc<Mutex<Option<ReclaimerHandle>>> = Arc::default();
        let refused = Arc::new(AtomicBool::new(false));
        let second = Hostile::new(Vec::new(), honest);
        let reentrant = {
            let own_handle = Arc::clone(&own_handle);
            let refused = Arc::clone(&refused);
            let second = second.clone();
            Hostile::new(entries(&pool, 4), move |h, target| {
                let pool = weak.upgrade().expect("the pool is alive");
                // The head waits: no barging, even from the reclaimer.
                refused.store(
                    matches!(pool.try_allocate(1), Err(AllocError::WouldBlock)),
                    SeqCst,
                );
                // Registers another and unregisters itself.
                let new = pool.register_reclaimer("second", 1, second.clone());
                h.stash.lock().unwrap().push(Box::new(new));
                drop(own_handle.lock().unwrap().take());
                let freed = h.free_up_to(target);
                Box::pin(async move { freed })
            })
        };
        *own_handle.lock().unwrap() =
            Some(pool.register_reclaimer("reentrant", 0, reentrant.clone()));
        let mut head = Box::pin(pool.allocate(2));
        let Poll::Ready(Ok(head)) = poll_once(head.as_mut()) else {
            panic!("the head was not served by the reclaimer")
        };
        assert!(
            refused.load(SeqCst),
            "try_allocate inside a round did not barge"
        );
        assert_eq!(reentrant.asked(), [2 * B]);
        let names: Vec<_> = pool
            .report()
            .reclaimers
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["second"]);
        // The next shortage asks `second` (empty), never `reentrant`.
        let mut next = Box::pin(pool.allocate(2));
        assert!(poll_once(next.as_mut()).is_pending());
        assert_eq!(second.asked(), [2 * B]);
        assert_eq!(reentrant.asked().len(), 1);
        drop(head);
        assert!(poll_once(next.as_mut()).is_ready());
        drop(next);
        reentrant.clear();
        assert_drained(&pool, 4);
    });
}

/// Guarantee 5 + 17: a reclaimer whose future enqueues a request of the same pool (polled
/// once, kept pending, then dropped inside a later poll of the future) never overtakes the
/// head; the head is served with what the reclaimer freed; nothing is left waiting.
#[test]
fn a_reclaimer_future_that_waits_on_its_own_pool_and_cancels() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let weak = Arc::downgrade(&pool);
        let cache = Hostile::new(entries(&pool, 4), move |h, target| {
            let pool = weak.upgrade().unwrap();
            let freed = h.free_up_to(target);
            let mut step = 0;
            let mut inner = Some(Box::pin(pool.allocate_owned(4)));
            Box::pin(std::future::poll_fn(move |cx| {
                step += 1;
                match step {
                    1 => {
                        // Queues behind the head: must not be served ahead of it.
                        let polled = inner.as_mut().unwrap().as_mut().poll(cx);
                        assert!(polled.is_pending(), "the reclaimer's request barged");
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    _ => {
                        drop(inner.take());
                        Poll::Ready(freed)
                    }
                }
            }))
        });
        let _handle = pool.register_reclaimer("cache", 0, cache.clone());
        let got = futures::executor::block_on(pool.allocate(2)).unwrap();
        assert_eq!(got.length(), 2);
        let stats = pool.stats();
        assert_eq!((stats.waiting, stats.in_use_bytes), (0, 4 * B), "{stats:?}");
        drop(got);
        cache.clear();
        assert_drained(&pool, 4);
    });
}

// ---------------------------------------------------------------------------------------
// Scope: child and parent
// ---------------------------------------------------------------------------------------

/// "Who is asked" / guarantee 17: a child's request short at the child's own cap asks the
/// child's reclaimers (and its descendants'), never its parent's.
#[test]
fn a_child_short_at_its_own_cap_never_asks_its_parent_reclaimers() {
    watchdog(|| {
        let root = BufPool::new(cfg(16));
        let child = root.child("child", cfg(4)).unwrap();
        let parent_cache = Hostile::new(entries(&root, 4), honest);
        let child_cache = Hostile::new(entries(&child, 4), honest);
        let _hp = root.register_reclaimer("parent", 0, parent_cache.clone());
        let _hc = child.register_reclaimer("child", 0, child_cache.clone());
        let got = futures::executor::block_on(child.allocate(2)).unwrap();
        assert_eq!(child_cache.asked(), [2 * B]);
        assert!(
            parent_cache.asked().is_empty(),
            "the parent's cache was asked"
        );
        assert_eq!(child.stats().reclaim_rounds, 1);
        assert_eq!(root.stats().reclaim_rounds, 0);
        drop(got);
        parent_cache.clear();
        child_cache.clear();
        assert_drained(&child, 4);
        assert_drained(&root, 16);
    });
}

/// "Who is asked": a request of the parent asks a grandchild's reclaimer (descendants are in
/// scope), the freed bytes reach the parent's head, and the books are exact at every level.
#[test]
fn a_parent_request_asks_a_grandchild_reclaimer() {
    watchdog(|| {
        let root = BufPool::new(cfg(4));
        let child = root.child("child", cfg(4)).unwrap();
        let grandchild = child.child("grandchild", cfg(4)).unwrap();
        let deep = Hostile::new(entries(&grandchild, 4), honest);
        let _h = grandchild.register_reclaimer("deep", 0, deep.clone());
        let got = futures::executor::block_on(root.allocate(3)).unwrap();
        assert_eq!(deep.asked(), [3 * B]);
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_eq!(root.stats().in_use_bytes, 4 * B);
        assert_eq!(grandchild.stats().in_use_bytes, B);
        drop(got);
        deep.clear();
        assert_drained(&grandchild, 4);
        assert_drained(&child, 4);
        assert_drained(&root, 4);
    });
}

/// Guarantee 5 + 17: a child's reclaimer, asked by a request of the root, tries to take the
/// freed bytes back for itself from the root inside `reclaim` (a `try_allocate` on the root
/// and on its own pool): refused while the head waits; the head gets them.
#[test]
fn a_child_reclaimer_that_tries_to_take_back_from_the_parent_inside_reclaim() {
    watchdog(|| {
        let root = Arc::new(BufPool::new(cfg(4)));
        let child = Arc::new(root.child("child", cfg(4)).unwrap());
        let (weak_root, weak_child) = (Arc::downgrade(&root), Arc::downgrade(&child));
        let took = Arc::new(AtomicUsize::new(0));
        let grabber = {
            let took = Arc::clone(&took);
            Hostile::new(entries(&child, 4), move |h, target| {
                // One entry at a time; after each, try to take a buffer back, from the root
                // and from its own pool (room the head waits for: no barging).
                let mut freed = 0;
                while freed < target {
                    let Some(entry) = h.cache.lock().unwrap().pop() else {
                        break;
                    };
                    freed += entry.allocated_bytes();
                    drop(entry);
                    for pool in [weak_root.upgrade().unwrap(), weak_child.upgrade().unwrap()] {
                        if let Ok(a) = pool.try_allocate(1) {
                            took.fetch_add(1, SeqCst);
                            h.stash.lock().unwrap().push(Box::new(a));
                        }
                    }
                }
                Box::pin(async move { freed })
            })
        };
        let _h = child.register_reclaimer("grabber", 0, grabber.clone());
        let got = futures::executor::block_on(root.allocate(2)).unwrap();
        assert_eq!(got.length(), 2);
        assert_eq!(
            took.load(SeqCst),
            0,
            "the reclaimer barged ahead of the head"
        );
        drop(got);
        grabber.clear();
        assert_drained(&child, 4);
        assert_drained(&root, 4);
    });
}

// ---------------------------------------------------------------------------------------
// Futures that never complete
// ---------------------------------------------------------------------------------------

/// "Who drives it": a blocking `allocate_timeout` that drives a round whose future never
/// completes times out in time, drops that future, ends the round, and the next waiter may
/// start a new one; nothing is lost.
#[test]
fn allocate_timeout_driving_a_never_ending_round_times_out_and_ends_it() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let held = entries(&pool, 4);
        let forever = Arc::new(AtomicUsize::new(0));
        let stuck = {
            let forever = Arc::clone(&forever);
            Hostile::new(Vec::new(), move |_, _| {
                struct Forever(Arc<AtomicUsize>);
                impl Future for Forever {
                    type Output = usize;
                    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<usize> {
                        Poll::Pending
                    }
                }
                impl Drop for Forever {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, SeqCst);
                    }
                }
                Box::pin(Forever(Arc::clone(&forever)))
            })
        };
        let _h = pool.register_reclaimer("stuck", 0, stuck.clone());
        let started = std::time::Instant::now();
        assert_eq!(
            pool.allocate_timeout(1, Duration::from_millis(50))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(forever.load(SeqCst), 1, "its future was dropped");
        let stats = pool.stats();
        assert_eq!(
            (stats.reclaim_rounds, stats.waiting, stats.timed_out),
            (1, 0, 1)
        );
        // The round is over: the next waiter starts another (the first never finished, so it
        // did not stall the pool).
        assert_eq!(
            pool.allocate_timeout(1, Duration::from_millis(20))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(stuck.asked().len(), 2);
        assert_eq!(pool.stats().reclaim_rounds, 2);
        drop(held);
        assert_drained(&pool, 4);
    });
}

/// Guarantee 3 (no lost wake-up): a reclaimer's future that is pending and woken only by an
/// outside event (another thread opens the gate later) completes on a tokio task, whose
/// request is then served.
#[test]
fn a_pending_reclaimer_woken_from_another_thread_is_not_lost() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let gate = Gate::default();
        let cache = Hostile::new(entries(&pool, 4), gated(&gate, false));
        let _h = pool.register_reclaimer("gated", 0, cache.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let task = rt.spawn(Arc::clone(&pool).allocate_owned(2));
        while gate.polls.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                gate.open();
            })
        };
        let got = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await })
            .expect("lost wake-up")
            .unwrap()
            .unwrap();
        opener.join().unwrap();
        assert_eq!(got.length(), 2);
        drop(got);
        drop(rt);
        cache.clear();
        assert_drained(&pool, 4);
    });
}

/// "Ahead of need": `reclaim_ahead` "resolves when the pool closes", and `close()` fails
/// waiters at once even while a round's future is pending. Here `reclaim_ahead` itself
/// drives a round whose future is pending (and will not wake it): `close()` must still make
/// it resolve.
#[test]
fn reclaim_ahead_resolves_on_close_while_its_round_is_pending() {
    watchdog(|| {
        tokio_rt().block_on(async {
            let pool = Arc::new(BufPool::new(cfg(8)));
            let gate = Gate::default();
            let cache = Hostile::new(entries(&pool, 8), gated(&gate, false));
            let _h = pool.register_reclaimer("gated", 0, cache.clone());
            let ahead = tokio::spawn(pool.reclaim_ahead(2 * B));
            while gate.polls.load(SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            pool.close();
            let resolved = tokio::time::timeout(Duration::from_secs(2), ahead).await;
            if resolved.is_err() {
                // Its round keeps the cache's registration and the entries its future holds:
                // dropping the pool now would wait for them for good. Leak instead, and fail.
                std::mem::forget(pool);
                std::mem::forget(cache);
                panic!("reclaim_ahead did not resolve after close()");
            }
            assert_eq!(gate.dropped.load(SeqCst), 1);
            cache.clear();
            assert_eq!(pool.stats().in_use_bytes, 0);
        });
    });
}

// ---------------------------------------------------------------------------------------
// Resizes and close
// ---------------------------------------------------------------------------------------

/// Guarantee 14 + 17: a child's shrink fails its driver (which can no longer fit) while the
/// driver's round is pending: the round ends (future dropped), no round is left in flight,
/// and the books are exact.
#[test]
fn a_shrink_that_fails_the_driver_ends_its_round() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let child = root.child("child", cfg(4)).unwrap();
        let gate = Gate::default();
        let cache = Hostile::new(entries(&child, 4), gated(&gate, false));
        let _h = child.register_reclaimer("gated", 0, cache.clone());
        let mut driver = Box::pin(child.allocate(3));
        assert!(poll_once(driver.as_mut()).is_pending());
        child.set_max_memory(2 * B).unwrap();
        match poll_once(driver.as_mut()) {
            Poll::Ready(Err(AllocError::ExceedsBudget { .. })) => {}
            other => panic!("the shrink did not fail the driver: {other:?}"),
        }
        drop(driver);
        assert_eq!(gate.dropped.load(SeqCst), 1);
        let stats = child.stats();
        assert_eq!((stats.reclaim_rounds, stats.waiting), (1, 0), "{stats:?}");
        // A new round can start (nothing in flight): the cache gave its gated entries back
        // with the dropped future, so 2 of 4 are held; grow back, fill, and ask again.
        child.set_max_memory(4 * B).unwrap();
        gate.open();
        let got = futures::executor::block_on(child.allocate(4)).unwrap();
        assert!(child.stats().reclaim_rounds >= 2);
        drop(got);
        cache.clear();
        assert_drained(&child, 4);
        assert_drained(&root, 8);
    });
}

/// "Who drives it" (a driver served while a reclaimer's future is pending drops that future
/// and ends the round): a grow serves the driver; the pending future is dropped, the round
/// is counted once, and the other waiters are served in order.
#[test]
fn a_grow_that_serves_the_driver_ends_its_pending_round() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let gate = Gate::default();
        let cache = Hostile::new(entries(&pool, 4), gated(&gate, false));
        let _h = pool.register_reclaimer("gated", 0, cache.clone());
        let mut driver = Box::pin(pool.allocate(2));
        let mut second = Box::pin(pool.allocate(2));
        assert!(poll_once(driver.as_mut()).is_pending());
        assert!(poll_once(second.as_mut()).is_pending());
        pool.set_max_memory(8 * B).unwrap();
        let a = match poll_once(driver.as_mut()) {
            Poll::Ready(Ok(a)) => a,
            other => panic!("{other:?}"),
        };
        let b = match poll_once(second.as_mut()) {
            Poll::Ready(Ok(b)) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(gate.dropped.load(SeqCst), 1);
        let stats = pool.stats();
        assert_eq!((stats.reclaim_rounds, stats.waiting), (1, 0), "{stats:?}");
        drop((a, b, driver, second));
        cache.clear();
        assert_drained(&pool, 8);
    });
}

/// Guarantee 8 + 17: close() while a blocking driver's round is pending on another thread
/// and a reclaimer (on a different pool of the same tree) is mid-round: every waiter gets
/// `Closed` at once, the pool's drop barrier completes once the caches let go.
#[test]
fn close_and_drop_while_a_blocking_driver_round_is_pending() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let gate = Gate::default();
        let cache = Hostile::new(entries(&pool, 4), gated(&gate, true));
        let handle = pool.register_reclaimer("gated", 0, cache.clone());
        let drivers: Vec<_> = (0..2)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || pool.allocate_blocking(1).map(|a| a.length()))
            })
            .collect();
        while gate.polls.load(SeqCst) == 0 || pool.stats().waiting < 2 {
            std::thread::yield_now();
        }
        pool.close();
        let mut panics = 0;
        for driver in drivers {
            match driver.join() {
                Ok(result) => assert_eq!(result, Err(AllocError::Closed)),
                // The future's drop panics, passed on to its driver's call.
                Err(_) => panics += 1,
            }
        }
        assert!(panics <= 1);
        assert_eq!(gate.dropped.load(SeqCst), 1);
        cache.clear();
        drop(handle);
        let pool = Arc::try_unwrap(pool).expect("the drivers' handles are gone");
        assert_eq!(pool.stats().in_use_bytes, 0);
        drop(pool);
    });
}

// ---------------------------------------------------------------------------------------
// Stress
// ---------------------------------------------------------------------------------------

/// Guarantees 1, 3, 10, 17 under load: tokio tasks with timeouts and cancels on a small pool
/// whose reclaimers panic (in the call, the poll and the drop, now and then), lie, stay
/// pending for a while, free everything or nothing, and refill themselves; a thread
/// registers and drops reclaimers meanwhile. No task hangs, the stats never go down, and at
/// the end every byte is back and the whole budget is allocatable.
#[test]
#[cfg_attr(miri, ignore)]
fn stress_hostile_reclaimers_with_tasks_timeouts_and_registrations() {
    watchdog(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pool = Arc::new(BufPool::new(cfg(16)));
        let counter = Arc::new(AtomicUsize::new(0));
        let make = |kind: usize| {
            let counter = Arc::clone(&counter);
            Hostile::new(Vec::new(), move |h, target| {
                let n = counter.fetch_add(1, SeqCst);
                match (kind + n) % 7 {
                    0 if n % 5 == 0 => panic!("hostile reclaim"),
                    1 => Box::pin(async move { target * 2 }),
                    2 => {
                        let freed = h.free_up_to(target);
                        Box::pin(async move {
                            tokio::time::sleep(Duration::from_micros(200)).await;
                            if n % 11 == 0 {
                                panic!("hostile poll");
                            }
                            freed
                        })
                    }
                    3 => {
                        h.cache.lock().unwrap().clear();
                        Box::pin(async { 0 })
                    }
                    4 => {
                        struct PanicOnDrop(bool);
                        impl Drop for PanicOnDrop {
                            fn drop(&mut self) {
                                if self.0 && !std::thread::panicking() {
                                    panic!("hostile drop");
                                }
                            }
                        }
                        let guard = PanicOnDrop(n % 13 == 0);
                        let freed = h.free_up_to(target);
                        Box::pin(async move {
                            tokio::time::sleep(Duration::from_micros(100)).await;
                            drop(guard);
                            freed
                        })
                    }
                    _ => {
                        let freed = h.free_up_to(target);
                        Box::pin(async move { freed })
                    }
                }
            })
        };
        let caches: Vec<_> = (0..3).map(&make).collect();
        let handles: Vec<_> = caches
            .iter()
            .enumerate()
            .map(|(i, c)| {
                pool.register_reclaimer(format!("c{i}"), u32::try_from(i).unwrap(), c.clone())
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let pool = Arc::clone(&pool);
            let stop = Arc::clone(&stop);
            let extra = make(5);
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let h = pool.register_reclaimer("churn", 1, extra.clone());
                    std::thread::sleep(Duration::from_micros(300));
                    drop(h);
                }
                extra.clear();
            })
        };
        let iterations = 300;
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..6usize {
                let pool = Arc::clone(&pool);
                let cache = caches[t % 3].clone();
                tasks.push(tokio::spawn(async move {
                    let mut last = (0, 0, 0);
                    for i in 0..iterations {
                        let n = 1 + (t + i) % 4;
                        let fut = std::panic::AssertUnwindSafe(async {
                            tokio::time::timeout(Duration::from_millis(5), pool.allocate(n)).await
                        });
                        let result = futures::FutureExt::catch_unwind(fut).await;
                        if let Ok(Ok(Ok(a))) = result {
                            // Half go into the cache (refill), half are dropped.
                            if i % 2 == 0 {
                                cache.cache.lock().unwrap().push(a);
                            }
                        }
                        let s = pool.stats();
                        let now = (s.reclaim_rounds, s.reclaim_asked_bytes, s.reclaimed_bytes);
                        assert!(now.0 >= last.0 && now.1 >= last.1 && now.2 >= last.2);
                        assert!(s.in_use_bytes <= 16 * B + s.overcommit_bytes);
                        last = now;
                    }
                }));
            }
            for task in tasks {
                tokio::time::timeout(Duration::from_secs(15), task)
                    .await
                    .expect("a task hung")
                    .unwrap();
            }
        });
        stop.store(true, SeqCst);
        churn.join().unwrap();
        drop(rt);
        for cache in &caches {
            cache.clear();
        }
        drop(handles);
        assert_drained(&pool, 16);
    });
}

// ---------------------------------------------------------------------------------------
// reclaim_ahead
// ---------------------------------------------------------------------------------------

/// "Lifetimes": dropping the pool drops its registrations before the barrier waits, so a
/// cache whose only owner is its registration gives its allocations back. Here a
/// `reclaim_ahead` task drives a round on that cache whose future is pending: the pool's
/// drop must still complete (the round is ended by the close, or at least does not keep the
/// cache alive for good).
#[test]
fn dropping_the_pool_while_reclaim_ahead_drives_a_pending_round() {
    watchdog(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let pool = BufPool::new(cfg(8));
        let gate = Gate::default();
        let cache = Hostile::new(entries(&pool, 8), gated(&gate, false));
        // The registration is the cache's only owner.
        let handle = pool.register_reclaimer("gated", 0, cache);
        let ahead = rt.spawn(pool.reclaim_ahead(2 * B));
        while gate.polls.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        let (done, wait) = std::sync::mpsc::channel();
        let dropper = std::thread::spawn(move || {
            drop(pool);
            let _ = done.send(());
        });
        let finished = wait.recv_timeout(Duration::from_secs(3)).is_ok();
        // Unstick it either way, so the test ends.
        gate.open();
        dropper.join().unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), ahead)
                .await
                .expect("reclaim_ahead resolves once the pool is closed")
                .unwrap();
        });
        drop(handle);
        assert!(
            finished,
            "the pool's drop waited for reclaim_ahead's pending round"
        );
    });
}

/// `ReclaimAhead`'s cancel safety ("Dropping it ends a round it drives; nothing else is
/// lost") with a hostile future whose drop panics: the panic goes on from the drop, the
/// round is over (counted, future dropped, the bytes it held back), and a waiter can start
/// the next round at once.
#[test]
fn dropping_reclaim_ahead_mid_round_with_a_panicking_future_drop() {
    watchdog(|| {
        let pool = BufPool::new(cfg(8));
        let gate = Gate::default();
        let cache = Hostile::new(entries(&pool, 8), gated(&gate, true));
        let _h = pool.register_reclaimer("gated", 0, cache.clone());
        let mut ahead = Box::pin(pool.reclaim_ahead(2 * B));
        assert!(poll_once(ahead.as_mut()).is_pending());
        assert_eq!(cache.asked(), [2 * B]);
        // A waiter meanwhile starts no round of its own: one in flight per pool.
        let mut waiter = Box::pin(pool.allocate(3));
        assert!(poll_once(waiter.as_mut()).is_pending());
        assert_eq!(cache.asked().len(), 1);
        let caught = catch_unwind(AssertUnwindSafe(|| drop(ahead)));
        assert!(
            caught.is_err(),
            "the future's drop panic goes on from the drop"
        );
        assert_eq!(gate.dropped.load(SeqCst), 1);
        // The 2 entries the dropped future held went back: the waiter needs 1 more.
        let stats = pool.stats();
        assert_eq!(
            (stats.reclaim_rounds, stats.in_use_bytes),
            (1, 6 * B),
            "{stats:?}"
        );
        gate.open();
        let got = futures::executor::block_on(waiter.as_mut()).unwrap();
        assert_eq!(cache.asked(), [2 * B, B]);
        assert_eq!(pool.stats().reclaim_rounds, 2);
        drop(got);
        drop(waiter);
        cache.clear();
        assert_drained(&pool, 8);
    });
}

/// "No storm" for `reclaim_ahead`: a reclaimer that reports what it was asked without
/// freeing anything is asked once, then `reclaim_ahead` sleeps until the pool changes.
#[test]
fn reclaim_ahead_with_a_liar_causes_no_storm() {
    watchdog(|| {
        let pool = BufPool::new(cfg(4));
        let held = entries(&pool, 4);
        let liar = Hostile::new(Vec::new(), |_, target| Box::pin(async move { target }));
        let _h = pool.register_reclaimer("liar", 0, liar.clone());
        let mut ahead = Box::pin(pool.reclaim_ahead(2 * B));
        for _ in 0..50 {
            assert!(poll_once(ahead.as_mut()).is_pending());
        }
        assert_eq!(liar.asked().len(), 1, "one round, then asleep");
        let rounds = pool.stats().reclaim_rounds;
        assert_eq!(rounds, 1);
        drop(ahead);
        assert_eq!(pool.stats().reclaim_rounds, rounds, "never goes down");
        drop(held);
        assert_drained(&pool, 4);
    });
}

// ---------------------------------------------------------------------------------------
// Rounds at another level than the queue the driver waits in
// ---------------------------------------------------------------------------------------

/// Guarantee 17 ("a cancelled driver's round is ended before any other starts") and 8
/// (closing a pool closes its descendants, wherever their waiters wait): a child's request
/// that waits in the root's queue drives the root's round (parked at the root); closing the
/// child fails it and ends that round at the root (future dropped), so a root waiter starts
/// the next one.
#[test]
fn closing_a_child_whose_request_drives_the_roots_round_ends_that_round() {
    watchdog(|| {
        let root = BufPool::new(cfg(4));
        let child = root.child("child", cfg(4)).unwrap();
        let gate = Gate::default();
        let cache = Hostile::new(entries(&root, 4), gated(&gate, false));
        let _h = root.register_reclaimer("gated", 0, cache.clone());
        let mut driver = Box::pin(child.allocate(2));
        assert!(poll_once(driver.as_mut()).is_pending());
        assert_eq!(cache.asked(), [2 * B]);
        let mut root_waiter = Box::pin(root.allocate(3));
        assert!(poll_once(root_waiter.as_mut()).is_pending());
        assert_eq!(cache.asked().len(), 1, "one round in flight at the root");
        child.close();
        assert!(matches!(
            poll_once(driver.as_mut()),
            Poll::Ready(Err(AllocError::Closed))
        ));
        drop(driver);
        assert_eq!(gate.dropped.load(SeqCst), 1);
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_eq!(child.stats().reclaim_rounds, 0);
        // The round is over: the root's waiter (now the head, 2 free of the 3 it needs)
        // starts the next one.
        gate.open();
        let got = futures::executor::block_on(root_waiter.as_mut()).unwrap();
        assert_eq!(cache.asked(), [2 * B, B]);
        assert_eq!(root.stats().reclaim_rounds, 2);
        drop(got);
        drop(root_waiter);
        cache.clear();
        // The child is closed (nothing to allocate there): its books are empty.
        let c = child.stats();
        assert_eq!(
            (c.in_use_bytes, c.outstanding, c.waiting),
            (0, 0, 0),
            "{c:?}"
        );
        assert_drained(&root, 4);
    });
}

/// "Who drives it" / guarantee 17: a child's request that started a round at its own level
/// and then climbs to the root's queue (a grow of the child) keeps driving that round (no
/// second round starts at the root while it does); once the round ends the request is
/// served, each level counts only its own round, and the books are exact.
#[test]
fn a_driver_that_climbs_keeps_driving_the_round_it_started_below() {
    watchdog(|| {
        let root = BufPool::new(cfg(4));
        let child = root.child("child", cfg(2)).unwrap();
        let gate = Gate::default();
        let cache = Hostile::new(entries(&child, 2), gated(&gate, false));
        let _h = child.register_reclaimer("gated", 0, cache.clone());
        let root_held = entries(&root, 2);
        let mut driver = Box::pin(child.allocate(2));
        assert!(poll_once(driver.as_mut()).is_pending());
        assert_eq!(cache.asked(), [2 * B]);
        assert_eq!(
            child.stats().reclaim_rounds,
            0,
            "in flight, not yet counted"
        );
        // The child grows: its own cap no longer holds the request back, the root is full.
        child.set_max_memory(4 * B).unwrap();
        for _ in 0..5 {
            assert!(poll_once(driver.as_mut()).is_pending());
        }
        assert_eq!(
            cache.asked().len(),
            1,
            "no second round while it drives one"
        );
        gate.open();
        let got = match poll_once(driver.as_mut()) {
            Poll::Ready(Ok(got)) => got,
            other => panic!("not served after its round freed 2: {other:?}"),
        };
        let (r, c) = (root.stats(), child.stats());
        assert_eq!(c.reclaim_rounds + r.reclaim_rounds, 1, "{r:?} {c:?}");
        assert_eq!(r.in_use_bytes, 4 * B);
        drop(got);
        drop(driver);
        drop(root_held);
        cache.clear();
        assert_drained(&child, 4);
        assert_drained(&root, 4);
    });
}
