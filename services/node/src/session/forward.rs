//! A driver whose shard's owner its client cannot reach (its peers' probes
//! say so, or the client did: see [`cluster::probe`](crate::cluster::probe))
//! is kept by the node it reached, which relays its session to the owner
//! over the cluster's own path: a WebSocket to the owner's client endpoint
//! on its HTTP address (`GET /v1/connect`), which its peers reach.
//!
//! The owner runs the driver's session as if the driver were connected to
//! it: the same token (it checks it), the same validation, sequence numbers
//! and clock, and an `Ack` only once a fix is written. This node passes the
//! client's fixes and messages on and the owner's acknowledgements, redirects
//! and refusals back, so a forwarded fix carries exactly the promise of a
//! direct one, and a fix sent again after a reconnect is the same fix to the
//! owner. Riders and dashboards see the vehicle as any of the owner's, with
//! nothing but the relay's hop added.

use std::time::Duration;

use futures_util::{stream, SinkExt, StreamExt};
use hexfleet_model::VehicleId;
use hexfleet_protocol::{
    decode_datagram,
    ws::{self, Channel},
    ClientMsg, DriverReport, ErrorCode, Fix, Hello, Redirect, RejectReason, Role, ServerMsg,
    PROTOCOL_VERSION,
};
use tokio_tungstenite::tungstenite::{
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};
use tokio_util::sync::CancellationToken;

use super::{
    driver::{client_events, Event},
    send,
    transport::{CloseAs, ControlRead, ControlWrite, Peer},
    Context, Expiry, Goodbye, Outcome, Refusal, Stop, ERROR_FRAME_GRACE,
};
use crate::cluster::reach::PeerSocket;

/// How long the owner has to take the relayed session (connect and
/// welcome) before the driver is told to connect again later.
const OWNER_WAIT: Duration = Duration::from_secs(2);

/// How long a relayed `Goodbye` waits for the owner's last word (its own
/// wait for the sign-off to be written is shorter).
const GOODBYE_WAIT: Duration = Duration::from_secs(3);

/// How often a relay looks whether its client may reach the owner again.
const REACH_LOOK_EVERY: Duration = Duration::from_secs(1);

/// How long a client names a node it could not reach (the SDK's
/// `UNREACHABLE_MEMORY`): a relay its client asked for is not ended sooner,
/// or the client would only come back.
const CLIENT_REPORT_MEMORY: Duration = Duration::from_secs(30);

/// What a relayed session starts from.
pub(super) struct Relay {
    pub token: String,
    /// Where a redirect would send the driver: where it goes once its
    /// client can reach the owner again.
    pub owner: Redirect,
    /// Whether the client itself said it cannot reach the owner (rather
    /// than only the owner's peers).
    pub reported: bool,
    /// Where the peers reach the HTTP API of the shard's owner.
    pub via: String,
    pub report: DriverReport,
    /// The fix that found the driver's shard elsewhere, not yet accepted
    /// anywhere.
    pub first: Option<Fix>,
    pub superseded: CancellationToken,
    pub expiry: Expiry,
}

/// Relays the driver's session to its shard's owner until it ends.
pub(super) async fn relay(
    conn: &Peer,
    tx: &mut ControlWrite,
    rx: &mut ControlRead,
    ctx: &Context,
    id: &VehicleId,
    relay: Relay,
) -> Outcome {
    let metrics = &ctx.ingest.metrics;
    metrics.drivers_forwarded.inc();
    metrics.forwarded_sessions.inc();
    tracing::info!(vehicle = %id, owner = %relay.via, "the shard's owner is unreachable for this driver: relaying its session there");
    let outcome = run(conn, tx, rx, ctx, &relay).await;
    metrics.forwarded_sessions.dec();
    let how = match &outcome {
        Ok(Goodbye) => "goodbye",
        Err(Stop::Lost) => "lost",
        Err(Stop::Redirected(_)) => "redirected",
        Err(Stop::Refused(r)) if r.code == ErrorCode::Unavailable => "owner_unavailable",
        Err(Stop::Refused(_)) => "refused",
    };
    metrics.forward_ended(how).inc();
    outcome
}

async fn run(
    conn: &Peer,
    tx: &mut ControlWrite,
    rx: &mut ControlRead,
    ctx: &Context,
    relay: &Relay,
) -> Outcome {
    let owner = match tokio::time::timeout(OWNER_WAIT, open(ctx, relay)).await {
        Ok(Ok(Opened::Welcomed(socket))) => socket,
        Ok(Ok(Opened::Ended(stop))) => return Err(stop),
        Ok(Err(reason)) => return Err(unavailable(&reason)),
        Err(_) => return Err(unavailable("it did not take the session in time")),
    };
    let (mut to_owner, mut from_owner) = (*owner).split();
    let sources = client_events(conn, rx, relay.expiry, ctx, &relay.superseded);
    let mut events = stream::select_all(sources);
    // The owner takes a silent socket for gone; the driver's own
    // keep-alives end here.
    let mut ping = tokio::time::interval(ctx.idle_timeout / 3);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut goodbye_by: Option<tokio::time::Instant> = None;
    let started = tokio::time::Instant::now();
    let mut look = tokio::time::interval(REACH_LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let goodbye_late = async {
            match goodbye_by {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.next(), if goodbye_by.is_none() => {
                let msg = match event {
                    Some(Event::Datagram(Some(bytes))) => match decode_datagram::<Fix>(&bytes) {
                        Ok(fix) => ClientMsg::Fix(fix),
                        Err(_) => {
                            ctx.ingest.metrics.rejected(RejectReason::Malformed).inc();
                            continue;
                        }
                    },
                    Some(Event::Datagram(None)) | None => {
                        close_owner(&mut to_owner, "the driver's connection was lost").await;
                        return Err(Stop::Lost);
                    }
                    Some(Event::Control(Err(stop))) => {
                        close_owner(&mut to_owner, "the driver's connection ended").await;
                        return Err(stop);
                    }
                    Some(Event::Control(Ok(msg))) => match msg {
                        ClientMsg::Hello(_) => {
                            close_owner(&mut to_owner, "Hello sent twice").await;
                            return Err(Refusal::new(ErrorCode::ProtocolViolation, "Hello sent twice").into());
                        }
                        ClientMsg::Subscribe(_) => {
                            close_owner(&mut to_owner, "drivers do not subscribe").await;
                            return Err(Refusal::new(ErrorCode::ProtocolViolation, "drivers do not subscribe").into());
                        }
                        ClientMsg::Goodbye => {
                            goodbye_by = Some(tokio::time::Instant::now() + GOODBYE_WAIT);
                            ClientMsg::Goodbye
                        }
                        other => other,
                    },
                    Some(Event::Expired(refusal)) => {
                        close_owner(&mut to_owner, &refusal.reason).await;
                        return Err(refusal.into());
                    }
                    Some(Event::Superseded) => {
                        close_owner(&mut to_owner, "the driver connected again").await;
                        return Err(Refusal::new(ErrorCode::Superseded, "the driver connected again").into());
                    }
                    Some(Event::ShuttingDown) => {
                        close_owner(&mut to_owner, "the relaying node is shutting down").await;
                        return Err(Refusal::new(ErrorCode::ShuttingDown, "the node is shutting down").into());
                    }
                    // The owner's session looks after its shard's changes.
                    Some(Event::OwnershipChanged) => continue,
                };
                if matches!(msg, ClientMsg::Fix(_)) {
                    ctx.ingest.metrics.fixes_relayed.inc();
                }
                if let Err(reason) = forward(&mut to_owner, &msg).await {
                    return Err(unavailable(&reason));
                }
            }
            message = from_owner.next() => {
                match from_owner_said(message) {
                    Said::Msg(ServerMsg::Ack(ack)) => send(tx, ServerMsg::Ack(ack), ctx).await?,
                    Said::Msg(ServerMsg::Redirect(redirect)) => return Err(Stop::Redirected(redirect)),
                    Said::Msg(ServerMsg::Error(e)) => return Err(Refusal::new(e.code, e.reason).into()),
                    Said::Msg(_) | Said::Nothing => {}
                    Said::Closed(_) if goodbye_by.is_some() => {
                        // The owner wrote the sign-off and said so.
                        let _ = tokio::time::timeout(ERROR_FRAME_GRACE, tx.finish()).await;
                        conn.close(CloseAs::Goodbye, "goodbye").await;
                        return Ok(Goodbye);
                    }
                    Said::Closed(reason) => return Err(unavailable(&reason)),
                }
            }
            _ = ping.tick() => {
                if to_owner.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return Err(unavailable("its socket closed"));
                }
            }
            // Forwarding is a bridge: once the owner's peers reach it again
            // (and the client's own report, if any, has lapsed), the driver
            // goes there itself.
            _ = look.tick(), if goodbye_by.is_none() => {
                let reachable = ctx
                    .cluster
                    .as_deref()
                    .is_some_and(|c| c.reachable_at(&relay.owner.addr));
                let lapsed = !relay.reported || started.elapsed() >= CLIENT_REPORT_MEMORY;
                if reachable && lapsed {
                    close_owner(&mut to_owner, "its client can reach this node again").await;
                    return Err(Stop::Redirected(relay.owner.clone()));
                }
            }
            _ = goodbye_late => {
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    "the sign-off could not be confirmed; say goodbye again",
                )
                .into());
            }
        }
    }
}

/// What opening the relayed session came to.
enum Opened {
    Welcomed(Box<PeerSocket>),
    /// The owner redirected or refused the driver: the client is told so.
    Ended(Stop),
}

/// Connects to the owner, says `Hello` with the driver's token, and, once
/// welcomed, the driver's report and the fix that found its shard there.
async fn open(ctx: &Context, relay: &Relay) -> Result<Opened, String> {
    let cluster = ctx.cluster.as_deref().ok_or("no cluster")?;
    let mut socket = cluster
        .peers()
        .websocket(&relay.via)
        .await
        .map_err(|e| e.to_string())?;
    let hello = ClientMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Driver,
        token: relay.token.clone(),
        unreachable: Vec::new(),
    });
    forward(&mut socket, &hello).await?;
    loop {
        match from_owner_said(socket.next().await) {
            Said::Msg(ServerMsg::Welcome(_)) => break,
            Said::Msg(ServerMsg::Redirect(redirect)) => {
                return Ok(Opened::Ended(Stop::Redirected(redirect)))
            }
            Said::Msg(ServerMsg::Error(e)) => {
                return Ok(Opened::Ended(Refusal::new(e.code, e.reason).into()))
            }
            Said::Msg(_) | Said::Nothing => {}
            Said::Closed(reason) => return Err(reason),
        }
    }
    forward(&mut socket, &ClientMsg::Driver(relay.report)).await?;
    if let Some(fix) = relay.first {
        forward(&mut socket, &ClientMsg::Fix(fix)).await?;
        ctx.ingest.metrics.fixes_relayed.inc();
    }
    Ok(Opened::Welcomed(Box::new(socket)))
}

/// What one read of the owner's socket brought.
enum Said {
    Msg(ServerMsg),
    /// A ping, a pong, or a message for the push channel.
    Nothing,
    /// The socket ended, and why.
    Closed(String),
}

fn from_owner_said(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Said {
    match message {
        Some(Ok(Message::Binary(bytes))) => match ws::decode::<ServerMsg>(Channel::Control, &bytes)
        {
            Ok(msg) => Said::Msg(msg),
            Err(e) => Said::Closed(format!("it sent an unreadable message: {e}")),
        },
        Some(Ok(Message::Close(frame))) => Said::Closed(match frame {
            Some(frame) => format!("it closed the session: {}", frame.reason),
            None => "it closed the session".into(),
        }),
        Some(Ok(_)) => Said::Nothing,
        Some(Err(e)) => Said::Closed(format!("its socket failed: {e}")),
        None => Said::Closed("its socket closed".into()),
    }
}

async fn forward<S>(socket: &mut S, msg: &ClientMsg) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let bytes = ws::encode(Channel::Control, msg).map_err(|e| e.to_string())?;
    socket
        .send(Message::Binary(bytes.into()))
        .await
        .map_err(|e| format!("writing to it: {e}"))
}

/// Ends the owner's side of the session as the client's ended: the owner
/// takes the driver for lost (and gives it its grace), as a direct
/// connection gone silent.
async fn close_owner<S>(socket: &mut S, reason: &str)
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let mut reason = reason.to_string();
    reason.truncate(120);
    let frame = CloseFrame {
        code: CloseCode::Away,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(ERROR_FRAME_GRACE, socket.send(Message::Close(Some(frame)))).await;
}

fn unavailable(why: &str) -> Stop {
    Refusal::new(
        ErrorCode::Unavailable,
        format!("the node that owns this driver's shard cannot take it now ({why}); connect again shortly"),
    )
    .into()
}
