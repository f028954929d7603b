//! The budget word: one 64-bit atomic that holds the pool's flags, its bytes in use and two
//! small allocation counters, so that one atomic read-modify-write both checks and changes
//! all of them together. [`Word`] owns the encoding; [`BudgetWord`] owns the atomic and the
//! orderings, each stated at the operation that needs it.
//!
//! From the top bit down:
//!
//! * `CLOSED`: no new reservation succeeds.
//! * `QUEUED`: reservations and releases must take the queue lock. Set while requests wait
//!   (FIFO: no newcomer takes budget ahead of a waiter, and a release hands its bytes on) and
//!   while the budget changes (so that no reservation is checked against a stale budget). Set
//!   and cleared only under the lock. It may also stay set on an empty queue (*stale*): a
//!   release that hands its block to the last waiter leaves the word alone, saving two
//!   compare-exchanges when the next request queues again (`State::hand_over_locked`). A
//!   stale flag only sends callers to the lock, where it is seen for what it is (set, list
//!   empty, and no resize, which holds the lock throughout): the next release, the next
//!   request that fits (`State::admit_locked`), and every call that would fail without
//!   waiting (`State::clear_stale_queued`) clear it, and the next request that queues makes
//!   it true again. So it never makes a request wait or fail that would not have otherwise
//!   (loom model 45); it only sends the next few callers through the lock.
//! * `DRAIN_WAIT`: someone waits for the bytes in use to reach zero; the release that gets
//!   there clears it and notifies them.
//! * the bytes in use (a multiple of 8, stored without its three zero bits);
//! * two counters of the allocations and releases made on the fast path, modulo
//!   [`COUNTER_WRAP`]. Each wrap is counted elsewhere (see `stats.rs`), so the statistics are
//!   exact without a second read-modify-write on the fast path. A change of the budget also
//!   counts one on the allocation counter ([`BudgetWord::begin_resize`]), so that the word
//!   never returns to a value read before it; `state.rs` counts those and subtracts them.
//!
//! # The happens-before chain the drop barrier rests on
//!
//! A reservation's successful compare-exchange is `Acquire`, a release's is `Release`, and the
//! drained check ([`BudgetWord::is_drained`], [`BudgetWord::announce_drain`]) is `Acquire`.
//! So everything a release did (its last use of the pool's state, the block it freed or
//! cached) happens before whoever sees the bytes back: the next reservation, and the pool's
//! drop once it sees zero in use, which then frees the state.

use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::sync::AtomicU64;

/// Under loom the counters wrap every fourth count, so the models go through the wrap paths.
const COUNTER_BITS: u32 = if cfg!(loom) { 2 } else { 6 };
/// How many counts one wrap of a word counter stands for.
pub(crate) const COUNTER_WRAP: usize = 1 << COUNTER_BITS;

const CLOSED: u64 = 1 << 63;
const QUEUED: u64 = 1 << 62;
const DRAIN_WAIT: u64 = 1 << 61;
const ALLOCATED: u64 = (1 << COUNTER_BITS) - 1;
const ALLOCATED_ONE: u64 = 1;
const RELEASED: u64 = ALLOCATED << COUNTER_BITS;
const RELEASED_ONE: u64 = 1 << COUNTER_BITS;
/// Bytes in use are a multiple of 8: shifted by this, their three zero bits lie under the
/// two counters.
const IN_USE_SHIFT: u32 = 2 * COUNTER_BITS - 3;
const IN_USE: u64 = !(CLOSED | QUEUED | DRAIN_WAIT | ALLOCATED | RELEASED);

/// The most bytes the word counts: 2 PiB, far above any machine's memory, with room to spare
/// below the flags. A larger `max_memory` is accepted and enforced as this.
const MAX_COUNTED: u64 = 1 << 51;

/// The most bytes in use the word counts: twice the largest budget, so bytes held above a
/// budget (a reservation's forced growth, or a budget shrunk below what is held) stay
/// below the flags.
pub(crate) const MAX_IN_USE: usize = 2 * MAX_COUNTED as usize - 8;

/// The budget the word enforces for a configured `max_memory`.
pub(crate) const fn counted_budget(max_memory: usize) -> usize {
    if max_memory as u64 > MAX_COUNTED {
        MAX_COUNTED as usize
    } else {
        max_memory
    }
}

/// `bytes` as they are added to the word.
#[inline(always)]
const fn in_use_field(bytes: usize) -> u64 {
    (bytes as u64) << IN_USE_SHIFT
}

/// One value of the budget word.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Word(u64);

impl Word {
    /// The bytes in use: at most the budget, so it fits a `usize`.
    #[inline(always)]
    pub(crate) const fn in_use(self) -> usize {
        ((self.0 & IN_USE) >> IN_USE_SHIFT) as usize
    }

    #[inline(always)]
    pub(crate) const fn is_closed(self) -> bool {
        self.0 & CLOSED != 0
    }

    #[inline(always)]
    pub(crate) const fn is_queued(self) -> bool {
        self.0 & QUEUED != 0
    }

    /// Whether a reservation must go through the lock or fail: closed, or queued.
    #[inline(always)]
    const fn blocks_fast_reserve(self) -> bool {
        self.0 & (CLOSED | QUEUED) != 0
    }

    /// The allocations counted in the word, modulo [`COUNTER_WRAP`].
    pub(crate) const fn allocations(self) -> usize {
        (self.0 & ALLOCATED) as usize
    }

    /// The releases counted in the word, modulo [`COUNTER_WRAP`].
    pub(crate) const fn releases(self) -> usize {
        ((self.0 & RELEASED) >> COUNTER_BITS) as usize
    }

    /// The word with one more on the counter under `mask`, and whether that wrapped it.
    #[inline(always)]
    const fn count_one(self, mask: u64, one: u64) -> (Word, bool) {
        if self.0 & mask == mask {
            (Word(self.0 & !mask), true)
        } else {
            (Word(self.0 + one), false)
        }
    }

    /// The word after a fast-path reservation of `bytes` (counted as an allocation), and
    /// whether the allocation counter wrapped.
    #[inline(always)]
    const fn reserved(self, bytes: usize) -> (Word, bool) {
        let (counted, wrapped) = self.count_one(ALLOCATED, ALLOCATED_ONE);
        (Word(counted.0 + in_use_field(bytes)), wrapped)
    }

    /// The word after a slow-path reservation of `bytes` (counted elsewhere).
    pub(crate) const fn plus(self, bytes: usize) -> Word {
        Word(self.0 + in_use_field(bytes))
    }

    /// The word after a fast-path release of `bytes`, or `None` if the release must take the
    /// slow path: someone waits for budget or for the drain, or the release counter would
    /// wrap (the spill must happen before the bytes are back, after which the pool may be
    /// gone).
    #[inline(always)]
    const fn fast_released(self, bytes: usize) -> Option<Word> {
        if self.0 & (QUEUED | DRAIN_WAIT) != 0 || self.0 & RELEASED == RELEASED {
            None
        } else {
            Some(Word(self.0 - in_use_field(bytes) + RELEASED_ONE))
        }
    }

    /// [`fast_released`](Word::fast_released) without counting a release.
    #[inline(always)]
    const fn fast_released_uncounted(self, bytes: usize) -> Option<Word> {
        if self.0 & (QUEUED | DRAIN_WAIT) != 0 {
            None
        } else {
            Some(Word(self.0 - in_use_field(bytes)))
        }
    }

    /// The word less `released` bytes (counting a release if `counted`), plus `granted`
    /// bytes, with `QUEUED` cleared if `clear_queued`, and without `DRAIN_WAIT` when that
    /// leaves nothing in use; and whether the release counter wrapped.
    pub(crate) const fn settled(
        self,
        released: usize,
        counted: bool,
        granted: usize,
        clear_queued: bool,
    ) -> (Word, bool) {
        let (word, wrapped) = if counted {
            self.count_one(RELEASED, RELEASED_ONE)
        } else {
            (self, false)
        };
        let mut next = word.0 - in_use_field(released) + in_use_field(granted);
        if clear_queued {
            next &= !QUEUED;
        }
        if next & IN_USE == 0 {
            next &= !DRAIN_WAIT;
        }
        (Word(next), wrapped)
    }

    /// The word with `QUEUED` set.
    pub(crate) const fn queued(self) -> Word {
        Word(self.0 | QUEUED)
    }

    /// The word with `QUEUED` cleared.
    pub(crate) const fn unqueued(self) -> Word {
        Word(self.0 & !QUEUED)
    }

    /// Whether `bytes` more fit `budget` now, as far as this word says (it may be read
    /// without the lock: a hint, for deciding whether the lock is worth taking).
    #[inline]
    pub(crate) const fn has_room_for(self, bytes: usize, budget: usize) -> bool {
        bytes <= budget.saturating_sub(self.in_use())
    }

    /// Whether the step from `self` to `next` is the one that must notify the drain waiters.
    pub(crate) const fn drains_into(self, next: Word) -> bool {
        self.0 & DRAIN_WAIT != 0 && next.0 & IN_USE == 0
    }
}

/// What the fast path made of a request.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum FastReserve {
    /// The bytes are reserved; `wrapped` says the allocation counter wrapped (the caller
    /// counts the wrap elsewhere).
    Reserved { wrapped: bool, in_use: usize },
    /// The pool is closed.
    Closed,
    /// Too little is free, or others wait first (or the budget is changing): take the lock.
    MustWait,
}

/// The budget word itself.
#[derive(Debug)]
pub(crate) struct BudgetWord(AtomicU64);

impl BudgetWord {
    pub(crate) fn new() -> Self {
        BudgetWord(AtomicU64::new(0))
    }

    /// The word now. `Acquire`: pairs with the `Release` of every compare-exchange that
    /// published a change (a release's bytes, a cleared `QUEUED` after a resize).
    #[inline(always)]
    pub(crate) fn load(&self) -> Word {
        Word(self.0.load(Acquire))
    }

    /// The word now, read with a read-modify-write that changes nothing. `AcqRel`: every
    /// reservation whose compare-exchange (`Acquire`) comes after it in the word's
    /// modification order synchronizes with it, and so sees what this thread wrote before
    /// it; one that comes before it is in what this returns. That is how a `reclaim_ahead`
    /// low-water mark armed before this read (`State::arm_pressure`) reaches the `Relaxed`
    /// look of every reservation that this read does not see (`State::check_pressure`),
    /// without a fence on the reservation's path. (A plain load here, loom model 42 shows,
    /// lets both miss each other: the reservation sees no mark, the look no reservation.)
    #[inline]
    pub(crate) fn load_publishing(&self) -> Word {
        Word(self.0.fetch_add(0, AcqRel))
    }

    /// The fast path of a reservation: one compare-exchange that checks `bytes` against the
    /// budget, reserves them and counts the allocation, unless the word says to take the
    /// lock. `budget` is read after the word, and again after every failed compare-exchange:
    /// the budget changes only while `QUEUED` is set, so a word without it read here (with
    /// `Acquire`, pairing with the `Release` of the compare-exchange that cleared `QUEUED`
    /// after the new budget was stored) comes with the budget in force, and a word read
    /// before a resize set `QUEUED` fails the compare-exchange.
    ///
    /// `Acquire` on success: pairs with the `Release` of the releases whose bytes it reuses,
    /// so their frees (and cached blocks) happen before this reservation.
    #[inline(always)]
    pub(crate) fn try_reserve(&self, bytes: usize, budget: impl Fn() -> usize) -> FastReserve {
        self.try_reserve_counting(bytes, budget, true)
    }

    /// [`try_reserve`](BudgetWord::try_reserve) for bytes that are not an allocation of this
    /// pool (a descendant pool's request, or a reservation): in use, but not counted.
    #[inline]
    pub(crate) fn try_reserve_uncounted(
        &self,
        bytes: usize,
        budget: impl Fn() -> usize,
    ) -> FastReserve {
        self.try_reserve_counting(bytes, budget, false)
    }

    #[inline(always)]
    fn try_reserve_counting(
        &self,
        bytes: usize,
        budget: impl Fn() -> usize,
        counted: bool,
    ) -> FastReserve {
        let mut word = self.load();
        loop {
            let in_use = word.in_use();
            if word.blocks_fast_reserve() || bytes > budget().saturating_sub(in_use) {
                return if word.is_closed() {
                    FastReserve::Closed
                } else {
                    FastReserve::MustWait
                };
            }
            let (next, wrapped) = if counted {
                word.reserved(bytes)
            } else {
                (word.plus(bytes), false)
            };
            match self
                .0
                .compare_exchange_weak(word.0, next.0, Acquire, Acquire)
            {
                Ok(_) => {
                    return FastReserve::Reserved {
                        wrapped,
                        in_use: in_use + bytes,
                    };
                }
                Err(actual) => word = Word(actual),
            }
        }
    }

    /// The fast path of a release: gives `bytes` back and counts the release in one
    /// compare-exchange, or returns `false` if the slow path must do it (see
    /// [`Word::fast_released`]). `Release` on success: pairs with the `Acquire` of the next
    /// reservation and of the drained check; after it the pool may be gone.
    #[inline(always)]
    pub(crate) fn try_release(&self, bytes: usize) -> bool {
        self.try_release_counting(bytes, true)
    }

    /// [`try_release`](BudgetWord::try_release) for bytes reserved with
    /// [`try_reserve_uncounted`](BudgetWord::try_reserve_uncounted) (or the slow path's
    /// equivalent): not counted as a release. Same orderings.
    #[inline]
    pub(crate) fn try_release_uncounted(&self, bytes: usize) -> bool {
        self.try_release_counting(bytes, false)
    }

    #[inline(always)]
    fn try_release_counting(&self, bytes: usize, counted: bool) -> bool {
        let mut word = Word(self.0.load(Relaxed));
        loop {
            let next = if counted {
                word.fast_released(bytes)
            } else {
                word.fast_released_uncounted(bytes)
            };
            let Some(next) = next else {
                return false;
            };
            match self
                .0
                .compare_exchange_weak(word.0, next.0, Release, Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => word = Word(actual),
            }
        }
    }

    /// Replaces `current` with `next` if the word still is `current`; the word it found
    /// otherwise. `AcqRel`: the slow paths both publish (a release, a grant, a cleared
    /// `QUEUED`) and observe.
    #[inline]
    pub(crate) fn compare_exchange(&self, current: Word, next: Word) -> Result<Word, Word> {
        self.0
            .compare_exchange(current.0, next.0, AcqRel, Acquire)
            .map(Word)
            .map_err(Word)
    }

    /// Starts a change of the budget: sets `QUEUED`, so that every reservation and release
    /// takes the lock until it is cleared, and counts one on the allocation counter (returns
    /// whether that wrapped it, for the caller to count the wrap as an allocation's would be,
    /// and the resize itself so that the statistics subtract it).
    ///
    /// Why the count: without it, a resize while nobody waits would set `QUEUED`, store the
    /// budget and clear `QUEUED` again, leaving the word exactly as it was. A fast path that
    /// read the word and the old budget before the resize and compare-exchanges after it would
    /// succeed against the old budget after `set_max_memory` returned (loom model 26). With
    /// it, that compare-exchange fails and the retry reads the new budget. For the word to
    /// come back to the value such a fast path read, the allocations and resizes between its
    /// load and its compare-exchange (a few instructions) would have to add up to exactly a
    /// multiple of [`COUNTER_WRAP`], the releases too, and the bytes in use be the same.
    ///
    /// `AcqRel`: in-flight fast-path compare-exchanges fail (the word changed); the budget
    /// stored after this is published by the compare-exchange that clears `QUEUED` again.
    pub(crate) fn begin_resize(&self) -> bool {
        let mut word = Word(self.0.load(Relaxed));
        loop {
            let (counted, wrapped) = word.count_one(ALLOCATED, ALLOCATED_ONE);
            match self
                .0
                .compare_exchange_weak(word.0, counted.queued().0, AcqRel, Relaxed)
            {
                Ok(_) => return wrapped,
                Err(actual) => word = Word(actual),
            }
        }
    }

    /// Sets `CLOSED`: in-flight fast-path compare-exchanges fail and see it.
    pub(crate) fn close(&self) {
        self.0.fetch_or(CLOSED, AcqRel);
    }

    /// Whether nothing is in use; otherwise makes sure the release that gets there notifies
    /// the drain event. `AcqRel`: `Acquire` pairs with the last release's `Release` (the
    /// drop barrier), `Release` orders the listener registered before it.
    pub(crate) fn announce_drain(&self) -> bool {
        Word(self.0.fetch_or(DRAIN_WAIT, AcqRel)).in_use() == 0
    }

    /// Whether nothing is in use: `Acquire`, pairing with the last release's `Release`.
    pub(crate) fn is_drained(&self) -> bool {
        self.load().in_use() == 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_counters_wrap() {
        let mut word = Word(0);
        for i in 1..=COUNTER_WRAP {
            let (next, wrapped) = word.reserved(8);
            assert_eq!(wrapped, i == COUNTER_WRAP);
            word = next;
        }
        assert_eq!(word.in_use(), 8 * COUNTER_WRAP);
        assert_eq!(word.allocations(), 0);
        assert!(word.fast_released(8).is_some());
        let word = word.queued();
        assert!(word.is_queued() && word.fast_released(8).is_none());
        let (word, _) = word.settled(8 * COUNTER_WRAP, true, 16, true);
        assert_eq!(
            (word.in_use(), word.is_queued(), word.releases()),
            (16, false, 1)
        );
        assert_eq!(counted_budget(usize::MAX), MAX_COUNTED as usize);
    }

    #[test]
    fn a_resize_always_changes_the_word() {
        let word = BudgetWord::new();
        let before = word.load();
        for i in 1..=COUNTER_WRAP {
            let wrapped = word.begin_resize();
            assert_eq!(wrapped, i == COUNTER_WRAP);
            let now = word.load();
            assert!(now.is_queued());
            assert_eq!(now.in_use(), before.in_use());
            assert_eq!(now.allocations(), i % COUNTER_WRAP);
        }
    }
}
