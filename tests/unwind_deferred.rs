//! Adversarial tests for three places changed together: `Deferred` (the user code a change of
//! the books owes, run after every lock is released; `run_one`, and `settle` forgetting an
//! emptied `Deferred`), the blocking shim's adaptive spin (`SPIN_BUDGET`, the reused
//! `THREAD_WAKER`) and the wait statistics' clock.
//!
//! Each test names the README guarantee it checks. `tests/unwind.rs` already covers one
//! panicking waker per level of a chain and the stress test with random panicking wakers;
//! the tests here aim at the fan-out of one give-back to 1, 2, 4, 5 and 9 waiters (inline
//! slots and the spill-over `Vec` of `Deferred`, the single wake-up of `run_one`) with the
//! panicking waker first, in the middle or last, for every kind of give-back.
//!
//! Every test runs under a watchdog, so a lost wake-up or a hung pool drop fails the test
//! instead of hanging it.

mod common;

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::thread;
use std::time::{Duration, Instant};

use common::{SLOWDOWN, wait_waiting, watchdog};
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reservation};

/// One buffer: every pool here has 64-byte buffers.
const B: usize = 64;

/// The watchdog of each test, in seconds (stretched under Miri by `watchdog`).
const WATCHDOG: u64 = 60;

/// How long a pool's drop may take before it counts as a hang.
const DROP_WITHIN: Duration = Duration::from_secs(5 * SLOWDOWN as u64);

/// The message of every test waker's panic.
const PANIC: &str = "probe waker panics on purpose";

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: B * buffers,
    }
}

fn pool(buffers: usize) -> BufPool {
    BufPool::builder(cfg(buffers))
        .drop_warning_after(Duration::from_secs(3600))
        .build()
        .expect("a valid pool")
}

fn child(parent: &BufPool, buffers: usize) -> BufPool {
    BufPool::builder(cfg(buffers))
        .name("child")
        .parent(parent)
        .drop_warning_after(Duration::from_secs(3600))
        .build()
        .expect("a valid child")
}

// ---------------------------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------------------------

/// Keeps the probe wakers' panics quiet (there are hundreds) and passes every other panic on
/// to the hook before it.
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

fn watched(f: impl FnOnce() + Send + 'static) {
    quiet();
    watchdog(WATCHDOG, f);
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

/// Runs `f`: `Ok(false)` if it returned, `Ok(true)` if it passed a probe waker's panic on,
/// `Err` (the message) for any other panic.
fn probe_panicked(f: impl FnOnce()) -> Result<bool, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => Ok(false),
        Err(payload) => {
            let text = message(&*payload);
            if text.contains("on purpose") {
                Ok(true)
            } else {
                Err(text)
            }
        }
    }
}

/// Drops `pool` on a thread of its own; panics if that does not return within
/// [`DROP_WITHIN`] (the drop waits for every byte: a lost byte hangs it).
#[track_caller]
fn drop_pool(name: &str, pool: BufPool) {
    let before = pool.stats();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        drop(pool);
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(DROP_WITHIN) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("dropping {name} hung (stats before the drop: {before})")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("dropping {name} panicked (stats before: {before})")
        }
    }
}

/// Nothing in use, outstanding, reserved or waiting; then the whole budget can be taken at
/// once and given back.
#[track_caller]
fn assert_exact_and_idle(what: &str, pool: &BufPool) {
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.outstanding,
            stats.reserved_bytes,
            stats.waiting
        ),
        (0, 0, 0, 0),
        "{what}: not idle once everything is dropped: {stats}"
    );
    let all = stats.max_memory / B;
    let allocation = pool
        .try_allocate(all)
        .unwrap_or_else(|error| panic!("{what}: the full budget is not back ({error}): {stats}"));
    drop(allocation);
    assert_eq!(pool.stats().in_use_bytes, 0, "{what}");
}

// ---------------------------------------------------------------------------------------------
// Probe wakers: count their wake-ups, and panic in `wake`, in the `drop` of a clone (which
// includes the drop at the end of a by-value `wake`), or in `clone`
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Mode {
    Calm,
    /// `wake` and `wake_by_ref` panic (after counting the wake-up).
    PanicWake,
    /// Dropping a clone (one the pool made) panics, also at the end of a by-value `wake`:
    /// a waker that wakes its task and then panics in its drop.
    PanicDrop,
    /// `clone` panics: the pool cannot register it.
    PanicClone,
}

struct ProbeState {
    mode: Mode,
    woken: AtomicUsize,
    /// Clones the pool holds now.
    live_clones: AtomicUsize,
}

/// What a probe waker's data pointer points at: a box per clone.
struct Handle {
    state: Arc<ProbeState>,
    original: bool,
}

#[derive(Clone)]
struct Probe(Arc<ProbeState>);

impl Probe {
    fn new(mode: Mode) -> (Probe, Waker) {
        let state = Arc::new(ProbeState {
            mode,
            woken: AtomicUsize::new(0),
            live_clones: AtomicUsize::new(0),
        });
        let handle = Box::new(Handle {
            state: Arc::clone(&state),
            original: true,
        });
        let raw = RawWaker::new(Box::into_raw(handle).cast_const().cast(), &VTABLE);
        // SAFETY: the vtable's functions follow the `RawWaker` contract for a boxed `Handle`.
        (Probe(state), unsafe { Waker::from_raw(raw) })
    }

    fn woken(&self) -> usize {
        self.0.woken.load(SeqCst)
    }

    fn live_clones(&self) -> usize {
        self.0.live_clones.load(SeqCst)
    }
}

static VTABLE: RawWakerVTable =
    RawWakerVTable::new(probe_clone, probe_wake, probe_wake_by_ref, probe_drop);

unsafe fn probe_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a live boxed `Handle` (the waker being cloned).
    let handle = unsafe { &*data.cast::<Handle>() };
    if handle.state.mode == Mode::PanicClone && !thread::panicking() {
        panic!("{PANIC} (clone)");
    }
    handle.state.live_clones.fetch_add(1, SeqCst);
    let clone = Box::new(Handle {
        state: Arc::clone(&handle.state),
        original: false,
    });
    RawWaker::new(Box::into_raw(clone).cast_const().cast(), &VTABLE)
}

/// Frees the handle; returns its state and whether it was a clone.
unsafe fn probe_release(data: *const ()) -> (Arc<ProbeState>, bool) {
    // SAFETY: `data` came from `Box::into_raw` and is released exactly once.
    let handle = unsafe { Box::from_raw(data.cast::<Handle>().cast_mut()) };
    if !handle.original {
        handle.state.live_clones.fetch_sub(1, SeqCst);
    }
    (Arc::clone(&handle.state), !handle.original)
}

unsafe fn probe_wake(data: *const ()) {
    // SAFETY: a by-value wake releases the waker.
    let (state, clone) = unsafe { probe_release(data) };
    state.woken.fetch_add(1, SeqCst);
    let panics = match state.mode {
        Mode::PanicWake => true,
        Mode::PanicDrop => clone,
        Mode::Calm | Mode::PanicClone => false,
    };
    if panics && !thread::panicking() {
        panic!("{PANIC} (wake)");
    }
}

unsafe fn probe_wake_by_ref(data: *const ()) {
    // SAFETY: `data` is a live boxed `Handle`.
    let handle = unsafe { &*data.cast::<Handle>() };
    handle.state.woken.fetch_add(1, SeqCst);
    if handle.state.mode == Mode::PanicWake && !thread::panicking() {
        panic!("{PANIC} (wake_by_ref)");
    }
}

unsafe fn probe_drop(data: *const ()) {
    // SAFETY: the waker is dropped exactly once.
    let (state, clone) = unsafe { probe_release(data) };
    if state.mode == Mode::PanicDrop && clone && !thread::panicking() {
        panic!("{PANIC} (drop)");
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

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

/// A waiting request, as a plain enum of the crate's futures: not an `async` block, whose
/// poll, should it unwind (a waker's `clone` or `drop` panicking), would drop the inner
/// future (cancelling the request) and panic on the next poll.
enum Req<'a> {
    Allocate(Pin<Box<membudget::Allocate<'a>>>),
    Reserve(Pin<Box<membudget::Reserve<'a>>>),
}

impl Future for Req<'_> {
    type Output = Result<Held, AllocError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Req::Allocate(future) => future.as_mut().poll(cx).map_ok(Held::Allocation),
            Req::Reserve(future) => future.as_mut().poll(cx).map_ok(Held::Reservation),
        }
    }
}

type Request<'a> = Pin<Box<Req<'a>>>;

/// Waiter `i` of a test: even ones allocate `n` buffers, odd ones reserve `n` buffers' bytes
/// (guarantee 12: reservations wait in the same FIFO).
fn request(pool: &BufPool, i: usize, n: usize) -> Request<'_> {
    Box::pin(if i % 2 == 0 {
        Req::Allocate(Box::pin(pool.allocate(n)))
    } else {
        Req::Reserve(Box::pin(pool.reserve(n * B)))
    })
}

fn poll_with<F: Future + ?Sized>(future: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(waker))
}

/// Polls `future` (with a no-op waker) and expects it to be granted.
#[track_caller]
fn granted(what: &str, future: &mut Request<'_>) -> Held {
    match catch_unwind(AssertUnwindSafe(|| {
        poll_with(future.as_mut(), Waker::noop())
    })) {
        Ok(Poll::Ready(Ok(held))) => held,
        Ok(Poll::Ready(Err(error))) => panic!("{what}: expected a grant, got {error:?}"),
        Ok(Poll::Pending) => panic!("{what}: expected a grant, still pending"),
        Err(payload) => panic!("{what}: the poll panicked: {}", message(&*payload)),
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: one give-back that serves many waiters, one of whose wakers panics
// ---------------------------------------------------------------------------------------------

/// The give-back that frees room for the waiters.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Release {
    /// Dropping an allocation of all `n` buffers (with `n == 1`, a hand-over of the block to
    /// the head: guarantee 18).
    DropAllocation,
    /// Dropping a reservation of all of them.
    DropReservation,
    /// Shrinking a reservation by `n` buffers.
    ShrinkReservation,
    /// Cancelling (dropping) the head, a request of `n + 1` buffers that holds back the `n`
    /// behind it.
    CancelHead,
    /// `set_max_memory` growth by `n` buffers (guarantee 14).
    SetMaxMemory,
    /// `add_max_memory` of `n` buffers.
    AddMaxMemory,
}

/// One case of the fan-out: `n` waiters of one buffer each (allocations and reservations
/// alternating), the one at `panicking` with a waker of `mode`, the others calm; `release`
/// frees room for all `n` at once. `panicking: None`: every waker has `mode`.
///
/// Checks guarantees 3 and 4 (every waiter that fits is woken by the one give-back), 5
/// (served in order: all of them, none left waiting), 9 (the panic is passed on only after
/// the books are done: every other waiter woken, each exactly once, the bytes in use exact,
/// the panicking waiter's own grant still there to take), and 10 (stats exact when
/// quiescent), then that everything given back leaves the pool idle with its full budget,
/// that the pool dropped every clone of every waker, and that the pool's drop returns.
fn fan_out_case(release: Release, n: usize, panicking: Option<usize>, mode: Mode) {
    let case = format!("{release:?}, {n} waiters, waiter {panicking:?} (None: all) {mode:?}");
    let capacity = match release {
        Release::DropAllocation | Release::DropReservation => n,
        Release::ShrinkReservation => n + 1,
        Release::CancelHead => 2 * n,
        Release::SetMaxMemory | Release::AddMaxMemory => 1,
    };
    let pool = pool(capacity);
    // What holds the budget before the release.
    let mut allocation = None;
    let mut reservation = None;
    let mut head = None;
    match release {
        Release::DropAllocation => allocation = Some(pool.try_allocate(n).unwrap()),
        Release::DropReservation => reservation = Some(pool.try_reserve(n * B).unwrap()),
        Release::ShrinkReservation => reservation = Some(pool.try_reserve((n + 1) * B).unwrap()),
        Release::CancelHead => {
            allocation = Some(pool.try_allocate(n).unwrap());
            let mut future = Box::pin(pool.allocate(n + 1));
            assert!(
                poll_with(future.as_mut(), Waker::noop()).is_pending(),
                "{case}: setup"
            );
            head = Some(future);
        }
        Release::SetMaxMemory | Release::AddMaxMemory => {
            allocation = Some(pool.try_allocate(1).unwrap())
        }
    }
    let held_before = pool.stats().in_use_bytes;
    let mut probes = Vec::new();
    let mut waiters = Vec::new();
    for i in 0..n {
        let this_mode = if panicking.is_none_or(|p| p == i) {
            mode
        } else {
            Mode::Calm
        };
        let (probe, waker) = Probe::new(this_mode);
        let mut future = request(&pool, i, 1);
        assert!(
            poll_with(future.as_mut(), &waker).is_pending(),
            "{case}: setup: waiter {i} must wait"
        );
        drop(waker);
        probes.push(probe);
        waiters.push(future);
    }
    assert_eq!(
        pool.stats().waiting,
        n + usize::from(head.is_some()),
        "{case}: setup"
    );

    let outcome = probe_panicked(|| match release {
        Release::DropAllocation | Release::DropReservation => {
            drop(allocation.take());
            drop(reservation.take());
        }
        Release::ShrinkReservation => reservation.as_mut().unwrap().shrink(n * B),
        Release::CancelHead => drop(head.take()),
        Release::SetMaxMemory => pool.set_max_memory((n + 1) * B).unwrap(),
        Release::AddMaxMemory => {
            pool.add_max_memory(n * B);
        }
    });
    let panicked = outcome.unwrap_or_else(|other| panic!("{case}: unexpected panic: {other}"));
    // Guarantee 9: the panic of a waker is passed on (after the books are done).
    if mode != Mode::Calm {
        assert!(panicked, "{case}: the waker's panic was not passed on");
    } else {
        assert!(!panicked, "{case}");
    }
    // Guarantees 3, 4, 9: every waiter woken, once (the panicking one included: its wake-up
    // ran, then it panicked).
    for (i, probe) in probes.iter().enumerate() {
        assert_eq!(
            probe.woken(),
            1,
            "{case}: waiter {i} woken {} times",
            probe.woken()
        );
    }
    // Release::SetMaxMemory / AddMaxMemory: the change itself took effect.
    let stats = pool.stats();
    if matches!(release, Release::SetMaxMemory | Release::AddMaxMemory) {
        assert_eq!(stats.max_memory, (n + 1) * B, "{case}");
    }
    // The budget is exact: everything granted, nobody waiting.
    let want_in_use = match release {
        Release::DropAllocation | Release::DropReservation => n * B,
        Release::ShrinkReservation => (n + 1) * B,
        Release::CancelHead => 2 * n * B,
        Release::SetMaxMemory | Release::AddMaxMemory => (n + 1) * B,
    };
    assert_eq!(
        (stats.in_use_bytes, stats.waiting),
        (want_in_use, 0),
        "{case}: after the release (held before: {held_before}): {stats}"
    );
    // Every waiter takes its grant, the panicking one's too.
    let mut held = Vec::new();
    for (i, future) in waiters.iter_mut().enumerate() {
        let got = granted(&format!("{case}: waiter {i}"), future);
        assert_eq!(got.bytes(), B, "{case}");
        held.push(got);
    }
    let stats = pool.stats();
    assert_eq!(
        stats.in_use_bytes, want_in_use,
        "{case}: after taking: {stats}"
    );
    assert_eq!(
        stats.reserved_bytes,
        n / 2 * B + reservation.as_ref().map_or(0, Reservation::size),
        "{case}: {stats}"
    );
    drop(held);
    drop(waiters);
    drop((allocation, reservation, head));
    assert_exact_and_idle(&case, &pool);
    for (i, probe) in probes.iter().enumerate() {
        assert_eq!(probe.live_clones(), 0, "{case}: waiter {i}'s waker leaked");
    }
    drop_pool(&case, pool);
}

fn fan_out(release: Release) {
    let sizes: &[usize] = if cfg!(miri) {
        &[1, 2, 5]
    } else {
        &[1, 2, 4, 5, 9]
    };
    for &n in sizes {
        let mut positions = vec![0, n / 2, n - 1];
        positions.dedup();
        for mode in [Mode::PanicWake, Mode::PanicDrop] {
            for &panicking in &positions {
                fan_out_case(release, n, Some(panicking), mode);
            }
            // Every waker panics: only the first panic goes on, every waiter is woken.
            fan_out_case(release, n, None, mode);
        }
        fan_out_case(release, n, None, Mode::Calm);
    }
}

/// Guarantees 3, 4, 5, 9, 10, 18: dropping an allocation wakes every waiter it frees room
/// for past a panicking `wake`/`drop` (first, middle, last of 1, 2, 4, 5, 9).
#[test]
fn fan_out_drop_allocation() {
    watched(|| fan_out(Release::DropAllocation));
}

/// Guarantees 3, 4, 9, 12: as above for dropping a reservation.
#[test]
fn fan_out_drop_reservation() {
    watched(|| fan_out(Release::DropReservation));
}

/// Guarantees 3, 4, 9, 12: as above for shrinking a reservation.
#[test]
fn fan_out_shrink_reservation() {
    watched(|| fan_out(Release::ShrinkReservation));
}

/// Guarantees 6 (a cancelled head lets the ones behind it move up), 4, 9.
#[test]
fn fan_out_cancel_head() {
    watched(|| fan_out(Release::CancelHead));
}

/// Guarantees 14 (growth serves the waiters that now fit), 4, 9: `set_max_memory`.
#[test]
fn fan_out_set_max_memory_growth() {
    watched(|| fan_out(Release::SetMaxMemory));
}

/// Guarantees 14, 4, 9: `add_max_memory`.
#[test]
fn fan_out_add_max_memory_growth() {
    watched(|| fan_out(Release::AddMaxMemory));
}

/// Guarantee 8 (every waiter gets `Closed`) and 9: `close()` with 5 waiters (allocations and
/// reservations), the first and the last of whose wakers panic (one in `wake`, one in the
/// drop after waking): every waiter woken once and failed with `Closed`, the panic passed on,
/// the live allocation unaffected, nothing left counted once it is dropped, the drop returns.
#[test]
fn close_wakes_every_waiter_past_panicking_wakers() {
    watched(|| {
        for (first, last) in [
            (Mode::PanicWake, Mode::PanicDrop),
            (Mode::PanicDrop, Mode::PanicWake),
            (Mode::Calm, Mode::PanicWake),
        ] {
            let case = format!("close, first {first:?}, last {last:?}");
            let pool = pool(2);
            let live = pool.try_allocate(2).unwrap();
            let mut probes = Vec::new();
            let mut waiters = Vec::new();
            for i in 0..5 {
                let mode = match i {
                    0 => first,
                    4 => last,
                    _ => Mode::Calm,
                };
                let (probe, waker) = Probe::new(mode);
                let mut future = request(&pool, i, 1);
                assert!(poll_with(future.as_mut(), &waker).is_pending(), "{case}");
                probes.push(probe);
                waiters.push(future);
            }
            let panicked = probe_panicked(|| pool.close()).unwrap();
            assert!(panicked, "{case}: the waker's panic was not passed on");
            assert!(pool.is_closed(), "{case}");
            for (i, probe) in probes.iter().enumerate() {
                assert_eq!(probe.woken(), 1, "{case}: waiter {i}");
            }
            let stats = pool.stats();
            assert_eq!(
                (stats.in_use_bytes, stats.waiting),
                (2 * B, 0),
                "{case}: {stats}"
            );
            for (i, future) in waiters.iter_mut().enumerate() {
                match poll_with(future.as_mut(), Waker::noop()) {
                    Poll::Ready(Err(AllocError::Closed)) => {}
                    other => panic!("{case}: waiter {i}: {other:?}"),
                }
            }
            // Closing twice is harmless (nobody left to wake).
            assert_eq!(probe_panicked(|| pool.close()), Ok(false), "{case}");
            assert_eq!(live.length(), 2, "{case}");
            drop(waiters);
            drop(live);
            let stats = pool.stats();
            assert_eq!(
                (
                    stats.in_use_bytes,
                    stats.outstanding,
                    stats.reserved_bytes,
                    stats.waiting
                ),
                (0, 0, 0, 0),
                "{case}: {stats}"
            );
            for probe in &probes {
                assert_eq!(probe.live_clones(), 0, "{case}: a waker leaked");
            }
            drop_pool(&case, pool);
        }
    });
}

/// Guarantees 11 and 9: a child's allocation dropped while the parent's queue holds three
/// waiters (first, middle or last with a panicking waker) and the child's own queue one more:
/// one release serves the three at the parent and the child's waiter at the child's level;
/// both levels' books are exact; the child's waiter then climbs to the parent's tail and is
/// served by the next release there (FIFO across levels, no lost wake-up).
#[test]
fn child_release_serves_parent_waiters_past_a_panicking_waker() {
    watched(|| {
        for panicking in [0, 1, 2] {
            for mode in [Mode::PanicWake, Mode::PanicDrop] {
                let case = format!("child release, parent waiter {panicking} {mode:?}");
                let root = pool(6);
                let kid = child(&root, 3);
                let at_root = root.try_allocate(3).unwrap();
                let in_kid = kid.try_allocate(3).unwrap();
                let mut probes = Vec::new();
                let mut root_waiters = Vec::new();
                for i in 0..3 {
                    let (probe, waker) = Probe::new(if i == panicking { mode } else { Mode::Calm });
                    let mut future = request(&root, i, 1);
                    assert!(poll_with(future.as_mut(), &waker).is_pending(), "{case}");
                    probes.push(probe);
                    root_waiters.push(future);
                }
                let (kid_probe, kid_waker) = Probe::new(Mode::Calm);
                let mut kid_waiter = request(&kid, 1, 1);
                assert!(
                    poll_with(kid_waiter.as_mut(), &kid_waker).is_pending(),
                    "{case}"
                );
                assert_eq!(
                    (root.stats().waiting, kid.stats().waiting),
                    (3, 1),
                    "{case}"
                );

                let panicked = probe_panicked(|| drop(in_kid)).unwrap();
                assert!(panicked, "{case}: the waker's panic was not passed on");
                for (i, probe) in probes.iter().enumerate() {
                    assert_eq!(probe.woken(), 1, "{case}: root waiter {i}");
                }
                assert_eq!(kid_probe.woken(), 1, "{case}: the child's waiter");
                // The child's level: the child's waiter holds 1 there, waits for nothing yet.
                let kid_stats = kid.stats();
                assert_eq!(
                    (
                        kid_stats.in_use_bytes,
                        kid_stats.outstanding,
                        kid_stats.waiting
                    ),
                    (B, 0, 0),
                    "{case}: child: {kid_stats}"
                );
                let root_stats = root.stats();
                assert_eq!(
                    (root_stats.in_use_bytes, root_stats.waiting),
                    (6 * B, 0),
                    "{case}: root: {root_stats}"
                );
                // The child's waiter climbs and waits at the root's tail.
                assert!(
                    poll_with(kid_waiter.as_mut(), &kid_waker).is_pending(),
                    "{case}: the child's waiter jumped the root's queue"
                );
                assert_eq!(root.stats().waiting, 1, "{case}");
                let held: Vec<Held> = root_waiters
                    .iter_mut()
                    .enumerate()
                    .map(|(i, future)| granted(&format!("{case}: root waiter {i}"), future))
                    .collect();
                drop(at_root);
                assert_eq!(kid_probe.woken(), 2, "{case}: the child's waiter not woken");
                let kid_held = granted(&format!("{case}: child waiter"), &mut kid_waiter);
                assert_eq!(kid.stats().in_use_bytes, B, "{case}");
                assert_eq!(root.stats().in_use_bytes, 4 * B, "{case}");
                drop((held, kid_held, root_waiters, kid_waiter));
                assert_exact_and_idle(&format!("{case}: child"), &kid);
                assert_exact_and_idle(&format!("{case}: root"), &root);
                for probe in probes.iter().chain([&kid_probe]) {
                    assert_eq!(probe.live_clones(), 0, "{case}: a waker leaked");
                }
                drop_pool("child", kid);
                drop_pool("root", root);
            }
        }
    });
}

/// Guarantee 9 ("a request records what it holds before any user code can unwind through
/// it"): a waker whose `clone` panics when its request first queues, or when a queued request
/// is polled with it as a new waker. The first request never queued and holds nothing; the
/// second keeps its place and its old waker; the waiters around them are served as if
/// nothing happened, and the budget is exact.
#[test]
fn waker_clone_panicking_at_registration_costs_only_its_own_request() {
    watched(|| {
        let pool = pool(4);
        let held = pool.try_allocate(4).unwrap();
        let (a_probe, a_waker) = Probe::new(Mode::Calm);
        let mut a = request(&pool, 0, 1);
        assert!(poll_with(a.as_mut(), &a_waker).is_pending());

        // A first poll whose waker cannot be cloned.
        let (_, bad) = Probe::new(Mode::PanicClone);
        let mut never = request(&pool, 0, 1);
        assert_eq!(
            probe_panicked(|| drop(poll_with(never.as_mut(), &bad))),
            Ok(true)
        );
        assert_eq!(
            pool.stats().waiting,
            1,
            "the request whose clone panicked queued"
        );

        // A queued request re-polled with a waker that cannot be cloned keeps its old one.
        let (c_probe, c_waker) = Probe::new(Mode::Calm);
        let mut c = request(&pool, 1, 1);
        assert!(poll_with(c.as_mut(), &c_waker).is_pending());
        assert_eq!(
            probe_panicked(|| drop(poll_with(c.as_mut(), &bad))),
            Ok(true)
        );
        let (d_probe, d_waker) = Probe::new(Mode::Calm);
        let mut d = request(&pool, 2, 1);
        assert!(poll_with(d.as_mut(), &d_waker).is_pending());
        assert_eq!(pool.stats().waiting, 3);
        assert_eq!(pool.stats().in_use_bytes, 4 * B);

        // The request that never queued leaves nothing behind when dropped.
        drop(never);
        assert_eq!(pool.stats().waiting, 3);
        assert_eq!(pool.stats().in_use_bytes, 4 * B);

        drop(held);
        for (name, probe) in [("a", &a_probe), ("c", &c_probe), ("d", &d_probe)] {
            assert_eq!(probe.woken(), 1, "waiter {name}");
        }
        let got: Vec<Held> = [&mut a, &mut c, &mut d]
            .into_iter()
            .map(|future| granted("waiter", future))
            .collect();
        assert_eq!(pool.stats().in_use_bytes, 3 * B);
        drop((got, a, c, d));
        assert_exact_and_idle("clone panics", &pool);
        for probe in [&a_probe, &c_probe, &d_probe] {
            assert_eq!(probe.live_clones(), 0, "a waker leaked");
        }
        drop_pool("pool", pool);
    });
}

/// Guarantee 9: a queued request re-polled with a new waker drops the old one, whose `drop`
/// panics: the poll passes the panic on, but the request keeps its place with the new waker,
/// which the next release wakes; nobody else is affected, and the budget is exact.
#[test]
fn replaced_waker_whose_drop_panics_keeps_the_request_queued() {
    watched(|| {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let (old_probe, old) = Probe::new(Mode::PanicDrop);
        let mut p = request(&pool, 0, 1);
        assert!(poll_with(p.as_mut(), &old).is_pending());
        let (behind_probe, behind_waker) = Probe::new(Mode::Calm);
        let mut behind = request(&pool, 1, 1);
        assert!(poll_with(behind.as_mut(), &behind_waker).is_pending());

        let (new_probe, new) = Probe::new(Mode::Calm);
        let outcome = probe_panicked(|| {
            assert!(poll_with(p.as_mut(), &new).is_pending());
        });
        assert_eq!(
            outcome,
            Ok(true),
            "the old waker's drop panic was not passed on"
        );
        assert_eq!(old_probe.live_clones(), 0, "the old waker was not dropped");
        assert_eq!(
            pool.stats().waiting,
            2,
            "the re-polled request lost its place"
        );

        assert_eq!(probe_panicked(|| drop(held)), Ok(false));
        assert_eq!(old_probe.woken(), 0, "the replaced waker was woken");
        assert_eq!(new_probe.woken(), 1, "the new waker was not woken");
        assert_eq!(behind_probe.woken(), 1);
        let got = (granted("p", &mut p), granted("behind", &mut behind));
        assert_eq!(pool.stats().in_use_bytes, 2 * B);
        drop((got, p, behind));
        assert_exact_and_idle("replaced waker", &pool);
        drop_pool("pool", pool);
    });
}

/// A waker that, when woken, gives back an allocation of the pool it waits in (re-entering
/// the pool from inside the `Deferred` of the release that woke it: a nested give-back with
/// its own wake-ups), then panics if `panics`.
struct Reentrant {
    stash: Mutex<Option<BufPoolAllocation>>,
    woken: AtomicUsize,
    panics: bool,
}

impl std::task::Wake for Reentrant {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.fetch_add(1, SeqCst);
        let stash = self.stash.lock().unwrap().take();
        drop(stash);
        if self.panics && !thread::panicking() {
            panic!("{PANIC} (re-entrant wake)");
        }
    }
}

/// Guarantee 9 ("a waker that re-enters the pool, even one that owns an allocation of it,
/// costs at most its own waiter") with several waiters: a release serves waiters 0 (a waker
/// that gives back the allocation it owns, then maybe panics, in `wake`) and 1 (calm); the
/// nested give-back inside waiter 0's wake serves waiters 2 and 3 (3's waker panics in the
/// panicking variant too), and waiter 4 keeps waiting for the last release. Every waiter is
/// woken exactly once, the books are exact at each step, and all ends idle.
#[test]
fn reentrant_waker_releasing_in_wake_amid_other_waiters() {
    watched(|| {
        for panics in [false, true] {
            let case = format!("re-entrant, panics {panics}");
            let pool = pool(5);
            let first = pool.try_allocate(2).unwrap();
            let owned_by_waker = pool.try_allocate(2).unwrap();
            let last = pool.try_allocate(1).unwrap();
            let reentrant = Arc::new(Reentrant {
                stash: Mutex::new(Some(owned_by_waker)),
                woken: AtomicUsize::new(0),
                panics,
            });
            let reentrant_waker = Waker::from(Arc::clone(&reentrant));
            let mut probes = Vec::new();
            let mut waiters = Vec::new();
            for i in 0..5 {
                let mut future = request(&pool, i, 1);
                if i == 0 {
                    assert!(poll_with(future.as_mut(), &reentrant_waker).is_pending());
                    probes.push(None);
                } else {
                    let mode = if i == 3 && panics {
                        Mode::PanicWake
                    } else {
                        Mode::Calm
                    };
                    let (probe, waker) = Probe::new(mode);
                    assert!(poll_with(future.as_mut(), &waker).is_pending());
                    probes.push(Some(probe));
                }
                waiters.push(future);
            }
            drop(reentrant_waker);
            let panicked = probe_panicked(|| drop(first)).unwrap();
            assert_eq!(panicked, panics, "{case}");
            assert_eq!(reentrant.woken.load(SeqCst), 1, "{case}");
            for (i, probe) in probes.iter().enumerate().skip(1) {
                let want = usize::from(i < 4);
                assert_eq!(probe.as_ref().unwrap().woken(), want, "{case}: waiter {i}");
            }
            let stats = pool.stats();
            assert_eq!(
                (stats.in_use_bytes, stats.waiting),
                (5 * B, 1),
                "{case}: {stats}"
            );
            let mut held: Vec<Held> = waiters[..4]
                .iter_mut()
                .enumerate()
                .map(|(i, future)| granted(&format!("{case}: waiter {i}"), future))
                .collect();
            drop(last);
            assert_eq!(probes[4].as_ref().unwrap().woken(), 1, "{case}: waiter 4");
            held.push(granted(&format!("{case}: waiter 4"), &mut waiters[4]));
            assert_eq!(pool.stats().in_use_bytes, 5 * B, "{case}");
            drop((held, waiters));
            assert_exact_and_idle(&case, &pool);
            drop_pool(&case, pool);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Part 2: the blocking shim (adaptive spin, the reused thread waker, deadlines)
// ---------------------------------------------------------------------------------------------

/// Guarantee 3 (no lost wake-ups) for blocking waiters whose spin budget adapts: one thread
/// waits again and again for a buffer another thread holds for a pattern of very short (no
/// sleep, a yield, a few µs) and long (1-3 ms) times, so the spin budget halves down to its
/// floor and is reset by short parks, in every order. Every wait must end (watchdog), every
/// grant is exact, and the pool is idle with its full budget afterwards.
#[test]
#[cfg_attr(miri, ignore)]
fn blocking_waits_alternating_long_and_short_holds() {
    watched(|| {
        let pool = Arc::new(pool(1));
        let rounds = 600;
        let (held_tx, held_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let holder = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                for round in 0..rounds {
                    let allocation = pool.allocate_blocking(1).unwrap();
                    held_tx.send(()).unwrap();
                    match round % 7 {
                        0 | 3 => {}
                        1 => thread::yield_now(),
                        2 => thread::sleep(Duration::from_micros(5)),
                        4 => thread::sleep(Duration::from_millis(3)),
                        5 => thread::sleep(Duration::from_millis(1)),
                        _ => {
                            let until = Instant::now() + Duration::from_micros(30);
                            while Instant::now() < until {
                                std::hint::spin_loop();
                            }
                        }
                    }
                    drop(allocation);
                    done_rx.recv().unwrap();
                }
            })
        };
        for round in 0..rounds {
            held_rx.recv().unwrap();
            // Alternate the call forms: plain, with a long deadline, zeroed.
            let allocation = match round % 3 {
                0 => pool.allocate_blocking(1),
                1 => pool.allocate_timeout(1, Duration::from_secs(30)),
                _ => pool.allocate_zeroed_blocking(1),
            }
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
            assert_eq!(allocation.allocated_bytes(), B);
            drop(allocation);
            done_tx.send(()).unwrap();
        }
        holder.join().unwrap();
        let stats = pool.stats();
        assert_eq!(stats.total_allocations, 2 * rounds, "{stats}");
        assert_eq!(stats.timed_out, 0, "{stats}");
        assert!(stats.waited_allocations <= 2 * rounds, "{stats}");
        assert_exact_and_idle("alternating", &pool);
    });
}

/// Guarantees 6 and 13 (timed waits): deadlines that pass during the spin (0, 1, 5, 20 µs) and
/// during the park (2, 10, 25 ms), on a pool held full: each returns `TimedOut` promptly, the
/// request leaves the queue, `timed_out` counts each exactly once, and nothing is given back
/// (the bytes in use stay exactly the holder's). Then the same thread's next wait, with a
/// release coming after 5 ms, is served.
#[test]
#[cfg_attr(miri, ignore)]
fn deadlines_expiring_during_spin_and_during_park() {
    watched(|| {
        let pool = Arc::new(pool(2));
        let held = pool.try_allocate(2).unwrap();
        let timeouts = [
            Duration::ZERO,
            Duration::from_micros(1),
            Duration::from_micros(5),
            Duration::from_micros(20),
            Duration::from_millis(2),
            Duration::from_micros(3),
            Duration::from_millis(10),
            Duration::from_nanos(1),
            Duration::from_millis(25),
        ];
        let mut expected_timeouts = 0;
        for _ in 0..5 {
            for &timeout in &timeouts {
                let start = Instant::now();
                let result = pool.allocate_timeout(1, timeout);
                let took = start.elapsed();
                assert_eq!(result.unwrap_err(), AllocError::TimedOut, "{timeout:?}");
                expected_timeouts += 1;
                assert!(
                    took >= timeout,
                    "returned before its deadline: {took:?} < {timeout:?}"
                );
                assert!(
                    took < timeout + Duration::from_millis(500),
                    "not prompt: {took:?} for {timeout:?}"
                );
                let stats = pool.stats();
                assert_eq!(
                    (
                        stats.in_use_bytes,
                        stats.waiting,
                        stats.timed_out,
                        stats.outstanding
                    ),
                    (2 * B, 0, expected_timeouts, 1),
                    "after a {timeout:?} timeout: {stats}"
                );
            }
        }
        // The next wait on this thread (its waker reused) still gets its own wake-up.
        let releaser = thread::spawn(move || {
            thread::sleep(Duration::from_millis(5));
            drop(held);
        });
        let got = pool.allocate_blocking(2).unwrap();
        releaser.join().unwrap();
        assert_eq!(pool.stats().in_use_bytes, 2 * B);
        drop(got);
        let stats = pool.stats();
        assert_eq!(stats.timed_out, expected_timeouts, "{stats}");
        assert_exact_and_idle("deadlines", &pool);
    });
}

/// Guarantees 6 and 3, against the reused `THREAD_WAKER`: the deadline races with a release
/// (the holder drops the buffer at about the deadline, the offset varied across the spin and
/// the park). Each timed wait either gets the buffer or fails with `TimedOut`; a grant that
/// arrives for a request that just gave up goes on (to nobody: it is given back), never twice.
/// Right after, the same thread starts a plain blocking wait that only a later release serves:
/// a stale wake-up of the earlier wait must not lose it. Counts and bytes are exact at the end.
#[test]
#[cfg_attr(miri, ignore)]
fn deadline_racing_a_release_then_a_new_wait_on_the_same_thread() {
    watched(|| {
        let pool = Arc::new(pool(1));
        let rounds = 300;
        let (go_tx, go_rx) = mpsc::channel::<(Duration, Duration)>();
        let (ack_tx, ack_rx) = mpsc::channel::<()>();
        let holder = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                while let Ok((first, second)) = go_rx.recv() {
                    let allocation = pool.try_allocate(1).unwrap();
                    ack_tx.send(()).unwrap();
                    spin_for(first);
                    drop(allocation);
                    // Holds the buffer again for the waiter's second wait, unless the waiter
                    // got it first (then that wait needs no release).
                    if let Ok(again) = pool.try_allocate(1) {
                        ack_tx.send(()).unwrap();
                        spin_for(second);
                        drop(again);
                    } else {
                        ack_tx.send(()).unwrap();
                    }
                }
            })
        };
        let mut timed_out = 0;
        let mut got_in_time = 0;
        for round in 0..rounds {
            let timeout = Duration::from_micros([2, 10, 40, 200, 1000][round % 5]);
            let release_after = timeout.mul_f64([0.5, 0.9, 1.0, 1.1, 1.5][(round / 5) % 5]);
            go_tx
                .send((release_after, Duration::from_micros(50)))
                .unwrap();
            ack_rx.recv().unwrap();
            match pool.allocate_timeout(1, timeout) {
                Ok(allocation) => {
                    got_in_time += 1;
                    drop(allocation);
                }
                Err(AllocError::TimedOut) => timed_out += 1,
                Err(other) => panic!("round {round}: {other}"),
            }
            ack_rx.recv().unwrap();
            let allocation = pool
                .allocate_blocking(1)
                .unwrap_or_else(|error| panic!("round {round}: {error}"));
            drop(allocation);
        }
        drop(go_tx);
        holder.join().unwrap();
        let stats = pool.stats();
        assert_eq!(stats.timed_out, timed_out, "{stats}");
        assert!(got_in_time + timed_out == rounds);
        assert_exact_and_idle("racing deadlines", &pool);
    });
}

fn spin_for(duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// A waker that blocks in `wake` until released: holds back the wake-ups owed after it.
struct Gate {
    entered: AtomicBool,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.entered.store(true, SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

/// Guarantees 3 and 9 (a waker may block; wake-ups run after the books), against the reused
/// `THREAD_WAKER`, deterministically: the queue holds a gate waker (which blocks in `wake`)
/// and then thread T's blocking timed wait. A release grants both and blocks in the gate's
/// `wake`, before T's wake-up. T's deadline passes, its last poll finds the grant (it must
/// not be thrown away), and T starts a new blocking wait, which has to wait. Then the gate
/// opens: T's old wake-up lands on the same thread waker during the new wait (a stale
/// wake-up). The new wait must neither complete without a grant nor miss its own wake-up
/// from the next release; the budget is exact at the end.
#[test]
fn stale_wake_of_the_thread_waker_lands_in_the_next_wait() {
    watched(|| {
        let pool = Arc::new(pool(2));
        let held = pool.try_allocate(2).unwrap();
        let gate = Arc::new(Gate {
            entered: AtomicBool::new(false),
            open: Mutex::new(false),
            opened: std::sync::Condvar::new(),
        });
        let gate_waker = Waker::from(Arc::clone(&gate));
        let mut first = request(&pool, 0, 1);
        assert!(poll_with(first.as_mut(), &gate_waker).is_pending());

        let (phase_tx, phase_rx) = mpsc::channel::<&'static str>();
        let (next_tx, next_rx) = mpsc::channel::<()>();
        let t = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                // The deadline is long enough for the release to grant it (the gate holds
                // the wake-up back), short enough for the test.
                let got = pool
                    .allocate_timeout(1, Duration::from_millis(300) * SLOWDOWN)
                    .expect("the grant that came in time is not thrown away");
                phase_tx.send("first done").unwrap();
                next_rx.recv().unwrap();
                drop(got);
                phase_tx.send("dropped").unwrap();
                next_rx.recv().unwrap();
                // The pool is full again (the test holds both buffers): this waits.
                let second = pool.allocate_blocking(1).expect("the second wait");
                phase_tx.send("second done").unwrap();
                drop(second);
            })
        };
        wait_waiting(&pool, 2);
        let releaser = thread::spawn(move || drop(held));
        common::wait_until(10, "the release reaches the gate", || {
            gate.entered.load(SeqCst)
        });
        // T: its deadline passes, its last poll takes the grant.
        assert_eq!(
            phase_rx.recv_timeout(Duration::from_secs(10) * SLOWDOWN),
            Ok("first done")
        );
        let gate_grant = granted("gate waiter", &mut first);
        next_tx.send(()).unwrap();
        let recv = |want: &str| {
            assert_eq!(
                phase_rx
                    .recv_timeout(Duration::from_secs(10) * SLOWDOWN)
                    .as_deref(),
                Ok(want)
            );
        };
        recv("dropped");
        // T gave its buffer back: the test takes it, so T's next wait has to wait.
        let refill = pool.try_allocate(1).unwrap();
        next_tx.send(()).unwrap();
        wait_waiting(&pool, 1);
        // The stale wake-up: the release still runs the wake-ups it owes.
        *gate.open.lock().unwrap() = true;
        gate.opened.notify_all();
        releaser.join().unwrap();
        // The stale wake-up must not complete the new wait.
        thread::sleep(Duration::from_millis(20));
        assert!(
            phase_rx.try_recv().is_err(),
            "the second wait completed without a grant"
        );
        let stats = pool.stats();
        assert_eq!((stats.in_use_bytes, stats.waiting), (2 * B, 1), "{stats}");
        drop(refill);
        assert_eq!(
            phase_rx.recv_timeout(Duration::from_secs(10) * SLOWDOWN),
            Ok("second done"),
            "the second wait lost its wake-up"
        );
        t.join().unwrap();
        drop((gate_grant, first));
        assert_exact_and_idle("stale wake", &pool);
    });
}

// ---------------------------------------------------------------------------------------------
// Part 3: the wait statistics
// ---------------------------------------------------------------------------------------------

/// `rounds` rounds: the test holds the whole pool (1 buffer), `threads` threads queue a
/// blocking wait each (some timed), the test sleeps `hold` and releases; each thread holds
/// its grant briefly. Every wait of the run waited (they are all queued before the release),
/// so the counts are exact. Meanwhile a reader checks, at every snapshot, that the mean is
/// at most the maximum, the maximum at most the total, and no figure goes down.
fn wait_stats_run(
    time_waits: bool,
    threads: usize,
    rounds: usize,
    hold: Duration,
) -> membudget::PoolStats {
    let pool = Arc::new(
        BufPool::builder(cfg(1))
            .time_waits(time_waits)
            .build()
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let pool = Arc::clone(&pool);
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut last = pool.stats();
            while !stop.load(SeqCst) {
                let now = pool.stats();
                assert!(now.mean_wait() <= now.max_wait, "mean above max: {now}");
                assert!(now.max_wait <= now.total_wait, "max above total: {now}");
                assert!(
                    now.waited_allocations >= last.waited_allocations,
                    "{now} after {last}"
                );
                // (That `total_wait` and `max_wait` never go down is checked, and found
                // broken, by `wait_durations_never_go_down`.)
                if !time_waits {
                    assert_eq!(
                        (now.total_wait, now.max_wait),
                        (Duration::ZERO, Duration::ZERO)
                    );
                }
                last = now;
                thread::yield_now();
            }
        })
    };
    for round in 0..rounds {
        let held = pool.try_allocate(1).unwrap();
        let barrier = Arc::new(Barrier::new(threads + 1));
        let waiters: Vec<_> = (0..threads)
            .map(|i| {
                let pool = Arc::clone(&pool);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    let allocation = if (i + round) % 2 == 0 {
                        pool.allocate_blocking(1)
                    } else {
                        pool.allocate_timeout(1, Duration::from_secs(60))
                    }
                    .unwrap();
                    thread::sleep(Duration::from_micros(200));
                    drop(allocation);
                })
            })
            .collect();
        barrier.wait();
        wait_waiting(&pool, threads);
        thread::sleep(hold);
        drop(held);
        for waiter in waiters {
            waiter.join().unwrap();
        }
    }
    stop.store(true, SeqCst);
    reader.join().unwrap();
    let stats = pool.stats();
    assert_eq!(stats.total_allocations, rounds * (threads + 1), "{stats}");
    assert_eq!(stats.waited_allocations, rounds * threads, "{stats}");
    assert_eq!(stats.timed_out, 0, "{stats}");
    assert!(stats.mean_wait() <= stats.max_wait, "{stats}");
    assert!(stats.max_wait <= stats.total_wait, "{stats}");
    assert_exact_and_idle("wait stats", &pool);
    stats
}

/// Guarantee 10 with `time_waits(true)`: 4 threads × 3 rounds of waits behind a 25 ms hold:
/// `waited_allocations` exact, mean ≤ max ≤ total at every snapshot, nothing goes down, and
/// the longest wait shows the hold (≥ 15 ms), the total at least rounds × hold.
#[test]
#[cfg_attr(miri, ignore)]
fn wait_stats_timed_are_consistent_and_exact() {
    watched(|| {
        let stats = wait_stats_run(true, 4, 3, Duration::from_millis(25));
        assert!(stats.max_wait >= Duration::from_millis(15), "{stats}");
        assert!(stats.max_wait < Duration::from_secs(30), "{stats}");
        assert!(stats.total_wait >= Duration::from_millis(15 * 3), "{stats}");
        assert!(stats.mean_wait() >= Duration::from_millis(1), "{stats}");
    });
}

/// Guarantee 10 with `time_waits(false)`: the same run counts every wait exactly and keeps
/// `total_wait`, `max_wait` and `mean_wait()` at zero throughout.
#[test]
#[cfg_attr(miri, ignore)]
fn wait_stats_untimed_count_exactly_and_stay_zero() {
    watched(|| {
        let stats = wait_stats_run(false, 4, 3, Duration::from_millis(5));
        assert_eq!(
            (stats.total_wait, stats.max_wait, stats.mean_wait()),
            (Duration::ZERO, Duration::ZERO, Duration::ZERO),
            "{stats}"
        );
    });
}

/// Guarantee 10, small and deterministic (runs under Miri too): one wait granted after the
/// release, one wait that times out (not a granted wait: not counted in
/// `waited_allocations`, counted in `timed_out`), one queued request cancelled after its
/// grant (its wait stays counted), with waits timed and untimed.
#[test]
fn wait_stats_count_grants_not_timeouts() {
    watched(|| {
        for time_waits in [true, false] {
            let pool = BufPool::builder(cfg(1))
                .time_waits(time_waits)
                .build()
                .unwrap();
            let held = pool.try_allocate(1).unwrap();
            assert_eq!(
                pool.allocate_timeout(1, Duration::from_millis(1))
                    .unwrap_err(),
                AllocError::TimedOut
            );
            let stats = pool.stats();
            assert_eq!(
                (stats.waited_allocations, stats.timed_out),
                (0, 1),
                "{stats}"
            );
            assert_eq!(stats.max_wait, Duration::ZERO, "{stats}");

            let mut granted_untaken = request(&pool, 0, 1);
            assert!(poll_with(granted_untaken.as_mut(), Waker::noop()).is_pending());
            let mut taken = request(&pool, 1, 1);
            assert!(poll_with(taken.as_mut(), Waker::noop()).is_pending());
            thread::sleep(Duration::from_millis(2));
            drop(held);
            // Granted, never taken: given back, which grants the next one.
            drop(granted_untaken);
            let got = granted("taken", &mut taken);
            let stats = pool.stats();
            assert_eq!(stats.waited_allocations, 2, "{stats}");
            assert_eq!(stats.timed_out, 1, "{stats}");
            assert!(stats.mean_wait() <= stats.max_wait, "{stats}");
            assert!(stats.max_wait <= stats.total_wait, "{stats}");
            if time_waits {
                assert!(stats.max_wait > Duration::ZERO, "{stats}");
            } else {
                assert_eq!(stats.total_wait, Duration::ZERO, "{stats}");
            }
            drop((got, taken));
            assert_exact_and_idle("wait stats", &pool);
        }
    });
}

/// Guarantee 10 ("none ever goes down"): after one timed wait, with no other wait, repeated
/// `stats()` reads must never show `total_wait` or `max_wait` smaller than an earlier read.
/// Each `stats()` converts the same tick counts with a fresh measurement of the TSC's rate
/// (`clock::ticks_to_durations`, over the time since the epoch), so before the fix the same
/// waits came out a nanosecond or more shorter whenever the estimate moved down; now each
/// pool reports no less than it last did (`WaitTotals::reported_wait`).
#[test]
#[cfg_attr(miri, ignore)]
fn wait_durations_never_go_down() {
    watched(|| {
        let pool = Arc::new(pool(1));
        let held = pool.try_allocate(1).unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || drop(pool.allocate_blocking(1).unwrap()))
        };
        wait_waiting(&pool, 1);
        thread::sleep(Duration::from_millis(25));
        drop(held);
        waiter.join().unwrap();
        let first = pool.stats();
        assert_eq!(first.waited_allocations, 1);
        let mut last = first;
        let until = Instant::now() + Duration::from_millis(500);
        let mut reads = 0u64;
        while Instant::now() < until {
            let now = pool.stats();
            reads += 1;
            assert_eq!(now.waited_allocations, 1);
            assert!(
                now.max_wait >= last.max_wait && now.total_wait >= last.total_wait,
                "after {reads} reads, with no new wait: max_wait {:?} -> {:?}, total_wait \
                 {:?} -> {:?}",
                last.max_wait,
                now.max_wait,
                last.total_wait,
                now.total_wait
            );
            last = now;
        }
    });
}
