//! A block cache and a query under one memory budget, with and without `reclaim_ahead`.
//!
//! The program's root pool (`process`, 48 MiB by default) has two children:
//!
//! * `cache`, from which a **block cache** keeps blocks of 256 KiB (16 buffers of 16 KiB).
//!   It is warmed up front, then a filler task loads one more block (`try_allocate`) at
//!   `--refill-mib-s` (32 MiB/s), each time only if the root's free room stays at or above
//!   `--keep-mib` (8 MiB): the cache grows into whatever memory nobody else uses, most of
//!   the root, and grows back after it is shrunk. The cache is a `Reclaimer`
//!   (registered on the `cache` pool, priority 0) that evicts its oldest blocks when asked;
//! * `query`, a `MembudgetPool` with a limit (16 MiB) and **no floor**, under which
//!   DataFusion sorts a million rows in 2 partitions, `--queries` (5) times in a row.
//!
//! DataFusion's `try_grow` never waits, so waiter-driven reclaim never runs for it: without
//! more, the query finds the root nearly full (the cache's `--keep-mib`) and spills more, or
//! fails. The example runs the same twice: first without reclaim, then with
//! `root.reclaim_ahead(low_water)` (`--low-water-mib`, 8 MiB; at most `--keep-mib`, or the
//! filler and reclaim would fight) spawned on the tokio runtime,
//! which evicts cache blocks whenever the root's free room falls below the mark, without
//! anyone waiting: the cache shrinks as the query grows, and grows back after. (A query that
//! takes more than the mark in one burst, faster than the reclaim task is scheduled, is
//! still refused: the mark should cover a query's first steps.)
//!
//! For each pass it prints the queries' outcome and spills, the query's and the whole
//! budget's peaks, the cache's size (before the first query, smallest while the queries
//! ran, at the end) and the root's `reclaim_rounds` and `reclaimed_bytes`.
//!
//! ```text
//! cargo run --example cache_and_query
//! cargo run --example cache_and_query -- --keep-mib 12 --low-water-mib 12 --queries 10
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer};
use membudget_datafusion::MembudgetPool;

const MIB: usize = 1 << 20;
const BUF: BufferSize = BufferSize::S16384;
/// A cache block: 16 buffers of 16 KiB.
const BLOCK_BUFFERS: usize = 16;
const BLOCK_BYTES: usize = BLOCK_BUFFERS * BUF as usize;

struct Options {
    root_mib: usize,
    limit_mib: usize,
    keep_mib: usize,
    low_water_mib: usize,
    refill_mib_s: usize,
    queries: usize,
    rows: usize,
}

fn options() -> Options {
    let mut o = Options {
        root_mib: 48,
        limit_mib: 16,
        keep_mib: 8,
        low_water_mib: 8,
        refill_mib_s: 32,
        queries: 5,
        rows: 1_000_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--root-mib" => o.root_mib = value(),
            "--limit-mib" => o.limit_mib = value(),
            "--keep-mib" => o.keep_mib = value(),
            "--low-water-mib" => o.low_water_mib = value(),
            "--refill-mib-s" => o.refill_mib_s = value().max(1),
            "--queries" => o.queries = value(),
            "--rows" => o.rows = value(),
            other => panic!(
                "unknown flag {other}; flags: --root-mib --limit-mib --keep-mib \
                 --low-water-mib --refill-mib-s --queries --rows"
            ),
        }
    }
    o
}

/// A FIFO block cache in the `cache` pool's memory. It holds no handle on a pool (a
/// reclaimer must not hold its own pool); the filler passes the pool in.
#[derive(Default)]
struct BlockCache {
    blocks: Mutex<std::collections::VecDeque<BufPoolAllocation>>,
    bytes: AtomicUsize,
    evicted: AtomicUsize,
}

impl BlockCache {
    /// Loads up to `blocks` blocks while `root`'s free room stays at or above `keep` once
    /// each is in.
    fn fill(&self, cache_pool: &BufPool, root: &BufPool, keep: usize, blocks: usize) {
        for _ in 0..blocks {
            if root.stats().available_bytes() < keep + BLOCK_BYTES {
                break;
            }
            match cache_pool.try_allocate(BLOCK_BUFFERS) {
                Ok(block) => {
                    self.blocks.lock().unwrap().push_back(block);
                    self.bytes.fetch_add(BLOCK_BYTES, Relaxed);
                }
                Err(_) => break,
            }
        }
    }

    fn size(&self) -> usize {
        self.bytes.load(Relaxed)
    }
}

impl Reclaimer for BlockCache {
    fn estimate(&self) -> usize {
        self.size()
    }

    /// Evicts the oldest blocks until `target` is covered; their memory is back in the pool
    /// before the future is even polled.
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let mut freed = 0;
        let mut blocks = self.blocks.lock().unwrap();
        while freed < target {
            let Some(block) = blocks.pop_front() else {
                break;
            };
            freed += block.allocated_bytes();
            self.bytes.fetch_sub(block.allocated_bytes(), Relaxed);
            drop(block);
        }
        self.evicted.fetch_add(freed, Relaxed);
        Box::pin(async move { freed })
    }
}

async fn pass(o: &Options, ahead: bool, table: &Arc<datafusion::datasource::MemTable>) {
    let expected = common::reference(common::SORT, table).await;
    let root = Arc::new(
        BufPool::builder(BufPoolCfg {
            buffer_size: BUF,
            max_memory: o.root_mib * MIB,
        })
        .name("process")
        .build()
        .unwrap(),
    );
    let cache_pool = Arc::new(
        root.child(
            "cache",
            BufPoolCfg {
                buffer_size: BUF,
                max_memory: o.root_mib * MIB,
            },
        )
        .unwrap(),
    );
    // No floor: the query has only what the tree has free.
    let query = Arc::new(MembudgetPool::child_of(&root, "query", o.limit_mib * MIB, 0).unwrap());
    let cache = Arc::new(BlockCache::default());
    let handle = cache_pool.register_reclaimer("block cache", 0, cache.clone());

    // The filler keeps the cache warm, and records its smallest size while queries run.
    let keep = o.keep_mib * MIB;
    cache.fill(&cache_pool, &root, keep, usize::MAX);
    let before = cache.size();
    let refill_every = Duration::from_secs_f64(BLOCK_BYTES as f64 / (o.refill_mib_s * MIB) as f64);
    let stop = Arc::new(AtomicBool::new(false));
    let smallest = Arc::new(AtomicUsize::new(before));
    let filler = {
        let (cache, cache_pool, root, stop, smallest) = (
            cache.clone(),
            cache_pool.clone(),
            root.clone(),
            stop.clone(),
            smallest.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                smallest.fetch_min(cache.size(), Relaxed);
                cache.fill(&cache_pool, &root, keep, 1);
                tokio::time::sleep(refill_every).await;
            }
        })
    };
    let reclaim_ahead = ahead.then(|| tokio::spawn(root.reclaim_ahead(o.low_water_mib * MIB)));

    let (mut ok, mut spills, mut ok_spills, mut secs) = (0, 0, 0, 0.0);
    let mut failure = None;
    for _ in 0..o.queries {
        let run = common::run(common::SORT, table, query.clone()).await;
        secs += run.elapsed.as_secs_f64();
        spills += run.spills;
        match run.result {
            Ok(digest) if digest == expected => {
                ok += 1;
                ok_spills += run.spills;
            }
            Ok(_) => failure = Some("WRONG RESULT".to_owned()),
            Err(e) => failure = Some(e.to_string()),
        }
    }
    stop.store(true, Relaxed);
    filler.await.unwrap();
    let after = cache.size();
    let stats = root.stats();
    let query_stats = query.stats();
    root.close();
    if let Some(task) = reclaim_ahead {
        task.await.unwrap();
    }
    drop(handle);

    println!(
        "{}",
        if ahead {
            format!("with root.reclaim_ahead({} MiB):", o.low_water_mib)
        } else {
            "without reclaim_ahead:".to_owned()
        }
    );
    println!(
        "  queries: {ok}/{} ok (sort of {} rows, 2 partitions, limit {} MiB, no floor), \
         {spills} spills ({:.1} per query that succeeded), {:.2} s per query",
        o.queries,
        o.rows,
        o.limit_mib,
        ok_spills as f64 / ok.max(1) as f64,
        secs / o.queries as f64,
    );
    if let Some(failure) = failure {
        let short: String = failure.chars().take(3000).collect();
        println!("  last failure: {short}");
    }
    println!(
        "  peaks: query {:.1} MiB of {}, whole budget {:.1} MiB of {}; try_grow refused {} times",
        query_stats.peak_reserved as f64 / MIB as f64,
        o.limit_mib,
        stats.peak_in_use_bytes as f64 / MIB as f64,
        o.root_mib,
        query_stats.refused,
    );
    println!(
        "  cache: {:.1} MiB before the first query, {:.1} MiB at its smallest while they ran, \
         {:.1} MiB at the end; {:.1} MiB evicted",
        before as f64 / MIB as f64,
        smallest.load(Relaxed) as f64 / MIB as f64,
        after as f64 / MIB as f64,
        cache.evicted.load(Relaxed) as f64 / MIB as f64,
    );
    println!(
        "  root: {} reclaim rounds, reclaimed_bytes {:.1} MiB",
        stats.reclaim_rounds,
        stats.reclaimed_bytes as f64 / MIB as f64,
    );
}

#[tokio::main(worker_threads = 2)]
async fn main() {
    let o = options();
    assert!(
        o.keep_mib >= o.low_water_mib,
        "--keep-mib below --low-water-mib: the filler and reclaim_ahead would fight"
    );
    println!(
        "root {} MiB: a block cache that fills it up to {} MiB free, and a query pool of {} MiB \
         (no floor)",
        o.root_mib, o.keep_mib, o.limit_mib
    );
    let table = common::table(o.rows);
    pass(&o, false, &table).await;
    pass(&o, true, &table).await;
}
