//! Limits chosen per request at runtime: the named policies of a layer ([`PolicySet`]), which
//! can change while the service runs, and the resolver that names a request's policy.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use arc_swap::ArcSwap;
use http::request::Parts;

use super::{decision::TARGET, head::Head, policy::CompiledPolicy, Policy};

/// What a [`resolver`](super::RateLimitLayer::resolver) is: the name of a request's policy, if
/// it has one.
pub(crate) type ResolverFn = dyn for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync;

/// What a set's policies are compiled with: the layer's configuration they depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Context {
    /// The layer's scope, part of every policy's namespace.
    pub(crate) layer_scope: String,
    /// The replicas the local fallback divides quotas among.
    pub(crate) replicas: u32,
    /// Whether the layer settles metered costs (then sliding rules are invalid).
    pub(crate) metered: bool,
}

impl Default for Context {
    fn default() -> Self {
        Self {
            layer_scope: String::new(),
            replicas: 1,
            metered: false,
        }
    }
}

/// Whether the warning about a policy name the layer does not have is due: at most one every
/// [`UNKNOWN_NAME_EVERY`] for the process, so that a resolver that names a missing policy on
/// every request does not flood the logs.
fn unknown_name_warning_due() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < UNKNOWN_NAME_EVERY.as_secs() {
        return false;
    }
    LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// The shortest time between two warnings about a policy name the layer does not have.
const UNKNOWN_NAME_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The named policies of a layer and its default policy, compiled, as one request sees them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Policies {
    by_name: HashMap<String, Arc<CompiledPolicy>>,
    /// The policy of a request that the resolver does not name (or names a policy not in the
    /// set): the one named like the layer's default policy, if the layer has one.
    default: Option<Arc<CompiledPolicy>>,
}

impl Policies {
    /// The policy of a request: the one `resolver` names, else the default one; `None` when
    /// there is neither (the request passes unlimited, as in a routed layer).
    #[inline]
    pub(crate) fn select(
        &self,
        resolver: Option<&ResolverFn>,
        head: Head<'_>,
    ) -> Option<&Arc<CompiledPolicy>> {
        let Some(resolver) = resolver else {
            return self.default.as_ref();
        };
        // A layer with a resolver takes each request apart for it (`Config::reads_parts`).
        match head.parts.and_then(resolver) {
            Some(name) => match self.by_name.get(name) {
                Some(policy) => Some(policy),
                None => {
                    if unknown_name_warning_due() {
                        tracing::warn!(
                            target: TARGET,
                            policy = name,
                            default = self.default.as_ref().map(|p| p.name.as_str()),
                            "the rate-limit resolver named a policy the layer does not have; \
                             the default policy applies (none: the request is not limited); \
                             said at most every 10 s"
                        );
                    }
                    self.default.as_ref()
                }
            },
            None => self.default.as_ref(),
        }
    }

    /// The policy named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<CompiledPolicy>> {
        self.by_name.get(name)
    }

    /// Puts `policy` in under its name, replacing the policy of that name. A policy that is
    /// the same as the one it replaces (name, scope and rules) leaves the old one in place, so
    /// that a configuration reloaded unchanged changes nothing at all (not even the deny
    /// cache).
    fn put(&mut self, policy: CompiledPolicy, default_name: Option<&str>) {
        if let Some(old) = self.by_name.get(&policy.name) {
            if old.namespace == policy.namespace && old.rules == policy.rules {
                return;
            }
        }
        let policy = Arc::new(policy);
        if default_name == Some(policy.name.as_str()) {
            self.default = Some(Arc::clone(&policy));
        }
        self.by_name.insert(policy.name.clone(), policy);
    }
}

/// The named policies of a [`RateLimitLayer`](super::RateLimitLayer), changed while the
/// service runs: a tier's quota raised, a configuration reloaded, a tier added, with no new
/// layer. Made by [`RateLimitLayer::policies`](super::RateLimitLayer::policies); cheap to
/// clone, and every clone changes the same layer.
///
/// A request's policy is looked up in the set as it is when the request arrives (a lock-free
/// read; writers never block requests), and a request keeps the policy it was checked with
/// until it is done, its metered settlement included. A policy takes effect on the next
/// request.
///
/// # What a change keeps
///
/// A policy's counters are named by the layer's scope, the policy's scope (by default its
/// name), the request's key and each rule's numbers. So replacing a policy by one of the same
/// name:
/// - keeps the counters of every rule whose numbers did not change (in the store and in the
///   local fallback), whatever its name in the `RateLimit` fields;
/// - starts afresh every rule whose numbers changed (a new limit, window or strategy): "100 per
///   minute" raised to "1,000 per minute" starts at 0 of 1,000; the old counters expire on
///   their own;
/// - forgets this process's cached denials of the policy (see
///   [`no_deny_cache`](super::RateLimitLayer::no_deny_cache)): the next request of a denied key
///   asks the store, which denies it again if an unchanged rule still does.
///
/// Other replicas have sets of their own: a change applies to this process's layer. Apply it
/// to every replica (each reloads its configuration) to change a service's limits.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_layers::rate_limit::{Policy, RateLimitLayer, Rule};
/// use tower_redis_layers::store::MemoryStore;
///
/// let minute = Duration::from_secs(60);
/// let layer = RateLimitLayer::new(MemoryStore::new(), Policy::new("free", Rule::fixed_window(100, minute)))
///     .resolver(|parts| parts.headers.get("x-tier")?.to_str().ok())
///     .policy(Policy::new("pro", Rule::fixed_window(1_000, minute)));
/// let policies = layer.policies(); // once the layer is configured
///
/// // Later, while the service runs: pro's quota raised, a new tier.
/// policies.insert(Policy::new("pro", Rule::fixed_window(5_000, minute)))?;
/// policies.insert(Policy::new("team", Rule::fixed_window(20_000, minute)))?;
/// assert_eq!(policies.names(), ["free", "pro", "team"]);
/// # Ok::<(), tower_redis_layers::rate_limit::InvalidPolicy>(())
/// ```
///
/// See the [module docs](super#limits-chosen-at-runtime) for the resolver.
#[derive(Clone)]
pub struct PolicySet {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Policies>,
    /// The policies the set was made with, which requests read directly (without arc-swap's
    /// bookkeeping) until the set first changes ([`PolicySet::unchanged`]).
    first: Arc<Policies>,
    /// Whether a writer has changed the set since it was made (set after its change is
    /// published, never cleared).
    changed: AtomicBool,
    context: Context,
    /// The name of the layer's default policy.
    default_name: Option<String>,
    /// Held by writers from their read of `current` to their store, so that two writers never
    /// lose each other's change. Requests never take it.
    writer: Mutex<()>,
}

impl PolicySet {
    /// An empty set.
    pub(crate) fn empty() -> Self {
        Self::of(Policies::default(), Context::default(), None)
    }

    fn of(policies: Policies, context: Context, default_name: Option<String>) -> Self {
        let first = Arc::new(policies);
        Self {
            inner: Arc::new(Inner {
                current: ArcSwap::new(Arc::clone(&first)),
                first,
                changed: AtomicBool::new(false),
                context,
                default_name,
                writer: Mutex::new(()),
            }),
        }
    }

    /// The policies as they are now, for one request: a lock-free read.
    #[inline]
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Policies>> {
        self.inner.current.load()
    }

    /// The policies the set was made with, while no writer has changed them (most layers' sets
    /// never change): a request reads them as a plain reference, without the two atomic
    /// read-modify-writes of [`load`](Self::load). `None` once the set has changed.
    #[inline]
    pub(crate) fn unchanged(&self) -> Option<&Policies> {
        // `SeqCst` on both sides: a request that starts after a change returned (on any
        // thread) sees it. On x86 such a load is a plain load.
        (!self.inner.changed.load(Ordering::SeqCst)).then_some(&*self.inner.first)
    }

    /// A new set for a layer being configured: this set's policies compiled under `context`,
    /// with `added` put in (as the default policy when its flag is set). The builder's
    /// copy-on-write: handles of this set keep changing the layer they were taken from.
    pub(crate) fn configured(&self, context: Context, added: Option<(Policy, bool)>) -> Self {
        let current = self.load();
        let mut default_name = self.inner.default_name.clone();
        let mut policies = Policies::default();
        let recompile = context.layer_scope != self.inner.context.layer_scope
            || context.replicas != self.inner.context.replicas;
        for policy in current.by_name.values() {
            let policy = if recompile {
                let mut policy = CompiledPolicy::clone(policy);
                policy.set_layer_scope(&context.layer_scope);
                policy.set_replicas(context.replicas);
                Arc::new(policy)
            } else {
                Arc::clone(policy)
            };
            if default_name.as_deref() == Some(policy.name.as_str()) {
                policies.default = Some(Arc::clone(&policy));
            }
            policies.by_name.insert(policy.name.clone(), policy);
        }
        if let Some((policy, default)) = added {
            if default {
                default_name = Some(policy.name().to_owned());
            }
            let compiled = compile(policy, &context);
            policies.put(compiled, default_name.as_deref());
        }
        Self::of(policies, context, default_name)
    }

    /// Adds `policy`, or replaces the policy of the same name (the layer's default policy
    /// too): see [what a change keeps](Self#what-a-change-keeps). It applies from the next
    /// request on; requests under way finish with the policy they started with.
    ///
    /// # Errors
    ///
    /// When the policy cannot limit requests (it has no rule, or a rule has a zero limit or
    /// period, or it has a sliding rule in a metered layer): the set is left unchanged.
    pub fn insert(&self, policy: Policy) -> Result<(), InvalidPolicy> {
        let compiled = self.compile(policy)?;
        self.write(|policies, default_name| policies.put(compiled, default_name));
        Ok(())
    }

    /// Replaces every policy at once, as a reloaded configuration says: the set then holds
    /// `policies` (and the layer's default policy, unless one of them has its name). Policies
    /// that keep their name and rules keep their counters, as with [`insert`](Self::insert);
    /// the others are gone for requests that arrive from then on.
    ///
    /// # Errors
    ///
    /// When one of the policies cannot limit requests (see [`insert`](Self::insert)): the set
    /// is left unchanged, none of them is taken.
    pub fn replace<I>(&self, policies: I) -> Result<(), InvalidPolicy>
    where
        I: IntoIterator<Item = Policy>,
    {
        let compiled = (policies.into_iter())
            .map(|p| self.compile(p))
            .collect::<Result<Vec<_>, _>>()?;
        self.write(|current, default_name| {
            let mut next = Policies::default();
            for policy in compiled {
                // An unchanged policy stays as it was (see `Policies::put`).
                match current.by_name.get(&policy.name) {
                    Some(old) if old.namespace == policy.namespace && old.rules == policy.rules => {
                        if default_name == Some(old.name.as_str()) {
                            next.default = Some(Arc::clone(old));
                        }
                        next.by_name.insert(old.name.clone(), Arc::clone(old));
                    }
                    _ => next.put(policy, default_name),
                }
            }
            if let Some(default) = current.default.as_ref() {
                if next.default.is_none() {
                    next.default = Some(Arc::clone(default));
                    (next.by_name).insert(default.name.clone(), Arc::clone(default));
                }
            }
            *current = next;
        });
        Ok(())
    }

    /// Removes the policy named `name`; answers whether the set had it. Requests the resolver
    /// then names it for get the default policy, as for any name the set does not have.
    ///
    /// The layer's default policy is not removed (answers `false`): replace it with
    /// [`insert`](Self::insert) instead.
    pub fn remove(&self, name: &str) -> bool {
        if self.inner.default_name.as_deref() == Some(name) {
            return false;
        }
        let mut removed = false;
        self.write(|policies, _| removed = policies.by_name.remove(name).is_some());
        removed
    }

    /// Whether the set has a policy named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.load().by_name.contains_key(name)
    }

    /// The names of the policies, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.load().by_name.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// Compiles `policy` for this set's layer, or says why it cannot limit requests.
    fn compile(&self, policy: Policy) -> Result<CompiledPolicy, InvalidPolicy> {
        let compiled = compile(policy, &self.inner.context);
        match compiled.problem(self.inner.context.metered) {
            Some(reason) => Err(InvalidPolicy {
                name: compiled.name,
                reason,
            }),
            None => Ok(compiled),
        }
    }

    /// Changes the policies with `change`, given a copy of them and the default policy's name,
    /// then publishes the copy for the next requests.
    fn write(&self, change: impl FnOnce(&mut Policies, Option<&str>)) {
        // A writer that panicked left nothing half-done: `current` is only ever replaced whole.
        let _writer = (self.inner.writer.lock()).unwrap_or_else(|e| e.into_inner());
        let mut policies = Policies::clone(&self.load());
        change(&mut policies, self.inner.default_name.as_deref());
        self.inner.current.store(Arc::new(policies));
        // After the store: a request that still reads `first` started before the change.
        self.inner.changed.store(true, Ordering::SeqCst);
    }
}

/// Compiles `policy` under `context`, as a layer's default policy is.
fn compile(policy: Policy, context: &Context) -> CompiledPolicy {
    let mut compiled = CompiledPolicy::new(policy, "", &context.layer_scope);
    compiled.set_replicas(context.replicas);
    compiled
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("names", &self.names())
            .field("default", &self.inner.default_name)
            .finish_non_exhaustive()
    }
}

/// A policy that a [`PolicySet`] refused: it cannot limit requests. The set is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate-limit policy {name:?}: {reason}; the policies are unchanged")]
pub struct InvalidPolicy {
    name: String,
    reason: String,
}

impl InvalidPolicy {
    /// The name of the policy.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why it cannot limit requests.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::rate_limit::Rule;

    fn policy(name: &str, limit: u64) -> Policy {
        Policy::new(name, Rule::fixed_window(limit, Duration::from_secs(60)))
    }

    fn context(layer_scope: &str, replicas: u32) -> Context {
        Context {
            layer_scope: layer_scope.to_owned(),
            replicas,
            metered: false,
        }
    }

    #[test]
    fn requests_read_the_first_policies_until_the_set_changes() {
        let set =
            PolicySet::empty().configured(Context::default(), Some((policy("free", 1), true)));
        let minute = Duration::from_secs(60);
        let first = set
            .unchanged()
            .map(|p| p.get("free").map(|p| p.rules.clone()));
        assert_eq!(first, Some(Some(vec![Rule::fixed_window(1, minute)])));
        set.insert(policy("free", 2)).unwrap();
        assert!(
            set.unchanged().is_none(),
            "a changed set is read through `load`"
        );
        let now = set.load().get("free").map(|p| p.rules.clone());
        assert_eq!(now, Some(vec![Rule::fixed_window(2, minute)]));
        // A failed change changes nothing.
        let other =
            PolicySet::empty().configured(Context::default(), Some((policy("free", 1), true)));
        assert!(other.insert(policy("bad", 0)).is_err());
        assert!(other.unchanged().is_some());
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let set =
            PolicySet::empty().configured(Context::default(), Some((policy("free", 1), true)));
        std::thread::scope(|s| {
            for t in 0..4 {
                let set = &set;
                s.spawn(move || {
                    for i in 0..50 {
                        set.insert(policy(&format!("t{t}-{i}"), 1)).unwrap();
                    }
                });
            }
        });
        assert_eq!(set.names().len(), 201);
    }

    #[test]
    fn an_unchanged_policy_stays_and_a_changed_one_gets_a_new_id() {
        let set =
            PolicySet::empty().configured(Context::default(), Some((policy("free", 1), true)));
        let id = |set: &PolicySet| set.load().get("free").map(|p| p.id);
        let before = id(&set);
        set.insert(policy("free", 1)).unwrap();
        assert_eq!(id(&set), before);
        set.replace([policy("free", 1)]).unwrap();
        assert_eq!(id(&set), before);
        set.insert(policy("free", 2)).unwrap();
        assert_ne!(id(&set), before);
        // The default follows its replacement.
        let current = set.load();
        assert_eq!(current.default.as_ref().map(|p| p.id), id(&set));
    }

    #[test]
    fn configuring_recompiles_under_the_layer_and_leaves_earlier_handles_alone() {
        let set = PolicySet::empty().configured(context("", 1), Some((policy("free", 9), true)));
        let handle = set.clone();
        let scoped = set.configured(context("app", 3), Some((policy("pro", 30), false)));
        let current = scoped.load();
        let free = current.get("free").unwrap();
        assert_eq!(free.namespace.as_str(), "app\0free");
        let local: Vec<u64> = free.local.iter().flatten().map(Rule::quota).collect();
        assert_eq!(local, [3]);
        assert_eq!(
            current.default.as_ref().unwrap().namespace.as_str(),
            "app\0free"
        );
        assert_eq!(scoped.names(), ["free", "pro"]);
        // The set taken before has the policies it had.
        assert_eq!(handle.names(), ["free"]);
        assert_eq!(
            handle.load().get("free").unwrap().namespace.as_str(),
            "free"
        );
    }

    #[test]
    fn the_resolver_picks_else_the_default_else_nothing() {
        let set = PolicySet::empty()
            .configured(Context::default(), Some((policy("free", 1), true)))
            .configured(Context::default(), Some((policy("pro", 1), false)));
        let resolver: &ResolverFn = &|parts: &Parts| parts.headers.get("tier")?.to_str().ok();
        let pick = |tier: Option<&str>| {
            let mut req = http::Request::builder();
            if let Some(tier) = tier {
                req = req.header("tier", tier);
            }
            let parts = req.body(()).unwrap().into_parts().0;
            let current = set.load();
            current
                .select(Some(resolver), Head::of_parts(&parts))
                .map(|p| p.name.clone())
        };
        assert_eq!(pick(Some("pro")).as_deref(), Some("pro"));
        assert_eq!(pick(Some("gold")).as_deref(), Some("free"));
        assert_eq!(pick(None).as_deref(), Some("free"));
        let routed =
            PolicySet::empty().configured(Context::default(), Some((policy("pro", 1), false)));
        let parts = http::Request::new(()).into_parts().0;
        assert!(routed
            .load()
            .select(Some(resolver), Head::of_parts(&parts))
            .is_none());
        assert!(!routed.remove("free"));
        assert!(routed.remove("pro"));
    }
}
