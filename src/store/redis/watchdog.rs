//! The watchdog of a store's client: detects a client that stopped making progress (calls are
//! sent, nothing comes back) and replaces it with a new one, when a new one can connect.
//!
//! Both client libraries have been seen to stop for good while a cluster slot migrates under
//! concurrent traffic (redis-rs's cluster connection deadlocks its own slot refresh; see the
//! README's section on operating Redis). Nothing the store can send to such a client gets an
//! answer again, so the store makes a new client from the URL it was given: only stores made by
//! `connect` can be rebuilt; a client handed over by the application is kept as it is.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use super::script::BoxFuture;
use crate::store::StoreError;

/// How long calls may go without any answer before the client is taken as stopped: far longer
/// than a healthy server takes to answer a script, short enough that a stopped client is
/// replaced within a second of the fault that stopped it.
pub(crate) const STALL: Duration = Duration::from_millis(300);

/// The shortest time between two attempts to rebuild a client.
const REBUILD_EVERY: Duration = Duration::from_millis(300);

/// Makes a new client (from the store's URL).
pub(crate) type Rebuild<C> = Box<dyn Fn() -> BoxFuture<Result<C, StoreError>> + Send + Sync>;

/// Closes a client that was replaced (after the calls still on it had time to end).
pub(crate) type Retire<C> = fn(C);

/// A client that is replaced when it stops making progress.
pub(crate) struct Watchdog<C> {
    client: RwLock<C>,
    rebuild: Option<Rebuild<C>>,
    retire: Option<Retire<C>>,
    epoch: Instant,
    /// Milliseconds since `epoch` (plus one, so that 0 means none) of the first call sent
    /// since the last answer.
    unanswered_since: AtomicU64,
    /// Milliseconds since `epoch` of the last rebuild attempt.
    last_rebuild: AtomicU64,
    rebuilding: AtomicBool,
}

/// The progress of one call: [`Progress::answered`] when the server answered it.
pub(crate) struct Progress<C: Send + Sync + 'static>(Arc<Watchdog<C>>);

impl<C: Send + Sync + 'static> Progress<C> {
    /// The server answered (a reply, or an error reply of the server's own).
    pub(crate) fn answered(&self) {
        // Read first: a store to the shared line on every answer would make the calls of every
        // thread contend for it; without a rebuild nothing was noted (see `Watchdog::client`).
        if self.0.unanswered_since.load(Ordering::Acquire) != 0 {
            self.0.unanswered_since.store(0, Ordering::Release);
        }
    }
}

impl<C: Clone + Send + Sync + 'static> Watchdog<C> {
    pub(crate) fn new(
        client: C,
        rebuild: Option<Rebuild<C>>,
        retire: Option<Retire<C>>,
    ) -> Arc<Self> {
        let watchdog = Arc::new(Self {
            client: RwLock::new(client),
            rebuild,
            retire,
            epoch: Instant::now(),
            unanswered_since: AtomicU64::new(0),
            last_rebuild: AtomicU64::new(0),
            rebuilding: AtomicBool::new(false),
        });
        if watchdog.rebuild.is_some() {
            watchdog.watch();
        }
        watchdog
    }

    /// Checks, every third of [`STALL`] while the store lives, whether calls went unanswered
    /// for longer, so that a stopped client is replaced even when no new call comes to notice.
    fn watch(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(STALL / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else {
                    return;
                };
                let since = this.unanswered_since.load(Ordering::Acquire);
                let now = this.now();
                if since != 0 && now.saturating_sub(since) > millis(STALL) {
                    this.start_rebuild(now);
                }
            }
        });
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    /// The current client, for one call; starts a rebuild first if the client stopped answering.
    pub(crate) fn client(self: &Arc<Self>) -> (C, Progress<C>) {
        // A client that cannot be rebuilt (a standalone one, or the application's) is only
        // handed out: nothing would act on its progress, so none is noted (no clock read, no
        // write shared by every call).
        if self.rebuild.is_none() {
            return (self.current(), Progress(self.clone()));
        }
        let now = self.now();
        let since = match self.unanswered_since.compare_exchange(
            0,
            now,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => now,
            Err(since) => since,
        };
        if now.saturating_sub(since) > millis(STALL) {
            self.start_rebuild(now);
        }
        (self.current(), Progress(self.clone()))
    }

    fn current(&self) -> C {
        match self.client.read() {
            Ok(client) => client.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn start_rebuild(self: &Arc<Self>, now: u64) {
        let Some(rebuild) = &self.rebuild else {
            return;
        };
        if now.saturating_sub(self.last_rebuild.load(Ordering::Acquire)) < millis(REBUILD_EVERY) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last_rebuild.store(now, Ordering::Release);
        let fresh = rebuild();
        let this = self.clone();
        rt.spawn(async move {
            match fresh.await {
                Ok(client) => {
                    tracing::warn!(
                        "the Redis client stopped answering while a new one connects: replaced"
                    );
                    let old = match this.client.write() {
                        Ok(mut current) => std::mem::replace(&mut *current, client),
                        Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), client),
                    };
                    if let Some(retire) = this.retire {
                        retire(old);
                    }
                    this.unanswered_since.store(0, Ordering::Release);
                }
                Err(err) => {
                    tracing::debug!(%err, "the Redis client stopped answering; a new one failed");
                }
            }
            this.rebuilding.store(false, Ordering::Release);
        });
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
