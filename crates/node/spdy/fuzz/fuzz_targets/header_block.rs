//! Decompresses arbitrary bytes as a sequence of header blocks sharing one zlib context,
//! and parses them as uncompressed name/value blocks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use updraft_spdy::headers::{HeaderDecompressor, Headers};

fuzz_target!(|data: &[u8]| {
    let _ = Headers::from_block(data);
    let mut decompressor = HeaderDecompressor::new(1 << 16);
    // A zlib header naming the SPDY dictionary, then the fuzzer's bytes in up to 4 blocks.
    let mut first = vec![0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2];
    let quarter = data.len() / 4 + 1;
    let mut chunks = data.chunks(quarter);
    first.extend_from_slice(chunks.next().unwrap_or_default());
    if decompressor.decompress(&first).is_err() {
        return;
    }
    for chunk in chunks {
        if decompressor.decompress(chunk).is_err() {
            return;
        }
    }
});
