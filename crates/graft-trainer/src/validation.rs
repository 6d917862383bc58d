//! Validation: the diffusion loss on images the run does not train on, at fixed timesteps with
//! fixed noise, so that every evaluation of a run (and every run of a comparison with the same
//! validation seed) sees the same noisy inputs and the values differ only by the weights.
//!
//! The images come from `validation_dir` (a folder like the dataset's, read with the dataset's
//! resolution and buckets, without augmentations) or from `validation_split` (a fraction of the
//! dataset, chosen from `validation_seed` and removed from training). Each image is encoded once
//! (the VAE distribution's mean: no randomness) and kept in memory with its SDXL time ids; its
//! caption's embeddings go through the trainer's text-embedding cache (or through the text
//! encoders with their adapters while a strategy has adapters there).
//!
//! The noise of image `i` at timestep `t` comes from a generator of its own, seeded from
//! (`validation_seed`, i, t): the training random stream is never touched, so a run trains the
//! same with or without validation. The loss itself is the training step's
//! ([`crate::trainer::Trainer::validate`]).

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{Device, Shape, Tensor};
use graft_sdxl::rng::GraftRng;
use serde::{Deserialize, Serialize};

use crate::cache::LatentCache;
use crate::config::TrainConfig;
use crate::dataset::{Dataset, DatasetConfig, OpenOptions, SubsetSpec};
use crate::error::{At, Error, Result};
use crate::options::TrainOptions;

/// Timesteps per validation image when none are given.
pub const DEFAULT_TIMESTEP_COUNT: usize = 4;

/// Salts of the validation generators (apart from any other use of the seed).
const NOISE_SALT: u64 = 0x7a1d_0001;
const SPLIT_SALT: u64 = 0x7a1d_0002;

/// `validation_timesteps`: a count spread evenly over the scheduler's range, or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ValidationTimesteps {
    Count(usize),
    List(Vec<usize>),
}

impl Default for ValidationTimesteps {
    fn default() -> Self {
        Self::Count(DEFAULT_TIMESTEP_COUNT)
    }
}

impl ValidationTimesteps {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The timesteps for a scheduler of `range` training timesteps: a count `k` gives the
    /// centres of `k` equal parts of [0, range) (4 of 1000: 125, 375, 625, 875).
    pub fn resolve(&self, range: usize) -> Result<Vec<usize>> {
        match self {
            Self::Count(k) if *k == 0 || *k > range => Err(Error::Config(format!(
                "`validation_timesteps = {k}`: use a count from 1 to {range} (the scheduler's timesteps), or a list of timesteps"
            ))),
            Self::Count(k) => Ok((0..*k).map(|i| (2 * i + 1) * range / (2 * k)).collect()),
            Self::List(v) if v.is_empty() => {
                Err(Error::Config("`validation_timesteps = []`: give at least one timestep, or a count".to_string()))
            }
            Self::List(v) => match v.iter().find(|&&t| t >= range) {
                Some(t) => Err(Error::Config(format!("`validation_timesteps` has {t}: timesteps go from 0 to {}", range - 1))),
                None => Ok(v.clone()),
            },
        }
    }
}

/// The validation options that can be checked without the data: one error naming the option.
pub fn check(o: &TrainOptions) -> Result<()> {
    if let Some(f) = o.validation_split {
        if !(f > 0.0 && f < 1.0) {
            return Err(Error::Config(format!(
                "`validation_split = {f}`: use a fraction between 0 and 1 (exclusive), e.g. 0.1 to hold out a tenth of the images"
            )));
        }
    }
    if o.validation_split.is_some() && o.validation_dir.is_some() {
        return Err(Error::Config(
            "`validation_dir` and `validation_split` are both set: keep one (a folder of validation images, or a fraction of the dataset)"
                .to_string(),
        ));
    }
    let has_data = o.validation_split.is_some() || o.validation_dir.is_some();
    if !has_data && (o.validate_every > 0 || !o.validation_timesteps.is_default() || o.validation_seed.is_some()) {
        let key = if o.validate_every > 0 {
            "validate_every"
        } else if o.validation_seed.is_some() {
            "validation_seed"
        } else {
            "validation_timesteps"
        };
        return Err(Error::Config(format!("`{key}` is set but there is no validation data: set `validation_dir` or `validation_split`")));
    }
    if let ValidationTimesteps::Count(0) | ValidationTimesteps::List(_) = &o.validation_timesteps {
        // The scheduler's range is checked when the run starts; these are wrong for any range.
        o.validation_timesteps.resolve(usize::MAX)?;
    }
    Ok(())
}

/// One validation image, ready to be noised.
struct Item {
    caption: String,
    /// `[1, C, h, w]`, scaled as the training latents.
    latent: Tensor,
    /// `[1, 6]`: SDXL's original size, crop and target size.
    time_ids: Tensor,
}

/// The validation images of a run and when they are evaluated.
pub struct Validation {
    dataset: Dataset,
    items: Vec<Item>,
    timesteps: Vec<usize>,
    seed: u64,
    every: u64,
}

impl Validation {
    /// The validation images of `config`: read from `validation_dir`, or held out of `training`
    /// (`validation_split`; `training` then loses them). `None` without validation data.
    pub fn open(config: &TrainConfig, training: &mut Dataset, range: usize) -> Result<Option<Self>> {
        let o = &config.options;
        check(o)?;
        let seed = o.validation_seed.unwrap_or(o.seed);
        let dataset = match (&o.validation_dir, o.validation_split) {
            (Some(dir), _) => open_dir(config, training, dir)?,
            (None, Some(fraction)) => hold_out(training, fraction, seed)?,
            (None, None) => return Ok(None),
        };
        let timesteps = o.validation_timesteps.resolve(range)?;
        tracing::info!(
            "validation: {} images ({}) x timesteps {:?}, {}; {} training images",
            dataset.len(),
            match &o.validation_dir {
                Some(d) => format!("from {}", d.display()),
                None => "held out of the dataset".to_string(),
            },
            timesteps,
            if o.validate_every > 0 { format!("every {} steps and at the end", o.validate_every) } else { "at the end".to_string() },
            training.len()
        );
        Ok(Some(Self { dataset, items: Vec::new(), timesteps, seed, every: o.validate_every }))
    }

    /// The number of validation images.
    pub fn len(&self) -> usize {
        self.dataset.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dataset.is_empty()
    }

    /// The validation images.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The captions, for the text-embedding cache.
    pub fn captions(&self) -> impl Iterator<Item = &str> {
        self.dataset.items().iter().map(|it| it.caption.as_str())
    }

    /// True when the loss is measured after `done` of `total` steps: every `validate_every`
    /// steps, and after the last.
    pub fn due(&self, done: u64, total: u64) -> bool {
        done == total || (self.every > 0 && done.is_multiple_of(self.every))
    }

    /// Encodes every image once (the VAE's mean, scaled by `scale`); later calls do nothing.
    pub fn prepare(&mut self, vae: &graft_sdxl::vae::Vae, scale: f64, device: &Device) -> Result<()> {
        if !self.items.is_empty() {
            return Ok(());
        }
        let mut cache = LatentCache::in_memory();
        let mut encode = |img: &Tensor| -> candle_core::Result<Tensor> { vae.encode(img)?.mode() * scale };
        for (i, it) in self.dataset.items().iter().enumerate() {
            let latent = cache.latent(&self.dataset, i, false, device, &mut encode).at(|| format!("validation image {}", it.path.display()))?;
            let p = it.placement;
            let ids = [it.original.height, it.original.width, p.crop_top, p.crop_left, p.bucket.height, p.bucket.width].map(|x| x as f32);
            self.items.push(Item {
                caption: it.caption.clone(),
                latent: latent.unsqueeze(0)?,
                time_ids: Tensor::from_vec(ids.to_vec(), (1, 6), device)?,
            });
        }
        Ok(())
    }

    /// (caption, latent, time ids) of each prepared image.
    pub fn items(&self) -> impl Iterator<Item = (&str, &Tensor, &Tensor)> {
        self.items.iter().map(|it| (it.caption.as_str(), &it.latent, &it.time_ids))
    }

    /// The fixed noise of image `image` at timestep `timestep`: the same on every call.
    pub fn noise(&self, image: usize, timestep: usize, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let mut rng = GraftRng::new(self.seed).derive(NOISE_SALT).derive(image as u64).derive(timestep as u64);
        Ok(rng.randn(shape, device)?)
    }
}

/// `validation_dir` as a dataset: the training dataset's resolution and buckets, no
/// augmentation, its caption extension.
fn open_dir(config: &TrainConfig, training: &Dataset, dir: &Path) -> Result<Dataset> {
    let named = |e: Error| Error::Config(format!("`validation_dir` {}: {e}", dir.display()));
    if !dir.is_dir() {
        return Err(Error::Config(format!("`validation_dir` {}: not a folder", dir.display())));
    }
    let mut subset = SubsetSpec::new(dir);
    subset.caption_extension = config.dataset.caption_extension.clone();
    let ds_config = DatasetConfig::from_folder(dir, &training.specs()[0], &subset).map_err(named)?;
    let ds = Dataset::open(&ds_config, &OpenOptions { skip_bad: config.dataset.skip_bad, ..Default::default() }).map_err(named)?;
    for w in ds.warnings() {
        tracing::warn!("validation_dir: {w}");
    }
    Ok(ds)
}

/// Takes `fraction` of `training`'s images (at least one, rounded) out of it, chosen from `seed`.
fn hold_out(training: &mut Dataset, fraction: f64, seed: u64) -> Result<Dataset> {
    let n = training.len();
    let k = ((fraction * n as f64).round() as usize).max(1);
    if k >= n {
        return Err(Error::Config(format!(
            "`validation_split = {fraction}` holds out {k} of the dataset's {n} images and leaves none to train on: lower it, or use `validation_dir`"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = GraftRng::new(seed).derive(SPLIT_SALT);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let chosen: BTreeSet<usize> = order[..k].iter().copied().collect();
    Ok(training.split_off(&chosen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(extra: &str) -> TrainOptions {
        toml::from_str(&format!("steps = 10\n{extra}")).unwrap()
    }

    fn err(extra: &str) -> String {
        check(&options(extra)).unwrap_err().to_string()
    }

    #[test]
    fn timesteps_spread_evenly_or_as_listed() {
        assert_eq!(ValidationTimesteps::default().resolve(1000).unwrap(), vec![125, 375, 625, 875]);
        assert_eq!(ValidationTimesteps::Count(1).resolve(1000).unwrap(), vec![500]);
        assert_eq!(ValidationTimesteps::Count(5).resolve(1000).unwrap(), vec![100, 300, 500, 700, 900]);
        assert_eq!(ValidationTimesteps::List(vec![999, 0]).resolve(1000).unwrap(), vec![999, 0]);
        let e = ValidationTimesteps::List(vec![10, 1000]).resolve(1000).unwrap_err().to_string();
        assert!(e.contains("`validation_timesteps` has 1000") && e.contains("0 to 999"), "{e}");
        let e = ValidationTimesteps::Count(0).resolve(1000).unwrap_err().to_string();
        assert!(e.contains("`validation_timesteps = 0`"), "{e}");
        assert_eq!(options("validation_timesteps = 6").validation_timesteps, ValidationTimesteps::Count(6));
        assert_eq!(options("validation_timesteps = [1, 2]").validation_timesteps, ValidationTimesteps::List(vec![1, 2]));
    }

    #[test]
    fn bad_options_name_the_option() {
        for f in ["0.0", "1.0", "-0.5", "1.5", "nan"] {
            let e = err(&format!("validation_split = {f}"));
            assert!(e.starts_with("`validation_split = ") && e.contains("between 0 and 1"), "{f}: {e}");
        }
        let e = err("validation_split = 0.2\nvalidation_dir = \"v\"");
        assert!(e.contains("`validation_dir` and `validation_split` are both set"), "{e}");
        assert!(err("validate_every = 5").starts_with("`validate_every` is set but there is no validation data"));
        assert!(err("validation_seed = 5").starts_with("`validation_seed` is set"));
        assert!(err("validation_timesteps = [3]").starts_with("`validation_timesteps` is set"));
        assert!(err("validation_split = 0.2\nvalidation_timesteps = []").contains("at least one timestep"));
        check(&options("validation_split = 0.25\nvalidate_every = 5\nvalidation_timesteps = [10, 500]")).unwrap();
        check(&options("")).unwrap();
    }

    fn dataset(dir: &Path, n: usize) -> Dataset {
        for i in 0..n {
            image::RgbImage::from_pixel(64, 64, image::Rgb([i as u8 * 20, 90, 200])).save(dir.join(format!("{i:02}.png"))).unwrap();
            std::fs::write(dir.join(format!("{i:02}.txt")), format!("image {i}")).unwrap();
        }
        let spec = crate::dataset::DatasetSpec::new(crate::buckets::Reso { width: 64, height: 64 });
        Dataset::open(&DatasetConfig::from_folder(dir, &spec, &SubsetSpec::new(dir)).unwrap(), &OpenOptions::default()).unwrap()
    }

    /// The split is a function of the seed, takes the rounded fraction, and removes the images
    /// it takes from training.
    #[test]
    fn split_holds_out_images_chosen_by_the_seed() {
        let dir = tempfile::tempdir().unwrap();
        let full = dataset(dir.path(), 10);
        let keys = |d: &Dataset| d.items().iter().map(|it| it.key.clone()).collect::<BTreeSet<_>>();
        let split = |fraction, seed| {
            let mut train = full.clone();
            let held = hold_out(&mut train, fraction, seed).unwrap();
            (keys(&train), keys(&held))
        };
        let (train, held) = split(0.25, 7);
        assert_eq!((train.len(), held.len()), (7, 3), "0.25 of 10 rounds to 3");
        assert!(train.is_disjoint(&held));
        assert_eq!(train.union(&held).count(), 10);
        assert_eq!(split(0.25, 7), (train.clone(), held.clone()), "same seed, same split");
        let others: Vec<_> = (8..14).map(|s| split(0.25, s).1).collect();
        assert!(others.iter().any(|h| *h != held), "the seed chooses the images");
        assert_eq!(split(0.01, 1).1.len(), 1, "at least one image");
        let e = hold_out(&mut full.clone(), 0.96, 1).unwrap_err().to_string();
        assert!(e.contains("`validation_split = 0.96` holds out 10 of the dataset's 10 images"), "{e}");
    }
}
