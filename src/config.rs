//! The pool's configuration and the error an invalid one gives.

use core::fmt;

use crate::BufferSize;

/// How a [`BufPool`](crate::BufPool) is sized: the same two public fields as
/// `frozen_core::bufpool::BufPoolCfg`.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// const BUF: BufferSize = BufferSize::S4096;
/// // At most 256 buffers of 4 KiB (1 MiB) may be live at once.
/// let cfg = BufPoolCfg { buffer_size: BUF, max_memory: BUF as usize * 256 };
/// assert!(cfg.validate().is_ok());
/// let pool = BufPool::new(cfg);
/// assert_eq!(pool.stats().max_memory, 1 << 20);
/// ```
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct BufPoolCfg {
    /// The size of every buffer.
    pub buffer_size: BufferSize,
    /// The budget: the most bytes that live allocations may hold together. At least one
    /// buffer; it need not be a multiple of `buffer_size` (the remainder is never used).
    /// Any larger value is accepted (`usize::MAX` for "no limit"); the pool counts at most
    /// 2 PiB, more than any machine's memory, so budgets above that enforce 2 PiB.
    pub max_memory: usize,
}

impl BufPoolCfg {
    /// Checks the configuration without building a pool.
    ///
    /// # Errors
    ///
    /// [`ConfigError::MaxMemoryBelowBufferSize`] when not even one buffer fits (`max_memory`
    /// of 0 included).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPoolCfg, BufferSize, ConfigError};
    ///
    /// let cfg = BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 32 };
    /// assert_eq!(
    ///     cfg.validate(),
    ///     Err(ConfigError::MaxMemoryBelowBufferSize { max_memory: 32, buffer_size: 64 })
    /// );
    /// ```
    pub const fn validate(&self) -> Result<(), ConfigError> {
        validate_max_memory(self.buffer_size, self.max_memory)
    }
}

pub(crate) const fn validate_max_memory(
    buffer_size: BufferSize,
    max_memory: usize,
) -> Result<(), ConfigError> {
    if max_memory < buffer_size.bytes() {
        return Err(ConfigError::MaxMemoryBelowBufferSize {
            max_memory,
            buffer_size: buffer_size.bytes(),
        });
    }
    Ok(())
}

/// The most levels a tree of pools may have below its root. Far beyond any tree a budget
/// needs; chosen so that everything on a tree this deep stays cheap and fits a small thread
/// stack: a request walks its chain in O(depth log depth) steps, a close visits each
/// ancestor's queue once, and a [`PoolReport`](crate::PoolReport) of the whole chain, whose
/// drop (the one derived, recursive, piece: its fields stay movable) nests once per level,
/// takes about 160 KiB of stack to drop in a debug build. (A request notes its levels, and
/// the round of reclaim it drives, in 16 bits of its future, which would allow 32,766.)
pub(crate) const MAX_DEPTH: usize = 1_024;

/// Why a [`BufPoolCfg`] was refused.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize, ConfigError};
///
/// let err = BufPool::try_new(BufPoolCfg { buffer_size: BufferSize::S16, max_memory: 0 }).unwrap_err();
/// assert!(matches!(err, ConfigError::MaxMemoryBelowBufferSize { max_memory: 0, buffer_size: 16 }));
/// assert_eq!(err.to_string(), "max_memory (0 bytes) is below one buffer (16 bytes)");
/// ```
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `min_memory` on a pool without a parent: a floor is set aside in the ancestors'
    /// budgets, and a root pool has none.
    MinMemoryWithoutParent {
        /// The floor asked for.
        min_memory: usize,
    },
    /// `min_memory` above the pool's own `max_memory`: it could never use its floor.
    MinMemoryAboveMaxMemory {
        /// The floor asked for.
        min_memory: usize,
        /// The pool's budget.
        max_memory: usize,
    },
    /// The ancestors cannot set the floor aside at once: too little of some ancestor's
    /// budget is free, or requests wait there (a floor never barges past them).
    MinMemoryUnavailable {
        /// The floor asked for (rounded up to a multiple of 8).
        min_memory: usize,
        /// Why: the error setting it aside gave.
        reason: crate::AllocError,
    },
    /// The parent is already the deepest a pool may be: its tree has `max_depth` levels
    /// below its root (1,024).
    TooDeep {
        /// The most levels a tree may have below its root.
        max_depth: usize,
    },
    /// `max_memory` cannot hold even one buffer, so every allocation would fail.
    MaxMemoryBelowBufferSize {
        /// The configured budget in bytes.
        max_memory: usize,
        /// The configured buffer size in bytes.
        buffer_size: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ConfigError::MinMemoryWithoutParent { min_memory } => write!(
                f,
                "min_memory ({min_memory} bytes) needs a parent pool to set it aside"
            ),
            ConfigError::MinMemoryAboveMaxMemory {
                min_memory,
                max_memory,
            } => write!(
                f,
                "min_memory ({min_memory} bytes) is above max_memory ({max_memory} bytes)"
            ),
            ConfigError::MinMemoryUnavailable { min_memory, reason } => write!(
                f,
                "the ancestors cannot set min_memory ({min_memory} bytes) aside now: {reason}"
            ),
            ConfigError::TooDeep { max_depth } => write!(
                f,
                "the parent is {max_depth} levels below its root, the most a tree may have"
            ),
            ConfigError::MaxMemoryBelowBufferSize {
                max_memory,
                buffer_size,
            } => write!(
                f,
                "max_memory ({max_memory} bytes) is below one buffer ({buffer_size} bytes)"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}
