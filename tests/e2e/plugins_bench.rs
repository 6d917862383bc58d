//! Figures for the plugin machinery (a benchmark, not a test: run with
//! `cargo test -p graft-tests --test e2e plugins_bench:: -- --ignored --nocapture`).
//!
//! - load + check of a plugin library (private copy, layout check, manifest);
//! - resident memory kept per reload (libraries are never unloaded);
//! - a full re-plan over an SDXL-sized list of 986 linear hook points;
//! - the cost of an adapter computed through the ops table against the same math in candle,
//!   on one real-size SDXL attention linear.

use crate::plugins_common as common;

use std::time::Instant;

use candle_core::{DType, Device};
use common::*;
use graft_runtime::adapters::store::{ParamKey, ParamStore};
use graft_runtime::plugins::{layers_to_abi, load_plugin, CallContext, StrategyInstance};
use graft_sdxl::hooks::{AttentionKind, BlockPosition, Component, LayerInfo, LayerKind};
use graft_sdxl::rng::GraftRng;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap()))
        .unwrap_or(0)
}

/// 722 UNet + 264 text-encoder linears with SDXL's names and widths.
fn sdxl_like_layers() -> Vec<graft_abi::LayerInfo> {
    let mut out = Vec::new();
    let lin = |name: String, i: usize, o: usize, c: Component, b: BlockPosition, a: Option<AttentionKind>| LayerInfo {
        name,
        kind: LayerKind::Linear,
        component: c,
        in_features: i,
        out_features: o,
        block: b,
        attention: a,
        conv: None,
    };
    let unet_block = |prefix: String, dim: usize, depth: usize, block: BlockPosition, out: &mut Vec<LayerInfo>| {
        out.push(lin(format!("{prefix}.proj_in"), dim, dim, Component::Unet, block, None));
        for t in 0..depth {
            let tb = format!("{prefix}.transformer_blocks.{t}");
            for (attn, kind, ctx) in [("attn1", AttentionKind::SelfAttention, dim), ("attn2", AttentionKind::CrossAttention, 2048)] {
                out.push(lin(format!("{tb}.{attn}.to_q"), dim, dim, Component::Unet, block, Some(kind)));
                out.push(lin(format!("{tb}.{attn}.to_k"), ctx, dim, Component::Unet, block, Some(kind)));
                out.push(lin(format!("{tb}.{attn}.to_v"), ctx, dim, Component::Unet, block, Some(kind)));
                out.push(lin(format!("{tb}.{attn}.to_out.0"), dim, dim, Component::Unet, block, Some(kind)));
            }
            out.push(lin(format!("{tb}.ff.net.0.proj"), dim, dim * 8, Component::Unet, block, None));
            out.push(lin(format!("{tb}.ff.net.2"), dim * 4, dim, Component::Unet, block, None));
        }
        out.push(lin(format!("{prefix}.proj_out"), dim, dim, Component::Unet, block, None));
    };
    let mut host = Vec::new();
    for (i, (dim, depth)) in [(640, 2), (1280, 10)].into_iter().enumerate() {
        for j in 0..2 {
            unet_block(format!("unet.down_blocks.{}.attentions.{j}", i + 1), dim, depth, BlockPosition::Down(i + 1), &mut host);
        }
    }
    unet_block("unet.mid_block.attentions.0".into(), 1280, 10, BlockPosition::Mid, &mut host);
    for (i, (dim, depth)) in [(1280, 10), (640, 2)].into_iter().enumerate() {
        for j in 0..3 {
            unet_block(format!("unet.up_blocks.{i}.attentions.{j}"), dim, depth, BlockPosition::Up(i), &mut host);
        }
    }
    for (te, layers, dim, c) in [("text_encoder", 12, 768, Component::TextEncoder), ("text_encoder_2", 32, 1280, Component::TextEncoder2)] {
        for l in 0..layers {
            let p = format!("{te}.text_model.encoder.layers.{l}");
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"] {
                host.push(lin(format!("{p}.{m}"), dim, dim, c, BlockPosition::TextLayer(l), Some(AttentionKind::SelfAttention)));
            }
            host.push(lin(format!("{p}.mlp.fc1"), dim, dim * 4, c, BlockPosition::TextLayer(l), None));
            host.push(lin(format!("{p}.mlp.fc2"), dim * 4, dim, c, BlockPosition::TextLayer(l), None));
        }
    }
    out.extend(layers_to_abi(&host));
    out
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn plugin_figures() -> graft_runtime::Result<()> {
    let dir = plugin_dir("plugins-bench", &["example-scale"]);
    let path = dir.join(lib_file("example-scale"));
    let size = std::fs::metadata(&path).unwrap().len();

    // Load + check, and the memory each reload keeps.
    let private = dir.join("private");
    let _warm = load_plugin(&path, &private, 1).unwrap();
    let rss0 = rss_kib();
    let n = 20;
    let t = Instant::now();
    let mut kept = Vec::new();
    for g in 0..n {
        kept.push(load_plugin(&path, &private, 100 + g).unwrap());
    }
    let load_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    let rss_per = (rss_kib().saturating_sub(rss0)) as f64 / n as f64 / 1024.0;
    println!("library {:.1} MB; load + check {load_ms:.1} ms; resident memory kept per reload {rss_per:.2} MB", size as f64 / 1e6);

    // Re-plan over the SDXL-sized list (every linear matched).
    let layers = sdxl_like_layers();
    let linears = layers.len();
    let mut s = StrategyInstance::new(&kept[0], None, r#"{"targets": ["*"]}"#).unwrap();
    let store = ParamStore::new(&Device::Cpu, DType::F32, 1);
    let plan = s.plan(&layers).unwrap();
    store.apply_plan(s.name(), &plan)?;
    let t = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        let plan = s.plan(&layers).unwrap();
        store.apply_plan(s.name(), &plan)?;
    }
    println!(
        "re-plan over {linears} hook points ({} attached) + store reconcile: {:.2} ms",
        plan.attachments.len(),
        t.elapsed().as_secs_f64() * 1000.0 / reps as f64
    );

    // One real-size attention linear (to_k of a 1280-wide cross-attention): batch 2, 1024
    // tokens of 2048 features... measured as 2 x 1024 x 1280 -> 1280.
    let mut rng = GraftRng::new(1);
    let name = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q";
    let layer = layers.iter().find(|l| l.name() == name).unwrap();
    let x = rng.randn((2, 1024, 1280), &Device::Cpu)?;
    let w = rng.randn((1280, 1280), &Device::Cpu)?;
    let base_out = x.broadcast_matmul(&w.t()?)?;
    let scale = store.get(&ParamKey::new("example-scale", name, "scale")).unwrap().var.as_tensor().clone();
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        let native = (&base_out + x.broadcast_mul(&scale)?.broadcast_matmul(&w.t()?)?)?;
        std::hint::black_box(native);
    }
    let native_ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        let mut cx = CallContext { store: &store, rng: &mut rng, training: false, step: 0 };
        let y = s.forward_linear(&mut cx, layer, Some(&w.clone().into()), &x, &base_out).unwrap();
        std::hint::black_box(y);
    }
    let plugin_ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
    // The fixed cost of a call: a tiny layer (6 -> 8 features, one token).
    let small = common::layers();
    let mut tiny = StrategyInstance::new(&kept[0], Some("tiny"), r#"{"targets": ["*.to_k"]}"#).unwrap();
    let plan = tiny.plan(&small).unwrap();
    store.apply_plan(tiny.name(), &plan)?;
    let small_layer = common::layer(&small, TO_K);
    let xs = rng.randn((1, 1, 6), &Device::Cpu)?;
    let ws = rng.randn((8, 6), &Device::Cpu)?;
    let bs = xs.broadcast_matmul(&ws.t()?)?;
    let reps = 2000;
    let t = Instant::now();
    for _ in 0..reps {
        let mut cx = CallContext { store: &store, rng: &mut rng, training: false, step: 0 };
        std::hint::black_box(tiny.forward_linear(&mut cx, small_layer, Some(&ws.clone().into()), &xs, &bs).unwrap());
    }
    let call_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let ss = store.get(&ParamKey::new("tiny", TO_K, "scale")).unwrap().var.as_tensor().clone();
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box((&bs + xs.broadcast_mul(&ss)?.broadcast_matmul(&ws.t()?)?)?);
    }
    let native_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    println!("example-scale on [2, 1024, 1280] x [1280, 1280]: native candle {native_ms:.1} ms, through the ops table {plugin_ms:.1} ms; on a tiny layer (6 -> 8, one token) native {native_us:.1} us, through the ops table {call_us:.1} us");
    Ok(())
}
