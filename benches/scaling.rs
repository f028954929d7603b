//! Scaling (issue 22): the budget's cost per operation as the thread count grows, with a
//! prototype of the per-thread lease design of `docs/many-cores.md` beside the crate.
//!
//! Plain `main`, no criterion: every run spawns the threads, releases them together and
//! times from the first thread's start to the last one's end. Each row is the median over
//! `SCALING_RUNS` runs (default 5, at least 3) after one warm-up run, printed as ns per
//! operation (wall time / total operations) with the min-max spread.
//!
//! First it measures the atomic latencies the cost model needs (also alone with `--atomics`):
//!
//! * `fetch_add` on a line only this thread touches (the uncontended read-modify-write);
//! * a compare-exchange increment loop on one line that every thread of the run hammers
//!   (ns per successful increment, at 2 threads);
//! * a relaxed load of a line another thread keeps writing;
//! * a ping-pong between two threads through one line (half a round trip: one line transfer).
//!
//! Then, for each thread count in `SCALING_THREADS` (default `1,2,4`, dropping counts above
//! twice the cores unless the variable is set; e.g. `1,2,4,8,16,32,64,128` on a big machine),
//! each thread does `SCALING_OPS` (default 1,000,000; ~20 s for everything on 2 cores)
//! allocations of one 64-byte buffer and drops them (`SCALING_WIDE_ONLY=1`: the wide rows
//! only):
//!
//! * `wide`: a budget nothing waits for; `try_allocate(1)` + drop. Rows: `ours`
//!   (`membudget::BufPool`), `tokio` (`Semaphore::try_acquire` + a 64-byte `std::alloc`),
//!   `floor` (`std::alloc` + one shared `fetch_add`/`fetch_sub`), `leased` (the prototype
//!   below + `std::alloc`).
//! * `tight`: a budget of `max(1, threads / 2)` buffers; `allocate_blocking(1)` + drop.
//!   Rows: `ours`, `tokio` (`acquire().await` through `futures::executor::block_on`),
//!   `leased` (whose waits are a mutex and condvar, not the crate's FIFO queue).
//!
//! Run: `cargo bench --bench scaling` (or `-- --atomics` for the latencies alone).
//!
//! # The `leased` prototype
//!
//! Not crate code: the design of `docs/many-cores.md` reduced to what the bench needs, and
//! modelled in `loom-tests/loom.rs` (model 33). The budget word holds a `RECALL` flag, a
//! recall epoch and the bytes in use, *leased-but-unused bytes included*, so the budget is
//! never exceeded. Each thread has a slot on its own cache line holding the unused bytes of
//! its lease. An allocation takes from its slot with one compare-exchange on that line; a
//! release puts bytes back there if the slot is not empty (an emptied slot may have been
//! recalled: it is filled again only by taking a lease). A thread whose slot is short takes
//! a lease of `LEASE` bytes from the word (refused while `RECALL` is set), publishes it in
//! its slot and then re-reads the word with a read-modify-write: if a recall started (or
//! came and went) since it took the lease, it takes the slot back and returns it. A slot
//! above `2 * LEASE` returns `LEASE` to the word. Whoever must wait (or would fail a
//! `try_`) takes the gate, raises `RECALL` with a new epoch, swaps every slot to zero and
//! returns what it found to the word, and only then looks at the budget.
//!
//! Left out of the prototype (see the design): the headroom rule (here a lease is taken
//! whenever it fits), lazily created slots, slots shared by thread index (here one per
//! thread), statistics, and FIFO waits (here a mutex and condvar: the `tight` rows are not
//! like for like).

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BUF: usize = 64;

/// One value on its own pair of cache lines (adjacent-line prefetch included).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

#[inline(always)]
fn alloc_dealloc() {
    let layout = Layout::from_size_align(BUF, 1).expect("valid layout");
    // SAFETY: non-zero size.
    let ptr = unsafe { alloc(layout) };
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    black_box(ptr);
    // SAFETY: allocated just above with the same layout.
    unsafe { dealloc(ptr, layout) };
}

/// Spawns `threads` threads that each run `work(index)` once after a common barrier; the
/// time from the first start to the last end, as each thread reads the clock itself. After
/// the barrier every thread also spins until all have arrived: a vCPU woken from the
/// barrier's futex can take milliseconds to run, long enough for a short run to be over on
/// the other core (no contention measured at all).
fn timed_run(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    let arrived = AtomicUsize::new(0);
    let spans: Vec<(Instant, Instant)> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|index| {
                let (barrier, arrived, work) = (&barrier, &arrived, &work);
                s.spawn(move || {
                    barrier.wait();
                    arrived.fetch_add(1, Ordering::AcqRel);
                    let mut spins = 0u32;
                    while arrived.load(Ordering::Acquire) < threads {
                        spins += 1;
                        if spins % 1024 == 0 {
                            thread::yield_now();
                        }
                        std::hint::spin_loop();
                    }
                    let start = Instant::now();
                    work(index);
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("worker panicked"))
            .collect()
    });
    let first = spans.iter().map(|span| span.0).min().expect("threads > 0");
    let last = spans.iter().map(|span| span.1).max().expect("threads > 0");
    last - first
}

/// Median, min and max of `samples` (ns per op).
fn spread(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    (median, samples[0], samples[samples.len() - 1])
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.trim().replace('_', "").parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// The lease prototype.
// ---------------------------------------------------------------------------------------

/// Set while a recall is under way or someone waits: no lease is taken, no allocation takes
/// the shared word's bytes except under the gate.
const RECALL: u64 = 1 << 63;
/// A recall epoch, counted on every raise of `RECALL`, so that a lease taken before a recall
/// that has come and gone is still seen to have missed it.
const EPOCH_SHIFT: u32 = 48;
const EPOCH_ONE: u64 = 1 << EPOCH_SHIFT;
const EPOCH: u64 = ((1 << 15) - 1) << EPOCH_SHIFT;
const IN_USE: u64 = EPOCH_ONE - 1;
/// Bytes per lease: 64 buffers.
const LEASE: u64 = 64 * BUF as u64;

struct Leased {
    word: Padded<AtomicU64>,
    budget: u64,
    slots: Box<[Padded<AtomicU64>]>,
    /// Serialises recalls and waits; `waiting` counts the threads parked on `room`.
    gate: Mutex<usize>,
    room: Condvar,
}

impl Leased {
    fn new(budget: usize, threads: usize) -> Self {
        Leased {
            word: Padded(AtomicU64::new(0)),
            budget: budget as u64,
            slots: (0..threads).map(|_| Padded::default()).collect(),
            gate: Mutex::new(0),
            room: Condvar::new(),
        }
    }

    /// `bytes` for thread `me` without waiting: from its lease, else from the word.
    #[inline(always)]
    fn try_allocate(&self, me: usize, bytes: u64) -> bool {
        let slot = &self.slots[me].0;
        let mut have = slot.load(Ordering::Relaxed);
        while have >= bytes {
            // Acquire: pairs with the Release of whoever put the bytes in the slot.
            match slot.compare_exchange_weak(
                have,
                have - bytes,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => have = actual,
            }
        }
        self.try_allocate_shared(me, bytes)
    }

    #[cold]
    fn try_allocate_shared(&self, me: usize, bytes: u64) -> bool {
        let mut word = self.word.0.load(Ordering::Acquire);
        loop {
            if word & RECALL != 0 {
                return false; // someone waits: no barging (the crate would queue here)
            }
            let free = self.budget - (word & IN_USE);
            if free < bytes {
                return self.recall_then_take(bytes, false);
            }
            // Room for a lease as well: take it, publish it, and check no recall missed it.
            let take = if free >= bytes + LEASE {
                bytes + LEASE
            } else {
                bytes
            };
            match self.word.0.compare_exchange_weak(
                word,
                word + take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if take > bytes {
                        self.publish_lease(me, word & EPOCH);
                    }
                    return true;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Puts a lease taken at `epoch` in `me`'s slot. The re-read after publishing is a
    /// read-modify-write: either it sees a recall raised since, or that recall's swap of the
    /// slot sees the lease (the two RMWs on the word order the two on the slot).
    fn publish_lease(&self, me: usize, epoch: u64) {
        let slot = &self.slots[me].0;
        slot.fetch_add(LEASE, Ordering::AcqRel);
        let now = self.word.0.fetch_add(0, Ordering::AcqRel);
        if now & RECALL != 0 || now & EPOCH != epoch {
            let back = slot.swap(0, Ordering::AcqRel);
            if back != 0 {
                self.give_back_shared(back);
            }
        }
    }

    #[inline(always)]
    fn release(&self, me: usize, bytes: u64) {
        let slot = &self.slots[me].0;
        let mut have = slot.load(Ordering::Relaxed);
        // Only into a slot that is not empty: an empty one may have been recalled.
        while have != 0 && have + bytes <= 2 * LEASE {
            match slot.compare_exchange_weak(
                have,
                have + bytes,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => have = actual,
            }
        }
        self.release_shared(me, bytes);
    }

    #[cold]
    fn release_shared(&self, me: usize, bytes: u64) {
        let slot = &self.slots[me].0;
        let have = slot.load(Ordering::Relaxed);
        if have != 0 && have + bytes > 2 * LEASE {
            // Too much idle in the lease: return one lease's worth with these bytes.
            if slot
                .compare_exchange(have, have - LEASE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.give_back_shared(bytes + LEASE);
                return;
            }
        }
        self.give_back_shared(bytes);
    }

    /// Bytes back to the word; wakes the waiters if a recall or a wait is under way.
    fn give_back_shared(&self, bytes: u64) {
        let before = self.word.0.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before & IN_USE >= bytes);
        if before & RECALL != 0 {
            let waiting = self.gate.lock().unwrap();
            if *waiting > 0 {
                self.room.notify_all();
            }
        }
    }

    /// Under the gate: raise `RECALL` (a new epoch), empty every slot, return what was there.
    fn recall_locked(&self) {
        let before = self.word.0.load(Ordering::Relaxed);
        if before & RECALL == 0 {
            // The gate is held and only its holder raises or lowers RECALL.
            let next_epoch = (before & EPOCH).wrapping_add(EPOCH_ONE) & EPOCH;
            let mut word = before;
            loop {
                let next = (word & IN_USE) | next_epoch | RECALL;
                match self.word.0.compare_exchange_weak(
                    word,
                    next,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(actual) => word = actual,
                }
            }
        }
        let mut recalled = 0;
        for slot in self.slots.iter() {
            if slot.0.load(Ordering::Relaxed) != 0 {
                recalled += slot.0.swap(0, Ordering::AcqRel);
            }
        }
        if recalled != 0 {
            self.word.0.fetch_sub(recalled, Ordering::AcqRel);
        }
    }

    /// Takes `bytes` from the word under the gate (after a recall), `RECALL` or not.
    fn take_locked(&self, bytes: u64) -> bool {
        let mut word = self.word.0.load(Ordering::Acquire);
        loop {
            if self.budget - (word & IN_USE) < bytes {
                return false;
            }
            match self.word.0.compare_exchange_weak(
                word,
                word + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// Lowers `RECALL` if nobody waits (under the gate).
    fn lower_locked(&self, waiting: usize) {
        if waiting == 0 {
            self.word.0.fetch_and(!RECALL, Ordering::AcqRel);
        }
    }

    /// A `try_` that found too little in the word: recall the leases, look again. With
    /// `wait`, park until it fits (not FIFO: the crate would use its queue here).
    #[cold]
    fn recall_then_take(&self, bytes: u64, wait: bool) -> bool {
        let mut waiting = self.gate.lock().unwrap();
        self.recall_locked();
        loop {
            if self.take_locked(bytes) {
                self.lower_locked(*waiting);
                return true;
            }
            if !wait {
                self.lower_locked(*waiting);
                return false;
            }
            *waiting += 1;
            waiting = self.room.wait(waiting).unwrap();
            *waiting -= 1;
        }
    }

    fn allocate_blocking(&self, me: usize, bytes: u64) {
        if !self.try_allocate(me, bytes) {
            self.recall_then_take(bytes, true);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Atomic latencies.
// ---------------------------------------------------------------------------------------

fn atomics() {
    const OPS: u64 = 5_000_000;
    let runs = env_usize("SCALING_RUNS", 5).max(3);
    let measure = |name: &str, what: &dyn Fn() -> f64| {
        let _ = what();
        let (median, min, max) = spread((0..runs).map(|_| what()).collect());
        println!("atomics {name:<44} {median:7.1} ns  (min {min:.1}, max {max:.1})");
    };

    measure("fetch_add, own line (uncontended)", &|| {
        let line = Padded(AtomicU64::new(0));
        let start = Instant::now();
        for _ in 0..OPS {
            black_box(&line.0).fetch_add(1, Ordering::AcqRel);
        }
        start.elapsed().as_nanos() as f64 / OPS as f64
    });
    measure("compare_exchange, own line (uncontended)", &|| {
        let line = Padded(AtomicU64::new(0));
        let start = Instant::now();
        for _ in 0..OPS {
            let line = black_box(&line.0);
            let value = line.load(Ordering::Relaxed);
            let _ = line.compare_exchange(value, value + 1, Ordering::AcqRel, Ordering::Relaxed);
        }
        start.elapsed().as_nanos() as f64 / OPS as f64
    });
    // The value's low bit says which thread wrote it last, so each thread counts the
    // operations that found the line last written by the other one (a transfer, at least).
    let handovers = AtomicU64::new(0);
    measure("CAS loop, 2 threads on one line (per op)", &|| {
        let line = Padded(AtomicU64::new(0));
        let per_thread = OPS / 4;
        let moved = AtomicU64::new(0);
        let time = timed_run(2, |index| {
            let tag = index as u64;
            let mut from_other = 0u64;
            for _ in 0..per_thread {
                let mut value = line.0.load(Ordering::Relaxed);
                loop {
                    match line.0.compare_exchange_weak(
                        value,
                        ((value >> 1) + 1) << 1 | tag,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break,
                        Err(actual) => value = actual,
                    }
                }
                from_other += u64::from(value & 1 != tag && value != 0);
            }
            moved.fetch_add(from_other, Ordering::Relaxed);
        });
        handovers.store(moved.into_inner(), Ordering::Relaxed);
        time.as_nanos() as f64 / (2 * per_thread) as f64
    });
    println!(
        "atomics   (last run: {:.1} % of its operations found the line last written by the other thread)",
        100.0 * handovers.load(Ordering::Relaxed) as f64 / (OPS / 2) as f64
    );
    let seen = AtomicU64::new(0);
    measure("relaxed load, line another core writes", &|| {
        let line = Padded(AtomicU64::new(0));
        let stop = AtomicBool::new(false);
        let per_thread = OPS / 4;
        let result = AtomicU64::new(0);
        timed_run(2, |index| {
            if index == 0 {
                let mut value = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    value += 1;
                    line.0.store(value, Ordering::Relaxed);
                }
            } else {
                let start = Instant::now();
                let (mut last, mut changed) = (0u64, 0u64);
                for _ in 0..per_thread {
                    let now = black_box(&line.0).load(Ordering::Relaxed);
                    changed += u64::from(now != last);
                    last = now;
                }
                result.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                seen.store(changed, Ordering::Relaxed);
                stop.store(true, Ordering::Relaxed);
            }
        });
        result.into_inner() as f64 / per_thread as f64
    });
    println!(
        "atomics   (last run: {} of {} loads saw a new value)",
        seen.load(Ordering::Relaxed),
        OPS / 4
    );
    measure("ping-pong, one line transfer (half round trip)", &|| {
        let line = Padded(AtomicU64::new(0));
        let rounds = OPS / 50;
        let time = timed_run(2, |index| {
            let index = index as u64;
            for round in 0..rounds {
                let mine = 2 * round + index;
                while line.0.load(Ordering::Acquire) != mine {
                    std::hint::spin_loop();
                }
                line.0.store(mine + 1, Ordering::Release);
            }
        });
        time.as_nanos() as f64 / (2 * rounds) as f64
    });
}

// ---------------------------------------------------------------------------------------
// The rows.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Row {
    Ours,
    Tokio,
    Floor,
    Leased,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Ours => "ours",
            Row::Tokio => "tokio",
            Row::Floor => "floor",
            Row::Leased => "leased",
        }
    }
}

/// One run; ns per operation.
fn run_once(row: Row, tight: bool, threads: usize, ops: usize) -> f64 {
    let buffers = if tight { (threads / 2).max(1) } else { 1 << 20 };
    let time = match row {
        Row::Ours => {
            let pool = membudget::BufPool::new(membudget::BufPoolCfg {
                buffer_size: membudget::BufferSize::S64,
                max_memory: buffers * BUF,
            });
            timed_run(threads, |_| {
                for _ in 0..ops {
                    if tight {
                        drop(black_box(pool.allocate_blocking(1).unwrap()));
                    } else {
                        drop(black_box(pool.try_allocate(1).unwrap()));
                    }
                }
            })
        }
        Row::Tokio => {
            let sem = tokio::sync::Semaphore::new(buffers);
            timed_run(threads, |_| {
                if tight {
                    futures::executor::block_on(async {
                        for _ in 0..ops {
                            let permit = sem.acquire().await.unwrap();
                            alloc_dealloc();
                            drop(permit);
                        }
                    });
                } else {
                    for _ in 0..ops {
                        let permit = sem.try_acquire().unwrap();
                        alloc_dealloc();
                        drop(permit);
                    }
                }
            })
        }
        Row::Floor => {
            let in_use = Padded(AtomicUsize::new(0));
            timed_run(threads, |_| {
                for _ in 0..ops {
                    in_use.0.fetch_add(BUF, Ordering::AcqRel);
                    alloc_dealloc();
                    in_use.0.fetch_sub(BUF, Ordering::Release);
                }
            })
        }
        Row::Leased => {
            let pool = Leased::new(buffers * BUF, threads);
            let time = timed_run(threads, |me| {
                for _ in 0..ops {
                    if tight {
                        pool.allocate_blocking(me, BUF as u64);
                    } else {
                        assert!(pool.try_allocate(me, BUF as u64));
                    }
                    alloc_dealloc();
                    pool.release(me, BUF as u64);
                }
            });
            // Every byte is back once the leases are recalled.
            let _gate = pool.gate.lock().unwrap();
            pool.recall_locked();
            pool.lower_locked(0);
            assert_eq!(pool.word.0.load(Ordering::Relaxed) & IN_USE, 0);
            time
        }
    };
    time.as_nanos() as f64 / (threads * ops) as f64
}

fn main() {
    let atomics_only = std::env::args().any(|arg| arg == "--atomics");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    println!("scaling: {cpu}, {cores} cores");
    atomics();
    if atomics_only {
        return;
    }
    let explicit = std::env::var("SCALING_THREADS").ok();
    let mut counts: Vec<usize> = explicit
        .as_deref()
        .unwrap_or("1,2,4")
        .split(',')
        .filter_map(|count| count.trim().parse().ok())
        .filter(|&count| count > 0)
        .collect();
    if explicit.is_none() {
        counts.retain(|&count| count <= 2 * cores);
    }
    let ops = env_usize("SCALING_OPS", 1_000_000).max(1);
    let runs = env_usize("SCALING_RUNS", 5).max(3);
    let skip_tight = std::env::var("SCALING_WIDE_ONLY").is_ok();
    println!("{ops} ops per thread, median of {runs} runs after one warm-up; ns/op (min-max)");
    for tight in [false, true] {
        if tight && skip_tight {
            continue;
        }
        let rows: &[Row] = if tight {
            &[Row::Ours, Row::Tokio, Row::Leased]
        } else {
            &[Row::Ours, Row::Tokio, Row::Floor, Row::Leased]
        };
        for &threads in &counts {
            let mut medians = Vec::new();
            for &row in rows {
                let _ = run_once(row, tight, threads, ops / 4);
                let (median, min, max) = spread(
                    (0..runs)
                        .map(|_| run_once(row, tight, threads, ops))
                        .collect(),
                );
                println!(
                    "{:<5} threads={threads:<3} {:<6} {median:8.1} ns/op  ({min:.1}-{max:.1})",
                    if tight { "tight" } else { "wide" },
                    row.name(),
                );
                medians.push((row, median));
            }
            let of = |wanted: Row| medians.iter().find(|(row, _)| *row == wanted).map(|m| m.1);
            if let (Some(ours), Some(leased)) = (of(Row::Ours), of(Row::Leased)) {
                println!(
                    "{:<5} threads={threads:<3} leased vs ours: {:.2}x{}",
                    if tight { "tight" } else { "wide" },
                    ours / leased,
                    if tight {
                        " (not like for like: the prototype's waits are not FIFO)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
}
