//! Hostile user code at every wait form, as a matrix (session 30, helper s30d).
//!
//! Every async wait form (`allocate`, `allocate_zeroed`, `allocate_owned`, `PollAllocate`,
//! `reserve`, `reserve_owned`), waiting in a root pool, in a child (waiting at the root's
//! queue) or in a floored child, with no reclaimer, with a reclaimer that frees part of the
//! shortfall, or with one that frees all of it (its future yields once first, waking the
//! driver's waker from inside the round), is polled with a waker that is hostile in one way:
//! it panics in `wake`, `clone` or `drop`, re-enters the pool from `wake` (a `try_allocate`
//! it keeps, a new owned request it keeps, dropping an allocation it owns, a shrink, a
//! close, dropping a pool handle), or owns an allocation its drop gives back. Then one thing
//! happens to the request: the budget it waits for is released, its pool is closed or
//! shrunk below it, it is cancelled, or it is re-polled with another waker.
//!
//! After each case, at the quiescent point: only the injected panics escaped, a request that
//! fits was served (no lost wakeup), every pool's books are exact (stats and report), no
//! waker clone is leaked, the pool still queues and serves new requests, and every pool
//! drops promptly.
//!
//! Single-threaded apart from the watchdog; under Miri a sample of the cases runs.

mod common;

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use common::watchdog;
use membudget::{
    AllocError, Allocate, AllocateOwned, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize,
    PollAllocate, Reclaimer, ReclaimerHandle, Reservation, Reserve, ReserveOwned,
};

const BS: usize = 64;
const INJECTED: &str = "s30d injected";

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * BS,
    }
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

/// Injected panics are expected: keep them off stderr.
fn quiet() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("S30D_LOUD").is_some() {
            return;
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !message(info.payload()).contains(INJECTED) {
                previous(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// The hostile waker
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Behavior {
    Calm,
    PanicWake,
    PanicClone,
    PanicDrop,
    /// `wake` calls `try_allocate(1)` on the request's pool and keeps what it gets.
    WakeTryAllocate,
    /// `wake` starts an owned request of 1 on the request's pool, polls it once and keeps it.
    WakeNewRequest,
    /// The waker owns an allocation; `wake` drops it.
    WakeDropsOwned,
    /// `wake` shrinks the request's pool to one buffer.
    WakeShrinks,
    /// `wake` closes the request's pool.
    WakeCloses,
    /// `wake` drops a handle of the request's pool it holds (not the last).
    WakeDropsHandle,
    /// The waker owns an allocation; dropping its last clone gives it back.
    OwnsAllocation,
}

const BEHAVIORS: [Behavior; 11] = [
    Behavior::Calm,
    Behavior::PanicWake,
    Behavior::PanicClone,
    Behavior::PanicDrop,
    Behavior::WakeTryAllocate,
    Behavior::WakeNewRequest,
    Behavior::WakeDropsOwned,
    Behavior::WakeShrinks,
    Behavior::WakeCloses,
    Behavior::WakeDropsHandle,
    Behavior::OwnsAllocation,
];

struct Ctl {
    behavior: Behavior,
    armed: AtomicBool,
    woken: AtomicUsize,
    /// Wakers alive (the test's own included).
    live: AtomicUsize,
    /// A waker of ours dropped (with a panic due) while its thread was unwinding.
    dropped_unwinding: AtomicUsize,
    pool: Mutex<Option<Arc<BufPool>>>,
    owned: Mutex<Vec<BufPoolAllocation>>,
    owned_request: Mutex<Option<Pin<Box<AllocateOwned>>>>,
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(w_clone, w_wake, w_wake_by_ref, w_drop);

/// What a waker's handles share: the control block, and the allocations the waker owns (the
/// `owned` preload of its `Ctl`, moved in when it is made), given back when its last handle
/// is dropped, wherever that happens (inside the pool, for a waker the pool holds last).
struct Inner {
    ctl: Arc<Ctl>,
    held: Mutex<Vec<BufPoolAllocation>>,
}

fn make_waker(ctl: &Arc<Ctl>) -> Waker {
    ctl.live.fetch_add(1, SeqCst);
    let held = if matches!(
        ctl.behavior,
        Behavior::WakeDropsOwned | Behavior::OwnsAllocation
    ) {
        std::mem::take(&mut *ctl.owned.lock().unwrap())
    } else {
        Vec::new()
    };
    let inner = Arc::new(Inner {
        ctl: Arc::clone(ctl),
        held: Mutex::new(held),
    });
    let raw = RawWaker::new(Arc::into_raw(inner).cast(), &VTABLE);
    // SAFETY: the vtable follows the RawWaker contract for an `Arc<Inner>`.
    unsafe { Waker::from_raw(raw) }
}

unsafe fn w_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a live `Arc<Inner>` pointer.
    let inner = unsafe { &*data.cast::<Inner>() };
    let ctl = &inner.ctl;
    if ctl.behavior == Behavior::PanicClone && ctl.armed.load(SeqCst) && !std::thread::panicking() {
        panic!("{INJECTED} (clone)");
    }
    // SAFETY: as above; one more strong count for the clone.
    unsafe { Arc::increment_strong_count(data.cast::<Inner>()) };
    ctl.live.fetch_add(1, SeqCst);
    RawWaker::new(data, &VTABLE)
}

fn on_wake(inner: &Inner) {
    let ctl = &*inner.ctl;
    ctl.woken.fetch_add(1, SeqCst);
    if !ctl.armed.load(SeqCst) {
        return;
    }
    let pool = ctl.pool.lock().unwrap().clone();
    match ctl.behavior {
        Behavior::PanicWake => {
            if !std::thread::panicking() {
                panic!("{INJECTED} (wake)");
            }
        }
        Behavior::WakeTryAllocate => {
            if let Some(pool) = pool {
                if let Ok(a) = pool.try_allocate(1) {
                    ctl.owned.lock().unwrap().push(a);
                }
            }
        }
        Behavior::WakeNewRequest => {
            if let Some(pool) = pool {
                let mut request = Box::pin(pool.allocate_owned(1));
                let waker = Waker::noop();
                match request.as_mut().poll(&mut Context::from_waker(waker)) {
                    Poll::Ready(Ok(a)) => ctl.owned.lock().unwrap().push(a),
                    Poll::Ready(Err(_)) => {}
                    Poll::Pending => {
                        let old = ctl.owned_request.lock().unwrap().replace(request);
                        drop(old);
                    }
                }
            }
        }
        Behavior::WakeDropsOwned => {
            let owned = std::mem::take(&mut *inner.held.lock().unwrap());
            drop(owned);
        }
        Behavior::WakeShrinks => {
            if let Some(pool) = pool {
                let _ = pool.set_max_memory(BS);
            }
        }
        Behavior::WakeCloses => {
            if let Some(pool) = pool {
                pool.close();
            }
        }
        Behavior::WakeDropsHandle => {
            let handle = ctl.pool.lock().unwrap().take();
            drop(handle);
        }
        Behavior::Calm | Behavior::PanicClone | Behavior::PanicDrop | Behavior::OwnsAllocation => {}
    }
}

/// Releases one waker handle, panicking afterwards if it should. The last handle gives back
/// what the waker owns.
fn release(inner: Arc<Inner>) {
    let ctl = Arc::clone(&inner.ctl);
    let panics = ctl.behavior == Behavior::PanicDrop && ctl.armed.load(SeqCst);
    let unwinding = std::thread::panicking();
    if panics && unwinding {
        ctl.dropped_unwinding.fetch_add(1, SeqCst);
    }
    drop(inner);
    ctl.live.fetch_sub(1, SeqCst);
    if panics && !unwinding {
        panic!("{INJECTED} (drop)");
    }
}

unsafe fn w_wake(data: *const ()) {
    // SAFETY: a by-value wake consumes this handle's strong count.
    let inner = unsafe { Arc::from_raw(data.cast::<Inner>()) };
    let woke = catch_unwind(AssertUnwindSafe(|| on_wake(&inner)));
    release(inner);
    if let Err(panic) = woke {
        std::panic::resume_unwind(panic);
    }
}

unsafe fn w_wake_by_ref(data: *const ()) {
    // SAFETY: `data` is a live `Arc<Inner>` pointer.
    let inner = unsafe { &*data.cast::<Inner>() };
    on_wake(inner);
}

unsafe fn w_drop(data: *const ()) {
    // SAFETY: the handle is dropped once.
    let inner = unsafe { Arc::from_raw(data.cast::<Inner>()) };
    release(inner);
}

fn new_ctl(behavior: Behavior, pool: &Arc<BufPool>) -> Arc<Ctl> {
    Arc::new(Ctl {
        behavior,
        armed: AtomicBool::new(true),
        woken: AtomicUsize::new(0),
        live: AtomicUsize::new(0),
        dropped_unwinding: AtomicUsize::new(0),
        pool: Mutex::new(Some(Arc::clone(pool))),
        owned: Mutex::new(Vec::new()),
        owned_request: Mutex::new(None),
    })
}

/// Disarms the waker, and gives back whatever it holds (it may still be alive in the pool).
fn disarm(ctl: &Ctl) {
    ctl.armed.store(false, SeqCst);
    let owned = std::mem::take(&mut *ctl.owned.lock().unwrap());
    drop(owned);
    let request = ctl.owned_request.lock().unwrap().take();
    drop(request);
    let pool = ctl.pool.lock().unwrap().take();
    drop(pool);
}

// ---------------------------------------------------------------------------------------------
// A reclaimer: a cache whose future yields once (waking its driver's waker) and then frees
// ---------------------------------------------------------------------------------------------

struct Cache {
    entries: Mutex<Vec<BufPoolAllocation>>,
    reported: AtomicUsize,
}

impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        self.entries.lock().unwrap().len() * BS
    }
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let mut taken = Vec::new();
        {
            let mut entries = self.entries.lock().unwrap();
            let mut bytes = 0;
            while bytes < target {
                match entries.pop() {
                    Some(a) => {
                        bytes += a.allocated_bytes();
                        taken.push(a);
                    }
                    None => break,
                }
            }
        }
        Box::pin(YieldThenFree {
            yielded: false,
            taken,
        })
    }
}

struct YieldThenFree {
    yielded: bool,
    taken: Vec<BufPoolAllocation>,
}

impl Future for YieldThenFree {
    type Output = usize;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let freed: usize = self.taken.iter().map(|a| a.allocated_bytes()).sum();
        self.taken.clear();
        Poll::Ready(freed)
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Form {
    Allocate,
    AllocateZeroed,
    AllocateOwned,
    PollAllocate,
    Reserve,
    ReserveOwned,
}

const FORMS: [Form; 6] = [
    Form::Allocate,
    Form::AllocateZeroed,
    Form::AllocateOwned,
    Form::PollAllocate,
    Form::Reserve,
    Form::ReserveOwned,
];

#[derive(Debug)]
#[allow(dead_code)]
enum Held {
    Allocation(BufPoolAllocation),
    #[allow(dead_code)]
    Reservation(Reservation),
}

/// The crate's futures themselves (not `async` wrappers, which an unwinding poll would drop).
enum Req<'a> {
    Allocate(Pin<Box<Allocate<'a>>>),
    Owned(Pin<Box<AllocateOwned>>),
    Poller(PollAllocate, usize),
    Reserve(Pin<Box<Reserve<'a>>>),
    ReserveOwned(Pin<Box<ReserveOwned>>),
}

const N: usize = 2;

fn request(pool: &Arc<BufPool>, form: Form) -> Req<'_> {
    match form {
        Form::Allocate => Req::Allocate(Box::pin(pool.allocate(N))),
        Form::AllocateZeroed => Req::Allocate(Box::pin(pool.allocate_zeroed(N))),
        Form::AllocateOwned => Req::Owned(Box::pin(Arc::clone(pool).allocate_owned(N))),
        Form::PollAllocate => Req::Poller(PollAllocate::new(Arc::clone(pool)), N),
        Form::Reserve => Req::Reserve(Box::pin(pool.reserve(N * BS))),
        Form::ReserveOwned => Req::ReserveOwned(Box::pin(Arc::clone(pool).reserve_owned(N * BS))),
    }
}

impl Req<'_> {
    fn poll(&mut self, waker: &Waker) -> Poll<Result<Held, AllocError>> {
        let cx = &mut Context::from_waker(waker);
        match self {
            Req::Allocate(f) => f.as_mut().poll(cx).map(|r| r.map(Held::Allocation)),
            Req::Owned(f) => f.as_mut().poll(cx).map(|r| r.map(Held::Allocation)),
            Req::Poller(p, n) => p.poll_allocate(cx, *n).map(|r| r.map(Held::Allocation)),
            Req::Reserve(f) => f.as_mut().poll(cx).map(|r| r.map(Held::Reservation)),
            Req::ReserveOwned(f) => f.as_mut().poll(cx).map(|r| r.map(Held::Reservation)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Where {
    Root,
    /// A child of cap 6 under a root of 4: the request waits in the root's queue.
    Child,
    /// A child of cap 4 with a floor of 2 under a root of 6, its floor full.
    Floored,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Reclaim {
    None,
    /// A cache of 1 buffer (half the request).
    Partial,
    /// A cache of 2 buffers: reclaim alone serves the request.
    Full,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Trigger {
    Release,
    Close,
    Shrink,
    Cancel,
    Repoll,
}

const TRIGGERS: [Trigger; 5] = [
    Trigger::Release,
    Trigger::Close,
    Trigger::Shrink,
    Trigger::Cancel,
    Trigger::Repoll,
];

struct Case {
    form: Form,
    place: Where,
    reclaim: Reclaim,
    behavior: Behavior,
    trigger: Trigger,
}

struct Log {
    case: String,
    failures: Vec<String>,
}

impl Log {
    fn fail(&mut self, what: impl Into<String>) {
        self.failures
            .push(format!("{}: {}", self.case, what.into()));
    }

    /// Runs `f`; an injected panic is fine (returns None), any other is a failure.
    fn step<R>(&mut self, what: &str, f: impl FnOnce() -> R) -> Option<R> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => Some(r),
            Err(payload) => {
                let msg = message(&*payload);
                if !msg.contains(INJECTED) {
                    self.fail(format!("{what}: unexpected panic: {msg}"));
                }
                None
            }
        }
    }
}

fn books(log: &mut Log, name: &str, pool: &BufPool, in_use: usize) {
    let s = pool.stats();
    let got = (
        s.in_use_bytes,
        s.outstanding,
        s.waiting,
        s.reserved_bytes,
        s.overcommit_bytes,
    );
    if got != (in_use, 0, 0, 0, 0) {
        log.fail(format!(
            "{name}: books not exact (in_use, outstanding, waiting, reserved, overcommit) = {got:?}, want in_use {in_use}: {s}"
        ));
    }
    let r = pool.report();
    if r.in_use_bytes != s.in_use_bytes || r.waiting != 0 || r.outstanding != 0 {
        log.fail(format!(
            "{name}: report disagrees: in_use {} waiting {} outstanding {}",
            r.in_use_bytes, r.waiting, r.outstanding
        ));
    }
    if s.mean_wait() > s.max_wait {
        log.fail(format!("{name}: mean wait above max: {s}"));
    }
}

/// The pool queues and serves a new request (FIFO core not wedged).
fn serves(log: &mut Log, name: &str, pool: &BufPool, all: usize) {
    if pool.is_closed() {
        return;
    }
    let Ok(held) = pool.try_allocate(all) else {
        log.fail(format!("{name}: full budget not back: {}", pool.stats()));
        return;
    };
    let woken = Arc::new(AtomicUsize::new(0));
    let ctl = Arc::new(Ctl {
        behavior: Behavior::Calm,
        armed: AtomicBool::new(false),
        woken: AtomicUsize::new(0),
        live: AtomicUsize::new(0),
        dropped_unwinding: AtomicUsize::new(0),
        pool: Mutex::new(None),
        owned: Mutex::new(Vec::new()),
        owned_request: Mutex::new(None),
    });
    let waker = make_waker(&ctl);
    let mut waiter = Box::pin(pool.allocate(1));
    let cx = &mut Context::from_waker(&waker);
    if waiter.as_mut().poll(cx).is_ready() {
        log.fail(format!("{name}: a request was served above the budget"));
        return;
    }
    drop(held);
    if ctl.woken.load(SeqCst) == 0 {
        log.fail(format!("{name}: new waiter not woken by a release"));
    }
    match waiter.as_mut().poll(cx) {
        Poll::Ready(Ok(a)) => drop(a),
        other => log.fail(format!(
            "{name}: new waiter not served after a release: {other:?}"
        )),
    }
    drop(waiter);
    drop(waker);
    let _ = woken;
}

fn run_case(case: &Case) -> Vec<String> {
    let mut log = Log {
        case: format!(
            "{:?}/{:?}/{:?}/{:?}/{:?}",
            case.form, case.place, case.reclaim, case.behavior, case.trigger
        ),
        failures: Vec::new(),
    };
    // Pools.
    let (root, child): (Arc<BufPool>, Option<Arc<BufPool>>) = match case.place {
        Where::Root => (Arc::new(BufPool::new(cfg(4))), None),
        Where::Child => {
            let root = Arc::new(BufPool::new(cfg(4)));
            let child = Arc::new(root.child("child", cfg(6)).unwrap());
            (root, Some(child))
        }
        Where::Floored => {
            let root = Arc::new(BufPool::new(cfg(6)));
            let child = Arc::new(
                BufPool::builder(cfg(4))
                    .name("floored")
                    .parent(&root)
                    .min_memory(2 * BS)
                    .build()
                    .unwrap(),
            );
            (root, Some(child))
        }
    };
    let original_root = root.stats().max_memory;
    let original_child = child.as_ref().map(|c| c.stats().max_memory);
    let pool_handle: Arc<BufPool> = Arc::clone(child.as_ref().unwrap_or(&root));
    let pool = &pool_handle;
    let floor = if case.place == Where::Floored {
        2 * BS
    } else {
        0
    };

    // The cache (in the request's pool).
    let cache_buffers = match case.reclaim {
        Reclaim::None => 0,
        Reclaim::Partial => 1,
        Reclaim::Full => 2,
    };
    let cache = Arc::new(Cache {
        entries: Mutex::new(
            (0..cache_buffers)
                .map(|_| pool.try_allocate(1).unwrap())
                .collect(),
        ),
        reported: AtomicUsize::new(0),
    });
    let registration: Option<ReclaimerHandle> = (cache_buffers > 0)
        .then(|| pool.register_reclaimer("cache", 0, Arc::clone(&cache) as Arc<dyn Reclaimer>));

    // The hostile waker, with what it owns.
    let ctl = new_ctl(case.behavior, pool);
    if matches!(
        case.behavior,
        Behavior::WakeDropsOwned | Behavior::OwnsAllocation
    ) {
        ctl.owned
            .lock()
            .unwrap()
            .push(pool.try_allocate(1).unwrap());
    }
    // Fill the floor, then the root.
    let mut holders = Vec::new();
    if case.place == Where::Floored {
        let used = pool.stats().in_use_bytes / BS;
        if used < 2 {
            holders.push(pool.try_allocate(2 - used).unwrap());
        }
    }
    let free = root.stats().available_bytes() / BS;
    if free > 0 {
        holders.push(root.try_allocate(free).unwrap());
    }
    let waker = make_waker(&ctl);

    let mut req = Some(request(pool, case.form));
    let mut result: Option<Result<Held, AllocError>> = None;

    // First poll: the request waits (or reclaim serves it).
    let first = log.step("first poll", || req.as_mut().unwrap().poll(&waker));
    if let Some(Poll::Ready(r)) = first {
        result = Some(r);
    }
    // A driver of a reclaim round yields once: poll again, as its executor would.
    if result.is_none() && ctl.woken.load(SeqCst) > 0 {
        if let Some(Poll::Ready(r)) = log.step("second poll", || req.as_mut().unwrap().poll(&waker))
        {
            result = Some(r);
        }
    }

    // A waker that owns an allocation is held by the pool alone from here: the pool's drop
    // of its last clone (a wake, a cancel, a re-poll with another waker) gives it back.
    let mut waker = Some(waker);
    if case.behavior == Behavior::OwnsAllocation {
        drop(waker.take());
    }

    // The setup does what it should: without reclaim the request waits; with a cache that
    // covers it, a calm driver is served by reclaim alone.
    if case.behavior == Behavior::Calm {
        let served = matches!(result, Some(Ok(_)));
        let want = case.reclaim == Reclaim::Full;
        if served != want {
            log.fail(format!(
                "setup: served before the trigger = {served}, want {want} (root {})",
                root.stats()
            ));
        }
        let rounds =
            root.stats().reclaim_rounds + child.as_ref().map_or(0, |c| c.stats().reclaim_rounds);
        if (rounds > 0) != (case.reclaim != Reclaim::None) {
            log.fail(format!("setup: {rounds} reclaim rounds"));
        }
    }

    // The trigger.
    let calm_ctl = new_ctl(Behavior::Calm, pool);
    let calm = make_waker(&calm_ctl);
    match case.trigger {
        Trigger::Release => {
            log.step("release", || holders.clear());
        }
        Trigger::Close => {
            log.step("close", || pool.close());
        }
        Trigger::Shrink => {
            log.step("shrink", || {
                let _ = pool.set_max_memory(BS);
            });
        }
        Trigger::Cancel => {
            log.step("cancel", || drop(req.take()));
        }
        Trigger::Repoll => {
            if result.is_none() {
                if let Some(Poll::Ready(r)) =
                    log.step("re-poll", || req.as_mut().unwrap().poll(&calm))
                {
                    result = Some(r);
                }
            }
            log.step("release after re-poll", || holders.clear());
        }
    }
    let closed = pool.is_closed();

    // Settle: every holder back, then the request (if still there) must finish with the
    // calm waker: served, or failed for a reason the case explains.
    log.step("release holders", || holders.clear());
    if result.is_none() && req.is_some() {
        for _ in 0..4 {
            match log.step("final poll", || req.as_mut().unwrap().poll(&calm)) {
                Some(Poll::Ready(r)) => {
                    result = Some(r);
                    break;
                }
                Some(Poll::Pending) => {}
                None => {}
            }
        }
        if result.is_none() {
            log.fail(format!(
                "request still pending after everything was released (root {}, pool {})",
                root.stats(),
                pool.stats()
            ));
        }
    }
    // Which outcomes the case allows.
    if let Some(r) = &result {
        let shrunk = case.trigger == Trigger::Shrink || case.behavior == Behavior::WakeShrinks;
        let ok = match r {
            Ok(_) => true,
            Err(AllocError::Closed) => closed || pool.is_closed(),
            Err(AllocError::ExceedsBudget { .. }) => shrunk,
            Err(_) => false,
        };
        // Served, it must have been served at a moment it fit: nothing else to check here.
        if !ok {
            log.fail(format!("unexpected outcome {r:?}"));
        }
        if case.trigger == Trigger::Close
            && r.is_ok()
            && case.reclaim == Reclaim::None
            && case.behavior != Behavior::WakeDropsOwned
            && case.behavior != Behavior::WakeShrinks
        {
            // Nothing was freed before the close: the request cannot have been served.
            log.fail(format!(
                "served {r:?} although nothing was freed before close"
            ));
        }
    }

    // Quiescence: drop everything (disarmed first).
    ctl.armed.store(false, SeqCst);
    log.step("drop result", || drop(result.take()));
    log.step("drop request", || drop(req.take()));
    disarm(&ctl);
    disarm(&calm_ctl);
    drop(waker);
    drop(calm);
    log.step("drop registration", || drop(registration));
    let cache_left = std::mem::take(&mut *cache.entries.lock().unwrap());
    drop(cache_left);
    let _ = cache.reported.load(SeqCst);
    drop(cache);
    for (name, c) in [("hostile", &ctl), ("calm", &calm_ctl)] {
        let live = c.live.load(SeqCst);
        if live != 0 {
            log.fail(format!(
                "{name} waker: {live} clone(s) still alive at quiescence"
            ));
        }
        if c.dropped_unwinding.load(SeqCst) != 0 {
            log.fail(format!("{name} waker dropped while unwinding"));
        }
    }
    if case.behavior != Behavior::PanicClone
        && case.trigger == Trigger::Release
        && ctl.woken.load(SeqCst) == 0
        && case.reclaim != Reclaim::Full
    {
        log.fail("the hostile waker was never woken although its request was served");
    }

    // Restore budgets, then check the books at every level.
    if !root.is_closed() {
        let _ = root.set_max_memory(original_root);
    }
    if let (Some(c), Some(max)) = (&child, original_child) {
        if !c.is_closed() {
            let _ = c.set_max_memory(max);
        }
    }
    let child_open = child.as_ref().is_some_and(|c| !c.is_closed());
    let held_floor = if child_open { floor } else { 0 };
    books(&mut log, "root", &root, held_floor);
    let root_all = (root.stats().max_memory - held_floor) / BS;
    if let Some(c) = &child {
        books(&mut log, "child", c, 0);
        if !c.is_closed() {
            let all = (c.stats().max_memory / BS).min(root_all + floor / BS);
            serves(&mut log, "child", c, all);
        }
    }
    serves(&mut log, "root", &root, root_all);
    // The drain resolves at once for a closed, empty pool.
    for (name, p) in [("child", child.as_deref()), ("root", Some(&*root))] {
        if let Some(p) = p {
            if p.is_closed() {
                let mut d = Box::pin(p.drained());
                if d.as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()))
                    .is_pending()
                {
                    log.fail(format!("{name}: drained() pending on an empty closed pool"));
                }
            }
        }
    }
    // Prompt drops (the test's watchdog catches a hang).
    drop(req);
    drop(pool_handle);
    drop(child);
    if Arc::strong_count(&root) != 1 {
        log.fail(format!(
            "root: {} handles left at the end",
            Arc::strong_count(&root)
        ));
    } else {
        drop(root);
    }
    log.failures
}

fn run_matrix(forms: &[Form], places: &[Where]) {
    quiet();
    let mut failures = Vec::new();
    let mut index = 0usize;
    let mut ran = 0usize;
    for &form in forms {
        for &place in places {
            for reclaim in [Reclaim::None, Reclaim::Partial, Reclaim::Full] {
                for behavior in BEHAVIORS {
                    for trigger in TRIGGERS {
                        index += 1;
                        if cfg!(miri) && index % 53 != 0 {
                            continue;
                        }
                        ran += 1;
                        failures.extend(run_case(&Case {
                            form,
                            place,
                            reclaim,
                            behavior,
                            trigger,
                        }));
                    }
                }
            }
        }
    }
    assert!(ran > 0);
    for f in failures.iter().take(60) {
        eprintln!("FAILURE {f}");
    }
    assert!(
        failures.is_empty(),
        "{} failure(s) in {ran} cases:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn matrix_root() {
    watchdog(60, || run_matrix(&FORMS, &[Where::Root]));
}

#[test]
fn matrix_child() {
    watchdog(60, || run_matrix(&FORMS, &[Where::Child]));
}

#[test]
fn matrix_floored_child() {
    watchdog(60, || run_matrix(&FORMS, &[Where::Floored]));
}

// ---------------------------------------------------------------------------------------------
// The futures that only listen (`drained`, `shutdown_before`), `reclaim_ahead` and a
// reservation's `grow`, polled with the same hostile wakers
// ---------------------------------------------------------------------------------------------

fn calm_waker() -> (Arc<Ctl>, Waker) {
    let ctl = Arc::new(Ctl {
        behavior: Behavior::Calm,
        armed: AtomicBool::new(false),
        woken: AtomicUsize::new(0),
        live: AtomicUsize::new(0),
        dropped_unwinding: AtomicUsize::new(0),
        pool: Mutex::new(None),
        owned: Mutex::new(Vec::new()),
        owned_request: Mutex::new(None),
    });
    let waker = make_waker(&ctl);
    (ctl, waker)
}

fn no_leaks(log: &mut Log, ctls: &[&Arc<Ctl>]) {
    for c in ctls {
        let live = c.live.load(SeqCst);
        if live != 0 {
            log.fail(format!("a waker has {live} clone(s) alive at quiescence"));
        }
        if c.dropped_unwinding.load(SeqCst) != 0 {
            log.fail("a waker was dropped while unwinding");
        }
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum ListenerTrigger {
    /// The allocations go back one by one.
    Release,
    /// Re-polled with a calm waker, then the allocations go back.
    Repoll,
    /// The future is dropped, then the allocations go back.
    Cancel,
    /// The pool is closed, then the allocations go back.
    Close,
}

const LISTENER_TRIGGERS: [ListenerTrigger; 4] = [
    ListenerTrigger::Release,
    ListenerTrigger::Repoll,
    ListenerTrigger::Cancel,
    ListenerTrigger::Close,
];

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Listening {
    Drained,
    ShutdownBefore,
}

fn listener_case(kind: Listening, behavior: Behavior, trigger: ListenerTrigger) -> Vec<String> {
    let mut log = Log {
        case: format!("{kind:?}/{behavior:?}/{trigger:?}"),
        failures: Vec::new(),
    };
    let pool = Arc::new(BufPool::new(cfg(4)));
    let ctl = new_ctl(behavior, &pool);
    let mut held = vec![pool.try_allocate(1).unwrap(), pool.try_allocate(1).unwrap()];
    if matches!(
        behavior,
        Behavior::WakeDropsOwned | Behavior::OwnsAllocation
    ) {
        // The waker owns an allocation of the very pool it waits to drain: the drain
        // completes once the waker is dropped (the future dropped, or re-polled with
        // another waker) and gives it back, from inside the listener's drop.
        ctl.owned
            .lock()
            .unwrap()
            .push(pool.try_allocate(1).unwrap());
    }
    let mut waker = Some(make_waker(&ctl));
    let (calm_ctl, calm) = calm_waker();
    let cx_calm = &mut Context::from_waker(&calm);
    let mut ready = false;
    {
        let mut future: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = Some(match kind {
            Listening::Drained => Box::pin(pool.drained()),
            Listening::ShutdownBefore => {
                Box::pin(async { drop(pool.shutdown_before(std::future::pending::<()>()).await) })
            }
        });
        // `shutdown_before` is an `async fn`: once a poll unwound (a waker's `clone` or
        // `drop` panicking in it), polling it again panics by the language's rules. Its
        // steps (the close, the registrations) were done before; nothing is lost.
        let mut poisoned = false;
        match log.step("first poll", || {
            let cx = &mut Context::from_waker(waker.as_ref().unwrap());
            future.as_mut().unwrap().as_mut().poll(cx)
        }) {
            Some(Poll::Ready(())) => log.fail("resolved with allocations out"),
            Some(Poll::Pending) => {}
            None => poisoned = kind == Listening::ShutdownBefore,
        }
        // A waker owning an allocation is the listener's alone from here.
        if matches!(
            behavior,
            Behavior::WakeDropsOwned | Behavior::OwnsAllocation
        ) {
            drop(waker.take());
        }
        match trigger {
            ListenerTrigger::Release => {}
            ListenerTrigger::Repoll if poisoned => {}
            ListenerTrigger::Repoll => {
                if log
                    .step("re-poll", || {
                        future.as_mut().unwrap().as_mut().poll(cx_calm)
                    })
                    .is_none()
                {
                    poisoned = kind == Listening::ShutdownBefore;
                }
            }
            ListenerTrigger::Cancel => {
                log.step("cancel", || drop(future.take()));
            }
            ListenerTrigger::Close => {
                log.step("close", || pool.close());
            }
        }
        while let Some(a) = held.pop() {
            log.step("release", || drop(a));
        }
        // A waker that took an allocation back in `wake` holds the drain up: give it back.
        ctl.armed.store(false, SeqCst);
        disarm(&ctl);
        if poisoned {
            ready = true;
        } else if let Some(f) = future.as_mut() {
            // The future's step at the unwinding poll above may have dropped it (an async
            // block); a resolved one must not be polled again.
            for _ in 0..3 {
                match log.step("final poll", || f.as_mut().poll(cx_calm)) {
                    Some(Poll::Ready(())) => {
                        ready = true;
                        break;
                    }
                    Some(Poll::Pending) => {}
                    None => break,
                }
            }
        } else {
            ready = true;
        }
        log.step("drop future", || drop(future));
    }
    if !ready && kind == Listening::Drained {
        log.fail(format!(
            "drained() pending on an empty pool: {}",
            pool.stats()
        ));
    }
    drop(waker);
    drop(calm);
    disarm(&calm_ctl);
    no_leaks(&mut log, &[&ctl, &calm_ctl]);
    if !pool.is_closed() {
        let _ = pool.set_max_memory(4 * BS);
    }
    books(&mut log, "pool", &pool, 0);
    serves(&mut log, "pool", &pool, 4);
    if Arc::strong_count(&pool) != 1 {
        log.fail("pool handles left");
    }
    drop(pool);
    log.failures
}

#[test]
fn listeners_with_hostile_wakers() {
    watchdog(30, || {
        quiet();
        let mut failures = Vec::new();
        let mut index = 0;
        for kind in [Listening::Drained, Listening::ShutdownBefore] {
            for behavior in BEHAVIORS {
                for trigger in LISTENER_TRIGGERS {
                    index += 1;
                    if cfg!(miri) && index % 11 != 0 {
                        continue;
                    }
                    failures.extend(listener_case(kind, behavior, trigger));
                }
            }
        }
        for f in &failures {
            eprintln!("FAILURE {f}");
        }
        assert!(failures.is_empty(), "{} failure(s)", failures.len());
    });
}

fn ahead_case(behavior: Behavior, trigger: Trigger) -> Vec<String> {
    let mut log = Log {
        case: format!("reclaim_ahead/{behavior:?}/{trigger:?}"),
        failures: Vec::new(),
    };
    let pool = Arc::new(BufPool::new(cfg(6)));
    let cache = Arc::new(Cache {
        entries: Mutex::new((0..2).map(|_| pool.try_allocate(1).unwrap()).collect()),
        reported: AtomicUsize::new(0),
    });
    let registration =
        pool.register_reclaimer("cache", 0, Arc::clone(&cache) as Arc<dyn Reclaimer>);
    let ctl = new_ctl(behavior, &pool);
    if matches!(
        behavior,
        Behavior::WakeDropsOwned | Behavior::OwnsAllocation
    ) {
        ctl.owned
            .lock()
            .unwrap()
            .push(pool.try_allocate(1).unwrap());
    }
    let free = pool.stats().available_bytes() / BS;
    let mut holders = vec![pool.try_allocate(free).unwrap()];
    let mut waker = Some(make_waker(&ctl));
    let (calm_ctl, calm) = calm_waker();
    let mut ahead = Some(Box::pin(pool.reclaim_ahead(2 * BS)));
    // First polls with the hostile waker: the round starts, its future wakes the waker.
    for _ in 0..2 {
        let _ = log.step("poll", || {
            let cx = &mut Context::from_waker(waker.as_ref().unwrap());
            ahead.as_mut().unwrap().as_mut().poll(cx)
        });
    }
    if matches!(
        behavior,
        Behavior::WakeDropsOwned | Behavior::OwnsAllocation
    ) {
        drop(waker.take());
    }
    let cx_calm = &mut Context::from_waker(&calm);
    match trigger {
        Trigger::Release => {
            log.step("release", || holders.clear());
        }
        Trigger::Close => {
            log.step("close", || pool.close());
        }
        Trigger::Shrink => {
            log.step("shrink", || {
                let _ = pool.set_max_memory(2 * BS);
            });
        }
        Trigger::Cancel => {
            log.step("cancel", || drop(ahead.take()));
        }
        Trigger::Repoll => {
            let _ = log.step("re-poll", || ahead.as_mut().unwrap().as_mut().poll(cx_calm));
        }
    }
    for _ in 0..3 {
        if let Some(a) = ahead.as_mut() {
            let _ = log.step("poll", || a.as_mut().poll(cx_calm));
        }
    }
    log.step("release", || holders.clear());
    // Closing ends it, even with a round of its own.
    log.step("close", || pool.close());
    if let Some(a) = ahead.as_mut() {
        match log.step("poll after close", || a.as_mut().poll(cx_calm)) {
            Some(Poll::Ready(())) => {}
            Some(Poll::Pending) => log.fail("reclaim_ahead pending after close"),
            None => {}
        }
    }
    log.step("drop ahead", || drop(ahead.take()));
    ctl.armed.store(false, SeqCst);
    disarm(&ctl);
    disarm(&calm_ctl);
    drop(waker);
    drop(calm);
    log.step("drop registration", || drop(registration));
    drop(std::mem::take(&mut *cache.entries.lock().unwrap()));
    no_leaks(&mut log, &[&ctl, &calm_ctl]);
    books(&mut log, "pool", &pool, 0);
    let mut d = Box::pin(pool.drained());
    if d.as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
    {
        log.fail("drained() pending on an empty closed pool");
    }
    drop(d);
    if Arc::strong_count(&pool) != 1 {
        log.fail("pool handles left");
    }
    drop(pool);
    log.failures
}

fn grow_case(behavior: Behavior, trigger: Trigger) -> Vec<String> {
    let mut log = Log {
        case: format!("grow/{behavior:?}/{trigger:?}"),
        failures: Vec::new(),
    };
    let pool = Arc::new(BufPool::new(cfg(4)));
    let ctl = new_ctl(behavior, &pool);
    if matches!(
        behavior,
        Behavior::WakeDropsOwned | Behavior::OwnsAllocation
    ) {
        ctl.owned
            .lock()
            .unwrap()
            .push(pool.try_allocate(1).unwrap());
    }
    let mut reservation = pool.try_reserve(BS).unwrap();
    let free = pool.stats().available_bytes() / BS;
    let mut holders = vec![pool.try_allocate(free).unwrap()];
    let mut waker = Some(make_waker(&ctl));
    let (calm_ctl, calm) = calm_waker();
    let cx_calm = &mut Context::from_waker(&calm);
    let mut result: Option<Result<(), AllocError>> = None;
    {
        let mut grow = Some(Box::pin(reservation.grow(2 * BS)));
        if let Some(Poll::Ready(r)) = log.step("first poll", || {
            let cx = &mut Context::from_waker(waker.as_ref().unwrap());
            grow.as_mut().unwrap().as_mut().poll(cx)
        }) {
            result = Some(r);
            log.fail("grow served on a full pool");
        }
        if behavior == Behavior::OwnsAllocation {
            drop(waker.take());
        }
        match trigger {
            Trigger::Release => {
                log.step("release", || holders.clear());
            }
            Trigger::Close => {
                log.step("close", || pool.close());
            }
            Trigger::Shrink => {
                log.step("shrink", || {
                    let _ = pool.set_max_memory(2 * BS);
                });
            }
            Trigger::Cancel => {
                log.step("cancel", || drop(grow.take()));
            }
            Trigger::Repoll => {
                if let Some(Poll::Ready(r)) =
                    log.step("re-poll", || grow.as_mut().unwrap().as_mut().poll(cx_calm))
                {
                    result = Some(r);
                }
            }
        }
        log.step("release", || holders.clear());
        if result.is_none() {
            if let Some(g) = grow.as_mut() {
                for _ in 0..3 {
                    if let Some(Poll::Ready(r)) =
                        log.step("final poll", || g.as_mut().poll(cx_calm))
                    {
                        result = Some(r);
                        break;
                    }
                }
                if result.is_none() {
                    log.fail(format!("grow pending after the release: {}", pool.stats()));
                }
            }
        }
        log.step("drop grow", || drop(grow));
    }
    let closed = pool.is_closed();
    let shrunk = trigger == Trigger::Shrink || behavior == Behavior::WakeShrinks;
    match &result {
        None | Some(Ok(())) => {}
        Some(Err(AllocError::Closed)) if closed => {}
        Some(Err(AllocError::ExceedsBudget { .. })) if shrunk => {}
        Some(Err(e)) => log.fail(format!("unexpected grow outcome {e:?}")),
    }
    let want = match result {
        Some(Ok(())) => 3 * BS,
        _ => BS,
    };
    if reservation.size() != want {
        log.fail(format!(
            "reservation of {} bytes after {result:?}, want {want}",
            reservation.size()
        ));
    }
    if pool.stats().reserved_bytes != reservation.size() {
        log.fail(format!(
            "pool counts {} reserved, the reservation holds {}",
            pool.stats().reserved_bytes,
            reservation.size()
        ));
    }
    log.step("drop reservation", || drop(reservation));
    ctl.armed.store(false, SeqCst);
    disarm(&ctl);
    disarm(&calm_ctl);
    drop(waker);
    drop(calm);
    no_leaks(&mut log, &[&ctl, &calm_ctl]);
    if !pool.is_closed() {
        let _ = pool.set_max_memory(4 * BS);
    }
    books(&mut log, "pool", &pool, 0);
    serves(&mut log, "pool", &pool, 4);
    if Arc::strong_count(&pool) != 1 {
        log.fail("pool handles left");
    }
    drop(pool);
    log.failures
}

#[test]
fn reclaim_ahead_and_grow_with_hostile_wakers() {
    watchdog(30, || {
        quiet();
        let mut failures = Vec::new();
        let mut index = 0;
        for behavior in BEHAVIORS {
            for trigger in TRIGGERS {
                index += 1;
                if cfg!(miri) && index % 7 != 0 {
                    continue;
                }
                failures.extend(ahead_case(behavior, trigger));
                failures.extend(grow_case(behavior, trigger));
            }
        }
        for f in &failures {
            eprintln!("FAILURE {f}");
        }
        assert!(failures.is_empty(), "{} failure(s)", failures.len());
    });
}
