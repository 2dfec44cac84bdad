//! What the services of one [`CacheLayer`](super::CacheLayer) share: the store, the
//! configuration, and the `Vary` names learned from responses.

use std::{sync::Arc, time::Duration};

use http::{HeaderName, StatusCode};

use super::{
    key::{Keying, VaryRegistry},
    layer::RejectionFn,
};
use crate::store::{bounded, Bounded, CacheStore, FailureMode, StoreFuture};

/// What every service of a layer shares: the store, the configuration, and the `Vary` names
/// learned from responses.
pub(crate) struct Shared<B> {
    pub(crate) store: Arc<B>,
    pub(crate) config: Arc<Config>,
    pub(crate) vary: Arc<VaryRegistry>,
}

/// The fill lock's settings (see [`CacheLayer::fill_lock`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FillLock {
    pub(crate) ttl: Duration,
    pub(crate) wait: Duration,
    pub(crate) poll: Duration,
}

/// Heuristic freshness from `Last-Modified` (see [`CacheLayer::heuristic`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Heuristic {
    pub(crate) fraction: f64,
    pub(crate) cap: Duration,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) keys: Keying,
    pub(crate) ttl: Duration,
    pub(crate) jitter: f64,
    /// The statuses stored, when the user named them (`None`: RFC 9111's rule).
    pub(crate) statuses: Option<Vec<StatusCode>>,
    pub(crate) response_ttl: bool,
    pub(crate) max_body: usize,
    pub(crate) store_timeout: Duration,
    pub(crate) on_store_error: FailureMode,
    pub(crate) fill_lock: Option<FillLock>,
    pub(crate) early_beta: f64,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    /// The cap of a response's own RFC 5861 windows, when above the layer's.
    pub(crate) stale_directive_cap: Duration,
    pub(crate) allow_authorized: bool,
    /// Invalidate entries after unsafe methods (RFC 9111 section 4.4).
    pub(crate) invalidate_unsafe: bool,
    /// Heuristic freshness from `Last-Modified`, instead of the fixed `ttl`.
    pub(crate) heuristic: Option<Heuristic>,
    /// The targeted cache-control field (RFC 9213) that overrides `Cache-Control`.
    pub(crate) targeted: Option<HeaderName>,
    /// How long an entry with a validator is kept past its freshness, to be revalidated.
    pub(crate) keep: Duration,
    /// Builds the layer's own `503` and `504` answers.
    pub(crate) rejection: Option<Arc<RejectionFn>>,
}

impl Config {
    /// The bound on a call to `store`: the store timeout, or none for an in-process store.
    pub(crate) fn bound<T>(
        &self,
        store: &(impl CacheStore + ?Sized),
        call: StoreFuture<T>,
    ) -> Bounded<StoreFuture<T>> {
        bounded(store.is_remote().then_some(self.store_timeout), call)
    }
}

/// The statuses RFC 9111 calls heuristically cacheable (RFC 9110 section 15.1).
pub(crate) const HEURISTIC_STATUSES: [u16; 10] = [200, 203, 204, 300, 301, 404, 405, 410, 414, 501];
