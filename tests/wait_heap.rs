//! How many heap allocations a wait costs beyond the buffer itself (issue 11: "waiting
//! allocates nothing on the heap").
//!
//! A counting `#[global_allocator]` wraps `System` and counts `alloc`, `alloc_zeroed` and
//! `realloc` calls made on the current thread while [`count_allocs`] runs (a thread-local
//! flag and counter: other threads, such as the test harness, a releaser or a watchdog, are
//! never counted). Each measured region contains one whole wait, from creating the request
//! to dropping the allocation it returned; the allocations of the same request without a
//! wait (the buffer itself, measured the same way on an idle pool) are subtracted. What is
//! left is what waiting costs, and it must be zero:
//!
//! * async, re-polled with the same waker (`Waker::will_wake` true);
//! * async, re-polled with a different waker (`will_wake` false: the pool must keep the new
//!   one, and cloning an `Arc`-based waker is a reference count, not an allocation);
//! * a queue of 32 async waiters (the wait list grows with the queue);
//! * a blocking waiter (`allocate_blocking`) on its own thread, counted around the call only
//!   (spawning a thread allocates), after one earlier blocking wait on that thread (each
//!   thread makes its parking waker once, at its first blocking wait).
//!
//! Since issue 22 a release that serves a waiter of its own size hands it its block, so such
//! a wait allocates less than the request without a wait (not even the buffer): "nothing
//! beyond the buffer" is then `count <= buffer`, checked as a saturating difference of zero.
//!
//! Each case is measured on a fresh pool (the first wait it ever has) and on a pool that has
//! already had waiters. The wakers are made before the measured region.
//!
//! Before the waiting-core redesign (issue 11) the queue was a slab in a `Vec` that grew on
//! the first wait, and the blocking shim allocated an `Arc` for its waker on every wait: 1-2
//! extra allocations per wait. The wait node now lives in the future, and each thread keeps
//! its parking waker. `cargo test --test wait_heap -- --nocapture` prints the counts.
//!
//! No sockets and no runtime: runs under Miri.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;

use membudget::{BufPool, BufferSize};

use common::{pool, wait_waiting, watchdog};

/// How many allocation sizes a count remembers, to say what allocated.
const SIZES: usize = 8;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
    static SIZES_SEEN: Cell<[usize; SIZES]> = const { Cell::new([0; SIZES]) };
}

/// `System`, counting the allocations of the threads that asked for it.
struct Counting;

/// Counts one allocation of `size` bytes if this thread counts. Touches only `const`
/// thread-locals without destructors: never allocates, and works during thread teardown.
fn note(size: usize) {
    let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
    if counting {
        let index = COUNT.with(|count| {
            let index = count.get();
            count.set(index + 1);
            index
        });
        if index < SIZES {
            SIZES_SEEN.with(|sizes| {
                let mut seen = sizes.get();
                seen[index] = size;
                sizes.set(seen);
            });
        }
    }
}

// SAFETY: every call is passed to `System` unchanged; counting has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocations counted in one region.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Allocs {
    count: usize,
    /// The sizes (the new size for a `realloc`) of the first [`SIZES`] of them.
    sizes: Vec<usize>,
}

/// Runs `f`, counting the allocations this thread makes meanwhile.
fn count_allocs<T>(f: impl FnOnce() -> T) -> (T, Allocs) {
    COUNT.with(|count| count.set(0));
    COUNTING.with(|counting| counting.set(true));
    let out = f();
    COUNTING.with(|counting| counting.set(false));
    let count = COUNT.with(Cell::get);
    let seen = SIZES_SEEN.with(Cell::get);
    let sizes = seen[..count.min(SIZES)].to_vec();
    (out, Allocs { count, sizes })
}

/// A one-buffer pool: one allocation holds the whole budget.
fn single_slot_pool() -> BufPool {
    pool(BufferSize::S64, 1)
}

/// The allocations of `allocate(1)` + drop on an idle pool: the buffer itself, with no wait.
fn no_wait_allocs() -> usize {
    let pool = single_slot_pool();
    // Whatever a first use of the pool sets up is not the buffer's.
    drop(pool.try_allocate(1).unwrap());
    let ((), allocs) = count_allocs(|| {
        let allocation = pollster(pool.allocate(1)).unwrap();
        drop(allocation);
    });
    assert_eq!(allocs.count, 1, "the buffer alone: {allocs:?}");
    allocs.count
}

/// Polls `future` to completion without waiting (it must never be pending).
fn pollster<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected no wait"),
    }
}

/// An `Arc`-based waker that counts its wakes: cloning it bumps a reference count.
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

fn counting_waker() -> (Arc<CountingWaker>, Waker) {
    let inner = Arc::new(CountingWaker(AtomicUsize::new(0)));
    (inner.clone(), Waker::from(inner))
}

/// One async wait on `pool` (whose one buffer must be free): hold the budget, queue
/// `allocate(1)` polled with `first`, re-poll it with `second`, release, poll it to
/// completion with `second`, drop the result. Returns the allocations of all but the hold.
fn async_wait(
    pool: &BufPool,
    first: &Waker,
    second: &Waker,
    second_wakes: &CountingWaker,
) -> Allocs {
    let held = pool.try_allocate(1).unwrap();
    let woken_before = second_wakes.0.load(SeqCst);
    let ((), allocs) = count_allocs(|| {
        let mut request = pin!(pool.allocate(1));
        let pending = request
            .as_mut()
            .poll(&mut Context::from_waker(first))
            .is_pending();
        assert!(pending, "the request did not wait");
        let mut cx = Context::from_waker(second);
        assert!(request.as_mut().poll(&mut cx).is_pending());
        // The release grants the queued request and wakes `second`.
        drop(held);
        let Poll::Ready(allocation) = request.as_mut().poll(&mut cx) else {
            panic!("the release did not serve the waiter")
        };
        drop(allocation.unwrap());
    });
    assert!(
        second_wakes.0.load(SeqCst) > woken_before,
        "the release did not wake the latest waker"
    );
    allocs
}

/// Extra allocations of `async_wait` on a fresh pool and on a pool that has had a waiter.
fn async_wait_extra(same_waker: bool) -> [usize; 2] {
    watchdog(60, move || {
        let buffer = no_wait_allocs();
        let (first_wakes, first) = counting_waker();
        let (second_wakes, second) = if same_waker {
            (first_wakes, first.clone())
        } else {
            counting_waker()
        };
        // Miri may give each use of a vtable an address of its own, so there `will_wake` can
        // be false even between clones of one waker (the same-waker case then takes the
        // new-waker path, which must not allocate either).
        if !cfg!(miri) || !same_waker {
            assert_eq!(first.will_wake(&second), same_waker);
        }
        let pool = single_slot_pool();
        let fresh = async_wait(&pool, &first, &second, &second_wakes);
        let later = async_wait(&pool, &first, &second, &second_wakes);
        common::assert_idle(&pool);
        eprintln!(
            "async wait (same waker: {same_waker}): first wait {fresh:?}, later wait {later:?}, buffer alone {buffer}"
        );
        [
            fresh.count.saturating_sub(buffer),
            later.count.saturating_sub(buffer),
        ]
    })
}

#[test]
fn async_wait_same_waker_allocates_nothing_beyond_the_buffer() {
    assert_eq!(
        async_wait_extra(true),
        [0, 0],
        "extra allocations of [the first wait of a fresh pool, a later wait]"
    );
}

#[test]
fn async_wait_new_waker_allocates_nothing_beyond_the_buffer() {
    assert_eq!(
        async_wait_extra(false),
        [0, 0],
        "extra allocations of [the first wait of a fresh pool, a later wait]"
    );
}

/// A wait on a pool that has had waiters before, same waker or not: today's slab has a free
/// slot then and the waker is cloned by reference count, so this holds already.
#[test]
fn async_wait_on_a_used_pool_allocates_nothing_beyond_the_buffer() {
    assert_eq!(async_wait_extra(true)[1], 0, "same waker");
    assert_eq!(async_wait_extra(false)[1], 0, "new waker");
}

/// `WAITERS` async waiters queued at once behind a held budget, then served one by one.
/// Returns the extra allocations (beyond their buffers) of all of them.
fn queue_extra(pool: &BufPool, waker: &Waker, buffer: usize) -> usize {
    const WAITERS: usize = 32;
    let held = pool.try_allocate(1).unwrap();
    let mut cx = Context::from_waker(waker);
    // The futures' own storage is the test's, not the pool's: made before measuring.
    let mut requests: Vec<_> = (0..WAITERS).map(|_| Box::pin(pool.allocate(1))).collect();
    let ((), allocs) = count_allocs(|| {
        for request in &mut requests {
            assert!(request.as_mut().poll(&mut cx).is_pending());
        }
        drop(held);
        for request in &mut requests {
            let Poll::Ready(allocation) = request.as_mut().poll(&mut cx) else {
                panic!("the release did not serve the head")
            };
            // Its release grants the next one.
            drop(allocation.unwrap());
        }
    });
    drop(requests);
    eprintln!("{WAITERS} queued async waiters: {allocs:?}, buffer alone {buffer} each");
    allocs.count.saturating_sub(WAITERS * buffer)
}

#[test]
fn a_queue_of_async_waiters_allocates_nothing_beyond_the_buffers() {
    let extra = watchdog(60, || {
        let buffer = no_wait_allocs();
        let (_wakes, waker) = counting_waker();
        let pool = single_slot_pool();
        [
            queue_extra(&pool, &waker, buffer),
            queue_extra(&pool, &waker, buffer),
        ]
    });
    assert_eq!(
        extra,
        [0, 0],
        "extra allocations of [the first queue of a fresh pool, a later one]"
    );
}

/// One blocking wait on `pool` (whose one buffer must be free), counted on the waiting
/// thread around `allocate_blocking` and the drop of its result only. The thread has waited
/// once before (a wait that timed out on another pool): a thread makes its parking waker
/// once, at its first blocking wait, not at every wait.
fn blocking_wait(pool: &Arc<BufPool>) -> Allocs {
    let held = pool.try_allocate(1).unwrap();
    let waiter = thread::spawn({
        let pool = pool.clone();
        move || {
            let warm_up = single_slot_pool();
            let full = warm_up.try_allocate(1).unwrap();
            let timed_out = warm_up.allocate_timeout(1, std::time::Duration::from_millis(1));
            assert_eq!(timed_out.unwrap_err(), membudget::AllocError::TimedOut);
            drop(full);
            let (result, allocs) = count_allocs(|| pool.allocate_blocking(1).map(drop));
            result.unwrap();
            allocs
        }
    });
    wait_waiting(pool, 1);
    drop(held);
    waiter.join().expect("the waiting thread panicked")
}

fn blocking_wait_extra() -> [usize; 2] {
    watchdog(60, || {
        let buffer = no_wait_allocs();
        // What the process sets up once for the first blocking wait of all (the spin limit
        // reads the core count) is not a cost per wait: done here, on another pool.
        blocking_wait(&Arc::new(single_slot_pool()));
        let pool = Arc::new(single_slot_pool());
        let fresh = blocking_wait(&pool);
        let later = blocking_wait(&pool);
        common::assert_idle(&pool);
        eprintln!(
            "blocking wait: first wait {fresh:?}, later wait {later:?}, buffer alone {buffer}"
        );
        [
            fresh.count.saturating_sub(buffer),
            later.count.saturating_sub(buffer),
        ]
    })
}

#[test]
fn blocking_wait_allocates_nothing_beyond_the_buffer() {
    assert_eq!(
        blocking_wait_extra(),
        [0, 0],
        "extra allocations of [the first wait of a fresh pool, a later wait]"
    );
}

/// The counter itself: it sees an allocation on this thread and none made meanwhile on
/// another.
#[test]
fn the_counter_counts_this_thread_only() {
    let (boxed, allocs) = count_allocs(|| Box::new(7_u64));
    assert_eq!((allocs.count, allocs.sizes.as_slice()), (1, &[8][..]));
    drop(boxed);

    let go = Arc::new(AtomicUsize::new(0));
    let other = thread::spawn({
        let go = go.clone();
        move || {
            while go.load(SeqCst) == 0 {
                thread::yield_now();
            }
            drop(Box::new(7_u64));
            go.store(2, SeqCst);
        }
    });
    let ((), allocs) = count_allocs(|| {
        go.store(1, SeqCst);
        while go.load(SeqCst) != 2 {
            thread::yield_now();
        }
    });
    other.join().unwrap();
    assert_eq!(
        allocs.count, 0,
        "counted another thread's allocation: {allocs:?}"
    );
}
