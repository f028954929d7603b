//! Who holds what: a [`PoolReport`] of a pool and every live descendant, for the moment memory
//! runs short (after Arrow Java's allocator dump and DataFusion's top consumers).

use core::fmt;
use std::sync::Arc;

use crate::BufPool;
use crate::state::State;

impl BufPool {
    /// A report of this pool and every live descendant ([`BufPool::child`]): for each, its
    /// name, budget, bytes in use (its subtree's), reserved, peak, outstanding allocations
    /// and waiting requests. Each pool is read on its own, without stopping any, so under
    /// load the numbers come from slightly different instants.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = |kib: usize| BufPoolCfg { buffer_size: BufferSize::S1024, max_memory: kib << 10 };
    /// let pool = BufPool::builder(cfg(64)).name("ingest").build()?;
    /// let a = pool.child("tenant-a", cfg(16))?;
    /// let b = pool.child("tenant-b", cfg(16))?;
    /// let _x = a.try_allocate(2).unwrap();
    /// let _y = b.try_allocate(8).unwrap();
    /// let report = pool.report();
    /// assert_eq!(report.in_use_bytes, 10 << 10);
    /// assert_eq!(report.top(1)[0].name.as_deref(), Some("tenant-b"));
    /// println!("{report}");
    /// // ingest: 10240 of 65536 bytes in use (own 0, reserved 0), peak 10240, 0 outstanding, 0 waiting
    /// //   tenant-b: 8192 of 16384 bytes in use (own 8192, ...
    /// //   tenant-a: 2048 of 16384 bytes in use (own 2048, ...
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn report(&self) -> PoolReport {
        PoolReport::of(self.state())
    }

    /// A report of the whole tree this pool belongs to: [`report`](BufPool::report) of its
    /// root. For error messages that name the largest holders anywhere in the budget (a
    /// query's pool naming the I/O pool that holds the rest, say).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 };
    /// let root = BufPool::builder(cfg).name("process").build()?;
    /// let io = root.child("io", cfg)?;
    /// let query = root.child("query", cfg)?;
    /// let _held = io.try_allocate(4).unwrap();
    /// let tree = query.tree_report();
    /// assert_eq!(tree.name.as_deref(), Some("process"));
    /// assert_eq!(tree.top(1)[0].name.as_deref(), Some("io"));
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn tree_report(&self) -> PoolReport {
        PoolReport::of(self.state().at_level(self.state().depth()))
    }
}

/// What [`BufPool::report`] saw: one pool and, nested, its live descendants.
///
/// `Display` prints an indented tree, children sorted by bytes in use (largest first).
/// Built, cloned, compared and printed by loops, not recursion (its drop, derived, nests once
/// per level: a few KiB for any real tree, about 160 KiB in a debug build for the deepest one
/// a pool tree may have, 1,024 levels).
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
/// let report = pool.report();
/// assert_eq!((report.max_memory, report.in_use_bytes, report.children.len()), (640, 0, 0));
/// assert!(report.to_string().starts_with("unnamed: 0 of 640 bytes in use"));
/// ```
#[derive(Default)]
#[non_exhaustive]
pub struct PoolReport {
    /// The pool's name, if it has one.
    pub name: Option<Arc<str>>,
    /// Its budget.
    pub max_memory: usize,
    /// Bytes in use in its subtree: its own allocations and reservations, and its
    /// descendants'.
    pub in_use_bytes: usize,
    /// Bytes held by its own reservations.
    pub reserved_bytes: usize,
    /// The most bytes ever in use at once in its subtree.
    pub peak_in_use_bytes: usize,
    /// Its own live allocations.
    pub outstanding: usize,
    /// Requests waiting in its queue (its own, and descendants' waiting for its budget).
    pub waiting: usize,
    /// Its floor ([`min_memory`](crate::BufPoolBuilder::min_memory)), set aside in its
    /// ancestors: counted in their `in_use_bytes` even while it holds less.
    pub min_memory: usize,
    /// Bytes in use above its budget (see
    /// [`PoolStats::overcommit_bytes`](crate::PoolStats::overcommit_bytes)).
    pub overcommit_bytes: usize,
    /// The reclaimers registered with it, in the order a round would ask them (lowest
    /// priority, then largest estimate, first).
    pub reclaimers: Vec<ReclaimerReport>,
    /// Its live children, largest `in_use_bytes` first.
    pub children: Vec<PoolReport>,
    /// Which pool it describes (see [`describes`](PoolReport::describes)); 0 in a `Default`
    /// report, which describes none.
    pool: u64,
    /// The part of its floor nobody uses now (set aside in its parent all the same).
    floor_free: usize,
}

/// One registered reclaimer, as [`PoolReport::reclaimers`] lists it.
///
/// # Examples
///
/// ```
/// # use std::{future::Future, pin::Pin, sync::Arc};
/// # use membudget::{BufPool, BufPoolCfg, BufferSize, Reclaimer};
/// struct Fixed(usize);
/// impl Reclaimer for Fixed {
///     fn estimate(&self) -> usize { self.0 }
///     fn reclaim(&self, _: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
///         Box::pin(async { 0 })
///     }
/// }
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
/// let _a = pool.register_reclaimer("small", 1, Arc::new(Fixed(64)));
/// let _b = pool.register_reclaimer("big", 1, Arc::new(Fixed(512)));
/// let report = pool.report();
/// assert_eq!(report.reclaimers[0].name.as_ref(), "big");
/// assert_eq!(report.reclaimers[0].estimate, 512);
/// assert!(report.to_string().contains("reclaimer \"big\""));
/// ```
#[derive(Clone, Debug, Default, Eq, PartialEq)]
#[non_exhaustive]
pub struct ReclaimerReport {
    /// The name it was registered under.
    pub name: Arc<str>,
    /// Its priority (lower is asked first).
    pub priority: u32,
    /// Its [`estimate`](crate::Reclaimer::estimate) now (0 if that panicked).
    pub estimate: usize,
    /// How many times a round asked it.
    pub times_asked: usize,
    /// Bytes it was asked for, added up.
    pub asked_bytes: usize,
    /// Bytes it reported freed, added up.
    pub reclaimed_bytes: usize,
}

impl PoolReport {
    /// The report of `root` and its live descendants. A loop over an explicit stack, not a
    /// recursion (nor are `Clone`, `PartialEq`, `Debug`, `Display` and `top`): a chain of
    /// `MAX_DEPTH` pools fits
    /// any thread's stack.
    fn of(root: &State) -> PoolReport {
        /// A descendant whose report waits for its children's.
        struct Pending {
            pool: crate::sync::Arc<State>,
            unread: std::vec::IntoIter<crate::sync::Arc<State>>,
            children: Vec<PoolReport>,
        }
        let mut root_unread = root.children().into_iter();
        let mut root_children = Vec::new();
        let mut stack: Vec<Pending> = Vec::new();
        loop {
            let unread = match stack.last_mut() {
                Some(top) => &mut top.unread,
                None => &mut root_unread,
            };
            if let Some(child) = unread.next() {
                let unread = child.children().into_iter();
                stack.push(Pending {
                    pool: child,
                    unread,
                    children: Vec::new(),
                });
                continue;
            }
            let Some(done) = stack.pop() else {
                return PoolReport::one(root, root_children);
            };
            let report = PoolReport::one(&done.pool, done.children);
            match stack.last_mut() {
                Some(parent) => parent.children.push(report),
                None => root_children.push(report),
            }
        }
    }

    /// The report of `pool`, whose children's reports are `children`.
    fn one(pool: &State, mut children: Vec<PoolReport>) -> PoolReport {
        let stats = pool.stats();
        children.sort_by_key(|child| core::cmp::Reverse(child.in_use_bytes));
        let (floor, floor_free) = pool.floor_now();
        PoolReport {
            name: stats.name,
            max_memory: stats.max_memory,
            in_use_bytes: stats.in_use_bytes,
            reserved_bytes: stats.reserved_bytes,
            peak_in_use_bytes: stats.peak_in_use_bytes,
            outstanding: stats.outstanding,
            waiting: stats.waiting,
            min_memory: floor,
            floor_free,
            overcommit_bytes: stats.overcommit_bytes,
            reclaimers: Self::reclaimers_of(pool),
            children,
            pool: pool.id(),
        }
    }

    /// Whether this report (or one nested in a report) describes `pool`: names need not be
    /// unique, nor set, so this is how to find a pool in a [`tree_report`](BufPool::tree_report).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 };
    /// let root = BufPool::new(cfg);
    /// let (a, b) = (root.child("same", cfg)?, root.child("same", cfg)?);
    /// let tree = a.tree_report();
    /// assert!(tree.describes(&root));
    /// assert!(tree.children.iter().any(|child| child.describes(&b)));
    /// assert!(!tree.children[0].describes(&root));
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn describes(&self, pool: &BufPool) -> bool {
        self.pool == pool.state().id()
    }

    /// The pool's reclaimers, estimates read now (user code: no lock is held here).
    fn reclaimers_of(pool: &State) -> Vec<ReclaimerReport> {
        let mut reclaimers: Vec<ReclaimerReport> = pool
            .registrations()
            .iter()
            .map(|registration| {
                let (times_asked, asked_bytes, reclaimed_bytes) = registration.counts();
                ReclaimerReport {
                    name: Arc::clone(&registration.name),
                    priority: registration.priority,
                    estimate: registration.estimate().unwrap_or(0),
                    times_asked,
                    asked_bytes,
                    reclaimed_bytes,
                }
            })
            .collect();
        // Stable: registration order among equals, as a round.
        reclaimers.sort_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then(b.estimate.cmp(&a.estimate))
        });
        reclaimers
    }

    /// Bytes the pool holds itself: its subtree's bytes in use less what its children take
    /// from it, each child counted at its bytes in use plus the idle part of its floor (the
    /// whole floor is set aside in this pool): so a floor never counts as this pool's own,
    /// and the child's own bytes are what its allocations and reservations hold, its idle
    /// floor not among them.
    ///
    /// Exact when no request of a descendant waits at this pool's level or above: such a
    /// request counts in the descendant's bytes in use (it holds the levels below) but not
    /// yet in this pool's, so while it waits this figure (saturating at 0) is short by it,
    /// and so is this pool's place in [`top`](PoolReport::top).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 };
    /// let pool = BufPool::new(cfg);
    /// let child = pool.child("c", cfg)?;
    /// let (_a, _b) = (pool.try_allocate(1).unwrap(), child.try_allocate(2).unwrap());
    /// assert_eq!(pool.report().own_bytes(), 64);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn own_bytes(&self) -> usize {
        let children: usize = self
            .children
            .iter()
            // What the child takes from this pool: what it uses, and the idle part of its
            // floor (a floored child's use may be partly its floor, partly climbed above it).
            .map(|child| child.in_use_bytes + child.floor_free)
            .sum();
        self.in_use_bytes.saturating_sub(children)
    }

    /// The `k` largest holders in the subtree (this pool included), by the bytes each holds
    /// itself ([`own_bytes`](PoolReport::own_bytes)), largest first.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 };
    /// let pool = BufPool::new(cfg);
    /// let child = pool.child("c", cfg)?;
    /// let grandchild = child.child("g", cfg)?;
    /// let _held = grandchild.try_allocate(3).unwrap();
    /// let top = pool.report();
    /// let top = top.top(2);
    /// assert_eq!(top[0].name.as_deref(), Some("g"));
    /// assert_eq!(top[0].own_bytes(), 192);
    /// # Ok::<(), membudget::ConfigError>(())
    /// ```
    pub fn top(&self, k: usize) -> Vec<&PoolReport> {
        let mut all = Vec::new();
        self.collect(&mut all);
        all.sort_by_key(|report| core::cmp::Reverse(report.own_bytes()));
        all.truncate(k);
        all
    }

    fn collect<'a>(&'a self, all: &mut Vec<&'a PoolReport>) {
        let mut unread = vec![self];
        while let Some(report) = unread.pop() {
            all.push(report);
            unread.extend(report.children.iter().rev());
        }
    }

    fn write_one(&self, f: &mut fmt::Formatter<'_>, depth: usize) -> fmt::Result {
        writeln!(
            f,
            "{:indent$}{}: {} of {} bytes in use (own {}, reserved {}), peak {}, {} outstanding, {} waiting",
            "",
            self.name.as_deref().unwrap_or("unnamed"),
            self.in_use_bytes,
            self.max_memory,
            self.own_bytes(),
            self.reserved_bytes,
            self.peak_in_use_bytes,
            self.outstanding,
            self.waiting,
            indent = 2 * depth,
        )?;
        for reclaimer in &self.reclaimers {
            writeln!(
                f,
                "{:indent$}reclaimer {:?} (priority {}): estimate {} bytes, asked {} times for {} bytes, freed {}",
                "",
                reclaimer.name,
                reclaimer.priority,
                reclaimer.estimate,
                reclaimer.times_asked,
                reclaimer.asked_bytes,
                reclaimer.reclaimed_bytes,
                indent = 2 * depth + 2,
            )?;
        }
        Ok(())
    }
}

impl PoolReport {
    /// This report without its children.
    fn shallow_clone(&self) -> PoolReport {
        PoolReport {
            name: self.name.clone(),
            max_memory: self.max_memory,
            in_use_bytes: self.in_use_bytes,
            reserved_bytes: self.reserved_bytes,
            peak_in_use_bytes: self.peak_in_use_bytes,
            outstanding: self.outstanding,
            waiting: self.waiting,
            min_memory: self.min_memory,
            overcommit_bytes: self.overcommit_bytes,
            reclaimers: self.reclaimers.clone(),
            children: Vec::new(),
            pool: self.pool,
            floor_free: self.floor_free,
        }
    }

    /// Whether the two agree in everything but their children.
    fn shallow_eq(&self, other: &PoolReport) -> bool {
        self.name == other.name
            && self.max_memory == other.max_memory
            && self.in_use_bytes == other.in_use_bytes
            && self.reserved_bytes == other.reserved_bytes
            && self.peak_in_use_bytes == other.peak_in_use_bytes
            && self.outstanding == other.outstanding
            && self.waiting == other.waiting
            && self.min_memory == other.min_memory
            && self.overcommit_bytes == other.overcommit_bytes
            && self.reclaimers == other.reclaimers
            && self.pool == other.pool
            && self.floor_free == other.floor_free
            && self.children.len() == other.children.len()
    }
}

impl Clone for PoolReport {
    /// A loop, like `PoolReport::of`: each copy is finished once its children's are.
    fn clone(&self) -> Self {
        struct Pending<'a> {
            copy: PoolReport,
            unread: core::slice::Iter<'a, PoolReport>,
        }
        let mut stack = vec![Pending {
            copy: self.shallow_clone(),
            unread: self.children.iter(),
        }];
        loop {
            let top = stack
                .last_mut()
                .expect("the stack holds the copy of `self` until the end");
            if let Some(child) = top.unread.next() {
                stack.push(Pending {
                    copy: child.shallow_clone(),
                    unread: child.children.iter(),
                });
                continue;
            }
            let done = stack.pop().expect("checked above").copy;
            match stack.last_mut() {
                Some(parent) => parent.copy.children.push(done),
                None => return done,
            }
        }
    }
}

impl PartialEq for PoolReport {
    fn eq(&self, other: &Self) -> bool {
        let mut unread = vec![(self, other)];
        while let Some((a, b)) = unread.pop() {
            if !a.shallow_eq(b) {
                return false;
            }
            unread.extend(a.children.iter().zip(&b.children));
        }
        true
    }
}

impl Eq for PoolReport {}

impl fmt::Debug for PoolReport {
    /// As `#[derive(Debug)]` would print it on one line (`{:#?}` too), written by a loop.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        enum Step<'a> {
            Open(&'a PoolReport),
            Text(&'static str),
        }
        let mut steps = vec![Step::Open(self)];
        while let Some(step) = steps.pop() {
            let report = match step {
                Step::Text(text) => {
                    f.write_str(text)?;
                    continue;
                }
                Step::Open(report) => report,
            };
            write!(
                f,
                "PoolReport {{ name: {:?}, max_memory: {}, in_use_bytes: {}, reserved_bytes: {}, \
                 peak_in_use_bytes: {}, outstanding: {}, waiting: {}, min_memory: {}, \
                 overcommit_bytes: {}, reclaimers: {:?}, pool: {}, floor_free: {}, children: [",
                report.name,
                report.max_memory,
                report.in_use_bytes,
                report.reserved_bytes,
                report.peak_in_use_bytes,
                report.outstanding,
                report.waiting,
                report.min_memory,
                report.overcommit_bytes,
                report.reclaimers,
                report.pool,
                report.floor_free,
            )?;
            steps.push(Step::Text("] }"));
            for (index, child) in report.children.iter().enumerate().rev() {
                steps.push(Step::Open(child));
                if index > 0 {
                    steps.push(Step::Text(", "));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for PoolReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut unwritten = vec![(self, 0)];
        while let Some((report, depth)) = unwritten.pop() {
            report.write_one(f, depth)?;
            unwritten.extend(report.children.iter().rev().map(|child| (child, depth + 1)));
        }
        Ok(())
    }
}
