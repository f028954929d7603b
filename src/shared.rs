//! The state every handle of one pool shares: the budget word, the wait queue and the drain
//! event, with the reserve/release protocol that keeps them consistent.
//!
//! # The budget word
//!
//! `state` holds the bytes in use in its low bits and three flags in its top bits, so one
//! atomic read-modify-write both checks and changes them together:
//!
//! * `CLOSED`: no new reservation succeeds.
//! * `QUEUED`: the wait queue is not empty. Reservations then go through the lock (FIFO: no
//!   newcomer takes budget ahead of a waiter) and so do releases (to hand the bytes on).
//!   It is set and cleared only under the lock.
//! * `DRAIN_WAIT`: someone waits for the bytes in use to reach zero; the release that gets
//!   there clears it and notifies them.
//!
//! With no flag set, a reservation is one compare-exchange and a release is one
//! compare-exchange: no lock, no notification.

use core::task::Waker;
use std::time::Duration;

use event_listener::Event;

use crate::queue::{Status, WaitQueue, WakeList};
use crate::raw::Recycler;
use crate::sync::{Arc, AtomicUsize, Mutex, lock};
use crate::{AllocError, BufferSize, PoolStats};
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

pub(crate) const CLOSED: usize = 1 << (usize::BITS - 1);
pub(crate) const QUEUED: usize = 1 << (usize::BITS - 2);
pub(crate) const DRAIN_WAIT: usize = 1 << (usize::BITS - 3);
pub(crate) const IN_USE: usize = !(CLOSED | QUEUED | DRAIN_WAIT);

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

/// What a reservation that may wait got.
#[derive(Debug)]
pub(crate) enum Reservation {
    /// The bytes are reserved.
    Reserved,
    /// The request waits in the queue under this key.
    Queued(usize),
}

#[derive(Debug)]
pub(crate) struct Shared {
    state: AtomicUsize,
    max_memory: AtomicUsize,
    /// Allocations ever made and ever dropped: their difference is the live count, and the
    /// first is a statistic of its own, for the price of one counter.
    allocations: AtomicUsize,
    releases: AtomicUsize,
    peak_in_use: AtomicUsize,
    would_block: AtomicUsize,
    timed_out: AtomicUsize,
    waiting: AtomicUsize,
    pub(crate) buffer_size: BufferSize,
    pub(crate) align: usize,
    pub(crate) recycler: Recycler,
    /// How long `Drop` waits before it says on stderr what it waits for.
    pub(crate) drop_warning_after: Duration,
    queue: Mutex<WaitQueue>,
    drained: Event,
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
            state: AtomicUsize::new(0),
            max_memory: AtomicUsize::new(max_memory),
            allocations: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            peak_in_use: AtomicUsize::new(0),
            would_block: AtomicUsize::new(0),
            timed_out: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            buffer_size,
            align,
            recycler,
            drop_warning_after,
            queue: Mutex::new(WaitQueue::new()),
            drained: Event::new(),
        }
    }

    /// The fast path, shared by every call form: bad input fails, and the bytes of `n`
    /// buffers are reserved if they are free and nobody waits, with one compare-exchange.
    #[inline]
    pub(crate) fn reserve_now(&self, n: usize) -> Attempt {
        let max_memory = self.max_memory.load(Relaxed);
        let shift = self.buffer_size.shift();
        // `n * buffer_size <= max_memory` exactly when `n <= max_memory >> shift`, which also
        // rules out overflow.
        if n == 0 || n > max_memory >> shift {
            return Attempt::Failed(self.refusal(n, max_memory));
        }
        let bytes = n << shift;
        let mut state = self.state.load(Relaxed);
        loop {
            if state & (CLOSED | QUEUED) != 0 || bytes > max_memory.saturating_sub(state & IN_USE) {
                return if state & CLOSED != 0 {
                    Attempt::Failed(AllocError::Closed)
                } else {
                    Attempt::MustWait(bytes)
                };
            }
            match self
                .state
                .compare_exchange_weak(state, state + bytes, Acquire, Relaxed)
            {
                Ok(_) => {
                    self.note_in_use((state & IN_USE) + bytes);
                    return Attempt::Reserved(bytes);
                }
                Err(actual) => state = actual,
            }
        }
    }

    #[cold]
    fn refusal(&self, n: usize, max_memory: usize) -> AllocError {
        if n == 0 {
            AllocError::ZeroBuffers
        } else {
            AllocError::ExceedsBudget {
                requested_bytes: n.saturating_mul(self.buffer_size.bytes()),
                max_memory,
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
        // Clone before anything changes: a `clone` that panics then leaves no trace.
        let waker = waker.clone();
        let mut queue = lock(&self.queue);
        let max_memory = self.max_memory.load(Relaxed);
        if bytes > max_memory {
            // A concurrent shrink of the budget made the request impossible.
            return Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory,
            });
        }
        let mut state = self.state.load(Acquire);
        loop {
            let next = if state & CLOSED != 0 {
                return Err(AllocError::Closed);
            } else if state & QUEUED != 0 {
                break;
            } else if bytes <= max_memory.saturating_sub(state & IN_USE) {
                state + bytes
            } else {
                state | QUEUED
            };
            match self.state.compare_exchange(state, next, AcqRel, Acquire) {
                Ok(_) if next & QUEUED == 0 => {
                    self.note_in_use(next & IN_USE);
                    return Ok(Reservation::Reserved);
                }
                Ok(_) => break,
                Err(actual) => state = actual,
            }
        }
        let key = queue.push_back(bytes, waker);
        self.waiting.store(queue.len(), Relaxed);
        Ok(Reservation::Queued(key))
    }

    /// Checks a queued request: `Some` once it is out of the queue (its slot is then freed).
    pub(crate) fn poll_queued(&self, key: usize, waker: &Waker) -> Option<Result<(), AllocError>> {
        let mut queue = lock(&self.queue);
        match queue.status(key) {
            Status::Waiting => {
                queue.register(key, waker);
                None
            }
            Status::Granted => {
                queue.remove_granted(key);
                Some(Ok(()))
            }
            Status::Failed(error) => {
                queue.remove(key);
                Some(Err(error))
            }
            Status::Vacant => unreachable!("a waiter polled a slot it no longer owns"),
        }
    }

    /// A queued request gives up: bytes already granted to it go to the next waiters, and a
    /// head that leaves lets the ones behind it move up.
    pub(crate) fn cancel(&self, key: usize) {
        let mut wakers = WakeList::default();
        let mut notify_drained = false;
        {
            let mut queue = lock(&self.queue);
            match queue.remove(key) {
                (Status::Granted, bytes) => {
                    notify_drained = self.give_back_locked(bytes, &mut queue, &mut wakers);
                }
                (Status::Waiting, _) => self.serve(&mut queue, &mut wakers),
                (Status::Failed(_) | Status::Vacant, _) => {}
            }
        }
        // Drain listeners first: a waker that panics below must not cost them their wake-up.
        if notify_drained {
            self.drained.notify(usize::MAX);
        }
        drop(wakers);
    }

    /// Returns `bytes` to the budget.
    ///
    /// `keep_alive` is called before the bytes are given back whenever the release has more
    /// to do than one compare-exchange: once they are back, the pool may finish dropping, and
    /// only the returned handle keeps this `Shared` alive for the wake-ups that follow.
    ///
    /// The handle is returned, not dropped here: it may be the last one, and freeing `self`
    /// while this call still borrows it would be undefined behaviour.
    #[inline]
    #[must_use = "drop the handle only after the last use of the pool"]
    pub(crate) fn release(
        &self,
        bytes: usize,
        keep_alive: impl FnOnce() -> Arc<Shared>,
    ) -> Option<Arc<Shared>> {
        let mut state = self.state.load(Relaxed);
        while state & (QUEUED | DRAIN_WAIT) == 0 {
            match self
                .state
                .compare_exchange_weak(state, state - bytes, Release, Relaxed)
            {
                Ok(_) => return None,
                Err(actual) => state = actual,
            }
        }
        let pool = keep_alive();
        pool.release_slow(bytes);
        Some(pool)
    }

    #[cold]
    fn release_slow(&self, bytes: usize) {
        let mut wakers = WakeList::default();
        let notify_drained;
        let mut state = self.state.load(Relaxed);
        loop {
            if state & QUEUED != 0 {
                let mut queue = lock(&self.queue);
                notify_drained = self.give_back_locked(bytes, &mut queue, &mut wakers);
                break;
            }
            let next = Self::minus(state, bytes);
            match self
                .state
                .compare_exchange_weak(state, next, AcqRel, Relaxed)
            {
                Ok(_) => {
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

    /// `state - bytes`, clearing `DRAIN_WAIT` when that leaves nothing in use.
    fn minus(state: usize, bytes: usize) -> usize {
        let next = state - bytes;
        if next & IN_USE == 0 {
            next & !DRAIN_WAIT
        } else {
            next
        }
    }

    /// Whether the step `state -> next` is the one that must notify the drain waiters.
    fn drained_by(state: usize, next: usize) -> bool {
        state & DRAIN_WAIT != 0 && next & IN_USE == 0
    }

    /// Gives `bytes` back while holding the lock, then serves the queue. Returns whether the
    /// drain waiters must be notified (after the lock is released).
    fn give_back_locked(&self, bytes: usize, queue: &mut WaitQueue, wakers: &mut WakeList) -> bool {
        let mut state = self.state.load(Relaxed);
        loop {
            let next = Self::minus(state, bytes);
            match self
                .state
                .compare_exchange_weak(state, next, AcqRel, Relaxed)
            {
                Ok(_) => {
                    self.serve(queue, wakers);
                    return Self::drained_by(state, next);
                }
                Err(actual) => state = actual,
            }
        }
    }

    /// Grants the head of the queue its bytes for as long as they fit, in order, and clears
    /// `QUEUED` once the queue is empty. Called with the lock held whenever budget may have
    /// come free or the head changed.
    ///
    /// While `QUEUED` is set and the lock is held, nobody else can add to the bytes in use
    /// (the fast path refuses, the slow path needs the lock), so the free room read here can
    /// only grow behind our back: granting against it never overshoots the budget.
    pub(crate) fn serve(&self, queue: &mut WaitQueue, wakers: &mut WakeList) {
        let max_memory = self.max_memory.load(Relaxed);
        let mut in_use = self.state.load(Acquire) & IN_USE;
        while let Some(bytes) = queue.front_bytes() {
            if bytes > max_memory.saturating_sub(in_use) {
                break;
            }
            in_use = (self.state.fetch_add(bytes, AcqRel) & IN_USE) + bytes;
            self.note_in_use(in_use);
            if let Some(waker) = queue.pop_front(Status::Granted) {
                wakers.push(waker);
            }
        }
        if queue.is_empty() {
            self.state.fetch_and(!QUEUED, Release);
        }
        self.waiting.store(queue.len(), Relaxed);
    }

    /// Closes the pool: every waiter fails with `Closed`, and so does every later reservation.
    pub(crate) fn close(&self) {
        let mut wakers = WakeList::default();
        {
            let mut queue = lock(&self.queue);
            self.state.fetch_or(CLOSED, AcqRel);
            queue.fail_all(AllocError::Closed, |waker| wakers.push(waker));
            self.serve(&mut queue, &mut wakers);
        }
        drop(wakers);
    }

    /// Changes the budget: requests that can never fit the new one fail with
    /// `ExceedsBudget`, and those that fit now are served in order.
    pub(crate) fn set_max_memory(&self, max_memory: usize) {
        let mut wakers = WakeList::default();
        {
            let mut queue = lock(&self.queue);
            self.max_memory.store(max_memory, Relaxed);
            queue.fail_where(
                |bytes| {
                    (bytes > max_memory).then_some(AllocError::ExceedsBudget {
                        requested_bytes: bytes,
                        max_memory,
                    })
                },
                |waker| wakers.push(waker),
            );
            self.serve(&mut queue, &mut wakers);
        }
        drop(wakers);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Acquire) & CLOSED != 0
    }

    /// Whether nothing is in use; otherwise makes sure the release that gets there notifies
    /// the drain event. Call after listening to it.
    pub(crate) fn drained_or_announce(&self) -> bool {
        self.state.fetch_or(DRAIN_WAIT, AcqRel) & IN_USE == 0
    }

    #[inline]
    pub(crate) fn in_use(&self) -> usize {
        self.state.load(Acquire) & IN_USE
    }

    #[inline]
    pub(crate) fn max_memory(&self) -> usize {
        self.max_memory.load(Relaxed)
    }

    /// Whether requests wait for budget now.
    #[inline]
    pub(crate) fn is_contended(&self) -> bool {
        self.state.load(Relaxed) & QUEUED != 0
    }

    pub(crate) fn is_drained(&self) -> bool {
        self.state.load(Acquire) & IN_USE == 0
    }

    pub(crate) fn drain_event(&self) -> &Event {
        &self.drained
    }

    #[inline]
    pub(crate) fn count_allocation(&self) {
        self.allocations.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(crate) fn count_release(&self) {
        self.releases.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_failure(&self, error: AllocError) {
        match error {
            AllocError::WouldBlock => self.would_block.fetch_add(1, Relaxed),
            AllocError::TimedOut => self.timed_out.fetch_add(1, Relaxed),
            _ => 0,
        };
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let waits = lock(&self.queue).wait_stats();
        // Releases first: read the other way round, a release between the two reads could
        // make the live count negative.
        let releases = self.releases.load(Acquire);
        let allocations = self.allocations.load(Acquire);
        let state = self.state.load(Acquire);
        PoolStats {
            in_use_bytes: state & IN_USE,
            max_memory: self.max_memory.load(Relaxed),
            outstanding: allocations.saturating_sub(releases),
            waiting: self.waiting.load(Relaxed),
            buffer_size: self.buffer_size.bytes(),
            closed: state & CLOSED != 0,
            peak_in_use_bytes: self.peak_in_use.load(Relaxed),
            total_allocations: allocations,
            waited_allocations: waits.waited,
            total_wait: waits.total,
            max_wait: waits.max,
            would_block: self.would_block.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            cached_bytes: self.recycler.cached_bytes(),
        }
    }
}
