//! [`MembudgetPool`]: DataFusion's `MemoryPool` over a membudget `BufPool`.

use core::fmt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};

use datafusion::common::Result;
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation, human_readable_size,
};
use membudget::{
    AllocError, BufPool, BufPoolCfg, BufferSize, ConfigError, PendingWakeUps, PoolReport,
    Reservation,
};

use crate::{Holder, HolderKind, Refusal, RefusalReason};

/// How a [`MembudgetPool`] shares its budget among DataFusion's consumers. Whatever the
/// policy, the `BufPool`'s budget (and its ancestors') has the last word: a `try_grow` the
/// policy allows still fails if the bytes are not free in the tree now.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use membudget_datafusion::{MembudgetPool, Policy};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 << 20 });
/// let query = MembudgetPool::builder().policy(Policy::FairSpill).build(pool);
/// assert_eq!(query.policy(), Policy::FairSpill);
/// assert_eq!(Policy::default(), Policy::Fair);
/// ```
#[derive(Clone, Copy, Debug, Default, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum Policy {
    /// The default. Spillable reservations are capped at a fair share, as with DataFusion's
    /// `FairSpillPool`, with differences that keep the queries `FairSpillPool` fails from
    /// failing (see the crate README, "Policies" and "Beyond parity"):
    ///
    /// * the share is `(base - set_aside - headroom) / spillable consumers`. `base` is the
    ///   pool's budget or, for a child pool whose floor (`min_memory`) is above 0 and below
    ///   its budget, the floor. `set_aside` is, summed over the registered unspillable
    ///   consumers, what each holds or its claim if larger (the largest single request it
    ///   was granted while it held nothing: a sorter's merge headroom, freed to spill and
    ///   reserved again after). `headroom` is room kept for one more unspillable consumer:
    ///   the most a registered one holds or claims, at most one more share;
    /// * a request on a spillable reservation that holds more than half its consumer's
    ///   bytes (where the consumer buffers: it can spill them) is also refused when the
    ///   room below `base` less the unheld claims and the headroom is too small
    ///   ([`RefusalReason::SetAside`]): it spills. It never overcommits;
    /// * any other spillable request within its share (a sorter's first batch, a sorted
    ///   run's output beside the batches it is sorted from, a GROUP BY's merge of its
    ///   spills beside its replay table: the consumer cannot spill from there, and
    ///   `FairSpillPool` checks such a reservation against the share alone) may take that
    ///   room and, when the budget is spent (this pool's, or the tree's for a pool with a
    ///   floor), is granted as counted overcommit ([`MembudgetStats::forced_shares`]);
    /// * unspillable consumers take what the budget has free, except that one that holds
    ///   bytes and would hold more than the headroom and than its own claim (a final merge
    ///   growing to read more spill files at once) leaves the other unspillable
    ///   consumers' unheld claims alone, and as much as it asks free (at most the
    ///   headroom). They never overcommit through `try_grow`. Only a consumer that
    ///   claimed at least four times as much in one request as it asks for now can be
    ///   "large" (a hash join's build side, growing by batches about the size of its first,
    ///   is not);
    /// * all of the above but the share applies only while the merges' claims fit in three
    ///   quarters of `base` (the largest claim times the spillable consumers, and the
    ///   claims summed). Past that (DataFusion's default 10 MiB
    ///   `sort_spill_reservation_bytes` under a limit below about 27 MiB with 2
    ///   partitions) the rule is `FairSpillPool`'s, as under [`Policy::FairSpill`]: some
    ///   claims are then stale (a merge reservation freed for good by a sorter that sorted
    ///   in memory), and keeping them aside would fail queries `FairSpillPool` completes;
    /// * a spillable consumer that holds nothing is never refused below `FairSpillPool`'s
    ///   share.
    ///
    /// When the room is missing higher up the tree (the I/O side holds it), requests are
    /// refused: the pool's floor is what protects the query there.
    #[default]
    Fair,
    /// DataFusion's `FairSpillPool` rule, unchanged: a spillable *reservation* may hold
    /// `(limit - unspillable bytes) / spillable consumers`; unspillable ones take what is
    /// free. Within its share, a spillable reservation refused by this pool's own budget
    /// overcommits as under [`Policy::Fair`].
    FairSpill,
    /// First come, first served (DataFusion's `GreedyMemoryPool`): only the budget caps.
    Greedy,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Fair => "fair",
            Policy::FairSpill => "fair_spill",
            Policy::Greedy => "greedy",
        }
    }
}

/// A [`MembudgetPool`]'s options. See [`MembudgetPool::builder`].
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use membudget_datafusion::{MembudgetPool, Policy};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 1 << 20 });
/// let query = MembudgetPool::builder()
///     .policy(Policy::Greedy)
///     .holders_in_errors(3)
///     .build(pool);
/// assert_eq!(query.policy(), Policy::Greedy);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct MembudgetPoolBuilder {
    policy: Policy,
    holders: usize,
}

impl Default for MembudgetPoolBuilder {
    fn default() -> Self {
        MembudgetPoolBuilder {
            policy: Policy::default(),
            holders: 5,
        }
    }
}

impl MembudgetPoolBuilder {
    /// The policy ([`Policy::Fair`] by default).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::{MembudgetPool, Policy};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 1 << 20 });
    /// assert_eq!(MembudgetPool::builder().policy(Policy::Greedy).build(pool).policy(), Policy::Greedy);
    /// ```
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// How many of the tree's largest holders a refusal names (5 by default).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 1024 });
    /// let query = Arc::new(MembudgetPool::builder().holders_in_errors(1).build(pool));
    /// let pool: Arc<dyn MemoryPool> = query.clone();
    /// let (a, b) = (MemoryConsumer::new("a").register(&pool), MemoryConsumer::new("b").register(&pool));
    /// a.try_grow(600).unwrap();
    /// b.try_grow(400).unwrap();
    /// assert!(b.try_grow(100).is_err());
    /// assert_eq!(query.last_refusal().unwrap().holders.len(), 1);
    /// ```
    pub fn holders_in_errors(mut self, k: usize) -> Self {
        self.holders = k;
        self
    }

    /// Makes the `MemoryPool` over `pool`.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 1 << 20 });
    /// let query = MembudgetPool::builder().build(pool);
    /// assert_eq!(query.pool().stats().max_memory, 1 << 20);
    /// ```
    pub fn build(self, pool: BufPool) -> MembudgetPool {
        let held = pool
            .try_reserve(0)
            .expect("an empty reservation is always granted");
        MembudgetPool {
            books: Mutex::new(Books {
                held,
                consumers: HashMap::new(),
                spillers: 0,
                peak: 0,
                stats: MembudgetStats::default(),
                last_refusal: None,
                uncounted: 0,
            }),
            reserved: AtomicUsize::new(0),
            policy: self.policy,
            holders: self.holders,
            // A root has none (`min_memory` needs a parent).
            floor: pool.report().min_memory,
            pool,
        }
    }
}

/// One registered consumer's books.
#[derive(Debug)]
struct Consumer {
    name: String,
    can_spill: bool,
    /// Bytes over all its reservations, exact: wider than `usize`, since DataFusion's
    /// reservations each count up to `usize::MAX` (its infallible `grow`) and a consumer may
    /// have several. Read through [`saturated`] wherever a policy sizes or a report shows it.
    bytes: u128,
    /// The most it ever held.
    peak: usize,
    /// For an unspillable consumer under [`Policy::Fair`]: the largest single `try_grow` it
    /// was granted while it held nothing (a sorter's merge headroom, reserved in one
    /// request), kept aside while it is registered, whether it holds it or not.
    claim: usize,
    /// Of `bytes`, those the core could not count: a `grow` past what a pool counts (4 PiB),
    /// which no machine holds but DataFusion's infallible `grow` must accept.
    uncounted: u128,
}

#[derive(Debug)]
struct Books {
    /// The core reservation holding every consumer's bytes: its `size()` is their exact sum.
    held: Reservation,
    consumers: HashMap<usize, Consumer>,
    /// Registered consumers that can spill.
    spillers: usize,
    peak: usize,
    stats: MembudgetStats,
    last_refusal: Option<Refusal>,
    /// The consumers' `uncounted` bytes, summed.
    uncounted: u128,
}

/// `bytes`, or `usize::MAX` if it is more (only after absurd `grow`s: see [`Consumer::bytes`]).
fn saturated(bytes: u128) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

impl Books {
    fn consumer(&mut self, consumer: &MemoryConsumer) -> &mut Consumer {
        // A consumer is registered before it reserves; one that was not (a pool used
        // through another path) is registered on first use.
        if !self.consumers.contains_key(&consumer.id()) {
            self.register(consumer);
        }
        self.consumers
            .get_mut(&consumer.id())
            .expect("registered above")
    }

    fn register(&mut self, consumer: &MemoryConsumer) {
        let previous = self.consumers.insert(
            consumer.id(),
            Consumer {
                name: consumer.name().to_owned(),
                can_spill: consumer.can_spill(),
                bytes: 0,
                peak: 0,
                claim: 0,
                uncounted: 0,
            },
        );
        match previous {
            Some(previous) => {
                // Registered twice (ids are unique, so the same consumer): keep its books.
                self.consumers.insert(consumer.id(), previous);
            }
            None if consumer.can_spill() => self.spillers += 1,
            None => {}
        }
    }

    /// Whether [`Policy::Fair`] keeps room aside now (the unspillable consumers' claims, the
    /// headroom and the "large" rule): while the claims fit in three quarters of `base` (the
    /// room spillers are sized from), counting both the claims registered now, summed, and
    /// the largest claim once for every spiller (each sorter partition makes one, and
    /// sorters register before they claim). Past that the claims cannot all be held beside
    /// the spillers' batches, so at least one is stale or hopeless, and a headroom smaller
    /// than a claim protects nothing:
    ///
    /// * a claim goes stale when a sorter that sorted in memory frees its merge reservation
    ///   for good and keeps it registered while its output streams. DataFusion 55.2's
    ///   `ExternalSorter` frees it alike before its final merge and before each spill, so
    ///   the pool cannot tell the two apart. Honouring such claims starves the next
    ///   partition's first batch, or `SortPreservingMergeExec`'s next one, of room that
    ///   `FairSpillPool` grants: with DataFusion's default `sort_spill_reservation_bytes`
    ///   (10 MiB) under a 16 MiB limit, two claims pass the limit;
    /// * a headroom smaller than the merge reservation it keeps room for only makes a sorter
    ///   spill early, and a spill frees its merge reservation, which another partition's
    ///   merge then takes, so that the re-reservation after the spill fails the query.
    ///
    /// Then `Policy::Fair` sizes spillers as `FairSpillPool` does, from held bytes only.
    fn keeps_aside(&self, base: usize) -> bool {
        let claims = self
            .consumers
            .values()
            .filter(|c| !c.can_spill)
            .map(|c| c.claim);
        let (sum, largest) = claims.fold((0usize, 0), |(sum, largest), claim| {
            (sum.saturating_add(claim), largest.max(claim))
        });
        // The claims registered now, and those every spiller's partition would make if
        // each claimed as much as the largest (sorters register before they claim).
        sum.max(largest.saturating_mul(self.spillers)) <= base - base / 4
    }

    /// Bytes the unspillable consumers hold or, when `aside` (room is kept aside, under
    /// [`Policy::Fair`]), have claimed.
    fn set_aside(&self, aside: bool) -> usize {
        self.consumers
            .values()
            .filter(|c| !c.can_spill)
            .map(|c| {
                if aside {
                    saturated(c.bytes).max(c.claim)
                } else {
                    saturated(c.bytes)
                }
            })
            .fold(0, usize::saturating_add)
    }

    /// Room an unspillable consumer claimed and does not hold now: `claim - bytes` summed
    /// over the unspillable consumers but `except`.
    fn unheld_claims(&self, except: usize) -> usize {
        self.consumers
            .iter()
            .filter(|(id, c)| !c.can_spill && **id != except)
            .map(|(_, c)| c.claim.saturating_sub(saturated(c.bytes)))
            .fold(0, usize::saturating_add)
    }

    /// When `aside` (under [`Policy::Fair`]), room kept free for an unspillable consumer of
    /// ordinary size (the next partition's merge headroom, a merge's next batch): the most
    /// any registered unspillable consumer but `except` holds or claims, at most one more
    /// share of `limit - set_aside`. A spiller's request where it buffers never takes it (a
    /// secondary one may), nor an unspillable consumer that holds more than it and than its
    /// own claim.
    fn headroom(&self, limit: usize, aside: bool, except: usize) -> usize {
        if !aside {
            return 0;
        }
        let largest = self
            .consumers
            .iter()
            .filter(|(id, c)| !c.can_spill && **id != except)
            .map(|(_, c)| saturated(c.bytes).max(c.claim))
            .max()
            .unwrap_or(0);
        let spill_room = limit.saturating_sub(self.set_aside(aside));
        largest.min(spill_room / (self.spillers + 1))
    }

    /// A spillable consumer's share: `(limit - set_aside - headroom) / spillers`.
    fn share(&self, limit: usize, aside: bool) -> usize {
        let spill_room = limit
            .saturating_sub(self.set_aside(aside))
            .saturating_sub(self.headroom(limit, aside, usize::MAX));
        spill_room.checked_div(self.spillers).unwrap_or(spill_room)
    }

    /// Books `more` bytes for `id` already held by `held` (or, `uncounted`, by nothing).
    fn add(&mut self, id: usize, more: usize, uncounted: bool) {
        let consumer = self.consumers.get_mut(&id).expect("a registered consumer");
        consumer.bytes += more as u128;
        consumer.peak = consumer.peak.max(saturated(consumer.bytes));
        if uncounted {
            consumer.uncounted += more as u128;
            self.uncounted += more as u128;
        }
        self.peak = self.peak.max(self.reserved());
    }

    /// What the consumers hold: `MemoryPool::reserved`.
    fn reserved(&self) -> usize {
        self.held.size().saturating_add(saturated(self.uncounted))
    }

    /// Takes `bytes` of a consumer's off the books (a shrink, or what an unregistered
    /// consumer never shrank), `uncounted` of them from what the core could not count. The
    /// core gives the rest back at once (to the tree's waiters first), exact to the byte; the
    /// wake-ups it owes them come back to the caller, who runs them once the lock is
    /// released: wakers are user code, and may call this pool.
    #[must_use = "run the wake-ups after the lock"]
    fn take_off(&mut self, bytes: u128, uncounted: u128) -> PendingWakeUps {
        self.uncounted -= uncounted;
        // The counted part is held by `held`: it fits a `usize`.
        let counted = usize::try_from(bytes - uncounted).expect("held by the core");
        let size = self.held.size() - counted;
        self.held.shrink_to_deferring_wakeups(size)
    }
}

/// Counters of a [`MembudgetPool`], from [`MembudgetPool::stats`].
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use membudget_datafusion::MembudgetPool;
///
/// let query = Arc::new(MembudgetPool::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 100 })));
/// let pool: Arc<dyn MemoryPool> = query.clone();
/// let join = MemoryConsumer::new("join").register(&pool);
/// join.grow(150); // infallible: 50 bytes of overcommit
/// assert!(join.try_grow(1).is_err());
/// let stats = query.stats();
/// assert_eq!((stats.reserved, stats.peak_reserved, stats.forced_grows, stats.refused), (150, 150, 1, 1));
/// assert_eq!(query.pool().stats().overcommit_bytes, 52); // 150 held as 152: units of 8
/// ```
#[derive(Clone, Debug, Default, Eq, PartialEq)]
#[non_exhaustive]
pub struct MembudgetStats {
    /// Bytes the consumers hold now, exact (what `MemoryPool::reserved` returns).
    pub reserved: usize,
    /// The most they ever held at once.
    pub peak_reserved: usize,
    /// Consumers registered now.
    pub consumers: usize,
    /// `try_grow` calls granted.
    pub granted: u64,
    /// `try_grow` calls refused (each one a `ResourcesExhausted` error).
    pub refused: u64,
    /// ... of which the policy refused (a share, or room set aside).
    pub refused_by_share: u64,
    /// ... of which the budget refused (the bytes were not free in the tree).
    pub refused_by_budget: u64,
    /// `try_grow` calls granted as overcommit: a request within its share on a spillable
    /// reservation that holds at most half its consumer's bytes ([`Policy::Fair`]; also
    /// when the tree above a pool with a floor is full) or on any spillable reservation
    /// ([`Policy::FairSpill`], and [`Policy::Fair`] while it keeps no room aside) that
    /// found this pool's own budget spent.
    pub forced_shares: u64,
    /// `grow` calls (infallible) that found the bytes not free and overcommitted.
    pub forced_grows: u64,
    /// `grow` calls in all.
    pub grows: u64,
}

/// One consumer's usage, from [`MembudgetPool::consumers`].
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use membudget_datafusion::MembudgetPool;
///
/// let query = Arc::new(MembudgetPool::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 1000 })));
/// let pool: Arc<dyn MemoryPool> = query.clone();
/// let sorter = MemoryConsumer::new("ExternalSorter[0]").with_can_spill(true).register(&pool);
/// sorter.try_grow(300).unwrap();
/// sorter.shrink(100);
/// let usage = &query.consumers()[0];
/// assert_eq!((usage.name.as_str(), usage.bytes, usage.peak, usage.can_spill), ("ExternalSorter[0]", 200, 300, true));
/// ```
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub struct ConsumerUsage {
    /// `MemoryConsumer::id`.
    pub id: usize,
    /// `MemoryConsumer::name`.
    pub name: String,
    /// `MemoryConsumer::can_spill`.
    pub can_spill: bool,
    /// Bytes over all its reservations now.
    pub bytes: usize,
    /// The most it held at once.
    pub peak: usize,
}

/// DataFusion's [`MemoryPool`] over a membudget [`BufPool`]: a query's memory counts against
/// the same budget tree as the program's I/O buffers.
///
/// * `try_grow` never waits: it asks the policy ([`Policy`]), then the `BufPool` (and so
///   every ancestor), and when refused returns `DataFusionError::ResourcesExhausted` (the
///   error on which DataFusion's operators spill) naming the consumer, the bytes asked and
///   the largest holders in the whole tree ([`Refusal`]). A zero-byte `try_grow` needs no
///   bytes: under [`Policy::Fair`] and [`Policy::FairSpill`] only the share can refuse it
///   (not the budget, even past its limit or closed); under [`Policy::Greedy`] it is
///   refused while the pool is past its limit, as `GreedyMemoryPool` does.
/// * `grow` (infallible in DataFusion) takes the bytes at once as overcommit the core counts
///   (`Reservation::force_grow`): `PoolStats::overcommit_bytes` at every ancestor, and no
///   new grant anywhere in the tree until it is repaid.
/// * `reserved()` is exact to the byte; the core holds the sum rounded up to a multiple of 8.
/// * `memory_limit()` is the `BufPool`'s `max_memory`.
///
/// All the consumers' bytes live in one core [`Reservation`] of the pool, behind one mutex
/// with the consumers' books (name, id, bytes, peak): DataFusion's reservations are `&self`
/// and used from many threads, and the policy's decision and the grant happen together.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use membudget_datafusion::MembudgetPool;
///
/// let root = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 64 << 20 });
/// // The query may use 16 MiB of the root's 64, and no I/O can take its first 8.
/// let query = MembudgetPool::child_of(&root, "query", 16 << 20, 8 << 20)?;
/// let pool: Arc<dyn MemoryPool> = Arc::new(query);
/// let reservation = MemoryConsumer::new("sorter").with_can_spill(true).register(&pool);
/// reservation.try_grow(1_000_001)?;
/// assert_eq!(pool.reserved(), 1_000_001);
/// assert_eq!(root.stats().in_use_bytes, 8 << 20); // within the floor, set aside already
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// With a `SessionContext`:
///
/// ```
/// use std::sync::Arc;
/// use datafusion::execution::runtime_env::RuntimeEnvBuilder;
/// use datafusion::prelude::{SessionConfig, SessionContext};
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use membudget_datafusion::MembudgetPool;
///
/// let root = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 64 << 20 });
/// let query = Arc::new(MembudgetPool::child_of(&root, "query", 16 << 20, 16 << 20)?);
/// let runtime = RuntimeEnvBuilder::new().with_memory_pool(query.clone()).build_arc()?;
/// let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
/// # drop(ctx);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MembudgetPool {
    // Declared before `pool`: the core reservation goes back before the pool's drop barrier.
    books: Mutex<Books>,
    /// `books.held.size()`, readable without the lock.
    reserved: AtomicUsize,
    policy: Policy,
    holders: usize,
    /// A child pool's floor (`min_memory`; 0 for a root): when it is above 0 and below the
    /// budget, `Policy::Fair` sizes the spillers from it.
    floor: usize,
    pool: BufPool,
}

impl MembudgetPool {
    /// A `MemoryPool` over `pool` (typically a child of the program's root pool) with the
    /// default [`Policy`].
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let root = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 64 << 20 });
    /// let child = root.child("query", BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 16 << 20 })?;
    /// let query = MembudgetPool::new(child);
    /// assert_eq!(query.pool().stats().name.as_deref(), Some("query"));
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn new(pool: BufPool) -> MembudgetPool {
        MembudgetPoolBuilder::default().build(pool)
    }

    /// Options: the [`Policy`], how many holders errors name.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::{MembudgetPool, Policy};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 1 << 20 });
    /// let query = MembudgetPool::builder().policy(Policy::FairSpill).build(pool);
    /// assert_eq!(query.policy(), Policy::FairSpill);
    /// ```
    pub fn builder() -> MembudgetPoolBuilder {
        MembudgetPoolBuilder::default()
    }

    /// A `MemoryPool` over a new child of `parent` named `name`, whose budget is `limit`
    /// bytes and whose floor is `floor` bytes (`BufPoolBuilder::min_memory`: set aside in
    /// every ancestor now, usable by nobody else; 0 for none), with the default policy.
    ///
    /// Under [`Policy::Fair`] a floor above 0 and below `limit` is also what the spillable
    /// consumers are sized from, idle machine or not: a floor smaller than the plan's
    /// unspillable reservations (a sorter's `sort_spill_reservation_bytes`) plus a batch per
    /// partition makes queries fail that a floor of 0 (spillers sized from `limit`) lets
    /// complete. See the README, "Policies".
    ///
    /// # Errors
    ///
    /// The child pool's [`ConfigError`]: `limit` below 8 bytes, `floor` above `limit`, or
    /// the ancestors unable to set the floor aside now
    /// ([`ConfigError::MinMemoryUnavailable`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize, ConfigError};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let root = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 32 << 20 });
    /// let query = MembudgetPool::child_of(&root, "query", 16 << 20, 16 << 20)?;
    /// assert_eq!(root.stats().in_use_bytes, 16 << 20);
    /// let refused = MembudgetPool::child_of(&root, "second", 32 << 20, 32 << 20).unwrap_err();
    /// assert!(matches!(refused, ConfigError::MinMemoryUnavailable { .. }));
    /// # drop(query);
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn child_of(
        parent: &BufPool,
        name: &str,
        limit: usize,
        floor: usize,
    ) -> Result<MembudgetPool, ConfigError> {
        let pool = BufPool::builder(BufPoolCfg {
            buffer_size: BufferSize::S8,
            max_memory: limit,
        })
        .name(name)
        .parent(parent)
        .min_memory(floor)
        .build()?;
        Ok(MembudgetPool::new(pool))
    }

    /// The `BufPool` the consumers' bytes are held in.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let query = MembudgetPool::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 4096 }));
    /// assert_eq!(query.pool().stats().max_memory, 4096);
    /// ```
    pub fn pool(&self) -> &BufPool {
        &self.pool
    }

    /// The policy.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::{MembudgetPool, Policy};
    ///
    /// let query = MembudgetPool::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 4096 }));
    /// assert_eq!(query.policy(), Policy::Fair);
    /// ```
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The pool's counters.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let query = MembudgetPool::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 4096 }));
    /// assert_eq!(query.stats().refused, 0);
    /// ```
    pub fn stats(&self) -> MembudgetStats {
        let books = self.lock();
        MembudgetStats {
            // What `MemoryPool::reserved` returns: the core's bytes and those it could not
            // count (a `grow` past 4 PiB).
            reserved: books.reserved(),
            peak_reserved: books.peak,
            consumers: books.consumers.len(),
            ..books.stats.clone()
        }
    }

    /// The registered consumers and their bytes, largest first.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let query = Arc::new(MembudgetPool::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 4096 })));
    /// let pool: Arc<dyn MemoryPool> = query.clone();
    /// let a = MemoryConsumer::new("a").register(&pool);
    /// let b = MemoryConsumer::new("b").register(&pool);
    /// a.try_grow(10).unwrap();
    /// b.try_grow(20).unwrap();
    /// let names: Vec<_> = query.consumers().into_iter().map(|c| c.name).collect();
    /// assert_eq!(names, ["b", "a"]);
    /// drop(b);
    /// assert_eq!(query.consumers().len(), 1);
    /// ```
    pub fn consumers(&self) -> Vec<ConsumerUsage> {
        let books = self.lock();
        let mut all: Vec<ConsumerUsage> = books
            .consumers
            .iter()
            .map(|(&id, c)| ConsumerUsage {
                id,
                name: c.name.clone(),
                can_spill: c.can_spill,
                bytes: saturated(c.bytes),
                peak: c.peak,
            })
            .collect();
        all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.id.cmp(&b.id)));
        all
    }

    /// The last `try_grow` refused, typed (the `ResourcesExhausted` error DataFusion got is
    /// its `Display`).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use membudget_datafusion::MembudgetPool;
    ///
    /// let query = Arc::new(MembudgetPool::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 4096 })));
    /// let pool: Arc<dyn MemoryPool> = query.clone();
    /// let r = MemoryConsumer::new("r").register(&pool);
    /// assert!(query.last_refusal().is_none());
    /// let error = r.try_grow(5000).unwrap_err();
    /// let refusal = query.last_refusal().unwrap();
    /// assert_eq!(refusal.requested, 5000);
    /// assert!(error.to_string().contains(&refusal.to_string()));
    /// ```
    pub fn last_refusal(&self) -> Option<Refusal> {
        self.lock().last_refusal.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        // The books are consistent at every point a panic can start (a waker run by the
        // core's give-back comes after they are written), so a poisoned lock is usable.
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this pool's own budget (not an ancestor's) is too small for `more` bytes.
    fn own_budget_spent(&self, more: usize) -> bool {
        let stats = self.pool.stats();
        stats.in_use_bytes.saturating_add(more) > stats.max_memory
    }

    fn limit(&self) -> usize {
        self.pool.stats().max_memory
    }

    /// The holders a refusal names, largest first, at most `self.holders` of them: this
    /// pool's consumers (`consumers`, by their exact bytes) and the tree's pools, each by
    /// what it takes from the budget that is nobody else's in this list:
    ///
    /// * the bytes it holds itself (`PoolReport::own_bytes`); for this pool's own `BufPool`,
    ///   those beside the consumers' reservation (`held` bytes, held rounded up to a multiple
    ///   of 8): what others allocate or reserve from `pool()`, I/O buffers say;
    /// * for a pool with a floor, plus the idle part of its floor: set aside in its ancestors
    ///   for it alone, it leaves the rest of the tree that much less room. Not for this pool
    ///   nor its ancestors: their idle floors are room this pool's requests may take.
    fn holders(&self, mut consumers: Vec<Holder>, held: usize) -> Vec<Holder> {
        let tree = self.pool.tree_report();
        let mut reports = Vec::new();
        self.collect_reports(&tree, &mut reports);
        // The consumers' bytes, as the core holds them; read again now, as the tree was
        // read after the lock was released: the larger of the two, so that bytes the
        // consumers took meanwhile are never named as the pool's.
        let consumers_held = held.max(self.lock().held.size());
        let consumers_held = consumers_held
            .checked_next_multiple_of(8)
            .unwrap_or(consumers_held);
        let mut pools: Vec<Holder> = reports
            .into_iter()
            .map(|(report, on_path)| {
                let bytes = if report.describes(&self.pool) {
                    report.own_bytes().saturating_sub(consumers_held)
                } else if on_path {
                    report.own_bytes()
                } else {
                    report.own_bytes().saturating_add(idle_floor(report))
                };
                (report, bytes)
            })
            .filter(|&(_, bytes)| bytes > 0)
            .map(|(report, bytes)| Holder {
                name: report.name.as_deref().unwrap_or("unnamed").to_owned(),
                bytes,
                kind: HolderKind::Pool,
            })
            .collect();
        consumers.append(&mut pools);
        consumers.sort_by_key(|h| core::cmp::Reverse(h.bytes));
        consumers.truncate(self.holders);
        consumers
    }

    /// Every report of `report`'s subtree, depth first, each with whether it is this pool
    /// or one of its ancestors. Returns whether `report`'s subtree holds this pool.
    fn collect_reports<'a>(
        &self,
        report: &'a PoolReport,
        out: &mut Vec<(&'a PoolReport, bool)>,
    ) -> bool {
        let at = out.len();
        out.push((report, false));
        let mut on_path = report.describes(&self.pool);
        for child in &report.children {
            on_path |= self.collect_reports(child, out);
        }
        out[at].1 = on_path;
        on_path
    }

    /// About what the budget has free for this pool: its own room, the root's free room
    /// plus this pool's unused floor. `held`: the consumers' bytes (exact), of which the
    /// core's rounding (up to 7 bytes) counts as room for them.
    fn budget_room(&self, held: usize) -> usize {
        let mine = self.pool.stats();
        let tree = self.pool.tree_report();
        let floor_left = self
            .pool
            .report()
            .min_memory
            .saturating_sub(mine.in_use_bytes);
        // The core holds the consumers' bytes rounded up to a multiple of 8: that rounding
        // is room for them. Every other byte in use in the pool (I/O buffers allocated from
        // `pool()`, its children) is not.
        let rounding = held
            .checked_next_multiple_of(8)
            .map_or(0, |rounded| rounded - held);
        let in_use = mine.in_use_bytes.saturating_sub(rounding);
        let root_free = tree
            .max_memory
            .saturating_sub(tree.in_use_bytes)
            .saturating_add(floor_left)
            .saturating_add(rounding);
        let own_room = mine.max_memory.saturating_sub(in_use);
        own_room.min(root_free)
    }
}

/// The part of a pool's floor that nobody uses now (set aside in its ancestors all the
/// same). `PoolReport` does not show it, but its `own_bytes` counts it: a parent's own bytes
/// are its bytes in use less each child's bytes in use and idle floor. So it is read from a
/// parent made up for the purpose, whose only child is `report` and whose own bytes are the
/// child's whole floor until the idle part is taken off.
fn idle_floor(report: &PoolReport) -> usize {
    if report.min_memory == 0 {
        return 0;
    }
    let mut child = report.clone();
    child.children.clear();
    let mut parent = PoolReport::default();
    parent.in_use_bytes = child.in_use_bytes.saturating_add(child.min_memory);
    parent.children.push(child);
    let child_and_idle = parent.in_use_bytes - parent.own_bytes();
    (child_and_idle - parent.children[0].in_use_bytes).min(report.min_memory)
}

impl fmt::Debug for MembudgetPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MembudgetPool")
            .field("policy", &self.policy)
            .field("reserved", &self.reserved.load(Relaxed))
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for MembudgetPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = self.pool.stats();
        write!(
            f,
            "membudget(pool: {}, used: {}, pool_size: {}, policy: {})",
            stats.name.as_deref().unwrap_or("unnamed"),
            human_readable_size(self.reserved.load(Relaxed)),
            human_readable_size(stats.max_memory),
            self.policy.name(),
        )
    }
}

impl MemoryPool for MembudgetPool {
    fn name(&self) -> &str {
        "membudget"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.lock().register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        let mut books = self.lock();
        let Some(gone) = books.consumers.remove(&consumer.id()) else {
            return;
        };
        if gone.can_spill {
            books.spillers -= 1;
        }
        // DataFusion frees every reservation before it unregisters; bytes left here were
        // never shrunk: they go back rather than stay held forever.
        let wake_ups = books.take_off(gone.bytes, gone.uncounted);
        self.reserved.store(books.reserved(), Relaxed);
        drop(books);
        // Outside the lock: the give-back's wake-ups (the tree's waiters: user code).
        wake_ups.run();
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let mut books = self.lock();
        let id = reservation.consumer().id();
        books.consumer(reservation.consumer());
        books.stats.grows += 1;
        // DataFusion's *reservation* adds with wrap-around (`fetch_add`, after this call):
        // a grow that takes it past `usize::MAX` leaves it smaller, which is a shrink in its
        // books, and in these. The consumer's other reservations take no part: a sum of
        // several that passes `usize::MAX` is booked as it is (`Consumer::bytes`).
        let before = reservation.size();
        if before.checked_add(additional).is_none() {
            drop(books);
            self.shrink(reservation, before - before.wrapping_add(additional));
            return;
        }
        // Take the bytes if they are free; overcommit (counted by the core) if not; beyond
        // what the core counts (more than 4 PiB), keep them in these books only.
        let size = books.held.size();
        let taken = size
            .checked_add(additional)
            .is_some_and(|target| books.held.resize_to(target).is_ok());
        let mut uncounted = false;
        if !taken {
            books.stats.forced_grows += 1;
            uncounted = books.held.force_grow(additional).is_err();
        }
        books.add(id, additional, uncounted);
        self.reserved.store(books.reserved(), Relaxed);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let mut books = self.lock();
        let consumer = books.consumer(reservation.consumer());
        let shrink = (shrink as u128).min(consumer.bytes);
        consumer.bytes -= shrink;
        let uncounted = shrink.min(consumer.uncounted);
        consumer.uncounted -= uncounted;
        let wake_ups = books.take_off(shrink, uncounted);
        self.reserved.store(books.reserved(), Relaxed);
        drop(books);
        // Last, outside the lock: the give-back's wake-ups (the tree's waiters: their wakers
        // are user code, and may call this pool).
        wake_ups.run();
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let id = reservation.consumer().id();
        let mut books = self.lock();
        let consumer = books.consumer(reservation.consumer());
        let (can_spill, consumer_bytes) = (consumer.can_spill, saturated(consumer.bytes));

        // Under `Fair`, the shares, the headroom and the room spillers may take come from
        // the room the pool is sure of: its budget or, when it is a child with a floor
        // below its budget, the floor. Room above the floor that is free now may be gone
        // when the next partition needs it (the I/O side takes it back, and a sorter in
        // its output phase cannot give it back): spillers do not build on it. Unspillable
        // consumers may use it (the budget still has the last word).
        let limit = match self.policy {
            Policy::Fair if self.floor > 0 && self.floor < self.limit() => self.floor,
            _ => self.limit(),
        };
        // Under `Fair`, whether room is kept aside for the unspillable consumers now.
        let aside = self.policy == Policy::Fair && books.keeps_aside(limit);
        // The policy's share, for a spillable consumer.
        let mut refused = if can_spill && self.policy != Policy::Greedy {
            let mut share = books.share(limit, aside);
            if consumer_bytes == 0 {
                // The consumer holds nothing, so it has nothing to spill: a refusal fails
                // the query (a sorter's first batch). Whatever `Fair` keeps aside, such a
                // request is never refused below `FairSpillPool`'s share.
                share = share.max(books.share(limit, false));
            }
            let held = reservation.size();
            (held.saturating_add(additional) > share)
                .then(|| (RefusalReason::Share { share }, share.saturating_sub(held)))
        } else {
            None
        };
        // Under `Fair`, room set aside: a request on a spillable reservation where its
        // consumer buffers (more than half its bytes: it can spill them) takes none of what
        // the unspillable consumers claimed and do not hold now, nor the headroom: the
        // consumer spills instead. A secondary one (below) may. An unspillable consumer
        // that holds bytes and would hold more than the headroom and its own claim ("large")
        // takes none of what the *other* unspillable ones claimed, and leaves as much as
        // it asks free (at most the headroom): a final merge grows for as many spill files
        // as it is granted, and must not take the room another partition's merge gave
        // back to spill, nor the last room `SortPreservingMergeExec` needs for its next
        // batch. A smaller one, or a first request, takes what is free.
        // A spillable reservation that holds at most half its consumer's bytes: a sorter's
        // first batch (nothing held), a sorted run's output beside the batches it is
        // being sorted from, a GROUP BY's merge of its spills beside its replay table. The
        // consumer cannot spill from it; `FairSpillPool` checks it against the share alone.
        let secondary = can_spill && reservation.size().saturating_mul(2) <= consumer_bytes;
        // A request for no bytes takes none of the room set aside (nor, below, of the budget).
        if refused.is_none() && aside && !secondary && additional > 0 {
            let set_aside = if can_spill {
                books
                    .unheld_claims(usize::MAX)
                    .saturating_add(books.headroom(limit, aside, usize::MAX))
            } else {
                let headroom = books.headroom(limit, aside, id);
                let claim = books.consumers.get(&id).map_or(0, |c| c.claim);
                // Large: it holds bytes already (a first request sets its claim), claimed at
                // least four times what it asks for now in one request (a merge that
                // reserved its headroom, sized for its first few spill files, and grows by
                // one spill file's buffers at a time: 512 KiB steps on a 2 MiB claim; a hash
                // join's build side or `SortPreservingMergeExec` grows by batches about the
                // size of their first, and cannot spill: a refusal fails the query), and
                // would hold more than the headroom and its claim.
                let large = consumer_bytes > 0
                    && claim >= additional.saturating_mul(4)
                    && consumer_bytes.saturating_add(additional) > headroom.max(claim);
                if large {
                    books
                        .unheld_claims(id)
                        .saturating_add(additional.min(headroom))
                } else {
                    0
                }
            };
            let held = books.held.size();
            // Spillers are sized from the floor (`limit`); unspillable consumers may use the
            // room above it: for them what is set aside counts against the whole budget.
            let base = if can_spill { limit } else { self.limit() };
            // (A request the budget itself cannot hold is refused by the budget, below.)
            if held.saturating_add(additional).saturating_add(set_aside) > base
                && held.saturating_add(additional) <= self.limit()
            {
                refused = Some((
                    RefusalReason::SetAside { set_aside },
                    base.saturating_sub(held.saturating_add(set_aside)),
                ));
            }
        }
        // Whether the request is within what the policy entitles the consumer to, if the
        // budget is spent (then it overcommits, counted). Under `Fair`, a request within
        // its share on a secondary spillable reservation (above): `FairSpillPool` grants
        // these, checking the reservation against the share and never the total. A request
        // on a reservation where the consumer buffers is never entitled: refused, it
        // spills there; nor is an unspillable one (a merge may ask for more only to read
        // more spill files at once). Under `FairSpill`, any spillable reservation within
        // its share.
        let entitled = refused.is_none()
            && match self.policy {
                Policy::Greedy => false,
                Policy::FairSpill => can_spill,
                // While room is kept aside: only a secondary reservation. Otherwise
                // `FairSpillPool`'s rule, as `FairSpill`.
                Policy::Fair => secondary || (can_spill && !aside),
            };
        // Then the budget, unless the request needs no bytes: under `Fair` and `FairSpill`
        // a zero-byte request the share allows is granted whatever the pool holds (closed,
        // or past its limit after a `grow`), as `FairSpillPool` grants it to an unspillable
        // consumer. Under `Greedy` it is `GreedyMemoryPool`'s rule: refused while the pool
        // is past its limit.
        let needs_nothing = additional == 0 && self.policy != Policy::Greedy;
        let refused = refused.or_else(|| {
            if needs_nothing {
                return None;
            }
            let size = books.held.size();
            let target = size.checked_add(additional);
            let limit = self.limit();
            // Exact against the limit: the core's rounding (or an overcommit) may leave a
            // few bytes held that are not the consumers'; they are no room to grant.
            let attempt = target.map(|target| {
                if target > limit {
                    Err(membudget::AllocError::ExceedsBudget {
                        requested_bytes: target,
                        max_memory: limit,
                    })
                } else {
                    books.held.resize_to(target)
                }
            });
            match attempt {
                Some(Ok(())) => None,
                // A request within its entitlement, refused because this pool's own budget
                // is spent (other consumers hold more than their shares, or the same
                // consumer holds the rest in another reservation) or, for a pool with a
                // floor, because the tree above it has no room (`FairSpillPool` of the
                // floor's size would grant it: it never checks the total for spillers).
                // It may have nothing to spill from this reservation: it gets the bytes, as
                // overcommit the core counts at every level, repaid as the others spill or
                // finish (the I/O side waits meanwhile).
                // (Never on a closed pool: a closed pool grants nothing through `try_grow`.)
                Some(Err(ref cause))
                    if entitled
                        && *cause != AllocError::Closed
                        && !self.pool.is_closed()
                        && ((self.policy == Policy::Fair && self.floor > 0)
                            || self.own_budget_spent(additional)) =>
                {
                    // The core counts at most 4 PiB in use: after a huge `grow` elsewhere in
                    // the pool the overcommit itself may be refused. Then this is a refusal
                    // as any other, never a panic.
                    match books.held.force_grow(additional) {
                        Ok(()) => {
                            books.stats.forced_shares += 1;
                            None
                        }
                        Err(cause) => Some((RefusalReason::Budget { cause }, usize::MAX)),
                    }
                }
                // A budget that is not a multiple of 8: the exact bytes fit it, their
                // rounding (the core's unit) does not. The whole units below the limit are
                // asked for as any request is (room in the tree, no barging, not closed);
                // only the last partial unit's rounding, up to 7 bytes, is counted
                // overcommit, which keeps `try_grow` exact against the limit.
                Some(Err(ref cause))
                    if *cause != AllocError::Closed
                        && target.is_some_and(|t| {
                            t <= limit && t.checked_next_multiple_of(8).is_none_or(|r| r > limit)
                        }) =>
                {
                    let target = target.expect("checked above");
                    let whole = limit - limit % 8;
                    match books.held.resize_to(whole.max(size)) {
                        Ok(()) => {
                            let rounding = target - books.held.size();
                            books
                                .held
                                .force_grow(rounding)
                                .expect("within the pool's budget");
                            None
                        }
                        Err(cause) => Some((RefusalReason::Budget { cause }, usize::MAX)),
                    }
                }
                Some(Err(cause)) => Some((RefusalReason::Budget { cause }, usize::MAX)),
                None => Some((
                    RefusalReason::Budget {
                        cause: membudget::AllocError::ExceedsBudget {
                            requested_bytes: usize::MAX,
                            max_memory: self.limit(),
                        },
                    },
                    usize::MAX,
                )),
            }
        });

        let Some((reason, available)) = refused else {
            let consumer = books.consumers.get_mut(&id).expect("registered above");
            if !consumer.can_spill && consumer.bytes == 0 {
                // Its claim (under `Fair`): a sorter's merge headroom is reserved in one
                // request from nothing, freed to spill and reserved again after, or passed
                // on to the merge that reads the spills; the room stays set aside from
                // the spillers meanwhile. The growth of a merge stream of the same
                // consumer, in small steps, does not raise it.
                consumer.claim = consumer.claim.max(additional);
            }
            books.add(id, additional, false);
            books.stats.granted += 1;
            self.reserved.store(books.reserved(), Relaxed);
            return Ok(());
        };

        books.stats.refused += 1;
        match reason {
            RefusalReason::Share { .. } | RefusalReason::SetAside { .. } => {
                books.stats.refused_by_share += 1
            }
            RefusalReason::Budget { .. } => books.stats.refused_by_budget += 1,
        }
        let consumers: Vec<Holder> = {
            let mut all: Vec<(&usize, &Consumer)> = books
                .consumers
                .iter()
                .filter(|(_, c)| c.bytes > 0)
                .collect();
            all.sort_by_key(|c| core::cmp::Reverse(c.1.bytes));
            all.into_iter()
                .take(self.holders)
                .map(|(&id, c)| Holder {
                    name: c.name.clone(),
                    bytes: saturated(c.bytes),
                    kind: HolderKind::Consumer {
                        id,
                        can_spill: c.can_spill,
                    },
                })
                .collect()
        };
        let name = reservation.consumer().name().to_owned();
        // What the consumers hold in the core, exact: the rest of the `BufPool`'s own bytes
        // (I/O buffers allocated from `pool()`, say) are someone else's.
        let held = books.held.size();
        drop(books);

        // Outside the lock: the tree's report reads every pool.
        let refusal = Refusal {
            consumer: name,
            consumer_id: id,
            can_spill,
            requested: additional,
            reservation_size: reservation.size(),
            consumer_bytes,
            available: if available == usize::MAX {
                self.budget_room(held)
            } else {
                available
            },
            reason,
            holders: self.holders(consumers, held),
            pool: self.to_string(),
        };
        let error = DataFusionError::ResourcesExhausted(refusal.to_string());
        self.lock().last_refusal = Some(refusal);
        Err(error)
    }

    fn reserved(&self) -> usize {
        self.reserved.load(Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit())
    }
}
