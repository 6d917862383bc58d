//! Aspect-ratio buckets, the kohya way.
//!
//! Bucket list (kohya's `make_bucket_resolutions`): the square of side `floor(sqrt(area) / step) *
//! step`, and for each width from `min_reso` to `max_reso` in steps, the height = the largest
//! multiple of `step` with `width * height <= area` (capped at `max_reso`), kept when it is at least
//! `min_reso`, in both orientations. `area` is `resolution.w * resolution.h`.
//!
//! Placing an image: an image whose size is a bucket goes there; otherwise the bucket with the
//! closest aspect ratio (first in (width, height) order on a tie). The image is resized, keeping
//! its aspect ratio, so that it *covers* the bucket (one side equal, the other at least as long,
//! rounded half up), then center-cropped (the extra is split, the odd pixel goes right / bottom).
//! The crop's top-left corner is recorded in resized pixels: that is SDXL's `crop_coords_top_left`
//! time id, next to the original size and the target (bucket) size.
//!
//! `bucket_no_upscale` (kohya): images are never enlarged. A larger image is scaled down to the
//! area, keeping its aspect ratio, with one side rounded to a step; the bucket is then the resized
//! size cut down to multiples of the step, and the rest is cropped.
//!
//! With buckets disabled every image goes to the `resolution` bucket (resized to cover, center crop).

use crate::error::{Error, Result};

/// A size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reso {
    pub width: usize,
    pub height: usize,
}

impl Reso {
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height }
    }

    fn aspect(self) -> f64 {
        self.width as f64 / self.height as f64
    }
}

impl std::fmt::Display for Reso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// Where an image goes and how it gets there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The bucket: the size of the training image.
    pub bucket: Reso,
    /// The image is resized to this (it covers the bucket) ...
    pub resized: Reso,
    /// ... then cropped at this top-left corner (x = left, y = top), in resized pixels.
    pub crop_left: usize,
    pub crop_top: usize,
}

/// The bucketing settings of one dataset (kohya's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSettings {
    pub resolution: Reso,
    pub enable_bucket: bool,
    pub min_bucket_reso: usize,
    pub max_bucket_reso: usize,
    pub bucket_reso_steps: usize,
    pub bucket_no_upscale: bool,
}

impl BucketSettings {
    /// kohya's defaults for a square resolution (buckets off, 256..1024 in steps of 64).
    pub fn new(resolution: Reso) -> Self {
        Self { resolution, enable_bucket: false, min_bucket_reso: 256, max_bucket_reso: 1024, bucket_reso_steps: 64, bucket_no_upscale: false }
    }
}

/// kohya's bucket list for a maximum area `max_reso.w * max_reso.h`, sorted by (width, height).
pub fn make_buckets(max_reso: Reso, min_size: usize, max_size: usize, step: usize) -> Vec<Reso> {
    let area = max_reso.width * max_reso.height;
    let mut resos = std::collections::BTreeSet::new();
    let side = ((area as f64).sqrt() as usize / step) * step;
    resos.insert(Reso::new(side, side));
    let mut width = min_size;
    while width <= max_size {
        let height = max_size.min((area / width / step) * step);
        if height >= min_size {
            resos.insert(Reso::new(width, height));
            resos.insert(Reso::new(height, width));
        }
        width += step;
    }
    resos.into_iter().collect()
}

/// Places images into buckets.
#[derive(Debug, Clone)]
pub struct Bucketer {
    settings: BucketSettings,
    buckets: Vec<Reso>,
}

impl Bucketer {
    pub fn new(settings: BucketSettings) -> Result<Self> {
        let s = &settings;
        let bad = |msg: String| Err(Error::Config(format!("dataset bucket settings: {msg}")));
        if s.resolution.width == 0 || s.resolution.height == 0 {
            return bad(format!("resolution {} must be positive", s.resolution));
        }
        if s.bucket_reso_steps == 0 || !s.bucket_reso_steps.is_multiple_of(8) {
            return bad(format!("bucket_reso_steps = {} must be a positive multiple of 8 (64 is usual for SDXL)", s.bucket_reso_steps));
        }
        if !s.enable_bucket {
            for (what, v) in [("width", s.resolution.width), ("height", s.resolution.height)] {
                if v % 8 != 0 {
                    return bad(format!("resolution {what} {v} must be a multiple of 8 for the VAE"));
                }
            }
        } else if !s.bucket_no_upscale {
            if s.min_bucket_reso > s.max_bucket_reso {
                return bad(format!("min_bucket_reso = {} is larger than max_bucket_reso = {}", s.min_bucket_reso, s.max_bucket_reso));
            }
            let (rw, rh) = (s.resolution.width, s.resolution.height);
            // Name the one key to change, with the value that would do.
            if s.min_bucket_reso > rw.min(rh) {
                return bad(format!(
                    "min_bucket_reso = {} is above the resolution {}: lower min_bucket_reso to {} or less",
                    s.min_bucket_reso,
                    s.resolution,
                    rw.min(rh) / s.bucket_reso_steps.max(1) * s.bucket_reso_steps.max(1)
                ));
            }
            if s.max_bucket_reso < rw.max(rh) {
                return bad(format!(
                    "max_bucket_reso = {} is below the resolution {}: raise max_bucket_reso to {} or more",
                    s.max_bucket_reso,
                    s.resolution,
                    rw.max(rh).div_ceil(s.bucket_reso_steps) * s.bucket_reso_steps
                ));
            }
            for (what, v) in [("min_bucket_reso", s.min_bucket_reso), ("max_bucket_reso", s.max_bucket_reso)] {
                if v == 0 || v % s.bucket_reso_steps != 0 {
                    return bad(format!("{what} = {v} must be a positive multiple of bucket_reso_steps ({})", s.bucket_reso_steps));
                }
            }
        }
        let buckets = if !s.enable_bucket {
            vec![s.resolution]
        } else if s.bucket_no_upscale {
            Vec::new() // made per image
        } else {
            make_buckets(s.resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_reso_steps)
        };
        if s.enable_bucket && !s.bucket_no_upscale && buckets.is_empty() {
            return bad(format!(
                "no bucket fits between min_bucket_reso {} and max_bucket_reso {} at resolution {}",
                s.min_bucket_reso, s.max_bucket_reso, s.resolution
            ));
        }
        Ok(Self { settings, buckets })
    }

    pub fn settings(&self) -> &BucketSettings {
        &self.settings
    }

    /// The predefined buckets (empty with `bucket_no_upscale`, where buckets follow the images).
    pub fn buckets(&self) -> &[Reso] {
        &self.buckets
    }

    /// Where an image of this size goes. Fails only for an image smaller than one bucket step
    /// with `bucket_no_upscale`.
    pub fn place(&self, image: Reso) -> Result<Placement> {
        if image.width == 0 || image.height == 0 {
            return Err(Error::Dataset(format!("image size {image} is empty")));
        }
        let s = &self.settings;
        let (bucket, resized) = if s.enable_bucket && s.bucket_no_upscale {
            self.no_upscale(image)?
        } else {
            let bucket = if self.buckets.contains(&image) {
                image
            } else {
                let ar = image.aspect();
                let mut best = self.buckets[0];
                for &b in &self.buckets[1..] {
                    if (b.aspect() - ar).abs() < (best.aspect() - ar).abs() {
                        best = b;
                    }
                }
                best
            };
            (bucket, cover(image, bucket))
        };
        Ok(Placement { bucket, resized, crop_left: (resized.width - bucket.width) / 2, crop_top: (resized.height - bucket.height) / 2 })
    }

    fn no_upscale(&self, image: Reso) -> Result<(Reso, Reso)> {
        let step = self.settings.bucket_reso_steps;
        let max_area = (self.settings.resolution.width * self.settings.resolution.height) as f64;
        let ar = image.aspect();
        let round = |x: f64| {
            let x = (x + 0.5) as usize;
            x - x % step
        };
        let resized = if (image.width * image.height) as f64 > max_area {
            // Shrink to the area, then round one side to a step: whichever keeps the aspect best.
            let w = (max_area * ar).sqrt();
            let h = max_area / w;
            let bw = round(w);
            let bh_for_w = round(bw as f64 / ar);
            let bh = round(h);
            let bw_for_h = round(bh as f64 * ar);
            let err_w = if bh_for_w > 0 { (bw as f64 / bh_for_w as f64 - ar).abs() } else { f64::INFINITY };
            let err_h = if bh > 0 { (bw_for_h as f64 / bh as f64 - ar).abs() } else { f64::INFINITY };
            if err_w < err_h {
                Reso::new(bw, (bw as f64 / ar + 0.5) as usize)
            } else {
                Reso::new((bh as f64 * ar + 0.5) as usize, bh)
            }
        } else {
            image
        };
        let bucket = Reso::new(resized.width - resized.width % step, resized.height - resized.height % step);
        if bucket.width == 0 || bucket.height == 0 {
            return Err(Error::Dataset(format!(
                "image is {image}, smaller than one bucket step ({step} px) on a side, and bucket_no_upscale is on"
            )));
        }
        Ok((bucket, resized))
    }
}

/// The size that keeps `image`'s aspect ratio and covers `bucket` with one side equal.
fn cover(image: Reso, bucket: Reso) -> Reso {
    let (iw, ih) = (image.width as f64, image.height as f64);
    let scale = if image.aspect() > bucket.aspect() { bucket.height as f64 / ih } else { bucket.width as f64 / iw };
    let w = ((iw * scale + 0.5) as usize).max(bucket.width);
    let h = ((ih * scale + 0.5) as usize).max(bucket.height);
    Reso::new(w, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(res: usize) -> Bucketer {
        let mut s = BucketSettings::new(Reso::new(res, res));
        s.enable_bucket = true;
        s.max_bucket_reso = 2048;
        Bucketer::new(s).unwrap()
    }

    /// A resolution outside the bucket range names the one key to change and a value that works.
    #[test]
    fn a_resolution_outside_the_range_names_the_key() {
        let settings = |res: usize| BucketSettings { enable_bucket: true, ..BucketSettings::new(Reso::new(res, res)) };
        let e = Bucketer::new(settings(128)).unwrap_err().to_string();
        assert!(e.contains("min_bucket_reso = 256 is above the resolution 128x128: lower min_bucket_reso to 128 or less"), "{e}");
        let e = Bucketer::new(settings(1100)).unwrap_err().to_string();
        assert!(e.contains("raise max_bucket_reso to 1152 or more"), "{e}");
        let mut ok = settings(128);
        ok.min_bucket_reso = 64;
        assert!(Bucketer::new(ok).is_ok());
    }

    #[test]
    fn sdxl_bucket_list() {
        let b = make_buckets(Reso::new(1024, 1024), 256, 2048, 64);
        // Every bucket: multiples of 64, area at most 1024^2, sides within 256..2048.
        for r in &b {
            assert!(r.width % 64 == 0 && r.height % 64 == 0, "{r}");
            assert!(r.width * r.height <= 1024 * 1024, "{r}");
            assert!((256..=2048).contains(&r.width) && (256..=2048).contains(&r.height), "{r}");
        }
        for r in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344), (640, 1600), (512, 2048), (256, 2048)] {
            assert!(b.contains(&Reso::new(r.0, r.1)), "{r:?} missing");
        }
        // Each width has the tallest height that fits.
        assert!(!b.contains(&Reso::new(896, 1088)));
        // kohya's count for 1024 / 256..2048 / 64.
        assert_eq!(b.len(), 41);
    }

    #[test]
    fn closest_aspect_cover_and_center_crop() {
        let b = on(1024);
        // 3:2 landscape 1500x1000 -> 1216x832 (ar 1.4615, closest to 1.5 among buckets).
        let p = b.place(Reso::new(1500, 1000)).unwrap();
        assert_eq!(p.bucket, Reso::new(1216, 832));
        // Scale by height 832/1000 gives width 1248 >= 1216: crop 32 columns, 16 from the left.
        assert_eq!(p.resized, Reso::new(1248, 832));
        assert_eq!((p.crop_left, p.crop_top), (16, 0));
        // An image the size of a bucket is taken as is.
        let p = b.place(Reso::new(832, 1216)).unwrap();
        assert_eq!((p.bucket, p.resized, p.crop_left, p.crop_top), (Reso::new(832, 1216), Reso::new(832, 1216), 0, 0));
        // A small square is enlarged to the square bucket.
        let p = b.place(Reso::new(100, 100)).unwrap();
        assert_eq!((p.bucket, p.resized), (Reso::new(1024, 1024), Reso::new(1024, 1024)));
    }

    #[test]
    fn buckets_off_uses_the_resolution() {
        let b = Bucketer::new(BucketSettings::new(Reso::new(512, 512))).unwrap();
        let p = b.place(Reso::new(640, 480)).unwrap();
        assert_eq!(p.bucket, Reso::new(512, 512));
        assert_eq!(p.resized, Reso::new(683, 512));
        assert_eq!((p.crop_left, p.crop_top), (85, 0));
    }

    #[test]
    fn no_upscale() {
        let mut s = BucketSettings::new(Reso::new(512, 512));
        s.enable_bucket = true;
        s.bucket_no_upscale = true;
        let b = Bucketer::new(s).unwrap();
        // Small images keep their size; the bucket is cut to steps.
        let p = b.place(Reso::new(300, 200)).unwrap();
        assert_eq!((p.bucket, p.resized), (Reso::new(256, 192), Reso::new(300, 200)));
        assert_eq!((p.crop_left, p.crop_top), (22, 4));
        // Large images shrink to the area.
        let p = b.place(Reso::new(2000, 1000)).unwrap();
        assert!(p.resized.width * p.resized.height <= 512 * 512 + 2 * 1024, "{:?}", p);
        assert_eq!(p.bucket.width % 64 + p.bucket.height % 64, 0);
        let err = b.place(Reso::new(40, 300)).unwrap_err().to_string();
        assert!(err.contains("bucket_no_upscale"), "{err}");
    }

    #[test]
    fn bad_settings_are_named() {
        let mut s = BucketSettings::new(Reso::new(1024, 1024));
        s.enable_bucket = true;
        s.min_bucket_reso = 300;
        let err = Bucketer::new(s).unwrap_err().to_string();
        assert!(err.contains("min_bucket_reso = 300"), "{err}");
        s.min_bucket_reso = 256;
        s.bucket_reso_steps = 60;
        assert!(Bucketer::new(s).unwrap_err().to_string().contains("bucket_reso_steps"));
    }
}
