//! Why a `try_grow` was refused, typed: what [`MembudgetPool`](crate::MembudgetPool) turns into
//! DataFusion's `ResourcesExhausted` error, and keeps for inspection
//! ([`MembudgetPool::last_refusal`](crate::MembudgetPool::last_refusal)).

use core::fmt;

use datafusion::execution::memory_pool::human_readable_size;
use membudget::AllocError;

/// Why a `try_grow` was refused.
///
/// # Examples
///
/// ```
/// use membudget_datafusion::RefusalReason;
///
/// let reason = RefusalReason::Share { share: 1024 };
/// assert_eq!(reason.to_string(), "its fair share (1024.0 B) is spent");
/// ```
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum RefusalReason {
    /// The policy's cap for a spillable consumer: its share of the pool is spent (the bytes
    /// may be free, but belong to other consumers' shares). Spilling is the answer.
    Share {
        /// The share, in bytes, that the request would have exceeded.
        share: usize,
    },
    /// The budget itself: the `BufPool` (or an ancestor, or the whole tree while it is
    /// overcommitted) has not the bytes free now. `cause` is what the core said:
    /// [`AllocError::WouldBlock`] (not free now: held by others, or others wait),
    /// [`AllocError::ExceedsBudget`] (could never fit), [`AllocError::Closed`].
    Budget {
        /// The core's refusal.
        cause: AllocError,
    },
    /// Under [`Policy::Fair`](crate::Policy::Fair), a spillable consumer that holds bytes
    /// (it can spill them) asked for room set aside for the unspillable consumers: what they
    /// claimed and do not hold now, and the headroom kept for one yet to come.
    SetAside {
        /// The bytes set aside.
        set_aside: usize,
    },
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::Share { share } => {
                write!(
                    f,
                    "its fair share ({}) is spent",
                    human_readable_size(*share)
                )
            }
            RefusalReason::Budget { cause } => {
                write!(f, "the budget has not the bytes free (core: {cause})")
            }
            RefusalReason::SetAside { set_aside } => write!(
                f,
                "the room left is set aside for unspillable consumers ({})",
                human_readable_size(*set_aside)
            ),
        }
    }
}

/// What holds bytes somewhere in the budget's tree, as a refusal names it.
///
/// # Examples
///
/// ```
/// use membudget_datafusion::{Holder, HolderKind};
///
/// let io = Holder { name: "io".into(), bytes: 8 << 20, kind: HolderKind::Pool };
/// assert_eq!(io.to_string(), "pool io 8.0 MB");
/// ```
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Holder {
    /// The consumer's or the pool's name (`unnamed` for a pool without one).
    pub name: String,
    /// The bytes it holds itself or that are set aside for it alone (see [`HolderKind`]).
    pub bytes: usize,
    /// A DataFusion consumer of this pool, or a `BufPool` of the tree.
    pub kind: HolderKind,
}

/// Which kind of holder a [`Holder`] is.
///
/// # Examples
///
/// ```
/// use membudget_datafusion::HolderKind;
///
/// let sorter = HolderKind::Consumer { id: 7, can_spill: true };
/// assert_ne!(sorter, HolderKind::Pool);
/// ```
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum HolderKind {
    /// A DataFusion `MemoryConsumer` registered with the `MembudgetPool` that refused.
    Consumer {
        /// The consumer's id (`MemoryConsumer::id`).
        id: usize,
        /// Whether it can spill.
        can_spill: bool,
    },
    /// A `BufPool` of the tree (the program's I/O pools, other queries' pools), by the
    /// bytes it holds itself (`PoolReport::own_bytes`) plus, for a pool with a floor
    /// (`min_memory`), the idle part of its floor: set aside in its ancestors for that pool
    /// alone, it is room nobody else may take (a sibling query's idle floor is named so).
    /// A child pool's own bytes include those of its requests still waiting higher up the
    /// tree (a request holds its own pool's level while it waits at an ancestor): an I/O
    /// pool that holds 680 KiB and waits at the root for 160 KiB more is named for 840 KiB,
    /// so the figures named may add up to more than the root's budget.
    /// Not the idle floor of the refusing pool nor of its ancestors: that is room the
    /// refusing pool's own requests may take. The refusing pool's own `BufPool` is named for
    /// what it holds beside its consumers (I/O buffers allocated from
    /// [`MembudgetPool::pool`](crate::MembudgetPool::pool), say), if anything.
    Pool,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            HolderKind::Consumer { id, can_spill } => write!(
                f,
                "{}#{id}(can spill: {can_spill}) {}",
                self.name,
                human_readable_size(self.bytes)
            ),
            HolderKind::Pool => {
                write!(f, "pool {} {}", self.name, human_readable_size(self.bytes))
            }
        }
    }
}

/// A refused `try_grow`: who asked, how much, why, and the largest holders in the whole tree
/// at that moment. Its `Display` is the text of the `ResourcesExhausted` error DataFusion gets.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use membudget_datafusion::{MembudgetPool, RefusalReason};
///
/// let root = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 })
///     .name("process")
///     .build()?;
/// let io = root.child("io", BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 })?;
/// let query = Arc::new(MembudgetPool::child_of(&root, "query", 512 << 10, 0)?);
/// let buffers = io.try_allocate(200).unwrap(); // 800 KiB of I/O buffers
///
/// let pool: Arc<dyn MemoryPool> = query.clone();
/// let join = MemoryConsumer::new("HashJoinInput").register(&pool);
/// assert!(join.try_grow(300 << 10).is_err()); // only 224 KiB left in the root
/// let refusal = query.last_refusal().unwrap();
/// assert_eq!((refusal.consumer.as_str(), refusal.requested), ("HashJoinInput", 300 << 10));
/// assert!(matches!(refusal.reason, RefusalReason::Budget { .. }));
/// assert_eq!(refusal.holders[0].name, "io"); // the I/O pool holds the rest
/// # drop(buffers);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub struct Refusal {
    /// The consumer's name.
    pub consumer: String,
    /// The consumer's id.
    pub consumer_id: usize,
    /// Whether the consumer can spill.
    pub can_spill: bool,
    /// The bytes asked for.
    pub requested: usize,
    /// The size of the `MemoryReservation` that asked, before the request.
    pub reservation_size: usize,
    /// What the consumer held over all its reservations, before the request.
    pub consumer_bytes: usize,
    /// About how many more bytes the consumer could have had: what is left of its share, or
    /// what the budget has free for this pool (its own room, the root's free room and its
    /// unused floor; levels in between are not read).
    pub available: usize,
    /// Why it was refused.
    pub reason: RefusalReason,
    /// The largest holders in the whole tree, largest first: this pool's consumers by name
    /// and the tree's pools alike (each pool by what it holds itself and the idle part of
    /// its floor: see [`HolderKind::Pool`]).
    pub holders: Vec<Holder>,
    /// The pool's `Display`, for the message.
    pub pool: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Failed to allocate additional {} for {}#{} with {} already allocated for this \
             reservation ({} for the consumer) - {} remain available for the total memory \
             pool: {}; refused because {}. Largest holders in the budget: ",
            human_readable_size(self.requested),
            self.consumer,
            self.consumer_id,
            human_readable_size(self.reservation_size),
            human_readable_size(self.consumer_bytes),
            human_readable_size(self.available),
            self.pool,
            self.reason,
        )?;
        if self.holders.is_empty() {
            f.write_str("none")?;
        }
        for (i, holder) in self.holders.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{holder}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}
