use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};

use super::*;

fn unet(layout: &SgmLayout, name: &str) -> String {
    let key = layout.to_sgm(SgmComponent::Unet, name).unwrap_or_else(|| panic!("no SGM key for {name}"));
    assert_eq!(key.transform, Transform::None, "{name}");
    key.name
}

/// Pairs read off diffusers' single-file conversion (convert_ldm_unet_checkpoint and friends).
#[test]
fn sdxl_known_pairs() {
    let l = SgmLayout::sdxl();
    let unet_pairs = [
        ("time_embedding.linear_1.weight", "time_embed.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("conv_norm_out.bias", "out.0.bias"),
        ("conv_out.weight", "out.2.weight"),
        ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
        ("down_blocks.0.resnets.1.conv1.bias", "input_blocks.2.0.in_layers.2.bias"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.1.resnets.0.time_emb_proj.weight", "input_blocks.4.0.emb_layers.1.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
        ("down_blocks.1.attentions.0.proj_in.weight", "input_blocks.4.1.proj_in.weight"),
        ("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight", "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight"),
        ("down_blocks.1.downsamplers.0.conv.bias", "input_blocks.6.0.op.bias"),
        ("down_blocks.2.resnets.0.norm2.weight", "input_blocks.7.0.out_layers.0.weight"),
        ("down_blocks.2.resnets.1.conv2.weight", "input_blocks.8.0.out_layers.3.weight"),
        ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.weight", "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight"),
        ("mid_block.resnets.0.norm1.weight", "middle_block.0.in_layers.0.weight"),
        ("mid_block.attentions.0.norm.weight", "middle_block.1.norm.weight"),
        ("mid_block.resnets.1.conv2.bias", "middle_block.2.out_layers.3.bias"),
        ("up_blocks.0.resnets.0.conv1.weight", "output_blocks.0.0.in_layers.2.weight"),
        ("up_blocks.0.attentions.0.proj_out.weight", "output_blocks.0.1.proj_out.weight"),
        ("up_blocks.0.attentions.2.transformer_blocks.0.norm3.bias", "output_blocks.2.1.transformer_blocks.0.norm3.bias"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
        ("up_blocks.1.resnets.2.conv_shortcut.bias", "output_blocks.5.0.skip_connection.bias"),
        ("up_blocks.1.attentions.1.transformer_blocks.1.attn1.to_out.0.weight", "output_blocks.4.1.transformer_blocks.1.attn1.to_out.0.weight"),
        ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
        ("up_blocks.2.resnets.0.norm1.weight", "output_blocks.6.0.in_layers.0.weight"),
        ("up_blocks.2.resnets.2.conv2.weight", "output_blocks.8.0.out_layers.3.weight"),
    ];
    for (d, s) in unet_pairs {
        assert_eq!(unet(&l, d), format!("model.diffusion_model.{s}"), "{d}");
        let (c, names) = l.from_sgm(&format!("model.diffusion_model.{s}")).expect(s);
        assert_eq!((c, names), (SgmComponent::Unet, vec![d.to_string()]), "{s}");
    }

    let vae_pairs = [
        ("encoder.conv_in.weight", "encoder.conv_in.weight", Transform::None),
        ("encoder.conv_norm_out.bias", "encoder.norm_out.bias", Transform::None),
        ("encoder.down_blocks.0.resnets.1.conv2.weight", "encoder.down.0.block.1.conv2.weight", Transform::None),
        ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight", Transform::None),
        ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias", Transform::None),
        ("encoder.mid_block.resnets.0.norm1.weight", "encoder.mid.block_1.norm1.weight", Transform::None),
        ("encoder.mid_block.resnets.1.conv2.bias", "encoder.mid.block_2.conv2.bias", Transform::None),
        ("encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight", Transform::None),
        ("encoder.mid_block.attentions.0.to_q.weight", "encoder.mid.attn_1.q.weight", Transform::Conv1x1ToLinear),
        ("encoder.mid_block.attentions.0.to_q.bias", "encoder.mid.attn_1.q.bias", Transform::None),
        ("decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight", Transform::Conv1x1ToLinear),
        ("decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.up.3.block.0.conv1.weight", Transform::None),
        ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight", Transform::None),
        ("decoder.up_blocks.2.resnets.0.conv_shortcut.bias", "decoder.up.1.block.0.nin_shortcut.bias", Transform::None),
        ("decoder.up_blocks.3.resnets.2.norm2.weight", "decoder.up.0.block.2.norm2.weight", Transform::None),
        ("decoder.conv_norm_out.weight", "decoder.norm_out.weight", Transform::None),
        ("quant_conv.weight", "quant_conv.weight", Transform::None),
        ("post_quant_conv.bias", "post_quant_conv.bias", Transform::None),
    ];
    for (d, s, t) in vae_pairs {
        let full = format!("first_stage_model.{s}");
        assert_eq!(l.to_sgm(SgmComponent::Vae, d), Some(SgmKey { name: full.clone(), transform: t }), "{d}");
        assert_eq!(l.from_sgm(&full), Some((SgmComponent::Vae, vec![d.to_string()])), "{s}");
    }
    // Old diffusers spellings of the VAE attention load too.
    assert_eq!(
        l.to_sgm(SgmComponent::Vae, "decoder.mid_block.attentions.0.proj_attn.weight"),
        Some(SgmKey { name: "first_stage_model.decoder.mid.attn_1.proj_out.weight".into(), transform: Transform::Conv1x1ToLinear })
    );
    assert_eq!(
        l.to_sgm(SgmComponent::Vae, "encoder.mid_block.attentions.0.key.bias").map(|k| k.name),
        Some("first_stage_model.encoder.mid.attn_1.k.bias".into())
    );

    let te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight";
    let te1_key = l.to_sgm(SgmComponent::TextEncoder, "text_model.encoder.layers.11.self_attn.q_proj.weight");
    assert_eq!(te1_key, Some(SgmKey { name: te1.into(), transform: Transform::None }));
    // transformers 5 drops the text_model. prefix when it saves.
    assert_eq!(l.to_sgm(SgmComponent::TextEncoder, "encoder.layers.11.self_attn.q_proj.weight").unwrap().name, te1);

    let h = 1280;
    let te2_pairs = [
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", Transform::None),
        ("text_model.embeddings.position_embedding.weight", "positional_embedding", Transform::None),
        ("text_model.final_layer_norm.bias", "ln_final.bias", Transform::None),
        ("text_projection.weight", "text_projection", Transform::Transpose),
        ("text_model.encoder.layers.3.layer_norm1.weight", "transformer.resblocks.3.ln_1.weight", Transform::None),
        ("text_model.encoder.layers.3.layer_norm2.bias", "transformer.resblocks.3.ln_2.bias", Transform::None),
        (
            "text_model.encoder.layers.3.self_attn.q_proj.weight",
            "transformer.resblocks.3.attn.in_proj_weight",
            Transform::Rows { start: 0, len: h },
        ),
        (
            "text_model.encoder.layers.3.self_attn.k_proj.weight",
            "transformer.resblocks.3.attn.in_proj_weight",
            Transform::Rows { start: h, len: h },
        ),
        (
            "text_model.encoder.layers.31.self_attn.v_proj.bias",
            "transformer.resblocks.31.attn.in_proj_bias",
            Transform::Rows { start: 2 * h, len: h },
        ),
        ("text_model.encoder.layers.3.self_attn.out_proj.weight", "transformer.resblocks.3.attn.out_proj.weight", Transform::None),
        ("text_model.encoder.layers.3.mlp.fc1.bias", "transformer.resblocks.3.mlp.c_fc.bias", Transform::None),
        ("text_model.encoder.layers.3.mlp.fc2.weight", "transformer.resblocks.3.mlp.c_proj.weight", Transform::None),
    ];
    for (d, s, t) in te2_pairs {
        let full = format!("conditioner.embedders.1.model.{s}");
        assert_eq!(l.to_sgm(SgmComponent::TextEncoder2, d), Some(SgmKey { name: full, transform: t }), "{d}");
    }
    assert_eq!(
        l.from_sgm("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"),
        Some((
            SgmComponent::TextEncoder2,
            vec![
                "text_model.encoder.layers.3.self_attn.q_proj.weight".to_string(),
                "text_model.encoder.layers.3.self_attn.k_proj.weight".to_string(),
                "text_model.encoder.layers.3.self_attn.v_proj.weight".to_string(),
            ]
        ))
    );
}

#[test]
fn kohya_module_paths() {
    let l = SgmLayout::sdxl();
    let pairs = [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
        ("up_blocks.0.attentions.1.proj_in", "output_blocks.1.1.proj_in"),
        ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
        ("down_blocks.0.resnets.0", "input_blocks.1.0"),
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("down_blocks.0.downsamplers.0", "input_blocks.3.0"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_out", "out.2"),
    ];
    for (d, s) in pairs {
        assert_eq!(l.unet_module_to_sgm(d).as_deref(), Some(s), "{d}");
        assert_eq!(l.unet_module_from_sgm(s).as_deref(), Some(d), "{s}");
    }
}

#[test]
fn rejects_names_outside_the_layout() {
    let l = SgmLayout::sdxl();
    let bad_unet = [
        "down_blocks.0.attentions.0.proj_in.weight", // DownBlock2D has no attention
        "down_blocks.2.downsamplers.0.conv.weight",  // last down block has no downsampler
        "down_blocks.0.resnets.2.conv1.weight",      // only 2 resnets per down block
        "down_blocks.3.resnets.0.conv1.weight",
        "up_blocks.2.attentions.0.proj_in.weight",
        "up_blocks.2.upsamplers.0.conv.weight",
        "up_blocks.0.resnets.3.conv1.weight",
        "mid_block.resnets.2.conv1.weight",
        "mid_block.attentions.1.proj_in.weight",
        "down_blocks.0.resnets.0.bogus.weight",
        "down_blocks.01.resnets.0.conv1.weight",
        "conv_in.weight.extra",
        "something.else",
    ];
    for n in bad_unet {
        assert_eq!(l.to_sgm(SgmComponent::Unet, n), None, "{n}");
    }
    let bad_sgm = [
        "model.diffusion_model.input_blocks.1.1.proj_in.weight", // block 0 has no attention
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.input_blocks.3.1.proj_in.weight",
        "model.diffusion_model.input_blocks.0.1.weight",
        "model.diffusion_model.middle_block.3.in_layers.0.weight",
        "model.diffusion_model.output_blocks.8.1.conv.weight", // last up block has no upsampler
        "model.diffusion_model.output_blocks.6.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight", // upsampler only after the last layer
        "model.diffusion_model.output_blocks.9.0.in_layers.0.weight",
        "first_stage_model.decoder.up.0.upsample.conv.weight",
        "first_stage_model.encoder.down.3.downsample.conv.weight",
        "first_stage_model.encoder.down.0.block.2.conv1.weight",
        "conditioner.embedders.1.model.logit_scale",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ];
    for n in bad_sgm {
        assert_eq!(l.from_sgm(n), None, "{n}");
    }
    assert_eq!(l.to_sgm(SgmComponent::TextEncoder2, "text_model.embeddings.position_ids"), None);
    assert_eq!(l.to_sgm(SgmComponent::TextEncoder, "text_model.embeddings.position_ids"), None);
    assert_eq!(l.from_sgm("conditioner.embedders.0.transformer.text_model.embeddings.position_ids"), None);
    assert!(is_known_extra("conditioner.embedders.1.model.logit_scale"));
    assert!(is_known_extra("conditioner.embedders.0.transformer.text_model.embeddings.position_ids"));
}

/// SD 1.5 shape (4 blocks, attention in down 0..2 and up 1..3): a second layout to keep the index
/// arithmetic honest (pairs from diffusers' SD conversion).
#[test]
fn sd15_shaped_layout() {
    let unet = SgmUnetLayout::new(
        2,
        &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )
    .unwrap();
    let l = SgmLayout::new(unet, SgmVaeLayout::sdxl(), 1024);
    let pairs = [
        ("down_blocks.0.attentions.1.proj_in", "input_blocks.2.1.proj_in"),
        ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
        ("down_blocks.3.resnets.1", "input_blocks.11.0"),
        ("up_blocks.0.resnets.2", "output_blocks.2.0"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
    ];
    for (d, s) in pairs {
        assert_eq!(l.unet_module_to_sgm(d).as_deref(), Some(s), "{d}");
        assert_eq!(l.unet_module_from_sgm(s).as_deref(), Some(d), "{s}");
    }
    assert_eq!(l.unet_module_to_sgm("down_blocks.3.downsamplers.0.conv"), None);
    assert!(SgmUnetLayout::new(2, &["DownBlock2D"], &[] as &[&str]).is_err());
}

fn push_params(out: &mut Vec<String>, module: &str, bias: bool) {
    out.push(format!("{module}.weight"));
    if bias {
        out.push(format!("{module}.bias"));
    }
}

fn push_unet_resnet(out: &mut Vec<String>, p: &str, shortcut: bool) {
    for m in ["norm1", "conv1", "time_emb_proj", "norm2", "conv2"] {
        push_params(out, &format!("{p}.{m}"), true);
    }
    if shortcut {
        push_params(out, &format!("{p}.conv_shortcut"), true);
    }
}

fn push_unet_attention(out: &mut Vec<String>, p: &str, depth: usize) {
    for m in ["norm", "proj_in", "proj_out"] {
        push_params(out, &format!("{p}.{m}"), true);
    }
    for k in 0..depth {
        let b = format!("{p}.transformer_blocks.{k}");
        for m in ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2", "attn1.to_out.0", "attn2.to_out.0"] {
            push_params(out, &format!("{b}.{m}"), true);
        }
        for a in ["attn1", "attn2"] {
            for m in ["to_q", "to_k", "to_v"] {
                push_params(out, &format!("{b}.{a}.{m}"), false);
            }
        }
    }
}

/// Every parameter name of the SDXL base UNet (diffusers).
fn sdxl_unet_names() -> Vec<String> {
    let mut out = Vec::new();
    for m in ["time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"] {
        push_params(&mut out, m, true);
    }
    for m in ["conv_in", "conv_norm_out", "conv_out"] {
        push_params(&mut out, m, true);
    }
    let depth = [0, 2, 10];
    for (i, d) in depth.into_iter().enumerate() {
        for j in 0..2 {
            push_unet_resnet(&mut out, &format!("down_blocks.{i}.resnets.{j}"), i > 0 && j == 0);
            if d > 0 {
                push_unet_attention(&mut out, &format!("down_blocks.{i}.attentions.{j}"), d);
            }
        }
        if i < 2 {
            push_params(&mut out, &format!("down_blocks.{i}.downsamplers.0.conv"), true);
        }
    }
    push_unet_resnet(&mut out, "mid_block.resnets.0", false);
    push_unet_attention(&mut out, "mid_block.attentions.0", 10);
    push_unet_resnet(&mut out, "mid_block.resnets.1", false);
    for i in 0..3 {
        let d = depth[2 - i];
        for j in 0..3 {
            push_unet_resnet(&mut out, &format!("up_blocks.{i}.resnets.{j}"), true);
            if d > 0 {
                push_unet_attention(&mut out, &format!("up_blocks.{i}.attentions.{j}"), d);
            }
        }
        if i < 2 {
            push_params(&mut out, &format!("up_blocks.{i}.upsamplers.0.conv"), true);
        }
    }
    out
}

fn push_vae_resnet(out: &mut Vec<String>, p: &str, shortcut: bool) {
    for m in ["norm1", "conv1", "norm2", "conv2"] {
        push_params(out, &format!("{p}.{m}"), true);
    }
    if shortcut {
        push_params(out, &format!("{p}.conv_shortcut"), true);
    }
}

fn sdxl_vae_names() -> Vec<String> {
    let mut out = Vec::new();
    for m in ["quant_conv", "post_quant_conv"] {
        push_params(&mut out, m, true);
    }
    for part in ["encoder", "decoder"] {
        for m in ["conv_in", "conv_norm_out", "conv_out"] {
            push_params(&mut out, &format!("{part}.{m}"), true);
        }
        push_vae_resnet(&mut out, &format!("{part}.mid_block.resnets.0"), false);
        push_vae_resnet(&mut out, &format!("{part}.mid_block.resnets.1"), false);
        for m in ["group_norm", "to_q", "to_k", "to_v", "to_out.0"] {
            push_params(&mut out, &format!("{part}.mid_block.attentions.0.{m}"), true);
        }
    }
    // Channels 128, 256, 512, 512: the encoder changes width at down block 1 and 2, the decoder
    // (reversed) at up block 2 and 3.
    for i in 0..4 {
        for j in 0..2 {
            push_vae_resnet(&mut out, &format!("encoder.down_blocks.{i}.resnets.{j}"), j == 0 && (i == 1 || i == 2));
        }
        if i < 3 {
            push_params(&mut out, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), true);
        }
        for j in 0..3 {
            push_vae_resnet(&mut out, &format!("decoder.up_blocks.{i}.resnets.{j}"), j == 0 && (i == 2 || i == 3));
        }
        if i < 3 {
            push_params(&mut out, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), true);
        }
    }
    out
}

fn clip_names(layers: usize, projection: bool) -> Vec<String> {
    let mut out = Vec::new();
    for m in ["embeddings.token_embedding", "embeddings.position_embedding"] {
        push_params(&mut out, &format!("text_model.{m}"), false);
    }
    push_params(&mut out, "text_model.final_layer_norm", true);
    for n in 0..layers {
        let members = [
            "layer_norm1",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ];
        for m in members {
            push_params(&mut out, &format!("text_model.encoder.layers.{n}.{m}"), true);
        }
    }
    if projection {
        push_params(&mut out, "text_projection", false);
    }
    out
}

/// Every name maps to a distinct (key, transform); every key maps back to the names that use it.
fn check_round_trip(layout: &SgmLayout, component: SgmComponent, names: &[String]) -> usize {
    let mut by_key: BTreeMap<String, Vec<(String, Transform)>> = BTreeMap::new();
    for n in names {
        let k = layout.to_sgm(component, n).unwrap_or_else(|| panic!("{component:?}: no SGM key for {n}"));
        by_key.entry(k.name).or_default().push((n.clone(), k.transform));
    }
    for (key, users) in &by_key {
        let (c, back) = layout.from_sgm(key).unwrap_or_else(|| panic!("no diffusers name for {key}"));
        assert_eq!(c, component, "{key}");
        let users_names: Vec<String> = users.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(back, users_names, "{key}");
        if users.len() > 1 {
            // Only fused in_proj keys are shared, by q, k, v rows that tile the tensor.
            let rows: Vec<Transform> = users.iter().map(|(_, t)| t.clone()).collect();
            let h = layout.te2_hidden_size;
            assert_eq!(rows, (0..3).map(|s| Transform::Rows { start: s * h, len: h }).collect::<Vec<_>>(), "{key}");
        }
    }
    by_key.len()
}

#[test]
fn sdxl_round_trip_every_name() {
    let l = SgmLayout::sdxl();
    let unet = sdxl_unet_names();
    assert_eq!(unet.len(), 1680);
    assert_eq!(unet.iter().collect::<BTreeSet<_>>().len(), 1680);
    assert_eq!(check_round_trip(&l, SgmComponent::Unet, &unet), 1680);

    let vae = sdxl_vae_names();
    assert_eq!(vae.len(), 248);
    assert_eq!(check_round_trip(&l, SgmComponent::Vae, &vae), 248);

    let te1 = clip_names(12, false);
    assert_eq!(te1.len(), 196);
    assert_eq!(check_round_trip(&l, SgmComponent::TextEncoder, &te1), 196);

    let te2 = clip_names(32, true);
    assert_eq!(te2.len(), 517);
    // 32 layers of 12 SGM tensors (fused q, k, v) + token/positional embedding, ln_final, projection.
    assert_eq!(check_round_trip(&l, SgmComponent::TextEncoder2, &te2), 32 * 12 + 5);
}

#[test]
fn transforms_round_trip() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let fused = Tensor::arange(0f32, 24., &dev)?.reshape((6, 4))?;
    let parts: Vec<Tensor> =
        (0..3).map(|s| Transform::Rows { start: 2 * s, len: 2 }.to_diffusers(&fused)).collect::<candle_core::Result<_>>()?;
    assert_eq!(parts[1].to_vec2::<f32>()?, vec![vec![8., 9., 10., 11.], vec![12., 13., 14., 15.]]);
    assert_eq!(fuse_rows(&parts)?.to_vec2::<f32>()?, fused.to_vec2::<f32>()?);
    assert!(Transform::Rows { start: 6, len: 2 }.to_diffusers(&fused).is_err());
    assert!(Transform::Rows { start: 0, len: 2 }.to_sgm(&fused).is_err());

    let proj = Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?;
    let t = Transform::Transpose.to_diffusers(&proj)?;
    assert_eq!(t.to_vec2::<f32>()?, vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]);
    assert_eq!(Transform::Transpose.to_sgm(&t)?.to_vec2::<f32>()?, proj.to_vec2::<f32>()?);

    let conv = Tensor::arange(0f32, 6., &dev)?.reshape((2, 3, 1, 1))?;
    let lin = Transform::Conv1x1ToLinear.to_diffusers(&conv)?;
    assert_eq!(lin.dims(), &[2, 3]);
    assert_eq!(Transform::Conv1x1ToLinear.to_sgm(&lin)?.dims(), &[2, 3, 1, 1]);
    assert_eq!(Transform::Conv1x1ToLinear.to_diffusers(&lin)?.dims(), &[2, 3]);
    assert!(Transform::Conv1x1ToLinear.to_diffusers(&conv.reshape((2, 3, 1))?).is_err());
    Ok(())
}

#[test]
fn detects_single_files() {
    let keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.decoder.conv_in.weight",
        "conditioner.embedders.1.model.ln_final.weight",
    ];
    let found = detect(&keys).unwrap();
    assert_eq!(found, SgmContents { unet: true, vae: true, text_encoder: false, text_encoder_2: true });
    assert!(found.has(SgmComponent::TextEncoder2) && !found.has(SgmComponent::TextEncoder));
    assert_eq!(detect(&["down_blocks.0.resnets.0.conv1.weight"]), None);
    assert_eq!(detect::<&str>(&[]), None);
}
