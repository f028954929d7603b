//! The pool handle.

use core::fmt;
use core::future::{Future, poll_fn};
use core::pin::pin;
use core::task::Poll;
use std::io::Write as _;
use std::time::{Duration, Instant};

use crate::blocking::block_on;
use crate::chain;
use crate::config::validate_max_memory;
use crate::heap::PoolHandle;
use crate::state::{Attempt, State};
use crate::sync::Arc;
use crate::wait::{Allocate, Drained};
use crate::{AllocError, BufPoolAllocation, BufPoolCfg, ConfigError, PoolStats};

/// A memory-budgeted pool of fixed-size buffers, shared by async tasks and threads.
///
/// Every allocation is one contiguous block of `n` buffers of
/// [`buffer_size`](BufPoolCfg::buffer_size) bytes, and reserves those bytes from the budget
/// ([`max_memory`](BufPoolCfg::max_memory)). When the budget is spent, callers wait in one FIFO
/// queue (async and blocking alike) until dropped allocations give bytes back.
///
/// Share a pool by reference or in an [`Arc`](std::sync::Arc); it is `Send + Sync` and may be
/// moved freely, even while allocations are live.
///
/// # Shutdown barrier
///
/// Dropping the pool closes it and then blocks until every allocation is dropped, so no
/// allocation outlives the budget that counts it. Async code should call
/// [`shutdown`](BufPool::shutdown) (or [`close`](BufPool::close) and
/// [`drained`](BufPool::drained)) instead, so as not to block an executor thread.
///
/// **Deadlock hazard**: dropping the pool on a thread (or in a task) that still holds one of
/// its allocations waits forever, since that allocation can only be dropped after the drop
/// returns. After 5 seconds the drop reports on stderr what it is waiting for.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferPointer, BufferSize};
///
/// const BUF: BufferSize = BufferSize::S16;
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BUF, max_memory: BUF as usize * 0x40 });
///
/// # futures::executor::block_on(async {
/// let allocation = pool.allocate(0x30).await?;
/// assert_eq!(allocation.length(), 0x30);
/// assert!(!allocation.first().is_null());
/// assert_eq!(allocation.allocated_bytes(), BUF as usize * 0x30);
///
/// let buffers: Vec<BufferPointer> = allocation.iter().collect();
/// assert_eq!(buffers.len(), 0x30);
/// # Ok::<(), membudget::AllocError>(())
/// # }).unwrap();
/// ```
pub struct BufPool {
    pool: PoolHandle<State>,
}

impl BufPool {
    /// Creates a pool.
    ///
    /// # Panics
    ///
    /// With the [`ConfigError`] message when `cfg` is invalid: `max_memory` below one buffer
    /// (0 included). Use [`try_new`](BufPool::try_new) to get the error instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// const BUF: BufferSize = BufferSize::S16;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BUF, max_memory: BUF as usize * 0x0A });
    /// let allocation = pool.try_allocate(1).unwrap();
    /// assert_eq!(allocation.length(), 1);
    /// assert_eq!(allocation.allocated_bytes(), BUF as usize);
    /// ```
    #[track_caller]
    pub fn new(cfg: BufPoolCfg) -> Self {
        match Self::try_new(cfg) {
            Ok(pool) => pool,
            Err(error) => panic!("invalid BufPoolCfg: {error}"),
        }
    }

    /// Creates a pool, or says why `cfg` is invalid.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when `max_memory` is below one buffer (0 included).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize, ConfigError};
    ///
    /// assert!(BufPool::try_new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 }).is_ok());
    /// assert!(matches!(
    ///     BufPool::try_new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 63 }),
    ///     Err(ConfigError::MaxMemoryBelowBufferSize { .. })
    /// ));
    /// ```
    pub fn try_new(cfg: BufPoolCfg) -> Result<Self, ConfigError> {
        BufPool::builder(cfg).build()
    }

    pub(crate) fn from_state(state: State) -> Self {
        BufPool {
            pool: PoolHandle::new(state),
        }
    }

    /// Creates a child pool named `name`, inside this pool's budget.
    ///
    /// A child is a `BufPool` like any other, with its own buffer size, budget, FIFO queue,
    /// statistics and options ([`BufPoolBuilder::parent`](crate::BufPoolBuilder::parent) gives
    /// it the builder's options).
    /// Its bytes in use count against its own `max_memory` and against every ancestor's, so
    /// a parent's [`stats`](BufPool::stats) `in_use_bytes` includes all its descendants'
    /// (its `outstanding` and allocation counts are its own). Children nest up to 1,024
    /// levels below the root (deeper, [`ConfigError::TooDeep`]); the cost of a child's
    /// allocation grows with its depth only.
    ///
    /// * A request larger than the smallest cap on its chain fails at once with
    ///   [`ExceedsBudget`](AllocError::ExceedsBudget).
    /// * While the child's own cap is short, a request waits in the child's queue; once the
    ///   child has room it waits, if it must, at the tail of the parent's queue, in one FIFO
    ///   with everyone else waiting there, and so on up. A request held back by its own
    ///   pool's cap never holds back a sibling's or the parent's requests.
    /// * Closing a pool closes its descendants: their waiters (wherever they wait) and new
    ///   requests get [`Closed`](AllocError::Closed); live allocations stay valid.
    /// * Dropping a child closes it (and its descendants) and waits for its own allocations
    ///   and its descendants'; never for a sibling's. Dropping a parent waits for every
    ///   allocation of its subtree. A child handle may outlive its parent's handle: the
    ///   parent's state lives on until its last child is gone.
    /// * A tree has one cache of freed blocks, its root's
    ///   ([`BufPoolBuilder::recycle`](crate::BufPoolBuilder::recycle)): a child's freed
    ///   blocks go there, so the root's `in use + cached <= budget` covers the whole tree.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] as [`BufPool::try_new`], for `cfg`. A child of a closed pool is
    /// created closed (one built with a floor, through the builder's
    /// [`min_memory`](crate::BufPoolBuilder::min_memory), fails instead: a closed pool sets
    /// nothing aside: [`ConfigError::MinMemoryUnavailable`] with reason
    /// [`AllocError::Closed`](crate::AllocError::Closed)).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 });
    /// let tenant = pool.child("tenant-a", BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 64 << 10 })?;
    /// let allocation = tenant.try_allocate(16).unwrap(); // the tenant's whole cap
    /// assert_eq!(tenant.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    /// assert_eq!(pool.stats().in_use_bytes, 64 << 10); // the parent counts it too
    /// assert!(matches!(tenant.try_allocate(17), Err(AllocError::ExceedsBudget { .. })));
    /// # drop(allocation);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn child(
        &self,
        name: impl Into<std::sync::Arc<str>>,
        cfg: BufPoolCfg,
    ) -> Result<BufPool, ConfigError> {
        BufPool::builder(cfg).name(name).parent(self).build()
    }

    /// Pushes the pool's gauges and totals (a [`stats`](BufPool::stats) snapshot) to the
    /// `metrics` recorder installed now, labelled `pool = <name>`: the metrics and their
    /// names are in [`metric_names`](crate::metric_names). Call it on a timer; each wait is
    /// recorded into the wait histogram as it ends, by the waiter, without this call. Needs
    /// the `metrics` feature (off by default).
    ///
    /// The wait histogram is registered when the pool is built: install the recorder before
    /// building pools. Nothing of this runs on the fast path.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 })
    ///     .name("ingest")
    ///     .build()?;
    /// let _held = pool.try_allocate(2).unwrap();
    /// pool.record_metrics(); // membudget_in_use_bytes{pool="ingest"} = 128, ...
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    #[cfg(feature = "metrics")]
    pub fn record_metrics(&self) {
        crate::telemetry::record(&self.stats());
    }

    /// The shared state, for the futures that own a handle (`owned.rs`).
    pub(crate) fn state(&self) -> &crate::sync::Arc<State> {
        &self.pool
    }

    /// Allocates `n` contiguous buffers, waiting while the budget is spent.
    ///
    /// Waiters are served in arrival order, together with the threads in
    /// [`allocate_blocking`](BufPool::allocate_blocking): a request is never overtaken by a
    /// later one, however small.
    ///
    /// # Errors
    ///
    /// At once, without waiting: [`AllocError::ZeroBuffers`] for `n == 0`,
    /// [`AllocError::ExceedsBudget`] when `n` buffers can never fit the budget. While or
    /// before waiting: [`AllocError::Closed`] once the pool is closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future (a `select!` branch that lost, a
    /// `tokio::time::timeout`) loses no budget and no wake-up. A request still waiting leaves
    /// the queue; budget already granted to it goes on to the next waiters.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 4096 * 16 });
    /// let allocation = pool.allocate(16).await?;
    /// // The budget is spent: the next request waits until `allocation` is dropped.
    /// let mut next = std::pin::pin!(pool.allocate(1));
    /// assert!(futures::poll!(next.as_mut()).is_pending());
    /// drop(allocation);
    /// assert_eq!(next.await?.length(), 1);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    #[inline]
    pub fn allocate(&self, n: usize) -> Allocate<'_> {
        Allocate::new(&self.pool, n, false)
    }

    /// Like [`allocate`](BufPool::allocate), with every byte of the allocation zero.
    ///
    /// # Errors
    ///
    /// As [`allocate`](BufPool::allocate).
    ///
    /// # Cancel safety
    ///
    /// As [`allocate`](BufPool::allocate).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 4096 });
    /// let allocation = pool.allocate_zeroed(4).await?;
    /// // SAFETY: the allocation is 256 initialised (zero) bytes, and nothing else uses it.
    /// let bytes = unsafe { std::slice::from_raw_parts(allocation.first(), 256) };
    /// assert!(bytes.iter().all(|&byte| byte == 0));
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    #[inline]
    pub fn allocate_zeroed(&self, n: usize) -> Allocate<'_> {
        Allocate::new(&self.pool, n, true)
    }

    /// Allocates `n` contiguous buffers, blocking the calling thread while the budget is
    /// spent. It waits in the same FIFO queue as [`allocate`](BufPool::allocate).
    ///
    /// # Errors
    ///
    /// As [`allocate`](BufPool::allocate).
    ///
    /// # Blocking
    ///
    /// Blocks the thread until the bytes are free or the pool is closed. Do not call it from
    /// an async task (it would stall the executor thread); use `allocate(n).await` there, or
    /// wrap it in `tokio::task::spawn_blocking`.
    ///
    /// # Panics
    ///
    /// Not for any `n`: bad input is an error. Only the user code this call may run
    /// (the wakers of other requests that bytes it gives back serve) can panic here, and
    /// that panic is passed on once every pool's books are settled (README guarantee 9).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::sync::Arc;
    ///
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S1024, max_memory: 1024 * 4 }));
    /// let first = pool.allocate_blocking(4)?;
    /// let waiter = std::thread::spawn({
    ///     let pool = pool.clone();
    ///     move || pool.allocate_blocking(2).map(|allocation| allocation.length())
    /// });
    /// drop(first); // wakes the waiting thread
    /// assert_eq!(waiter.join().unwrap(), Ok(2));
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    #[inline]
    pub fn allocate_blocking(&self, n: usize) -> Result<BufPoolAllocation, AllocError> {
        self.wait_blocking(n, false, None)
    }

    /// Like [`allocate_blocking`](BufPool::allocate_blocking), with every byte zero.
    ///
    /// # Errors
    ///
    /// As [`allocate`](BufPool::allocate).
    ///
    /// # Blocking
    ///
    /// As [`allocate_blocking`](BufPool::allocate_blocking).
    ///
    /// # Panics
    ///
    /// Not for any `n`: bad input is an error. Only the user code this call may run
    /// (the wakers of other requests that bytes it gives back serve) can panic here, and
    /// that panic is passed on once every pool's books are settled (README guarantee 9).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let allocation = pool.allocate_zeroed_blocking(2)?;
    /// // SAFETY: 16 initialised (zero) bytes.
    /// assert_eq!(unsafe { *allocation.first().add(15) }, 0);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    #[inline]
    pub fn allocate_zeroed_blocking(&self, n: usize) -> Result<BufPoolAllocation, AllocError> {
        self.wait_blocking(n, true, None)
    }

    /// Like [`allocate_blocking`](BufPool::allocate_blocking), giving up after `timeout`.
    ///
    /// A zero `timeout` still takes free budget at once, but never waits; unlike
    /// [`try_allocate`](BufPool::try_allocate) it fails with `TimedOut`. A `timeout` too large
    /// to add to the clock waits without a deadline.
    ///
    /// # Errors
    ///
    /// As [`allocate`](BufPool::allocate), and [`AllocError::TimedOut`] when the deadline
    /// passes first; the request then leaves the queue as if cancelled.
    ///
    /// # Blocking
    ///
    /// Blocks the thread for at most about `timeout`.
    ///
    /// # Panics
    ///
    /// Not for any `n` or `timeout`: bad input is an error. Only the user code this call
    /// may run (the wakers of other requests that bytes it gives back serve) can panic
    /// here, and that panic is passed on once every pool's books are settled (README
    /// guarantee 9).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    /// use std::time::Duration;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 });
    /// let held = pool.allocate_timeout(1, Duration::from_millis(10))?;
    /// assert_eq!(
    ///     pool.allocate_timeout(1, Duration::from_millis(10)).unwrap_err(),
    ///     AllocError::TimedOut
    /// );
    /// drop(held);
    /// # Ok::<(), AllocError>(())
    /// ```
    pub fn allocate_timeout(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<BufPoolAllocation, AllocError> {
        let deadline = Instant::now().checked_add(timeout);
        self.wait_blocking(n, false, deadline)
    }

    /// Like [`allocate_timeout`](BufPool::allocate_timeout), with every byte zero.
    ///
    /// # Errors
    ///
    /// As [`allocate_timeout`](BufPool::allocate_timeout).
    ///
    /// # Blocking
    ///
    /// Blocks the thread for at most about `timeout`.
    ///
    /// # Panics
    ///
    /// Not for any `n` or `timeout`: bad input is an error. Only the user code this call
    /// may run (the wakers of other requests that bytes it gives back serve) can panic
    /// here, and that panic is passed on once every pool's books are settled (README
    /// guarantee 9).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::time::Duration;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 128 });
    /// let allocation = pool.allocate_zeroed_timeout(2, Duration::from_secs(1))?;
    /// assert_eq!(allocation.allocated_bytes(), 128);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn allocate_zeroed_timeout(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<BufPoolAllocation, AllocError> {
        let deadline = Instant::now().checked_add(timeout);
        self.wait_blocking(n, true, deadline)
    }

    /// Allocates `n` contiguous buffers if the bytes are free now, and nobody waits for them
    /// already; never waits.
    ///
    /// # Errors
    ///
    /// [`AllocError::WouldBlock`] when the bytes are not free or other requests wait before
    /// this one (it does not jump the queue); otherwise as [`allocate`](BufPool::allocate).
    ///
    /// # Panics
    ///
    /// Not for any `n`. In a child pool, a try that held bytes at a level above (or took
    /// part of a floor) and then found no room further up gives them back before it fails;
    /// that give-back serves the requests waiting for those bytes, so it runs their wakers
    /// (user code), after every pool's books are settled. A panic of one of those wakers is
    /// passed on from this call (README guarantee 9). A root pool's try runs no user code.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S32, max_memory: 32 * 10 });
    /// let allocation = pool.try_allocate(10)?;
    /// assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    /// drop(allocation);
    /// assert!(pool.try_allocate(1).is_ok());
    /// # Ok::<(), AllocError>(())
    /// ```
    #[inline]
    pub fn try_allocate(&self, n: usize) -> Result<BufPoolAllocation, AllocError> {
        self.try_now(n, false)
    }

    /// Like [`try_allocate`](BufPool::try_allocate), with every byte zero.
    ///
    /// # Errors
    ///
    /// As [`try_allocate`](BufPool::try_allocate).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S32, max_memory: 32 });
    /// let allocation = pool.try_allocate_zeroed(1)?;
    /// // SAFETY: 32 initialised (zero) bytes.
    /// assert_eq!(unsafe { *allocation.first().add(31) }, 0);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    #[inline]
    pub fn try_allocate_zeroed(&self, n: usize) -> Result<BufPoolAllocation, AllocError> {
        self.try_now(n, true)
    }

    #[inline(always)]
    fn try_now(&self, n: usize, zeroed: bool) -> Result<BufPoolAllocation, AllocError> {
        // Matched here rather than through a shared helper's nested enum: built in place, the
        // allocation never goes through an intermediate copy (see `Block::new`). The refusal
        // is left to an out-of-line call that returns only the bytes or the error: one that
        // returned the allocation too would have it built aside and copied (a 16-byte load
        // of two 8-byte stores, which the CPU cannot forward: 10 ns of a 27-ns `.unwrap()`).
        let bytes = match self.pool.reserve_now(n) {
            Attempt::Reserved(bytes) => bytes,
            Attempt::MustWait(bytes) => self.pool.refused_now(n, bytes)?,
            Attempt::Failed(error) => return Err(error),
        };
        BufPoolAllocation::new(&self.pool, bytes, zeroed)
    }

    #[inline(always)]
    fn wait_blocking(
        &self,
        n: usize,
        zeroed: bool,
        deadline: Option<Instant>,
    ) -> Result<BufPoolAllocation, AllocError> {
        // Everything but a reservation is left to the out-of-line call, made last: its result
        // is written straight where the caller wants it. A `match` that joined its result
        // with the one built here would build this one aside and copy it, a 16-byte load of
        // two 8-byte stores the CPU cannot forward (8 ns of a 31-ns `.unwrap()` row).
        if let Attempt::Reserved(bytes) = self.pool.reserve_now(n) {
            return BufPoolAllocation::new(&self.pool, bytes, zeroed);
        }
        self.wait_blocking_slow(n, zeroed, deadline)
    }

    /// The fast path did not reserve: the future's first poll looks once more (bad input
    /// fails there as it did on the fast path, budget freed since is reserved), then queues.
    #[cold]
    #[inline(never)]
    fn wait_blocking_slow(
        &self,
        n: usize,
        zeroed: bool,
        deadline: Option<Instant>,
    ) -> Result<BufPoolAllocation, AllocError> {
        let allocate = pin!(Allocate::new(&self.pool, n, zeroed));
        block_on(allocate, deadline).unwrap_or_else(|| Err(self.pool.timed_out()))
    }

    /// The pool's counters now. Exact when no call is in flight.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 * 4 });
    /// let allocation = pool.try_allocate(3).unwrap();
    /// let stats = pool.stats();
    /// assert_eq!((stats.in_use_bytes, stats.outstanding, stats.waiting), (192, 1, 0));
    /// println!("{stats}"); // "192 of 256 bytes in use by 1 allocations (peak 192 bytes), …"
    /// ```
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Changes the budget at run time.
    ///
    /// Growing it serves the waiters that now fit, in FIFO order. Shrinking it binds every
    /// reservation that completes after this call returns, including one already in flight
    /// on another thread: each succeeds only if it fits the new budget at that instant.
    /// Allocations already live stay valid, so the bytes in use may stay above the new
    /// budget until they come back (never above the budget in force when each was made).
    /// Waiting requests that can never fit the new budget fail with
    /// [`AllocError::ExceedsBudget`], wherever they wait (this pool's queue, a descendant's
    /// or an ancestor's; a reservation's `grow` counts the reservation's bytes beside its
    /// growth), and cached blocks (see
    /// [`recycle`](crate::BufPoolBuilder::recycle)) are freed until the footprint fits.
    ///
    /// A floored pool's budget may go below its floor: the floor stays set aside in its
    /// ancestors as it was (it is given back only when the pool goes), and the pool's own
    /// requests are bound by the new budget; so is every chain's largest request.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a budget below one buffer; the budget is then unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 * 2 });
    /// assert!(pool.try_allocate(4).is_err());
    /// pool.set_max_memory(64 * 4)?;
    /// assert!(pool.try_allocate(4).is_ok());
    /// assert!(pool.set_max_memory(0).is_err());
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn set_max_memory(&self, max_memory: usize) -> Result<(), ConfigError> {
        if !self.pool.grows() {
            validate_max_memory(self.pool.config.buffer_size, max_memory)?;
        }
        self.pool.set_max_memory(max_memory);
        Ok(())
    }

    /// Adds `bytes` to the budget (saturating at `usize::MAX`, which means no limit), and
    /// returns the new `max_memory`. Changes by a delta compose: several controllers may add
    /// and [`forget`](BufPool::forget_max_memory) budget on one pool without losing each
    /// other's changes (tokio's `add_permits`). Serves the waiters that now fit, in FIFO
    /// order, as [`set_max_memory`](BufPool::set_max_memory) does.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 });
    /// assert!(pool.try_allocate(2).is_err());
    /// assert_eq!(pool.add_max_memory(64), 128);
    /// assert_eq!(pool.try_allocate(2)?.length(), 2);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn add_max_memory(&self, bytes: usize) -> usize {
        self.pool.resize(|now| {
            let max_memory = now.max_memory.saturating_add(bytes);
            (max_memory, max_memory)
        })
    }

    /// Removes up to `bytes` of the free budget (the budget not in use) and returns how much
    /// it removed: the bytes in use are never taken away, so this never fails and never
    /// waits (tokio's `forget_permits`). A pool not built with
    /// [`wait_for_growth`](crate::BufPoolBuilder::wait_for_growth) keeps a budget of at
    /// least one buffer. Waiting requests that can never fit the smaller budget fail with
    /// [`ExceedsBudget`](AllocError::ExceedsBudget), as after
    /// [`set_max_memory`](BufPool::set_max_memory) (in a pool that waits for growth they
    /// keep waiting: a later growth may serve them). A budget above what the pool counts (2
    /// PiB, `usize::MAX` for no limit) is counted as that before the bytes are removed.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 256 });
    /// let held = pool.try_allocate(2)?;
    /// assert_eq!(pool.forget_max_memory(1000), 128); // the 128 free; the 128 in use stay
    /// assert_eq!(pool.stats().max_memory, 128);
    /// drop(held);
    /// assert_eq!(pool.forget_max_memory(100), 64); // one buffer is kept
    /// assert_eq!(pool.stats().max_memory, 64);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn forget_max_memory(&self, bytes: usize) -> usize {
        let floor = if self.pool.grows() {
            0
        } else {
            self.pool.config.buffer_size.bytes()
        };
        self.pool.resize(|now| {
            let free = now
                .budget
                .saturating_sub(now.in_use)
                .min(now.budget.saturating_sub(floor));
            let forgotten = free.min(bytes);
            if forgotten == 0 {
                // Nothing removed: the budget stays as configured (`usize::MAX` included).
                return (now.max_memory, 0);
            }
            (now.budget - forgotten, forgotten)
        })
    }

    /// The configured buffer size.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S256, max_memory: 256 });
    /// assert_eq!(pool.buffer_size(), BufferSize::S256);
    /// ```
    pub fn buffer_size(&self) -> crate::BufferSize {
        self.pool.config.buffer_size
    }

    /// Closes the pool: every waiting request fails with [`AllocError::Closed`] at once, and
    /// so does every later one. Live allocations stay valid and give their bytes back as
    /// usual. Closing twice is harmless.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 });
    /// let live = pool.allocate(1).await.unwrap();
    /// let mut waiter = std::pin::pin!(pool.allocate(1));
    /// assert!(futures::poll!(waiter.as_mut()).is_pending());
    /// pool.close();
    /// assert!(pool.is_closed());
    /// assert_eq!(waiter.await.unwrap_err(), AllocError::Closed);
    /// assert_eq!(live.length(), 1); // still valid
    /// # });
    /// ```
    pub fn close(&self) {
        chain::close(&self.pool);
    }

    /// Registers a reclaimer: a holder of this pool's memory (a cache, buffered data that can
    /// be spilled) that a waiting request may ask to give some back. Lower `priority` is
    /// asked first; among equal priorities, the largest
    /// [`estimate`](crate::Reclaimer::estimate) first.
    ///
    /// When a request of this pool, or of a descendant that is short at this pool's level,
    /// has to wait, the request itself (inside its poll, async or blocking; nothing is
    /// spawned) asks the reclaimers of this pool and of its descendants, one at a time, for
    /// what the head of the queue still needs beyond the free room (read from the pool's
    /// books after each one, not from their reports), until that is covered or every one
    /// was asked. Freed bytes go out in FIFO order. One round
    /// is in flight per pool; a round that cannot cover its shortfall is not repeated until
    /// the pool changes (a release, a registration, a resize). `try_allocate` never
    /// triggers reclaim; [`reclaim_ahead`](BufPool::reclaim_ahead) serves callers that
    /// cannot wait. See README, "Reclaim", and [`Reclaimer`](crate::Reclaimer) for the
    /// contract.
    ///
    /// Registering wakes the head of this pool's and each ancestor's queue, so that a
    /// request that waits can ask the new reclaimer. Dropping the returned handle
    /// unregisters it; dropping the pool drops its registrations before the shutdown
    /// barrier waits (so a cache whose only owner is its registration gives its allocations
    /// back then).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::future::Future;
    /// use std::pin::Pin;
    /// use std::sync::{Arc, Mutex};
    /// use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer};
    ///
    /// struct Cache(Mutex<Option<BufPoolAllocation>>);
    /// impl Reclaimer for Cache {
    ///     fn estimate(&self) -> usize {
    ///         self.0.lock().unwrap().as_ref().map_or(0, |a| a.allocated_bytes())
    ///     }
    ///     fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
    ///         let freed = self.0.lock().unwrap().take().map_or(0, |a| a.allocated_bytes());
    ///         Box::pin(async move { freed })
    ///     }
    /// }
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 256 });
    /// let cache = Arc::new(Cache(Mutex::new(Some(pool.try_allocate(4)?))));
    /// let handle = pool.register_reclaimer("cache", 0, cache);
    /// // A blocking waiter drives reclaim too.
    /// let allocation = pool.allocate_blocking(1)?;
    /// assert_eq!(pool.stats().reclaim_rounds, 1);
    /// # drop((allocation, handle));
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn register_reclaimer(
        &self,
        name: impl Into<std::sync::Arc<str>>,
        priority: u32,
        reclaimer: std::sync::Arc<dyn crate::Reclaimer>,
    ) -> crate::ReclaimerHandle {
        let name = name.into();
        let id = self
            .pool
            .register_reclaimer(std::sync::Arc::clone(&name), priority, reclaimer);
        // The handle first: should a woken waiter's waker panic below, its drop unregisters.
        let handle = crate::ReclaimerHandle::new(Arc::clone(&self.pool), id, name);
        self.pool.announce_registration();
        handle
    }

    /// A future that keeps this pool's free room at or above `low_water` bytes by running
    /// reclaim rounds ahead of need: for callers that fail instead of waiting
    /// (`try_allocate`, DataFusion's `try_grow`), which waiter-driven reclaim never helps.
    /// Spawn it once, on any runtime; it sleeps while the room is above the mark and
    /// resolves when the pool closes. See [`ReclaimAhead`](crate::ReclaimAhead).
    ///
    /// # Cancel safety
    ///
    /// Dropping it ends a round it drives; nothing else is lost.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::future::Future;
    /// use std::pin::Pin;
    /// use std::sync::{Arc, Mutex};
    /// use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer};
    ///
    /// struct Cache(Mutex<Vec<BufPoolAllocation>>);
    /// impl Reclaimer for Cache {
    ///     fn estimate(&self) -> usize { self.0.lock().unwrap().len() * 64 }
    ///     fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
    ///         let mut entries = self.0.lock().unwrap();
    ///         let mut freed = 0;
    ///         while freed < target && entries.pop().is_some() {
    ///             freed += 64;
    ///         }
    ///         Box::pin(async move { freed })
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), membudget::AllocError> {
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 * 8 }));
    /// let entries = (0..8).map(|_| pool.try_allocate(1)).collect::<Result<_, _>>()?;
    /// let _handle = pool.register_reclaimer("cache", 0, Arc::new(Cache(Mutex::new(entries))));
    /// let ahead = tokio::spawn(pool.reclaim_ahead(64 * 2));
    /// // The cache is trimmed to leave two buffers free, without anyone waiting.
    /// while pool.stats().available_bytes() < 64 * 2 {
    ///     tokio::task::yield_now().await;
    /// }
    /// assert!(pool.try_allocate(2).is_ok());
    /// pool.close();
    /// ahead.await.unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub fn reclaim_ahead(&self, low_water: usize) -> crate::ReclaimAhead {
        crate::ReclaimAhead::new(Arc::clone(&self.pool), low_water)
    }

    /// Whether [`close`](BufPool::close) was called.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 });
    /// assert!(!pool.is_closed());
    /// pool.close();
    /// assert!(pool.is_closed());
    /// ```
    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }

    /// Waits until nothing is in use in this pool: no allocation of it is outstanding, no
    /// reservation of it is held, and nothing of its children (their allocations and
    /// reservations, their floors while they are open) is held in it. The shutdown barrier
    /// of `Drop`, for async code. It does not close the pool, so on an open pool new
    /// allocations may follow, and it resolves once it sees the pool idle when it is polled:
    /// an instant of idleness that new allocations end before the poll is not seen (close
    /// the pool first, as [`shutdown`](BufPool::shutdown) does, for a drain that stays).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the future only listens.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let allocation = pool.allocate(4).await.unwrap();
    /// let worker = std::thread::spawn(move || drop(allocation));
    /// pool.close();
    /// pool.drained().await; // every allocation is back
    /// assert_eq!(pool.stats().outstanding, 0);
    /// worker.join().unwrap();
    /// # });
    /// ```
    pub fn drained(&self) -> Drained<'_> {
        Drained::new(&self.pool)
    }

    /// Closes the pool, drops its reclaimer registrations (as its drop does: a cache whose
    /// only owner was its registration gives its allocations back), waits for every
    /// allocation to come back and drops the pool, without blocking a thread. A panic of
    /// the user code that runs (wakers, reclaimers' drops) goes on once the pool is drained.
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped before it completes, the pool is dropped with it, which
    /// blocks as [`Drop`](#impl-Drop-for-BufPool) does; the pool stays closed either way.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let allocation = pool.allocate(4).await.unwrap();
    /// let worker = std::thread::spawn(move || drop(allocation));
    /// pool.shutdown().await;
    /// worker.join().unwrap();
    /// # });
    /// ```
    pub async fn shutdown(self) {
        let user_code = self.close_for_barrier();
        self.drained().await;
        pass_on(user_code);
    }

    /// Closes the pool, drops its reclaimer registrations (as [`shutdown`](BufPool::shutdown)
    /// does) and waits at most `timeout` for every allocation to come back. Returns the stats
    /// at that point: [`PoolStats::is_drained`] says whether it drained, and if not,
    /// `outstanding` and `in_use_bytes` say what is still out.
    ///
    /// # Blocking
    ///
    /// Blocks the thread for at most about `timeout`.
    ///
    /// # Panics
    ///
    /// Only with the panic of user code the close ran (a waiter's waker, a reclaimer's
    /// drop), once the wait is over.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::time::Duration;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let held = pool.try_allocate(2).unwrap();
    /// let report = pool.shutdown_timeout(Duration::from_millis(10));
    /// assert!(!report.is_drained());
    /// assert_eq!((report.outstanding, report.in_use_bytes), (1, 128));
    /// drop(held);
    /// assert!(pool.shutdown_timeout(Duration::from_millis(10)).is_drained());
    /// ```
    pub fn shutdown_timeout(&self, timeout: Duration) -> PoolStats {
        let user_code = self.close_for_barrier();
        block_on(pin!(self.drained()), Instant::now().checked_add(timeout));
        pass_on(user_code);
        self.stats()
    }

    /// The async counterpart of [`shutdown_timeout`](BufPool::shutdown_timeout): closes the
    /// pool, drops its reclaimer registrations and waits for every allocation to come back
    /// or for `deadline` to complete, whichever is first, then returns the stats. Any future serves as the deadline, so no
    /// runtime is tied in: `tokio::time::sleep(d)`, a shutdown signal, a channel.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing, and leaves the pool closed once it
    /// has been polled (like any `async fn`, it does nothing before its first poll: dropped
    /// unpolled, it leaves the pool as it was).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let held = pool.try_allocate(2).unwrap();
    /// let report = pool.shutdown_before(tokio::time::sleep(Duration::from_millis(10))).await;
    /// assert!(!report.is_drained());
    /// assert_eq!(report.outstanding, 1);
    /// drop(held);
    /// assert!(pool.shutdown_before(std::future::pending::<()>()).await.is_drained());
    /// # }
    /// ```
    pub async fn shutdown_before<F: Future>(&self, deadline: F) -> PoolStats {
        let user_code = self.close_for_barrier();
        let mut drained = pin!(self.drained());
        let mut deadline = pin!(deadline);
        poll_fn(|cx| {
            if drained.as_mut().poll(cx).is_ready() || deadline.as_mut().poll(cx).is_ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        pass_on(user_code);
        self.stats()
    }

    /// The first steps of every shutdown, the drop's included: closes the pool (its waiters
    /// fail, their wakers run) and drops its registrations before the barrier waits, since a
    /// reclaimer that owns allocations (a cache) gives them back as it drops, if its
    /// registration held it last. Both run user code outside every lock; a panic there must
    /// not cut the barrier short, so the first one is returned, to go on after it.
    fn close_for_barrier(&self) -> std::thread::Result<()> {
        let closed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| chain::close(&self.pool)));
        // Each registration dropped on its own (a reclaimer's drop is user code): a second
        // drop that panicked while the first one's panic unwound would abort the process.
        // The first panic goes on; later ones are dropped.
        let mut unregistered = Ok(());
        for registration in self.pool.unregister_all() {
            let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                drop(registration);
            }));
            if unregistered.is_ok() {
                unregistered = dropped;
            }
        }
        closed.and(unregistered)
    }
}

/// Resumes the panic of user code that a shutdown held back, unless the thread already
/// unwinds.
fn pass_on(user_code: std::thread::Result<()>) {
    if let Err(panic) = user_code {
        if !std::thread::panicking() {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for BufPool {
    /// Closes the pool and blocks until every allocation has been dropped.
    fn drop(&mut self) {
        // Its panic goes on only once the pool is drained and dropped.
        let closed = self.close_for_barrier();
        let mut drained = pin!(Drained::new(&self.pool));
        let warn_after = self.pool.config.drop_warning_after;
        let warn_at = Instant::now().checked_add(warn_after);
        if block_on(drained.as_mut(), warn_at).is_none() {
            let stats = self.stats();
            // Not `eprintln!`: a closed stderr must not turn the barrier into a panic. Under
            // loom every deadline has passed at once, so the report would only be noise there.
            if !cfg!(loom) {
                let _ = writeln!(
                    std::io::stderr(),
                    "membudget: dropping a BufPool has waited {warn_after:?} for {} \
                 allocations ({} bytes) to be dropped; an allocation held by the dropping \
                 thread would deadlock here",
                    stats.outstanding,
                    stats.in_use_bytes,
                );
            }
            block_on(drained, None);
        }
        // Out of the parent's registry (no more closes or reports reach it), its floor back
        // to the ancestors, then `self.pool` (a `PoolHandle`) drops its `Arc` if the pool is
        // drained, and leaks it if a panic cut the barrier short.
        self.pool.detach_from_parent();
        chain::give_floor_back(&self.pool);
        pass_on(closed);
    }
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("stats", &self.stats())
            .finish()
    }
}
