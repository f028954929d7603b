//! The walks over a pool and its ancestors that give bytes back level by level: a block's
//! release, a reservation's shrink, a request's cancel or failure.
//!
//! A child pool's bytes are counted at every level of its chain (here as an allocation or a
//! reservation, in each ancestor as bytes held for a descendant). Giving them back touches
//! every level, and each level's give-back may owe user code: wake-ups of the waiters it
//! serves, a drain notification. If that code ran level by level, a waker that panics at an
//! ancestor would unwind through the walk before the levels below were given back, and those
//! bytes would stay counted with nobody holding them (and the pool's drop would wait for them
//! forever). So every walk here is one [`settle`]: each level's step only records the user
//! code it owes in the one [`Deferred`], and that code runs once, after the last level's
//! books are done. A panic there is passed on with every pool consistent.
//!
//! The rule for callers that keep their own state (a request's stage and levels, a
//! reservation's size): record the change first, then walk, so that an unwinding walk can
//! never make them give a level back twice.
//!
//! The steps of a walk that only write books into a `Deferred` the caller passes
//! (`State::give_back_completed`, which settles the floors' books level by level, and
//! `State::give_back_above`) are `State`'s own, so that `state.rs` can use them inside its
//! own `settle` too (a fast path that puts back part of a floor retired meanwhile); the
//! `settle` around each walk, and where it starts, are here.

use crate::AllocError;
use crate::deferred::{Deferred, settle};
use crate::heap::{Block, Memory, Pool, PoolAccess};
use crate::state::{FloorTakes, State};
use crate::sync::Arc;

/// Gives back `bytes` of completed holdings not counted as allocations (a reservation's)
/// in `pool` and, following the floors' books, in its ancestors, from the top down; then
/// runs the wake-ups owed. The caller holds a handle on `pool`.
pub(crate) fn give_back_held(pool: &State, bytes: usize) {
    settle(|deferred| pool.give_back_completed(bytes, false, deferred));
}

/// As [`give_back_held`], with the user code it owes left in `deferred` for the caller.
pub(crate) fn give_back_held_deferred(pool: &State, bytes: usize, deferred: &mut Deferred) {
    pool.give_back_completed(bytes, false, deferred);
}

/// Holds `bytes` more in `pool` and, as a request would (its floors first, as much as they
/// have free, the rest climbing on), in its ancestors, whatever their budgets (a
/// reservation's overcommit), all or nothing: fails only if some level could not count them.
pub(crate) fn force_hold(pool: &State, bytes: usize) -> Result<(), AllocError> {
    pool.force_hold(bytes)?;
    let mut takes = FloorTakes::default();
    let mut rest = bytes;
    let mut levels = 1;
    while levels <= pool.depth() {
        if let Some(taken) = pool
            .at_level(levels - 1)
            .take_floor_part(rest, 0)
            .filter(|&taken| taken > 0)
        {
            takes.push(levels - 1, taken);
            rest -= taken;
            if rest == 0 {
                break;
            }
        }
        if let Err(error) = pool.at_level(levels).force_hold(rest) {
            settle(|deferred| {
                takes.undo(pool, bytes, levels - 1, deferred);
                pool.give_back_here(bytes, false, deferred);
            });
            return Err(error);
        }
        levels += 1;
    }
    // Counting them as climbed may re-home bytes into a floor: if a wake-up of that give-back
    // panics, the held bytes go back first (the caller would never record them).
    let mut deferred = Deferred::default();
    takes.note_climbed(pool, bytes, levels, &mut deferred);
    deferred.run_or_undo(|| give_back_held(pool, bytes));
    Ok(())
}

/// Gives back `bytes` a request on its way up reserved in the lowest `levels` pools of the
/// chain (`pool` counted as its allocation if `counted`, the ancestors not) without making
/// an allocation of them, into `deferred`. The caller holds a handle on `pool`, and has
/// recorded that it no longer holds these levels.
pub(crate) fn give_back_reserved(
    pool: &State,
    bytes: usize,
    levels: usize,
    counted: bool,
    deferred: &mut Deferred,
) {
    if levels == 0 {
        return;
    }
    pool.give_back_above(bytes, levels - 1, deferred);
    pool.give_back_here(bytes, counted, deferred);
}

/// Gives back the bytes of a request that completed (every level it needs held) but whose
/// result is lost before it became an allocation or a reservation (`counted`: it was
/// counted as an allocation).
pub(crate) fn give_back_completed_request(
    pool: &State,
    bytes: usize,
    counted: bool,
    deferred: &mut Deferred,
) {
    pool.give_back_completed(bytes, counted, deferred);
}

/// A pool's floor goes back to its ancestors (the pool is drained and being dropped): what
/// of it a close did not give back already.
pub(crate) fn give_floor_back(pool: &State) {
    settle(|deferred| retire_floor(pool, deferred));
}

/// Closes `pool` and its descendants ([`State::close`]: their waiters fail), then retires
/// their floors: a closed pool serves no request, so what of its floor is free goes back to
/// its ancestors now, and the rest as its allocations come back. So an ancestor whose
/// handle is dropped drains once the allocations are back, while a floored child lives on.
pub(crate) fn close(pool: &State) {
    // The close runs user code (the failed waiters' wakers): a panic there must not keep
    // the floors from going back (an ancestor's drop barrier would wait for them), so it
    // goes on after they did.
    let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.close()));
    // Collected after the close: a child adopted meanwhile saw `CLOSED` (`State::adopt`)
    // and retires its own floor.
    let mut descendants = Vec::new();
    pool.collect_descendants(&mut descendants);
    settle(|deferred| {
        // Deepest first (a floor's bytes go to its parent's floor, retired after it).
        for descendant in &descendants {
            retire_floor(descendant, deferred);
        }
        retire_floor(pool, deferred);
    });
    if let Err(panic) = closed {
        std::panic::resume_unwind(panic);
    }
}

/// Retires `pool`'s floor ([`State::retire_floor`]) and gives what was free of it back to
/// the ancestors, as the completed holding of the parent it is there.
fn retire_floor(pool: &State, deferred: &mut Deferred) {
    let back = pool.retire_floor();
    if back > 0 {
        let parent = pool.parent().expect("a pool with a floor has a parent");
        parent.give_back_completed(back, false, deferred);
    }
}

// SAFETY: `is_drained` reads the budget word, which counts the bytes of every live block from
// the reservation that made it (`block` below is only called with reserved bytes) until
// its release gives them back. Both releases hold the pool only as a reference made in their
// own frame from the `PoolAccess` (never as an argument), and give the block's own level back
// last, in that frame: with `BudgetWord::try_release`, whose `&self` covers only an atomic,
// after every method of the pool they called has returned; or by ending a `Released`, which
// unlocks the queue lock under which the bytes went back (the pool touched since only under
// it; `quiesce` takes the same lock), or returns the handle `keep_alive` gave, to be dropped
// by the caller. Bytes of ancestors (child pools) go back first, while this pool's own bytes
// still keep it (and the parent it holds) alive. The user code owed runs after that, and
// touches no pool: it holds wakers and drain events of its own. `release_owned` runs only for
// blocks marked owned (`own` counted them while the owner's handle is kept in the pool), so
// the pool outlives it: it disowns the block after giving its bytes back and returns the
// handle rather than dropping it.
unsafe impl Pool for State {
    type Unreleased = Unreleased;

    #[inline(always)]
    fn align(&self) -> usize {
        self.config.align
    }

    #[inline(always)]
    fn release(access: PoolAccess<State>, memory: Memory) -> Option<Unreleased> {
        let pool = access.until_given_back();
        if pool.parent().is_some() {
            return Some(Unreleased::ChildBlock(memory));
        }
        if pool.is_queued() {
            // Someone waits: the head may take this very block (no free, no allocation).
            return Some(Unreleased::QueuedBlock(memory));
        }
        let bytes = memory.bytes();
        pool.recycle(memory);
        // The last step, here in this frame: the pool may be gone once it succeeded.
        if pool.budget_word().try_release(bytes) {
            return None;
        }
        Some(Unreleased::Bytes(bytes))
    }

    #[cold]
    #[inline(never)]
    fn release_slow(
        access: PoolAccess<State>,
        rest: Unreleased,
        keep_alive: impl FnOnce() -> Arc<State>,
    ) -> Option<Arc<State>> {
        let pool = access.until_given_back();
        let mut deferred = Deferred::default();
        let released = match rest {
            // A root pool's block released while requests wait: handed to the head, or freed
            // and settled (`State::release_block_queued`).
            Unreleased::QueuedBlock(memory) => {
                pool.release_block_queued(memory, keep_alive, &mut deferred)
            }
            // A root pool's block whose release the fast path could not make.
            Unreleased::Bytes(bytes) => pool.release_block_slow(bytes, keep_alive, &mut deferred),
            // A child pool's block: every ancestor's level first (while the block's own bytes
            // keep the pool alive), then its own, last, here in this frame.
            Unreleased::ChildBlock(memory) => {
                let bytes = memory.bytes();
                pool.recycle(memory);
                pool.give_back_above_completed(bytes, &mut deferred);
                if pool.budget_word().try_release(bytes) {
                    return deferred.run_all(None);
                }
                pool.release_block_slow(bytes, keep_alive, &mut deferred)
            }
        };
        // The last step (an unlock, if the bytes went back under the lock), then the user
        // code owed, now that no frame of this release borrows the pool.
        let handle = released.end();
        deferred.run_all(handle)
    }

    #[cold]
    #[inline(never)]
    fn release_owned(
        access: PoolAccess<State>,
        memory: Memory,
        keep_alive: impl FnOnce() -> Arc<State>,
    ) -> Option<std::sync::Arc<dyn Send + Sync>> {
        let pool = access.until_given_back();
        let mut deferred = Deferred::default();
        // The owner's handle keeps the pool alive throughout: every level is given back as
        // with a handle, and the block is disowned, before any user code runs (a panicking
        // waker must not leave the pool owned forever); then, if this was the last owned
        // block, the handle goes to the caller to drop (which may run the pool's drop), or is
        // dropped by the unwinding.
        if pool.parent().is_none() && pool.is_queued() {
            // As `release`: the head may take this very block. Not the last handle (the
            // owner's is), so its drop runs nothing.
            drop(
                pool.release_block_queued(memory, keep_alive, &mut deferred)
                    .end(),
            );
        } else {
            let bytes = memory.bytes();
            pool.recycle(memory);
            pool.give_back_completed(bytes, true, &mut deferred);
        }
        let handle = pool.disown();
        deferred.run_all(handle)
    }

    fn is_drained(&self) -> bool {
        State::is_drained(self)
    }

    fn quiesce(&self) {
        State::quiesce(self);
    }
}

/// What a block's release leaves to [`Pool::release_slow`]: its memory, or (the fast path
/// having freed or cached it) its bytes, which are still counted either way.
pub(crate) enum Unreleased {
    /// A root pool's block while requests wait: the head may take it.
    QueuedBlock(Memory),
    /// A child pool's block.
    ChildBlock(Memory),
    /// A root pool's bytes whose release needs the lock, or a handle.
    Bytes(usize),
}

/// The block for `bytes` just reserved in `pool` (every level of its chain, counted as its
/// allocation): fresh memory, or a cached block of that size. If the system allocator has
/// none, the bytes go back to the budget (serving waiters) and the call fails.
/// (A function of the `Arc`: loom's `Arc` cannot be a method receiver.)
#[inline(always)]
pub(crate) fn block(
    pool: &Arc<State>,
    bytes: usize,
    zeroed: bool,
) -> Result<Block<State>, AllocError> {
    let Some(memory) = pool.memory_for(bytes, zeroed) else {
        return Err(out_of_memory(pool, bytes));
    };
    // SAFETY: every caller reserved `bytes` in this pool's budget word for this block alone
    // (a fast-path or locked reservation, or a grant it took), and only the block's drop
    // gives them back.
    Ok(unsafe { Block::new(pool, memory, zeroed) })
}

/// The block for a request that a release granted its own block with the bytes
/// (`State::release_block_queued`): `memory` is of the request's bytes and this pool's
/// alignment; zeroed here if asked.
#[inline(always)]
pub(crate) fn handed_block(pool: &Arc<State>, mut memory: Memory, zeroed: bool) -> Block<State> {
    if zeroed {
        memory.fill_zero();
    }
    // SAFETY: the grant reserved the block's bytes in this pool's budget word for this
    // request alone (the releaser's bytes stayed counted, now as this block's), and only the
    // block's drop gives them back.
    unsafe { Block::new(pool, memory, zeroed) }
}

/// The allocator had no memory for `bytes` just reserved: they go back at once, serving
/// waiters, as the release of an allocation that never was (so `outstanding` stays exact;
/// `total_allocations` counts the attempt). The caller holds a live handle, so the pool
/// outlives this.
#[cold]
#[inline(never)]
fn out_of_memory(pool: &State, bytes: usize) -> AllocError {
    settle(|deferred| pool.give_back_completed(bytes, true, deferred));
    AllocError::OutOfMemory { bytes }
}
