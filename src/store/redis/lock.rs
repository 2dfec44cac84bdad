//! Locks on Redis: the `lock_*.lua` scripts, and [`LockStore`] for every [`ScriptRunner`].
//! Both keys of a lock (the lock and its fence counter) share one hash tag.

use std::time::Duration;

use super::{
    script::{flag, ms, positive, BoxFuture, Lua},
    sealed::Runner,
    ScriptRunner,
};
use crate::{
    store::{LockStore, StoreError, StoreFuture},
    StoreKey,
};

static LOCK_ACQUIRE: Lua = Lua::new(include_str!("../../scripts/lock_acquire.lua"));
static LOCK_EXTEND: Lua = Lua::new(include_str!("../../scripts/lock_extend.lua"));
static LOCK_RELEASE: Lua = Lua::new(include_str!("../../scripts/lock_release.lua"));

fn lock_keys(prefix: &str, resource: &StoreKey) -> [String; 2] {
    let tag = resource.to_hex();
    [
        format!("{prefix}:lock:{{{tag}}}"),
        format!("{prefix}:lock-fence:{{{tag}}}"),
    ]
}

fn acquire_lock<R: Runner + ?Sized>(
    r: &R,
    resource: &StoreKey,
    token: &str,
    lease: Duration,
) -> BoxFuture<Result<Option<u64>, StoreError>> {
    let call = r.run(
        &LOCK_ACQUIRE,
        lock_keys(r.prefix(), resource).to_vec(),
        vec![token.as_bytes().to_vec(), ms(lease)],
    );
    Box::pin(async move {
        let reply = call.await?.array()?;
        match reply.as_slice() {
            [taken, fence] if taken.int()? == 1 => Ok(Some(positive(fence.int()?))),
            [_, _] => Ok(None),
            other => Err(StoreError::Reply(format!("lock acquire: {other:?}"))),
        }
    })
}

fn extend_lock<R: Runner + ?Sized>(
    r: &R,
    resource: &StoreKey,
    token: &str,
    lease: Duration,
) -> BoxFuture<Result<bool, StoreError>> {
    let [lock, _] = lock_keys(r.prefix(), resource);
    flag(r.run(
        &LOCK_EXTEND,
        vec![lock],
        vec![token.as_bytes().to_vec(), ms(lease)],
    ))
}

fn release_lock<R: Runner + ?Sized>(
    r: &R,
    resource: &StoreKey,
    token: &str,
) -> BoxFuture<Result<bool, StoreError>> {
    let [lock, _] = lock_keys(r.prefix(), resource);
    flag(r.run(&LOCK_RELEASE, vec![lock], vec![token.as_bytes().to_vec()]))
}

impl<R: ScriptRunner> LockStore for R {
    fn acquire_lock(
        &self,
        resource: &StoreKey,
        token: &str,
        lease: Duration,
    ) -> StoreFuture<Option<u64>> {
        acquire_lock(self, resource, token, lease)
    }

    fn extend_lock(&self, resource: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        extend_lock(self, resource, token, lease)
    }

    fn release_lock(&self, resource: &StoreKey, token: &str) -> StoreFuture<bool> {
        release_lock(self, resource, token)
    }
}
