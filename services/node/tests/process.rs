//! `hexfleet-node` as operators run it: a process of its own, stopped by a
//! signal, refusing a configuration that would let anyone in.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::{healthy, listening, loopback, on_chosen_ports, stored, WAIT};
use hexfleet_client::{ClientError, Connector, FixInput};
use hexfleet_model::{VehicleClass, VehicleId, VehicleStatus};
use hexfleet_protocol::{dev, Claims, DriverReport, ErrorCode, Role};
use hexfleet_testkit::{eventually, RedisServer};
use rustix::process::{kill_process, Pid, Signal};

const SECRET: &str = "process-test-secret-0123456789";

/// A `hexfleet-node` process on loopback ports of its choosing; killed if
/// dropped.
struct NodeProcess {
    child: Child,
    quic: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

/// The node binary with a clean environment: no secret, no config file, its
/// development certificate in `dir`.
fn node_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hexfleet-node"));
    command
        .env_remove("HEXFLEET_TOKEN_SECRET")
        .env_remove("HEXFLEET_CONFIG")
        .env_remove("HEXFLEET_DEV")
        .env("HEXFLEET_DEV_DIR", dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    command
}

impl NodeProcess {
    async fn start(redis: &RedisServer) -> Self {
        Self::launch(tempfile::tempdir().unwrap(), &["--redis-url", &redis.url()]).await
    }

    /// Starts the node on loopback ports it chooses (learnt from its log),
    /// with its files and log in `dir`, and `args` besides.
    async fn launch(dir: tempfile::TempDir, args: &[&str]) -> Self {
        let log = dir.path().join("node.log");
        let mut command = node_command(dir.path());
        command.env("HEXFLEET_TOKEN_SECRET", SECRET).args(args);
        let child = on_chosen_ports(&mut command, &log)
            .spawn()
            .expect("hexfleet-node starts");
        let unbound = loopback(0);
        // Killed if it never listens (dropped with the panic).
        let mut node = Self {
            child,
            quic: unbound,
            http: unbound,
            admin: unbound,
            dir,
        };
        let bound = listening(&mut node.child, &log).await;
        (node.quic, node.http, node.admin) = (bound.quic, bound.http, bound.admin);
        node
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join(dev::DEV_CERT_FILE)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.child), signal).expect("signal the node");
    }

    async fn exited(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the node did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn report() -> DriverReport {
    DriverReport {
        class: VehicleClass::Economy,
        status: VehicleStatus::Available,
    }
}

fn driver_token(id: &str) -> String {
    let expires = hexfleet_node::clock::now_s() + 3600;
    Claims::new(Role::Driver, VehicleId::new(id).unwrap(), expires).mint(SECRET.as_bytes())
}

#[tokio::test]
async fn sigterm_under_load_tells_clients_drains_and_writes_the_last_accepted_fixes() {
    let redis = RedisServer::start();
    let mut node = NodeProcess::start(&redis).await;
    healthy(node.admin).await;
    let connector = Connector::new(&node.cert(), dev::DEV_SERVER_NAME).unwrap();
    let report = report();
    // 20 drivers, each sending a fix every 10 ms until the node goes away.
    let mut fleet = Vec::new();
    for i in 0..20 {
        let id = format!("drv-{i}");
        let mut driver = connector
            .driver(node.quic, &driver_token(&id), report)
            .await
            .unwrap();
        fleet.push(tokio::spawn(async move {
            let start = (52.52 + i as f64 * 1e-3, 13.405);
            for step in 0..2_000 {
                let at = FixInput::at(start.0 + step as f64 * 1e-6, start.1);
                if driver.send_fix(at).await.is_err() || driver.closed_error().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (id, driver)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;

    node.signal(Signal::TERM);
    let status = node.exited().await;
    assert!(status.success(), "exit {status}:\n{}", node.log());
    assert!(node.log().contains("SIGTERM"), "{}", node.log());

    for driver in fleet {
        let (id, driver) = driver.await.unwrap();
        let told = eventually(WAIT, "the driver told why", async || driver.closed_error()).await;
        assert!(
            matches!(
                told,
                ClientError::Refused {
                    code: ErrorCode::ShuttingDown,
                    ..
                }
            ),
            "{id}: {told:?}"
        );
        let acked = driver.acked_seq();
        assert!(acked > 10, "{id} was under load: {acked} acknowledged");
        let stored = stored(&redis, &id).unwrap_or_else(|| panic!("{id} is not in Redis"));
        assert!(
            stored.seq >= acked,
            "{id}: fix {acked} was acknowledged, Redis holds {}",
            stored.seq
        );
    }
}

#[test]
fn the_public_development_secret_is_refused_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let open = "0.0.0.0:0";
    let out = node_command(dir.path())
        .args(["--quic-listen", open])
        .output()
        .expect("hexfleet-node runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HEXFLEET_TOKEN_SECRET") && stderr.contains("--dev"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_development_node_on_loopback_starts_with_the_public_secret_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let mut child = on_chosen_ports(&mut node_command(dir.path()), &log)
        .spawn()
        .unwrap();
    let admin = listening(&mut child, &log).await.admin;
    healthy(admin).await;
    kill_process(Pid::from_child(&child), Signal::INT).unwrap();
    assert!(child.wait().unwrap().success());
}

/// A self-signed certificate for localhost: the PEM files, and the DER a
/// client trusts.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (pem, key, der) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.der")),
    );
    std::fs::write(&pem, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    std::fs::write(&der, made.cert.der()).unwrap();
    (pem, key, der)
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_the_token_keys_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a, der_a) = certificate(dir.path(), "a");
    let (cert_b, key_b, der_b) = certificate(dir.path(), "b");
    let (cert, key, jwks) = (
        dir.path().join("tls.pem"),
        dir.path().join("tls.key"),
        dir.path().join("jwks.json"),
    );
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let jwks_of = |kids: &[&str]| {
        let keys: Vec<(&str, &[u8])> = kids.iter().map(|k| (*k, k.as_bytes())).collect();
        hexfleet_protocol::token::hs256_jwks(&keys)
    };
    std::fs::write(&jwks, jwks_of(&["key-one-0123456789"])).unwrap();
    // Only a signal reloads: the files are not watched within the test.
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "[tls]\nreload_interval = \"1h\"\n").unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--jwks",
        jwks.to_str().unwrap(),
    ];
    let node = NodeProcess::launch(dir, &args).await;
    let (quic, admin) = (node.quic, node.admin);
    healthy(admin).await;
    // Each connection its own driver: one driver connecting again would
    // close its older connection.
    let next = std::sync::atomic::AtomicU32::new(0);
    let token = |kid: &str| {
        let now = hexfleet_node::clock::now_s();
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = VehicleId::new(&format!("drv-hup-{n}")).unwrap();
        Claims::new(Role::Driver, id, now + 600)
            .issued(now)
            .sign(&hexfleet_protocol::SigningKey::hs256(kid.as_bytes()).with_kid(kid))
            .unwrap()
    };
    let connect = async |der: &Path, kid: &str| {
        Connector::new(der, dev::DEV_SERVER_NAME)
            .unwrap()
            .driver(quic, &token(kid), report())
            .await
    };
    let driver = connect(&der_a, "key-one-0123456789").await.unwrap();
    assert!(connect(&der_a, "key-two-0123456789").await.is_err());

    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    std::fs::write(
        &jwks,
        jwks_of(&["key-one-0123456789", "key-two-0123456789"]),
    )
    .unwrap();
    node.signal(Signal::HUP);
    eventually(WAIT, "the new certificate and key served", async || {
        connect(&der_b, "key-two-0123456789").await.ok().map(|_| ())
    })
    .await;
    assert!(
        connect(&der_a, "key-one-0123456789").await.is_err(),
        "the old certificate is still served"
    );
    // The connection made before the reload carries on.
    assert!(driver.closed_error().is_none());
    assert!(node.log().contains("SIGHUP"), "{}", node.log());
}

/// `hexfleet-node token` with the given arguments; the token it prints.
fn minted(dir: &Path, args: &[&str]) -> String {
    let out = node_command(dir)
        .env("HEXFLEET_TOKEN_SECRET", SECRET)
        .arg("token")
        .args(args)
        .output()
        .expect("hexfleet-node token runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn tokens_minted_by_the_cli_with_a_secret_or_an_ec_key_open_the_api() {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let dir = tempfile::tempdir().unwrap();
    // An ES256 key pair: the private key for the CLI, the public one in the
    // node's JWKS.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let private = dir.path().join("ec.pem");
    std::fs::write(&private, pair.serialize_pem()).unwrap();
    let point = pair.public_key_raw();
    let jwks = dir.path().join("jwks.json");
    let set = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "ec-1",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }]});
    std::fs::write(&jwks, set.to_string()).unwrap();
    let args = ["--http-tls", "false", "--jwks", jwks.to_str().unwrap()];
    let node = NodeProcess::launch(dir, &args).await;
    let http = node.http;
    let admin = node.admin;
    healthy(admin).await;
    let path = node.dir.path();
    let status = async |token: &str| {
        reqwest::Client::new()
            .get(format!("http://{http}/v1/cluster"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let by_secret = minted(path, &["--dashboard", "ops", "--ttl", "10m"]);
    let by_key = minted(
        path,
        &[
            "--dashboard",
            "ops",
            "--kid",
            "ec-1",
            "--key",
            private.to_str().unwrap(),
            "--alg",
            "ES256",
        ],
    );
    assert_eq!(by_secret.split('.').count(), 3, "{by_secret}");
    assert_eq!(status(&by_secret).await, 200);
    assert_eq!(status(&by_key).await, 200);
    let driver = minted(path, &["--driver", "drv-1"]);
    assert_eq!(status(&driver).await, 401);
    drop(node);
}

#[tokio::test]
async fn a_cluster_node_started_while_redis_is_down_is_live_not_ready_and_joins_when_it_answers() {
    let mut redis = RedisServer::start();
    redis.kill();
    let url = redis.url();
    let node = NodeProcess::launch(
        tempfile::tempdir().unwrap(),
        &["--cluster", "--redis-url", &url],
    )
    .await;
    let probe = async |path: &str| {
        reqwest::get(format!("http://{}{path}", node.admin))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    };
    eventually(WAIT, "live while waiting for Redis", async || {
        (probe("/livez").await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(probe("/readyz").await, Some(503));

    redis.restart();
    eventually(WAIT, "ready once it has joined", async || {
        (probe("/readyz").await == Some(200)).then_some(())
    })
    .await;
    let connector = Connector::new(&node.cert(), dev::DEV_SERVER_NAME).unwrap();
    let mut driver = connector
        .driver(node.quic, &driver_token("drv-late"), report())
        .await
        .unwrap();
    let seq = driver.send_fix(FixInput::at(52.52, 13.405)).await.unwrap();
    eventually(WAIT, "its fix stored", async || {
        stored(&redis, "drv-late")
            .filter(|s| s.seq == seq)
            .map(|_| ())
    })
    .await;
}
