//! SPDY/3 header blocks: the name/value list carried by SYN_STREAM, SYN_REPLY and HEADERS,
//! and its zlib compression with the SPDY/3 dictionary.
//!
//! Each direction of a connection has exactly one compression context, kept across frames:
//! every header block is one sync-flushed chunk of a single zlib stream.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::dictionary::HEADER_DICTIONARY;

/// Errors from encoding or decoding a header block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The compressed data is not a valid continuation of the connection's zlib stream.
    #[error("header block is not valid zlib data: {0}")]
    Corrupt(String),
    /// The zlib stream asks for a preset dictionary other than the SPDY/3 one.
    #[error("header block asks for an unknown zlib dictionary (adler32 {0:#010x})")]
    UnknownDictionary(u32),
    /// The decompressed header block is larger than the configured limit (a zip bomb or a misbehaving peer).
    #[error("decompressed header block exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The name/value list ends in the middle of a field.
    #[error("header block truncated while reading {0}")]
    Truncated(&'static str),
    /// The name/value list claims more pairs than its bytes can hold.
    #[error("header block claims {count} pairs but has only {bytes} bytes")]
    ImpossibleCount {
        /// The declared number of pairs.
        count: u32,
        /// The bytes remaining after the count.
        bytes: usize,
    },
    /// Bytes are left over after the declared number of pairs.
    #[error("{0} trailing bytes after the last header pair")]
    TrailingBytes(usize),
    /// A header name is empty.
    #[error("empty header name")]
    EmptyName,
    /// A header name contains upper-case letters, which SPDY/3 forbids.
    #[error("header name {0:?} is not lower-case")]
    UppercaseName(String),
    /// The same header name occurs twice in one block.
    #[error("header name {0:?} occurs twice")]
    DuplicateName(String),
    /// A header name or value is not UTF-8.
    #[error("header {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A name, value or the whole block is too long for SPDY's 32-bit length fields.
    #[error("header field too long to encode")]
    FieldTooLong,
    /// The zlib compressor failed.
    #[error("header compression failed: {0}")]
    Compress(String),
}

/// An ordered list of header name/value pairs with lower-case names.
///
/// SPDY encodes several values of one name as a single value joined with NUL bytes;
/// [`Headers::get`] returns the raw joined value, [`Headers::get_all`] splits it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    /// An empty header list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` (lower-cased) to `value`, replacing an existing value.
    pub fn insert(&mut self, name: impl AsRef<str>, value: impl Into<String>) -> &mut Self {
        let name = name.as_ref().to_ascii_lowercase();
        let value = value.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name, value)),
        }
        self
    }

    /// Adds another value for `name` (lower-cased), joined to existing values with a NUL byte.
    pub fn append(&mut self, name: impl AsRef<str>, value: impl AsRef<str>) -> &mut Self {
        let name = name.as_ref().to_ascii_lowercase();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => {
                entry.1.push('\0');
                entry.1.push_str(value.as_ref());
            }
            None => self.entries.push((name, value.as_ref().to_owned())),
        }
        self
    }

    /// The raw value of `name` (case-insensitive), several values joined with NUL.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (case-insensitive).
    pub fn get_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.get(name).into_iter().flat_map(|v| v.split('\0'))
    }

    /// The pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Serializes the uncompressed name/value block (32-bit counts and lengths, SPDY/3).
    pub fn to_block(&self) -> Result<Vec<u8>, HeaderError> {
        let len32 = |n: usize| u32::try_from(n).map_err(|_| HeaderError::FieldTooLong);
        let mut out = Vec::with_capacity(
            4 + self
                .entries
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&len32(self.entries.len())?.to_be_bytes());
        for (name, value) in &self.entries {
            out.extend_from_slice(&len32(name.len())?.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&len32(value.len())?.to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        Ok(out)
    }

    /// Parses an uncompressed name/value block, checking every length against the bytes present.
    pub fn from_block(block: &[u8]) -> Result<Self, HeaderError> {
        let mut rest = block;
        let count = take_u32(&mut rest, "pair count")?;
        // Each pair needs at least two 4-byte lengths; this bounds the allocation below.
        if u64::from(count) * 8 > rest.len() as u64 {
            return Err(HeaderError::ImpossibleCount {
                count,
                bytes: rest.len(),
            });
        }
        let mut entries: Vec<(String, String)> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = take_field(&mut rest, "name")?;
            let name =
                String::from_utf8(name.to_vec()).map_err(|_| HeaderError::NotUtf8("name"))?;
            if name.is_empty() {
                return Err(HeaderError::EmptyName);
            }
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(HeaderError::UppercaseName(name));
            }
            if entries.iter().any(|(n, _)| *n == name) {
                return Err(HeaderError::DuplicateName(name));
            }
            let value = take_field(&mut rest, "value")?;
            let value =
                String::from_utf8(value.to_vec()).map_err(|_| HeaderError::NotUtf8("value"))?;
            entries.push((name, value));
        }
        if !rest.is_empty() {
            return Err(HeaderError::TrailingBytes(rest.len()));
        }
        Ok(Self { entries })
    }
}

impl<K: AsRef<str>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        let mut headers = Headers::new();
        for (k, v) in iter {
            headers.insert(k, v);
        }
        headers
    }
}

fn take_u32(rest: &mut &[u8], what: &'static str) -> Result<u32, HeaderError> {
    let (head, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(HeaderError::Truncated(what))?;
    *rest = tail;
    Ok(u32::from_be_bytes(*head))
}

fn take_field<'a>(rest: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], HeaderError> {
    let len = take_u32(rest, what)? as usize;
    if len > rest.len() {
        return Err(HeaderError::Truncated(what));
    }
    let (field, tail) = rest.split_at(len);
    *rest = tail;
    Ok(field)
}

/// The sending side's compression context of one connection.
pub struct HeaderCompressor {
    zlib: Compress,
}

impl std::fmt::Debug for HeaderCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderCompressor").finish_non_exhaustive()
    }
}

impl HeaderCompressor {
    /// A fresh context primed with the SPDY/3 dictionary.
    pub fn new() -> Result<Self, HeaderError> {
        let mut zlib = Compress::new(Compression::default(), true);
        zlib.set_dictionary(HEADER_DICTIONARY)
            .map_err(|e| HeaderError::Compress(e.to_string()))?;
        Ok(Self { zlib })
    }

    /// Compresses `headers` as the next sync-flushed chunk of this connection's zlib stream.
    pub fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, HeaderError> {
        let block = headers.to_block()?;
        let mut input: &[u8] = &block;
        let mut out = Vec::with_capacity(block.len() / 2 + 64);
        let mut chunk = [0u8; 4096];
        loop {
            let (before_in, before_out) = (self.zlib.total_in(), self.zlib.total_out());
            self.zlib
                .compress(input, &mut chunk, FlushCompress::Sync)
                .map_err(|e| HeaderError::Compress(e.to_string()))?;
            let consumed = usize::try_from(self.zlib.total_in() - before_in)
                .map_err(|_| HeaderError::FieldTooLong)?;
            let produced = usize::try_from(self.zlib.total_out() - before_out)
                .map_err(|_| HeaderError::FieldTooLong)?;
            input = input.get(consumed..).unwrap_or_default();
            out.extend_from_slice(chunk.get(..produced).unwrap_or_default());
            // The sync flush is complete once all input is taken and the output did not fill the chunk.
            if input.is_empty() && produced < chunk.len() {
                return Ok(out);
            }
        }
    }
}

/// The receiving side's decompression context of one connection.
pub struct HeaderDecompressor {
    zlib: Decompress,
    max_block_len: usize,
}

impl std::fmt::Debug for HeaderDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDecompressor")
            .field("max_block_len", &self.max_block_len)
            .finish_non_exhaustive()
    }
}

impl HeaderDecompressor {
    /// A fresh context; decompressed blocks larger than `max_block_len` bytes are rejected.
    pub fn new(max_block_len: usize) -> Self {
        Self {
            zlib: Decompress::new(true),
            max_block_len,
        }
    }

    /// Decompresses the next header block of the connection and parses it.
    pub fn decompress(&mut self, compressed: &[u8]) -> Result<Headers, HeaderError> {
        let block = self.inflate(compressed)?;
        Headers::from_block(&block)
    }

    fn inflate(&mut self, compressed: &[u8]) -> Result<Vec<u8>, HeaderError> {
        let mut input = compressed;
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let (before_in, before_out) = (self.zlib.total_in(), self.zlib.total_out());
            let result = self
                .zlib
                .decompress(input, &mut chunk, FlushDecompress::Sync);
            let consumed = usize::try_from(self.zlib.total_in() - before_in).map_err(|_| {
                HeaderError::TooLarge {
                    limit: self.max_block_len,
                }
            })?;
            let produced = usize::try_from(self.zlib.total_out() - before_out).map_err(|_| {
                HeaderError::TooLarge {
                    limit: self.max_block_len,
                }
            })?;
            input = input.get(consumed..).unwrap_or_default();
            out.extend_from_slice(chunk.get(..produced).unwrap_or_default());
            if out.len() > self.max_block_len {
                return Err(HeaderError::TooLarge {
                    limit: self.max_block_len,
                });
            }
            match result {
                Ok(Status::StreamEnd) => {
                    // SPDY never finishes the zlib stream; data after its end cannot be decoded.
                    if !input.is_empty() {
                        return Err(HeaderError::Corrupt(
                            "data after the end of the zlib stream".into(),
                        ));
                    }
                    return Ok(out);
                }
                Ok(_) => {
                    if input.is_empty() && produced < chunk.len() {
                        return Ok(out);
                    }
                    if consumed == 0 && produced == 0 {
                        return Err(HeaderError::Corrupt("no progress decompressing".into()));
                    }
                }
                Err(e) => match e.needs_dictionary() {
                    Some(id) if id == HEADER_DICTIONARY_ADLER32 => {
                        self.zlib
                            .set_dictionary(HEADER_DICTIONARY)
                            .map_err(|e| HeaderError::Corrupt(e.to_string()))?;
                    }
                    Some(id) => return Err(HeaderError::UnknownDictionary(id)),
                    None => return Err(HeaderError::Corrupt(e.to_string())),
                },
            }
        }
    }
}

/// Adler-32 of [`HEADER_DICTIONARY`], the dictionary id in the zlib header of every SPDY/3 header stream.
const HEADER_DICTIONARY_ADLER32: u32 = 0xe3c6_a7c2;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Headers {
        [
            ("streamType", "stdout"),
            ("port", "8080"),
            ("requestid", "0"),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn dictionary_id_matches_the_dictionary() {
        // Adler-32 computed directly, so a typo in the dictionary bytes is caught.
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in HEADER_DICTIONARY.iter() {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, HEADER_DICTIONARY_ADLER32);
        assert_eq!(HEADER_DICTIONARY.len(), 1423);
    }

    #[test]
    fn names_are_lowercased_and_values_joined() {
        let mut h = sample();
        h.append("Port", "9090");
        assert_eq!(h.get("streamtype"), Some("stdout"));
        assert_eq!(h.get_all("port").collect::<Vec<_>>(), ["8080", "9090"]);
        assert_eq!(h.get("PORT"), Some("8080\09090"));
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn block_round_trip() {
        let h = sample();
        assert_eq!(Headers::from_block(&h.to_block().unwrap()).unwrap(), h);
        assert_eq!(
            Headers::from_block(&Headers::new().to_block().unwrap()).unwrap(),
            Headers::new()
        );
    }

    #[test]
    fn compressed_round_trip_keeps_context_across_blocks() {
        let mut c = HeaderCompressor::new().unwrap();
        let mut d = HeaderDecompressor::new(1 << 16);
        for i in 0..50 {
            let mut h = sample();
            h.insert("requestid", i.to_string());
            let z = c.compress(&h).unwrap();
            assert_eq!(d.decompress(&z).unwrap(), h);
        }
    }

    #[test]
    fn second_block_fails_in_a_fresh_context() {
        let mut c = HeaderCompressor::new().unwrap();
        let _first = c.compress(&sample()).unwrap();
        let second = c.compress(&sample()).unwrap();
        let mut d = HeaderDecompressor::new(1 << 16);
        assert!(d.decompress(&second).is_err());
    }

    #[test]
    fn block_errors_name_the_problem() {
        let cases: Vec<(Vec<u8>, HeaderError)> = vec![
            (vec![0, 0], HeaderError::Truncated("pair count")),
            (
                vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
                HeaderError::ImpossibleCount {
                    count: u32::MAX,
                    bytes: 4,
                },
            ),
            (
                [
                    &1u32.to_be_bytes()[..],
                    &9u32.to_be_bytes(),
                    b"ab",
                    &[0u8; 2],
                ]
                .concat(),
                HeaderError::Truncated("name"),
            ),
            (
                [
                    &1u32.to_be_bytes()[..],
                    &0u32.to_be_bytes(),
                    &0u32.to_be_bytes(),
                ]
                .concat(),
                HeaderError::EmptyName,
            ),
            (
                [
                    &1u32.to_be_bytes()[..],
                    &1u32.to_be_bytes(),
                    b"A",
                    &0u32.to_be_bytes(),
                ]
                .concat(),
                HeaderError::UppercaseName("A".into()),
            ),
            (
                [
                    &1u32.to_be_bytes()[..],
                    &1u32.to_be_bytes(),
                    &[0xff],
                    &0u32.to_be_bytes(),
                ]
                .concat(),
                HeaderError::NotUtf8("name"),
            ),
            (
                [
                    &1u32.to_be_bytes()[..],
                    &1u32.to_be_bytes(),
                    b"a",
                    &5u32.to_be_bytes(),
                    b"x",
                ]
                .concat(),
                HeaderError::Truncated("value"),
            ),
            (
                [
                    &1u32.to_be_bytes()[..],
                    &1u32.to_be_bytes(),
                    b"a",
                    &0u32.to_be_bytes(),
                    b"zz",
                ]
                .concat(),
                HeaderError::TrailingBytes(2),
            ),
            (
                [
                    &2u32.to_be_bytes()[..],
                    &1u32.to_be_bytes(),
                    b"a",
                    &0u32.to_be_bytes(),
                    &1u32.to_be_bytes(),
                    b"a",
                    &0u32.to_be_bytes(),
                ]
                .concat(),
                HeaderError::DuplicateName("a".into()),
            ),
        ];
        for (block, want) in cases {
            assert_eq!(Headers::from_block(&block), Err(want));
        }
    }

    #[test]
    fn zip_bomb_is_bounded() {
        let mut h = Headers::new();
        h.insert("bomb", "a".repeat(1 << 20));
        let z = HeaderCompressor::new().unwrap().compress(&h).unwrap();
        assert!(
            z.len() < 8 << 10,
            "1 MiB of 'a' compresses to {} bytes",
            z.len()
        );
        let mut d = HeaderDecompressor::new(64 << 10);
        assert_eq!(
            d.decompress(&z),
            Err(HeaderError::TooLarge { limit: 64 << 10 })
        );
    }

    #[test]
    fn garbage_is_rejected() {
        let mut d = HeaderDecompressor::new(1 << 16);
        assert!(matches!(
            d.decompress(b"not zlib at all"),
            Err(HeaderError::Corrupt(_))
        ));
        // A zlib header naming another dictionary.
        let mut d = HeaderDecompressor::new(1 << 16);
        assert_eq!(
            d.decompress(&[0x78, 0xbb, 0, 0, 0, 1]),
            Err(HeaderError::UnknownDictionary(1))
        );
    }
}
