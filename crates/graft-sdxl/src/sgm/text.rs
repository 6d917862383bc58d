//! Text encoders.
//!
//! TE1 (CLIP-L) keeps the transformers names under `conditioner.embedders.0.transformer.`.
//! TE2 (OpenCLIP bigG) uses open_clip names under `conditioner.embedders.1.model.`: `resblocks`
//! with a fused `attn.in_proj_weight` [3h, h] (q, k, v), `positional_embedding` without `.weight`,
//! and `text_projection` stored transposed.

use super::{index, is_leaf_rest, join, strip_head, Transform};

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix; real files have it.
/// The `position_ids` buffer is no weight: it maps to nothing (see `is_known_extra`).
fn with_text_model(name: &str) -> Option<String> {
    if name.ends_with("position_ids") {
        None
    } else if name.starts_with("text_model.") {
        Some(name.to_string())
    } else if ["embeddings.", "encoder.", "final_layer_norm."].iter().any(|p| name.starts_with(p)) {
        Some(format!("text_model.{name}"))
    } else {
        None
    }
}

pub(super) fn te1_to_sgm(name: &str) -> Option<String> {
    with_text_model(name)
}

pub(super) fn te1_from_sgm(path: &str) -> Option<String> {
    (path.starts_with("text_model.") && !path.ends_with("position_ids")).then(|| path.to_string())
}

/// Leaf parameters outside the layers: diffusers <-> open_clip.
const TOP_LEVEL: [(&str, &str); 4] = [
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
];

/// Per-layer leaf modules other than q, k, v: diffusers <-> open_clip.
const LAYER_MEMBERS: [(&str, &str); 5] = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
];

const QKV: [&str; 3] = ["q_proj", "k_proj", "v_proj"];

pub(super) fn te2_to_sgm(hidden: usize, name: &str) -> Option<(String, Transform)> {
    if name == "text_projection.weight" {
        return Some(("text_projection".into(), Transform::Transpose));
    }
    let name = with_text_model(name)?;
    if let Some((_, sgm)) = TOP_LEVEL.iter().find(|(d, _)| *d == name) {
        return Some((sgm.to_string(), Transform::None));
    }
    let segs: Vec<&str> = name.split('.').collect();
    let ["text_model", "encoder", "layers", n, rest @ ..] = segs.as_slice() else {
        return None;
    };
    let n = index(n)?;
    let head = format!("transformer.resblocks.{n}");
    if let ["self_attn", proj, param @ ("weight" | "bias")] = rest {
        if let Some(slot) = QKV.iter().position(|p| p == proj) {
            let fused = if *param == "weight" { "in_proj_weight" } else { "in_proj_bias" };
            let rows = Transform::Rows { start: slot * hidden, len: hidden };
            return Some((format!("{head}.attn.{fused}"), rows));
        }
    }
    for (diff, sgm) in LAYER_MEMBERS {
        if let Some(tail) = strip_head(rest, diff) {
            if !tail.is_empty() && is_leaf_rest(tail) {
                return Some((join(&format!("{head}.{sgm}"), tail), Transform::None));
            }
        }
    }
    None
}

pub(super) fn te2_from_sgm(path: &str) -> Option<Vec<String>> {
    if path == "text_projection" {
        return Some(vec!["text_projection.weight".into()]);
    }
    if let Some((diff, _)) = TOP_LEVEL.iter().find(|(_, s)| *s == path) {
        return Some(vec![diff.to_string()]);
    }
    let segs: Vec<&str> = path.split('.').collect();
    let ["transformer", "resblocks", n, rest @ ..] = segs.as_slice() else {
        return None;
    };
    let n = index(n)?;
    let head = format!("text_model.encoder.layers.{n}");
    if let ["attn", fused @ ("in_proj_weight" | "in_proj_bias")] = rest {
        let param = if *fused == "in_proj_weight" { "weight" } else { "bias" };
        return Some(QKV.iter().map(|p| format!("{head}.self_attn.{p}.{param}")).collect());
    }
    for (diff, sgm) in LAYER_MEMBERS {
        if let Some(tail) = strip_head(rest, sgm) {
            if !tail.is_empty() && is_leaf_rest(tail) {
                return Some(vec![join(&format!("{head}.{diff}"), tail)]);
            }
        }
    }
    None
}
