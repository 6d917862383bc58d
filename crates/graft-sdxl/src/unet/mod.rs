//! The SDXL UNet with diffusers' `UNet2DConditionModel` semantics and module names, so that the
//! weights of a diffusers `unet/` folder load as they are and every hook point is named by its
//! diffusers module path (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`).
//!
//! Hook points: every linear of every `Transformer2DModel` (`proj_in`, `attn1`/`attn2` `to_q`,
//! `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`, `proj_out`) and every attention module
//! (`attn1`, `attn2`). They are registered in construction order, which is the forward order.

mod blocks;
pub mod config;
mod embeddings;
pub mod transformer;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{run1, Direct, Runner};
use crate::hooks::{HookRegistry, Hooks};
use crate::nn::{conv2d, group_norm, timestep_embedding};

use blocks::{AttentionSettings, Common, DownBlock, MidBlock, UpBlock, UpChannels};
pub use config::{BlockSettings, PerBlock, UNetConfig};
use embeddings::TimestepEmbedding;

#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    registry: HookRegistry,
    time_embedding: TimestepEmbedding,
    /// SDXL's `text_time` add-embedding and its time-id width.
    add_embedding: Option<(TimestepEmbedding, usize)>,
    conv_in: crate::nn::Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: crate::nn::GroupNorm,
    conv_out: crate::nn::Conv2d,
    /// The dtype it computes in ([`crate::precision::activation_dtype`]).
    activations: candle_core::DType,
}

impl UNet {
    /// Builds the UNet from `vb` rooted at the UNet weights' root (`conv_in.weight`, ...).
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let blocks = config.blocks()?;
        let n = blocks.len();
        let c0 = blocks[0].out_channels;
        let temb_dim = config.time_embed_dim();
        let mut registry = HookRegistry::new();

        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), c0, temb_dim)?;
        let add_embedding = match (config.text_time(), config.projection_class_embeddings_input_dim) {
            (Some(id_dim), Some(in_dim)) => Some((TimestepEmbedding::new(vb.pp("add_embedding"), in_dim, temb_dim)?, id_dim)),
            _ => None,
        };
        let k_in = config.conv_in_kernel;
        let conv_in = conv2d(vb.pp("conv_in"), config.in_channels, c0, k_in, 1, k_in / 2)?;

        let common = Common {
            temb_channels: temb_dim,
            groups: config.groups()?,
            eps: config.norm_eps,
            use_linear_projection: config.use_linear_projection,
        };
        let attention =
            |b: &BlockSettings| AttentionSettings { heads: b.heads, depth: b.transformer_layers, context_dim: b.cross_attention_dim };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, b) in blocks.iter().enumerate() {
            let in_channels = if i == 0 { c0 } else { blocks[i - 1].out_channels };
            let cross = config.down_block_types[i] == "CrossAttnDownBlock2D";
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i.to_string()),
                i,
                in_channels,
                b.out_channels,
                b.layers,
                cross.then(|| attention(b)),
                i + 1 < n,
                &common,
                &mut registry,
            )?);
        }

        let last = &blocks[n - 1];
        let mid_block = MidBlock::new(vb.pp("mid_block"), last.out_channels, attention(last), &common, &mut registry)?;

        let reversed: Vec<BlockSettings> = blocks.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        for (i, b) in reversed.iter().enumerate() {
            let channels = UpChannels {
                prev_output: if i == 0 { last.out_channels } else { reversed[i - 1].out_channels },
                out: b.out_channels,
                skip_in: reversed[(i + 1).min(n - 1)].out_channels,
            };
            let cross = config.up_block_types[i] == "CrossAttnUpBlock2D";
            up_blocks.push(UpBlock::new(
                vb.pp("up_blocks").pp(i.to_string()),
                i,
                channels,
                b.layers + 1,
                cross.then(|| attention(b)),
                i + 1 < n,
                &common,
                &mut registry,
            )?);
        }

        let conv_norm_out = group_norm(vb.pp("conv_norm_out"), common.groups, c0, config.norm_eps)?;
        let k_out = config.conv_out_kernel;
        let conv_out = conv2d(vb.pp("conv_out"), c0, config.out_channels, k_out, 1, k_out / 2)?;

        let activations = crate::precision::activation_dtype(conv_in.weight().dtype(), conv_in.weight().device());
        Ok(Self {
            activations,
            config: config.clone(),
            registry,
            time_embedding,
            add_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn conv_in_weight(&self) -> &Tensor {
        self.conv_in.weight()
    }

    /// Computes in `dtype` from now on (default: [`crate::precision::activation_dtype`] of the
    /// weights). Inputs are converted on the way in, the prediction back on the way out.
    pub fn set_activations(&mut self, dtype: candle_core::DType) {
        self.activations = dtype;
    }

    /// The hook points, in forward order.
    pub fn registry(&self) -> &HookRegistry {
        &self.registry
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts the noise (or v) for `sample` [b, in_channels, h, w] at `timesteps` [b] (or one
    /// timestep for the whole batch), conditioned on `encoder_hidden_states` [b, 77, cross_dim],
    /// and for SDXL the pooled `text_embeds` [b, pooled] and `time_ids` [b, 6] (ignored by a UNet
    /// without the `text_time` add-embedding).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        self.forward_with(sample, timesteps, encoder_hidden_states, text_embeds, time_ids, hooks, &mut Direct)
    }

    /// [`UNet::forward`] as segments run by `runner`: the embeddings with `conv_in`, each resnet,
    /// transformer block and resampler, and the output head. With a
    /// [`crate::checkpoint::Tape`] this is the gradient-checkpointed forward.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with<'a>(
        &'a self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        hooks: &'a dyn Hooks,
        runner: &mut dyn Runner<'a>,
    ) -> Result<Tensor> {
        let out_dtype = sample.dtype();
        let sample = &sample.to_dtype(self.activations)?;
        let encoder_hidden_states = &encoder_hidden_states.to_dtype(self.activations)?;
        let (b, c, h, w) = sample.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!("unet: sample has {c} channels, the UNet expects {}", self.config.in_channels)
        }
        if encoder_hidden_states.rank() != 3 || encoder_hidden_states.dim(0)? != b {
            candle_core::bail!("unet: encoder_hidden_states must be [batch {b}, tokens, dim], got {:?}", encoder_hidden_states.dims())
        }
        let head = runner.run(
            &[sample, timesteps, text_embeds, time_ids],
            Box::new(move |xs| {
                let emb = self.embedding(b, xs[0].dtype(), &xs[1], &xs[2], &xs[3])?;
                let sample = if self.config.center_input_sample { xs[0].affine(2.0, -1.0)? } else { xs[0].clone() };
                Ok(vec![emb, self.conv_in.forward(&sample)?])
            }),
        )?;
        let (emb, mut x) = (head[0].clone(), head[1].clone());
        let context = encoder_hidden_states;

        // The upsamplers must land on the skip connections' sizes when the latent size is not a
        // multiple of the total downscale (diffusers' `forward_upsample_size`).
        let factor = 1usize << (self.up_blocks.len() - 1);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&x, &emb, context, hooks, runner)?;
            x = out;
            skips.extend(block_skips);
        }

        x = self.mid_block.forward(&x, &emb, context, hooks, runner)?;

        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let block_skips = skips.split_off(skips.len() - block.num_skips());
            let upsample_size = match skips.last() {
                Some(next) if forward_upsample_size && i + 1 < n_up => {
                    let (_, _, sh, sw) = next.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            x = block.forward(&x, &block_skips, &emb, context, upsample_size, hooks, runner)?;
        }

        // The conversion back inside the last segment: a checkpointing tape must produce the
        // tensor it is handed gradients for.
        run1(runner, &[&x], move |xs| self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs[0])?)?.to_dtype(out_dtype))
    }

    /// Timestep embedding plus, for SDXL, the `text_time` add-embedding: [b, time_embed_dim].
    fn embedding(&self, b: usize, dtype: candle_core::DType, timesteps: &Tensor, text_embeds: &Tensor, time_ids: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let t = timesteps.flatten_all()?;
        let t = match t.dim(0)? {
            n if n == b => t,
            1 => t.broadcast_as(b)?,
            n => candle_core::bail!("unet: {n} timesteps for a batch of {b}; give one or one per sample"),
        };
        let t_emb = timestep_embedding(&t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)?;
        let emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        let Some((add_embedding, id_dim)) = &self.add_embedding else {
            return Ok(emb);
        };
        if text_embeds.rank() != 2 || text_embeds.dim(0)? != b {
            candle_core::bail!("unet: text_embeds must be [batch {b}, pooled dim], got {:?}", text_embeds.dims())
        }
        if time_ids.rank() != 2 || time_ids.dim(0)? != b {
            candle_core::bail!("unet: time_ids must be [batch {b}, 6], got {:?}", time_ids.dims())
        }
        let ids = time_ids.flatten_all()?;
        let ids_emb = timestep_embedding(&ids, *id_dim, cfg.flip_sin_to_cos, cfg.freq_shift)?.reshape((b, ()))?;
        let add_in = Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &ids_emb.to_dtype(dtype)?], 1)?;
        let expected = cfg.projection_class_embeddings_input_dim.unwrap_or(0);
        if add_in.dim(1)? != expected {
            candle_core::bail!(
                "unet: text_embeds ({}) + time_ids ({} x {id_dim}) give {} features, the add-embedding expects {expected}",
                text_embeds.dim(1)?,
                time_ids.dim(1)?,
                add_in.dim(1)?
            )
        }
        emb + add_embedding.forward(&add_in)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{AttentionKind, BlockPosition, LayerKind, NoHooks};
    use crate::varbuilder::shape_only;
    use candle_core::{DType, Device};

    /// Every tensor a stride-0 view of one zero: builds the full SDXL UNet without memory.
    fn zeros_vb() -> VarBuilder<'static> {
        shape_only(&Device::Cpu).0
    }

    #[test]
    fn sdxl_weights_match_diffusers() {
        let (vb, requests) = shape_only(&Device::Cpu);
        UNet::new(vb, &UNetConfig::sdxl_base()).unwrap();
        let requests = requests.lock().unwrap();
        // diffusers' UNet2DConditionModel state_dict for this config: 1680 tensors, 2,567,463,684 values.
        assert_eq!(requests.len(), 1680);
        let values: usize = requests.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(values, 2_567_463_684);
    }

    #[test]
    fn sdxl_hook_points() {
        let unet = UNet::new(zeros_vb(), &UNetConfig::sdxl_base()).unwrap();
        let layers = unet.registry().layers();
        let linears: Vec<_> = layers.iter().filter(|l| l.kind == LayerKind::Linear).collect();
        let attentions: Vec<_> = layers.iter().filter(|l| l.kind == LayerKind::Attention).collect();
        assert_eq!(linears.len(), 722);
        assert_eq!(linears.iter().filter(|l| l.name.ends_with(".to_q")).count(), 140);
        assert_eq!(attentions.len(), 140);

        let get = |name: &str| &layers[unet.registry().index_of(name).unwrap_or_else(|| panic!("{name}"))];
        let q = get("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q");
        assert_eq!((q.in_features, q.out_features), (640, 640));
        assert_eq!(q.block, BlockPosition::Down(1));
        assert_eq!(q.attention, Some(AttentionKind::CrossAttention));
        let k = get("unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k");
        assert_eq!((k.in_features, k.out_features), (2048, 1280));
        assert_eq!(k.block, BlockPosition::Up(0));
        let o = get("unet.mid_block.attentions.0.transformer_blocks.3.attn1.to_out.0");
        assert_eq!(o.block, BlockPosition::Mid);
        assert_eq!(o.attention, Some(AttentionKind::SelfAttention));
        let ff = get("unet.up_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj");
        assert_eq!((ff.in_features, ff.out_features, ff.attention), (640, 5120, None));
        let p = get("unet.mid_block.attentions.0.proj_out");
        assert_eq!((p.in_features, p.attention), (1280, None));
        let a = get("unet.down_blocks.2.attentions.1.transformer_blocks.9.attn1");
        assert_eq!((a.kind, a.in_features, a.attention), (LayerKind::Attention, 1280, Some(AttentionKind::SelfAttention)));
        assert!(unet.registry().index_of("unet.down_blocks.0.attentions.0.proj_in").is_none());
        // Conv hook points: resnet conv1 / conv2 (3x3), conv_shortcut (1x1) where the widths
        // differ, downsamplers (3x3, stride 2) and upsamplers; proj_in / proj_out are linear.
        let convs: Vec<_> = layers.iter().filter(|l| l.kind == LayerKind::Conv).collect();
        assert_eq!(convs.len(), 49);
        assert_eq!(convs.iter().filter(|l| l.name.ends_with(".conv_shortcut")).count(), 11);
        assert!(convs.iter().all(|l| l.component == crate::hooks::Component::Unet));
        let c1 = get("unet.down_blocks.1.resnets.0.conv1");
        assert_eq!((c1.kind, c1.in_features, c1.out_features, c1.block), (LayerKind::Conv, 320, 640, BlockPosition::Down(1)));
        assert_eq!(c1.conv, Some(crate::hooks::ConvInfo { kernel: (3, 3), stride: 1, padding: 1 }));
        let sc = get("unet.up_blocks.2.resnets.0.conv_shortcut");
        assert_eq!((sc.in_features, sc.out_features), (960, 320));
        assert_eq!(sc.conv, Some(crate::hooks::ConvInfo { kernel: (1, 1), stride: 1, padding: 0 }));
        let ds = get("unet.down_blocks.0.downsamplers.0.conv");
        assert_eq!(ds.conv, Some(crate::hooks::ConvInfo { kernel: (3, 3), stride: 2, padding: 1 }));
        let us = get("unet.up_blocks.1.upsamplers.0.conv");
        assert_eq!((us.block, us.conv.map(|c| c.stride)), (BlockPosition::Up(1), Some(1)));
        assert!(unet.registry().linear_weights(unet.registry().index_of("unet.mid_block.resnets.1.conv2").unwrap()).is_some());
    }

    /// A small config built from the SDXL one: two blocks, odd widths.
    fn small_config() -> UNetConfig {
        let mut c = UNetConfig::sdxl_base();
        c.block_out_channels = vec![8, 16];
        c.down_block_types = vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()];
        c.up_block_types = vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()];
        c.attention_head_dim = PerBlock::Each(vec![1, 2]);
        c.transformer_layers_per_block = PerBlock::Each(vec![1, 2]);
        c.layers_per_block = PerBlock::One(1);
        c.norm_num_groups = Some(4);
        c.cross_attention_dim = PerBlock::One(12);
        c.addition_time_embed_dim = Some(4);
        c.projection_class_embeddings_input_dim = Some(10 + 6 * 4);
        c
    }

    #[test]
    fn odd_sizes_and_shared_timestep() {
        let unet = UNet::new(zeros_vb(), &small_config()).unwrap();
        let dev = Device::Cpu;
        let sample = Tensor::zeros((2, 4, 7, 9), DType::F32, &dev).unwrap();
        let ctx = Tensor::zeros((2, 5, 12), DType::F32, &dev).unwrap();
        let pooled = Tensor::zeros((2, 10), DType::F32, &dev).unwrap();
        let ids = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[500f32], &dev).unwrap();
        let out = unet.forward(&sample, &t, &ctx, &pooled, &ids, &NoHooks).unwrap();
        assert_eq!(out.dims(), &[2, 4, 7, 9]);
        let bad = Tensor::zeros((2, 9), DType::F32, &dev).unwrap();
        let e = unet.forward(&sample, &t, &ctx, &bad, &ids, &NoHooks).unwrap_err().to_string();
        assert!(e.contains("add-embedding"), "{e}");
    }

    #[test]
    fn conv_projections_are_conv_hook_points_only_without_linear_projection() {
        let mut c = small_config();
        c.use_linear_projection = false;
        let unet = UNet::new(zeros_vb(), &c).unwrap();
        let reg = unet.registry();
        let p = &reg.layers()[reg.index_of("unet.down_blocks.1.attentions.0.proj_in").unwrap()];
        assert_eq!((p.kind, p.in_features, p.out_features), (LayerKind::Conv, 16, 16));
        assert_eq!(p.conv, Some(crate::hooks::ConvInfo { kernel: (1, 1), stride: 1, padding: 0 }));
        let linear = UNet::new(zeros_vb(), &small_config()).unwrap();
        let l = &linear.registry().layers()[linear.registry().index_of("unet.down_blocks.1.attentions.0.proj_in").unwrap()];
        assert_eq!(l.kind, LayerKind::Linear);
    }

    #[test]
    fn nearest_indices_match_torch() {
        // torch.nn.functional.interpolate(x, size=..., mode="nearest") on an arange input.
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12f32, &dev).unwrap().reshape((1, 1, 3, 4)).unwrap();
        let y = blocks::upsample_nearest(&x, 5, 7).unwrap();
        let rows: Vec<f32> = y.get(0).unwrap().get(0).unwrap().get(4).unwrap().to_vec1().unwrap();
        let cols: Vec<f32> = y.get(0).unwrap().get(0).unwrap().narrow(1, 3, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // rows: floor(i * 3/5) = 0,0,1,1,2; cols: floor(j * 4/7) = 0,0,1,1,2,2,3
        assert_eq!(rows, vec![8., 8., 9., 9., 10., 10., 11.]);
        assert_eq!(cols, vec![1., 1., 5., 5., 9.]);
    }
}
