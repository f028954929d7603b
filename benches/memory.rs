//! What the storage-engine options cost and save (issue 5): zeroed allocations through
//! `alloc_zeroed` against a memset, block recycling against the bare allocator for large
//! blocks, and the price of direct-I/O alignment.
//!
//! `cargo bench --bench memory`

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use membudget::{BufPool, BufPoolCfg, BufferSize};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

fn touch_pages(ptr: *mut u8, bytes: usize) {
    for offset in (0..bytes).step_by(PAGE) {
        // SAFETY: `offset < bytes`, inside the block the caller owns.
        unsafe { ptr.add(offset).write_volatile(1) };
    }
}

/// Large zeroed blocks: `allocate_zeroed` (the allocator's zeroed path, fresh pages arrive
/// zeroed) against `allocate` plus a memset, alone and with every page touched afterwards.
fn zeroed(c: &mut Criterion, regime: &str) {
    let mut group = c.benchmark_group(format!("zeroed_{regime}"));
    for mib in [1, 8] {
        let bytes = mib * MIB;
        let pool = BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S16384,
            max_memory: 64 * MIB,
        });
        let n = bytes / BufferSize::S16384.bytes();
        group.bench_function(
            BenchmarkId::new("allocate_zeroed", format!("{mib}MiB")),
            |b| b.iter(|| black_box(pool.try_allocate_zeroed(n).unwrap())),
        );
        group.bench_function(
            BenchmarkId::new("allocate+memset", format!("{mib}MiB")),
            |b| {
                b.iter(|| {
                    let allocation = pool.try_allocate(n).unwrap();
                    // SAFETY: the block is `bytes` writable bytes owned by `allocation`.
                    unsafe { allocation.first().write_bytes(0, bytes) };
                    black_box(allocation)
                })
            },
        );
        group.bench_function(
            BenchmarkId::new("allocate_zeroed+touch", format!("{mib}MiB")),
            |b| {
                b.iter(|| {
                    let allocation = pool.try_allocate_zeroed(n).unwrap();
                    touch_pages(allocation.first(), bytes);
                    black_box(allocation)
                })
            },
        );
        group.bench_function(
            BenchmarkId::new("allocate+memset+touch", format!("{mib}MiB")),
            |b| {
                b.iter(|| {
                    let allocation = pool.try_allocate(n).unwrap();
                    // SAFETY: as above.
                    unsafe { allocation.first().write_bytes(0, bytes) };
                    touch_pages(allocation.first(), bytes);
                    black_box(allocation)
                })
            },
        );
    }
    group.finish();
}

/// Allocate, write one byte per page, drop: 1 MiB and 8 MiB blocks, with and without
/// recycling, against the bare allocator.
fn recycling(c: &mut Criterion, regime: &str) {
    let mut group = c.benchmark_group(format!("recycle_{regime}"));
    for mib in [1, 8] {
        let bytes = mib * MIB;
        let cfg = BufPoolCfg {
            buffer_size: BufferSize::S16384,
            max_memory: 64 * MIB,
        };
        let n = bytes / BufferSize::S16384.bytes();
        let plain = BufPool::new(cfg);
        let recycling = BufPool::builder(cfg).recycle(4).build().unwrap();
        group.bench_function(BenchmarkId::new("std_alloc", format!("{mib}MiB")), |b| {
            let layout = Layout::from_size_align(bytes, 16).unwrap();
            b.iter(|| {
                // SAFETY: non-zero layout; freed with the same layout.
                unsafe {
                    let ptr = alloc(layout);
                    touch_pages(ptr, bytes);
                    dealloc(black_box(ptr), layout);
                }
            })
        });
        group.bench_function(BenchmarkId::new("pool", format!("{mib}MiB")), |b| {
            b.iter(|| {
                let allocation = plain.try_allocate(n).unwrap();
                touch_pages(allocation.first(), bytes);
                black_box(allocation)
            })
        });
        group.bench_function(
            BenchmarkId::new("pool_recycling", format!("{mib}MiB")),
            |b| {
                b.iter(|| {
                    let allocation = recycling.try_allocate(n).unwrap();
                    touch_pages(allocation.first(), bytes);
                    black_box(allocation)
                })
            },
        );
    }
    group.finish();
}

/// The price of alignment: one 64-byte buffer and one 4 KiB buffer, default against
/// direct-I/O alignment, with the bare allocator at the same alignments.
fn alignment(c: &mut Criterion) {
    let mut group = c.benchmark_group("alignment");
    for size in [BufferSize::S64, BufferSize::S4096] {
        let cfg = BufPoolCfg {
            buffer_size: size,
            max_memory: size.bytes() * 64,
        };
        let default = BufPool::new(cfg);
        let direct = BufPool::builder(cfg).direct_io_alignment().build().unwrap();
        let label = format!("{}B", size.bytes());
        group.bench_function(BenchmarkId::new("pool_default", &label), |b| {
            b.iter(|| black_box(default.try_allocate(1).unwrap()))
        });
        group.bench_function(BenchmarkId::new("pool_direct_io", &label), |b| {
            b.iter(|| black_box(direct.try_allocate(1).unwrap()))
        });
        for align in [16, size.bytes().min(PAGE)] {
            let layout = Layout::from_size_align(size.bytes(), align).unwrap();
            group.bench_function(
                BenchmarkId::new(format!("std_alloc_align{align}"), &label),
                |b| {
                    b.iter(|| {
                        // SAFETY: non-zero layout; freed with the same layout.
                        unsafe {
                            let ptr = alloc(layout);
                            dealloc(black_box(ptr), layout);
                        }
                    })
                },
            );
        }
    }
    // The same comparison for `alloc_zeroed`, to show the zeroed path has no alignment trap.
    let layout = Layout::from_size_align(MIB, PAGE).unwrap();
    group.bench_function("std_alloc_zeroed_align4096/1MiB", |b| {
        b.iter(|| {
            // SAFETY: non-zero layout; freed with the same layout.
            unsafe {
                let ptr = alloc_zeroed(layout);
                dealloc(black_box(ptr), layout);
            }
        })
    });
    group.finish();
}

/// glibc raises its mmap threshold to the size of the last mmapped block it freed (up to
/// 32 MiB), so a loop over one large size soon runs from its heap: no map, no unmap, no page
/// fault. With a fixed threshold, as under `M_MMAP_THRESHOLD` or a mixed-size workload that
/// keeps it low, every large block is mapped, faulted in and unmapped. Both regimes are
/// measured; this switches to the second for the rest of the process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_mmap_threshold() -> bool {
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
        fn malloc_trim(pad: usize) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: these only change glibc's allocation policy and give free heap memory back to
    // the kernel; any value is valid. The trim matters: glibc carves a large request from
    // the top of its heap when that is big enough, whatever the mmap threshold says.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1
            && mallopt(M_TRIM_THRESHOLD, 128 << 10) == 1
            && malloc_trim(0) >= 0
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() -> bool {
    false
}

fn memory(c: &mut Criterion) {
    alignment(c);
    zeroed(c, "glibc_default");
    recycling(c, "glibc_default");
    if fix_mmap_threshold() {
        zeroed(c, "mmap_128k");
        recycling(c, "mmap_128k");
    } else {
        eprintln!("memory: no glibc mallopt here; the fixed-mmap-threshold rows are skipped");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = memory
}
criterion_main!(benches);
