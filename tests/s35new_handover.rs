//! Session 35 (s35new), a new user's look at issue 22's waiting path: the block hand-over
//! (README guarantee 18), the lazy `QUEUED` flag left on an emptied queue, and the
//! statistics at every quiescent point after them. Public API only.
//!
//! Deterministic where possible: futures are polled by hand with a no-op or counting waker on
//! the test's thread. Threaded tests run under a watchdog.

mod common;

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_full_budget_back, assert_idle, pool, wait_waiting, watchdog};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate, Reclaimer,
};

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// Polls once with a no-op waker.
fn poll<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut cx())
}

/// The allocation of a poll that must be ready.
#[track_caller]
fn ready<F: Future<Output = Result<BufPoolAllocation, AllocError>> + ?Sized>(
    future: Pin<&mut F>,
) -> BufPoolAllocation {
    match poll(future) {
        Poll::Ready(Ok(allocation)) => allocation,
        Poll::Ready(Err(error)) => panic!("expected an allocation, got {error}"),
        Poll::Pending => panic!("expected the request to be served"),
    }
}

/// Writes `byte` into every byte of `allocation`.
fn dirty(allocation: &BufPoolAllocation, byte: u8) {
    // SAFETY: the allocation owns `allocated_bytes` writable bytes.
    unsafe {
        allocation
            .first()
            .write_bytes(byte, allocation.allocated_bytes())
    };
}

/// Every byte of a zeroed allocation, read through the safe view its promise allows.
fn zeroed_bytes(allocation: BufPoolAllocation) -> (Vec<u8>, BufPoolAllocation) {
    let capacity = allocation.allocated_bytes();
    let mut filled = allocation.into_filled();
    assert!(
        filled.set_filled(capacity),
        "a zeroed allocation counts as initialised throughout"
    );
    let bytes = filled.filled().to_vec();
    (bytes, filled.into_allocation())
}

/// Sets its flag when dropped, also by a panic: the racing side of a test stops with it.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// A waker that counts its wakes.
#[derive(Default)]
struct Counting(AtomicUsize);

impl Wake for Counting {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// A root pool of 6 buffers of 64 bytes whose only waiter was just handed a block, so the
/// last event on it was a hand-over that emptied the queue (the lazy `QUEUED` case): a
/// reservation holds 1 buffer, the handed allocation 3, and 2 buffers are free with nobody
/// waiting. Returns (handed, reservation).
fn emptied_by_a_hand_over(pool: &BufPool) -> (BufPoolAllocation, membudget::Reservation) {
    let reservation = pool.try_reserve(64).unwrap();
    let held = pool.try_allocate(3).unwrap();
    let address = held.first();
    let mut head = pin!(pool.allocate(3));
    assert!(poll(head.as_mut()).is_pending(), "2 buffers free, 3 asked");
    drop(held);
    let handed = ready(head.as_mut());
    assert_eq!(handed.first(), address, "the released block itself");
    let s = pool.stats();
    assert_eq!((s.in_use_bytes, s.waiting), (4 * 64, 0), "{s}");
    (handed, reservation)
}

fn s64(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64 * buffers,
    }
}

// ---- the hand-over: contents, views, sizes ----

/// A zeroed owned request at the head is handed a block full of old data: it reads zeros
/// through the safe view, and the block is the released one (so the zeroing was done on it).
#[test]
fn a_zeroed_owned_head_handed_a_dirty_block_reads_only_zeros() {
    let pool = Arc::new(pool(BufferSize::S128, 4));
    let held = pool.try_allocate(4).unwrap();
    dirty(&held, 0xA5);
    let address = held.first();
    let mut head = Box::pin(Arc::clone(&pool).allocate_zeroed_owned(4));
    assert!(poll(head.as_mut()).is_pending());
    drop(held);
    let handed = ready(head.as_mut());
    drop(head); // the finished future's handle on the pool

    assert_eq!(handed.first(), address, "handed over, not reallocated");
    assert_eq!(
        (
            handed.length(),
            handed.allocated_bytes(),
            handed.buffer_size()
        ),
        (4, 512, 128)
    );
    let (bytes, handed) = zeroed_bytes(handed);
    assert!(bytes.iter().all(|&b| b == 0), "old contents leaked");
    drop(handed);
    assert_eq!(Arc::strong_count(&pool), 1, "the owned handle came back");
    assert_full_budget_back(&pool);
}

/// The blocking and timed zeroed forms, handed a dirty block by a release on another thread.
#[test]
#[cfg_attr(miri, ignore = "threads and real-time waits: slow under Miri")]
fn zeroed_blocking_and_timed_heads_handed_dirty_blocks_read_only_zeros() {
    watchdog(10, || {
        for timed in [false, true] {
            let pool = Arc::new(pool(BufferSize::S64, 2));
            let held = pool.try_allocate(2).unwrap();
            dirty(&held, 0xEE);
            let address = held.first() as usize;
            let waiter = thread::spawn({
                let pool = Arc::clone(&pool);
                move || {
                    let allocation = if timed {
                        pool.allocate_zeroed_timeout(2, Duration::from_secs(5))
                    } else {
                        pool.allocate_zeroed_blocking(2)
                    }
                    .unwrap();
                    let same = allocation.first() as usize;
                    (zeroed_bytes(allocation).0, same)
                }
            });
            wait_waiting(&pool, 1);
            drop(held);
            let (bytes, got) = waiter.join().unwrap();
            assert_eq!(got, address, "handed over (timed: {timed})");
            assert!(bytes.iter().all(|&b| b == 0), "timed: {timed}");
            assert_full_budget_back(&pool);
        }
    });
}

/// A plain (not zeroed) head handed a block full of old data: no safe view reads any of it.
/// `into_filled` starts empty, `set_filled` refuses, and `freeze` of the untouched cursor is
/// empty; its sizes are the request's.
#[test]
fn a_plain_head_handed_a_dirty_block_exposes_none_of_it_through_safe_views() {
    let pool = pool(BufferSize::S32, 3);
    let held = pool.try_allocate(3).unwrap();
    dirty(&held, 0x5A);
    let mut head = pin!(pool.allocate(3));
    assert!(poll(head.as_mut()).is_pending());
    drop(held);
    let handed = ready(head.as_mut());
    assert_eq!(
        (
            handed.length(),
            handed.allocated_bytes(),
            handed.buffer_size()
        ),
        (3, 96, 32)
    );
    assert_eq!(handed.iter().count(), 3);
    let mut filled = handed.into_filled();
    assert_eq!((filled.filled().len(), filled.capacity()), (0, 96));
    assert_eq!(filled.remaining(), 96);
    assert!(!filled.set_filled(1), "not one byte is known initialised");
    assert!(filled.set_filled(0));
    assert!(filled.buffers().all(|b| b.is_empty()));
    filled.extend_from_slice(b"abc");
    assert!(!filled.set_filled(4), "only what was written");
    assert_eq!(&filled[..], b"abc");
    drop(filled);
    assert_full_budget_back(&pool);
}

/// A zeroed head handed a block whose previous owner wrote it through `uninit_mut` (untracked
/// writes) still reads all zeros, and a plain head after it sees nothing.
#[test]
fn a_zeroed_head_after_an_uninit_written_block_reads_zeros() {
    let pool = pool(BufferSize::S16, 4);
    let mut held = pool.try_allocate_zeroed(4).unwrap();
    for byte in held.uninit_mut() {
        byte.write(0xFF);
    }
    let mut head = pin!(pool.allocate_zeroed(4));
    assert!(poll(head.as_mut()).is_pending());
    drop(held);
    let handed = ready(head.as_mut());
    let (bytes, handed) = zeroed_bytes(handed);
    assert_eq!(bytes, vec![0; 64]);
    let mut next = pin!(pool.allocate(4));
    assert!(poll(next.as_mut()).is_pending());
    drop(handed);
    let mut plain = ready(next.as_mut()).into_filled();
    assert!(
        !plain.set_filled(64),
        "a plain head does not inherit `zeroed`"
    );
    drop(plain);
    assert_full_budget_back(&pool);
}

/// `bytes`: a handed plain block read into with `read_buf` and frozen; the `Bytes`' last
/// clone, dropped while another head of the same size waits, hands the block on again.
#[cfg(feature = "bytes")]
#[test]
fn read_buf_into_a_handed_block_then_the_frozen_bytes_hand_it_on() {
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = pool(BufferSize::S64, 2);
        let held = pool.try_allocate(2).unwrap();
        dirty(&held, 0x11);
        let address = held.first();
        let mut head = pin!(pool.allocate(2));
        assert!(poll(head.as_mut()).is_pending());
        drop(held);
        let mut filled = ready(head.as_mut()).into_filled();
        assert_eq!(filled.remaining_mut(), 128);
        let mut reader: &[u8] = &[7u8; 100];
        let mut total = 0;
        loop {
            let n = reader.read_buf(&mut filled).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 100);
        assert_eq!(filled.remaining_mut(), 28);
        let frozen = filled.freeze();
        assert_eq!(&frozen[..], &[7u8; 100][..]);
        let slice = frozen.slice(90..);
        drop(frozen);
        let mut next = pin!(pool.allocate_zeroed(2));
        assert!(poll(next.as_mut()).is_pending());
        assert_eq!(pool.stats().in_use_bytes, 128, "the slice holds the block");
        drop(slice);
        let again = ready(next.as_mut());
        assert_eq!(again.first(), address, "the frozen block handed on");
        assert_eq!(zeroed_bytes(again).0, vec![0; 128]);
        let s = pool.stats();
        assert_eq!(
            (
                s.in_use_bytes,
                s.outstanding,
                s.total_allocations,
                s.waited_allocations
            ),
            (0, 0, 3, 2),
            "{s}"
        );
    });
}

/// Owned and plain allocations hand blocks both ways; the pool's handle count comes back
/// to one once the last owned allocation is gone.
#[test]
fn owned_and_plain_allocations_hand_blocks_both_ways() {
    let pool = Arc::new(pool(BufferSize::S64, 2));
    let plain = pool.try_allocate(2).unwrap();
    let address = plain.first();
    let mut owned_head = Box::pin(Arc::clone(&pool).allocate_owned(2));
    assert!(poll(owned_head.as_mut()).is_pending());
    drop(plain);
    let owned = ready(owned_head.as_mut());
    drop(owned_head);
    assert_eq!(owned.first(), address);
    assert!(
        Arc::strong_count(&pool) > 1,
        "an owned allocation keeps the pool"
    );
    let mut plain_head = Box::pin(pool.allocate(2));
    assert!(poll(plain_head.as_mut()).is_pending());
    drop(owned);
    assert_eq!(Arc::strong_count(&pool), 1, "the owned handle is gone");
    let plain = ready(plain_head.as_mut());
    drop(plain_head);
    assert_eq!(plain.first(), address);
    // Owned to owned, with the last external handle dropped meanwhile.
    let mut owned_head = Box::pin(Arc::clone(&pool).allocate_owned(2));
    assert!(poll(owned_head.as_mut()).is_pending());
    drop(plain);
    let owned = ready(owned_head.as_mut());
    drop(owned_head);
    assert_eq!(owned.first(), address);
    let s = pool.stats();
    assert_eq!(
        (
            s.in_use_bytes,
            s.outstanding,
            s.total_allocations,
            s.waited_allocations
        ),
        (128, 1, 4, 3),
        "{s}"
    );
    let weak = Arc::downgrade(&pool);
    drop(pool);
    assert!(
        weak.upgrade().is_some(),
        "the owned allocation keeps it alive"
    );
    drop(owned); // the last owned allocation of a pool whose handles are gone: its drop runs
    assert!(weak.upgrade().is_none(), "the pool went with its last hold");
}

// ---- heads that give up, time out or ask another size ----

/// The head is granted a block and cancelled before it polls again: the block is freed, its
/// bytes serve the next waiter, and the books count the given-up grant as waited, not as an
/// allocation.
#[test]
fn a_head_cancelled_after_its_grant_passes_the_bytes_on_exactly() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let counting = Arc::new(Counting::default());
    let waker = Waker::from(Arc::clone(&counting));
    let mut first = Box::pin(pool.allocate(2));
    let mut second = pin!(pool.allocate_zeroed(2));
    assert!(first.as_mut().poll(&mut cx()).is_pending());
    assert!(
        second
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    dirty(&held, 0x77);
    drop(held);
    assert_eq!(
        counting.0.load(SeqCst),
        0,
        "the head, not the second, is served"
    );
    assert_eq!(pool.stats().waiting, 1);
    drop(first); // granted (with the block), never polled again
    assert_eq!(
        counting.0.load(SeqCst),
        1,
        "the bytes went on, with a wake-up"
    );
    let second = ready(second.as_mut());
    assert_eq!(zeroed_bytes(second).0, vec![0; 128]);
    let s = pool.stats();
    assert_eq!(
        (
            s.in_use_bytes,
            s.outstanding,
            s.waiting,
            s.total_allocations,
            s.waited_allocations
        ),
        (0, 0, 0, 2, 2),
        "{s}"
    );
    assert_full_budget_back(&pool);
}

/// The same with three sizes queued: the cancelled head's bytes serve every waiter they fit,
/// in order, and never a later one ahead of an earlier one.
#[test]
fn a_cancelled_head_serves_everyone_its_bytes_fit_in_order() {
    let pool = pool(BufferSize::S64, 4);
    let held = pool.try_allocate(4).unwrap();
    let mut head = Box::pin(pool.allocate(4));
    let mut one = pin!(pool.allocate(1));
    let mut three = pin!(pool.allocate(3));
    let mut two = pin!(pool.allocate(2));
    assert!(poll(head.as_mut()).is_pending());
    assert!(poll(one.as_mut()).is_pending());
    assert!(poll(three.as_mut()).is_pending());
    assert!(poll(two.as_mut()).is_pending());
    drop(held); // handed to the head
    assert_eq!(pool.stats().waiting, 3);
    drop(head);
    let one = ready(one.as_mut());
    let three = ready(three.as_mut());
    assert!(poll(two.as_mut()).is_pending(), "no room left for 2");
    assert_eq!(pool.stats().waiting, 1);
    drop(one);
    assert!(poll(two.as_mut()).is_pending(), "1 buffer free, 2 asked");
    drop(three);
    let two = ready(two.as_mut());
    drop(two);
    let s = pool.stats();
    assert_eq!(
        (s.outstanding, s.total_allocations, s.waited_allocations),
        (0, 4, 4),
        "{s}"
    );
    assert_full_budget_back(&pool);
}

/// A head asking for a different size than the released block: the block is not handed
/// (its size differs), the head gets memory of its own size when its bytes fit, and nobody
/// behind it barges.
#[test]
fn a_head_of_another_size_is_served_only_when_its_size_fits() {
    let pool = pool(BufferSize::S64, 4);
    let a = pool.try_allocate(2).unwrap();
    let b = pool.try_allocate(2).unwrap();
    let mut three = pin!(pool.allocate(3));
    let mut two = pin!(pool.allocate(2));
    assert!(poll(three.as_mut()).is_pending());
    assert!(poll(two.as_mut()).is_pending());
    drop(a); // 2 free: the head (3) does not fit, and the 2 behind it must not barge
    assert!(poll(three.as_mut()).is_pending());
    assert!(
        poll(two.as_mut()).is_pending(),
        "FIFO: no barging past the head"
    );
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    drop(b);
    let three = ready(three.as_mut());
    assert_eq!(three.allocated_bytes(), 192);
    assert!(poll(two.as_mut()).is_pending());
    drop(three);
    let two = ready(two.as_mut());
    assert_eq!(two.allocated_bytes(), 128);
    drop(two);
    assert_full_budget_back(&pool);
}

/// `PollAllocate` granted a block then asked for another `n`: it gives the block up (its
/// bytes go on) and queues anew; nothing is lost.
#[test]
fn a_poll_allocate_handed_a_block_that_changes_n_loses_nothing() {
    let pool = Arc::new(pool(BufferSize::S64, 3));
    let held = pool.try_allocate(2).unwrap();
    let other = pool.try_allocate(1).unwrap();
    let mut polled = PollAllocate::new(Arc::clone(&pool));
    assert!(polled.poll_allocate(&mut cx(), 2).is_pending());
    drop(held); // handed to the poller
    match polled.poll_allocate(&mut cx(), 3) {
        Poll::Pending => {}
        other => panic!("3 buffers cannot fit while 1 is held: {other:?}"),
    }
    assert_eq!(pool.stats().waiting, 1);
    assert_eq!(
        pool.stats().in_use_bytes,
        64,
        "the given-up grant went back"
    );
    drop(other);
    let Poll::Ready(Ok(three)) = polled.poll_allocate(&mut cx(), 3) else {
        panic!("the release did not serve the poller");
    };
    assert_eq!(three.length(), 3);
    drop((three, polled));
    let s = pool.stats();
    assert_eq!((s.outstanding, s.total_allocations), (0, 3), "{s}");
    assert_full_budget_back(&pool);
}

/// Timed waiters racing the releases that hand them blocks: every result is either an
/// allocation or `TimedOut`, and the books at the end match the results exactly.
#[test]
#[cfg_attr(
    miri,
    ignore = "real-time deadlines on threads: slow and meaningless under Miri"
)]
fn timed_heads_racing_their_hand_overs_keep_exact_books() {
    watchdog(20, || {
        let pool = Arc::new(pool(BufferSize::S64, 1));
        let rounds: usize = 300;
        let (mut ok, mut timed_out) = (0, 0);
        for round in 0..rounds {
            let held = pool.try_allocate(1).unwrap();
            let releaser = thread::spawn(move || {
                // Around the waiter's deadline: before, at, or after it.
                thread::sleep(Duration::from_micros(200 + (round as u64 % 7) * 50));
                drop(held);
            });
            match pool.allocate_timeout(1, Duration::from_micros(350)) {
                Ok(allocation) => {
                    assert_eq!(allocation.length(), 1);
                    ok += 1;
                }
                Err(AllocError::TimedOut) => timed_out += 1,
                Err(error) => panic!("unexpected {error}"),
            }
            releaser.join().unwrap();
            let s = pool.stats();
            assert_eq!((s.in_use_bytes, s.outstanding, s.waiting), (0, 0, 0), "{s}");
        }
        let s = pool.stats();
        assert_eq!(ok + timed_out, rounds);
        assert_eq!(s.total_allocations, rounds + ok, "{s}");
        assert_eq!(s.timed_out, timed_out, "{s}");
        assert!(s.waited_allocations <= rounds, "{s}");
        assert_full_budget_back(&pool);
    });
}

// ---- child pools at the head ----

/// A child's request at the head of the root's queue: the release of a root block of its
/// size gives it bytes, never the block (it gets memory of its own), the root's own waiter
/// of that size behind it is handed the next block, and every level's books stay exact.
#[test]
fn a_childs_request_at_the_roots_head_takes_bytes_and_every_level_stays_exact() {
    let root = pool(BufferSize::S64, 4);
    let child = root.child("c", s64(2)).unwrap();
    let first = root.try_allocate(2).unwrap();
    let second = root.try_allocate(2).unwrap();
    dirty(&first, 0x42);
    dirty(&second, 0x43);
    let second_block = second.first();
    let mut climber = Box::pin(child.allocate_zeroed(2));
    assert!(poll(climber.as_mut()).is_pending());
    let mut root_waiter = pin!(root.allocate(2));
    assert!(poll(root_waiter.as_mut()).is_pending());
    assert_eq!((child.stats().waiting, root.stats().waiting), (0, 2));
    assert_eq!(child.stats().in_use_bytes, 128, "held at its own level");
    assert_eq!(root.stats().in_use_bytes, 256);
    drop(first); // the climber is the head: bytes only
    let got = ready(climber.as_mut());
    drop(climber);
    assert!(poll(root_waiter.as_mut()).is_pending());
    assert_eq!(root.stats().waiting, 1);
    assert_eq!(
        (root.stats().in_use_bytes, child.stats().in_use_bytes),
        (256, 128)
    );
    let (bytes, got) = zeroed_bytes(got);
    assert_eq!(bytes, vec![0; 128], "a child's zeroed request reads zeros");
    drop(second); // the root's own waiter is the head now: handed the block
    let mine = ready(root_waiter.as_mut());
    assert_eq!(mine.first(), second_block);
    let (r, c) = (root.stats(), child.stats());
    assert_eq!(
        (r.in_use_bytes, r.waiting, c.in_use_bytes, c.outstanding),
        (256, 0, 128, 1)
    );
    drop((got, mine));
    let (r, c) = (root.stats(), child.stats());
    assert_eq!((r.in_use_bytes, r.outstanding, r.waiting), (0, 0, 0), "{r}");
    assert_eq!((c.in_use_bytes, c.outstanding, c.waiting), (0, 0, 0), "{c}");
    assert_eq!((c.total_allocations, c.waited_allocations), (1, 0), "{c}");
    assert_eq!(
        r.waited_allocations, 2,
        "the climber's and the root's own: {r}"
    );
    assert_eq!(r.total_allocations, 3, "the root's own three: {r}");
    assert_eq!(r.peak_in_use_bytes, 256);
    drop(child);
    assert_full_budget_back(&root);
}

// ---- the lazy QUEUED flag: after the last waiter was served ----

/// After a hand-over emptied the queue, every call that fits succeeds at once and the stats
/// show nobody waiting, a thousand times over.
#[test]
fn a_thousand_hand_overs_to_the_last_waiter_never_leave_a_spurious_would_block() {
    let pool = pool(BufferSize::S64, 6);
    let reservation = pool.try_reserve(64).unwrap();
    let mut handed = pool.try_allocate(3).unwrap();
    let rounds = common::rounds(1000, 50);
    for round in 0..rounds {
        let address = handed.first();
        let mut head = pin!(pool.allocate(3));
        assert!(poll(head.as_mut()).is_pending());
        drop(handed);
        handed = ready(head.as_mut());
        assert_eq!(handed.first(), address);
        assert_eq!(pool.stats().waiting, 0);
        // Alternate the call that meets the stale flag first.
        let two = match round % 4 {
            0 => pool.try_allocate(2),
            1 => pool.try_allocate_zeroed(2),
            2 => pool.allocate_timeout(2, Duration::ZERO),
            _ => {
                let mut request = pin!(pool.allocate(2));
                Ok(ready(request.as_mut()))
            }
        }
        .unwrap_or_else(|e| panic!("round {round}: spurious {e}: {}", pool.stats()));
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        drop(two);
    }
    let s = pool.stats();
    assert_eq!(s.total_allocations, 1 + 2 * rounds, "{s}");
    assert_eq!(s.waited_allocations, rounds, "{s}");
    assert_eq!(s.outstanding, 1, "{s}");
    assert_eq!(s.in_use_bytes, 4 * 64, "{s}");
    assert_eq!(s.would_block, rounds, "{s}");
    drop((handed, reservation));
    assert_full_budget_back(&pool);
}

/// Resizes after the queue was emptied by a hand-over behave as on a fresh pool: a shrink to
/// exactly what is in use leaves no room, a grow gives it, `forget_max_memory` takes exactly
/// the free budget.
#[test]
fn resizes_after_the_last_waiter_was_handed_a_block() {
    let pool = pool(BufferSize::S64, 6);
    let (handed, reservation) = emptied_by_a_hand_over(&pool);
    pool.set_max_memory(4 * 64).unwrap();
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(pool.stats().waiting, 0);
    pool.set_max_memory(6 * 64).unwrap();
    drop(pool.try_allocate(2).expect("grown back"));

    let pool = self::pool(BufferSize::S64, 6);
    let (handed2, reservation2) = emptied_by_a_hand_over(&pool);
    assert_eq!(
        pool.forget_max_memory(usize::MAX),
        128,
        "exactly the free room"
    );
    assert_eq!(pool.stats().max_memory, 4 * 64);
    assert_eq!(pool.add_max_memory(64), 5 * 64);
    drop(pool.try_allocate(1).expect("the added buffer"));
    drop((handed2, reservation2));
    assert_full_budget_back(&pool);
    drop((handed, reservation));
}

/// Closing after the queue was emptied by a hand-over: new requests fail with `Closed` (not
/// `WouldBlock`), and the pool's drop waits for the handed block.
#[test]
fn close_after_the_last_waiter_was_handed_a_block_says_closed() {
    let pool = pool(BufferSize::S64, 6);
    let (handed, reservation) = emptied_by_a_hand_over(&pool);
    pool.close();
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
    assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::Closed);
    assert_eq!(
        pool.allocate_timeout(1, Duration::ZERO).unwrap_err(),
        AllocError::Closed
    );
    let mut request = pin!(pool.allocate(1));
    assert!(matches!(
        poll(request.as_mut()),
        Poll::Ready(Err(AllocError::Closed))
    ));
    let s = pool.stats();
    assert!(s.closed);
    assert_eq!(s.would_block, 0, "no WouldBlock was counted: {s}");
    drop((handed, reservation));
    assert_idle(&pool);
}

/// The shutdown barrier with a handed block outstanding, the queue emptied by the hand-over:
/// the drop blocks until the block is back, then returns.
#[test]
#[cfg_attr(miri, ignore = "a timed sleep across threads: slow under Miri")]
fn the_drop_barrier_waits_for_a_handed_block() {
    watchdog(10, || {
        let pool = pool(BufferSize::S64, 6);
        let (handed, reservation) = emptied_by_a_hand_over(&pool);
        drop(reservation);
        let returned = Arc::new(AtomicBool::new(false));
        let holder = thread::spawn({
            let returned = Arc::clone(&returned);
            move || {
                thread::sleep(Duration::from_millis(50));
                returned.store(true, SeqCst);
                drop(handed);
            }
        });
        drop(pool);
        assert!(
            returned.load(SeqCst),
            "the drop returned before the handed block was back"
        );
        holder.join().unwrap();
    });
}

/// `drained()` resolves when the handed block (small, and one of 64 KiB or more, which is
/// freed outside the lock) comes back after the hand-over emptied the queue.
#[test]
fn drained_resolves_when_a_handed_block_returns() {
    for size in [BufferSize::S64, BufferSize::S16384] {
        let pool = pool(size, 8);
        let held = pool.try_allocate(4).unwrap();
        let filler = pool.try_allocate(3).unwrap();
        let mut head = pin!(pool.allocate(4));
        assert!(poll(head.as_mut()).is_pending());
        drop(held);
        let handed = ready(head.as_mut());
        drop(filler); // a release after the hand-over: clears the flag the ordinary way
        let mut head = pin!(pool.allocate(5)); // 4 in use: 5 does not fit
        assert!(poll(head.as_mut()).is_pending());
        let counting = Arc::new(Counting::default());
        let waker = Waker::from(Arc::clone(&counting));
        // Hand the 4-buffer block on: not the head's size (5): freed, and the head served.
        drop(handed);
        let five = ready(head.as_mut());
        // Now a real last hand-over: a head of 5 waits, the 5-buffer block is released.
        let mut last = pin!(pool.allocate(5));
        assert!(poll(last.as_mut()).is_pending());
        drop(five);
        let handed = ready(last.as_mut());
        assert_eq!(pool.stats().waiting, 0);
        let mut drained = pin!(pool.drained());
        assert!(
            drained
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        drop(handed);
        assert_eq!(
            counting.0.load(SeqCst),
            1,
            "the drain waiter was woken ({size:?})"
        );
        assert!(drained.as_mut().poll(&mut cx()).is_ready());
        assert_full_budget_back(&pool);
    }
}

/// `max_waiters(0)` after a hand-over emptied the queue: a request that fits is served, not
/// refused with `QueueFull`.
#[test]
fn a_bounded_queue_emptied_by_a_hand_over_serves_what_fits() {
    let pool = BufPool::builder(s64(6)).max_waiters(1).build().unwrap();
    let (handed, reservation) = emptied_by_a_hand_over(&pool);
    let mut two = pin!(pool.allocate(2));
    let two = ready(two.as_mut());
    assert_eq!(pool.stats().queue_full, 0);
    drop(two);
    // One waiter fits in a queue of 1; a second is refused.
    let mut big = pin!(pool.allocate(3));
    assert!(poll(big.as_mut()).is_pending());
    assert_eq!(
        pool.allocate_timeout(1, Duration::from_secs(1))
            .unwrap_err(),
        AllocError::QueueFull
    );
    drop(handed);
    let big = ready(big.as_mut());
    drop((big, reservation));
    assert_full_budget_back(&pool);
}

/// Reclaimers are not asked by requests that fit after a hand-over emptied the queue.
#[test]
fn no_reclaim_round_for_what_fits_after_a_hand_over() {
    struct Never(Arc<AtomicUsize>);
    impl Reclaimer for Never {
        fn estimate(&self) -> usize {
            1 << 20
        }
        fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
            self.0.fetch_add(1, SeqCst);
            Box::pin(async { 0 })
        }
    }
    let asked = Arc::new(AtomicUsize::new(0));
    let pool = pool(BufferSize::S64, 6);
    let (handed, reservation) = emptied_by_a_hand_over(&pool);
    let _handle = pool.register_reclaimer("never", 0, Arc::new(Never(Arc::clone(&asked))));
    let mut two = pin!(pool.allocate(2));
    drop(ready(two.as_mut()));
    let two = pool.allocate_blocking(2).unwrap();
    assert_eq!(asked.load(SeqCst), 0);
    assert_eq!(pool.stats().reclaim_rounds, 0);
    drop((two, handed, reservation));
}

/// After a hand-over emptied the root's queue, a child's block released is cached in the
/// root's cache exactly as when the queue was never used.
#[test]
fn a_childs_release_after_the_roots_last_hand_over_is_cached_as_on_a_quiet_root() {
    let cached_by_the_childs_release = |hand_over_first: bool| {
        let root = BufPool::builder(s64(6))
            .recycle(4)
            .recycle_min_bytes(0)
            .build()
            .unwrap();
        let child = root.child("c", s64(2)).unwrap();
        let in_child = child.try_allocate(2).unwrap();
        let mut held = root.try_allocate(3).unwrap(); // 5 of 6 in use
        if hand_over_first {
            let address = held.first();
            let mut head = pin!(root.allocate(3));
            assert!(poll(head.as_mut()).is_pending(), "1 free, 3 asked");
            drop(held);
            held = ready(head.as_mut());
            assert_eq!(held.first(), address, "handed over");
            assert_eq!(root.stats().waiting, 0);
        }
        assert_eq!(root.stats().cached_bytes, 0);
        drop(in_child);
        let cached = root.stats().cached_bytes;
        drop((held, child));
        cached
    };
    let quiet = cached_by_the_childs_release(false);
    assert_eq!(quiet, 128, "a quiet root caches the child's block");
    // BUG (s35new): the child's release asks the recycler with the root's `QUEUED` flag
    // read without the lock; left set on the empty queue by the last hand-over (lazy
    // `QUEUED`), it made the recycler think requests wait, and the block was freed.
    // Fixed: `State::requests_wait_for_recycler` looks under the lock for a child.
    let stale = cached_by_the_childs_release(true);
    assert_eq!(
        stale, quiet,
        "the child's block after the root's last hand-over is cached as on a quiet root"
    );
}

/// Two threads: one runs hand-over cycles to its only waiter; the other tries a request that
/// fits whenever no waiter can be queued. No try may fail while the queue is known empty.
#[test]
#[cfg_attr(
    miri,
    ignore = "a race loop of thousands of rounds: too slow under Miri"
)]
fn a_try_racing_hand_overs_never_fails_while_the_queue_is_known_empty() {
    watchdog(20, || {
        let pool = Arc::new(pool(BufferSize::S64, 6));
        let _reservation = pool.try_reserve(64).unwrap();
        // Even: nobody queued; odd: a waiter may be queued.
        let epoch = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let cycler = thread::spawn({
            let (pool, epoch, stop) = (Arc::clone(&pool), Arc::clone(&epoch), Arc::clone(&stop));
            move || {
                let _stop = StopOnDrop(Arc::clone(&stop));
                let mut rounds = 0usize;
                let mut handed = pool.try_allocate(3).unwrap();
                let end = Instant::now() + Duration::from_millis(700);
                while Instant::now() < end {
                    let address = handed.first();
                    epoch.fetch_add(1, SeqCst);
                    let mut head = pin!(pool.allocate(3));
                    // The other thread holds at most 1: 1 + 3 + 1 in use, at most 1 free.
                    assert!(poll(head.as_mut()).is_pending());
                    drop(handed);
                    handed = ready(head.as_mut());
                    assert_eq!(handed.first(), address, "handed over");
                    epoch.fetch_add(1, SeqCst);
                    rounds += 1;
                }
                stop.store(true, SeqCst);
                drop(handed);
                rounds
            }
        });
        let (mut tries, mut checked) = (0usize, 0usize);
        while !stop.load(SeqCst) {
            let before = epoch.load(SeqCst);
            let result = pool.try_allocate(1);
            let after = epoch.load(SeqCst);
            tries += 1;
            if before == after && before % 2 == 0 {
                checked += 1;
                // 1 reserved + 3 handed (or held) in use: 2 free, nobody queued.
                let allocation = result.unwrap_or_else(|e| {
                    panic!("spurious {e} with the queue known empty: {}", pool.stats())
                });
                drop(allocation);
            }
        }
        let rounds = cycler.join().unwrap();
        assert!(
            rounds > 10 && checked > 10,
            "{rounds} rounds, {checked} of {tries} checked"
        );
        let s = pool.stats();
        assert_eq!(
            (s.in_use_bytes, s.outstanding, s.waiting),
            (64, 0, 0),
            "{s}"
        );
    });
}

// ---- statistics: wait times ----

/// A head that waited about 20 ms for a hand-over shows at least that in `total_wait` and
/// `max_wait` (default `time_waits`), in a root pool and for a blocking waiter.
#[test]
#[cfg_attr(miri, ignore = "measures real time")]
fn a_20_ms_hand_over_wait_is_timed_at_least_20_ms() {
    let pool = pool(BufferSize::S64, 1);
    let held = pool.try_allocate(1).unwrap();
    let mut head = pin!(pool.allocate(1));
    let start = Instant::now();
    assert!(poll(head.as_mut()).is_pending());
    thread::sleep(Duration::from_millis(20));
    drop(held);
    let waited = start.elapsed();
    let got = ready(head.as_mut());
    let s = pool.stats();
    assert_eq!(s.waited_allocations, 1);
    assert!(
        s.max_wait >= Duration::from_millis(20),
        "{s}: {:?}",
        s.max_wait
    );
    assert!(
        s.max_wait <= waited + Duration::from_millis(5),
        "{:?} > {waited:?}",
        s.max_wait
    );
    assert_eq!(s.total_wait, s.max_wait);
    assert_eq!(s.mean_wait(), s.max_wait);
    drop(got);
    // A second, shorter wait: the max stays, the total adds up.
    let held = pool.try_allocate(1).unwrap();
    let mut head = pin!(pool.allocate(1));
    assert!(poll(head.as_mut()).is_pending());
    drop(held);
    drop(ready(head.as_mut()));
    let t = pool.stats();
    assert_eq!(t.waited_allocations, 2);
    assert!(
        t.max_wait >= s.max_wait && t.total_wait >= s.total_wait,
        "{t}"
    );
    assert!(t.mean_wait() <= t.max_wait);
}

/// A child's request that waited ~20 ms at its root: the root's figures show it.
#[test]
#[cfg_attr(miri, ignore = "measures real time")]
fn a_childs_20_ms_wait_at_the_root_is_timed_there() {
    let root = pool(BufferSize::S64, 2);
    let child = root.child("c", s64(2)).unwrap();
    let held = root.try_allocate(2).unwrap();
    let mut climber = Box::pin(child.allocate(2));
    assert!(poll(climber.as_mut()).is_pending());
    thread::sleep(Duration::from_millis(20));
    drop(held);
    drop(ready(climber.as_mut()));
    drop(climber);
    let r = root.stats();
    assert_eq!(r.waited_allocations, 1, "{r}");
    assert!(r.max_wait >= Duration::from_millis(20), "{r}");
    let c = child.stats();
    assert_eq!(
        c.waited_allocations, 0,
        "it never waited in the child's queue: {c}"
    );
    drop(child);
}

/// `time_waits(false)`: waits are counted, their time stays zero, whether a block was handed
/// over or bytes granted, and for a timed-out waiter too.
#[test]
#[cfg_attr(miri, ignore = "sleeps to make the waits long")]
fn untimed_waits_are_counted_with_zero_time() {
    let pool = BufPool::builder(s64(2)).time_waits(false).build().unwrap();
    let held = pool.try_allocate(2).unwrap();
    let mut same = pin!(pool.allocate(2));
    assert!(poll(same.as_mut()).is_pending());
    thread::sleep(Duration::from_millis(5));
    drop(held);
    let got = ready(same.as_mut()); // handed
    let mut other = pin!(pool.allocate(1));
    assert!(poll(other.as_mut()).is_pending());
    thread::sleep(Duration::from_millis(5));
    drop(got);
    let one = ready(other.as_mut()); // bytes
    assert_eq!(
        pool.allocate_timeout(2, Duration::from_millis(5))
            .unwrap_err(),
        AllocError::TimedOut
    );
    drop(one);
    let s = pool.stats();
    assert_eq!(s.waited_allocations, 2, "{s}");
    assert_eq!(
        (s.total_wait, s.max_wait),
        (Duration::ZERO, Duration::ZERO),
        "{s}"
    );
    assert_eq!(s.timed_out, 1);
    assert_eq!((s.total_allocations, s.outstanding), (3, 0), "{s}");
    assert_eq!(s.peak_in_use_bytes, 128);
}

/// A root with `time_waits(false)` and a child with it on (and the reverse): each pool's
/// figures follow its own setting, for waits in its own queue.
#[test]
#[cfg_attr(miri, ignore = "sleeps to make the waits long")]
fn time_waits_is_per_pool_across_a_tree() {
    for root_timed in [false, true] {
        let root = BufPool::builder(s64(2))
            .time_waits(root_timed)
            .build()
            .unwrap();
        let child = BufPool::builder(s64(1))
            .name("c")
            .parent(&root)
            .time_waits(!root_timed)
            .build()
            .unwrap();
        let in_child = child.try_allocate(1).unwrap();
        let in_root = root.try_allocate(1).unwrap();
        let mut climber = Box::pin(child.allocate(1));
        assert!(poll(climber.as_mut()).is_pending()); // in the child's queue
        thread::sleep(Duration::from_millis(10));
        drop(in_child); // the child's room back; the root has room too
        match poll(climber.as_mut()) {
            Poll::Ready(Ok(a)) => drop(a),
            other => panic!("served at the root: {other:?}"),
        }
        drop(climber);
        drop(in_root);
        let (r, c) = (root.stats(), child.stats());
        assert_eq!(c.waited_allocations, 1, "{c}");
        if root_timed {
            assert!(c.max_wait.is_zero(), "child untimed: {c}");
        } else {
            assert!(c.max_wait >= Duration::from_millis(10), "child timed: {c}");
        }
        assert_eq!(r.waited_allocations, 0, "{r}");
        assert!(r.max_wait.is_zero());
        drop(child);
    }
}

/// Peak, outstanding and totals after a chain of hand-overs along a queue of five, with one
/// cancelled head in the middle.
#[test]
fn books_after_a_chain_of_hand_overs_with_a_cancel_in_the_middle() {
    let pool = pool(BufferSize::S64, 2);
    let mut current = pool.try_allocate(2).unwrap();
    let address = current.first();
    let mut waiters: Vec<Pin<Box<membudget::Allocate<'_>>>> =
        (0..5).map(|_| Box::pin(pool.allocate(2))).collect();
    for w in &mut waiters {
        assert!(poll(w.as_mut()).is_pending());
    }
    let mut taken = 0;
    let mut waiters = waiters.into_iter().enumerate();
    while let Some((i, mut w)) = waiters.next() {
        drop(current);
        if i == 2 {
            drop(w); // granted, given up: the next one is served
            let (_, mut next) = waiters.next().unwrap();
            current = ready(next.as_mut());
        } else {
            current = ready(w.as_mut());
            if i < 2 {
                assert_eq!(current.first(), address, "handed along");
            }
        }
        taken += 1;
    }
    drop(current);
    let s = pool.stats();
    assert_eq!(taken, 4);
    assert_eq!(
        (
            s.in_use_bytes,
            s.outstanding,
            s.waiting,
            s.total_allocations,
            s.waited_allocations
        ),
        (0, 0, 0, 5, 5),
        "{s}"
    );
    assert_eq!(s.peak_in_use_bytes, 128);
    assert_full_budget_back(&pool);
}

/// What a parent's figures count of a child's allocation: its bytes (in use, peak), but not
/// the allocation itself (`outstanding`, `total_allocations` are each pool's own), the
/// scope the field docs now state.
#[test]
fn a_parents_allocation_counts_are_its_own_while_its_bytes_are_its_subtrees() {
    let root = pool(BufferSize::S64, 4);
    let child = root.child("c", s64(4)).unwrap();
    let a = child.try_allocate(2).unwrap();
    let (r, c) = (root.stats(), child.stats());
    assert_eq!((r.in_use_bytes, r.peak_in_use_bytes), (128, 128), "{r}");
    assert_eq!((r.outstanding, r.total_allocations), (0, 0), "{r}");
    assert_eq!((c.outstanding, c.total_allocations), (1, 1), "{c}");
    drop(a);
    drop(child);
}

/// With recycling on, a zeroed head is still handed the released block (zeroed in place),
/// not fresh memory: the recycle docs said "Zeroed requests always get fresh zeroed memory",
/// which guarantee 18 contradicts; the docs now say a zeroed request never takes a cached
/// block, and may be handed a released one, zeroed.
#[test]
fn with_recycling_a_zeroed_head_is_handed_the_released_block_zeroed() {
    let pool = BufPool::builder(s64(2))
        .recycle(4)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    let held = pool.try_allocate(2).unwrap();
    dirty(&held, 0x99);
    let address = held.first();
    let mut head = pin!(pool.allocate_zeroed(2));
    assert!(poll(head.as_mut()).is_pending());
    drop(held);
    let handed = ready(head.as_mut());
    assert_eq!(handed.first(), address, "the used block, not fresh memory");
    assert_eq!(pool.stats().cached_bytes, 0);
    let (bytes, handed) = zeroed_bytes(handed);
    assert_eq!(bytes, vec![0; 128]);
    drop(handed);
    assert_eq!(pool.stats().cached_bytes, 128, "cached once nobody waits");
}

/// Every route by which a waiter gets its bytes times its wait (default `time_waits`): a
/// release of another size, a growth of the budget, a reservation's shrink, the cancel of a
/// head that held it back, and a grant in a child's own queue.
#[test]
#[cfg_attr(miri, ignore = "measures real time")]
fn every_grant_route_times_a_20_ms_wait() {
    const MS20: Duration = Duration::from_millis(20);
    #[track_caller]
    fn timed(pool: &BufPool, waits: usize) {
        let s = pool.stats();
        assert_eq!(s.waited_allocations, waits, "{s}");
        assert!(s.max_wait >= MS20, "{s}: max {:?}", s.max_wait);
        assert!(
            s.total_wait >= MS20 * waits as u32,
            "{s}: total {:?}",
            s.total_wait
        );
        assert!(s.mean_wait() <= s.max_wait);
    }
    // A release of another size (bytes, not a block).
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let mut one = pin!(pool.allocate(1));
    assert!(poll(one.as_mut()).is_pending());
    thread::sleep(MS20);
    drop(held);
    drop(ready(one.as_mut()));
    timed(&pool, 1);
    // A growth of the budget.
    let grows = self::pool(BufferSize::S64, 1);
    let held = grows.try_allocate(1).unwrap();
    let mut two = pin!(grows.allocate(1));
    assert!(poll(two.as_mut()).is_pending());
    thread::sleep(MS20);
    grows.add_max_memory(64);
    drop(ready(two.as_mut()));
    timed(&grows, 1);
    drop(held);
    // A reservation's shrink.
    let shrinks = self::pool(BufferSize::S64, 2);
    let mut reservation = shrinks.try_reserve(128).unwrap();
    let mut three = pin!(shrinks.allocate(1));
    assert!(poll(three.as_mut()).is_pending());
    thread::sleep(MS20);
    reservation.shrink(64);
    drop(ready(three.as_mut()));
    timed(&shrinks, 1);
    drop(reservation);
    // The cancel of a head that held a smaller request back.
    let cancels = self::pool(BufferSize::S64, 2);
    let held = cancels.try_allocate(1).unwrap();
    let mut big = Box::pin(cancels.allocate(2));
    let mut small = pin!(cancels.allocate(1));
    assert!(poll(big.as_mut()).is_pending());
    assert!(poll(small.as_mut()).is_pending());
    thread::sleep(MS20);
    drop(big);
    drop(ready(small.as_mut()));
    timed(&cancels, 1);
    drop(held);
    // A grant in a child's own queue.
    let root = self::pool(BufferSize::S64, 4);
    let child = root.child("c", s64(1)).unwrap();
    let held = child.try_allocate(1).unwrap();
    let mut climber = Box::pin(child.allocate(1));
    assert!(poll(climber.as_mut()).is_pending());
    thread::sleep(MS20);
    drop(held);
    drop(ready(climber.as_mut()));
    drop(climber);
    timed(&child, 1);
    assert_eq!(root.stats().waited_allocations, 0);
}

/// Two threads: one runs hand-over cycles to its only waiter; the other, whenever no waiter
/// can be queued, checks `stats()` shows none, resizes the budget down and back, reserves and
/// allocates through a child pool what fits: none of it may fail or see a waiter.
#[test]
#[cfg_attr(
    miri,
    ignore = "a race loop of thousands of rounds: too slow under Miri"
)]
fn resizes_reservations_and_a_childs_tries_racing_hand_overs_see_an_empty_queue() {
    watchdog(20, || {
        let pool = Arc::new(pool(BufferSize::S64, 6));
        let child = pool.child("c", s64(1)).unwrap();
        let _reservation = pool.try_reserve(64).unwrap();
        let epoch = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let cycler = thread::spawn({
            let (pool, epoch, stop) = (Arc::clone(&pool), Arc::clone(&epoch), Arc::clone(&stop));
            move || {
                let _stop = StopOnDrop(Arc::clone(&stop));
                let mut handed = pool.try_allocate(3).unwrap();
                let end = Instant::now() + Duration::from_millis(700);
                let mut rounds = 0usize;
                while Instant::now() < end {
                    epoch.fetch_add(1, SeqCst);
                    let mut head = pin!(pool.allocate(3));
                    // The other side holds at most 1 buffer (and shrinks the budget for a
                    // moment): at most 2 free, so the head waits.
                    assert!(poll(head.as_mut()).is_pending(), "{}", pool.stats());
                    drop(handed);
                    handed = ready(head.as_mut());
                    epoch.fetch_add(1, SeqCst);
                    rounds += 1;
                }
                stop.store(true, SeqCst);
                drop(handed);
                rounds
            }
        });
        let mut checked = 0usize;
        let mut step = 0usize;
        while !stop.load(SeqCst) {
            let before = epoch.load(SeqCst);
            step += 1;
            let outcome: Result<(), String> = match step % 4 {
                0 => {
                    let waiting = pool.stats().waiting;
                    (waiting == 0)
                        .then_some(())
                        .ok_or(format!("{waiting} waiting"))
                }
                1 => {
                    pool.set_max_memory(5 * 64).unwrap();
                    pool.set_max_memory(6 * 64).unwrap();
                    Ok(())
                }
                2 => pool.try_reserve(64).map(drop).map_err(|e| e.to_string()),
                _ => child.try_allocate(1).map(drop).map_err(|e| e.to_string()),
            };
            let after = epoch.load(SeqCst);
            if before == after && before % 2 == 0 {
                checked += 1;
                if let Err(e) = outcome {
                    panic!(
                        "step {step}: {e} with the queue known empty: {}",
                        pool.stats()
                    );
                }
            }
        }
        let rounds = cycler.join().unwrap();
        assert!(
            rounds > 10 && checked > 10,
            "{rounds} rounds, {checked} checked"
        );
        let s = pool.stats();
        assert_eq!(
            (s.in_use_bytes, s.outstanding, s.waiting),
            (64, 0, 0),
            "{s}"
        );
        assert_eq!(s.max_memory, 6 * 64);
    });
}

/// Between the hand-over and the head's next poll the books say what the docs promise: the
/// handed bytes are in use ("granted bytes they have not yet picked up"), the wait is
/// counted, and the allocation is not yet one (`outstanding`, `total_allocations`).
#[test]
fn the_books_between_a_hand_over_and_the_heads_next_poll() {
    let pool = pool(BufferSize::S64, 2);
    let held = pool.try_allocate(2).unwrap();
    let mut head = pin!(pool.allocate(2));
    assert!(poll(head.as_mut()).is_pending());
    drop(held);
    let s = pool.stats();
    assert_eq!(
        (
            s.in_use_bytes,
            s.outstanding,
            s.waiting,
            s.total_allocations,
            s.waited_allocations
        ),
        (128, 0, 0, 1, 1),
        "{s}"
    );
    assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    let got = ready(head.as_mut());
    let s = pool.stats();
    assert_eq!(
        (s.in_use_bytes, s.outstanding, s.total_allocations),
        (128, 1, 2),
        "{s}"
    );
    drop(got);
    assert_full_budget_back(&pool);
}

/// `close()` then `drained().await` with a handed block outstanding in another task: it
/// waits for the block, then everything is back.
#[test]
#[cfg_attr(miri, ignore = "tokio's timer")]
fn drained_awaits_a_handed_block_held_by_another_task() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(common::within(5, async {
        let pool = Arc::new(pool(BufferSize::S64, 2));
        let held = pool.try_allocate(2).unwrap();
        let address = held.first() as usize;
        let returned = Arc::new(AtomicBool::new(false));
        let waiter = tokio::spawn({
            let (pool, returned) = (Arc::clone(&pool), Arc::clone(&returned));
            async move {
                let handed = pool.allocate(2).await.unwrap();
                assert_eq!(handed.first() as usize, address, "handed over");
                tokio::time::sleep(Duration::from_millis(30)).await;
                returned.store(true, SeqCst);
                drop(handed);
            }
        });
        while pool.stats().waiting == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        pool.close();
        pool.drained().await;
        assert!(
            returned.load(SeqCst),
            "drained before the handed block was back"
        );
        waiter.await.unwrap();
        let pool = Arc::try_unwrap(pool).expect("the task's handle is gone");
        assert_idle(&pool);
        pool.shutdown().await;
    }));
}
