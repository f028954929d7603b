//! Issue 12: filled allocations in I/O. `read_from` (any `std::io::Read`, no feature needed)
//! and, with the `bytes` feature, `BufMut` (so tokio's `read_buf` reads into pooled memory)
//! and `freeze` into `Bytes`, whose clones and slices keep the budget reserved until the last
//! one drops. The socket test is skipped under Miri; everything else runs there.

mod common;

use std::io::{self, Read};

use common::*;
use membudget::{BufferSize, FilledAllocation};

const BUF: usize = 16;

/// A filled allocation of `n` buffers from `pool`.
fn filled(pool: &membudget::BufPool, n: usize) -> FilledAllocation {
    pool.try_allocate(n).unwrap().into_filled()
}

/// `len` bytes that differ from their neighbours, so misplaced bytes show.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---- read_from: std::io::Read, no feature ----

#[test]
fn read_from_reads_once_into_the_unfilled_part() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 3);
    filled.extend_from_slice(b"head:");
    let data = pattern(100, 7);
    let mut source: &[u8] = &data;
    // `&[u8]` reads as much as is offered: the whole unfilled part, across the buffers.
    assert_eq!(filled.read_from(&mut source).unwrap(), 3 * BUF - 5);
    assert_eq!(&filled[..5], b"head:");
    assert_eq!(&filled[5..], &data[..3 * BUF - 5]);
    assert_eq!(filled.remaining(), 0);
}

#[test]
fn read_from_at_eof_is_ok_zero_and_fills_nothing() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 2);
    filled.extend_from_slice(b"abc");
    let mut empty: &[u8] = &[];
    assert_eq!(filled.read_from(&mut empty).unwrap(), 0);
    assert_eq!(filled.filled(), b"abc");
    assert_eq!(filled.remaining(), 2 * BUF - 3);
}

/// A reader that must not be called.
struct Untouchable;

impl Read for Untouchable {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        panic!("read_from called the reader on a full allocation")
    }
}

#[test]
fn read_from_when_full_is_ok_zero_without_calling_the_reader() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 2);
    filled.fill(b'x', 2 * BUF);
    assert_eq!(filled.read_from(&mut Untouchable).unwrap(), 0);
    assert_eq!(filled.filled(), &[b'x'; 2 * BUF]);
}

/// Returns `Interrupted` `times` times, then reads from `data`.
struct InterruptedFirst<'a> {
    times: usize,
    calls: usize,
    data: &'a [u8],
}

impl Read for InterruptedFirst<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.times > 0 {
            self.times -= 1;
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.data.read(buf)
    }
}

#[test]
fn read_from_retries_interrupted() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 1);
    let mut reader = InterruptedFirst {
        times: 2,
        calls: 0,
        data: b"after two interruptions",
    };
    assert_eq!(filled.read_from(&mut reader).unwrap(), BUF);
    assert_eq!(reader.calls, 3);
    assert_eq!(filled.filled(), b"after two interr");
}

#[test]
fn read_from_returns_other_errors_with_nothing_filled() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf[0] = b'!'; // scribbles, then fails: nothing may count as filled
            Err(io::ErrorKind::ConnectionReset.into())
        }
    }
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 1);
    filled.extend_from_slice(b"ok");
    let error = filled.read_from(&mut Broken).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(filled.filled(), b"ok");
}

/// Claims to have read more than it was given (a buggy reader).
struct OverReporting {
    by: usize,
}

impl Read for OverReporting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        buf.fill(b'?');
        Ok(buf.len() + self.by)
    }
}

#[test]
fn read_from_rejects_a_reader_that_over_reports() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 2);
    filled.extend_from_slice(b"kept");
    for by in [1, 1000, usize::MAX - 2 * BUF] {
        let error = filled.read_from(&mut OverReporting { by }).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(filled.filled(), b"kept", "nothing counted as filled");
        assert_eq!(filled.remaining(), 2 * BUF - 4);
    }
    // The allocation is still usable, and the budget comes back.
    let mut rest: &[u8] = b"more";
    assert_eq!(filled.read_from(&mut rest).unwrap(), 4);
    assert_eq!(filled.filled(), b"keptmore");
    drop(filled);
    assert_full_budget_back(&pool);
}

/// Records what the reader was shown, then reads nothing.
struct Inspector {
    seen: Vec<u8>,
}

impl Read for Inspector {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.seen = buf.to_vec(); // under Miri, reading uninitialised bytes here is an error
        Ok(0)
    }
}

#[test]
fn read_from_shows_the_reader_zeros_for_fresh_memory() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 3);
    filled.extend_from_slice(b"abc");
    let mut inspector = Inspector { seen: Vec::new() };
    assert_eq!(filled.read_from(&mut inspector).unwrap(), 0);
    assert_eq!(inspector.seen, vec![0; 3 * BUF - 3]);
}

#[test]
fn read_from_never_rezeroes_initialised_bytes() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = filled(&pool, 2);
    filled.extend_from_slice(b"written before");
    filled.clear(); // forgotten, but still initialised: the reader sees the old bytes
    let mut inspector = Inspector { seen: Vec::new() };
    filled.read_from(&mut inspector).unwrap();
    assert_eq!(&inspector.seen[..14], b"written before");
    assert_eq!(&inspector.seen[14..], &[0; 2 * BUF - 14]);

    // The zeros handed out once count as initialised too: written over, then seen again.
    let mut source: &[u8] = &[0xEE; 2 * BUF];
    assert_eq!(filled.read_from(&mut source).unwrap(), 2 * BUF);
    filled.clear();
    filled.read_from(&mut inspector).unwrap();
    assert_eq!(inspector.seen, vec![0xEE; 2 * BUF]);
}

#[test]
fn read_from_keeps_the_zeros_of_a_zeroed_allocation_readable() {
    let pool = pool(BufferSize::S16, 4);
    let mut filled = pool.try_allocate_zeroed(2).unwrap().into_filled();
    let mut source: &[u8] = b"12345";
    assert_eq!(filled.read_from(&mut source).unwrap(), 5);
    assert!(filled.set_filled(2 * BUF));
    assert_eq!(&filled[..5], b"12345");
    assert_eq!(&filled[5..], &[0; 2 * BUF - 5]);
}

// ---- bytes: BufMut and freeze ----

#[cfg(feature = "bytes")]
mod with_bytes {
    use super::*;

    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::thread;

    use bytes::{BufMut, Bytes};
    use futures::FutureExt;

    #[test]
    fn chunk_mut_offers_the_whole_remaining_capacity() {
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 5);
        assert_eq!(filled.remaining_mut(), 5 * BUF);
        assert_eq!(filled.chunk_mut().len(), 5 * BUF, "five buffers, not one");
        filled.put_slice(&pattern(BUF + 3, 1));
        assert_eq!(filled.remaining_mut(), 4 * BUF - 3);
        assert_eq!(filled.chunk_mut().len(), 4 * BUF - 3);
        filled.put_bytes(b'z', 4 * BUF - 3);
        assert_eq!(filled.remaining_mut(), 0);
        assert!(!filled.has_remaining_mut());
        assert_eq!(
            filled.chunk_mut().len(),
            0,
            "empty exactly when nothing remains"
        );
        // `clear` makes the whole allocation writable again.
        filled.clear();
        assert_eq!(filled.chunk_mut().len(), 5 * BUF);
    }

    #[test]
    fn put_slice_lands_in_order_across_buffer_boundaries() {
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 4);
        let data = pattern(4 * BUF, 9);
        // Pieces of 7 never line up with the 16-byte buffers.
        for piece in data.chunks(7) {
            filled.put_slice(piece);
        }
        assert_eq!(filled.filled(), &data[..]);
        let buffers: Vec<&[u8]> = filled.buffers().collect();
        assert_eq!(buffers.len(), 4);
        for (i, buffer) in buffers.iter().enumerate() {
            assert_eq!(*buffer, &data[i * BUF..(i + 1) * BUF]);
        }
        // Typed puts straddle a boundary too.
        let mut filled = super::filled(&pool, 2);
        filled.put_slice(&[0; BUF - 2]);
        filled.put_u32(0x0102_0304);
        assert_eq!(&filled[BUF - 2..], &[1, 2, 3, 4]);
    }

    #[test]
    fn put_slice_past_the_end_panics_without_writing() {
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 2);
        filled.put_slice(b"0123456789");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            filled.put_slice(&[b'!'; 2 * BUF - 9]);
        }));
        assert!(result.is_err(), "bytes specifies a panic");
        assert_eq!(filled.filled(), b"0123456789", "nothing written or counted");
        assert_eq!(filled.remaining_mut(), 2 * BUF - 10);
        drop(filled);
        assert_full_budget_back(&pool);
    }

    #[test]
    fn advance_mut_past_the_end_panics() {
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 1);
        filled.chunk_mut().copy_from_slice(&[7; BUF]);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: all `BUF` bytes of the chunk were written; `BUF + 1` is the bug the
            // panic catches before anything is counted.
            unsafe { filled.advance_mut(BUF + 1) };
        }));
        assert!(result.is_err());
        assert!(filled.filled().is_empty());
        // SAFETY: as above, `BUF` bytes were written; advancing by 0 is a no-op.
        unsafe {
            filled.advance_mut(0);
            filled.advance_mut(BUF);
        }
        assert_eq!(filled.filled(), &[7; BUF]);
    }

    #[test]
    fn bytes_written_through_chunk_mut_count_as_initialised() {
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 3);
        let data = pattern(BUF + 5, 3);
        filled.chunk_mut()[..data.len()].copy_from_slice(&data);
        // SAFETY: the first `data.len()` bytes of the chunk were just written.
        unsafe { filled.advance_mut(data.len()) };
        assert_eq!(filled.filled(), &data[..]);
        // Forgotten but initialised: `set_filled` may reach exactly what was written.
        filled.clear();
        assert!(!filled.set_filled(data.len() + 1));
        assert!(filled.set_filled(data.len()));
        assert_eq!(filled.filled(), &data[..]);
        // And `read_from` does not zero them again.
        filled.clear();
        let mut inspector = Inspector { seen: Vec::new() };
        filled.read_from(&mut inspector).unwrap();
        assert_eq!(&inspector.seen[..data.len()], &data[..]);
        assert_eq!(&inspector.seen[data.len()..], &[0; 3 * BUF - BUF - 5]);
    }

    #[test]
    fn writes_over_the_initialised_part_stay_in_order() {
        // Filled, cleared, then written through `BufMut` again: the chunk starts at the
        // cursor, over bytes that were initialised before.
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 2);
        filled.fill(b'o', 2 * BUF);
        filled.clear();
        filled.put_slice(b"new");
        assert_eq!(filled.filled(), b"new");
        assert!(filled.set_filled(2 * BUF), "the old bytes stay initialised");
        assert_eq!(&filled[3..], &[b'o'; 2 * BUF - 3]);
    }

    #[test]
    fn tokio_read_buf_reads_into_the_allocation() {
        // An in-memory `AsyncRead`, so this runs under Miri: tokio's `read_buf` goes through
        // `chunk_mut` and `advance_mut`.
        use tokio::io::AsyncReadExt;
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 4);
        let data = pattern(3 * BUF + 1, 5);
        let mut source: &[u8] = &data;
        let read =
            futures::executor::block_on(AsyncReadExt::read_buf(&mut source, &mut filled)).unwrap();
        assert_eq!(read, data.len(), "one read across four buffers");
        assert_eq!(filled.filled(), &data[..]);
        let read =
            futures::executor::block_on(AsyncReadExt::read_buf(&mut source, &mut filled)).unwrap();
        assert_eq!(read, 0, "eof");
    }

    #[test]
    fn freeze_views_the_filled_part_without_copying() {
        let pool = pool(BufferSize::S16, 8);
        let mut filled = filled(&pool, 4);
        filled.put_slice(b"only this");
        let start = filled.filled().as_ptr();
        let frozen = filled.freeze();
        assert_eq!(frozen, &b"only this"[..]);
        assert_eq!(frozen.as_ptr(), start, "zero-copy");
        assert_eq!(pool.stats().in_use_bytes, 4 * BUF, "the whole allocation");

        let mut filled = super::filled(&pool, 1);
        filled.put_slice(b"from");
        let from: Bytes = filled.into();
        assert_eq!(from, &b"from"[..]);
        drop((frozen, from));
        assert_full_budget_back(&pool);
    }

    #[test]
    fn freeze_of_an_empty_allocation_still_holds_its_budget() {
        let pool = pool(BufferSize::S16, 2);
        let frozen = filled(&pool, 2).freeze();
        assert!(frozen.is_empty());
        assert_eq!(pool.stats().in_use_bytes, 2 * BUF);
        drop(frozen);
        assert_full_budget_back(&pool);
    }

    #[test]
    fn clones_and_slices_hold_the_budget_until_the_last_drops() {
        watchdog(20, || {
            let pool = shared_pool(4); // 64-byte buffers
            let mut filled = pool.try_allocate(4).unwrap().into_filled();
            filled.put_slice(&pattern(200, 2));
            let frozen = filled.freeze();
            let clone = frozen.clone();
            let slice = frozen.slice(10..20);
            let tail = clone.slice(150..);

            // A blocking waiter for the whole budget, on another thread.
            let waiter = thread::spawn({
                let pool = pool.clone();
                move || pool.allocate_blocking(4).map(|a| a.length())
            });
            wait_waiting(&pool, 1);

            drop(frozen);
            drop(clone);
            drop(tail);
            // Only `slice` is left, and it still holds all four buffers.
            let stats = pool.stats();
            assert_eq!((stats.in_use_bytes, stats.waiting), (4 * 64, 1), "{stats}");
            assert!(!waiter.is_finished());
            assert_eq!(&slice[..], &pattern(200, 2)[10..20]);

            drop(slice);
            assert_eq!(waiter.join().unwrap().unwrap(), 4);
            assert_full_budget_back(&pool);
        });
    }

    #[test]
    fn an_allocate_future_proceeds_only_after_the_last_slice_drops() {
        watchdog(20, || {
            let pool = pool(BufferSize::S64, 4);
            let mut filled = pool.try_allocate(3).unwrap().into_filled();
            filled.put_slice(b"kept alive by its slices");
            let frozen = filled.freeze();
            let (left, right) = (frozen.slice(..4), frozen.slice(4..));
            drop(frozen);

            let mut waiter = pin!(pool.allocate(2));
            assert_pending(&mut waiter);
            drop(left);
            assert_pending(&mut waiter);
            assert_eq!(pool.stats().in_use_bytes, 3 * 64);
            drop(right);
            let allocation = ready(&mut waiter).unwrap();
            assert_eq!(allocation.length(), 2);
        });
    }

    #[test]
    fn bytes_dropped_on_other_threads_return_the_budget() {
        watchdog(20, || {
            let pool = shared_pool(8);
            let rounds = rounds(200, 10);
            let dropped = std::sync::Arc::new(AtomicUsize::new(0));
            for round in 0..rounds {
                let mut filled = pool.try_allocate(1 + round % 8).unwrap().into_filled();
                filled.put_bytes(round as u8, filled.remaining_mut());
                let frozen = filled.freeze();
                let len = frozen.len();
                // Three owners on three threads; whichever drops last gives the bytes back.
                let threads: Vec<_> = [frozen.clone(), frozen.slice(len / 2..), frozen]
                    .into_iter()
                    .map(|piece| {
                        let dropped = dropped.clone();
                        thread::spawn(move || {
                            assert!(piece.iter().all(|&b| b == round as u8));
                            drop(piece);
                            dropped.fetch_add(1, SeqCst);
                        })
                    })
                    .collect();
                for thread in threads {
                    thread.join().unwrap();
                }
                assert_idle(&pool);
            }
            assert_eq!(dropped.load(SeqCst), 3 * rounds);
            assert_full_budget_back(&pool);
        });
    }

    #[test]
    fn bytes_outliving_the_pool_handle_keep_the_memory_valid() {
        // The pool is moved to another thread and dropped there; its drop waits for the
        // `Bytes`, which is read and dropped here meanwhile.
        watchdog(20, || {
            let pool = pool(BufferSize::S64, 2);
            let mut filled = pool.try_allocate(2).unwrap().into_filled();
            filled.put_slice(&pattern(128, 4));
            let frozen = filled.freeze();
            let dropper = thread::spawn(move || drop(pool));
            thread::sleep(std::time::Duration::from_millis(if cfg!(miri) {
                1
            } else {
                20
            }));
            assert_eq!(&frozen[..], &pattern(128, 4)[..]);
            drop(frozen);
            dropper.join().unwrap();
        });
    }

    /// Loopback sockets: a source writes a stream, a relay reads it with `read_buf` into
    /// pooled allocations, freezes each and `write_all`s it on to a sink, which compares.
    #[cfg_attr(miri, ignore = "sockets are not supported under Miri")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_read_buf_freeze_write_all_round_trip() {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        within(30, async {
            const STREAM: usize = 3 << 20;
            let data = Arc::new(pattern(STREAM, 11));
            let pool = Arc::new(membudget::BufPool::new(membudget::BufPoolCfg {
                buffer_size: BufferSize::S4096,
                max_memory: 64 << 10, // four allocations of 16 KiB in flight at most
            }));

            let inbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let inbound_addr = inbound.local_addr().unwrap();
            let outbound_addr = outbound.local_addr().unwrap();

            let source = tokio::spawn({
                let data = data.clone();
                async move {
                    let mut socket = TcpStream::connect(inbound_addr).await.unwrap();
                    socket.write_all(&data).await.unwrap();
                    socket.shutdown().await.unwrap();
                }
            });
            let sink = tokio::spawn(async move {
                let (mut socket, _) = outbound.accept().await.unwrap();
                let mut received = Vec::with_capacity(STREAM);
                socket.read_to_end(&mut received).await.unwrap();
                received
            });

            let (mut from, _) = inbound.accept().await.unwrap();
            let mut to = TcpStream::connect(outbound_addr).await.unwrap();
            let (mut relayed, mut multi_buffer_reads) = (0, 0);
            loop {
                let mut filled = pool.allocate(4).await.unwrap().into_filled();
                let read = from.read_buf(&mut filled).await.unwrap();
                if read == 0 {
                    break;
                }
                multi_buffer_reads += usize::from(read > 4096);
                // Fill the allocation up when more is already there, as a relay would not
                // need to, to exercise `read_buf` into a partly filled allocation.
                while filled.remaining_mut() > 0 {
                    match from.read_buf(&mut filled).now_or_never() {
                        Some(Ok(n)) if n > 0 => {}
                        _ => break,
                    }
                }
                relayed += filled.len();
                let frozen = filled.freeze();
                to.write_all(&frozen).await.unwrap();
                assert!(pool.stats().in_use_bytes <= 64 << 10);
            }
            drop(to);
            source.await.unwrap();
            let received = sink.await.unwrap();
            assert_eq!(relayed, STREAM);
            assert_eq!(received.len(), STREAM);
            assert!(received == *data, "the bytes arrived in order, unchanged");
            assert!(
                multi_buffer_reads > 0,
                "some read spanned more than one buffer"
            );
            assert_idle(&pool);
        })
        .await;
    }
}
