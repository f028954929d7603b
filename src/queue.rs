//! The FIFO queue of waiting allocations, kept under the pool's one lock.
//!
//! A slab of slots linked into a doubly linked list by index: push, pop at the head and
//! removal from the middle (a cancelled waiter) are all O(1), and the code is safe Rust. A
//! waiter owns its slot from `push_back` until it calls `remove`, so a slot index is never
//! reused behind its owner's back.

use core::task::Waker;
use std::time::{Duration, Instant};

use crate::AllocError;

const NIL: usize = usize::MAX;

/// Where a queued request stands.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Status {
    /// In the queue, waiting for its bytes.
    Waiting,
    /// Out of the queue: its bytes were reserved for it by a releaser.
    Granted,
    /// Out of the queue: it will never get its bytes.
    Failed(AllocError),
    /// Nobody's slot (on the free list).
    Vacant,
}

#[derive(Debug)]
struct Slot {
    bytes: usize,
    /// When it was queued; once granted, how long it waited (timed by the releaser, so the
    /// woken waiter reads no clock).
    since: Instant,
    waited: Duration,
    status: Status,
    waker: Option<Waker>,
    prev: usize,
    next: usize,
}

/// How long granted requests waited, and how many allocations the slow path made, kept under
/// the queue's lock at no extra cost.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WaitStats {
    pub(crate) allocations: usize,
    pub(crate) waited: usize,
    pub(crate) total: Duration,
    pub(crate) max: Duration,
}

#[derive(Debug)]
pub(crate) struct WaitQueue {
    waits: WaitStats,
    slots: Vec<Slot>,
    free: usize,
    head: usize,
    tail: usize,
    len: usize,
}

impl WaitQueue {
    pub(crate) const fn new() -> Self {
        WaitQueue {
            waits: WaitStats {
                allocations: 0,
                waited: 0,
                total: Duration::ZERO,
                max: Duration::ZERO,
            },
            slots: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// How many requests wait in the queue (granted and failed ones excluded).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a request for `bytes`, made at `now`; returns the slot its owner polls and
    /// removes.
    pub(crate) fn push_back(&mut self, bytes: usize, waker: Waker, now: Instant) -> usize {
        let slot = Slot {
            bytes,
            since: now,
            waited: Duration::ZERO,
            status: Status::Waiting,
            waker: Some(waker),
            prev: self.tail,
            next: NIL,
        };
        let key = if self.free == NIL {
            self.slots.push(slot);
            self.slots.len() - 1
        } else {
            let key = self.free;
            self.free = self.slots[key].next;
            self.slots[key] = slot;
            key
        };
        match self.tail {
            NIL => self.head = key,
            tail => self.slots[tail].next = key,
        }
        self.tail = key;
        self.len += 1;
        key
    }

    /// The bytes the head of the queue waits for.
    pub(crate) fn front_bytes(&self) -> Option<usize> {
        (self.head != NIL).then(|| self.slots[self.head].bytes)
    }

    /// Takes the head out of the queue with its final `status`; returns its waker.
    pub(crate) fn pop_front(&mut self, status: Status) -> Option<Waker> {
        let key = self.head;
        if key == NIL {
            return None;
        }
        self.unlink(key);
        let slot = &mut self.slots[key];
        slot.status = status;
        slot.waker.take()
    }

    /// Takes the head out of the queue as granted at `now`; returns its waker.
    pub(crate) fn pop_front_granted(&mut self, now: Instant) -> Option<Waker> {
        let key = self.head;
        if key != NIL {
            let slot = &mut self.slots[key];
            slot.waited = now.saturating_duration_since(slot.since);
        }
        self.pop_front(Status::Granted)
    }

    /// Fails every waiting request with `error`, head first; `wake` gets each waker.
    pub(crate) fn fail_all(&mut self, error: AllocError, mut wake: impl FnMut(Waker)) {
        while let Some(waker) = self.pop_front(Status::Failed(error)) {
            wake(waker);
        }
    }

    /// Fails the waiting requests for which `fails(bytes)` gives an error, keeping the others
    /// in order.
    pub(crate) fn fail_where(
        &mut self,
        fails: impl Fn(usize) -> Option<AllocError>,
        mut wake: impl FnMut(Waker),
    ) {
        let mut key = self.head;
        while key != NIL {
            let next = self.slots[key].next;
            if let Some(error) = fails(self.slots[key].bytes) {
                self.unlink(key);
                let slot = &mut self.slots[key];
                slot.status = Status::Failed(error);
                if let Some(waker) = slot.waker.take() {
                    wake(waker);
                }
            }
            key = next;
        }
    }

    pub(crate) fn status(&self, key: usize) -> Status {
        self.slots[key].status
    }

    /// Stores the waker to wake for `key`, cloning only when it changed.
    pub(crate) fn register(&mut self, key: usize, waker: &Waker) {
        let slot = &mut self.slots[key];
        match &mut slot.waker {
            Some(old) if old.will_wake(waker) => {}
            stale => *stale = Some(waker.clone()),
        }
    }

    /// An allocation made under the lock without waiting.
    pub(crate) fn count_allocation(&mut self) {
        self.waits.allocations += 1;
    }

    /// The owner of a granted slot takes its allocation: counts it and its wait, and frees the
    /// slot.
    pub(crate) fn remove_granted(&mut self, key: usize) {
        let waited = self.slots[key].waited;
        self.waits.allocations += 1;
        self.waits.waited += 1;
        self.waits.total = self.waits.total.saturating_add(waited);
        self.waits.max = self.waits.max.max(waited);
        self.remove(key);
    }

    pub(crate) fn wait_stats(&self) -> WaitStats {
        self.waits
    }

    /// The owner gives its slot back; returns its status and bytes, unlinking it if it still
    /// waited.
    pub(crate) fn remove(&mut self, key: usize) -> (Status, usize) {
        let status = self.slots[key].status;
        if status == Status::Waiting {
            self.unlink(key);
        }
        let slot = &mut self.slots[key];
        slot.status = Status::Vacant;
        slot.waker = None;
        slot.next = self.free;
        self.free = key;
        (status, slot.bytes)
    }

    fn unlink(&mut self, key: usize) {
        let (prev, next) = (self.slots[key].prev, self.slots[key].next);
        match prev {
            NIL => self.head = next,
            prev => self.slots[prev].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slots[next].prev = prev,
        }
        self.len -= 1;
    }
}

/// Wakers collected under the lock and woken after it is released, in the order they were
/// granted.
///
/// Dropping the list wakes every waker in it. A waker that panics cannot strand the waiters
/// after it: each wake runs under `catch_unwind`, the rest are still woken, and the first
/// panic is passed on afterwards (unless the thread is already unwinding).
#[derive(Debug, Default)]
pub(crate) struct WakeList {
    inline: [Option<Waker>; 4],
    inline_len: usize,
    spilled: Vec<Waker>,
}

impl WakeList {
    pub(crate) fn push(&mut self, waker: Waker) {
        if self.inline_len < self.inline.len() {
            self.inline[self.inline_len] = Some(waker);
            self.inline_len += 1;
        } else {
            self.spilled.push(waker);
        }
    }
}

impl Drop for WakeList {
    fn drop(&mut self) {
        let spilled = core::mem::take(&mut self.spilled);
        let wakers = self
            .inline
            .iter_mut()
            .filter_map(Option::take)
            .chain(spilled);
        let mut first_panic = None;
        for waker in wakers {
            let woken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waker.wake()));
            if let Err(panic) = woken {
                first_panic.get_or_insert(panic);
            }
        }
        if let Some(panic) = first_panic {
            if !std::thread::panicking() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Nop;
    impl Wake for Nop {
        fn wake(self: Arc<Self>) {}
    }
    fn waker() -> Waker {
        Waker::from(Arc::new(Nop))
    }

    #[test]
    fn fifo_order_and_middle_removal() {
        let mut queue = WaitQueue::new();
        let now = Instant::now();
        let a = queue.push_back(1, waker(), now);
        let b = queue.push_back(2, waker(), now);
        let c = queue.push_back(3, waker(), now);
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.remove(b), (Status::Waiting, 2));
        assert_eq!(queue.front_bytes(), Some(1));
        assert!(queue.pop_front(Status::Granted).is_some());
        assert_eq!(queue.status(a), Status::Granted);
        assert_eq!(queue.front_bytes(), Some(3));
        let d = queue.push_back(4, waker(), now);
        assert_eq!(d, b, "the freed slot is reused");
        queue.fail_where(|bytes| (bytes > 3).then_some(AllocError::Closed), drop);
        assert_eq!(queue.status(d), Status::Failed(AllocError::Closed));
        assert_eq!(queue.len(), 1);
        queue.fail_all(AllocError::Closed, drop);
        assert!(queue.is_empty());
        assert_eq!(queue.remove(c), (Status::Failed(AllocError::Closed), 3));
        assert_eq!(queue.front_bytes(), None);
    }

    #[test]
    fn wake_list_wakes_in_order_and_past_a_panicking_waker() {
        use std::sync::Mutex;
        struct Record(usize, Arc<Mutex<Vec<usize>>>);
        impl Wake for Record {
            fn wake(self: Arc<Self>) {
                self.1.lock().unwrap().push(self.0);
                assert_ne!(self.0, 2, "waker 2 panics");
            }
        }
        let woken = Arc::new(Mutex::new(Vec::new()));
        let mut list = WakeList::default();
        for i in 0..10 {
            list.push(Waker::from(Arc::new(Record(i, woken.clone()))));
        }
        assert_eq!(list.spilled.len(), 6);
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(list)));
        assert!(panic.is_err(), "the panic is passed on");
        assert_eq!(*woken.lock().unwrap(), (0..10).collect::<Vec<_>>());
    }
}
