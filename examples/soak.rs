//! A soak harness: chaotic mixed load on fresh trees of pools, checked continuously.
//!
//! ```text
//! cargo run --release --example soak -- --secs 30
//! ```
//!
//! Each epoch builds a fresh tree of pools: a root with a random buffer size and budget, two or
//! three child pools and some grandchildren, each with its own buffer size and budget (some
//! above their parent's). Tokio tasks and blocking threads then hammer random pools of the
//! tree with random sizes through every call form (async, blocking, timeout, try, zeroed), and
//! with reservations (`reserve` in every form, `try_grow`, `grow` under a timeout, `shrink`,
//! `split`, `merge`, `Reservation::allocate`), holding up to a few items each; random
//! cancellations (`tokio::time::timeout`, `select!`, dropping a future after one poll) and
//! random resizes of random pools. Three times an epoch the workers park at a checkpoint
//! (once nobody waits and every worker is parked, the pools are quiescent); at the end the
//! root is closed (closing the whole tree) and drained.
//!
//! Throughout, for every pool: the bytes the workers hold in its subtree (allocations and
//! reservations) never exceed its budget, nor does its `in_use_bytes`, and no wait outlasts a
//! watchdog bound. At each checkpoint, for every pool: `in_use_bytes` is exactly what the
//! workers hold in its subtree, `reserved_bytes` and `outstanding` what they hold in it,
//! `waiting` is 0, and `report()` agrees. At the end of every epoch, every pool is back to
//! zero. It prints the operation counts, the waits and the longest one.
//!
//! A worker never waits without bound while it holds anything (it would deadlock with
//! another doing the same): while it holds something it uses the try and timeout forms, and
//! grows a reservation with `try_grow` or `grow` under a timeout.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::Poll;
use std::time::{Duration, Instant};

use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PoolReport, Reservation,
};

/// No single wait may take longer than this; a longer one is reported as a hang.
const WAIT_BOUND: Duration = Duration::from_secs(10);
const EPOCH: Duration = Duration::from_secs(2);
const TASKS: usize = 24;
const THREADS: usize = 4;
const WORKERS: usize = TASKS + THREADS;
/// Quiescent checkpoints per epoch, evenly spread.
const CHECKPOINTS: u32 = 3;
/// The most items (allocations and reservations) a worker holds at once.
const MAX_HELD: usize = 3;

#[derive(Default)]
struct Counters {
    allocations: AtomicU64,
    waits: AtomicU64,
    would_block: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    closed: AtomicU64,
    exceeded: AtomicU64,
    resizes: AtomicU64,
    epochs: AtomicU64,
    pools: AtomicU64,
    max_wait_micros: AtomicU64,
    reservations: AtomicU64,
    grows: AtomicU64,
    shrinks: AtomicU64,
    splits: AtomicU64,
    merges: AtomicU64,
    merges_refused: AtomicU64,
    allocations_from_reservations: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_sheds: AtomicU64,
    checked_allocations: AtomicU64,
    checked_reserved_bytes: AtomicU64,
}

/// One pool of an epoch's tree, and what the workers hold in it.
struct Node {
    pool: BufPool,
    name: String,
    /// This pool and its ancestors, from this one up (indices into `Epoch::nodes`).
    chain: Vec<usize>,
    children: Vec<usize>,
    buffer_size: usize,
    /// Buffers in its first budget.
    max_buffers: usize,
    /// The most buffers that fit the first budgets of its whole chain.
    fitting_buffers: usize,
    /// The largest budget set during the epoch (a shrink applies to live memory only as it
    /// comes back).
    ceiling: AtomicUsize,
    /// Bytes the workers hold in this pool's subtree (allocations and reservations).
    live_bytes: AtomicUsize,
    /// Bytes of this pool's own reservations the workers hold.
    reserved_bytes: AtomicUsize,
    /// This pool's own allocations the workers hold.
    allocations: AtomicUsize,
}

/// What one epoch's workers share: the tree of pools and the checkpoint.
struct Epoch {
    nodes: Vec<Node>,
    checkpoint: Checkpoint,
}

/// A few times an epoch the coordinator asks every worker to park between two
/// operations; parked workers keep what they hold, unless asked to shed it (when a worker
/// cannot park because it waits for budget the parked ones hold).
#[derive(Default)]
struct Checkpoint {
    requested: AtomicBool,
    /// Raised by one every few milliseconds while some worker cannot park: a parked worker
    /// that holds something takes a token and drops one item for it.
    shed_tokens: AtomicUsize,
    parked: AtomicUsize,
}

impl Checkpoint {
    fn take_shed_token(&self) -> bool {
        self.shed_tokens
            .fetch_update(Relaxed, Relaxed, |tokens| tokens.checked_sub(1))
            .is_ok()
    }
}

impl Epoch {
    /// Counts `bytes` newly held in `pool` in its whole chain, checking each budget.
    fn count_in(&self, pool: usize, bytes: usize) {
        for &at in &self.nodes[pool].chain {
            let node = &self.nodes[at];
            let live = node.live_bytes.fetch_add(bytes, Relaxed) + bytes;
            let ceiling = node.ceiling.load(Relaxed);
            if live > ceiling {
                fail(&format!(
                    "budget exceeded in {}: {live} live bytes, budget at most {ceiling}",
                    node.name
                ));
            }
        }
    }

    /// Uncounts `bytes` about to go back from `pool` (before the pool has them back, so the
    /// count never lags behind a release).
    fn count_out(&self, pool: usize, bytes: usize) {
        for &at in &self.nodes[pool].chain {
            self.nodes[at].live_bytes.fetch_sub(bytes, Relaxed);
        }
    }
}

/// An allocation whose bytes are counted in its pool's chain while it lives.
struct HeldAllocation<'a> {
    allocation: Option<BufPoolAllocation>,
    epoch: &'a Epoch,
    pool: usize,
}

impl<'a> HeldAllocation<'a> {
    /// A new allocation of `pool`: counted, checked, touched.
    fn new(epoch: &'a Epoch, pool: usize, allocation: BufPoolAllocation) -> Self {
        epoch.count_in(pool, allocation.allocated_bytes());
        Self::counted(epoch, pool, allocation)
    }

    /// An allocation whose bytes are counted already (out of a reservation).
    fn counted(epoch: &'a Epoch, pool: usize, allocation: BufPoolAllocation) -> Self {
        epoch.nodes[pool].allocations.fetch_add(1, Relaxed);
        // Touch the memory: first and last byte of every buffer.
        let mut allocation = allocation;
        for buffer in allocation.buffers_uninit_mut() {
            let last = buffer.len() - 1;
            buffer[0].write(0xA5);
            buffer[last].write(0x5A);
        }
        HeldAllocation {
            allocation: Some(allocation),
            epoch,
            pool,
        }
    }
}

impl Drop for HeldAllocation<'_> {
    fn drop(&mut self) {
        if let Some(allocation) = self.allocation.take() {
            self.epoch.nodes[self.pool]
                .allocations
                .fetch_sub(1, Relaxed);
            self.epoch
                .count_out(self.pool, allocation.allocated_bytes());
        }
    }
}

/// A reservation whose bytes are counted in its pool's chain while it holds them.
struct HeldReservation<'a> {
    reservation: Option<Reservation>,
    epoch: &'a Epoch,
    pool: usize,
}

fn rounded(bytes: usize) -> usize {
    bytes.checked_next_multiple_of(8).unwrap_or(usize::MAX)
}

impl<'a> HeldReservation<'a> {
    fn new(epoch: &'a Epoch, pool: usize, reservation: Reservation) -> Self {
        epoch.count_in(pool, reservation.size());
        epoch.nodes[pool]
            .reserved_bytes
            .fetch_add(reservation.size(), Relaxed);
        HeldReservation {
            reservation: Some(reservation),
            epoch,
            pool,
        }
    }

    fn size(&self) -> usize {
        self.reservation.as_ref().unwrap().size()
    }

    /// A growth of `more` bytes came through.
    fn grew(&mut self, before: usize) {
        let more = self.size() - before;
        self.epoch.count_in(self.pool, more);
        self.epoch.nodes[self.pool]
            .reserved_bytes
            .fetch_add(more, Relaxed);
    }

    fn shrink(&mut self, less: usize) {
        let before = self.size();
        let less_rounded = rounded(less).min(before);
        self.epoch.count_out(self.pool, less_rounded);
        self.epoch.nodes[self.pool]
            .reserved_bytes
            .fetch_sub(less_rounded, Relaxed);
        self.reservation.as_mut().unwrap().shrink(less);
        if self.size() != before - less_rounded {
            fail("shrink gave back a different amount");
        }
    }

    /// Splits `bytes` off into a new held reservation (the counts do not change).
    fn split(&mut self, bytes: usize) -> HeldReservation<'a> {
        let before = self.size();
        let part = self.reservation.as_mut().unwrap().split(bytes);
        if part.size() != rounded(bytes).min(before) || self.size() + part.size() != before {
            fail("split did not take min(bytes rounded, size)");
        }
        HeldReservation {
            reservation: Some(part),
            epoch: self.epoch,
            pool: self.pool,
        }
    }

    /// Merges `other` in if it is of the same pool; gives it back otherwise.
    fn merge(&mut self, mut other: HeldReservation<'a>) -> Result<(), HeldReservation<'a>> {
        let (size, other_size) = (self.size(), other.size());
        let result = self
            .reservation
            .as_mut()
            .unwrap()
            .merge(other.reservation.take().unwrap());
        match result {
            Ok(()) => {
                if self.pool != other.pool || self.size() != size + other_size {
                    fail("merge across pools, or of the wrong size");
                }
                Ok(())
            }
            Err(back) => {
                if self.pool == other.pool || back.size() != other_size {
                    fail("merge refused within one pool, or changed the reservation");
                }
                other.reservation = Some(back);
                Err(other)
            }
        }
    }

    /// `n` buffers out of the reservation.
    fn allocate(&mut self, n: usize) -> Result<HeldAllocation<'a>, AllocError> {
        let before = self.size();
        let result = self.reservation.as_mut().unwrap().allocate(n);
        match result {
            Ok(allocation) => {
                let bytes = allocation.allocated_bytes();
                if self.size() != before - bytes {
                    fail("Reservation::allocate took the wrong amount");
                }
                self.epoch.nodes[self.pool]
                    .reserved_bytes
                    .fetch_sub(bytes, Relaxed);
                Ok(HeldAllocation::counted(self.epoch, self.pool, allocation))
            }
            Err(error) => {
                if self.size() != before {
                    fail("a failed Reservation::allocate changed the reservation");
                }
                Err(error)
            }
        }
    }
}

impl Drop for HeldReservation<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            let size = reservation.size();
            self.epoch.count_out(self.pool, size);
            self.epoch.nodes[self.pool]
                .reserved_bytes
                .fetch_sub(size, Relaxed);
            drop(reservation);
        }
    }
}

enum Item<'a> {
    Allocation(#[allow(dead_code)] HeldAllocation<'a>),
    Reservation(HeldReservation<'a>),
}

fn fail(message: &str) -> ! {
    eprintln!("soak: FAILED: {message}");
    std::process::exit(1);
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Counts one call's result and checks its wait.
fn record<T>(counters: &Counters, result: &Result<T, AllocError>, waited: Duration) {
    if waited > WAIT_BOUND {
        fail(&format!(
            "a wait took {waited:?}, above the bound {WAIT_BOUND:?}"
        ));
    }
    counters
        .max_wait_micros
        .fetch_max(waited.as_micros() as u64, Relaxed);
    if waited > Duration::from_micros(50) {
        counters.waits.fetch_add(1, Relaxed);
    }
    let counter = match result {
        Ok(_) => return,
        Err(AllocError::WouldBlock) => &counters.would_block,
        Err(AllocError::TimedOut) => &counters.timed_out,
        Err(AllocError::Closed) => &counters.closed,
        Err(AllocError::ExceedsBudget { .. }) => &counters.exceeded,
        Err(error) => fail(&format!("unexpected error {error:?}")),
    };
    counter.fetch_add(1, Relaxed);
}

/// What a worker does next, the same for tasks and threads.
enum Next {
    /// Drop the held item at this index.
    Drop(usize),
    /// Change the held reservation at this index (or drop it, if it is an allocation).
    Change(usize),
    Allocate {
        pool: usize,
        n: usize,
    },
    Reserve {
        pool: usize,
        bytes: usize,
    },
}

fn next(epoch: &Epoch, rng: &mut Rng, held: &[Item<'_>]) -> Next {
    // Holding something: mostly let go of it (or change a reservation), so that the budgets
    // keep turning over; sometimes take more.
    if !held.is_empty() && (held.len() >= MAX_HELD || rng.below(4) != 0) {
        let index = rng.below(held.len());
        return if rng.below(3) == 0 {
            Next::Change(index)
        } else {
            Next::Drop(index)
        };
    }
    let pool = rng.below(epoch.nodes.len());
    let node = &epoch.nodes[pool];
    // Mostly small requests, some up to what the chain's budgets allow, a few above.
    let most = match rng.below(20) {
        0 => 2 * node.max_buffers,
        1..=5 => node.fitting_buffers,
        _ => node.fitting_buffers.div_ceil(8),
    };
    if rng.below(3) == 0 {
        Next::Reserve {
            pool,
            bytes: 1 + rng.below(most * node.buffer_size),
        }
    } else {
        Next::Allocate {
            pool,
            n: 1 + rng.below(most),
        }
    }
}

/// The changes to a held reservation both kinds of worker make without waiting; `None`
/// leaves the choice (a growth that may wait) to the worker. `Err(Closed)` ends the worker.
fn change_now<'a>(
    epoch: &'a Epoch,
    counters: &Counters,
    rng: &mut Rng,
    held: &mut Vec<Item<'a>>,
    index: usize,
) -> Option<Result<(), AllocError>> {
    let Item::Reservation(reservation) = &mut held[index] else {
        held.swap_remove(index);
        return Some(Ok(()));
    };
    let node = &epoch.nodes[reservation.pool];
    let size = reservation.size();
    match rng.below(6) {
        0 => {
            let before = size;
            let result = reservation
                .reservation
                .as_mut()
                .unwrap()
                .try_grow(1 + rng.below(size.max(64)));
            record(counters, &result, Duration::ZERO);
            match result {
                Ok(()) => {
                    reservation.grew(before);
                    counters.grows.fetch_add(1, Relaxed);
                    Some(Ok(()))
                }
                Err(AllocError::Closed) => Some(Err(AllocError::Closed)),
                Err(_) => Some(Ok(())),
            }
        }
        1 => None,
        2 => {
            reservation.shrink(rng.below(size + 8));
            counters.shrinks.fetch_add(1, Relaxed);
            Some(Ok(()))
        }
        3 => {
            let part = reservation.split(rng.below(size + 8));
            counters.splits.fetch_add(1, Relaxed);
            held.push(Item::Reservation(part));
            Some(Ok(()))
        }
        4 => {
            let other = rng.below(held.len());
            if other == index || !matches!(held[other], Item::Reservation(_)) {
                return Some(Ok(()));
            }
            let Item::Reservation(other_reservation) = held.swap_remove(other) else {
                unreachable!()
            };
            // `swap_remove` moved the last item into `other`.
            let index = if index == held.len() { other } else { index };
            let Item::Reservation(reservation) = &mut held[index] else {
                unreachable!()
            };
            match reservation.merge(other_reservation) {
                Ok(()) => {
                    counters.merges.fetch_add(1, Relaxed);
                }
                Err(back) => {
                    counters.merges_refused.fetch_add(1, Relaxed);
                    held.push(Item::Reservation(back));
                }
            }
            Some(Ok(()))
        }
        _ => {
            let n = 1 + rng.below((size / node.buffer_size).max(1) + 1);
            match reservation.allocate(n) {
                Ok(allocation) => {
                    counters.allocations_from_reservations.fetch_add(1, Relaxed);
                    held.push(Item::Allocation(allocation));
                }
                Err(AllocError::ExceedsBudget { .. } | AllocError::ZeroBuffers) => {}
                Err(error) => fail(&format!("Reservation::allocate: {error:?}")),
            }
            Some(Ok(()))
        }
    }
}

async fn task_worker(epoch: Arc<Epoch>, counters: Arc<Counters>, seed: u64) {
    let epoch = &*epoch;
    let mut rng = Rng(seed | 1);
    let mut held: Vec<Item<'_>> = Vec::new();
    loop {
        if epoch.checkpoint.requested.load(Relaxed) {
            epoch.checkpoint.parked.fetch_add(1, Relaxed);
            while epoch.checkpoint.requested.load(Relaxed) {
                if !held.is_empty() && epoch.checkpoint.take_shed_token() {
                    held.pop();
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            epoch.checkpoint.parked.fetch_sub(1, Relaxed);
        }
        let closed = match next(epoch, &mut rng, &held) {
            Next::Drop(index) => {
                held.swap_remove(index);
                false
            }
            Next::Change(index) => match change_now(epoch, &counters, &mut rng, &mut held, index) {
                Some(result) => result.is_err(),
                None => {
                    let Item::Reservation(reservation) = &mut held[index] else {
                        unreachable!()
                    };
                    let before = reservation.size();
                    let more = 1 + rng.below(before.max(64));
                    let since = Instant::now();
                    // Bounded: a worker never waits without bound while it holds anything.
                    let result = match tokio::time::timeout(
                        Duration::from_micros(rng.below(500) as u64),
                        reservation.reservation.as_mut().unwrap().grow(more),
                    )
                    .await
                    {
                        Ok(result) => result,
                        Err(_) => {
                            counters.cancelled.fetch_add(1, Relaxed);
                            Err(AllocError::TimedOut)
                        }
                    };
                    record(&counters, &result, since.elapsed());
                    if result.is_ok() {
                        reservation.grew(before);
                        counters.grows.fetch_add(1, Relaxed);
                    }
                    result == Err(AllocError::Closed)
                }
            },
            Next::Allocate { pool, n } => {
                let result = task_allocate(epoch, &counters, &mut rng, pool, n, held.is_empty())
                    .await
                    .map(|allocation| HeldAllocation::new(epoch, pool, allocation));
                match result {
                    Ok(allocation) => {
                        counters.allocations.fetch_add(1, Relaxed);
                        held.push(Item::Allocation(allocation));
                        false
                    }
                    Err(error) => error == AllocError::Closed,
                }
            }
            Next::Reserve { pool, bytes } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                let result = match rng.below(4) {
                    0 => node.pool.try_reserve(bytes),
                    1 if held.is_empty() => node.pool.reserve(bytes).await,
                    _ => match tokio::time::timeout(
                        Duration::from_micros(rng.below(500) as u64),
                        node.pool.reserve(bytes),
                    )
                    .await
                    {
                        Ok(result) => result,
                        Err(_) => {
                            counters.cancelled.fetch_add(1, Relaxed);
                            Err(AllocError::TimedOut)
                        }
                    },
                };
                record(&counters, &result, since.elapsed());
                match result {
                    Ok(reservation) => {
                        counters.reservations.fetch_add(1, Relaxed);
                        held.push(Item::Reservation(HeldReservation::new(
                            epoch,
                            pool,
                            reservation,
                        )));
                        false
                    }
                    Err(error) => error == AllocError::Closed,
                }
            }
        };
        if closed {
            return;
        }
        for _ in 0..rng.below(3) {
            tokio::task::yield_now().await;
        }
    }
}

/// One allocation in one of the async forms; waits without bound only if `may_wait`.
async fn task_allocate(
    epoch: &Epoch,
    counters: &Counters,
    rng: &mut Rng,
    pool: usize,
    n: usize,
    may_wait: bool,
) -> Result<BufPoolAllocation, AllocError> {
    let pool = &epoch.nodes[pool].pool;
    let since = Instant::now();
    let result = match rng.below(6) {
        0 => match tokio::time::timeout(
            Duration::from_micros(rng.below(500) as u64),
            pool.allocate(n),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => {
                counters.cancelled.fetch_add(1, Relaxed);
                return Err(AllocError::TimedOut);
            }
        },
        1 => {
            tokio::select! {
                result = pool.allocate_zeroed(n) => result,
                _ = tokio::time::sleep(Duration::from_micros(rng.below(300) as u64)) => {
                    counters.cancelled.fetch_add(1, Relaxed);
                    return Err(AllocError::TimedOut);
                }
            }
        }
        2 => {
            // Polled once, then dropped: queued and cancelled, or served at once.
            let mut allocate = pin!(pool.allocate(n));
            match futures::poll!(allocate.as_mut()) {
                Poll::Ready(result) => result,
                Poll::Pending => {
                    counters.cancelled.fetch_add(1, Relaxed);
                    return Err(AllocError::TimedOut);
                }
            }
        }
        4 | 5 if may_wait => pool.allocate(n).await,
        _ => pool.try_allocate(n),
    };
    record(counters, &result, since.elapsed());
    result
}

fn thread_worker(epoch: &Epoch, counters: &Counters, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut held: Vec<Item<'_>> = Vec::new();
    loop {
        if epoch.checkpoint.requested.load(Relaxed) {
            epoch.checkpoint.parked.fetch_add(1, Relaxed);
            while epoch.checkpoint.requested.load(Relaxed) {
                if !held.is_empty() && epoch.checkpoint.take_shed_token() {
                    held.pop();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            epoch.checkpoint.parked.fetch_sub(1, Relaxed);
        }
        let closed = match next(epoch, &mut rng, &held) {
            Next::Drop(index) => {
                held.swap_remove(index);
                false
            }
            // Threads grow with `try_grow` only: `grow_blocking` would wait without bound
            // while holding the reservation.
            Next::Change(index) => change_now(epoch, counters, &mut rng, &mut held, index)
                .unwrap_or(Ok(()))
                .is_err(),
            Next::Allocate { pool, n } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                let result = match rng.below(4) {
                    0 => node
                        .pool
                        .allocate_timeout(n, Duration::from_micros(rng.below(1000) as u64)),
                    1 => node.pool.try_allocate(n),
                    2 if held.is_empty() => node.pool.allocate_zeroed_blocking(n),
                    3 if held.is_empty() => node.pool.allocate_blocking(n),
                    _ => node
                        .pool
                        .allocate_zeroed_timeout(n, Duration::from_micros(rng.below(1000) as u64)),
                };
                record(counters, &result, since.elapsed());
                match result {
                    Ok(allocation) => {
                        counters.allocations.fetch_add(1, Relaxed);
                        held.push(Item::Allocation(HeldAllocation::new(
                            epoch, pool, allocation,
                        )));
                        false
                    }
                    Err(error) => error == AllocError::Closed,
                }
            }
            Next::Reserve { pool, bytes } => {
                let node = &epoch.nodes[pool];
                let since = Instant::now();
                let result = match rng.below(3) {
                    0 => node.pool.try_reserve(bytes),
                    1 if held.is_empty() => node.pool.reserve_blocking(bytes),
                    _ => node
                        .pool
                        .reserve_timeout(bytes, Duration::from_micros(rng.below(1000) as u64)),
                };
                record(counters, &result, since.elapsed());
                match result {
                    Ok(reservation) => {
                        counters.reservations.fetch_add(1, Relaxed);
                        held.push(Item::Reservation(HeldReservation::new(
                            epoch,
                            pool,
                            reservation,
                        )));
                        false
                    }
                    Err(error) => error == AllocError::Closed,
                }
            }
        };
        if closed {
            return;
        }
        for _ in 0..rng.below(3) {
            std::thread::yield_now();
        }
    }
}

fn parse_secs() -> u64 {
    let mut args = std::env::args().skip(1);
    let mut secs = 30;
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next().map(|value| value.parse())) {
            ("--secs", Some(Ok(value))) => secs = value,
            _ => {
                eprintln!("usage: soak [--secs N]");
                std::process::exit(2);
            }
        }
    }
    secs
}

fn main() {
    let secs = parse_secs();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counters = Arc::new(Counters::default());
    let progress = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));

    // The watchdog: progress must move, or the process fails instead of hanging CI.
    let watchdog = {
        let counters = counters.clone();
        let progress = progress.clone();
        let finished = finished.clone();
        std::thread::spawn(move || {
            let mut last = (u64::MAX, u64::MAX);
            let mut still_since = Instant::now();
            while !finished.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = (
                    counters.allocations.load(Relaxed)
                        + counters.reservations.load(Relaxed)
                        + counters.closed.load(Relaxed),
                    progress.load(Relaxed),
                );
                if now != last {
                    last = now;
                    still_since = Instant::now();
                } else if still_since.elapsed() > WAIT_BOUND {
                    fail(&format!("no progress for {WAIT_BOUND:?}: hang"));
                }
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let started = Instant::now();
    while Instant::now() < deadline {
        run_epoch(&runtime, &mut rng, &counters);
        progress.fetch_add(1, Relaxed);
        let epochs = counters.epochs.fetch_add(1, Relaxed) + 1;
        if epochs % 5 == 0 {
            println!(
                "{:6.1} s  {} epochs  {} allocations  {} reservations  {} cancelled  max wait {} us",
                started.elapsed().as_secs_f64(),
                epochs,
                counters.allocations.load(Relaxed),
                counters.reservations.load(Relaxed),
                counters.cancelled.load(Relaxed),
                counters.max_wait_micros.load(Relaxed),
            );
        }
    }
    finished.store(true, Relaxed);
    watchdog.join().expect("watchdog");
    let c = &counters;
    println!("---");
    println!(
        "soak: passed in {:.1} s: {} epochs ({} pools), {} allocations, {} waited, {} cancelled, \
         {} would block, {} timed out, {} exceeded a budget, {} closed, {} resizes, \
         max wait {} us; 0 bytes in use in every pool at the end of every epoch",
        started.elapsed().as_secs_f64(),
        c.epochs.load(Relaxed),
        c.pools.load(Relaxed),
        c.allocations.load(Relaxed),
        c.waits.load(Relaxed),
        c.cancelled.load(Relaxed),
        c.would_block.load(Relaxed),
        c.timed_out.load(Relaxed),
        c.exceeded.load(Relaxed),
        c.closed.load(Relaxed),
        c.resizes.load(Relaxed),
        c.max_wait_micros.load(Relaxed),
    );
    println!(
        "reservations: {} made, {} grows, {} shrinks, {} splits, {} merges ({} refused across \
         pools), {} allocations out of them",
        c.reservations.load(Relaxed),
        c.grows.load(Relaxed),
        c.shrinks.load(Relaxed),
        c.splits.load(Relaxed),
        c.merges.load(Relaxed),
        c.merges_refused.load(Relaxed),
        c.allocations_from_reservations.load(Relaxed),
    );
    println!(
        "checkpoints:  {} quiescent checks of every pool ({} after shedding some items), \
         {} allocations and {} reserved bytes held there, accounted exactly",
        c.checkpoints.load(Relaxed),
        c.checkpoint_sheds.load(Relaxed),
        c.checked_allocations.load(Relaxed),
        c.checked_reserved_bytes.load(Relaxed),
    );
}

/// A random tree: a root, two or three children, up to two grandchildren under each child.
/// Budgets: each child's is a quarter to five quarters of its parent's (so some are above
/// it), at least four of its own buffers.
fn build_tree(rng: &mut Rng) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let add = |rng: &mut Rng, nodes: &mut Vec<Node>, name: String, parent: Option<usize>| {
        let (buffer_size, max_memory) = match parent {
            None => {
                let size = BufferSize::ALL[rng.below(8)];
                (size, size.bytes() * (4 + rng.below(60)))
            }
            Some(parent) => {
                let parent_budget = nodes[parent].ceiling.load(Relaxed);
                let budget = parent_budget / 4 + rng.below(parent_budget + 1);
                // A buffer size at most a quarter of the budget (and 8 bytes at least).
                let fitting = BufferSize::ALL
                    .iter()
                    .filter(|size| size.bytes() * 4 <= budget.max(32))
                    .count()
                    .clamp(1, 8);
                let size = BufferSize::ALL[rng.below(fitting)];
                (size, budget.max(4 * size.bytes()))
            }
        };
        let cfg = BufPoolCfg {
            buffer_size,
            max_memory,
        };
        let pool = match parent {
            None => BufPool::builder(cfg).name(name.as_str()).build(),
            Some(parent) => nodes[parent].pool.child(name.as_str(), cfg),
        }
        .expect("a valid budget");
        let index = nodes.len();
        // The smallest budget on the chain: at least one buffer of this pool's? Not always
        // (a child's buffers may be larger than an ancestor's budget allows): then 1.
        let fitting = parent.map_or(max_memory, |parent| {
            nodes[parent].chain.iter().fold(max_memory, |least, &at| {
                least.min(nodes[at].ceiling.load(Relaxed))
            })
        });
        let fitting = fitting.max(buffer_size.bytes());
        let mut chain = vec![index];
        if let Some(parent) = parent {
            chain.extend(nodes[parent].chain.iter().copied());
            nodes[parent].children.push(index);
        }
        nodes.push(Node {
            pool,
            name,
            chain,
            children: Vec::new(),
            buffer_size: buffer_size.bytes(),
            max_buffers: max_memory / buffer_size.bytes(),
            fitting_buffers: fitting / buffer_size.bytes(),
            ceiling: AtomicUsize::new(max_memory),
            live_bytes: AtomicUsize::new(0),
            reserved_bytes: AtomicUsize::new(0),
            allocations: AtomicUsize::new(0),
        });
        index
    };
    add(rng, &mut nodes, "root".into(), None);
    for child in 0..2 + rng.below(2) {
        let index = add(rng, &mut nodes, format!("c{child}"), Some(0));
        for grandchild in 0..rng.below(3) {
            add(
                rng,
                &mut nodes,
                format!("c{child}.g{grandchild}"),
                Some(index),
            );
        }
    }
    nodes
}

/// Every pool's `in_use_bytes` is within what its budget ever was this epoch (at any time).
fn check_budgets(epoch: &Epoch) {
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        let ceiling = node.ceiling.load(Relaxed);
        if stats.in_use_bytes > ceiling {
            fail(&format!(
                "{} has {} bytes in use, budget at most {ceiling}",
                node.name, stats.in_use_bytes
            ));
        }
    }
}

/// With every worker parked: every pool's counters are exactly what the workers hold.
fn check_quiescent(epoch: &Epoch, counters: &Counters) {
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        let want = (
            node.live_bytes.load(Relaxed),
            node.reserved_bytes.load(Relaxed),
            node.allocations.load(Relaxed),
            0,
        );
        let got = (
            stats.in_use_bytes,
            stats.reserved_bytes,
            stats.outstanding,
            stats.waiting,
        );
        if got != want {
            fail(&format!(
                "checkpoint: {} has (in use, reserved, outstanding, waiting) {got:?}, the \
                 workers hold {want:?}: {stats}",
                node.name
            ));
        }
        if stats.in_use_bytes > node.ceiling.load(Relaxed) {
            fail(&format!(
                "checkpoint: {} over its budget: {stats}",
                node.name
            ));
        }
        counters
            .checked_allocations
            .fetch_add(stats.outstanding as u64, Relaxed);
        counters
            .checked_reserved_bytes
            .fetch_add(stats.reserved_bytes as u64, Relaxed);
    }
    let report = epoch.nodes[0].pool.report();
    let mut seen = 0;
    check_report(epoch, &report, 0, &mut seen);
    if seen != epoch.nodes.len() {
        fail(&format!(
            "checkpoint: the report shows {seen} pools:\n{report}"
        ));
    }
}

fn check_report(epoch: &Epoch, report: &PoolReport, index: usize, seen: &mut usize) {
    *seen += 1;
    let node = &epoch.nodes[index];
    let stats = node.pool.stats();
    if report.name.as_deref() != Some(node.name.as_str())
        || (
            report.in_use_bytes,
            report.reserved_bytes,
            report.outstanding,
        ) != (stats.in_use_bytes, stats.reserved_bytes, stats.outstanding)
        || report.children.len() != node.children.len()
    {
        fail(&format!(
            "checkpoint: the report of {} differs from its stats {stats}:\n{report}",
            node.name
        ));
    }
    for child in &report.children {
        let Some(&child_index) = node
            .children
            .iter()
            .find(|&&c| Some(epoch.nodes[c].name.as_str()) == child.name.as_deref())
        else {
            fail(&format!(
                "checkpoint: an unknown child in the report:\n{report}"
            ));
        };
        check_report(epoch, child, child_index, seen);
    }
}

/// Parks every worker, checks the pools, lets them go on.
async fn checkpoint(epoch: &Epoch, counters: &Counters) {
    let checkpoint = &epoch.checkpoint;
    checkpoint.requested.store(true, Relaxed);
    let started = Instant::now();
    let mut last_round = started;
    let mut shed = false;
    while checkpoint.parked.load(Relaxed) < WORKERS {
        // A worker waiting for budget that parked ones hold cannot park: they shed some of
        // it, an item each per round, until it can.
        if started.elapsed() > Duration::from_millis(50)
            && last_round.elapsed() > Duration::from_millis(2)
        {
            checkpoint.shed_tokens.fetch_add(1, Relaxed);
            last_round = Instant::now();
            shed = true;
        }
        if started.elapsed() > WAIT_BOUND {
            fail(&format!(
                "checkpoint: only {} of {WORKERS} workers parked",
                checkpoint.parked.load(Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    check_quiescent(epoch, counters);
    counters.checkpoints.fetch_add(1, Relaxed);
    if shed {
        counters.checkpoint_sheds.fetch_add(1, Relaxed);
    }
    checkpoint.shed_tokens.store(0, Relaxed);
    checkpoint.requested.store(false, Relaxed);
}

fn run_epoch(runtime: &tokio::runtime::Runtime, rng: &mut Rng, counters: &Arc<Counters>) {
    let nodes = build_tree(rng);
    counters.pools.fetch_add(nodes.len() as u64, Relaxed);
    let initial: Vec<usize> = nodes
        .iter()
        .map(|node| node.ceiling.load(Relaxed) / node.buffer_size)
        .collect();
    let resizing = rng.below(2) == 0;
    let epoch = Arc::new(Epoch {
        nodes,
        checkpoint: Checkpoint::default(),
    });

    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let epoch = epoch.clone();
            let counters = counters.clone();
            let seed = rng.next() ^ i as u64;
            std::thread::spawn(move || thread_worker(&epoch, &counters, seed))
        })
        .collect();
    let seeds: Vec<u64> = (0..TASKS).map(|_| rng.next()).collect();
    let resize_seed = rng.next();
    runtime.block_on(async {
        let tasks: Vec<_> = seeds
            .into_iter()
            .map(|seed| tokio::spawn(task_worker(epoch.clone(), counters.clone(), seed)))
            .collect();
        let mut rng = Rng(resize_seed | 1);
        let started = Instant::now();
        let mut checkpoints = 0;
        while started.elapsed() < EPOCH {
            tokio::time::sleep(Duration::from_millis(50)).await;
            check_budgets(&epoch);
            if checkpoints < CHECKPOINTS
                && started.elapsed() >= EPOCH * (checkpoints + 1) / (CHECKPOINTS + 1)
            {
                checkpoint(&epoch, counters).await;
                checkpoints += 1;
            }
            if resizing {
                // A random pool, within [1, 2 x its first budget] buffers; each pool's
                // ceiling only ever rises in an epoch.
                let index = rng.below(epoch.nodes.len());
                let node = &epoch.nodes[index];
                let buffers = 1 + rng.below(2 * initial[index]);
                let bytes = buffers * node.buffer_size;
                node.ceiling.fetch_max(bytes, Relaxed);
                node.pool.set_max_memory(bytes).expect("a valid budget");
                counters.resizes.fetch_add(1, Relaxed);
            }
        }
        // Closing the root closes the whole tree.
        let root = &epoch.nodes[0].pool;
        root.close();
        if epoch.nodes.iter().any(|node| !node.pool.is_closed()) {
            fail("closing the root left a pool of its tree open");
        }
        let drained = tokio::time::timeout(WAIT_BOUND, root.drained()).await;
        if drained.is_err() {
            fail(&format!("drained() hung:\n{}", root.report()));
        }
        for task in tasks {
            tokio::time::timeout(WAIT_BOUND, task)
                .await
                .unwrap_or_else(|_| fail("a task did not stop after close()"))
                .expect("a task panicked");
        }
    });
    for thread in threads {
        thread.join().expect("a worker thread panicked");
    }
    for node in &epoch.nodes {
        let stats = node.pool.stats();
        if stats.in_use_bytes != 0
            || stats.reserved_bytes != 0
            || stats.outstanding != 0
            || stats.waiting != 0
        {
            fail(&format!("epoch ended with {} at {stats}", node.name));
        }
        let held = (
            node.live_bytes.load(Relaxed),
            node.reserved_bytes.load(Relaxed),
            node.allocations.load(Relaxed),
        );
        if held != (0, 0, 0) {
            fail(&format!(
                "{}: held counts not back to zero: {held:?}",
                node.name
            ));
        }
    }
}
