//! The error of every allocation call.

use core::fmt;

/// Why an allocation call returned no allocation.
///
/// Bad input (`ZeroBuffers`, `ExceedsBudget`) is reported at once, before any waiting.
///
/// # Examples
///
/// ```
/// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 * 4 });
/// assert_eq!(pool.try_allocate(0).unwrap_err(), AllocError::ZeroBuffers);
/// assert_eq!(
///     pool.try_allocate(5).unwrap_err(),
///     AllocError::ExceedsBudget { requested_bytes: 320, max_memory: 256 }
/// );
/// let all = pool.try_allocate(4).unwrap();
/// assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
/// drop(all);
/// pool.close();
/// assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
/// assert_eq!(AllocError::Closed.to_string(), "the pool is closed");
/// ```
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum AllocError {
    /// Zero buffers were requested; an allocation always holds at least one.
    ZeroBuffers,
    /// The request can never fit: `n * buffer_size` is above the budget, or does not fit in a
    /// `usize` at all (then `requested_bytes` is `usize::MAX`).
    ExceedsBudget {
        /// `n * buffer_size`, or `usize::MAX` where that overflows.
        requested_bytes: usize,
        /// The pool's budget when the request was refused.
        max_memory: usize,
    },
    /// The pool was closed, before the call or while it waited.
    Closed,
    /// `try_allocate` found too little budget free, or other callers already waiting.
    WouldBlock,
    /// The deadline of `allocate_timeout` passed before the budget was free.
    TimedOut,
    /// The request would have to wait, and the pool's queue already holds as many waiters as
    /// it allows ([`BufPoolBuilder::max_waiters`](crate::BufPoolBuilder::max_waiters)).
    QueueFull,
    /// The budget had room, but the system allocator returned no memory for `bytes`. The
    /// budget reserved for the request was given back at once (serving waiters).
    OutOfMemory {
        /// The size of the block the allocator could not provide.
        bytes: usize,
    },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AllocError::ZeroBuffers => f.write_str("zero buffers requested"),
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory,
            } => write!(
                f,
                "requested size overflows usize, above the budget of {max_memory} bytes"
            ),
            AllocError::ExceedsBudget {
                requested_bytes,
                max_memory,
            } => write!(
                f,
                "requested {requested_bytes} bytes, above the budget of {max_memory} bytes"
            ),
            AllocError::Closed => f.write_str("the pool is closed"),
            AllocError::WouldBlock => f.write_str("the budget is not free now"),
            AllocError::TimedOut => f.write_str("timed out waiting for budget"),
            AllocError::QueueFull => f.write_str("too many requests are waiting already"),
            AllocError::OutOfMemory { bytes } => {
                write!(f, "the system allocator has no memory for {bytes} bytes")
            }
        }
    }
}

impl std::error::Error for AllocError {}
