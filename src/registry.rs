//! The reclaimers registered with one pool, and a reclaim round over them.
//!
//! A [`Registry`] is a pool's list of [`Registration`]s (a user's [`Reclaimer`] with its name,
//! priority and counters). A [`Round`] asks a snapshot of the registrations in a pool's scope
//! (the pool and its descendants) to free memory, one at a time, in order, until the pool's
//! books show the shortfall covered. Both are plain data: who starts a round, who drives it
//! and how it ends is the protocol of `reclaim.rs` and `state.rs`. Every call into a
//! reclaimer (`estimate`, `reclaim`, polling or dropping its future) is user code: it runs
//! here, never under a lock, each call under `catch_unwind`, so that a panic leaves the round
//! in a state its owner can end cleanly before passing the panic on.

use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use crate::sync::Mutex;

/// A holder of a pool's memory that can give some of it back when asked: a cache, read-ahead,
/// buffered data that can be spilled to disk.
///
/// Registered with [`BufPool::register_reclaimer`](crate::BufPool::register_reclaimer). When a
/// request of the pool (or of a descendant that is short at this pool's level) has to wait,
/// the request itself asks the reclaimers in scope, lowest priority first and largest
/// [`estimate`](Reclaimer::estimate) first among equals (then registration order), one at a
/// time, until the pool's books show the shortfall covered (what a reclaimer reports freed
/// is counted in the statistics, but only bytes really back in the pool help; see README,
/// "Reclaim").
///
/// # Contract
///
/// * [`reclaim`](Reclaimer::reclaim) frees memory by dropping or shrinking allocations or
///   reservations *of the pool it was registered with* (or of its descendants): only those
///   bytes help the waiting request. The bytes are handed out in the pool's FIFO order, not
///   necessarily to the request that asked.
/// * Its future is polled by the waiting request (on the caller's task or thread: no runtime
///   is assumed and nothing is spawned). It may be **dropped before it completes**, when the
///   request driving the round is cancelled or served: whatever it already gave back stays
///   given back, and it must leave its holder consistent.
/// * It may allocate from the pool, release, register or drop registrations, and may panic:
///   the pool never calls it under a lock. A panic ends the round (the future is dropped)
///   and is passed on to the caller of the poll that drove it.
/// * One round per pool is in flight, but a reclaimer of a child pool is in the scope of its
///   ancestors' rounds too: it may be asked by its own pool's round and an ancestor's at
///   once (two futures of it alive together), and must stay consistent when it is.
/// * It should not hold a strong handle on its own pool: the pool keeps its registrations
///   until the handle is dropped or the pool is, so that would be a reference cycle.
///
/// # Examples
///
/// ```
/// use std::future::Future;
/// use std::pin::Pin;
/// use std::sync::{Arc, Mutex};
/// use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer};
///
/// /// A cache of buffers that gives up its oldest entries first.
/// struct Cache(Mutex<Vec<BufPoolAllocation>>);
///
/// impl Reclaimer for Cache {
///     fn estimate(&self) -> usize {
///         self.0.lock().unwrap().iter().map(|a| a.allocated_bytes()).sum()
///     }
///     fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
///         let mut entries = self.0.lock().unwrap();
///         let mut freed = 0;
///         while freed < target && !entries.is_empty() {
///             freed += entries.remove(0).allocated_bytes();
///         }
///         Box::pin(async move { freed })
///     }
/// }
///
/// # futures::executor::block_on(async {
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 256 });
/// let cache = Arc::new(Cache(Mutex::new(vec![pool.try_allocate(4)?])));
/// let _handle = pool.register_reclaimer("cache", 0, cache.clone());
/// // The pool is full; the waiting request asks the cache, which frees its entry.
/// let allocation = pool.allocate(2).await?;
/// assert_eq!(pool.stats().reclaimed_bytes, 256);
/// assert_eq!(cache.estimate(), 0);
/// # drop(allocation);
/// # Ok::<(), membudget::AllocError>(())
/// # }).unwrap();
/// ```
pub trait Reclaimer: Send + Sync + 'static {
    /// Bytes this holder could free now; cheap, may be approximate.
    fn estimate(&self) -> usize;
    /// Free up to `target` bytes of the pool's budget; resolves to the bytes it freed.
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>>;
}

/// One registered reclaimer.
pub(crate) struct Registration {
    id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) priority: u32,
    reclaimer: Arc<dyn Reclaimer>,
    /// Statistics only (not part of any protocol): how often it was asked, for how much, and
    /// what it reported freed.
    asked: AtomicUsize,
    asked_bytes: AtomicUsize,
    freed_bytes: AtomicUsize,
}

impl core::fmt::Debug for Registration {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.name)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// The reclaimer's estimate, or the panic it raised.
    pub(crate) fn estimate(&self) -> Result<usize, Box<dyn std::any::Any + Send>> {
        catch_unwind(AssertUnwindSafe(|| self.reclaimer.estimate()))
    }

    /// `(times asked, bytes asked, bytes freed)`.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (
            self.asked.load(Relaxed),
            self.asked_bytes.load(Relaxed),
            self.freed_bytes.load(Relaxed),
        )
    }
}

/// A pool's registered reclaimers.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Mutex<Vec<Arc<Registration>>>,
}

/// A new registration's id: one more than the last in the whole process, so ids order
/// registrations across the pools of a tree (a round's tie-break is registration order,
/// and a round asks the reclaimers of several pools). A plain counter, no protocol: nothing
/// else is published with it, so it is std's atomic under loom too.
fn next_registration_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Relaxed)
}

impl Registry {
    fn entries(&self) -> crate::sync::MutexGuard<'_, Vec<Arc<Registration>>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a reclaimer; returns its id.
    pub(crate) fn add(&self, name: Arc<str>, priority: u32, reclaimer: Arc<dyn Reclaimer>) -> u64 {
        let id = next_registration_id();
        self.entries().push(Arc::new(Registration {
            id,
            name,
            priority,
            reclaimer,
            asked: AtomicUsize::new(0),
            asked_bytes: AtomicUsize::new(0),
            freed_bytes: AtomicUsize::new(0),
        }));
        id
    }

    /// Takes the registration `id` out, if it is still here. The caller drops it outside
    /// every lock (dropping the user's reclaimer is user code).
    pub(crate) fn remove(&self, id: u64) -> Option<Arc<Registration>> {
        let mut entries = self.entries();
        let index = entries.iter().position(|entry| entry.id == id)?;
        Some(entries.remove(index))
    }

    /// Takes every registration out (the pool is being dropped).
    pub(crate) fn take_all(&self) -> Vec<Arc<Registration>> {
        core::mem::take(&mut *self.entries())
    }

    /// Copies the registrations into `into`.
    pub(crate) fn snapshot(&self, into: &mut Vec<Arc<Registration>>) {
        into.extend(self.entries().iter().cloned());
    }
}

/// What a finished round did.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Outcome {
    /// Bytes asked of reclaimers, added up.
    pub(crate) asked: usize,
    /// Bytes they reported freed, added up.
    pub(crate) freed: usize,
    /// Every reclaimer in the order was asked (or the shortfall was covered): the round ran to
    /// its end, rather than being dropped by a driver that left.
    pub(crate) finished: bool,
    /// The shortfall was covered.
    pub(crate) covered: bool,
    /// Nanoseconds it took.
    pub(crate) nanos: u64,
}

/// One reclaim round: the reclaimers in scope, in the order they are asked, and the one being
/// asked now.
pub(crate) struct Round {
    order: Vec<Arc<Registration>>,
    next: usize,
    /// Still short, by the pool's books after the last report (at first, the shortfall the
    /// round started with).
    remaining: usize,
    /// The most any one reclaimer is asked for: the waiting request's bytes.
    cap: usize,
    current: Option<(Arc<Registration>, ReclaimFuture)>,
    outcome: Outcome,
    started: Instant,
}

impl core::fmt::Debug for Round {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Round")
            .field("remaining", &self.remaining)
            .field("next", &self.next)
            .field("reclaimers", &self.order.len())
            .finish_non_exhaustive()
    }
}

/// What [`Reclaimer::reclaim`] returns.
type ReclaimFuture = Pin<Box<dyn Future<Output = usize> + Send>>;

/// A panic from a reclaimer, to be passed on once the round is ended.
pub(crate) type Panic = Box<dyn std::any::Any + Send>;

impl Round {
    /// A round asking `registrations` for `shortfall` bytes, no one for more than `cap`: it
    /// reads their estimates (user code, so without any lock) and orders them: lowest
    /// priority first, then largest estimate first, then in registration order. If an
    /// estimate panics, the first panic is returned with the round: its driver
    /// (`reclaim::start`) ends the round at once, unasked, and passes the panic on.
    pub(crate) fn new(
        mut registrations: Vec<Arc<Registration>>,
        shortfall: usize,
        cap: usize,
    ) -> (Round, Option<Panic>) {
        let mut panic = None;
        let mut keyed: Vec<(u32, usize, u64, Arc<Registration>)> = registrations
            .drain(..)
            .map(|registration| {
                let estimate = match registration.estimate() {
                    Ok(estimate) => estimate,
                    Err(caught) => {
                        panic.get_or_insert(caught);
                        0
                    }
                };
                (
                    registration.priority,
                    estimate,
                    registration.id,
                    registration,
                )
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        registrations.extend(
            keyed
                .into_iter()
                .map(|(_, _, _, registration)| registration),
        );
        let round = Round {
            order: registrations,
            next: 0,
            remaining: shortfall,
            cap: cap.max(1),
            current: None,
            outcome: Outcome::default(),
            started: Instant::now(),
        };
        (round, panic)
    }

    /// Drives the round: asks the next reclaimer when the current one has reported, until the
    /// shortfall is covered or everyone was asked. `Ready` with the outcome when it is over.
    /// After each report, what is still short is read from the pool (`still_short`), not
    /// worked out from the reports: the reports are counted, but only room the pool really
    /// has ends a round.
    /// A panic of a reclaimer (its `reclaim`, its future's `poll`, or the drop of a future
    /// that finished) ends the round (a future that panicked in `poll` is dropped first; a
    /// panic of that drop is ignored in favour of the first) and is returned with the
    /// outcome, to be passed on once the round is counted.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        still_short: &mut dyn FnMut() -> usize,
    ) -> Poll<(Outcome, Option<Panic>)> {
        loop {
            if self.current.is_none() {
                if self.remaining == 0 || self.next >= self.order.len() {
                    return Poll::Ready((self.finish(true), None));
                }
                let registration = Arc::clone(&self.order[self.next]);
                self.next += 1;
                let target = self.remaining.min(self.cap);
                registration.asked.fetch_add(1, Relaxed);
                saturating_add(&registration.asked_bytes, target);
                self.outcome.asked += target;
                match catch_unwind(AssertUnwindSafe(|| registration.reclaimer.reclaim(target))) {
                    Ok(future) => self.current = Some((registration, future)),
                    Err(panic) => {
                        return Poll::Ready((self.finish_panicked(still_short), Some(panic)));
                    }
                }
            }
            let (registration, future) = self.current.as_mut().expect("asked above");
            let polled = catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
            match polled {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(freed)) => {
                    // Saturating, as the pool's totals: a reclaimer may report any number.
                    saturating_add(&registration.freed_bytes, freed);
                    self.outcome.freed = self.outcome.freed.saturating_add(freed);
                    // The drop of a finished future is user code too: its panic ends the
                    // round like any other of the reclaimer's.
                    if let Some(panic) = self.drop_current() {
                        return Poll::Ready((self.finish_panicked(still_short), Some(panic)));
                    }
                    self.remaining = still_short();
                }
                Err(panic) => {
                    self.drop_current();
                    return Poll::Ready((self.finish_panicked(still_short), Some(panic)));
                }
            }
        }
    }

    /// Ends the round early (its driver leaves): the future in flight is dropped. A panic of
    /// that drop is returned.
    pub(crate) fn abandon(&mut self) -> (Outcome, Option<Panic>) {
        let panic = self.drop_current();
        (self.finish(false), panic)
    }

    /// Empties the round, dropping each piece that may hold the last reference to a user's
    /// reclaimer on its own under `catch_unwind` (a second drop panicking while the first
    /// one's panic unwinds would abort the process): the first panic is returned, later ones
    /// dropped. What is left holds no user code.
    pub(crate) fn drop_each(&mut self) -> Option<Panic> {
        let mut first = self.drop_current();
        for registration in core::mem::take(&mut self.order) {
            let dropped = catch_unwind(AssertUnwindSafe(move || drop(registration))).err();
            first = first.or(dropped);
        }
        first
    }

    /// Drops the current reclaimer's future (user code) under `catch_unwind`.
    fn drop_current(&mut self) -> Option<Panic> {
        let current = self.current.take()?;
        catch_unwind(AssertUnwindSafe(move || drop(current))).err()
    }

    /// Ends the round after a reclaimer's panic. What is still short is read from the pool
    /// first: the reclaimer may have freed what the round needed before the panic (or the
    /// panic may be a woken waiter's, passed on through the reclaimer's own release), and a
    /// round that covered its shortfall must not stall the pool.
    fn finish_panicked(&mut self, still_short: &mut dyn FnMut() -> usize) -> Outcome {
        self.remaining = still_short();
        self.finish(true)
    }

    fn finish(&mut self, finished: bool) -> Outcome {
        self.outcome.finished = finished;
        self.outcome.covered = self.remaining == 0;
        self.outcome.nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.next = self.order.len();
        self.outcome
    }
}

/// Adds `value` to a figure of the report, stopping at `usize::MAX` rather than wrapping (a
/// figure that never goes down). A plain count: no other memory is published through it.
fn saturating_add(figure: &AtomicUsize, value: usize) {
    // The closure always returns `Some`: the update cannot fail.
    let _ = figure.fetch_update(Relaxed, Relaxed, |now| Some(now.saturating_add(value)));
}

/// A [`Round`] kept inside a future that must stay `Sync` (every future of the crate is): the
/// round holds the reclaimer's future, which is only `Send`. A `Mutex` is `Sync` for any
/// `Send` content, and the round is only reached through `&mut` (`Mutex::get_mut`, which
/// takes no lock), so this costs nothing and needs no `unsafe`. Not a synchronisation point
/// (hence std's `Mutex`, not the loom facade's).
#[derive(Debug)]
pub(crate) struct Exclusive<T>(std::sync::Mutex<T>);

impl<T> Exclusive<T> {
    pub(crate) fn new(value: T) -> Self {
        Exclusive(std::sync::Mutex::new(value))
    }

    pub(crate) fn into_inner(self) -> T {
        self.0
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
