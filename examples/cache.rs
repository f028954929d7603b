//! A block cache and ingest workers on one memory budget, with cooperative reclaim.
//!
//! One root pool (`cache-demo`) is shared by:
//!
//! * a **block cache** (reclaimer `block cache`, priority 0: asked first). Reader tasks look
//!   up blocks of a catalog twice the budget's size, with a skewed key distribution; a miss
//!   loads the block and keeps it if the pool has room to spare (`try_allocate`). The cache
//!   grows into whatever memory nobody else needs and gives it back, least recently used
//!   first, when asked;
//! * **ingest workers**, tokio tasks that `allocate` a record, fill it, and append it to
//!   a **spool** of buffered data, which a sink drains at a fixed rate. The workers come in
//!   bursts faster than the sink: during a burst the spool outgrows what the cache can give;
//! * the **spool** (reclaimer `spool`, priority 10: asked once the cache could not cover the
//!   shortfall) spills its oldest records to a temporary file when asked: the write runs on
//!   tokio's blocking pool (`spawn_blocking`) and the reclaim future resolves once the
//!   records are written and their memory dropped. At the end the file is read back;
//! * **`reclaim_ahead`**, spawned once, which keeps a low-water mark of free room by shrinking
//!   the cache (and spilling, if it must) before anyone waits, so the readers' scratch
//!   buffers, taken with `try_allocate` (a latency-sensitive path that never waits, and that
//!   waiter-driven reclaim could never help), are almost never refused.
//!
//! ```text
//! cargo run --release --example cache
//! cargo run --release --example cache -- --seconds 10 --budget-mib 16 --workers 8 --burst-mib-per-s 96
//! ```
//!
//! It prints the cache's size over time (one line per half second: it shrinks in each burst
//! and grows back between them), then the cache's hit rate, the bytes reclaimed (from the
//! pool's statistics and per reclaimer), the workers' waits, and a checksum over every
//! record written, compared with what the sink consumed plus what was read back from the
//! spill file. The file is deleted. It exits with status 1 if the checksums differ or a
//! worker waited longer than `--stall-bound-ms` (a waiting worker is served by one reclaim
//! round: an eviction, or a spill of a few records).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use membudget::{BufPool, BufPoolCfg, BufferSize, FilledAllocation, Reclaimer};

const BUFFER_SIZE: BufferSize = BufferSize::S16384;
/// A cache block and an ingest record alike: 4 buffers of 16 KiB.
const BLOCK_BUFFERS: usize = 4;
const BLOCK_BYTES: usize = 4 * 16384;
/// Workers are quiet for the first half of every cycle and burst in the second half.
const CYCLE: Duration = Duration::from_millis(2000);
const QUIET: Duration = Duration::from_millis(1000);
/// Lookups each reader makes per millisecond.
const LOOKUPS_PER_TICK: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Options {
    seconds: u64,
    budget_mib: usize,
    workers: usize,
    burst_mib_per_s: usize,
    sink_mib_per_s: usize,
    readers: usize,
    catalog_blocks: usize,
    low_water_kib: usize,
    cache_floor_kib: usize,
    stall_bound_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seconds: 6,
            budget_mib: 8,
            workers: 4,
            burst_mib_per_s: 48,
            sink_mib_per_s: 16,
            readers: 2,
            catalog_blocks: 256,
            low_water_kib: 512,
            cache_floor_kib: 1024,
            stall_bound_ms: 200,
        }
    }
}

const USAGE: &str = "usage: cache [--seconds N] [--budget-mib N] [--workers N] [--burst-mib-per-s N] \
[--sink-mib-per-s N] [--readers N] [--catalog-blocks N] [--low-water-kib N] [--cache-floor-kib N] \
[--stall-bound-ms N]";

fn parse_options() -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number: usize = value
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a number\n{USAGE}"))?;
        match flag.as_str() {
            "--seconds" => options.seconds = number as u64,
            "--budget-mib" => options.budget_mib = number,
            "--workers" => options.workers = number,
            "--burst-mib-per-s" => options.burst_mib_per_s = number,
            "--sink-mib-per-s" => options.sink_mib_per_s = number,
            "--readers" => options.readers = number,
            "--catalog-blocks" => options.catalog_blocks = number,
            "--low-water-kib" => options.low_water_kib = number,
            "--cache-floor-kib" => options.cache_floor_kib = number,
            "--stall-bound-ms" => options.stall_bound_ms = number as u64,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if [
        options.seconds as usize,
        options.budget_mib,
        options.workers,
        options.burst_mib_per_s,
        options.sink_mib_per_s,
        options.readers,
        options.catalog_blocks,
    ]
    .contains(&0)
    {
        return Err(format!(
            "every number but --low-water-kib and --cache-floor-kib must be at least 1\n{USAGE}"
        ));
    }
    if (options.budget_mib << 20) < 4 * BLOCK_BYTES + (options.low_water_kib << 10) {
        return Err(format!(
            "the budget must hold the low-water mark and four blocks\n{USAGE}"
        ));
    }
    Ok(options)
}

/// A cheap generator, so producing data costs CPU like real serialisation would.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next();
            chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        }
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A block's content is a function of its id: a hit can be checked.
fn block_seed(id: u64) -> u64 {
    (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// FNV-style hash of one record, a word at a time.
fn record_hash(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for word in words {
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        hash = (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &byte in tail {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A checksum over a set of records, independent of their order (the sink and the spill file
/// each see an interleaving of the workers' records).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Checksum {
    records: u64,
    bytes: u64,
    sum: u64,
}

impl Checksum {
    fn add(&mut self, record: &[u8]) {
        self.records += 1;
        self.bytes += record.len() as u64;
        self.sum = self.sum.wrapping_add(record_hash(record));
    }

    fn merge(&mut self, other: Checksum) {
        self.records += other.records;
        self.bytes += other.bytes;
        self.sum = self.sum.wrapping_add(other.sum);
    }
}

/// The longest single reclaim (from `reclaim` to its future resolving), over both reclaimers.
#[derive(Default)]
struct Longest(AtomicU64);

impl Longest {
    fn record(&self, since: Instant) {
        let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_max(nanos, Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Relaxed))
    }
}

// ------------------------------------------------------------------------------------------
// The block cache
// ------------------------------------------------------------------------------------------

struct CacheInner {
    /// Block id to (its data, the stamp of its last use).
    blocks: HashMap<u64, (FilledAllocation, u64)>,
    /// Uses in order, oldest first; an entry whose stamp is no longer its block's is stale.
    order: VecDeque<(u64, u64)>,
    clock: u64,
}

/// An LRU cache of blocks held in the pool's memory. It holds no handle on the pool (a
/// reclaimer should not: the pool keeps its registrations), the readers pass it in. It keeps
/// its hottest `floor` bytes when asked to reclaim (and says so in its estimate), so the
/// spool is asked once the cache is down to them.
struct BlockCache {
    inner: Mutex<CacheInner>,
    floor: usize,
    bytes: AtomicUsize,
    hits: AtomicU64,
    lookups: AtomicU64,
    evicted_bytes: AtomicU64,
    longest: Arc<Longest>,
}

impl BlockCache {
    fn new(floor: usize, longest: Arc<Longest>) -> Self {
        BlockCache {
            floor,
            inner: Mutex::new(CacheInner {
                blocks: HashMap::new(),
                order: VecDeque::new(),
                clock: 0,
            }),
            bytes: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            longest,
        }
    }

    /// Looks `id` up; on a miss, loads the block into `scratch` and keeps it if the pool's
    /// free room stays at or above `keep_room` once it is in. Returns whether it was a hit.
    fn lookup(&self, id: u64, pool: &BufPool, keep_room: usize, scratch: &mut [u8]) -> bool {
        self.lookups.fetch_add(1, Relaxed);
        {
            let mut inner = self.inner.lock().unwrap();
            inner.clock += 1;
            let stamp = inner.clock;
            if let Some((block, used)) = inner.blocks.get_mut(&id) {
                *used = stamp;
                let first = u64::from_le_bytes(block.filled()[..8].try_into().expect("8 bytes"));
                assert_eq!(
                    first,
                    XorShift(block_seed(id)).next(),
                    "block {id} corrupted"
                );
                inner.order.push_back((id, stamp));
                if inner.order.len() > 4 * inner.blocks.len() + 64 {
                    let CacheInner { blocks, order, .. } = &mut *inner;
                    order.retain(|(id, stamp)| blocks.get(id).is_some_and(|b| b.1 == *stamp));
                }
                self.hits.fetch_add(1, Relaxed);
                return true;
            }
        }
        // A miss: "read the block from storage".
        XorShift(block_seed(id)).fill(scratch);
        if pool.stats().available_bytes() < keep_room + BLOCK_BYTES {
            return false; // served without caching: the room is wanted elsewhere
        }
        let Ok(allocation) = pool.try_allocate(BLOCK_BUFFERS) else {
            return false;
        };
        let mut block = allocation.into_filled();
        block.extend_from_slice(scratch);
        let mut inner = self.inner.lock().unwrap();
        if inner.blocks.contains_key(&id) {
            drop(inner); // another reader loaded it meanwhile
            return false;
        }
        inner.clock += 1;
        let stamp = inner.clock;
        inner.blocks.insert(id, (block, stamp));
        inner.order.push_back((id, stamp));
        self.bytes.fetch_add(BLOCK_BYTES, Relaxed);
        false
    }

    /// Takes the least recently used blocks out until they add up to `target` bytes or the
    /// cache is down to its floor.
    fn evict(&self, target: usize) -> Vec<FilledAllocation> {
        let mut evicted = Vec::new();
        let mut freed = 0;
        let mut inner = self.inner.lock().unwrap();
        while freed < target && inner.blocks.len() * BLOCK_BYTES > self.floor {
            let Some((id, stamp)) = inner.order.pop_front() else {
                break;
            };
            if inner.blocks.get(&id).is_some_and(|b| b.1 == stamp) {
                let (block, _) = inner.blocks.remove(&id).expect("present");
                freed += block.capacity();
                evicted.push(block);
            }
        }
        self.bytes.fetch_sub(freed, Relaxed);
        evicted
    }
}

impl Reclaimer for BlockCache {
    fn estimate(&self) -> usize {
        self.bytes.load(Relaxed).saturating_sub(self.floor)
    }

    /// Evicts at once: the future is ready (dropping the blocks is the release).
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let started = Instant::now();
        let evicted = self.evict(target);
        let freed: usize = evicted.iter().map(FilledAllocation::capacity).sum();
        drop(evicted); // outside the cache's lock
        self.evicted_bytes.fetch_add(freed as u64, Relaxed);
        self.longest.record(started);
        Box::pin(std::future::ready(freed))
    }
}

// ------------------------------------------------------------------------------------------
// The spool: buffered records, drained by the sink, spilled to a file when asked
// ------------------------------------------------------------------------------------------

/// The spill file: created in `std::env::temp_dir()`, deleted when this is dropped.
struct SpillFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl SpillFile {
    fn create() -> std::io::Result<Arc<Self>> {
        let path = std::env::temp_dir().join(format!(
            "membudget-cache-example-{}.spill",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)?;
        Ok(Arc::new(SpillFile {
            path,
            file: Mutex::new(file),
        }))
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Spool {
    records: Mutex<VecDeque<FilledAllocation>>,
    bytes: AtomicUsize,
    spill: Arc<SpillFile>,
    runtime: tokio::runtime::Handle,
    /// Spills whose write may still run (their future may have been dropped by a driver
    /// that left: the write goes on and frees the memory all the same).
    writes: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    spilled: Arc<Mutex<Checksum>>,
    spills: AtomicU64,
    error: Arc<Mutex<Option<std::io::Error>>>,
    longest: Arc<Longest>,
}

impl Spool {
    fn push(&self, record: FilledAllocation) {
        self.bytes.fetch_add(record.capacity(), Relaxed);
        self.records.lock().unwrap().push_back(record);
    }

    fn pop(&self) -> Option<FilledAllocation> {
        let record = self.records.lock().unwrap().pop_front()?;
        self.bytes.fetch_sub(record.capacity(), Relaxed);
        Some(record)
    }
}

impl Reclaimer for Spool {
    fn estimate(&self) -> usize {
        self.bytes.load(Relaxed)
    }

    /// Takes the oldest records covering `target` and writes them to the spill file on the
    /// blocking pool; the future resolves once they are written and dropped.
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let started = Instant::now();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while bytes < target {
            let Some(record) = self.pop() else { break };
            bytes += record.capacity();
            batch.push(record);
        }
        if batch.is_empty() {
            return Box::pin(std::future::ready(0));
        }
        self.spills.fetch_add(1, Relaxed);
        let (done, freed) = tokio::sync::oneshot::channel();
        let (spill, spilled, error, longest) = (
            Arc::clone(&self.spill),
            Arc::clone(&self.spilled),
            Arc::clone(&self.error),
            Arc::clone(&self.longest),
        );
        let write = self.runtime.spawn_blocking(move || {
            let mut file = spill.file.lock().unwrap();
            let mut written = Checksum::default();
            for record in &batch {
                match file.write_all(record.filled()) {
                    Ok(()) => written.add(record.filled()),
                    Err(e) => {
                        // Reported at the end; the checksum will not match.
                        error.lock().unwrap().get_or_insert(e);
                        break;
                    }
                }
            }
            drop(file);
            spilled.lock().unwrap().merge(written);
            drop(batch); // the release: the bytes go back to the budget
            longest.record(started);
            let _ = done.send(bytes);
        });
        let mut writes = self.writes.lock().unwrap();
        writes.retain(|write| !write.is_finished());
        writes.push(write);
        drop(writes);
        Box::pin(async move { freed.await.unwrap_or(0) })
    }
}

// ------------------------------------------------------------------------------------------
// The tasks
// ------------------------------------------------------------------------------------------

struct WorkerResult {
    written: Checksum,
    allocations: usize,
    waits: Vec<Duration>,
}

fn bursting(started: Instant) -> bool {
    let phase = started.elapsed().as_nanos() % CYCLE.as_nanos();
    phase >= QUIET.as_nanos()
}

/// Produces records in bursts at its share of `--burst-mib-per-s`, each allocated with
/// `allocate` (it waits when the budget is spent) and appended to the spool.
async fn worker(
    index: usize,
    pool: Arc<BufPool>,
    spool: Arc<Spool>,
    options: Options,
    started: Instant,
    deadline: Instant,
) -> WorkerResult {
    let every = Duration::from_secs_f64(
        BLOCK_BYTES as f64 * options.workers as f64 / (options.burst_mib_per_s << 20) as f64,
    );
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D ^ (index as u64 + 1));
    let mut scratch = vec![0; BLOCK_BYTES];
    let mut result = WorkerResult {
        written: Checksum::default(),
        allocations: 0,
        waits: Vec::new(),
    };
    let mut next = Instant::now();
    while Instant::now() < deadline {
        if !bursting(started) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            next = Instant::now();
            continue;
        }
        // Poll once by hand to tell an allocation that waited from one that did not.
        let mut allocate = pin!(pool.allocate(BLOCK_BUFFERS));
        let allocation = match futures::poll!(allocate.as_mut()) {
            Poll::Ready(allocation) => allocation,
            Poll::Pending => {
                let since = Instant::now();
                let allocation = allocate.await;
                result.waits.push(since.elapsed());
                allocation
            }
        }
        .expect("the pool stays open while the workers run");
        result.allocations += 1;
        rng.fill(&mut scratch);
        let mut record = allocation.into_filled();
        record.extend_from_slice(&scratch);
        result.written.add(record.filled());
        spool.push(record);
        next = (next + every).max(Instant::now() - Duration::from_millis(20));
        tokio::time::sleep_until(next.into()).await;
    }
    result
}

#[derive(Default)]
struct ReaderTotals {
    scratch_taken: AtomicU64,
    scratch_refused: AtomicU64,
}

/// Serves lookups: each takes a scratch buffer with `try_allocate` (it cannot wait), then
/// looks a block up in the cache, keys skewed towards low ids.
async fn reader(
    index: usize,
    pool: Arc<BufPool>,
    cache: Arc<BlockCache>,
    options: Options,
    deadline: Instant,
    totals: Arc<ReaderTotals>,
) {
    let keep_room = options.low_water_kib << 10;
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03 ^ (index as u64 + 1));
    let mut scratch = vec![0; BLOCK_BYTES];
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < deadline {
        tick.tick().await;
        for _ in 0..LOOKUPS_PER_TICK {
            let response = pool.try_allocate(1);
            match &response {
                Ok(_) => totals.scratch_taken.fetch_add(1, Relaxed),
                Err(_) => totals.scratch_refused.fetch_add(1, Relaxed),
            };
            let unit = rng.unit();
            let id = (unit * unit * options.catalog_blocks as f64) as u64;
            cache.lookup(id, &pool, keep_room, &mut scratch);
            drop(response);
        }
    }
}

/// Drains the spool at `--sink-mib-per-s`; once `finish` is set, drains what is left and
/// returns the checksum of what it consumed.
async fn sink(spool: Arc<Spool>, options: Options, finish: Arc<AtomicBool>) -> Checksum {
    let per_tick = (options.sink_mib_per_s << 20) / 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut consumed = Checksum::default();
    let mut credit = 0;
    loop {
        tick.tick().await;
        let finishing = finish.load(Relaxed);
        credit = (credit + per_tick).min(per_tick + BLOCK_BYTES);
        while finishing || credit >= BLOCK_BYTES {
            let Some(record) = spool.pop() else { break };
            credit = credit.saturating_sub(record.capacity());
            consumed.add(record.filled());
        }
        if finishing {
            return consumed;
        }
    }
}

#[derive(Default)]
struct CacheTrace {
    min: usize,
    max: usize,
}

/// One line every half second: the cache's size over time.
async fn print_timeline(
    pool: Arc<BufPool>,
    cache: Arc<BlockCache>,
    spool: Arc<Spool>,
    started: Instant,
    trace: Arc<Mutex<CacheTrace>>,
) {
    println!(
        "{:>6}  {:>5}  {:>13}  {:>9}  {:>9}  {:>9}  {:>6}  {:>11}  {:>6}",
        "time", "phase", "cache", "spool mem", "spilled", "in use", "hits", "reclaimed", "rounds"
    );
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let (mut hits_before, mut lookups_before) = (0, 0);
    for sample in 1.. {
        tick.tick().await;
        let cache_bytes = cache.bytes.load(Relaxed);
        // The range once the cache is warm (from the first burst on).
        if started.elapsed() >= QUIET {
            let mut trace = trace.lock().unwrap();
            trace.min = trace.min.min(cache_bytes);
            trace.max = trace.max.max(cache_bytes);
        }
        if sample % 10 != 0 {
            continue;
        }
        let (hits, lookups) = (cache.hits.load(Relaxed), cache.lookups.load(Relaxed));
        let rate = (hits - hits_before) as f64 / (lookups - lookups_before).max(1) as f64;
        (hits_before, lookups_before) = (hits, lookups);
        let stats = pool.stats();
        println!(
            "{:5.1}s  {:>5}  {:5.2} MiB {:3}  {:5.2} MiB  {:5.1} MiB  {:5.2} MiB  {:5.1}%  {:7.1} MiB  {:6}",
            started.elapsed().as_secs_f64(),
            if bursting(started) { "burst" } else { "quiet" },
            mib(cache_bytes as u64),
            cache_bytes / BLOCK_BYTES,
            mib(spool.bytes.load(Relaxed) as u64),
            mib(spool.spilled.lock().unwrap().bytes),
            mib(stats.in_use_bytes as u64),
            100.0 * rate,
            mib(stats.reclaimed_bytes as u64),
            stats.reclaim_rounds,
        );
    }
}

/// Reads the spill file back, record by record.
fn read_back(spill: &SpillFile) -> std::io::Result<(Checksum, u64)> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(&spill.path)?);
    let length = reader.get_ref().metadata()?.len();
    let mut record = vec![0; BLOCK_BYTES];
    let mut read = Checksum::default();
    for _ in 0..length / BLOCK_BYTES as u64 {
        reader.read_exact(&mut record)?;
        read.add(&record);
    }
    Ok((read, length))
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let cfg = BufPoolCfg {
        buffer_size: BUFFER_SIZE,
        max_memory: options.budget_mib << 20,
    };
    let pool = match BufPool::builder(cfg).name("cache-demo").build() {
        Ok(pool) => Arc::new(pool),
        Err(error) => {
            eprintln!("invalid budget: {error}");
            return ExitCode::from(2);
        }
    };
    let spill = match SpillFile::create() {
        Ok(spill) => spill,
        Err(error) => {
            eprintln!(
                "cannot create the spill file in {:?}: {error}",
                std::env::temp_dir()
            );
            return ExitCode::from(2);
        }
    };
    println!(
        "cache: budget {} MiB shared by a block cache (catalog {} blocks of {} KiB = {:.0} MiB, \
         {} readers, keeps its hottest {} KiB), {} ingest workers ({} MiB/s in bursts of {:.1} s every {:.1} s) and a spool \
         drained at {} MiB/s, spilled to {}; reclaim_ahead keeps {} KiB free",
        options.budget_mib,
        options.catalog_blocks,
        BLOCK_BYTES >> 10,
        mib((options.catalog_blocks * BLOCK_BYTES) as u64),
        options.readers,
        options.cache_floor_kib,
        options.workers,
        options.burst_mib_per_s,
        (CYCLE - QUIET).as_secs_f64(),
        CYCLE.as_secs_f64(),
        options.sink_mib_per_s,
        spill.path.display(),
        options.low_water_kib,
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let longest = Arc::new(Longest::default());
    let cache = Arc::new(BlockCache::new(
        options.cache_floor_kib << 10,
        Arc::clone(&longest),
    ));
    let spool = Arc::new(Spool {
        records: Mutex::new(VecDeque::new()),
        bytes: AtomicUsize::new(0),
        spill: Arc::clone(&spill),
        runtime: runtime.handle().clone(),
        writes: Mutex::new(Vec::new()),
        spilled: Arc::new(Mutex::new(Checksum::default())),
        spills: AtomicU64::new(0),
        error: Arc::new(Mutex::new(None)),
        longest: Arc::clone(&longest),
    });
    // Lower priority is asked first: the cache, then (if it could not cover the shortfall)
    // the spool.
    let cache_handle = pool.register_reclaimer("block cache", 0, cache.clone());
    let spool_handle = pool.register_reclaimer("spool", 10, spool.clone());

    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.seconds);
    let readers_totals = Arc::new(ReaderTotals::default());
    let trace = Arc::new(Mutex::new(CacheTrace {
        min: usize::MAX,
        max: 0,
    }));
    let (results, consumed) = runtime.block_on(async {
        let ahead = tokio::spawn(pool.reclaim_ahead(options.low_water_kib << 10));
        let finish = Arc::new(AtomicBool::new(false));
        let sink = tokio::spawn(sink(spool.clone(), options, finish.clone()));
        let timeline = tokio::spawn(print_timeline(
            pool.clone(),
            cache.clone(),
            spool.clone(),
            started,
            trace.clone(),
        ));
        let readers: Vec<_> = (0..options.readers)
            .map(|index| {
                tokio::spawn(reader(
                    index,
                    pool.clone(),
                    cache.clone(),
                    options,
                    deadline,
                    readers_totals.clone(),
                ))
            })
            .collect();
        let workers: Vec<_> = (0..options.workers)
            .map(|index| {
                tokio::spawn(worker(
                    index,
                    pool.clone(),
                    spool.clone(),
                    options,
                    started,
                    deadline,
                ))
            })
            .collect();
        let mut results = Vec::new();
        for worker in workers {
            results.push(worker.await.expect("a worker panicked"));
        }
        for reader in readers {
            reader.await.expect("a reader panicked");
        }
        timeline.abort();
        // No more allocations: `reclaim_ahead` resolves once the pool is closed.
        pool.close();
        ahead.await.expect("reclaim_ahead panicked");
        finish.store(true, Relaxed);
        let consumed = sink.await.expect("the sink panicked");
        // Spills whose future was dropped by a driver that left still write.
        let writes = std::mem::take(&mut *spool.writes.lock().unwrap());
        for write in writes {
            write.await.expect("a spill panicked");
        }
        (results, consumed)
    });
    let elapsed = started.elapsed();

    // Everything written is either consumed by the sink or in the spill file.
    let (read, file_length) = match read_back(&spill) {
        Ok(read) => read,
        Err(error) => {
            eprintln!("reading the spill file back failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut written = Checksum::default();
    let mut waits = Vec::new();
    let mut allocations = 0;
    for result in results {
        written.merge(result.written);
        waits.extend(result.waits);
        allocations += result.allocations;
    }
    waits.sort_unstable();
    let longest_wait = waits.last().copied().unwrap_or_default();
    let spilled = *spool.spilled.lock().unwrap();
    let mut delivered = consumed;
    delivered.merge(read);

    let stats = pool.stats();
    let report = pool.report();
    let trace = trace.lock().unwrap();
    let (hits, lookups) = (cache.hits.load(Relaxed), cache.lookups.load(Relaxed));
    println!();
    println!("{report}");
    println!(
        "ingest: {} records, {:.1} MiB in {:.2} s; the sink consumed {:.1} MiB from memory, \
         the spool spilled {:.1} MiB in {} spills ({} bytes on disk), read back {:.1} MiB",
        written.records,
        mib(written.bytes),
        elapsed.as_secs_f64(),
        mib(consumed.bytes),
        mib(spilled.bytes),
        spool.spills.load(Relaxed),
        file_length,
        mib(read.bytes),
    );
    println!(
        "cache: hit rate {:.1}% ({hits} of {lookups} lookups), size between {:.2} and {:.2} MiB \
         once warm, {:.1} MiB evicted by reclaim",
        100.0 * hits as f64 / lookups.max(1) as f64,
        mib(trace.min.min(trace.max) as u64),
        mib(trace.max as u64),
        mib(cache.evicted_bytes.load(Relaxed)),
    );
    println!(
        "reclaim: {} rounds, asked {:.1} MiB, reclaimed {:.1} MiB, {:.1} ms reclaiming; \
         longest single reclaim {:.2} ms",
        stats.reclaim_rounds,
        mib(stats.reclaim_asked_bytes as u64),
        mib(stats.reclaimed_bytes as u64),
        stats.reclaim_time.as_secs_f64() * 1e3,
        longest.get().as_secs_f64() * 1e3,
    );
    println!(
        "workers: {} of {allocations} allocations waited, p99 wait {:.2} ms, longest {:.2} ms \
         (bound {} ms)",
        waits.len(),
        percentile(&waits, 0.99).as_secs_f64() * 1e3,
        longest_wait.as_secs_f64() * 1e3,
        options.stall_bound_ms,
    );
    let (taken, refused) = (
        readers_totals.scratch_taken.load(Relaxed),
        readers_totals.scratch_refused.load(Relaxed),
    );
    println!(
        "try_allocate callers (readers' scratch buffers): {refused} of {} refused",
        taken + refused
    );
    println!(
        "checksum: written {} records / {} bytes / {:016x}, sink + read back {} / {} / {:016x}",
        written.records,
        written.bytes,
        written.sum,
        delivered.records,
        delivered.bytes,
        delivered.sum,
    );

    drop((cache_handle, spool_handle));
    drop(report);
    let mut failed = false;
    if let Some(error) = spool.error.lock().unwrap().take() {
        eprintln!("FAILED: writing the spill file: {error}");
        failed = true;
    }
    if delivered != written || file_length != spilled.bytes || read != spilled {
        eprintln!("FAILED: the checksums do not match");
        failed = true;
    }
    if longest_wait > Duration::from_millis(options.stall_bound_ms) {
        eprintln!(
            "FAILED: a worker waited {:.2} ms, above the {} ms bound",
            longest_wait.as_secs_f64() * 1e3,
            options.stall_bound_ms
        );
        failed = true;
    }
    drop((spool, spill)); // the last owners of the spill file: deletes it
    if failed {
        ExitCode::FAILURE
    } else {
        println!("ok: checksums match, no worker waited longer than the bound");
        ExitCode::SUCCESS
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
