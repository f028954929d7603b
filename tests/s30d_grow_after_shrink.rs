//! A reservation's `grow` that a shrink leaves unable to ever be served (session 30, helper
//! s30d, found by `tests/s30d_hostile_matrix.rs`).
//!
//! `set_max_memory` promises: "Waiting requests that can never fit the new budget fail with
//! `AllocError::ExceedsBudget`". A waiting `grow(more)` of a reservation that holds `held`
//! can never be served once `held + more` is above the budget: the reservation is borrowed
//! by the grow, so it cannot shrink meanwhile. It must fail (and be woken to fail), not wait
//! at the head of the queue forever, holding back everyone behind it.
//!
//! Fixed in session 30: the queue node of a growth records the reservation's bytes beside
//! it, and a shrink's failure pass (and a queueing's admission) judges the two together, in
//! every queue of the chain (also `tests/s30a_operating.rs`; `tests/model.rs` models it).

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};

const BS: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * BS,
    }
}

struct Count(AtomicUsize);
impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

fn counting() -> (Arc<Count>, Waker) {
    let count = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&count));
    (count, waker)
}

/// `pool` is where the reservation is taken, `shrink` the pool that is shrunk (the same, or
/// an ancestor), `filler` where the rest of the budget is held.
fn case(pool: &BufPool, shrink: &BufPool, filler: &BufPool) {
    let mut reservation = pool.try_reserve(BS).unwrap();
    let free = filler.stats().available_bytes() / BS;
    let full = filler.try_allocate(free).unwrap();
    let (count, waker) = counting();
    let cx = &mut Context::from_waker(&waker);
    let (behind_count, behind_waker) = counting();
    let mut behind_cx = Context::from_waker(&behind_waker);
    let outcome;
    {
        let mut grow = Box::pin(reservation.grow(2 * BS));
        assert!(grow.as_mut().poll(cx).is_pending(), "the pool is full");
        let mut behind = Box::pin(filler.allocate(1));
        assert!(behind.as_mut().poll(&mut behind_cx).is_pending());

        // 64 held + 128 asked can never fit 128.
        shrink.set_max_memory(2 * BS).unwrap();
        // BUG: the grow was neither woken nor failed: it waited at the head of the queue
        // for good (64 of 128 in use, 1 waiting), and the request behind it with it.
        assert!(
            count.0.load(SeqCst) > 0,
            "the grow that can never be served was not woken by the shrink: {}",
            shrink.stats()
        );
        // Woken, its executor polls it.
        outcome = grow.as_mut().poll(cx);
        drop(full);
        assert!(
            matches!(outcome, Poll::Ready(Err(AllocError::ExceedsBudget { .. }))),
            "a grow that can never fit the new budget: {outcome:?}, pool {}",
            shrink.stats()
        );
        drop(grow);
        // The request behind it is served by the room the release left.
        assert!(
            behind_count.0.load(SeqCst) > 0,
            "the request behind was not woken"
        );
        match behind.as_mut().poll(&mut behind_cx) {
            Poll::Ready(Ok(a)) => drop(a),
            other => panic!("the request behind the grow was not served: {other:?}"),
        }
    }
    assert_eq!(reservation.size(), BS, "the reservation changed on error");
    drop(reservation);
    for p in [pool, shrink, filler] {
        let s = p.stats();
        assert_eq!(
            (s.in_use_bytes, s.waiting, s.reserved_bytes),
            (0, 0, 0),
            "{s}"
        );
    }
}

#[test]
fn grow_that_a_shrink_makes_impossible_fails() {
    watchdog(10, || {
        let pool = BufPool::new(cfg(4));
        case(&pool, &pool, &pool);
    });
}

#[test]
fn child_grow_waiting_at_the_root_fails_when_the_child_shrinks() {
    watchdog(10, || {
        let root = BufPool::new(cfg(4));
        let child = root.child("child", cfg(8)).unwrap();
        case(&child, &child, &root);
    });
}

#[test]
fn child_grow_waiting_at_the_root_fails_when_the_root_shrinks() {
    watchdog(10, || {
        let root = BufPool::new(cfg(4));
        let child = root.child("child", cfg(8)).unwrap();
        case(&child, &root, &root);
    });
}

#[test]
fn child_grow_waiting_in_its_own_queue_fails_when_the_root_shrinks() {
    watchdog(10, || {
        let root = BufPool::new(cfg(8));
        let child = root.child("child", cfg(4)).unwrap();
        // Held in the child: the grow waits in the child's own queue.
        case(&child, &root, &child);
    });
}

#[test]
fn grow_blocking_that_a_shrink_makes_impossible_returns() {
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let mut reservation = pool.try_reserve(BS).unwrap();
        let full = pool.try_allocate(3).unwrap();
        let p = Arc::clone(&pool);
        let shrinker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            p.set_max_memory(2 * BS).unwrap();
            drop(full);
        });
        let outcome = reservation.grow_blocking(2 * BS);
        shrinker.join().unwrap();
        assert!(
            matches!(outcome, Err(AllocError::ExceedsBudget { .. })),
            "{outcome:?}"
        );
        drop(reservation);
        assert_eq!(pool.stats().in_use_bytes, 0);
    });
}
