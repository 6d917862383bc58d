//! `graft serve` through its JSON API: a server on a loopback port with the tiny model and the
//! lora plugin, a plain HTTP client, the event stream watched during a short training run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use graft_host::serve::{start, ServerHandle};
use graft_tests::{build_plugins, fixtures, scratch, serve_args, write_shapes_dataset};
use serde_json::{json, Value};

fn server() -> &'static (ServerHandle, PathBuf) {
    static S: OnceLock<(ServerHandle, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let plugins = build_plugins(&["lora", "attention-gate"]);
        let dir = scratch("serve_api");
        // A kohya LoRA file for the tiny model, for generate to name.
        let loras = dir.join("loras");
        std::fs::create_dir_all(&loras).unwrap();
        std::fs::copy(fixtures().join("lora/kohya_sgm.safetensors"), loras.join("kohya_sgm.safetensors")).unwrap();
        let mut args = serve_args(&dir, plugins);
        args.lora_dirs = vec![loras];
        (start(&args).expect("server starts"), dir)
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// Sends a request; returns the status and the body as JSON (Null when not JSON).
fn call(method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let url = format!("{}{path}", server().0.url());
    let a = agent();
    let resp = match (method, body) {
        ("GET", _) => a.get(&url).call(),
        ("POST", Some(b)) => a.post(&url).header("Content-Type", "application/json").send(b),
        ("POST", None) => a.post(&url).send_empty(),
        ("PUT", Some(b)) => a.put(&url).header("Content-Type", "application/json").send(b),
        _ => panic!("unsupported {method}"),
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get_bytes(path: &str) -> (u16, Vec<u8>) {
    let url = format!("{}{path}", server().0.url());
    let mut resp = agent().get(&url).call().unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_vec().unwrap())
}

fn assert_png(path: &str) {
    let (status, bytes) = get_bytes(path);
    assert_eq!(status, 200, "{path}");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{path} is not a PNG");
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_text: &str) {
    assert_eq!(status, want_status, "{body}");
    let msg = body["error"].as_str().unwrap_or_else(|| panic!("no `error` in {body}"));
    assert!(msg.contains(want_text), "error `{msg}` does not mention `{want_text}`");
}

fn dataset(name: &str) -> PathBuf {
    let d = server().1.join(name);
    write_shapes_dataset(&d, 4, 64);
    d
}

fn wait_status(id: u64, want: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, job) = call("GET", &format!("/api/jobs/{id}"), None);
        if want.contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} never reached {want:?}: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads server-sent events until `done` says so (or the deadline passes).
fn watch_events(stream: impl std::io::Read, timeout: Duration, mut done: impl FnMut(&str, &Value) -> bool) {
    let deadline = Instant::now() + timeout;
    let mut event = String::new();
    for line in BufReader::new(stream).lines() {
        assert!(Instant::now() < deadline, "events did not arrive in time");
        let line = line.expect("event stream");
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            let data: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
            if done(&event, &data) {
                return;
            }
        }
    }
    panic!("event stream ended");
}

#[test]
fn status_ui_and_plugins() {
    let (status, s) = call("GET", "/api/status", None);
    assert_eq!(status, 200);
    assert_eq!(s["model_loaded"], json!(true));
    let (status, html) = get_bytes("/");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&html).contains("<script src=\"/app.js\">"));
    assert_eq!(get_bytes("/app.js").0, 200);
    let (status, p) = call("GET", "/api/plugins", None);
    assert_eq!(status, 200);
    assert!(p["active"].as_array().unwrap().iter().any(|x| x == "lora"), "{p}");
    let lora = p["files"].as_array().unwrap().iter().find(|f| f["id"] == "lora").expect("lora listed");
    assert_eq!(lora["status"], "active");
    assert!(lora["abi_version"].as_u64().is_some() && lora["version"].is_string(), "{lora}");
    // The config schema comes with the strategy list: the UI draws its settings form from it.
    let keys = lora["config_schema"]["keys"].as_array().expect("lora has a config schema");
    let rank = keys.iter().find(|k| k["key"] == "rank").expect("rank in the schema");
    assert_eq!((&rank["type"], &rank["default"], &rank["min"]), (&json!("int"), &json!(8), &json!(1.0)), "{rank}");
    assert!(rank["help"].as_str().is_some_and(|h| !h.is_empty()), "{rank}");
    let init = keys.iter().find(|k| k["key"] == "init").expect("init in the schema");
    assert_eq!((&init["type"], &init["choices"][1]), (&json!("enum"), &json!("gaussian")), "{init}");
    let (status, _) = call("POST", "/api/plugins/rescan", None);
    assert_eq!(status, 200);
}

#[test]
fn bad_requests_get_clear_4xx() {
    let data = dataset("bad-data");
    let dir = data.to_str().unwrap();
    let (s, b) = call("POST", "/api/train", Some("{not json"));
    assert_error(s, &b, 400, "invalid JSON body");
    let (s, b) = call("POST", "/api/train", None);
    assert_error(s, &b, 400, "JSON body");
    let (s, b) = call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir}).to_string()));
    assert_error(s, &b, 400, "steps");
    let (s, b) = call("POST", "/api/train", Some(&json!({"plugin": "nope", "dataset_dir": dir, "steps": 2}).to_string()));
    assert_error(s, &b, 400, "no plugin with id `nope`");
    let (s, b) = call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": "/no/such/folder", "steps": 2}).to_string()));
    assert_error(s, &b, 400, "/no/such/folder");
    let (s, b) = call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 0}).to_string()));
    assert_error(s, &b, 400, "steps");
    let (s, b) = call(
        "POST",
        "/api/train",
        Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "strategy_config": {"rank": "big"}}).to_string()),
    );
    assert_error(s, &b, 400, "refuses this config");
    // Checked against the plugin's config schema before the run is queued: the error names the key.
    let (s, b) =
        call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "strategy_config": {"rank": 0}}).to_string()));
    assert_error(s, &b, 400, "key `rank`: 0 is out of range (must be >= 1)");
    let (s, b) = call(
        "POST",
        "/api/train",
        Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "strategy_config": {"dropout": 1.0}}).to_string()),
    );
    assert_error(s, &b, 400, "key `dropout`");
    let (s, b) = call(
        "POST",
        "/api/train",
        Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "strategy_config": {"init": "xavier"}}).to_string()),
    );
    assert_error(s, &b, 400, "key `init`: expected one of");
    let (s, b) = call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "name": "../x"}).to_string()));
    assert_error(s, &b, 400, "name");
    let (s, b) = call(
        "POST",
        "/api/train",
        Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "sample_every": 1, "sample_prompts": ["a cat --w 63"]}).to_string()),
    );
    assert_eq!(s, 400, "{b}");
    let (s, b) = call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "lr": 1}).to_string()));
    assert_error(s, &b, 400, "unknown field `lr`");
    let (s, b) =
        call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "validation_split": 1.5}).to_string()));
    assert_error(s, &b, 400, "`validation_split = 1.5`");
    let (s, b) = call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "validate_every": 1}).to_string()));
    assert_error(s, &b, 400, "`validate_every` is set but there is no validation data");
    let (s, b) =
        call("POST", "/api/train", Some(&json!({"plugin": "lora", "dataset_dir": dir, "steps": 2, "validation_dir": "/no/val"}).to_string()));
    assert_error(s, &b, 400, "validation_dir /no/val is not a folder");
    let (s, b) = call("POST", "/api/generate", Some(&json!({"prompt": "x", "width": 63, "height": 64}).to_string()));
    assert_error(s, &b, 400, "63");
    let (s, b) = call("POST", "/api/generate", Some(&json!({"prompt": "x", "scheduler": "warp"}).to_string()));
    assert_error(s, &b, 400, "warp");
    let (s, b) = call("POST", "/api/generate", Some(&json!({"prompt": "x", "adapters": [{"name": "missing"}]}).to_string()));
    assert_error(s, &b, 400, "no adapter named `missing`");
    let (s, b) = call("POST", "/api/generate", Some(&json!({"prompt": "x <lora:ghost:1>"}).to_string()));
    assert_error(s, &b, 400, "ghost");
    let (s, b) = call("POST", "/api/compare", Some(&json!({"dataset_dir": dir, "steps": 2, "strategies": []}).to_string()));
    assert_error(s, &b, 400, "strategies");
    let (s, b) = call("GET", "/api/jobs/999999", None);
    assert_error(s, &b, 404, "no job 999999");
    let (s, b) = call("GET", "/api/jobs/abc", None);
    assert_error(s, &b, 400, "not a number");
    let (s, b) = call("POST", "/api/jobs/999999/pause", None);
    assert_error(s, &b, 404, "no job");
    let (s, b) = call("GET", "/api/dataset", None);
    assert_error(s, &b, 400, "dir");
    let (s, b) = call("GET", "/api/dataset?dir=/no/such/folder", None);
    assert_error(s, &b, 400, "does not exist");
    let (s, b) = call("GET", &format!("/api/dataset?dir={dir}&resolution=abc"), None);
    assert_error(s, &b, 400, "resolution");
    let (s, b) = call("GET", &format!("/api/dataset/image?dir={dir}&name=../../Cargo.toml"), None);
    assert_error(s, &b, 404, "inside the dataset folder");
    let (s, b) = call("PUT", "/api/dataset/caption", Some(&json!({"dir": dir, "name": "/etc/passwd", "caption": "x"}).to_string()));
    assert_error(s, &b, 400, "inside the dataset folder");
    let (s, b) = call("GET", "/api/images/..%2F..%2Fsecret", None);
    assert!(s == 400 || s == 404, "{s} {b}");
    let (s, b) = call("GET", "/api/nothing-here", None);
    assert_error(s, &b, 404, "no such route");
}

#[test]
fn dataset_lists_problems_and_saves_captions() {
    let data = dataset("ds-data");
    std::fs::remove_file(data.join("001.txt")).unwrap();
    std::fs::write(data.join("broken.png"), b"not an image").unwrap();
    std::fs::write(data.join("broken.txt"), "a broken file").unwrap();
    let q = format!("/api/dataset?dir={}&resolution=64", data.display());
    let (s, d) = call("GET", &q, None);
    assert_eq!(s, 200, "{d}");
    let images = d["images"].as_array().unwrap();
    assert_eq!(images.len(), 5);
    let find = |d: &Value, n: &str| d["images"].as_array().unwrap().iter().find(|i| i["name"] == n).cloned().unwrap();
    let ok = find(&d, "000.png");
    assert!(ok["caption"].as_str().unwrap().len() > 3, "{ok}");
    assert_eq!(ok["bucket"], "64x64");
    assert_eq!(ok["width"], 64);
    assert!(find(&d, "001.png")["problems"].to_string().contains("missing caption"));
    assert!(find(&d, "broken.png")["problems"].to_string().contains("unreadable image"));
    assert_eq!(d["buckets"]["64x64"], 4);
    assert!(d["problems"].to_string().contains("2 of 5 images"), "{}", d["problems"]);
    assert_png(&format!("/api/dataset/image?dir={}&name=000.png", data.display()));

    let body = json!({"dir": data, "name": "001.png", "caption": "a blue square, line art"}).to_string();
    let (s, r) = call("PUT", "/api/dataset/caption", Some(&body));
    assert_eq!(s, 200, "{r}");
    assert_eq!(std::fs::read_to_string(data.join("001.txt")).unwrap(), "a blue square, line art\n");
    let (_, d) = call("GET", &q, None);
    assert_eq!(find(&d, "001.png")["caption"], "a blue square, line art");
    assert_eq!(find(&d, "001.png")["problems"], json!([]));
}

fn train_body(name: &str, data: &Path, steps: u64, sample_every: u64) -> String {
    json!({
        "name": name, "plugin": "lora", "strategy_config": {"rank": 4, "alpha": 4, "unet_lr": 0.01},
        "dataset_dir": data, "resolution": 64, "steps": steps, "seed": 1,
        "sample_every": sample_every, "sample_prompts": ["a pink circle, line art --w 64 --h 64 --s 2 --d 3"],
    })
    .to_string()
}

/// The RGB pixels of a `/api/generate` request's image.
fn generated_pixels(req: &Value) -> Vec<u8> {
    let (s, r) = call("POST", "/api/generate", Some(&req.to_string()));
    assert_eq!(s, 200, "{r}");
    let (s, bytes) = get_bytes(r["url"].as_str().unwrap());
    assert_eq!(s, 200);
    image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw()
}

fn job_step(id: u64) -> u64 {
    call("GET", &format!("/api/jobs/{id}"), None).1["step"].as_u64().unwrap_or(0)
}

/// Starts a training job, pauses it once it has done `steps` steps and waits until it stands
/// still; returns its id.
fn start_and_pause(body: &Value, steps: u64) -> u64 {
    let (s, job) = call("POST", "/api/train", Some(&body.to_string()));
    assert_eq!(s, 202, "{job}");
    let id = job["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while job_step(id) < steps {
        assert!(Instant::now() < deadline, "the run does not get to step {steps}: {}", call("GET", &format!("/api/jobs/{id}"), None).1);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, b) = call("POST", &format!("/api/jobs/{id}/pause"), None);
    assert_eq!((s, b["status"].as_str()), (200, Some("paused")), "{b}");
    wait_until_still(id);
    id
}

/// Waits until a paused job's step stops moving (the step in flight may still finish); returns
/// the step it stands at.
fn wait_until_still(id: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = job_step(id);
        std::thread::sleep(Duration::from_millis(700));
        if job_step(id) == a {
            return a;
        }
        assert!(Instant::now() < deadline, "paused run keeps moving");
    }
}

/// Runs are one at a time, so the tests that train take turns.
fn training_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn training_streams_losses_and_samples_then_generate_uses_the_adapter() {
    let _turn = training_lock();
    let data = dataset("train-data");
    // Listen before starting, so that no event is missed.
    let url = format!("{}/api/events", server().0.url());
    let stream = agent().get(&url).call().unwrap().into_body().into_reader();
    // One of the 4 images held out for a validation loss after steps 3 and 6.
    let mut body: Value = serde_json::from_str(&train_body("sse-run", &data, 6, 3)).unwrap();
    body["validation_split"] = json!(0.25);
    body["validate_every"] = json!(3);
    let (s, job) = call("POST", "/api/train", Some(&body.to_string()));
    assert_eq!(s, 202, "{job}");
    let id = job["id"].as_u64().unwrap();
    let (mut losses, mut samples, mut finished) = (Vec::new(), Vec::new(), None);
    let mut validated = Vec::new();
    watch_events(stream, Duration::from_secs(300), |event, data| {
        if data["id"].as_u64() != Some(id) {
            return false;
        }
        match event {
            "train.step" => {
                assert!(data["lr"].as_f64().unwrap() > 0.0 && data["total"] == 6, "{data}");
                losses.push(data["loss"].as_f64().expect("finite loss"));
                if data["val_loss"].as_f64().is_some() {
                    validated.push(data["step"].as_u64().unwrap());
                }
            }
            "train.sample" => samples.extend(data["urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_string())),
            "job" if ["done", "failed", "stopped"].contains(&data["status"].as_str().unwrap()) => finished = Some(data.clone()),
            _ => {}
        }
        finished.is_some()
    });
    let job = finished.unwrap();
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(losses.len(), 6, "{losses:?}");
    assert_eq!(samples.len(), 2, "a sample at steps 3 and 6: {samples:?}");
    for u in &samples {
        assert_png(u);
    }
    let (_, job) = call("GET", &format!("/api/jobs/{id}"), None);
    assert_eq!(job["losses"].as_array().unwrap().len(), 6);
    assert_eq!(validated, [3, 6], "validation after steps 3 and 6");
    let points: Vec<u64> =
        job["losses"].as_array().unwrap().iter().filter(|p| p["val_loss"].is_f64()).map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(points, [3, 6], "{job}");
    assert!(job["val_loss"].as_f64().unwrap() > 0.0, "{job}");
    assert!(job["it_per_s"].as_f64().unwrap() > 0.0);
    assert!(!job["exports"].as_array().unwrap().is_empty(), "{job}");
    assert_png(&format!("/api/jobs/{id}/files/loss.png"));

    let (_, adapters) = call("GET", "/api/adapters", None);
    assert!(adapters.as_array().unwrap().iter().any(|a| a["name"] == "sse-run"), "{adapters}");
    let base = json!({"prompt": "a pink circle", "width": 64, "height": 64, "steps": 2, "seed": 3});
    let (s, plain) = call("POST", "/api/generate", Some(&base.to_string()));
    assert_eq!(s, 200, "{plain}");
    assert_png(plain["url"].as_str().unwrap());
    let mut with = base.clone();
    with["adapters"] = json!([{"name": "sse-run", "weight": 1.0}]);
    let (s, adapted) = call("POST", "/api/generate", Some(&with.to_string()));
    assert_eq!(s, 200, "{adapted}");
    let mut tagged = base.clone();
    tagged["prompt"] = json!("a pink circle <lora:sse-run:1>");
    let (s, by_tag) = call("POST", "/api/generate", Some(&tagged.to_string()));
    assert_eq!(s, 200, "{by_tag}");
    assert!(by_tag["parameters"].as_str().unwrap().contains("<lora:sse-run:1>"));
    let image = |v: &Value| get_bytes(v["url"].as_str().unwrap()).1;
    assert_ne!(image(&plain), image(&adapted), "the trained adapter changes the image");
    let (_, history) = call("GET", "/api/generate/history", None);
    assert!(history.as_array().unwrap().len() >= 3);
}

#[test]
fn runs_queue_pause_resume_and_stop() {
    let _turn = training_lock();
    let data = dataset("queue-data");
    let (s, long) = call("POST", "/api/train", Some(&train_body("long-run", &data, 100000, 0)));
    assert_eq!(s, 202, "{long}");
    let id = long["id"].as_u64().unwrap();
    let (s, next) = call("POST", "/api/train", Some(&train_body("queued-run", &data, 2, 0)));
    assert_eq!(s, 202);
    let next_id = next["id"].as_u64().unwrap();
    wait_status(id, &["running"], Duration::from_secs(120));
    assert_eq!(call("GET", &format!("/api/jobs/{next_id}"), None).1["status"], "queued");
    // A queued run may not be paused; it can be taken off the queue.
    let (s, b) = call("POST", &format!("/api/jobs/{next_id}/pause"), None);
    assert_error(s, &b, 409, "queued");

    let (s, b) = call("POST", &format!("/api/jobs/{id}/pause"), None);
    assert_eq!((s, b["status"].as_str()), (200, Some("paused")), "{b}");
    // The step in flight when paused may still finish; after that the run stands still.
    let at = wait_until_still(id);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(job_step(id), at, "paused run moved on");
    let (s, b) = call("POST", &format!("/api/jobs/{id}/pause"), None);
    assert_error(s, &b, 409, "paused");
    let (s, _) = call("POST", &format!("/api/jobs/{id}/resume"), None);
    assert_eq!(s, 200);
    let deadline = Instant::now() + Duration::from_secs(120);
    while call("GET", &format!("/api/jobs/{id}"), None).1["step"].as_u64().unwrap() <= at {
        assert!(Instant::now() < deadline, "resumed run does not move");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, b) = call("POST", &format!("/api/jobs/{next_id}/stop"), None);
    assert_eq!((s, b["status"].as_str()), (200, Some("stopped")), "{b}");
    let (s, b) = call("POST", &format!("/api/jobs/{id}/stop"), None);
    assert_eq!(s, 200, "{b}");
    let job = wait_status(id, &["stopped", "failed"], Duration::from_secs(120));
    assert_eq!(job["status"], "stopped", "{job}");
    assert!(!job["exports"].as_array().unwrap().is_empty(), "a stopped run keeps what it trained: {job}");
    let (s, b) = call("POST", &format!("/api/jobs/{id}/resume"), None);
    assert_error(s, &b, 409, "already stopped");
    let (s, b) = call("POST", &format!("/api/jobs/{id}/jump"), None);
    assert_eq!(s, 409, "{b}");
    assert_eq!(call("GET", &format!("/api/jobs/{next_id}"), None).1["status"], "stopped");
}

#[test]
fn compare_run_writes_a_report() {
    let _turn = training_lock();
    let data = dataset("compare-data");
    let body = json!({
        "name": "cmp", "dataset_dir": data, "resolution": 64, "steps": 2, "seed": 1,
        "prompts": ["a pink circle --w 64 --h 64 --s 2"],
        "strategies": [{"name": "r4", "plugin": "lora", "config": {"rank": 4, "unet_lr": 0.01}}],
    });
    let (s, job) = call("POST", "/api/compare", Some(&body.to_string()));
    assert_eq!(s, 202, "{job}");
    let id = job["id"].as_u64().unwrap();
    let job = wait_status(id, &["done", "failed"], Duration::from_secs(300));
    assert_eq!(job["status"], "done", "{job}");
    let url = job["report_url"].as_str().unwrap();
    let (s, html) = get_bytes(url);
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&html).contains("r4"));
    let (s, b) = call("POST", &format!("/api/jobs/{id}/pause"), None);
    assert_error(s, &b, 409, "only training runs");
}

/// A generate request while an attention-gate run trains the base projections of the shared
/// model (paused part way, so the test is deterministic) makes the same pixels as before the run:
/// the base model as loaded plus the adapters it names (none, or a LoRA file), never the run's
/// training weights.
#[test]
fn generate_during_a_base_training_run_sees_the_model_as_loaded() {
    let _turn = training_lock();
    let data = dataset("gate-data");
    let model = server().0.app.model.clone().expect("a model is loaded");
    let plain = json!({"prompt": "a pink circle", "width": 64, "height": 64, "steps": 2, "seed": 5});
    let mut with_lora = plain.clone();
    with_lora["adapters"] = json!([{"name": "kohya_sgm", "weight": 1.0}]);
    assert!(model.overridden().is_empty(), "no run holds the model: {:?}", model.overridden());
    let before = (generated_pixels(&plain), generated_pixels(&with_lora));
    assert_ne!(before.0, before.1, "the LoRA file changes the image");

    // Base projections trained at a high learning rate: a few steps move them visibly.
    let body = json!({
        "name": "gate-run", "plugin": "attention-gate",
        "strategy_config": {"rank": 2, "adapter_lr": 0.01, "base_lr": 0.05},
        "dataset_dir": data, "resolution": 64, "steps": 100000, "seed": 1,
    });
    let id = start_and_pause(&body, 3);
    // The run has changed the model's base projections (as overrides its trainer owns).
    let overridden = model.overridden();
    assert!(!overridden.is_empty() && overridden.iter().all(|l| l.contains("attn2")), "{overridden:?}");
    let reg = model.registries()[0];
    let moved = overridden.iter().any(|name| {
        let w = reg.linear_weights(reg.index_of(name).unwrap()).unwrap();
        let diff = (w.current().weight_f32().unwrap() - w.loaded().weight_f32().unwrap()).unwrap();
        diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3
    });
    assert!(moved, "the run trains the base projections");

    let during = (generated_pixels(&plain), generated_pixels(&with_lora));
    // The run's weights are back for its next step.
    assert_eq!(model.overridden(), overridden);
    let (s, b) = call("POST", &format!("/api/jobs/{id}/stop"), None);
    assert_eq!(s, 200, "{b}");
    let job = wait_status(id, &["stopped", "failed"], Duration::from_secs(120));
    assert_eq!(job["status"], "stopped", "{job}");
    assert!(model.overridden().is_empty(), "the finished run leaves the model as loaded: {:?}", model.overridden());
    assert!(during.0 == before.0, "a generate during the run used the run's training weights");
    assert!(during.1 == before.1, "a generate with a LoRA file during the run used the run's training weights");
    assert!(generated_pixels(&plain) == before.0, "after the run: the model as loaded");
}

/// A generate request while a progressive-fusion run is in its last stage (stages 1 and 2
/// frozen as one composite, stage 3 training; paused there) makes the same pixels as before the
/// run. progressive-fusion keeps its composite as adapters of the run's own set (it never folds
/// or unfreezes a base weight), so the model holds no override of the run: the request's image
/// is the model as loaded plus the adapters it names, and the run's adapters stay out of it.
#[test]
fn generate_during_a_progressive_fusion_run_sees_the_model_as_loaded() {
    let _turn = training_lock();
    let data = dataset("fusion-data");
    let model = server().0.app.model.clone().expect("a model is loaded");
    let plain = json!({"prompt": "a pink circle", "width": 64, "height": 64, "steps": 2, "seed": 5});
    let mut with_lora = plain.clone();
    with_lora["adapters"] = json!([{"name": "kohya_sgm", "weight": 1.0}]);
    assert!(model.overridden().is_empty(), "no run holds the model: {:?}", model.overridden());
    let before = (generated_pixels(&plain), generated_pixels(&with_lora));

    // One step per stage: from step 2 on the run is in stage 3. High learning rates, so the
    // run's adapters would change an image visibly if a request saw them.
    let body = json!({
        "name": "fusion-run", "plugin": "progressive-fusion",
        "strategy_config": {"stage1_steps": 1, "stage2_steps": 1, "stage1_lr": 0.05, "stage2_lr": 0.05, "stage3_lr": 0.05},
        "dataset_dir": data, "resolution": 64, "steps": 100000, "seed": 1,
    });
    let id = start_and_pause(&body, 4);
    assert!(job_step(id) >= 3, "the run is in stage 3");
    // The composite is the run's adapters, not a change of the model's base weights.
    assert!(model.overridden().is_empty(), "progressive-fusion changed base weights: {:?}", model.overridden());

    let during = (generated_pixels(&plain), generated_pixels(&with_lora));
    assert!(model.overridden().is_empty(), "a generate request left an override: {:?}", model.overridden());
    let (s, b) = call("POST", &format!("/api/jobs/{id}/stop"), None);
    assert_eq!(s, 200, "{b}");
    let job = wait_status(id, &["stopped", "failed"], Duration::from_secs(120));
    assert_eq!(job["status"], "stopped", "{job}");
    assert!(model.overridden().is_empty(), "the finished run leaves the model as loaded: {:?}", model.overridden());
    assert!(during.0 == before.0, "a generate during the run used the run's adapters");
    assert!(during.1 == before.1, "a generate with a LoRA file during the run used the run's adapters");
    assert!(generated_pixels(&plain) == before.0, "after the run: the model as loaded");
}
