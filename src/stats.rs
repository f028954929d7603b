//! A point-in-time view of a pool's counters.

use core::fmt;
use std::time::Duration;

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
#[derive(Clone, Copy, Debug, Default, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Bytes reserved by live allocations (and by waiters granted bytes they have not yet
    /// picked up).
    pub in_use_bytes: usize,
    /// The budget.
    pub max_memory: usize,
    /// Live allocations.
    pub outstanding: usize,
    /// Requests queued for budget.
    pub waiting: usize,
    /// The size of one buffer in bytes.
    pub buffer_size: usize,
    /// Whether the pool was closed.
    pub closed: bool,
    /// The most bytes ever in use at once: how close the load came to the budget.
    pub peak_in_use_bytes: usize,
    /// Allocations ever made.
    pub total_allocations: usize,
    /// Allocations that had to wait in the queue before they got their bytes.
    pub waited_allocations: usize,
    /// The time those allocations spent waiting, added up.
    pub total_wait: Duration,
    /// The longest any allocation waited.
    pub max_wait: Duration,
    /// `try_allocate` calls that failed with [`WouldBlock`](crate::AllocError::WouldBlock).
    pub would_block: usize,
    /// Timed calls that failed with [`TimedOut`](crate::AllocError::TimedOut).
    pub timed_out: usize,
    /// Freed blocks kept for reuse (see [`BufPoolBuilder::recycle`](crate::BufPoolBuilder::recycle)).
    /// They are not in `in_use_bytes`, but `in_use_bytes + cached_bytes` stays within the
    /// budget.
    pub cached_bytes: usize,
}

impl PoolStats {
    /// Bytes of the budget not in use.
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

    /// Whether nothing is in use: no allocation is outstanding and no bytes are reserved.
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
        )
    }
}
