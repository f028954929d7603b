//! Issue 7, item 3: faults. A task or thread that panics while holding an allocation gives
//! its bytes back during unwinding; a runtime shut down with tasks queued leaves the pool
//! consistent; `mem::forget` of an allocation leaks only its own bytes; a waker that panics,
//! or a waiter whose runtime is gone, does not wedge the queue.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Wake, Waker};
use std::thread;
use std::time::Duration;

use common::*;
use membudget::{AllocError, BufPool, BufPoolAllocation, BufferSize};

const BUF: usize = 64;

/// A waker that counts its wakes; with `panics` it panics on every wake.
struct TestWaker {
    woken: AtomicUsize,
    panics: bool,
}

impl TestWaker {
    fn new(panics: bool) -> Arc<Self> {
        Arc::new(TestWaker {
            woken: AtomicUsize::new(0),
            panics,
        })
    }

    fn woken(&self) -> usize {
        self.woken.load(SeqCst)
    }
}

impl Wake for TestWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.fetch_add(1, SeqCst);
        if self.panics {
            panic!("test waker panics on wake, on purpose");
        }
    }
}

fn poll_with<F: Future + Unpin>(future: &mut F, waker: &Waker) -> Poll<F::Output> {
    Pin::new(future).poll(&mut Context::from_waker(waker))
}

/// A waker whose `clone` panics (the pool must clone a waker to keep it).
fn clone_panicking_waker() -> Waker {
    unsafe fn clone(_: *const ()) -> RawWaker {
        panic!("test waker panics on clone, on purpose")
    }
    unsafe fn noop(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, noop, noop, noop);
    // SAFETY: the vtable's functions ignore the data pointer, so any pointer satisfies the
    // `RawWaker` contract.
    unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) }
}

// ---------------------------------------------------------------------------------------------
// Panics while holding an allocation
// ---------------------------------------------------------------------------------------------

#[test]
fn thread_panicking_while_holding_an_allocation_returns_its_bytes() {
    watchdog(20, || {
        let pool = shared_pool(4);
        let holder = thread::spawn({
            let pool = pool.clone();
            move || {
                let _allocation = pool.allocate_blocking(4).unwrap();
                panic!("the holder panics on purpose");
            }
        });
        assert!(holder.join().is_err());
        assert_idle(&pool);

        // With a waiter queued behind the panicking holder: unwinding hands the bytes on.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let holder = thread::spawn({
            let pool = pool.clone();
            move || {
                let _allocation = pool.allocate_blocking(4).unwrap();
                ready_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                panic!("the holder panics on purpose");
            }
        });
        ready_rx.recv().unwrap();
        let waiter = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_blocking(3).unwrap()
        });
        wait_waiting(&pool, 1);
        go_tx.send(()).unwrap();
        assert!(holder.join().is_err());
        let got = waiter.join().unwrap();
        assert_eq!(pool.stats().in_use_bytes, 3 * BUF);
        drop(got);
        assert_full_budget_back(&pool);
    });
}

#[test]
fn panic_caught_in_the_same_thread_returns_the_bytes() {
    let pool = pool(BufferSize::S64, 2);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let allocation = pool.try_allocate(2).unwrap();
        assert_eq!(pool.stats().in_use_bytes, 2 * BUF);
        // SAFETY: 128 writable bytes.
        unsafe { allocation.first().write_bytes(1, 128) };
        panic!("panics while holding, on purpose");
    }));
    assert!(result.is_err());
    assert_full_budget_back(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_panicking_while_holding_an_allocation_returns_its_bytes() {
    let pool = shared_pool(4);
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            let _allocation = pool.allocate(4).await.unwrap();
            go_rx.await.unwrap();
            panic!("the task panics on purpose");
        }
    });
    wait_until_async(10, "the holder has its bytes", || {
        pool.stats().in_use_bytes == 4 * BUF
    })
    .await;
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.allocate(4).await.unwrap() }
    });
    wait_waiting_async(&pool, 1).await;
    go_tx.send(()).unwrap();
    let error = within(10, holder).await.unwrap_err();
    assert!(error.is_panic());
    let got = within(10, waiter).await.unwrap();
    assert_eq!(pool.stats().outstanding, 1);
    drop(got);
    assert_full_budget_back(&pool);
}

// ---------------------------------------------------------------------------------------------
// A runtime shut down while tasks are queued
// ---------------------------------------------------------------------------------------------

#[test]
fn runtime_shut_down_with_queued_tasks_leaves_the_pool_consistent() {
    watchdog(30, || {
        let pool = shared_pool(4);
        let held = pool.try_allocate(4).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tasks = rounds(6, 2);
        for i in 0..tasks {
            let pool = pool.clone();
            runtime.spawn(async move {
                let _ = pool.allocate(1 + i % 4).await;
                unreachable!("the budget never frees while the runtime lives");
            });
        }
        runtime.block_on(wait_waiting_async(&pool, tasks));
        // A blocking waiter queued behind the tasks.
        let behind = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_blocking(4).unwrap()
        });
        wait_waiting(&pool, tasks + 1);

        runtime.shutdown_timeout(Duration::from_secs(10) * SLOWDOWN);
        // The tasks' futures were dropped: no phantom waiters.
        assert_eq!(pool.stats().waiting, 1);
        drop(held);
        let got = behind.join().unwrap();
        assert_eq!(pool.stats().in_use_bytes, 4 * BUF);
        drop(got);
        assert_full_budget_back(&pool);
    });
}

/// Bytes granted to a task that never runs again (its runtime is dropped before it is polled)
/// go on to the next waiter.
#[test]
fn runtime_dropped_after_its_task_was_granted_passes_the_bytes_on() {
    watchdog(20, || {
        let pool = shared_pool(2);
        let held = pool.try_allocate(2).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let task = runtime.spawn({
            let pool = pool.clone();
            async move { pool.allocate(2).await.unwrap() }
        });
        // Drive the runtime only until the task is queued; then nobody drives it.
        runtime.block_on(wait_waiting_async(&pool, 1));
        let behind = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_blocking(2).unwrap()
        });
        wait_waiting(&pool, 2);
        drop(held); // grants the task, which cannot run: its runtime is idle
        let stats = pool.stats();
        assert_eq!((stats.in_use_bytes, stats.waiting), (2 * BUF, 1));
        drop(task);
        drop(runtime); // drops the task's future: its grant passes to `behind`
        let got = behind.join().unwrap();
        assert_eq!(pool.stats().outstanding, 1);
        drop(got);
        assert_full_budget_back(&pool);
    });
}

/// A pool with a `'static` lifetime, so a request future can leave the task that polled it.
/// Kept in a static (never dropped), which Miri does not count as a leak.
static ORPHAN_POOL: std::sync::OnceLock<BufPool> = std::sync::OnceLock::new();

/// A request first polled by a task of a runtime that is then dropped: the waker it left in
/// the queue belongs to a dead task of a dead runtime. The release that grants it must not
/// trip over that waker, the waiter behind it must be served, and the orphan can still be
/// finished on another executor.
#[test]
fn waiter_whose_runtime_was_dropped_does_not_wedge_the_queue() {
    watchdog(20, || {
        let pool: &'static BufPool = ORPHAN_POOL.get_or_init(|| pool(BufferSize::S64, 2));
        let held = pool.try_allocate(2).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (orphan,) = runtime
            .block_on(runtime.spawn(async move {
                let mut request = Box::pin(pool.allocate(1));
                assert!(futures::poll!(&mut request).is_pending());
                (request,) // leaves the task, with the task's waker in the queue
            }))
            .unwrap();
        drop(runtime);
        let behind = thread::spawn(move || pool.allocate_blocking(1).unwrap());
        wait_waiting(pool, 2);
        drop(held); // wakes the dead task's waker, and the thread
        let got = behind.join().unwrap();
        let orphan_got = futures::executor::block_on(orphan).unwrap();
        assert_eq!(pool.stats().outstanding, 2);
        drop((got, orphan_got));
        assert_full_budget_back(pool);
    });
}

/// The same with the orphan dropped instead of finished: its grant goes to the next waiter.
#[test]
fn dropped_runtime_then_dropped_orphan_passes_its_grant_on() {
    watchdog(20, || {
        let pool = shared_pool(2);
        let held = pool.try_allocate(2).unwrap();
        let mut orphan = Box::pin(pool.allocate(2));
        {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                assert!(futures::poll!(&mut orphan).is_pending());
            });
        }
        let behind = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_blocking(2).unwrap()
        });
        wait_waiting(&pool, 2);
        drop(held); // grants the orphan, whose waker's runtime is gone
        assert_eq!(pool.stats().waiting, 1);
        drop(orphan);
        let got = behind.join().unwrap();
        drop(got);
        assert_full_budget_back(&pool);
    });
}

// ---------------------------------------------------------------------------------------------
// mem::forget
// ---------------------------------------------------------------------------------------------

/// Under Miri a forgotten allocation would be reported as a leak, so there it is parked in a
/// static instead: the pool sees exactly the same thing (bytes that never come back).
static PARKED: Mutex<Vec<BufPoolAllocation>> = Mutex::new(Vec::new());

fn forget_allocation(allocation: BufPoolAllocation) {
    if cfg!(miri) {
        PARKED.lock().unwrap().push(allocation);
    } else {
        std::mem::forget(allocation);
    }
}

#[test]
fn mem_forget_of_an_allocation_leaks_only_its_own_bytes() {
    watchdog(20, || {
        let pool = Arc::new(pool(BufferSize::S64, 8));
        forget_allocation(pool.try_allocate(3).unwrap());
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.outstanding, stats.waiting),
            (3 * BUF, 1, 0)
        );
        assert_eq!(stats.available_bytes(), 5 * BUF);
        // The other five buffers stay fully usable, over and over.
        for _ in 0..rounds(100, 3) {
            let rest = pool.try_allocate(5).unwrap();
            assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
            drop(rest);
        }
        assert_eq!(pool.try_allocate(6).unwrap_err(), AllocError::WouldBlock);
        // Waiting and hand-off still work within the rest.
        let rest = pool.try_allocate(5).unwrap();
        let waiter = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_blocking(5).unwrap()
        });
        wait_waiting(&pool, 1);
        drop(rest);
        drop(waiter.join().unwrap());
        let stats = pool.stats();
        assert_eq!((stats.in_use_bytes, stats.outstanding), (3 * BUF, 1));
        // The shutdown report names the leak; the drop barrier would wait for it forever.
        let report = pool.shutdown_timeout(Duration::from_millis(20));
        assert!(report.closed);
        assert_eq!((report.outstanding, report.in_use_bytes), (1, 3 * BUF));
        let pool = Arc::try_unwrap(pool).unwrap();
        std::mem::forget(pool);
    });
}

// ---------------------------------------------------------------------------------------------
// Wakers that panic
// ---------------------------------------------------------------------------------------------

/// The head waiter's waker panics when the release wakes it; the waiter behind it is still
/// served, the panic surfaces in the releasing call, and the budget stays exact.
#[test]
fn panicking_waker_at_the_head_does_not_wedge_the_queue() {
    watchdog(20, || {
        let pool = shared_pool(2);
        let held = pool.try_allocate(2).unwrap();
        let bad = TestWaker::new(true);
        let bad_waker = Waker::from(bad.clone());
        let mut head = Box::pin(pool.allocate(1));
        assert!(poll_with(&mut head, &bad_waker).is_pending());
        let behind = thread::spawn({
            let pool = pool.clone();
            move || pool.allocate_blocking(1).unwrap()
        });
        wait_waiting(&pool, 2);
        let released = catch_unwind(AssertUnwindSafe(|| drop(held)));
        assert_eq!(bad.woken(), 1);
        assert!(
            released.is_err(),
            "the waker's panic surfaces in the releasing drop"
        );
        let got = behind.join().unwrap();
        // The head was granted too: a later poll (with a good waker) picks its bytes up.
        let head_got = match poll_with(&mut head, Waker::noop()) {
            Poll::Ready(result) => result.unwrap(),
            Poll::Pending => panic!("the head was granted its bytes"),
        };
        drop(head);
        assert_eq!(pool.stats().outstanding, 2);
        drop((got, head_got));
        assert_full_budget_back(&pool);
    });
}

/// One release grants two waiters: a good one at the head and one whose waker panics behind
/// it. The good one must be woken whatever order the wakers run in.
#[test]
fn panicking_waker_behind_a_good_waiter_does_not_strand_it() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let good = TestWaker::new(false);
    let bad = TestWaker::new(true);
    let mut first = Box::pin(pool.allocate(1));
    let mut second = Box::pin(pool.allocate(1));
    assert!(poll_with(&mut first, &Waker::from(good.clone())).is_pending());
    assert!(poll_with(&mut second, &Waker::from(bad.clone())).is_pending());
    assert_eq!(pool.stats().waiting, 2);
    let released = catch_unwind(AssertUnwindSafe(|| drop(held)));
    assert!(
        released.is_err(),
        "the waker's panic surfaces in the releasing drop"
    );
    assert_eq!(bad.woken(), 1);
    assert_eq!(
        good.woken(),
        1,
        "the good waiter was granted its bytes but never woken: it would sleep forever"
    );
    let a = ready(&mut first).unwrap();
    let b = ready(&mut second).unwrap();
    drop((a, b, first, second));
    assert_full_budget_back(&pool);
}

/// The same with a blocking thread at the head: it must return, not sleep forever.
#[test]
fn panicking_waker_behind_a_blocking_waiter_does_not_strand_it() {
    watchdog(20, || {
        let pool = shared_pool(2);
        let held = pool.try_allocate(2).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        thread::spawn({
            let pool = pool.clone();
            move || {
                let allocation = pool.allocate_blocking(1).unwrap();
                let _ = done_tx.send(allocation);
            }
        });
        wait_waiting(&pool, 1);
        let bad = TestWaker::new(true);
        let mut second = Box::pin(pool.allocate(1));
        assert!(poll_with(&mut second, &Waker::from(bad.clone())).is_pending());
        wait_waiting(&pool, 2);
        let released = catch_unwind(AssertUnwindSafe(|| drop(held)));
        assert!(released.is_err());
        let first = done_rx
            .recv_timeout(Duration::from_secs(5) * SLOWDOWN)
            .expect("the blocking waiter was granted its bytes but never woken");
        let second_got = ready(&mut second).unwrap();
        drop((first, second_got, second));
        assert_full_budget_back(&pool);
    });
}

/// A panicking waker on a waiter that `close` fails: every other waiter still gets `Closed`.
#[test]
fn panicking_waker_during_close_does_not_strand_other_waiters() {
    let pool = pool(BufferSize::S64, 1);
    let held = pool.try_allocate(1).unwrap();
    let wakers: Vec<_> = (0..6).map(|i| TestWaker::new(i == 2)).collect();
    let mut futures: Vec<_> = (0..6).map(|_| Box::pin(pool.allocate(1))).collect();
    for (future, waker) in futures.iter_mut().zip(&wakers) {
        assert!(poll_with(future, &Waker::from(waker.clone())).is_pending());
    }
    let closed = catch_unwind(AssertUnwindSafe(|| pool.close()));
    assert!(closed.is_err());
    assert!(pool.is_closed());
    for (i, waker) in wakers.iter().enumerate() {
        assert_eq!(
            waker.woken(),
            1,
            "waiter {i} was never told the pool closed"
        );
    }
    for future in &mut futures {
        assert_eq!(err(ready(future)), AllocError::Closed);
    }
    drop(futures);
    drop(held);
    assert_idle(&pool);
}

/// A waker whose `clone` panics, when the pool tries to keep it to queue a request: the
/// request does not get queued, and the pool must look exactly as before: no phantom waiter
/// that makes later requests wait (or `try_allocate` refuse) although the bytes are free and
/// nobody waits.
#[test]
fn waker_panicking_on_clone_leaves_the_queue_as_it_was() {
    let pool = pool(BufferSize::S64, 4);
    let held = pool.try_allocate(3).unwrap();
    let bad = clone_panicking_waker();
    let mut request = Box::pin(pool.allocate(2));
    let polled = catch_unwind(AssertUnwindSafe(|| {
        poll_with(&mut request, &bad).is_pending()
    }));
    assert!(polled.is_err(), "the clone's panic surfaces in poll");
    drop(request);
    let stats = pool.stats();
    assert_eq!((stats.waiting, stats.in_use_bytes), (0, 3 * BUF));
    // One buffer is free and nobody waits: a request for it is served at once...
    let mut fits = Box::pin(pool.allocate(1));
    let one = match poll_with(&mut fits, Waker::noop()) {
        Poll::Ready(result) => result.unwrap(),
        Poll::Pending => panic!(
            "allocate(1) was queued although one buffer is free and nobody waits \
             (stats: {}); it would wait for a release that may never come",
            pool.stats()
        ),
    };
    drop((one, fits));
    // ...and so is a try.
    let one = pool
        .try_allocate(1)
        .expect("nobody waits and one buffer is free, yet try_allocate refused");
    drop((one, held));
    assert_full_budget_back(&pool);
}

/// A waker whose `clone` panics on a re-poll of a request already queued: the request stays
/// queued with its old waker and is served normally.
#[test]
fn waker_panicking_on_clone_at_re_poll_keeps_the_request_queued() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let good = TestWaker::new(false);
    let mut request = Box::pin(pool.allocate(1));
    assert!(poll_with(&mut request, &Waker::from(good.clone())).is_pending());
    let bad = clone_panicking_waker();
    let polled = catch_unwind(AssertUnwindSafe(|| {
        poll_with(&mut request, &bad).is_pending()
    }));
    // Either the pool kept the old waker without cloning (no panic) or the panic surfaced;
    // either way the request is still queued.
    if let Ok(pending) = polled {
        assert!(pending);
    }
    assert_eq!(pool.stats().waiting, 1);
    drop(held);
    assert!(good.woken() == 1 || polled.is_ok());
    let got = ready(&mut request).unwrap();
    drop((got, request));
    assert_full_budget_back(&pool);
}

/// Panicking wakers mixed into a busy queue, many times: the pool ends consistent.
#[test]
fn panicking_wakers_under_load_leave_the_pool_consistent() {
    watchdog(30, || {
        let pool = shared_pool(2);
        for round in 0..rounds(200, 4) {
            let held = pool.try_allocate(2).unwrap();
            let bad = TestWaker::new(true);
            let mut bad_request = Box::pin(pool.allocate(1));
            assert!(poll_with(&mut bad_request, &Waker::from(bad)).is_pending());
            let good = thread::spawn({
                let pool = pool.clone();
                move || pool.allocate_timeout(1, Duration::from_secs(10)).unwrap()
            });
            wait_waiting(&pool, 2);
            let _ = catch_unwind(AssertUnwindSafe(|| drop(held)));
            let got = good.join().unwrap();
            if round % 2 == 0 {
                drop(ready(&mut bad_request).unwrap());
            }
            drop(bad_request);
            drop(got);
            assert_idle(&pool);
        }
        assert_full_budget_back(&pool);
    });
}
