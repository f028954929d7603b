//! The rustdoc's concrete claims, each checked literally as a new user would read it: the
//! `# Errors`, `# Panics` and return-value lines of the public items, what each statistics
//! field counts, `Display` texts, rounding, and edge values (0, 1, `usize::MAX`, sizes not a
//! multiple of 8, calls after close, child pools, floors, owned handles).

mod common;

use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::*;
use membudget::{
    AllocError, BufPool, BufPoolCfg, BufferSize, ConfigError, PollAllocate, Reclaimer,
};

const PIB2: usize = 1 << 51;

fn cfg(buffer_size: BufferSize, max_memory: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size,
        max_memory,
    }
}

fn cfg64(max_memory: usize) -> BufPoolCfg {
    cfg(BufferSize::S64, max_memory)
}

/// Polls `future` once with a no-op waker.
fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

// ---------------------------------------------------------------------------------------
// size.rs, config.rs, error.rs
// ---------------------------------------------------------------------------------------

/// `BufferSize`'s `Display` is "<n> bytes"; `try_from` accepts exactly the twelve sizes.
#[test]
fn buffer_size_display_and_try_from_edges() {
    assert_eq!(BufferSize::S64.to_string(), "64 bytes");
    assert_eq!(BufferSize::S16384.to_string(), "16384 bytes");
    for bytes in [0, 1, 4, 7, 9, 24, 32768, usize::MAX] {
        assert_eq!(
            BufferSize::try_from(bytes),
            Err(membudget::InvalidBufferSize(bytes))
        );
    }
    for size in BufferSize::ALL {
        assert_eq!(BufferSize::try_from(size.bytes()), Ok(size));
        assert_eq!(usize::from(size), size as usize);
    }
    assert_eq!(
        membudget::InvalidBufferSize(usize::MAX).to_string(),
        format!(
            "{} is not a buffer size (a power of two from 8 to 16384)",
            usize::MAX
        )
    );
}

/// `validate`: a budget of exactly one buffer is valid; one byte less is not.
#[test]
fn validate_at_exactly_one_buffer() {
    for size in BufferSize::ALL {
        assert_eq!(cfg(size, size.bytes()).validate(), Ok(()));
        assert_eq!(
            cfg(size, size.bytes() - 1).validate(),
            Err(ConfigError::MaxMemoryBelowBufferSize {
                max_memory: size.bytes() - 1,
                buffer_size: size.bytes()
            })
        );
    }
}

/// `max_memory` "need not be a multiple of `buffer_size` (the remainder is never used)".
#[test]
fn budget_remainder_is_never_used() {
    let pool = BufPool::new(cfg64(64 * 3 + 63));
    let all = pool.try_allocate(3).unwrap();
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(
        pool.try_allocate(4).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 256,
            max_memory: 64 * 3 + 63
        }
    );
    assert_eq!(pool.stats().max_memory, 255);
    assert_eq!(pool.stats().available_bytes(), 63);
    drop(all);
}

/// Every `ConfigError` variant's `Display` text, as the source's match writes it.
#[test]
fn config_error_display_texts() {
    let root = BufPool::new(cfg64(1024));
    let err = BufPool::builder(cfg64(128))
        .min_memory(8)
        .build()
        .unwrap_err();
    assert_eq!(err, ConfigError::MinMemoryWithoutParent { min_memory: 8 });
    assert_eq!(
        err.to_string(),
        "min_memory (8 bytes) needs a parent pool to set it aside"
    );
    let err = BufPool::builder(cfg64(128))
        .parent(&root)
        .min_memory(129)
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        ConfigError::MinMemoryAboveMaxMemory {
            min_memory: 129,
            max_memory: 128
        }
    );
    assert_eq!(
        err.to_string(),
        "min_memory (129 bytes) is above max_memory (128 bytes)"
    );
    let _held = root.try_allocate(16).unwrap();
    let err = BufPool::builder(cfg64(128))
        .parent(&root)
        .min_memory(1)
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        ConfigError::MinMemoryUnavailable {
            min_memory: 8,
            reason: AllocError::WouldBlock
        },
        "the floor is named rounded up to a multiple of 8"
    );
    assert_eq!(
        err.to_string(),
        "the ancestors cannot set min_memory (8 bytes) aside now: the budget is not free now"
    );
}

/// Every `AllocError` variant's `Display` text.
#[test]
fn alloc_error_display_texts() {
    let cases = [
        (
            AllocError::ZeroBuffers,
            "zero buffers requested".to_string(),
        ),
        (
            AllocError::ExceedsBudget {
                requested_bytes: 320,
                max_memory: 256,
            },
            "requested 320 bytes, above the budget of 256 bytes".to_string(),
        ),
        (
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory: 256,
            },
            "requested size overflows usize, above the budget of 256 bytes".to_string(),
        ),
        (AllocError::Closed, "the pool is closed".to_string()),
        (
            AllocError::WouldBlock,
            "the budget is not free now".to_string(),
        ),
        (
            AllocError::TimedOut,
            "timed out waiting for budget".to_string(),
        ),
        (
            AllocError::QueueFull,
            "too many requests are waiting already".to_string(),
        ),
        (
            AllocError::OutOfMemory { bytes: 7 },
            "the system allocator has no memory for 7 bytes".to_string(),
        ),
    ];
    for (error, text) in cases {
        assert_eq!(error.to_string(), text);
    }
}

// ---------------------------------------------------------------------------------------
// pool.rs
// ---------------------------------------------------------------------------------------

/// `child`: "A child of a closed pool is created closed" (and `try_allocate` there says
/// `Closed`).
#[test]
fn child_of_closed_pool_is_created_closed() {
    let root = BufPool::new(cfg64(1024));
    root.close();
    let child = root.child("late", cfg64(512)).unwrap();
    assert!(child.is_closed());
    assert!(child.stats().closed);
    assert_eq!(child.try_allocate(1).unwrap_err(), AllocError::Closed);
    assert_eq!(child.allocate_blocking(1).unwrap_err(), AllocError::Closed);
}

/// `min_memory` on a child of a closed pool: the builder says "A child of a closed pool is
/// closed, its floor back at once": so building succeeds (closed) and the root holds nothing.
#[test]
fn floored_child_of_closed_pool() {
    let root = BufPool::new(cfg64(1024));
    root.close();
    match BufPool::builder(cfg64(512))
        .parent(&root)
        .min_memory(256)
        .build()
    {
        Ok(child) => {
            assert!(child.is_closed());
            assert_eq!(root.stats().in_use_bytes, 0, "the floor went back at once");
        }
        Err(error) => {
            // Also acceptable under the `# Errors` list: the ancestors cannot set it aside.
            assert!(
                matches!(
                    error,
                    ConfigError::MinMemoryUnavailable {
                        min_memory: 256,
                        ..
                    }
                ),
                "{error:?}"
            );
            assert_eq!(root.stats().in_use_bytes, 0);
        }
    }
}

/// `child`: "A request larger than the smallest cap on its chain fails at once with
/// ExceedsBudget", from a child whose own cap is larger than its parent's.
#[test]
fn child_request_above_parent_cap_fails_at_once() {
    let root = BufPool::new(cfg64(256));
    let child = root.child("big", cfg64(4096)).unwrap();
    for result in [
        child.try_allocate(5),
        child.allocate_blocking(5),
        child.allocate_timeout(5, Duration::from_secs(30)),
    ] {
        assert!(
            matches!(
                result,
                Err(AllocError::ExceedsBudget {
                    requested_bytes: 320,
                    ..
                })
            ),
            "{result:?}"
        );
    }
    assert!(matches!(
        child.try_reserve(257),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert!(child.try_reserve(256).is_ok());
}

/// `allocate_timeout`: "A zero `timeout` still takes free budget at once, but never waits;
/// unlike `try_allocate` it fails with `TimedOut`", and `timed_out` counts it.
#[test]
fn zero_timeout_takes_free_budget_then_times_out() {
    let pool = BufPool::new(cfg64(128));
    let a = pool.allocate_timeout(2, Duration::ZERO).unwrap();
    assert_eq!(a.length(), 2);
    assert_eq!(
        pool.allocate_timeout(1, Duration::ZERO).unwrap_err(),
        AllocError::TimedOut
    );
    assert_eq!(
        pool.allocate_zeroed_timeout(1, Duration::ZERO).unwrap_err(),
        AllocError::TimedOut
    );
    assert_eq!(
        pool.reserve_timeout(8, Duration::ZERO).unwrap_err(),
        AllocError::TimedOut
    );
    let stats = pool.stats();
    assert_eq!(stats.timed_out, 3);
    assert_eq!(stats.would_block, 0, "timed calls are not would-block");
    assert_eq!(stats.waiting, 0, "the timed-out requests left the queue");
    drop(a);
    assert_full_budget_back(&pool);
}

/// "A `timeout` too large to add to the clock waits without a deadline."
#[test]
fn huge_timeout_waits_without_deadline() {
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg64(64)));
        let held = pool.try_allocate(1).unwrap();
        let waiter = std::thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.allocate_timeout(1, Duration::MAX).map(|a| a.length())
        });
        wait_waiting(&pool, 1);
        drop(held);
        assert_eq!(waiter.join().unwrap(), Ok(1));
        let reserve = std::thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.reserve_timeout(64, Duration::MAX).map(|r| r.size())
        });
        assert_eq!(reserve.join().unwrap(), Ok(64));
    });
}

/// `try_allocate`: `WouldBlock` "when ... other requests wait before this one (it does not
/// jump the queue)", even for a request that would fit the free room.
#[test]
fn try_allocate_does_not_jump_the_queue() {
    let pool = BufPool::new(cfg64(256));
    let held = pool.try_allocate(3).unwrap();
    let mut big = Box::pin(pool.allocate(2));
    assert!(poll_once(big.as_mut()).is_pending());
    assert_eq!(pool.stats().waiting, 1);
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(pool.stats().would_block, 2);
    drop(big);
    assert!(pool.try_allocate(1).is_ok());
    drop(held);
}

/// `set_max_memory`: "Waiting requests that can never fit the new budget fail with
/// `ExceedsBudget`", the others keep waiting; below one buffer: `ConfigError`, budget unchanged.
#[test]
fn set_max_memory_fails_waiters_that_can_never_fit() {
    let pool = BufPool::new(cfg64(512));
    let held = pool.try_allocate(8).unwrap();
    let mut big = Box::pin(pool.allocate(6));
    let mut small = Box::pin(pool.allocate(1));
    let mut reserve = Box::pin(pool.reserve(300));
    assert!(poll_once(big.as_mut()).is_pending());
    assert!(poll_once(small.as_mut()).is_pending());
    assert!(poll_once(reserve.as_mut()).is_pending());
    pool.set_max_memory(256).unwrap();
    match poll_once(big.as_mut()) {
        Poll::Ready(Err(AllocError::ExceedsBudget {
            requested_bytes: 384,
            max_memory: 256,
        })) => {}
        other => panic!("{other:?}"),
    }
    match poll_once(reserve.as_mut()) {
        Poll::Ready(Err(AllocError::ExceedsBudget {
            requested_bytes: 304,
            ..
        })) => {}
        other => panic!("{other:?}"),
    }
    assert!(poll_once(small.as_mut()).is_pending());
    assert_eq!(pool.stats().waiting, 1);
    assert_eq!(
        pool.set_max_memory(63),
        Err(ConfigError::MaxMemoryBelowBufferSize {
            max_memory: 63,
            buffer_size: 64
        })
    );
    assert_eq!(pool.stats().max_memory, 256, "unchanged");
    drop(held);
    // In use 512 above the budget of 256: releases repay, then the small waiter is served.
    assert!(matches!(poll_once(small.as_mut()), Poll::Ready(Ok(_))));
}

/// `add_max_memory`: "saturating at `usize::MAX`, which means no limit", returns the new
/// `max_memory`.
#[test]
fn add_max_memory_saturates_and_returns_new_budget() {
    let pool = BufPool::new(cfg64(64));
    assert_eq!(pool.add_max_memory(0), 64);
    assert_eq!(pool.add_max_memory(1), 65);
    assert_eq!(pool.add_max_memory(usize::MAX), usize::MAX);
    assert_eq!(pool.stats().max_memory, usize::MAX);
    assert_eq!(pool.add_max_memory(usize::MAX), usize::MAX);
    // "No limit": whatever the pool counts (2 PiB) may be requested.
    let r = pool.try_reserve(1 << 40).unwrap();
    assert_eq!(r.size(), 1 << 40);
}

/// `forget_max_memory`: "A budget above what the pool counts (2 PiB, `usize::MAX` for no
/// limit) is counted as that before the bytes are removed": forgetting 8 of an unlimited
/// budget leaves 2 PiB - 8.
#[test]
fn forget_max_memory_on_unlimited_budget() {
    let pool = BufPool::new(cfg64(usize::MAX));
    assert_eq!(pool.forget_max_memory(0), 0);
    assert_eq!(pool.stats().max_memory, usize::MAX, "nothing removed");
    assert_eq!(pool.forget_max_memory(8), 8);
    assert_eq!(pool.stats().max_memory, PIB2 - 8);
    // Everything but one buffer.
    assert_eq!(pool.forget_max_memory(usize::MAX), PIB2 - 8 - 64);
    assert_eq!(pool.stats().max_memory, 64);
    assert_eq!(pool.forget_max_memory(1), 0);
}

/// `forget_max_memory` on a `wait_for_growth` pool may take the budget to zero.
#[test]
fn forget_max_memory_to_zero_with_growth() {
    let pool = BufPool::builder(cfg64(128))
        .wait_for_growth()
        .build()
        .unwrap();
    assert_eq!(pool.forget_max_memory(usize::MAX), 128);
    assert_eq!(pool.stats().max_memory, 0);
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(pool.add_max_memory(64), 64);
    assert!(pool.try_allocate(1).is_ok());
}

/// `forget_max_memory`: "Waiting requests that can never fit the smaller budget fail with
/// `ExceedsBudget`".
#[test]
fn forget_max_memory_fails_waiters_that_can_never_fit() {
    let pool = BufPool::new(cfg64(256));
    let held = pool.try_allocate(2).unwrap();
    let mut waiter = Box::pin(pool.allocate(3));
    assert!(poll_once(waiter.as_mut()).is_pending());
    assert_eq!(pool.forget_max_memory(1000), 128);
    match poll_once(waiter.as_mut()) {
        Poll::Ready(Err(AllocError::ExceedsBudget {
            requested_bytes: 192,
            max_memory: 128,
        })) => {}
        other => panic!("{other:?}"),
    }
    drop(held);
}

/// `close`: "Closing twice is harmless"; a closed pool refuses every later request, of
/// every form, with `Closed`.
#[test]
fn every_form_after_close() {
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg64(640)));
        pool.close();
        pool.close();
        assert!(pool.is_closed());
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
        assert_eq!(pool.try_allocate_zeroed(1).unwrap_err(), AllocError::Closed);
        assert_eq!(pool.allocate_blocking(1).unwrap_err(), AllocError::Closed);
        assert_eq!(
            pool.allocate_zeroed_blocking(1).unwrap_err(),
            AllocError::Closed
        );
        assert_eq!(
            pool.allocate_timeout(1, Duration::from_secs(5))
                .unwrap_err(),
            AllocError::Closed
        );
        assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::Closed);
        assert_eq!(pool.reserve_blocking(8).unwrap_err(), AllocError::Closed);
        assert_eq!(
            pool.reserve_timeout(8, Duration::from_secs(5)).unwrap_err(),
            AllocError::Closed
        );
        futures::executor::block_on(async {
            assert_eq!(pool.allocate(1).await.unwrap_err(), AllocError::Closed);
            assert_eq!(pool.reserve(8).await.unwrap_err(), AllocError::Closed);
            assert_eq!(
                Arc::clone(&pool).allocate_owned(1).await.unwrap_err(),
                AllocError::Closed
            );
            assert_eq!(
                Arc::clone(&pool).reserve_owned(8).await.unwrap_err(),
                AllocError::Closed
            );
        });
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        assert!(matches!(
            poller.poll_allocate(&mut Context::from_waker(Waker::noop()), 1),
            Poll::Ready(Err(AllocError::Closed))
        ));
        let stats = pool.stats();
        assert_eq!((stats.would_block, stats.timed_out), (0, 0));
        assert!(stats.to_string().contains(", closed"), "{stats}");
    });
}

/// `shutdown_timeout`: returns the stats; `is_drained` counts reserved bytes as held, so a
/// live reservation means not drained even with nothing outstanding.
#[test]
fn shutdown_timeout_with_a_reservation() {
    watchdog(10, || {
        let pool = BufPool::new(cfg64(640));
        let reservation = pool.try_reserve(100).unwrap();
        let stats = pool.shutdown_timeout(Duration::from_millis(10));
        assert!(stats.closed);
        assert_eq!(stats.outstanding, 0);
        assert_eq!(stats.in_use_bytes, 104);
        assert_eq!(stats.reserved_bytes, 104);
        assert!(!stats.is_drained(), "bytes reserved are held: {stats}");
        drop(reservation);
        assert!(pool.shutdown_timeout(Duration::ZERO).is_drained());
    });
}

/// `drained`: "Waits until no allocation of this pool is outstanding" -- and the `Drop`
/// shutdown barrier waits for reservations too (module docs of reservation.rs: "the pool's
/// drop waits for them like for allocations"). Checks `drained` does not resolve while a
/// reservation is held (the barrier's bytes) -- or at least that `Drop` waits.
#[test]
fn drop_waits_for_a_reservation() {
    watchdog(10, || {
        let pool = BufPool::new(cfg64(640));
        let reservation = pool.try_reserve(64).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            tx.send(()).unwrap();
            drop(reservation);
        });
        drop(pool);
        assert!(
            rx.try_recv().is_ok(),
            "the pool's drop returned before the reservation was given back"
        );
        releaser.join().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// stats.rs
// ---------------------------------------------------------------------------------------

/// `would_block`: "counted by the pool the call was made to (a child's, when the room was
/// missing at an ancestor)".
#[test]
fn would_block_counted_by_the_pool_called() {
    let root = BufPool::new(cfg64(128));
    let child = root.child("c", cfg64(1024)).unwrap();
    let held = root.try_allocate(2).unwrap();
    assert_eq!(child.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(child.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
    let mut r = child.try_reserve(0).unwrap();
    assert_eq!(r.try_grow(8).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(r.resize_to(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(child.stats().would_block, 4);
    assert_eq!(root.stats().would_block, 0);
    drop(held);
}

/// `timed_out`: "counted by the pool the call was made to", also when the wait was in the
/// parent's queue.
#[test]
fn timed_out_counted_by_the_pool_called() {
    watchdog(10, || {
        let root = BufPool::new(cfg64(128));
        let child = root.child("c", cfg64(1024)).unwrap();
        let held = root.try_allocate(2).unwrap();
        assert_eq!(
            child
                .allocate_timeout(1, Duration::from_millis(20))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(
            child
                .reserve_timeout(8, Duration::from_millis(20))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(child.stats().timed_out, 2);
        assert_eq!(root.stats().timed_out, 0);
        assert_eq!((root.stats().waiting, child.stats().waiting), (0, 0));
        drop(held);
    });
}

/// `queue_full`: "counted by the pool whose queue was full": a child request refused at its
/// parent's full queue counts at the parent.
#[test]
fn queue_full_counted_by_the_pool_whose_queue_was_full() {
    watchdog(10, || {
        let root = BufPool::builder(cfg64(128)).max_waiters(0).build().unwrap();
        let child = root.child("c", cfg64(1024)).unwrap();
        let held = root.try_allocate(2).unwrap();
        assert_eq!(
            child.allocate_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(root.stats().queue_full, 1);
        assert_eq!(child.stats().queue_full, 0);
        assert!(
            root.stats()
                .to_string()
                .contains("; 1 refused with the queue full"),
            "{}",
            root.stats()
        );
        drop(held);
    });
}

/// `waiting`: "Requests queued for budget in this pool's queue (its own, and descendants'
/// that wait at its level)"; `waited_allocations` counts "reservations and child pools'
/// requests that waited here".
#[test]
fn waiting_and_waited_count_descendants_at_this_level() {
    let root = BufPool::new(cfg64(128));
    let child = root.child("c", cfg64(1024)).unwrap();
    let held = root.try_allocate(2).unwrap();
    let mut a = Box::pin(child.allocate(1));
    let mut r = Box::pin(child.reserve(64));
    assert!(poll_once(a.as_mut()).is_pending());
    assert!(poll_once(r.as_mut()).is_pending());
    assert_eq!(root.stats().waiting, 2);
    assert_eq!(child.stats().waiting, 0, "they wait at the root's level");
    drop(held);
    let Poll::Ready(Ok(allocation)) = poll_once(a.as_mut()) else {
        panic!("served")
    };
    let Poll::Ready(Ok(reservation)) = poll_once(r.as_mut()) else {
        panic!("served")
    };
    assert_eq!(root.stats().waited_allocations, 2);
    assert_eq!(child.stats().outstanding, 1);
    assert_eq!(
        root.stats().outstanding,
        0,
        "its outstanding count is its own"
    );
    assert_eq!(root.stats().in_use_bytes, 128);
    drop((allocation, reservation));
}

/// `time_waits(false)`: "those two stay zero, and everything else is counted as before,
/// `waited_allocations` included".
#[test]
fn time_waits_off_counts_but_does_not_time() {
    watchdog(10, || {
        let pool = Arc::new(
            BufPool::builder(cfg64(64))
                .time_waits(false)
                .build()
                .unwrap(),
        );
        let held = pool.try_allocate(1).unwrap();
        let waiter = std::thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.allocate_blocking(1).map(drop)
        });
        wait_waiting(&pool, 1);
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        waiter.join().unwrap().unwrap();
        let stats = pool.stats();
        assert_eq!(stats.waited_allocations, 1);
        assert_eq!(stats.total_wait, Duration::ZERO);
        assert_eq!(stats.max_wait, Duration::ZERO);
        assert_eq!(stats.mean_wait(), Duration::ZERO);
    });
}

/// `PoolStats` `Display`: the base text, and the rarer figures only when above zero.
#[test]
fn stats_display_text() {
    let pool = BufPool::builder(cfg64(256)).name("p").build().unwrap();
    let text = pool.stats().to_string();
    assert_eq!(
        text,
        "pool \"p\": 0 of 256 bytes in use by 0 allocations (peak 0 bytes), 0 waiting; \
         0 allocations, 0 waited (mean 0ns, max 0ns), 0 would block, 0 timed out"
    );
    let _r = pool.try_reserve(13).unwrap();
    let _a = pool.try_allocate(1).unwrap();
    let text = pool.stats().to_string();
    assert!(
        text.starts_with("pool \"p\": 80 of 256 bytes in use by 1 allocations (peak 80 bytes)"),
        "{text}"
    );
    assert!(text.ends_with("; 16 bytes reserved"), "{text}");
    assert!(!text.contains("cached"), "{text}");
    assert!(!text.contains("overcommitted"), "{text}");
}

/// `overcommit_bytes`: growth forced "here or in a descendant" counts at every pool; "While
/// it is above zero no request is granted in this pool".
#[test]
fn overcommit_in_child_counts_at_ancestors() {
    let root = BufPool::new(cfg64(256));
    let child = root.child("c", cfg64(128)).unwrap();
    let mut r = child.try_reserve(128).unwrap();
    let other = root.try_allocate(2).unwrap();
    r.force_grow(200).unwrap();
    let (rs, cs) = (root.stats(), child.stats());
    assert_eq!(r.size(), 328);
    assert_eq!(cs.in_use_bytes, 328);
    assert_eq!(cs.overcommit_bytes, 200);
    assert_eq!(rs.in_use_bytes, 456);
    assert_eq!(rs.overcommit_bytes, 200);
    assert!(rs.to_string().contains("; 200 bytes overcommitted"), "{rs}");
    assert_eq!(root.report().overcommit_bytes, 200);
    assert_eq!(root.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    drop(other); // 328 in use at the root, still 72 over
    assert_eq!(root.stats().overcommit_bytes, 72);
    assert_eq!(root.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    r.try_shrink(200).unwrap();
    assert_eq!(
        (
            root.stats().overcommit_bytes,
            child.stats().overcommit_bytes
        ),
        (0, 0)
    );
    assert!(root.try_allocate(1).is_ok());
}

/// `overcommit_bytes` "(or a budget shrunk below what was held)".
#[test]
fn overcommit_after_shrinking_the_budget() {
    let pool = BufPool::new(cfg64(256));
    let held = pool.try_allocate(4).unwrap();
    pool.set_max_memory(128).unwrap();
    assert_eq!(pool.stats().overcommit_bytes, 128);
    assert_eq!(pool.stats().available_bytes(), 0);
    drop(held);
    assert_eq!(pool.stats().overcommit_bytes, 0);
}

/// `mean_wait` is "never above `max_wait`", and is total / waited.
#[test]
fn mean_wait_is_total_over_waited() {
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg64(64)));
        for _ in 0..3 {
            let held = pool.try_allocate(1).unwrap();
            let waiter = std::thread::spawn({
                let pool = Arc::clone(&pool);
                move || pool.allocate_blocking(1).map(drop)
            });
            wait_waiting(&pool, 1);
            std::thread::sleep(Duration::from_millis(2));
            drop(held);
            waiter.join().unwrap().unwrap();
        }
        let stats = pool.stats();
        assert_eq!(stats.waited_allocations, 3);
        assert!(stats.mean_wait() <= stats.max_wait);
        assert_eq!(stats.mean_wait(), stats.total_wait / 3);
        assert!(stats.max_wait >= Duration::from_millis(1), "{stats}");
    });
}

/// `is_drained` on a parent with a floored child: "not drained until that child closes".
#[test]
fn parent_with_floored_child_is_not_drained_until_it_closes() {
    let root = BufPool::new(cfg64(1024));
    let child = BufPool::builder(cfg64(512))
        .parent(&root)
        .min_memory(256)
        .build()
        .unwrap();
    assert!(!root.stats().is_drained());
    assert_eq!(root.stats().outstanding, 0);
    child.close();
    assert!(root.stats().is_drained(), "{}", root.stats());
    drop(child);
}

// ---------------------------------------------------------------------------------------
// builder.rs
// ---------------------------------------------------------------------------------------

/// `min_memory`: "a floor of 97 bytes in a pool of 100 sets 104 aside", reported as such.
#[test]
fn floor_rounding_past_own_budget() {
    let root = BufPool::new(cfg(BufferSize::S8, 1024));
    let child = BufPool::builder(cfg(BufferSize::S8, 100))
        .parent(&root)
        .min_memory(97)
        .build()
        .unwrap();
    assert_eq!(root.stats().in_use_bytes, 104);
    assert_eq!(root.report().children[0].min_memory, 104);
    // Its own max_memory still caps what it holds: 12 buffers of 8 = 96 <= 100.
    let a = child.try_allocate(12).unwrap();
    assert!(matches!(
        child.try_allocate(13),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert_eq!(root.stats().in_use_bytes, 104);
    drop(a);
    drop(child);
    assert_eq!(root.stats().in_use_bytes, 0);
}

/// `min_memory` of `usize::MAX` on an unlimited child: "the largest multiple of 8" cannot be
/// set aside.
#[test]
fn floor_of_usize_max() {
    let root = BufPool::new(cfg64(1024));
    let err = BufPool::builder(cfg64(usize::MAX))
        .parent(&root)
        .min_memory(usize::MAX)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, ConfigError::MinMemoryUnavailable { min_memory, .. } if min_memory == usize::MAX - 7),
        "{err:?}"
    );
    assert_eq!(root.stats().in_use_bytes, 0);
}

/// `min_memory`: `MinMemoryUnavailable` "when ... requests waiting there: a floor never
/// barges", even when the floor itself would fit the free room.
#[test]
fn floor_never_barges_past_waiters() {
    let root = BufPool::new(cfg64(512));
    let held = root.try_allocate(4).unwrap();
    let mut waiter = Box::pin(root.allocate(5));
    assert!(poll_once(waiter.as_mut()).is_pending());
    let err = BufPool::builder(cfg64(128))
        .parent(&root)
        .min_memory(64)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::MinMemoryUnavailable { min_memory: 64, .. }
        ),
        "{err:?}"
    );
    drop(waiter);
    drop(held);
}

/// `min_memory` on a grandchild: set aside "at every ancestor".
#[test]
fn floor_counts_at_every_ancestor() {
    let root = BufPool::new(cfg64(4096));
    let mid = root.child("mid", cfg64(2048)).unwrap();
    let leaf = BufPool::builder(cfg64(1024))
        .parent(&mid)
        .min_memory(512)
        .build()
        .unwrap();
    assert_eq!(mid.stats().in_use_bytes, 512);
    assert_eq!(root.stats().in_use_bytes, 512);
    let a = leaf.try_allocate(4).unwrap();
    assert_eq!(root.stats().in_use_bytes, 512, "within the floor");
    drop(a);
    drop(leaf);
    assert_eq!(
        (mid.stats().in_use_bytes, root.stats().in_use_bytes),
        (0, 0)
    );
}

/// `max_waiters`: "Requests that fit without waiting are never refused": with
/// `max_waiters(0)`, a blocking request that fits is served.
#[test]
fn max_waiters_zero_serves_what_fits() {
    watchdog(10, || {
        let pool = BufPool::builder(cfg64(128)).max_waiters(0).build().unwrap();
        let a = pool.allocate_blocking(1).unwrap();
        let b = pool.allocate_timeout(1, Duration::from_secs(5)).unwrap();
        assert_eq!(
            pool.allocate_timeout(1, Duration::from_secs(5))
                .unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(pool.reserve_blocking(8).unwrap_err(), AllocError::QueueFull);
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(pool.stats().queue_full, 2);
        drop((a, b));
    });
}

/// `max_waiters(1)`: one waits, the second is refused.
#[test]
fn max_waiters_one() {
    let pool = BufPool::builder(cfg64(64)).max_waiters(1).build().unwrap();
    let held = pool.try_allocate(1).unwrap();
    let mut first = Box::pin(pool.allocate(1));
    assert!(poll_once(first.as_mut()).is_pending());
    let mut second = Box::pin(pool.allocate(1));
    assert!(matches!(
        poll_once(second.as_mut()),
        Poll::Ready(Err(AllocError::QueueFull))
    ));
    drop(held);
    assert!(matches!(poll_once(first.as_mut()), Poll::Ready(Ok(_))));
}

/// `wait_for_growth`: "Only a request above the most any budget can be (2 PiB) fails at
/// once"; a request of exactly 2 PiB waits (`try_` gives `WouldBlock`).
#[test]
fn wait_for_growth_limit_is_two_pib() {
    let pool = BufPool::builder(cfg64(0))
        .wait_for_growth()
        .build()
        .unwrap();
    assert_eq!(pool.stats().max_memory, 0);
    assert_eq!(
        pool.try_allocate(PIB2 / 64).unwrap_err(),
        AllocError::WouldBlock
    );
    assert!(matches!(
        pool.try_allocate(PIB2 / 64 + 1),
        Err(AllocError::ExceedsBudget { requested_bytes, .. }) if requested_bytes == PIB2 + 64
    ));
    assert_eq!(pool.try_reserve(PIB2).unwrap_err(), AllocError::WouldBlock);
    assert!(matches!(
        pool.try_reserve(PIB2 + 1),
        Err(AllocError::ExceedsBudget { .. })
    ));
    let mut waiting = Box::pin(pool.reserve(PIB2));
    assert!(poll_once(waiting.as_mut()).is_pending());
    assert_eq!(pool.stats().waiting, 1);
    // set_max_memory(0) is allowed on such a pool.
    assert_eq!(pool.set_max_memory(0), Ok(()));
    assert!(poll_once(waiting.as_mut()).is_pending());
}

/// `direct_io_alignment`: "Every buffer starts at a multiple of `min(buffer_size, 4096)`";
/// without it, `min(buffer_size, 16)`.
#[test]
fn alignment_for_every_size() {
    for size in BufferSize::ALL {
        let direct = BufPool::builder(cfg(size, size.bytes() * 4))
            .direct_io_alignment()
            .build()
            .unwrap();
        let plain = BufPool::new(cfg(size, size.bytes() * 4));
        for n in 1..=3 {
            let a = direct.try_allocate(n).unwrap();
            assert!(
                a.iter().all(|b| b as usize % size.bytes().min(4096) == 0),
                "{size}"
            );
            let b = plain.try_allocate_zeroed(n).unwrap();
            assert!(
                b.iter().all(|p| p as usize % size.bytes().min(16) == 0),
                "{size}"
            );
        }
    }
}

/// `recycle` on a child: "these two settings have no effect" (the child keeps no cache of
/// its own); its freed blocks go to the root's cache when the root recycles.
#[test]
fn recycle_on_child_has_no_effect() {
    let root = BufPool::new(cfg64(1 << 20));
    let child = BufPool::builder(cfg64(1 << 20))
        .parent(&root)
        .recycle(4)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    drop(child.try_allocate(1).unwrap());
    assert_eq!(child.stats().cached_bytes, 0);
    assert_eq!(root.stats().cached_bytes, 0);

    let root = BufPool::builder(cfg64(1 << 20))
        .recycle(4)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    let child = root.child("c", cfg64(1 << 20)).unwrap();
    drop(child.try_allocate(2).unwrap());
    assert_eq!(root.stats().cached_bytes, 128, "the root's cache has it");
    assert_eq!(root.stats().in_use_bytes, 0);
}

/// `recycle`: "Zeroed requests always get fresh zeroed memory", even when a cached block of
/// the size is there.
#[test]
fn zeroed_request_with_a_cached_block() {
    let pool = BufPool::builder(cfg64(1 << 20))
        .recycle(2)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    let a = pool.try_allocate(4).unwrap();
    // SAFETY: 256 writable bytes owned by `a`.
    unsafe { a.first().write_bytes(0xEE, 256) };
    drop(a);
    assert_eq!(pool.stats().cached_bytes, 256);
    let z = pool.try_allocate_zeroed(4).unwrap();
    // SAFETY: zeroed, 256 initialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts(z.first(), 256) };
    assert!(bytes.iter().all(|&b| b == 0));
}

/// `name`: "the name appears in its `Debug` output".
#[test]
fn name_in_debug_output() {
    let pool = BufPool::builder(cfg64(640)).name("ingest").build().unwrap();
    let debug = format!("{pool:?}");
    assert!(debug.contains("ingest"), "{debug}");
    assert!(
        pool.report()
            .to_string()
            .starts_with("ingest: 0 of 640 bytes in use")
    );
}

// ---------------------------------------------------------------------------------------
// reservation.rs
// ---------------------------------------------------------------------------------------

/// `reserve`: "The size is rounded up to a multiple of 8; `reserve(0)` gives an empty
/// reservation at once" -- for sizes 1..=17 each form agrees.
#[test]
fn reserve_rounding_for_small_sizes() {
    let pool = BufPool::new(cfg64(640));
    for bytes in 0..=17usize {
        let expected = bytes.next_multiple_of(8);
        let r = pool.try_reserve(bytes).unwrap();
        assert_eq!(r.size(), expected);
        assert_eq!(pool.stats().in_use_bytes, expected);
        assert_eq!(pool.stats().reserved_bytes, expected);
        drop(r);
        let r = pool.reserve_blocking(bytes).unwrap();
        assert_eq!(r.size(), expected);
        drop(r);
        let r = futures::executor::block_on(pool.reserve(bytes)).unwrap();
        assert_eq!(r.size(), expected);
        drop(r);
    }
    assert_idle(&pool);
}

/// `reserve`: `ExceedsBudget` "at once if the rounded size is above the budget": 253 bytes
/// round to 256 in a budget of 255 (rounding, not the raw size, decides).
#[test]
fn reserve_refused_when_rounding_passes_budget() {
    let pool = BufPool::new(cfg(BufferSize::S8, 255));
    assert!(matches!(
        pool.try_reserve(249),
        Err(AllocError::ExceedsBudget {
            requested_bytes: 256,
            max_memory: 255
        })
    ));
    let r = pool.try_reserve(248).unwrap();
    assert_eq!(r.size(), 248);
}

/// Rounding overflow: `reserve(usize::MAX - 3)` and friends fail at once with
/// `requested_bytes: usize::MAX`, as every form.
#[test]
fn reserve_rounding_overflow_every_form() {
    watchdog(10, || {
        let pool = BufPool::new(cfg64(640));
        for bytes in [usize::MAX, usize::MAX - 3, usize::MAX - 6] {
            let expected = AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory: 640,
            };
            assert_eq!(pool.try_reserve(bytes).unwrap_err(), expected);
            assert_eq!(pool.reserve_blocking(bytes).unwrap_err(), expected);
            assert_eq!(
                pool.reserve_timeout(bytes, Duration::from_secs(5))
                    .unwrap_err(),
                expected
            );
            let mut r = pool.try_reserve(8).unwrap();
            assert_eq!(r.try_grow(bytes).unwrap_err(), expected);
            assert_eq!(r.grow_blocking(bytes).unwrap_err(), expected);
            assert_eq!(r.resize_to(bytes).unwrap_err(), expected);
            assert_eq!(r.size(), 8);
        }
        assert_eq!(pool.stats().in_use_bytes, 0);
    });
}

/// `try_grow`: `ExceedsBudget` "if the size and `more` together are above the budget",
/// naming their sum and the smallest budget on the chain; and a child's `try_grow` that
/// fits its own cap but not the parent's is refused at once too.
#[test]
fn try_grow_exceeds_names_sum_and_chain_budget() {
    let root = BufPool::new(cfg64(256));
    let child = root.child("c", cfg64(1024)).unwrap();
    let mut r = child.try_reserve(200).unwrap();
    assert_eq!(
        r.try_grow(64).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 264,
            max_memory: 256
        }
    );
    assert_eq!(r.size(), 200);
    r.try_grow(56).unwrap();
    assert_eq!(r.size(), 256);
    let mut grow = Box::pin(r.grow(8));
    assert!(matches!(
        poll_once(grow.as_mut()),
        Poll::Ready(Err(AllocError::ExceedsBudget {
            requested_bytes: 264,
            max_memory: 256
        }))
    ));
}

/// `try_grow(0)`, `grow(0)`, `resize_to(size)` and `split(0)` change nothing and succeed.
#[test]
fn zero_sized_operations() {
    let pool = BufPool::new(cfg64(640));
    let mut r = pool.try_reserve(24).unwrap();
    r.try_grow(0).unwrap();
    futures::executor::block_on(r.grow(0)).unwrap();
    r.grow_blocking(0).unwrap();
    r.resize_to(24).unwrap();
    let part = r.split(0);
    assert_eq!((r.size(), part.size()), (24, 0));
    r.shrink(0);
    r.try_shrink(0).unwrap();
    assert_eq!(r.size(), 24);
    assert_eq!(pool.stats().in_use_bytes, 24);
}

/// `resize_to` on a closed pool: growing fails with `Closed` (listed), the reservation
/// unchanged; shrinking "always succeeds".
#[test]
fn reservation_after_close() {
    let pool = BufPool::new(cfg64(640));
    let mut r = pool.try_reserve(64).unwrap();
    pool.close();
    assert_eq!(r.try_grow(8).unwrap_err(), AllocError::Closed);
    assert_eq!(r.resize_to(65).unwrap_err(), AllocError::Closed);
    assert_eq!(r.grow_blocking(8).unwrap_err(), AllocError::Closed);
    assert_eq!(r.size(), 64);
    r.resize_to(13).unwrap();
    assert_eq!((r.size(), pool.stats().in_use_bytes), (13, 16));
    // `allocate` out of the reservation never waits; the bytes are held already.
    let mut r2 = r.split(16);
    assert_eq!(r2.size(), 13, "min(16, 13)");
    assert_eq!(r.size(), 0);
    assert!(matches!(
        r2.allocate(1),
        Err(AllocError::ExceedsBudget {
            requested_bytes: 64,
            max_memory: 13
        })
    ));
    // force_grow on a closed pool: "Only for sizes no pool can count" may it fail.
    r2.force_grow(51).unwrap();
    assert_eq!(r2.size(), 64);
    let a = r2.allocate(1).expect("held bytes of a closed pool");
    assert_eq!(a.length(), 1);
    drop(a);
    assert_eq!(pool.stats().in_use_bytes, 0);
}

/// `split`: takes `min(bytes, size)` (`bytes` rounded up); rounding stays inside: held bytes
/// always go back.
#[test]
fn split_and_merge_with_odd_sizes() {
    let pool = BufPool::new(cfg64(640));
    let mut r = pool.try_reserve(0).unwrap();
    r.resize_to(13).unwrap(); // held 16
    let part = r.split(1); // rounded to 8
    assert_eq!((r.size(), part.size()), (5, 8));
    assert_eq!(pool.stats().in_use_bytes, 16);
    let all = r.split(usize::MAX);
    assert_eq!((r.size(), all.size()), (0, 5));
    assert_eq!(pool.stats().in_use_bytes, 16);
    r.merge(all).unwrap();
    r.merge(part).unwrap();
    assert_eq!(r.size(), 13);
    assert_eq!(pool.stats().in_use_bytes, 16, "13 rounds to 16");
    assert_eq!(pool.stats().reserved_bytes, 16);
    drop(r);
    assert_idle(&pool);
}

/// `merge`: "`other` back, unchanged, if it belongs to another pool" -- a child's
/// reservation is of another pool than its parent's.
#[test]
fn merge_across_parent_and_child_is_refused() {
    let root = BufPool::new(cfg64(640));
    let child = root.child("c", cfg64(640)).unwrap();
    let mut parent_r = root.try_reserve(16).unwrap();
    let child_r = child.try_reserve(8).unwrap();
    let back = parent_r.merge(child_r).unwrap_err();
    assert_eq!(back.size(), 8);
    assert_eq!(parent_r.size(), 16);
    assert_eq!(child.stats().reserved_bytes, 8);
    assert_eq!(root.stats().reserved_bytes, 16);
}

/// `Reservation::allocate`: `ZeroBuffers`; `ExceedsBudget` with the reservation's size as
/// `max_memory` (`n = usize::MAX` names `usize::MAX` bytes); unchanged on both.
#[test]
fn reservation_allocate_errors() {
    let pool = BufPool::new(cfg64(640));
    let mut r = pool.try_reserve(130).unwrap();
    assert_eq!(r.allocate(0).unwrap_err(), AllocError::ZeroBuffers);
    assert_eq!(
        r.allocate(3).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 192,
            max_memory: 136
        }
    );
    assert_eq!(
        r.allocate(usize::MAX).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            max_memory: 136
        }
    );
    assert_eq!(r.size(), 136);
    let a = r.allocate(2).unwrap();
    assert_eq!((a.length(), r.size()), (2, 8));
    assert_eq!(pool.stats().reserved_bytes, 8);
    assert_eq!(pool.stats().outstanding, 1);
    drop(r);
    assert_eq!(pool.stats().in_use_bytes, 128);
}

/// `try_shrink`: `ExceedsBudget` "with the size as `max_memory` if `less` is more than the
/// size".
#[test]
fn try_shrink_past_size() {
    let pool = BufPool::new(cfg64(640));
    let mut r = pool.try_reserve(0).unwrap();
    r.resize_to(13).unwrap();
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
    r.try_shrink(13).unwrap();
    assert_eq!(pool.stats().in_use_bytes, 0);
    assert_eq!(r.free(), 0);
}

/// `free`: "returns the size it had" (the exact size after `resize_to`) and "stays usable".
#[test]
fn free_returns_exact_size_and_stays_usable() {
    let pool = BufPool::new(cfg64(640));
    let mut r = pool.try_reserve(0).unwrap();
    r.resize_to(13).unwrap();
    assert_eq!(r.free(), 13);
    assert_eq!(pool.stats().in_use_bytes, 0);
    r.try_grow(5).unwrap();
    assert_eq!(r.size(), 8);
    r.force_grow(3).unwrap();
    assert_eq!((r.size(), pool.stats().in_use_bytes), (11, 16));
}

/// `force_grow`: "Only for sizes no pool can count (the bytes in use would pass 4 PiB)":
/// 3 PiB is forced (a pool of 128 bytes), 5 PiB is refused and the reservation unchanged.
#[test]
fn force_grow_limits() {
    let pool = BufPool::new(cfg64(128));
    let mut r = pool.try_reserve(8).unwrap();
    assert!(matches!(
        r.force_grow(5 << 50),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert_eq!((r.size(), pool.stats().in_use_bytes), (8, 8));
    assert!(matches!(
        r.force_grow(usize::MAX),
        Err(AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            ..
        })
    ));
    r.force_grow(3 << 50).expect("3 PiB of use is below 4 PiB");
    assert_eq!(r.size(), 8 + (3 << 50));
    assert_eq!(pool.stats().overcommit_bytes, 8 + (3 << 50) - 128);
    r.free();
    assert_eq!(pool.stats().in_use_bytes, 0);
    assert_eq!(pool.stats().overcommit_bytes, 0);
}

/// `force_grow` on a child: "held at once in this pool and every ancestor".
#[test]
fn force_grow_child_past_both_budgets() {
    let root = BufPool::new(cfg64(128));
    let child = root.child("c", cfg64(64)).unwrap();
    let mut r = child.try_reserve(0).unwrap();
    r.force_grow(1000).unwrap();
    assert_eq!(child.stats().in_use_bytes, 1000);
    assert_eq!(root.stats().in_use_bytes, 1000);
    assert_eq!(child.stats().overcommit_bytes, 936);
    assert_eq!(root.stats().overcommit_bytes, 872);
    drop(r);
    assert_eq!(root.stats().in_use_bytes, 0);
}

/// `shrink_to_deferring_wakeups`: "A `size` at or above the current size changes nothing".
#[test]
fn shrink_deferring_at_or_above_size() {
    let pool = BufPool::new(cfg64(640));
    let mut r = pool.try_reserve(64).unwrap();
    r.shrink_to_deferring_wakeups(64).run();
    r.shrink_to_deferring_wakeups(usize::MAX).run();
    assert_eq!((r.size(), pool.stats().in_use_bytes), (64, 64));
    r.shrink_to_deferring_wakeups(1).run();
    assert_eq!((r.size(), pool.stats().in_use_bytes), (1, 8));
}

/// `reserve_owned`: "Allocations made out of it (`Reservation::allocate`) hold the pool the
/// same way": dropping the last handle and then the reservation does not block, while the
/// allocation lives.
#[test]
fn owned_reservation_allocation_keeps_pool() {
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg64(640)));
        let weak = Arc::downgrade(&pool);
        let mut r = futures::executor::block_on(Arc::clone(&pool).reserve_owned(256)).unwrap();
        let a = r.allocate(2).unwrap();
        let part = r.split(64);
        drop(pool);
        drop(r);
        assert!(
            weak.upgrade().is_some(),
            "the part and the allocation hold it"
        );
        drop(part);
        assert_eq!(weak.upgrade().unwrap().stats().in_use_bytes, 128);
        drop(a);
        assert!(
            weak.upgrade().is_none(),
            "the last holder gone: the pool dropped"
        );
    });
}

/// `reserve` on a child with a parent at its budget waits; cancelling gives the place up
/// (cancel safety) and the parent's queue is empty after.
#[test]
fn reserve_cancel_on_child() {
    let root = BufPool::new(cfg64(128));
    let child = root.child("c", cfg64(128)).unwrap();
    let held = root.try_allocate(2).unwrap();
    let mut r = Box::pin(child.reserve(64));
    assert!(poll_once(r.as_mut()).is_pending());
    assert_eq!(root.stats().waiting, 1);
    drop(r);
    assert_eq!((root.stats().waiting, child.stats().waiting), (0, 0));
    drop(held);
    assert_eq!(root.stats().in_use_bytes, 0);
    assert_eq!(child.stats().in_use_bytes, 0);
}

// ---------------------------------------------------------------------------------------
// owned.rs
// ---------------------------------------------------------------------------------------

/// `allocate_owned`: the pool's drop "runs when the last owned allocation is given back
/// (through `into_filled` and `freeze` too)".
#[cfg(feature = "bytes")]
#[test]
fn owned_allocation_through_freeze_keeps_pool() {
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg64(640)));
        let weak = Arc::downgrade(&pool);
        let a = futures::executor::block_on(Arc::clone(&pool).allocate_owned(2)).unwrap();
        drop(pool);
        let mut filled = a.into_filled();
        filled.extend_from_slice(b"hello");
        let bytes = filled.freeze();
        let slice = bytes.slice(1..3);
        drop(bytes);
        assert!(weak.upgrade().is_some());
        assert_eq!(&slice[..], b"el");
        drop(slice);
        assert!(weak.upgrade().is_none());
    });
}

/// `PollAllocate`: "asking for a different `n` gives the old place up and queues anew";
/// "Cloning gives a new `PollAllocate` for the same pool, with no place in the queue".
#[test]
fn poll_allocate_different_n_requeues() {
    let pool = Arc::new(BufPool::new(cfg64(128)));
    let held = pool.try_allocate(2).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut first = PollAllocate::new(Arc::clone(&pool));
    let mut second = PollAllocate::new(Arc::clone(&pool));
    assert!(first.poll_allocate(&mut cx, 1).is_pending());
    assert!(second.poll_allocate(&mut cx, 1).is_pending());
    let clone = first.clone();
    assert_eq!(pool.stats().waiting, 2);
    assert!(
        format!("{clone:?}").contains("pending_n: None"),
        "{clone:?}"
    );
    // `first` asks for 2 now: it goes to the back, behind `second`.
    assert!(first.poll_allocate(&mut cx, 2).is_pending());
    assert_eq!(pool.stats().waiting, 2);
    drop(held);
    let Poll::Ready(Ok(a)) = second.poll_allocate(&mut cx, 1) else {
        panic!("second is now first in line")
    };
    assert!(first.poll_allocate(&mut cx, 2).is_pending());
    drop(a);
    let Poll::Ready(Ok(b)) = first.poll_allocate(&mut cx, 2) else {
        panic!("served")
    };
    assert_eq!(b.length(), 2);
    // After `Ready`, the next call starts a new request.
    assert!(first.poll_allocate(&mut cx, 1).is_pending());
    drop(first);
    assert_eq!(pool.stats().waiting, 0);
    drop(b);
}

/// `poll_allocate` with `n == 0` and with `n` above the budget: the errors `allocate` gives.
#[test]
fn poll_allocate_bad_input() {
    let pool = Arc::new(BufPool::new(cfg64(128)));
    let mut cx = Context::from_waker(Waker::noop());
    let mut poller = PollAllocate::new(Arc::clone(&pool));
    assert!(matches!(
        poller.poll_allocate(&mut cx, 0),
        Poll::Ready(Err(AllocError::ZeroBuffers))
    ));
    assert!(matches!(
        poller.poll_allocate(&mut cx, 3),
        Poll::Ready(Err(AllocError::ExceedsBudget {
            requested_bytes: 192,
            max_memory: 128
        }))
    ));
    assert!(matches!(
        poller.poll_allocate(&mut cx, usize::MAX),
        Poll::Ready(Err(AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            ..
        }))
    ));
    assert!(matches!(
        poller.poll_allocate(&mut cx, 2),
        Poll::Ready(Ok(_))
    ));
}

// ---------------------------------------------------------------------------------------
// allocation.rs, filled.rs
// ---------------------------------------------------------------------------------------

/// `buffer(index)`: "`None` past the last one", `usize::MAX` included; `iter` is exact-size
/// and double-ended.
#[test]
fn buffer_index_edges() {
    let pool = BufPool::new(cfg(BufferSize::S16384, 16384 * 4));
    let a = pool.try_allocate(3).unwrap();
    assert_eq!(a.buffer(0), Some(a.first()));
    assert_eq!(a.buffer(2), Some(a.first().wrapping_add(2 * 16384)));
    assert_eq!(a.buffer(3), None);
    assert_eq!(a.buffer(usize::MAX), None);
    let mut it = a.iter();
    assert_eq!(it.len(), 3);
    assert_eq!(it.next_back(), a.buffer(2));
    assert_eq!(it.next(), a.buffer(0));
    assert_eq!(it.next(), a.buffer(1));
    assert_eq!(it.next(), None);
    assert_eq!(it.next_back(), None);
    let mut a = a;
    assert_eq!(a.buffers_uninit_mut().len(), 3);
}

/// `FilledAllocation` `Write`: "a full allocation accepts no more bytes: `write` returns
/// `Ok(0)`, `write_all` a `WriteZero` error"; `write_vectored` stops at the end.
#[test]
fn filled_write_when_full() {
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate(1).unwrap().into_filled();
    assert_eq!(
        f.write_vectored(&[
            io::IoSlice::new(b"abc"),
            io::IoSlice::new(b"defgh"),
            io::IoSlice::new(b"ij")
        ])
        .unwrap(),
        8
    );
    assert_eq!(f.filled(), b"abcdefgh");
    assert_eq!(f.write(b"x").unwrap(), 0);
    assert_eq!(f.write(b"").unwrap(), 0);
    assert_eq!(
        f.write_all(b"x").unwrap_err().kind(),
        io::ErrorKind::WriteZero
    );
    assert_eq!(f.extend_from_slice(b"x"), 0);
    assert_eq!(f.fill(b'x', usize::MAX), 0);
    assert_eq!(f.remaining(), 0);
    f.flush().unwrap();
}

/// `fill`: "as many as fit", with a count of `usize::MAX` after a partial fill.
#[test]
fn fill_usize_max_count() {
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate(2).unwrap().into_filled();
    f.extend_from_slice(b"ab");
    assert_eq!(f.fill(b'z', usize::MAX), 14);
    assert_eq!(&f[..], b"abzzzzzzzzzzzzzz");
    f.clear();
    assert!(
        f.set_filled(16),
        "written bytes stay initialised after clear"
    );
    assert!(!f.set_filled(17));
    assert_eq!(f.len(), 16);
}

/// `read_from`: "`Ok(0)` means the reader is at its end, or the allocation is full (then the
/// reader is not called)"; `Interrupted` is retried; another error is returned with nothing
/// counted; a reader reporting too much gives `InvalidData`, not a panic.
#[test]
fn read_from_edge_cases() {
    struct Script(Vec<io::Result<usize>>, usize);
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 += 1;
            let step = self.0.remove(0);
            if let Ok(n) = step {
                let n = n.min(buf.len());
                buf[..n].fill(b'r');
            }
            step
        }
    }
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate(1).unwrap().into_filled();
    let mut reader = Script(
        vec![
            Err(io::ErrorKind::Interrupted.into()),
            Err(io::ErrorKind::Interrupted.into()),
            Ok(3),
            Err(io::ErrorKind::BrokenPipe.into()),
            Ok(9),
            Ok(5),
        ],
        0,
    );
    assert_eq!(f.read_from(&mut reader).unwrap(), 3);
    assert_eq!(reader.1, 3);
    assert_eq!(
        f.read_from(&mut reader).unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
    assert_eq!(f.filled(), b"rrr");
    let err = f.read_from(&mut reader).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert_eq!(
        err.to_string(),
        "the reader reported 9 bytes read into a buffer of 5"
    );
    assert_eq!(f.filled(), b"rrr");
    assert_eq!(f.read_from(&mut reader).unwrap(), 5);
    assert_eq!(f.remaining(), 0);
    let calls = reader.1;
    assert_eq!(f.read_from(&mut reader).unwrap(), 0);
    assert_eq!(
        reader.1, calls,
        "a full allocation does not call the reader"
    );
}

/// `BufMut` for `FilledAllocation`: "Writing past it panics (`put_slice` of more than fits,
/// `advance_mut(cnt)` with `cnt > remaining_mut()`)"; the budget is intact afterwards.
#[cfg(feature = "bytes")]
#[test]
fn bufmut_past_the_end_panics() {
    use bytes::BufMut;
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut f = pool.try_allocate(1).unwrap().into_filled();
        f.put_slice(b"123456789");
    }));
    assert!(result.is_err());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut f = pool.try_allocate(1).unwrap().into_filled();
        // SAFETY: never reached past the assert; 9 > remaining_mut must panic first.
        unsafe { f.advance_mut(9) };
    }));
    assert!(result.is_err());
    assert_idle(&pool);
    // `remaining_mut` grows back after `clear`.
    let mut f = pool.try_allocate(1).unwrap().into_filled();
    f.put_slice(b"12345678");
    assert_eq!(f.remaining_mut(), 0);
    f.clear();
    assert_eq!(f.remaining_mut(), 8);
}

/// `freeze`: "the pool's bytes stay reserved, the whole allocation and not only the filled
/// part"; "an empty slice does not hold the owner"; a freeze of nothing filled.
#[cfg(feature = "bytes")]
#[test]
fn freeze_holds_whole_allocation() {
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate(4).unwrap().into_filled();
    f.extend_from_slice(b"x");
    let bytes = f.freeze();
    assert_eq!(bytes.len(), 1);
    assert_eq!(pool.stats().in_use_bytes, 32);
    let empty = bytes.slice(0..0);
    drop(bytes);
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "an empty slice does not hold the owner"
    );
    drop(empty);
    let nothing = pool.try_allocate(1).unwrap().into_filled().freeze();
    assert!(nothing.is_empty());
    drop(nothing);
    assert_idle(&pool);
}

/// `into_filled` of a zeroed allocation "counts as initialised throughout", also through
/// `into_allocation` and back.
#[test]
fn zeroed_stays_initialised_through_round_trip() {
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate_zeroed(2).unwrap().into_filled();
    f.extend_from_slice(b"ab");
    let mut f = f.into_allocation().into_filled();
    assert!(f.set_filled(16));
    assert_eq!(&f[..2], b"ab");
    assert!(f[2..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------------
// report.rs
// ---------------------------------------------------------------------------------------

/// `PoolReport`: children "largest `in_use_bytes` first"; `own_bytes` excludes children and
/// a child's idle floor; `min_memory` of a floored child; `top(0)` is empty and `top(k)` for
/// huge `k` lists every pool.
#[test]
fn report_with_floor_and_top() {
    let root = BufPool::builder(cfg64(4096)).name("root").build().unwrap();
    let floored = BufPool::builder(cfg64(1024))
        .name("floored")
        .parent(&root)
        .min_memory(512)
        .build()
        .unwrap();
    let plain = root.child("plain", cfg64(1024)).unwrap();
    let _a = floored.try_allocate(2).unwrap(); // within the floor
    let _b = plain.try_allocate(3).unwrap();
    let _c = root.try_allocate(1).unwrap();
    let report = root.report();
    assert_eq!(report.in_use_bytes, 512 + 192 + 64);
    assert_eq!(report.own_bytes(), 64);
    assert_eq!(report.children.len(), 2);
    assert_eq!(report.children[0].name.as_deref(), Some("plain"));
    assert_eq!(report.children[0].in_use_bytes, 192);
    let floored_report = &report.children[1];
    assert_eq!(floored_report.min_memory, 512);
    assert_eq!(floored_report.in_use_bytes, 128);
    assert_eq!(floored_report.own_bytes(), 128);
    assert!(report.top(0).is_empty());
    assert_eq!(report.top(usize::MAX).len(), 3);
    assert!(report.describes(&root));
    assert!(!membudget::PoolReport::default().describes(&root));
    let text = report.to_string();
    assert!(
        text.starts_with("root: 768 of 4096 bytes in use (own 64, reserved 0), peak 768, 1 outstanding, 0 waiting\n  plain: 192 of 1024"),
        "{text}"
    );
}

/// `tree_report` from a grandchild names the root; a closed-and-dropped child is gone from
/// it ("live descendants").
#[test]
fn tree_report_from_grandchild_and_dropped_child() {
    let root = BufPool::builder(cfg64(640)).name("r").build().unwrap();
    let child = root.child("c", cfg64(640)).unwrap();
    let grandchild = child.child("g", cfg64(640)).unwrap();
    let gone = root.child("gone", cfg64(640)).unwrap();
    drop(gone);
    let tree = grandchild.tree_report();
    assert_eq!(tree.name.as_deref(), Some("r"));
    assert_eq!(tree.children.len(), 1);
    assert!(tree.children[0].children[0].describes(&grandchild));
}

/// `ReclaimerReport::estimate`: "(0 if that panicked)"; the handle "may outlive its pool
/// (dropping it then does nothing)".
#[test]
fn reclaimer_report_estimate_panics_and_handle_outlives_pool() {
    struct Panicky;
    impl Reclaimer for Panicky {
        fn estimate(&self) -> usize {
            panic!("estimate panics")
        }
        fn reclaim(&self, _: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
            Box::pin(async { 0 })
        }
    }
    let pool = BufPool::new(cfg64(640));
    let handle = pool.register_reclaimer("p", 3, Arc::new(Panicky));
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.report()));
    let report = report.expect("report catches a panicking estimate");
    assert_eq!(report.reclaimers[0].estimate, 0);
    assert_eq!(report.reclaimers[0].priority, 3);
    assert_eq!(handle.name(), "p");
    drop(pool);
    drop(handle);
}

/// `ReclaimAhead` "resolves once the pool is closed", also when closed through an ancestor,
/// and when polled first after the close.
#[test]
fn reclaim_ahead_resolves_on_ancestor_close() {
    watchdog(10, || {
        let root = BufPool::new(cfg64(640));
        let child = root.child("c", cfg64(640)).unwrap();
        let mut ahead = pin!(child.reclaim_ahead(usize::MAX));
        assert!(poll_once(ahead.as_mut()).is_pending());
        root.close();
        futures::executor::block_on(ahead);
        let late = child.reclaim_ahead(0);
        futures::executor::block_on(late);
    });
}

/// A reclaimer that gives up a cached allocation, for the `reclaim_rounds` counts below.
struct Cache(Mutex<Vec<membudget::BufPoolAllocation>>);
impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.allocated_bytes())
            .sum()
    }
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let mut entries = self.0.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            match entries.pop() {
                Some(a) => freed += a.allocated_bytes(),
                None => break,
            }
        }
        Box::pin(async move { freed })
    }
}

/// `reclaim_rounds` and friends: counted at the pool whose budget the round ran for; the
/// `Display` tail appears with rounds.
#[test]
fn reclaim_counts_and_display() {
    watchdog(10, || {
        let pool = BufPool::new(cfg64(256));
        let cache = Arc::new(Cache(Mutex::new(vec![
            pool.try_allocate(2).unwrap(),
            pool.try_allocate(2).unwrap(),
        ])));
        let handle = pool.register_reclaimer("cache", 0, cache.clone());
        let a = pool.allocate_blocking(1).unwrap();
        let stats = pool.stats();
        assert_eq!(stats.reclaim_rounds, 1);
        assert_eq!(stats.reclaim_asked_bytes, 64);
        assert_eq!(stats.reclaimed_bytes, 128);
        assert!(
            stats
                .to_string()
                .contains("; 1 reclaim rounds freed 128 of 64 bytes asked in"),
            "{stats}"
        );
        let report = pool.report();
        assert_eq!(report.reclaimers[0].times_asked, 1);
        assert_eq!(report.reclaimers[0].asked_bytes, 64);
        assert_eq!(report.reclaimers[0].reclaimed_bytes, 128);
        drop((a, handle));
    });
}

// ---------------------------------------------------------------------------------------
// Second batch: barriers, counts across the tree, cache bounds
// ---------------------------------------------------------------------------------------

/// `shutdown`: "waits for every allocation to come back and drops the pool, without blocking
/// a thread" -- also when what is out is a reservation (which the drop's barrier waits for):
/// the first poll must return `Pending` at once, not block in the drop.
#[test]
fn shutdown_with_a_live_reservation_does_not_block_a_thread() {
    watchdog(10, || {
        let pool = BufPool::new(cfg64(640));
        let reservation = pool.try_reserve(64).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(reservation);
        });
        let mut shutdown = Box::pin(pool.shutdown());
        let start = std::time::Instant::now();
        let first = poll_once(shutdown.as_mut());
        let took = start.elapsed();
        releaser.join().unwrap();
        assert!(
            first.is_pending() && took < Duration::from_millis(200),
            "the first poll of shutdown() blocked {took:?} (ready: {})",
            first.is_ready()
        );
    });
}

/// `shutdown` of a parent whose child holds an allocation ("Dropping a parent waits for
/// every allocation of its subtree"): the async form must wait for it too, without blocking.
#[test]
fn shutdown_of_parent_with_child_allocation_does_not_block_a_thread() {
    watchdog(10, || {
        let root = BufPool::new(cfg64(640));
        let child = root.child("c", cfg64(640)).unwrap();
        let allocation = child.try_allocate(1).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(allocation);
        });
        let mut shutdown = Box::pin(root.shutdown());
        let start = std::time::Instant::now();
        let first = poll_once(shutdown.as_mut());
        let took = start.elapsed();
        releaser.join().unwrap();
        drop(child);
        assert!(
            first.is_pending() && took < Duration::from_millis(200),
            "the first poll of shutdown() blocked {took:?} (ready: {})",
            first.is_ready()
        );
    });
}

/// `shutdown_timeout` of a parent with a child's allocation out: not drained, and
/// `in_use_bytes` says what is still out.
#[test]
fn shutdown_timeout_of_parent_with_child_allocation() {
    watchdog(10, || {
        let root = BufPool::new(cfg64(640));
        let child = root.child("c", cfg64(640)).unwrap();
        let allocation = child.try_allocate(2).unwrap();
        let stats = root.shutdown_timeout(Duration::from_millis(10));
        assert!(!stats.is_drained(), "{stats}");
        assert_eq!(stats.in_use_bytes, 128);
        assert!(child.is_closed(), "closing a pool closes its descendants");
        drop(allocation);
        assert!(root.shutdown_timeout(Duration::ZERO).is_drained());
    });
}

/// `min_memory`: "dropping an ancestor's handle while this pool lives waits for the
/// allocations, not for the floor"; the child is closed by it, and the floor goes back.
#[test]
fn dropping_parent_of_floored_child_does_not_wait_for_floor() {
    watchdog(10, || {
        let root = BufPool::new(cfg64(1024));
        let child = BufPool::builder(cfg64(512))
            .parent(&root)
            .min_memory(512)
            .build()
            .unwrap();
        drop(root);
        assert!(child.is_closed());
        assert_eq!(child.try_allocate(1).unwrap_err(), AllocError::Closed);
    });
}

/// `min_memory`: on close "what its allocations hold of the floor goes back as they do", the
/// idle part at once.
#[test]
fn closing_floored_child_gives_idle_floor_back() {
    let root = BufPool::new(cfg64(1024));
    let child = BufPool::builder(cfg64(512))
        .parent(&root)
        .min_memory(512)
        .build()
        .unwrap();
    let a = child.try_allocate(2).unwrap();
    assert_eq!(root.stats().in_use_bytes, 512);
    child.close();
    assert_eq!(root.stats().in_use_bytes, 128, "the idle 384 went back");
    drop(a);
    assert_eq!(root.stats().in_use_bytes, 0);
    drop(child);
    assert_eq!(root.stats().in_use_bytes, 0);
}

/// `child`: "Dropping a child ... waits for its own allocations and its descendants'; never
/// for a sibling's".
#[test]
fn dropping_child_never_waits_for_sibling() {
    watchdog(10, || {
        let root = BufPool::new(cfg64(640));
        let a = root.child("a", cfg64(640)).unwrap();
        let b = root.child("b", cfg64(640)).unwrap();
        let held = b.try_allocate(3).unwrap();
        drop(a);
        assert!(!b.is_closed());
        assert_eq!(root.stats().in_use_bytes, 192);
        drop(held);
    });
}

/// `waiting`: "A descendant's request waiting for a place in this pool's full queue
/// (`max_waiters`) is in no queue and not counted."
#[test]
fn request_awaiting_room_is_not_counted_waiting() {
    let root = BufPool::builder(cfg64(128)).max_waiters(1).build().unwrap();
    let child = root.child("c", cfg64(64)).unwrap();
    let child_held = child.try_allocate(1).unwrap(); // child full; root 64 in use
    let root_held = root.try_allocate(1).unwrap(); // root full
    let mut root_waiter = Box::pin(root.allocate(1));
    assert!(poll_once(root_waiter.as_mut()).is_pending());
    let mut child_waiter = Box::pin(child.allocate(1));
    assert!(poll_once(child_waiter.as_mut()).is_pending());
    assert_eq!((child.stats().waiting, root.stats().waiting), (1, 1));
    // The child has room again, and its request, having waited, climbs to the root's full
    // queue: it waits for room there.
    drop(child_held); // 64 back to the root too: granted to the root's waiter
    let pending = poll_once(child_waiter.as_mut());
    assert!(pending.is_pending(), "{pending:?}");
    assert_eq!(child.stats().waiting, 0);
    assert_eq!(root.stats().queue_full, 0, "it waited: not refused");
    let Poll::Ready(Ok(root_allocation)) = poll_once(root_waiter.as_mut()) else {
        panic!("the root's waiter was served")
    };
    drop(root_allocation);
    drop(root_held);
    let Poll::Ready(Ok(allocation)) = poll_once(child_waiter.as_mut()) else {
        panic!("served")
    };
    drop(allocation);
    assert_eq!(root.stats().in_use_bytes, 0);
}

/// `total_allocations` (allocations ever made) and `outstanding` are the pool's own:
/// reservations, budget changes and a child's allocations are not counted; an allocation
/// out of a reservation is.
#[test]
fn total_allocations_counts_only_own_allocations() {
    let root = BufPool::new(cfg64(1024));
    let child = root.child("c", cfg64(1024)).unwrap();
    let mut r = root.try_reserve(256).unwrap();
    drop(child.try_allocate(1).unwrap());
    assert_eq!(root.add_max_memory(64), 1088);
    assert_eq!(root.forget_max_memory(0), 0);
    assert_eq!(root.forget_max_memory(64), 64);
    root.set_max_memory(1024).unwrap();
    root.set_max_memory(1024).unwrap();
    assert_eq!(root.add_max_memory(0), 1024);
    let mut growth = root.try_reserve(0).unwrap();
    growth.resize_to(100).unwrap();
    growth.force_grow(1).unwrap();
    drop(growth);
    let stats = root.stats();
    assert_eq!(
        (stats.total_allocations, stats.outstanding),
        (0, 0),
        "{stats}"
    );
    let a = r.allocate(1).unwrap();
    let b = root.try_allocate(1).unwrap();
    let stats = root.stats();
    assert_eq!(
        (stats.total_allocations, stats.outstanding),
        (2, 2),
        "{stats}"
    );
    assert_eq!(child.stats().total_allocations, 1);
    drop((a, b));
    assert_eq!(root.stats().outstanding, 0);
}

/// `peak_in_use_bytes` of a parent: "The most bytes ever in use at once", its subtree's
/// (`PoolReport::peak_in_use_bytes`), whichever way the child's bytes got there.
#[test]
fn parent_peak_counts_child_bytes_on_every_path() {
    // Fast path.
    let root = BufPool::new(cfg64(1024));
    let child = root.child("c", cfg64(1024)).unwrap();
    drop(child.try_allocate(3).unwrap());
    assert_eq!(root.stats().peak_in_use_bytes, 192, "try_allocate");
    assert_eq!(root.report().peak_in_use_bytes, 192);
    // A reservation.
    drop(child.try_reserve(256).unwrap());
    assert_eq!(root.stats().peak_in_use_bytes, 256, "try_reserve");
    // Forced growth.
    let mut r = child.try_reserve(0).unwrap();
    r.force_grow(2000).unwrap();
    drop(r);
    assert_eq!(root.stats().peak_in_use_bytes, 2000, "force_grow");
    assert_eq!(child.stats().peak_in_use_bytes, 2000);

    // After waiting at the root.
    let root = BufPool::new(cfg64(256));
    let child = root.child("c", cfg64(1024)).unwrap();
    let held = root.try_allocate(3).unwrap();
    let mut waiting = Box::pin(child.allocate(4));
    assert!(poll_once(waiting.as_mut()).is_pending());
    drop(held);
    let Poll::Ready(Ok(a)) = poll_once(waiting.as_mut()) else {
        panic!()
    };
    drop(a);
    assert_eq!(root.stats().peak_in_use_bytes, 256, "after waiting");
    assert_eq!(child.stats().peak_in_use_bytes, 256);

    // A floor.
    let root = BufPool::new(cfg64(1024));
    let _floored = BufPool::builder(cfg64(512))
        .parent(&root)
        .min_memory(512)
        .build()
        .unwrap();
    assert_eq!(root.stats().peak_in_use_bytes, 512, "a floor set aside");
}

/// `add_max_memory`: "Serves the waiters that now fit, in FIFO order": a small waiter
/// behind a big one is not served first.
#[test]
fn add_max_memory_serves_in_fifo_order() {
    let pool = BufPool::new(cfg64(64));
    let held = pool.try_allocate(1).unwrap();
    let mut big = Box::pin(pool.allocate(1));
    assert!(poll_once(big.as_mut()).is_pending());
    let mut reserve = Box::pin(pool.reserve(128));
    assert!(matches!(
        poll_once(reserve.as_mut()),
        Poll::Ready(Err(AllocError::ExceedsBudget { .. }))
    ));
    drop(reserve);
    pool.set_max_memory(192).unwrap();
    // 128 free now: `big` served (64), 64 left.
    let Poll::Ready(Ok(_big)) = poll_once(big.as_mut()) else {
        panic!("served")
    };
    let mut large = Box::pin(pool.reserve(128));
    let mut small = Box::pin(pool.allocate(1));
    assert!(poll_once(large.as_mut()).is_pending());
    assert!(poll_once(small.as_mut()).is_pending());
    assert_eq!(pool.add_max_memory(32), 224);
    assert!(poll_once(small.as_mut()).is_pending(), "no overtaking");
    assert!(poll_once(large.as_mut()).is_pending());
    assert_eq!(pool.add_max_memory(32), 256);
    let Poll::Ready(Ok(_large)) = poll_once(large.as_mut()) else {
        panic!("served")
    };
    assert!(poll_once(small.as_mut()).is_pending());
    drop(held);
    assert!(matches!(poll_once(small.as_mut()), Poll::Ready(Ok(_))));
}

fn recycling(max_memory: usize) -> BufPool {
    BufPool::builder(cfg64(max_memory))
        .recycle(64)
        .recycle_min_bytes(0)
        .build()
        .unwrap()
}

/// The cache stays in the budget: `set_max_memory` "cached blocks ... are freed until the
/// footprint fits".
#[test]
fn set_max_memory_frees_cache_to_fit() {
    let pool = recycling(1024);
    let blocks: Vec<_> = (0..4).map(|_| pool.try_allocate(4).unwrap()).collect();
    drop(blocks);
    assert_eq!(pool.stats().cached_bytes, 1024);
    pool.set_max_memory(512).unwrap();
    let stats = pool.stats();
    assert!(stats.cached_bytes <= 512, "{stats}");
}

/// `forget_max_memory` shrinks the budget too: the tree "cached blocks included, stays
/// within the root's `max_memory`" (builder `recycle`), so the cache must fit the smaller
/// budget.
#[test]
fn forget_max_memory_frees_cache_to_fit() {
    let pool = recycling(1024);
    let blocks: Vec<_> = (0..4).map(|_| pool.try_allocate(4).unwrap()).collect();
    drop(blocks);
    assert_eq!(pool.stats().cached_bytes, 1024);
    assert_eq!(pool.forget_max_memory(512), 512);
    let stats = pool.stats();
    assert_eq!(stats.max_memory, 512);
    assert!(stats.cached_bytes <= 512, "cache above the budget: {stats}");
}

/// `recycle`: cached blocks "are freed (largest first) whenever fresh memory would otherwise
/// take the pool's footprint, live plus cached, above the budget".
#[test]
fn cache_freed_for_fresh_memory() {
    let pool = recycling(1024);
    drop(pool.try_allocate(8).unwrap()); // a 512-byte block cached
    drop(pool.try_allocate(4).unwrap()); // a 256-byte block cached
    assert_eq!(pool.stats().cached_bytes, 768);
    let a = pool.try_allocate(12).unwrap(); // 768 fresh: 1536 > 1024 without freeing
    let stats = pool.stats();
    assert!(stats.in_use_bytes + stats.cached_bytes <= 1024, "{stats}");
    assert_eq!(stats.cached_bytes, 256, "the largest went first");
    drop(a);
}

/// A child's blocks count against the root's budget in the root's cache: after a child's
/// allocation is freed, the root's `in use + cached <= budget` holds.
#[test]
fn child_cache_counts_at_root() {
    let root = recycling(1024);
    let child = root.child("c", cfg64(1024)).unwrap();
    let held = root.try_allocate(8).unwrap(); // 512 live
    drop(child.try_allocate(8).unwrap()); // 512 cached
    let stats = root.stats();
    assert_eq!(stats.cached_bytes, 512);
    assert!(stats.in_use_bytes + stats.cached_bytes <= 1024, "{stats}");
    // A fresh block of another size at the root must free the cache to fit.
    let more = child.try_reserve(256).unwrap();
    assert_eq!(more.size(), 256);
    drop(held);
    let a = root.try_allocate(12).unwrap(); // 768 live + 256 reserved = 1024
    let stats = root.stats();
    assert!(stats.cached_bytes + a.allocated_bytes() <= 1024, "{stats}");
}

/// `wait_for_growth`: `forget_max_memory` keeps no minimum of one buffer, and a waiter that
/// is larger than the new budget keeps waiting (it may yet grow) -- or fails with
/// `ExceedsBudget` as the doc of `forget_max_memory` says for any pool. Either is checked
/// consistently with `set_max_memory(0)`.
#[test]
fn growth_pool_waiter_after_shrink() {
    let pool = BufPool::builder(cfg64(256))
        .wait_for_growth()
        .build()
        .unwrap();
    let held = pool.try_allocate(2).unwrap();
    let mut waiter = Box::pin(pool.allocate(3));
    assert!(poll_once(waiter.as_mut()).is_pending());
    assert_eq!(pool.forget_max_memory(1000), 128);
    let after_forget = poll_once(waiter.as_mut());
    assert!(
        after_forget.is_pending(),
        "a growth pool's waiter keeps waiting for growth: {after_forget:?}"
    );
    assert_eq!(pool.add_max_memory(192), 320);
    drop(held);
    assert!(matches!(poll_once(waiter.as_mut()), Poll::Ready(Ok(_))));
}

// ---------------------------------------------------------------------------------------
// Third batch: the counted limits, out of memory, trees
// ---------------------------------------------------------------------------------------

/// `max_memory` above 2 PiB: "budgets above that enforce 2 PiB"; `stats` reports the
/// configured value.
#[test]
fn budget_above_two_pib_enforces_two_pib() {
    let pool = BufPool::new(cfg64(3 << 50));
    assert_eq!(pool.stats().max_memory, 3 << 50);
    let r = pool.try_reserve(PIB2).unwrap();
    assert_eq!(r.size(), PIB2);
    drop(r);
    let err = pool.try_reserve(PIB2 + 8).unwrap_err();
    assert!(
        matches!(err, AllocError::ExceedsBudget { requested_bytes, .. } if requested_bytes == PIB2 + 8),
        "{err:?}"
    );
}

/// `force_grow` in a child: the bytes in use of an ancestor passing 4 PiB refuses it, and
/// every pool is left as it was ("the reservation is then unchanged").
#[test]
fn force_grow_refused_at_an_ancestor_leaves_no_trace() {
    let root = BufPool::new(cfg64(1024));
    let a = root.child("a", cfg64(1024)).unwrap();
    let b = root.child("b", cfg64(1024)).unwrap();
    let mut ra = a.try_reserve(0).unwrap();
    let mut rb = b.try_reserve(8).unwrap();
    ra.force_grow(3 << 50).unwrap();
    let err = rb.force_grow(2 << 50).unwrap_err();
    assert!(matches!(err, AllocError::ExceedsBudget { .. }), "{err:?}");
    assert_eq!(rb.size(), 8);
    assert_eq!(b.stats().in_use_bytes, 8);
    assert_eq!(root.stats().in_use_bytes, (3 << 50) + 8);
    assert_eq!(b.stats().reserved_bytes, 8);
    drop((ra, rb));
    assert_eq!(root.stats().in_use_bytes, 0);
    assert_eq!(root.stats().overcommit_bytes, 0);
}

/// `Reservation::allocate`: on `OutOfMemory` "the bytes then go back to the pool, not to the
/// reservation".
#[test]
fn reservation_allocate_out_of_memory() {
    if cfg!(miri) {
        return;
    }
    let pool = BufPool::new(cfg(BufferSize::S16384, usize::MAX));
    let bytes = 1usize << 50; // 1 PiB: no system allocator has it
    let mut r = pool.try_reserve(bytes + 16384).unwrap();
    let err = r.allocate(bytes / 16384).unwrap_err();
    assert_eq!(err, AllocError::OutOfMemory { bytes });
    assert_eq!(r.size(), 16384);
    let stats = pool.stats();
    assert_eq!(stats.in_use_bytes, 16384, "{stats}");
    assert_eq!(stats.reserved_bytes, 16384, "{stats}");
    assert_eq!(stats.outstanding, 0, "{stats}");
    let a = r.allocate(1).unwrap();
    drop((a, r));
    assert_idle(&pool);
}

/// `OutOfMemory` from `try_allocate`: "The budget reserved for the request was given back at
/// once"; no allocation is counted as outstanding.
#[test]
fn try_allocate_out_of_memory_counts() {
    if cfg!(miri) {
        return;
    }
    let pool = BufPool::new(cfg(BufferSize::S16384, usize::MAX));
    let n = (1usize << 50) / 16384;
    assert_eq!(
        pool.try_allocate(n).unwrap_err(),
        AllocError::OutOfMemory { bytes: 1 << 50 }
    );
    let stats = pool.stats();
    assert_eq!((stats.in_use_bytes, stats.outstanding), (0, 0), "{stats}");
    assert_eq!(stats.would_block, 0);
    assert!(stats.is_drained());
}

/// `PoolReport::reserved_bytes`: "Bytes held by its own reservations" (a child's are not a
/// parent's); `outstanding`: "Its own live allocations".
#[test]
fn report_reserved_and_outstanding_are_own() {
    let root = BufPool::new(cfg64(1024));
    let child = root.child("c", cfg64(1024)).unwrap();
    let _r = child.try_reserve(64).unwrap();
    let _a = child.try_allocate(1).unwrap();
    let report = root.report();
    assert_eq!(report.reserved_bytes, 0);
    assert_eq!(report.outstanding, 0);
    assert_eq!(report.in_use_bytes, 128);
    assert_eq!(report.own_bytes(), 0);
    assert_eq!(report.children[0].reserved_bytes, 64);
    assert_eq!(report.children[0].outstanding, 1);
    assert_eq!(report.children[0].own_bytes(), 128);
}

/// `own_bytes` with a floored child that climbed above its floor: the root holds nothing of
/// its own; the child holds what its allocations and reservations hold.
#[test]
fn own_bytes_with_floor_partly_used_and_climbed() {
    let root = BufPool::new(cfg64(4096));
    let child = BufPool::builder(cfg64(2048))
        .parent(&root)
        .min_memory(256)
        .build()
        .unwrap();
    let report = root.report();
    assert_eq!(report.own_bytes(), 0, "an idle floor is not the root's own");
    assert_eq!(report.children[0].own_bytes(), 0, "nor the child's");
    // 384 is more than the floor: all of the floor first, the other 128 from above it.
    let a = child.try_allocate(6).unwrap();
    let report = root.report();
    assert_eq!(report.in_use_bytes, 384);
    assert_eq!(report.own_bytes(), 0);
    assert_eq!(report.children[0].own_bytes(), 384);
    assert_eq!(report.top(1)[0].min_memory, 256);
    let mine = root.try_allocate(1).unwrap();
    assert_eq!(root.report().own_bytes(), 64);
    drop((a, mine));
    let report = root.report();
    assert_eq!((report.in_use_bytes, report.own_bytes()), (256, 0));
}

/// `ReclaimerReport` order: "lowest priority, then largest estimate, first", registration
/// order among equals.
#[test]
fn reclaimer_report_order() {
    struct Fixed(usize);
    impl Reclaimer for Fixed {
        fn estimate(&self) -> usize {
            self.0
        }
        fn reclaim(&self, _: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
            Box::pin(async { 0 })
        }
    }
    let pool = BufPool::new(cfg64(640));
    let _h = [
        pool.register_reclaimer("p2-big", 2, Arc::new(Fixed(1000))),
        pool.register_reclaimer("p1-small-first", 1, Arc::new(Fixed(8))),
        pool.register_reclaimer("p1-big", 1, Arc::new(Fixed(64))),
        pool.register_reclaimer("p1-small-second", 1, Arc::new(Fixed(8))),
        pool.register_reclaimer("p0", 0, Arc::new(Fixed(0))),
    ];
    let names: Vec<_> = pool
        .report()
        .reclaimers
        .iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "p0",
            "p1-big",
            "p1-small-first",
            "p1-small-second",
            "p2-big"
        ]
    );
}

/// Closing a middle pool fails its grandchild's waiter "wherever they wait" (here in the
/// root's queue) with `Closed`, and the root's queue is empty after.
#[test]
fn closing_middle_pool_fails_grandchild_waiting_at_root() {
    let root = BufPool::new(cfg64(128));
    let mid = root.child("mid", cfg64(1024)).unwrap();
    let leaf = mid.child("leaf", cfg64(1024)).unwrap();
    let held = root.try_allocate(2).unwrap();
    let mut waiter = Box::pin(leaf.allocate(1));
    let mut reserve = Box::pin(leaf.reserve(8));
    assert!(poll_once(waiter.as_mut()).is_pending());
    assert!(poll_once(reserve.as_mut()).is_pending());
    assert_eq!(root.stats().waiting, 2);
    mid.close();
    assert!(matches!(
        poll_once(waiter.as_mut()),
        Poll::Ready(Err(AllocError::Closed))
    ));
    assert!(matches!(
        poll_once(reserve.as_mut()),
        Poll::Ready(Err(AllocError::Closed))
    ));
    assert_eq!(root.stats().waiting, 0);
    assert!(leaf.is_closed());
    assert!(!root.is_closed());
    drop(held);
    assert_eq!(root.stats().in_use_bytes, 0);
    assert_eq!(mid.stats().in_use_bytes, 0);
}

/// `register_reclaimer`: "dropping the pool drops its registrations before the shutdown
/// barrier waits (so a cache whose only owner is its registration gives its allocations
/// back then)" -- even while the `ReclaimerHandle` is still alive.
#[test]
fn drop_pool_drops_registered_cache_with_handle_alive() {
    watchdog(10, || {
        let pool = BufPool::new(cfg64(640));
        let cache = Cache(Mutex::new(vec![pool.try_allocate(2).unwrap()]));
        let handle = pool.register_reclaimer("cache", 0, Arc::new(cache));
        drop(pool);
        drop(handle);
    });
}

/// `read_from`: "the part of it that was never initialised is zeroed first, at the first
/// call", so afterwards `set_filled` accepts the whole capacity ("or zeroed by `read_from`").
#[test]
fn read_from_zeroes_the_rest_for_set_filled() {
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate(2).unwrap().into_filled();
    let mut src: &[u8] = b"abc";
    assert_eq!(f.read_from(&mut src).unwrap(), 3);
    assert!(f.set_filled(16));
    assert_eq!(&f[..], b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0");
    // A reader that errors at once: the rest is zeroed all the same (first call).
    let mut g = pool.try_allocate(1).unwrap().into_filled();
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::Other.into())
        }
    }
    assert!(g.read_from(&mut Broken).is_err());
    assert!(g.filled().is_empty(), "nothing counted as filled");
}

/// `wait_for_growth` child: a budget of zero at build; the child's request waits in its own
/// queue until the child grows. `min_memory` above a zero budget is refused.
#[test]
fn growth_child_with_zero_budget() {
    let root = BufPool::new(cfg64(640));
    let child = BufPool::builder(cfg64(0))
        .parent(&root)
        .wait_for_growth()
        .build()
        .unwrap();
    let mut waiter = Box::pin(child.allocate(1));
    assert!(poll_once(waiter.as_mut()).is_pending());
    assert_eq!((child.stats().waiting, root.stats().waiting), (1, 0));
    assert_eq!(child.add_max_memory(64), 64);
    let Poll::Ready(Ok(a)) = poll_once(waiter.as_mut()) else {
        panic!("served")
    };
    assert_eq!(root.stats().in_use_bytes, 64);
    drop(a);
    let err = BufPool::builder(cfg64(0))
        .parent(&root)
        .wait_for_growth()
        .min_memory(8)
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        ConfigError::MinMemoryAboveMaxMemory {
            min_memory: 8,
            max_memory: 0
        }
    );
}

/// `waited_allocations` counts "a grant whose owner gave up before taking it (its wait
/// happened)"; the grant goes on to the next waiter at once, and it is no allocation
/// (`total_allocations`, `outstanding`).
#[test]
fn grant_given_up_counts_as_waited_not_allocated() {
    let pool = BufPool::new(cfg64(64));
    let held = pool.try_allocate(1).unwrap();
    let mut first = Box::pin(pool.allocate(1));
    let mut second = Box::pin(pool.allocate(1));
    assert!(poll_once(first.as_mut()).is_pending());
    assert!(poll_once(second.as_mut()).is_pending());
    drop(held); // granted to `first`
    assert_eq!(pool.stats().in_use_bytes, 64, "granted, not yet picked up");
    drop(first);
    let Poll::Ready(Ok(a)) = poll_once(second.as_mut()) else {
        panic!("the grant went on to the next waiter")
    };
    let stats = pool.stats();
    assert_eq!(stats.waited_allocations, 2, "{stats}");
    assert_eq!(stats.total_allocations, 2, "held + second: {stats}");
    assert_eq!(stats.outstanding, 1);
    drop(a);
}

/// `ExceedsBudget`'s `max_memory` for a child whose parent is smaller: the smallest cap on
/// its chain (the only budget under which the request could be refused).
#[test]
fn exceeds_budget_names_smallest_cap_for_child() {
    let root = BufPool::new(cfg64(256));
    let child = root.child("big", cfg64(4096)).unwrap();
    assert_eq!(
        child.try_allocate(5).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 320,
            max_memory: 256
        }
    );
    assert_eq!(
        child.try_reserve(264).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 264,
            max_memory: 256
        }
    );
}

/// `wait_for_growth`: a reservation's growth beyond the budget now waits (`try_` forms give
/// `WouldBlock`) instead of `ExceedsBudget`.
#[test]
fn growth_pool_reservation_growth_waits() {
    let pool = BufPool::builder(cfg64(128))
        .wait_for_growth()
        .build()
        .unwrap();
    let mut r = pool.try_reserve(128).unwrap();
    assert_eq!(r.try_grow(8).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(r.resize_to(129).unwrap_err(), AllocError::WouldBlock);
    {
        let mut grow = Box::pin(r.grow(8));
        assert!(poll_once(grow.as_mut()).is_pending());
        pool.add_max_memory(8);
        assert!(matches!(poll_once(grow.as_mut()), Poll::Ready(Ok(()))));
    }
    assert_eq!(r.size(), 136);
}

/// `shutdown_before` with a deadline that is ready at once: closes, returns the stats.
#[test]
fn shutdown_before_ready_deadline() {
    let pool = BufPool::new(cfg64(640));
    let held = pool.try_allocate(1).unwrap();
    let stats = futures::executor::block_on(pool.shutdown_before(std::future::ready(())));
    assert!(stats.closed);
    assert_eq!(stats.outstanding, 1);
    drop(held);
    let stats = futures::executor::block_on(pool.shutdown_before(std::future::pending::<()>()));
    assert!(stats.is_drained());
}

/// `Reservation`'s rounding as a model: "Sizes count in bytes rounded up to a multiple of
/// 8"; "Rounding stays inside: a caller that tracks exact sizes never sees a byte lost or
/// extra". A pseudo-random sequence of every reservation call, each checked against a
/// model of sizes, and the pool's `in_use_bytes`, `reserved_bytes` and `overcommit_bytes`
/// against the sum of the sizes rounded.
#[test]
fn reservation_rounding_model() {
    let pool = BufPool::new(cfg(BufferSize::S8, 2048));
    run_reservation_model(&pool, 0x2545_F491_4F6C_DD1D, || {});
}

/// The same model in a floored child of a larger root: the child's books are exact, and
/// the root always holds the floor and at least what the child holds.
#[test]
fn reservation_rounding_model_in_floored_child() {
    let root = BufPool::new(cfg(BufferSize::S8, 4096));
    let child = BufPool::builder(cfg(BufferSize::S8, 2048))
        .parent(&root)
        .min_memory(250)
        .build()
        .unwrap();
    run_reservation_model(&child, 0x9E37_79B9_7F4A_7C15, || {
        let (rs, cs) = (root.stats(), child.stats());
        assert!(rs.in_use_bytes >= cs.in_use_bytes.max(256), "{rs} / {cs}");
        assert!(rs.in_use_bytes <= cs.in_use_bytes + 256, "{rs} / {cs}");
        assert_eq!(rs.reserved_bytes, 0);
        assert_eq!(rs.outstanding, 0);
    });
    assert_eq!(root.stats().in_use_bytes, 256);
    drop(child);
    assert_eq!(root.stats().in_use_bytes, 0);
}

fn run_reservation_model(pool: &BufPool, seed: u64, extra: impl Fn()) {
    let budget = pool.stats().max_memory;
    let r8 = |x: usize| x.next_multiple_of(8);
    let mut seed = seed;
    let mut next = move |bound: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % bound as u64) as usize
    };
    let mut held: Vec<(membudget::Reservation, usize)> = Vec::new();
    let mut allocations: Vec<membudget::BufPoolAllocation> = Vec::new();
    for step in 0..rounds(4000, 300) {
        let in_use = |held: &Vec<(membudget::Reservation, usize)>,
                      allocations: &Vec<membudget::BufPoolAllocation>| {
            held.iter().map(|(_, size)| r8(*size)).sum::<usize>()
                + allocations
                    .iter()
                    .map(|a| a.allocated_bytes())
                    .sum::<usize>()
        };
        let before = in_use(&held, &allocations);
        let x = match next(4) {
            0 => next(9),
            1 => next(40),
            2 => next(200),
            _ => next(600),
        };
        let i = if held.is_empty() { 0 } else { next(held.len()) };
        let op = next(14);
        match op {
            0 | 1 => {
                let fits = x == 0 || before + r8(x) <= budget;
                match pool.try_reserve(x) {
                    Ok(r) => {
                        assert!(fits, "step {step}: reserve({x}) over budget");
                        assert_eq!(r.size(), r8(x));
                        held.push((r, r8(x)));
                    }
                    Err(e) => assert!(!fits, "step {step}: reserve({x}): {e:?}"),
                }
            }
            2 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                let fits = x == 0 || before + r8(x) <= budget;
                match r.try_grow(x) {
                    Ok(()) => {
                        assert!(fits, "step {step}");
                        *size += r8(x);
                    }
                    Err(e) => assert!(!fits, "step {step}: try_grow({x}) of {size}: {e:?}"),
                }
            }
            3 | 4 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                let need = r8(x).saturating_sub(r8(*size));
                let fits = x <= *size || need == 0 || before + need <= budget;
                match r.resize_to(x) {
                    Ok(()) => {
                        assert!(fits, "step {step}");
                        *size = x;
                    }
                    Err(e) => assert!(!fits, "step {step}: resize_to({x}) of {size}: {e:?}"),
                }
            }
            5 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                r.shrink(x);
                *size -= r8(x).min(*size);
            }
            6 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                match r.try_shrink(x) {
                    Ok(()) => *size -= x,
                    Err(_) => assert!(x > *size, "step {step}"),
                }
            }
            7 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                let part = r.split(x);
                let expected = r8(x).min(*size);
                *size -= expected;
                assert_eq!(part.size(), expected, "step {step}");
                held.push((part, expected));
            }
            8 if held.len() >= 2 => {
                let (other, other_size) = held.swap_remove(i);
                let j = next(held.len());
                let (r, size) = &mut held[j];
                assert!(r.merge(other).is_ok());
                *size += other_size;
            }
            9 if !held.is_empty() && next(4) == 0 => {
                let (r, size) = &mut held[i];
                r.force_grow(x).unwrap();
                *size += x;
            }
            10 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                assert_eq!(r.free(), *size, "step {step}");
                *size = 0;
            }
            11 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                let n = x / 8;
                match r.allocate(n) {
                    Ok(a) => {
                        assert!(n > 0 && n * 8 <= *size, "step {step}");
                        *size -= n * 8;
                        allocations.push(a);
                    }
                    Err(_) => assert!(n == 0 || n * 8 > *size, "step {step}"),
                }
            }
            12 if !held.is_empty() => {
                let (r, size) = &mut held[i];
                r.shrink_to_deferring_wakeups(x).run();
                *size = (*size).min(x);
            }
            _ => {
                if next(2) == 0 && !held.is_empty() {
                    drop(held.swap_remove(i));
                } else if !allocations.is_empty() {
                    let k = next(allocations.len());
                    drop(allocations.swap_remove(k));
                }
            }
        }
        for (r, size) in &held {
            assert_eq!(r.size(), *size, "step {step} op {op}");
        }
        let expected = in_use(&held, &allocations);
        let stats = pool.stats();
        let reserved: usize = held.iter().map(|(_, size)| r8(*size)).sum();
        assert_eq!(stats.in_use_bytes, expected, "step {step} op {op}: {stats}");
        assert_eq!(
            stats.reserved_bytes, reserved,
            "step {step} op {op}: {stats}"
        );
        assert_eq!(
            stats.overcommit_bytes,
            expected.saturating_sub(budget),
            "step {step} op {op}"
        );
        assert_eq!(stats.outstanding, allocations.len(), "step {step} op {op}");
        extra();
    }
    drop(held);
    drop(allocations);
    assert_idle(pool);
}

/// `Allocate` `# Panics`: "Polling it again after it returned `Ready` may panic ...; the
/// budget is not affected."
#[test]
fn polling_after_ready_leaves_budget_intact() {
    let pool = BufPool::new(cfg64(128));
    let mut allocate = Box::pin(pool.allocate(1));
    let Poll::Ready(Ok(a)) = poll_once(allocate.as_mut()) else {
        panic!()
    };
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = poll_once(allocate.as_mut());
    }));
    drop(again);
    drop(allocate);
    let stats = pool.stats();
    assert_eq!((stats.in_use_bytes, stats.outstanding), (64, 1), "{stats}");
    drop(a);
    let mut r = Box::pin(pool.reserve(8));
    let Poll::Ready(Ok(res)) = poll_once(r.as_mut()) else {
        panic!()
    };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = poll_once(r.as_mut());
    }));
    drop(r);
    assert_eq!(pool.stats().in_use_bytes, 8);
    drop(res);
    assert_full_budget_back(&pool);
}

/// `poll_allocate` with a different `n`: "any budget granted to it but not taken, go to the
/// next waiters".
#[test]
fn poll_allocate_changed_n_passes_its_grant_on() {
    let pool = Arc::new(BufPool::new(cfg64(64)));
    let held = pool.try_allocate(1).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut poller = PollAllocate::new(Arc::clone(&pool));
    assert!(poller.poll_allocate(&mut cx, 1).is_pending());
    let mut other = Box::pin(pool.allocate(1));
    assert!(poll_once(other.as_mut()).is_pending());
    drop(held); // granted to the poller's request
    assert!(
        poller.poll_allocate(&mut cx, 2).is_ready(),
        "2 buffers can never fit 64 bytes"
    );
    let Poll::Ready(Ok(a)) = poll_once(other.as_mut()) else {
        panic!("the grant went on to the next waiter")
    };
    drop(a);
    assert_full_budget_back(&pool);
}

/// Owned allocations keep the pool "through `into_filled`" -- and back through
/// `into_allocation`; `merge` of an owned reservation into a plain one keeps the pool too.
#[test]
fn owned_holds_survive_conversions_and_merge() {
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg64(640)));
        let weak = Arc::downgrade(&pool);
        let a = futures::executor::block_on(Arc::clone(&pool).allocate_owned(1)).unwrap();
        let back = a.into_filled().into_allocation();
        let owned_r = futures::executor::block_on(Arc::clone(&pool).reserve_owned(64)).unwrap();
        let mut plain = pool.try_reserve(64).unwrap();
        plain.merge(owned_r).unwrap();
        drop(pool); // not the last holder: `back` and `plain` hold it
        assert!(weak.upgrade().is_some());
        drop(back);
        assert!(weak.upgrade().is_some(), "the merged reservation holds it");
        assert_eq!(plain.size(), 128);
        drop(plain);
        assert!(weak.upgrade().is_none());
    });
}

/// `allocate_timeout`, `reserve_timeout`, `shutdown_timeout`: "Blocks the thread for at most
/// about `timeout`" -- and not less: a timed-out call took at least its timeout.
#[test]
fn timeouts_take_about_their_time() {
    watchdog(20, || {
        let root = BufPool::new(cfg64(64));
        let child = root.child("c", cfg64(640)).unwrap();
        let held = root.try_allocate(1).unwrap();
        for ms in [1u64, 30, 120] {
            let timeout = Duration::from_millis(ms);
            let slack = Duration::from_millis(500) * SLOWDOWN;
            let start = std::time::Instant::now();
            assert_eq!(
                root.allocate_timeout(1, timeout).unwrap_err(),
                AllocError::TimedOut
            );
            let took = start.elapsed();
            assert!(
                took >= timeout && took < timeout + slack,
                "{ms} ms: {took:?}"
            );
            let start = std::time::Instant::now();
            assert_eq!(
                child.reserve_timeout(8, timeout).unwrap_err(),
                AllocError::TimedOut
            );
            let took = start.elapsed();
            assert!(
                took >= timeout && took < timeout + slack,
                "{ms} ms: {took:?}"
            );
        }
        let start = std::time::Instant::now();
        let stats = root.shutdown_timeout(Duration::from_millis(60));
        let took = start.elapsed();
        assert!(!stats.is_drained());
        assert!(
            took >= Duration::from_millis(60)
                && took < Duration::from_millis(60) + Duration::from_millis(500) * SLOWDOWN,
            "{took:?}"
        );
        drop(held);
    });
}

/// `max_waiters`: "whatever its form" -- a reservation's growth and a `PollAllocate` are
/// refused with `QueueFull` too.
#[test]
fn max_waiters_zero_every_form() {
    let pool = Arc::new(BufPool::builder(cfg64(128)).max_waiters(0).build().unwrap());
    let mut r = pool.try_reserve(64).unwrap();
    let _held = pool.try_allocate(1).unwrap();
    assert_eq!(r.grow_blocking(8).unwrap_err(), AllocError::QueueFull);
    let mut poller = PollAllocate::new(Arc::clone(&pool));
    assert!(matches!(
        poller.poll_allocate(&mut Context::from_waker(Waker::noop()), 1),
        Poll::Ready(Err(AllocError::QueueFull))
    ));
    assert_eq!(
        futures::executor::block_on(Arc::clone(&pool).reserve_owned(8)).unwrap_err(),
        AllocError::QueueFull
    );
    assert_eq!(pool.stats().queue_full, 3);
    assert_eq!(r.size(), 64);
}

/// `PoolReport` `Display` of a reclaimer line, as written in report.rs.
#[test]
fn report_display_reclaimer_line() {
    struct Fixed(usize);
    impl Reclaimer for Fixed {
        fn estimate(&self) -> usize {
            self.0
        }
        fn reclaim(&self, _: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
            Box::pin(async { 0 })
        }
    }
    let pool = BufPool::builder(cfg64(640)).name("p").build().unwrap();
    let child = pool.child("c", cfg64(640)).unwrap();
    let _h = child.register_reclaimer("big", 1, Arc::new(Fixed(512)));
    assert_eq!(
        pool.report().to_string(),
        "p: 0 of 640 bytes in use (own 0, reserved 0), peak 0, 0 outstanding, 0 waiting\n  \
         c: 0 of 640 bytes in use (own 0, reserved 0), peak 0, 0 outstanding, 0 waiting\n    \
         reclaimer \"big\" (priority 1): estimate 512 bytes, asked 0 times for 0 bytes, freed 0\n"
    );
}

/// `buffers_uninit_mut`: "the allocation forgets that its memory is initialised (a zeroed
/// one no longer counts as zeroed), even if no buffer is written".
#[test]
fn buffers_uninit_mut_forgets_zeros_unwritten() {
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut a = pool.try_allocate_zeroed(2).unwrap();
    drop(a.buffers_uninit_mut());
    let mut f = a.into_filled();
    assert!(!f.set_filled(1));
    assert_eq!(f.fill(0, 3), 3);
    assert!(f.set_filled(3));
    assert!(!f.set_filled(4));
}

/// `read_from`: "bytes already initialised, by earlier writes ..., are never zeroed again;
/// a fresh `into_filled()` starts over" (for a plain allocation: nothing counts as
/// initialised after the round trip).
#[test]
fn read_from_never_rezeroes_and_fresh_cursor_starts_over() {
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate(2).unwrap().into_filled();
    f.extend_from_slice(b"abc");
    assert!(f.set_filled(1));
    let mut eof: &[u8] = b"";
    assert_eq!(f.read_from(&mut eof).unwrap(), 0);
    assert!(f.set_filled(3));
    assert_eq!(&f[..], b"abc", "written bytes were not zeroed again");
    assert!(f.set_filled(16), "the rest was zeroed by read_from");
    let mut again = f.into_allocation().into_filled();
    assert!(again.filled().is_empty());
    assert!(
        !again.set_filled(1),
        "a fresh cursor of a plain allocation knows nothing initialised"
    );
}

/// `BufMut`: `chunk_mut` "offers all of its unfilled part at once"; a smaller `set_filled`
/// "moves the cursor back and so grows it again".
#[cfg(feature = "bytes")]
#[test]
fn bufmut_chunk_is_all_unfilled() {
    use bytes::BufMut;
    let pool = BufPool::new(cfg(BufferSize::S8, 64));
    let mut f = pool.try_allocate(3).unwrap().into_filled();
    f.put_slice(b"0123456789");
    assert_eq!(f.chunk_mut().len(), 14);
    assert_eq!(f.remaining_mut(), 14);
    assert!(f.set_filled(4));
    assert_eq!(f.remaining_mut(), 20);
    assert_eq!(f.chunk_mut().len(), 20);
    f.put_u8(b'x');
    assert_eq!(&f[..], b"0123x");
}

/// `PollAllocate`'s `Debug` shows the pending `n`, and none once served.
#[test]
fn poll_allocate_debug() {
    let pool = Arc::new(BufPool::new(cfg64(64)));
    let held = pool.try_allocate(1).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut poller = PollAllocate::new(Arc::clone(&pool));
    assert!(format!("{poller:?}").contains("pending_n: None"));
    assert!(poller.poll_allocate(&mut cx, 1).is_pending());
    assert!(
        format!("{poller:?}").contains("pending_n: Some(1)"),
        "{poller:?}"
    );
    drop(held);
    let Poll::Ready(Ok(a)) = poller.poll_allocate(&mut cx, 1) else {
        panic!()
    };
    assert!(
        format!("{poller:?}").contains("pending_n: None"),
        "{poller:?}"
    );
    drop(a);
}

/// `forget_max_memory` on a budget that is not a multiple of the buffer size: "keeps a
/// budget of at least one buffer".
#[test]
fn forget_keeps_one_buffer_of_an_odd_budget() {
    let pool = BufPool::new(cfg64(100));
    assert_eq!(pool.forget_max_memory(usize::MAX), 36);
    assert_eq!(pool.stats().max_memory, 64);
    let held = pool.try_allocate(1).unwrap();
    assert_eq!(pool.forget_max_memory(usize::MAX), 0);
    drop(held);
}

/// A grandchild's request bigger than its ancestor's floor takes that floor on its way and
/// climbs with the rest: up to the chain's smallest cap (1024) it is served on an idle tree;
/// above it, it "fails at once with `ExceedsBudget`" (README, guarantee 15) in every form,
/// naming that cap.
#[test]
fn grandchild_request_past_a_floor_fails_at_once() {
    watchdog(10, || {
        let root = BufPool::new(cfg64(1024));
        let mid = BufPool::builder(cfg64(1024))
            .parent(&root)
            .min_memory(512)
            .build()
            .unwrap();
        let leaf = mid.child("leaf", cfg64(1024)).unwrap();
        let expected = AllocError::ExceedsBudget {
            requested_bytes: 1088,
            max_memory: 1024,
        };
        assert_eq!(leaf.try_allocate(17).unwrap_err(), expected);
        assert_eq!(leaf.allocate_blocking(17).unwrap_err(), expected);
        let mut waiting = Box::pin(leaf.allocate(17));
        assert!(
            matches!(poll_once(waiting.as_mut()), Poll::Ready(Err(e)) if e == expected),
            "must not wait for good"
        );
        assert!(matches!(
            leaf.try_reserve(1025),
            Err(AllocError::ExceedsBudget {
                max_memory: 1024,
                ..
            })
        ));
        // All of it: the mid's floor, and 512 from the root.
        drop(leaf.try_allocate(16).unwrap());
        assert_eq!(root.stats().in_use_bytes, 512);
        // Growth is a request of its own: 8 more bytes climb past the (spent) floor and fit
        // beside it at the root.
        let mut r = leaf.try_reserve(512).unwrap();
        r.try_grow(8).unwrap();
        assert_eq!(root.stats().in_use_bytes, 520);
        drop(r);
        let a = leaf.try_allocate(8).unwrap(); // the floor's 512
        assert_eq!(root.stats().in_use_bytes, 512);
        drop(a);
        assert_eq!(root.stats().in_use_bytes, 512);
    });
}
