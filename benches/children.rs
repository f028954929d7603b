//! Child pools: the fast path (room everywhere, nobody waits) of a root pool, a child and a
//! grandchild, allocate + drop of one 64-byte buffer, as users write it (`unwrap`, the
//! allocation used by reference in a function that is not inlined). The target: a
//! child's row at most 1.5 × the root's. A child's request reserves in every pool of its
//! chain (one compare-exchange each way per level), so the cost grows with depth only.
//!
//! Run: `cargo bench --bench children`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize};

fn cfg() -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64 << 20,
    }
}

#[inline(never)]
fn use_it(allocation: &BufPoolAllocation) {
    black_box(allocation.first());
}

fn children(c: &mut Criterion) {
    let root = BufPool::new(cfg());
    let child = root.child("child", cfg()).unwrap();
    let grandchild = child.child("grandchild", cfg()).unwrap();
    let mut group = c.benchmark_group("children");
    for (name, pool) in [
        ("root", &root),
        ("child", &child),
        ("grandchild", &grandchild),
    ] {
        group.bench_function(BenchmarkId::new("try_allocate_unwrap", name), |b| {
            b.iter(|| {
                let allocation = pool.try_allocate(1).unwrap();
                use_it(&allocation);
            });
        });
        group.bench_function(BenchmarkId::new("allocate_await_block_on", name), |b| {
            b.iter(|| {
                let allocation = futures::executor::block_on(pool.allocate(1)).unwrap();
                use_it(&allocation);
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = children
}
criterion_main!(benches);
