//! Issue 18: what a panic (a waker's `wake`, `clone` or `drop`) or a failure in the middle
//! of a chain of pools must not cost, and the promises around it.
//!
//! 1. A panicking `wake()` must not make a child pool lose bytes: when a release, a
//!    reservation's drop or shrink, or a cancel gives a child's bytes back level by level and
//!    one level's give-back wakes a waker that panics, every other level is still given back.
//! 2. A request that fails at an ancestor during a poll that unwinds (the failure's give-back
//!    wakes a panicking waker) must not give its lower levels back a second time when dropped.
//! 4. A grant given back without being taken must not leave `stats()` with a mean wait above
//!    the longest wait, nor make a count go down.
//! 5. A child's `set_max_memory` shrink fails (`ExceedsBudget`) its requests that can no
//!    longer fit, wherever they wait (its parent's queue too).
//! 7. `QueueFull` comes only at once: a request that already waits in its own pool and then
//!    finds an ancestor's queue full keeps waiting.
//!
//! Plus a bounded stress test: threads over a three-level tree allocate, reserve, shrink and
//! cancel with wakers of which about 5% panic in `wake`, `clone` or `drop`; and two
//! deterministic tests (`other_*`) for the ways a waker whose `drop` panics loses bytes, found
//! by that stress test (not in the list, same promise: guarantee 9).
//!
//! Every test runs under a watchdog. The checks after the bug is triggered are soft
//! ([`Checks`]): each failure is printed and collected, the test goes on to its end (the pool
//! drops included, each with a timeout of its own, so a hang is reported as a hang), and the
//! test fails at the end with the whole list. Pools are leaked, never dropped, while a test
//! unwinds ([`LeakOnUnwind`]), so a failure never turns into a hang in the unwinding.

mod common;

use std::any::Any;
use std::borrow::Borrow;
use std::fmt::Debug;
use std::future::Future;
use std::ops::Deref;
use std::panic::{AssertUnwindSafe, Location, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use common::{Rng, SLOWDOWN, rounds, watchdog};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolBuilder, BufPoolCfg, BufferSize, PollAllocate,
    PoolStats, Reservation,
};

/// One buffer: every pool here has 64-byte buffers.
const B: usize = 64;

/// The watchdog of each deterministic test, in seconds (a test may wait [`DROP_WITHIN`] for
/// each of a dozen pool drops that hang today). [`watchdog`] stretches it by [`SLOWDOWN`]
/// under Miri.
const WATCHDOG: u64 = 60;

/// How long a pool's drop may take before it counts as a hang: 2 s, stretched by [`SLOWDOWN`]
/// under Miri (its virtual clock advances 5 µs per basic block interpreted, so a drop that
/// makes progress can take far longer than natively; a drop that really hangs leaves every
/// thread blocked, and Miri then jumps its clock to the timeout at once).
const DROP_WITHIN: Duration = Duration::from_secs(2 * SLOWDOWN as u64);

/// The message of the test wakers' `wake` panic.
const WAKE_PANIC: &str = "test waker panics on wake, on purpose";

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: B * buffers,
    }
}

// ---------------------------------------------------------------------------------------------
// Plumbing: soft checks, catching panics, pools that leak while unwinding, timed pool drops
// ---------------------------------------------------------------------------------------------

/// Collects failures instead of stopping at the first, so a test reports everything that went
/// wrong (wrong numbers, panics, hangs of the pool drops) and still runs to its end.
struct Checks {
    test: &'static str,
    /// What the test is doing now, prefixed to each failure.
    context: String,
    failures: Vec<String>,
}

impl Checks {
    fn new(test: &'static str) -> Self {
        Checks {
            test,
            context: String::new(),
            failures: Vec::new(),
        }
    }

    fn context(&mut self, context: impl Into<String>) {
        self.context = context.into();
    }

    #[track_caller]
    fn fail(&mut self, message: impl Into<String>) {
        let line = Location::caller().line();
        let message = if self.context.is_empty() {
            format!("line {line}: {}", message.into())
        } else {
            format!("line {line}: [{}] {}", self.context, message.into())
        };
        eprintln!("{}: FAILED: {message}", self.test);
        self.failures.push(message);
    }

    #[track_caller]
    fn that(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(message());
        }
    }

    #[track_caller]
    fn eq<T: PartialEq + Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.fail(format!("{what}: got {got:?}, want {want:?}"));
        }
    }

    /// The pool's bytes in use (in buffers) and queue length are as expected.
    #[track_caller]
    fn pool(&mut self, name: &str, pool: &BufPool, in_use_buffers: usize, waiting: usize) {
        let stats = pool.stats();
        if stats.in_use_bytes != in_use_buffers * B || stats.waiting != waiting {
            self.fail(format!(
                "{name}: in_use_bytes {} (want {}), waiting {} (want {}): {stats}",
                stats.in_use_bytes,
                in_use_buffers * B,
                stats.waiting,
                waiting,
            ));
        }
    }

    /// Nothing in use, outstanding, reserved or waiting.
    #[track_caller]
    fn idle(&mut self, name: &str, pool: &BufPool) {
        let stats = pool.stats();
        let got = (
            stats.in_use_bytes,
            stats.outstanding,
            stats.reserved_bytes,
            stats.waiting,
        );
        if got != (0, 0, 0, 0) {
            self.fail(format!(
                "{name} not idle once everything is dropped: (in_use_bytes, outstanding, \
                 reserved_bytes, waiting) = {got:?}: {stats}"
            ));
        }
    }

    /// Runs `f`; a panic is a failure.
    #[track_caller]
    fn no_panic<R>(&mut self, what: &str, f: impl FnOnce() -> R) -> Option<R> {
        match caught(f) {
            Ok(out) => Some(out),
            Err(message) => {
                self.fail(format!("{what} panicked: {message:?}"));
                None
            }
        }
    }

    /// Runs `f`, which may pass a test waker's panic on (the pool may resume it); any other
    /// panic is a failure. Returns whether it panicked.
    #[track_caller]
    fn tolerate_waker_panic(&mut self, what: &str, f: impl FnOnce()) -> bool {
        match caught(f) {
            Ok(()) => false,
            Err(message) if message.contains("on purpose") => true,
            Err(message) => {
                self.fail(format!("{what} panicked: {message:?}"));
                true
            }
        }
    }

    /// Polls a request once with a no-op waker and takes what it completed with; anything
    /// else (pending, an error, a panic) is a failure.
    #[track_caller]
    fn take<T, F>(&mut self, what: &str, future: Pin<&mut F>) -> Option<T>
    where
        F: Future<Output = Result<T, AllocError>> + ?Sized,
        T: Debug,
    {
        match caught(|| poll(future, Waker::noop())) {
            Ok(Poll::Ready(Ok(out))) => Some(out),
            Ok(Poll::Ready(Err(error))) => {
                self.fail(format!("{what}: expected a grant, got Err({error:?})"));
                None
            }
            Ok(Poll::Pending) => {
                self.fail(format!("{what}: expected a grant, still pending"));
                None
            }
            Err(message) => {
                self.fail(format!("{what}: polling panicked: {message:?}"));
                None
            }
        }
    }

    fn finish(self) {
        if !self.failures.is_empty() {
            panic!(
                "{}: {} failure(s):\n  - {}",
                self.test,
                self.failures.len(),
                self.failures.join("\n  - ")
            );
        }
    }
}

/// Installs (once) a panic hook that keeps quiet about the test wakers' panics (the stress test
/// catches thousands) and passes every other panic on to the hook before it.
fn quiet_waker_panics() {
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

/// [`common::watchdog`], with the test wakers' panics kept quiet.
#[track_caller]
fn watched(secs: u64, f: impl FnOnce() + Send + 'static) {
    quiet_waker_panics();
    watchdog(secs, f);
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "<a panic without a message>".to_owned()
    }
}

/// Runs `f`, turning a panic into its message.
fn caught<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| message(&*payload))
}

fn poll<F: Future + ?Sized>(future: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(waker))
}

/// A value dropped as usual, except while the thread unwinds: then it is leaked. A pool whose
/// bytes were lost would block the unwinding forever in its drop; leaked, the test fails with
/// its own message instead.
struct LeakOnUnwind<T>(Option<T>);

impl<T> LeakOnUnwind<T> {
    fn new(value: T) -> Self {
        LeakOnUnwind(Some(value))
    }

    fn into_inner(mut self) -> T {
        self.0.take().expect("present until taken")
    }
}

impl<T> Deref for LeakOnUnwind<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("present until taken")
    }
}

impl<T> Drop for LeakOnUnwind<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            if thread::panicking() {
                std::mem::forget(value);
            } else {
                drop(value);
            }
        }
    }
}

type Pool = LeakOnUnwind<Arc<BufPool>>;

/// A builder for a pool of `buffers` buffers whose drop does not warn on stderr after 5 s (a
/// hung drop is reported by [`drop_pool`]; its thread stays parked, and would warn in the
/// middle of later tests' output).
fn builder(buffers: usize) -> BufPoolBuilder {
    BufPool::builder(cfg(buffers)).drop_warning_after(Duration::from_secs(3600))
}

fn root_pool(buffers: usize) -> Pool {
    LeakOnUnwind::new(Arc::new(builder(buffers).build().expect("a valid pool")))
}

/// `parent.child(name, cfg(buffers))`, through the builder (see [`builder`]).
fn child_of(parent: &BufPool, name: &str, buffers: usize) -> Pool {
    LeakOnUnwind::new(Arc::new(
        builder(buffers)
            .name(name)
            .parent(parent)
            .build()
            .expect("a valid child"),
    ))
}

/// Root, mid (a child of root) and leaf (a child of mid).
fn tree(root: usize, mid: usize, leaf: usize) -> (Pool, Pool, Pool) {
    let root = root_pool(root);
    let mid = child_of(&root, "mid", mid);
    let leaf = child_of(&mid, "leaf", leaf);
    (root, mid, leaf)
}

/// Drops the pool on a thread of its own and fails the check if that does not return within
/// [`DROP_WITHIN`] (the drop waits for every byte of the pool's subtree: lost bytes hang it).
/// A hung drop's thread is left behind, parked.
#[track_caller]
fn drop_pool<T: Borrow<BufPool> + Send + 'static>(
    checks: &mut Checks,
    name: &str,
    pool: LeakOnUnwind<T>,
) {
    let pool = pool.into_inner();
    let before = pool.borrow().stats();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    thread::Builder::new()
        .name(format!("drop {name}"))
        .spawn(move || {
            drop(pool);
            let _ = done_tx.send(());
        })
        .expect("spawn a thread");
    match done_rx.recv_timeout(DROP_WITHIN) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => checks.fail(format!(
            "dropping {name} did not return within {DROP_WITHIN:?}: a hang (its stats before \
             the drop: {before})"
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            checks.fail(format!("dropping {name} panicked (stats before: {before})"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wakers and requests
// ---------------------------------------------------------------------------------------------

/// Counts its wakes; with `panics`, panics in `wake` (never while the thread already unwinds).
struct TestWaker {
    woken: AtomicUsize,
    panics: bool,
}

impl TestWaker {
    fn new(panics: bool) -> (Arc<Self>, Waker) {
        let waker = Arc::new(TestWaker {
            woken: AtomicUsize::new(0),
            panics,
        });
        (Arc::clone(&waker), Waker::from(waker))
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
        if self.panics && !thread::panicking() {
            panic!("{WAKE_PANIC}");
        }
    }
}

/// What a request completed with.
#[derive(Debug)]
enum Held {
    Allocation(BufPoolAllocation),
    Reservation(Reservation),
}

impl Held {
    fn bytes(&self) -> usize {
        match self {
            Held::Allocation(allocation) => allocation.allocated_bytes(),
            Held::Reservation(reservation) => reservation.size(),
        }
    }
}

/// The call forms of a request that may wait.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Kind {
    /// `pool.allocate(n)`
    Allocate,
    /// `Arc::clone(&pool).allocate_owned(n)`
    AllocateOwned,
    /// `PollAllocate::new(pool).poll_allocate(cx, n)`
    PollAllocate,
    /// `pool.reserve(n * 64)`
    Reserve,
}

const KINDS: [Kind; 4] = [
    Kind::Allocate,
    Kind::AllocateOwned,
    Kind::PollAllocate,
    Kind::Reserve,
];

type Request<'a> = Pin<Box<dyn Future<Output = Result<Held, AllocError>> + 'a>>;

/// A request for `n` buffers' worth of `pool`'s budget, in the form `kind`. Dropping it
/// cancels it (a `PollAllocate` is dropped with it).
fn request(pool: &Arc<BufPool>, kind: Kind, n: usize) -> Request<'_> {
    match kind {
        Kind::Allocate => Box::pin(async move { pool.allocate(n).await.map(Held::Allocation) }),
        Kind::AllocateOwned => {
            let owned = Arc::clone(pool).allocate_owned(n);
            Box::pin(async move { owned.await.map(Held::Allocation) })
        }
        Kind::PollAllocate => {
            let mut poll_allocate = PollAllocate::new(Arc::clone(pool));
            Box::pin(async move {
                std::future::poll_fn(move |cx| poll_allocate.poll_allocate(cx, n))
                    .await
                    .map(Held::Allocation)
            })
        }
        Kind::Reserve => Box::pin(async move { pool.reserve(n * B).await.map(Held::Reservation) }),
    }
}

/// Makes `kind`'s request for `n` buffers of `pool` and polls it once with `waker`; it must
/// wait (a precondition of the test, asserted).
#[track_caller]
fn waiting<'a>(pool: &'a Arc<BufPool>, kind: Kind, n: usize, waker: &Waker) -> Request<'a> {
    let mut future = request(pool, kind, n);
    assert!(
        poll(future.as_mut(), waker).is_pending(),
        "setup: a {kind:?} request of {n} buffers must wait: {}",
        pool.stats()
    );
    future
}

/// Sums what `held` holds per level of a chain (0 = root): a pool's bytes in use are those
/// held at its level and below.
fn expected_in_use(held: &[(usize, Held)], level: usize) -> usize {
    held.iter()
        .filter(|(at, _)| *at >= level)
        .map(|(_, held)| held.bytes())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Bug 1: a panicking `wake()` makes a child pool lose bytes
// ---------------------------------------------------------------------------------------------

/// Bug 1 (a): dropping a child's allocation gives the parent's level back first; that grants
/// a request waiting at the parent, whose waker panics, and the panic is resumed out of the
/// drop. The child's own level must be given back all the same.
#[test]
fn bug1a_child_allocation_dropped_while_a_parent_waker_panics() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1a");
        let root = root_pool(4);
        let child = child_of(&root, "child", 4);
        {
            let from_child = child.try_allocate(2).unwrap();
            let held = root.try_allocate(2).unwrap();
            let (panicky, waker) = TestWaker::new(true);
            let mut at_root = Box::pin(root.allocate(1));
            assert!(poll(at_root.as_mut(), &waker).is_pending(), "setup");
            drop(waker);

            checks.tolerate_waker_panic("dropping the child's allocation", || drop(from_child));
            assert_eq!(
                panicky.woken(),
                1,
                "setup: the release woke the root's waiter"
            );
            checks.pool("child", &child, 0, 0);
            checks.eq("child outstanding", child.stats().outstanding, 0);
            checks.pool("root", &root, 3, 0);

            let granted = checks.take("the root's waiter", at_root.as_mut());
            checks.no_panic("dropping everything", || drop((granted, at_root, held)));
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

/// Bug 1 (b): dropping a child's `Reservation`, with a panicking waker waiting at the parent.
#[test]
fn bug1b_child_reservation_dropped_while_a_parent_waker_panics() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1b");
        let root = root_pool(4);
        let child = child_of(&root, "child", 4);
        {
            let reservation = child.try_reserve(2 * B).unwrap();
            let held = root.try_allocate(2).unwrap();
            let (panicky, waker) = TestWaker::new(true);
            let mut at_root = Box::pin(root.allocate(1));
            assert!(poll(at_root.as_mut(), &waker).is_pending(), "setup");
            drop(waker);

            checks.tolerate_waker_panic("dropping the child's reservation", || drop(reservation));
            assert_eq!(
                panicky.woken(),
                1,
                "setup: the give-back woke the root's waiter"
            );
            checks.pool("child", &child, 0, 0);
            checks.eq("child reserved_bytes", child.stats().reserved_bytes, 0);
            checks.pool("root", &root, 3, 0);

            let granted = checks.take("the root's waiter", at_root.as_mut());
            checks.no_panic("dropping everything", || drop((granted, at_root, held)));
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

/// Bug 1 (c): shrinking a child's `Reservation`, with a panicking waker waiting at the
/// parent: afterwards the child counts exactly what the reservation still holds.
#[test]
fn bug1c_child_reservation_shrunk_while_a_parent_waker_panics() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1c");
        let root = root_pool(4);
        let child = child_of(&root, "child", 4);
        {
            let mut reservation = child.try_reserve(3 * B).unwrap();
            let held = root.try_allocate(1).unwrap();
            let (panicky, waker) = TestWaker::new(true);
            let mut at_root = Box::pin(root.allocate(1));
            assert!(poll(at_root.as_mut(), &waker).is_pending(), "setup");
            drop(waker);

            checks.tolerate_waker_panic("shrinking the child's reservation", || {
                reservation.shrink(B)
            });
            assert_eq!(
                panicky.woken(),
                1,
                "setup: the shrink woke the root's waiter"
            );
            checks.eq("reservation size", reservation.size(), 2 * B);
            checks.pool("child", &child, reservation.size() / B, 0);
            checks.eq(
                "child reserved_bytes",
                child.stats().reserved_bytes,
                reservation.size(),
            );
            checks.pool("root", &root, 4, 0);

            let granted = checks.take("the root's waiter", at_root.as_mut());
            checks.no_panic("dropping the reservation", || drop(reservation));
            checks.pool("child", &child, 0, 0);
            checks.no_panic("dropping everything", || drop((granted, at_root, held)));
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

/// Bug 1 (d), one call form: a child's request holds the child's level and waits in the
/// parent's queue; a request behind it at the parent has a panicking waker. Cancelling the
/// child's request (dropping it) lets the one behind it be served, whose waker panics: the
/// child's level must still be given back. With `granted_first`, the child's request was
/// granted at the parent but never taken (its give-back grants the one behind).
fn bug1d_case(checks: &mut Checks, kind: Kind, granted_first: bool) {
    checks.context(format!(
        "{kind:?}, {}",
        if granted_first {
            "granted at the parent, not taken"
        } else {
            "waiting at the parent"
        }
    ));
    let root = root_pool(4);
    let child = child_of(&root, "child", 4);
    {
        let held = root.try_allocate(3).unwrap();
        let from_child = waiting(&child, kind, 2, Waker::noop());
        assert_eq!(
            (child.stats().in_use_bytes, root.stats().waiting),
            (2 * B, 1),
            "setup: the child's request holds its own level and waits at the parent"
        );
        let (panicky, waker) = TestWaker::new(true);
        // Behind it: 1 buffer (fits once the child's request leaves), or 3 (fits only once
        // its grant of 2 comes back).
        let behind = if granted_first { 3 } else { 1 };
        let mut at_root = Box::pin(root.allocate(behind));
        assert!(poll(at_root.as_mut(), &waker).is_pending(), "setup");
        drop(waker);
        let mut held = Some(held);
        if granted_first {
            drop(held.take());
            assert_eq!(
                (
                    root.stats().in_use_bytes,
                    root.stats().waiting,
                    panicky.woken()
                ),
                (2 * B, 1, 0),
                "setup: the child's request was granted at the parent, the one behind waits"
            );
        }

        checks.tolerate_waker_panic("cancelling the child's request", || drop(from_child));
        assert_eq!(
            panicky.woken(),
            1,
            "setup: the cancel served the root's waiter"
        );
        checks.pool("child", &child, 0, 0);
        checks.eq("child outstanding", child.stats().outstanding, 0);
        checks.pool("root", &root, if granted_first { 3 } else { 4 }, 0);

        let granted = checks.take("the root's waiter", at_root.as_mut());
        checks.no_panic("dropping everything", || drop((granted, at_root, held)));
    }
    checks.idle("child", &child);
    checks.idle("root", &root);
    drop_pool(checks, "child", child);
    drop_pool(checks, "root", root);
}

/// Bug 1 (d): a child's request waiting at the parent, cancelled; every call form.
#[test]
fn bug1d_child_request_waiting_at_the_parent_cancelled_while_a_parent_waker_panics() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1d");
        for kind in KINDS {
            bug1d_case(&mut checks, kind, false);
        }
        checks.finish();
    });
}

/// Bug 1 (d): a child's request granted at the parent, dropped before it took the grant.
#[test]
fn bug1d_child_request_granted_at_the_parent_dropped_while_a_parent_waker_panics() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1d, granted");
        for kind in KINDS {
            bug1d_case(&mut checks, kind, true);
        }
        checks.finish();
    });
}

/// Bug 1 (e), one call form: root, mid, leaf. A leaf request holds leaf and mid and waits at
/// the root; a request behind it at the root (`panics_at_root`) or at mid has a panicking
/// waker. The cancel gives back level by level: whichever level's give-back panics, the
/// others must still go back.
fn bug1e_case(checks: &mut Checks, kind: Kind, panics_at_root: bool) {
    checks.context(format!(
        "{kind:?}, panicking waker at {}",
        if panics_at_root { "root" } else { "mid" }
    ));
    let (root, mid, leaf) = tree(4, 4, 4);
    {
        let held = root.try_allocate(3).unwrap();
        let from_leaf = waiting(&leaf, kind, 2, Waker::noop());
        assert_eq!(
            (
                leaf.stats().in_use_bytes,
                mid.stats().in_use_bytes,
                root.stats().waiting
            ),
            (2 * B, 2 * B, 1),
            "setup: the leaf's request holds leaf and mid and waits at the root"
        );
        let (panicky, waker) = TestWaker::new(true);
        let (panicking_pool, behind) = if panics_at_root {
            (&root, 1)
        } else {
            (&mid, 3)
        };
        let mut other = Box::pin(panicking_pool.allocate(behind));
        assert!(poll(other.as_mut(), &waker).is_pending(), "setup");
        drop(waker);

        checks.tolerate_waker_panic("cancelling the leaf's request", || drop(from_leaf));
        assert_eq!(
            panicky.woken(),
            1,
            "setup: the cancel served the other waiter"
        );
        checks.pool("leaf", &leaf, 0, 0);
        if panics_at_root {
            checks.pool("mid", &mid, 0, 0);
            checks.pool("root", &root, 4, 0);
            let granted = checks.take("the root's waiter", other.as_mut());
            checks.no_panic("dropping everything", || drop((granted, other, held)));
        } else {
            // Mid's request was granted its own level; the root has no room for it yet.
            checks.pool("mid", &mid, 3, 0);
            checks.pool("root", &root, 3, 0);
            checks.no_panic("dropping everything", || drop((other, held)));
        }
    }
    checks.idle("leaf", &leaf);
    checks.idle("mid", &mid);
    checks.idle("root", &root);
    drop_pool(checks, "leaf", leaf);
    drop_pool(checks, "mid", mid);
    drop_pool(checks, "root", root);
}

/// Bug 1 (e): three levels, the cancelled leaf request gives back level by level with a
/// panicking waker at the root: nothing may stay counted at mid and leaf.
#[test]
fn bug1e_three_levels_leaf_request_cancelled_while_a_root_waker_panics() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1e, root");
        for kind in KINDS {
            bug1e_case(&mut checks, kind, true);
        }
        checks.finish();
    });
}

/// Bug 1 (e), the middle of the chain: the panicking waker waits at mid, so the give-back at
/// mid panics: nothing may stay counted at the leaf.
#[test]
fn bug1e_three_levels_leaf_request_cancelled_while_a_mid_waker_panics() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1e, mid");
        for kind in KINDS {
            bug1e_case(&mut checks, kind, false);
        }
        checks.finish();
    });
}

/// Polls every waiter (no-op waker) until none progresses; those granted join `held`, the
/// rest are cancelled. A panic or an error is a failure.
fn resolve<'a>(
    checks: &mut Checks,
    waiters: Vec<(usize, Request<'a>)>,
    held: &mut Vec<(usize, Held)>,
) {
    let mut pending = waiters;
    loop {
        let before = pending.len();
        let mut still = Vec::new();
        for (level, mut future) in pending {
            match caught(|| poll(future.as_mut(), Waker::noop())) {
                Ok(Poll::Ready(Ok(got))) => held.push((level, got)),
                Ok(Poll::Ready(Err(error))) => {
                    checks.fail(format!("a waiter at level {level} failed: {error:?}"))
                }
                Ok(Poll::Pending) => still.push((level, future)),
                Err(message) => {
                    checks.fail(format!(
                        "polling a waiter at level {level} panicked: {message}"
                    ));
                    checks.no_panic("dropping a waiter whose poll panicked", || drop(future));
                }
            }
        }
        pending = still;
        if pending.len() == before || pending.is_empty() {
            break;
        }
    }
    for (level, future) in pending {
        checks.no_panic(&format!("cancelling a waiter at level {level}"), || {
            drop(future)
        });
    }
}

/// Every pool's bytes in use are what the test holds at its level and below.
#[track_caller]
fn check_ledger(checks: &mut Checks, pools: [(&str, &BufPool); 3], held: &[(usize, Held)]) {
    for (level, (name, pool)) in pools.into_iter().enumerate() {
        let stats = pool.stats();
        let want = expected_in_use(held, level);
        checks.that(stats.in_use_bytes == want && stats.waiting == 0, || {
            format!(
                "{name}: in_use_bytes {} but the test holds {want} there (waiting {}): {stats}",
                stats.in_use_bytes, stats.waiting
            )
        });
    }
}

/// Sets up one round of [`bug1_panicking_wakers_at_every_level_of_a_three_level_tree`]:
/// the leaf's allocation or reservation of 2, mid's 2 and the root's 2 (every pool full), or
/// for the cancel the root's 3 and mid's 2 and a leaf request for 2 waiting at the root
/// (returned).
fn every_level_setup<'a>(
    round: &str,
    root: &'a Arc<BufPool>,
    mid: &'a Arc<BufPool>,
    leaf: &'a Arc<BufPool>,
    held: &mut Vec<(usize, Held)>,
) -> Result<Option<Request<'a>>, String> {
    let e = |error: AllocError| format!("{error:?}");
    if round == "cancel" {
        held.push((0, Held::Allocation(root.try_allocate(3).map_err(e)?)));
        held.push((1, Held::Allocation(mid.try_allocate(2).map_err(e)?)));
        let mut future = request(leaf, Kind::Allocate, 2);
        if poll(future.as_mut(), Waker::noop()).is_ready() {
            return Err("the leaf's request did not wait".into());
        }
        return Ok(Some(future));
    }
    let first = if round == "drop" {
        Held::Allocation(leaf.try_allocate(2).map_err(e)?)
    } else {
        Held::Reservation(leaf.try_reserve(2 * B).map_err(e)?)
    };
    held.push((2, first));
    held.push((1, Held::Allocation(mid.try_allocate(2).map_err(e)?)));
    held.push((0, Held::Allocation(root.try_allocate(2).map_err(e)?)));
    Ok(None)
}

/// Bug 1, every level at once: root (6), mid (4), leaf (2), with a waiter whose `wake` panics
/// queued in each of the three pools. Each round releases, drops or shrinks a leaf
/// allocation or reservation (one give-back per level, each waking a panicking waker), or
/// cancels a leaf request waiting at the root with panicking waiters behind it at every
/// level. After each round: every panicking waiter was woken, each pool counts exactly what
/// is held, and once everything is dropped, nothing. Finally leaf, mid and root drop.
#[test]
fn bug1_panicking_wakers_at_every_level_of_a_three_level_tree() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 1, every level");
        let (root, mid, leaf) = tree(6, 4, 2);
        let pools = [("root", &**root), ("mid", &**mid), ("leaf", &**leaf)];
        for round in ["drop", "reservation drop", "reservation shrink", "cancel"] {
            checks.context(format!("round: {round}"));
            let mut held: Vec<(usize, Held)> = Vec::new();
            let leaf_request = match every_level_setup(round, &root, &mid, &leaf, &mut held) {
                Ok(leaf_request) => leaf_request,
                Err(error) => {
                    checks.fail(format!(
                        "setup failed ({error}): root {}, mid {}, leaf {}",
                        root.stats(),
                        mid.stats(),
                        leaf.stats()
                    ));
                    for (_, x) in held {
                        checks.no_panic("dropping", || drop(x));
                    }
                    break;
                }
            };
            // A panicking waiter in each pool, the root's last (behind the leaf's request).
            let mut waiters = Vec::new();
            let mut panicky = Vec::new();
            for (level, pool) in [(2, &leaf), (1, &mid), (0, &root)] {
                let (counter, waker) = TestWaker::new(true);
                let mut future = request(pool, Kind::Allocate, 1);
                if poll(future.as_mut(), &waker).is_ready() {
                    checks.fail(format!("setup: the waiter at level {level} did not wait"));
                }
                panicky.push((level, counter));
                waiters.push((level, future));
            }
            if round == "cancel" {
                checks.eq(
                    "setup: waiting at root, mid, leaf",
                    (
                        root.stats().waiting,
                        mid.stats().waiting,
                        leaf.stats().waiting,
                    ),
                    (2, 1, 1),
                );
            }

            let what = format!("the {round}");
            match round {
                "cancel" => {
                    checks.tolerate_waker_panic(&what, || drop(leaf_request));
                }
                "reservation shrink" => {
                    let Some((_, Held::Reservation(reservation))) =
                        held.iter_mut().find(|(level, _)| *level == 2)
                    else {
                        unreachable!()
                    };
                    checks.tolerate_waker_panic(&what, || reservation.shrink(B));
                }
                _ => {
                    let index = held.iter().position(|(level, _)| *level == 2).unwrap();
                    let (_, x) = held.swap_remove(index);
                    checks.tolerate_waker_panic(&what, || drop(x));
                }
            }
            for (level, counter) in &panicky {
                checks.eq(
                    &format!("wakes of the panicking waiter at level {level}"),
                    counter.woken(),
                    1,
                );
            }
            resolve(&mut checks, waiters, &mut held);
            check_ledger(&mut checks, pools, &held);
            for (_, x) in held {
                checks.no_panic("dropping what the round holds", || drop(x));
            }
            for (name, pool) in pools {
                checks.idle(name, pool);
            }
        }
        checks.context("");
        drop_pool(&mut checks, "leaf", leaf);
        drop_pool(&mut checks, "mid", mid);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// Bug 2: a request failing at a parent during a poll that unwinds gives its levels back twice
// ---------------------------------------------------------------------------------------------

/// Bug 2, failed in the parent's queue: a child's request (3 of the child's 6, beside a child
/// allocation of 2) waits at the root; a second child request (2, panicking waker) waits in
/// the child's queue. Shrinking the root below the first request fails it there; the poll
/// that sees the failure gives the child's level back, which grants the second request and
/// panics. Dropping the failed request afterwards must not give the child's level back again.
#[test]
fn bug2_request_failed_at_the_parent_during_an_unwinding_poll_gives_back_once() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 2, failed in the parent's queue");
        let root = root_pool(8);
        let child = child_of(&root, "child", 6);
        {
            let kept = child.try_allocate(2).unwrap();
            let held = root.try_allocate(6).unwrap();
            let mut failing = Box::pin(child.allocate(3));
            assert!(poll(failing.as_mut(), Waker::noop()).is_pending(), "setup");
            let (panicky, waker) = TestWaker::new(true);
            let mut in_child = Box::pin(child.allocate(2));
            assert!(poll(in_child.as_mut(), &waker).is_pending(), "setup");
            drop(waker);
            assert_eq!(
                (
                    child.stats().in_use_bytes,
                    child.stats().waiting,
                    root.stats().waiting
                ),
                (5 * B, 1, 1),
                "setup: 3 + 2 held in the child, one waiter in each queue"
            );
            root.set_max_memory(2 * B).unwrap();

            match caught(|| poll(failing.as_mut(), Waker::noop())) {
                Err(message) if message.contains("on purpose") => {}
                Ok(Poll::Ready(Err(AllocError::ExceedsBudget { .. }))) => {}
                other => checks.fail(format!(
                    "the failed request's poll: want ExceedsBudget (or the waker's panic), got \
                     {other:?}"
                )),
            }
            assert_eq!(
                panicky.woken(),
                1,
                "setup: the failure's give-back woke the waiter"
            );
            checks.pool("child after the failing poll", &child, 4, 0);
            checks.no_panic("dropping the failed request", || drop(failing));
            checks.pool("child after dropping the failed request", &child, 4, 0);
            checks.pool("root", &root, 8, 0);

            checks.no_panic("cancelling the child's granted waiter", || drop(in_child));
            checks.pool("child", &child, 2, 0);
            checks.no_panic("dropping everything", || drop((kept, held)));
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

/// Bug 2, failed while climbing: a child's request (3) waits in the child's queue, with a
/// second one (2, panicking waker) behind it; the root shrinks to 2 buffers. The release that
/// grants the first at the child lets it climb, where the root refuses it (`ExceedsBudget`);
/// its give-back grants the second and panics. Dropping it must not give back twice.
#[test]
fn bug2_request_failed_while_climbing_during_an_unwinding_poll_gives_back_once() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 2, failed while climbing");
        let root = root_pool(8);
        let child = child_of(&root, "child", 4);
        {
            let kept = child.try_allocate(2).unwrap();
            let mut failing = Box::pin(child.allocate(3));
            assert!(poll(failing.as_mut(), Waker::noop()).is_pending(), "setup");
            let (panicky, waker) = TestWaker::new(true);
            let mut in_child = Box::pin(child.allocate(2));
            assert!(poll(in_child.as_mut(), &waker).is_pending(), "setup");
            drop(waker);
            drop(kept);
            root.set_max_memory(2 * B).unwrap();
            assert_eq!(
                (
                    child.stats().in_use_bytes,
                    child.stats().waiting,
                    panicky.woken()
                ),
                (3 * B, 1, 0),
                "setup: the first request granted at the child, the second waits"
            );

            match caught(|| poll(failing.as_mut(), Waker::noop())) {
                Err(message) if message.contains("on purpose") => {}
                Ok(Poll::Ready(Err(AllocError::ExceedsBudget { .. }))) => {}
                other => checks.fail(format!(
                    "the failed request's poll: want ExceedsBudget (or the waker's panic), got \
                     {other:?}"
                )),
            }
            assert_eq!(
                panicky.woken(),
                1,
                "setup: the failure's give-back woke the waiter"
            );
            checks.pool("child after the failing poll", &child, 2, 0);
            checks.no_panic("dropping the failed request", || drop(failing));
            checks.pool("child after dropping the failed request", &child, 2, 0);
            checks.pool("root", &root, 0, 0);
            checks.no_panic("cancelling the child's granted waiter", || drop(in_child));
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// Bug 4: a grant given back untaken keeps its wait in the total, not in the count
// ---------------------------------------------------------------------------------------------

/// Checks the wait statistics at each step: the mean wait is at most the longest, and no
/// count ever goes down. (`stats()` converts `total_wait` and `max_wait` from clock ticks with
/// one measurement of the clock's rate, so no slack is needed.)
struct WaitWatch {
    last: Option<PoolStats>,
}

impl WaitWatch {
    #[track_caller]
    fn snap(&mut self, checks: &mut Checks, step: &str, stats: PoolStats) {
        checks.that(stats.mean_wait() <= stats.max_wait, || {
            format!(
                "after {step}: mean wait {:?} above the longest wait {:?} ({} waited, total \
                 {:?}): {stats}",
                stats.mean_wait(),
                stats.max_wait,
                stats.waited_allocations,
                stats.total_wait
            )
        });
        if let Some(last) = &self.last {
            let counts = [
                (
                    "total_allocations",
                    last.total_allocations,
                    stats.total_allocations,
                ),
                (
                    "waited_allocations",
                    last.waited_allocations,
                    stats.waited_allocations,
                ),
                ("would_block", last.would_block, stats.would_block),
                ("timed_out", last.timed_out, stats.timed_out),
                ("queue_full", last.queue_full, stats.queue_full),
            ];
            for (name, before, now) in counts {
                checks.that(now >= before, || {
                    format!("after {step}: {name} went down from {before} to {now}: {stats}")
                });
            }
        }
        self.last = Some(stats);
    }
}

/// Bug 4 in one pool (1 buffer, waits timed): request A waits ~40 ms and is granted, then
/// dropped before it takes the grant; request B waits ~10 ms and takes its grant. The mean
/// wait must stay at most the longest wait, and `waited_allocations` must not go down.
#[test]
fn bug4_grant_given_back_untaken_keeps_mean_wait_within_max_wait() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 4");
        let pool = builder(1).time_waits(true).build().unwrap();
        let mut watch = WaitWatch { last: None };
        watch.snap(&mut checks, "the start", pool.stats());

        let held = pool.try_allocate(1).unwrap();
        let mut a = Box::pin(pool.allocate(1));
        assert!(poll(a.as_mut(), Waker::noop()).is_pending(), "setup");
        thread::sleep(Duration::from_millis(40));
        drop(held);
        watch.snap(&mut checks, "A granted (not taken)", pool.stats());
        drop(a);
        watch.snap(&mut checks, "A's grant given back untaken", pool.stats());

        let held = pool.try_allocate(1).unwrap();
        let mut b = Box::pin(pool.allocate(1));
        assert!(poll(b.as_mut(), Waker::noop()).is_pending(), "setup");
        thread::sleep(Duration::from_millis(10));
        drop(held);
        watch.snap(&mut checks, "B granted", pool.stats());
        let got = checks.take("B", b.as_mut());
        watch.snap(&mut checks, "B taken", pool.stats());
        drop((got, b));
        watch.snap(&mut checks, "everything dropped", pool.stats());
        checks.idle("pool", &pool);
        checks.finish();
    });
}

/// Bug 4 at a parent: a child's request granted at the root and dropped untaken gives the
/// root's grant back (`give_back_grant` at the root); the root's wait statistics must stay
/// consistent too.
#[test]
fn bug4_childs_grant_given_back_untaken_at_the_parent_keeps_mean_wait_within_max_wait() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 4, at the parent");
        let root = LeakOnUnwind::new(builder(1).time_waits(true).build().unwrap());
        let child = LeakOnUnwind::new(
            builder(4)
                .name("child")
                .time_waits(true)
                .parent(&root)
                .build()
                .unwrap(),
        );
        let mut watch = WaitWatch { last: None };
        {
            let held = root.try_allocate(1).unwrap();
            let mut a = Box::pin(child.allocate(1));
            assert!(poll(a.as_mut(), Waker::noop()).is_pending(), "setup");
            thread::sleep(Duration::from_millis(40));
            drop(held);
            watch.snap(
                &mut checks,
                "A granted at the root (not taken)",
                root.stats(),
            );
            drop(a);
            watch.snap(&mut checks, "A's grant given back untaken", root.stats());

            let held = root.try_allocate(1).unwrap();
            let mut b = Box::pin(child.allocate(1));
            assert!(poll(b.as_mut(), Waker::noop()).is_pending(), "setup");
            thread::sleep(Duration::from_millis(10));
            drop(held);
            let got = checks.take("B", b.as_mut());
            watch.snap(&mut checks, "B taken", root.stats());
            drop((got, b));
            watch.snap(&mut checks, "everything dropped", root.stats());
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// Bug 5: a child's shrink does not fail its request waiting in the parent's queue
// ---------------------------------------------------------------------------------------------

/// Bug 5, one call form: the root (8) is full; the child's (8) request for 4 waits at the
/// root. `shrinking.set_max_memory(2 buffers)` (the child, or with three levels the middle
/// pool of the request's chain) makes it impossible: it must complete with `ExceedsBudget`
/// at once, its waker woken, its levels given back.
fn bug5_case(checks: &mut Checks, kind: Kind, three_levels: bool) {
    checks.context(format!(
        "{kind:?}, {}",
        if three_levels {
            "mid shrinks, the leaf's request waits at the root"
        } else {
            "the child shrinks, its request waits at the root"
        }
    ));
    let (root, mid, leaf) = tree(8, 8, 8);
    let (shrinking, requester) = if three_levels {
        (&mid, &leaf)
    } else {
        (&mid, &mid)
    };
    {
        let held = root.try_allocate(8).unwrap();
        let (counter, waker) = TestWaker::new(false);
        let mut from_child = waiting(requester, kind, 4, &waker);
        assert_eq!(
            root.stats().waiting,
            1,
            "setup: the request waits at the root"
        );
        shrinking.set_max_memory(2 * B).unwrap();

        checks.that(counter.woken() >= 1, || {
            "the shrink did not wake the request it made impossible".into()
        });
        let mut completed = None;
        let first = caught(|| poll(from_child.as_mut(), &waker));
        // Only a request still waiting (the bug) is polled again below: polling a completed
        // (or panicked) request's `async` block again would only panic.
        let still_waiting = matches!(first, Ok(Poll::Pending));
        match first {
            Ok(Poll::Ready(Err(AllocError::ExceedsBudget { .. }))) => {}
            Ok(Poll::Ready(Ok(got))) => completed = Some(got),
            other => checks.fail(format!(
                "after the shrink: want Ready(Err(ExceedsBudget {{ .. }})), got {other:?}; \
                 {}",
                root.stats()
            )),
        }
        checks.pool("the requester", requester, 0, 0);
        if three_levels {
            checks.pool("mid", &mid, 0, 0);
        }
        checks.pool("root", &root, 8, 0);
        checks.no_panic("dropping the root's allocation", || drop(held));
        // Still waiting (the bug)? Then the root's room goes to it, past the shrunken budget.
        if still_waiting {
            if let Ok(Poll::Ready(Ok(got))) = caught(|| poll(from_child.as_mut(), &waker)) {
                completed = Some(got);
            }
        }
        if let Some(got) = completed {
            checks.fail(format!(
                "the request completed with {} bytes although the budget of {} is now {} bytes \
                 (guarantee 1 broken: {})",
                got.bytes(),
                if three_levels { "mid" } else { "the child" },
                2 * B,
                shrinking.stats()
            ));
            checks.no_panic("dropping what it got", || drop(got));
        }
        checks.no_panic("dropping the request", || drop(from_child));
    }
    checks.idle("leaf", &leaf);
    checks.idle("mid", &mid);
    checks.idle("root", &root);
    drop_pool(checks, "leaf", leaf);
    drop_pool(checks, "mid", mid);
    drop_pool(checks, "root", root);
}

/// Bug 5: a child's shrink fails its request waiting in the parent's queue; every call form.
#[test]
fn bug5_child_shrink_fails_its_request_waiting_at_the_parent() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 5");
        for kind in KINDS {
            bug5_case(&mut checks, kind, false);
        }
        checks.finish();
    });
}

/// Bug 5 up a longer chain: mid's shrink fails a leaf's request (through mid) waiting at the
/// root.
#[test]
fn bug5_mid_shrink_fails_a_leaf_request_waiting_at_the_root() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 5, three levels");
        for kind in KINDS {
            bug5_case(&mut checks, kind, true);
        }
        checks.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// Bug 7: QueueFull only at once
// ---------------------------------------------------------------------------------------------

/// Bug 7, one call form: the root (8, `max_waiters(1)`) has one waiter (4) and 2 free; the
/// child (2) is full, so the child's request (2) waits in the child's queue. A release grants
/// it the child's level; it climbs to the root, whose queue is full. It already waited, so it
/// must not fail with `QueueFull`: it keeps waiting, and once the root's queue has room and
/// budget (the root's allocation dropped) it completes.
fn bug7_case(checks: &mut Checks, kind: Kind) {
    checks.context(format!("{kind:?}"));
    let root = LeakOnUnwind::new(Arc::new(builder(8).max_waiters(1).build().unwrap()));
    let child = child_of(&root, "child", 2);
    {
        let kept = child.try_allocate(2).unwrap();
        let (counter, waker) = TestWaker::new(false);
        let mut from_child = waiting(&child, kind, 2, &waker);
        let held = root.try_allocate(6).unwrap();
        let mut at_root = Box::pin(root.allocate(4));
        assert!(poll(at_root.as_mut(), Waker::noop()).is_pending(), "setup");
        assert_eq!(
            (child.stats().waiting, root.stats().waiting),
            (1, 1),
            "setup: one waiter in each queue (the root's is full)"
        );
        drop(kept);
        assert!(counter.woken() >= 1, "setup: granted at the child");
        assert_eq!(
            root.stats().in_use_bytes,
            6 * B,
            "setup: the root's waiter still waits"
        );

        let mut failed = false;
        match caught(|| poll(from_child.as_mut(), &waker)) {
            Ok(Poll::Pending) => {}
            other => {
                failed = true;
                checks.fail(format!(
                    "a request that already waited in its own pool, finding the root's queue \
                     full: want Pending, got {other:?}"
                ));
            }
        }
        checks.eq("root queue_full", root.stats().queue_full, 0);
        checks.that(root.stats().waiting <= 1, || {
            format!("max_waiters(1) exceeded: {}", root.stats())
        });
        let woken = counter.woken();
        checks.no_panic("dropping the root's allocation", || drop(held));
        let granted = checks.take("the root's waiter", at_root.as_mut());
        if !failed {
            checks.that(counter.woken() > woken, || {
                "the request was not woken once the root's queue had room".into()
            });
            let mut got = None;
            for _ in 0..3 {
                match caught(|| poll(from_child.as_mut(), &waker)) {
                    Ok(Poll::Pending) => continue,
                    Ok(Poll::Ready(Ok(x))) => got = Some(x),
                    other => checks.fail(format!("after the root had room: got {other:?}")),
                }
                break;
            }
            match got {
                Some(got) => {
                    checks.eq("bytes granted", got.bytes(), 2 * B);
                    checks.pool("child", &child, 2, 0);
                    checks.pool("root", &root, 6, 0);
                    checks.no_panic("dropping it", || drop(got));
                }
                None => checks.fail(format!(
                    "not served once the root's queue had room: child {}, root {}",
                    child.stats(),
                    root.stats()
                )),
            }
        }
        checks.no_panic("dropping everything", || {
            drop((granted, at_root, from_child))
        });
    }
    checks.idle("child", &child);
    checks.idle("root", &root);
    drop_pool(checks, "child", child);
    drop_pool(checks, "root", root);
}

/// Bug 7: `QueueFull` only at once; every call form.
#[test]
fn bug7_request_that_waited_in_its_own_pool_never_gets_queue_full_from_an_ancestor() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("bug 7");
        for kind in KINDS {
            bug7_case(&mut checks, kind);
        }
        checks.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// Found while writing these tests: a waker whose `drop` panics loses bytes the same way
// ---------------------------------------------------------------------------------------------

/// Not in issue 18's list (found by the stress test below; guarantee 9: a waker that panics
/// in `drop` costs at most its own waiter). `State::admit` clones the waker before taking the
/// lock and, when the request is reserved under the lock after all (`Admission::Reserved`),
/// drops the unused clone on its way out: after the reservation, before the caller counts
/// the level as held. A child's request whose fast path found the parent full reaches
/// `admit` at the child with room there: reserved, then the clone's drop panics, and the
/// child's bytes are never given back (the request is still at its start stage, so its drop
/// gives nothing back).
#[test]
fn other_waker_dropped_unused_by_admit_panicking_loses_no_bytes() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("admit drops an unused waker clone that panics");
        let root = root_pool(4);
        let child = child_of(&root, "child", 4);
        {
            let held = root.try_allocate(4).unwrap();
            let waker = chaos_waker(Chaos::PanicDrop);
            let mut from_child = request(&child, Kind::Allocate, 1);
            checks.tolerate_waker_panic("the first poll", || {
                assert!(poll(from_child.as_mut(), &waker).is_pending());
            });
            checks.tolerate_waker_panic("dropping the request", || drop(from_child));
            checks.pool("child", &child, 0, 0);
            checks.pool("root", &root, 4, 0);
            checks.no_panic("dropping the root's allocation", || drop(held));
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

/// Not in issue 18's list, bug 1's pattern with a `drop` panic: cancelling a child's request
/// queued at the parent drops its own waker (`State::cancel`, after unlinking the node) before
/// the lower levels are given back (`Request::cancel_waiting`); when that drop panics, the
/// child's level is never given back.
#[test]
fn other_cancelled_child_request_whose_waker_drop_panics_gives_back_every_level() {
    watched(WATCHDOG, || {
        let mut checks = Checks::new("a cancel whose own waker's drop panics");
        let root = root_pool(4);
        let child = child_of(&root, "child", 4);
        {
            let held = root.try_allocate(4).unwrap();
            // Queued with a calm waker, then re-polled with the one whose clones panic in
            // `drop` (the pool keeps a clone of it in place of the calm one).
            let mut from_child = waiting(&child, Kind::Allocate, 1, &chaos_waker(Chaos::Calm));
            let waker = chaos_waker(Chaos::PanicDrop);
            assert!(poll(from_child.as_mut(), &waker).is_pending(), "setup");
            drop(waker);
            assert_eq!(
                (child.stats().in_use_bytes, root.stats().waiting),
                (B, 1),
                "setup: the child's request holds its level and waits at the root"
            );
            checks.tolerate_waker_panic("cancelling the child's request", || drop(from_child));
            checks.pool("child", &child, 0, 0);
            checks.pool("root", &root, 4, 0);
            checks.no_panic("dropping the root's allocation", || drop(held));
        }
        checks.idle("child", &child);
        checks.idle("root", &root);
        drop_pool(&mut checks, "child", child);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}

// ---------------------------------------------------------------------------------------------
// Stress: allocate, cancel, reserve and shrink over a tree with wakers that panic
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Chaos {
    Calm,
    PanicWake,
    PanicClone,
    /// Panics when one of the pool's clones is dropped (never the test's own handle).
    PanicDrop,
}

struct ChaosData {
    chaos: Chaos,
    /// A clone made by the pool (the test's own handle never panics in drop).
    clone: bool,
}

static CHAOS_VTABLE: RawWakerVTable =
    RawWakerVTable::new(chaos_clone, chaos_wake, chaos_wake_by_ref, chaos_drop);

fn chaos_waker(chaos: Chaos) -> Waker {
    let data = Box::into_raw(Box::new(ChaosData {
        chaos,
        clone: false,
    }));
    // SAFETY: the vtable's functions treat the pointer as the `Box<ChaosData>` it is, free it
    // exactly once (drop or wake) and make a new box for each clone; `ChaosData` is plain data,
    // so the waker is `Send + Sync`.
    unsafe { Waker::from_raw(RawWaker::new(data.cast(), &CHAOS_VTABLE)) }
}

unsafe fn chaos_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a live `ChaosData` box (see `chaos_waker`).
    let chaos = unsafe { &*data.cast::<ChaosData>() }.chaos;
    if chaos == Chaos::PanicClone && !thread::panicking() {
        panic!("chaos waker panics on clone, on purpose");
    }
    let data = Box::into_raw(Box::new(ChaosData { chaos, clone: true }));
    RawWaker::new(data.cast(), &CHAOS_VTABLE)
}

/// Frees the box; panics afterwards if it is a pool's clone of a drop-panicking waker.
unsafe fn chaos_release(data: *const ()) -> Chaos {
    // SAFETY: `data` is a live `ChaosData` box, given up by its handle here.
    let data = unsafe { Box::from_raw(data.cast::<ChaosData>().cast_mut()) };
    let (chaos, clone) = (data.chaos, data.clone);
    drop(data);
    if chaos == Chaos::PanicDrop && clone && !thread::panicking() {
        panic!("chaos waker panics on drop, on purpose");
    }
    chaos
}

unsafe fn chaos_wake(data: *const ()) {
    // SAFETY: as `chaos_release`: waking by value gives the handle up.
    let chaos = unsafe { chaos_release(data) };
    if chaos == Chaos::PanicWake && !thread::panicking() {
        panic!("chaos waker panics on wake, on purpose");
    }
}

unsafe fn chaos_wake_by_ref(data: *const ()) {
    // SAFETY: `data` is a live `ChaosData` box.
    let chaos = unsafe { &*data.cast::<ChaosData>() }.chaos;
    if chaos == Chaos::PanicWake && !thread::panicking() {
        panic!("chaos waker panics on wake, on purpose");
    }
}

unsafe fn chaos_drop(data: *const ()) {
    // SAFETY: as `chaos_release`.
    unsafe { chaos_release(data) };
}

/// About 5% of wakers panic (in `wake`, `clone` or `drop`, evenly); of the rest, half are
/// calm chaos wakers (real clones and drops), half no-op wakers.
fn random_waker(rng: &mut Rng) -> Waker {
    match rng.range(0, 999) {
        0..=16 => chaos_waker(Chaos::PanicWake),
        17..=33 => chaos_waker(Chaos::PanicClone),
        34..=49 => chaos_waker(Chaos::PanicDrop),
        50..=524 => chaos_waker(Chaos::Calm),
        _ => Waker::noop().clone(),
    }
}

/// How long the stress test runs natively.
const STRESS: Duration = Duration::from_secs(2);

/// Operations per stress worker: unbounded natively (the workers run for [`STRESS`]); a fixed
/// number under Miri, where the workers' deadline (stretched by [`SLOWDOWN`]) is only a
/// backstop, so the work done does not depend on Miri's virtual clock.
const STRESS_OPS_PER_WORKER: usize = rounds(usize::MAX, 150);

/// What the stress workers share.
struct Shared<'a> {
    pools: &'a [Arc<BufPool>],
    stop_at: Instant,
    /// Each worker's limit of operations.
    max_ops: usize,
    failures: Mutex<Vec<String>>,
    failure_count: AtomicUsize,
    panics: AtomicUsize,
    ops: AtomicUsize,
}

impl Shared<'_> {
    fn fail(&self, message: String) {
        self.failure_count.fetch_add(1, Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.len() < 20 {
            eprintln!("stress: FAILED: {message}");
            failures.push(message);
        }
    }

    /// Runs `f`, counting a panic: the test wakers' panics are expected, others are failures.
    fn guarded<R>(&self, what: &str, f: impl FnOnce() -> R) -> Option<R> {
        match caught(f) {
            Ok(out) => Some(out),
            Err(message) => {
                self.panics.fetch_add(1, Relaxed);
                if !message.contains("on purpose") {
                    self.fail(format!("{what} panicked: {message:?}"));
                }
                None
            }
        }
    }

    fn completed(&self, result: Result<Held, AllocError>, held: &mut Vec<Held>) {
        match result {
            Ok(got) => held.push(got),
            Err(error) => self.fail(format!("a request failed: {error:?}")),
        }
    }
}

fn stress_worker(seed: u64, shared: &Shared<'_>) {
    let mut rng = Rng::new(seed);
    let mut held: Vec<Held> = Vec::new();
    let mut pending: Vec<Request<'_>> = Vec::new();
    let mut ops = 0;
    while ops < shared.max_ops && Instant::now() < shared.stop_at {
        ops += 1;
        shared.ops.fetch_add(1, Relaxed);
        let pool = &shared.pools[rng.range(0, shared.pools.len() - 1)];
        match rng.range(0, 99) {
            0..=29 if pending.len() < 4 => {
                let kind = KINDS[rng.range(0, KINDS.len() - 1)];
                let mut future = request(pool, kind, rng.range(1, 3));
                let waker = random_waker(&mut rng);
                match shared.guarded("a first poll", || poll(future.as_mut(), &waker)) {
                    Some(Poll::Ready(result)) => shared.completed(result, &mut held),
                    Some(Poll::Pending) => pending.push(future),
                    None => {
                        shared.guarded("dropping a request whose poll panicked", || drop(future));
                    }
                }
            }
            // A `try_*` refused above a child gives the levels it took back, which may grant
            // a waiter there whose waker panics: the panic comes out of the `try_*` call.
            30..=34 => {
                let bytes = rng.range(1, 24) * 8;
                match shared.guarded("a try_reserve", || pool.try_reserve(bytes)) {
                    Some(Ok(reservation)) => held.push(Held::Reservation(reservation)),
                    Some(Err(AllocError::WouldBlock)) | None => {}
                    Some(Err(error)) => shared.fail(format!("try_reserve failed: {error:?}")),
                }
            }
            35..=39 => {
                let n = rng.range(1, 3);
                match shared.guarded("a try_allocate", || pool.try_allocate(n)) {
                    Some(Ok(allocation)) => held.push(Held::Allocation(allocation)),
                    Some(Err(AllocError::WouldBlock)) | None => {}
                    Some(Err(error)) => shared.fail(format!("try_allocate failed: {error:?}")),
                }
            }
            40..=49 => {
                let less = rng.range(1, 16) * 8;
                if let Some(Held::Reservation(reservation)) = held
                    .iter_mut()
                    .find(|held| matches!(held, Held::Reservation(r) if r.size() > 0))
                {
                    shared.guarded("a shrink", || reservation.shrink(less));
                }
            }
            50..=69 if !held.is_empty() => {
                let got = held.swap_remove(rng.range(0, held.len() - 1));
                shared.guarded("a drop", || drop(got));
            }
            70..=79 if !pending.is_empty() => {
                let future = pending.swap_remove(rng.range(0, pending.len() - 1));
                shared.guarded("a cancel", || drop(future));
            }
            _ => {
                let mut i = 0;
                while i < pending.len() {
                    let waker = random_waker(&mut rng);
                    match shared.guarded("a poll", || poll(pending[i].as_mut(), &waker)) {
                        Some(Poll::Pending) => i += 1,
                        Some(Poll::Ready(result)) => {
                            drop(pending.swap_remove(i));
                            shared.completed(result, &mut held);
                        }
                        None => {
                            let future = pending.swap_remove(i);
                            shared
                                .guarded("dropping a request whose poll panicked", || drop(future));
                        }
                    }
                }
            }
        }
        while held.len() > 6 {
            let got = held.remove(0);
            shared.guarded("a drop", || drop(got));
        }
        if rng.range(0, 49) == 0 {
            let stats = pool.stats();
            if stats.in_use_bytes > stats.max_memory {
                shared.fail(format!("in use above the budget: {stats}"));
            }
        }
    }
    for future in pending {
        shared.guarded("a final cancel", || drop(future));
    }
    for got in held {
        shared.guarded("a final drop", || drop(got));
    }
}

/// Three threads for about 2 s ([`STRESS`]; under Miri [`STRESS_OPS_PER_WORKER`] operations
/// each) over root (12 buffers), mid (8) and two leaves under mid (5 each): allocations and
/// reservations in every call form, first polled and re-polled by hand with wakers of which
/// about 5% panic in `wake`, `clone` or `drop`; `try_*` calls, cancels, drops and shrinks,
/// every one under `catch_unwind`. Then every pool must be idle (nothing in use,
/// outstanding, reserved or waiting) and drop at once, leaves first.
#[test]
fn unwind_stress_with_panicking_wakers() {
    watched(60, || {
        let mut checks = Checks::new("stress");
        let root = root_pool(12);
        let mid = child_of(&root, "mid", 8);
        let leaf_a = child_of(&mid, "leaf-a", 5);
        let leaf_b = child_of(&mid, "leaf-b", 5);
        let names = ["root", "mid", "leaf-a", "leaf-b"];
        let pools: Vec<Arc<BufPool>> = [&root, &mid, &leaf_a, &leaf_b]
            .into_iter()
            .map(|pool| Arc::clone(pool))
            .collect();
        let shared = Shared {
            pools: &pools,
            stop_at: Instant::now() + STRESS * SLOWDOWN,
            max_ops: STRESS_OPS_PER_WORKER,
            failures: Mutex::new(Vec::new()),
            failure_count: AtomicUsize::new(0),
            panics: AtomicUsize::new(0),
            ops: AtomicUsize::new(0),
        };
        thread::scope(|scope| {
            for seed in 1..=3 {
                let shared = &shared;
                scope.spawn(move || stress_worker(seed, shared));
            }
        });
        let (ops, panics) = (shared.ops.load(Relaxed), shared.panics.load(Relaxed));
        eprintln!("stress: {ops} operations, {panics} panics caught");
        for failure in shared
            .failures
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            checks.fail(failure);
        }
        let count = shared.failure_count.load(Relaxed);
        checks.that(count <= 20, || format!("{count} failures in all"));
        checks.that(panics > 0, || {
            format!("no waker panicked in {ops} operations: the test tested nothing")
        });
        for (name, pool) in names.into_iter().zip(&pools) {
            checks.idle(name, pool);
        }
        drop(pools);
        drop_pool(&mut checks, "leaf-b", leaf_b);
        drop_pool(&mut checks, "leaf-a", leaf_a);
        drop_pool(&mut checks, "mid", mid);
        drop_pool(&mut checks, "root", root);
        checks.finish();
    });
}
