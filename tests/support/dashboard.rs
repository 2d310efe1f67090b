//! A dashboard's WebSocket for tests, and the view it builds from what the
//! node sends: what a browser would show, checked without a browser.

use std::{collections::HashMap, time::Duration};

use futures_util::{SinkExt, StreamExt};
use hexfleet_model::VehicleState;
use hexfleet_protocol::dashboard::{DashboardEvent, StatusCounts, ViewMode};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{protocol::frame::coding::CloseCode, Message},
    MaybeTlsStream, WebSocketStream,
};

use crate::TestNode;

const WAIT: Duration = Duration::from_secs(10);

pub struct DashboardSocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub view: DashboardView,
}

/// What a dashboard shows, rebuilt from events as the page does.
#[derive(Debug, Default)]
pub struct DashboardView {
    pub mode: Option<ViewMode>,
    pub resolution: u8,
    /// The latest subscription an update or density message reflected.
    pub subscription: u32,
    pub cells: Vec<String>,
    pub outlined: HashMap<String, usize>,
    pub vehicles: HashMap<String, VehicleState>,
    pub counts: HashMap<String, StatusCounts>,
}

impl DashboardView {
    pub fn apply(&mut self, event: &DashboardEvent) {
        match event {
            DashboardEvent::View(v) => {
                if self.mode != Some(v.mode) {
                    self.vehicles.clear();
                    self.counts.clear();
                }
                self.mode = Some(v.mode);
                self.resolution = v.resolution;
                self.cells = v.cells.clone();
            }
            DashboardEvent::Outlines(o) => {
                for o in &o.outlines {
                    let again = self.outlined.insert(o.cell.clone(), o.boundary.len());
                    assert!(again.is_none(), "{} outlined twice", o.cell);
                }
            }
            DashboardEvent::Update(u) => {
                self.subscription = u.subscription;
                if u.snapshot {
                    self.vehicles.clear();
                }
                for r in &u.removed {
                    assert!(
                        self.vehicles.remove(&r.id).is_some(),
                        "removed {} which was never shown",
                        r.id
                    );
                }
                for a in &u.added {
                    self.vehicles.insert(a.id.to_string(), a.clone());
                }
                for m in &u.moved {
                    let v = self
                        .vehicles
                        .get_mut(&m.id)
                        .unwrap_or_else(|| panic!("moved {} which was never added", m.id));
                    (v.lat, v.lon, v.fix_time_ms) = (m.lat, m.lon, m.fix_time_ms);
                }
            }
            DashboardEvent::Density(d) => {
                self.subscription = d.subscription;
                if d.snapshot {
                    self.counts.clear();
                }
                for c in &d.cells {
                    if c.counts.total() == 0 {
                        self.counts.remove(&c.cell);
                    } else {
                        self.counts.insert(c.cell.clone(), c.counts);
                    }
                }
            }
            _ => {}
        }
    }

    /// All counts summed.
    pub fn counted(&self) -> StatusCounts {
        self.counts
            .values()
            .fold(StatusCounts::default(), |mut sum, c| {
                sum.available += c.available;
                sum.on_trip += c.on_trip;
                sum.off_duty += c.off_duty;
                sum
            })
    }
}

impl DashboardSocket {
    /// Opens `/v1/ws` with the given query string (`token=...&format=...`).
    pub async fn connect(
        node: &TestNode,
        query: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        Self::connect_to(node.node.http_addr, query).await
    }

    /// Opens `/v1/ws` on a node's HTTP address.
    pub async fn connect_to(
        http_addr: std::net::SocketAddr,
        query: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let url = format!("ws://{http_addr}/v1/ws?{query}");
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self::over(ws))
    }

    /// Like [`DashboardSocket::connect`], with a receive buffer of a few KB:
    /// a dashboard that stops reading blocks the node's writes quickly.
    pub async fn connect_small_buffer(
        node: &TestNode,
        query: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let stream = socket.connect(node.node.http_addr).await?;
        let url = format!("ws://{}/v1/ws?{query}", node.node.http_addr);
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await?;
        Ok(Self::over(ws))
    }

    fn over(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        Self {
            ws,
            view: DashboardView::default(),
        }
    }

    pub async fn send(&mut self, request: serde_json::Value) {
        self.send_text(&request.to_string()).await;
    }

    /// Sends a request; `Err` once the node has dropped the socket.
    pub async fn try_send(
        &mut self,
        request: serde_json::Value,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let send = self.ws.send(Message::text(request.to_string()));
        match tokio::time::timeout(WAIT, send).await {
            Ok(sent) => sent,
            Err(_) => Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .expect("sending to the dashboard socket");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::binary(bytes))
            .await
            .expect("sending to the dashboard socket");
    }

    /// The next event (JSON or MessagePack), applied to the view.
    pub async fn next(&mut self) -> DashboardEvent {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("an event within the wait")
                .expect("the socket is open")
                .expect("a readable message");
            let event: DashboardEvent = match message {
                Message::Text(text) => serde_json::from_str(&text).expect("a JSON event"),
                Message::Binary(bytes) => {
                    rmp_serde::from_slice(&bytes).expect("a MessagePack event")
                }
                Message::Close(frame) => panic!("closed by the node: {frame:?}"),
                _ => continue,
            };
            self.view.apply(&event);
            return event;
        }
    }

    /// Reads events until one satisfies `check`, and returns it.
    pub async fn until(
        &mut self,
        what: &str,
        check: impl Fn(&DashboardEvent) -> bool,
    ) -> DashboardEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            let event = self.next().await;
            if check(&event) {
                return event;
            }
        }
    }

    /// Reads events until the view satisfies `check`.
    pub async fn until_view(&mut self, what: &str, check: impl Fn(&DashboardView) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check(&self.view) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            self.next().await;
        }
    }

    /// Reads what has already arrived, without waiting; returns the close
    /// code if the node has closed the socket. A client that floods requests
    /// must notice the close before writing on: a write to a closed TCP
    /// socket draws a reset, which discards the close frame unread.
    pub fn closed_already(&mut self) -> Option<u16> {
        use futures_util::FutureExt;
        while let Some(message) = self.ws.next().now_or_never() {
            match message {
                Some(Ok(Message::Close(frame))) => {
                    return Some(frame.map_or(u16::from(CloseCode::Status), |f| u16::from(f.code)))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Some(u16::from(CloseCode::Status)),
            }
        }
        None
    }

    /// Waits for the node to close the socket; returns its code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the node closes the socket within the wait");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                    return (u16::from(CloseCode::Status), String::new())
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}
