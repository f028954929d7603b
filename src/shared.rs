//! The state every handle of one pool shares: the budget word, the wait queue and the drain
//! event, with the reserve/release protocol that keeps them consistent.
//!
//! # The budget word
//!
//! `state` is one 64-bit word, so one atomic read-modify-write both checks and changes all
//! of it together. From the top:
//!
//! * `CLOSED`: no new reservation succeeds.
//! * `QUEUED`: the wait queue is not empty. Reservations then go through the lock (FIFO: no
//!   newcomer takes budget ahead of a waiter) and so do releases (to hand the bytes on).
//!   It is set and cleared only under the lock.
//! * `DRAIN_WAIT`: someone waits for the bytes in use to reach zero; the release that gets
//!   there clears it and notifies them.
//! * the bytes in use (a multiple of 8, stored without its three zero bits);
//! * two 6-bit counters of the allocations and releases made on the fast path, modulo 64.
//!   Every 64th one spills into a separate counter, and the slow paths count elsewhere
//!   (under the queue lock, or where a waiter takes its grant): so [`PoolStats`] counts
//!   allocations exactly without a second read-modify-write on the fast path (which measured
//!   about a quarter of its cost).
//!
//! With no flag set, a reservation is one compare-exchange and a release is one
//! compare-exchange: no lock, no notification.

use core::task::Waker;
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::queue::{Status, WaitQueue, WakeList};
use crate::raw::{Footprint, Recycler};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex, lock};
use crate::{AllocError, BufferSize, PoolStats};
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

pub(crate) const CLOSED: u64 = 1 << 63;
pub(crate) const QUEUED: u64 = 1 << 62;
pub(crate) const DRAIN_WAIT: u64 = 1 << 61;
/// Under loom the counters wrap every fourth count, so the models go through the wrap paths.
const COUNTER_BITS: u32 = if cfg!(loom) { 2 } else { 6 };
/// How many counts one wrap of a word counter stands for.
const COUNTER_WRAP: usize = 1 << COUNTER_BITS;
const ALLOCATED: u64 = (1 << COUNTER_BITS) - 1;
const ALLOCATED_ONE: u64 = 1;
const RELEASED: u64 = ALLOCATED << COUNTER_BITS;
const RELEASED_ONE: u64 = 1 << COUNTER_BITS;
/// Bytes in use are a multiple of 8: shifted by this, their three zero bits lie under the
/// two counters.
const IN_USE_SHIFT: u32 = 2 * COUNTER_BITS - 3;
const IN_USE: u64 = !(CLOSED | QUEUED | DRAIN_WAIT | ALLOCATED | RELEASED);

/// The most bytes the word counts: 2 PiB, far above any machine's memory, with room to spare
/// below the flags. A larger `max_memory` is accepted and counts as this.
pub(crate) const MAX_COUNTED: u64 = 1 << 51;

/// `granted_through` before any grant: tickets start at 1, so no ticket is taken for granted.
const NOT_GRANTED: u64 = 0;

/// `bytes` as they are added to the word.
#[inline]
const fn in_use_field(bytes: usize) -> u64 {
    (bytes as u64) << IN_USE_SHIFT
}

/// The bytes in use that `state` holds.
#[inline]
pub(crate) const fn in_use_of(state: u64) -> usize {
    // At most `MAX_COUNTED`, and at most `max_memory`: it fits a `usize`.
    ((state & IN_USE) >> IN_USE_SHIFT) as usize
}

/// `state` with one more on the counter under `mask`, and whether that wrapped it to zero.
#[inline]
const fn count_one(state: u64, mask: u64, one: u64) -> (u64, bool) {
    if state & mask == mask {
        (state & !mask, true)
    } else {
        (state + one, false)
    }
}

/// The budget the word enforces for a configured `max_memory`.
pub(crate) const fn counted_budget(max_memory: usize) -> usize {
    if max_memory as u64 > MAX_COUNTED {
        MAX_COUNTED as usize
    } else {
        max_memory
    }
}

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

/// A queued request's claim: its slot and ticket, and the failure epoch when it was queued.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    key: usize,
    ticket: u64,
    failures_seen: u64,
}

/// What a reservation that may wait got.
#[derive(Debug)]
pub(crate) enum Reservation {
    /// The bytes are reserved.
    Reserved,
    /// The request waits in the queue.
    Queued(Ticket),
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

#[derive(Debug)]
pub(crate) struct Shared {
    /// Written by every allocation and release: alone on its line.
    state: CacheLine<AtomicU64>,
    // Read by every allocation, written rarely.
    /// The budget enforced: `max_memory`, or [`MAX_COUNTED`] if that is larger.
    budget: AtomicUsize,
    /// The budget as configured, for [`PoolStats`].
    max_memory: AtomicUsize,
    peak_in_use: AtomicUsize,
    pub(crate) buffer_size: BufferSize,
    pub(crate) align: usize,
    pub(crate) recycler: Recycler,
    /// How long `Drop` waits before it says on stderr what it waits for.
    pub(crate) drop_warning_after: Duration,
    /// Written by the waiting paths: on lines of their own, so that waiting does not slow the
    /// fast path of other threads.
    slow: CacheLine<SlowPath>,
    queue: CacheLine<Mutex<WaitQueue>>,
    drained: Event,
}

#[derive(Debug, Default)]
struct SlowPath {
    /// Allocations and releases counted outside the word's two counters: 64 for each wrap,
    /// and one for each grant a waiter takes without the lock (the queue counts the rest).
    /// Allocations made less releases is the live count.
    allocations_spilled: AtomicUsize,
    releases_spilled: AtomicUsize,
    would_block: AtomicUsize,
    timed_out: AtomicUsize,
    waiting: AtomicUsize,
    /// The ticket of the last request granted: grants go in ticket order, so every request
    /// with a ticket up to this one is out of the queue, granted unless it failed.
    granted_through: AtomicU64,
    /// Bumped whenever queued requests fail (close, a shrunken budget): a waiter that sees it
    /// unchanged since it queued was not failed, so `granted_through` alone tells its grant.
    failures: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        buffer_size: BufferSize,
        max_memory: usize,
        align: usize,
        recycler: Recycler,
        drop_warning_after: Duration,
    ) -> Self {
        Shared {
            state: CacheLine(AtomicU64::new(0)),
            budget: AtomicUsize::new(counted_budget(max_memory)),
            max_memory: AtomicUsize::new(max_memory),
            peak_in_use: AtomicUsize::new(0),
            buffer_size,
            align,
            recycler,
            drop_warning_after,
            slow: CacheLine(SlowPath::default()),
            queue: CacheLine(Mutex::new(WaitQueue::new())),
            drained: Event::new(),
        }
    }

    /// The fast path, shared by every call form: bad input fails, and the bytes of `n`
    /// buffers are reserved if they are free and nobody waits, with one compare-exchange.
    #[inline(always)]
    pub(crate) fn reserve_now(&self, n: usize) -> Attempt {
        // The word first, then the budget, and the budget again after every failed
        // compare-exchange: `set_max_memory` changes the budget only while it holds `QUEUED`
        // set (see there). The `Acquire` here pairs with the `Release` of the compare-exchange
        // that cleared `QUEUED` after the new budget was stored, so a word without `QUEUED`
        // read here comes with the budget in force; and a word read before a resize set
        // `QUEUED` fails the compare-exchange below, which reloads both.
        let mut state = self.state.load(Acquire);
        loop {
            let budget = self.budget.load(Relaxed);
            let shift = self.buffer_size.shift();
            // `n * buffer_size <= budget` exactly when `n <= budget >> shift`, which also
            // rules out overflow.
            if n == 0 || n > budget >> shift {
                return Attempt::Failed(self.refusal(n, budget));
            }
            let bytes = n << shift;
            let in_use = in_use_of(state);
            if state & (CLOSED | QUEUED) != 0 || bytes > budget.saturating_sub(in_use) {
                return if state & CLOSED != 0 {
                    Attempt::Failed(AllocError::Closed)
                } else {
                    Attempt::MustWait(bytes)
                };
            }
            let (counted, wrapped) = count_one(state, ALLOCATED, ALLOCATED_ONE);
            match self.state.compare_exchange_weak(
                state,
                counted + in_use_field(bytes),
                Acquire,
                Acquire,
            ) {
                Ok(_) => {
                    if wrapped {
                        self.slow
                            .allocations_spilled
                            .fetch_add(COUNTER_WRAP, Relaxed);
                    }
                    self.note_in_use(in_use + bytes);
                    return Attempt::Reserved(bytes);
                }
                Err(actual) => state = actual,
            }
        }
    }

    #[cold]
    fn refusal(&self, n: usize, budget: usize) -> AllocError {
        if n == 0 {
            AllocError::ZeroBuffers
        } else {
            AllocError::ExceedsBudget {
                requested_bytes: n.saturating_mul(self.buffer_size.bytes()),
                max_memory: budget,
            }
        }
    }

    /// Keeps the peak: a plain load in the common case that it did not grow.
    #[inline]
    fn note_in_use(&self, in_use: usize) {
        if in_use > self.peak_in_use.load(Relaxed) {
            self.peak_in_use.fetch_max(in_use, Relaxed);
        }
    }

    /// The slow path: under the lock, reserves `bytes` if nobody waits and they fit, or else
    /// queues the request behind every earlier one.
    pub(crate) fn reserve_or_enqueue(
        &self,
        bytes: usize,
        waker: &Waker,
    ) -> Result<Reservation, AllocError> {
        // Clone before anything changes: a `clone` that panics then leaves no trace. The clock
        // is read before the lock, not under it: other threads wait for that lock.
        let waker = waker.clone();
        let now = Instant::now();
        let mut queue = lock(&self.queue);
        let budget = self.budget.load(Relaxed);
        if bytes > budget {
            // A concurrent shrink of the budget made the request impossible.
            return Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: budget,
            });
        }
        let mut state = self.state.load(Acquire);
        loop {
            let next = if state & CLOSED != 0 {
                return Err(AllocError::Closed);
            } else if state & QUEUED != 0 {
                break;
            } else if bytes <= budget.saturating_sub(in_use_of(state)) {
                state + in_use_field(bytes)
            } else {
                state | QUEUED
            };
            match self.state.compare_exchange(state, next, AcqRel, Acquire) {
                Ok(_) if next & QUEUED == 0 => {
                    queue.count_allocation();
                    self.note_in_use(in_use_of(next));
                    return Ok(Reservation::Reserved);
                }
                Ok(_) => break,
                Err(actual) => state = actual,
            }
        }
        let (key, ticket) = queue.push_back(bytes, waker, now);
        self.slow.waiting.store(queue.len(), Relaxed);
        Ok(Reservation::Queued(Ticket {
            key,
            ticket,
            // Changed only under the lock, which we hold.
            failures_seen: self.slow.failures.load(Relaxed),
        }))
    }

    /// Checks a queued request: `Some` once it is out of the queue (its slot is then freed).
    ///
    /// A grant is seen without the lock (the common case: the waiter was woken for it); only
    /// a request still waiting, or one that may have failed, takes it.
    #[inline]
    pub(crate) fn poll_queued(
        &self,
        ticket: Ticket,
        waker: &Waker,
    ) -> Option<Result<(), AllocError>> {
        // `granted_through` first: its `Acquire` makes every failure before that grant visible.
        if self.slow.granted_through.load(Acquire) >= ticket.ticket
            && self.slow.failures.load(Acquire) == ticket.failures_seen
        {
            self.slow.allocations_spilled.fetch_add(1, Relaxed);
            return Some(Ok(()));
        }
        self.poll_queued_locked(ticket, waker)
    }

    #[cold]
    fn poll_queued_locked(&self, ticket: Ticket, waker: &Waker) -> Option<Result<(), AllocError>> {
        // No user code under the lock: a new waker is cloned before it, and the waker it
        // replaces (or the failed request's) is dropped after it, when every change is made.
        let mut new_waker = None;
        loop {
            let mut queue = lock(&self.queue);
            let (result, old_waker) = match queue.status(ticket.key, ticket.ticket) {
                Status::Waiting => match new_waker.take() {
                    None if queue.will_wake(ticket.key, waker) => (None, None),
                    None => {
                        drop(queue);
                        new_waker = Some(waker.clone());
                        continue;
                    }
                    Some(new_waker) => (None, queue.register(ticket.key, new_waker)),
                },
                Status::Granted => {
                    queue.count_allocation();
                    (Some(Ok(())), None)
                }
                Status::Failed(error) => {
                    let (_, waker) = queue.remove(ticket.key);
                    (Some(Err(error)), waker)
                }
                Status::Vacant => unreachable!("a waiter polled a slot it no longer owns"),
            };
            drop(queue);
            drop(old_waker);
            // An unused clone (the request left the queue meanwhile) drops here, unlocked.
            drop(new_waker);
            return result;
        }
    }

    /// A queued request gives up: bytes already granted to it go to the next waiters, and a
    /// head that leaves lets the ones behind it move up.
    pub(crate) fn cancel(&self, ticket: Ticket, bytes: usize) {
        let mut wakers = WakeList::default();
        let mut notify_drained = false;
        let now = Instant::now();
        let mut own_waker = None;
        {
            let mut queue = lock(&self.queue);
            match queue.status(ticket.key, ticket.ticket) {
                Status::Granted => {
                    // Granted but never taken: not an allocation, so not a release either.
                    queue.uncount_grant();
                    let counted = false;
                    notify_drained =
                        self.settle_locked(bytes, counted, &mut queue, &mut wakers, now);
                }
                Status::Waiting => {
                    own_waker = queue.remove(ticket.key).1;
                    self.serve(&mut queue, &mut wakers, now);
                }
                Status::Failed(_) => {
                    own_waker = queue.remove(ticket.key).1;
                }
                Status::Vacant => unreachable!("a waiter cancelled a slot it no longer owns"),
            }
        }
        // User code from here on, every change made. Drain listeners first: a waker that
        // panics below must not cost them their wake-up; the others' wake-ups next, so that
        // our own waker's `drop` panicking costs only us.
        if notify_drained {
            self.drained.notify(usize::MAX);
        }
        drop(wakers);
        drop(own_waker);
    }

    /// Returns `bytes` to the budget.
    ///
    /// `keep_alive` is called before the bytes are given back whenever the release has more
    /// to do than one compare-exchange: once they are back, the pool may finish dropping, and
    /// only the returned handle keeps this `Shared` alive for the wake-ups that follow.
    ///
    /// The handle is returned, not dropped here: it may be the last one, and freeing `self`
    /// while this call still borrows it would be undefined behaviour.
    #[inline(always)]
    #[must_use = "drop the handle only after the last use of the pool"]
    pub(crate) fn release(
        &self,
        bytes: usize,
        keep_alive: impl FnOnce() -> Arc<Shared>,
    ) -> Option<Arc<Shared>> {
        let mut state = self.state.load(Relaxed);
        // A release that would wrap its counter goes the slow way, which spills it: after the
        // compare-exchange below, the pool may be gone.
        while state & (QUEUED | DRAIN_WAIT) == 0 && state & RELEASED != RELEASED {
            match self.state.compare_exchange_weak(
                state,
                state - in_use_field(bytes) + RELEASED_ONE,
                Release,
                Relaxed,
            ) {
                Ok(_) => return None,
                Err(actual) => state = actual,
            }
        }
        Some(Self::release_kept_alive(bytes, keep_alive))
    }

    #[cold]
    #[inline(never)]
    fn release_kept_alive(bytes: usize, keep_alive: impl FnOnce() -> Arc<Shared>) -> Arc<Shared> {
        let pool = keep_alive();
        pool.release_slow(bytes);
        pool
    }

    #[cold]
    fn release_slow(&self, bytes: usize) {
        let mut wakers = WakeList::default();
        let notify_drained;
        let mut state = self.state.load(Relaxed);
        loop {
            if state & QUEUED != 0 {
                let now = Instant::now();
                let mut queue = lock(&self.queue);
                let counted = true;
                notify_drained = self.settle_locked(bytes, counted, &mut queue, &mut wakers, now);
                break;
            }
            let (next, wrapped) = Self::settled(state, bytes, true, 0, 0);
            match self
                .state
                .compare_exchange_weak(state, next, AcqRel, Relaxed)
            {
                Ok(_) => {
                    self.count_spilled_release(wrapped);
                    notify_drained = Self::drained_by(state, next);
                    break;
                }
                Err(actual) => state = actual,
            }
        }
        // Drain listeners first: a waker that panics below must not cost them their wake-up.
        if notify_drained {
            self.drained.notify(usize::MAX);
        }
        drop(wakers);
    }

    fn count_spilled_release(&self, wrapped: bool) {
        if wrapped {
            self.slow.releases_spilled.fetch_add(COUNTER_WRAP, Relaxed);
        }
    }

    /// `state` less `released` bytes (counting a release if `counted`), plus `granted` bytes,
    /// less the flags in `clear`, and without `DRAIN_WAIT` when that leaves nothing in use;
    /// and whether the release counter wrapped.
    fn settled(
        state: u64,
        released: usize,
        counted: bool,
        granted: usize,
        clear: u64,
    ) -> (u64, bool) {
        let (state, wrapped) = if counted {
            count_one(state, RELEASED, RELEASED_ONE)
        } else {
            (state, false)
        };
        let next = (state - in_use_field(released) + in_use_field(granted)) & !clear;
        if next & IN_USE == 0 {
            (next & !DRAIN_WAIT, wrapped)
        } else {
            (next, wrapped)
        }
    }

    /// Whether the step `state -> next` is the one that must notify the drain waiters.
    fn drained_by(state: u64, next: u64) -> bool {
        state & DRAIN_WAIT != 0 && next & IN_USE == 0
    }

    /// With the lock held: gives `released` bytes back (counting a release if `counted`),
    /// grants the head of the queue its bytes for as long as they fit, in order, and clears
    /// `QUEUED` once the queue is empty, all in one atomic step. Called whenever budget may
    /// have come free or the head changed. Returns whether the drain waiters must be notified
    /// (after the lock is released); `now` is when the grants count as made.
    ///
    /// While the queue is not empty `QUEUED` is set, and while it is set and the lock is held
    /// nobody else adds or removes bytes in use (both fast paths refuse, and the slow ones need
    /// the lock): the room computed here is exact, and the grants never overshoot the budget.
    /// Only the flag bits may change behind our back, which the compare-exchange retries.
    fn settle_locked(
        &self,
        released: usize,
        counted: bool,
        queue: &mut WaitQueue,
        wakers: &mut WakeList,
        now: Instant,
    ) -> bool {
        let budget = self.budget.load(Relaxed);
        let mut state = self.state.load(Acquire);
        // Our `released` bytes are still counted, so this cannot underflow.
        let mut in_use = in_use_of(state) - released;
        let mut granted = 0;
        let mut last_ticket = NOT_GRANTED;
        while let Some(bytes) = queue.front_bytes() {
            if bytes > budget.saturating_sub(in_use) {
                break;
            }
            in_use += bytes;
            granted += bytes;
            if let Some((ticket, waker)) = queue.pop_front_granted(now) {
                last_ticket = ticket;
                wakers.extend(waker);
            }
        }
        self.slow.waiting.store(queue.len(), Relaxed);
        let clear = if queue.is_empty() { QUEUED } else { 0 };
        if released == 0 && granted == 0 && state & clear == 0 {
            return false;
        }
        loop {
            let (next, wrapped) = Self::settled(state, released, counted, granted, clear);
            match self
                .state
                .compare_exchange_weak(state, next, AcqRel, Acquire)
            {
                Ok(_) => {
                    self.count_spilled_release(wrapped);
                    if granted > 0 {
                        self.note_in_use(in_use_of(next));
                        // Only now that the bytes are counted may the waiters see the grant.
                        self.slow.granted_through.store(last_ticket, Release);
                    }
                    return Self::drained_by(state, next);
                }
                Err(actual) => state = actual,
            }
        }
    }

    /// [`settle_locked`](Shared::settle_locked) with nothing given back: serves whoever fits
    /// now. Never empties the pool, so never has drain waiters to notify.
    pub(crate) fn serve(&self, queue: &mut WaitQueue, wakers: &mut WakeList, now: Instant) {
        let drained = self.settle_locked(0, false, queue, wakers, now);
        debug_assert!(!drained, "serving cannot drain the pool");
    }

    /// Closes the pool: every waiter fails with `Closed`, and so does every later reservation.
    pub(crate) fn close(&self) {
        let mut wakers = WakeList::default();
        let now = Instant::now();
        {
            let mut queue = lock(&self.queue);
            self.state.fetch_or(CLOSED, AcqRel);
            if !queue.is_empty() {
                self.slow.failures.fetch_add(1, Release);
            }
            queue.fail_all(AllocError::Closed, |waker| wakers.push(waker));
            self.serve(&mut queue, &mut wakers, now);
        }
        drop(wakers);
    }

    /// Changes the budget: requests that can never fit the new one fail with
    /// `ExceedsBudget`, those that fit now are served in order, and cached blocks are freed
    /// until the footprint fits.
    ///
    /// Every reservation that succeeds after this returns is checked against the new budget.
    /// The budget is stored while `QUEUED` is set, under the lock: a fast-path
    /// compare-exchange that read the word before `QUEUED` was set fails and reloads the
    /// budget; one that reads it while `QUEUED` is set goes to the lock; and the
    /// compare-exchange that clears `QUEUED` again (in `serve`, after the store) publishes the
    /// new budget to every fast path that reads the cleared word.
    pub(crate) fn set_max_memory(&self, max_memory: usize) {
        let mut wakers = WakeList::default();
        let now = Instant::now();
        {
            let mut queue = lock(&self.queue);
            // `AcqRel`: pairs with the `Acquire` of the fast path's load (see `reserve_now`).
            self.state.fetch_or(QUEUED, AcqRel);
            let budget = counted_budget(max_memory);
            self.max_memory.store(max_memory, Relaxed);
            self.budget.store(budget, Relaxed);
            if queue.any(|bytes| bytes > budget) {
                self.slow.failures.fetch_add(1, Release);
            }
            queue.fail_where(
                |bytes| {
                    (bytes > budget).then_some(AllocError::ExceedsBudget {
                        requested_bytes: bytes,
                        max_memory: budget,
                    })
                },
                |waker| wakers.push(waker),
            );
            // Clears `QUEUED` unless requests still wait.
            self.serve(&mut queue, &mut wakers, now);
        }
        // After the budget store: a block cached under the old budget is seen here, and one
        // cached later was checked against the new budget (the cache's lock orders the two).
        self.recycler.trim(|| self.footprint());
        drop(wakers);
    }

    /// The bytes in use and the budget now, for the recycler's decisions.
    pub(crate) fn footprint(&self) -> Footprint {
        Footprint {
            in_use: self.in_use(),
            budget: self.budget(),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Acquire) & CLOSED != 0
    }

    /// Whether nothing is in use; otherwise makes sure the release that gets there notifies
    /// the drain event. Call after listening to it.
    pub(crate) fn drained_or_announce(&self) -> bool {
        in_use_of(self.state.fetch_or(DRAIN_WAIT, AcqRel)) == 0
    }

    #[inline]
    pub(crate) fn in_use(&self) -> usize {
        in_use_of(self.state.load(Acquire))
    }

    #[inline]
    pub(crate) fn budget(&self) -> usize {
        self.budget.load(Relaxed)
    }

    /// Whether requests wait for budget now.
    #[inline]
    pub(crate) fn is_contended(&self) -> bool {
        self.state.load(Relaxed) & QUEUED != 0
    }

    pub(crate) fn is_drained(&self) -> bool {
        in_use_of(self.state.load(Acquire)) == 0
    }

    pub(crate) fn drain_event(&self) -> &Event {
        &self.drained
    }

    /// Counts a `try_allocate` that found no room, and says so.
    #[cold]
    #[inline(never)]
    pub(crate) fn would_block(&self) -> AllocError {
        self.count_failure(AllocError::WouldBlock);
        AllocError::WouldBlock
    }

    pub(crate) fn count_failure(&self, error: AllocError) {
        match error {
            AllocError::WouldBlock => self.slow.would_block.fetch_add(1, Relaxed),
            AllocError::TimedOut => self.slow.timed_out.fetch_add(1, Relaxed),
            _ => 0,
        };
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let waits = lock(&self.queue).wait_stats();
        // Releases first: read the other way round, a release between the two reads could
        // make the live count negative.
        let releases_spilled = self.slow.releases_spilled.load(Acquire);
        let state = self.state.load(Acquire);
        let allocations_spilled = self.slow.allocations_spilled.load(Acquire);
        let allocations = allocations_spilled
            .wrapping_add(waits.allocations)
            .wrapping_add((state & ALLOCATED) as usize);
        let releases = releases_spilled.wrapping_add(((state & RELEASED) >> COUNTER_BITS) as usize);
        PoolStats {
            in_use_bytes: in_use_of(state),
            max_memory: self.max_memory.load(Relaxed),
            outstanding: allocations.saturating_sub(releases),
            waiting: self.slow.waiting.load(Relaxed),
            buffer_size: self.buffer_size.bytes(),
            closed: state & CLOSED != 0,
            peak_in_use_bytes: self.peak_in_use.load(Relaxed),
            total_allocations: allocations,
            waited_allocations: waits.waited,
            total_wait: waits.total,
            max_wait: waits.max,
            would_block: self.slow.would_block.load(Relaxed),
            timed_out: self.slow.timed_out.load(Relaxed),
            cached_bytes: self.recycler.cached_bytes(),
        }
    }
}
