//! Idempotency records on Redis: the `idempotency_*.lua` scripts, and [`IdempotencyStore`]
//! for every [`ScriptRunner`]. Both keys of a record (the record and its fence counter) share
//! one hash tag.

use std::time::Duration;

use super::{
    fenced_keys,
    script::{flag, ms, positive, Lua, Reply},
    ScriptRunner,
};
use crate::{
    store::{Claim, ClaimRequest, IdempotencyStore, StoreError, StoreFuture},
    StoreKey,
};

static CLAIM: Lua = Lua::new(include_str!("../../scripts/idempotency_claim.lua"));
static COMPLETE: Lua = Lua::new(include_str!("../../scripts/idempotency_complete.lua"));
static LEASE: Lua = Lua::new(include_str!("../../scripts/idempotency_lease.lua"));

/// The record key of `key` with `token` and `rest` as arguments (a call on the record alone).
fn on_record<R: ScriptRunner>(
    r: &R,
    lua: &'static Lua,
    key: &StoreKey,
    token: &str,
    rest: impl IntoIterator<Item = Vec<u8>>,
) -> StoreFuture<bool> {
    let [record, _] = fenced_keys(r.prefix(), "idem", key);
    let args = std::iter::once(token.as_bytes().to_vec())
        .chain(rest)
        .collect();
    flag(r.run(lua, vec![record], args))
}

impl<R: ScriptRunner> IdempotencyStore for R {
    fn claim(&self, key: &StoreKey, req: ClaimRequest<'_>) -> StoreFuture<Claim> {
        let call = self.run(
            &CLAIM,
            fenced_keys(self.prefix(), "idem", key).to_vec(),
            vec![
                req.token.as_bytes().to_vec(),
                req.fingerprint.to_vec(),
                ms(req.lease),
                ms(req.retention + req.lease),
            ],
        );
        Box::pin(async move { decode_claim(call.await?) })
    }

    fn complete(&self, k: &StoreKey, t: &str, r: Vec<u8>, d: Duration) -> StoreFuture<bool> {
        on_record(self, &COMPLETE, k, t, [r, ms(d)])
    }

    fn extend_claim(&self, key: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        on_record(self, &LEASE, key, token, [ms(lease)])
    }

    /// A lease of 0 releases the claim.
    fn release_claim(&self, key: &StoreKey, token: &str) -> StoreFuture<bool> {
        on_record(self, &LEASE, key, token, [b"0".to_vec()])
    }
}

fn decode_claim(reply: Reply) -> Result<Claim, StoreError> {
    let mut reply = reply.array()?.into_iter();
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
        (kind, value) => return Err(StoreError::Reply(format!("claim: {kind} {value:?}"))),
    })
}
