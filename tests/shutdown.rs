//! Issue 2, guarantees 7 (memory safety: moves, cross-thread drops, contiguous buffers) and
//! 8 (shutdown: `close`, the `Drop` barrier, `drained`, `shutdown`, `shutdown_timeout`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferPointer, BufferSize};

const BUF: usize = 64;

/// Fills every byte of every buffer through the `iter()` pointers with a pattern that names
/// the buffer and the byte, then reads the whole block back through `first()`.
#[track_caller]
fn write_and_verify(allocation: &BufPoolAllocation, salt: u8) {
    let size = allocation.buffer_size();
    for (i, buffer) in allocation.iter().enumerate() {
        for j in 0..size {
            // SAFETY: byte `j` of buffer `i` is inside the block the allocation owns.
            unsafe {
                buffer
                    .add(j)
                    .write((i as u8).wrapping_mul(31) ^ (j as u8) ^ salt)
            };
        }
    }
    // SAFETY: every byte was just initialised, and the block is `allocated_bytes` long.
    let block =
        unsafe { std::slice::from_raw_parts(allocation.first(), allocation.allocated_bytes()) };
    for (k, &byte) in block.iter().enumerate() {
        let (i, j) = (k / size, k % size);
        assert_eq!(
            byte,
            (i as u8).wrapping_mul(31) ^ (j as u8) ^ salt,
            "byte {k}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Memory safety
// ---------------------------------------------------------------------------------------------

#[test]
fn buffers_are_contiguous_in_order_and_every_byte_is_usable() {
    let sizes: &[BufferSize] = if cfg!(miri) {
        &[BufferSize::S8, BufferSize::S64, BufferSize::S1024]
    } else {
        &BufferSize::ALL
    };
    for &size in sizes {
        let bytes = size.bytes();
        let pool = pool(size, 8);
        for n in [1, 3, 8] {
            let allocation = pool.try_allocate(n).unwrap();
            assert_eq!(allocation.length(), n);
            assert_eq!(allocation.buffer_size(), bytes);
            assert_eq!(allocation.allocated_bytes(), n * bytes);
            assert!(!allocation.first().is_null());
            assert_eq!(
                allocation.first() as usize % bytes.min(16),
                0,
                "alignment of {size}"
            );
            let buffers: Vec<BufferPointer> = allocation.iter().collect();
            assert_eq!(buffers.len(), n);
            assert_eq!(allocation.iter().len(), n);
            assert_eq!(buffers[0], allocation.first());
            for (i, pair) in buffers.windows(2).enumerate() {
                assert_eq!(pair[1] as usize - pair[0] as usize, bytes, "gap after {i}");
            }
            assert_eq!(
                buffers[n - 1] as usize + bytes,
                allocation.first() as usize + allocation.allocated_bytes()
            );
            for (i, &buffer) in buffers.iter().enumerate() {
                assert_eq!(allocation.buffer(i), Some(buffer));
            }
            assert_eq!(allocation.buffer(n), None);
            let backwards: Vec<BufferPointer> = allocation.iter().rev().collect();
            assert_eq!(backwards, buffers.iter().rev().copied().collect::<Vec<_>>());
            assert_eq!((&allocation).into_iter().count(), n);
            write_and_verify(&allocation, n as u8);
            assert_eq!(pool.stats().in_use_bytes, n * bytes);
        }
        assert_idle(&pool);
    }
}

#[test]
fn live_allocations_never_overlap() {
    let pool = pool(BufferSize::S32, 16);
    let allocations: Vec<_> = (1..=5).map(|n| pool.try_allocate(n).unwrap()).collect();
    for (tag, allocation) in allocations.iter().enumerate() {
        // SAFETY: each block is `allocated_bytes` writable bytes owned by its allocation.
        unsafe {
            allocation
                .first()
                .write_bytes(tag as u8 + 1, allocation.allocated_bytes())
        };
    }
    for (tag, allocation) in allocations.iter().enumerate() {
        // SAFETY: initialised just above.
        let block =
            unsafe { std::slice::from_raw_parts(allocation.first(), allocation.allocated_bytes()) };
        assert!(block.iter().all(|&b| b == tag as u8 + 1));
    }
}

#[test]
fn zeroed_allocations_are_zero_even_after_dirty_reuse() {
    watchdog(20, || {
        let pool = pool(BufferSize::S128, 4);
        for form in 0..4 {
            let dirty = pool.try_allocate(4).unwrap();
            // SAFETY: 512 writable bytes.
            unsafe { dirty.first().write_bytes(0xFF, dirty.allocated_bytes()) };
            drop(dirty);
            let zeroed = match form {
                0 => futures::executor::block_on(pool.allocate_zeroed(4)).unwrap(),
                1 => pool.allocate_zeroed_blocking(4).unwrap(),
                2 => pool
                    .allocate_zeroed_timeout(4, Duration::from_secs(1))
                    .unwrap(),
                _ => pool.try_allocate_zeroed(4).unwrap(),
            };
            // SAFETY: a zeroed block is 512 initialised bytes.
            let block = unsafe { std::slice::from_raw_parts(zeroed.first(), 512) };
            assert!(block.iter().all(|&b| b == 0), "form {form} not zeroed");
        }
    });
}

/// A pool that recycles freed blocks: reused blocks are fully usable, zeroed requests still
/// get zeros, cached blocks never count against the budget, and dropping the pool frees them.
#[test]
fn recycled_blocks_are_valid_and_zeroed_requests_still_get_zeros() {
    let pool = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64 * 16,
    })
    .recycle(2)
    .recycle_min_bytes(0)
    .build()
    .unwrap();
    for round in 0..rounds(4, 2) {
        let a = pool.try_allocate(4).unwrap();
        let b = pool.try_allocate(4).unwrap();
        write_and_verify(&a, round as u8);
        write_and_verify(&b, !(round as u8));
        drop((a, b));
        let stats = pool.stats();
        assert_eq!(stats.in_use_bytes, 0, "cached blocks are not in use");
        assert!(stats.in_use_bytes + stats.cached_bytes <= stats.max_memory);
        let zeroed = pool.try_allocate_zeroed(4).unwrap();
        // SAFETY: a zeroed allocation is 256 initialised bytes.
        let block = unsafe { std::slice::from_raw_parts(zeroed.first(), 256) };
        assert!(
            block.iter().all(|&byte| byte == 0),
            "recycled garbage in a zeroed block"
        );
        drop(zeroed);
        // The whole budget is still available, cache or not.
        let all = pool.try_allocate(16).unwrap();
        write_and_verify(&all, 0x5A);
        let stats = pool.stats();
        assert!(
            stats.in_use_bytes + stats.cached_bytes <= stats.max_memory,
            "{stats}"
        );
        drop(all);
    }
    assert_idle(&pool);
    drop(pool); // frees the cached blocks (Miri checks for leaks)
}

#[test]
fn direct_io_alignment_aligns_every_buffer() {
    for (size, align) in [
        (BufferSize::S512, 512),
        (BufferSize::S4096, 4096),
        (BufferSize::S16384, 4096),
    ] {
        let pool = BufPool::builder(BufPoolCfg {
            buffer_size: size,
            max_memory: size.bytes() * 4,
        })
        .direct_io_alignment()
        .build()
        .unwrap();
        let allocation = pool.try_allocate(3).unwrap();
        assert!(
            allocation.iter().all(|buffer| buffer as usize % align == 0),
            "{size}: buffers not aligned to {align}"
        );
        write_and_verify(&allocation, 1);
    }
}

#[test]
fn allocation_is_send_sync_static_and_at_most_three_words() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    fn send<T: Send>(_: &T) {}
    send_sync_static::<BufPoolAllocation>();
    send_sync_static::<BufPool>();
    send_sync_static::<AllocError>();
    assert!(std::mem::size_of::<BufPoolAllocation>() <= 3 * std::mem::size_of::<usize>());
    let pool = pool(BufferSize::S8, 8);
    let allocate = pool.allocate(1);
    send(&allocate);
    let drained = pool.drained();
    send(&drained);
    drop((allocate, drained));
    let error: Box<dyn std::error::Error + Send + Sync> = Box::new(AllocError::Closed);
    assert_eq!(error.to_string(), "the pool is closed");
}

#[test]
fn pool_moved_after_allocating_stays_valid_and_drops_cleanly() {
    watchdog(20, || {
        let pool = pool(BufferSize::S64, 8);
        let a = pool.try_allocate(3).unwrap();
        // Move the pool around: into a vector, out of it, through a function.
        let mut holder = vec![pool];
        let pool = holder.pop().unwrap();
        fn pass(pool: BufPool) -> BufPool {
            pool
        }
        let pool = pass(pool);
        write_and_verify(&a, 1);
        assert_eq!(pool.stats().in_use_bytes, 3 * BUF);
        let b = pool.try_allocate(5).unwrap();
        drop(a);
        assert_eq!(pool.stats().in_use_bytes, 5 * BUF);
        drop(b);
        assert_idle(&pool);
        drop(pool); // must not hang
    });
}

#[test]
fn pool_moved_out_of_a_box_keeps_allocations_valid() {
    watchdog(20, || {
        let boxed = Box::new(pool(BufferSize::S64, 8));
        let a = boxed.try_allocate(4).unwrap();
        let pool: BufPool = *boxed; // the box's memory is freed here
        write_and_verify(&a, 2);
        // A waiter on the moved pool is served by the release of `a`.
        let held = pool.try_allocate(4).unwrap();
        let mut waiter = Box::pin(pool.allocate(8));
        assert_pending(&mut waiter);
        drop(a);
        drop(held);
        let all = ready(&mut waiter).unwrap();
        write_and_verify(&all, 3);
        drop(all);
        drop(waiter);
        assert_idle(&pool);
        drop(pool);
    });
}

#[test]
fn allocations_sent_across_threads_are_valid_and_released_there() {
    watchdog(20, || {
        let pool = pool(BufferSize::S32, 12);
        let allocations: Vec<_> = (1..=3).map(|n| pool.try_allocate(n).unwrap()).collect();
        let (back_tx, back_rx) = mpsc::channel();
        let writers: Vec<_> = allocations
            .into_iter()
            .enumerate()
            .map(|(i, allocation)| {
                let back_tx = back_tx.clone();
                thread::spawn(move || {
                    write_and_verify(&allocation, i as u8);
                    back_tx.send((i, allocation)).unwrap();
                })
            })
            .collect();
        drop(back_tx);
        for writer in writers {
            writer.join().unwrap();
        }
        let mut returned: Vec<(usize, BufPoolAllocation)> = back_rx.iter().collect();
        returned.sort_by_key(|(i, _)| *i);
        // Each thread's bytes are still there after the hop back.
        for (i, allocation) in &returned {
            let size = allocation.buffer_size();
            // SAFETY: written by `write_and_verify`.
            let block = unsafe {
                std::slice::from_raw_parts(allocation.first(), allocation.allocated_bytes())
            };
            for (k, &b) in block.iter().enumerate() {
                assert_eq!(
                    b,
                    ((k / size) as u8).wrapping_mul(31) ^ ((k % size) as u8) ^ (*i as u8)
                );
            }
        }
        // Drop them on yet another thread.
        thread::spawn(move || drop(returned)).join().unwrap();
        assert_idle(&pool);
    });
}

/// The pool is dropped on thread B (blocking in the barrier) while thread C still writes
/// into live allocations and then drops them; B's drop returns only after C is done.
#[test]
fn pool_dropped_on_another_thread_while_allocations_live_on_a_third() {
    watchdog(20, || {
        let pool = pool(BufferSize::S64, 8);
        let allocations: Vec<_> = (0..3).map(|_| pool.try_allocate(2).unwrap()).collect();
        let drop_returned = Arc::new(AtomicBool::new(false));
        let last_released = Arc::new(AtomicBool::new(false));
        let (dropping_tx, dropping_rx) = mpsc::channel::<()>();
        let dropper = thread::spawn({
            let (drop_returned, last_released) = (drop_returned.clone(), last_released.clone());
            move || {
                dropping_tx.send(()).unwrap();
                drop(pool); // the barrier: blocks until C is done
                drop_returned.store(true, SeqCst);
                assert!(
                    last_released.load(SeqCst),
                    "the pool's drop returned before every allocation was back"
                );
            }
        });
        let holder = thread::spawn({
            let drop_returned = drop_returned.clone();
            move || {
                dropping_rx.recv().unwrap();
                let count = allocations.len();
                for (i, allocation) in allocations.into_iter().enumerate() {
                    // The memory stays valid while the pool's drop waits.
                    write_and_verify(&allocation, i as u8);
                    for _ in 0..rounds(200, 5) {
                        assert!(!drop_returned.load(SeqCst), "drop returned too early");
                        thread::yield_now();
                    }
                    if i + 1 == count {
                        last_released.store(true, SeqCst);
                    }
                    drop(allocation);
                }
            }
        });
        holder.join().unwrap();
        dropper.join().unwrap();
        assert!(drop_returned.load(SeqCst));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_move_between_tasks_and_threads() {
    let pool = shared_pool(8);
    let allocation = pool.allocate(4).await.unwrap();
    let allocation = tokio::spawn(async move {
        write_and_verify(&allocation, 9);
        allocation
    })
    .await
    .unwrap();
    let allocation = thread_future(move || {
        write_and_verify(&allocation, 10);
        allocation
    })
    .await;
    // The pool handle moves too, while the allocation lives.
    let pool = tokio::spawn(async move { pool }).await.unwrap();
    assert_eq!(pool.stats().in_use_bytes, 4 * BUF);
    drop(allocation);
    assert_idle(&pool);
}

// ---------------------------------------------------------------------------------------------
// 8. Shutdown
// ---------------------------------------------------------------------------------------------

/// Every entry point fails with `Closed` on a closed pool.
#[track_caller]
fn assert_all_calls_closed(pool: &BufPool) {
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
    assert_eq!(pool.try_allocate_zeroed(1).unwrap_err(), AllocError::Closed);
    assert_eq!(pool.allocate_blocking(1).unwrap_err(), AllocError::Closed);
    assert_eq!(
        pool.allocate_zeroed_blocking(1).unwrap_err(),
        AllocError::Closed
    );
    assert_eq!(
        pool.allocate_timeout(1, Duration::from_secs(60))
            .unwrap_err(),
        AllocError::Closed
    );
    assert_eq!(
        pool.allocate_zeroed_timeout(1, Duration::ZERO).unwrap_err(),
        AllocError::Closed
    );
    assert_eq!(
        err(ready(&mut Box::pin(pool.allocate(1)))),
        AllocError::Closed
    );
    assert_eq!(
        err(ready(&mut Box::pin(pool.allocate_zeroed(1)))),
        AllocError::Closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_wakes_every_async_and_blocking_waiter_with_closed() {
    let pool = shared_pool(4);
    let live = pool.try_allocate(4).unwrap();
    write_and_verify(&live, 4);
    let mut tasks = Vec::new();
    let mut threads = Vec::new();
    for i in 0..rounds(3, 1) {
        let p = pool.clone();
        tasks.push(tokio::spawn(async move { p.allocate(1 + i % 4).await }));
        let p = pool.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), p.allocate_zeroed(2))
                .await
                .unwrap()
        }));
        let p = pool.clone();
        threads.push(thread_future(move || p.allocate_blocking(3)));
        let p = pool.clone();
        threads.push(thread_future(move || {
            p.allocate_zeroed_timeout(1, Duration::from_secs(60))
        }));
    }
    let expected = tasks.len() + threads.len();
    wait_waiting_async(&pool, expected).await;
    assert!(!pool.is_closed());
    pool.close();
    assert!(pool.is_closed());
    within(10, async {
        for task in tasks {
            assert_eq!(err(task.await.unwrap()), AllocError::Closed);
        }
        for thread in threads {
            assert_eq!(err(thread.await), AllocError::Closed);
        }
    })
    .await;
    let stats = pool.stats();
    assert_eq!(
        (stats.waiting, stats.closed, stats.in_use_bytes),
        (0, true, 4 * BUF)
    );
    // The live allocation stays valid and gives its bytes back as usual.
    write_and_verify(&live, 5);
    assert_all_calls_closed(&pool);
    drop(live);
    assert_idle(&pool);
    assert_all_calls_closed(&pool);
}

#[test]
fn close_wakes_every_blocking_waiter_without_a_runtime() {
    watchdog(20, || {
        let pool = shared_pool(2);
        let live = pool.try_allocate(2).unwrap();
        let waiters: Vec<_> = (0..4)
            .map(|i| {
                let p = pool.clone();
                let waiter = thread::spawn(move || match i {
                    0 => p.allocate_blocking(1),
                    1 => p.allocate_zeroed_blocking(2),
                    2 => p.allocate_timeout(1, Duration::from_secs(60)),
                    _ => p.allocate_zeroed_timeout(2, Duration::MAX),
                });
                wait_waiting(&pool, i + 1);
                waiter
            })
            .collect();
        pool.close();
        pool.close(); // twice is harmless
        for waiter in waiters {
            assert_eq!(err(waiter.join().unwrap()), AllocError::Closed);
        }
        assert_eq!(pool.stats().waiting, 0);
        drop(live);
        assert_idle(&pool);
    });
}

/// Bytes handed to a future before `close` are still counted once, whatever it returns.
#[test]
fn close_after_grant_keeps_the_budget_consistent() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let mut granted = Box::pin(pool.allocate(2));
    assert_pending(&mut granted);
    drop(held); // granted, not yet picked up
    pool.close();
    match ready(&mut granted) {
        Ok(allocation) => {
            assert_eq!(pool.stats().outstanding, 1);
            drop(allocation);
        }
        Err(error) => assert_eq!(error, AllocError::Closed),
    }
    drop(granted);
    assert_idle(&pool);
}

/// `Drop` closes the pool and blocks until every allocation is back, proved by ordering
/// (atomics and a channel), not by timing.
#[test]
fn drop_blocks_until_every_allocation_is_back() {
    watchdog(20, || {
        for _ in 0..rounds(20, 2) {
            let pool = pool(BufferSize::S64, 4);
            let allocations: Vec<_> = (0..4).map(|_| pool.try_allocate(1).unwrap()).collect();
            let released = Arc::new(AtomicUsize::new(0));
            let drop_returned = Arc::new(AtomicBool::new(false));
            let (start_tx, start_rx) = mpsc::channel::<()>();
            let holder = thread::spawn({
                let (released, drop_returned) = (released.clone(), drop_returned.clone());
                move || {
                    start_rx.recv().unwrap();
                    for allocation in allocations {
                        assert!(!drop_returned.load(SeqCst), "drop returned too early");
                        released.fetch_add(1, SeqCst);
                        drop(allocation);
                        thread::yield_now();
                    }
                }
            });
            start_tx.send(()).unwrap();
            drop(pool);
            drop_returned.store(true, SeqCst);
            assert_eq!(released.load(SeqCst), 4);
            holder.join().unwrap();
        }
    });
}

#[test]
fn drop_of_idle_or_closed_pool_returns_at_once() {
    watchdog(10, || {
        drop(pool(BufferSize::S8, 1));
        let pool2 = pool(BufferSize::S8, 1);
        drop(pool2.try_allocate(1).unwrap());
        pool2.close();
        drop(pool2);
    });
}

#[test]
fn drop_waits_for_an_allocation_held_by_an_async_task() {
    watchdog(20, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pool = pool(BufferSize::S64, 2);
        let allocation = pool.try_allocate(2).unwrap();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(AtomicBool::new(false));
        let task = runtime.spawn({
            let released = released.clone();
            async move {
                go_rx.await.unwrap();
                released.store(true, SeqCst);
                drop(allocation);
            }
        });
        let dropper = thread::spawn({
            let released = released.clone();
            move || {
                drop(pool);
                assert!(released.load(SeqCst), "drop returned before the release");
            }
        });
        go_tx.send(()).unwrap();
        dropper.join().unwrap();
        runtime.block_on(task).unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_resolves_only_when_the_last_allocation_is_dropped() {
    let pool = shared_pool(8);
    // Idle pool: drained at once, and it does not close the pool.
    within(10, pool.drained()).await;
    assert!(!pool.is_closed());

    let mut allocations: Vec<_> = (0..3).map(|_| pool.try_allocate(2).unwrap()).collect();
    let mut drained = Box::pin(pool.drained());
    assert!(futures::poll!(drained.as_mut()).is_pending());
    // Release two of three on other threads: still not drained.
    for _ in 0..2 {
        let allocation = allocations.pop().unwrap();
        thread_future(move || drop(allocation)).await;
        assert!(futures::poll!(drained.as_mut()).is_pending());
    }
    let last = allocations.pop().unwrap();
    let released = Arc::new(AtomicBool::new(false));
    let releaser = thread_future({
        let released = released.clone();
        move || {
            released.store(true, SeqCst);
            drop(last);
        }
    });
    within(10, drained).await;
    assert!(released.load(SeqCst));
    releaser.await;
    assert_idle(&pool);
    // Not closed: the pool is still usable.
    assert!(!pool.is_closed());
    drop(pool.allocate(8).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_wakes_every_listener() {
    let pool = shared_pool(4);
    let allocation = pool.try_allocate(4).unwrap();
    let listeners: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.drained().await })
        })
        .collect();
    // Let each listener register: drained is cancel safe, so a listener that has not been
    // polled yet is fine too; the point is that the one release wakes them all.
    tokio::task::yield_now().await;
    pool.close();
    drop(allocation);
    within(10, async {
        for listener in listeners {
            listener.await.unwrap();
        }
    })
    .await;
    assert_idle(&pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_and_waits_for_every_allocation() {
    // Idle pool: completes at once.
    within(10, pool(BufferSize::S64, 2).shutdown()).await;

    let pool = pool(BufferSize::S64, 4);
    let allocations: Vec<_> = (0..2).map(|_| pool.try_allocate(2).unwrap()).collect();
    let released = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let releaser = thread_future({
        let released = released.clone();
        move || {
            go_rx.recv().unwrap();
            for allocation in allocations {
                released.fetch_add(1, SeqCst);
                drop(allocation);
            }
        }
    });
    let mut shutdown = Box::pin(pool.shutdown());
    assert!(futures::poll!(shutdown.as_mut()).is_pending());
    go_tx.send(()).unwrap();
    within(10, shutdown).await;
    assert_eq!(released.load(SeqCst), 2);
    releaser.await;
}

#[test]
fn shutdown_timeout_reports_outstanding_then_drains() {
    watchdog(20, || {
        let pool = shared_pool(4);
        let held = pool.try_allocate(3).unwrap();
        let report = pool.shutdown_timeout(Duration::from_millis(10));
        assert!(report.closed);
        assert_eq!((report.outstanding, report.in_use_bytes), (1, 3 * BUF));
        assert_all_calls_closed(&pool);

        // Released by another thread while shutdown_timeout waits: it returns early.
        let releaser = thread::spawn({
            let pool = pool.clone();
            move || {
                assert!(pool.is_closed());
                drop(held);
            }
        });
        let start = Instant::now();
        let report = pool.shutdown_timeout(Duration::from_secs(60));
        assert!(start.elapsed() < Duration::from_secs(30) * SLOWDOWN);
        assert_eq!((report.outstanding, report.in_use_bytes), (0, 0));
        releaser.join().unwrap();
        assert_idle(&pool);
    });
}

#[test]
fn try_new_and_drop_many_pools_across_threads() {
    watchdog(20, || {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                thread::spawn(move || {
                    for _ in 0..rounds(200, 3) {
                        let pool = BufPool::try_new(BufPoolCfg {
                            buffer_size: BufferSize::S16,
                            max_memory: 16 * (i + 1),
                        })
                        .unwrap();
                        let allocation = pool.try_allocate(i + 1).unwrap();
                        let pool = thread::spawn(move || {
                            drop(allocation);
                            pool
                        })
                        .join()
                        .unwrap();
                        drop(pool);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    });
}

/// The pool dropped while another thread drops the last allocation, at every phase of the
/// budget word's release counter (the release that wraps it takes the slow path): every drop
/// returns, and under Miri no release touches the pool after it is freed.
#[test]
fn pool_drop_races_last_release_at_every_counter_phase() {
    watchdog(60, || {
        let phases: Vec<usize> = if cfg!(miri) {
            vec![0, 62, 63, 64]
        } else {
            (0..130).collect()
        };
        for phase in phases {
            let pool = pool(BufferSize::S64, 2);
            for _ in 0..phase {
                drop(pool.try_allocate(1).unwrap());
            }
            let allocation = pool.try_allocate(2).unwrap();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let releaser = thread::spawn(move || {
                go_rx.recv().unwrap();
                drop(allocation);
            });
            go_tx.send(()).unwrap();
            drop(pool);
            releaser.join().unwrap();
        }
    });
}
