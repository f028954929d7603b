//! A soak harness: chaotic mixed load on fresh trees of pools, checked continuously.
//!
//! ```text
//! cargo run --release --example soak -- --secs 30
//! ```
//!
//! Each epoch builds a fresh tree of pools: a root with a random buffer size and budget, two or
//! three child pools and some grandchildren, each with its own buffer size and budget (some
//! above their parent's). Tokio tasks and blocking threads then hammer random pools of the
//! tree with random sizes through every call form (async, blocking, timeout, try, zeroed), and
//! with reservations (`reserve` in every form, `try_grow`, `grow` under a timeout, `shrink`,
//! `split`, `merge`, `Reservation::allocate`), holding up to a few items each; random
//! cancellations (`tokio::time::timeout`, `select!`, dropping a future after one poll) and
//! random resizes of random pools. Three times an epoch the workers park at a checkpoint
//! (once nobody waits and every worker is parked, the pools are quiescent); at the end the
//! root is closed (closing the whole tree) and drained.
//!
//! Throughout, for every pool: the bytes the workers hold in its subtree (allocations and
//! reservations) never exceed its budget, nor does its `in_use_bytes`, and no wait outlasts a
//! watchdog bound. At each checkpoint, for every pool: `in_use_bytes` is exactly what the
//! workers hold in its subtree, `reserved_bytes` and `outstanding` what they hold in it,
//! `waiting` is 0, and `report()` agrees. At the end of every epoch, every pool is back to
//! zero. It prints the operation counts, the waits and the longest one.
//!
//! # Reclaiming caches
//!
//! Every epoch also runs two caches, each registered as a `Reclaimer` (at a random priority)
//! on a pool of the tree (the first on the root or a child, the second on any pool). Workers
//! put some of what they get into the cache of that pool (an allocation or a reservation, up
//! to the cache's capacity) instead of holding it; the cache keeps it, counted in the pool's
//! books like the workers' items, until a reclaim round asks for it back. Asked for `target`
//! bytes, a cache gives back (by dropping entries, oldest first) about that much, half of it,
//! twice it, everything or nothing, at random; at once, or from a future that yields once or
//! more and then drops a batch it took, or drops one entry per poll. Now and then a cache
//! re-registers itself from inside its `reclaim`, and the coordinator drops registrations and
//! makes them again during the epoch. Half the epochs also run a `reclaim_ahead` on one cache's
//! pool, dropped and made again every few milliseconds (and at every checkpoint). The
//! checkpoints count the caches' entries as live memory (and check each pool's report lists
//! its registered caches with their estimates); a checkpoint that has to shed makes the caches
//! shed too; the root's close empties them. At the end of every epoch, the bytes the caches'
//! futures reported freed equal the pools' `reclaimed_bytes` added up. With `--faults`, a
//! cache's `reclaim` or its future's poll also panics at the fault rate: the pool passes the
//! panic on to the poll of the request that drove the round, where it is caught and counted
//! like an injected waker panic.
//!
//! A worker never waits without bound while it holds anything (it would deadlock with
//! another doing the same): while it holds something it uses the try and timeout forms, and
//! grows a reservation with `try_grow` or `grow` under a timeout.
//!
//! # Fault injection
//!
//! ```text
//! cargo run --release --example soak -- --secs 30 --faults [--fault-rate 0.01]
//! ```
//!
//! `--faults` (or `--fault-rate R`, 0 to 1, default 0.01) adds hostile workers, two threads
//! and four tasks, that drive their requests by hand: `allocate`, `allocate_zeroed`,
//! `reserve` and `Reservation::grow` futures on random pools of the tree (child pools
//! included), each pinned and polled with a waker of their own whose `clone`, `wake`,
//! `wake_by_ref` and `drop` panic at the rate `R` (a `wake` that panics forwards the wake-up
//! first half the time, and loses it otherwise; the hostile workers poll again every half
//! millisecond, so a lost wake-up only delays them). They hold what they get, like the other
//! workers, and park at the checkpoints. Such a panic surfaces wherever the pool runs the
//! waker: in a hostile poll or drop of a request, and in any release that wakes a hostile
//! waiter (dropping an allocation or a reservation, `shrink`, a cancelled or timed-out
//! request of any worker, `set_max_memory`, `close`). Every one of those is run under
//! `catch_unwind` in this mode, and counted by where it was caught; a panic that was not
//! injected fails the run. A waker never panics while its thread is already unwinding (that
//! would abort the process), nor for the harness's own handles of it. Every check above still
//! holds; in addition each epoch's teardown (close, drain, joins, pool drops) must end within
//! 30 s, or the run fails naming the step (the pool being dropped). The summary adds the
//! injected panics by kind and where they were caught.

use std::any::Any;
use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PoolReport, Reclaimer,
    ReclaimerHandle, Reservation,
};

/// No single wait may take longer than this; a longer one is reported as a hang.
const WAIT_BOUND: Duration = Duration::from_secs(10);
const EPOCH: Duration = Duration::from_secs(2);
const TASKS: usize = 24;
const THREADS: usize = 4;
const WORKERS: usize = TASKS + THREADS;
/// Quiescent checkpoints per epoch, evenly spread.
const CHECKPOINTS: u32 = 3;
/// The most items (allocations and reservations) a worker holds at once.
const MAX_HELD: usize = 3;
/// With `--faults`: the hostile workers, which drive their requests by hand.
const HOSTILE_TASKS: usize = 4;
const HOSTILE_THREADS: usize = 2;
/// With `--faults`: an epoch's teardown (close, drain, joins, pool drops) must end within this.
const TEARDOWN_BOUND: Duration = Duration::from_secs(30);
/// Reclaiming caches per epoch.
const CACHES: usize = 2;
/// The priorities a cache registers with.
const PRIORITIES: [u32; 4] = [0, 1, 5, 10];

#[derive(Default)]
struct Counters {
    allocations: AtomicU64,
    waits: AtomicU64,
    would_block: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    closed: AtomicU64,
    exceeded: AtomicU64,
    resizes: AtomicU64,
    epochs: AtomicU64,
    pools: AtomicU64,
    max_wait_micros: AtomicU64,
    reservations: AtomicU64,
    grows: AtomicU64,
    shrinks: AtomicU64,
    splits: AtomicU64,
    merges: AtomicU64,
    merges_refused: AtomicU64,
    allocations_from_reservations: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_sheds: AtomicU64,
    checked_allocations: AtomicU64,
    checked_reserved_bytes: AtomicU64,
    /// Items workers put into caches, and their bytes.
    stashed: AtomicU64,
    stashed_bytes: AtomicU64,
    /// Calls of a cache's `reclaim`: giving back at once, from a future after yields (a batch
    /// taken at the call), or one entry per poll.
    reclaim_now: AtomicU64,
    reclaim_batch: AtomicU64,
    reclaim_trickle: AtomicU64,
    /// Bytes the caches' futures reported freed.
    cache_reported: AtomicU64,
    /// Registrations made by the coordinator, dropped by it, and made again by a cache inside
    /// its own `reclaim`.
    registrations: AtomicU64,
    unregistrations: AtomicU64,
    self_registrations: AtomicU64,
    /// `reclaim_ahead` futures run (each for a slice of time).
    ahead_runs: AtomicU64,
    /// Entries the caches shed at checkpoints, and emptied at the epoch's close.
    cache_sheds: AtomicU64,
    cache_cleared: AtomicU64,
    /// The pools' reclaim figures (`stats()`), added up at the end of every epoch.
    reclaim_rounds: AtomicU64,
    reclaim_asked_bytes: AtomicU64,
    reclaimed_bytes: AtomicU64,
    reclaim_nanos: AtomicU64,
}

/// One pool of an epoch's tree, and what the workers hold in it.
struct Node {
    pool: BufPool,
    name: String,
    /// This pool and its ancestors, from this one up (indices into `Epoch::nodes`).
    chain: Vec<usize>,
    children: Vec<usize>,
    buffer_size: usize,
    /// Buffers in its first budget.
    max_buffers: usize,
    /// The most buffers that fit the first budgets of its whole chain.
    fitting_buffers: usize,
    /// The largest budget set during the epoch (a shrink applies to live memory only as it
    /// comes back).
    ceiling: AtomicUsize,
    /// Bytes the workers (and the caches) hold in this pool's subtree (allocations and
    /// reservations).
    live_bytes: AtomicUsize,
    /// Bytes of this pool's own reservations the workers (and the caches) hold.
    reserved_bytes: AtomicUsize,
    /// This pool's own allocations the workers (and the caches) hold.
    allocations: AtomicUsize,
}

/// What one epoch's workers share: the tree of pools and the checkpoint.
struct Epoch {
    nodes: Vec<Node>,
    checkpoint: Checkpoint,
    /// How many workers park at a checkpoint.
    workers: usize,
    /// The reclaiming caches.
    caches: Vec<Arc<Cache>>,
    /// Each cache's registration and its priority, while it is registered.
    registrations: Vec<Mutex<Option<(ReclaimerHandle, u32)>>>,
}

/// A few times an epoch the coordinator asks every worker to park between two
/// operations; parked workers keep what they hold, unless asked to shed it (when a worker
/// cannot park because it waits for budget the parked ones hold).
#[derive(Default)]
struct Checkpoint {
    requested: AtomicBool,
    /// Raised by one every few milliseconds while some worker cannot park: a parked worker
    /// that holds something takes a token and drops one item for it.
    shed_tokens: AtomicUsize,
    parked: AtomicUsize,
}

impl Checkpoint {
    fn take_shed_token(&self) -> bool {
        self.shed_tokens
            .fetch_update(Relaxed, Relaxed, |tokens| tokens.checked_sub(1))
            .is_ok()
    }
}

impl Epoch {
    /// Counts `bytes` newly held in `pool` in its whole chain, checking each budget.
    fn count_in(&self, pool: usize, bytes: usize) {
        for &at in &self.nodes[pool].chain {
            let node = &self.nodes[at];
            let live = node.live_bytes.fetch_add(bytes, Relaxed) + bytes;
            let ceiling = node.ceiling.load(Relaxed);
            if live > ceiling {
                fail(&format!(
                    "budget exceeded in {}: {live} live bytes, budget at most {ceiling}",
                    node.name
                ));
            }
        }
    }

    /// Uncounts `bytes` about to go back from `pool` (before the pool has them back, so the
    /// count never lags behind a release).
    fn count_out(&self, pool: usize, bytes: usize) {
        for &at in &self.nodes[pool].chain {
            self.nodes[at].live_bytes.fetch_sub(bytes, Relaxed);
        }
    }
}

/// An allocation whose bytes are counted in its pool's chain while it lives.
struct HeldAllocation<'a> {
    allocation: Option<BufPoolAllocation>,
    epoch: &'a Epoch,
    pool: usize,
}

impl<'a> HeldAllocation<'a> {
    /// A new allocation of `pool`: counted, checked, touched.
    fn new(epoch: &'a Epoch, pool: usize, allocation: BufPoolAllocation) -> Self {
        epoch.count_in(pool, allocation.allocated_bytes());
        Self::counted(epoch, pool, allocation)
    }

    /// An allocation whose bytes are counted already (out of a reservation).
    fn counted(epoch: &'a Epoch, pool: usize, allocation: BufPoolAllocation) -> Self {
        epoch.nodes[pool].allocations.fetch_add(1, Relaxed);
        // Touch the memory: first and last byte of every buffer.
        let mut allocation = allocation;
        for buffer in allocation.buffers_uninit_mut() {
            let last = buffer.len() - 1;
            buffer[0].write(0xA5);
            buffer[last].write(0x5A);
        }
        HeldAllocation {
            allocation: Some(allocation),
            epoch,
            pool,
        }
    }
}

impl Drop for HeldAllocation<'_> {
    fn drop(&mut self) {
        if let Some(allocation) = self.allocation.take() {
            self.epoch.nodes[self.pool]
                .allocations
                .fetch_sub(1, Relaxed);
            self.epoch
                .count_out(self.pool, allocation.allocated_bytes());
        }
    }
}

/// A reservation whose bytes are counted in its pool's chain while it holds them.
struct HeldReservation<'a> {
    reservation: Option<Reservation>,
    epoch: &'a Epoch,
    pool: usize,
}

fn rounded(bytes: usize) -> usize {
    bytes.checked_next_multiple_of(8).unwrap_or(usize::MAX)
}

impl<'a> HeldReservation<'a> {
    fn new(epoch: &'a Epoch, pool: usize, reservation: Reservation) -> Self {
        epoch.count_in(pool, reservation.size());
        epoch.nodes[pool]
            .reserved_bytes
            .fetch_add(reservation.size(), Relaxed);
        HeldReservation {
            reservation: Some(reservation),
            epoch,
            pool,
        }
    }

    fn size(&self) -> usize {
        self.reservation.as_ref().unwrap().size()
    }

    /// A growth of `more` bytes came through.
    fn grew(&mut self, before: usize) {
        let more = self.size() - before;
        self.epoch.count_in(self.pool, more);
        self.epoch.nodes[self.pool]
            .reserved_bytes
            .fetch_add(more, Relaxed);
    }

    fn shrink(&mut self, less: usize) {
        let before = self.size();
        let less_rounded = rounded(less).min(before);
        self.epoch.count_out(self.pool, less_rounded);
        self.epoch.nodes[self.pool]
            .reserved_bytes
            .fetch_sub(less_rounded, Relaxed);
        // A release: with `--faults`, a hostile waiter's waker may panic in it.
        let reservation = self.reservation.as_mut().unwrap();
        caught(Site::Shrink, || reservation.shrink(less));
        if self.size() != before - less_rounded {
            fail("shrink gave back a different amount");
        }
    }

    /// Splits `bytes` off into a new held reservation (the counts do not change).
    fn split(&mut self, bytes: usize) -> HeldReservation<'a> {
        let before = self.size();
        let part = self.reservation.as_mut().unwrap().split(bytes);
        if part.size() != rounded(bytes).min(before) || self.size() + part.size() != before {
            fail("split did not take min(bytes rounded, size)");
        }
        HeldReservation {
            reservation: Some(part),
            epoch: self.epoch,
            pool: self.pool,
        }
    }

    /// Merges `other` in if it is of the same pool; gives it back otherwise.
    fn merge(&mut self, mut other: HeldReservation<'a>) -> Result<(), HeldReservation<'a>> {
        let (size, other_size) = (self.size(), other.size());
        let result = self
            .reservation
            .as_mut()
            .unwrap()
            .merge(other.reservation.take().unwrap());
        match result {
            Ok(()) => {
                if self.pool != other.pool || self.size() != size + other_size {
                    fail("merge across pools, or of the wrong size");
                }
                Ok(())
            }
            Err(back) => {
                if self.pool == other.pool || back.size() != other_size {
                    fail("merge refused within one pool, or changed the reservation");
                }
                other.reservation = Some(back);
                Err(other)
            }
        }
    }

    /// `n` buffers out of the reservation.
    fn allocate(&mut self, n: usize) -> Result<HeldAllocation<'a>, AllocError> {
        let before = self.size();
        let result = self.reservation.as_mut().unwrap().allocate(n);
        match result {
            Ok(allocation) => {
                let bytes = allocation.allocated_bytes();
                if self.size() != before - bytes {
                    fail("Reservation::allocate took the wrong amount");
                }
                self.epoch.nodes[self.pool]
                    .reserved_bytes
                    .fetch_sub(bytes, Relaxed);
                Ok(HeldAllocation::counted(self.epoch, self.pool, allocation))
            }
            Err(error) => {
                if self.size() != before {
                    fail("a failed Reservation::allocate changed the reservation");
                }
                Err(error)
            }
        }
    }
}

impl Drop for HeldReservation<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            let size = reservation.size();
            self.epoch.count_out(self.pool, size);
            self.epoch.nodes[self.pool]
                .reserved_bytes
                .fetch_sub(size, Relaxed);
            drop(reservation);
        }
    }
}

enum Item<'a> {
    Allocation(#[allow(dead_code)] HeldAllocation<'a>),
    Reservation(HeldReservation<'a>),
}

/// Lets go of a held item. A release: with `--faults`, a hostile waiter's waker may panic in
/// it (the item's bytes are uncounted before they go back, so the counts hold either way).
fn let_go(item: Item<'_>) {
    let site = match item {
        Item::Allocation(_) => Site::AllocationDrop,
        Item::Reservation(_) => Site::ReservationDrop,
    };
    caught(site, || drop(item));
}

// ---------------------------------------------------------------------------------------------
// Reclaiming caches: entries the workers put in, given back when a reclaim round asks
// ---------------------------------------------------------------------------------------------

/// What a cache entry holds.
enum Held {
    Allocation(BufPoolAllocation),
    Reservation(Reservation),
}

/// An allocation or a reservation a cache keeps: counted in its pool's books (as it was while
/// a worker held it) until it is dropped, which uncounts it before the bytes go back.
struct Entry {
    held: Option<Held>,
    pool: usize,
    epoch: Weak<Epoch>,
}

impl Entry {
    fn bytes(&self) -> usize {
        match &self.held {
            Some(Held::Allocation(allocation)) => allocation.allocated_bytes(),
            Some(Held::Reservation(reservation)) => reservation.size(),
            None => 0,
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        if let Some(epoch) = self.epoch.upgrade() {
            let node = &epoch.nodes[self.pool];
            match &held {
                Held::Allocation(allocation) => {
                    node.allocations.fetch_sub(1, Relaxed);
                    epoch.count_out(self.pool, allocation.allocated_bytes());
                }
                Held::Reservation(reservation) => {
                    node.reserved_bytes.fetch_sub(reservation.size(), Relaxed);
                    epoch.count_out(self.pool, reservation.size());
                }
            }
        }
        // A release: with `--faults`, a hostile waiter's waker may panic in it.
        drop(held);
    }
}

/// A cache of one pool's allocations and reservations, registered as that pool's reclaimer
/// (see the module docs). It holds no handle on its pool or its epoch (a `Weak` one).
struct Cache {
    slot: usize,
    pool: usize,
    /// The most bytes it keeps.
    capacity: usize,
    epoch: Weak<Epoch>,
    counters: Arc<Counters>,
    state: Mutex<CacheState>,
    /// The bytes of its entries (its estimate), changed under `state`'s lock.
    bytes: AtomicUsize,
    /// Bytes its futures reported freed.
    reported: Arc<AtomicUsize>,
}

struct CacheState {
    /// Oldest first.
    entries: VecDeque<Entry>,
    /// Set when the epoch's root closes: it takes nothing in any more.
    closed: bool,
    rng: Rng,
}

/// How a cache gives back when asked.
enum Giving {
    /// Drops its entries in `reclaim` itself; the future is ready.
    Now,
    /// Takes its entries out at once, drops them when its future has yielded (or is dropped).
    Batch,
    /// Its future drops one entry per poll, yielding in between.
    Trickle,
}

/// Pending once (waking its task at once), then ready.
#[derive(Default)]
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        // With `--faults`, the waker of a hostile request may panic here.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Cache {
    fn state(&self) -> MutexGuard<'_, CacheState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes `item` in (it stays counted: the cache holds it now), unless the cache is closed,
    /// full, of another pool, or the item is empty: then it is given back.
    fn stash<'a>(&self, item: Item<'a>) -> Result<usize, Item<'a>> {
        let (pool, bytes) = match &item {
            Item::Allocation(allocation) => (
                allocation.pool,
                allocation
                    .allocation
                    .as_ref()
                    .map_or(0, |a| a.allocated_bytes()),
            ),
            Item::Reservation(reservation) => (reservation.pool, reservation.size()),
        };
        let mut state = self.state();
        if state.closed
            || pool != self.pool
            || bytes == 0
            || self.bytes.load(Relaxed) + bytes > self.capacity
        {
            return Err(item);
        }
        let held = match item {
            Item::Allocation(mut allocation) => {
                Held::Allocation(allocation.allocation.take().expect("a held allocation"))
            }
            Item::Reservation(mut reservation) => {
                Held::Reservation(reservation.reservation.take().expect("a held reservation"))
            }
        };
        state.entries.push_back(Entry {
            held: Some(held),
            pool,
            epoch: self.epoch.clone(),
        });
        self.bytes.fetch_add(bytes, Relaxed);
        Ok(bytes)
    }

    /// Takes the oldest entry out (the caller drops it, outside the lock).
    fn pop(&self) -> Option<Entry> {
        let mut state = self.state();
        let entry = state.entries.pop_front()?;
        self.bytes.fetch_sub(entry.bytes(), Relaxed);
        Some(entry)
    }

    /// Takes the oldest entries out until they cover `goal` bytes (or none are left).
    fn take_up_to(&self, goal: usize) -> (Vec<Entry>, usize) {
        let mut state = self.state();
        let (mut taken, mut bytes) = (Vec::new(), 0);
        while bytes < goal {
            let Some(entry) = state.entries.pop_front() else {
                break;
            };
            bytes += entry.bytes();
            taken.push(entry);
        }
        self.bytes.fetch_sub(bytes, Relaxed);
        (taken, bytes)
    }

    /// Takes nothing in from now on; hands out every entry (for the caller to drop).
    fn close(&self) -> Vec<Entry> {
        let mut state = self.state();
        state.closed = true;
        let entries: Vec<Entry> = state.entries.drain(..).collect();
        self.bytes.store(0, Relaxed);
        entries
    }
}

impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        self.bytes.load(Relaxed)
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        if inject(Kind::Reclaim) {
            panic_injected(Kind::Reclaim);
        }
        let (goal, giving, yields, reregister, closed) = {
            let mut state = self.state();
            let rng = &mut state.rng;
            // About what was asked (whole entries: often a little more), less, more,
            // everything, nothing.
            let goal = match rng.below(10) {
                0 => 0,
                1 => target / 2,
                2 => target.saturating_mul(2),
                3 => usize::MAX,
                _ => target,
            };
            let giving = match rng.below(4) {
                0 | 1 => Giving::Now,
                2 => Giving::Batch,
                _ => Giving::Trickle,
            };
            let yields = 1 + rng.below(3);
            let reregister = rng.below(32) == 0;
            let priority = PRIORITIES[rng.below(PRIORITIES.len())];
            (
                goal,
                giving,
                yields,
                reregister.then_some(priority),
                state.closed,
            )
        };
        if let (Some(priority), false) = (reregister, closed) {
            // Drops its own registration in the middle of a round that asks it, and makes a
            // new one (which wakes the heads of the pool's and its ancestors' queues).
            if let Some(epoch) = self.epoch.upgrade() {
                register(&epoch, self.slot, priority);
                self.counters.self_registrations.fetch_add(1, Relaxed);
            }
        }
        let reported = Arc::clone(&self.reported);
        let counters = Arc::clone(&self.counters);
        let report = move |freed: usize| {
            reported.fetch_add(freed, Relaxed);
            counters.cache_reported.fetch_add(freed as u64, Relaxed);
            freed
        };
        match giving {
            Giving::Now => {
                self.counters.reclaim_now.fetch_add(1, Relaxed);
                let (taken, freed) = self.take_up_to(goal);
                // Releases: with `--faults`, a hostile waiter's waker may panic in one (the
                // others still go back, each uncounted first).
                drop(taken);
                Box::pin(async move { report(freed) })
            }
            Giving::Batch => {
                self.counters.reclaim_batch.fetch_add(1, Relaxed);
                // Taken out now; given back when the future has yielded, or when it is
                // dropped before that (a driver that leaves, a panic).
                let (taken, freed) = self.take_up_to(goal);
                Box::pin(async move {
                    for _ in 0..yields {
                        YieldOnce::default().await;
                    }
                    if inject(Kind::ReclaimPoll) {
                        panic_injected(Kind::ReclaimPoll);
                    }
                    drop(taken);
                    report(freed)
                })
            }
            Giving::Trickle => {
                self.counters.reclaim_trickle.fetch_add(1, Relaxed);
                let (epoch, slot) = (self.epoch.clone(), self.slot);
                Box::pin(async move {
                    for _ in 1..yields {
                        YieldOnce::default().await;
                    }
                    let mut freed = 0;
                    while freed < goal {
                        if inject(Kind::ReclaimPoll) {
                            panic_injected(Kind::ReclaimPoll);
                        }
                        // No strong handle on the epoch across a yield: a round parked in a
                        // pool would keep the pool alive.
                        let Some(entry) =
                            epoch.upgrade().and_then(|epoch| epoch.caches[slot].pop())
                        else {
                            break;
                        };
                        freed += entry.bytes();
                        drop(entry);
                        YieldOnce::default().await;
                    }
                    report(freed)
                })
            }
        }
    }
}

/// Registers cache `slot` with its pool at `priority`, dropping its registration before (if
/// any, after the new one is made). With `--faults`, the wake-ups of a registration may meet
/// a hostile waker that panics.
fn register(epoch: &Epoch, slot: usize, priority: u32) {
    let cache = &epoch.caches[slot];
    let reclaimer: Arc<dyn Reclaimer> = Arc::clone(cache) as Arc<dyn Reclaimer>;
    let handle = epoch.nodes[cache.pool].pool.register_reclaimer(
        format!("cache{slot}"),
        priority,
        reclaimer,
    );
    let old = epoch.registrations[slot]
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .replace((handle, priority));
    drop(old);
}

/// Drops cache `slot`'s registration, if it has one.
fn unregister(epoch: &Epoch, slot: usize) -> bool {
    let old = epoch.registrations[slot]
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    let had = old.is_some();
    drop(old);
    had
}

/// Keeps a new item, or (half the time, if a cache of its pool has room) puts it into that
/// cache, which keeps it until a reclaim round asks for it.
fn keep<'a>(
    epoch: &'a Epoch,
    counters: &Counters,
    rng: &mut Rng,
    held: &mut Vec<Item<'a>>,
    item: Item<'a>,
) {
    let mut item = item;
    if rng.below(2) == 0 {
        let pool = match &item {
            Item::Allocation(allocation) => allocation.pool,
            Item::Reservation(reservation) => reservation.pool,
        };
        let first = rng.below(CACHES);
        for slot in (0..CACHES).map(|i| (first + i) % CACHES) {
            let cache = &epoch.caches[slot];
            if cache.pool != pool {
                continue;
            }
            match cache.stash(item) {
                Ok(bytes) => {
                    counters.stashed.fetch_add(1, Relaxed);
                    counters.stashed_bytes.fetch_add(bytes as u64, Relaxed);
                    return;
                }
                Err(back) => item = back,
            }
        }
    }
    held.push(item);
}

fn fail(message: &str) -> ! {
    eprintln!("soak: FAILED: {message}");
    if let Some(faults) = faults() {
        eprintln!("soak: the faults so far: {}", faults.summary());
    }
    std::process::exit(1);
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection (`--faults`): wakers that panic, and the harness that catches them
// ---------------------------------------------------------------------------------------------

/// The waker call (or cache's reclaimer call) an injected panic came from.
#[derive(Clone, Copy)]
enum Kind {
    Clone,
    Wake,
    WakeByRef,
    Drop,
    /// A cache's `Reclaimer::reclaim`.
    Reclaim,
    /// A poll of a cache's reclaim future.
    ReclaimPoll,
}

const KINDS: [&str; 6] = [
    "clone",
    "wake",
    "wake_by_ref",
    "drop",
    "a cache's reclaim",
    "a cache's reclaim future",
];

/// The injected panics' payloads: the panic hook and the catch sites know them by their
/// prefix, `INJECTED`.
const INJECTED: &str = "injected fault";
const PAYLOADS: [&str; 6] = [
    "injected fault: a waker panics in clone",
    "injected fault: a waker panics in wake",
    "injected fault: a waker panics in wake_by_ref",
    "injected fault: a waker panics in drop",
    "injected fault: a cache's reclaim panics",
    "injected fault: a cache's reclaim future panics in poll",
];

/// Where an injected panic was caught.
#[derive(Clone, Copy)]
enum Site {
    /// A hostile worker's poll of its request.
    Poll,
    /// A hostile worker's drop of its request (given up, served, or after a panicking poll).
    FutureDrop,
    AllocationDrop,
    ReservationDrop,
    Shrink,
    TryGrow,
    /// A thread worker's call (a timed-out request gives back what it held).
    BlockingCall,
    /// A task worker's request (cancelled by a timeout, `select!` or a drop after one poll).
    AsyncCall,
    Resize,
    Close,
    PoolDrop,
    /// A `reclaim_ahead` future's poll or drop.
    Ahead,
    /// The coordinator's registration of a cache (its wake-ups).
    Register,
    /// The coordinator's drop of a cache's entry (shed at a checkpoint, emptied at close).
    CacheDrop,
}

const SITES: [&str; 14] = [
    "polls",
    "request drops",
    "allocation drops",
    "reservation drops",
    "shrinks",
    "try_grows",
    "blocking calls",
    "async calls",
    "resizes",
    "closes",
    "pool drops",
    "reclaim-ahead polls",
    "registrations",
    "cache drops",
];

/// The fault mode's settings and figures; set once, by `--faults`.
#[derive(Default)]
struct Faults {
    rate: f64,
    /// A waker call panics when a uniform `u64` falls below this.
    threshold: u64,
    /// Injected panics, by `Kind`.
    injected: [AtomicU64; 6],
    /// Injected panics in `wake` or `wake_by_ref` that lost the wake-up (the others forwarded
    /// it first).
    lost_wakeups: AtomicU64,
    /// Calls that would have panicked while their thread was already unwinding (a second panic
    /// there aborts the process): they did not.
    spared: AtomicU64,
    /// Injected panics the panic hook saw (and kept quiet).
    hooked: AtomicU64,
    /// Injected panics caught, by `Site`.
    caught: [AtomicU64; 14],
    /// The hostile workers' requests, driven by hand.
    requests: AtomicU64,
    /// ... of which: still pending after their first poll (or first slice, in a task),
    pending: AtomicU64,
    /// ... served, refused (an error), given up at their deadline or a checkpoint (dropped while
    /// pending), or abandoned after a panicking poll (dropped).
    served: AtomicU64,
    refused: AtomicU64,
    given_up: AtomicU64,
    abandoned: AtomicU64,
}

static FAULTS: OnceLock<Faults> = OnceLock::new();

fn faults() -> Option<&'static Faults> {
    FAULTS.get()
}

impl Faults {
    fn injected_total(&self) -> u64 {
        self.injected.iter().map(|count| count.load(Relaxed)).sum()
    }

    /// Counts a panic caught at `site`; a panic that was not injected fails the run.
    fn count_caught(&self, site: Site, payload: &(dyn Any + Send)) {
        if !is_injected(payload) {
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(not a string)");
            fail(&format!(
                "a panic that was not injected, caught in {}: {message}",
                SITES[site as usize]
            ));
        }
        self.caught[site as usize].fetch_add(1, Relaxed);
    }

    fn summary(&self) -> String {
        let load = |count: &AtomicU64| count.load(Relaxed);
        let injected = self.injected_total();
        let caught: u64 = self.caught.iter().map(load).sum();
        let kinds: Vec<String> = KINDS
            .iter()
            .zip(&self.injected)
            .map(|(kind, count)| format!("{} in {kind}", load(count)))
            .collect();
        let sites: Vec<String> = SITES
            .iter()
            .zip(&self.caught)
            .filter(|(_, count)| load(count) > 0)
            .map(|(site, count)| format!("{} in {site}", load(count)))
            .collect();
        let left = match injected.checked_sub(caught) {
            Some(left) => format!(
                "{left} caught nowhere (the pool passes on the first panic of a round of \
                 wake-ups only)"
            ),
            None => format!("{} more caught than injected!", caught - injected),
        };
        format!(
            "rate {}: {injected} injected panics ({}; {} wake-ups lost with them; {} more spared \
             while unwinding), {} silenced by the hook; {caught} caught ({}); {left}; hostile \
             workers: {} requests polled by hand, {} of them pending after the first poll, {} \
             served, {} refused, {} given up, {} abandoned after a panicking poll",
            self.rate,
            kinds.join(", "),
            load(&self.lost_wakeups),
            load(&self.spared),
            load(&self.hooked),
            if sites.is_empty() {
                "none".to_string()
            } else {
                sites.join(", ")
            },
            load(&self.requests),
            load(&self.pending),
            load(&self.served),
            load(&self.refused),
            load(&self.given_up),
            load(&self.abandoned),
        )
    }
}

fn is_injected(payload: &(dyn Any + Send)) -> bool {
    payload
        .downcast_ref::<&str>()
        .is_some_and(|message| message.starts_with(INJECTED))
        || payload
            .downcast_ref::<String>()
            .is_some_and(|message| message.starts_with(INJECTED))
}

/// Turns the fault mode on: the rate, and a panic hook that keeps the injected panics quiet
/// (and counts them) and prints the others as the default hook does.
fn enable_faults(rate: f64) {
    let threshold = if rate >= 1.0 {
        u64::MAX
    } else {
        (rate * 18_446_744_073_709_551_616.0) as u64
    };
    let settings = Faults {
        rate,
        threshold,
        ..Faults::default()
    };
    if FAULTS.set(settings).is_err() {
        unreachable!("faults enabled twice");
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if is_injected(info.payload()) {
            if let Some(faults) = faults() {
                faults.hooked.fetch_add(1, Relaxed);
            }
        } else {
            default_hook(info);
        }
    }));
}

thread_local! {
    static FAULT_RNG: Cell<u64> = Cell::new(fault_seed());
    /// Set while the harness drops its own handle of a hostile waker: no fault then (it would
    /// test nothing of the pool's).
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

fn fault_seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // splitmix64
    let mut z = NEXT
        .fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

fn fault_roll() -> u64 {
    FAULT_RNG
        .try_with(|cell| {
            let mut rng = Rng(cell.get());
            let roll = rng.next();
            cell.set(rng.0);
            roll
        })
        .unwrap_or(u64::MAX)
}

/// Whether this waker call panics: at the fault rate, but never while the thread unwinds
/// (a second panic there would abort the process) nor for the harness's own handles.
fn inject(kind: Kind) -> bool {
    let Some(faults) = faults() else {
        return false;
    };
    if QUIET.try_with(Cell::get).unwrap_or(true) || fault_roll() >= faults.threshold {
        return false;
    }
    if std::thread::panicking() {
        faults.spared.fetch_add(1, Relaxed);
        return false;
    }
    faults.injected[kind as usize].fetch_add(1, Relaxed);
    true
}

fn panic_injected(kind: Kind) -> ! {
    std::panic::panic_any(PAYLOADS[kind as usize])
}

/// Runs `f` with no faults injected on this thread (the harness's own waker handles).
fn quietly<R>(f: impl FnOnce() -> R) -> R {
    QUIET.set(true);
    let result = f();
    QUIET.set(false);
    result
}

/// Runs `f`; with `--faults`, under `catch_unwind`: `None` if it panicked (an injected panic,
/// counted at `site`; any other panic fails the run). Without `--faults`, just runs it.
fn caught<R>(site: Site, f: impl FnOnce() -> R) -> Option<R> {
    let Some(faults) = faults() else {
        return Some(f());
    };
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => Some(result),
        Err(payload) => {
            faults.count_caught(site, &*payload);
            None
        }
    }
}

/// [`caught`] for a future: its polls and its drop (it is dropped inside the last poll).
async fn caught_async<F: Future>(site: Site, future: F) -> Option<F::Output> {
    let Some(faults) = faults() else {
        return Some(future.await);
    };
    // Owned by the block: dropped when its `.await` completes, in the poll inside
    // `catch_unwind` (not after it, as the future given to `catch_unwind` would be).
    #[allow(
        clippy::redundant_async_block,
        reason = "the block moves the future's drop inside `catch_unwind`"
    )]
    let owned = async move { future.await };
    match AssertUnwindSafe(owned).catch_unwind().await {
        Ok(output) => Some(output),
        Err(payload) => {
            faults.count_caught(site, &*payload);
            None
        }
    }
}

/// A waker that panics at the fault rate in `clone`, `wake`, `wake_by_ref` and `drop`, and
/// otherwise forwards to `real` (the thread's unparker, or the task's waker).
struct HostileWaker {
    real: Waker,
}

static HOSTILE_VTABLE: RawWakerVTable = RawWakerVTable::new(
    hostile_clone,
    hostile_wake,
    hostile_wake_by_ref,
    hostile_drop,
);

fn hostile_waker(real: Waker) -> Waker {
    let data = Arc::into_raw(Arc::new(HostileWaker { real })).cast::<()>();
    // SAFETY: `data` is an `Arc<HostileWaker>` made raw, whose strong count the new waker
    // owns; the vtable's functions keep that contract: `clone` adds a count, `wake` and `drop`
    // release one (on unwinding too), `wake_by_ref` only borrows.
    unsafe { Waker::from_raw(RawWaker::new(data, &HOSTILE_VTABLE)) }
}

/// # Safety
///
/// `data` is a hostile waker's (see `hostile_waker`), alive for the call.
unsafe fn hostile_clone(data: *const ()) -> RawWaker {
    if inject(Kind::Clone) {
        panic_injected(Kind::Clone);
    }
    // SAFETY: the caller's waker holds a strong count, so the `Arc` is alive; this adds the
    // new waker's count.
    unsafe { Arc::increment_strong_count(data.cast::<HostileWaker>()) };
    RawWaker::new(data, &HOSTILE_VTABLE)
}

/// # Safety
///
/// As `hostile_clone`; the waker is consumed.
unsafe fn hostile_wake(data: *const ()) {
    // SAFETY: `wake` consumes the waker: its strong count is ours to release, which the `Arc`
    // does when dropped (when unwinding too).
    let waker = unsafe { Arc::from_raw(data.cast::<HostileWaker>()) };
    wake_or_panic(&waker.real, Kind::Wake);
}

/// # Safety
///
/// As `hostile_clone`.
unsafe fn hostile_wake_by_ref(data: *const ()) {
    // SAFETY: the caller's waker keeps the `Arc` alive for the call.
    let waker = unsafe { &*data.cast::<HostileWaker>() };
    wake_or_panic(&waker.real, Kind::WakeByRef);
}

/// # Safety
///
/// As `hostile_clone`; the waker is consumed.
unsafe fn hostile_drop(data: *const ()) {
    // SAFETY: the waker's strong count, released when this `Arc` drops (when unwinding too).
    let waker = unsafe { Arc::from_raw(data.cast::<HostileWaker>()) };
    if inject(Kind::Drop) {
        panic_injected(Kind::Drop);
    }
    drop(waker);
}

/// A wake-up that may panic: half the time after forwarding it, else losing it.
fn wake_or_panic(real: &Waker, kind: Kind) {
    if inject(kind) {
        if fault_roll() & 1 == 0 {
            real.wake_by_ref();
        } else if let Some(faults) = faults() {
            faults.lost_wakeups.fetch_add(1, Relaxed);
        }
        panic_injected(kind);
    }
    real.wake_by_ref();
}

/// How a request driven by hand ended.
enum Driven<T> {
    Ready(T),
    /// Still pending at its deadline (or when a checkpoint began): dropped, which cancels it.
    GaveUp,
    /// Its poll panicked: dropped.
    Abandoned,
}

/// A hostile worker polls a pending request again this often at the latest: a wake-up its
/// waker lost only delays it.
const REPOLL: Duration = Duration::from_micros(500);

/// Wakes a hostile thread parked between two polls.
struct Unparker(std::thread::Thread);

impl std::task::Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `future` by hand on this thread with hostile wakers (now and then a new one, which
/// the pool clones and registers, dropping the one it held) until it is ready, its poll
/// panics, `bound` has passed or a checkpoint begins; then drops it. Every poll and the drop
/// run under `catch_unwind`.
fn drive_on_thread<F: Future>(
    epoch: &Epoch,
    rng: &mut Rng,
    future: F,
    bound: Duration,
) -> Driven<F::Output> {
    let faults = faults().expect("--faults");
    faults.requests.fetch_add(1, Relaxed);
    let deadline = Instant::now() + bound;
    let real = Waker::from(Arc::new(Unparker(std::thread::current())));
    let mut future = Box::pin(future);
    let mut waker = hostile_waker(real.clone());
    let mut polls = 0;
    let driven = loop {
        if polls > 0 && rng.below(2) == 0 {
            let old = std::mem::replace(&mut waker, hostile_waker(real.clone()));
            quietly(|| drop(old));
        }
        polls += 1;
        let polled = caught(Site::Poll, || {
            future.as_mut().poll(&mut Context::from_waker(&waker))
        });
        match polled {
            None => break Driven::Abandoned,
            Some(Poll::Ready(output)) => break Driven::Ready(output),
            Some(Poll::Pending) => {}
        }
        if polls == 1 {
            faults.pending.fetch_add(1, Relaxed);
        }
        let now = Instant::now();
        if now >= deadline || epoch.checkpoint.requested.load(Relaxed) {
            break Driven::GaveUp;
        }
        std::thread::park_timeout((deadline - now).min(REPOLL));
    };
    quietly(|| drop(waker));
    // A request still waiting leaves the queue, one granted passes its bytes on.
    caught(Site::FutureDrop, || drop(future));
    driven
}

/// A request polled with hostile wakers from a task: each poll makes one that forwards to the
/// task's waker (or, half the time, keeps the last one if the task's waker is the same). Ready
/// with `None` if the poll panicked. The request is dropped as soon as it is ready, and when
/// this is dropped; every poll and drop run under `catch_unwind`.
struct Hostile<F: Future> {
    future: Option<Pin<Box<F>>>,
    /// The hostile waker last given to the request, and the task waker it forwards to.
    waker: Option<(Waker, Waker)>,
    rng: Rng,
}

impl<F: Future> Hostile<F> {
    fn finish(&mut self) {
        let waker = self.waker.take();
        quietly(|| drop(waker));
        let future = self.future.take();
        caught(Site::FutureDrop, || drop(future));
    }
}

impl<F: Future> Future for Hostile<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let keep = this
            .waker
            .as_ref()
            .is_some_and(|(_, real)| real.will_wake(cx.waker()))
            && this.rng.below(2) == 0;
        if !keep {
            let real = cx.waker().clone();
            let old = this.waker.replace((hostile_waker(real.clone()), real));
            quietly(|| drop(old));
        }
        let (Some(future), Some((waker, _))) = (this.future.as_mut(), this.waker.as_ref()) else {
            unreachable!("a hostile request polled after it completed");
        };
        let polled = caught(Site::Poll, || {
            future.as_mut().poll(&mut Context::from_waker(waker))
        });
        let output = match polled {
            Some(Poll::Pending) => return Poll::Pending,
            Some(Poll::Ready(output)) => Some(output),
            None => None,
        };
        this.finish();
        Poll::Ready(output)
    }
}

impl<F: Future> Drop for Hostile<F> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// [`drive_on_thread`] for a task: the request is polled afresh every `REPOLL` (a tokio
/// timer tick, in practice) until ready, `bound` or a checkpoint.
async fn drive_in_task<F: Future>(
    epoch: &Epoch,
    rng: &mut Rng,
    future: F,
    bound: Duration,
) -> Driven<F::Output> {
    let faults = faults().expect("--faults");
    faults.requests.fetch_add(1, Relaxed);
    let deadline = Instant::now() + bound;
    let mut hostile = Hostile {
        future: Some(Box::pin(future)),
        waker: None,
        rng: Rng(rng.next() | 1),
    };
    let mut first = true;
    loop {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(REPOLL);
        match tokio::time::timeout(slice, &mut hostile).await {
            Ok(Some(output)) => return Driven::Ready(output),
            Ok(None) => return Driven::Abandoned,
            Err(_) => {
                if first {
                    faults.pending.fetch_add(1, Relaxed);
                    first = false;
                }
                if Instant::now() >= deadline || epoch.checkpoint.requested.load(Relaxed) {
                    // Its drop cancels the request (under `catch_unwind`).
                    drop(hostile);
                    return Driven::GaveUp;
                }
            }
        }
    }
}

/// Counts a hand-driven request's end like any other call's: `None` if it was abandoned.
fn tally<T>(
    counters: &Counters,
    driven: Driven<Result<T, AllocError>>,
    since: Instant,
) -> Option<Result<T, AllocError>> {
    let faults = faults().expect("--faults");
    let result = match driven {
        Driven::Ready(result) => {
            let count = if result.is_ok() {
                &faults.served
            } else {
                &faults.refused
            };
            count.fetch_add(1, Relaxed);
            result
        }
        Driven::GaveUp => {
            faults.given_up.fetch_add(1, Relaxed);
            counters.cancelled.fetch_add(1, Relaxed);
            Err(AllocError::TimedOut)
        }
        Driven::Abandoned => {
            faults.abandoned.fetch_add(1, Relaxed);
            return None;
        }
    };
    record(counters, &result, since.elapsed());
    Some(result)
}

/// The epoch under way, for the watchdog's failure message.
static CURRENT: Mutex<Option<Weak<Epoch>>> = Mutex::new(None);

/// The epoch under way's pools (report and books), if there is one.
fn current_accounts() -> String {
    let current = CURRENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .as_ref()
        .and_then(Weak::upgrade);
    let Some(epoch) = current else {
        return String::new();
    };
    let mut lines = format!("\n{}", epoch.nodes[0].pool.report());
    for node in &epoch.nodes {
        lines.push_str(&format!(
            "\n  {:8} {} (workers and caches hold {} in its subtree)",
            node.name,
            node.pool.stats(),
            node.live_bytes.load(Relaxed)
        ));
    }
    for (slot, cache) in epoch.caches.iter().enumerate() {
        let registered = epoch.registrations[slot]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map(|(_, priority)| *priority);
        lines.push_str(&format!(
            "\n  cache{slot} on {}: {} bytes, registered at {registered:?}",
            epoch.nodes[cache.pool].name,
            cache.estimate()
        ));
    }
    lines
}

/// With `--faults`: the step of an epoch's teardown under way, and when the teardown began.
static TEARDOWN: Mutex<Option<(String, Instant)>> = Mutex::new(None);

/// With `--faults`, notes the teardown's next step for the watchdog.
fn teardown_step(step: impl FnOnce() -> String) {
    if faults().is_none() {
        return;
    }
    let mut teardown = TEARDOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let began = teardown
        .as_ref()
        .map_or_else(Instant::now, |(_, began)| *began);
    *teardown = Some((step(), began));
}

fn teardown_done() {
    *TEARDOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
}

/// Counts one call's result and checks its wait.
fn record<T>(counters: &Counters, result: &Result<T, AllocError>, waited: Duration) {
    if waited > WAIT_BOUND {
        fail(&format!(
            "a wait took {waited:?}, above the bound {WAIT_BOUND:?}"
        ));
    }
    counters
        .max_wait_micros
        .fetch_max(waited.as_micros() as u64, Relaxed);
    if waited > Duration::from_micros(50) {
        counters.waits.fetch_add(1, Relaxed);
    }
    let counter = match result {
        Ok(_) => return,
        Err(AllocError::WouldBlock) => &counters.would_block,
        Err(AllocError::TimedOut) => &counters.timed_out,
        Err(AllocError::Closed) => &counters.closed,
        Err(AllocError::ExceedsBudget { .. }) => &counters.exceeded,
        Err(error) => fail(&format!("unexpected error {error:?}")),
    };
    counter.fetch_add(1, Relaxed);
}

/// What a worker does next, the same for tasks and threads.
enum Next {
    /// Drop the held item at this index.
    Drop(usize),
    /// Change the held reservation at this index (or drop it, if it is an allocation).
    Change(usize),
    Allocate {
        pool: usize,
        n: usize,
    },
    Reserve {
        pool: usize,
        bytes: usize,
    },
}

fn next(epoch: &Epoch, rng: &mut Rng, held: &[Item<'_>]) -> Next {
    // Holding something: mostly let go of it (or change a reservation), so that the budgets
    // keep turning over; sometimes take more.
    if !held.is_empty() && (held.len() >= MAX_HELD || rng.below(4) != 0) {
        let index = rng.below(held.len());
        return if rng.below(3) == 0 {
            Next::Change(index)
        } else {
            Next::Drop(index)
        };
    }
    let pool = rng.below(epoch.nodes.len());
    let node = &epoch.nodes[pool];
    // Mostly small requests, some up to what the chain's budgets allow, a few above.
    let most = match rng.below(20) {
        0 => 2 * node.max_buffers,
        1..=5 => node.fitting_buffers,
        _ => node.fitting_buffers.div_ceil(8),
    };
    if rng.below(3) == 0 {
        Next::Reserve {
            pool,
            bytes: 1 + rng.below(most * node.buffer_size),
        }
    } else {
        Next::Allocate {
            pool,
            n: 1 + rng.below(most),
        }
    }
}

/// The changes to a held reservation both kinds of worker make without waiting; `None`
/// leaves the choice (a growth that may wait) to the worker. `Err(Closed)` ends the worker.
fn change_now<'a>(
    epoch: &'a Epoch,
    counters: &Counters,
    rng: &mut Rng,
    held: &mut Vec<Item<'a>>,
    index: usize,
) -> Option<Result<(), AllocError>> {
    let Item::Reservation(reservation) = &mut held[index] else {
        let_go(held.swap_remove(index));
        return Some(Ok(()));
    };
    let node = &epoch.nodes[reservation.pool];
    let size = reservation.size();
    match rng.below(6) {
        0 => {
            let before = size;
            let more = 1 + rng.below(size.max(64));
            // With `--faults`, a hostile waker may panic in it: a chain that could not hold the
            // growth at every level gives back the levels it held, waking their waiters.
            let reservation_ = reservation.reservation.as_mut().unwrap();
            let Some(result) = caught(Site::TryGrow, || reservation_.try_grow(more)) else {
                reservation.grew(before);
                return Some(Ok(()));
            };
            record(counters, &result, Duration::ZERO);
            match result {
                Ok(()) => {
                    reservation.grew(before);
                    counters.grows.fetch_add(1, Relaxed);
                    Some(Ok(()))
                }
                Err(AllocError::Closed) => Some(Err(AllocError::Closed)),
                Err(_) => Some(Ok(())),
            }
        }
        1 => None,
        2 => {
            reservation.shrink(rng.below(size + 8));
            counters.shrinks.fetch_add(1, Relaxed);
            Some(Ok(()))
        }
        3 => {
            let part = reservation.split(rng.below(size + 8));
            counters.splits.fetch_add(1, Relaxed);
            held.push(Item::Reservation(part));
            Some(Ok(()))
        }
        4 => {
            let other = rng.below(held.len());
            if other == index || !matches!(held[other], Item::Reservation(_)) {
                return Some(Ok(()));
            }
            let Item::Reservation(other_reservation) = held.swap_remove(other) else {
                unreachable!()
            };
            // `swap_remove` moved the last item into `other`.
            let index = if index == held.len() { other } else { index };
            let Item::Reservation(reservation) = &mut held[index] else {
                unreachable!()
            };
            match reservation.merge(other_reservation) {
                Ok(()) => {
                    counters.merges.fetch_add(1, Relaxed);
                }
                Err(back) => {
                    counters.merges_refused.fetch_add(1, Relaxed);
                    held.push(Item::Reservation(back));
                }
            }
            Some(Ok(()))
        }
        _ => {
            let n = 1 + rng.below((size / node.buffer_size).max(1) + 1);
            match reservation.allocate(n) {
                Ok(allocation) => {
                    counters.allocations_from_reservations.fetch_add(1, Relaxed);
                    held.push(Item::Allocation(allocation));
                }
                Err(AllocError::ExceedsBudget { .. } | AllocError::ZeroBuffers) => {}
                Err(error) => fail(&format!("Reservation::allocate: {error:?}")),
            }
            Some(Ok(()))
        }
    }
}

async fn task_worker(epoch: Arc<Epoch>, counters: Arc<Counters>, seed: u64) {
    let epoch = &*epoch;
    let mut rng = Rng(seed | 1);
    let mut held: Vec<Item<'_>> = Vec::new();
    loop {
        if epoch.checkpoint.requested.load(Relaxed) {
            epoch.checkpoint.parked.fetch_add(1, Relaxed);
            while epoch.checkpoint.requested.load(Relaxed) {
                if !held.is_empty() && epoch.checkpoint.take_shed_token() {
                    if let Some(item) = held.pop() {
                        let_go(item);
                    }
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            epoch.checkpoint.parked.fetch_sub(1, Relaxed);
        }
        let closed = match next(epoch, &mut rng, &held) {
            Next::Drop(index) => {
                let_go(held.swap_remove(index));
                false
            }
            Next::Change(index) => match change_now(epoch, &counters, &mut rng, &mut held, index) {
                Some(result) => result.is_err(),
                None => {
                    let Item::Reservation(reservation) = &mut held[index] else {
                        unreachable!()
                    };
                    let before = reservation.size();
                    let more = 1 + rng.below(before.max(64));
                    let since = Instant::now();
                    // Bounded: a worker never waits without bound while it holds anything.
                    let grow = tokio::time::timeout(
                        Duration::from_micros(rng.below(500) as u64),
                        reservation.reservation.as_mut().unwrap().grow(more),
                    );
                    // With `--faults`, a cancelled growth may wake a hostile waker that panics:
                    // the reservation is counted by what it holds.
                    match caught_async(Site::AsyncCall, grow).await {
                        None => {
                            reservation.grew(before);
                            false
                        }
                        Some(outcome) => {
                            let result = match outcome {
                                Ok(result) => result,
                                Err(_) => {
                                    counters.cancelled.fetch_add(1, Relaxed);
                                    Err(AllocError::TimedOut)
                                }
                            };
                            record(&counters, &result, since.elapsed());
                            if result.is_ok() {
                                reservation.grew(before);
                                counters.grows.fetch_add(1, Relaxed);
                            }
                            result == Err(AllocError::Closed)
                        }
                    }
                }
            },
            Next::Allocate { pool, n } => {
                let allocate = task_allocate(epoch, &counters, &mut rng, pool, n, held.is_empty());
                match caught_async(Site::AsyncCall, allocate).await.map(|result| {
                    result.map(|allocation| HeldAllocation::new(epoch, pool, allocation))
                }) {
                    Some(Ok(allocation)) => {
                        counters.allocations.fetch_add(1, Relaxed);
                        let item = Item::Allocation(allocation);
                        keep(epoch, &counters, &mut rng, &mut held, item);
                        false
                    }
                    Some(Err(error)) => error == AllocError::Closed,
                    None => false,
                }
            }
            Next::Reserve { pool, bytes } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                let reserve = async {
                    match rng.below(4) {
                        0 => node.pool.try_reserve(bytes),
                        1 if held.is_empty() => node.pool.reserve(bytes).await,
                        _ => match tokio::time::timeout(
                            Duration::from_micros(rng.below(500) as u64),
                            node.pool.reserve(bytes),
                        )
                        .await
                        {
                            Ok(result) => result,
                            Err(_) => {
                                counters.cancelled.fetch_add(1, Relaxed);
                                Err(AllocError::TimedOut)
                            }
                        },
                    }
                };
                // With `--faults`, a cancelled request may wake a hostile waker that panics.
                let Some(result) = caught_async(Site::AsyncCall, reserve).await else {
                    continue;
                };
                record(&counters, &result, since.elapsed());
                match result {
                    Ok(reservation) => {
                        counters.reservations.fetch_add(1, Relaxed);
                        let item =
                            Item::Reservation(HeldReservation::new(epoch, pool, reservation));
                        keep(epoch, &counters, &mut rng, &mut held, item);
                        false
                    }
                    Err(error) => error == AllocError::Closed,
                }
            }
        };
        if closed {
            // In order, as the vector's drop would; each release under `catch_unwind` with
            // `--faults`.
            held.drain(..).for_each(let_go);
            return;
        }
        for _ in 0..rng.below(3) {
            tokio::task::yield_now().await;
        }
    }
}

/// One allocation in one of the async forms; waits without bound only if `may_wait`.
async fn task_allocate(
    epoch: &Epoch,
    counters: &Counters,
    rng: &mut Rng,
    pool: usize,
    n: usize,
    may_wait: bool,
) -> Result<BufPoolAllocation, AllocError> {
    let pool = &epoch.nodes[pool].pool;
    let since = Instant::now();
    let result = match rng.below(6) {
        0 => match tokio::time::timeout(
            Duration::from_micros(rng.below(500) as u64),
            pool.allocate(n),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => {
                counters.cancelled.fetch_add(1, Relaxed);
                return Err(AllocError::TimedOut);
            }
        },
        1 => {
            tokio::select! {
                result = pool.allocate_zeroed(n) => result,
                _ = tokio::time::sleep(Duration::from_micros(rng.below(300) as u64)) => {
                    counters.cancelled.fetch_add(1, Relaxed);
                    return Err(AllocError::TimedOut);
                }
            }
        }
        2 => {
            // Polled once, then dropped: queued and cancelled, or served at once.
            let mut allocate = pin!(pool.allocate(n));
            match futures::poll!(allocate.as_mut()) {
                Poll::Ready(result) => result,
                Poll::Pending => {
                    counters.cancelled.fetch_add(1, Relaxed);
                    return Err(AllocError::TimedOut);
                }
            }
        }
        4 | 5 if may_wait => pool.allocate(n).await,
        _ => pool.try_allocate(n),
    };
    record(counters, &result, since.elapsed());
    result
}

fn thread_worker(epoch: &Epoch, counters: &Counters, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut held: Vec<Item<'_>> = Vec::new();
    loop {
        if epoch.checkpoint.requested.load(Relaxed) {
            epoch.checkpoint.parked.fetch_add(1, Relaxed);
            while epoch.checkpoint.requested.load(Relaxed) {
                if !held.is_empty() && epoch.checkpoint.take_shed_token() {
                    if let Some(item) = held.pop() {
                        let_go(item);
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            epoch.checkpoint.parked.fetch_sub(1, Relaxed);
        }
        let closed = match next(epoch, &mut rng, &held) {
            Next::Drop(index) => {
                let_go(held.swap_remove(index));
                false
            }
            // Threads grow with `try_grow` only: `grow_blocking` would wait without bound
            // while holding the reservation.
            Next::Change(index) => change_now(epoch, counters, &mut rng, &mut held, index)
                .unwrap_or(Ok(()))
                .is_err(),
            Next::Allocate { pool, n } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                // With `--faults`, a timed-out request may wake a hostile waker that panics.
                let Some(result) = caught(Site::BlockingCall, || match rng.below(4) {
                    0 => node
                        .pool
                        .allocate_timeout(n, Duration::from_micros(rng.below(1000) as u64)),
                    1 => node.pool.try_allocate(n),
                    2 if held.is_empty() => node.pool.allocate_zeroed_blocking(n),
                    3 if held.is_empty() => node.pool.allocate_blocking(n),
                    _ => node
                        .pool
                        .allocate_zeroed_timeout(n, Duration::from_micros(rng.below(1000) as u64)),
                }) else {
                    continue;
                };
                record(counters, &result, since.elapsed());
                match result {
                    Ok(allocation) => {
                        counters.allocations.fetch_add(1, Relaxed);
                        let item = Item::Allocation(HeldAllocation::new(epoch, pool, allocation));
                        keep(epoch, counters, &mut rng, &mut held, item);
                        false
                    }
                    Err(error) => error == AllocError::Closed,
                }
            }
            Next::Reserve { pool, bytes } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                let Some(result) = caught(Site::BlockingCall, || match rng.below(3) {
                    0 => node.pool.try_reserve(bytes),
                    1 if held.is_empty() => node.pool.reserve_blocking(bytes),
                    _ => node
                        .pool
                        .reserve_timeout(bytes, Duration::from_micros(rng.below(1000) as u64)),
                }) else {
                    continue;
                };
                record(counters, &result, since.elapsed());
                match result {
                    Ok(reservation) => {
                        counters.reservations.fetch_add(1, Relaxed);
                        let item =
                            Item::Reservation(HeldReservation::new(epoch, pool, reservation));
                        keep(epoch, counters, &mut rng, &mut held, item);
                        false
                    }
                    Err(error) => error == AllocError::Closed,
                }
            }
        };
        if closed {
            held.drain(..).for_each(let_go);
            return;
        }
        for _ in 0..rng.below(3) {
            std::thread::yield_now();
        }
    }
}

/// With `--faults`: how long a hostile worker drives one request at most (less while it holds
/// something: it never waits long then).
fn hostile_bound(rng: &mut Rng, held: &[Item<'_>]) -> Duration {
    let most = if held.is_empty() { 20_000 } else { 2_000 };
    Duration::from_micros(1 + rng.below(most) as u64)
}

/// Keeps what a hand-driven allocation got; `true` if the pool is closed.
fn hold_allocation<'a>(
    epoch: &'a Epoch,
    counters: &Counters,
    rng: &mut Rng,
    held: &mut Vec<Item<'a>>,
    pool: usize,
    result: Option<Result<BufPoolAllocation, AllocError>>,
) -> bool {
    match result {
        Some(Ok(allocation)) => {
            counters.allocations.fetch_add(1, Relaxed);
            let item = Item::Allocation(HeldAllocation::new(epoch, pool, allocation));
            keep(epoch, counters, rng, held, item);
            false
        }
        Some(Err(error)) => error == AllocError::Closed,
        None => false,
    }
}

/// Keeps what a hand-driven reservation got; `true` if the pool is closed.
fn hold_reservation<'a>(
    epoch: &'a Epoch,
    counters: &Counters,
    rng: &mut Rng,
    held: &mut Vec<Item<'a>>,
    pool: usize,
    result: Option<Result<Reservation, AllocError>>,
) -> bool {
    match result {
        Some(Ok(reservation)) => {
            counters.reservations.fetch_add(1, Relaxed);
            let item = Item::Reservation(HeldReservation::new(epoch, pool, reservation));
            keep(epoch, counters, rng, held, item);
            false
        }
        Some(Err(error)) => error == AllocError::Closed,
        None => false,
    }
}

/// Counts a hand-driven growth by what the reservation holds afterwards (the growth if it
/// came through, else what it had); `true` if the pool is closed.
fn grown_by_hand(
    reservation: &mut HeldReservation<'_>,
    counters: &Counters,
    before: usize,
    result: Option<Result<(), AllocError>>,
) -> bool {
    reservation.grew(before);
    if result == Some(Ok(())) {
        counters.grows.fetch_add(1, Relaxed);
    }
    result == Some(Err(AllocError::Closed))
}

/// With `--faults`: a hostile thread. It chooses its steps as the other workers do, but makes
/// its requests (`allocate`, `allocate_zeroed`, `reserve`, `grow`) as futures it polls by hand
/// with hostile wakers, each for a bounded time.
fn hostile_thread(epoch: &Epoch, counters: &Counters, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut held: Vec<Item<'_>> = Vec::new();
    loop {
        if epoch.checkpoint.requested.load(Relaxed) {
            epoch.checkpoint.parked.fetch_add(1, Relaxed);
            while epoch.checkpoint.requested.load(Relaxed) {
                if !held.is_empty() && epoch.checkpoint.take_shed_token() {
                    if let Some(item) = held.pop() {
                        let_go(item);
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            epoch.checkpoint.parked.fetch_sub(1, Relaxed);
        }
        let bound = hostile_bound(&mut rng, &held);
        let closed = match next(epoch, &mut rng, &held) {
            Next::Drop(index) => {
                let_go(held.swap_remove(index));
                false
            }
            Next::Change(index) => match change_now(epoch, counters, &mut rng, &mut held, index) {
                Some(result) => result.is_err(),
                None => {
                    let Item::Reservation(reservation) = &mut held[index] else {
                        unreachable!()
                    };
                    let before = reservation.size();
                    let more = 1 + rng.below(before.max(64));
                    let since = Instant::now();
                    let grow = reservation.reservation.as_mut().unwrap().grow(more);
                    let result = tally(
                        counters,
                        drive_on_thread(epoch, &mut rng, grow, bound),
                        since,
                    );
                    grown_by_hand(reservation, counters, before, result)
                }
            },
            Next::Allocate { pool, n } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                let allocate = if rng.below(2) == 0 {
                    node.pool.allocate(n)
                } else {
                    node.pool.allocate_zeroed(n)
                };
                let result = tally(
                    counters,
                    drive_on_thread(epoch, &mut rng, allocate, bound),
                    since,
                );
                hold_allocation(epoch, counters, &mut rng, &mut held, pool, result)
            }
            Next::Reserve { pool, bytes } => {
                let since = Instant::now();
                let reserve = epoch.nodes[pool].pool.reserve(bytes);
                let result = tally(
                    counters,
                    drive_on_thread(epoch, &mut rng, reserve, bound),
                    since,
                );
                hold_reservation(epoch, counters, &mut rng, &mut held, pool, result)
            }
        };
        if closed {
            held.drain(..).for_each(let_go);
            return;
        }
        for _ in 0..rng.below(3) {
            std::thread::yield_now();
        }
    }
}

/// With `--faults`: a hostile task, as [`hostile_thread`], its requests polled through
/// [`Hostile`].
async fn hostile_task(epoch: Arc<Epoch>, counters: Arc<Counters>, seed: u64) {
    let epoch = &*epoch;
    let counters = &*counters;
    let mut rng = Rng(seed | 1);
    let mut held: Vec<Item<'_>> = Vec::new();
    loop {
        if epoch.checkpoint.requested.load(Relaxed) {
            epoch.checkpoint.parked.fetch_add(1, Relaxed);
            while epoch.checkpoint.requested.load(Relaxed) {
                if !held.is_empty() && epoch.checkpoint.take_shed_token() {
                    if let Some(item) = held.pop() {
                        let_go(item);
                    }
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            epoch.checkpoint.parked.fetch_sub(1, Relaxed);
        }
        let bound = hostile_bound(&mut rng, &held);
        let closed = match next(epoch, &mut rng, &held) {
            Next::Drop(index) => {
                let_go(held.swap_remove(index));
                false
            }
            Next::Change(index) => match change_now(epoch, counters, &mut rng, &mut held, index) {
                Some(result) => result.is_err(),
                None => {
                    let Item::Reservation(reservation) = &mut held[index] else {
                        unreachable!()
                    };
                    let before = reservation.size();
                    let more = 1 + rng.below(before.max(64));
                    let since = Instant::now();
                    let grow = reservation.reservation.as_mut().unwrap().grow(more);
                    let driven = drive_in_task(epoch, &mut rng, grow, bound).await;
                    let result = tally(counters, driven, since);
                    grown_by_hand(reservation, counters, before, result)
                }
            },
            Next::Allocate { pool, n } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                let allocate = if rng.below(2) == 0 {
                    node.pool.allocate(n)
                } else {
                    node.pool.allocate_zeroed(n)
                };
                let driven = drive_in_task(epoch, &mut rng, allocate, bound).await;
                let result = tally(counters, driven, since);
                hold_allocation(epoch, counters, &mut rng, &mut held, pool, result)
            }
            Next::Reserve { pool, bytes } => {
                let since = Instant::now();
                let reserve = epoch.nodes[pool].pool.reserve(bytes);
                let driven = drive_in_task(epoch, &mut rng, reserve, bound).await;
                let result = tally(counters, driven, since);
                hold_reservation(epoch, counters, &mut rng, &mut held, pool, result)
            }
        };
        if closed {
            held.drain(..).for_each(let_go);
            return;
        }
        for _ in 0..rng.below(3) {
            tokio::task::yield_now().await;
        }
    }
}

/// Runs `reclaim_ahead(low_water)` on `pool` (in half the epochs): each future for a few
/// milliseconds, then dropped (ending a round it drives) and made again; at a checkpoint it is
/// dropped and the task parks like a worker. It ends when the pool closes.
async fn ahead_worker(
    epoch: Arc<Epoch>,
    counters: Arc<Counters>,
    pool: usize,
    low_water: usize,
    seed: u64,
) {
    let mut rng = Rng(seed | 1);
    loop {
        if epoch.checkpoint.requested.load(Relaxed) {
            epoch.checkpoint.parked.fetch_add(1, Relaxed);
            while epoch.checkpoint.requested.load(Relaxed) {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            epoch.checkpoint.parked.fetch_sub(1, Relaxed);
        }
        counters.ahead_runs.fetch_add(1, Relaxed);
        let ahead = epoch.nodes[pool].pool.reclaim_ahead(low_water);
        let slice = Duration::from_micros(500 + rng.below(5_000) as u64);
        // With `--faults`, a cache's panic is passed on to its poll (or its drop, which ends
        // the round it drives), and a hostile waker may panic in a release the round makes.
        let run = caught_async(Site::Ahead, tokio::time::timeout(slice, ahead)).await;
        if let Some(Ok(())) = run {
            return;
        }
        if epoch.nodes[pool].pool.is_closed() {
            return;
        }
    }
}

/// `--secs N` (30 by default), and the fault rate if `--faults` or `--fault-rate R` is given.
fn parse_args() -> (u64, Option<f64>) {
    let usage = || -> ! {
        eprintln!("usage: soak [--secs N] [--faults] [--fault-rate R (0 to 1, default 0.01)]");
        std::process::exit(2);
    };
    let mut args = std::env::args().skip(1);
    let mut secs = 30;
    let mut fault_rate = None;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--secs" => {
                secs = args
                    .next()
                    .and_then(|value| value.parse().ok())
                    .unwrap_or_else(|| usage());
            }
            "--faults" => {
                fault_rate.get_or_insert(0.01);
            }
            "--fault-rate" => {
                let rate = args
                    .next()
                    .and_then(|value| value.parse::<f64>().ok())
                    .filter(|rate| (0.0..=1.0).contains(rate))
                    .unwrap_or_else(|| usage());
                fault_rate = Some(rate);
            }
            _ => usage(),
        }
    }
    (secs, fault_rate)
}

fn main() {
    let (secs, fault_rate) = parse_args();
    if let Some(rate) = fault_rate {
        enable_faults(rate);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counters = Arc::new(Counters::default());
    let progress = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));

    // The watchdog: progress must move, or the process fails instead of hanging CI.
    let watchdog = {
        let counters = counters.clone();
        let progress = progress.clone();
        let finished = finished.clone();
        std::thread::spawn(move || {
            let mut last = (u64::MAX, u64::MAX);
            let mut still_since = Instant::now();
            while !finished.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                // With `--faults`, an epoch's teardown has a bound of its own (some of its steps
                // are unbounded waits, as a pool's drop): the step it is stuck at is named.
                let teardown = TEARDOWN
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                if let Some((step, began)) = teardown {
                    if began.elapsed() > TEARDOWN_BOUND {
                        fail(&format!(
                            "an epoch's teardown has taken {:?} (bound {TEARDOWN_BOUND:?}), \
                             stuck at: {step}",
                            began.elapsed()
                        ));
                    }
                    still_since = Instant::now();
                    continue;
                }
                let now = (
                    counters.allocations.load(Relaxed)
                        + counters.reservations.load(Relaxed)
                        + counters.closed.load(Relaxed),
                    progress.load(Relaxed),
                );
                if now != last {
                    last = now;
                    still_since = Instant::now();
                } else if still_since.elapsed() > WAIT_BOUND {
                    fail(&format!(
                        "no progress for {WAIT_BOUND:?}: hang{}",
                        current_accounts()
                    ));
                }
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let started = Instant::now();
    while Instant::now() < deadline {
        run_epoch(&runtime, &mut rng, &counters);
        progress.fetch_add(1, Relaxed);
        let epochs = counters.epochs.fetch_add(1, Relaxed) + 1;
        if epochs % 5 == 0 {
            let faults_so_far = faults().map_or(String::new(), |faults| {
                format!("  {} faults injected", faults.injected_total())
            });
            println!(
                "{:6.1} s  {} epochs  {} allocations  {} reservations  {} cancelled  max wait {} \
                 us{faults_so_far}",
                started.elapsed().as_secs_f64(),
                epochs,
                counters.allocations.load(Relaxed),
                counters.reservations.load(Relaxed),
                counters.cancelled.load(Relaxed),
                counters.max_wait_micros.load(Relaxed),
            );
        }
    }
    finished.store(true, Relaxed);
    watchdog.join().expect("watchdog");
    let c = &counters;
    println!("---");
    println!(
        "soak: passed in {:.1} s: {} epochs ({} pools), {} allocations, {} waited, {} cancelled, \
         {} would block, {} timed out, {} exceeded a budget, {} closed, {} resizes, \
         max wait {} us; 0 bytes in use in every pool at the end of every epoch",
        started.elapsed().as_secs_f64(),
        c.epochs.load(Relaxed),
        c.pools.load(Relaxed),
        c.allocations.load(Relaxed),
        c.waits.load(Relaxed),
        c.cancelled.load(Relaxed),
        c.would_block.load(Relaxed),
        c.timed_out.load(Relaxed),
        c.exceeded.load(Relaxed),
        c.closed.load(Relaxed),
        c.resizes.load(Relaxed),
        c.max_wait_micros.load(Relaxed),
    );
    println!(
        "reservations: {} made, {} grows, {} shrinks, {} splits, {} merges ({} refused across \
         pools), {} allocations out of them",
        c.reservations.load(Relaxed),
        c.grows.load(Relaxed),
        c.shrinks.load(Relaxed),
        c.splits.load(Relaxed),
        c.merges.load(Relaxed),
        c.merges_refused.load(Relaxed),
        c.allocations_from_reservations.load(Relaxed),
    );
    println!(
        "checkpoints:  {} quiescent checks of every pool ({} after shedding some items), \
         {} allocations and {} reserved bytes held there, accounted exactly",
        c.checkpoints.load(Relaxed),
        c.checkpoint_sheds.load(Relaxed),
        c.checked_allocations.load(Relaxed),
        c.checked_reserved_bytes.load(Relaxed),
    );
    println!(
        "reclaim:      {} rounds freed {} of {} bytes asked in {:.3} s (pools' stats, every \
         epoch's equal to what the caches' futures reported); caches: {} items put in ({} \
         bytes), asked {} times ({} gave back at once, {} from a batch after yields, {} one \
         entry per poll), {} registrations, {} dropped, {} made again from inside reclaim, \
         {} entries shed at checkpoints, {} emptied at close; {} reclaim_ahead runs",
        c.reclaim_rounds.load(Relaxed),
        c.reclaimed_bytes.load(Relaxed),
        c.reclaim_asked_bytes.load(Relaxed),
        Duration::from_nanos(c.reclaim_nanos.load(Relaxed)).as_secs_f64(),
        c.stashed.load(Relaxed),
        c.stashed_bytes.load(Relaxed),
        c.reclaim_now.load(Relaxed)
            + c.reclaim_batch.load(Relaxed)
            + c.reclaim_trickle.load(Relaxed),
        c.reclaim_now.load(Relaxed),
        c.reclaim_batch.load(Relaxed),
        c.reclaim_trickle.load(Relaxed),
        c.registrations.load(Relaxed),
        c.unregistrations.load(Relaxed),
        c.self_registrations.load(Relaxed),
        c.cache_sheds.load(Relaxed),
        c.cache_cleared.load(Relaxed),
        c.ahead_runs.load(Relaxed),
    );
    if let Some(faults) = faults() {
        println!("faults:       {}", faults.summary());
    }
}

/// A random tree: a root, two or three children, up to two grandchildren under each child.
/// Budgets: each child's is a quarter to five quarters of its parent's (so some are above
/// it), at least four of its own buffers.
fn build_tree(rng: &mut Rng) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let add = |rng: &mut Rng, nodes: &mut Vec<Node>, name: String, parent: Option<usize>| {
        let (buffer_size, max_memory) = match parent {
            None => {
                let size = BufferSize::ALL[rng.below(8)];
                (size, size.bytes() * (4 + rng.below(60)))
            }
            Some(parent) => {
                let parent_budget = nodes[parent].ceiling.load(Relaxed);
                let budget = parent_budget / 4 + rng.below(parent_budget + 1);
                // A buffer size at most a quarter of the budget (and 8 bytes at least).
                let fitting = BufferSize::ALL
                    .iter()
                    .filter(|size| size.bytes() * 4 <= budget.max(32))
                    .count()
                    .clamp(1, 8);
                let size = BufferSize::ALL[rng.below(fitting)];
                (size, budget.max(4 * size.bytes()))
            }
        };
        let cfg = BufPoolCfg {
            buffer_size,
            max_memory,
        };
        let pool = match parent {
            None => BufPool::builder(cfg).name(name.as_str()).build(),
            Some(parent) => nodes[parent].pool.child(name.as_str(), cfg),
        }
        .expect("a valid budget");
        let index = nodes.len();
        // The smallest budget on the chain: at least one buffer of this pool's? Not always
        // (a child's buffers may be larger than an ancestor's budget allows): then 1.
        let fitting = parent.map_or(max_memory, |parent| {
            nodes[parent].chain.iter().fold(max_memory, |least, &at| {
                least.min(nodes[at].ceiling.load(Relaxed))
            })
        });
        let fitting = fitting.max(buffer_size.bytes());
        let mut chain = vec![index];
        if let Some(parent) = parent {
            chain.extend(nodes[parent].chain.iter().copied());
            nodes[parent].children.push(index);
        }
        nodes.push(Node {
            pool,
            name,
            chain,
            children: Vec::new(),
            buffer_size: buffer_size.bytes(),
            max_buffers: max_memory / buffer_size.bytes(),
            fitting_buffers: fitting / buffer_size.bytes(),
            ceiling: AtomicUsize::new(max_memory),
            live_bytes: AtomicUsize::new(0),
            reserved_bytes: AtomicUsize::new(0),
            allocations: AtomicUsize::new(0),
        });
        index
    };
    add(rng, &mut nodes, "root".into(), None);
    for child in 0..2 + rng.below(2) {
        let index = add(rng, &mut nodes, format!("c{child}"), Some(0));
        for grandchild in 0..rng.below(3) {
            add(
                rng,
                &mut nodes,
                format!("c{child}.g{grandchild}"),
                Some(index),
            );
        }
    }
    nodes
}

/// Every pool's `in_use_bytes` is within what its budget ever was this epoch (at any time).
fn check_budgets(epoch: &Epoch) {
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        let ceiling = node.ceiling.load(Relaxed);
        if stats.in_use_bytes > ceiling {
            fail(&format!(
                "{} has {} bytes in use, budget at most {ceiling}",
                node.name, stats.in_use_bytes
            ));
        }
    }
}

/// With `--faults` (for a failure's message): every pool's stats, and what the workers hold in
/// it.
fn accounts(epoch: &Epoch) -> String {
    if faults().is_none() {
        return String::new();
    }
    let mut lines = String::from(":");
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        lines.push_str(&format!(
            "\n  {:8} in use {:>8} (workers hold {:>8} in its subtree), reserved {:>8} (hold \
             {:>8}), outstanding {:>3} (hold {:>3}), waiting {:>3}, budget {}",
            node.name,
            stats.in_use_bytes,
            node.live_bytes.load(Relaxed),
            stats.reserved_bytes,
            node.reserved_bytes.load(Relaxed),
            stats.outstanding,
            node.allocations.load(Relaxed),
            stats.waiting,
            stats.max_memory,
        ));
    }
    lines
}

/// With every worker parked: every pool's counters are exactly what the workers hold.
fn check_quiescent(epoch: &Epoch, counters: &Counters) {
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        let want = (
            node.live_bytes.load(Relaxed),
            node.reserved_bytes.load(Relaxed),
            node.allocations.load(Relaxed),
            0,
        );
        let got = (
            stats.in_use_bytes,
            stats.reserved_bytes,
            stats.outstanding,
            stats.waiting,
        );
        if got != want {
            fail(&format!(
                "checkpoint: {} has (in use, reserved, outstanding, waiting) {got:?}, the \
                 workers hold {want:?}: {stats}",
                node.name
            ));
        }
        if stats.in_use_bytes > node.ceiling.load(Relaxed) {
            fail(&format!(
                "checkpoint: {} over its budget: {stats}",
                node.name
            ));
        }
        counters
            .checked_allocations
            .fetch_add(stats.outstanding as u64, Relaxed);
        counters
            .checked_reserved_bytes
            .fetch_add(stats.reserved_bytes as u64, Relaxed);
    }
    let report = epoch.nodes[0].pool.report();
    let mut seen = 0;
    check_report(epoch, &report, 0, &mut seen);
    if seen != epoch.nodes.len() {
        fail(&format!(
            "checkpoint: the report shows {seen} pools:\n{report}"
        ));
    }
}

fn check_report(epoch: &Epoch, report: &PoolReport, index: usize, seen: &mut usize) {
    *seen += 1;
    let node = &epoch.nodes[index];
    let stats = node.pool.stats();
    if report.name.as_deref() != Some(node.name.as_str())
        || (
            report.in_use_bytes,
            report.reserved_bytes,
            report.outstanding,
        ) != (stats.in_use_bytes, stats.reserved_bytes, stats.outstanding)
        || report.children.len() != node.children.len()
    {
        fail(&format!(
            "checkpoint: the report of {} differs from its stats {stats}:\n{report}",
            node.name
        ));
    }
    // The caches registered with this pool, by name, with their priorities and estimates.
    let mut want: Vec<(String, u32, usize)> = Vec::new();
    for (slot, cache) in epoch.caches.iter().enumerate() {
        let registration = epoch.registrations[slot]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let (true, Some((_, priority))) = (cache.pool == index, registration.as_ref()) {
            want.push((format!("cache{slot}"), *priority, cache.estimate()));
        }
    }
    let mut got: Vec<(String, u32, usize)> = report
        .reclaimers
        .iter()
        .map(|r| (r.name.to_string(), r.priority, r.estimate))
        .collect();
    want.sort();
    got.sort();
    if want != got {
        fail(&format!(
            "checkpoint: {} reports the reclaimers {got:?}, registered are {want:?}:\n{report}",
            node.name
        ));
    }
    for child in &report.children {
        let Some(&child_index) = node
            .children
            .iter()
            .find(|&&c| Some(epoch.nodes[c].name.as_str()) == child.name.as_deref())
        else {
            fail(&format!(
                "checkpoint: an unknown child in the report:\n{report}"
            ));
        };
        check_report(epoch, child, child_index, seen);
    }
}

/// Parks every worker, checks the pools, lets them go on.
async fn checkpoint(epoch: &Epoch, counters: &Counters) {
    let checkpoint = &epoch.checkpoint;
    checkpoint.requested.store(true, Relaxed);
    let started = Instant::now();
    let mut last_round = started;
    let mut shed = false;
    while checkpoint.parked.load(Relaxed) < epoch.workers {
        // A worker waiting for budget that parked ones hold cannot park: they shed some of
        // it, an item each per round, until it can.
        if started.elapsed() > Duration::from_millis(50)
            && last_round.elapsed() > Duration::from_millis(2)
        {
            checkpoint.shed_tokens.fetch_add(1, Relaxed);
            // The caches shed an entry each too (a cache whose registration is dropped now
            // gives nothing back to a waiter).
            for cache in &epoch.caches {
                if let Some(entry) = cache.pop() {
                    counters.cache_sheds.fetch_add(1, Relaxed);
                    caught(Site::CacheDrop, || drop(entry));
                }
            }
            last_round = Instant::now();
            shed = true;
        }
        if started.elapsed() > WAIT_BOUND {
            fail(&format!(
                "checkpoint: only {} of {} workers parked{}",
                checkpoint.parked.load(Relaxed),
                epoch.workers,
                accounts(epoch)
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    check_quiescent(epoch, counters);
    counters.checkpoints.fetch_add(1, Relaxed);
    if shed {
        counters.checkpoint_sheds.fetch_add(1, Relaxed);
    }
    checkpoint.shed_tokens.store(0, Relaxed);
    checkpoint.requested.store(false, Relaxed);
}

fn run_epoch(runtime: &tokio::runtime::Runtime, rng: &mut Rng, counters: &Arc<Counters>) {
    let nodes = build_tree(rng);
    counters.pools.fetch_add(nodes.len() as u64, Relaxed);
    let initial: Vec<usize> = nodes
        .iter()
        .map(|node| node.ceiling.load(Relaxed) / node.buffer_size)
        .collect();
    let resizing = rng.below(2) == 0;
    let hostile = if faults().is_some() {
        HOSTILE_TASKS + HOSTILE_THREADS
    } else {
        0
    };
    // The caches: the first on the root or a child, the second on any pool; each keeps up to
    // a quarter to three quarters of its pool's first budget.
    let caches: Vec<(usize, usize, u64)> = (0..CACHES)
        .map(|slot| {
            let pool = match (slot, rng.below(2)) {
                (0, 0) => 0,
                (0, _) => nodes[0].children[rng.below(nodes[0].children.len())],
                _ => rng.below(nodes.len()),
            };
            let capacity = nodes[pool].ceiling.load(Relaxed) * (1 + rng.below(3)) / 4;
            (pool, capacity, rng.next())
        })
        .collect();
    // Half the epochs: a `reclaim_ahead` on one cache's pool, its low-water mark a fifth to a
    // half of the pool's first budget.
    let ahead = (rng.below(2) == 0).then(|| {
        let pool = caches[rng.below(CACHES)].0;
        let low_water = nodes[pool].ceiling.load(Relaxed) / (2 + rng.below(4));
        (pool, low_water, rng.next())
    });
    let epoch = Arc::new_cyclic(|weak: &Weak<Epoch>| Epoch {
        nodes,
        checkpoint: Checkpoint::default(),
        workers: WORKERS + hostile + usize::from(ahead.is_some()),
        caches: caches
            .iter()
            .enumerate()
            .map(|(slot, &(pool, capacity, seed))| {
                Arc::new(Cache {
                    slot,
                    pool,
                    capacity,
                    epoch: weak.clone(),
                    counters: Arc::clone(counters),
                    state: Mutex::new(CacheState {
                        entries: VecDeque::new(),
                        closed: false,
                        rng: Rng(seed | 1),
                    }),
                    bytes: AtomicUsize::new(0),
                    reported: Arc::new(AtomicUsize::new(0)),
                })
            })
            .collect(),
        registrations: (0..CACHES).map(|_| Mutex::new(None)).collect(),
    });
    *CURRENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::downgrade(&epoch));
    let mut cache_rng = Rng(rng.next() | 1);
    for slot in 0..CACHES {
        register(&epoch, slot, PRIORITIES[cache_rng.below(PRIORITIES.len())]);
        counters.registrations.fetch_add(1, Relaxed);
    }

    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let epoch = epoch.clone();
            let counters = counters.clone();
            let seed = rng.next() ^ i as u64;
            std::thread::spawn(move || thread_worker(&epoch, &counters, seed))
        })
        .collect();
    let seeds: Vec<u64> = (0..TASKS).map(|_| rng.next()).collect();
    let resize_seed = rng.next();
    // With `--faults`, the hostile workers (their seeds drawn last).
    let hostile_seeds: Vec<u64> = (0..hostile).map(|_| rng.next()).collect();
    let (hostile_thread_seeds, hostile_task_seeds) =
        hostile_seeds.split_at(hostile.min(HOSTILE_THREADS));
    let hostile_threads: Vec<_> = hostile_thread_seeds
        .iter()
        .map(|&seed| {
            let epoch = epoch.clone();
            let counters = counters.clone();
            std::thread::spawn(move || hostile_thread(&epoch, &counters, seed))
        })
        .collect();
    runtime.block_on(async {
        let tasks: Vec<_> = seeds
            .into_iter()
            .map(|seed| tokio::spawn(task_worker(epoch.clone(), counters.clone(), seed)))
            .chain(
                hostile_task_seeds
                    .iter()
                    .map(|&seed| tokio::spawn(hostile_task(epoch.clone(), counters.clone(), seed))),
            )
            .chain(ahead.map(|(pool, low_water, seed)| {
                tokio::spawn(ahead_worker(
                    epoch.clone(),
                    counters.clone(),
                    pool,
                    low_water,
                    seed,
                ))
            }))
            .collect();
        let mut rng = Rng(resize_seed | 1);
        let started = Instant::now();
        let mut checkpoints = 0;
        while started.elapsed() < EPOCH {
            tokio::time::sleep(Duration::from_millis(50)).await;
            check_budgets(&epoch);
            if checkpoints < CHECKPOINTS
                && started.elapsed() >= EPOCH * (checkpoints + 1) / (CHECKPOINTS + 1)
            {
                checkpoint(&epoch, counters).await;
                checkpoints += 1;
            }
            if resizing {
                // A random pool, within [1, 2 x its first budget] buffers; each pool's
                // ceiling only ever rises in an epoch.
                let index = rng.below(epoch.nodes.len());
                let node = &epoch.nodes[index];
                let buffers = 1 + rng.below(2 * initial[index]);
                let bytes = buffers * node.buffer_size;
                node.ceiling.fetch_max(bytes, Relaxed);
                // With `--faults`, the waiters it serves or fails may have hostile wakers.
                caught(Site::Resize, || {
                    node.pool.set_max_memory(bytes).expect("a valid budget");
                });
                counters.resizes.fetch_add(1, Relaxed);
            }
            // Half the ticks: a cache's registration dropped, or made again (at a new priority,
            // replacing the one it has, if any).
            if cache_rng.below(2) == 0 {
                let slot = cache_rng.below(CACHES);
                let priority = PRIORITIES[cache_rng.below(PRIORITIES.len())];
                if cache_rng.below(2) == 0 && unregister(&epoch, slot) {
                    counters.unregistrations.fetch_add(1, Relaxed);
                } else {
                    caught(Site::Register, || register(&epoch, slot, priority));
                    counters.registrations.fetch_add(1, Relaxed);
                }
            }
        }
        // Closing the root closes the whole tree.
        let root = &epoch.nodes[0].pool;
        teardown_step(|| "closing the root".to_string());
        // With `--faults`, the waiters it fails may have hostile wakers; the whole tree is
        // closed before any of them runs.
        caught(Site::Close, || root.close());
        if epoch.nodes.iter().any(|node| !node.pool.is_closed()) {
            fail("closing the root left a pool of its tree open");
        }
        // The caches take nothing in any more and give everything back (the pools cannot
        // drain otherwise); their registrations go.
        teardown_step(|| "emptying the caches".to_string());
        for (slot, cache) in epoch.caches.iter().enumerate() {
            for entry in cache.close() {
                counters.cache_cleared.fetch_add(1, Relaxed);
                caught(Site::CacheDrop, || drop(entry));
            }
            unregister(&epoch, slot);
        }
        teardown_step(|| "waiting for the root to drain".to_string());
        let drained = tokio::time::timeout(WAIT_BOUND, root.drained()).await;
        if drained.is_err() {
            fail(&format!(
                "drained() hung:\n{}{}",
                root.report(),
                accounts(&epoch)
            ));
        }
        teardown_step(|| "joining the tasks".to_string());
        for task in tasks {
            tokio::time::timeout(WAIT_BOUND, task)
                .await
                .unwrap_or_else(|_| fail("a task did not stop after close()"))
                .expect("a task panicked");
        }
    });
    teardown_step(|| "joining the threads".to_string());
    for thread in threads.into_iter().chain(hostile_threads) {
        thread.join().expect("a worker thread panicked");
    }
    // A cache may have registered itself again from a round that raced the close.
    for (slot, cache) in epoch.caches.iter().enumerate() {
        unregister(&epoch, slot);
        if cache.estimate() != 0 || !cache.state().entries.is_empty() {
            fail(&format!("cache{slot} not empty at the end of the epoch"));
        }
    }
    let mut reclaimed = 0;
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        counters
            .reclaim_rounds
            .fetch_add(stats.reclaim_rounds as u64, Relaxed);
        counters
            .reclaim_asked_bytes
            .fetch_add(stats.reclaim_asked_bytes as u64, Relaxed);
        counters
            .reclaimed_bytes
            .fetch_add(stats.reclaimed_bytes as u64, Relaxed);
        counters
            .reclaim_nanos
            .fetch_add(stats.reclaim_time.as_nanos() as u64, Relaxed);
        reclaimed += stats.reclaimed_bytes;
    }
    let reported: usize = epoch
        .caches
        .iter()
        .map(|cache| cache.reported.load(Relaxed))
        .sum();
    if reported != reclaimed {
        fail(&format!(
            "the caches' futures reported {reported} bytes freed, the pools count {reclaimed} \
             reclaimed"
        ));
    }
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        if stats.in_use_bytes != 0
            || stats.reserved_bytes != 0
            || stats.outstanding != 0
            || stats.waiting != 0
        {
            fail(&format!(
                "epoch ended with {} at {stats}{}",
                node.name,
                accounts(&epoch)
            ));
        }
        let held = (
            node.live_bytes.load(Relaxed),
            node.reserved_bytes.load(Relaxed),
            node.allocations.load(Relaxed),
        );
        if held != (0, 0, 0) {
            fail(&format!(
                "{}: held counts not back to zero: {held:?}",
                node.name
            ));
        }
    }
    if faults().is_some() {
        // Each pool's drop (a barrier until it is drained) in turn, in the tree's order, so
        // that the watchdog can name the one that does not return.
        match Arc::try_unwrap(epoch) {
            Ok(epoch) => {
                for node in epoch.nodes {
                    teardown_step(|| {
                        format!("dropping pool {} ({})", node.name, node.pool.stats())
                    });
                    caught(Site::PoolDrop, || drop(node));
                }
            }
            Err(epoch) => {
                teardown_step(|| "dropping the tree (still shared)".to_string());
                caught(Site::PoolDrop, || drop(epoch));
            }
        }
        teardown_done();
    }
}
