//! Training datasets: folders of images with caption files, kohya's conventions.
//!
//! **Files.** Images are `.png`, `.jpg`, `.jpeg` or `.webp` (other image types are listed as
//! warnings). The caption of `NAME.png` is the first line of `NAME.txt` or `NAME.caption` (or the
//! configured `caption_extension`), trimmed. Files are taken in name order, so a seed gives the same
//! run on any machine.
//!
//! **Folders.** Given one folder ([`DatasetConfig::from_folder`]): its images are one subset, and
//! each `N_name` subfolder is a subset repeated N times per epoch. The name is *not* added to the
//! captions; as in kohya, it is the caption of an image that has no caption file (DreamBooth-style
//! captionless data: `10_sks dog/` trains "sks dog"). Other subfolders are listed as warnings.
//!
//! **kohya TOML** ([`DatasetConfig::from_toml_file`]): `[general]`, `[[datasets]]` and
//! `[[datasets.subsets]]`. A subset setting is looked up in the subset, then its dataset, then
//! `[general]`; a dataset setting in the dataset, then `[general]`; then kohya's default. Dataset
//! settings: `resolution` (an int or `[w, h]`), `batch_size`, `enable_bucket`, `min_bucket_reso`,
//! `max_bucket_reso`, `bucket_reso_steps`, `bucket_no_upscale`. Subset settings: `image_dir` (the
//! subset only), `num_repeats`, `shuffle_caption`, `keep_tokens`, `caption_extension`,
//! `caption_separator`, `caption_dropout_rate`, `flip_aug`, `class_tokens` (the caption of images
//! without a caption file). Other kohya keys and unknown keys give a warning naming them. A
//! relative `image_dir` is taken from the TOML file's folder, or from the current folder when only
//! that one exists.
//!
//! **Images** are resized to cover their bucket and center-cropped (see `buckets`); EXIF
//! orientation is not applied (as in kohya). An image becomes a `[3, h, w]` f32 tensor in [-1, 1].
//! Alpha is dropped.
//!
//! **Epochs.** Every image times its repeats, grouped by (dataset, bucket); each group shuffled and
//! cut into batches of the dataset's `batch_size` (the last one may be shorter), and the batches
//! shuffled. All randomness (order, caption shuffle and dropout, flips) comes from `GraftRng`,
//! seeded from (seed, epoch) for the order and (seed, epoch, batch index) for each batch, so any
//! batch can be rebuilt alone: a resumed run sees exactly the same data.
//!
//! **Captions per sample:** with probability `caption_dropout_rate` the caption is empty;
//! otherwise, with `shuffle_caption`, the tags (split at `caption_separator`, default ",", and
//! trimmed) after the first `keep_tokens` are shuffled and joined with ", ". `flip_aug` flips
//! half of the samples horizontally.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use graft_sdxl::rng::GraftRng;

use super::buckets::{BucketSettings, Bucketer, Placement, Reso};

/// The image types read.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
/// Image types that are recognised but not read (listed as warnings).
const OTHER_IMAGE_EXTENSIONS: [&str; 7] = ["bmp", "gif", "avif", "tif", "tiff", "jxl", "heic"];
/// Caption files tried when no `caption_extension` is set.
pub const CAPTION_EXTENSIONS: [&str; 2] = [".txt", ".caption"];
/// At most this many problems are listed in one error.
const MAX_LISTED_PROBLEMS: usize = 20;

/// One folder of images and its settings (kohya's `[[datasets.subsets]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SubsetSpec {
    pub image_dir: PathBuf,
    pub num_repeats: usize,
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    /// `.txt` or `.caption` (a leading dot is optional); `None` tries both.
    pub caption_extension: Option<String>,
    pub caption_separator: String,
    pub caption_dropout_rate: f64,
    pub flip_aug: bool,
    /// The caption of an image without a caption file (kohya `class_tokens`, or the name part of
    /// an `N_name` folder). `None`: a missing caption file is an error.
    pub class_tokens: Option<String>,
}

impl SubsetSpec {
    pub fn new(image_dir: impl Into<PathBuf>) -> Self {
        Self {
            image_dir: image_dir.into(),
            num_repeats: 1,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_extension: None,
            caption_separator: ",".to_string(),
            caption_dropout_rate: 0.0,
            flip_aug: false,
            class_tokens: None,
        }
    }
}

/// One dataset (kohya's `[[datasets]]`): bucket settings, batch size and its subsets.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    pub buckets: BucketSettings,
    pub batch_size: usize,
    pub subsets: Vec<SubsetSpec>,
}

impl DatasetSpec {
    /// kohya's defaults at this resolution (batch 1, buckets off).
    pub fn new(resolution: Reso) -> Self {
        Self { buckets: BucketSettings::new(resolution), batch_size: 1, subsets: Vec::new() }
    }
}

/// All datasets of a run, with the warnings met while reading their configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DatasetConfig {
    pub datasets: Vec<DatasetSpec>,
    pub warnings: Vec<String>,
}

// Setting names, by the level they belong to.
const DATASET_KEYS: [&str; 7] =
    ["resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"];
const SUBSET_KEYS: [&str; 8] = [
    "num_repeats",
    "shuffle_caption",
    "keep_tokens",
    "caption_extension",
    "caption_separator",
    "caption_dropout_rate",
    "flip_aug",
    "class_tokens",
];
/// kohya keys that graft does not implement: named in a warning.
const UNSUPPORTED_KEYS: [&str; 22] = [
    "color_aug",
    "random_crop",
    "face_crop_aug_range",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_min",
    "token_warmup_step",
    "is_reg",
    "caption_prefix",
    "caption_suffix",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "alpha_mask",
    "cache_info",
    "metadata_file",
    "conditioning_data_dir",
    "network_multiplier",
    "resize_interpolation",
    "validation_seed",
    "validation_split",
    "custom_attributes",
];

impl DatasetConfig {
    /// Reads a kohya dataset TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Dataset(format!("cannot read dataset config {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, &path.display().to_string(), base)
    }

    /// Parses a kohya dataset TOML. `source` names it in messages; relative `image_dir`s are taken
    /// from `base_dir`.
    pub fn from_toml_str(text: &str, source: &str, base_dir: &Path) -> Result<Self> {
        let root: toml::Table = text.parse().map_err(|e| Error::Dataset(format!("dataset config {source} is not valid TOML: {e}")))?;
        let mut warnings = Vec::new();
        let empty = toml::Table::new();

        let general = match root.get("general") {
            None => &empty,
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err(Error::Dataset(format!("{source}: `general` must be a table ([general])"))),
        };
        for key in root.keys().filter(|k| *k != "general" && *k != "datasets") {
            warnings.push(format!("{source}: unknown top-level key '{key}' ignored (expected [general] and [[datasets]])"));
        }
        check_keys(general, "[general]", &[&DATASET_KEYS, &SUBSET_KEYS], source, &mut warnings);

        let datasets = match root.get("datasets") {
            Some(toml::Value::Array(a)) => a.as_slice(),
            Some(_) => return Err(Error::Dataset(format!("{source}: `datasets` must be an array of tables ([[datasets]])"))),
            None => {
                return Err(Error::Dataset(format!(
                    "{source} has no [[datasets]]: add one with a [[datasets.subsets]] whose image_dir is your image folder"
                )))
            }
        };
        let mut out = Vec::new();
        for (di, ds) in datasets.iter().enumerate() {
            let where_d = format!("[[datasets]] #{}", di + 1);
            let ds = ds.as_table().ok_or_else(|| Error::Dataset(format!("{source}: {where_d} must be a table")))?;
            check_keys(ds, &where_d, &[&DATASET_KEYS, &SUBSET_KEYS, &["subsets"]], source, &mut warnings);
            let layers = Layers { tables: vec![(ds, where_d.clone()), (general, "[general]".to_string())], source };
            let spec = layers.dataset_spec()?;

            let subsets = match ds.get("subsets") {
                Some(toml::Value::Array(a)) if !a.is_empty() => a.as_slice(),
                Some(toml::Value::Array(_)) | None => {
                    return Err(Error::Dataset(format!(
                        "{source}: {where_d} has no [[datasets.subsets]]: add one with image_dir = \"your/image/folder\""
                    )))
                }
                Some(_) => return Err(Error::Dataset(format!("{source}: {where_d}.subsets must be an array of tables"))),
            };
            let mut spec = spec;
            for (si, ss) in subsets.iter().enumerate() {
                let where_s = format!("[[datasets.subsets]] #{} of {where_d}", si + 1);
                let ss = ss.as_table().ok_or_else(|| Error::Dataset(format!("{source}: {where_s} must be a table")))?;
                check_keys(ss, &where_s, &[&SUBSET_KEYS, &["image_dir"]], source, &mut warnings);
                let layers = Layers { tables: vec![(ss, where_s.clone()), (ds, where_d.clone()), (general, "[general]".to_string())], source };
                let dir = match ss.get("image_dir") {
                    Some(toml::Value::String(s)) => resolve_dir(base_dir, s),
                    Some(_) => return Err(Error::Dataset(format!("{source}: image_dir in {where_s} must be a string"))),
                    None => return Err(Error::Dataset(format!("{source}: {where_s} has no image_dir: set it to your image folder"))),
                };
                spec.subsets.push(layers.subset_spec(dir)?);
            }
            out.push(spec);
        }
        if out.is_empty() {
            return Err(Error::Dataset(format!("{source} has an empty [[datasets]] list: add a dataset with a subset")));
        }
        Ok(Self { datasets: out, warnings })
    }

    /// One folder as a dataset: its own images (repeats 1) and its `N_name` subfolders (N
    /// repeats, the name as the caption of images without a caption file). `settings` gives the
    /// bucket settings and batch size, `subset` the caption and augmentation settings of every
    /// subset (its `image_dir`, `num_repeats` and `class_tokens` are replaced).
    pub fn from_folder(dir: &Path, settings: &DatasetSpec, subset: &SubsetSpec) -> Result<Self> {
        let entries = sorted_entries(dir)?;
        let mut warnings = Vec::new();
        let mut spec = DatasetSpec { subsets: Vec::new(), ..settings.clone() };
        let has_images = entries.iter().any(|p| p.is_file() && image_extension(p).is_some());
        if has_images {
            spec.subsets.push(SubsetSpec { image_dir: dir.to_path_buf(), num_repeats: 1, ..subset.clone() });
        }
        for path in entries.iter().filter(|p| p.is_dir()) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match parse_repeat_folder(&name) {
                Some((repeats, class)) => {
                    spec.subsets.push(SubsetSpec { image_dir: path.clone(), num_repeats: repeats, class_tokens: Some(class), ..subset.clone() })
                }
                None => warnings
                    .push(format!("folder {} ignored: subfolders are read only when named N_name (N repeats, e.g. 10_mystyle)", path.display())),
            }
        }
        if spec.subsets.is_empty() {
            return Err(Error::Dataset(format!(
                "no training images in {}: put .png/.jpg/.jpeg/.webp images there with caption files of the same name \
                 (NAME.txt), or N_name subfolders of them",
                dir.display()
            )));
        }
        Ok(Self { datasets: vec![spec], warnings })
    }
}

/// `10_sks dog` -> (10, "sks dog"). kohya takes the number before the first `_`.
pub fn parse_repeat_folder(name: &str) -> Option<(usize, String)> {
    let (n, rest) = name.split_once('_')?;
    let n: usize = n.parse().ok()?;
    (n > 0).then(|| (n, rest.trim().to_string()))
}

fn resolve_dir(base: &Path, dir: &str) -> PathBuf {
    let p = PathBuf::from(dir);
    if p.is_absolute() {
        return p;
    }
    let from_base = base.join(&p);
    if !from_base.exists() && p.exists() {
        p
    } else {
        from_base
    }
}

fn check_keys(table: &toml::Table, place: &str, allowed: &[&[&str]], source: &str, warnings: &mut Vec<String>) {
    for key in table.keys() {
        if allowed.iter().any(|set| set.contains(&key.as_str())) {
            continue;
        }
        let msg = if UNSUPPORTED_KEYS.contains(&key.as_str()) {
            format!("{source}: '{key}' in {place} is a kohya setting that graft does not support: ignored")
        } else if DATASET_KEYS.contains(&key.as_str()) {
            format!("{source}: '{key}' in {place} is a dataset setting: move it to [[datasets]] or [general] (ignored here)")
        } else if key == "image_dir" {
            format!("{source}: 'image_dir' in {place} belongs in a [[datasets.subsets]] table (ignored here)")
        } else {
            format!("{source}: unknown key '{key}' in {place} ignored (check its spelling)")
        };
        warnings.push(msg);
    }
}

/// Settings looked up from the most specific table to the most general.
struct Layers<'a> {
    tables: Vec<(&'a toml::Table, String)>,
    source: &'a str,
}

impl Layers<'_> {
    fn get(&self, key: &str) -> Option<(&toml::Value, &str)> {
        self.tables.iter().find_map(|(t, w)| t.get(key).map(|v| (v, w.as_str())))
    }

    fn bad(&self, key: &str, place: &str, want: &str, v: &toml::Value) -> Error {
        Error::Dataset(format!("{}: '{key}' in {place} must be {want}, got {v}", self.source))
    }

    fn usize(&self, key: &str, default: usize, min: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some((v, place)) => match v.as_integer() {
                Some(i) if i >= min as i64 => Ok(i as usize),
                _ => Err(self.bad(key, place, &format!("an integer >= {min}"), v)),
            },
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some((v, place)) => v.as_bool().ok_or_else(|| self.bad(key, place, "true or false", v)),
        }
    }

    fn rate(&self, key: &str) -> Result<f64> {
        match self.get(key) {
            None => Ok(0.0),
            Some((v, place)) => {
                let x = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
                match x {
                    Some(x) if (0.0..=1.0).contains(&x) => Ok(x),
                    _ => Err(self.bad(key, place, "a number from 0 to 1", v)),
                }
            }
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some((toml::Value::String(s), _)) => Ok(Some(s.clone())),
            Some((v, place)) => Err(self.bad(key, place, "a string", v)),
        }
    }

    fn dataset_spec(&self) -> Result<DatasetSpec> {
        let resolution = match self.get("resolution") {
            None => {
                return Err(Error::Dataset(format!(
                    "{}: no resolution: set resolution = 1024 (or [width, height]) in [general] or [[datasets]]",
                    self.source
                )))
            }
            Some((v, place)) => {
                let want = "a positive integer or [width, height]";
                match v {
                    toml::Value::Integer(i) if *i > 0 => Reso::new(*i as usize, *i as usize),
                    toml::Value::Array(a) if a.len() == 2 => match (a[0].as_integer(), a[1].as_integer()) {
                        (Some(w), Some(h)) if w > 0 && h > 0 => Reso::new(w as usize, h as usize),
                        _ => return Err(self.bad("resolution", place, want, v)),
                    },
                    _ => return Err(self.bad("resolution", place, want, v)),
                }
            }
        };
        let mut spec = DatasetSpec::new(resolution);
        let b = &mut spec.buckets;
        b.enable_bucket = self.bool("enable_bucket", b.enable_bucket)?;
        b.min_bucket_reso = self.usize("min_bucket_reso", b.min_bucket_reso, 1)?;
        b.max_bucket_reso = self.usize("max_bucket_reso", b.max_bucket_reso, 1)?;
        b.bucket_reso_steps = self.usize("bucket_reso_steps", b.bucket_reso_steps, 1)?;
        b.bucket_no_upscale = self.bool("bucket_no_upscale", b.bucket_no_upscale)?;
        spec.batch_size = self.usize("batch_size", 1, 1)?;
        Bucketer::new(spec.buckets).map_err(|e| Error::Dataset(format!("{}: {e}", self.source)))?;
        Ok(spec)
    }

    fn subset_spec(&self, image_dir: PathBuf) -> Result<SubsetSpec> {
        let mut s = SubsetSpec::new(image_dir);
        s.num_repeats = self.usize("num_repeats", 1, 1)?;
        s.shuffle_caption = self.bool("shuffle_caption", false)?;
        s.keep_tokens = self.usize("keep_tokens", 0, 0)?;
        s.caption_extension = self.string("caption_extension")?;
        if let Some(sep) = self.string("caption_separator")? {
            s.caption_separator = sep;
        }
        s.caption_dropout_rate = self.rate("caption_dropout_rate")?;
        s.flip_aug = self.bool("flip_aug", false)?;
        s.class_tokens = self.string("class_tokens")?;
        Ok(s)
    }
}

/// How to treat bad files when opening a dataset.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Skip broken images and images without a caption, listing them as warnings, instead of failing.
    pub skip_bad: bool,
    /// Decode every image fully while opening (slower; otherwise only the header is read, and a
    /// damaged image body is found when the image is first loaded).
    pub verify_images: bool,
}

/// One image of the dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageItem {
    pub path: PathBuf,
    /// The file stem.
    pub key: String,
    pub caption: String,
    pub original: Reso,
    pub placement: Placement,
    /// Index of its dataset and of its subset in that dataset.
    pub dataset: usize,
    pub subset: usize,
    pub file_len: u64,
    pub modified_ns: u128,
}

/// The images of a run, placed in their buckets.
#[derive(Debug, Clone)]
pub struct Dataset {
    specs: Vec<DatasetSpec>,
    items: Vec<ImageItem>,
    warnings: Vec<String>,
}

impl Dataset {
    /// Finds the images, reads their captions and sizes, and places them in buckets. Problems with
    /// files are all listed in one error (or as warnings with `skip_bad`).
    pub fn open(config: &DatasetConfig, options: &OpenOptions) -> Result<Self> {
        let mut warnings = config.warnings.clone();
        let mut problems = Vec::new();
        let mut items = Vec::new();
        for (di, spec) in config.datasets.iter().enumerate() {
            let bucketer = Bucketer::new(spec.buckets)?;
            for (si, subset) in spec.subsets.iter().enumerate() {
                let before = items.len();
                scan_subset(subset, &bucketer, options, (di, si), &mut items, &mut problems, &mut warnings)?;
                if items.len() == before {
                    warnings.push(format!("no usable images in {}", subset.image_dir.display()));
                }
            }
        }
        if !problems.is_empty() {
            if options.skip_bad {
                warnings.extend(problems.into_iter().map(|p| format!("skipped: {p}")));
            } else {
                let n = problems.len();
                let mut msg = format!("{n} problem{} in the dataset:", if n == 1 { "" } else { "s" });
                for p in problems.iter().take(MAX_LISTED_PROBLEMS) {
                    msg.push_str("\n  - ");
                    msg.push_str(p);
                }
                if n > MAX_LISTED_PROBLEMS {
                    msg.push_str(&format!("\n  ... and {} more", n - MAX_LISTED_PROBLEMS));
                }
                msg.push_str("\nFix these files, or pass --skip-bad to train without them.");
                return Err(Error::Dataset(msg));
            }
        }
        if items.is_empty() {
            let dirs: Vec<String> = config.datasets.iter().flat_map(|d| d.subsets.iter().map(|s| s.image_dir.display().to_string())).collect();
            return Err(Error::Dataset(format!(
                "no training images in {}: put .png/.jpg/.jpeg/.webp images there with caption files of the same name (NAME.txt)",
                if dirs.is_empty() { "the dataset (it lists no folder)".to_string() } else { dirs.join(", ") }
            )));
        }
        Ok(Self { specs: config.datasets.clone(), items, warnings })
    }

    pub fn items(&self) -> &[ImageItem] {
        &self.items
    }

    /// Takes the images at `indices` out of this dataset and returns them as a dataset of their
    /// own, with the same settings (validation images held out from training).
    pub fn split_off(&mut self, indices: &std::collections::BTreeSet<usize>) -> Dataset {
        let (out, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.items).into_iter().enumerate().partition(|(i, _)| indices.contains(i));
        self.items = kept.into_iter().map(|(_, it)| it).collect();
        Dataset { specs: self.specs.clone(), items: out.into_iter().map(|(_, it)| it).collect(), warnings: Vec::new() }
    }

    pub fn specs(&self) -> &[DatasetSpec] {
        &self.specs
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The number of images (without repeats).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn subset_of(&self, item: &ImageItem) -> &SubsetSpec {
        &self.specs[item.dataset].subsets[item.subset]
    }

    /// Samples in one epoch: every image times its repeats.
    pub fn samples_per_epoch(&self) -> usize {
        self.items.iter().map(|it| self.subset_of(it).num_repeats).sum()
    }

    /// Images per bucket, as (bucket, count).
    pub fn bucket_counts(&self) -> Vec<(Reso, usize)> {
        let mut counts = BTreeMap::new();
        for it in &self.items {
            *counts.entry(it.placement.bucket).or_insert(0) += 1;
        }
        counts.into_iter().collect()
    }

    /// True when no subset changes captions at random: a text-encoder output cache then sees each
    /// caption (plus the empty one with dropout) and stays small.
    pub fn captions_are_static(&self) -> bool {
        self.specs.iter().flat_map(|d| &d.subsets).all(|s| !s.shuffle_caption)
    }

    /// The batches of one epoch. Deterministic for (seed, epoch).
    pub fn epoch(&self, seed: u64, epoch: u64) -> Epoch<'_> {
        let mut rng = GraftRng::new(mix(seed, epoch, u64::MAX));
        let mut batches = Vec::new();
        for (di, spec) in self.specs.iter().enumerate() {
            let mut buckets: BTreeMap<Reso, Vec<usize>> = BTreeMap::new();
            for (i, it) in self.items.iter().enumerate().filter(|(_, it)| it.dataset == di) {
                let list = buckets.entry(it.placement.bucket).or_default();
                list.extend(std::iter::repeat_n(i, self.subset_of(it).num_repeats));
            }
            for (_, mut list) in buckets {
                shuffle(&mut rng, &mut list);
                batches.extend(list.chunks(spec.batch_size).map(|c| c.to_vec()));
            }
        }
        shuffle(&mut rng, &mut batches);
        Epoch { dataset: self, seed, epoch, batches, next: 0, device: Device::Cpu, load_images: true }
    }

    /// The key of an image's latent in a cache: the file (path, modification time, size), its
    /// placement and the flip.
    pub fn latent_key(&self, index: usize, flip: bool) -> String {
        let it = &self.items[index];
        let p = it.placement;
        format!(
            "{}|{}|{}|{}|{}|{},{}|{}",
            it.path.display(),
            it.modified_ns,
            it.file_len,
            p.bucket,
            p.resized,
            p.crop_left,
            p.crop_top,
            if flip { "flip" } else { "noflip" }
        )
    }

    /// Loads, resizes and crops one image (and flips it): `[3, h, w]` f32 in [-1, 1] on the CPU.
    pub fn load_image(&self, index: usize, flip: bool) -> Result<Tensor> {
        let it = &self.items[index];
        let img = decode_image(&it.path)?;
        let size = Reso::new(img.width() as usize, img.height() as usize);
        if size != it.original {
            return Err(Error::Dataset(format!(
                "image {} is now {size} but was {} when the dataset was opened: restart the run",
                it.path.display(),
                it.original
            )));
        }
        let mut rgb = img.to_rgb8();
        let p = it.placement;
        if p.resized != size {
            rgb = image::imageops::resize(&rgb, p.resized.width as u32, p.resized.height as u32, image::imageops::FilterType::Lanczos3);
        }
        let (bw, bh) = (p.bucket.width, p.bucket.height);
        let mut crop = image::imageops::crop_imm(&rgb, p.crop_left as u32, p.crop_top as u32, bw as u32, bh as u32).to_image();
        if flip {
            image::imageops::flip_horizontal_in_place(&mut crop);
        }
        Ok(Tensor::from_vec(crop.into_raw(), (bh, bw, 3), &Device::Cpu)?.permute((2, 0, 1))?.to_dtype(DType::F32)?.affine(2.0 / 255.0, -1.0)?)
    }

    /// The caption of one sample after dropout and tag shuffling.
    fn sample_caption(&self, it: &ImageItem, rng: &mut GraftRng) -> String {
        let s = self.subset_of(it);
        if s.caption_dropout_rate > 0.0 && rng.uniform() < s.caption_dropout_rate {
            return String::new();
        }
        if !s.shuffle_caption {
            return it.caption.clone();
        }
        let mut tags: Vec<&str> = it.caption.split(s.caption_separator.as_str()).map(str::trim).collect();
        let keep = s.keep_tokens.min(tags.len());
        shuffle(rng, &mut tags[keep..]);
        tags.join(", ")
    }
}

/// A batch: images of one bucket with their captions and SDXL size conditioning.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, 3, h, w]` f32 in [-1, 1]; `None` when the epoch was asked not to load images (latents
    /// cached).
    pub images: Option<Tensor>,
    pub captions: Vec<String>,
    /// (height, width) of each original image: SDXL's `original_size` time ids.
    pub original_sizes: Vec<(usize, usize)>,
    /// (top, left) of each crop in resized pixels: SDXL's `crop_coords_top_left`. Mirrored for a
    /// flipped sample.
    pub crop_coords: Vec<(usize, usize)>,
    /// (height, width) of the bucket: SDXL's `target_size`.
    pub target_size: (usize, usize),
    /// File stems.
    pub keys: Vec<String>,
    /// Indices into `Dataset::items`.
    pub indices: Vec<usize>,
    pub flipped: Vec<bool>,
    /// Cache keys of the samples' latents (see `Dataset::latent_key`).
    pub latent_keys: Vec<String>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    pub fn images(&self) -> Result<&Tensor> {
        self.images.as_ref().ok_or_else(|| Error::Dataset("this batch was made without images (the epoch was opened for cached latents)".into()))
    }

    /// SDXL's six time ids per sample, `[b, 6]` f32: original (h, w), crop (top, left), target (h, w).
    pub fn time_ids(&self, device: &Device) -> Result<Tensor> {
        let (th, tw) = self.target_size;
        let mut data = Vec::with_capacity(self.len() * 6);
        for ((oh, ow), (ct, cl)) in self.original_sizes.iter().zip(&self.crop_coords) {
            data.extend([*oh, *ow, *ct, *cl, th, tw].map(|x| x as f32));
        }
        Ok(Tensor::from_vec(data, (self.len(), 6), device)?)
    }
}

/// The batches of one epoch, in order. Iterate it, or build any batch by index.
#[derive(Debug)]
pub struct Epoch<'a> {
    dataset: &'a Dataset,
    seed: u64,
    epoch: u64,
    batches: Vec<Vec<usize>>,
    next: usize,
    device: Device,
    load_images: bool,
}

impl Epoch<'_> {
    /// Put batch images on this device (default CPU).
    pub fn on(mut self, device: &Device) -> Self {
        self.device = device.clone();
        self
    }

    /// Do not load images (when the latents come from a cache).
    pub fn without_images(mut self) -> Self {
        self.load_images = false;
        self
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The index of the batch the iterator gives next.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Continue from batch `index` (resume).
    pub fn seek(&mut self, index: usize) {
        self.next = index.min(self.batches.len());
    }

    /// Batch `index`: the same result however and whenever it is asked for.
    pub fn batch(&self, index: usize) -> Result<Batch> {
        let ds = self.dataset;
        let members = self
            .batches
            .get(index)
            .ok_or_else(|| Error::Dataset(format!("batch {index} is past the end of the epoch ({} batches)", self.len())))?;
        let mut rng = GraftRng::new(mix(self.seed, self.epoch, index as u64));
        let first = &ds.items[members[0]];
        let bucket = first.placement.bucket;
        let mut b = Batch {
            images: None,
            captions: Vec::new(),
            original_sizes: Vec::new(),
            crop_coords: Vec::new(),
            target_size: (bucket.height, bucket.width),
            keys: Vec::new(),
            indices: members.clone(),
            flipped: Vec::new(),
            latent_keys: Vec::new(),
        };
        let mut images = Vec::new();
        for &i in members {
            let it = &ds.items[i];
            let flip = ds.subset_of(it).flip_aug && rng.uniform() < 0.5;
            b.captions.push(ds.sample_caption(it, &mut rng));
            b.original_sizes.push((it.original.height, it.original.width));
            let p = it.placement;
            let left = if flip { p.resized.width - p.bucket.width - p.crop_left } else { p.crop_left };
            b.crop_coords.push((p.crop_top, left));
            b.keys.push(it.key.clone());
            b.flipped.push(flip);
            b.latent_keys.push(ds.latent_key(i, flip));
            if self.load_images {
                images.push(ds.load_image(i, flip)?);
            }
        }
        if self.load_images {
            b.images = Some(Tensor::stack(&images, 0)?.to_device(&self.device)?);
        }
        Ok(b)
    }
}

impl Iterator for Epoch<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.batches.len() {
            return None;
        }
        let b = self.batch(self.next);
        self.next += 1;
        Some(b)
    }
}

/// Fisher-Yates with the project's generator.
fn shuffle<T>(rng: &mut GraftRng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// A seed for (seed, epoch, batch): splitmix64 steps, so neighbouring inputs give unrelated seeds.
fn mix(seed: u64, epoch: u64, index: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix(splitmix(splitmix(seed) ^ epoch) ^ index)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Error::Dataset(format!("cannot read image folder {}: {e} (check the path in the dataset settings)", dir.display())))?;
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

fn image_extension(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_string_lossy().to_ascii_lowercase();
    IMAGE_EXTENSIONS.contains(&ext.as_str()).then_some(ext)
}

/// The largest image side graft decodes, and the most memory one decoded image may take: a
/// header that claims more (a damaged file, or a size no training needs) is refused before
/// anything is allocated for it. 256 MiB holds an 85-megapixel RGB photo.
pub const MAX_IMAGE_SIDE: u32 = 16384;
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

fn decode_image(path: &Path) -> Result<image::DynamicImage> {
    let mut reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::Dataset(format!("image {} cannot be opened: {e}", path.display())))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| Error::Dataset(format!("image {} cannot be decoded ({e}): re-save it as PNG, JPEG or WebP, or remove it", path.display())))
}

/// Reads the caption of `image`, or its subset's class tokens. `Err` is a problem to list.
fn read_caption(image: &Path, subset: &SubsetSpec) -> std::result::Result<String, String> {
    let exts: Vec<String> = match &subset.caption_extension {
        Some(e) if e.starts_with('.') => vec![e.clone()],
        Some(e) => vec![format!(".{e}")],
        None => CAPTION_EXTENSIONS.iter().map(|s| s.to_string()).collect(),
    };
    let stem = image.with_extension("");
    for ext in &exts {
        let path = PathBuf::from(format!("{}{ext}", stem.display()));
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("caption file {} cannot be read: {e}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| format!("caption file {} is not UTF-8 text: save it as UTF-8", path.display()))?;
        let line = text.trim_start_matches('\u{feff}').lines().next().unwrap_or("").trim().to_string();
        if line.is_empty() {
            return Err(format!("caption file {} is empty: write the caption on its first line", path.display()));
        }
        return Ok(line);
    }
    match &subset.class_tokens {
        Some(class) => Ok(class.clone()),
        None => {
            let tried: Vec<String> = exts.iter().map(|e| format!("{}{e}", stem.display())).collect();
            Err(format!(
                "image {} has no caption file (looked for {}): write one, or put the image in an N_name folder \
                 to use the name as its caption",
                image.display(),
                tried.join(", ")
            ))
        }
    }
}

fn scan_subset(
    subset: &SubsetSpec,
    bucketer: &Bucketer,
    options: &OpenOptions,
    (dataset, subset_index): (usize, usize),
    items: &mut Vec<ImageItem>,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for path in sorted_entries(&subset.image_dir)? {
        if !path.is_file() {
            continue;
        }
        if image_extension(&path).is_none() {
            let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            if OTHER_IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                warnings.push(format!("image {} skipped: .{ext} is not read (convert it to PNG, JPEG or WebP)", path.display()));
            }
            continue;
        }
        let caption = match read_caption(&path, subset) {
            Ok(c) => c,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let size = if options.verify_images {
            decode_image(&path).map(|img| (img.width(), img.height())).map_err(|e| e.to_string())
        } else {
            image::ImageReader::open(&path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
                .map_err(|e| format!("image {} cannot be read ({e}): re-save it as PNG, JPEG or WebP, or remove it", path.display()))
        };
        let (w, h) = match size {
            Ok((w, h)) if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE => {
                problems.push(format!(
                    "image {} is {w}x{h} pixels: graft reads images up to {MAX_IMAGE_SIDE} pixels a side; resize it",
                    path.display()
                ));
                continue;
            }
            Ok(s) => s,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let original = Reso::new(w as usize, h as usize);
        let placement = match bucketer.place(original) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("image {}: {e}", path.display()));
                continue;
            }
        };
        let meta = std::fs::metadata(&path).map_err(|e| Error::Dataset(format!("cannot stat {}: {e}", path.display())))?;
        let modified_ns = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        items.push(ImageItem {
            key: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            path,
            caption,
            original,
            placement,
            dataset,
            subset: subset_index,
            file_len: meta.len(),
            modified_ns,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32) {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 77]));
        img.save(path).unwrap();
    }

    fn spec(res: usize) -> DatasetSpec {
        DatasetSpec::new(Reso::new(res, res))
    }

    #[test]
    fn repeat_folder_names() {
        assert_eq!(parse_repeat_folder("10_sks dog"), Some((10, "sks dog".to_string())));
        assert_eq!(parse_repeat_folder("3_a_b"), Some((3, "a_b".to_string())));
        assert_eq!(parse_repeat_folder("style"), None);
        assert_eq!(parse_repeat_folder("x_style"), None);
        assert_eq!(parse_repeat_folder("0_style"), None);
    }

    #[test]
    fn toml_inheritance_and_warnings() {
        let text = r#"
            [general]
            shuffle_caption = true
            keep_tokens = 1
            enable_bucket = true
            caption_extension = ".txt"
            color_aug = true

            [[datasets]]
            resolution = [768, 512]
            batch_size = 4
            keep_tokens = 2
            max_bucket_reso = 2048
            typo_key = 3

              [[datasets.subsets]]
              image_dir = "a"
              num_repeats = 10
              flip_aug = true

              [[datasets.subsets]]
              image_dir = "/abs/b"
              keep_tokens = 0
              class_tokens = "sks dog"
              caption_dropout_rate = 0.1
              resolution = 256
        "#;
        let cfg = DatasetConfig::from_toml_str(text, "data.toml", Path::new("/base")).unwrap();
        assert_eq!(cfg.datasets.len(), 1);
        let d = &cfg.datasets[0];
        assert_eq!(d.buckets.resolution, Reso::new(768, 512));
        assert!(d.buckets.enable_bucket);
        assert_eq!((d.buckets.max_bucket_reso, d.batch_size), (2048, 4));
        let (a, b) = (&d.subsets[0], &d.subsets[1]);
        assert_eq!(a.image_dir, PathBuf::from("/base/a"));
        assert_eq!((a.num_repeats, a.keep_tokens, a.shuffle_caption, a.flip_aug), (10, 2, true, true));
        assert_eq!(a.caption_extension.as_deref(), Some(".txt"));
        assert_eq!(b.image_dir, PathBuf::from("/abs/b"));
        assert_eq!((b.num_repeats, b.keep_tokens, b.caption_dropout_rate), (1, 0, 0.1));
        assert_eq!(b.class_tokens.as_deref(), Some("sks dog"));
        let w = cfg.warnings.join("\n");
        assert!(w.contains("'color_aug' in [general]") && w.contains("does not support"), "{w}");
        assert!(w.contains("unknown key 'typo_key' in [[datasets]] #1"), "{w}");
        assert!(w.contains("'resolution' in [[datasets.subsets]] #2 of [[datasets]] #1 is a dataset setting"), "{w}");
    }

    #[test]
    fn toml_errors_name_the_key() {
        let err = |t: &str| DatasetConfig::from_toml_str(t, "d.toml", Path::new(".")).unwrap_err().to_string();
        let e = err("[[datasets]]\nresolution = 512\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = 'x'\n");
        assert!(e.contains("'batch_size' in [[datasets]] #1 must be an integer >= 1"), "{e}");
        let e = err("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n");
        assert!(e.contains("no resolution"), "{e}");
        let e = err("[general]\nresolution = 512\n[[datasets]]\n");
        assert!(e.contains("has no [[datasets.subsets]]"), "{e}");
        let e = err("[general]\nresolution = 512\n");
        assert!(e.contains("has no [[datasets]]"), "{e}");
        let e = err("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nnum_repeats = 2\n");
        assert!(e.contains("has no image_dir"), "{e}");
        let e = err("[[datasets]]\nresolution = 'big'\n[[datasets.subsets]]\nimage_dir = 'x'\n");
        assert!(e.contains("'resolution' in [[datasets]] #1"), "{e}");
        let e = err("[[datasets]]\nresolution = 512\ncaption_dropout_rate = 2\n[[datasets.subsets]]\nimage_dir = 'x'\n");
        assert!(e.contains("caption_dropout_rate"), "{e}");
        assert!(err("not toml [").contains("not valid TOML"));
    }

    #[test]
    fn folder_scan_repeats_captions_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("a.png"), 64, 64);
        std::fs::write(root.join("a.txt"), "red, square\nignored second line").unwrap();
        std::fs::create_dir(root.join("3_sks dog")).unwrap();
        write_png(&root.join("3_sks dog/b.png"), 64, 64);
        write_png(&root.join("3_sks dog/c.png"), 64, 64);
        std::fs::write(root.join("3_sks dog/c.caption"), "a photo of sks dog").unwrap();
        std::fs::create_dir(root.join("misc")).unwrap();
        std::fs::write(root.join("x.bmp"), b"BM").unwrap();

        let cfg = DatasetConfig::from_folder(root, &spec(64), &SubsetSpec::new("")).unwrap();
        assert!(cfg.warnings.iter().any(|w| w.contains("misc")), "{:?}", cfg.warnings);
        let ds = Dataset::open(&cfg, &OpenOptions::default()).unwrap();
        let caps: Vec<(&str, &str)> = ds.items().iter().map(|i| (i.key.as_str(), i.caption.as_str())).collect();
        assert_eq!(caps, vec![("a", "red, square"), ("b", "sks dog"), ("c", "a photo of sks dog")]);
        assert_eq!(ds.samples_per_epoch(), 1 + 3 * 2);
        assert!(ds.warnings().iter().any(|w| w.contains("x.bmp")), "{:?}", ds.warnings());

        // A missing caption and a broken image: one error naming both files.
        write_png(&root.join("d.png"), 64, 64);
        std::fs::write(root.join("e.png"), b"not a png").unwrap();
        std::fs::write(root.join("e.txt"), "broken").unwrap();
        let cfg = DatasetConfig::from_folder(root, &spec(64), &SubsetSpec::new("")).unwrap();
        let err = Dataset::open(&cfg, &OpenOptions::default()).unwrap_err().to_string();
        assert!(err.contains("2 problems"), "{err}");
        assert!(err.contains("d.png has no caption file") && err.contains("d.txt"), "{err}");
        assert!(err.contains("e.png cannot be read"), "{err}");
        assert!(err.contains("--skip-bad"), "{err}");
        let ds = Dataset::open(&cfg, &OpenOptions { skip_bad: true, ..Default::default() }).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.warnings().iter().filter(|w| w.starts_with("skipped:")).count(), 2);
    }

    #[test]
    fn empty_dataset_names_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let err = DatasetConfig::from_folder(dir.path(), &spec(64), &SubsetSpec::new("")).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("no training images"), "{err}");
        let cfg = DatasetConfig { datasets: vec![DatasetSpec { subsets: vec![SubsetSpec::new(dir.path())], ..spec(64) }], warnings: vec![] };
        let err = Dataset::open(&cfg, &OpenOptions::default()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        let err = Dataset::open(
            &DatasetConfig { datasets: vec![DatasetSpec { subsets: vec![SubsetSpec::new("/no/such/dir")], ..spec(64) }], warnings: vec![] },
            &OpenOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/no/such/dir"), "{err}");
    }

    #[test]
    fn caption_shuffle_keeps_tokens_and_dropout() {
        let mut rng = GraftRng::new(1);
        let mut sub = SubsetSpec::new("");
        sub.shuffle_caption = true;
        sub.keep_tokens = 2;
        let item = ImageItem {
            path: PathBuf::new(),
            key: String::new(),
            caption: "sks, style, a,b , c, d, e".into(),
            original: Reso::new(8, 8),
            placement: Placement { bucket: Reso::new(8, 8), resized: Reso::new(8, 8), crop_left: 0, crop_top: 0 },
            dataset: 0,
            subset: 0,
            file_len: 0,
            modified_ns: 0,
        };
        let mut ds = Dataset { specs: vec![DatasetSpec { subsets: vec![sub], ..spec(64) }], items: vec![item.clone()], warnings: vec![] };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let c = ds.sample_caption(&item, &mut rng);
            assert!(c.starts_with("sks, style, "), "{c}");
            let mut tags: Vec<&str> = c.split(", ").collect();
            tags.sort();
            assert_eq!(tags, vec!["a", "b", "c", "d", "e", "sks", "style"]);
            seen.insert(c);
        }
        assert!(seen.len() > 1);
        ds.specs[0].subsets[0].caption_dropout_rate = 1.0;
        assert_eq!(ds.sample_caption(&item, &mut rng), "");
    }
}
