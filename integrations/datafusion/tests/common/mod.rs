//! Shared by the integration tests and the examples: a MemTable of `rows` rows, the two
//! queries (a sort and a high-cardinality GROUP BY), running them under any `MemoryPool`,
//! and a digest of their results.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use membudget::BufPool;

use datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool, UnboundedMemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext};

/// Rows per batch, DataFusion's default batch size.
pub const BATCH: usize = 8192;
/// `datafusion.execution.sort_spill_reservation_bytes` for every run (the default is 10 MiB).
pub const SPILL_RESERVATION: usize = 2 << 20;
/// Partitions (`target_partitions`), as on the 2-core CI machine.
pub const PARTITIONS: usize = 2;

/// The sort: every row, ordered by a unique key.
pub const SORT: &str = "SELECT id, v FROM t ORDER BY v";
/// The GROUP BY: `rows / 2` groups.
pub const GROUP_BY: &str = "SELECT k, COUNT(*) AS c, SUM(v) AS s FROM t GROUP BY k";

/// A table `t(id, v, k)` of `rows` rows in `PARTITIONS` partitions of `BATCH`-row batches:
/// `id` counts, `v` is a permutation of `0..rows` (unique: the sort's output is unique),
/// `k = v % (rows / 2)` (two rows per group).
pub fn table(rows: usize) -> Arc<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
        Field::new("k", DataType::Int64, false),
    ]));
    // A multiplier coprime with any `rows` that is a product of 2s and 5s: a permutation.
    const MULTIPLIER: u128 = 999_983;
    let groups = (rows / 2).max(1) as i64;
    let mut partitions = vec![Vec::new(); PARTITIONS];
    let mut start = 0;
    while start < rows {
        let end = (start + BATCH).min(rows);
        let id: Vec<i64> = (start..end).map(|i| i as i64).collect();
        let v: Vec<i64> = (start..end)
            .map(|i| ((i as u128 * MULTIPLIER) % rows as u128) as i64)
            .collect();
        let k: Vec<i64> = v.iter().map(|v| v % groups).collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(id)),
                Arc::new(Int64Array::from(v)),
                Arc::new(Int64Array::from(k)),
            ],
        )
        .unwrap();
        partitions[(start / BATCH) % PARTITIONS].push(batch);
        start = end;
    }
    Arc::new(MemTable::try_new(schema, partitions).unwrap())
}

/// What a query returned, reduced to a few numbers that differ if any row does.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Digest {
    pub rows: usize,
    /// Order-sensitive for the sort, order-free for the GROUP BY.
    pub hash: u64,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The digest of `batches`: in order (`ordered`) or as a multiset of rows.
pub fn digest(batches: &[RecordBatch], ordered: bool) -> Digest {
    let mut rows = 0;
    let mut hash = 0u64;
    for batch in batches {
        let columns: Vec<&datafusion::arrow::array::PrimitiveArray<Int64Type>> = batch
            .columns()
            .iter()
            .map(|c| c.as_primitive::<Int64Type>())
            .collect();
        for row in 0..batch.num_rows() {
            let mut h = 0u64;
            for column in &columns {
                h = mix(h ^ column.value(row) as u64);
            }
            hash = if ordered {
                mix(hash ^ h).wrapping_add(rows as u64)
            } else {
                hash.wrapping_add(h)
            };
            rows += 1;
        }
        debug_assert!(columns.iter().all(|c| c.null_count() == 0));
    }
    Digest { rows, hash }
}

/// One run's outcome.
#[derive(Debug)]
pub struct Run {
    pub result: Result<Digest, DataFusionError>,
    /// Spill files written, summed over the plan.
    pub spills: usize,
    pub spilled_bytes: usize,
    pub elapsed: Duration,
}

fn spills(plan: &Arc<dyn ExecutionPlan>) -> (usize, usize) {
    let (mut count, mut bytes) = plan
        .metrics()
        .map(|m| (m.spill_count().unwrap_or(0), m.spilled_bytes().unwrap_or(0)))
        .unwrap_or((0, 0));
    for child in plan.children() {
        let (c, b) = spills(child);
        count += c;
        bytes += b;
    }
    (count, bytes)
}

/// A partitioned hash join of `t` with itself on `k` (two rows a key on each side): two
/// unspillable build sides.
pub const JOIN: &str = "SELECT a.id, b.v FROM t a JOIN t b ON a.k = b.k";

/// The join, its output sorted: a hash join's build sides, then sorts.
pub const JOIN_SORT: &str = "SELECT a.id, b.v FROM t a JOIN t b ON a.k = b.k ORDER BY b.v, a.id";
/// A window over `k` (a sort by `k, id` under it).
pub const WINDOW: &str = "SELECT id, SUM(v) OVER (PARTITION BY k ORDER BY id) AS s FROM t";
/// The join, then a GROUP BY of its output.
pub const JOIN_AGG: &str = "SELECT a.k, COUNT(*) AS c FROM t a JOIN t b ON a.k = b.k GROUP BY a.k";

/// The query named `name` (`sort`, `groupby`, `join`, `joinsort`, `joinagg`, `window`).
pub fn query(name: &str) -> Option<&'static str> {
    Some(match name {
        "sort" => SORT,
        "groupby" => GROUP_BY,
        "join" => JOIN,
        "joinsort" => JOIN_SORT,
        "joinagg" => JOIN_AGG,
        "window" => WINDOW,
        _ => return None,
    })
}

/// `f`, failed if it takes more than `secs` seconds (every test that runs queries has a
/// watchdog).
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("watchdog: hung for {secs} s"))
}

/// Runs `sql` over `table` as `t` with `pool`, `PARTITIONS` partitions, `BATCH`-row batches
/// and a `SPILL_RESERVATION` sort spill reservation.
pub async fn run(sql: &str, table: &Arc<MemTable>, pool: Arc<dyn MemoryPool>) -> Run {
    run_configured(sql, table, pool, PARTITIONS, Some(SPILL_RESERVATION)).await
}

/// [`run`] with `partitions` partitions and a sort spill reservation of
/// `spill_reservation` bytes (`None`: DataFusion's default, 10 MiB).
pub async fn run_configured(
    sql: &str,
    table: &Arc<MemTable>,
    pool: Arc<dyn MemoryPool>,
    partitions: usize,
    spill_reservation: Option<usize>,
) -> Run {
    let started = Instant::now();
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap();
    let mut config = SessionConfig::new()
        .with_target_partitions(partitions)
        .with_batch_size(BATCH);
    if let Some(bytes) = spill_reservation {
        config = config.with_sort_spill_reservation_bytes(bytes);
    }
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    ctx.register_table("t", table.clone()).unwrap();
    // Ordered if the query itself ends in an ORDER BY (not one inside a window's `OVER (..)`).
    let ordered = sql
        .rfind("ORDER BY")
        .is_some_and(|at| sql.rfind(')').is_none_or(|paren| paren < at));
    let plan = match ctx.sql(sql).await {
        Ok(frame) => frame.create_physical_plan().await,
        Err(e) => Err(e),
    };
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            return Run {
                result: Err(e),
                spills: 0,
                spilled_bytes: 0,
                elapsed: started.elapsed(),
            };
        }
    };
    let result = collect(Arc::clone(&plan), ctx.task_ctx()).await;
    let (spills, spilled_bytes) = spills(&plan);
    Run {
        result: result.map(|batches| digest(&batches, ordered)),
        spills,
        spilled_bytes,
        elapsed: started.elapsed(),
    }
}

/// The unlimited run's digest.
pub async fn reference(sql: &str, table: &Arc<MemTable>) -> Digest {
    run(sql, table, Arc::new(UnboundedMemoryPool::default()))
        .await
        .result
        .unwrap()
}

/// A run under DataFusion's `FairSpillPool` of `limit` bytes.
pub async fn run_fair(sql: &str, table: &Arc<MemTable>, limit: usize) -> Run {
    run(sql, table, Arc::new(FairSpillPool::new(limit))).await
}

/// Two threads that keep the I/O pool as full as the root lets it be.
pub struct Io {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    cycles: Arc<AtomicUsize>,
}

pub fn start_io(io: Arc<BufPool>) -> Io {
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicUsize::new(0));
    let threads = (0..2)
        .map(|_| {
            let (io, stop, cycles) = (Arc::clone(&io), Arc::clone(&stop), Arc::clone(&cycles));
            std::thread::spawn(move || {
                let mut held = std::collections::VecDeque::new();
                while !stop.load(Relaxed) {
                    match io.allocate_timeout(16, Duration::from_millis(5)) {
                        Ok(a) => held.push_back(a),
                        Err(_) => drop(held.pop_front()),
                    }
                    if held.len() > 64 {
                        held.pop_front();
                    }
                    cycles.fetch_add(1, Relaxed);
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        })
        .collect();
    Io {
        stop,
        threads,
        cycles,
    }
}

impl Io {
    pub fn stop(self) -> usize {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.cycles.load(Relaxed)
    }
}
