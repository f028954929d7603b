//! Adversarial tests of `PollAllocate` and `AllocateOwned` (src/owned.rs): changing wakers,
//! polls after `Ready`, polls from several threads in turn, drops while queued and after a
//! grant, hostile wakers (panicking in `wake`, `clone` or `drop`, dropping the poller or the
//! pool from `wake`, polling from `wake`), and close / resize racing a poll, with the budget
//! checked at every quiescent point and the FIFO order asserted.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Wake, Waker};
use std::time::Duration;

use common::{assert_full_budget_back, assert_idle, rounds, wait_waiting, watchdog};
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate};

fn pool(buffers: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64 * buffers,
    }))
}

#[track_caller]
fn quiescent(pool: &BufPool, in_use_buffers: usize, waiting: usize) {
    let s = pool.stats();
    assert_eq!(
        (s.in_use_bytes, s.waiting),
        (in_use_buffers * s.buffer_size, waiting),
        "{s}"
    );
}

fn noop() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

#[track_caller]
fn ready(poll: Poll<Result<BufPoolAllocation, AllocError>>) -> BufPoolAllocation {
    match poll {
        Poll::Ready(Ok(allocation)) => allocation,
        other => panic!("expected an allocation, got {other:?}"),
    }
}

/// Silences the default hook's output for the panics these tests provoke on purpose.
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

// ---- wakers ----

#[derive(Default)]
struct Counter {
    woken: AtomicUsize,
}

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.woken.fetch_add(1, SeqCst);
    }
}

fn counting() -> (Arc<Counter>, Waker) {
    let counter = Arc::new(Counter::default());
    (Arc::clone(&counter), Waker::from(counter))
}

/// A waker whose `clone`, `wake` or `drop` panics once when armed (never while unwinding),
/// and which can run a hook on wake.
struct Hostile {
    panic_clone: AtomicBool,
    panic_wake: AtomicBool,
    panic_drop: AtomicBool,
    woken: AtomicUsize,
    live: AtomicUsize,
    on_wake: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Hostile {
    fn new() -> Arc<Self> {
        Arc::new(Hostile {
            panic_clone: AtomicBool::new(false),
            panic_wake: AtomicBool::new(false),
            panic_drop: AtomicBool::new(false),
            woken: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            on_wake: Mutex::new(None),
        })
    }

    fn waker(self: &Arc<Self>) -> Waker {
        self.live.fetch_add(1, SeqCst);
        let raw = RawWaker::new(Arc::into_raw(Arc::clone(self)).cast(), &VTABLE);
        // SAFETY: the vtable below upholds RawWaker's contract for an `Arc<Hostile>`.
        unsafe { Waker::from_raw(raw) }
    }

    fn woken(&self) -> usize {
        self.woken.load(SeqCst)
    }

    fn fire(&self) {
        self.woken.fetch_add(1, SeqCst);
        let hook = self.on_wake.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        if self.panic_wake.swap(false, SeqCst) && !std::thread::panicking() {
            panic!("hostile wake");
        }
    }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(h_clone, h_wake, h_wake_by_ref, h_drop);

unsafe fn h_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is an `Arc<Hostile>` kept alive by the waker being cloned.
    let this = unsafe { &*data.cast::<Hostile>() };
    if this.panic_clone.swap(false, SeqCst) && !std::thread::panicking() {
        panic!("hostile clone");
    }
    unsafe { Arc::increment_strong_count(data.cast::<Hostile>()) };
    this.live.fetch_add(1, SeqCst);
    RawWaker::new(data, &VTABLE)
}

unsafe fn h_wake(data: *const ()) {
    // SAFETY: consumes the waker's `Arc`, dropped at the end even if `fire` panics.
    let guard = DropGuard(unsafe { Arc::from_raw(data.cast::<Hostile>()) });
    guard.0.fire();
    drop(guard);
}

struct DropGuard(Arc<Hostile>);
impl Drop for DropGuard {
    fn drop(&mut self) {
        // The consumed waker's drop (its `Arc` goes with the guard), without its panic.
        self.0.live.fetch_sub(1, SeqCst);
    }
}

unsafe fn h_wake_by_ref(data: *const ()) {
    // SAFETY: borrowed.
    let this = unsafe { &*data.cast::<Hostile>() };
    this.fire();
}

unsafe fn h_drop(data: *const ()) {
    // SAFETY: the waker's own `Arc`.
    let this = unsafe { Arc::from_raw(data.cast::<Hostile>()) };
    this.live.fetch_sub(1, SeqCst);
    let armed = this.panic_drop.swap(false, SeqCst);
    drop(this);
    if armed && !std::thread::panicking() {
        panic!("hostile drop");
    }
}

// ---- changing wakers, polls after Ready ----

#[test]
fn changing_wakers_keep_the_place_and_only_the_last_is_woken() {
    watchdog(10, || {
        let pool = pool(4);
        let held = pool.try_allocate(4).unwrap();
        let mut first = PollAllocate::new(Arc::clone(&pool));
        let mut behind = PollAllocate::new(Arc::clone(&pool));
        let wakers: Vec<_> = (0..5).map(|_| counting()).collect();
        for (_, waker) in &wakers {
            assert!(
                first
                    .poll_allocate(&mut Context::from_waker(waker), 2)
                    .is_pending()
            );
            quiescent(&pool, 4, 1);
        }
        assert!(behind.poll_allocate(&mut noop(), 2).is_pending());
        quiescent(&pool, 4, 2);
        // The same waker again (will_wake): still one place.
        assert!(
            first
                .poll_allocate(&mut Context::from_waker(&wakers[4].1), 2)
                .is_pending()
        );
        drop(held);
        let counts: Vec<_> = wakers.iter().map(|(c, _)| c.woken.load(SeqCst)).collect();
        assert_eq!(counts, [0, 0, 0, 0, 1], "only the last waker is woken");
        // Every replaced waker was dropped: only ours are left.
        for (counter, _) in &wakers[..4] {
            assert_eq!(Arc::strong_count(counter), 2, "a replaced waker leaked");
        }
        let a = ready(first.poll_allocate(&mut noop(), 2));
        let b = ready(behind.poll_allocate(&mut noop(), 2));
        quiescent(&pool, 4, 0);
        drop((a, b));
        assert_idle(&pool);
    });
}

#[test]
fn poll_after_ready_queues_anew_at_the_tail() {
    watchdog(10, || {
        let pool = pool(2);
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mine = ready(poller.poll_allocate(&mut noop(), 1));
        let other = pool.try_allocate(1).unwrap();
        // Full: a newer waiter queues first, then the poller polls again after its Ready.
        let mut newer = Box::pin(pool.allocate(1));
        assert!(newer.as_mut().poll(&mut noop()).is_pending());
        assert!(poller.poll_allocate(&mut noop(), 1).is_pending());
        quiescent(&pool, 2, 2);
        drop(mine); // one buffer free: FIFO gives it to `newer`
        assert!(poller.poll_allocate(&mut noop(), 1).is_pending());
        let n = match newer.as_mut().poll(&mut noop()) {
            Poll::Ready(Ok(a)) => a,
            other => panic!("FIFO broken: {other:?}"),
        };
        drop(other);
        let again = ready(poller.poll_allocate(&mut noop(), 1));
        quiescent(&pool, 2, 0);
        // Ready, then an error, then Ready again on the same poller.
        drop((n, again));
        assert_eq!(
            poller.poll_allocate(&mut noop(), 0).map(|r| r.map(|_| ())),
            Poll::Ready(Err(AllocError::ZeroBuffers))
        );
        assert!(matches!(
            poller.poll_allocate(&mut noop(), 3),
            Poll::Ready(Err(AllocError::ExceedsBudget { .. }))
        ));
        let last = ready(poller.poll_allocate(&mut noop(), 2));
        drop(last);
        drop(poller);
        assert_full_budget_back(&pool);
    });
}

#[test]
fn polled_from_several_threads_in_turn_keeps_its_place_and_fifo() {
    watchdog(20, || {
        let pool = pool(4);
        let first_half = pool.try_allocate(2).unwrap();
        let second_half = pool.try_allocate(2).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        // Polled first on this thread: it is first in line.
        assert!(poller.poll_allocate(&mut noop(), 2).is_pending());
        // A blocking waiter behind it.
        let blocked = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(2).map(|a| a.length()))
        };
        wait_waiting(&pool, 2);
        // Polled in turn on other threads, each with its own waker.
        for _ in 0..4 {
            poller = std::thread::spawn(move || {
                let (_counter, waker) = counting();
                assert!(
                    poller
                        .poll_allocate(&mut Context::from_waker(&waker), 2)
                        .is_pending()
                );
                poller
            })
            .join()
            .unwrap();
            quiescent(&pool, 4, 2);
        }
        let (counter, waker) = counting();
        assert!(
            poller
                .poll_allocate(&mut Context::from_waker(&waker), 2)
                .is_pending()
        );
        // Two buffers free: the poller (first) is granted them; the blocking thread waits.
        drop(first_half);
        assert_eq!(counter.woken.load(SeqCst), 1);
        quiescent(&pool, 4, 1);
        assert!(!blocked.is_finished());
        // Taken on yet another thread.
        let (poller, got) = std::thread::spawn(move || {
            let got = ready(poller.poll_allocate(&mut noop(), 2));
            (poller, got)
        })
        .join()
        .unwrap();
        drop(second_half);
        assert_eq!(blocked.join().unwrap(), Ok(2));
        drop(got);
        drop(poller);
        assert_idle(&pool);
    });
}

// ---- drops ----

#[test]
fn dropped_after_a_grant_before_taking_it_passes_the_grant_on_in_order() {
    watchdog(10, || {
        let pool = pool(4);
        let held = pool.try_allocate(4).unwrap();
        let mut granted = PollAllocate::new(Arc::clone(&pool));
        let mut next = PollAllocate::new(Arc::clone(&pool));
        let mut last = PollAllocate::new(Arc::clone(&pool));
        assert!(granted.poll_allocate(&mut noop(), 3).is_pending());
        assert!(next.poll_allocate(&mut noop(), 3).is_pending());
        assert!(last.poll_allocate(&mut noop(), 1).is_pending());
        drop(held); // grants `granted` 3 and `last` 1? No: FIFO, `next` (3) blocks `last`.
        quiescent(&pool, 3, 2);
        drop(granted); // its 3 go to `next`; `last` still waits behind nobody: 1 free.
        let b = ready(next.poll_allocate(&mut noop(), 3));
        let c = ready(last.poll_allocate(&mut noop(), 1));
        quiescent(&pool, 4, 0);
        drop((b, c, next, last));
        assert_full_budget_back(&pool);
    });
}

#[test]
fn clones_have_no_place_and_dropping_them_changes_nothing() {
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        assert!(poller.poll_allocate(&mut noop(), 1).is_pending());
        let clone = poller.clone();
        assert!(format!("{clone:?}").contains("None"), "{clone:?}");
        drop(clone);
        quiescent(&pool, 2, 1);
        let mut clone = poller.clone();
        assert!(clone.poll_allocate(&mut noop(), 1).is_pending());
        quiescent(&pool, 2, 2);
        drop(held);
        let a = ready(poller.poll_allocate(&mut noop(), 1));
        let b = ready(clone.poll_allocate(&mut noop(), 1));
        drop((a, b, poller, clone));
        assert_idle(&pool);
    });
}

// ---- hostile wakers ----

#[test]
fn a_waker_panicking_in_wake_costs_nothing_but_its_panic() {
    quiet();
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let hostile = Hostile::new();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut behind = PollAllocate::new(Arc::clone(&pool));
        assert!(
            poller
                .poll_allocate(&mut Context::from_waker(&hostile.waker()), 1)
                .is_pending()
        );
        assert!(behind.poll_allocate(&mut noop(), 1).is_pending());
        hostile.panic_wake.store(true, SeqCst);
        let released = catch_unwind(AssertUnwindSafe(|| drop(held)));
        assert!(released.is_err(), "the waker's panic is passed on");
        // Both were served regardless: the release settled before the waker ran.
        quiescent(&pool, 2, 0);
        let a = ready(poller.poll_allocate(&mut noop(), 1));
        let b = ready(behind.poll_allocate(&mut noop(), 1));
        drop((a, b, poller, behind));
        assert_full_budget_back(&pool);
        assert_eq!(hostile.live.load(SeqCst), 0, "a waker leaked");
    });
}

#[test]
fn a_waker_panicking_in_clone_on_the_first_wait_leaves_the_pool_consistent() {
    quiet();
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let hostile = Hostile::new();
        let waker = hostile.waker();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        hostile.panic_clone.store(true, SeqCst);
        let polled = catch_unwind(AssertUnwindSafe(|| {
            poller
                .poll_allocate(&mut Context::from_waker(&waker), 1)
                .is_pending()
        }));
        assert!(polled.is_err(), "the clone's panic is passed on");
        let s = pool.stats();
        assert_eq!(s.in_use_bytes, 128, "{s}");
        assert!(s.waiting <= 1, "{s}");
        // Polled again: a consistent place (kept or taken anew), served by the release.
        assert!(
            poller
                .poll_allocate(&mut Context::from_waker(&waker), 1)
                .is_pending()
        );
        quiescent(&pool, 2, 1);
        drop(held);
        assert_eq!(hostile.woken(), 1);
        let a = ready(poller.poll_allocate(&mut noop(), 1));
        drop((a, poller, waker));
        assert_full_budget_back(&pool);
        assert_eq!(hostile.live.load(SeqCst), 0, "a waker leaked");
    });
}

#[test]
fn a_waker_panicking_in_clone_then_the_poller_dropped_loses_nothing() {
    quiet();
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let hostile = Hostile::new();
        let waker = hostile.waker();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        assert!(poller.poll_allocate(&mut noop(), 1).is_pending());
        // A new waker whose clone panics on a later poll.
        hostile.panic_clone.store(true, SeqCst);
        let polled = catch_unwind(AssertUnwindSafe(|| {
            poller
                .poll_allocate(&mut Context::from_waker(&waker), 1)
                .is_pending()
        }));
        assert!(polled.is_err());
        quiescent(&pool, 2, 1);
        drop(poller);
        quiescent(&pool, 2, 0);
        drop((held, waker));
        assert_full_budget_back(&pool);
        assert_eq!(hostile.live.load(SeqCst), 0);
    });
}

#[test]
fn a_replaced_waker_panicking_in_drop_keeps_the_new_one_registered() {
    quiet();
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let old = Hostile::new();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        {
            let waker = old.waker();
            assert!(
                poller
                    .poll_allocate(&mut Context::from_waker(&waker), 1)
                    .is_pending()
            );
        }
        old.panic_drop.store(true, SeqCst);
        let (counter, new) = counting();
        let polled = catch_unwind(AssertUnwindSafe(|| {
            poller
                .poll_allocate(&mut Context::from_waker(&new), 1)
                .is_pending()
        }));
        assert!(polled.is_err(), "the old waker's drop panic is passed on");
        quiescent(&pool, 2, 1);
        drop(held);
        // The new waker was registered before the old one was dropped.
        assert_eq!(counter.woken.load(SeqCst), 1, "the new waker was not woken");
        assert_eq!(old.woken(), 0);
        let a = ready(poller.poll_allocate(&mut noop(), 1));
        drop((a, poller));
        assert_full_budget_back(&pool);
        assert_eq!(old.live.load(SeqCst), 0);
    });
}

#[test]
fn a_waker_panicking_in_drop_when_its_poller_is_dropped_loses_nothing() {
    quiet();
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let hostile = Hostile::new();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut behind = PollAllocate::new(Arc::clone(&pool));
        assert!(
            poller
                .poll_allocate(&mut Context::from_waker(&hostile.waker()), 2)
                .is_pending()
        );
        assert!(behind.poll_allocate(&mut noop(), 2).is_pending());
        hostile.panic_drop.store(true, SeqCst);
        let dropped = catch_unwind(AssertUnwindSafe(|| drop(poller)));
        assert!(dropped.is_err(), "the waker's drop panic is passed on");
        quiescent(&pool, 2, 1);
        drop(held);
        let b = ready(behind.poll_allocate(&mut noop(), 2));
        drop((b, behind));
        assert_full_budget_back(&pool);
        assert_eq!(hostile.live.load(SeqCst), 0);
    });
}

#[test]
fn a_waker_that_drops_its_own_poller_passes_the_grant_on() {
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let slot: Arc<Mutex<Option<PollAllocate>>> =
            Arc::new(Mutex::new(Some(PollAllocate::new(Arc::clone(&pool)))));
        let hostile = Hostile::new();
        {
            let slot = Arc::clone(&slot);
            *hostile.on_wake.lock().unwrap() = Some(Box::new(move || {
                drop(slot.lock().unwrap().take());
            }));
        }
        let waker = hostile.waker();
        assert!(
            slot.lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .poll_allocate(&mut Context::from_waker(&waker), 2)
                .is_pending()
        );
        let mut behind = PollAllocate::new(Arc::clone(&pool));
        assert!(behind.poll_allocate(&mut noop(), 1).is_pending());
        drop(held); // grants the poller, whose waker drops it: the grant goes to `behind`
        assert!(slot.lock().unwrap().is_none());
        quiescent(&pool, 1, 0);
        let b = ready(behind.poll_allocate(&mut noop(), 1));
        drop((b, behind, waker));
        assert_full_budget_back(&pool);
    });
}

#[test]
fn a_waker_that_drops_the_pools_last_handle_with_the_poller() {
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let weak = Arc::downgrade(&pool);
        let slot: Arc<Mutex<Option<PollAllocate>>> =
            Arc::new(Mutex::new(Some(PollAllocate::new(pool))));
        let hostile = Hostile::new();
        {
            let slot = Arc::clone(&slot);
            *hostile.on_wake.lock().unwrap() = Some(Box::new(move || {
                // The poller holds the pool's last handle: the pool's drop runs here.
                drop(slot.lock().unwrap().take());
            }));
        }
        let waker = hostile.waker();
        assert!(
            slot.lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .poll_allocate(&mut Context::from_waker(&waker), 1)
                .is_pending()
        );
        // `held` keeps no handle (not owned); its release wakes the poller's waker, which
        // drops the pool. The release must be done with the pool by then.
        drop(held);
        assert!(
            weak.upgrade().is_none(),
            "the pool outlived its last handle"
        );
        drop(waker);
        assert_eq!(hostile.live.load(SeqCst), 0);
    });
}

#[test]
fn a_waker_that_polls_its_own_poller_takes_the_allocation() {
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let slot: Arc<Mutex<Option<PollAllocate>>> =
            Arc::new(Mutex::new(Some(PollAllocate::new(Arc::clone(&pool)))));
        let got: Arc<Mutex<Option<BufPoolAllocation>>> = Arc::new(Mutex::new(None));
        let hostile = Hostile::new();
        {
            let slot = Arc::clone(&slot);
            let got = Arc::clone(&got);
            let pool = Arc::clone(&pool);
            *hostile.on_wake.lock().unwrap() = Some(Box::new(move || {
                let mut slot = slot.lock().unwrap();
                let poller = slot.as_mut().unwrap();
                *got.lock().unwrap() = Some(ready(poller.poll_allocate(&mut noop(), 2)));
                // And re-enters the pool while at it.
                assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
                let _ = pool.stats();
            }));
        }
        let waker = hostile.waker();
        assert!(
            slot.lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .poll_allocate(&mut Context::from_waker(&waker), 2)
                .is_pending()
        );
        drop(held);
        assert!(got.lock().unwrap().is_some());
        quiescent(&pool, 2, 0);
        drop(got.lock().unwrap().take());
        drop(slot.lock().unwrap().take());
        drop(waker);
        assert_full_budget_back(&pool);
    });
}

// ---- close and resizes racing polls ----

#[test]
#[cfg_attr(miri, ignore)]
fn close_racing_a_poll_loop_ends_it_with_closed_and_loses_nothing() {
    watchdog(30, || {
        for round in 0..rounds(60, 3) {
            let pool = pool(2);
            let held = pool.try_allocate(2).unwrap();
            let poller = PollAllocate::new(Arc::clone(&pool));
            let polling = std::thread::spawn(move || {
                let mut poller = poller;
                let (_counter, waker) = counting();
                loop {
                    match poller.poll_allocate(&mut Context::from_waker(&waker), 1) {
                        Poll::Pending => std::thread::yield_now(),
                        Poll::Ready(result) => return result.map(|a| a.length()),
                    }
                }
            });
            if round % 2 == 0 {
                std::thread::yield_now();
            }
            pool.close();
            assert_eq!(
                polling.join().unwrap(),
                Err(AllocError::Closed),
                "round {round}"
            );
            quiescent(&pool, 2, 0);
            drop(held);
            assert_idle(&pool);
        }
    });
}

#[test]
#[cfg_attr(miri, ignore)]
fn resizes_racing_a_poll_loop_end_it_exactly() {
    watchdog(30, || {
        for round in 0..rounds(100, 3) {
            let pool = pool(4);
            let held = pool.try_allocate(4).unwrap();
            let poller = PollAllocate::new(Arc::clone(&pool));
            let polling = std::thread::spawn(move || {
                let mut poller = poller;
                let (_counter, waker) = counting();
                loop {
                    match poller.poll_allocate(&mut Context::from_waker(&waker), 3) {
                        Poll::Pending => std::thread::yield_now(),
                        Poll::Ready(result) => return result,
                    }
                }
            });
            if round % 3 == 0 {
                std::thread::yield_now();
            }
            // Shrink below the request (fails it), or grow (serves it).
            let shrink = round % 2 == 0;
            if shrink {
                pool.set_max_memory(2 * 64).unwrap();
            } else {
                pool.set_max_memory(7 * 64).unwrap();
            }
            let result = polling.join().unwrap();
            match (&result, shrink) {
                (Err(AllocError::ExceedsBudget { max_memory, .. }), true) => {
                    assert_eq!(*max_memory, 128)
                }
                (Ok(a), false) => assert_eq!(a.length(), 3),
                other => panic!("round {round}: {other:?}"),
            }
            let expect = if shrink { 4 } else { 7 };
            quiescent(&pool, expect, 0);
            drop((held, result));
            assert_idle(&pool);
        }
    });
}

#[test]
#[cfg_attr(miri, ignore)]
fn poll_allocate_stress_against_blocking_and_async_waiters_returns_to_zero() {
    watchdog(30, || {
        let pool = pool(8);
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let mut rng = common::Rng::new(t + 3);
                    let mut poller = PollAllocate::new(Arc::clone(&pool));
                    let (_counter, waker) = counting();
                    for _ in 0..300 {
                        let n = rng.range(1, 4);
                        match rng.range(0, 3) {
                            0 => {
                                // Poll a few times, maybe change n, maybe give up.
                                for _ in 0..rng.range(1, 4) {
                                    let n = if rng.range(0, 3) == 0 {
                                        rng.range(1, 4)
                                    } else {
                                        n
                                    };
                                    if let Poll::Ready(r) =
                                        poller.poll_allocate(&mut Context::from_waker(&waker), n)
                                    {
                                        drop(r.unwrap());
                                        break;
                                    }
                                }
                                if rng.range(0, 2) == 0 {
                                    poller = poller.clone(); // old one dropped, maybe queued
                                }
                            }
                            1 => drop(pool.allocate_timeout(n, Duration::from_micros(200))),
                            2 => {
                                let owned = Box::pin(Arc::clone(&pool).allocate_owned(n));
                                let mut owned = owned;
                                let _ = owned.as_mut().poll(&mut Context::from_waker(&waker));
                            }
                            _ => drop(pool.try_allocate(n)),
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_idle(&pool);
        assert_full_budget_back(&pool);
    });
}

// ---- child pools ----

#[test]
fn a_child_pollers_changed_n_while_waiting_above_gives_back_every_level() {
    watchdog(10, || {
        let root = pool(4);
        let child = Arc::new(
            root.child(
                "c",
                BufPoolCfg {
                    buffer_size: BufferSize::S64,
                    max_memory: 4 * 64,
                },
            )
            .unwrap(),
        );
        let held = root.try_allocate(3).unwrap(); // root has 1 free
        let mut poller = PollAllocate::new(Arc::clone(&child));
        assert!(poller.poll_allocate(&mut noop(), 2).is_pending()); // held in child, waits at root
        assert_eq!(child.stats().in_use_bytes, 128);
        assert_eq!(root.stats().waiting, 1);
        // A different n: every level given back, queued anew.
        assert!(poller.poll_allocate(&mut noop(), 3).is_pending());
        assert_eq!(root.stats().waiting, 1);
        assert!(child.stats().in_use_bytes <= 192);
        drop(poller);
        assert_eq!(child.stats().in_use_bytes, 0);
        assert_eq!(root.stats().in_use_bytes, 192);
        assert_eq!(root.stats().waiting, 0);
        drop(held);
        assert_idle(&child);
        assert_idle(&root);
        assert_full_budget_back(&root);
    });
}

// ---- AllocateOwned ----

#[test]
fn allocate_owned_polled_after_ready_panics_without_touching_the_budget() {
    quiet();
    watchdog(10, || {
        let pool = pool(2);
        let mut owned = Box::pin(Arc::clone(&pool).allocate_owned(1));
        let Poll::Ready(Ok(a)) = owned.as_mut().poll(&mut noop()) else {
            panic!()
        };
        let again = catch_unwind(AssertUnwindSafe(|| {
            owned
                .as_mut()
                .poll(&mut noop())
                .map(|r| r.map(|a| a.length()))
        }));
        // Either a panic (allowed by the Future contract) or an error; never a second
        // allocation nor lost budget.
        if let Ok(poll) = &again {
            assert!(
                !matches!(poll, Poll::Ready(Ok(_))),
                "a second allocation: {poll:?}"
            );
        }
        quiescent(&pool, 1, 0);
        drop(owned);
        drop(a);
        assert_full_budget_back(&pool);
    });
}

#[test]
fn allocate_owned_with_changing_wakers_and_drop_after_grant_with_recycling() {
    watchdog(10, || {
        let pool = Arc::new(
            BufPool::builder(BufPoolCfg {
                buffer_size: BufferSize::S64,
                max_memory: 4 * 64,
            })
            .recycle(2)
            .recycle_min_bytes(0)
            .build()
            .unwrap(),
        );
        let held = pool.try_allocate(4).unwrap();
        let mut granted = Box::pin(Arc::clone(&pool).allocate_zeroed_owned(4));
        let mut next = Box::pin(Arc::clone(&pool).allocate_zeroed_owned(4));
        let wakers: Vec<_> = (0..3).map(|_| counting()).collect();
        for (_, waker) in &wakers {
            assert!(
                granted
                    .as_mut()
                    .poll(&mut Context::from_waker(waker))
                    .is_pending()
            );
        }
        assert!(next.as_mut().poll(&mut noop()).is_pending());
        quiescent(&pool, 4, 2);
        drop(held); // handed to `granted` (same size), which is dropped untaken
        assert_eq!(wakers[2].0.woken.load(SeqCst), 1);
        assert_eq!(
            wakers[0].0.woken.load(SeqCst) + wakers[1].0.woken.load(SeqCst),
            0
        );
        drop(granted);
        let Poll::Ready(Ok(b)) = next.as_mut().poll(&mut noop()) else {
            panic!("the grant was not passed on")
        };
        let mut filled = b.into_filled();
        assert!(filled.set_filled(filled.capacity()));
        assert!(filled.filled().iter().all(|&x| x == 0));
        quiescent(&pool, 4, 0);
        drop(filled);
        let s = pool.stats();
        assert!(s.cached_bytes + s.in_use_bytes <= s.max_memory, "{s}");
        assert_idle(&pool);
    });
}

#[test]
fn allocate_owned_tasks_aborted_at_random_lose_nothing() {
    watchdog(20, || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pool = pool(4);
            for round in 0..rounds(40, 2) {
                let held = pool.try_allocate(4).unwrap();
                let tasks: Vec<_> = (0..6)
                    .map(|i| tokio::spawn(Arc::clone(&pool).allocate_owned(1 + i % 3)))
                    .collect();
                tokio::task::yield_now().await;
                for (i, task) in tasks.iter().enumerate() {
                    if (i + round) % 2 == 0 {
                        task.abort();
                    }
                }
                drop(held);
                // Awaited together: a task served out of order (FIFO only orders those
                // queued) must not be kept waiting behind one that waits for its bytes.
                futures::future::join_all(tasks.into_iter().map(|task| async move {
                    if let Ok(result) = task.await {
                        drop(result.unwrap());
                    }
                }))
                .await;
                assert_idle(&pool);
            }
            assert_full_budget_back(&pool);
        });
    });
}

#[test]
fn a_queued_poller_asked_for_bad_input_gives_its_place_and_grant_up() {
    watchdog(10, || {
        let pool = pool(4);
        let held = pool.try_allocate(4).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut behind = PollAllocate::new(Arc::clone(&pool));
        assert!(poller.poll_allocate(&mut noop(), 2).is_pending());
        assert!(behind.poll_allocate(&mut noop(), 4).is_pending());
        // n = 0 while queued: ZeroBuffers, its place given up.
        assert!(matches!(
            poller.poll_allocate(&mut noop(), 0),
            Poll::Ready(Err(AllocError::ZeroBuffers))
        ));
        quiescent(&pool, 4, 1);
        assert!(poller.poll_allocate(&mut noop(), 2).is_pending()); // at the tail now
        quiescent(&pool, 4, 2);
        // Above the budget while queued: ExceedsBudget, its place given up.
        assert!(matches!(
            poller.poll_allocate(&mut noop(), 5),
            Poll::Ready(Err(AllocError::ExceedsBudget { .. }))
        ));
        quiescent(&pool, 4, 1);
        assert!(poller.poll_allocate(&mut noop(), 1).is_pending());
        drop(held); // `behind` (4) first, in order
        quiescent(&pool, 4, 1);
        let b = ready(behind.poll_allocate(&mut noop(), 4));
        assert!(poller.poll_allocate(&mut noop(), 1).is_pending());
        drop(b);
        // Granted, then asked for bad input before taking it: the grant goes back.
        assert!(matches!(
            poller.poll_allocate(&mut noop(), usize::MAX),
            Poll::Ready(Err(AllocError::ExceedsBudget { .. }))
        ));
        quiescent(&pool, 0, 0);
        drop(poller);
        drop(behind);
        assert_full_budget_back(&pool);
    });
}

#[test]
fn close_after_a_grant_before_the_poller_takes_it() {
    watchdog(10, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let mut granted = PollAllocate::new(Arc::clone(&pool));
        let mut failed = PollAllocate::new(Arc::clone(&pool));
        assert!(granted.poll_allocate(&mut noop(), 1).is_pending());
        assert!(failed.poll_allocate(&mut noop(), 2).is_pending());
        drop(held); // grants `granted`; `failed` (2) waits for the other buffer
        pool.close();
        // A grant made before the close is taken; the waiter still queued fails.
        let a = ready(granted.poll_allocate(&mut noop(), 1));
        assert!(matches!(
            failed.poll_allocate(&mut noop(), 2),
            Poll::Ready(Err(AllocError::Closed))
        ));
        assert!(matches!(
            granted.poll_allocate(&mut noop(), 1),
            Poll::Ready(Err(AllocError::Closed))
        ));
        quiescent(&pool, 1, 0);
        drop(a);
        assert_idle(&pool);
        drop((granted, failed));
        assert!(Arc::try_unwrap(pool).is_ok(), "the last handle"); // dropped: nothing out
    });
}
