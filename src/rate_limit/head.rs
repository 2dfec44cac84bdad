//! What the layer reads of a request, without taking the request apart unless a closure of its
//! configuration needs the request's `Parts`, so that the request is moved once, whole.

use http::{request::Parts, Extensions, HeaderMap, Method, Request, Uri};

/// A request's method, URI, headers and extensions, borrowed from the request itself or from
/// its `Parts`.
#[derive(Clone, Copy)]
pub(crate) struct Head<'a> {
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) extensions: &'a Extensions,
    /// The parts, when the request was taken apart for a closure that reads them (a custom
    /// key, a cost, a resolver: see `Config::reads_parts`).
    pub(crate) parts: Option<&'a Parts>,
}

impl<'a> Head<'a> {
    pub(crate) fn of_parts(parts: &'a Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
            parts: Some(parts),
        }
    }

    pub(crate) fn of_request<B>(request: &'a Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            extensions: request.extensions(),
            parts: None,
        }
    }
}
