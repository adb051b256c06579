//! tessera load generator.
//!
//! Starts a real `tessera serve` on a temporary passphrase-sealed store and
//! drives it over its Unix socket with N concurrent gRPC clients (one
//! connection each): first the health check (the transport baseline: a
//! no-op RPC), then `Issue` (durable and audited), each for a fixed time.
//! Prints throughput, p50/p99 latency and the Issue/no-op ratio.
//!
//! With `--startup-leases N` it instead fills the store with N active leases
//! and measures how long `serve` takes to answer and its resident memory.
//!
//! Every loop is bounded by time; traffic goes only to a Unix socket in a
//! temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_broker::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const PASSPHRASE: &str = "loadgen passphrase (not secret)";

struct Args {
    clients: usize,
    seconds: u64,
    tessera: PathBuf,
    startup_leases: Option<u64>,
    rounds: usize,
    watchers: Option<usize>,
}

fn parse_args() -> Args {
    let mut a = Args {
        clients: 64,
        seconds: 10,
        tessera: default_tessera(),
        startup_leases: None,
        rounds: 1,
        watchers: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--clients" => a.clients = val().parse().unwrap_or_else(|_| usage("--clients N")),
            "--seconds" => a.seconds = val().parse().unwrap_or_else(|_| usage("--seconds N")),
            "--tessera" => a.tessera = PathBuf::from(val()),
            "--rounds" => a.rounds = val().parse().unwrap_or_else(|_| usage("--rounds N")),
            "--watchers" => {
                a.watchers = Some(val().parse().unwrap_or_else(|_| usage("--watchers N")))
            }
            "--startup-leases" => {
                a.startup_leases = Some(
                    val()
                        .parse()
                        .unwrap_or_else(|_| usage("--startup-leases N")),
                )
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!(
        "usage: tessera-loadgen [--clients 64] [--seconds 10] [--rounds 1] [--tessera PATH] \
         [--startup-leases N] [--watchers N]"
    );
    std::process::exit(2)
}

fn default_tessera() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().map(|d| d.join("tessera")).unwrap_or_default()
}

struct Broker {
    child: Child,
    dir: tempfile::TempDir,
}

impl Broker {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn socket(&self) -> PathBuf {
        self.data().join("tessera.sock")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tessera(bin: &Path, data: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("TESSERA_DATA_DIR", data)
        .env("TESSERA_PASSPHRASE", PASSPHRASE)
        .env("TESSERA_LOG", "warn");
    c
}

fn init(bin: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tessera-loadgen-")
        .tempdir()
        .expect("temp dir");
    let st = tessera(bin, &dir.path().join("data"))
        .args(["init", "--unseal", "passphrase"])
        .stdout(Stdio::null())
        .status()
        .expect("run tessera init (build it first: cargo build --release)");
    assert!(st.success(), "tessera init failed");
    dir
}

async fn start(bin: &Path, dir: tempfile::TempDir, serve_args: &[&str]) -> (Broker, Duration) {
    let data = dir.path().join("data");
    let t0 = Instant::now();
    let child = tessera(bin, &data)
        .arg("serve")
        // One agent stands for every client here, and its leases (an hour
        // each) pile up by the hundred thousand.
        .args(["--max-leases-per-agent", "1000000000000"])
        .args(serve_args)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn tessera serve");
    let b = Broker { child, dir };
    loop {
        if let Ok(ch) = channel(&b.socket()).await {
            let mut h = HealthClient::new(ch);
            if h.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
            {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "broker did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = t0.elapsed();
    (b, ready)
}

async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect()
        .await
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn setup(b: &Broker) -> String {
    let admin_token = std::fs::read_to_string(b.data().join("admin.token")).expect("admin token");
    let admin_token = admin_token.trim();
    let mut admin = AdminClient::new(channel(&b.socket()).await.expect("connect"));
    admin
        .put_secret(authed(
            proto::PutSecretRequest {
                name: "bench/key".into(),
                value: b"sk-bench-0123456789".to_vec(),
            },
            admin_token,
        ))
        .await
        .expect("put secret");
    admin
        .create_agent(authed(
            proto::CreateAgentRequest {
                name: "bench".into(),
                allow: vec!["bench/*".into()],
                max_ttl_seconds: 3600,
                max_lifetime_seconds: 0,
                expires_in_seconds: 0,
                peer_uid: None,
            },
            admin_token,
        ))
        .await
        .expect("create agent")
        .get_ref()
        .token
        .clone()
}

#[derive(Clone, Copy)]
enum Call {
    Health,
    Issue,
}

struct Stats {
    ops: usize,
    errors: usize,
    secs: f64,
    p50: Duration,
    p99: Duration,
}

async fn drive(socket: &Path, token: &str, clients: usize, secs: u64, call: Call) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let ch = channel(socket).await.expect("connect");
        // Parsed once per client, as a real client's interceptor would: the
        // load generator shares the broker's cores, so it does as little
        // per call as it can.
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {token}").parse().expect("ascii");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(16_384);
            let mut errors = 0;
            let mut health = HealthClient::new(ch.clone());
            let mut broker = BrokerClient::new(ch);
            while Instant::now() < deadline {
                let s = Instant::now();
                let ok = match call {
                    Call::Health => health
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .is_ok(),
                    Call::Issue => {
                        let mut r = tonic::Request::new(proto::IssueRequest {
                            secret: "bench/key".into(),
                            ttl_seconds: 600,
                        });
                        r.metadata_mut().insert("authorization", bearer.clone());
                        broker.issue(r).await.is_ok()
                    }
                };
                if ok {
                    lat.push(s.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        all.extend(l);
        errors += e;
    }
    let secs = t0.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        ops: all.len(),
        errors,
        secs,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn report(name: &str, s: &Stats) -> f64 {
    let rps = s.ops as f64 / s.secs;
    println!(
        "{name:<8} {:>9.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} ok, {} errors, {:.1} s)",
        rps,
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        s.ops,
        s.errors,
        s.secs
    );
    rps
}

async fn load(a: &Args) {
    let (b, _) = start(&a.tessera, init(&a.tessera), &[]).await;
    let token = setup(&b).await;
    println!(
        "tessera load: {} clients over {}, {} s per phase, {} round(s)",
        a.clients,
        b.socket().display(),
        a.seconds,
        a.rounds
    );
    // Phases alternate so that drift on a shared machine hits both alike;
    // the verdict uses the median round.
    let mut ratios = Vec::new();
    for round in 1..=a.rounds.max(1) {
        let base = drive(&b.socket(), &token, a.clients, a.seconds, Call::Health).await;
        let issue = drive(&b.socket(), &token, a.clients, a.seconds, Call::Issue).await;
        let base_rps = report("no-op", &base);
        let issue_rps = report("Issue", &issue);
        let ratio = 100.0 * issue_rps / base_rps.max(1.0);
        println!("round {round}: Issue / no-op = {ratio:.1}%");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio    Issue / no-op = {:.1}% (median of {} rounds)",
        ratios[ratios.len() / 2],
        ratios.len()
    );
    println!(
        "broker RSS after load: {} MiB",
        rss_kib(b.child.id()) / 1024
    );
}

async fn startup(a: &Args, n: u64) {
    let dir = init(&a.tessera);
    let db = dir.path().join("data").join("tessera.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open db");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        conn.execute_batch(
            "INSERT INTO agents (name, token_hash, allow, max_ttl, max_lifetime, created_at)
             VALUES ('filler', randomblob(32), 'bench/*', 3600, 86400, 0);",
        )
        .expect("agent");
        let tx = conn.unchecked_transaction().expect("tx");
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO leases (id, agent_id, secret, version, issued_at, expires_at, renewable_until)
                     VALUES ('lse_' || lower(hex(randomblob(16))), 1, 'bench/key', 1, ?1, ?2, ?3)",
                )
                .expect("prepare");
            for i in 0..n {
                st.execute(rusqlite::params![
                    t,
                    t + 3600 + (i % 3600) as i64,
                    t + 86400
                ])
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    println!(
        "filled the store with {n} active leases ({} MiB)",
        std::fs::metadata(&db).map(|m| m.len() >> 20).unwrap_or(0)
    );
    let (b, ready) = start(&a.tessera, dir, &[]).await;
    let rss_ready = rss_kib(b.child.id());
    let token = setup(&b).await;
    let issue = drive(
        &b.socket(),
        &token,
        a.clients,
        a.seconds.min(5),
        Call::Issue,
    )
    .await;
    report("Issue", &issue);
    println!(
        "serve ready (health answering) in {} ms with {n} leases",
        ready.as_millis()
    );
    println!(
        "resident memory: {} MiB at ready, {} MiB after load",
        rss_ready / 1024,
        rss_kib(b.child.id()) / 1024
    );
}

/// Opens `n` Watch streams (100 per connection); each reports the time it
/// sees a `secret.rotated` event.
async fn open_watchers(
    socket: &Path,
    token: &str,
    n: usize,
) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut ch = None;
    for i in 0..n {
        if i % 100 == 0 {
            ch = Some(channel(socket).await.expect("connect"));
        }
        let mut c = BrokerClient::new(ch.clone().expect("channel"));
        let mut stream = c
            .watch(authed(proto::WatchRequest::default(), token))
            .await
            .expect("watch")
            .into_inner();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                if ev.kind == "secret.rotated" && tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

async fn watchers(a: &Args, n: usize) {
    // The watchers all use one agent's token.
    let most = n.max(1).to_string();
    let (b, _) = start(
        &a.tessera,
        init(&a.tessera),
        &["--max-watches-per-agent", &most],
    )
    .await;
    let token = setup(&b).await;
    let admin_token = std::fs::read_to_string(b.data().join("admin.token")).expect("admin token");
    let admin_token = admin_token.trim().to_string();
    println!(
        "tessera watch fan-out: {n} watchers; Issue with {} clients, {} s per phase, {} round(s)",
        a.clients, a.seconds, a.rounds
    );
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for _ in 0..a.rounds.max(1) {
            v.push(report(
                "Issue",
                &drive(&b.socket(), &token, a.clients, a.seconds, Call::Issue).await,
            ));
        }
        v
    };
    let t = Instant::now();
    let mut rx = open_watchers(&b.socket(), &token, n).await;
    println!("{n} watchers connected in {} ms", t.elapsed().as_millis());
    let mut admin = AdminClient::new(channel(&b.socket()).await.expect("connect"));
    let mut fanout = Vec::new();
    for i in 0..5 {
        let t0 = Instant::now();
        admin
            .rotate_now(authed(
                proto::RotateNowRequest {
                    name: "bench/key".into(),
                    value: format!("sk-bench-rotated-{i}").into_bytes(),
                    generate: String::new(),
                },
                &admin_token,
            ))
            .await
            .expect("rotate");
        let mut last = t0;
        for _ in 0..n {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(at)) => last = last.max(at),
                _ => panic!("not every watcher saw rotation {i} within 10 s"),
            }
        }
        let ms = (last - t0).as_secs_f64() * 1e3;
        println!("rotation {i}: all {n} watchers notified {ms:.1} ms after the rotation request");
        fanout.push(ms);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    fanout.sort_by(f64::total_cmp);
    let mut after = Vec::new();
    for _ in 0..a.rounds.max(1) {
        after.push(report(
            "Issue+W",
            &drive(&b.socket(), &token, a.clients, a.seconds, Call::Issue).await,
        ));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut before, mut after) = (before, after);
    let (b0, a0) = (med(&mut before), med(&mut after));
    println!(
        "fan-out to {n} watchers: median {:.1} ms, max {:.1} ms (rotation request to last delivery)",
        fanout[fanout.len() / 2],
        fanout[fanout.len() - 1]
    );
    println!(
        "Issue without watchers {b0:.0} req/s, with {n} watchers {a0:.0} req/s: {:+.1}%",
        100.0 * (a0 - b0) / b0.max(1.0)
    );
    println!(
        "broker RSS with {n} watchers: {} MiB",
        rss_kib(b.child.id()) / 1024
    );
}

#[tokio::main]
async fn main() {
    let a = parse_args();
    if !a.tessera.exists() {
        usage(&format!(
            "no tessera binary at {}; build it (cargo build --release) or pass --tessera",
            a.tessera.display()
        ));
    }
    match (a.startup_leases, a.watchers) {
        (Some(n), _) => startup(&a, n).await,
        (None, Some(n)) => watchers(&a, n).await,
        (None, None) => load(&a).await,
    }
}
