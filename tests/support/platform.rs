//! A real `epm-platform` on 127.0.0.1 with its own data directory, driven
//! through its own CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::binary;
use super::database::TestDatabase;

/// A running platform.
#[derive(Debug)]
pub struct Platform {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    serve_args: Vec<String>,
    /// The token of admin `e2e`: the owner (the first admin), approving at
    /// level 1.
    pub admin_token: String,
    /// SQLite in `dir`, or a PostgreSQL database of its own
    /// (`EPM_TEST_BACKEND=postgres`); dropped after the child is killed.
    database: TestDatabase,
}

impl Platform {
    /// Makes the first admin (the owner) offline, then serves on a free
    /// port.
    pub fn start() -> Platform {
        Platform::start_with(&[])
    }

    /// [`Platform::start`] with more `serve` arguments (limits).
    pub fn start_with(serve_args: &[&str]) -> Platform {
        let dir = tempfile::Builder::new()
            .prefix("epm-e2e-platform-")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let database = TestDatabase::for_a_platform();
        let out = command(&database)
            .args([
                "admin",
                "create",
                "--name",
                "e2e",
                "--approver-level",
                "1",
                "--data",
            ])
            .arg(dir.path().join("data"))
            .env_remove("EPM_ADMIN_TOKEN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "admin create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let admin_token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let mut platform = Platform {
            dir,
            port,
            child: None,
            serve_args: serve_args.iter().map(|a| (*a).to_owned()).collect(),
            admin_token,
            database,
        };
        platform.spawn();
        platform
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The URL agents use.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("platform.log"))
            .unwrap();
        let child = command(&self.database)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--data",
            ])
            .arg(self.data())
            .args(&self.serve_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.cli(&["admin", "list"]).status.success() {
                // Asked for PostgreSQL, make sure the server says it serves
                // from it: a harness that quietly fell back to SQLite would
                // report the PostgreSQL path as tested.
                let kind = match self.database.url() {
                    Some(_) => "postgres database",
                    None => "sqlite database",
                };
                assert!(
                    self.log().contains(kind),
                    "epm-platform does not serve from its {kind}:\n{}",
                    self.log()
                );
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("epm-platform did not start:\n{}", self.log());
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("platform.log")).unwrap_or_default()
    }

    /// Runs the admin CLI against this platform.
    pub fn cli(&self, args: &[&str]) -> Output {
        command(&self.database)
            .args(["--url", &self.url(), "--data"])
            .arg(self.data())
            .args(args)
            .env("EPM_ADMIN_TOKEN", &self.admin_token)
            .output()
            .unwrap()
    }

    /// Runs the admin CLI with another admin's token.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        command(&self.database)
            .args(["--url", &self.url(), "--data"])
            .arg(self.data())
            .args(args)
            .env("EPM_ADMIN_TOKEN", token)
            .output()
            .unwrap()
    }

    /// Sets `name`'s console password with `admin set-password` (over the
    /// API, as the owner), the password on stdin.
    pub fn set_password(&self, name: &str, password: &str) {
        use std::io::Write;
        let mut child = command(&self.database)
            .args(["--url", &self.url(), "--data"])
            .arg(self.data())
            .args(["admin", "set-password", "--name", name])
            .env("EPM_ADMIN_TOKEN", &self.admin_token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{password}").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "set-password {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates another admin with these `admin create` arguments (`--role`,
    /// `--approver-level`, `--endpoint-user`); returns its token.
    pub fn admin_with(&self, name: &str, args: &[&str]) -> String {
        let mut all = vec!["admin", "create", "--name", name];
        all.extend_from_slice(args);
        self.ok(&all).trim().to_owned()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A REST client trusting only this platform's CA.
    pub fn http(&self) -> reqwest::blocking::Client {
        self.http_from("127.0.0.1".parse().unwrap())
    }

    /// [`Platform::http`] from another local address (any of 127.0.0.0/8),
    /// so a test's attacker is another client than its admin.
    pub fn http_from(&self, source: std::net::IpAddr) -> reqwest::blocking::Client {
        let ca = std::fs::read(self.data().join("ca.pem")).unwrap();
        reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .local_address(source)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    /// One REST call: the status and the JSON answer (or the text as a
    /// JSON string).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.call_raw(method, path, bearer, body.map(Value::to_string))
    }

    /// [`Platform::call`] with a body sent as is.
    pub fn call_raw(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut request = self
            .http()
            .request(method.parse().unwrap(), format!("{}{path}", self.url()));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A new enrollment token for `uses` devices.
    pub fn enroll_token(&self, uses: u32) -> String {
        self.ok(&[
            "enroll-token",
            "create",
            "--uses",
            &uses.to_string(),
            "--expires",
            "1h",
        ])
        .trim()
        .to_owned()
    }

    /// Enrolls `device` over REST with `token`, showing `current` (a bearer
    /// `<agent_id>.<secret>`) when given.
    pub fn enroll(&self, device: &str, token: &str, current: Option<&str>) -> (u16, Value) {
        let body = serde_json::json!({"enrollment_token": token, "device_id": device,
            "hostname": device, "os": "linux", "agent_version": "e2e"});
        self.call("POST", "/api/v1/agent/enroll", current, Some(&body))
    }

    /// The activity log as the owner reads it.
    pub fn activity(&self) -> Value {
        let (status, page) = self.call(
            "GET",
            "/api/v1/admin/activity",
            Some(&self.admin_token),
            None,
        );
        assert_eq!(status, 200, "{page}");
        page
    }

    /// Waits (the counts are written every 2 s) until the refused-call
    /// counts hold a row for which `pred` holds; returns it.
    pub fn wait_for_refused(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let page = self.activity();
            if let Some(row) = page["refused"].as_array().unwrap().iter().find(|r| pred(r)) {
                return row.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no refused-call count for {what}: {page}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The activity entries (admins' calls, one by one) whose detail
    /// contains `text`.
    pub fn activity_with(&self, text: &str) -> Vec<Value> {
        self.activity()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["detail"].as_str().is_some_and(|d| d.contains(text)))
            .cloned()
            .collect()
    }

    /// Creates another admin approving at `level`; returns its token.
    pub fn admin(&self, name: &str, level: u32) -> String {
        self.ok(&[
            "admin",
            "create",
            "--name",
            name,
            "--approver-level",
            &level.to_string(),
        ])
        .trim()
        .to_owned()
    }

    /// The platform's requests, newest first.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        // One JSON document per line.
        self.ok(&["requests", "list", "--json"])
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Runs the admin CLI and returns its stdout; panics on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "epm-platform {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Pushes `policy` with scope arguments (`[]`, `["--device", "x"]`…).
    pub fn push(&self, policy: &str, scope: &[&str]) {
        let file = self.dir.path().join("push.json");
        std::fs::write(&file, policy).unwrap();
        let mut args = vec!["policy", "push", file.to_str().unwrap()];
        args.extend_from_slice(scope);
        self.ok(&args);
    }

    /// The `[platform]` table for an agent, with a fresh enrollment token.
    pub fn agent_table(&self) -> String {
        let token = self.ok(&["enroll-token", "create", "--uses", "1", "--expires", "1h"]);
        let key = std::fs::read_to_string(self.data().join("signing-key.pub")).unwrap();
        format!(
            "url = {:?}\nca_cert = {:?}\npolicy_public_key = {:?}\nenrollment_token = {:?}\nsync_interval = \"30m\"\n",
            self.url(),
            self.data().join("ca.pem").display().to_string(),
            key.trim(),
            token.trim()
        )
    }

    /// The fleet audit records of one device, oldest first.
    pub fn audit(&self, device: &str) -> Vec<serde_json::Value> {
        self.ok(&["audit", "tail", "-n", "1000", "--json", "--device", device])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The platform's `--database` when it is not the data directory's
    /// SQLite file (`EPM_TEST_BACKEND=postgres`).
    pub fn database_url(&self) -> Option<&str> {
        self.database.url()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            let _ = child.wait();
        }
    }

    /// Starts again on the same data and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the platform first");
        self.spawn();
    }

    /// Whether a path exists in the data directory.
    pub fn has(&self, name: &str) -> bool {
        Path::new(&self.data()).join(name).exists()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        // The child first: its database is dropped after (the field's own
        // Drop), not under a running server.
        self.kill();
    }
}

/// `epm-platform` on `database` (every command: `serve` and the offline
/// admin commands open it, the API clients ignore it).
fn command(database: &TestDatabase) -> Command {
    let mut command = Command::new(binary("epm-platform"));
    database.apply(&mut command);
    command
}

/// An agent spoken for over REST: enrolled with a fresh token, reporting
/// one user (`alice` unless told).
#[derive(Debug)]
pub struct RestAgent {
    /// Its device id.
    pub device: String,
    /// `<agent_id>.<secret>`.
    pub bearer: String,
    /// The enrollment's answer.
    pub credentials: Value,
    user: String,
}

impl RestAgent {
    /// Enrolls `device`, reporting user `alice`.
    pub fn enroll(platform: &Platform, device: &str) -> RestAgent {
        RestAgent::enroll_for(platform, device, "alice")
    }

    /// Enrolls `device`, reporting `user`, and checks in once.
    pub fn enroll_for(platform: &Platform, device: &str, user: &str) -> RestAgent {
        let token = platform.enroll_token(1);
        let (status, credentials) = platform.enroll(device, &token, None);
        assert_eq!(status, 200, "{credentials}");
        let agent = RestAgent {
            device: device.into(),
            bearer: format!(
                "{}.{}",
                credentials["agent_id"].as_str().unwrap(),
                credentials["agent_secret"].as_str().unwrap()
            ),
            credentials,
            user: user.into(),
        };
        agent.checkin(platform);
        agent
    }

    /// A check-in reporting its user; the answer.
    pub fn checkin(&self, platform: &Platform) -> Value {
        let body = serde_json::json!({"audit_last_seq": 0, "outbox_pending": 0,
            "users": [{"name": self.user, "groups": ["staff"]}]});
        let (status, answer) = platform.call(
            "POST",
            "/api/v1/agent/checkin",
            Some(&self.bearer),
            Some(&body),
        );
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// The device's offline-code key.
    pub fn offline_key(&self) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(self.credentials["offline_key"].as_str().unwrap())
            .unwrap()
    }

    /// Submits a request for `rule` for `/usr/bin/wireshark`; returns the
    /// status and answer.
    pub fn submit(
        &self,
        platform: &Platform,
        local_id: &str,
        rule: &str,
        user: &str,
        start: jiff::Timestamp,
        end: jiff::Timestamp,
    ) -> (u16, Value) {
        self.submit_body(
            platform,
            &serde_json::json!({"local_id": local_id, "rule_id": rule, "policy_version": 1, "user": user,
                "subject": {"identity": {"kind": "sha256", "value": "ab".repeat(32)}, "path": "/usr/bin/wireshark"},
                "justification": "Capture for ticket 4411", "window": {"start": start, "end": end}}),
        )
    }

    /// Submits a request body as given; returns the status and answer.
    pub fn submit_body(&self, platform: &Platform, body: &Value) -> (u16, Value) {
        platform.call(
            "POST",
            "/api/v1/agent/requests",
            Some(&self.bearer),
            Some(body),
        )
    }
}
