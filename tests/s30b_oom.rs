//! s30b: out-of-memory as an error in trees of pools (README "Out of memory is an error",
//! guarantee 13, `Reservation::allocate`'s errors): when the system allocator returns null,
//! the call fails with `OutOfMemory { bytes }`, every level of the chain gets its bytes back
//! at once (floors' books and overcommit included) and the waiters they serve are served.
//! This binary's `#[global_allocator]` fails on demand, for blocks of one marked size only.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};

/// Fails every allocation of exactly this many bytes (0: none).
static FAIL_SIZE: AtomicUsize = AtomicUsize::new(0);

struct FailingAllocator;

// SAFETY: forwards to `System`, or returns null (which `GlobalAlloc` allows) for the marked
// size.
unsafe impl GlobalAlloc for FailingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() == FAIL_SIZE.load(SeqCst) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() == FAIL_SIZE.load(SeqCst) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: FailingAllocator = FailingAllocator;

/// Every test runs alone (the allocator is global); blocks of `bytes` fail while the guard
/// lives.
struct Failing;

fn failing(bytes: usize) -> Failing {
    FAIL_SIZE.store(bytes, SeqCst);
    Failing
}

impl Drop for Failing {
    fn drop(&mut self) {
        FAIL_SIZE.store(0, SeqCst);
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poison| poison.into_inner())
}

const B: usize = 4096;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S4096,
        max_memory: buffers * B,
    }
}

/// (in use, reserved, outstanding, waiting, overcommit) in buffers.
fn books(pool: &BufPool) -> (usize, usize, usize, usize, usize) {
    let s = pool.stats();
    (
        s.in_use_bytes / B,
        s.reserved_bytes / B,
        s.outstanding,
        s.waiting,
        s.overcommit_bytes / B,
    )
}

#[test]
fn a_reservations_allocation_that_gets_no_memory_gives_every_level_back_floors_included() {
    let _serial = serial();
    watchdog(30, || {
        let root = BufPool::new(cfg(32));
        let mid = BufPool::builder(cfg(24))
            .parent(&root)
            .min_memory(8 * B)
            .build()
            .unwrap();
        let leaf = mid.child("leaf", cfg(16)).unwrap();
        // 13 buffers: the mid floor's 8, and 5 climbed to the root.
        let mut r = leaf.try_reserve(13 * B).unwrap();
        let rest = root.try_reserve(19 * B).unwrap();
        assert_eq!(books(&root), (32, 19, 0, 0, 0));
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiter = Box::pin(root.reserve(5 * B));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        {
            let _failing = failing(13 * B);
            assert_eq!(
                r.allocate(13).unwrap_err(),
                AllocError::OutOfMemory { bytes: 13 * B }
            );
        }
        // README: the bytes go back to the pool, not to the reservation.
        assert_eq!(r.size(), 0);
        assert_eq!(books(&leaf), (0, 0, 0, 0, 0));
        assert_eq!(
            books(&mid),
            (0, 0, 0, 0, 0),
            "the floor is idle (set aside above)"
        );
        let Poll::Ready(Ok(got)) = waiter.as_mut().poll(&mut cx) else {
            panic!(
                "the climbed bytes serve the root's waiter: {}",
                root.stats()
            );
        };
        assert_eq!(books(&root), (32, 24, 0, 0, 0));
        // The floor is whole again: the leaf takes all 8 of it (and climbs with nothing).
        let again = leaf.try_allocate(8).unwrap();
        assert_eq!(books(&root), (32, 24, 0, 0, 0));
        drop((again, got, rest, r));
        assert_eq!(books(&root), (8, 0, 0, 0, 0), "the idle floor, set aside");
        assert_eq!(books(&mid), (0, 0, 0, 0, 0));
    });
}

#[test]
fn an_overcommitted_reservations_allocation_that_gets_no_memory_repays_first_then_serves() {
    let _serial = serial();
    watchdog(30, || {
        let root = BufPool::new(cfg(8));
        let child = root.child("child", cfg(8)).unwrap();
        let mut r = child.try_reserve(8 * B).unwrap();
        r.force_grow(3 * B).unwrap();
        assert_eq!(books(&child), (11, 11, 0, 0, 3));
        assert_eq!(books(&root), (11, 0, 0, 0, 3));
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiter = Box::pin(root.allocate(1));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        {
            let _failing = failing(11 * B);
            assert_eq!(
                r.allocate(11).unwrap_err(),
                AllocError::OutOfMemory { bytes: 11 * B }
            );
        }
        assert_eq!(books(&child), (0, 0, 0, 0, 0));
        let Poll::Ready(Ok(one)) = waiter.as_mut().poll(&mut cx) else {
            panic!("repaid, then the waiter is served: {}", root.stats());
        };
        assert_eq!(books(&root), (1, 0, 1, 0, 0));
        drop((one, r));
        assert_eq!(books(&root), (0, 0, 0, 0, 0));
    });
}

#[test]
fn a_childs_blocking_request_granted_at_the_root_then_out_of_memory_passes_its_bytes_on() {
    let _serial = serial();
    watchdog(30, || {
        let root = Arc::new(BufPool::new(cfg(16)));
        let child = Arc::new(root.child("child", cfg(16)).unwrap());
        let mut all = root.try_reserve(16 * B).unwrap();
        let thread = {
            let child = Arc::clone(&child);
            std::thread::spawn(move || child.allocate_blocking(9).map(|a| a.length()))
        };
        common::wait_until(10, "the child's request waits at the root", || {
            root.stats().waiting == 1
        });
        let mut cx = Context::from_waker(Waker::noop());
        let mut behind = Box::pin(root.reserve(4 * B));
        assert!(behind.as_mut().poll(&mut cx).is_pending());
        {
            let _failing = failing(9 * B);
            all.shrink(9 * B);
            assert_eq!(
                thread.join().unwrap(),
                Err(AllocError::OutOfMemory { bytes: 9 * B })
            );
        }
        assert_eq!(books(&child), (0, 0, 0, 0, 0));
        let Poll::Ready(Ok(behind)) = behind.as_mut().poll(&mut cx) else {
            panic!(
                "the failed request's bytes serve the next: {}",
                root.stats()
            );
        };
        assert_eq!(books(&root), (11, 11, 0, 0, 0));
        drop((behind, all));
        assert_eq!(child.allocate_blocking(16).unwrap().length(), 16);
        assert_eq!(books(&root), (0, 0, 0, 0, 0));
    });
}

#[test]
fn a_grandchilds_fast_path_out_of_memory_gives_back_its_floor_part_and_its_climbed_part() {
    let _serial = serial();
    watchdog(30, || {
        let root = BufPool::new(cfg(32));
        let mid = BufPool::builder(cfg(24))
            .parent(&root)
            .min_memory(8 * B)
            .build()
            .unwrap();
        let leaf = BufPool::builder(cfg(16))
            .parent(&mid)
            .min_memory(4 * B)
            .build()
            .unwrap();
        // The leaf's floor (4) set aside in mid, mid's (8) in the root.
        assert_eq!(books(&mid), (4, 0, 0, 0, 0));
        assert_eq!(books(&root), (8, 0, 0, 0, 0));
        for zeroed in [false, true] {
            // 15 buffers: the leaf's floor 4, mid's floor 4 more (8 with the leaf's), 7 climb.
            {
                let _failing = failing(15 * B);
                let result = if zeroed {
                    leaf.try_allocate_zeroed(15)
                } else {
                    leaf.try_allocate(15)
                };
                assert_eq!(
                    result.unwrap_err(),
                    AllocError::OutOfMemory { bytes: 15 * B }
                );
            }
            assert_eq!(books(&leaf), (0, 0, 0, 0, 0));
            assert_eq!(books(&mid), (4, 0, 0, 0, 0));
            assert_eq!(books(&root), (8, 0, 0, 0, 0));
            // Every floor whole again: the same request, with memory, takes the same parts.
            let all = leaf.try_allocate(15).unwrap();
            assert_eq!(books(&leaf), (15, 0, 1, 0, 0));
            assert_eq!(books(&mid), (15, 0, 0, 0, 0));
            assert_eq!(books(&root), (8 + 7, 0, 0, 0, 0));
            drop(all);
        }
        // After the failures the books still work: a full mid, a leaf request in its own
        // floor, a waiter at mid served by a release.
        let mid_all = mid.try_reserve(20 * B).unwrap(); // mid: 4 (leaf floor) + 20 = 24
        let mut cx = Context::from_waker(Waker::noop());
        let mut leaf_wait = Box::pin(leaf.allocate(3)); // in the leaf's floor: no wait
        let Poll::Ready(Ok(three)) = leaf_wait.as_mut().poll(&mut cx) else {
            panic!("the leaf's floor serves it")
        };
        let mut mid_waiter = Box::pin(mid.reserve(2 * B));
        assert!(mid_waiter.as_mut().poll(&mut cx).is_pending());
        drop(mid_all); // mid serves its waiter at once
        let Poll::Ready(Ok(two)) = mid_waiter.as_mut().poll(&mut cx) else {
            panic!("served")
        };
        assert_eq!(books(&mid), (4 + 2, 2, 0, 0, 0));
        drop((three, two));
        assert_eq!(books(&mid), (4, 0, 0, 0, 0));
        assert_eq!(books(&root), (8, 0, 0, 0, 0));
    });
}

#[test]
fn a_floored_grandchilds_waiter_granted_at_the_root_then_out_of_memory_restores_every_floor() {
    let _serial = serial();
    watchdog(30, || {
        let root = BufPool::new(cfg(32));
        let mid = BufPool::builder(cfg(24))
            .parent(&root)
            .min_memory(8 * B)
            .build()
            .unwrap();
        let leaf = BufPool::builder(cfg(16))
            .parent(&mid)
            .min_memory(4 * B)
            .build()
            .unwrap();
        let mut rest = root.try_reserve(24 * B).unwrap(); // the root is full (8 floors)
        let mut cx = Context::from_waker(Waker::noop());
        // 13 buffers: 4 + 4 of the floors, 5 must climb to the root: it waits there.
        let mut waiter = Box::pin(leaf.allocate(13));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        assert_eq!(root.stats().waiting, 1);
        let mut behind = Box::pin(root.reserve(3 * B));
        assert!(behind.as_mut().poll(&mut cx).is_pending());
        {
            let _failing = failing(13 * B);
            rest.shrink(5 * B); // grants the leaf's request its 5 at the root
            assert_eq!(
                waiter.as_mut().poll(&mut cx).map(|r| r.map(drop)),
                Poll::Ready(Err(AllocError::OutOfMemory { bytes: 13 * B }))
            );
        }
        // Its 5 at the root went back and served the reservation behind it.
        let Poll::Ready(Ok(three)) = behind.as_mut().poll(&mut cx) else {
            panic!("the root's waiter is served: {}", root.stats())
        };
        assert_eq!(books(&leaf), (0, 0, 0, 0, 0));
        assert_eq!(books(&mid), (4, 0, 0, 0, 0));
        assert_eq!(books(&root), (8 + 19 + 3, 22, 0, 0, 0));
        // The floors are whole: 8 buffers of the leaf need nothing of the root.
        let eight = leaf.try_allocate(8).unwrap();
        assert_eq!(books(&root), (30, 22, 0, 0, 0));
        drop((eight, three, rest));
        assert_eq!(books(&root), (8, 0, 0, 0, 0));
    });
}
