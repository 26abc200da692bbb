//! Names read from an image, made safe to show and checked before they are used.
//!
//! An image is untrusted input: a directory entry's name may hold control bytes
//! (a terminal escape sequence), invalid UTF-8, a `/`, a NUL, or be `.`, `..` or
//! empty where the format allows none of these. This module says how to print
//! such a name (quoted and escaped, as GNU ls's `shell-escape` style does) and
//! whether a name may become a host file name at all. It creates nothing.

/// Why an entry name cannot name a host file (it is never created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadName {
    /// The empty name.
    Empty,
    /// `.` or `..` other than a directory's own first two entries.
    Dots,
    /// Holds a `/`: it would name a path, not an entry.
    Slash,
    /// Holds a NUL byte (which ends a name for the host).
    Nul,
}

impl BadName {
    /// What is wrong, in words.
    pub fn why(self) -> &'static str {
        match self {
            BadName::Empty => "an empty name (corrupt directory entry)",
            BadName::Dots => {
                "a `.` or `..` entry that is not the directory's own (corrupt directory entry)"
            }
            BadName::Slash => "a name holding `/` (corrupt directory entry)",
            BadName::Nul => "a name holding a NUL byte (corrupt directory entry)",
        }
    }
}

/// Check an entry name found at position `index` of its directory (the real `.`
/// and `..` are entries 0 and 1: every reader of the format puts them there).
/// `Ok(false)`: one of those two, to be passed over; `Ok(true)`: a usable name.
pub fn check(name: &[u8], index: usize) -> Result<bool, BadName> {
    if (index == 0 && name == b".") || (index == 1 && name == b"..") {
        return Ok(false);
    }
    if name.is_empty() {
        Err(BadName::Empty)
    } else if name == b"." || name == b".." {
        Err(BadName::Dots)
    } else if name.contains(&b'/') {
        Err(BadName::Slash)
    } else if name.contains(&0) {
        Err(BadName::Nul)
    } else {
        Ok(true)
    }
}

/// Whether `name` prints as itself: valid UTF-8 without control characters,
/// without `/`, and not empty.
fn plain(name: &[u8]) -> bool {
    match std::str::from_utf8(name) {
        Ok(s) => !s.is_empty() && !s.chars().any(|c| c.is_control() || c == '/'),
        Err(_) => false,
    }
}

/// `name` as it is safe to print: itself when plain, else in ANSI-C quotes
/// (`$'a\nb'`, `$'\xff'`, `$'../evil'`) as GNU ls prints names it must escape;
/// the empty name as `''`.
pub fn show(name: &[u8]) -> String {
    if plain(name) {
        return String::from_utf8_lossy(name).into_owned();
    }
    quoted(name)
}

/// A symlink's target (a path: `/` is expected there) as it is safe to print:
/// itself unless it holds control characters or invalid UTF-8.
pub fn show_target(target: &[u8]) -> String {
    match std::str::from_utf8(target) {
        Ok(s) if !s.is_empty() && !s.chars().any(char::is_control) => s.to_string(),
        _ => quoted(target),
    }
}

/// `name` always in ANSI-C quotes (for a name flagged as corrupt, so that a
/// bogus `..` does not pass for the real one).
pub fn quoted(name: &[u8]) -> String {
    if name.is_empty() {
        return "''".to_string();
    }
    let mut out = String::from("$'");
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\x1b' => out.push_str("\\e"),
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("\\'"),
                c if c.is_control() => {
                    let mut b = [0u8; 4];
                    for byte in c.encode_utf8(&mut b).bytes() {
                        out.push_str(&format!("\\x{byte:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out.push('\'');
    out
}

/// An image path (`/a/b`) as it is safe to print: each component through
/// [`show`] (a component no name may be, such as `..`, through [`quoted`]),
/// so a component holding `/` stays one visible component.
pub fn show_path(parts: &[&[u8]]) -> String {
    if parts.is_empty() {
        return "/".to_string();
    }
    let mut s = String::new();
    for p in parts {
        s.push('/');
        match check(p, usize::MAX) {
            Ok(_) => s.push_str(&show(p)),
            Err(_) => s.push_str(&quoted(p)),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_print_as_themselves() {
        assert_eq!(show(b"hello world.txt"), "hello world.txt");
        assert_eq!(show("caf\u{e9}".as_bytes()), "caf\u{e9}");
    }

    #[test]
    fn odd_names_are_quoted_and_escaped() {
        assert_eq!(show(b"a\nb"), "$'a\\nb'");
        assert_eq!(show(b"\x1b[31mred"), "$'\\e[31mred'");
        assert_eq!(show(b"\xffx"), "$'\\xffx'");
        assert_eq!(show(b"../evil"), "$'../evil'");
        assert_eq!(show(b"it's\x01"), "$'it\\'s\\x01'");
        assert_eq!(show(b""), "''");
        assert_eq!(quoted(b".."), "$'..'");
        assert_eq!(show_target(b"../a/b"), "../a/b");
        assert_eq!(show_target(b"/x\n"), "$'/x\\n'");
        assert_eq!(show_path(&[b"a", b"b/c"]), "/a/$'b/c'");
        assert_eq!(show_path(&[b"a", b".."]), "/a/$'..'");
    }

    #[test]
    fn only_the_first_two_dot_entries_are_real() {
        assert_eq!(check(b".", 0), Ok(false));
        assert_eq!(check(b"..", 1), Ok(false));
        assert_eq!(check(b"..", 0), Err(BadName::Dots));
        assert_eq!(check(b".", 5), Err(BadName::Dots));
        assert_eq!(check(b"../evil", 3), Err(BadName::Slash));
        assert_eq!(check(b"a\0b", 3), Err(BadName::Nul));
        assert_eq!(check(b"", 3), Err(BadName::Empty));
        assert_eq!(check(b"...", 3), Ok(true));
        assert_eq!(check(b"a\nb", 3), Ok(true));
    }
}
