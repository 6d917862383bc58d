//! VAE: diffusers `AutoencoderKL` names <-> SGM `first_stage_model.` names.
//!
//! The decoder's up blocks are numbered in reverse: diffusers `decoder.up_blocks.k` is SGM
//! `decoder.up.(n-1-k)`. The mid-block attention's q, k, v and output projection are 1x1
//! convolutions in SGM and Linears in diffusers.

use super::{index, is_leaf_rest, join, strip_head, SgmVaeLayout, Transform};

const RESNET_MEMBERS: [(&str, &str); 5] =
    [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("conv_shortcut", "nin_shortcut")];

/// Mid-block attention members: diffusers <-> SGM, and whether the weight is a 1x1 conv in SGM.
const ATTENTION_MEMBERS: [(&str, &str, bool); 5] =
    [("group_norm", "norm", false), ("to_q", "q", true), ("to_k", "k", true), ("to_v", "v", true), ("to_out.0", "proj_out", true)];

/// Names of the attention members in diffusers files written before diffusers 0.15.
const LEGACY_ATTENTION_MEMBERS: [(&str, &str); 4] = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];

/// Leaf modules outside the blocks: diffusers <-> SGM.
const TOP_LEVEL: [(&str, &str); 8] = [
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("encoder.conv_norm_out", "encoder.norm_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("decoder.conv_norm_out", "decoder.norm_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
];

fn resnet(head: String, rest: &[&str], to_sgm: bool) -> Option<(String, Transform)> {
    if rest.is_empty() {
        return Some((head, Transform::None));
    }
    for (diff, sgm) in RESNET_MEMBERS {
        let (from, to) = if to_sgm { (diff, sgm) } else { (sgm, diff) };
        if rest[0] == from {
            let tail = &rest[1..];
            return is_leaf_rest(tail).then(|| (join(&format!("{head}.{to}"), tail), Transform::None));
        }
    }
    None
}

fn attention(head: String, rest: &[&str], to_sgm: bool) -> Option<(String, Transform)> {
    if rest.is_empty() {
        return Some((head, Transform::None));
    }
    for (diff, sgm, conv) in ATTENTION_MEMBERS {
        let (from, to) = if to_sgm { (diff, sgm) } else { (sgm, diff) };
        if let Some(tail) = strip_head(rest, from) {
            if !is_leaf_rest(tail) {
                return None;
            }
            let transform = if conv && tail == ["weight"] { Transform::Conv1x1ToLinear } else { Transform::None };
            return Some((join(&format!("{head}.{to}"), tail), transform));
        }
    }
    if to_sgm {
        // Old diffusers spellings map to the same SGM key.
        let (_, modern) = LEGACY_ATTENTION_MEMBERS.iter().find(|(old, _)| *old == rest[0])?;
        let mut renamed: Vec<&str> = modern.split('.').collect();
        renamed.extend_from_slice(&rest[1..]);
        return attention(head, &renamed, true);
    }
    None
}

/// diffusers VAE path -> SGM path (no `first_stage_model.` prefix) and transform.
pub(super) fn to_sgm(layout: &SgmVaeLayout, path: &str) -> Option<(String, Transform)> {
    let segs: Vec<&str> = path.split('.').collect();
    for (diff, sgm) in TOP_LEVEL {
        if let Some(rest) = strip_head(&segs, diff) {
            return is_leaf_rest(rest).then(|| (join(sgm, rest), Transform::None));
        }
    }
    let n = layout.num_blocks;
    let l = layout.layers_per_block;
    match segs.as_slice() {
        [part @ ("encoder" | "decoder"), "mid_block", "resnets", j, rest @ ..] => match index(j)? {
            j @ (0 | 1) => resnet(format!("{part}.mid.block_{}", j + 1), rest, true),
            _ => None,
        },
        [part @ ("encoder" | "decoder"), "mid_block", "attentions", "0", rest @ ..] => attention(format!("{part}.mid.attn_1"), rest, true),
        ["encoder", "down_blocks", i, kind, rest @ ..] => {
            let i = index(i)?;
            if i >= n {
                return None;
            }
            match (*kind, rest) {
                ("resnets", [j, rest @ ..]) if index(j)? < l => resnet(format!("encoder.down.{i}.block.{j}"), rest, true),
                ("downsamplers", ["0", "conv", tail @ ..]) if i + 1 < n && is_leaf_rest(tail) => {
                    Some((join(&format!("encoder.down.{i}.downsample.conv"), tail), Transform::None))
                }
                _ => None,
            }
        }
        ["decoder", "up_blocks", k, kind, rest @ ..] => {
            let k = index(k)?;
            if k >= n {
                return None;
            }
            let i = n - 1 - k;
            match (*kind, rest) {
                ("resnets", [j, rest @ ..]) if index(j)? <= l => resnet(format!("decoder.up.{i}.block.{j}"), rest, true),
                ("upsamplers", ["0", "conv", tail @ ..]) if k + 1 < n && is_leaf_rest(tail) => {
                    Some((join(&format!("decoder.up.{i}.upsample.conv"), tail), Transform::None))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// SGM VAE path (no `first_stage_model.` prefix) -> diffusers path.
pub(super) fn from_sgm(layout: &SgmVaeLayout, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('.').collect();
    for (diff, sgm) in TOP_LEVEL {
        if let Some(rest) = strip_head(&segs, sgm) {
            return is_leaf_rest(rest).then(|| join(diff, rest));
        }
    }
    let n = layout.num_blocks;
    let l = layout.layers_per_block;
    let found = match segs.as_slice() {
        [part @ ("encoder" | "decoder"), "mid", "block_1", rest @ ..] => resnet(format!("{part}.mid_block.resnets.0"), rest, false),
        [part @ ("encoder" | "decoder"), "mid", "block_2", rest @ ..] => resnet(format!("{part}.mid_block.resnets.1"), rest, false),
        [part @ ("encoder" | "decoder"), "mid", "attn_1", rest @ ..] => attention(format!("{part}.mid_block.attentions.0"), rest, false),
        ["encoder", "down", i, kind, rest @ ..] => {
            let i = index(i)?;
            if i >= n {
                return None;
            }
            match (*kind, rest) {
                ("block", [j, rest @ ..]) if index(j)? < l => resnet(format!("encoder.down_blocks.{i}.resnets.{j}"), rest, false),
                ("downsample", ["conv", tail @ ..]) if i + 1 < n && is_leaf_rest(tail) => {
                    Some((join(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), tail), Transform::None))
                }
                _ => None,
            }
        }
        ["decoder", "up", i, kind, rest @ ..] => {
            let i = index(i)?;
            if i >= n {
                return None;
            }
            let k = n - 1 - i;
            match (*kind, rest) {
                ("block", [j, rest @ ..]) if index(j)? <= l => resnet(format!("decoder.up_blocks.{k}.resnets.{j}"), rest, false),
                ("upsample", ["conv", tail @ ..]) if k + 1 < n && is_leaf_rest(tail) => {
                    Some((join(&format!("decoder.up_blocks.{k}.upsamplers.0.conv"), tail), Transform::None))
                }
                _ => None,
            }
        }
        _ => None,
    };
    found.map(|(name, _)| name)
}
