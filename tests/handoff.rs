//! The hand-over of a released block to the head waiter (issue 22): a root pool's release
//! that serves a waiting allocation of exactly its size gives it the block itself, so neither
//! side calls the allocator. Every way a waiter can end meets a handed block here: taken
//! (async, blocking, owned, polled), zeroed on request, dropped before it was taken, failed,
//! and the waiters that must never take one (other sizes, reservations, child pools). Each
//! test checks the budget when it is quiescent; Miri runs this file and reports any block
//! that leaks or is freed twice.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::{assert_full_budget_back, assert_idle, pool, watchdog};
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate};

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

#[test]
fn a_release_hands_its_block_to_a_head_of_its_size() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let address = held.first();
    let mut waiter = pin!(pool.allocate(2));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(allocation)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("the release did not serve the head");
    };
    assert_eq!(
        allocation.first(),
        address,
        "the head got the released block"
    );
    assert_eq!(allocation.length(), 2);
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.outstanding, stats.waiting),
        (128, 1, 0)
    );
    assert_eq!(stats.total_allocations, 2);
    assert_eq!(stats.waited_allocations, 1);
    drop(allocation);
    assert_full_budget_back(&pool);
}

#[test]
fn a_head_of_another_size_gets_memory_of_its_own() {
    let pool = pool(BufferSize::S64, 3);
    let held = pool.try_allocate(3).unwrap();
    let mut waiter = pin!(pool.allocate(1));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(mut allocation)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("the release did not serve the head");
    };
    assert_eq!(allocation.allocated_bytes(), 64);
    allocation.uninit_mut().fill(std::mem::MaybeUninit::new(7));
    assert_eq!(pool.stats().in_use_bytes, 64);
    drop(allocation);
    assert_full_budget_back(&pool);
}

#[test]
fn a_zeroed_waiter_handed_a_used_block_reads_zeros() {
    let pool = pool(BufferSize::S64, 1);
    let mut held = pool.try_allocate(1).unwrap();
    held.uninit_mut().fill(std::mem::MaybeUninit::new(0xAB));
    let mut waiter = pin!(pool.allocate_zeroed(1));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(allocation)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("the release did not serve the head");
    };
    let mut filled = allocation.into_filled();
    assert!(filled.set_filled(64), "a zeroed allocation is initialised");
    assert_eq!(
        filled.filled(),
        &[0u8; 64][..],
        "a zeroed allocation reads zeros"
    );
    drop(filled);
    assert_full_budget_back(&pool);
}

#[test]
fn a_waiter_dropped_before_it_took_the_handed_block_frees_it_and_its_bytes() {
    let pool = pool(BufferSize::S64, 1);
    let held = pool.try_allocate(1).unwrap();
    let mut first = Box::pin(pool.allocate(1));
    let mut second = Box::pin(pool.allocate(1));
    assert!(first.as_mut().poll(&mut cx()).is_pending());
    assert!(second.as_mut().poll(&mut cx()).is_pending());
    drop(held); // hands the block to `first`
    assert_eq!(pool.stats().waiting, 1);
    drop(first); // never polled again: its block is freed, its bytes go to `second`
    let Poll::Ready(Ok(allocation)) = second.as_mut().poll(&mut cx()) else {
        panic!("the bytes of the dropped waiter did not reach the next");
    };
    drop(allocation);
    drop(second);
    assert_full_budget_back(&pool);
}

#[test]
fn a_waiter_handed_a_block_then_closed_out_still_returns_it() {
    let pool = pool(BufferSize::S64, 1);
    let held = pool.try_allocate(1).unwrap();
    let mut waiter = Box::pin(pool.allocate(1));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    pool.close();
    // Granted before the close: the allocation is the waiter's.
    let Poll::Ready(Ok(allocation)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("a grant made before the close was lost");
    };
    drop(allocation);
    assert_idle(&pool);
}

#[test]
fn blocking_owned_and_polled_waiters_take_handed_blocks() {
    watchdog(60, || {
        let pool = Arc::new(pool(BufferSize::S64, 1));
        // Blocking.
        let held = pool.try_allocate(1).unwrap();
        let address = held.first() as usize;
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(1).map(|a| a.first() as usize))
        };
        common::wait_until(30, "the thread waits", || pool.stats().waiting == 1);
        drop(held);
        assert_eq!(waiter.join().unwrap(), Ok(address));
        // Owned.
        let held = pool.try_allocate(1).unwrap();
        let address = held.first();
        let mut owned = Box::pin(Arc::clone(&pool).allocate_owned(1));
        assert!(owned.as_mut().poll(&mut cx()).is_pending());
        drop(held);
        let Poll::Ready(Ok(allocation)) = owned.as_mut().poll(&mut cx()) else {
            panic!("the owned waiter was not served");
        };
        assert_eq!(allocation.first(), address);
        // Polled (`PollAllocate`).
        let mut polled = PollAllocate::new(Arc::clone(&pool));
        assert!(polled.poll_allocate(&mut cx(), 1).is_pending());
        drop(allocation);
        let Poll::Ready(Ok(allocation)) = polled.poll_allocate(&mut cx(), 1) else {
            panic!("the polled waiter was not served");
        };
        assert_eq!(allocation.first(), address);
        drop(allocation);
        assert_full_budget_back(&pool);
    });
}

#[test]
fn reservations_and_child_pools_take_bytes_not_blocks() {
    let root = pool(BufferSize::S64, 2);
    let child = root
        .child(
            "child",
            BufPoolCfg {
                buffer_size: BufferSize::S64,
                max_memory: 128,
            },
        )
        .unwrap();
    // A reservation of the block's size waits behind it.
    let held = root.try_allocate(2).unwrap();
    let mut reserve = Box::pin(root.reserve(128));
    assert!(reserve.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(mut reservation)) = reserve.as_mut().poll(&mut cx()) else {
        panic!("the reservation was not served");
    };
    assert_eq!(root.stats().in_use_bytes, 128);
    // Its own allocations come out of it, with memory of their own.
    let from_reservation = reservation.allocate(2).unwrap();
    drop(from_reservation);
    drop(reservation);
    // A child pool's request of the block's size waits in the root's queue.
    let held = root.try_allocate(2).unwrap();
    let mut from_child = Box::pin(child.allocate(2));
    assert!(from_child.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(allocation)) = from_child.as_mut().poll(&mut cx()) else {
        panic!("the child's request was not served");
    };
    assert_eq!(
        (child.stats().in_use_bytes, root.stats().in_use_bytes),
        (128, 128)
    );
    drop(allocation);
    drop(from_child);
    drop(reserve);
    assert_idle(&child);
    assert_full_budget_back(&root);
}

#[test]
fn large_blocks_of_another_size_are_freed_outside_the_lock_and_serve_the_head() {
    // 16 KiB buffers, blocks of 48 KiB and 32 KiB: of at least 64 KiB a release that cannot
    // hand its block over frees it unlocked, so use 8 of them against 4.
    let pool = pool(BufferSize::S16384, 8);
    let held = pool.try_allocate(8).unwrap();
    let mut waiter = pin!(pool.allocate(4));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(allocation)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("the head was not served");
    };
    assert_eq!(pool.stats().in_use_bytes, 4 << 14);
    drop(allocation);
    assert_full_budget_back(&pool);
}

#[test]
fn with_recycling_the_block_goes_to_the_waiter_not_the_cache() {
    let pool = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64,
    })
    .recycle(4)
    .recycle_min_bytes(64)
    .build()
    .unwrap();
    let held = pool.try_allocate(1).unwrap();
    let address = held.first();
    let mut waiter = pin!(pool.allocate(1));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(allocation)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("the head was not served");
    };
    assert_eq!(allocation.first(), address);
    assert_eq!(pool.stats().cached_bytes, 0);
    drop(allocation);
    // Nobody waits now: the block is cached as before.
    assert_eq!(pool.stats().cached_bytes, 64);
    assert_full_budget_back(&pool);
}

#[test]
fn a_shrink_below_the_head_frees_the_block_instead_of_handing_it_over() {
    let pool = pool(BufferSize::S64, 4);
    let held = pool.try_allocate(2).unwrap();
    let other = pool.try_allocate(2).unwrap();
    let mut waiter = pin!(pool.allocate(2));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    // Room for 3 now: the waiter's 2 fit once both allocations are back, not before.
    pool.set_max_memory(3 * 64).unwrap();
    drop(held);
    assert!(
        waiter.as_mut().poll(&mut cx()).is_pending(),
        "2 in use and 2 asked exceed 3"
    );
    drop(other);
    let Poll::Ready(Ok(allocation)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("the head was not served");
    };
    drop(allocation);
    assert_full_budget_back(&pool);
}

#[test]
fn stress_hand_overs_with_mixed_sizes_zeroed_requests_and_cancels() {
    const THREADS: usize = 4;
    let rounds = if cfg!(miri) { 30 } else { 3_000 };
    watchdog(120, move || {
        let pool = Arc::new(pool(BufferSize::S64, 4));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let mut rng = common::Rng::new(t as u64 + 1);
                    for _ in 0..rounds {
                        let n = 1 + (rng.next() % 3) as usize;
                        match rng.next() % 4 {
                            0 => {
                                let allocation = pool.allocate_zeroed_blocking(n).unwrap();
                                let mut filled = allocation.into_filled();
                                assert!(filled.set_filled(n * 64));
                                assert!(filled.filled().iter().all(|&b| b == 0));
                            }
                            1 => {
                                // Queue, then give up at once or after a grant.
                                let mut waiter = Box::pin(pool.allocate(n));
                                let _ = waiter.as_mut().poll(&mut cx());
                                std::thread::yield_now();
                                drop(waiter);
                            }
                            _ => {
                                let mut allocation = pool.allocate_blocking(n).unwrap();
                                allocation
                                    .uninit_mut()
                                    .fill(std::mem::MaybeUninit::new(0xEE));
                                std::thread::yield_now();
                            }
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        assert_full_budget_back(&pool);
    });
}

#[test]
fn a_failed_waiter_never_holds_a_block() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(1).unwrap();
    let big = pool.try_allocate(1).unwrap();
    let mut waiter = pin!(pool.allocate(2));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    pool.set_max_memory(64).unwrap();
    assert!(matches!(
        waiter.as_mut().poll(&mut cx()),
        Poll::Ready(Err(AllocError::ExceedsBudget { .. }))
    ));
    drop(held);
    drop(big);
    assert_idle(&pool);
}

#[test]
fn a_hand_over_also_serves_the_requests_the_head_held_back() {
    // Room for 3: 2 held, the head asks 2 (1 free is not enough), the one behind it asks 1
    // (it would fit, but waits behind the head: FIFO).
    let pool = pool(BufferSize::S64, 3);
    let held = pool.try_allocate(2).unwrap();
    let mut head = pin!(pool.allocate(2));
    let mut behind = pin!(pool.allocate(1));
    assert!(head.as_mut().poll(&mut cx()).is_pending());
    assert!(behind.as_mut().poll(&mut cx()).is_pending());
    drop(held); // the head takes the block; the 1 free byte-range serves the one behind
    let Poll::Ready(Ok(first)) = head.as_mut().poll(&mut cx()) else {
        panic!("the head was not served");
    };
    let Poll::Ready(Ok(second)) = behind.as_mut().poll(&mut cx()) else {
        panic!("the request behind the head was left waiting in the room it fits in");
    };
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.outstanding, stats.waiting),
        (192, 2, 0)
    );
    drop((first, second));
    assert_full_budget_back(&pool);
}

#[test]
fn hand_overs_along_a_queue_keep_every_count_exact() {
    // Each release hands its block to the next of three waiters while the others still
    // wait (the word itself does not change then): the counts stay exact at every step.
    let pool = pool(BufferSize::S64, 1);
    let mut held = pool.try_allocate(1).unwrap();
    let mut waiters: Vec<_> = (0..3).map(|_| Box::pin(pool.allocate(1))).collect();
    for waiter in &mut waiters {
        assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    }
    for (served, waiter) in waiters.iter_mut().enumerate() {
        let address = held.first();
        drop(held);
        let Poll::Ready(Ok(next)) = waiter.as_mut().poll(&mut cx()) else {
            panic!("waiter {served} was not served");
        };
        assert_eq!(next.first(), address);
        held = next;
        let stats = pool.stats();
        assert_eq!(
            (
                stats.in_use_bytes,
                stats.outstanding,
                stats.waiting,
                stats.total_allocations,
                stats.waited_allocations
            ),
            (64, 1, 2 - served, 2 + served, 1 + served),
            "after hand-over {served}: {stats:?}"
        );
    }
    drop(held);
    drop(waiters);
    let stats = pool.stats();
    assert_eq!((stats.outstanding, stats.total_allocations), (0, 4));
    assert_full_budget_back(&pool);
}

/// Makes a request for 3 buffers wait on `pool` (a root with room for them) behind an
/// allocation of 3, and drops that: the release hands its block to the request, the only
/// waiter, which leaves the queue's flag set on the empty queue (stale,
/// `State::hand_over_locked`). Returns the handed block.
fn hand_three_buffers_to_the_last_waiter(pool: &BufPool) -> BufPoolAllocation {
    let held = pool.try_allocate(3).unwrap();
    let mut head = pin!(pool.allocate(3));
    assert!(head.as_mut().poll(&mut cx()).is_pending(), "the head waits");
    drop(held);
    let Poll::Ready(Ok(handed)) = head.as_mut().poll(&mut cx()) else {
        panic!("the release did not serve the head");
    };
    assert_eq!(pool.stats().waiting, 0);
    handed
}

/// A root pool of 6 buffers of 64 bytes whose queue a hand-over just emptied: a reservation
/// holds one buffer's bytes, the head took a 3-buffer block handed to it by its release
/// (which leaves the queue's flag set on the empty queue: stale, `State::hand_over_locked`),
/// and 2 buffers (128 bytes) are free with nobody waiting. Runs `call` on it, then checks
/// that nothing waits and, with everything dropped, that the whole budget is free.
fn after_a_hand_over_to_the_last_waiter(
    call: impl FnOnce(&BufPool, &mut membudget::Reservation) + Send + 'static,
) {
    watchdog(10, move || {
        let pool = pool(BufferSize::S64, 6);
        let mut reservation = pool.try_reserve(64).unwrap();
        let handed = hand_three_buffers_to_the_last_waiter(&pool);
        assert_eq!(pool.stats().in_use_bytes, 4 * 64);
        assert_eq!(pool.stats().waiting, 0);
        call(&pool, &mut reservation);
        assert_eq!(pool.stats().waiting, 0);
        drop((handed, reservation));
        assert_full_budget_back(&pool);
    });
}

#[test]
fn after_the_last_waiter_is_handed_a_block_every_call_that_does_not_wait_gets_the_free_room() {
    after_a_hand_over_to_the_last_waiter(|pool, _| {
        drop(pool.try_allocate(2).expect("2 buffers free, nobody waits"));
    });
    after_a_hand_over_to_the_last_waiter(|pool, _| {
        drop(
            pool.try_allocate_zeroed(2)
                .expect("2 buffers free, nobody waits"),
        );
    });
    after_a_hand_over_to_the_last_waiter(|pool, _| {
        drop(pool.try_reserve(128).expect("128 bytes free, nobody waits"));
    });
    after_a_hand_over_to_the_last_waiter(|_, reservation| {
        reservation
            .try_grow(128)
            .expect("128 bytes free, nobody waits");
        assert_eq!(reservation.size(), 192);
    });
    after_a_hand_over_to_the_last_waiter(|_, reservation| {
        reservation
            .resize_to(192)
            .expect("128 bytes free, nobody waits");
    });
    after_a_hand_over_to_the_last_waiter(|pool, _| {
        let cfg = BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: 128,
        };
        let child = pool.child("c", cfg).unwrap();
        drop(child.try_allocate(2).expect("the root has 2 buffers free"));
        let floored = BufPool::builder(cfg)
            .parent(pool)
            .min_memory(128)
            .build()
            .expect("the root has the floor's 2 buffers free");
        drop(floored);
    });
    after_a_hand_over_to_the_last_waiter(|pool, _| {
        drop(
            pool.allocate_timeout(2, Duration::ZERO)
                .expect("2 buffers free"),
        );
        drop(pool.allocate_blocking(2).expect("2 buffers free"));
        let mut request = pin!(pool.allocate(2));
        assert!(matches!(
            request.as_mut().poll(&mut cx()),
            Poll::Ready(Ok(_))
        ));
    });
    // A request that does not fit queues (and is served by the next release), and the room
    // left is still refused to a try behind it: FIFO, as before.
    after_a_hand_over_to_the_last_waiter(|pool, reservation| {
        let mut big = pin!(pool.allocate(3));
        assert!(
            big.as_mut().poll(&mut cx()).is_pending(),
            "3 buffers do not fit"
        );
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        reservation.shrink(64);
        let Poll::Ready(Ok(big)) = big.as_mut().poll(&mut cx()) else {
            panic!("the shrink did not serve the waiter");
        };
        drop(big);
    });
}

/// The first release after a hand-over to the last waiter clears the stale flag: the
/// recycler keeps that block, and the fast paths are open again.
#[test]
fn the_release_after_a_hand_over_to_the_last_waiter_is_cached() {
    let pool = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 128,
    })
    .recycle(4)
    .recycle_min_bytes(64)
    .build()
    .unwrap();
    let other = pool.try_allocate(1).unwrap();
    let held = pool.try_allocate(1).unwrap();
    let mut waiter = pin!(pool.allocate(1));
    assert!(waiter.as_mut().poll(&mut cx()).is_pending());
    drop(held);
    let Poll::Ready(Ok(handed)) = waiter.as_mut().poll(&mut cx()) else {
        panic!("the head was not served");
    };
    drop(other);
    assert_eq!(pool.stats().cached_bytes, 64, "{}", pool.stats());
    drop(handed);
    assert_eq!(pool.stats().cached_bytes, 128, "{}", pool.stats());
    assert_full_budget_back(&pool);
}

/// A floored child's request may need less of its root than it asks (its floor serves part):
/// after a hand-over to the root's last waiter, a try that fits only with the floor's help
/// still gets the free room.
#[test]
fn after_the_last_waiter_is_handed_a_block_a_floored_childs_try_gets_floor_and_room() {
    watchdog(10, || {
        let root = pool(BufferSize::S64, 7);
        let floored = BufPool::builder(BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: 4 * 64,
        })
        .parent(&root)
        .min_memory(64)
        .build()
        .unwrap();
        let reservation = root.try_reserve(64).unwrap();
        let handed = hand_three_buffers_to_the_last_waiter(&root);
        assert_eq!(
            root.stats().in_use_bytes,
            5 * 64,
            "floor, reservation, head"
        );
        // 3 buffers: 1 from the idle floor, 2 from the root's free room.
        let three = floored
            .try_allocate(3)
            .expect("the floor's buffer and the root's 2 free buffers");
        assert_eq!(root.stats().in_use_bytes, 7 * 64);
        assert_eq!(root.stats().waiting, 0);
        drop((three, handed, reservation, floored));
        assert_full_budget_back(&root);
    });
}
