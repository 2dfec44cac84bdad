//! Idempotency records in the in-process store, with the same semantics as the
//! `idempotency_*.lua` scripts.

use std::time::Duration;

use super::{done, us, Kind, MemoryStore, Slot, Value};
use crate::{
    store::{Claim, ClaimRequest, IdempotencyStore, StoreFuture},
    StoreKey,
};

impl IdempotencyStore for MemoryStore {
    fn claim(&self, key: &StoreKey, req: ClaimRequest<'_>) -> StoreFuture<Claim> {
        done(self.with_records(
            key,
            |records, now| match records.live((Kind::Record, *key), now) {
                None => {
                    let fence = records.next_fence(
                        (Kind::RecordFence, *key),
                        now,
                        Some(req.retention + req.lease),
                    );
                    records.map.insert(
                        (Kind::Record, *key),
                        Slot {
                            value: Value::InFlight {
                                token: req.token.to_owned(),
                                fingerprint: req.fingerprint.to_vec(),
                                fence,
                            },
                            expires_at: now + us(req.lease),
                        },
                    );
                    Claim::Claimed { fence }
                }
                Some(slot) => match &slot.value {
                    // The holder's own claim, re-sent: the same answer, nothing changes.
                    Value::InFlight {
                        token,
                        fingerprint,
                        fence,
                    } if token == req.token && fingerprint.as_slice() == req.fingerprint => {
                        Claim::Claimed { fence: *fence }
                    }
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
            },
        ))
    }

    fn complete(&self, key: &StoreKey, t: &str, r: Vec<u8>, d: Duration) -> StoreFuture<bool> {
        let (token, response, retention) = (t, r, d);
        done(self.with_records(key, |records, now| {
            let Some(slot) = records.live((Kind::Record, *key), now) else {
                return false;
            };
            let (t, fingerprint) = match &mut slot.value {
                Value::InFlight {
                    token: t,
                    fingerprint,
                    ..
                } => (t, fingerprint),
                Value::Completed { token: t, .. } => return t == token,
                _ => return false,
            };
            if t != token {
                return false;
            }
            let (token, fingerprint) = (std::mem::take(t), std::mem::take(fingerprint));
            slot.value = Value::Completed {
                fingerprint,
                response,
                token,
            };
            slot.expires_at = now + us(retention);
            true
        }))
    }

    fn extend_claim(&self, key: &StoreKey, token: &str, lease: Duration) -> StoreFuture<bool> {
        self.renew(Kind::Record, key, token, lease)
    }

    fn release_claim(&self, key: &StoreKey, token: &str) -> StoreFuture<bool> {
        self.release(Kind::Record, key, token)
    }
}
