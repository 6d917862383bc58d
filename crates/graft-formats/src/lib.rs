//! Adapter files for graft: kohya, PEFT / diffusers, LyCORIS and graft-native safetensors.
//!
//! - [`adapter`]: the neutral in-memory form ([`AdapterFile`], [`ModuleWeights`]) and the delta
//!   weights each kind of entry stands for.
//! - [`keys`]: layer names in every format ([`KeyMap`]: graft names <-> kohya SGM / diffusers names).
//! - [`load`]: [`read_adapter`], format detection and the [`LoadReport`] that accounts for every key.
//! - [`kohya`], [`peft`], [`lycoris`], [`native`]: one module per key family, each with its writer.
//! - [`metadata`]: kohya's `ss_*` / `modelspec.*` metadata and model hashes.
//! - [`read`], [`write`]: safetensors in (any float dtype to f32) and out (deterministic, atomic).
//!
//! Layer names are graft's: the diffusers module path with a component prefix,
//! `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`,
//! `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`,
//! `text_encoder_2.text_model.encoder.layers.0.mlp.fc2`.

pub mod adapter;
pub mod keys;
pub mod kohya;
pub mod load;
pub mod lycoris;
pub mod metadata;
pub mod native;
pub mod peft;
pub mod read;
pub mod write;

pub use adapter::{kron, lora_scale, AdapterFile, AdapterFormat, AdapterWeights, LokrFactor, ModuleKind, ModuleWeights};
pub use keys::{to_kohya, KeyMap};
pub use kohya::{write_kohya, Written};
pub use load::{detect, read_adapter, read_raw, Attached, LoadReport};
pub use lycoris::{write_diff, write_lycoris};
pub use metadata::KohyaMetadata;
pub use native::{write_native, NativeInfo};
pub use peft::write_peft;
pub use write::StoreDtype;
