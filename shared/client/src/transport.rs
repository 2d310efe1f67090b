//! What a client session runs over: QUIC, or — on a network that drops UDP —
//! one WebSocket on the node's HTTPS port carrying the same frames on
//! channels ([`hexfleet_protocol::ws`]). The driver and rider clients see
//! only these types.

use std::{
    fmt,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use futures_util::{stream::SplitSink, SinkExt, Stream, StreamExt};
pub(crate) use hexfleet_protocol::CloseAs;
use hexfleet_protocol::{
    ws::{self, Channel},
    ClientMsg, FrameCodec, FrameError, RiderUpdate, ServerMsg, MAX_FRAME_LEN,
};
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::TcpStream,
    sync::{mpsc, watch},
};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
        Message,
    },
    WebSocketStream,
};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::connector::ClientError;

/// How a session reaches its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Quic,
    /// A WebSocket on the node's HTTPS port, where UDP is blocked.
    WebSocket,
}

/// The connection a session runs over.
#[derive(Clone)]
pub(crate) enum Conn {
    Quic(quinn::Connection),
    Ws(Arc<WsConn>),
}

impl Conn {
    pub(crate) fn transport(&self) -> Transport {
        match self {
            Conn::Quic(_) => Transport::Quic,
            Conn::Ws(_) => Transport::WebSocket,
        }
    }

    /// Whether fixes may go as datagrams.
    pub(crate) fn datagrams(&self) -> bool {
        match self {
            Conn::Quic(conn) => conn.max_datagram_size().is_some(),
            Conn::Ws(_) => false,
        }
    }

    pub(crate) fn send_datagram(&self, bytes: bytes::Bytes) -> Result<(), ClientError> {
        match self {
            Conn::Quic(conn) => Ok(conn.send_datagram(bytes)?),
            Conn::Ws(_) => Err(ClientError::Protocol(
                "a WebSocket session has no datagrams".into(),
            )),
        }
    }

    /// The QUIC path's smoothed round trip and the packets it lost so far;
    /// `None` over a WebSocket (TCP sends again what it lost by itself).
    pub(crate) fn path(&self) -> Option<(std::time::Duration, u64)> {
        match self {
            Conn::Quic(conn) => Some((conn.rtt(), conn.stats().path.lost_packets)),
            Conn::Ws(_) => None,
        }
    }

    /// The node's QUIC address this connection stands for (over WebSocket,
    /// the one the client was asked to reach).
    pub(crate) fn node(&self) -> SocketAddr {
        match self {
            Conn::Quic(conn) => conn.remote_address(),
            Conn::Ws(ws) => ws.node,
        }
    }

    /// Resolves once the connection has ended; holds no borrow of it.
    pub(crate) fn ended(&self) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        match self {
            Conn::Quic(conn) => {
                let conn = conn.clone();
                Box::pin(async move {
                    conn.closed().await;
                })
            }
            Conn::Ws(ws) => {
                let mut closed = ws.closed.clone();
                Box::pin(async move {
                    let _ = closed.wait_for(|c| c.is_some()).await;
                })
            }
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Conn::Quic(conn) => conn.close_reason().is_some(),
            Conn::Ws(ws) => ws.closed.borrow().is_some(),
        }
    }

    /// Why the connection ended, when it has.
    pub(crate) fn close_error(&self) -> Option<ClientError> {
        match self {
            Conn::Quic(conn) => conn.close_reason().map(|e| ClientError::from_close(&e)),
            Conn::Ws(ws) => ws.closed.borrow().as_ref().map(WsClosed::error),
        }
    }

    /// Waits until the connection ends, and says why.
    pub(crate) async fn closed(&self) -> ClientError {
        match self {
            Conn::Quic(conn) => ClientError::from_close(&conn.closed().await),
            Conn::Ws(ws) => {
                let mut closed = ws.closed.clone();
                let ended = match closed.wait_for(Option::is_some).await {
                    Ok(c) => c.as_ref().map_or(ClientError::Timeout, WsClosed::error),
                    Err(_) => ClientError::Protocol("the WebSocket reader ended".into()),
                };
                ended
            }
        }
    }

    pub(crate) fn close(&self, how: CloseAs, reason: &str) {
        match self {
            Conn::Quic(conn) => conn.close(how.quic_code().into(), reason.as_bytes()),
            Conn::Ws(ws) => ws.close(how.websocket_code(), reason),
        }
    }
}

/// The node's control messages.
pub(crate) type ControlRead = Pin<Box<dyn Stream<Item = Result<ServerMsg, FrameError>> + Send>>;
/// A rider's updates.
pub(crate) type PushRead = Pin<Box<dyn Stream<Item = Result<RiderUpdate, FrameError>> + Send>>;

/// The client's control messages to the node.
pub(crate) enum ControlWrite {
    Quic(FramedWrite<quinn::SendStream, FrameCodec<ServerMsg, ClientMsg>>),
    Ws(Arc<WsConn>),
}

impl ControlWrite {
    pub(crate) async fn send(&mut self, msg: ClientMsg) -> Result<(), FrameError> {
        match self {
            ControlWrite::Quic(write) => write.send(msg).await,
            ControlWrite::Ws(ws) => ws.send(&msg).await,
        }
    }

    /// Ends the control stream (QUIC); a WebSocket ends with its close.
    pub(crate) fn finish(&mut self) {
        if let ControlWrite::Quic(write) = self {
            let _ = write.get_mut().finish();
        }
    }
}

/// A QUIC session's streams, as the session uses them.
pub(crate) fn quic_control(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> (ControlWrite, ControlRead) {
    // Control frames are small: buffers start small and grow on demand.
    let tx = FramedWrite::with_capacity(send, FrameCodec::default(), 0);
    let rx = FramedRead::with_capacity(recv, FrameCodec::<ServerMsg, ClientMsg>::default(), 256);
    (ControlWrite::Quic(tx), Box::pin(rx))
}

/// Counts the bytes read from a stream.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.count.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

/// The rider's push stream: the one the node opens over QUIC, or the
/// updates channel of a WebSocket. `bytes` counts what it carries.
pub(crate) async fn accept_push(
    conn: &Conn,
    bytes: &Arc<AtomicU64>,
) -> Result<PushRead, ClientError> {
    match conn {
        Conn::Quic(conn) => {
            let push = conn.accept_uni().await?;
            let counted = Counting {
                inner: push,
                count: bytes.clone(),
            };
            Ok(Box::pin(FramedRead::new(
                counted,
                FrameCodec::<RiderUpdate, ()>::default(),
            )))
        }
        Conn::Ws(ws) => {
            let Some(updates) = ws.updates.lock().take() else {
                return Err(ClientError::Protocol("the updates were taken".into()));
            };
            ws.update_bytes.store(0, Ordering::Relaxed);
            let counted = bytes.clone();
            let source = ws.update_bytes.clone();
            Ok(Box::pin(tokio_stream_from(updates).inspect(move |_| {
                counted.fetch_add(source.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            })))
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

type WsStream = WebSocketStream<TlsStream<TcpStream>>;
type WsSink = Arc<tokio::sync::Mutex<SplitSink<WsStream, Message>>>;

/// How a WebSocket ended.
#[derive(Debug, Clone)]
struct WsClosed {
    code: Option<u16>,
    reason: String,
}

impl WsClosed {
    fn error(&self) -> ClientError {
        match self.code.and_then(ws::error_of_close) {
            Some(code) => ClientError::Refused {
                code,
                reason: self.reason.clone(),
            },
            None => ClientError::WebSocket(match self.code {
                Some(code) => format!("closed ({code}) {}", self.reason),
                None => format!("lost: {}", self.reason),
            }),
        }
    }
}

/// A session over WebSocket: the writer is shared by the control channel
/// and the close; a reader task sorts what arrives into the control and
/// updates channels, each bounded, so a client that does not read its
/// updates stops reading the socket and the node sees it as slow.
pub(crate) struct WsConn {
    sink: WsSink,
    /// When the client last sent something.
    sent_at: Arc<parking_lot::Mutex<tokio::time::Instant>>,
    closed: watch::Receiver<Option<WsClosed>>,
    updates: parking_lot::Mutex<Option<mpsc::Receiver<Result<RiderUpdate, FrameError>>>>,
    update_bytes: Arc<AtomicU64>,
    closing: AtomicBool,
    node: SocketAddr,
    reader: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for WsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsConn").field("node", &self.node).finish()
    }
}

impl Drop for WsConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Frames waiting to be read, per channel, before the reader stops reading
/// the socket.
const WS_QUEUE: usize = 32;

impl WsConn {
    /// Opens `wss://<server_name>:<port>/v1/connect` on `https`, for the
    /// node whose QUIC address is `node`. `liveness` is QUIC's keep-alive
    /// and idle timeout: the client pings when it has sent nothing, or
    /// heard nothing, for the first, and takes a node silent for the
    /// second for gone (the node answers every ping).
    pub(crate) async fn connect(
        tls: Arc<rustls::ClientConfig>,
        server_name: &str,
        https: SocketAddr,
        node: SocketAddr,
        liveness: (std::time::Duration, std::time::Duration),
    ) -> Result<(Conn, ControlWrite, ControlRead), ClientError> {
        let tcp = TcpStream::connect(https)
            .await
            .map_err(|e| ClientError::WebSocket(format!("connecting to {https}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::WebSocket(format!("TLS with {https}: {e}")))?;
        let url = format!("wss://{server_name}:{}{}", https.port(), ws::PATH);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_LEN + 1))
            .max_frame_size(Some(MAX_FRAME_LEN + 1))
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0);
        let (socket, _) = tokio_tungstenite::client_async_with_config(url, tls, Some(config))
            .await
            .map_err(|e| ClientError::WebSocket(format!("upgrading {https}: {e}")))?;
        let (sink, stream) = socket.split();
        let (control_tx, control_rx) = mpsc::channel(WS_QUEUE);
        let (updates_tx, updates_rx) = mpsc::channel(WS_QUEUE);
        let (closed_tx, closed) = watch::channel(None);
        let update_bytes = Arc::new(AtomicU64::new(0));
        let sink: WsSink = Arc::new(tokio::sync::Mutex::new(sink));
        let sent_at = Arc::new(parking_lot::Mutex::new(tokio::time::Instant::now()));
        let reader = tokio::spawn(read_ws(
            stream,
            Channels {
                control: control_tx,
                updates: updates_tx,
                closed: closed_tx,
                update_bytes: update_bytes.clone(),
            },
            Liveness {
                sink: sink.clone(),
                sent_at: sent_at.clone(),
                keep_alive: liveness.0,
                idle: liveness.1,
            },
        ));
        let conn = Arc::new(WsConn {
            sink,
            sent_at,
            closed,
            updates: parking_lot::Mutex::new(Some(updates_rx)),
            update_bytes,
            closing: AtomicBool::new(false),
            node,
            reader,
        });
        Ok((
            Conn::Ws(conn.clone()),
            ControlWrite::Ws(conn),
            Box::pin(tokio_stream_from(control_rx)),
        ))
    }

    async fn send(&self, msg: &ClientMsg) -> Result<(), FrameError> {
        let message = ws::encode(Channel::Control, msg)?;
        *self.sent_at.lock() = tokio::time::Instant::now();
        self.sink
            .lock()
            .await
            .send(Message::Binary(message.into()))
            .await
            .map_err(|e| FrameError::Io(std::io::Error::other(e)))
    }

    /// Sends a close frame (once), without waiting long for a node that
    /// does not read.
    fn close(self: &Arc<Self>, code: u16, reason: &str) {
        if self.closing.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                this.sink
                    .lock()
                    .await
                    .send(Message::Close(Some(frame)))
                    .await
            })
            .await;
        });
    }
}

/// Where the reader puts what arrives.
struct Channels {
    control: mpsc::Sender<Result<ServerMsg, FrameError>>,
    updates: mpsc::Sender<Result<RiderUpdate, FrameError>>,
    closed: watch::Sender<Option<WsClosed>>,
    update_bytes: Arc<AtomicU64>,
}

/// What keeps a WebSocket session's liveness (see [`WsConn::connect`]).
struct Liveness {
    sink: WsSink,
    sent_at: Arc<parking_lot::Mutex<tokio::time::Instant>>,
    keep_alive: std::time::Duration,
    idle: std::time::Duration,
}

impl Liveness {
    /// Pings if nothing was sent or heard for `keep_alive`; `false` when
    /// the node has been silent past `idle`.
    async fn check(&self, heard_at: tokio::time::Instant) -> bool {
        let now = tokio::time::Instant::now();
        if now.duration_since(heard_at) >= self.idle {
            return false;
        }
        let sent_at = *self.sent_at.lock();
        let quiet = now
            .duration_since(sent_at)
            .min(now.duration_since(heard_at));
        if quiet >= self.keep_alive {
            *self.sent_at.lock() = now;
            let ping = async {
                let mut sink = self.sink.lock().await;
                sink.send(Message::Ping(Vec::new().into())).await
            };
            let _ = tokio::time::timeout(self.keep_alive, ping).await;
        }
        true
    }

    /// When to look again.
    fn next_check(&self, heard_at: tokio::time::Instant) -> tokio::time::Instant {
        let sent_at = *self.sent_at.lock();
        let next = sent_at.min(heard_at) + self.keep_alive;
        next.min(heard_at + self.idle)
    }
}

async fn read_ws(
    mut stream: futures_util::stream::SplitStream<WsStream>,
    channels: Channels,
    liveness: Liveness,
) {
    let Channels {
        control,
        updates,
        closed,
        update_bytes,
    } = channels;
    let mut heard_at = tokio::time::Instant::now();
    let ended = loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = tokio::time::sleep_until(liveness.next_check(heard_at)) => {
                if liveness.check(heard_at).await {
                    continue;
                }
                break WsClosed {
                    code: None,
                    reason: format!("the node was silent for {:?}", liveness.idle),
                };
            }
        };
        heard_at = tokio::time::Instant::now();
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                break WsClosed {
                    code: None,
                    reason: e.to_string(),
                }
            }
            None => {
                break WsClosed {
                    code: None,
                    reason: "the connection ended".into(),
                }
            }
        };
        let bytes = match message {
            Message::Binary(bytes) => bytes,
            Message::Close(frame) => {
                break WsClosed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                }
            }
            // Text is not part of the protocol; pings are answered by
            // tungstenite.
            _ => continue,
        };
        match ws::channel_of(&bytes) {
            Ok((Channel::Updates, _)) => {
                update_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                // A driver never takes its updates: nothing comes on them.
                let _ = updates.send(ws::decode(Channel::Updates, &bytes)).await;
            }
            _ => {
                if control
                    .send(ws::decode(Channel::Control, &bytes))
                    .await
                    .is_err()
                {
                    // Nobody reads the control channel: the session is over.
                }
            }
        }
    };
    let _ = closed.send(Some(ended));
}

/// A QUIC socket that can behave as on a network that drops UDP, and counts
/// the datagrams it sends and receives (each one wakes a phone's radio).
#[derive(Debug)]
pub(crate) struct CountedSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    pub(crate) udp: Arc<UdpStats>,
}

/// Datagrams a connector's QUIC sockets sent and received, and whether UDP
/// is to be dropped.
#[derive(Debug, Default)]
pub(crate) struct UdpStats {
    pub(crate) blocked: AtomicBool,
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
}

impl CountedSocket {
    pub(crate) fn new(inner: Arc<dyn quinn::AsyncUdpSocket>, udp: Arc<UdpStats>) -> Self {
        Self { inner, udp }
    }
}

impl quinn::AsyncUdpSocket for CountedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        if self.udp.blocked.load(Ordering::Relaxed) {
            // Dropped on the way, as a firewall does: the sender never knows.
            return Ok(());
        }
        self.inner.try_send(transmit)?;
        let datagrams = match transmit.segment_size {
            Some(size) if size > 0 => transmit.contents.len().div_ceil(size),
            _ => 1,
        };
        self.udp.sent.fetch_add(datagrams as u64, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let n = std::task::ready!(self.inner.poll_recv(cx, bufs, meta))?;
            if self.udp.blocked.load(Ordering::Relaxed) {
                continue;
            }
            let datagrams: usize = meta[..n]
                .iter()
                .map(|m| m.len.div_ceil(m.stride.max(1)))
                .sum();
            self.udp
                .received
                .fetch_add(datagrams as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(n));
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
