//! A query's pool beside the program's I/O under one root budget: with a floor equal to the
//! query's limit, I/O that cycles the rest of the root never makes a query fail (20 runs of
//! each query); with a floor too small, the error names the I/O pool that holds the rest;
//! `grow`'s overcommit shows in the root's stats.

mod common;

use std::sync::Arc;

use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
use membudget_datafusion::{HolderKind, MembudgetPool};

const RUNS: usize = 20;
/// Small enough for about half a second a run in debug, large enough to spill.
const ROWS: usize = 250_000;

fn root(bytes: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(BufPoolCfg {
            buffer_size: BufferSize::S16384,
            max_memory: bytes,
        })
        .name("process")
        .build()
        .unwrap(),
    )
}

fn io_pool(root: &BufPool) -> Arc<BufPool> {
    Arc::new(
        root.child(
            "io",
            BufPoolCfg {
                buffer_size: BufferSize::S16384,
                max_memory: root.stats().max_memory,
            },
        )
        .unwrap(),
    )
}

/// `RUNS` runs of `sql` with a floor equal to `limit`, beside I/O cycling the rest of a root
/// of twice the limit: every run completes with the unlimited run's result.
async fn floor_equal_to_limit(sql: &str, limit: usize) {
    let table = common::table(ROWS);
    let expected = common::reference(sql, &table).await;
    let root = root(2 * limit);
    let query = Arc::new(MembudgetPool::child_of(&root, "query", limit, limit).unwrap());
    let io = common::start_io(io_pool(&root));
    let mut spills = 0;
    for run in 0..RUNS {
        let outcome = common::run(sql, &table, query.clone()).await;
        match outcome.result {
            Ok(digest) => assert_eq!(digest, expected, "run {run}"),
            Err(e) => panic!("run {run} failed beside I/O: {e}"),
        }
        spills += outcome.spills;
    }
    let cycles = io.stop();
    println!(
        "{sql}: {RUNS} runs ok beside {cycles} I/O cycles, {spills} spills; {:?}\n{}",
        query.stats(),
        root.tree_report()
    );
    assert!(spills > 0, "the limit must force spilling");
    assert!(cycles > 0);
    assert_eq!(query.stats().reserved, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_with_a_floor_equal_to_its_limit_never_fails_beside_io() {
    floor_equal_to_limit(common::SORT, 8 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_with_a_floor_equal_to_its_limit_never_fails_beside_io() {
    floor_equal_to_limit(common::GROUP_BY, 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_too_small_fails_with_an_error_naming_the_io_holder() {
    let table = common::table(ROWS);
    let root = root(16 << 20);
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 8 << 20, 1 << 20).unwrap());
    let io = io_pool(&root);
    // I/O holds all the root but the query's floor and 1 MiB.
    let held = io.try_allocate((14 << 20) / 16384).unwrap();
    let outcome = common::run(common::SORT, &table, query.clone()).await;
    let error = outcome
        .result
        .expect_err("1 MiB floor and 1 MiB free: too little");
    let message = error.to_string();
    println!("{message}");
    assert!(
        matches!(error.find_root(), DataFusionError::ResourcesExhausted(_)),
        "{error:?}"
    );
    assert!(message.contains("pool io 14.0 MB"), "{message}");
    let refusal = query.last_refusal().unwrap();
    let io_holder = refusal
        .holders
        .iter()
        .find(|h| h.name == "io")
        .expect("the I/O pool is named");
    assert_eq!(
        (io_holder.kind, io_holder.bytes),
        (HolderKind::Pool, 14 << 20)
    );
    assert_eq!(refusal.holders[0].name, "io", "the largest holder first");
    drop(held);
}

#[test]
fn overcommit_from_grow_shows_in_the_roots_stats() {
    let root = root(1 << 20);
    let io = io_pool(&root);
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 512 << 10, 0).unwrap());
    let pool: Arc<dyn MemoryPool> = query.clone();
    let held = io.try_allocate(48).unwrap(); // 768 KiB
    let join = MemoryConsumer::new("HashJoinInput").register(&pool);
    join.grow(400 << 10); // infallible: 256 KiB free, 144 KiB over the root's budget
    assert_eq!(pool.reserved(), 400 << 10);
    let stats = root.stats();
    assert_eq!(stats.in_use_bytes, (768 + 400) << 10);
    assert_eq!(stats.overcommit_bytes, 144 << 10);
    assert_eq!(query.stats().forced_grows, 1);
    // Repaid first: no grant anywhere in the tree meanwhile.
    assert_eq!(io.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert!(join.try_grow(8).is_err());
    join.shrink(200 << 10);
    assert_eq!(root.stats().overcommit_bytes, 0);
    let more = io.try_allocate(1).unwrap();
    drop((join, held, more));
    assert_eq!(root.stats().in_use_bytes, 0);
}
