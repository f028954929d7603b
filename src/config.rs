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
