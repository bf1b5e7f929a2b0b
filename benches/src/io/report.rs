//! The I/O benchmark's figures: per row and configuration, the measured runs; the markdown
//! table (medians, ratios to native) and the PNG charts made from them.

use std::path::{Path, PathBuf};

use plotters::style::RGBColor;

use super::{Env, IoParams, Metric};
use crate::boot::median;
use crate::chart::{self, ChartError, Panel, Series};

/// One table row: a metric's runs per configuration.
#[derive(Clone, Debug)]
pub struct Row {
    /// What was measured.
    pub metric: Metric,
    /// Measured runs, indexed like [`Env::ALL`].
    pub runs: [Vec<f64>; 3],
}

impl Row {
    /// The median of `env`'s runs, if it has any.
    pub fn median(&self, env: Env) -> Option<f64> {
        let v = &self.runs[env as usize];
        (!v.is_empty()).then(|| median(v))
    }

    /// `env`'s performance relative to native (higher is better: for a time, native time
    /// over `env`'s time).
    pub fn relative(&self, env: Env) -> Option<f64> {
        let (n, g) = (self.median(Env::Native)?, self.median(env)?);
        let r = if self.metric.higher_is_better() {
            g / n
        } else {
            n / g
        };
        r.is_finite().then_some(r)
    }
}

/// All rows, notes on failed runs, and the charts written.
#[derive(Clone, Debug)]
pub struct IoReport {
    /// What was run.
    pub params: IoParams,
    /// One per [`Metric::ALL`].
    pub rows: Vec<Row>,
    /// One line per run that failed or printed fewer figures than expected.
    pub failures: Vec<String>,
    /// Output of the first failed run of each configuration (its tail).
    pub failure_logs: Vec<String>,
    /// PNG files written.
    pub charts: Vec<PathBuf>,
}

const COLORS: [RGBColor; 3] = [
    RGBColor(0x44, 0x44, 0x44),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
];
const LOG_TAIL_LINES: usize = 40;

impl IoReport {
    pub(crate) fn new(params: IoParams) -> IoReport {
        IoReport {
            params,
            rows: Metric::ALL
                .iter()
                .map(|&metric| Row {
                    metric,
                    runs: Default::default(),
                })
                .collect(),
            failures: Vec::new(),
            failure_logs: Vec::new(),
            charts: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, env: Env, metric: Metric, value: f64) {
        if let Some(row) = self.rows.iter_mut().find(|r| r.metric == metric) {
            row.runs[env as usize].push(value);
        }
    }

    pub(crate) fn note_failure(&mut self, env: Env, round: usize, status: i32, output: &str) {
        let first_of_env = !self
            .failures
            .iter()
            .any(|f| f.starts_with(&format!("{}:", env.name())));
        self.failures.push(format!(
            "{}: round {round} exited {status} or printed too few figures",
            env.name()
        ));
        if first_of_env {
            let lines: Vec<&str> = output.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            self.failure_logs.push(format!(
                "{} (round {round}, exit {status}), last lines:\n{tail}",
                env.name()
            ));
        }
    }

    /// The markdown table with its caption and notes.
    pub fn markdown(&self) -> String {
        let p = &self.params;
        let mut s = format!(
            "I/O and CPU, native (L2 host) vs the default guest under hospes and under QEMU microvm \
             (1 vCPU, {} MiB; virtio-blk cache=none on a raw image on L2's ext4, virtio-net on a TAP), \
             in one L2 boot, median (min–max) of {} run(s) after a warm-up round. Ratios are relative performance \
             (guest/native; for pi, native time / guest time): 1.0 = native, higher is better.\n\n",
            p.guest_mib, p.runs
        );
        s.push_str("| | native | hospes | QEMU | hospes/native | QEMU/native |\n|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let abs = |e: Env| match row.median(e) {
                None => "—".to_string(),
                Some(v) => {
                    let runs = &row.runs[e as usize];
                    let lo = runs.iter().copied().fold(f64::MAX, f64::min);
                    let hi = runs.iter().copied().fold(f64::MIN, f64::max);
                    let f = |x| fmt_value(row.metric, x);
                    if runs.len() > 1 {
                        format!("{} ({}–{})", f(v), f(lo), f(hi))
                    } else {
                        f(v)
                    }
                }
            };
            let rel = |e: Env| {
                row.relative(e)
                    .map_or("—".to_string(), |r| format!("{r:.2}×"))
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                row.metric.label(p),
                abs(Env::Native),
                abs(Env::Hospes),
                abs(Env::Qemu),
                rel(Env::Hospes),
                rel(Env::Qemu)
            ));
        }
        if !self.failures.is_empty() {
            s.push_str("\nRuns that failed or printed too few figures (what they did not print is missing from the medians):\n");
            for f in &self.failures {
                s.push_str(&format!("- {f}\n"));
            }
        }
        s
    }

    /// Writes `io-absolute.png` (one panel per row, a bar per configuration) and
    /// `io-relative.png` (every row, hospes and QEMU relative to native) into `dir`.
    pub(crate) fn write_charts(&mut self, dir: &Path) -> Result<(), ChartError> {
        let series: Vec<Series> = Env::ALL
            .iter()
            .zip(COLORS)
            .map(|(e, color)| Series {
                name: e.name(),
                color,
            })
            .collect();
        let panels: Vec<Panel> = self
            .rows
            .iter()
            .map(|row| Panel {
                title: row.metric.short().to_string(),
                y_desc: row.metric.unit().to_string(),
                groups: vec![String::new()],
                values: vec![Env::ALL.iter().map(|&e| row.median(e)).collect()],
                reference: None,
            })
            .collect();
        let absolute = dir.join("io-absolute.png");
        chart::draw(&absolute, &panels, &series, 3, (420, 340))?;

        let relative = dir.join("io-relative.png");
        let panel = Panel {
            title: "guest performance relative to native (1.0 = native; higher is better)"
                .to_string(),
            y_desc: "× native".to_string(),
            groups: self
                .rows
                .iter()
                .map(|r| r.metric.short().to_string())
                .collect(),
            values: self
                .rows
                .iter()
                .map(|r| vec![r.relative(Env::Hospes), r.relative(Env::Qemu)])
                .collect(),
            reference: Some(1.0),
        };
        chart::draw(&relative, &[panel], &series[1..], 1, (1000, 420))?;
        self.charts = vec![absolute, relative];
        Ok(())
    }
}

fn fmt_value(metric: Metric, v: f64) -> String {
    match metric {
        Metric::RandRead => format!("{v:.0}"),
        Metric::Pi => format!("{v:.2}"),
        _ => format!("{v:.1}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_invert_for_times_and_skip_missing() {
        let mut r = IoReport::new(IoParams::default());
        r.push(Env::Native, Metric::SeqRead, 100.0);
        r.push(Env::Hospes, Metric::SeqRead, 90.0);
        r.push(Env::Native, Metric::Pi, 2.0);
        r.push(Env::Qemu, Metric::Pi, 4.0);
        let seq = &r.rows[1];
        assert_eq!(seq.relative(Env::Hospes), Some(0.9));
        assert_eq!(seq.relative(Env::Qemu), None);
        assert_eq!(r.rows[5].relative(Env::Qemu), Some(0.5));
        let md = r.markdown();
        assert!(md.contains("| 100.0 | 90.0 | — | 0.90× | — |"), "{md}");
        r.push(Env::Native, Metric::SeqRead, 120.0);
        r.push(Env::Native, Metric::SeqRead, 80.0);
        assert!(
            r.markdown().contains("| 100.0 (80.0–120.0) |"),
            "{}",
            r.markdown()
        );
    }
}
