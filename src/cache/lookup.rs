//! What a request gets from a lookup: the entry served, a fill, or a wait for the fill another
//! request holds the lock of.

use std::time::Duration;

use bytes::Bytes;
use http::{request::Parts, Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::{
    conditional::{self, Conditional},
    config::{Config, FillLock},
    entry::Entry,
    fill::Fill,
    policy,
    request::Limits,
    response,
    revalidate::Prior,
    target::Target,
    ResponseBody, TARGET,
};
use crate::store::{CacheStore, FillRequest, FillState, FillToken, Freshness, Lookup};

/// What to do with a lookup's answer.
enum Step {
    /// Serve the entry (with its age and `Cache-Status` parameters).
    Serve(Entry, Duration, &'static str),
    /// Run the handler.
    Fill(Fill),
    /// Another request is filling the entry: wait for it.
    Wait,
}

/// The step for `lookup`, whose entry (decoded, of the request's variant) is `entry`; `token`
/// is the fill lock's token if the lookup took it. The request's `limits` decide whether it
/// accepts the entry at all, and whether it takes it stale. An entry that is not served is
/// handed to the fill (revalidated when it has a validator; served if the handler fails while
/// it is inside its stale-if-error window).
fn step(
    lookup: &Lookup,
    entry: Option<Entry>,
    token: FillToken,
    limits: &Limits,
    config: &Config,
) -> Step {
    let held = lookup.fill == FillState::Held;
    let lock = (lookup.fill == FillState::Acquired).then_some(token);
    let version = Some(lookup.version);
    let age = lookup.age;
    let fill = |status| Fill::new(version, lock, status);
    let prior = |entry, stand_in| Prior::new(entry, lookup, stand_in);
    // A stored response the request's `max-age` / `min-fresh` refuse (RFC 9211 `fwd=request`).
    let (entry, refused) = match entry {
        Some(e) if !limits.allows(&e, age) => (None, Some(e)),
        e => (e, None),
    };
    let stale = matches!(
        lookup.freshness,
        Freshness::Stale | Freshness::StaleIfError | Freshness::Expired
    );
    match (lookup.freshness, entry) {
        (Freshness::Fresh, Some(entry)) => Step::Serve(entry, age, "hit"),
        (_, Some(entry))
            if stale
                && limits.takes_stale(&entry, age)
                && !policy::forbids_stale(&entry.headers, config) =>
        {
            Step::Serve(entry, age, "hit; detail=max-stale")
        }
        (Freshness::Early | Freshness::Stale, Some(entry)) if held => {
            let status = if lookup.freshness == Freshness::Stale {
                "hit; detail=stale"
            } else {
                "hit"
            };
            Step::Serve(entry, age, status)
        }
        (Freshness::Early, Some(entry)) => {
            let status = "fwd=stale; detail=early-recompute";
            Step::Fill(fill(status).replacing(prior(entry, true)))
        }
        // Only usable on error or once revalidated, and another request is on it: wait.
        (Freshness::StaleIfError | Freshness::Expired, Some(_)) if held => Step::Wait,
        (Freshness::Stale | Freshness::StaleIfError, Some(entry)) => {
            Step::Fill(fill("fwd=stale").replacing(prior(entry, true)))
        }
        (Freshness::Expired, Some(entry)) => {
            Step::Fill(fill("fwd=stale").replacing(prior(entry, false)))
        }
        _ if held => Step::Wait,
        _ => match refused {
            Some(entry) => Step::Fill(fill("fwd=request").replacing(prior(entry, false))),
            None => Step::Fill(fill("fwd=miss")),
        },
    }
}

/// Waiting for another request's fill, up to a deadline. Waiters poll with a growing interval
/// (x1.5, up to 4x the base): fewer calls while a slow handler runs, little delay for a fast
/// one.
struct Waiting {
    until: Instant,
    poll: Duration,
    max_poll: Duration,
}

impl Waiting {
    fn new(lock: FillLock) -> Self {
        Self {
            until: Instant::now() + lock.wait,
            poll: lock.poll,
            max_poll: lock.poll * 4,
        }
    }

    /// Sleeps until the next poll; `false` once the deadline has passed.
    async fn next(&mut self) -> bool {
        let now = Instant::now();
        if now >= self.until {
            return false;
        }
        tokio::time::sleep(self.poll.min(self.until - now)).await;
        self.poll = self.poll.mul_f64(1.5).min(self.max_poll);
        true
    }
}

/// Looks the request up (taking the fill lock on a miss), then serves the entry, runs the fill,
/// or waits for another request's fill and looks up again.
pub(super) async fn serve_or_fill<S, B, ReqBody, ResBody>(
    target: &Target<'_, B>,
    inner: &mut S,
    parts: Parts,
    body: ReqBody,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: CacheStore,
    ResBody: Body<Data = Bytes>,
{
    let limits = Limits::of(&parts.headers);
    // A client's own preconditions, answered on a hit (a miss forwards them unchanged).
    let conditional = Conditional::of(&parts.headers);
    // `only-if-cached`: never fill, so never lock or wait.
    let fill_lock = target.config().fill_lock.filter(|_| !limits.only_if_cached);
    let token = FillToken::random();
    let fill = fill_lock.map(|l| FillRequest { ttl: l.ttl, token });
    let mut lookup = match target.lookup(fill).await {
        Ok(lookup) => lookup,
        Err(error) => {
            if let Some(unavailable) = target.lookup_failed(&error, "lookup") {
                return Ok(unavailable);
            }
            if limits.only_if_cached {
                return Ok(response::not_cached(target.config()));
            }
            let request = Request::from_parts(parts, body);
            return Fill::unstored("fwd=miss").run(target, inner, request).await;
        }
    };
    let mut waiting = fill_lock.map(Waiting::new);
    loop {
        let entry = target.usable_entry(&lookup, &parts.headers).await;
        match step(&lookup, entry, token, &limits, target.config()) {
            Step::Serve(entry, age, status) => {
                if lookup.fill == FillState::Acquired {
                    // Served stale to a `max-stale` request: the lock is not needed.
                    target.release(Some(token)).await;
                }
                if conditional
                    .as_ref()
                    .is_some_and(|c| c.not_modified(&entry.headers))
                {
                    return Ok(conditional::not_modified(entry, age, status));
                }
                return Ok(response::serve(entry, age, target.head, status));
            }
            _ if limits.only_if_cached => return Ok(response::not_cached(target.config())),
            Step::Fill(fill) => {
                let request = Request::from_parts(parts, body);
                let fill = fill.answering(conditional);
                return fill.run(target, inner, request).await;
            }
            Step::Wait => {}
        }
        let Some(waiting) = waiting.as_mut() else {
            break;
        };
        if !waiting.next().await {
            break;
        }
        lookup = match target.lookup(fill).await {
            Ok(lookup) => lookup,
            Err(error) => match target.lookup_failed(&error, "wait") {
                Some(unavailable) => return Ok(unavailable),
                None => break,
            },
        };
    }
    tracing::debug!(target: TARGET, "gave up waiting for the fill; running the handler");
    let request = Request::from_parts(parts, body);
    Fill::unstored("fwd=miss; detail=lock-wait")
        .run(target, inner, request)
        .await
}
