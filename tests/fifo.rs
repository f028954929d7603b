//! Issue 2, guarantee 5: FIFO fairness. Waiters are served in arrival order, async and
//! blocking callers in one queue; while anyone waits, no newcomer (`try_allocate` included)
//! takes budget ahead of them; a large request is never starved by a stream of small ones.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use membudget::{AllocError, BufPool};

/// How each queued caller waits.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Task,
    Thread,
}

/// Queues `kinds.len()` one-buffer requests on a spent one-buffer pool, one after the other
/// (each is seen queued before the next arrives), releases the budget and returns the order
/// in which they got it. With one buffer only one request can hold it at a time, so the order
/// of the log is the order of the grants.
async fn arrival_order(kinds: &[Kind]) -> Vec<usize> {
    let pool = shared_pool(1);
    let log = Arc::new(Mutex::new(Vec::new()));
    let held = pool.try_allocate(1).unwrap();
    let mut tasks = Vec::new();
    let mut threads = Vec::new();
    for (id, &kind) in kinds.iter().enumerate() {
        let (pool2, log) = (pool.clone(), log.clone());
        match kind {
            Kind::Task => tasks.push(tokio::spawn(async move {
                let allocation = pool2.allocate(1).await.unwrap();
                log.lock().unwrap().push(id);
                drop(allocation);
            })),
            Kind::Thread => threads.push(thread_future(move || {
                let allocation = pool2.allocate_blocking(1).unwrap();
                log.lock().unwrap().push(id);
                drop(allocation);
            })),
        }
        wait_waiting_async(&pool, id + 1).await;
    }
    // Newcomers do not jump the queue.
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    drop(held);
    within(20, async {
        for task in tasks {
            task.await.unwrap();
        }
        for thread in threads {
            thread.await;
        }
    })
    .await;
    assert_idle(&pool);
    log.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_async_waiters_served_in_arrival_order() {
    let kinds = vec![Kind::Task; rounds(12, 3)];
    let order = arrival_order(&kinds).await;
    assert_eq!(order, (0..kinds.len()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_blocking_waiters_served_in_arrival_order() {
    let kinds = vec![Kind::Thread; rounds(12, 3)];
    let order = arrival_order(&kinds).await;
    assert_eq!(order, (0..kinds.len()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_async_and_blocking_interleaved_in_one_queue() {
    let kinds: Vec<Kind> = [
        Kind::Task,
        Kind::Thread,
        Kind::Thread,
        Kind::Task,
        Kind::Thread,
        Kind::Task,
        Kind::Task,
        Kind::Thread,
    ]
    .into_iter()
    .take(rounds(8, 4))
    .collect();
    let order = arrival_order(&kinds).await;
    assert_eq!(order, (0..kinds.len()).collect::<Vec<_>>());
}

/// Blocking-only FIFO without a runtime.
#[test]
fn fifo_blocking_threads_without_runtime() {
    watchdog(20, || {
        let pool = shared_pool(2);
        let log = Arc::new(Mutex::new(Vec::new()));
        let held = pool.try_allocate(2).unwrap();
        let n = rounds(10, 3);
        let threads: Vec<_> = (0..n)
            .map(|id| {
                let (pool2, log) = (pool.clone(), log.clone());
                let thread = thread::spawn(move || {
                    // Two buffers each on a two-buffer budget: one holder at a time.
                    let allocation = pool2.allocate_zeroed_blocking(2).unwrap();
                    log.lock().unwrap().push(id);
                    drop(allocation);
                });
                wait_waiting(&pool, id + 1);
                thread
            })
            .collect();
        drop(held);
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(*log.lock().unwrap(), (0..n).collect::<Vec<_>>());
        assert_idle(&pool);
    });
}

/// A large head blocks the smaller requests behind it even when they would fit, and newcomers
/// of every form (try, zero timeout, short timeout) do not take the free bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_queue_is_never_overtaken_by_smaller_requests() {
    let pool = shared_pool(4);
    let h1 = pool.try_allocate(2).unwrap();
    let h2 = pool.try_allocate(2).unwrap();
    let large_done = Arc::new(AtomicBool::new(false));
    let large = tokio::spawn({
        let (pool, large_done) = (pool.clone(), large_done.clone());
        async move {
            let allocation = pool.allocate(4).await.unwrap();
            large_done.store(true, SeqCst);
            allocation
        }
    });
    wait_waiting_async(&pool, 1).await;
    let small_done = Arc::new(AtomicBool::new(false));
    let small = thread_future({
        let (pool, small_done) = (pool.clone(), small_done.clone());
        move || {
            let allocation = pool.allocate_blocking(1).unwrap();
            small_done.store(true, SeqCst);
            allocation
        }
    });
    wait_waiting_async(&pool, 2).await;

    drop(h1); // two buffers free: the small one would fit, but the large one is first
    let stats = pool.stats();
    assert_eq!((stats.in_use_bytes, stats.waiting), (2 * 64, 2));
    assert!(!small_done.load(SeqCst) && !large_done.load(SeqCst));
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(
        pool.try_allocate_zeroed(1).unwrap_err(),
        AllocError::WouldBlock
    );
    assert_eq!(
        pool.allocate_timeout(1, Duration::ZERO).unwrap_err(),
        AllocError::TimedOut
    );
    assert_eq!(
        pool.allocate_zeroed_timeout(1, Duration::from_millis(5))
            .unwrap_err(),
        AllocError::TimedOut
    );
    let mut newcomer = Box::pin(pool.allocate(1));
    assert!(futures::poll!(&mut newcomer).is_pending());
    assert_eq!(pool.stats().waiting, 3);
    drop(newcomer);
    assert_eq!(pool.stats().waiting, 2);
    assert!(!small_done.load(SeqCst) && !large_done.load(SeqCst));

    drop(h2); // four free: the large one goes first; the small one still waits
    let large = within(10, large).await.unwrap();
    assert_eq!(large.length(), 4);
    assert_eq!(pool.stats().waiting, 1);
    assert!(!small_done.load(SeqCst));

    drop(large);
    let small = within(10, small).await;
    assert_eq!(small.length(), 1);
    drop(small);
    assert_idle(&pool);
}

/// `try_allocate` fails with `WouldBlock` while someone waits, even with bytes free, and
/// succeeds again as soon as the queue is empty.
#[test]
fn try_allocate_would_block_while_a_future_waits() {
    let pool = pool(membudget::BufferSize::S64, 4);
    let held = pool.try_allocate(3).unwrap();
    let mut waiter = Box::pin(pool.allocate(2));
    assert_pending(&mut waiter);
    // One buffer is free, but a request waits.
    assert_eq!(pool.stats().available_bytes(), 64);
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    drop(waiter); // the queue empties
    assert_eq!(pool.try_allocate(1).unwrap().length(), 1);
    drop(held);
}

/// Deterministic starvation check: with a large request queued, small requests that arrive
/// while small allocations come and go all line up behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_not_starved_while_small_ones_keep_coming() {
    let pool = shared_pool(4);
    let mut smalls: Vec<_> = (0..3).map(|_| pool.try_allocate(1).unwrap()).collect();
    let large = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate(4).await.unwrap() }
    });
    wait_waiting_async(&pool, 1).await;
    let mut late = Vec::new();
    for i in 0..3 {
        drop(smalls.pop());
        // A small newcomer never takes the freed buffer.
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        let newcomer = if i % 2 == 0 {
            tokio::spawn({
                let pool = pool.clone();
                async move { pool.allocate(1).await.unwrap() }
            })
        } else {
            let thread = thread_future({
                let pool = pool.clone();
                move || pool.allocate_blocking(1).unwrap()
            });
            tokio::spawn(thread)
        };
        late.push(newcomer);
        // The last drop frees all four buffers and the large request leaves the queue.
        let expected_waiting = if i < 2 { 2 + i } else { 3 };
        wait_waiting_async(&pool, expected_waiting).await;
    }
    // Every small allocation is back: the large one is served before any newcomer.
    let large = within(10, large).await.unwrap();
    let stats = pool.stats();
    assert_eq!((stats.in_use_bytes, stats.waiting), (4 * 64, 3));
    drop(large);
    within(10, async {
        for newcomer in late {
            drop(newcomer.await.unwrap());
        }
    })
    .await;
    assert_idle(&pool);
}

/// Stochastic starvation check: small allocations loop on every thread while a large request
/// comes again and again; each large request completes, with a bounded wait.
#[test]
fn large_request_not_starved_by_stream_of_small_blocking_ones() {
    watchdog(30, || {
        let pool = shared_pool(4);
        let stop = Arc::new(AtomicBool::new(false));
        let small_grants = Arc::new(AtomicUsize::new(0));
        let loopers: Vec<_> = (0..3)
            .map(|_| {
                let (pool, stop, small_grants) = (pool.clone(), stop.clone(), small_grants.clone());
                thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        let allocation = pool.allocate_blocking(1).unwrap();
                        small_grants.fetch_add(1, SeqCst);
                        thread::yield_now();
                        drop(allocation);
                    }
                })
            })
            .collect();
        wait_until(10, "the small stream runs", || {
            small_grants.load(SeqCst) > 10
        });
        let mut max_wait = Duration::ZERO;
        for _ in 0..rounds(200, 3) {
            let start = Instant::now();
            let large = pool.allocate_blocking(4).unwrap();
            max_wait = max_wait.max(start.elapsed());
            assert_eq!(pool.stats().in_use_bytes, 4 * 64);
            drop(large);
        }
        stop.store(true, SeqCst);
        for looper in loopers {
            looper.join().unwrap();
        }
        assert_idle(&pool);
        // FIFO bounds the wait to the few small holds queued ahead; barging would not.
        assert!(
            max_wait < Duration::from_secs(2) * SLOWDOWN,
            "a large request waited {max_wait:?}"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_not_starved_by_stream_of_small_async_ones() {
    let pool = shared_pool(4);
    let stop = Arc::new(AtomicBool::new(false));
    let small_grants = Arc::new(AtomicUsize::new(0));
    let loopers: Vec<_> = (0..3)
        .map(|_| {
            let (pool, stop, small_grants) = (pool.clone(), stop.clone(), small_grants.clone());
            tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    let allocation = pool.allocate(1).await.unwrap();
                    small_grants.fetch_add(1, SeqCst);
                    tokio::task::yield_now().await;
                    drop(allocation);
                }
            })
        })
        .collect();
    wait_until_async(10, "the small stream runs", || {
        small_grants.load(SeqCst) > 10
    })
    .await;
    let large_pool = pool.clone();
    let max_wait = within(30, async move {
        let mut max_wait = Duration::ZERO;
        for _ in 0..rounds(200, 2) {
            let start = Instant::now();
            let large = large_pool.allocate(4).await.unwrap();
            max_wait = max_wait.max(start.elapsed());
            drop(large);
        }
        max_wait
    })
    .await;
    stop.store(true, SeqCst);
    within(10, async {
        for looper in loopers {
            looper.await.unwrap();
        }
    })
    .await;
    assert_idle(&pool);
    assert!(
        max_wait < Duration::from_secs(2) * SLOWDOWN,
        "a large request waited {max_wait:?}"
    );
}

/// Ensures `BufPool` is usable by reference from many threads at once (scoped threads) with
/// the same FIFO guarantees as through an `Arc`.
#[test]
fn fifo_with_scoped_threads_borrowing_the_pool() {
    watchdog(20, || {
        let pool: BufPool = pool(membudget::BufferSize::S32, 1);
        let log = Mutex::new(Vec::new());
        let held = pool.try_allocate(1).unwrap();
        thread::scope(|scope| {
            let mut held = Some(held);
            for id in 0..rounds(6, 3) {
                let (pool, log) = (&pool, &log);
                scope.spawn(move || {
                    let allocation = pool.allocate_blocking(1).unwrap();
                    log.lock().unwrap().push(id);
                    drop(allocation);
                });
                wait_waiting(pool, id + 1);
            }
            drop(held.take());
        });
        assert_eq!(*log.lock().unwrap(), (0..rounds(6, 3)).collect::<Vec<_>>());
        assert_idle(&pool);
    });
}
