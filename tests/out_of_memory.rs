//! When the system allocator returns null, every call form fails with
//! `AllocError::OutOfMemory { bytes }`, the budget goes back at once and waiters are served:
//! the process does not abort. This binary's `#[global_allocator]` fails on demand, for
//! blocks of one marked size only (so the test harness itself keeps working).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

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

/// Blocks of this size fail while the guard lives. Tests that fail allocations run one at a
/// time (the allocator is global).
struct Failing(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

fn failing(bytes: usize) -> Failing {
    let guard = WINDOW.lock().unwrap_or_else(|poison| poison.into_inner());
    FAIL_SIZE.store(bytes, SeqCst);
    Failing(guard)
}

static WINDOW: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held by every test for its whole run: a window one test opens fails any block of that
/// size, so another test's pool of the same buffers must not allocate meanwhile (it did: 1
/// run in 200 failed with another test's `OutOfMemory`).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Drop for Failing {
    fn drop(&mut self) {
        FAIL_SIZE.store(0, SeqCst);
    }
}

// Each test fails a different multiple of 4096 (3, 5 or 7 buffers): sizes the harness
// itself is unlikely to allocate while a window is open.
const BUFFER: BufferSize = BufferSize::S4096;

fn pool(buffers: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(BufPoolCfg {
        buffer_size: BUFFER,
        max_memory: 4096 * buffers,
    }))
}

#[test]
fn every_call_form_reports_out_of_memory_and_gives_the_budget_back() {
    let _serial = serial();
    watchdog(60, || {
        let pool = pool(8);
        let bytes = 7 * 4096;
        let _failing = failing(bytes);
        let expected = AllocError::OutOfMemory { bytes };
        assert_eq!(pool.try_allocate(7).unwrap_err(), expected);
        assert_eq!(pool.try_allocate_zeroed(7).unwrap_err(), expected);
        assert_eq!(pool.allocate_blocking(7).unwrap_err(), expected);
        assert_eq!(pool.allocate_zeroed_blocking(7).unwrap_err(), expected);
        assert_eq!(
            pool.allocate_timeout(7, Duration::from_secs(5))
                .unwrap_err(),
            expected
        );
        assert_eq!(
            futures::executor::block_on(pool.allocate(7)).unwrap_err(),
            expected
        );
        assert_eq!(
            futures::executor::block_on(Arc::clone(&pool).allocate_owned(7)).unwrap_err(),
            expected
        );
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.outstanding, stats.waiting),
            (0, 0, 0),
            "{stats:?}"
        );
        assert!(expected.to_string().contains("no memory for 28672 bytes"));
        // Other sizes still work meanwhile, and the whole budget is there.
        let all = pool.try_allocate(8).unwrap();
        drop(all);
    });
}

#[test]
fn a_granted_waiter_that_gets_no_memory_passes_its_bytes_to_the_next() {
    let _serial = serial();
    watchdog(60, || {
        let pool = pool(4);
        let held = pool.try_allocate(4).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let mut first = Box::pin(pool.allocate(3));
        let mut second = Box::pin(pool.allocate(2));
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        drop(held); // grants `first` its 3; `second` does not fit behind it
        assert_eq!(pool.stats().waiting, 1);
        {
            let _failing = failing(3 * 4096);
            let Poll::Ready(Err(error)) = first.as_mut().poll(&mut cx) else {
                panic!("the failed allocation was not reported");
            };
            assert_eq!(error, AllocError::OutOfMemory { bytes: 3 * 4096 });
        }
        // The 3 went back at once and served `second`.
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.waiting),
            (2 * 4096, 0),
            "{stats:?}"
        );
        let Poll::Ready(Ok(allocation)) = second.as_mut().poll(&mut cx) else {
            panic!("the waiter behind was not served");
        };
        drop(allocation);
        let stats = pool.stats();
        assert_eq!((stats.in_use_bytes, stats.outstanding), (0, 0), "{stats:?}");
    });
}

#[test]
fn a_blocking_waiter_that_gets_no_memory_fails_and_leaves_no_budget_behind() {
    let _serial = serial();
    watchdog(60, || {
        let pool = pool(5);
        // Not the waiter's size: its release cannot hand the waiter its block, so the waiter
        // asks the allocator (see the next test for the hand-over).
        let held = pool.try_allocate(5).unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(4).map(|a| a.length()))
        };
        common::wait_until(30, "the thread waits", || pool.stats().waiting == 1);
        {
            let _failing = failing(4 * 4096);
            drop(held);
            assert_eq!(
                waiter.join().unwrap(),
                Err(AllocError::OutOfMemory { bytes: 4 * 4096 })
            );
        }
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.outstanding, stats.waiting),
            (0, 0, 0),
            "{stats:?}"
        );
        // The pool works on.
        assert_eq!(pool.allocate_blocking(5).unwrap().length(), 5);
    });
}

#[test]
fn a_waiter_handed_the_released_block_needs_no_memory_from_the_allocator() {
    let _serial = serial();
    watchdog(60, || {
        let pool = pool(5);
        let held = pool.try_allocate(5).unwrap();
        let address = held.first();
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(5).map(|a| a.first() as usize))
        };
        common::wait_until(30, "the thread waits", || pool.stats().waiting == 1);
        {
            // The allocator would fail the waiter's size: the release hands it its own block.
            let _failing = failing(5 * 4096);
            drop(held);
            assert_eq!(waiter.join().unwrap(), Ok(address as usize));
        }
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.outstanding, stats.waiting),
            (0, 0, 0),
            "{stats:?}"
        );
    });
}
