//! The waits that own their pool handle: `allocate_owned` (spawned, aborted, cancelled in
//! every state) and `PollAllocate` (its place in the queue across polls, a changed `n`, a
//! drop while queued, a hand-written service driven by `poll_fn`). Every test checks the
//! budget at its quiescent points and runs under a watchdog.

mod common;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use common::{watchdog, within};
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate};

fn pool(buffers: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64 * buffers,
    }))
}

fn noop_cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

#[track_caller]
fn assert_quiescent(pool: &BufPool, in_use_buffers: usize, waiting: usize) {
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.waiting),
        (64 * in_use_buffers, waiting),
        "{stats:?}"
    );
}

#[test]
fn allocate_owned_is_static_and_send_and_resolves_like_allocate() {
    watchdog(30, || {
        let pool = pool(4);
        let future = Arc::clone(&pool).allocate_owned(3);
        fn static_send<T: Send + 'static>(_: &T) {}
        static_send(&future);
        let allocation = futures::executor::block_on(future).unwrap();
        assert_eq!(allocation.length(), 3);
        assert_quiescent(&pool, 3, 0);
        let zeroed = futures::executor::block_on(Arc::clone(&pool).allocate_zeroed_owned(1))
            .unwrap()
            .into_filled();
        assert_eq!(zeroed.capacity(), 64);
        drop((allocation, zeroed));
        assert_quiescent(&pool, 0, 0);
        // Bad input fails at once, as with `allocate`.
        assert_eq!(
            futures::executor::block_on(Arc::clone(&pool).allocate_owned(0)).unwrap_err(),
            AllocError::ZeroBuffers
        );
        assert!(matches!(
            futures::executor::block_on(Arc::clone(&pool).allocate_owned(5)),
            Err(AllocError::ExceedsBudget { .. })
        ));
    });
}

#[test]
fn allocate_owned_spawned_and_aborted_while_queued_loses_no_budget() {
    watchdog(60, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pool = pool(2);
            let held = pool.try_allocate(2).unwrap();
            let queued = tokio::spawn(Arc::clone(&pool).allocate_owned(2));
            let behind = tokio::spawn(Arc::clone(&pool).allocate_owned(1));
            common::wait_until_async(30, "both tasks queue", || pool.stats().waiting == 2).await;
            queued.abort();
            assert!(queued.await.unwrap_err().is_cancelled());
            assert_quiescent(&pool, 2, 1);
            drop(held);
            let allocation = within(30, behind).await.unwrap().unwrap();
            assert_eq!(allocation.length(), 1);
            drop(allocation);
            assert_quiescent(&pool, 0, 0);
        });
    });
}

#[test]
fn allocate_owned_granted_then_dropped_unpolled_passes_the_grant_on() {
    watchdog(30, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let mut first = Box::pin(Arc::clone(&pool).allocate_owned(2));
        let mut second = Box::pin(Arc::clone(&pool).allocate_owned(2));
        let mut cx = noop_cx();
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        drop(held); // grants `first`
        assert_quiescent(&pool, 2, 1);
        drop(first); // never took it: the grant goes on to `second`
        assert_quiescent(&pool, 2, 0);
        let Poll::Ready(Ok(allocation)) = second.as_mut().poll(&mut cx) else {
            panic!("the grant was not passed on");
        };
        drop(allocation);
        assert_quiescent(&pool, 0, 0);
    });
}

#[test]
fn poll_allocate_keeps_its_place_across_polls() {
    watchdog(30, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut cx = noop_cx();
        assert!(poller.poll_allocate(&mut cx, 2).is_pending());
        let mut later = Box::pin(pool.allocate(2));
        assert!(later.as_mut().poll(&mut cx).is_pending());
        // Polled again with the same `n`: still first, not re-queued behind `later`.
        for _ in 0..3 {
            assert!(poller.poll_allocate(&mut cx, 2).is_pending());
        }
        assert_quiescent(&pool, 2, 2);
        drop(held);
        let Poll::Ready(Ok(allocation)) = poller.poll_allocate(&mut cx, 2) else {
            panic!("the poller lost its place");
        };
        assert!(later.as_mut().poll(&mut cx).is_pending());
        drop(allocation);
        let Poll::Ready(Ok(allocation)) = later.as_mut().poll(&mut cx) else {
            panic!("the release did not serve the next waiter");
        };
        drop(allocation);
        assert_quiescent(&pool, 0, 0);
    });
}

#[test]
fn poll_allocate_with_a_changed_n_queues_anew_behind_the_others() {
    watchdog(30, || {
        let pool = pool(4);
        let held = pool.try_allocate(4).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut cx = noop_cx();
        assert!(poller.poll_allocate(&mut cx, 2).is_pending());
        let mut other = Box::pin(pool.allocate(3));
        assert!(other.as_mut().poll(&mut cx).is_pending());
        // A different `n`: the old place is given up, the new request queues behind `other`.
        assert!(poller.poll_allocate(&mut cx, 1).is_pending());
        assert_quiescent(&pool, 4, 2);
        drop(held);
        // `other` (3) is served first, then the poller's 1 fits too.
        let Poll::Ready(Ok(first)) = other.as_mut().poll(&mut cx) else {
            panic!("the request that was behind the poller's old place was not served first");
        };
        let Poll::Ready(Ok(second)) = poller.poll_allocate(&mut cx, 1) else {
            panic!("the re-queued request was not served");
        };
        assert_eq!((first.length(), second.length()), (3, 1));
        drop((first, second));
        assert_quiescent(&pool, 0, 0);
    });
}

#[test]
fn poll_allocate_changed_n_gives_back_a_grant_it_never_took() {
    watchdog(30, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut cx = noop_cx();
        assert!(poller.poll_allocate(&mut cx, 2).is_pending());
        drop(held); // grants the poller's 2
        assert_quiescent(&pool, 2, 0);
        // Asking for 1 instead: the grant of 2 is given back, and 1 is reserved at once.
        let Poll::Ready(Ok(allocation)) = poller.poll_allocate(&mut cx, 1) else {
            panic!("the new request did not get the free budget");
        };
        assert_quiescent(&pool, 1, 0);
        drop(allocation);
        assert_quiescent(&pool, 0, 0);
    });
}

#[test]
fn poll_allocate_dropped_while_queued_leaves_the_queue() {
    watchdog(30, || {
        let pool = pool(2);
        let held = pool.try_allocate(2).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut cx = noop_cx();
        assert!(poller.poll_allocate(&mut cx, 1).is_pending());
        let mut behind = Box::pin(pool.allocate(2));
        assert!(behind.as_mut().poll(&mut cx).is_pending());
        assert_quiescent(&pool, 2, 2);
        drop(poller);
        assert_quiescent(&pool, 2, 1);
        drop(held);
        let Poll::Ready(Ok(allocation)) = behind.as_mut().poll(&mut cx) else {
            panic!("the waiter behind the dropped poller was not served");
        };
        drop(allocation);
        assert_quiescent(&pool, 0, 0);
    });
}

#[test]
fn poll_allocate_after_ready_starts_a_new_request_and_reports_errors() {
    watchdog(30, || {
        let pool = pool(2);
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let clone = poller.clone();
        assert!(Arc::ptr_eq(clone.pool(), &pool));
        let mut cx = noop_cx();
        let Poll::Ready(Ok(a)) = poller.poll_allocate(&mut cx, 1) else {
            panic!()
        };
        let Poll::Ready(Ok(b)) = poller.poll_allocate(&mut cx, 1) else {
            panic!("the second call did not start a new request")
        };
        assert_quiescent(&pool, 2, 0);
        assert!(matches!(
            poller.poll_allocate(&mut cx, 0),
            Poll::Ready(Err(AllocError::ZeroBuffers))
        ));
        assert!(matches!(
            poller.poll_allocate(&mut cx, 3),
            Poll::Ready(Err(AllocError::ExceedsBudget { .. }))
        ));
        assert!(poller.poll_allocate(&mut cx, 1).is_pending());
        pool.close();
        assert!(matches!(
            poller.poll_allocate(&mut cx, 1),
            Poll::Ready(Err(AllocError::Closed))
        ));
        drop((a, b));
        assert_quiescent(&pool, 0, 0);
    });
}

/// A hand-written service: `poll_ready` reserves the buffers of the next request, `call`
/// uses them.
struct Service {
    buffers: PollAllocate,
    n: usize,
    ready: Option<BufPoolAllocation>,
}

impl Service {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AllocError>> {
        if self.ready.is_none() {
            let allocation = std::task::ready!(self.buffers.poll_allocate(cx, self.n))?;
            self.ready = Some(allocation);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self) -> BufPoolAllocation {
        self.ready.take().expect("poll_ready first")
    }
}

#[test]
fn poll_allocate_in_a_service_driven_by_poll_fn() {
    watchdog(60, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pool = pool(4);
            let mut services: Vec<Service> = (0..3)
                .map(|i| Service {
                    buffers: PollAllocate::new(Arc::clone(&pool)),
                    n: i + 1,
                    ready: None,
                })
                .collect();
            let rounds = common::rounds(200, 10);
            let mut tasks = Vec::new();
            for mut service in services.drain(..) {
                tasks.push(tokio::spawn(async move {
                    for _ in 0..rounds {
                        poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
                        let allocation = service.call();
                        assert_eq!(allocation.length(), service.n);
                        tokio::task::yield_now().await;
                        drop(allocation);
                    }
                }));
            }
            for task in tasks {
                within(30, task).await.unwrap();
            }
            assert_quiescent(&pool, 0, 0);
        });
    });
}

#[test]
fn poll_allocate_moves_between_polls_without_losing_its_node() {
    watchdog(30, || {
        let pool = pool(1);
        let held = pool.try_allocate(1).unwrap();
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut cx = noop_cx();
        assert!(poller.poll_allocate(&mut cx, 1).is_pending());
        // Move it (by value, into a box and out again): the node is boxed, so it stays put.
        let boxed = Box::new(poller);
        let mut poller = *boxed;
        drop(held);
        assert!(matches!(
            poller.poll_allocate(&mut cx, 1),
            Poll::Ready(Ok(_))
        ));
        assert_quiescent(&pool, 0, 0);
    });
}

/// `AllocateOwned` awaited inside a future that is itself moved before its first poll.
#[test]
fn allocate_owned_in_a_struct_moved_before_polling() {
    watchdog(30, || {
        struct Job {
            buffers: Pin<Box<membudget::AllocateOwned>>,
        }
        let pool = pool(2);
        let job = Job {
            buffers: Box::pin(Arc::clone(&pool).allocate_owned(2)),
        };
        let jobs = vec![job];
        let mut job = jobs.into_iter().next().unwrap();
        let allocation = futures::executor::block_on(job.buffers.as_mut()).unwrap();
        assert_eq!(allocation.length(), 2);
        drop(allocation);
        assert_quiescent(&pool, 0, 0);
    });
}
