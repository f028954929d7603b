//! The FIFO queue of waiting allocations, kept under the pool's one lock.
//!
//! A slab of slots linked into a doubly linked list by index: push, pop at the head and
//! removal from the middle (a cancelled waiter) are all O(1), and the code is safe Rust.
//!
//! Every request gets a ticket, increasing in queue order. A granted request's slot is freed
//! at once, by the releaser: its owner learns of the grant from the pool's `granted_through`
//! ticket without the lock (grants go in ticket order), and a slot whose ticket no longer
//! matches was granted. Waiting and failed slots stay their owner's until it removes them.

use core::task::Waker;
use std::time::{Duration, Instant};

use crate::AllocError;

const NIL: usize = usize::MAX;

/// Where a queued request stands.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Status {
    /// In the queue, waiting for its bytes.
    Waiting,
    /// Out of the queue: its bytes were reserved for it by a releaser (its slot is already
    /// free, and may hold another request).
    Granted,
    /// Out of the queue: it will never get its bytes.
    Failed(AllocError),
    /// Nobody's slot (on the free list).
    Vacant,
}

#[derive(Debug)]
struct Slot {
    bytes: usize,
    ticket: u64,
    /// When it was queued.
    since: Instant,
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
    next_ticket: u64,
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
            // Ticket 0 stands for "none granted yet".
            next_ticket: 1,
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

    /// Appends a request for `bytes`, made at `now`; returns the slot and ticket its owner
    /// polls and removes it with.
    pub(crate) fn push_back(&mut self, bytes: usize, waker: Waker, now: Instant) -> (usize, u64) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let slot = Slot {
            bytes,
            ticket,
            since: now,
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
        (key, ticket)
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

    /// Grants the head at `now`: counts its wait, frees its slot, and returns its ticket and
    /// waker. (Its allocation counts once its owner takes it.)
    pub(crate) fn pop_front_granted(&mut self, now: Instant) -> Option<(u64, Option<Waker>)> {
        let key = self.head;
        if key == NIL {
            return None;
        }
        self.unlink(key);
        let slot = &mut self.slots[key];
        let waited = now.saturating_duration_since(slot.since);
        let (ticket, waker) = (slot.ticket, slot.waker.take());
        let none = self.free_slot(key);
        debug_assert!(none.is_none(), "the waker was taken above");
        self.waits.waited += 1;
        self.waits.total = self.waits.total.saturating_add(waited);
        self.waits.max = self.waits.max.max(waited);
        Some((ticket, waker))
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

    /// Whether any waiting request's bytes satisfy `pred`.
    pub(crate) fn any(&self, pred: impl Fn(usize) -> bool) -> bool {
        let mut key = self.head;
        while key != NIL {
            if pred(self.slots[key].bytes) {
                return true;
            }
            key = self.slots[key].next;
        }
        false
    }

    /// Where the request with `ticket` in slot `key` stands.
    pub(crate) fn status(&self, key: usize, ticket: u64) -> Status {
        match self.slots.get(key) {
            Some(slot) if slot.ticket == ticket && slot.status != Status::Vacant => slot.status,
            // Its slot was freed behind it: only a grant does that.
            _ => Status::Granted,
        }
    }

    /// Stores `waker` (already cloned, outside the lock) to wake for `key`; returns the one it
    /// replaces, for the caller to drop after unlocking: a waker's `drop` is user code.
    pub(crate) fn register(&mut self, key: usize, waker: Waker) -> Option<Waker> {
        self.slots[key].waker.replace(waker)
    }

    /// Whether the waker stored for `key` would wake the same task as `waker`.
    pub(crate) fn will_wake(&self, key: usize, waker: &Waker) -> bool {
        self.slots[key]
            .waker
            .as_ref()
            .is_some_and(|stored| stored.will_wake(waker))
    }

    /// An allocation made under the lock without waiting.
    pub(crate) fn count_allocation(&mut self) {
        self.waits.allocations += 1;
    }

    /// A granted request was dropped before its owner took the allocation: it did not wait
    /// for an allocation after all. (Its wait still counts in the total and maximum.)
    pub(crate) fn uncount_grant(&mut self) {
        self.waits.waited -= 1;
    }

    pub(crate) fn wait_stats(&self) -> WaitStats {
        self.waits
    }

    /// The owner of a waiting or failed request gives its slot back; returns its status,
    /// unlinking it if it still waited, and its waker, for the caller to drop after
    /// unlocking (user code).
    #[must_use = "drop the waker after unlocking"]
    pub(crate) fn remove(&mut self, key: usize) -> (Status, Option<Waker>) {
        let status = self.slots[key].status;
        debug_assert!(matches!(status, Status::Waiting | Status::Failed(_)));
        if status == Status::Waiting {
            self.unlink(key);
        }
        let waker = self.free_slot(key);
        (status, waker)
    }

    /// Puts a slot on the free list; returns the waker it still held.
    fn free_slot(&mut self, key: usize) -> Option<Waker> {
        let slot = &mut self.slots[key];
        slot.status = Status::Vacant;
        slot.next = self.free;
        self.free = key;
        slot.waker.take()
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

impl Extend<Waker> for WakeList {
    fn extend<I: IntoIterator<Item = Waker>>(&mut self, wakers: I) {
        for waker in wakers {
            self.push(waker);
        }
    }
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
        assert!(a.1 < b.1 && b.1 < c.1, "tickets grow in queue order");
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.remove(b.0).0, Status::Waiting);
        assert_eq!(queue.front_bytes(), Some(1));
        let (ticket, waker_a) = queue.pop_front_granted(now).unwrap();
        assert_eq!(ticket, a.1);
        assert!(waker_a.is_some());
        assert_eq!(queue.status(a.0, a.1), Status::Granted);
        assert_eq!(queue.front_bytes(), Some(3));
        // The freed slots are reused, and the grant is still told apart by its ticket.
        let d = queue.push_back(4, waker(), now);
        let e = queue.push_back(5, waker(), now);
        assert!([d.0, e.0].contains(&a.0) && [d.0, e.0].contains(&b.0));
        assert_eq!(queue.status(a.0, a.1), Status::Granted);
        assert_eq!(queue.status(d.0, d.1), Status::Waiting);
        assert!(queue.any(|bytes| bytes == 5) && !queue.any(|bytes| bytes > 5));
        queue.fail_where(|bytes| (bytes > 4).then_some(AllocError::Closed), drop);
        assert_eq!(queue.status(e.0, e.1), Status::Failed(AllocError::Closed));
        assert_eq!(queue.len(), 2);
        queue.fail_all(AllocError::Closed, drop);
        assert!(queue.is_empty());
        assert_eq!(queue.remove(c.0).0, Status::Failed(AllocError::Closed));
        assert_eq!(queue.front_bytes(), None);
        let stats = queue.wait_stats();
        assert_eq!((stats.allocations, stats.waited), (0, 1));
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
