//! A point-in-time view of a pool's counters ([`PoolStats`]), the counters behind it, and
//! how a view is assembled from them.
//!
//! Allocations and releases are counted in three places, so that the fast path pays no
//! read-modify-write of its own for them: modulo 64 in the budget word (`word.rs`), every
//! wrap of those and every release on a slow path in [`Counters`], and every allocation made
//! under the queue lock (reserved there, or granted to a waiter) in [`WaitTotals`].

use core::fmt;
use core::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::ticks_to_durations;
use crate::sync::AtomicUsize;
use crate::word::{COUNTER_WRAP, Word};

/// Counters written off the fast path, on a cache line of their own in the pool's state.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Allocations counted outside the word and the queue: [`COUNTER_WRAP`] for each wrap of
    /// the word's counter, and one for each grant its waiter took.
    allocations_spilled: AtomicUsize,
    /// Releases counted outside the word: one wrap's worth for each wrap.
    releases_spilled: AtomicUsize,
    would_block: AtomicUsize,
    timed_out: AtomicUsize,
    queue_full: AtomicUsize,
}

impl Counters {
    /// The word's allocation counter wrapped.
    pub(crate) fn allocations_wrapped(&self) {
        self.allocations_spilled.fetch_add(COUNTER_WRAP, Relaxed);
    }

    /// The word's release counter wrapped. (Ordered before the release's bytes come back by
    /// that release's own `Release` compare-exchange.)
    pub(crate) fn releases_wrapped(&self) {
        self.releases_spilled.fetch_add(COUNTER_WRAP, Relaxed);
    }

    /// Releases counted so far, wrapping (a stamp to tell whether any happened since).
    pub(crate) fn releases_now(&self, word: Word) -> usize {
        self.releases_spilled
            .load(Relaxed)
            .wrapping_add(word.releases())
    }

    /// A waiter took the bytes granted to it: an allocation, counted without the lock.
    pub(crate) fn grant_taken(&self) {
        self.allocations_spilled.fetch_add(1, Relaxed);
    }

    pub(crate) fn would_block(&self) {
        self.would_block.fetch_add(1, Relaxed);
    }

    pub(crate) fn timed_out(&self) {
        self.timed_out.fetch_add(1, Relaxed);
    }

    pub(crate) fn queue_full(&self) {
        self.queue_full.fetch_add(1, Relaxed);
    }
}

/// Allocations made under the queue lock and the waits behind them, kept under that lock at
/// no extra cost.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WaitTotals {
    /// Allocations reserved under the lock without waiting.
    pub(crate) allocations: usize,
    /// Requests granted after waiting in the queue (those dropped before they took their
    /// grant included), and how long they waited: the three change together, under the lock,
    /// so a reader always sees a mean at most the maximum, and none of them ever goes down.
    pub(crate) waited: usize,
    /// In the clock's ticks (`clock.rs`), turned into time when read.
    pub(crate) total_ticks: u64,
    pub(crate) max_ticks: u64,
    /// Budget changes, each counted once on the word's allocation counter
    /// (`BudgetWord::begin_resize`): subtracted from the allocations.
    pub(crate) resizes: usize,
    /// Releases that handed their block to the head while others still waited behind it:
    /// counted here instead of on the word, whose compare-exchange they skip (the bytes in
    /// use and `QUEUED` stay as they are, so nothing else in the word would change).
    pub(crate) handed_over: usize,
    /// The total and the maximum wait as last reported by `stats()`, which reports no less
    /// again: with the TSC every read measures the tick rate anew (against the OS clock,
    /// since the epoch), and a slightly lower estimate would turn the same ticks into less
    /// time. Ratcheted under the lock with the counts they go with, so the mean stays at most
    /// the maximum (a floor of an earlier report goes with no more waits than now).
    pub(crate) reported_wait: [Duration; 2],
    /// The `total_ticks` that report was made from: while they are the same, nothing waited
    /// since, and the same figures are reported again (a new estimate of the rate would move
    /// them up by a few nanoseconds, so two reads with no wait between them would differ).
    pub(crate) reported_ticks: u64,
}

/// What [`PoolStats`] is assembled from, besides the counters.
#[derive(Clone, Debug)]
pub(crate) struct Sources {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) waits: WaitTotals,
    /// The queue's length, read under its lock (the waiting paths keep no counter of it: a
    /// wait writes no cache line beyond the word, the queue and its node, and the grant
    /// taken).
    pub(crate) waiting: usize,
    pub(crate) max_memory: usize,
    /// The budget enforced (`max_memory`, or the most the pool counts).
    pub(crate) budget: usize,
    pub(crate) buffer_size: usize,
    pub(crate) peak_in_use: usize,
    pub(crate) reserved_bytes: usize,
    pub(crate) cached_bytes: usize,
    /// `(rounds, bytes asked, bytes reclaimed, nanoseconds)`.
    pub(crate) reclaim: (usize, usize, usize, u64),
}

impl Counters {
    /// Reads the counters and `word` (given as a closure, read between them) into a view.
    pub(crate) fn assemble(&self, mut word: impl FnMut() -> Word, sources: Sources) -> PoolStats {
        // Releases first, word second, allocations last: read the other way round, a
        // release between two reads could make the live count negative. Then both spills
        // again: if either moved, a wrap was spilled while we read (a reader descheduled
        // between its reads would otherwise pair a spill from before many wraps with a word
        // from after them, off by any number of wraps), so read again. What is left is the
        // wraps whose compare-exchange is done but whose spill is not yet, one at most per
        // thread between those two steps. Bounded: a reader never spins for good.
        let mut tries = 0;
        let (releases_spilled, word, allocations_spilled) = loop {
            let releases_spilled = self.releases_spilled.load(Acquire);
            let read = word();
            let allocations_spilled = self.allocations_spilled.load(Acquire);
            tries += 1;
            if tries == 64
                || (self.releases_spilled.load(Acquire) == releases_spilled
                    && self.allocations_spilled.load(Acquire) == allocations_spilled)
            {
                break (releases_spilled, read, allocations_spilled);
            }
        };
        let allocations = allocations_spilled
            .wrapping_add(sources.waits.allocations)
            .wrapping_add(word.allocations())
            .wrapping_sub(sources.waits.resizes);
        let releases = releases_spilled
            .wrapping_add(word.releases())
            .wrapping_add(sources.waits.handed_over);
        let waits = &sources.waits;
        let [reported_total, reported_max] = waits.reported_wait;
        // A new maximum always comes with a new total (a wait of no ticks changes neither).
        let (total_wait, max_wait) = if waits.total_ticks == waits.reported_ticks {
            (reported_total, reported_max)
        } else {
            let [total, max] = ticks_to_durations([waits.total_ticks, waits.max_ticks]);
            (total.max(reported_total), max.max(reported_max))
        };
        PoolStats {
            name: sources.name,
            in_use_bytes: word.in_use(),
            overcommit_bytes: word.in_use().saturating_sub(sources.budget),
            max_memory: sources.max_memory,
            outstanding: allocations.saturating_sub(releases),
            waiting: sources.waiting,
            buffer_size: sources.buffer_size,
            closed: word.is_closed(),
            peak_in_use_bytes: sources.peak_in_use,
            total_allocations: allocations,
            waited_allocations: sources.waits.waited,
            total_wait,
            max_wait,
            would_block: self.would_block.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            queue_full: self.queue_full.load(Relaxed),
            cached_bytes: sources.cached_bytes,
            reserved_bytes: sources.reserved_bytes,
            reclaim_rounds: sources.reclaim.0,
            reclaim_asked_bytes: sources.reclaim.1,
            reclaimed_bytes: sources.reclaim.2,
            reclaim_time: Duration::from_nanos(sources.reclaim.3),
        }
    }
}

/// What [`BufPool::stats`](crate::BufPool::stats) saw.
///
/// Each field is read on its own without stopping the pool, so under load the fields may come
/// from slightly different instants; when the pool is quiescent they are exact.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S128, max_memory: 128 * 8 });
/// let a = pool.try_allocate(3).unwrap();
/// let b = pool.try_allocate(2).unwrap();
/// let stats = pool.stats();
/// assert_eq!(stats.in_use_bytes, 128 * 5);
/// assert_eq!(stats.outstanding, 2);
/// assert_eq!(stats.waiting, 0);
/// assert_eq!(stats.max_memory, 1024);
/// assert_eq!(stats.available_bytes(), 128 * 3);
/// assert_eq!(stats.peak_in_use_bytes, 128 * 5);
/// assert_eq!(stats.total_allocations, 2);
/// drop((a, b));
/// assert_eq!(pool.stats().in_use_bytes, 0);
/// ```
#[derive(Clone, Debug, Default, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's name ([`BufPoolBuilder::name`](crate::BufPoolBuilder::name)), if it has one.
    pub name: Option<Arc<str>>,
    /// Bytes reserved by live allocations (and by waiters granted bytes they have not yet
    /// picked up). In a child pool this includes the bytes of its requests that were granted
    /// here and still wait at an ancestor: a request holds each level it has climbed while it
    /// waits above, so a child's figure can count bytes its parent has not granted yet.
    pub in_use_bytes: usize,
    /// The budget.
    pub max_memory: usize,
    /// Live allocations made by this pool itself. Unlike `in_use_bytes`, a parent does not
    /// count its descendants' allocations here (they count in each descendant's figure).
    pub outstanding: usize,
    /// Requests queued for budget in this pool's queue (its own, and descendants' that wait
    /// at its level). A descendant's request waiting for a place in this pool's full queue
    /// (`max_waiters`) is in no queue and not counted.
    pub waiting: usize,
    /// The size of one buffer in bytes.
    pub buffer_size: usize,
    /// Whether the pool was closed.
    pub closed: bool,
    /// The most bytes ever in use at once (descendants' included, as in `in_use_bytes`):
    /// how close the load came to the budget.
    pub peak_in_use_bytes: usize,
    /// Allocations ever made by this pool itself (a descendant's count in its own figure,
    /// as for `outstanding`).
    pub total_allocations: usize,
    /// Requests granted their bytes after waiting in this pool's queue: allocations, and
    /// also reservations and child pools' requests that waited here, counting a grant whose
    /// owner gave up before taking it (its wait happened). Never goes down.
    pub waited_allocations: usize,
    /// The time those requests spent waiting, added up (with the pool's `time_waits` on).
    /// Counted together with `waited_allocations` and `max_wait`, so
    /// [`mean_wait`](PoolStats::mean_wait) is never above `max_wait`.
    pub total_wait: Duration,
    /// The longest any of those requests waited.
    pub max_wait: Duration,
    /// Calls that failed with [`WouldBlock`](crate::AllocError::WouldBlock): `try_allocate`
    /// (and its zeroed form), `try_reserve`, [`Reservation::try_grow`](crate::Reservation::try_grow)
    /// and [`Reservation::resize_to`](crate::Reservation::resize_to), counted by the pool the
    /// call was made to (a child's, when the room was missing at an ancestor).
    pub would_block: usize,
    /// Timed calls that failed with [`TimedOut`](crate::AllocError::TimedOut), counted by
    /// the pool the call was made to.
    pub timed_out: usize,
    /// Requests refused with [`QueueFull`](crate::AllocError::QueueFull), counted by the
    /// pool whose queue was full.
    pub queue_full: usize,
    /// Freed blocks kept for reuse (see [`BufPoolBuilder::recycle`](crate::BufPoolBuilder::recycle)).
    /// They are not in `in_use_bytes`. The bytes of live allocations plus `cached_bytes`
    /// stay within the budget (of the root: a tree has one cache, the root's);
    /// `in_use_bytes` also counts bytes that are no memory yet (reservations not allocated,
    /// a child's idle floor), so `in_use_bytes + cached_bytes` may be above it.
    pub cached_bytes: usize,
    /// Bytes held by this pool's own reservations
    /// ([`BufPool::reserve`](crate::BufPool::reserve)): part of `in_use_bytes`. A child's
    /// reservations count in the child's figure, not here (here they are part of the
    /// child's bytes in `in_use_bytes`).
    pub reserved_bytes: usize,
    /// Bytes in use above the budget: growth forced by
    /// [`Reservation::force_grow`](crate::Reservation::force_grow) here or in a descendant,
    /// not yet repaid (or a budget shrunk below what was held). While it is above zero no
    /// request is granted in this pool; releases repay it first.
    pub overcommit_bytes: usize,
    /// Reclaim rounds run for this pool's budget (see
    /// [`BufPool::register_reclaimer`](crate::BufPool::register_reclaimer)): by requests
    /// waiting in its queue, or by [`reclaim_ahead`](crate::BufPool::reclaim_ahead).
    pub reclaim_rounds: usize,
    /// Bytes those rounds asked reclaimers for, added up.
    pub reclaim_asked_bytes: usize,
    /// Bytes the reclaimers reported freed in those rounds, added up.
    pub reclaimed_bytes: usize,
    /// Time those rounds took, from their start to their end, added up.
    pub reclaim_time: Duration,
}

impl PoolStats {
    /// Bytes of the budget not in use: `max_memory` less `in_use_bytes`, 0 when over budget.
    /// (For a `max_memory` above what a pool counts, 2 PiB, this uses the configured figure,
    /// while requests are checked against 2 PiB.)
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// assert_eq!(pool.stats().available_bytes(), 64);
    /// ```
    pub fn available_bytes(&self) -> usize {
        self.max_memory.saturating_sub(self.in_use_bytes)
    }

    /// Whether nothing is in use: no allocation is outstanding and no bytes are reserved
    /// or otherwise held (the floor of a live child pool, set aside in this pool's budget,
    /// counts as held, so a parent with a floored child is not drained until that child
    /// closes).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let allocation = pool.try_allocate(1).unwrap();
    /// assert!(!pool.stats().is_drained());
    /// drop(allocation);
    /// assert!(pool.stats().is_drained());
    /// ```
    pub fn is_drained(&self) -> bool {
        self.outstanding == 0 && self.in_use_bytes == 0
    }

    /// The mean wait of the allocations that waited, or zero if none did.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::time::Duration;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// assert_eq!(pool.stats().mean_wait(), Duration::ZERO);
    /// ```
    pub fn mean_wait(&self) -> Duration {
        match u32::try_from(self.waited_allocations) {
            Ok(0) => Duration::ZERO,
            Ok(waited) => self.total_wait / waited,
            Err(_) => self.total_wait.div_f64(self.waited_allocations as f64),
        }
    }
}

impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "pool {name:?}: ")?;
        }
        write!(
            f,
            "{} of {} bytes in use by {} allocations (peak {} bytes), {} waiting{}; \
             {} allocations, {} waited (mean {:?}, max {:?}), {} would block, {} timed out",
            self.in_use_bytes,
            self.max_memory,
            self.outstanding,
            self.peak_in_use_bytes,
            self.waiting,
            if self.closed { ", closed" } else { "" },
            self.total_allocations,
            self.waited_allocations,
            self.mean_wait(),
            self.max_wait,
            self.would_block,
            self.timed_out,
        )?;
        if self.reclaim_rounds > 0 {
            write!(
                f,
                "; {} reclaim rounds freed {} of {} bytes asked in {:?}",
                self.reclaim_rounds,
                self.reclaimed_bytes,
                self.reclaim_asked_bytes,
                self.reclaim_time,
            )?;
        }
        // The rarer figures, only when they say something.
        for (figure, what) in [
            (self.queue_full, "refused with the queue full"),
            (self.reserved_bytes, "bytes reserved"),
            (self.cached_bytes, "bytes cached"),
            (self.overcommit_bytes, "bytes overcommitted"),
        ] {
            if figure > 0 {
                write!(f, "; {figure} {what}")?;
            }
        }
        Ok(())
    }
}
