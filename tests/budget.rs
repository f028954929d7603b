//! Issue 2, guarantees 1 (budget), 3 (no lost wakeups), 4 (every waiter that fits is woken)
//! and 9 (exact stats), plus `set_max_memory`; with async (tokio multi-thread), blocking
//! (std threads) and mixed callers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use common::*;
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, ConfigError};

const BUF: usize = 64;

// ---------------------------------------------------------------------------------------------
// 1. Budget: live bytes never exceed max_memory, under any mix of callers.
// ---------------------------------------------------------------------------------------------

/// One blocking caller: every call form, random sizes, checked at every step.
fn blocking_caller(pool: &BufPool, checker: &BudgetChecker, tag: u8, seed: u64, rounds: usize) {
    let mut rng = Rng::new(seed);
    let max_n = pool.stats().max_memory / BUF;
    for _ in 0..rounds {
        let n = rng.range(1, max_n);
        let allocation = match rng.range(0, 3) {
            0 => pool.allocate_blocking(n).expect("allocate_blocking"),
            1 => pool
                .allocate_zeroed_blocking(n)
                .expect("allocate_zeroed_blocking"),
            2 => match pool.allocate_timeout(n, Duration::from_micros(rng.range(0, 300) as u64)) {
                Ok(allocation) => allocation,
                Err(AllocError::TimedOut) => continue,
                Err(error) => panic!("allocate_timeout: {error}"),
            },
            _ => match pool.try_allocate(n) {
                Ok(allocation) => allocation,
                Err(AllocError::WouldBlock) => continue,
                Err(error) => panic!("try_allocate: {error}"),
            },
        };
        checker.acquired(pool, &allocation, tag);
        if rng.range(0, 3) == 0 {
            thread::yield_now();
        }
        checker.releasing(&allocation, tag);
        drop(allocation);
    }
}

/// One async caller: every async call form, with cancellations, checked at every step.
async fn async_caller(
    pool: Arc<BufPool>,
    checker: Arc<BudgetChecker>,
    tag: u8,
    seed: u64,
    rounds: usize,
) {
    let mut rng = Rng::new(seed);
    let max_n = pool.stats().max_memory / BUF;
    for _ in 0..rounds {
        let n = rng.range(1, max_n);
        let allocation = match rng.range(0, 3) {
            0 => pool.allocate(n).await.expect("allocate"),
            1 => pool.allocate_zeroed(n).await.expect("allocate_zeroed"),
            2 => {
                let wait = Duration::from_micros(rng.range(0, 300) as u64);
                match tokio::time::timeout(wait, pool.allocate(n)).await {
                    Ok(result) => result.expect("allocate under timeout"),
                    Err(_elapsed) => continue,
                }
            }
            _ => match pool.try_allocate_zeroed(n) {
                Ok(allocation) => allocation,
                Err(AllocError::WouldBlock) => continue,
                Err(error) => panic!("try_allocate_zeroed: {error}"),
            },
        };
        checker.acquired(&pool, &allocation, tag);
        if rng.range(0, 2) == 0 {
            tokio::task::yield_now().await;
        }
        checker.releasing(&allocation, tag);
        drop(allocation);
    }
}

#[test]
fn budget_holds_for_blocking_callers() {
    watchdog(30, || {
        let pool = shared_pool(8);
        let checker = BudgetChecker::new(8 * BUF);
        let rounds = rounds(5_000, 15);
        let threads: Vec<_> = (0..4u8)
            .map(|tag| {
                let (pool, checker) = (pool.clone(), checker.clone());
                thread::spawn(move || blocking_caller(&pool, &checker, tag + 1, tag.into(), rounds))
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(checker.peak() <= 8 * BUF);
        assert_eq!(checker.live(), 0);
        assert_idle(&pool);
        assert_full_budget_back(&pool);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_for_async_callers() {
    let pool = shared_pool(8);
    let checker = BudgetChecker::new(8 * BUF);
    let rounds = rounds(5_000, 10);
    let tasks: Vec<_> = (0..if cfg!(miri) { 2u8 } else { 6 })
        .map(|tag| {
            tokio::spawn(async_caller(
                pool.clone(),
                checker.clone(),
                tag + 1,
                tag.into(),
                rounds,
            ))
        })
        .collect();
    within(30, async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    assert!(checker.peak() <= 8 * BUF);
    assert_idle(&pool);
    assert_full_budget_back(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_for_mixed_async_and_blocking_callers_in_one_queue() {
    let pool = shared_pool(8);
    let checker = BudgetChecker::new(8 * BUF);
    let rounds = rounds(4_000, 10);
    let mut tasks = Vec::new();
    for tag in 0..if cfg!(miri) { 1u8 } else { 3 } {
        tasks.push(tokio::spawn(async_caller(
            pool.clone(),
            checker.clone(),
            tag + 1,
            tag.into(),
            rounds,
        )));
    }
    let mut threads = Vec::new();
    for tag in 10..if cfg!(miri) { 11u8 } else { 12 } {
        let (pool, checker) = (pool.clone(), checker.clone());
        threads.push(thread_future(move || {
            blocking_caller(&pool, &checker, tag, tag.into(), rounds)
        }));
    }
    within(30, async {
        for task in tasks {
            task.await.unwrap();
        }
        for thread in threads {
            thread.await;
        }
    })
    .await;
    assert!(checker.peak() <= 8 * BUF);
    assert!(checker.peak() > 0);
    assert_idle(&pool);
    assert_full_budget_back(&pool);
}

#[test]
fn budget_exact_fill_then_nothing_more() {
    let pool = pool(BufferSize::S64, 8);
    let a = pool.try_allocate(5).unwrap();
    let b = pool.try_allocate(3).unwrap();
    assert_eq!(pool.stats().in_use_bytes, 8 * BUF);
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(
        pool.allocate_timeout(1, Duration::ZERO).unwrap_err(),
        AllocError::TimedOut
    );
    drop(a);
    assert_eq!(pool.try_allocate(6).unwrap_err(), AllocError::WouldBlock);
    let c = pool.try_allocate(5).unwrap();
    assert_eq!(pool.stats().in_use_bytes, 8 * BUF);
    drop((b, c));
    assert_idle(&pool);
}

#[test]
fn budget_with_remainder_never_hands_out_the_remainder() {
    // max_memory need not be a multiple of the buffer size; the remainder is never used.
    let pool = BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64 * 3 + 63,
    });
    let all = pool.try_allocate(3).unwrap();
    assert_eq!(all.allocated_bytes(), 192);
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert!(matches!(
        pool.try_allocate(4).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 256,
            max_memory: 255
        }
    ));
}

// ---------------------------------------------------------------------------------------------
// 3. No lost wakeups: a waiter whose request fits is always woken.
// ---------------------------------------------------------------------------------------------

/// Two threads race for a one-buffer budget; a single lost wake-up hangs one of them.
#[test]
fn no_lost_wakeup_blocking_handoff_rounds() {
    watchdog(30, || {
        let pool = shared_pool(1);
        let rounds = rounds(20_000, 30);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                thread::spawn(move || {
                    for _ in 0..rounds {
                        let allocation = pool.allocate_blocking(1).unwrap();
                        assert_eq!(pool.stats().in_use_bytes, BUF);
                        drop(allocation);
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
async fn no_lost_wakeup_async_handoff_rounds() {
    let pool = shared_pool(1);
    let rounds = rounds(20_000, 20);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let allocation = pool.allocate(1).await.unwrap();
                    assert_eq!(pool.stats().in_use_bytes, BUF);
                    drop(allocation);
                }
            })
        })
        .collect();
    within(30, async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    assert_idle(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lost_wakeup_mixed_task_and_thread_handoff_rounds() {
    let pool = shared_pool(1);
    let rounds = rounds(20_000, 20);
    let task = tokio::spawn({
        let pool = pool.clone();
        async move {
            for _ in 0..rounds {
                drop(pool.allocate(1).await.unwrap());
            }
        }
    });
    let thread = thread_future({
        let pool = pool.clone();
        move || {
            for _ in 0..rounds {
                drop(pool.allocate_blocking(1).unwrap());
            }
        }
    });
    within(30, async {
        task.await.unwrap();
        thread.await;
    })
    .await;
    assert_idle(&pool);
}

/// Strict ping-pong: at every release exactly one request is queued, and it must be woken.
#[test]
fn no_lost_wakeup_every_release_wakes_the_queued_waiter() {
    watchdog(30, || {
        let pool = shared_pool(1);
        let rounds = rounds(1_000, 10);
        let mut held = pool.try_allocate(1).unwrap();
        for _ in 0..rounds {
            let waiter = thread::spawn({
                let pool = pool.clone();
                move || pool.allocate_blocking(1).unwrap()
            });
            wait_waiting(&pool, 1);
            drop(held);
            held = waiter.join().unwrap();
            assert_eq!(pool.stats().in_use_bytes, BUF);
        }
        drop(held);
        assert_idle(&pool);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lost_wakeup_every_release_wakes_the_queued_task() {
    let pool = shared_pool(1);
    let rounds = rounds(1_000, 5);
    let held = pool.try_allocate(1).unwrap();
    let held = within(30, async {
        let mut held = held;
        for _ in 0..rounds {
            let waiter = tokio::spawn({
                let pool = pool.clone();
                async move { pool.allocate(1).await.unwrap() }
            });
            wait_waiting_async(&pool, 1).await;
            drop(held);
            held = waiter.await.unwrap();
        }
        held
    })
    .await;
    drop(held);
    assert_idle(&pool);
}

// ---------------------------------------------------------------------------------------------
// 4. Every waiter that fits is woken by one release.
// ---------------------------------------------------------------------------------------------

#[test]
fn one_release_wakes_all_three_small_blocking_waiters() {
    watchdog(20, || {
        for _ in 0..rounds(50, 2) {
            let pool = shared_pool(4);
            let held = pool.try_allocate(4).unwrap();
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let pool = pool.clone();
                    thread::spawn(move || pool.allocate_blocking(1).unwrap())
                })
                .collect();
            wait_waiting(&pool, 3);
            drop(held); // the only release: it must serve all three
            let got: Vec<BufPoolAllocation> =
                waiters.into_iter().map(|w| w.join().unwrap()).collect();
            let stats = pool.stats();
            assert_eq!((stats.in_use_bytes, stats.outstanding), (3 * BUF, 3));
            drop(got);
            assert_idle(&pool);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_all_three_small_async_waiters() {
    for _ in 0..rounds(50, 1) {
        let pool = shared_pool(4);
        let held = pool.try_allocate(4).unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.allocate(1).await.unwrap() })
            })
            .collect();
        wait_waiting_async(&pool, 3).await;
        drop(held);
        let got = within(10, async {
            let mut got = Vec::new();
            for waiter in waiters {
                got.push(waiter.await.unwrap());
            }
            got
        })
        .await;
        assert_eq!(pool.stats().outstanding, 3);
        drop(got);
        assert_idle(&pool);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_small_waiters_of_both_kinds() {
    let pool = shared_pool(4);
    let held = pool.try_allocate(4).unwrap();
    let task_a = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate(1).await.unwrap() }
    });
    wait_waiting_async(&pool, 1).await;
    let thread_b = thread_future({
        let pool = pool.clone();
        move || pool.allocate_blocking(2).unwrap()
    });
    wait_waiting_async(&pool, 2).await;
    let task_c = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate_zeroed(1).await.unwrap() }
    });
    wait_waiting_async(&pool, 3).await;
    drop(held);
    let (a, b, c) = within(10, async {
        (task_a.await.unwrap(), thread_b.await, task_c.await.unwrap())
    })
    .await;
    assert_eq!(
        (
            a.length(),
            b.length(),
            c.length(),
            pool.stats().in_use_bytes
        ),
        (1, 2, 1, 4 * BUF)
    );
}

/// A release serves the queue head first for as long as requests fit, then stops.
#[test]
fn release_serves_fitting_prefix_of_queue_and_no_more() {
    watchdog(20, || {
        let pool = shared_pool(4);
        let held = pool.try_allocate(4).unwrap();
        let mut waiters = Vec::new();
        for (i, n) in [1, 2, 1, 3].into_iter().enumerate() {
            let waiter_pool = pool.clone();
            waiters.push(thread::spawn(move || {
                waiter_pool.allocate_blocking(n).unwrap()
            }));
            wait_waiting(&pool, i + 1);
        }
        drop(held);
        let last = waiters.pop().unwrap();
        let first_three: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(
            first_three.iter().map(|a| a.length()).collect::<Vec<_>>(),
            [1, 2, 1]
        );
        let stats = pool.stats();
        assert_eq!((stats.in_use_bytes, stats.waiting), (4 * BUF, 1));
        assert!(!last.is_finished());
        drop(first_three);
        assert_eq!(last.join().unwrap().length(), 3);
        assert_idle(&pool);
    });
}

// ---------------------------------------------------------------------------------------------
// 9. Stats are exact when the pool is quiescent.
// ---------------------------------------------------------------------------------------------

#[test]
fn stats_exact_at_each_quiescent_step() {
    let pool = pool(BufferSize::S128, 10);
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.max_memory,
            stats.outstanding,
            stats.waiting,
            stats.buffer_size,
            stats.closed
        ),
        (0, 1280, 0, 0, 128, false)
    );
    assert_eq!(stats.available_bytes(), 1280);

    let a = pool.try_allocate(3).unwrap();
    let b = pool.try_allocate_zeroed(2).unwrap();
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.outstanding, stats.waiting),
        (640, 2, 0)
    );
    assert_eq!(stats.available_bytes(), 640);
    assert!(
        stats
            .to_string()
            .starts_with("640 of 1280 bytes in use by 2 allocations"),
        "{stats}"
    );

    // Two queued futures count as waiting, and not as outstanding.
    let mut w1 = Box::pin(pool.allocate(9));
    let mut w2 = Box::pin(pool.allocate(1));
    assert_pending(&mut w1);
    assert_pending(&mut w2);
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.outstanding, stats.waiting),
        (640, 2, 2)
    );
    drop(w2);
    assert_eq!(pool.stats().waiting, 1);
    drop(a); // 3 back: w1 (9) still does not fit in the 8 free
    assert_eq!((pool.stats().in_use_bytes, pool.stats().waiting), (256, 1));
    drop(b); // w1 granted: its bytes count as in use before it picks them up
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.outstanding, stats.waiting),
        (1152, 0, 0)
    );
    let c = ready(&mut w1).unwrap();
    assert_eq!((pool.stats().outstanding, c.length()), (1, 9));

    pool.close();
    let stats = pool.stats();
    assert!(stats.closed);
    let shown = stats.to_string();
    assert!(
        shown.starts_with("1152 of 1280 bytes in use by 1 allocations") && shown.contains("closed"),
        "{shown}"
    );
    drop(c);
    drop(w1);
    assert_idle(&pool);
    assert!(format!("{pool:?}").contains("BufPool"));
}

/// The running totals (peak, allocations, waits, refusals) are exact too.
#[test]
fn stats_totals_exact_at_each_quiescent_step() {
    let pool = pool(BufferSize::S64, 10);
    let stats = pool.stats();
    assert_eq!(
        (
            stats.peak_in_use_bytes,
            stats.total_allocations,
            stats.waited_allocations,
            stats.would_block,
            stats.timed_out,
            stats.cached_bytes
        ),
        (0, 0, 0, 0, 0, 0)
    );
    assert_eq!(stats.mean_wait(), Duration::ZERO);
    let a = pool.try_allocate(3).unwrap();
    let b = pool.allocate_blocking(2).unwrap();
    assert_eq!(pool.try_allocate(6).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(
        pool.allocate_timeout(6, Duration::ZERO).unwrap_err(),
        AllocError::TimedOut
    );
    let stats = pool.stats();
    assert_eq!(
        (
            stats.peak_in_use_bytes,
            stats.total_allocations,
            stats.would_block,
            stats.timed_out
        ),
        (5 * BUF, 2, 1, 1)
    );
    // A request that waits, then is granted and picked up.
    let mut waiter = Box::pin(pool.allocate(7));
    assert_pending(&mut waiter);
    drop(a);
    let c = ready(&mut waiter).unwrap();
    let stats = pool.stats();
    assert_eq!(
        (
            stats.peak_in_use_bytes,
            stats.total_allocations,
            stats.waited_allocations,
            stats.outstanding
        ),
        (9 * BUF, 3, 1, 2)
    );
    assert!(stats.max_wait >= stats.mean_wait());
    assert_eq!(stats.total_wait, stats.max_wait, "one wait: total == max");
    drop((b, c, waiter));
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.peak_in_use_bytes,
            stats.total_allocations
        ),
        (0, 9 * BUF, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_exact_after_concurrent_storm() {
    let pool = shared_pool(6);
    let checker = BudgetChecker::new(6 * BUF);
    let rounds = rounds(2_000, 5);
    let task = tokio::spawn(async_caller(pool.clone(), checker.clone(), 1, 7, rounds));
    let thread = thread_future({
        let (pool, checker) = (pool.clone(), checker.clone());
        move || blocking_caller(&pool, &checker, 2, 8, rounds)
    });
    within(30, async {
        task.await.unwrap();
        thread.await;
    })
    .await;
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.outstanding,
            stats.waiting,
            stats.max_memory,
            stats.closed
        ),
        (0, 0, 0, 6 * BUF, false)
    );
    // Exact with live allocations too.
    let live: Vec<_> = (1..=3).map(|n| pool.try_allocate(n).unwrap()).collect();
    assert_eq!(
        (pool.stats().in_use_bytes, pool.stats().outstanding),
        (6 * BUF, 3)
    );
    drop(live);
    assert_idle(&pool);
}

// ---------------------------------------------------------------------------------------------
// set_max_memory
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_budget_wakes_fitting_waiters_in_fifo_order() {
    let pool = shared_pool(2);
    let held = pool.try_allocate(2).unwrap();
    // A (2, async), B (1, blocking), C (2, async), queued in that order.
    let a = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate(2).await.unwrap() }
    });
    wait_waiting_async(&pool, 1).await;
    let b_done = Arc::new(AtomicBool::new(false));
    let b = thread_future({
        let (pool, b_done) = (pool.clone(), b_done.clone());
        move || {
            let allocation = pool.allocate_blocking(1).unwrap();
            b_done.store(true, SeqCst);
            allocation
        }
    });
    wait_waiting_async(&pool, 2).await;
    let c = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate(2).await.unwrap() }
    });
    wait_waiting_async(&pool, 3).await;

    // 1 buffer free: B would fit, but A is ahead of it.
    pool.set_max_memory(3 * BUF).unwrap();
    assert_eq!(pool.stats().waiting, 3);
    assert!(!b_done.load(SeqCst));
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);

    // 3 free: A (2) and B (1) are served, C (2) does not fit.
    pool.set_max_memory(5 * BUF).unwrap();
    let (a, b) = within(10, async { (a.await.unwrap(), b.await) }).await;
    assert_eq!((a.length(), b.length()), (2, 1));
    let stats = pool.stats();
    assert_eq!((stats.in_use_bytes, stats.waiting), (5 * BUF, 1));
    assert!(!c.is_finished());

    pool.set_max_memory(6 * BUF).unwrap(); // 1 free: C still does not fit
    assert_eq!(pool.stats().waiting, 1);
    pool.set_max_memory(7 * BUF).unwrap();
    let c = within(10, c).await.unwrap();
    assert_eq!(pool.stats().in_use_bytes, 7 * BUF);
    drop((held, a, b, c));
    assert_idle(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_budget_fails_waiters_that_can_never_fit() {
    let pool = shared_pool(8);
    let mut held: Vec<_> = (0..4).map(|_| pool.try_allocate(2).unwrap()).collect();
    let a = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate(6).await }
    });
    wait_waiting_async(&pool, 1).await;
    let b = thread_future({
        let pool = pool.clone();
        move || pool.allocate_blocking(2)
    });
    wait_waiting_async(&pool, 2).await;
    let c = thread_future({
        let pool = pool.clone();
        move || pool.allocate_timeout(8, Duration::from_secs(60))
    });
    wait_waiting_async(&pool, 3).await;

    pool.set_max_memory(4 * BUF).unwrap();
    let (a, c) = within(10, async { (a.await.unwrap(), c.await) }).await;
    assert_eq!(
        err(a),
        AllocError::ExceedsBudget {
            requested_bytes: 6 * BUF,
            max_memory: 4 * BUF
        }
    );
    assert_eq!(
        err(c),
        AllocError::ExceedsBudget {
            requested_bytes: 8 * BUF,
            max_memory: 4 * BUF
        }
    );
    // In use may stay above the new limit until the memory comes back.
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.max_memory, stats.waiting),
        (8 * BUF, 4 * BUF, 1)
    );
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    // New requests above the new limit fail at once.
    assert_eq!(
        err(pool.allocate(5).await),
        AllocError::ExceedsBudget {
            requested_bytes: 5 * BUF,
            max_memory: 4 * BUF
        }
    );

    held.pop(); // 6 in use: B (2) must not be served above the new budget
    assert_eq!(
        (pool.stats().in_use_bytes, pool.stats().waiting),
        (6 * BUF, 1)
    );
    held.pop(); // 4 in use: still no room
    assert_eq!(
        (pool.stats().in_use_bytes, pool.stats().waiting),
        (4 * BUF, 1)
    );
    held.pop(); // 2 in use: B fits
    let b = within(10, b).await.unwrap();
    assert_eq!(pool.stats().in_use_bytes, 4 * BUF);
    drop((b, held));
    assert_idle(&pool);
    assert_full_budget_back(&pool);
    assert_eq!(pool.stats().max_memory, 4 * BUF);
}

#[test]
fn shrink_budget_fails_blocking_waiter_and_keeps_fitting_one() {
    watchdog(20, || {
        let pool = shared_pool(4);
        let held = pool.try_allocate(4).unwrap();
        let big = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_zeroed_blocking(3)
        });
        wait_waiting(&pool, 1);
        let small = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_blocking(1)
        });
        wait_waiting(&pool, 2);
        pool.set_max_memory(2 * BUF).unwrap();
        assert_eq!(
            err(big.join().unwrap()),
            AllocError::ExceedsBudget {
                requested_bytes: 3 * BUF,
                max_memory: 2 * BUF
            }
        );
        assert_eq!(pool.stats().waiting, 1);
        drop(held);
        assert_eq!(small.join().unwrap().unwrap().length(), 1);
        assert_idle(&pool);
    });
}

#[test]
fn set_max_memory_below_one_buffer_is_config_error_and_changes_nothing() {
    let pool = pool(BufferSize::S256, 4);
    for bad in [0, 1, 255] {
        assert_eq!(
            pool.set_max_memory(bad),
            Err(ConfigError::MaxMemoryBelowBufferSize {
                max_memory: bad,
                buffer_size: 256
            })
        );
        assert_eq!(pool.stats().max_memory, 1024);
    }
    // No limit is a valid budget: a waiter for more than is left is served at once.
    let held = pool.try_allocate(4).unwrap();
    let mut big = Box::pin(pool.allocate(2));
    assert_pending(&mut big);
    pool.set_max_memory(usize::MAX).unwrap();
    assert_eq!(pool.stats().max_memory, usize::MAX);
    let big = futures::executor::block_on(big).unwrap();
    assert_eq!(pool.stats().in_use_bytes, 6 * 256);
    drop((held, big));
    pool.set_max_memory(256).unwrap();
    assert_eq!(pool.stats().max_memory, 256);
    assert_eq!(pool.try_allocate(1).unwrap().length(), 1);
    assert!(matches!(
        pool.try_allocate(2),
        Err(AllocError::ExceedsBudget {
            requested_bytes: 512,
            max_memory: 256
        })
    ));
}

/// Resizing while callers hammer the pool never lets the bytes in use exceed the larger of
/// the old and the new budget, and ends consistent.
#[test]
fn resize_under_load_stays_within_the_larger_budget() {
    watchdog(30, || {
        let pool = shared_pool(8);
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = rounds(3_000, 10);
        let workers: Vec<_> = (0..2u64)
            .map(|seed| {
                let pool = pool.clone();
                thread::spawn(move || {
                    let mut rng = Rng::new(seed);
                    for _ in 0..rounds {
                        match pool.allocate_timeout(rng.range(1, 2), Duration::from_millis(2)) {
                            Ok(allocation) => {
                                assert!(pool.stats().in_use_bytes <= 8 * BUF);
                                drop(allocation);
                            }
                            Err(AllocError::TimedOut | AllocError::ExceedsBudget { .. }) => {}
                            Err(error) => panic!("{error}"),
                        }
                    }
                })
            })
            .collect();
        let resizer = thread::spawn({
            let (pool, stop) = (pool.clone(), stop.clone());
            move || {
                let mut rng = Rng::new(99);
                while !stop.load(SeqCst) {
                    pool.set_max_memory(rng.range(2, 8) * BUF).unwrap();
                    assert!(pool.stats().in_use_bytes <= 8 * BUF);
                    thread::yield_now();
                }
            }
        });
        for worker in workers {
            worker.join().unwrap();
        }
        stop.store(true, SeqCst);
        resizer.join().unwrap();
        pool.set_max_memory(8 * BUF).unwrap();
        assert_idle(&pool);
        assert_full_budget_back(&pool);
    });
}

/// The live and total allocation counts stay exact across many wraps of the budget word's
/// small counters, whatever mix of fast-path, slow-path (queued, granted) and cancelled
/// requests made them.
#[test]
fn allocation_counts_exact_across_counter_wraps() {
    let pool = pool(BufferSize::S8, 200);
    let mut rng = Rng::new(7);
    let mut live: Vec<BufPoolAllocation> = Vec::new();
    let mut total = 0;
    for step in 0..rounds(3_000, 400) {
        match rng.range(0, 9) {
            0..=3 if live.len() < 150 => {
                live.push(pool.try_allocate(1).unwrap());
                total += 1;
            }
            4 if live.len() < 150 => {
                live.push(pool.allocate_blocking(rng.range(1, 2)).unwrap());
                total += 1;
            }
            5 if !live.is_empty() => {
                // Queued behind a full budget, then served by a release (the slow path).
                let in_use = pool.stats().in_use_bytes / 8;
                let filler = pool.try_allocate(200 - in_use).unwrap();
                let mut waiter = Box::pin(pool.allocate(1));
                assert_pending(&mut waiter);
                drop(filler);
                live.push(ready(&mut waiter).unwrap());
                total += 1;
                total += 1; // the filler
            }
            6 => {
                // Granted, then dropped before it was picked up: not an allocation.
                let in_use = pool.stats().in_use_bytes / 8;
                let filler = pool.try_allocate(200 - in_use).unwrap();
                let mut waiter = Box::pin(pool.allocate(1));
                assert_pending(&mut waiter);
                drop(filler);
                drop(waiter);
                total += 1; // the filler
            }
            _ if !live.is_empty() => {
                let index = rng.range(0, live.len() - 1);
                drop(live.swap_remove(index));
            }
            _ => {}
        }
        let stats = pool.stats();
        assert_eq!(
            (stats.outstanding, stats.total_allocations),
            (live.len(), total),
            "step {step}: {stats}"
        );
        let bytes: usize = live.iter().map(BufPoolAllocation::allocated_bytes).sum();
        assert_eq!(stats.in_use_bytes, bytes, "step {step}");
    }
    drop(live);
    let stats = pool.stats();
    assert_eq!((stats.outstanding, stats.in_use_bytes), (0, 0));
    assert_eq!(stats.total_allocations, total);
}

/// The same counts, exact once threads racing on the fast path have stopped.
#[test]
fn allocation_counts_exact_after_concurrent_churn() {
    watchdog(30, || {
        let pool = shared_pool(64);
        let per_thread = rounds(20_000, 300);
        let workers: Vec<_> = (0..3u64)
            .map(|seed| {
                let pool = pool.clone();
                thread::spawn(move || {
                    let mut rng = Rng::new(seed);
                    let mut held = Vec::new();
                    for _ in 0..per_thread {
                        // At most 5 held of at most 4 buffers while waiting: three threads
                        // hold at most 60 of the 64, so one of them always fits.
                        while held.len() > rng.range(0, 5) {
                            drop(held.swap_remove(0));
                        }
                        held.push(pool.allocate_blocking(rng.range(1, 4)).unwrap());
                    }
                    held
                })
            })
            .collect();
        let held: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let live: usize = held.iter().map(Vec::len).sum();
        let stats = pool.stats();
        assert_eq!(stats.total_allocations, 3 * per_thread);
        assert_eq!(stats.outstanding, live);
        drop(held);
        let stats = pool.stats();
        assert_eq!((stats.outstanding, stats.in_use_bytes), (0, 0));
        assert_eq!(stats.total_allocations, 3 * per_thread);
    });
}
