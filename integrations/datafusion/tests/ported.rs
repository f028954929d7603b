//! DataFusion 55.2's own memory-pool tests (`datafusion-execution`, `memory_pool/mod.rs` and
//! `memory_pool/pool.rs`), ported to `MembudgetPool`: the same calls and the same promises.
//! `GreedyMemoryPool(n)` becomes a `MembudgetPool` with `Policy::Greedy` over a `BufPool` of
//! `n` bytes, `FairSpillPool(n)` one with `Policy::FairSpill`, and `TrackConsumersPool`'s
//! top-consumer reports become `MembudgetPool::consumers` and the holders every refusal
//! names. Snapshot texts become checks of what the message contains (the README lists the
//! differences).

use std::sync::Arc;

use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, UnboundedMemoryPool,
};
use membudget::{BufPool, BufPoolCfg, BufferSize};
use membudget_datafusion::{MembudgetPool, Policy, RefusalReason};

fn membudget(limit: usize, policy: Policy) -> Arc<MembudgetPool> {
    let pool = BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S8,
        max_memory: limit,
    });
    Arc::new(MembudgetPool::builder().policy(policy).build(pool))
}

fn greedy(limit: usize) -> Arc<dyn MemoryPool> {
    membudget(limit, Policy::Greedy)
}

fn fair(limit: usize) -> Arc<dyn MemoryPool> {
    membudget(limit, Policy::FairSpill)
}

fn message(result: datafusion::common::Result<()>) -> String {
    match result.unwrap_err() {
        DataFusionError::ResourcesExhausted(message) => message,
        other => panic!("not ResourcesExhausted: {other}"),
    }
}

// ---- memory_pool/mod.rs ----

#[test]
fn test_memory_pool_underflow() {
    let pool = greedy(50);
    let a1 = MemoryConsumer::new("a1").register(&pool);
    assert_eq!(pool.reserved(), 0);

    a1.grow(100);
    assert_eq!(pool.reserved(), 100);

    assert_eq!(a1.free(), 100);
    assert_eq!(pool.reserved(), 0);

    a1.try_grow(100).unwrap_err();
    assert_eq!(pool.reserved(), 0);

    a1.try_grow(30).unwrap();
    assert_eq!(pool.reserved(), 30);

    let a2 = MemoryConsumer::new("a2").register(&pool);
    a2.try_grow(25).unwrap_err();
    assert_eq!(pool.reserved(), 30);

    drop(a1);
    assert_eq!(pool.reserved(), 0);

    a2.try_grow(25).unwrap();
    assert_eq!(pool.reserved(), 25);
}

#[test]
fn test_split() {
    let pool = greedy(50);
    let r1 = MemoryConsumer::new("r1").register(&pool);

    r1.try_grow(20).unwrap();
    assert_eq!(r1.size(), 20);
    assert_eq!(pool.reserved(), 20);

    // take 5 from r1, should still have same reservation split
    let r2 = r1.split(5);
    assert_eq!(r1.size(), 15);
    assert_eq!(r2.size(), 5);
    assert_eq!(pool.reserved(), 20);

    // dropping r1 frees 15 but retains 5 as they have the same consumer
    drop(r1);
    assert_eq!(r2.size(), 5);
    assert_eq!(pool.reserved(), 5);
}

#[test]
fn test_new_empty() {
    let pool = greedy(50);
    let r1 = MemoryConsumer::new("r1").register(&pool);

    r1.try_grow(20).unwrap();
    let r2 = r1.new_empty();
    r2.try_grow(5).unwrap();

    assert_eq!(r1.size(), 20);
    assert_eq!(r2.size(), 5);
    assert_eq!(pool.reserved(), 25);
}

#[test]
fn test_take() {
    let pool = greedy(50);
    let mut r1 = MemoryConsumer::new("r1").register(&pool);

    r1.try_grow(20).unwrap();
    let r2 = r1.take();
    r2.try_grow(5).unwrap();

    assert_eq!(r1.size(), 0);
    assert_eq!(r2.size(), 25);
    assert_eq!(pool.reserved(), 25);

    // r1 can still grow again
    r1.try_grow(3).unwrap();
    assert_eq!(r1.size(), 3);
    assert_eq!(r2.size(), 25);
    assert_eq!(pool.reserved(), 28);
}

#[test]
fn test_downcast() {
    let pool: Arc<dyn MemoryPool> = greedy(50);

    assert!(pool.is::<MembudgetPool>());
    assert!(!pool.is::<GreedyMemoryPool>());
    assert!(!pool.is::<UnboundedMemoryPool>());

    let membudget: &MembudgetPool = pool.downcast_ref().unwrap();
    assert_eq!(membudget.reserved(), 0);
    assert!(pool.downcast_ref::<UnboundedMemoryPool>().is_none());
}

#[test]
fn test_try_shrink() {
    let pool = greedy(100);
    let r1 = MemoryConsumer::new("r1").register(&pool);

    r1.try_grow(50).unwrap();
    assert_eq!(r1.size(), 50);
    assert_eq!(pool.reserved(), 50);

    // Successful shrink returns new size and frees pool memory
    let new_size = r1.try_shrink(30).unwrap();
    assert_eq!(new_size, 20);
    assert_eq!(r1.size(), 20);
    assert_eq!(pool.reserved(), 20);

    // Freed pool memory is now available to other consumers
    let r2 = MemoryConsumer::new("r2").register(&pool);
    r2.try_grow(80).unwrap();
    assert_eq!(pool.reserved(), 100);

    // Shrinking more than allocated fails without changing state
    let err = r1.try_shrink(25);
    assert!(err.is_err());
    assert_eq!(r1.size(), 20);
    assert_eq!(pool.reserved(), 100);

    // Shrink to exactly zero
    let new_size = r1.try_shrink(20).unwrap();
    assert_eq!(new_size, 0);
    assert_eq!(r1.size(), 0);
    assert_eq!(pool.reserved(), 80);
}

// ---- memory_pool/pool.rs ----

#[test]
fn test_fair() {
    let pool = fair(100);

    let r1 = MemoryConsumer::new("unspillable").register(&pool);
    // Can grow beyond capacity of pool
    r1.grow(2000);
    assert_eq!(pool.reserved(), 2000);

    let r2 = MemoryConsumer::new("r2")
        .with_can_spill(true)
        .register(&pool);
    // Can grow beyond capacity of pool
    r2.grow(2000);

    assert_eq!(pool.reserved(), 4000);

    let err = message(r2.try_grow(1));
    assert!(
        err.starts_with("Failed to allocate additional 1.0 B for r2#"),
        "{err}"
    );
    assert!(
        err.contains("with 2000.0 B already allocated for this reservation"),
        "{err}"
    );
    assert!(
        err.contains("0.0 B remain available for the total memory pool"),
        "{err}"
    );

    let err = message(r2.try_grow(1));
    assert!(err.contains("0.0 B remain available"), "{err}");

    r1.shrink(1990);
    r2.shrink(2000);

    assert_eq!(pool.reserved(), 10);

    r1.try_grow(10).unwrap();
    assert_eq!(pool.reserved(), 20);

    // Can grow r2 to 80 as only spilling consumer
    r2.try_grow(80).unwrap();
    assert_eq!(pool.reserved(), 100);

    r2.shrink(70);

    assert_eq!(r1.size(), 20);
    assert_eq!(r2.size(), 10);
    assert_eq!(pool.reserved(), 30);

    let r3 = MemoryConsumer::new("r3")
        .with_can_spill(true)
        .register(&pool);

    let err = message(r3.try_grow(70));
    assert!(
        err.starts_with("Failed to allocate additional 70.0 B for r3#"),
        "{err}"
    );
    assert!(err.contains("40.0 B remain available"), "{err}");

    //Shrinking r2 to zero doesn't allow a3 to allocate more than 45
    r2.free();
    let err = message(r3.try_grow(70));
    assert!(err.contains("40.0 B remain available"), "{err}");

    // But dropping r2 does
    drop(r2);
    assert_eq!(pool.reserved(), 20);
    r3.try_grow(80).unwrap();

    assert_eq!(pool.reserved(), 100);
    r1.free();
    assert_eq!(pool.reserved(), 80);

    let r4 = MemoryConsumer::new("s4").register(&pool);
    let err = message(r4.try_grow(30));
    assert!(
        err.starts_with("Failed to allocate additional 30.0 B for s4#"),
        "{err}"
    );
    assert!(err.contains("20.0 B remain available"), "{err}");
}

/// `test_tracked_consumers_pool`: every way of changing a reservation's size is tracked, and
/// a refusal names the largest consumers (here: all holders, largest first).
#[test]
fn test_tracked_consumers_pool() {
    let query = membudget(100, Policy::Greedy);
    let pool: Arc<dyn MemoryPool> = query.clone();

    // set r1=50, using grow and shrink
    let r1 = MemoryConsumer::new("r1").register(&pool);
    r1.grow(50);
    r1.grow(20);
    r1.shrink(20);

    // set r2=15 using try_grow
    let r2 = MemoryConsumer::new("r2").register(&pool);
    r2.try_grow(15)
        .expect("should succeed in memory allotment for r2");

    // set r3=20 using try_resize
    let r3 = MemoryConsumer::new("r3").register(&pool);
    r3.try_resize(25)
        .expect("should succeed in memory allotment for r3");
    r3.try_resize(20)
        .expect("should succeed in memory allotment for r3");

    // set r4=10, not reported in the top 3
    let r4 = MemoryConsumer::new("r4").register(&pool);
    r4.grow(10);

    let r5 = MemoryConsumer::new("r5").register(&pool);
    let err = message(r5.try_grow(150));
    assert!(
        err.starts_with("Failed to allocate additional 150.0 B for r5#"),
        "{err}"
    );
    assert!(err.contains("5.0 B remain available"), "{err}");
    let holders = err.split("Largest holders in the budget: ").nth(1).unwrap();
    let names: Vec<&str> = holders
        .split(", ")
        .map(|h| h.split('#').next().unwrap())
        .collect();
    assert_eq!(names, ["r1", "r3", "r2", "r4"]);
    assert!(holders.starts_with(&format!(
        "r1#{}(can spill: false) 50.0 B",
        r1.consumer().id()
    )));

    let refusal = query.last_refusal().unwrap();
    assert_eq!(refusal.consumer, "r5");
    assert_eq!(refusal.requested, 150);
    assert_eq!(refusal.holders[0].bytes, 50);
    assert!(matches!(refusal.reason, RefusalReason::Budget { .. }));
    drop((r1, r2, r3, r4));
}

#[test]
fn test_tracked_consumers_pool_register() {
    let query = membudget(100, Policy::Greedy);
    let pool: Arc<dyn MemoryPool> = query.clone();
    let same_name = "foo";

    // No consumer holds anything yet
    let r0 = MemoryConsumer::new(same_name).register(&pool);
    let err = message(r0.try_grow(150));
    assert!(err.contains("100.0 B remain available"), "{err}");
    assert!(
        err.ends_with("Largest holders in the budget: none"),
        "{err}"
    );

    // Two consumers with the same name are told apart by their ids
    r0.grow(10);
    let r1 = MemoryConsumer::new(same_name).register(&pool);
    let err = message(r1.try_grow(150));
    assert!(err.contains("90.0 B remain available"), "{err}");
    assert!(err.contains(&format!(
        "foo#{}(can spill: false) 10.0 B",
        r0.consumer().id()
    )));

    // Sizes accumulate per consumer
    r1.grow(20);
    let err = message(r1.try_grow(150));
    assert!(
        err.contains("with 20.0 B already allocated for this reservation"),
        "{err}"
    );
    assert!(err.contains("70.0 B remain available"), "{err}");
    let holders = err.split("Largest holders in the budget: ").nth(1).unwrap();
    assert!(holders.starts_with(&format!(
        "foo#{}(can spill: false) 20.0 B",
        r1.consumer().id()
    )));

    // A spilling consumer with the same name is another consumer again
    let r2 = MemoryConsumer::new(same_name)
        .with_can_spill(true)
        .register(&pool);
    let err = message(r2.try_grow(150));
    assert!(err.starts_with(&format!(
        "Failed to allocate additional 150.0 B for foo#{}",
        r2.consumer().id()
    )));
    assert_eq!(query.consumers().len(), 3);
}

#[test]
fn test_tracked_consumers_pool_deregister() {
    for policy in [Policy::FairSpill, Policy::Greedy, Policy::Fair] {
        let query = membudget(100, policy);
        let pool: Arc<dyn MemoryPool> = query.clone();
        let r0 = MemoryConsumer::new("r0").register(&pool);
        r0.grow(10);
        let r1 = MemoryConsumer::new("r1").register(&pool);
        r1.grow(20);

        // Baseline: both consumers named
        let err = message(r0.try_grow(150));
        assert!(err.contains("70.0 B remain available"), "{err}");
        assert!(err.contains("r1#") && err.contains("r0#"), "{err}");

        // Unregistered: only the remaining consumer is named, and its bytes are free
        drop(r1);
        let err = message(r0.try_grow(150));
        assert!(err.contains("90.0 B remain available"), "{err}");
        assert!(!err.contains("r1#") && err.contains("r0#"), "{err}");
        assert_eq!(query.consumers().len(), 1);
    }
}

#[test]
fn test_track_consumers_pool_metrics() {
    let query = membudget(1000, Policy::Greedy);
    let pool: Arc<dyn MemoryPool> = query.clone();

    assert!(query.consumers().is_empty());

    let r1 = MemoryConsumer::new("spilling")
        .with_can_spill(true)
        .register(&pool);
    let r2 = MemoryConsumer::new("non-spilling").register(&pool);

    // Grow r1 in two steps to verify peak tracking
    r1.grow(100);
    r1.grow(50);
    r1.shrink(50); // reserved=100, peak=150

    r2.grow(200); // reserved=200, peak=200

    let mut metrics = query.consumers();
    metrics.sort_by_key(|m| m.name.clone());
    assert_eq!(metrics.len(), 2);

    let m_non = &metrics[0];
    assert_eq!(m_non.name, "non-spilling");
    assert!(!m_non.can_spill);
    assert_eq!(m_non.bytes, 200);
    assert_eq!(m_non.peak, 200);

    let m_spill = &metrics[1];
    assert_eq!(m_spill.name, "spilling");
    assert!(m_spill.can_spill);
    assert_eq!(m_spill.bytes, 100);
    assert_eq!(m_spill.peak, 150);

    // Unregistered consumers are removed from metrics
    drop(r2);
    let metrics = query.consumers();
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0].name, "spilling");
}

#[test]
fn test_tracked_consumers_pool_use_beyond_errors() {
    let upcasted: Arc<dyn std::any::Any + Send + Sync> = membudget(100, Policy::Greedy);
    let pool: Arc<dyn MemoryPool> = Arc::clone(&upcasted).downcast::<MembudgetPool>().unwrap();
    let r1 = MemoryConsumer::new("r1").register(&pool);
    r1.grow(20);
    let r2 = MemoryConsumer::new("r2").register(&pool);
    r2.grow(15);
    let r3 = MemoryConsumer::new("r3").register(&pool);
    r3.grow(45);

    let downcasted = upcasted.downcast::<MembudgetPool>().unwrap();
    // Usage is readable without an error
    let top: Vec<(String, usize)> = downcasted
        .consumers()
        .into_iter()
        .take(2)
        .map(|c| (c.name, c.bytes))
        .collect();
    assert_eq!(top, [("r3".to_owned(), 45), ("r1".to_owned(), 20)]);
}

#[test]
fn test_memory_pool_display_fmt() {
    let pool: Arc<dyn MemoryPool> = membudget(100, Policy::Greedy);
    assert_eq!(
        pool.to_string(),
        "membudget(pool: unnamed, used: 0.0 B, pool_size: 100.0 B, policy: greedy)"
    );
    let r = MemoryConsumer::new("g").register(&pool);
    r.grow(50);
    assert_eq!(
        pool.to_string(),
        "membudget(pool: unnamed, used: 50.0 B, pool_size: 100.0 B, policy: greedy)"
    );
    let fair = membudget(4096, Policy::FairSpill);
    assert_eq!(
        fair.to_string(),
        "membudget(pool: unnamed, used: 0.0 B, pool_size: 4.0 KB, policy: fair_spill)"
    );
    assert_eq!(pool.name(), "membudget");
    assert!(matches!(pool.memory_limit(), MemoryLimit::Finite(100)));
}

// ---- beyond the ports ----

/// `reserved()` is exact to the byte however sizes round in the core, and the core holds
/// the exact sum rounded up to a multiple of 8.
#[test]
fn reserved_is_exact_and_the_core_holds_its_rounding() {
    let query = membudget(1000, Policy::Greedy);
    let pool: Arc<dyn MemoryPool> = query.clone();
    let a = MemoryConsumer::new("a").register(&pool);
    let b = MemoryConsumer::new("b").register(&pool);
    let mut expected = 0usize;
    for (i, n) in [1usize, 3, 7, 9, 13, 2, 5].into_iter().enumerate() {
        let r = if i % 2 == 0 { &a } else { &b };
        r.try_grow(n).unwrap();
        expected += n;
        assert_eq!(pool.reserved(), expected);
        assert_eq!(
            query.pool().stats().in_use_bytes,
            expected.next_multiple_of(8)
        );
    }
    a.shrink(1);
    b.try_shrink(3).unwrap();
    assert_eq!(pool.reserved(), expected - 4);
    drop((a, b));
    assert_eq!((pool.reserved(), query.pool().stats().in_use_bytes), (0, 0));
}

/// DataFusion's reservations are `&self` and shared between threads: many threads growing,
/// shrinking, splitting and dropping keep the books exact, and everything comes back.
#[test]
fn concurrent_reservations_keep_exact_books() {
    let query = membudget(1 << 20, Policy::Fair);
    let pool: Arc<dyn MemoryPool> = query.clone();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                let shared = Arc::new(
                    MemoryConsumer::new(format!("c{t}"))
                        .with_can_spill(t % 2 == 0)
                        .register(&pool),
                );
                for i in 0..2_000usize {
                    let n = 1 + (i * 7 + t) % 97;
                    match i % 5 {
                        0 => shared.grow(n),
                        1 => drop(shared.try_grow(n)),
                        2 => {
                            let part = shared.split(shared.size() / 2);
                            drop(part.try_grow(n));
                        }
                        3 => shared.shrink(shared.size() / 3),
                        _ => drop(shared.try_resize(n * 3)),
                    }
                }
                shared.size()
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // Each thread's reservation dropped at its end: nothing is left.
    assert_eq!(pool.reserved(), 0);
    assert_eq!(query.pool().stats().in_use_bytes, 0);
    assert_eq!(query.stats().consumers, 0);
}
