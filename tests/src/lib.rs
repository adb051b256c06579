//! Harness for end-to-end tests: a unique temp dir per test, a hermetic
//! environment, the real `tessera` binary, and failures that show the
//! command, its stdout and its stderr.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tessera_broker::proto::{admin_client::AdminClient, broker_client::BrokerClient};
use tonic::transport::{Channel, Endpoint};

/// The passphrase used by passphrase-sealed test stores.
pub const PASSPHRASE: &str = "correct horse battery staple";

/// The `tessera` binary: `TESSERA_BIN`, else the one next to this test's
/// target directory, built on first use if missing.
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TESSERA_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/e2e-xxxx -> target/<profile>/tessera
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps");
        let candidate = profile_dir.join("tessera");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", "tessera-cli", "--bin", "tessera"]);
        if release {
            build.arg("--release");
        }
        // Always ask cargo: it is a no-op when the binary is up to date, and
        // it keeps a stale binary from being tested.
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the tessera binary");
        assert!(status.success(), "building the tessera binary failed");
        assert!(
            candidate.exists(),
            "no tessera binary at {}",
            candidate.display()
        );
        candidate
    })
    .clone()
}

/// Whether a Secret Service keychain is expected here: inside the test
/// script's D-Bus session. In CI it must be; elsewhere a keychain test is
/// skipped with a printed reason.
pub fn keychain_available(test: &str) -> bool {
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must run inside scripts/test.sh (D-Bus session with gnome-keyring)"
    );
    eprintln!("{test}: skipped: no D-Bus session; run scripts/test.sh for keychain tests");
    false
}

/// One test's world: a temp dir with a data dir and a home.
pub struct World {
    /// Holds the temp dir alive.
    pub tmp: tempfile::TempDir,
    /// The data directory.
    pub data: PathBuf,
}

/// What a finished command did.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The command line, for failure messages.
    pub cmdline: String,
}

impl Ran {
    /// Panics with the whole story unless the command succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }

    /// Panics unless the command failed with `code`.
    pub fn fails_with(self, code: i32) -> Self {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }

    /// Stdout parsed as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    /// A fresh world.
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("tessera-e2e-")
            .tempdir()
            .expect("temp dir");
        let data = tmp.path().join("data");
        World { tmp, data }
    }

    /// The database file.
    pub fn db(&self) -> PathBuf {
        self.data.join("tessera.db")
    }

    /// The broker socket.
    pub fn socket(&self) -> PathBuf {
        self.data.join("tessera.sock")
    }

    /// A `tessera` command with a hermetic environment.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin());
        c.env_clear();
        for keep in [
            "PATH",
            "DBUS_SESSION_BUS_ADDRESS",
            "XDG_RUNTIME_DIR",
            "HOME",
        ] {
            if let Some(v) = std::env::var_os(keep) {
                c.env(keep, v);
            }
        }
        c.env("TESSERA_DATA_DIR", &self.data);
        c.env("TESSERA_LOG", "info");
        c
    }

    /// Runs `tessera ARGS` with `stdin` and extra env.
    pub fn run_with(&self, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Ran {
        let mut c = self.command();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn tessera");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut si = child.stdin.take().expect("stdin");
            si.write_all(input).expect("write stdin");
        }
        let out: Output = child.wait_with_output().expect("wait tessera");
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            cmdline: format!("tessera {}", args.join(" ")),
        }
    }

    /// Runs `tessera ARGS`.
    pub fn run(&self, args: &[&str]) -> Ran {
        self.run_with(args, None, &[])
    }

    /// `tessera init --unseal passphrase`.
    pub fn init_passphrase(&self) -> Ran {
        self.run_with(
            &["init", "--unseal", "passphrase", "--json"],
            None,
            &[("TESSERA_PASSPHRASE", PASSPHRASE)],
        )
        .ok()
    }

    /// `tessera init --unseal shares` with `shares` plain (not age-sealed)
    /// operator shares, `threshold` of them needed; returns init's JSON.
    pub fn init_shares(&self, shares: u32, threshold: u32) -> serde_json::Value {
        self.run(&[
            "init",
            "--unseal",
            "shares",
            "--shares",
            &shares.to_string(),
            "--threshold",
            &threshold.to_string(),
            "--json",
        ])
        .ok()
        .json()
    }

    /// Starts `tessera serve ARGS` (passphrase in the env) and waits until
    /// it answers.
    pub fn serve(&self, args: &[&str]) -> Server {
        self.serve_env(args, &[("TESSERA_PASSPHRASE", PASSPHRASE)])
    }

    /// Starts `tessera serve ARGS` with `env` and waits until it answers.
    pub fn serve_env(&self, args: &[&str], env: &[(&str, &str)]) -> Server {
        let log = self.tmp.path().join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let mut c = self.command();
        c.arg("serve").args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let f = std::fs::File::create(&log).expect("log file");
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f);
        let child = c.spawn().expect("spawn tessera serve");
        let mut s = Server {
            child: Some(child),
            log,
        };
        let socket = args
            .iter()
            .position(|a| *a == "--socket")
            .and_then(|i| args.get(i + 1))
            .map_or_else(|| self.socket(), PathBuf::from);
        s.wait_ready(&socket);
        s
    }

    /// The admin token `init` wrote.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    /// Stores a secret through the CLI.
    pub fn put(&self, name: &str, value: &[u8]) {
        self.run_with(&["secret", "put", name], Some(value), &[])
            .ok();
    }

    /// Creates an agent through the CLI and returns its token.
    pub fn agent(&self, name: &str, allow: &str, max_ttl: &str) -> String {
        let r = self
            .run(&[
                "agent",
                "create",
                name,
                "--allow",
                allow,
                "--max-ttl",
                max_ttl,
                "--json",
            ])
            .ok();
        r.json()["token"].as_str().expect("token").to_string()
    }

    /// Makes a holder for `role` (an identity file in the temp dir, or the
    /// keychain when `file` is false) and enrols it; returns the identity
    /// file if one was used.
    pub fn holder(&self, role: &str, file: bool) -> Option<PathBuf> {
        let key = self.tmp.path().join(format!("{role}.key"));
        let made = if file {
            self.run(&[
                "holder",
                "init",
                "--role",
                role,
                "--identity-file",
                key.to_str().expect("utf-8 path"),
                "--json",
            ])
        } else {
            self.run(&["holder", "init", "--role", role, "--json"])
        }
        .ok()
        .json();
        let pubkey = made["pubkey"].as_str().expect("pubkey").to_string();
        self.run(&["holder", "enroll", "--role", role, "--pubkey", &pubkey])
            .ok();
        file.then_some(key)
    }

    /// Enrols `legal` and `ciso` (keys in identity files) and creates
    /// `class`, kept for an hour, split 2 of 2 between them; returns their
    /// key files.
    pub fn legal_and_ciso(&self, class: &str) -> [Option<PathBuf>; 2] {
        let keys = [self.holder("legal", true), self.holder("ciso", true)];
        self.run(&[
            "class",
            "create",
            class,
            "--retain",
            "1h",
            "--holders",
            "legal,ciso",
            "--threshold",
            "2",
        ])
        .ok();
        keys
    }

    /// `tessera get NAME` as the agent with `token`.
    pub fn get(&self, name: &str, token: &str) -> Ran {
        self.run_with(&["get", name], None, &[("TESSERA_TOKEN", token)])
    }

    /// A gRPC channel to the broker socket.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("unix://{}", self.socket().display()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to broker")
    }

    /// An agent-side gRPC client.
    pub async fn broker_client(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel().await)
    }

    /// An admin gRPC client.
    pub async fn admin_client(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }
}

/// `msg` with a bearer token.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    r
}

/// A running `tessera serve`; killed on drop.
pub struct Server {
    child: Option<Child>,
    /// Its stderr (logs).
    pub log: PathBuf,
}

impl Server {
    fn wait_ready(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "tessera serve exited early ({status}); log:\n{}",
                    self.logs()
                );
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok()
                && (self.logs().contains("tessera broker ready")
                    || self.logs().contains("tessera broker sealed"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tessera serve did not become ready; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the broker logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (at most 30 s) for the broker to exit by itself; returns its
    /// exit code, or -1 if a signal ended it (as an abort does).
    pub fn wait_exit(&mut self) -> i32 {
        let Some(mut c) = self.child.take() else {
            return -1;
        };
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().expect("wait serve") {
                return status.code().unwrap_or(-1);
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("the broker did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let Some(mut c) = self.child.take() else {
            return -1;
        };
        let _ = signal_term(c.id());
        let status = c.wait().expect("wait serve");
        status.code().unwrap_or(-1)
    }
}

/// Sends SIGTERM to process `pid`.
pub fn signal_term(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill -TERM failed"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}
