//! `graft bench`: every tiny workload runs and writes a complete record, the names match the
//! diffusers reference script's, and bad arguments get one clear error.

use graft_tests::{build_plugins, graft, graft_err, scratch, tiny_model, workspace};

#[test]
fn every_tiny_workload_runs_and_writes_a_record() {
    let dir = scratch("bench-cli");
    let plugins = build_plugins(&["lora"]);
    let json = dir.join("graft.jsonl");
    let (fixture, plugins, json_arg) = (tiny_model(), plugins.display().to_string(), json.display().to_string());
    graft(&[
        "bench",
        "--workload",
        "tiny.",
        "--workload",
        "hot_swap",
        "--runs",
        "1",
        "--threads",
        "1",
        "--in-process",
        "--json",
        &json_arg,
        "--fixture",
        &fixture.display().to_string(),
        "--plugins",
        &plugins,
        "--no-default-plugins",
    ])
    .unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&json).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let expected: Vec<&str> =
        graft_host::bench::workloads().iter().map(|w| w.name).filter(|n| n.starts_with("tiny.") || *n == "hot_swap").collect();
    let got: Vec<&str> = records.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(got, expected);
    for r in &records {
        let name = &r["workload"];
        assert!(r["ms"].as_f64().unwrap() > 0.0 && r["min_ms"].as_f64().unwrap() > 0.0, "{name}: no time in {r}");
        assert!(r["peak_mb"].as_f64().unwrap() > 0.0, "{name}: no peak memory in {r}");
        assert_eq!(r["side"], "graft");
        assert_eq!(r["threads"], 1, "{name}: --threads 1 is not the pool it ran on");
    }
    for name in ["tiny.lora_unfused", "tiny.lora_fused"] {
        let r = records.iter().find(|r| r["workload"] == name).unwrap();
        assert!(r["extra"]["overhead"].as_f64().unwrap().is_finite() && r["extra"]["base_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    let swap = records.iter().find(|r| r["workload"] == "hot_swap").unwrap();
    assert!(swap["extra"]["hook_points"].as_u64().unwrap() > 1000, "hot swap re-plans over SDXL's hook points: {swap}");
}

/// The reference script must measure the same workloads under the same names, or the table
/// silently loses rows.
#[test]
fn the_reference_script_has_every_workload() {
    let script = std::fs::read_to_string(workspace().join("tools/reference/bench_reference.py")).unwrap();
    let table = &script[script.find("WORKLOADS = {").expect("WORKLOADS table")..];
    let table = &table[..table.find("\n}").unwrap()];
    for w in graft_host::bench::workloads().iter().filter(|w| w.name != "hot_swap") {
        assert!(table.contains(&format!("\"{}\":", w.name)), "{} is missing from bench_reference.py's WORKLOADS", w.name);
    }
}

#[test]
fn bad_arguments_get_one_clear_error() {
    let e = graft_err(&["bench", "--workload", "tiny.nope"]);
    assert!(e.contains("unknown workload `tiny.nope`") && e.contains("tiny.unet_forward"), "{e}");
    let e = graft_err(&["bench", "--workload", "tiny.vae_decode", "--threads", "0"]);
    assert!(e.contains("--threads must be at least 1"), "{e}");
}
