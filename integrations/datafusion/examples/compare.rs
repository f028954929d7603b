//! Runs one of the two test queries (a spilling sort, a high-cardinality GROUP BY) many times
//! under DataFusion's `FairSpillPool` and under `MembudgetPool`, alone or beside I/O that
//! cycles the rest of the root's budget, and prints failures, spills and times: the figures
//! in the crate README.
//!
//! ```text
//! cargo run --example compare -- --query sort --rows 1000000 --limit-mib 16 --runs 6
//! cargo run --example compare -- --query sort --rows 200000 --limit-mib 8 --runs 20 --io --floor 0.5
//! ```
//!
//! `--partitions N` sets `target_partitions` (2 by default), `--spill-mib M` the sort's
//! `sort_spill_reservation_bytes` (2 by default; `default` keeps DataFusion's 10 MiB);
//! `--query join` runs a partitioned hash join of the table with itself, `joinsort` the same
//! sorted, `joinagg` the join then a GROUP BY, `window` a window function over `k`.
//!
//! `--pools fair,membudget,fair_spill,greedy` picks the pools (`fair` is DataFusion's
//! `FairSpillPool`; the others are `MembudgetPool` policies). `--io` puts the query's pool
//! under a root of twice the limit whose other half (and whatever the query's floor leaves)
//! two threads cycle through 256 KiB I/O allocations; `--floor F` sets the query's floor to
//! `F * limit` (1 by default).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/trace_pool.rs"]
mod trace_pool;

use std::sync::Arc;

use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use membudget::{BufPool, BufPoolCfg, BufferSize};
use membudget_datafusion::{MembudgetPool, Policy};

struct Options {
    query: String,
    rows: usize,
    limit: usize,
    runs: usize,
    io: bool,
    floor: f64,
    pools: Vec<String>,
    verbose: bool,
    /// On a failure, print this many of the pool's last calls.
    trace: usize,
    /// A run longer than this is reported as hung (with `--trace`, its last calls) and the
    /// program exits with status 3.
    hang_secs: u64,
    /// `target_partitions`.
    partitions: usize,
    /// `sort_spill_reservation_bytes`; `None` keeps DataFusion's default (10 MiB).
    spill_reservation: Option<usize>,
}

fn options() -> Options {
    let mut o = Options {
        query: "sort".into(),
        rows: 1_000_000,
        limit: 16 << 20,
        runs: 6,
        io: false,
        floor: 1.0,
        pools: vec!["fair".into(), "membudget".into()],
        verbose: false,
        trace: 0,
        hang_secs: 600,
        partitions: common::PARTITIONS,
        spill_reservation: Some(common::SPILL_RESERVATION),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match flag.as_str() {
            "--query" => o.query = value(),
            "--rows" => o.rows = value().parse().unwrap(),
            "--limit-mib" => o.limit = (value().parse::<f64>().unwrap() * 1048576.0) as usize,
            "--runs" => o.runs = value().parse().unwrap(),
            "--io" => o.io = true,
            "--floor" => o.floor = value().parse().unwrap(),
            "--pools" => o.pools = value().split(',').map(str::to_owned).collect(),
            "--verbose" => o.verbose = true,
            "--trace" => o.trace = value().parse().unwrap(),
            "--hang-secs" => o.hang_secs = value().parse().unwrap(),
            "--partitions" => o.partitions = value().parse().unwrap(),
            "--spill-mib" => {
                o.spill_reservation = match value().as_str() {
                    "default" => None,
                    mib => Some((mib.parse::<f64>().unwrap() * 1048576.0) as usize),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    o
}

/// One pool's outcomes over the batch.
#[derive(Default)]
struct Tally {
    ok: usize,
    wrong: usize,
    failed: usize,
    spills: usize,
    secs: f64,
    messages: std::collections::BTreeMap<String, usize>,
    io_cycles: usize,
}

#[tokio::main(worker_threads = 2)]
async fn main() {
    let o = options();
    let sql = common::query(&o.query).unwrap_or_else(|| {
        panic!(
            "--query sort|groupby|join|joinsort|joinagg|window, not {}",
            o.query
        )
    });
    let table = common::table(o.rows);
    let expected = common::reference(sql, &table).await;
    println!(
        "{} over {} rows, limit {:.1} MiB, {} partitions, spill reservation {}, {} runs{}",
        o.query,
        o.rows,
        o.limit as f64 / 1048576.0,
        o.partitions,
        o.spill_reservation
            .map_or("10 MiB (default)".to_owned(), |b| format!(
                "{:.1} MiB",
                b as f64 / 1048576.0
            )),
        o.runs,
        if o.io {
            format!(", beside I/O, floor {} x limit", o.floor)
        } else {
            String::new()
        }
    );
    let mut tallies: Vec<Tally> = o.pools.iter().map(|_| Tally::default()).collect();
    // Run by run, the pools in turn (the order reversed every other run): scheduling and
    // the machine's load change over a batch, and a pool's runs all in a row would meet
    // only one part of it.
    for run_index in 0..o.runs {
        let mut order: Vec<usize> = (0..o.pools.len()).collect();
        if run_index % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let name = &o.pools[which];
            let Tally {
                ok,
                wrong,
                failed,
                spills,
                secs,
                messages,
                io_cycles,
            } = &mut tallies[which];
            let root = Arc::new(
                BufPool::builder(BufPoolCfg {
                    buffer_size: BufferSize::S16384,
                    max_memory: 2 * o.limit,
                })
                .name("process")
                .build()
                .unwrap(),
            );
            let mut io = None;
            let mut membudget = None;
            let pool: Arc<dyn MemoryPool> = if name == "fair" {
                Arc::new(FairSpillPool::new(o.limit))
            } else {
                let policy = match name.as_str() {
                    "membudget" => Policy::Fair,
                    "fair_spill" => Policy::FairSpill,
                    "greedy" => Policy::Greedy,
                    other => panic!("unknown pool {other}"),
                };
                let floor = if o.io {
                    (o.limit as f64 * o.floor) as usize
                } else {
                    o.limit
                };
                let child = BufPool::builder(BufPoolCfg {
                    buffer_size: BufferSize::S8,
                    max_memory: o.limit,
                })
                .name("query")
                .parent(&root)
                .min_memory(floor)
                .build()
                .unwrap();
                let pool = Arc::new(MembudgetPool::builder().policy(policy).build(child));
                if o.io {
                    let io_pool = Arc::new(
                        root.child(
                            "io",
                            BufPoolCfg {
                                buffer_size: BufferSize::S16384,
                                max_memory: 2 * o.limit,
                            },
                        )
                        .unwrap(),
                    );
                    io = Some(common::start_io(io_pool));
                }
                membudget = Some(Arc::clone(&pool));
                pool
            };
            let traced = (o.trace > 0).then(|| Arc::new(trace_pool::TracePool::new(pool.clone())));
            let pool: Arc<dyn MemoryPool> = match &traced {
                Some(t) => t.clone(),
                None => pool,
            };
            let run = match tokio::time::timeout(
                std::time::Duration::from_secs(o.hang_secs),
                common::run_configured(sql, &table, pool, o.partitions, o.spill_reservation),
            )
            .await
            {
                Ok(run) => run,
                Err(_) => {
                    // A run that makes no progress: say so, with the pool's last calls.
                    println!("  run hung for {} s", o.hang_secs);
                    if let Some(t) = &traced {
                        t.dump(o.trace);
                    }
                    if let Some(p) = &membudget {
                        println!("  {:?}\n  {:?}", p.stats(), p.consumers());
                    }
                    std::process::exit(3);
                }
            };
            if let (Some(t), Err(e)) = (&traced, &run.result) {
                println!("  failed: {e}");
                t.dump(o.trace);
            }
            if let Some(io) = io {
                *io_cycles += io.stop();
            }
            *spills += run.spills;
            *secs += run.elapsed.as_secs_f64();
            match run.result {
                Ok(d) if d == expected => *ok += 1,
                Ok(_) => *wrong += 1,
                Err(e) => {
                    *failed += 1;
                    let text = e.to_string();
                    let key = if o.verbose {
                        text
                    } else {
                        // The refused consumer, enough to tell the failures apart.
                        text.split(" for ")
                            .nth(1)
                            .map(|s| s.split([' ', '#']).next().unwrap_or(s).to_owned())
                            .unwrap_or(text)
                    };
                    *messages.entry(key).or_default() += 1;
                }
            }
            if let (Some(p), true) = (&membudget, o.verbose) {
                println!("  {:?}", p.stats());
            }
        }
    }
    for (name, tally) in o.pools.iter().zip(tallies) {
        println!(
            "{name:>10}: {} ok, {} failed, {} wrong; spills {:.1}/run; {:.2} s/run{}",
            tally.ok,
            tally.failed,
            tally.wrong,
            tally.spills as f64 / o.runs as f64,
            tally.secs / o.runs as f64,
            if o.io {
                format!("; {} I/O cycles", tally.io_cycles)
            } else {
                String::new()
            }
        );
        for (message, n) in tally.messages {
            println!("            {n} x refused: {message}");
        }
    }
}
