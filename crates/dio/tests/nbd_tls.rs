//! NBD over TLS against real servers on loopback: nbdkit `--tls=require` and
//! qemu-nbd with `tls-creds-x509`, with certificates made here by `openssl` (a CA,
//! a server certificate for localhost and 127.0.0.1, a client certificate, and the
//! bad ones: another CA, an expired certificate, one for another host).
//!
//! Reads and writes are compared byte for byte with the server's backing file; each
//! refusal is checked by its type (TLS error kind or incompatible feature), and its
//! message printed. Tests skip with a printed reason when nbdkit, qemu-nbd or
//! openssl is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use dio::nbd::{Address, NbdConfig, NbdFile, NbdUri, TlsOptions};
use dio::{AlignedBuf, Error, Feature, Flags, Incompatible, TlsErrorKind};
use dio_testkit::{free_port, Listen, ServerProcess};

const MIB: usize = 1 << 20;

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Skip (return from the test) with a printed reason if a tool is missing.
macro_rules! need {
    ($($tool:expr),+) => {
        $(
            let arg = if $tool == "openssl" { "version" } else { "--version" };
            if !have($tool, arg) {
                eprintln!("skipped: {} is not installed", $tool);
                return;
            }
        )+
        if !nbdkit_has_tls() {
            eprintln!("skipped: nbdkit was built without TLS");
            return;
        }
    };
}

fn nbdkit_has_tls() -> bool {
    Command::new("nbdkit")
        .arg("--dump-config")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == "tls=yes")
        })
}

fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "tls-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The certificates of this test binary, made once.
struct Pki {
    root: PathBuf,
}

impl Pki {
    fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(Pki::make)
    }

    fn make() -> Pki {
        // One directory, made anew by each run (not one per process left behind).
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nbd-tls-pki");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let w = |name: &str, text: &str| std::fs::write(root.join(name), text).unwrap();
        let key = |name: &str| {
            run(
                &root,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    name,
                ],
            )
        };
        for ca in ["ca", "ca2"] {
            key(&format!("{ca}-key.pem"));
            run(
                &root,
                &[
                    "req",
                    "-x509",
                    "-new",
                    "-key",
                    &format!("{ca}-key.pem"),
                    "-out",
                    &format!("{ca}-cert.pem"),
                    "-days",
                    "30",
                    "-subj",
                    &format!("/CN=dio test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        }
        w(
            "server.ext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        );
        w(
            "other.ext",
            "subjectAltName=DNS:other.example\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        );
        w(
            "client.ext",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        );
        // `openssl ca` is the one way (before OpenSSL 3.4) to set a validity in
        // the past: the expired certificate.
        std::fs::create_dir_all(root.join("cadb")).unwrap();
        w("cadb/index.txt", "");
        w("cadb/serial", "1000\n");
        w(
            "ca.cnf",
            "[ca]\ndefault_ca=d\n[d]\ndatabase=cadb/index.txt\nnew_certs_dir=cadb\n\
             serial=cadb/serial\ndefault_md=sha256\npolicy=p\nunique_subject=no\n\
             [p]\ncommonName=supplied\n",
        );
        for (name, cn) in [("server", "localhost"), ("client", "dio client")] {
            key(&format!("{name}-key.pem"));
            run(
                &root,
                &[
                    "req",
                    "-new",
                    "-key",
                    &format!("{name}-key.pem"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
        }
        let sign = |csr: &str, ca: &str, ext: &str, out: &str| {
            run(
                &root,
                &[
                    "x509",
                    "-req",
                    "-in",
                    csr,
                    "-CA",
                    &format!("{ca}-cert.pem"),
                    "-CAkey",
                    &format!("{ca}-key.pem"),
                    "-CAcreateserial",
                    "-days",
                    "30",
                    "-extfile",
                    ext,
                    "-out",
                    out,
                ],
            )
        };
        sign("server.csr", "ca", "server.ext", "server-cert.pem");
        sign("server.csr", "ca", "other.ext", "other-cert.pem");
        sign("client.csr", "ca", "client.ext", "client-cert.pem");
        run(
            &root,
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                "ca.cnf",
                "-cert",
                "ca-cert.pem",
                "-keyfile",
                "ca-key.pem",
                "-in",
                "server.csr",
                "-out",
                "expired-cert.pem",
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
                "-extfile",
                "server.ext",
            ],
        );
        let pki = Pki { root };
        // The layouts servers and clients read: DIR/{ca-cert,server-cert,server-key}.pem
        // and DIR/{ca-cert,client-cert,client-key}.pem.
        for (dir, files) in [
            (
                "srv",
                [
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("server-cert.pem", "server-cert.pem"),
                ],
            ),
            (
                "srv-expired",
                [
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("server-cert.pem", "expired-cert.pem"),
                ],
            ),
            (
                "srv-other",
                [
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("server-cert.pem", "other-cert.pem"),
                ],
            ),
            (
                "cli",
                [
                    ("client-cert.pem", "client-cert.pem"),
                    ("client-key.pem", "client-key.pem"),
                ],
            ),
        ] {
            pki.lay(dir, &files);
        }
        for dir in ["srv", "srv-expired", "srv-other"] {
            pki.lay(dir, &[("server-key.pem", "server-key.pem")]);
        }
        pki.lay("cli", &[("ca-cert.pem", "ca-cert.pem")]);
        pki.lay("ca-only", &[("ca-cert.pem", "ca-cert.pem")]);
        pki.lay("wrong-ca", &[("ca-cert.pem", "ca2-cert.pem")]);
        pki
    }

    fn lay(&self, dir: &str, files: &[(&str, &str)]) {
        let d = self.root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        for (to, from) in files {
            std::fs::copy(self.root.join(from), d.join(to)).unwrap();
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// A server process, killed and reaped on drop, with its scratch directory.
struct Server {
    proc: ServerProcess,
    dir: PathBuf,
    port: u16,
    sock: PathBuf,
    backing: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bytes of the backing file the servers export (a pattern, 8 MiB).
fn content() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..8 * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Server {
    /// Start a server on TCP 127.0.0.1 and a Unix socket (`tcp` picks which) that
    /// exports a fresh backing file; wait until it listens.
    fn start(name: &str, tcp: bool, build: impl FnOnce(&Path, u16, &Path) -> Command) -> Server {
        let dir = scratch(name);
        let backing = dir.join("disk.img");
        std::fs::write(&backing, content()).unwrap();
        let port = if tcp { free_port() } else { 0 };
        let sock = dir.join("s");
        let cmd = build(&backing, port, &sock);
        let proc = if tcp {
            ServerProcess::start(cmd, Listen::Tcp(port))
        } else {
            ServerProcess::start(cmd, Listen::Unix(&sock))
        };
        Server {
            proc,
            dir,
            port,
            sock,
            backing,
        }
    }

    /// nbdkit's file plugin with `tls` arguments (`--tls=require`, ...).
    fn nbdkit(name: &str, tcp: bool, tls: &[String]) -> Server {
        let tls = tls.to_vec();
        Server::start(name, tcp, move |backing, port, sock| {
            let mut cmd = Command::new("nbdkit");
            cmd.args(["-f", "--exit-with-parent"]);
            if tcp {
                cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
            } else {
                cmd.arg("-U").arg(sock);
            }
            cmd.args(&tls).arg("file").arg(backing);
            cmd
        })
    }

    fn tcp_uri(&self, host: &str, tls: TlsOptions) -> NbdUri {
        NbdUri::tcp(host, self.port, "").with_tls(tls)
    }

    fn unix_uri(&self, tls: TlsOptions) -> NbdUri {
        NbdUri::unix(&self.sock, "").with_tls(tls)
    }
}

fn tls_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--tls=require".to_string(),
        format!("--tls-certificates={}", dir.display()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn cfg() -> NbdConfig {
    NbdConfig::default().timeout(Duration::from_secs(10))
}

fn read_all(f: &NbdFile) -> Vec<u8> {
    let size = f.size() as usize;
    let mut buf = AlignedBuf::new(size, 4096);
    let mut done = 0;
    while done < size {
        let end = (done + 4 * MIB).min(size);
        let n = f
            .direct()
            .read_at(done as u64, &mut buf[done..end], Flags::NONE)
            .unwrap();
        assert!(n > 0);
        done += n;
    }
    buf[..].to_vec()
}

/// Read the whole export and compare it with the backing file; write a few
/// blocks (aligned and not), flush, and find them in the backing file.
fn check_io(srv: &Server, uri: &NbdUri) {
    let f = NbdFile::open(uri, true, &cfg()).unwrap_or_else(|e| panic!("{uri}: {e}"));
    assert_eq!(f.size() as usize, 8 * MIB);
    assert!(
        read_all(&f) == std::fs::read(&srv.backing).unwrap(),
        "{uri}: read"
    );
    let mut model = std::fs::read(&srv.backing).unwrap();
    for (i, &(off, len)) in [
        (0usize, 4096usize),
        (MIB + 512, 3 * MIB),
        (8 * MIB - 4096, 4096),
    ]
    .iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13 + 1) as u8).collect();
        let mut buf = AlignedBuf::new(len, 4096);
        buf.copy_from_slice(&data);
        let n = f.direct().write_at(off as u64, &buf, Flags::NONE).unwrap();
        assert_eq!(n, len);
        model[off..off + len].copy_from_slice(&data);
    }
    f.direct().sync_data().unwrap();
    assert!(read_all(&f) == model, "{uri}: read after write");
    drop(f);
    assert!(
        std::fs::read(&srv.backing).unwrap() == model,
        "{uri}: backing file"
    );
}

fn open_err(uri: &NbdUri) -> Error {
    match NbdFile::open(uri, false, &cfg()) {
        Ok(_) => panic!("{uri}: connected, but should have been refused"),
        Err(e) => {
            eprintln!("refused as expected: {e}");
            e
        }
    }
}

fn tls_kind(e: &Error) -> Option<TlsErrorKind> {
    e.tls_kind()
}

fn is_incompatible_tls(e: &Error) -> bool {
    matches!(
        e,
        Error::Incompatible(Incompatible {
            feature: Feature::Tls,
            ..
        })
    )
}

#[test]
fn nbdkit_tls_reads_and_writes_byte_exact_over_tcp_and_unix() {
    need!("nbdkit", "openssl");
    let pki = Pki::get();
    let srv = Server::nbdkit("tcp", true, &tls_args(&pki.dir("srv"), &[]));
    // Name checked against the certificate's DNS and IP names.
    check_io(
        &srv,
        &srv.tcp_uri("localhost", TlsOptions::certificates(pki.dir("cli"))),
    );
    check_io(
        &srv,
        &srv.tcp_uri("127.0.0.1", TlsOptions::certificates(pki.dir("ca-only"))),
    );
    // The URI string as nbdcopy takes it.
    let s = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        srv.port,
        pki.dir("ca-only").display()
    );
    check_io(&srv, &NbdUri::parse(&s).unwrap());

    let srv = Server::nbdkit("unix", false, &tls_args(&pki.dir("srv"), &[]));
    check_io(
        &srv,
        &srv.unix_uri(TlsOptions::certificates(pki.dir("ca-only"))),
    );
    check_io(
        &srv,
        &srv.unix_uri(TlsOptions::certificates(pki.dir("ca-only")).hostname("localhost")),
    );
}

#[test]
fn nbdkit_requiring_client_certificates_takes_ours_and_refuses_none() {
    need!("nbdkit", "openssl");
    let pki = Pki::get();
    let srv = Server::nbdkit(
        "verify",
        false,
        &tls_args(&pki.dir("srv"), &["--tls-verify-peer"]),
    );
    check_io(
        &srv,
        &srv.unix_uri(TlsOptions::certificates(pki.dir("cli"))),
    );
    let e = open_err(&srv.unix_uri(TlsOptions::certificates(pki.dir("ca-only"))));
    assert_eq!(tls_kind(&e), Some(TlsErrorKind::PeerRejected), "{e:?}");
}

#[test]
fn qemu_nbd_with_x509_credentials_serves_over_tls() {
    need!("qemu-nbd", "openssl");
    let pki = Pki::get();
    let srv = Server::start("qemu", true, |backing, port, _| {
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on",
            pki.dir("srv").display()
        ));
        cmd.args([
            "--tls-creds",
            "tls0",
            "--persistent",
            "--shared=4",
            "-f",
            "raw",
        ]);
        cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
        cmd.arg(backing);
        cmd
    });
    check_io(
        &srv,
        &srv.tcp_uri("localhost", TlsOptions::certificates(pki.dir("cli"))),
    );
    // qemu-nbd asks for a client certificate (verify-peer=on): without one, refused.
    let e = open_err(&srv.tcp_uri("localhost", TlsOptions::certificates(pki.dir("ca-only"))));
    assert_eq!(tls_kind(&e), Some(TlsErrorKind::PeerRejected), "{e:?}");
}

#[test]
fn bad_certificates_are_refused_with_their_reason() {
    need!("nbdkit", "openssl");
    let pki = Pki::get();
    let srv = Server::nbdkit("good", true, &tls_args(&pki.dir("srv"), &[]));
    // A CA that did not sign the server's certificate.
    let e = open_err(&srv.tcp_uri("localhost", TlsOptions::certificates(pki.dir("wrong-ca"))));
    assert_eq!(tls_kind(&e), Some(TlsErrorKind::UnknownIssuer), "{e:?}");
    // A name the certificate does not carry.
    let e = open_err(&srv.tcp_uri(
        "localhost",
        TlsOptions::certificates(pki.dir("ca-only")).hostname("other.example"),
    ));
    assert_eq!(tls_kind(&e), Some(TlsErrorKind::WrongName), "{e:?}");
    // Verification off: the wrong CA is taken (encrypted, unauthenticated).
    check_io(
        &srv,
        &srv.tcp_uri(
            "localhost",
            TlsOptions::certificates(pki.dir("wrong-ca")).verify_peer(false),
        ),
    );

    let srv = Server::nbdkit("expired", true, &tls_args(&pki.dir("srv-expired"), &[]));
    let e = open_err(&srv.tcp_uri("localhost", TlsOptions::certificates(pki.dir("ca-only"))));
    assert_eq!(tls_kind(&e), Some(TlsErrorKind::Expired), "{e:?}");

    let srv = Server::nbdkit("other", true, &tls_args(&pki.dir("srv-other"), &[]));
    let e = open_err(&srv.tcp_uri("localhost", TlsOptions::certificates(pki.dir("ca-only"))));
    assert_eq!(tls_kind(&e), Some(TlsErrorKind::WrongName), "{e:?}");
    // Its own name passes.
    check_io(
        &srv,
        &srv.tcp_uri(
            "localhost",
            TlsOptions::certificates(pki.dir("ca-only")).hostname("other.example"),
        ),
    );
}

#[test]
fn no_plaintext_fallback_and_no_plaintext_to_a_tls_server() {
    need!("nbdkit", "openssl");
    let pki = Pki::get();
    // A server without TLS, asked for nbds: refused, never plaintext.
    let plain = Server::nbdkit("plain", false, &["--tls=off".to_string()]);
    let e = open_err(&plain.unix_uri(TlsOptions::certificates(pki.dir("ca-only"))));
    assert!(is_incompatible_tls(&e), "{e:?}");
    // A server that requires TLS, asked in plaintext: refused, saying TLS is needed.
    let tls = Server::nbdkit("reqd", false, &tls_args(&pki.dir("srv"), &[]));
    let e = open_err(&NbdUri::unix(&tls.sock, ""));
    assert!(is_incompatible_tls(&e), "{e:?}");
}

#[test]
fn psk_and_anonymous_tls_are_refused_before_connecting() {
    // rustls has no client-side PSK nor anonymous TLS: refused as unsupported,
    // before any connection (nothing listens on this socket).
    let sock = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-nbd-socket");
    for s in [
        format!(
            "nbds+unix:///?socket={}&tls-psk-file=/etc/keys.psk",
            sock.display()
        ),
        "nbds://alice@localhost:1/?tls-psk-file=/etc/keys.psk".to_string(),
        format!("nbds+unix:///?socket={}&tls-type=anon", sock.display()),
    ] {
        let uri = NbdUri::parse(&s).unwrap();
        assert!(uri.tls.is_some());
        if let Address::Tcp { .. } = uri.address {
            assert_eq!(uri.tls.as_ref().unwrap().username.as_deref(), Some("alice"));
        }
        let e = open_err(&uri);
        assert!(is_incompatible_tls(&e), "{s}: {e:?}");
    }
}

#[test]
fn many_requests_from_many_threads_share_one_tls_connection() {
    need!("nbdkit", "openssl");
    let pki = Pki::get();
    let srv = Server::nbdkit("threads", false, &tls_args(&pki.dir("srv"), &[]));
    let f = std::sync::Arc::new(
        NbdFile::open(
            &srv.unix_uri(TlsOptions::certificates(pki.dir("ca-only"))),
            true,
            &cfg(),
        )
        .unwrap(),
    );
    let before = std::fs::read(&srv.backing).unwrap();
    // Four writers, each in its own 2 MiB quarter, with reads in flight meanwhile:
    // TLS records of every thread interleave on one socket in both directions.
    let writers: Vec<_> = (0..4usize)
        .map(|t| {
            let f = std::sync::Arc::clone(&f);
            thread::spawn(move || {
                let base = t * 2 * MIB;
                let mut model = vec![0u8; 2 * MIB];
                let mut written = vec![false; 2 * MIB];
                for i in 0..64usize {
                    let len = 4096 * (1 + (i * 7 + t) % 16);
                    let off = (i * 24_576 + t * 4096) % (2 * MIB - len) / 4096 * 4096;
                    let mut buf = AlignedBuf::new(len, 4096);
                    buf.iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = (j + i + t * 31) as u8);
                    model[off..off + len].copy_from_slice(&buf);
                    written[off..off + len].fill(true);
                    let futs: Vec<_> = (0..4u64)
                        .map(|k| {
                            f.direct().read_future(
                                (k * 2 * MIB as u64 + 65536 * (i as u64 % 8)) % (8 * MIB as u64),
                                vec![AlignedBuf::new(65536, 4096)],
                                Flags::NONE,
                            )
                        })
                        .collect();
                    let n = f
                        .direct()
                        .write_at((base + off) as u64, &buf, Flags::NONE)
                        .unwrap();
                    assert_eq!(n, len);
                    for fut in futs {
                        assert_eq!(fut.wait().result.unwrap(), 65536);
                    }
                }
                (base, model, written)
            })
        })
        .collect();
    // What the export must hold: the old bytes, with each writer's last writes.
    let mut expect = before;
    for w in writers {
        let (base, model, written) = w.join().unwrap();
        for j in (0..model.len()).filter(|&j| written[j]) {
            expect[base + j] = model[j];
        }
    }
    f.direct().sync_data().unwrap();
    let got = read_all(&f);
    drop(f);
    assert!(got == expect, "read back over TLS");
    assert!(
        std::fs::read(&srv.backing).unwrap() == expect,
        "the backing file"
    );
}
