//! TLS for NBD (`NBD_OPT_STARTTLS`, `nbds://` URIs): the client configuration from
//! a URI's TLS settings, the TLS handshake, and the encrypted link that carries the
//! rest of the connection.
//!
//! The TLS library is rustls with the ring provider: pure Rust above ring's small
//! C/assembly core, built with the C compiler alone (aws-lc-rs, the other provider,
//! needs cmake and a much longer build). rustls has no client-side pre-shared keys,
//! so `tls-psk-file` URIs are refused; nor anonymous TLS (`tls-type=anon`).
//!
//! Verification: the server's certificate must chain to `ca-cert.pem` of
//! `tls-certificates=DIR` (or to the system's trusted authorities without it), be
//! valid now, and name the URI's host (or `tls-hostname`). Over a Unix socket
//! without `tls-hostname` there is no name to check: the chain and dates still are.
//! `tls-verify-peer=0` skips verification (the link is still encrypted, and the
//! handshake signature still checked).
//!
//! One connection, two threads: the reader decrypts replies while senders encrypt
//! requests. rustls keeps one state for both directions, so it sits behind a mutex
//! held only to encrypt or decrypt, never across a socket read or write; records
//! go out in the order they were encrypted because senders hold the writer lock
//! from encryption to the end of the send.

use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};

use super::conn::Stream;
use super::uri::{Address, NbdUri, TlsOptions};
use crate::error::{Feature, TlsErrorKind};
use crate::{Error, Result};

/// Where a system keeps its trusted certificate authorities (Debian, Fedora,
/// openSUSE, Alpine).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// How much plaintext one send encrypts before it goes out.
const SEND_CHUNK: usize = 256 * 1024;

/// What a TLS connection needs: the configuration and the name to present.
pub struct Client {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// Build the client side of TLS for `uri` from its settings. Reads the certificate
/// files; touches no socket.
pub fn client(uri: &NbdUri, opts: &TlsOptions) -> Result<Client> {
    if opts.psk_file.is_some() || opts.kind.as_deref() == Some("psk") {
        return Err(Error::incompatible(
            Feature::Tls,
            "TLS with pre-shared keys (tls-psk-file) is not supported: rustls, dio's TLS \
             library, has no client-side PSK; use X.509 certificates (tls-certificates=DIR)",
        ));
    }
    if opts.kind.as_deref() == Some("anon") {
        return Err(Error::incompatible(
            Feature::Tls,
            "anonymous TLS (tls-type=anon) is not supported by rustls, dio's TLS library",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::incompatible(Feature::Tls, format!("TLS setup: {e}")))?;

    let hostname = match (&opts.hostname, &uri.address) {
        (Some(h), _) => Some(h.clone()),
        (None, Address::Tcp { host, .. }) => Some(host.clone()),
        (None, Address::Unix(_)) => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = if opts.verify_peer {
        let roots = roots(opts.certificates.as_deref())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| Error::Invalid(format!("TLS certificate authorities: {e}")))?;
        if hostname.is_some() {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        }
    } else {
        Arc::new(NoVerify(provider))
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);

    let mut config = match client_identity(opts.certificates.as_deref())? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Invalid(format!("TLS client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    let name = match hostname {
        Some(h) => ServerName::try_from(h.clone())
            .map_err(|_| Error::Invalid(format!("{h:?} is not a valid TLS host name")))?,
        None => {
            // Nothing to check a name against; send none.
            config.enable_sni = false;
            ServerName::try_from("localhost").expect("a valid name")
        }
    };
    Ok(Client {
        config: Arc::new(config),
        name,
    })
}

fn pem_error(path: &Path, e: pem::Error) -> Error {
    match e {
        pem::Error::Io(e) => Error::os(format!("read {}", path.display()), e),
        e => Error::Invalid(format!("{}: {e}", path.display())),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let list = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if list.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(list)
}

/// The authorities a server certificate must chain to: `DIR/ca-cert.pem`, or the
/// system's.
fn roots(dir: Option<&Path>) -> Result<RootCertStore> {
    let path = match dir {
        Some(d) => d.join("ca-cert.pem"),
        None => SYSTEM_CA_FILES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Invalid(
                    "no trusted certificate authorities on this system: give \
                     tls-certificates=DIR with DIR/ca-cert.pem"
                        .into(),
                )
            })?,
    };
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(&path)?);
    if added == 0 {
        return Err(Error::Invalid(format!(
            "{}: no usable CA certificate in it",
            path.display()
        )));
    }
    Ok(roots)
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client's certificate and key, `DIR/client-cert.pem` and
/// `DIR/client-key.pem`, when both are there.
fn client_identity(dir: Option<&Path>) -> Result<Option<Identity>> {
    let Some(dir) = dir else { return Ok(None) };
    let cert = dir.join("client-cert.pem");
    let key = dir.join("client-key.pem");
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, true) => {
            let chain = certificates(&cert)?;
            let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| pem_error(&key, e))?;
            Ok(Some((chain, key)))
        }
        (true, false) => Err(Error::Invalid(format!(
            "{} without {}",
            cert.display(),
            key.display()
        ))),
        (false, true) => Err(Error::Invalid(format!(
            "{} without {}",
            key.display(),
            cert.display()
        ))),
    }
}

/// Chain and dates checked, no name (a Unix socket without `tls-hostname`). The
/// name is the last thing webpki checks, so its refusal alone is forgiven.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `tls-verify-peer=0`: any certificate is taken; the handshake signature is still
/// checked (the server holds the key of the certificate it sent).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS failure as dio's error, with its kind.
pub fn error(e: &rustls::Error) -> Error {
    use CertificateError as C;
    let kind = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => TlsErrorKind::UnknownIssuer,
            C::Expired | C::ExpiredContext { .. } => TlsErrorKind::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => TlsErrorKind::NotYetValid,
            C::NotValidForName | C::NotValidForNameContext { .. } => TlsErrorKind::WrongName,
            _ => TlsErrorKind::BadCertificate,
        },
        rustls::Error::NoCertificatesPresented => TlsErrorKind::BadCertificate,
        rustls::Error::AlertReceived(_) => TlsErrorKind::PeerRejected,
        _ => TlsErrorKind::Handshake,
    };
    Error::tls(kind, format!("{kind}: {e}"))
}

/// The TLS error inside an I/O error, if there is one.
pub fn inner(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A server that drops the connection right after the TLS handshake, before it
/// sent a byte of data: with TLS 1.3 the server checks the client's certificate
/// after the client considers the handshake done, and a server that refuses it
/// (GnuTLS does so for a missing one) just closes the socket.
#[derive(Debug)]
struct DroppedAfterHandshake(io::Error);

impl std::fmt::Display for DroppedAfterHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server closed the connection right after the TLS handshake ({}): it \
             refused this client (does it want a client certificate? give \
             tls-certificates=DIR with client-cert.pem and client-key.pem)",
            self.0
        )
    }
}

impl std::error::Error for DroppedAfterHandshake {}

/// The TLS refusal an I/O error of the NBD handshake stands for, if any.
pub fn refusal(e: &io::Error) -> Option<Error> {
    if let Some(t) = inner(e) {
        return Some(error(t));
    }
    let d = e.get_ref()?.downcast_ref::<DroppedAfterHandshake>()?;
    Some(Error::tls(TlsErrorKind::PeerRejected, d.to_string()))
}

/// `e` met before any data came over TLS: a dropped connection is the server's
/// refusal.
fn early(e: io::Error, received: bool) -> io::Error {
    let dropped = matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    );
    if dropped && !received {
        io::Error::new(e.kind(), DroppedAfterHandshake(e))
    } else {
        e
    }
}

fn lock(m: &Mutex<ClientConnection>) -> MutexGuard<'_, ClientConnection> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run the TLS handshake on `sock` (after the server agreed to
/// `NBD_OPT_STARTTLS`).
pub fn handshake(mut sock: Stream, client: Client) -> Result<TlsLink> {
    let mut conn = ClientConnection::new(client.config, client.name).map_err(|e| error(&e))?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Err(match inner(&e) {
                Some(t) => error(t),
                None => Error::os("NBD TLS handshake", e),
            });
        }
    }
    // Senders encrypt a bounded chunk and send it at once; no limit is needed.
    conn.set_buffer_limit(None);
    Ok(TlsLink {
        sock,
        conn: Arc::new(Mutex::new(conn)),
        raw: vec![0u8; 64 * 1024].into_boxed_slice(),
        start: 0,
        end: 0,
        eof: false,
        received: false,
        out: Vec::new(),
    })
}

/// One end of an encrypted connection: the socket, the shared TLS state, and (for
/// the end that reads) the ciphertext read but not yet decrypted.
pub struct TlsLink {
    sock: Stream,
    conn: Arc<Mutex<ClientConnection>>,
    raw: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    /// Data came from the server since the TLS handshake.
    received: bool,
    /// Ciphertext of one send.
    out: Vec<u8>,
}

impl TlsLink {
    /// The socket under the link.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// A second end for sending only (this end keeps the ciphertext it has read).
    pub fn sender(&self) -> io::Result<TlsLink> {
        Ok(TlsLink {
            sock: self.sock.try_clone()?,
            conn: Arc::clone(&self.conn),
            raw: Box::new([]),
            start: 0,
            end: 0,
            eof: false,
            received: true,
            out: Vec::new(),
        })
    }

    /// Tell the server the connection ends (a `close_notify` alert).
    pub fn close_notify(&mut self) -> io::Result<()> {
        {
            let mut c = lock(&self.conn);
            c.send_close_notify();
            drain(&mut c, &mut self.out)?;
        }
        self.sock.write_all(&self.out)
    }
}

/// Move every encrypted record out of the TLS state into `out`.
fn drain(c: &mut ClientConnection, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    while c.wants_write() {
        c.write_tls(out)?;
    }
    Ok(())
}

impl Read for TlsLink {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.decrypt(buf) {
            Ok(n) => {
                self.received |= n > 0;
                Ok(n)
            }
            Err(e) => Err(early(e, self.received)),
        }
    }
}

impl TlsLink {
    fn decrypt(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut c = lock(&self.conn);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end || self.eof {
                    let n = c.read_tls(&mut &self.raw[self.start..self.end])?;
                    self.start += n;
                    if let Err(e) = c.process_new_packets() {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    if n == 0 && self.eof {
                        // The EOF is recorded; the plaintext reader now says whether
                        // the close was clean.
                        return match c.reader().read(buf) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                Err(io::ErrorKind::UnexpectedEof.into())
                            }
                            r => r,
                        };
                    }
                    continue;
                }
            }
            // Nothing to decrypt: read the socket, without the lock (senders keep
            // sending meanwhile). Timeouts go up to the caller's patience.
            match self.sock.read(&mut self.raw) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.start = 0;
                    self.end = n;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for TlsLink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Encrypt up to [`SEND_CHUNK`] bytes of `bufs` and send all of it: a partly
    /// sent record would leave the connection unusable, so a failed send is final.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut taken = 0;
        {
            let mut c = lock(&self.conn);
            for b in bufs {
                let n = b.len().min(SEND_CHUNK - taken);
                c.writer().write_all(&b[..n])?;
                taken += n;
                if taken == SEND_CHUNK {
                    break;
                }
            }
            drain(&mut c, &mut self.out)?;
        }
        if let Err(e) = self.sock.write_all(&self.out) {
            return Err(early(e, self.received));
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
