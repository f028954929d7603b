//! The blocking shim and the waits a caller owns or polls, tried as a demanding new user
//! would: deadlines that fire as the grant arrives, every wait form in one FIFO queue,
//! shutdown with timeouts, the drop barrier with threads and tasks mixed, wakers that
//! panic or block on the pool inside `wake`. Budget back exactly at every quiescent point.

mod common;

use std::any::Any;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::thread;
use std::time::{Duration, Instant};

use common::{Rng, SLOWDOWN, assert_full_budget_back, assert_idle, rounds, wait_waiting, watchdog};
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize, PollAllocate};

const BS: BufferSize = BufferSize::S64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BS,
        max_memory: 64 * buffers,
    }
}

fn pool(buffers: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(cfg(buffers)))
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic>".to_string()
    }
}

/// Silences the panics these tests cause on purpose (their message says "on purpose").
fn quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !message(info.payload()).contains("on purpose") {
                previous(info);
            }
        }));
    });
}

fn watched<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    quiet();
    watchdog(secs, f)
}

/// Runs `f`, returning the message of its panic if it panicked.
fn caught<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| message(&*p))
}

// ---------------------------------------------------------------------------------------
// A hostile waker: counts its wakes, may panic in wake, clone or drop, may run an action.

#[derive(Default)]
struct Hostile {
    wakes: AtomicUsize,
    panic_wake: AtomicBool,
    panic_clone: AtomicBool,
    panic_drop: AtomicBool,
    /// Something the waker owns, dropped with its last reference.
    keep: Mutex<Option<membudget::BufPoolAllocation>>,
    #[allow(clippy::type_complexity)]
    on_wake: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(h_clone, h_wake, h_wake_by_ref, h_drop);

unsafe fn h_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` came from `Arc::into_raw` of a `Hostile`.
    let hostile = unsafe { &*(data as *const Hostile) };
    if hostile.panic_clone.load(SeqCst) {
        panic!("hostile clone on purpose");
    }
    // SAFETY: as above; one more strong count for the clone.
    unsafe { Arc::increment_strong_count(data as *const Hostile) };
    RawWaker::new(data, &VTABLE)
}

unsafe fn h_wake(data: *const ()) {
    // SAFETY: the waker's own count, consumed here.
    let hostile = unsafe { Arc::from_raw(data as *const Hostile) };
    woken(&hostile);
}

unsafe fn h_wake_by_ref(data: *const ()) {
    // SAFETY: borrowed for the call.
    let hostile = unsafe { &*(data as *const Hostile) };
    woken(hostile);
}

unsafe fn h_drop(data: *const ()) {
    // SAFETY: the waker's own count, consumed here.
    let hostile = unsafe { Arc::from_raw(data as *const Hostile) };
    if hostile.panic_drop.load(SeqCst) {
        panic!("hostile drop on purpose");
    }
}

fn woken(hostile: &Hostile) {
    hostile.wakes.fetch_add(1, SeqCst);
    let action = hostile.on_wake.lock().unwrap().take();
    if let Some(action) = action {
        action();
    }
    if hostile.panic_wake.load(SeqCst) {
        panic!("hostile wake on purpose");
    }
}

fn hostile() -> (Waker, Arc<Hostile>) {
    let hostile = Arc::new(Hostile::default());
    let raw = RawWaker::new(Arc::into_raw(Arc::clone(&hostile)) as *const (), &VTABLE);
    // SAFETY: the vtable keeps the `RawWaker` contract (an `Arc` count per waker).
    (unsafe { Waker::from_raw(raw) }, hostile)
}

fn poll<F: Future + ?Sized>(future: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(waker))
}

/// The pool is quiescent, nothing is held, nobody waits, and the whole budget can be taken.
#[track_caller]
fn whole(pool: &BufPool) {
    assert_idle(pool);
    assert_full_budget_back(pool);
}

// ---------------------------------------------------------------------------------------
// Deadlines.

/// A deadline that fires just as the grant arrives: whatever the outcome, the grant's bytes
/// are never lost, `TimedOut` results are counted exactly once each in `stats().timed_out`,
/// and an `Ok` is a real allocation of the size asked.
#[test]
fn timeout_firing_as_the_grant_arrives_loses_no_bytes() {
    watched(60, || {
        let pool = pool(2);
        let mut rng = Rng::new(7);
        let mut timed_out = 0;
        for round in 0..rounds(1500, 20) {
            let holder = pool.try_allocate(2).unwrap();
            let n = 1 + round % 2;
            let timeout = Duration::from_micros(rng.range(0, 120) as u64);
            let kind = round % 3;
            let waiter = thread::spawn({
                let pool = Arc::clone(&pool);
                move || match kind {
                    0 => pool
                        .allocate_timeout(n, timeout)
                        .map(|a| a.allocated_bytes()),
                    1 => pool
                        .allocate_zeroed_timeout(n, timeout)
                        .map(|a| a.allocated_bytes()),
                    _ => pool.reserve_timeout(64 * n, timeout).map(|r| r.size()),
                }
            });
            let spin_until = Instant::now() + Duration::from_micros(rng.range(0, 150) as u64);
            while Instant::now() < spin_until {
                std::hint::spin_loop();
            }
            drop(holder);
            match waiter.join().unwrap() {
                Ok(bytes) => assert_eq!(bytes, 64 * n),
                Err(AllocError::TimedOut) => timed_out += 1,
                Err(other) => panic!("round {round}: unexpected {other:?}"),
            }
            let stats = pool.stats();
            assert_eq!(
                (stats.in_use_bytes, stats.waiting, stats.outstanding),
                (0, 0, 0),
                "round {round}: {stats}"
            );
            assert_eq!(stats.timed_out, timed_out, "round {round}: {stats}");
        }
        whole(&pool);
    });
}

/// `Duration::ZERO` takes free budget at once, never waits, and never barges past a waiter
/// (README table: "`Duration::ZERO`: takes free budget, else `TimedOut` at once"; guarantee
/// 5: a newcomer does not take budget ahead of a waiter).
#[test]
fn zero_timeout_takes_free_budget_but_never_barges() {
    watched(20, || {
        let pool = pool(4);
        // Free budget, nobody waiting: Ok at once.
        let a = pool.allocate_timeout(1, Duration::ZERO).unwrap();
        let r = pool.reserve_timeout(64, Duration::ZERO).unwrap();
        // Two buffers free, a waiter for three queued: a newcomer for one times out.
        let (waker, hostile) = hostile();
        let mut head = pin!(pool.allocate(3));
        assert!(poll(head.as_mut(), &waker).is_pending());
        assert_eq!(pool.stats().waiting, 1);
        let started = Instant::now();
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
        assert!(started.elapsed() < Duration::from_secs(1) * SLOWDOWN);
        let stats = pool.stats();
        assert_eq!(
            (stats.timed_out, stats.waiting, stats.in_use_bytes),
            (3, 1, 128)
        );
        // The head was not woken by the newcomers' comings and goings, and is served in full.
        drop((a, r));
        assert!(hostile.wakes.load(SeqCst) >= 1);
        let Poll::Ready(Ok(got)) = poll(head.as_mut(), &waker) else {
            panic!("the head was not served")
        };
        assert_eq!(got.length(), 3);
        drop(got);
        whole(&pool);
    });
}

/// `Duration::MAX` (and a timeout too large to add to the clock) waits without a deadline
/// ("A `timeout` too large to add to the clock waits without a deadline").
#[test]
fn huge_timeouts_wait_for_the_release() {
    watched(20, || {
        for timeout in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::from_secs(1 << 40),
        ] {
            let pool = pool(1);
            let holder = pool.try_allocate(1).unwrap();
            let waiter = thread::spawn({
                let pool = Arc::clone(&pool);
                move || pool.allocate_timeout(1, timeout).map(|a| a.length())
            });
            wait_waiting(&pool, 1);
            thread::sleep(Duration::from_millis(20));
            drop(holder);
            assert_eq!(waiter.join().unwrap(), Ok(1), "{timeout:?}");
            whole(&pool);
        }
    });
}

/// A child's timed request that waits in its parent's queue gives back every level when it
/// times out, and is counted by the pool the call was made to (`PoolStats::timed_out`:
/// "counted by the pool the call was made to").
#[test]
fn child_timeout_waiting_at_the_parent_gives_back_every_level() {
    watched(20, || {
        let root = pool(4);
        let child = Arc::new(root.child("child", cfg(3)).unwrap());
        let grandchild = Arc::new(child.child("grandchild", cfg(2)).unwrap());
        let root_hold = root.try_allocate(3).unwrap();
        // Needs two buffers: free at the grandchild and the child, short at the root.
        let started = Instant::now();
        assert_eq!(
            grandchild
                .allocate_timeout(2, Duration::from_millis(30))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(
            grandchild
                .reserve_timeout(128, Duration::from_millis(10))
                .unwrap_err(),
            AllocError::TimedOut
        );
        for (name, p, in_use, timed_out) in [
            ("root", &root, 192, 0),
            ("child", &child, 0, 0),
            ("grandchild", &grandchild, 0, 2),
        ] {
            let stats = p.stats();
            assert_eq!(
                (stats.in_use_bytes, stats.waiting, stats.timed_out),
                (in_use, 0, timed_out),
                "{name}: {stats}"
            );
        }
        drop(root_hold);
        let got = grandchild.allocate_timeout(2, Duration::ZERO).unwrap();
        drop(got);
        whole(&grandchild);
        whole(&child);
        whole(&root);
    });
}

// ---------------------------------------------------------------------------------------
// FIFO across every wait form.

#[derive(Clone, Copy, Debug)]
enum Form {
    Blocking,
    BlockingZeroed,
    Timeout,
    Async,
    Owned,
    Poller,
    ReserveBlocking,
    ReserveTimeout,
    ReserveAsync,
    ReserveOwned,
}

const FORMS: [Form; 10] = [
    Form::Blocking,
    Form::Async,
    Form::Timeout,
    Form::Owned,
    Form::ReserveBlocking,
    Form::Poller,
    Form::ReserveAsync,
    Form::BlockingZeroed,
    Form::ReserveOwned,
    Form::ReserveTimeout,
];

/// Async and blocking callers wait in one queue, whatever the form of the call (guarantee
/// 5; README "Waits you can own, poll or bound"; guarantee 12: reservations wait in the
/// same FIFO): queued in a known order behind a holder of the whole budget, each is served
/// in turn.
#[test]
fn fifo_across_every_wait_form() {
    watched(30, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pool = pool(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let holder = pool.try_allocate(1).unwrap();
        let mut threads = Vec::new();
        let mut tasks = Vec::new();
        for (i, form) in FORMS.iter().copied().enumerate() {
            let p = Arc::clone(&pool);
            let order = Arc::clone(&order);
            let record = move |ok: bool| {
                assert!(ok, "{form:?} failed");
                order.lock().unwrap().push(i);
            };
            match form {
                Form::Blocking => threads.push(thread::spawn(move || {
                    let a = p.allocate_blocking(1);
                    record(a.is_ok());
                })),
                Form::BlockingZeroed => threads.push(thread::spawn(move || {
                    let a = p.allocate_zeroed_blocking(1);
                    record(a.is_ok());
                })),
                Form::Timeout => threads.push(thread::spawn(move || {
                    let a = p.allocate_timeout(1, Duration::from_secs(60));
                    record(a.is_ok());
                })),
                Form::ReserveBlocking => threads.push(thread::spawn(move || {
                    let r = p.reserve_blocking(64);
                    record(r.is_ok());
                })),
                Form::ReserveTimeout => threads.push(thread::spawn(move || {
                    let r = p.reserve_timeout(64, Duration::from_secs(60));
                    record(r.is_ok());
                })),
                Form::Async => tasks.push(runtime.spawn(async move {
                    let a = p.allocate(1).await;
                    record(a.is_ok());
                })),
                Form::Owned => tasks.push(runtime.spawn(async move {
                    let a = p.allocate_owned(1).await;
                    record(a.is_ok());
                })),
                Form::ReserveAsync => tasks.push(runtime.spawn(async move {
                    let r = p.reserve(64).await;
                    record(r.is_ok());
                })),
                Form::ReserveOwned => tasks.push(runtime.spawn(async move {
                    let r = p.reserve_owned(64).await;
                    record(r.is_ok());
                })),
                Form::Poller => tasks.push(runtime.spawn(async move {
                    let mut poller = PollAllocate::new(p);
                    let a = poll_fn(|cx| poller.poll_allocate(cx, 1)).await;
                    record(a.is_ok());
                })),
            }
            wait_waiting(&pool, i + 1);
        }
        drop(holder);
        for t in threads {
            t.join().unwrap();
        }
        runtime.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert_eq!(*order.lock().unwrap(), (0..FORMS.len()).collect::<Vec<_>>());
        whole(&pool);
    });
}

// ---------------------------------------------------------------------------------------
// Shutdown with timeouts.

/// `shutdown_timeout` with a waiter whose waker panics: "Panics: Only with the panic of user
/// code the close ran (a waiter's waker, a reclaimer's drop), once the wait is over." The
/// wait still happens (the pool drains first), the pool is closed and the books exact.
#[test]
fn shutdown_timeout_passes_a_wakers_panic_on_only_after_the_wait() {
    watched(20, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let (waker, hostile) = hostile();
        hostile.panic_wake.store(true, SeqCst);
        let mut waiter = Box::pin(pool.allocate(1));
        assert!(poll(waiter.as_mut(), &waker).is_pending());
        let released = Arc::new(AtomicBool::new(false));
        let releaser = thread::spawn({
            let released = Arc::clone(&released);
            move || {
                thread::sleep(Duration::from_millis(50));
                released.store(true, SeqCst);
                drop(held);
            }
        });
        let outcome = caught(|| pool.shutdown_timeout(Duration::from_secs(10)));
        let err = outcome.expect_err("the waker's panic is passed on");
        assert!(err.contains("on purpose"), "{err}");
        assert!(
            released.load(SeqCst),
            "the panic went on before the wait was over"
        );
        assert_eq!(hostile.wakes.load(SeqCst), 1);
        assert!(matches!(
            poll(waiter.as_mut(), &waker),
            Poll::Ready(Err(AllocError::Closed))
        ));
        drop(waiter);
        releaser.join().unwrap();
        let stats = pool.stats();
        assert!(stats.closed && stats.is_drained(), "{stats}");
        assert_eq!((stats.in_use_bytes, stats.waiting), (0, 0));
    });
}

/// Many threads in `shutdown_timeout` at once (and the async form beside them) while the
/// allocations come back on other threads: each returns, the ones with a long timeout
/// drained, each with the books exact.
#[test]
fn concurrent_shutdown_timeouts_all_return_drained() {
    watched(30, || {
        let pool = pool(8);
        let allocations: Vec<_> = (0..8).map(|_| pool.try_allocate(1).unwrap()).collect();
        let mut shutdowns = Vec::new();
        for i in 0..4 {
            let pool = Arc::clone(&pool);
            shutdowns.push(thread::spawn(move || {
                pool.shutdown_timeout(Duration::from_millis(if i == 0 { 1 } else { 10_000 }))
            }));
        }
        let async_shutdown = thread::spawn({
            let pool = Arc::clone(&pool);
            move || futures::executor::block_on(pool.shutdown_before(std::future::pending::<()>()))
        });
        let releasers: Vec<_> = allocations
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(5 * i as u64));
                    drop(a);
                })
            })
            .collect();
        for (i, s) in shutdowns.into_iter().enumerate() {
            let stats = s.join().unwrap();
            assert!(stats.closed);
            if i > 0 {
                assert!(stats.is_drained(), "{stats}");
                assert_eq!((stats.in_use_bytes, stats.outstanding), (0, 0));
            }
        }
        assert!(async_shutdown.join().unwrap().is_drained());
        for r in releasers {
            r.join().unwrap();
        }
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
        assert_idle(&pool);
    });
}

/// `drained()` futures whose wakers panic (in wake, in clone, in drop) beside a quiet one:
/// the release that drains the pool may pass a panic on, but every listener is woken and
/// sees the pool drained, and the pool's drop returns promptly.
#[test]
fn drained_listeners_with_panicking_wakers_are_all_woken() {
    watched(20, || {
        for which in 0..3 {
            let pool = pool(2);
            let held = pool.try_allocate(2).unwrap();
            let (bad, bad_state) = hostile();
            let (good, good_state) = hostile();
            let mut first = Box::pin(pool.drained());
            let mut second = Box::pin(pool.drained());
            let mut third = Box::pin(pool.drained());
            match which {
                0 => bad_state.panic_wake.store(true, SeqCst),
                1 => bad_state.panic_drop.store(true, SeqCst),
                _ => {}
            }
            assert!(poll(first.as_mut(), &bad).is_pending());
            assert!(poll(second.as_mut(), &good).is_pending());
            if which == 2 {
                bad_state.panic_clone.store(true, SeqCst);
                // A clone that panics as the listener registers: the panic is the poller's.
                let registered = caught(|| poll(third.as_mut(), &bad).is_pending());
                bad_state.panic_clone.store(false, SeqCst);
                if let Ok(pending) = registered {
                    assert!(pending);
                }
            } else {
                assert!(poll(third.as_mut(), &good).is_pending());
            }
            let released = caught(move || drop(held));
            if which == 2 {
                assert!(released.is_ok(), "{released:?}");
            }
            assert!(good_state.wakes.load(SeqCst) >= 1, "case {which}");
            let noop = Waker::noop();
            for f in [&mut first, &mut second, &mut third] {
                assert!(poll(f.as_mut(), noop).is_ready(), "case {which}");
            }
            bad_state.panic_drop.store(false, SeqCst);
            drop((first, second, third, bad, good));
            whole(&pool);
            let pool = Arc::into_inner(pool).unwrap();
            let started = Instant::now();
            drop(pool);
            assert!(started.elapsed() < Duration::from_secs(2) * SLOWDOWN);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Wakers that block on the pool inside `wake`.

/// A waker whose `wake` makes a timed blocking call on the same pool, on the releasing
/// thread, while the release is still settling: the nested wait runs after the release's
/// bookkeeping (guarantee 9), queues behind the woken waiter (FIFO), times out, and costs
/// nothing; the woken waiter gets its grant.
#[test]
fn waker_making_a_timed_blocking_call_on_the_pool_inside_wake() {
    watched(20, || {
        let pool = pool(3);
        let held = pool.try_allocate(3).unwrap();
        let (waker, hostile) = hostile();
        let nested = Arc::new(Mutex::new(None));
        *hostile.on_wake.lock().unwrap() = Some(Box::new({
            let pool = Arc::clone(&pool);
            let nested = Arc::clone(&nested);
            move || {
                // Two buffers: one is free after the waiter's grant, so it must wait, and
                // nobody releases while this thread is here.
                let got = pool.allocate_timeout(2, Duration::from_millis(20));
                *nested.lock().unwrap() = Some(got.map(|a| a.length()));
            }
        }));
        let mut waiter = pin!(pool.allocate(2));
        assert!(poll(waiter.as_mut(), &waker).is_pending());
        drop(held);
        assert_eq!(hostile.wakes.load(SeqCst), 1);
        assert_eq!(
            nested.lock().unwrap().take(),
            Some(Err(AllocError::TimedOut))
        );
        let Poll::Ready(Ok(got)) = poll(waiter.as_mut(), &waker) else {
            panic!("the woken waiter lost its grant")
        };
        assert_eq!(got.length(), 2);
        assert_eq!(pool.stats().timed_out, 1);
        drop(got);
        whole(&pool);
    });
}

/// A waker whose `wake` makes an untimed blocking call on the pool that another thread's
/// release serves: the releasing thread blocks inside `wake` until then, and everything
/// ends exact (a nested blocking wait on a thread the pool just released on).
#[test]
fn waker_blocking_inside_wake_until_another_thread_releases() {
    watched(20, || {
        let pool = pool(2);
        let first = pool.try_allocate(1).unwrap();
        let second = pool.try_allocate(1).unwrap();
        let (waker, hostile) = hostile();
        let nested = Arc::new(Mutex::new(None));
        let other = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            drop(second);
        });
        *hostile.on_wake.lock().unwrap() = Some(Box::new({
            let pool = Arc::clone(&pool);
            let nested = Arc::clone(&nested);
            move || {
                let got = pool.allocate_blocking(1);
                *nested.lock().unwrap() = Some(got.map(|a| a.length()));
            }
        }));
        let mut waiter = pin!(pool.allocate(1));
        assert!(poll(waiter.as_mut(), &waker).is_pending());
        drop(first); // grants the waiter; its waker blocks until `second` is dropped
        assert_eq!(nested.lock().unwrap().take(), Some(Ok(1)));
        let Poll::Ready(Ok(got)) = poll(waiter.as_mut(), &waker) else {
            panic!("the woken waiter lost its grant")
        };
        drop(got);
        other.join().unwrap();
        whole(&pool);
    });
}

// ---------------------------------------------------------------------------------------
// The drop barrier with blocking threads and tasks mixed.

/// The root dropped (on its own thread) while a child's blocking and timed waiters wait in
/// the root's queue: they fail with `Closed` ("a child's waiters fail wherever they
/// wait"), and the root's drop returns once the one allocation out is back.
#[test]
fn root_dropped_while_a_childs_blocking_waiters_wait_at_it() {
    watched(20, || {
        let root = BufPool::new(cfg(4));
        let child = Arc::new(root.child("child", cfg(4)).unwrap());
        let held = root.try_allocate(4).unwrap();
        let blocking = thread::spawn({
            let child = Arc::clone(&child);
            move || child.allocate_blocking(1).map(|a| a.length())
        });
        wait_waiting(&root, 1);
        let timed = thread::spawn({
            let child = Arc::clone(&child);
            move || {
                child
                    .allocate_timeout(2, Duration::from_secs(30))
                    .map(|a| a.length())
            }
        });
        wait_waiting(&root, 2);
        let dropped = Arc::new(AtomicBool::new(false));
        let dropper = thread::spawn({
            let dropped = Arc::clone(&dropped);
            move || {
                drop(root);
                dropped.store(true, SeqCst);
            }
        });
        assert_eq!(blocking.join().unwrap(), Err(AllocError::Closed));
        assert_eq!(timed.join().unwrap(), Err(AllocError::Closed));
        thread::sleep(Duration::from_millis(30));
        assert!(
            !dropped.load(SeqCst),
            "the drop did not wait for the allocation"
        );
        drop(held);
        dropper.join().unwrap();
        assert!(child.is_closed());
        assert_eq!(child.try_allocate(1).unwrap_err(), AllocError::Closed);
        assert_idle(&child);
    });
}

/// The last owned allocation dropped on a blocking thread runs the pool's drop there
/// (README: "the pool's drop (its barrier) runs when the last one is given back"), which
/// waits for a plain allocation another thread still holds, and then returns. Before that,
/// a handle held by a blocking waiter keeps the pool open and the waiter is served.
#[test]
fn last_owned_allocation_dropped_on_a_thread_runs_the_barrier_there() {
    watched(20, || {
        // Stage 1: a blocking waiter's handle outlives the owned allocation.
        let pool = pool(3);
        let owned = futures::executor::block_on(Arc::clone(&pool).allocate_owned(1)).unwrap();
        let plain = pool.try_allocate(1).unwrap();
        let weak = Arc::downgrade(&pool);
        drop(pool);
        let handle = weak.upgrade().expect("the owned allocation keeps the pool");
        let waiter = thread::spawn(move || handle.allocate_blocking(3).map(|a| a.length()));
        thread::sleep(Duration::from_millis(20));
        thread::spawn(move || drop(owned)).join().unwrap();
        thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "the waiter did not wait");
        drop(plain);
        assert_eq!(waiter.join().unwrap(), Ok(3));
        assert!(weak.upgrade().is_none(), "the pool was not dropped");

        // Stage 2: the last owned allocation's drop is the barrier.
        let pool = self::pool(3);
        let owned = futures::executor::block_on(Arc::clone(&pool).allocate_owned(1)).unwrap();
        let plain = pool.try_allocate(1).unwrap();
        let weak = Arc::downgrade(&pool);
        drop(pool); // does not block: the owned allocation keeps it
        let plain_back = Arc::new(AtomicBool::new(false));
        let holder = thread::spawn({
            let plain_back = Arc::clone(&plain_back);
            move || {
                thread::sleep(Duration::from_millis(50));
                plain_back.store(true, SeqCst);
                drop(plain);
            }
        });
        let started = Instant::now();
        thread::spawn(move || drop(owned)).join().unwrap();
        assert!(
            plain_back.load(SeqCst),
            "the barrier returned before the plain allocation"
        );
        assert!(started.elapsed() >= Duration::from_millis(40));
        assert!(weak.upgrade().is_none());
        holder.join().unwrap();
    });
}

/// The pool dropped while allocations are spread over blocking threads and tasks (plain,
/// frozen into `Bytes`, owned) that give them back at random times: the drop returns only
/// after every one is back, and never before.
#[test]
#[cfg(feature = "bytes")]
fn drop_barrier_waits_for_threads_and_tasks_mixed() {
    watched(30, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut rng = Rng::new(11);
        for round in 0..rounds(20, 2) {
            let pool = pool(16);
            let back = Arc::new(AtomicUsize::new(0));
            let mut threads = Vec::new();
            let mut total = 0;
            for i in 0..12 {
                let delay = Duration::from_micros(rng.range(0, 3000) as u64);
                let back = Arc::clone(&back);
                let allocation = if round % 2 == 1 && i % 3 == 0 {
                    runtime
                        .block_on(Arc::clone(&pool).allocate_owned(1))
                        .unwrap()
                } else {
                    pool.try_allocate(1).unwrap()
                };
                total += 1;
                match i % 3 {
                    0 => threads.push(thread::spawn(move || {
                        thread::sleep(delay);
                        back.fetch_add(1, SeqCst);
                        drop(allocation);
                    })),
                    1 => {
                        runtime.spawn(async move {
                            tokio::time::sleep(delay).await;
                            back.fetch_add(1, SeqCst);
                            drop(allocation);
                        });
                    }
                    _ => {
                        let mut filled = allocation.into_filled();
                        bytes::BufMut::put_slice(&mut filled, &[7; 8]);
                        let bytes = filled.freeze();
                        let slice = bytes.slice(0..1);
                        runtime.spawn(async move {
                            tokio::time::sleep(delay).await;
                            drop(bytes);
                            tokio::time::sleep(delay).await;
                            back.fetch_add(1, SeqCst);
                            drop(slice);
                        });
                    }
                }
            }
            // Dropping our handle: owned allocations may keep the pool, so the last
            // release runs the barrier; either way every allocation is back by then.
            let weak = Arc::downgrade(&pool);
            if let Some(pool) = Arc::into_inner(pool) {
                drop(pool);
                assert_eq!(
                    back.load(SeqCst),
                    total,
                    "round {round}: drop returned early"
                );
            }
            // Otherwise the last owned allocation's release runs the barrier (the strong count
            // reaches zero before the pool's drop runs, so only the end is checked).
            let end = Instant::now() + Duration::from_secs(10);
            while weak.strong_count() > 0 || back.load(SeqCst) < total {
                assert!(
                    Instant::now() < end,
                    "round {round}: pool never dropped: strong {}, back {} of {total}",
                    weak.strong_count(),
                    back.load(SeqCst)
                );
                thread::sleep(Duration::from_millis(1));
            }
            for t in threads {
                t.join().unwrap();
            }
        }
    });
}

/// An owned allocation that is the pool's last handle, given back through each of its
/// forms (as it is, `into_filled`, `freeze`, a slice of the frozen bytes outliving them),
/// after the plain allocations are back: its drop runs the pool's drop, which returns at
/// once (`allocate_owned`'s doc: "the pool's drop (its barrier) then runs when the last
/// owned allocation is given back (through `into_filled` and `freeze` too)").
#[test]
#[cfg(feature = "bytes")]
fn last_owned_allocation_in_every_form_drops_the_pool_at_once() {
    watched(5, || {
        for kind in 0..4 {
            let pool = pool(4);
            let weak = Arc::downgrade(&pool);
            let a = futures::executor::block_on(Arc::clone(&pool).allocate_owned(1)).unwrap();
            let plain = pool.try_allocate(1).unwrap();
            drop(pool);
            drop(plain);
            match kind {
                0 => drop(a),
                1 => drop(a.into_filled()),
                2 => {
                    let mut f = a.into_filled();
                    bytes::BufMut::put_slice(&mut f, &[1; 8]);
                    drop(f.freeze());
                }
                _ => {
                    let mut f = a.into_filled();
                    bytes::BufMut::put_slice(&mut f, &[1; 8]);
                    let b = f.freeze();
                    let s = b.slice(0..1);
                    drop(b);
                    assert!(weak.upgrade().is_some(), "the slice keeps the pool");
                    drop(s);
                }
            }
            assert!(weak.upgrade().is_none(), "kind {kind}: the pool lives on");
        }
    });
}

/// A child's timed blocking request that waited in its own queue, then finds the root's
/// queue full (`max_waiters`), waits for a place (README: "A child pool's request that
/// already waited in a queue below and then finds this queue full is not refused: it keeps
/// what it holds and waits for a place"); when its deadline passes there it fails with
/// `TimedOut` and gives back the child's level; in the other case a place comes, and it is
/// served after the root's head.
#[test]
fn child_timed_request_waiting_for_a_place_in_a_full_root_queue() {
    watched(20, || {
        for place_comes in [false, true] {
            let root = Arc::new(BufPool::builder(cfg(4)).max_waiters(1).build().unwrap());
            let child = Arc::new(root.child("child", cfg(2)).unwrap());
            let child_hold = child.try_allocate(2).unwrap();
            let root_hold = root.try_allocate(2).unwrap();
            let (waker, _) = hostile();
            // Three buffers: still short once the child's two come back.
            let mut root_head = Box::pin(root.allocate(3));
            assert!(poll(root_head.as_mut(), &waker).is_pending());
            let timeout = if place_comes { 10_000 } else { 300 };
            let timed = thread::spawn({
                let child = Arc::clone(&child);
                move || {
                    child
                        .allocate_timeout(1, Duration::from_millis(timeout))
                        .map(|a| a.length())
                }
            });
            wait_waiting(&child, 1);
            drop(child_hold); // the child's level is granted; the root's queue is full
            common::wait_until(10, "the child's waiter leaves the child's queue", || {
                child.stats().waiting == 0
            });
            assert_eq!(root.stats().waiting, 1);
            assert_eq!(child.stats().in_use_bytes, 64, "{}", child.stats());
            thread::sleep(Duration::from_millis(20));
            assert!(!timed.is_finished(), "it did not wait for a place");
            if place_comes {
                drop(root_head); // a place in the root's queue, and room: served
                assert_eq!(timed.join().unwrap(), Ok(1));
                drop(root_hold);
            } else {
                assert_eq!(timed.join().unwrap(), Err(AllocError::TimedOut));
                assert_eq!(child.stats().timed_out, 1);
                assert_eq!(child.stats().in_use_bytes, 0, "{}", child.stats());
                assert_eq!(root.stats().queue_full, 0, "{}", root.stats());
                drop(root_hold);
                let Poll::Ready(Ok(got)) = poll(root_head.as_mut(), &waker) else {
                    panic!("the root's head was not served")
                };
                drop(got);
                drop(root_head);
            }
            whole(&child);
            whole(&root);
        }
    });
}

/// A waker whose `wake` shuts the pool down (`shutdown_timeout(ZERO)`) as a release grants
/// its waiter: the close runs after the release's bookkeeping; the granted waiter either
/// takes its grant (a grant counts as taking its bytes) or fails with `Closed`, and
/// nothing is lost either way; the shutdown's report counts the grant in use.
#[test]
fn waker_shutting_the_pool_down_inside_wake() {
    watched(20, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let report = Arc::new(Mutex::new(None));
        let (waker, hostile) = hostile();
        *hostile.on_wake.lock().unwrap() = Some(Box::new({
            let pool = Arc::clone(&pool);
            let report = Arc::clone(&report);
            move || *report.lock().unwrap() = Some(pool.shutdown_timeout(Duration::ZERO))
        }));
        let mut waiter = pin!(pool.allocate(1));
        let (behind_waker, behind) = self::hostile();
        let mut behind_waiter = pin!(pool.allocate(2));
        assert!(poll(waiter.as_mut(), &waker).is_pending());
        assert!(poll(behind_waiter.as_mut(), &behind_waker).is_pending());
        drop(held);
        let report = report.lock().unwrap().take().expect("the waker ran");
        assert!(report.closed);
        assert_eq!(behind.wakes.load(SeqCst), 1, "close wakes every waiter");
        assert!(matches!(
            poll(behind_waiter.as_mut(), &behind_waker),
            Poll::Ready(Err(AllocError::Closed))
        ));
        match poll(waiter.as_mut(), &waker) {
            Poll::Ready(Ok(got)) => {
                assert_eq!(report.in_use_bytes, 64, "{report}");
                drop(got);
            }
            Poll::Ready(Err(AllocError::Closed)) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert_idle(&pool);
        assert!(pool.shutdown_timeout(Duration::ZERO).is_drained());
    });
}

/// A pool grown by a controller (`wait_for_growth`, budget 0): timed blocking waiters
/// race `add_max_memory` from another thread; whether the growth or the deadline wins,
/// no byte is lost, and giving the growth back (`forget_max_memory`) leaves the pool at 0.
#[test]
fn timed_waiters_racing_growth_lose_nothing() {
    watched(30, || {
        let pool = Arc::new(
            BufPool::builder(BufPoolCfg {
                buffer_size: BS,
                max_memory: 0,
            })
            .wait_for_growth()
            .build()
            .unwrap(),
        );
        let mut rng = Rng::new(5);
        let mut timed_out = 0;
        for round in 0..rounds(800, 10) {
            let timeout = Duration::from_micros(rng.range(0, 100) as u64);
            let waiter = thread::spawn({
                let pool = Arc::clone(&pool);
                move || pool.allocate_timeout(1, timeout)
            });
            let spin_until = Instant::now() + Duration::from_micros(rng.range(0, 120) as u64);
            while Instant::now() < spin_until {
                std::hint::spin_loop();
            }
            pool.add_max_memory(64);
            match waiter.join().unwrap() {
                Ok(a) => assert_eq!(a.length(), 1),
                Err(AllocError::TimedOut) => timed_out += 1,
                Err(other) => panic!("round {round}: {other:?}"),
            }
            let stats = pool.stats();
            assert_eq!(
                (
                    stats.in_use_bytes,
                    stats.waiting,
                    stats.max_memory,
                    stats.timed_out
                ),
                (0, 0, 64, timed_out),
                "round {round}: {stats}"
            );
            assert_eq!(pool.forget_max_memory(64), 64, "round {round}");
            assert_eq!(pool.stats().max_memory, 0);
        }
        pool.add_max_memory(64 * 2);
        whole(&pool);
    });
}

// ---------------------------------------------------------------------------------------
// Everything at once.

/// A held thing of the stress below (held only to be dropped).
#[allow(dead_code)]
enum Held {
    Allocation(membudget::BufPoolAllocation),
    Reservation(membudget::Reservation),
}

/// A hand-polled owned wait of the stress below.
enum Wait {
    Owned(Pin<Box<membudget::AllocateOwned>>),
    Poller(PollAllocate, usize),
    Reserve(Pin<Box<membudget::ReserveOwned>>),
}

/// Blocking, timed, async-owned, poll-style and reservation waits on a root and its child
/// at once, the hand-polled ones with wakers that panic at random in wake, clone or drop,
/// cancelled at random points (a poller also by changing its `n`): whatever panics where,
/// once everything is dropped both pools are idle with their whole budget back and drop
/// promptly (guarantees 6, 9, 11).
#[test]
fn stress_every_wait_form_with_hostile_wakers_and_cancels() {
    watched(40, || {
        let root = pool(8);
        let child = Arc::new(root.child("child", cfg(6)).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let mut blocking = Vec::new();
        for t in 0..2u64 {
            let pools = [Arc::clone(&root), Arc::clone(&child)];
            let stop = Arc::clone(&stop);
            blocking.push(thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                let mut outcomes = [0usize; 3];
                while !stop.load(SeqCst) {
                    let p = &pools[rng.range(0, 1)];
                    let n = rng.range(1, 4);
                    let result = caught(|| match rng.range(0, 4) {
                        0 => p.allocate_blocking(n).map(Held::Allocation),
                        1 => p
                            .allocate_timeout(n, Duration::from_micros(rng.range(0, 300) as u64))
                            .map(Held::Allocation),
                        2 => p
                            .reserve_timeout(
                                64 * n,
                                Duration::from_micros(rng.range(0, 300) as u64),
                            )
                            .map(Held::Reservation),
                        _ => p.try_allocate(n).map(Held::Allocation),
                    });
                    match result {
                        Ok(Ok(held)) => {
                            outcomes[0] += 1;
                            if rng.range(0, 4) == 0 {
                                thread::yield_now();
                            }
                            let _ = caught(move || drop(held));
                        }
                        Ok(Err(_)) => outcomes[1] += 1,
                        Err(_) => outcomes[2] += 1,
                    }
                }
                outcomes
            }));
        }
        let mut rng = Rng::new(3);
        let mut waits: Vec<(Wait, Waker, Arc<Hostile>)> = Vec::new();
        let mut held: Vec<Held> = Vec::new();
        let end = Instant::now() + Duration::from_millis(if cfg!(miri) { 200 } else { 1500 });
        let mut steps = 0;
        let (mut pending, mut panics) = (0, 0);
        while Instant::now() < end || steps < rounds(0, 80) {
            steps += 1;
            let p = if rng.range(0, 2) == 0 { &root } else { &child };
            match rng.range(0, 6) {
                0 if waits.len() < 6 => {
                    let (waker, state) = hostile();
                    let n = rng.range(1, 4);
                    let wait = match rng.range(0, 3) {
                        0 => Wait::Owned(Box::pin(Arc::clone(p).allocate_owned(n))),
                        1 => Wait::Poller(PollAllocate::new(Arc::clone(p)), n),
                        _ => Wait::Reserve(Box::pin(Arc::clone(p).reserve_owned(64 * n))),
                    };
                    // Armed at random: wake, clone, drop.
                    state.panic_wake.store(rng.range(0, 4) == 0, SeqCst);
                    state.panic_clone.store(rng.range(0, 8) == 0, SeqCst);
                    state.panic_drop.store(rng.range(0, 8) == 0, SeqCst);
                    waits.push((wait, waker, state));
                }
                1 | 2 if !waits.is_empty() => {
                    let i = rng.range(0, waits.len() - 1);
                    let change_n = rng.range(0, 5) == 0;
                    let (wait, waker, _) = &mut waits[i];
                    let polled = caught(|| match wait {
                        Wait::Owned(f) => match poll(f.as_mut(), waker) {
                            Poll::Ready(r) => Some(r.map(Held::Allocation).ok()),
                            Poll::Pending => None,
                        },
                        Wait::Poller(poller, n) => {
                            if change_n {
                                *n = 1 + *n % 3;
                            }
                            let mut cx = Context::from_waker(waker);
                            match poller.poll_allocate(&mut cx, *n) {
                                Poll::Ready(r) => Some(r.map(Held::Allocation).ok()),
                                Poll::Pending => None,
                            }
                        }
                        Wait::Reserve(f) => match poll(f.as_mut(), waker) {
                            Poll::Ready(r) => Some(r.map(Held::Reservation).ok()),
                            Poll::Pending => None,
                        },
                    });
                    match &polled {
                        Err(_) => panics += 1,
                        Ok(None) => pending += 1,
                        Ok(Some(_)) => {}
                    }
                    if let Ok(Some(result)) = polled {
                        held.extend(result);
                        let (wait, waker, state) = waits.swap_remove(i);
                        let _ = caught(move || drop(wait));
                        let _ = caught(move || drop(waker));
                        drop(state);
                    }
                }
                3 if !waits.is_empty() => {
                    let (wait, waker, _) = waits.swap_remove(rng.range(0, waits.len() - 1));
                    let _ = caught(move || drop(wait));
                    let _ = caught(move || drop(waker));
                }
                4 if !held.is_empty() => {
                    let h = held.swap_remove(rng.range(0, held.len() - 1));
                    panics += usize::from(caught(move || drop(h)).is_err());
                }
                _ => {
                    if let Ok(a) = p.try_allocate(1) {
                        held.push(Held::Allocation(a));
                    }
                }
            }
        }
        stop.store(true, SeqCst);
        // Let the blocking threads finish: release what this thread holds first.
        for (_, _, state) in &waits {
            state.panic_wake.store(false, SeqCst);
            state.panic_drop.store(false, SeqCst);
            state.panic_clone.store(false, SeqCst);
        }
        for h in held.drain(..) {
            let _ = caught(move || drop(h));
        }
        for (wait, waker, _) in waits.drain(..) {
            let _ = caught(move || drop(wait));
            drop(waker);
        }
        for t in blocking {
            let outcomes = t.join().unwrap();
            assert!(outcomes[0] > 0, "{outcomes:?}");
        }
        assert!(steps > 10);
        assert!(pending > 0, "pending {pending}");
        // Under Miri the few steps may arm no panicking waker.
        assert!(cfg!(miri) || panics > 0, "panics {panics}");
        whole(&child);
        whole(&root);
        let started = Instant::now();
        drop(Arc::into_inner(child).expect("no handle left"));
        drop(Arc::into_inner(root).expect("no handle left"));
        assert!(started.elapsed() < Duration::from_secs(2) * SLOWDOWN);
    });
}

// ---------------------------------------------------------------------------------------
// Cancel at every poll point, for the reservation futures.

/// Where the future under test is dropped.
#[derive(Clone, Copy, Debug)]
enum DropAt {
    /// Never polled.
    Unpolled,
    /// Queued, nothing granted.
    Queued,
    /// Granted (the holder released) but not polled again.
    Granted,
    /// Granted while its waker was woken, and polled with a new waker first.
    GrantedRepolledPending,
}

/// `reserve`, `reserve_owned` and `grow` dropped at every point of their wait, with a
/// waiter queued behind: the reservation futures are cancel safe ("Reservations wait in the
/// same FIFO, are cancel safe (`reserve`, `grow`)"): the waiter behind is served as soon as
/// the budget is free, a grant given up goes on to it at once, and nothing is lost.
#[test]
fn reservation_futures_dropped_at_every_point_lose_nothing() {
    watched(20, || {
        for kind in 0..3 {
            for at in [
                DropAt::Unpolled,
                DropAt::Queued,
                DropAt::Granted,
                DropAt::GrantedRepolledPending,
            ] {
                let pool = pool(2);
                // For `grow`: a reservation of one buffer, grown by one.
                let mut base = pool.try_reserve(if kind == 2 { 64 } else { 0 }).unwrap();
                let holder = pool.try_allocate(if kind == 2 { 1 } else { 2 }).unwrap();
                let (waker, state) = hostile();
                let (behind_waker, behind) = self::hostile();
                let mut future: Pin<Box<dyn Future<Output = Result<(), AllocError>> + Send + '_>> =
                    match kind {
                        0 => Box::pin(async { pool.reserve(128).await.map(drop) }),
                        1 => {
                            Box::pin(async { Arc::clone(&pool).reserve_owned(128).await.map(drop) })
                        }
                        _ => Box::pin(base.grow(64)),
                    };
                let mut behind_future = Box::pin(pool.allocate(1));
                let what = format!("kind {kind}, {at:?}");
                if !matches!(at, DropAt::Unpolled) {
                    assert!(poll(future.as_mut(), &waker).is_pending(), "{what}");
                }
                assert!(
                    poll(behind_future.as_mut(), &behind_waker).is_pending(),
                    "{what}"
                );
                match at {
                    DropAt::Unpolled | DropAt::Queued => {
                        drop(future);
                        assert_eq!(behind.wakes.load(SeqCst), 0, "{what}");
                        drop(holder);
                    }
                    DropAt::Granted => {
                        drop(holder);
                        assert_eq!(state.wakes.load(SeqCst), 1, "{what}");
                        assert_eq!(behind.wakes.load(SeqCst), 0, "{what}: FIFO");
                        drop(future);
                    }
                    DropAt::GrantedRepolledPending => {
                        drop(holder);
                        assert_eq!(state.wakes.load(SeqCst), 1, "{what}");
                        // Polled with another waker: it completes (it was granted).
                        let (other, _) = self::hostile();
                        assert!(
                            matches!(poll(future.as_mut(), &other), Poll::Ready(Ok(()))),
                            "{what}"
                        );
                        drop(future);
                        // The reservation the future made was dropped with it (kinds 0, 1);
                        // a grow's growth stays in `base` until `base` goes.
                        if kind == 2 {
                            assert_eq!(base.size(), 128, "{what}");
                            base.shrink(64);
                        }
                    }
                }
                assert_eq!(
                    behind.wakes.load(SeqCst),
                    1,
                    "{what}: the waiter behind not woken"
                );
                let Poll::Ready(Ok(got)) = poll(behind_future.as_mut(), &behind_waker) else {
                    panic!("{what}: the waiter behind was not served")
                };
                assert_eq!(pool.stats().in_use_bytes, 64 + base.size(), "{what}");
                drop((got, behind_future));
                assert_eq!(base.size(), if kind == 2 { 64 } else { 0 }, "{what}");
                drop(base);
                whole(&pool);
            }
        }
    });
}

/// `drained()` futures dropped after they were notified but before they were polled again
/// do not keep the notification from the others ("Cancel safe: the future only listens").
#[test]
fn drained_dropped_after_its_notification_does_not_steal_it() {
    watched(20, || {
        let pool = pool(2);
        let held = pool.try_allocate(1).unwrap();
        let (a_waker, a) = hostile();
        let (b_waker, b) = self::hostile();
        let (c_waker, c) = self::hostile();
        let mut first = Box::pin(pool.drained());
        let mut second = Box::pin(pool.drained());
        let mut third = Box::pin(pool.drained());
        assert!(poll(first.as_mut(), &a_waker).is_pending());
        assert!(poll(second.as_mut(), &b_waker).is_pending());
        assert!(poll(third.as_mut(), &c_waker).is_pending());
        thread::spawn(move || drop(held)).join().unwrap();
        assert_eq!(
            (
                a.wakes.load(SeqCst),
                b.wakes.load(SeqCst),
                c.wakes.load(SeqCst)
            ),
            (1, 1, 1)
        );
        drop(first);
        assert!(poll(third.as_mut(), &c_waker).is_ready());
        // The pool is used again: a new drained future waits again, the old one stays done.
        let again = pool.try_allocate(2).unwrap();
        let mut fourth = Box::pin(pool.drained());
        let (d_waker, d) = self::hostile();
        assert!(poll(fourth.as_mut(), &d_waker).is_pending());
        drop(again);
        assert_eq!(d.wakes.load(SeqCst), 1);
        assert!(poll(fourth.as_mut(), &d_waker).is_ready());
        assert!(poll(second.as_mut(), &b_waker).is_ready());
        whole(&pool);
    });
}

/// `shutdown().await` with a waiter whose waker panics as the close wakes it: "A panic of
/// the user code that runs (wakers, reclaimers' drops) goes on once the pool is drained."
#[test]
fn async_shutdown_passes_a_wakers_panic_on_only_once_drained() {
    watched(20, || {
        let pool = BufPool::new(cfg(2));
        let held = pool.try_allocate(2).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let outcome = thread::scope(|scope| {
            // `shutdown` takes the pool by value, so the waiter is a child's (owned, no
            // borrow of the pool), queued at the root.
            let child = pool.child("child", cfg(2)).unwrap();
            let child = Arc::new(child);
            let (child_waker, child_state) = self::hostile();
            child_state.panic_wake.store(true, SeqCst);
            let mut child_waiter = Box::pin(Arc::clone(&child).allocate_owned(1));
            assert!(poll(child_waiter.as_mut(), &child_waker).is_pending());
            let releaser = scope.spawn({
                let released = Arc::clone(&released);
                move || {
                    thread::sleep(Duration::from_millis(50));
                    released.store(true, SeqCst);
                    drop(held);
                }
            });
            let outcome = caught(move || futures::executor::block_on(pool.shutdown()));
            releaser.join().unwrap();
            assert_eq!(child_state.wakes.load(SeqCst), 1);
            assert!(matches!(
                poll(child_waiter.as_mut(), &child_waker),
                Poll::Ready(Err(AllocError::Closed))
            ));
            child_state.panic_wake.store(false, SeqCst);
            drop(child_waiter);
            assert_idle(&child);
            outcome
        });
        let err = outcome.expect_err("the waker's panic goes on");
        assert!(err.contains("on purpose"), "{err}");
        assert!(
            released.load(SeqCst),
            "the panic went on before the pool drained"
        );
    });
}

/// `shutdown_timeout` of a root with a floored child alive: the root's close closes the
/// child, whose floor then goes back (guarantee 15: "once the child is closed (its own
/// close, or an ancestor's close or drop) its floor goes back to the ancestors"), so the
/// root drains as soon as the child's allocations are back; a blocking waiter of the child
/// fails with `Closed`.
#[test]
fn shutdown_timeout_of_a_root_with_a_floored_child() {
    watched(20, || {
        for with_allocation in [false, true] {
            let root = pool(4);
            let child = Arc::new(
                BufPool::builder(cfg(3))
                    .name("floored")
                    .min_memory(128)
                    .parent(&root)
                    .build()
                    .unwrap(),
            );
            assert_eq!(root.stats().in_use_bytes, 128);
            let mut waiter = None;
            let mut releaser = None;
            if with_allocation {
                let child_hold = child.try_allocate(3).unwrap();
                waiter = Some(thread::spawn({
                    let child = Arc::clone(&child);
                    move || child.allocate_blocking(1).map(|a| a.length())
                }));
                wait_waiting(&child, 1);
                releaser = Some(thread::spawn(move || {
                    thread::sleep(Duration::from_millis(40));
                    drop(child_hold);
                }));
            }
            let started = Instant::now();
            let report = root.shutdown_timeout(Duration::from_secs(5));
            assert!(report.is_drained(), "{report}");
            if let (Some(waiter), Some(releaser)) = (waiter, releaser) {
                assert!(started.elapsed() >= Duration::from_millis(30));
                assert_eq!(waiter.join().unwrap(), Err(AllocError::Closed));
                releaser.join().unwrap();
            } else {
                assert!(started.elapsed() < Duration::from_secs(1) * SLOWDOWN);
            }
            assert!(child.is_closed());
            assert_idle(&child);
            assert_idle(&root);
        }
    });
}

/// A child's timed request that can never fit above unless it takes more of its floor
/// waits for the floor "holding none of it meanwhile" (guarantee 15); its deadline ends
/// that wait with `TimedOut` and nothing held, and a release into the floor during the wait
/// serves it.
#[test]
fn timed_request_waiting_for_its_floor() {
    watched(20, || {
        for release_comes in [false, true] {
            let root = pool(4);
            let child = Arc::new(
                BufPool::builder(cfg(4))
                    .min_memory(128)
                    .parent(&root)
                    .build()
                    .unwrap(),
            );
            let in_floor = child.try_allocate(1).unwrap();
            assert_eq!(root.stats().in_use_bytes, 128);
            let timeout = if release_comes { 10_000 } else { 60 };
            let timed = thread::spawn({
                let child = Arc::clone(&child);
                move || {
                    child
                        .allocate_timeout(4, Duration::from_millis(timeout))
                        .map(|a| a.length())
                }
            });
            if release_comes {
                thread::sleep(Duration::from_millis(30));
                assert!(!timed.is_finished());
                assert_eq!(child.stats().in_use_bytes, 64, "{}", child.stats());
                drop(in_floor);
                assert_eq!(timed.join().unwrap(), Ok(4));
            } else {
                assert_eq!(timed.join().unwrap(), Err(AllocError::TimedOut));
                let (c, r) = (child.stats(), root.stats());
                assert_eq!((c.in_use_bytes, c.waiting), (64, 0), "{c}");
                assert_eq!((r.in_use_bytes, r.waiting), (128, 0), "{r}");
                drop(in_floor);
            }
            assert_idle(&child);
            assert_eq!(root.stats().in_use_bytes, 128, "{}", root.stats());
            drop(child.try_allocate(4).unwrap());
            drop(Arc::into_inner(child).unwrap());
            whole(&root);
        }
    });
}

/// Timed requests with deadlines of a few microseconds racing releases on a three-level
/// tree with floors, from several threads: whatever wins each race, every pool ends with
/// exactly its floor (or nothing) in use and the whole budget back.
#[test]
fn timed_requests_racing_releases_on_a_floored_tree() {
    watched(40, || {
        let root = pool(6);
        let mid = Arc::new(
            BufPool::builder(cfg(5))
                .name("mid")
                .min_memory(128)
                .parent(&root)
                .build()
                .unwrap(),
        );
        let leaf = Arc::new(
            BufPool::builder(cfg(3))
                .name("leaf")
                .min_memory(64)
                .parent(&mid)
                .build()
                .unwrap(),
        );
        let pools = [Arc::clone(&root), Arc::clone(&mid), Arc::clone(&leaf)];
        let workers: Vec<_> = (0..3u64)
            .map(|t| {
                let pools = pools.clone();
                thread::spawn(move || {
                    let mut rng = Rng::new(40 + t);
                    let mut served = 0;
                    let mut timed_out = [0usize; 3];
                    for _ in 0..rounds(3000, 30) {
                        let which = rng.range(0, 2);
                        let p = &pools[which];
                        let n = rng.range(1, 3);
                        let timeout = Duration::from_micros(rng.range(0, 60) as u64);
                        let got = if rng.range(0, 1) == 0 {
                            p.allocate_timeout(n, timeout).map(Held::Allocation)
                        } else {
                            p.reserve_timeout(64 * n, timeout).map(Held::Reservation)
                        };
                        match got {
                            Ok(held) => {
                                served += 1;
                                for _ in 0..rng.range(0, 200) {
                                    std::hint::spin_loop();
                                }
                                drop(held);
                            }
                            Err(AllocError::TimedOut) => timed_out[which] += 1,
                            Err(other) => panic!("{other:?}"),
                        }
                    }
                    (served, timed_out)
                })
            })
            .collect();
        let mut served = 0;
        let mut timed_out = [0usize; 3];
        for w in workers {
            let (s, t) = w.join().unwrap();
            served += s;
            for (sum, t) in timed_out.iter_mut().zip(t) {
                *sum += t;
            }
        }
        assert!(served > 0);
        for (p, expected) in pools.iter().zip(timed_out) {
            assert_eq!(p.stats().timed_out, expected, "{}", p.stats());
        }
        assert_idle(&leaf);
        let (m, r) = (mid.stats(), root.stats());
        assert_eq!(
            (m.in_use_bytes, m.waiting),
            (64, 0),
            "mid holds the leaf's floor: {m}"
        );
        assert_eq!(
            (r.in_use_bytes, r.waiting),
            (128, 0),
            "root holds mid's floor: {r}"
        );
        drop(leaf.try_allocate(3).unwrap());
        drop(pools);
        drop(Arc::into_inner(leaf).unwrap());
        drop(mid.try_allocate(5).unwrap());
        drop(Arc::into_inner(mid).unwrap());
        whole(&root);
    });
}

/// The wait types are what their docs say: `Allocate` and `Drained` are `Send` (issue 2);
/// `AllocateOwned` is `'static + Send`; `PollAllocate` is `Send + Unpin` (issue 12); the
/// reservation futures are `Send`.
#[test]
fn wait_types_are_send_unpin_static_as_documented() {
    fn send<T: Send>(_: &T) {}
    fn unpin<T: Unpin>(_: &T) {}
    fn static_send<T: Send + 'static>(_: &T) {}
    let pool = pool(2);
    let allocate = pool.allocate(1);
    send(&allocate);
    let drained = pool.drained();
    send(&drained);
    let owned = Arc::clone(&pool).allocate_owned(1);
    static_send(&owned);
    let zeroed_owned = Arc::clone(&pool).allocate_zeroed_owned(1);
    static_send(&zeroed_owned);
    let poller = PollAllocate::new(Arc::clone(&pool));
    static_send(&poller);
    unpin(&poller);
    let reserve = pool.reserve(8);
    send(&reserve);
    let reserve_owned = Arc::clone(&pool).reserve_owned(8);
    static_send(&reserve_owned);
    let shutdown_before = pool.shutdown_before(std::future::ready(()));
    send(&shutdown_before);
    drop((
        allocate,
        drained,
        owned,
        zeroed_owned,
        poller,
        reserve,
        reserve_owned,
    ));
    drop(shutdown_before);
    let mut reservation = pool.try_reserve(0).unwrap();
    let grow = reservation.grow(8);
    send(&grow);
    drop(grow);
    let shutdown = BufPool::new(cfg(1)).shutdown();
    send(&shutdown);
    drop(shutdown);
    whole(&pool);
}

/// A waker whose last reference owns the allocation its waiter waits for: the pool drops
/// that reference (a waker replaced by a new poll, a `PollAllocate` asked for a new `n`, a
/// cancel), which releases the allocation from inside the waiter's own call. The release
/// serves the waiter (or the next one), its new waker is woken, and nothing is lost
/// (guarantee 9: "A waker that panics or re-enters the pool (even one that owns an
/// allocation of it) costs at most its own waiter").
#[test]
fn waker_whose_last_drop_releases_what_its_waiter_waits_for() {
    watched(20, || {
        for case in 0..4 {
            let pool = pool(2);
            let (waker, state) = hostile();
            *state.keep.lock().unwrap() = Some(pool.try_allocate(2).unwrap());
            drop(state);
            let (new_waker, new_state) = self::hostile();
            let what = format!("case {case}");
            match case {
                // Re-polled with a new waker.
                0 => {
                    let mut waiter = Box::pin(pool.allocate(2));
                    assert!(poll(waiter.as_mut(), &waker).is_pending());
                    drop(waker);
                    let first = poll(waiter.as_mut(), &new_waker);
                    let got = match first {
                        Poll::Ready(r) => r.unwrap(),
                        Poll::Pending => {
                            assert_eq!(new_state.wakes.load(SeqCst), 1, "{what}");
                            let Poll::Ready(Ok(got)) = poll(waiter.as_mut(), &new_waker) else {
                                panic!("{what}: not served")
                            };
                            got
                        }
                    };
                    assert_eq!(got.length(), 2);
                }
                // A `PollAllocate` asked for another `n`.
                1 => {
                    let mut poller = PollAllocate::new(Arc::clone(&pool));
                    assert!(
                        poller
                            .poll_allocate(&mut Context::from_waker(&waker), 2)
                            .is_pending()
                    );
                    drop(waker);
                    let mut cx = Context::from_waker(&new_waker);
                    let got = match poller.poll_allocate(&mut cx, 1) {
                        Poll::Ready(r) => r.unwrap(),
                        Poll::Pending => {
                            let Poll::Ready(Ok(got)) = poller.poll_allocate(&mut cx, 1) else {
                                panic!("{what}: not served")
                            };
                            got
                        }
                    };
                    assert_eq!(got.length(), 1);
                }
                // Cancelled, with a waiter behind it.
                _ => {
                    let mut waiter = Box::pin(pool.allocate(2));
                    assert!(poll(waiter.as_mut(), &waker).is_pending());
                    let mut behind = Box::pin(pool.allocate(if case == 2 { 1 } else { 2 }));
                    assert!(poll(behind.as_mut(), &new_waker).is_pending());
                    drop(waker);
                    drop(waiter);
                    assert_eq!(new_state.wakes.load(SeqCst), 1, "{what}");
                    let Poll::Ready(Ok(got)) = poll(behind.as_mut(), &new_waker) else {
                        panic!("{what}: the waiter behind not served")
                    };
                    drop(got);
                }
            }
            whole(&pool);
        }
    });
}

/// Timed and blocking waiters against `max_waiters` and resizes: a waiting form that would
/// have to queue in a full queue fails with `QueueFull` at once (README table: "any
/// waiting form with `max_waiters(k)` and `k` already waiting": `QueueFull`), even with a
/// zero timeout; a queued timed waiter whose request can no longer fit after a shrink fails
/// with `ExceedsBudget` at once, not at its deadline (issue 6: "Queued waiters whose
/// request can never fit the new limit fail with `ExceedsBudget`"), also a child's waiting
/// at its parent; on a `wait_for_growth` pool it keeps waiting instead.
#[test]
fn timed_waiters_against_queue_limits_and_shrinks() {
    watched(20, || {
        // max_waiters(1), one waiting: QueueFull for every waiting form, at once.
        let limited = Arc::new(BufPool::builder(cfg(2)).max_waiters(1).build().unwrap());
        let held = limited.try_allocate(2).unwrap();
        let queued = thread::spawn({
            let limited = Arc::clone(&limited);
            move || {
                limited
                    .allocate_timeout(1, Duration::from_secs(10))
                    .map(|a| a.length())
            }
        });
        wait_waiting(&limited, 1);
        let started = Instant::now();
        for timeout in [Duration::ZERO, Duration::from_secs(10)] {
            assert_eq!(
                limited.allocate_timeout(1, timeout).unwrap_err(),
                AllocError::QueueFull
            );
            assert_eq!(
                limited.reserve_timeout(8, timeout).unwrap_err(),
                AllocError::QueueFull
            );
        }
        assert_eq!(
            limited.allocate_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        assert!(started.elapsed() < Duration::from_secs(2) * SLOWDOWN);
        let stats = limited.stats();
        assert_eq!((stats.queue_full, stats.timed_out), (5, 0), "{stats}");
        drop(held);
        assert_eq!(queued.join().unwrap(), Ok(1));
        whole(&limited);

        // A shrink below a queued timed waiter's request: ExceedsBudget at once.
        let root = pool(4);
        let child = Arc::new(root.child("child", cfg(4)).unwrap());
        let held = root.try_allocate(4).unwrap();
        let own = thread::spawn({
            let root = Arc::clone(&root);
            move || {
                root.allocate_timeout(3, Duration::from_secs(10))
                    .map(|a| a.length())
            }
        });
        wait_waiting(&root, 1);
        let childs = thread::spawn({
            let child = Arc::clone(&child);
            move || {
                child
                    .allocate_timeout(4, Duration::from_secs(10))
                    .map(|a| a.length())
            }
        });
        wait_waiting(&root, 2);
        let started = Instant::now();
        root.set_max_memory(64 * 2).unwrap();
        assert!(matches!(
            own.join().unwrap(),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert!(matches!(
            childs.join().unwrap(),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(5) * SLOWDOWN);
        assert_idle(&child);
        drop(held);
        assert_eq!(root.stats().timed_out + child.stats().timed_out, 0);
        whole(&root);

        // On a pool grown by a controller, the same shrink leaves it waiting.
        let growing = Arc::new(BufPool::builder(cfg(4)).wait_for_growth().build().unwrap());
        let held = growing.try_allocate(4).unwrap();
        let waiter = thread::spawn({
            let growing = Arc::clone(&growing);
            move || {
                growing
                    .allocate_timeout(3, Duration::from_secs(10))
                    .map(|a| a.length())
            }
        });
        wait_waiting(&growing, 1);
        growing.set_max_memory(64 * 2).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "it gave up on growth");
        drop(held);
        thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "served above the budget");
        growing.add_max_memory(64);
        assert_eq!(waiter.join().unwrap(), Ok(3));
        whole(&growing);
    });
}

/// `shutdown()` dropped before it completes drops the pool with it, blocking as the drop
/// does ("If the future is dropped before it completes, the pool is dropped with it, which
/// blocks as `Drop` does; the pool stays closed either way"); `shutdown_before` dropped
/// midway leaves the pool closed and loses nothing.
#[test]
fn shutdown_futures_dropped_midway() {
    watched(20, || {
        let pool = BufPool::new(cfg(2));
        let child = Arc::new(pool.child("child", cfg(2)).unwrap());
        let held = pool.try_allocate(1).unwrap();
        let mut shutdown = Box::pin(pool.shutdown());
        assert!(poll(shutdown.as_mut(), Waker::noop()).is_pending());
        assert!(child.is_closed(), "the close reaches the child");
        let released = Arc::new(AtomicBool::new(false));
        let releaser = thread::spawn({
            let released = Arc::clone(&released);
            move || {
                thread::sleep(Duration::from_millis(40));
                released.store(true, SeqCst);
                drop(held);
            }
        });
        drop(shutdown);
        assert!(released.load(SeqCst), "the dropped shutdown did not wait");
        releaser.join().unwrap();
        assert_idle(&child);

        let pool = pool_ok();
        let held = pool.try_allocate(1).unwrap();
        {
            let mut before = Box::pin(pool.shutdown_before(std::future::pending::<()>()));
            assert!(poll(before.as_mut(), Waker::noop()).is_pending());
        }
        assert!(pool.is_closed());
        assert_eq!(pool.stats().in_use_bytes, 64);
        drop(held);
        assert!(pool.shutdown_timeout(Duration::ZERO).is_drained());
        assert_idle(&pool);
    });
}

fn pool_ok() -> BufPool {
    BufPool::new(cfg(2))
}

/// One release that frees room for several waiters serves all of them (guarantee 4), with
/// blocking threads, a timed one and async waiters mixed, even when the waker of the first
/// one served panics on the releasing thread (guarantee 9): every blocking thread is
/// woken and holds its buffer at the same time as the others.
#[test]
fn one_release_serves_every_blocking_waiter_past_a_panicking_waker() {
    watched(20, || {
        for panicking in [false, true] {
            let pool = pool(5);
            let held = pool.try_allocate(5).unwrap();
            let (waker, state) = hostile();
            state.panic_wake.store(panicking, SeqCst);
            let mut first = Box::pin(pool.allocate(1));
            assert!(poll(first.as_mut(), &waker).is_pending());
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..3)
                .map(|i| {
                    let p = Arc::clone(&pool);
                    let barrier = Arc::clone(&barrier);
                    let t = thread::spawn(move || {
                        let got = if i == 1 {
                            p.allocate_timeout(1, Duration::from_secs(10))
                        } else {
                            p.allocate_blocking(1)
                        }
                        .unwrap();
                        barrier.wait(); // all three hold theirs at once
                        drop(got);
                    });
                    wait_waiting(&pool, 2 + i);
                    t
                })
                .collect();
            let (last_waker, last) = self::hostile();
            let mut last_future = Box::pin(pool.allocate(1));
            assert!(poll(last_future.as_mut(), &last_waker).is_pending());
            let released = caught(move || drop(held));
            assert_eq!(released.is_err(), panicking);
            assert_eq!(last.wakes.load(SeqCst), 1);
            barrier.wait();
            for t in threads {
                t.join().unwrap();
            }
            for f in [&mut first, &mut last_future] {
                let Poll::Ready(Ok(got)) = poll(f.as_mut(), Waker::noop()) else {
                    panic!("an async waiter was not served")
                };
                drop(got);
            }
            state.panic_wake.store(false, SeqCst);
            drop((first, last_future));
            whole(&pool);
        }
    });
}

/// A cache whose `reclaim` makes blocking calls on another pool (nested in the blocking
/// wait that drives the round, on the same thread) and resolves from another thread.
struct BlockingCache {
    held: Mutex<Option<membudget::BufPoolAllocation>>,
    other: Arc<BufPool>,
    nested: Mutex<Vec<Result<usize, AllocError>>>,
}

impl membudget::Reclaimer for BlockingCache {
    fn estimate(&self) -> usize {
        self.held
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |a| a.allocated_bytes())
    }

    fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        // Nested blocking waits on this thread, inside the driving wait's poll.
        let timed = self
            .other
            .allocate_timeout(1, Duration::from_millis(20))
            .map(|a| a.length());
        let blocked = self.other.allocate_blocking(1).map(|a| a.length());
        self.nested.lock().unwrap().extend([timed, blocked]);
        // Resolves from another thread, which wakes the driving thread's waker.
        let freed = self.held.lock().unwrap().take();
        let (tx, rx) = futures::channel::oneshot::channel();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(10));
            let bytes = freed.map_or(0, |a| a.allocated_bytes());
            let _ = tx.send(bytes);
        });
        Box::pin(async move { rx.await.unwrap_or(0) })
    }
}

/// A blocking waiter drives reclaim (README "Reclaim": "the request itself (inside its
/// poll, async or blocking; nothing is spawned)"); the reclaimer makes timed and untimed
/// blocking calls on another pool from inside that poll, and its future resolves from
/// another thread: the nested waits work on the waiting thread, the driving wait is woken
/// by the foreign waker, and the books end exact.
#[test]
fn blocking_waiter_driving_a_reclaimer_that_blocks_on_another_pool() {
    watched(20, || {
        let pool = pool(2);
        let other = self::pool(1);
        let other_held = other.try_allocate(1).unwrap();
        let cache = Arc::new(BlockingCache {
            held: Mutex::new(Some(pool.try_allocate(1).unwrap())),
            other: Arc::clone(&other),
            nested: Mutex::new(Vec::new()),
        });
        let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
        let holder = pool.try_allocate(1).unwrap();
        let other_release = thread::spawn({
            let other = Arc::clone(&other);
            move || {
                // Once the nested timed call has timed out, the nested blocking one is served.
                common::wait_until(10, "the nested timed call times out", || {
                    other.stats().timed_out == 1
                });
                drop(other_held);
            }
        });
        let waiter = thread::spawn({
            let pool = Arc::clone(&pool);
            move || pool.allocate_blocking(2).map(|a| a.length())
        });
        common::wait_until(10, "the cache gives its buffer back", || {
            cache.estimate_now() == 0 && pool.stats().in_use_bytes <= 64
        });
        drop(holder);
        assert_eq!(waiter.join().unwrap(), Ok(2));
        other_release.join().unwrap();
        // A round that freed part of the shortfall is followed by another, which may ask
        // the (now empty) cache again before the holder's release serves the waiter: its
        // nested calls then find the other pool free.
        let nested = cache.nested.lock().unwrap().clone();
        assert_eq!(
            nested[..2],
            [Err(AllocError::TimedOut), Ok(1)],
            "{nested:?}"
        );
        assert!(nested[2..].iter().all(|n| *n == Ok(1)), "{nested:?}");
        assert!(pool.stats().reclaim_rounds >= 1, "{}", pool.stats());
        drop(handle);
        whole(&pool);
        whole(&other);
    });
}

impl BlockingCache {
    fn estimate_now(&self) -> usize {
        membudget::Reclaimer::estimate(self)
    }
}

/// A child of a pool grown by a controller: the child's timed requests wait at the root
/// for growth, and race `add_max_memory`; whether growth or deadline wins, both pools end
/// with nothing in use, and each `TimedOut` is counted by the child.
#[test]
fn childs_timed_requests_racing_growth_of_the_root() {
    watched(30, || {
        let root = Arc::new(
            BufPool::builder(BufPoolCfg {
                buffer_size: BS,
                max_memory: 0,
            })
            .wait_for_growth()
            .build()
            .unwrap(),
        );
        let child = Arc::new(root.child("child", cfg(2)).unwrap());
        let mut rng = Rng::new(9);
        let mut timed_out = 0;
        for round in 0..rounds(600, 8) {
            let n = rng.range(1, 2);
            let timeout = Duration::from_micros(rng.range(0, 100) as u64);
            let waiter = thread::spawn({
                let child = Arc::clone(&child);
                move || {
                    if n == 1 {
                        child.allocate_timeout(1, timeout).map(|a| a.length())
                    } else {
                        child.reserve_timeout(128, timeout).map(|r| r.size() / 64)
                    }
                }
            });
            let spin_until = Instant::now() + Duration::from_micros(rng.range(0, 120) as u64);
            while Instant::now() < spin_until {
                std::hint::spin_loop();
            }
            root.add_max_memory(128);
            match waiter.join().unwrap() {
                Ok(got) => assert_eq!(got, n),
                Err(AllocError::TimedOut) => timed_out += 1,
                Err(other) => panic!("round {round}: {other:?}"),
            }
            let (c, r) = (child.stats(), root.stats());
            assert_eq!(
                (c.in_use_bytes, c.waiting, c.timed_out),
                (0, 0, timed_out),
                "{c}"
            );
            assert_eq!(
                (r.in_use_bytes, r.waiting, r.max_memory),
                (0, 0, 128),
                "{r}"
            );
            assert_eq!(root.forget_max_memory(128), 128, "round {round}");
        }
        root.add_max_memory(128);
        whole(&child);
        whole(&root);
    });
}

/// A timed waiter granted by `shrink_to_deferring_wakeups` whose wake-up is held back past
/// its deadline: the grant was first (`allocate_timeout`: `TimedOut` "when the deadline
/// passes first"), so at its deadline the waiter takes it; nothing is lost, and running
/// the held wake-ups afterwards is harmless.
#[test]
fn timed_waiter_granted_while_its_wake_up_is_held_back() {
    watched(20, || {
        let pool = pool(2);
        let mut reservation = pool.try_reserve(128).unwrap();
        let waiter = thread::spawn({
            let pool = Arc::clone(&pool);
            move || {
                pool.allocate_timeout(1, Duration::from_millis(50))
                    .map(|a| a.length())
            }
        });
        wait_waiting(&pool, 1);
        let wake_ups = reservation.shrink_to_deferring_wakeups(64);
        assert_eq!(pool.stats().in_use_bytes, 128, "granted before it returned");
        let result = waiter.join().unwrap();
        assert_eq!(result, Ok(1));
        wake_ups.run();
        assert_eq!(pool.stats().in_use_bytes, 64, "{}", pool.stats());
        drop(reservation);
        whole(&pool);
    });
}

/// The timed calls block "for at most about `timeout`" (`allocate_timeout`,
/// `reserve_timeout`, `shutdown_timeout`): on a full pool, on a child whose room is
/// missing at the root, they return close to their deadline, not long after; a child's
/// zero-timeout call does not barge past a waiter at the root.
#[test]
fn timed_calls_return_about_at_their_deadline() {
    watched(30, || {
        let root = pool(2);
        let child = Arc::new(root.child("child", cfg(2)).unwrap());
        let held = root.try_allocate(1).unwrap();
        let (waker, _) = hostile();
        let mut root_head = Box::pin(root.allocate(2));
        assert!(poll(root_head.as_mut(), &waker).is_pending());
        // One buffer free at the root, but its head waits for two: no barging from below.
        assert_eq!(
            child.allocate_timeout(1, Duration::ZERO).unwrap_err(),
            AllocError::TimedOut
        );
        let slack = Duration::from_millis(250) * SLOWDOWN;
        for round in 0..rounds(6, 1) {
            let timeout = Duration::from_millis(5 + 10 * round as u64);
            for which in 0..3 {
                let started = Instant::now();
                let result = match which {
                    0 => root.allocate_timeout(1, timeout).map(drop),
                    1 => child.allocate_timeout(1, timeout).map(drop),
                    _ => child.reserve_timeout(64, timeout).map(drop),
                };
                let took = started.elapsed();
                assert_eq!(result, Err(AllocError::TimedOut), "{which}");
                assert!(took >= timeout, "{which}: returned early ({took:?})");
                assert!(took < timeout + slack, "{which}: {took:?} for {timeout:?}");
            }
        }
        drop(root_head);
        let started = Instant::now();
        let report = child.shutdown_timeout(Duration::from_millis(20));
        assert!(report.is_drained() && report.closed, "{report}");
        assert!(started.elapsed() < slack);
        let started = Instant::now();
        let report = root.shutdown_timeout(Duration::from_millis(20));
        let took = started.elapsed();
        assert!(!report.is_drained(), "{report}");
        assert!(took >= Duration::from_millis(20) && took < Duration::from_millis(20) + slack);
        drop(held);
        assert!(root.shutdown_timeout(Duration::ZERO).is_drained());
    });
}

/// A child's reservation growing with `grow_blocking` at the root when the root is
/// dropped on another thread: the growth fails with `Closed` and leaves the reservation as
/// it was; the root's drop barrier waits for the reservation ("keep the pool's drop barrier
/// waiting until they are given back", guarantee 12) and returns once it is dropped.
#[test]
fn root_dropped_while_a_childs_reservation_grows_blocking_at_it() {
    watched(20, || {
        let root = BufPool::new(cfg(4));
        let child = Arc::new(root.child("child", cfg(4)).unwrap());
        let mut reservation = child.try_reserve(64).unwrap();
        let held = root.try_allocate(3).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let grower = thread::spawn(move || {
            let grown = reservation.grow_blocking(128);
            let size = reservation.size();
            // Held until the test says so: the root's drop must wait for it.
            rx.recv().unwrap();
            drop(reservation);
            (grown, size)
        });
        wait_waiting(&root, 1);
        let dropped = Arc::new(AtomicBool::new(false));
        let dropper = thread::spawn({
            let dropped = Arc::clone(&dropped);
            move || {
                drop(root);
                dropped.store(true, SeqCst);
            }
        });
        common::wait_until(10, "the root's drop closes the tree", || child.is_closed());
        drop(held);
        thread::sleep(Duration::from_millis(30));
        assert!(
            !dropped.load(SeqCst),
            "the drop did not wait for the reservation"
        );
        tx.send(()).unwrap();
        let (grown, size) = grower.join().unwrap();
        assert_eq!(grown, Err(AllocError::Closed));
        assert_eq!(size, 64);
        dropper.join().unwrap();
        assert!(child.is_closed());
        assert_idle(&child);
    });
}
