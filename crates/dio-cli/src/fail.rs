//! How a command fails: a one-line message for the user (exit 1), a reader that went
//! away (quiet exit), or Ctrl-C. Also the stderr printing that never panics.

use std::fmt::Display;
use std::io::Write;
use std::path::Path;

/// Why a command stopped.
#[derive(Debug)]
pub enum Failure {
    /// An error, printed as `dio: <message>`.
    Message(String),
    /// Writing to stdout met EPIPE: the reader is gone; exit quietly.
    BrokenPipe,
    /// The user pressed Ctrl-C; clean-up ran.
    Interrupted,
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
