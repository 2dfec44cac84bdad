//! What the layer reads of a request, without taking the request apart unless a closure of its
//! configuration needs the request's `Parts`.

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

    fn of_request<B>(request: &'a Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            extensions: request.extensions(),
            parts: None,
        }
    }
}

/// A request as the layer's service holds it until it calls the inner service: whole (read in
/// place, never moved apart and put back together), or taken apart into its `Parts` and body.
pub(crate) trait Incoming<B> {
    /// What the layer reads of the request.
    fn head(&self) -> Head<'_>;

    /// The request, for the inner service.
    fn into_request(self) -> Request<B>;
}

impl<B> Incoming<B> for Request<B> {
    #[inline]
    fn head(&self) -> Head<'_> {
        Head::of_request(self)
    }

    #[inline]
    fn into_request(self) -> Request<B> {
        self
    }
}

impl<B> Incoming<B> for (Parts, B) {
    #[inline]
    fn head(&self) -> Head<'_> {
        Head::of_parts(&self.0)
    }

    #[inline]
    fn into_request(self) -> Request<B> {
        Request::from_parts(self.0, self.1)
    }
}
