//! Locks on Redis: the `lock_*.lua` scripts, and [`LockStore`] for every [`ScriptRunner`].
//! Both keys of a lock (the lock and its fence counter) share one hash tag.

use std::time::Duration;

use super::{
    fenced_keys,
    script::{flag, ms, positive, Lua},
    ScriptRunner,
};
use crate::{
    store::{LockStore, StoreError, StoreFuture},
    StoreKey,
};

static LOCK_ACQUIRE: Lua = Lua::new(include_str!("../../scripts/lock_acquire.lua"));
static LOCK_EXTEND: Lua = Lua::new(include_str!("../../scripts/lock_extend.lua"));
static LOCK_RELEASE: Lua = Lua::new(include_str!("../../scripts/lock_release.lua"));

/// A token as a script argument.
fn arg(token: &str) -> Vec<u8> {
    token.as_bytes().to_vec()
}

impl<R: ScriptRunner> LockStore for R {
    fn acquire_lock(&self, r: &StoreKey, token: &str, lease: Duration) -> StoreFuture<Option<u64>> {
        let keys = fenced_keys(self.prefix(), "lock", r).to_vec();
        let call = self.run(&LOCK_ACQUIRE, keys, vec![arg(token), ms(lease)]);
        Box::pin(async move {
            let reply = call.await?.array()?;
            match reply.as_slice() {
                [taken, fence] if taken.int()? == 1 => Ok(Some(positive(fence.int()?))),
                [_, _] => Ok(None),
                other => Err(StoreError::Reply(format!("lock acquire: {other:?}"))),
            }
        })
    }

    fn extend_lock(&self, r: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        let [lock, _] = fenced_keys(self.prefix(), "lock", r);
        flag(self.run(&LOCK_EXTEND, vec![lock], vec![arg(token), ms(lease)]))
    }

    fn release_lock(&self, r: &StoreKey, token: &str) -> StoreFuture<bool> {
        let [lock, _] = fenced_keys(self.prefix(), "lock", r);
        flag(self.run(&LOCK_RELEASE, vec![lock], vec![arg(token)]))
    }
}
