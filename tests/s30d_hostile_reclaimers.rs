//! Hostile reclaimers against every driver of a round (session 30, helper s30d).
//!
//! A hostile reclaimer (priority 0) beside an honest cache (priority 1), both holding
//! buffers of a full pool, is asked by every kind of driver: an async `allocate` polled by
//! hand, `PollAllocate`, `allocate_blocking`, `allocate_timeout`, `reserve_timeout`,
//! `grow_blocking`, a child's request short at the root, and `reclaim_ahead`. The reclaimer
//! panics (in `estimate`, `reclaim`, its future's `poll` or drop), re-enters the pool from
//! `reclaim` (allocates, waits with a deadline, grows or shrinks the budget, registers
//! another reclaimer and drops its own registration, closes the pool), blocks briefly,
//! over-reports, frees more than asked, or never completes.
//!
//! After each case: only the injected panics escaped, the driver ended (served or failed for
//! a reason the case explains), the books are exact at every level (stats and report), the
//! pool-level reclaim statistics agree with the per-reclaimer report, the pool serves new
//! requests, and it drops promptly.

mod common;

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Once, Weak};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::Duration;

use common::watchdog;
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate, Reclaimer,
    ReclaimerHandle,
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

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Behavior {
    Honest,
    PanicEstimate,
    PanicReclaim,
    /// Frees what it was asked for, then panics in its future's poll.
    PanicPoll,
    /// Its finished future panics when dropped.
    PanicFutureDrop,
    /// `reclaim` takes a buffer with `try_allocate` and keeps it, freeing nothing.
    AllocatesInReclaim,
    /// `reclaim` waits for a buffer with `allocate_timeout(1, 5 ms)` and keeps it.
    WaitsInReclaim,
    /// `reclaim` adds two buffers of budget (serving the driver), frees nothing.
    GrowsInReclaim,
    /// `reclaim` shrinks the budget to one buffer, frees nothing.
    // BUG: with `Driver::Ahead` this hung: every round's own resize was news to
    // `reclaim_ahead`, which started the next round inside the same poll, forever (see
    // tests/s30d_reclaim_storms.rs; fixed in src/reclaim.rs).
    ShrinksInReclaim,
    /// `reclaim` registers another (honest, empty) reclaimer and drops its own registration.
    RegistersInReclaim,
    /// `reclaim` closes the pool.
    ClosesInReclaim,
    /// Sleeps 2 ms in `estimate`, `reclaim` and `poll`, then frees honestly.
    Blocks,
    /// Frees one buffer, reports `usize::MAX`.
    OverReports,
    /// Frees everything it holds, whatever it was asked.
    FreesMore,
    /// Its future never completes (and frees nothing).
    NeverCompletes,
}

const BEHAVIORS: [Behavior; 15] = [
    Behavior::Honest,
    Behavior::PanicEstimate,
    Behavior::PanicReclaim,
    Behavior::PanicPoll,
    Behavior::PanicFutureDrop,
    Behavior::AllocatesInReclaim,
    Behavior::WaitsInReclaim,
    Behavior::GrowsInReclaim,
    Behavior::ShrinksInReclaim,
    Behavior::RegistersInReclaim,
    Behavior::ClosesInReclaim,
    Behavior::Blocks,
    Behavior::OverReports,
    Behavior::FreesMore,
    Behavior::NeverCompletes,
];

struct Hostile {
    behavior: Behavior,
    entries: Mutex<Vec<BufPoolAllocation>>,
    /// The pool it holds memory of (weak: a reclaimer must not own its pool).
    pool: Weak<BufPool>,
    own: Mutex<Option<ReclaimerHandle>>,
    registered: Mutex<Vec<ReclaimerHandle>>,
    kept: Mutex<Vec<BufPoolAllocation>>,
}

struct Empty;
impl Reclaimer for Empty {
    fn estimate(&self) -> usize {
        0
    }
    fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        Box::pin(async { 0 })
    }
}

impl Hostile {
    fn take(&self, target: usize) -> Vec<BufPoolAllocation> {
        let mut entries = self.entries.lock().unwrap();
        let mut taken = Vec::new();
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
        taken
    }
}

impl Reclaimer for Hostile {
    fn estimate(&self) -> usize {
        match self.behavior {
            Behavior::PanicEstimate => panic!("{INJECTED} (estimate)"),
            Behavior::Blocks => thread::sleep(Duration::from_millis(2)),
            _ => {}
        }
        self.entries.lock().unwrap().len() * BS
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let pool = self.pool.upgrade();
        let mut report: Option<usize> = None;
        let taken = match self.behavior {
            Behavior::PanicReclaim => panic!("{INJECTED} (reclaim)"),
            Behavior::AllocatesInReclaim => {
                if let Some(pool) = &pool {
                    if let Ok(a) = pool.try_allocate(1) {
                        self.kept.lock().unwrap().push(a);
                    }
                }
                Vec::new()
            }
            Behavior::WaitsInReclaim => {
                if let Some(pool) = &pool {
                    if let Ok(a) = pool.allocate_timeout(1, Duration::from_millis(5)) {
                        self.kept.lock().unwrap().push(a);
                    }
                }
                Vec::new()
            }
            Behavior::GrowsInReclaim => {
                if let Some(pool) = &pool {
                    pool.add_max_memory(2 * BS);
                }
                Vec::new()
            }
            Behavior::ShrinksInReclaim => {
                if let Some(pool) = &pool {
                    let _ = pool.set_max_memory(BS);
                }
                Vec::new()
            }
            Behavior::RegistersInReclaim => {
                if let Some(pool) = &pool {
                    let other = pool.register_reclaimer("other", 5, Arc::new(Empty));
                    self.registered.lock().unwrap().push(other);
                }
                let own = self.own.lock().unwrap().take();
                drop(own);
                self.take(target)
            }
            Behavior::ClosesInReclaim => {
                if let Some(pool) = &pool {
                    pool.close();
                }
                Vec::new()
            }
            Behavior::Blocks => {
                thread::sleep(Duration::from_millis(2));
                self.take(target)
            }
            Behavior::OverReports => {
                report = Some(usize::MAX);
                self.take(1)
            }
            Behavior::FreesMore => std::mem::take(&mut *self.entries.lock().unwrap()),
            Behavior::NeverCompletes => return Box::pin(std::future::pending()),
            Behavior::Honest
            | Behavior::PanicEstimate
            | Behavior::PanicPoll
            | Behavior::PanicFutureDrop => self.take(target),
        };
        drop(pool);
        Box::pin(Freeing {
            behavior: self.behavior,
            yielded: false,
            taken,
            report,
            done: false,
        })
    }
}

/// Yields once (waking its driver), then frees what it took.
struct Freeing {
    behavior: Behavior,
    yielded: bool,
    taken: Vec<BufPoolAllocation>,
    report: Option<usize>,
    done: bool,
}

impl Future for Freeing {
    type Output = usize;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
        if self.behavior == Behavior::Blocks {
            thread::sleep(Duration::from_millis(2));
        }
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let freed: usize = self.taken.iter().map(|a| a.allocated_bytes()).sum();
        self.taken.clear();
        if self.behavior == Behavior::PanicPoll {
            panic!("{INJECTED} (poll)");
        }
        self.done = true;
        Poll::Ready(self.report.unwrap_or(freed))
    }
}

impl Drop for Freeing {
    fn drop(&mut self) {
        if self.behavior == Behavior::PanicFutureDrop && self.done && !thread::panicking() {
            panic!("{INJECTED} (future drop)");
        }
    }
}

/// The honest cache at priority 1.
struct Cache(Mutex<Vec<BufPoolAllocation>>);
impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        self.0.lock().unwrap().len() * BS
    }
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let mut entries = self.0.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            match entries.pop() {
                Some(a) => freed += a.allocated_bytes(),
                None => break,
            }
        }
        Box::pin(async move { freed })
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Driver {
    Async,
    Poller,
    Blocking,
    Timeout,
    ReserveTimeout,
    GrowBlocking,
    ChildAsync,
    ChildBlocking,
    Ahead,
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

/// How the driver ended.
#[derive(Debug)]
enum Ended {
    Served,
    Failed(AllocError),
    /// A reclaimer's panic came out of the driver's call.
    Panicked,
}

const ROOT: usize = 8;
const N: usize = 2;

fn poll_by_hand<T>(
    log: &mut Log,
    mut poll: impl FnMut(&mut Context<'_>) -> Poll<Result<T, AllocError>>,
    holder: &mut Option<BufPoolAllocation>,
) -> Ended {
    let cx = &mut Context::from_waker(Waker::noop());
    for i in 0..8 {
        if i == 4 {
            // Release the test's own holder: the driver must be served now.
            log.step("release holder", || drop(holder.take()));
        }
        match catch_unwind(AssertUnwindSafe(|| poll(cx))) {
            Ok(Poll::Ready(Ok(_))) => return Ended::Served,
            Ok(Poll::Ready(Err(e))) => return Ended::Failed(e),
            Ok(Poll::Pending) => {}
            Err(payload) => {
                let msg = message(&*payload);
                if !msg.contains(INJECTED) {
                    log.fail(format!("poll: unexpected panic: {msg}"));
                }
                // The request stays a valid waiter: poll on.
            }
        }
    }
    log.fail("driver still pending after its holder was released");
    Ended::Failed(AllocError::WouldBlock)
}

fn run_case(driver: Driver, behavior: Behavior) -> Vec<String> {
    let mut log = Log {
        case: format!("{driver:?}/{behavior:?}"),
        failures: Vec::new(),
    };
    let root = Arc::new(BufPool::new(cfg(ROOT)));
    let child = matches!(driver, Driver::ChildAsync | Driver::ChildBlocking)
        .then(|| Arc::new(root.child("child", cfg(ROOT)).unwrap()));
    // The reclaimers hold memory of the pool whose round asks them: the child's for a child
    // driver (a round at the root asks its descendants), the root's otherwise.
    let holder_pool = child.as_ref().unwrap_or(&root);
    let hostile = Arc::new(Hostile {
        behavior,
        entries: Mutex::new(
            (0..3)
                .map(|_| holder_pool.try_allocate(1).unwrap())
                .collect(),
        ),
        pool: Arc::downgrade(holder_pool),
        own: Mutex::new(None),
        registered: Mutex::new(Vec::new()),
        kept: Mutex::new(Vec::new()),
    });
    let cache = Arc::new(Cache(Mutex::new(
        (0..3)
            .map(|_| holder_pool.try_allocate(1).unwrap())
            .collect(),
    )));
    let own =
        holder_pool.register_reclaimer("hostile", 0, Arc::clone(&hostile) as Arc<dyn Reclaimer>);
    *hostile.own.lock().unwrap() = Some(own);
    let cache_handle =
        holder_pool.register_reclaimer("cache", 1, Arc::clone(&cache) as Arc<dyn Reclaimer>);
    // The test's own holder fills the root.
    let free = root.stats().available_bytes() / BS;
    let mut holder = Some(root.try_allocate(free).unwrap());
    assert_eq!(root.stats().available_bytes(), 0);

    let blocking_release = |holder: &mut Option<BufPoolAllocation>| {
        let h = holder.take();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            drop(h);
        })
    };

    let ended = match driver {
        Driver::Async => {
            let mut f = Box::pin(root.allocate(N));
            poll_by_hand(&mut log, |cx| f.as_mut().poll(cx), &mut holder)
        }
        Driver::ChildAsync => {
            let c = child.as_ref().unwrap();
            let mut f = Box::pin(c.allocate(N));
            poll_by_hand(&mut log, |cx| f.as_mut().poll(cx), &mut holder)
        }
        Driver::Poller => {
            let mut p = PollAllocate::new(Arc::clone(&root));
            poll_by_hand(&mut log, |cx| p.poll_allocate(cx, N), &mut holder)
        }
        Driver::Blocking | Driver::ChildBlocking | Driver::GrowBlocking => {
            let releaser = blocking_release(&mut holder);
            let pool = child.as_ref().unwrap_or(&root);
            let out = match driver {
                Driver::GrowBlocking => catch_unwind(AssertUnwindSafe(|| {
                    let mut r = pool.try_reserve(0)?;
                    r.grow_blocking(N * BS)?;
                    Ok::<_, AllocError>(())
                })),
                _ => catch_unwind(AssertUnwindSafe(|| pool.allocate_blocking(N).map(drop))),
            };
            releaser.join().unwrap();
            match out {
                Ok(Ok(())) => Ended::Served,
                Ok(Err(e)) => Ended::Failed(e),
                Err(payload) => {
                    let msg = message(&*payload);
                    if !msg.contains(INJECTED) {
                        log.fail(format!("blocking: unexpected panic: {msg}"));
                    }
                    Ended::Panicked
                }
            }
        }
        Driver::Timeout | Driver::ReserveTimeout => {
            let releaser = blocking_release(&mut holder);
            let out = catch_unwind(AssertUnwindSafe(|| match driver {
                Driver::Timeout => root.allocate_timeout(N, Duration::from_secs(3)).map(drop),
                _ => root
                    .reserve_timeout(N * BS, Duration::from_secs(3))
                    .map(drop),
            }));
            releaser.join().unwrap();
            match out {
                Ok(Ok(())) => Ended::Served,
                Ok(Err(e)) => Ended::Failed(e),
                Err(payload) => {
                    let msg = message(&*payload);
                    if !msg.contains(INJECTED) {
                        log.fail(format!("timeout: unexpected panic: {msg}"));
                    }
                    Ended::Panicked
                }
            }
        }
        Driver::Ahead => {
            // Keep N buffers free: a refused try_allocate wakes it.
            let mut ahead = Box::pin(root.reclaim_ahead(N * BS));
            let cx = &mut Context::from_waker(Waker::noop());
            let _ = log.step("arm", || ahead.as_mut().poll(cx));
            // The arming poll may have run a round already (the room was below the mark):
            // then this is served; otherwise its refusal wakes the future.
            drop(root.try_allocate(N));
            let mut served = false;
            for _ in 0..6 {
                let _ = log.step("ahead poll", || ahead.as_mut().poll(cx));
                if root.stats().available_bytes() >= N * BS {
                    served = true;
                    break;
                }
            }
            drop(holder.take());
            let _ = log.step("ahead poll after release", || ahead.as_mut().poll(cx));
            let _ = log.step("drop ahead", || drop(ahead));
            if served {
                Ended::Served
            } else {
                Ended::Failed(AllocError::WouldBlock)
            }
        }
    };
    drop(holder);

    // Which endings the case allows.
    let ok = match &ended {
        Ended::Served => true,
        Ended::Failed(AllocError::Closed) => behavior == Behavior::ClosesInReclaim,
        Ended::Failed(AllocError::ExceedsBudget { .. }) => behavior == Behavior::ShrinksInReclaim,
        Ended::Failed(AllocError::WouldBlock) => driver == Driver::Ahead,
        Ended::Failed(_) => false,
        Ended::Panicked => matches!(
            behavior,
            Behavior::PanicEstimate
                | Behavior::PanicReclaim
                | Behavior::PanicPoll
                | Behavior::PanicFutureDrop
        ),
    };
    if !ok {
        log.fail(format!("unexpected ending {ended:?}"));
    }
    // Honest reclaim serves a waiting driver from the reclaimers alone, before the release.
    if behavior == Behavior::Honest && !matches!(ended, Ended::Served) {
        log.fail(format!("honest reclaim did not serve: {ended:?}"));
    }

    // Statistics agree with the per-reclaimer report (nobody unregistered yet, except the
    // reclaimer that drops its own registration).
    let round_pool = &root;
    let stats = round_pool.stats();
    let report = round_pool.report();
    let mut all = report.reclaimers.clone();
    for c in &report.children {
        all.extend(c.reclaimers.iter().cloned());
    }
    let reported = all
        .iter()
        .fold(0usize, |sum, r| sum.saturating_add(r.reclaimed_bytes));
    if std::env::var_os("S30D_LOUD").is_some() {
        eprintln!(
            "root {stats:?}\nchild {:?}\nreport {report:?}",
            child.as_ref().map(|c| c.stats())
        );
    }
    // Rounds run at the root and, for a request nested inside a reclaimer, at the child:
    // each pool counts its own rounds, each reclaimer what it reported in any round.
    let counted = stats
        .reclaimed_bytes
        .saturating_add(child.as_ref().map_or(0, |c| c.stats().reclaimed_bytes));
    if behavior != Behavior::RegistersInReclaim && counted != reported {
        log.fail(format!(
            "reclaimed_bytes {counted} (all pools) != sum of the reclaimers' reports {reported}: {report:?}"
        ));
    }
    if stats.reclaimed_bytes > 0 && stats.reclaim_rounds == 0 {
        log.fail("bytes reclaimed without a round");
    }

    // Quiescence.
    log.step("drop registrations", || {
        drop(hostile.own.lock().unwrap().take());
        drop(std::mem::take(&mut *hostile.registered.lock().unwrap()));
        drop(cache_handle);
    });
    drop(std::mem::take(&mut *hostile.entries.lock().unwrap()));
    drop(std::mem::take(&mut *hostile.kept.lock().unwrap()));
    drop(std::mem::take(&mut *cache.0.lock().unwrap()));
    if Arc::strong_count(&hostile) != 1 {
        log.fail(format!(
            "the hostile reclaimer is still referenced {} times after unregistering",
            Arc::strong_count(&hostile) - 1
        ));
    }
    let closed = root.is_closed() || child.as_ref().is_some_and(|c| c.is_closed());
    if !root.is_closed() {
        let _ = root.set_max_memory(ROOT * BS);
    }
    if let Some(c) = &child {
        if !c.is_closed() {
            let _ = c.set_max_memory(ROOT * BS);
        }
    }
    for (name, pool) in [("root", Some(&root)), ("child", child.as_ref())] {
        let Some(pool) = pool else { continue };
        let s = pool.stats();
        let got = (s.in_use_bytes, s.outstanding, s.waiting, s.reserved_bytes);
        if got != (0, 0, 0, 0) {
            log.fail(format!("{name}: books not exact {got:?}: {s}"));
        }
        let r = pool.report();
        if r.in_use_bytes != 0 || r.waiting != 0 || !r.reclaimers.is_empty() {
            log.fail(format!("{name}: report not idle: {r:?}"));
        }
        if !pool.is_closed() {
            match pool.try_allocate(ROOT) {
                Ok(a) => drop(a),
                Err(e) => log.fail(format!("{name}: full budget not back: {e}: {s}")),
            }
            // A waiter is queued and served by a release (the stall is over).
            let h = pool.try_allocate(ROOT).ok();
            let mut w = Box::pin(pool.allocate(1));
            let cx = &mut Context::from_waker(Waker::noop());
            if w.as_mut().poll(cx).is_ready() {
                log.fail(format!("{name}: served above the budget"));
            }
            drop(h);
            match w.as_mut().poll(cx) {
                Poll::Ready(Ok(a)) => drop(a),
                other => log.fail(format!(
                    "{name}: waiter not served after release: {other:?}"
                )),
            }
        }
    }
    let _ = closed;
    drop(child);
    if Arc::strong_count(&root) != 1 {
        log.fail("root handles left");
    }
    drop(root);
    log.failures
}

fn run(drivers: &[Driver]) {
    quiet();
    let mut failures = Vec::new();
    let mut index = 0;
    for &driver in drivers {
        for behavior in BEHAVIORS {
            index += 1;
            if cfg!(miri) && index % 7 != 0 {
                continue;
            }
            if std::env::var_os("S30D_LOUD").is_some() {
                eprintln!("case {driver:?}/{behavior:?}");
            }
            failures.extend(run_case(driver, behavior));
        }
    }
    for f in &failures {
        eprintln!("FAILURE {f}");
    }
    assert!(failures.is_empty(), "{} failure(s)", failures.len());
}

#[test]
#[cfg_attr(
    miri,
    ignore = "sleeps in reclaimers and 20 ms releasers: too slow under Miri"
)]
fn hostile_reclaimers_async_drivers() {
    watchdog(60, || {
        run(&[Driver::Async, Driver::Poller, Driver::ChildAsync])
    });
}

#[test]
#[cfg_attr(
    miri,
    ignore = "sleeps in reclaimers and 20 ms releasers: too slow under Miri"
)]
fn hostile_reclaimers_blocking_drivers() {
    watchdog(60, || {
        run(&[
            Driver::Blocking,
            Driver::Timeout,
            Driver::ReserveTimeout,
            Driver::GrowBlocking,
            Driver::ChildBlocking,
        ])
    });
}

#[test]
#[cfg_attr(miri, ignore = "sleeps in reclaimers: too slow under Miri")]
fn hostile_reclaimers_reclaim_ahead() {
    watchdog(60, || run(&[Driver::Ahead]));
}
