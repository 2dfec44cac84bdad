use http::StatusCode;

/// Why the layer answered a request itself, given to the builder set with
/// [`IdempotencyLockLayer::rejection`](super::IdempotencyLockLayer::rejection). Each case
/// names its default status ([`Rejection::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// `400`: the request has no key and the layer
    /// [requires](super::IdempotencyLockLayer::required) one.
    MissingKey,
    /// `400`: the key is empty, longer than 255 characters or not visible ASCII.
    InvalidKey,
    /// `400`: the request body could not be read.
    UnreadableBody,
    /// `413`: the request body is larger than
    /// [`max_body`](super::IdempotencyLockLayer::max_body).
    TooLarge,
    /// `409` with `Retry-After` set to the time left on the running request's lease (at least
    /// 1 s): a request with this key is still being processed.
    InFlight,
    /// `409`: the request with this key is done, but its response could not be stored (larger
    /// than `max_body`, or it ended with trailers), so it cannot be replayed.
    NotReplayable,
    /// `422`: the key was used with another request body.
    Mismatch,
    /// `500`: the stored response of this key cannot be read.
    UnreadableRecord,
    /// `503` with `Retry-After: 1`: the store failed or did not answer in time, and the layer
    /// fails closed ([`FailureMode::Closed`](crate::FailureMode::Closed)).
    Unavailable,
}

impl Rejection {
    /// The status of the default response.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::UnreadableBody => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InFlight | Self::NotReplayable => StatusCode::CONFLICT,
            Self::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnreadableRecord => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub(super) fn detail(&self) -> &'static str {
        match self {
            Self::MissingKey => "this request needs an Idempotency-Key header",
            Self::InvalidKey => "the Idempotency-Key must be 1 to 255 visible ASCII characters",
            Self::UnreadableBody => "the request body could not be read",
            Self::TooLarge => {
                "the request body is larger than this endpoint accepts with an Idempotency-Key"
            }
            Self::InFlight => "a request with this Idempotency-Key is still being processed",
            Self::NotReplayable => {
                "this Idempotency-Key was already used; its response could not be stored for replay"
            }
            Self::Mismatch => "this Idempotency-Key was already used with a different request body",
            Self::UnreadableRecord => "the stored response of this Idempotency-Key is unreadable",
            Self::Unavailable => "idempotency cannot be guaranteed right now; retry shortly",
        }
    }

    pub(super) fn retry_after(&self) -> bool {
        matches!(self, Self::InFlight | Self::Unavailable)
    }
}
