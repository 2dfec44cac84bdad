//! The rules both benchmarks measure: one per strategy, with limits that are never reached.

use std::time::Duration;

use tower_redis_layers::rate_limit::Rule;

/// A limit no benchmark reaches.
pub const HUGE: u64 = 1_000_000_000_000;

/// Each strategy once, named as in the reports.
pub fn strategies() -> Vec<(&'static str, Rule)> {
    let minute = Duration::from_secs(60);
    let second = Duration::from_secs(1);
    vec![
        ("fixed", Rule::fixed_window(HUGE, minute)),
        ("sliding-log", Rule::sliding_log(HUGE, second)),
        ("sliding-window", Rule::sliding_window(HUGE, minute)),
        ("token-bucket", Rule::token_bucket(HUGE, HUGE, second)),
        ("gcra", Rule::gcra(HUGE, second, HUGE)),
    ]
}
