//! Locks in the in-process store, with the same semantics as the `lock_*.lua` scripts.

use std::time::Duration;

use super::{done, us, Kind, MemoryStore, Slot, Value};
use crate::{
    store::{LockStore, StoreFuture},
    StoreKey,
};

impl LockStore for MemoryStore {
    fn acquire_lock(&self, r: &StoreKey, token: &str, lease: Duration) -> StoreFuture<Option<u64>> {
        let resource = r;
        done(self.with_records(resource, |records, now| {
            if let Some(slot) = records.live((Kind::Lock, *resource), now) {
                if !matches!(&slot.value, Value::Lock { token: t } if t == token) {
                    return None;
                }
                // Re-sent by its holder: the same fence, and nothing changes.
                return match records.live((Kind::LockFence, *resource), now) {
                    Some(Slot {
                        value: Value::Fence(fence),
                        ..
                    }) => Some(*fence),
                    _ => Some(0),
                };
            }
            records.map.insert(
                (Kind::Lock, *resource),
                Slot {
                    value: Value::Lock {
                        token: token.to_owned(),
                    },
                    expires_at: now + us(lease),
                },
            );
            Some(records.next_fence((Kind::LockFence, *resource), now, None))
        }))
    }

    fn extend_lock(&self, resource: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        self.renew(Kind::Lock, resource, token, lease)
    }

    fn release_lock(&self, resource: &StoreKey, token: &str) -> StoreFuture<bool> {
        self.release(Kind::Lock, resource, token)
    }
}
