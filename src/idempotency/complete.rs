//! The completion step: what is recorded of the handler's response, and the response the
//! client gets.

use bytes::Bytes;
use http::Response;
use http_body::Body;

use super::{config::Config, execute::Execution, record::StoredResponse, TARGET};
use crate::{
    body::{read_up_to, ReadEnd},
    ResponseBody,
};

/// Ends `execution` with the handler's `response`:
///
/// - a status that [`store_if`](super::IdempotencyLockLayer::store_if) refuses, or a body that
///   fails: the claim is released (the client may retry) and the response passed on;
/// - a body read whole within `max_body`, without trailers: stored for replay;
/// - a body over `max_body`, or one that ends with trailers: passed on whole (trailers
///   included), and recorded as done without a body, so a duplicate gets `409`
///   ([`Rejection::NotReplayable`](super::Rejection::NotReplayable)) instead of running again.
pub(super) async fn complete<B>(
    execution: Execution,
    config: &Config,
    response: Response<B>,
) -> Response<ResponseBody<B>>
where
    B: Body<Data = Bytes>,
{
    let (head, body) = response.into_parts();
    if !(config.store_if)(head.status) {
        execution.release().await;
        return Response::from_parts(head, ResponseBody::service(body));
    }
    let read = read_up_to(body, config.max_body).await;
    if let ReadEnd::Failed { .. } = read.end {
        execution.release().await;
        return Response::from_parts(head, ResponseBody::read(read));
    }
    let body = read.storable().map(|data| data.as_ref());
    if body.is_none() {
        tracing::debug!(target: TARGET, status = head.status.as_u16(), "the response is over max_body or has trailers; it is recorded as done but cannot be replayed");
    }
    let stored = StoredResponse::new(head.status, &head.headers, body);
    execution.complete(stored, config.retention).await;
    Response::from_parts(head, ResponseBody::read(read))
}
