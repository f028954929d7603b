//! Trees as deep as a tree may be (README "Budgets beyond one pool": 1,024 levels below the
//! root): a request's cost grows with depth only (O(depth log depth), not O(depth²)), and
//! every operation fits a small thread stack: building, serving, reporting (`tree_report` and
//! every trait of `PoolReport`), closing and dropping.
//!
//! Natively only: a thousand pools and their drops take minutes under Miri.
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

/// Runs `f` on a thread with a 512 KiB stack (a tokio worker's is 2 MiB; before, building a
/// report of this chain overflowed 2 MiB in a debug build), under a watchdog.
fn small_stack<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    common::watchdog(secs, move || {
        thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[test]
fn the_deepest_tree_serves_reports_and_refuses_one_level_more() {
    small_stack(60, || {
        let pools = chain(1_024);
        let leaf = pools.last().unwrap();
        assert_eq!(
            leaf.child("too deep", CFG).err(),
            Some(ConfigError::TooDeep { max_depth: 1_024 })
        );

        let started = Instant::now();
        let held = leaf.try_allocate(4).unwrap();
        assert_eq!(pools[0].stats().in_use_bytes, 256);
        assert_eq!(pools[512].stats().in_use_bytes, 256);
        assert!(matches!(
            leaf.try_allocate(13),
            Err(AllocError::ExceedsBudget { .. } | AllocError::WouldBlock)
        ));
        drop(held);
        assert_eq!(pools[0].stats().in_use_bytes, 0);
        // Each of the chain's walks took O(depth) steps per level before (about 0.1 s per
        // request here in a debug build); now O(log depth).
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "two requests at depth 1,024 took {:?}",
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
        assert_eq!(levels, 1_024);
        assert!(nested.describes(leaf));
        assert_eq!(report.to_string().lines().count(), 1_025);
        // Fields move out of a report (it has no `Drop` of its own).
        let children = copy.children;
        assert_eq!(children.len(), 1);
        drop((report, children));
        drop(pools);
    });
}

#[test]
fn a_deep_chain_closes_and_drops_on_a_small_stack_leaf_first_and_root_first() {
    small_stack(60, || {
        let pools = chain(1_024);
        let held = pools[1_024].try_allocate(2).unwrap();
        drop(held);
        // Leaf first: each drop closes one pool and walks its ancestors.
        let mut pools = pools;
        while let Some(pool) = pools.pop() {
            drop(pool);
        }

        // Root first: the root's close closes the whole chain; each later drop finds its
        // pool closed. The last handle lets the chain's states go, one after another.
        let mut pools = chain(1_024);
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
