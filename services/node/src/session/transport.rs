//! What a session runs over: a QUIC connection (a control stream, datagrams
//! and a push stream the node opens) or, for clients whose UDP is blocked,
//! one WebSocket on the HTTPS port carrying the same frames on channels
//! ([`hexfleet_protocol::ws`]). Sessions see only these types, so both
//! transports get the same messages, limits, validation and fan-out.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt, Stream, StreamExt,
};
use hexfleet_protocol::{
    ws::{self, Channel},
    ClientMsg, FrameCodec, FrameError, RiderUpdate, ServerMsg,
};
use serde::Serialize;
use tokio_util::codec::{FramedRead, FramedWrite};

pub(crate) use hexfleet_protocol::CloseAs;

use super::ERROR_FRAME_GRACE;

type WsSink = Arc<tokio::sync::Mutex<SplitSink<WebSocket, Message>>>;

/// The connection a session runs over.
pub(crate) enum Peer {
    Quic(quinn::Connection),
    Ws(WsPeer),
}

pub(crate) struct WsPeer {
    sink: WsSink,
    id: u64,
}

/// WebSocket sessions' ids: above any QUIC connection's stable id, so the
/// two never meet in the registry of drivers' sessions.
static WS_SESSIONS: AtomicU64 = AtomicU64::new(1 << 62);

impl Peer {
    /// Splits a WebSocket into the session's peer, control writer and
    /// control reader. A socket that brings nothing (no message, no ping)
    /// for `idle` is taken for gone, as a silent QUIC connection is: the
    /// SDK pings every 20 s when it has nothing else to say.
    pub(crate) fn websocket(
        socket: WebSocket,
        idle: std::time::Duration,
    ) -> (Peer, ControlWrite, ControlRead) {
        let (sink, stream) = socket.split();
        let sink = Arc::new(tokio::sync::Mutex::new(sink));
        let peer = WsPeer {
            sink: sink.clone(),
            id: WS_SESSIONS.fetch_add(1, Ordering::Relaxed),
        };
        let writer = WsWriter {
            sink,
            channel: Channel::Control,
        };
        (
            Peer::Ws(peer),
            ControlWrite::Ws(writer),
            ControlRead::Ws {
                stream,
                idle,
                silent_until: Box::pin(tokio::time::sleep(idle)),
            },
        )
    }

    /// Tells one session of a driver from the next.
    pub(crate) fn generation(&self) -> u64 {
        match self {
            Peer::Quic(conn) => conn.stable_id() as u64,
            Peer::Ws(ws) => ws.id,
        }
    }

    /// Whether fixes may come as datagrams.
    pub(crate) fn datagrams(&self) -> bool {
        match self {
            Peer::Quic(conn) => conn.max_datagram_size().is_some(),
            Peer::Ws(_) => false,
        }
    }

    /// The next datagram; `None` once the connection is gone. A WebSocket
    /// has none: it never resolves.
    pub(crate) async fn read_datagram(&self) -> Option<bytes::Bytes> {
        match self {
            Peer::Quic(conn) => conn.read_datagram().await.ok(),
            Peer::Ws(_) => std::future::pending().await,
        }
    }

    /// Resolves when the connection is gone. A WebSocket's end is seen by
    /// its reader (the control stream), so this never resolves for one.
    pub(crate) async fn closed(&self) {
        match self {
            Peer::Quic(conn) => {
                conn.closed().await;
            }
            Peer::Ws(_) => std::future::pending().await,
        }
    }

    /// Why the connection went away, when the transport knows.
    pub(crate) fn close_reason(&self) -> Option<String> {
        match self {
            Peer::Quic(conn) => conn.close_reason().map(|e| e.to_string()),
            Peer::Ws(_) => None,
        }
    }

    /// Opens the rider's push stream.
    pub(crate) async fn open_push(&self) -> Option<PushWrite> {
        match self {
            Peer::Quic(conn) => {
                let stream = conn.open_uni().await.ok()?;
                Some(PushWrite::Quic(FramedWrite::with_capacity(
                    stream,
                    FrameCodec::default(),
                    0,
                )))
            }
            Peer::Ws(ws) => Some(PushWrite::Ws(WsWriter {
                sink: ws.sink.clone(),
                channel: Channel::Updates,
            })),
        }
    }

    /// Closes the connection with `how`'s code and `reason`.
    pub(crate) async fn close(&self, how: CloseAs, reason: &str) {
        let mut reason = reason.to_string();
        match self {
            Peer::Quic(conn) => {
                truncate(&mut reason, 512);
                conn.close(how.quic_code().into(), reason.as_bytes());
            }
            Peer::Ws(ws) => {
                // A close frame's reason is at most 123 bytes.
                truncate(&mut reason, 123);
                let frame = CloseFrame {
                    code: how.websocket_code(),
                    reason: reason.into(),
                };
                let _ = tokio::time::timeout(ERROR_FRAME_GRACE, async {
                    ws.sink.lock().await.send(Message::Close(Some(frame))).await
                })
                .await;
            }
        }
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

/// Control frames are small and most connections idle: their buffers start
/// small and grow only when a frame needs it (tokio-util's default is 8 KiB
/// each, half of what an idle connection may cost in all).
const CONTROL_READ_BUFFER: usize = 256;

/// The client's control messages.
pub(crate) enum ControlRead {
    Quic(FramedRead<quinn::RecvStream, FrameCodec<ClientMsg, ServerMsg>>),
    Ws {
        stream: SplitStream<WebSocket>,
        idle: std::time::Duration,
        /// When the socket is taken for gone unless something comes.
        silent_until: Pin<Box<tokio::time::Sleep>>,
    },
}

impl ControlRead {
    pub(crate) fn quic(recv: quinn::RecvStream) -> Self {
        Self::Quic(FramedRead::with_capacity(
            recv,
            FrameCodec::default(),
            CONTROL_READ_BUFFER,
        ))
    }
}

/// Whether a WebSocket read failed on a message over the size limit (the
/// error tungstenite gives, as axum passes it on).
pub(crate) fn too_big(e: &axum::Error) -> bool {
    e.to_string().contains("Space limit exceeded")
}

impl Stream for ControlRead {
    type Item = Result<ClientMsg, FrameError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            ControlRead::Quic(read) => read.poll_next_unpin(cx),
            ControlRead::Ws {
                stream,
                idle,
                silent_until,
            } => loop {
                let next = match stream.poll_next_unpin(cx) {
                    Poll::Ready(next) => next,
                    Poll::Pending => {
                        // Silent too long: gone, like a QUIC idle timeout.
                        std::task::ready!(silent_until.as_mut().poll(cx));
                        return Poll::Ready(None);
                    }
                };
                silent_until
                    .as_mut()
                    .reset(tokio::time::Instant::now() + *idle);
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(e)) if too_big(&e) => {
                        return Poll::Ready(Some(Err(FrameError::TooLong)))
                    }
                    Some(Err(e)) => {
                        return Poll::Ready(Some(Err(FrameError::Io(std::io::Error::other(e)))))
                    }
                    None => return Poll::Ready(None),
                };
                return Poll::Ready(match message {
                    Message::Binary(bytes) => Some(ws::decode(Channel::Control, &bytes)),
                    Message::Text(_) => Some(Err(FrameError::UnknownChannel(b'{'))),
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Close(_) => None,
                });
            },
        }
    }
}

/// Writes one channel of a WebSocket.
pub(crate) struct WsWriter {
    sink: WsSink,
    channel: Channel,
}

impl WsWriter {
    async fn send<T: Serialize>(&self, item: &T) -> Result<(), FrameError> {
        let message = ws::encode(self.channel, item)?;
        self.sink
            .lock()
            .await
            .send(Message::Binary(message.into()))
            .await
            .map_err(|e| FrameError::Io(std::io::Error::other(e)))
    }
}

/// The node's control messages to the client.
pub(crate) enum ControlWrite {
    Quic(FramedWrite<quinn::SendStream, FrameCodec<ClientMsg, ServerMsg>>),
    Ws(WsWriter),
}

impl ControlWrite {
    pub(crate) fn quic(send: quinn::SendStream) -> Self {
        Self::Quic(FramedWrite::with_capacity(send, FrameCodec::default(), 0))
    }

    pub(crate) async fn send(&mut self, msg: ServerMsg) -> Result<(), FrameError> {
        match self {
            ControlWrite::Quic(write) => write.send(msg).await,
            ControlWrite::Ws(write) => write.send(&msg).await,
        }
    }

    /// Ends the stream and waits until the peer has read it (QUIC) or it
    /// is written (WebSocket, whose close frame follows it in order).
    pub(crate) async fn finish(&mut self) {
        if let ControlWrite::Quic(write) = self {
            if write.get_mut().finish().is_ok() {
                let _ = write.get_mut().stopped().await;
            }
        }
    }
}

/// A rider's updates.
pub(crate) enum PushWrite {
    Quic(FramedWrite<quinn::SendStream, FrameCodec<(), RiderUpdate>>),
    Ws(WsWriter),
}

impl PushWrite {
    pub(crate) async fn send(&mut self, update: RiderUpdate) -> Result<(), FrameError> {
        match self {
            PushWrite::Quic(write) => write.send(update).await,
            PushWrite::Ws(write) => write.send(&update).await,
        }
    }
}
