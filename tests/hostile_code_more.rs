//! Issue 18 and README guarantee 9 ("wakers are user code, and every give-back survives
//! them"), in combinations the other unwind tests do not reach: hostile wakers (a `wake`,
//! `clone` or `drop` that panics, or re-enters the pool) on reservation growth (`grow`,
//! `grow_blocking`), `reserve_owned`, `allocate_owned`, `wait_for_growth` pools woken by
//! `add_max_memory`, `force_grow` overcommit repaid by a shrink, floored child pools whose
//! requests wait in the parent's queue, the blocking shim (`allocate_timeout`) beside
//! panicking async wakers, `close` and the drop of a pool while a panicking waker is queued,
//! reclaimers whose frees wake panicking wakers and whose `Drop` panics, and panics that
//! escape to the caller (an unwinding task, a `PendingWakeUps` dropped while unwinding).
//!
//! After every scenario the books are checked at the quiescent point (`stats()`: in use 0
//! once everything is dropped, nobody waiting, no reservation or overcommit left, the root
//! and child books agree) and the pool still works (the whole budget can be taken).

mod common;

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::thread;
use std::time::Duration;

use common::{SLOWDOWN, wait_waiting, watchdog};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate, Reclaimer,
};

/// One buffer: every pool here has 64-byte buffers.
const B: usize = 64;

/// The watchdog of each test, in seconds.
const WATCHDOG: u64 = 20;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: B * buffers,
    }
}

fn root(buffers: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(cfg(buffers))
            .drop_warning_after(Duration::from_secs(3600))
            .build()
            .expect("a valid root"),
    )
}

fn growing(buffers: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(cfg(buffers))
            .wait_for_growth()
            .drop_warning_after(Duration::from_secs(3600))
            .build()
            .expect("a valid growing root"),
    )
}

fn child(parent: &BufPool, buffers: usize, floor_buffers: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(cfg(buffers))
            .parent(parent)
            .min_memory(floor_buffers * B)
            .drop_warning_after(Duration::from_secs(3600))
            .build()
            .expect("a valid child"),
    )
}

// ---------------------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------------------

/// The message of every panic the test's user code raises on purpose.
const ON_PURPOSE: &str = "hostile user code panics on purpose";

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "<a panic without a message>".to_owned()
    }
}

/// Keeps the purposeful panics quiet; every other panic goes to the previous hook.
fn quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        let loud = std::env::var_os("HOSTILE_LOUD").is_some();
        std::panic::set_hook(Box::new(move |info| {
            if loud || !message(info.payload()).contains("on purpose") {
                previous(info);
            }
        }));
    });
}

#[track_caller]
fn watched(f: impl FnOnce() + Send + 'static) {
    quiet();
    watchdog(WATCHDOG, f);
}

/// Runs `f`: `false` if it returned, `true` if it passed a purposeful panic on; any other
/// panic is passed on.
fn on_purpose(f: impl FnOnce()) -> bool {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => false,
        Err(payload) if message(&*payload).contains("on purpose") => true,
        Err(payload) => resume_unwind(payload),
    }
}

// ---------------------------------------------------------------------------------------------
// A hostile waker: its `wake`, `clone` and `drop` may panic, and its `wake` may run user code
// ---------------------------------------------------------------------------------------------

type Action = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Hostile {
    wake_panics: AtomicBool,
    clone_panics: AtomicBool,
    drop_panics: AtomicBool,
    woken: AtomicUsize,
    /// Run by the next wakes, one each (the last pushed first).
    on_wake: Mutex<Vec<Action>>,
}

impl Hostile {
    fn woken(&self) -> usize {
        self.woken.load(SeqCst)
    }

    fn on_wake(&self, action: impl FnOnce() + Send + 'static) {
        self.on_wake.lock().unwrap().push(Box::new(action));
    }

    /// Nothing panics any more (before the test drops its own waker).
    fn disarm(&self) {
        self.wake_panics.store(false, SeqCst);
        self.clone_panics.store(false, SeqCst);
        self.drop_panics.store(false, SeqCst);
    }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_by_ref_raw, drop_raw);

unsafe fn clone_raw(data: *const ()) -> RawWaker {
    // SAFETY: `data` is an `Arc<Hostile>` pointer with a count this waker owns.
    let hostile = unsafe { &*(data as *const Hostile) };
    if hostile.clone_panics.load(SeqCst) {
        panic!("{ON_PURPOSE} (clone)");
    }
    // SAFETY: as above; the new waker owns the count added here.
    unsafe { Arc::increment_strong_count(data as *const Hostile) };
    RawWaker::new(data, &VTABLE)
}

unsafe fn wake_raw(data: *const ()) {
    // SAFETY: `wake` consumes the waker's count: the Arc drops it, even while unwinding.
    let hostile = unsafe { Arc::from_raw(data as *const Hostile) };
    woken(&hostile);
}

unsafe fn wake_by_ref_raw(data: *const ()) {
    // SAFETY: the waker owns a count for as long as this runs.
    woken(unsafe { &*(data as *const Hostile) });
}

fn woken(hostile: &Hostile) {
    hostile.woken.fetch_add(1, SeqCst);
    let action = hostile.on_wake.lock().unwrap().pop();
    if let Some(action) = action {
        action();
    }
    if hostile.wake_panics.load(SeqCst) {
        panic!("{ON_PURPOSE} (wake)");
    }
}

unsafe fn drop_raw(data: *const ()) {
    // SAFETY: the waker's own count.
    let hostile = unsafe { Arc::from_raw(data as *const Hostile) };
    let panics = hostile.drop_panics.load(SeqCst);
    drop(hostile);
    if panics && !thread::panicking() {
        panic!("{ON_PURPOSE} (drop)");
    }
}

fn hostile() -> (Waker, Arc<Hostile>) {
    let hostile = Arc::new(Hostile::default());
    let data = Arc::into_raw(Arc::clone(&hostile)) as *const ();
    // SAFETY: the vtable's functions keep the `Arc` counts as the contract requires.
    let waker = unsafe { Waker::from_raw(RawWaker::new(data, &VTABLE)) };
    (waker, hostile)
}

/// A waker whose `wake` panics.
fn panicking() -> (Waker, Arc<Hostile>) {
    let (waker, hostile) = hostile();
    hostile.wake_panics.store(true, SeqCst);
    (waker, hostile)
}

fn poll<F: Future + ?Sized>(future: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(waker))
}

#[track_caller]
fn pending<F: Future + ?Sized>(future: Pin<&mut F>, waker: &Waker) {
    assert!(
        poll(future, waker).is_pending(),
        "expected the request to wait"
    );
}

#[track_caller]
fn done<T, F: Future<Output = Result<T, AllocError>> + ?Sized>(future: Pin<&mut F>) -> T {
    match poll(future, Waker::noop()) {
        Poll::Ready(Ok(out)) => out,
        Poll::Ready(Err(error)) => panic!("expected a grant, got {error:?}"),
        Poll::Pending => panic!("expected a grant, still pending"),
    }
}

#[track_caller]
fn failed<T: std::fmt::Debug, F: Future<Output = Result<T, AllocError>> + ?Sized>(
    future: Pin<&mut F>,
) -> AllocError {
    match poll(future, Waker::noop()) {
        Poll::Ready(Err(error)) => error,
        other => panic!("expected an error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The books
// ---------------------------------------------------------------------------------------------

/// The pool's bytes in use (in buffers) and requests queued at its level.
#[track_caller]
fn books(name: &str, pool: &BufPool, in_use_buffers: usize, waiting: usize) {
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.waiting),
        (in_use_buffers * B, waiting),
        "{name}: (in_use_bytes, waiting): {stats}"
    );
}

/// Quiescent with nothing held but `floors` buffers (floors of live children set aside):
/// no allocation, reservation, overcommit or waiter left.
#[track_caller]
fn idle(name: &str, pool: &BufPool, floors: usize) {
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.outstanding,
            stats.reserved_bytes,
            stats.overcommit_bytes,
            stats.waiting,
        ),
        (floors * B, 0, 0, 0, 0),
        "{name} not idle: (in_use, outstanding, reserved, overcommit, waiting): {stats}"
    );
}

/// `n` buffers can be taken at once and no more (the pool works and its budget is whole);
/// given back again afterwards.
#[track_caller]
fn takes(name: &str, pool: &BufPool, n: usize) {
    let before = pool.stats().in_use_bytes;
    let all = pool
        .try_allocate(n)
        .unwrap_or_else(|error| panic!("{name}: {n} buffers not free ({error}): {}", pool.stats()));
    assert_eq!(
        pool.try_allocate(1).unwrap_err(),
        AllocError::WouldBlock,
        "{name}: more than {n} buffers free: {}",
        pool.stats()
    );
    drop(all);
    assert_eq!(
        pool.stats().in_use_bytes,
        before,
        "{name}: {}",
        pool.stats()
    );
}

/// Drops `pool` on another thread and fails if that takes longer than a few seconds.
#[track_caller]
fn drop_promptly(name: &str, pool: Arc<BufPool>) {
    assert_eq!(Arc::strong_count(&pool), 1, "{name}: not the last handle");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        drop(pool);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5) * SLOWDOWN)
        .unwrap_or_else(|_| panic!("{name}: its drop hangs"));
}

/// Allocations a waker's user code keeps, dropped at the end of the test.
type Kept = Arc<Mutex<Vec<BufPoolAllocation>>>;

// ---------------------------------------------------------------------------------------------
// Reservation growth
// ---------------------------------------------------------------------------------------------

/// What gives the root's bytes back while a child's `grow` waits in the root's queue.
#[derive(Clone, Copy, Debug)]
enum Release {
    /// Drop an allocation of the root.
    RootAllocation,
    /// Drop an allocation of a sibling child pool (two levels given back).
    SiblingAllocation,
    /// Shrink a reservation of the sibling.
    SiblingShrink,
    /// `add_max_memory` on the root.
    AddMaxMemory,
    /// `set_max_memory` growing the root.
    SetMaxMemory,
}

fn grow_in_a_child_case(release: Release) {
    let root = match release {
        // A budget below the request's fails it at once, unless the root waits for growth.
        Release::AddMaxMemory | Release::SetMaxMemory => growing(4),
        _ => root(4),
    };
    let c = child(&root, 4, 0);
    let sibling = child(&root, 4, 0);
    let mut r = c.try_reserve(B).unwrap();
    // The root full: 1 for `r`, 3 elsewhere.
    let mut other_allocation = None;
    let mut other_reservation = None;
    match release {
        Release::RootAllocation => other_allocation = Some(root.try_allocate(3).unwrap()),
        Release::SiblingAllocation => other_allocation = Some(sibling.try_allocate(3).unwrap()),
        Release::SiblingShrink => other_reservation = Some(sibling.try_reserve(3 * B).unwrap()),
        Release::AddMaxMemory | Release::SetMaxMemory => {
            root.set_max_memory(B).unwrap();
        }
    }
    let (waker, hostile) = panicking();
    {
        let mut grow = Box::pin(r.grow(2 * B));
        pending(grow.as_mut(), &waker);
        assert_eq!(root.stats().waiting + c.stats().waiting, 1);
        let panicked = on_purpose(|| match release {
            Release::RootAllocation | Release::SiblingAllocation => drop(other_allocation.take()),
            Release::SiblingShrink => other_reservation.as_mut().unwrap().shrink(3 * B),
            Release::AddMaxMemory => {
                root.add_max_memory(3 * B);
            }
            Release::SetMaxMemory => root.set_max_memory(4 * B).unwrap(),
        });
        assert!(panicked, "{release:?}: the waker's panic is passed on");
        assert_eq!(hostile.woken(), 1);
        books("root", &root, 3, 0);
        books("child", &c, 3, 0);
        books("sibling", &sibling, 0, 0);
        assert_eq!(root.stats().max_memory, 4 * B);
        done(grow.as_mut());
    }
    assert_eq!(r.size(), 3 * B);
    assert_eq!(c.stats().reserved_bytes, 3 * B);
    drop((r, other_reservation));
    hostile.disarm();
    drop(waker);
    idle("root", &root, 0);
    idle("child", &c, 0);
    idle("sibling", &sibling, 0);
    takes("child", &c, 4);
    takes("sibling", &sibling, 4);
    takes("root", &root, 4);
    drop_promptly("child", c);
    drop_promptly("sibling", sibling);
    drop_promptly("root", root);
}

#[test]
fn child_grow_waiting_at_the_root_with_a_panicking_wake_every_release() {
    watched(|| {
        for release in [
            Release::RootAllocation,
            Release::SiblingAllocation,
            Release::SiblingShrink,
            Release::AddMaxMemory,
            Release::SetMaxMemory,
        ] {
            grow_in_a_child_case(release);
        }
    });
}

/// A granted `grow` dropped before it is polled gives its grant on to a `reserve_owned`
/// behind it, whose waker re-enters the pool (takes the free buffer left, reads the stats,
/// adds and forgets budget) and then panics: the panic comes out of the `Grow`'s drop, and
/// every byte is where it belongs.
#[test]
fn cancelled_grow_passes_its_grant_to_a_reentrant_panicking_reserve_owned() {
    watched(|| {
        let pool = root(3);
        let hold = pool.try_allocate(3).unwrap();
        let mut r = pool.try_reserve(0).unwrap();
        let (waker, hostile) = panicking();
        let kept: Kept = Arc::default();
        {
            let (pool, kept) = (Arc::clone(&pool), Arc::clone(&kept));
            hostile.on_wake(move || {
                let _ = pool.stats();
                kept.lock()
                    .unwrap()
                    .push(pool.try_allocate(1).expect("one buffer free"));
                assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
                pool.add_max_memory(B);
                assert_eq!(pool.forget_max_memory(B), B);
            });
        }
        let mut owned = Box::pin(Arc::clone(&pool).reserve_owned(2 * B));
        {
            let mut grow = Box::pin(r.grow(2 * B));
            pending(grow.as_mut(), Waker::noop());
            pending(owned.as_mut(), &waker);
            books("pool", &pool, 3, 2);
            drop(hold); // `grow` granted 2, `owned` waits for 2 behind it
            assert_eq!(hostile.woken(), 0);
            books("pool", &pool, 2, 1);
            assert!(
                on_purpose(|| drop(grow)),
                "the waker's panic comes out of the drop"
            );
        }
        assert_eq!(hostile.woken(), 1);
        assert_eq!(r.size(), 0);
        books("pool", &pool, 3, 0); // `owned`'s 2 and the waker's 1
        assert_eq!(pool.stats().max_memory, 3 * B);
        let reservation = done(owned.as_mut());
        assert_eq!(reservation.size(), 2 * B);
        drop((reservation, owned, r));
        kept.lock().unwrap().clear();
        hostile.disarm();
        drop(waker);
        idle("pool", &pool, 0);
        takes("pool", &pool, 3);
        drop_promptly("pool", pool);
    });
}

/// `grow_blocking` and `reserve_blocking` queued behind async requests whose wakers panic
/// are served by the same release: the blocking threads are never stranded.
#[test]
fn blocking_grow_and_reserve_behind_panicking_async_waiters() {
    watched(|| {
        let pool = root(4);
        let c = child(&pool, 4, 0);
        let hold = pool.try_allocate(4).unwrap();
        let (w1, h1) = panicking();
        let (w2, h2) = panicking();
        let mut first = Box::pin(pool.allocate(1));
        pending(first.as_mut(), &w1);
        let grower = {
            let c = Arc::clone(&c);
            thread::spawn(move || {
                let mut r = c.try_reserve(0).unwrap();
                r.grow_blocking(B).map(|()| r)
            })
        };
        wait_waiting(&pool, 2);
        let mut second = Box::pin(Arc::clone(&c).allocate_owned(1));
        pending(second.as_mut(), &w2);
        let reserver = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || pool.reserve_blocking(B))
        };
        wait_waiting(&pool, 4);
        assert!(on_purpose(|| drop(hold)), "a waker's panic is passed on");
        assert_eq!((h1.woken(), h2.woken()), (1, 1));
        let grown = grower.join().unwrap().unwrap();
        let reserved = reserver.join().unwrap().unwrap();
        assert_eq!((grown.size(), reserved.size()), (B, B));
        books("root", &pool, 4, 0);
        books("child", &c, 2, 0);
        let a = done(first.as_mut());
        let b = done(second.as_mut());
        drop((a, b, grown, reserved, first, second));
        h1.disarm();
        h2.disarm();
        drop((w1, w2));
        idle("root", &pool, 0);
        idle("child", &c, 0);
        takes("child", &c, 4);
        takes("root", &pool, 4);
        drop_promptly("child", c);
        drop_promptly("root", pool);
    });
}

// ---------------------------------------------------------------------------------------------
// Growth: a `wait_for_growth` pool woken by `add_max_memory`
// ---------------------------------------------------------------------------------------------

/// A pool with no budget: an `allocate_owned` whose waker panics, a `reserve_owned` whose waker
/// re-enters (forgets and adds budget, tries to allocate) and panics, and a blocking
/// `allocate_blocking` wait for growth. Each `add_max_memory` that serves a panicking waker
/// passes its panic on with the budget added and the grants made; nothing is lost.
#[test]
fn growth_serves_panicking_and_reentrant_owned_waiters_and_a_blocking_one() {
    watched(|| {
        let pool = growing(0);
        let (w1, h1) = panicking();
        let (w2, h2) = panicking();
        {
            let pool = Arc::clone(&pool);
            h2.on_wake(move || {
                // Everything granted already: nothing free to forget or to take.
                assert_eq!(pool.forget_max_memory(usize::MAX), 0);
                assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
                assert_eq!(pool.add_max_memory(0), 4 * B);
            });
        }
        let mut first = Box::pin(Arc::clone(&pool).allocate_owned(1));
        pending(first.as_mut(), &w1);
        let mut second = Box::pin(Arc::clone(&pool).reserve_owned(B));
        pending(second.as_mut(), &w2);
        let blocking = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || pool.allocate_blocking(2))
        };
        wait_waiting(&pool, 3);
        assert!(on_purpose(|| {
            pool.add_max_memory(B);
        }));
        assert_eq!(h1.woken(), 1);
        let stats = pool.stats();
        assert_eq!(
            (stats.max_memory, stats.in_use_bytes, stats.waiting),
            (B, B, 2)
        );
        assert!(on_purpose(|| {
            pool.add_max_memory(3 * B);
        }));
        assert_eq!(h2.woken(), 1);
        let stats = pool.stats();
        assert_eq!(
            (stats.max_memory, stats.in_use_bytes, stats.waiting),
            (4 * B, 4 * B, 0)
        );
        let third = blocking.join().unwrap().unwrap();
        let a = done(first.as_mut());
        let b = done(second.as_mut());
        assert_eq!((a.length(), b.size(), third.length()), (1, B, 2));
        drop((a, b, third, first, second));
        h1.disarm();
        h2.disarm();
        drop((w1, w2));
        idle("pool", &pool, 0);
        takes("pool", &pool, 4);
        assert_eq!(pool.forget_max_memory(usize::MAX), 4 * B);
        assert_eq!(pool.stats().max_memory, 0);
        drop_promptly("pool", pool);
    });
}

/// A child of a `wait_for_growth` root waits at the root for growth; its waker panics; the
/// root's growth serves it; then the child closes while a second one waits with a panicking
/// waker: the child's and the root's books agree all along.
#[test]
fn growth_at_the_root_serves_a_child_request_whose_waker_panics() {
    watched(|| {
        let root = growing(0);
        let c = child(&root, 4, 0);
        let (w1, h1) = panicking();
        let (w2, h2) = panicking();
        let mut first = Box::pin(Arc::clone(&c).allocate_owned(2));
        pending(first.as_mut(), &w1);
        let mut r = c.try_reserve(0).unwrap();
        {
            let mut grow = Box::pin(r.grow(2 * B));
            pending(grow.as_mut(), &w2);
            assert_eq!(root.stats().waiting, 2);
            assert!(on_purpose(|| {
                root.add_max_memory(2 * B);
            }));
            assert_eq!((h1.woken(), h2.woken()), (1, 0));
            books("root", &root, 2, 1);
            books("child", &c, 4, 0); // 2 granted, 2 of the grow's held at the child
            assert!(
                on_purpose(|| c.close()),
                "the grow's waker panics with Closed"
            );
            assert_eq!(h2.woken(), 1);
            assert_eq!(failed(grow.as_mut()), AllocError::Closed);
        }
        books("root", &root, 2, 0);
        books("child", &c, 2, 0);
        let a = done(first.as_mut());
        drop((a, first, r));
        h1.disarm();
        h2.disarm();
        drop((w1, w2));
        idle("root", &root, 0);
        idle("child", &c, 0);
        takes("root", &root, 2);
        drop_promptly("child", c);
        drop_promptly("root", root);
    });
}

// ---------------------------------------------------------------------------------------------
// Overcommit repaid
// ---------------------------------------------------------------------------------------------

/// A child's reservation forced 2 buffers over both budgets; waiters queue in the root (a
/// root allocation whose waker panics, a `reserve_owned` whose waker panics) and in the child
/// (an `allocate_owned` whose waker panics). Shrinking the reservation repays the overcommit
/// first, then serves in FIFO order (README guarantee 11: the child's request joins the
/// root's tail when it climbs); each release passes a panic on and loses nothing.
#[test]
fn overcommit_repayment_serves_panicking_waiters_at_both_levels() {
    watched(|| {
        let root = root(4);
        let c = child(&root, 4, 0);
        let mut r = c.try_reserve(4 * B).unwrap();
        r.force_grow(2 * B).unwrap();
        for (name, pool) in [("root", &root), ("child", &c)] {
            let stats = pool.stats();
            assert_eq!(
                (stats.in_use_bytes, stats.overcommit_bytes),
                (6 * B, 2 * B),
                "{name}: {stats}"
            );
        }
        let (w1, h1) = panicking();
        let (w2, h2) = panicking();
        let (w3, h3) = panicking();
        let mut at_root = Box::pin(root.allocate(1));
        pending(at_root.as_mut(), &w1);
        let mut in_child = Box::pin(Arc::clone(&c).allocate_owned(1));
        pending(in_child.as_mut(), &w2);
        let mut reserve = Box::pin(Arc::clone(&root).reserve_owned(B));
        pending(reserve.as_mut(), &w3);

        // Repays the 2 over, frees 1: the root's head is served.
        assert!(on_purpose(|| r.shrink(3 * B)));
        // The child's request is granted its level in the child and woken to climb; polled
        // (as its task would be), it queues at the root's tail, behind the reservation.
        assert_eq!((h1.woken(), h2.woken(), h3.woken()), (1, 1, 0));
        assert_eq!(root.stats().overcommit_bytes, 0);
        assert_eq!(c.stats().overcommit_bytes, 0);
        books("root", &root, 4, 1);
        books("child", &c, 4, 0);
        pending(in_child.as_mut(), &w2);
        books("root", &root, 4, 2);
        let a = done(at_root.as_mut());
        // The reservation next, then the child's request.
        assert!(on_purpose(|| drop(a)));
        assert_eq!((h2.woken(), h3.woken()), (1, 1));
        books("root", &root, 4, 1);
        books("child", &c, 4, 0);
        assert!(on_purpose(|| r.shrink(B)));
        assert_eq!(h2.woken(), 2);
        books("root", &root, 4, 0);
        books("child", &c, 3, 0);
        let b = done(in_child.as_mut());
        let reserved = done(reserve.as_mut());
        drop((b, reserved, r, at_root, in_child, reserve));
        for h in [&h1, &h2, &h3] {
            h.disarm();
        }
        drop((w1, w2, w3));
        idle("root", &root, 0);
        idle("child", &c, 0);
        takes("child", &c, 4);
        takes("root", &root, 4);
        drop_promptly("child", c);
        drop_promptly("root", root);
    });
}

/// `force_grow` while a panicking waiter is queued wakes nobody; dropping the overcommitted
/// reservation repays and serves it, with the panic passed on once.
#[test]
fn overcommitted_reservation_dropped_serves_a_panicking_grow() {
    watched(|| {
        let pool = root(2);
        let mut big = pool.try_reserve(2 * B).unwrap();
        let mut small = pool.try_reserve(0).unwrap();
        let (waker, hostile) = panicking();
        {
            let mut grow = Box::pin(small.grow(B));
            pending(grow.as_mut(), &waker);
            big.force_grow(3 * B).unwrap();
            assert_eq!(hostile.woken(), 0);
            assert_eq!(pool.stats().overcommit_bytes, 3 * B);
            assert!(on_purpose(|| drop(big)));
            assert_eq!(hostile.woken(), 1);
            books("pool", &pool, 1, 0);
            assert_eq!(pool.stats().overcommit_bytes, 0);
            done(grow.as_mut());
        }
        assert_eq!(small.size(), B);
        drop(small);
        hostile.disarm();
        drop(waker);
        idle("pool", &pool, 0);
        takes("pool", &pool, 2);
        drop_promptly("pool", pool);
    });
}

// ---------------------------------------------------------------------------------------------
// Floors: a floored child's requests waiting in the parent's queue
// ---------------------------------------------------------------------------------------------

/// How the floored child's waiter at the root ends.
#[derive(Clone, Copy, Debug)]
enum FloorEnd {
    /// A root release serves it (its waker panics).
    Served,
    /// The child is closed: it fails with `Closed`, its floor goes back.
    ChildClosed,
    /// The request is cancelled while granted at the root, before it is polled.
    CancelledGranted,
    /// The root is closed: it fails with `Closed`.
    RootClosed,
}

fn floor_case(end: FloorEnd) {
    let root = root(6);
    let f = child(&root, 4, 2);
    books("root", &root, 2, 0);
    let other = root.try_allocate(4).unwrap();
    let (w1, h1) = panicking();
    let (w2, h2) = panicking();
    // Three buffers: the floor's 2 first (README guarantee 15), then it waits at the (full)
    // root for 1 more.
    let mut big = Box::pin(Arc::clone(&f).allocate_owned(3));
    pending(big.as_mut(), &w1);
    assert_eq!(root.stats().waiting, 1, "{end:?}: {}", root.stats());
    // A root request behind it, whose waker panics too (all the root has but the floor, when
    // the one ahead is to be cancelled with its grant).
    let behind_n = if matches!(end, FloorEnd::CancelledGranted) {
        4
    } else {
        1
    };
    let mut behind = Box::pin(Arc::clone(&root).allocate_owned(behind_n));
    pending(behind.as_mut(), &w2);
    books("root", &root, 6, 2);
    let mut other = Some(other);
    let mut kept = Vec::new();
    match end {
        FloorEnd::Served => {
            // Serves both: two panics, one passed on.
            assert!(on_purpose(|| drop(other.take())));
            assert_eq!((h1.woken(), h2.woken()), (1, 1));
            let allocation = done(big.as_mut());
            assert_eq!(allocation.length(), 3);
            books("child", &f, 3, 0);
            books("root", &root, 4, 0); // the floor's 2, the 1 above it, the 1 behind
            kept.push(allocation);
            kept.push(done(behind.as_mut()));
        }
        FloorEnd::ChildClosed => {
            assert!(on_purpose(|| f.close()));
            assert_eq!(h1.woken(), 1);
            // It fails, and gives back what it took of the floor (retired with the child, so
            // to the root), which serves the root's request behind: that waker's panic is
            // passed on by this poll, after every book is done.
            let mut result = None;
            let panicked = on_purpose(|| result = Some(failed(big.as_mut())));
            assert!(panicked || result == Some(AllocError::Closed), "{result:?}");
            assert_eq!(h2.woken(), 1);
            books("root", &root, 5, 0);
            kept.push(done(behind.as_mut()));
            drop(other.take());
        }
        FloorEnd::CancelledGranted => {
            assert!(on_purpose(|| drop(other.take())));
            assert_eq!((h1.woken(), h2.woken()), (1, 0));
            books("root", &root, 3, 1);
            // Cancelled with its grant, never polled: its 1 at the root and its 2 of the
            // floor go back, and serve the 4 behind.
            assert!(on_purpose(|| drop(big)));
            assert_eq!(h2.woken(), 1);
            big = Box::pin(Arc::clone(&f).allocate_owned(1));
            books("child", &f, 0, 0);
            books("root", &root, 6, 0); // the floor and the 4 behind
            kept.push(done(behind.as_mut()));
        }
        FloorEnd::RootClosed => {
            assert!(on_purpose(|| root.close()));
            assert_eq!((h1.woken(), h2.woken()), (1, 1));
            assert_eq!(failed(big.as_mut()), AllocError::Closed);
            assert_eq!(failed(behind.as_mut()), AllocError::Closed);
            // The root's close closes the child: its floor goes back.
            books("root", &root, 4, 0);
            drop(other.take());
        }
    }
    drop((big, behind, kept));
    h1.disarm();
    h2.disarm();
    drop((w1, w2));
    idle("child", &f, 0);
    match end {
        FloorEnd::Served | FloorEnd::CancelledGranted => {
            idle("root", &root, 2);
            takes("child", &f, 4);
            takes("root", &root, 4);
        }
        FloorEnd::ChildClosed => {
            idle("root", &root, 0);
            takes("root", &root, 6);
        }
        FloorEnd::RootClosed => idle("root", &root, 0),
    }
    drop_promptly("child", f);
    idle("root", &root, 0);
    if !matches!(end, FloorEnd::RootClosed) {
        takes("root", &root, 6);
    }
    drop_promptly("root", root);
}

#[test]
fn floored_childs_request_at_the_root_with_panicking_wakers_every_ending() {
    watched(|| {
        for end in [
            FloorEnd::Served,
            FloorEnd::ChildClosed,
            FloorEnd::CancelledGranted,
            FloorEnd::RootClosed,
        ] {
            floor_case(end);
        }
    });
}

/// The last handle of a floored child dropped while its request (an owned future, whose waker
/// panics) waits in the root: the future keeps the child alive; the root's release serves it.
/// Then dropping the future ends the child: its floor goes back to the root.
#[test]
fn floored_childs_owned_request_outlives_its_handle_and_a_panicking_wake() {
    watched(|| {
        let root = root(6);
        let f = child(&root, 4, 2);
        let other = root.try_allocate(4).unwrap();
        let (waker, hostile) = panicking();
        let mut big = Box::pin(Arc::clone(&f).allocate_owned(3));
        pending(big.as_mut(), &waker);
        drop(f); // not the last handle: the future holds one
        assert!(on_purpose(|| drop(other)));
        assert_eq!(hostile.woken(), 1);
        let allocation = done(big.as_mut());
        drop(big);
        books("root", &root, 3, 0); // the floor's 2, and 1 above it
        drop(allocation); // the child's last handle: its floor goes back too
        hostile.disarm();
        drop(waker);
        idle("root", &root, 0);
        takes("root", &root, 6);
        drop_promptly("root", root);
    });
}

// ---------------------------------------------------------------------------------------------
// The blocking shim beside panicking async wakers
// ---------------------------------------------------------------------------------------------

/// An `allocate_timeout` at the head times out; its leaving serves the async request behind
/// it, whose waker panics on the blocking thread. Whatever the timed call returns (its
/// `TimedOut`, or the waker's panic), the books are exact and the pool works.
#[test]
fn timed_out_blocking_head_serves_a_panicking_async_waiter_behind() {
    watched(|| {
        let pool = root(2);
        let h1 = pool.try_allocate(1).unwrap();
        let h2 = pool.try_allocate(1).unwrap();
        let timed = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                let mut result = None;
                let panicked = on_purpose(|| {
                    result = Some(
                        pool.allocate_timeout(2, Duration::from_millis(300) * SLOWDOWN)
                            .map(|_| ()),
                    );
                });
                (panicked, result)
            })
        };
        wait_waiting(&pool, 1);
        let (waker, hostile) = panicking();
        let mut behind = Box::pin(pool.allocate(1));
        pending(behind.as_mut(), &waker);
        drop(h1); // one free: the head needs two, the one behind waits its turn
        books("pool", &pool, 1, 2);
        let (panicked, result) = timed.join().unwrap();
        assert!(
            panicked || result == Some(Err(AllocError::TimedOut)),
            "the timed call: panicked {panicked}, returned {result:?}"
        );
        assert_eq!(hostile.woken(), 1);
        assert_eq!(pool.stats().timed_out, 1);
        books("pool", &pool, 2, 0);
        let a = done(behind.as_mut());
        drop((a, h2, behind));
        hostile.disarm();
        drop(waker);
        idle("pool", &pool, 0);
        takes("pool", &pool, 2);
        drop_promptly("pool", pool);
    });
}

/// A blocking waiter whose thread is woken while an async waker ahead of it panics in the same
/// give-back; and a timed wait that is served. Many rounds, a child pool's blocking and async
/// requests mixed at the root.
#[test]
fn blocking_and_timed_waiters_mixed_with_panicking_wakers_over_rounds() {
    watched(|| {
        let root = root(4);
        let c = child(&root, 4, 0);
        for round in 0..common::rounds(30, 3) {
            let hold = root.try_allocate(4).unwrap();
            let (w1, h1) = panicking();
            let mut a = Box::pin(Arc::clone(&c).allocate_owned(1));
            pending(a.as_mut(), &w1);
            let blocking = {
                let c = Arc::clone(&c);
                thread::spawn(move || c.allocate_blocking(1))
            };
            wait_waiting(&root, 2);
            let timed = {
                let root = Arc::clone(&root);
                thread::spawn(move || root.allocate_timeout(2, Duration::from_secs(10)))
            };
            wait_waiting(&root, 3);
            assert!(on_purpose(|| drop(hold)), "round {round}");
            let b = blocking.join().unwrap().unwrap();
            let t = timed.join().unwrap().unwrap();
            let x = done(a.as_mut());
            books("root", &root, 4, 0);
            books("child", &c, 2, 0);
            drop((b, t, x, a));
            h1.disarm();
            drop(w1);
            idle("root", &root, 0);
            idle("child", &c, 0);
        }
        takes("child", &c, 4);
        takes("root", &root, 4);
        drop_promptly("child", c);
        drop_promptly("root", root);
    });
}

// ---------------------------------------------------------------------------------------------
// close() and the pool's drop while panicking wakers are queued
// ---------------------------------------------------------------------------------------------

/// A root closed with every kind of request queued at its level, each with a hostile waker:
/// an allocation whose waker panics on wake, a `PollAllocate` whose waker panics on drop, a
/// child's owned request whose waker re-enters the tree and panics, a `grow` of a root
/// reservation, a `reserve_owned` whose waker panics, and a blocking `reserve_blocking`. The
/// close passes one panic on; every request fails with `Closed`; nothing is lost.
#[test]
fn close_with_every_kind_of_hostile_waiter_queued() {
    watched(|| {
        let root = root(2);
        let c = child(&root, 2, 0);
        let hold = root.try_allocate(2).unwrap();
        let mut r = root.try_reserve(0).unwrap();
        let (w1, h1) = panicking();
        let (w2, h2) = hostile();
        let (w3, h3) = panicking();
        let (w4, h4) = panicking();
        let (w5, h5) = panicking();
        {
            let (root, c) = (Arc::clone(&root), Arc::clone(&c));
            h3.on_wake(move || {
                assert_eq!(root.try_allocate(1).unwrap_err(), AllocError::Closed);
                assert_eq!(c.try_allocate(1).unwrap_err(), AllocError::Closed);
                assert!(root.stats().closed && c.stats().closed);
                c.close();
                root.close();
            });
        }
        let mut a = Box::pin(root.allocate(1));
        pending(a.as_mut(), &w1);
        let mut poller = PollAllocate::new(Arc::clone(&root));
        assert!(
            poller
                .poll_allocate(&mut Context::from_waker(&w2), 1)
                .is_pending()
        );
        h2.drop_panics.store(true, SeqCst);
        let mut from_child = Box::pin(Arc::clone(&c).allocate_owned(1));
        pending(from_child.as_mut(), &w3);
        let reserver = {
            let root = Arc::clone(&root);
            thread::spawn(move || root.reserve_blocking(B).map(|r| r.size()))
        };
        wait_waiting(&root, 4);
        let mut owned = Box::pin(Arc::clone(&root).reserve_owned(B));
        pending(owned.as_mut(), &w5);
        {
            let mut grow = Box::pin(r.grow(B));
            pending(grow.as_mut(), &w4);
            books("root", &root, 2, 6);
            assert!(on_purpose(|| root.close()));
            assert_eq!(
                (h1.woken(), h3.woken(), h4.woken(), h5.woken()),
                (1, 1, 1, 1)
            );
            assert_eq!(failed(grow.as_mut()), AllocError::Closed);
        }
        assert_eq!(reserver.join().unwrap(), Err(AllocError::Closed));
        assert_eq!(failed(a.as_mut()), AllocError::Closed);
        assert_eq!(failed(from_child.as_mut()), AllocError::Closed);
        assert_eq!(failed(owned.as_mut()), AllocError::Closed);
        match poller.poll_allocate(&mut Context::from_waker(Waker::noop()), 1) {
            Poll::Ready(Err(AllocError::Closed)) => {}
            other => panic!("the poller: {other:?}"),
        }
        books("root", &root, 2, 0);
        books("child", &c, 0, 0);
        drop((hold, r, a, from_child, owned, poller));
        for h in [&h1, &h2, &h3, &h4, &h5] {
            h.disarm();
        }
        drop((w1, w2, w3, w4, w5));
        idle("root", &root, 0);
        idle("child", &c, 0);
        assert_eq!(root.try_allocate(1).unwrap_err(), AllocError::Closed);
        drop_promptly("child", c);
        drop_promptly("root", root);
    });
}

/// The root's last handle dropped while a child's owned request, whose waker panics, waits in
/// the root's queue and a root allocation is out (given back by another thread later): the
/// drop fails the request, waits for the allocation, and passes the panic on only once it
/// returns; the child ends closed with exact books.
#[test]
fn root_dropped_while_a_childs_request_with_a_panicking_waker_waits_at_it() {
    watched(|| {
        let root = root(2);
        let c = child(&root, 2, 0);
        let hold = root.try_allocate(2).unwrap();
        let (waker, hostile) = panicking();
        let mut request = Box::pin(Arc::clone(&c).allocate_owned(1));
        pending(request.as_mut(), &waker);
        books("root", &root, 2, 1);
        let releaser = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            drop(hold);
        });
        let root = Arc::into_inner(root).expect("the last handle");
        assert!(
            on_purpose(|| drop(root)),
            "the waker's panic after the barrier"
        );
        releaser.join().unwrap();
        assert_eq!(hostile.woken(), 1);
        assert_eq!(failed(request.as_mut()), AllocError::Closed);
        drop(request);
        hostile.disarm();
        drop(waker);
        idle("child", &c, 0);
        assert!(c.stats().closed);
        assert_eq!(c.try_allocate(1).unwrap_err(), AllocError::Closed);
        drop_promptly("child", c);
    });
}

/// A floored child's last handle dropped while two root requests wait, each with a waker that
/// panics: the drop closes the child, whose idle part of the floor goes back at once (serving
/// the first), and waits for the child's allocation; dropped by another thread, its part of
/// the floor serves the second. Each panic comes out where its give-back ran.
#[test]
fn floored_child_dropped_gives_its_floor_to_a_panicking_root_waiter() {
    watched(|| {
        let root = root(4);
        let f = child(&root, 4, 2);
        let mine = f.try_allocate(1).unwrap();
        let other = root.try_allocate(2).unwrap();
        let (w1, h1) = panicking();
        let (w2, h2) = panicking();
        let mut first = Box::pin(root.allocate(1));
        pending(first.as_mut(), &w1);
        let mut second = Box::pin(root.allocate(1));
        pending(second.as_mut(), &w2);
        books("root", &root, 4, 2);
        let releaser = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            // The child is closed by now: this buffer of the floor goes back, serving `second`.
            on_purpose(|| drop(mine))
        });
        let f = Arc::into_inner(f).expect("the last handle");
        let panicked = on_purpose(|| drop(f));
        let releaser_panicked = releaser.join().unwrap();
        assert!(
            panicked && releaser_panicked,
            "{panicked} {releaser_panicked}"
        );
        assert_eq!((h1.woken(), h2.woken()), (1, 1));
        books("root", &root, 4, 0);
        let a = done(first.as_mut());
        let b = done(second.as_mut());
        assert_eq!((a.length(), b.length()), (1, 1));
        drop((a, b, other, first, second));
        h1.disarm();
        h2.disarm();
        drop((w1, w2));
        idle("root", &root, 0);
        takes("root", &root, 4);
        drop_promptly("root", root);
    });
}

// ---------------------------------------------------------------------------------------------
// Reclaimers whose frees wake panicking wakers, and whose Drop is hostile
// ---------------------------------------------------------------------------------------------

/// A cache of single-buffer allocations; `reclaim` frees entries up to the target, either at
/// once (inside `reclaim`) or in its future's first poll.
struct Cache {
    entries: Mutex<Vec<BufPoolAllocation>>,
    in_future: bool,
    /// `reclaim` frees nothing.
    refuses: bool,
    /// Its `Drop` panics (unless the thread is already unwinding).
    drop_panics: bool,
    /// Its `Drop` panics even while the thread unwinds.
    drop_panics_always: bool,
}

impl Cache {
    fn new(pool: &BufPool, buffers: usize, in_future: bool) -> Arc<Cache> {
        Arc::new(Cache {
            entries: Mutex::new(
                (0..buffers)
                    .map(|_| pool.try_allocate(1).unwrap())
                    .collect(),
            ),
            in_future,
            refuses: false,
            drop_panics: false,
            drop_panics_always: false,
        })
    }

    fn take(&self, target: usize) -> Vec<BufPoolAllocation> {
        let mut entries = self.entries.lock().unwrap();
        let mut taken = Vec::new();
        while taken.len() * B < target && !entries.is_empty() {
            taken.push(entries.pop().unwrap());
        }
        taken
    }
}

/// Drops `taken` one by one (a waker's panic from one drop must not keep the others).
fn free(taken: Vec<BufPoolAllocation>) -> usize {
    let freed = taken.len() * B;
    let mut panic = None;
    for entry in taken {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| drop(entry))) {
            panic.get_or_insert(payload);
        }
    }
    if let Some(payload) = panic {
        resume_unwind(payload);
    }
    freed
}

impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        self.entries.lock().unwrap().len() * B
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        if self.refuses {
            return Box::pin(async { 0 });
        }
        let taken = self.take(target);
        if self.in_future {
            Box::pin(async move { free(taken) })
        } else {
            let freed = free(taken);
            Box::pin(async move { freed })
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if self.drop_panics_always || (self.drop_panics && !thread::panicking()) {
            panic!("{ON_PURPOSE} (reclaimer drop)");
        }
    }
}

/// The request driving a round is itself served by what the reclaimer frees, and its own
/// waker panics on that wake (inside `reclaim`, or inside the future's poll): the driver's
/// poll passes the panic on, the request stays valid and is served, the books are exact.
#[test]
fn reclaim_frees_wake_the_drivers_own_panicking_waker() {
    watched(|| {
        for in_future in [false, true] {
            let pool = root(4);
            let cache = Cache::new(&pool, 4, in_future);
            let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
            let (waker, hostile) = panicking();
            let mut driver = Box::pin(Arc::clone(&pool).allocate_owned(3));
            let first_poll = on_purpose(|| {
                let _ = poll(driver.as_mut(), &waker);
            });
            assert!(
                first_poll,
                "in_future {in_future}: the driver's own waker panics"
            );
            assert_eq!(pool.stats().reclaim_rounds, 1);
            let a = served(driver.as_mut(), &waker);
            assert_eq!(a.length(), 3);
            books("pool", &pool, 4, 0);
            assert_eq!(cache.estimate(), B);
            drop((a, driver, handle));
            hostile.disarm();
            drop(waker);
            drop(cache);
            idle("pool", &pool, 0);
            takes("pool", &pool, 4);
            drop_promptly("pool", pool);
        }
    });
}

/// README "Reclaim": a waiting request's reclaimers are asked "until the shortfall is covered
/// or every one was asked", and only "a round that runs out of reclaimers without covering
/// its shortfall ... stalls the pool". A round whose honest reclaimer covered the shortfall
/// (its driver was served) but whose frees woke the driver's panicking waker is counted as
/// finished and not covered, and stalls the pool: the next waiter, 1 buffer short with the
/// cache still holding 1 buffer (estimate 64), is never asked for, and waits until some
/// unrelated release. Without the panic (the control run), it is served by reclaim.
#[test]
fn reclaim_round_ended_by_a_waker_panic_does_not_stall_the_next_waiter() {
    watched(|| {
        for (in_future, wake_panics) in [(false, false), (true, false), (false, true), (true, true)]
        {
            let pool = root(4);
            let cache = Cache::new(&pool, 4, in_future);
            let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
            let (waker, hostile) = hostile();
            hostile.wake_panics.store(wake_panics, SeqCst);
            let mut driver = Box::pin(Arc::clone(&pool).allocate_owned(3));
            let a = served(driver.as_mut(), &waker);
            hostile.disarm();
            assert_eq!(cache.estimate(), B);
            // One buffer short; the cache holds one: a round serves it.
            let mut second = Box::pin(Arc::clone(&pool).allocate_owned(1));
            let mut b = None;
            for _ in 0..10 {
                if let Poll::Ready(result) = poll(second.as_mut(), Waker::noop()) {
                    b = Some(result.expect("served"));
                    break;
                }
            }
            let stats = pool.stats();
            assert!(
                b.is_some(),
                "in_future {in_future}, wake_panics {wake_panics}: the second waiter is not \
                 served, the cache still holds {} bytes: {stats}",
                cache.estimate()
            );
            drop((a, b, driver, second, handle));
            drop(waker);
            drop(cache);
            idle("pool", &pool, 0);
            takes("pool", &pool, 4);
            drop_promptly("pool", pool);
        }
    });
}

/// Polls (as a task woken, or panicking, would be polled again) until served.
#[track_caller]
fn served<F>(mut future: Pin<&mut F>, waker: &Waker) -> BufPoolAllocation
where
    F: Future<Output = Result<BufPoolAllocation, AllocError>> + ?Sized,
{
    for _ in 0..10 {
        match caught_poll(future.as_mut(), waker) {
            Ok(Poll::Ready(Ok(allocation))) => return allocation,
            Ok(Poll::Ready(Err(error))) => panic!("expected a grant, got {error:?}"),
            Ok(Poll::Pending) | Err(()) => {}
        }
    }
    panic!("not served after 10 polls");
}

/// Polls, turning a purposeful panic into `Err(())`.
fn caught_poll<F: Future + ?Sized>(
    future: Pin<&mut F>,
    waker: &Waker,
) -> Result<Poll<F::Output>, ()> {
    let mut out = None;
    if on_purpose(|| out = Some(poll(future, waker))) {
        Err(())
    } else {
        Ok(out.unwrap())
    }
}

/// A reclaimer frees into a queue where the driver is a child's request waiting at the root
/// behind a root request whose waker panics: the child request's poll (the driver) gets that
/// panic; nothing is lost at either level and both are served.
#[test]
fn a_childs_driver_at_the_root_frees_into_a_panicking_head() {
    watched(|| {
        let root = root(4);
        let c = child(&root, 4, 0);
        let cache = Cache::new(&root, 4, true);
        let (w1, h1) = hostile();
        let mut head = Box::pin(root.allocate(2));
        pending(head.as_mut(), &w1); // no reclaimer yet: no round
        let handle = root.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
        h1.wake_panics.store(true, SeqCst);
        let mut driver = Box::pin(Arc::clone(&c).allocate_owned(2));
        let panicked = on_purpose(|| {
            let _ = poll(driver.as_mut(), Waker::noop());
        });
        let stats = root.stats();
        assert!(stats.reclaim_rounds >= 1 || !panicked, "{stats}");
        // Whoever drives, both are served once the task of each polls again.
        let mut a = None;
        let mut b = None;
        for _ in 0..10 {
            if a.is_none() {
                if let Ok(Poll::Ready(Ok(x))) = caught_poll(head.as_mut(), &w1) {
                    a = Some(x);
                }
            }
            if b.is_none() {
                if let Ok(Poll::Ready(Ok(x))) = caught_poll(driver.as_mut(), Waker::noop()) {
                    b = Some(x);
                }
            }
        }
        assert!(
            a.is_some() && b.is_some(),
            "not both served: {}",
            root.stats()
        );
        assert!(h1.woken() >= 1);
        books("root", &root, 4, 0);
        books("child", &c, 2, 0);
        drop((a, b, head, driver, handle));
        h1.disarm();
        drop(w1);
        idle("root", &root, 0);
        idle("child", &c, 0);
        takes("child", &c, 4);
        takes("root", &root, 4);
        drop_promptly("child", c);
        drop_promptly("root", root);
    });
}

/// A child pool with two registrations is dropped: one reclaimer's `Drop` panics, the other's
/// (a cache that refuses to reclaim) only owner is its registration and its entries, given
/// back when it is dropped, serve a root waiter whose waker panics. The child's drop passes a panic on after its barrier; no
/// byte stays counted at the root.
#[test]
fn child_dropped_with_a_panicking_reclaimer_drop_and_a_cache_only_its_registration_owns() {
    watched(|| {
        let root = root(4);
        let c = child(&root, 4, 0);
        let bad = Arc::new(Cache {
            entries: Mutex::new(Vec::new()),
            in_future: false,
            refuses: false,
            drop_panics: true,
            drop_panics_always: false,
        });
        let cache = Arc::new(Cache {
            entries: Mutex::new((0..4).map(|_| c.try_allocate(1).unwrap()).collect()),
            in_future: false,
            refuses: true,
            drop_panics: false,
            drop_panics_always: false,
        });
        // Registered first and last, so either order of the drops is tried.
        let h_bad = c.register_reclaimer("bad", 0, bad as _);
        let h_cache = c.register_reclaimer("cache", 1, cache as _);
        let (waker, hostile) = panicking();
        // Its round asks both; the cache refuses: the pool stalls, the request waits.
        let mut waiting = Box::pin(root.allocate(2));
        pending(waiting.as_mut(), &waker);
        assert_eq!(root.stats().reclaim_rounds, 1);
        let c = Arc::into_inner(c).expect("the last handle");
        assert!(on_purpose(|| drop(c)), "a panic after the barrier");
        assert_eq!(hostile.woken(), 1);
        books("root", &root, 2, 0);
        let a = done(waiting.as_mut());
        drop((a, waiting, h_bad, h_cache));
        hostile.disarm();
        drop(waker);
        idle("root", &root, 0);
        takes("root", &root, 4);
        drop_promptly("root", root);
    });
}

// ---------------------------------------------------------------------------------------------
// A panic escaping to the caller
// ---------------------------------------------------------------------------------------------

/// User code panics while it holds, over a three-level tree, a leaf allocation, a mid
/// reservation with an allocation out of it, a pending `grow` waiting at the root, a pending
/// owned allocation and a `PendingWakeUps` owed to a root waiter whose waker panics: the
/// unwinding drops them all (the waker's panic during the unwinding is not passed on). Every
/// pool's books are exact afterwards and the whole budget can be taken.
#[test]
fn a_panic_escaping_the_caller_leaves_every_pools_books_right() {
    watched(|| {
        let root = root(8);
        let mid = child(&root, 8, 0);
        let leaf = child(&mid, 8, 0);
        let (waker, hostile) = panicking();
        let outside = root.try_allocate(1).unwrap();
        let mut root_waiter = Box::pin(Arc::clone(&root).allocate_owned(2));
        let escaped = catch_unwind(AssertUnwindSafe(|| {
            let _leaf_allocation = leaf.try_allocate(2).unwrap();
            let mut r = mid.try_reserve(3 * B).unwrap();
            let _out_of_r = r.allocate(1).unwrap();
            let mut big = mid.try_reserve(2 * B).unwrap(); // the root full: 1 + 2 + 3 + 2
            pending(root_waiter.as_mut(), &waker);
            let mut grow = Box::pin(r.grow(B));
            pending(grow.as_mut(), Waker::noop());
            let mut owned = Box::pin(Arc::clone(&leaf).allocate_owned(1));
            pending(owned.as_mut(), Waker::noop());
            // Shrinking gives 2 to the root waiter; its wake-up is owed, run on unwinding.
            let _owed = big.shrink_to_deferring_wakeups(0);
            // (The leaf's request may be granted at the mid level, woken to climb.)
            assert_eq!(root.stats().in_use_bytes, 8 * B);
            panic!("user code fails while it holds all of it");
        }));
        let payload = escaped.expect_err("the user's panic escapes");
        assert_eq!(
            message(&*payload),
            "user code fails while it holds all of it"
        );
        assert_eq!(hostile.woken(), 1);
        let got = done(root_waiter.as_mut());
        assert_eq!(got.length(), 2);
        drop((got, outside, root_waiter));
        hostile.disarm();
        drop(waker);
        for (name, pool) in [("leaf", &leaf), ("mid", &mid), ("root", &root)] {
            idle(name, pool, 0);
            takes(name, pool, 8);
        }
        drop_promptly("leaf", leaf);
        drop_promptly("mid", mid);
        drop_promptly("root", root);
    });
}

// ---------------------------------------------------------------------------------------------
// Several hostile `Drop`s in one shutdown (run in a child process: an abort must not take
// the whole test binary down)
// ---------------------------------------------------------------------------------------------

/// Set in the child process to the name of the scenario it runs.
const CHILD_ENV: &str = "HOSTILE_CODE_MORE_CHILD";

/// Runs the test `name` of this binary in a child process with [`CHILD_ENV`] set, and
/// returns whether it passed (an abort is a failure), with its output.
fn in_child_process(name: &str) -> (bool, String) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, name)
        .output()
        .expect("run the child process");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success() && text.contains("1 passed"), text)
}

fn two_panicking_reclaimer_drops_case(name: &str, always: bool) {
    if cfg!(miri) {
        return; // no processes under Miri
    }
    if std::env::var(CHILD_ENV).as_deref() != Ok(name) {
        let (passed, output) = in_child_process(name);
        assert!(passed, "the scenario failed or aborted:\n{output}");
        return;
    }
    watched(move || {
        let root = root(4);
        let c = child(&root, 4, 0);
        let bad = || {
            Arc::new(Cache {
                entries: Mutex::new(Vec::new()),
                in_future: false,
                refuses: true,
                drop_panics: true,
                drop_panics_always: always,
            })
        };
        let cache = Arc::new(Cache {
            entries: Mutex::new((0..4).map(|_| c.try_allocate(1).unwrap()).collect()),
            in_future: false,
            refuses: true,
            drop_panics: false,
            drop_panics_always: false,
        });
        let h1 = c.register_reclaimer("bad 1", 0, bad() as _);
        let h2 = c.register_reclaimer("cache", 1, cache as _);
        let h3 = c.register_reclaimer("bad 2", 2, bad() as _);
        books("root", &root, 4, 0);
        let c = Arc::into_inner(c).expect("the last handle");
        assert!(on_purpose(|| drop(c)));
        drop((h1, h2, h3));
        idle("root", &root, 0);
        takes("root", &root, 4);
        drop_promptly("root", root);
    });
}

/// README guarantee 17 ("reclaimers' panics ... lose no byte and hang nothing") and the
/// pool's drop, which catches a panic of dropping its registrations: a child pool dropped
/// with two registrations whose reclaimers' `Drop`s panic (unless already unwinding), and a
/// third whose cache holds the parent's bytes. One panic passed on, the cache's bytes back.
#[test]
fn child_pool_dropped_with_two_panicking_reclaimer_drops() {
    two_panicking_reclaimer_drops_case(
        "child_pool_dropped_with_two_panicking_reclaimer_drops",
        false,
    );
}

/// The same with `Drop`s that panic unconditionally (legal Rust): the pool drops its
/// registrations as one `Vec` (src/pool.rs `close_for_barrier`, `drop(registrations)` under a
/// single `catch_unwind`), so the second reclaimer's panic comes while the first unwinds and
/// the process aborts ("panic in a destructor during cleanup"), instead of each drop being
/// caught on its own as every other piece of user code is.
#[test]
fn child_pool_dropped_with_two_reclaimer_drops_that_always_panic() {
    two_panicking_reclaimer_drops_case(
        "child_pool_dropped_with_two_reclaimer_drops_that_always_panic",
        true,
    );
}

/// A reclaimer that says it holds a buffer, whose future never finishes, and whose `Drop`
/// always panics.
struct Stuck;

impl Reclaimer for Stuck {
    fn estimate(&self) -> usize {
        B
    }

    fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        Box::pin(std::future::pending())
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        panic!("{ON_PURPOSE} (reclaimer drop)");
    }
}

/// The same as above for the registrations a round of reclaim holds: both are unregistered
/// while a round that holds them is in flight, and the round's end (its driver cancelled)
/// drops the last references. Each drop is caught on its own; the first panic goes on to
/// the cancel, nothing aborts, nothing is lost.
#[test]
fn a_round_holding_the_last_references_to_two_panicking_reclaimers_ends() {
    let name = "a_round_holding_the_last_references_to_two_panicking_reclaimers_ends";
    if cfg!(miri) {
        return; // no processes under Miri
    }
    if std::env::var(CHILD_ENV).as_deref() != Ok(name) {
        let (passed, output) = in_child_process(name);
        assert!(passed, "the scenario failed or aborted:\n{output}");
        return;
    }
    watched(|| {
        let pool = root(2);
        let held = pool.try_allocate(2).unwrap();
        let h1 = pool.register_reclaimer("stuck 1", 0, Arc::new(Stuck) as _);
        let h2 = pool.register_reclaimer("stuck 2", 0, Arc::new(Stuck) as _);
        let waker = Waker::noop();
        let mut waiter = Box::pin(pool.allocate(1));
        assert!(
            waiter
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_pending()
        );
        assert_eq!(
            pool.stats().reclaim_rounds,
            0,
            "the round is still in flight"
        );
        drop((h1, h2));
        assert!(on_purpose(|| drop(waiter)));
        drop(held);
        idle("pool", &pool, 0);
        takes("pool", &pool, 2);
        drop_promptly("pool", pool);
    });
}

/// event-listener wakes a listener's waker under its lock and counts the notification only
/// once the wake returns: a task's waker that panicked there left its books one short, and
/// dropping that listener later underflowed them (a panic inside event-listener, not the
/// waker's). The pool's listeners now hand event-listener a waker of the crate's that runs
/// no user code there: the task's waker runs (its panic passed on) after event-listener
/// returns. Here: a `drained()`
/// future whose waker panics when the last allocation goes; the release passes the panic
/// on; the future's drop, and later drains, are clean.
#[test]
fn a_drain_waiters_panicking_waker_leaves_the_drain_event_sound() {
    watched(|| {
        let pool = root(2);
        for round in 0..3 {
            let a = pool.try_allocate(1).unwrap();
            let (waker, hostile) = panicking();
            let mut drained = Box::pin(pool.drained());
            pending(drained.as_mut(), &waker);
            let mut calm = Box::pin(pool.drained());
            pending(calm.as_mut(), Waker::noop());
            assert!(on_purpose(|| drop(a)), "round {round}");
            assert_eq!(hostile.woken(), 1);
            assert!(poll(calm.as_mut(), Waker::noop()).is_ready());
            drop(drained);
            drop(calm);
            hostile.disarm();
            drop(waker);
        }
        let mut again = Box::pin(pool.drained());
        assert!(poll(again.as_mut(), Waker::noop()).is_ready());
        idle("pool", &pool, 0);
        takes("pool", &pool, 2);
    });
}

/// A child's `try_allocate` that takes part of its floor, then finds the root full, puts the
/// floor part back before it fails; the refill wakes a request waiting for that floor, whose
/// waker panics: the try passes the panic on (its `# Panics`), with the books settled, and
/// the request waiting for the floor is not lost. (`tests/race_adversarial.rs`'s hostile
/// waker stress met this once in ~100 runs, where its worker assumed a try runs no waker.)
#[test]
fn a_childs_failing_try_passes_on_the_panic_of_a_floor_waiter_it_woke() {
    watched(|| {
        let r = root(8);
        let c = child(&r, 16, 4);
        let holder = c.try_allocate(3).unwrap();
        // 7 buffers: the root can serve 4 beyond the floor, so it needs 3 of the floor's
        // (1 free): it waits for the floor, in no queue.
        let (waker, hostile) = panicking();
        let mut request = Box::pin(c.allocate(7));
        pending(request.as_mut(), &waker);
        // The root's other 4 buffers go to a root allocation: nothing free above the floor.
        let root_held = r.try_allocate(4).unwrap();
        books("root", &r, 8, 0);
        // The try takes the floor's free buffer, climbs with 1, finds the root full, and
        // puts the floor's buffer back: that refill wakes the request (user code).
        assert!(on_purpose(|| {
            assert_eq!(c.try_allocate(2).unwrap_err(), AllocError::WouldBlock);
        }));
        assert_eq!(hostile.woken(), 1);
        books("root", &r, 8, 0);
        // The holder's 3 and the waiting request's 7 (it holds its own level while it
        // waits for the floor).
        books("child", &c, 10, 0);
        hostile.disarm();
        // Still waiting (it needs 3 of the floor); served once the holder goes.
        pending(request.as_mut(), &waker);
        drop(holder);
        drop(root_held);
        let got = done(request.as_mut());
        assert_eq!(got.allocated_bytes(), 7 * B);
        drop(got);
        drop(request);
        drop(waker);
        idle("child", &c, 0);
        idle("root", &r, 4);
        takes("child", &c, 8);
    });
}
