//! Regression tests for the failures measured on the older design (frozen-core 0.0.32
//! `bufpool`, see shared/reference/peers-measured.md), each reproduced as it was observed:
//!
//! | defect | test |
//! |---|---|
//! | lost wakeup | `regression_lost_wakeup_*` |
//! | mixed-size stall | `regression_release_wakes_only_one_of_three_small_waiters_*` |
//! | starvation | `regression_starvation_*` |
//! | dangling pool | `regression_dangling_pool_*` |
//! | drop race | `regression_drop_race_release_vs_pool_drop` |
//! | `allocate(0)` | `regression_allocate_zero` |
//! | request above budget | `regression_request_above_budget_*` |
//! | size overflow | `regression_size_overflow` |

mod common;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use common::*;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};

// --- lost wakeup: "70 hangs in 1M hand-off rounds"; a waiter hangs although budget is free.

#[test]
fn regression_lost_wakeup_blocking_handoff() {
    watchdog(60, || {
        let pool = shared_pool(1);
        let rounds = rounds(100_000, 40);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                thread::spawn(move || {
                    for _ in 0..rounds / 2 {
                        drop(pool.allocate_blocking(1).unwrap());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_idle(&pool);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_lost_wakeup_async_and_blocking_handoff() {
    let pool = shared_pool(1);
    let rounds = rounds(50_000, 20);
    let task = tokio::spawn({
        let pool = pool.clone();
        async move {
            for _ in 0..rounds / 2 {
                drop(pool.allocate(1).await.unwrap());
            }
        }
    });
    let thread = thread_future({
        let pool = pool.clone();
        move || {
            for _ in 0..rounds / 2 {
                drop(pool.allocate_blocking(1).unwrap());
            }
        }
    });
    within(60, async {
        task.await.unwrap();
        thread.await;
    })
    .await;
    assert_idle(&pool);
}

/// The waiter checks, then sleeps, while the holder releases: every release must wake it.
#[test]
fn regression_lost_wakeup_waiter_queues_while_holder_releases() {
    watchdog(60, || {
        let pool = shared_pool(1);
        for _ in 0..rounds(2_000, 10) {
            let held = pool.try_allocate(1).unwrap();
            let waiter = thread::spawn({
                let pool = pool.clone();
                move || drop(pool.allocate_blocking(1).unwrap())
            });
            // No waiting for the queue here on purpose: the release races the enqueue.
            drop(held);
            waiter.join().unwrap();
        }
        assert_idle(&pool);
    });
}

// --- mixed-size stall: "hold allocate(4), 3 waiters on allocate(1), release: only 1 of 3
//     wakes (16/16 runs)".

#[test]
fn regression_release_wakes_only_one_of_three_small_waiters_blocking() {
    watchdog(30, || {
        for _ in 0..rounds(16, 2) {
            let pool = shared_pool(4);
            let held = pool.allocate_blocking(4).unwrap();
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let pool = pool.clone();
                    thread::spawn(move || pool.allocate_blocking(1).unwrap())
                })
                .collect();
            wait_waiting(&pool, 3);
            drop(held);
            let all: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
            assert_eq!(pool.stats().outstanding, 3);
            drop(all);
            assert_idle(&pool);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_release_wakes_only_one_of_three_small_waiters_async() {
    for _ in 0..rounds(16, 1) {
        let pool = shared_pool(4);
        let held = pool.allocate(4).await.unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.allocate(1).await.unwrap() })
            })
            .collect();
        wait_waiting_async(&pool, 3).await;
        drop(held);
        let all = within(10, async {
            let mut all = Vec::new();
            for waiter in waiters {
                all.push(waiter.await.unwrap());
            }
            all
        })
        .await;
        assert_eq!(pool.stats().outstanding, 3);
        drop(all);
        assert_idle(&pool);
    }
}

// --- starvation: "allocate(4) among allocate(1) loops: max wait 868 ms" (barging).

/// Awaits `allocate(n)` and returns how many small grants happened from the moment the
/// request was queued (its first pending poll) to its grant; `None` if it never waited.
async fn grants_overtaking(pool: &BufPool, n: usize, small_grants: &AtomicUsize) -> Option<usize> {
    let mut future = Box::pin(pool.allocate(n));
    let mut queued_at = None;
    let allocation = poll_fn(|cx| {
        let poll = Pin::new(&mut future).poll(cx);
        if poll.is_pending() && queued_at.is_none() {
            queued_at = Some(small_grants.load(SeqCst));
        }
        poll
    })
    .await
    .unwrap();
    let overtaking = queued_at.map(|at| small_grants.load(SeqCst) - at);
    drop(allocation);
    overtaking
}

/// Small requests loop on three callers (two tasks and a thread). Once the large request is
/// queued, only requests queued before it may be served first: each small caller has at most
/// one such request and at most one grant not yet counted, so at most 6 small grants can be
/// counted while it waits, under any interleaving. With barging there were thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_starvation_large_request_overtaken_only_by_earlier_arrivals() {
    let pool = shared_pool(4);
    let stop = Arc::new(AtomicBool::new(false));
    let small_grants = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (pool, stop, small_grants) = (pool.clone(), stop.clone(), small_grants.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let allocation = pool.allocate(1).await.unwrap();
                small_grants.fetch_add(1, SeqCst);
                tokio::task::yield_now().await;
                drop(allocation);
            }
        }));
    }
    let thread = thread_future({
        let (pool, stop, small_grants) = (pool.clone(), stop.clone(), small_grants.clone());
        move || {
            while !stop.load(SeqCst) {
                let allocation = pool.allocate_blocking(1).unwrap();
                small_grants.fetch_add(1, SeqCst);
                thread::yield_now();
                drop(allocation);
            }
        }
    });
    wait_until_async(10, "the small loops run", || small_grants.load(SeqCst) > 10).await;
    let (mut worst, mut queued) = (0, 0);
    within(30, async {
        for _ in 0..rounds(300, 2) {
            if let Some(overtaking) = grants_overtaking(&pool, 4, &small_grants).await {
                worst = worst.max(overtaking);
                queued += 1;
            }
        }
    })
    .await;
    stop.store(true, SeqCst);
    within(10, async {
        for task in tasks {
            task.await.unwrap();
        }
        thread.await;
    })
    .await;
    assert!(
        worst <= 6,
        "{worst} small grants overtook a queued large request"
    );
    eprintln!("the large request waited in {queued} rounds; at most {worst} overtook it");
    assert!(
        cfg!(miri) || queued > 0,
        "the large request never had to wait"
    );
    assert_idle(&pool);
}

// --- dangling pool: "move the pool after allocating: its drop hangs; move it out of a Box:
//     Miri reports use-after-free".

#[test]
fn regression_dangling_pool_move_after_allocating() {
    watchdog(10, || {
        let pool = pool(BufferSize::S64, 4);
        let allocation = pool.try_allocate(2).unwrap();
        let moved = pool; // the pool's bytes move; the allocation must not point at them
        let moved_again = [moved];
        let [pool] = moved_again;
        // SAFETY: 128 writable bytes.
        unsafe { allocation.first().write_bytes(7, 128) };
        drop(allocation);
        assert_idle(&pool);
        drop(pool); // hung in the older design
    });
}

#[test]
fn regression_dangling_pool_move_out_of_box() {
    watchdog(10, || {
        let boxed = Box::new(pool(BufferSize::S64, 4));
        let allocation = boxed.try_allocate(4).unwrap();
        let pool = *boxed; // frees the box the older design pointed into
        drop(allocation); // use-after-free in the older design
        assert_full_budget_back(&pool);
        drop(pool);
    });
}

// --- drop race: "notify after fetch_sub touches the pool after its drop may have freed it"
//     (a data race with deallocation under Miri).

#[test]
fn regression_drop_race_release_vs_pool_drop() {
    watchdog(30, || {
        for round in 0..rounds(300, 8) {
            let pool = pool(BufferSize::S64, 2);
            let allocations = [pool.try_allocate(1).unwrap(), pool.try_allocate(1).unwrap()];
            let [first, second] = allocations;
            let releaser = thread::spawn(move || {
                drop(first);
                if round % 2 == 0 {
                    thread::yield_now();
                }
                drop(second); // the last release: wakes the dropping thread
            });
            drop(pool); // closes, waits for both, then frees the shared state
            releaser.join().unwrap();
        }
    });
}

/// The same race with waiters queued, so the last release goes through the slow path (lock,
/// hand-off, notifications) while the pool is being dropped.
#[test]
fn regression_drop_race_slow_path_release_vs_pool_drop() {
    watchdog(30, || {
        for _ in 0..rounds(200, 5) {
            let pool = Arc::new(pool(BufferSize::S64, 1));
            let held = pool.try_allocate(1).unwrap();
            let waiter = thread::spawn({
                let pool = pool.clone();
                move || pool.allocate_blocking(1).map(drop)
            });
            wait_waiting(&pool, 1);
            let dropper = thread::spawn(move || drop(pool));
            drop(held); // hands the buffer to the waiter, which then drops its Arc
            assert_eq!(waiter.join().unwrap(), Ok(()));
            dropper.join().unwrap();
        }
    });
}

// --- allocate(0): "zero-size Layout passed to alloc: undefined behaviour".

#[test]
fn regression_allocate_zero() {
    watchdog(10, || {
        let pool = pool(BufferSize::S64, 4);
        assert_eq!(pool.try_allocate(0).unwrap_err(), AllocError::ZeroBuffers);
        assert_eq!(
            pool.try_allocate_zeroed(0).unwrap_err(),
            AllocError::ZeroBuffers
        );
        assert_eq!(
            pool.allocate_blocking(0).unwrap_err(),
            AllocError::ZeroBuffers
        );
        assert_eq!(
            pool.allocate_zeroed_blocking(0).unwrap_err(),
            AllocError::ZeroBuffers
        );
        assert_eq!(
            pool.allocate_timeout(0, Duration::from_secs(1))
                .unwrap_err(),
            AllocError::ZeroBuffers
        );
        assert_eq!(
            err(futures::executor::block_on(pool.allocate(0))),
            AllocError::ZeroBuffers
        );
        assert_eq!(
            err(futures::executor::block_on(pool.allocate_zeroed(0))),
            AllocError::ZeroBuffers
        );
        assert_idle(&pool);
    });
}

// --- request above budget: "waits for memory that can never come; blocks forever".

#[test]
fn regression_request_above_budget_blocking_errors_at_once() {
    watchdog(10, || {
        let pool = pool(BufferSize::S64, 4);
        let expected = AllocError::ExceedsBudget {
            requested_bytes: 5 * 64,
            max_memory: 4 * 64,
        };
        assert_eq!(pool.allocate_blocking(5).unwrap_err(), expected);
        assert_eq!(pool.allocate_zeroed_blocking(5).unwrap_err(), expected);
        assert_eq!(
            pool.allocate_timeout(5, Duration::MAX).unwrap_err(),
            expected
        );
        // Also while the budget is partly used.
        let held = pool.try_allocate(1).unwrap();
        assert_eq!(pool.allocate_blocking(5).unwrap_err(), expected);
        drop(held);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_request_above_budget_async_errors_at_once() {
    let pool = shared_pool(4);
    let result = within(10, pool.allocate(5)).await;
    assert_eq!(
        err(result),
        AllocError::ExceedsBudget {
            requested_bytes: 320,
            max_memory: 256
        }
    );
}

// --- size overflow: "n * buffer_size wraps in release: length() of 2^58 with 64 bytes".

#[test]
fn regression_size_overflow() {
    let pool = pool(BufferSize::S64, 4);
    let n = usize::MAX / 64 + 1; // 2^58 on 64-bit targets: n * 64 wraps to 0
    for result in [
        pool.try_allocate(n),
        pool.allocate_blocking(n),
        pool.allocate_timeout(n, Duration::ZERO),
        futures::executor::block_on(pool.allocate(n)),
    ] {
        assert_eq!(
            err(result),
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory: 256
            }
        );
    }
    // With no limit at all (`usize::MAX`), the overflow is still caught.
    let big = BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: usize::MAX,
    });
    assert!(matches!(
        big.try_allocate(n),
        Err(AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            ..
        })
    ));
    assert_idle(&pool);
}
