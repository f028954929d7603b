//! Issue 5: safe byte access without undefined behaviour, zeroed allocations, direct-I/O
//! alignment (with a real `O_DIRECT` round trip where the filesystem supports it) and block
//! recycling within the budget. These run under Miri too (the `O_DIRECT` test is skipped
//! there: Miri has no such file I/O).

mod common;

use std::io::{IoSlice, Write};
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::thread;

use common::{rounds, watchdog};
use membudget::{BufPool, BufPoolCfg, BufferSize};

fn pool(buffer_size: BufferSize, buffers: usize) -> BufPool {
    BufPool::new(BufPoolCfg {
        buffer_size,
        max_memory: buffer_size.bytes() * buffers,
    })
}

#[test]
fn writes_through_every_buffer_read_back_exactly() {
    let pool = pool(BufferSize::S16, 8);
    let mut allocation = pool.try_allocate(8).unwrap();
    for (i, buffer) in allocation.buffers_uninit_mut().enumerate() {
        for (j, byte) in buffer.iter_mut().enumerate() {
            byte.write((i * 16 + j) as u8);
        }
    }
    // Raw pointers see the same bytes, buffer_size apart and contiguous.
    let pointers: Vec<_> = allocation.iter().collect();
    for (i, pointer) in pointers.iter().enumerate() {
        assert_eq!(*pointer as usize, allocation.first() as usize + i * 16);
        // SAFETY: every byte was written above; `pointer` is inside the allocation.
        assert_eq!(unsafe { pointer.add(5).read() }, (i * 16 + 5) as u8);
    }
    let mut filled = allocation.into_filled();
    assert!(
        filled.filled().is_empty(),
        "writes via the uninit view are not assumed"
    );
    assert!(
        !filled.set_filled(1),
        "the cursor never exposes bytes it did not see written"
    );
    filled.fill(0xEE, 128);
    assert_eq!(filled.filled(), &[0xEE; 128][..]);
}

#[test]
fn cursor_tracks_what_was_written_and_stops_at_capacity() {
    let pool = pool(BufferSize::S8, 4);
    let mut filled = pool.try_allocate(3).unwrap().into_filled();
    assert_eq!((filled.capacity(), filled.remaining()), (24, 24));
    filled.write_all(b"0123456789").unwrap();
    assert_eq!(&filled[..], b"0123456789");
    assert_eq!(
        filled.buffers().collect::<Vec<_>>(),
        [&b"01234567"[..], &b"89"[..]]
    );
    // Vectored writes into it stop where it is full.
    let written = filled
        .write_vectored(&[IoSlice::new(b"abcdefgh"), IoSlice::new(b"ijklmnop")])
        .unwrap();
    assert_eq!(written, 14);
    assert_eq!(filled.remaining(), 0);
    assert_eq!(filled.write(b"x").unwrap(), 0);
    assert_eq!(
        filled.write_all(b"x").unwrap_err().kind(),
        std::io::ErrorKind::WriteZero
    );
    // clear keeps the memory initialised: set_filled may expose it again.
    filled.clear();
    assert!(filled.set_filled(24));
    assert_eq!(&filled[..10], b"0123456789");
    assert!(!filled.set_filled(25));
    // Overwrite inside the initialised part, then the budget comes back on drop.
    filled.clear();
    filled.extend_from_slice(b"XY");
    filled.filled_mut()[1] = b'Z';
    assert_eq!(&filled[..], b"XZ");
    let allocation = filled.into_allocation();
    assert_eq!(allocation.length(), 3);
    drop(allocation);
    assert_eq!(pool.stats().in_use_bytes, 0);
}

#[test]
fn io_slices_write_the_filled_buffers_in_order() {
    let pool = pool(BufferSize::S16, 16);
    let mut filled = pool.try_allocate(4).unwrap().into_filled();
    let payload: Vec<u8> = (0..50u8).collect();
    filled.extend_from_slice(&payload);
    let slices = filled.io_slices();
    assert_eq!(
        slices.iter().map(|s| s.len()).collect::<Vec<_>>(),
        [16, 16, 16, 2]
    );
    let mut sink = Vec::new();
    let mut remaining: &mut [IoSlice<'_>] = &mut filled.io_slices();
    while !remaining.is_empty() {
        let n = sink.write_vectored(remaining).unwrap();
        IoSlice::advance_slices(&mut remaining, n);
    }
    assert_eq!(sink, payload);
}

#[test]
fn zeroed_forms_hand_out_zeros_even_after_dirty_reuse() {
    let pool = Arc::new(pool(BufferSize::S64, 64));
    for _ in 0..rounds(50, 5) {
        // Dirty the allocator's free lists with non-zero bytes of the same size.
        let mut dirty = pool.try_allocate(16).unwrap();
        dirty.uninit_mut().fill(MaybeUninit::new(0xFF));
        drop(dirty);
        let forms = [
            pool.try_allocate_zeroed(16).unwrap(),
            pool.allocate_zeroed_blocking(16).unwrap(),
            pool.allocate_zeroed_timeout(16, std::time::Duration::from_secs(1))
                .unwrap(),
            futures::executor::block_on(pool.allocate_zeroed(16)).unwrap(),
        ];
        for allocation in forms {
            let mut filled = allocation.into_filled();
            assert!(filled.set_filled(1024));
            assert!(filled.iter().all(|&byte| byte == 0));
        }
    }
}

#[test]
fn default_alignment_is_min_of_buffer_size_and_16() {
    for size in BufferSize::ALL {
        let pool = pool(size, 4);
        for n in 1..=3 {
            let allocation = pool.try_allocate(n).unwrap();
            let align = size.bytes().min(16);
            assert!(
                allocation.iter().all(|b| b as usize % align == 0),
                "{size:?}"
            );
        }
    }
}

#[test]
fn direct_io_alignment_is_min_of_buffer_size_and_4096() {
    for size in BufferSize::ALL {
        let pool = BufPool::builder(BufPoolCfg {
            buffer_size: size,
            max_memory: size.bytes() * 8,
        })
        .direct_io_alignment()
        .build()
        .unwrap();
        for n in [1, 3, 8] {
            let allocation = pool.try_allocate(n).unwrap();
            let align = size.bytes().min(4096);
            assert!(
                allocation.iter().all(|b| b as usize % align == 0),
                "{size:?}"
            );
        }
    }
}

/// A real `O_DIRECT` write and read-back through pool buffers. tmpfs (and Miri) cannot do
/// `O_DIRECT`: the test then says so and passes without checking.
#[test]
#[cfg(target_os = "linux")]
fn o_direct_round_trip_where_supported() {
    use std::fs::OpenOptions;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    if cfg!(miri) {
        eprintln!("o_direct: SKIPPED (Miri has no O_DIRECT file I/O)");
        return;
    }
    const O_DIRECT: i32 = 0o40000; // x86-64 and aarch64 Linux
    let pool = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S4096,
        max_memory: 4096 * 16,
    })
    .direct_io_alignment()
    .build()
    .unwrap();
    // The target dir is on the project's disk, unlike /tmp, which may be tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("direct.bin");
    let mut file = match OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) => {
            eprintln!("o_direct: SKIPPED (the filesystem refuses O_DIRECT: {error})");
            return;
        }
    };
    let mut out = pool.try_allocate(4).unwrap().into_filled();
    let pattern: Vec<u8> = (0..4 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    out.extend_from_slice(&pattern);
    match file.write_all(&out) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(22) => {
            eprintln!("o_direct: SKIPPED (EINVAL on an aligned write: no O_DIRECT support here)");
            return;
        }
        Err(error) => panic!("O_DIRECT write failed: {error}"),
    }
    drop(out);
    let mut back = pool.try_allocate(4).unwrap();
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(O_DIRECT)
        .open(&path)
        .unwrap();
    let mut filled = 0;
    {
        // Reading needs a plain `&mut [u8]`: zero it first through the safe cursor.
        let mut zeroed = back.into_filled();
        zeroed.fill(0, 4 * 4096);
        let mut view = zeroed;
        while filled < 4 * 4096 {
            let n = reader.read(&mut view.filled_mut()[filled..]).unwrap();
            assert!(n > 0, "short O_DIRECT file");
            filled += n;
        }
        assert_eq!(&view[..], &pattern[..]);
        back = view.into_allocation();
    }
    drop(back);
    eprintln!("o_direct: checked a {filled}-byte O_DIRECT write and read-back");
}

#[test]
fn recycled_blocks_are_reused_and_bounded_per_size() {
    let cfg = BufPoolCfg {
        buffer_size: BufferSize::S4096,
        max_memory: 4096 * 64,
    };
    let pool = BufPool::builder(cfg)
        .recycle(2)
        .recycle_min_bytes(4096 * 4)
        .build()
        .unwrap();
    // Below the minimum size: never cached.
    drop(pool.try_allocate(2).unwrap());
    assert_eq!(pool.stats().cached_bytes, 0);
    // At most two blocks of a size are kept.
    let blocks: Vec<_> = (0..3).map(|_| pool.try_allocate(4).unwrap()).collect();
    let addresses: Vec<_> = blocks.iter().map(|b| b.first() as usize).collect();
    drop(blocks);
    let stats = pool.stats();
    assert_eq!(stats.cached_bytes, 2 * 4 * 4096);
    assert_eq!(stats.in_use_bytes, 0, "cached blocks are not in use");
    let again = pool.try_allocate(4).unwrap();
    assert!(addresses.contains(&(again.first() as usize)));
    assert_eq!(pool.stats().cached_bytes, 4 * 4096);
}

#[test]
fn recycling_never_causes_a_wait_and_keeps_the_footprint_within_budget() {
    let cfg = BufPoolCfg {
        buffer_size: BufferSize::S4096,
        max_memory: 4096 * 16,
    };
    let pool = BufPool::builder(cfg)
        .recycle(8)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    // Fill the cache with 12 buffers' worth of 4-buffer blocks (3 blocks).
    let blocks: Vec<_> = (0..3).map(|_| pool.try_allocate(4).unwrap()).collect();
    drop(blocks);
    assert_eq!(pool.stats().cached_bytes, 12 * 4096);
    // A request of another size that needs the whole budget is served at once: the cache
    // is evicted, not waited for.
    let whole = pool
        .try_allocate(16)
        .expect("cached blocks never make a request wait");
    let stats = pool.stats();
    assert!(
        stats.in_use_bytes + stats.cached_bytes <= cfg.max_memory,
        "footprint {} + {} above the budget",
        stats.in_use_bytes,
        stats.cached_bytes
    );
    assert_eq!(stats.cached_bytes, 0);
    drop(whole);
}

#[test]
fn recycling_under_concurrency_stays_within_budget() {
    watchdog(60, || {
        let cfg = BufPoolCfg {
            buffer_size: BufferSize::S1024,
            max_memory: 1024 * 32,
        };
        let pool = Arc::new(
            BufPool::builder(cfg)
                .recycle(4)
                .recycle_min_bytes(0)
                .build()
                .unwrap(),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let pool = pool.clone();
                thread::spawn(move || {
                    for i in 0..rounds(2000, 20) {
                        let n = 1 + (i * 7 + t * 3) % 8;
                        let mut allocation = pool.allocate_blocking(n).unwrap();
                        allocation.uninit_mut()[0].write(1);
                        let stats = pool.stats();
                        assert!(stats.peak_in_use_bytes <= cfg.max_memory);
                        drop(allocation);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let stats = pool.stats();
        assert_eq!((stats.in_use_bytes, stats.outstanding), (0, 0));
        assert!(stats.cached_bytes <= cfg.max_memory);
    });
}
