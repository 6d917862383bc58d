//! The `graft serve` UI end to end in headless Chromium, driven over WebDriver (plain HTTP to
//! Debian's chromedriver): the dataset page, the strategy settings form drawn from the lora
//! plugin's config schema (kept in step with the JSON; a plugin without a schema gets the JSON box),
//! a short training run with the rank set through the form until a sample image and the loss
//! curve appear, a generate with the trained adapter. Screenshots go to
//! target/serve-screenshots/. Skipped (with a notice) only when /usr/bin/chromium is absent;
//! `.ci/run` installs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use graft_host::serve::start;
use graft_tests::{base64_decode, build_plugins, scratch, serve_args, workspace, write_shapes_dataset};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Kills chromedriver (and so its browser) when the test ends, also on failure.
struct Driver {
    child: Child,
    url: String,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = agent().delete(&format!("{}/session/{}", self.url, self.session)).call();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

fn wd(method: &str, url: &str, body: Option<Value>) -> Value {
    let a = agent();
    let resp = match method {
        "GET" => a.get(url).call(),
        _ => a.post(url).header("Content-Type", "application/json").send(body.unwrap_or(json!({})).to_string()),
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("webdriver {method} {url}: {e}"));
    let status = resp.status().as_u16();
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap_or(Value::Null);
    assert!(status < 300, "webdriver {method} {url}: {status} {v}");
    v["value"].clone()
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("chromium is installed but chromedriver is not: apt-get install chromium-driver");
        std::fs::create_dir_all(workspace().join("target/serve-screenshots")).unwrap();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", workspace().join("target/serve-screenshots/chromedriver.log").display()))
            // cargo points LD_LIBRARY_PATH at the build's folders; the browser needs the system's.
            .env_remove("LD_LIBRARY_PATH")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent().get(&format!("{url}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Chromium does not start with a `..` in its profile path.
        let profile = scratch("serve_ui_profile").canonicalize().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     format!("--user-data-dir={}", profile.display()), "--window-size=1400,1100"]
        }}}});
        let mut d = Driver { child, url, session: String::new() };
        let v = wd("POST", &format!("{}/session", d.url), Some(caps));
        d.session = v["sessionId"].as_str().expect("a session").to_string();
        d
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        wd(method, &format!("{}/session/{}{path}", self.url, self.session), body)
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), None);
    }

    /// Types into a text field, replacing what was there.
    fn fill(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), None);
        self.cmd("POST", &format!("/element/{e}/value"), Some(json!({ "text": text })));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Polls a script until it returns true.
    fn wait_for(&self, what: &str, script: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.js(script) != json!(true) {
            let err = self.js("return [document.getElementById('status-line').textContent, document.getElementById('toast').textContent, \
                 document.getElementById('job-error').textContent, document.getElementById('train-plugin').innerHTML].join(' | ')");
            assert!(Instant::now() < deadline, "timed out waiting for {what} (page says: {err})");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(v.as_str().expect("base64 screenshot"));
        let dir = workspace().join("target/serve-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        println!("screenshot {}", path.display());
        path
    }
}

#[test]
fn train_and_generate_in_the_browser() {
    if !Path::new(CHROMIUM).exists() {
        println!("NOTICE: {CHROMIUM} is absent; the browser test is skipped (apt-get install chromium chromium-driver)");
        return;
    }
    let plugins = build_plugins(&["lora", "fault-plugin"]);
    let dir = scratch("serve_ui");
    let data = dir.join("data");
    write_shapes_dataset(&data, 4, 64);
    let server = start(&serve_args(&dir, plugins)).expect("server starts");
    let d = Driver::start();
    d.goto(&server.url());
    d.wait_for("the plugin list", "return document.getElementById('train-plugin').value === 'lora'", Duration::from_secs(30));
    assert!(d.js("return document.getElementById('train-config').value").as_str().unwrap().contains("rank"), "the lora config example is shown");

    // Dataset page: four images with captions and their bucket.
    d.click("#nav-dataset");
    d.fill("#ds-dir", data.to_str().unwrap());
    d.fill("#ds-resolution", "64");
    d.click("#ds-load");
    d.wait_for(
        "the dataset cards",
        "return document.querySelectorAll('#ds-images .card img').length === 4 && \
         [...document.querySelectorAll('#ds-images .card img')].every(i => i.complete && i.naturalWidth > 0)",
        Duration::from_secs(30),
    );
    d.screenshot("dataset.png");

    // Train page: a short run with samples every 4 steps.
    d.click("#nav-train");
    d.fill("#train-name", "ui-run");
    // A plugin without a config schema (the fault fixture) gets the JSON text box, no form.
    let pick = |id: &str| {
        d.js(&format!("const s = document.getElementById('train-plugin'); s.value = '{id}'; s.dispatchEvent(new Event('change'))"));
    };
    let shown = |id: &str| d.js(&format!("return document.getElementById('{id}').offsetParent !== null"));
    pick("fault-plugin");
    assert_eq!((shown("train-config"), shown("train-config-note"), shown("train-config-toggle")), (json!(true), json!(true), json!(false)));
    assert_eq!(d.js("return document.getElementById('train-config-form').children.length"), json!(0));
    d.screenshot("train-no-schema.png");
    // lora has one: a form with its keys, their defaults, bounds and help; the JSON behind a toggle.
    pick("lora");
    assert_eq!((shown("train-config"), shown("cfg-rank"), shown("train-config-toggle")), (json!(false), json!(true), json!(true)));
    assert_eq!(
        d.js("const r = document.getElementById('cfg-rank'); return [r.type, r.value, r.min, r.step, document.getElementById('cfg-init').tagName, document.getElementById('cfg-use_rslora').type]"),
        json!(["number", "8", "1", "1", "SELECT", "checkbox"])
    );
    let help = d.js("return document.querySelector('.field[data-key=rank] .help').textContent");
    assert!(help.as_str().unwrap().contains("rank") && help.as_str().unwrap().contains("default 8"), "{help}");
    // JSON -> form: keys left out show their default.
    d.click("#train-config-raw");
    d.fill("#train-config", r#"{"rank": 6, "init": "gaussian"}"#);
    let form = "return ['rank', 'alpha', 'init'].map(k => document.getElementById('cfg-' + k).value)";
    assert_eq!(d.js(form), json!(["6", "32", "gaussian"]));
    // Form -> JSON: the rank for this run is set through the form.
    d.fill("#cfg-rank", "4");
    d.fill("#cfg-alpha", "4");
    d.fill("#cfg-unet_lr", "0.01");
    d.js("const s = document.getElementById('cfg-init'); s.value = 'kaiming_uniform'; s.dispatchEvent(new Event('change'))");
    let config: Value = serde_json::from_str(d.js("return document.getElementById('train-config').value").as_str().unwrap()).unwrap();
    assert_eq!(config, json!({"rank": 4, "init": "kaiming_uniform", "alpha": 4, "unet_lr": 0.01}));
    d.click("#train-config-raw");
    assert_eq!(shown("train-config"), json!(false));
    d.screenshot("train-form.png");
    d.fill("#train-dataset", data.to_str().unwrap());
    d.fill("#train-resolution", "64");
    d.fill("#train-steps", "8");
    d.fill("#train-sample-every", "4");
    d.js("document.getElementById('train-optimizer').value = 'AdamW8bit'");
    d.fill("#train-prompts", "a pink circle, line art --w 64 --h 64 --s 2 --d 3");
    d.click("#train-start");
    d.wait_for(
        "a sample image and the loss curve",
        "const imgs = [...document.querySelectorAll('#samples img')]; \
         return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) && \
                Number(document.getElementById('loss-canvas').dataset.points) >= 3",
        Duration::from_secs(300),
    );
    d.screenshot("train-live.png");
    d.wait_for("the run to finish", "return document.getElementById('job-status').textContent === 'done'", Duration::from_secs(300));
    assert_eq!(d.js("return Number(document.getElementById('loss-canvas').dataset.points)"), json!(8));
    assert_eq!(d.js("return document.querySelectorAll('#samples img').length"), json!(2));
    d.screenshot("train-done.png");
    // The run used the rank set in the form: the kohya file says so.
    let jobs: Value =
        serde_json::from_str(&agent().get(&format!("{}/api/jobs", server.url())).call().unwrap().body_mut().read_to_string().unwrap()).unwrap();
    let job = jobs.as_array().unwrap().iter().rev().find(|j| j["name"] == "ui-run").expect("the ui-run job");
    let file = job["exports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .find(|e| e.ends_with("/ui-run.safetensors"))
        .expect("the kohya file");
    let raw = graft_formats::read::read_bytes(&std::fs::read(file).unwrap(), Path::new(file)).unwrap();
    assert_eq!((raw.metadata["ss_network_dim"].as_str(), raw.metadata["ss_network_alpha"].as_str()), ("4", "4.0"), "{file}");

    // Generate page: the trained adapter is offered; use it.
    d.click("#nav-generate");
    d.wait_for(
        "the trained adapter in the list",
        "return !!document.querySelector('#gen-adapters .adapter[data-name=\"ui-run\"]')",
        Duration::from_secs(30),
    );
    // Found and clicked in one step: the list is re-rendered when it refreshes.
    d.js("document.querySelector('#gen-adapters .adapter[data-name=\"ui-run\"] input[type=checkbox]').click()");
    d.fill("#gen-prompt", "a pink circle, line art");
    d.fill("#gen-width", "64");
    d.fill("#gen-height", "64");
    d.fill("#gen-steps", "2");
    d.click("#gen-run");
    d.wait_for(
        "the generated image",
        "const i = document.getElementById('gen-image'); return !!i && i.complete && i.naturalWidth === 64",
        Duration::from_secs(300),
    );
    let params = d.js("return document.getElementById('gen-params').textContent");
    assert!(params.as_str().unwrap().contains("Steps: 2"), "{params}");
    d.screenshot("generate.png");

    d.click("#nav-plugins");
    d.wait_for("the plugins table", "return document.querySelectorAll('#pl-table tbody tr').length >= 1", Duration::from_secs(30));
    d.screenshot("plugins.png");
}
