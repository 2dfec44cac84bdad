//! Idempotency records on Redis: the `idempotency_*.lua` scripts, and [`IdempotencyStore`]
//! for every [`ScriptRunner`]. Both keys of a record (the record and its fence counter) share
//! one hash tag.

use std::time::Duration;

use super::{
    script::{flag, ms, positive, BoxFuture, Lua, Reply},
    sealed::Runner,
    ScriptRunner,
};
use crate::{
    store::{Claim, ClaimRequest, IdempotencyStore, StoreError, StoreFuture},
    StoreKey,
};

static CLAIM: Lua = Lua::new(include_str!("../../scripts/idempotency_claim.lua"));
static COMPLETE: Lua = Lua::new(include_str!("../../scripts/idempotency_complete.lua"));
static LEASE: Lua = Lua::new(include_str!("../../scripts/idempotency_lease.lua"));

fn record_keys(prefix: &str, key: &StoreKey) -> [String; 2] {
    let tag = key.to_hex();
    [
        format!("{prefix}:idem:{{{tag}}}"),
        format!("{prefix}:idem-fence:{{{tag}}}"),
    ]
}

fn claim<R: Runner + ?Sized>(
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

fn complete<R: Runner + ?Sized>(
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
fn set_lease<R: Runner + ?Sized>(
    r: &R,
    key: &StoreKey,
    token: &str,
    lease: Option<Duration>,
) -> BoxFuture<Result<bool, StoreError>> {
    let [record, _] = record_keys(r.prefix(), key);
    let lease = lease.map_or_else(|| b"0".to_vec(), ms);
    flag(r.run(&LEASE, vec![record], vec![token.as_bytes().to_vec(), lease]))
}

impl<R: ScriptRunner> IdempotencyStore for R {
    fn claim(&self, key: &StoreKey, request: ClaimRequest<'_>) -> StoreFuture<Claim> {
        claim(self, key, request)
    }

    fn complete(
        &self,
        key: &StoreKey,
        token: &str,
        response: Vec<u8>,
        retention: Duration,
    ) -> StoreFuture<bool> {
        complete(self, key, token, response, retention)
    }

    fn extend_claim(&self, key: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        set_lease(self, key, token, Some(lease))
    }

    fn release_claim(&self, key: &StoreKey, token: &str) -> StoreFuture<bool> {
        set_lease(self, key, token, None)
    }
}
