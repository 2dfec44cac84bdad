//! A safe distributed lock: a random token per holder, `SET NX PX`, compare-and-delete release,
//! compare-and-extend renewal while held, and a fencing token per acquisition.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_redis_layers::StoreError> {
//! use std::time::Duration;
//! use tower_redis_layers::{lock::Lock, store::MemoryStore};
//!
//! // `RedisStore::connect("redis://127.0.0.1:6379").await?` to share the lock between processes.
//! let lock = Lock::new(MemoryStore::new())
//!     .lease(Duration::from_secs(10))
//!     .store_timeout(Duration::from_secs(1));
//! if let Some(guard) = lock.try_acquire("invoice-42").await? {
//!     // Pass the fencing token to the storage you protect; it rejects older tokens.
//!     let fence = guard.fence();
//!     tokio::select! {
//!         _ = guard.lost() => { /* the lease was lost: stop writing */ }
//!         _ = async { /* the work, writing with `fence` */ } => {}
//!     }
//!     guard.release().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! The lease is renewed in the background every third of its length while the guard lives.
//! [`LockGuard::lost`] resolves when a renewal finds that the token no longer holds the lock (it
//! expired, or someone else took it): "lost" is the store's answer, never a failed call. Dropping
//! the guard releases the lock without blocking (the release is spawned on the runtime).
//!
//! # Failure behaviour
//!
//! Every store call (acquiring, each renewal, releasing) is bounded by the [store
//! timeout](Lock::store_timeout) (default 1 s; a renewal also by a third of the lease). Acquiring
//! and [`LockGuard::release`] return the store's error, or
//! [`StoreError::Timeout`](crate::StoreError::Timeout) when it did not answer in time: the lock is
//! then not known to be held. An acquisition whose answer was lost (it may have reached the store),
//! or whose future was dropped while it was on the way, is released in the background as soon as
//! the store answers again (tried with backoff until the lease is over), so that it does not block
//! the resource for a whole lease. An acquisition re-sent by the client library after a reconnect
//! takes the lock for the same token again, with the same fencing token. A failed or timed-out
//! renewal is retried within the lease (after 50 ms, then twice as long each time, at most a sixth
//! of the lease) until the store answers; the lease is lost only when the store answers that the
//! token no longer holds. While the store does not answer the guard cannot know whether the lease
//! still holds: the fencing token is what keeps a holder cut off from the store from overwriting
//! its successor. A failed release on drop is logged (`tracing`); the lock expires with its lease.
//!
//! A Redis lock alone does not make a paused process safe (a GC pause or a network delay can
//! outlast the lease): use the fencing token. Single-instance Redis (or a primary with replicas)
//! is the honest baseline; this crate does not implement Redlock.

mod guard;
mod lease;
// `lock/lock.rs` holds the `Lock` type, beside `guard.rs` and `lease.rs`.
#[allow(clippy::module_inception)]
mod lock;

pub(crate) use self::lease::{new_token, spawn_detached, Lease, Unsettled};
pub use self::{guard::LockGuard, lock::Lock};
