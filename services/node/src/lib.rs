//! The hexfleet ingest node.
//!
//! One driver fix flows one way through these modules:
//!
//! ```text
//! endpoint ─▶ session ─▶ validate ─▶ ingest ─▶ table
//!  (QUIC)    (handshake,  (reject +   (cell,     ├─▶ store::writer ─▶ store (memory | Redis)
//!             auth, acks)  reason)     shard)    │   (staged, coalesced, batched)
//!                                                └─▶ fanout ─▶ mailbox ─▶ rider session ─▶ QUIC stream
//!                                                    (cell index)  (latest wins)
//! ```
//!
//! Dispatch [`dashboard`]s are fan-out subscribers too, over WebSocket, and
//! read live per-cell counts when they watch a wide area.
//!
//! On the side: the [`sweeper`] evicts stale vehicles, [`http`] answers
//! queries from the store, [`metrics`] counts everything.
//!
//! In a [`cluster`], the session routes each fix to the node that owns its
//! shard (redirects, hand-offs), the store writer writes only shards whose
//! lease this node holds, each flush is published on the shard's bus, and
//! the fan-out also hears the replicas of other nodes' shards its
//! subscribers watch.
//!
//! [`Node::start`] runs all of it inside the caller's tokio runtime, so tests
//! and the simulator embed a node the same way the binary runs one.

pub mod auth;
pub mod budget;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod device_clock;
pub mod endpoint;
pub mod fanout;
pub mod http;
pub mod ingest;
pub mod mailbox;
pub mod metrics;
pub mod per_address;
pub mod reload;
pub mod session;
pub mod staging;
pub mod store;
pub mod sweeper;
pub mod table;
pub mod tls;
pub mod validate;
pub mod zones;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use hexfleet_protocol::bus::NodeInfo;

use crate::{
    cluster::{replicas::Replicas, Cluster, ClusterError},
    config::{Config, ConfigError, StoreKind},
    fanout::{FanOut, Reach},
    ingest::Ingest,
    metrics::Metrics,
    store::{
        memory::MemoryStore,
        redis::{Conn, RedisStore},
        writer::{Fences, StoreWriter, Unfenced},
        Store, StoreError,
    },
    sweeper::Sweeper,
    table::VehicleTable,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("token keys: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("QUIC: {0}")]
    Endpoint(#[from] endpoint::EndpointError),
    #[error("binding HTTP {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How long sessions may take to end at shutdown before the last changes
/// are written regardless; well within the grace `hexfleet-node` gives.
const SESSION_DRAIN: Duration = Duration::from_secs(2);

/// How long requests in flight may take to finish at shutdown.
const HTTP_GRACE: Duration = Duration::from_secs(2);

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    pub node_id: String,
    /// The QUIC address actually bound.
    pub quic_addr: SocketAddr,
    /// The HTTP address actually bound.
    pub http_addr: SocketAddr,
    /// Whether the HTTP listener speaks HTTPS (and WSS).
    pub http_tls: bool,
    /// The admin listener's address (metrics, probes).
    pub admin_addr: SocketAddr,
    /// The node's certificate, reloadable.
    pub certificates: Arc<tls::Certificates>,
    /// The development certificate clients should trust, if one is used.
    pub dev_cert: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
    pub table: Arc<VehicleTable>,
    pub store: Arc<dyn Store>,
    /// This node's place in a cluster, if it is in one.
    pub cluster: Option<Arc<Cluster>>,
    sweeper_handle: Arc<Sweeper>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    sessions: TaskTracker,
}

/// Opens the configured store, and the Redis connection a cluster shares
/// with it.
async fn open_store(
    config: &config::StoreConfig,
) -> Result<(Arc<dyn Store>, Option<Conn>), StoreError> {
    let redis = match config.kind {
        StoreKind::Memory => return Ok((Arc::new(MemoryStore::new()), None)),
        StoreKind::Redis => RedisStore::connect(&config.redis_url).await?,
        StoreKind::RedisCluster => {
            let seeds = config.redis_seeds();
            retrying(
                "connecting to the Redis Cluster",
                || RedisStore::connect_cluster(&seeds),
                StoreError::is_transient,
            )
            .await?
        }
    };
    let conn = redis.conn().clone();
    Ok((Arc::new(redis), Some(conn)))
}

/// Runs `attempt` until it succeeds or fails for good (`transient` says
/// no), with a backoff from 100 ms to 2 s, logging each failure: what a
/// node cannot start without (a Redis Cluster to learn slots from, a live
/// set to join) it waits for.
async fn retrying<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
    transient: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) if !transient(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Restores the store's vehicles once it answers, for a node that started
/// while it did not: newer fixes already taken live win.
async fn restore_when_the_store_answers(
    store: Arc<dyn Store>,
    ingest: Arc<Ingest>,
    shutdown: CancellationToken,
) {
    let states = tokio::select! {
        states = retrying("reading the store's vehicles", || store.load_all(), |_| true) => states,
        _ = shutdown.cancelled() => return,
    };
    let Ok(states) = states else { return };
    let restored = ingest.restore(states);
    tracing::info!(
        restored,
        "the store answers: took over the vehicles it holds"
    );
}

/// What this node announces to the others: its id and where clients and
/// operators reach it.
fn announcement(config: &Config, quic: SocketAddr, http: SocketAddr) -> NodeInfo {
    let or_bound = |advertised: &str, bound: SocketAddr| {
        if advertised.is_empty() {
            if bound.ip().is_unspecified() {
                tracing::warn!(%bound, "advertising an unspecified address; set cluster.advertise_quic/advertise_http");
            }
            bound.to_string()
        } else {
            advertised.to_string()
        }
    };
    NodeInfo {
        id: config.node_id.clone(),
        quic: or_bound(&config.cluster.advertise_quic, quic),
        http: or_bound(&config.cluster.advertise_http, http),
        // A port of 0: the one the listener bound (on the host given).
        peer_http: match config.cluster.peer_http.parse::<SocketAddr>() {
            Ok(peer) if peer.port() == 0 => SocketAddr::new(peer.ip(), http.port()).to_string(),
            _ => config.cluster.peer_http.clone(),
        },
        shards: Vec::new(),
        // Below 2^53, so any JSON reader keeps it exact.
        instance: rand::random::<u64>() >> 11,
        unreached: Default::default(),
    }
}

/// Binds the QUIC endpoint(s) with the node's certificate; returns them
/// and the address bound.
fn bind_quic(
    config: &Config,
    certificates: &Arc<tls::Certificates>,
    metrics: &metrics::Metrics,
) -> Result<(Vec<(quinn::Endpoint, endpoint::Released)>, SocketAddr), NodeError> {
    let server = certificates.quic(endpoint::transport(&config.quic)?)?;
    Ok(endpoint::bind(&config.quic, server, metrics)?)
}

async fn bind_http(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), NodeError> {
    let err = |source| NodeError::Http { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Runs the store writer until the node shuts down and its sessions have
/// ended, so their last changes are flushed too. Sessions end within a
/// fraction of a second (each tells its client and goes); one that does not
/// must not keep the last changes from being written, so the wait is bounded.
async fn write_until_sessions_end(
    writer: Arc<StoreWriter>,
    store: Arc<dyn Store>,
    cluster: Option<Arc<Cluster>>,
    flush_interval: Duration,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) {
    let stop = CancellationToken::new();
    let fences: Arc<dyn Fences> = match &cluster {
        Some(cluster) => cluster.clone(),
        None => Arc::new(Unfenced),
    };
    let writing = tokio::spawn(writer.clone().run(
        store.clone(),
        fences,
        flush_interval,
        stop.clone(),
    ));
    shutdown.cancelled().await;
    sessions.close();
    if tokio::time::timeout(SESSION_DRAIN, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = sessions.len(),
            "sessions still open after {SESSION_DRAIN:?}; writing the last changes anyway"
        );
    }
    stop.cancel();
    let _ = writing.await;
    // The last flush's zone events, to the stream before the leases go.
    for shard in writer.take_outboxes() {
        if let Err(e) = store.relay_zone_events(shard).await {
            tracing::warn!(%shard, error = %e, "relaying the last zone events; the shard's next owner will");
        }
    }
    // Written: the leases can go, and the others take the shards over.
    if let Some(cluster) = cluster {
        cluster.leave().await;
    }
}

/// After a store outage, rewrites every vehicle this node holds: the store
/// may have restarted empty.
async fn rewrite_after_outages(
    writer: Arc<StoreWriter>,
    table: Arc<VehicleTable>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = writer.recovered().notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let entries = table.entries();
        tracing::info!(
            vehicles = entries.len(),
            "rewriting all vehicles to the recovered store"
        );
        for entry in entries {
            writer.stage_upsert(entry.shard, entry.state, true);
        }
    }
}

impl Node {
    /// Starts a node: opens the store and takes over the vehicles it holds,
    /// binds QUIC and HTTP, and starts the writer and the sweeper.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        let cells = config.validate()?;
        if config.uses_dev_secret() {
            tracing::warn!("using the public development token secret: anyone can mint tokens; set HEXFLEET_TOKEN_SECRET in production");
        }
        let auth = Arc::new(auth::Auth::load(&config.auth)?);
        let certificates = tls::Certificates::load(&config.tls)?;
        if let Some(path) = &certificates.dev_cert {
            tracing::warn!(
                cert = %path.display(),
                "USING A SELF-SIGNED DEVELOPMENT CERTIFICATE: clients must be given it to trust; set tls.cert and tls.key in production"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let (store, redis) = open_store(&config.store).await?;
        let table = Arc::new(VehicleTable::new());
        let writer = Arc::new(StoreWriter::new(metrics.clone()));
        let clustered = config.cluster.enabled;
        let reach = clustered.then_some(Reach {
            cells,
            margin_m: config.cluster.handoff_distance_m,
            transit_grace: config.ingest.offline_grace,
        });
        let fanout = Arc::new(FanOut::with_reach(metrics.clone(), reach));
        let zones = Arc::new(zones::Zones::new(
            cells.index_res(),
            zones::ZoneLimits {
                max_vertices: config.zones.max_vertices,
                max_area_km2: config.zones.max_area_km2,
            },
            config.zones.max_zones,
            metrics.clone(),
        ));
        let ingest = Arc::new(Ingest {
            cells,
            table: table.clone(),
            writer: writer.clone(),
            fanout: fanout.clone(),
            metrics: metrics.clone(),
            zones: zones.clone(),
            handed: Default::default(),
        });
        // A single node owns everything in the store; a cluster node takes
        // over the shards it owns as it acquires their leases.
        let mut restore_later = false;
        metrics.store_up.set(1);
        if !clustered {
            match store.load_all().await {
                Ok(states) => {
                    metrics.store_up.set(1);
                    let restored = ingest.restore(states);
                    if restored > 0 {
                        tracing::info!(restored, "took over vehicles from the store");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the store does not answer: serving from memory; its vehicles are restored, and ours written, when it does");
                    metrics.store_up.set(0);
                    restore_later = true;
                }
            }
        }
        // The zones before any fix: a vehicle restored inside a zone must
        // not find it missing. A store that does not answer yet leaves the
        // memberships as stored until it does.
        let mut zones_version = 0;
        if let Err(e) =
            zones::sync::catch_up(store.as_ref(), &zones, &ingest, &mut zones_version).await
        {
            tracing::warn!(error = %e, "reading the zones; memberships stand as stored until the store answers");
        }
        let (endpoints, quic_addr) = bind_quic(&config, &certificates, &metrics)?;
        let (http_listener, http_addr) = bind_http(config.http.listen).await?;
        let (admin_listener, admin_addr) = bind_http(config.admin.listen).await?;
        // Where it listens, as bound (a port given as 0 is chosen here): a
        // supervisor or a test learns the ports from this line.
        tracing::info!(%quic_addr, %http_addr, %admin_addr, "listening");

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        // The admin listener answers from here on: while a cluster node
        // waits for Redis to join, probes see it live but not ready.
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admin_api = http::Api {
            node_id: config.node_id.as_str().into(),
            store: store.clone(),
            table: table.clone(),
            cells,
            metrics: metrics.clone(),
            limits: config.http.clone(),
            cluster: None,
            auth: auth.clone(),
            shutdown: shutdown.clone(),
            ready: ready.clone(),
            zones: zones.clone(),
            ingest: ingest.clone(),
        };
        let counted = axum::middleware::from_fn_with_state(metrics.clone(), http::count_requests);
        let admin = http::server::Listener {
            listener: admin_listener,
            router: http::admin_router(admin_api.clone()).layer(counted.clone()),
            max_connections: 64,
            per_address: per_address::PerAddress::new(64),
            header_timeout: config.http.header_timeout,
            tls: None,
            metrics: None,
        };
        tasks.spawn(http::server::serve(admin, shutdown.clone(), HTTP_GRACE));
        // Should the start fail from here, the admin listener stops too.
        let started = shutdown.clone().drop_guard();

        let cluster = match (clustered, redis) {
            (true, Some(conn)) => Some(
                retrying(
                    "joining the cluster",
                    || {
                        Cluster::join(
                            announcement(&config, quic_addr, http_addr),
                            conn.clone(),
                            config.cluster.clone(),
                            store.clone(),
                            writer.clone(),
                            ingest.clone(),
                            metrics.clone(),
                            cluster::reach::Peers::new(
                                config.http.tls,
                                &certificates.chain(),
                                config.cluster.renew_interval / 4,
                            ),
                        )
                    },
                    ClusterError::is_transient,
                )
                .await?,
            ),
            _ => None,
        };

        let sessions = TaskTracker::new();
        let ctx = Arc::new(session::Context::new(
            &config,
            auth.clone(),
            ingest.clone(),
            fanout.clone(),
            cluster.clone(),
            store.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(fanout.clone().run(shutdown.clone()));
        if restore_later {
            tasks.spawn(restore_when_the_store_answers(
                store.clone(),
                ingest.clone(),
                shutdown.clone(),
            ));
        }
        let http_per_address =
            per_address::PerAddress::new(config.http.max_connections_per_address);
        if let Some(cluster) = &cluster {
            tasks.spawn(cluster.clone().run(shutdown.clone()));
            tasks.spawn(
                cluster
                    .clone()
                    .exempt_members(http_per_address.clone(), shutdown.clone()),
            );
            let replicas = Replicas::new(store.clone(), fanout.clone(), cells, metrics.clone());
            tasks.spawn(replicas.run(
                config.store.clone(),
                fanout.needed_shards(),
                cluster.held_shards(),
                shutdown.clone(),
            ));
        }
        for (endpoint, released) in endpoints {
            tasks.spawn(endpoint::accept_loop(
                endpoint,
                released,
                ctx.clone(),
                endpoint::Admission::new(&config.quic),
                sessions.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(write_until_sessions_end(
            writer.clone(),
            store.clone(),
            cluster.clone(),
            config.store.flush_interval,
            sessions.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(zones::sync::follow_zones(
            store.clone(),
            zones.clone(),
            ingest.clone(),
            zones_version,
            config.zones.poll_interval,
            shutdown.clone(),
        ));
        tasks.spawn(zones::sync::relay_events(
            store.clone(),
            writer.clone(),
            cluster.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(zones::sync::show_events(
            store.clone(),
            zones.clone(),
            shutdown.clone(),
        ));
        if cluster.is_some() {
            tasks.spawn(zones::sync::share_counts(
                store.clone(),
                ingest.clone(),
                config.node_id.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(rewrite_after_outages(
            writer,
            table.clone(),
            shutdown.clone(),
        ));
        let sweeper = Arc::new(Sweeper {
            ingest: ingest.clone(),
            stale_after: config.store.stale_after,
            interval: config.store.sweep_interval,
        });
        tasks.spawn(sweeper.clone().run(shutdown.clone()));
        let dashboards = Arc::new(dashboard::Dashboards {
            node_id: config.node_id.clone(),
            cells,
            fanout,
            table: table.clone(),
            config: config.dashboard.clone(),
            slow_consumer_after: config.riders.slow_consumer_after,
            auth: auth.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            store: store.clone(),
            clustered,
            zones: zones.clone(),
            ingest,
            cluster: cluster.clone(),
        });
        let api = http::Api {
            cluster: cluster.clone(),
            ..admin_api
        };
        let router = dashboard::router(dashboards)
            .merge(session::router(ctx.clone()))
            .merge(http::router(api))
            .layer(counted);
        let http_tls = config.http.tls;
        let public = http::server::Listener {
            listener: http_listener,
            router,
            max_connections: config.http.max_connections,
            per_address: http_per_address.clone(),
            header_timeout: config.http.header_timeout,
            tls: http_tls
                .then(|| certificates.https().map(tokio_rustls::TlsAcceptor::from))
                .transpose()?,
            metrics: Some(metrics.clone()),
        };
        tasks.spawn(http::server::serve(public, shutdown.clone(), HTTP_GRACE));
        tasks.spawn(
            reload::Reloader {
                auth,
                certificates: certificates.clone(),
                metrics: metrics.clone(),
                interval: config.tls.reload_interval,
            }
            .run(shutdown.clone()),
        );
        tasks.close();
        started.disarm();
        ready.store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(node = %config.node_id, %quic_addr, %http_addr, %admin_addr, http_tls, store = store.kind(), "node started");
        Ok(Node {
            node_id: config.node_id,
            quic_addr,
            http_addr,
            http_tls,
            admin_addr,
            dev_cert: certificates.dev_cert.clone(),
            certificates,
            metrics,
            table,
            store,
            cluster,
            sweeper_handle: sweeper,
            shutdown,
            tasks,
            sessions,
        })
    }

    /// Runs one sweep now, as of `now_ms`; returns how many were evicted.
    pub fn sweep_now(&self, now_ms: i64) -> usize {
        self.sweeper_handle.sweep(now_ms)
    }

    /// Open sessions right now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// A token that is cancelled when the node shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes every session, flushes the store writer and
    /// waits (at most `grace`) for everything to end.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("node tasks did not stop within {grace:?}");
        }
    }
}
