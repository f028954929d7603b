//! Issue 2, guarantee 6: cancel safety. Dropping an `allocate` future at any point (after one
//! poll, through `tokio::time::timeout`, through `select!`) loses no budget and no wake-up; a
//! cancelled head lets the waiter behind it proceed; budget already granted to a dropped future
//! goes to the next waiter.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use common::*;
use membudget::{AllocError, BufferSize};

const BUF: usize = 64;

#[test]
fn drop_after_one_poll_loses_nothing() {
    let pool = pool(BufferSize::S64, 4);
    let held = pool.try_allocate(4).unwrap();
    let mut first = Box::pin(pool.allocate(2));
    let mut second = Box::pin(pool.allocate_zeroed(1));
    assert_pending(&mut first);
    assert_pending(&mut second);
    assert_eq!(pool.stats().waiting, 2);
    drop(first);
    assert_eq!(pool.stats().waiting, 1);
    drop(second);
    let stats = pool.stats();
    assert_eq!((stats.waiting, stats.in_use_bytes), (0, 4 * BUF));
    drop(held);
    assert_full_budget_back(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_after_one_poll_on_runtime_then_waiter_behind_still_served() {
    let pool = shared_pool(2);
    let held = pool.try_allocate(2).unwrap();
    let mut head = Box::pin(pool.allocate(2));
    assert!(futures::poll!(&mut head).is_pending());
    let behind = thread_future({
        let pool = pool.clone();
        move || pool.allocate_blocking(2).unwrap()
    });
    wait_waiting_async(&pool, 2).await;
    drop(head);
    assert_eq!(pool.stats().waiting, 1);
    drop(held);
    let behind = within(10, behind).await;
    assert_eq!(behind.length(), 2);
    drop(behind);
    assert_full_budget_back(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_timeout_cancels_a_waiter_cleanly() {
    let pool = shared_pool(2);
    let held = pool.try_allocate(2).unwrap();
    let result = tokio::time::timeout(Duration::from_millis(20), pool.allocate(1)).await;
    assert!(
        result.is_err(),
        "the request must still wait when the timeout fires"
    );
    let stats = pool.stats();
    assert_eq!((stats.waiting, stats.in_use_bytes), (0, 2 * BUF));
    // The queue still works: a new waiter is woken by the release.
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate(2).await.unwrap() }
    });
    wait_waiting_async(&pool, 1).await;
    drop(held);
    drop(within(10, waiter).await.unwrap());
    assert_full_budget_back(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_cancels_a_waiter_cleanly() {
    let pool = shared_pool(2);
    let held = pool.try_allocate(2).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Fires once the request below is queued, so the losing branch was really waiting.
    tokio::spawn({
        let pool = pool.clone();
        async move {
            wait_waiting_async(&pool, 1).await;
            let _ = tx.send(());
        }
    });
    within(10, async {
        tokio::select! {
            result = pool.allocate(1) => panic!("the budget is spent, yet got {result:?}"),
            _ = rx => {}
        }
    })
    .await;
    assert_eq!(pool.stats().waiting, 0);
    drop(held);
    assert_full_budget_back(&pool);
}

/// Head `allocate(4)` with two buffers free; a request for 2 behind it fits but must wait.
/// When the head is cancelled (without any release), the one behind proceeds at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_head_lets_the_one_behind_proceed() {
    // Head dropped after one poll; blocking waiter behind.
    let pool = shared_pool(4);
    let held = pool.try_allocate(2).unwrap();
    let mut head = Box::pin(pool.allocate(4));
    assert!(futures::poll!(&mut head).is_pending());
    let behind = thread_future({
        let pool = pool.clone();
        move || pool.allocate_blocking(2).unwrap()
    });
    wait_waiting_async(&pool, 2).await;
    drop(head);
    let behind = within(10, behind).await;
    assert_eq!(pool.stats().in_use_bytes, 4 * BUF);
    drop((behind, held));
    assert_full_budget_back(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_head_by_tokio_timeout_lets_async_one_behind_proceed() {
    let pool = shared_pool(4);
    let held = pool.try_allocate(2).unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let head = tokio::spawn({
        let pool = pool.clone();
        async move {
            tokio::select! {
                result = pool.allocate(4) => panic!("head got {result:?}"),
                _ = go_rx => {}
            }
        }
    });
    wait_waiting_async(&pool, 1).await;
    let behind = tokio::spawn({
        let pool = pool.clone();
        async move {
            // A timeout long enough to never fire here.
            tokio::time::timeout(Duration::from_secs(60), pool.allocate(2))
                .await
                .unwrap()
                .unwrap()
        }
    });
    wait_waiting_async(&pool, 2).await;
    go_tx.send(()).unwrap(); // cancels the head through select!
    within(10, head).await.unwrap();
    let behind = within(10, behind).await.unwrap();
    assert_eq!(behind.length(), 2);
    drop((behind, held));
    assert_full_budget_back(&pool);
}

/// The head's deadline must fire only after the request behind it has queued; on a loaded
/// machine (or under Miri) a short deadline can fire first, and then the scenario did not
/// happen. Such a run is cleaned up and retried with a longer deadline, never misread.
#[test]
fn cancelled_blocking_head_by_deadline_lets_the_one_behind_proceed() {
    watchdog(60, || {
        for head_deadline_ms in [50, 200, 800, 3200, 12800] {
            let pool = shared_pool(4);
            let held = pool.try_allocate(2).unwrap();
            let release_head = Arc::new(AtomicBool::new(false));
            let head = thread::spawn({
                let pool = pool.clone();
                move || pool.allocate_timeout(4, Duration::from_millis(head_deadline_ms))
            });
            wait_waiting(&pool, 1);
            let behind = thread::spawn({
                let (pool, release_head) = (pool.clone(), release_head.clone());
                move || {
                    let allocation = pool.allocate_blocking(2).unwrap();
                    release_head.store(true, SeqCst);
                    allocation
                }
            });
            let mut both_queued = false;
            wait_until(10, "both queued, or the head's deadline passed", || {
                both_queued = pool.stats().waiting == 2;
                both_queued || head.is_finished()
            });
            assert_eq!(err(head.join().unwrap()), AllocError::TimedOut);
            let behind = behind.join().unwrap();
            assert!(release_head.load(SeqCst));
            assert_eq!(pool.stats().in_use_bytes, 4 * BUF);
            drop((behind, held));
            assert_full_budget_back(&pool);
            if both_queued {
                return;
            }
        }
        panic!("the head's deadline always passed before the request behind it queued");
    });
}

/// Budget granted to a future that is then dropped before it picks it up goes on to the next
/// waiter (here a blocking thread) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_then_dropped_budget_goes_to_the_next_waiter() {
    let pool = shared_pool(2);
    let held = pool.try_allocate(2).unwrap();
    let mut granted = Box::pin(pool.allocate(2));
    assert!(futures::poll!(&mut granted).is_pending());
    let next = thread_future({
        let pool = pool.clone();
        move || pool.allocate_blocking(1).unwrap()
    });
    wait_waiting_async(&pool, 2).await;
    drop(held); // hands the two buffers to `granted`, which is not polled again
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.waiting, stats.outstanding),
        (2 * BUF, 1, 0)
    );
    drop(granted); // its bytes go to `next`
    let next = within(10, next).await;
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.waiting, stats.outstanding),
        (BUF, 0, 1)
    );
    drop(next);
    assert_full_budget_back(&pool);
}

#[test]
fn granted_then_dropped_without_other_waiters_returns_budget() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let mut granted = Box::pin(pool.allocate_zeroed(1));
    assert_pending(&mut granted);
    drop(held);
    assert_eq!(pool.stats().in_use_bytes, BUF);
    drop(granted);
    assert_full_budget_back(&pool);
}

#[test]
fn failed_then_dropped_future_loses_nothing() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let mut waiter = Box::pin(pool.allocate(1));
    assert_pending(&mut waiter);
    pool.close();
    drop(waiter); // failed with Closed, never polled again
    assert_eq!(pool.stats().waiting, 0);
    drop(held);
    assert_idle(&pool);
}

/// Timeouts and `select!` losers racing with releases, many times over: every byte comes
/// back and nobody is left queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_races_with_releases_lose_nothing() {
    let pool = shared_pool(4);
    let checker = BudgetChecker::new(4 * BUF);
    let rounds = rounds(3_000, 10);
    let tasks: Vec<_> = (0..if cfg!(miri) { 2u8 } else { 4 })
        .map(|tag| {
            let (pool, checker) = (pool.clone(), checker.clone());
            tokio::spawn(async move {
                let mut rng = Rng::new(tag.into());
                for _ in 0..rounds {
                    let n = rng.range(1, 4);
                    let got = match rng.range(0, 2) {
                        0 => {
                            let wait = Duration::from_micros(rng.range(0, 200) as u64);
                            tokio::time::timeout(wait, pool.allocate(n)).await.ok()
                        }
                        1 => tokio::select! {
                            result = pool.allocate(n) => Some(result),
                            () = tokio::task::yield_now() => None,
                        },
                        _ => {
                            // Poll once by hand, then drop or finish.
                            let mut future = Box::pin(pool.allocate(n));
                            match futures::poll!(&mut future) {
                                std::task::Poll::Ready(result) => Some(result),
                                std::task::Poll::Pending if rng.range(0, 1) == 0 => None,
                                std::task::Poll::Pending => Some(future.await),
                            }
                        }
                    };
                    if let Some(result) = got {
                        let allocation = result.unwrap();
                        checker.acquired(&pool, &allocation, tag + 1);
                        tokio::task::yield_now().await;
                        checker.releasing(&allocation, tag + 1);
                    }
                }
            })
        })
        .collect();
    let thread = thread_future({
        let (pool, checker) = (pool.clone(), checker.clone());
        move || {
            let mut rng = Rng::new(77);
            for _ in 0..rounds {
                let n = rng.range(1, 4);
                match pool.allocate_timeout(n, Duration::from_micros(rng.range(0, 100) as u64)) {
                    Ok(allocation) => {
                        checker.acquired(&pool, &allocation, 100);
                        checker.releasing(&allocation, 100);
                    }
                    Err(AllocError::TimedOut) => {}
                    Err(error) => panic!("{error}"),
                }
            }
        }
    });
    within(60, async {
        for task in tasks {
            task.await.unwrap();
        }
        thread.await;
    })
    .await;
    assert_eq!(checker.live(), 0);
    assert_full_budget_back(&pool);
}

/// Blocking timeouts racing with the release that would serve them, many times: a grant that
/// comes at the deadline is either returned or passed on, never lost.
#[test]
fn blocking_timeouts_racing_releases_lose_nothing() {
    watchdog(30, || {
        let pool = shared_pool(1);
        let rounds = rounds(2_000, 10);
        let holder = thread::spawn({
            let pool = pool.clone();
            move || {
                for _ in 0..rounds {
                    drop(pool.allocate_blocking(1).unwrap());
                }
            }
        });
        let timer = thread::spawn({
            let pool = pool.clone();
            move || {
                let mut rng = Rng::new(5);
                let mut got = 0;
                for _ in 0..rounds {
                    let wait = Duration::from_micros(rng.range(0, 50) as u64);
                    match pool.allocate_timeout(1, wait) {
                        Ok(allocation) => {
                            got += 1;
                            drop(allocation);
                        }
                        Err(AllocError::TimedOut) => {}
                        Err(error) => panic!("{error}"),
                    }
                }
                got
            }
        });
        holder.join().unwrap();
        let _got = timer.join().unwrap();
        assert_full_budget_back(&pool);
    });
}
