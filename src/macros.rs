//! What every middleware service of this crate has alike.

/// The parts that every service `$name<S, B>` (an inner service `inner` and state shared by
/// every clone, in `Arc` fields) has alike, as tower-http gives each of its services: access to
/// the inner service (`get_ref`, `get_mut`, `into_inner`), `Clone` (the inner service cloned,
/// the shared state shared), `Debug`, and taking the service that `poll_ready` made ready.
///
/// `$name<K> { .. }` is a service `$name<S, B, K>` with a third parameter, the body kind of its
/// responses, in a `PhantomData` field `kind`.
macro_rules! middleware_service {
    ($name:ident $(<$k:ident>)? { $($shared:ident),+ $(,)? }) => {
        impl<S, B $(, $k)?> $name<S, B $(, $k)?> {
            /// A reference to the inner service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// A mutable reference to the inner service.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// Consumes the middleware, returning the inner service.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }

        impl<S: Clone, B $(, $k)?> $name<S, B $(, $k)?> {
            /// The inner service that `poll_ready` made ready, for the request being called; a
            /// clone takes its place for the next (tower-service's `poll_ready` docs).
            fn take_ready(&mut self) -> S {
                let clone = self.inner.clone();
                std::mem::replace(&mut self.inner, clone)
            }
        }

        impl<S: Clone, B $(, $k)?> Clone for $name<S, B $(, $k)?> {
            fn clone(&self) -> Self {
                Self {
                    inner: self.inner.clone(),
                    $($shared: std::sync::Arc::clone(&self.$shared),)+
                    $(kind: std::marker::PhantomData::<fn() -> $k>,)?
                }
            }
        }

        impl<S: std::fmt::Debug, B $(, $k)?> std::fmt::Debug for $name<S, B $(, $k)?> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("inner", &self.inner)
                    .finish_non_exhaustive()
            }
        }
    };
}

/// Logs a store failure met on the request path: a `warn!`, except while the store's circuit
/// breaker is open ([`StoreError::CircuitOpen`](crate::StoreError::CircuitOpen)), where the
/// breaker logged its opening once and one line per request would flood the log (`debug!`).
macro_rules! log_store_failure {
    ($error:expr, $($arg:tt)+) => {
        if matches!($error, $crate::StoreError::CircuitOpen(_)) {
            tracing::debug!($($arg)+)
        } else {
            tracing::warn!($($arg)+)
        }
    };
}
