//! `graft generate` and `graft layers` end to end on the tiny fixture model.

use graft_tests::{graft, scratch, tiny_model, tiny_single_file};
use graft_trainer::png_out::read_parameters;

fn png_pixels(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn generate_writes_png_with_a1111_parameters_and_is_reproducible() {
    let dir = scratch("generate_png");
    let model = tiny_model();
    let run = |out: &str, seed: &str| {
        let out = dir.join(out);
        graft(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red fox, watercolor painting",
            "--negative-prompt",
            "blurry",
            "--width",
            "128",
            "--height",
            "96",
            "--steps",
            "3",
            "--seed",
            seed,
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        out
    };
    let a = run("a.png", "7");
    let b = run("b.png", "7");
    let c = run("c.png", "8");
    let (w, h, pa) = png_pixels(&a);
    assert_eq!((w, h), (128, 96));
    assert_eq!(pa, png_pixels(&b).2, "the same seed must give the same image");
    assert_ne!(pa, png_pixels(&c).2, "another seed must give another image");
    let params = read_parameters(&a).unwrap().expect("parameters chunk");
    let lines: Vec<&str> = params.lines().collect();
    assert_eq!(lines[0], "a red fox, watercolor painting");
    assert_eq!(lines[1], "Negative prompt: blurry");
    assert!(lines[2].starts_with("Steps: 3, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 128x96, Model: tiny-sdxl"), "{}", lines[2]);
}

#[test]
fn single_file_checkpoint_gives_the_same_image_as_the_diffusers_folder() {
    let dir = scratch("generate_single_file");
    let model = tiny_model();
    let single = tiny_single_file();
    let common = ["--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"];
    let folder_png = dir.join("folder.png");
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--out", folder_png.to_str().unwrap()];
    args.extend(common);
    graft(&args).unwrap();
    let single_png = dir.join("single.png");
    let mut args =
        vec!["generate", "--model", single.to_str().unwrap(), "--model-config", model.to_str().unwrap(), "--out", single_png.to_str().unwrap()];
    args.extend(common);
    graft(&args).unwrap();
    assert_eq!(png_pixels(&folder_png).2, png_pixels(&single_png).2);
}

#[test]
fn layers_of_the_builtin_sdxl_config() {
    let layers = graft_sdxl::model::layers_of(&graft_sdxl::SdxlConfig::sdxl_base()).unwrap();
    let count = |f: &dyn Fn(&graft_sdxl::LayerInfo) -> bool| layers.iter().filter(|l| f(l)).count();
    use graft_sdxl::{Component::*, LayerKind::*};
    assert_eq!(count(&|l| l.component == Unet && l.kind == Linear), 722);
    assert_eq!(count(&|l| l.kind == Linear && l.name.ends_with(".to_q")), 140);
    assert_eq!(count(&|l| l.component != Unet && l.kind == Linear), 264);
    assert_eq!(count(&|l| l.component == Unet && l.kind == Attention), 140);
    assert_eq!(count(&|l| l.component != Unet && l.kind == Attention), 12 + 32);
    assert!(layers.iter().any(|l| l.name == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"));
    assert!(layers.iter().any(|l| l.name == "text_encoder_2.text_model.encoder.layers.31.mlp.fc2"));
    graft(&["layers", "--filter", "unet.mid_block.*attn2.to_k"]).unwrap();
}

#[test]
fn the_last_batch_frees_the_text_encoders_and_the_unet_and_draws_the_same_image() {
    use graft_sdxl::{GenerateParams, PipelineHooks, SdxlModel};
    let dir = tiny_model();
    let dev = candle_core::Device::Cpu;
    let params = GenerateParams { prompt: "a cat".into(), width: 64, height: 64, steps: 2, seed: 3, ..Default::default() };
    let kept = SdxlModel::load(&dir, None, &dev).unwrap();
    let once = SdxlModel::load(&dir, None, &dev).unwrap();
    let a = kept.generate_batch(std::slice::from_ref(&params), PipelineHooks::none(), &mut |_, _| {}).unwrap();
    let b = once.generate_last_batch(std::slice::from_ref(&params), PipelineHooks::none(), &mut |_, _| {}).unwrap();
    let pixels = |g: &graft_sdxl::pipeline::Generated| g.image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(pixels(&a[0]), pixels(&b[0]), "freeing as it goes must not change the image");
    assert!(!kept.text_encoders_released() && !kept.unet.registry().released());
    assert!(once.text_encoders_released(), "the text encoders were not freed after encoding");
    assert!(once.unet.registry().released(), "the UNet was not freed before the decode");
    let err = once.generate(&params, PipelineHooks::none(), &mut |_, _| {}).err().expect("a freed UNet must refuse to denoise").to_string();
    assert!(err.contains("load the model again"), "{err}");
    // Text encoding alone still works: the encoders are read back from the files.
    once.encode_prompts(&["a dog"], PipelineHooks::none()).unwrap();
}
