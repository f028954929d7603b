//! Hostile wakers on queued requests, driven by hand (`Future::poll` with our own
//! `Context`): wakers that re-enter the pool from `wake` (try_allocate, a new request,
//! close, a resize, cancelling another queued request, dropping a floored child's last
//! handle, closing a middle pool), wakers that own allocations, wakers that panic. After
//! each: FIFO order for the waiters left, no lost wakeup, exact books.
//!
//! Deterministic and single-threaded (apart from watchdogs): every test runs under Miri.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use common::*;
use membudget::{AllocError, AllocateOwned, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize};

const BS: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * BS,
    }
}

type Action = Box<dyn FnOnce() + Send>;

/// A waker that counts its wakes and runs `action` (once) on the first.
struct Hostile {
    woken: Arc<AtomicUsize>,
    action: Mutex<Option<Action>>,
    /// Owned by the waker: dropped when the last clone of the waker is.
    #[allow(dead_code)]
    owned: Mutex<Option<BufPoolAllocation>>,
}

impl Wake for Hostile {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.fetch_add(1, SeqCst);
        let action = self.action.lock().unwrap().take();
        if let Some(action) = action {
            action();
        }
    }
}

/// A waker running `action` on its first wake, and the counter of its wakes.
fn hostile(action: impl FnOnce() + Send + 'static) -> (Waker, Arc<AtomicUsize>) {
    let woken = Arc::new(AtomicUsize::new(0));
    let waker = Waker::from(Arc::new(Hostile {
        woken: Arc::clone(&woken),
        action: Mutex::new(Some(Box::new(action))),
        owned: Mutex::new(None),
    }));
    (waker, woken)
}

/// A waker that only counts.
fn counting() -> (Waker, Arc<AtomicUsize>) {
    hostile(|| {})
}

fn poll<F: Future + ?Sized>(f: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(waker))
}

#[track_caller]
fn pending<F: Future + ?Sized>(f: Pin<&mut F>, waker: &Waker) {
    assert!(poll(f, waker).is_pending(), "expected the request to wait");
}

#[track_caller]
fn done<F: Future + ?Sized>(f: Pin<&mut F>, waker: &Waker) -> F::Output {
    match poll(f, waker) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected the request to be done"),
    }
}

type Slot = Arc<Mutex<Option<Pin<Box<AllocateOwned>>>>>;

fn slot(f: AllocateOwned) -> Slot {
    Arc::new(Mutex::new(Some(Box::pin(f))))
}

#[track_caller]
fn idle_and_whole(pool: &BufPool) {
    assert_idle(pool);
    assert_full_budget_back(pool);
}

/// A's wake calls `try_allocate(1)` while one buffer is free and B (3) waits behind: FIFO
/// says `WouldBlock` (no barging, `try_allocate` included), and B is served next.
#[test]
fn wake_try_allocate_does_not_barge_past_the_waiter_behind() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let (h1, h2) = (pool.try_allocate(2).unwrap(), pool.try_allocate(2).unwrap());
        let got: Arc<Mutex<Option<Result<BufPoolAllocation, AllocError>>>> = Arc::default();
        let (p, g) = (Arc::clone(&pool), Arc::clone(&got));
        let (wa, woken_a) = hostile(move || *g.lock().unwrap() = Some(p.try_allocate(1)));
        let (wb, woken_b) = counting();
        let mut a = Box::pin(pool.allocate(1));
        let mut b = Box::pin(pool.allocate(3));
        pending(a.as_mut(), &wa);
        pending(b.as_mut(), &wb);
        drop(h1);
        assert_eq!(woken_a.load(SeqCst), 1);
        let barged = got.lock().unwrap().take().expect("A's waker ran");
        assert_eq!(
            barged.as_ref().err(),
            Some(&AllocError::WouldBlock),
            "a try_allocate from a waker took budget ahead of a waiter: {:?}",
            pool.stats()
        );
        drop(barged);
        let a = done(a.as_mut(), &wa).unwrap();
        assert_eq!(woken_b.load(SeqCst), 0);
        pending(b.as_mut(), &wb);
        drop(h2);
        assert_eq!(woken_b.load(SeqCst), 1);
        let b = done(b.as_mut(), &wb).unwrap();
        assert_eq!(b.length(), 3);
        drop((a, b));
        idle_and_whole(&pool);
    });
}

/// A's wake queues a new request C (1) with one buffer free and B (3) waiting: C waits
/// behind B and is served after it.
#[test]
fn wake_enqueues_a_new_request_behind_the_waiters_it_finds() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let (h1, h2) = (pool.try_allocate(2).unwrap(), pool.try_allocate(2).unwrap());
        let c = slot(Arc::clone(&pool).allocate_owned(1));
        let (wc, woken_c) = counting();
        let c_first: Arc<Mutex<Option<bool>>> = Arc::default();
        let (c2, wc2, first) = (Arc::clone(&c), wc.clone(), Arc::clone(&c_first));
        let (wa, _) = hostile(move || {
            let mut c = c2.lock().unwrap();
            let ready = poll(c.as_mut().unwrap().as_mut(), &wc2).is_ready();
            *first.lock().unwrap() = Some(ready);
        });
        let (wb, woken_b) = counting();
        let mut a = Box::pin(pool.allocate(1));
        let mut b = Box::pin(pool.allocate(3));
        pending(a.as_mut(), &wa);
        pending(b.as_mut(), &wb);
        drop(h1);
        assert_eq!(
            *c_first.lock().unwrap(),
            Some(false),
            "a request made in a waker barged past B"
        );
        assert_eq!(pool.stats().waiting, 2);
        let a = done(a.as_mut(), &wa).unwrap();
        drop(h2); // 3 free: B's, not C's
        assert_eq!((woken_b.load(SeqCst), woken_c.load(SeqCst)), (1, 0));
        let b = done(b.as_mut(), &wb).unwrap();
        drop(a); // now C
        assert_eq!(woken_c.load(SeqCst), 1);
        let cc = done(c.lock().unwrap().as_mut().unwrap().as_mut(), &wc).unwrap();
        drop((b, cc));
        *c.lock().unwrap() = None;
        idle_and_whole(&pool);
    });
}

/// A's wake closes the pool: B (queued behind) gets `Closed` and is woken; nothing is lost
/// whatever A's own outcome.
#[test]
fn wake_closes_the_pool_with_a_waiter_behind() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let (h1, h2) = (pool.try_allocate(2).unwrap(), pool.try_allocate(2).unwrap());
        let p = Arc::clone(&pool);
        let (wa, _) = hostile(move || p.close());
        let (wb, woken_b) = counting();
        let mut a = Box::pin(pool.allocate(1));
        let mut b = Box::pin(pool.allocate(3));
        pending(a.as_mut(), &wa);
        pending(b.as_mut(), &wb);
        drop(h1);
        assert!(pool.is_closed());
        assert_eq!(
            woken_b.load(SeqCst),
            1,
            "B not woken by the close in A's waker"
        );
        assert_eq!(done(b.as_mut(), &wb).unwrap_err(), AllocError::Closed);
        let a_out = done(a.as_mut(), &wa);
        // A was granted before the close: Ok is expected; either way nothing is lost.
        assert!(a_out.is_ok(), "granted A failed: {a_out:?}");
        drop((a_out, h2));
        assert_idle(&pool);
        assert_eq!(pool.stats().waiting, 0);
    });
}

/// A and B are granted by one release; A's wake cancels B (drops its future) before B took
/// its grant: B's buffer goes to C, who is woken.
#[test]
fn wake_cancels_a_granted_waiter_its_grant_goes_to_the_next() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let (h1, h2) = (pool.try_allocate(2).unwrap(), pool.try_allocate(2).unwrap());
        let b = slot(Arc::clone(&pool).allocate_owned(1));
        let b2 = Arc::clone(&b);
        let (wa, _) = hostile(move || *b2.lock().unwrap() = None);
        let (wb, _) = counting();
        let (wc, woken_c) = counting();
        let mut a = Box::pin(pool.allocate(1));
        pending(a.as_mut(), &wa);
        pending(b.lock().unwrap().as_mut().unwrap().as_mut(), &wb);
        let mut c = Box::pin(pool.allocate(1));
        pending(c.as_mut(), &wc);
        drop(h1); // room for A and B; A's waker drops B
        assert!(b.lock().unwrap().is_none());
        assert_eq!(
            woken_c.load(SeqCst),
            1,
            "B's grant did not go on to C (lost wakeup)"
        );
        let c = done(c.as_mut(), &wc).unwrap();
        let a = done(a.as_mut(), &wa).unwrap();
        let s = pool.stats();
        assert_eq!((s.in_use_bytes, s.waiting), (4 * BS, 0), "{s}");
        drop((a, c, h2));
        idle_and_whole(&pool);
    });
}

/// A is granted; B (3) heads the queue and blocks C (1) though one buffer is free. A's wake
/// cancels B: C now fits what is free and must be woken (no lost wakeup).
#[test]
fn wake_cancels_the_blocking_head_the_waiter_behind_is_served() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let (h1, h2) = (pool.try_allocate(2).unwrap(), pool.try_allocate(2).unwrap());
        let b = slot(Arc::clone(&pool).allocate_owned(3));
        let b2 = Arc::clone(&b);
        let (wa, _) = hostile(move || *b2.lock().unwrap() = None);
        let (wb, _) = counting();
        let (wc, woken_c) = counting();
        let mut a = Box::pin(pool.allocate(1));
        pending(a.as_mut(), &wa);
        pending(b.lock().unwrap().as_mut().unwrap().as_mut(), &wb);
        let mut c = Box::pin(pool.allocate(1));
        pending(c.as_mut(), &wc);
        drop(h1);
        assert!(b.lock().unwrap().is_none());
        assert_eq!(
            woken_c.load(SeqCst),
            1,
            "C fits the free buffer but was not woken"
        );
        let c = done(c.as_mut(), &wc).unwrap();
        let a = done(a.as_mut(), &wa).unwrap();
        drop((a, c, h2));
        idle_and_whole(&pool);
    });
}

/// A's wake shrinks the budget so that B (3, waiting) can never fit: B fails with
/// `ExceedsBudget` and is woken (guarantee 14).
#[test]
fn wake_shrinks_the_budget_below_the_waiter_behind() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let (h1, h2) = (pool.try_allocate(2).unwrap(), pool.try_allocate(2).unwrap());
        let p = Arc::clone(&pool);
        let (wa, _) = hostile(move || p.set_max_memory(2 * BS).unwrap());
        let (wb, woken_b) = counting();
        let mut a = Box::pin(pool.allocate(1));
        let mut b = Box::pin(pool.allocate(3));
        pending(a.as_mut(), &wa);
        pending(b.as_mut(), &wb);
        drop(h1);
        assert_eq!(woken_b.load(SeqCst), 1);
        assert!(matches!(
            done(b.as_mut(), &wb),
            Err(AllocError::ExceedsBudget { .. })
        ));
        let a = done(a.as_mut(), &wa).unwrap();
        drop((a, h2));
        pool.set_max_memory(4 * BS).unwrap();
        idle_and_whole(&pool);
    });
}

/// A and B are granted by one release; A's wake shrinks the budget to one buffer. B's grant
/// was made before the shrink; the books must stay exact whatever B gets.
#[test]
fn wake_shrinks_the_budget_below_an_already_granted_waiter() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let (h1, h2) = (pool.try_allocate(2).unwrap(), pool.try_allocate(2).unwrap());
        let p = Arc::clone(&pool);
        let (wa, _) = hostile(move || p.set_max_memory(BS).unwrap());
        let (wb, _) = counting();
        let mut a = Box::pin(pool.allocate(1));
        let mut b = Box::pin(pool.allocate(1));
        pending(a.as_mut(), &wa);
        pending(b.as_mut(), &wb);
        drop(h1);
        let b_out = done(b.as_mut(), &wb);
        let a = done(a.as_mut(), &wa).unwrap();
        eprintln!("B granted before the shrink, completed after it: {b_out:?}");
        drop((a, b_out, h2));
        assert_idle(&pool);
        pool.set_max_memory(4 * BS).unwrap();
        idle_and_whole(&pool);
    });
}

/// A's wake drops the last handle of a floored child: the floor goes back inside a give-back
/// of the parent, and B (needing exactly the floor's room) is served.
#[test]
fn wake_drops_the_last_handle_of_a_floored_child_the_floor_serves_the_next() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(16)));
        let child = BufPool::builder(cfg(8))
            .parent(&root)
            .min_memory(8 * BS)
            .build()
            .unwrap();
        assert_eq!(root.stats().in_use_bytes, 8 * BS);
        let h1 = root.try_allocate(1).unwrap();
        let h7 = root.try_allocate(7).unwrap();
        let child_slot = Arc::new(Mutex::new(Some(child)));
        let cs = Arc::clone(&child_slot);
        let (wa, _) = hostile(move || drop(cs.lock().unwrap().take()));
        let (wb, woken_b) = counting();
        let mut a = Box::pin(root.allocate(1));
        let mut b = Box::pin(root.allocate(8));
        pending(a.as_mut(), &wa);
        pending(b.as_mut(), &wb);
        drop(h1);
        assert!(child_slot.lock().unwrap().is_none(), "A's waker ran");
        assert_eq!(
            woken_b.load(SeqCst),
            1,
            "the floor given back did not serve B"
        );
        let b = done(b.as_mut(), &wb).unwrap();
        let a = done(a.as_mut(), &wa).unwrap();
        drop((a, b, h7));
        idle_and_whole(&root);
    });
}

/// root ← mid ← leaf. At the root: A (root, 1) granted by a release of 2, L (leaf, 2)
/// waiting there, R (root, 1) behind L. A's wake closes mid: L fails `Closed` wherever it
/// waits and gives back its levels, and R, who now fits the free buffer, is woken.
#[test]
fn wake_closes_a_middle_pool_whose_leaf_request_blocks_the_root_queue() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(8)));
        let mid = Arc::new(root.child("mid", cfg(8)).unwrap());
        let leaf = mid.child("leaf", cfg(8)).unwrap();
        let h2 = root.try_allocate(2).unwrap();
        let h6 = root.try_allocate(6).unwrap();
        let m = Arc::clone(&mid);
        let (wa, _) = hostile(move || m.close());
        let (wl, woken_l) = counting();
        let (wr, woken_r) = counting();
        let mut a = Box::pin(root.allocate(1));
        let mut l = Box::pin(leaf.allocate(2));
        let mut r = Box::pin(root.allocate(1));
        pending(a.as_mut(), &wa);
        pending(l.as_mut(), &wl);
        assert_eq!(root.stats().waiting, 2, "L climbed to the root's queue");
        pending(r.as_mut(), &wr);
        drop(h2);
        assert!(mid.is_closed() && leaf.is_closed());
        assert_eq!(woken_l.load(SeqCst), 1);
        assert_eq!(done(l.as_mut(), &wl).unwrap_err(), AllocError::Closed);
        assert_eq!(
            woken_r.load(SeqCst),
            1,
            "R fits the free buffer once L is gone but was not woken: {}",
            root.stats()
        );
        let r = done(r.as_mut(), &wr).unwrap();
        let a = done(a.as_mut(), &wa).unwrap();
        assert_eq!(
            (leaf.stats().in_use_bytes, mid.stats().in_use_bytes),
            (0, 0)
        );
        drop((a, r, h6, l));
        drop(leaf);
        drop(mid);
        idle_and_whole(&root);
    });
}

/// A leaf's request waits at the root; its waker owns an allocation of the leaf, consumed
/// by `wake` (the last clone): that allocation's give-back runs inside the root's give-back
/// and serves B, waiting at the root behind.
#[test]
fn waker_owning_a_leaf_allocation_is_consumed_by_wake_inside_a_give_back() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(8)));
        let mid = root.child("mid", cfg(8)).unwrap();
        let leaf = mid.child("leaf", cfg(8)).unwrap();
        let owned = leaf.try_allocate(2).unwrap();
        let h1 = root.try_allocate(1).unwrap();
        let h5 = root.try_allocate(5).unwrap();
        let woken_l = Arc::new(AtomicUsize::new(0));
        let wl = Waker::from(Arc::new(Hostile {
            woken: Arc::clone(&woken_l),
            action: Mutex::new(None),
            owned: Mutex::new(Some(owned)),
        }));
        let (wb, woken_b) = counting();
        let mut l_fut = Box::pin(leaf.allocate(1));
        let mut l = l_fut.as_mut();
        pending(l.as_mut(), &wl);
        drop(wl); // the pool's clone is the last: it owns the leaf's allocation
        let mut b = Box::pin(root.allocate(2));
        pending(b.as_mut(), &wb);
        drop(h1); // L granted; its waker consumed; the owned 2 go back; B fits
        assert_eq!(woken_l.load(SeqCst), 1);
        assert_eq!(
            woken_b.load(SeqCst),
            1,
            "the waker's allocation did not serve B"
        );
        let (wl2, _) = counting();
        let l = done(l.as_mut(), &wl2).unwrap();
        let b = done(b.as_mut(), &wb).unwrap();
        assert_eq!(leaf.stats().in_use_bytes, BS);
        assert_eq!(root.stats().in_use_bytes, 8 * BS);
        drop((l, b, h5));
        drop(l_fut);
        drop(leaf);
        drop(mid);
        idle_and_whole(&root);
    });
}

/// Closing mid fails two leaf requests, one waiting in the leaf's queue and one at the
/// root's; the first's waker panics in `wake`. The panic is passed on by `close`, the other
/// waiter is still woken with `Closed`, and every level's books are exact.
#[test]
fn close_of_a_middle_pool_with_a_panicking_leaf_waker() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(8)));
        let mid = root.child("mid", cfg(8)).unwrap();
        let leaf = mid.child("leaf", cfg(2)).unwrap();
        let held_leaf = leaf.try_allocate(1).unwrap();
        let held_root = root.try_allocate(7).unwrap();
        // L1 (1) climbs to the root (leaf has room for one); L2 (2) waits in the leaf's queue.
        let (w1, woken1) = hostile(|| panic!("hostile wake"));
        let (w2, woken2) = counting();
        let mut l1 = Box::pin(leaf.allocate(1));
        let mut l2 = Box::pin(leaf.allocate(2));
        pending(l1.as_mut(), &w1);
        pending(l2.as_mut(), &w2);
        assert_eq!((root.stats().waiting, leaf.stats().waiting), (1, 1));
        let closed = catch_unwind(AssertUnwindSafe(|| mid.close()));
        assert!(closed.is_err(), "the waker's panic is passed on");
        assert_eq!((woken1.load(SeqCst), woken2.load(SeqCst)), (1, 1));
        assert_eq!(done(l1.as_mut(), &w2).unwrap_err(), AllocError::Closed);
        assert_eq!(done(l2.as_mut(), &w2).unwrap_err(), AllocError::Closed);
        for p in [&*root, &mid, &leaf] {
            assert_eq!(p.stats().waiting, 0, "{}", p.stats());
        }
        assert_eq!(leaf.stats().in_use_bytes, BS);
        assert_eq!(root.stats().in_use_bytes, 8 * BS);
        drop((held_leaf, held_root, l1, l2));
        drop(leaf);
        drop(mid);
        idle_and_whole(&root);
    });
}

/// A's wake drops a reservation growing in the root's queue behind it (a `grow` future and
/// its reservation, both owned by the waker's slot): the bytes it held and its place go, and
/// C behind is served from what it held.
#[test]
fn wake_drops_a_reservation_whose_grow_waits_behind() {
    watchdog(20, || {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let h2 = pool.try_allocate(2).unwrap();
        let h1 = pool.try_allocate(1).unwrap();
        // G holds 1 buffer's bytes and grows by 2 (waits: nothing free).
        let g: Arc<Mutex<Option<(membudget::Reservation, u8)>>> =
            Arc::new(Mutex::new(Some((pool.try_reserve(BS).unwrap(), 0))));
        let (wa, _) = {
            let g = Arc::clone(&g);
            hostile(move || drop(g.lock().unwrap().take()))
        };
        let (wg, woken_g) = counting();
        let (wc, woken_c) = counting();
        let mut a = Box::pin(pool.allocate(1));
        pending(a.as_mut(), &wa);
        {
            let mut guard = g.lock().unwrap();
            let (res, _) = guard.as_mut().unwrap();
            let mut grow = Box::pin(res.grow(2 * BS));
            pending(grow.as_mut(), &wg);
            // A grow is cancel safe: dropped here, its place goes. Queue it again below.
        }
        let mut c = Box::pin(pool.allocate(2));
        pending(c.as_mut(), &wc);
        drop(h1); // A granted; A's waker drops the reservation (1 buffer back) → C fits 2? no: 1 free
        assert_eq!(woken_g.load(SeqCst), 0);
        assert!(g.lock().unwrap().is_none());
        assert_eq!(woken_c.load(SeqCst), 0, "C needs 2, one is free");
        let a = done(a.as_mut(), &wa).unwrap();
        drop(a);
        assert_eq!(woken_c.load(SeqCst), 1);
        let c = done(c.as_mut(), &wc).unwrap();
        drop((c, h2));
        idle_and_whole(&pool);
    });
}

// ---------------------------------------------------------------------------------------
// Raw wakers whose clone, wake and drop re-enter the whole tree
// ---------------------------------------------------------------------------------------

use std::task::{RawWaker, RawWakerVTable};

/// What a hook does, and how often each entry ran.
struct Hooked {
    hook: Box<dyn Fn(&'static str) + Send + Sync>,
    clones: AtomicUsize,
    wakes: AtomicUsize,
    drops: AtomicUsize,
}

static HOOKED_VTABLE: RawWakerVTable =
    RawWakerVTable::new(hooked_clone, hooked_wake, hooked_wake_by_ref, hooked_drop);

unsafe fn hooked_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` came from `Arc::into_raw` of a live `Hooked`.
    let this = unsafe { &*data.cast::<Hooked>() };
    this.clones.fetch_add(1, SeqCst);
    (this.hook)("clone");
    // SAFETY: as above; one more strong count for the new waker.
    unsafe { Arc::increment_strong_count(data.cast::<Hooked>()) };
    RawWaker::new(data, &HOOKED_VTABLE)
}

unsafe fn hooked_wake(data: *const ()) {
    // SAFETY: as in `hooked_clone`; `wake` consumes the waker.
    unsafe {
        hooked_wake_by_ref(data);
        hooked_drop(data);
    }
}

unsafe fn hooked_wake_by_ref(data: *const ()) {
    // SAFETY: as in `hooked_clone`.
    let this = unsafe { &*data.cast::<Hooked>() };
    this.wakes.fetch_add(1, SeqCst);
    (this.hook)("wake");
}

unsafe fn hooked_drop(data: *const ()) {
    // SAFETY: as in `hooked_clone`: this waker's strong count is given up here.
    let this = unsafe { Arc::from_raw(data.cast::<Hooked>()) };
    this.drops.fetch_add(1, SeqCst);
    (this.hook)("drop");
}

fn hooked_waker(hook: impl Fn(&'static str) + Send + Sync + 'static) -> (Waker, Arc<Hooked>) {
    let hooked = Arc::new(Hooked {
        hook: Box::new(hook),
        clones: AtomicUsize::new(0),
        wakes: AtomicUsize::new(0),
        drops: AtomicUsize::new(0),
    });
    let data = Arc::into_raw(Arc::clone(&hooked)).cast::<()>();
    // SAFETY: the vtable's functions keep `Hooked`'s strong count as a waker's contract.
    let waker = unsafe { Waker::from_raw(RawWaker::new(data, &HOOKED_VTABLE)) };
    (waker, hooked)
}

/// Everything a hook may call on a tree: reads that take every lock of the chain (stats,
/// reports), a try_ request (dropped at once), a resize by zero, a reservation grown and
/// dropped. If any of these ran under a pool lock held by the caller of the hook, the
/// thread would deadlock (std mutexes are not reentrant): the watchdog catches it.
fn reenter_everything(pools: &[Arc<BufPool>]) {
    for p in pools {
        let _ = p.stats();
        let _ = p.report().to_string();
        let _ = p.tree_report();
        drop(p.try_allocate(1));
        p.add_max_memory(0);
        p.forget_max_memory(0);
        if let Ok(mut r) = p.try_reserve(8) {
            let _ = r.try_grow(8);
            r.shrink(8);
        }
    }
}

/// A leaf request climbs to the root and waits there; its raw waker's `clone`, `wake` and
/// `drop` re-enter every pool of the tree. It is polled (clone), re-polled with another such
/// waker (old one dropped, new cloned), granted by a release (wake), taken (drop). Then a
/// second one is cancelled while waiting (drop), a third failed by a close (wake, drop).
/// No deadlock, every hook ran, books exact.
#[test]
fn raw_waker_whose_clone_wake_and_drop_reenter_the_tree() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(8)));
        let mid = Arc::new(root.child("mid", cfg(8)).unwrap());
        let leaf = Arc::new(mid.child("leaf", cfg(8)).unwrap());
        let pools = vec![Arc::clone(&root), Arc::clone(&mid), Arc::clone(&leaf)];
        let mk = |pools: &Vec<Arc<BufPool>>| {
            let pools = pools.clone();
            hooked_waker(move |_| reenter_everything(&pools))
        };
        let hold = root.try_allocate(8).unwrap();

        // 1: queued, re-polled with another waker, granted, taken.
        let (w1, h1) = mk(&pools);
        let (w1b, h1b) = mk(&pools);
        let mut l = Box::pin(leaf.allocate(2));
        pending(l.as_mut(), &w1);
        pending(l.as_mut(), &w1b);
        drop(w1);
        drop(w1b);
        assert_eq!(root.stats().waiting, 1);
        drop(hold);
        assert_eq!(h1b.wakes.load(SeqCst), 1, "the registered waker woken");
        let (noop, _) = counting();
        let got = done(l.as_mut(), &noop).unwrap();
        assert_eq!(got.length(), 2);
        drop(l);
        for h in [&h1, &h1b] {
            assert_eq!(
                h.clones.load(SeqCst) + 1,
                h.drops.load(SeqCst),
                "a clone of the waker leaked or was dropped twice"
            );
        }

        // 2: cancelled while waiting at the root.
        let hold = root.try_allocate(6).unwrap();
        let (w2, h2) = mk(&pools);
        let mut l2 = Box::pin(leaf.allocate(2));
        pending(l2.as_mut(), &w2);
        assert_eq!(root.stats().waiting, 1);
        drop(w2);
        drop(l2);
        assert_eq!(h2.clones.load(SeqCst) + 1, h2.drops.load(SeqCst));
        for p in &pools {
            assert_eq!(p.stats().waiting, 0);
        }
        assert_eq!(leaf.stats().in_use_bytes, 2 * BS, "only `got`");

        // 3: failed by the close of mid while waiting at the root.
        let (w3, h3) = mk(&pools);
        let mut l3 = Box::pin(leaf.allocate(1));
        pending(l3.as_mut(), &w3);
        drop(w3);
        mid.close();
        assert_eq!(h3.wakes.load(SeqCst), 1);
        assert_eq!(done(l3.as_mut(), &noop).unwrap_err(), AllocError::Closed);
        drop(l3);
        assert_eq!(h3.clones.load(SeqCst) + 1, h3.drops.load(SeqCst));

        drop((got, hold));
        drop(pools);
        for p in [&*leaf, &*mid] {
            assert_eq!((p.stats().in_use_bytes, p.stats().waiting), (0, 0));
        }
        drop(leaf);
        drop(mid);
        idle_and_whole(&root);
    });
}

/// The same hostile raw waker on a request woken by every other path that serves or fails
/// waiters: a budget growth, a reservation's shrink, the drop of a deferred wake-up list,
/// a floor given back by a child's drop, a forget that fails it.
#[test]
fn raw_waker_reentering_on_every_wake_path() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(8)));
        let pools = vec![Arc::clone(&root)];
        let mk = || {
            let pools = pools.clone();
            hooked_waker(move |_| reenter_everything(&pools))
        };
        let (noop, _) = counting();

        // Growth.
        let hold = root.try_allocate(8).unwrap();
        let (w, h) = mk();
        let mut a = Box::pin(root.allocate(1));
        pending(a.as_mut(), &w);
        root.add_max_memory(BS);
        assert_eq!(h.wakes.load(SeqCst), 1, "growth woke the waiter");
        let a1 = done(a.as_mut(), &noop).unwrap();
        root.set_max_memory(8 * BS).unwrap(); // in use 9 of 8: overcommit until repaid
        drop(a1);
        drop(a);
        drop(hold);
        idle_and_whole(&root);

        // A reservation's shrink, and its deferred form.
        let mut r = root.try_reserve(8 * BS).unwrap();
        let (w, h) = mk();
        let mut a = Box::pin(root.allocate(1));
        pending(a.as_mut(), &w);
        r.shrink(BS);
        assert_eq!(h.wakes.load(SeqCst), 1);
        let a1 = done(a.as_mut(), &noop).unwrap();
        let (w, h) = mk();
        let mut b = Box::pin(root.allocate(2));
        pending(b.as_mut(), &w);
        let pending_wakeups = r.shrink_to_deferring_wakeups(r.size() - 2 * BS);
        assert_eq!(h.wakes.load(SeqCst), 0, "deferred until the list drops");
        drop(pending_wakeups);
        assert_eq!(h.wakes.load(SeqCst), 1);
        let b1 = done(b.as_mut(), &noop).unwrap();
        drop((a1, b1, r, a, b));
        idle_and_whole(&root);

        // A floor given back by a child's drop.
        let child = BufPool::builder(cfg(4))
            .parent(&root)
            .min_memory(4 * BS)
            .build()
            .unwrap();
        let hold = root.try_allocate(4).unwrap();
        let (w, h) = mk();
        let mut a = Box::pin(root.allocate(4));
        pending(a.as_mut(), &w);
        drop(child);
        assert_eq!(
            h.wakes.load(SeqCst),
            1,
            "the floor given back woke the waiter"
        );
        let a1 = done(a.as_mut(), &noop).unwrap();
        drop((a1, a, hold));
        idle_and_whole(&root);

        // A forget that leaves the waiter unable to ever fit.
        let hold = root.try_allocate(2).unwrap();
        let (w, h) = mk();
        let mut a = Box::pin(root.allocate(7));
        pending(a.as_mut(), &w);
        assert_eq!(root.forget_max_memory(2 * BS), 2 * BS);
        assert_eq!(h.wakes.load(SeqCst), 1, "the forget failed the waiter");
        assert!(matches!(
            done(a.as_mut(), &noop),
            Err(AllocError::ExceedsBudget { .. })
        ));
        drop((a, hold));
        root.add_max_memory(2 * BS);
        idle_and_whole(&root);
    });
}

// ---------------------------------------------------------------------------------------
// A leaf's request waiting for a place above a full queue (`max_waiters`)
// ---------------------------------------------------------------------------------------

/// root (8) → mid (8, `max_waiters(1)`) → leaf (4). Q (mid, 8) fills mid's queue; L (leaf, 2)
/// waited in the leaf's queue, was granted there and now waits for a place at mid (it is
/// not refused: it waited below). Then `event` happens; returns L's outcome (if L is woken
/// and done) with the books checked.
fn awaiting_room(event: &str) {
    let root = Arc::new(BufPool::new(cfg(8)));
    let mid = Arc::new(
        BufPool::builder(cfg(8))
            .parent(&root)
            .max_waiters(1)
            .build()
            .unwrap(),
    );
    let leaf = Arc::new(mid.child("leaf", cfg(4)).unwrap());
    let la = leaf.try_allocate(4).unwrap();
    let m = mid.try_allocate(4).unwrap();
    let (wq, woken_q) = counting();
    let (wl, woken_l) = counting();
    let mut q = Box::pin(mid.allocate(8));
    pending(q.as_mut(), &wq);
    let mut l = Box::pin(leaf.allocate(2));
    pending(l.as_mut(), &wl);
    assert_eq!(leaf.stats().waiting, 1);
    drop(la); // L granted in the leaf; it climbs and finds mid's queue full
    assert_eq!(woken_l.load(SeqCst), 1);
    pending(l.as_mut(), &wl);
    assert_eq!(
        (
            leaf.stats().in_use_bytes,
            mid.stats().waiting,
            leaf.stats().waiting
        ),
        (2 * BS, 1, 0),
        "L holds its leaf level and waits for a place at mid"
    );
    let before = woken_l.load(SeqCst);
    let expect: Result<(), AllocError> = match event {
        "close leaf" => {
            leaf.close();
            Err(AllocError::Closed)
        }
        "close mid" => {
            mid.close();
            Err(AllocError::Closed)
        }
        "close root" => {
            root.close();
            Err(AllocError::Closed)
        }
        "shrink leaf" => {
            leaf.set_max_memory(BS).unwrap();
            Err(AllocError::ExceedsBudget {
                requested_bytes: 2 * BS,
                max_memory: BS,
            })
        }
        "forget leaf" => {
            // 2 of 4 in use (L's): 2 free to forget, leaving 2, and L still fits. Then a
            // shrink to one buffer fails it.
            assert_eq!(leaf.forget_max_memory(usize::MAX), 2 * BS);
            leaf.set_max_memory(BS).unwrap();
            Err(AllocError::ExceedsBudget {
                requested_bytes: 2 * BS,
                max_memory: BS,
            })
        }
        "shrink mid" => {
            // Q (8) can never fit one buffer: it fails, a place opens, L finds mid too small.
            mid.set_max_memory(BS).unwrap();
            Err(AllocError::ExceedsBudget {
                requested_bytes: 2 * BS,
                max_memory: BS,
            })
        }
        "cancel q" => {
            drop(q);
            q = Box::pin(mid.allocate(1)); // placeholder, never polled
            Ok(())
        }
        _ => unreachable!(),
    };
    assert!(
        woken_l.load(SeqCst) > before,
        "{event}: L, waiting for a place above, was not woken: mid {} / leaf {}",
        mid.stats(),
        leaf.stats()
    );
    let out = done(l.as_mut(), &wl);
    match (&out, &expect) {
        (Ok(a), Ok(())) => assert_eq!(a.length(), 2),
        (Err(e), Err(want)) if std::mem::discriminant(e) == std::mem::discriminant(want) => {}
        _ => panic!("{event}: L got {out:?}, expected {expect:?}"),
    }
    drop(out);
    drop(l);
    // Q's outcome, if it was polled at all, must be a failure or a success; drop it.
    drop(q);
    let _ = woken_q;
    drop(m);
    for p in [&*leaf, &*mid, &*root] {
        let s = p.stats();
        assert_eq!(
            (s.in_use_bytes, s.outstanding, s.waiting),
            (0, 0, 0),
            "{event}: books off: {s}"
        );
    }
    drop(leaf);
    drop(mid);
    if !root.is_closed() {
        assert_full_budget_back(&root);
    }
}

#[test]
fn awaiting_a_place_then_its_own_pool_is_closed() {
    watchdog(20, || awaiting_room("close leaf"));
}

#[test]
fn awaiting_a_place_then_the_full_pool_is_closed() {
    watchdog(20, || awaiting_room("close mid"));
}

#[test]
fn awaiting_a_place_then_the_root_is_closed() {
    watchdog(20, || awaiting_room("close root"));
}

#[test]
fn awaiting_a_place_then_its_own_pool_shrinks_below_it() {
    watchdog(20, || awaiting_room("shrink leaf"));
}

#[test]
fn awaiting_a_place_then_forget_and_shrink_of_its_own_pool() {
    watchdog(20, || awaiting_room("forget leaf"));
}

#[test]
fn awaiting_a_place_then_the_full_pool_shrinks_below_it() {
    watchdog(20, || awaiting_room("shrink mid"));
}

#[test]
fn awaiting_a_place_then_the_head_of_the_full_queue_is_cancelled() {
    watchdog(20, || awaiting_room("cancel q"));
}

// ---------------------------------------------------------------------------------------
// PollAllocate: a new `n` while granted, with a panicking waker behind
// ---------------------------------------------------------------------------------------

/// A child's `PollAllocate` waits at the root for 2, is granted, then is polled for 3: its
/// grant goes back and serves B, whose waker panics inside that `poll_allocate`. The panic
/// goes on to the caller; the `PollAllocate` stays usable, queues anew for 3 behind B, and
/// every level's books stay exact.
#[test]
fn poll_allocate_new_n_while_granted_gives_the_grant_on_to_a_panicking_waiter() {
    watchdog(20, || {
        let root = Arc::new(BufPool::new(cfg(4)));
        let child = Arc::new(root.child("c", cfg(4)).unwrap());
        let h1 = root.try_allocate(2).unwrap();
        let h2 = root.try_allocate(2).unwrap();
        let mut p = membudget::PollAllocate::new(Arc::clone(&child));
        let (wp, woken_p) = counting();
        let mut cxp = Context::from_waker(&wp);
        assert!(p.poll_allocate(&mut cxp, 2).is_pending());
        let (wb, woken_b) = hostile(|| panic!("hostile wake of B"));
        let mut b = Box::pin(root.allocate(2));
        pending(b.as_mut(), &wb);
        drop(h1); // P granted 2 at the root
        assert_eq!(woken_p.load(SeqCst), 1);
        assert_eq!(woken_b.load(SeqCst), 0);
        let repoll = catch_unwind(AssertUnwindSafe(|| {
            let mut cx = Context::from_waker(&wp);
            p.poll_allocate(&mut cx, 3).is_pending()
        }));
        assert_eq!(woken_b.load(SeqCst), 1, "P's grant went on to B");
        eprintln!("re-poll with a new n: {repoll:?}");
        // B holds 2 now, h2 2: P (3) must wait (or be queued on the next poll).
        let (noop, _) = counting();
        let b_alloc = done(b.as_mut(), &noop).unwrap();
        assert!(p.poll_allocate(&mut cxp, 3).is_pending());
        // P holds its child level (3) while it waits at the root: nothing more.
        assert_eq!(child.stats().in_use_bytes, 3 * BS, "{}", child.stats());
        assert_eq!(root.stats().waiting, 1);
        assert_eq!(root.stats().in_use_bytes, 4 * BS, "{}", root.stats());
        drop(b_alloc);
        drop(h2);
        let got = match p.poll_allocate(&mut cxp, 3) {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => panic!(
                "P (3) not served with the whole root free: {}",
                root.stats()
            ),
        };
        assert_eq!(got.length(), 3);
        assert_eq!(child.stats().in_use_bytes, 3 * BS);
        drop(got);
        drop(p);
        assert_idle(&child);
        drop(child);
        idle_and_whole(&root);
    });
}
