//! UNet: diffusers block names <-> SGM `input_blocks` / `middle_block` / `output_blocks`.
//!
//! SGM numbers the UNet as flat sequences. With L = layers_per_block (SDXL: 2 for every block):
//! - `input_blocks.0.0` is `conv_in`; down block i, layer j < L is `input_blocks.(1 + i(L+1) + j)`
//!   with `.0` the resnet and `.1` the attention; its downsampler is `input_blocks.((i+1)(L+1)).0.op`.
//! - `middle_block.0/1/2` are resnet 0, the attention, resnet 1.
//! - up block i, layer j <= L is `output_blocks.(i(L+1) + j)` with `.0` the resnet and `.1` the
//!   attention; the upsampler sits after the last layer: `.1.conv` without attention, `.2.conv` with.
//!
//! Per-block layer counts shift the offsets the same way (up block i mirrors down block n-1-i).
//! Paths work with or without the parameter suffix (module paths for kohya LoRA names).

use super::{index, is_leaf_rest, join, strip_head, SgmUnetLayout};

/// diffusers resnet member <-> SGM `ResBlock` member.
const RESNET_MEMBERS: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// Top-level leaf modules: diffusers <-> SGM.
const TOP_LEVEL: [(&str, &str); 7] = [
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
];

/// Whether block `i` has attentions (a short list means no).
fn has(attention: &[bool], i: usize) -> bool {
    attention.get(i).copied().unwrap_or(false)
}

/// Maps the members of a resnet (the path after `resnets.j`) to the SGM members.
fn resnet_to_sgm(head: String, rest: &[&str]) -> Option<String> {
    if rest.is_empty() {
        return Some(head);
    }
    let (_, sgm) = RESNET_MEMBERS.iter().find(|(d, _)| *d == rest[0])?;
    let tail = &rest[1..];
    is_leaf_rest(tail).then(|| join(&format!("{head}.{sgm}"), tail))
}

fn resnet_from_sgm(head: String, rest: &[&str]) -> Option<String> {
    if rest.is_empty() {
        return Some(head);
    }
    for (diff, sgm) in RESNET_MEMBERS {
        if let Some(tail) = strip_head(rest, sgm) {
            return is_leaf_rest(tail).then(|| join(&format!("{head}.{diff}"), tail));
        }
    }
    None
}

/// Index of the first `input_blocks` entry of down block `i` (entry 0 is `conv_in`).
fn down_start(layout: &SgmUnetLayout, i: usize) -> usize {
    1 + layout.layers[..i].iter().map(|l| l + 1).sum::<usize>()
}

/// Resnets in up block `i` (diffusers order): one more than its mirrored down block.
fn up_layers(layout: &SgmUnetLayout, i: usize) -> usize {
    layout.layers[layout.num_blocks() - 1 - i] + 1
}

/// Index of the first `output_blocks` entry of up block `i`.
fn up_start(layout: &SgmUnetLayout, i: usize) -> usize {
    (0..i).map(|b| up_layers(layout, b)).sum()
}

/// `input_blocks.k` -> (down block, layer); layer == layers[i] is the downsampler slot.
fn down_position(layout: &SgmUnetLayout, k: usize) -> Option<(usize, usize)> {
    (0..layout.num_blocks()).find_map(|i| {
        let start = down_start(layout, i);
        (k >= start && k <= start + layout.layers[i]).then(|| (i, k - start))
    })
}

/// `output_blocks.k` -> (up block, layer).
fn up_position(layout: &SgmUnetLayout, k: usize) -> Option<(usize, usize)> {
    (0..layout.num_blocks()).find_map(|i| {
        let start = up_start(layout, i);
        (k >= start && k < start + up_layers(layout, i)).then(|| (i, k - start))
    })
}

/// The path after `downsamplers.0` / `upsamplers.0` <-> after the SGM sampler module.
fn sampler(head: String, rest: &[&str], from: &str, to: &str) -> Option<String> {
    match rest {
        [] => Some(head),
        [first, tail @ ..] if *first == from && is_leaf_rest(tail) => Some(join(&format!("{head}.{to}"), tail)),
        _ => None,
    }
}

/// diffusers UNet path -> SGM path (no `model.diffusion_model.` prefix).
pub(super) fn to_sgm(layout: &SgmUnetLayout, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('.').collect();
    for (diff, sgm) in TOP_LEVEL {
        if let Some(rest) = strip_head(&segs, diff) {
            return is_leaf_rest(rest).then(|| join(sgm, rest));
        }
    }
    let n = layout.num_blocks();
    match segs.as_slice() {
        ["down_blocks", i, kind, rest @ ..] => {
            let i = index(i).filter(|&i| i < n)?;
            let (start, l) = (down_start(layout, i), layout.layers[i]);
            match (*kind, rest) {
                ("resnets", [j, rest @ ..]) => {
                    let j = index(j).filter(|&j| j < l)?;
                    resnet_to_sgm(format!("input_blocks.{}.0", start + j), rest)
                }
                ("attentions", [j, rest @ ..]) if has(&layout.down_attention, i) => {
                    let j = index(j).filter(|&j| j < l)?;
                    Some(join(&format!("input_blocks.{}.1", start + j), rest))
                }
                ("downsamplers", ["0", rest @ ..]) if i + 1 < n => sampler(format!("input_blocks.{}.0", start + l), rest, "conv", "op"),
                _ => None,
            }
        }
        ["mid_block", "resnets", j, rest @ ..] => match index(j)? {
            0 => resnet_to_sgm("middle_block.0".into(), rest),
            1 => resnet_to_sgm("middle_block.2".into(), rest),
            _ => None,
        },
        ["mid_block", "attentions", "0", rest @ ..] => Some(join("middle_block.1", rest)),
        ["up_blocks", i, kind, rest @ ..] => {
            let i = index(i).filter(|&i| i < n)?;
            let (start, l) = (up_start(layout, i), up_layers(layout, i));
            let attn = has(&layout.up_attention, i);
            match (*kind, rest) {
                ("resnets", [j, rest @ ..]) => {
                    let j = index(j).filter(|&j| j < l)?;
                    resnet_to_sgm(format!("output_blocks.{}.0", start + j), rest)
                }
                ("attentions", [j, rest @ ..]) if attn => {
                    let j = index(j).filter(|&j| j < l)?;
                    Some(join(&format!("output_blocks.{}.1", start + j), rest))
                }
                // The upsampler follows the last resnet (and its attention, if any).
                ("upsamplers", ["0", rest @ ..]) if i + 1 < n => {
                    let head = format!("output_blocks.{}.{}", start + l - 1, 1 + attn as usize);
                    sampler(head, rest, "conv", "conv")
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// SGM UNet path (no `model.diffusion_model.` prefix) -> diffusers path.
pub(super) fn from_sgm(layout: &SgmUnetLayout, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('.').collect();
    for (diff, sgm) in TOP_LEVEL {
        if let Some(rest) = strip_head(&segs, sgm) {
            return is_leaf_rest(rest).then(|| join(diff, rest));
        }
    }
    let n = layout.num_blocks();
    match segs.as_slice() {
        ["input_blocks", k, m, rest @ ..] => {
            let (i, j) = down_position(layout, index(k)?)?;
            let in_block = j < layout.layers[i];
            match (in_block, index(m)?) {
                (true, 0) => resnet_from_sgm(format!("down_blocks.{i}.resnets.{j}"), rest),
                (true, 1) if has(&layout.down_attention, i) => Some(join(&format!("down_blocks.{i}.attentions.{j}"), rest)),
                (false, 0) if i + 1 < n => sampler(format!("down_blocks.{i}.downsamplers.0"), rest, "op", "conv"),
                _ => None,
            }
        }
        ["middle_block", k, rest @ ..] => match index(k)? {
            0 => resnet_from_sgm("mid_block.resnets.0".into(), rest),
            1 => Some(join("mid_block.attentions.0", rest)),
            2 => resnet_from_sgm("mid_block.resnets.1".into(), rest),
            _ => None,
        },
        ["output_blocks", k, m, rest @ ..] => {
            let (i, j) = up_position(layout, index(k)?)?;
            let attn = has(&layout.up_attention, i);
            let last = j + 1 == up_layers(layout, i);
            match index(m)? {
                0 => resnet_from_sgm(format!("up_blocks.{i}.resnets.{j}"), rest),
                1 if attn => Some(join(&format!("up_blocks.{i}.attentions.{j}"), rest)),
                m if m == 1 + attn as usize && last && i + 1 < n => sampler(format!("up_blocks.{i}.upsamplers.0"), rest, "conv", "conv"),
                _ => None,
            }
        }
        _ => None,
    }
}
