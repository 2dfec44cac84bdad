//! Locks and idempotency records on Redis, written once over a [`ScriptRunner`] for both
//! clients. Each operation is one script call; both keys of a call share one hash tag.

use std::time::Duration;

use super::{
    script::{BoxFuture, Lua, Reply, ScriptRunner},
    Claim, ClaimRequest, StoreError,
};
use crate::StoreKey;

static LOCK_ACQUIRE: Lua = Lua::new(include_str!("../scripts/lock_acquire.lua"));
static LOCK_EXTEND: Lua = Lua::new(include_str!("../scripts/lock_extend.lua"));
static LOCK_RELEASE: Lua = Lua::new(include_str!("../scripts/lock_release.lua"));
static CLAIM: Lua = Lua::new(include_str!("../scripts/idempotency_claim.lua"));
static COMPLETE: Lua = Lua::new(include_str!("../scripts/idempotency_complete.lua"));
static LEASE: Lua = Lua::new(include_str!("../scripts/idempotency_lease.lua"));

fn ms(d: Duration) -> Vec<u8> {
    d.as_millis().max(1).to_string().into_bytes()
}

fn lock_keys(prefix: &str, resource: &StoreKey) -> [String; 2] {
    let tag = resource.to_hex();
    [
        format!("{prefix}:lock:{{{tag}}}"),
        format!("{prefix}:lock-fence:{{{tag}}}"),
    ]
}

fn record_keys(prefix: &str, key: &StoreKey) -> [String; 2] {
    let tag = key.to_hex();
    [
        format!("{prefix}:idem:{{{tag}}}"),
        format!("{prefix}:idem-fence:{{{tag}}}"),
    ]
}

fn flag(
    reply: impl std::future::Future<Output = Result<Reply, StoreError>> + Send + 'static,
) -> BoxFuture<Result<bool, StoreError>> {
    Box::pin(async move { Ok(reply.await?.int()? == 1) })
}

fn positive(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn acquire_lock<R: ScriptRunner>(
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

pub(crate) fn extend_lock<R: ScriptRunner>(
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

pub(crate) fn release_lock<R: ScriptRunner>(
    r: &R,
    resource: &StoreKey,
    token: &str,
) -> BoxFuture<Result<bool, StoreError>> {
    let [lock, _] = lock_keys(r.prefix(), resource);
    flag(r.run(&LOCK_RELEASE, vec![lock], vec![token.as_bytes().to_vec()]))
}

pub(crate) fn claim<R: ScriptRunner>(
    r: &R,
    key: &StoreKey,
    req: ClaimRequest<'_>,
) -> BoxFuture<Result<Claim, StoreError>> {
    let call = r.run(
        &CLAIM,
        record_keys(r.prefix(), key).to_vec(),
        vec![
            req.token.as_bytes().to_vec(),
            req.fingerprint.to_vec(),
            ms(req.lease),
            ms(req.retention + req.lease),
        ],
    );
    Box::pin(async move {
        let mut reply = call.await?.array()?.into_iter();
        let kind = reply
            .next()
            .ok_or_else(|| StoreError::Reply("empty claim reply".into()))?;
        let value = reply.next();
        Ok(match (kind.int()?, value) {
            (1, Some(fence)) => Claim::Claimed {
                fence: positive(fence.int()?),
            },
            (2, Some(left)) => Claim::InFlight {
                lease_left: Duration::from_millis(positive(left.int()?)),
            },
            (3, Some(Reply::Bytes(response))) => Claim::Completed(response),
            (4, None) => Claim::Mismatch,
            (kind, value) => {
                return Err(StoreError::Reply(format!("claim: {kind} {value:?}")));
            }
        })
    })
}

pub(crate) fn complete<R: ScriptRunner>(
    r: &R,
    key: &StoreKey,
    token: &str,
    response: Vec<u8>,
    retention: Duration,
) -> BoxFuture<Result<bool, StoreError>> {
    let [record, _] = record_keys(r.prefix(), key);
    flag(r.run(
        &COMPLETE,
        vec![record],
        vec![token.as_bytes().to_vec(), response, ms(retention)],
    ))
}

/// Extends the claim (`Some(lease)`) or releases it (`None`).
pub(crate) fn lease<R: ScriptRunner>(
    r: &R,
    key: &StoreKey,
    token: &str,
    lease: Option<Duration>,
) -> BoxFuture<Result<bool, StoreError>> {
    let [record, _] = record_keys(r.prefix(), key);
    let lease = lease.map_or_else(|| b"0".to_vec(), ms);
    flag(r.run(&LEASE, vec![record], vec![token.as_bytes().to_vec(), lease]))
}

/// Implements [`LockStore`](super::LockStore) and [`IdempotencyStore`](super::IdempotencyStore)
/// for a client type that is a [`ScriptRunner`].
macro_rules! impl_record_stores {
    ($t:ty) => {
        impl $crate::store::LockStore for $t {
            fn acquire_lock(
                &self,
                resource: &$crate::StoreKey,
                token: &str,
                lease: std::time::Duration,
            ) -> $crate::store::StoreFuture<Option<u64>> {
                $crate::store::records::acquire_lock(self, resource, token, lease)
            }
            fn extend_lock(
                &self,
                resource: &$crate::StoreKey,
                token: &str,
                lease: std::time::Duration,
            ) -> $crate::store::StoreFuture<bool> {
                $crate::store::records::extend_lock(self, resource, token, lease)
            }
            fn release_lock(
                &self,
                resource: &$crate::StoreKey,
                token: &str,
            ) -> $crate::store::StoreFuture<bool> {
                $crate::store::records::release_lock(self, resource, token)
            }
        }

        impl $crate::store::IdempotencyStore for $t {
            fn claim(
                &self,
                key: &$crate::StoreKey,
                request: $crate::store::ClaimRequest<'_>,
            ) -> $crate::store::StoreFuture<$crate::store::Claim> {
                $crate::store::records::claim(self, key, request)
            }
            fn complete(
                &self,
                key: &$crate::StoreKey,
                token: &str,
                response: Vec<u8>,
                retention: std::time::Duration,
            ) -> $crate::store::StoreFuture<bool> {
                $crate::store::records::complete(self, key, token, response, retention)
            }
            fn extend_claim(
                &self,
                key: &$crate::StoreKey,
                token: &str,
                lease: std::time::Duration,
            ) -> $crate::store::StoreFuture<bool> {
                $crate::store::records::lease(self, key, token, Some(lease))
            }
            fn release_claim(
                &self,
                key: &$crate::StoreKey,
                token: &str,
            ) -> $crate::store::StoreFuture<bool> {
                $crate::store::records::lease(self, key, token, None)
            }
        }
    };
}
pub(crate) use impl_record_stores;
