//! What a run prints while it trains. In a terminal: a progress bar with the step, loss, tokens/s
//! and ETA (indicatif), with a line kept every `log.every` steps; elsewhere (a log file, CI) the
//! plain line every `log.every` steps and at the last.
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: i64,
    every: i64,
}

/// "12m05s", "1h02m".
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

impl Progress {
    /// Steps `[start, total)` remain; a line is kept every `every` steps.
    pub fn new(start: i64, total: i64, every: i64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total.max(0) as u64), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("step {pos}/{len} [{bar:30.cyan/blue}] {msg} eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar.set_position(start.max(0) as u64);
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Progress { bar, total, every }
    }

    /// Prints nothing (the ranks of a job other than 0).
    pub fn quiet() -> Progress {
        Progress { bar: None, total: -1, every: i64::MAX }
    }

    /// After step `step` (1-based) finished: the bar moves (or a plain line is printed on its
    /// schedule). `line` is the full step line; `short` what the bar shows beside it.
    pub fn step(&self, step: i64, line: &str, short: &str) {
        let keep = step % self.every == 0 || step == self.total;
        match &self.bar {
            Some(bar) => {
                bar.set_position(step as u64);
                bar.set_message(short.to_string());
                if keep {
                    bar.println(line);
                }
            }
            None if keep => eprintln!("{line}"),
            None => {}
        }
    }

    /// A line that stays (evaluation results, warnings), above the bar in a terminal.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar (its kept lines stay).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An error ends the run with the bar still drawn: clear it so the `error:` line stands alone.
        self.finish();
    }
}
