//! `Policy::Fair` step by step, with the reservations of DataFusion's 2-partition sort played
//! by hand: the sequence that made `FairSpillPool` (and the previous `Policy::Fair`) fail the
//! million-row sort (README, "Beyond parity"), and a final merge that grows greedily.

use std::sync::Arc;

use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use membudget::{BufPool, BufPoolCfg, BufferSize};
use membudget_datafusion::{MembudgetPool, RefusalReason};

const MIB: usize = 1 << 20;
const BATCH: usize = 256 << 10;

fn fair(limit: usize) -> (Arc<MembudgetPool>, Arc<dyn MemoryPool>) {
    let query = Arc::new(MembudgetPool::new(BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S8,
        max_memory: limit,
    })));
    let pool: Arc<dyn MemoryPool> = query.clone();
    (query, pool)
}

fn sorter(pool: &Arc<dyn MemoryPool>, i: usize) -> (MemoryReservation, MemoryReservation) {
    (
        MemoryConsumer::new(format!("ExternalSorter[{i}]"))
            .with_can_spill(true)
            .register(pool),
        MemoryConsumer::new(format!("ExternalSorterMerge[{i}]")).register(pool),
    )
}

/// Batches until refused; returns how many were granted.
fn fill(reservation: &MemoryReservation) -> usize {
    let mut n = 0;
    while reservation.try_grow(BATCH).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn a_late_partition_spills_in_the_room_left_and_its_merge_finds_its_claim() {
    let (query, pool) = fair(16 * MIB);
    // Partition 0 alone: its merge headroom, then batches until refused. The headroom for
    // one more unspillable consumer (2 MiB) stays free: the share is 16 - 2 - 2 MiB.
    let (sorter0, merge0) = sorter(&pool, 0);
    merge0.try_grow(2 * MIB).unwrap();
    assert_eq!(fill(&sorter0), 48);
    assert_eq!(pool.reserved(), 14 * MIB);
    // It sorts in memory: frees its merge headroom, which stays claimed, and holds its
    // 12 MiB until the output is drained (a sorter in its output phase cannot spill).
    merge0.free();

    // Partition 1 registers now; its merge headroom fits in what partition 0 left.
    let (sorter1, merge1) = sorter(&pool, 1);
    merge1.try_grow(2 * MIB).unwrap();
    // Its first batch (nothing to spill yet) is granted; the next is refused: the room
    // left is partition 0's claim, and a sorter that holds bytes spills instead.
    sorter1.try_grow(BATCH).unwrap();
    let refused = sorter1.try_grow(BATCH).unwrap_err();
    assert!(refused.to_string().contains("set aside"), "{refused}");
    assert!(matches!(
        query.last_refusal().unwrap().reason,
        RefusalReason::SetAside { .. }
    ));
    // Partition 0's output merge grows inside its claim.
    merge0.try_grow(MIB).unwrap();

    // Partition 1 spills: frees its merge headroom, sorts, writes, frees its batch.
    merge1.free();
    // The room it freed is claimed: the other sorter (were it still buffering) cannot
    // take it, and neither can this one.
    assert!(sorter0.try_grow(BATCH).is_err());
    assert!(sorter1.try_grow(BATCH).is_err());
    sorter1.free();
    // ... and its merge headroom is there again after the spill.
    merge1.try_grow(2 * MIB).unwrap();
    assert!(pool.reserved() <= 16 * MIB);
    let stats = query.stats();
    assert_eq!(
        (stats.forced_shares, query.pool().stats().overcommit_bytes),
        (0, 0)
    );
}

#[test]
fn a_spiller_that_holds_bytes_never_overcommits() {
    let (query, pool) = fair(8 * MIB);
    let (sorter0, _merge0) = sorter(&pool, 0);
    let (sorter1, _merge1) = sorter(&pool, 1);
    // No unspillable consumer holds or claims anything (no headroom): sorter 0 gets its
    // share, then (say, through `grow`) the whole pool; the other sorter then gets its
    // first batch as counted overcommit (it has nothing to spill) and is refused the next.
    let took = fill(&sorter0);
    assert!(took * BATCH <= 4 * MIB, "its share: {took} batches");
    assert_eq!(took * BATCH, 4 * MIB);
    sorter0.grow(8 * MIB - took * BATCH); // infallible: the rest of the pool
    sorter1.try_grow(BATCH).unwrap();
    assert_eq!(query.stats().forced_shares, 1);
    assert!(sorter1.try_grow(BATCH).is_err());
    assert!(sorter0.try_grow(BATCH).is_err());
    assert_eq!(query.stats().forced_shares, 1);
}

#[test]
fn a_greedy_final_merge_leaves_room_for_the_next_batches() {
    let (_query, pool) = fair(8 * MIB);
    let spm = MemoryConsumer::new("SortPreservingMergeExec[0]").register(&pool);
    let (_sorter0, merge0) = sorter(&pool, 0);
    let (_sorter1, merge1) = sorter(&pool, 1);
    merge0.try_grow(2 * MIB).unwrap();
    merge1.try_grow(2 * MIB).unwrap();
    // Partition 0's final merge asks for 512 KiB per spill file it would read at once,
    // until refused (DataFusion's multi-level merge): it stops before the pool is full.
    let mut files = 0;
    while merge0.try_grow(512 << 10).is_ok() {
        files += 1;
    }
    assert!(files >= 2, "{files}");
    assert!(pool.reserved() <= 8 * MIB - (512 << 10));
    // The plan's last merge still gets its batches.
    spm.try_grow(64 << 10).unwrap();
    spm.try_grow(128 << 10).unwrap();
    // A merge that grows in small steps (a spill's sorted runs) may fill what is left.
    while merge1.try_grow(64 << 10).is_ok() {}
    assert!(pool.reserved() >= 8 * MIB - (64 << 10));
}
