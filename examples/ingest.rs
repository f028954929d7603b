//! A realistic ingest job on one memory budget.
//!
//! Many tokio tasks produce data into buffers and hand the filled allocations to blocking
//! writer threads, which write them to a temporary file with vectored writes. The producers
//! come in groups, each allocating from its own child pool (`group-0`, `group-1`, ...) of one
//! root pool (`ingest`): a group may hold at most half the budget, and all of them together
//! at most the root's budget. The budgets are the only thing that bounds the data in flight:
//! when one is spent, producers wait (in FIFO order) until a writer drops what it has written.
//!
//! ```text
//! cargo run --release --example ingest
//! cargo run --release --example ingest -- --total-mib 4096 --budget-mib 16 --producers 256 --groups 8
//! ```
//!
//! At the end it reads the file back to check every byte arrived, deletes it, and prints the
//! throughput, the peak bytes in use against the budget, how many allocations waited and for
//! how long, the pools' report (`BufPool::report`: the tree with each pool's peak) and the
//! three largest holders (`PoolReport::top`) at the busiest moment sampled.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use membudget::{BufPool, BufPoolCfg, BufferSize, FilledAllocation, PoolReport};

#[derive(Clone, Copy, Debug)]
struct Options {
    total_mib: usize,
    budget_mib: usize,
    buffer_size: BufferSize,
    buffers_per_allocation: usize,
    producers: usize,
    groups: usize,
    writers: usize,
    batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            total_mib: 1024,
            budget_mib: 8,
            buffer_size: BufferSize::S16384,
            buffers_per_allocation: 16,
            producers: 64,
            groups: 4,
            writers: 2,
            batch: 8,
        }
    }
}

const USAGE: &str = "usage: ingest [--total-mib N] [--budget-mib N] [--buffer-bytes 8..16384] \
[--buffers-per-allocation N] [--producers N] [--groups N] [--writers N] [--batch N]";

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
            "--total-mib" => options.total_mib = number,
            "--budget-mib" => options.budget_mib = number,
            "--buffer-bytes" => {
                options.buffer_size = BufferSize::try_from(number).map_err(|e| e.to_string())?
            }
            "--buffers-per-allocation" => options.buffers_per_allocation = number,
            "--producers" => options.producers = number,
            "--groups" => options.groups = number,
            "--writers" => options.writers = number,
            "--batch" => options.batch = number,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if [
        options.total_mib,
        options.producers,
        options.groups,
        options.writers,
        options.batch,
        options.buffers_per_allocation,
    ]
    .contains(&0)
    {
        return Err(format!("every number must be at least 1\n{USAGE}"));
    }
    Ok(options)
}

/// A cheap generator, so producing data costs CPU like real serialisation would.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// An order-independent checksum: writers interleave, so the file's byte order is not the
/// producers' order.
fn byte_sum(bytes: &[u8]) -> u64 {
    bytes.iter().map(|&b| u64::from(b)).sum()
}

struct Totals {
    produced_bytes: AtomicU64,
    produced_sum: AtomicU64,
    written_bytes: AtomicU64,
    allocations: AtomicUsize,
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let allocation_bytes = options.buffer_size.bytes() * options.buffers_per_allocation;
    let cfg = BufPoolCfg {
        buffer_size: options.buffer_size,
        max_memory: options.budget_mib << 20,
    };
    let pool = match BufPool::builder(cfg).name("ingest").build() {
        Ok(pool) => Arc::new(pool),
        Err(error) => {
            eprintln!("invalid budget: {error}");
            std::process::exit(2);
        }
    };
    if allocation_bytes > cfg.max_memory {
        eprintln!(
            "one allocation ({allocation_bytes} bytes) is above the budget ({} bytes)",
            cfg.max_memory
        );
        std::process::exit(2);
    }
    // Each group's cap: half the budget, and at least one allocation.
    let group_cfg = BufPoolCfg {
        buffer_size: options.buffer_size,
        max_memory: (cfg.max_memory / 2).max(allocation_bytes),
    };
    let groups: Vec<Arc<BufPool>> = (0..options.groups)
        .map(|group| {
            let child = pool.child(format!("group-{group}"), group_cfg);
            Arc::new(child.expect("a group's budget is valid"))
        })
        .collect();
    let total_allocations = (options.total_mib << 20).div_ceil(allocation_bytes);
    println!(
        "ingest: {} MiB in {} allocations of {} x {} B, budget {} MiB ({} allocations in \
         flight at most), {} producer tasks, {} writer threads",
        options.total_mib,
        total_allocations,
        options.buffers_per_allocation,
        options.buffer_size.bytes(),
        options.budget_mib,
        cfg.max_memory / allocation_bytes,
        options.producers,
        options.writers,
    );
    println!(
        "groups: {} child pools of {:.2} MiB each ({} allocations), producers spread over them",
        options.groups,
        mib(group_cfg.max_memory as u64),
        group_cfg.max_memory / allocation_bytes,
    );

    let file = tempfile::NamedTempFile::new().expect("create a temporary file");
    let totals = Arc::new(Totals {
        produced_bytes: AtomicU64::new(0),
        produced_sum: AtomicU64::new(0),
        written_bytes: AtomicU64::new(0),
        allocations: AtomicUsize::new(0),
    });

    // The writers: blocking threads, one channel each. The channels need no bound of their
    // own: the pool's budget already bounds what can be in flight.
    let mut senders = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..options.writers {
        let (sender, receiver) = mpsc::channel::<FilledAllocation>();
        senders.push(sender);
        let mut out = OpenOptions::new()
            .append(true)
            .open(file.path())
            .expect("open the temporary file");
        let totals = totals.clone();
        let batch = options.batch;
        writers.push(std::thread::spawn(move || {
            write_batches(&receiver, &mut out, batch, &totals)
        }));
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let started = Instant::now();
    let busiest = Arc::new(Mutex::new(PoolReport::default()));
    let waits = runtime.block_on(async {
        let sampler = tokio::spawn(sample_busiest(pool.clone(), busiest.clone()));
        let waits = produce(
            pool.clone(),
            &groups,
            options,
            total_allocations,
            senders,
            totals.clone(),
            started,
        )
        .await;
        sampler.abort();
        waits
    });
    for writer in writers {
        writer.join().expect("a writer thread panicked");
    }
    let elapsed = started.elapsed();
    let stats = pool.stats();
    let report = pool.report();

    // Proof that every byte arrived, then delete the file.
    let written = totals.written_bytes.load(Relaxed);
    let (file_len, file_sum) = read_back(file.as_file().try_clone().expect("reopen"));
    drop(file);
    let produced = totals.produced_bytes.load(Relaxed);
    assert_eq!(file_len, produced, "the file holds every produced byte");
    assert_eq!(
        file_sum,
        totals.produced_sum.load(Relaxed),
        "and the same bytes"
    );
    assert!(stats.peak_in_use_bytes <= cfg.max_memory, "the budget held");
    assert_eq!(stats.in_use_bytes, 0, "every allocation came back");
    assert_eq!(
        report.children.len(),
        options.groups,
        "every group in the report"
    );
    let mut group_waits = 0;
    let mut max_wait = stats.max_wait;
    for group in &groups {
        let group = group.stats();
        assert!(
            group.peak_in_use_bytes <= group_cfg.max_memory,
            "each group's budget held"
        );
        assert_eq!(
            (group.in_use_bytes, group.outstanding),
            (0, 0),
            "and every allocation came back"
        );
        group_waits += group.waited_allocations;
        max_wait = max_wait.max(group.max_wait);
    }
    let group_peaks: usize = report.children.iter().map(|c| c.peak_in_use_bytes).sum();
    assert!(
        report.children.iter().all(|c| c.in_use_bytes == 0) && group_peaks > 0,
        "the report shows the groups' peaks, nothing in use"
    );

    let secs = elapsed.as_secs_f64();
    println!("---");
    println!(
        "written:      {:.1} MiB in {secs:.2} s = {:.0} MiB/s (file checked and deleted)",
        mib(written),
        mib(written) / secs
    );
    println!(
        "peak in use:  {:.2} MiB of a {:.2} MiB budget ({:.0}%), never above it",
        mib(stats.peak_in_use_bytes as u64),
        mib(cfg.max_memory as u64),
        100.0 * stats.peak_in_use_bytes as f64 / cfg.max_memory as f64
    );
    // A request may wait in its group's queue and then again in the root's: each pool
    // counts the waits in its own queue.
    println!(
        "allocations:  {} made, {} waited ({:.0}%); pool stats: {} waits in the groups' queues, \
         {} in the root's, max {:?} in one queue",
        totals.allocations.load(Relaxed),
        waits.len(),
        100.0 * waits.len() as f64 / total_allocations as f64,
        group_waits,
        stats.waited_allocations,
        max_wait,
    );
    println!(
        "wait:         p50 {:?}, p99 {:?}, max {:?} (of the allocations that waited)",
        percentile(&waits, 0.50),
        percentile(&waits, 0.99),
        waits.last().copied().unwrap_or_default(),
    );
    println!("pools at the end (peaks since the start):");
    print!("{report}");
    let busiest = busiest.lock().unwrap();
    println!(
        "top 3 holders at the busiest moment sampled ({:.2} MiB in use of {:.2} MiB):",
        mib(busiest.in_use_bytes as u64),
        mib(busiest.max_memory as u64),
    );
    for holder in busiest.top(3) {
        println!(
            "  {:8} {:6.2} MiB ({} allocations)",
            holder.name.as_deref().unwrap_or("unnamed"),
            mib(holder.own_bytes() as u64),
            holder.outstanding,
        );
    }
}

/// Spawns the producer tasks (producer `i` allocating from group `i % groups`) and a progress
/// printer; returns the sorted waits.
async fn produce(
    pool: Arc<BufPool>,
    groups: &[Arc<BufPool>],
    options: Options,
    total_allocations: usize,
    senders: Vec<mpsc::Sender<FilledAllocation>>,
    totals: Arc<Totals>,
    started: Instant,
) -> Vec<Duration> {
    let next_allocation = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(print_progress(pool.clone(), totals.clone(), started));
    let mut producers = tokio::task::JoinSet::new();
    for producer in 0..options.producers {
        let pool = groups[producer % groups.len()].clone();
        let sender = senders[producer % senders.len()].clone();
        let next_allocation = next_allocation.clone();
        let totals = totals.clone();
        producers.spawn(async move {
            let mut waits = Vec::new();
            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (producer as u64 + 1));
            let mut chunk = vec![0; options.buffer_size.bytes()];
            while next_allocation.fetch_add(1, Relaxed) < total_allocations {
                // Poll once by hand to tell an allocation that waited from one that did not.
                let mut allocate = pin!(pool.allocate(options.buffers_per_allocation));
                let allocation = match futures::poll!(allocate.as_mut()) {
                    Poll::Ready(allocation) => allocation,
                    Poll::Pending => {
                        let since = Instant::now();
                        let allocation = allocate.await;
                        waits.push(since.elapsed());
                        allocation
                    }
                }
                .expect("the pool stays open while producing");
                let mut filled = allocation.into_filled();
                let mut sum = 0;
                while filled.remaining() > 0 {
                    rng.fill(&mut chunk);
                    sum += byte_sum(&chunk);
                    filled.extend_from_slice(&chunk);
                }
                totals
                    .produced_bytes
                    .fetch_add(filled.len() as u64, Relaxed);
                totals.produced_sum.fetch_add(sum, Relaxed);
                totals.allocations.fetch_add(1, Relaxed);
                sender.send(filled).expect("writers outlive producers");
                // Let other producers in between allocations, as real producers would.
                tokio::task::yield_now().await;
            }
            waits
        });
    }
    drop(senders);
    let mut waits = Vec::new();
    while let Some(done) = producers.join_next().await {
        waits.extend(done.expect("a producer panicked"));
    }
    progress.abort();
    waits.sort_unstable();
    waits
}

async fn print_progress(pool: Arc<BufPool>, totals: Arc<Totals>, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    loop {
        tick.tick().await;
        let stats = pool.stats();
        let report = pool.report();
        let waiting = stats.waiting + report.children.iter().map(|c| c.waiting).sum::<usize>();
        let written = totals.written_bytes.load(Relaxed);
        println!(
            "{:6.1} s  {:8.1} MiB written  {:6.0} MiB/s  in use {:5.2}/{:.2} MiB  {:3} waiting",
            started.elapsed().as_secs_f64(),
            mib(written),
            mib(written) / started.elapsed().as_secs_f64(),
            mib(stats.in_use_bytes as u64),
            mib(stats.max_memory as u64),
            waiting,
        );
    }
}

/// Keeps the report of the moment with the most bytes in use, sampled every few
/// milliseconds, for the "who holds what" summary. A report reads each pool at its own
/// instant, so under this churn its groups may add up to more than the root held when it was
/// read: such a sample is no picture of one moment, and is skipped.
async fn sample_busiest(pool: Arc<BufPool>, busiest: Arc<Mutex<PoolReport>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        let report = pool.report();
        let held =
            |report: &PoolReport| -> usize { report.children.iter().map(|c| c.in_use_bytes).sum() };
        let mut busiest = busiest.lock().unwrap();
        if held(&report) <= report.in_use_bytes && held(&report) > held(&busiest) {
            *busiest = report;
        }
    }
}

/// Takes up to `batch` allocations at a time and writes them with vectored writes, dropping
/// each as soon as it is on its way to the file, so the budget comes back early.
fn write_batches(
    receiver: &mpsc::Receiver<FilledAllocation>,
    out: &mut File,
    batch: usize,
    totals: &Totals,
) {
    let mut pending: Vec<FilledAllocation> = Vec::with_capacity(batch);
    while let Ok(first) = receiver.recv() {
        pending.push(first);
        while pending.len() < batch {
            match receiver.try_recv() {
                Ok(next) => pending.push(next),
                Err(_) => break,
            }
        }
        let mut slices: Vec<IoSlice<'_>> = pending
            .iter()
            .flat_map(|filled| filled.io_slices())
            .collect();
        let mut remaining: &mut [IoSlice<'_>] = &mut slices;
        while !remaining.is_empty() {
            let written = out.write_vectored(remaining).expect("write the file");
            assert!(written > 0, "the file accepted no bytes");
            totals.written_bytes.fetch_add(written as u64, Relaxed);
            IoSlice::advance_slices(&mut remaining, written);
        }
        drop(slices);
        pending.clear(); // gives the bytes back to the budget
    }
}

fn read_back(mut file: File) -> (u64, u64) {
    use std::io::Seek;
    file.rewind().expect("rewind");
    let mut chunk = vec![0; 1 << 20];
    let (mut len, mut sum) = (0, 0);
    loop {
        let n = file.read(&mut chunk).expect("read back");
        if n == 0 {
            return (len, sum);
        }
        len += n as u64;
        sum += byte_sum(&chunk[..n]);
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
