//! s30b: queue limits (`max_waiters`) and closing or dropping a child while its parent has
//! waiters, as a new user reads README "Waits you can own, poll or bound", "Budgets beyond
//! one pool" and guarantees 8, 13 and 15. Every quiescent point's books (in use, reserved,
//! waiting, queue_full) are checked against what the test holds, and the order in which the
//! waiters are served against FIFO.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};

fn cfg(max_memory: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory,
    }
}

/// A waker that counts its wake-ups.
struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

fn counter() -> (Arc<Count>, Waker) {
    let count = Arc::new(Count(AtomicUsize::new(0)));
    (Arc::clone(&count), Waker::from(count))
}

fn poll<F: Future + ?Sized>(future: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(waker))
}

/// (in use, reserved, waiting, queue_full)
fn books(pool: &BufPool) -> (usize, usize, usize, usize) {
    let s = pool.stats();
    (s.in_use_bytes, s.reserved_bytes, s.waiting, s.queue_full)
}

#[test]
fn a_full_queue_refuses_every_form_at_once_and_leaves_the_books_exact() {
    watchdog(20, || {
        let pool = BufPool::builder(cfg(256)).max_waiters(2).build().unwrap();
        let (_, waker) = counter();
        let mut all = pool.try_reserve(256).unwrap();
        let mut a = Box::pin(pool.allocate(1));
        let mut b = Box::pin(pool.reserve(64));
        assert!(poll(a.as_mut(), &waker).is_pending());
        assert!(poll(b.as_mut(), &waker).is_pending());
        assert_eq!(books(&pool), (256, 256, 2, 0));

        // Every waiting form is refused at once; the try forms say WouldBlock.
        let mut c = Box::pin(pool.allocate(1));
        assert_eq!(
            poll(c.as_mut(), &waker).map(|r| r.map(drop)),
            Poll::Ready(Err(AllocError::QueueFull))
        );
        let mut empty = pool.try_reserve(0).unwrap();
        {
            let mut grow = Box::pin(empty.grow(8));
            assert_eq!(
                poll(grow.as_mut(), &waker),
                Poll::Ready(Err(AllocError::QueueFull))
            );
        }
        assert_eq!(
            empty.size(),
            0,
            "a refused grow leaves the reservation as it was"
        );
        assert_eq!(empty.grow_blocking(8), Err(AllocError::QueueFull));
        assert_eq!(
            pool.reserve_timeout(8, Duration::from_secs(5)).unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(pool.reserve_blocking(8).unwrap_err(), AllocError::QueueFull);
        assert_eq!(
            pool.allocate_zeroed_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        let mut owned = Box::pin(Arc::new(BufPool::new(cfg(64))).reserve_owned(8));
        assert!(poll(owned.as_mut(), &waker).is_ready());
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(pool.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(empty.try_grow(8), Err(AllocError::WouldBlock));
        // A resize to zero of an empty reservation and a reserve(0) never wait: never refused.
        assert_eq!(empty.resize_to(0), Ok(()));
        assert_eq!(
            futures::executor::block_on(pool.reserve(0)).unwrap().size(),
            0
        );
        assert_eq!(books(&pool), (256, 256, 2, 6), "{}", pool.stats());

        // FIFO is kept: a release of 64 serves the head (a) only; the next 64 serve b.
        all.shrink(64);
        let a = match poll(a.as_mut(), &waker) {
            Poll::Ready(Ok(a)) => a,
            other => panic!("the head is served first: {other:?}"),
        };
        assert!(poll(b.as_mut(), &waker).is_pending());
        assert_eq!(books(&pool), (256, 192, 1, 6));
        all.shrink(64);
        let b = match poll(b.as_mut(), &waker) {
            Poll::Ready(Ok(b)) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(b.size(), 64);
        assert_eq!(books(&pool), (256, 192, 0, 6));
        // A place is free again: a new waiter queues.
        let mut d = Box::pin(pool.allocate(1));
        assert!(poll(d.as_mut(), &waker).is_pending());
        drop(a);
        assert!(poll(d.as_mut(), &waker).is_ready());
        drop((b, all, empty, c, d));
        assert_eq!(books(&pool), (0, 0, 0, 6));
    });
}

#[test]
fn a_childs_request_refused_by_a_full_parent_queue_gives_its_own_level_back() {
    watchdog(20, || {
        let root = BufPool::builder(cfg(256)).max_waiters(1).build().unwrap();
        let child = BufPool::builder(cfg(256))
            .name("child")
            .parent(&root)
            .build()
            .unwrap();
        let (_, waker) = counter();
        let held = root.try_reserve(256).unwrap();
        let mut head = Box::pin(root.allocate(1));
        assert!(poll(head.as_mut(), &waker).is_pending());
        // The child has room; its requests would wait at the root, whose queue is full.
        assert_eq!(
            child.allocate_blocking(1).unwrap_err(),
            AllocError::QueueFull
        );
        assert_eq!(
            child.reserve_blocking(64).unwrap_err(),
            AllocError::QueueFull
        );
        let mut r = child.try_reserve(0).unwrap();
        assert_eq!(r.grow_blocking(64), Err(AllocError::QueueFull));
        assert_eq!(r.size(), 0);
        // The root counts what its full queue refused; the child holds nothing.
        assert_eq!(books(&child), (0, 0, 0, 0), "{}", child.stats());
        assert_eq!(books(&root), (256, 256, 1, 3), "{}", root.stats());
        drop(held);
        assert!(poll(head.as_mut(), &waker).is_ready());
        drop((head, r));
        assert_eq!(books(&root), (0, 0, 0, 3));
    });
}

/// README: "A child pool's request that already waited in a queue below and then finds this
/// queue full is not refused: it keeps what it holds and waits for a place".
#[test]
fn a_childs_waiter_climbing_into_a_full_parent_queue_keeps_its_level_and_is_served_after_the_head()
{
    watchdog(20, || {
        let root = BufPool::builder(cfg(256)).max_waiters(1).build().unwrap();
        let child = BufPool::builder(cfg(128)).parent(&root).build().unwrap();
        let (_, waker) = counter();
        let (woken, grow_waker) = counter();
        let rr = root.try_reserve(128).unwrap();
        let mut cr = child.try_reserve(128).unwrap();
        // The child's request waits in the child's queue (its own cap is short).
        let mut cw = child.try_reserve(0).unwrap();
        let mut grow = Box::pin(cw.grow(64));
        assert!(poll(grow.as_mut(), &grow_waker).is_pending());
        // The root's queue fills: its head wants 128.
        let mut head = Box::pin(root.allocate(2));
        assert!(poll(head.as_mut(), &waker).is_pending());
        assert_eq!(books(&child), (128, 128, 1, 0));
        assert_eq!(books(&root), (256, 128, 1, 0));
        // 64 back in the child: the grow holds the child's level and climbs to a full queue.
        cr.shrink(64);
        assert!(woken.0.load(SeqCst) >= 1);
        assert!(poll(grow.as_mut(), &grow_waker).is_pending());
        let s = child.stats();
        assert_eq!(
            (s.in_use_bytes, s.reserved_bytes, s.waiting, s.queue_full),
            (128, 64, 0, 0),
            "the grow keeps its child level and waits in no queue: {s}"
        );
        let s = root.stats();
        assert_eq!(
            (s.in_use_bytes, s.waiting, s.queue_full),
            (192, 1, 0),
            "not refused, not queued at the root: {s}"
        );
        // The root's head is served once 128 are free; then the grow gets its place.
        drop(rr);
        let Poll::Ready(Ok(head)) = poll(head.as_mut(), &waker) else {
            panic!("the root's head is served: {}", root.stats())
        };
        assert_eq!(poll(grow.as_mut(), &grow_waker), Poll::Ready(Ok(())));
        drop(grow);
        assert_eq!(cw.size(), 64);
        assert_eq!(books(&child), (128, 128, 0, 0));
        assert_eq!(books(&root), (256, 0, 0, 0));
        drop((head, cw, cr));
        assert_eq!(books(&root), (0, 0, 0, 0));
        assert_eq!(books(&child), (0, 0, 0, 0));
    });
}

#[test]
fn max_waiters_zero_serves_what_fits_and_refuses_the_rest_for_reservations_too() {
    let pool = BufPool::builder(cfg(128)).max_waiters(0).build().unwrap();
    let mut r = futures::executor::block_on(pool.reserve(64)).unwrap();
    futures::executor::block_on(r.grow(64)).unwrap();
    assert_eq!(r.size(), 128);
    assert_eq!(
        futures::executor::block_on(r.grow(8)),
        Err(AllocError::ExceedsBudget {
            requested_bytes: 136,
            max_memory: 128
        }),
        "beyond the budget beside itself: ExceedsBudget, not QueueFull"
    );
    let mut other = pool.try_reserve(0).unwrap();
    assert_eq!(
        futures::executor::block_on(other.grow(8)),
        Err(AllocError::QueueFull)
    );
    assert_eq!(
        futures::executor::block_on(pool.reserve(8)).unwrap_err(),
        AllocError::QueueFull
    );
    assert_eq!(books(&pool), (128, 128, 0, 2));
    r.shrink(8);
    other.grow_blocking(8).unwrap();
    assert_eq!(books(&pool), (128, 128, 0, 2));
}

/// A parent's queue: [parent P1, child C (waiting at the parent's level), parent P2]. Closing
/// the child fails C only (its child level back), and the parent's waiters stay in order.
#[test]
fn closing_a_child_whose_request_waits_in_the_parent_queue_keeps_the_parents_fifo() {
    watchdog(20, || {
        let root = BufPool::new(cfg(256));
        let child = BufPool::builder(cfg(256)).parent(&root).build().unwrap();
        let (_, waker) = counter();
        let (c_woken, c_waker) = counter();
        let mut all = root.try_reserve(256).unwrap();
        let mut p1 = Box::pin(root.allocate(1));
        assert!(poll(p1.as_mut(), &waker).is_pending());
        let mut c = Box::pin(child.reserve(64));
        assert!(poll(c.as_mut(), &c_waker).is_pending());
        let mut p2 = Box::pin(root.reserve(64));
        assert!(poll(p2.as_mut(), &waker).is_pending());
        assert_eq!(books(&root), (256, 256, 3, 0));
        assert_eq!(
            child.stats().in_use_bytes,
            64,
            "its own level, held while it waits above"
        );
        child.close();
        assert!(
            c_woken.0.load(SeqCst) >= 1,
            "the closed child's waiter is woken"
        );
        assert_eq!(
            poll(c.as_mut(), &c_waker).map(|r| r.map(|r| r.size())),
            Poll::Ready(Err(AllocError::Closed))
        );
        assert_eq!(books(&child), (0, 0, 0, 0));
        assert_eq!(books(&root), (256, 256, 2, 0));
        all.shrink(64);
        let Poll::Ready(Ok(p1)) = poll(p1.as_mut(), &waker) else {
            panic!("the head is served first")
        };
        assert!(poll(p2.as_mut(), &waker).is_pending());
        all.shrink(64);
        let p2 = match poll(p2.as_mut(), &waker) {
            Poll::Ready(Ok(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(books(&root), (256, 192, 0, 0));
        drop((p1, p2, all, c));
        assert_eq!(books(&root), (0, 0, 0, 0));
    });
}

/// Dropping (and closing) a floored child gives its floor back to the parent, whose waiters
/// it serves.
#[test]
fn a_floored_child_dropped_or_closed_serves_the_parents_waiters_with_its_floor() {
    watchdog(20, || {
        let root = BufPool::new(cfg(512));
        let child = BufPool::builder(cfg(512))
            .parent(&root)
            .min_memory(256)
            .build()
            .unwrap();
        let (woken, waker) = counter();
        let held = root.try_reserve(256).unwrap();
        let mut waiting = Box::pin(root.reserve(128));
        assert!(poll(waiting.as_mut(), &waker).is_pending());
        assert_eq!(books(&root), (512, 256, 1, 0));
        drop(child);
        assert_eq!(
            woken.0.load(SeqCst),
            1,
            "the floor's return wakes the parent's waiter"
        );
        let got = match poll(waiting.as_mut(), &waker) {
            Poll::Ready(Ok(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(books(&root), (384, 384, 0, 0));
        drop(got);

        // Closed, not dropped, while an allocation uses 64 of its floor: the free 192 go back
        // at once and serve the waiter; the rest with the allocation.
        let child = BufPool::builder(cfg(512))
            .parent(&root)
            .min_memory(256)
            .build()
            .unwrap();
        let used = child.try_allocate(1).unwrap();
        let mut waiting = Box::pin(root.reserve(192));
        assert!(poll(waiting.as_mut(), &waker).is_pending());
        assert_eq!(books(&root), (512, 256, 1, 0));
        child.close();
        let got = match poll(waiting.as_mut(), &waker) {
            Poll::Ready(Ok(r)) => r,
            other => panic!("the free part of the floor serves the waiter: {other:?}"),
        };
        assert_eq!(books(&root), (512, 448, 0, 0));
        assert_eq!(child.stats().in_use_bytes, 64);
        drop(used);
        assert_eq!(books(&root), (448, 448, 0, 0));
        assert_eq!(child.report().min_memory, 0, "a closed pool has no floor");
        drop((got, held, child));
        assert_eq!(books(&root), (0, 0, 0, 0));
    });
}

/// Dropping a child blocks while one of its reservations is out (the barrier waits for
/// reservations too); meanwhile the child is closed and its floor's free part already
/// serves the parent's waiter. An owned reservation instead keeps the child alive without
/// blocking the dropper.
#[test]
fn dropping_a_child_with_a_reservation_out_while_the_parent_has_waiters() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(512)));
        let child = BufPool::builder(cfg(512))
            .parent(&root)
            .min_memory(256)
            .build()
            .unwrap();
        let r = child.try_reserve(64).unwrap();
        let held = root.try_reserve(256).unwrap();
        let dropper = std::thread::spawn(move || drop(child));
        // The waiter is served by the floor's free 192 once the drop closed the child.
        let got = root
            .reserve_timeout(192, Duration::from_secs(5) * common::SLOWDOWN)
            .expect("the closing child's free floor serves the waiter");
        assert!(!dropper.is_finished(), "the drop waits for the reservation");
        assert_eq!(books(&root), (512, 448, 0, 0));
        drop(r);
        dropper.join().unwrap();
        assert_eq!(books(&root), (448, 448, 0, 0));
        drop(got);

        // Owned: the handle's drop returns at once; the floor holds until the reservation
        // is back.
        let child = Arc::new(
            BufPool::builder(cfg(512))
                .parent(&root)
                .min_memory(256)
                .build()
                .unwrap(),
        );
        let r = futures::executor::block_on(Arc::clone(&child).reserve_owned(64)).unwrap();
        drop(child);
        assert_eq!(
            root.stats().in_use_bytes,
            512,
            "the child lives on, floor and all"
        );
        let waiter = {
            let root = Arc::clone(&root);
            std::thread::spawn(move || {
                root.reserve_timeout(256, Duration::from_secs(5) * common::SLOWDOWN)
            })
        };
        common::wait_until(5, "the waiter queues", || root.stats().waiting == 1);
        drop(r);
        let got = waiter
            .join()
            .unwrap()
            .expect("the floor's return serves the waiter");
        assert_eq!(books(&root), (512, 512, 0, 0));
        drop((got, held));
        assert_eq!(books(&root), (0, 0, 0, 0));
    });
}

/// Doc fix (`PoolReport::own_bytes`, README "Who holds what"): while a child's request waits
/// in the parent's queue it counts in the child's bytes in use (it holds the child's level)
/// but not yet in the parent's, so the parent's `own_bytes` (in use less what its children
/// take) undercounts by it, down to 0 here though the parent holds 512 bytes itself; exact
/// again once nobody waits.
#[test]
fn own_bytes_undercount_the_parent_while_a_childs_request_waits_above() {
    let root = BufPool::builder(cfg(1024)).name("root").build().unwrap();
    let child = root.child("child", cfg(1024)).unwrap();
    let held = root.try_reserve(512).unwrap();
    let (_, waker) = counter();
    let mut waiting = Box::pin(child.reserve(640));
    assert!(poll(waiting.as_mut(), &waker).is_pending());
    let report = root.report();
    assert_eq!((report.in_use_bytes, report.reserved_bytes), (512, 512));
    assert_eq!(
        report.children[0].in_use_bytes, 640,
        "the request's child level"
    );
    assert_eq!(
        report.own_bytes(),
        0,
        "documented: undercounted while it waits"
    );
    assert_eq!(report.top(1)[0].name.as_deref(), Some("child"));
    drop(waiting);
    let report = root.report();
    assert_eq!(report.own_bytes(), 512, "exact once nobody waits");
    assert_eq!(report.top(1)[0].name.as_deref(), Some("root"));
    drop(held);
}
