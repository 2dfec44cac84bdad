use std::{error::Error, fmt, time::Duration};

use crate::StoreError;

/// Why a [`Throttle`](super::Throttle) call failed: the inner service's own error, or a request
/// that the throttle did not send.
///
/// See the [module docs](super) for an example.
#[derive(Debug)]
#[non_exhaustive]
pub enum ThrottleError<E> {
    /// The inner service failed (or was not ready): its error, unchanged.
    Inner(E),
    /// The request was not sent: the store's answer meant it could not pass within the
    /// [maximum wait](super::ThrottleLayer::max_wait).
    #[non_exhaustive]
    Timeout {
        /// How long the request waited before the throttle gave up.
        waited: Duration,
        /// How much longer the store said a request of the same cost must wait.
        retry_after: Duration,
    },
    /// The request costs more than a rule can ever give at once (its quota): it would never
    /// pass, so it was not sent and did not wait.
    #[non_exhaustive]
    OverQuota {
        /// The name of the rule.
        rule: String,
        /// The request's cost.
        cost: u64,
        /// The rule's quota.
        quota: u64,
    },
    /// The request has no key (the [key extractor](super::ThrottleLayer::key) found nothing in
    /// it): it was not sent.
    MissingKey,
    /// The store failed or did not answer within the
    /// [store timeout](super::ThrottleLayer::store_timeout), and the throttle fails closed (the
    /// default, see [`on_store_error`](super::ThrottleLayer::on_store_error)); or the policy is
    /// invalid ([`StoreError::Invalid`]). The request was not sent.
    Store(StoreError),
}

impl<E> ThrottleError<E> {
    /// The inner service's error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the request was sent to the inner service (only an [`Inner`](Self::Inner) error
    /// can come from a request that was).
    pub fn is_inner(&self) -> bool {
        matches!(self, Self::Inner(_))
    }
}

impl<E: fmt::Display> fmt::Display for ThrottleError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inner(e) => e.fmt(f),
            Self::Timeout {
                waited,
                retry_after,
            } => write!(
                f,
                "rate limit: the request would pass in {retry_after:?} more, after waiting \
                 {waited:?}, which exceeds the maximum wait; raise max_wait or send fewer requests"
            ),
            Self::OverQuota { rule, cost, quota } => write!(
                f,
                "rate limit: a request of cost {cost} never passes rule {rule} (quota {quota}); \
                 split it or raise the quota"
            ),
            Self::MissingKey => {
                f.write_str("rate limit: the request has no key for the throttle's key extractor")
            }
            Self::Store(e) => write!(f, "rate limit: the store failed, request not sent: {e}"),
        }
    }
}

impl<E: Error + 'static> Error for ThrottleError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Inner(e) => e.source(),
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}
