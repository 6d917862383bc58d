//! The demo model (assets/demo-model, made by `graft demo-model`) draws what it is asked for:
//! each of 20 fixed prompts (4 colours x 5 positions) is generated and the image measured
//! directly (`graft_host::demo::judge`): the colour of the drawn pixels and where they are.

use candle_core::Device;
use graft_host::demo::judge::{check_prompts, judge};
use graft_sdxl::pipeline::{to_rgb8, GenerateParams, PipelineHooks};
use graft_sdxl::SdxlModel;

/// The figures the README gives: colour right for 18 of 20 prompts, position for 16 of 20
/// (measured on the committed model; the misses are 2 red prompts drawn yellow, and 4 shapes
/// drawn centred: a red square on the right, a red circle at the bottom, a green circle at the
/// top, a blue triangle on the left). The bounds leave a margin of one each for another CPU's
/// rounding.
const MIN_COLOR: usize = 17;
const MIN_POSITION: usize = 15;

#[test]
fn the_demo_model_draws_the_colour_and_position_of_the_prompt() {
    let model = SdxlModel::load(&graft_host::demo::demo_model().unwrap(), None, &Device::Cpu).unwrap();
    let prompts = check_prompts();
    let params: Vec<GenerateParams> = prompts
        .iter()
        .enumerate()
        .map(|(i, (prompt, _, _))| GenerateParams {
            prompt: prompt.clone(),
            width: 64,
            height: 64,
            steps: 20,
            guidance: 4.0,
            seed: 100 + i as u64,
            ..Default::default()
        })
        .collect();
    let images = model.generate_batch(&params, PipelineHooks::none(), &mut |_, _| {}).unwrap();
    let (mut colors, mut positions) = (0, 0);
    let mut report = Vec::new();
    for ((prompt, color, position), g) in prompts.iter().zip(&images) {
        let (w, h, rgb) = to_rgb8(&g.image.squeeze(0).unwrap()).unwrap();
        let img = image::RgbImage::from_raw(w as u32, h as u32, rgb).unwrap();
        let drawn = judge(&img);
        let (c, p) = drawn.as_ref().map_or((false, false), |d| (d.color == *color, d.position == *position));
        colors += c as usize;
        positions += p as usize;
        report.push(format!("{prompt}: {drawn:?}"));
    }
    let report = report.join("\n");
    eprintln!("colour right {colors}/20, position right {positions}/20\n{report}");
    assert!(colors >= MIN_COLOR && positions >= MIN_POSITION, "colour right {colors}/20, position right {positions}/20:\n{report}");
}
