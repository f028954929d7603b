//! `max_waiters`: a request that would wait while `n` requests already wait fails at once
//! with `QueueFull`, in every call form; at the boundary, a cancel frees a place.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};

fn pool(max_waiters: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: 64 * 4,
        })
        .max_waiters(max_waiters)
        .build()
        .unwrap(),
    )
}

#[test]
fn zero_never_queues_but_serves_what_fits() {
    watchdog(30, || {
        let pool = pool(0);
        let a = pool.try_allocate(2).unwrap();
        // Fits: never refused.
        let b = futures::executor::block_on(pool.allocate(2)).unwrap();
        assert_eq!(
            pool.allocate_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(
            pool.allocate_timeout(1, Duration::from_secs(5))
                .unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(
            futures::executor::block_on(pool.allocate_zeroed(1)).unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        let stats = pool.stats();
        assert_eq!(
            (stats.queue_full, stats.waiting, stats.in_use_bytes),
            (3, 0, 256)
        );
        assert_eq!(
            AllocError::QueueFull.to_string(),
            "too many requests are waiting already"
        );
        drop((a, b));
        // Nothing was left behind: the fast path works again.
        assert_eq!(pool.try_allocate(4).unwrap().length(), 4);
    });
}

#[test]
fn the_limit_counts_waiters_and_a_cancel_frees_a_place() {
    watchdog(30, || {
        let pool = pool(2);
        let held = pool.try_allocate(4).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let mut w1 = Box::pin(pool.allocate(1));
        let mut w2 = Box::pin(Arc::clone(&pool).allocate_owned(1));
        assert!(w1.as_mut().poll(&mut cx).is_pending());
        assert!(w2.as_mut().poll(&mut cx).is_pending());
        let mut w3 = Box::pin(pool.allocate(1));
        assert!(matches!(
            w3.as_mut().poll(&mut cx),
            Poll::Ready(Err(AllocError::QueueFull))
        ));
        assert_eq!(
            pool.allocate_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        drop(w1); // a place frees up
        let mut w4 = Box::pin(pool.allocate(1));
        assert!(w4.as_mut().poll(&mut cx).is_pending());
        assert_eq!(pool.stats().waiting, 2);
        drop(held);
        assert!(matches!(w2.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
        assert!(matches!(w4.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.waiting, stats.queue_full),
            (0, 0, 2)
        );
    });
}

#[test]
fn threads_racing_for_the_last_place_never_exceed_the_limit() {
    watchdog(60, || {
        let pool = pool(3);
        let held = pool.try_allocate(4).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || pool.allocate_blocking(1).map(|a| a.length()))
            })
            .collect();
        common::wait_until(30, "three wait and five are refused", || {
            let stats = pool.stats();
            assert!(stats.waiting <= 3, "{stats:?}");
            stats.waiting == 3 && stats.queue_full == 5
        });
        drop(held);
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| **r == Ok(1)).count(), 3);
        assert_eq!(
            results
                .iter()
                .filter(|r| **r == Err(AllocError::QueueFull))
                .count(),
            5
        );
        assert_eq!(pool.stats().in_use_bytes, 0);
    });
}
