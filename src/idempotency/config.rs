//! The configuration the layer and its services share.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{request::Parts, HeaderName, HeaderValue, Method, Response, StatusCode};

use super::Rejection;
use crate::{problem::problem, store::FailureMode};

pub(crate) type PartitionFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
pub(crate) type StoreIfFn = dyn Fn(StatusCode) -> bool + Send + Sync;
pub(crate) type RejectionFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// The namespace of the records when no [scope](super::IdempotencyLockLayer::scope) is given.
pub(crate) const DEFAULT_SCOPE: &str = "idempotency";

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    pub(crate) required: bool,
    pub(crate) scope: String,
    pub(crate) partition: Option<Arc<PartitionFn>>,
    pub(crate) max_body: usize,
    pub(crate) lease: Duration,
    pub(crate) retention: Duration,
    pub(crate) in_flight_wait: Option<Duration>,
    pub(crate) store_if: Arc<StoreIfFn>,
    pub(crate) on_store_error: FailureMode,
    pub(crate) store_timeout: Duration,
    pub(crate) rejection: Option<Arc<RejectionFn>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            header: HeaderName::from_static("idempotency-key"),
            required: false,
            scope: DEFAULT_SCOPE.to_owned(),
            partition: None,
            max_body: 1024 * 1024,
            lease: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 3600),
            in_flight_wait: None,
            store_if: Arc::new(|status: StatusCode| !status.is_server_error()),
            on_store_error: FailureMode::Closed,
            store_timeout: Duration::from_secs(1),
            rejection: None,
        }
    }
}

impl Config {
    /// The response for `why`: from the configured builder, or problem details (RFC 9457); with
    /// `Retry-After: 1` where the case calls for it and the response has none.
    pub(super) fn reject(&self, why: Rejection) -> Response<Bytes> {
        self.reject_retry_after(why, 1)
    }

    /// The response for `why`; the layer adds `Retry-After: <secs>` to the rejections that
    /// carry one when the builder gave none.
    pub(super) fn reject_retry_after(&self, why: Rejection, secs: u64) -> Response<Bytes> {
        let mut response = match &self.rejection {
            Some(f) => f(&why),
            None => problem(why.status(), why.detail()),
        };
        if why.retry_after() {
            response
                .headers_mut()
                .entry(http::header::RETRY_AFTER)
                .or_insert(HeaderValue::from(secs));
        }
        response
    }
}
