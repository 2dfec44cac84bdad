//! A monotonic clock that follows `tokio::time::pause()` in tests.

use tokio::time::Instant;

/// Microseconds since a fixed origin taken the first time the clock is read in this process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// Microseconds elapsed since the origin, offset by one hour so that "zero" state is always
    /// in the past.
    pub(crate) fn now_us(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX / 2)
            .saturating_add(3_600_000_000)
    }
}
