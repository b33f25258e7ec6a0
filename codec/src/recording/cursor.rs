//! Little-endian reading and writing shared by every part of the container.

use super::FieldError;

/// A cursor over bytes that names the field it was reading when the bytes ran out.
pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FieldError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(FieldError::Truncated { field })?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], FieldError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, FieldError> {
        let [byte] = self.array(field)?;
        Ok(byte)
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, FieldError> {
        self.array(field).map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, FieldError> {
        self.array(field).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, FieldError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A `u16` length, then that many bytes of UTF-8.
    pub(super) fn str16(&mut self, field: &'static str) -> Result<&'a str, FieldError> {
        let len = usize::from(self.u16(field)?);
        std::str::from_utf8(self.take(len, field)?).map_err(|_| FieldError::InvalidUtf8 { field })
    }

    /// A `u32` length, then that many bytes; returns the byte range within the input,
    /// so the caller can slice a shared buffer instead of copying.
    pub(super) fn bytes32(
        &mut self,
        field: &'static str,
    ) -> Result<std::ops::Range<usize>, FieldError> {
        let len = self.u32(field)?;
        let len = usize::try_from(len).map_err(|_| FieldError::Truncated { field })?;
        let start = self.pos;
        self.take(len, field)?;
        Ok(start..self.pos)
    }
}

/// Appends a `u16`-length-prefixed string, or says which field is too long.
pub(super) fn put_str16(
    out: &mut Vec<u8>,
    field: &'static str,
    text: &str,
) -> Result<(), FieldError> {
    let len = u16::try_from(text.len()).map_err(|_| FieldError::TooLong {
        field,
        len: text.len(),
        max: usize::from(u16::MAX),
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

/// Appends a `u32`-length-prefixed byte string; the caller has bounded its length.
pub(super) fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    // Records are capped far below 4 GiB before they get here.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The CRC-32 (IEEE) used for every checksum in the container.
pub(super) fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Whether a stored checksum matches. Fuzzing builds accept any checksum so that the
/// fuzzer reaches the decoders behind them instead of stopping at the first CRC.
pub(super) fn checksum_ok(stored: u32, computed: u32) -> bool {
    cfg!(fuzzing) || stored == computed
}
