//! The project's own seeded random generator. candle's CPU generator cannot be seeded, so every
//! noise tensor (latents, ancestral steps, VAE samples, dropout, timesteps) comes from here: the
//! same seed reproduces an image exactly, on any machine.

use candle_core::{Device, Result, Shape, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct GraftRng {
    inner: ChaCha8Rng,
}

impl GraftRng {
    pub fn new(seed: u64) -> Self {
        Self { inner: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The full generator state (seed, stream, word position), for checkpoints.
    pub fn state(&self) -> [u64; 3] {
        let seed = self.inner.get_seed();
        [u64::from_le_bytes(seed[..8].try_into().unwrap()), self.inner.get_stream(), self.inner.get_word_pos() as u64]
    }

    pub fn uniform(&mut self) -> f64 {
        self.inner.random::<f64>()
    }

    /// A standard normal sample (Box-Muller, written out so it never changes with a crate version).
    pub fn normal(&mut self) -> f64 {
        loop {
            let u1 = self.uniform();
            if u1 > f64::MIN_POSITIVE {
                let u2 = self.uniform();
                return (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            }
        }
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.inner.random_range(0..n)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// An f32 tensor of unit-normal noise.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count()).map(|_| self.normal() as f32).collect();
        Tensor::from_vec(data, shape, device)
    }

    /// An f32 tensor of uniform samples in [0, 1).
    pub fn rand<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count()).map(|_| self.uniform() as f32).collect();
        Tensor::from_vec(data, shape, device)
    }
}
