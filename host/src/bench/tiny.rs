//! The tiny fixture model's inference workloads (as crates/graft-sdxl/benches/sdxl.rs).

use candle_core::{Device, Tensor};
use graft_sdxl::hooks::NoHooks;
use graft_sdxl::rng::GraftRng;
use graft_sdxl::{GenerateParams, PipelineHooks, SdxlModel};

use super::measure::{measure, Measured};
use super::Ctx;

pub const PROMPT: &str = "a red fox, watercolor painting";

pub fn load(ctx: &Ctx) -> anyhow::Result<SdxlModel> {
    Ok(SdxlModel::load(&ctx.fixture, None, &Device::Cpu)?)
}

/// The UNet inputs of a CFG batch at 128x96: latents [2, 4, 12, 16], t = 500, the prompt and
/// the empty prompt encoded.
pub struct UnetInputs {
    pub x: Tensor,
    pub t: Tensor,
    pub hidden: Tensor,
    pub pooled: Tensor,
    pub ids: Tensor,
}

impl UnetInputs {
    pub fn new(model: &SdxlModel) -> anyhow::Result<Self> {
        let dev = &model.device;
        let emb = model.encode_prompts(&[PROMPT, ""], PipelineHooks::none())?;
        let x = GraftRng::new(0).randn((2, 4, 12, 16), dev)?;
        let t = Tensor::new(&[500f32, 500.], dev)?;
        Ok(Self { x, t, hidden: emb.hidden, pooled: emb.pooled, ids: model.time_ids(128, 96, 2)? })
    }

    pub fn forward(&self, model: &SdxlModel, hooks: &dyn graft_sdxl::Hooks) -> anyhow::Result<Tensor> {
        Ok(model.unet.forward(&self.x, &self.t, &self.hidden, &self.pooled, &self.ids, hooks)?)
    }
}

pub fn text_encoders(ctx: &Ctx) -> anyhow::Result<Measured> {
    let model = load(ctx)?;
    measure(3, ctx.runs(20), || {
        model.encode_prompts(&[PROMPT, ""], PipelineHooks::none())?;
        Ok(())
    })
}

pub fn unet_forward(ctx: &Ctx) -> anyhow::Result<Measured> {
    let model = load(ctx)?;
    let inputs = UnetInputs::new(&model)?;
    measure(3, ctx.runs(20), || {
        inputs.forward(&model, &NoHooks)?;
        Ok(())
    })
}

pub fn vae_decode(ctx: &Ctx) -> anyhow::Result<Measured> {
    let model = load(ctx)?;
    let z = GraftRng::new(1).randn((1, 4, 12, 16), &model.device)?;
    measure(3, ctx.runs(20), || {
        model.decode_latents(&z)?;
        Ok(())
    })
}

pub fn generate(ctx: &Ctx) -> anyhow::Result<Measured> {
    let model = load(ctx)?;
    let params = GenerateParams { prompt: PROMPT.into(), width: 128, height: 96, steps: 4, ..Default::default() };
    measure(2, ctx.runs(10), || {
        model.generate(&params, PipelineHooks::none(), &mut |_, _| {})?;
        Ok(())
    })
}
