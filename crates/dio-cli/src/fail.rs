//! How a command fails: a one-line message for the user (exit 1), a usage mistake
//! (exit 2), a reader that went away (quiet exit), or a signal (Ctrl-C: 130). Also
//! the stderr printing that never panics.

use std::fmt::Display;
use std::io::Write;
use std::path::Path;

/// Why a command stopped.
#[derive(Debug)]
pub enum Failure {
    /// An error, printed as `dio: <message>`; exit 1.
    Message(String),
    /// A usage mistake the argument parser could not see (a malformed URI, a
    /// value out of range), printed as `dio: <message>`; exit 2.
    Usage(String),
    /// Errors were reported as they happened (e.g. `ls` went on past them); exit 1
    /// with nothing more to say.
    Quiet,
    /// Writing to stdout met EPIPE: the reader is gone; exit quietly.
    BrokenPipe,
    /// The user pressed Ctrl-C; clean-up ran.
    Interrupted,
    /// A signal stopped the command after clean-up; the message says what is left.
    /// Exit 128 + the signal number (130 for SIGINT).
    Signal { signal: i32, message: String },
}

impl Failure {
    /// An error about `path`.
    pub fn at(path: &Path, err: impl Display) -> Failure {
        Failure::Message(format!("{}: {err}", path.display()))
    }

    /// A plain message.
    pub fn msg(m: impl Into<String>) -> Failure {
        Failure::Message(m.into())
    }

    /// A usage mistake (exit 2).
    pub fn usage(m: impl Into<String>) -> Failure {
        Failure::Usage(m.into())
    }

    /// The same failure with `more` appended to its message (for what is left of a
    /// destination); a quiet failure stays quiet.
    pub fn with_note(self, more: &str) -> Failure {
        match self {
            Failure::Message(m) => Failure::Message(format!("{m}; {more}")),
            Failure::Usage(m) => Failure::Usage(format!("{m}; {more}")),
            Failure::Interrupted => Failure::Signal {
                signal: 2,
                message: format!("interrupted: {more}"),
            },
            Failure::Signal { signal, message } => Failure::Signal {
                signal,
                message: format!("{message}: {more}"),
            },
            Failure::BrokenPipe => Failure::BrokenPipe,
            Failure::Quiet => Failure::Message(more.to_string()),
        }
    }
}

/// Print one line on stderr; a closed stderr is ignored rather than a panic.
pub fn say(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "dio: {line}");
}

/// Print a RawFile's notes as `dio: note: ...`.
pub fn print_notes(notes: &[String]) {
    for n in notes {
        say(format_args!("note: {n}"));
    }
}
