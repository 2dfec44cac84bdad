use std::{collections::HashMap, sync::RwLock, time::Duration};

use rapidhash::fast::RandomState;

use tokio::time::Instant;

use crate::key::StoreKey;

/// Process-local memory of recent denials: `(policy, key) -> deny until T`, where the policy is
/// a compiled policy's id (`CompiledPolicy::id`): a policy replaced at runtime has a new id, so
/// a denial of the policy before is never served for it.
///
/// It only repeats what the store already decided (a request of at least the same cost, before
/// the store said it could pass), so it never admits more than the store would; it saves the
/// round trip for clients that keep knocking while over their limit.
pub(crate) struct DenyCache {
    shards: Box<[RwLock<Shard>]>,
}

#[derive(Default)]
struct Shard {
    /// Hashed with rapidhash (seeded at random): the keys are SHA-256 digests already, and this
    /// lookup is on the flood path.
    map: HashMap<(u64, StoreKey), Entry, RandomState>,
    len_after_sweep: usize,
}

#[derive(Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) until: Instant,
    pub(crate) cost: u64,
    pub(crate) rule: usize,
}

const SHARDS: usize = 32;

impl DenyCache {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, key: &StoreKey) -> Option<&RwLock<Shard>> {
        self.shards.get(usize::from(key.as_bytes()[0]) % SHARDS)
    }

    /// The remaining wait when `(policy, key)` at `cost` is known to be denied now.
    pub(crate) fn get(&self, policy: u64, key: &StoreKey, cost: u64) -> Option<(Duration, usize)> {
        // A read lock: a flood from one key is answered from all threads at once.
        let shard = self.shard(key)?.read().ok()?;
        let entry = shard.map.get(&(policy, *key))?;
        let now = Instant::now();
        (entry.until > now && cost >= entry.cost).then(|| (entry.until - now, entry.rule))
    }

    /// Forgets the denial of `(policy, key)`, if any (the key was reset or allowed).
    pub(crate) fn forget(&self, policy: u64, key: &StoreKey) {
        if let Some(Ok(mut shard)) = self.shard(key).map(RwLock::write) {
            shard.map.remove(&(policy, *key));
        }
    }

    pub(crate) fn insert(&self, policy: u64, key: StoreKey, entry: Entry) {
        let Some(Ok(mut shard)) = self.shard(&key).map(RwLock::write) else {
            return;
        };
        if shard.map.len() > 2 * shard.len_after_sweep + 1024 {
            let now = Instant::now();
            shard.map.retain(|_, e| e.until > now);
            shard.len_after_sweep = shard.map.len();
        }
        shard.map.insert((policy, key), entry);
    }
}
