//! Locks and idempotency records of the in-process store, with the same semantics as the
//! scripts.

use std::{
    collections::HashMap,
    future::ready,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use super::{
    Claim, ClaimRequest, IdempotencyStore, LockStore, MemoryStore, StoreError, StoreFuture,
};
use crate::StoreKey;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Lock,
    LockFence,
    Record,
    RecordFence,
}

enum Value {
    Lock {
        token: String,
    },
    Fence(u64),
    InFlight {
        token: String,
        fingerprint: Vec<u8>,
    },
    Completed {
        fingerprint: Vec<u8>,
        response: Vec<u8>,
    },
}

struct Slot {
    value: Value,
    /// Microseconds on the store clock; `u64::MAX` for no expiry.
    expires_at: u64,
}

type Map = HashMap<(Kind, StoreKey), Slot>;

/// Sharded by key, so both keys of one operation are in one shard.
pub(crate) struct Records {
    shards: Box<[Mutex<Map>]>,
}

impl Records {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::new(Map::new())).collect(),
        }
    }

    fn shard(&self, key: &StoreKey) -> Result<MutexGuard<'_, Map>, StoreError> {
        let i = usize::from(key.as_bytes()[1]) % self.shards.len();
        self.shards
            .get(i)
            .ok_or_else(|| StoreError::Invalid("no shard".into()))?
            .lock()
            .map_err(|_| StoreError::Invalid("a memory store shard was poisoned".into()))
    }

    pub(crate) fn sweep(&self, now: u64) {
        for shard in self.shards.iter() {
            if let Ok(mut map) = shard.lock() {
                map.retain(|_, slot| slot.expires_at > now);
                if map.capacity() > 4 * map.len() + 64 {
                    map.shrink_to_fit();
                }
            }
        }
    }
}

fn live(map: &mut Map, key: (Kind, StoreKey), now: u64) -> Option<&mut Slot> {
    if map.get(&key).is_some_and(|s| s.expires_at <= now) {
        map.remove(&key);
    }
    map.get_mut(&key)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX / 4)
        .max(1000)
}

fn next_fence(map: &mut Map, key: (Kind, StoreKey), now: u64, ttl: Option<Duration>) -> u64 {
    let expires_at = ttl.map_or(u64::MAX, |t| now.saturating_add(us(t)));
    let fence = match live(map, key, now) {
        Some(Slot {
            value: Value::Fence(n),
            ..
        }) => *n + 1,
        _ => 1,
    };
    map.insert(
        key,
        Slot {
            value: Value::Fence(fence),
            expires_at,
        },
    );
    fence
}

fn done<T: Send + 'static>(result: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(ready(result))
}

impl MemoryStore {
    fn with_records<T>(
        &self,
        key: &StoreKey,
        f: impl FnOnce(&mut Map, u64) -> T,
    ) -> Result<T, StoreError> {
        let now = self.now_us();
        let mut map = self.records().shard(key)?;
        Ok(f(&mut map, now))
    }
}

impl LockStore for MemoryStore {
    fn acquire_lock(
        &self,
        resource: &StoreKey,
        token: &str,
        lease: Duration,
    ) -> StoreFuture<Option<u64>> {
        done(self.with_records(resource, |map, now| {
            if live(map, (Kind::Lock, *resource), now).is_some() {
                return None;
            }
            map.insert(
                (Kind::Lock, *resource),
                Slot {
                    value: Value::Lock {
                        token: token.to_owned(),
                    },
                    expires_at: now + us(lease),
                },
            );
            Some(next_fence(map, (Kind::LockFence, *resource), now, None))
        }))
    }

    fn extend_lock(&self, resource: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        done(self.with_records(resource, |map, now| {
            match live(map, (Kind::Lock, *resource), now) {
                Some(slot) if matches!(&slot.value, Value::Lock { token: t } if t == token) => {
                    slot.expires_at = now + us(lease);
                    true
                }
                _ => false,
            }
        }))
    }

    fn release_lock(&self, resource: &StoreKey, token: &str) -> StoreFuture<bool> {
        done(self.with_records(resource, |map, now| {
            match live(map, (Kind::Lock, *resource), now) {
                Some(slot) if matches!(&slot.value, Value::Lock { token: t } if t == token) => {
                    map.remove(&(Kind::Lock, *resource));
                    true
                }
                _ => false,
            }
        }))
    }
}

impl IdempotencyStore for MemoryStore {
    fn claim(&self, key: &StoreKey, req: ClaimRequest<'_>) -> StoreFuture<Claim> {
        done(
            self.with_records(key, |map, now| match live(map, (Kind::Record, *key), now) {
                None => {
                    map.insert(
                        (Kind::Record, *key),
                        Slot {
                            value: Value::InFlight {
                                token: req.token.to_owned(),
                                fingerprint: req.fingerprint.to_vec(),
                            },
                            expires_at: now + us(req.lease),
                        },
                    );
                    let fence = next_fence(
                        map,
                        (Kind::RecordFence, *key),
                        now,
                        Some(req.retention + req.lease),
                    );
                    Claim::Claimed { fence }
                }
                Some(slot) => match &slot.value {
                    Value::InFlight { fingerprint, .. } | Value::Completed { fingerprint, .. }
                        if fingerprint.as_slice() != req.fingerprint =>
                    {
                        Claim::Mismatch
                    }
                    Value::InFlight { .. } => Claim::InFlight {
                        lease_left: Duration::from_micros(slot.expires_at.saturating_sub(now)),
                    },
                    Value::Completed { response, .. } => Claim::Completed(response.clone()),
                    _ => Claim::Mismatch,
                },
            }),
        )
    }

    fn complete(
        &self,
        key: &StoreKey,
        token: &str,
        response: Vec<u8>,
        retention: Duration,
    ) -> StoreFuture<bool> {
        done(self.with_records(key, |map, now| {
            let Some(slot) = live(map, (Kind::Record, *key), now) else {
                return false;
            };
            let Value::InFlight {
                token: t,
                fingerprint,
            } = &mut slot.value
            else {
                return false;
            };
            if t != token {
                return false;
            }
            let fingerprint = std::mem::take(fingerprint);
            slot.value = Value::Completed {
                fingerprint,
                response,
            };
            slot.expires_at = now + us(retention);
            true
        }))
    }

    fn extend_claim(&self, key: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        done(self.with_records(key, |map, now| {
            match live(map, (Kind::Record, *key), now) {
                Some(slot) if matches!(&slot.value, Value::InFlight { token: t, .. } if t == token) => {
                    slot.expires_at = now + us(lease);
                    true
                }
                _ => false,
            }
        }))
    }

    fn release_claim(&self, key: &StoreKey, token: &str) -> StoreFuture<bool> {
        done(self.with_records(key, |map, now| {
            match live(map, (Kind::Record, *key), now) {
                Some(slot) if matches!(&slot.value, Value::InFlight { token: t, .. } if t == token) => {
                    map.remove(&(Kind::Record, *key));
                    true
                }
                _ => false,
            }
        }))
    }
}
