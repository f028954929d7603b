//! Reclaimers whose rounds change the pool they reclaim for (session 30, helper s30d): a
//! reclaimer that registers another reclaimer, or resizes its pool, every time it is asked,
//! and frees nothing. Guarantee 17 says reclaimers' registrations "hang nothing", and the
//! "No storm" rule says a round that freed nothing is not repeated until the pool changes.
//! Here the round itself changes the pool: each poll of the driver must still return.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use common::watchdog;
use membudget::{BufPool, BufPoolCfg, BufferSize, Reclaimer, ReclaimerHandle};

const BS: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * BS,
    }
}

struct Empty;
impl Reclaimer for Empty {
    fn estimate(&self) -> usize {
        0
    }
    fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        Box::pin(async { 0 })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Registers another (empty) reclaimer and keeps it registered.
    Registers,
    /// Sets the budget to what it already is.
    SameBudget,
}

/// Frees nothing; every `reclaim` changes the pool as `change` says.
struct Changer {
    change: Change,
    pool: Weak<BufPool>,
    asked: AtomicUsize,
    registered: Mutex<Vec<ReclaimerHandle>>,
}

impl Reclaimer for Changer {
    fn estimate(&self) -> usize {
        BS
    }
    fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let asked = self.asked.fetch_add(1, SeqCst);
        if let Some(pool) = self.pool.upgrade() {
            // Bounded, so that a storm ends and the test can report it.
            if asked < 10_000 {
                match self.change {
                    Change::Registers => {
                        let h = pool.register_reclaimer("helper", 9, Arc::new(Empty));
                        self.registered.lock().unwrap().push(h);
                    }
                    Change::SameBudget => {
                        let max = pool.stats().max_memory;
                        let _ = pool.set_max_memory(max);
                    }
                }
            }
        }
        Box::pin(async { 0 })
    }
}

fn setup(
    change: Change,
) -> (
    Arc<BufPool>,
    Arc<Changer>,
    ReclaimerHandle,
    membudget::BufPoolAllocation,
) {
    let pool = Arc::new(BufPool::new(cfg(4)));
    let changer = Arc::new(Changer {
        change,
        pool: Arc::downgrade(&pool),
        asked: AtomicUsize::new(0),
        registered: Mutex::new(Vec::new()),
    });
    let handle = pool.register_reclaimer("changer", 0, Arc::clone(&changer) as Arc<dyn Reclaimer>);
    let full = pool.try_allocate(4).unwrap();
    (pool, changer, handle, full)
}

fn cleanup(pool: Arc<BufPool>, changer: Arc<Changer>, handle: ReclaimerHandle) {
    drop(handle);
    drop(std::mem::take(&mut *changer.registered.lock().unwrap()));
    let s = pool.stats();
    assert_eq!((s.in_use_bytes, s.waiting), (0, 0), "{s}");
    assert!(pool.report().reclaimers.is_empty());
    drop(pool);
}

/// One poll of `reclaim_ahead` on a full pool whose only reclaimer frees nothing but
/// changes the pool each time it is asked.
fn ahead_case(change: Change) {
    let (pool, changer, handle, full) = setup(change);
    let mut ahead = Box::pin(pool.reclaim_ahead(2 * BS));
    let cx = &mut Context::from_waker(Waker::noop());
    assert!(ahead.as_mut().poll(cx).is_pending());
    let asked = changer.asked.load(SeqCst);
    // BUG: (guarantee 17, "hang nothing") each round's own change counts as news, so the
    // next round started inside the same poll, forever (bounded here by the reclaimer):
    // the poll never returned. Fixed in src/reclaim.rs (one round ends per poll).
    assert!(
        asked <= 3,
        "{change:?}: one poll of reclaim_ahead asked a reclaimer that frees nothing {asked} times \
         (rounds: {})",
        pool.stats().reclaim_rounds
    );
    drop(ahead);
    drop(full);
    cleanup(pool, changer, handle);
}

/// The same with a waiting request as the driver: each poll must return, and rounds must not
/// repeat without end.
fn waiter_case(change: Change) {
    let (pool, changer, handle, full) = setup(change);
    let mut request = Box::pin(pool.allocate(2));
    let cx = &mut Context::from_waker(Waker::noop());
    for _ in 0..3 {
        assert!(request.as_mut().poll(cx).is_pending());
    }
    let asked = changer.asked.load(SeqCst);
    assert!(
        asked <= 6,
        "{change:?}: three polls of a waiting request asked a reclaimer that frees nothing {asked} \
         times (rounds: {})",
        pool.stats().reclaim_rounds
    );
    drop(full);
    match request.as_mut().poll(cx) {
        Poll::Ready(Ok(a)) => drop(a),
        other => panic!("not served after the release: {other:?}"),
    }
    drop(request);
    cleanup(pool, changer, handle);
}

#[test]
fn reclaim_ahead_with_a_reclaimer_that_registers_each_time_asked() {
    watchdog(10, || ahead_case(Change::Registers));
}

#[test]
fn reclaim_ahead_with_a_reclaimer_that_resets_the_budget_each_time_asked() {
    watchdog(10, || ahead_case(Change::SameBudget));
}

#[test]
fn waiter_with_a_reclaimer_that_registers_each_time_asked() {
    watchdog(10, || waiter_case(Change::Registers));
}

#[test]
fn waiter_with_a_reclaimer_that_resets_the_budget_each_time_asked() {
    watchdog(10, || waiter_case(Change::SameBudget));
}

/// What holds for a waiting request (documented in README "Reclaim", "No storm"): such a
/// reclaimer makes every round a change of the pool, so rounds follow one another while the
/// pool stays short, but one per poll: each poll returns, and the waker it wakes lets the
/// executor interleave other work. (A storm nonetheless: see the report of session 30.)
#[test]
fn waiter_with_a_changing_reclaimer_runs_at_most_one_round_per_poll() {
    use std::task::Wake;
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    watchdog(10, || {
        for change in [Change::Registers, Change::SameBudget] {
            let (pool, changer, handle, full) = setup(change);
            let count = Arc::new(Count(AtomicUsize::new(0)));
            let waker = Waker::from(Arc::clone(&count));
            let cx = &mut Context::from_waker(&waker);
            let mut request = Box::pin(pool.allocate(2));
            let mut polls = 1;
            assert!(request.as_mut().poll(cx).is_pending());
            let mut seen = 0;
            while polls < 50 && count.0.load(SeqCst) > seen {
                seen = count.0.load(SeqCst);
                polls += 1;
                assert!(request.as_mut().poll(cx).is_pending());
            }
            let asked = changer.asked.load(SeqCst);
            assert!(
                asked <= polls,
                "{change:?}: {asked} rounds in {polls} polls"
            );
            drop(full);
            match request.as_mut().poll(cx) {
                Poll::Ready(Ok(a)) => drop(a),
                other => panic!("not served after the release: {other:?}"),
            }
            drop(request);
            cleanup(pool, changer, handle);
        }
    });
}
