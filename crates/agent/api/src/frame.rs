//! Framing of exec and attach streams on an upgraded connection.
//!
//! After `101 Switching Protocols` (`Upgrade: updraft-cell-stream.v1`) both sides exchange
//! frames of `[kind: u8][length: u32 big-endian][payload: length bytes]`, payload at most
//! [`MAX_PAYLOAD`]:
//!
//! | kind | name | direction | payload |
//! | ---- | ---- | --------- | ------- |
//! | 0 | stdin | client → agent | bytes for the process's stdin |
//! | 1 | stdout | agent → client | bytes the process wrote to stdout (or the terminal) |
//! | 2 | stderr | agent → client | bytes the process wrote to stderr |
//! | 3 | resize | client → agent | JSON [`TerminalSize`] |
//! | 4 | close-stdin | client → agent | empty; the process sees end of file |
//! | 5 | end | agent → client | JSON [`StreamEnd`]: exit code or error; the last frame |
//!
//! Unknown kinds, oversized frames and frames sent in the wrong direction are protocol errors
//! that end the stream (the agent answers them with an end frame naming the problem).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::types::{StreamEnd, TerminalSize};

/// The `Upgrade` token of exec and attach streams.
pub const STREAM_PROTOCOL: &str = "updraft-cell-stream.v1";
/// The `Upgrade` token of port-forward connections (raw bytes after the upgrade).
pub const PORT_FORWARD_PROTOCOL: &str = "updraft-cell-portforward.v1";
/// Largest payload of a frame.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// One frame of an exec or attach stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Input for the process.
    Stdin(Bytes),
    /// Output on stdout (or the terminal).
    Stdout(Bytes),
    /// Output on stderr.
    Stderr(Bytes),
    /// New terminal size.
    Resize(TerminalSize),
    /// End of input.
    CloseStdin,
    /// The stream is over.
    End(StreamEnd),
}

impl Frame {
    /// The frame's name in the table of the module docs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Stdin(_) => "stdin",
            Self::Stdout(_) => "stdout",
            Self::Stderr(_) => "stderr",
            Self::Resize(_) => "resize",
            Self::CloseStdin => "close-stdin",
            Self::End(_) => "end",
        }
    }
}

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed.
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than [`MAX_PAYLOAD`].
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(usize),
    /// A frame the receiving side never accepts (e.g. stdout sent by the client).
    #[error("a {0} frame may not be sent in this direction")]
    Unexpected(&'static str),
    /// A resize or end frame whose JSON did not parse.
    #[error("invalid {kind} frame: {source}")]
    Json {
        /// Which frame.
        kind: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Encoder/decoder of [`Frame`]s for `tokio_util::codec::Framed`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 5 {
            return Ok(None);
        }
        let kind = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        if src.len() < 5 + len {
            src.reserve(5 + len - src.len());
            return Ok(None);
        }
        src.advance(5);
        let payload = src.split_to(len).freeze();
        let json = |kind: &'static str| move |source| FrameError::Json { kind, source };
        Ok(Some(match kind {
            0 => Frame::Stdin(payload),
            1 => Frame::Stdout(payload),
            2 => Frame::Stderr(payload),
            3 => Frame::Resize(serde_json::from_slice(&payload).map_err(json("resize"))?),
            4 => Frame::CloseStdin,
            5 => Frame::End(serde_json::from_slice(&payload).map_err(json("end"))?),
            other => return Err(FrameError::UnknownKind(other)),
        }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let json = |kind: &'static str| move |source| FrameError::Json { kind, source };
        let (kind, payload): (u8, Bytes) = match frame {
            Frame::Stdin(b) => (0, b),
            Frame::Stdout(b) => (1, b),
            Frame::Stderr(b) => (2, b),
            Frame::Resize(size) => (3, serde_json::to_vec(&size).map_err(json("resize"))?.into()),
            Frame::CloseStdin => (4, Bytes::new()),
            Frame::End(end) => (5, serde_json::to_vec(&end).map_err(json("end"))?.into()),
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLong(payload.len()));
        }
        dst.reserve(5 + payload.len());
        dst.put_u8(kind);
        dst.put_u32(payload.len() as u32);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_rejected() -> Result<(), FrameError> {
        let frames = [
            Frame::Stdin(Bytes::from_static(b"hi")),
            Frame::Stdout(Bytes::from_static(b"out")),
            Frame::Stderr(Bytes::new()),
            Frame::Resize(TerminalSize {
                width: 80,
                height: 24,
            }),
            Frame::CloseStdin,
            Frame::End(StreamEnd {
                exit_code: Some(3),
                error: None,
            }),
        ];
        let mut buf = BytesMut::new();
        for f in frames.clone() {
            FrameCodec.encode(f, &mut buf)?;
        }
        // Byte by byte: partial frames wait for more input.
        let mut partial = BytesMut::new();
        let mut decoded = Vec::new();
        for b in buf.iter() {
            partial.put_u8(*b);
            if let Some(f) = FrameCodec.decode(&mut partial)? {
                decoded.push(f);
            }
        }
        assert_eq!(decoded, frames);

        let mut bad = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert!(matches!(
            FrameCodec.decode(&mut bad),
            Err(FrameError::UnknownKind(9))
        ));
        let mut long = BytesMut::from(&[1u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            FrameCodec.decode(&mut long),
            Err(FrameError::TooLong(_))
        ));
        let mut json = BytesMut::from(&[3u8, 0, 0, 0, 1, b'x'][..]);
        assert!(matches!(
            FrameCodec.decode(&mut json),
            Err(FrameError::Json { kind: "resize", .. })
        ));
        Ok(())
    }
}
