//! Step timings: consecutive steps of one operation (a VM build, a migration's
//! stop-and-copy), measured one after the other and logged as one line.

use std::fmt;
use std::time::{Duration, Instant};

/// Consecutive steps, each timed from the end of the previous one.
pub(crate) struct Laps {
    start: Instant,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Laps {
    /// Starts timing now.
    pub(crate) fn start() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            steps: Vec::new(),
        }
    }

    /// Ends the step `name` now; the next one starts.
    pub(crate) fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }

    /// From the start to the end of the last step.
    pub(crate) fn total(&self) -> Duration {
        self.last - self.start
    }
}

/// `name 1.2 ms, name 0.3 ms, ... (total 1.5 ms)`.
impl fmt::Display for Laps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, d)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} {:.1} ms", d.as_secs_f64() * 1e3)?;
        }
        write!(f, " (total {:.1} ms)", self.total().as_secs_f64() * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_are_listed_in_order_with_their_total() {
        let mut laps = Laps::start();
        laps.lap("a");
        laps.lap("b");
        let line = laps.to_string();
        assert!(line.starts_with("a "), "{line}");
        assert!(line.contains(", b "), "{line}");
        assert!(line.contains("(total "), "{line}");
        assert!(laps.total() >= laps.steps[0].1);
    }
}
