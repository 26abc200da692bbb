//! The fixed-newstyle handshake, one function per phase: the greeting
//! ([`greet`]), structured replies ([`structured_replies`]), the `base:allocation`
//! metadata context ([`meta_context`]), then `NBD_OPT_GO` with block-size
//! information, or `NBD_OPT_EXPORT_NAME` for servers without `NBD_OPT_GO` ([`go`]),
//! and the checks of what the server announced ([`check`]).
//!
//! Everything the server sends here is checked before use: magic numbers, option
//! echoes, payload lengths (bounded), and the export's size and block sizes.

use crate::error::Feature;
use std::io::{self, Read, Write};

use super::proto::*;
use crate::{Error, Result};

/// Option reply payloads larger than this are refused (a sane server sends a few
/// dozen bytes; the spec caps its strings at 4096).
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// Replies to one option beyond this many are refused: a server cannot keep the
/// client in one option forever.
const MAX_REPLIES: usize = 1024;

/// What negotiation settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block sizes the server announced (minimum, preferred, maximum), if any.
    pub block_sizes: Option<BlockSizes>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, if negotiated.
    pub allocation_context: Option<u32>,
}

/// Block sizes a server announces: minimum, preferred, maximum.
pub type BlockSizes = (u32, u32, u32);

/// What to ask for.
pub struct Wants<'a> {
    pub export: &'a str,
    pub structured: bool,
    pub block_status: bool,
}

fn wire(e: io::Error) -> Error {
    // Over TLS, a refusal (a certificate the server will not take) shows up as
    // the first read after the TLS handshake.
    match super::tls::refusal(&e) {
        Some(t) => t,
        None => Error::os("NBD handshake", e),
    }
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::incompatible(Feature::Nbd, format!("NBD handshake: {what}"))
}

fn read_array<const N: usize>(s: &mut impl Read) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).map_err(wire)?;
    Ok(b)
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| corrupt("option too long"))?;
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).map_err(wire)
}

/// One option reply: its type and payload.
fn read_reply(s: &mut impl Read, option: u32) -> Result<(u32, Vec<u8>)> {
    let h: [u8; 20] = read_array(s)?;
    if be64(&h, 0) != OPT_REPLY_MAGIC {
        return Err(corrupt(format!(
            "bad option reply magic {:#x}",
            be64(&h, 0)
        )));
    }
    if be32(&h, 8) != option {
        return Err(corrupt(format!(
            "reply to option {} while {option} was asked",
            be32(&h, 8)
        )));
    }
    let ty = be32(&h, 12);
    let len = be32(&h, 16);
    if len > MAX_OPTION_REPLY {
        return Err(corrupt(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).map_err(wire)?;
    Ok((ty, data))
}

/// The message of an option error reply, for humans.
fn refusal(what: &str, ty: u32, data: &[u8]) -> String {
    let msg = String::from_utf8_lossy(data);
    let msg = msg.trim();
    if msg.is_empty() {
        format!("{what}: {}", rep_error_name(ty))
    } else {
        format!("{what}: {} ({msg})", rep_error_name(ty))
    }
}

fn name_field(export: &str) -> Result<Vec<u8>> {
    if export.len() > 4096 {
        return Err(Error::Invalid(
            "NBD export name longer than 4096 bytes".into(),
        ));
    }
    let mut d = Vec::with_capacity(4 + export.len());
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    Ok(d)
}

/// What the server's greeting settled.
#[derive(Debug, Clone, Copy)]
pub struct Greeting {
    /// The server skips the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Phase 1: the server's greeting (magic numbers, handshake flags) and the
/// client's flags.
pub fn greet<S: Read + Write>(s: &mut S) -> Result<Greeting> {
    let h: [u8; 18] = read_array(s)?;
    if be64(&h, 0) != INIT_MAGIC {
        return Err(corrupt("not an NBD server (no NBDMAGIC)"));
    }
    match be64(&h, 8) {
        OPT_MAGIC => {}
        OLDSTYLE_MAGIC => return Err(corrupt("old-style handshake is not supported")),
        m => return Err(corrupt(format!("unknown handshake magic {m:#x}"))),
    }
    let server_flags = be16(&h, 16);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(corrupt("server does not speak fixed newstyle"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let mut client_flags = CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= CLIENT_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).map_err(wire)?;
    Ok(Greeting { no_zeroes })
}

/// Phase 1b, for TLS: `NBD_OPT_STARTTLS`. The server must agree; a refusal is an
/// error (an `nbds` URI never falls back to plaintext). The TLS handshake follows
/// on the same socket.
pub fn starttls<S: Read + Write>(s: &mut S) -> Result<()> {
    send_option(s, OPT_STARTTLS, &[])?;
    let (ty, data) = read_reply(s, OPT_STARTTLS)?;
    match ty {
        REP_ACK if data.is_empty() => Ok(()),
        REP_ACK => Err(corrupt("NBD_OPT_STARTTLS acknowledged with a payload")),
        t if t & REP_ERR_BIT != 0 => Err(Error::incompatible(
            Feature::Tls,
            refusal(
                "the server does not offer TLS (NBD_OPT_STARTTLS refused); an nbds URI \
                 never falls back to plaintext",
                t,
                &data,
            ),
        )),
        t => Err(corrupt(format!("reply type {t} to NBD_OPT_STARTTLS"))),
    }
}

/// Phases 2 to 4, after the greeting (and after TLS, when it is used): the options
/// asked for, then the export.
pub fn options<S: Read + Write>(
    s: &mut S,
    wants: &Wants<'_>,
    greeting: Greeting,
) -> Result<Export> {
    let structured = wants.structured && structured_replies(s)?;
    let allocation_context = if structured && wants.block_status {
        meta_context(s, wants.export)?
    } else {
        None
    };
    let (size, flags, block_sizes) = go(s, wants.export, greeting)?;
    check(Export {
        size,
        flags,
        block_sizes,
        structured,
        allocation_context,
    })
}

/// Phase 2: `NBD_OPT_STRUCTURED_REPLY`. Whether the server agreed.
pub fn structured_replies<S: Read + Write>(s: &mut S) -> Result<bool> {
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    for _ in 0..MAX_REPLIES {
        let (ty, _) = read_reply(s, OPT_STRUCTURED_REPLY)?;
        match ty {
            REP_ACK => return Ok(true),
            t if t & REP_ERR_BIT != 0 => return Ok(false),
            _ => {}
        }
    }
    Err(too_many(OPT_STRUCTURED_REPLY))
}

fn too_many(option: u32) -> Error {
    corrupt(format!(
        "more than {MAX_REPLIES} replies to option {option}"
    ))
}

/// Phase 3: `NBD_OPT_SET_META_CONTEXT` for `base:allocation`. Its context id, if
/// the server has it.
pub fn meta_context<S: Read + Write>(s: &mut S, export: &str) -> Result<Option<u32>> {
    let mut d = name_field(export)?;
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    send_option(s, OPT_SET_META_CONTEXT, &d)?;
    let mut allocation_context = None;
    for _ in 0..MAX_REPLIES {
        let (ty, data) = read_reply(s, OPT_SET_META_CONTEXT)?;
        match ty {
            REP_META_CONTEXT => {
                if data.len() < 4 {
                    return Err(corrupt("short meta context reply"));
                }
                if &data[4..] == META_BASE_ALLOCATION.as_bytes() {
                    allocation_context = Some(be32(&data, 0));
                }
            }
            REP_ACK => return Ok(allocation_context),
            t if t & REP_ERR_BIT != 0 => {
                if t == REP_ERR_UNKNOWN {
                    return Err(Error::Invalid(refusal(
                        &format!("NBD export {export:?}"),
                        t,
                        &data,
                    )));
                }
                return Ok(None);
            }
            _ => {}
        }
    }
    Err(too_many(OPT_SET_META_CONTEXT))
}

/// Phase 4: `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` for a server without it): the
/// export's size, transmission flags and block sizes.
pub fn go<S: Read + Write>(
    s: &mut S,
    export: &str,
    greeting: Greeting,
) -> Result<(u64, u16, Option<BlockSizes>)> {
    let mut go = name_field(export)?;
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut export_info = None;
    let mut block_sizes = None;
    for _ in 0..MAX_REPLIES {
        let (ty, data) = read_reply(s, OPT_GO)?;
        match ty {
            REP_INFO => {
                if data.len() < 2 {
                    return Err(corrupt("short NBD_REP_INFO"));
                }
                match be16(&data, 0) {
                    INFO_EXPORT if data.len() == 12 => {
                        export_info = Some((be64(&data, 2), be16(&data, 10)));
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        block_sizes = Some((be32(&data, 2), be32(&data, 6), be32(&data, 10)));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(corrupt(format!(
                            "NBD_REP_INFO of {} bytes for type {}",
                            data.len(),
                            be16(&data, 0)
                        )))
                    }
                    _ => {}
                }
            }
            REP_ACK => {
                let (size, flags) =
                    export_info.ok_or_else(|| corrupt("no export size in NBD_OPT_GO"))?;
                return Ok((size, flags, block_sizes));
            }
            REP_ERR_UNSUP => {
                let (size, flags) = export_name(s, export, greeting)?;
                return Ok((size, flags, block_sizes));
            }
            t if t & REP_ERR_BIT != 0 => {
                let what = format!("NBD export {export:?}");
                return Err(match t {
                    REP_ERR_UNKNOWN | REP_ERR_INVALID => Error::Invalid(refusal(&what, t, &data)),
                    REP_ERR_TLS_REQD => Error::incompatible(
                        Feature::Tls,
                        refusal(&format!("{what} needs TLS (use nbds://)"), t, &data),
                    ),
                    _ => Error::incompatible(Feature::Nbd, refusal(&what, t, &data)),
                });
            }
            _ => {}
        }
    }
    Err(too_many(OPT_GO))
}

/// A server from before `NBD_OPT_GO`: the old way in, which cannot fail politely
/// (an unknown export just closes the connection).
fn export_name<S: Read + Write>(s: &mut S, export: &str, greeting: Greeting) -> Result<(u64, u16)> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let b: [u8; 10] = read_array(s).map_err(|_| {
        Error::Invalid(format!(
            "NBD export {export:?}: server closed the connection (no such export?)"
        ))
    })?;
    if !greeting.no_zeroes {
        let _: [u8; 124] = read_array(s)?;
    }
    Ok((be64(&b, 0), be16(&b, 8)))
}

/// The checks of what the server announced: flags, size and block sizes.
pub fn check(export: Export) -> Result<Export> {
    let Export {
        size,
        flags,
        block_sizes,
        ..
    } = export;
    if flags & TFLAG_HAS_FLAGS == 0 {
        return Err(corrupt("transmission flags without NBD_FLAG_HAS_FLAGS"));
    }
    if size > i64::MAX as u64 {
        return Err(corrupt(format!("export size {size} too large")));
    }
    if let Some((min, pref, max)) = block_sizes {
        let ok = min.is_power_of_two()
            && min <= 64 * 1024
            && pref.is_power_of_two()
            && pref >= min
            && (max == u32::MAX || max % min == 0)
            && max >= min;
        if !ok {
            return Err(corrupt(format!(
                "unusable block sizes: minimum {min}, preferred {pref}, maximum {max}"
            )));
        }
        // The tail past the last whole minimum block can only be reached with a
        // request the server refuses (past the end, or shorter than its minimum):
        // refuse the export at once rather than fail every request touching the
        // tail (qemu's client refuses it too).
        if min > 1 && size % u64::from(min) != 0 {
            return Err(Error::incompatible(
                Feature::Nbd,
                format!(
                    "export size {size} is not a multiple of the server's minimum block size {min}: its last {} bytes cannot be reached",
                    size % u64::from(min)
                ),
            ));
        }
    }
    Ok(export)
}
