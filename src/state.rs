//! The state every handle of one pool shares, and the protocol over it: admission (the fast
//! path and the queue), grants, release, close, resize and drain.
//!
//! The fast paths are one compare-exchange on the budget word each way (`word.rs`). Everything
//! else happens under the one queue lock, which guards the wait list (`waiters.rs`) and the
//! wait totals: while requests wait, `QUEUED` in the word sends every reservation and release
//! here, so the room computed under the lock is exact and grants never overshoot the budget.
//!
//! No user code runs under the lock: wakers are cloned before it is taken, and woken or
//! dropped after it is released ([`WakeList`]), once every state change is complete. So a
//! waker that panics, or that re-enters the pool, can cost at most its own waiter.

use core::pin::Pin;
use core::task::{Poll, Waker};
use std::time::Duration;

use event_listener::Event;

use crate::clock::Stamp;
use crate::heap::{Block, Memory, Pool};
use crate::recycle::{Footprint, Recycler};
use crate::stats::{Counters, Sources, WaitTotals};
use crate::sync::{Arc, AtomicUsize, Mutex, lock};
use crate::waiters::{Failure, Node, Status, WaitList, WakeList};
use crate::word::{BudgetWord, FastReserve, counted_budget};
use crate::{AllocError, BufferSize, PoolStats};
use core::sync::atomic::Ordering::Relaxed;

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

/// What a request that may wait got under the lock.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Admission {
    /// The bytes are reserved.
    Reserved,
    /// The request's node waits in the queue.
    Queued,
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

/// The queue lock guards these.
#[derive(Debug, Default)]
struct Queue {
    list: WaitList,
    waits: WaitTotals,
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
    peak_in_use: AtomicUsize,
    /// Bytes held by this pool's reservations (part of the bytes in use).
    reserved: AtomicUsize,
    pub(crate) config: Config,
    recycler: Recycler,
    /// Written by the waiting paths: on lines of their own, so that waiting does not slow the
    /// fast path of other threads.
    counters: CacheLine<Counters>,
    queue: CacheLine<Mutex<Queue>>,
    drained: Event,
    /// The pool this one is a child of: every byte reserved here is reserved there too, and
    /// in every ancestor above it (not counted as their allocations). Held strongly, so an
    /// ancestor's state outlives its descendants'.
    parent: Option<Arc<State>>,
    /// Live child pools, for `close` and reports. Strong references: a child takes itself
    /// out when its handle is dropped (`detach_from_parent`), which breaks the cycle.
    children: Mutex<Vec<Arc<State>>>,
    /// Each wait, recorded by its waiter (with the `metrics` feature, for pools that time
    /// their waits).
    #[cfg(feature = "metrics")]
    wait_histogram: Option<crate::telemetry::WaitHistogram>,
}

// SAFETY: `is_drained` reads the budget word, which counts the bytes of every live block from
// the reservation that made it (`State::block` is only called with reserved bytes) until
// `release` gives them back. `release` gives them back in its last access to `self`
// (`BudgetWord::try_release`), or under the queue lock and then touches `self` only under
// that lock (`release_block_slow`: `quiesce` takes the same lock), or after `keep_alive`,
// returning the kept-alive handle instead of dropping it. Bytes of ancestors (child pools)
// go back first, while this pool's own bytes still keep it (and the parent it holds) alive.
unsafe impl Pool for State {
    #[inline(always)]
    fn align(&self) -> usize {
        self.config.align
    }

    #[inline(always)]
    fn release(&self, memory: Memory, keep_alive: impl FnOnce() -> Arc<Self>) -> Option<Arc<Self>> {
        let bytes = memory.bytes();
        if self.recycler.never_keeps(bytes) {
            drop(memory);
        } else if let Some(memory) =
            self.recycler
                .put(memory, || self.word.load().is_queued(), || self.footprint())
        {
            drop(memory);
        }
        if let Some(parent) = &self.parent {
            // Alive: our bytes here are still counted, and we hold the parent.
            parent.give_back_held(bytes);
        }
        if self.word.try_release(bytes) {
            return None;
        }
        self.release_block_slow(bytes, keep_alive)
    }

    fn is_drained(&self) -> bool {
        self.word.is_drained()
    }

    fn quiesce(&self) {
        // A release that gave its bytes back under the lock still holds it until it is done
        // with the pool (`release_block_slow`): taking the lock once waits for it.
        drop(lock(&self.queue));
    }
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
    }
}

impl State {
    pub(crate) fn new(
        max_memory: usize,
        config: Config,
        recycler: Recycler,
        parent: Option<Arc<State>>,
    ) -> Self {
        State {
            parent,
            children: Mutex::new(Vec::new()),
            #[cfg(feature = "metrics")]
            wait_histogram: config
                .time_waits
                .then(|| crate::telemetry::WaitHistogram::register(config.name.as_ref())),
            word: CacheLine(BudgetWord::new()),
            budget: AtomicUsize::new(counted_budget(max_memory)),
            max_memory: AtomicUsize::new(max_memory),
            peak_in_use: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            config,
            recycler,
            counters: CacheLine(Counters::default()),
            queue: CacheLine(Mutex::new(Queue::default())),
            drained: Event::new(),
        }
    }

    // ---- admission ----

    /// The fast path, shared by every call form: bad input fails, and the bytes of `n`
    /// buffers are reserved if they are free and nobody waits, with one compare-exchange.
    #[inline(always)]
    pub(crate) fn reserve_now(&self, n: usize) -> Attempt {
        let shift = self.config.buffer_size.shift();
        // Checked against the budget read now; the word's compare-exchange checks again
        // against the budget in force (see `BudgetWord::try_reserve`).
        let budget = self.budget();
        // `n * buffer_size <= budget` exactly when `n <= budget >> shift`, which also rules
        // out overflow.
        if n == 0 || n > budget >> shift {
            return Attempt::Failed(self.refusal(n, budget));
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
        let budget = self.budget();
        if bytes > budget {
            return Attempt::Failed(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: budget,
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

    #[cold]
    fn refusal(&self, n: usize, budget: usize) -> AllocError {
        if n == 0 {
            AllocError::ZeroBuffers
        } else {
            AllocError::ExceedsBudget {
                requested_bytes: n.saturating_mul(self.config.buffer_size.bytes()),
                max_memory: budget,
            }
        }
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
    ///
    /// `counted`: the bytes are an allocation of this pool (not a reservation's, nor a
    /// descendant's request's). `for_descendant` is the pool the request was made to when
    /// this is one of its ancestors: the request is refused if that pool closed (`close` walks the ancestors' queues after it closes, under their
    /// locks, so a request queued here after the walk would never be failed).
    pub(crate) fn admit(
        &self,
        node: Pin<&Node>,
        bytes: usize,
        waker: &Waker,
        for_descendant: Option<&State>,
        counted: bool,
    ) -> Result<Admission, AllocError> {
        // Clone before the lock (user code), and read the clock before it too: other threads
        // wait for that lock. Dropped after it, if unused.
        let waker = waker.clone();
        let since = self.clock();
        let mut queue = lock(&self.queue);
        if for_descendant.is_some_and(State::is_closed) {
            return Err(AllocError::Closed);
        }
        let budget = self.budget();
        if bytes > budget {
            // A concurrent shrink of the budget made the request impossible.
            return Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: budget,
            });
        }
        // Checked before `QUEUED` is set: a refused request leaves no trace. (Under the lock,
        // `QUEUED` is set exactly while the list is not empty.)
        let full = queue.list.len() >= self.config.max_waiters;
        let mut word = self.word.load();
        loop {
            let next = if word.is_closed() {
                return Err(AllocError::Closed);
            } else if word.is_queued() {
                if full {
                    return Err(self.queue_full());
                }
                break;
            } else if bytes <= budget.saturating_sub(word.in_use()) {
                word.plus(bytes)
            } else if full {
                return Err(self.queue_full());
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
        queue.list.push_back(
            node,
            bytes,
            waker,
            since.unwrap_or_default(),
            for_descendant.unwrap_or(self).origin(),
        );
        self.counters.set_waiting(queue.list.len());
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
    /// made to this pool (`own`). Its wait is recorded here either way.
    #[inline]
    fn grant_taken(&self, node: Pin<&Node>, own: bool) {
        if own {
            self.counters.grant_taken();
        }
        #[cfg(feature = "metrics")]
        if let Some(histogram) = &self.wait_histogram {
            let now = Stamp::now();
            let waited = now.ticks_since(node.queued_at());
            histogram.record(crate::clock::ticks_to_duration_cached(waited, now));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = node;
    }

    /// A queued node's owner gives up (its future is dropped): bytes already granted to it go
    /// to the next waiters, and a head that leaves lets the ones behind it move up.
    pub(crate) fn cancel(&self, node: Pin<&Node>, bytes: usize) {
        match node.status() {
            // Out of the queue, and ours: nothing to undo.
            Status::Failed(_) | Status::Idle => {}
            Status::Granted => self.give_back_grant(bytes),
            Status::Waiting => {
                let mut wakers = WakeList::default();
                let own_waker;
                {
                    let mut queue = lock(&self.queue);
                    // Served since the look above? Then the node is out of the list and
                    // `remove` changes nothing.
                    own_waker = queue.list.remove(node);
                    if own_waker.is_some() {
                        let now = self.clock();
                        self.serve(&mut queue, &mut wakers, now);
                    }
                }
                // User code from here on, every change made: the others' wake-ups first, so
                // that our own waker's `drop` panicking costs only us.
                wakers.wake_all();
                drop(own_waker);
                if let Status::Granted = node.status() {
                    self.give_back_grant(bytes);
                }
            }
        }
    }

    /// A grant its owner never took: not an allocation after all, so not a release either.
    #[cold]
    fn give_back_grant(&self, bytes: usize) {
        let mut wakers = WakeList::default();
        let notify_drained;
        {
            let mut queue = lock(&self.queue);
            // Its wait still counts in the total and maximum.
            queue.waits.waited -= 1;
            let now = self.clock();
            notify_drained = self.settle_locked(bytes, false, &mut queue, &mut wakers, now, || {});
        }
        self.after_unlock(notify_drained, &mut wakers);
    }

    // ---- the chain of pools (child pools) ----

    /// How many pools are above this one.
    #[inline]
    pub(crate) fn depth(&self) -> usize {
        self.config.depth
    }

    /// The pool `level` steps up the chain: 0 is this one.
    pub(crate) fn at_level(&self, level: usize) -> &State {
        let mut pool = self;
        for _ in 0..level {
            pool = pool
                .parent
                .as_deref()
                .expect("a level within the chain of pools");
        }
        pool
    }

    /// The smallest budget on the chain from this pool up: the most any request here can get.
    pub(crate) fn smallest_budget(&self) -> usize {
        let mut budget = self.budget();
        let mut ancestor = self.parent.as_deref();
        while let Some(pool) = ancestor {
            budget = budget.min(pool.budget());
            ancestor = pool.parent.as_deref();
        }
        budget
    }

    /// The address that tells this pool's requests apart in an ancestor's queue.
    fn origin(&self) -> usize {
        core::ptr::from_ref(self).addr()
    }

    /// Registers `child` (just built with this pool as its parent); a child of a closed pool
    /// is closed. Either the child is registered before `close` copies the list, or it sees
    /// `CLOSED` (set before the copy) here.
    pub(crate) fn adopt(&self, child: &Arc<State>) {
        lock(&self.children).push(Arc::clone(child));
        if self.is_closed() {
            child.close();
        }
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
    /// ancestor (not as their allocations) and then here (as one), or nowhere. A request
    /// above any cap of the chain fails at once.
    #[cold]
    #[inline(never)]
    fn reserve_chain_now(&self, bytes: usize, counted: bool) -> Attempt {
        let mut ancestor = self.parent.as_deref();
        while let Some(pool) = ancestor {
            let budget = pool.budget();
            if bytes > budget {
                return Attempt::Failed(AllocError::ExceedsBudget {
                    requested_bytes: bytes,
                    max_memory: budget,
                });
            }
            ancestor = pool.parent.as_deref();
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
        let mut reserved_above = 0;
        let mut refused = None;
        for level in 1..=self.depth() {
            match self.at_level(level).hold_now(bytes) {
                Ok(true) => reserved_above = level,
                Ok(false) => {
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
                Ok(true) => return Attempt::Reserved(bytes),
                Ok(false) => Attempt::MustWait(bytes),
                Err(error) => Attempt::Failed(error),
            },
            None => match self.word.try_reserve(bytes, || self.budget()) {
                FastReserve::Reserved { wrapped, in_use } => {
                    if wrapped {
                        self.counters.allocations_wrapped();
                    }
                    self.note_in_use(in_use);
                    return Attempt::Reserved(bytes);
                }
                FastReserve::Closed => Attempt::Failed(AllocError::Closed),
                FastReserve::MustWait => Attempt::MustWait(bytes),
            },
        };
        for level in 1..=reserved_above {
            self.at_level(level).give_back_held_here(bytes);
        }
        attempt
    }

    /// Reserves `bytes` here without waiting, not as an allocation of this pool (for a
    /// descendant's request, or a reservation). `Ok(false)`: the request must wait here.
    pub(crate) fn hold_now(&self, bytes: usize) -> Result<bool, AllocError> {
        let budget = self.budget();
        if bytes > budget {
            return Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: budget,
            });
        }
        match self.word.try_reserve_uncounted(bytes, || self.budget()) {
            FastReserve::Reserved { in_use, .. } => {
                self.note_in_use(in_use);
                Ok(true)
            }
            FastReserve::Closed => Err(AllocError::Closed),
            FastReserve::MustWait => Ok(false),
        }
    }

    /// Gives back `bytes` reserved here with [`hold_now`](State::hold_now) (or the locked
    /// equivalent): not a release of this pool.
    fn give_back_held_here(&self, bytes: usize) {
        if !self.word.try_release_uncounted(bytes) {
            self.release_slow(bytes, false);
        }
    }

    /// Gives back `bytes` held (not counted as allocations) here and in every ancestor above,
    /// from the top down (each level's waiters are served in turn).
    pub(crate) fn give_back_held(&self, bytes: usize) {
        if let Some(parent) = &self.parent {
            parent.give_back_held(bytes);
        }
        self.give_back_held_here(bytes);
    }

    /// Gives back `bytes` a request reserved in the lowest `levels` pools of the chain (this
    /// one counted as its allocation, the ancestors not) without making an allocation of
    /// them. The caller holds a handle, so every pool of the chain outlives this.
    ///
    /// `counted`: this pool's level was counted as an allocation (an allocation request, not
    /// a reservation), so giving it back counts a release.
    pub(crate) fn give_back_reserved(&self, bytes: usize, levels: usize, counted: bool) {
        for level in (1..levels).rev() {
            self.at_level(level).give_back_held_here(bytes);
        }
        if levels == 0 {
            return;
        }
        if !counted {
            self.give_back_held_here(bytes);
        } else if !self.word.try_release(bytes) {
            self.release_slow(bytes, true);
        }
    }

    // ---- allocation memory ----

    /// The memory for `bytes` just reserved: fresh, or a cached block of that size. If the
    /// system allocator has none, the bytes go back to the budget and the call fails.
    /// (An associated function: loom's `Arc` cannot be a method receiver.)
    #[inline(always)]
    pub(crate) fn block(
        pool: &Arc<Self>,
        bytes: usize,
        zeroed: bool,
    ) -> Result<Block<State>, AllocError> {
        let memory = if pool.recycler.is_idle_for(bytes) {
            Memory::fresh(pool.config.align, bytes, zeroed)
        } else {
            pool.recycled_or_fresh(bytes, zeroed)
        };
        let Some(memory) = memory else {
            return Err(pool.out_of_memory(bytes));
        };
        // SAFETY: every caller reserved `bytes` in this pool's budget word for this block
        // alone (a fast-path or locked reservation, or a grant it took), and only the block's
        // drop gives them back.
        Ok(unsafe { Block::new(pool, memory, zeroed) })
    }

    /// The allocator had no memory for `bytes` just reserved: they go back at once, serving
    /// waiters, as the release of an allocation that never was (so `outstanding` stays
    /// exact; `total_allocations` counts the attempt). The caller holds a live handle, so
    /// the pool outlives this.
    #[cold]
    #[inline(never)]
    fn out_of_memory(&self, bytes: usize) -> AllocError {
        self.give_back_reserved(bytes, self.depth() + 1, true);
        AllocError::OutOfMemory { bytes }
    }

    /// The memory when recycling is on for this size or blocks are cached.
    #[cold]
    #[inline(never)]
    fn recycled_or_fresh(&self, bytes: usize, zeroed: bool) -> Option<Memory> {
        if !zeroed {
            if let Some(memory) = self.recycler.take(bytes, || self.footprint()) {
                return Some(memory);
            }
        }
        // Fresh zeroed memory (often untouched pages) is cheaper than zeroing a used block.
        self.recycler.make_room(|| self.footprint());
        Memory::fresh(self.config.align, bytes, zeroed)
    }

    /// The bytes in use and the budget now, for the recycler's decisions.
    fn footprint(&self) -> Footprint {
        Footprint {
            in_use: self.word.load().in_use(),
            budget: self.budget(),
        }
    }

    // ---- release ----

    /// A block's release that the fast path could not make.
    ///
    /// While requests wait (`QUEUED`), the bytes go back under the queue lock, and after that
    /// the pool is touched only under the lock: the pool's drop takes the lock once after it
    /// sees the bytes back (`Pool::quiesce`), so it waits for us without a reference count
    /// (two atomic read-modify-writes saved on every release that serves a waiter). Only a
    /// release that drains the pool notifies after unlocking: it takes a strong reference
    /// first, still under the lock. Without `QUEUED` (drain waiters, or the release counter
    /// wraps) the bytes go back without the lock, so a strong reference is taken first.
    #[cold]
    #[inline(never)]
    fn release_block_slow(
        &self,
        bytes: usize,
        keep_alive: impl FnOnce() -> Arc<State>,
    ) -> Option<Arc<State>> {
        if !self.word.load().is_queued() {
            let pool = keep_alive();
            pool.release_slow(bytes, true);
            return Some(pool);
        }
        let mut keep_alive = Some(keep_alive);
        let mut kept: Option<Arc<State>> = None;
        let mut wakers = WakeList::default();
        let now = self.clock();
        let notify_drained = {
            let mut queue = lock(&self.queue);
            self.settle_locked(bytes, true, &mut queue, &mut wakers, now, || {
                if let Some(keep_alive) = keep_alive.take() {
                    kept = Some(keep_alive());
                }
            })
        };
        // Unlocked: from here on the pool may be gone, unless `kept` holds it.
        if notify_drained {
            kept.as_ref()
                .expect("a draining release keeps the pool alive")
                .drained
                .notify(usize::MAX);
        }
        wakers.wake_all();
        kept
    }

    /// A release the fast path could not make: someone waits (for budget or the drain), or
    /// the release counter wraps. `counted`: a release of this pool's own (not bytes of a
    /// descendant's).
    #[cold]
    fn release_slow(&self, bytes: usize, counted: bool) {
        let mut wakers = WakeList::default();
        let notify_drained;
        let mut word = self.word.load();
        loop {
            if word.is_queued() {
                let now = self.clock();
                let mut queue = lock(&self.queue);
                notify_drained =
                    self.settle_locked(bytes, counted, &mut queue, &mut wakers, now, || {});
                break;
            }
            let (next, wrapped) = word.settled(bytes, counted, 0, false);
            match self.word.compare_exchange(word, next) {
                Ok(_) => {
                    if wrapped {
                        self.counters.releases_wrapped();
                    }
                    notify_drained = word.drains_into(next);
                    break;
                }
                Err(actual) => word = actual,
            }
        }
        self.after_unlock(notify_drained, &mut wakers);
    }

    /// With the lock held: gives `released` bytes back (counting a release if `counted`),
    /// grants the head of the queue its bytes for as long as they fit, in order, and clears
    /// `QUEUED` once the queue is empty, all in one compare-exchange of the word. Called
    /// whenever budget may have come free or the head changed. Returns whether the drain
    /// waiters must be notified (after the lock is released); `now` is when the grants count
    /// as made. `before_draining` runs (under the lock) before the compare-exchange that
    /// leaves nothing in use, when someone waits for that.
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
        wakers: &mut WakeList,
        now: Option<Stamp>,
        mut before_draining: impl FnMut(),
    ) -> bool {
        let budget = self.budget();
        let start = self.word.load();
        // Our `released` bytes are still counted, so this cannot underflow.
        let mut in_use = start.in_use() - released;
        let mut notify_drained = false;
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
                    if word.drains_into(next) {
                        before_draining();
                    }
                    match self.word.compare_exchange(word, next) {
                        Ok(_) => {
                            if wrapped {
                                self.counters.releases_wrapped();
                            }
                            if granted > 0 {
                                self.note_in_use(next.in_use());
                            }
                            notify_drained = word.drains_into(next);
                            return;
                        }
                        Err(actual) => word = actual,
                    }
                }
            },
            now,
            wakers,
        );
        if granted.count > 0 {
            let waits = &mut queue.waits;
            // Allocations once their owners take them (`Counters::grant_taken`): until then
            // in use, but not outstanding.
            waits.waited += granted.count;
            waits.total_ticks = waits.total_ticks.saturating_add(granted.total_wait);
            waits.max_ticks = waits.max_ticks.max(granted.max_wait);
        }
        self.counters.set_waiting(queue.list.len());
        notify_drained
    }

    /// [`settle_locked`](State::settle_locked) with nothing given back: serves whoever fits
    /// now. Never empties the pool, so never has drain waiters to notify.
    fn serve(&self, queue: &mut Queue, wakers: &mut WakeList, now: Option<Stamp>) {
        let drained = self.settle_locked(0, false, queue, wakers, now, || {});
        debug_assert!(!drained, "serving cannot drain the pool");
    }

    /// After the lock is released: drain listeners first (a waker that panics must not cost
    /// them their wake-up), then the wakers.
    fn after_unlock(&self, notify_drained: bool, wakers: &mut WakeList) {
        if notify_drained {
            self.drained.notify(usize::MAX);
        }
        wakers.wake_all();
    }

    /// The time for the wait statistics, if they are kept.
    #[inline]
    fn clock(&self) -> Option<Stamp> {
        self.config.time_waits.then(Stamp::now)
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
        let mut descendants = Vec::new();
        self.collect_descendants(&mut descendants);
        self.fail_waiters(|_, _| Some(Failure::Closed), || self.word.close());
        for pool in &descendants {
            pool.fail_waiters(|_, _| Some(Failure::Closed), || pool.word.close());
        }
        let mut origins = Vec::with_capacity(descendants.len() + 1);
        origins.push(self.origin());
        origins.extend(descendants.iter().map(|pool| pool.origin()));
        let mut ancestor = self.parent.as_deref();
        while let Some(pool) = ancestor {
            pool.fail_waiters(
                |_, from| origins.contains(&from).then_some(Failure::Closed),
                || {},
            );
            ancestor = pool.parent.as_deref();
        }
    }

    /// Every live descendant, children before their parents. (Each registry is copied out
    /// of its lock: no two registry locks are held at once.)
    fn collect_descendants(&self, into: &mut Vec<Arc<State>>) {
        let children = lock(&self.children).clone();
        for child in children {
            child.collect_descendants(into);
            into.push(child);
        }
    }

    /// Under the lock: runs `first`, fails every waiter `fails` picks, and serves the ones
    /// that fit now; wakes them all after it.
    fn fail_waiters(&self, fails: impl Fn(usize, usize) -> Option<Failure>, first: impl FnOnce()) {
        let mut wakers = WakeList::default();
        {
            let mut queue = lock(&self.queue);
            first();
            queue.list.fail_where(fails, &mut wakers);
            self.serve(&mut queue, &mut wakers, None);
        }
        wakers.wake_all();
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
        let now = self.clock();
        {
            let mut queue = lock(&self.queue);
            self.word.set_queued();
            let budget = counted_budget(max_memory);
            self.max_memory.store(max_memory, Relaxed);
            self.budget.store(budget, Relaxed);
            queue.list.fail_where(
                |bytes, _| {
                    (bytes > budget).then_some(Failure::ExceedsBudget { max_memory: budget })
                },
                &mut wakers,
            );
            // Clears `QUEUED` unless requests still wait.
            self.serve(&mut queue, &mut wakers, now);
        }
        // After the budget store: a block cached under the old budget is seen here, and one
        // cached later was checked against the new budget (the cache's lock orders the two).
        self.recycler.trim(|| self.footprint());
        wakers.wake_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.word.load().is_closed()
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
        let waits = lock(&self.queue).waits;
        self.counters.assemble(
            || self.word.load(),
            Sources {
                name: self.config.name.clone(),
                waits,
                max_memory: self.max_memory.load(Relaxed),
                buffer_size: self.config.buffer_size.bytes(),
                peak_in_use: self.peak_in_use.load(Relaxed),
                reserved_bytes: self.reserved.load(Relaxed),
                cached_bytes: self.recycler.cached_bytes(),
            },
        )
    }
}
