//! A dataset folder as the dataset page shows it: each image with its caption, size, bucket and
//! problems; captions written back to their `.txt` files.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;

use graft_trainer::buckets::{BucketSettings, Bucketer, Reso};

pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

#[derive(Debug, Clone, Serialize)]
pub struct ImageEntry {
    /// Relative to the dataset folder, `/`-separated.
    pub name: String,
    pub caption: Option<String>,
    /// The caption file (relative), existing or to be written.
    pub caption_file: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub bucket: Option<String>,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub dir: String,
    pub resolution: usize,
    pub images: Vec<ImageEntry>,
    /// Images per bucket (`WxH`).
    pub buckets: BTreeMap<String, usize>,
    /// Problems of the whole folder, and a count of images with problems.
    pub problems: Vec<String>,
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The images of the folder and of its direct subfolders (kohya `N_name` folders), sorted.
fn find_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read the folder {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&path) {
                out.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file() && is_image(p)));
            }
        } else if is_image(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn rel_name(dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

/// The caption file of an image: an existing `.txt` or `.caption`, else the `.txt` to write.
pub fn caption_path(image: &Path) -> PathBuf {
    let caption = image.with_extension("caption");
    if !image.with_extension("txt").exists() && caption.exists() {
        return caption;
    }
    image.with_extension("txt")
}

fn bucketer(resolution: usize) -> anyhow::Result<Bucketer> {
    let mut s = BucketSettings::new(Reso::new(resolution, resolution));
    s.enable_bucket = true;
    s.bucket_reso_steps = if resolution.is_multiple_of(64) { 64 } else { 8 };
    s.min_bucket_reso = resolution.min(256);
    s.max_bucket_reso = resolution.max(1024);
    Ok(Bucketer::new(s)?)
}

/// Lists a dataset folder.
pub fn list(dir: &Path, resolution: usize) -> anyhow::Result<Listing> {
    if !dir.is_dir() {
        bail!("dataset folder {} does not exist or is not a folder", dir.display());
    }
    graft_sdxl::pipeline::check_size(resolution, resolution).context("resolution")?;
    let mut problems = Vec::new();
    let bucketer = match bucketer(resolution) {
        Ok(b) => Some(b),
        Err(e) => {
            problems.push(format!("no buckets at resolution {resolution}: {e:#}"));
            None
        }
    };
    let mut images = Vec::new();
    let mut buckets = BTreeMap::new();
    for path in find_images(dir)? {
        let cap = caption_path(&path);
        let mut entry = ImageEntry {
            name: rel_name(dir, &path),
            caption: None,
            caption_file: rel_name(dir, &cap),
            width: None,
            height: None,
            bucket: None,
            problems: Vec::new(),
        };
        match std::fs::read_to_string(&cap) {
            Ok(text) if text.trim().is_empty() => {
                entry.caption = Some(text);
                entry.problems.push("empty caption".into());
            }
            Ok(text) => entry.caption = Some(text.trim_end().to_string()),
            Err(_) => entry.problems.push("missing caption".into()),
        }
        // Decoding the whole image finds truncated files, not only bad headers.
        match image::open(&path) {
            Ok(img) => {
                let (w, h) = (img.width(), img.height());
                entry.width = Some(w);
                entry.height = Some(h);
                if let Some(b) = &bucketer {
                    match b.place(Reso::new(w as usize, h as usize)) {
                        Ok(p) => {
                            let key = format!("{}x{}", p.bucket.width, p.bucket.height);
                            *buckets.entry(key.clone()).or_insert(0) += 1;
                            entry.bucket = Some(key);
                        }
                        Err(e) => entry.problems.push(format!("no bucket: {e}")),
                    }
                }
                if (w as usize) < resolution / 2 || (h as usize) < resolution / 2 {
                    entry.problems.push(format!("small: {w}x{h} for resolution {resolution} (upscaled)"));
                }
            }
            Err(e) => entry.problems.push(format!("unreadable image: {e}")),
        }
        images.push(entry);
    }
    if images.is_empty() {
        problems.push(format!("no images ({}) in the folder or its subfolders", IMAGE_EXTENSIONS.join(", ")));
    }
    let bad = images.iter().filter(|i| !i.problems.is_empty()).count();
    if bad > 0 {
        problems.push(format!("{bad} of {} images have problems", images.len()));
    }
    Ok(Listing { dir: dir.display().to_string(), resolution, images, buckets, problems })
}

/// An image of the folder by its listed name; refuses names that leave the folder.
pub fn resolve_image(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("image name `{name}` must be a path inside the dataset folder (no `..`, not absolute)");
    }
    let path = dir.join(rel);
    if !path.is_file() || !is_image(&path) {
        bail!("no image `{name}` in {}", dir.display());
    }
    Ok(path)
}

/// Writes an image's caption; returns the caption file.
pub fn save_caption(dir: &Path, name: &str, caption: &str) -> anyhow::Result<PathBuf> {
    let image = resolve_image(dir, name)?;
    let path = caption_path(&image);
    let mut text = caption.trim_end().to_string();
    text.push('\n');
    graft_formats::write::write_atomic(&path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
