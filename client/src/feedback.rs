//! What the user sees while a run progresses: a progress bar on a terminal,
//! nothing but errors with `--quiet`, nothing on standard output but the
//! summary with `--json`.

use std::io::Write;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::files::BackupItem;
use crate::report::{FileReport, Outcome};

/// Receives progress events from a run. Every method has an empty default.
pub trait Feedback: Send + Sync {
    /// The run will send `files` files of `bytes` bytes in all.
    fn start(&self, files: usize, bytes: u64) {
        let _ = (files, bytes);
    }
    /// Attempt `attempt` (1-based) at sending `item` begins.
    fn attempt(&self, item: &BackupItem, attempt: u8) {
        let _ = (item, attempt);
    }
    /// The restore of `name` (`size` bytes) begins.
    fn restoring(&self, name: &str, size: u64) {
        let _ = (name, size);
    }
    /// `bytes` more plaintext bytes were handed to the network (backup) or
    /// written to disk (restore).
    fn progress(&self, bytes: u64) {
        let _ = bytes;
    }
    /// A file of a backup or restore is finished, one way or another.
    fn finished(&self, file: &FileReport) {
        let _ = file;
    }
    /// Something worth telling a person that is not an error.
    fn notice(&self, message: &str) {
        let _ = message;
    }
    /// An error that does not end the run (it is also in the report).
    fn error(&self, message: &str) {
        let _ = message;
    }
    /// The run is over; remove any progress display.
    fn done(&self) {}
}

/// Feedback that shows nothing (library default).
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Feedback for Silent {}

/// How much the console shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Progress bar (on a terminal), one line per file, notices.
    Normal,
    /// Errors only.
    Quiet,
    /// Errors only on standard error; the JSON summary is printed at the end.
    Json,
}

/// Console feedback for the command-line client.
#[derive(Debug)]
pub struct Console {
    verbosity: Verbosity,
    bar: ProgressBar,
}

impl Console {
    /// Console feedback; the bar draws on standard error only when it is a
    /// terminal and `verbosity` is [`Verbosity::Normal`].
    pub fn new(verbosity: Verbosity) -> Self {
        let bar = match verbosity {
            Verbosity::Normal => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            Verbosity::Quiet | Verbosity::Json => ProgressBar::hidden(),
        };
        let style = ProgressStyle::with_template(
            "{msg:20!} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        Self { verbosity, bar }
    }

    /// The verbosity.
    pub fn verbosity(&self) -> Verbosity {
        self.verbosity
    }

    /// Prints a line on standard output (not in quiet or JSON mode).
    pub fn say(&self, line: &str) {
        if self.verbosity == Verbosity::Normal {
            self.bar.suspend(|| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
            });
        }
    }

    /// Prints an error on standard error (in every mode).
    pub fn print_error(&self, message: &str) {
        self.bar.suspend(|| {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: {message}");
        });
    }
}

impl Feedback for Console {
    fn start(&self, _files: usize, bytes: u64) {
        self.bar.set_length(bytes);
        self.bar.set_position(0);
        self.bar.reset_eta();
    }

    fn attempt(&self, item: &BackupItem, attempt: u8) {
        if attempt > 1 {
            // A resend: the bar grows by the file again.
            self.bar.inc_length(item.size);
        }
        self.bar.set_message(item.name.to_string_lossy());
    }

    fn restoring(&self, name: &str, size: u64) {
        // A single restore starts without knowing the size.
        if self.bar.length() == Some(0) {
            self.bar.set_length(size);
            self.bar.reset_eta();
        }
        self.bar.set_message(name.to_owned());
    }

    fn progress(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn finished(&self, file: &FileReport) {
        match &file.outcome {
            Outcome::Stored { attempts, .. } => {
                let tries = if *attempts > 1 {
                    format!(", after {attempts} attempts")
                } else {
                    String::new()
                };
                self.say(&format!(
                    "stored {} ({}, verified{tries})",
                    file.name,
                    HumanBytes(file.size)
                ));
            }
            Outcome::Restored { .. } => {
                let path = file
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                self.say(&format!(
                    "restored {} (version {}, {}, verified) to {path}",
                    file.name,
                    file.version.unwrap_or_default(),
                    HumanBytes(file.size)
                ));
            }
            Outcome::Failed(e) => self.print_error(&e.to_string()),
            Outcome::NotAttempted => {}
        }
    }

    fn notice(&self, message: &str) {
        if self.verbosity == Verbosity::Normal {
            self.bar.suspend(|| {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "note: {message}");
            });
        }
    }

    fn error(&self, message: &str) {
        self.print_error(message);
    }

    fn done(&self) {
        self.bar.finish_and_clear();
    }
}
