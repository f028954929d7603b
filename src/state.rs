//! The state every handle of one pool shares, and the protocol over it: admission (the fast
//! path and the queue), grants, release, close, resize and drain.
//!
//! The fast paths are one compare-exchange on the budget word each way (`word.rs`). Everything
//! else happens under the one queue lock, which guards the wait list (`waiters.rs`) and the
//! wait totals: while requests wait, `QUEUED` in the word sends every reservation and release
//! here, so the room computed under the lock is exact and grants never overshoot the budget.
//!
//! No user code runs under the lock, nor between two steps of one change of the books: wakers
//! are cloned before the lock is taken, and every method here that changes the books collects
//! the wake-ups, waker drops and drain notifications it owes in a [`Deferred`], which its
//! caller runs once every step (every level of a chain of pools: `chain.rs`) is complete. So
//! a waker that panics, or that re-enters the pool, finds the books consistent and can cost
//! at most its own waiter.

use core::pin::Pin;
use core::task::{Poll, Waker};
use std::time::Duration;

use event_listener::Event;

use crate::clock::Stamp;
use crate::deferred::{self, Deferred, settle};
use crate::heap::Memory;
use crate::recycle::{Footprint, Recycler};
use crate::registry::{Outcome, Reclaimer, Registration, Registry, Round};
use crate::stats::{Counters, Sources, WaitTotals};
use crate::sync::{Arc, AtomicBool, AtomicUsize, Mutex, lock};
use crate::waiters::{Failure, Node, Status, WaitList};
use crate::word::{BudgetWord, FastReserve, MAX_IN_USE, counted_budget};

/// Blocks of at least this many bytes whose release cannot hand them to the head are freed
/// outside the queue's lock: the allocator may return them to the system (glibc does from
/// 128 KiB on), which is a system call.
const FREE_UNLOCKED_FROM: usize = 64 * 1024;
use crate::{AllocError, BufferSize, PoolStats};
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};

/// What the fast path made of a request.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Attempt {
    /// These bytes are reserved.
    Reserved(usize),
    /// The request for these bytes has to wait: too little is free, or others wait first.
    MustWait(usize),
    /// The request fails now (bad input, or the pool is closed).
    Failed(AllocError),
}

/// How a block's release that the fast path could not make left the pool
/// ([`State::release_block_slow`], [`State::release_block_queued`]): its bytes are back,
/// and the caller ends the release with [`end`](Released::end) in its own frame, not in a
/// method of the pool (`heap.rs`, rule 4).
#[must_use = "the lock is held until this is ended"]
pub(crate) struct Released<'a>(Ending<'a>);

enum Ending<'a> {
    /// The bytes went back under the queue lock, still held: unlocking is the release's last
    /// touch of the pool, which may be gone right after.
    Locked(crate::sync::MutexGuard<'a, Queue>),
    /// The bytes went back outside the lock, with this handle on the pool taken first.
    KeptAlive(Arc<State>),
}

impl Released<'_> {
    /// Unlocks the pool, if the release still holds its lock, and returns the handle taken
    /// on it, if any, for the caller to drop after the user code owed.
    #[inline(always)]
    pub(crate) fn end(self) -> Option<Arc<State>> {
        match self.0 {
            Ending::Locked(queue) => {
                drop(queue);
                None
            }
            Ending::KeptAlive(pool) => Some(pool),
        }
    }
}

/// What a request that may wait got under the lock.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Admission {
    /// The bytes are reserved.
    Reserved,
    /// The request's node waits in the queue.
    Queued,
    /// The queue is full, and the request (a descendant's, which already waited below) may
    /// not fail with `QueueFull` any more: it waits for [`State::room`] and tries again.
    Full,
}

/// Who asks [`State::admit`] for bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Asker<'a> {
    /// The pool the request was made to, when the pool admitting it is one of its ancestors:
    /// the request is refused if that pool closed (`close` walks the ancestors' queues after
    /// it closes, under their locks, so a request queued here after the walk would never be
    /// failed), or if a pool between it and here shrank below it.
    pub(crate) descendant: Option<&'a State>,
    /// The bytes are an allocation of this pool (not a reservation's, nor a descendant's
    /// request's).
    pub(crate) counted: bool,
    /// The request already waited in a queue below: a full queue here makes it wait for
    /// room ([`Admission::Full`]) instead of failing with `QueueFull`.
    pub(crate) waited: bool,
}

/// The books of a pool's floor (`min_memory` F, held in every ancestor since the pool was
/// built): how much of it is free, and how many bytes the subtree holds in the parent beyond
/// it. The parent's word counts F plus `climbed` plus the bytes of this subtree's requests
/// still on their way up that hold it, and this pool's bytes in use are the floor's used
/// part, plus `climbed`, plus the bytes of requests still on their way up (the parts of
/// them that took no floor and count in no `climbed`).
///
/// A request reserved here first takes as much of the floor as is free (up to all it
/// needs), and climbs to the parent with the rest only. What it took of the floor is
/// complete at once: it holds the levels up to here and no more, so the floors below count
/// it as climbed then (`note_climbed`), and a cancel gives it back as a release would. The
/// part still on its way up holds the same bytes at every level, and `climbed` counts it
/// only once the request completed, so a release never mistakes a request's in-flight level
/// for completed bytes beyond the floor and gives it away under the request. A release
/// of completed bytes gives back to the parent first what the subtree holds beyond the
/// floor (`return_climbed`), and refills the floor with the rest. Both are single atomic
/// steps on two counters; a release's two steps can interleave with others' (a request may
/// climb though the floor is about to have room, or count itself as climbed just after a
/// release refilled the floor instead of taking it up): the sums stay exact, `free` never
/// exceeds F, `climbed` never goes below zero, and whichever of the refill and the count
/// comes second moves the climbed bytes into the room (`rehome_climbed`), so that at rest
/// the floor has no room free while its subtree holds bytes beyond it.
///
/// Once the pool is closed (or dropped) its floor serves nobody, so it is *retired*: what is
/// free of it goes back to the ancestors at once, and every later refill goes on up too, so
/// an ancestor whose handle is dropped while this pool lives drains once the subtree's
/// allocations are back (its drop barrier does not wait for an idle floor). A refill and the
/// retirement each change their own atomic, then read the other's, both `SeqCst`: whichever
/// comes second in that order sees the first, so a refilled byte is swept up by one of them
/// and never by both (each sweep is a swap), and never stays behind.
#[derive(Debug)]
struct Floor {
    free: AtomicUsize,
    climbed: AtomicUsize,
    retired: AtomicBool,
}

impl Floor {
    fn new(floor: usize) -> Self {
        Floor {
            free: AtomicUsize::new(floor),
            climbed: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        }
    }
}

/// The bytes in use each ancestor's level showed when a chain's fast path held it (level
/// 1 first), noted as peaks only once the request is granted. Inline for short chains.
#[derive(Default)]
struct PeakNotes {
    inline: [usize; 4],
    len: usize,
    more: Vec<usize>,
}

impl PeakNotes {
    fn push(&mut self, in_use: usize) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = in_use,
            None => self.more.push(in_use),
        }
        self.len += 1;
    }

    /// Notes the peaks of `pool`'s ancestors, level 1 up.
    #[inline]
    fn note(&self, pool: &State) {
        let mut ancestor = pool;
        for index in 0..self.len {
            ancestor = ancestor.parent().expect("a level the request held");
            let in_use = match self.inline.get(index) {
                Some(&in_use) => in_use,
                None => self.more[index - self.inline.len()],
            };
            ancestor.note_in_use(in_use);
        }
    }
}

/// What a request took of the floors on its way up, as `(level, bytes)`, lowest level first:
/// the level of the floored pool (counted from the request's pool, 0) and what it took
/// there. A request holds `bytes` at every level up to its first take, and less above each
/// take by what it took; nothing is allocated unless it takes from two floors or more.
#[derive(Default)]
pub(crate) struct FloorTakes {
    first: Option<(usize, usize)>,
    more: Vec<(usize, usize)>,
}

impl FloorTakes {
    /// Records a take of `bytes` of the floor of the pool `level` up.
    pub(crate) fn push(&mut self, level: usize, bytes: usize) {
        if self.first.is_none() {
            self.first = Some((level, bytes));
        } else {
            self.more.push((level, bytes));
        }
    }

    fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.first.into_iter().chain(self.more.iter().copied())
    }

    /// What a request of `bytes` holds at `level` (0 is its own pool): `bytes` less what it
    /// took of the floors below that level.
    pub(crate) fn held_at(&self, bytes: usize, level: usize) -> usize {
        bytes
            - self
                .iter()
                .filter(|&(below, _)| below < level)
                .map(|(_, taken)| taken)
                .sum::<usize>()
    }

    /// The request completed, holding the lowest `levels` levels of `pool`'s chain: every
    /// floored pool whose parent's level it holds counts what it holds there as its
    /// subtree's beyond the floor ([`State::note_climbed`], part by part: the bytes taken at
    /// a floor hold the levels up to that floor's pool, the rest every level).
    pub(crate) fn note_climbed(
        &self,
        pool: &State,
        bytes: usize,
        levels: usize,
        deferred: &mut Deferred,
    ) {
        let mut rest = bytes;
        for (level, taken) in self.iter() {
            pool.note_climbed(taken, level + 1, deferred);
            rest -= taken;
        }
        if rest > 0 {
            pool.note_climbed(rest, levels, deferred);
        }
    }

    /// Gives back what an unfinished request holds above its own pool: the levels 1 up to
    /// `held_above` (from the top down, each what it holds there) and the floors it took.
    pub(crate) fn undo(
        &self,
        pool: &State,
        bytes: usize,
        held_above: usize,
        deferred: &mut Deferred,
    ) {
        for level in (1..=held_above).rev() {
            pool.at_level(level)
                .give_back_here(self.held_at(bytes, level), false, deferred);
        }
        for (level, taken) in self.iter() {
            pool.at_level(level).put_back_floor(taken, deferred);
        }
    }
}

/// The handle that keeps a pool alive for its owned allocations, and how many are out.
#[derive(Default)]
struct Owner {
    count: usize,
    handle: Option<std::sync::Arc<dyn Send + Sync>>,
}

impl core::fmt::Debug for Owner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Owner")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// The budget as a resize finds it, under the lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    /// As configured.
    pub(crate) max_memory: usize,
    /// As enforced (`max_memory`, or the most the word counts).
    pub(crate) budget: usize,
    /// The bytes in use, stable while the resize holds the lock.
    pub(crate) in_use: usize,
}

/// What never changes after the pool is built.
#[derive(Debug)]
pub(crate) struct Config {
    /// The pool's name, if it was given one.
    pub(crate) name: Option<std::sync::Arc<str>>,
    pub(crate) buffer_size: BufferSize,
    /// Every block's alignment: `min(buffer_size, 16 or 4096)`.
    pub(crate) align: usize,
    /// How long `Drop` waits before it says on stderr what it waits for.
    pub(crate) drop_warning_after: Duration,
    /// Whether waits are timed for the statistics (two clock reads per wait).
    pub(crate) time_waits: bool,
    /// The most requests that may wait at once; more fail with `QueueFull`.
    pub(crate) max_waiters: usize,
    /// How many pools are above this one (0 for a root pool).
    pub(crate) depth: usize,
    /// Built with `wait_for_growth`: a request above the budget waits for it to grow
    /// instead of failing, and the budget may be zero.
    pub(crate) grows: bool,
    /// The floor (`min_memory`, a multiple of 8): bytes of the ancestors' budgets set aside
    /// for this pool's subtree alone. 0 for none.
    pub(crate) floor: usize,
    /// Whether this pool or an ancestor below the root has a floor: gives back then follow
    /// the floors' books level by level (`chain.rs`).
    pub(crate) floors_in_chain: bool,
}

/// Keeps what it holds on a cache line (two, for the adjacent-line prefetcher) of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> core::ops::Deref for CacheLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// The queue's lock, and beside it, on the line a hand-over holds anyway, one hint that is
/// read without the lock.
#[derive(Debug, Default)]
struct QueueLock {
    mutex: Mutex<Queue>,
    /// Set (under the lock) by a hand-over that emptied the list and left `QUEUED` set on it,
    /// stale (see [`State::hand_over_locked`]); cleared by the lock holder that looks. Read
    /// without the lock by a child pool's release, which takes the root's lock to see whether
    /// requests really wait only when this says the flag may be stale
    /// ([`State::requests_wait_for_recycler`]): while requests wait, child releases cost no
    /// extra lock. Only a hint: a wrong "not stale" frees a block the cache could have kept,
    /// a wrong "stale" costs one look under the lock; neither touches the budget.
    queued_maybe_stale: AtomicBool,
}

impl core::ops::Deref for QueueLock {
    type Target = Mutex<Queue>;

    fn deref(&self) -> &Mutex<Queue> {
        &self.mutex
    }
}

/// The queue lock guards these.
#[derive(Debug, Default)]
struct Queue {
    list: WaitList,
    waits: WaitTotals,
    reclaim: RoundBooks,
}

/// A pool's reclaim rounds (see `reclaim.rs`), under its queue lock: at most one in flight,
/// none retried after one that could not cover its shortfall until the pool's state changes.
#[derive(Default)]
struct RoundBooks {
    in_flight: bool,
    /// A round ran out of reclaimers without covering its shortfall: no new round until a
    /// release, a registration or a resize. Holds what the pool looked like then (a release
    /// on the fast path, while nobody waits, changes it without the lock).
    stalled: Option<Stall>,
    /// Counts registrations in scope and resizes: a round that started before one of them
    /// does not stall the pool.
    generation: u64,
    /// The generation when the round in flight started.
    round_generation: u64,
    /// The pool when the round in flight started: a finished round after which no release
    /// has reached the pool since stalls it, whatever the reclaimers reported (no storm of
    /// rounds on reclaimers that report bytes they did not free, or free them into a floor
    /// below, where they do not help this pool's waiters).
    round_start: Option<Stall>,
    /// Which request headed the queue then.
    round_head: Option<usize>,
    /// What the round in flight is short of (see [`State::round_still_short`]).
    round_for: Shortfall,
    /// The round in flight, parked here between its driver's polls (a waiting request's;
    /// `reclaim_ahead` keeps its own). Kept in the pool rather than in the request, so that
    /// every request future stays as small as it was (a request only notes which level's
    /// round it drives).
    parked: Option<Box<Round>>,
    rounds: usize,
    asked_bytes: usize,
    reclaimed_bytes: usize,
    nanos: u64,
}

impl core::fmt::Debug for RoundBooks {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RoundBooks")
            .field("in_flight", &self.in_flight)
            .field("stalled", &self.stalled)
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

/// A stalled pool as its stalling round left it: its count of releases, and its bytes in
/// use. Any release since changes one or the other (a counted one the count; a reservation's
/// or a descendant's lowers the bytes in use, unless allocations made up for it meanwhile).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
struct Stall {
    releases: usize,
    in_use: usize,
}

impl Stall {
    /// Whether `now` is still the same stall: no release seen since.
    fn holds(self, now: Stall) -> bool {
        now.releases == self.releases && now.in_use >= self.in_use
    }
}

/// What `reclaim_ahead` remembers of the pool when it goes quiet ([`State::picture`]): the
/// registrations and resizes seen, the releases and the bytes in use. Any change of one of
/// them since is a reason to look again.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Picture {
    generation: u64,
    stall: Stall,
}

impl Picture {
    /// This picture, with the registrations and resizes `earlier` had seen: for the end of a
    /// round, whose own releases are no news, while a registration during it is.
    pub(crate) fn seen_since(self, earlier: Picture) -> Picture {
        Picture {
            generation: earlier.generation,
            ..self
        }
    }
}

/// What a reclaim round starts with (see [`State::begin_round`]).
#[derive(Debug)]
pub(crate) struct RoundStart {
    /// The registrations in scope: this pool's and its descendants'.
    pub(crate) registrations: Vec<std::sync::Arc<Registration>>,
    /// What is short.
    pub(crate) shortfall: usize,
    /// The most one reclaimer is asked for.
    pub(crate) cap: usize,
}

/// What a round is short of.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum Shortfall {
    /// What the head of the queue needs beyond the free room (a waiting request's round).
    #[default]
    Head,
    /// What keeps the free room below this many bytes (`reclaim_ahead`).
    LowWater(usize),
    /// What keeps the pool's floor from having this many bytes free: a request of the
    /// subtree that needs that much of the floor waits for it, in no queue (see
    /// `Request::climb`), and drives this round.
    Floor(usize),
}

#[derive(Debug)]
pub(crate) struct State {
    /// Written by every allocation and release: alone on its line.
    word: CacheLine<BudgetWord>,
    // Read by every allocation, written rarely.
    /// The budget enforced: `max_memory`, or the most the word counts if that is less.
    budget: AtomicUsize,
    /// The budget as configured, for [`PoolStats`].
    max_memory: AtomicUsize,
    /// The largest request the pool can ever grant: `budget`, or for a pool that waits for
    /// growth the most any budget can be (read by every allocation, next to `budget`).
    hard_cap: AtomicUsize,
    peak_in_use: AtomicUsize,
    /// Bytes held by this pool's reservations (part of the bytes in use).
    reserved: AtomicUsize,
    pub(crate) config: Config,
    recycler: Recycler,
    /// Written by the waiting paths: on lines of their own, so that waiting does not slow the
    /// fast path of other threads.
    counters: CacheLine<Counters>,
    queue: CacheLine<QueueLock>,
    /// Shared, so that a release that drains the pool can notify it after the pool is gone.
    drained: Arc<Event>,
    /// Notified when a full queue (`max_waiters`) gets room, for requests that already waited
    /// in a descendant and wait for a place here instead of failing.
    room: Arc<Event>,
    /// The pool this one is a child of: every byte reserved here is reserved there too, and
    /// in every ancestor above it (not counted as their allocations). Held strongly, so an
    /// ancestor's state outlives its descendants'.
    parent: Option<Arc<State>>,
    /// An ancestor further up the chain (`None` for a root), so that [`at_level`]
    /// (State::at_level) takes O(log depth) steps instead of one per level: skew-binary jump
    /// pointers (E. W. Myers, "An applicative random-access stack", 1983), one per pool. Held
    /// strongly like `parent`; an ancestor outlives its descendants either way.
    jump: Option<Arc<State>>,
    /// Live child pools, for `close` and reports. Strong references: a child takes itself
    /// out when its handle is dropped (`detach_from_parent`), which breaks the cycle.
    children: Mutex<Vec<Arc<State>>>,
    /// The floor's books, for a pool with a floor: see [`Floor`].
    floor: Floor,
    /// The reclaimers registered with this pool.
    registry: Registry,
    /// Reclaimers registered with this pool and its descendants: a waiting request looks at
    /// reclaim only when this is not zero (the one cost reclaim adds to a pool without it).
    reclaimers_in_scope: AtomicUsize,
    /// `reclaim_ahead`: the bytes in use above which the free room is below a low-water mark
    /// (`usize::MAX` when none is set), and the event its future sleeps on.
    pressure_mark: AtomicUsize,
    pressure: Arc<Event>,
    /// The pool's handle, held while owned allocations (`allocate_owned`) are out, so that
    /// the pool's drop (its barrier) waits until the last of them is back without the task
    /// that holds one keeping a handle of its own.
    owner: Mutex<Owner>,
    /// The pool's identity, unique in the process (a report says which pool it describes
    /// with it: an address could be a dropped pool's).
    id: u64,
    /// Each wait, recorded by its waiter (with the `metrics` feature, for pools that time
    /// their waits).
    #[cfg(feature = "metrics")]
    wait_histogram: Option<crate::telemetry::WaitHistogram>,
}

/// The drop barrier's promise, checked where it can be seen: when the state goes, no release
/// still holds its lock (`Pool::quiesce` waited for it). Debug builds and loom models only.
impl Drop for State {
    fn drop(&mut self) {
        #[cfg(any(debug_assertions, loom))]
        assert!(
            self.queue.try_lock().is_ok(),
            "a pool's state dropped while its queue lock is held"
        );
        // The ancestors this state holds the last references to go one after another, not
        // each inside the drop of the one below: a chain of `MAX_DEPTH` pools dropped at once
        // would otherwise nest as many drops and overflow a thread's stack.
        let mut held: Vec<Arc<State>> = self
            .parent
            .take()
            .into_iter()
            .chain(self.jump.take())
            .collect();
        while let Some(ancestor) = held.pop() {
            if let Ok(mut last) = Arc::try_unwrap(ancestor) {
                held.extend(last.parent.take());
                held.extend(last.jump.take());
            }
        }
    }
}

/// The jump pointer of a new child of `parent` (see `State::jump`): the parent's jump's jump
/// when the parent's jump spans as many levels as that jump's own, else the parent. A root
/// counts as its own jump.
fn jump_for_child_of(parent: &Arc<State>) -> Arc<State> {
    let parent_jump = parent.jump.as_ref().unwrap_or(parent);
    let second = parent_jump.jump.as_ref().unwrap_or(parent_jump);
    if parent.depth() - parent_jump.depth() == parent_jump.depth() - second.depth() {
        Arc::clone(second)
    } else {
        Arc::clone(parent)
    }
}

/// A new pool's identity: one more than the last (a plain counter, no protocol: nothing
/// else is published with it, so it is std's atomic under loom too).
fn next_pool_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

impl State {
    pub(crate) fn new(
        max_memory: usize,
        config: Config,
        recycler: Recycler,
        parent: Option<Arc<State>>,
    ) -> Self {
        State {
            jump: parent.as_ref().map(jump_for_child_of),
            parent,
            children: Mutex::new(Vec::new()),
            owner: Mutex::new(Owner::default()),
            floor: Floor::new(config.floor),
            #[cfg(feature = "metrics")]
            wait_histogram: config
                .time_waits
                .then(|| crate::telemetry::WaitHistogram::register(config.name.as_ref())),
            word: CacheLine(BudgetWord::new()),
            budget: AtomicUsize::new(counted_budget(max_memory)),
            hard_cap: AtomicUsize::new(if config.grows {
                counted_budget(usize::MAX)
            } else {
                counted_budget(max_memory)
            }),
            max_memory: AtomicUsize::new(max_memory),
            peak_in_use: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            config,
            recycler,
            counters: CacheLine(Counters::default()),
            queue: CacheLine(QueueLock::default()),
            drained: Arc::new(Event::new()),
            room: Arc::new(Event::new()),
            registry: Registry::default(),
            reclaimers_in_scope: AtomicUsize::new(0),
            pressure_mark: AtomicUsize::new(usize::MAX),
            pressure: Arc::new(Event::new()),
            id: next_pool_id(),
        }
    }

    /// The pool's identity, unique in the process.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    // ---- admission ----

    /// The fast path, shared by every call form: bad input fails, and the bytes of `n`
    /// buffers are reserved if they are free and nobody waits, with one compare-exchange.
    #[inline(always)]
    pub(crate) fn reserve_now(&self, n: usize) -> Attempt {
        let shift = self.config.buffer_size.shift();
        // Checked against the largest request the pool can ever grant (its budget, read now,
        // unless it waits for growth); the word's compare-exchange checks the bytes against
        // the budget in force (see `BudgetWord::try_reserve`).
        let cap = self.hard_cap();
        // `n * buffer_size <= cap` exactly when `n <= cap >> shift`, which also rules out
        // overflow.
        if n == 0 || n > cap >> shift {
            return Attempt::Failed(self.refusal(n, cap));
        }
        let bytes = n << shift;
        if self.parent.is_some() {
            return self.reserve_chain_now(bytes, true);
        }
        match self.word.try_reserve(bytes, || self.budget()) {
            FastReserve::Reserved { wrapped, in_use } => {
                if wrapped {
                    self.counters.allocations_wrapped();
                }
                self.note_in_use(in_use);
                Attempt::Reserved(bytes)
            }
            FastReserve::Closed => Attempt::Failed(AllocError::Closed),
            FastReserve::MustWait => Attempt::MustWait(bytes),
        }
    }

    /// The fast path of a reservation of `bytes` (a multiple of 8): held, not counted as an
    /// allocation; bad input and a closed pool fail.
    pub(crate) fn reserve_bytes_now(&self, bytes: usize) -> Attempt {
        let cap = self.hard_cap();
        if bytes > cap {
            return Attempt::Failed(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: cap.min(self.smallest_cap_above()),
            });
        }
        if self.parent.is_some() {
            return self.reserve_chain_now(bytes, false);
        }
        match self.hold_now(bytes) {
            Ok(true) => Attempt::Reserved(bytes),
            Ok(false) => Attempt::MustWait(bytes),
            Err(error) => Attempt::Failed(error),
        }
    }

    /// The fast path of a call that does not wait ([`reserve_now`](State::reserve_now))
    /// refused `n` buffers (`bytes`): unless that was only a stale `QUEUED` (see
    /// [`clear_stale_queued`](State::clear_stale_queued)), which is cleared for one more
    /// try, `WouldBlock`. Returns the bytes reserved, for the caller to build the allocation.
    #[cold]
    #[inline(never)]
    pub(crate) fn refused_now(&self, n: usize, bytes: usize) -> Result<usize, AllocError> {
        if self.clear_stale_queued(bytes) {
            match self.reserve_now(n) {
                Attempt::Reserved(bytes) => return Ok(bytes),
                Attempt::Failed(error) => return Err(error),
                Attempt::MustWait(_) => {}
            }
        }
        Err(self.would_block())
    }

    /// [`reserve_bytes_now`](State::reserve_bytes_now) for a call that does not wait: a
    /// refusal caused only by a stale `QUEUED` (see
    /// [`clear_stale_queued`](State::clear_stale_queued)) clears it and tries once more.
    pub(crate) fn reserve_bytes_without_waiting(&self, bytes: usize) -> Attempt {
        match self.reserve_bytes_now(bytes) {
            Attempt::MustWait(bytes) if self.clear_stale_queued(bytes) => {
                self.reserve_bytes_now(bytes)
            }
            attempt => attempt,
        }
    }

    /// Counts `delta` bytes more (or fewer) held by reservations, for the statistics.
    pub(crate) fn note_reserved(&self, delta: isize) {
        if delta >= 0 {
            self.reserved.fetch_add(delta.unsigned_abs(), Relaxed);
        } else {
            self.reserved.fetch_sub(delta.unsigned_abs(), Relaxed);
        }
    }

    /// Bytes a reservation held become an allocation of this pool (they stay in use; the
    /// allocation's drop gives them back as a release).
    pub(crate) fn held_becomes_allocation(&self) {
        self.counters.grant_taken();
    }

    /// The bytes of `n` buffers, for an `n` the fast path accepted.
    #[inline(always)]
    pub(crate) fn bytes_of(&self, n: usize) -> usize {
        n << self.config.buffer_size.shift()
    }

    /// Why the fast path refuses `n` buffers: none, or more than `cap` (the pool's
    /// [`hard_cap`](State::hard_cap), which it checked against). The error names the
    /// smallest cap of the chain (a child's own cap may not be it).
    #[cold]
    fn refusal(&self, n: usize, cap: usize) -> AllocError {
        if n == 0 {
            AllocError::ZeroBuffers
        } else {
            AllocError::ExceedsBudget {
                requested_bytes: n.saturating_mul(self.config.buffer_size.bytes()),
                max_memory: cap.min(self.smallest_cap_above()),
            }
        }
    }

    /// The largest request of this pool its ancestors can ever serve (`usize::MAX` for a
    /// root; this pool's own cap is the caller's to check): the smallest
    /// [`hard_cap`](State::hard_cap) of the ancestors. Floors on the chain do not lower it: a
    /// request uses every floor it passes before it climbs on (see
    /// [`servable_from`](State::servable_from)), so in a tree where nothing else is held a
    /// request up to the smallest cap is served. (Floors of other pools are not counted:
    /// they go back when those pools close.)
    fn smallest_cap_above(&self) -> usize {
        let mut smallest = usize::MAX;
        let mut ancestor = self.parent.as_deref();
        while let Some(pool) = ancestor {
            smallest = smallest.min(pool.hard_cap());
            ancestor = pool.parent.as_deref();
        }
        smallest
    }

    /// The most a request of this pool can ever hold in the pools from `level` up (its
    /// ancestor `level` up, and above), as it climbs on from the pool below: the smallest
    /// cap from `level` up, less the largest floor of the pools below `level` on this chain.
    ///
    /// Why: the chain's floors below `level` stay set aside in every pool from `level` up
    /// for as long as this pool is open, whoever uses them, and they nest: a floor set aside
    /// in its parent is a holding of the parent's subtree, which uses the parent's floor
    /// first, so above a floored pool `j` the floors below it and `F(j)` together take
    /// `S(j + 1) = max(F(j), S(j))` (the books give back what climbed first, so once the
    /// rest of the subtree is idle, that is what stays). A request holding `r` at `j` can
    /// take what of `F(j)` the floors below leave free, `max(0, F(j) - S(j))`, before it
    /// climbs, so the most it can hold at `j` is
    /// `R(j) = min(cap(j) - S(j), max(0, F(j) - S(j)) + R(j + 1))`, and with
    /// `R(j + 1) = min cap above j - S(j + 1)` that is the smallest cap from `j` up less
    /// `S(j)`. For `level` 0 (no floor below) it is the chain's smallest cap:
    /// [`largest_request`](State::largest_request). Floors of pools off the chain are not
    /// counted (they go back when those pools close), so this is an upper bound while such
    /// floors are set aside inside the chain's.
    pub(crate) fn servable_from(&self, level: usize) -> usize {
        let mut set_aside = 0;
        for below in 0..level.min(self.depth() + 1) {
            set_aside = set_aside.max(self.at_level(below).floor_now().0);
        }
        let mut smallest = usize::MAX;
        for above in level..=self.depth() {
            smallest = smallest.min(self.at_level(above).hard_cap());
        }
        smallest.saturating_sub(set_aside)
    }

    /// The largest request of this pool its chain can ever serve: what `ExceedsBudget`
    /// names.
    pub(crate) fn largest_request(&self) -> usize {
        self.hard_cap().min(self.smallest_cap_above())
    }

    /// The largest request this pool can ever grant: its budget, or for a pool that waits
    /// for growth the most any budget can be. A request above it fails at once.
    #[inline(always)]
    pub(crate) fn hard_cap(&self) -> usize {
        self.hard_cap.load(Relaxed)
    }

    /// Keeps the peak: a plain load in the common case that it did not grow.
    #[inline(always)]
    fn note_in_use(&self, in_use: usize) {
        if in_use > self.peak_in_use.load(Relaxed) {
            self.peak_in_use.fetch_max(in_use, Relaxed);
        }
    }

    /// The slow path: under the lock, reserves `bytes` if nobody waits and they fit, or else
    /// queues `node` behind every earlier request.
    pub(crate) fn admit(
        &self,
        node: Pin<&Node>,
        bytes: usize,
        waker: &Waker,
        asker: Asker<'_>,
        unused: &mut Option<Waker>,
    ) -> Result<Admission, AllocError> {
        let Asker {
            descendant: for_descendant,
            counted,
            waited,
        } = asker;
        // Clone before the lock (user code), and read the clock before it too: other threads
        // wait for that lock. Handed back in `unused` if not needed, for the caller to drop
        // (user code) once it has recorded what it holds.
        let waker = waker.clone();
        let since = self.clock();
        // A reservation's growth would hold its reservation's bytes beside these: the two
        // must fit the caps (idle, the node is ours to read).
        let beside = node.held_beside();
        let mut queue = lock(&self.queue);
        match self.admit_locked(&mut queue, bytes, beside, for_descendant, counted, waited) {
            Ok(Admission::Queued) => {}
            other => {
                *unused = Some(waker);
                return other;
            }
        }
        // A root pool's own allocation takes the block of a release that serves it (see
        // `release_block_queued`); a reservation or a child pool's request takes bytes only.
        let takes_block = counted && for_descendant.is_none() && self.parent().is_none();
        queue.list.push_back(
            node,
            bytes,
            waker,
            since.unwrap_or_default(),
            for_descendant.unwrap_or(self).origin(),
            takes_block,
        );
        Ok(Admission::Queued)
    }

    /// [`admit`](State::admit) under the lock, up to the queueing: `Queued` means the caller
    /// links the node (`QUEUED` is set). `waited`: the request already waited in a queue
    /// below, so a full queue here makes it wait for room (`Full`) instead of failing:
    /// `QueueFull` comes only at once.
    fn admit_locked(
        &self,
        queue: &mut Queue,
        bytes: usize,
        beside: usize,
        for_descendant: Option<&State>,
        counted: bool,
        waited: bool,
    ) -> Result<Admission, AllocError> {
        if let Some(origin) = for_descendant {
            if origin.is_closed() {
                return Err(AllocError::Closed);
            }
            // A pool between the origin and here shrank below the request after it passed
            // there: `set_max_memory` fails such requests in the queues it walks (after its
            // budget store, under each queue's lock), and this check under our lock catches
            // one that queues here after the walk passed.
            let below = origin.smallest_budget_below(self);
            if bytes.saturating_add(beside) > below {
                return Err(AllocError::ExceedsBudget {
                    requested_bytes: bytes,
                    max_memory: below,
                });
            }
        }
        let budget = self.budget();
        let cap = self.hard_cap();
        if bytes.saturating_add(beside) > cap {
            // A concurrent shrink of the budget made the request impossible.
            return Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: cap,
            });
        }
        // Checked before `QUEUED` is set: a refused request leaves no trace. (Under the lock,
        // `QUEUED` is set while the list is not empty; set on an empty list, it is stale: a
        // hand-over to the last waiter left it, see `hand_over_locked`. No resize is under
        // way, as a resize holds the lock throughout.)
        let empty = queue.list.is_empty();
        let full = queue.list.len() >= self.config.max_waiters;
        let refuse_full = || {
            if waited && for_descendant.is_some() {
                Ok(Admission::Full)
            } else {
                Err(self.queue_full())
            }
        };
        let mut word = self.word.load();
        loop {
            let next = if word.is_closed() {
                return Err(AllocError::Closed);
            } else if word.is_queued() && !empty {
                if full {
                    return refuse_full();
                }
                break;
            } else if word.has_room_for(bytes, budget) {
                // Clears a stale `QUEUED` in the same step.
                word.plus(bytes).unqueued()
            } else if full {
                return refuse_full();
            } else if word.is_queued() {
                // Stale, and true again once the node is linked: no step of the word needed.
                break;
            } else {
                word.queued()
            };
            match self.word.compare_exchange(word, next) {
                Ok(_) if !next.is_queued() => {
                    if counted {
                        queue.waits.allocations += 1;
                    }
                    self.note_in_use(next.in_use());
                    return Ok(Admission::Reserved);
                }
                Ok(_) => break,
                Err(actual) => word = actual,
            }
        }
        Ok(Admission::Queued)
    }

    /// Checks a queued node: `Ready` once it is out of the queue. A grant is seen without the
    /// lock (the common case: the waiter was woken for it); only a node still waiting takes
    /// it, to store a new waker if the task changed.
    #[inline]
    ///
    /// `own`: the request was made to this pool (so a grant is an allocation of it), not to
    /// a descendant.
    pub(crate) fn poll_queued(
        &self,
        node: Pin<&Node>,
        waker: &Waker,
        own: bool,
    ) -> Poll<Result<(), AllocError>> {
        match node.status() {
            Status::Granted => {
                self.grant_taken(node, own);
                Poll::Ready(Ok(()))
            }
            Status::Failed(error) => Poll::Ready(Err(error)),
            Status::Waiting | Status::Idle => self.poll_waiting(node, waker, own),
        }
    }

    #[cold]
    fn poll_waiting(
        &self,
        node: Pin<&Node>,
        waker: &Waker,
        own: bool,
    ) -> Poll<Result<(), AllocError>> {
        // No user code under the lock: a new waker is cloned before it, and the one it
        // replaces is dropped after it.
        {
            let queue = lock(&self.queue);
            if queue.list.will_wake(node, waker) {
                return Poll::Pending;
            }
        }
        let new_waker = waker.clone();
        let old_waker = lock(&self.queue).list.register(node, new_waker);
        drop(old_waker);
        // The node may have been served while the lock was not held.
        match node.status() {
            Status::Granted => {
                self.grant_taken(node, own);
                Poll::Ready(Ok(()))
            }
            Status::Failed(error) => Poll::Ready(Err(error)),
            Status::Waiting | Status::Idle => Poll::Pending,
        }
    }

    /// The owner of a granted node takes its bytes: now an allocation, if the request was
    /// made to this pool (`own`). Its wait is recorded here either way, first: the metrics
    /// recorder is user code, and should it panic, nothing is taken yet (the grant is given
    /// back when the request is dropped).
    #[inline]
    fn grant_taken(&self, node: Pin<&Node>, own: bool) {
        #[cfg(feature = "metrics")]
        if let Some(histogram) = &self.wait_histogram {
            let now = Stamp::now();
            let waited = now.ticks_since(node.queued_at());
            histogram.record(crate::clock::ticks_to_duration_cached(waited, now));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = node;
        if own {
            self.counters.grant_taken();
        }
    }

    /// A queued node's owner gives up (its future is dropped): bytes already granted to it go
    /// to the next waiters, and a head that leaves lets the ones behind it move up.
    ///
    /// The caller holds a handle on the pool.
    pub(crate) fn cancel(&self, node: Pin<&Node>, bytes: usize, deferred: &mut Deferred) {
        match node.status() {
            // Out of the queue, and ours: nothing to undo.
            Status::Failed(_) | Status::Idle => {}
            Status::Granted => self.give_back_grant(node, bytes, deferred),
            Status::Waiting => {
                let own_waker = {
                    let mut queue = lock(&self.queue);
                    let before = queue.list.len();
                    // Served since the look above? Then the node is out of the list and
                    // `remove` changes nothing. (Whether it left is not whether it had a
                    // waker: a head woken by `wake_front` or `wake_where` has none until it
                    // polls again, and the ones behind it must move up all the same.)
                    let removed = queue.list.remove(node);
                    if removed.is_some() {
                        let now = self.clock();
                        self.serve(&mut queue, deferred, now);
                    }
                    self.note_room(before, &queue, deferred);
                    removed.flatten()
                };
                // Dropped after the others' wake-ups, so that its `drop` panicking costs only
                // us.
                if let Some(own_waker) = own_waker {
                    deferred.drop_later(own_waker);
                }
                if let Status::Granted = node.status() {
                    self.give_back_grant(node, bytes, deferred);
                }
            }
        }
    }

    /// Takes a queued node out of the queue to be served another way (a floor below): its
    /// status afterwards. `Idle`: it left the queue (the waiters behind it are served if they
    /// now fit); `Granted` or `Failed`: it was served first, and is handled as such.
    pub(crate) fn withdraw(&self, node: Pin<&Node>, deferred: &mut Deferred) -> Status {
        if node.status() == Status::Waiting {
            let mut queue = lock(&self.queue);
            let before = queue.list.len();
            // As in `cancel`: a node woken by `wake_where` (the floor's room) has no waker.
            if let Some(own_waker) = queue.list.remove(node) {
                let now = self.clock();
                self.serve(&mut queue, deferred, now);
                self.note_room(before, &queue, deferred);
                if let Some(own_waker) = own_waker {
                    deferred.drop_later(own_waker);
                }
            }
        }
        node.status()
    }

    /// A grant its owner never took: not an allocation after all, so not a release either.
    /// Its wait stays counted (in the number of waits, their total and their maximum alike),
    /// so the wait statistics stay consistent and never go down.
    /// A block handed over with the grant is freed first.
    #[cold]
    fn give_back_grant(&self, node: Pin<&Node>, bytes: usize, deferred: &mut Deferred) {
        drop(node.take_block());
        let now = self.clock();
        let mut queue = lock(&self.queue);
        self.settle_locked(bytes, false, &mut queue, deferred, now);
    }

    // ---- the chain of pools (child pools) ----
    //
    // The walks that give bytes back level by level live in `chain.rs`; here is what one
    // level needs, and the all-or-nothing fast path of a child pool's request.

    /// How many pools are above this one.
    #[inline]
    pub(crate) fn depth(&self) -> usize {
        self.config.depth
    }

    /// The pool this one is a child of.
    #[inline]
    pub(crate) fn parent(&self) -> Option<&State> {
        self.parent.as_deref()
    }

    /// The root of this pool's tree: itself when it has no parent.
    #[inline]
    pub(crate) fn root(&self) -> &State {
        match self.parent {
            None => self,
            Some(_) => self.at_level(self.depth()),
        }
    }

    /// The pool `level` steps up the chain: 0 is this one. O(log depth) steps, by the jump
    /// pointers (`State::jump`): a walk over every level of the chain stays O(depth log depth).
    /// A few levels up (the trees most programs build), parent by parent and inline.
    #[inline]
    pub(crate) fn at_level(&self, level: usize) -> &State {
        if level > 4 {
            return self.at_level_further(level);
        }
        let mut pool = self;
        for _ in 0..level {
            pool = pool.parent().expect("a level within the chain of pools");
        }
        pool
    }

    #[inline(never)]
    fn at_level_further(&self, level: usize) -> &State {
        let target = self
            .depth()
            .checked_sub(level)
            .expect("a level within the chain of pools");
        let mut pool = self;
        while pool.depth() > target {
            let up = match pool.jump.as_deref() {
                Some(jump) if jump.depth() >= target => Some(jump),
                _ => pool.parent.as_deref(),
            };
            pool = up.expect("a pool below the root has a parent");
        }
        pool
    }

    /// The smallest budget on the chain from this pool up: the most any request here can get.
    /// (A pool that waits for growth counts with the most any budget can be.)
    pub(crate) fn smallest_budget(&self) -> usize {
        let mut budget = self.hard_cap();
        let mut ancestor = self.parent.as_deref();
        while let Some(pool) = ancestor {
            budget = budget.min(pool.hard_cap());
            ancestor = pool.parent.as_deref();
        }
        budget
    }

    /// The smallest budget on the chain from this pool up to `ancestor`, `ancestor` not
    /// included (`usize::MAX` if that is no pool).
    pub(crate) fn smallest_budget_below(&self, ancestor: &State) -> usize {
        let mut budget = usize::MAX;
        let mut pool = Some(self);
        while let Some(level) = pool.filter(|level| !core::ptr::eq(*level, ancestor)) {
            budget = budget.min(level.hard_cap());
            pool = level.parent.as_deref();
        }
        budget
    }

    /// The address that tells this pool's requests apart in an ancestor's queue.
    fn origin(&self) -> usize {
        core::ptr::from_ref(self).addr()
    }

    /// Registers `child` (just built with this pool as its parent) and tells whether this
    /// pool is closed, in which case the caller closes the child (`chain::close`, which also
    /// retires its floor). Either the child is registered before `chain::close` of this pool
    /// (or of an ancestor) copies the list of descendants, which it does after it set
    /// `CLOSED` and closes every one it finds open, or this sees `CLOSED`: the children's lock
    /// orders the two.
    pub(crate) fn adopt(&self, child: &Arc<State>) -> bool {
        lock(&self.children).push(Arc::clone(child));
        self.is_closed()
    }

    /// Takes this pool out of its parent's registry (its handle is being dropped, after its
    /// drain).
    pub(crate) fn detach_from_parent(&self) {
        if let Some(parent) = &self.parent {
            lock(&parent.children).retain(|registered| !core::ptr::eq(&**registered, self));
        }
    }

    /// The live children, for reports.
    pub(crate) fn children(&self) -> Vec<Arc<State>> {
        lock(&self.children).clone()
    }

    /// The fast path of a child pool's request, all or nothing: `bytes` reserved in every
    /// ancestor (not as their allocations; less above each floor, which serves what it can
    /// first) and then here (as one), or nowhere. A request above any cap of the chain fails
    /// at once.
    #[cold]
    #[inline(never)]
    fn reserve_chain_now(&self, bytes: usize, counted: bool) -> Attempt {
        let cap = self.smallest_cap_above();
        if bytes > cap {
            // Named by the smallest cap of the chain, as the README's table says.
            return Attempt::Failed(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: cap,
            });
        }
        // A look here first: without room (or with waiters) here, the ancestors are not
        // touched at all.
        let word = self.word.load();
        if word.is_closed() {
            return Attempt::Failed(AllocError::Closed);
        }
        if word.is_queued() || bytes > self.budget().saturating_sub(word.in_use()) {
            return Attempt::MustWait(bytes);
        }
        // Each floor on the way is used first (as much as it has free), and the rest climbs:
        // `rest` is what the next level up must hold.
        let mut takes = FloorTakes::default();
        let mut rest = bytes;
        let mut reserved_above = 0;
        let mut levels = 1 + self.depth();
        let mut refused = None;
        let mut peaks = PeakNotes::default();
        // Walked with a cursor, one parent step a level (no `at_level` lookups).
        let mut lower = self;
        for level in 1..=self.depth() {
            let upper = lower.parent().expect("a level within the chain of pools");
            if let Some(taken) = lower.take_floor_part(rest, 0).filter(|&taken| taken > 0) {
                takes.push(level - 1, taken);
                rest -= taken;
                if rest == 0 {
                    // The floors held it all: nothing to hold above.
                    levels = level;
                    break;
                }
            }
            // The level's peak is noted only once the whole request is granted: a request
            // refused higher up was never in use here (no phantom peak).
            match upper.hold_now_unnoted(rest) {
                Ok(Some(in_use)) => {
                    reserved_above = level;
                    peaks.push(in_use);
                    lower = upper;
                }
                Ok(None) => {
                    refused = Some(Attempt::MustWait(bytes));
                    break;
                }
                Err(error) => {
                    refused = Some(Attempt::Failed(error));
                    break;
                }
            }
        }
        let attempt = match refused {
            Some(attempt) => attempt,
            None if !counted => match self.hold_now(bytes) {
                Ok(true) => {
                    peaks.note(self);
                    self.complete_fast(&takes, bytes, levels, counted);
                    return Attempt::Reserved(bytes);
                }
                Ok(false) => Attempt::MustWait(bytes),
                Err(error) => Attempt::Failed(error),
            },
            None => match self.word.try_reserve(bytes, || self.budget()) {
                FastReserve::Reserved { wrapped, in_use } => {
                    if wrapped {
                        self.counters.allocations_wrapped();
                    }
                    self.note_in_use(in_use);
                    peaks.note(self);
                    self.complete_fast(&takes, bytes, levels, counted);
                    return Attempt::Reserved(bytes);
                }
                FastReserve::Closed => Attempt::Failed(AllocError::Closed),
                FastReserve::MustWait => Attempt::MustWait(bytes),
            },
        };
        // Every level held, and every floor taken, goes back before any wake-up it owes runs.
        settle(|deferred| takes.undo(self, bytes, reserved_above, deferred));
        attempt
    }

    /// A fast path on a chain with floors completed: the floors below the levels it holds
    /// count it as climbed ([`note_climbed`](State::note_climbed)). Should that re-home bytes
    /// into a floor, the wake-ups of the give-back above run here: if one panics, the
    /// request's bytes go back first (nobody would wrap them), then the panic goes on.
    fn complete_fast(&self, takes: &FloorTakes, bytes: usize, levels: usize, counted: bool) {
        let mut deferred = Deferred::default();
        takes.note_climbed(self, bytes, levels, &mut deferred);
        deferred.run_or_undo(|| {
            settle(|deferred| self.give_back_completed(bytes, counted, deferred));
        });
    }

    /// Reserves `bytes` here without waiting, not as an allocation of this pool (for a
    /// descendant's request, or a reservation). `Ok(false)`: the request must wait here.
    pub(crate) fn hold_now(&self, bytes: usize) -> Result<bool, AllocError> {
        let held = self.hold_now_unnoted(bytes)?;
        if let Some(in_use) = held {
            self.note_in_use(in_use);
        }
        Ok(held.is_some())
    }

    /// [`hold_now`](State::hold_now) without noting the peak: `Some(in_use)` (the bytes in
    /// use the hold made, for the caller to note once the request is granted) or `None`
    /// (the request must wait here).
    fn hold_now_unnoted(&self, bytes: usize) -> Result<Option<usize>, AllocError> {
        let cap = self.hard_cap();
        if bytes > cap {
            return Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: cap,
            });
        }
        match self.word.try_reserve_uncounted(bytes, || self.budget()) {
            FastReserve::Reserved { in_use, .. } => Ok(Some(in_use)),
            FastReserve::Closed => Err(AllocError::Closed),
            FastReserve::MustWait => Ok(None),
        }
    }

    /// Holds `bytes` more here whatever the budget, for a reservation's `force_grow`: the
    /// bytes in use may go above the budget (overcommit), and no request is granted here
    /// until releases bring them back under it. Fails only if the word could not count the
    /// bytes (more than [`MAX_IN_USE`] in use). While requests wait (`QUEUED`) the bytes are
    /// added under the lock, so that a release computing the room for grants under it sees
    /// them.
    pub(crate) fn force_hold(&self, bytes: usize) -> Result<(), AllocError> {
        let mut word = self.word.load();
        let mut queue = None;
        loop {
            if bytes > MAX_IN_USE - word.in_use() {
                return Err(AllocError::ExceedsBudget {
                    requested_bytes: bytes,
                    max_memory: self.budget(),
                });
            }
            if word.is_queued() && queue.is_none() {
                queue = Some(lock(&self.queue));
                word = self.word.load();
                continue;
            }
            match self.word.compare_exchange(word, word.plus(bytes)) {
                Ok(_) => {
                    self.note_in_use(word.in_use() + bytes);
                    return Ok(());
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Gives back `bytes` of this level: counted as a release of this pool if `counted` (an
    /// allocation's bytes), else held bytes ([`hold_now`](State::hold_now) or the locked
    /// equivalent, a reservation's, a grant's). The caller holds a handle on the pool.
    pub(crate) fn give_back_here(&self, bytes: usize, counted: bool, deferred: &mut Deferred) {
        let fast = if counted {
            self.word.try_release(bytes)
        } else {
            self.word.try_release_uncounted(bytes)
        };
        if !fast {
            self.release_slow(bytes, counted, deferred);
        }
    }

    // ---- completed holdings given back through the chain ----

    /// Gives back `bytes` of completed holdings in this pool (counted as a release of an
    /// allocation if `counted`) and the bytes they hold in its ancestors, from the top down,
    /// this pool's own level last. The caller holds a handle on this pool.
    pub(crate) fn give_back_completed(&self, bytes: usize, counted: bool, deferred: &mut Deferred) {
        self.give_back_above_completed(bytes, deferred);
        self.give_back_here(bytes, counted, deferred);
    }

    /// Gives back, in the ancestors of this pool, what `bytes` of completed holdings of this pool
    /// hold there, from the top down. Without floors in the chain that is `bytes` at every
    /// level. With floors, each floored pool first settles its books (`State::return_climbed`:
    /// what its subtree held above its floor goes on up, the rest refills the floor), bottom
    /// up, so each level above gives back what the level below passed on.
    pub(crate) fn give_back_above_completed(&self, bytes: usize, deferred: &mut Deferred) {
        if !self.floors_in_chain() {
            self.give_back_above(bytes, self.depth(), deferred);
            return;
        }
        let mut above = Vec::with_capacity(self.depth());
        let mut amount = bytes;
        for level in 0..self.depth() {
            let lower = self.at_level(level);
            let up = lower.return_climbed(amount);
            if up < amount {
                // The floor got room: requests of its subtree waiting above may take it now.
                lower.wake_floor_waiters(deferred);
            }
            amount = up;
            if amount == 0 {
                break;
            }
            above.push(amount);
        }
        for (index, &amount) in above.iter().enumerate().rev() {
            self.at_level(index + 1)
                .give_back_here(amount, false, deferred);
        }
    }

    /// Gives back `bytes` held in the `levels` pools above this pool (its ancestors), from the top
    /// down, leaving the wake-ups owed in `deferred`: a request on its way up, exactly what it
    /// holds (it took no floor and no floor counted it as climbed: both happen only when a
    /// request completes).
    pub(crate) fn give_back_above(&self, bytes: usize, levels: usize, deferred: &mut Deferred) {
        for level in (1..=levels).rev() {
            self.at_level(level).give_back_here(bytes, false, deferred);
        }
    }

    // ---- the floor (min_memory) ----

    /// Whether this pool has a floor.
    #[inline]
    pub(crate) fn has_floor(&self) -> bool {
        self.config.floor > 0
    }

    /// Whether this pool or one of its ancestors has a floor.
    #[inline]
    pub(crate) fn floors_in_chain(&self) -> bool {
        self.config.floors_in_chain
    }

    /// Takes `bytes` of the floor, all or nothing: `true` if the floor held them (the
    /// request then needs nothing of the parent). For a request waiting above whose whole
    /// remaining part a refill can serve; on the way up, requests take what is free
    /// ([`take_floor_part`](State::take_floor_part)). `AcqRel`/`Acquire`: pairs with the
    /// `Release` of the refill that made the room, like the budget word's reservations.
    pub(crate) fn take_floor(&self, bytes: usize) -> bool {
        if !self.has_floor() || self.floor.retired.load(Relaxed) {
            return false;
        }
        let mut free = self.floor.free.load(Acquire);
        while free >= bytes {
            match self
                .floor
                .free
                .compare_exchange_weak(free, free - bytes, AcqRel, Acquire)
            {
                Ok(_) => return true,
                Err(actual) => free = actual,
            }
        }
        false
    }

    /// Takes as much of the floor as it has free, up to `bytes`, if that is at least
    /// `at_least`: `Some(taken)` (0 if the floor has nothing free and `at_least` is 0), or
    /// `None` if the floor has less than `at_least` free (or none at all: no floor, or a
    /// retired one) and nothing was taken. A request uses the floor before it climbs to the
    /// parent with the rest; `at_least` is what it must take for the rest to fit above at
    /// all ([`servable_from`](State::servable_from)). Orderings as in
    /// [`take_floor`](State::take_floor).
    pub(crate) fn take_floor_part(&self, bytes: usize, at_least: usize) -> Option<usize> {
        if !self.has_floor() || self.floor.retired.load(Relaxed) {
            return (at_least == 0).then_some(0);
        }
        let mut free = self.floor.free.load(Acquire);
        loop {
            let taken = free.min(bytes);
            if taken < at_least {
                return None;
            }
            if taken == 0 {
                return Some(0);
            }
            match self
                .floor
                .free
                .compare_exchange_weak(free, free - taken, AcqRel, Acquire)
            {
                Ok(_) => return Some(taken),
                Err(actual) => free = actual,
            }
        }
    }

    /// Puts back `bytes` a request took of the floor but did not keep (a fast path refused
    /// above), and wakes (later) the requests that wait for the floor to have room. If the
    /// floor was retired meanwhile (this pool closed under the request), what is free of it
    /// goes on to the parent now, as a refill's would ([`refill_floor`](State::refill_floor):
    /// the same `SeqCst` pair with the retirement), so the ancestors get the floor back
    /// although the close swept it before these bytes came back. Like every refill, it
    /// re-homes climbed bytes into the room it made (see `rehome_climbed`).
    pub(crate) fn put_back_floor(&self, bytes: usize, deferred: &mut Deferred) {
        let up = self.refill_floor(bytes) + self.rehome_climbed();
        if up > 0 {
            let parent = self.parent().expect("a pool with a floor has a parent");
            parent.give_back_completed(up, false, deferred);
        }
        deferred.notify(Arc::clone(&self.room));
    }

    /// Refills the floor with `bytes` of completed holdings given back. Returns the bytes to
    /// give back to the parent instead: those of a retired floor
    /// ([`retire_floor`](State::retire_floor)).
    #[must_use = "a retired floor's bytes go back to the parent"]
    fn refill_floor(&self, bytes: usize) -> usize {
        // `SeqCst` (the refill's half of the pair with `retire_floor`) also releases, as
        // `return_climbed`'s refill must.
        self.floor.free.fetch_add(bytes, SeqCst);
        if self.floor.retired.load(SeqCst) {
            // Retired meanwhile, or before: whatever is free now goes up (a swap: the
            // retirement's sweep and ours never take the same byte).
            self.floor.free.swap(0, SeqCst)
        } else {
            0
        }
    }

    /// The pool closed (or is dropped, drained): its floor serves nobody now. Returns what
    /// of it is free, for the caller to give back to the parent; from now on every refill
    /// goes up too (see [`Floor`]). Every call sweeps what is free (a request that took
    /// from the floor before the retirement and failed puts its bytes back there).
    #[must_use = "the floor's bytes go back to the parent"]
    pub(crate) fn retire_floor(&self) -> usize {
        if !self.has_floor() {
            return 0;
        }
        self.floor.retired.store(true, SeqCst);
        self.floor.free.swap(0, SeqCst)
    }

    /// Sets `floor` bytes aside in this pool (and its ancestors, as a request of this pool
    /// would) for a new child's floor, at once or not at all: held, not counted as an
    /// allocation, never barging past waiters.
    pub(crate) fn set_floor_aside(&self, floor: usize) -> Result<(), AllocError> {
        match self.reserve_bytes_without_waiting(floor) {
            Attempt::Reserved(_) => Ok(()),
            Attempt::MustWait(_) => Err(AllocError::WouldBlock),
            Attempt::Failed(error) => Err(error),
        }
    }

    /// The subtree now holds `bytes` more in the parent beyond the floor: a request that
    /// holds the parent's level just completed (`chain::note_climbed`). No-op without a
    /// floor.
    pub(crate) fn climbed(&self, bytes: usize) {
        if self.has_floor() {
            // `SeqCst`: the completion's half of the pair with a refill (see
            // `rehome_climbed`).
            self.floor.climbed.fetch_add(bytes, SeqCst);
        }
    }

    /// A request of this pool just completed holding `bytes` in the lowest `levels` pools of
    /// its chain (and, if it stopped below the root, in the floor of the highest of them):
    /// every floored pool whose parent's level it holds counts these bytes as its subtree's
    /// beyond the floor ([`climbed`](State::climbed)). Only now, not level by level on the
    /// way up: a release of completed bytes meanwhile ([`return_climbed`](State::return_climbed))
    /// would otherwise take a request's in-flight level for its own and give it back to the
    /// parent, and the request's own give-back of that level would then count it twice.
    ///
    /// Then each of those floors that has room free re-homes what it can of its climbed bytes
    /// ([`rehome_climbed`](State::rehome_climbed)), and its parent gives them back as a
    /// release would, the wake-ups left in `deferred`. (All are counted first: a give-back
    /// above reads the floors higher up, which must count these bytes already.)
    pub(crate) fn note_climbed(&self, bytes: usize, levels: usize, deferred: &mut Deferred) {
        if !self.floors_in_chain() {
            return;
        }
        for level in 1..levels {
            self.at_level(level - 1).climbed(bytes);
        }
        for level in 1..levels {
            let floored = self.at_level(level - 1);
            // A read-modify-write, not a load: see `rehome_climbed`.
            if floored.has_floor() && floored.floor.free.fetch_add(0, SeqCst) > 0 {
                let rehomed = floored.rehome_climbed();
                if rehomed > 0 {
                    let parent = floored.parent().expect("a pool with a floor has a parent");
                    parent.give_back_completed(rehomed, false, deferred);
                }
            }
        }
    }

    /// Keeps the floor's books canonical: while the floor has room free and its subtree
    /// holds bytes in the parent beyond it (`climbed`), as many of those bytes as there is
    /// room for move into the floor (taken from `free`, no longer climbed). Returns how many
    /// moved, for the parent to give back as completed bytes (with any a retired floor
    /// passes on). Without it the parent would count the floor and those bytes both, more
    /// than the subtree holds (a sibling refused room that is free), until they are released.
    ///
    /// Both can become non-zero together only when a refill and a completion's count race:
    /// a release's `return_climbed` finds a request's bytes not counted as climbed yet and
    /// refills the floor, and the request then counts them. Each side writes its counter
    /// ([`refill_floor`](State::refill_floor), [`climbed`](State::climbed)) and then reads
    /// the other's with a read-modify-write (`fetch_add(0)`; here, and in `note_climbed`),
    /// which reads the latest value and, both being `AcqRel` at least, orders the two: if
    /// the first side's read comes before the second side's write, the first side's write
    /// happens before the second side's read, which then sees it. So whichever reads second
    /// sees both counters non-zero and moves the bytes (plain `SeqCst` loads would do in the
    /// C++ model, but loom checks them as `Acquire`; loom model 41).
    fn rehome_climbed(&self) -> usize {
        let mut moved = 0;
        loop {
            let climbed = self.floor.climbed.fetch_add(0, SeqCst);
            if climbed == 0 {
                return moved;
            }
            let Some(taken) = self.take_floor_part(climbed, 0).filter(|&taken| taken > 0) else {
                return moved;
            };
            let mut climbed = self.floor.climbed.load(SeqCst);
            let less = loop {
                let less = taken.min(climbed);
                match self.floor.climbed.compare_exchange_weak(
                    climbed,
                    climbed - less,
                    SeqCst,
                    SeqCst,
                ) {
                    Ok(_) => break less,
                    Err(actual) => climbed = actual,
                }
            };
            moved += less;
            if less < taken {
                // A release took those climbed bytes up meanwhile: the floor's room goes
                // back (a retired floor's goes on up).
                moved += self.refill_floor(taken - less);
            }
        }
    }

    /// Completed bytes come back here: returns how many of them go on to the parent (what
    /// the subtree held there beyond the floor, first); the rest refill the floor. Without
    /// a floor, all of them go on.
    pub(crate) fn return_climbed(&self, bytes: usize) -> usize {
        if !self.has_floor() {
            return bytes;
        }
        let mut climbed = self.floor.climbed.load(Relaxed);
        let up = loop {
            let up = bytes.min(climbed);
            match self
                .floor
                .climbed
                .compare_exchange_weak(climbed, climbed - up, Relaxed, Relaxed)
            {
                Ok(_) => break up,
                Err(actual) => climbed = actual,
            }
        };
        if up < bytes {
            // The refill releases (pairs with `take_floor`'s `Acquire`: the memory behind
            // these bytes is freed before another request may use them); a retired floor's
            // bytes go on up, and so do those of a completion that counted itself as climbed
            // meanwhile, re-homed into the room this refill made (see `rehome_climbed`).
            let retired = self.refill_floor(bytes - up);
            return up + retired + self.rehome_climbed();
        }
        up
    }

    /// How much of the floor is free, read with a read-modify-write, by a request that just
    /// queued in an ancestor's queue (`Request::climb`). It pairs with a refill's own
    /// read-modify-write of the free bytes (`refill_floor`), after which the refill looks at
    /// that queue's `QUEUED` to wake the subtree's requests there (`wake_floor_waiters`):
    /// either the refill comes first in the free bytes' modification order, and this read
    /// sees its room, or it comes after, and then after the queueing too, which its look
    /// sees. (Two plain loads could each miss the other: loom model 43.)
    pub(crate) fn floor_free_after_queueing(&self) -> usize {
        if self.has_floor() {
            self.floor.free.fetch_add(0, SeqCst)
        } else {
            0
        }
    }

    /// How much of the floor is free now (a hint: `take_floor` decides).
    pub(crate) fn floor_free(&self) -> usize {
        if self.has_floor() {
            self.floor.free.load(Relaxed)
        } else {
            0
        }
    }

    /// The floor got room: the requests of this subtree waiting in an ancestor's queue may
    /// be served by it now, so they are woken (later) to look, and so are those waiting in no
    /// queue: for more of the floor (this pool's room event), or for a place in a full queue
    /// above (that pool's).
    pub(crate) fn wake_floor_waiters(&self, deferred: &mut Deferred) {
        // Requests waiting for more of the floor than it had (see `Request::climb`) listen
        // on this pool's room event.
        deferred.notify(Arc::clone(&self.room));
        let mut origins = None;
        let mut ancestor = self.parent.as_deref();
        // Every ancestor's queue: a request of the subtree may wait several levels up, and
        // takes this floor from there too (`Request::poll_steps`).
        while let Some(pool) = ancestor {
            if pool.word.load().is_queued() {
                let origins = origins.get_or_insert_with(|| {
                    let mut descendants = Vec::new();
                    self.collect_descendants(&mut descendants);
                    Self::origins(self, &descendants)
                });
                lock(&pool.queue)
                    .list
                    .wake_where(|origin| origins.contains(&origin), deferred);
                // And those waiting for a place in its queue, full (in no queue, listening
                // on its room event): the floor may serve them now.
                deferred.notify(Arc::clone(&pool.room));
            }
            ancestor = pool.parent.as_deref();
        }
    }

    /// The floor's size, and how much of it is free (for statistics).
    pub(crate) fn floor_now(&self) -> (usize, usize) {
        if self.floor.retired.load(Relaxed) {
            return (0, 0);
        }
        (self.config.floor, self.floor.free.load(Relaxed))
    }

    // ---- owned allocations ----

    /// One more owned allocation is out: `handle` keeps the pool alive until the last one is
    /// back ([`disown`](State::disown)).
    pub(crate) fn own(&self, handle: impl FnOnce() -> std::sync::Arc<dyn Send + Sync>) {
        let mut owner = lock(&self.owner);
        owner.count += 1;
        if owner.handle.is_none() {
            owner.handle = Some(handle());
        }
    }

    /// An owned allocation is back (its bytes given back already): the handle, if it was
    /// the last, for the caller to drop once it no longer borrows the pool (the drop may run
    /// the pool's).
    #[must_use = "drop the handle once the pool is no longer borrowed"]
    pub(crate) fn disown(&self) -> Option<std::sync::Arc<dyn Send + Sync>> {
        let mut owner = lock(&self.owner);
        owner.count -= 1;
        if owner.count == 0 {
            owner.handle.take()
        } else {
            None
        }
    }

    // ---- allocation memory ----

    /// The memory for `bytes` just reserved: fresh, or a cached block of that size; `None`
    /// if the system allocator has none.
    ///
    /// The cache is the root pool's ([`root`](State::root)), for the whole tree: a cache
    /// lower down would hold memory its ancestors no longer count (a block's bytes go back
    /// at every level when it is released), so the tree could hold more than the root's
    /// budget; at the root, cached blocks count against the budget that caps the whole
    /// tree. So fresh memory for any pool of the tree first makes room in it. A child's
    /// recycler is never idle ([`Recycler::delegating`]): its allocations take the slow
    /// path there.
    #[inline(always)]
    pub(crate) fn memory_for(&self, bytes: usize, zeroed: bool) -> Option<Memory> {
        if self.recycler.is_idle_for(bytes) {
            Memory::fresh(self.config.align, bytes, zeroed)
        } else {
            self.recycled_or_fresh(bytes, zeroed)
        }
    }

    /// The memory when recycling is on for this size or blocks are cached, or for a child.
    #[cold]
    #[inline(never)]
    fn recycled_or_fresh(&self, bytes: usize, zeroed: bool) -> Option<Memory> {
        let keeper = self.root();
        if keeper.recycler.is_idle_for(bytes) {
            return Memory::fresh(self.config.align, bytes, zeroed);
        }
        // The cache holds blocks of the root's alignment: a pool whose blocks need another
        // takes none of them (but still makes room, below).
        if !zeroed && keeper.config.align == self.config.align {
            if let Some(memory) = keeper.recycler.take(bytes, || keeper.footprint()) {
                return Some(memory);
            }
        }
        // Fresh zeroed memory (often untouched pages) is cheaper than zeroing a used block.
        keeper.recycler.make_room(|| keeper.footprint());
        Memory::fresh(self.config.align, bytes, zeroed)
    }

    /// A released block's memory: cached for reuse, or freed. Touches no budget. Called
    /// while the block's bytes are still counted at every level of its chain.
    #[inline(always)]
    pub(crate) fn recycle(&self, memory: Memory) {
        if self.recycler.never_keeps(memory.bytes()) {
            drop(memory);
        } else {
            self.recycle_slow(memory);
        }
    }

    /// [`recycle`](State::recycle) when recycling is on for this size, or for a child.
    #[cold]
    #[inline(never)]
    fn recycle_slow(&self, memory: Memory) {
        let keeper = self.root();
        if keeper.recycler.never_keeps(memory.bytes()) || memory.align() != keeper.config.align {
            drop(memory);
        } else if let Some(memory) = keeper.recycler.put(
            memory,
            || keeper.requests_wait_for_recycler(self.parent.is_some()),
            || keeper.footprint(),
        ) {
            drop(memory);
        }
    }

    /// Whether requests wait in this root's queue, for the recycler (which keeps no block
    /// while they do). `QUEUED` may be stale: a hand-over to the last waiter leaves it set
    /// on the empty queue (see [`hand_over_locked`](State::hand_over_locked)). A root's own
    /// release never gets here with it stale (it goes through
    /// [`release_block_queued`](State::release_block_queued), which clears it, and may hold
    /// the lock when it calls the recycler), but a child's release does, holding no lock of
    /// the root: `may_lock` then, and a set flag that the hand-over marked as maybe stale
    /// (`QueueLock::queued_maybe_stale`) is looked at under the lock (and cleared if stale),
    /// so that a child's block released after the root's last hand-over is cached as on a
    /// root whose queue was never used (found by `tests/s35new_handover.rs`; loom model 46),
    /// while requests that really wait cost a child's release no lock here.
    ///
    /// Ordering: the hint is `Relaxed` on both sides and decides only where a block goes
    /// (cache or allocator), never the budget; the word's `Acquire` load pairs with the
    /// compare-exchanges that set and clear `QUEUED`, as everywhere.
    fn requests_wait_for_recycler(&self, may_lock: bool) -> bool {
        if !self.word.load().is_queued() {
            return false;
        }
        if !may_lock || !self.queue.queued_maybe_stale.load(Relaxed) {
            return true;
        }
        let queue = lock(&self.queue);
        self.queue.queued_maybe_stale.store(false, Relaxed);
        if !queue.list.is_empty() {
            return true;
        }
        self.clear_queued_locked(&queue);
        false
    }

    /// The bytes in use and the budget now, for the recycler's decisions.
    fn footprint(&self) -> Footprint {
        Footprint {
            in_use: self.word.load().in_use(),
            budget: self.budget(),
        }
    }

    // ---- release ----

    /// The budget word, for the last step of a block's release: it is made only of an
    /// atomic, so the release gives its bytes back with [`BudgetWord::try_release`] in its
    /// own frame, after every method of the pool it called has returned (`heap.rs`, rule 4).
    #[inline(always)]
    pub(crate) fn budget_word(&self) -> &BudgetWord {
        &self.word
    }

    /// A block's release of `bytes` of this pool's own level (its ancestors' levels already
    /// given back) that the fast path could not make.
    ///
    /// While requests wait (`QUEUED`), the bytes go back under the queue lock, which the
    /// result still holds: the pool's drop takes the lock once after it sees the bytes back
    /// (`Pool::quiesce`), so it waits for the caller to drop it, without a reference count
    /// (two atomic read-modify-writes saved on every release that serves a waiter). A release
    /// that drains the pool takes a handle on the drain event (not the pool) under the lock,
    /// to notify it later. Without `QUEUED` (drain waiters, or the release counter wraps) the
    /// bytes go back without the lock, so a strong reference is taken first.
    #[cold]
    #[inline(never)]
    pub(crate) fn release_block_slow(
        &self,
        bytes: usize,
        keep_alive: impl FnOnce() -> Arc<State>,
        deferred: &mut Deferred,
    ) -> Released<'_> {
        if !self.word.load().is_queued() {
            let pool = keep_alive();
            pool.release_slow(bytes, true, deferred);
            return Released(Ending::KeptAlive(pool));
        }
        let now = self.clock();
        let mut queue = lock(&self.queue);
        self.settle_locked(bytes, true, &mut queue, deferred, now);
        Released(Ending::Locked(queue))
    }

    /// A root pool's block released while requests wait (`QUEUED` was seen before its memory
    /// was freed): if the head asks for exactly this block's bytes, takes blocks (a root
    /// pool's own allocation) and fits once they are back, it gets the block itself with its
    /// grant: the memory moves from the releaser to the waiter, with no free and no
    /// allocation, and the bytes in use stay as they are. Otherwise the memory is freed (still
    /// before its bytes go back) and the release settles as any other. Either way the bytes go
    /// back under the lock, as in [`release_block_slow`](State::release_block_slow), and the
    /// pool is touched only under it afterwards.
    #[inline]
    pub(crate) fn release_block_queued(
        &self,
        memory: Memory,
        keep_alive: impl FnOnce() -> Arc<State>,
        deferred: &mut Deferred,
    ) -> Released<'_> {
        let bytes = memory.bytes();
        let now = self.clock();
        let mut queue = lock(&self.queue);
        let word = self.word.load();
        // Under the lock with `QUEUED` set, nobody else changes the bytes in use, and the
        // budget changes only under the lock: the fit is exact.
        let fits = || bytes <= self.budget().saturating_sub(word.in_use() - bytes);
        if word.is_queued() && queue.list.front_takes_block(bytes) && fits() {
            self.hand_over_locked(memory, &mut queue, deferred, now);
            return Released(Ending::Locked(queue));
        }
        if queue.list.is_empty() {
            // A stale `QUEUED` (see `hand_over_locked`): cleared first, so that the recycler
            // may keep the block as when nobody waits.
            self.clear_queued_locked(&queue);
        }
        if bytes >= FREE_UNLOCKED_FROM {
            // Freeing a large block may be a system call: not under the lock others wait for.
            // Our bytes are still counted, so the pool stays alive meanwhile.
            drop(queue);
            self.recycle(memory);
            return self.release_block_slow(bytes, keep_alive, deferred);
        }
        // Queued, so the recycler would not keep it: freed.
        self.recycle(memory);
        self.settle_locked(bytes, true, &mut queue, deferred, now);
        Released(Ending::Locked(queue))
    }

    /// With the lock held and `QUEUED` set: the head takes the released block with its bytes
    /// (the caller checked it takes blocks of this size and fits). As
    /// [`settle_locked`](State::settle_locked) for this one case, except that the word does
    /// not change at all: the bytes in use stay as they are, the release is counted under the
    /// lock (`WaitTotals::handed_over`), and `QUEUED` stays set even when the queue is now
    /// empty. Then the requests the head held back that fit in the room there was all along
    /// are served.
    ///
    /// Why `QUEUED` stays: a pool whose requests wait one at a time (the common waiting
    /// pattern) would otherwise clear it here and set it again as the next request queues,
    /// two compare-exchanges (about 10 ns) on every hand-over. Left set on an empty queue, the
    /// flag is stale: it sends fast paths to the lock, where it is recognised and cleared
    /// (see `word.rs`, and [`clear_stale_queued`](State::clear_stale_queued)).
    ///
    /// Skipping the word is sound because nobody else changes it meanwhile in a way that
    /// needs ours: with `QUEUED` set and the lock held, both fast paths refuse and every slow
    /// path waits for the lock; a reclaim stall, which dates progress by the word's release
    /// count, is cleared here under the lock instead; and `stats()`, which adds the count
    /// kept here to the word's, reads both under the lock.
    fn hand_over_locked(
        &self,
        memory: Memory,
        queue: &mut Queue,
        deferred: &mut Deferred,
        now: Option<Stamp>,
    ) {
        let before = queue.list.len();
        let granted = queue.list.hand_front(memory, now, deferred);
        if queue.list.is_empty() {
            // `QUEUED` stays set, stale: say so to a child's release (a plain store, on the
            // line this lock holds).
            self.queue.queued_maybe_stale.store(true, Relaxed);
        }
        let waits = &mut queue.waits;
        waits.handed_over += 1;
        waits.waited += 1;
        waits.total_ticks = waits.total_ticks.saturating_add(granted.total_wait);
        waits.max_ticks = waits.max_ticks.max(granted.max_wait);
        self.note_room(before, queue, deferred);
        if queue.reclaim.stalled.is_some() {
            // The state changed: the head may start a new reclaim round.
            queue.reclaim.stalled = None;
            queue.list.wake_front(deferred);
        }
        let word = self.word.load();
        if queue
            .list
            .front_bytes()
            .is_some_and(|next| word.has_room_for(next, self.budget()))
        {
            self.serve(queue, deferred, now);
        }
    }

    /// A call that does not wait was refused by its fast path: whether one more try may
    /// succeed. The refusal may be due only to a stale `QUEUED` on the root's word (only a
    /// root hands blocks over, so only a root's flag goes stale; see
    /// [`hand_over_locked`](State::hand_over_locked)): set on an empty queue, it is cleared
    /// here under the lock. A flag that is true (requests wait, or a resize is under way)
    /// stays, and the call fails as it must (FIFO). A flag cleared since the fast path looked
    /// (by a release, or by a request that fit in `admit_locked`) is worth a try too.
    ///
    /// `bytes`: what the caller asks; nothing more is done unless they fit the root's free
    /// room (a refusal while requests wait, or for want of room, costs no lock). With floors
    /// on the chain a request may need less of the root than it asks (the floors serve
    /// part), so then it always looks.
    #[cold]
    #[inline(never)]
    pub(crate) fn clear_stale_queued(&self, bytes: usize) -> bool {
        let root = self.root();
        let word = root.word.load();
        let room = self.floors_in_chain() || word.has_room_for(bytes, root.budget());
        if word.is_closed() || !room {
            return false;
        }
        if !word.is_queued() {
            // Cleared since the caller looked (by a release, or a request that fit in
            // `admit_locked`): worth one more try too.
            return true;
        }
        let queue = lock(&root.queue);
        if !queue.list.is_empty() {
            return false;
        }
        root.clear_queued_locked(&queue);
        true
    }

    /// Clears a stale `QUEUED`: the caller holds the lock (`queue`, reached only through it)
    /// and saw the list empty. Set on an empty list under the lock, the flag is stale: a
    /// resize holds the lock throughout, and a request that queues sets it and links its
    /// node under one hold of the lock. Only flag bits other than `QUEUED` change behind our
    /// back (as in [`settle_locked`](State::settle_locked)), which the compare-exchange
    /// retries.
    fn clear_queued_locked(&self, queue: &Queue) {
        debug_assert!(queue.list.is_empty());
        let mut word = self.word.load();
        while word.is_queued() {
            match self.word.compare_exchange(word, word.unqueued()) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    /// A release the fast path could not make: someone waits (for budget or the drain), or
    /// the release counter wraps. `counted`: a release of this pool's own (not bytes of a
    /// descendant's). The caller holds a handle on the pool.
    #[cold]
    fn release_slow(&self, bytes: usize, counted: bool, deferred: &mut Deferred) {
        let mut word = self.word.load();
        loop {
            if word.is_queued() {
                let now = self.clock();
                let mut queue = lock(&self.queue);
                self.settle_locked(bytes, counted, &mut queue, deferred, now);
                return;
            }
            let (next, wrapped) = word.settled(bytes, counted, 0, false);
            match self.word.compare_exchange(word, next) {
                Ok(_) => {
                    if wrapped {
                        self.counters.releases_wrapped();
                    }
                    if word.drains_into(next) {
                        deferred.notify(Arc::clone(&self.drained));
                    }
                    return;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// With the lock held: gives `released` bytes back (counting a release if `counted`),
    /// grants the head of the queue its bytes for as long as they fit, in order, and clears
    /// `QUEUED` once the queue is empty, all in one compare-exchange of the word. Called
    /// whenever budget may have come free or the head changed. The wake-ups it owes, and the
    /// drain notification if it left nothing in use while someone waits for that, go to
    /// `deferred`; `now` is when the grants count as made.
    ///
    /// While the queue is not empty (or a resize holds it) `QUEUED` is set, and while it is
    /// set and the lock is held nobody else adds or removes bytes in use (both fast paths
    /// refuse, and the slow ones need the lock): the room computed here is exact. Only the
    /// flag bits may change behind our back, which the compare-exchange retries.
    fn settle_locked(
        &self,
        released: usize,
        counted: bool,
        queue: &mut Queue,
        deferred: &mut Deferred,
        now: Option<Stamp>,
    ) {
        let budget = self.budget();
        let start = self.word.load();
        let before = queue.list.len();
        // Our `released` bytes are still counted, so this cannot underflow.
        let mut in_use = start.in_use() - released;
        let mut drained = false;
        let granted = queue.list.grant_front(
            |bytes| {
                let fits = bytes <= budget.saturating_sub(in_use);
                if fits {
                    in_use += bytes;
                }
                fits
            },
            |granted, now_empty| {
                let mut word = start;
                if released == 0 && granted == 0 && !(now_empty && word.is_queued()) {
                    return;
                }
                loop {
                    let (next, wrapped) = word.settled(released, counted, granted, now_empty);
                    match self.word.compare_exchange(word, next) {
                        Ok(_) => {
                            if wrapped {
                                self.counters.releases_wrapped();
                            }
                            if granted > 0 {
                                self.note_in_use(next.in_use());
                            }
                            drained = word.drains_into(next);
                            return;
                        }
                        Err(actual) => word = actual,
                    }
                }
            },
            now,
            deferred,
        );
        if drained {
            // Still under the lock, so the pool is alive (its drop takes the lock first).
            deferred.notify(Arc::clone(&self.drained));
        }
        if granted.count > 0 {
            let waits = &mut queue.waits;
            // Allocations once their owners take them (`Counters::grant_taken`): until then
            // in use, but not outstanding.
            waits.waited += granted.count;
            waits.total_ticks = waits.total_ticks.saturating_add(granted.total_wait);
            waits.max_ticks = waits.max_ticks.max(granted.max_wait);
        }
        self.note_room(before, queue, deferred);
        if released > 0 && queue.reclaim.stalled.is_some() {
            // The state changed: the head may start a new reclaim round.
            queue.reclaim.stalled = None;
            queue.list.wake_front(deferred);
        }
    }

    /// Under the lock, after waiters left the queue (`before` of them were there): if a full
    /// queue got room, the requests waiting for a place are notified (later). Free for a pool
    /// without `max_waiters`.
    #[inline]
    fn note_room(&self, before: usize, queue: &Queue, deferred: &mut Deferred) {
        let max = self.config.max_waiters;
        if before >= max && queue.list.len() < max {
            deferred.notify(Arc::clone(&self.room));
        }
    }

    /// The event notified when a full queue gets room (see [`Admission::Full`]).
    pub(crate) fn room(&self) -> &Event {
        &self.room
    }

    /// [`settle_locked`](State::settle_locked) with nothing given back: serves whoever fits
    /// now. Never empties the pool, so never has drain waiters to notify.
    fn serve(&self, queue: &mut Queue, deferred: &mut Deferred, now: Option<Stamp>) {
        self.settle_locked(0, false, queue, deferred, now);
    }

    /// The time for the wait statistics, if they are kept.
    #[inline]
    fn clock(&self) -> Option<Stamp> {
        self.config.time_waits.then(Stamp::now)
    }

    // ---- reclaim ----

    /// Registers a reclaimer here; returns its id. Counted in the scope of this pool and every
    /// ancestor.
    ///
    /// Runs no user code: the caller wraps the id in its handle first, then calls
    /// [`announce_registration`](State::announce_registration) (whose wake-ups may panic:
    /// the handle's drop then unregisters).
    pub(crate) fn register_reclaimer(
        &self,
        name: std::sync::Arc<str>,
        priority: u32,
        reclaimer: std::sync::Arc<dyn Reclaimer>,
    ) -> u64 {
        let id = self.registry.add(name, priority, reclaimer);
        let mut level = Some(self);
        while let Some(pool) = level {
            pool.reclaimers_in_scope.fetch_add(1, Relaxed);
            level = pool.parent.as_deref();
        }
        id
    }

    /// A reclaimer was registered here: this pool and every ancestor get a new generation
    /// (a stalled pool may start a round again), and the head of each queue is woken (the
    /// new reclaimer alone may serve it).
    pub(crate) fn announce_registration(&self) {
        settle(|deferred| {
            let mut level = Some(self);
            while let Some(pool) = level {
                let mut queue = lock(&pool.queue);
                queue.reclaim.generation += 1;
                queue.reclaim.stalled = None;
                queue.list.wake_front(deferred);
                drop(queue);
                deferred.notify(Arc::clone(&pool.pressure));
                level = pool.parent.as_deref();
            }
        });
    }

    /// Takes the registration `id` out, if it is still registered, and uncounts it from the
    /// scopes; returns it for the caller to drop (user code) outside every lock.
    pub(crate) fn unregister_reclaimer(&self, id: u64) -> Option<std::sync::Arc<Registration>> {
        let registration = self.registry.remove(id)?;
        self.uncount_reclaimers(1);
        Some(registration)
    }

    /// Takes every registration out (the pool's handle is being dropped), for the caller to
    /// drop outside every lock.
    pub(crate) fn unregister_all(&self) -> Vec<std::sync::Arc<Registration>> {
        let all = self.registry.take_all();
        self.uncount_reclaimers(all.len());
        all
    }

    fn uncount_reclaimers(&self, count: usize) {
        if count == 0 {
            return;
        }
        let mut level = Some(self);
        while let Some(pool) = level {
            pool.reclaimers_in_scope.fetch_sub(count, Relaxed);
            level = pool.parent.as_deref();
        }
    }

    /// Whether any reclaimer is registered here or in a descendant (a hint: a round reads
    /// the registrations themselves).
    #[inline]
    pub(crate) fn reclaim_in_scope(&self) -> bool {
        self.reclaimers_in_scope.load(Relaxed) > 0
    }

    /// This pool's registrations, for reports.
    pub(crate) fn registrations(&self) -> Vec<std::sync::Arc<Registration>> {
        let mut all = Vec::new();
        self.registry.snapshot(&mut all);
        all
    }

    /// The pool now, as `reclaim_ahead` compares it (see [`Picture`]).
    pub(crate) fn picture(&self) -> Picture {
        let generation = lock(&self.queue).reclaim.generation;
        Picture {
            generation,
            stall: self.stall_now(),
        }
    }

    /// The pool as a stall sees it.
    fn stall_now(&self) -> Stall {
        let word = self.word.load();
        Stall {
            releases: self.counters.releases_now(word),
            in_use: word.in_use(),
        }
    }

    /// Starts a reclaim round for this pool if one is wanted and allowed: none in flight, the
    /// pool not stalled by a round that changed nothing since, and something short (see
    /// [`Shortfall`]). Marks it in flight; the caller must end it with
    /// [`end_round`](State::end_round), whatever happens.
    pub(crate) fn begin_round(&self, short: Shortfall) -> Option<RoundStart> {
        let (shortfall, cap) = {
            let mut queue = lock(&self.queue);
            let books = &queue.reclaim;
            if books.in_flight || self.word.load().is_closed() {
                return None;
            }
            if books
                .stalled
                .is_some_and(|stall| stall.holds(self.stall_now()))
            {
                return None;
            }
            let in_use = self.word.load().in_use();
            let (shortfall, cap) = match short {
                Shortfall::Head => {
                    let head = queue.list.front_bytes()?;
                    (self.short_of(head, in_use), head)
                }
                Shortfall::LowWater(low_water) => {
                    let short = self.short_of(low_water, in_use);
                    (short, short)
                }
                // Never more than the waiting request needs of the floor.
                Shortfall::Floor(need) => {
                    let short = need.saturating_sub(self.floor_free());
                    (short, short)
                }
            };
            if shortfall == 0 {
                return None;
            }
            let head = queue.list.front_id();
            let books = &mut queue.reclaim;
            books.in_flight = true;
            books.stalled = None;
            books.round_generation = books.generation;
            books.round_start = Some(self.stall_now());
            books.round_head = head;
            books.round_for = short;
            (shortfall, cap)
        };
        let mut registrations = Vec::new();
        self.registry.snapshot(&mut registrations);
        let mut descendants = Vec::new();
        self.collect_descendants(&mut descendants);
        for pool in &descendants {
            pool.registry.snapshot(&mut registrations);
        }
        Some(RoundStart {
            registrations,
            shortfall,
            cap,
        })
    }

    /// Parks the round in flight between its driver's polls.
    pub(crate) fn park_round(&self, round: Box<Round>) {
        lock(&self.queue).reclaim.parked = Some(round);
    }

    /// What the round in flight is still short of now, by the pool's own books rather than
    /// the reclaimers' reports: for a waiting request's round, what the request it started
    /// for needs beyond the free room while it still heads the queue (nothing once it left
    /// the head: served, or gone); for `reclaim_ahead`'s, what keeps the free room below its
    /// low water; for a request waiting for the floor, what the floor still lacks of what
    /// it needs (its driver ends the round once it no longer waits for the floor). A round
    /// goes on while this is not zero: bytes a reclaimer frees elsewhere (into a
    /// descendant's floor, say) do not help this pool's waiter, and a report does not make
    /// them.
    pub(crate) fn round_still_short(&self) -> usize {
        let queue = lock(&self.queue);
        let in_use = self.word.load().in_use();
        match queue.reclaim.round_for {
            Shortfall::LowWater(low_water) => self.short_of(low_water, in_use),
            Shortfall::Floor(need) => need.saturating_sub(self.floor_free()),
            Shortfall::Head if queue.list.front_id() != queue.reclaim.round_head => 0,
            Shortfall::Head => queue
                .list
                .front_bytes()
                .map_or(0, |head| self.short_of(head, in_use)),
        }
    }

    /// What keeps `want` bytes from being free: beyond the free room, and with the pool
    /// overcommitted (in use above its budget, `Reservation::force_grow`), the overcommit
    /// too, which releases repay before anything is granted.
    fn short_of(&self, want: usize, in_use: usize) -> usize {
        want.saturating_add(in_use).saturating_sub(self.budget())
    }

    /// Takes the parked round back, to poll it (or end it) outside the lock.
    pub(crate) fn take_round(&self) -> Option<Box<Round>> {
        lock(&self.queue).reclaim.parked.take()
    }

    /// Ends the round in flight: counts it, and if it freed nothing by the pool's books (no
    /// release has reached the pool since it started, as a stall sees it, and a waiting
    /// request's round still has the same head) and nothing registered or resized since,
    /// stalls the pool until it changes. Otherwise it wakes the
    /// head of the queue, which may start the next round (waiters that found this one in
    /// flight started none): a round that freed part of its shortfall (a cache that gives
    /// back one entry per call, or the repayment of an overcommit) is followed by another,
    /// which asks the reclaimers again.
    ///
    /// A round for the floor also notifies the pool's room event, where the requests
    /// waiting for the floor listen: one that found this round in flight may start the next.
    ///
    /// The user code it owes (the head's wake-up, `reclaim_ahead`'s notification) goes to
    /// `deferred`: a caller that holds bytes a panic would strand runs it with
    /// `Deferred::run_or_undo`.
    pub(crate) fn end_round(&self, outcome: Outcome, deferred: &mut Deferred) {
        let mut for_floor = false;
        {
            let mut queue = lock(&self.queue);
            let now = self.stall_now();
            // A waiting request's round whose head left the queue (served: by a hand-over
            // too, which a stall's picture does not see) made progress.
            let head_left = matches!(queue.reclaim.round_for, Shortfall::Head)
                && queue.list.front_id() != queue.reclaim.round_head;
            let books = &mut queue.reclaim;
            let no_progress = !head_left
                && books
                    .round_start
                    .take()
                    .is_some_and(|start| start.holds(now));
            books.in_flight = false;
            books.rounds += 1;
            books.asked_bytes = books.asked_bytes.saturating_add(outcome.asked);
            books.reclaimed_bytes = books.reclaimed_bytes.saturating_add(outcome.freed);
            books.nanos = books.nanos.saturating_add(outcome.nanos);
            if outcome.finished && no_progress && books.generation == books.round_generation {
                books.stalled = Some(now);
            } else {
                // The waiters that found this round in flight did not start their own: the
                // head looks again now (served by what the round freed, or still short and
                // free to start the next round).
                for_floor = matches!(queue.reclaim.round_for, Shortfall::Floor(_));
                queue.list.wake_front(deferred);
            }
        }
        if for_floor {
            deferred.notify(Arc::clone(&self.room));
        }
        // A `reclaim_ahead` that found this round in flight looks again.
        deferred.notify(Arc::clone(&self.pressure));
    }

    /// The free room: the budget less the bytes in use (0 when over budget).
    pub(crate) fn room_now(&self) -> usize {
        self.budget().saturating_sub(self.word.load().in_use())
    }

    /// Arms `reclaim_ahead`'s notification: from now on, a reservation that leaves the free
    /// room below `low_water` notifies [`pressure`](State::pressure). The caller listens to
    /// it, then calls [`publish_pressure_mark`](State::publish_pressure_mark), then looks.
    pub(crate) fn arm_pressure(&self, low_water: usize) {
        let mark = self.budget().saturating_sub(low_water);
        self.pressure_mark.fetch_min(mark, Relaxed);
    }

    /// After [`arm_pressure`](State::arm_pressure) and listening, before looking at the
    /// room: a read-modify-write of the budget word (`BudgetWord::load_publishing`) that
    /// pairs with every reservation's compare-exchange on it. A reservation ordered after
    /// it sees the mark (its `Relaxed` look in `check_pressure`) and notifies the listener
    /// taken before it; one ordered before it is in what the caller then sees.
    pub(crate) fn publish_pressure_mark(&self) {
        self.word.load_publishing();
    }

    /// The event `reclaim_ahead` sleeps on.
    pub(crate) fn pressure(&self) -> &Event {
        &self.pressure
    }

    /// Whether a `reclaim_ahead` low-water mark is set on this pool or an ancestor: then a
    /// reservation that grew, or a refusal, owes [`check_pressure`](State::check_pressure).
    /// Buffer allocations do not check it as they succeed: even a never-taken call after the
    /// block is built made `try_allocate` half again slower (21 -> 31-33 ns on an AMD EPYC,
    /// criterion, with no change in instruction count: the block kept across the call), so a
    /// `reclaim_ahead` hears of allocations at the next refusal, reservation or wait.
    #[inline(always)]
    pub(crate) fn pressure_armed(&self) -> bool {
        let mut level = Some(self);
        while let Some(pool) = level {
            if pool.pressure_mark.load(Relaxed) != usize::MAX {
                return true;
            }
            level = pool.parent.as_deref();
        }
        false
    }

    /// After bytes were reserved in this pool's chain, by a caller that may run user code
    /// now (the bytes are already recorded in what it returns, so a panic here gives them
    /// back): notifies a sleeping `reclaim_ahead` of any level whose free room fell below its
    /// low-water mark.
    #[cold]
    #[inline(never)]
    pub(crate) fn check_pressure(&self) {
        let mut level = Some(self);
        while let Some(pool) = level {
            let mark = pool.pressure_mark.load(Relaxed);
            if mark != usize::MAX && pool.word.load().in_use() > mark {
                pool.pressure.notify(usize::MAX);
            }
            level = pool.parent.as_deref();
        }
        // A `reclaim_ahead`'s waker woken in there runs now (see `deferred::poll_listener`).
        deferred::run_listener_wakes();
    }

    // ---- close, resize, drain ----

    /// Closes the pool and every descendant: every waiter of the subtree fails with `Closed`,
    /// wherever it waits, and so does every later reservation.
    ///
    /// Every pool of the subtree is closed (and its own queue failed) first; then, in each
    /// ancestor's queue, the subtree's requests fail before the room they leave is served, so
    /// that room only goes to requests of pools still open. (A request between two levels
    /// finds its pool closed when it tries to queue at the next one: see `admit`.)
    pub(crate) fn close(&self) {
        settle(|deferred| {
            self.fail_waiters(|_, _| Some(Failure::Closed), || self.word.close(), deferred);
            // Each pool's children are read only once it is closed: a child being built
            // meanwhile is either registered in time to be found here, or sees its parent
            // closed when it registers (`adopt`; the children's lock orders the two), at
            // every depth.
            let mut descendants: Vec<Arc<State>> = Vec::new();
            let mut unread = lock(&self.children).clone();
            while let Some(pool) = unread.pop() {
                pool.fail_waiters(|_, _| Some(Failure::Closed), || pool.word.close(), deferred);
                unread.extend(lock(&pool.children).iter().cloned());
                descendants.push(pool);
            }
            let origins = Self::origins(self, &descendants);
            self.fail_in_ancestors(
                |_, from| origins.contains(&from).then_some(Failure::Closed),
                deferred,
            );
            // A `reclaim_ahead` of the subtree ends.
            deferred.notify(Arc::clone(&self.pressure));
            for pool in &descendants {
                deferred.notify(Arc::clone(&pool.pressure));
            }
            // Requests of the subtree that wait for a place in a full queue above (in no
            // queue) look again, and fail.
            self.notify_rooms_above(deferred);
            for pool in &descendants {
                deferred.notify(Arc::clone(&pool.room));
            }
            deferred.notify(Arc::clone(&self.room));
        });
    }

    /// Notifies the room event of every ancestor: the requests of this subtree that wait
    /// for a place in a full queue there (`max_waiters`) wait in no queue, so a close or a
    /// shrink that must fail them wakes them this way, and they look again.
    fn notify_rooms_above(&self, deferred: &mut Deferred) {
        let mut ancestor = self.parent.as_deref();
        while let Some(pool) = ancestor {
            deferred.notify(Arc::clone(&pool.room));
            ancestor = pool.parent.as_deref();
        }
    }

    /// The origins (see [`origin`](State::origin)) of `pool` and `descendants`.
    fn origins(pool: &State, descendants: &[Arc<State>]) -> Vec<usize> {
        let mut origins = Vec::with_capacity(descendants.len() + 1);
        origins.push(pool.origin());
        origins.extend(descendants.iter().map(|pool| pool.origin()));
        origins
    }

    /// In every ancestor's queue, fails the waiters `fails` picks and serves the room they
    /// leave.
    fn fail_in_ancestors(
        &self,
        fails: impl Fn(usize, usize) -> Option<Failure>,
        deferred: &mut Deferred,
    ) {
        let mut ancestor = self.parent.as_deref();
        while let Some(pool) = ancestor {
            pool.fail_waiters(&fails, || {}, deferred);
            ancestor = pool.parent.as_deref();
        }
    }

    /// Every live descendant, children before their parents. (Each registry is copied out
    /// of its lock: no two registry locks are held at once.)
    /// A loop, not a recursion: a chain of `MAX_DEPTH` pools fits any thread's stack.
    pub(crate) fn collect_descendants(&self, into: &mut Vec<Arc<State>>) {
        let start = into.len();
        let mut unread = lock(&self.children).clone();
        while let Some(pool) = unread.pop() {
            unread.extend(lock(&pool.children).iter().cloned());
            into.push(pool);
        }
        // Each pool went in before its descendants: reversed, children come first.
        into[start..].reverse();
    }

    /// Under the lock: runs `first`, fails every waiter `fails` picks, and serves the ones
    /// that fit now (timed like every other grant).
    fn fail_waiters(
        &self,
        fails: impl Fn(usize, usize) -> Option<Failure>,
        first: impl FnOnce(),
        deferred: &mut Deferred,
    ) {
        let now = self.clock();
        let mut queue = lock(&self.queue);
        let before = queue.list.len();
        first();
        queue.list.fail_where(fails, deferred);
        self.serve(&mut queue, deferred, now);
        self.note_room(before, &queue, deferred);
    }

    /// Changes the budget to `max_memory`; see [`resize`](State::resize).
    pub(crate) fn set_max_memory(&self, max_memory: usize) {
        self.resize(|_| (max_memory, ()));
    }

    /// Changes the budget to what `change` makes of the budget now (it runs under the lock,
    /// with the bytes in use stable, so changes by a delta compose): requests that can never
    /// fit the new one fail with `ExceedsBudget` wherever they wait (in this pool's queue,
    /// or, for requests of this pool and its descendants, in an ancestor's), unless the pool
    /// waits for growth; those that fit now are served in order, and cached blocks are freed
    /// until the footprint fits. Returns what `change` returned beside the new budget.
    ///
    /// Every reservation that succeeds after this returns is checked against the new budget.
    /// The budget is stored under the lock, after [`BudgetWord::begin_resize`] set `QUEUED`
    /// and counted one on the word: a fast-path compare-exchange that read the word before
    /// that fails (the word changed, and does not change back) and reloads the budget; one
    /// that reads it while `QUEUED` is set goes to the lock; and the compare-exchange that
    /// clears `QUEUED` again (in `serve`, after the store) publishes the new budget to every
    /// fast path that reads the cleared word. A request between two levels of a chain,
    /// queued in no list while the walk passes, is checked against this budget when it
    /// queues at the next level (`admit`), under that level's lock, which the walk takes
    /// after the store.
    pub(crate) fn resize<R>(&self, change: impl FnOnce(Budget) -> (usize, R)) -> R {
        settle(|deferred| {
            let now = self.clock();
            let (cap, result) = {
                let mut queue = lock(&self.queue);
                // Counted under the lock, as `stats` reads the word: the resize's count on
                // the word's allocation counter is never seen without its correction.
                if self.word.begin_resize() {
                    self.counters.allocations_wrapped();
                }
                queue.waits.resizes += 1;
                queue.reclaim.generation += 1;
                // A stalled pool's head looks again (below), even if the resize alone does not
                // serve it: a round may cover it now.
                let was_stalled = queue.reclaim.stalled.take().is_some();
                let before = queue.list.len();
                // `QUEUED` is set and we hold the lock: the bytes in use stay as they are.
                let (max_memory, result) = change(Budget {
                    max_memory: self.max_memory.load(Relaxed),
                    budget: self.budget(),
                    in_use: self.word.load().in_use(),
                });
                self.max_memory.store(max_memory, Relaxed);
                self.budget.store(counted_budget(max_memory), Relaxed);
                if !self.config.grows {
                    self.hard_cap.store(counted_budget(max_memory), Relaxed);
                }
                let cap = self.hard_cap();
                queue.list.fail_where(
                    |bytes, _| (bytes > cap).then_some(Failure::ExceedsBudget { max_memory: cap }),
                    deferred,
                );
                // Clears `QUEUED` unless requests still wait.
                self.serve(&mut queue, deferred, now);
                if was_stalled {
                    queue.list.wake_front(deferred);
                }
                self.note_room(before, &queue, deferred);
                (cap, result)
            };
            let mut descendants = Vec::new();
            self.collect_descendants(&mut descendants);
            // Requests of the subtree waiting for more of a floor than it has (in no queue,
            // listening on the floored pool's room event, see `Request::climb`): what they
            // need of it depends on the caps above, so they look again.
            let floored = core::iter::once(self).chain(descendants.iter().map(|pool| &**pool));
            let mut floors_below = false;
            for pool in floored.filter(|pool| pool.has_floor()) {
                floors_below = true;
                deferred.notify(Arc::clone(&pool.room));
            }
            // Requests waiting in a descendant's own queue must hold their bytes (what of
            // them still climbs) here too: those above the new cap can never be served, as
            // at the call (a request above the smallest cap of its chain is refused, floors
            // or not), and would keep their place at the head of that queue, holding back
            // the requests behind them that fit. They fail now, and each queue serves the
            // room they leave. (A pool that waits for growth keeps its cap: none fails.)
            for below in &descendants {
                if below.word.load().is_queued() {
                    below.fail_waiters(
                        |bytes, _| {
                            (bytes > cap).then_some(Failure::ExceedsBudget { max_memory: cap })
                        },
                        || {},
                        deferred,
                    );
                }
            }
            let origins = Self::origins(self, &descendants);
            if self.parent.is_some() {
                self.fail_in_ancestors(
                    |bytes, from| {
                        (bytes > cap && origins.contains(&from))
                            .then_some(Failure::ExceedsBudget { max_memory: cap })
                    },
                    deferred,
                );
                // And those waiting for a place above, in no queue.
                self.notify_rooms_above(deferred);
            }
            if floors_below || self.floors_in_chain() {
                // A queue sees only what a request still needs beyond the floors it took:
                // the subtree's requests waiting here or above look again, and fail (or
                // start again) if the new budget leaves them unable to be served
                // (`Request::poll_steps`).
                let mut pool = Some(self);
                while let Some(level) = pool {
                    if level.word.load().is_queued() {
                        lock(&level.queue)
                            .list
                            .wake_where(|origin| origins.contains(&origin), deferred);
                    }
                    pool = level.parent.as_deref();
                }
            }
            // A sleeping `reclaim_ahead` looks at the new room.
            deferred.notify(Arc::clone(&self.pressure));
            // After the budget store: a block cached under the old budget is seen here, and
            // one cached later was checked against the new budget (the cache's lock orders
            // the two).
            self.recycler.trim(|| self.footprint());
            result
        })
    }

    /// Whether the pool waits for growth (`BufPoolBuilder::wait_for_growth`).
    pub(crate) fn grows(&self) -> bool {
        self.config.grows
    }

    /// Whether nothing is in use: `Acquire`, pairing with the last release's `Release`.
    pub(crate) fn is_drained(&self) -> bool {
        self.word.is_drained()
    }

    /// Waits for every release still finishing under the queue lock: a release that gave its
    /// bytes back under the lock still holds it until it is done with the pool
    /// (`release_block_slow`), so taking the lock once waits for it.
    pub(crate) fn quiesce(&self) {
        drop(lock(&self.queue));
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.word.load().is_closed()
    }

    /// Whether requests wait in the queue now (a hint: it may change at once).
    #[inline(always)]
    pub(crate) fn is_queued(&self) -> bool {
        self.word.load().is_queued()
    }

    /// Whether nothing is in use; otherwise makes sure the release that gets there notifies
    /// the drain event. Call after listening to it.
    pub(crate) fn drained_or_announce(&self) -> bool {
        self.word.announce_drain()
    }

    pub(crate) fn drain_event(&self) -> &Event {
        &self.drained
    }

    #[inline(always)]
    pub(crate) fn budget(&self) -> usize {
        self.budget.load(Relaxed)
    }

    // ---- statistics ----

    /// Counts a `try_allocate` that found no room, and says so.
    #[cold]
    #[inline(never)]
    pub(crate) fn would_block(&self) -> AllocError {
        self.counters.would_block();
        // A refusal is the moment a `reclaim_ahead` of this chain must hear of (buffer
        // allocations do not notify it as they succeed: see `pressure_armed`). Nothing is
        // held here, so its waker may run.
        if self.pressure_armed() {
            self.check_pressure();
        }
        AllocError::WouldBlock
    }

    /// Counts a request refused because the queue is full, and says so.
    #[cold]
    fn queue_full(&self) -> AllocError {
        self.counters.queue_full();
        AllocError::QueueFull
    }

    /// Counts a timed call that gave up, and says so.
    #[cold]
    pub(crate) fn timed_out(&self) -> AllocError {
        self.counters.timed_out();
        AllocError::TimedOut
    }

    pub(crate) fn stats(&self) -> PoolStats {
        // The word is read under the lock, like the wait totals: a resize counts on the
        // word's allocation counter and in `waits.resizes` under it.
        let cached_bytes = self.recycler.cached_bytes();
        let mut queue = lock(&self.queue);
        let waits = queue.waits;
        let waiting = queue.list.len();
        let stats = self.counters.assemble(
            || self.word.load(),
            Sources {
                name: self.config.name.clone(),
                waits,
                waiting,
                max_memory: self.max_memory.load(Relaxed),
                budget: self.budget(),
                buffer_size: self.config.buffer_size.bytes(),
                peak_in_use: self.peak_in_use.load(Relaxed),
                reserved_bytes: self.reserved.load(Relaxed),
                cached_bytes,
                reclaim: (
                    queue.reclaim.rounds,
                    queue.reclaim.asked_bytes,
                    queue.reclaim.reclaimed_bytes,
                    queue.reclaim.nanos,
                ),
            },
        );
        // Under the same lock as the counts they go with (see `WaitTotals::reported_wait`).
        queue.waits.reported_wait = [stats.total_wait, stats.max_wait];
        queue.waits.reported_ticks = waits.total_ticks;
        stats
    }
}
