//! Options beyond the two fields of [`BufPoolCfg`], without new public fields on it.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{MAX_DEPTH, validate_max_memory};
use crate::recycle::Recycler;
use crate::state::{Config, State};
use crate::{BufPool, BufPoolCfg, ConfigError};

/// Buffers start at a multiple of this, or of the buffer size if smaller, by default: the
/// most the system allocator gives at the price of a plain `malloc`. Measured here, asking
/// glibc for 64-byte alignment made a 64-byte allocate+free cycle about 4 x slower (the
/// `posix_memalign` path), so stricter alignment is opt-in.
const DEFAULT_ALIGN: usize = 16;

/// The alignment `O_DIRECT` needs on Linux for any block device: the logical block size,
/// at most a page.
const DIRECT_IO_ALIGN: usize = 4096;

/// Blocks smaller than this are not recycled by default: the allocator serves them from its
/// own caches faster than a lock on ours would.
const DEFAULT_RECYCLE_MIN_BYTES: usize = 64 << 10;

/// How long `Drop` waits by default before it reports what it waits for.
const DEFAULT_DROP_WARNING_AFTER: Duration = Duration::from_secs(5);

/// Builds a [`BufPool`] with options: direct-I/O alignment and block recycling.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// const BUF: BufferSize = BufferSize::S4096;
/// let pool = BufPool::builder(BufPoolCfg { buffer_size: BUF, max_memory: 64 << 20 })
///     .direct_io_alignment()
///     .recycle(8)
///     .build()?;
/// let allocation = pool.try_allocate(256).unwrap(); // 1 MiB
/// assert_eq!(allocation.first() as usize % 4096, 0);
/// # Ok::<(), membudget::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct BufPoolBuilder {
    cfg: BufPoolCfg,
    name: Option<Arc<str>>,
    parent: Option<crate::sync::Arc<State>>,
    align: usize,
    recycle_max_per_size: usize,
    recycle_min_bytes: usize,
    drop_warning_after: Duration,
    time_waits: bool,
    max_waiters: usize,
    grows: bool,
    min_memory: usize,
}

impl BufPoolBuilder {
    pub(crate) fn new(cfg: BufPoolCfg) -> Self {
        BufPoolBuilder {
            cfg,
            name: None,
            parent: None,
            align: DEFAULT_ALIGN,
            recycle_max_per_size: 0,
            recycle_min_bytes: DEFAULT_RECYCLE_MIN_BYTES,
            drop_warning_after: DEFAULT_DROP_WARNING_AFTER,
            time_waits: true,
            max_waiters: usize::MAX,
            grows: false,
            min_memory: 0,
        }
    }

    /// Every buffer starts at a multiple of `min(buffer_size, 4096)`, as `O_DIRECT` needs
    /// when the buffer size is at least the device's logical block size (512 bytes on most
    /// devices; 4096 on 4K-native ones, which then need buffers of 4 KiB or more: an
    /// allocation of eight 512-byte buffers is aligned to 512 only). Without it the guarantee
    /// is `min(buffer_size, 16)`, which costs nothing extra with the system allocator.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S512, max_memory: 1 << 20 })
    ///     .direct_io_alignment()
    ///     .build()?;
    /// let allocation = pool.try_allocate(3).unwrap();
    /// assert!(allocation.iter().all(|buffer| buffer as usize % 512 == 0));
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn direct_io_alignment(mut self) -> Self {
        self.align = DIRECT_IO_ALIGN;
        self
    }

    /// Keeps up to `max_blocks_per_size` freed blocks of each size for reuse, for blocks of
    /// at least 64 KiB (see [`recycle_min_bytes`](BufPoolBuilder::recycle_min_bytes)).
    /// `0` (the default) turns recycling off.
    ///
    /// Reusing a block saves the allocator's map/unmap and the page faults of first touching
    /// fresh pages. Cached blocks never make a request wait: they are not counted as in use,
    /// and are freed (largest first) whenever fresh memory would otherwise take the pool's
    /// footprint, live plus cached, above the budget. Zeroed requests never take a cached
    /// block: they get fresh zeroed memory, or, waiting at the head of a root pool's queue,
    /// the block of the release that serves them, zeroed in place (README guarantee 18).
    ///
    /// A tree of pools has one cache, its root's: set this (and
    /// [`recycle_min_bytes`](BufPoolBuilder::recycle_min_bytes)) on the root. The freed
    /// blocks of every child pool go to the root's cache (when their alignment is the
    /// root's) and count against the root's budget there, so the whole tree, cached blocks
    /// included, stays within the root's `max_memory`. On a child pool these two settings
    /// have no effect: a cache of the child's own would hold memory its ancestors no longer
    /// count.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S16384, max_memory: 4 << 20 })
    ///     .recycle(2)
    ///     .build()?;
    /// let first = pool.try_allocate(64).unwrap(); // 1 MiB
    /// let address = first.first();
    /// drop(first);
    /// assert_eq!(pool.stats().cached_bytes, 1 << 20);
    /// let again = pool.try_allocate(64).unwrap();
    /// assert_eq!(again.first(), address, "the same block, reused");
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn recycle(mut self, max_blocks_per_size: usize) -> Self {
        self.recycle_max_per_size = max_blocks_per_size;
        self
    }

    /// The smallest block [`recycle`](BufPoolBuilder::recycle) keeps (64 KiB by default).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 1 << 20 })
    ///     .recycle(4)
    ///     .recycle_min_bytes(0)
    ///     .build()?;
    /// drop(pool.try_allocate(1).unwrap());
    /// assert_eq!(pool.stats().cached_bytes, 64);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn recycle_min_bytes(mut self, min_block_bytes: usize) -> Self {
        self.recycle_min_bytes = min_block_bytes;
        self
    }

    /// How long dropping the pool may wait for outstanding allocations before it says on
    /// stderr, once, how many allocations and bytes it is waiting for (5 s by default). The
    /// drop keeps waiting afterwards; the message makes a shutdown deadlock visible.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::time::Duration;
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 })
    ///     .drop_warning_after(Duration::from_secs(30))
    ///     .build()?;
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn drop_warning_after(mut self, after: Duration) -> Self {
        self.drop_warning_after = after;
        self
    }

    /// Whether waits are timed for [`PoolStats`](crate::PoolStats)' `total_wait` and
    /// `max_wait` (on by default). Timing costs two clock reads per wait (about 10 ns each
    /// where the CPU has an invariant time-stamp counter, 25-40 ns of the OS clock elsewhere); with it off those two stay zero, and everything else is counted
    /// as before, `waited_allocations` included.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 })
    ///     .time_waits(false)
    ///     .build()?;
    /// assert_eq!(pool.stats().max_wait, std::time::Duration::ZERO);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn time_waits(mut self, enabled: bool) -> Self {
        self.time_waits = enabled;
        self
    }

    /// Sheds load instead of queueing without bound: a request that would have to wait while
    /// `max_waiters` requests already wait fails at once with
    /// [`AllocError::QueueFull`](crate::AllocError::QueueFull), whatever its form (async,
    /// blocking, timed). `max_waiters(0)` never queues. Unlimited by default. Requests that
    /// fit without waiting are never refused, and `try_allocate` never queues anyway.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 })
    ///     .max_waiters(0)
    ///     .build()?;
    /// let held = pool.try_allocate(1).unwrap();
    /// assert_eq!(pool.allocate_blocking(1).unwrap_err(), AllocError::QueueFull);
    /// assert_eq!(pool.stats().queue_full, 1);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn max_waiters(mut self, max_waiters: usize) -> Self {
        self.max_waiters = max_waiters;
        self
    }

    /// Makes a pool whose budget a controller grows as it goes, as tokio's
    /// `Semaphore::new(0)` and `add_permits`: the budget may be zero (at build and in
    /// [`set_max_memory`](BufPool::set_max_memory)), and a request larger than the budget now
    /// waits in the queue until [`add_max_memory`](BufPool::add_max_memory) or
    /// `set_max_memory` makes room for it, instead of failing with
    /// [`ExceedsBudget`](crate::AllocError::ExceedsBudget) (`try_` forms give
    /// [`WouldBlock`](crate::AllocError::WouldBlock)). Only a request above the most any
    /// budget can be (2 PiB) fails at once. Off by default.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 0 })
    ///     .wait_for_growth()
    ///     .build()?;
    /// assert_eq!(pool.try_allocate(2).unwrap_err(), AllocError::WouldBlock);
    /// let mut waiting = Box::pin(pool.allocate(2));
    /// assert!(futures::poll!(waiting.as_mut()).is_pending());
    /// pool.add_max_memory(64);
    /// assert!(futures::poll!(waiting.as_mut()).is_pending()); // 64 of the 128 bytes
    /// pool.add_max_memory(64);
    /// assert_eq!(waiting.await.unwrap().length(), 2);
    /// # Ok::<(), membudget::ConfigError>(())
    /// # }).unwrap();
    /// ```
    pub fn wait_for_growth(mut self) -> Self {
        self.grows = true;
        self
    }

    /// Gives a child pool a floor, as cgroup v2's `memory.min`: `bytes` (rounded up to a
    /// multiple of 8, even past the pool's own budget: a floor of 97 bytes in a pool of 100
    /// sets 104 aside) of its ancestors' budgets that only this pool's subtree may use. They
    /// count as in use at every ancestor from the moment the pool is built (so no other
    /// request there is ever granted them), go to this pool's requests before those climb
    /// to the parent (a request takes as much of the floor as is free and climbs with the
    /// rest only: the parent sees only what the pool holds beyond its floor, and on an idle
    /// tree a request up to the chain's smallest cap is served), and go back to the
    /// ancestors when the pool is closed (directly, or by
    /// an ancestor's close or drop: a closed pool serves no request; what its allocations
    /// hold of the floor goes back as they do) or dropped. So dropping an ancestor's handle
    /// while this pool lives waits for the allocations, not for the floor. Its own
    /// `max_memory` still caps what it holds. 0 (the default) for none.
    ///
    /// With a floor equal to what a consumer needs, nothing the rest of the tree does can
    /// starve it: a query engine's pool beside I/O buffers, say.
    ///
    /// # Errors
    ///
    /// From [`build`](BufPoolBuilder::build): [`ConfigError::MinMemoryWithoutParent`] on a
    /// root pool, [`ConfigError::MinMemoryAboveMaxMemory`], and
    /// [`ConfigError::MinMemoryUnavailable`] when the ancestors cannot set the floor aside
    /// at once (too little free, or requests waiting there: a floor never barges).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = |max_memory| BufPoolCfg { buffer_size: BufferSize::S64, max_memory };
    /// let root = BufPool::new(cfg(1024));
    /// let query = BufPool::builder(cfg(1024)).parent(&root).min_memory(512).build()?;
    /// let io = root.child("io", cfg(1024))?;
    /// assert_eq!(root.stats().in_use_bytes, 512); // set aside at once
    /// let buffers = io.try_allocate(8)?; // the other 512
    /// assert_eq!(io.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    /// let mine = query.try_allocate(8)?; // the floor: I/O could not take it
    /// assert_eq!(root.stats().in_use_bytes, 1024);
    /// drop((mine, buffers));
    /// // Bigger than the floor: all of the floor, and only the rest from the root.
    /// let more = query.try_allocate(12)?;
    /// assert_eq!(root.stats().in_use_bytes, 512 + 256);
    /// drop(more);
    /// drop(query); // the floor goes back
    /// assert_eq!(root.stats().in_use_bytes, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn min_memory(mut self, bytes: usize) -> Self {
        self.min_memory = bytes;
        self
    }

    /// Names the pool: the name appears in its `Debug` output, in
    /// [`PoolStats`](crate::PoolStats) (and its `Display`) and, with the `metrics` feature,
    /// as the `pool` label of every metric it reports. Pools are unnamed by default.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 })
    ///     .name("ingest")
    ///     .build()?;
    /// assert_eq!(pool.stats().name.as_deref(), Some("ingest"));
    /// assert!(pool.stats().to_string().starts_with("pool \"ingest\": "));
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Makes the pool a child of `parent`: its bytes in use count against its own
    /// `max_memory` and against every ancestor's, with its own buffer size, queue and
    /// statistics. See [`BufPool::child`] for the rules; this is the same with the builder's
    /// other options. A child of a closed pool starts closed (with a floor, `build` fails:
    /// a closed pool sets nothing aside, see [`min_memory`](BufPoolBuilder::min_memory)).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 });
    /// let tenant = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 64 << 10 })
    ///     .name("tenant-a")
    ///     .parent(&pool)
    ///     .build()?;
    /// let allocation = tenant.try_allocate(4).unwrap();
    /// assert_eq!(pool.stats().in_use_bytes, 4 * 4096);
    /// # drop(allocation);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn parent(mut self, parent: &BufPool) -> Self {
        self.parent = Some(crate::sync::Arc::clone(parent.state()));
        self
    }

    /// Builds the pool.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] as [`BufPool::try_new`].
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 0 };
    /// assert!(BufPool::builder(cfg).build().is_err());
    /// ```
    pub fn build(self) -> Result<BufPool, ConfigError> {
        let BufPoolCfg {
            buffer_size,
            max_memory,
        } = self.cfg;
        if !self.grows {
            validate_max_memory(buffer_size, max_memory)?;
        }
        if let Some(parent) = &self.parent {
            if parent.depth() >= MAX_DEPTH {
                return Err(ConfigError::TooDeep {
                    max_depth: MAX_DEPTH,
                });
            }
        }
        let floor = if self.min_memory == 0 {
            0
        } else if self.parent.is_none() {
            return Err(ConfigError::MinMemoryWithoutParent {
                min_memory: self.min_memory,
            });
        } else if self.min_memory > max_memory {
            return Err(ConfigError::MinMemoryAboveMaxMemory {
                min_memory: self.min_memory,
                max_memory,
            });
        } else {
            // Rounding overflows only for a floor within 7 of `usize::MAX` (an unlimited
            // child's): the largest multiple of 8 then, which no ancestor can set aside.
            self.min_memory
                .checked_next_multiple_of(8)
                .unwrap_or(usize::MAX - 7)
        };
        if floor > 0 {
            let parent = self.parent.as_deref().expect("checked above");
            parent
                .set_floor_aside(floor)
                .map_err(|reason| ConfigError::MinMemoryUnavailable {
                    min_memory: floor,
                    reason,
                })?;
        }
        if self.time_waits {
            crate::clock::start();
        }
        let align = buffer_size.bytes().min(self.align);
        // A child's freed blocks go to its root's cache (`State::root`): none of its own.
        let recycler = if self.parent.is_some() {
            Recycler::delegating()
        } else {
            Recycler::new(self.recycle_min_bytes, self.recycle_max_per_size)
        };
        let config = Config {
            name: self.name,
            buffer_size,
            align,
            drop_warning_after: self.drop_warning_after,
            time_waits: self.time_waits,
            max_waiters: self.max_waiters,
            depth: self.parent.as_ref().map_or(0, |parent| parent.depth() + 1),
            grows: self.grows,
            floor,
            floors_in_chain: floor > 0
                || self
                    .parent
                    .as_ref()
                    .is_some_and(|parent| parent.floors_in_chain()),
        };
        let parent = self.parent;
        let pool = BufPool::from_state(State::new(max_memory, config, recycler, parent.clone()));
        if let Some(parent) = parent {
            if parent.adopt(pool.state()) {
                // A child of a closed pool is closed, its floor back at once.
                crate::chain::close(pool.state());
            }
        }
        Ok(pool)
    }
}

impl BufPool {
    /// A builder for the options beyond [`BufPoolCfg`]: direct-I/O alignment and block
    /// recycling.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 })
    ///     .direct_io_alignment()
    ///     .build()?;
    /// assert_eq!(pool.try_allocate(1).unwrap().first() as usize % 4096, 0);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn builder(cfg: BufPoolCfg) -> BufPoolBuilder {
        BufPoolBuilder::new(cfg)
    }
}
