//! Feeds arbitrary bytes, split at an arbitrary point, into the frame decoder.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use updraft_spdy::{CodecLimits, FrameCodec};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let limits = CodecLimits {
        max_frame_len: 1 << 16,
        max_header_block_len: 1 << 16,
    };
    let Ok(mut codec) = FrameCodec::new(limits) else {
        return;
    };
    let cut = usize::from(split).min(data.len());
    let mut buf = BytesMut::from(&data[..cut]);
    for more in [&data[cut..], &[][..]] {
        buf.extend_from_slice(more);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
