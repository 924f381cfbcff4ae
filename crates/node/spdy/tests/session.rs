//! Client against server in one process over `tokio::io::duplex`, plus a raw frame-level peer
//! for the cases a well-behaved client cannot produce.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::codec::Framed;
use updraft_spdy::frame::{Setting, SettingId};
use updraft_spdy::{
    CloseReason, CodecLimits, Config, Connection, ConnectionHandle, Frame, FrameCodec,
    GoAwayStatus, Headers, IncomingStreams, Role, RstStatus, SessionError, StreamError,
};

const WAIT: Duration = Duration::from_secs(20);

fn pair(
    server_config: Config,
) -> (
    (ConnectionHandle, IncomingStreams),
    (ConnectionHandle, IncomingStreams),
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = Connection::new(a, Role::Server, server_config).unwrap();
    let client = Connection::new(b, Role::Client, Config::default()).unwrap();
    (server, client)
}

fn payload(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn h(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// Echoes every incoming stream back, replying with its requestid.
fn spawn_echo_server(mut incoming: IncomingStreams) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut served = 0;
        while let Some(stream) = incoming.accept().await {
            served += 1;
            let id = stream
                .headers()
                .get("requestid")
                .unwrap_or_default()
                .to_owned();
            stream.reply(h(&[("requestid", &id)]), false).unwrap();
            let (mut rx, mut tx) = stream.split();
            tokio::spawn(async move {
                tokio::io::copy(&mut rx, &mut tx).await.unwrap();
                tx.shutdown().await.unwrap();
            });
        }
        served
    })
}

async fn echo_roundtrip(handle: &ConnectionHandle, seed: u64, size: usize) {
    let stream = handle
        .open_stream(
            h(&[("streamtype", "data"), ("requestid", &seed.to_string())]),
            false,
        )
        .unwrap();
    let data = payload(seed, size);
    let want = Sha256::digest(&data);
    let reply = stream.reply_headers().await.unwrap();
    assert_eq!(reply.get("requestid"), Some(seed.to_string().as_str()));
    let (mut rx, mut tx) = stream.split();
    let writer = tokio::spawn(async move {
        tx.write_all(&data).await.unwrap();
        tx.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    rx.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), size);
    assert_eq!(Sha256::digest(&echoed), want);
}

#[tokio::test]
async fn many_concurrent_streams_echo_their_data() {
    let ((_server, incoming), (client, _)) = pair(Config::default());
    let served = spawn_echo_server(incoming);
    let client = Arc::new(client);
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(
                async move { echo_roundtrip(&client, i, 20_000 + i as usize * 1000).await },
            )
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
    client.close().await;
    assert_eq!(
        tokio::time::timeout(WAIT, served).await.unwrap().unwrap(),
        64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_with_flow_control_keeps_its_hash() {
    let ((_server, incoming), (client, _)) = pair(Config::default());
    spawn_echo_server(incoming);
    tokio::time::timeout(
        Duration::from_secs(60),
        echo_roundtrip(&client, 42, 16 << 20),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn slow_reader_applies_backpressure() {
    let ((_server, mut incoming), (client, _)) = pair(Config::default());
    let mut stream = client
        .open_stream(h(&[("streamtype", "stdin")]), false)
        .unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let data = payload(7, 1 << 20);
    let want = Sha256::digest(&data);
    let counter = written.clone();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(4096) {
            stream.write_all(chunk).await.unwrap();
            counter.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        stream.shutdown().await.unwrap();
    });
    let mut server_stream = tokio::time::timeout(WAIT, incoming.accept())
        .await
        .unwrap()
        .unwrap();
    // Nobody reads yet: the writer must stop at the 64 KiB window.
    while written.load(Ordering::SeqCst) < 64 * 1024 {
        tokio::task::yield_now().await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), async {
            while !writer.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_err()
    );
    assert_eq!(
        written.load(Ordering::SeqCst),
        64 * 1024,
        "the writer went past the stream window"
    );
    // Reading releases the writer; everything arrives intact.
    let mut got = Vec::new();
    server_stream.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(Sha256::digest(&got), want);
}

#[tokio::test]
async fn reset_reaches_the_other_side() {
    let ((_server, mut incoming), (client, _)) = pair(Config::default());
    let stream = client
        .open_stream(h(&[("streamtype", "stdout")]), false)
        .unwrap();
    let mut server_stream = tokio::time::timeout(WAIT, incoming.accept())
        .await
        .unwrap()
        .unwrap();
    stream.reset(RstStatus::CANCEL);
    let err = server_stream.read_u8().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(
        err.to_string().contains("reset by peer with status 5"),
        "{err}"
    );
    // Our own side reports the reset too, and writing fails.
    let (_rx, mut tx) = stream.split();
    assert!(tx.write_all(b"x").await.is_err());
}

#[tokio::test]
async fn pings_are_answered_in_both_directions() {
    let ((server, _si), (client, _ci)) = pair(Config::default());
    tokio::time::timeout(WAIT, client.ping())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, server.ping())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn goaway_stops_new_streams_but_finishes_open_ones() {
    let ((server, incoming), (client, _)) = pair(Config::default());
    spawn_echo_server(incoming);
    let open = client.open_stream(h(&[("requestid", "1")]), false).unwrap();
    open.reply_headers().await.unwrap();
    server.goaway();
    // Wait for the client to see the GOAWAY.
    let err = loop {
        match client.open_stream(h(&[("requestid", "2")]), false) {
            Err(e) => break e,
            Ok(s) => {
                // Opened before the GOAWAY arrived: the server ignores it, the GOAWAY refuses it.
                assert_eq!(s.reply_headers().await.unwrap_err(), StreamError::Refused);
            }
        }
    };
    assert!(matches!(err, SessionError::GoingAway), "{err}");
    let (mut rx, mut tx) = open.split();
    tx.write_all(b"still works").await.unwrap();
    tx.shutdown().await.unwrap();
    let mut got = String::new();
    rx.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "still works");
}

#[tokio::test]
async fn close_fails_open_streams_and_ends_the_peer() {
    let ((server, mut incoming), (client, _)) = pair(Config::default());
    let mut stream = client.open_stream(h(&[]), false).unwrap();
    let _server_stream = incoming.accept().await.unwrap();
    server.close().await;
    let err = stream.read_u8().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
    assert_eq!(
        tokio::time::timeout(WAIT, client.closed()).await.unwrap(),
        CloseReason::PeerClosed
    );
    assert!(matches!(
        client.open_stream(h(&[]), false),
        Err(SessionError::Closed(_))
    ));
}

#[tokio::test]
async fn dropping_everything_closes_the_connection() {
    let ((server, server_incoming), (client, _ci)) = pair(Config::default());
    drop(server);
    drop(server_incoming);
    assert_eq!(
        tokio::time::timeout(WAIT, client.closed()).await.unwrap(),
        CloseReason::PeerClosed
    );
}

// ---- raw peer: frames written by hand -------------------------------------------------------

async fn raw_server(
    config: Config,
) -> (
    ConnectionHandle,
    IncomingStreams,
    Framed<DuplexStream, FrameCodec>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (handle, incoming) = Connection::new(a, Role::Server, config).unwrap();
    let mut raw = Framed::new(b, FrameCodec::new(CodecLimits::default()).unwrap());
    // The server announces its settings first.
    match raw.next().await.unwrap().unwrap() {
        Frame::Settings { .. } => {}
        other => panic!("expected SETTINGS first, got {other:?}"),
    }
    (handle, incoming, raw)
}

fn syn(stream_id: u32) -> Frame {
    Frame::SynStream {
        stream_id,
        associated_stream_id: 0,
        priority: 0,
        slot: 0,
        fin: false,
        unidirectional: false,
        headers: h(&[("streamtype", "data")]),
    }
}

async fn next_non_window(raw: &mut Framed<DuplexStream, FrameCodec>) -> Frame {
    loop {
        match tokio::time::timeout(WAIT, raw.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Frame::WindowUpdate { .. } => {}
            f => return f,
        }
    }
}

#[tokio::test]
async fn garbage_gets_goaway_protocol_error_and_closes_only_that_connection() {
    let (handle, _incoming, mut raw) = raw_server(Config::default()).await;
    let ((_s2, s2_incoming), (other_client, _)) = pair(Config::default());
    spawn_echo_server(s2_incoming);
    raw.get_mut()
        .write_all(&[
            0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x07, 1, 2, 3, 4, 5, 6, 7,
        ])
        .await
        .unwrap();
    assert_eq!(
        next_non_window(&mut raw).await,
        Frame::GoAway {
            last_good_stream_id: 0,
            status: GoAwayStatus::PROTOCOL_ERROR
        }
    );
    match tokio::time::timeout(WAIT, handle.closed()).await.unwrap() {
        CloseReason::Protocol(msg) => {
            assert!(msg.contains("PING frame has invalid length 7"), "{msg}")
        }
        other => panic!("closed with {other:?}"),
    }
    assert!(
        raw.next().await.is_none(),
        "transport not closed after GOAWAY"
    );
    echo_roundtrip(&other_client, 1, 1000).await;
}

#[tokio::test]
async fn excess_streams_are_refused() {
    let config = Config {
        max_concurrent_streams: 2,
        ..Config::default()
    };
    let (_handle, mut incoming, mut raw) = raw_server(config).await;
    for id in [1, 3, 5] {
        raw.send(syn(id)).await.unwrap();
    }
    assert_eq!(
        next_non_window(&mut raw).await,
        Frame::RstStream {
            stream_id: 5,
            status: RstStatus::REFUSED_STREAM
        }
    );
    let first = incoming.accept().await.unwrap();
    let second = incoming.accept().await.unwrap();
    assert_eq!((first.id(), second.id()), (1, 3));
    assert_eq!(
        first.reply_headers().await.unwrap_err(),
        StreamError::NotOpenedByUs
    );
    first.reply(h(&[("ok", "1")]), false).unwrap();
    assert_eq!(
        first.reply(Headers::new(), false),
        Err(StreamError::CannotReply)
    );
    let reply = next_non_window(&mut raw).await;
    assert_eq!(
        reply,
        Frame::SynReply {
            stream_id: 1,
            fin: false,
            headers: h(&[("ok", "1")])
        }
    );
}

#[tokio::test]
async fn non_increasing_stream_id_is_a_session_error() {
    let (handle, _incoming, mut raw) = raw_server(Config::default()).await;
    raw.send(syn(3)).await.unwrap();
    raw.send(syn(1)).await.unwrap();
    assert_eq!(
        next_non_window(&mut raw).await,
        Frame::GoAway {
            last_good_stream_id: 3,
            status: GoAwayStatus::PROTOCOL_ERROR
        }
    );
    assert!(matches!(handle.closed().await, CloseReason::Protocol(_)));
}

#[tokio::test]
async fn window_overrun_is_a_flow_control_error_in_strict_mode() {
    let (_handle, mut incoming, mut raw) = raw_server(Config::default()).await;
    raw.send(syn(1)).await.unwrap();
    let _stream = incoming.accept().await.unwrap();
    for _ in 0..5 {
        raw.send(Frame::Data {
            stream_id: 1,
            fin: false,
            data: Bytes::from(vec![0u8; 16 * 1024]),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        next_non_window(&mut raw).await,
        Frame::RstStream {
            stream_id: 1,
            status: RstStatus::FLOW_CONTROL_ERROR
        }
    );
}

#[tokio::test]
async fn window_overrun_stalls_the_transport_in_lax_mode() {
    let (_handle, mut incoming, raw) = raw_server(Config::spdystream_compatible()).await;
    let (mut raw_rx, mut raw_tx) = {
        let parts = raw.into_parts();
        let (r, w) = tokio::io::split(parts.io);
        (r, tokio_util::codec::FramedWrite::new(w, parts.codec))
    };
    // Keep draining what the server sends so only its reading can stall.
    tokio::spawn(async move { tokio::io::copy(&mut raw_rx, &mut tokio::io::sink()).await });
    raw_tx.send(syn(1)).await.unwrap();
    let mut stream = incoming.accept().await.unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..128 {
            raw_tx
                .send(Frame::Data {
                    stream_id: 1,
                    fin: false,
                    data: Bytes::from(vec![1u8; 16 * 1024]),
                })
                .await
                .unwrap();
            counter.fetch_add(16 * 1024, Ordering::SeqCst);
        }
        raw_tx
            .send(Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::new(),
            })
            .await
            .unwrap();
    });
    // 2 MiB ignoring the 64 KiB window: the server buffers one window plus the transport's buffer, then stops reading.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), async {
            while !sender.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_err()
    );
    let stalled_at = sent.load(Ordering::SeqCst);
    assert!(
        stalled_at <= 64 * 1024 + 64 * 1024 + 32 * 1024,
        "server kept reading: {stalled_at} bytes accepted"
    );
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    sender.await.unwrap();
    assert_eq!(got.len(), 128 * 16 * 1024);
}

#[tokio::test]
async fn initial_window_setting_applies_to_open_streams() {
    let (handle, _incoming, mut raw) = raw_server(Config::default()).await;
    raw.send(Frame::Settings {
        clear: false,
        entries: vec![Setting {
            flags: 0,
            id: SettingId::INITIAL_WINDOW_SIZE,
            value: 1000,
        }],
    })
    .await
    .unwrap();
    // Round-trip a ping so the SETTINGS is applied before the stream opens.
    raw.send(Frame::Ping { id: 1 }).await.unwrap();
    assert_eq!(next_non_window(&mut raw).await, Frame::Ping { id: 1 });
    let mut stream = handle
        .open_stream(h(&[("streamtype", "stdout")]), false)
        .unwrap();
    let writer = tokio::spawn(async move {
        stream.write_all(&[7u8; 5000]).await.unwrap();
        stream.shutdown().await.unwrap();
        stream
    });
    let mut received = 0;
    let mut take_data = async |raw: &mut Framed<DuplexStream, FrameCodec>, until: usize| {
        while received < until {
            match next_non_window(raw).await {
                Frame::Data {
                    stream_id: 2, data, ..
                } => received += data.len(),
                Frame::SynStream { stream_id: 2, .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        received
    };
    assert_eq!(take_data(&mut raw, 1000).await, 1000);
    // Raising the initial window by 3000 lets exactly 3000 more through on the open stream.
    raw.send(Frame::Settings {
        clear: false,
        entries: vec![Setting {
            flags: 0,
            id: SettingId::INITIAL_WINDOW_SIZE,
            value: 4000,
        }],
    })
    .await
    .unwrap();
    assert_eq!(take_data(&mut raw, 4000).await, 4000);
    raw.send(Frame::Ping { id: 3 }).await.unwrap();
    assert_eq!(
        next_non_window(&mut raw).await,
        Frame::Ping { id: 3 },
        "data went past the window"
    );
    raw.send(Frame::WindowUpdate {
        stream_id: 2,
        delta: 1000,
    })
    .await
    .unwrap();
    assert_eq!(take_data(&mut raw, 5000).await, 5000);
    assert_eq!(
        next_non_window(&mut raw).await,
        Frame::Data {
            stream_id: 2,
            fin: true,
            data: Bytes::new()
        }
    );
    drop(writer);
}

#[tokio::test]
async fn open_and_reset_streams_that_nobody_accepts_are_bounded() {
    let config = Config {
        max_concurrent_streams: 2,
        ..Config::default()
    };
    let (_handle, _incoming, mut raw) = raw_server(config).await;
    for id in [1, 3, 5, 7, 9] {
        raw.send(syn(id)).await.unwrap();
        raw.send(Frame::RstStream {
            stream_id: id,
            status: RstStatus::CANCEL,
        })
        .await
        .unwrap();
    }
    // None of them is active, but four unaccepted ones are held: the fifth is refused.
    assert_eq!(
        next_non_window(&mut raw).await,
        Frame::RstStream {
            stream_id: 9,
            status: RstStatus::REFUSED_STREAM
        }
    );
}

#[tokio::test]
async fn out_of_range_config_is_rejected() {
    let (a, _b) = tokio::io::duplex(1024);
    let config = Config {
        initial_window: u32::MAX,
        ..Config::default()
    };
    let err = Connection::new(a, Role::Server, config).unwrap_err();
    assert!(err.to_string().contains("windows must be at most"), "{err}");
}

/// Seeded random frame sequences (valid encodings, arbitrary ids, windows and settings) must
/// never wedge or crash a session: after the peer hangs up it always finishes closing.
#[tokio::test]
async fn random_frame_sequences_never_wedge_the_session() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut survived = 0;
    for _ in 0..40 {
        let (handle, mut incoming, mut raw) = raw_server(Config::default()).await;
        let acceptor = tokio::spawn(async move {
            while let Some(mut stream) = incoming.accept().await {
                let _ = stream.reply(Headers::new(), false);
                let _ = stream.write_all(b"hi").await;
                let mut buf = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_millis(5), stream.read(&mut buf)).await;
            }
        });
        // Streams are opened with increasing ids so most rounds get deep into stream handling.
        let mut last_syn = 0u32;
        for _ in 0..100 {
            let stream_id = (next() % (u64::from(last_syn) + 1)) as u32 + 1;
            let frame = match next() % 9 {
                0 => {
                    last_syn += if last_syn == 0 { 1 } else { 2 };
                    syn(last_syn)
                }
                1 => Frame::SynReply {
                    stream_id,
                    fin: next() % 2 == 0,
                    headers: Headers::new(),
                },
                2 => Frame::RstStream {
                    stream_id,
                    status: RstStatus((next() % 12) as u32 + 1),
                },
                3 => Frame::Settings {
                    clear: false,
                    entries: vec![Setting {
                        flags: 0,
                        id: SettingId((next() % 9) as u32),
                        value: next() as u32 & 0x7fff_ffff,
                    }],
                },
                4 => Frame::Ping { id: next() as u32 },
                5 => Frame::WindowUpdate {
                    stream_id: stream_id % 3,
                    delta: (next() % 65536) as u32 + 1,
                },
                6 => Frame::Headers {
                    stream_id,
                    fin: next() % 2 == 0,
                    headers: Headers::new(),
                },
                7 => Frame::GoAway {
                    last_good_stream_id: stream_id,
                    status: GoAwayStatus::OK,
                },
                _ => Frame::Data {
                    stream_id,
                    fin: next() % 4 == 0,
                    data: Bytes::from(vec![0u8; (next() % 2048) as usize]),
                },
            };
            if raw.send(frame).await.is_err() {
                break;
            }
        }
        drop(raw);
        let reason = tokio::time::timeout(WAIT, handle.closed())
            .await
            .expect("session wedged");
        survived += usize::from(reason == CloseReason::PeerClosed);
        assert!(
            matches!(
                reason,
                CloseReason::PeerClosed | CloseReason::Protocol(_) | CloseReason::Io(_)
            ),
            "{reason:?}"
        );
        tokio::time::timeout(WAIT, acceptor).await.unwrap().unwrap();
    }
    assert!(
        survived >= 10,
        "only {survived} of 40 random sessions got through without a protocol error"
    );
}

#[tokio::test]
async fn dropping_the_read_half_discards_data_without_stalling_the_sender() {
    let ((_server, mut incoming), (client, _)) = pair(Config::default());
    let mut stream = client
        .open_stream(h(&[("streamtype", "stdin")]), false)
        .unwrap();
    let server_stream = tokio::time::timeout(WAIT, incoming.accept())
        .await
        .unwrap()
        .unwrap();
    let (server_rx, mut server_tx) = server_stream.split();
    drop(server_rx);
    // Far more than one window: it must all be accepted and thrown away.
    tokio::time::timeout(WAIT, stream.write_all(&vec![3u8; 1 << 20]))
        .await
        .unwrap()
        .unwrap();
    stream.shutdown().await.unwrap();
    // The other direction still works.
    server_tx.write_all(b"done").await.unwrap();
    server_tx.shutdown().await.unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "done");
}

/// A spdystream peer stops reading while one of its frame handlers waits to write (it sends
/// SYN_REPLY from the stream handler, behind its own data writers). Here the raw peer writes a
/// 2 MiB burst on an echoed stream before it reads anything. The echo blocks on the full outbox,
/// its stream buffer fills, and if the server then stopped reading too, neither side would move
/// again (go_client_against_our_server hung like this). The server must read ahead while its
/// own sending is stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lax_mode_reads_ahead_while_the_peer_waits_for_its_own_writes() {
    const BURST: usize = 2 << 20;
    const FRAME: usize = 16 * 1024;
    let (handle, mut incoming, raw) = raw_server(Config::spdystream_compatible()).await;
    let parts = raw.into_parts();
    let (r, w) = tokio::io::split(parts.io);
    let mut raw_rx =
        tokio_util::codec::FramedRead::new(r, FrameCodec::new(CodecLimits::default()).unwrap());
    let mut raw_tx = tokio_util::codec::FramedWrite::new(w, parts.codec);
    raw_tx.send(syn(1)).await.unwrap();
    let stream = tokio::time::timeout(WAIT, incoming.accept())
        .await
        .expect("the server did not accept stream 1")
        .unwrap();
    stream.reply(Headers::new(), false).unwrap();
    let (mut rx, mut tx) = stream.split();
    let echo = tokio::spawn(async move {
        let n = tokio::io::copy(&mut rx, &mut tx).await.unwrap();
        tx.shutdown().await.unwrap();
        n
    });
    let data = payload(7, BURST);
    let sent = Arc::new(AtomicUsize::new(0));
    let burst = {
        let (data, sent) = (data.clone(), sent.clone());
        async move {
            for chunk in data.chunks(FRAME) {
                raw_tx
                    .send(Frame::Data {
                        stream_id: 1,
                        fin: false,
                        data: Bytes::copy_from_slice(chunk),
                    })
                    .await
                    .unwrap();
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            raw_tx
                .send(Frame::Data {
                    stream_id: 1,
                    fin: true,
                    data: Bytes::new(),
                })
                .await
                .unwrap();
            raw_tx
        }
    };
    // Nothing else runs on the peer side until the burst is written, so without read-ahead
    // this stalls for good; on success it takes milliseconds.
    let _raw_tx = tokio::time::timeout(WAIT, burst).await.unwrap_or_else(|_| {
        panic!(
            "the peer's burst on stream 1 stalled after {} of {BURST} bytes: the server stopped reading while its echo waited on the peer; server state: {}",
            sent.load(Ordering::SeqCst),
            handle.diagnostics()
        )
    });
    let mut echoed = Vec::new();
    let read_echo = async {
        loop {
            match raw_rx.next().await.unwrap().unwrap() {
                Frame::Data {
                    stream_id: 1,
                    fin,
                    data,
                } => {
                    echoed.extend_from_slice(&data);
                    if fin {
                        break;
                    }
                }
                Frame::SynReply { stream_id: 1, .. } | Frame::WindowUpdate { .. } => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    };
    if tokio::time::timeout(WAIT, read_echo).await.is_err() {
        panic!(
            "the echo of stream 1 stalled after {} of {BURST} bytes; server state: {}",
            echoed.len(),
            handle.diagnostics()
        );
    }
    assert_eq!(
        tokio::time::timeout(WAIT, echo)
            .await
            .expect("the server's echo task did not finish")
            .unwrap(),
        BURST as u64
    );
    assert_eq!(echoed.len(), BURST);
    assert!(echoed == data, "the echo differs from what was sent");
}
