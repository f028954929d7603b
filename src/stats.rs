//! A point-in-time view of a pool's counters.

use core::fmt;

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
}

impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} bytes in use by {} allocations, {} waiting{}",
            self.in_use_bytes,
            self.max_memory,
            self.outstanding,
            self.waiting,
            if self.closed { ", closed" } else { "" }
        )
    }
}
