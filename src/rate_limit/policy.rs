//! Policies: the rules checked together for one request, where their counters live, and the
//! routes of a [`routed`](super::RateLimitLayer::routed) layer.

use http::{request::Parts, Method};

use super::{fallback::divide, headers::PolicyFields, Rule};

/// A set of rules checked together for one request, all-or-nothing.
///
/// See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    scope: Option<String>,
}

impl Policy {
    /// A policy of one rule.
    pub fn new(rule: Rule) -> Self {
        Self {
            rules: vec![rule],
            scope: None,
        }
    }

    /// Adds a rule, checked in the same atomic call as the others.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Separates this policy's counters from those of other policies with the same rules and
    /// key, inside the layer's [scope](super::RateLimitLayer::scope).
    ///
    /// By default a policy's counters are shared by every policy with the same rules under the
    /// same layer scope (state is keyed by the rules, so that every replica agrees). Give two
    /// routes different scopes when each should have its own budget. Route policies of a
    /// [`routed`](super::RateLimitLayer::routed) layer are scoped by their method and path
    /// unless a scope is given here.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }
}

impl From<Rule> for Policy {
    fn from(rule: Rule) -> Self {
        Self::new(rule)
    }
}

/// A policy ready for requests: its rules, the namespace of its counters, and what its fields
/// need, computed once.
#[derive(Clone, Debug)]
pub(crate) struct CompiledPolicy {
    pub(crate) rules: Vec<Rule>,
    pub(crate) fields: PolicyFields,
    /// The policy's own scope, or the default of its place (a route's method and path).
    scope: String,
    /// What every key of the policy is hashed with: the layer's scope and the policy's.
    pub(crate) namespace: String,
    /// Why the rules cannot be checked, if they cannot.
    pub(crate) invalid: Option<String>,
    /// The rules of the local fallback (see [`divide`]).
    pub(crate) local: Option<Vec<Rule>>,
}

impl CompiledPolicy {
    pub(crate) fn new(policy: Policy, default_scope: String, layer_scope: &str) -> Self {
        let invalid = if policy.rules.is_empty() {
            Some("a policy needs at least one rule".to_owned())
        } else {
            policy.rules.iter().find_map(|r| r.validate().err())
        };
        let scope = policy.scope.unwrap_or(default_scope);
        Self {
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
    }

    /// Moves the policy under another layer scope.
    pub(crate) fn set_layer_scope(&mut self, layer_scope: &str) {
        self.namespace = namespace(layer_scope, &self.scope);
    }
}

/// The namespace of a policy's keys. Without a layer scope it is the policy's scope alone, as
/// before layers had scopes (so that counters survive an upgrade); a layer scope is put in front,
/// separated by a NUL (which a scope never contains in practice).
fn namespace(layer_scope: &str, policy_scope: &str) -> String {
    if layer_scope.is_empty() {
        policy_scope.to_owned()
    } else {
        format!("{layer_scope}\0{policy_scope}")
    }
}

/// One route of a routed layer: a method (or any) and a path (or a prefix), and its policy.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    method: Option<Method>,
    path: String,
    prefix: bool,
    pub(crate) policy: CompiledPolicy,
}

impl Route {
    /// A route for `method` (any for `None`) and `path`, where a trailing `*` matches every path
    /// with that prefix. Its policy is scoped by method and path unless it has a scope.
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
            policy: CompiledPolicy::new(policy, scope, layer_scope),
        }
    }

    pub(crate) fn matches(&self, parts: &Parts) -> bool {
        if self.method.as_ref().is_some_and(|m| m != parts.method) {
            return false;
        }
        let path = parts.uri.path();
        if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}
