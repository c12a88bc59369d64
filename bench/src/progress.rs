//! Progress on stderr while a run goes: an indicatif bar on a terminal, a plain line
//! every few seconds otherwise (logs, CI), nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Interval of the plain-text progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// The rate shown on the bar is measured over at least this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// One counter per worker (subscriber, publisher), each on its own cache line so
/// that workers on different cores never write the same line; the progress loop
/// sums them.
pub struct Counters {
    slots: Vec<Slot>,
}

#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicU64);

impl Counters {
    /// `n` counters at zero.
    pub fn new(n: usize) -> Self {
        Counters {
            slots: (0..n).map(|_| Slot::default()).collect(),
        }
    }

    /// Sets worker `i`'s count (only worker `i` writes it).
    pub fn set(&self, i: usize, value: u64) {
        if let Some(slot) = self.slots.get(i) {
            slot.0.store(value, Ordering::Relaxed);
        }
    }

    /// The sum of all counters.
    pub fn total(&self) -> u64 {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// A progress display of `done / total` of some unit.
pub struct Progress {
    kind: Kind,
    unit: &'static str,
    total: u64,
    started: Instant,
    /// Start of the current rate window and the count then.
    window: (Instant, u64),
    /// Units per second over the last full window.
    rate: f64,
}

enum Kind {
    Bar(ProgressBar),
    Plain { last_print: Instant },
    Hidden,
}

impl Progress {
    /// A display for `total` `unit`s with a label.
    pub fn new(label: &str, unit: &'static str, total: u64, quiet: bool) -> Progress {
        let kind = if quiet {
            Kind::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!(
                "{label:>10} [{{elapsed_precise}}] [{{bar:40}}] {{human_pos}}/{{human_len}} {unit} {{msg}}"
            );
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            Kind::Bar(bar)
        } else {
            eprintln!("{label}: 0/{total} {unit}");
            Kind::Plain {
                last_print: Instant::now(),
            }
        };
        let now = Instant::now();
        Progress {
            kind,
            unit,
            total,
            started: now,
            window: (now, 0),
            rate: 0.0,
        }
    }

    /// Updates the display to `done` (cheap; call it often).
    pub fn update(&mut self, done: u64, message: &str) {
        let (since, before) = self.window;
        let elapsed = since.elapsed();
        if elapsed >= RATE_WINDOW {
            self.rate = done.saturating_sub(before) as f64 / elapsed.as_secs_f64();
            self.window = (Instant::now(), done);
        }
        let rate = self.rate;
        match &mut self.kind {
            Kind::Bar(bar) => {
                bar.set_position(done);
                bar.set_message(format!("{rate:.0}/s {message}"));
            }
            Kind::Plain { last_print } => {
                if last_print.elapsed() >= PLAIN_EVERY {
                    eprintln!(
                        "[{:>6.1}s] {done}/{} {} ({rate:.0}/s) {message}",
                        self.started.elapsed().as_secs_f64(),
                        self.total,
                        self.unit
                    );
                    *last_print = Instant::now();
                }
            }
            Kind::Hidden => {}
        }
    }

    /// Removes the bar (or prints a last line).
    pub fn finish(self, done: u64) {
        match self.kind {
            Kind::Bar(bar) => {
                bar.set_position(done);
                bar.finish_and_clear();
            }
            Kind::Plain { .. } => eprintln!(
                "[{:>6.1}s] {done}/{} {} done",
                self.started.elapsed().as_secs_f64(),
                self.total,
                self.unit
            ),
            Kind::Hidden => {}
        }
    }
}
