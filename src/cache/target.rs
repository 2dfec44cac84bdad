//! One request's entry in the store: its keys, and the store calls on it, each bounded by the
//! store timeout.

use http::{HeaderMap, HeaderName, Response};
use http_body::Body;

use super::{
    config::{Config, Shared},
    entry::Entry,
    key::{self, EntryKeys},
    response, ResponseBody, TARGET,
};
use crate::store::{
    Bounded, CacheStore, FailureMode, FillRequest, FillToken, Lookup, LookupRequest,
    RefreshRequest, StoreError, StoreFuture, StoreOutcome, StoreRequest,
};

/// A request's entry: where it lives in the store, and the calls on it.
pub(super) struct Target<'a, B> {
    pub(super) shared: &'a Shared<B>,
    pub(super) keys: EntryKeys,
    /// A `HEAD` request: served from the `GET` entry without a body, and never stored.
    pub(super) head: bool,
}

impl<'a, B: CacheStore> Target<'a, B> {
    pub(super) fn config(&self) -> &'a Config {
        &self.shared.config
    }

    fn bound<T>(&self, call: StoreFuture<T>) -> Bounded<StoreFuture<T>> {
        self.shared.config.bound(&*self.shared.store, call)
    }

    /// Reads the segment version and the entry; takes the fill lock when `fill` asks for it.
    pub(super) async fn lookup(&self, fill: Option<FillRequest>) -> Result<Lookup, StoreError> {
        let request = LookupRequest {
            segment: self.keys.segment,
            key: self.keys.entry,
            fill,
            early_beta: self.config().early_beta,
            random: 1.0 - rand::random::<f64>(),
        };
        let lookup = self.bound(self.shared.store.lookup(request)).await?;
        if lookup.corrupt {
            tracing::warn!(target: TARGET, key = %self.keys.entry, "deleted a corrupt cache entry");
        }
        Ok(lookup)
    }

    /// What a request gets when its lookup (at `stage`) failed: `None` to go on without the
    /// cache ([`FailureMode::Open`]), or the `503` to answer ([`FailureMode::Closed`]). Logs a
    /// warning either way.
    pub(super) fn lookup_failed<T: Body>(
        &self,
        error: &StoreError,
        stage: &'static str,
    ) -> Option<Response<ResponseBody<T>>> {
        match self.config().on_store_error {
            FailureMode::Open => {
                tracing::warn!(target: TARGET, %error, stage, "cache lookup failed; going on without the cache");
                None
            }
            FailureMode::Closed => {
                tracing::warn!(target: TARGET, %error, stage, "cache lookup failed; answering 503");
                Some(response::unavailable(self.config()))
            }
        }
    }

    /// The entry of a lookup, decoded and checked against the request's `Vary` values. A
    /// corrupt entry is deleted.
    pub(super) async fn usable_entry(&self, lookup: &Lookup, headers: &HeaderMap) -> Option<Entry> {
        let raw = lookup.entry.as_ref()?;
        let entry = match Entry::decode(raw) {
            Ok(entry) => entry,
            Err(error) => {
                tracing::warn!(target: TARGET, key = %self.keys.entry, %error, "undecodable cache entry; deleting it");
                let delete = self
                    .shared
                    .store
                    .invalidate_key(self.keys.segment, self.keys.entry);
                if let Err(error) = self.bound(delete).await {
                    tracing::warn!(target: TARGET, %error, "could not delete a corrupt cache entry");
                }
                return None;
            }
        };
        let names: Vec<_> = entry.vary.iter().map(|(n, _)| n.clone()).collect();
        if key::vary_values(headers, &names) != entry.vary {
            // Built from an outdated view of `Vary`: not this request's variant.
            self.learn_vary(&names);
            return None;
        }
        Some(entry)
    }

    /// Records the `Vary` names of the responses under this request's primary key.
    pub(super) fn learn_vary(&self, names: &[HeaderName]) {
        self.shared.vary.learn(self.keys.primary, names);
    }

    /// Releases the fill lock, if this request holds it.
    pub(super) async fn release(&self, lock: Option<FillToken>) {
        if let Some(token) = lock {
            let call = self
                .shared
                .store
                .release_fill(self.keys.segment, self.keys.entry, token);
            if let Err(error) = self.bound(call).await {
                tracing::warn!(target: TARGET, %error, "could not release the fill lock");
            }
        }
    }

    /// Writes an entry (and releases the fill lock the request names). Answers whether it was
    /// written; a failure is logged and dropped.
    pub(super) async fn write(&self, request: StoreRequest) -> bool {
        match self.bound(self.shared.store.store(request)).await {
            Ok(StoreOutcome::Stored) => true,
            Ok(outcome) => {
                tracing::debug!(target: TARGET, ?outcome, "cache entry not stored");
                false
            }
            Err(error) => {
                tracing::warn!(target: TARGET, %error, "cache store failed; dropped");
                false
            }
        }
    }

    /// Refreshes an entry in place after a `304` (and releases the fill lock the request
    /// names; when the entry was gone, the lock is released by a second call, as the store may
    /// not have). Answers whether it was refreshed; a failure is logged and dropped.
    pub(super) async fn refresh(&self, request: RefreshRequest) -> bool {
        let token = request.fill.map(|(_, token)| token);
        match self.bound(self.shared.store.refresh(request)).await {
            Ok(StoreOutcome::Stored) => true,
            Ok(StoreOutcome::Missing) => {
                // A store without in-place refresh (the trait's default) left the lock held;
                // releasing one already released is a no-op.
                tracing::debug!(target: TARGET, "cache entry to refresh is gone");
                self.release(token).await;
                false
            }
            Ok(outcome) => {
                tracing::debug!(target: TARGET, ?outcome, "cache entry not refreshed");
                false
            }
            Err(error) => {
                tracing::warn!(target: TARGET, %error, "cache refresh failed; dropped");
                false
            }
        }
    }
}
