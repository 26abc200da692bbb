//! NBD URIs, as libnbd and qemu write them (the NBD URI standard): `nbd://HOST[:PORT]/EXPORT`
//! for TCP and `nbd+unix:///EXPORT?socket=PATH` for a Unix socket; `nbds://` and
//! `nbds+unix://` for the same over TLS, with the TLS query parameters
//! `tls-certificates=DIR`, `tls-psk-file=FILE` (the URI's user is the PSK identity),
//! `tls-hostname=NAME`, `tls-verify-peer=0|1` and `tls-type=x509|psk|anon`.

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

/// A parsed NBD URI: the server address, the export name, and TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: Address,
    /// The export name (percent-decoded; empty for the default export).
    pub export: String,
    /// TLS is required (`nbds` schemes), with these settings; `None` for plaintext.
    pub tls: Option<TlsOptions>,
}

/// How to authenticate a TLS connection (`nbds://`): TLS is then required, and a
/// server without it is refused, never used in plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct TlsOptions {
    /// `tls-certificates=DIR`: `ca-cert.pem` (the authority the server's certificate
    /// must chain to) and, when both exist, `client-cert.pem` and `client-key.pem`
    /// (the client's certificate), the layout nbdkit and qemu use. Without it the
    /// system's trusted authorities are used.
    pub certificates: Option<PathBuf>,
    /// `tls-psk-file=FILE`: a pre-shared key file (`identity:hexkey` lines).
    pub psk_file: Option<PathBuf>,
    /// The URI's user: the PSK identity.
    pub username: Option<String>,
    /// `tls-hostname=NAME`: the name the server's certificate must carry, instead
    /// of the URI's host (the only way to check a name over a Unix socket).
    pub hostname: Option<String>,
    /// `tls-verify-peer` (default on): check the server's certificate. Off, any
    /// certificate is taken: the link is encrypted but the server unauthenticated.
    pub verify_peer: bool,
    /// `tls-type=x509|psk|anon`, if given.
    pub kind: Option<String>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            certificates: None,
            psk_file: None,
            username: None,
            hostname: None,
            verify_peer: true,
            kind: None,
        }
    }
}

impl TlsOptions {
    /// X.509 with the certificates in `dir` (see [`TlsOptions::certificates`]).
    pub fn certificates(dir: impl Into<PathBuf>) -> TlsOptions {
        TlsOptions {
            certificates: Some(dir.into()),
            ..TlsOptions::default()
        }
    }
    /// Check the server's certificate or not.
    pub fn verify_peer(mut self, on: bool) -> TlsOptions {
        self.verify_peer = on;
        self
    }
    /// The name the server's certificate must carry.
    pub fn hostname(mut self, name: impl Into<String>) -> TlsOptions {
        self.hostname = Some(name.into());
        self
    }
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
            tls: None,
        }
    }

    /// A Unix socket address.
    pub fn unix(socket: impl Into<PathBuf>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            address: Address::Unix(socket.into()),
            export: export.into(),
            tls: None,
        }
    }

    /// The same export over TLS with `tls` settings.
    pub fn with_tls(mut self, tls: TlsOptions) -> NbdUri {
        self.tls = Some(tls);
        self
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

    /// Parse `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...`,
    /// `nbd+unix:///EXPORT?socket=PATH`, or the same with an `nbds` scheme and TLS
    /// parameters (see the module docs). The export name is the percent-decoded
    /// path without its leading `/`; IPv6 hosts are written in brackets.
    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::Invalid(format!("bad NBD URI {s:?}: {why}"));
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("expected nbd://HOST[:PORT]/EXPORT"))?;
        let scheme = scheme.to_ascii_lowercase();
        let (unix, tls) = match scheme.as_str() {
            "nbd" | "nbd+tcp" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" | "nbds+tcp" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(bad("the scheme must be nbd, nbds, nbd+unix or nbds+unix")),
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
        let mut opts = TlsOptions::default();
        let mut tls_params = false;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| bad(&format!("bad percent escape in {k}")))?;
            if k.starts_with("tls-") {
                tls_params = true;
            }
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "tls-certificates" => opts.certificates = Some(PathBuf::from(v)),
                "tls-psk-file" => opts.psk_file = Some(PathBuf::from(v)),
                "tls-hostname" => opts.hostname = Some(v),
                "tls-type" => match v.as_str() {
                    "x509" | "psk" | "anon" => opts.kind = Some(v),
                    _ => return Err(bad("tls-type must be x509, psk or anon")),
                },
                "tls-verify-peer" => {
                    opts.verify_peer = match v.to_ascii_lowercase().as_str() {
                        "1" | "true" | "yes" | "on" => true,
                        "0" | "false" | "no" | "off" => false,
                        _ => return Err(bad("tls-verify-peer must be 0 or 1")),
                    }
                }
                k if k.starts_with("tls-") => {
                    return Err(bad(&format!("unknown TLS parameter {k}")));
                }
                _ => {}
            }
        }
        if tls_params && !tls {
            return Err(bad(
                "TLS parameters need a TLS scheme (nbds:// or nbds+unix://)",
            ));
        }
        if opts.certificates.is_some() && opts.psk_file.is_some() {
            return Err(bad("tls-certificates and tls-psk-file exclude each other"));
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if let Some(u) = userinfo {
            if tls {
                let u = u.split_once(':').map_or(u, |(name, _)| name);
                opts.username =
                    Some(percent_decode(u).ok_or_else(|| bad("bad percent escape in user"))?);
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    "a Unix-socket scheme takes no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            Address::Unix(socket.ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(bad("?socket= needs the nbd+unix scheme"));
            }
            // Without TLS the user info means nothing to NBD and is dropped.
            let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            Address::Tcp {
                host: host.to_string(),
                port: port.unwrap_or(DEFAULT_PORT),
            }
        };
        Ok(NbdUri {
            address,
            export,
            tls: tls.then_some(opts),
        })
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
        let s = if self.tls.is_some() { "s" } else { "" };
        let mut query = Vec::new();
        match &self.address {
            Address::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                let user = match self.tls.as_ref().and_then(|t| t.username.as_deref()) {
                    Some(u) => format!("{}@", encode_strict(u)),
                    None => String::new(),
                };
                if *port == DEFAULT_PORT {
                    write!(f, "nbd{s}://{user}{host}/{export}")?;
                } else {
                    write!(f, "nbd{s}://{user}{host}:{port}/{export}")?;
                }
            }
            Address::Unix(p) => {
                write!(f, "nbd{s}+unix:///{export}")?;
                query.push(format!(
                    "socket={}",
                    percent_encode(&p.to_string_lossy(), true)
                ));
            }
        }
        if let Some(t) = &self.tls {
            let path = |p: &PathBuf| percent_encode(&p.to_string_lossy(), true);
            if let Some(d) = &t.certificates {
                query.push(format!("tls-certificates={}", path(d)));
            }
            if let Some(p) = &t.psk_file {
                query.push(format!("tls-psk-file={}", path(p)));
            }
            if let Some(h) = &t.hostname {
                query.push(format!("tls-hostname={}", percent_encode(h, true)));
            }
            if let Some(k) = &t.kind {
                query.push(format!("tls-type={k}"));
            }
            if !t.verify_peer {
                query.push("tls-verify-peer=0".into());
            }
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
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

/// Everything but unreserved characters escaped (for the user part).
fn encode_strict(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
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
    fn tls_uris_parse_and_print_back() {
        let u = NbdUri::parse("nbds://localhost:10810/disk?tls-certificates=/etc/pki/nbd").unwrap();
        assert_eq!(
            u,
            NbdUri::tcp("localhost", 10810, "disk")
                .with_tls(TlsOptions::certificates("/etc/pki/nbd"))
        );
        assert_eq!(
            u.to_string(),
            "nbds://localhost:10810/disk?tls-certificates=%2Fetc%2Fpki%2Fnbd"
        );
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);

        let u = NbdUri::parse("nbds://alice@h/x?tls-psk-file=/k.psk").unwrap();
        let t = u.tls.clone().unwrap();
        assert_eq!(t.username.as_deref(), Some("alice"));
        assert_eq!(t.psk_file.as_deref(), Some(std::path::Path::new("/k.psk")));
        assert!(t.verify_peer);
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);

        let u = NbdUri::parse(
            "nbds+unix:///x?socket=/run/s&tls-certificates=/d&tls-verify-peer=false&tls-hostname=srv",
        )
        .unwrap();
        assert_eq!(u.address, Address::Unix("/run/s".into()));
        let t = u.tls.clone().unwrap();
        assert!(!t.verify_peer);
        assert_eq!(t.hostname.as_deref(), Some("srv"));
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);

        // Plain URIs stay plain, and drop a user.
        let u = NbdUri::parse("nbd://bob@h/x").unwrap();
        assert_eq!(u, NbdUri::tcp("h", DEFAULT_PORT, "x"));
        assert_eq!(u.to_string(), "nbd://h/x");
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
        for s in [
            "nbd://h/x?tls-certificates=/d",
            "nbds://h/x?tls-verify-peer=maybe",
            "nbds://h/x?tls-colour=blue",
            "nbds://h/x?tls-certificates=/d&tls-psk-file=/k",
            "nbds://h/x?tls-type=kerberos",
            "nbds+unix:///x",
        ] {
            assert!(matches!(NbdUri::parse(s), Err(Error::Invalid(_))), "{s}");
        }
        assert!(NbdUri::is_nbd_uri("nbd://h/x"));
        assert!(NbdUri::is_nbd_uri("NBD+UNIX:///x?socket=/s"));
        assert!(!NbdUri::is_nbd_uri("disk.img:/etc/hostname"));
        assert!(!NbdUri::is_nbd_uri("/tmp/nbd://x"));
    }
}
