//! The options of a training run, one struct flattened into the three configs that start runs
//! (`graft train`'s TOML, `graft compare`'s TOML and `graft serve`'s JSON request), so that
//! every option has one name, one default and one meaning everywhere.

use std::collections::BTreeSet;
use std::path::PathBuf;

use graft_sdxl::schedulers::PredictionType;
use graft_sdxl::WeightDtype;
use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::Serialize;

use crate::schedule::ScheduleKind;
pub use crate::validation::ValidationTimesteps;

/// Where VAE latents of the training images are kept between epochs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheLatents {
    /// Encoded once, kept in memory.
    #[default]
    Memory,
    /// Encoded once, kept in files on disk.
    Disk,
    /// Encoded at every step (augmentations that change pixels need it).
    None,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrainOptions {
    #[serde(default)]
    pub seed: u64,
    pub steps: u64,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default = "one")]
    pub gradient_accumulation: usize,
    /// Default: the model's scheduler config.
    #[serde(default)]
    pub prediction_type: Option<PredictionType>,
    #[serde(default)]
    pub noise_offset: f64,
    #[serde(default)]
    pub min_snr_gamma: f64,
    #[serde(default)]
    pub max_grad_norm: f64,
    /// AdamW (default), AdamW8bit, Lion, Prodigy or Adafactor, any case (kohya's names).
    #[serde(default = "adamw", skip_serializing_if = "is_adamw")]
    pub optimizer: String,
    /// The optimizer's arguments, by the reference libraries' names.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub optimizer_args: toml::Table,
    #[serde(default)]
    pub lr_schedule: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: u64,
    /// The restarts of `cosine_with_restarts` (kohya's name; default 1); other schedules ignore it,
    /// as in kohya.
    #[serde(default)]
    pub lr_scheduler_num_cycles: Option<f64>,
    /// A checkpoint every this many good steps (0: at the end only).
    #[serde(default)]
    pub save_every: u64,
    /// Sample images every this many steps (0: never).
    #[serde(default)]
    pub sample_every: u64,
    /// The sampler of prompts that name none (`--ss`): a graft, kohya or A1111 name; default euler.
    #[serde(default)]
    pub sample_sampler: Option<String>,
    #[serde(default)]
    pub cache_latents: CacheLatents,
    /// Stop after this many bad (skipped) steps in a row.
    #[serde(default = "ten")]
    pub max_bad_steps: u64,
    /// The precision frozen base weights are kept in (adapters and optimizer state stay f32).
    #[serde(default)]
    pub dtype: WeightDtype,
    /// Keep only segment inputs in the forward and recompute each segment in the backward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// With every caption's embeddings cached and no adapter in a text encoder, free the text
    /// encoders' weights during the steps; they are read back for sample images (kohya's name).
    #[serde(default = "yes")]
    pub cache_text_encoder_outputs: bool,
    /// A folder of images with captions (as the dataset's) whose loss is measured during the
    /// run and never trained on; not with `validation_split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_dir: Option<PathBuf>,
    /// Hold out this fraction (between 0 and 1) of the dataset's images for validation, chosen
    /// from `validation_seed`; they are not trained on. Not with `validation_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_split: Option<f64>,
    /// With validation data: the validation loss every this many steps, and after the last
    /// step (0: after the last step only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub validate_every: u64,
    /// The timesteps every validation image is noised at: a list (`[100, 500, 900]`), or a
    /// count spread evenly over the scheduler's range (default 4: 125, 375, 625, 875 of 1000).
    #[serde(default, skip_serializing_if = "ValidationTimesteps::is_default")]
    pub validation_timesteps: ValidationTimesteps,
    /// The seed of the validation noise and of `validation_split`'s choice (default: `seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_seed: Option<u64>,
}

impl TrainOptions {
    /// The options' key names.
    pub fn keys() -> &'static [&'static str] {
        field_names::<TrainOptions>()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
fn one() -> usize {
    1
}
fn adamw() -> String {
    "AdamW".into()
}
/// The default optimizer is left out of what a checkpoint records, so checkpoints made before
/// the key existed still resume.
fn is_adamw(name: &str) -> bool {
    name.eq_ignore_ascii_case("adamw")
}
fn ten() -> u64 {
    10
}
fn yes() -> bool {
    true
}

/// The field names serde reads for the struct `T` (one without flattened fields).
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Names(Option<&'static [&'static str]>);
    impl<'de> Deserializer<'de> for &mut Names {
        type Error = de::value::Error;
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            Err(de::Error::custom("names only"))
        }
        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut names = Names(None);
    let _ = T::deserialize(&mut names);
    names.0.unwrap_or(&[])
}

/// serde's `deny_unknown_fields` for a struct with flattened options (serde cannot combine the
/// two): the first key that is neither one of `own` nor an option is refused, with serde's
/// wording.
pub fn refuse_unknown_keys<'a>(keys: impl IntoIterator<Item = &'a String>, own: &[&str]) -> Result<(), String> {
    let known: BTreeSet<&str> = own.iter().chain(TrainOptions::keys()).copied().collect();
    for key in keys {
        if !known.contains(key.as_str()) {
            let list: Vec<String> = own.iter().chain(TrainOptions::keys()).map(|k| format!("`{k}`")).collect();
            return Err(format!("unknown field `{key}`, expected one of {}", list.join(", ")));
        }
    }
    Ok(())
}

/// A config whose options stand at its top level (train, compare): the TOML table, its unknown
/// keys refused, then the struct.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, own: &[&str]) -> crate::error::Result<T> {
    use crate::error::Error;
    let table: toml::Table = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
    refuse_unknown_keys(table.keys(), own).map_err(Error::Config)?;
    table.try_into().map_err(|e: toml::de::Error| Error::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_keys_are_read_from_the_struct() {
        let keys = TrainOptions::keys();
        assert!(keys.contains(&"steps") && keys.contains(&"cache_text_encoder_outputs") && keys.contains(&"lr_schedule"));
        assert_eq!(keys.len(), 26);
        let e = refuse_unknown_keys(&["steps".to_string(), "stesp".to_string()], &["model"]).unwrap_err();
        assert!(e.starts_with("unknown field `stesp`, expected one of `model`, `seed`"), "{e}");
    }

    #[test]
    fn enums_are_named_as_in_the_configs() {
        let o: TrainOptions =
            toml::from_str("steps = 1\nlr_schedule = \"cosine_with_restarts\"\ncache_latents = \"disk\"\nprediction_type = \"v_prediction\"")
                .unwrap();
        assert_eq!(o.lr_schedule, ScheduleKind::CosineWithRestarts);
        assert_eq!(o.cache_latents, CacheLatents::Disk);
        assert_eq!(o.prediction_type, Some(PredictionType::VPrediction));
        let e = toml::from_str::<TrainOptions>("steps = 1\ncache_latents = \"ram\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant `ram`, expected one of `memory`, `disk`, `none`"), "{e}");
    }
}
