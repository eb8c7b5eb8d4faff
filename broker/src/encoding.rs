//! Little-endian, length-prefixed field helpers shared by spool's own binary formats (the WAL
//! publish record, persisted sessions). Decoding never panics: short or invalid input is a
//! [`FormatError`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Why a field could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("record ends early")]
    Truncated,
    #[error("unsupported format version {0}")]
    Version(u8),
    #[error("invalid QoS {0}")]
    QoS(u8),
    #[error("invalid flags {0:#04x}")]
    Flags(u8),
    #[error("unknown queue kind {0}")]
    QueueKind(u8),
    #[error("string is not UTF-8")]
    Utf8,
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

pub(crate) fn put_str16(out: &mut BytesMut, value: &str) {
    put_bytes16(out, value.as_bytes());
}

pub(crate) fn put_bytes16(out: &mut BytesMut, value: &[u8]) {
    out.put_u16_le(u16::try_from(value.len()).expect("field fits in u16"));
    out.put_slice(value);
}

pub(crate) fn put_optional_str16(out: &mut BytesMut, value: Option<&str>) {
    put_optional_bytes16(out, value.map(str::as_bytes));
}

pub(crate) fn put_optional_bytes16(out: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        None => out.put_u8(0),
        Some(value) => {
            out.put_u8(1);
            put_bytes16(out, value);
        }
    }
}

pub(crate) fn need(bytes: &Bytes, len: usize) -> Result<(), FormatError> {
    if bytes.remaining() < len {
        return Err(FormatError::Truncated);
    }
    Ok(())
}

pub(crate) fn take_u8(bytes: &mut Bytes) -> Result<u8, FormatError> {
    need(bytes, 1)?;
    Ok(bytes.get_u8())
}

pub(crate) fn take_u16(bytes: &mut Bytes) -> Result<u16, FormatError> {
    need(bytes, 2)?;
    Ok(bytes.get_u16_le())
}

pub(crate) fn take_u32(bytes: &mut Bytes) -> Result<u32, FormatError> {
    need(bytes, 4)?;
    Ok(bytes.get_u32_le())
}

pub(crate) fn take_u64(bytes: &mut Bytes) -> Result<u64, FormatError> {
    need(bytes, 8)?;
    Ok(bytes.get_u64_le())
}

pub(crate) fn take_bytes(bytes: &mut Bytes, len: usize) -> Result<Bytes, FormatError> {
    need(bytes, len)?;
    Ok(bytes.split_to(len))
}

pub(crate) fn take_str16(bytes: &mut Bytes) -> Result<String, FormatError> {
    let len = usize::from(take_u16(bytes)?);
    let raw = take_bytes(bytes, len)?;
    String::from_utf8(raw.to_vec()).map_err(|_| FormatError::Utf8)
}

pub(crate) fn take_optional_str16(bytes: &mut Bytes) -> Result<Option<String>, FormatError> {
    match take_u8(bytes)? {
        0 => Ok(None),
        _ => take_str16(bytes).map(Some),
    }
}

pub(crate) fn take_optional_bytes16(bytes: &mut Bytes) -> Result<Option<Bytes>, FormatError> {
    match take_u8(bytes)? {
        0 => Ok(None),
        _ => {
            let len = usize::from(take_u16(bytes)?);
            take_bytes(bytes, len).map(Some)
        }
    }
}

/// A small record: its format version byte, then what `fields` writes.
pub(crate) fn encode_versioned(version: u8, fields: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(32);
    out.put_u8(version);
    fields(&mut out);
    out.freeze()
}

/// Reads what `encode_versioned` wrote: the version must match and nothing may trail what
/// `fields` reads.
pub(crate) fn decode_versioned<T>(
    mut bytes: Bytes,
    version: u8,
    fields: impl FnOnce(&mut Bytes) -> Result<T, FormatError>,
) -> Result<T, FormatError> {
    let found = take_u8(&mut bytes)?;
    if found != version {
        return Err(FormatError::Version(found));
    }
    let decoded = fields(&mut bytes)?;
    if !bytes.is_empty() {
        return Err(FormatError::Trailing(bytes.len()));
    }
    Ok(decoded)
}
