//! A real headless Chromium, driven over WebDriver (Debian's `chromium`
//! and `chromium-driver`) with `fantoccini`, for the console's end-to-end
//! tests. Each [`Browser`] is its own chromedriver and profile, so two
//! browsers are two independent people.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

/// Where Debian puts them.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether the browser tests can run here: chromium and chromedriver are
/// installed. Like [`crate::capable`]: `false` (skip) without them,
/// unless `EPM_E2E=1`, which makes it a failure.
pub fn browser_capable() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} missing: apt-get install chromium chromium-driver",
        missing.join(" and ")
    );
    if std::env::var("EPM_E2E").as_deref() == Ok("1") {
        panic!("EPM_E2E=1 but the browser tests cannot run: {why}");
    }
    eprintln!("skipped: {why}; set EPM_E2E=1 to make this a failure");
    false
}

/// A headless Chromium with its own chromedriver and a fresh profile,
/// driven synchronously (its own small runtime), so tests mix it freely
/// with the blocking REST client of [`crate::platform::Platform`].
#[derive(Debug)]
pub struct Browser {
    client: Client,
    runtime: tokio::runtime::Runtime,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium in a
    /// fresh profile, accepting the platform's certificate for this session.
    pub fn start() -> Browser {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (client, driver, profile) = runtime.block_on(Browser::launch());
        Browser {
            client,
            runtime,
            driver,
            _profile: profile,
        }
    }

    async fn launch() -> (Client, Child, tempfile::TempDir) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let profile = tempfile::Builder::new()
            .prefix("epm-e2e-chromium-")
            .tempdir()
            .unwrap();
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,900".to_owned(),
            "--lang=en-US".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("acceptInsecureCerts".into(), true.into());
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"binary": CHROMIUM, "args": args}),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "chromedriver did not start a session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        (client, driver, profile)
    }

    /// Runs one WebDriver call to its end.
    pub fn run<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(call)
    }

    /// The WebDriver session, for calls this type does not wrap (use with
    /// [`Browser::run`]).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.run(self.client.goto(url)).unwrap();
    }

    /// Runs `script` in the page; its return value.
    pub fn execute(&self, script: &str, args: Vec<serde_json::Value>) -> serde_json::Value {
        self.run(self.client.execute(script, args)).unwrap()
    }

    /// The text of the first element matching `css`.
    pub fn text_of(&self, css: &str) -> String {
        self.run(async {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"))
                .text()
                .await
                .unwrap()
        })
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        self.run(self.client.find_all(Locator::Css(css)))
            .unwrap()
            .len()
    }

    /// Resizes the window (the viewport a screenshot shows).
    pub fn resize(&self, width: u32, height: u32) {
        self.run(self.client.set_window_size(width, height))
            .unwrap();
    }

    /// Deletes a cookie of the current page's site.
    pub fn delete_cookie(&self, name: &str) {
        self.run(self.client.delete_cookie(name)).unwrap();
    }

    /// The page's visible text (retried while a navigation replaces the
    /// page).
    pub fn text(&self) -> String {
        let mut tries = 0;
        loop {
            match self.run(self.client.execute(
                "return document.body ? document.body.innerText : '';",
                vec![],
            )) {
                Ok(serde_json::Value::String(text)) => return text,
                Ok(_) | Err(_) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => panic!("cannot read the page: {other:?}"),
            }
        }
    }

    /// Types `text` into the field named `name` (cleared first).
    pub fn fill(&self, name: &str, text: &str) {
        self.run(async {
            let field = self
                .client
                .find(Locator::Css(&format!("[name=\"{name}\"]")))
                .await
                .unwrap_or_else(|e| panic!("no field {name}: {e}"));
            field.clear().await.unwrap();
            field.send_keys(text).await.unwrap();
        });
    }

    /// Clicks the first element matching `css`.
    pub fn click(&self, css: &str) {
        self.run(async {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"))
                .click()
                .await
                .unwrap();
        });
    }

    /// Signs in to the console at `base` (`https://127.0.0.1:PORT`).
    pub fn sign_in(&self, base: &str, name: &str, password: &str) {
        self.goto(&format!("{base}/console/sign-in"));
        self.fill("name", name);
        self.fill("password", password);
        self.click("button[type=submit]");
    }

    /// Waits up to `limit` until the page's text holds `what`.
    pub fn wait_for_text(&self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text();
            if text.contains(what) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what:?}; it shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG of the page to `path` when `EPM_SCREENSHOTS=1`, so the
    /// committed pictures change only when asked for.
    pub fn screenshot_for_docs(&self, path: &Path) {
        if std::env::var("EPM_SCREENSHOTS").as_deref() != Ok("1") {
            return;
        }
        let png = self.run(self.client.screenshot()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.runtime.block_on(client.close());
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
