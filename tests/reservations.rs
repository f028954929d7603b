//! Reservations: budget without buffers, in the same FIFO queue as allocations; grow, shrink,
//! split, merge and allocate out of them; the drop barrier waits for them; `reserved_bytes`
//! is part of `in_use_bytes`. Budgets are asserted at each quiescent point.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize, Reservation};

fn pool(bytes: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: bytes,
    }))
}

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

#[track_caller]
fn assert_budget(pool: &BufPool, in_use: usize, reserved: usize) {
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.reserved_bytes),
        (in_use, reserved),
        "{stats:?}"
    );
    assert!(stats.reserved_bytes <= stats.in_use_bytes);
}

#[test]
fn sizes_round_up_to_eight_and_zero_is_empty_at_once() {
    watchdog(30, || {
        let pool = pool(640);
        let a = pool.try_reserve(1).unwrap();
        let b = futures::executor::block_on(pool.reserve(0)).unwrap();
        let c = pool.reserve_blocking(17).unwrap();
        assert_eq!((a.size(), b.size(), c.size()), (8, 0, 24));
        assert_budget(&pool, 32, 32);
        assert_eq!(
            pool.stats().outstanding,
            0,
            "reservations are not allocations"
        );
        drop((a, b, c));
        assert_budget(&pool, 0, 0);
        // Held in full: it fails with nothing held.
        assert_eq!(
            pool.try_reserve(641).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 648,
                max_memory: 640
            }
        );
        assert!(matches!(
            pool.try_reserve(usize::MAX).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                ..
            }
        ));
        assert!(matches!(
            futures::executor::block_on(pool.reserve(usize::MAX - 3)),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert_budget(&pool, 0, 0);
    });
}

#[test]
fn reservations_wait_in_the_same_fifo_as_allocations() {
    watchdog(30, || {
        let pool = pool(256);
        let held = pool.try_allocate(4).unwrap();
        let mut cx = cx();
        let mut first = Box::pin(pool.reserve(192));
        assert!(first.as_mut().poll(&mut cx).is_pending());
        let mut second = Box::pin(pool.allocate(1));
        assert!(second.as_mut().poll(&mut cx).is_pending());
        // No barging: try forms refuse while others wait.
        assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
        drop(held);
        let Poll::Ready(Ok(reservation)) = first.as_mut().poll(&mut cx) else {
            panic!("the reservation was not served first");
        };
        let Poll::Ready(Ok(allocation)) = second.as_mut().poll(&mut cx) else {
            panic!("the allocation behind it was not served");
        };
        assert_budget(&pool, 256, 192);
        drop((reservation, allocation));
        assert_budget(&pool, 0, 0);
    });
}

#[test]
fn grow_shrink_split_merge_and_allocate() {
    watchdog(30, || {
        let pool = pool(1024);
        let mut r = pool.try_reserve(100).unwrap(); // 104
        r.try_grow(20).unwrap(); // +24 = 128
        r.grow_blocking(64).unwrap(); // 192
        futures::executor::block_on(r.grow(0)).unwrap();
        assert_budget(&pool, 192, 192);
        r.shrink(1); // -8
        assert_eq!(r.size(), 184);
        let mut part = r.split(100); // 104
        assert_eq!((r.size(), part.size()), (80, 104));
        assert_budget(&pool, 184, 184);
        let allocation = part.allocate(1).unwrap();
        assert_eq!(part.size(), 40);
        assert_budget(&pool, 184, 120);
        assert_eq!(pool.stats().outstanding, 1);
        assert_eq!(
            part.allocate(1).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 64,
                max_memory: 40
            }
        );
        assert_eq!(part.allocate(0).unwrap_err(), AllocError::ZeroBuffers);
        r.merge(part).unwrap();
        assert_eq!(r.size(), 120);
        let other = BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: 64,
        });
        let stranger = other.try_reserve(8).unwrap();
        let stranger = r.merge(stranger).unwrap_err();
        assert_eq!(stranger.size(), 8);
        drop(stranger);
        drop(allocation); // its bytes go back to the pool, not to the reservation
        assert_budget(&pool, 120, 120);
        assert_eq!(r.size(), 120);
        r.shrink(usize::MAX);
        assert_budget(&pool, 0, 0);
        drop(r);
        assert_budget(&pool, 0, 0);
    });
}

#[test]
fn try_grow_does_not_barge_and_a_cancelled_grow_loses_nothing() {
    watchdog(30, || {
        let pool = pool(128);
        let mut r = pool.try_reserve(64).unwrap();
        let held = pool.try_allocate(1).unwrap();
        let mut cx = cx();
        let mut waiter = Box::pin(pool.allocate(1));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        assert_eq!(r.try_grow(8).unwrap_err(), AllocError::WouldBlock);
        {
            let mut grow = Box::pin(r.grow(64));
            assert!(grow.as_mut().poll(&mut cx).is_pending());
            drop(held); // serves `waiter` (first), not the grow
            assert!(grow.as_mut().poll(&mut cx).is_pending());
        } // the grow is cancelled while queued
        assert_eq!(r.size(), 64);
        assert!(matches!(waiter.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
        assert_budget(&pool, 64, 64);
        // A grow granted but dropped before it is polled again passes the grant on.
        let held = pool.try_allocate(1).unwrap();
        {
            let mut grow = Box::pin(r.grow(64));
            assert!(grow.as_mut().poll(&mut cx).is_pending());
            drop(held);
            assert_budget(&pool, 128, 64);
        }
        assert_budget(&pool, 64, 64);
        assert_eq!(r.size(), 64);
    });
}

#[test]
fn reserve_timeout_and_closed_pools() {
    watchdog(30, || {
        let pool = pool(64);
        let all = pool.reserve_blocking(64).unwrap();
        assert_eq!(
            pool.reserve_timeout(8, Duration::from_millis(5))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_budget(&pool, 64, 64);
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.reserve_blocking(8).map(|r| r.size()))
        };
        common::wait_until(30, "the thread waits", || pool.stats().waiting == 1);
        pool.close();
        assert_eq!(waiter.join().unwrap(), Err(AllocError::Closed));
        assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::Closed);
        drop(all);
        assert_budget(&pool, 0, 0);
    });
}

#[test]
fn the_drop_barrier_waits_for_reservations_and_a_reservation_outlives_the_handle() {
    watchdog(30, || {
        let pool = BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: 640,
        });
        let reservation = pool.try_reserve(64).unwrap();
        let empty = pool.try_reserve(0).unwrap();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let releaser = {
            let released = Arc::clone(&released);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                released.store(true, std::sync::atomic::Ordering::SeqCst);
                drop(reservation);
            })
        };
        drop(pool);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
        releaser.join().unwrap();
        // An empty reservation may outlive its pool's handle.
        assert_eq!(empty.size(), 0);
        drop(empty);
    });
}

#[test]
fn reservations_on_a_child_hold_budget_in_every_ancestor() {
    watchdog(30, || {
        let root = BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: 256,
        });
        let child = root
            .child(
                "c",
                BufPoolCfg {
                    buffer_size: BufferSize::S64,
                    max_memory: 128,
                },
            )
            .unwrap();
        let mut r = child.try_reserve(100).unwrap();
        assert_eq!(
            (child.stats().in_use_bytes, root.stats().in_use_bytes),
            (104, 104)
        );
        assert_eq!(
            (child.stats().reserved_bytes, root.stats().reserved_bytes),
            (104, 0)
        );
        // 104 + 32 could never fit the child's 128: refused at once.
        assert_eq!(
            r.try_grow(32).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 136,
                max_memory: 128
            }
        );
        // 16 more would fit the child, but the root is full.
        let root_full = root.try_reserve(152).unwrap();
        assert_eq!(r.try_grow(16).unwrap_err(), AllocError::WouldBlock);
        drop(root_full);
        let allocation = r.allocate(1).unwrap();
        assert_eq!(child.stats().outstanding, 1);
        drop(allocation);
        drop(r);
        assert_eq!(
            (child.stats().in_use_bytes, root.stats().in_use_bytes),
            (0, 0)
        );
        assert_eq!(child.stats().outstanding, 0);
    });
}

#[test]
fn threads_reserving_growing_and_allocating_keep_the_budget() {
    watchdog(120, || {
        let pool = pool(64 * 16);
        let rounds = common::rounds(1_000, 10);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    for i in 0..rounds {
                        let mut r: Reservation =
                            pool.reserve_blocking(64 * (1 + (t + i) % 3)).unwrap();
                        if i % 2 == 0 {
                            let _ = r.grow_blocking(64);
                        }
                        let allocation = r.allocate(1).ok();
                        assert!(pool.stats().in_use_bytes <= 64 * 16);
                        let part = r.split(64);
                        drop((allocation, part));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_budget(&pool, 0, 0);
        assert_eq!(pool.stats().outstanding, 0);
    });
}

#[test]
fn a_growth_that_could_never_fit_beside_the_reservation_fails_at_once() {
    watchdog(30, || {
        let pool = pool(64);
        let mut r = pool.try_reserve(64).unwrap();
        let expected = AllocError::ExceedsBudget {
            requested_bytes: 72,
            max_memory: 64,
        };
        assert_eq!(r.try_grow(8).unwrap_err(), expected);
        assert_eq!(r.grow_blocking(8).unwrap_err(), expected);
        assert_eq!(
            futures::executor::block_on(r.grow(1)).unwrap_err(),
            expected
        );
        // A growth above the budget on its own reports itself, as `reserve` does.
        assert_eq!(
            r.try_grow(72).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 72,
                max_memory: 64
            }
        );
        r.shrink(8);
        r.try_grow(8).unwrap();
        assert_eq!(r.size(), 64);
        // On a child, the smallest cap of the chain counts.
        let root = BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: 128,
        });
        let child = root
            .child(
                "c",
                BufPoolCfg {
                    buffer_size: BufferSize::S64,
                    max_memory: 1024,
                },
            )
            .unwrap();
        let mut r = child.try_reserve(120).unwrap();
        assert_eq!(
            r.try_grow(16).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 136,
                max_memory: 128
            }
        );
        assert_budget(&pool, 64, 64);
    });
}
