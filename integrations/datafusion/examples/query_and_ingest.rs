//! A query and an ingest loop under one memory budget.
//!
//! The program's root pool (`process`, 48 MiB by default) has two children: `ingest`, from
//! which tokio producers allocate 256 KiB of 16 KiB buffers at a time, fill them and hand
//! them to a writer thread that writes them to a temporary file at 200 MiB/s (a slow disk:
//! the filled buffers queue up until the budget stops the producers; as the core's
//! `examples/ingest.rs`); and `query`, a `MembudgetPool` with a floor equal to its limit
//! (16 MiB), under which DataFusion sorts a million rows in 2 partitions, spilling, a few
//! times in a row, while ingest runs. Ingest may use everything the query's floor leaves. At the end it prints
//! the wall time, the spills, the peaks and `tree_report()`.
//!
//! `--pool fair` runs the same with DataFusion's `FairSpillPool` of the same limit instead:
//! the query's memory is then outside the budget tree, so ingest gets a pool of the root's
//! budget less the limit, and the peak is sampled (ingest's bytes plus the query's).
//!
//! ```text
//! cargo run --example query_and_ingest
//! cargo run --example query_and_ingest -- --pool fair
//! cargo run --example query_and_ingest -- --queries 5 --producers 16
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use membudget::{BufPool, BufPoolCfg, BufferSize};
use membudget_datafusion::MembudgetPool;

const MIB: usize = 1 << 20;
const BUF: BufferSize = BufferSize::S16384;
/// The writer's rate, slower than the producers: ingest is bounded by its budget.
const WRITE_MIB_S: usize = 200;

struct Options {
    fair: bool,
    root_mib: usize,
    limit_mib: usize,
    queries: usize,
    rows: usize,
    producers: usize,
}

fn options() -> Options {
    let mut o = Options {
        fair: false,
        root_mib: 48,
        limit_mib: 16,
        queries: 3,
        rows: 1_000_000,
        producers: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--pool" => {
                o.fair = match std::env::args().nth(2).as_deref() {
                    Some("fair") => true,
                    Some("membudget") => false,
                    other => panic!("--pool fair|membudget, not {other:?}"),
                };
                args.next();
            }
            "--root-mib" => o.root_mib = value(),
            "--limit-mib" => o.limit_mib = value(),
            "--queries" => o.queries = value(),
            "--rows" => o.rows = value(),
            "--producers" => o.producers = value(),
            other => panic!(
                "unknown flag {other}; flags: --pool fair|membudget --root-mib --limit-mib \
                 --queries --rows --producers"
            ),
        }
    }
    o
}

#[tokio::main(worker_threads = 2)]
async fn main() {
    let o = options();
    let limit = o.limit_mib * MIB;
    let root = Arc::new(
        BufPool::builder(BufPoolCfg {
            buffer_size: BUF,
            max_memory: o.root_mib * MIB,
        })
        .name("process")
        .build()
        .unwrap(),
    );
    // The query's pool first: its floor is set aside before ingest can take the room.
    let (query_pool, membudget): (Arc<dyn MemoryPool>, Option<Arc<MembudgetPool>>) = if o.fair {
        (Arc::new(FairSpillPool::new(limit)), None)
    } else {
        let pool = Arc::new(MembudgetPool::child_of(&root, "query", limit, limit).unwrap());
        (pool.clone(), Some(pool))
    };
    let ingest_budget = if o.fair {
        root.stats().max_memory - limit
    } else {
        root.stats().max_memory
    };
    let ingest = Arc::new(
        root.child(
            "ingest",
            BufPoolCfg {
                buffer_size: BUF,
                max_memory: ingest_budget,
            },
        )
        .unwrap(),
    );

    // Ingest: producers fill 256 KiB allocations, a writer thread writes them to a file.
    let path = std::env::temp_dir().join(format!("query_and_ingest-{}.bin", std::process::id()));
    let (to_writer, from_producers) =
        std::sync::mpsc::sync_channel::<membudget::FilledAllocation>(4096);
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            let mut written = 0usize;
            let started = Instant::now();
            for filled in from_producers {
                file.write_all(&filled).unwrap();
                written += filled.len();
                // A disk of `WRITE_MIB_S`: the queue of filled buffers grows until the
                // budget stops the producers.
                let due = Duration::from_secs_f64(written as f64 / (WRITE_MIB_S * MIB) as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
            file.flush().unwrap();
            written
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicUsize::new(0));
    let per_allocation = 16;
    let producers: Vec<_> = (0..o.producers)
        .map(|p| {
            let (ingest, to_writer, stop, produced) = (
                Arc::clone(&ingest),
                to_writer.clone(),
                Arc::clone(&stop),
                Arc::clone(&produced),
            );
            tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let allocation = ingest.allocate(per_allocation).await.unwrap();
                    let mut filled = allocation.into_filled();
                    let bytes = per_allocation * BUF as usize;
                    filled.fill(p as u8, bytes);
                    produced.fetch_add(bytes, Relaxed);
                    let to_writer = to_writer.clone();
                    // The channel blocks when the writer is behind: off the runtime's threads.
                    tokio::task::spawn_blocking(move || to_writer.send(filled).unwrap())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    drop(to_writer);

    // A sampler: the peak of the whole budget (FairSpillPool's bytes are outside the tree,
    // so they are added), and the tree's report at the busiest moment sampled.
    let sampled_peak = Arc::new(AtomicUsize::new(0));
    let busiest = Arc::new(std::sync::Mutex::new(None::<membudget::PoolReport>));
    let sampler = {
        let (pool, peak, stop, root, busiest) = (
            Arc::clone(&query_pool),
            Arc::clone(&sampled_peak),
            Arc::clone(&stop),
            Arc::clone(&root),
            Arc::clone(&busiest),
        );
        let fair = o.fair;
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let report = root.tree_report();
                let query = if fair { pool.reserved() } else { 0 };
                let total = report.in_use_bytes + query;
                if total > peak.fetch_max(total, Relaxed) {
                    *busiest.lock().unwrap() = Some(report);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let table = common::table(o.rows);
    let expected = common::reference(common::SORT, &table).await;
    let started = Instant::now();
    let (mut ok, mut spills, mut query_secs) = (0, 0, 0.0);
    for i in 0..o.queries {
        let run = common::run(common::SORT, &table, Arc::clone(&query_pool)).await;
        query_secs += run.elapsed.as_secs_f64();
        spills += run.spills;
        match run.result {
            Ok(digest) if digest == expected => ok += 1,
            Ok(_) => println!("query {i}: WRONG RESULT"),
            Err(e) => println!("query {i} failed: {e}"),
        }
    }
    let query_wall = started.elapsed();
    stop.store(true, Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    let written = writer.join().unwrap();
    sampler.join().unwrap();
    let wall = started.elapsed();
    std::fs::remove_file(&path).ok();

    let root_stats = root.stats();
    let ingest_stats = ingest.stats();
    println!(
        "pool: {}; root {} MiB, query limit {} MiB{}",
        if o.fair {
            "FairSpillPool"
        } else {
            "MembudgetPool (floor = limit)"
        },
        o.root_mib,
        o.limit_mib,
        if o.fair {
            format!(", ingest pool {} MiB", ingest_budget / MIB)
        } else {
            String::new()
        }
    );
    println!(
        "queries: {ok}/{} ok (sort of {} rows, 2 partitions), {spills} spills, {:.2} s per query, {:.2} s for all",
        o.queries,
        o.rows,
        query_secs / o.queries as f64,
        query_wall.as_secs_f64()
    );
    println!(
        "ingest: {:.0} MiB written meanwhile ({:.0} MiB/s), {} waits for budget (in its pool or the root's queue, max {:?})",
        written as f64 / MIB as f64,
        written as f64 / MIB as f64 / wall.as_secs_f64(),
        ingest_stats.waited_allocations + root_stats.waited_allocations,
        ingest_stats.max_wait.max(root_stats.max_wait),
    );
    let peak = if o.fair {
        sampled_peak.load(Relaxed)
    } else {
        root_stats.peak_in_use_bytes
    };
    println!(
        "peak of the whole budget: {:.1} MiB of {} MiB{}",
        peak as f64 / MIB as f64,
        o.root_mib,
        match &membudget {
            Some(pool) => format!(
                "; query peak {:.1} MiB, {:?}",
                pool.stats().peak_reserved as f64 / MIB as f64,
                pool.stats()
            ),
            None => String::new(),
        }
    );
    if let Some(report) = busiest.lock().unwrap().take() {
        println!("tree_report() at the busiest moment sampled:\n{report}");
    }
}
