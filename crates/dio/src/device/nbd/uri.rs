//! NBD URIs, as libnbd and qemu write them: `nbd://HOST[:PORT]/EXPORT` for TCP and
//! `nbd+unix:///EXPORT?socket=PATH` for a Unix socket. TLS schemes (`nbds`) are
//! recognised and refused.

use crate::error::Feature;
use std::fmt;
use std::path::PathBuf;

use crate::{Error, Result};

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A TCP host (name, IPv4 or IPv6 address without brackets) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix-domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URI: the server address and the export name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: Address,
    /// The export name (percent-decoded; empty for the default export).
    pub export: String,
}

impl NbdUri {
    /// A TCP address.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdUri {
        NbdUri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    /// A Unix socket address.
    pub fn unix(socket: impl Into<PathBuf>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            address: Address::Unix(socket.into()),
            export: export.into(),
        }
    }

    /// Whether `s` looks like an NBD URI (starts with an `nbd` scheme), so that
    /// callers can tell it from a path before parsing.
    pub fn is_nbd_uri(s: &str) -> bool {
        let lower = s
            .get(..s.find("://").unwrap_or(0))
            .map(str::to_ascii_lowercase);
        matches!(
            lower.as_deref(),
            Some("nbd" | "nbd+tcp" | "nbd+unix" | "nbds" | "nbds+tcp" | "nbds+unix")
        )
    }

    /// Parse `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...` or
    /// `nbd+unix:///EXPORT?socket=PATH`. The export name is the percent-decoded
    /// path without its leading `/`; IPv6 hosts are written in brackets.
    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::Invalid(format!("bad NBD URI {s:?}: {why}"));
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("expected nbd://HOST[:PORT]/EXPORT"))?;
        let scheme = scheme.to_ascii_lowercase();
        let unix = match scheme.as_str() {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" => {
                return Err(Error::incompatible(
                    Feature::Tls,
                    format!("{s}: NBD over TLS ({scheme}) is not supported"),
                ))
            }
            _ => return Err(bad("the scheme must be nbd, nbd+tcp or nbd+unix")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad percent escape in export"))?;
        let mut socket = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == "socket" {
                let v = percent_decode(v).ok_or_else(|| bad("bad percent escape in socket"))?;
                socket = Some(PathBuf::from(v));
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    "nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            Address::Unix(socket.ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(bad("?socket= needs the nbd+unix scheme"));
            }
            // Drop any user info; NBD has no authentication in the URI.
            let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            Address::Tcp {
                host: host.to_string(),
                port: port.unwrap_or(DEFAULT_PORT),
            }
        };
        Ok(NbdUri { address, export })
    }
}

impl std::str::FromStr for NbdUri {
    type Err = Error;
    fn from_str(s: &str) -> Result<NbdUri> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, false);
        match &self.address {
            Address::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                if *port == DEFAULT_PORT {
                    write!(f, "nbd://{host}/{export}")
                } else {
                    write!(f, "nbd://{host}:{port}/{export}")
                }
            }
            Address::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                percent_encode(&p.to_string_lossy(), true)
            ),
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host, port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = if p.is_empty() {
                None
            } else {
                Some(p.parse().ok()?)
            };
            Some((h, port))
        }
        Some(_) => None,
        None => Some((s, None)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        let keep =
            c.is_ascii_alphanumeric() || b"-._~!$'()*+,;=:@".contains(&c) || (c == b'/' && !slash);
        if keep {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris_parse_with_default_port() {
        let u = NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap();
        assert_eq!(u, NbdUri::tcp("127.0.0.1", 10810, "disk"));
        let u = NbdUri::parse("nbd://localhost/").unwrap();
        assert_eq!(u, NbdUri::tcp("localhost", DEFAULT_PORT, ""));
        let u = NbdUri::parse("nbd://localhost").unwrap();
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:7000/a%20b/c").unwrap();
        assert_eq!(u, NbdUri::tcp("::1", 7000, "a b/c"));
        assert_eq!(u.to_string(), "nbd://[::1]:7000/a%20b/c");
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn unix_uris_need_a_socket() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
        assert_eq!(u, NbdUri::unix("/run/nbd.sock", "disk"));
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        assert!(NbdUri::parse("nbd+unix:///disk").is_err());
        assert!(NbdUri::parse("nbd+unix://host/disk?socket=/x").is_err());
        assert!(NbdUri::parse("nbd://host/disk?socket=/x").is_err());
    }

    #[test]
    fn bad_uris_are_refused() {
        for s in [
            "disk.img",
            "http://x/y",
            "nbd://:10809/x",
            "nbd://h:port/x",
            "nbd://h:99999/x",
            "nbd://h/%zz",
        ] {
            assert!(NbdUri::parse(s).is_err(), "{s}");
        }
        assert!(matches!(
            NbdUri::parse("nbds://h/x"),
            Err(Error::Incompatible(crate::Incompatible {
                feature: Feature::Tls,
                ..
            }))
        ));
        assert!(NbdUri::is_nbd_uri("nbd://h/x"));
        assert!(NbdUri::is_nbd_uri("NBD+UNIX:///x?socket=/s"));
        assert!(!NbdUri::is_nbd_uri("disk.img:/etc/hostname"));
        assert!(!NbdUri::is_nbd_uri("/tmp/nbd://x"));
    }
}
