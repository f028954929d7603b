//! The budget API of issue 19 as a demanding tokio user drives it: `wait_for_growth` (a
//! zero budget, requests above the budget waiting for growth), `add_max_memory` and
//! `forget_max_memory` (deltas that compose across threads, never taking bytes in use),
//! `Reservation::force_grow` (counted overcommit at every level of a tree, repaid before any
//! grant), the exact-size calls `resize_to`, `try_shrink` and `free`, and owned allocations
//! and reservations that keep their pool alive after its last handle is dropped.
//!
//! Ported from the peers where the API now makes it possible: tokio's `Semaphore`
//! (`Semaphore::new(0)` + `add_permits`, `forget_permits`, `acquire_many` beyond what is
//! available, owned permits outliving the handle, spawned tasks holding owned permits), Go's
//! `x/sync/semaphore.Weighted` (a large request is not starved, in FIFO, now also waiting for
//! growth) and DataFusion's `MemoryReservation` (`grow`/`try_grow`/`shrink`/`try_shrink`/
//! `resize`/`free`/`split`/`take` with exact byte sizes).
//!
//! Every test that could hang runs under a watchdog thread (a blocking pool drop cannot be
//! caught by an async timeout on the same thread), and the budget (`max_memory`,
//! `in_use_bytes`, `overcommit_bytes`, `waiting`) is asserted at every quiescent point.
//! Thread-heavy tests scale down under Miri.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, mpsc};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::Duration;

use common::{Rng, rounds, wait_until, wait_waiting, wait_waiting_async, watchdog, within};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate, Reservation,
};

/// The most bytes a pool counts as a budget: 2 PiB (`usize::MAX` means no limit, counted as
/// this).
const COUNTED: usize = 1 << 51;

/// The most bytes a pool counts in use (force_grow may go up to it): 4 PiB - 8.
const MAX_IN_USE: usize = 2 * COUNTED - 8;

fn cfg(buffer_size: BufferSize, max_memory: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size,
        max_memory,
    }
}

/// A pool built with `wait_for_growth`.
fn growing(buffer_size: BufferSize, max_memory: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(cfg(buffer_size, max_memory))
            .wait_for_growth()
            .build()
            .expect("a growing pool takes any budget"),
    )
}

/// A pool without `wait_for_growth`.
fn fixed(buffer_size: BufferSize, max_memory: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(cfg(buffer_size, max_memory)))
}

/// Asserts the pool's budget, bytes in use and queue at a quiescent point, and that the
/// overcommit it reports is exactly the bytes in use above the (counted) budget.
#[track_caller]
fn check(pool: &BufPool, max_memory: usize, in_use: usize, waiting: usize) {
    let stats = pool.stats();
    assert_eq!(
        (stats.max_memory, stats.in_use_bytes, stats.waiting),
        (max_memory, in_use, waiting),
        "(max_memory, in_use_bytes, waiting): {stats:?}"
    );
    assert_eq!(
        stats.overcommit_bytes,
        in_use.saturating_sub(max_memory.min(COUNTED)),
        "overcommit_bytes: {stats:?}"
    );
    assert!(stats.reserved_bytes <= stats.in_use_bytes, "{stats:?}");
}

/// Asserts the bytes held by reservations of this pool itself.
#[track_caller]
fn check_reserved(pool: &BufPool, reserved: usize) {
    let stats = pool.stats();
    assert_eq!(stats.reserved_bytes, reserved, "reserved_bytes: {stats:?}");
}

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// Polls once with a no-op waker.
fn poll<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    Pin::new(future).poll(&mut cx())
}

#[track_caller]
fn pending<F: Future + Unpin>(future: &mut F) {
    assert!(poll(future).is_pending(), "expected the request to wait");
}

#[track_caller]
fn ready<F: Future + Unpin>(future: &mut F) -> F::Output {
    match poll(future) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected the request to be ready"),
    }
}

/// A current-thread tokio runtime with time enabled (cheap under Miri).
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A multi-thread tokio runtime: two workers natively, one under Miri.
fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if cfg!(miri) { 1 } else { 2 })
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A root pool of 640 bytes of 64-byte buffers and a child of it behind an `Arc`: the root's
/// report says whether the child's drop has completed (a dropped child leaves the report).
fn family() -> (Arc<BufPool>, Arc<BufPool>) {
    let root = fixed(BufferSize::S64, 640);
    let child = Arc::new(
        root.child("owned", cfg(BufferSize::S64, 640))
            .expect("a valid child"),
    );
    (root, child)
}

/// Whether the root's one child still exists (its drop has not completed).
fn child_alive(root: &BufPool) -> bool {
    match root.report().children.len() {
        0 => false,
        1 => true,
        n => panic!("{n} children"),
    }
}

// ---------------------------------------------------------------------------------------
// tokio `Semaphore` ports
// ---------------------------------------------------------------------------------------

/// tokio `sync_semaphore::add_permits` / `no_permits` on `Semaphore::new(0)`: a zero budget,
/// then budget added a permit (8 bytes) at a time.
#[test]
fn tokio_new_zero_then_add_permits() {
    watchdog(30, || {
        let pool = growing(BufferSize::S8, 0);
        check(&pool, 0, 0, 0);
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(pool.try_reserve(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(pool.stats().would_block, 2);
        assert_eq!(pool.add_max_memory(8), 8);
        check(&pool, 8, 0, 0);
        let permit = pool.try_allocate(1).unwrap();
        check(&pool, 8, 8, 0);
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        drop(permit);
        check(&pool, 8, 0, 0);
        // `add_permits(0)` changes nothing.
        assert_eq!(pool.add_max_memory(0), 8);
        check(&pool, 8, 0, 0);
        // A non-growing pool keeps refusing a zero budget.
        assert!(
            BufPool::try_new(cfg(BufferSize::S8, 0)).is_err(),
            "zero budget without wait_for_growth"
        );
        assert!(fixed(BufferSize::S8, 8).set_max_memory(0).is_err());
        assert!(pool.set_max_memory(0).is_ok());
        check(&pool, 0, 0, 0);
        assert_eq!(pool.stats().total_allocations, 1);
    });
}

/// tokio: `add_permits` wakes the waiters, in FIFO order, each as soon as its whole request
/// fits; a later small request never takes budget ahead of a larger earlier one.
#[test]
fn tokio_add_permits_wakes_spawned_waiters_in_fifo_order() {
    watchdog(30, || {
        current_thread().block_on(async {
            let pool = growing(BufferSize::S8, 0);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut tasks = Vec::new();
            for (id, n) in [(0usize, 1usize), (1, 2), (2, 1)] {
                let future = Arc::clone(&pool).allocate_owned(n);
                let tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    let allocation = future.await.expect("granted");
                    tx.send((id, allocation)).expect("the receiver lives");
                }));
                wait_waiting_async(&pool, id + 1).await;
            }
            check(&pool, 0, 0, 3);
            assert_eq!(pool.add_max_memory(8), 8);
            let (id, first) = within(10, rx.recv()).await.unwrap();
            assert_eq!((id, first.length()), (0, 1));
            check(&pool, 8, 8, 2);
            // Room for the third (one permit), but the second (two) is ahead of it.
            assert_eq!(pool.add_max_memory(8), 16);
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(rx.try_recv().is_err(), "the third request barged");
            check(&pool, 16, 8, 2);
            drop(first);
            let (id, second) = within(10, rx.recv()).await.unwrap();
            assert_eq!((id, second.length()), (1, 2));
            check(&pool, 16, 16, 1);
            assert_eq!(pool.add_max_memory(8), 24);
            let (id, third) = within(10, rx.recv()).await.unwrap();
            assert_eq!((id, third.length()), (2, 1));
            check(&pool, 24, 24, 0);
            for task in tasks {
                within(10, task).await.unwrap();
            }
            drop((second, third));
            check(&pool, 24, 0, 0);
        });
    });
}

/// tokio `sync_semaphore::acquire_many` as written there, then the case it could not
/// express: a request for more than the whole budget waits for `add_permits` instead of
/// failing.
#[test]
fn tokio_acquire_many_then_more_than_available_waits_for_add_permits() {
    watchdog(30, || {
        current_thread().block_on(async {
            let pool = growing(BufferSize::S8, 42 * 8);
            let permit32 = pool.allocate(32).await.unwrap();
            let (sender, receiver) = tokio::sync::oneshot::channel();
            let (more_tx, more_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn({
                let pool = Arc::clone(&pool);
                async move {
                    let permit10 = pool.allocate(10).await.unwrap();
                    sender.send(()).unwrap();
                    let permit32 = pool.allocate(32).await.unwrap();
                    drop((permit10, permit32));
                    more_rx.await.unwrap();
                    // 50 permits of a budget of 42: waits for growth.
                    pool.allocate(50).await.unwrap().length()
                }
            });
            within(10, receiver).await.unwrap();
            // The task ran on to its second request, and waits for it.
            check(&pool, 42 * 8, 42 * 8, 1);
            drop(permit32);
            wait_until_in_use(&pool, 0).await;
            more_tx.send(()).unwrap();
            wait_waiting_async(&pool, 1).await;
            check(&pool, 42 * 8, 0, 1);
            assert_eq!(pool.add_max_memory(4 * 8), 46 * 8);
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            check(&pool, 46 * 8, 0, 1);
            assert_eq!(pool.add_max_memory(4 * 8), 50 * 8);
            assert_eq!(within(10, task).await.unwrap(), 50);
            check(&pool, 50 * 8, 0, 0);
        });
    });
}

async fn wait_until_in_use(pool: &BufPool, in_use: usize) {
    common::wait_until_async(10, "the bytes in use settle", || {
        pool.stats().in_use_bytes == in_use
    })
    .await;
}

/// tokio `forget_permits_basic` and `update_permits_many`, in bytes.
#[test]
fn tokio_forget_permits() {
    // forget_permits_basic: Semaphore::new(10); forget 4 -> 4; forget 10 -> 6; forget 1 -> 0.
    let pool = growing(BufferSize::S8, 10 * 8);
    assert_eq!(pool.forget_max_memory(4 * 8), 4 * 8);
    check(&pool, 6 * 8, 0, 0);
    assert_eq!(pool.forget_max_memory(10 * 8), 6 * 8);
    check(&pool, 0, 0, 0);
    assert_eq!(pool.forget_max_memory(8), 0);
    check(&pool, 0, 0, 0);
    // update_permits_many: new(0); add 5; forget 3 -> 3; forget 3 -> 2.
    let pool = growing(BufferSize::S8, 0);
    assert_eq!(pool.add_max_memory(5 * 8), 5 * 8);
    assert_eq!(pool.forget_max_memory(3 * 8), 3 * 8);
    check(&pool, 2 * 8, 0, 0);
    assert_eq!(pool.forget_max_memory(3 * 8), 2 * 8);
    check(&pool, 0, 0, 0);
    // Forgetting by odd byte counts is exact too.
    assert_eq!(pool.add_max_memory(13), 13);
    assert_eq!(pool.forget_max_memory(5), 5);
    check(&pool, 8, 0, 0);
    assert_eq!(
        pool.stats().total_allocations,
        0,
        "resizes are no allocations"
    );
}

/// tokio: forgetting permits never takes the ones held; a pool without `wait_for_growth`
/// keeps one buffer of budget; waiters that can never fit the smaller budget fail, the
/// others are served.
#[test]
fn forget_never_takes_bytes_in_use() {
    watchdog(30, || {
        let pool = fixed(BufferSize::S64, 256);
        let held = pool.try_allocate(3).unwrap();
        assert_eq!(pool.forget_max_memory(usize::MAX), 64);
        check(&pool, 192, 192, 0);
        assert_eq!(pool.forget_max_memory(1), 0, "all of the budget is in use");
        check(&pool, 192, 192, 0);
        drop(held);
        check(&pool, 192, 0, 0);
        assert_eq!(
            pool.forget_max_memory(usize::MAX),
            128,
            "one buffer is kept"
        );
        check(&pool, 64, 0, 0);
        assert_eq!(pool.forget_max_memory(8), 0);
        assert_eq!(pool.try_allocate(1).unwrap().length(), 1);

        // Reservations are bytes in use too, at their rounded size.
        let pool = growing(BufferSize::S64, 256);
        let mut r = pool.try_reserve(0).unwrap();
        r.resize_to(13).unwrap();
        assert_eq!(pool.forget_max_memory(usize::MAX), 240);
        check(&pool, 16, 16, 0);
        assert_eq!(r.free(), 13);
        assert_eq!(
            pool.forget_max_memory(usize::MAX),
            16,
            "a growing pool goes to 0"
        );
        check(&pool, 0, 0, 0);

        // Waiters: the one that can never fit fails, the one that fits now is served.
        let pool = fixed(BufferSize::S64, 256);
        let held = pool.try_allocate(1).unwrap();
        let blocker = pool.try_allocate(3).unwrap();
        let mut whole = Box::pin(pool.allocate(4));
        let mut one = Box::pin(pool.allocate(1));
        pending(&mut whole);
        pending(&mut one);
        check(&pool, 256, 256, 2);
        drop(blocker);
        // Freed 192 went to nobody: `whole` (256) is the head and does not fit.
        check(&pool, 256, 64, 2);
        assert_eq!(pool.forget_max_memory(128), 128);
        assert_eq!(
            ready(&mut whole).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 256,
                max_memory: 128
            }
        );
        let one = ready(&mut one).unwrap();
        check(&pool, 128, 128, 0);
        drop((held, one));
        check(&pool, 128, 0, 0);
    });
}

/// tokio `sync_semaphore_owned`: an owned permit outlives the semaphore handle; here the
/// pool's drop runs when the last owned allocation is given back, not before.
#[test]
fn tokio_owned_permit_outlives_the_handle() {
    watchdog(30, || {
        let (root, pool) = family();
        let permit = futures::executor::block_on(Arc::clone(&pool).allocate_owned(2)).unwrap();
        let weak = Arc::downgrade(&pool);
        drop(pool); // the last handle: does not block
        assert!(weak.upgrade().is_some(), "the allocation holds a handle");
        assert!(
            child_alive(&root),
            "the pool was dropped under a live allocation"
        );
        check(&root, 640, 128, 0);
        assert_eq!(permit.length(), 2);
        drop(permit); // the pool's drop runs here, and returns
        assert!(weak.upgrade().is_none());
        assert!(!child_alive(&root));
        check(&root, 640, 0, 0);
    });
}

/// tokio `sync_semaphore_owned::stress_test`: many spawned tasks each take an owned permit of
/// a small budget and hold it across yields; the test drops its own handle right after
/// spawning, so the last handle is dropped inside some task while it still holds its
/// allocation. No deadlock, every byte back, and the pool's drop has completed.
#[test]
fn tokio_spawned_tasks_with_owned_permits_drop_the_last_handle() {
    watchdog(60, || {
        let (root, pool) = family();
        let tasks = rounds(1000, 8);
        let granted = Arc::new(AtomicUsize::new(0));
        multi_thread().block_on(async {
            let handles: Vec<_> = (0..tasks)
                .map(|i| {
                    let pool = Arc::clone(&pool);
                    let granted = Arc::clone(&granted);
                    tokio::spawn(async move {
                        let n = 1 + i % 3;
                        let allocation = Arc::clone(&pool).allocate_owned(n).await.unwrap();
                        granted.fetch_add(1, SeqCst);
                        drop(pool); // maybe the last handle, with `allocation` held
                        tokio::task::yield_now().await;
                        assert_eq!(allocation.length(), n);
                        drop(allocation);
                    })
                })
                .collect();
            drop(pool);
            for handle in handles {
                within(30, handle).await.unwrap();
            }
        });
        assert_eq!(granted.load(SeqCst), tasks);
        assert!(!child_alive(&root), "the pool's drop never ran");
        check(&root, 640, 0, 0);
    });
}

/// tokio `try_acquire_many_owned` / `acquire_many_owned` and the owned permits' `split`/
/// `merge`, through an owned reservation: every part keeps the pool alive.
#[test]
fn tokio_owned_reservation_parts_keep_the_pool_alive() {
    watchdog(30, || {
        current_thread().block_on(async {
            let (root, pool) = family();
            let mut r = within(10, Arc::clone(&pool).reserve_owned(300))
                .await
                .unwrap();
            check(&pool, 640, 304, 0);
            check_reserved(&pool, 304);
            let buffers = r.allocate(2).unwrap(); // owned too
            let part = r.split(100); // 104, owned too
            check(&pool, 640, 304, 0);
            check_reserved(&pool, 176);
            drop(pool);
            assert!(child_alive(&root));
            drop(r);
            assert!(
                child_alive(&root),
                "dropped while a part and buffers are out"
            );
            check(&root, 640, 232, 0);
            drop(part);
            assert!(child_alive(&root), "dropped while buffers are out");
            check(&root, 640, 128, 0);
            drop(buffers);
            assert!(!child_alive(&root));
            check(&root, 640, 0, 0);
        });
    });
}

// ---------------------------------------------------------------------------------------
// Go `x/sync/semaphore.Weighted` ports
// ---------------------------------------------------------------------------------------

/// Go `TestWeightedTryAcquire`: NewWeighted(2); Acquire(1); TryAcquire(1) = true;
/// TryAcquire(1) = false; Release(2); TryAcquire(1) = true; Acquire(1); TryAcquire(1) = false.
#[test]
fn go_weighted_try_acquire() {
    watchdog(30, || {
        let pool = fixed(BufferSize::S8, 16);
        let mut held = vec![pool.allocate_blocking(1).unwrap()];
        let mut tries = Vec::new();
        let attempt = |held: &mut Vec<BufPoolAllocation>| match pool.try_allocate(1) {
            Ok(allocation) => {
                held.push(allocation);
                true
            }
            Err(AllocError::WouldBlock) => false,
            Err(error) => panic!("{error}"),
        };
        tries.push(attempt(&mut held));
        tries.push(attempt(&mut held));
        held.clear();
        tries.push(attempt(&mut held));
        held.push(pool.allocate_blocking(1).unwrap());
        tries.push(attempt(&mut held));
        assert_eq!(tries, [true, false, true, false]);
        check(&pool, 16, 16, 0);
        held.clear();
        check(&pool, 16, 0, 0);
    });
}

/// Go `TestLargeAcquireDoesntStarve`, then with growth: workers keep taking and giving back
/// one buffer each; a request for more than the whole budget waits (instead of failing), and
/// once it is queued the workers' requests queue behind it (no barging, though budget is
/// free) until growth serves it.
#[test]
fn go_large_acquire_does_not_starve_and_waits_for_growth_in_fifo() {
    watchdog(60, || {
        const WORKERS: usize = 3;
        let pool = growing(BufferSize::S64, 64 * WORKERS);
        let stop = Arc::new(AtomicBool::new(false));
        let cycles = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (pool, stop, cycles) =
                    (Arc::clone(&pool), Arc::clone(&stop), Arc::clone(&cycles));
                thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        let one = pool.allocate_blocking(1).unwrap();
                        cycles.fetch_add(1, SeqCst);
                        thread::yield_now();
                        drop(one);
                    }
                })
            })
            .collect();
        wait_until(10, "the workers run", || cycles.load(SeqCst) >= WORKERS);
        // TestLargeAcquireDoesntStarve: the whole budget, while the workers churn.
        let all = pool.allocate_blocking(WORKERS).unwrap();
        // One snapshot: the workers queue and leave meanwhile (two reads raced under Miri).
        let stats = pool.stats();
        assert_eq!(
            (stats.max_memory, stats.in_use_bytes),
            (64 * WORKERS, 64 * WORKERS),
            "{stats:?}"
        );
        drop(all);
        // Two buffers more than the budget: waits for growth.
        let big = thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.allocate_blocking(WORKERS + 2).map(|a| a.length())
        });
        // Queued first, then every worker behind it: all the budget free, nobody served.
        wait_until(10, "the big request and every worker queue", || {
            let stats = pool.stats();
            stats.waiting == WORKERS + 1 && stats.in_use_bytes == 0
        });
        let before = cycles.load(SeqCst);
        thread::sleep(Duration::from_millis(if cfg!(miri) { 1 } else { 20 }));
        assert_eq!(
            cycles.load(SeqCst),
            before,
            "a worker barged past the queue"
        );
        check(&pool, 64 * WORKERS, 0, WORKERS + 1);
        stop.store(true, SeqCst);
        assert_eq!(pool.add_max_memory(64), 64 * (WORKERS + 1));
        check(&pool, 64 * (WORKERS + 1), 0, WORKERS + 1);
        assert_eq!(pool.add_max_memory(64), 64 * (WORKERS + 2));
        assert_eq!(big.join().unwrap(), Ok(WORKERS + 2));
        for worker in workers {
            worker.join().unwrap();
        }
        check(&pool, 64 * (WORKERS + 2), 0, 0);
    });
}

/// Go `TestAllocCancelDoesntStarve`, with a request waiting for growth: a cancelled head
/// (timed out, or its future dropped) does not hold back the requests behind it.
#[test]
fn go_cancelled_large_request_does_not_starve_the_rest() {
    watchdog(30, || {
        let pool = growing(BufferSize::S8, 80);
        let one = pool.try_allocate(1).unwrap();
        // Blocking form: waits for growth, then gives up.
        assert_eq!(
            pool.allocate_timeout(20, Duration::from_millis(10))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(
            pool.reserve_timeout(100, Duration::from_millis(10))
                .unwrap_err(),
            AllocError::TimedOut
        );
        check(&pool, 80, 8, 0);
        // Async form: queued at the head, a small request behind it, then cancelled.
        let mut big = Box::pin(pool.allocate(20));
        pending(&mut big);
        let mut small = Box::pin(pool.allocate(1));
        pending(&mut small);
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        check(&pool, 80, 8, 2);
        drop(big);
        let small = ready(&mut small).unwrap();
        check(&pool, 80, 16, 0);
        drop((one, small));
        check(&pool, 80, 0, 0);
        assert_eq!(pool.stats().timed_out, 2);
    });
}

/// Go `TestWeighted`: workers acquire random weights up to the whole budget and release
/// them, while a controller adds and forgets budget; every grant fits, everything comes back.
#[test]
fn go_weighted_random_weights_with_a_resizing_controller() {
    watchdog(60, || {
        const WORKERS: usize = 3;
        let loops = rounds(400, 6);
        let pool = fixed(BufferSize::S64, 64 * WORKERS);
        let done = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (pool, done) = (Arc::clone(&pool), Arc::clone(&done));
                thread::spawn(move || {
                    let mut rng = Rng::new(w as u64 + 1);
                    for _ in 0..loops {
                        let n = rng.range(1, WORKERS);
                        let allocation = pool.allocate_blocking(n).unwrap();
                        assert_eq!(allocation.length(), n);
                        drop(allocation);
                    }
                    done.fetch_add(1, SeqCst);
                })
            })
            .collect();
        let mut added = 0;
        let mut forgotten = 0;
        while done.load(SeqCst) < WORKERS {
            added += 64;
            pool.add_max_memory(64);
            forgotten += pool.forget_max_memory(64);
            thread::yield_now();
        }
        for worker in workers {
            worker.join().unwrap();
        }
        let max = 64 * WORKERS + added - forgotten;
        check(&pool, max, 0, 0);
        let stats = pool.stats();
        assert_eq!(
            (stats.total_allocations, stats.outstanding),
            (WORKERS * loops, 0),
            "resizes counted as allocations: {stats:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------
// DataFusion `MemoryReservation` ports
// ---------------------------------------------------------------------------------------

/// DataFusion `test_memory_pool_underflow` (GreedyMemoryPool::new(50)): `grow` is
/// `force_grow`, `try_grow` with exact sizes is `resize_to`; the pool holds sizes rounded up
/// to 8.
#[test]
fn datafusion_memory_pool_underflow() {
    let pool = fixed(BufferSize::S8, 50);
    let mut a1 = pool.try_reserve(0).unwrap();
    check(&pool, 50, 0, 0);
    a1.force_grow(100).unwrap();
    assert_eq!(a1.size(), 100);
    check(&pool, 50, 104, 0);
    assert_eq!(pool.stats().overcommit_bytes, 54);
    assert_eq!(a1.free(), 100);
    assert_eq!(a1.size(), 0);
    check(&pool, 50, 0, 0);
    assert!(matches!(
        a1.try_grow(100),
        Err(AllocError::ExceedsBudget { .. })
    ));
    check(&pool, 50, 0, 0);
    a1.resize_to(30).unwrap();
    assert_eq!(a1.size(), 30);
    check(&pool, 50, 32, 0);
    let mut a2 = pool.try_reserve(0).unwrap();
    assert_eq!(a2.resize_to(25).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(a2.size(), 0);
    check(&pool, 50, 32, 0);
    drop(a1);
    check(&pool, 50, 0, 0);
    a2.resize_to(25).unwrap();
    assert_eq!(a2.size(), 25);
    check(&pool, 50, 32, 0);
    check_reserved(&pool, 32);
}

/// DataFusion `test_split`, `test_new_empty`, `test_take`: `split` rounds to 8 as
/// documented; taking everything (`split(size)`) is exact.
#[test]
fn datafusion_split_new_empty_and_take() {
    // test_split
    let pool = fixed(BufferSize::S8, 50);
    let mut r1 = pool.try_reserve(0).unwrap();
    r1.resize_to(20).unwrap();
    assert_eq!(r1.size(), 20);
    check(&pool, 50, 24, 0);
    let r2 = r1.split(5); // rounded: 8
    assert_eq!((r1.size(), r2.size()), (12, 8));
    check(&pool, 50, 24, 0);
    drop(r1);
    check(&pool, 50, 8, 0);
    drop(r2);
    check(&pool, 50, 0, 0);
    // test_new_empty
    let mut r1 = pool.try_reserve(0).unwrap();
    r1.resize_to(20).unwrap();
    let mut r2 = pool.try_reserve(0).unwrap();
    r2.resize_to(5).unwrap();
    assert_eq!((r1.size(), r2.size()), (20, 5));
    check(&pool, 50, 32, 0);
    drop((r1, r2));
    // test_take
    let mut r1 = pool.try_reserve(0).unwrap();
    r1.resize_to(20).unwrap();
    let mut r2 = r1.split(r1.size());
    assert_eq!((r1.size(), r2.size()), (0, 20));
    r2.resize_to(25).unwrap();
    assert_eq!((r1.size(), r2.size()), (0, 25));
    check(&pool, 50, 32, 0);
    r1.resize_to(3).unwrap();
    assert_eq!((r1.size(), r2.size()), (3, 25));
    check(&pool, 50, 40, 0);
    drop((r1, r2));
    check(&pool, 50, 0, 0);
}

/// DataFusion `resize` / `try_resize`: to larger and smaller exact sizes; growth that does
/// not fit refuses and leaves the reservation unchanged.
#[test]
fn datafusion_resize_larger_and_smaller() {
    let pool = fixed(BufferSize::S8, 50);
    let mut r = pool.try_reserve(0).unwrap();
    for (size, in_use) in [(10, 16), (5, 8), (40, 40), (41, 48), (48, 48), (1, 8)] {
        r.resize_to(size).unwrap();
        assert_eq!(r.size(), size);
        check(&pool, 50, in_use, 0);
    }
    r.resize_to(40).unwrap();
    // 51 rounds to 56, above the budget of 50: never fits.
    assert!(matches!(
        r.resize_to(51),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert_eq!(r.size(), 40);
    check(&pool, 50, 40, 0);
    // 48 fits the budget but not what is free now.
    let other = pool.try_reserve(8).unwrap();
    assert_eq!(r.resize_to(48).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(r.size(), 40);
    check(&pool, 50, 48, 0);
    // Within the rounding already held: no bytes needed.
    r.resize_to(39).unwrap();
    r.resize_to(40).unwrap();
    assert_eq!(r.size(), 40);
    drop(other);
    r.resize_to(0).unwrap();
    assert_eq!(r.size(), 0);
    check(&pool, 50, 0, 0);
}

/// DataFusion `shrink` / `try_shrink` / `free` with exact sizes: `try_shrink` past the size is
/// refused, unchanged; `free` returns the size and leaves a usable empty reservation.
#[test]
fn datafusion_try_shrink_and_free_are_exact() {
    let pool = fixed(BufferSize::S8, 640);
    let mut r = pool.try_reserve(100).unwrap(); // rounded: 104
    assert_eq!(r.size(), 104);
    r.try_shrink(3).unwrap();
    assert_eq!(r.size(), 101);
    check(&pool, 640, 104, 0);
    r.try_shrink(1).unwrap();
    assert_eq!(r.size(), 100);
    check(&pool, 640, 104, 0);
    r.try_shrink(4).unwrap();
    assert_eq!(r.size(), 96);
    check(&pool, 640, 96, 0);
    assert_eq!(
        r.try_shrink(97).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 97,
            max_memory: 96
        }
    );
    assert_eq!(r.size(), 96);
    check(&pool, 640, 96, 0);
    r.try_shrink(0).unwrap();
    assert_eq!(r.size(), 96);
    // `shrink` rounds its argument, as documented.
    r.shrink(1);
    assert_eq!(r.size(), 88);
    check(&pool, 640, 88, 0);
    r.force_grow(5).unwrap();
    assert_eq!(r.size(), 93);
    check(&pool, 640, 96, 0);
    assert_eq!(r.free(), 93);
    assert_eq!(r.free(), 0);
    check(&pool, 640, 0, 0);
    r.resize_to(7).unwrap();
    assert_eq!(r.size(), 7);
    check(&pool, 640, 8, 0);
    r.try_shrink(7).unwrap();
    assert_eq!(r.size(), 0);
    check(&pool, 640, 0, 0);
    assert_eq!(
        r.try_shrink(1).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 1,
            max_memory: 0
        }
    );
    check_reserved(&pool, 0);
}

// ---------------------------------------------------------------------------------------
// add_max_memory / forget_max_memory: deltas compose
// ---------------------------------------------------------------------------------------

/// N threads each add then forget k bytes, many times: the budget ends where it started,
/// each forget gets its full k (its own add is still there), and the resizes are never
/// counted as allocations (the word's counter wraps many times over).
#[test]
fn add_and_forget_from_many_threads_compose() {
    watchdog(60, || {
        const THREADS: usize = 4;
        let loops = rounds(2000, 20);
        for grows in [false, true] {
            let pool = if grows {
                growing(BufferSize::S64, 640)
            } else {
                fixed(BufferSize::S64, 640)
            };
            let barrier = Arc::new(Barrier::new(THREADS));
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (pool, barrier) = (Arc::clone(&pool), Arc::clone(&barrier));
                    thread::spawn(move || {
                        barrier.wait();
                        for i in 0..loops {
                            let k = 8 * (1 + (t + i) % 16);
                            assert!(pool.add_max_memory(k) >= 640 + k);
                            assert_eq!(pool.forget_max_memory(k), k, "grows: {grows}");
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            check(&pool, 640, 0, 0);
            let stats = pool.stats();
            assert_eq!(
                (stats.total_allocations, stats.outstanding),
                (0, 0),
                "{stats:?}"
            );
            // The budget is whole: it can all be taken at once.
            assert_eq!(pool.try_allocate(10).unwrap().length(), 10);
            assert_eq!(pool.stats().total_allocations, 1);
        }
    });
}

/// Controllers add and forget while allocations come and go: forgetting never takes bytes
/// in use (so it may get less than it asked), and the final budget is exactly the start plus
/// every add minus what every forget returned; the counts stay exact.
#[test]
fn add_and_forget_compose_while_allocations_come_and_go() {
    watchdog(60, || {
        const CONTROLLERS: usize = 2;
        const ALLOCATORS: usize = 2;
        let loops = rounds(1000, 10);
        let pool = fixed(BufferSize::S64, 640);
        let added = Arc::new(AtomicUsize::new(0));
        let forgotten = Arc::new(AtomicUsize::new(0));
        let allocations = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(CONTROLLERS + ALLOCATORS));
        let mut threads = Vec::new();
        for c in 0..CONTROLLERS {
            let (pool, added, forgotten, barrier) = (
                Arc::clone(&pool),
                Arc::clone(&added),
                Arc::clone(&forgotten),
                Arc::clone(&barrier),
            );
            threads.push(thread::spawn(move || {
                let mut rng = Rng::new(100 + c as u64);
                barrier.wait();
                for _ in 0..loops {
                    let k = rng.range(1, 200);
                    pool.add_max_memory(k);
                    added.fetch_add(k, SeqCst);
                    let got = pool.forget_max_memory(k);
                    assert!(got <= k);
                    forgotten.fetch_add(got, SeqCst);
                }
            }));
        }
        for a in 0..ALLOCATORS {
            let (pool, allocations, barrier) = (
                Arc::clone(&pool),
                Arc::clone(&allocations),
                Arc::clone(&barrier),
            );
            threads.push(thread::spawn(move || {
                let mut rng = Rng::new(200 + a as u64);
                barrier.wait();
                for _ in 0..loops {
                    // The budget never goes below 640: every request of up to 10 buffers fits.
                    let n = rng.range(1, 10);
                    let allocation = pool.allocate_blocking(n).unwrap();
                    allocations.fetch_add(1, SeqCst);
                    let stats = pool.stats();
                    assert!(stats.max_memory >= 640, "{stats:?}");
                    drop(allocation);
                }
            }));
        }
        for thread in threads {
            thread.join().unwrap();
        }
        let max = 640 + added.load(SeqCst) - forgotten.load(SeqCst);
        check(&pool, max, 0, 0);
        let stats = pool.stats();
        assert_eq!(
            (stats.total_allocations, stats.outstanding),
            (allocations.load(SeqCst), 0),
            "{stats:?}"
        );
        // Give the surplus back: exactly what is above the start.
        assert_eq!(pool.forget_max_memory(max - 640), max - 640);
        check(&pool, 640, 0, 0);
    });
}

/// add_max_memory on a pool without wait_for_growth serves the waiters held back by bytes in
/// use, in order; set_max_memory and the deltas interleave.
#[test]
fn add_max_memory_serves_waiters_of_a_fixed_pool() {
    let pool = fixed(BufferSize::S64, 128);
    let held = pool.try_allocate(2).unwrap();
    let mut two = Box::pin(pool.allocate(2));
    let mut one = Box::pin(pool.reserve(8));
    pending(&mut two);
    pending(&mut one);
    check(&pool, 128, 128, 2);
    assert_eq!(pool.add_max_memory(64), 192);
    check(&pool, 192, 128, 2); // the head needs 128: nobody is served
    assert_eq!(pool.add_max_memory(72), 264);
    let two = ready(&mut two).unwrap();
    let one = ready(&mut one).unwrap();
    check(&pool, 264, 264, 0);
    pool.set_max_memory(1024).unwrap();
    assert_eq!(pool.add_max_memory(64), 1088);
    assert_eq!(pool.forget_max_memory(1000), 1088 - 264);
    check(&pool, 264, 264, 0);
    drop((held, two, one));
    check(&pool, 264, 0, 0);
}

// ---------------------------------------------------------------------------------------
// wait_for_growth
// ---------------------------------------------------------------------------------------

/// Every call form on a zero budget: async waits, `try_` gives WouldBlock, timed forms time
/// out, `max_waiters(0)` refuses with QueueFull; only requests above 2 PiB fail at once.
#[test]
fn wait_for_growth_every_form_on_a_zero_budget() {
    watchdog(30, || {
        let pool = growing(BufferSize::S64, 0);
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(
            pool.try_allocate_zeroed(3).unwrap_err(),
            AllocError::WouldBlock
        );
        assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(
            pool.allocate_timeout(1, Duration::ZERO).unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(
            pool.allocate_zeroed_timeout(1, Duration::from_millis(5))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(
            pool.allocate_zeroed(0).now_or_never_err(),
            AllocError::ZeroBuffers
        );
        // Exactly 2 PiB waits; above it fails at once.
        assert_eq!(
            pool.try_allocate(COUNTED / 64).unwrap_err(),
            AllocError::WouldBlock
        );
        assert_eq!(
            pool.try_reserve(COUNTED).unwrap_err(),
            AllocError::WouldBlock
        );
        let above = COUNTED / 64 + 1;
        for error in [
            pool.try_allocate(above).unwrap_err(),
            pool.allocate_blocking(above).unwrap_err(),
            pool.allocate(above).now_or_never_err(),
            pool.allocate_timeout(above, Duration::from_secs(60))
                .unwrap_err(),
        ] {
            assert!(
                matches!(error, AllocError::ExceedsBudget { requested_bytes, .. } if requested_bytes == COUNTED + 64),
                "{error:?}"
            );
        }
        assert!(matches!(
            pool.try_allocate(usize::MAX),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert!(matches!(
            pool.reserve_blocking(COUNTED + 1),
            Err(AllocError::ExceedsBudget { requested_bytes, .. }) if requested_bytes == COUNTED + 8
        ));
        assert!(matches!(
            pool.reserve_blocking(usize::MAX),
            Err(AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                ..
            })
        ));
        check(&pool, 0, 0, 0);
        // A bounded queue refuses instead of waiting for growth.
        let bounded = BufPool::builder(cfg(BufferSize::S64, 0))
            .wait_for_growth()
            .max_waiters(0)
            .build()
            .unwrap();
        assert_eq!(
            bounded.allocate_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(
            bounded.reserve_blocking(8).unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(bounded.stats().queue_full, 2);
        // reserve_blocking waits for growth, from a thread.
        let waiter = thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.reserve_blocking(100).map(|r| r.size())
        });
        wait_waiting(&pool, 1);
        assert_eq!(pool.add_max_memory(96), 96);
        check(&pool, 96, 0, 1);
        assert_eq!(pool.add_max_memory(8), 104);
        assert_eq!(waiter.join().unwrap(), Ok(104));
        check(&pool, 104, 0, 0);
    });
}

/// Polls a future once; it must be ready with an error.
trait NowOrNeverErr {
    fn now_or_never_err(self) -> AllocError;
}

impl<F: Future<Output = Result<T, AllocError>>, T: std::fmt::Debug> NowOrNeverErr for F {
    #[track_caller]
    fn now_or_never_err(self) -> AllocError {
        let mut future = Box::pin(self);
        match future.as_mut().poll(&mut cx()) {
            Poll::Ready(Err(error)) => error,
            Poll::Ready(Ok(out)) => panic!("expected an error, got {out:?}"),
            Poll::Pending => panic!("expected an error at once, the request waits"),
        }
    }
}

/// set_max_memory and forget on a growing pool never fail waiters (they wait for growth);
/// a budget set below the bytes in use is counted as overcommit; close fails the waiters.
#[test]
fn wait_for_growth_shrinking_never_fails_waiters_and_close_does() {
    watchdog(30, || {
        let pool = growing(BufferSize::S64, 256);
        let held = pool.try_allocate(2).unwrap();
        let mut big = Box::pin(pool.allocate(8));
        let mut small = Box::pin(pool.reserve(8));
        pending(&mut big);
        pending(&mut small);
        check(&pool, 256, 128, 2);
        pool.set_max_memory(0).unwrap();
        check(&pool, 0, 128, 2); // 128 bytes over the budget
        assert_eq!(pool.forget_max_memory(64), 0);
        pending(&mut big);
        pending(&mut small);
        assert_eq!(pool.add_max_memory(128), 128);
        check(&pool, 128, 128, 2);
        assert_eq!(pool.add_max_memory(520), 648);
        let big = ready(&mut big).unwrap();
        let small = ready(&mut small).unwrap();
        check(&pool, 648, 648, 0);
        drop((big, small));
        let mut huge = Box::pin(pool.allocate(100));
        let mut behind = Box::pin(pool.allocate(1)); // would fit, but queues behind
        pending(&mut huge);
        pending(&mut behind);
        check(&pool, 648, 128, 2);
        pool.close();
        assert_eq!(ready(&mut huge).unwrap_err(), AllocError::Closed);
        assert_eq!(ready(&mut behind).unwrap_err(), AllocError::Closed);
        check(&pool, 648, 128, 0);
        drop(held);
        check(&pool, 648, 0, 0);
    });
}

/// A growing child of a fixed root: a request above the root's budget can never be served
/// (`BufPool::child`: "a request larger than the smallest cap on its chain fails at once"),
/// in every form, buffers as well as bytes.
#[test]
fn wait_for_growth_child_request_above_an_ancestors_cap_fails_at_once() {
    watchdog(30, || {
        let root = BufPool::new(cfg(BufferSize::S64, 256));
        let child = BufPool::builder(cfg(BufferSize::S64, 0))
            .parent(&root)
            .wait_for_growth()
            .build()
            .unwrap();
        let exceeds = AllocError::ExceedsBudget {
            requested_bytes: 320,
            max_memory: 256,
        };
        // The byte forms do.
        assert_eq!(child.try_reserve(320).unwrap_err(), exceeds);
        assert_eq!(child.reserve(320).now_or_never_err(), exceeds);
        let mut r = child.try_reserve(0).unwrap();
        assert_eq!(r.try_grow(320).unwrap_err(), exceeds);
        assert_eq!(r.resize_to(320).unwrap_err(), exceeds);
        // The buffer forms must too, not wait for a growth of the child that cannot help.
        assert_eq!(child.try_allocate(5).unwrap_err(), exceeds, "try_allocate");
        assert_eq!(
            child
                .allocate_timeout(5, Duration::from_millis(5))
                .unwrap_err(),
            exceeds,
            "allocate_timeout"
        );
        assert_eq!(child.allocate(5).now_or_never_err(), exceeds, "allocate");
        check(&child, 0, 0, 0);
        check(&root, 256, 0, 0);
    });
}

/// A growing child of a fixed root waits for its own growth (within the root's budget). A
/// fixed child of a growing root waits at the root for its growth, and fails there if the
/// child's own cap shrinks below it (its level, held while it waits up the chain, counts as
/// in use, so forgetting cannot take it).
#[test]
fn wait_for_growth_in_child_pools() {
    watchdog(30, || {
        let root = BufPool::new(cfg(BufferSize::S64, 256));
        let child = BufPool::builder(cfg(BufferSize::S64, 0))
            .parent(&root)
            .wait_for_growth()
            .build()
            .unwrap();
        assert!(matches!(
            child.reserve(257).now_or_never_err(),
            AllocError::ExceedsBudget { .. }
        ));
        assert_eq!(child.try_allocate(2).unwrap_err(), AllocError::WouldBlock);
        let mut two = Box::pin(child.allocate(2));
        pending(&mut two);
        check(&child, 0, 0, 1);
        assert_eq!(child.add_max_memory(64), 64);
        pending(&mut two);
        assert_eq!(child.add_max_memory(64), 128);
        let two = ready(&mut two).unwrap();
        check(&child, 128, 128, 0);
        check(&root, 256, 128, 0);
        drop(two);
        check(&root, 256, 0, 0);

        let root = BufPool::builder(cfg(BufferSize::S64, 0))
            .wait_for_growth()
            .build()
            .unwrap();
        let child = root.child("fixed", cfg(BufferSize::S64, 128)).unwrap();
        assert_eq!(child.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        let mut two = Box::pin(child.allocate(2));
        pending(&mut two);
        check(&root, 0, 0, 1);
        assert_eq!(root.add_max_memory(64), 64);
        pending(&mut two);
        assert_eq!(root.add_max_memory(64), 128);
        let two = ready(&mut two).unwrap();
        check(&root, 128, 128, 0);
        check(&child, 128, 128, 0);
        drop(two);
        // Waiting at the root; the child's own cap shrinks below it: it can never fit.
        assert_eq!(root.forget_max_memory(128), 128);
        let mut two = Box::pin(child.allocate(2));
        pending(&mut two);
        check(&root, 0, 0, 1);
        check(&child, 128, 128, 0); // its level is held while it waits at the root
        assert_eq!(child.forget_max_memory(64), 0);
        child.set_max_memory(64).unwrap();
        assert!(matches!(
            ready(&mut two).unwrap_err(),
            AllocError::ExceedsBudget { max_memory: 64, .. }
        ));
        check(&root, 0, 0, 0);
        check(&child, 64, 0, 0);
        // resize_to growth refused by an ancestor: nothing stays held at any level.
        let mut r = child.try_reserve(0).unwrap();
        assert_eq!(r.resize_to(13).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(r.size(), 0);
        check(&child, 64, 0, 0);
        check(&root, 0, 0, 0);
        assert_eq!(root.add_max_memory(16), 16);
        r.resize_to(13).unwrap();
        check(&child, 64, 16, 0);
        check(&root, 16, 16, 0);
        assert_eq!(r.free(), 13);
        check(&root, 16, 0, 0);
    });
}

// ---------------------------------------------------------------------------------------
// force_grow: counted overcommit, repaid before any grant
// ---------------------------------------------------------------------------------------

/// One pool: force_grow takes it above the budget; nothing is granted (not even a request
/// of 8 bytes at the head) until releases repay the overcommit; then grants resume in FIFO
/// order. A force_grow while requests wait counts under the lock.
#[test]
fn force_grow_blocks_every_grant_until_repaid_then_fifo() {
    watchdog(30, || {
        let pool = fixed(BufferSize::S64, 128);
        let mut r = pool.try_reserve(128).unwrap();
        r.force_grow(100).unwrap();
        assert_eq!(r.size(), 228);
        check(&pool, 128, 232, 0);
        assert_eq!(pool.stats().overcommit_bytes, 104);
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
        let mut w0 = Box::pin(pool.reserve(8));
        let mut w1 = Box::pin(pool.allocate(1));
        let mut w2 = Box::pin(pool.reserve(8));
        pending(&mut w0);
        pending(&mut w1);
        pending(&mut w2);
        check(&pool, 128, 232, 3);
        r.try_shrink(96).unwrap(); // 132 exact, 136 held: 8 over
        assert_eq!(r.size(), 132);
        check(&pool, 128, 136, 3);
        pending(&mut w0);
        r.try_shrink(4).unwrap(); // repaid, no room
        check(&pool, 128, 128, 3);
        pending(&mut w0);
        r.try_shrink(8).unwrap(); // room for the head only
        let w0 = ready(&mut w0).unwrap();
        check(&pool, 128, 128, 2);
        // Overcommit while requests wait: repaid first again.
        r.force_grow(16).unwrap();
        assert_eq!(r.size(), 136);
        check(&pool, 128, 144, 2);
        r.try_shrink(16).unwrap();
        check(&pool, 128, 128, 2);
        pending(&mut w1);
        // Room 8: the 8-byte request behind the 64-byte head does not barge.
        r.try_shrink(8).unwrap();
        check(&pool, 128, 120, 2);
        pending(&mut w2);
        r.try_shrink(64).unwrap();
        let w1 = ready(&mut w1).unwrap();
        let w2 = ready(&mut w2).unwrap();
        assert_eq!(r.size(), 48);
        check(&pool, 128, 128, 0);
        check_reserved(&pool, 64);
        // Buffers out of an overcommitted reservation: never wait, the overcommit stays.
        r.force_grow(100).unwrap();
        let buffers = r.allocate(2).unwrap();
        assert_eq!(r.size(), 20);
        check(&pool, 128, 232, 0);
        check_reserved(&pool, 8 + 8 + 24);
        drop(buffers);
        check(&pool, 128, 104, 0);
        drop((r, w0, w1, w2));
        check(&pool, 128, 0, 0);
    });
}

/// force_grow in a grandchild is held at every level: each pool counts its own overcommit
/// (in use above its own budget); requests anywhere under an overcommitted pool wait.
#[test]
fn force_grow_is_seen_at_every_ancestor() {
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let mid = root.child("mid", cfg(BufferSize::S64, 512)).unwrap();
    let leaf = mid.child("leaf", cfg(BufferSize::S64, 256)).unwrap();
    let sibling = mid.child("sibling", cfg(BufferSize::S64, 256)).unwrap();
    let mut r = leaf.try_reserve(256).unwrap();
    r.force_grow(1000).unwrap();
    assert_eq!(r.size(), 1256);
    check(&leaf, 256, 1256, 0);
    check(&mid, 512, 1256, 0);
    check(&root, 1024, 1256, 0);
    assert_eq!(
        [&leaf, &mid, &root].map(|pool| pool.stats().overcommit_bytes),
        [1000, 744, 232]
    );
    check_reserved(&leaf, 1256);
    check_reserved(&root, 0);
    assert_eq!(sibling.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(root.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    // Repaid at the root first (956 exact, 960 held): the root grants again, the middle
    // pool's subtree not.
    r.try_shrink(300).unwrap();
    assert_eq!(r.size(), 956);
    assert_eq!(
        [&leaf, &mid, &root].map(|pool| pool.stats().overcommit_bytes),
        [704, 448, 0]
    );
    assert_eq!(sibling.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    let own = root.try_allocate(1).unwrap();
    check(&root, 1024, 1024, 0);
    drop(own);
    r.try_shrink(508).unwrap(); // 448: the middle pool has room for one buffer exactly
    assert_eq!(
        [&leaf, &mid, &root].map(|pool| pool.stats().overcommit_bytes),
        [192, 0, 0]
    );
    assert_eq!(leaf.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
    let s = sibling.try_allocate(1).unwrap();
    check(&root, 1024, 512, 0);
    check(&mid, 512, 512, 0);
    assert_eq!(r.free(), 448);
    drop(s);
    for pool in [&leaf, &sibling] {
        check(pool, 256, 0, 0);
    }
    check(&mid, 512, 0, 0);
    check(&root, 1024, 0, 0);
}

/// A tree: a child's force_grow overcommits the root only; while it is, nothing is granted
/// anywhere in the tree (the child with room of its own included); releases in any pool
/// repay it first; then grants resume in the root's FIFO order, across children.
#[test]
fn no_grant_anywhere_in_the_tree_while_overcommitted() {
    watchdog(30, || {
        let root = BufPool::new(cfg(BufferSize::S64, 256));
        let a = root.child("a", cfg(BufferSize::S64, 256)).unwrap();
        let b = root.child("b", cfg(BufferSize::S64, 256)).unwrap();
        let mut ra = a.try_reserve(128).unwrap();
        let mut rb = b.try_reserve(128).unwrap();
        ra.force_grow(64).unwrap();
        check(&a, 256, 192, 0); // within its own budget
        check(&root, 256, 320, 0);
        assert_eq!(root.stats().overcommit_bytes, 64);
        for error in [
            root.try_allocate(1).unwrap_err(),
            a.try_allocate(1).unwrap_err(),
            a.try_reserve(8).unwrap_err(),
            b.try_reserve(8).unwrap_err(),
        ] {
            assert_eq!(error, AllocError::WouldBlock);
        }
        let mut w0 = Box::pin(b.reserve(8));
        let mut w1 = Box::pin(root.allocate(1));
        let mut w2 = Box::pin(a.allocate(1));
        let mut w3 = Box::pin(b.reserve(8));
        pending(&mut w0);
        pending(&mut w1);
        pending(&mut w2);
        pending(&mut w3);
        assert_eq!(root.stats().waiting, 4, "{}", root.report());
        // More overcommit while requests of three pools wait at the root, repaid at once.
        rb.force_grow(40).unwrap();
        check(&b, 256, 168 + 16, 0);
        check(&root, 256, 360, 4);
        rb.try_shrink(40).unwrap();
        check(&root, 256, 320, 4);
        pending(&mut w0);
        // Partly repaid: still 8 over, the 8-byte head waits.
        ra.try_shrink(56).unwrap();
        check(&root, 256, 264, 4);
        pending(&mut w0);
        ra.try_shrink(8).unwrap();
        check(&root, 256, 256, 4);
        pending(&mut w0);
        // A release in the other child frees room for the head.
        rb.try_shrink(8).unwrap();
        let w0 = ready(&mut w0).unwrap();
        check(&root, 256, 256, 3);
        // 72 free: the root's 64, then the 8-byte one behind a's 64 must wait.
        ra.try_shrink(72).unwrap();
        let w1 = ready(&mut w1).unwrap();
        pending(&mut w2);
        pending(&mut w3);
        check(&root, 256, 248, 2);
        assert_eq!(ra.free(), 56);
        let w2 = ready(&mut w2).unwrap();
        pending(&mut w3);
        check(&root, 256, 256, 1);
        rb.try_shrink(8).unwrap();
        let w3 = ready(&mut w3).unwrap();
        check(&root, 256, 256, 0);
        check(&a, 256, 64, 0);
        check(&b, 256, 128, 0);
        drop((w0, w1, w2, w3, ra, rb));
        check(&root, 256, 0, 0);
        check(&a, 256, 0, 0);
        check(&b, 256, 0, 0);
    });
}

/// A blocking thread and a tokio task wait while a pool is overcommitted and are served once
/// it is repaid.
#[test]
fn overcommit_repaid_wakes_blocking_and_async_waiters() {
    watchdog(30, || {
        let pool = fixed(BufferSize::S64, 256);
        let mut r = pool.try_reserve(0).unwrap();
        r.force_grow(300).unwrap();
        check(&pool, 256, 304, 0);
        let blocking = thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.allocate_blocking(1).map(|a| a.length())
        });
        wait_waiting(&pool, 1);
        let rt = current_thread();
        let task = rt.spawn(Arc::clone(&pool).reserve_owned(64));
        rt.block_on(async {
            wait_waiting_async(&pool, 2).await;
        });
        r.resize_to(128).unwrap();
        assert_eq!(blocking.join().unwrap(), Ok(1));
        let reservation = rt.block_on(async { within(10, task).await.unwrap().unwrap() });
        assert_eq!(reservation.size(), 64);
        check(&pool, 256, 192, 0);
        drop((reservation, r));
        check(&pool, 256, 0, 0);
    });
}

/// Bad input to force_grow: sizes no pool can count fail with ExceedsBudget, unchanged, at
/// every level (all or nothing up a chain); 0 changes nothing.
#[test]
fn force_grow_bad_input_is_refused_unchanged() {
    let pool = fixed(BufferSize::S64, 128);
    let mut r = pool.try_reserve(16).unwrap();
    r.resize_to(13).unwrap();
    assert_eq!(
        r.force_grow(usize::MAX).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            max_memory: 128
        }
    );
    assert_eq!(r.size(), 13);
    check(&pool, 128, 16, 0);
    assert!(matches!(
        r.force_grow(usize::MAX - 13),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert!(matches!(
        r.force_grow(MAX_IN_USE),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert_eq!(r.size(), 13);
    check(&pool, 128, 16, 0);
    r.force_grow(0).unwrap();
    assert_eq!(r.size(), 13);
    r.force_grow(3).unwrap(); // within the rounding held
    assert_eq!(r.size(), 16);
    check(&pool, 128, 16, 0);
    // Up to what the pool counts: fine (no memory, only budget).
    r.force_grow(MAX_IN_USE - 16).unwrap();
    assert_eq!(r.size(), MAX_IN_USE);
    check(&pool, 128, MAX_IN_USE, 0);
    assert!(matches!(
        pool.try_reserve(0).unwrap().force_grow(8),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert_eq!(r.free(), MAX_IN_USE);
    check(&pool, 128, 0, 0);

    // All or nothing up a chain: the root cannot count it, the child level is given back.
    let root = BufPool::new(cfg(BufferSize::S64, usize::MAX));
    let x = root.child("x", cfg(BufferSize::S64, 640)).unwrap();
    let y = root.child("y", cfg(BufferSize::S64, 640)).unwrap();
    let mut rx = x.try_reserve(0).unwrap();
    let mut ry = y.try_reserve(0).unwrap();
    rx.force_grow(3 << 50).unwrap();
    assert!(matches!(
        ry.force_grow(2 << 50),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert_eq!(ry.size(), 0);
    check(&y, 640, 0, 0);
    check(&x, 640, 3 << 50, 0);
    check(&root, usize::MAX, 3 << 50, 0);
    assert_eq!(root.stats().overcommit_bytes, (3 << 50) - COUNTED);
    assert_eq!(rx.free(), 3 << 50);
    check(&root, usize::MAX, 0, 0);

    // A closed pool: force_grow still always succeeds (nothing waits there any more).
    let pool = fixed(BufferSize::S64, 128);
    let mut r = pool.try_reserve(8).unwrap();
    pool.close();
    r.force_grow(200).unwrap();
    check(&pool, 128, 208, 0);
    assert_eq!(r.free(), 208);
    check(&pool, 128, 0, 0);
}

// ---------------------------------------------------------------------------------------
// Exact sizes: resize_to, try_shrink, free, split, merge
// ---------------------------------------------------------------------------------------

/// Random walks of resize_to (and try_shrink, force_grow) in a child pool: after every call
/// the size is exact and every level holds it rounded up to 8; the walk ends with exactly 0
/// in use.
#[test]
fn resize_to_round_trips_leave_exactly_zero_in_use() {
    let root = BufPool::new(cfg(BufferSize::S8, 4096));
    let child = root.child("c", cfg(BufferSize::S8, 1024)).unwrap();
    let mut rng = Rng::new(19);
    let mut r = child.try_reserve(0).unwrap();
    let mut other = root.try_reserve(0).unwrap();
    for step in 0..rounds(2000, 100) {
        let before = r.size();
        match rng.range(0, 5) {
            0..=2 => {
                let size = rng.range(0, 1100);
                match r.resize_to(size) {
                    Ok(()) => assert_eq!(r.size(), size),
                    Err(AllocError::ExceedsBudget { .. }) => {
                        assert!(size.next_multiple_of(8) > 1024, "step {step}: {size}");
                        assert_eq!(r.size(), before);
                    }
                    Err(error) => panic!("step {step}: {error}"),
                }
            }
            3 => {
                let less = rng.range(0, before + 1);
                match r.try_shrink(less) {
                    Ok(()) => assert_eq!(r.size(), before - less),
                    Err(_) => {
                        assert_eq!(less, before + 1);
                        assert_eq!(r.size(), before);
                    }
                }
            }
            4 => {
                let more = rng.range(0, 40);
                r.force_grow(more).unwrap();
                assert_eq!(r.size(), before + more);
            }
            _ => {
                // Bytes of the root's own, exact too.
                other.resize_to(rng.range(0, 300)).unwrap();
            }
        }
        let held = r.size().next_multiple_of(8);
        let stats = child.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.reserved_bytes),
            (held, held),
            "step {step}"
        );
        assert_eq!(stats.overcommit_bytes, held.saturating_sub(1024));
        assert_eq!(
            root.stats().in_use_bytes,
            held + other.size().next_multiple_of(8),
            "step {step}"
        );
    }
    r.resize_to(0).unwrap();
    other.resize_to(0).unwrap();
    check(&child, 1024, 0, 0);
    check(&root, 4096, 0, 0);
    // The same walk's end by free() and try_shrink(size).
    r.resize_to(1017).unwrap();
    assert_eq!(r.free(), 1017);
    r.resize_to(1).unwrap();
    r.try_shrink(1).unwrap();
    check(&child, 1024, 0, 0);
    check(&root, 4096, 0, 0);
}

/// split and merge keep exact sizes after resize_to; two odd sizes merged give back the
/// rounding they no longer need; allocations out of an exact reservation leave it exact.
#[test]
fn exact_sizes_through_split_and_merge_after_resize_to() {
    let pool = fixed(BufferSize::S8, 640);
    let mut r = pool.try_reserve(0).unwrap();
    r.resize_to(13).unwrap();
    let part = r.split(13); // all of it
    assert_eq!((r.size(), part.size()), (0, 13));
    check(&pool, 640, 16, 0);
    r.merge(part).unwrap();
    assert_eq!(r.size(), 13);
    check(&pool, 640, 16, 0);
    r.resize_to(21).unwrap();
    let part = r.split(8);
    assert_eq!((r.size(), part.size()), (13, 8));
    check(&pool, 640, 24, 0);
    r.merge(part).unwrap();
    assert_eq!(r.size(), 21);
    check(&pool, 640, 24, 0);
    // 3 + 3: 6 exact, held 8 (the second 8 goes back).
    let mut a = pool.try_reserve(0).unwrap();
    let mut b = pool.try_reserve(0).unwrap();
    a.resize_to(3).unwrap();
    b.resize_to(3).unwrap();
    check(&pool, 640, 40, 0);
    a.merge(b).unwrap();
    assert_eq!(a.size(), 6);
    check(&pool, 640, 32, 0);
    a.try_shrink(6).unwrap();
    check(&pool, 640, 24, 0);
    // Split of a part not a multiple of 8 (the rest) after resize_to.
    let mut c = r.split(16);
    assert_eq!((r.size(), c.size()), (5, 16));
    check(&pool, 640, 24, 0);
    c.try_shrink(1).unwrap();
    assert_eq!(c.size(), 15);
    r.merge(c).unwrap();
    assert_eq!(r.size(), 20);
    check(&pool, 640, 24, 0);
    // Buffers out of it: exact what is left.
    let buffers = r.allocate(2).unwrap();
    assert_eq!(r.size(), 4);
    check(&pool, 640, 24, 0);
    check_reserved(&pool, 8);
    assert_eq!(
        r.allocate(1).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 8,
            max_memory: 4
        }
    );
    drop(buffers);
    check(&pool, 640, 8, 0);
    assert_eq!(r.free(), 4);
    check(&pool, 640, 0, 0);
    check_reserved(&pool, 0);
}

/// Bad input to the exact calls: resize_to(usize::MAX) and above the budget refuse with
/// ExceedsBudget, unchanged; resize_to growth never barges past waiters (WouldBlock) and
/// never waits; try_shrink(size + 1) refuses, unchanged; forget_max_memory(0) is 0;
/// add_max_memory(usize::MAX) saturates (no limit).
#[test]
fn exact_calls_and_deltas_bad_input() {
    watchdog(30, || {
        let pool = fixed(BufferSize::S64, 128);
        let mut r = pool.try_reserve(0).unwrap();
        r.resize_to(13).unwrap();
        assert_eq!(
            r.resize_to(usize::MAX).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory: 128
            }
        );
        assert_eq!(r.size(), 13);
        assert!(matches!(
            r.resize_to(usize::MAX - 7),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert!(matches!(
            r.resize_to(129),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert_eq!(r.size(), 13);
        check(&pool, 128, 16, 0);
        assert_eq!(
            r.try_shrink(14).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 14,
                max_memory: 13
            }
        );
        assert_eq!(
            r.try_shrink(usize::MAX).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory: 13
            }
        );
        assert_eq!(r.size(), 13);
        check(&pool, 128, 16, 0);
        // No barging: 112 bytes free, but a request for 128 waits first.
        let mut head = Box::pin(pool.allocate(2));
        pending(&mut head);
        assert_eq!(r.resize_to(24).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(r.size(), 13);
        r.resize_to(16).unwrap(); // within the rounding held: no bytes taken
        assert_eq!(r.size(), 16);
        check(&pool, 128, 16, 1);
        r.resize_to(0).unwrap();
        let head = ready(&mut head).unwrap();
        check(&pool, 128, 128, 0);
        drop(head);
        // Closed: growth refused, shrinking still fine.
        r.resize_to(40).unwrap();
        pool.close();
        assert_eq!(r.resize_to(48).unwrap_err(), AllocError::Closed);
        r.resize_to(1).unwrap();
        assert_eq!(r.free(), 1);
        check(&pool, 128, 0, 0);

        // The deltas.
        let pool = fixed(BufferSize::S64, 640);
        assert_eq!(pool.forget_max_memory(0), 0);
        assert_eq!(pool.add_max_memory(0), 640);
        check(&pool, 640, 0, 0);
        assert_eq!(pool.add_max_memory(usize::MAX), usize::MAX);
        assert_eq!(pool.add_max_memory(usize::MAX), usize::MAX);
        check(&pool, usize::MAX, 0, 0);
        // No limit: 1 PiB of budget (no memory) is fine, above 2 PiB is not.
        let huge = pool.try_reserve(COUNTED / 2).unwrap();
        assert!(matches!(
            pool.try_reserve(COUNTED),
            Err(AllocError::WouldBlock | AllocError::ExceedsBudget { .. })
        ));
        assert!(matches!(
            pool.try_reserve(COUNTED + 8),
            Err(AllocError::ExceedsBudget { .. })
        ));
        check(&pool, usize::MAX, COUNTED / 2, 0);
        // Forgetting from "no limit" counts it as 2 PiB first.
        assert_eq!(pool.forget_max_memory(8), 8);
        check(&pool, COUNTED - 8, COUNTED / 2, 0);
        assert_eq!(pool.forget_max_memory(usize::MAX), COUNTED / 2 - 8);
        check(&pool, COUNTED / 2, COUNTED / 2, 0);
        drop(huge);
        assert_eq!(pool.forget_max_memory(usize::MAX), COUNTED / 2 - 64);
        check(&pool, 64, 0, 0);
        assert_eq!(pool.stats().total_allocations, 0);
    });
}

// ---------------------------------------------------------------------------------------
// Owned allocations and reservations keep the pool alive
// ---------------------------------------------------------------------------------------

/// allocate_owned, reserve_owned (and its allocations) and PollAllocate's allocations, in a
/// tokio task that drops the last `Arc<BufPool>` while holding them: no deadlock (the
/// watchdog is a thread, since a blocked drop would block the runtime's thread too), the
/// pool lives on, and its drop completes when the last of them is given back.
#[test]
fn last_handle_dropped_in_a_task_while_holding_owned_allocations() {
    watchdog(30, || {
        let (root, pool) = family();
        let rt = current_thread();
        let task = rt.spawn({
            let root = Arc::clone(&root);
            async move {
                let allocation = Arc::clone(&pool).allocate_owned(1).await.unwrap();
                let mut reservation = Arc::clone(&pool).reserve_owned(200).await.unwrap();
                let out_of_reservation = reservation.allocate(2).unwrap();
                let mut poller = PollAllocate::new(Arc::clone(&pool));
                let polled = std::future::poll_fn(|cx| poller.poll_allocate(cx, 3))
                    .await
                    .unwrap();
                drop(poller);
                check(&pool, 640, 64 + 200 + 192, 0);
                drop(pool); // the last handle: returns at once
                tokio::task::yield_now().await;
                assert!(child_alive(&root));
                check(&root, 640, 64 + 200 + 192, 0);
                drop(allocation);
                drop(out_of_reservation);
                tokio::task::yield_now().await;
                assert!(child_alive(&root));
                check(&root, 640, 72 + 192, 0);
                drop(reservation);
                assert!(child_alive(&root));
                check(&root, 640, 192, 0);
                drop(polled); // the pool's drop runs and completes here
                assert!(!child_alive(&root));
                check(&root, 640, 0, 0);
            }
        });
        rt.block_on(async { within(10, task).await.unwrap() });
    });
}

/// into_filled() and freeze() of an owned allocation still keep the pool alive: the pool's
/// drop runs when the last clone of the `Bytes` is dropped.
#[cfg(feature = "bytes")]
#[test]
fn owned_allocation_into_filled_and_freeze_keep_the_pool_alive() {
    watchdog(30, || {
        let (root, pool) = family();
        let allocation = futures::executor::block_on(Arc::clone(&pool).allocate_owned(2)).unwrap();
        let zeroed =
            futures::executor::block_on(Arc::clone(&pool).allocate_zeroed_owned(1)).unwrap();
        drop(pool);
        let mut filled = allocation.into_filled();
        filled.extend_from_slice(b"hello, pool");
        assert!(child_alive(&root));
        let bytes = filled.freeze();
        let slice = bytes.slice(7..);
        drop(bytes);
        let mut zeroed = zeroed.into_filled();
        zeroed.set_filled(64);
        assert!(zeroed.iter().all(|&byte| byte == 0));
        drop(zeroed);
        assert!(child_alive(&root), "dropped under a live Bytes slice");
        check(&root, 640, 128, 0);
        assert_eq!(&slice[..], b"pool");
        let clone = slice.clone();
        drop(slice);
        assert!(child_alive(&root));
        drop(clone);
        assert!(!child_alive(&root));
        check(&root, 640, 0, 0);
    });
}

/// The pool's drop is still a barrier: when the last owned allocation goes back while a
/// plain reservation (taken while a handle was there) is held by another thread, the drop
/// waits for it, and completes as soon as it is given back.
#[test]
fn pool_drop_run_by_the_last_owned_allocation_waits_for_the_rest() {
    watchdog(30, || {
        let (root, pool) = family();
        let owned = futures::executor::block_on(Arc::clone(&pool).allocate_owned(1)).unwrap();
        let plain = pool.try_reserve(64).unwrap();
        drop(pool);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = thread::spawn(move || {
            release_rx.recv().unwrap();
            drop(plain);
        });
        let dropper = thread::spawn(move || drop(owned)); // runs the pool's drop: blocks
        wait_until(10, "the owned allocation's bytes are back", || {
            root.stats().in_use_bytes == 64
        });
        thread::sleep(Duration::from_millis(if cfg!(miri) { 1 } else { 20 }));
        assert!(!dropper.is_finished(), "the pool's drop did not wait");
        assert!(child_alive(&root));
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        dropper.join().unwrap();
        assert!(!child_alive(&root));
        check(&root, 640, 0, 0);
    });
}

/// Owned reservations moved into spawned tasks on a multi-thread runtime: the test drops its
/// handle at once, tasks grow, split and allocate out of them, and the last one given back
/// runs the pool's drop inside a task.
#[test]
fn owned_reservations_in_spawned_tasks_drop_the_last_handle() {
    watchdog(60, || {
        let (root, pool) = family();
        let tasks = rounds(200, 6);
        multi_thread().block_on(async {
            // Each task waits only before it holds anything (no hold-and-wait).
            let handles: Vec<_> = (0..tasks)
                .map(|i| {
                    let reserve = Arc::clone(&pool).reserve_owned(128);
                    tokio::spawn(async move {
                        let mut reservation = reserve.await.unwrap();
                        let part = reservation.split(8);
                        let buffer = (i % 2 == 0).then(|| reservation.allocate(1).unwrap());
                        reservation.resize_to(reservation.size() - 3).unwrap();
                        tokio::task::yield_now().await;
                        let buffers = 64 * usize::from(buffer.is_some());
                        assert_eq!(reservation.size() + part.size() + buffers, 125);
                        drop((reservation, part, buffer));
                    })
                })
                .collect();
            drop(pool);
            for handle in handles {
                within(30, handle).await.unwrap();
            }
        });
        assert!(!child_alive(&root));
        check(&root, 640, 0, 0);
    });
}

/// A reservation of a growing pool, shaped like DataFusion's spill loop: try to grow exactly;
/// when refused, overcommit (grow) and spill (shrink) later; a controller adds budget. The
/// reservation sizes stay exact throughout and everything comes back.
#[test]
fn exact_reservation_with_growth_and_overcommit_under_a_controller() {
    watchdog(30, || {
        let pool = growing(BufferSize::S64, 256);
        let mut rng = Rng::new(7);
        let mut r: Reservation = pool.try_reserve(0).unwrap();
        let mut exact = 0usize;
        for step in 0..rounds(2000, 60) {
            let want = rng.range(1, 100);
            match r.resize_to(exact + want) {
                Ok(()) => exact += want,
                Err(AllocError::WouldBlock) => {
                    if step % 3 == 0 {
                        r.force_grow(want).unwrap();
                        exact += want;
                    } else {
                        let spill = rng.range(0, exact);
                        r.try_shrink(spill).unwrap();
                        exact -= spill;
                    }
                }
                Err(error) => panic!("{error}"),
            }
            if step % 50 == 49 {
                pool.add_max_memory(64);
            }
            if step % 70 == 69 {
                pool.forget_max_memory(100);
            }
            assert_eq!(r.size(), exact);
            let stats = pool.stats();
            assert_eq!(stats.in_use_bytes, exact.next_multiple_of(8), "step {step}");
            assert_eq!(
                stats.overcommit_bytes,
                stats.in_use_bytes.saturating_sub(stats.max_memory)
            );
        }
        let max = pool.stats().max_memory;
        assert_eq!(r.free(), exact);
        check(&pool, max, 0, 0);
    });
}

/// `forget_max_memory` that removes nothing (0 asked, or nothing free) leaves `max_memory` as
/// it was, "no limit" (`usize::MAX`) included; only bytes actually removed change it.
#[test]
fn forget_of_nothing_leaves_max_memory_unchanged() {
    let pool = fixed(BufferSize::S64, 640);
    assert_eq!(pool.add_max_memory(usize::MAX), usize::MAX);
    check(&pool, usize::MAX, 0, 0);
    assert_eq!(pool.forget_max_memory(0), 0);
    check(&pool, usize::MAX, 0, 0);
    assert_eq!(pool.add_max_memory(8), usize::MAX, "still no limit");
    // A budget above what the pool counts, all of it in use: nothing to forget.
    let pool = fixed(BufferSize::S64, 3 << 50);
    let mut r = pool.try_reserve(0).unwrap();
    r.force_grow(COUNTED).unwrap();
    check(&pool, 3 << 50, COUNTED, 0);
    assert_eq!(pool.forget_max_memory(8), 0);
    check(&pool, 3 << 50, COUNTED, 0);
    assert_eq!(r.free(), COUNTED);
}

/// An owned reservation merged into a plain one of the same pool, after the last handle was
/// dropped: `merge` must not run the pool's drop (which would wait, on this thread, for the
/// very bytes just merged); the merged reservation holds the pool until it is given back.
#[test]
fn merging_an_owned_reservation_that_holds_the_last_handle() {
    let (root, pool) = family();
    let mut plain = pool.try_reserve(8).unwrap();
    let owned = futures::executor::block_on(Arc::clone(&pool).reserve_owned(16)).unwrap();
    drop(pool); // `owned` holds the last handle
    let (done_tx, done_rx) = mpsc::channel();
    let merger = thread::spawn(move || {
        let merged = plain.merge(owned).is_ok();
        done_tx.send(merged).unwrap();
        assert_eq!(plain.size(), 24);
        plain
    });
    let Ok(merged) = done_rx.recv_timeout(Duration::from_secs(2) * common::SLOWDOWN) else {
        // The root's drop would wait for the bytes the deadlocked thread holds.
        std::mem::forget(root);
        panic!("merge deadlocked: the pool's drop ran inside it, waiting for the merged bytes");
    };
    assert!(merged);
    let plain = merger.join().unwrap();
    assert!(child_alive(&root));
    check(&root, 640, 24, 0);
    drop(plain);
    check(&root, 640, 0, 0);
}

/// An owned waiter holding the last handle is aborted while queued: its place goes back, the
/// handle goes with it (no blocking: an owned allocation still holds the pool), and the pool's
/// drop runs when that allocation goes back.
#[test]
fn aborted_owned_waiter_holding_the_last_handle() {
    watchdog(30, || {
        let (root, pool) = family();
        let rt = current_thread();
        rt.block_on(async {
            let held = Arc::clone(&pool).allocate_owned(10).await.unwrap();
            let waiter = tokio::spawn(Arc::clone(&pool).allocate_owned(1));
            let mut poller = PollAllocate::new(Arc::clone(&pool));
            assert!(poller.poll_allocate(&mut cx(), 2).is_pending());
            wait_waiting_async(&pool, 2).await;
            drop(pool);
            waiter.abort();
            assert!(within(10, waiter).await.unwrap_err().is_cancelled());
            check(&root, 640, 640, 0);
            assert_eq!(root.report().children[0].waiting, 1);
            drop(poller);
            assert_eq!(root.report().children[0].waiting, 0);
            check(&root, 640, 640, 0);
            assert!(child_alive(&root));
            drop(held);
            assert!(!child_alive(&root));
            check(&root, 640, 0, 0);
        });
    });
}

/// PollAllocate on a growing pool: a request above the budget stays pending (its place kept)
/// until growth; its allocation keeps the pool alive after the poller and the last handle go.
#[test]
fn poll_allocate_waits_for_growth_and_keeps_the_pool_alive() {
    watchdog(30, || {
        let root = fixed(BufferSize::S64, 1024);
        let pool = Arc::new(
            BufPool::builder(cfg(BufferSize::S64, 64))
                .parent(&root)
                .wait_for_growth()
                .build()
                .unwrap(),
        );
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        assert!(poller.poll_allocate(&mut cx(), 4).is_pending());
        let mut behind = Box::pin(pool.allocate(1));
        pending(&mut behind);
        check(&pool, 64, 0, 2);
        assert_eq!(pool.add_max_memory(128), 192);
        assert!(poller.poll_allocate(&mut cx(), 4).is_pending());
        pending(&mut behind);
        assert_eq!(pool.add_max_memory(128), 320);
        let Poll::Ready(Ok(four)) = poller.poll_allocate(&mut cx(), 4) else {
            panic!("not granted after growth");
        };
        let one = ready(&mut behind).unwrap();
        drop(behind);
        check(&pool, 320, 320, 0);
        drop(one);
        drop(poller);
        drop(pool);
        assert!(child_alive(&root));
        check(&root, 1024, 256, 0);
        drop(four);
        assert!(!child_alive(&root));
        check(&root, 1024, 0, 0);
    });
}

/// Everything at once on a tree, from threads: buffers and reservations in a fixed child and
/// a growing child (waiting for its growth), overcommit forced and repaid, controllers adding
/// and forgetting on the growing root and the growing child. No waiter is lost (the
/// watchdog), and at the end every level is back to exactly 0 with the budgets each
/// controller left.
#[test]
fn tree_stress_with_overcommit_growth_and_controllers() {
    watchdog(60, || {
        let loops = rounds(600, 8);
        let root = growing(BufferSize::S64, 512);
        let a = Arc::new(root.child("a", cfg(BufferSize::S64, 512)).unwrap());
        let b = Arc::new(
            BufPool::builder(cfg(BufferSize::S64, 256))
                .parent(&root)
                .wait_for_growth()
                .build()
                .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        workers.push(thread::spawn({
            let a = Arc::clone(&a);
            move || {
                let mut rng = Rng::new(1);
                for _ in 0..loops {
                    let n = rng.range(1, 4);
                    assert_eq!(a.allocate_blocking(n).unwrap().length(), n);
                }
            }
        }));
        workers.push(thread::spawn({
            let b = Arc::clone(&b);
            move || {
                let mut rng = Rng::new(2);
                for _ in 0..loops {
                    let mut r = b.reserve_blocking(rng.range(1, 256)).unwrap();
                    let target = rng.range(0, 300);
                    match r.resize_to(target) {
                        Ok(()) => assert_eq!(r.size(), target),
                        Err(AllocError::WouldBlock | AllocError::ExceedsBudget { .. }) => {}
                        Err(error) => panic!("{error}"),
                    }
                    thread::yield_now();
                }
            }
        }));
        workers.push(thread::spawn({
            let a = Arc::clone(&a);
            move || {
                let mut rng = Rng::new(3);
                let mut r = a.try_reserve(0).unwrap();
                for _ in 0..loops {
                    r.force_grow(rng.range(1, 200)).unwrap();
                    thread::yield_now();
                    let less = rng.range(0, r.size());
                    r.try_shrink(less).unwrap();
                    if rng.range(0, 3) == 0 {
                        r.free();
                    }
                }
                r.free();
            }
        }));
        let controller = |pool: Arc<BufPool>, seed: u64| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut rng = Rng::new(seed);
                let (mut added, mut forgotten) = (0, 0);
                while !stop.load(SeqCst) {
                    let k = rng.range(1, 128);
                    pool.add_max_memory(k);
                    added += k;
                    thread::yield_now();
                    forgotten += pool.forget_max_memory(k);
                }
                added - forgotten
            })
        };
        let root_controller = controller(Arc::clone(&root), 4);
        let b_controller = controller(Arc::clone(&b), 5);
        for worker in workers {
            worker.join().unwrap();
        }
        stop.store(true, SeqCst);
        let root_surplus = root_controller.join().unwrap();
        let b_surplus = b_controller.join().unwrap();
        check(&a, 512, 0, 0);
        check(&b, 256 + b_surplus, 0, 0);
        check(&root, 512 + root_surplus, 0, 0);
        for pool in [&root, &a, &b] {
            let stats = pool.stats();
            assert_eq!(
                (stats.outstanding, stats.reserved_bytes),
                (0, 0),
                "{stats:?}"
            );
        }
        assert_eq!(a.stats().total_allocations, loops);
    });
}
