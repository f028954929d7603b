//! Parity with `FairSpillPool`, judged call by call: every real query runs under a pool that
//! forwards to `MembudgetPool` (default policy) and mirrors each call into a shadow
//! `FairSpillPool` of the same limit. When a query fails, the `try_grow` that failed it
//! must be one `FairSpillPool` would refuse too, in the same state.
//!
//! Comparing pass rates alone cannot show this: whether two partitions' sorts overlap is up
//! to the scheduler, and with DataFusion's default `sort_spill_reservation_bytes` (10 MiB)
//! under a 14-20 MiB limit both pools fail the runs where two partitions ask for their
//! merge reservations at once. The shadow separates those races (both pools refuse) from a
//! refusal of the policy's own (only `MembudgetPool` refuses), whatever the scheduling.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::common::Result;
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use membudget::{BufPool, BufPoolCfg, BufferSize};
use membudget_datafusion::MembudgetPool;

/// One `try_grow` that `MembudgetPool` refused.
#[derive(Debug)]
struct Refused {
    consumer: String,
    id: usize,
    additional: usize,
    reservation: usize,
    /// Whether the shadow `FairSpillPool` would have granted it.
    fair_spill_grants: bool,
}

/// Forwards to `ours`; mirrors every call into `shadow`, kept in the state `FairSpillPool`
/// would be in after the same grants.
#[derive(Debug)]
struct Shadowed {
    ours: Arc<MembudgetPool>,
    shadow: FairSpillPool,
    refused: Mutex<Vec<Refused>>,
    /// Held across each call to both pools: two threads' calls must reach the shadow in the
    /// order they reached `ours`, or it would judge a refusal in a state `ours` never saw.
    in_step: Mutex<()>,
}

impl MemoryPool for Shadowed {
    fn name(&self) -> &str {
        "shadowed"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        let _in_step = self.in_step.lock().unwrap();
        self.ours.register(consumer);
        self.shadow.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        let _in_step = self.in_step.lock().unwrap();
        self.ours.unregister(consumer);
        self.shadow.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let _in_step = self.in_step.lock().unwrap();
        self.ours.grow(reservation, additional);
        self.shadow.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let _in_step = self.in_step.lock().unwrap();
        self.ours.shrink(reservation, shrink);
        self.shadow.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let _in_step = self.in_step.lock().unwrap();
        let ours = self.ours.try_grow(reservation, additional);
        // `FairSpillPool` reads only the reservation's size and its consumer's `can_spill`,
        // both as `MembudgetPool` saw them.
        let fair_spill_grants = self.shadow.try_grow(reservation, additional).is_ok();
        match (&ours, fair_spill_grants) {
            // Granted here, refused there: the shadow takes the bytes anyway, to stay in
            // the state of a pool that granted them.
            (Ok(()), false) => self.shadow.grow(reservation, additional),
            // Refused here: the shadow gives them back.
            (Err(_), true) => self.shadow.shrink(reservation, additional),
            _ => {}
        }
        if ours.is_err() {
            self.refused.lock().unwrap().push(Refused {
                consumer: reservation.consumer().name().to_owned(),
                id: reservation.consumer().id(),
                additional,
                reservation: reservation.size(),
                fair_spill_grants,
            });
        }
        ours
    }

    fn reserved(&self) -> usize {
        self.ours.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.ours.memory_limit()
    }
}

impl std::fmt::Display for Shadowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shadowed({})", self.ours)
    }
}

/// Runs `sql` once under a shadowed `MembudgetPool` of `limit` bytes. Returns whether it
/// passed, and panics if it failed on a refusal `FairSpillPool` would have granted.
async fn run_shadowed(
    sql: &str,
    table: &Arc<datafusion::datasource::MemTable>,
    limit: usize,
    partitions: usize,
    spill_reservation: Option<usize>,
    expected: common::Digest,
) -> bool {
    let ours = Arc::new(MembudgetPool::new(BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S8,
        max_memory: limit,
    })));
    let pool = Arc::new(Shadowed {
        ours: ours.clone(),
        shadow: FairSpillPool::new(limit),
        refused: Mutex::new(Vec::new()),
        in_step: Mutex::new(()),
    });
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        common::run_configured(sql, table, pool.clone(), partitions, spill_reservation),
    )
    .await
    .unwrap_or_else(|_| panic!("{partitions} partitions, limit {limit}: the query hung"));
    let passed = match run.result {
        Ok(digest) => {
            assert_eq!(digest, expected, "a wrong result");
            true
        }
        Err(error) => {
            let error = error.to_string();
            let refused = pool.refused.lock().unwrap();
            // The refusal that failed the query: the last one of the consumer the error is
            // about ("... for name#id with ..."; the holders it lists come later).
            let fatal = refused
                .iter()
                .rev()
                .find(|r| error.contains(&format!(" for {}#{} with ", r.consumer, r.id)))
                .unwrap_or_else(|| panic!("no refusal matches the error: {error}"));
            assert!(
                !fatal.fair_spill_grants,
                "{partitions} partitions, limit {limit}: failed on a refusal FairSpillPool \
                 grants in the same state: {} asked {} bytes beside the {} its reservation \
                 held\n{error}",
                fatal.consumer, fatal.additional, fatal.reservation,
            );
            false
        }
    };
    // Every consumer gone, every byte back.
    for _ in 0..2500 {
        if ours.stats().reserved == 0 && ours.consumers().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(ours.stats().reserved, 0, "{:?}", ours.consumers());
    assert_eq!(ours.pool().stats().in_use_bytes, 0);
    passed
}

/// DataFusion's defaults (a 10 MiB `sort_spill_reservation_bytes`): the sort of 100k rows
/// with 2 and 4 partitions at 12-24 MiB. Before, `Policy::Fair` failed every run at 14-20
/// MiB on a stale merge claim (a sorter's first batch refused where `FairSpillPool` grants
/// it); both pools still fail the runs where two partitions ask for their 10 MiB at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sort_with_the_default_spill_reservation_fails_only_where_fair_spill_pool_would() {
    common::within(300, async {
        let table = common::table(100_000);
        let expected = common::reference(common::SORT, &table).await;
        let mut passed = 0;
        for partitions in [2, 4] {
            for limit_mib in [12, 14, 16, 20, 24] {
                for _ in 0..3 {
                    passed += usize::from(
                        run_shadowed(
                            common::SORT,
                            &table,
                            limit_mib << 20,
                            partitions,
                            None,
                            expected,
                        )
                        .await,
                    );
                }
            }
        }
        // With 2 partitions at 24 MiB both merge reservations and both partitions' batches
        // fit at once (23.4 MB): those 3 runs pass whatever the scheduling.
        assert!(passed >= 3, "{passed} of 30 passed");
    })
    .await;
}

/// The project's own configuration (a 2 MiB spill reservation) where `Policy::Fair` keeps
/// room aside for the merges, the sort and the GROUP BY at limits that make them spill, and a
/// partitioned hash join (two unspillable build sides) at limits near its need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilling_queries_fail_only_where_fair_spill_pool_would() {
    common::within(300, async {
        let table = common::table(100_000);
        for (sql, limits_kib) in [
            (common::SORT, &[1536, 2048, 4096, 8192][..]),
            // (Not below 4 MiB: with 4 partitions the GROUP BY's spillable consumers, a
            // repartition and two aggregates a partition, then get shares smaller than their
            // batches, and DataFusion's plan can stop making progress under either pool;
            // README "Floors below the limit".)
            (common::GROUP_BY, &[4096, 8192][..]),
            (common::JOIN, &[3072, 3328, 3584, 4096][..]),
        ] {
            let expected = common::reference(sql, &table).await;
            for partitions in [2, 4] {
                for &kib in limits_kib {
                    for _ in 0..2 {
                        run_shadowed(
                            sql,
                            &table,
                            kib << 10,
                            partitions,
                            Some(common::SPILL_RESERVATION),
                            expected,
                        )
                        .await;
                    }
                }
            }
        }
    })
    .await;
}

/// Exploration (run by hand, minutes): the shadowed runs over a grid of queries, partitions,
/// spill reservations and limits, reporting each cell's passes; a failure `FairSpillPool`
/// would not have had panics as in the tests above. `Q=sort|groupby|join|joinsort|joinagg|
/// window`, `PARTS=2,4`, `LIMITS_KIB=2048,4096`, `SPILL_KIB=default,2048`, `ROWS`, `RUNS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "exploration, minutes"]
async fn explore_shadowed() {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let list = |name: &str, default: &str| -> Vec<String> {
        var(name, default).split(',').map(str::to_owned).collect()
    };
    let rows: usize = var("ROWS", "100000").parse().unwrap();
    let runs: usize = var("RUNS", "3").parse().unwrap();
    let table = common::table(rows);
    for query in list("Q", "sort,groupby,join,joinsort,joinagg,window") {
        let sql = common::query(&query).unwrap_or_else(|| panic!("unknown query {query}"));
        let expected = common::reference(sql, &table).await;
        for spill in list("SPILL_KIB", "default,2048") {
            let spill_reservation = match spill.as_str() {
                "default" => None,
                kib => Some(kib.parse::<usize>().unwrap() << 10),
            };
            for partitions in list("PARTS", "2,4") {
                let partitions: usize = partitions.parse().unwrap();
                for kib in list("LIMITS_KIB", "2048,4096,8192,16384,32768") {
                    let limit = kib.parse::<usize>().unwrap() << 10;
                    let mut passed = 0;
                    for _ in 0..runs {
                        passed += usize::from(
                            run_shadowed(
                                sql,
                                &table,
                                limit,
                                partitions,
                                spill_reservation,
                                expected,
                            )
                            .await,
                        );
                    }
                    println!(
                        "{query} spill {spill} KiB, {partitions} partitions, {kib} KiB: \
                         {passed} of {runs} passed, no failure FairSpillPool would not have had"
                    );
                }
            }
        }
    }
}

/// A hash join's build side near a full pool, as `explore_shadowed` found it (DataFusion's
/// `HashJoinInput` grows by batches; its first was 131,072 bytes and a later one 130,816): the
/// last step fits the limit exactly, and `FairSpillPool` grants it. A draft of the "large
/// unspillable" rule that compared the claim with the request alone took the build side for
/// a merge growing past its claim and kept the step's bytes free: a refusal that fails the
/// query.
#[test]
fn a_build_sides_last_batch_that_fits_is_granted_as_fair_spill_pool_grants_it() {
    let limit = 15 * 131_072 + 130_816;
    let ours = Arc::new(MembudgetPool::new(BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S8,
        max_memory: limit,
    })));
    let fair: Arc<dyn MemoryPool> = Arc::new(FairSpillPool::new(limit));
    let as_dyn: Arc<dyn MemoryPool> = ours.clone();
    for pool in [fair, as_dyn] {
        let build0 = MemoryConsumer::new("HashJoinInput[0]").register(&pool);
        let build1 = MemoryConsumer::new("HashJoinInput[1]").register(&pool);
        for _ in 0..7 {
            build1.try_grow(131_072).unwrap();
        }
        for _ in 0..8 {
            build0.try_grow(131_072).unwrap();
        }
        let last = build0.try_grow(130_816);
        assert!(last.is_ok(), "{}: {last:?}", pool.name());
        assert_eq!(pool.reserved(), limit);
        drop((build0, build1));
        assert_eq!(pool.reserved(), 0);
    }
    assert_eq!(ours.pool().stats().in_use_bytes, 0);
}
