//! A headless Chromium driven through its WebDriver (`chromedriver`), for the console's tests.
//!
//! The WebDriver client is `fantoccini`'s; this adds what the tests share: finding the browser,
//! starting its driver, and steps that panic with what they looked for. [`Browser::start`] starts `chromedriver` on a free loopback port and a browser with a fresh
//! profile; dropping the [`Browser`] ends both. Without `chromedriver` the tests are skipped with
//! a `SKIPPED:` line, unless `CAIRN_REQUIRE_BROWSER=1` (set by `.ci/run`), which makes that a
//! failure.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// A browser session.
pub struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn find_binary(names: &[&str]) -> Option<String> {
    names
        .iter()
        .map(|n| n.to_string())
        .find(|p| Path::new(p).exists())
}

impl Browser {
    /// A headless Chromium, or `None` (with a `SKIPPED:` line) when there is none and none is
    /// required.
    pub async fn start() -> Option<Self> {
        let driver_bin = find_binary(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
        let chromium = find_binary(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
        let (Some(driver_bin), Some(chromium)) = (driver_bin, chromium) else {
            assert!(
                std::env::var("CAIRN_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "CAIRN_REQUIRE_BROWSER=1 but chromium or chromedriver is missing \
                 (apt-get install chromium chromium-driver)"
            );
            eprintln!(
                "SKIPPED: {}: no chromium/chromedriver (apt-get install chromium chromium-driver)",
                std::thread::current().name().unwrap_or("a browser test")
            );
            return None;
        };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().expect("a profile folder");
        let base = format!("http://127.0.0.1:{port}");
        let caps = json!({
            "browserName": "chrome",
            // An element looked for right after a click that loads a page is waited for.
            "timeouts": { "implicit": 5000 },
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("capabilities are an object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        // chromedriver takes a moment to listen.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let client = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&base)
                .await
            {
                Ok(client) => break client,
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "no browser session from chromedriver at {base}: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Some(Self {
            client,
            driver,
            _profile: profile,
        })
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// The element `css` selects (the first), or a panic naming it.
    async fn element(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// Whether `css` selects anything.
    pub async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("looking for {css}: {e}"))
            .is_empty()
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) {
        self.element(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// Types `text` into the element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        self.element(css)
            .await
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// The visible text of the element `css` selects.
    pub async fn text(&self, css: &str) -> String {
        self.element(css)
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("the text of {css}: {e}"))
    }

    /// Waits until the address of the page shown contains `part` (after a click that loads
    /// another page, when the old page has the elements the test looks for next).
    pub async fn wait_for_url(&self, part: &str) {
        self.wait_for_url_where(part, |u| u.contains(part)).await;
    }

    /// Waits until the address of the page shown is `what` says (`is`).
    pub async fn wait_for_url_where(&self, what: &str, is: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let url = self
                .client
                .current_url()
                .await
                .unwrap_or_else(|e| panic!("the browser's address: {e}"));
            if is(url.as_str()) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the browser is at {url}, not at {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The page's title.
    pub async fn title(&self) -> String {
        self.client
            .title()
            .await
            .unwrap_or_else(|e| panic!("the page's title: {e}"))
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("a screenshot: {e}"));
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Ends the session (closing the browser), then the driver.
    pub async fn quit(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the driver ends the browser it started.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
