//! Child pools: a child's bytes count against its own cap and every ancestor's; requests wait
//! in the child's queue while its own cap is short, then at the tail of the parent's queue;
//! a child-capped request never holds back a sibling or the parent; close reaches
//! descendants (and their requests queued at ancestors); the drop barriers cover the
//! subtree. Budgets are asserted at every quiescent point; every test has a watchdog.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::watchdog;
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate};

const B: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: B * buffers,
    }
}

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

type Waiting<'a> = Pin<Box<dyn Future<Output = Result<BufPoolAllocation, AllocError>> + Send + 'a>>;

fn queued<'a>(pool: &'a BufPool, n: usize) -> Waiting<'a> {
    let mut future: Waiting<'a> = Box::pin(pool.allocate(n));
    assert!(
        future.as_mut().poll(&mut cx()).is_pending(),
        "expected to wait"
    );
    future
}

#[track_caller]
fn ready(future: &mut Waiting<'_>) -> Result<BufPoolAllocation, AllocError> {
    match future.as_mut().poll(&mut cx()) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("expected to be served"),
    }
}

#[track_caller]
fn in_use(pool: &BufPool) -> usize {
    pool.stats().in_use_bytes / B
}

#[test]
fn a_childs_bytes_count_in_every_ancestor_and_outstanding_stays_per_pool() {
    watchdog(30, || {
        let root = BufPool::new(cfg(16));
        let mid = root.child("mid", cfg(8)).unwrap();
        let leaf = mid.child("leaf", cfg(4)).unwrap();
        let a = leaf.try_allocate(3).unwrap();
        let b = mid.try_allocate(2).unwrap();
        let c = root.try_allocate(1).unwrap();
        assert_eq!((in_use(&leaf), in_use(&mid), in_use(&root)), (3, 5, 6));
        assert_eq!(
            (
                leaf.stats().outstanding,
                mid.stats().outstanding,
                root.stats().outstanding
            ),
            (1, 1, 1)
        );
        assert_eq!(leaf.stats().name.as_deref(), Some("leaf"));
        drop(a);
        assert_eq!((in_use(&leaf), in_use(&mid), in_use(&root)), (0, 2, 3));
        drop((b, c));
        assert_eq!((in_use(&leaf), in_use(&mid), in_use(&root)), (0, 0, 0));
        assert_eq!(leaf.stats().total_allocations, 1);
    });
}

#[test]
fn a_request_above_the_smallest_cap_of_its_chain_fails_at_once_in_every_form() {
    watchdog(30, || {
        let root = Arc::new(BufPool::new(cfg(4)));
        // The child's own cap is larger than its parent's: the parent's binds.
        let child = Arc::new(root.child("big", cfg(8)).unwrap());
        let expected = AllocError::ExceedsBudget {
            requested_bytes: 5 * B,
            max_memory: 4 * B,
        };
        let _held = child.try_allocate(4).unwrap(); // everything: a request would wait
        assert_eq!(child.try_allocate(5).unwrap_err(), expected);
        assert_eq!(child.allocate_blocking(5).unwrap_err(), expected);
        assert_eq!(
            child
                .allocate_timeout(5, Duration::from_secs(5))
                .unwrap_err(),
            expected
        );
        assert_eq!(
            futures::executor::block_on(child.allocate(5)).unwrap_err(),
            expected
        );
        assert_eq!(
            futures::executor::block_on(Arc::clone(&child).allocate_owned(5)).unwrap_err(),
            expected
        );
        assert!(matches!(
            PollAllocate::new(Arc::clone(&child)).poll_allocate(&mut cx(), 5),
            Poll::Ready(Err(e)) if e == expected
        ));
        // Above its own cap too: still named by the smallest cap of the chain (README's
        // table; it named the child's own cap before `tests/readme_conformance.rs` saw it).
        assert_eq!(
            child.try_allocate(9).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 9 * B,
                max_memory: 4 * B,
            }
        );
        assert_eq!((in_use(&child), in_use(&root)), (4, 4));
        assert_eq!((child.stats().waiting, root.stats().waiting), (0, 0));
    });
}

#[test]
fn a_child_capped_request_holds_back_neither_its_sibling_nor_the_parent() {
    watchdog(30, || {
        let root = BufPool::new(cfg(16));
        let a = root.child("a", cfg(2)).unwrap();
        let b = root.child("b", cfg(8)).unwrap();
        let held = a.try_allocate(2).unwrap();
        let mut waiting = queued(&a, 2); // waits for a's own cap
        assert_eq!((a.stats().waiting, root.stats().waiting), (1, 0));
        // The sibling and the parent allocate on: nobody waits at the parent.
        let from_b = b.allocate_blocking(8).unwrap();
        let from_root = futures::executor::block_on(root.allocate(4)).unwrap();
        assert_eq!(in_use(&root), 14);
        drop(held);
        let got = ready(&mut waiting).unwrap();
        assert_eq!((in_use(&a), in_use(&root)), (2, 14));
        drop((got, from_b, from_root));
        assert_eq!((in_use(&a), in_use(&b), in_use(&root)), (0, 0, 0));
    });
}

#[test]
fn with_room_in_the_child_a_request_waits_at_the_tail_of_the_parents_queue() {
    watchdog(30, || {
        let root = BufPool::new(cfg(4));
        let a = root.child("a", cfg(4)).unwrap();
        let b = root.child("b", cfg(4)).unwrap();
        let held = root.try_allocate(4).unwrap();
        let mut first = queued(&root, 2); // the parent's own request, first in its queue
        let mut from_a = queued(&a, 2); // room in `a`: waits at the parent's tail
        let mut from_b = queued(&b, 3);
        assert_eq!(root.stats().waiting, 3);
        assert_eq!(
            (a.stats().waiting, in_use(&a)),
            (0, 2),
            "a holds its own level"
        );
        let mut later = queued(&root, 1); // behind everyone: no barging
        drop(held);
        // FIFO at the parent: 2 (root) + 2 (a) fit; b's 3 waits, and so does `later`.
        let r = ready(&mut first).unwrap();
        let x = ready(&mut from_a).unwrap();
        assert!(from_b.as_mut().poll(&mut cx()).is_pending());
        assert!(later.as_mut().poll(&mut cx()).is_pending());
        drop(r); // 2 free: not enough for b's 3, and `later` may not overtake it
        assert!(later.as_mut().poll(&mut cx()).is_pending());
        // A release in child `a` serves a parent-queue waiter from child `b`.
        drop(x);
        let y = ready(&mut from_b).unwrap();
        let z = ready(&mut later).unwrap();
        assert_eq!((in_use(&b), in_use(&root)), (3, 4));
        drop((y, z));
        assert_eq!((in_use(&a), in_use(&b), in_use(&root)), (0, 0, 0));
        assert_eq!(root.stats().waiting, 0);
    });
}

#[test]
fn cancelling_a_request_waiting_at_the_parent_gives_its_child_bytes_back() {
    watchdog(30, || {
        let root = BufPool::new(cfg(4));
        let a = root.child("a", cfg(4)).unwrap();
        let held = root.try_allocate(4).unwrap();
        let mut from_a = queued(&a, 3);
        let mut behind_in_a = queued(&a, 1); // a has 1 left: this one climbs as well
        assert_eq!((in_use(&a), root.stats().waiting), (4, 2));
        drop(from_a);
        assert_eq!((in_use(&a), root.stats().waiting), (1, 1));
        drop(held);
        let got = ready(&mut behind_in_a).unwrap();
        assert_eq!((in_use(&a), in_use(&root)), (1, 1));
        drop(got);
        // Granted at the parent but never taken: dropping it gives both levels back.
        let held = root.try_allocate(4).unwrap();
        from_a = queued(&a, 2);
        drop(held);
        assert_eq!((in_use(&a), in_use(&root)), (2, 2));
        drop(from_a);
        assert_eq!((in_use(&a), in_use(&root)), (0, 0));
        let stats = a.stats();
        assert_eq!((stats.outstanding, stats.waiting), (0, 0), "{stats:?}");
    });
}

#[test]
fn a_shrink_of_the_parent_fails_a_childs_request_waiting_there() {
    watchdog(30, || {
        let root = BufPool::new(cfg(8));
        let a = root.child("a", cfg(8)).unwrap();
        let held = root.try_allocate(8).unwrap();
        let mut from_a = queued(&a, 6);
        root.set_max_memory(4 * B).unwrap();
        assert_eq!(
            ready(&mut from_a).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 6 * B,
                max_memory: 4 * B
            }
        );
        assert_eq!((in_use(&a), in_use(&root)), (0, 8));
        drop(held);
        assert_eq!(in_use(&root), 0);
    });
}

#[test]
fn closing_a_parent_closes_its_descendants_and_their_waiters_wherever_they_wait() {
    watchdog(30, || {
        let root = BufPool::new(cfg(4));
        let a = root.child("a", cfg(2)).unwrap();
        let leaf = a.child("leaf", cfg(2)).unwrap();
        let live = leaf.try_allocate(2).unwrap();
        let mut in_leaf = queued(&leaf, 1); // leaf's cap
        let held = root.try_allocate(2).unwrap();
        let other = root.child("other", cfg(4)).unwrap();
        let mut at_root = queued(&other, 2); // waits at root
        root.close();
        assert_eq!(ready(&mut in_leaf).unwrap_err(), AllocError::Closed);
        assert_eq!(ready(&mut at_root).unwrap_err(), AllocError::Closed);
        for pool in [&root, &a, &leaf, &other] {
            assert!(pool.stats().closed);
            assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
        }
        // Live allocations stay valid; a child of a closed pool starts closed.
        assert_eq!(live.length(), 2);
        let late = root.child("late", cfg(1)).unwrap();
        assert_eq!(late.allocate_blocking(1).unwrap_err(), AllocError::Closed);
        drop((live, held));
        assert_eq!((in_use(&root), in_use(&a), in_use(&other)), (0, 0, 0));
    });
}

#[test]
fn closing_a_child_fails_its_requests_queued_at_the_parent_and_only_those() {
    watchdog(30, || {
        let root = BufPool::new(cfg(4));
        let a = root.child("a", cfg(4)).unwrap();
        let b = root.child("b", cfg(4)).unwrap();
        let held = root.try_allocate(4).unwrap();
        let mut from_a = queued(&a, 2);
        let mut from_b = queued(&b, 2);
        a.close();
        assert_eq!(ready(&mut from_a).unwrap_err(), AllocError::Closed);
        assert_eq!((in_use(&a), root.stats().waiting), (0, 1));
        drop(held);
        assert!(ready(&mut from_b).is_ok());
        assert!(!b.stats().closed && !root.stats().closed);
    });
}

#[test]
fn dropping_a_child_waits_for_its_subtree_only_and_a_parent_for_all_of_its_own() {
    watchdog(30, || {
        let root = BufPool::new(cfg(8));
        let child = root.child("c", cfg(4)).unwrap();
        let grandchild = child.child("g", cfg(2)).unwrap();
        let sibling = root.child("s", cfg(4)).unwrap();
        let from_child = child.try_allocate(1).unwrap();
        let from_grandchild = grandchild.try_allocate(2).unwrap();
        let from_sibling = sibling.try_allocate(3).unwrap();
        let step = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let releaser = {
            let step = Arc::clone(&step);
            std::thread::spawn(move || {
                for (i, allocation) in [from_child, from_grandchild, from_sibling]
                    .into_iter()
                    .enumerate()
                {
                    std::thread::sleep(Duration::from_millis(30));
                    step.store(i + 1, SeqCst);
                    drop(allocation);
                }
            })
        };
        // The child's drop waits for its own allocation and its grandchild's, not the
        // sibling's.
        drop(child);
        assert!(
            step.load(SeqCst) >= 2,
            "the child's drop returned before its subtree drained"
        );
        assert!(in_use(&root) <= 3);
        // The grandchild is closed (its parent was), but its handle still works.
        assert_eq!(grandchild.try_allocate(1).unwrap_err(), AllocError::Closed);
        drop(grandchild);
        drop(root); // waits for the sibling's allocation
        assert_eq!(
            step.load(SeqCst),
            3,
            "the parent's drop returned before its subtree drained"
        );
        releaser.join().unwrap();
        drop(sibling);
    });
}

#[test]
fn every_call_form_works_on_a_child_through_both_levels() {
    watchdog(60, || {
        let root = Arc::new(BufPool::new(cfg(4)));
        let child = Arc::new(root.child("c", cfg(3)).unwrap());
        let held = root.try_allocate(4).unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let child = Arc::clone(&child);
                std::thread::spawn(move || match i {
                    0 => child.allocate_blocking(1).map(|a| a.length()),
                    1 => child
                        .allocate_timeout(1, Duration::from_secs(30))
                        .map(|a| a.length()),
                    _ => futures::executor::block_on(Arc::clone(&child).allocate_zeroed_owned(1))
                        .map(|a| a.length()),
                })
            })
            .collect();
        common::wait_until(30, "three wait at the parent", || root.stats().waiting == 3);
        // A timed request that cannot get in gives everything back.
        assert_eq!(
            child
                .allocate_timeout(1, Duration::from_millis(10))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(in_use(&child), 3);
        drop(held);
        for waiter in waiters {
            assert_eq!(waiter.join().unwrap(), Ok(1));
        }
        let mut poller = PollAllocate::new(Arc::clone(&child));
        assert!(matches!(
            poller.poll_allocate(&mut cx(), 3),
            Poll::Ready(Ok(_))
        ));
        assert_eq!((in_use(&child), in_use(&root)), (0, 0));
        assert_eq!(child.stats().total_allocations, 4);
    });
}

#[test]
fn threads_on_children_and_parent_never_exceed_any_cap() {
    watchdog(120, || {
        let root = Arc::new(BufPool::new(cfg(16)));
        let children: Vec<Arc<BufPool>> = (0..3)
            .map(|i| Arc::new(root.child(format!("c{i}"), cfg(6 + i)).unwrap()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let rounds = common::rounds(2_000, 20);
        for (i, pool) in children.iter().chain(std::iter::once(&root)).enumerate() {
            for t in 0..2 {
                let pool = Arc::clone(pool);
                threads.push(std::thread::spawn(move || {
                    for r in 0..rounds {
                        let n = 1 + (i + t + r) % 4;
                        let allocation = if r % 3 == 0 {
                            pool.allocate_timeout(n, Duration::from_millis(1)).ok()
                        } else {
                            pool.allocate_blocking(n).ok()
                        };
                        drop(allocation);
                    }
                }));
            }
        }
        let checker = {
            let (root, children, stop) = (Arc::clone(&root), children.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    assert!(root.stats().in_use_bytes <= 16 * B);
                    for (i, child) in children.iter().enumerate() {
                        assert!(child.stats().in_use_bytes <= (6 + i) * B);
                    }
                    std::thread::yield_now();
                }
            })
        };
        for thread in threads {
            thread.join().unwrap();
        }
        stop.store(true, SeqCst);
        checker.join().unwrap();
        assert_eq!(root.stats().in_use_bytes, 0);
        for child in &children {
            let stats = child.stats();
            assert_eq!(
                (stats.in_use_bytes, stats.waiting, stats.outstanding),
                (0, 0, 0)
            );
        }
        assert_eq!(root.stats().waiting, 0);
    });
}

#[test]
fn report_shows_the_tree_sorted_by_bytes_and_top_names_the_largest_holders() {
    watchdog(30, || {
        let root = BufPool::builder(cfg(32)).name("root").build().unwrap();
        let a = root.child("a", cfg(8)).unwrap();
        let b = root.child("b", cfg(16)).unwrap();
        let b1 = b.child("b1", cfg(8)).unwrap();
        let _x = a.try_allocate(2).unwrap();
        let _y = b1.try_allocate(5).unwrap();
        let _z = b.try_allocate(1).unwrap();
        let _r = root.try_reserve(3 * B).unwrap();
        let held = a.try_allocate(6).unwrap();
        let waiting = queued(&a, 1);
        let report = root.report();
        assert_eq!(report.in_use_bytes, (2 + 5 + 1 + 3 + 6) * B);
        assert_eq!((report.reserved_bytes, report.own_bytes()), (3 * B, 3 * B));
        let names: Vec<_> = report
            .children
            .iter()
            .map(|child| child.name.as_deref().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"], "sorted by bytes in use: a 8, b 6");
        assert_eq!(report.children[0].waiting, 1);
        assert_eq!(report.children[1].children[0].in_use_bytes, 5 * B);
        let top: Vec<_> = report
            .top(3)
            .iter()
            .map(|holder| (holder.name.as_deref().unwrap(), holder.own_bytes() / B))
            .collect();
        assert_eq!(top, [("a", 8), ("b1", 5), ("root", 3)]);
        let text = report.to_string();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("root: 1088 of 2048 bytes in use"),
            "{text}"
        );
        assert!(lines[1].starts_with("  a: 512 of 512"), "{text}");
        assert!(lines[3].starts_with("    b1: 320 of 512"), "{text}");
        // A dropped child leaves the report.
        drop(waiting);
        drop(held);
        drop((_x, a));
        assert_eq!(root.report().children.len(), 1);
    });
}

#[test]
fn closing_a_pool_fails_its_descendants_waiters_at_the_ancestors_before_serving() {
    watchdog(30, || {
        let root = BufPool::new(cfg(4));
        let mid = root.child("mid", cfg(8)).unwrap();
        let leaf = mid.child("leaf", cfg(8)).unwrap();
        let _held = root.try_allocate(3).unwrap(); // the root has room for 1 buffer
        let mut x = queued(&mid, 2); // waits at the root
        let mut y = queued(&leaf, 1); // waits at the root, behind x
        mid.close(); // closes leaf too: the room x leaves must not go to y
        assert_eq!(ready(&mut x).unwrap_err(), AllocError::Closed);
        assert_eq!(ready(&mut y).unwrap_err(), AllocError::Closed);
        assert_eq!((in_use(&mid), in_use(&leaf), in_use(&root)), (0, 0, 3));
    });
}

#[test]
fn a_childs_request_waiting_above_is_not_outstanding_until_it_holds_every_level() {
    watchdog(30, || {
        let root = BufPool::new(cfg(1));
        let child = root.child("c", cfg(1)).unwrap();
        let held = root.try_allocate(1).unwrap();
        let mut waiting = queued(&child, 1); // holds the child's level, waits at the root
        let stats = child.stats();
        assert_eq!((stats.in_use_bytes, stats.outstanding), (B, 0), "{stats:?}");
        drop(waiting); // cancelled: never an allocation
        assert_eq!(
            (child.stats().outstanding, child.stats().total_allocations),
            (0, 0)
        );
        waiting = queued(&child, 1);
        drop(held);
        let got = ready(&mut waiting).unwrap();
        let stats = child.stats();
        assert_eq!(
            (stats.outstanding, stats.total_allocations),
            (1, 1),
            "{stats:?}"
        );
        drop(got);
        assert_eq!(child.stats().outstanding, 0);
    });
}
