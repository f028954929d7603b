//! The FIFO of waiting requests: an intrusive doubly linked list of [`Node`]s that live,
//! pinned, inside the waiting futures (as in tokio's `batch_semaphore`), kept under the
//! pool's one lock; the wakers of the nodes it serves go to a `Deferred`, to be woken once the
//! lock is released and the books are settled (`deferred.rs`). One of
//! the two modules with `unsafe` code (the other is `heap.rs`).
//!
//! Waiting needs no heap memory: the node is part of the future, and the list only links it.
//!
//! # Who touches a node
//!
//! A node's `status` is atomic; everything else in it is touched only under the lock of the
//! list it is in, or by its owner alone while it is in no list.
//!
//! * The owner queues it ([`WaitList::push_back`]): `IDLE` → `WAITING`.
//! * A releaser grants it or fails it, under the lock: it unlinks the node, takes its waker
//!   and, as its very last access, stores `GRANTED` or `FAILED_*` with `Release`. From then on
//!   the node is its owner's alone again: the owner's `Acquire` load of the status pairs with
//!   that store, so it sees the grant without taking the lock, and may drop the node.
//! * The owner gives up ([`WaitList::remove`]), under the lock: `WAITING` → `IDLE`.
//! * A release may hand its own block to the head it grants (`GRANTED_BLOCK`, see
//!   [`WaitList::grant_front`]): the node then owns that memory until its owner takes it
//!   ([`Node::take_block`]), or frees it on drop.
//!
//! A node that is dropped while `WAITING` (still linked) would leave a dangling pointer in the
//! list, so its drop aborts the process instead; the futures always remove their node first.
//! Pinning guarantees that a node's memory stays put until its drop runs.

use crate::AllocError;
use crate::clock::Stamp;
use crate::deferred::Deferred;
use crate::heap::Memory;
use crate::sync::{AtomicUsize, UnsafeCell};
use core::marker::PhantomPinned;
use core::mem::ManuallyDrop;
use core::mem::MaybeUninit;
use core::pin::Pin;
use core::ptr::NonNull;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use core::task::Waker;
use event_listener::EventListener;

/// In no list: its owner's alone.
const IDLE: usize = 0;
/// Linked in a list, waiting for its bytes.
const WAITING: usize = 1;
/// Out of the list: its bytes were reserved for it.
const GRANTED: usize = 2;
/// Out of the list: it will never get its bytes, since the pool closed.
const FAILED_CLOSED: usize = 3;
/// Out of the list: it will never get its bytes, since they exceed the budget now in force
/// (`outcome`).
const FAILED_EXCEEDS: usize = 4;
/// Out of the list: its bytes were reserved for it, and the releaser handed it the memory of
/// the block it released as well (`outcome`, with the alignment in `list`): the node owns
/// that memory until its owner takes it.
const GRANTED_BLOCK: usize = 5;

/// `outcome` of a waiting node that takes a released block of its size: a root pool's own
/// allocation. (An address no block has: blocks are at least 8-aligned.)
const TAKES_BLOCK: usize = 1;

/// The bytes the owner of a node not handed a block holds beside it (`Links::outcome`).
fn beside_of(links: &Links) -> usize {
    match links.outcome.addr() {
        TAKES_BLOCK => 0,
        beside => beside,
    }
}

/// Why a waiting request fails.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Failure {
    /// The pool closed.
    Closed,
    /// The budget shrank below the request.
    ExceedsBudget {
        /// The budget in force.
        max_memory: usize,
    },
}

/// Where a node stands, as its owner sees it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Status {
    /// Never queued, or taken out by its owner.
    Idle,
    /// In the queue.
    Waiting,
    /// Its bytes are reserved; it is out of the queue.
    Granted,
    /// It failed; it is out of the queue.
    Failed(AllocError),
}

/// A waiting request, embedded in its future.
///
/// A fresh node is all zero bytes except its waker slot, which is not written at all
/// (`repr(C)` keeps them in that order): every future carries a node, most never queue, and
/// a node written field by field and then moved with its future (the `.await` of a fresh
/// `allocate` does move it) costs store-forwarding stalls on the fast path (measured: about
/// 10 ns of a 40 ns async allocate + drop).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Node {
    status: AtomicUsize,
    /// The owner's listener for room in a full queue (`wait.rs`, `Stage::AwaitingRoom`):
    /// touched by the owner alone, never by a list. Zero bytes when empty, so a fresh node
    /// stays all zeros but its waker slot.
    /// (Never dropped with the node: the request takes its listener out first, so the fast
    /// path pays no drop glue for it.)
    room: UnsafeCell<ManuallyDrop<Option<EventListener>>>,
    links: UnsafeCell<Links>,
    _pinned: PhantomPinned,
}

#[derive(Debug)]
#[repr(C)]
struct Links {
    bytes: usize,
    /// When it was queued, for the wait statistics (if its pool times waits).
    since: Stamp,
    /// While it waits: [`TAKES_BLOCK`] (without provenance) if it takes a released block,
    /// else the bytes its owner holds beside it at every level of its chain (a reservation's
    /// growth: the reservation's own bytes; 0 for every other request), without provenance,
    /// set when the node is made ([`Node::beside`]) and kept by every queueing. Once
    /// `FAILED_EXCEEDS`: the budget it exceeded (without provenance). Once `GRANTED_BLOCK`:
    /// the block handed to it.
    outcome: *mut u8,
    /// The address of the pool the request was made to (its own level), which may be a
    /// descendant of the pool whose list it waits in: closing that pool fails it here too.
    origin: usize,
    prev: Option<NonNull<Node>>,
    next: Option<NonNull<Node>>,
    /// The address of the list it is in: a node is only ever touched under that list's lock.
    /// Once `GRANTED_BLOCK`: the alignment of the block handed to it.
    list: usize,
    waker: WakerSlot,
}

/// An `Option<Waker>` whose empty form writes one zero word and leaves the waker's bytes
/// unwritten (see [`Node`]).
#[repr(C)]
struct WakerSlot {
    full: usize,
    waker: MaybeUninit<Waker>,
}

impl WakerSlot {
    const fn empty() -> Self {
        WakerSlot {
            full: 0,
            waker: MaybeUninit::uninit(),
        }
    }

    fn take(&mut self) -> Option<Waker> {
        if self.full == 0 {
            return None;
        }
        self.full = 0;
        // SAFETY: `full` said it holds a waker, written by `replace`; it is marked empty
        // before it is read out, so it is read once.
        Some(unsafe { self.waker.assume_init_read() })
    }

    fn replace(&mut self, waker: Waker) -> Option<Waker> {
        let old = self.take();
        self.waker.write(waker);
        self.full = 1;
        old
    }

    fn get(&self) -> Option<&Waker> {
        // SAFETY: `full` says a waker was written and not yet taken.
        (self.full != 0).then(|| unsafe { self.waker.assume_init_ref() })
    }
}

impl Drop for WakerSlot {
    fn drop(&mut self) {
        drop(self.take());
    }
}

impl core::fmt::Debug for WakerSlot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WakerSlot")
            .field("full", &(self.full != 0))
            .finish()
    }
}

// SAFETY: the links are touched only under the lock of the list the node is in, or by the
// owner alone when it is in no list (see the module docs); the waker is `Send + Sync`.
unsafe impl Send for Node {}
// SAFETY: as for `Send`: `&Node` gives no unsynchronised access.
unsafe impl Sync for Node {}

impl Default for Node {
    fn default() -> Self {
        Node::new()
    }
}

impl Node {
    /// A node for a request whose owner holds `beside` bytes at every level of its chain
    /// besides the bytes it asks for (a reservation's growth): a shrink that leaves the two
    /// together above a budget fails it (`WaitList::fail_where` judges `bytes + beside`).
    /// `beside` is a multiple of 8, so never [`TAKES_BLOCK`]; the request takes bytes only.
    pub(crate) fn beside(beside: usize) -> Self {
        let node = Node::new();
        debug_assert!(beside % 8 == 0);
        // SAFETY: the node was just made: nothing else can reach it.
        node.links.with_mut(|links| unsafe {
            (*links).outcome = core::ptr::without_provenance_mut(beside);
        });
        node
    }

    pub(crate) fn new() -> Self {
        Node {
            status: AtomicUsize::new(IDLE),
            room: UnsafeCell::new(ManuallyDrop::new(None)),
            links: UnsafeCell::new(Links {
                bytes: 0,
                since: Stamp::default(),
                outcome: core::ptr::null_mut(),
                origin: 0,
                prev: None,
                next: None,
                list: 0,
                waker: WakerSlot::empty(),
            }),
            _pinned: PhantomPinned,
        }
    }

    /// Where the node stands. `Acquire`: pairs with the releaser's `Release` store of
    /// `GRANTED` or `FAILED`, its last access to the node, so what it did before (the bytes
    /// counted, the error written) is visible and the node is ours again.
    #[inline(always)]
    pub(crate) fn status(self: Pin<&Self>) -> Status {
        match self.status.load(Acquire) {
            IDLE => Status::Idle,
            WAITING => Status::Waiting,
            GRANTED | GRANTED_BLOCK => Status::Granted,
            FAILED_CLOSED => Status::Failed(AllocError::Closed),
            _ => Status::Failed(
                self.links
                    // SAFETY: `FAILED_EXCEEDS`, seen with `Acquire`: the node is in no list,
                    // and the releaser that wrote the fields no longer touches it.
                    .with(|links| unsafe {
                        AllocError::ExceedsBudget {
                            requested_bytes: (*links).bytes,
                            max_memory: (*links).outcome.addr(),
                        }
                    }),
            ),
        }
    }
}

impl Node {
    /// The bytes its owner holds beside it (see [`Node::beside`]). For its owner, while the
    /// node is in no list (`Idle`), as when it queues.
    pub(crate) fn held_beside(self: Pin<&Self>) -> usize {
        debug_assert_eq!(self.status.load(Relaxed), IDLE);
        // SAFETY: idle: the node is in no list, and its owner (our caller) alone touches it.
        self.links.with(|links| unsafe { beside_of(&*links) })
    }

    /// When it was queued (the default stamp if its pool does not time waits). For its
    /// owner, once [`status`](Node::status) said `Granted`.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn queued_at(self: Pin<&Self>) -> Stamp {
        debug_assert!(matches!(self.status.load(Relaxed), GRANTED | GRANTED_BLOCK));
        // SAFETY: `GRANTED`, seen by the owner with `Acquire`: the node is in no list and the
        // releaser no longer touches it, so nothing writes the links concurrently.
        self.links.with(|links| unsafe { (*links).since })
    }
}

impl Node {
    /// The memory a release handed to this granted node with its bytes, if any: the owner's
    /// from now on (the node is `GRANTED` again). For its owner, once `status` said `Granted`
    /// (before that, `None`: nothing is handed to a node that still waits).
    #[inline(always)]
    pub(crate) fn take_block(self: Pin<&Self>) -> Option<Memory> {
        self.get_ref().take_handed_block()
    }

    #[inline(always)]
    fn take_handed_block(&self) -> Option<Memory> {
        if self.status.load(Acquire) != GRANTED_BLOCK {
            return None;
        }
        // The owner's alone: no list holds it, and nobody else writes the status now.
        self.status.store(GRANTED, Relaxed);
        // SAFETY: `GRANTED_BLOCK`, seen with `Acquire` (pairs with the releaser's `Release`
        // store, its last access): the node is in no list and the releaser no longer touches
        // it. `grant_front` stored in `outcome` the pointer of a `Memory` it forgot, of the
        // node's `bytes` and the alignment in `list`; the status just went back to `GRANTED`,
        // so it is read out once.
        self.links.with(|links| unsafe {
            let links = &*links;
            Some(Memory::from_raw(
                NonNull::new_unchecked(links.outcome),
                links.list,
                links.bytes,
            ))
        })
    }

    /// The owner's slot for its room listener (see the field).
    ///
    /// For the node's owner only, while it polls or drops its request (it holds the request
    /// by `&mut`, so no other call of its own runs meanwhile); lists never touch the slot.
    pub(crate) fn with_room<R>(
        self: Pin<&Self>,
        f: impl FnOnce(&mut Option<EventListener>) -> R,
    ) -> R {
        // SAFETY: only the owner calls this (see above), one call at a time, and nothing else
        // reads or writes `room`, so this is the only reference into it.
        self.room.with_mut(|room| f(unsafe { &mut *room }))
    }

    /// Makes a granted node idle again, to queue it in the next pool up (a child pool's
    /// request climbing to its parent). For its owner, once `status` said `Granted`.
    pub(crate) fn reset(self: Pin<&Self>) {
        // A climbing request is a child pool's: never handed a block.
        debug_assert_eq!(self.status.load(Relaxed), GRANTED);
        // The owner's alone (no list holds it); the next `push_back` publishes it under a lock.
        self.status.store(IDLE, Relaxed);
    }
}

impl Drop for Node {
    #[inline(always)]
    fn drop(&mut self) {
        if self.status.load(Acquire) == WAITING {
            // Still linked: freeing it would leave the list pointing at freed memory. The
            // futures always remove their node before dropping it; this is the last guard.
            std::process::abort();
        }
        // A block handed to a request that never took it (its owner frees it before giving
        // the bytes back; this is the last guard against a leak).
        drop(self.take_handed_block());
        // The room slot is empty here: a request holds a room listener only at a stage
        // whose drop (`Request::cancel_waiting`) takes it out first.
        #[cfg(debug_assertions)]
        {
            // SAFETY: `&mut self`: nobody else holds a reference into the node.
            let listening = self.room.with_mut(|room| unsafe { (*room).is_some() });
            debug_assert!(!listening, "a node dropped with its room listener");
        }
    }
}

/// The queue: nodes linked head (oldest) to tail. Lives under the pool's lock: every method
/// takes `&mut self` or `&self` of the locked list.
#[derive(Debug, Default)]
pub(crate) struct WaitList {
    head: Option<NonNull<Node>>,
    tail: Option<NonNull<Node>>,
    len: usize,
}

// SAFETY: the list only links nodes that are `Send + Sync`, and is only used under its lock.
unsafe impl Send for WaitList {}

/// What a round of grants did, for the wait statistics.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Granted {
    /// The bytes granted.
    pub(crate) bytes: usize,
    /// How many requests were granted.
    pub(crate) count: usize,
    /// Their waits added up, and the longest, in clock ticks.
    pub(crate) total_wait: u64,
    pub(crate) max_wait: u64,
}

impl WaitList {
    /// How many requests wait.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn addr(&self) -> usize {
        core::ptr::from_ref(self).addr()
    }

    /// The links of a node in this list (or being queued into it).
    ///
    /// # Safety
    ///
    /// `node` is alive, and is in this list (whose lock `&mut self` proves held) or is
    /// being queued into it by its owner; nobody else holds a reference into its links.
    #[allow(clippy::mut_from_ref)]
    unsafe fn links(&self, node: NonNull<Node>) -> &mut Links {
        // SAFETY: the caller's contract: alive, and its links are ours under the lock.
        let node = unsafe { node.as_ref() };
        // SAFETY: as above; nobody else reads or writes the links meanwhile.
        node.links.with_mut(|links| unsafe { &mut *links })
    }

    /// Queues `node` at the tail for `bytes`, to wake `waker` when it is served; `origin` is
    /// the address of the pool the request was made to. `takes_block`: a release of a block
    /// of `bytes` may hand it that block with the grant (see [`grant_front`](Self::grant_front)).
    ///
    /// # Panics
    ///
    /// If the node is already queued.
    pub(crate) fn push_back(
        &mut self,
        node: Pin<&Node>,
        bytes: usize,
        waker: Waker,
        since: Stamp,
        origin: usize,
        takes_block: bool,
    ) {
        assert_eq!(node.status.load(Acquire), IDLE, "a node is queued twice");
        let ptr = NonNull::from(node.get_ref());
        let list = self.addr();
        let tail = self.tail;
        // SAFETY: the node is idle, so its owner (our caller) alone touches it; it is pinned,
        // so it stays where it is until its drop, which aborts while it is linked.
        let links = unsafe { self.links(ptr) };
        // What its owner holds beside it stays (see `Links::outcome`).
        let beside = beside_of(links);
        *links = Links {
            bytes,
            since,
            waker: WakerSlot::empty(),
            outcome: core::ptr::without_provenance_mut(if takes_block {
                TAKES_BLOCK
            } else {
                beside
            }),
            origin,
            prev: tail,
            next: None,
            list,
        };
        drop(links.waker.replace(waker));
        match tail {
            // SAFETY: the tail is in this list.
            Some(tail) => unsafe { self.links(tail) }.next = Some(ptr),
            None => self.head = Some(ptr),
        }
        self.tail = Some(ptr);
        self.len += 1;
        // Under the lock, like every other change of a waiting node: `Relaxed` suffices, the
        // owner's next look at a waiting node takes the lock.
        node.status.store(WAITING, Relaxed);
    }

    /// Whether `node` (pinned by its owner) waits in this list.
    fn is_linked_here(&self, node: Pin<&Node>) -> bool {
        node.status.load(Relaxed) == WAITING
            // SAFETY: a waiting node's links are read under the lock of its list; if it is
            // in another list we read only the `list` field, which its owner wrote before
            // linking it and nobody changes while it waits.
            && node.links.with(|links| unsafe { (*links).list }) == self.addr()
    }

    /// Unlinks `node`, which is in this list.
    fn unlink(&mut self, node: NonNull<Node>) {
        // SAFETY: `node` and its neighbours are in this list.
        let links = unsafe { self.links(node) };
        let (prev, next) = (links.prev.take(), links.next.take());
        match prev {
            // SAFETY: as above.
            Some(prev) => unsafe { self.links(prev) }.next = next,
            None => self.head = next,
        }
        match next {
            // SAFETY: as above.
            Some(next) => unsafe { self.links(next) }.prev = prev,
            None => self.tail = prev,
        }
        self.len -= 1;
    }

    /// Whether the head takes a released block of `bytes` with its grant (it asks for exactly
    /// that many, and takes blocks): see [`grant_front`](Self::grant_front).
    pub(crate) fn front_takes_block(&self, bytes: usize) -> bool {
        self.head.is_some_and(|head| {
            // SAFETY: the head is in this list, whose lock `&self` (borrowed from the guard)
            // proves held.
            let links = unsafe { self.links(head) };
            links.bytes == bytes && links.outcome.addr() == TAKES_BLOCK
        })
    }

    /// Serves the head for as long as `fits(bytes)` says yes: unlinks each such node, then
    /// calls `commit(granted_bytes, now_empty)` once (which counts the bytes in the budget
    /// word), and only then marks the nodes granted, takes their wakers into `wakers` and
    /// returns the wait statistics. `commit` is called even when nothing fits.
    pub(crate) fn grant_front(
        &mut self,
        mut fits: impl FnMut(usize) -> bool,
        commit: impl FnOnce(usize, bool),
        now: Option<Stamp>,
        wakers: &mut Deferred,
    ) -> Granted {
        let mut granted = Granted::default();
        // The granted nodes, unlinked from the queue but still `WAITING` (so their owners
        // take the lock, which we hold, before they touch them), chained through `next`.
        let mut chain: Option<NonNull<Node>> = None;
        let mut chain_tail: Option<NonNull<Node>> = None;
        while let Some(head) = self.head {
            // SAFETY: the head is in this list.
            let bytes = unsafe { self.links(head) }.bytes;
            if !fits(bytes) {
                break;
            }
            self.unlink(head);
            match chain_tail {
                // SAFETY: chained nodes are ours until marked below (see `chain`).
                Some(tail) => unsafe { self.links(tail) }.next = Some(head),
                None => chain = Some(head),
            }
            chain_tail = Some(head);
            granted.bytes += bytes;
            granted.count += 1;
        }
        commit(granted.bytes, self.is_empty());
        while let Some(node) = chain {
            // SAFETY: as above.
            chain = unsafe { self.links(node) }.next.take();
            // SAFETY: unlinked above, still `WAITING`: ours under the lock until marked.
            unsafe { self.mark_granted(node, None, now, wakers, &mut granted) };
        }
        granted
    }

    /// [`grant_front`](Self::grant_front) for the head alone, which takes `block`, the memory
    /// of the block whose release frees its bytes (the caller made sure it
    /// [takes](Self::front_takes_block) a block of that size and fits): unlinks it and marks
    /// it granted with the block (`GRANTED_BLOCK`), so neither the releaser nor the waiter
    /// goes to the allocator. The bytes in use do not change, so there is nothing to commit.
    pub(crate) fn hand_front(
        &mut self,
        block: Memory,
        now: Option<Stamp>,
        wakers: &mut Deferred,
    ) -> Granted {
        let mut granted = Granted::default();
        let Some(head) = self.head else {
            debug_assert!(false, "a block handed to an empty queue");
            return granted;
        };
        self.unlink(head);
        // SAFETY: the head is in this list.
        granted.bytes = unsafe { self.links(head) }.bytes;
        granted.count = 1;
        // SAFETY: unlinked just now, still `WAITING`: ours under the lock until marked.
        unsafe { self.mark_granted(head, Some(block), now, wakers, &mut granted) };
        granted
    }

    /// Marks `node` granted, handing it `block` if given: its wait goes into `granted`, its
    /// waker to `wakers`, and the `Release` store of its status is the last access.
    ///
    /// # Safety
    ///
    /// `node` was unlinked from this list under the lock `&mut self` proves held, and is
    /// still `WAITING` (so its owner takes that lock before it touches it).
    ///
    /// Inlined: out of line, its writes to `granted` were read back by the caller as one
    /// 16-byte copy before they could forward (a store-forwarding stall on every grant).
    #[inline(always)]
    unsafe fn mark_granted(
        &mut self,
        node: NonNull<Node>,
        block: Option<Memory>,
        now: Option<Stamp>,
        wakers: &mut Deferred,
        granted: &mut Granted,
    ) {
        // SAFETY: the caller's contract: ours until the status store below.
        let links = unsafe { self.links(node) };
        if let Some(now) = now {
            let waited = now.ticks_since(links.since);
            granted.total_wait = granted.total_wait.saturating_add(waited);
            granted.max_wait = granted.max_wait.max(waited);
        }
        if let Some(waker) = links.waker.take() {
            wakers.wake(waker);
        }
        let code = match block {
            Some(memory) => {
                debug_assert!(links.outcome.addr() == TAKES_BLOCK && links.bytes == memory.bytes());
                let (ptr, align) = memory.into_raw();
                links.outcome = ptr.as_ptr();
                links.list = align;
                GRANTED_BLOCK
            }
            None => GRANTED,
        };
        // SAFETY: alive until its owner sees this store.
        let status = unsafe { &node.as_ref().status };
        // `Release`: pairs with the owner's `Acquire` (`Node::status`, `take_block`); the
        // last access.
        status.store(code, Release);
    }

    /// Fails every waiting request for which `fails(bytes, origin)` gives an error, keeping the
    /// others in order; their wakers go to `wakers`. Returns how many failed.
    pub(crate) fn fail_where(
        &mut self,
        fails: impl Fn(usize, usize) -> Option<Failure>,
        wakers: &mut Deferred,
    ) -> usize {
        let mut failed = 0;
        let mut cursor = self.head;
        while let Some(node) = cursor {
            // SAFETY: `node` is in this list.
            let links = unsafe { self.links(node) };
            cursor = links.next;
            // What it would hold here once served: its bytes and what its owner holds
            // beside them (a reservation's growth).
            let needs = links.bytes.saturating_add(beside_of(links));
            let Some(failure) = fails(needs, links.origin) else {
                continue;
            };
            self.unlink(node);
            // SAFETY: as above; unlinked but still `WAITING`, so still ours under the lock.
            let links = unsafe { self.links(node) };
            let code = match failure {
                Failure::Closed => FAILED_CLOSED,
                Failure::ExceedsBudget { max_memory } => {
                    links.outcome = core::ptr::without_provenance_mut(max_memory);
                    FAILED_EXCEEDS
                }
            };
            if let Some(waker) = links.waker.take() {
                wakers.wake(waker);
            }
            // SAFETY: alive until its owner sees this store.
            let status = unsafe { &node.as_ref().status };
            // `Release`: pairs with the owner's `Acquire` (`Node::status`); the last access.
            status.store(code, Release);
            failed += 1;
        }
        failed
    }

    /// Whether `node`'s stored waker would wake the same task as `waker`.
    pub(crate) fn will_wake(&self, node: Pin<&Node>, waker: &Waker) -> bool {
        if !self.is_linked_here(node) {
            return false;
        }
        // SAFETY: `node` waits in this list, whose lock we hold.
        let links = unsafe { self.links(NonNull::from(node.get_ref())) };
        links
            .waker
            .get()
            .is_some_and(|stored| stored.will_wake(waker))
    }

    /// Stores `waker` (cloned by the caller, outside the lock) for a node waiting in this
    /// list; returns the one it replaces, for the caller to drop after unlocking. `None` and
    /// no change if the node is not waiting here.
    #[must_use = "drop the old waker after unlocking"]
    pub(crate) fn register(&mut self, node: Pin<&Node>, waker: Waker) -> Option<Waker> {
        if !self.is_linked_here(node) {
            return Some(waker);
        }
        // SAFETY: `node` waits in this list, whose lock we hold.
        let links = unsafe { self.links(NonNull::from(node.get_ref())) };
        links.waker.replace(waker)
    }

    /// The bytes the head of the queue asks for, if anyone waits.
    pub(crate) fn front_bytes(&self) -> Option<usize> {
        // SAFETY: the head is in this list, whose lock `&self` (borrowed from the guard)
        // proves held.
        self.head.map(|head| unsafe { self.links(head) }.bytes)
    }

    /// Which node heads the queue (its address: an identity while it stays queued), if any.
    pub(crate) fn front_id(&self) -> Option<usize> {
        self.head.map(|head| head.as_ptr().addr())
    }

    /// Takes the head's waker to wake it (it stays queued; its next poll stores a waker
    /// again): for a head that may now be able to do more than wait (start a reclaim round).
    pub(crate) fn wake_front(&mut self, wakers: &mut Deferred) {
        if let Some(head) = self.head {
            // SAFETY: the head is in this list, whose lock `&mut self` proves held.
            if let Some(waker) = unsafe { self.links(head) }.waker.take() {
                wakers.wake(waker);
            }
        }
    }

    /// Takes the wakers of the waiting requests whose origin `picks`, to wake them (they stay
    /// queued; the next poll stores a waker again): for requests that may now be served
    /// another way (a floor below got room).
    pub(crate) fn wake_where(&mut self, picks: impl Fn(usize) -> bool, wakers: &mut Deferred) {
        let mut cursor = self.head;
        while let Some(node) = cursor {
            // SAFETY: `node` is in this list, whose lock `&mut self` proves held.
            let links = unsafe { self.links(node) };
            cursor = links.next;
            if picks(links.origin) {
                if let Some(waker) = links.waker.take() {
                    wakers.wake(waker);
                }
            }
        }
    }

    /// The owner takes its waiting node out; returns `Some` with its waker, for the caller to
    /// drop after unlocking (user code). `None` and no change if the node is not waiting here.
    /// A node taken out may have no waker (`Some(None)`): [`wake_front`](WaitList::wake_front)
    /// and [`wake_where`](WaitList::wake_where) take it, and the node stays queued until its
    /// next poll stores one again, so whether it left must not be read from its waker.
    #[must_use = "serve the ones behind, and drop the waker after unlocking"]
    pub(crate) fn remove(&mut self, node: Pin<&Node>) -> Option<Option<Waker>> {
        if !self.is_linked_here(node) {
            return None;
        }
        let ptr = NonNull::from(node.get_ref());
        self.unlink(ptr);
        // SAFETY: unlinked just now, under the lock: ours.
        let waker = unsafe { self.links(ptr) }.waker.take();
        // Under the lock; from here on the node is its owner's alone.
        node.status.store(IDLE, Relaxed);
        Some(waker)
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
    fn fifo_order_middle_removal_grants_and_failures() {
        let mut list = WaitList::default();
        let (a, b, c, d) = (
            core::pin::pin!(Node::new()),
            core::pin::pin!(Node::new()),
            core::pin::pin!(Node::new()),
            core::pin::pin!(Node::new()),
        );
        let now = Stamp::now();
        for (node, bytes) in [
            (a.as_ref(), 1),
            (b.as_ref(), 2),
            (c.as_ref(), 3),
            (d.as_ref(), 4),
        ] {
            list.push_back(node, bytes, waker(), now, 0, false);
        }
        assert_eq!(list.len(), 4);
        assert!(list.remove(b.as_ref()).is_some());
        assert_eq!(b.as_ref().status(), Status::Idle);
        assert!(
            list.remove(b.as_ref()).is_none(),
            "removing twice changes nothing"
        );
        assert_eq!(list.front_bytes(), Some(1));
        let mut wakers = Deferred::default();
        let mut committed = None;
        let granted = list.grant_front(
            |bytes| bytes <= 3,
            |bytes, empty| committed = Some((bytes, empty)),
            Some(now),
            &mut wakers,
        );
        assert_eq!((granted.bytes, granted.count), (4, 2));
        assert_eq!(committed, Some((4, false)));
        assert_eq!(a.as_ref().status(), Status::Granted);
        assert_eq!(c.as_ref().status(), Status::Granted);
        assert_eq!(list.front_bytes(), Some(4));
        assert_eq!(
            list.fail_where(
                |bytes, _| (bytes > 3).then_some(Failure::Closed),
                &mut wakers
            ),
            1
        );
        assert_eq!(d.as_ref().status(), Status::Failed(AllocError::Closed));
        assert!(list.is_empty() && list.front_bytes().is_none());
        assert_eq!(wakers.wake_ups(), 3);
    }
}
