//! Trees as deep as a tree may be (README "Budgets beyond one pool": 32,766 levels below the
//! root): a request's cost grows with depth only (O(depth log depth), not O(depth²)), and no
//! operation recurses once per level, so none overflows a thread's stack: building, serving,
//! reporting (`tree_report` and every trait of `PoolReport`), closing and dropping.
//!
//! Natively only: thousands of pools and their drops take minutes under Miri.
#![cfg(not(miri))]

mod common;

use std::thread;
use std::time::{Duration, Instant};

use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize, ConfigError};

const CFG: BufPoolCfg = BufPoolCfg {
    buffer_size: BufferSize::S64,
    max_memory: 64 * 16,
};

/// `depth` pools below a root, the root first.
fn chain(depth: usize) -> Vec<BufPool> {
    let mut pools = vec![BufPool::builder(CFG).name("root").build().unwrap()];
    for level in 1..=depth {
        let child = pools[level - 1]
            .child(format!("level-{level}"), CFG)
            .unwrap();
        pools.push(child);
    }
    pools
}

/// Runs `f` on a thread with a 256 KiB stack (a tokio worker's is 2 MiB; a recursion per
/// level would need several MiB at these depths), under a watchdog.
fn small_stack<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    common::watchdog(secs, move || {
        thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[test]
fn the_deepest_tree_serves_reports_and_refuses_one_level_more() {
    small_stack(120, || {
        let pools = chain(32_766);
        let leaf = pools.last().unwrap();
        assert_eq!(
            leaf.child("too deep", CFG).err(),
            Some(ConfigError::TooDeep { max_depth: 32_766 })
        );

        let started = Instant::now();
        let held = leaf.try_allocate(4).unwrap();
        assert_eq!(pools[0].stats().in_use_bytes, 256);
        assert_eq!(pools[16_000].stats().in_use_bytes, 256);
        assert!(matches!(
            leaf.try_allocate(13),
            Err(AllocError::ExceedsBudget { .. } | AllocError::WouldBlock)
        ));
        drop(held);
        assert_eq!(pools[0].stats().in_use_bytes, 0);
        // Before the chain's walks took O(log depth) steps per level this took 27 s (debug).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "two requests at depth 32,766 took {:?}",
            started.elapsed()
        );

        let report = leaf.tree_report();
        let copy = report.clone();
        assert_eq!(copy, report);
        assert!(format!("{report:?}").starts_with("PoolReport { name: Some(\"root\")"));
        assert_eq!(report.top(1).len(), 1);
        let mut levels = 0;
        let mut nested = &report;
        while let Some(child) = nested.children.first() {
            levels += 1;
            nested = child;
        }
        assert_eq!(levels, 32_766);
        assert!(nested.describes(leaf));
        drop((report, copy));

        // Dropping each pool closes it, which looks at each ancestor's queue: O(depth) per
        // pool, so dropping this whole chain takes minutes in a debug build. The next test
        // drops chains of 1,000 both ways.
        std::mem::forget(pools);
    });
}

#[test]
fn a_deep_chain_closes_and_drops_on_a_small_stack_leaf_first_and_root_first() {
    small_stack(120, || {
        let pools = chain(1_000);
        let held = pools[1_000].try_allocate(2).unwrap();
        let display = pools[0].report().to_string();
        assert_eq!(display.lines().count(), 1_001);
        drop(held);
        // Leaf first: each drop closes one pool and walks its ancestors.
        let mut pools = pools;
        while let Some(pool) = pools.pop() {
            drop(pool);
        }

        // Root first: the root's close closes the whole chain; each later drop finds its
        // pool closed. The last handle lets the chain's states go, one after another.
        let mut pools = chain(1_000);
        let leaf = pools.pop().unwrap();
        let held = leaf.try_allocate(1).unwrap();
        let mut rest = pools.into_iter();
        let root = rest.next().unwrap();
        let closing = thread::spawn(move || drop(root));
        // The root's drop waits for the allocation, closing the chain first.
        common::wait_until(10, "the chain closed", || {
            leaf.try_allocate(1).err() == Some(AllocError::Closed)
        });
        drop(held);
        closing.join().unwrap();
        drop(rest);
        drop(leaf);
    });
}
