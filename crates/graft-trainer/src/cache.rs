//! Caches of VAE latents and text-encoder outputs, in memory or on disk.
//!
//! The caller supplies the encoder (a closure), so this module needs no model. On disk, each entry
//! is one safetensors file named by a hash of its key; the full key is stored in the file's metadata
//! and checked on reading, so a changed image (new modification time or size), another bucket,
//! flip or `namespace` (name the VAE or text encoders there) is a miss, never a stale hit. A damaged
//! cache file is a miss too: it is encoded again and rewritten.
//!
//! Text-encoder outputs are keyed by the caption text: cache them only while the text encoders are
//! frozen. With `shuffle_caption` nearly every caption is new, so the cache mostly misses (see
//! `Dataset::captions_are_static`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

use super::dataset::{Batch, Dataset};
use super::optim::write_safetensors_atomic;

const CACHE_FORMAT: &str = "graft-cache/1";

/// Entries of tensors by key, in memory or on disk.
#[derive(Debug)]
struct TensorStore {
    dir: Option<PathBuf>,
    namespace: String,
    memory: HashMap<String, Vec<Tensor>>,
    hits: usize,
    misses: usize,
}

impl TensorStore {
    fn memory() -> Self {
        Self { dir: None, namespace: String::new(), memory: HashMap::new(), hits: 0, misses: 0 }
    }

    fn disk(dir: &Path, namespace: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::State(format!("cannot create cache folder {}: {e}", dir.display())))?;
        Ok(Self { dir: Some(dir.to_path_buf()), namespace: namespace.to_string(), ..Self::memory() })
    }

    fn file_for(&self, dir: &Path, label: &str, key: &str) -> (PathBuf, String) {
        let full = format!("{}\n{key}", self.namespace);
        let label: String = label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(40).collect();
        (dir.join(format!("{label}-{:016x}.safetensors", fnv1a(full.as_bytes()))), full)
    }

    fn get(&mut self, label: &str, key: &str, device: &Device) -> Result<Option<Vec<Tensor>>> {
        let found = match &self.dir {
            None => self.memory.get(key).cloned(),
            Some(dir) => {
                let (path, full) = self.file_for(dir, label, key);
                read_entry(&path, &full, device)
            }
        };
        match found {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        Ok(found)
    }

    fn put(&mut self, label: &str, key: &str, tensors: Vec<Tensor>) -> Result<()> {
        match &self.dir {
            None => {
                self.memory.insert(key.to_string(), tensors);
            }
            Some(dir) => {
                let (path, full) = self.file_for(dir, label, key);
                let named: BTreeMap<String, Tensor> =
                    tensors.iter().enumerate().map(|(i, t)| Ok((format!("{i:03}"), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
                let meta = HashMap::from([("format".to_string(), CACHE_FORMAT.to_string()), ("key".to_string(), full)]);
                write_safetensors_atomic(&path, &named, meta)?;
            }
        }
        Ok(())
    }
}

/// An entry from disk, or `None` when it is missing, for another key, or unreadable.
fn read_entry(path: &Path, full_key: &str, device: &Device) -> Option<Vec<Tensor>> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let meta = meta.metadata().as_ref()?;
    if meta.get("format").map(String::as_str) != Some(CACHE_FORMAT) || meta.get("key").map(String::as_str) != Some(full_key) {
        return None;
    }
    match candle_core::safetensors::load_buffer(&bytes, device) {
        Ok(map) => {
            let sorted: BTreeMap<String, Tensor> = map.into_iter().collect();
            Some(sorted.into_values().collect())
        }
        Err(e) => {
            tracing::warn!("cache file {} is damaged ({e}): encoding again", path.display());
            None
        }
    }
}

/// 64-bit FNV-1a: a file name hash that never changes with a compiler or crate version.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// VAE latents per (image, bucket, flip).
#[derive(Debug)]
pub struct LatentCache {
    store: TensorStore,
}

impl LatentCache {
    pub fn in_memory() -> Self {
        Self { store: TensorStore::memory() }
    }

    /// A cache in `dir`. `namespace` names the encoder (e.g. the VAE file and dtype): entries of
    /// another namespace are not used.
    pub fn on_disk(dir: &Path, namespace: &str) -> Result<Self> {
        Ok(Self { store: TensorStore::disk(dir, namespace)? })
    }

    /// Lookups that found an entry, and that did not.
    pub fn hits(&self) -> usize {
        self.store.hits
    }

    pub fn misses(&self) -> usize {
        self.store.misses
    }

    /// The latent of one image of `dataset` (`[C, h, w]`), encoded and stored on a miss.
    /// `encode` gets the image as `[1, 3, H, W]` in [-1, 1] on `device` and returns `[1, C, h, w]`
    /// (or `[C, h, w]`), already scaled as the training step wants it.
    pub fn latent<F>(&mut self, dataset: &Dataset, index: usize, flip: bool, device: &Device, encode: &mut F) -> Result<Tensor>
    where
        F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
    {
        let key = dataset.latent_key(index, flip);
        let label = &dataset.items()[index].key;
        if let Some(mut t) = self.store.get(label, &key, device)? {
            return Ok(t.remove(0));
        }
        let image = dataset.load_image(index, flip)?.unsqueeze(0)?.to_device(device)?;
        let mut latent = encode(&image)?;
        if latent.rank() == 4 {
            if latent.dim(0)? != 1 {
                return Err(Error::Internal(format!("the latent encoder returned {:?} for one image: expected [1, C, h, w]", latent.dims())));
            }
            latent = latent.squeeze(0)?;
        }
        if latent.rank() != 3 {
            return Err(Error::Internal(format!("the latent encoder returned {:?}: expected [1, C, h, w]", latent.dims())));
        }
        let latent = latent.detach();
        self.store.put(label, &key, vec![latent.clone()])?;
        Ok(latent)
    }

    /// The latents of a batch, `[b, C, h, w]`.
    pub fn batch_latents<F>(&mut self, dataset: &Dataset, batch: &Batch, device: &Device, encode: &mut F) -> Result<Tensor>
    where
        F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
    {
        let latents = batch
            .indices
            .iter()
            .zip(&batch.flipped)
            .map(|(&i, &flip)| self.latent(dataset, i, flip, device, encode))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&latents, 0)?)
    }

    /// Encodes every image of the dataset ahead of training (both flips where `flip_aug` is on).
    /// `progress(done, total)` is called after each one. Returns how many were encoded (misses).
    pub fn prefill<F, P>(&mut self, dataset: &Dataset, device: &Device, encode: &mut F, mut progress: P) -> Result<usize>
    where
        F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
        P: FnMut(usize, usize),
    {
        let mut work = Vec::new();
        for (i, it) in dataset.items().iter().enumerate() {
            work.push((i, false));
            if dataset.specs()[it.dataset].subsets[it.subset].flip_aug {
                work.push((i, true));
            }
        }
        let before = self.store.misses;
        for (done, (i, flip)) in work.iter().enumerate() {
            self.latent(dataset, *i, *flip, device, encode)?;
            progress(done + 1, work.len());
        }
        Ok(self.store.misses - before)
    }
}

/// Text-encoder outputs per caption text.
#[derive(Debug)]
pub struct EmbeddingCache {
    store: TensorStore,
}

impl EmbeddingCache {
    pub fn in_memory() -> Self {
        Self { store: TensorStore::memory() }
    }

    /// A cache in `dir`; `namespace` names the text encoders.
    pub fn on_disk(dir: &Path, namespace: &str) -> Result<Self> {
        Ok(Self { store: TensorStore::disk(dir, namespace)? })
    }

    pub fn hits(&self) -> usize {
        self.store.hits
    }

    pub fn misses(&self) -> usize {
        self.store.misses
    }

    /// The outputs for one caption (e.g. prompt embeds `[1, 77, 2048]` and pooled `[1, 1280]`),
    /// computed and stored on a miss.
    pub fn get_or_compute<F>(&mut self, caption: &str, device: &Device, compute: F) -> Result<Vec<Tensor>>
    where
        F: FnOnce(&str) -> Result<Vec<Tensor>>,
    {
        if let Some(found) = self.store.get("te", caption, device)? {
            return Ok(found);
        }
        let out: Vec<Tensor> = compute(caption)?.into_iter().map(|t| t.detach()).collect();
        self.store.put("te", caption, out.clone())?;
        Ok(out)
    }

    /// The outputs for a batch of captions, each concatenated along dim 0 (so `compute` returns
    /// tensors with a leading batch dimension of 1).
    pub fn batch<F>(&mut self, captions: &[String], device: &Device, mut compute: F) -> Result<Vec<Tensor>>
    where
        F: FnMut(&str) -> Result<Vec<Tensor>>,
    {
        let per_caption = captions.iter().map(|c| self.get_or_compute(c, device, &mut compute)).collect::<Result<Vec<_>>>()?;
        let n = per_caption.first().map_or(0, Vec::len);
        if per_caption.iter().any(|o| o.len() != n) {
            return Err(Error::Internal("the text encoder returned a different number of outputs for different captions".into()));
        }
        (0..n)
            .map(|k| {
                let parts: Vec<&Tensor> = per_caption.iter().map(|o| &o[k]).collect();
                Ok(Tensor::cat(&parts, 0)?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_cache_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let mut calls = 0;
        let mut compute = |c: &str| -> Result<Vec<Tensor>> {
            calls += 1;
            let x = c.len() as f32;
            Ok(vec![Tensor::new(&[[x, x]], &dev)?, Tensor::new(&[[x]], &dev)?])
        };
        let caps = vec!["ab".to_string(), "abc".to_string(), "ab".to_string()];
        for cache in [EmbeddingCache::in_memory(), EmbeddingCache::on_disk(dir.path(), "te-v1").unwrap()] {
            let mut cache = cache;
            let out = cache.batch(&caps, &dev, &mut compute).unwrap();
            assert_eq!(out[0].to_vec2::<f32>().unwrap(), vec![vec![2., 2.], vec![3., 3.], vec![2., 2.]]);
            assert_eq!(out[1].dims(), &[3, 1]);
            assert_eq!((cache.hits(), cache.misses()), (1, 2));
        }
        assert_eq!(calls, 4);
        // On disk, a new cache object finds the entries; another namespace does not.
        let mut again = EmbeddingCache::on_disk(dir.path(), "te-v1").unwrap();
        again.batch(&caps, &dev, |_| panic!("should be cached")).unwrap();
        let mut other = EmbeddingCache::on_disk(dir.path(), "te-v2").unwrap();
        other.get_or_compute("ab", &dev, |_| Ok(vec![Tensor::new(&[0f32], &dev)?])).unwrap();
        assert_eq!(other.misses(), 1);
    }
}
