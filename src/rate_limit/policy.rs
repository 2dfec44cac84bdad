//! Policies: the rules checked together for one request, where their counters live, and the
//! routes of a [`routed`](super::RateLimitLayer::routed) layer.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use http::Method;

use super::{fallback::divide, head::Head, headers::PolicyFields, Rule};
use crate::key::Namespace;

/// A set of rules checked together for one request, all-or-nothing.
///
/// See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct Policy {
    name: String,
    rules: Vec<Rule>,
    scope: Option<String>,
}

impl Policy {
    /// A policy named `name`, of one rule.
    ///
    /// The name is where the policy's counters live: two policies with different names count
    /// on their own even with identical rules on one store (two programs, or two layers of one
    /// program), unless they are given the same [`scope`](Self::scope). Keep a policy's name
    /// when you deploy a new version of a program, or its counters start afresh.
    pub fn new(name: impl Into<String>, rule: Rule) -> Self {
        Self {
            name: name.into(),
            rules: vec![rule],
            scope: None,
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a rule, checked in the same atomic call as the others.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Where this policy's counters live, instead of its name: policies with the same scope
    /// (and the same rules and key, under the same layer
    /// [scope](super::RateLimitLayer::scope)) share one budget, whatever their names.
    ///
    /// By default a policy counts on its own: its counters are named by the policy's
    /// [name](Self::new), and a route of a [`routed`](super::RateLimitLayer::routed) layer by
    /// the name and its method and path. Give the same scope to the policies of several
    /// routes, layers or programs that must share one budget.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }
}

/// A policy ready for requests: its rules, the namespace of its counters, and what its fields
/// need, computed once (when the layer is built, or when a [`PolicySet`](super::PolicySet)
/// takes it), never per request.
#[derive(Clone, Debug)]
pub(crate) struct CompiledPolicy {
    /// This compilation's identity, unique in the process: what the deny cache keys a denial
    /// by, so that a policy replaced at runtime (or another policy over the same counters) is
    /// never answered with a denial of the one before.
    pub(crate) id: u64,
    pub(crate) rules: Vec<Rule>,
    pub(crate) fields: PolicyFields,
    /// The policy's name.
    pub(crate) name: String,
    /// The policy's own scope, or its name (with a route's method and path).
    scope: String,
    /// What every key of the policy is hashed with: the layer's scope and the policy's.
    pub(crate) namespace: Namespace,
    /// Why the rules cannot be checked, if they cannot.
    pub(crate) invalid: Option<String>,
    /// Whether every rule can be settled (a metered layer's policies must).
    pub(crate) settles: bool,
    /// The rules of the local fallback (see [`divide`]).
    pub(crate) local: Option<Vec<Rule>>,
}

/// The next [`CompiledPolicy::id`].
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl CompiledPolicy {
    /// Compiles `policy`; `route` is a route's method and path (empty for a layer's default
    /// policy), part of the default scope.
    pub(crate) fn new(policy: Policy, route: &str, layer_scope: &str) -> Self {
        let invalid = if policy.rules.is_empty() {
            Some("a policy needs at least one rule".to_owned())
        } else {
            policy.rules.iter().find_map(|r| r.validate().err())
        };
        let scope = match policy.scope {
            Some(scope) => scope,
            None if route.is_empty() => policy.name.clone(),
            None => format!("{}\0{route}", policy.name),
        };
        Self {
            id: next_id(),
            name: policy.name,
            settles: policy.rules.iter().all(|r| r.strategy().settles()),
            local: divide(&policy.rules, 1),
            fields: PolicyFields::new(&policy.rules),
            namespace: namespace(layer_scope, &scope),
            scope,
            rules: policy.rules,
            invalid,
        }
    }

    /// Divides the local fallback's rules among `replicas` replicas.
    pub(crate) fn set_replicas(&mut self, replicas: u32) {
        self.local = divide(&self.rules, replicas);
        self.id = next_id();
    }

    /// Moves the policy under another layer scope.
    pub(crate) fn set_layer_scope(&mut self, layer_scope: &str) {
        self.namespace = namespace(layer_scope, &self.scope);
        self.id = next_id();
    }

    /// Why this policy cannot limit requests of a layer (`metered`: with a settlement), if it
    /// cannot.
    pub(crate) fn problem(&self, metered: bool) -> Option<String> {
        if let Some(problem) = &self.invalid {
            return Some(problem.clone());
        }
        if metered && !self.settles {
            return Some(METERED_STRATEGIES.to_owned());
        }
        None
    }
}

/// Why a policy with a sliding rule cannot be metered.
pub(crate) const METERED_STRATEGIES: &str = "a metered layer (with a settlement) settles only \
     fixed window, token bucket, GCRA and calendar rules";

/// The namespace of a policy's keys: the policy's scope (by default its name), with the layer's
/// scope in front when there is one, separated by a NUL (which a scope never contains in
/// practice). The rules' numbers are added by the store, so changing them starts afresh.
fn namespace(layer_scope: &str, policy_scope: &str) -> Namespace {
    Namespace::new(if layer_scope.is_empty() {
        policy_scope.to_owned()
    } else {
        format!("{layer_scope}\0{policy_scope}")
    })
}

/// One route of a routed layer: a method (or any) and a path (or a prefix), and its policy.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    method: Option<Method>,
    path: String,
    prefix: bool,
    pub(crate) policy: Arc<CompiledPolicy>,
}

impl Route {
    /// A route for `method` (any for `None`) and `path`, where a trailing `*` matches every path
    /// with that prefix. Its policy is scoped by its name, method and path unless it has a scope.
    pub(crate) fn new(
        method: Option<Method>,
        path: &str,
        policy: Policy,
        layer_scope: &str,
    ) -> Self {
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p.to_owned(), true),
            None => (path.to_owned(), false),
        };
        let scope = format!(
            "{} {}{}",
            method.as_ref().map_or("*", Method::as_str),
            path,
            if prefix { "*" } else { "" }
        );
        Self {
            method,
            path,
            prefix,
            policy: Arc::new(CompiledPolicy::new(policy, &scope, layer_scope)),
        }
    }

    pub(crate) fn matches(&self, head: Head<'_>) -> bool {
        if self.method.as_ref().is_some_and(|m| m != head.method) {
            return false;
        }
        let path = head.uri.path();
        if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}
