//! SDXL on candle: the UNet, the two CLIP text encoders, the VAE, schedulers, the CLIP tokenizer
//! and the loaders, with every attention linear a named hook point (see [`hooks`]).

pub mod checkpoint;
pub mod chunked_attention;
pub mod clip;
pub mod cpu_attention;
pub mod error;
pub mod fused;
pub mod hooks;
pub mod matmul;
pub mod model;
pub mod nn;
pub mod overrides;
pub mod pipeline;
pub mod precision;
pub mod precomputed;
pub mod resnet;
pub mod rng;
pub mod schedulers;
pub mod sgm;
pub mod simd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod varbuilder;

pub use error::{ConfigError, LoadError};
pub use hooks::{Component, ConvInfo, HookRegistry, Hooks, LayerInfo, LayerKind, NoHooks};
pub use model::{SdxlConfig, SdxlModel};
pub use pipeline::{GenerateParams, PipelineHooks};
pub use precision::WeightDtype;
