//! An ancestor's shrink and the requests waiting in a descendant's own queue (session 30,
//! helper s30d).
//!
//! `set_max_memory` promises: "Waiting requests that can never fit the new budget fail with
//! `AllocError::ExceedsBudget`", and guarantee 14 that a shrink "fails every request of its
//! subtree that can no longer fit, wherever it waits". A request of a child that waits in
//! the child's own queue (held back by the child's cap) can never fit once an ancestor
//! shrinks below it: a fresh request of the same size fails at once. It must fail too, and
//! not hold back the requests behind it in the child's FIFO, which fit.
//!
//! Fixed in session 30: a shrink fails such requests in its descendants' own queues too
//! (`State::resize`; `tests/model.rs` models it).

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};

fn cfg(max: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S8,
        max_memory: max,
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
    (Arc::clone(&count), Waker::from(count))
}

/// `shrunk` is an ancestor of `pool` (or `pool`'s ancestor chain holds it); the request of
/// 48 bytes waits in `pool`'s own queue behind 32 held there (cap 64), the one of 8 behind
/// it; then `shrunk` goes to 40.
fn case(pool: &BufPool, shrunk: &BufPool) {
    let (big_count, big_waker) = counting();
    let (small_count, small_waker) = counting();
    let big_cx = &mut Context::from_waker(&big_waker);
    let small_cx = &mut Context::from_waker(&small_waker);
    let held = pool.try_reserve(32).unwrap();
    let mut big = Box::pin(pool.reserve(48));
    assert!(big.as_mut().poll(big_cx).is_pending(), "32 + 48 > 64");
    let mut small = Box::pin(pool.allocate(1));
    assert!(
        small.as_mut().poll(small_cx).is_pending(),
        "FIFO: behind the big one"
    );

    shrunk.set_max_memory(40).unwrap();
    // A fresh request of the same size fails at once.
    assert!(matches!(
        pool.try_reserve(48),
        Err(AllocError::ExceedsBudget { max_memory: 40, .. })
    ));
    // BUG: the waiting one was neither woken nor failed; it and the request behind it (which
    // fits: 8 free at the top, 32 in the child) waited until the child's own level had 48
    // free, forever if `held` lives on.
    assert!(
        big_count.0.load(SeqCst) > 0,
        "the request that can never fit was not woken"
    );
    match big.as_mut().poll(big_cx) {
        Poll::Ready(Err(AllocError::ExceedsBudget { .. })) => {}
        other => panic!(
            "a request that can never fit the shrunk ancestor: {:?} ({}; {})",
            other.map(|r| r.map(|r| r.size())),
            pool.stats(),
            shrunk.stats()
        ),
    }
    assert!(
        small_count.0.load(SeqCst) > 0,
        "the request behind was not woken"
    );
    match small.as_mut().poll(small_cx) {
        Poll::Ready(Ok(a)) => drop(a),
        other => panic!("the request behind was not served: {other:?}"),
    }
    drop((big, small, held));
    assert_eq!(pool.stats().in_use_bytes, 0);
    assert_eq!(shrunk.stats().in_use_bytes, 0);
    assert_eq!(pool.stats().waiting, 0);
}

#[test]
fn root_shrink_fails_a_childs_request_waiting_in_the_childs_queue() {
    watchdog(10, || {
        let root = BufPool::new(cfg(80));
        let child = root.child("child", cfg(64)).unwrap();
        case(&child, &root);
    });
}

#[test]
fn middle_shrink_fails_a_grandchilds_request_waiting_in_its_own_queue() {
    watchdog(10, || {
        let root = BufPool::new(cfg(200));
        let middle = root.child("middle", cfg(100)).unwrap();
        let leaf = middle.child("leaf", cfg(64)).unwrap();
        case(&leaf, &middle);
    });
}
